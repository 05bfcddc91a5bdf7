//! `kommo-fanout verify` against the simulated account: it passes in every JSON spelling within
//! its budget of upstream requests, sending only GETs; it fails, naming the view, when one
//! leads page misplaces or drops a lead; it records redacted fixtures that replay.

use kommo_fanout::verify::{run, Options, Report};
use kommo_sim::{Fault, FaultRule, JsonStyle, Sim, SimConfig, SimHandle, DEMO_TOKEN};

/// 1000 leads: the picked stages hold a few dozen each, so every view is read whole.
async fn sim(style: JsonStyle, faults: Vec<FaultRule>) -> SimHandle {
    Sim::spawn(SimConfig {
        leads: 1000,
        json_style: style,
        faults,
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts")
}

fn options(sim: &SimHandle, max_requests: u64) -> Options {
    Options {
        upstream: sim.base_url(),
        token: DEMO_TOKEN.into(),
        max_requests,
        record: None,
    }
}

/// The run stayed within its budget, counted what the account saw, and sent only GETs.
fn within_budget(sim: &SimHandle, report: &Report, max: u64) {
    let seen = sim.requests();
    assert!(seen.len() as u64 <= max, "{} requests", seen.len());
    assert_eq!(
        seen.len() as u64,
        report.requests_spent,
        "{}",
        report.text()
    );
    assert!(seen.iter().all(|r| r.method == "GET"), "{seen:?}");
}

#[tokio::test]
async fn passes_in_every_json_style_within_the_budget() {
    for style in [JsonStyle::Compact, JsonStyle::Php, JsonStyle::Pretty] {
        let sim = sim(style, Vec::new()).await;
        let report = run(&options(&sim, 40)).await;
        assert_eq!(report.exit_code(), 0, "{style}:\n{}", report.text());
        within_budget(&sim, &report, 40);
        // Both orders, both page sizes, the relayed one-stage view and the error answer.
        assert!(report.checks.len() >= 9, "{}", report.text());
        assert!(
            report.plan.contains("capped by --max-requests 40"),
            "{}",
            report.plan
        );
        assert!(
            report.text().contains("(all ") && report.text().contains(": 204"),
            "{}",
            report.text()
        );
    }
}

/// A fault firing once, on the first leads page verify reads (its own direct read of the first
/// stage in `order[id]=asc`), fails the run and names the views that differ.
async fn fails_naming_the_view(fault: Fault, needle: &str) {
    let sim = sim(JsonStyle::Compact, vec![FaultRule::always(fault).times(1)]).await;
    let report = run(&options(&sim, 60)).await;
    let text = report.text();
    assert_eq!(report.exit_code(), 1, "{text}");
    assert!(report.error.is_none(), "{text}");
    within_budget(&sim, &report, 60);
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.ok).collect();
    assert!(
        failed
            .iter()
            .any(|c| c.name.starts_with("view order[id]=asc limit=7 stages ")
                && c.detail.starts_with("page ")),
        "{text}"
    );
    assert!(failed.iter().any(|c| c.detail.contains(needle)), "{text}");
    assert!(text.contains("summary: MISMATCH"), "{text}");
}

#[tokio::test]
async fn a_misplaced_lead_fails() {
    fails_naming_the_view(Fault::MisplaceLead, "but its stage is").await;
}

#[tokio::test]
async fn a_dropped_lead_fails() {
    fails_naming_the_view(Fault::DropLead, "expected at position").await;
}

#[tokio::test]
async fn a_dropped_lead_on_every_page_is_caught_across_orders() {
    let sim = sim(JsonStyle::Compact, vec![FaultRule::always(Fault::DropLead)]).await;
    let report = run(&options(&sim, 60)).await;
    assert_eq!(report.exit_code(), 1, "{}", report.text());
    assert!(
        report.text().contains("in one of them only"),
        "{}",
        report.text()
    );
}

#[tokio::test]
async fn the_budget_is_a_hard_cap() {
    // Three 500s, each retried, cost one more request than the plan keeps in reserve at this
    // budget: the run stops before sending it, a failure of the run and not a mismatch.
    let faults = vec![FaultRule::always(Fault::Status500)
        .on_query("filter")
        .times(3)];
    let sim = sim(JsonStyle::Compact, faults).await;
    let report = run(&options(&sim, 12)).await;
    assert_eq!(report.exit_code(), 3, "{}", report.text());
    let error = report.error.clone().unwrap_or_default();
    assert!(error.starts_with("budget exhausted"), "{error}");
    within_budget(&sim, &report, 12);
}

#[tokio::test]
async fn records_redacted_fixtures_that_replay() {
    let dir = std::env::temp_dir().join(format!("kommo-fanout-verify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sim = sim(JsonStyle::Php, Vec::new()).await;
    let report = run(&Options {
        record: Some(dir.clone()),
        ..options(&sim, 12)
    })
    .await;
    assert_eq!(report.exit_code(), 0, "{}", report.text());
    // The pipelines and two stages in two orders.
    let files = std::fs::read_dir(&dir).expect("recorded").count();
    assert_eq!(files, 1 + 1 + 4);
    for entry in std::fs::read_dir(&dir).expect("recorded").flatten() {
        let text = std::fs::read_to_string(entry.path()).expect("text");
        assert!(!text.contains(DEMO_TOKEN));
        assert!(
            !text.contains(&sim.base_url().replace('/', "\\/")),
            "{text}"
        );
    }
    let leads = sim.leads();
    let page = std::fs::read_dir(&dir)
        .expect("recorded")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains("-id-asc"))
        .expect("a leads page");
    let text = std::fs::read_to_string(page.path()).expect("text");
    // PHP's spelling kept; names redacted.
    assert!(text.contains("\\/api\\/v4\\/leads"), "{text}");
    assert!(text.contains("\"name\":\"redacted\""), "{text}");
    assert!(leads
        .iter()
        .all(|l| !text.contains(&format!("\"{}\"", l.name))));
    assert!(crate::fixtures::replay(&dir) > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The binary: the report on stdout, exit codes 0 (pass), 2 (usage), 3 (token refused).
#[tokio::test]
async fn the_command_reports_and_exits_by_outcome() {
    let sim = sim(JsonStyle::Pretty, Vec::new()).await;
    let dir = std::env::temp_dir().join(format!("kommo-fanout-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (good, bad) = (dir.join("good"), dir.join("bad"));
    std::fs::write(&good, format!("  {DEMO_TOKEN}\n")).expect("token file");
    std::fs::write(&bad, "not-the-token\n").expect("token file");
    let verify = |token: &std::path::Path, extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kommo-fanout"));
        cmd.args(["verify", "--upstream", &sim.base_url(), "--token-file"])
            .arg(token)
            .args(extra)
            .env_remove("RUST_LOG");
        cmd.output()
    };
    let out = verify(&good, &["--max-requests", "20"])
        .await
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("ok   view order[updated_at]=desc limit=50 stages "),
        "{stdout}"
    );
    assert!(stdout.contains("summary: PASS"), "{stdout}");
    assert!(!stdout.contains(DEMO_TOKEN));

    let out = verify(&good, &["--json", "--max-requests", "12"])
        .await
        .expect("runs");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(json["passed"], true);
    assert!(json["requests_spent"].as_u64().is_some_and(|n| n <= 12));

    let out = verify(&bad, &[]).await.expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(stdout.contains("refused the token (401"), "{stdout}");
    assert!(!stdout.contains("not-the-token"));

    let missing = dir.join("missing");
    for args in [&["--max-requests", "3"][..], &["--bogus"]] {
        let out = verify(&good, args).await.expect("runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let out = verify(&missing, &[]).await.expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--token-file"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A proxy of the same account runs in this process (as it would on this host): verify does not
/// spend the budget alongside it, and says why, without sending anything.
#[tokio::test]
async fn waits_its_turn_behind_a_running_proxy_of_the_account_and_says_so() {
    let sim = sim(JsonStyle::Compact, Vec::new()).await;
    let config =
        kommo_fanout::config::ServeConfig::for_upstream(&sim.base_url()).expect("valid config");
    let _running = crate::support::serve_proxy(config).await;
    let report = run(&options(&sim, 40)).await;
    assert_eq!(report.exit_code(), 3, "{}", report.text());
    assert!(
        report
            .text()
            .contains("another kommo-fanout process sends to"),
        "{}",
        report.text()
    );
    assert_eq!(sim.request_count(), 0);
}
