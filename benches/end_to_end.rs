//! End-to-end benchmark of the whole stack on loopback: what an integration sees.
//!
//! `cargo bench --bench end_to_end` (about 5 minutes; `-- --quick` for a ~80 s smoke run) starts
//! everything itself on `127.0.0.1` with free ports, drives it from its own async client
//! (hyper-util's pooled client; `wrk` for scenarios 2 and 4), prints a markdown report and
//! rewrites `BENCHMARKS.md` with it up to the `Live views` section, which it keeps (a `--quick`
//! run only prints). Under `cargo test
//! --all-targets` (no `--bench` argument) it exits at once without running any load.
//!
//! What is measured:
//!
//! 1. **Cold first page, K stages.** The simulated Kommo account (in-process `Sim`, 100 ms
//!    latency, its own limit of 7 requests in any 1 s, blocking only after 1000 consecutive 429s)
//!    sits behind the release proxy binary run as a child process (default limiter: 7 per 1 s).
//!    For K = 1, 2, 4, 7, 14, 30 distinct stages (padded with empty stages if the account has
//!    fewer), the time to the complete first page (`limit=50`, `order[created_at]=desc`) is taken
//!    (a) through the proxy, (b) by a sequential client loop straight to the simulator that does
//!    what integrations do today (one request per stage, honouring `429 retry_after`, merging
//!    locally), (c) by a concurrent loop straight to the simulator with no limiter (all stages
//!    at once, the 429-refused ones retried after `retry_after`), against (d) the floor:
//!    `ceil(K/7) - 1` full windows plus one 100 ms round trip, and the proxy also against (e)
//!    the safe floor of a client that counts a window from an answer, not from a send (one
//!    round trip per batch of 7 on top). Each K runs a few times and the median is reported;
//!    between runs the bench idles past the rate window so every run starts with an idle
//!    limiter and an empty simulator window (connections stay pooled). From the simulator's own
//!    request log: the upstream requests the proxy made, the most of them that arrived within
//!    any 1 s, and the 429s the proxy earned (must be <= 7 and 0). The three pages are compared
//!    lead by lead.
//! 2. **Pass-through overhead.** nginx serves a static ~2 KB JSON body; `wrk` (installed with
//!    apt-get when missing and running as root, else the bench's own client) hits it directly,
//!    through the proxy (limiter raised out of the way; its runtime with one worker thread per
//!    CPU, the default, and with `--worker-threads 1`), through a bare hyper relay (this binary
//!    run with `--bare-relay`: hyper's server and hyper-util's pooled client with none of the
//!    proxy's own work: about what the proxy would reach on its HTTP stack) and through a second
//!    nginx acting as a plain keep-alive reverse proxy (1 worker, and one per CPU): 32
//!    connections for throughput, 1 connection for the latency a hop adds without queueing.
//!    Requests/s, p50, p99, the CPU time the measured hop's processes spent per request
//!    (`/proc/PID/stat`), and wrk's own CPU time as a share of its core, which shows when the
//!    client rather than the target set the pace. nginx is installed the same way;
//!    without it those rows read `n/a`. Each target is warmed up, then measured in a few short
//!    rounds, the targets taking turns, so that a change in the machine's other load falls on
//!    all of them alike; the rows give the rounds' medians and range, the throughput ratios
//!    the median of the ratios within a round.
//! 3. **Peak RSS** (`VmHWM`) of each proxy child process when idle and after its scenario.
//! 4. **Cached answers.** 32 connections read one leads page from a warm cache: the proxy's
//!    answer cache for a single-stage page (`limit=250`, ~220 KB) and for a merged 5-stage page,
//!    and nginx `proxy_cache` in front of the same simulator for the same single-stage page
//!    (nginx cannot merge); the proxy with one worker thread per CPU and with one, nginx with
//!    one worker per CPU and with one, measured in rounds as in scenario 2; and the proxy on one
//!    thread against nginx with one worker for the same stage at the default `limit=50`
//!    (~45 KB), where the client has less to read and the caches' own work weighs more. Every
//!    measured answer must be a cache hit (`X-Cache: HIT` from the proxy, `X-Cache-Status: HIT`
//!    from nginx) and the simulator must see no request meanwhile.
//! 5. **Dashboard load.** 100 clients poll 5 multi-stage views (3 to 5 stages each) through the
//!    proxy with its default cache TTL (30 s; 4 s under `--quick` so entries expire within the
//!    run), in front of the simulator with its 7/s limit: upstream requests against the
//!    minimum (each view's stages once per TTL period), answers/s, latency, and the 429s the
//!    simulator gave (must be 0).
//!
//! 6. **Targets.** Each target the benchmark is held to, with this run's figure and whether it
//!    meets it, worked out from the scenarios above.
//!
//! **Before and after.** When `KOMMO_FANOUT_BENCH_BEFORE` names a proxy binary (an earlier
//! build that takes the same flags; `KOMMO_FANOUT_BENCH_BEFORE_LABEL` may name it in the
//! report, e.g. by its commit), the bench also runs that binary as "before", side by side with
//! the current one and in the same rounds: a before column per K in scenario 1, before rows in
//! scenarios 2 (one worker thread per CPU at 32 connections and at 1, `--worker-threads 1` at
//! 32), 3 and 4, and in the Targets section its figures beside the current ones and the
//! current / before ratios. Scenario 5 runs the current binary only. Without the variable
//! nothing of this runs.
//!
//! Logging is on an equal footing in the throughput scenarios (2, 4, 5): nginx runs with
//! `access_log off` and the proxy with `RUST_LOG=warn`, so neither writes a line per request.
//! Scenario 1 leaves the proxy at its default level.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kommo_sim::{Sim, SimConfig, SimHandle, SimRateLimit, DEMO_TOKEN};
use serde_json::Value;

/// The simulator's fixed answer delay: one upstream round trip.
const LATENCY: Duration = Duration::from_millis(100);
/// Kommo's limit, enforced by both the simulator and the proxy: this many per window.
const RATE: usize = 7;
/// The rate window.
const WINDOW: Duration = Duration::from_secs(1);
/// Idle time after each cold-page run: the window plus the proxy's slot margin and slack.
const COOL_DOWN: Duration = Duration::from_millis(1250);
/// The client's page size in scenario 1.
const PAGE: usize = 50;
/// Concurrent connections in scenario 2.
const CONNECTIONS: usize = 32;
/// The `Authorization` header every request carries (the simulator's demo token).
const AUTH: &str = "Bearer demo-token";
/// The path scenario 2 requests (not the leads list, so the proxy passes it through).
const PASS_PATH: &str = "/api/v4/account";
/// The environment that turns the proxy's response cache off, so every run of scenarios 1 and 2
/// measures the fan-out and the pass-through themselves (an environment variable, unlike a flag,
/// is harmless to a build without the cache).
const CACHE_OFF: (&str, &str) = ("KOMMO_FANOUT_CACHE_TTL", "0s");
/// The log filter of the proxy in the throughput scenarios: no line per request (nginx runs
/// with `access_log off`).
const QUIET: (&str, &str) = ("RUST_LOG", "warn");
/// Rendered for a row that could not be measured (nginx missing).
const NO_NGINX: &str = "n/a (nginx not available)";
/// The page size of the cached-answers scenario: Kommo's largest.
const CACHED_LIMIT: usize = 250;
/// The page size of its second single-stage page: the SDK's default. The largest page keeps
/// wrk busy copying bytes; at this size the caches' own work weighs more.
const DEFAULT_LIMIT: usize = 50;
/// Stages of the merged page in the cached-answers scenario.
const CACHED_STAGES: usize = 5;
/// The stage count of each dashboard view.
const VIEWS: [usize; 5] = [3, 4, 5, 3, 4];
/// Concurrent dashboard clients.
const DASHBOARD_CLIENTS: usize = 100;
/// The proxy's default `--cache-ttl` (the full dashboard run leaves the flag out).
const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// The TTL of the `--quick` dashboard run, short enough to expire within it.
const QUICK_TTL: Duration = Duration::from_secs(4);
/// Names an earlier proxy binary to measure as "before" beside the current one.
const BEFORE_ENV: &str = "KOMMO_FANOUT_BENCH_BEFORE";
/// A short name for it in the report (a commit id, say).
const BEFORE_LABEL_ENV: &str = "KOMMO_FANOUT_BENCH_BEFORE_LABEL";

type Http = Client<HttpConnector, Empty<Bytes>>;

/// How long each scenario runs.
struct Mode {
    quick: bool,
    ks: Vec<usize>,
    runs: usize,
    warmup: Duration,
    /// Scenarios 2 and 4 measure each target in this many rounds of `round` each.
    rounds: usize,
    round: Duration,
    dashboard: Duration,
}

impl Mode {
    fn from_args() -> Mode {
        if std::env::args().any(|a| a == "--quick") {
            Mode {
                quick: true,
                ks: vec![1, 7, 14],
                runs: 1,
                warmup: Duration::from_millis(500),
                rounds: 1,
                round: Duration::from_secs(2),
                dashboard: Duration::from_secs(8),
            }
        } else {
            Mode {
                quick: false,
                ks: vec![1, 2, 4, 7, 14, 30],
                runs: 3,
                warmup: Duration::from_millis(500),
                rounds: 3,
                round: Duration::from_secs(2),
                dashboard: Duration::from_secs(30),
            }
        }
    }

    /// The proxy's cache TTL in the dashboard scenario.
    fn dashboard_ttl(&self) -> Duration {
        if self.quick {
            QUICK_TTL
        } else {
            DEFAULT_TTL
        }
    }

    fn command(&self, before: Option<&Before>) -> String {
        let bench = if self.quick {
            "cargo bench --bench end_to_end -- --quick"
        } else {
            "cargo bench --bench end_to_end"
        };
        match before {
            Some(b) => format!("{BEFORE_ENV}={} {bench}", b.binary.display()),
            None => bench.to_string(),
        }
    }
}

/// The proxy binaries measured: the current one, and the "before" one when
/// `KOMMO_FANOUT_BENCH_BEFORE` names it.
struct Binaries {
    current: PathBuf,
    before: Option<Before>,
}

/// An earlier build of the proxy, run beside the current one in scenarios 1 to 4.
struct Before {
    binary: PathBuf,
    /// How the report names it: `before`, or `before (LABEL)`.
    label: String,
}

impl Before {
    /// From `KOMMO_FANOUT_BENCH_BEFORE` and `KOMMO_FANOUT_BENCH_BEFORE_LABEL`; `None` when the
    /// first is unset or empty.
    fn from_env() -> Option<Before> {
        let binary = PathBuf::from(std::env::var_os(BEFORE_ENV).filter(|v| !v.is_empty())?);
        assert!(
            binary.is_file(),
            "{BEFORE_ENV}={}: no such file",
            binary.display()
        );
        let label = match std::env::var(BEFORE_LABEL_ENV) {
            Ok(l) if !l.trim().is_empty() => format!("before ({})", l.trim()),
            _ => "before".to_string(),
        };
        Some(Before { binary, label })
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, listen, upstream] = &args[..] {
        if flag == BARE_RELAY {
            return bare_relay(listen, upstream);
        }
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("end_to_end: skipped (not run by `cargo bench`; no load generated)");
        return;
    }
    assert_eq!(AUTH, format!("Bearer {DEMO_TOKEN}"));
    let mode = Mode::from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = runtime.block_on(run(&mode));
    println!("{report}");
    if mode.quick {
        println!("(--quick: BENCHMARKS.md left as it is)");
    } else {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
        // The sections other benchmarks write (from `## Live views` on) stay as they are.
        let old = fs::read_to_string(&path).unwrap_or_default();
        let kept = old.find("\n## Live views").map_or("", |at| &old[at..]);
        fs::write(&path, format!("{}{kept}", report.trim_end())).expect("write BENCHMARKS.md");
        println!("wrote {}", path.display());
    }
}

/// Runs every scenario and renders the report.
async fn run(mode: &Mode) -> String {
    let started = Instant::now();
    let binaries = Binaries {
        current: proxy_binary(),
        before: Before::from_env(),
    };
    eprintln!("proxy binary: {}", binaries.current.display());
    if let Some(b) = &binaries.before {
        eprintln!("{}: {}", b.label, b.binary.display());
    }
    let scratch = Scratch::new();
    let machine = Machine::probe();
    eprintln!("scenario 1: cold first page ({} runs per K)", mode.runs);
    let cold = cold_pages(mode, &binaries, &scratch).await;
    eprintln!("scenario 2: pass-through overhead");
    let pass = pass_through(mode, &binaries, &scratch).await;
    eprintln!("scenario 4: cached answers");
    let cached = cached_answers(mode, &binaries, &scratch).await;
    eprintln!("scenario 5: dashboard load");
    let dashboard = dashboard(mode, &binaries.current, &scratch).await;
    let report = Report {
        machine,
        command: mode.command(binaries.before.as_ref()),
        before: binaries.before,
        rounds: mode.rounds,
        round: mode.round,
        cold,
        pass,
        cached,
        dashboard,
        took: started.elapsed(),
    };
    report.render()
}

// ---------------------------------------------------------------------------------------------
// Scenario 1: cold first page
// ---------------------------------------------------------------------------------------------

/// Scenario 1's results, plus the proxy's memory.
struct ColdPages {
    rows: Vec<KRow>,
    stages: usize,
    padded: usize,
    rss: Rss,
    /// The before binary's memory, when it ran.
    before_rss: Option<Rss>,
}

/// The measurements of one K.
struct KRow {
    k: usize,
    proxy: Vec<Duration>,
    /// The before binary's runs (none when it is not measured).
    before: Vec<Duration>,
    sequential: Vec<Duration>,
    concurrent: Vec<Duration>,
    proxy_upstream: usize,
    proxy_max_window: usize,
    proxy_429: usize,
    before_upstream: usize,
    before_max_window: usize,
    before_429: usize,
    sequential_429: usize,
    concurrent_429: usize,
    same_page: bool,
    runs: usize,
}

/// One proxy run as the simulator saw it.
struct ProxyRun {
    elapsed: Duration,
    ids: Vec<i64>,
    upstream: usize,
    max_window: usize,
    too_many: usize,
}

/// One direct (no proxy) run.
struct DirectRun {
    elapsed: Duration,
    ids: Vec<i64>,
    too_many: usize,
}

async fn cold_pages(mode: &Mode, binaries: &Binaries, scratch: &Scratch) -> ColdPages {
    let sim = Sim::spawn(sim_config()).await.expect("simulator starts");
    let max_k = mode.ks.iter().copied().max().unwrap_or(1);
    let (stages, padded) = pick_stages(&sim, max_k);
    let client = http_client(64);
    let upstream = sim.base_url();
    let env = [CACHE_OFF];
    let proxy = Proxy::start(
        &binaries.current,
        &upstream,
        &[],
        &env,
        scratch,
        "proxy-fanout",
    )
    .await;
    let before = match &binaries.before {
        Some(b) => {
            Some(Proxy::start(&b.binary, &upstream, &[], &env, scratch, "before-fanout").await)
        }
        None => None,
    };
    let idle = proxy.rss();
    let before_idle = before.as_ref().map(Proxy::rss);
    let before_base = before.as_ref().map(|b| b.base.as_str());
    let mut rows = Vec::new();
    for &k in &mode.ks {
        let row = measure_k(
            &client,
            &proxy.base,
            before_base,
            &sim,
            &stages[..k],
            mode.runs,
        )
        .await;
        let before_ms = if row.before.is_empty() {
            String::new()
        } else {
            format!(", before {} ms", ms(median(&row.before)))
        };
        eprintln!(
            "  K={k:>2}: proxy {} ms{before_ms}, sequential {} ms, concurrent {} ms",
            ms(median(&row.proxy)),
            ms(median(&row.sequential)),
            ms(median(&row.concurrent))
        );
        rows.push(row);
    }
    let rss = Rss {
        idle,
        after: proxy.rss(),
    };
    let before_rss = before.as_ref().zip(before_idle).map(|(b, idle)| Rss {
        idle,
        after: b.rss(),
    });
    ColdPages {
        rows,
        stages: max_k,
        padded,
        rss,
        before_rss,
    }
}

/// The simulator of scenario 1: fixed latency, Kommo's limit, no block within the run.
fn sim_config() -> SimConfig {
    SimConfig {
        latency: LATENCY,
        rate_limit: Some(SimRateLimit {
            requests: RATE as u32,
            window: WINDOW,
            block_after: 1000,
            block_for: Duration::from_secs(1),
        }),
        ..SimConfig::default()
    }
}

/// `max` distinct stages, those with live leads first (in pipeline order), then empty ones,
/// then made-up stages (which list nothing); also how many were not stages with leads.
fn pick_stages(sim: &Sim, max: usize) -> (Vec<(i64, i64)>, usize) {
    let mut counts: HashMap<(i64, i64), usize> = HashMap::new();
    for lead in sim.leads().iter().filter(|l| !l.is_deleted) {
        *counts
            .entry((lead.pipeline_id, lead.status_id))
            .or_default() += 1;
    }
    let all: Vec<(i64, i64)> = sim
        .pipelines()
        .iter()
        .flat_map(|p| p.statuses.iter().map(move |s| (p.id, s.id)))
        .collect();
    let (with_leads, empty): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|st| counts.contains_key(st));
    let filled = with_leads.len().min(max);
    let mut out: Vec<_> = with_leads.into_iter().chain(empty).take(max).collect();
    let made_up = (0..).map(|i| (1000, 990_000 + i));
    let missing = max - out.len();
    out.extend(made_up.take(missing));
    (out, max - filled)
}

/// All runs of one K, interleaving the three clients (and the before binary, when given);
/// each run starts cold.
async fn measure_k(
    client: &Http,
    proxy: &str,
    before: Option<&str>,
    sim: &SimHandle,
    stages: &[(i64, i64)],
    runs: usize,
) -> KRow {
    let mut row = KRow::new(stages.len(), runs);
    for _ in 0..runs {
        let p = via_proxy(client, proxy, sim, stages).await;
        cool_down().await;
        let b = match before {
            Some(before) => {
                let b = via_proxy(client, before, sim, stages).await;
                cool_down().await;
                Some(b)
            }
            None => None,
        };
        let s = sequential(client, &sim.base_url(), stages).await;
        cool_down().await;
        let c = concurrent(client, &sim.base_url(), stages).await;
        cool_down().await;
        row.add(p, b, s, c);
    }
    row
}

impl KRow {
    fn new(k: usize, runs: usize) -> KRow {
        KRow {
            k,
            proxy: Vec::new(),
            before: Vec::new(),
            sequential: Vec::new(),
            concurrent: Vec::new(),
            proxy_upstream: 0,
            proxy_max_window: 0,
            proxy_429: 0,
            before_upstream: 0,
            before_max_window: 0,
            before_429: 0,
            sequential_429: 0,
            concurrent_429: 0,
            same_page: true,
            runs,
        }
    }

    fn add(&mut self, p: ProxyRun, b: Option<ProxyRun>, s: DirectRun, c: DirectRun) {
        self.same_page &= p.ids == s.ids && s.ids == c.ids;
        if let Some(b) = b {
            self.same_page &= b.ids == p.ids;
            self.before.push(b.elapsed);
            self.before_upstream += b.upstream;
            self.before_max_window = self.before_max_window.max(b.max_window);
            self.before_429 += b.too_many;
        }
        self.proxy.push(p.elapsed);
        self.sequential.push(s.elapsed);
        self.concurrent.push(c.elapsed);
        self.proxy_upstream += p.upstream;
        self.proxy_max_window = self.proxy_max_window.max(p.max_window);
        self.proxy_429 += p.too_many;
        self.sequential_429 += s.too_many;
        self.concurrent_429 += c.too_many;
    }

    /// The proxy's median over `floor`.
    fn proxy_over(&self, floor: Duration) -> f64 {
        median(&self.proxy).as_secs_f64() / floor.as_secs_f64()
    }

    /// The current proxy's median time over the before binary's; `None` when it did not run.
    fn current_over_before(&self) -> Option<f64> {
        let before = median(&self.before).as_secs_f64();
        (!self.before.is_empty() && before > 0.0)
            .then(|| median(&self.proxy).as_secs_f64() / before)
    }

    /// `ceil(K/7) - 1` full windows plus one round trip.
    fn floor(&self) -> Duration {
        let windows = self.k.div_ceil(RATE) - 1;
        WINDOW * windows as u32 + LATENCY
    }

    /// The floor of a client that may send a request only a full window after an earlier one
    /// has *arrived*: it knows the arrival happened only once the answer is back, so each
    /// batch of 7 costs a round trip on top of the window. The same as `floor` for K <= 7.
    fn safe_floor(&self) -> Duration {
        let batches = self.k.div_ceil(RATE);
        WINDOW * (batches - 1) as u32 + LATENCY * batches as u32
    }
}

async fn cool_down() {
    tokio::time::sleep(COOL_DOWN).await;
}

/// `filter[statuses][i][...]` for each stage, then the page and order.
fn leads_query(stages: &[(i64, i64)]) -> String {
    let mut q: String = stages
        .iter()
        .enumerate()
        .map(|(i, (p, s))| {
            format!("filter[statuses][{i}][pipeline_id]={p}&filter[statuses][{i}][status_id]={s}&")
        })
        .collect();
    write!(q, "limit={PAGE}&order[created_at]=desc").unwrap();
    q
}

/// (a): one request to the proxy; the simulator's log tells what it sent upstream.
async fn via_proxy(client: &Http, proxy: &str, sim: &Sim, stages: &[(i64, i64)]) -> ProxyRun {
    sim.clear_requests();
    let url = format!("{proxy}/api/v4/leads?{}", leads_query(stages));
    let start = Instant::now();
    let (status, body) = get(client, &url).await.expect("proxy answers");
    let elapsed = start.elapsed();
    assert!(
        status == StatusCode::OK || status == StatusCode::NO_CONTENT,
        "proxy answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    let arrivals = sim.requests();
    ProxyRun {
        elapsed,
        ids: page_leads(&body).into_iter().map(|(_, id)| id).collect(),
        upstream: arrivals.len(),
        max_window: max_in_window(arrivals.iter().map(|r| r.at).collect()),
        too_many: arrivals.iter().filter(|r| r.status == 429).count(),
    }
}

/// The most arrivals within any window (the simulator's trailing-window reading).
fn max_in_window(mut at: Vec<tokio::time::Instant>) -> usize {
    at.sort();
    let mut best = 0;
    let mut first = 0;
    for last in 0..at.len() {
        while at[last].duration_since(at[first]) >= WINDOW {
            first += 1;
        }
        best = best.max(last - first + 1);
    }
    best
}

/// What one direct request to the simulator gave.
enum Fetched {
    Page(Bytes),
    TooMany(Duration),
}

/// One stage's first page straight from the simulator.
async fn fetch_stage(client: &Http, url: &str) -> Fetched {
    let (status, body) = get(client, url).await.expect("simulator answers");
    match status {
        StatusCode::OK => Fetched::Page(body),
        StatusCode::NO_CONTENT => Fetched::Page(Bytes::new()),
        StatusCode::TOO_MANY_REQUESTS => Fetched::TooMany(retry_after(&body)),
        other => panic!(
            "simulator answered {other} to {url}: {}",
            String::from_utf8_lossy(&body)
        ),
    }
}

/// `retry_after` seconds from Kommo's 429 body (one window when absent).
fn retry_after(body: &[u8]) -> Duration {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["retry_after"].as_u64())
        .map_or(WINDOW, Duration::from_secs)
}

fn stage_urls(sim: &str, stages: &[(i64, i64)]) -> Vec<String> {
    stages
        .iter()
        .map(|st| format!("{sim}/api/v4/leads?{}", leads_query(&[*st])))
        .collect()
}

/// (b): one stage after the other, waiting out each 429, then the local merge.
async fn sequential(client: &Http, sim: &str, stages: &[(i64, i64)]) -> DirectRun {
    let start = Instant::now();
    let (mut pages, mut too_many) = (Vec::new(), 0);
    for url in stage_urls(sim, stages) {
        loop {
            match fetch_stage(client, &url).await {
                Fetched::Page(body) => break pages.push(body),
                Fetched::TooMany(wait) => {
                    too_many += 1;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
    let ids = merge_first_page(&pages);
    DirectRun {
        elapsed: start.elapsed(),
        ids,
        too_many,
    }
}

/// (c): every stage at once; the refused ones again after `retry_after`, until all answered.
async fn concurrent(client: &Http, sim: &str, stages: &[(i64, i64)]) -> DirectRun {
    let start = Instant::now();
    let (mut pages, mut too_many) = (Vec::new(), 0);
    let mut pending = stage_urls(sim, stages);
    while !pending.is_empty() {
        let answers = join_all(pending.iter().map(|url| fetch_stage(client, url))).await;
        let mut retry = Vec::new();
        let mut wait = Duration::ZERO;
        for (url, answer) in pending.into_iter().zip(answers) {
            match answer {
                Fetched::Page(body) => pages.push(body),
                Fetched::TooMany(after) => {
                    too_many += 1;
                    wait = wait.max(after);
                    retry.push(url);
                }
            }
        }
        if !retry.is_empty() {
            tokio::time::sleep(wait).await;
        }
        pending = retry;
    }
    let ids = merge_first_page(&pages);
    DirectRun {
        elapsed: start.elapsed(),
        ids,
        too_many,
    }
}

/// `(created_at, id)` of each lead of a HAL page (none for an empty body).
fn page_leads(body: &[u8]) -> Vec<(i64, i64)> {
    if body.is_empty() {
        return Vec::new();
    }
    let page: Value = serde_json::from_slice(body).expect("a HAL page");
    page["_embedded"]["leads"]
        .as_array()
        .expect("_embedded.leads")
        .iter()
        .map(|l| {
            (
                l["created_at"].as_i64().unwrap_or(0),
                l["id"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// The client-side merge: newest first, ties by id descending, no duplicates, one page.
fn merge_first_page(pages: &[Bytes]) -> Vec<i64> {
    let mut leads: Vec<(i64, i64)> = pages.iter().flat_map(|p| page_leads(p)).collect();
    leads.sort_unstable_by(|a, b| b.cmp(a));
    let mut seen = std::collections::HashSet::new();
    leads
        .into_iter()
        .filter(|&(_, id)| seen.insert(id))
        .take(PAGE)
        .map(|(_, id)| id)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Scenario 2: pass-through overhead
// ---------------------------------------------------------------------------------------------

/// Scenario 2's results: each hop under load and unloaded.
struct PassThrough {
    /// `None` when nginx is not available.
    rows: Option<PassRows>,
    rss: Option<Rss>,
    /// The before binary's memory (one worker thread per CPU), when it ran.
    before_rss: Option<Rss>,
    body_bytes: usize,
    /// What drove the load: `wrk` or the bench's own client.
    generator: &'static str,
}

struct PassRows {
    direct: Rounds,
    proxy: Rounds,
    proxy_one_thread: Rounds,
    bare: Rounds,
    nginx: Rounds,
    nginx_auto: Rounds,
    direct_unloaded: Rounds,
    proxy_unloaded: Rounds,
    nginx_unloaded: Rounds,
    /// The before binary's rows, when it ran.
    before: Option<BeforePassRows>,
}

/// The before binary in scenario 2: one worker thread per CPU and one at 32 connections, one
/// worker thread per CPU at 1 connection.
struct BeforePassRows {
    proxy: Rounds,
    proxy_one_thread: Rounds,
    proxy_unloaded: Rounds,
}

/// One load run at a fixed number of connections.
#[derive(Clone, Copy)]
struct LoadStats {
    rps: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    requests: usize,
    errors: usize,
    /// Successful answers that said they came from a cache (when the target asks).
    hits: usize,
    /// CPU time (user + system) the measured server spent per answer, when measured.
    cpu_per_request: Option<Duration>,
    /// The load generator's CPU time over the run as a share of the one core its one thread
    /// can use (wrk only): near 1, the client, not the target, set the requests/s.
    client_busy: Option<f64>,
}

/// Connections of the unloaded latency runs: one request at a time, no queueing.
const UNLOADED: usize = 1;
/// How long each round of the unloaded latency runs lasts.
const UNLOADED_ROUND: Duration = Duration::from_secs(1);
/// The warm-up of each unloaded target.
const UNLOADED_WARMUP: Duration = Duration::from_millis(300);

async fn pass_through(mode: &Mode, binaries: &Binaries, scratch: &Scratch) -> PassThrough {
    let body = account_body();
    let (wrk, generator) = load_generator();
    let Some(nginx) = ensure_nginx() else {
        eprintln!("  nginx is not available: scenario 2 skipped");
        return PassThrough {
            rows: None,
            rss: None,
            before_rss: None,
            body_bytes: body.len(),
            generator,
        };
    };
    let www = scratch.path.join("www");
    fs::create_dir_all(&www).expect("www dir");
    fs::write(www.join("account.json"), &body).expect("static body");
    let static_port = free_port();
    let static_nginx = Nginx::start(&nginx, scratch, "static", &static_server(static_port, &www));
    let (nginx_port, nginx_auto_port) = (free_port(), free_port());
    let nginx_proxy = Nginx::start(
        &nginx,
        scratch,
        "proxy",
        &proxy_server(nginx_port, static_port),
    );
    let nginx_auto = Nginx::start_workers(
        &nginx,
        scratch,
        "proxy-auto",
        &proxy_server(nginx_auto_port, static_port),
        "auto",
    );
    let upstream = format!("http://127.0.0.1:{static_port}");
    let unlimited = [
        "--rate-limit",
        "10000",
        "--rate-window",
        "1ms",
        "--rate-margin",
        "0ms",
    ];
    let env = [CACHE_OFF, QUIET];
    let one_thread = [&unlimited[..], &["--worker-threads", "1"]].concat();
    let binary = &binaries.current;
    let proxy = Proxy::start(binary, &upstream, &unlimited, &env, scratch, "proxy-pass").await;
    let proxy_one = Proxy::start(binary, &upstream, &one_thread, &env, scratch, "proxy-1t").await;
    let before = match &binaries.before {
        Some(b) => Some((
            Proxy::start(
                &b.binary,
                &upstream,
                &unlimited,
                &env,
                scratch,
                "before-pass",
            )
            .await,
            Proxy::start(
                &b.binary,
                &upstream,
                &one_thread,
                &env,
                scratch,
                "before-1t",
            )
            .await,
        )),
        None => None,
    };
    let bare = BareRelay::start(&format!("127.0.0.1:{static_port}"), scratch);
    let idle = proxy.rss();
    let before_idle = before.as_ref().map(|(b, _)| b.rss());
    let direct = Target::one(&format!("{upstream}{PASS_PATH}"));
    let via_proxy = Target::one(&format!("{}{PASS_PATH}", proxy.base));
    let via_one = Target::one(&format!("{}{PASS_PATH}", proxy_one.base));
    let via_bare = Target::one(&format!("{}{PASS_PATH}", bare.base));
    let via_nginx = Target::one(&format!("http://127.0.0.1:{nginx_port}{PASS_PATH}"));
    let via_auto = Target::one(&format!("http://127.0.0.1:{nginx_auto_port}{PASS_PATH}"));
    let via_before = before.as_ref().map(|(b, b1)| {
        (
            Target::one(&format!("{}{PASS_PATH}", b.base)),
            Target::one(&format!("{}{PASS_PATH}", b1.base)),
            [b.guard.pid()],
            [b1.guard.pid()],
        )
    });
    let (proxy_pids, one_pids) = ([proxy.guard.pid()], [proxy_one.guard.pid()]);
    let bare_pids = [bare.guard.pid()];
    let (static_pids, nginx_pids, auto_pids) =
        (static_nginx.pids(), nginx_proxy.pids(), nginx_auto.pids());
    let mut loaded = vec![
        measured("direct", &direct, &static_pids),
        measured("proxy", &via_proxy, &proxy_pids),
        measured("proxy 1 thr", &via_one, &one_pids),
    ];
    if let Some((b, b1, b_pids, b1_pids)) = &via_before {
        loaded.push(measured("before", b, b_pids));
        loaded.push(measured("before 1 thr", b1, b1_pids));
    }
    loaded.extend([
        measured("bare relay", &via_bare, &bare_pids),
        measured("nginx proxy", &via_nginx, &nginx_pids),
        measured("nginx auto", &via_auto, &auto_pids),
    ]);
    let mut loaded = measure_rounds(
        wrk,
        &loaded,
        CONNECTIONS,
        mode.warmup,
        mode.round,
        mode.rounds,
    )
    .await
    .into_iter();
    let mut unloaded = vec![
        measured("direct c=1", &direct, &static_pids),
        measured("proxy c=1", &via_proxy, &proxy_pids),
    ];
    if let Some((b, _, b_pids, _)) = &via_before {
        unloaded.push(measured("before c=1", b, b_pids));
    }
    unloaded.push(measured("nginx c=1", &via_nginx, &nginx_pids));
    let mut unloaded = measure_rounds(
        wrk,
        &unloaded,
        UNLOADED,
        UNLOADED_WARMUP,
        UNLOADED_ROUND,
        mode.rounds,
    )
    .await
    .into_iter();
    // Taken in the order measured.
    let next = |rounds: &mut std::vec::IntoIter<Rounds>| rounds.next().expect("rounds");
    let (direct_loaded, proxy_loaded, one_loaded) =
        (next(&mut loaded), next(&mut loaded), next(&mut loaded));
    let before_loaded = via_before
        .as_ref()
        .map(|_| (next(&mut loaded), next(&mut loaded)));
    let (bare_loaded, nginx_loaded, auto_loaded) =
        (next(&mut loaded), next(&mut loaded), next(&mut loaded));
    let (direct_unloaded, proxy_unloaded) = (next(&mut unloaded), next(&mut unloaded));
    let before_unloaded = via_before.as_ref().map(|_| next(&mut unloaded));
    let nginx_unloaded = next(&mut unloaded);
    let before_rows = match (before_loaded, before_unloaded) {
        (Some((proxy, proxy_one_thread)), Some(proxy_unloaded)) => Some(BeforePassRows {
            proxy,
            proxy_one_thread,
            proxy_unloaded,
        }),
        _ => None,
    };
    let rows = PassRows {
        direct: direct_loaded,
        proxy: proxy_loaded,
        proxy_one_thread: one_loaded,
        bare: bare_loaded,
        nginx: nginx_loaded,
        nginx_auto: auto_loaded,
        direct_unloaded,
        proxy_unloaded,
        nginx_unloaded,
        before: before_rows,
    };
    let before_rss = before.as_ref().zip(before_idle).map(|((b, _), idle)| Rss {
        idle,
        after: b.rss(),
    });
    PassThrough {
        rows: Some(rows),
        rss: Some(Rss {
            idle,
            after: proxy.rss(),
        }),
        before_rss,
        body_bytes: body.len(),
        generator,
    }
}

/// One target of an interleaved measurement: what to load and whose CPU time to count.
struct Measured<'a> {
    name: &'static str,
    target: &'a Target,
    pids: &'a [u32],
}

fn measured<'a>(name: &'static str, target: &'a Target, pids: &'a [u32]) -> Measured<'a> {
    Measured { name, target, pids }
}

/// Loads each target for one warm-up, then in `rounds` rounds of `round` each, the targets
/// taking turns within a round (each round starting one target further on), so slow drift in
/// what else the machine runs falls on every target alike. Each run is measured by `wrk` when
/// given, else by the bench's own client, with the targets' CPU time over it.
async fn measure_rounds(
    wrk: Option<&Path>,
    targets: &[Measured<'_>],
    connections: usize,
    warmup: Duration,
    round: Duration,
    rounds: usize,
) -> Vec<Rounds> {
    let n = targets.len();
    let run = |target: &Target, duration: Duration| {
        let url = target.urls[0].clone();
        let target = target.clone();
        async move {
            match wrk {
                Some(wrk) => run_wrk(wrk, &url, connections, duration).await,
                None => load(&target, connections, Duration::ZERO, duration).await,
            }
        }
    };
    for m in targets {
        run(m.target, warmup).await;
    }
    let mut measured: Vec<Rounds> = (0..n).map(|_| Rounds::default()).collect();
    for r in 0..rounds {
        for j in 0..n {
            let i = (r + j) % n;
            let m = &targets[i];
            let before = cpu_time(m.pids);
            let stats = run(m.target, round).await;
            let stats = stats.with_cpu(cpu_time(m.pids).saturating_sub(before));
            log_load(&format!("{} #{}", m.name, r + 1), &stats);
            measured[i].runs.push(stats);
        }
    }
    measured
}

/// A target's runs, one per round.
#[derive(Default)]
struct Rounds {
    runs: Vec<LoadStats>,
}

impl Rounds {
    /// The rounds as one row: the median of the rounds' requests/s and of their percentiles,
    /// the largest max, every answer, error and hit counted, and the CPU time of all rounds
    /// over all their answers.
    fn summary(&self) -> LoadStats {
        let median_of = |f: fn(&LoadStats) -> f64| {
            let mut v: Vec<f64> = self.runs.iter().map(f).collect();
            median_f(&mut v)
        };
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let requests = self.runs.iter().map(|s| s.requests).sum::<usize>();
        let cpu: Option<Duration> = self
            .runs
            .iter()
            .map(|s| s.cpu_per_request.map(|c| c * count(s.requests)))
            .sum();
        LoadStats {
            rps: median_of(|s| s.rps),
            p50: Duration::from_secs_f64(median_of(|s| s.p50.as_secs_f64())),
            p99: Duration::from_secs_f64(median_of(|s| s.p99.as_secs_f64())),
            max: self.runs.iter().map(|s| s.max).max().unwrap_or_default(),
            requests,
            errors: self.runs.iter().map(|s| s.errors).sum(),
            hits: self.runs.iter().map(|s| s.hits).sum(),
            cpu_per_request: cpu.filter(|_| requests > 0).map(|c| c / count(requests)),
            client_busy: mean(self.runs.iter().map(|s| s.client_busy)),
        }
    }

    /// The lowest and highest requests/s of the rounds, as a table cell.
    fn range_cell(&self) -> String {
        let rps = self.runs.iter().map(|s| s.rps);
        let low = rps.clone().fold(f64::INFINITY, f64::min);
        let high = rps.fold(0.0, f64::max);
        if self.runs.is_empty() {
            "n/a".to_string()
        } else {
            format!("{low:.0} to {high:.0}")
        }
    }
}

/// The latency `a` adds to `b`, ms: (p50, p99) of the rounds' medians.
fn added(a: &Rounds, b: &Rounds) -> (f64, f64) {
    let (a, b) = (a.summary(), b.summary());
    (ms_f(a.p50) - ms_f(b.p50), ms_f(a.p99) - ms_f(b.p99))
}

/// The median over the rounds of `a`'s requests/s divided by `b`'s in the same round: each
/// ratio pairs two runs made one after the other.
fn paired_ratio(a: &Rounds, b: &Rounds) -> f64 {
    let mut ratios: Vec<f64> = a
        .runs
        .iter()
        .zip(&b.runs)
        .filter(|(_, b)| b.rps > 0.0)
        .map(|(a, b)| a.rps / b.rps)
        .collect();
    median_f(&mut ratios)
}

/// The mean of `values`, `None` when any is missing or there are none.
fn mean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let values: Option<Vec<f64>> = values.collect();
    values
        .filter(|v| !v.is_empty())
        .map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// The median of `values` (the mean of the middle two for an even count); 0 when empty.
fn median_f(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl LoadStats {
    /// Adds the CPU time per answer, from the CPU time spent over the whole run.
    fn with_cpu(mut self, cpu: Duration) -> LoadStats {
        self.cpu_per_request = u32::try_from(self.requests)
            .ok()
            .filter(|&n| n > 0)
            .map(|n| cpu / n);
        self
    }
}

/// `wrk -t1 -c{connections} -d{duration} --latency` against `url` with the demo token.
async fn run_wrk(wrk: &Path, url: &str, connections: usize, duration: Duration) -> LoadStats {
    // wrk takes whole seconds.
    let ran = Duration::from_secs_f64(duration.as_secs_f64().ceil().max(1.0));
    let mut cmd = tokio::process::Command::new(wrk);
    cmd.args(["-t1", &format!("-c{connections}")])
        .arg(format!("-d{}s", ran.as_secs()))
        .args(["--latency", "-H", &format!("Authorization: {AUTH}"), url])
        .stdin(Stdio::null());
    // The bench waits for no other child while wrk runs: what its ended children used
    // meanwhile is wrk's.
    let (before, started) = (ended_children_cpu(), Instant::now());
    let out = cmd.output().await.expect("run wrk");
    let (client, lived) = (
        ended_children_cpu().saturating_sub(before),
        started.elapsed(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    let stats = parse_wrk(&text, ran).unwrap_or_else(|| panic!("unreadable wrk output:\n{text}"));
    LoadStats {
        // Over the process's whole life (start-up and the report included), not the asked
        // duration, so it is a share of a core.
        client_busy: Some(client.as_secs_f64() / lived.as_secs_f64()),
        ..stats
    }
}

/// Reads wrk's report: requests, latency percentiles and max, non-2xx answers and socket
/// errors. Requests/s is the requests over the asked duration.
fn parse_wrk(text: &str, duration: Duration) -> Option<LoadStats> {
    let duration_of = |v: &str| -> Option<Duration> {
        let (number, scale) = if let Some(n) = v.strip_suffix("us") {
            (n, 1e-6)
        } else if let Some(n) = v.strip_suffix("ms") {
            (n, 1e-3)
        } else if let Some(n) = v.strip_suffix('m') {
            (n, 60.0)
        } else {
            (v.strip_suffix('s')?, 1.0)
        };
        Some(Duration::from_secs_f64(number.parse::<f64>().ok()? * scale))
    };
    let line = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find(|l| l.starts_with(prefix))
            .map(|l| l[prefix.len()..].trim().to_string())
    };
    let percentile = |p: &str| duration_of(line(p)?.split_whitespace().next()?);
    let max = line("Latency")
        .and_then(|l| l.split_whitespace().nth(2).and_then(duration_of))
        .unwrap_or_default();
    let requests: usize = text
        .lines()
        .find(|l| l.contains(" requests in "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let non_2xx: usize = line("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let socket_errors: usize = line("Socket errors:")
        .map(|l| {
            l.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<usize>().ok())
                .sum()
        })
        .unwrap_or(0);
    let ok = requests.saturating_sub(non_2xx);
    Some(LoadStats {
        rps: ok as f64 / duration.as_secs_f64(),
        p50: percentile("50%")?,
        p99: percentile("99%")?,
        max,
        requests: ok,
        errors: non_2xx + socket_errors,
        hits: 0,
        cpu_per_request: None,
        client_busy: None,
    })
}

/// CPU time (user + system) spent so far by `pids` and their child processes.
fn cpu_time(pids: &[u32]) -> Duration {
    let tick = clock_ticks_per_second();
    let mut ticks = 0u64;
    let mut seen = Vec::new();
    let mut todo = pids.to_vec();
    while let Some(pid) = todo.pop() {
        if seen.contains(&pid) {
            continue;
        }
        seen.push(pid);
        // utime and stime.
        ticks += stat_ticks(&format!("/proc/{pid}/stat"), [11, 12]);
        let children = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"));
        todo.extend(
            children
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
    }
    Duration::from_secs_f64(ticks as f64 / tick)
}

/// CPU time (user + system) of the bench's child processes that have ended and been waited
/// for (`cutime` and `cstime` of `/proc/self/stat`).
fn ended_children_cpu() -> Duration {
    let ticks = stat_ticks("/proc/self/stat", [13, 14]);
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second())
}

/// The sum of two clock-tick fields of a `/proc/.../stat` file, counted from the field after
/// the command name (which may hold spaces); 0 for what cannot be read.
fn stat_ticks(path: &str, fields: [usize; 2]) -> u64 {
    let stat = fs::read_to_string(path).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let values: Vec<&str> = rest.split_whitespace().collect();
    fields
        .iter()
        .filter_map(|&i| values.get(i)?.parse::<u64>().ok())
        .sum()
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        command_output("getconf", &["CLK_TCK"])
            .and_then(|v| v.parse().ok())
            .unwrap_or(100.0)
    })
}

/// A Kommo-like `GET /api/v4/account` answer of a little over 2 KB.
fn account_body() -> String {
    let mut users = Vec::new();
    let mut body = String::new();
    for i in 0.. {
        users.push(serde_json::json!({
            "id": 1001 + i,
            "name": format!("User {i}"),
            "email": format!("user{i}@example.com"),
            "rights": {"leads": {"view": "A", "edit": "A"}, "is_admin": i == 0},
        }));
        let account = serde_json::json!({
            "id": 31_000_001,
            "name": "Example account",
            "subdomain": "example",
            "currency": "USD",
            "_embedded": {"users": users},
        });
        body = account.to_string();
        if body.len() >= 2048 {
            break;
        }
    }
    body
}

fn log_load(name: &str, stats: &LoadStats) {
    eprintln!(
        "  {name:<16} {:>9.0} req/s  p50 {:.2} ms  p99 {:.2} ms  max {:.0} ms  errors {}  hits {}",
        stats.rps,
        ms_f(stats.p50),
        ms_f(stats.p99),
        ms_f(stats.max),
        stats.errors,
        stats.hits
    );
}

/// What the load clients request, and what they check in each answer.
#[derive(Clone)]
struct Target {
    /// Client `i` asks `urls[i % n]`, then the next one, round and round.
    urls: Vec<String>,
    /// A header whose value `HIT` counts as a cache hit (`LoadStats::hits`).
    hit_header: Option<&'static str>,
    /// An answer of another length counts as an error.
    body_len: Option<usize>,
}

impl Target {
    fn one(url: &str) -> Target {
        Target {
            urls: vec![url.to_string()],
            hit_header: None,
            body_len: None,
        }
    }
}

/// `connections` clients, each in a request loop, for `warmup` then `duration`; only requests
/// started after the warm-up and finished within the duration count.
async fn load(
    target: &Target,
    connections: usize,
    warmup: Duration,
    duration: Duration,
) -> LoadStats {
    let client = http_client(connections);
    let from = Instant::now() + warmup;
    let until = from + duration;
    let workers: Vec<_> = (0..connections)
        .map(|i| {
            let (client, target) = (client.clone(), target.clone());
            tokio::spawn(load_worker(client, target, i, from, until))
        })
        .collect();
    let mut latencies = Vec::new();
    let (mut errors, mut hits) = (0, 0);
    for worker in workers {
        let tally = worker.await.expect("load worker");
        latencies.extend(tally.latencies);
        errors += tally.errors;
        hits += tally.hits;
    }
    latencies.sort_unstable();
    LoadStats {
        rps: latencies.len() as f64 / duration.as_secs_f64(),
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        requests: latencies.len(),
        errors,
        hits,
        cpu_per_request: None,
        client_busy: None,
    }
}

/// What one load client saw within the measured time.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: usize,
    hits: usize,
}

/// One connection's request loop: latencies of the successful requests, the failures and the
/// cache hits among the successes.
async fn load_worker(
    client: Http,
    target: Target,
    i: usize,
    from: Instant,
    until: Instant,
) -> Tally {
    let mut tally = Tally::default();
    for n in i.. {
        let url = &target.urls[n % target.urls.len()];
        let start = Instant::now();
        if start >= until {
            break;
        }
        let answer = get_full(&client, url).await;
        let end = Instant::now();
        if start < from || end > until {
            continue;
        }
        match answer {
            Ok((StatusCode::OK, headers, body))
                if target.body_len.is_none_or(|len| len == body.len()) =>
            {
                tally.latencies.push(end - start);
                let hit = target
                    .hit_header
                    .and_then(|name| headers.get(name))
                    .is_some_and(|v| v.as_bytes() == b"HIT");
                tally.hits += usize::from(hit);
            }
            _ => tally.errors += 1,
        }
    }
    tally
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index]
}

// ---------------------------------------------------------------------------------------------
// Scenario 4: cached answers
// ---------------------------------------------------------------------------------------------

/// Scenario 4's results.
struct Cached {
    /// The rows in the order measured and shown: each of the current proxy's followed by the
    /// before binary's (when it ran) in the same configuration.
    rows: Vec<CachedRow>,
    /// Requests the simulator saw while the caches were measured (must be 0).
    upstream_during_load: usize,
    /// How many leads each stage of the pages holds (the single stage first).
    stage_leads: Vec<usize>,
    rss: Option<Rss>,
    /// The before binary's memory (one worker thread per CPU), when it ran.
    before_rss: Option<Rss>,
    /// What drove the load: `wrk` or the bench's own client.
    generator: &'static str,
}

/// Which cache answers a row of scenario 4, and which page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Served {
    /// The proxy with one worker thread per CPU: the single-stage page.
    Single,
    /// The same proxy: the merged 5-stage page.
    Merged,
    /// The proxy with `--worker-threads 1`: the single-stage page.
    OneThread,
    /// nginx `proxy_cache`, 1 worker: the single-stage page.
    Nginx,
    /// nginx `proxy_cache`, `worker_processes auto`: the single-stage page.
    NginxAuto,
    /// The proxy with `--worker-threads 1`: the single-stage page at the default limit.
    OneThreadDefault,
    /// nginx `proxy_cache`, 1 worker: the single-stage page at the default limit.
    NginxDefault,
}

impl Served {
    const ALL: [Served; 7] = [
        Served::Single,
        Served::Merged,
        Served::OneThread,
        Served::Nginx,
        Served::NginxAuto,
        Served::OneThreadDefault,
        Served::NginxDefault,
    ];

    fn is_proxy(self) -> bool {
        !matches!(
            self,
            Served::Nginx | Served::NginxAuto | Served::NginxDefault
        )
    }

    /// The name in the progress lines.
    fn short(self, before: bool) -> &'static str {
        match (self, before) {
            (Served::Single, false) => "proxy single",
            (Served::Single, true) => "before single",
            (Served::Merged, false) => "proxy merged",
            (Served::Merged, true) => "before merged",
            (Served::OneThread, false) => "proxy 1 thr",
            (Served::OneThread, true) => "before 1 thr",
            (Served::Nginx, _) => "nginx cache",
            (Served::NginxAuto, _) => "nginx cache 2w",
            (Served::OneThreadDefault, false) => "proxy 1 thr 50",
            (Served::OneThreadDefault, true) => "before 1 thr 50",
            (Served::NginxDefault, _) => "nginx cache 50",
        }
    }

    /// The row's name in the table; `proxy` names the proxy binary.
    fn describe(self, proxy: &str) -> String {
        match self {
            Served::Single => format!(
                "{proxy} (one worker thread per CPU): single-stage page from its answer cache"
            ),
            Served::Merged => format!(
                "{proxy} (one worker thread per CPU): merged 5-stage page from its answer cache"
            ),
            Served::OneThread => {
                format!("{proxy} (`--worker-threads 1`): the same single-stage page")
            }
            Served::Nginx => {
                "nginx `proxy_cache` (1 worker): the same single-stage page from its cache".into()
            }
            Served::NginxAuto => {
                "nginx `proxy_cache` (`worker_processes auto`): the same single-stage page".into()
            }
            Served::OneThreadDefault => {
                format!("{proxy} (`--worker-threads 1`): the single-stage page, default limit")
            }
            Served::NginxDefault => {
                "nginx `proxy_cache` (1 worker): the same page, default limit".into()
            }
        }
    }
}

/// One row of the cached-answers table.
struct CachedRow {
    served: Served,
    /// The before binary answered (a proxy row only).
    before: bool,
    target: String,
    /// `None` when nginx is not available.
    rounds: Option<Rounds>,
    body_bytes: usize,
}

impl CachedRow {
    fn hit_ratio(&self) -> Option<f64> {
        let s = self.rounds.as_ref()?.summary();
        Some(s.hits as f64 / s.requests.max(1) as f64)
    }
}

/// The proxy with its cache on (and the before binary, when given) and nginx `proxy_cache`, all
/// in front of the simulator, each warmed, then loaded with 32 connections asking the same page
/// over and over.
async fn cached_answers(mode: &Mode, binaries: &Binaries, scratch: &Scratch) -> Cached {
    let sim = Sim::spawn(sim_config()).await.expect("simulator starts");
    let by_size = stages_by_size(&sim);
    let stage_leads = by_size.iter().take(CACHED_STAGES).map(|s| s.1).collect();
    let stages: Vec<(i64, i64)> = by_size.iter().take(CACHED_STAGES).map(|s| s.0).collect();
    let (wrk, generator) = load_generator();
    let before_label = binaries.before.as_ref().map(|b| b.label.as_str());
    // Each proxy row followed by the before binary's in the same configuration.
    let specs: Vec<(Served, bool)> = Served::ALL
        .into_iter()
        .flat_map(|served| {
            let before = (served.is_proxy() && before_label.is_some()).then_some((served, true));
            [Some((served, false)), before].into_iter().flatten()
        })
        .collect();
    let describe = |served: Served, before: bool| {
        served.describe(match (before, before_label) {
            (true, Some(label)) => label,
            _ => "kommo-fanout",
        })
    };
    let Some(nginx) = ensure_nginx() else {
        eprintln!("  nginx is not available: scenario 4 skipped");
        let rows = specs.iter().map(|&(served, before)| CachedRow {
            served,
            before,
            target: describe(served, before),
            rounds: None,
            body_bytes: 0,
        });
        return Cached {
            rows: rows.collect(),
            upstream_during_load: 0,
            stage_leads,
            rss: None,
            before_rss: None,
            generator,
        };
    };
    let upstream = sim.base_url();
    let cache_on = ["--cache-ttl", "10m"];
    let one_thread = [&cache_on[..], &["--worker-threads", "1"]].concat();
    let current = &binaries.current;
    let proxy = Proxy::start(
        current,
        &upstream,
        &cache_on,
        &[QUIET],
        scratch,
        "proxy-cache",
    )
    .await;
    let proxy_one = Proxy::start(
        current,
        &upstream,
        &one_thread,
        &[QUIET],
        scratch,
        "proxy-cache-1t",
    )
    .await;
    let before = match &binaries.before {
        Some(b) => Some((
            Proxy::start(
                &b.binary,
                &upstream,
                &cache_on,
                &[QUIET],
                scratch,
                "before-cache",
            )
            .await,
            Proxy::start(
                &b.binary,
                &upstream,
                &one_thread,
                &[QUIET],
                scratch,
                "before-cache-1t",
            )
            .await,
        )),
        None => None,
    };
    let idle = proxy.rss();
    let before_idle = before.as_ref().map(|(b, _)| b.rss());
    let sim_port = sim.addr().port();
    let (nginx_port, auto_port) = (free_port(), free_port());
    let nginx_cache = Nginx::start(
        &nginx,
        scratch,
        "cache",
        &cache_server(nginx_port, sim_port, &scratch.path, "cache"),
    );
    let nginx_auto = Nginx::start_workers(
        &nginx,
        scratch,
        "cache-auto",
        &cache_server(auto_port, sim_port, &scratch.path, "cache-auto"),
        "auto",
    );
    let single = cached_query(&stages[..1], CACHED_LIMIT);
    let merged = cached_query(&stages, CACHED_LIMIT);
    let default_page = cached_query(&stages[..1], DEFAULT_LIMIT);
    let nginx_base = format!("http://127.0.0.1:{nginx_port}");
    let auto_base = format!("http://127.0.0.1:{auto_port}");
    let (proxy_hit, nginx_hit) = ("x-cache", "x-cache-status");
    // In the order of the rows: where each is asked, for which page, the header that says it
    // was a hit, and whose CPU time counts.
    let served: Vec<(&str, &str, &str, Vec<u32>)> = specs
        .iter()
        .map(|&(served, is_before)| {
            let (per_cpu, one) = match (&before, is_before) {
                (Some((b, b1)), true) => (b, b1),
                _ => (&proxy, &proxy_one),
            };
            match served {
                Served::Single => (&per_cpu.base[..], &single[..], proxy_hit, per_cpu.pids()),
                Served::Merged => (&per_cpu.base[..], &merged[..], proxy_hit, per_cpu.pids()),
                Served::OneThread => (&one.base[..], &single[..], proxy_hit, one.pids()),
                Served::Nginx => (&nginx_base[..], &single[..], nginx_hit, nginx_cache.pids()),
                Served::NginxAuto => (&auto_base[..], &single[..], nginx_hit, nginx_auto.pids()),
                Served::OneThreadDefault => {
                    (&one.base[..], &default_page[..], proxy_hit, one.pids())
                }
                Served::NginxDefault => (
                    &nginx_base[..],
                    &default_page[..],
                    nginx_hit,
                    nginx_cache.pids(),
                ),
            }
        })
        .collect();
    let mut targets = Vec::new();
    for (base, query, header, _) in &served {
        let url = format!("{base}/api/v4/leads?{query}");
        let body_len = warm(&url, header).await;
        targets.push(Target {
            urls: vec![url],
            hit_header: Some(header),
            body_len: Some(body_len),
        });
    }
    sim.clear_requests();
    let loads: Vec<Measured> = specs
        .iter()
        .zip(&targets)
        .zip(&served)
        .map(|((&(s, before), target), (_, _, _, pids))| measured(s.short(before), target, pids))
        .collect();
    let measured = measure_rounds(
        wrk,
        &loads,
        CONNECTIONS,
        mode.warmup,
        mode.round,
        mode.rounds,
    )
    .await;
    let upstream_during_load = sim.request_count();
    let mut rows = Vec::new();
    for (mut rounds, (&(served, before), target)) in
        measured.into_iter().zip(specs.iter().zip(&targets))
    {
        if wrk.is_some() {
            // wrk reads no headers: the answers are hits when the upstream saw no request at
            // all while the caches were loaded (a miss would have reached it), and were 2xx.
            for run in &mut rounds.runs {
                run.hits = if upstream_during_load == 0 {
                    run.requests
                } else {
                    0
                };
            }
        }
        let stats = rounds.summary();
        let row = CachedRow {
            served,
            before,
            target: describe(served, before),
            rounds: Some(rounds),
            body_bytes: target.body_len.unwrap_or(0),
        };
        eprintln!(
            "  {}: {} bytes, cache hit ratio {:.4}",
            served.short(before),
            row.body_bytes,
            row.hit_ratio().unwrap_or(0.0)
        );
        assert!(
            stats.requests > 0 && stats.errors == 0 && stats.hits == stats.requests,
            "{}: every measured answer must be a cache hit: {} requests, {} hits, {} errors",
            row.target,
            stats.requests,
            stats.hits,
            stats.errors
        );
        rows.push(row);
    }
    let before_rss = before.as_ref().zip(before_idle).map(|((b, _), idle)| Rss {
        idle,
        after: b.rss(),
    });
    Cached {
        rows,
        upstream_during_load,
        stage_leads,
        rss: Some(Rss {
            idle,
            after: proxy.rss(),
        }),
        before_rss,
        generator,
    }
}

/// Fills a cache with `url`'s answer: asks until `header` says `HIT` twice in a row (waiting
/// out a `429`, which no cache keeps); returns the answer's length.
async fn warm(url: &str, header: &str) -> usize {
    let client = http_client(1);
    let mut hits = 0;
    for _ in 0..50 {
        let (status, headers, body) = get_full(&client, url).await.expect("warm-up answer");
        if status == StatusCode::TOO_MANY_REQUESTS {
            // nginx has no limiter: its miss may find the simulator's window full.
            tokio::time::sleep(retry_after(&body)).await;
            continue;
        }
        assert_eq!(
            status,
            StatusCode::OK,
            "warm-up of {url}: {}",
            String::from_utf8_lossy(&body)
        );
        let hit = headers.get(header).is_some_and(|v| v.as_bytes() == b"HIT");
        hits = if hit { hits + 1 } else { 0 };
        if hits == 2 {
            return body.len();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never answered `{header}: HIT`");
}

/// The leads query of scenario 4: the stages, Kommo's largest page, newest first.
fn cached_query(stages: &[(i64, i64)], limit: usize) -> String {
    let pairs = leads_query(stages);
    let pairs = &pairs[..pairs.find("limit=").expect("limit")];
    format!("{pairs}limit={limit}&order[created_at]=desc")
}

/// The stages with live leads, largest first, with their lead counts.
fn stages_by_size(sim: &Sim) -> Vec<((i64, i64), usize)> {
    let mut counts: HashMap<(i64, i64), usize> = HashMap::new();
    for lead in sim.leads().iter().filter(|l| !l.is_deleted) {
        *counts
            .entry((lead.pipeline_id, lead.status_id))
            .or_default() += 1;
    }
    let mut by_size: Vec<_> = counts.into_iter().collect();
    by_size.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    by_size
}

// ---------------------------------------------------------------------------------------------
// Scenario 5: dashboard load
// ---------------------------------------------------------------------------------------------

/// Scenario 5's results.
struct Dashboard {
    stats: LoadStats,
    duration: Duration,
    ttl: Duration,
    upstream: usize,
    minimum: usize,
    max_window: usize,
    too_many: usize,
    rss: Rss,
}

/// 100 clients polling 5 multi-stage views (disjoint stages) through the proxy with its cache on,
/// the simulator at 100 ms with its 7/s limit; the simulator's log counts what went upstream.
async fn dashboard(mode: &Mode, binary: &Path, scratch: &Scratch) -> Dashboard {
    let sim = Sim::spawn(sim_config()).await.expect("simulator starts");
    let total: usize = VIEWS.iter().sum();
    let (stages, padded) = pick_stages(&sim, total);
    assert_eq!(
        padded, 0,
        "the account has fewer than {total} stages with leads"
    );
    let ttl = mode.dashboard_ttl();
    let ttl_flag = humantime::format_duration(ttl).to_string();
    let extra: &[&str] = if ttl == DEFAULT_TTL {
        &[]
    } else {
        &["--cache-ttl", &ttl_flag]
    };
    let proxy = Proxy::start(
        binary,
        &sim.base_url(),
        extra,
        &[QUIET],
        scratch,
        "proxy-dashboard",
    )
    .await;
    let idle = proxy.rss();
    let mut rest = &stages[..];
    let mut urls = Vec::new();
    for n in VIEWS {
        let (view, tail) = rest.split_at(n);
        urls.push(format!("{}/api/v4/leads?{}", proxy.base, leads_query(view)));
        rest = tail;
    }
    let target = Target {
        urls,
        hit_header: Some("x-cache"),
        body_len: None,
    };
    let duration = mode.dashboard;
    sim.clear_requests();
    let stats = load(&target, DASHBOARD_CLIENTS, Duration::ZERO, duration).await;
    log_load("dashboard", &stats);
    let arrivals = sim.requests();
    let periods = duration.as_nanos().div_ceil(ttl.as_nanos()) as usize;
    let result = Dashboard {
        stats,
        duration,
        ttl,
        upstream: arrivals.len(),
        minimum: total * periods,
        max_window: max_in_window(arrivals.iter().map(|r| r.at).collect()),
        too_many: arrivals.iter().filter(|r| r.status == 429).count(),
        rss: Rss {
            idle,
            after: proxy.rss(),
        },
    };
    eprintln!(
        "    upstream {} (minimum {}), max in 1 s {}, 429s {}",
        result.upstream, result.minimum, result.max_window, result.too_many
    );
    result
}

// ---------------------------------------------------------------------------------------------
// Processes: the proxy binary, nginx, and the guards that stop them
// ---------------------------------------------------------------------------------------------

/// A child process, stopped (SIGTERM, then SIGKILL after 5 s) when dropped, also on panic.
struct Guard {
    name: &'static str,
    child: Child,
}

impl Guard {
    /// Starts `command` with its output appended to `log` and nothing on its input.
    fn spawn(name: &'static str, mut command: Command, log: &Path) -> Guard {
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file(log))
            .stderr(log_file(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Guard { name, child }
    }

    /// Returns once something accepts TCP connections on `127.0.0.1:port`; panics with the
    /// log if the process exits first or nothing listens within 10 s.
    fn wait_listening(&mut self, port: u16, log: &Path) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            self.assert_running(log);
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} did not listen on port {port} within 10 s", self.name);
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the log if the process already exited.
    fn assert_running(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let tail = fs::read_to_string(log).unwrap_or_default();
            panic!("{} exited early ({status}):\n{tail}", self.name);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory for configs, logs and the static body; removed when dropped.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        let path = std::env::temp_dir().join(format!("kommo-fanout-e2e-{}", std::process::id()));
        fs::create_dir_all(path.join("tmp")).expect("scratch dir");
        Scratch { path }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// The release proxy running as a child process.
struct Proxy {
    guard: Guard,
    base: String,
}

impl Proxy {
    /// `kommo-fanout serve` on free loopback ports, with `env` on top of the bench's environment
    /// (minus any `KOMMO_FANOUT_*`); returns once `/healthz` answers 200.
    async fn start(
        binary: &Path,
        upstream: &str,
        extra: &[&str],
        env: &[(&str, &str)],
        scratch: &Scratch,
        name: &'static str,
    ) -> Proxy {
        let (listen, admin) = (free_port(), free_port());
        let log = scratch.path.join(format!("{name}.log"));
        let mut command = Command::new(binary);
        command
            .env_clear()
            .envs(std::env::vars().filter(|(k, _)| !k.starts_with("KOMMO_FANOUT_")))
            .envs(env.iter().copied())
            .arg("serve")
            .args(["--upstream", upstream])
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--shutdown-grace", "1s"])
            // Proxies measured side by side in front of one upstream each keep their own
            // budget, as the bench's targets assume: no turn-taking between them.
            .args(["--limiter-lock-dir", "off"])
            .args(extra);
        let mut guard = Guard::spawn(name, command, &log);
        let health = format!("http://127.0.0.1:{admin}/healthz");
        let client = http_client(1);
        for _ in 0..200 {
            if let Ok((StatusCode::OK, _)) = get(&client, &health).await {
                let base = format!("http://127.0.0.1:{listen}");
                return Proxy { guard, base };
            }
            guard.assert_running(&log);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{name} did not become healthy within 10 s");
    }

    fn rss(&self) -> u64 {
        peak_rss_kib(self.guard.pid())
    }

    /// The process whose CPU time counts.
    fn pids(&self) -> Vec<u32> {
        vec![self.guard.pid()]
    }
}

fn log_file(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log file")
}

/// Peak and idle memory of one proxy process, KiB.
#[derive(Clone, Copy)]
struct Rss {
    idle: u64,
    after: u64,
}

/// `VmHWM` (peak resident set) of a process, KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Baseline: a bare hyper relay
// ---------------------------------------------------------------------------------------------

/// The argument that makes this binary the bare relay: `end_to_end --bare-relay LISTEN UPSTREAM`.
const BARE_RELAY: &str = "--bare-relay";

/// The least a hyper relay does, as a baseline beside the proxy in scenario 2: hyper's HTTP/1
/// server and hyper-util's pooled client on one current-thread runtime, every request sent on
/// to `upstream` as it came and its answer streamed back. It has none of the proxy's own work:
/// no limiter, cache, metrics, request id, deadlines, bounds, hop-by-hop stripping, HTTP/2 or
/// header-read timer. What it costs per request is what the HTTP stack costs.
fn bare_relay(listen: &str, upstream: &str) {
    let upstream: http::uri::Authority = upstream.parse().expect("upstream host:port");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .expect("bind the bare relay");
        let client: Client<HttpConnector, hyper::body::Incoming> =
            Client::builder(TokioExecutor::new()).build_http();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (client, upstream) = (client.clone(), upstream.clone());
            tokio::spawn(async move {
                let relay = hyper::service::service_fn(move |mut request: Request<_>| {
                    let mut parts = request.uri().clone().into_parts();
                    parts.scheme = Some(http::uri::Scheme::HTTP);
                    parts.authority = Some(upstream.clone());
                    *request.uri_mut() = http::Uri::from_parts(parts).expect("upstream URI");
                    client.request(request)
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, relay)
                    .await;
            });
        }
    });
}

/// The bare relay as a child process (this binary again), stopped on drop.
struct BareRelay {
    guard: Guard,
    base: String,
}

impl BareRelay {
    /// Starts it in front of `upstream` (`host:port`) and returns once it accepts connections.
    fn start(upstream: &str, scratch: &Scratch) -> BareRelay {
        let port = free_port();
        let log = scratch.path.join("bare-relay.log");
        let mut command = Command::new(std::env::current_exe().expect("the bench's own path"));
        command.args([BARE_RELAY, &format!("127.0.0.1:{port}"), upstream]);
        let mut guard = Guard::spawn("bare relay", command, &log);
        guard.wait_listening(port, &log);
        let base = format!("http://127.0.0.1:{port}");
        BareRelay { guard, base }
    }
}

/// The release `kommo-fanout` binary: the one cargo built with this bench, else
/// `target/release/kommo-fanout` (built first if missing).
fn proxy_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_kommo-fanout") {
        if Path::new(path).exists() {
            return PathBuf::from(path);
        }
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("kommo-fanout")));
    let fallback = manifest.join("target/release/kommo-fanout");
    if let Some(path) = beside
        .into_iter()
        .chain([fallback.clone()])
        .find(|p| p.exists())
    {
        return path;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "kommo-fanout"])
        .current_dir(manifest)
        .status()
        .expect("run cargo build");
    assert!(
        status.success() && fallback.exists(),
        "cannot build kommo-fanout"
    );
    fallback
}

/// A running nginx (a master and its workers), stopped on drop.
struct Nginx {
    guard: Guard,
}

impl Nginx {
    /// Writes `name.conf` with `server` as its only server block and starts nginx (one worker)
    /// on it.
    fn start(nginx: &Path, scratch: &Scratch, name: &'static str, server: &str) -> Nginx {
        Nginx::start_workers(nginx, scratch, name, server, "1")
    }

    /// [`Nginx::start`] with `worker_processes workers`.
    fn start_workers(
        nginx: &Path,
        scratch: &Scratch,
        name: &'static str,
        server: &str,
        workers: &str,
    ) -> Nginx {
        let dir = &scratch.path;
        let conf = dir.join(format!("nginx-{name}.conf"));
        let log = dir.join(format!("nginx-{name}.log"));
        fs::write(&conf, nginx_conf(dir, name, server, workers)).expect("nginx config");
        let mut command = Command::new(nginx);
        command
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&log)
            .arg("-c")
            .arg(&conf);
        let mut guard = Guard::spawn(name, command, &log);
        guard.wait_listening(server_port(server), &log);
        Nginx { guard }
    }

    /// The master process (its workers are its children).
    fn pids(&self) -> Vec<u32> {
        vec![self.guard.pid()]
    }
}

/// The port in a server block's `listen 127.0.0.1:PORT;`.
fn server_port(server: &str) -> u16 {
    let after = server.split("listen 127.0.0.1:").nth(1).expect("listen");
    after[..after.find(';').expect(";")].parse().expect("port")
}

fn nginx_conf(dir: &Path, name: &str, server: &str, workers: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\n\
         pid {d}/nginx-{name}.pid;\nerror_log {d}/nginx-{name}.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n\
         client_body_temp_path {d}/tmp/{name}-body;\n  proxy_temp_path {d}/tmp/{name}-proxy;\n\
         fastcgi_temp_path {d}/tmp/{name}-fastcgi;\n  uwsgi_temp_path {d}/tmp/{name}-uwsgi;\n\
         scgi_temp_path {d}/tmp/{name}-scgi;\n{server}\n}}\n"
    )
}

/// nginx serving the static JSON body at every path.
fn static_server(port: u16, www: &Path) -> String {
    format!(
        "  server {{\n    listen 127.0.0.1:{port};\n    root {};\n    default_type application/json;\n\
         location / {{ try_files /account.json =404; }}\n  }}",
        www.display()
    )
}

/// nginx as a plain keep-alive reverse proxy in front of the static server.
fn proxy_server(port: u16, upstream: u16) -> String {
    format!(
        "  upstream static {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://static;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}"
    )
}

/// nginx with `proxy_cache` in front of the simulator: every 200 is kept 10 minutes per URI and
/// `Authorization` (the upstream's caching headers ignored), `X-Cache-Status` tells a hit. Links
/// point at nginx (`Host` passed on), as the proxy's point at the proxy. `sendfile` on, as in
/// Debian's stock `nginx.conf`.
fn cache_server(port: u16, upstream: u16, dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "  proxy_cache_path {d}/nginx-{name}-store levels=1:2 keys_zone=answers:16m max_size=1g \
         inactive=1h use_temp_path=off;\n\
         upstream sim {{ server 127.0.0.1:{upstream}; keepalive 16; }}\n\
         server {{\n    listen 127.0.0.1:{port};\n    sendfile on;\n    tcp_nopush on;\n\
         location / {{\n      proxy_pass http://sim;\n      proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\";\n      proxy_set_header Host $http_host;\n\
         proxy_cache answers;\n\
         proxy_cache_key \"$scheme$proxy_host$request_uri $http_authorization\";\n\
         proxy_cache_valid 200 10m;\n      proxy_cache_lock on;\n\
         proxy_ignore_headers Cache-Control Expires Set-Cookie Vary;\n\
         add_header X-Cache-Status $upstream_cache_status always;\n    }}\n  }}"
    )
}

/// The nginx binary; installed with apt-get when missing and running as root.
fn ensure_nginx() -> Option<PathBuf> {
    find_nginx().or_else(|| {
        apt_install("nginx");
        find_nginx()
    })
}

/// `wrk` when there is one (looked for, and installed when missing, once per run), and how the
/// report names the load generator.
fn load_generator() -> (Option<&'static Path>, &'static str) {
    static WRK: OnceLock<Option<PathBuf>> = OnceLock::new();
    match WRK.get_or_init(ensure_wrk) {
        Some(wrk) => (Some(wrk), "wrk (1 thread)"),
        None => (
            None,
            "the bench's own client (hyper-util; wrk not available)",
        ),
    }
}

/// `wrk`, installed with apt-get when missing and running as root.
fn ensure_wrk() -> Option<PathBuf> {
    let find = || {
        command_output("sh", &["-c", "command -v wrk"])
            .map(PathBuf::from)
            .filter(|p| p.exists())
    };
    find().or_else(|| {
        apt_install("wrk");
        find()
    })
}

/// Installs a Debian package when running as root; the caller looks for it afterwards.
fn apt_install(package: &str) {
    if command_output("id", &["-u"]).as_deref() != Some("0") {
        return;
    }
    eprintln!("  installing {package} (apt-get)");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if apt(&["update"]) {
        apt(&["install", "-y", package]);
    }
}

fn find_nginx() -> Option<PathBuf> {
    command_output("sh", &["-c", "command -v nginx"])
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")))
        .filter(|p| p.exists())
}

// ---------------------------------------------------------------------------------------------
// Helpers: HTTP, ports, machine
// ---------------------------------------------------------------------------------------------

fn http_client(pool: usize) -> Http {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(pool)
        .build_http()
}

/// `GET url` with the demo token, body read to the end.
async fn get(client: &Http, url: &str) -> Result<(StatusCode, Bytes), String> {
    get_full(client, url)
        .await
        .map(|(status, _, body)| (status, body))
}

/// `GET url` with the demo token: status, headers, and the body read to the end.
async fn get_full(client: &Http, url: &str) -> Result<(StatusCode, HeaderMap, Bytes), String> {
    let req = Request::get(url)
        .header(http::header::AUTHORIZATION, AUTH)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?;
    Ok((parts.status, parts.headers, body.to_bytes()))
}

/// A loopback port free right now (bound and released).
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A command's trimmed stdout (or stderr when stdout is empty), if it ran successfully.
fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    Some(String::from_utf8_lossy(&text).trim().to_string())
}

/// What the numbers were measured on.
struct Machine {
    date: String,
    nproc: String,
    cpu: String,
    rustc: String,
    kernel: String,
    nginx: String,
}

impl Machine {
    fn probe() -> Machine {
        let unknown = || "unknown".to_string();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string());
        Machine {
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(unknown),
            nproc: command_output("nproc", &[]).unwrap_or_else(unknown),
            cpu: cpu.unwrap_or_else(unknown),
            rustc: command_output("rustc", &["--version"]).unwrap_or_else(unknown),
            kernel: command_output("uname", &["-sr"]).unwrap_or_else(unknown),
            nginx: find_nginx()
                .and_then(|p| command_output(p.to_str()?, &["-v"]))
                .unwrap_or_else(|| "not installed".into()),
        }
    }
}

fn median(values: &[Duration]) -> Duration {
    let mut secs: Vec<f64> = values.iter().map(Duration::as_secs_f64).collect();
    Duration::from_secs_f64(median_f(&mut secs))
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

struct Report {
    machine: Machine,
    command: String,
    /// The earlier binary measured beside the current one, when one was named.
    before: Option<Before>,
    /// Rounds per target in scenarios 2 and 4, and the length of a loaded round.
    rounds: usize,
    round: Duration,
    cold: ColdPages,
    pass: PassThrough,
    cached: Cached,
    dashboard: Dashboard,
    took: Duration,
}

impl Report {
    fn render(&self) -> String {
        let mut out = String::new();
        self.header(&mut out);
        self.cold_table(&mut out);
        self.pass_table(&mut out);
        self.rss_table(&mut out);
        self.cached_table(&mut out);
        self.dashboard_table(&mut out);
        self.targets_table(&mut out);
        out
    }

    /// How scenarios 2 and 4 take turns between their targets, and what their figures are.
    fn rounds_text(&self) -> String {
        format!(
            "Each target is loaded once to warm it up, then measured in {} round(s) of {} s \
             ({} s for one connection), the targets taking turns within a round and each round \
             starting one target further on, so a change in what else the machine runs falls on \
             all of them alike. **requests/s** and the latencies are the medians of the rounds' \
             figures, **rounds' requests/s** the lowest and highest round, and every throughput \
             ratio is the median of the rounds' ratios (two runs made one after the other).",
            self.rounds,
            self.round.as_secs(),
            UNLOADED_ROUND.as_secs(),
        )
    }

    fn header(&self, out: &mut String) {
        let m = &self.machine;
        let _ = write!(
            out,
            "# End-to-end benchmark\n\n\
             Generated by `{}` (`benches/end_to_end.rs`); every full run rewrites the file up to \
             `Live views`, whose sections other benchmarks write. Do not edit it by hand.\n\n\
             - date: {}\n- machine: {} CPUs (`nproc`), {}, {}\n- toolchain: {}, release profile\n\
             - nginx: {}\n{}- took: {:.0} s\n\n\
             Everything ran on 127.0.0.1, and the load client shares the CPUs with the servers. \
             Logging is on an equal footing in the throughput scenarios (2, 4, 5): nginx runs with \
             `access_log off` and the proxy with `RUST_LOG=warn`, so neither writes a line per \
             request; scenario 1 leaves the proxy at its default level (`info`).\n\n",
            self.command,
            m.date,
            m.nproc,
            m.cpu,
            m.kernel,
            m.rustc,
            m.nginx,
            self.before_line(),
            self.took.as_secs_f64()
        );
    }

    /// The header's line on the before binary; empty without one.
    fn before_line(&self) -> String {
        match &self.before {
            Some(b) => format!(
                "- {}: `{}` (`{BEFORE_ENV}`), an earlier build run side by side with the current \
                 one in scenarios 1 to 4, in the same rounds\n",
                b.label,
                b.binary.display()
            ),
            None => String::new(),
        }
    }

    /// How the report names the before binary (`before` when it did not run).
    fn before_label(&self) -> &str {
        self.before.as_ref().map_or("before", |b| b.label.as_str())
    }

    fn cold_table(&self, out: &mut String) {
        let c = &self.cold;
        let runs = c.rows.first().map_or(0, |r| r.runs);
        let with_before = self.before.is_some();
        let label = self.before_label();
        // The before binary's columns: after the proxy's time, and after its 429s.
        let (before_time, before_limit) = if with_before {
            (
                format!(" {label} ms (x floor) | proxy / {label} |"),
                format!(" {label} upstream req/run, max arrivals in 1 s, 429s |"),
            )
        } else {
            (String::new(), String::new())
        };
        let before_align = if with_before { "---:|---:|" } else { "" };
        let before_limit_align = if with_before { "---:|" } else { "" };
        let before_text = if with_before {
            format!(
                " **{label}** is the earlier binary (`{BEFORE_ENV}`) set up the same way, its run \
                 taking its turn right after the current proxy's within each run of a K."
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "## 1. Cold first page of K stages\n\n\
             Simulated account: 20 000 leads, fixed 100 ms latency, its own limit of {RATE} requests \
             in any 1 s (429 past it). The proxy: the release binary, default limiter ({RATE} per 1 s). \
             Page: `limit={PAGE}&order[created_at]=desc`. Median of {runs} run(s) per K, each \
             started cold (idle limiter, empty simulator window, the proxy's response cache off \
             with `KOMMO_FANOUT_CACHE_TTL=0s`; connections stay pooled). {} of the {} stages \
             have no leads (padding when the account has fewer stages with leads).{before_text}\n\n\
             | K | proxy ms (x floor) |{before_time} sequential ms (x floor) | concurrent, no limiter ms (x floor) | floor ms | safe floor ms (proxy x safe floor) | proxy upstream req/run | proxy max arrivals in 1 s | proxy 429s |{before_limit} sequential 429s/run | concurrent 429s/run | same page |\n\
             |---:|---:|{before_align}---:|---:|---:|---:|---:|---:|---:|{before_limit_align}---:|---:|:---:|\n",
            c.padded,
            c.stages
        );
        for r in &c.rows {
            let floor = r.floor();
            let cell = |v: &[Duration]| {
                let m = median(v);
                format!("{} ({:.2}x)", ms(m), m.as_secs_f64() / floor.as_secs_f64())
            };
            let per_run = |n: usize| format!("{:.1}", n as f64 / r.runs as f64);
            let safe = r.safe_floor();
            let (before_time, before_limit) = if with_before {
                (
                    format!(
                        " {} | {} |",
                        cell(&r.before),
                        r.current_over_before()
                            .map_or("n/a".to_string(), |x| format!("{x:.2}"))
                    ),
                    format!(
                        " {}, {}, {} |",
                        per_run(r.before_upstream),
                        r.before_max_window,
                        r.before_429
                    ),
                )
            } else {
                (String::new(), String::new())
            };
            let _ = writeln!(
                out,
                "| {} | {} |{before_time} {} | {} | {} | {} ({:.2}x) | {} | {} | {} |{before_limit} {} | {} | {} |",
                r.k,
                cell(&r.proxy),
                cell(&r.sequential),
                cell(&r.concurrent),
                ms(floor),
                ms(safe),
                r.proxy_over(safe),
                per_run(r.proxy_upstream),
                r.proxy_max_window,
                r.proxy_429,
                per_run(r.sequential_429),
                per_run(r.concurrent_429),
                if r.same_page { "yes" } else { "NO" }
            );
        }
        out.push_str(
            "\n- **proxy**: one `GET /api/v4/leads` with K `filter[statuses]` pairs to the proxy, \
             until its whole answer is read.\n\
             - **sequential**: what integrations do today: one request per stage straight to the \
             simulator, one after the other, sleeping `retry_after` on a 429 and retrying, then \
             merging the pages locally.\n\
             - **concurrent, no limiter**: all K requests to the simulator at once; those refused \
             with 429 are sent again together after `retry_after`, until every stage answered.\n\
             - **floor**: `ceil(K/7) - 1` full 1 s windows plus one 100 ms round trip: the least \
             any client can take under the limit if it knew when each request arrived.\n\
             - **x floor**: the median divided by the floor.\n\
             - **safe floor**: the floor of a client that never trips the limit whatever the \
             network does: it may send a request a full window after an earlier one *arrived*, \
             and it knows that only when the answer is back. Each batch of 7 then costs a \
             round trip on top of its window: `ceil(K/7) - 1` windows plus `ceil(K/7)` round \
             trips, the same as the floor for K <= 7. The proxy's limiter works so: a slot is \
             reused a window (and a 25 ms margin) after its request's answer.\n\
             - **proxy upstream req/run**, **max arrivals in 1 s**, **proxy 429s**: from the \
             simulator's request log during the proxy runs (the max over all runs, the 429s \
             summed over all runs). The limit holds when the max is <= 7 and there is no 429.\n\
             - **429s/run**: refusals the direct clients earned (Kommo blocks an address after \
             repeated ones; here the simulator's block is set to 1000 so the run goes on).\n\
             - **same page**: the three clients got the same 50 lead ids in the same order in \
             every run (the before binary too, when it ran).\n",
        );
        if with_before {
            let _ = writeln!(
                out,
                "- **proxy / {label}**: the current proxy's median time over the before binary's \
                 (below 1: the current one is faster); the before binary's upstream requests, \
                 arrivals and 429s are read from the simulator's log as the proxy's are."
            );
        }
        out.push('\n');
    }

    fn pass_table(&self, out: &mut String) {
        let p = &self.pass;
        let _ = write!(
            out,
            "## 2. Pass-through overhead\n\n\
             `GET {PASS_PATH}` answered by nginx with a static {} byte JSON file. Load: {}, \
             keep-alive connections, {CONNECTIONS} at once for the throughput rows and {UNLOADED} \
             (one request at a time, nothing queued) for the latency rows. {} \
             **CPU us/request** is the user + system time of the measured hop's own processes \
             (`/proc/PID/stat`) over its runs divided by their answers: what one request costs \
             it, whatever else the machine runs. **client CPU** is wrk's user + system time over \
             its runs as a share of the one core its one thread can use: at 95 % or more the \
             client, not the target, sets the requests/s, and a ratio between two such rows \
             says little about either target (the Targets table marks it client-bound).\n\n\
             | target | connections | requests/s | rounds' requests/s | p50 ms | p99 ms | CPU us/request | client CPU | requests | errors |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            p.body_bytes,
            p.generator,
            self.rounds_text(),
        );
        let Some(r) = &p.rows else {
            out.push_str("| n/a (nginx not available) | | | | | | | | | |\n\n");
            return;
        };
        let label = self.before_label();
        let mut rows: Vec<(String, usize, &Rounds)> = vec![
            (
                "direct to the static nginx (1 worker)".into(),
                CONNECTIONS,
                &r.direct,
            ),
            (
                "kommo-fanout (one worker thread per CPU)".into(),
                CONNECTIONS,
                &r.proxy,
            ),
            (
                "kommo-fanout (`--worker-threads 1`)".into(),
                CONNECTIONS,
                &r.proxy_one_thread,
            ),
        ];
        if let Some(b) = &r.before {
            rows.push((
                format!("{label} (one worker thread per CPU)"),
                CONNECTIONS,
                &b.proxy,
            ));
            rows.push((
                format!("{label} (`--worker-threads 1`)"),
                CONNECTIONS,
                &b.proxy_one_thread,
            ));
        }
        rows.extend([
            (
                "bare hyper relay (1 thread, none of the proxy's work)".into(),
                CONNECTIONS,
                &r.bare,
            ),
            (
                "nginx reverse proxy (1 worker)".into(),
                CONNECTIONS,
                &r.nginx,
            ),
            (
                "nginx reverse proxy (`worker_processes auto`)".into(),
                CONNECTIONS,
                &r.nginx_auto,
            ),
            (
                "direct to the static nginx".into(),
                UNLOADED,
                &r.direct_unloaded,
            ),
            (
                "kommo-fanout (one worker thread per CPU)".into(),
                UNLOADED,
                &r.proxy_unloaded,
            ),
        ]);
        if let Some(b) = &r.before {
            rows.push((
                format!("{label} (one worker thread per CPU)"),
                UNLOADED,
                &b.proxy_unloaded,
            ));
        }
        rows.push((
            "nginx reverse proxy (1 worker)".into(),
            UNLOADED,
            &r.nginx_unloaded,
        ));
        for (name, connections, rounds) in rows {
            let stats = rounds.summary();
            let cpu = cpu_cell(stats.cpu_per_request);
            let client = busy_cell(stats.client_busy);
            let _ = writeln!(
                out,
                "| {name} | {connections} | {:.0} | {} | {:.3} | {:.3} | {cpu} | {client} | {} | {} |",
                stats.rps,
                rounds.range_cell(),
                ms_f(stats.p50),
                ms_f(stats.p99),
                stats.requests,
                stats.errors
            );
        }
        out.push('\n');
        let proxy_unloaded = added(&r.proxy_unloaded, &r.direct_unloaded);
        let nginx_unloaded = added(&r.nginx_unloaded, &r.direct_unloaded);
        let proxy_loaded = added(&r.proxy, &r.direct);
        let nginx_loaded = added(&r.nginx, &r.direct);
        let _ = writeln!(
            out,
            "- latency added to direct, {UNLOADED} connection: kommo-fanout p50 {:+.3} ms, p99 \
             {:+.3} ms; nginx reverse proxy p50 {:+.3} ms, p99 {:+.3} ms\n\
             - latency added to direct, {CONNECTIONS} connections (queueing included): \
             kommo-fanout p50 {:+.2} ms, p99 {:+.2} ms; nginx reverse proxy p50 {:+.2} ms, p99 \
             {:+.2} ms\n\
             - throughput kommo-fanout / nginx reverse proxy, same CPUs (median of the rounds' \
             ratios): one worker thread per CPU / `worker_processes auto` {:.2}; one thread / 1 \
             worker {:.2}\n\
             - CPU per request kommo-fanout / nginx reverse proxy: one thread / 1 worker {}; one \
             worker thread per CPU / `worker_processes auto` {}\n\
             - the proxy's own work, kommo-fanout / bare hyper relay, one thread each: throughput \
             {:.2}, CPU per request {}\n\
             - the HTTP stack, bare hyper relay / nginx reverse proxy, one thread / 1 worker: \
             throughput {:.2}, CPU per request {}",
            proxy_unloaded.0,
            proxy_unloaded.1,
            nginx_unloaded.0,
            nginx_unloaded.1,
            proxy_loaded.0,
            proxy_loaded.1,
            nginx_loaded.0,
            nginx_loaded.1,
            paired_ratio(&r.proxy, &r.nginx_auto),
            paired_ratio(&r.proxy_one_thread, &r.nginx),
            cpu_ratio(&r.proxy_one_thread.summary(), &r.nginx.summary()),
            cpu_ratio(&r.proxy.summary(), &r.nginx_auto.summary()),
            paired_ratio(&r.proxy_one_thread, &r.bare),
            cpu_ratio(&r.proxy_one_thread.summary(), &r.bare.summary()),
            paired_ratio(&r.bare, &r.nginx),
            cpu_ratio(&r.bare.summary(), &r.nginx.summary()),
        );
        if let Some(b) = &r.before {
            let unloaded = added(&b.proxy_unloaded, &r.direct_unloaded);
            let _ = writeln!(
                out,
                "- {label}: latency added to direct, {UNLOADED} connection: p50 {:+.3} ms, p99 \
                 {:+.3} ms\n\
                 - throughput kommo-fanout / {label} (median of the rounds' ratios): one worker \
                 thread per CPU {:.2}; one thread {:.2}\n\
                 - CPU per request kommo-fanout / {label}: one worker thread per CPU {}; one \
                 thread {}",
                unloaded.0,
                unloaded.1,
                paired_ratio(&r.proxy, &b.proxy),
                paired_ratio(&r.proxy_one_thread, &b.proxy_one_thread),
                cpu_ratio(&r.proxy.summary(), &b.proxy.summary()),
                cpu_ratio(&r.proxy_one_thread.summary(), &b.proxy_one_thread.summary()),
            );
        }
        out.push_str(
            "\n- **direct**: the floor: the static nginx alone.\n\
             - **kommo-fanout**: the release proxy with `--upstream` at the static nginx and its \
             limiter raised out of the way (`--rate-limit 10000 --rate-window 1ms --rate-margin \
             0ms`, response cache off, `RUST_LOG=warn`); the answer streams through unchanged. \
             By default it serves on tokio's multi-thread runtime with one worker thread per \
             CPU; `--worker-threads 1` gives the runtime one.\n\
             - **bare hyper relay**: the least a relay built on the proxy's HTTP stack does, run \
             by the bench itself (`end_to_end --bare-relay`): hyper's HTTP/1 server and \
             hyper-util's pooled client on one current-thread runtime, each request sent on as it \
             came. No limiter, metrics, request id, deadlines, bounds, hop-by-hop stripping, \
             HTTP/2 or header-read timer. The proxy against it is what the proxy's own work \
             costs; it against nginx is what the HTTP stack costs.\n\
             - **nginx reverse proxy**: a second nginx with `proxy_pass` to the static one over an \
             upstream keep-alive pool: the baseline for a plain reverse proxy, with 1 worker and \
             with one per CPU.\n\
             - The load generator, the static upstream and the hop measured share the CPUs, so \
             requests/s is what is left of them for the hop; CPU per request does not depend on \
             that share and is the steadier figure from run to run.\n",
        );
        self.before_note(out);
        out.push('\n');
    }

    /// The notes' line on the before binary; nothing without one.
    fn before_note(&self, out: &mut String) {
        if let Some(b) = &self.before {
            let _ = writeln!(
                out,
                "- **{}**: an earlier proxy binary (`{BEFORE_ENV}`) with the same flags, each of \
                 its rows measured in the same rounds as the current proxy's.",
                b.label
            );
        }
    }

    fn rss_table(&self, out: &mut String) {
        let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
        let row = |name: &str, rss: Option<Rss>| match rss {
            Some(r) => format!("| {name} | {} | {} |\n", mib(r.idle), mib(r.after)),
            None => format!("| {name} | n/a | n/a |\n"),
        };
        out.push_str(
            "## 3. Peak RSS of the proxy\n\n\
             `VmHWM` from `/proc/PID/status` of each proxy child process: once healthy (idle) and \
             after its scenario (in scenarios 2 and 4, the proxy with one worker thread per \
             CPU).\n\n\
             | proxy process | idle peak MiB | peak MiB after the scenario |\n|---|---:|---:|\n",
        );
        let label = self.before_label();
        let before: [Option<Rss>; 3] = [
            self.cold.before_rss,
            self.pass.before_rss,
            self.cached.before_rss,
        ];
        for (i, (name, rss)) in self.rss_rows().into_iter().enumerate() {
            out.push_str(&row(name, rss));
            if self.before.is_some() {
                if let Some(&rss) = before.get(i) {
                    out.push_str(&row(&format!("{label}: {name}"), rss));
                }
            }
        }
        out.push('\n');
    }

    /// Each scenario's proxy memory; `None` where the scenario did not run.
    fn rss_rows(&self) -> [(&'static str, Option<Rss>); 4] {
        [
            (
                "scenario 1 (fan-out in front of the simulator)",
                Some(self.cold.rss),
            ),
            ("scenario 2 (pass-through, 32 connections)", self.pass.rss),
            (
                "scenario 4 (cached answers, 32 connections)",
                self.cached.rss,
            ),
            (
                "scenario 5 (dashboard, 100 clients)",
                Some(self.dashboard.rss),
            ),
        ]
    }

    fn cached_table(&self, out: &mut String) {
        let c = &self.cached;
        let leads = |n: &[usize]| {
            n.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = write!(
            out,
            "## 4. Cached answers\n\n\
             One leads page asked over and over by {CONNECTIONS} concurrent keep-alive connections \
             ({}), answered from a warm cache, with the CPU time of the cache's own processes per \
             answer and the client's share of its core as in scenario 2. {} The \
             page: `limit={CACHED_LIMIT}&order[created_at]=desc` of the account's largest stage \
             ({} leads), and for the merged page of its {CACHED_STAGES} largest ({} leads); the \
             **default-limit** rows ask the same stage with `limit={DEFAULT_LIMIT}`, the size a \
             client gets when it names none, where wrk has fewer bytes to read and the caches' \
             own work per answer weighs more. Every \
             cache sits in front of one simulator set up as in scenario 1. Every measured answer \
             was a cache hit (asserted; the hit ratio is in the table) and the simulator saw {} \
             request(s) while the caches were measured.\n\n\
             | target | body bytes | cache hits | requests/s | rounds' requests/s | p50 ms | p99 ms | CPU us/request | client CPU | requests | errors |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            c.generator,
            self.rounds_text(),
            leads(&c.stage_leads[..1.min(c.stage_leads.len())]),
            leads(&c.stage_leads),
            c.upstream_during_load
        );
        for row in &c.rows {
            let hits = row
                .hit_ratio()
                .map_or("n/a".to_string(), |r| format!("{:.1}%", r * 100.0));
            let _ = writeln!(
                out,
                "| {} | {} | {hits} | {} |",
                row.target,
                row.body_bytes,
                load_cells(row.rounds.as_ref(), NO_NGINX)
            );
        }
        out.push('\n');
        let label = self.before_label();
        let sides: &[(&str, bool)] = if self.before.is_some() {
            &[("proxy", false), (label, true)]
        } else {
            &[("proxy", false)]
        };
        for &(who, before) in sides {
            match self.cached_pairs(before) {
                Some(pairs) => {
                    for (proxy_row, proxy, nginx_row, nginx) in pairs {
                        let (p, n) = (proxy.summary(), nginx.summary());
                        let _ = writeln!(
                            out,
                            "- {who} ({proxy_row}) / nginx `proxy_cache` ({nginx_row}): \
                             throughput {:.2}, p50 {:+.2} ms, p99 {:+.2} ms, CPU per request {}",
                            paired_ratio(proxy, nginx),
                            ms_f(p.p50) - ms_f(n.p50),
                            ms_f(p.p99) - ms_f(n.p99),
                            cpu_ratio(&p, &n),
                        );
                    }
                }
                None => {
                    out.push_str("Ratios: n/a (nginx not available)\n");
                    break;
                }
            }
        }
        if let (Some(current), Some(before)) = (self.cached_pairs(false), self.cached_pairs(true)) {
            for ((row, proxy, _, _), (_, earlier, _, _)) in current.into_iter().zip(before) {
                let (p, b) = (proxy.summary(), earlier.summary());
                let _ = writeln!(
                    out,
                    "- proxy / {label} ({row}): throughput {:.2}, p50 {:+.2} ms, CPU per request {}",
                    paired_ratio(proxy, earlier),
                    ms_f(p.p50) - ms_f(b.p50),
                    cpu_ratio(&p, &b),
                );
            }
        }
        out.push_str(
            "\n- **kommo-fanout**: the release proxy with `--cache-ttl 10m` and `RUST_LOG=warn`, \
             its runtime with one worker thread per CPU (the default) or one \
             (`--worker-threads 1`), the simulator as its upstream; warmed until it answers \
             `X-Cache: HIT`. The single-stage page is relayed (hrefs moved to the proxy) and \
             stored; the 5-stage page is the merged HAL page, stored ready.\n\
             - **nginx `proxy_cache`**: nginx (1 worker, or `worker_processes auto` = one per CPU \
             like the proxy's worker threads; `sendfile on`, `access_log off`) with \
             `proxy_pass` to the simulator, `proxy_cache_path` in the scratch directory, \
             `proxy_cache_key \"$scheme$proxy_host$request_uri $http_authorization\"`, \
             `proxy_cache_valid 200 10m`, `proxy_ignore_headers Cache-Control Expires Set-Cookie \
             Vary` and `add_header X-Cache-Status $upstream_cache_status`; warmed until it \
             answers `HIT`. nginx cannot merge stages, so the merged page has no nginx row: its \
             ratios are taken against nginx's single-stage page (a body of similar size).\n\
             - **cache hits**: with wrk, which reads no headers, every 2xx answer of a run counts \
             as a hit when the simulator saw no request during it (a miss would have reached \
             it); with the bench's own client, the share of answers with `X-Cache: HIT` (proxy) \
             or `X-Cache-Status: HIT` (nginx), an answer of another length than the warm one \
             counting as an error.\n",
        );
        self.before_note(out);
        out.push('\n');
    }

    /// The rounds of scenario 4's row for `served` (the before binary's when `before`); `None`
    /// when it was not measured.
    fn cached_rounds(&self, served: Served, before: bool) -> Option<&Rounds> {
        let row = self.cached.rows.iter();
        let mut row = row.filter(|r| r.served == served && r.before == before);
        row.next()?.rounds.as_ref()
    }

    /// Each proxy row of scenario 4 (the current proxy's, or the before binary's when `before`)
    /// with the nginx row of as many processes as it has worker threads: (proxy row, its rounds,
    /// nginx row, its rounds); `None` without nginx or without those rows.
    fn cached_pairs(
        &self,
        before: bool,
    ) -> Option<[(&'static str, &Rounds, &'static str, &Rounds); 4]> {
        let rounds = |served: Served, before: bool| self.cached_rounds(served, before);
        let (auto, one) = (
            "`worker_processes auto`, single-stage page",
            "1 worker, single-stage page",
        );
        Some([
            (
                "one worker thread per CPU, single-stage page",
                rounds(Served::Single, before)?,
                auto,
                rounds(Served::NginxAuto, false)?,
            ),
            (
                "one worker thread per CPU, merged 5-stage page",
                rounds(Served::Merged, before)?,
                auto,
                rounds(Served::NginxAuto, false)?,
            ),
            (
                "`--worker-threads 1`, single-stage page",
                rounds(Served::OneThread, before)?,
                one,
                rounds(Served::Nginx, false)?,
            ),
            (
                "`--worker-threads 1`, default-limit page",
                rounds(Served::OneThreadDefault, before)?,
                "1 worker, default-limit page",
                rounds(Served::NginxDefault, false)?,
            ),
        ])
    }

    fn dashboard_table(&self, out: &mut String) {
        let d = &self.dashboard;
        let views = VIEWS
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let total: usize = VIEWS.iter().sum();
        let periods = d.minimum / total.max(1);
        let ttl = if d.ttl == DEFAULT_TTL {
            format!("{} s (the default)", d.ttl.as_secs())
        } else {
            format!("{} s (`--cache-ttl`)", d.ttl.as_secs())
        };
        let s = &d.stats;
        let _ = write!(
            out,
            "## 5. Dashboard load\n\n\
             {DASHBOARD_CLIENTS} concurrent clients poll {} multi-stage views (stages per view: \
             {views}; {total} distinct stages with leads, `limit={PAGE}&order[created_at]=desc`) \
             in a closed loop, each client going round the views from its own starting view, for \
             {} s from a cold start. The proxy: the release binary, default limiter ({RATE} per \
             1 s), response cache TTL {ttl}, `RUST_LOG=warn`. The simulator: 100 ms latency, its \
             own limit of {RATE} in any 1 s.\n\n\
             | upstream requests | minimum | max arrivals in 1 s | simulator 429s | answers/s | p50 ms | p99 ms | max ms | answers | cache hits | errors |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.0} | {} | {:.2}% | {} |\n\n",
            VIEWS.len(),
            d.duration.as_secs(),
            d.upstream,
            d.minimum,
            d.max_window,
            d.too_many,
            s.rps,
            ms_f(s.p50),
            ms_f(s.p99),
            ms_f(s.max),
            s.requests,
            s.hits as f64 * 100.0 / s.requests.max(1) as f64,
            s.errors,
        );
        let _ = write!(
            out,
            "- **upstream requests**: every request the simulator saw during the run (its own \
             log).\n\
             - **minimum**: each view's stages fetched once per TTL period: {total} stages x \
             ceil({} s / {} s) = {total} x {periods} = {}.\n\
             - **max arrivals in 1 s**, **simulator 429s**: the limit holds when the max is <= \
             {RATE} and there is no 429 (must be 0).\n\
             - **answers/s**, **p50/p99/max**: all {DASHBOARD_CLIENTS} clients' `200` answers \
             within the run, the cold fills and the refills after each expiry included (the \
             max is a client that waited for a fill behind the limiter).\n\
             - **cache hits**: answers with `X-Cache: HIT`.\n",
            d.duration.as_secs(),
            d.ttl.as_secs(),
            d.minimum,
        );
    }

    /// The benchmark's targets, each with what this run measured and whether it meets it.
    fn targets_table(&self, out: &mut String) {
        let verdict = |met: bool| if met { "yes" } else { "no" };
        let mut rows: Vec<(String, String, &str)> = Vec::new();
        let cold = &self.cold.rows;
        // The proxy's worst median over the Ks on one side of 7, against `floor`.
        let mut cold_row = |target: &str, small: bool, floor: fn(&KRow) -> Duration, max: f64| {
            let picked: Vec<&KRow> = cold.iter().filter(|r| (r.k <= RATE) == small).collect();
            if picked.is_empty() {
                return;
            }
            let worst = picked
                .iter()
                .map(|r| r.proxy_over(floor(r)))
                .fold(0.0, f64::max);
            let ks: Vec<String> = picked.iter().map(|r| r.k.to_string()).collect();
            rows.push((
                target.to_string(),
                format!("at most {worst:.2}x (K = {})", ks.join(", ")),
                verdict(worst <= max),
            ));
        };
        cold_row(
            "cold first page, K <= 7: within 1.5x one upstream round trip",
            true,
            KRow::floor,
            1.5,
        );
        cold_row(
            "cold first page, K > 7: within 10 % of the rate-limit floor",
            false,
            KRow::floor,
            1.1,
        );
        cold_row(
            "cold first page, K > 7: within 10 % of the safe floor",
            false,
            KRow::safe_floor,
            1.1,
        );
        if self.before.is_some() {
            let ratios: Vec<String> = cold
                .iter()
                .filter_map(|r| Some(format!("K = {}: {:.2}", r.k, r.current_over_before()?)))
                .collect();
            rows.push((
                format!(
                    "cold first page, proxy / {} (median time; below 1: the proxy is faster)",
                    self.before_label()
                ),
                ratios.join("; "),
                COMPARISON,
            ));
        }
        let arrivals = cold
            .iter()
            .map(|r| r.proxy_max_window)
            .chain([self.dashboard.max_window])
            .max()
            .unwrap_or(0);
        let refused = cold.iter().map(|r| r.proxy_429).sum::<usize>() + self.dashboard.too_many;
        rows.push((
            format!(
                "upstream limit never exceeded (scenarios 1 and 5): at most {RATE} arrivals in \
                 any 1 s, no 429"
            ),
            format!("at most {arrivals} arrivals in 1 s, {refused} 429s"),
            verdict(arrivals <= RATE && refused == 0),
        ));
        let label = self.before_label();
        match self.cached_pairs(false) {
            Some(pairs) => {
                let before = self.cached_pairs(true);
                for (i, (proxy_row, proxy, nginx_row, nginx)) in pairs.into_iter().enumerate() {
                    let ratio = paired_ratio(proxy, nginx);
                    rows.push((
                        format!(
                            "cached answers/s at least {CACHED_TARGET}x nginx `proxy_cache`'s: \
                             proxy ({proxy_row}) / nginx ({nginx_row})"
                        ),
                        format!("{ratio:.2}{}", client_bound_note(proxy, nginx)),
                        verdict(ratio >= CACHED_TARGET),
                    ));
                    if let Some((_, earlier, _, _)) = before.map(|b| b[i]) {
                        let ratio = paired_ratio(earlier, nginx);
                        rows.push((
                            format!("the same, {label} ({proxy_row}) / nginx ({nginx_row})"),
                            format!("{ratio:.2}{}", client_bound_note(earlier, nginx)),
                            verdict(ratio >= CACHED_TARGET),
                        ));
                    }
                }
                if let Some(before) = before {
                    let ratios: Vec<String> = self
                        .cached_pairs(false)
                        .into_iter()
                        .flatten()
                        .zip(before)
                        .map(|((row, proxy, _, _), (_, earlier, _, _))| {
                            format!("{row}: {:.2}", paired_ratio(proxy, earlier))
                        })
                        .collect();
                    rows.push((
                        format!("cached answers/s, proxy / {label}"),
                        ratios.join("; "),
                        COMPARISON,
                    ));
                }
            }
            None => rows.push((
                format!("cached answers/s at least {CACHED_TARGET}x nginx `proxy_cache`'s"),
                NO_NGINX.to_string(),
                "n/a",
            )),
        }
        match &self.pass.rows {
            Some(r) => {
                let (p50, _) = added(&r.proxy_unloaded, &r.direct_unloaded);
                rows.push((
                    "pass-through latency added under 0.2 ms at p50 (1 connection): proxy"
                        .to_string(),
                    format!("{p50:+.3} ms"),
                    verdict(p50 < 0.2),
                ));
                if let Some(b) = &r.before {
                    let (p50, _) = added(&b.proxy_unloaded, &r.direct_unloaded);
                    rows.push((
                        format!("the same, {label}"),
                        format!("{p50:+.3} ms"),
                        verdict(p50 < 0.2),
                    ));
                }
                for (threads, proxy, workers, nginx) in [
                    (
                        "one worker thread per CPU",
                        &r.proxy,
                        "`worker_processes auto`",
                        &r.nginx_auto,
                    ),
                    ("one thread", &r.proxy_one_thread, "1 worker", &r.nginx),
                ] {
                    let ratio = paired_ratio(proxy, nginx);
                    rows.push((
                        format!(
                            "pass-through throughput at least nginx's as a reverse proxy: proxy \
                             ({threads}) / nginx ({workers})"
                        ),
                        format!(
                            "{ratio:.2} (the bare hyper relay, one thread / 1 worker: {:.2}){}",
                            paired_ratio(&r.bare, &r.nginx),
                            client_bound_note(proxy, nginx)
                        ),
                        verdict(ratio >= 1.0),
                    ));
                }
                if let Some(b) = &r.before {
                    rows.push((
                        format!(
                            "pass-through throughput ({CONNECTIONS} connections), proxy / {label}"
                        ),
                        format!(
                            "one worker thread per CPU: {:.2}{}; one thread: {:.2}{}",
                            paired_ratio(&r.proxy, &b.proxy),
                            client_bound_note(&r.proxy, &b.proxy),
                            paired_ratio(&r.proxy_one_thread, &b.proxy_one_thread),
                            client_bound_note(&r.proxy_one_thread, &b.proxy_one_thread),
                        ),
                        COMPARISON,
                    ));
                }
            }
            None => rows.push((
                "pass-through overhead against nginx".to_string(),
                NO_NGINX.to_string(),
                "n/a",
            )),
        }
        let d = &self.dashboard;
        rows.push((
            "dashboard load: upstream requests within 10 % of the minimum".to_string(),
            format!("{} for a minimum of {}", d.upstream, d.minimum),
            verdict(d.upstream as f64 <= d.minimum as f64 * 1.1),
        ));
        let peak = self.rss_rows().into_iter();
        let peak = peak.filter_map(|(_, rss)| rss).map(|r| r.after).max();
        let peak = peak.unwrap_or(0);
        let peak = peak as f64 / 1024.0;
        rows.push((
            "proxy RSS under 64 MiB outside what the cache holds".to_string(),
            format!("peak {peak:.1} MiB, cache included"),
            verdict(peak < 64.0),
        ));
        out.push_str(
            "\n## 6. Targets\n\n\
             Each target the benchmark is held to, what this run measured, and whether that meets \
             it (worked out by the bench from the tables above).\n\n\
             | target | this run | met |\n|---|---|:---:|\n",
        );
        for (target, measured, met) in rows {
            let _ = writeln!(out, "| {target} | {measured} | {met} |");
        }
        out.push_str(
            "\n- **one upstream round trip**: the simulator's fixed latency, 100 ms; for K <= 7 \
             it is also the floor.\n\
             - **the safe floor** row holds the proxy to the least a client can take that never \
             trips the limit, whatever the network delays (scenario 1); the row above it, to the \
             floor of a client that knows when each request arrived.\n\
             - **the bare hyper relay**, beside the throughput ratios: about what the proxy would \
             reach on its HTTP stack with none of its own work (scenario 2).\n",
        );
        if self.before.is_some() {
            let _ = writeln!(
                out,
                "- **{}**: the earlier binary measured side by side with the current one in this \
                 run. The rows on it that name a target hold it to the same one; the rows marked \
                 `{COMPARISON}` compare the two and have no target of their own (a ratio above 1 \
                 for answers/s, below 1 for a time, favours the current proxy).",
                self.before_label()
            );
        }
    }
}

/// The six cells of a load row; `missing` fills a row not measured.
fn load_cells(rounds: Option<&Rounds>, missing: &str) -> String {
    match rounds {
        Some(r) => {
            let s = r.summary();
            format!(
                "{:.0} | {} | {:.2} | {:.2} | {} | {} | {} | {}",
                s.rps,
                r.range_cell(),
                ms_f(s.p50),
                ms_f(s.p99),
                cpu_cell(s.cpu_per_request),
                busy_cell(s.client_busy),
                s.requests,
                s.errors
            )
        }
        None => format!("{missing} | | | | | | |"),
    }
}

/// CPU time per request in microseconds, or `n/a`.
fn cpu_cell(cpu: Option<Duration>) -> String {
    cpu.map_or("n/a".to_string(), |d| {
        format!("{:.1}", d.as_secs_f64() * 1e6)
    })
}

/// The cached-answers target: the proxy's answers/s over nginx `proxy_cache`'s at least this.
const CACHED_TARGET: f64 = 0.8;

/// The "met" cell of a Targets row that compares the current binary with the before one: it
/// has no target of its own.
const COMPARISON: &str = "-";

/// At or above this share of its core, the load generator is what limits a run.
const CLIENT_BOUND: f64 = 0.95;

/// A note for a throughput ratio whose two sides both had their load generator at its limit:
/// the ratio then says more about the client than about either target.
fn client_bound_note(a: &Rounds, b: &Rounds) -> String {
    match (a.summary().client_busy, b.summary().client_busy) {
        (Some(x), Some(y)) if x >= CLIENT_BOUND && y >= CLIENT_BOUND => format!(
            "; client-bound: wrk at {:.0}% and {:.0}% of its core",
            x * 100.0,
            y * 100.0
        ),
        _ => String::new(),
    }
}

/// The load generator's share of its core, or `n/a`.
fn busy_cell(busy: Option<f64>) -> String {
    busy.map_or("n/a".to_string(), |b| format!("{:.0}%", b * 100.0))
}

/// `a`'s CPU time per request over `b`'s, or `n/a`.
fn cpu_ratio(a: &LoadStats, b: &LoadStats) -> String {
    match (a.cpu_per_request, b.cpu_per_request) {
        (Some(a), Some(b)) if !b.is_zero() => format!("{:.2}", a.as_secs_f64() / b.as_secs_f64()),
        _ => "n/a".to_string(),
    }
}
