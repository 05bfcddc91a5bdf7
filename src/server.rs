//! Accept loops, routing, the admin listener and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::body::{self, ProxyBody};
use crate::error::{problem, ProxyError};
use crate::gateway::{valid_host, Bounds, Gateway};
use crate::leads;
use crate::passthrough;
use crate::sendfile;
use crate::webhook;
use crate::workers::{Accepted, Workers};

/// The header that carries a request's id, from the client or generated, to the upstream and
/// back to the client. A `HeaderName`, not a `&str`: inserting under a string key allocates a
/// new name every time.
pub const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Routes one client request: the leads list to the fan-out, everything else through, within
/// the request deadline; in a span with its request id, counted in the metrics.
pub async fn handle(
    gw: &Arc<Gateway>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = std::time::Instant::now();
    let (parts, incoming) = req.into_parts();
    // Put on the upstream requests where they are built (see `RequestContext::request_id`), not
    // into the client's headers here: a cached answer sends none.
    let request_id = match parts
        .headers
        .get(REQUEST_ID)
        .filter(|v| v.to_str().is_ok_and(valid_request_id))
    {
        Some(id) => id.clone(),
        None => gw.new_request_id(),
    };
    let is_leads = parts.method == Method::GET && parts.uri.path() == leads::plan::LEADS_PATH;
    let route = if is_leads { "leads" } else { "passthrough" };
    // Only the path: a query can carry anything, and nothing a client sends is logged raw.
    let span = info_span!(
        "request",
        id = request_id.to_str().unwrap_or_default(),
        method = %parts.method,
        path = %parts.uri.path(),
        route,
        fanout = tracing::field::Empty,
        cache = tracing::field::Empty,
    );
    let metrics = &gw.fetcher.metrics;
    // Load shedding: past the bound a request is refused at once, before any work.
    let Ok(_permit) = gw.in_flight.clone().try_acquire_owned() else {
        return ProxyError::Unavailable {
            detail: format!(
                "the proxy is serving {} requests at once (--max-concurrent-requests); try again shortly",
                gw.settings.bounds.max_concurrent
            ),
            retry_after: Some(Duration::from_secs(1)),
        }
        .into_response();
    };
    if let Err(e) = check_bounds(&gw.settings.bounds, &parts) {
        return e.into_response();
    }
    // A guard, so a request dropped because its client left is counted out too.
    let _in_flight = InFlight::enter(metrics);
    let buffered = is_leads
        || passthrough::is_cached(
            gw,
            &parts.method,
            parts.headers.contains_key(http::header::AUTHORIZATION),
        );
    let ctx = gw.context(&parts, buffered, request_id);
    let work = Box::pin(async {
        gw.check_client_quota(&ctx, peer.ip())?;
        if is_leads {
            let query = parts.uri.query().unwrap_or("");
            leads::answer(gw, &ctx, query, &parts.headers).await
        } else {
            passthrough::forward(gw, &ctx, Request::from_parts(parts, incoming)).await
        }
    });
    // Dropping `work` at the deadline withdraws its queued upstream permits too.
    let result = match tokio::time::timeout_at(ctx.flow.deadline, work)
        .instrument(span.clone())
        .await
    {
        Ok(r) => r,
        Err(_) => Err(ProxyError::Timeout(format!(
            "no complete answer within {} (--request-timeout)",
            humantime::format_duration(gw.settings.request_timeout)
        ))),
    };
    let mut resp = result.unwrap_or_else(|e| {
        span.in_scope(|| debug!(error = %e.status(), "request failed"));
        e.into_response()
    });
    let status = resp.status().as_u16();
    metrics.answered(route, status);
    span.in_scope(|| {
        info!(
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            upstream_calls = ctx.upstream_calls(),
            "answered"
        )
    });
    resp.headers_mut()
        .insert(REQUEST_ID, ctx.request_id.clone());
    resp
}

/// The request line and headers within `--max-uri-len`, `--max-header-bytes` and
/// `--max-query-params`.
fn check_bounds(bounds: &Bounds, parts: &http::request::Parts) -> Result<(), ProxyError> {
    let target = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + parts.uri.authority().map_or(0, |a| a.as_str().len());
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
        .headers
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
        .headers
        .get(http::header::HOST)
        .map(|h| h.to_str().ok().filter(|h| valid_host(h)));
    if host.is_some_and(|h| h.is_none()) {
        return Err(ProxyError::Rejected(
            StatusCode::BAD_REQUEST,
            "the Host header must be a host name or address with an optional port".into(),
        ));
    }
    let params = parts.uri.query().map_or(0, count_params);
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

/// The non-empty `&`-separated parameters of a query (every request pays this: memchr, not a
/// byte-by-byte split).
fn count_params(query: &str) -> usize {
    let bytes = query.as_bytes();
    let mut count = 0;
    let mut start = 0;
    for end in memchr::memchr_iter(b'&', bytes).chain(std::iter::once(bytes.len())) {
        count += usize::from(end > start);
        start = end + 1;
    }
    count
}

/// Counts a request in `kommo_fanout_in_flight_requests` for as long as it lives.
struct InFlight<'a>(&'a crate::metrics::Metrics);

impl<'a> InFlight<'a> {
    fn enter(metrics: &'a crate::metrics::Metrics) -> Self {
        metrics.in_flight.inc();
        InFlight(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// A client's request id is kept when it is short and plain; otherwise one is generated.
fn valid_request_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Serves the proxy on `listener` with `threads` serving threads (see [`workers`]) until
/// `shutdown` completes, then lets requests in flight finish for up to `grace`.
pub async fn run(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    threads: usize,
) -> Result<(), String> {
    let limits = ConnLimits {
        header_read_timeout: gateway.settings.bounds.header_read_timeout,
        max_buf_size: read_buffer(&gateway.settings.bounds),
    };
    let sends = sendfile::Sends {
        min: gateway
            .cache
            .as_ref()
            .map_or(0, |c| c.config().sendfile_min_bytes),
        bytes: gateway.fetcher.metrics.sendfile_bytes.clone(),
    };
    let handler = move |peer, req| {
        let gw = gateway.clone();
        async move { handle(&gw, peer, req).await }
    };
    let mut workers = Workers::start(threads, move |queue| {
        serve_handed(queue, grace, limits, sends.clone(), handler.clone())
    })?;
    accept(&listener, shutdown, |stream, peer| {
        match stream.into_std() {
            Ok(stream) => workers.hand(stream, peer),
            Err(e) => warn!(%peer, error = %e, "cannot hand a connection to a serving thread"),
        }
    })
    .await;
    drop(listener);
    workers.finish().await;
    Ok(())
}

/// A serving thread's loop: serves each connection it is handed until the acceptor stops,
/// then drains them.
async fn serve_handed(
    mut queue: mpsc::UnboundedReceiver<Accepted>,
    grace: Duration,
    limits: ConnLimits,
    sends: sendfile::Sends,
    handler: impl Handler,
) {
    let connections = Connections::new(limits, sends);
    while let Some(Accepted { stream, peer, open }) = queue.recv().await {
        match TcpStream::from_std(stream) {
            Ok(stream) => connections.serve(stream, peer, handler.clone(), open),
            Err(e) => warn!(%peer, error = %e, "cannot serve a handed connection"),
        }
    }
    connections.drain(grace).await;
}

/// Serves the admin endpoints on `listener` until `shutdown` completes: `GET /healthz`, and
/// `POST /webhooks/kommo` when a webhook secret is configured.
pub async fn run_admin(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    webhook_secret: Option<Arc<str>>,
    shutdown: impl Future<Output = ()>,
) {
    serve(
        listener,
        shutdown,
        Duration::from_secs(1),
        ConnLimits::ADMIN,
        move |_, req| {
            let (gw, secret) = (gateway.clone(), webhook_secret.clone());
            async move {
                match (req.method(), req.uri().path()) {
                    (&Method::GET, "/healthz") => {
                        let mut resp = Response::new(body::full("ok\n"));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("text/plain"),
                        );
                        resp
                    }
                    (&Method::GET, "/readyz") => {
                        let (ready, report) = gw.readiness().await;
                        let mut resp = Response::new(body::full(report.to_string()));
                        if !ready {
                            *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        }
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        );
                        resp
                    }
                    (&Method::GET, "/metrics") => {
                        let mut resp = Response::new(body::full(gw.scrape().await));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            HeaderValue::from_static(
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            ),
                        );
                        resp
                    }
                    (&Method::POST, webhook::PATH) => match secret {
                        Some(secret) => webhook::receive(&gw, &secret, req).await,
                        None => problem(
                            StatusCode::NOT_FOUND,
                            "the webhook endpoint is off: start the proxy with --webhook-secret",
                            None,
                        ),
                    },
                    _ => problem(StatusCode::NOT_FOUND, "no such admin endpoint", None),
                }
            }
        },
    )
    .await
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
    /// Slow clients (slowloris) are dropped after this without complete request headers.
    header_read_timeout: Duration,
    /// hyper's read buffer for a request head.
    max_buf_size: usize,
}

impl ConnLimits {
    const ADMIN: ConnLimits = ConnLimits {
        header_read_timeout: Duration::from_secs(10),
        max_buf_size: 64 * 1024,
    };
}

/// Serves `listener` on this thread's runtime until `shutdown` completes, then drains its
/// connections for up to `grace`.
async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: ConnLimits,
    handler: impl Handler,
) {
    // The admin endpoints send no cached bodies.
    let connections = Connections::new(limits, sendfile::Sends::default());
    accept(&listener, shutdown, |stream, peer| {
        connections.serve(stream, peer, handler.clone(), ())
    })
    .await;
    drop(listener);
    connections.drain(grace).await;
}

/// Accepts connections until `shutdown` completes; each goes to `accepted` with `TCP_NODELAY`
/// set.
async fn accept(
    listener: &TcpListener,
    shutdown: impl Future<Output = ()>,
    mut accepted: impl FnMut(TcpStream, SocketAddr),
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of descriptors and the like: pause instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        accepted(stream, peer);
    }
}

/// What answers the requests of a connection: the proxy's router or the admin endpoints.
trait Handler:
    Fn(SocketAddr, Request<Incoming>) -> Self::Answer + Clone + Send + Sync + 'static
{
    type Answer: Future<Output = Response<ProxyBody>> + Send + 'static;
}

impl<F, Fut> Handler for F
where
    F: Fn(SocketAddr, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    type Answer = Fut;
}

/// The connections of one runtime: HTTP/1.1 and HTTP/2, each watched so shutdown can drain
/// it.
struct Connections {
    builder: auto::Builder<TokioExecutor>,
    graceful: GracefulShutdown,
    /// How the connections' writes look for cached bodies to `sendfile`.
    sends: sendfile::Sends,
}

impl Connections {
    fn new(limits: ConnLimits, sends: sendfile::Sends) -> Connections {
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
            graceful: GracefulShutdown::new(),
            sends,
        }
    }

    /// Serves `stream` on a task of the current runtime; `guard` is dropped when it closes.
    fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        handler: impl Handler,
        guard: impl Send + 'static,
    ) {
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(peer, req).await) }
        });
        let stream = sendfile::Stream::new(stream, self.sends.clone());
        let conn = self.builder.serve_connection(TokioIo::new(stream), service);
        let conn = self.graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(guard);
        });
    }

    /// Lets open connections finish their requests for up to `grace`, then closes them.
    async fn drain(self, grace: Duration) {
        // Serving threads say which they are; the admin listener has no index.
        match crate::workers::current() {
            Some(thread) => info!(
                thread,
                connections = self.graceful.count(),
                "draining connections"
            ),
            None => info!(
                connections = self.graceful.count(),
                "draining admin connections"
            ),
        }
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
    use super::count_params;

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
            let split = query.split('&').filter(|p| !p.is_empty()).count();
            assert_eq!(count_params(query), split, "{query:?}");
        }
    }
}
