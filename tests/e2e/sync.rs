//! Live views (`--sync`): replicas loaded from the simulator and kept fresh from its change
//! feed answer multi-stage views with what the simulator holds, per credential, at a cost in
//! upstream requests that does not grow with the views polled.

use std::time::Duration;

use http::Method;
use kommo_fanout::config::ServeConfig;
use kommo_fanout::sync::live::SyncSettings;
use kommo_sim::{Fault, FaultRule, SimLead};
use serde_json::Value;

use crate::support::*;

const LEADS: usize = 3000;
const SECRET: &str = "webhook-secret-0123456789";
/// Long enough that no assertion below depends on how fast a loaded machine runs.
const WAIT: Duration = Duration::from_secs(60);

fn settings(interval: Duration) -> SyncSettings {
    SyncSettings {
        interval,
        // Answers stay from the replica while a slow machine runs a test.
        max_staleness: Duration::from_secs(600),
        with: Vec::new(),
        max_bytes: 512 * 1024 * 1024,
        idle: Duration::from_secs(600),
        reconcile: Duration::from_secs(3600),
    }
}

fn live(interval: Duration) -> impl FnOnce(&mut ServeConfig) {
    move |c| {
        c.sync = Some(settings(interval));
        c.webhook_secret = Some(SECRET.into());
    }
}

/// The `/sync` report.
async fn report(s: &Stack) -> Value {
    let answer = Client::default()
        .get(&format!("{}/sync", s.admin), TOKEN)
        .await;
    assert_eq!(answer.status, 200);
    answer.json()
}

/// How many replicas `/sync` reports live.
async fn live_replicas(s: &Stack) -> usize {
    let r = report(s).await;
    r["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "live")
        .count()
}

/// Asks for `query` with `token` until a replica answers it.
async fn until_synced(s: &Stack, query: &str, token: &str, replicas: usize) {
    let first = s.get(&format!("/api/v4/leads?{query}"), token).await;
    assert!(first.status.is_success(), "{:?}", first.body);
    eventually_async("the replica is live", WAIT, || async {
        live_replicas(s).await >= replicas
    })
    .await;
    let answer = s.get(&format!("/api/v4/leads?{query}"), token).await;
    assert_eq!(answer.headers["x-cache"], "SYNC", "{query}");
}

/// Every id of a view, walked page by page; each page must come from the replica.
async fn walk(s: &Stack, query: &str, token: &str) -> Vec<i64> {
    let mut ids = Vec::new();
    for page in 1.. {
        let answer = s
            .get(&format!("/api/v4/leads?{query}&page={page}"), token)
            .await;
        assert_eq!(answer.headers["x-cache"], "SYNC", "{query} page {page}");
        assert!(answer.headers.contains_key("age"));
        if answer.status == 204 {
            assert!(answer.body.is_empty());
            break;
        }
        assert_eq!(answer.status, 200);
        let got = answer.ids();
        ids.extend(&got);
        if answer.json()["_links"].get("next").is_none() {
            break;
        }
    }
    ids
}

fn visible_to_limited(l: &SimLead) -> bool {
    matches!(l.responsible_user_id, 1001 | 1002)
}

/// A view's query, the order of its truth, and the leads it keeps.
type ViewCase = (String, TruthOrder, fn(&SimLead) -> bool);

/// Views in several orders and filters.
fn views(set: &[(i64, i64)]) -> Vec<ViewCase> {
    let st = stages(set);
    vec![
        (format!("{st}&limit=250"), BY_ID, |_| true),
        (
            format!("{st}&limit=100&order[created_at]=desc"),
            TruthOrder {
                field: "created_at",
                desc: true,
            },
            |_| true,
        ),
        (
            format!("{st}&limit=77&order[updated_at]=asc&filter[responsible_user_id][]=1003&filter[responsible_user_id][]=1005"),
            TruthOrder {
                field: "updated_at",
                desc: false,
            },
            |l| matches!(l.responsible_user_id, 1003 | 1005),
        ),
        (
            format!("{st}&limit=50&order[id]=desc&filter[price][from]=1000&filter[price][to]=50000"),
            TruthOrder {
                field: "id",
                desc: true,
            },
            |l| (1000..=50000).contains(&l.price),
        ),
    ]
}

async fn assert_views_match(s: &Stack, set: &[(i64, i64)], token: &str) {
    let leads = s.sim.leads();
    for (query, order, keep) in views(set) {
        let keep_token = |l: &SimLead| keep(l) && (token == TOKEN || visible_to_limited(l));
        let want = truth(&leads, set, order, keep_token);
        assert_eq!(walk(s, &query, token).await, want, "{query}");
    }
}

#[tokio::test]
async fn views_from_the_replica_equal_the_account_after_the_load_and_after_a_burst_of_changes() {
    let s = stack_with(sim_config(LEADS), live(Duration::from_secs(1))).await;
    let set = largest_stages(&s, 6);
    until_synced(&s, &format!("{}&limit=10", stages(&set)), TOKEN, 1).await;
    assert_views_match(&s, &set, TOKEN).await;

    // A burst: moves within and across the view, deletions, restores, creations, edits.
    let leads = s.sim.leads();
    let in_view: Vec<&SimLead> = leads
        .iter()
        .filter(|l| !l.is_deleted && set.contains(&(l.pipeline_id, l.status_id)))
        .collect();
    let outside = stage_sizes(&s.sim)
        .into_iter()
        .map(|(p, st, _)| (p, st))
        .find(|st| !set.contains(st))
        .unwrap();
    for l in &in_view[..5] {
        assert!(s.sim.move_lead(l.id, set[5].0, set[5].1));
    }
    for l in &in_view[5..10] {
        assert!(s.sim.move_lead(l.id, outside.0, outside.1));
    }
    for l in &in_view[10..15] {
        assert!(s.sim.delete_lead(l.id));
    }
    assert!(s.sim.restore_lead(in_view[12].id));
    for l in leads.iter().filter(|l| l.is_deleted).take(3) {
        assert!(s.sim.restore_lead(l.id));
    }
    for l in &in_view[15..20] {
        assert!(s.sim.edit_lead(l.id, 4242));
    }
    let created = s.sim.create_lead(set[0].0, set[0].1).expect("created");

    let q = format!("{}&limit=250", stages(&set));
    eventually_async("the burst reaches the replica", WAIT, || async {
        let want = truth(&s.sim.leads(), &set, BY_ID, |_| true);
        walk(&s, &q, TOKEN).await == want
    })
    .await;
    assert!(walk(&s, &q, TOKEN).await.contains(&created));
    assert_views_match(&s, &set, TOKEN).await;
}

#[tokio::test]
async fn an_answer_from_the_replica_is_the_page_the_fan_out_renders() {
    let s = stack_with(sim_config(LEADS), live(Duration::from_secs(1))).await;
    let mut plain = ServeConfig::for_upstream(&s.sim.base_url()).unwrap();
    plain.limiter.requests = 1_000_000;
    plain.cache.ttl = Duration::ZERO;
    // Two proxies of one account in one process: no taking turns through the lock file.
    plain.limiter_lock = None;
    let fan_out = serve_proxy(plain).await;
    let set = largest_stages(&s, 4);
    until_synced(&s, &stages(&set), TOKEN, 1).await;
    let client = Client::default();
    for query in [
        format!("{}&limit=3&page=2", stages(&set)),
        format!("{}&limit=250&order[updated_at]=desc", stages(&set)),
        format!("{}&limit=5&filter[id][]=1&filter[id][]=2", stages(&set)),
        format!("{}&limit=50&page=9999", stages(&set)),
    ] {
        let path = format!("/api/v4/leads?{query}");
        let synced = s.get(&path, TOKEN).await;
        assert_eq!(synced.headers["x-cache"], "SYNC", "{query}");
        let fanned = client.get(&format!("{}{path}", fan_out.proxy), TOKEN).await;
        assert_eq!(synced.status, fanned.status, "{query}: {:?}", fanned.body);
        assert_eq!(
            synced.headers.get("content-type"),
            fanned.headers.get("content-type")
        );
        assert_eq!(
            moved(&synced.body, &s.proxy, &fan_out.proxy),
            String::from_utf8_lossy(&fanned.body),
            "{query}"
        );
    }
}

#[tokio::test]
async fn two_credentials_each_see_only_their_own_leads() {
    let s = stack_with(sim_config(LEADS), live(Duration::from_secs(1))).await;
    let set = largest_stages(&s, 5);
    until_synced(&s, &stages(&set), TOKEN, 1).await;
    until_synced(&s, &stages(&set), "limited", 2).await;
    assert_views_match(&s, &set, TOKEN).await;
    assert_views_match(&s, &set, "limited").await;
    let r = report(&s).await;
    let mut sizes: Vec<u64> = r["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["leads"].as_u64().unwrap())
        .collect();
    sizes.sort();
    let all = s.sim.leads();
    let live_leads = all.iter().filter(|l| !l.is_deleted);
    let limited = live_leads.clone().filter(|l| visible_to_limited(l)).count() as u64;
    assert_eq!(sizes, vec![limited, live_leads.count() as u64]);
}

#[tokio::test]
async fn polled_views_cost_the_deltas_only_whatever_their_number() {
    let s = stack_with(sim_config(LEADS), live(Duration::from_secs(1))).await;
    let sizes = stage_sizes(&s.sim);
    let set: Vec<(i64, i64)> = sizes.iter().take(8).map(|&(p, st, _)| (p, st)).collect();
    until_synced(&s, &stages(&set), TOKEN, 1).await;
    s.sim.clear_requests();
    let deltas = || async {
        let metrics = Client::default()
            .get(&format!("{}/metrics", s.admin), TOKEN)
            .await;
        let text = String::from_utf8_lossy(&metrics.body).to_string();
        sample(&text, "kommo_fanout_sync_deltas_total{outcome=\"ok\"}")
    };
    let before = deltas().await;
    // Ten views of eight stages, each polled ten times.
    for round in 0..10 {
        for v in 0..10 {
            let q = format!(
                "{}&limit={}&order[updated_at]=desc&page={}",
                stages(&set[v % 3..]),
                25 + v,
                1 + round % 3
            );
            let answer = s.leads(&q).await;
            assert_eq!(answer.headers["x-cache"], "SYNC");
        }
    }
    // Whole deltas only: wait for the next one to complete, then count.
    let counted = deltas().await;
    eventually_async("a delta completes", WAIT, || async {
        deltas().await > counted
    })
    .await;
    let requests = s.sim.requests();
    let after = deltas().await;
    let rounds = (after - before) as usize;
    for r in &requests {
        let sync = r.query.contains("updated_at%5D%5Bfrom%5D") || r.path == "/api/v4/events";
        assert!(sync, "only the sync reads upstream: {} {}", r.path, r.query);
    }
    assert!(
        requests.len() <= 2 * (rounds + 1),
        "{} upstream requests for {rounds} deltas",
        requests.len()
    );
}

#[tokio::test]
async fn a_query_or_an_unknown_filter_goes_to_the_fan_out() {
    let s = stack_with(sim_config(LEADS), live(Duration::from_secs(1))).await;
    let set = largest_stages(&s, 3);
    until_synced(&s, &stages(&set), TOKEN, 1).await;
    let lead = s
        .sim
        .leads()
        .into_iter()
        .find(|l| !l.is_deleted && set.contains(&(l.pipeline_id, l.status_id)))
        .unwrap();
    for query in [
        format!("{}&query={}", stages(&set), lead.id),
        format!("{}&filter[bogus]=1", stages(&set)),
        format!("{}&with=only_deleted", stages(&set)),
    ] {
        s.sim.clear_requests();
        let answer = s.leads(&query).await;
        assert_ne!(
            answer.headers.get("x-cache").map(|v| v.as_bytes()),
            Some(&b"SYNC"[..]),
            "{query}"
        );
        let stage_reads = s
            .sim
            .requests()
            .iter()
            .filter(|r| r.query.contains("statuses"))
            .count();
        assert_eq!(stage_reads, set.len(), "{query}: one read per stage");
    }
    let answer = s
        .leads(&format!("{}&query={}", stages(&set), lead.id))
        .await;
    assert!(answer.ids().contains(&lead.id));
}

#[tokio::test]
async fn a_401_on_a_delta_drops_the_replica_and_the_client_gets_it() {
    let s = stack_with(sim_config(LEADS), live(Duration::from_secs(1))).await;
    let set = largest_stages(&s, 3);
    until_synced(&s, &stages(&set), TOKEN, 1).await;
    s.sim.inject(
        FaultRule::always(Fault::Status {
            status: 401,
            body: r#"{"title":"Unauthorized","type":"https://httpstatus.es/401","status":401,"detail":"Token has been revoked"}"#.into(),
            content_type: "application/problem+json".into(),
        })
        .on_path("/api/v4/"),
    );
    eventually_async("the replica is dropped", WAIT, || async {
        report(&s).await["replicas"].as_array().unwrap().is_empty()
    })
    .await;
    let answer = s.leads(&stages(&set)).await;
    assert_eq!(answer.status, 401);
    assert!(answer.headers.get("x-cache").is_none_or(|v| v != "SYNC"));
    let metrics = Client::default()
        .get(&format!("{}/metrics", s.admin), TOKEN)
        .await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert_eq!(
        sample(
            &text,
            "kommo_fanout_sync_dropped_total{outcome=\"unauthorized\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn the_reconcile_repairs_a_change_the_feed_did_not_report() {
    let s = stack_with(sim_config(LEADS), |c| {
        let mut sync = settings(Duration::from_secs(1));
        sync.reconcile = Duration::from_secs(2);
        c.sync = Some(sync);
    })
    .await;
    let set = largest_stages(&s, 4);
    until_synced(&s, &stages(&set), TOKEN, 1).await;
    let leads = s.sim.leads();
    let mut in_view = leads
        .iter()
        .filter(|l| !l.is_deleted && set.contains(&(l.pipeline_id, l.status_id)));
    let (moved_lead, deleted_lead) = (in_view.next().unwrap(), in_view.next().unwrap());
    assert!(s.sim.move_lead_silently(moved_lead.id, set[3].0, set[3].1));
    assert!(s.sim.delete_lead_silently(deleted_lead.id));
    let q = format!("{}&limit=250", stages(&set));
    let want = truth(&s.sim.leads(), &set, BY_ID, |_| true);
    eventually_async("the reconcile repairs both", WAIT, || async {
        walk(&s, &q, TOKEN).await == want
    })
    .await;
    let metrics = Client::default()
        .get(&format!("{}/metrics", s.admin), TOKEN)
        .await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(sample(&text, "kommo_fanout_sync_reconcile_repairs_total") >= 2.0);
}

#[tokio::test]
async fn a_lead_webhook_brings_the_change_before_the_interval() {
    // An interval far beyond the test's patience: only the webhook can bring the change.
    let s = stack_with(sim_config(LEADS), live(Duration::from_secs(3600))).await;
    let set = largest_stages(&s, 3);
    until_synced(&s, &stages(&set), TOKEN, 1).await;
    let lead = s
        .sim
        .leads()
        .into_iter()
        .find(|l| !l.is_deleted && (l.pipeline_id, l.status_id) == set[2])
        .unwrap();
    assert!(s.sim.move_lead(lead.id, set[0].0, set[0].1));
    let body = format!(
        "leads[status][0][id]={}&leads[status][0][status_id]={}&leads[status][0][pipeline_id]={}&account[subdomain]=example",
        lead.id, set[0].1, set[0].0
    );
    let hook = s
        .request_with(
            Method::POST,
            &format!("{}/webhooks/kommo?secret={SECRET}", s.admin),
            None,
            &body,
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await;
    assert_eq!(hook.status, 200);
    let q = format!("{}&limit=1&filter[id][]={}", stages(&set), lead.id);
    eventually_async("the move shows", WAIT, || async {
        let answer = s.leads(&q).await;
        answer.headers["x-cache"] == "SYNC"
            && answer.json()["_embedded"]["leads"][0]["status_id"] == set[0].1
    })
    .await;
}

#[tokio::test]
async fn with_values_the_replica_holds_are_answered_and_others_stripped() {
    let s = stack_with(sim_config(LEADS), |c| {
        let mut sync = settings(Duration::from_secs(1));
        sync.with = vec!["contacts".into(), "loss_reason".into()];
        c.sync = Some(sync);
    })
    .await;
    let mut plain = ServeConfig::for_upstream(&s.sim.base_url()).unwrap();
    plain.limiter.requests = 1_000_000;
    plain.cache.ttl = Duration::ZERO;
    plain.limiter_lock = None;
    let fan_out = serve_proxy(plain).await;
    let set = largest_stages(&s, 3);
    until_synced(&s, &format!("{}&with=contacts", stages(&set)), TOKEN, 1).await;
    let client = Client::default();
    for with in ["&with=contacts,loss_reason", "&with=contacts", ""] {
        let path = format!("/api/v4/leads?{}&limit=20{with}", stages(&set));
        let synced = s.get(&path, TOKEN).await;
        assert_eq!(synced.headers["x-cache"], "SYNC", "{with}");
        let fanned = client.get(&format!("{}{path}", fan_out.proxy), TOKEN).await;
        // The same values; the bytes too where nothing was stripped.
        let moved_body = moved(&synced.body, &s.proxy, &fan_out.proxy);
        let synced_value: Value = serde_json::from_str(&moved_body).unwrap();
        assert_eq!(synced_value, fanned.json(), "{with}");
        if with == "&with=contacts,loss_reason" {
            assert_eq!(moved_body, String::from_utf8_lossy(&fanned.body));
        }
    }
    let other = s
        .leads(&format!("{}&with=catalog_elements", stages(&set)))
        .await;
    assert!(other.headers.get("x-cache").is_none_or(|v| v != "SYNC"));
}

#[tokio::test]
async fn replicas_past_the_byte_bound_or_idle_are_dropped_and_the_fan_out_answers() {
    let s = stack_with(sim_config(LEADS), |c| {
        let mut sync = settings(Duration::from_secs(1));
        sync.max_bytes = 64 * 1024;
        c.sync = Some(sync);
    })
    .await;
    let set = largest_stages(&s, 3);
    assert_eq!(s.leads(&stages(&set)).await.status, 200);
    let dropped = |reason: &'static str| {
        let admin = s.admin.clone();
        async move {
            let metrics = Client::default()
                .get(&format!("{admin}/metrics"), TOKEN)
                .await;
            let text = String::from_utf8_lossy(&metrics.body).to_string();
            sample(
                &text,
                &format!("kommo_fanout_sync_dropped_total{{outcome=\"{reason}\"}}"),
            )
        }
    };
    eventually_async("the replica over the bound is dropped", WAIT, || async {
        dropped("memory").await == 1.0
    })
    .await;
    assert!(report(&s).await["replicas"].as_array().unwrap().is_empty());
    let answer = s.leads(&stages(&set)).await;
    assert_eq!(answer.status, 200);
    assert!(answer.headers.get("x-cache").is_none_or(|v| v != "SYNC"));
    assert!(
        report(&s).await["replicas"].as_array().unwrap().is_empty(),
        "no reload right away"
    );

    let s = stack_with(sim_config(LEADS), |c| {
        let mut sync = settings(Duration::from_secs(1));
        sync.idle = Duration::from_secs(2);
        c.sync = Some(sync);
    })
    .await;
    until_synced(&s, &stages(&set), TOKEN, 1).await;
    let dropped = || async {
        let metrics = Client::default()
            .get(&format!("{}/metrics", s.admin), TOKEN)
            .await;
        let text = String::from_utf8_lossy(&metrics.body).to_string();
        sample(&text, "kommo_fanout_sync_dropped_total{outcome=\"idle\"}")
    };
    eventually_async("the idle replica is dropped", WAIT, || async {
        dropped().await == 1.0
    })
    .await;
    assert!(report(&s).await["replicas"].as_array().unwrap().is_empty());
}
