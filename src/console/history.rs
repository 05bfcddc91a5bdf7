//! The console's history: one row a second of the budget's figures, the last 15 minutes, in
//! a ring buffer.

use std::collections::VecDeque;

use super::exposition::Scrape;

/// The metric names the rows are read from.
pub const UPSTREAM_REQUESTS: &str = "kommo_fanout_upstream_requests_total";
pub const SLOTS_TAKEN: &str = "kommo_fanout_limiter_slots_taken";
pub const QUEUED: &str = "kommo_fanout_limiter_queued";
pub const UPSTREAM_429: &str = "kommo_fanout_upstream_429_total";
pub const BLOCKS: &str = "kommo_fanout_upstream_blocks_total";
pub const REFUSED: &str = "kommo_fanout_admission_refused_total";
pub const CLIENT_REQUESTS: &str = "kommo_fanout_client_requests_total";
pub const CACHE_LOOKUPS: &str = "kommo_fanout_cache_lookups_total";

/// One second of the budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Second {
    /// Unix seconds of the sample.
    pub at: u64,
    /// Upstream requests answered since the previous sample.
    pub sent: u32,
    /// Limiter slots taken when sampled: requests in flight or answered less than a window
    /// (plus margin) ago, against the limit.
    pub slots_taken: u32,
    /// Upstream requests waiting for a slot when sampled.
    pub queued: u32,
    /// `429` answers since the previous sample.
    pub throttled: u32,
    /// Client requests refused by admission since the previous sample.
    pub refused: u32,
    /// Client requests answered since the previous sample.
    pub client: u32,
    /// Cache hits (answers and pages) since the previous sample.
    pub hits: u32,
    /// Cache misses since the previous sample.
    pub misses: u32,
}

impl Second {
    /// The row of the sample `now` taken at `at`, counting from `before` (from zero for the
    /// first sample, so the rows add up to the counters).
    pub fn between(at: u64, before: Option<&Scrape>, now: &Scrape) -> Second {
        let moved = |read: &dyn Fn(&Scrape) -> f64| {
            let was = before.map_or(0.0, read);
            clamp(read(now) - was)
        };
        let outcome = |o: &'static str| {
            move |s: &Scrape| s.sum_where(CACHE_LOOKUPS, |x| x.label("outcome") == Some(o))
        };
        Second {
            at,
            sent: moved(&|s| s.sum(UPSTREAM_REQUESTS)),
            slots_taken: clamp(now.sum(SLOTS_TAKEN)),
            queued: clamp(now.sum(QUEUED)),
            throttled: moved(&|s| s.sum(UPSTREAM_429)),
            refused: moved(&|s| s.sum(REFUSED)),
            client: moved(&|s| s.sum(CLIENT_REQUESTS)),
            hits: moved(&outcome("hit")),
            misses: moved(&outcome("miss")),
        }
    }
}

/// A count as a row holds it: never negative (a counter does not go back), at most `u32::MAX`.
fn clamp(n: f64) -> u32 {
    if n.is_finite() && n > 0.0 {
        n.round().min(f64::from(u32::MAX)) as u32
    } else {
        0
    }
}

/// The newest `capacity` rows.
#[derive(Debug, Clone)]
pub struct History {
    rows: VecDeque<Second>,
    capacity: usize,
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            rows: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Appends a row, dropping the oldest past the capacity.
    pub fn push(&mut self, row: Second) {
        if self.rows.len() == self.capacity {
            self.rows.pop_front();
        }
        self.rows.push_back(row);
    }

    /// The newest row.
    pub fn last(&self) -> Option<&Second> {
        self.rows.back()
    }

    /// The rows, oldest first.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = &Second> + '_ {
        self.rows.iter()
    }

    /// The history as columns (`at`, `sent`, ...), oldest first: compact JSON for the page.
    pub fn columns(&self) -> serde_json::Value {
        let col = |f: fn(&Second) -> u64| self.rows.iter().map(f).collect::<Vec<u64>>();
        serde_json::json!({
            "step_s": 1,
            "at": col(|r| r.at),
            "sent": col(|r| u64::from(r.sent)),
            "slots_taken": col(|r| u64::from(r.slots_taken)),
            "queued": col(|r| u64::from(r.queued)),
            "throttled": col(|r| u64::from(r.throttled)),
            "refused": col(|r| u64::from(r.refused)),
            "client": col(|r| u64::from(r.client)),
            "hits": col(|r| u64::from(r.hits)),
            "misses": col(|r| u64::from(r.misses)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(sent: u32, slots: u32, hits: u32) -> Scrape {
        Scrape::parse(&format!(
            "{UPSTREAM_REQUESTS}{{kind=\"stream\",status=\"200\"}} {sent}\n\
             {UPSTREAM_REQUESTS}{{kind=\"single\",status=\"200\"}} 1\n\
             {SLOTS_TAKEN} {slots}\n\
             {CACHE_LOOKUPS}{{level=\"page\",outcome=\"hit\"}} {hits}\n\
             {CACHE_LOOKUPS}{{level=\"answer\",outcome=\"hit\"}} {hits}\n"
        ))
    }

    #[test]
    fn rows_count_what_moved_and_add_up_to_the_counters() {
        let first = Second::between(10, None, &scrape(4, 3, 1));
        assert_eq!((first.sent, first.slots_taken, first.hits), (5, 3, 2));
        let next = Second::between(11, Some(&scrape(4, 3, 1)), &scrape(9, 7, 2));
        assert_eq!((next.sent, next.slots_taken, next.hits), (5, 7, 2));
        // A counter that went back (a restart of a series) counts as nothing, not negative.
        let back = Second::between(12, Some(&scrape(9, 7, 2)), &scrape(2, 0, 2));
        assert_eq!(back.sent, 0);
    }

    #[test]
    fn the_ring_keeps_the_newest() {
        let mut h = History::new(3);
        for at in 0..5 {
            h.push(Second {
                at,
                sent: at as u32,
                ..Second::default()
            });
        }
        assert_eq!(h.rows().map(|r| r.at).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(h.last().map(|r| r.at), Some(4));
        assert_eq!(h.columns()["sent"], serde_json::json!([2, 3, 4]));
    }
}
