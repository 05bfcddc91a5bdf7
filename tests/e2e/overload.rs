//! Admission control under overload: many clients asking distinct multi-stage views, far more
//! than the account's budget serves. What is admitted completes; the rest is refused at once
//! with a `503` and a `Retry-After`, and the budget is never exceeded.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use kommo_sim::{SimConfig, SimRateLimit};
use tokio::time::Instant;

use crate::support::*;

const LEADS: usize = 3000;
const CLIENTS: usize = 80;
/// How long clients keep sending; the requests admitted by then are waited for.
const RUN: Duration = Duration::from_secs(40);
/// The proxy's `--max-wait` here: what is admitted drains within it after the run.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// Views asked so far (stages sorted, page size): each is asked once, so nothing coalesces.
type Asked = Arc<Mutex<HashSet<(Vec<(i64, i64)>, usize)>>>;

/// What one client saw.
#[derive(Default)]
struct Seen {
    answered: usize,
    /// Time from sending to the refusal's answer, of each refusal.
    refused_after: Vec<Duration>,
    /// Refusals that said the budget is booked (admission), not that a slot never came.
    booked: usize,
    /// Anything else: status and body.
    wrong: Vec<String>,
}

/// A small deterministic generator: distinct views per client, no dependency.
struct Draw(u64);

impl Draw {
    fn next(&mut self, below: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % below as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_overload_admitted_requests_complete_and_the_rest_are_refused_at_once() {
    let sim = SimConfig {
        latency: Duration::from_millis(50),
        rate_limit: Some(SimRateLimit {
            requests: 7,
            window: Duration::from_secs(1),
            block_after: 1000,
            block_for: Duration::from_secs(60),
        }),
        ..sim_config(LEADS)
    };
    // The default limiter (7 per second); the support's unlimited one is for functional tests.
    let s = stack_with(sim, |c| {
        c.limiter.requests = 7;
        c.fetch.max_wait = MAX_WAIT;
    })
    .await;
    let all: Vec<(i64, i64)> = stage_sizes(&s.sim)
        .into_iter()
        .map(|(p, st, _)| (p, st))
        .collect();
    assert!(all.len() >= 12, "{} stages", all.len());
    let leads = s.sim.leads();
    let asked: Asked = Arc::default();
    let started = Instant::now();
    let end = started + RUN;

    // Readiness while loaded: the limiter's backlog and the estimate are reported.
    let readyz = format!("{}/readyz", s.admin);
    let watch = async {
        let client = Client::default();
        let mut most_backlog = 0u64;
        while Instant::now() < end {
            let r = client.get(&readyz, TOKEN).await;
            let v = r.json();
            let limiter = &v["limiter"];
            most_backlog = most_backlog.max(limiter["backlog"].as_u64().expect("backlog"));
            assert!(limiter["estimated_wait_s"].as_f64().is_some(), "{v}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        most_backlog
    };

    let clients = (0..CLIENTS).map(|i| {
        let (s, all, leads, asked) = (&s, &all, &leads, asked.clone());
        async move {
            let client = Client::default();
            let mut draw = Draw(0x9E37_79B9_7F4A_7C15 ^ ((i as u64 + 1) * 0x1000_0001));
            let mut seen = Seen::default();
            while Instant::now() < end {
                // A view nobody asked before: 4 to 8 stages and a page size.
                let (set, limit) = loop {
                    let k = 4 + draw.next(5);
                    let mut set: Vec<(i64, i64)> = Vec::new();
                    while set.len() < k {
                        let pair = all[draw.next(all.len())];
                        if !set.contains(&pair) {
                            set.push(pair);
                        }
                    }
                    let limit = 10 + draw.next(41);
                    let mut key = set.clone();
                    key.sort_unstable();
                    if asked.lock().unwrap().insert((key, limit)) {
                        break (set, limit);
                    }
                };
                let url = format!("{}/api/v4/leads?{}&limit={limit}", s.proxy, stages(&set));
                let sent = Instant::now();
                let a = client.get(&url, TOKEN).await;
                let took = sent.elapsed();
                match a.status.as_u16() {
                    200 => {
                        let want: Vec<i64> = truth(leads, &set, BY_ID, |_| true)
                            .into_iter()
                            .take(limit)
                            .collect();
                        if a.ids() == want {
                            seen.answered += 1;
                        } else {
                            seen.wrong
                                .push(format!("a 200 with other leads than {set:?}"));
                        }
                    }
                    503 => {
                        seen.refused_after.push(took);
                        let retry = a
                            .headers
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok());
                        if a.content_type() != "application/problem+json" || retry.is_none() {
                            seen.wrong.push(format!(
                                "a 503 without problem+json or Retry-After: {:?}",
                                a.headers
                            ));
                        }
                        let detail = a.json()["detail"].as_str().unwrap_or("").to_string();
                        if detail.contains("fully booked") {
                            seen.booked += 1;
                        }
                        // An impatient client: it comes back after the hint or a second,
                        // whichever is sooner.
                        let pause = Duration::from_secs(retry.unwrap_or(1).min(1));
                        tokio::time::sleep(
                            pause.min(end.saturating_duration_since(Instant::now())),
                        )
                        .await;
                    }
                    status => seen
                        .wrong
                        .push(format!("{status}: {}", String::from_utf8_lossy(&a.body))),
                }
            }
            seen
        }
    });
    let (seen, most_backlog) = tokio::join!(join_all(clients), watch);
    let elapsed = started.elapsed();

    let answered: usize = seen.iter().map(|c| c.answered).sum();
    let booked: usize = seen.iter().map(|c| c.booked).sum();
    let mut refused: Vec<Duration> = seen
        .iter()
        .flat_map(|c| c.refused_after.iter().copied())
        .collect();
    refused.sort_unstable();
    let wrong: Vec<&String> = seen.iter().flat_map(|c| &c.wrong).collect();
    let fast = refused
        .iter()
        .filter(|d| **d <= Duration::from_secs(2))
        .count();
    let at = |q: f64| {
        refused
            .get(((refused.len() as f64 * q) as usize).min(refused.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    // At 7 requests per second and one upstream page per stage, a 4-to-8-stage view (6 on
    // average) costs 6 of the budget.
    let servable = 7.0 * elapsed.as_secs_f64() / 6.0;
    let log = s.sim.requests();
    let too_many = log.iter().filter(|r| r.status == 429).count();
    let metrics = s
        .request(http::Method::GET, &format!("{}/metrics", s.admin), None, "")
        .await;
    let metrics = String::from_utf8_lossy(&metrics.body).to_string();
    let refused_total = sample(&metrics, "kommo_fanout_admission_refused_total");
    eprintln!(
        "overload: {CLIENTS} clients for {RUN:?}, done after {elapsed:.1?}: {answered} answered \
         (the budget serves about {servable:.0}), {} refused ({booked} as booked, {fast} within 2 s; \
         median {:?}, p90 {:?}, p99 {:?}, slowest {:?}), {} upstream requests, {too_many} answered 429, \
         largest backlog seen by /readyz {most_backlog}",
        refused.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        refused.last().copied().unwrap_or_default(),
        log.len(),
    );
    assert!(
        wrong.is_empty(),
        "{} wrong answers: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(too_many, 0, "the simulator never had to refuse");
    assert!(
        answered as f64 >= servable / 2.0,
        "{answered} answered, the budget serves about {servable:.0}"
    );
    assert!(
        !refused.is_empty(),
        "the load is about ten times the budget"
    );
    assert!(
        fast * 10 >= refused.len() * 9,
        "{fast} of {} refusals within 2 s",
        refused.len()
    );
    assert!(most_backlog > 0, "readiness reports the backlog");
    assert_eq!(refused_total as usize, booked, "{metrics}");
}
