//! The proxy holds the account's credential: clients send scoped keys, the upstream sees only
//! the account's token, and OAuth tokens are refreshed once, saved before use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::join_all;
use http::Method;
use kommo_fanout::config::ServeConfig;
use kommo_fanout::credentials::{CredentialSource, Holding, OAuthSettings};
use kommo_fanout::keys::{self, KeysCommand, Scope};
use kommo_sim::{Sim, SimConfig, SimOAuth};

use crate::support::*;

const ACCOUNT: &str = "default";
const WAIT: Duration = Duration::from_secs(30);

/// Adds a key to `file` and returns it (the last line `keys add` prints).
fn add_key(file: &Path, account: &str, name: &str, scope: Scope) -> String {
    let out = keys::run(KeysCommand::Add {
        keys_file: file.to_path_buf(),
        account: account.into(),
        name: name.into(),
        scope,
    })
    .expect("the key is added");
    out.lines().last().expect("a key line").trim().to_string()
}

struct Keyed {
    stack: Stack,
    dir: tempfile::TempDir,
    grafana: String,
    reader: String,
    writer: String,
    stranger: String,
}

impl Keyed {
    fn keys_file(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }
}

/// A proxy holding the demo token in a file, with a key of each scope and one of another
/// account.
async fn keyed(allow_client_tokens: bool) -> Keyed {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let grafana = add_key(&keys_file, ACCOUNT, "grafana", Scope::LeadsRead);
    let reader = add_key(&keys_file, ACCOUNT, "reader", Scope::Read);
    let writer = add_key(&keys_file, ACCOUNT, "writer", Scope::Write);
    let stranger = add_key(&keys_file, "other", "stranger", Scope::Write);
    let token_file = dir.path().join("account.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let stack = stack_with(sim_config(2000), |c| {
        c.holding = Some(Holding {
            account: ACCOUNT.into(),
            source: CredentialSource::TokenFile(token_file),
            keys_file,
            allow_client_tokens,
        });
    })
    .await;
    Keyed {
        stack,
        dir,
        grafana,
        reader,
        writer,
        stranger,
    }
}

#[tokio::test]
async fn a_leads_read_key_reads_merged_leads_and_pipelines_and_nothing_else() {
    let k = keyed(false).await;
    let s = &k.stack;
    let set = largest_stages(s, 3);
    let merged = s
        .get(
            &format!("/api/v4/leads?{}&limit=250", stages(&set)),
            &k.grafana,
        )
        .await;
    assert_eq!(merged.status, 200, "{:?}", merged.body);
    let want = truth(&s.sim.leads(), &set, BY_ID, |_| true);
    assert_eq!(merged.ids(), want[..want.len().min(250)]);
    assert_eq!(
        s.get("/api/v4/leads/pipelines", &k.grafana).await.status,
        200
    );
    let lead = want[0];
    assert_eq!(
        s.get(&format!("/api/v4/leads/{lead}"), &k.grafana)
            .await
            .status,
        200
    );

    let post = s
        .request(
            Method::POST,
            &format!("{}/api/v4/leads", s.proxy),
            Some(&k.grafana),
            "[{\"name\":\"x\"}]",
        )
        .await;
    assert_eq!(post.status, 403);
    assert_eq!(post.content_type(), "application/problem+json");
    assert!(
        post.json()["detail"].as_str().unwrap().contains("write"),
        "{:?}",
        post.body
    );
    let contacts = s.get("/api/v4/contacts", &k.grafana).await;
    assert_eq!(contacts.status, 403);
    assert!(contacts.json()["detail"].as_str().unwrap().contains("read"));
    // The wider scopes reach what they name.
    assert_eq!(s.get("/api/v4/contacts", &k.reader).await.status, 200);
    let created = s
        .request(
            Method::POST,
            &format!("{}/api/v4/leads", s.proxy),
            Some(&k.writer),
            "[{\"name\":\"x\"}]",
        )
        .await;
    assert!(created.status.is_success(), "{:?}", created.body);

    // Every upstream request carried the account's token, never a key.
    for r in s.sim.requests() {
        assert_eq!(r.token.as_deref(), Some(TOKEN), "{} {}", r.method, r.path);
    }
}

#[tokio::test]
async fn unknown_foreign_and_revoked_keys_are_refused() {
    let k = keyed(false).await;
    let s = &k.stack;
    let path = "/api/v4/leads/pipelines";
    for (key, status) in [
        ("kfk_not-a-key", 401),
        (TOKEN, 401),
        (k.stranger.as_str(), 403),
    ] {
        let answer = s.get(path, key).await;
        assert_eq!(answer.status, status, "{key}");
        assert_eq!(answer.content_type(), "application/problem+json");
    }
    let anonymous = s
        .request(Method::GET, &format!("{}{path}", s.proxy), None, "")
        .await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(
        s.sim.request_count(),
        0,
        "nothing refused reaches the account"
    );

    assert_eq!(s.get(path, &k.reader).await.status, 200);
    keys::run(KeysCommand::Revoke {
        keys_file: k.keys_file(),
        name: "reader".into(),
    })
    .unwrap();
    eventually_async("the revoked key is refused", WAIT, || async {
        s.get(path, &k.reader).await.status == 401
    })
    .await;
    assert_eq!(
        s.get(path, &k.grafana).await.status,
        200,
        "the others still work"
    );
}

#[tokio::test]
async fn client_tokens_pass_only_when_the_account_allows_them() {
    let k = keyed(true).await;
    let s = &k.stack;
    let own = s.get("/api/v4/leads/pipelines", "limited").await;
    assert_eq!(own.status, 200);
    let last = s.sim.requests().pop().unwrap();
    assert_eq!(
        last.token.as_deref(),
        Some("limited"),
        "the client's own token goes upstream"
    );
    let k = keyed(false).await;
    assert_eq!(
        k.stack
            .get("/api/v4/leads/pipelines", "limited")
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn the_accounts_token_is_in_no_answer_and_no_metric() {
    let k = keyed(false).await;
    let s = &k.stack;
    let set = largest_stages(s, 2);
    let mut seen = Vec::new();
    for (path, key) in [
        (format!("/api/v4/leads?{}", stages(&set)), &k.grafana),
        ("/api/v4/leads/pipelines".to_string(), &k.grafana),
        ("/api/v4/contacts?limit=5".to_string(), &k.reader),
        ("/api/v4/account".to_string(), &k.reader),
    ] {
        let a = s.get(&path, key).await;
        seen.push(String::from_utf8_lossy(&a.body).to_string());
        seen.extend(
            a.headers
                .values()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).to_string()),
        );
    }
    for admin in ["/metrics", "/readyz"] {
        let a = Client::default()
            .get(&format!("{}{admin}", s.admin), TOKEN)
            .await;
        seen.push(String::from_utf8_lossy(&a.body).to_string());
    }
    for text in seen {
        assert!(!text.contains(TOKEN), "the account's token leaked: {text}");
        assert!(!text.contains(&k.grafana) && !text.contains(&k.reader));
    }
}

/// A simulated account that is also an OAuth server, its access tokens living `ttl`.
async fn oauth_sim(ttl: Duration) -> kommo_sim::SimHandle {
    let mut oauth = SimOAuth::new("client-1", "secret-1", "https://example.test/cb");
    oauth.token_ttl = ttl;
    Sim::spawn(SimConfig {
        leads: 2000,
        oauth: Some(oauth),
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn oauth_settings(dir: &Path) -> OAuthSettings {
    OAuthSettings {
        client_id: "client-1".into(),
        client_secret: "secret-1".into(),
        redirect_uri: "https://example.test/cb".into(),
        tokens_file: dir.join("acme.tokens"),
    }
}

/// A proxy in front of `sim` holding OAuth tokens from `dir`, with one `read` key.
async fn oauth_proxy(sim: &kommo_sim::SimHandle, dir: &Path) -> (Served, String) {
    let keys_file = dir.join("keys.toml");
    let key = if keys_file.exists() {
        std::fs::read_to_string(dir.join("key")).unwrap()
    } else {
        let key = add_key(&keys_file, ACCOUNT, "dash", Scope::Read);
        std::fs::write(dir.join("key"), &key).unwrap();
        key
    };
    let mut config = ServeConfig::for_upstream(&sim.base_url()).unwrap();
    config.limiter.requests = 1_000_000;
    config.cache.ttl = Duration::ZERO;
    config.limiter_lock = None;
    config.holding = Some(Holding {
        account: ACCOUNT.into(),
        source: CredentialSource::OAuth(oauth_settings(dir)),
        keys_file,
        allow_client_tokens: false,
    });
    (serve_proxy(config).await, key)
}

/// Trades one of the simulator's codes for tokens with `kommo-fanout oauth exchange` (run
/// beside the runtime, which keeps serving the simulator meanwhile).
async fn exchange(sim: &kommo_sim::SimHandle, dir: &Path) {
    let secret = dir.join("secret");
    std::fs::write(&secret, "secret-1\n").unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kommo-fanout"));
    command
        .args(["oauth", "exchange", "--upstream", &sim.base_url()])
        .args([
            "--oauth-client-id",
            "client-1",
            "--oauth-redirect-uri",
            "https://example.test/cb",
        ])
        .arg("--oauth-client-secret-file")
        .arg(secret)
        .arg("--oauth-tokens-file")
        .arg(dir.join("acme.tokens"))
        .args(["--code", &sim.oauth_code()]);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("acme.tokens"));
}

#[tokio::test]
async fn a_hundred_requests_at_expiry_cause_one_refresh_and_no_401() {
    let ttl = Duration::from_secs(4);
    let sim = oauth_sim(ttl).await;
    let dir = tempfile::tempdir().unwrap();
    exchange(&sim, dir.path()).await;
    let issued = tokio::time::Instant::now();
    let (proxy, key) = oauth_proxy(&sim, dir.path()).await;
    let client = Client::default();
    let url = format!("{}/api/v4/leads/pipelines", proxy.proxy);
    assert_eq!(client.get(&url, &key).await.status, 200);
    assert_eq!(sim.oauth_refreshes(), 0, "a fresh token is used as it is");
    // Past the refresh margin (a fifth of the life), before the expiry.
    tokio::time::sleep_until(issued + ttl * 17 / 20).await;
    let answers = join_all((0..100).map(|_| client.get(&url, &key))).await;
    for a in &answers {
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    assert_eq!(sim.oauth_refreshes(), 1, "one refresh for all of them");
    // The rotated refresh token is on disk: a restart comes up with working credentials.
    drop(proxy);
    let saved = kommo_fanout::credentials::read_tokens(&dir.path().join("acme.tokens")).unwrap();
    let (restarted, key) = oauth_proxy(&sim, dir.path()).await;
    let again = Client::default()
        .get(&format!("{}/api/v4/leads/pipelines", restarted.proxy), &key)
        .await;
    assert_eq!(again.status, 200);
    let last = sim
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path.starts_with("/api/"))
        .unwrap();
    assert_eq!(last.token.as_deref(), Some(saved.access_token.as_str()));
}

#[tokio::test]
async fn a_401_forces_one_refresh_and_the_request_is_answered() {
    // Long enough that the refreshed token, its expiry kept in whole seconds, is not due at once.
    let sim = oauth_sim(Duration::from_secs(3)).await;
    let dir = tempfile::tempdir().unwrap();
    exchange(&sim, dir.path()).await;
    // A file that claims a long life: only Kommo's 401 tells the token is gone.
    let path = dir.path().join("acme.tokens");
    let mut tokens = kommo_fanout::credentials::read_tokens(&path).unwrap();
    tokens.expires_at += 3600;
    std::fs::write(&path, serde_json::to_vec(&tokens).unwrap()).unwrap();
    let (proxy, key) = oauth_proxy(&sim, dir.path()).await;
    let url = format!("{}/api/v4/leads/pipelines", proxy.proxy);
    let client = Client::default();
    eventually_async("the simulator refuses the old token", WAIT, || async {
        let direct = client
            .get(
                &format!("{}/api/v4/leads/pipelines", sim.base_url()),
                &tokens.access_token,
            )
            .await;
        direct.status == 401
    })
    .await;
    let answer = client.get(&url, &key).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(sim.oauth_refreshes(), 1);
}

#[tokio::test]
async fn a_refused_refresh_token_makes_the_proxy_unready_and_says_why() {
    let sim = oauth_sim(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("acme.tokens"),
        "a-refresh-token-kommo-never-issued\n",
    )
    .unwrap();
    let (proxy, key) = oauth_proxy(&sim, dir.path()).await;
    let answer = Client::default()
        .get(&format!("{}/api/v4/leads/pipelines", proxy.proxy), &key)
        .await;
    assert_eq!(answer.status, 503, "{:?}", answer.body);
    assert!(answer.json()["detail"]
        .as_str()
        .unwrap()
        .contains("oauth exchange"));
    let ready = Client::default()
        .get(&format!("{}/readyz", proxy.admin), TOKEN)
        .await;
    assert_eq!(ready.status, 503);
    let report = ready.json();
    assert!(
        report["credentials"].as_str().unwrap().contains("refused"),
        "{report}"
    );
}

/// `serve` logging everything (`RUST_LOG=trace`) while keys read leads, pipelines and
/// contacts: no line holds the account's token or a key.
#[tokio::test]
async fn the_accounts_token_is_in_no_log_line_at_trace() {
    use std::io::BufRead;
    let sim = Sim::spawn(sim_config(2000)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let reader = add_key(&keys_file, ACCOUNT, "reader", Scope::Read);
    let token_file = dir.path().join("account.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kommo-fanout"))
        .args([
            "serve",
            "--upstream",
            &sim.base_url(),
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--admin-listen", "127.0.0.1:0", "--limiter-lock-dir", "off"])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--keys-file")
        .arg(&keys_file)
        .env("RUST_LOG", "trace")
        .env("KOMMO_FANOUT_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reading = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let listen = loop {
        let line = rx.recv_timeout(WAIT).expect("a `serving` line");
        log.push(line.clone());
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["fields"]["message"] == "serving" {
            break event["fields"]["listen"].as_str().unwrap().to_string();
        }
    };
    let client = Client::default();
    let leads = sim.leads();
    let stage = (leads[0].pipeline_id, leads[0].status_id);
    for path in [
        format!(
            "/api/v4/leads?{}",
            stages(&[stage, (leads[1].pipeline_id, leads[1].status_id)])
        ),
        "/api/v4/leads/pipelines".into(),
        "/api/v4/contacts?limit=5".into(),
    ] {
        let answer = client.get(&format!("http://{listen}{path}"), &reader).await;
        assert_eq!(answer.status, 200, "{path}: {:?}", answer.body);
    }
    assert!(sim
        .requests()
        .iter()
        .all(|r| r.token.as_deref() == Some(TOKEN)));
    let _ = child.kill();
    let _ = child.wait();
    reading.join().unwrap();
    log.extend(rx.try_iter());
    assert!(log.len() > 20, "trace logging was on: {} lines", log.len());
    for line in &log {
        assert!(
            !line.contains(TOKEN),
            "the account's token in a log line: {line}"
        );
        assert!(!line.contains(&reader), "a key in a log line: {line}");
    }
}

/// A long-lived token Kommo answers `401` to: one request reaches Kommo, the client gets a 503
/// saying what to do (not a 401 that would blame its key), `/readyz` says why, and a valid token
/// written to the file serves again without a restart.
#[tokio::test]
async fn a_token_kommo_refuses_makes_the_proxy_unready_until_the_file_changes() {
    let k = keyed(false).await;
    let s = &k.stack;
    let token_file = k.dir.path().join("account.token");
    std::fs::write(&token_file, "a-token-kommo-never-issued\n").unwrap();
    let path = "/api/v4/leads/pipelines";
    let answer = s.get(path, &k.reader).await;
    assert_eq!(answer.status, 503, "{:?}", answer.body);
    let detail = answer.json()["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("account.token"), "{detail}");
    assert!(!detail.contains("a-token-kommo-never-issued"));
    assert_eq!(s.get(path, &k.reader).await.status, 503);
    assert_eq!(
        s.sim.request_count(),
        1,
        "a refused token is not sent again"
    );
    let ready = Client::default()
        .get(&format!("{}/readyz", s.admin), TOKEN)
        .await;
    assert_eq!(ready.status, 503);
    assert!(ready.json()["credentials"]
        .as_str()
        .unwrap()
        .starts_with("refused: "));

    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    eventually_async("the new token serves", WAIT, || async {
        s.get(path, &k.reader).await.status == 200
    })
    .await;
    let ready = Client::default()
        .get(&format!("{}/readyz", s.admin), TOKEN)
        .await;
    assert_eq!(ready.json()["credentials"], "ok");
}
