//! The gateway's shared state and the per-request context every handler reads.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::StatusCode;
use tokio::time::Instant;

use std::sync::{Arc, OnceLock};

use crate::cache::{Cache, SharedCache};
use crate::error::ProxyError;

use crate::links::LinkRewrite;
use crate::metrics::Metrics;
use crate::redis::{RedisCache, RedisLimiter};
use crate::upstream::fetch::{Fetcher, Flow};

/// What the upstream limiter counts requests by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RateLimitKey {
    /// One budget for the whole account origin (Kommo also limits by IP): the safe default.
    Origin,
    /// One budget per credential, for accounts whose integrations each hold their own limit.
    Token,
}

/// Settings of the request path, validated before anything is bound.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// The base URL clients reach the proxy at (`--public-url`), without a trailing slash.
    /// When absent, links are built from the request's validated `Host`. Shared (not copied)
    /// into each request context.
    pub public_url: Option<Arc<str>>,
    /// At most this many distinct stages per leads request.
    pub max_pairs: usize,
    /// At most this many upstream requests per client request (`--max-upstream-per-request`):
    /// the account's budget is shared with every integration, and one deep page must not spend
    /// seconds of it. See `leads::plan::UpstreamBudget` for what counts.
    pub max_upstream_per_request: u32,
    /// What the upstream budget is shared by.
    pub rate_limit_key: RateLimitKey,
    /// The longest a client request may take (`--request-timeout`).
    pub request_timeout: Duration,
    /// Requests per second one client (credential, else address) may make (`--client-rate-limit`).
    pub client_rate_limit: Option<NonZeroU32>,
    /// Honour `X-Forwarded-Host` / `X-Forwarded-Proto` for links (`--trust-forwarded`).
    pub trust_forwarded: bool,
    /// Limits on what a client may send.
    pub bounds: Bounds,
}

/// Limits on client requests, each answered with its own status and a problem+json body.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Longest request target (path and query), else `414`.
    pub max_uri_len: usize,
    /// Most bytes of request headers, else `431`.
    pub max_header_bytes: usize,
    /// Largest pass-through request body, else `413`.
    pub max_body_bytes: u64,
    /// Most query parameters, else `400`.
    pub max_query_params: usize,
    /// Most client requests served at once, else `503` (load shedding).
    pub max_concurrent: usize,
    /// How long a client may take to send its request headers (slow clients are dropped).
    pub header_read_timeout: Duration,
    /// Most client connections open at once; the acceptor waits for one to close past it.
    pub max_connections: usize,
}

/// Who may use the account's credential: the holders of its keys.
pub struct Auth {
    /// The keys file, read again when it changes.
    pub keys: Arc<crate::keys::WatchedKeys>,
    /// The account's name: a key reaches only its own account.
    pub account: String,
    /// Also pass requests carrying a client's own Kommo token, as they came.
    pub allow_client_tokens: bool,
}

/// The path an account's requests start with (`/NAME`), stripped on arrival and put back in
/// front of every link of the answer.
#[derive(Debug, Clone)]
pub struct BasePath(pub Arc<str>);

/// The Redis backends replicas share, kept concrete for readiness and metrics.
pub struct Shared {
    pub limiter: Arc<RedisLimiter>,
    pub cache: Arc<RedisCache>,
}

impl Shared {
    /// Whether either backend is running on its local fallback.
    pub fn degraded(&self) -> bool {
        self.limiter.degraded() || self.cache.degraded()
    }
}

/// What every request handler shares.
pub struct Gateway {
    /// Every metric the proxy keeps; the fetcher and the cache hold handles on it.
    pub metrics: Arc<Metrics>,
    /// The only way out: limited, retried requests to the configured origin.
    pub fetcher: Fetcher,
    pub settings: GatewaySettings,
    /// Upstream pages and client answers; `None` when caching is off.
    pub cache: Option<Cache>,
    /// The Redis backends, when replicas share the budget and the cache.
    pub shared: Option<Shared>,
    /// Live views (`--sync`): replicas that answer multi-stage views from memory.
    pub live: Option<crate::sync::live::Live>,
    /// Clients' keys, when the proxy holds the account's credential; `None`: clients bring
    /// their own Kommo tokens.
    pub auth: Option<Auth>,
    /// Keys credential fingerprints: generated at start, so a fingerprint means nothing
    /// outside this process and cannot be reversed to the token.
    fingerprint_keys: FingerprintKey,
    /// Keys request ids: this process's own, never shared (replicas share the fingerprint key,
    /// and ids drawn from it would repeat across them).
    request_id_key: FingerprintKey,
    /// Hands out flow ids: each client request shares upstream permits fairly with the others.
    next_flow: AtomicU64,
    /// The inbound per-client quota. governor's GCRA fits here: a client's burst refilling
    /// smoothly is exactly what an inbound fairness quota wants (unlike the upstream limit).
    client_quota: Option<DefaultKeyedRateLimiter<String>>,
    /// Requests seen, to prune idle client quota state now and then.
    seen: AtomicU64,
    /// The upstream origin, shared into every request context.
    origin: Arc<str>,
    /// Client requests being served, bounded by `--max-concurrent-requests`.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The last upstream reachability probe and when it ran: readiness probes come often and
    /// must not each open a connection to Kommo.
    probe: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

/// How long a reachability probe result is reused.
const PROBE_TTL: Duration = Duration::from_secs(5);

/// What one client request carries into the fetches it causes.
#[derive(Clone)]
pub struct RequestContext {
    /// The client's headers as they are sent upstream with the proxy's own GETs: empty until
    /// [`RequestContext::with_upstream_headers`] (a cache hit and a request relayed as it came
    /// need none).
    pub upstream_headers: HeaderMap,
    /// The proxy's base URL as this client reaches it.
    base: Arc<str>,
    /// Moves upstream hrefs to the public base; built on first use (pass-through never needs it).
    rewrite: OnceLock<LinkRewrite>,
    /// The upstream origin, for the rewrite.
    origin: Arc<str>,
    /// This request's share of the upstream budget, and its deadline.
    pub flow: Flow,
    /// A keyed hash of the `Authorization` header, if there is one and something reads it: a
    /// request relayed as it came, with no per-credential budget or quota, has none.
    pub credential: Option<String>,
    /// The client sent `Cache-Control: no-cache` (or `Pragma: no-cache`): refetch and refresh.
    pub no_cache: bool,
    /// The client's headers that change Kommo's answer (see `VARYING_HEADERS`): cached
    /// answers and pages are kept apart by them.
    pub variant: String,
    /// The request's id (the client's, or a new one): every upstream request it causes carries
    /// it, and so does its answer.
    pub request_id: HeaderValue,
    /// Upstream fetches this request caused (cache misses), for its log line.
    upstream_calls: Arc<AtomicU32>,
}

impl RequestContext {
    /// The proxy's base URL as this client reaches it (see `Gateway::public_base`).
    pub fn public_base(&self) -> &str {
        &self.base
    }

    /// The rewrite of upstream hrefs to this client's base URL.
    pub fn rewrite(&self) -> &LinkRewrite {
        self.rewrite
            .get_or_init(|| LinkRewrite::new(&self.origin, self.public_base()))
    }

    /// Upstream fetches this request caused so far.
    pub fn upstream_calls(&self) -> u32 {
        self.upstream_calls.load(Ordering::Relaxed)
    }

    /// Counts one upstream fetch.
    pub fn count_upstream_call(&self) {
        self.upstream_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// This context (its flow and upstream call count shared) with the headers of `client`
    /// that the proxy's own upstream GETs carry, and the request id: taken only when an answer
    /// has to be fetched.
    pub fn with_upstream_headers(&self, client: &HeaderMap) -> RequestContext {
        let mut ctx = self.clone();
        ctx.upstream_headers = HeaderMap::with_capacity(UPSTREAM_GET_HEADERS.len() + 1);
        for name in UPSTREAM_GET_HEADERS {
            for v in client.get_all(&name) {
                ctx.upstream_headers.append(name.clone(), v.clone());
            }
        }
        ctx.upstream_headers
            .insert(crate::headers::REQUEST_ID, self.request_id.clone());
        ctx
    }
}

/// Headers of the client's request that reach the upstream with the GETs the proxy makes on
/// its behalf. A whitelist: encoding and range headers would change what the proxy has to
/// parse, and nothing else of the client's request concerns Kommo. `If-Modified-Since` is
/// Kommo's way to list "recently updated entities" (a filter on lists, which a merge of
/// filtered streams keeps exact); `X-Context-User-ID` reads with another user's rights.
const UPSTREAM_GET_HEADERS: [HeaderName; 6] = [
    header::AUTHORIZATION,
    header::ACCEPT_LANGUAGE,
    header::USER_AGENT,
    header::IF_MODIFIED_SINCE,
    X_CONTEXT_USER_ID,
    HeaderName::from_static("x-client-uuid"),
];

const X_CONTEXT_USER_ID: HeaderName = HeaderName::from_static("x-context-user-id");

/// The forwarded headers that change what Kommo answers, so they are part of cache keys: the
/// language of names, the rights read with, and the moment changes are listed from.
const VARYING_HEADERS: [HeaderName; 3] = [
    header::ACCEPT_LANGUAGE,
    header::IF_MODIFIED_SINCE,
    X_CONTEXT_USER_ID,
];

/// The values of [`VARYING_HEADERS`] in `headers`, as one cache key part (empty without any).
fn variant(headers: &HeaderMap) -> String {
    let mut out = String::new();
    for (i, name) in VARYING_HEADERS.iter().enumerate() {
        for v in headers.get_all(name) {
            out.push_str(&format!(
                "{i}={}\u{1f}",
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
    }
    out
}

impl Gateway {
    pub fn new(
        fetcher: Fetcher,
        settings: GatewaySettings,
        cache: Option<Cache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let origin = Arc::from(fetcher.upstream.origin().url.as_str());
        let in_flight = Arc::new(tokio::sync::Semaphore::new(settings.bounds.max_concurrent));
        if let Some(cache) = &cache {
            cache.attach_metrics(metrics.clone());
        }
        let client_quota = settings
            .client_rate_limit
            .map(|n| RateLimiter::keyed(Quota::per_second(n)));
        Gateway {
            metrics,
            fetcher,
            settings,
            cache,
            shared: None,
            live: None,
            auth: None,
            fingerprint_keys: FingerprintKey::random(),
            request_id_key: FingerprintKey::random(),
            next_flow: AtomicU64::new(1),
            client_quota,
            seen: AtomicU64::new(0),
            origin,
            in_flight,
            probe: tokio::sync::Mutex::new(None),
        }
    }

    /// The context of one client request. `buffered`: whether the request is answered with GETs
    /// the proxy makes itself (the leads list, cached pass-through), whose cache keys need the
    /// credential's fingerprint.
    pub fn context(
        &self,
        parts: &Parts,
        buffered: bool,
        request_id: HeaderValue,
    ) -> RequestContext {
        let base = self.public_base(parts);
        // The fingerprint costs two keyed hashes: only for what reads it (cache keys, the
        // per-credential budget, the per-client quota).
        let needs_credential = buffered
            || self.settings.rate_limit_key == RateLimitKey::Token
            || self.client_quota.is_some();
        let credential = if needs_credential {
            self.fingerprint(&parts.headers)
        } else {
            None
        };
        let key = match (self.settings.rate_limit_key, &credential) {
            (RateLimitKey::Token, Some(c)) => format!("{} {c}", self.origin).into(),
            _ => self.origin.clone(),
        };
        let no_cache = [header::CACHE_CONTROL, header::PRAGMA].iter().any(|name| {
            parts.headers.get_all(name).iter().any(|v| {
                v.to_str().is_ok_and(|v| {
                    v.split(',')
                        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
                })
            })
        });
        RequestContext {
            upstream_headers: HeaderMap::new(),
            base,
            rewrite: OnceLock::new(),
            origin: self.origin.clone(),
            flow: self.new_flow(key),
            credential,
            no_cache,
            variant: variant(&parts.headers),
            request_id,
            upstream_calls: Arc::default(),
        }
    }

    /// Whether the proxy can serve: the upstream answers TCP connections, no block cool-down is
    /// in force, and the budget is not booked past `--max-wait` (new requests would be refused
    /// at once: a load balancer should send them elsewhere). The report says why not, and what
    /// is degraded.
    pub async fn readiness(&self) -> (bool, serde_json::Value) {
        let origin = self.fetcher.upstream.origin();
        let snapshot = self.fetcher.limiter.snapshot(&origin.url);
        let now = Instant::now();
        let blocked = snapshot
            .blocked_until
            .map(|until| until.saturating_duration_since(now).as_secs_f64().ceil());
        let reachable = {
            let mut probe = self.probe.lock().await;
            match &*probe {
                Some((at, result)) if at.elapsed() < PROBE_TTL => result.clone(),
                _ => {
                    let result = probe_tcp(origin).await;
                    *probe = Some((Instant::now(), result.clone()));
                    result
                }
            }
        };
        // A proxy waiting for the previous process of its account sends nothing yet: not ready,
        // and the report says why.
        // With Redis, this replica's bookings only (see `upstream::admission`).
        let outlook = self.fetcher.admission_outlook(&origin.url);
        let booked_up = outlook.wait > self.fetcher.policy.max_wait;
        // Kommo refused the account's credential: nothing works until a person acts.
        let refused = self.fetcher.credentials.as_ref().and_then(|c| c.refused());
        let ready = reachable.is_ok()
            && blocked.is_none()
            && !snapshot.waiting_for_predecessor
            && !booked_up
            && refused.is_none();
        let credentials = self.fetcher.credentials.as_ref().map(|_| match &refused {
            Some(reason) => format!("refused: {reason}"),
            None => "ok".into(),
        });
        let keys = self
            .auth
            .as_ref()
            .map(|a| a.keys.problem().unwrap_or("ok".into()));
        let redis = self.shared.as_ref().map(|s| {
            if s.degraded() {
                "degraded: Redis unreachable, running on the local fallback (limit / replicas, local cache)"
            } else {
                "ok"
            }
        });
        let report = serde_json::json!({
            "ready": ready,
            "redis": redis,
            "upstream": match &reachable { Ok(()) => "reachable".to_string(), Err(e) => e.clone() },
            "credentials": credentials,
            "keys": keys,
            "block_cooldown_remaining_s": blocked,
            "paused_for_429": snapshot.paused_until.is_some(),
            "limiter": {
                "queued": snapshot.queued,
                "slots_taken": snapshot.in_window,
                "waiting_for_previous_process": snapshot.waiting_for_predecessor,
                "backlog": outlook.backlog,
                "estimated_wait_s": outlook.wait.as_secs_f64(),
                "booked_past_max_wait": booked_up,
            },
        });
        (ready, report)
    }

    /// Refreshes the gauges read at scrape time and renders the metrics.
    pub async fn scrape(&self) -> String {
        let metrics = &self.metrics;
        let free = self.in_flight.available_permits();
        let in_flight = self.settings.bounds.max_concurrent.saturating_sub(free);
        metrics
            .in_flight
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        let snapshot = self
            .fetcher
            .limiter
            .snapshot(&self.fetcher.upstream.origin().url);
        metrics.limiter_queued.set(snapshot.queued as i64);
        let longest = self.fetcher.longest_wait.max().as_secs_f64();
        metrics.limiter_wait_max.set(longest);
        metrics.limiter_in_window.set(snapshot.in_window as i64);
        let outlook = self
            .fetcher
            .admission_outlook(&self.fetcher.upstream.origin().url);
        metrics
            .admission_backlog
            .set(i64::try_from(outlook.backlog).unwrap_or(i64::MAX));
        metrics
            .admission_estimated_wait
            .set(outlook.wait.as_secs_f64());
        if let Some(cache) = &self.cache {
            metrics.cache_bytes.set(cache.weighted_bytes().await);
        }
        if let Some(shared) = &self.shared {
            metrics.redis_degraded.set(i64::from(shared.degraded()));
        }
        if let Some(live) = &self.live {
            live.observe();
        }
        metrics.encode()
    }

    /// A new request id: 128 random bits in hex, from keyed hashes of a counter.
    pub fn new_request_id(&self) -> HeaderValue {
        let n = self.next_flow.fetch_add(1, Ordering::Relaxed);
        let mut input = [0u8; 16];
        input[..8].copy_from_slice(&n.to_le_bytes());
        input[8..].copy_from_slice(b"request!");
        let hex = self.request_id_key.hash_hex(&input);
        // Hex digits are always a valid header value.
        HeaderValue::from_str(&hex).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }

    /// A new share of the upstream budget with a fresh deadline.
    fn new_flow(&self, key: Arc<str>) -> Flow {
        Flow {
            id: self.next_flow.fetch_add(1, Ordering::Relaxed),
            key,
            deadline: Instant::now() + self.settings.request_timeout,
        }
    }

    /// The context of a background refresh on behalf of `ctx`: its own flow and deadline.
    pub fn refresh_context(&self, ctx: &RequestContext) -> RequestContext {
        RequestContext {
            flow: self.new_flow(ctx.flow.key.clone()),
            no_cache: false,
            ..ctx.clone()
        }
    }

    /// A 128-bit keyed hash of the `Authorization` header: stable for the key (this process's,
    /// or the one replicas share through Redis), meaningless without it.
    pub fn fingerprint(&self, headers: &HeaderMap) -> Option<String> {
        let auth = headers.get(header::AUTHORIZATION)?;
        Some(self.fingerprint_keys.hash_hex(auth.as_bytes()))
    }

    /// Requires keys of clients, and authorizes their requests with the account's credential.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Checks the client's key and puts the account's credential (as [`PLACEHOLDER`]) in its
    /// place; returns the key's name. Without keys configured, the request goes as it came,
    /// unless it carries a key of this proxy: that is refused, so a key never reaches Kommo.
    ///
    /// [`PLACEHOLDER`]: crate::credentials::PLACEHOLDER
    pub fn authorize(&self, parts: &mut Parts) -> Result<Option<String>, ProxyError> {
        let presented = crate::headers::bearer(&parts.headers);
        let Some(auth) = &self.auth else {
            if presented.is_some_and(crate::keys::looks_like_key) {
                return Err(ProxyError::Rejected(
                    StatusCode::FORBIDDEN,
                    "this account takes its clients' own Kommo tokens, not keys of this proxy: send a Kommo token, or use the key at the account it was made for".into(),
                ));
            }
            return Ok(None);
        };
        let keys = auth.keys.current();
        if let Some(entry) = presented.and_then(|p| keys.find(p)) {
            if entry.account != auth.account {
                return Err(ProxyError::Rejected(
                    StatusCode::FORBIDDEN,
                    format!("the key {:?} belongs to another account", entry.name),
                ));
            }
            let (method, path) = (&parts.method, parts.uri.path());
            if !entry.scope.allows(method, path) {
                return Err(ProxyError::Rejected(
                    StatusCode::FORBIDDEN,
                    format!(
                        "the key {:?} has the scope {}; {method} {path} needs the scope {}",
                        entry.name,
                        entry.scope,
                        crate::keys::Scope::needed(method, path)
                    ),
                ));
            }
            parts
                .headers
                .insert(header::AUTHORIZATION, crate::credentials::PLACEHOLDER);
            auth.keys.touch(&entry.name);
            return Ok(Some(entry.name.clone()));
        }
        // A client's own token, never a key-like string nor the proxy's own placeholder.
        let placeholder = crate::credentials::PLACEHOLDER;
        let own = presented.filter(|p| {
            !crate::keys::looks_like_key(p)
                && placeholder.to_str().ok().and_then(|ph| ph.get(7..)) != Some(*p)
        });
        if auth.allow_client_tokens && own.is_some() {
            return Ok(None);
        }
        Err(ProxyError::Rejected(
            StatusCode::UNAUTHORIZED,
            "a missing or unknown key: send `Authorization: Bearer <key>` with a key made by \
             `kommo-fanout keys add`"
                .into(),
        ))
    }

    /// Turns live views on.
    pub fn with_live(mut self, live: crate::sync::live::Live) -> Self {
        self.live = Some(live);
        self
    }

    /// Adds the shared Redis backends (the limiter must already be the fetcher's).
    pub fn with_shared(mut self, shared: Shared) -> Self {
        self.shared = Some(shared);
        self
    }

    /// Drops every cached entry, here and, through Redis, in every replica.
    pub async fn invalidate_all(&self) {
        if let Some(cache) = &self.cache {
            cache.invalidate_all();
        }
        if let Some(shared) = &self.shared {
            shared.cache.invalidate_all().await;
        }
    }

    /// Replaces the fingerprint key, before the gateway serves: replicas sharing a cache must
    /// fingerprint a credential alike.
    pub fn with_fingerprint_key(mut self, key: FingerprintKey) -> Self {
        self.fingerprint_keys = key;
        self
    }

    /// Charges one request to the client's inbound quota (`--client-rate-limit`).
    pub fn check_client_quota(&self, ctx: &RequestContext, peer: IpAddr) -> Result<(), ProxyError> {
        let Some(quota) = &self.client_quota else {
            return Ok(());
        };
        if self.seen.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            quota.retain_recent();
        }
        let client = ctx.credential.clone().unwrap_or_else(|| peer.to_string());
        quota.check_key(&client).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ProxyError::TooManyRequests {
                detail: format!(
                    "this client sent more than {} requests per second (--client-rate-limit); slow down",
                    self.settings.client_rate_limit.map_or(0, NonZeroU32::get)
                ),
                retry_after: wait,
            }
        })
    }

    /// The base URL links in answers use: `--public-url`; else, with `--trust-forwarded`, the
    /// `X-Forwarded-Host`/`-Proto`; else `http://` and the request's `Host` (or HTTP/2
    /// `:authority`). The host is used only when it is a plain host name or address with an
    /// optional port (the server refuses other values with `400`), and it is part of the key of
    /// every cached answer, so one client's `Host` never appears in another's answer. An
    /// account reached by its path prefix has the prefix ([`BasePath`]) appended.
    fn public_base(&self, parts: &Parts) -> Arc<str> {
        let base = self.origin_base(parts);
        match parts.extensions.get::<BasePath>() {
            // Links that fall back to the upstream's origin stay there, unprefixed.
            Some(path) if base != self.origin => format!("{base}{}", path.0).into(),
            _ => base,
        }
    }

    /// [`Gateway::public_base`] without an account's path.
    fn origin_base(&self, parts: &Parts) -> Arc<str> {
        if let Some(url) = &self.settings.public_url {
            return url.clone();
        }
        let text = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        let forwarded = (self.settings.trust_forwarded)
            .then(|| (text("x-forwarded-host"), text("x-forwarded-proto")));
        let authority = parts.uri.authority().map(http::uri::Authority::as_str);
        base_url(forwarded, text("host"), authority, &self.origin)
    }
}

/// The first usable of the names a request gives the proxy (see [`Gateway::public_base`]);
/// `fallback` (the upstream origin) when none is.
fn base_url(
    forwarded: Option<(Option<&str>, Option<&str>)>,
    host: Option<&str>,
    authority: Option<&str>,
    fallback: &Arc<str>,
) -> Arc<str> {
    let (forwarded_host, proto) = forwarded.unwrap_or_default();
    match crate::headers::request_host(forwarded_host, host, authority) {
        Some((host, true)) => {
            let https = proto.is_some_and(|p| p.eq_ignore_ascii_case("https"));
            format!("{}://{host}", if https { "https" } else { "http" }).into()
        }
        Some((host, false)) => format!("http://{host}").into(),
        None => fallback.clone(),
    }
}

/// The secret of credential fingerprints: 256 bits, two SipHash-2-4 keys (SipHash is a keyed
/// PRF made for short inputs; two independent keys give a 128-bit fingerprint).
#[derive(Clone)]
pub struct FingerprintKey([u64; 4]);

impl FingerprintKey {
    /// A key drawn from the process's random source.
    pub fn random() -> Self {
        let draw = || RandomState::new().build_hasher().finish();
        FingerprintKey([draw(), draw(), draw(), draw()])
    }

    /// A key from 32 bytes (e.g. shared by replicas).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        FingerprintKey([word(0), word(1), word(2), word(3)])
    }

    /// The 128-bit keyed hash of `input`, in 32 lowercase hex digits.
    pub fn hash_hex(&self, input: &[u8]) -> String {
        // std's SipHasher is deprecated only in favour of the hash-map hasher; as a keyed PRF
        // with explicit keys it is exactly what is needed here.
        #[allow(deprecated)]
        let hash = |k0: u64, k1: u64| {
            let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
            h.write(input);
            h.finish()
        };
        let [a, b, c, d] = self.0;
        format!("{:016x}{:016x}", hash(a, b), hash(c, d))
    }
}

#[cfg(test)]
mod fingerprint_tests {
    use super::FingerprintKey;

    #[test]
    fn hash_hex_is_32_lowercase_hex_digits_of_both_keyed_hashes() {
        let key = FingerprintKey::from_bytes([7; 32]);
        #[allow(deprecated)]
        let hash = |k: u64| {
            use std::hash::Hasher;
            let mut h = std::hash::SipHasher::new_with_keys(k, k);
            h.write(b"Bearer token");
            h.finish()
        };
        let word = u64::from_le_bytes([7; 8]);
        let expected = format!("{:016x}{:016x}", hash(word), hash(word));
        assert_eq!(key.hash_hex(b"Bearer token"), expected);
        assert_ne!(key.hash_hex(b"Bearer token"), key.hash_hex(b"Bearer other"));
    }
}

/// Opens (and drops) a TCP connection to the upstream origin.
async fn probe_tcp(origin: &crate::upstream::Origin) -> Result<(), String> {
    let port =
        origin
            .authority
            .port_u16()
            .unwrap_or(if origin.scheme == http::uri::Scheme::HTTPS {
                443
            } else {
                80
            });
    let host = origin
        .authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    match tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("unreachable: {e}")),
        Err(_) => Err("unreachable: no connection within 2s".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::{base_url, FingerprintKey, Gateway};
    use http::HeaderValue;

    #[tokio::test]
    async fn request_ids_differ_across_replicas_that_share_a_fingerprint_key() {
        let config = crate::config::ServeConfig::for_upstream("http://127.0.0.1:9").unwrap();
        let replica = || {
            let upstream = crate::upstream::Upstream::new(config.upstream.clone()).unwrap();
            let limiter =
                std::sync::Arc::new(crate::upstream::limiter::LocalLimiter::new(config.limiter));
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
            let fetcher = crate::upstream::fetch::Fetcher::new(
                upstream,
                limiter,
                config.fetch.clone(),
                metrics.clone(),
            );
            Gateway::new(fetcher, config.gateway.clone(), None, metrics)
                .with_fingerprint_key(FingerprintKey::from_bytes([7; 32]))
        };
        let (a, b) = (replica(), replica());
        let ids: std::collections::HashSet<_> = (0..100)
            .flat_map(|_| [a.new_request_id(), b.new_request_id()])
            .collect();
        assert_eq!(ids.len(), 200);
        // The shared key still fingerprints a credential alike in both.
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t"),
        );
        assert_eq!(a.fingerprint(&headers), b.fingerprint(&headers));
    }

    #[test]
    fn public_base_takes_the_first_usable_name() {
        let fallback: std::sync::Arc<str> = "https://sub.kommo.com".into();
        let names = |forwarded, host, authority| base_url(forwarded, host, authority, &fallback);
        let cases = [
            (
                names(None, Some("proxy:8080"), Some("other")),
                "http://proxy:8080",
            ),
            (names(None, None, Some("h2.internal")), "http://h2.internal"),
            // A Host that is no host name is not replaced by another name: links go upstream.
            (
                names(None, Some("a b"), Some("h2.internal")),
                "https://sub.kommo.com",
            ),
            (names(None, None, None), "https://sub.kommo.com"),
            (
                names(
                    Some((Some("crm.example.com"), Some("HTTPS"))),
                    Some("proxy"),
                    None,
                ),
                "https://crm.example.com",
            ),
            (
                names(Some((Some("crm.example.com"), None)), Some("proxy"), None),
                "http://crm.example.com",
            ),
            (
                names(
                    Some((Some("evil.com/x"), Some("https"))),
                    Some("proxy"),
                    None,
                ),
                "http://proxy",
            ),
            (
                names(Some((None, Some("https"))), Some("proxy"), None),
                "http://proxy",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(&*got, want);
        }
    }
}
