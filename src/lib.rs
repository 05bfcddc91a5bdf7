//! kommo-fanout: a drop-in gateway in front of a Kommo (amoCRM) account.
//!
//! Kommo's `GET /api/v4/leads` filters one stage (`pipeline_id` + `status_id`) per request. The
//! proxy accepts any number of `filter[statuses][N]` pairs, sends one upstream request per
//! stage, merges the streams in one global order, removes duplicate leads and answers one HAL
//! page exactly as Kommo renders it. Every other path passes through unchanged.
//!
//! # Layout
//! - [`config`]: the flags of `serve` and `verify` and their validation.
//! - [`server`]: accept loops, routing, the admin listener, graceful shutdown.
//! - [`gateway`]: shared state and the per-request context.
//! - [`accounts`]: several Kommo accounts behind one proxy, routed by host or path prefix.
//! - [`leads`]: the multi-stage list: `query` → `plan` → `fetch` → `merge` → `render`.
//! - [`upstream`]: the client bound to the configured account origin, the limiter, retries.
//! - [`cache`]: upstream pages and client answers, coalesced and isolated by credential.
//! - [`passthrough`]: everything that is not the leads list.
//! - [`metrics`]: Prometheus metrics for the admin listener.
//! - [`console`]: the operator's console on the admin listener (`/`, `/status.json`).
//! - [`headers`]: header names and checks every stage shares.
//! - [`error`]: the one place that turns failures into `problem+json` answers.
//! - [`body`]: the body type shared by all answers.
//! - [`webhook`]: Kommo's lead webhooks, which drop cached entries.
//! - [`keys`]: keys clients send instead of a Kommo token: scopes, the hashed keys file.
//! - [`redis`]: the limiter and cache replicas share through Redis.
//! - [`sync`]: live views, a replica of a credential's leads that answers views from memory.
//! - [`credentials`]: the account's own token or OAuth tokens, held by the proxy.
//! - [`verify`]: the proxy's merged views compared with direct reads of a real account.
//!
//! The simulated Kommo account is its own crate, `kommo_sim` (`sim/`): the binary's `sim` and
//! `demo` commands, the tests and the benchmarks use it; this library does not.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod body;
pub mod cache;
pub mod config;
pub mod console;
pub mod credentials;
pub mod error;
pub mod gateway;
pub mod headers;
pub mod json_text;
pub mod keys;
pub mod leads;
pub mod links;
pub mod metrics;
pub mod passthrough;
pub mod redis;
pub mod server;
pub mod sync;
pub mod upstream;
pub mod verify;
pub mod webhook;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use accounts::Accounts;
use cache::Cache;
use config::ServeConfig;
use credentials::{CredentialSource, Credentials};
use gateway::Gateway;
use gateway::{FingerprintKey, Shared};
use metrics::Metrics;
use redis::{RedisCache, RedisCacheConfig, RedisLimiter, RedisLimiterConfig, RedisTokens};
use upstream::fetch::Fetcher;
use upstream::handover::Handover;
use upstream::limiter::{LocalLimiter, UpstreamLimiter};
use upstream::Upstream;

/// Builds the gateway of a validated single-account configuration (see [`build`]).
pub async fn gateway(config: &ServeConfig) -> Result<Arc<Gateway>, String> {
    build(config, Metrics::new()).await
}

/// The gateways of a validated configuration: one per `[accounts.NAME]`, each with its own
/// upstream, budget, lock file, cache, replicas, credential and labelled metrics; or the one
/// gateway of single-account mode.
pub async fn accounts(config: &ServeConfig) -> Result<Arc<Accounts>, String> {
    if config.accounts.is_empty() {
        return Ok(Arc::new(Accounts::single(gateway(config).await?)));
    }
    let mut list = Vec::new();
    for account in &config.accounts {
        let metrics = Metrics::for_account(&account.name);
        let gateway = build(&config.for_account(account), metrics)
            .await
            .map_err(|e| format!("[accounts.{}]: {e}", account.name))?;
        list.push(accounts::Account {
            name: account.name.clone(),
            host: account.host.clone(),
            gateway,
        });
    }
    Ok(Arc::new(Accounts::named(list)))
}

/// Builds the gateway of one account: with Redis, the shared limiter and cache (connected
/// lazily: a Redis that is down at start means a degraded start, not a failure).
async fn build(config: &ServeConfig, metrics: Metrics) -> Result<Arc<Gateway>, String> {
    let (limiter, shared): (Arc<dyn UpstreamLimiter>, _) = match &config.redis {
        None => {
            let local = LocalLimiter::new(config.limiter);
            let limiter: Arc<dyn UpstreamLimiter> = match &config.limiter_lock {
                Some(path) => {
                    let span = config.limiter.window + config.limiter.margin;
                    Arc::new(Handover::start(local, path.clone(), span))
                }
                None => Arc::new(local),
            };
            (limiter, None)
        }
        Some(redis) => {
            let limiter = Arc::new(
                RedisLimiter::connect(RedisLimiterConfig {
                    url: redis.url.clone(),
                    key_prefix: redis.prefix.clone(),
                    limiter: config.limiter,
                    replicas: redis.replicas,
                    // A replica that dies with a request in flight holds its slot this long.
                    lease: config.upstream.timeout + config.limiter.window + config.limiter.margin,
                })
                .await?,
            );
            let cache = Arc::new(
                RedisCache::connect(RedisCacheConfig {
                    url: redis.url.clone(),
                    key_prefix: redis.prefix.clone(),
                })
                .await?,
            );
            (
                limiter.clone() as _,
                Some((redis, Shared { limiter, cache })),
            )
        }
    };
    let metrics = Arc::new(metrics);
    let upstream = Upstream::new(config.upstream.clone())?;
    let mut fetcher = Fetcher::new(upstream, limiter, config.fetch.clone(), metrics.clone())
        .with_admission(config.limiter);
    let mut auth = None;
    if let Some(holding) = &config.holding {
        let credentials = match (&holding.source, &config.redis) {
            (CredentialSource::TokenFile(path), _) => Credentials::token_file(path.clone())?,
            (CredentialSource::OAuth(settings), None) => Credentials::oauth(settings.clone())?,
            (CredentialSource::OAuth(settings), Some(redis)) => {
                let (account, secret) = (&holding.account, &settings.client_secret);
                let shared = RedisTokens::new(&redis.url, &redis.prefix, account, secret)?;
                Credentials::oauth(settings.clone())?.with_shared(Box::new(shared))
            }
        };
        fetcher = fetcher.with_credentials(Arc::new(credentials));
        auth = Some(gateway::Auth {
            keys: keys::WatchedKeys::start(&holding.keys_file)?,
            account: holding.account.clone(),
            allow_client_tokens: holding.allow_client_tokens,
        });
    }
    let cache = Cache::new(config.cache.clone());
    let mut gw = Gateway::new(fetcher, config.gateway.clone(), cache, metrics.clone());
    if let Some(auth) = auth {
        gw = gw.with_auth(auth);
    }
    if let Some(sync) = &config.sync {
        gw = gw.with_live(sync::live::Live::new(sync.clone(), metrics)?);
    }
    let Some((redis, shared)) = shared else {
        return Ok(Arc::new(gw));
    };
    let shared_cache = shared.cache.clone();
    let mut gw = gw.with_shared(shared);
    match redis::shared_fingerprint_secret(&redis.url, &redis.prefix).await {
        Some(secret) => gw = gw.with_fingerprint_key(FingerprintKey::from_bytes(secret)),
        None => tracing::error!(
            "Redis did not answer at start: this replica fingerprints credentials with a local key, \
             so it shares no cache entries with the others until it is restarted"
        ),
    }
    let gw = Arc::new(gw);
    tokio::spawn(follow_invalidations(Arc::downgrade(&gw), shared_cache));
    Ok(gw)
}

/// Drops this replica's local cache whenever another replica's webhook bumped the shared
/// generation. Ends with the gateway.
async fn follow_invalidations(gw: std::sync::Weak<Gateway>, shared: Arc<RedisCache>) {
    let mut seen = None;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let Some(gw) = gw.upgrade() else { return };
        if let Some(generation) = shared.generation().await {
            if seen.is_some_and(|s| s != generation) {
                if let Some(cache) = &gw.cache {
                    cache.invalidate_all();
                }
            }
            seen = Some(generation);
        }
    }
}

/// Runs the proxy and its admin listener on already-bound listeners until `shutdown`
/// completes, then drains within the configured grace period.
pub async fn run(
    config: &ServeConfig,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let accounts = accounts(config).await?;
    serve_accounts(config, accounts, listener, admin, shutdown).await
}

/// [`run`] in single-account mode with a gateway built by the caller (who may keep a handle on
/// it).
pub async fn serve(
    config: &ServeConfig,
    gw: Arc<Gateway>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let accounts = Arc::new(Accounts::single(gw));
    serve_accounts(config, accounts, listener, admin, shutdown).await
}

/// [`run`] with gateways built by the caller (see [`accounts`]).
pub async fn serve_accounts(
    config: &ServeConfig,
    gw: Arc<Accounts>,
    listener: TcpListener,
    admin: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let admin_rx = rx.clone();
    let secret = config.webhook_secret.as_deref().map(Arc::from);
    // The console follows the first account, with its own budget.
    let first = config.accounts.first().map(|a| config.for_account(a));
    let settings = console::ConsoleSettings::of(first.as_ref().unwrap_or(config));
    let console = console::Console::start(settings, gw.front());
    let admin_task = tokio::spawn(server::run_admin(
        admin,
        gw.clone(),
        secret,
        console,
        async move {
            let mut rx = admin_rx;
            let _ = rx.wait_for(|stop| *stop).await;
        },
    ));
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let mut rx = rx;
    let stop = async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let served = server::run(listener, gw, stop, config.shutdown_grace).await;
    if served.is_err() {
        // The admin listener stops with the proxy.
        admin_task.abort();
    }
    let _ = admin_task.await;
    served
}

/// Raises the soft limit on open files to the hard limit. A server holds a descriptor per
/// connection, client and upstream; the usual soft limit of 1024 is below what
/// `--max-connections` lets in. Returns the old
/// and new soft limits when it changed.
#[cfg(target_os = "linux")]
pub fn raise_open_files_limit() -> Result<Option<(u64, u64)>, String> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is unlimited: nothing to raise, or (for the hard limit, which Linux caps at
    // `fs.nr_open` anyway) no number to raise to.
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return Ok(None);
    };
    if hard <= soft {
        return Ok(None);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )
    .map_err(|e| format!("cannot raise the open-files limit from {soft}: {e}"))?;
    Ok(Some((soft, hard)))
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
