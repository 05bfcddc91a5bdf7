//! Operations: metrics, readiness, logs without secrets, graceful shutdown, the config file.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kommo_sim::{Fault, FaultRule, SimConfig, TokenSpec};

use crate::support::*;

/// Every line is a comment or `name[{labels}] value`.
fn assert_exposition(text: &str) {
    assert!(text.ends_with("# EOF\n"));
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line:?}"
        );
        assert!(!name.contains("Bearer") && !name.contains(TOKEN), "{line}");
    }
}

#[tokio::test]
async fn metrics_parse_and_move_with_traffic() {
    let s = stack_with(sim_config(3000), cached(Duration::from_secs(60))).await;
    let set = largest_stages(&s, 3);
    let scrape = || async {
        s.request(http::Method::GET, &format!("{}/metrics", s.admin), None, "")
            .await
    };
    let before = scrape().await;
    assert_eq!(before.status, 200);
    let before = String::from_utf8(before.body.to_vec()).unwrap();
    assert_exposition(&before);

    assert_eq!(s.leads(&stages(&set)).await.status, 200);
    assert_eq!(s.leads(&stages(&set)).await.status, 200);
    let after = String::from_utf8(scrape().await.body.to_vec()).unwrap();
    assert_exposition(&after);
    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(
        moved(r#"kommo_fanout_upstream_requests_total{kind="stream",status="200"}"#),
        3.0
    );
    // The first request is one miss, the second one hit: one lookup each.
    assert_eq!(
        moved(r#"kommo_fanout_cache_lookups_total{level="answer",outcome="miss"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"kommo_fanout_cache_lookups_total{level="answer",outcome="hit"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"kommo_fanout_cache_lookups_total{level="page",outcome="miss"}"#),
        3.0
    );
    assert_eq!(
        moved(r#"kommo_fanout_client_requests_total{route="leads",status="200"}"#),
        2.0
    );
    assert_eq!(moved("kommo_fanout_fanout_width_count"), 1.0);
    assert!(sample(&after, "kommo_fanout_cache_bytes") > 0.0);
    assert_eq!(sample(&after, "kommo_fanout_in_flight_requests"), 0.0);
}

#[tokio::test]
async fn readiness_follows_a_block_cool_down() {
    let s = stack_with(sim_config(300), |c| {
        c.fetch.block_cooldown = Duration::from_millis(1200)
    })
    .await;
    let ready = || async {
        s.request(http::Method::GET, &format!("{}/readyz", s.admin), None, "")
            .await
    };
    assert_eq!(ready().await.status, 200);
    s.sim
        .inject(FaultRule::always(Fault::HtmlForbidden).times(1));
    assert_eq!(s.get("/api/v4/leads/pipelines", TOKEN).await.status, 403);
    let blocked = ready().await;
    assert_eq!(blocked.status, 503);
    assert!(
        blocked.json()["block_cooldown_remaining_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    eventually_async(
        "ready again after the cool-down",
        Duration::from_secs(5),
        || async { ready().await.status == 200 },
    )
    .await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The proxy binary as a child process, killed when dropped.
struct Proxy {
    child: Child,
    url: String,
    /// Where its stderr (the logs) goes.
    log: std::path::PathBuf,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

async fn spawn_proxy(upstream: &str, extra: &[&str], env: &[(&str, &str)]) -> Proxy {
    let (port, admin) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kommo-fanout"));
    cmd.args([
        "serve",
        "--upstream",
        upstream,
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
    .args(extra);
    // Logs go to a file, not a pipe: a pipe nobody reads until the end could fill and stall it.
    let log = std::env::temp_dir().join(format!("kommo-fanout-{}-{port}.log", std::process::id()));
    let file = std::fs::File::create(&log).expect("log file");
    cmd.stdout(Stdio::null()).stderr(Stdio::from(file));
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Owned by the guard at once, so a failing test still kills it.
    let proxy = Proxy {
        child: cmd.spawn().expect("the binary starts"),
        url: format!("http://127.0.0.1:{port}"),
        log,
    };
    eventually_async("the proxy listens", Duration::from_secs(5), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    proxy
}

/// Stops the child with SIGTERM and returns its exit status and everything it wrote.
fn terminate(proxy: &mut Proxy) -> (Option<i32>, String) {
    let pid = proxy.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = wait_exit(&mut proxy.child, Duration::from_secs(10));
    (
        status,
        std::fs::read_to_string(&proxy.log).unwrap_or_default(),
    )
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    poll_blocking(limit, || child.try_wait().ok().flatten())?.code()
}

#[tokio::test]
async fn logs_never_contain_a_token_in_either_format() {
    let tokens = ["tok-AAAA-secret-1111", "tok-BBBB-secret-2222"];
    let sim = kommo_sim::Sim::spawn(SimConfig {
        leads: 500,
        tokens: tokens.iter().map(|t| TokenSpec::full(*t)).collect(),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    for format in ["pretty", "json"] {
        let mut proxy = spawn_proxy(
            &sim.base_url(),
            &[
                "--log-format",
                format,
                "--webhook-secret",
                "webhook-secret-0123456789",
            ],
            &[("RUST_LOG", "debug")],
        )
        .await;
        let s = Client::default();
        for token in tokens.iter().chain(["tok-CCCC-wrong-3333"].iter()) {
            for path in [
                format!("/api/v4/leads?{}", stages(&[(1000, 142), (2000, 142)])),
                "/api/v4/leads/pipelines".to_string(),
                format!("/api/v4/leads?access_token={token}"),
            ] {
                s.get(&format!("{}{path}", proxy.url), token).await;
            }
        }
        let (status, logs) = terminate(&mut proxy);
        assert_eq!(status, Some(0), "{logs}");
        assert!(
            logs.contains("answered"),
            "request lines are logged: {logs}"
        );
        for secret in ["tok-AAAA", "tok-BBBB", "tok-CCCC", "webhook-secret"] {
            assert!(
                !logs.contains(secret),
                "{format} logs contain {secret}:\n{logs}"
            );
        }
    }
}

#[tokio::test]
async fn sigterm_lets_the_requests_in_flight_finish_and_refuses_new_ones() {
    let sim = kommo_sim::Sim::spawn(SimConfig {
        leads: 300,
        latency: Duration::from_millis(1500),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    // Three connections at once: each goes to its own serving thread, and all three threads
    // must drain.
    let mut proxy = spawn_proxy(
        &sim.base_url(),
        &["--shutdown-grace", "10s", "--worker-threads", "3"],
        &[],
    )
    .await;
    let url = format!("{}/api/v4/leads/pipelines", proxy.url);
    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            let url = format!("{url}?probe={i}");
            tokio::spawn(async move { Client::default().get(&url, TOKEN).await })
        })
        .collect();
    eventually(
        "three requests reach the upstream",
        Duration::from_secs(10),
        || sim.request_count() >= 3,
    )
    .await;
    let pid = proxy.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let port: u16 = proxy.url.rsplit(':').next().unwrap().parse().unwrap();
    eventually_async(
        "new connections are refused while draining",
        Duration::from_secs(5),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        },
    )
    .await;
    for request in in_flight {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200, "every request in flight completed");
    }
    assert_eq!(
        wait_exit(&mut proxy.child, Duration::from_secs(10)),
        Some(0)
    );
}

#[test]
fn config_precedence_is_flags_then_environment_then_file() {
    let path = std::env::temp_dir().join(format!("kommo-fanout-e2e-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "upstream = \"https://file.kommo.com\"\nrate_limit = 5\nretries = 4\ncache_ttl = \"2m\"\n",
    )
    .unwrap();
    let check = |extra: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kommo-fanout"));
        cmd.args(["serve", "--check", "--config", path.to_str().unwrap()])
            .args(extra);
        for var in [
            "KOMMO_FANOUT_UPSTREAM",
            "KOMMO_FANOUT_RATE_LIMIT",
            "KOMMO_FANOUT_RETRIES",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = check(&[], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("rate_limit = 5\n")
            && out.contains("retries = 4\n")
            && out.contains("cache_ttl = \"2m\""),
        "{out}"
    );
    assert!(out.contains("upstream = \"https://file.kommo.com\""));
    let (_, out, _) = check(&[], &[("KOMMO_FANOUT_RATE_LIMIT", "4")]);
    assert!(
        out.contains("rate_limit = 4\n") && out.contains("retries = 4\n"),
        "environment over file: {out}"
    );
    let (_, out, _) = check(&["--rate-limit", "3"], &[("KOMMO_FANOUT_RATE_LIMIT", "4")]);
    assert!(
        out.contains("rate_limit = 3\n"),
        "flag over environment: {out}"
    );

    std::fs::write(
        &path,
        "upstream = \"https://file.kommo.com\"\nrate_window = \"fortnight\"\n",
    )
    .unwrap();
    let (code, _, err) = check(&[], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("`rate_window`"), "{err}");
    std::fs::write(
        &path,
        "upstream = \"https://file.kommo.com\"\ncache_tll = \"30s\"\n",
    )
    .unwrap();
    let (code, _, err) = check(&[], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("`cache_tll`") && err.contains("unknown key"),
        "{err}"
    );
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_request_whose_client_left_is_no_longer_counted_in_flight() {
    let s = std::sync::Arc::new(
        stack_with(
            SimConfig {
                latency: Duration::from_millis(600),
                ..sim_config(300)
            },
            |_| {},
        )
        .await,
    );
    let gone = {
        let s = s.clone();
        tokio::spawn(async move { s.get("/api/v4/account", TOKEN).await })
    };
    eventually(
        "the request reaches the upstream",
        Duration::from_secs(10),
        || s.sim.request_count() > 0,
    )
    .await;
    gone.abort();
    let _ = gone.await;
    let metrics = format!("{}/metrics", s.admin);
    eventually_async("no request in flight", Duration::from_secs(2), || async {
        let text = s.request(http::Method::GET, &metrics, None, "").await;
        let body = String::from_utf8_lossy(&text.body);
        sample(&body, "kommo_fanout_in_flight_requests") == 0.0
    })
    .await;
}
