//! `--max-upstream-per-request`: a page that would take more upstream requests than the bound
//! is refused with `400` before they are sent; ordinary pages, walks in order with the cache
//! on, and the one-stage relay are answered. The simulator's request log is the judge.

use std::time::Duration;

use kommo_fanout::config::ServeConfig;

use crate::support::*;

const LEADS: usize = 20_000;
/// The bound these tests set: small, so a few stages of the account pass it.
const BOUND: u32 = 10;

/// Sets `--max-upstream-per-request`, and turns the cache on when `ttl` is given.
fn bounded(n: u32, ttl: Option<Duration>) -> impl FnOnce(&mut ServeConfig) {
    move |c| {
        c.gateway.max_upstream_per_request = n;
        if let Some(ttl) = ttl {
            cached(ttl)(c);
        }
    }
}

const TTL: Duration = Duration::from_secs(600);

/// Upstream pages it takes to read each of `pairs` to its end (a stream ends on a page
/// shorter than 250, or on a `204` after a full one).
fn pages_to_the_end(s: &Stack, pairs: &[(i64, i64)]) -> usize {
    let leads = s.sim.leads();
    pairs
        .iter()
        .map(|&pair| truth(&leads, &[pair], BY_ID, |_| true).len() / 250 + 1)
        .sum()
}

/// The problem document of a refused page, after checking its status, type and `page` param.
fn refused(a: &Answer) -> String {
    assert_eq!(
        a.status,
        400,
        "{}",
        String::from_utf8_lossy(&a.body)
            .chars()
            .take(300)
            .collect::<String>()
    );
    assert_eq!(a.content_type(), "application/problem+json");
    let v = a.json();
    assert_eq!(v["status"], 400);
    assert_eq!(v["invalid-params"][0]["name"], "page", "{v}");
    v["detail"].as_str().expect("a detail").to_string()
}

#[tokio::test]
async fn a_deep_jump_is_refused_within_the_bound_and_says_what_to_do() {
    let s = stack_with(sim_config(LEADS), bounded(BOUND, Some(TTL))).await;
    let pairs = largest_stages(&s, 4);
    assert!(
        pages_to_the_end(&s, &pairs) > 2 * BOUND as usize,
        "the view must cost far more than the bound to read through"
    );
    s.sim.clear_requests();
    let a = s
        .leads(&format!("{}&page=999999&limit=50", stages(&pairs)))
        .await;
    let detail = refused(&a);
    let sent = s.sim.request_count();
    assert!(sent <= BOUND as usize, "{sent} upstream requests");
    assert!(sent > 0, "the merge read what the bound allowed");
    for needle in [
        "page 999999",
        "--max-upstream-per-request 10",
        &format!("{sent} were sent"),
        "about ",
        "Narrow the view with filters",
        "walk the pages in order",
        "cached",
        "fewer stages",
    ] {
        assert!(detail.contains(needle), "{needle:?} not in: {detail}");
    }
    // Refusals are not stored: the same request asks again (and, its first pages now cached,
    // gets further for the same bound).
    s.sim.clear_requests();
    refused(
        &s.leads(&format!("{}&page=999999&limit=50", stages(&pairs)))
            .await,
    );
    let again = s.sim.request_count();
    assert!(
        (1..=BOUND as usize).contains(&again),
        "{again} upstream requests"
    );
}

#[tokio::test]
async fn more_stages_than_the_bound_are_refused_before_any_request() {
    let s = stack_with(sim_config(LEADS), bounded(BOUND, None)).await;
    let pairs = largest_stages(&s, BOUND as usize + 1);
    s.sim.clear_requests();
    let detail = refused(&s.leads(&stages(&pairs)).await);
    assert_eq!(s.sim.request_count(), 0);
    assert!(detail.contains("page 1 "), "{detail}");
    assert!(detail.contains("0 were sent"), "{detail}");
    assert!(
        detail.contains(&format!("up to {} more", pairs.len())),
        "{detail}"
    );
    assert!(detail.contains("--cache-ttl 0"), "{detail}");
}

#[tokio::test]
async fn a_first_page_over_many_stages_is_answered() {
    let s = stack_with(sim_config(LEADS), bounded(BOUND, None)).await;
    let pairs = largest_stages(&s, 8);
    s.sim.clear_requests();
    let a = s.leads(&format!("{}&limit=50", stages(&pairs))).await;
    assert_eq!(a.status, 200);
    let want = truth(&s.sim.leads(), &pairs, BY_ID, |_| true);
    assert_eq!(a.ids(), want[..50]);
    assert!(s.sim.request_count() <= BOUND as usize);
}

#[tokio::test]
async fn walking_pages_in_order_with_the_cache_stays_under_the_bound_page_by_page() {
    let s = stack_with(sim_config(LEADS), bounded(BOUND, Some(TTL))).await;
    let pairs = largest_stages(&s, 4);
    let want = truth(&s.sim.leads(), &pairs, BY_ID, |_| true);
    let mut seen = Vec::new();
    let mut total = 0;
    for page in 1.. {
        s.sim.clear_requests();
        let a = s
            .leads(&format!("{}&limit=250&page={page}", stages(&pairs)))
            .await;
        let sent = s.sim.request_count();
        assert!(
            sent <= BOUND as usize,
            "page {page}: {sent} upstream requests"
        );
        total += sent;
        if a.status == 204 {
            break;
        }
        assert_eq!(a.status, 200, "page {page}");
        seen.extend(a.ids());
    }
    assert_eq!(seen, want, "the walk lists the whole view, in order");
    assert!(
        total > 2 * BOUND as usize,
        "the whole view costs {total}, far above the bound, and was still walked"
    );
}

#[tokio::test]
async fn a_page_that_takes_exactly_the_bound_is_answered_and_one_less_is_refused() {
    let query = |s: &Stack| format!("{}&limit=250&page=5", stages(&largest_stages(s, 4)));
    // What the page costs with the cache off, measured against an ample bound.
    let s = stack_with(sim_config(LEADS), bounded(10_000, None)).await;
    let expected = s.leads(&query(&s)).await;
    assert_eq!(expected.status, 200);
    let cost = s.sim.request_count();
    assert!(cost > 4, "page 5 reads past the first page of some stage");
    let bound = u32::try_from(cost).expect("a small cost");

    let s = stack_with(sim_config(LEADS), bounded(bound, None)).await;
    let a = s.leads(&query(&s)).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.ids(), expected.ids());
    assert_eq!(s.sim.request_count(), cost);

    let s = stack_with(sim_config(LEADS), bounded(bound - 1, None)).await;
    refused(&s.leads(&query(&s)).await);
    assert!(s.sim.request_count() < cost);
}

#[tokio::test]
async fn the_one_stage_relay_is_never_refused() {
    let s = stack_with(sim_config(LEADS), bounded(1, None)).await;
    let pair = largest_stages(&s, 1);
    s.sim.clear_requests();
    let a = s
        .leads(&format!("{}&page=999999&limit=250", stages(&pair)))
        .await;
    assert_eq!(a.status, 204);
    assert_eq!(s.sim.request_count(), 1);
    // The same stage named twice is one stage: relayed as well.
    s.sim.clear_requests();
    let twice = [pair[0], pair[0]];
    let a = s.leads(&format!("{}&page=2", stages(&twice))).await;
    assert_eq!(a.status, 200);
    assert_eq!(s.sim.request_count(), 1);
}
