//! Admission control: a client request starts its upstream work only when the budget can start
//! every call it needs before its deadline; otherwise it is refused at once, told how long the
//! budget is booked, instead of taking a share of a budget that cannot finish it.
//!
//! # Why
//! The limiter's round-robin is fair, but under overload it spreads the budget thinly: every
//! waiting request gets a few of its calls, nearly none gets all of them before `--max-wait`,
//! and the budget is spent on answers nobody receives. Admission keeps the promised work within
//! what the budget can serve, so what is admitted completes and the rest can go elsewhere.
//!
//! # Bookings
//! An admitted request books its cost (all K first pages of a fan-out, 1 for a relay); each call
//! of it the limiter grants consumes one unit; the rest is given back when its [`Ticket`] drops
//! (answered, failed or cancelled). Calls past the booking (later pages, retries, background
//! refreshes) still go through the limiter as before; those queued are counted as work ahead of
//! everyone.
//!
//! # The estimate
//! The limiter grants round-robin across requests, so a request with `r` calls left has its last
//! one granted after `Σ min(r_g, r)` grants over every booked request `g`. Grant `k` (from 0)
//! starts after `(k + taken) / N` slot cycles, `taken` the slots held now. A slot frees one
//! window + margin after its request completed, so a cycle is window + margin + the upstream
//! latency. The latency is a moving average of the fetcher's own timings: the limiter sees
//! grants and releases but keeps no durations, and the fetcher times every attempt anyway.
//!
//! # Fairness
//! A new request is admitted when its own last call fits its deadline and every booked
//! request's last call still fits its own. Because the estimate follows the
//! round-robin, a small request fits beside a wide one (it is done in a few rounds and delays
//! the wide one by its own cost only), while a wide one (more than N calls) fits only while the
//! booked work leaves it room. A request too wide to finish in time even on an idle budget is
//! admitted only when nothing else is booked: it gets the chance it had without admission, and
//! cannot crowd out requests that could have completed.
//!
//! With `--redis`, bookings and latency are this replica's own: other replicas' bookings are
//! not seen (the shared limiter's queue and slots are).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::limiter::{FlowId, LimiterConfig, LimiterSnapshot};

/// How fast the budget starts calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// `N`: calls started per cycle.
    pub slots: u32,
    /// One slot's cycle: window + margin + upstream latency.
    pub cycle: Duration,
    /// Slots held now (in flight or cooling down): they free within one cycle.
    pub taken: u64,
}

impl Pace {
    /// When the budget starts a call with `ahead` calls granted before it.
    pub fn start_after(&self, ahead: u64) -> Duration {
        let waves = ahead.saturating_add(self.taken) / u64::from(self.slots.max(1));
        self.cycle
            .saturating_mul(u32::try_from(waves).unwrap_or(u32::MAX))
    }
}

/// Whether a call starting `after` from `now` starts by `deadline` (an instant past the clock's
/// range never does).
fn in_time(now: Instant, after: Duration, deadline: Instant) -> bool {
    now.checked_add(after).is_some_and(|at| at <= deadline)
}

/// One admitted request's booking.
#[derive(Debug, Clone, Copy)]
struct Booking {
    /// Booked calls not yet granted.
    left: u32,
    /// When the request stops waiting for slots.
    deadline: Instant,
    /// Whether later requests must leave it room: not when it could not make its deadline
    /// even alone.
    protected: bool,
}

/// The bookings of one limiter key: pure, the clock and the limiter's state passed in.
#[derive(Debug, Default)]
pub struct Book {
    /// Admitted requests with booked calls left; removed at zero, so the map stays as small as
    /// the work in progress.
    flows: HashMap<FlowId, Booking>,
    /// `Σ left`, kept so the backlog is not summed on every read.
    reserved: u64,
}

/// Booked work and how long the budget needs to start it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outlook {
    /// Calls booked and not yet granted, or queued in the limiter, whichever is more.
    pub backlog: u64,
    /// When the budget could start one more call.
    pub wait: Duration,
}

/// A request refused admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// The calls it would have booked.
    pub cost: u32,
    /// When the budget could start it: the time the booked work keeps the budget busy.
    pub busy_for: Duration,
}

impl Book {
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// `queued`: upstream calls waiting in the limiter. Those beyond the bookings are calls of
    /// no booking (a lower bound: a booked call may be queued too).
    pub fn outlook(&self, pace: Pace, queued: u64) -> Outlook {
        let backlog = self.reserved.max(queued);
        let wait = pace.start_after(backlog);
        Outlook { backlog, wait }
    }

    /// Books `cost` calls for `flow` if the budget can start them all by `deadline` and every
    /// booked request's last call still by its own (a booked request found late means the
    /// budget is overbooked: nothing more is taken until it catches up).
    pub fn admit(
        &mut self,
        flow: FlowId,
        cost: u32,
        deadline: Instant,
        now: Instant,
        pace: Pace,
        queued: u64,
    ) -> Result<(), Refusal> {
        let unbooked = queued.saturating_sub(self.reserved);
        // Whether a request whose last call is grant number `grants` (from 1) starts it in time.
        let fits = |grants: u64, deadline: Instant| {
            in_time(now, pace.start_after(grants.saturating_sub(1)), deadline)
        };
        let busy_for = self.outlook(pace, queued).wait;
        let refusal = Refusal { cost, busy_for };
        // Its last call on an idle budget.
        let alone = Pace { taken: 0, ..pace }.start_after(u64::from(cost).saturating_sub(1));
        if !in_time(now, alone, deadline) {
            if self.flows.is_empty() && unbooked == 0 {
                self.book(flow, cost, deadline, false);
                return Ok(());
            }
            return Err(refusal);
        }
        let mut booked: Vec<Booking> = self.flows.values().copied().collect();
        booked.sort_unstable_by_key(|b| b.left);
        let count = booked.len() as u64;
        let cost64 = u64::from(cost);
        // Grants through the new request's last call: every booked request's turns up to its own.
        let mut own = unbooked + cost64;
        // Calls of the booked requests with fewer left than the one at hand.
        let mut fewer = unbooked;
        for (i, b) in booked.iter().enumerate() {
            let left = u64::from(b.left);
            own += left.min(cost64);
            let through = fewer + left * (count - i as u64);
            if b.protected && !fits(through + left.min(cost64), b.deadline) {
                return Err(refusal);
            }
            fewer += left;
        }
        if !fits(own, deadline) {
            return Err(refusal);
        }
        self.book(flow, cost, deadline, true);
        Ok(())
    }

    fn book(&mut self, flow: FlowId, cost: u32, deadline: Instant, protected: bool) {
        let b = self.flows.entry(flow).or_insert(Booking {
            left: 0,
            deadline,
            protected,
        });
        b.left = b.left.saturating_add(cost);
        b.deadline = b.deadline.max(deadline);
        b.protected &= protected;
        self.reserved += u64::from(cost);
    }

    /// Gives back up to `units` of `flow`'s booking: one per call granted, and what a dropped
    /// ticket booked and is left.
    pub fn give_back(&mut self, flow: FlowId, units: u32) {
        let Some(b) = self.flows.get_mut(&flow) else {
            return;
        };
        let back = b.left.min(units);
        b.left -= back;
        self.reserved -= u64::from(back);
        if b.left == 0 {
            self.flows.remove(&flow);
        }
    }
}

/// The bookings of every limiter key and the latency they are estimated with, shared by the
/// fetcher and every admitted request's [`Ticket`].
pub struct Admission {
    /// `N`.
    slots: u32,
    /// Window + margin: a slot's cycle without the upstream latency.
    span: Duration,
    /// Moving average of upstream attempt durations, in microseconds; 0 before the first.
    latency_us: AtomicU64,
    /// Books by limiter key, removed when empty. A plain mutex: held for one book's arithmetic,
    /// never across an await.
    books: Mutex<HashMap<Arc<str>, Book>>,
}

/// An admitted request's booking, given back when dropped (answered, failed or cancelled).
pub struct Ticket {
    admission: Arc<Admission>,
    key: Arc<str>,
    flow: FlowId,
    cost: u32,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.give_back(&self.key, self.flow, self.cost);
    }
}

impl Admission {
    /// Admission for a limiter of `limits`.
    pub fn new(limits: LimiterConfig) -> Self {
        Admission {
            slots: limits.requests.max(1),
            span: limits.window.saturating_add(limits.margin),
            latency_us: AtomicU64::new(0),
            books: Mutex::new(HashMap::new()),
        }
    }

    /// `N`: the slots of the limiter these admissions are for.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Admits everything: for a fetcher built without its limiter's settings.
    pub fn unlimited() -> Self {
        Admission::new(LimiterConfig {
            requests: u32::MAX,
            window: Duration::ZERO,
            margin: Duration::ZERO,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Book>> {
        // A book is a few counters updated together; a panic elsewhere leaves them usable.
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records how long one upstream attempt took: an exponential moving average weighting the
    /// newest an eighth, cheap enough for every attempt and quick to follow a slower upstream.
    pub fn observe(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .latency_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                Some(if avg == 0 {
                    sample
                } else {
                    avg - avg / 8 + sample / 8
                })
            });
    }

    /// The pace of the budget with `taken` slots held.
    pub fn pace(&self, taken: usize) -> Pace {
        let latency = Duration::from_micros(self.latency_us.load(Ordering::Relaxed));
        Pace {
            slots: self.slots,
            cycle: self.span.saturating_add(latency),
            taken: taken as u64,
        }
    }

    /// Books `cost` calls for `flow` under `key` if they can all start by `deadline` (see
    /// [`Book::admit`]); `limiter`: the key's limiter state now.
    pub fn admit(
        self: &Arc<Self>,
        key: &Arc<str>,
        flow: FlowId,
        cost: u32,
        deadline: Instant,
        limiter: LimiterSnapshot,
    ) -> Result<Ticket, Refusal> {
        let (pace, queued) = (self.pace(limiter.in_window), limiter.queued as u64);
        let mut books = self.lock();
        let book = books.entry(key.clone()).or_default();
        let admitted = book.admit(flow, cost, deadline, Instant::now(), pace, queued);
        if book.is_empty() {
            books.remove(&**key);
        }
        admitted.map(|()| Ticket {
            admission: self.clone(),
            key: key.clone(),
            flow,
            cost,
        })
    }

    /// One call of `flow` under `key` was granted.
    pub fn consume(&self, key: &str, flow: FlowId) {
        self.give_back(key, flow, 1);
    }

    fn give_back(&self, key: &str, flow: FlowId, units: u32) {
        let mut books = self.lock();
        if let Some(book) = books.get_mut(key) {
            book.give_back(flow, units);
            if book.is_empty() {
                books.remove(key);
            }
        }
    }

    /// The booked work under `key` and when the budget could start more.
    pub fn outlook(&self, key: &str, limiter: LimiterSnapshot) -> Outlook {
        let pace = self.pace(limiter.in_window);
        let queued = limiter.queued as u64;
        let books = self.lock();
        let book = books.get(key);
        book.unwrap_or(&Book::default()).outlook(pace, queued)
    }

    /// The keys with bookings.
    pub fn keys(&self) -> Vec<Arc<str>> {
        self.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Kommo's budget: 7 slots, a cycle of one window, margin and latency.
    fn pace(taken: u64) -> Pace {
        Pace {
            slots: 7,
            cycle: ms(1100),
            taken,
        }
    }

    #[test]
    fn calls_start_in_waves_of_n_after_the_slots_taken() {
        let p = pace(0);
        assert_eq!(p.start_after(0), ms(0));
        assert_eq!(p.start_after(6), ms(0));
        assert_eq!(p.start_after(7), ms(1100));
        assert_eq!(p.start_after(20), ms(2200));
        // Every slot held: even the first call waits for one to free.
        assert_eq!(pace(7).start_after(0), ms(1100));
        assert_eq!(pace(3).start_after(3), ms(0));
        assert_eq!(
            pace(0).start_after(u64::MAX),
            ms(1100).saturating_mul(u32::MAX)
        );
        let now = Instant::now();
        assert!(!in_time(now, Duration::MAX, now + ms(1)));
        assert!(in_time(now, ms(1), now + ms(1)));
    }

    #[test]
    fn bookings_are_consumed_per_call_and_the_rest_given_back() {
        let now = Instant::now();
        let mut book = Book::default();
        let d = now + Duration::from_secs(30);
        book.admit(1, 5, d, now, pace(0), 0).unwrap();
        book.admit(2, 3, d, now, pace(0), 0).unwrap();
        assert_eq!(book.outlook(pace(0), 0).backlog, 8);
        book.give_back(1, 1);
        book.give_back(1, 1);
        book.give_back(9, 1); // no booking: nothing changes
        assert_eq!(book.outlook(pace(0), 0).backlog, 6);
        // The limiter's queue counts when it is longer than the bookings.
        assert_eq!(book.outlook(pace(0), 10).backlog, 10);
        book.give_back(1, 5);
        assert_eq!(book.outlook(pace(0), 0).backlog, 3);
        for _ in 0..3 {
            book.give_back(2, 1);
        }
        assert!(book.is_empty());
        // Giving back after everything was used changes nothing.
        book.give_back(2, 3);
        assert_eq!(book.outlook(pace(0), 0), Outlook::default());
    }

    #[test]
    fn a_request_is_refused_when_its_last_call_would_start_past_its_deadline() {
        let now = Instant::now();
        let mut book = Book::default();
        let d = now + Duration::from_secs(3);
        // 3 s hold 3 waves (starts at 0, 1.1 and 2.2 s): 21 calls.
        for flow in 0..3 {
            book.admit(flow, 7, d, now, pace(0), 0).unwrap();
        }
        let refused = book.admit(10, 1, d, now, pace(0), 0).unwrap_err();
        assert_eq!(refused.cost, 1);
        assert_eq!(refused.busy_for, ms(3300));
        // A later deadline of its own does not help: its one call would push a booked request's
        // last call into a fourth wave, past that one's deadline.
        assert!(book
            .admit(10, 1, now + Duration::from_secs(4), now, pace(0), 0)
            .is_err());
        // Held slots and unbooked queued calls come first.
        let mut book = Book::default();
        assert!(book.admit(1, 1, d, now, pace(21), 0).is_err());
        assert!(book.admit(1, 1, d, now, pace(0), 21).is_err());
        book.admit(1, 1, d, now, pace(14), 6).unwrap();
    }

    #[test]
    fn a_small_request_fits_beside_a_wide_one_but_not_past_its_deadline() {
        let now = Instant::now();
        let mut book = Book::default();
        // 40 calls: the last starts in the sixth wave, at 5.5 s; due at 6 s.
        book.admit(1, 40, now + ms(6000), now, pace(0), 0).unwrap();
        // Round-robin: a 2-call request is done after 4 grants, in the first wave, and it
        // pushes the wide one's last call from grant 40 to 42, still in the sixth wave.
        book.admit(2, 2, now + ms(500), now, pace(0), 0).unwrap();
        // One more pushes it to grant 43: the seventh wave, past its deadline.
        let refused = book
            .admit(3, 1, now + ms(500), now, pace(0), 0)
            .unwrap_err();
        assert_eq!(refused.busy_for, ms(6600));
        // A request due in 1 s could not fit behind 40 calls in FIFO order, but round-robin
        // starts its one call in the first wave: it is refused only for the wide one's sake.
        let mut roomy = Book::default();
        roomy
            .admit(1, 40, now + ms(30_000), now, pace(0), 0)
            .unwrap();
        roomy.admit(2, 1, now + ms(1000), now, pace(0), 0).unwrap();
    }

    #[test]
    fn a_booked_request_found_late_holds_admission_until_it_catches_up() {
        let now = Instant::now();
        let mut book = Book::default();
        book.admit(1, 7, now + ms(100), now, pace(0), 0).unwrap();
        // With every slot taken, flow 1 is late: the budget is overbooked.
        assert!(book.admit(2, 1, now + ms(5000), now, pace(7), 0).is_err());
        for _ in 0..7 {
            book.give_back(1, 1);
        }
        book.admit(2, 1, now + ms(5000), now, pace(7), 0).unwrap();
    }

    #[test]
    fn a_request_too_wide_for_its_deadline_is_admitted_only_when_nothing_is_booked() {
        let now = Instant::now();
        let d = now + Duration::from_secs(2);
        // 30 calls take five waves: more than 2 s even on an idle budget.
        let mut book = Book::default();
        book.admit(1, 1, d, now, pace(0), 0).unwrap();
        assert!(book.admit(2, 30, d, now, pace(0), 0).is_err());
        book.give_back(1, 1);
        assert!(
            book.admit(2, 30, d, now, pace(0), 3).is_err(),
            "queued calls"
        );
        book.admit(2, 30, d, now, pace(7), 0).unwrap();
        // Small requests still fit beside it: it is late anyway.
        book.admit(3, 1, d, now, pace(0), 0).unwrap();
    }

    #[tokio::test]
    async fn tickets_give_their_booking_back_when_dropped() {
        tokio::time::pause();
        let admission = Arc::new(Admission::new(LimiterConfig {
            requests: 7,
            window: Duration::from_secs(1),
            margin: ms(50),
        }));
        admission.observe(ms(80));
        admission.observe(ms(160));
        assert_eq!(admission.pace(0).cycle, ms(1140));
        let key: Arc<str> = Arc::from("k");
        let idle = LimiterSnapshot::default();
        let deadline = Instant::now() + Duration::from_secs(30);
        let ticket = admission.admit(&key, 1, 5, deadline, idle).unwrap();
        admission.consume(&key, 1);
        assert_eq!(admission.outlook(&key, idle).backlog, 4);
        assert_eq!(admission.keys().len(), 1);
        drop(ticket);
        assert_eq!(admission.outlook(&key, idle), Outlook::default());
        assert!(admission.keys().is_empty());
        // The estimate follows the limiter's state: every slot held means one cycle's wait.
        let busy = LimiterSnapshot {
            in_window: 7,
            ..idle
        };
        assert_eq!(admission.outlook(&key, busy).wait, ms(1140));
        let unlimited = Arc::new(Admission::unlimited());
        let _t = unlimited
            .admit(&key, 1, 10_000, Instant::now(), busy)
            .unwrap();
    }
}
