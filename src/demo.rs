//! `kommo-fanout demo`: the simulated account and the proxy in one process, and requests to try.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures::FutureExt;
use kommo_fanout::config::ServeConfig;
use kommo_sim::{Sim, SimConfig, DEMO_TOKEN};

use super::bind;

/// Flags of `demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Where the simulated account listens.
    #[arg(
        long,
        env = "KOMMO_FANOUT_SIM_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub sim_listen: SocketAddr,
    /// Where the proxy listens.
    #[arg(long, env = "KOMMO_FANOUT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the admin endpoints listen.
    #[arg(
        long,
        env = "KOMMO_FANOUT_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: SocketAddr,
    /// Leads in the simulated account.
    #[arg(long, env = "KOMMO_FANOUT_LEADS", default_value_t = 20_000)]
    pub leads: usize,
    /// Simulated upstream latency per request.
    #[arg(long, env = "KOMMO_FANOUT_LATENCY", default_value = "80ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Do not start the demo's own load (a few simulated dashboards polling multi-stage views).
    #[arg(long)]
    pub no_load: bool,
}

/// Runs the demo until `shutdown` completes.
pub async fn run(
    args: DemoArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let sim = Sim::new(SimConfig {
        leads: args.leads,
        latency: args.latency,
        ..SimConfig::default()
    });
    let sim_listener = bind(args.sim_listen).await?;
    let listener = bind(args.listen).await?;
    let admin = bind(args.admin_listen).await?;
    let sim_addr = sim_listener.local_addr().map_err(|e| e.to_string())?;
    let proxy_addr = listener.local_addr().map_err(|e| e.to_string())?;

    let mut config = ServeConfig::for_upstream(&format!("http://{sim_addr}"))?;
    config.listen = proxy_addr;
    config.admin_listen = admin.local_addr().map_err(|e| e.to_string())?;

    // Both servers stop when `shutdown` completes.
    let shutdown = shutdown.shared();
    let sim_task = tokio::spawn(sim.clone().run(sim_listener, shutdown.clone()));
    let (proxy, upstream) = (format!("http://{proxy_addr}"), format!("http://{sim_addr}"));
    println!(
        "{}",
        instructions(&sim, &proxy, &upstream, &config, !args.no_load)
    );
    let load = (!args.no_load).then(|| tokio::spawn(dashboards(proxy.clone(), views(&sim))));
    let served = kommo_fanout::run(&config, listener, admin, shutdown).await;
    if let Some(load) = load {
        load.abort();
    }
    served?;
    let _ = sim_task.await;
    Ok(())
}

/// A stage: `(pipeline_id, status_id)`.
type Stage = (i64, i64);

/// The stages of the demo's views: per pipeline its first two stages and Won (142); and Won
/// alone in every pipeline.
fn stage_pairs(sim: &Sim) -> (Vec<Stage>, Vec<Stage>) {
    let pipelines = sim.pipelines();
    let mut pairs = Vec::new();
    for p in &pipelines {
        for s in p.statuses.iter().take(2) {
            pairs.push((p.id, s.id));
        }
        // Won (142) in every pipeline: the classic "all won deals" dashboard.
        pairs.push((p.id, 142));
    }
    let won = pipelines.iter().map(|p| (p.id, 142)).collect();
    (pairs, won)
}

/// `filter[statuses][i][...]` parameters of `pairs`.
fn stage_params(pairs: &[Stage]) -> String {
    pairs
        .iter()
        .enumerate()
        .map(|(i, (p, s))| {
            format!("filter[statuses][{i}][pipeline_id]={p}&filter[statuses][{i}][status_id]={s}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The multi-stage views the demo's dashboards poll (queries of `GET /api/v4/leads`).
fn views(sim: &Sim) -> Vec<String> {
    let (pairs, won) = stage_pairs(sim);
    let first = |n: usize| &pairs[..pairs.len().min(n)];
    vec![
        format!("{}&order[created_at]=desc&limit=50", stage_params(&won)),
        format!("{}&limit=25", stage_params(first(4))),
        format!("{}&order[updated_at]=desc&limit=10", stage_params(first(6))),
        format!("{}&limit=100", stage_params(&pairs)),
    ]
}

/// A few dashboards polling `views` through the proxy at `proxy` with the demo token, so the
/// console shows the budget being spent: each polls its view every two seconds, walking its
/// first three pages (the cache absorbs the repeats until they expire), and the last asks for
/// its whole view fresh (`Cache-Control: no-cache`) every ten seconds, a burst the limiter
/// spreads at 7 a second. Runs until aborted; failures are ignored (the console counts them).
async fn dashboards(proxy: String, views: Vec<String>) {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let last = views.len().saturating_sub(1);
    let polls = views.into_iter().enumerate().map(|(i, view)| {
        let (client, proxy) = (client.clone(), proxy.clone());
        async move {
            // Dashboards started together would poll in step; spread them over the period.
            tokio::time::sleep(Duration::from_millis(500 * i as u64)).await;
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            for n in 0u64.. {
                tick.tick().await;
                let fresh = i == last && n % 5 == 0;
                let page = n % 3 + 1;
                let uri = format!("{proxy}/api/v4/leads?{view}&page={page}");
                let mut req = http::Request::get(uri)
                    .header(http::header::AUTHORIZATION, format!("Bearer {DEMO_TOKEN}"));
                if fresh {
                    req = req.header(http::header::CACHE_CONTROL, "no-cache");
                }
                let Ok(req) = req.body(Empty::new()) else {
                    return;
                };
                if let Ok(resp) = client.request(req).await {
                    let _ = resp.into_body().collect().await;
                }
            }
        }
    });
    futures::future::join_all(polls).await;
}

/// The text the demo prints: where things run and `curl` lines built from the account's real
/// pipelines.
fn instructions(
    sim: &Sim,
    proxy: &str,
    upstream: &str,
    config: &ServeConfig,
    load: bool,
) -> String {
    let pipelines = sim.pipelines();
    let (pairs, won) = stage_pairs(sim);
    let auth = format!("-H 'Authorization: Bearer {DEMO_TOKEN}'");
    let load = if load {
        format!("  load:                    {} simulated dashboards polling multi-stage views (off with --no-load)\n", views(sim).len())
    } else {
        String::new()
    };
    format!(
        "kommo-fanout demo\n  console:                 http://{}/\n  simulated Kommo account: {upstream} ({} pipelines)\n  proxy:                   {proxy}\n  admin:                   http://{}/healthz\n{load}\n\
         Try (the proxy answers exactly as Kommo would, for many stages at once):\n\n\
         # Won deals of every pipeline, newest first, one merged page:\ncurl -sg {auth} '{proxy}/api/v4/leads?{}&order[created_at]=desc&limit=5'\n\n\
         # Six stages across pipelines, page 2 of 10, with contacts:\ncurl -sg {auth} '{proxy}/api/v4/leads?{}&with=contacts&limit=10&page=2'\n\n\
         # What Kommo itself says to more than one stage (the reason this proxy exists):\ncurl -sg {auth} '{upstream}/api/v4/leads?{}'\n\n\
         # A mistake gets a problem+json that names it:\ncurl -sg {auth} '{proxy}/api/v4/leads?filter[statuses][0][pipeline_id]=x&limit=500'\n\n\
         # Everything else passes through:\ncurl -sg {auth} '{proxy}/api/v4/leads/pipelines'\n\nStop with Ctrl-C.\n",
        config.admin_listen,
        pipelines.len(),
        config.admin_listen,
        stage_params(&won),
        stage_params(&pairs[..pairs.len().min(6)]),
        stage_params(&won[..won.len().min(2)]),
    )
}
