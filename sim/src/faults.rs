//! How the sim misbehaves on purpose: Kommo's rate limit (429, then an IP block answering 403 HTML)
//! and fault rules injected by tests or flags.

use std::collections::VecDeque;

use tokio::time::Instant;

use super::rng::SplitMix64;
use super::{Fault, FaultRule, SimRateLimit};

/// What the rate limiter says about one arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LimitDecision {
    /// Under the limit.
    Allow,
    /// Over the limit: `429` with `retry_after` seconds in the body.
    TooMany {
        /// Seconds to wait, from the window length.
        retry_after: u64,
    },
    /// The client is blocked: `403` HTML.
    Blocked,
}

/// A sliding-window limiter: at most `requests` arrivals in any trailing `window` (the only reading of
/// Kommo's "N per second" safe under every interpretation), and a block after repeated excess.
///
/// One limiter per sim, not per client IP: tests, benchmarks and the demo have one client address.
#[derive(Debug)]
pub(crate) struct Limiter {
    /// The limits.
    cfg: SimRateLimit,
    /// Arrival times inside the trailing window, oldest first; every arrival counts, refused ones too.
    arrivals: VecDeque<Instant>,
    /// `429`s answered since the last allowed request.
    consecutive_429: u32,
    /// While set and in the future, every request is blocked.
    blocked_until: Option<Instant>,
}

impl Limiter {
    /// A limiter with nothing counted yet.
    pub(crate) fn new(cfg: SimRateLimit) -> Self {
        Self {
            cfg,
            arrivals: VecDeque::new(),
            consecutive_429: 0,
            blocked_until: None,
        }
    }

    /// Count an arrival at `now` and decide its fate.
    pub(crate) fn check(&mut self, now: Instant) -> LimitDecision {
        if let Some(until) = self.blocked_until {
            if now < until {
                return LimitDecision::Blocked;
            }
            self.blocked_until = None;
        }
        while let Some(&oldest) = self.arrivals.front() {
            if now.saturating_duration_since(oldest) >= self.cfg.window {
                self.arrivals.pop_front();
            } else {
                break;
            }
        }
        self.arrivals.push_back(now);
        if self.arrivals.len() <= self.cfg.requests as usize {
            self.consecutive_429 = 0;
            return LimitDecision::Allow;
        }
        self.consecutive_429 += 1;
        if self.cfg.block_after > 0 && self.consecutive_429 >= self.cfg.block_after {
            // This one is still a 429; the block starts with the next request.
            self.blocked_until = Some(now + self.cfg.block_for);
            self.consecutive_429 = 0;
            self.arrivals.clear();
        }
        LimitDecision::TooMany {
            retry_after: self.cfg.window.as_secs_f64().ceil().max(1.0) as u64,
        }
    }
}

/// The active fault rules, each with what is left of its `times`, and the dice for `probability`.
#[derive(Debug)]
pub(crate) struct FaultSet {
    /// Rules in the order they are checked.
    rules: Vec<FaultRule>,
    /// Seeded dice, so a probabilistic run is repeatable.
    rng: SplitMix64,
}

impl FaultSet {
    /// A set with the configured rules.
    pub(crate) fn new(rules: Vec<FaultRule>, rng: SplitMix64) -> Self {
        Self { rules, rng }
    }

    /// Append a rule.
    pub(crate) fn push(&mut self, rule: FaultRule) {
        self.rules.push(rule);
    }

    /// Drop every rule.
    pub(crate) fn clear(&mut self) {
        self.rules.clear();
    }

    /// The fault that replaces this request's answer, if a rule fires (first match wins; its `times`
    /// is used up). Body faults are skipped: [`FaultSet::pick_body`] decides those.
    pub(crate) fn pick(&mut self, path: &str, raw_query: &str) -> Option<Fault> {
        self.pick_where(path, raw_query, |fault| !is_body_fault(fault))
    }

    /// The body fault for a `200` leads list, if a rule fires: only rules whose fault `applies` to
    /// this page are considered, so the others keep their `times` and draw no dice.
    pub(crate) fn pick_body(
        &mut self,
        path: &str,
        raw_query: &str,
        mut applies: impl FnMut(&Fault) -> bool,
    ) -> Option<Fault> {
        self.pick_where(path, raw_query, |fault| {
            is_body_fault(fault) && applies(fault)
        })
    }

    /// The first rule that matches the request, passes `eligible` and wins its dice.
    fn pick_where(
        &mut self,
        path: &str,
        raw_query: &str,
        mut eligible: impl FnMut(&Fault) -> bool,
    ) -> Option<Fault> {
        let mut decoded: Option<String> = None;
        for rule in &mut self.rules {
            if rule.times == Some(0) {
                continue;
            }
            if let Some(prefix) = &rule.path_prefix {
                if !path.starts_with(prefix.as_str()) {
                    continue;
                }
            }
            if let Some(needle) = &rule.query_contains {
                let decoded = decoded.get_or_insert_with(|| decode(raw_query));
                if !raw_query.contains(needle.as_str()) && !decoded.contains(needle.as_str()) {
                    continue;
                }
            }
            if !eligible(&rule.fault) {
                continue;
            }
            // Draw only for a real gamble, so adding an always-rule does not shift other dice.
            if rule.probability < 1.0 && !self.rng.chance(rule.probability) {
                continue;
            }
            if let Some(left) = &mut rule.times {
                *left -= 1;
            }
            return Some(rule.fault.clone());
        }
        None
    }
}

/// Whether a fault changes a `200` leads list's body rather than replacing the answer.
fn is_body_fault(fault: &Fault) -> bool {
    matches!(fault, Fault::MisplaceLead | Fault::DropLead)
}

/// The query string percent-decoded (`+` as space), pairs joined back with `&`.
fn decode(raw: &str) -> String {
    form_urlencoded::parse(raw.as_bytes())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limiter(requests: u32, block_after: u32) -> Limiter {
        Limiter::new(SimRateLimit {
            requests,
            window: Duration::from_secs(1),
            block_after,
            block_for: Duration::from_secs(60),
        })
    }

    #[test]
    fn window_limits_then_blocks() {
        let t0 = Instant::now();
        let mut l = limiter(3, 2);
        for _ in 0..3 {
            assert_eq!(l.check(t0), LimitDecision::Allow);
        }
        assert_eq!(
            l.check(t0),
            LimitDecision::TooMany { retry_after: 1 },
            "4th in the window"
        );
        assert_eq!(l.check(t0), LimitDecision::TooMany { retry_after: 1 });
        assert_eq!(l.check(t0), LimitDecision::Blocked);
        assert_eq!(
            l.check(t0 + Duration::from_secs(59)),
            LimitDecision::Blocked
        );
        assert_eq!(l.check(t0 + Duration::from_secs(60)), LimitDecision::Allow);
    }

    #[test]
    fn window_slides() {
        let t0 = Instant::now();
        let mut l = limiter(2, 0);
        assert_eq!(l.check(t0), LimitDecision::Allow);
        assert_eq!(
            l.check(t0 + Duration::from_millis(600)),
            LimitDecision::Allow
        );
        // t0 is still inside (1000ms window): a third within the second is refused.
        assert!(matches!(
            l.check(t0 + Duration::from_millis(900)),
            LimitDecision::TooMany { .. }
        ));
        // Refused arrivals count too: only once all three left the window is there room again.
        assert!(matches!(
            l.check(t0 + Duration::from_millis(1500)),
            LimitDecision::TooMany { .. }
        ));
        assert_eq!(
            l.check(t0 + Duration::from_millis(2600)),
            LimitDecision::Allow
        );
    }

    #[test]
    fn rules_fire_in_order_and_count_down() {
        let mut set = FaultSet::new(
            vec![
                FaultRule::always(Fault::Status500)
                    .on_path("/api/v4/leads")
                    .times(2),
                FaultRule::always(Fault::HtmlForbidden).on_query("filter[id]"),
            ],
            SplitMix64::new(1),
        );
        assert_eq!(set.pick("/api/v4/account", ""), None);
        assert_eq!(set.pick("/api/v4/leads", ""), Some(Fault::Status500));
        assert_eq!(set.pick("/api/v4/leads", ""), Some(Fault::Status500));
        assert_eq!(set.pick("/api/v4/leads", ""), None);
        assert_eq!(
            set.pick("/api/v4/leads", "filter%5Bid%5D=1"),
            Some(Fault::HtmlForbidden)
        );
        set.clear();
        assert_eq!(set.pick("/api/v4/leads", "filter[id]=1"), None);
    }

    #[test]
    fn body_faults_wait_for_a_page_that_suits_them() {
        let mut set = FaultSet::new(
            vec![
                FaultRule::always(Fault::DropLead).times(1),
                FaultRule::always(Fault::MisplaceLead).on_query("filter[statuses]"),
                FaultRule::always(Fault::Status500).on_path("/api/v4/account"),
            ],
            SplitMix64::new(1),
        );
        // On arrival, body faults never fire and keep their count.
        assert_eq!(set.pick("/api/v4/leads", ""), None);
        assert_eq!(set.pick("/api/v4/account", ""), Some(Fault::Status500));
        // A page the drop does not suit leaves it armed; then it fires once.
        assert_eq!(set.pick_body("/api/v4/leads", "", |_| false), None);
        assert_eq!(
            set.pick_body("/api/v4/leads", "", |_| true),
            Some(Fault::DropLead)
        );
        assert_eq!(set.pick_body("/api/v4/leads", "", |_| true), None);
        assert_eq!(
            set.pick_body(
                "/api/v4/leads",
                "filter%5Bstatuses%5D%5B0%5D%5Bstatus_id%5D=1",
                |f| { *f == Fault::MisplaceLead }
            ),
            Some(Fault::MisplaceLead)
        );
    }

    #[test]
    fn probability_is_seeded() {
        let run = |seed| {
            let mut set = FaultSet::new(
                vec![FaultRule::always(Fault::Status500).with_probability(0.3)],
                SplitMix64::new(seed),
            );
            (0..200)
                .map(|_| set.pick("/", "").is_some())
                .collect::<Vec<_>>()
        };
        let a = run(9);
        assert_eq!(a, run(9));
        let hits = a.iter().filter(|&&h| h).count();
        assert!((30..90).contains(&hits), "{hits}");
    }
}
