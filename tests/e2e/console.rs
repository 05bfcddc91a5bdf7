//! The operator's console on the admin listener: `/status.json` moves with traffic, the page
//! shows the same figures without JavaScript, neither ever holds a token or key, and the
//! admin token guards both and `/metrics`.

use std::path::Path;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method};
use kommo_fanout::console::AdminToken;
use kommo_fanout::credentials::{CredentialSource, Holding};
use kommo_fanout::keys::{self, KeysCommand, Scope};
use serde_json::Value;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);

impl Stack {
    async fn admin_get(&self, path: &str, token: Option<&str>) -> Answer {
        let url = format!("{}{path}", self.admin);
        self.request(Method::GET, &url, token, "").await
    }

    async fn status(&self) -> Value {
        let answer = self.admin_get("/status.json", None).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.content_type(), "application/json");
        answer.json()
    }

    /// Polls `/status.json` until `done` holds for it; fails after [`WAIT`].
    async fn status_when(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let done = &done;
        eventually_some(what, WAIT, || async move {
            Some(self.status().await).filter(|status| done(status))
        })
        .await
    }
}

/// The entry of `list` (rows of objects) whose `key` is `value`.
fn row<'a>(list: &'a Value, key: &str, value: &str) -> &'a Value {
    list.as_array()
        .and_then(|rows| rows.iter().find(|r| r[key] == value))
        .unwrap_or_else(|| panic!("no row with {key} = {value} in {list}"))
}

fn column_sum(status: &Value, column: &str) -> u64 {
    status["history"][column]
        .as_array()
        .expect("a history column")
        .iter()
        .map(|v| v.as_u64().expect("a count"))
        .sum()
}

#[tokio::test]
async fn status_json_figures_move_by_what_a_known_sequence_of_requests_costs() {
    let s = stack_with(sim_config(3000), |c| {
        c.cache.ttl = Duration::from_secs(60);
        c.limiter.requests = 7;
    })
    .await;
    let set = largest_stages(&s, 3);
    // The first sample: nothing has happened yet.
    let before = s
        .status_when("a first sample", |v| v["budget"]["at"].as_u64() > Some(0))
        .await;
    assert_eq!(before["budget"]["limit"], 7);
    assert_eq!(before["budget"]["window_s"], 1.0);
    assert_eq!(before["work"]["upstream_requests_total"], 0.0);
    assert_eq!(before["cache"]["enabled"], true);

    // A fan-out of 3 stages (3 upstream pages), then the same again (one answer-cache hit).
    assert_eq!(s.leads(&stages(&set)).await.status, 200);
    assert_eq!(s.leads(&stages(&set)).await.status, 200);
    let after = s
        .status_when("both requests sampled", |v| {
            v["work"]["client_requests_total"] == 2.0
        })
        .await;
    let work = &after["work"];
    assert_eq!(work["upstream_requests_total"], 3.0);
    assert_eq!(row(&work["upstream"], "kind", "stream")["total"], 3.0);
    assert_eq!(row(&work["routes"], "route", "leads")["total"], 2.0);
    assert_eq!(work["upstream_per_client_request"], 1.5);
    assert_eq!(work["fanout_requests_total"], 1.0);
    assert_eq!(work["fanout_width_avg"], 3.0);
    assert!(work["upstream_latency_p50_last_min_s"].as_f64().unwrap() > 0.0);
    let cache = &after["cache"];
    assert_eq!(row(&cache["levels"], "level", "answer")["miss"], 1.0);
    assert_eq!(row(&cache["levels"], "level", "answer")["hit"], 1.0);
    assert_eq!(row(&cache["levels"], "level", "page")["miss"], 3.0);
    assert!(cache["bytes"].as_f64().unwrap() > 0.0);
    assert_eq!(cache["max_bytes"], 256 * 1024 * 1024);
    // The per-second rows add up to the counters.
    assert_eq!(column_sum(&after, "sent"), 3);
    assert_eq!(column_sum(&after, "client"), 2);
    assert_eq!(column_sum(&after, "hits"), 1);
    assert_eq!(column_sum(&after, "misses"), 4);
    assert_eq!(after["budget"]["upstream_429_total"], 0.0);
    assert_eq!(after["budget"]["queued"], 0);
    assert!(after["live"].is_null() && after["keys"].is_null());
    let columns = &after["history"];
    let n = columns["at"].as_array().unwrap().len();
    assert!((2..=900).contains(&n), "{n} rows");
    for c in ["sent", "slots_taken", "queued", "throttled", "refused"] {
        assert_eq!(columns[c].as_array().unwrap().len(), n, "{c}");
    }

    // A pass-through the upstream refuses: a 404 of its own, one more upstream request.
    let missing = s.get("/api/v4/no-such-thing", TOKEN).await;
    assert_eq!(missing.status, 404);
    let later = s
        .status_when("the pass-through sampled", |v| {
            v["work"]["client_requests_total"] == 3.0
        })
        .await;
    assert_eq!(later["work"]["upstream_requests_total"], 4.0);
    assert_eq!(
        row(&later["work"]["routes"], "route", "passthrough")["status"],
        "404"
    );
    assert_eq!(column_sum(&later, "sent"), 4);
    assert!(!later.to_string().contains(TOKEN));
}

/// Adds a key to `file` and returns it.
fn add_key(file: &Path, name: &str, scope: Scope) -> String {
    let out = keys::run(KeysCommand::Add {
        keys_file: file.to_path_buf(),
        account: "default".into(),
        name: name.into(),
        scope,
    })
    .expect("the key is added");
    out.lines().last().expect("a key line").trim().to_string()
}

/// The text of each `data-k="budget.…"` element of the page, by path.
fn page_figures(html: &str, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for part in html.split("data-k=\"").skip(1) {
        let (key, rest) = part.split_once('"').expect("a closed attribute");
        if !key.starts_with(prefix) {
            continue;
        }
        let text = rest
            .split_once('>')
            .and_then(|(_, t)| t.split_once('<'))
            .map(|(t, _)| t)
            .expect("an element's text");
        out.push((key.to_string(), text.to_string()));
    }
    out
}

/// A JSON value as the page prints it.
fn printed(v: &Value) -> String {
    match v {
        Value::Null => "\u{2013}".into(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => {
            format!("{}", n.as_f64().unwrap() as i64)
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn the_page_shows_the_budget_figures_of_status_json_keys_by_name_and_never_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    let dashboard = add_key(&keys_file, "dashboard", Scope::LeadsRead);
    let spare = add_key(&keys_file, "spare", Scope::Read);
    let token_file = dir.path().join("account.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let s = stack_with(sim_config(2000), |c| {
        c.cache.ttl = Duration::from_secs(60);
        c.limiter.requests = 7;
        c.holding = Some(Holding {
            account: "default".into(),
            source: CredentialSource::TokenFile(token_file),
            keys_file,
            allow_client_tokens: false,
        });
    })
    .await;
    let set = largest_stages(&s, 2);
    let leads = s
        .get(&format!("/api/v4/leads?{}", stages(&set)), &dashboard)
        .await;
    assert_eq!(leads.status, 200);
    let status = s
        .status_when("the keyed request sampled", |v| {
            v["work"]["client_requests_total"] == 1.0
        })
        .await;
    let keys = &status["keys"];
    assert!(row(keys, "name", "dashboard")["last_used"]
        .as_u64()
        .is_some());
    assert_eq!(row(keys, "name", "dashboard")["scope"], "leads:read");
    assert!(row(keys, "name", "spare")["last_used"].is_null());
    assert_eq!(status["accounts"][0]["account"], "default");
    assert_eq!(status["accounts"][0]["token"], "ok");

    // The page and the JSON of one second say the same about the budget. A second may turn
    // between the two reads: then read both again.
    let until = tokio::time::Instant::now() + WAIT;
    let (page, status) = loop {
        let page = s.admin_get("/", None).await;
        let status = s.status().await;
        let page_at = page_figures(&String::from_utf8_lossy(&page.body), "budget.at");
        if printed(&status["budget"]["at"]) == page_at[0].1 {
            break (page, status);
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no page and status of one second"
        );
    };
    assert_eq!(page.status, 200);
    assert!(page.content_type().starts_with("text/html"));
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    let figures = page_figures(&html, "budget.");
    assert!(figures.len() >= 10, "{figures:?}");
    for (key, text) in &figures {
        let path = key.strip_prefix("budget.").unwrap();
        assert_eq!(text, &printed(&status["budget"][path]), "{key}");
    }
    assert!(html.contains("<td>dashboard</td><td>default</td><td>leads:read</td>"));
    // Everything is in the page: no script, style, font or image from elsewhere.
    for outside in ["src=\"http", "href=\"http", "@import", "url(", "<link"] {
        assert!(!html.contains(outside), "{outside}");
    }
    assert!(
        html.contains("<polyline"),
        "the chart is drawn without JavaScript"
    );

    // No token, key, key hash or credential fingerprint, in the page or the JSON.
    let mut secrets = vec![TOKEN.to_string(), dashboard.clone(), spare.clone()];
    for credential in [&dashboard, &spare, &TOKEN.to_string()] {
        let mut headers = HeaderMap::new();
        let bearer = HeaderValue::from_str(&format!("Bearer {credential}")).unwrap();
        headers.insert(http::header::AUTHORIZATION, bearer);
        let fingerprint = s.gateway.fingerprint(&headers).unwrap();
        secrets.push(fingerprint[..12].to_string());
    }
    let hashes = std::fs::read_to_string(dir.path().join("keys.toml")).unwrap();
    for line in hashes.lines().filter(|l| l.starts_with("sha256")) {
        let hash = line.split('"').nth(1).unwrap();
        secrets.push(hash[..16].to_string());
    }
    let json = status.to_string();
    for secret in &secrets {
        assert!(!html.contains(secret.as_str()), "the page holds {secret}");
        assert!(!json.contains(secret.as_str()), "the JSON holds {secret}");
    }
}

#[tokio::test]
async fn the_admin_token_guards_the_console_and_metrics_but_not_health() {
    const ADMIN: &str = "admin-token-0123456789";
    let s = stack_with(sim_config(100), |c| {
        c.admin_token = Some(AdminToken::new(ADMIN).unwrap());
    })
    .await;
    for path in ["/", "/status.json", "/metrics"] {
        for token in [None, Some("admin-token-012345678"), Some(TOKEN)] {
            let refused = s.admin_get(path, token).await;
            assert_eq!(refused.status, 401, "{path} with {token:?}");
            assert_eq!(refused.content_type(), "application/problem+json");
            assert!(refused.headers.contains_key("www-authenticate"));
            assert!(!String::from_utf8_lossy(&refused.body).contains(ADMIN));
        }
        assert_eq!(s.admin_get(path, Some(ADMIN)).await.status, 200, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(s.admin_get(path, None).await.status, 200, "{path}");
    }
    let page = s.admin_get("/", Some(ADMIN)).await;
    assert!(!String::from_utf8_lossy(&page.body).contains(ADMIN));
}

#[tokio::test]
async fn the_admin_token_file_is_read_at_start_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin.token");
    std::fs::write(&file, "  admin-token-0123456789\n").unwrap();
    let open = kommo_fanout::config::ServeConfig::for_upstream("http://127.0.0.1:1").unwrap();
    assert!(open.admin_token.is_none());
    let args = |path: &Path| {
        vec![
            "serve".to_string(),
            "--upstream=http://127.0.0.1:1".into(),
            format!("--admin-token-file={}", path.display()),
        ]
    };
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        serve: kommo_fanout::config::ServeArgs,
    }
    let parse = |path: &Path| {
        use clap::Parser;
        Cli::try_parse_from(args(path)).unwrap().serve.validate()
    };
    let config = parse(&file).expect("a good token file");
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Bearer admin-token-0123456789"),
    );
    assert!(config.admin_token.as_ref().unwrap().admits(&headers));
    assert!(config.describe().contains("admin_token = \"(set)\""));
    assert!(!config.describe().contains("admin-token-0123456789"));
    let err = parse(&dir.path().join("missing")).unwrap_err();
    assert!(err.contains("--admin-token-file"), "{err}");
    std::fs::write(&file, "short\n").unwrap();
    let err = parse(&file).unwrap_err();
    assert!(err.contains("at least 16"), "{err}");
}

/// The sample names a running proxy's `/metrics` exports: every sample line's name, and for
/// each declared family the names its samples take (counters' `_total`, histograms'
/// `_bucket`, `_sum` and `_count`), as families with labels appear only once used.
fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix("# TYPE ") {
            let mut parts = decl.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        } else if !line.starts_with('#') {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            names.insert(name.to_string());
        }
    }
    names
}

/// Every `kommo_fanout_…` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("kommo_fanout_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

#[tokio::test]
async fn the_grafana_dashboard_graphs_only_metrics_the_proxy_exports_and_all_the_console_reads() {
    // Families with labels appear once used: traffic that uses each (a fan-out through the
    // cache, a retried 500, a live view that takes deltas).
    let s = stack_with(sim_config(1000), |c| {
        c.cache.ttl = Duration::from_secs(60);
        c.sync = Some(kommo_fanout::sync::live::SyncSettings {
            interval: Duration::from_millis(200),
            max_staleness: Duration::from_secs(600),
            with: Vec::new(),
            max_bytes: 64 * 1024 * 1024,
            idle: Duration::from_secs(600),
            reconcile: Duration::from_secs(3600),
        });
    })
    .await;
    s.sim
        .inject(kommo_sim::FaultRule::always(kommo_sim::Fault::Status500).times(1));
    assert_eq!(s.get("/api/v4/leads/pipelines", TOKEN).await.status, 200);
    let set = largest_stages(&s, 2);
    assert_eq!(s.leads(&stages(&set)).await.status, 200);
    let families = [
        "sync_deltas_total",
        "upstream_retries_total",
        "cache_lookups_total",
    ];
    let text = eventually_some("every family in use", WAIT, || async {
        let scrape = s.admin_get("/metrics", None).await;
        let text = String::from_utf8_lossy(&scrape.body).into_owned();
        let all = families
            .iter()
            .all(|n| text.contains(&format!("kommo_fanout_{n}{{")));
        all.then_some(text)
    })
    .await;
    let exported = exported_names(&text);
    assert!(exported.contains("kommo_fanout_upstream_requests_total"));

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/kommo-fanout.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard is there"))
            .expect("the dashboard is JSON");
    let mut panels: Vec<&Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    let mut graphed = std::collections::BTreeSet::new();
    let mut queried = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let Some(targets) = panel["targets"].as_array() else {
            assert!(
                matches!(panel["type"].as_str(), Some("row" | "text")),
                "{title}: a panel without queries"
            );
            continue;
        };
        assert!(!targets.is_empty(), "{title}: no queries");
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: {expr} names no metric");
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{title}: {name} is not exported by the proxy"
                );
                graphed.insert(name);
            }
            queried += 1;
        }
    }
    assert!(queried >= 15, "{queried} queries");
    // The same figures as the console: each metric it reads is on a panel.
    for name in kommo_fanout::console::METRICS {
        assert!(
            graphed.iter().any(|g| g.starts_with(name)),
            "the console reads {name}, no panel graphs it"
        );
    }
}

#[tokio::test]
async fn live_views_show_each_replica_by_its_place_never_by_its_fingerprint_name() {
    let s = stack_with(sim_config(1000), |c| {
        c.sync = Some(kommo_fanout::sync::live::SyncSettings {
            interval: Duration::from_millis(200),
            max_staleness: Duration::from_secs(600),
            with: Vec::new(),
            max_bytes: 64 * 1024 * 1024,
            idle: Duration::from_secs(600),
            reconcile: Duration::from_secs(3600),
        });
    })
    .await;
    let set = largest_stages(&s, 2);
    assert_eq!(s.leads(&stages(&set)).await.status, 200);
    let status = s
        .status_when("a live replica", |v| {
            v["live"]["replicas"][0]["state"] == "live"
        })
        .await;
    let replica = &status["live"]["replicas"][0];
    assert_eq!(replica["replica"], 1);
    assert!(replica["leads"].as_u64().unwrap() > 0);
    assert!(replica["upstream_requests"].as_u64().unwrap() > 0);
    // `/sync` names the replica by a prefix of the credential's fingerprint: not the console.
    let sync = s.admin_get("/sync", None).await.json();
    let name = sync["replicas"][0]["replica"].as_str().unwrap().to_string();
    assert!(!status.to_string().contains(&name));
    let page = s.admin_get("/", None).await;
    let html = String::from_utf8_lossy(&page.body);
    assert!(!html.contains(&name));
    assert!(html.contains("<td>1</td><td>live</td>"));
}
