//! Upstream protection: the rate window, 429 pauses, blocks, retries, deadlines, fairness.
//!
//! Windows are scaled down (a few hundred milliseconds instead of a second) so the tests stay
//! short; the guarantee checked is the same: never more than N arrivals in any window, counted
//! from the simulator's own arrival log.

use std::num::NonZeroU32;
use std::time::Duration;

use futures::future::join_all;
use kommo_fanout::config::ServeConfig;
use kommo_sim::{Fault, FaultRule, SimConfig, SimRateLimit};

use crate::support::max_in_window;
use crate::support::*;

const LEADS: usize = 3000;

fn limited(n: u32, window: Duration) -> impl FnOnce(&mut ServeConfig) {
    move |c| {
        c.limiter.requests = n;
        c.limiter.window = window;
        c.limiter.margin = Duration::from_millis(20);
    }
}

/// The simulator enforcing Kommo's limit: 429 past `n` arrivals in the trailing window.
fn sim_limited(n: u32, window: Duration) -> SimConfig {
    SimConfig {
        rate_limit: Some(SimRateLimit {
            requests: n,
            window,
            block_after: 3,
            block_for: Duration::from_secs(60),
        }),
        ..sim_config(LEADS)
    }
}

#[tokio::test]
async fn concurrent_clients_never_exceed_n_in_any_window() {
    let window = Duration::from_millis(250);
    let s = stack_with(sim_limited(7, window), limited(7, window)).await;
    let all = largest_stages(&s, 24);
    let leads = s.sim.leads();
    let clients = (0..20).map(|i| {
        let set: Vec<(i64, i64)> = (0..4).map(|k| all[(i + k * 5) % all.len()]).collect();
        let s = &s;
        let leads = &leads;
        async move {
            let a = s.leads(&format!("{}&limit=50", stages(&set))).await;
            let want: Vec<i64> = truth(leads, &set, BY_ID, |_| true)
                .into_iter()
                .take(50)
                .collect();
            (a, want)
        }
    });
    let answers = join_all(clients).await;
    let log = s.sim.requests();
    let t0 = log[0].at;
    eprintln!(
        "{:?}",
        log.iter()
            .map(|r| ((r.at - t0).as_millis(), r.status))
            .collect::<Vec<_>>()
    );
    for (a, want) in answers {
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.ids(), want);
    }
    assert!(log.len() >= 80, "{} upstream requests", log.len());
    assert_eq!(
        log.iter().filter(|r| r.status == 429).count(),
        0,
        "the simulator never had to refuse"
    );
    let most = max_in_window(log.iter().map(|r| r.at).collect(), window);
    assert!(most <= 7, "{most} requests within one window");
}

#[tokio::test]
async fn the_full_burst_goes_out_at_once_then_max_wait_answers_503() {
    let s = stack_with(sim_config(LEADS), |c| {
        limited(7, Duration::from_secs(60))(c);
        c.fetch.max_wait = Duration::from_millis(200);
    })
    .await;
    let set = largest_stages(&s, 7);
    // With a one-minute window, anything but a full burst would not finish in time.
    let a = tokio::time::timeout(Duration::from_secs(20), s.leads(&stages(&set)))
        .await
        .expect("7 stages on an idle proxy need no waiting");
    assert_eq!(a.status, 200);
    assert_eq!(s.sim.request_count(), 7);

    let b = s.leads(&stages(&set[..2])).await;
    assert_eq!(b.status, 503);
    assert_eq!(b.content_type(), "application/problem+json");
    let retry: u64 = b.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(b.json()["detail"].as_str().unwrap().contains("--max-wait"));
    assert_eq!(s.sim.request_count(), 7, "nothing was sent past the budget");
}

#[tokio::test]
async fn a_429_pauses_every_upstream_request_until_retry_after() {
    let s = stack(sim_config(LEADS)).await;
    let set = largest_stages(&s, 3);
    s.sim.inject(
        FaultRule::always(Fault::TooManyRequests {
            retry_after: Some(1),
            header: false,
        })
        .on_query(format!("filter[statuses][0][status_id]={}", set[0].1))
        .times(1),
    );
    let a = s.leads(&format!("{}&limit=10", stages(&set))).await;
    assert_eq!(a.status, 200);
    let want: Vec<i64> = truth(&s.sim.leads(), &set, BY_ID, |_| true)
        .into_iter()
        .take(10)
        .collect();
    assert_eq!(a.ids(), want);

    let log = s.sim.requests();
    let limited = log
        .iter()
        .find(|r| r.status == 429)
        .expect("the fault fired");
    // The three first pages were granted together, before the 429; the retry of the refused
    // one waited out retry_after (however late the others arrived on a busy machine).
    let retry = log
        .iter()
        .filter(|r| r.query == limited.query && r.status != 429)
        .map(|r| r.at)
        .next()
        .expect("the refused page was retried");
    assert!(
        retry >= limited.at + Duration::from_secs(1),
        "retried {:?} after the 429",
        retry - limited.at
    );
    assert_eq!(log.len(), 4, "three streams and one retry");
}

#[tokio::test]
async fn transient_faults_are_retried_and_persistent_ones_fail_cleanly() {
    let s = stack(sim_config(LEADS)).await;
    let set = largest_stages(&s, 3);
    let on = |pair: (i64, i64)| format!("filter[statuses][0][status_id]={}", pair.1);
    s.sim.inject(
        FaultRule::always(Fault::Status500)
            .on_query(on(set[0]))
            .times(2),
    );
    s.sim.inject(
        FaultRule::always(Fault::TruncatedBody)
            .on_query(on(set[1]))
            .times(1),
    );
    s.sim.inject(
        FaultRule::always(Fault::ConnectionReset)
            .on_query(on(set[2]))
            .times(1),
    );
    let a = s.leads(&format!("{}&limit=100", stages(&set))).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let want: Vec<i64> = truth(&s.sim.leads(), &set, BY_ID, |_| true)
        .into_iter()
        .take(100)
        .collect();
    assert_eq!(a.ids(), want);
    let attempts = |pair: (i64, i64)| {
        s.sim
            .requests()
            .iter()
            .filter(|r| {
                form_urlencoded::parse(r.query.as_bytes())
                    .any(|(k, v)| k == "filter[statuses][0][status_id]" && v == pair.1.to_string())
            })
            .count()
    };
    assert_eq!(attempts(set[0]), 3, "two 500s, then success");
    assert_eq!(attempts(set[1]), 2, "a truncated body, then success");
    assert_eq!(attempts(set[2]), 2, "a reset, then success");

    s.sim.clear_requests();
    s.sim
        .inject(FaultRule::always(Fault::Status500).on_query(on(set[0])));
    let b = s.leads(&stages(&set)).await;
    assert_eq!(b.status, 502);
    assert_eq!(b.json()["failed-stages"][0]["upstream_status"], 500);
    assert_eq!(
        attempts(set[0]),
        3,
        "--retries 2: three attempts, then the 502"
    );
}

#[tokio::test]
async fn non_idempotent_pass_through_is_never_retried() {
    let s = stack(sim_config(300)).await;
    s.sim.inject(
        FaultRule::always(Fault::Status500)
            .on_path("/api/v4/leads")
            .times(5),
    );
    let a = s
        .request(
            http::Method::POST,
            &format!("{}/api/v4/leads", s.proxy),
            Some(TOKEN),
            r#"[{"name":"x"}]"#,
        )
        .await;
    assert_eq!(a.status, 500, "the upstream's answer, relayed");
    assert_eq!(s.sim.request_count(), 1);
}

#[tokio::test]
async fn idempotent_pass_through_is_retried_like_a_stream_page() {
    let s = stack(sim_config(300)).await;
    s.sim.inject(
        FaultRule::always(Fault::Status500)
            .on_path("/api/v4/account")
            .times(1),
    );
    s.sim.inject(
        FaultRule::always(Fault::TooManyRequests {
            retry_after: Some(1),
            header: true,
        })
        .on_path("/api/v4/account")
        .times(1),
    );
    let a = s.get("/api/v4/account", TOKEN).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let statuses: Vec<u16> = s.sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 429, 200]);
}

#[tokio::test]
async fn an_html_403_stops_upstream_traffic_for_the_cool_down() {
    let s = stack_with(sim_config(LEADS), |c| {
        c.fetch.block_cooldown = Duration::from_millis(1500)
    })
    .await;
    let set = largest_stages(&s, 2);
    s.sim.inject(
        FaultRule::always(Fault::HtmlForbidden)
            .on_path("/api/v4/leads")
            .times(1),
    );
    let first = s.leads(&stages(&set)).await;
    assert!(
        first.status == 403 || first.status == 503,
        "{}",
        first.status
    );
    let sent = s.sim.request_count();
    for _ in 0..5 {
        let a = s.leads(&stages(&set)).await;
        assert_eq!(a.status, 503);
        assert!(a.headers.contains_key("retry-after"));
        assert!(a.json()["detail"].as_str().unwrap().contains("block"));
    }
    assert_eq!(
        s.sim.request_count(),
        sent,
        "nothing sent during the cool-down"
    );
    eventually_async(
        "traffic resumes after the cool-down",
        Duration::from_secs(5),
        || async { s.leads(&stages(&set)).await.status == 200 },
    )
    .await;
}

#[tokio::test]
async fn a_small_request_behind_a_wide_one_waits_for_a_few_permits_only() {
    // One serving thread: the order of arrival upstream stands for the order of the grants
    // only when every stream sends on a warm connection. With two, the small request may land
    // on the thread without upstream connections and dial one while the wide one's streams,
    // granted after it, reuse theirs.
    let s = stack_with(sim_config(LEADS), |c| {
        limited(7, Duration::from_millis(300))(c);
        c.worker_threads = Some(1);
    })
    .await;
    let mut wide = largest_stages(&s, 40);
    // Pad with stages that hold no leads (the simulator answers them 204).
    let pipeline = wide[0].0;
    while wide.len() < 40 {
        wide.push((pipeline, 900_000 + wide.len() as i64));
    }
    let small = (pipeline, 777_777);
    let big = {
        let s = &s;
        let q = format!("{}&limit=10", stages(&wide));
        async move { s.leads(&q).await }
    };
    let little = async {
        eventually(
            "the big request's first streams",
            Duration::from_secs(10),
            || s.sim.request_count() >= 7,
        )
        .await;
        s.leads(&stages(&[small, wide[0]])).await
    };
    let (a, b) = tokio::join!(big, little);
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    let log = s.sim.requests();
    let t0 = log[0].at;
    eprintln!(
        "{:?}",
        log.iter()
            .map(|r| ((r.at - t0).as_millis(), r.query.contains("777777")))
            .collect::<Vec<_>>()
    );
    let position = log
        .iter()
        .position(|r| r.query.contains("777777"))
        .expect("the small request reached the upstream");
    assert!(
        position <= 10,
        "the small request's stream was upstream request #{position} of {}",
        log.len()
    );
}

#[tokio::test]
async fn the_request_deadline_answers_504() {
    let s = stack_with(
        SimConfig {
            latency: Duration::from_secs(2),
            ..sim_config(300)
        },
        |c| c.gateway.request_timeout = Duration::from_millis(300),
    )
    .await;
    let a = s.leads(&stages(&[(1, 2), (3, 4)])).await;
    assert_eq!(a.status, 504);
    assert_eq!(a.content_type(), "application/problem+json");
    assert!(a.json()["detail"]
        .as_str()
        .unwrap()
        .contains("--request-timeout"));
}

#[tokio::test]
async fn a_client_that_disconnects_releases_its_queued_streams() {
    let window = Duration::from_millis(400);
    let s = std::sync::Arc::new(stack_with(sim_config(LEADS), limited(7, window)).await);
    let mut set = largest_stages(&s, 20);
    while set.len() < 20 {
        set.push((set[0].0, 800_000 + set.len() as i64));
    }
    let q = stages(&set);
    let task = {
        let s = s.clone();
        tokio::spawn(async move { s.leads(&q).await })
    };
    eventually(
        "the first window's streams",
        Duration::from_secs(10),
        || s.sim.request_count() >= 7,
    )
    .await;
    task.abort();
    let _ = task.await;
    // Two more windows: a request still queued would have sent 7 more per window.
    tokio::time::sleep(window * 2 + Duration::from_millis(100)).await;
    let sent = s.sim.request_count();
    assert!(sent < 14, "{sent} upstream requests after the client left");
}

#[tokio::test]
async fn the_client_quota_answers_429_per_client() {
    let s = stack_with(sim_config(300), |c| {
        c.gateway.client_rate_limit = NonZeroU32::new(2)
    })
    .await;
    let path = "/api/v4/leads/pipelines";
    assert_eq!(s.get(path, TOKEN).await.status, 200);
    assert_eq!(s.get(path, TOKEN).await.status, 200);
    let third = s.get(path, TOKEN).await;
    assert_eq!(third.status, 429);
    assert!(third.headers.contains_key("retry-after"));
    assert_eq!(third.content_type(), "application/problem+json");
    assert_eq!(
        s.get(path, "limited").await.status,
        200,
        "another client has its own quota"
    );
}
