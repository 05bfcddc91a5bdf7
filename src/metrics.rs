//! Prometheus metrics, served by the admin listener at `GET /metrics`.
//!
//! Labels are fixed, low-cardinality words (route, kind, status, outcome): no token, no
//! fingerprint, no path or query ever becomes a label.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
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
}

impl UpstreamKind {
    /// Its place in per-kind tables.
    fn index(self) -> usize {
        match self {
            UpstreamKind::Stream => 0,
            UpstreamKind::Single => 1,
            UpstreamKind::Passthrough => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::Stream => "stream",
            UpstreamKind::Single => "single",
            UpstreamKind::Passthrough => "passthrough",
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
    hot: Hot,
}

/// Handles of the series nearly every request touches, taken from their family on first use:
/// a family lookup hashes the labels (SipHash) under a lock, twice or three times per request;
/// a handle is an increment. A series appears in the exposition on its first use either way.
#[derive(Default)]
struct Hot {
    /// `client_requests{route, status="200"}`: leads, passthrough.
    answered_ok: [OnceLock<Counter>; 2],
    /// `upstream_requests{kind, status="200"}`, by [`UpstreamKind::index`].
    upstream_ok: [OnceLock<Counter>; 3],
    /// `upstream_latency_seconds{kind}`, by [`UpstreamKind::index`].
    upstream_seconds: [OnceLock<Histogram>; 3],
    /// `cache_lookups{level, outcome}`: (page, answer, shared) × (hit, miss, coalesced).
    cache: [OnceLock<Counter>; 9],
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kommo_fanout");
        let client_requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "client_requests",
            "Client requests answered, by route (leads, passthrough) and status",
            client_requests.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_requests",
            "Client requests being served",
            in_flight.clone(),
        );
        let open_connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open on the proxy listener",
            open_connections.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Upstream requests sent, by kind (stream, single, passthrough) and status (0: no answer)",
            upstream_requests.clone(),
        );
        let upstream_seconds =
            Family::<KindLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "upstream_latency",
            "Time to a complete upstream answer, by kind",
            Unit::Seconds,
            upstream_seconds.clone(),
        );
        let fanout_width =
            Histogram::new([1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0]);
        registry.register(
            "fanout_width",
            "Distinct stages per fanned-out leads request",
            fanout_width.clone(),
        );
        let limiter_wait_seconds = latency_histogram();
        registry.register_with_unit(
            "limiter_wait",
            "Time an upstream request waited for a rate-limit slot",
            Unit::Seconds,
            limiter_wait_seconds.clone(),
        );
        let limiter_queued = Gauge::default();
        registry.register(
            "limiter_queued",
            "Upstream requests waiting for a slot",
            limiter_queued.clone(),
        );
        let limiter_in_window = Gauge::default();
        registry.register(
            "limiter_slots_taken",
            "Rate-limit slots taken (in flight, or freed less than a window ago)",
            limiter_in_window.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "upstream_429",
            "429 answers from the upstream",
            rate_limited.clone(),
        );
        let blocks = Counter::default();
        registry.register(
            "upstream_blocks",
            "403 answers taken as a block of this address",
            blocks.clone(),
        );
        let retries = Family::<KindLabels, Counter>::default();
        registry.register(
            "upstream_retries",
            "Upstream attempts retried, by kind",
            retries.clone(),
        );
        let cache_lookups = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Cache lookups by level (page, answer, shared: the Redis cache) and outcome (hit, miss, coalesced)",
            cache_lookups.clone(),
        );
        let cache_evictions = Counter::default();
        registry.register(
            "cache_evictions",
            "Entries evicted for size",
            cache_evictions.clone(),
        );
        let cache_bytes = Gauge::<u64, AtomicU64>::default();
        registry.register_with_unit(
            "cache",
            "Bytes held by the cache",
            Unit::Bytes,
            cache_bytes.clone(),
        );
        let redis_degraded = Gauge::default();
        registry.register(
            "redis_degraded",
            "1 while Redis is configured but unreachable (local fallback in use)",
            redis_degraded.clone(),
        );
        let admission_backlog = Gauge::default();
        registry.register(
            "admission_backlog",
            "Upstream calls booked by admitted client requests and not yet sent",
            admission_backlog.clone(),
        );
        let admission_estimated_wait = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "admission_estimated_wait",
            "Estimated time until the upstream budget could start a new request",
            Unit::Seconds,
            admission_estimated_wait.clone(),
        );
        let admission_refused = Counter::default();
        registry.register(
            "admission_refused",
            "Client requests refused at once: the upstream budget is booked past their deadline",
            admission_refused.clone(),
        );
        Metrics {
            registry,
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
            hot: Hot::default(),
        }
    }

    /// Records a client request answered on `route` with `status`.
    pub fn answered(&self, route: &'static str, status: u16) {
        let labels = || RouteLabels { route, status };
        let slot = match (route, status) {
            ("leads", 200) => Some(0),
            ("passthrough", 200) => Some(1),
            _ => None,
        };
        match slot {
            Some(i) => self.hot.answered_ok[i]
                .get_or_init(|| self.client_requests.get_or_create(&labels()).clone())
                .inc(),
            None => self.client_requests.get_or_create(&labels()).inc(),
        };
    }

    /// Records one upstream attempt.
    pub fn upstream(&self, kind: UpstreamKind, status: u16, took: Duration) {
        let labels = || UpstreamLabels {
            kind: kind.as_str(),
            status,
        };
        if status == 200 {
            self.hot.upstream_ok[kind.index()]
                .get_or_init(|| self.upstream_requests.get_or_create(&labels()).clone())
                .inc();
        } else {
            self.upstream_requests.get_or_create(&labels()).inc();
        }
        self.hot.upstream_seconds[kind.index()]
            .get_or_init(|| {
                self.upstream_seconds
                    .get_or_create(&KindLabels {
                        kind: kind.as_str(),
                    })
                    .clone()
            })
            .observe(took.as_secs_f64());
    }

    /// Records a cache lookup.
    pub fn cache(&self, level: &'static str, outcome: &'static str) {
        let level_at = match level {
            "page" => Some(0),
            "answer" => Some(1),
            "shared" => Some(2),
            _ => None,
        };
        let outcome_at = match outcome {
            "hit" => Some(0),
            "miss" => Some(1),
            "coalesced" => Some(2),
            _ => None,
        };
        let labels = || CacheLabels { level, outcome };
        match level_at.zip(outcome_at) {
            Some((l, o)) => self.hot.cache[l * 3 + o]
                .get_or_init(|| self.cache_lookups.get_or_create(&labels()).clone())
                .inc(),
            None => self.cache_lookups.get_or_create(&labels()).inc(),
        };
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

    /// The handles taken on first use and the family lookups count into the same series,
    /// and a series appears only once used.
    #[test]
    fn hot_handles_and_family_lookups_share_their_series() {
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
