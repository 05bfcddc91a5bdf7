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
    println!("{}", instructions(&sim, &proxy, &upstream, &config));
    kommo_fanout::run(&config, listener, admin, shutdown).await?;
    let _ = sim_task.await;
    Ok(())
}

/// The text the demo prints: where things run and `curl` lines built from the account's real
/// pipelines.
fn instructions(sim: &Sim, proxy: &str, upstream: &str, config: &ServeConfig) -> String {
    let pipelines = sim.pipelines();
    let mut pairs = Vec::new();
    for p in &pipelines {
        for s in p.statuses.iter().take(2) {
            pairs.push((p.id, s.id));
        }
        // Won (142) in every pipeline: the classic "all won deals" dashboard.
        pairs.push((p.id, 142));
    }
    let stage_params = |pairs: &[(i64, i64)]| {
        pairs
            .iter()
            .enumerate()
            .map(|(i, (p, s))| {
                format!(
                    "filter[statuses][{i}][pipeline_id]={p}&filter[statuses][{i}][status_id]={s}"
                )
            })
            .collect::<Vec<_>>()
            .join("&")
    };
    let won: Vec<(i64, i64)> = pipelines.iter().map(|p| (p.id, 142)).collect();
    let auth = format!("-H 'Authorization: Bearer {DEMO_TOKEN}'");
    format!(
        "kommo-fanout demo\n  simulated Kommo account: {upstream} ({} pipelines)\n  proxy:                   {proxy}\n  admin:                   http://{}/healthz\n\n\
         Try (the proxy answers exactly as Kommo would, for many stages at once):\n\n\
         # Won deals of every pipeline, newest first, one merged page:\ncurl -sg {auth} '{proxy}/api/v4/leads?{}&order[created_at]=desc&limit=5'\n\n\
         # Six stages across pipelines, page 2 of 10, with contacts:\ncurl -sg {auth} '{proxy}/api/v4/leads?{}&with=contacts&limit=10&page=2'\n\n\
         # What Kommo itself says to more than one stage (the reason this proxy exists):\ncurl -sg {auth} '{upstream}/api/v4/leads?{}'\n\n\
         # A mistake gets a problem+json that names it:\ncurl -sg {auth} '{proxy}/api/v4/leads?filter[statuses][0][pipeline_id]=x&limit=500'\n\n\
         # Everything else passes through:\ncurl -sg {auth} '{proxy}/api/v4/leads/pipelines'\n\nStop with Ctrl-C.\n",
        pipelines.len(),
        config.admin_listen,
        stage_params(&won),
        stage_params(&pairs[..pairs.len().min(6)]),
        stage_params(&won[..won.len().min(2)]),
    )
}
