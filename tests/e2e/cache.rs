//! The cache: coalescing, canonical keys, isolation by credential, deep pages, webhooks,
//! stale-while-revalidate and the byte bound, asserted on the simulator's request counts.

use std::time::Duration;

use futures::future::join_all;
use http::Method;
use kommo_fanout::config::ServeConfig;

use crate::support::*;

const LEADS: usize = 3000;
const SECRET: &str = "webhook-secret-0123456789";

fn with_cache(c: &mut ServeConfig) {
    c.cache.ttl = Duration::from_secs(300);
    c.webhook_secret = Some(SECRET.into());
}

#[tokio::test]
async fn thirty_concurrent_identical_requests_cost_one_set_of_upstream_calls() {
    let s = stack_with(sim_config(LEADS), with_cache).await;
    let set = largest_stages(&s, 5);
    let q = format!("{}&limit=50&order[updated_at]=desc", stages(&set));
    let answers = join_all((0..30).map(|_| s.leads(&q))).await;
    assert_eq!(
        s.sim.request_count(),
        5,
        "one upstream request per stage, for all 30 clients"
    );
    let want: Vec<i64> = truth(
        &s.sim.leads(),
        &set,
        TruthOrder {
            field: "updated_at",
            desc: true,
        },
        |_| true,
    )
    .into_iter()
    .take(50)
    .collect();
    for a in &answers {
        assert_eq!(a.status, 200);
        assert_eq!(a.body, answers[0].body, "identical answers");
        assert_eq!(a.ids(), want);
    }
    let misses = answers
        .iter()
        .filter(|a| a.headers["x-cache"] == "MISS")
        .count();
    assert_eq!(misses, 1, "one request filled, the others waited for it");
}

#[tokio::test]
async fn repeats_and_equivalent_spellings_hit_and_no_cache_refetches() {
    let s = stack_with(sim_config(LEADS), with_cache).await;
    let set = largest_stages(&s, 3);
    let q = format!(
        "{}&filter[responsible_user_id][]=1001&filter[responsible_user_id][]=1002&limit=20",
        stages(&set)
    );
    let first = s.leads(&q).await;
    assert_eq!(first.headers["x-cache"], "MISS");
    assert_eq!(s.sim.request_count(), 3);

    let again = s.leads(&q).await;
    assert_eq!(again.headers["x-cache"], "HIT");
    assert!(again.headers.contains_key("age"));
    assert_eq!(again.body, first.body);

    // Pairs reversed and repeated, parameters reordered, another list spelling, the default
    // page spelled out: the same upstream requests, so no new ones.
    let mut rev = set.clone();
    rev.reverse();
    rev.push(set[0]);
    let q2 = format!(
        "page=1&limit=20&filter%5Bresponsible_user_id%5D%5B0%5D=1002&filter[responsible_user_id]=1001&{}",
        stages(&rev)
    );
    let equivalent = s.leads(&q2).await;
    assert_eq!(equivalent.status, 200);
    assert_eq!(equivalent.ids(), first.ids());
    assert_eq!(
        s.sim.request_count(),
        3,
        "equivalent requests share upstream pages"
    );

    let fresh = s
        .request_with(
            Method::GET,
            &format!("{}/api/v4/leads?{q}", s.proxy),
            Some(TOKEN),
            "",
            &[("cache-control", "no-cache")],
        )
        .await;
    assert_eq!(fresh.headers["x-cache"], "MISS");
    assert_eq!(s.sim.request_count(), 6, "no-cache refetches every stream");
}

#[tokio::test]
async fn tokens_never_see_each_others_cached_leads() {
    let s = stack_with(sim_config(LEADS), with_cache).await;
    let set = largest_stages(&s, 3);
    let path = format!("/api/v4/leads?{}&limit=250", stages(&set));
    let leads = s.sim.leads();
    let all: Vec<i64> = truth(&leads, &set, BY_ID, |_| true)
        .into_iter()
        .take(250)
        .collect();
    let mine: Vec<i64> = truth(&leads, &set, BY_ID, |l| {
        [1001, 1002].contains(&l.responsible_user_id)
    })
    .into_iter()
    .take(250)
    .collect();
    assert_ne!(all, mine);
    for _ in 0..2 {
        // The second round is served warm, and each token still gets exactly its own view.
        assert_eq!(s.get(&path, TOKEN).await.ids(), all);
        assert_eq!(s.get(&path, "limited").await.ids(), mine);
        let stranger = s.get(&path, "stolen-or-expired").await;
        assert_eq!(stranger.status, 401);
        assert!(stranger.json()["_embedded"].is_null());
    }
    // A request without credentials is not cached either.
    let anonymous = s
        .request(Method::GET, &format!("{}{path}", s.proxy), None, "")
        .await;
    assert_eq!(anonymous.status, 401);
    assert!(!anonymous.headers.contains_key("x-cache"));
}

#[tokio::test]
async fn walking_a_view_costs_about_one_request_per_upstream_page() {
    let s = stack_with(sim_config(LEADS), with_cache).await;
    let sizes = stage_sizes(&s.sim);
    let chosen = [sizes[0], sizes[1], sizes[2], sizes[6]];
    let set: Vec<(i64, i64)> = chosen.iter().map(|&(p, st, _)| (p, st)).collect();
    let mut pages = 0;
    for page in 1.. {
        let a = s
            .leads(&format!("{}&limit=10&page={page}", stages(&set)))
            .await;
        if a.status == 204 {
            break;
        }
        pages += 1;
    }
    // Each stream: its full pages, plus the short (or empty) page that ends it.
    let upstream_pages: usize = chosen.iter().map(|&(_, _, n)| n / 250 + 1).sum();
    let sent = s.sim.request_count();
    assert!(pages > 40, "{pages} client pages");
    assert!(
        sent <= upstream_pages,
        "{sent} upstream requests for {upstream_pages} upstream pages over {pages} client pages"
    );
}

#[tokio::test]
async fn a_lead_webhook_drops_the_cache_and_the_next_poll_sees_the_move() {
    let s = stack_with(sim_config(LEADS), with_cache).await;
    let set = largest_stages(&s, 3);
    let q = format!("{}&limit=250&filter[id][]=", stages(&set));
    let lead = s
        .sim
        .leads()
        .into_iter()
        .find(|l| !l.is_deleted && (l.pipeline_id, l.status_id) == set[2])
        .unwrap();
    let q = format!("{q}{}", lead.id);
    let before = s.leads(&q).await;
    assert_eq!(
        before.json()["_embedded"]["leads"][0]["status_id"],
        set[2].1
    );
    assert!(s.sim.move_lead(lead.id, set[1].0, set[1].1));
    assert_eq!(
        s.leads(&q).await.headers["x-cache"],
        "HIT",
        "cached until told"
    );

    let body = format!(
        "leads[status][0][id]={}&leads[status][0][status_id]={}&leads[status][0][pipeline_id]={}&leads[status][0][old_status_id]={}&account[subdomain]=example",
        lead.id, set[1].1, set[1].0, set[2].1
    );
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let refused = s
        .request_with(
            Method::POST,
            &format!("{}/webhooks/kommo?secret=wrong", s.admin),
            None,
            &body,
            &form,
        )
        .await;
    assert_eq!(refused.status, 401);
    assert_eq!(
        s.leads(&q).await.headers["x-cache"],
        "HIT",
        "a refused webhook drops nothing"
    );

    let accepted = s
        .request_with(
            Method::POST,
            &format!("{}/webhooks/kommo", s.admin),
            None,
            &body,
            &[form[0], ("x-webhook-secret", SECRET)],
        )
        .await;
    assert_eq!(accepted.status, 200);
    let after = s.leads(&q).await;
    assert_eq!(after.headers["x-cache"], "MISS");
    assert_eq!(
        after.json()["_embedded"]["leads"][0]["status_id"],
        set[1].1,
        "the lead in its new stage"
    );
}

#[tokio::test]
async fn stale_answers_are_served_and_refreshed_exactly_once() {
    let s = stack_with(sim_config(LEADS), |c| {
        c.cache.ttl = Duration::from_millis(300);
        c.cache.stale_while_revalidate = Duration::from_secs(60);
    })
    .await;
    let set = largest_stages(&s, 4);
    let q = stages(&set);
    assert_eq!(s.leads(&q).await.headers["x-cache"], "MISS");
    assert_eq!(s.sim.request_count(), 4);
    // Past the 300 ms TTL: time passing, not an event to poll for.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stale = join_all((0..5).map(|_| s.leads(&q))).await;
    for a in &stale {
        assert_eq!(
            (a.status.as_u16(), a.headers["x-cache"].to_str().unwrap()),
            (200, "HIT")
        );
    }
    // The one background refresh: four more upstream requests, however many stale hits.
    eventually("the background refresh", Duration::from_secs(2), || {
        s.sim.request_count() >= 8
    })
    .await;
    // A quiet period: a second refresh would have sent four more by now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.sim.request_count(), 8);
    // The refresh asks with the client's credential, and gets real pages.
    for r in &s.sim.requests()[4..] {
        assert_eq!((r.token.as_deref(), r.status), (Some(TOKEN), 200), "{r:?}");
    }
    let refreshed = s.leads(&q).await;
    assert_eq!(refreshed.headers["age"], "0");
    assert_eq!(s.sim.request_count(), 8);
}

#[tokio::test]
async fn the_cache_stays_within_its_byte_bound() {
    let max = 512 * 1024;
    let s = stack_with(sim_config(LEADS), |c| {
        c.cache.ttl = Duration::from_secs(300);
        c.cache.max_bytes = max;
    })
    .await;
    let all = largest_stages(&s, 12);
    for i in 0..all.len() - 1 {
        for limit in [50, 250] {
            let a = s
                .leads(&format!("{}&limit={limit}", stages(&all[i..i + 2])))
                .await;
            assert_eq!(a.status, 200);
        }
    }
    let cache = s.gateway.cache.as_ref().expect("caching on");
    let held = cache.weighted_bytes().await;
    assert!(held > 0 && held <= max, "{held} bytes held, bound {max}");
}

#[tokio::test]
async fn pass_through_gets_are_cached_only_when_asked() {
    let path = "/api/v4/leads/pipelines";
    let off = stack_with(sim_config(300), with_cache).await;
    off.get(path, TOKEN).await;
    off.get(path, TOKEN).await;
    assert_eq!(off.sim.request_count(), 2);

    let on = stack_with(sim_config(300), |c| {
        with_cache(c);
        c.cache.passthrough = true;
    })
    .await;
    let a = on.get(path, TOKEN).await;
    let b = on.get(path, TOKEN).await;
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    assert_eq!(b.headers["x-cache"], "HIT");
    assert_eq!(a.body, b.body);
    assert_eq!(on.sim.request_count(), 1);
    assert_eq!(
        on.get(path, "limited").await.headers["x-cache"],
        "MISS",
        "per credential"
    );
}
