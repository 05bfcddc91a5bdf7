//! The client edge: accept loops, the layers every request passes, routing, the admin
//! listener and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::layer::layer_fn;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::error::Overloaded;
use tower::timeout::error::Elapsed;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::accounts::{Account, Accounts, Routed};
use crate::body::{self, ProxyBody};
use crate::console::Console;
use crate::error::{problem, ProxyError};
use crate::gateway::{Bounds, Gateway};
use crate::headers::{valid_host, REQUEST_ID};
use crate::leads;
use crate::metrics::merge_expositions;
use crate::passthrough;
use crate::webhook;

/// A request's connection peer, put in its extensions by the connection that read it.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

/// The upstream requests a client request caused, put in its answer's extensions for the
/// `answered` line.
#[derive(Debug, Clone, Copy)]
struct UpstreamCalls(u32);

/// A connection's service: every request of the proxy listener, or of the admin listener.
type Edge = BoxCloneSyncService<Request<Incoming>, Response<ProxyBody>, Infallible>;

/// The layers of [`edge`] under the outermost one.
type Inner = BoxCloneSyncService<Request<Incoming>, Response<ProxyBody>, BoxError>;

/// The proxy's client edge. Every request passes these layers, outermost first:
/// 1. `observe`: the request id (the client's when short and plain, else a new one), the
///    request's span, the `answered` line and the request counter; what an inner layer
///    refused becomes a problem+json answer here, so it is logged and counted too.
/// 2. Load shedding over one concurrency limit for the whole process
///    (`--max-concurrent-requests`): past it a request is refused at once, before any work.
///    The permits in use are the in-flight gauge.
/// 3. The bounds of the request line and headers (`--max-uri-len`, `--max-header-bytes`,
///    `--max-query-params`, a valid `Host`).
/// 4. The deadline (`--request-timeout`): dropping the work at the deadline withdraws its
///    queued upstream permits too.
/// 5. The router: the leads list to the fan-out, everything else through.
///
/// With several accounts, `observe` also picks the request's account (see
/// [`Accounts::route`]); the layers after it are the whole proxy's, their settings the first
/// account's (every account has the same).
pub fn edge(accounts: Arc<Accounts>) -> Edge {
    let gw = accounts.front().clone();
    let bounds = gw.settings.bounds.clone();
    let stack = ServiceBuilder::new()
        .layer(layer_fn(move |inner: Inner| {
            let accounts = accounts.clone();
            service_fn(move |req| observe(accounts.clone(), inner.clone(), req))
        }))
        .layer_fn(BoxCloneSyncService::new)
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(
            gw.in_flight.clone(),
        ))
        .filter(move |req: Request<Incoming>| check_bounds(&bounds, &req).map(|()| req))
        .timeout(gw.settings.request_timeout)
        .service_fn(route);
    BoxCloneSyncService::new(stack)
}

/// The outermost layer of [`edge`].
async fn observe<S>(
    accounts: Arc<Accounts>,
    inner: S,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = BoxError>,
{
    let started = std::time::Instant::now();
    let gw = accounts.front().clone();
    // Before the span: its path is the one the account sees.
    let routed = accounts.route(&mut req);
    let request_id = match req
        .headers()
        .get(REQUEST_ID)
        .filter(|v| v.to_str().is_ok_and(valid_request_id))
    {
        Some(id) => id.clone(),
        None => gw.new_request_id(),
    };
    req.headers_mut().insert(REQUEST_ID, request_id.clone());
    let route = if is_leads(&req) {
        "leads"
    } else {
        "passthrough"
    };
    // Only the path: a query can carry anything, and nothing a client sends is logged raw.
    let span = info_span!(
        "request",
        id = request_id.to_str().unwrap_or_default(),
        method = %req.method(),
        path = %req.uri().path(),
        route,
        fanout = tracing::field::Empty,
        cache = tracing::field::Empty,
        key = tracing::field::Empty,
        account = tracing::field::Empty,
    );
    let mut resp = match routed {
        Ok(account) => {
            if accounts.is_named() {
                span.record("account", account.name.as_str());
            }
            let gw = account.gateway.clone();
            req.extensions_mut().insert(Routed(gw.clone()));
            let answer = inner.oneshot(req).instrument(span.clone()).await;
            let resp = answer.unwrap_or_else(|e| refusal(&gw, e).into_response());
            gw.metrics.answered(route, resp.status().as_u16());
            resp
        }
        // Not counted: no account's metrics are the right place for it.
        Err(e) => e.into_response(),
    };
    let status = resp.status().as_u16();
    let upstream_calls = resp.extensions().get::<UpstreamCalls>().map_or(0, |c| c.0);
    span.in_scope(|| {
        info!(
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            upstream_calls,
            "answered"
        )
    });
    resp.headers_mut().insert(REQUEST_ID, request_id);
    Ok(resp)
}

/// What an inner layer of [`edge`] refused a request with, as the client is told.
fn refusal(gw: &Gateway, e: BoxError) -> ProxyError {
    if e.is::<Overloaded>() {
        return ProxyError::Unavailable {
            detail: format!(
                "the proxy is serving {} requests at once (--max-concurrent-requests); try again shortly",
                gw.settings.bounds.max_concurrent
            ),
            retry_after: Some(Duration::from_secs(1)),
        };
    }
    if e.is::<Elapsed>() {
        return ProxyError::Timeout(format!(
            "no complete answer within {} (--request-timeout)",
            humantime::format_duration(gw.settings.request_timeout)
        ));
    }
    match e.downcast::<ProxyError>() {
        Ok(e) => *e,
        Err(e) => ProxyError::Internal(e.to_string()),
    }
}

fn is_leads<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET && req.uri().path() == leads::plan::LEADS_PATH
}

/// The innermost layer of [`edge`]: the leads list to the fan-out, everything else through,
/// on the gateway `observe` routed the request to.
async fn route(req: Request<Incoming>) -> Result<Response<ProxyBody>, BoxError> {
    let Some(Routed(gw)) = req.extensions().get::<Routed>().cloned() else {
        return Err(ProxyError::Internal("a request reached the router unrouted".into()).into());
    };
    let peer = req
        .extensions()
        .get::<Peer>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |p| p.0.ip());
    let is_leads = is_leads(&req);
    let (mut parts, incoming) = req.into_parts();
    let key = match gw.authorize(&mut parts) {
        Ok(key) => key,
        Err(e) => return Ok(e.into_response()),
    };
    if let Some(key) = &key {
        tracing::Span::current().record("key", key.as_str());
    }
    let audit =
        key.filter(|_| !matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS));
    let audit = audit.map(|key| (key, parts.method.clone(), parts.uri.path().to_string()));
    let request_id = parts
        .headers
        .get(REQUEST_ID)
        .cloned()
        .unwrap_or_else(|| gw.new_request_id());
    let buffered = is_leads
        || passthrough::is_cached(
            &gw,
            &parts.method,
            parts.headers.contains_key(http::header::AUTHORIZATION),
        );
    let ctx = gw.context(&parts, buffered, request_id);
    let result = match gw.check_client_quota(&ctx, peer) {
        Err(e) => Err(e),
        Ok(()) if is_leads => {
            let query = parts.uri.query().unwrap_or("");
            leads::answer(&gw, &ctx, query, &parts.headers).await
        }
        Ok(()) => passthrough::forward(&gw, &ctx, Request::from_parts(parts, incoming)).await,
    };
    let mut resp = result.unwrap_or_else(|e| {
        debug!(error = %e.status(), "request failed");
        e.into_response()
    });
    resp.extensions_mut()
        .insert(UpstreamCalls(ctx.upstream_calls()));
    if let Some((key, method, path)) = audit {
        info!(target: "audit", key, %method, path, status = resp.status().as_u16(), "write by key");
    }
    Ok(resp)
}

/// The request line and headers within `--max-uri-len`, `--max-header-bytes` and
/// `--max-query-params`.
fn check_bounds<B>(bounds: &Bounds, parts: &Request<B>) -> Result<(), ProxyError> {
    let target = parts
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len())
        + parts.uri().authority().map_or(0, |a| a.as_str().len());
    if target > bounds.max_uri_len {
        return Err(ProxyError::Rejected(
            StatusCode::URI_TOO_LONG,
            format!(
                "the request target is {target} bytes; at most {} are accepted (--max-uri-len)",
                bounds.max_uri_len
            ),
        ));
    }
    let header_bytes: usize = parts
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > bounds.max_header_bytes {
        return Err(ProxyError::Rejected(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("the request headers are {header_bytes} bytes; at most {} are accepted (--max-header-bytes)", bounds.max_header_bytes),
        ));
    }
    let host = parts
        .headers()
        .get(http::header::HOST)
        .map(|h| h.to_str().ok().filter(|h| valid_host(h)));
    if host.is_some_and(|h| h.is_none()) {
        return Err(ProxyError::Rejected(
            StatusCode::BAD_REQUEST,
            "the Host header must be a host name or address with an optional port".into(),
        ));
    }
    let params = parts.uri().query().map_or(0, count_params);
    if params > bounds.max_query_params {
        return Err(ProxyError::Rejected(
            StatusCode::BAD_REQUEST,
            format!(
                "the query has {params} parameters; at most {} are accepted (--max-query-params)",
                bounds.max_query_params
            ),
        ));
    }
    Ok(())
}

/// The non-empty `&`-separated parameters of a query.
fn count_params(query: &str) -> usize {
    query.split('&').filter(|p| !p.is_empty()).count()
}

/// A client's request id is kept when it is short and plain; otherwise one is generated.
fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Serves the proxy on `listener` until `shutdown` completes, then lets requests in flight
/// finish for up to `grace`.
pub async fn run(
    listener: TcpListener,
    accounts: Arc<Accounts>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> Result<(), String> {
    let gateway = accounts.front().clone();
    let bounds = &gateway.settings.bounds;
    let limits = ConnLimits {
        header_read_timeout: bounds.header_read_timeout,
        max_buf_size: read_buffer(bounds),
        max_connections: bounds.max_connections,
    };
    #[cfg(target_os = "linux")]
    check_open_files(limits.max_connections);
    let open = gateway.metrics.open_connections.clone();
    serve(listener, shutdown, grace, limits, edge(accounts), open).await;
    Ok(())
}

/// Serves the admin endpoints on `listener` until `shutdown` completes: `GET /healthz`,
/// `/readyz`, `/metrics`, the console (`/`, `/status.json`), and `POST /webhooks/kommo` when
/// a webhook secret is configured.
pub async fn run_admin(
    listener: TcpListener,
    gateway: Arc<Accounts>,
    webhook_secret: Option<Arc<str>>,
    console: Arc<Console>,
    shutdown: impl Future<Output = ()>,
) {
    let admin = service_fn(move |req: Request<Incoming>| {
        let (gw, secret, console) = (gateway.clone(), webhook_secret.clone(), console.clone());
        async move { Ok::<_, Infallible>(admin(&gw, secret.as_deref(), &console, req).await) }
    });
    let limits = ConnLimits::ADMIN;
    let open = Gauge::default();
    serve(
        listener,
        shutdown,
        Duration::from_secs(1),
        limits,
        BoxCloneSyncService::new(admin),
        open,
    )
    .await
}

/// Answers one request of the admin listener. With several accounts, `/readyz` is ready
/// only when every account is (a load balancer cannot send one account's requests elsewhere
/// alone) and reports each; `/sync` and `/metrics` cover every account; the webhook at
/// `/webhooks/kommo/NAME` drops one account's cached entries, at `/webhooks/kommo` every
/// account's.
///
/// The console's figures are the first account's; its accounts table lists every account.
async fn admin(
    accounts: &Accounts,
    secret: Option<&str>,
    console: &Console,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let front = accounts.front();
    // The console's pages, and the admin token's check of them and of `/metrics`.
    if let Some(resp) = console.answer(accounts, req.method(), req.uri().path(), req.headers()) {
        return resp;
    }
    if !accounts.is_named() {
        return admin_one(front, secret, req).await;
    }
    let live = accounts.iter().any(|a| a.gateway.live.is_some());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/readyz") => {
            let (mut all, mut each) = (true, serde_json::Map::new());
            for account in accounts.iter() {
                let (ready, report) = account.gateway.readiness().await;
                all &= ready;
                each.insert(account.name.clone(), report);
            }
            let report = serde_json::json!({ "ready": all, "accounts": each });
            let mut resp = typed(report.to_string(), "application/json");
            if !all {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            resp
        }
        (&Method::GET, "/metrics") => {
            let mut texts = Vec::new();
            for account in accounts.iter() {
                texts.push(account.gateway.scrape().await);
            }
            typed(merge_expositions(&texts), OPENMETRICS)
        }
        (&Method::GET, "/sync") if live => {
            let each: serde_json::Map<_, _> = accounts
                .iter()
                .map(|a| {
                    let report = a.gateway.live.as_ref().map(|l| l.report());
                    (a.name.clone(), report.unwrap_or_default())
                })
                .collect();
            let report = serde_json::json!({ "accounts": each });
            typed(report.to_string(), "application/json")
        }
        (&Method::POST, path) if secret.is_some() && path.starts_with(webhook::PATH) => {
            // `/webhooks/kommo/NAME`: one account's entries; `/webhooks/kommo`: every account's.
            let name = match &path[webhook::PATH.len()..] {
                "" => None,
                rest => Some(rest.strip_prefix('/').unwrap_or(rest)),
            };
            let chosen: Vec<&Account> = accounts
                .iter()
                .filter(|a| name.is_none_or(|n| n == a.name))
                .collect();
            if chosen.is_empty() {
                let detail = format!(
                    "no such account: post to {}/NAME for one of the {} accounts, or to {} for all",
                    webhook::PATH,
                    accounts.iter().count(),
                    webhook::PATH
                );
                return problem(StatusCode::NOT_FOUND, &detail, None);
            }
            let changed = || async {
                for account in chosen {
                    changed(&account.gateway).await;
                }
            };
            webhook::receive(secret.unwrap_or_default(), req, changed).await
        }
        _ => admin_one(front, secret, req).await,
    }
}

/// The content type of `/metrics`.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A `200` answer of `body` as `content_type`.
fn typed(body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(body));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    resp
}

/// What a webhook changes: the cached entries and live views of `gw`.
async fn changed(gw: &Gateway) {
    gw.invalidate_all().await;
    if let Some(live) = &gw.live {
        live.wake_all();
    }
}

/// Answers one request of the admin listener for one gateway.
async fn admin_one(
    gw: &Gateway,
    secret: Option<&str>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => typed("ok\n".into(), "text/plain"),
        (&Method::GET, "/readyz") => {
            let (ready, report) = gw.readiness().await;
            let mut resp = typed(report.to_string(), "application/json");
            if !ready {
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            resp
        }
        (&Method::GET, "/metrics") => typed(gw.scrape().await, OPENMETRICS),
        (&Method::GET, "/sync") => match &gw.live {
            Some(live) => typed(live.report().to_string(), "application/json"),
            None => problem(
                StatusCode::NOT_FOUND,
                "live views are off: start the proxy with --sync",
                None,
            ),
        },
        (&Method::POST, webhook::PATH) => match secret {
            Some(secret) => webhook::receive(secret, req, || changed(gw)).await,
            None => problem(
                StatusCode::NOT_FOUND,
                "the webhook endpoint is off: start the proxy with --webhook-secret",
                None,
            ),
        },
        _ => problem(StatusCode::NOT_FOUND, "no such admin endpoint", None),
    }
}

/// hyper's read buffer for a request head: a backstop far above our own bounds, so our checks
/// answer first, with a problem+json body that names the flag. A head that fills it is cut
/// with a bare `431`; the room past `--max-uri-len` lets a target far past the bound still be
/// read whole and answered `414` (by hyper itself past 64 KiB, the longest URI it parses).
fn read_buffer(bounds: &Bounds) -> usize {
    (bounds.max_header_bytes + bounds.max_uri_len + 8 * 1024).max(256 * 1024)
}

/// What a connection may cost before the request reaches the handler.
#[derive(Debug, Clone, Copy)]
struct ConnLimits {
    /// A connection without a complete request head this long after it was accepted, or after
    /// its previous answer, is closed: silent and slow clients (slowloris) alike.
    header_read_timeout: Duration,
    /// hyper's read buffer for a request head.
    max_buf_size: usize,
    /// Connections open at once; past it the acceptor waits for one to close.
    max_connections: usize,
}

impl ConnLimits {
    /// Its own bound, so `/healthz` and `/metrics` answer while the proxy listener is full.
    const ADMIN: ConnLimits = ConnLimits {
        header_read_timeout: Duration::from_secs(10),
        max_buf_size: 64 * 1024,
        max_connections: 64,
    };
}

/// Warns when `--max-connections` leaves too little room under the soft limit on open files:
/// past it, accepts and upstream connects fail with "Too many open files".
#[cfg(target_os = "linux")]
fn check_open_files(max_connections: usize) {
    // Descriptors besides client connections: upstream connections, cached answers' files, the
    // listeners, the admin connections, the runtimes' own.
    const SPARE: u64 = 1024;
    let Some(soft) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current else {
        return;
    };
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(SPARE);
    if wanted > soft {
        warn!(
            max_connections,
            open_files_limit = soft,
            spare = SPARE,
            "--max-connections plus a spare for upstream connections and cached files is above \
             the open-files limit: lower --max-connections or raise the limit"
        );
    }
}

/// A proxy connection's place among `--max-connections`, counted in
/// `kommo_fanout_open_connections`; both are given back when the connection closes.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Slot {
    fn take(permit: OwnedSemaphorePermit, open: &Gauge) -> Slot {
        open.inc();
        Slot {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Serves `listener` until `shutdown` completes, then drains its connections for up to
/// `grace`. Each open connection is counted in `open`.
async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: ConnLimits,
    service: Edge,
    open: Gauge,
) {
    let connections = Connections::new(limits);
    accept(
        &listener,
        limits.max_connections,
        shutdown,
        |stream, peer, permit| {
            let slot = Slot::take(permit, &open);
            connections.serve(stream, peer, service.clone(), slot)
        },
    )
    .await;
    drop(listener);
    connections.drain(grace).await;
}

/// Accepts connections until `shutdown` completes, at most `max_connections` open at once;
/// each goes to `accepted` with `TCP_NODELAY` set and the permit it holds until it closes.
async fn accept(
    listener: &TcpListener,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
    mut accepted: impl FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit),
) {
    // Past the bound the loop waits for a connection to close, and new clients wait in the
    // listen backlog, instead of each accept failing for want of a descriptor.
    // (A bound past the semaphore's range is no bound at all: clamped rather than a panic.)
    let slots = Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)));
    let mut errors = AcceptErrors::default();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // Only a closed semaphore fails, and this one is never closed.
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            conn = next_connection(listener, &mut errors) => conn,
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        accepted(stream, peer, permit);
    }
}

/// The listener's next connection; failures are paused on and logged as `errors` says.
async fn next_connection(
    listener: &TcpListener,
    errors: &mut AcceptErrors,
) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                errors.succeeded();
                return conn;
            }
            // A client that reset before it was accepted: its own failure, not the listener's.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                debug!(error = %e, "a connection closed before it was accepted");
            }
            Err(e) => {
                let failure = errors.failed(Instant::now());
                if let Some(suppressed) = failure.log {
                    warn!(
                        error = %e,
                        suppressed,
                        pause_ms = failure.pause.as_millis() as u64,
                        "accept failed; pausing before the next attempt"
                    );
                }
                tokio::time::sleep(failure.pause).await;
            }
        }
    }
}

/// Failed accepts (out of descriptors and the like): paused on for longer each time, so the
/// loop does not spin, and logged at most once a second, so the log does not fill.
#[derive(Debug)]
struct AcceptErrors {
    /// The pause after the next failure; back to the shortest after a success.
    backoff: Duration,
    /// When a failure was last logged.
    logged: Option<Instant>,
    /// Failures since then, not logged.
    suppressed: u64,
}

/// What to do about one failed accept.
#[derive(Debug, PartialEq, Eq)]
struct AcceptFailure {
    pause: Duration,
    /// `Some(failures not logged since the last line)` when this one is to be logged.
    log: Option<u64>,
}

impl AcceptErrors {
    const FIRST_PAUSE: Duration = Duration::from_millis(50);
    const LONGEST_PAUSE: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(1);

    fn failed(&mut self, now: Instant) -> AcceptFailure {
        let due = self
            .logged
            .is_none_or(|at| now.duration_since(at) >= Self::LOG_EVERY);
        let log = if due {
            self.logged = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        };
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(Self::LONGEST_PAUSE);
        AcceptFailure { pause, log }
    }

    /// The failures are over: the next one pauses briefly again. The log stays rate-limited,
    /// so a failure that alternates with successes still logs once a second.
    fn succeeded(&mut self) {
        self.backoff = Self::FIRST_PAUSE;
    }
}

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            backoff: Self::FIRST_PAUSE,
            logged: None,
            suppressed: 0,
        }
    }
}

/// The connections of one listener: HTTP/1.1 and HTTP/2, each watched so shutdown can drain
/// it.
struct Connections {
    builder: auto::Builder<TokioExecutor>,
    /// How long a new connection may go without a complete request head (see
    /// [`Connections::serve`]).
    first_request: Duration,
    graceful: GracefulShutdown,
}

impl Connections {
    fn new(limits: ConnLimits) -> Connections {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            // Header names as Kommo's nginx writes them (`Content-Type`): some clients compare
            // them with their case.
            .title_case_headers(true)
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_buf_size);
        Connections {
            builder,
            first_request: limits.header_read_timeout,
            graceful: GracefulShutdown::new(),
        }
    }

    /// Serves `stream` on a task of its own; `guard` is dropped when it closes.
    ///
    /// A connection without a first request head within the header read timeout of being
    /// accepted is closed here: hyper's own timeout starts only once its HTTP/1 parser runs,
    /// after the auto builder has read the first bytes to tell HTTP/1.1 from HTTP/2, which it
    /// waits for without a limit. After the first request, hyper's timeout covers the wait for
    /// each next head of an HTTP/1 connection, from the moment the previous answer is written;
    /// an HTTP/2 connection keeps its own keep-alive rules.
    fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        service: Edge,
        guard: impl Send + 'static,
    ) {
        // Set when hyper hands over a first request, that is once a complete head is in.
        let requested = Arc::new(AtomicBool::new(false));
        let service = hyper::service::service_fn({
            let requested = requested.clone();
            move |mut req: Request<Incoming>| {
                requested.store(true, Ordering::Relaxed);
                req.extensions_mut().insert(Peer(peer));
                service.clone().oneshot(req)
            }
        });
        let conn = self.builder.serve_connection(TokioIo::new(stream), service);
        let conn = self.graceful.watch(conn.into_owned());
        let first_request = self.first_request;
        tokio::spawn(async move {
            // Declared before the connection, so it is dropped after the socket is closed and
            // the acceptor never holds more descriptors than its bound.
            let _guard = guard;
            tokio::pin!(conn);
            let ended = match tokio::time::timeout(first_request, conn.as_mut()).await {
                Ok(ended) => ended,
                Err(_) if !requested.load(Ordering::Relaxed) => {
                    debug!(%peer, "no request head within the header read timeout; closing");
                    return;
                }
                Err(_) => conn.await,
            };
            if let Err(e) = ended {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }

    /// Lets open connections finish their requests for up to `grace`, then closes them.
    async fn drain(self, grace: Duration) {
        info!(connections = self.graceful.count(), "draining connections");
        if tokio::time::timeout(grace, self.graceful.shutdown())
            .await
            .is_err()
        {
            warn!("connections still open after the shutdown grace period; closing them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{count_params, AcceptErrors, AcceptFailure};
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn failed_accepts_back_off_to_a_second_and_log_once_a_second() {
        let mut errors = AcceptErrors::default();
        let start = Instant::now();
        let ms = Duration::from_millis;
        // Failures 10 ms apart: the first is logged, the next ones within the second are counted.
        let seen: Vec<AcceptFailure> = (0..8).map(|i| errors.failed(start + ms(10 * i))).collect();
        let pauses: Vec<u64> = seen.iter().map(|f| f.pause.as_millis() as u64).collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(seen[0].log, Some(0));
        assert!(seen[1..].iter().all(|f| f.log.is_none()));
        // A second after the last line: logged, with the seven held back.
        assert_eq!(errors.failed(start + ms(1000)).log, Some(7));
        assert_eq!(errors.failed(start + ms(1500)).log, None);
        // A success resets the pause but not the log's rate.
        errors.succeeded();
        let next = errors.failed(start + ms(1600));
        assert_eq!(
            next,
            AcceptFailure {
                pause: ms(50),
                log: None
            }
        );
        assert_eq!(errors.failed(start + ms(2000)).log, Some(2));
    }

    #[test]
    fn params_are_the_non_empty_ampersand_separated_parts() {
        for (query, n) in [
            ("", 0),
            ("&", 0),
            ("&&&", 0),
            ("a=1", 1),
            ("a=1&", 1),
            ("&a=1", 1),
            ("a=1&&b=2", 2),
            ("a&b&c", 3),
        ] {
            assert_eq!(count_params(query), n, "{query:?}");
        }
    }
}
