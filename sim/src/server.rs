//! The sim's HTTP side: accept loop with graceful shutdown (and the churn task beside it), the hyper
//! service, and the per-request pipeline
//! `record → rate limit → faults → latency → auth → route → handler → Date`.
//! `POST /oauth2/access_token` (when OAuth is on) is routed before auth: it is how a client gets
//! its bearer token.

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::PoisonError;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, DATE, HOST, IF_MODIFIED_SINCE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::churn;
use super::data::CardKind;
use super::data::{LeadPatch, Store, USERS};
use super::events;
use super::faults::LimitDecision;
use super::oauth::{self, TokenParams};
use super::query::{self, LeadsQuery, MAX_LIMIT};
use super::render::{self, LeadCtx};
use super::{Fault, JsonStyle, RecordedRequest, Sim, TokenSpec};

/// The response body type: whole bodies, or a stream that fails half-way (truncation fault).
pub(crate) type Body = BoxBody<Bytes, io::Error>;

/// How long open connections may take to finish after shutdown before they are cut.
const DRAIN: Duration = Duration::from_secs(5);
/// Largest request body accepted (writes are small).
const MAX_BODY: usize = 8 << 20;

/// The header a client tags its request with (the proxy sends its own request id upstream);
/// recorded so a test can tell which client request caused an upstream one.
const REQUEST_ID: &str = "x-request-id";

const HAL_JSON: &str = "application/hal+json";
/// The token endpoint's type: JSON, without a charset (`kommo-api-notes.md`: some clients compare
/// the whole value).
const JSON: &str = "application/json";
const PROBLEM_JSON: &str = "application/problem+json";
const TEXT_HTML: &str = "text/html; charset=utf-8";

/// A complete answer before it becomes a hyper response (kept whole so a fault can cut it).
#[derive(Debug)]
struct Reply {
    /// Status code (an invalid one goes out as 500).
    status: u16,
    /// `Content-Type`, if there is a body.
    content_type: Option<String>,
    /// Further headers.
    headers: Vec<(&'static str, String)>,
    /// The body.
    body: Bytes,
}

/// What the edge of the pipeline decided before the handler runs.
enum Gate {
    /// Go on to auth and routing.
    Pass,
    /// Answer this instead (rate limit, block, fault).
    Reply(Reply),
    /// Close the connection without answering.
    Reset,
    /// Run the handler, then cut the body half-way.
    Truncate,
}

/// Where a recorded request sits in the log: `(generation, index)`.
type LogSlot = (u64, usize);

// === impl Reply ===

impl Reply {
    fn new(status: u16, content_type: &str, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            content_type: Some(content_type.to_string()),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    fn hal(body: Vec<u8>) -> Self {
        Self::new(200, HAL_JSON, body)
    }

    fn problem(status: u16, body: Vec<u8>) -> Self {
        Self::new(status, PROBLEM_JSON, body)
    }

    fn simple_problem(style: JsonStyle, status: u16, title: &str, detail: &str) -> Self {
        Self::problem(status, render::problem(style, status, title, detail))
    }

    fn no_content() -> Self {
        Self {
            status: 204,
            content_type: None,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    fn html_forbidden() -> Self {
        Self::new(403, TEXT_HTML, render::FORBIDDEN_HTML)
    }

    fn unauthorized(style: JsonStyle) -> Self {
        Self::simple_problem(style, 401, "Unauthorized", "Invalid user name or password")
    }

    fn not_found(style: JsonStyle) -> Self {
        Self::simple_problem(style, 404, "Not Found", "Not Found")
    }

    fn method_not_allowed(style: JsonStyle, allow: &'static str) -> Self {
        let mut reply =
            Self::simple_problem(style, 405, "Method Not Allowed", "Method Not Allowed");
        reply.headers.push(("allow", allow.to_string()));
        reply
    }

    fn into_response(self) -> Response<Body> {
        let head = self.head();
        head.body(full(self.body)).unwrap_or_else(|_| fallback())
    }

    /// Status and headers of the response.
    fn head(&self) -> http::response::Builder {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut builder = Response::builder().status(status);
        if let Some(content_type) = &self.content_type {
            builder = builder.header(CONTENT_TYPE, content_type.as_str());
        }
        for (name, value) in &self.headers {
            builder = builder.header(*name, value.as_str());
        }
        builder
    }

    /// `200` hal+json declaring the full `Content-Length`, then failing after half the body: the
    /// client sees a message cut short.
    fn into_truncated(self, style: JsonStyle) -> Response<Body> {
        let whole = if self.status == 200 && self.body.len() >= 2 {
            self.body
        } else {
            Bytes::from(render::empty_leads_page(style))
        };
        let half = whole.slice(..whole.len() / 2);
        let frames: Vec<Result<Frame<Bytes>, io::Error>> = vec![
            Ok(Frame::data(half)),
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "sim: injected truncated body",
            )),
        ];
        let body = BodyExt::boxed(StreamBody::new(futures::stream::iter(frames)));
        Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, HAL_JSON)
            .header(CONTENT_LENGTH, whole.len())
            .body(body)
            .unwrap_or_else(|_| fallback())
    }
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A bare 500, for the (unreachable in practice) case of a response that cannot be built.
fn fallback() -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
}

// === accept loop ===

/// [`Sim::run`]: accept until `shutdown`, then drain connections for up to [`DRAIN`].
pub(crate) async fn run(
    sim: Sim,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    if let Some(config) = sim.0.oauth.config() {
        // A code to try the exchange by hand; the secret stays out of the log.
        let code = sim.oauth_code();
        tracing::info!(
            client_id = %config.client_id,
            redirect_uri = %config.redirect_uri,
            token_ttl = %humantime::format_duration(Duration::from_secs(config.expires_in())),
            %code,
            "sim: OAuth on; trade this authorization code at POST {} (single use, valid 20 minutes)",
            oauth::TOKEN_PATH,
        );
    }
    // The churn runs while the server accepts; the guard aborts it on shutdown, or if this future
    // is dropped.
    let rate = sim.0.churn;
    let churn = (rate.is_finite() && rate > 0.0)
        .then(|| AbortOnDrop(tokio::spawn(churn::run(sim.clone(), rate)).abort_handle()));
    // A watch channel: one signal every connection task can observe, however late it subscribed.
    let (stop_tx, stop_rx) = watch::channel(());
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    sim.connection_accepted();
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(sim.clone(), stream, local, stop_rx.clone()));
                }
                Err(error) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(%error, "sim: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    drop(churn);
    let _ = stop_tx.send(());
    let drained = tokio::time::timeout(DRAIN, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
    Ok(())
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_connection(
    sim: Sim,
    stream: TcpStream,
    local: SocketAddr,
    mut stop: watch::Receiver<()>,
) {
    let service = service_fn(move |req: Request<Incoming>| {
        let sim = sim.clone();
        async move { sim.handle(req, local).await }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "sim: connection ended with an error");
            }
        }
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

// === request pipeline ===

impl Sim {
    /// Answer one request. An `Err` makes hyper drop the connection unanswered (reset fault).
    async fn handle(
        &self,
        req: Request<Incoming>,
        local: SocketAddr,
    ) -> Result<Response<Body>, io::Error> {
        let arrived = Instant::now();
        let path = req.uri().path().to_string();
        let raw_query = req.uri().query().unwrap_or("").to_string();
        let token = bearer(&req);
        let slot = self.record(RecordedRequest {
            at: arrived,
            method: req.method().to_string(),
            path: path.clone(),
            query: raw_query.clone(),
            token: token.clone(),
            request_id: req
                .headers()
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            headers: req.headers().clone(),
            status: 0,
        });
        // Limits and faults are decided on arrival, in arrival order; the answer waits for latency.
        let gate = self.gate(arrived, &path, &raw_query, slot);
        let style = self.0.json_style;
        let delay = self.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let base = base_url(&req, local);
        let mut response = match gate {
            Gate::Pass => self
                .route(req, &base, &path, &raw_query, token.as_deref())
                .await
                .into_response(),
            Gate::Reply(reply) => reply.into_response(),
            Gate::Truncate => self
                .route(req, &base, &path, &raw_query, token.as_deref())
                .await
                .into_truncated(style),
            Gate::Reset => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "sim: injected connection reset",
                ))
            }
        };
        // A server's `Date` is its own clock (RFC 9110 §6.6.1), the one behind the timestamps it
        // writes: the sim's clock, not the wall clock hyper would otherwise put there.
        if let Ok(date) = HeaderValue::from_str(&query::format_http_date(self.now_ts())) {
            response.headers_mut().insert(DATE, date);
        }
        self.finish(slot, response.status().as_u16());
        Ok(response)
    }

    fn record(&self, request: RecordedRequest) -> LogSlot {
        let mut log = self.log();
        log.entries.push(request);
        (log.generation, log.entries.len() - 1)
    }

    fn finish(&self, (generation, index): LogSlot, status: u16) {
        let mut log = self.log();
        if log.generation == generation {
            if let Some(entry) = log.entries.get_mut(index) {
                entry.status = status;
            }
        }
    }

    /// Rate limit first (Kommo's edge counts every arrival), then the fault rules.
    fn gate(&self, now: Instant, path: &str, raw_query: &str, slot: LogSlot) -> Gate {
        let style = self.0.json_style;
        if let Some(limiter) = &self.0.limiter {
            let decision = limiter
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .check(now);
            match decision {
                LimitDecision::Allow => {}
                LimitDecision::TooMany { retry_after } => {
                    return Gate::Reply(Reply::problem(
                        429,
                        render::too_many_requests(style, Some(retry_after)),
                    ))
                }
                LimitDecision::Blocked => return Gate::Reply(Reply::html_forbidden()),
            }
        }
        let fault = self
            .0
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pick(path, raw_query);
        match fault {
            None => Gate::Pass,
            Some(Fault::Status500) => {
                let trace = slot.0.wrapping_mul(0x9E37_79B9) ^ slot.1 as u64;
                Gate::Reply(Reply::problem(500, render::internal_error(style, trace)))
            }
            Some(Fault::TooManyRequests {
                retry_after,
                header,
            }) => {
                let mut reply = Reply::problem(429, render::too_many_requests(style, retry_after));
                if let (true, Some(seconds)) = (header, retry_after) {
                    reply.headers.push(("retry-after", seconds.to_string()));
                }
                Gate::Reply(reply)
            }
            Some(Fault::HtmlForbidden) => Gate::Reply(Reply::html_forbidden()),
            Some(Fault::ConnectionReset) => Gate::Reset,
            Some(Fault::TruncatedBody) => Gate::Truncate,
            Some(Fault::Status {
                status,
                body,
                content_type,
            }) => Gate::Reply(Reply::new(status, &content_type, body)),
            // Body faults are picked by the leads list handler, never on arrival.
            Some(Fault::MisplaceLead | Fault::DropLead) => Gate::Pass,
        }
    }

    /// `latency ± jitter`, uniformly, clamped at zero.
    fn delay(&self) -> Duration {
        let (latency, jitter) = (self.0.latency, self.0.jitter);
        if jitter.is_zero() {
            return latency;
        }
        let span = u64::try_from(jitter.as_nanos().saturating_mul(2)).unwrap_or(u64::MAX - 1);
        let draw = self
            .0
            .jitter_rng
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .below(span + 1);
        let nanos = latency.as_nanos() as i128 - jitter.as_nanos() as i128 + i128::from(draw);
        Duration::from_nanos(u64::try_from(nanos.max(0)).unwrap_or(u64::MAX))
    }

    /// Auth, then dispatch on path and method.
    async fn route(
        &self,
        req: Request<Incoming>,
        base: &str,
        path: &str,
        raw_query: &str,
        token: Option<&str>,
    ) -> Reply {
        let style = self.0.json_style;
        let trimmed = path.trim_end_matches('/');
        let method = req.method().clone();
        if trimmed == oauth::TOKEN_PATH && self.0.oauth.is_on() {
            return match method {
                Method::POST => self.access_token(req).await,
                _ => {
                    self.0.oauth.count_refused();
                    Reply::method_not_allowed(style, "POST")
                }
            };
        }
        let Some(auth) = self.authenticate(token) else {
            return Reply::unauthorized(style);
        };
        let spec: &TokenSpec = &auth;
        let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
        match segments.as_slice() {
            ["api", "v4", "leads"] => match method {
                Method::GET => {
                    let since = req
                        .headers()
                        .get(IF_MODIFIED_SINCE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(query::parse_http_date);
                    self.list_leads(path, raw_query, since, base, spec)
                }
                Method::POST => self.create_leads(req, base, spec).await,
                Method::PATCH => self.patch_leads(req, base, spec).await,
                _ => Reply::method_not_allowed(style, "GET, POST, PATCH"),
            },
            ["api", "v4", "leads", "pipelines"] => match method {
                Method::GET => Reply::hal(render::pipelines(style, &self.store().pipelines, base)),
                _ => Reply::method_not_allowed(style, "GET"),
            },
            ["api", "v4", "leads", "pipelines", id] => {
                let store = self.store();
                let Some(pipeline) = id.parse().ok().and_then(|id| store.pipeline(id)) else {
                    return Reply::not_found(style);
                };
                match method {
                    Method::GET => Reply::hal(render::pipeline(style, pipeline, base)),
                    _ => Reply::method_not_allowed(style, "GET"),
                }
            }
            ["api", "v4", "leads", id] => {
                let Ok(id) = id.parse::<i64>() else {
                    return Reply::not_found(style);
                };
                match method {
                    Method::GET => self.get_lead(id, raw_query, base, spec),
                    Method::PATCH => self.patch_lead(id, req, base, spec).await,
                    _ => Reply::method_not_allowed(style, "GET, PATCH"),
                }
            }
            ["api", "v4", list @ ("contacts" | "companies")] => match method {
                Method::GET => self.list_cards(card_kind(list), raw_query, base, spec),
                _ => Reply::method_not_allowed(style, "GET"),
            },
            ["api", "v4", list @ ("contacts" | "companies"), id] => {
                match (method, id.parse::<i64>()) {
                    (Method::GET, Ok(id)) => {
                        self.get_card(card_kind(list), id, raw_query, base, spec)
                    }
                    (Method::GET, Err(_)) => Reply::not_found(style),
                    _ => Reply::method_not_allowed(style, "GET"),
                }
            }
            ["api", "v4", "events"] => match method {
                Method::GET => self.list_events(raw_query, base, spec),
                _ => Reply::method_not_allowed(style, "GET"),
            },
            ["api", "v4", "events", id] => match method {
                Method::GET => self.get_event(id, base, spec),
                _ => Reply::method_not_allowed(style, "GET"),
            },
            ["api", "v4", "account"] => match method {
                Method::GET => Reply::hal(render::account(style, base, acting_user(spec))),
                _ => Reply::method_not_allowed(style, "GET"),
            },
            _ => Reply::not_found(style),
        }
    }

    /// What a bearer token may read: a configured [`TokenSpec`], or an unexpired access token the
    /// OAuth server minted. Anything else, an expired token included, gets the `401` Kommo answers
    /// (`{"title":"Unauthorized",...,"detail":"Неверный логин или пароль"}` for a token gone
    /// stale: UsefulWeb/AmoCRM#39, amocrm-api-php#333).
    fn authenticate(&self, token: Option<&str>) -> Option<Cow<'_, TokenSpec>> {
        let token = token?;
        if let Some(spec) = self.0.tokens.iter().find(|s| s.token == token) {
            return Some(Cow::Borrowed(spec));
        }
        self.0.oauth.access(token, Instant::now()).map(Cow::Owned)
    }

    // === handlers ===

    /// `POST /oauth2/access_token`: a JSON object or a form body (by `Content-Type`; by the first
    /// byte when it names neither), answered with tokens or with Kommo's OAuth problem.
    async fn access_token(&self, req: Request<Incoming>) -> Reply {
        let style = self.0.json_style;
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes());
        let params = match body {
            Ok(bytes) => {
                let json = if content_type.contains("json") {
                    true
                } else if content_type.contains("x-www-form-urlencoded") {
                    false
                } else {
                    bytes.trim_ascii_start().starts_with(b"{")
                };
                if json {
                    serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|v| TokenParams::from_json(&v))
                } else {
                    Some(TokenParams::from_form(&bytes))
                }
            }
            Err(_) => None,
        };
        let Some(params) = params else {
            self.0.oauth.count_refused();
            let error = oauth::OAuthError::InvalidRequest {
                status: 400,
                hint: "Send a JSON object or an application/x-www-form-urlencoded body".to_string(),
            };
            return Reply::problem(error.status(), render::oauth_problem(style, &error));
        };
        let now = Instant::now();
        match self.0.oauth.grant(&params, now, self.now_ts()) {
            Ok(issued) => {
                let mut reply = Reply::new(200, JSON, render::oauth_tokens(style, &issued));
                // RFC 6749 §5.1: token answers must not be cached.
                reply
                    .headers
                    .push(("cache-control", "no-store".to_string()));
                reply.headers.push(("pragma", "no-cache".to_string()));
                reply
            }
            Err(error) => Reply::problem(error.status(), render::oauth_problem(style, &error)),
        }
    }

    /// `GET /api/v4/leads`; `since` is a parsed `If-Modified-Since` (Kommo recommends the header
    /// for "recently updated entities": amocrm/amocrm-api-php#162): only leads updated at or after
    /// it are listed.
    fn list_leads(
        &self,
        path: &str,
        raw_query: &str,
        since: Option<i64>,
        base: &str,
        token: &TokenSpec,
    ) -> Reply {
        let style = self.0.json_style;
        let mut q = match query::parse(raw_query) {
            Ok(q) => q,
            Err(error) => return Reply::problem(400, render::query_problem(style, &error)),
        };
        q.modified_since = since;
        let store = self.store();
        let hits = q.select(&store, token);
        let start = (q.page as usize - 1).saturating_mul(q.limit as usize);
        if start >= hits.len() {
            return Reply::no_content();
        }
        let end = start.saturating_add(q.limit as usize).min(hits.len());
        let mut page = hits[start..end].to_vec();
        self.mutate_page(&store, &q, token, path, raw_query, &mut page);
        Reply::hal(render::leads_page(
            style,
            &store.leads,
            &page,
            &q,
            base,
            raw_query,
        ))
    }

    /// Apply the first body fault that fires on this `200` page, if any.
    fn mutate_page(
        &self,
        store: &Store,
        q: &LeadsQuery,
        token: &TokenSpec,
        path: &str,
        raw_query: &str,
        page: &mut Vec<u32>,
    ) {
        // The stand-in for a misplaced lead, found only if a misplace rule matches this request.
        let mut stranger: Option<u32> = None;
        let fired = self
            .0
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pick_body(path, raw_query, |fault| match fault {
                Fault::DropLead => !page.is_empty(),
                Fault::MisplaceLead => {
                    stranger = q
                        .filter
                        .stage
                        .and_then(|stage| lead_of_another_stage(store, stage, q, token));
                    stranger.is_some() && !page.is_empty()
                }
                _ => false,
            });
        match (fired, stranger) {
            (Some(Fault::DropLead), _) => {
                page.remove(0);
            }
            (Some(Fault::MisplaceLead), Some(stranger)) => {
                if let Some(last) = page.last_mut() {
                    *last = stranger;
                }
            }
            _ => {}
        }
    }

    /// `GET /api/v4/events`: a HAL page of the events the token may see, newest first; `204` when
    /// nothing matches or past the end ("Валидный http-код ответа 200 и 204, если событий по
    /// фильтру не найдено": amoCRM's reference of the events list).
    fn list_events(&self, raw_query: &str, base: &str, token: &TokenSpec) -> Reply {
        let style = self.0.json_style;
        let q = match events::parse(raw_query) {
            Ok(q) => q,
            Err(error) => return Reply::problem(400, render::query_problem(style, &error)),
        };
        let store = self.store();
        let page = q.page_of(&store, token);
        if page.is_empty() {
            return Reply::no_content();
        }
        Reply::hal(render::events_page(style, &page, q.page, base, raw_query))
    }

    /// `GET /api/v4/events/{id}`: one event, `204` when the token may not see it or it is gone.
    fn get_event(&self, id: &str, base: &str, token: &TokenSpec) -> Reply {
        let store = self.store();
        let visible = store.events.find(id).filter(|e| {
            store
                .lead(e.entity_id)
                .is_some_and(|lead| token.sees(lead.responsible_user_id))
        });
        match visible {
            Some(event) => Reply::hal(render::event(self.0.json_style, event, base)),
            None => Reply::no_content(),
        }
    }

    /// `GET /api/v4/contacts` or `GET /api/v4/companies`: what the token sees, by id.
    fn list_cards(&self, kind: CardKind, raw_query: &str, base: &str, token: &TokenSpec) -> Reply {
        let style = self.0.json_style;
        let q = match query::parse_list(raw_query) {
            Ok(q) => q,
            Err(error) => return Reply::problem(400, render::query_problem(style, &error)),
        };
        let store = self.store();
        let mut cards = store.visible_cards(kind, token);
        if q.desc {
            cards.reverse();
        }
        let start = (q.page as usize - 1).saturating_mul(q.limit as usize);
        if start >= cards.len() {
            return Reply::no_content();
        }
        let end = start.saturating_add(q.limit as usize).min(cards.len());
        let page = &cards[start..end];
        Reply::hal(render::cards_page(style, kind, page, &q, base, raw_query))
    }

    /// `GET /api/v4/contacts/{id}` or `GET /api/v4/companies/{id}`: `204` when the token does not
    /// see it, as for a lead.
    fn get_card(
        &self,
        kind: CardKind,
        id: i64,
        raw_query: &str,
        base: &str,
        token: &TokenSpec,
    ) -> Reply {
        let store = self.store();
        let visible = store.visible_cards(kind, token);
        match visible.iter().find(|c| c.id == id) {
            Some(card) => Reply::hal(render::card(self.0.json_style, kind, card, base, raw_query)),
            None => Reply::no_content(),
        }
    }

    /// `GET /api/v4/leads/{id}`: `204` when there is no such lead for this token.
    fn get_lead(&self, id: i64, raw_query: &str, base: &str, token: &TokenSpec) -> Reply {
        let style = self.0.json_style;
        let q = match query::parse(raw_query) {
            Ok(q) => q,
            Err(error) => return Reply::problem(400, render::query_problem(style, &error)),
        };
        let store = self.store();
        match store.position(id).map(|pos| &store.leads[pos as usize]) {
            Some(lead) if !lead.is_deleted && token.sees(lead.responsible_user_id) => {
                let mut with = q.with;
                with.only_deleted = false;
                Reply::hal(render::lead(
                    style,
                    lead,
                    &LeadCtx::new(base, raw_query, with),
                ))
            }
            _ => Reply::no_content(),
        }
    }

    /// `POST /api/v4/leads`: a JSON array of leads, all or nothing.
    async fn create_leads(&self, req: Request<Incoming>, base: &str, token: &TokenSpec) -> Reply {
        let style = self.0.json_style;
        let items = match read_json_array(style, req).await {
            Ok(items) => items,
            Err(reply) => return reply,
        };
        let mut patches = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let request_id = match item.get("request_id") {
                Some(Value::String(s)) => s.clone(),
                _ => i.to_string(),
            };
            match lead_patch(style, item, &request_id) {
                Ok(patch) => patches.push((request_id, patch)),
                Err(reply) => return reply,
            }
        }
        let by_user = acting_user(token);
        let mut store = self.store_mut();
        // Read under the lock, so changes are stamped in the order they are made.
        let now = self.now_ts();
        let main = store.main_pipeline();
        for (request_id, patch) in &patches {
            let pipeline = patch.pipeline_id.unwrap_or(main);
            let stage_ok = match patch.status_id {
                Some(status) => store.stage_exists(pipeline, status),
                None => store.pipeline(pipeline).is_some(),
            };
            if !stage_ok {
                return Reply::problem(
                    400,
                    render::write_problem(
                        style,
                        request_id,
                        "status_id",
                        "Unknown pipeline or status",
                    ),
                );
            }
        }
        let mut created = Vec::with_capacity(patches.len());
        for (request_id, patch) in patches {
            match store.create(patch, by_user, now) {
                Ok(id) => created.push((id, request_id)),
                Err(error) => {
                    return Reply::problem(
                        400,
                        render::write_problem(style, &request_id, error.path, &error.detail),
                    )
                }
            }
        }
        Reply::hal(render::created(style, base, &created))
    }

    /// `PATCH /api/v4/leads/{id}`.
    async fn patch_lead(
        &self,
        id: i64,
        req: Request<Incoming>,
        base: &str,
        token: &TokenSpec,
    ) -> Reply {
        let style = self.0.json_style;
        let body = match read_json(style, req).await {
            Ok(body) => body,
            Err(reply) => return reply,
        };
        let patch = match lead_patch(style, &body, "0") {
            Ok(patch) => patch,
            Err(reply) => return reply,
        };
        match self.apply_patch(id, patch, token, "0") {
            Ok(updated_at) => Reply::hal(render::updated_one(style, base, id, updated_at)),
            Err(reply) => reply,
        }
    }

    /// `PATCH /api/v4/leads`: a JSON array of changes, each with its `id`.
    async fn patch_leads(&self, req: Request<Incoming>, base: &str, token: &TokenSpec) -> Reply {
        let style = self.0.json_style;
        let items = match read_json_array(style, req).await {
            Ok(items) => items,
            Err(reply) => return reply,
        };
        let mut done = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let request_id = i.to_string();
            let Some(id) = item.get("id").and_then(Value::as_i64) else {
                return Reply::problem(
                    400,
                    render::write_problem(
                        style,
                        &request_id,
                        "id",
                        "This value should not be blank.",
                    ),
                );
            };
            let patch = match lead_patch(style, item, &request_id) {
                Ok(patch) => patch,
                Err(reply) => return reply,
            };
            match self.apply_patch(id, patch, token, &request_id) {
                Ok(updated_at) => done.push((id, updated_at)),
                Err(reply) => return reply,
            }
        }
        Reply::hal(render::updated_many(style, base, &done))
    }

    fn apply_patch(
        &self,
        id: i64,
        patch: LeadPatch,
        token: &TokenSpec,
        request_id: &str,
    ) -> Result<i64, Reply> {
        let style = self.0.json_style;
        let mut store = self.store_mut();
        let now = self.now_ts();
        let pos = store
            .position(id)
            .filter(|&pos| {
                let lead = &store.leads[pos as usize];
                !lead.is_deleted && token.sees(lead.responsible_user_id)
            })
            .ok_or_else(|| Reply::not_found(style))?;
        store
            .update(pos, patch, acting_user(token), now)
            .map_err(|e| {
                Reply::problem(
                    400,
                    render::write_problem(style, request_id, e.path, &e.detail),
                )
            })
    }
}

/// The lead [`Fault::MisplaceLead`] puts on a page of `stage`: the first live lead the token sees
/// that is not listed under `stage`, from another pipeline when there is one (so that a check
/// against any stage of `stage`'s pipeline catches it too).
fn lead_of_another_stage(
    store: &Store,
    stage: (i64, i64),
    q: &LeadsQuery,
    token: &TokenSpec,
) -> Option<u32> {
    let listed = store.stage_positions(stage);
    let candidates = || {
        (0..store.leads.len() as u32).filter(|&pos| {
            let lead = &store.leads[pos as usize];
            lead.is_deleted == q.with.only_deleted
                && token.sees(lead.responsible_user_id)
                && (lead.pipeline_id, lead.status_id) != stage
                && listed.binary_search(&pos).is_err()
        })
    };
    candidates()
        .find(|&pos| store.leads[pos as usize].pipeline_id != stage.0)
        .or_else(|| candidates().next())
}

/// The user a token acts as: its first responsible user, or the account owner.
fn acting_user(token: &TokenSpec) -> i64 {
    token
        .responsible_user_ids
        .as_ref()
        .and_then(|ids| ids.first().copied())
        .unwrap_or(USERS[0])
}

/// The bearer token of a request, if any.
fn bearer<B>(req: &Request<B>) -> Option<String> {
    let value = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// `http://` + the authority the client addressed (h2 `:authority`, or `Host`), else the listener.
fn base_url<B>(req: &Request<B>, local: SocketAddr) -> String {
    if let Some(authority) = req.uri().authority() {
        return format!("http://{authority}");
    }
    match req.headers().get(HOST).and_then(|h| h.to_str().ok()) {
        Some(host) if !host.is_empty() => format!("http://{host}"),
        _ => format!("http://{local}"),
    }
}

async fn read_json(style: JsonStyle, req: Request<Incoming>) -> Result<Value, Reply> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| Reply::simple_problem(style, 400, "Bad Request", "Request body is too large"))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|_| {
        Reply::simple_problem(style, 400, "Bad Request", "Request body is not valid JSON")
    })
}

/// A JSON array of at most 250 items, as Kommo's batch writes take; otherwise the reply to give.
async fn read_json_array(style: JsonStyle, req: Request<Incoming>) -> Result<Vec<Value>, Reply> {
    let Value::Array(items) = read_json(style, req).await? else {
        return Err(Reply::simple_problem(
            style,
            400,
            "Bad Request",
            "Request body must be a JSON array",
        ));
    };
    if items.len() > MAX_LIMIT as usize {
        return Err(Reply::simple_problem(
            style,
            422,
            "Unprocessable Entity",
            "Limit 250 per page",
        ));
    }
    Ok(items)
}

/// The writable fields of one lead object.
fn lead_patch(style: JsonStyle, item: &Value, request_id: &str) -> Result<LeadPatch, Reply> {
    let Value::Object(fields) = item else {
        return Err(Reply::problem(
            400,
            render::write_problem(style, request_id, "", "Each lead must be a JSON object."),
        ));
    };
    let int = |name: &'static str| -> Result<Option<i64>, Reply> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                Reply::problem(
                    400,
                    render::write_problem(
                        style,
                        request_id,
                        name,
                        "This value should be of type int.",
                    ),
                )
            }),
        }
    };
    let name = match fields.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(Reply::problem(
                400,
                render::write_problem(
                    style,
                    request_id,
                    "name",
                    "This value should be of type string.",
                ),
            ))
        }
    };
    Ok(LeadPatch {
        name,
        price: int("price")?,
        pipeline_id: int("pipeline_id")?,
        status_id: int("status_id")?,
        responsible_user_id: int("responsible_user_id")?,
    })
}

/// The card list a path segment names (`contacts` or `companies`).
fn card_kind(list: &str) -> CardKind {
    if list == "contacts" {
        CardKind::Contacts
    } else {
        CardKind::Companies
    }
}
