//! Several Kommo accounts behind one proxy: two simulators as `acme` (reached by `/acme`) and
//! `beta` (by `/beta`, or its own host), each with its own budget, block state and credential.

use std::process::Command;
use std::time::Duration;

use futures::future::join_all;
use http::Method;
use kommo_fanout::config::{AccountConfig, ServeArgs, ServeConfig};
use kommo_fanout::console::AdminToken;
use kommo_fanout::credentials::{CredentialSource, Holding};
use kommo_fanout::keys::{self, KeysCommand, Scope};
use kommo_fanout::upstream::Origin;
use kommo_sim::{Fault, FaultRule, Sim, SimConfig, SimHandle, SimOAuth, SimRateLimit};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::support::*;

const BETA_HOST: &str = "beta.example.internal";

/// The proxy in front of two simulated accounts, and a key of each.
struct Two {
    acme: SimHandle,
    beta: SimHandle,
    proxy: String,
    admin: String,
    acme_key: String,
    beta_key: String,
    client: Client,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

impl Two {
    /// `GET {proxy}{path}` with `key`, and extra headers.
    async fn get(&self, path: &str, key: &str, headers: &[(&str, &str)]) -> Answer {
        let url = format!("{}{path}", self.proxy);
        self.client
            .request_with(Method::GET, &url, Some(key), "", headers)
            .await
    }

    async fn admin(&self, path: &str) -> Answer {
        let url = format!("{}{path}", self.admin);
        self.client
            .request_with(Method::GET, &url, None, "", &[])
            .await
    }
}

/// Adds a key for `account` to `file` and returns it.
fn add_key(file: &std::path::Path, account: &str) -> String {
    let out = keys::run(KeysCommand::Add {
        keys_file: file.to_path_buf(),
        account: account.into(),
        name: format!("{account}-dashboard"),
        scope: Scope::Write,
    })
    .expect("the key is added");
    out.lines().last().expect("a key line").trim().to_string()
}

/// An account holding the demo token in a file of `dir`.
fn account(name: &str, sim: &SimHandle, dir: &std::path::Path) -> AccountConfig {
    let token_file = dir.join(format!("{name}.token"));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    AccountConfig {
        name: name.into(),
        origin: Origin::parse(&sim.base_url()).unwrap(),
        host: None,
        rate_limit: 1_000_000,
        holding: Some(Holding {
            account: name.into(),
            source: CredentialSource::TokenFile(token_file),
            keys_file: dir.join("keys.toml"),
            allow_client_tokens: false,
        }),
        limiter_lock: None,
    }
}

/// Two simulated accounts (different data) behind one proxy; `tweak` adjusts the proxy's
/// configuration and its two accounts.
async fn two(
    sims: (SimConfig, SimConfig),
    tweak: impl FnOnce(&mut ServeConfig, &mut AccountConfig, &mut AccountConfig),
) -> Two {
    let acme = Sim::spawn(sims.0).await.expect("simulator starts");
    let beta = Sim::spawn(sims.1).await.expect("simulator starts");
    let dir = tempfile::tempdir().unwrap();
    let acme_key = add_key(&dir.path().join("keys.toml"), "acme");
    let beta_key = add_key(&dir.path().join("keys.toml"), "beta");
    let mut config = ServeConfig::for_upstream(&acme.base_url()).expect("valid config");
    config.cache.ttl = Duration::ZERO;
    let (mut a, mut b) = (
        account("acme", &acme, dir.path()),
        account("beta", &beta, dir.path()),
    );
    b.host = Some(BETA_HOST.into());
    tweak(&mut config, &mut a, &mut b);
    config.accounts = vec![a, b];
    let (proxy, admin, stop) = serve(config).await;
    Two {
        acme,
        beta,
        proxy,
        admin,
        acme_key,
        beta_key,
        client: Client::default(),
        _dir: dir,
        _stop: stop,
    }
}

/// Serves `config`'s accounts on loopback: the proxy's and the admin listener's base URLs, and
/// what stops them when dropped.
async fn serve(config: ServeConfig) -> (String, String, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = format!("http://{}", listener.local_addr().expect("bound"));
    let admin_url = format!("http://{}", admin.local_addr().expect("bound"));
    let accounts = kommo_fanout::accounts(&config)
        .await
        .expect("gateways build");
    let (stop, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let stopped = async move {
            let _ = rx.await;
        };
        kommo_fanout::serve_accounts(&config, accounts, listener, admin, stopped)
            .await
            .expect("the proxy serves");
    });
    (proxy, admin_url, stop)
}

/// Two accounts of different data.
fn sims(leads: usize) -> (SimConfig, SimConfig) {
    let beta = SimConfig {
        seed: 7,
        ..sim_config(leads)
    };
    (sim_config(leads), beta)
}

/// The `n` largest stages of `sim`.
fn largest(sim: &SimHandle, n: usize) -> Vec<(i64, i64)> {
    let sizes = stage_sizes(sim.sim());
    sizes.iter().take(n).map(|&(p, s, _)| (p, s)).collect()
}

#[tokio::test]
async fn each_prefix_reaches_its_own_account_and_links_keep_the_prefix() {
    const ADMIN_TOKEN: &str = "an-admin-token-of-the-test";
    let t = two(sims(3000), |c, _, _| {
        c.admin_token = Some(AdminToken::new(ADMIN_TOKEN).unwrap());
    })
    .await;
    for (name, sim, key, other) in [
        ("acme", &t.acme, &t.acme_key, &t.beta),
        ("beta", &t.beta, &t.beta_key, &t.acme),
    ] {
        let set = largest(sim, 3);
        other.clear_requests();
        let a = t
            .get(
                &format!("/{name}/api/v4/leads?{}&limit=20", stages(&set)),
                key,
                &[],
            )
            .await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let want = truth(&sim.leads(), &set, BY_ID, |_| true);
        assert_eq!(a.ids(), want[..20]);
        assert_eq!(
            other.request_count(),
            0,
            "{name}'s request reached the other"
        );
        let base = format!("{}/{name}/api/v4/leads", t.proxy);
        let v = a.json();
        let next = v["_links"]["next"]["href"].as_str().unwrap();
        assert!(next.starts_with(&format!("{base}?")), "{next}");
        let lead = v["_embedded"]["leads"][0]["_links"]["self"]["href"]
            .as_str()
            .unwrap();
        assert!(lead.starts_with(&format!("{base}/")), "{lead}");
        // The link leads back to the same account.
        let followed = t.get(&next[t.proxy.len()..], key, &[]).await;
        assert_eq!(followed.status, 200);
        assert_eq!(followed.ids(), want[20..40]);

        // Anything else passes through to the account, with its own token.
        sim.clear_requests();
        let account = t.get(&format!("/{name}/api/v4/account"), key, &[]).await;
        assert_eq!(account.status, 200);
        let seen = sim.requests();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].path, "/api/v4/account");
        assert_eq!(seen[0].token.as_deref(), Some(TOKEN));
    }
    assert_eq!(
        t.admin("/metrics").await.status,
        401,
        "the admin token guards it"
    );
    let url = format!("{}/metrics", t.admin);
    let metrics = t.client.get(&url, ADMIN_TOKEN).await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8_lossy(&metrics.body);
    for name in ["acme", "beta"] {
        let line = format!(
            "kommo_fanout_client_requests_total{{account=\"{name}\",route=\"leads\",status=\"200\"}} 2"
        );
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
    let help = "# HELP kommo_fanout_client_requests ";
    assert_eq!(text.lines().filter(|l| l.starts_with(help)).count(), 1);
    assert!(text.ends_with("# EOF\n"));
    // The console's accounts table lists both, each with its own budget and token state.
    let status = t
        .client
        .get(&format!("{}/status.json", t.admin), ADMIN_TOKEN)
        .await;
    assert_eq!(status.status, 200);
    let rows = status.json()["accounts"].clone();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["account"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "beta"]);
    for row in rows.as_array().unwrap() {
        assert_eq!(row["limit"], 1_000_000, "{row}");
        assert_eq!(row["token"], "ok", "{row}");
    }
    let text = String::from_utf8_lossy(&status.body);
    assert!(!text.contains(TOKEN) && !text.contains(&t.acme_key));
}

#[tokio::test]
async fn an_account_with_a_host_is_reached_by_it_without_a_prefix() {
    let t = two(sims(500), |_, _, _| {}).await;
    let port = t.proxy.rsplit(':').next().unwrap();
    let host = format!("BETA.example.internal:{port}");
    t.acme.clear_requests();
    let a = t
        .get("/api/v4/leads?limit=5", &t.beta_key, &[("host", &host)])
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(t.acme.request_count(), 0);
    assert_eq!(t.beta.requests().last().unwrap().path, "/api/v4/leads");
    let next = a.json()["_links"]["next"]["href"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        next.starts_with(&format!("http://{host}/api/v4/leads?")),
        "{next}"
    );
    // Its prefix reaches it too.
    let b = t.get("/beta/api/v4/leads?limit=5", &t.beta_key, &[]).await;
    assert_eq!(b.status, 200);
}

#[tokio::test]
async fn an_unknown_prefix_or_host_is_a_404_that_names_no_account() {
    let t = two(sims(200), |_, _, _| {}).await;
    for (path, host) in [
        ("/nope/api/v4/leads", None),
        ("/api/v4/leads", None),
        ("/", None),
        ("/api/v4/leads", Some("gamma.example.internal")),
    ] {
        let headers: Vec<(&str, &str)> = host.iter().map(|h| ("host", *h)).collect();
        let a = t.get(path, &t.acme_key, &headers).await;
        assert_eq!(a.status, 404, "{path} {host:?}");
        assert_eq!(a.content_type(), "application/problem+json");
        let detail = a.json()["detail"].as_str().unwrap().to_string();
        assert!(detail.contains("2 accounts"), "{detail}");
        for name in ["acme", "beta"] {
            assert!(!detail.contains(name), "{detail}");
        }
    }
    assert_eq!(t.acme.request_count() + t.beta.request_count(), 0);
}

#[tokio::test]
async fn a_key_of_one_account_is_refused_on_the_other() {
    let t = two(sims(200), |_, _, _| {}).await;
    let a = t.get("/beta/api/v4/leads", &t.acme_key, &[]).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.content_type(), "application/problem+json");
    let a = t.get("/acme/api/v4/leads", "not-a-key", &[]).await;
    assert_eq!(a.status, 401);
    assert_eq!(t.acme.request_count() + t.beta.request_count(), 0);
}

#[tokio::test]
async fn a_key_never_reaches_an_account_whose_clients_bring_their_own_tokens() {
    let t = two(sims(200), |_, _, b| b.holding = None).await;
    let a = t.get("/beta/api/v4/leads", &t.acme_key, &[]).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.content_type(), "application/problem+json");
    assert_eq!(t.beta.request_count(), 0);
    let own = t.get("/beta/api/v4/leads?limit=5", TOKEN, &[]).await;
    assert_eq!(own.status, 200);
    assert_eq!(t.beta.requests()[0].token.as_deref(), Some(TOKEN));
}

#[tokio::test]
async fn each_account_keeps_to_its_own_budget_while_both_are_loaded() {
    let window = Duration::from_millis(300);
    let limited = |n: u32, sim: SimConfig| SimConfig {
        rate_limit: Some(SimRateLimit {
            requests: n,
            window,
            block_after: 3,
            block_for: Duration::from_secs(60),
        }),
        ..sim
    };
    let (a, b) = sims(20_000);
    let t = two((limited(3, a), limited(6, b)), |c, a, b| {
        c.limiter.window = window;
        (a.rate_limit, b.rate_limit) = (3, 6);
    })
    .await;
    let load = |name: &'static str, sim: &SimHandle, key: &str| {
        let all = largest(sim, 12);
        let t = &t;
        let key = key.to_string();
        (0..4).map(move |i| {
            let set: Vec<(i64, i64)> = all[i * 3..i * 3 + 3].to_vec();
            let key = key.clone();
            async move {
                let path = format!("/{name}/api/v4/leads?{}&limit=50", stages(&set));
                t.get(&path, &key, &[]).await.status
            }
        })
    };
    let requests: Vec<_> = load("acme", &t.acme, &t.acme_key)
        .map(futures::future::Either::Left)
        .chain(load("beta", &t.beta, &t.beta_key).map(futures::future::Either::Right))
        .collect();
    let statuses = join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    for (sim, limit) in [(&t.acme, 3), (&t.beta, 6)] {
        let log = sim.requests();
        assert!(log.len() >= 12, "{} upstream requests", log.len());
        assert!(log.iter().all(|r| r.status != 429), "the account refused");
        let most = max_in_window(log.iter().map(|r| r.at).collect(), window);
        assert!(most <= limit, "{most} requests within one window");
    }
    // beta's budget is its own: it used more than acme's limit at once.
    let most = max_in_window(t.beta.requests().iter().map(|r| r.at).collect(), window);
    assert!(most > 3, "beta sent at most {most} in a window");
}

#[tokio::test]
async fn one_accounts_block_cool_down_does_not_pause_the_other() {
    let t = two(sims(500), |c, _, _| {
        c.fetch.block_cooldown = Duration::from_secs(60);
    })
    .await;
    t.acme
        .inject(FaultRule::always(Fault::HtmlForbidden).times(1));
    let pipelines = "/api/v4/leads/pipelines";
    let blocked = t.get(&format!("/acme{pipelines}"), &t.acme_key, &[]).await;
    assert_eq!(blocked.status, 403);
    let paused = t.get(&format!("/acme{pipelines}"), &t.acme_key, &[]).await;
    assert_eq!(paused.status, 503);
    assert!(paused.json()["detail"].as_str().unwrap().contains("block"));
    let other = t.get(&format!("/beta{pipelines}"), &t.beta_key, &[]).await;
    assert_eq!(other.status, 200);

    let ready = t.admin("/readyz").await;
    assert_eq!(ready.status, 503);
    let report = ready.json();
    assert_eq!(report["ready"], false);
    assert!(report["accounts"]["acme"]["block_cooldown_remaining_s"].as_f64() > Some(0.0));
    assert_eq!(report["accounts"]["beta"]["ready"], true, "{report}");
}

#[tokio::test]
async fn a_webhook_for_one_account_drops_only_its_cached_answers() {
    const SECRET: &str = "a-webhook-secret-of-the-test";
    let t = two(sims(300), |c, _, _| {
        c.cache.ttl = Duration::from_secs(600);
        c.webhook_secret = Some(SECRET.into());
    })
    .await;
    let cache = |name: &'static str, key: &str| {
        let key = key.to_string();
        let t = &t;
        async move {
            let a = t
                .get(&format!("/{name}/api/v4/leads?limit=5"), &key, &[])
                .await;
            assert_eq!(a.status, 200);
            a.headers["x-cache"].to_str().unwrap().to_string()
        }
    };
    for (name, key) in [("acme", &t.acme_key), ("beta", &t.beta_key)] {
        assert_eq!(cache(name, key).await, "MISS");
        assert_eq!(cache(name, key).await, "HIT");
    }
    let body = "leads[update][0][id]=1&account[subdomain]=acme";
    let post = |path: &'static str| {
        let url = format!("{}{path}", t.admin);
        let headers = [
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-webhook-secret", SECRET),
        ];
        let t = &t;
        async move {
            let a = t
                .client
                .request_with(Method::POST, &url, None, body, &headers);
            a.await.status
        }
    };
    assert_eq!(post("/webhooks/kommo/gamma").await, 404);
    assert_eq!(post("/webhooks/kommo/acme").await, 200);
    assert_eq!(cache("acme", &t.acme_key).await, "MISS");
    assert_eq!(cache("beta", &t.beta_key).await, "HIT");
    assert_eq!(post("/webhooks/kommo").await, 200);
    assert_eq!(cache("acme", &t.acme_key).await, "MISS");
    assert_eq!(cache("beta", &t.beta_key).await, "MISS");
}

/// Runs the binary with `args`: its exit code, stdout and stderr.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kommo-fanout"))
        .args(args)
        .env_remove("KOMMO_FANOUT_UPSTREAM")
        .output()
        .expect("binary runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

#[test]
fn check_prints_the_accounts_and_config_errors_name_the_account_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("acme.token");
    std::fs::write(&token, "secret-account-token\n").unwrap();
    let config = dir.path().join("kommo.toml");
    let write = |text: &str| std::fs::write(&config, text).unwrap();
    let path = config.to_str().unwrap();
    write(&format!(
        "keys_file = \"{}\"\n[accounts.acme]\nupstream = \"https://acme.kommo.com\"\ntoken_file = \"{}\"\n\
         [accounts.beta]\nupstream = \"https://beta.kommo.com\"\nhost = \"beta.example.internal\"\nrate_limit = 3\n",
        dir.path().join("keys.toml").display(),
        token.display()
    ));
    let (code, out, err) = run(&["serve", "--config", path, "--check"]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "accounts.acme.upstream = \"https://acme.kommo.com\"",
        "accounts.acme.credential = \"token file\"",
        "accounts.beta.route = \"Host beta.example.internal, or /beta\"",
        "accounts.beta.rate_limit = 3",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
    }
    assert!(!out.contains("secret-account-token"));

    for (text, needle) in [
        (
            "[accounts.acme]\nupstream = \"https://acme.kommo.com\"\nrate_limt = 3\n",
            "[accounts.acme]: unknown field `rate_limt`",
        ),
        (
            "[accounts.acme]\nhost = \"acme.example.internal\"\n",
            "[accounts.acme]: missing field `upstream`",
        ),
    ] {
        write(text);
        let (code, _, err) = run(&["serve", "--config", path, "--check"]);
        assert_eq!(code, 2, "{text}: {err}");
        assert!(err.contains(needle), "{text}: {err}");
    }
}

/// `serve`'s command line, parsed and validated as the binary does (the config file merged).
fn serve_config(args: &[&str]) -> ServeConfig {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Serve,
    }
    #[derive(clap::Subcommand)]
    enum Serve {
        Serve(Box<ServeArgs>),
    }
    let argv = ["kommo-fanout", "serve"].iter().chain(args).map(Into::into);
    let cli: Cli = kommo_fanout::config::parse_args(argv.collect()).expect("valid flags");
    let Serve::Serve(args) = cli.command;
    args.validate().expect("a valid configuration")
}

#[tokio::test]
async fn an_oauth_account_of_the_config_file_is_served_with_its_tokens() {
    let mut oauth = SimOAuth::new("client-1", "secret-1", "https://example.test/cb");
    oauth.token_ttl = Duration::from_secs(3600);
    let acme = Sim::spawn(SimConfig {
        oauth: Some(oauth),
        ..sim_config(300)
    });
    let beta = Sim::spawn(sim_config(300));
    let (acme, beta) = (acme.await.unwrap(), beta.await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(file("secret"), "secret-1\n").unwrap();
    std::fs::write(file("beta.token"), format!("{TOKEN}\n")).unwrap();
    let acme_key = add_key(&dir.path().join("keys.toml"), "acme");
    let beta_key = add_key(&dir.path().join("keys.toml"), "beta");
    let config = file("kommo.toml");
    std::fs::write(
        &config,
        format!(
            "keys_file = \"{keys}\"\ncache_ttl = \"0s\"\n\
             [accounts.acme]\nupstream = \"{acme}\"\n\
             oauth = {{ client_id = \"client-1\", client_secret_file = \"{secret}\", redirect_uri = \"https://example.test/cb\", refresh_token_file = \"{tokens}\" }}\n\
             [accounts.beta]\nupstream = \"{beta}\"\ntoken_file = \"{token}\"\n",
            keys = file("keys.toml"),
            acme = acme.base_url(),
            beta = beta.base_url(),
            secret = file("secret"),
            tokens = file("acme.tokens"),
            token = file("beta.token"),
        ),
    )
    .unwrap();
    let code = acme.oauth_code();
    // The account of the config file, by name.
    let args = [
        "oauth",
        "exchange",
        "--config",
        &config,
        "--account",
        "acme",
        "--code",
        &code,
    ]
    .map(String::from);
    let (status, out, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args)
    })
    .await
    .unwrap();
    assert_eq!(status, 0, "{err}");
    assert!(out.contains("acme.tokens"), "{out}");

    let config = serve_config(&["--config", &config, "--limiter-lock-dir", "off"]);
    let (proxy, _admin, _stop) = serve(config).await;
    let client = Client::default();
    let pipelines = "api/v4/leads/pipelines";
    let a = client
        .get(&format!("{proxy}/acme/{pipelines}"), &acme_key)
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let sent = acme.requests().last().unwrap().token.clone().unwrap();
    assert!(
        sent != TOKEN && sent.matches('.').count() == 2,
        "an OAuth access token"
    );
    let b = client
        .get(&format!("{proxy}/beta/{pipelines}"), &beta_key)
        .await;
    assert_eq!(b.status, 200);
    assert_eq!(
        beta.requests().last().unwrap().token.as_deref(),
        Some(TOKEN)
    );
}
