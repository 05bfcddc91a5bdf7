//! The window guarantee across process lifetimes: a proxy killed under load, or stopped while
//! it drains, and started again at once on the same ports never lets the account see more than
//! its limit in any window. The simulator's arrival log is the judge.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kommo_sim::{Sim, SimRateLimit};

use crate::support::*;

const LIMIT: u32 = 7;
const WINDOW: Duration = Duration::from_secs(1);

/// `kommo-fanout serve` in front of `sim` on `port`, taking turns through `lock_dir`.
fn spawn_proxy(sim: &str, port: u16, lock_dir: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kommo-fanout"))
        .args(["serve", "--upstream", sim, "--admin-listen", "127.0.0.1:0"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--cache-ttl",
            "0",
            "--shutdown-grace",
            "10s",
            "--max-wait",
            "20s",
        ])
        .arg("--limiter-lock-dir")
        .arg(lock_dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the proxy starts")
}

/// Starts the proxy on `port`, again if the port is still held by the one shutting down, until
/// it accepts connections.
async fn start_proxy(sim: &str, port: u16, lock_dir: &std::path::Path) -> Child {
    let child = std::cell::RefCell::new(spawn_proxy(sim, port, lock_dir));
    eventually_async("the proxy starts", Duration::from_secs(20), || async {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        let mut child = child.borrow_mut();
        if child.try_wait().ok().flatten().is_some() {
            *child = spawn_proxy(sim, port, lock_dir);
        }
        false
    })
    .await;
    child.into_inner()
}

/// Clients asking distinct multi-stage views of the proxy on `port` until `stop`.
fn load(
    port: u16,
    pairs: Vec<(i64, i64)>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..6)
        .map(|i| {
            let (pairs, stop) = (pairs.clone(), stop.clone());
            tokio::spawn(async move {
                let client = Client::default();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let url = format!(
                        "http://127.0.0.1:{port}/api/v4/leads?{}&filter[id][]={}",
                        stages(&pairs),
                        i * 100_000 + n
                    );
                    // Refused or cut off while the proxy restarts: the next one goes on.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(25), client.try_get(&url, TOKEN))
                            .await;
                }
            })
        })
        .collect()
}

/// Runs load against a proxy, stops it with `stop_proxy`, starts another at once on the same
/// port and lock, runs load against both, and checks the arrivals at the simulator.
async fn restart_under_load(stop_proxy: impl Fn(&Child)) {
    let sim = Sim::spawn(kommo_sim::SimConfig {
        rate_limit: Some(SimRateLimit {
            requests: LIMIT,
            window: WINDOW,
            block_after: 1000,
            block_for: Duration::from_secs(1),
        }),
        latency: Duration::from_millis(20),
        ..sim_config(3000)
    })
    .await
    .expect("simulator starts");
    let lock_dir = tempfile::tempdir().expect("a temporary directory");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut first = start_proxy(&sim.base_url(), port, lock_dir.path()).await;
    let pairs: Vec<(i64, i64)> = stage_sizes(&sim)
        .iter()
        .take(4)
        .map(|s| (s.0, s.1))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(port, pairs, stop.clone());
    // Saturated: the limit is reached in every window before the restart.
    eventually(
        "load reaches the simulator",
        Duration::from_secs(20),
        || sim.request_count() >= 3 * LIMIT as usize,
    )
    .await;
    stop_proxy(&first);
    let mut second = start_proxy(&sim.base_url(), port, lock_dir.path()).await;
    // The new process serves: upstream requests after its start reach the simulator.
    let before = sim.request_count();
    eventually("the restarted proxy sends", Duration::from_secs(30), || {
        sim.request_count() >= before + 3 * LIMIT as usize
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = first.kill();
    let _ = second.kill();
    let _ = first.wait();
    let _ = second.wait();
    for c in clients {
        c.abort();
    }
    let log = sim.requests();
    let refused = log.iter().filter(|r| r.status == 429).count();
    let most = max_in_window(log.iter().map(|r| r.at).collect(), WINDOW);
    assert_eq!(refused, 0, "429s from the simulator");
    assert!(most <= LIMIT as usize, "{most} arrivals in one window");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_under_load_and_restarted_at_once_stays_within_the_window() {
    restart_under_load(|child| {
        let _ = Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_while_the_old_one_drains_stays_within_the_window() {
    restart_under_load(|child| {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    })
    .await;
}
