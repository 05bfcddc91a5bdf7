//! Prometheus metrics, served by the admin listener at `GET /metrics`.
//!
//! Labels are fixed, low-cardinality words (route, kind, status, outcome): no token, no
//! fingerprint, no path or query ever becomes a label.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The kind of an upstream request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamKind {
    /// One page of one stage of a fan-out.
    Stream,
    /// A zero- or one-stage leads request, relayed.
    Single,
    /// Any other path.
    Passthrough,
    /// A live view's load, delta or reconcile read (background priority).
    Sync,
}

impl UpstreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::Stream => "stream",
            UpstreamKind::Single => "single",
            UpstreamKind::Passthrough => "passthrough",
            UpstreamKind::Sync => "sync",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub kind: &'static str,
    /// The HTTP status, or 0 when no answer came (connect error, timeout).
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CacheLabels {
    /// `page`, `answer`, or `shared` (the Redis cache).
    pub level: &'static str,
    /// `hit`, `miss`, or `coalesced` (waited for another request's fill).
    pub outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabels {
    /// `loading`, `live` or `stale`.
    pub state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// Declares [`Metrics`] from one table: each metric once, with its type, how it is made, its
/// name, unit and help.
macro_rules! metrics {
    ($($(#[doc = $doc:literal])* $field:ident: $ty:ty = $init:expr, $name:literal, $unit:expr, $help:literal;)*) => {
        /// Every metric the proxy keeps.
        pub struct Metrics {
            registry: Registry,
            $($(#[doc = $doc])* pub $field: $ty,)*
        }

        impl Metrics {
            /// The metrics of the one account of single-account mode: no `account` label.
            pub fn new() -> Metrics {
                Metrics::in_registry(Registry::with_prefix("kommo_fanout"))
            }

            /// The metrics of the configured account `name`: every series carries
            /// `account="name"` (see [`merge_expositions`]).
            pub fn for_account(name: &str) -> Metrics {
                let label = (Cow::Borrowed("account"), Cow::Owned(name.to_string()));
                Metrics::in_registry(Registry::with_prefix_and_labels("kommo_fanout", std::iter::once(label)))
            }

            fn in_registry(mut registry: Registry) -> Metrics {
                $(let $field: $ty = $init;
                register(&mut registry, $name, $help, $unit, $field.clone());)*
                Metrics { registry, $($field,)* }
            }
        }
    };
}

metrics! {
    client_requests: Family<RouteLabels, Counter> = Family::default(), "client_requests", None,
        "Client requests answered, by route (leads, passthrough) and status";
    in_flight: Gauge = Gauge::default(), "in_flight_requests", None,
        "Client requests being served";
    /// Client connections of the proxy listener open now (at most `--max-connections`).
    open_connections: Gauge = Gauge::default(), "open_connections", None,
        "Client connections open on the proxy listener";
    upstream_requests: Family<UpstreamLabels, Counter> = Family::default(), "upstream_requests", None,
        "Upstream requests sent, by kind (stream, single, passthrough, sync) and status (0: no answer)";
    upstream_seconds: Family<KindLabels, Histogram> = Family::new_with_constructor(latency_histogram), "upstream_latency", Some(Unit::Seconds),
        "Time to a complete upstream answer, by kind";
    fanout_width: Histogram = Histogram::new([1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0]), "fanout_width", None,
        "Distinct stages per fanned-out leads request";
    limiter_wait_seconds: Histogram = latency_histogram(), "limiter_wait", Some(Unit::Seconds),
        "Time an upstream request waited for a rate-limit slot";
    limiter_wait_max: Gauge<f64, AtomicU64> = Gauge::default(), "limiter_wait_max", Some(Unit::Seconds),
        "The longest an upstream request waited for a rate-limit slot within the last minute";
    limiter_queued: Gauge = Gauge::default(), "limiter_queued", None,
        "Upstream requests waiting for a slot";
    limiter_in_window: Gauge = Gauge::default(), "limiter_slots_taken", None,
        "Rate-limit slots taken (in flight, or freed less than a window ago)";
    rate_limited: Counter = Counter::default(), "upstream_429", None,
        "429 answers from the upstream";
    blocks: Counter = Counter::default(), "upstream_blocks", None,
        "403 answers taken as a block of this address";
    retries: Family<KindLabels, Counter> = Family::default(), "upstream_retries", None,
        "Upstream attempts retried, by kind";
    cache_lookups: Family<CacheLabels, Counter> = Family::default(), "cache_lookups", None,
        "Cache lookups by level (page, answer, shared: the Redis cache) and outcome (hit, miss, coalesced)";
    cache_evictions: Counter = Counter::default(), "cache_evictions", None,
        "Entries evicted for size";
    cache_bytes: Gauge<u64, AtomicU64> = Gauge::default(), "cache", Some(Unit::Bytes),
        "Bytes held by the cache";
    redis_degraded: Gauge = Gauge::default(), "redis_degraded", None,
        "1 while Redis is configured but unreachable (local fallback in use)";
    /// Upstream calls booked by admitted requests and not yet granted (or queued, if more).
    admission_backlog: Gauge = Gauge::default(), "admission_backlog", None,
        "Upstream calls booked by admitted client requests and not yet sent";
    /// When the budget could start a new request's first call.
    admission_estimated_wait: Gauge<f64, AtomicU64> = Gauge::default(), "admission_estimated_wait", Some(Unit::Seconds),
        "Estimated time until the upstream budget could start a new request";
    /// Client requests refused at once because the budget is booked past their deadline.
    admission_refused: Counter = Counter::default(), "admission_refused", None,
        "Client requests refused at once: the upstream budget is booked past their deadline";
    /// Live-view replicas by state.
    sync_replicas: Family<StateLabels, Gauge> = Family::default(), "sync_replicas", None,
        "Live-view replicas by state (loading, live, stale)";
    /// Leads held by all replicas.
    sync_leads: Gauge = Gauge::default(), "sync_leads", None,
        "Leads held by the live-view replicas";
    /// Bytes held by all replicas (at most `--sync-max-bytes`).
    sync_bytes: Gauge<u64, AtomicU64> = Gauge::default(), "sync", Some(Unit::Bytes),
        "Bytes held by the live-view replicas";
    /// Deltas applied (`ok`) or failed (`failed`).
    sync_deltas: Family<OutcomeLabels, Counter> = Family::default(), "sync_deltas", None,
        "Live-view deltas by outcome (ok, failed)";
    /// Leads the reconcile found wrong in a replica and repaired: the feed missed a change.
    sync_repairs: Counter = Counter::default(), "sync_reconcile_repairs", None,
        "Leads a reconcile found wrong in a replica and repaired (the change feed missed them)";
    /// Client answers served from a replica.
    sync_answers: Counter = Counter::default(), "sync_answers", None,
        "Client answers served from a live-view replica";
    /// Replicas dropped, by reason (`unauthorized`, `memory`, `idle`).
    sync_dropped: Family<OutcomeLabels, Counter> = Family::default(), "sync_dropped", None,
        "Live-view replicas dropped, by reason (unauthorized, memory, idle)";
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Registers `metric` under `name` (and `unit`, if any) and hands it back.
fn register<M>(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, metric.clone()),
        None => registry.register(name, help, metric.clone()),
    }
    metric
}

impl Metrics {
    /// Records a client request answered on `route` with `status`.
    pub fn answered(&self, route: &'static str, status: u16) {
        self.client_requests
            .get_or_create(&RouteLabels { route, status })
            .inc();
    }

    /// Records one upstream attempt.
    pub fn upstream(&self, kind: UpstreamKind, status: u16, took: Duration) {
        let kind = kind.as_str();
        self.upstream_requests
            .get_or_create(&UpstreamLabels { kind, status })
            .inc();
        self.upstream_seconds
            .get_or_create(&KindLabels { kind })
            .observe(took.as_secs_f64());
    }

    /// Records a cache lookup.
    pub fn cache(&self, level: &'static str, outcome: &'static str) {
        self.cache_lookups
            .get_or_create(&CacheLabels { level, outcome })
            .inc();
    }

    /// The text exposition (Prometheus / OpenMetrics text format).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// One exposition of several accounts' (see [`Metrics::for_account`]): each family once, its
/// samples of every account together under one `HELP`/`TYPE`, as OpenMetrics requires.
pub fn merge_expositions(texts: &[String]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut families: HashMap<&str, (Vec<&str>, Vec<&str>)> = HashMap::new();
    for text in texts {
        let mut current = "";
        for line in text.lines().filter(|l| *l != "# EOF") {
            let family = match line.strip_prefix("# ") {
                // `# HELP name ...`, `# TYPE name ...`, `# UNIT name ...`
                Some(rest) => rest.split(' ').nth(1).unwrap_or(""),
                None => current,
            };
            current = family;
            let (head, samples) = families.entry(family).or_insert_with(|| {
                order.push(family);
                Default::default()
            });
            if !line.starts_with("# ") {
                samples.push(line);
            } else if !head.contains(&line) {
                head.push(line);
            }
        }
    }
    let mut out = String::new();
    for family in order {
        let (head, samples) = &families[family];
        for line in head.iter().chain(samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("# EOF\n");
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The largest duration recorded within the last minute, kept per second: one slot for each
/// of the last 60 seconds, each packing its second (high 32 bits) and its largest value in
/// milliseconds (low 32 bits) into one atomic.
#[derive(Debug)]
pub struct RecentMax {
    start: std::time::Instant,
    slots: [AtomicU64; 60],
}

impl Default for RecentMax {
    fn default() -> Self {
        RecentMax {
            start: std::time::Instant::now(),
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl RecentMax {
    /// Records `value` now.
    pub fn record(&self, value: std::time::Duration) {
        self.record_at(self.start.elapsed().as_secs(), value);
    }

    /// The largest value of the last 60 seconds.
    pub fn max(&self) -> std::time::Duration {
        self.max_at(self.start.elapsed().as_secs())
    }

    fn record_at(&self, second: u64, value: std::time::Duration) {
        let ms = u64::try_from(value.as_millis())
            .unwrap_or(u64::MAX)
            .min(u64::from(u32::MAX));
        // Second 0 is stored as 1, so an untouched slot (0) is never taken for second 0.
        let tag = (second + 1) << 32;
        let slot = &self.slots[(second % 60) as usize];
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            let kept = if old >> 32 == second + 1 {
                old & 0xffff_ffff
            } else {
                0
            };
            (ms > kept || old >> 32 != second + 1).then_some(tag | ms.max(kept))
        });
    }

    fn max_at(&self, second: u64) -> std::time::Duration {
        let ms = self
            .slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|v| v >> 32 != 0 && (second + 1).saturating_sub(v >> 32) < 60)
            .map(|v| v & 0xffff_ffff)
            .max()
            .unwrap_or(0);
        std::time::Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recent_max_covers_the_last_sixty_seconds() {
        let ms = std::time::Duration::from_millis;
        let m = RecentMax::default();
        assert_eq!(m.max_at(0), ms(0));
        m.record_at(0, ms(300));
        m.record_at(0, ms(100));
        m.record_at(5, ms(200));
        assert_eq!(m.max_at(5), ms(300));
        assert_eq!(m.max_at(59), ms(300));
        assert_eq!(m.max_at(60), ms(200), "second 0 has left the minute");
        m.record_at(65, ms(50));
        assert_eq!(m.max_at(65), ms(50), "second 5's slot now holds second 65");
        assert_eq!(m.max_at(200), ms(0));
    }

    #[test]
    fn exposition_has_the_families_and_moves() {
        let m = Metrics::new();
        m.upstream(UpstreamKind::Stream, 200, Duration::from_millis(5));
        m.cache("page", "hit");
        let text = m.encode();
        assert!(
            text.contains("kommo_fanout_upstream_requests_total{kind=\"stream\",status=\"200\"} 1"),
            "{text}"
        );
        assert!(text.contains("kommo_fanout_cache_lookups_total{level=\"page\",outcome=\"hit\"} 1"));
        assert!(text.contains("# TYPE kommo_fanout_upstream_latency_seconds histogram"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn accounts_merge_into_one_family_each_with_their_label() {
        let (a, b) = (Metrics::for_account("acme"), Metrics::for_account("beta"));
        a.answered("leads", 200);
        b.answered("leads", 200);
        b.answered("leads", 200);
        let text = merge_expositions(&[a.encode(), b.encode()]);
        let lines: Vec<&str> = text.lines().collect();
        let help = "# HELP kommo_fanout_client_requests";
        assert_eq!(lines.iter().filter(|l| l.starts_with(help)).count(), 1);
        let at = |needle: &str| lines.iter().position(|l| *l == needle).expect(needle);
        let (first, second) = (
            at("kommo_fanout_client_requests_total{account=\"acme\",route=\"leads\",status=\"200\"} 1"),
            at("kommo_fanout_client_requests_total{account=\"beta\",route=\"leads\",status=\"200\"} 2"),
        );
        assert_eq!(second, first + 1, "{text}");
        assert_eq!(lines.iter().filter(|l| **l == "# EOF").count(), 1);
        assert!(text.ends_with("# EOF\n"));
    }

    /// Each label set counts into its own series, which appears only once used.
    #[test]
    fn series_count_by_label_and_appear_once_used() {
        let m = Metrics::new();
        for _ in 0..3 {
            m.answered("leads", 200);
        }
        m.answered("leads", 404);
        m.upstream(UpstreamKind::Passthrough, 200, Duration::from_millis(1));
        m.upstream(UpstreamKind::Passthrough, 200, Duration::from_millis(1));
        m.upstream(UpstreamKind::Passthrough, 502, Duration::from_millis(1));
        m.cache("answer", "hit");
        m.cache("answer", "hit");
        m.cache("answer", "miss");
        m.cache("elsewhere", "hit");
        let text = m.encode();
        for line in [
            "kommo_fanout_client_requests_total{route=\"leads\",status=\"200\"} 3",
            "kommo_fanout_client_requests_total{route=\"leads\",status=\"404\"} 1",
            "kommo_fanout_upstream_requests_total{kind=\"passthrough\",status=\"200\"} 2",
            "kommo_fanout_upstream_requests_total{kind=\"passthrough\",status=\"502\"} 1",
            "kommo_fanout_upstream_latency_seconds_count{kind=\"passthrough\"} 3",
            "kommo_fanout_cache_lookups_total{level=\"answer\",outcome=\"hit\"} 2",
            "kommo_fanout_cache_lookups_total{level=\"answer\",outcome=\"miss\"} 1",
            "kommo_fanout_cache_lookups_total{level=\"elsewhere\",outcome=\"hit\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("route=\"passthrough\""), "unused: not shown");
        assert!(!text.contains("kind=\"stream\""), "unused: not shown");
    }
}
