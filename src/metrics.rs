//! Prometheus metrics, served by the admin listener at `GET /metrics`.
//!
//! Labels are fixed, low-cardinality words (route, kind, status, outcome): no token, no
//! fingerprint, no path or query ever becomes a label.

use std::sync::atomic::AtomicU64;
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

/// Every metric the proxy keeps.
pub struct Metrics {
    registry: Registry,
    pub client_requests: Family<RouteLabels, Counter>,
    pub in_flight: Gauge,
    /// Client connections of the proxy listener open now (at most `--max-connections`).
    pub open_connections: Gauge,
    pub upstream_requests: Family<UpstreamLabels, Counter>,
    pub upstream_seconds: Family<KindLabels, Histogram>,
    pub fanout_width: Histogram,
    pub limiter_wait_seconds: Histogram,
    pub limiter_queued: Gauge,
    pub limiter_in_window: Gauge,
    pub rate_limited: Counter,
    pub blocks: Counter,
    pub retries: Family<KindLabels, Counter>,
    pub cache_lookups: Family<CacheLabels, Counter>,
    pub cache_evictions: Counter,
    pub cache_bytes: Gauge<u64, AtomicU64>,
    pub redis_degraded: Gauge,
    /// Upstream calls booked by admitted requests and not yet granted (or queued, if more).
    pub admission_backlog: Gauge,
    /// When the budget could start a new request's first call.
    pub admission_estimated_wait: Gauge<f64, AtomicU64>,
    /// Client requests refused at once because the budget is booked past their deadline.
    pub admission_refused: Counter,
    /// Live-view replicas by state.
    pub sync_replicas: Family<StateLabels, Gauge>,
    /// Leads held by all replicas.
    pub sync_leads: Gauge,
    /// Bytes held by all replicas (at most `--sync-max-bytes`).
    pub sync_bytes: Gauge<u64, AtomicU64>,
    /// Deltas applied (`ok`) or failed (`failed`).
    pub sync_deltas: Family<OutcomeLabels, Counter>,
    /// Leads the reconcile found wrong in a replica and repaired: the feed missed a change.
    pub sync_repairs: Counter,
    /// Client answers served from a replica.
    pub sync_answers: Counter,
    /// Replicas dropped, by reason (`unauthorized`, `memory`, `idle`).
    pub sync_dropped: Family<OutcomeLabels, Counter>,
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
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kommo_fanout");
        let r = &mut registry;
        let seconds = Some(Unit::Seconds);
        let client_requests = register(
            r,
            "client_requests",
            "Client requests answered, by route (leads, passthrough) and status",
            None,
            Family::default(),
        );
        let in_flight = register(
            r,
            "in_flight_requests",
            "Client requests being served",
            None,
            Gauge::default(),
        );
        let open_connections = register(
            r,
            "open_connections",
            "Client connections open on the proxy listener",
            None,
            Gauge::default(),
        );
        let upstream_requests = register(
            r,
            "upstream_requests",
            "Upstream requests sent, by kind (stream, single, passthrough) and status \
             (0: no answer)",
            None,
            Family::default(),
        );
        let upstream_seconds: Family<KindLabels, Histogram> = register(
            r,
            "upstream_latency",
            "Time to a complete upstream answer, by kind",
            seconds.clone(),
            Family::new_with_constructor(latency_histogram),
        );
        let fanout_width = register(
            r,
            "fanout_width",
            "Distinct stages per fanned-out leads request",
            None,
            Histogram::new([1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0]),
        );
        let limiter_wait_seconds = register(
            r,
            "limiter_wait",
            "Time an upstream request waited for a rate-limit slot",
            seconds.clone(),
            latency_histogram(),
        );
        let limiter_queued = register(
            r,
            "limiter_queued",
            "Upstream requests waiting for a slot",
            None,
            Gauge::default(),
        );
        let limiter_in_window = register(
            r,
            "limiter_slots_taken",
            "Rate-limit slots taken (in flight, or freed less than a window ago)",
            None,
            Gauge::default(),
        );
        let rate_limited = register(
            r,
            "upstream_429",
            "429 answers from the upstream",
            None,
            Counter::default(),
        );
        let blocks = register(
            r,
            "upstream_blocks",
            "403 answers taken as a block of this address",
            None,
            Counter::default(),
        );
        let retries = register(
            r,
            "upstream_retries",
            "Upstream attempts retried, by kind",
            None,
            Family::default(),
        );
        let cache_lookups = register(
            r,
            "cache_lookups",
            "Cache lookups by level (page, answer, shared: the Redis cache) and outcome \
             (hit, miss, coalesced)",
            None,
            Family::default(),
        );
        let cache_evictions = register(
            r,
            "cache_evictions",
            "Entries evicted for size",
            None,
            Counter::default(),
        );
        let cache_bytes = register(
            r,
            "cache",
            "Bytes held by the cache",
            Some(Unit::Bytes),
            Gauge::default(),
        );
        let redis_degraded = register(
            r,
            "redis_degraded",
            "1 while Redis is configured but unreachable (local fallback in use)",
            None,
            Gauge::default(),
        );
        let admission_backlog = register(
            r,
            "admission_backlog",
            "Upstream calls booked by admitted client requests and not yet sent",
            None,
            Gauge::default(),
        );
        let admission_estimated_wait = register(
            r,
            "admission_estimated_wait",
            "Estimated time until the upstream budget could start a new request",
            seconds,
            Gauge::default(),
        );
        let admission_refused = register(
            r,
            "admission_refused",
            "Client requests refused at once: the upstream budget is booked past their deadline",
            None,
            Counter::default(),
        );
        let sync_replicas = register(
            r,
            "sync_replicas",
            "Live-view replicas by state (loading, live, stale)",
            None,
            Family::default(),
        );
        let sync_leads = register(
            r,
            "sync_leads",
            "Leads held by the live-view replicas",
            None,
            Gauge::default(),
        );
        let sync_bytes = register(
            r,
            "sync",
            "Bytes held by the live-view replicas",
            Some(Unit::Bytes),
            Gauge::default(),
        );
        let sync_deltas = register(
            r,
            "sync_deltas",
            "Live-view deltas by outcome (ok, failed)",
            None,
            Family::default(),
        );
        let sync_repairs = register(
            r,
            "sync_reconcile_repairs",
            "Leads a reconcile found wrong in a replica and repaired (the change feed missed them)",
            None,
            Counter::default(),
        );
        let sync_answers = register(
            r,
            "sync_answers",
            "Client answers served from a live-view replica",
            None,
            Counter::default(),
        );
        let sync_dropped = register(
            r,
            "sync_dropped",
            "Live-view replicas dropped, by reason (unauthorized, memory, idle)",
            None,
            Family::default(),
        );
        Metrics {
            registry,
            sync_replicas,
            sync_leads,
            sync_bytes,
            sync_deltas,
            sync_repairs,
            sync_answers,
            sync_dropped,
            client_requests,
            in_flight,
            open_connections,
            upstream_requests,
            upstream_seconds,
            fanout_width,
            limiter_wait_seconds,
            limiter_queued,
            limiter_in_window,
            rate_limited,
            blocks,
            retries,
            cache_lookups,
            cache_evictions,
            cache_bytes,
            redis_degraded,
            admission_backlog,
            admission_estimated_wait,
            admission_refused,
        }
    }

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

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
