//! The simulated Kommo account: a deterministic, seeded stand-in for `https://{subdomain}.kommo.com`.
//!
//! It is the upstream for the integration tests, the benchmarks and the demo (`kommo-fanout sim`), so
//! it behaves the way `shared/kommo-api-notes.md` describes Kommo: HAL pages of leads, `204` for an
//! empty page or any page past the end, a `next` link that is always present, at most ONE stage pair
//! per request (more is a `400`: the limitation this project works around), `limit` at most 250 (more
//! reads a page of 50), `If-Modified-Since` on leads lists, contacts and companies lists, bearer
//! tokens that see different leads, a rate limit that ends in an IP block answering HTML, faults
//! injected on demand, and JSON in any of several spellings ([`JsonStyle`]). Everything random is
//! drawn from [`SimConfig::seed`]. It imports nothing from the proxy, so the tests hold the proxy
//! to an account written apart from it.
//!
//! The account also changes as a real one does: leads are created, moved, edited, deleted and
//! restored (by the methods of [`Sim`], by writes, or by a background churn, [`SimConfig::churn`]),
//! each change bumping the lead's `updated_at` and recording an event in the feed served at
//! `GET /api/v4/events`. Silent changes ([`Sim::move_lead_silently`]) do neither, for testing a
//! reconcile. Every answer carries a `Date` header on the sim's clock ([`Sim::now_ts`]).
//!
//! With [`SimConfig::oauth`] set it is also Kommo's OAuth server: `POST /oauth2/access_token`
//! trades authorization codes ([`Sim::oauth_code`]) and single-use refresh tokens for JWT-shaped
//! access tokens that expire ([`SimOAuth::token_ttl`]). The credentials it mints are the one thing
//! not drawn from the seed: they are unpredictable, so no two sims ever share a token.
//!
//! # Layout
//! - `rng`: SplitMix64, the seeded PRNG behind the dataset, jitter, fault dice and churn.
//! - `data`: dataset generation and the `Store` that indexes leads by stage and changes them.
//! - `events`: the change feed (`SimEvent`) and the `GET /api/v4/events` query.
//! - `churn`: the background task that keeps changing the account.
//! - `query`: the sim's own parser for Kommo's `GET /api/v4/leads` query language, and HTTP dates.
//! - `render`: response bodies (HAL pages, events, pipelines, problem+json).
//! - `faults`: the rate limiter and fault rules.
//! - `oauth`: the OAuth server: codes, single-use refresh tokens, access tokens and the grants.
//! - `server`: accept loop, hyper service, routing and handlers.
//! - `args`: the `kommo-fanout sim` command-line flags.
#![forbid(unsafe_code)]

mod args;
mod churn;
mod data;
mod events;
mod faults;
mod oauth;
mod query;
mod render;
mod rng;
mod server;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::oneshot;

pub use args::SimArgs;
pub use events::{SimEvent, SimEventType, SimEventValue};

use data::Store;
use faults::{FaultSet, Limiter};
use oauth::Issuer;
use rng::SplitMix64;

/// The token a sim configured without tokens accepts; it sees every lead.
pub const DEMO_TOKEN: &str = "demo-token";

/// How the simulated account is built and how it misbehaves.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of leads generated (deleted ones included).
    pub leads: usize,
    /// Seed of everything random: dataset, latency jitter, fault probabilities and churn.
    pub seed: u64,
    /// Delay added before every answer (the CLI defaults to 80ms, tests to zero).
    pub latency: Duration,
    /// Each delay is drawn uniformly from `latency ± jitter` (clamped at zero).
    pub jitter: Duration,
    /// Accepted bearer tokens; empty means one full-access token, [`DEMO_TOKEN`].
    pub tokens: Vec<TokenSpec>,
    /// Kommo's request limit and IP block; `None` lets everything through.
    pub rate_limit: Option<SimRateLimit>,
    /// Fault rules active from the start (more can be added with [`Sim::inject`]).
    pub faults: Vec<FaultRule>,
    /// How every JSON body is spelled (the same values either way).
    pub json_style: JsonStyle,
    /// Changes per second the account undergoes while the server runs (moves, price edits,
    /// creations, deletions, restores; see [`Sim::run`]); 0 keeps it still.
    pub churn: f64,
    /// Serve `POST /oauth2/access_token` as Kommo's OAuth server for this integration and accept
    /// the access tokens it mints, besides [`SimConfig::tokens`] (or [`DEMO_TOKEN`] when there are
    /// none); `None` leaves the path unserved, as before.
    pub oauth: Option<SimOAuth>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            leads: 20_000,
            seed: 42,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            tokens: Vec::new(),
            rate_limit: None,
            faults: Vec::new(),
            json_style: JsonStyle::Compact,
            churn: 0.0,
            oauth: None,
        }
    }
}

/// The integration an OAuth-serving sim knows, and what its access tokens may read.
///
/// Kommo's token endpoint takes `client_id`, `client_secret`, `redirect_uri` and a code or refresh
/// token, and answers access tokens living `expires_in` = 86400 seconds
/// (developers.kommo.com/reference/get-token; `kommo-api-notes.md`, "OAuth").
///
/// A token is accepted for exactly its TTL of tokio's clock from issue, so `tokio::time::pause`
/// and `advance` expire it in tests. Its `iat`/`exp` and the answer's `server_time` are whole
/// seconds of the sim's clock ([`Sim::now_ts`], the `Date` header's, which starts at 2024-06-01):
/// time a refresh from `expires_in` or `exp - iat`, not by comparing `exp` with the wall clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimOAuth {
    /// The integration's id (`client_id`).
    pub client_id: String,
    /// The integration's secret key (`client_secret`); never logged.
    pub client_secret: String,
    /// The integration's redirect URI: required with a code, and must match whenever sent.
    pub redirect_uri: String,
    /// How long an access token is accepted, in whole seconds (a fraction is dropped, at least one
    /// second): `expires_in`, and the JWT's `exp - iat`. Kommo's is 24 hours.
    pub token_ttl: Duration,
    /// The responsible users whose leads the OAuth user sees, as [`TokenSpec::responsible_user_ids`]
    /// (`None`: every lead).
    pub sees: Option<Vec<i64>>,
}

impl SimOAuth {
    /// Kommo's access token lifetime: `"expires_in": 86400` (amocrm-api-php#475).
    pub const KOMMO_TOKEN_TTL: Duration = Duration::from_secs(86_400);

    /// An integration whose tokens live 24 hours and see every lead.
    pub fn new(
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
        redirect_uri: impl Into<String>,
    ) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            redirect_uri: redirect_uri.into(),
            token_ttl: Self::KOMMO_TOKEN_TTL,
            sees: None,
        }
    }

    /// The `expires_in` of its access tokens: [`SimOAuth::token_ttl`] in whole seconds, at least 1.
    pub fn expires_in(&self) -> u64 {
        self.token_ttl.as_secs().max(1)
    }
}

/// How the sim spells its JSON bodies; every spelling decodes to the same values.
///
/// `kommo-api-notes.md`: recorded answers show compact JSON, but "whether the live API escapes `/`
/// as `\/` (PHP's default) is not known: accept both, and any other valid spelling". The other
/// styles let tests prove a client does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JsonStyle {
    /// What `serde_json::to_vec` writes: no whitespace, UTF-8 as is, only quotes, backslashes and
    /// control characters escaped.
    #[default]
    Compact,
    /// PHP's `json_encode` with Symfony's `JsonResponse` flags (Kommo runs PHP): `/` as `\/`, `"`,
    /// `&`, `'`, `<`, `>` as `\u0022`, `\u0026`, `\u0027`, `\u003C`, `\u003E`, and every
    /// non-ASCII character as `\uXXXX` (surrogate pairs above the BMP).
    Php,
    /// Indented by 4 spaces, `": "` after keys.
    Pretty,
}

impl JsonStyle {
    /// The flag spelling: `compact`, `php` or `pretty`.
    pub fn as_str(self) -> &'static str {
        match self {
            JsonStyle::Compact => "compact",
            JsonStyle::Php => "php",
            JsonStyle::Pretty => "pretty",
        }
    }
}

impl std::fmt::Display for JsonStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JsonStyle {
    type Err = String;

    /// `compact`, `php` or `pretty` (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "compact" => Ok(JsonStyle::Compact),
            "php" => Ok(JsonStyle::Php),
            "pretty" => Ok(JsonStyle::Pretty),
            other => Err(format!(
                "unknown JSON style {other:?}: expected compact, php or pretty"
            )),
        }
    }
}

/// One accepted bearer token and what its user may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    /// The token as sent in `Authorization: Bearer <token>`.
    pub token: String,
    /// `None` sees every lead; `Some(ids)` sees only leads whose `responsible_user_id` is listed.
    pub responsible_user_ids: Option<Vec<i64>>,
}

impl TokenSpec {
    /// A token that sees every lead.
    pub fn full(token: impl Into<String>) -> Self {
        Self {
            token: token.into(),
            responsible_user_ids: None,
        }
    }

    /// Whether this token may see a lead with this responsible user.
    pub(crate) fn sees(&self, responsible_user_id: i64) -> bool {
        match &self.responsible_user_ids {
            None => true,
            Some(ids) => ids.contains(&responsible_user_id),
        }
    }
}

impl FromStr for TokenSpec {
    type Err = String;

    /// `abc` (sees everything) or `abc:users=1001,1002` (sees only those responsible users' leads).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (token, scope) = match s.split_once(':') {
            Some((token, scope)) => (token, Some(scope)),
            None => (s, None),
        };
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "invalid token {token:?}: expected a non-empty token without spaces"
            ));
        }
        let responsible_user_ids = match scope {
            None => None,
            Some(scope) => {
                let list = scope.strip_prefix("users=").ok_or_else(|| {
                    format!("invalid token scope {scope:?}: expected `users=ID,ID,...`")
                })?;
                let ids = list
                    .split(',')
                    .map(|id| {
                        id.trim()
                            .parse::<i64>()
                            .map_err(|_| format!("invalid user id {id:?} in token scope"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some(ids)
            }
        };
        Ok(Self {
            token: token.to_string(),
            responsible_user_ids,
        })
    }
}

/// Kommo's rate limit as the sim enforces it: at most `requests` arrivals in any trailing `window`;
/// `block_after` consecutive `429`s block the client (every request `403` HTML) for `block_for`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRateLimit {
    /// Requests allowed within one window (Kommo documents 7 per second).
    pub requests: u32,
    /// The trailing window the requests are counted in.
    pub window: Duration,
    /// Consecutive `429` answers after which the client is blocked; 0 never blocks.
    pub block_after: u32,
    /// How long a block lasts.
    pub block_for: Duration,
}

/// A fault the sim answers with instead of the real response.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Kommo's `500` problem body.
    Status500,
    /// `429` with Kommo's body; `retry_after` (seconds) goes in the body, and in a `Retry-After`
    /// header too when `header` is set.
    TooManyRequests {
        /// Seconds to put in the body's `retry_after` (omitted when `None`).
        retry_after: Option<u64>,
        /// Also send a `Retry-After` header (Kommo documents only the body field).
        header: bool,
    },
    /// `403` with an HTML page, as a blocked account or IP answers.
    HtmlForbidden,
    /// Close the connection without answering.
    ConnectionReset,
    /// `200 application/hal+json` declaring the full `Content-Length`, then ending the body half-way.
    TruncatedBody,
    /// A leads list answered `200` for one stage (`filter[statuses]`) lists, in place of its last
    /// lead, a lead of another stage: what a proxy that mixes up its upstream answers would send.
    /// Fires only on such answers (any other request neither fires it nor uses up its `times`).
    MisplaceLead,
    /// A leads list answered `200` lacks one of its leads (the first): what a proxy that loses a lead
    /// while merging would send. Fires only on `200` leads lists (others do not use up its `times`).
    DropLead,
    /// Any status with any body.
    Status {
        /// The HTTP status code (an invalid one is answered as 500).
        status: u16,
        /// The body, sent as is.
        body: String,
        /// The `Content-Type` header.
        content_type: String,
    },
}

/// When a [`Fault`] applies: rules are checked in order for each request, the first that fires wins.
///
/// Faults that replace the answer ([`Fault::Status500`] and the like) are decided on arrival; those
/// that change a leads list's body ([`Fault::MisplaceLead`], [`Fault::DropLead`]) once its `200`
/// page is known, among themselves in the same order. An answer replaced on arrival is not changed.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// What to answer.
    pub fault: Fault,
    /// Only requests whose path starts with this (`None`: any path).
    pub path_prefix: Option<String>,
    /// Only requests whose query string (raw or percent-decoded) contains this.
    pub query_contains: Option<String>,
    /// How many more times it fires (`None`: forever).
    pub times: Option<u32>,
    /// Chance of firing on a matching request, drawn from the seeded rng (1.0: always).
    pub probability: f64,
}

impl FaultRule {
    /// A rule that fires on every request, forever.
    pub fn always(fault: Fault) -> Self {
        Self {
            fault,
            path_prefix: None,
            query_contains: None,
            times: None,
            probability: 1.0,
        }
    }

    /// Restrict the rule to paths starting with `prefix`.
    pub fn on_path(mut self, prefix: impl Into<String>) -> Self {
        self.path_prefix = Some(prefix.into());
        self
    }

    /// Restrict the rule to query strings containing `needle`.
    pub fn on_query(mut self, needle: impl Into<String>) -> Self {
        self.query_contains = Some(needle.into());
        self
    }

    /// Let the rule fire `n` times only.
    pub fn times(mut self, n: u32) -> Self {
        self.times = Some(n);
        self
    }

    /// Let the rule fire with probability `p` on each matching request.
    pub fn with_probability(mut self, p: f64) -> Self {
        self.probability = p;
        self
    }
}

impl FromStr for FaultRule {
    type Err = String;

    /// `KIND[@PROBABILITY]` with KIND one of `500`, `429`, `html403`, `reset`, `truncate`, `drop`,
    /// `misplace`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, probability) = match s.split_once('@') {
            Some((kind, p)) => {
                let p: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid fault probability {p:?}: expected 0..=1"))?;
                if !(0.0..=1.0).contains(&p) {
                    return Err(format!("fault probability {p} is outside 0..=1"));
                }
                (kind, p)
            }
            None => (s, 1.0),
        };
        let fault = match kind.trim() {
            "500" => Fault::Status500,
            "429" => Fault::TooManyRequests {
                retry_after: Some(1),
                header: false,
            },
            "html403" => Fault::HtmlForbidden,
            "reset" => Fault::ConnectionReset,
            "truncate" => Fault::TruncatedBody,
            "drop" => Fault::DropLead,
            "misplace" => Fault::MisplaceLead,
            other => {
                return Err(format!(
                    "unknown fault kind {other:?}: expected 500, 429, html403, reset, truncate, drop or misplace"
                ))
            }
        };
        Ok(Self::always(fault).with_probability(probability))
    }
}

/// A pipeline of the simulated account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimPipeline {
    /// Pipeline id (1000, 2000, ...).
    pub id: i64,
    /// Display name.
    pub name: String,
    /// Sort position.
    pub sort: i64,
    /// Whether this is the account's main pipeline (exactly one is).
    pub is_main: bool,
    /// Its stages: "Incoming leads" (type 1), the custom stages, then 142 (won) and 143 (lost).
    pub statuses: Vec<SimStatus>,
}

/// A stage (Kommo: status) of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimStatus {
    /// Status id; 142 and 143 recur in every pipeline, the others are unique.
    pub id: i64,
    /// Display name.
    pub name: String,
    /// Sort position within the pipeline.
    pub sort: i64,
    /// Kommo's `type`: 1 for "Incoming leads" (unsorted), 0 otherwise.
    pub type_: u8,
    /// Whether users may edit it (false for the system stages).
    pub is_editable: bool,
    /// Display colour, `#rrggbb`.
    pub color: String,
}

/// A tag on a lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimTag {
    /// Tag id.
    pub id: i64,
    /// Tag name.
    pub name: String,
    /// Colour, often unset.
    pub color: Option<String>,
}

/// A contact or a company of the account: one a lead links to (`SimLead::contact_ids`,
/// `SimLead::company_id`). Kommo lists both with the same fields this sim keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimCard {
    /// Contact or company id.
    pub id: i64,
    /// Full name, or company name (some non-ASCII, some with `&` or `'`).
    pub name: String,
    /// Responsible user (1001..=1008).
    pub responsible_user_id: i64,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last update, Unix seconds, `>= created_at`.
    pub updated_at: i64,
}

/// A contact of the account.
pub type SimContact = SimCard;
/// A company of the account.
pub type SimCompany = SimCard;

/// The ground truth of one lead.
#[derive(Debug, Clone, PartialEq)]
pub struct SimLead {
    /// Lead id: unique, ascending in creation order, not contiguous.
    pub id: i64,
    /// Lead name.
    pub name: String,
    /// Sale value.
    pub price: i64,
    /// Responsible user (1001..=1008); tokens may be scoped by it.
    pub responsible_user_id: i64,
    /// Group of the responsible user.
    pub group_id: i64,
    /// Stage the lead is in.
    pub status_id: i64,
    /// Pipeline the lead is in.
    pub pipeline_id: i64,
    /// Loss reason (only lost leads have one).
    pub loss_reason_id: Option<i64>,
    /// Lead source (reported only with `with=source_id` / `with=source`).
    pub source_id: Option<i64>,
    /// User who created the lead.
    pub created_by: i64,
    /// User who last updated the lead.
    pub updated_by: i64,
    /// Creation time, Unix seconds, hour-aligned so many leads share it.
    pub created_at: i64,
    /// Last update, Unix seconds, `>= created_at`.
    pub updated_at: i64,
    /// Closing time, only for stages 142 and 143.
    pub closed_at: Option<i64>,
    /// Time of the closest open task.
    pub closest_task_at: Option<i64>,
    /// Deleted but restorable: listed only with `with=only_deleted`.
    pub is_deleted: bool,
    /// Lead score (unset in generated data).
    pub score: Option<i64>,
    /// Seconds of work spent (unset in generated data).
    pub labor_cost: Option<i64>,
    /// Whether a robot changed the price last (reported with `with=is_price_modified_by_robot`).
    pub is_price_modified_by_robot: bool,
    /// Custom field values as `(field_id, value)`; empty renders as `null`.
    pub custom_fields: Vec<(i64, String)>,
    /// Tags.
    pub tags: Vec<SimTag>,
    /// The linked company, if any.
    pub company_id: Option<i64>,
    /// Linked contacts; the first is the main one.
    pub contact_ids: Vec<i64>,
    /// Linked list (catalog) elements as `(element_id, quantity)`.
    pub catalog_elements: Vec<(i64, i64)>,
    /// Stages `(pipeline_id, status_id)` that ALSO list this lead, as Kommo does mid-move.
    pub ghost_stages: Vec<(i64, i64)>,
}

/// One request as the sim saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Arrival time (before latency), on tokio's clock.
    pub at: tokio::time::Instant,
    /// HTTP method.
    pub method: String,
    /// URI path, as sent.
    pub path: String,
    /// Raw query string (empty when none).
    pub query: String,
    /// Bearer token, if an `Authorization: Bearer` header was sent (valid or not).
    pub token: Option<String>,
    /// The `X-Request-Id` header, if one was sent.
    pub request_id: Option<String>,
    /// Every header as sent (to check what a client forwards).
    pub headers: http::HeaderMap,
    /// Status answered; 0 while in flight, for a reset connection, or if the client went away.
    pub status: u16,
}

/// The simulated account; cheap to clone (all clones share one account).
#[derive(Clone)]
pub struct Sim(Arc<Inner>);

/// State shared by all clones of a [`Sim`] and all its connections.
struct Inner {
    /// Leads and pipelines. `RwLock`: every list request reads, mutations are rare.
    store: RwLock<Store>,
    /// Accepted tokens (never empty).
    tokens: Vec<TokenSpec>,
    /// Base delay before every answer.
    latency: Duration,
    /// Half-width of the uniform jitter around `latency`.
    jitter: Duration,
    /// Jitter dice; a plain `Mutex` since a draw is a few nanoseconds.
    jitter_rng: Mutex<SplitMix64>,
    /// Rate limiter and IP block, when configured.
    limiter: Option<Mutex<Limiter>>,
    /// Fault rules with their remaining counts and their own dice.
    faults: Mutex<FaultSet>,
    /// How JSON bodies are spelled.
    json_style: JsonStyle,
    /// Changes per second applied while the server runs.
    churn: f64,
    /// Every request, in arrival order.
    log: Mutex<RequestLog>,
    /// When the sim was built: the clock behind timestamps of changes made while it runs.
    started: tokio::time::Instant,
    /// Connections accepted: shows how clients pool and reuse them.
    connections: AtomicU64,
    /// The OAuth server (codes, refresh and access tokens); off unless [`SimConfig::oauth`] is set.
    oauth: Issuer,
}

/// The request log; `generation` lets an answer find its entry again even after a `clear_requests`.
#[derive(Default)]
struct RequestLog {
    /// Requests in arrival order.
    entries: Vec<RecordedRequest>,
    /// Bumped by every clear, so stale entry indices are ignored.
    generation: u64,
}

/// A running sim bound to `127.0.0.1`; the server stops when the handle is dropped.
pub struct SimHandle {
    /// The account it serves.
    sim: Sim,
    /// Where it listens.
    addr: SocketAddr,
    /// Dropping this ends the server's shutdown future.
    _shutdown: oneshot::Sender<()>,
}

// === impl Sim ===

impl Sim {
    /// Build the account from `cfg` (the dataset is generated here, deterministically from the seed).
    pub fn new(cfg: SimConfig) -> Sim {
        let (pipelines, leads) = data::generate(cfg.leads, cfg.seed);
        let tokens = if cfg.tokens.is_empty() {
            vec![TokenSpec::full(DEMO_TOKEN)]
        } else {
            cfg.tokens
        };
        Sim(Arc::new(Inner {
            store: RwLock::new(Store::new(pipelines, leads, cfg.seed)),
            tokens,
            latency: cfg.latency,
            jitter: cfg.jitter,
            jitter_rng: Mutex::new(SplitMix64::derived(cfg.seed, 1)),
            limiter: cfg.rate_limit.map(|rl| Mutex::new(Limiter::new(rl))),
            faults: Mutex::new(FaultSet::new(cfg.faults, SplitMix64::derived(cfg.seed, 2))),
            json_style: cfg.json_style,
            churn: cfg.churn,
            log: Mutex::new(RequestLog::default()),
            started: tokio::time::Instant::now(),
            connections: AtomicU64::new(0),
            oauth: Issuer::new(cfg.oauth),
        }))
    }

    /// Serve on an already-bound listener until `shutdown` completes; then stop accepting, let open
    /// connections finish their current request (for up to 5 seconds) and return. While it serves,
    /// the account undergoes [`SimConfig::churn`] changes per second.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        server::run(self, listener, shutdown).await
    }

    /// Bind `127.0.0.1:0`, spawn the server and return a handle to it.
    pub async fn spawn(cfg: SimConfig) -> std::io::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let sim = Sim::new(cfg);
        let (tx, rx) = oneshot::channel::<()>();
        let server = sim.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                // Completes when the handle sends or is dropped.
                let _ = rx.await;
            };
            if let Err(error) = server.run(listener, shutdown).await {
                tracing::warn!(%error, "sim server stopped with an error");
            }
        });
        Ok(SimHandle {
            sim,
            addr,
            _shutdown: tx,
        })
    }

    /// Ground truth: every lead, deleted ones included, in id order.
    pub fn leads(&self) -> Vec<SimLead> {
        self.store().leads.clone()
    }

    /// The account's pipelines with their stages.
    pub fn pipelines(&self) -> Vec<SimPipeline> {
        self.store().pipelines.clone()
    }

    /// Ground truth: every contact the leads link to, in id order.
    pub fn contacts(&self) -> Vec<SimContact> {
        self.store().contacts.clone()
    }

    /// Ground truth: every company the leads link to, in id order.
    pub fn companies(&self) -> Vec<SimCompany> {
        self.store().companies.clone()
    }

    /// How this sim spells its JSON bodies.
    pub fn json_style(&self) -> JsonStyle {
        self.0.json_style
    }

    /// The accepted tokens (one [`DEMO_TOKEN`] when none were configured).
    pub fn tokens(&self) -> Vec<TokenSpec> {
        self.0.tokens.clone()
    }

    /// Every request so far (since the last [`Sim::clear_requests`]), in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.log().entries.clone()
    }

    /// How many connections were accepted since the simulator started.
    pub fn connections_accepted(&self) -> u64 {
        self.0.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn connection_accepted(&self) {
        self.0.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// How many requests arrived (since the last [`Sim::clear_requests`]).
    pub fn request_count(&self) -> usize {
        self.log().entries.len()
    }

    /// A fresh authorization code for [`SimConfig::oauth`]'s integration: single-use, tradeable at
    /// `POST /oauth2/access_token` for 20 minutes of tokio's clock, as Kommo's codes are (useless
    /// when OAuth is off).
    pub fn oauth_code(&self) -> String {
        self.0.oauth.mint_code(tokio::time::Instant::now())
    }

    /// How many `refresh_token` grants were answered with new tokens.
    pub fn oauth_refreshes(&self) -> u64 {
        self.0.oauth.refreshes()
    }

    /// How many token requests were refused (any 4xx of `POST /oauth2/access_token`; not those a
    /// rate limit or an injected fault answered first).
    pub fn oauth_refused(&self) -> u64 {
        self.0.oauth.refused()
    }

    /// Forget the recorded requests.
    pub fn clear_requests(&self) {
        let mut log = self.log();
        log.entries.clear();
        log.generation += 1;
    }

    /// Add a fault rule after the existing ones.
    pub fn inject(&self, rule: FaultRule) {
        self.0
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rule);
    }

    /// Remove every fault rule (those from the config too).
    pub fn clear_faults(&self) {
        self.0
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Ground truth: the account's change feed, oldest first (at most the newest 100 000 events).
    pub fn events(&self) -> Vec<SimEvent> {
        self.store().events.all()
    }

    /// Move a lead to another stage, bumping `updated_at` (and setting `closed_at` when it enters 142
    /// or 143, clearing it elsewhere) and recording `lead_status_changed`. False if the lead or the
    /// stage does not exist. Moving a lead to its own stage only bumps `updated_at`.
    pub fn move_lead(&self, lead_id: i64, pipeline_id: i64, status_id: i64) -> bool {
        let mut store = self.store_mut();
        // The clock is read under the lock, so changes are stamped in the order they are made.
        let now = self.now_ts();
        store.move_lead(lead_id, pipeline_id, status_id, now)
    }

    /// Create a lead in a stage, with fields made like the generated leads' and an id above every
    /// other, created and updated now; records `lead_added`. `None` if the stage does not exist.
    pub fn create_lead(&self, pipeline_id: i64, status_id: i64) -> Option<i64> {
        let mut store = self.store_mut();
        let now = self.now_ts();
        store.create_generated(pipeline_id, status_id, now)
    }

    /// Change a lead's sale value (`price`), bumping `updated_at` and recording
    /// `sale_field_changed` (nothing is recorded when the price is the same). False if there is no
    /// such lead.
    pub fn edit_lead(&self, lead_id: i64, price: i64) -> bool {
        let mut store = self.store_mut();
        let now = self.now_ts();
        store.edit_price(lead_id, price, now)
    }

    /// Delete a lead: it is listed only with `with=only_deleted` from then on; bumps `updated_at`
    /// and records `lead_deleted`. False if there is no such live lead.
    pub fn delete_lead(&self, lead_id: i64) -> bool {
        let mut store = self.store_mut();
        let now = self.now_ts();
        store.delete(lead_id, now, false)
    }

    /// Restore a deleted lead to the lists it was in; bumps `updated_at` and records
    /// `lead_restored`. False if there is no such deleted lead.
    pub fn restore_lead(&self, lead_id: i64) -> bool {
        let mut store = self.store_mut();
        let now = self.now_ts();
        store.restore(lead_id, now)
    }

    /// Move a lead as [`Sim::move_lead`] does, but leave `updated_at` as it was and record no
    /// event: a change the feed and `filter[updated_at]` miss, which only a full reconcile finds.
    /// False if the lead or the stage does not exist.
    pub fn move_lead_silently(&self, lead_id: i64, pipeline_id: i64, status_id: i64) -> bool {
        let mut store = self.store_mut();
        let now = self.now_ts();
        store.move_silently(lead_id, pipeline_id, status_id, now)
    }

    /// Delete a lead as [`Sim::delete_lead`] does, but leave `updated_at` as it was and record no
    /// event. False if there is no such live lead.
    pub fn delete_lead_silently(&self, lead_id: i64) -> bool {
        let mut store = self.store_mut();
        let now = self.now_ts();
        store.delete(lead_id, now, true)
    }

    /// List the lead ALSO under another stage (same body, its real stage unchanged), as Kommo does
    /// while a lead is being moved. False if the lead or the stage does not exist.
    pub fn add_ghost(&self, lead_id: i64, pipeline_id: i64, status_id: i64) -> bool {
        self.store_mut().add_ghost(lead_id, pipeline_id, status_id)
    }

    /// Remove every ghost listing of a lead. False if the lead does not exist.
    pub fn clear_ghosts(&self, lead_id: i64) -> bool {
        self.store_mut().clear_ghosts(lead_id)
    }

    /// Unix seconds on the sim's clock: the dataset's "now" (2024-06-01T00:00:00Z) plus the time
    /// the sim has been running, on tokio's clock. Every `updated_at` and event `created_at` the
    /// sim writes, and its `Date` header, read this clock.
    pub fn now_ts(&self) -> i64 {
        data::NOW + self.0.started.elapsed().as_secs() as i64
    }

    /// Read access to the store (a poisoned lock still holds consistent data: writers do not panic
    /// half-way through an update).
    fn store(&self) -> std::sync::RwLockReadGuard<'_, Store> {
        self.0.store.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Write access to the store.
    fn store_mut(&self) -> std::sync::RwLockWriteGuard<'_, Store> {
        self.0.store.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The request log.
    fn log(&self) -> std::sync::MutexGuard<'_, RequestLog> {
        self.0.log.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("tokens", &self.0.tokens.len())
            .field("latency", &self.0.latency)
            .field("churn", &self.0.churn)
            .field("oauth", &self.0.oauth.is_on())
            .finish_non_exhaustive()
    }
}

// === impl SimHandle ===

impl SimHandle {
    /// The account being served.
    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the base to put before `/api/v4/...`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl std::ops::Deref for SimHandle {
    type Target = Sim;

    fn deref(&self) -> &Sim {
        &self.sim
    }
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
