//! The figures of `/status.json`: the budget, the work, the cache, the live views, the
//! accounts and keys, and the history. Read from the sampler's scrapes and the gateway; no
//! token, key, fingerprint or anything derived from one is ever put in.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::exposition::{bucket_delta, quantile, Scrape};
use super::history::{self, History};
use super::{ConsoleSettings, LimiterNow};
use crate::accounts::Accounts;
use crate::gateway::Gateway;

/// What [`build`] reads, copied out under the console's lock.
pub struct View<'a> {
    pub settings: &'a ConsoleSettings,
    pub uptime: Duration,
    pub history: &'a History,
    /// The last minute of scrapes, oldest first.
    pub scrapes: &'a VecDeque<(Instant, Arc<Scrape>)>,
    pub limiter: LimiterNow,
}

const FANOUT_WIDTH: &str = "kommo_fanout_fanout_width";
const UPSTREAM_LATENCY: &str = "kommo_fanout_upstream_latency_seconds";
const LIMITER_WAIT: &str = "kommo_fanout_limiter_wait_seconds";
const LIMITER_WAIT_MAX: &str = "kommo_fanout_limiter_wait_max_seconds";
const BACKLOG: &str = "kommo_fanout_admission_backlog";
const ESTIMATED_WAIT: &str = "kommo_fanout_admission_estimated_wait_seconds";
const RETRIES: &str = "kommo_fanout_upstream_retries_total";
const CACHE_BYTES: &str = "kommo_fanout_cache_bytes";
const EVICTIONS: &str = "kommo_fanout_cache_evictions_total";
const IN_FLIGHT: &str = "kommo_fanout_in_flight_requests";
const OPEN_CONNECTIONS: &str = "kommo_fanout_open_connections";

/// Every Prometheus metric the console reads: the Grafana dashboard graphs the same ones.
pub const METRICS: [&str; 19] = [
    history::UPSTREAM_REQUESTS,
    history::SLOTS_TAKEN,
    history::QUEUED,
    history::UPSTREAM_429,
    history::BLOCKS,
    history::REFUSED,
    history::CLIENT_REQUESTS,
    history::CACHE_LOOKUPS,
    FANOUT_WIDTH,
    UPSTREAM_LATENCY,
    LIMITER_WAIT,
    LIMITER_WAIT_MAX,
    BACKLOG,
    ESTIMATED_WAIT,
    RETRIES,
    CACHE_BYTES,
    EVICTIONS,
    IN_FLIGHT,
    OPEN_CONNECTIONS,
];

/// Rounds to milliseconds (or thousandths), so the page and the JSON print the same digits.
fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `x` as a JSON number rounded to thousandths, `null` when not finite.
fn num(x: f64) -> Value {
    if x.is_finite() {
        json!(r3(x))
    } else {
        Value::Null
    }
}

pub fn build(view: &View<'_>, all: &Accounts) -> Value {
    let gw = all.front();
    let empty = Arc::new(Scrape::default());
    let (now_at, now) = view
        .scrapes
        .back()
        .map_or((Instant::now(), empty.clone()), |(t, s)| (*t, s.clone()));
    let (then_at, then) = view
        .scrapes
        .front()
        .map_or((now_at, empty), |(t, s)| (*t, s.clone()));
    let span = now_at.saturating_duration_since(then_at).as_secs_f64();
    let per_s = |moved: f64| {
        if span > 0.0 {
            num(moved / span)
        } else {
            Value::Null
        }
    };
    let moved = |name: &str| now.sum(name) - then.sum(name);
    let last = view.history.last().copied().unwrap_or_default();
    let s = view.settings;

    let waits = bucket_delta(&then.buckets(LIMITER_WAIT), &now.buckets(LIMITER_WAIT));
    let latency = bucket_delta(
        &then.buckets(UPSTREAM_LATENCY),
        &now.buckets(UPSTREAM_LATENCY),
    );
    let budget = json!({
        "at": last.at,
        "limit": s.limit,
        "window_s": num(s.window.as_secs_f64()),
        "slots_taken": last.slots_taken,
        "sent_last_s": last.sent,
        "queued": last.queued,
        "longest_wait_last_min_s": num(now.sum(LIMITER_WAIT_MAX)),
        "median_wait_last_min_s": quantile(&waits, 0.5).map(num),
        "upstream_429_total": now.sum(history::UPSTREAM_429),
        "blocks_total": now.sum(history::BLOCKS),
        "block_cooldown_remaining_s": view.limiter.block_cooldown_remaining_s,
        "paused_for_429": view.limiter.paused_for_429,
        "waiting_for_previous_process": view.limiter.waiting_for_previous_process,
        "admission_backlog": now.sum(BACKLOG),
        "admission_estimated_wait_s": num(now.sum(ESTIMATED_WAIT)),
        "admission_refused_total": now.sum(history::REFUSED),
    });

    let mut routes = BTreeMap::new();
    for series in now.named(history::CLIENT_REQUESTS) {
        let key = (
            series.label("route").unwrap_or("").to_string(),
            series.label("status").unwrap_or("").to_string(),
        );
        let was = then.sum_where(history::CLIENT_REQUESTS, |x| x.labels == series.labels);
        routes.insert(key, (series.value, series.value - was));
    }
    let routes: Vec<Value> = routes
        .into_iter()
        .map(|((route, status), (total, moved))| {
            json!({"route": route, "status": status, "total": total, "per_s": per_s(moved)})
        })
        .collect();
    let mut upstream = BTreeMap::new();
    for series in now.named(history::UPSTREAM_REQUESTS) {
        let key = (
            series.label("kind").unwrap_or("").to_string(),
            series.label("status").unwrap_or("").to_string(),
        );
        *upstream.entry(key).or_insert(0.0) += series.value;
    }
    let upstream: Vec<Value> = upstream
        .into_iter()
        .map(|((kind, status), total)| json!({"kind": kind, "status": status, "total": total}))
        .collect();
    let ratio = |a: f64, b: f64| if b > 0.0 { num(a / b) } else { Value::Null };
    let (client_total, upstream_total) = (
        now.sum(history::CLIENT_REQUESTS),
        now.sum(history::UPSTREAM_REQUESTS),
    );
    let work = json!({
        "client_requests_total": client_total,
        "client_requests_per_s": per_s(moved(history::CLIENT_REQUESTS)),
        "routes": routes,
        "upstream_requests_total": upstream_total,
        "upstream_requests_per_s": per_s(moved(history::UPSTREAM_REQUESTS)),
        "upstream": upstream,
        "upstream_per_client_request": ratio(upstream_total, client_total),
        "upstream_per_client_request_last_min": ratio(moved(history::UPSTREAM_REQUESTS), moved(history::CLIENT_REQUESTS)),
        "fanout_requests_total": now.sum(&format!("{FANOUT_WIDTH}_count")),
        "fanout_width_avg": ratio(now.sum(&format!("{FANOUT_WIDTH}_sum")), now.sum(&format!("{FANOUT_WIDTH}_count"))),
        "upstream_latency_p50_last_min_s": quantile(&latency, 0.5).map(num),
        "upstream_latency_p99_last_min_s": quantile(&latency, 0.99).map(num),
        "retries_total": now.sum(RETRIES),
        "in_flight": now.sum(IN_FLIGHT),
        "open_connections": now.sum(OPEN_CONNECTIONS),
    });

    let outcome = |level: Option<&str>, o: &str| {
        now.sum_where(history::CACHE_LOOKUPS, |x| {
            x.label("outcome") == Some(o) && level.is_none_or(|l| x.label("level") == Some(l))
        })
    };
    let levels: Vec<Value> = ["answer", "page", "shared"]
        .into_iter()
        .map(|level| {
            json!({
                "level": level,
                "hit": outcome(Some(level), "hit"),
                "miss": outcome(Some(level), "miss"),
                "coalesced": outcome(Some(level), "coalesced"),
            })
        })
        .collect();
    let cache = json!({
        "enabled": gw.cache.is_some(),
        "hits": outcome(None, "hit"),
        "misses": outcome(None, "miss"),
        "coalesced": outcome(None, "coalesced"),
        "levels": levels,
        "bytes": now.sum(CACHE_BYTES),
        "max_bytes": s.cache_max_bytes,
        "evictions_total": now.sum(EVICTIONS),
    });

    json!({
        "uptime_s": view.uptime.as_secs(),
        "upstream": gw.fetcher.upstream.origin().url,
        "budget": budget,
        "work": work,
        "cache": cache,
        "live": live(gw),
        "accounts": accounts(all),
        "keys": keys(gw),
        "history": view.history.columns(),
    })
}

/// Live views, each replica by its place in the list: a replica's own name is a prefix of a
/// credential's fingerprint, which the console does not show.
fn live(gw: &Gateway) -> Value {
    let Some(live) = &gw.live else {
        return Value::Null;
    };
    let report = live.report();
    let replicas: Vec<Value> = report["replicas"]
        .as_array()
        .map(|all| {
            all.iter()
                .enumerate()
                .map(|(i, r)| {
                    json!({
                        "replica": i + 1,
                        "state": r["state"],
                        "leads": r["leads"],
                        "bytes": r["bytes"],
                        "seconds_since_delta": r["seconds_since_delta"],
                        "upstream_requests": r["upstream_requests"],
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "interval_s": report["interval_s"],
        "max_staleness_s": report["max_staleness_s"],
        "replicas": replicas,
    })
}

/// Each account (or the one the proxy holds the credential of), with its budget use now and
/// the state of its token (`ok`, `refused` or `none`; never the token itself).
fn accounts(all: &Accounts) -> Value {
    let rows: Vec<Value> = all
        .iter()
        .filter_map(|a| {
            let gw = &a.gateway;
            let name = match &gw.auth {
                _ if all.is_named() => a.name.clone(),
                Some(auth) => auth.account.clone(),
                None => return None,
            };
            let budget = gw
                .fetcher
                .limiter
                .snapshot(&gw.fetcher.upstream.origin().url);
            let token = match gw.fetcher.credentials.as_ref().map(|c| c.refused()) {
                Some(Some(_)) => "refused",
                Some(None) => "ok",
                None => "none",
            };
            Some(json!({
                "account": name,
                "slots_taken": budget.in_window,
                "limit": gw.fetcher.admission.slots(),
                "queued": budget.queued,
                "blocked": budget.blocked_until.is_some(),
                "token": token,
            }))
        })
        .collect();
    if rows.is_empty() {
        Value::Null
    } else {
        Value::Array(rows)
    }
}

/// The keys' names, accounts, scopes and last use; never a key or its hash.
fn keys(gw: &Gateway) -> Value {
    let Some(auth) = &gw.auth else {
        return Value::Null;
    };
    let keys = auth.keys.current();
    let list: Vec<Value> = keys
        .entries()
        .iter()
        .map(|k| {
            json!({
                "name": k.name,
                "account": k.account,
                "scope": k.scope.as_str(),
                "last_used": auth.keys.last_used(&k.name),
            })
        })
        .collect();
    Value::Array(list)
}
