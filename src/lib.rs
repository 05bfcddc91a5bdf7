//! kommo-fanout: a drop-in gateway in front of a Kommo (amoCRM) account.
//!
//! Kommo's `GET /api/v4/leads` filters one stage (`pipeline_id` + `status_id`) per request. The
//! proxy accepts any number of `filter[statuses][N]` pairs, sends one upstream request per
//! stage, merges the streams in one global order, removes duplicate leads and answers one HAL
//! page exactly as Kommo renders it. Every other path passes through unchanged.
//!
//! # Layout
//! - [`config`]: the command line and its validation.
//! - [`server`]: accept loops, routing, the admin listener, graceful shutdown.
//! - [`gateway`]: shared state and the per-request context.
//! - [`leads`]: the multi-stage list: `query` → `plan` → fetch → `merge` → `hal`.
//! - [`upstream`]: the client bound to the configured account origin, the limiter, retries.
//! - [`cache`]: upstream pages and client answers, coalesced and isolated by credential.
//! - [`passthrough`]: everything that is not the leads list.
//! - [`metrics`]: Prometheus metrics for the admin listener.
//! - [`error`]: the one place that turns failures into `problem+json` answers.
//! - [`body`]: the body type shared by all answers.
//! - [`sim`]: the simulated Kommo account (test double, benchmark and demo upstream).
//! - [`demo`]: the simulator and the proxy in one process.
//! - [`webhook`]: Kommo's lead webhooks, which drop cached entries.
#![forbid(unsafe_code)]

pub mod body;
pub mod cache;
pub mod config;
pub mod demo;
pub mod error;
pub mod gateway;
pub mod leads;
pub mod metrics;
pub mod passthrough;
pub mod server;
pub mod sim;
pub mod upstream;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use cache::Cache;
use config::ServeConfig;
use gateway::Gateway;
use upstream::fetch::Fetcher;
use upstream::limiter::LocalLimiter;
use upstream::Upstream;

/// Builds the gateway of a validated configuration.
pub fn gateway(config: &ServeConfig) -> Result<Arc<Gateway>, String> {
    let upstream = Upstream::new(config.upstream.clone())?;
    let limiter = Arc::new(LocalLimiter::new(config.limiter));
    let fetcher = Fetcher::new(upstream, limiter, config.fetch.clone());
    let cache = Cache::new(config.cache.clone());
    Ok(Arc::new(Gateway::new(
        fetcher,
        config.gateway.clone(),
        cache,
    )))
}

/// Runs the proxy and its admin listener on already-bound listeners until `shutdown`
/// completes, then drains within the configured grace period.
pub async fn run(
    config: &ServeConfig,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let gw = gateway(config)?;
    serve(config, gw, listener, admin, shutdown).await;
    Ok(())
}

/// [`run`] with a gateway built by the caller (who may keep a handle on it).
pub async fn serve(
    config: &ServeConfig,
    gw: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let admin_rx = rx.clone();
    let secret = config.webhook_secret.as_deref().map(Arc::from);
    let admin_task = tokio::spawn(server::run_admin(admin, gw.clone(), secret, async move {
        let mut rx = admin_rx;
        let _ = rx.wait_for(|stop| *stop).await;
    }));
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let mut rx = rx;
    server::run(
        listener,
        gw,
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        },
        config.shutdown_grace,
    )
    .await;
    let _ = admin_task.await;
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
