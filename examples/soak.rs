//! A bounded soak run: the simulated Kommo account in-process (with injected faults), the release
//! `kommo-fanout` binary as a child process in front of it, and mixed traffic from concurrent
//! clients for a fixed time. It samples the proxy's memory and file descriptors, classifies every
//! answer, and decides PASS/FAIL at the end (see `docs/SOAK.md`).
//!
//! ```sh
//! cargo run --release --example soak -- --minutes 10
//! cargo run --release --example soak -- --minutes 1      # a short run
//! ```
//!
//! Flags: `--minutes M` (default 10, fractions allowed), `--clients N` (default 24),
//! `--max-requests N` (default 5000000), `--seed N` (default 7), `--cache-mib N` (the proxy's
//! `--cache-max-bytes` in MiB, default 64), `--no-build` (use the existing
//! `target/release/kommo-fanout` as is), `--binary PATH` (run that proxy binary instead, e.g. an
//! older build to compare with; nothing is built). Everything listens on loopback only. Exit code
//! 0 on PASS, 1 on FAIL, 130 when interrupted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kommo_sim::{Fault, FaultRule, Sim, SimConfig, TokenSpec};
use serde_json::Value;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Tokens of the simulated account: two that see everything, one limited to two users.
const TOKEN_A: &str = "soak-token-a";
const TOKEN_B: &str = "soak-token-b";
const TOKEN_LIMITED: &str = "soak-token-limited";
const LIMITED_USERS: [i64; 2] = [1001, 1002];
const TOKENS: [&str; 3] = [TOKEN_A, TOKEN_B, TOKEN_LIMITED];
/// The account's users (responsible_user_id values of the generated data).
const USERS: [i64; 8] = [1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008];
/// The dataset's "now" (2024-06-01T00:00:00Z); generated leads were created up to 120 days before.
const DATA_NOW: i64 = 1_717_200_000;
const DAY: i64 = 86_400;
/// Probability of each injected fault on a matching upstream request.
const FAULT_P: f64 = 0.005;
/// The 429 pauses every upstream request for a second, so it is rarer than the other faults.
const FAULT_429_P: f64 = 0.001;
/// Share of 200 multi-stage answers whose body is checked.
const VERIFY_EVERY: u64 = 4;
/// A client gives up on an answer after this (longer than the proxy's 60 s request timeout, so a
/// `504` from the proxy is seen instead).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(70);
/// How long to wait after the run for the proxy's idle upstream connections to close (its pool
/// closes them after 60 s).
const IDLE_WAIT: Duration = Duration::from_secs(75);
/// Descriptors the idle proxy may hold beyond those it had before any traffic.
const IDLE_FD_SLACK: u64 = 2;
/// How many unexpected answers are described in full.
const KEEP_EXAMPLES: usize = 20;

// === command line ===

struct Args {
    minutes: f64,
    clients: usize,
    max_requests: u64,
    seed: u64,
    build: bool,
    /// The proxy binary to run instead of `target/release/kommo-fanout` (nothing is built).
    binary: Option<PathBuf>,
    /// The proxy's `--cache-max-bytes`, in MiB.
    cache_mib: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        minutes: 10.0,
        clients: 24,
        max_requests: 5_000_000,
        seed: 7,
        build: true,
        binary: None,
        cache_mib: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // The flag's value parsed as a `T`, or an error naming the flag and what it expects.
        let mut value = |expected: &str| -> Result<_, String> {
            let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            Ok((v, format!("{flag}: expected {expected}")))
        };
        match flag.as_str() {
            "--minutes" => {
                let (v, err) = value("0 < M <= 1440")?;
                args.minutes = v.parse().map_err(|_| err.clone())?;
                if !(args.minutes > 0.0 && args.minutes <= 24.0 * 60.0) {
                    return Err(err);
                }
            }
            "--clients" => {
                let (v, err) = value("1..=512")?;
                args.clients = v.parse().map_err(|_| err.clone())?;
                if !(1..=512).contains(&args.clients) {
                    return Err(err);
                }
            }
            "--max-requests" => {
                let (v, err) = value("an integer")?;
                args.max_requests = v.parse().map_err(|_| err)?;
            }
            "--seed" => {
                let (v, err) = value("an integer")?;
                args.seed = v.parse().map_err(|_| err)?;
            }
            "--cache-mib" => {
                let (v, err) = value("1..=65536")?;
                args.cache_mib = v.parse().map_err(|_| err.clone())?;
                if !(1..=65536).contains(&args.cache_mib) {
                    return Err(err);
                }
            }
            "--no-build" => args.build = false,
            "--binary" => {
                let (v, err) = value("the path of an existing proxy binary")?;
                let path = PathBuf::from(v);
                if !path.is_file() {
                    return Err(err);
                }
                args.binary = Some(path);
            }
            "-h" | "--help" => {
                println!(
                    "usage: soak [--minutes M] [--clients N] [--max-requests N] [--seed N] [--cache-mib N] [--no-build | --binary PATH]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

// === a tiny seeded PRNG (xorshift64*) ===

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % ((hi - lo + 1) as u64)) as i64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// === the proxy child process ===

/// The proxy process; killed (and reaped) when dropped, also when the run panics.
struct ProxyGuard {
    child: Child,
    log: PathBuf,
}

impl ProxyGuard {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then wait up to `limit` for a graceful exit; the exit code if it came.
    fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ProxyGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `target/release/kommo-fanout`, (re)built first so the soak runs the current code.
fn proxy_binary(build: bool) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = manifest.join("target/release/kommo-fanout");
    if build || !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("soak: cargo build --release --bin kommo-fanout");
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--release", "--bin", "kommo-fanout"])
            .current_dir(manifest);
        // `cargo run` sets the package's variables (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...) for
        // the example; build scripts (ring's) rerun when they change, so a nested build that saw
        // them would rebuild, and the next plain build again. Hide them.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| key.starts_with(p))
                || key == "CARGO_PRIMARY_PACKAGE"
                || key == "OUT_DIR"
            {
                cmd.env_remove(key.as_ref());
            }
        }
        let status = cmd.status();
        match status {
            Ok(s) if s.success() => {}
            other if binary.exists() => {
                eprintln!("soak: building failed ({other:?}); using the existing binary")
            }
            other => panic!("cannot build kommo-fanout: {other:?}"),
        }
    }
    assert!(binary.exists(), "{} is missing", binary.display());
    binary
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn spawn_proxy(
    binary: &Path,
    upstream: &str,
    port: u16,
    admin: u16,
    cache_bytes: u64,
) -> ProxyGuard {
    let log = std::env::temp_dir().join(format!("kommo-fanout-soak-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("proxy log file");
    let child = Command::new(binary)
        .args(["serve", "--upstream", upstream])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--rate-limit", "10000", "--rate-window", "1s"])
        .args(["--cache-ttl", "5s"])
        .args(["--cache-max-bytes", &cache_bytes.to_string()])
        .args(["--retries", "2"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .spawn()
        .expect("the proxy binary starts");
    ProxyGuard { child, log }
}

// === /proc sampling ===

/// `(VmRSS, VmHWM)` in KiB.
fn proc_memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn proc_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// User + system CPU time in clock ticks (100 per second on Linux).
fn proc_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

/// What the proxy's descriptors are: sockets by role and TCP state, other kinds by name.
fn fd_breakdown(pid: u32, proxy_port: u16, admin_port: u16, sim_port: u16) -> String {
    let mut sockets: HashMap<u64, String> = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            let (local, remote) = (port(f[1]), port(f[2]));
            let state = match f[3] {
                "01" => "ESTABLISHED",
                "06" => "TIME_WAIT",
                "07" => "CLOSE",
                "08" => "CLOSE_WAIT",
                "09" => "LAST_ACK",
                "0A" => "LISTEN",
                "04" => "FIN_WAIT1",
                "05" => "FIN_WAIT2",
                other => other,
            };
            let role = if state == "LISTEN" {
                "listener"
            } else if local == proxy_port {
                "client conn"
            } else if local == admin_port {
                "admin conn"
            } else if remote == sim_port {
                "upstream conn"
            } else {
                "other tcp"
            };
            if let Ok(inode) = f[9].parse::<u64>() {
                sockets.insert(inode, format!("{role} {state}"));
            }
        }
    }
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            let target = std::fs::read_link(entry.path())
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            let kind = match target
                .strip_prefix("socket:[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|i| i.parse::<u64>().ok())
            {
                Some(inode) => sockets
                    .get(&inode)
                    .cloned()
                    .unwrap_or_else(|| "socket (not tcp)".into()),
                None if target.starts_with('/') => "file".into(),
                None => target.split(':').next().unwrap_or("").to_string(),
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{k}={n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// === traffic ===

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// `GET /api/v4/leads` with 2 or more distinct stages (fanned out).
    Multi,
    /// `GET /api/v4/leads` with 0 or 1 stage (relayed).
    Relay,
    /// `GET /api/v4/leads/pipelines` (pass-through).
    Pipelines,
    /// `GET /api/v4/account` (pass-through).
    Account,
    /// `POST /api/v4/leads` (pass-through, sent once).
    Post,
    /// A deliberately invalid leads query: `400` expected.
    Invalid,
    /// An unknown token: `401` expected.
    BadToken,
}

impl Route {
    const ALL: [Route; 7] = [
        Route::Multi,
        Route::Relay,
        Route::Pipelines,
        Route::Account,
        Route::Post,
        Route::Invalid,
        Route::BadToken,
    ];

    fn name(self) -> &'static str {
        match self {
            Route::Multi => "leads multi-stage",
            Route::Relay => "leads 0/1 stage",
            Route::Pipelines => "GET pipelines",
            Route::Account => "GET account",
            Route::Post => "POST leads",
            Route::Invalid => "invalid query",
            Route::BadToken => "unknown token",
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum OrderField {
    Id,
    CreatedAt,
    UpdatedAt,
}

/// What a `200` multi-stage page must satisfy.
#[derive(Clone, Debug)]
struct Check {
    pairs: HashSet<(i64, i64)>,
    field: OrderField,
    desc: bool,
    limit: usize,
    page: u64,
    only_users: Option<Vec<i64>>,
    created: Option<(i64, i64)>,
    price_from: Option<i64>,
}

struct Plan {
    route: Route,
    method: Method,
    path: String,
    token: &'static str,
    body: Option<String>,
    check: Option<Check>,
    /// Drop the request future after this long (a client that goes away mid-request).
    disconnect_after: Option<Duration>,
    hot: bool,
}

/// Everything the clients draw their requests from.
struct Traffic {
    stages: Vec<(i64, i64)>,
    pipeline_ids: Vec<i64>,
    /// Fixed views polled over and over: (token, query, check).
    dashboards: Vec<(&'static str, String, Check)>,
    /// Extra stages each lead is listed under (the sim's "ghost" listings).
    ghosts: HashMap<i64, Vec<(i64, i64)>>,
}

fn stage_params(pairs: &[(i64, i64)], encoded: bool) -> String {
    let (open, close) = if encoded { ("%5B", "%5D") } else { ("[", "]") };
    let mut out = String::new();
    for (i, (p, s)) in pairs.iter().enumerate() {
        if !out.is_empty() {
            out.push('&');
        }
        let _ = write!(
            out,
            "filter{open}statuses{close}{open}{i}{close}{open}pipeline_id{close}={p}&filter{open}statuses{close}{open}{i}{close}{open}status_id{close}={s}"
        );
    }
    out
}

impl Traffic {
    fn new(sim: &Sim) -> Traffic {
        let pipelines = sim.pipelines();
        let stages: Vec<(i64, i64)> = pipelines
            .iter()
            .flat_map(|p| p.statuses.iter().map(move |s| (p.id, s.id)))
            .collect();
        let pipeline_ids = pipelines.iter().map(|p| p.id).collect();
        let ghosts = sim
            .leads()
            .into_iter()
            .filter(|l| !l.ghost_stages.is_empty())
            .map(|l| (l.id, l.ghost_stages))
            .collect();
        let mut rng = Rng::new(0xDA5B);
        let mut dashboards = Vec::new();
        for i in 0..8 {
            let n = 2 + (i % 5);
            let mut pairs = Vec::new();
            while pairs.len() < n {
                let s = *rng.pick(&stages);
                if !pairs.contains(&s) {
                    pairs.push(s);
                }
            }
            let (field, desc, order) = match i % 3 {
                0 => (OrderField::Id, false, ""),
                1 => (OrderField::CreatedAt, true, "&order[created_at]=desc"),
                _ => (OrderField::UpdatedAt, true, "&order[updated_at]=desc"),
            };
            let limit = [50usize, 100, 250][i % 3];
            let query = format!("{}{order}&limit={limit}", stage_params(&pairs, false));
            for token in TOKENS {
                let check = Check {
                    pairs: pairs.iter().copied().collect(),
                    field,
                    desc,
                    limit,
                    page: 1,
                    only_users: (token == TOKEN_LIMITED).then(|| LIMITED_USERS.to_vec()),
                    created: None,
                    price_from: None,
                };
                dashboards.push((token, query.clone(), check));
            }
        }
        Traffic {
            stages,
            pipeline_ids,
            dashboards,
            ghosts,
        }
    }

    fn token(rng: &mut Rng) -> &'static str {
        // Each token gets a third of the traffic; one of them sees two users only.
        TOKENS[rng.below(TOKENS.len())]
    }

    /// A random multi-stage view: 2–10 stages, random order, limit, page and filters.
    fn distinct_view(&self, rng: &mut Rng, token: &'static str) -> (String, Check) {
        let n = rng.range(2, 10) as usize;
        let mut pairs = Vec::with_capacity(n);
        while pairs.len() < n {
            let s = *rng.pick(&self.stages);
            if !pairs.contains(&s) {
                pairs.push(s);
            }
        }
        let mut query = stage_params(&pairs, rng.chance(0.3));
        let (field, desc) = match rng.below(7) {
            0 => (OrderField::Id, false),
            1 => {
                query.push_str("&order[id]=asc");
                (OrderField::Id, false)
            }
            2 => {
                query.push_str("&order[id]=desc");
                (OrderField::Id, true)
            }
            3 => {
                query.push_str("&order[created_at]=asc");
                (OrderField::CreatedAt, false)
            }
            4 => {
                query.push_str("&order[created_at]=desc");
                (OrderField::CreatedAt, true)
            }
            5 => {
                query.push_str("&order[updated_at]=asc");
                (OrderField::UpdatedAt, false)
            }
            _ => {
                query.push_str("&order[updated_at]=desc");
                (OrderField::UpdatedAt, true)
            }
        };
        let limit = *rng.pick(&[10usize, 25, 50, 100, 250]);
        let page = if rng.chance(0.5) {
            1
        } else {
            rng.range(2, 5) as u64
        };
        let _ = write!(query, "&limit={limit}");
        if page > 1 || rng.chance(0.2) {
            let _ = write!(query, "&page={page}");
        }
        let mut check = Check {
            pairs: pairs.iter().copied().collect(),
            field,
            desc,
            limit,
            page,
            only_users: (token == TOKEN_LIMITED).then(|| LIMITED_USERS.to_vec()),
            created: None,
            price_from: None,
        };
        if rng.chance(0.2) {
            let user = *rng.pick(&USERS);
            let _ = write!(query, "&filter[responsible_user_id]={user}");
            check.only_users = Some(match check.only_users {
                Some(allowed) if !allowed.contains(&user) => Vec::new(),
                _ => vec![user],
            });
        }
        if rng.chance(0.2) {
            let from = DATA_NOW - rng.range(10, 120) * DAY;
            let to = from + rng.range(5, 60) * DAY;
            let _ = write!(
                query,
                "&filter[created_at][from]={from}&filter[created_at][to]={to}"
            );
            check.created = Some((from, to));
        }
        if rng.chance(0.15) {
            let price = rng.range(0, 50) * 1000;
            let _ = write!(query, "&filter[price][from]={price}");
            check.price_from = Some(price);
        }
        if rng.chance(0.2) {
            query.push_str("&with=contacts");
        }
        (query, check)
    }

    fn plan(&self, rng: &mut Rng) -> Plan {
        let token = Self::token(rng);
        let roll = rng.below(1000);
        let get = |route, path: String, check| Plan {
            route,
            method: Method::GET,
            path,
            token,
            body: None,
            check,
            disconnect_after: None,
            hot: false,
        };
        match roll {
            // Distinct views: the cache keeps filling and evicting.
            0..=379 => {
                let (query, check) = self.distinct_view(rng, token);
                get(Route::Multi, format!("/api/v4/leads?{query}"), Some(check))
            }
            // Dashboards: the same views polled again and again.
            380..=649 => {
                let (token, query, check) = rng.pick(&self.dashboards).clone();
                Plan {
                    token,
                    hot: true,
                    ..get(Route::Multi, format!("/api/v4/leads?{query}"), Some(check))
                }
            }
            // Relayed lists: one stage, or none (a pipeline filter or nothing).
            650..=719 => {
                let page = rng.range(1, 3);
                let query = match rng.below(3) {
                    0 => stage_params(&[*rng.pick(&self.stages)], false),
                    1 => format!("filter[pipeline_id]={}", rng.pick(&self.pipeline_ids)),
                    _ => "order[id]=desc".to_string(),
                };
                get(
                    Route::Relay,
                    format!("/api/v4/leads?{query}&limit=50&page={page}"),
                    None,
                )
            }
            720..=829 => get(Route::Pipelines, "/api/v4/leads/pipelines".into(), None),
            830..=899 => get(Route::Account, "/api/v4/account".into(), None),
            900..=929 => {
                let n = rng.range(1, 2);
                let items: Vec<String> = (0..n)
                    .map(|i| {
                        format!(
                            r#"{{"name":"soak lead {}-{i}","price":{}}}"#,
                            rng.next() % 1_000_000,
                            rng.range(0, 9000)
                        )
                    })
                    .collect();
                Plan {
                    method: Method::POST,
                    body: Some(format!("[{}]", items.join(","))),
                    ..get(Route::Post, "/api/v4/leads".into(), None)
                }
            }
            930..=944 => {
                let pairs = [*rng.pick(&self.stages), *rng.pick(&self.stages)];
                let query = match rng.below(3) {
                    // Above 250 is not invalid: Kommo (and so the proxy) answers its default page.
                    0 => format!("{}&limit=0", stage_params(&pairs, false)),
                    1 => format!("{}&page=0", stage_params(&pairs, false)),
                    _ => format!("{}&order[price]=asc", stage_params(&pairs, false)),
                };
                get(Route::Invalid, format!("/api/v4/leads?{query}"), None)
            }
            945..=954 => {
                let path = if rng.chance(0.5) {
                    let (query, _) = self.distinct_view(rng, TOKEN_A);
                    format!("/api/v4/leads?{query}")
                } else {
                    "/api/v4/leads/pipelines".to_string()
                };
                Plan {
                    token: "soak-token-unknown",
                    ..get(Route::BadToken, path, None)
                }
            }
            // A client that disconnects mid-request (its answer, if any, is dropped unread).
            _ => {
                let (query, check) = self.distinct_view(rng, token);
                Plan {
                    disconnect_after: Some(Duration::from_millis(rng.range(1, 40) as u64)),
                    ..get(Route::Multi, format!("/api/v4/leads?{query}"), Some(check))
                }
            }
        }
    }
}

// === classification ===

enum Outcome {
    /// A 2xx answer (and `true` when its body was verified).
    Ok(bool),
    /// A non-2xx answer explained by an injected fault or a deliberately bad request.
    Expected(String),
    /// Anything else.
    Unexpected(String),
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.replace('\n', " ")
}

/// The injected fault a non-2xx answer traces back to, if it does.
fn fault_reason(status: u16, body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let detail = v["detail"].as_str().unwrap_or("");
    // What a stream's or a relay's failure text says about the cause.
    let cause = |text: &str| -> Option<&'static str> {
        if text.contains("answered 500") {
            Some("upstream 500")
        } else if text.contains("broke off") {
            Some("truncated body")
        } else if text.contains("could not reach the upstream") {
            Some("connection reset")
        } else {
            None
        }
    };
    match status {
        // Kommo's own 500 body (`ErrInternalServer`, a `trace_id`), relayed by a pass-through.
        500 if v["title"] == "ErrInternalServer" && v.get("trace_id").is_some() => {
            Some("500 relayed from upstream".into())
        }
        // Kommo's 429 body (with `retry_after`), relayed by a pass-through.
        429 if v.get("retry_after").is_some() => Some("429 relayed from upstream".into()),
        502 if v["type"] == "https://httpstatus.es/502" => {
            if let Some(stages) = v["failed-stages"].as_array() {
                let mut kinds = Vec::new();
                for s in stages {
                    let kind = match s["upstream_status"].as_u64() {
                        Some(500) => "upstream 500",
                        Some(429) => "upstream 429",
                        Some(200) => "unusable 200 (truncated)",
                        Some(_) => return None,
                        None => cause(s["reason"].as_str().unwrap_or(""))?,
                    };
                    kinds.push(kind);
                }
                kinds.sort_unstable();
                kinds.dedup();
                (!kinds.is_empty()).then(|| format!("502 failed stage: {}", kinds.join("+")))
            } else {
                let kind = cause(detail).or_else(|| {
                    // A 200 that did not parse (a truncated body read to its end).
                    (detail.contains("JSON") || detail.contains("parse")).then_some("unusable 200")
                })?;
                Some(format!("502 relay: {kind}"))
            }
        }
        503 if detail.contains("rate limit asks to wait") => Some("503 after a 429 pause".into()),
        _ => None,
    }
}

fn classify(plan: &Plan, status: u16, body: &[u8], verify: bool, ghosts: &Ghosts) -> Outcome {
    if (200..300).contains(&status) {
        let ok_status = match plan.route {
            Route::Multi | Route::Relay => status == 200 || status == 204,
            Route::Pipelines | Route::Account | Route::Post => status == 200,
            Route::Invalid | Route::BadToken => false,
        };
        if !ok_status {
            return Outcome::Unexpected(format!("{status} for {}", plan.route.name()));
        }
        if matches!(plan.route, Route::Pipelines | Route::Account | Route::Post) {
            if let Err(e) = serde_json::from_slice::<Value>(body) {
                return Outcome::Unexpected(format!("{status} with a body that is not JSON: {e}"));
            }
        }
        if let (true, Some(check), 200) = (verify, &plan.check, status) {
            return match verify_page(check, body, ghosts) {
                Ok(()) => Outcome::Ok(true),
                Err(e) => Outcome::Unexpected(format!("200 with wrong data: {e}")),
            };
        }
        return Outcome::Ok(false);
    }
    if let Some(reason) = fault_reason(status, body) {
        return Outcome::Expected(reason);
    }
    match (plan.route, status) {
        (Route::Invalid, 400) => Outcome::Expected("400 for a deliberately invalid query".into()),
        (Route::BadToken, 401) => Outcome::Expected("401 for an unknown token".into()),
        _ => Outcome::Unexpected(format!(
            "{status} for {}: {}",
            plan.route.name(),
            snippet(body)
        )),
    }
}

type Ghosts = HashMap<i64, Vec<(i64, i64)>>;

/// Checks one merged page: ids unique and ordered as asked (ties by id, same direction), every
/// lead in a requested stage and within the filters and the token's rights, page size and links
/// consistent.
fn verify_page(check: &Check, body: &[u8], ghosts: &Ghosts) -> Result<(), String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let leads = v["_embedded"]["leads"]
        .as_array()
        .ok_or("_embedded.leads is not a list")?;
    if v["_page"].as_u64() != Some(check.page) {
        return Err(format!("_page {} != {}", v["_page"], check.page));
    }
    if leads.is_empty() || leads.len() > check.limit {
        return Err(format!(
            "{} leads on a page of limit {}",
            leads.len(),
            check.limit
        ));
    }
    if v["_links"].get("next").is_some() && leads.len() != check.limit {
        return Err(format!(
            "a next link after a short page ({} of {})",
            leads.len(),
            check.limit
        ));
    }
    let mut seen = HashSet::with_capacity(leads.len());
    let mut prev: Option<(i64, i64)> = None;
    for lead in leads {
        let int = |k: &str| lead[k].as_i64();
        let id = int("id").ok_or("a lead without an integer id")?;
        if !seen.insert(id) {
            return Err(format!("lead {id} twice"));
        }
        let key = match check.field {
            OrderField::Id => Some(id),
            OrderField::CreatedAt => int("created_at"),
            OrderField::UpdatedAt => int("updated_at"),
        }
        .ok_or_else(|| format!("lead {id} without its order field"))?;
        let key = (key, id);
        if let Some(p) = prev {
            let in_order = if check.desc { key < p } else { key > p };
            if !in_order {
                return Err(format!(
                    "lead {id} out of order ({:?} after {:?}, {:?} {})",
                    key,
                    p,
                    check.field,
                    if check.desc { "desc" } else { "asc" }
                ));
            }
        }
        prev = Some(key);
        let stage = (
            int("pipeline_id").unwrap_or(-1),
            int("status_id").unwrap_or(-1),
        );
        let listed = check.pairs.contains(&stage)
            || ghosts
                .get(&id)
                .is_some_and(|g| g.iter().any(|s| check.pairs.contains(s)));
        if !listed {
            return Err(format!("lead {id} in stage {stage:?}, not requested"));
        }
        if let Some(users) = &check.only_users {
            let user = int("responsible_user_id").unwrap_or(-1);
            if !users.contains(&user) {
                return Err(format!(
                    "lead {id} of user {user}, outside the allowed {users:?}"
                ));
            }
        }
        if let Some((from, to)) = check.created {
            let at = int("created_at").unwrap_or(-1);
            if !(from..=to).contains(&at) {
                return Err(format!("lead {id} created_at {at} outside {from}..={to}"));
            }
        }
        if let (Some(min), Some(price)) = (check.price_from, int("price")) {
            if price < min {
                return Err(format!("lead {id} price {price} < {min}"));
            }
        }
    }
    Ok(())
}

// === statistics ===

#[derive(Default)]
struct Stats {
    /// Requests answered (any status) or failed, not counting deliberate disconnects.
    done: AtomicU64,
    /// Requests started.
    started: AtomicU64,
    /// Deliberate disconnects (the request future dropped before its answer).
    disconnected: AtomicU64,
    c2xx: AtomicU64,
    c4xx: AtomicU64,
    c5xx: AtomicU64,
    /// Answers of another class (1xx/3xx).
    cother: AtomicU64,
    /// No answer at all (connection failed or closed, or the body broke off, or a timeout).
    transport: AtomicU64,
    expected: AtomicU64,
    unexpected: AtomicU64,
    verified: AtomicU64,
    hot: AtomicU64,
    statuses: Mutex<BTreeMap<u16, u64>>,
    by_route: Mutex<BTreeMap<&'static str, [u64; 3]>>,
    expected_reasons: Mutex<BTreeMap<String, u64>>,
    unexpected_reasons: Mutex<BTreeMap<String, u64>>,
    examples: Mutex<Vec<String>>,
}

impl Stats {
    fn unexpected(&self, kind: String, example: String) {
        self.unexpected.fetch_add(1, Ordering::Relaxed);
        *self
            .unexpected_reasons
            .lock()
            .unwrap()
            .entry(kind)
            .or_default() += 1;
        let mut ex = self.examples.lock().unwrap();
        if ex.len() < KEEP_EXAMPLES {
            ex.push(example);
        }
    }
}

/// The sim's answers by kind, from its request log.
#[derive(Default, Clone, Copy)]
struct SimTally {
    total: u64,
    s500: u64,
    s429: u64,
    /// No answer recorded: an injected reset, or a request the proxy withdrew (client gone).
    none: u64,
}

enum Fetched {
    Answer(u16, Bytes),
    /// The head never came (connection refused/closed, timeout).
    NoAnswer(String),
    /// The head came, the body broke off.
    BodyCut(u16, String),
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let _ = write!(s, ": {inner}");
        src = inner.source();
    }
    s
}

async fn fetch(client: &HttpClient, base: &str, plan: &Plan) -> Fetched {
    let mut req = Request::builder()
        .method(plan.method.clone())
        .uri(format!("{base}{}", plan.path))
        .header("authorization", format!("Bearer {}", plan.token));
    if plan.body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = Full::new(Bytes::from(plan.body.clone().unwrap_or_default()));
    let req = match req.body(body) {
        Ok(r) => r,
        Err(e) => return Fetched::NoAnswer(format!("building the request: {e}")),
    };
    let attempt = async {
        let resp = match client.request(req).await {
            Ok(r) => r,
            Err(e) => return Fetched::NoAnswer(error_chain(&e)),
        };
        let status = resp.status().as_u16();
        match resp.into_body().collect().await {
            Ok(b) => Fetched::Answer(status, b.to_bytes()),
            Err(e) => Fetched::BodyCut(status, error_chain(&e)),
        }
    };
    match tokio::time::timeout(CLIENT_TIMEOUT, attempt).await {
        Ok(f) => f,
        Err(_) => Fetched::NoAnswer(format!("no answer within {CLIENT_TIMEOUT:?}")),
    }
}

struct Shared {
    base: String,
    client: HttpClient,
    traffic: Traffic,
    stats: Stats,
    stop: AtomicBool,
    max_requests: u64,
}

async fn client_task(shared: Arc<Shared>, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut verify_counter = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        if shared.stats.started.fetch_add(1, Ordering::Relaxed) >= shared.max_requests {
            break;
        }
        let plan = shared.traffic.plan(&mut rng);
        let stats = &shared.stats;
        let fetched = match plan.disconnect_after {
            Some(after) => {
                match tokio::time::timeout(after, fetch(&shared.client, &shared.base, &plan)).await
                {
                    Ok(f) => f,
                    Err(_) => {
                        stats.disconnected.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            None => fetch(&shared.client, &shared.base, &plan).await,
        };
        stats.done.fetch_add(1, Ordering::Relaxed);
        if plan.hot {
            stats.hot.fetch_add(1, Ordering::Relaxed);
        }
        let route_slot = |i: usize| {
            stats
                .by_route
                .lock()
                .unwrap()
                .entry(plan.route.name())
                .or_default()[i] += 1;
        };
        match fetched {
            Fetched::NoAnswer(e) => {
                stats.transport.fetch_add(1, Ordering::Relaxed);
                route_slot(2);
                stats.unexpected(
                    "no answer (connection failed or closed)".into(),
                    format!("{} {}: no answer: {e}", plan.method, plan.path),
                );
            }
            Fetched::BodyCut(status, e) => {
                stats.transport.fetch_add(1, Ordering::Relaxed);
                route_slot(2);
                stats.unexpected(
                    format!("{status} whose body broke off"),
                    format!(
                        "{} {}: {status}, body broke off: {e}",
                        plan.method, plan.path
                    ),
                );
            }
            Fetched::Answer(status, body) => {
                *stats.statuses.lock().unwrap().entry(status).or_default() += 1;
                match status / 100 {
                    2 => &stats.c2xx,
                    4 => &stats.c4xx,
                    5 => &stats.c5xx,
                    _ => &stats.cother,
                }
                .fetch_add(1, Ordering::Relaxed);
                let verify = plan.check.is_some() && {
                    verify_counter += 1;
                    verify_counter.is_multiple_of(VERIFY_EVERY)
                };
                match classify(&plan, status, &body, verify, &shared.traffic.ghosts) {
                    Outcome::Ok(verified) => {
                        route_slot(0);
                        if verified {
                            stats.verified.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Outcome::Expected(reason) => {
                        route_slot(1);
                        stats.expected.fetch_add(1, Ordering::Relaxed);
                        *stats
                            .expected_reasons
                            .lock()
                            .unwrap()
                            .entry(reason)
                            .or_default() += 1;
                    }
                    Outcome::Unexpected(what) => {
                        route_slot(2);
                        let kind = what.split(':').next().unwrap_or("").to_string();
                        stats.unexpected(kind, format!("{} {}: {what}", plan.method, plan.path));
                    }
                }
            }
        }
        // A little think time, so the run measures steady load rather than a CPU-bound spin.
        let pause = rng.range(0, 4) as u64;
        if pause > 0 {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
}

// === metrics ===

/// The sum of every sample whose name (before the labels) is `name` and whose labels contain
/// all of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (bare, rest) = series.split_once('{').unwrap_or((series, ""));
            (bare == name && labels.iter().all(|lab| rest.contains(lab))).then_some(())?;
            value.parse::<f64>().ok()
        })
        .sum()
}

async fn scrape(client: &HttpClient, admin: &str) -> Option<String> {
    let req = Request::get(format!("{admin}/metrics"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let fut = async {
        let resp = client.request(req).await.ok()?;
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        String::from_utf8(body.to_vec()).ok()
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .ok()
        .flatten()
}

// === sampling ===

#[derive(Clone, Copy)]
struct Sample {
    t: f64,
    rss_kib: u64,
    hwm_kib: u64,
    fds: u64,
    cpu_pct: f64,
    cache_bytes: f64,
    done: u64,
    rate: f64,
    c2xx: u64,
    c4xx: u64,
    c5xx: u64,
    transport: u64,
    expected: u64,
    unexpected: u64,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn print_sample(s: &Sample) {
    println!(
        "t={:>5.0}s rss={:>6.1}MiB hwm={:>6.1}MiB fds={:>4} cpu={:>5.1}% cache={:>5.1}MiB req={:>8} ({:>5.0}/s) 2xx={:>8} 4xx={:>6} 5xx={:>5} noans={:>3} exp={:>5} unexp={:>3}",
        s.t,
        mib(s.rss_kib),
        mib(s.hwm_kib),
        s.fds,
        s.cpu_pct,
        s.cache_bytes / 1048576.0,
        s.done,
        s.rate,
        s.c2xx,
        s.c4xx,
        s.c5xx,
        s.transport,
        s.expected,
        s.unexpected
    );
}

/// Takes the sim's request log (tallying it) and clears it, so it does not grow for the whole run.
fn drain_sim_log(sim: &Sim, tally: &mut SimTally) {
    let requests = sim.requests();
    sim.clear_requests();
    for r in &requests {
        tally.total += 1;
        match r.status {
            500 => tally.s500 += 1,
            429 => tally.s429 += 1,
            0 => tally.none += 1,
            _ => {}
        }
    }
}

// === main ===

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::from(2);
        }
    };
    let binary = match &args.binary {
        Some(path) => path.clone(),
        None => proxy_binary(args.build),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(args, binary))
}

async fn run(args: Args, binary: PathBuf) -> ExitCode {
    let total = Duration::from_secs_f64(args.minutes * 60.0);
    let interval = Duration::from_secs_f64((total.as_secs_f64() / 60.0).clamp(2.0, 10.0));

    // The simulated account: 20 000 leads, 20 ms ± 10 ms, no rate limit, faults at a small rate.
    // Truncated bodies only hit lead lists (`limit=` is in every list the proxy sends), whose
    // answers the proxy buffers; pass-through answers are streamed, so a cut there would reach
    // the client as a cut, not as a classifiable answer.
    let faults = vec![
        FaultRule::always(Fault::Status500).with_probability(FAULT_P),
        FaultRule::always(Fault::ConnectionReset).with_probability(FAULT_P),
        FaultRule::always(Fault::TruncatedBody)
            .on_path("/api/v4/leads")
            .on_query("limit=")
            .with_probability(FAULT_P),
        FaultRule::always(Fault::TooManyRequests {
            retry_after: Some(1),
            header: true,
        })
        .with_probability(FAULT_429_P),
    ];
    let sim = kommo_sim::Sim::spawn(SimConfig {
        leads: 20_000,
        seed: args.seed,
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
        tokens: vec![
            TokenSpec::full(TOKEN_A),
            TokenSpec::full(TOKEN_B),
            TokenSpec {
                token: TOKEN_LIMITED.into(),
                responsible_user_ids: Some(LIMITED_USERS.to_vec()),
            },
        ],
        rate_limit: None,
        faults,
        json_style: Default::default(),
        churn: 0.0,
        oauth: None,
    })
    .await
    .expect("the simulator starts");

    let (port, admin_port) = (free_port(), free_port());
    let cache_bytes = args.cache_mib << 20;
    let mut proxy = spawn_proxy(&binary, &sim.base_url(), port, admin_port, cache_bytes);
    let pid = proxy.pid();
    let base = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");

    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(20))
        .build_http();
    let admin_client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    // Ready when /healthz answers.
    let mut ready = false;
    for _ in 0..400 {
        if !proxy.running() {
            break;
        }
        let req = Request::get(format!("{admin}/healthz"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(1), admin_client.request(req)).await
        {
            if r.status() == 200 {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    if !ready {
        let log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
        eprintln!("soak: the proxy did not become healthy:\n{log}");
        return ExitCode::from(1);
    }
    let fds_start = proc_fds(pid);
    let (rss_start, _) = proc_memory(pid);

    println!(
        "soak: {} min, {} clients, sampling every {:.0}s; sim {} (20000 leads, 20ms±10ms, faults 500/reset/truncate@{FAULT_P}, 429@{FAULT_429_P}); proxy pid {pid} {} on {base} (admin {admin}, cache {} MiB)",
        args.minutes,
        args.clients,
        interval.as_secs_f64(),
        sim.base_url(),
        binary.display(),
        args.cache_mib
    );
    println!(
        "soak: at start rss={:.1}MiB fds={fds_start}",
        mib(rss_start)
    );

    let shared = Arc::new(Shared {
        base,
        client,
        traffic: Traffic::new(&sim),
        stats: Stats::default(),
        stop: AtomicBool::new(false),
        max_requests: args.max_requests,
    });
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        tasks.push(tokio::spawn(client_task(
            shared.clone(),
            args.seed.wrapping_mul(1000).wrapping_add(i as u64 + 1),
        )));
    }

    let start = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut sim_tally = SimTally::default();
    let mut last = (Instant::now(), 0u64, proc_cpu_ticks(pid));
    let mut proxy_died = false;
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => {
                interrupted = true;
                println!("soak: interrupted");
                break;
            }
        }
        if !proxy.running() {
            proxy_died = true;
            println!("soak: the proxy process exited during the run");
            break;
        }
        drain_sim_log(&sim, &mut sim_tally);
        let stats = &shared.stats;
        let (rss_kib, hwm_kib) = proc_memory(pid);
        let now = Instant::now();
        let done = stats.done.load(Ordering::Relaxed);
        let cpu = proc_cpu_ticks(pid);
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let cache_bytes = scrape(&admin_client, &admin)
            .await
            .map_or(0.0, |m| metric(&m, "kommo_fanout_cache_bytes", &[]));
        let sample = Sample {
            t: start.elapsed().as_secs_f64(),
            rss_kib,
            hwm_kib,
            fds: proc_fds(pid),
            cpu_pct: (cpu.saturating_sub(last.2)) as f64 / secs,
            cache_bytes,
            done,
            rate: (done - last.1) as f64 / secs,
            c2xx: stats.c2xx.load(Ordering::Relaxed),
            c4xx: stats.c4xx.load(Ordering::Relaxed),
            c5xx: stats.c5xx.load(Ordering::Relaxed),
            transport: stats.transport.load(Ordering::Relaxed),
            expected: stats.expected.load(Ordering::Relaxed),
            unexpected: stats.unexpected.load(Ordering::Relaxed),
        };
        last = (now, done, cpu);
        print_sample(&sample);
        samples.push(sample);
        let finished = tasks.iter().all(|t| t.is_finished());
        if start.elapsed() + Duration::from_millis(200) >= total || finished {
            break;
        }
    }
    let elapsed = start.elapsed();

    // Stop the clients and let the requests in flight finish (or abort them).
    shared.stop.store(true, Ordering::Relaxed);
    let mut panicked = 0;
    let drain_deadline = Instant::now() + CLIENT_TIMEOUT + Duration::from_secs(5);
    for t in tasks {
        let left = drain_deadline.saturating_duration_since(Instant::now());
        let abort = t.abort_handle();
        match tokio::time::timeout(left, t).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_panic() => panicked += 1,
            Ok(Err(_)) => {}
            Err(_) => abort.abort(),
        }
    }
    drain_sim_log(&sim, &mut sim_tally);
    let metrics = scrape(&admin_client, &admin).await.unwrap_or_default();
    let proxy_alive = !proxy_died && proxy.running();
    // Idle: our connections closed, the proxy's fds should come back down.
    let shared = match Arc::try_unwrap(shared) {
        Ok(s) => s,
        Err(_) => panic!("client tasks still hold the shared state"),
    };
    drop(shared.client);
    drop(admin_client);
    // The proxy's pooled upstream connections close after 60 s idle; then its descriptors must be
    // back where they started (listeners, epoll, the log).
    let idle_since = Instant::now();
    let mut fds_idle = proc_fds(pid);
    while fds_idle > fds_start + IDLE_FD_SLACK
        && idle_since.elapsed() < IDLE_WAIT
        && proxy.running()
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        fds_idle = proc_fds(pid);
    }
    let idle_wait = idle_since.elapsed();
    let fds_idle_kinds = fd_breakdown(pid, port, admin_port, sim.addr().port());
    let (rss_end, hwm_end) = proc_memory(pid);
    let exit_code = if proxy_alive {
        proxy.terminate(Duration::from_secs(35))
    } else {
        None
    };
    let log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
    drop(proxy);

    // === summary ===
    let stats = &shared.stats;
    let done = stats.done.load(Ordering::Relaxed);
    let unexpected = stats.unexpected.load(Ordering::Relaxed);
    println!();
    println!(
        "== summary: {:.1} min, {} requests done ({:.0}/s), {} deliberate disconnects, {} dashboard polls, {} multi-stage 200s verified",
        elapsed.as_secs_f64() / 60.0,
        done,
        done as f64 / elapsed.as_secs_f64(),
        stats.disconnected.load(Ordering::Relaxed),
        stats.hot.load(Ordering::Relaxed),
        stats.verified.load(Ordering::Relaxed)
    );
    println!(
        "answers: 2xx={} 4xx={} 5xx={} other={} no-answer/cut={}",
        stats.c2xx.load(Ordering::Relaxed),
        stats.c4xx.load(Ordering::Relaxed),
        stats.c5xx.load(Ordering::Relaxed),
        stats.cother.load(Ordering::Relaxed),
        stats.transport.load(Ordering::Relaxed)
    );
    let statuses: Vec<String> = stats
        .statuses
        .lock()
        .unwrap()
        .iter()
        .map(|(s, n)| format!("{s}={n}"))
        .collect();
    println!("statuses: {}", statuses.join(" "));
    println!("by route (ok / expected / unexpected):");
    for route in Route::ALL {
        if let Some([ok, exp, unexp]) = stats.by_route.lock().unwrap().get(route.name()) {
            println!("  {:<18} {ok:>9} {exp:>7} {unexp:>5}", route.name());
        }
    }
    println!("expected non-2xx (traced to an injected fault or a deliberate bad request):");
    for (reason, n) in stats.expected_reasons.lock().unwrap().iter() {
        println!("  {n:>7}  {reason}");
    }
    println!("unexpected: {unexpected}");
    for (reason, n) in stats.unexpected_reasons.lock().unwrap().iter() {
        println!("  {n:>7}  {reason}");
    }
    for ex in stats.examples.lock().unwrap().iter() {
        println!("    e.g. {ex}");
    }
    println!(
        "sim: {} upstream requests seen, injected/observed: 500={} 429={} unanswered(reset or withdrawn)={}",
        sim_tally.total, sim_tally.s500, sim_tally.s429, sim_tally.none
    );
    let m = |name: &str, labels: &[&str]| metric(&metrics, name, labels);
    println!(
        "proxy /metrics: upstream requests={} (stream={} single={} passthrough={}), retries={}, 429s={}, blocks={}",
        m("kommo_fanout_upstream_requests_total", &[]),
        m("kommo_fanout_upstream_requests_total", &["kind=\"stream\""]),
        m("kommo_fanout_upstream_requests_total", &["kind=\"single\""]),
        m("kommo_fanout_upstream_requests_total", &["kind=\"passthrough\""]),
        m("kommo_fanout_upstream_retries_total", &[]),
        m("kommo_fanout_upstream_429_total", &[]),
        m("kommo_fanout_upstream_blocks_total", &[]),
    );
    println!(
        "proxy /metrics: cache answer hit={} miss={} coalesced={}; page hit={} miss={} coalesced={}; evictions={}; bytes={:.1}MiB; in flight={}",
        m("kommo_fanout_cache_lookups_total", &["level=\"answer\"", "outcome=\"hit\""]),
        m("kommo_fanout_cache_lookups_total", &["level=\"answer\"", "outcome=\"miss\""]),
        m("kommo_fanout_cache_lookups_total", &["level=\"answer\"", "outcome=\"coalesced\""]),
        m("kommo_fanout_cache_lookups_total", &["level=\"page\"", "outcome=\"hit\""]),
        m("kommo_fanout_cache_lookups_total", &["level=\"page\"", "outcome=\"miss\""]),
        m("kommo_fanout_cache_lookups_total", &["level=\"page\"", "outcome=\"coalesced\""]),
        m("kommo_fanout_cache_evictions_total", &[]),
        m("kommo_fanout_cache_bytes", &[]) / 1048576.0,
        m("kommo_fanout_in_flight_requests", &[]),
    );
    let log_lines = log.lines().count();
    let log_errors = log.lines().filter(|l| l.contains("ERROR")).count();
    let log_panics = log.lines().filter(|l| l.contains("panicked")).count();
    println!(
        "proxy log (RUST_LOG=warn): {log_lines} lines, {log_errors} ERROR, {log_panics} panics"
    );
    for l in log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("panicked"))
        .take(5)
    {
        println!("    {l}");
    }

    // === verdict ===
    let secs = elapsed.as_secs_f64();
    let third = |lo: f64, hi: f64| {
        samples
            .iter()
            .filter(|s| s.t >= lo * secs && s.t <= hi * secs + 0.5)
            .collect::<Vec<_>>()
    };
    let (mid, tail) = (third(1.0 / 3.0, 2.0 / 3.0), third(2.0 / 3.0, 1.0));
    let max_of = |v: &[&Sample], f: fn(&Sample) -> u64| v.iter().map(|s| f(s)).max().unwrap_or(0);
    let rss_mid = max_of(&mid, |s| s.rss_kib);
    let rss_tail = max_of(&tail, |s| s.rss_kib);
    let rss_slack = (rss_mid / 10).max(8 * 1024);
    let fds_mid = max_of(&mid, |s| s.fds);
    let fds_tail = max_of(&tail, |s| s.fds);
    // Open connections follow the load (client connections plus up to one upstream connection
    // per stage in flight), so the bound is loose; a leak shows in the idle check below.
    let fds_slack = (fds_mid / 4).max(32);
    let mut checks: Vec<(bool, String)> = Vec::new();
    checks.push((
        !interrupted && elapsed.as_secs_f64() >= total.as_secs_f64() * 0.95,
        format!(
            "ran the full time ({:.0}s of {:.0}s)",
            secs,
            total.as_secs_f64()
        ),
    ));
    checks.push((
        !mid.is_empty() && !tail.is_empty() && rss_tail <= rss_mid + rss_slack,
        format!(
            "RSS levels off: max last third {:.1}MiB <= max middle third {:.1}MiB + {:.1}MiB",
            mib(rss_tail),
            mib(rss_mid),
            mib(rss_slack)
        ),
    ));
    checks.push((
        !mid.is_empty() && !tail.is_empty() && fds_tail <= fds_mid + fds_slack,
        format!("fds do not grow: max last third {fds_tail} <= max middle third {fds_mid} + {fds_slack}"),
    ));
    checks.push((
        fds_idle <= fds_start + IDLE_FD_SLACK,
        format!(
            "fds back to the start when idle: {fds_idle} after {:.0}s idle <= {fds_start} at start + {IDLE_FD_SLACK}",
            idle_wait.as_secs_f64()
        ),
    ));
    checks.push((
        unexpected == 0 && panicked == 0,
        format!("zero unexpected answers ({unexpected}; client task panics {panicked})"),
    ));
    checks.push((
        proxy_alive && exit_code == Some(0) && log_panics == 0,
        format!(
            "proxy alive to the end, no panic in its log, exit 0 on SIGTERM (exit code {exit_code:?})"
        ),
    ));
    checks.push((
        done > 0 && stats.verified.load(Ordering::Relaxed) > 0,
        "traffic flowed and answers were verified".into(),
    ));
    println!(
        "fds: start {fds_start}, idle after the run {fds_idle}; rss: start {:.1}MiB, end {:.1}MiB, peak (VmHWM) {:.1}MiB",
        mib(rss_start),
        mib(rss_end),
        mib(hwm_end)
    );
    println!("fds when idle: {fds_idle_kinds}");
    let in_flight_gauge = m("kommo_fanout_in_flight_requests", &[]);
    let pass = checks.iter().all(|(ok, _)| *ok);
    for (ok, what) in &checks {
        println!("[{}] {what}", if *ok { "ok" } else { "FAIL" });
    }
    // Not one of the pass criteria (the gauge is a metric, not a resource), but a drift is a bug.
    if in_flight_gauge != 0.0 {
        println!(
            "[warn] kommo_fanout_in_flight_requests reads {in_flight_gauge} with no request in flight ({} deliberate disconnects)",
            stats.disconnected.load(Ordering::Relaxed)
        );
    }
    println!("VERDICT: {}", if pass { "PASS" } else { "FAIL" });
    if interrupted {
        ExitCode::from(130)
    } else if pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
