//! Live views against the answer cache and no cache: a polled dashboard, four ways side by side.
//!
//! `cargo bench --bench live_views` (5 measured minutes plus the replica's load; `-- --minutes
//! M` for another length, `-- --leads N` for another account size) starts everything in this
//! process on `127.0.0.1` with free ports and prints a markdown report; a run of the default
//! length and size also puts it in BENCHMARKS.md as its `Live views` section. Under
//! `cargo test --all-targets` (no `--bench` argument) it exits at once.
//!
//! Four lanes run at once, so whatever else the machine runs falls on all of them alike. Each
//! lane is a simulated Kommo account (`Sim`, 100 000 leads by default, all four built from the
//! same seed, 2 background changes per second, 80 ms ± 20 ms latency, Kommo's limit of 7
//! requests in any 1 s) with its own in-process proxy (the real wiring, the default limiter of 7
//! per 1 s and the default `--max-wait`):
//!
//! - **no cache**: `cache.ttl = 0`;
//! - **TTL cache 30 s** (the default TTL) and **TTL cache 5 s** (the freshness of live views);
//! - **live views**: `--sync` with a 5 s interval and a 15 s max staleness, the cache off.
//!
//! The live lane's replica is started by one view request and loaded before anything is
//! measured (its upstream requests and time are reported apart). Then every lane is polled by
//! the same dashboard: 10 views of 8 stages each (different stage sets, orders, limits, a few
//! filters), each view asked every 5 s on a fixed schedule whatever the answers take (a slow
//! answer does not delay the next poll, as a dashboard's timer does not), the views spread over
//! the 5 s.
//!
//! **Freshness.** Every 10 s (at a phase that varies against the poll schedule) the bench moves
//! one lead into a stage of one of the views ordered by `updated_at` descending, in all four
//! accounts at the same moment (`Sim::move_lead`, which gives it the newest `updated_at`), and
//! takes the time from that moment to the first answer of that view whose page shows the lead
//! in its new stage. Moves stop early enough before the end for the slowest lane to show them.
//!
//! For each lane: upstream requests per minute in the measured period (the simulator's own
//! log), the simulator's 429s and the most requests that arrived within any 1 s, the answers
//! that were refused (anything but 2xx, or no answer) or took longer than `--max-wait`, p50 and
//! p99 answer latency, p50 and p99 freshness, and for live views the replica's bytes per 100 000
//! leads (admin `GET /sync`). The targets are checked against what was measured.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kommo_fanout::config::ServeConfig;
use kommo_fanout::sync::live::SyncSettings;
use kommo_sim::{Sim, SimConfig, SimHandle, SimRateLimit, DEMO_TOKEN};
use serde::Deserialize;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// Kommo's limit, enforced by the simulators and by each proxy's limiter: this many per window.
const RATE: u32 = 7;
/// The rate window.
const WINDOW: Duration = Duration::from_secs(1);
/// The simulators' answer delay and its jitter (each delay uniform in `LATENCY ± JITTER`).
const LATENCY: Duration = Duration::from_millis(80);
const JITTER: Duration = Duration::from_millis(20);
/// Background changes per second in each account.
const CHURN: f64 = 2.0;
/// How often the dashboard asks each view.
const POLL: Duration = Duration::from_secs(5);
/// Stages per view.
const STAGES_PER_VIEW: usize = 8;
/// How often a tracked change is made.
const MOVE_EVERY: Duration = Duration::from_secs(10);
/// No tracked change is made this close to the end: the 30 s TTL lane needs up to a TTL and a
/// poll to show one.
const MOVE_MARGIN: Duration = Duration::from_secs(45);
/// The live lane's `--sync-interval` and `--sync-max-staleness`.
const SYNC_INTERVAL: Duration = Duration::from_secs(5);
const SYNC_MAX_STALENESS: Duration = Duration::from_secs(15);
/// The longest the bench waits for the live replica's load.
const LOAD_DEADLINE: Duration = Duration::from_secs(20 * 60);
/// The longest the bench's client waits for one answer (past the proxy's own request timeout).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);
/// The proxy's `--max-wait` (its default): an answer slower than this waited past it.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// The `Authorization` header of every request (the simulator's demo token).
const AUTH: &str = "Bearer demo-token";

/// The dashboard's views, besides their stages: order, page size, filters. `{recent}` stands
/// for a `created_at` 30 days before the account's clock. The views ordered by `updated_at`
/// descending without filters are the tracked ones: a moved lead tops them.
const VIEW_PARAMS: [&str; 10] = [
    "order[updated_at]=desc&limit=250",
    "order[created_at]=desc&limit=250",
    "order[updated_at]=desc&limit=100",
    "order[id]=asc&limit=50",
    "order[updated_at]=desc&limit=250&filter[responsible_user_id][]=1001\
     &filter[responsible_user_id][]=1002&filter[responsible_user_id][]=1003",
    "order[created_at]=asc&limit=250",
    "order[updated_at]=desc&limit=50",
    "order[id]=desc&limit=250&filter[price][from]=1000&filter[price][to]=100000",
    "order[updated_at]=asc&limit=100",
    "order[created_at]=desc&limit=250&filter[created_at][from]={recent}",
];

type Http = Client<HttpConnector, Empty<Bytes>>;

/// The command line after `--bench`.
struct Args {
    minutes: f64,
    leads: usize,
}

impl Args {
    fn parse() -> Args {
        let mut args = Args {
            minutes: 5.0,
            leads: 100_000,
        };
        let all: Vec<String> = std::env::args().collect();
        let value = |i: usize| all.get(i + 1).map(String::as_str).unwrap_or_default();
        for (i, a) in all.iter().enumerate() {
            match a.as_str() {
                "--minutes" => {
                    args.minutes = value(i)
                        .parse()
                        .ok()
                        .filter(|m: &f64| *m > 0.0)
                        .expect("--minutes takes a positive number")
                }
                "--leads" => {
                    args.leads = value(i)
                        .parse()
                        .ok()
                        .filter(|n: &usize| *n >= 1000)
                        .expect("--leads takes a number of at least 1000")
                }
                _ => {}
            }
        }
        args
    }

    fn measured(&self) -> Duration {
        Duration::from_secs_f64(self.minutes * 60.0)
    }
}

/// How a lane's proxy answers the dashboard.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    NoCache,
    Ttl(u64),
    Live,
}

impl Way {
    const ALL: [Way; 4] = [Way::NoCache, Way::Ttl(30), Way::Ttl(5), Way::Live];

    fn label(self) -> String {
        match self {
            Way::NoCache => "no cache (`cache.ttl = 0`)".into(),
            Way::Ttl(s) => format!("TTL cache {s} s"),
            Way::Live => "live views (`--sync`, 5 s interval, cache off)".into(),
        }
    }

    /// The proxy's configuration for this way, in front of `upstream`.
    fn config(self, upstream: &str) -> ServeConfig {
        let mut config = ServeConfig::for_upstream(upstream).expect("a valid configuration");
        // Four proxies of four accounts in one process: the lock file only matters to
        // processes taking over one account's budget from each other.
        config.limiter_lock = None;
        match self {
            Way::NoCache => config.cache.ttl = Duration::ZERO,
            Way::Ttl(s) => config.cache.ttl = Duration::from_secs(s),
            Way::Live => {
                config.cache.ttl = Duration::ZERO;
                config.sync = Some(SyncSettings {
                    interval: SYNC_INTERVAL,
                    max_staleness: SYNC_MAX_STALENESS,
                    with: Vec::new(),
                    max_bytes: 512 * 1024 * 1024,
                    idle: Duration::from_secs(600),
                    reconcile: Duration::from_secs(3600),
                });
            }
        }
        assert_eq!(config.fetch.max_wait, MAX_WAIT, "the default --max-wait");
        assert_eq!(
            (config.limiter.requests, config.limiter.window),
            (RATE, WINDOW)
        );
        config
    }
}

/// One simulated account, its proxy and what the dashboard saw through it.
struct Lane {
    way: Way,
    sim: SimHandle,
    proxy: String,
    admin: String,
    client: Http,
    polls: Mutex<Vec<Poll>>,
    moves: Mutex<Vec<Move>>,
    _stop: oneshot::Sender<()>,
}

/// One answer the dashboard got (or did not).
struct Poll {
    latency: Duration,
    /// `0`: no answer (connection failed or the bench's client gave up).
    status: u16,
    x_cache: Option<String>,
    /// The `Age` header: for an answer from the replica, seconds since its last delta.
    age: Option<u64>,
}

/// A tracked change and when the dashboard first showed it.
struct Move {
    view: usize,
    lead: i64,
    stage: (i64, i64),
    at: Instant,
    seen: Option<Duration>,
}

/// A view of the dashboard.
struct View {
    query: String,
    stages: Vec<(i64, i64)>,
    tracked: bool,
}

/// The leads of an answer, as far as freshness needs them.
#[derive(Deserialize)]
struct PageLeads {
    #[serde(rename = "_embedded")]
    embedded: EmbeddedLeads,
}

#[derive(Deserialize)]
struct EmbeddedLeads {
    leads: Vec<LeadStage>,
}

#[derive(Deserialize)]
struct LeadStage {
    id: i64,
    pipeline_id: i64,
    status_id: i64,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("live_views: skipped (not run by `cargo bench`; no load generated)");
        return;
    }
    assert_eq!(AUTH, format!("Bearer {DEMO_TOKEN}"));
    // Logs only when asked for, e.g. `RUST_LOG=live_views=info,kommo_fanout::sync=debug`.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = runtime.block_on(run(&args));
    println!("{report}");
    if args.minutes == 5.0 && args.leads == 100_000 {
        write_section(&report);
    } else {
        println!("(not the issue's 5 minutes of 100 000 leads: BENCHMARKS.md left as it is)");
    }
}

/// Puts `report` in BENCHMARKS.md in place of its `## Live views` section (or at its end).
fn write_section(report: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let (before, after) = match old.find("\n## Live views") {
        Some(at) => {
            let rest = &old[at + 1..];
            let end = rest.find("\n## ").map_or(old.len(), |e| at + 1 + e);
            (&old[..at], &old[end..])
        }
        None => (old.trim_end(), ""),
    };
    let text = format!("{before}\n\n{}\n{after}", report.trim_end());
    std::fs::write(&path, text).expect("write BENCHMARKS.md");
    println!("wrote the Live views section of {}", path.display());
}

fn sim_config(leads: usize) -> SimConfig {
    SimConfig {
        leads,
        latency: LATENCY,
        jitter: JITTER,
        churn: CHURN,
        rate_limit: Some(SimRateLimit {
            requests: RATE,
            window: WINDOW,
            // Counted, not punished: a lane that overspends shows 429s and the run goes on.
            block_after: 1000,
            block_for: Duration::from_secs(1),
        }),
        ..SimConfig::default()
    }
}

async fn start_lane(way: Way, leads: usize) -> Lane {
    let sim = Sim::spawn(sim_config(leads))
        .await
        .expect("simulator starts");
    let config = way.config(&sim.base_url());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = format!("http://{}", listener.local_addr().expect("bound"));
    let admin_url = format!("http://{}", admin.local_addr().expect("bound"));
    let gateway = kommo_fanout::gateway(&config)
        .await
        .expect("gateway builds");
    let (stop, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        kommo_fanout::serve(&config, gateway, listener, admin, async move {
            let _ = rx.await;
        })
        .await
        .expect("the proxy serves");
    });
    Lane {
        way,
        sim,
        proxy,
        admin: admin_url,
        client: Client::builder(TokioExecutor::new()).build_http(),
        polls: Mutex::default(),
        moves: Mutex::default(),
        _stop: stop,
    }
}

/// An answer read to the end.
struct Answer {
    status: StatusCode,
    x_cache: Option<String>,
    age: Option<u64>,
    body: Bytes,
}

/// `GET url`, read to the end.
async fn get(client: &Http, url: &str) -> Result<Answer, String> {
    let req = Request::get(url)
        .header(http::header::AUTHORIZATION, AUTH)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let header = |name: &str| {
        let value = resp.headers().get(name)?.to_str().ok()?;
        Some(value.to_string())
    };
    let x_cache = header("x-cache");
    let age = header("age").and_then(|a| a.parse().ok());
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Answer {
        status,
        x_cache,
        age,
        body,
    })
}

/// The admin `GET /sync` report of a lane.
async fn sync_report(lane: &Lane) -> Value {
    let answer = get(&lane.client, &format!("{}/sync", lane.admin))
        .await
        .expect("GET /sync answers");
    assert_eq!(answer.status, StatusCode::OK, "GET /sync");
    serde_json::from_slice(&answer.body).expect("GET /sync is JSON")
}

/// The first replica of a `/sync` report.
fn first_replica(report: &Value) -> Option<&Value> {
    report["replicas"].as_array()?.first()
}

/// The dashboard: 10 views of 8 stages over the stages that hold leads.
fn dashboard(sim: &Sim) -> Vec<View> {
    let mut stages: Vec<(i64, i64)> = sim
        .leads()
        .iter()
        .filter(|l| !l.is_deleted)
        .map(|l| (l.pipeline_id, l.status_id))
        .collect();
    stages.sort_unstable();
    stages.dedup();
    let per_view = STAGES_PER_VIEW.min(stages.len());
    let recent = (sim.now_ts() - 30 * 86_400).to_string();
    VIEW_PARAMS
        .iter()
        .enumerate()
        .map(|(v, params)| {
            let set: Vec<(i64, i64)> = (0..per_view)
                .map(|j| stages[(v * 3 + j) % stages.len()])
                .collect();
            let pairs: Vec<String> = set
                .iter()
                .enumerate()
                .map(|(i, (p, s))| {
                    format!(
                        "filter[statuses][{i}][pipeline_id]={p}&filter[statuses][{i}][status_id]={s}"
                    )
                })
                .collect();
            View {
                query: format!("{}&{}", pairs.join("&"), params.replace("{recent}", &recent)),
                stages: set,
                tracked: params.starts_with("order[updated_at]=desc") && !params.contains("filter"),
            }
        })
        .collect()
}

/// What the live lane's load took.
struct Load {
    took: Duration,
    /// From the first view request to the end of the first delta after the load.
    with_first_delta: Duration,
    /// Upstream requests the simulator saw from the first view request to the replica's
    /// `live` state.
    upstream: usize,
    /// Of them, the sync's own (from `/sync`).
    sync: u64,
    leads: u64,
    bytes: u64,
}

/// Starts the live lane's replica with one view request and waits for it to be live and for
/// its first delta: that delta reads again the leads changed while the load ran and in the
/// overlap before it (with the simulator's seed, every lead whose `updated_at` is the account's
/// start time), a cost of the load that the measured period should not carry.
async fn load_replica(lane: &Lane, view: &View) -> Load {
    lane.sim.clear_requests();
    let started = Instant::now();
    let first = get(
        &lane.client,
        &format!("{}/api/v4/leads?{}", lane.proxy, view.query),
    )
    .await
    .expect("the first view answers");
    assert_eq!(first.status, StatusCode::OK, "the first view request");
    let deadline = started + LOAD_DEADLINE;
    let mut loaded_at = None;
    loop {
        let report = sync_report(lane).await;
        if let Some(r) = first_replica(&report).filter(|r| r["state"] == "live") {
            let watermark = r["watermark"].as_i64();
            match loaded_at {
                None => loaded_at = Some((watermark, started.elapsed())),
                Some((at, took)) if at != watermark => {
                    return Load {
                        took,
                        with_first_delta: started.elapsed(),
                        upstream: lane.sim.request_count(),
                        sync: r["upstream_requests"].as_u64().unwrap_or(0),
                        leads: r["leads"].as_u64().unwrap_or(0),
                        bytes: r["bytes"].as_u64().unwrap_or(0),
                    };
                }
                Some(_) => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not load within {LOAD_DEADLINE:?}: {report}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

/// One poll of one view; a tracked view's answer is checked against the pending moves.
async fn poll(lane: Arc<Lane>, view: Arc<View>, v: usize) {
    let url = format!("{}/api/v4/leads?{}", lane.proxy, view.query);
    let sent = Instant::now();
    let got = timeout(CLIENT_TIMEOUT, get(&lane.client, &url)).await;
    let done = Instant::now();
    let poll = match got {
        Ok(Ok(answer)) => {
            if view.tracked && answer.status == StatusCode::OK {
                see_moves(&lane, v, &answer.body, done);
            }
            Poll {
                latency: done - sent,
                status: answer.status.as_u16(),
                x_cache: answer.x_cache,
                age: answer.age,
            }
        }
        _ => Poll {
            latency: done - sent,
            status: 0,
            x_cache: None,
            age: None,
        },
    };
    lock(&lane.polls).push(poll);
}

/// Marks the moves into view `v` that this answer, read at `done`, shows.
fn see_moves(lane: &Lane, v: usize, body: &[u8], done: Instant) {
    let mut moves = lock(&lane.moves);
    if !moves
        .iter()
        .any(|m| m.view == v && m.seen.is_none() && m.at < done)
    {
        return;
    }
    let Ok(page) = serde_json::from_slice::<PageLeads>(body) else {
        return;
    };
    for m in moves
        .iter_mut()
        .filter(|m| m.view == v && m.seen.is_none() && m.at < done)
    {
        let shown = page
            .embedded
            .leads
            .iter()
            .any(|l| l.id == m.lead && (l.pipeline_id, l.status_id) == m.stage);
        if shown {
            m.seen = Some(done - m.at);
            tracing::info!(
                target: "live_views",
                lane = %lane.way.label(),
                lead = m.lead,
                view = v,
                seconds = (done - m.at).as_secs_f64(),
                "tracked change shown"
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Polls every view of every lane on its schedule from `t0` until `end`.
async fn poll_all(lanes: &[Arc<Lane>], views: &[Arc<View>], t0: Instant, end: Instant) {
    let mut tasks = JoinSet::new();
    for lane in lanes {
        for (v, view) in views.iter().enumerate() {
            let (lane, view) = (lane.clone(), view.clone());
            let first = t0 + POLL.mul_f64(v as f64 / views.len() as f64);
            tasks.spawn(async move {
                let mut polls = JoinSet::new();
                let mut at = first;
                while at < end {
                    sleep_until(at).await;
                    polls.spawn(poll(lane.clone(), view.clone(), v));
                    at += POLL;
                }
                while polls.join_next().await.is_some() {}
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Every `MOVE_EVERY`, at a phase that walks across the poll period, moves one lead into a
/// stage of a tracked view, in every lane at once.
async fn move_leads(lanes: &[Arc<Lane>], views: &[Arc<View>], t0: Instant, last: Instant) {
    let tracked: Vec<usize> = (0..views.len()).filter(|&v| views[v].tracked).collect();
    // The accounts are built from one seed: the first one's leads stand for all four.
    let initial: Vec<(i64, (i64, i64))> = lanes[0]
        .sim
        .leads()
        .iter()
        .filter(|l| !l.is_deleted)
        .map(|l| (l.id, (l.pipeline_id, l.status_id)))
        .collect();
    let mut cursor = 0usize;
    for k in 0u32.. {
        let phase = POLL.mul_f64((f64::from(k) * 0.37).fract());
        let at = t0 + MOVE_EVERY * k + phase;
        if at > last {
            break;
        }
        sleep_until(at).await;
        let v = tracked[k as usize % tracked.len()];
        let stages = &views[v].stages;
        let stage = stages[(k as usize / tracked.len()) % stages.len()];
        let lead = loop {
            cursor = (cursor + 7919) % initial.len();
            let (id, from) = initial[cursor];
            if !stages.contains(&from) {
                break id;
            }
        };
        tracing::info!(
            target: "live_views",
            lead,
            view = v,
            ?stage,
            "tracked change"
        );
        for lane in lanes {
            if lane.sim.move_lead(lead, stage.0, stage.1) {
                lock(&lane.moves).push(Move {
                    view: v,
                    lead,
                    stage,
                    at: Instant::now(),
                    seen: None,
                });
            }
        }
    }
}

/// What one lane measured.
struct Row {
    way: Way,
    per_minute: f64,
    sync_per_minute: Option<f64>,
    too_many: usize,
    max_arrivals: usize,
    answers: usize,
    refused: usize,
    past_max_wait: usize,
    from_cache: usize,
    p50: Duration,
    p99: Duration,
    fresh_p50: Option<Duration>,
    fresh_p99: Option<Duration>,
    moves: usize,
    unseen: usize,
    bytes_per_100k: Option<f64>,
    /// The largest `Age` of an answer from the replica.
    max_age: Option<u64>,
}

/// Nearest rank: the smallest value with at least `p` of them at or below it.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The most of `times` within any `WINDOW`.
fn max_arrivals(times: &[Instant]) -> usize {
    let mut best = 0;
    let mut from = 0;
    for (i, &t) in times.iter().enumerate() {
        while t - times[from] >= WINDOW {
            from += 1;
        }
        best = best.max(i + 1 - from);
    }
    best
}

/// The live replica as admin `GET /sync` reported it at the end of the measured period.
struct ReplicaAtEnd {
    /// The sync's upstream requests within the measured period.
    sync: u64,
    leads: u64,
    bytes: u64,
}

fn measure(lane: &Lane, t0: Instant, end: Instant, replica: Option<&ReplicaAtEnd>) -> Row {
    let minutes = (end - t0).as_secs_f64() / 60.0;
    let requests = lane.sim.requests();
    let mut arrivals: Vec<Instant> = requests.iter().map(|r| r.at).collect();
    arrivals.sort_unstable();
    let upstream = requests.iter().filter(|r| r.at >= t0 && r.at < end).count();
    let too_many = requests
        .iter()
        .filter(|r| r.at >= t0 && r.status == 429)
        .count();
    let sync_per_minute = replica.map(|r| r.sync as f64 / minutes);
    let bytes_per_100k = replica
        .filter(|r| r.leads > 0)
        .map(|r| r.bytes as f64 * 100_000.0 / r.leads as f64);
    let polls = lock(&lane.polls);
    let mut ok: Vec<Duration> = polls
        .iter()
        .filter(|p| (200..300).contains(&p.status))
        .map(|p| p.latency)
        .collect();
    ok.sort_unstable();
    let moves = lock(&lane.moves);
    let mut fresh: Vec<Duration> = moves.iter().filter_map(|m| m.seen).collect();
    fresh.sort_unstable();
    Row {
        way: lane.way,
        per_minute: upstream as f64 / minutes,
        sync_per_minute,
        too_many,
        max_arrivals: max_arrivals(&arrivals),
        answers: polls.len(),
        refused: polls
            .iter()
            .filter(|p| !(200..300).contains(&p.status))
            .count(),
        past_max_wait: polls.iter().filter(|p| p.latency > MAX_WAIT).count(),
        from_cache: polls
            .iter()
            .filter(|p| matches!(p.x_cache.as_deref(), Some("HIT" | "SYNC")))
            .count(),
        p50: percentile(&ok, 0.5).unwrap_or_default(),
        p99: percentile(&ok, 0.99).unwrap_or_default(),
        fresh_p50: percentile(&fresh, 0.5),
        fresh_p99: percentile(&fresh, 0.99),
        moves: moves.len(),
        unseen: moves.iter().filter(|m| m.seen.is_none()).count(),
        bytes_per_100k,
        max_age: polls
            .iter()
            .filter(|p| p.x_cache.as_deref() == Some("SYNC"))
            .filter_map(|p| p.age)
            .max(),
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("n/a".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn run(args: &Args) -> String {
    let started = Instant::now();
    eprintln!(
        "live_views: four accounts of {} leads, {} measured minute(s)",
        args.leads, args.minutes
    );
    let mut lanes = Vec::new();
    for way in Way::ALL {
        lanes.push(Arc::new(start_lane(way, args.leads).await));
    }
    let views: Vec<Arc<View>> = dashboard(&lanes[0].sim).into_iter().map(Arc::new).collect();
    let live = lanes
        .iter()
        .find(|l| l.way == Way::Live)
        .expect("a live lane")
        .clone();
    eprintln!("loading the live replica");
    let load = load_replica(&live, &views[0]).await;
    eprintln!(
        "replica live after {:.1} s, {} upstream requests",
        load.took.as_secs_f64(),
        load.upstream
    );
    let sync_at_t0 = first_replica(&sync_report(&live).await)
        .and_then(|r| r["upstream_requests"].as_u64())
        .unwrap_or(0);
    let t0 = Instant::now() + Duration::from_millis(500);
    let end = t0 + args.measured();
    let last_move = end.checked_sub(MOVE_MARGIN).unwrap_or(t0).max(t0);
    eprintln!("polling {} views on 4 lanes", views.len());
    let ((), (), at_end) = tokio::join!(
        poll_all(&lanes, &views, t0, end),
        move_leads(&lanes, &views, t0, last_move),
        async {
            sleep_until(end).await;
            sync_report(&live).await
        }
    );
    let replica = first_replica(&at_end).map(|r| ReplicaAtEnd {
        sync: r["upstream_requests"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(sync_at_t0),
        leads: r["leads"].as_u64().unwrap_or(0),
        bytes: r["bytes"].as_u64().unwrap_or(0),
    });
    let mut rows = Vec::new();
    for lane in &lanes {
        let replica = replica.as_ref().filter(|_| lane.way == Way::Live);
        rows.push(measure(lane, t0, end, replica));
    }
    render(args, &views, &load, &rows, started.elapsed())
}

fn render(args: &Args, views: &[Arc<View>], load: &Load, rows: &[Row], took: Duration) -> String {
    let mut out = String::new();
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let minutes = args.minutes;
    let _ = writeln!(
        out,
        "## Live views\n\n\
         `cargo bench --bench live_views -- --minutes {minutes}` ({date}, {cpus} CPUs, the whole \
         run {:.0} s). Four lanes at once, each a simulated account of {} leads (one seed, \
         {CHURN} changes/s, {} ms ± {} ms latency, {RATE} requests in any 1 s) and its own \
         in-process proxy (default limiter {RATE} per 1 s, default `--max-wait` {} s). A \
         dashboard of {} views x {STAGES_PER_VIEW} stages, each view polled every {} s for \
         {minutes} minute(s); a tracked lead moved into a polled view every {} s.\n",
        took.as_secs_f64(),
        args.leads,
        LATENCY.as_millis(),
        JITTER.as_millis(),
        MAX_WAIT.as_secs(),
        views.len(),
        POLL.as_secs(),
        MOVE_EVERY.as_secs(),
    );
    let _ = writeln!(
        out,
        "Live replica load (before the measured period): {:.1} s from the first view request \
         to `live`, {:.1} s to the end of the first delta after it (which reads again what \
         changed during the load and in the overlap before it); {} upstream requests until \
         then ({} of them the sync's, the rest the first view's fan-out), {} leads, {} bytes.\n",
        load.took.as_secs_f64(),
        load.with_first_delta.as_secs_f64(),
        load.upstream,
        load.sync,
        load.leads,
        load.bytes
    );
    out.push_str(
        "| way | upstream req/min | of them sync | sim 429s | max arrivals in 1 s | answers | \
         refused | past --max-wait | cache/replica answers | p50 ms | p99 ms | freshness p50 s | \
         freshness p99 s | changes shown | replica max Age s | replica bytes per 100k leads |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {} | {} | {} | {} | {} | {} | {:.1}% | {} | {} | {} | {} | {}/{} | {} | {} |",
            r.way.label(),
            r.per_minute,
            r.sync_per_minute
                .map_or("-".into(), |s| format!("{s:.1}")),
            r.too_many,
            r.max_arrivals,
            r.answers,
            r.refused,
            r.past_max_wait,
            r.from_cache as f64 * 100.0 / r.answers.max(1) as f64,
            ms(r.p50),
            ms(r.p99),
            secs(r.fresh_p50),
            secs(r.fresh_p99),
            r.moves - r.unseen,
            r.moves,
            r.max_age.map_or("-".into(), |a| a.to_string()),
            r.bytes_per_100k
                .map_or("-".into(), |b| format!("{:.1} MiB", b / (1024.0 * 1024.0))),
        );
    }
    let by = |w: Way| rows.iter().find(|r| r.way == w);
    let (Some(live), Some(ttl30), Some(ttl5)) = (by(Way::Live), by(Way::Ttl(30)), by(Way::Ttl(5)))
    else {
        return out;
    };
    let verdict = |met: bool| if met { "yes" } else { "no" };
    let fresh99 = live.fresh_p99.filter(|_| live.unseen == 0);
    let limit = SYNC_INTERVAL * 2;
    out.push_str("\n| target | measured | met |\n|---|---|:---:|\n");
    let _ = writeln!(
        out,
        "| live views at most 1/20 of the upstream requests of the 5 s TTL cache | {:.1} vs \
         {:.1} req/min (1/20: {:.1}; ratio 1/{:.1}) | {} |",
        live.per_minute,
        ttl5.per_minute,
        ttl5.per_minute / 20.0,
        ttl5.per_minute / live.per_minute.max(f64::MIN_POSITIVE),
        verdict(live.per_minute <= ttl5.per_minute / 20.0)
    );
    let demand = views.len() * STAGES_PER_VIEW * 60 / POLL.as_secs() as usize;
    let _ = writeln!(
        out,
        "| the same against what the 5 s TTL cache needs for that freshness ({} views x \
         {STAGES_PER_VIEW} stages every {} s; the limiter caps what it gets at {} a minute) | \
         {:.1} vs {demand} req/min (ratio 1/{:.1}) | {} |",
        views.len(),
        POLL.as_secs(),
        RATE as u64 * 60,
        live.per_minute,
        demand as f64 / live.per_minute.max(f64::MIN_POSITIVE),
        verdict(live.per_minute <= demand as f64 / 20.0)
    );
    let _ = writeln!(
        out,
        "| live views fewer upstream requests than the 30 s TTL cache | {:.1} vs {:.1} req/min \
         | {} |",
        live.per_minute,
        ttl30.per_minute,
        verdict(live.per_minute < ttl30.per_minute)
    );
    let _ = writeln!(
        out,
        "| live views p99 freshness under 2 intervals ({} s) | {} s ({} of {} changes shown) | {} |",
        limit.as_secs(),
        secs(live.fresh_p99),
        live.moves - live.unseen,
        live.moves,
        verdict(fresh99.is_some_and(|d| d < limit))
    );
    let held = rows
        .iter()
        .all(|r| r.too_many == 0 && r.max_arrivals <= RATE as usize);
    let _ = writeln!(
        out,
        "| Kommo's limit held on every lane (at most {RATE} arrivals in 1 s, no 429) | {} | {} |",
        rows.iter()
            .map(|r| format!("{} and {} 429s", r.max_arrivals, r.too_many))
            .collect::<Vec<_>>()
            .join("; "),
        verdict(held)
    );
    let _ = writeln!(
        out,
        "\nThe 5 s TTL cache would need about {demand} upstream requests a minute to refill \
         every view's {STAGES_PER_VIEW} stages each TTL ({} views x {STAGES_PER_VIEW} stages \
         every {} s, each a first page of at most 250 leads); the limiter holds every lane to at \
         most {} a minute ({RATE} per 1 s). Against that demand, live views spent 1/{:.1} of it. \
         A replica spends two upstream requests per interval (the leads changed since its last \
         delta, and the events feed for deletions and restores) plus one per batch of restored \
         leads that kept their `updated_at`, whatever the dashboard asks: one twentieth of what \
         the limiter lets the 5 s TTL cache spend is less than that at a 5 s interval.",
        views.len(),
        POLL.as_secs(),
        RATE as u64 * 60,
        demand as f64 / live.per_minute.max(f64::MIN_POSITIVE),
    );
    out.push_str(
        "\n- **upstream req/min**: requests each simulator logged within the measured period, \
         per minute; **of them sync**: the live replica's deltas (admin `GET /sync`, \
         `upstream_requests`).\n\
         - **max arrivals in 1 s**, **sim 429s**: over the whole run, the load included.\n\
         - **answers**: polls sent in the measured period (each answer read to the end, also \
         after the period); **refused**: anything but 2xx, or no answer within 90 s; **past \
         --max-wait**: answers, of any status, that took longer than 30 s.\n\
         - **cache/replica answers**: answers with `X-Cache: HIT` or `X-Cache: SYNC`.\n\
         - **p50/p99 ms**: latency of the 2xx answers, from sending the request to the last \
         byte.\n\
         - **freshness**: from a tracked `Sim::move_lead` to the end of the first answer of \
         that view that lists the lead in its new stage; the poll period is part of it (a \
         proxy that knew at once would still show a change 0 to 5 s after it). **changes \
         shown**: tracked changes some answer showed within the run, of those made. Percentiles \
         are nearest-rank: with fewer than 100 changes the p99 is the largest.\n\
         - **replica max Age**: the largest `Age` (seconds since the replica's last delta) of \
         an answer from the replica.\n\
         - **replica bytes**: the replica's own count (lead JSON plus index estimate) at the \
         end, per 100 000 leads; not the process's memory.\n",
    );
    out
}
