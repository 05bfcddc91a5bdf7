//! Accept loops, routing, the admin listener and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::body::{self, ProxyBody};
use crate::error::{problem, ProxyError};
use crate::gateway::Gateway;
use crate::leads;
use crate::passthrough;
use crate::webhook;

/// Routes one client request: the leads list to the fan-out, everything else through, within
/// the request deadline.
pub async fn handle(
    gw: &Arc<Gateway>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (parts, incoming) = req.into_parts();
    let ctx = gw.context(&parts);
    let work = Box::pin(async {
        gw.check_client_quota(&ctx, peer.ip())?;
        if parts.method == Method::GET && parts.uri.path() == leads::plan::LEADS_PATH {
            let query = parts.uri.query().unwrap_or("");
            leads::answer(gw, &ctx, query).await
        } else {
            passthrough::forward(gw, &ctx, Request::from_parts(parts, incoming)).await
        }
    });
    // Dropping `work` at the deadline withdraws its queued upstream permits too.
    let result = match tokio::time::timeout_at(ctx.flow.deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::Timeout(format!(
            "no complete answer within {} (--request-timeout)",
            humantime::format_duration(gw.settings.request_timeout)
        ))),
    };
    result.unwrap_or_else(|e| {
        debug!(error = ?e, "request failed");
        e.into_response()
    })
}

/// Serves the proxy on `listener` until `shutdown` completes, then lets requests in flight
/// finish for up to `grace`.
pub async fn run(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    serve(listener, shutdown, grace, move |peer, req| {
        let gw = gateway.clone();
        async move { handle(&gw, peer, req).await }
    })
    .await
}

/// Serves the admin endpoints on `listener` until `shutdown` completes: `GET /healthz`, and
/// `POST /webhooks/kommo` when a webhook secret is configured.
pub async fn run_admin(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    webhook_secret: Option<Arc<str>>,
    shutdown: impl Future<Output = ()>,
) {
    serve(listener, shutdown, Duration::from_secs(1), move |_, req| {
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
    })
    .await
}

/// The accept loop shared by both listeners: HTTP/1.1 and HTTP/2, each connection watched so
/// shutdown can drain it.
async fn serve<F, Fut>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    handler: F,
) where
    F: Fn(SocketAddr, Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
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
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(peer, req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    info!(connections = graceful.count(), "draining connections");
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("connections still open after the shutdown grace period; closing them");
    }
}
