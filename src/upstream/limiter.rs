//! The upstream rate limiter: decides when each upstream request may leave, so the proxy as a
//! whole never sends Kommo more than `N` requests in any window of length `W`.
//!
//! # Why a sliding window and not a token bucket
//!
//! Kommo allows about 7 requests per second and does not document how it counts a "second";
//! excess earns `429`, repeated excess blocks the IP (`403`) for every integration behind the
//! proxy. A token bucket or GCRA with burst `N` hands out `N` at once and then refills
//! continuously, so it admits up to `2N - 1` requests within one second: unsafe under some
//! readings of the limit. The only guarantee safe under every reading is "at most `N` in ANY
//! window of length `W`", as the upstream counts arrivals.
//!
//! So the limiter holds `N` slots. A grant takes a free slot; the slot stays taken while the
//! request is in flight and for `W + M` after the caller [releases](UpstreamLimiter::release) it
//! on completion (answer received, failure, or abandonment). The upstream has certainly counted
//! a request by the time its answer arrives, so two requests using the same slot arrive at least
//! `W` apart whatever the delays between grant, send and arrival (a new TLS connection, a busy
//! CPU, network jitter): at most `N` arrivals fit in any window. Counting from the grant instead
//! would rely on the margin `M` covering every such delay, which a loaded machine or a slow
//! handshake can exceed. The price is the upstream latency per slot cycle, small against Kommo's
//! one-second window. This still lets `N` go out at once, so a fan-out of up to `N` stages costs
//! no waiting on an idle limiter.
//!
//! # Waiting, fairness and timers
//!
//! Each key's slots are the turns of a [`FairQueue`]: a FIFO semaphore of `N` permits behind
//! per-flow gates, so waiters are served FIFO within a flow (one client request) and
//! round-robin across flows, and a small request is not stuck behind a big fan-out. A grant
//! forgets its permit; [`release`](UpstreamLimiter::release) records the instant and hands the
//! permit back `W + M` later, from a timer task or from whichever acquire or snapshot comes
//! first after that instant. Dropping an acquire leaves the semaphore's queue (tokio returns a
//! permit handed to it but never seen), so withdrawal costs no slot. Pauses and blocks are
//! checked by every waiter when they change; a waiter granted a permit during a pause holds it
//! until the pause ends, keeping its place. The release instants also give the earliest
//! possible grant, so an acquire that cannot be served before its deadline fails at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::future::{poll_fn, BoxFuture};
use tokio::sync::SemaphorePermit;
use tokio::time::Instant;

use super::fair::FairQueue;

/// One client request: all the upstream calls one client request makes share a flow, and
/// fairness is between flows.
pub type FlowId = u64;

/// One granted permit, to [release](UpstreamLimiter::release) when its request completes.
pub type GrantId = u64;

/// How many requests the upstream allows per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterConfig {
    /// `N`: the most permits granted within any window of length `window`.
    pub requests: u32,
    /// `W`: the length of the upstream's counting window (one second for Kommo).
    pub window: Duration,
    /// `M`: extra time a slot stays taken after its request completed, against clock drift
    /// between the proxy and the upstream.
    pub margin: Duration,
}

impl LimiterConfig {
    /// Checks the rules a usable limiter needs; call it with the rest of the config, before
    /// anything is bound, so a bad value exits with a clear message.
    pub fn validate(&self) -> Result<(), String> {
        if self.requests == 0 {
            return Err("the upstream rate limit must allow at least 1 request per window".into());
        }
        if self.window.is_zero() {
            return Err("the upstream rate-limit window must be longer than zero".into());
        }
        Ok(())
    }
}

/// Why no permit was granted.
#[derive(Debug, Clone, PartialEq)]
pub enum LimitError {
    /// The deadline would pass before a permit; `retry_after` = a sensible hint for the client's Retry-After.
    Timeout { retry_after: Duration },
    /// A block cool-down is in force until that instant (answer 503 meanwhile).
    Blocked { retry_after: Duration },
}

impl fmt::Display for LimitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitError::Timeout { retry_after } => write!(
                f,
                "the upstream rate limit allows no request before the deadline (retry after {retry_after:?})"
            ),
            LimitError::Blocked { retry_after } => write!(
                f,
                "the upstream blocked this proxy; cooling down for {retry_after:?}"
            ),
        }
    }
}

impl std::error::Error for LimitError {}

/// The state of one key, for readiness and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimiterSnapshot {
    /// Waiters queued for a permit.
    pub queued: usize,
    /// Slots taken: requests in flight, or completed within the last `W + M`.
    pub in_window: usize,
    /// The end of a pause (after a `429`), if one is in force.
    pub paused_until: Option<Instant>,
    /// The end of a block cool-down (after a `403`), if one is in force.
    pub blocked_until: Option<Instant>,
    /// Nothing is sent yet: another process of this account sends, or sent within the last
    /// window (see [`super::handover`]).
    pub waiting_for_predecessor: bool,
}

/// Decides when an upstream request may be sent. Object-safe, so the server holds an
/// `Arc<dyn UpstreamLimiter>` and a shared (e.g. Redis-backed) implementation can replace the
/// in-process one.
pub trait UpstreamLimiter: Send + Sync + 'static {
    /// Wait for a permit to send one upstream request under `key` (e.g. the upstream origin) on behalf of `flow`.
    /// Resolves when the permit is granted (the caller then sends immediately), or fails when `deadline` cannot be met.
    /// Dropping the future before it resolves withdraws the waiter (a disconnected client must not keep its streams queued) and does not consume a permit.
    /// The caller must [`release`](Self::release) the grant when the request completes.
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        flow: FlowId,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<GrantId, LimitError>>;

    /// The request sent under `grant` has completed (answered, failed or abandoned): its slot
    /// frees `W + M` from now.
    fn release(&self, key: &str, grant: GrantId);

    /// An upstream 429 was seen: grant nothing for `key` until `until` (all flows). Extends, never shortens, an existing pause.
    fn pause(&self, key: &str, until: Instant);

    /// An upstream block (403) was seen: waiters and new acquires fail with Blocked until `until`.
    fn block(&self, key: &str, until: Instant);

    /// For readiness and metrics.
    fn snapshot(&self, key: &str) -> LimiterSnapshot;
}

/// The in-process limiter: exact for one proxy instance (several instances in front of one
/// account need a shared implementation).
///
/// Like any future, an acquire makes progress only while polled: a future left pending but
/// never polled again keeps a slot handed to it until it is dropped.
pub struct LocalLimiter {
    /// `N` and `W + M`, fixed at construction.
    limits: Limits,
    /// Per-key state; entries are never removed: keys are upstream origins, a handful at most.
    /// A blocking mutex, held for one lookup and never across an await.
    keys: Mutex<HashMap<String, Arc<Key>>>,
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    /// `N`, at least 1.
    requests: usize,
    /// `W + M`: how long a slot stays taken after its request completed.
    span: Duration,
}

/// The state of one key.
struct Key {
    limits: Limits,
    /// The waiters, in fair order; its turns are the free slots.
    queue: FairQueue,
    /// What the turns do not tell. A blocking mutex: every critical section is short and never
    /// spans an await (tokio recommends the blocking mutex for exactly that).
    book: Mutex<Book>,
}

#[derive(Default)]
struct Book {
    /// Taken slots whose request is in flight.
    in_flight: HashSet<GrantId>,
    /// Source of grant ids for this key.
    next_grant: GrantId,
    /// Release instants of the slots not yet handed back to the turns, oldest first (recorded
    /// under this lock, so in clock order: the freed ones are always at the front).
    released: VecDeque<Instant>,
    /// Turns held by waiters waiting out a pause: not free, but no slot either.
    parked: usize,
    /// End of the latest pause (`429`); may lie in the past.
    paused_until: Option<Instant>,
    /// End of the latest block (`403`); may lie in the past.
    blocked_until: Option<Instant>,
}

/// Counts a turn held through a pause as no slot, until dropped.
struct Parked<'a>(&'a Key);

// === impl LocalLimiter ===

impl LocalLimiter {
    /// A limiter with `cfg`. A `requests` of 0 is treated as 1 (see [`LimiterConfig::validate`]):
    /// a limiter that never grants would only turn every request into a timeout.
    pub fn new(cfg: LimiterConfig) -> Self {
        LocalLimiter {
            limits: Limits {
                requests: usize::try_from(cfg.requests.max(1)).unwrap_or(usize::MAX),
                span: cfg.window.saturating_add(cfg.margin),
            },
            keys: Mutex::default(),
        }
    }

    /// The state of `key`, created on first use.
    fn key(&self, key: &str) -> Arc<Key> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        // Look up by `&str` first: allocating the owned key on every call would tax the fast path.
        if let Some(k) = keys.get(key) {
            return k.clone();
        }
        let (limits, queue) = (self.limits, FairQueue::new(self.limits.requests));
        let book = Mutex::default();
        (keys.entry(key.to_owned()))
            .or_insert(Arc::new(Key {
                limits,
                queue,
                book,
            }))
            .clone()
    }
}

impl UpstreamLimiter for LocalLimiter {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        flow: FlowId,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<GrantId, LimitError>> {
        let k = self.key(key);
        let mut wait = Box::pin(k.clone().acquire(flow, deadline));
        // Each poll first hands back the slots freed by now: a waiter polled at a slot's free
        // instant gets it even before the release's timer task has run.
        Box::pin(poll_fn(move |cx| {
            drop(k.drain());
            wait.as_mut().poll(cx)
        }))
    }

    fn release(&self, key: &str, grant: GrantId) {
        let k = self.key(key);
        let free_at = {
            let mut book = k.book();
            if !book.in_flight.remove(&grant) {
                return;
            }
            // Read the clock under the lock so releases are recorded in order.
            let now = Instant::now();
            book.released.push_back(now);
            now.checked_add(k.limits.span)
        };
        // Outside a runtime (a drop at shutdown) the next acquire or snapshot hands it back.
        if let (Some(at), Ok(rt)) = (free_at, tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                tokio::time::sleep_until(at).await;
                drop(k.drain());
            });
        }
    }

    fn pause(&self, key: &str, until: Instant) {
        let k = self.key(key);
        {
            let mut book = k.book();
            if book.paused_until.is_some_and(|p| p >= until) {
                return;
            }
            book.paused_until = Some(until);
        }
        tracing::debug!(key, pause = ?until.saturating_duration_since(Instant::now()), "upstream rate limit hit: pausing grants");
        // Waiters whose deadline falls within the pause learn it now.
        k.queue.notify();
    }

    fn block(&self, key: &str, until: Instant) {
        let k = self.key(key);
        {
            let mut book = k.book();
            if book.blocked_until.is_none_or(|b| b < until) {
                book.blocked_until = Some(until);
            }
        }
        tracing::warn!(key, cool_down = ?until.saturating_duration_since(Instant::now()), "upstream blocked the proxy: failing requests");
        k.queue.notify();
    }

    fn snapshot(&self, key: &str) -> LimiterSnapshot {
        let k = self.key(key);
        let book = k.drain();
        let now = Instant::now();
        let free = k.queue.turns().available_permits() + book.parked;
        LimiterSnapshot {
            queued: k.queue.len(),
            in_window: k.limits.requests.saturating_sub(free),
            paused_until: book.paused_at(now),
            blocked_until: book.blocked_at(now),
            waiting_for_predecessor: false,
        }
    }
}

/// Whether a slot released at `released` has freed by `now`.
fn expired(released: Instant, now: Instant, span: Duration) -> bool {
    now.saturating_duration_since(released) >= span
}

// === impl Key ===

impl Key {
    fn book(&self) -> MutexGuard<'_, Book> {
        // A panic while holding the lock cannot break the window guarantee (a grant is recorded
        // in one insert), so keep serving.
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands the slots freed by now back to the turns; returns the book, locked.
    fn drain(&self) -> MutexGuard<'_, Book> {
        let mut book = self.book();
        let now = Instant::now();
        let span = self.limits.span;
        let freed = (book.released.iter())
            .take_while(|r| expired(**r, now, span))
            .count();
        if freed > 0 {
            book.released.drain(..freed);
            self.queue.turns().add_permits(freed);
        }
        book
    }

    async fn acquire(
        self: Arc<Self>,
        flow: FlowId,
        deadline: Instant,
    ) -> Result<GrantId, LimitError> {
        {
            let mut book = self.book();
            let now = Instant::now();
            self.check(&book, deadline)?;
            if book.paused_at(now).is_none() {
                if let Some(permit) = self.queue.try_turn() {
                    return Ok(book.grant(permit));
                }
            }
            // Failing now rather than at the deadline frees the client sooner. The estimate is
            // a lower bound unless waiters ahead withdraw.
            if (self.eta(&book, self.queue.min_ahead(flow), now)).is_none_or(|t| t >= deadline) {
                return Err(self.timeout(&book, now));
            }
        }
        let place = self.queue.join(flow);
        let check = || self.check(&self.book(), deadline);
        let late = || self.timeout(&self.book(), Instant::now());
        let work = async {
            let permit = place.turn().await;
            loop {
                let until = {
                    let mut book = self.book();
                    let now = Instant::now();
                    // Never grant at or after the deadline: the caller has given up by then.
                    if now >= deadline {
                        return Err(self.timeout(&book, now));
                    }
                    match book.paused_at(now) {
                        None => return Ok(book.grant(permit)),
                        Some(until) => until,
                    }
                };
                let _parked = Parked::new(&self);
                tokio::time::sleep_until(until).await;
            }
        };
        self.queue.guard(deadline, check, late, work).await
    }

    /// Why a waiter must stop now: a block, or a pause outlasting its deadline.
    fn check(&self, book: &Book, deadline: Instant) -> Result<(), LimitError> {
        let now = Instant::now();
        match (book.blocked_at(now), book.paused_at(now)) {
            (Some(until), _) => Err(LimitError::Blocked {
                retry_after: until - now,
            }),
            (None, Some(p)) if p >= deadline => Err(self.timeout(book, now)),
            _ => Ok(()),
        }
    }

    /// When the grant `position` places from now (0 = the next) can happen, assuming nobody new
    /// arrives or withdraws and every request in flight completes now (a lower bound); `None`
    /// if beyond what `Instant` represents.
    ///
    /// Each slot frees at a known instant, or `W + M` after its request completes; after the
    /// first `N` grants every later one follows a slot's previous use by at least `W + M`.
    fn eta(&self, book: &Book, position: usize, now: Instant) -> Option<Instant> {
        let Limits { requests, span } = self.limits;
        let start = book.paused_at(now).unwrap_or(now);
        // Freeing order: released slots by release instant (already sorted), then the slots in
        // flight, assumed to complete at `start`.
        let first_live = book.released.partition_point(|r| expired(*r, start, span));
        let live_released = book.released.len() - first_live;
        let free = requests.saturating_sub(live_released + book.in_flight.len());
        let rounds = u32::try_from(position / requests).unwrap_or(u32::MAX);
        let slot = position % requests;
        let base = if slot < free {
            start
        } else if slot - free < live_released {
            book.released[first_live + slot - free].checked_add(span)?
        } else {
            start.checked_add(span)?
        };
        base.checked_add(span.checked_mul(rounds)?)
    }

    /// The error for a waiter that cannot be served in time; the hint is when a request arriving
    /// now would likely get a permit, queue included.
    fn timeout(&self, book: &Book, now: Instant) -> LimitError {
        let retry_after = self
            .eta(book, self.queue.len(), now)
            .map_or(Duration::MAX, |t| t.saturating_duration_since(now));
        LimitError::Timeout { retry_after }
    }
}

// === impl Book ===

impl Book {
    fn blocked_at(&self, now: Instant) -> Option<Instant> {
        self.blocked_until.filter(|b| *b > now)
    }

    fn paused_at(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|p| *p > now)
    }

    /// Takes the slot of `permit` for a new grant.
    fn grant(&mut self, permit: SemaphorePermit<'_>) -> GrantId {
        permit.forget();
        let id = self.next_grant;
        self.next_grant += 1;
        self.in_flight.insert(id);
        id
    }
}

impl<'a> Parked<'a> {
    fn new(key: &'a Key) -> Self {
        key.book().parked += 1;
        Parked(key)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.book().parked -= 1;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;
    use std::task::Poll;

    use tokio::task::JoinHandle;

    use super::*;

    const KEY: &str = "https://example.kommo.com";
    const HOUR: Duration = Duration::from_secs(3600);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limiter(requests: u32, window: Duration, margin: Duration) -> Arc<LocalLimiter> {
        Arc::new(LocalLimiter::new(LimiterConfig {
            requests,
            window,
            margin,
        }))
    }

    /// Kommo's limit as the proxy configures it: 7 per second, 50 ms margin.
    fn kommo() -> Arc<LocalLimiter> {
        limiter(7, Duration::from_secs(1), ms(50))
    }

    /// An acquire whose request completes at once: the slot frees `W + M` after the grant.
    async fn take(
        l: &LocalLimiter,
        key: &str,
        flow: FlowId,
        deadline: Instant,
    ) -> Result<(), LimitError> {
        l.acquire(key, flow, deadline)
            .await
            .map(|grant| l.release(key, grant))
    }

    /// An acquire on its own task; resolves to the outcome and the instant it resolved.
    fn spawn_acquire(
        l: &Arc<LocalLimiter>,
        key: &'static str,
        flow: FlowId,
        deadline: Instant,
    ) -> JoinHandle<(Result<(), LimitError>, Instant)> {
        let l = Arc::clone(l);
        tokio::spawn(async move {
            let r = take(&l, key, flow, deadline).await;
            (r, Instant::now())
        })
    }

    /// Lets spawned tasks run until `n` waiters are queued under `key` (time does not advance
    /// while tasks are runnable).
    async fn until_queued(l: &LocalLimiter, key: &str, n: usize) {
        for _ in 0..10_000 {
            if l.snapshot(key).queued == n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("expected {n} queued, found {}", l.snapshot(key).queued);
    }

    async fn outcome(
        h: JoinHandle<(Result<(), LimitError>, Instant)>,
    ) -> (Result<(), LimitError>, Instant) {
        h.await.expect("the acquire task panicked")
    }

    /// Fails if any closed interval of length `window` holds more than `n` of the sorted `grants`.
    pub(crate) fn assert_at_most_n_per_window(grants: &[Instant], n: usize, window: Duration) {
        for w in grants.windows(n + 1) {
            assert!(
                w[n] - w[0] > window,
                "{} grants within {:?}",
                n + 1,
                w[n] - w[0]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_n_is_granted_without_waiting() {
        let l = kommo();
        let t0 = Instant::now();
        for flow in 0..7 {
            assert_eq!(take(&l, KEY, flow, t0 + HOUR).await, Ok(()));
        }
        assert_eq!(Instant::now(), t0);
        assert_eq!(l.snapshot(KEY).in_window, 7);
        // The eighth waits until the first permit returns, W + M after it was granted.
        assert_eq!(take(&l, KEY, 7, t0 + HOUR).await, Ok(()));
        assert_eq!(Instant::now(), t0 + ms(1050));
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_holds_more_than_n_grants_and_the_budget_is_used() {
        let l = kommo();
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..5)
            .flat_map(|flow| (0..30).map(move |_| flow))
            .map(|flow| spawn_acquire(&l, KEY, flow, t0 + HOUR))
            .collect();
        let mut grants = Vec::new();
        for t in tasks {
            let (r, at) = outcome(t).await;
            assert_eq!(r, Ok(()));
            grants.push(at);
        }
        grants.sort();
        assert_eq!(grants.len(), 150);
        assert_at_most_n_per_window(&grants, 7, Duration::from_secs(1));
        // The margin is kept too: N + 1 grants always span at least W + M.
        for w in grants.windows(8) {
            assert!(w[7] - w[0] >= ms(1050));
        }
        // And the budget is used: 7 at once, then 7 every W + M, so the 150th goes out in the
        // 22nd round, 21 × 1.05 s after the first.
        assert_eq!(*grants.last().expect("150 grants") - t0, ms(1050) * 21);
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_flow_is_served_within_two_grants_of_arriving() {
        // One permit per window, so grants are one per instant and their order is plain.
        let l = limiter(1, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        let big: Vec<_> = (0..40)
            .map(|_| spawn_acquire(&l, KEY, 1, t0 + HOUR))
            .collect();
        until_queued(&l, KEY, 39).await;
        let small = spawn_acquire(&l, KEY, 2, t0 + HOUR);
        until_queued(&l, KEY, 40).await;
        let arrived = Instant::now();

        let (r, small_at) = outcome(small).await;
        assert_eq!(r, Ok(()));
        let mut big_after_arrival = 0;
        for t in big {
            let (r, at) = outcome(t).await;
            assert_eq!(r, Ok(()));
            if at > arrived && at < small_at {
                big_after_arrival += 1;
            }
        }
        assert!(
            big_after_arrival <= 1,
            "{big_after_arrival} grants to the big flow first"
        );
        assert!(small_at <= t0 + ms(1050) * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_that_cannot_be_met_fails_at_once_with_a_hint() {
        let l = limiter(1, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        assert_eq!(take(&l, KEY, 1, t0 + HOUR).await, Ok(()));
        // The next permit frees at t0 + 1.05 s: a deadline before that cannot be met.
        assert_eq!(
            take(&l, KEY, 2, t0 + ms(500)).await,
            Err(LimitError::Timeout {
                retry_after: ms(1050)
            })
        );
        assert!(matches!(
            take(&l, KEY, 3, t0).await,
            Err(LimitError::Timeout { .. })
        ));
        assert_eq!(Instant::now(), t0);
        assert_eq!(l.snapshot(KEY).queued, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_whose_deadline_passes_in_the_queue_times_out_then() {
        let l = limiter(1, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        assert_eq!(take(&l, KEY, 0, t0 + HOUR).await, Ok(()));
        // Flow 1 queues 5, flow 2 queues 2; the order is 1, 2, 1, 2: the second of flow 2 is
        // due at t0 + 4.2 s. The up-front estimate (a lower bound) says 3.15 s, so it queues,
        // and its 4 s deadline passes while it waits.
        let ahead: Vec<_> = (0..5)
            .map(|_| spawn_acquire(&l, KEY, 1, t0 + HOUR))
            .collect();
        until_queued(&l, KEY, 5).await;
        let first = spawn_acquire(&l, KEY, 2, t0 + HOUR);
        until_queued(&l, KEY, 6).await;
        let late = spawn_acquire(&l, KEY, 2, t0 + ms(4000));
        until_queued(&l, KEY, 7).await;

        let (r, at) = outcome(late).await;
        assert!(matches!(r, Err(LimitError::Timeout { .. })), "{r:?}");
        assert_eq!(at, t0 + ms(4000));
        // Its withdrawal leaves the others to be served in the same rhythm.
        let (r, at) = outcome(first).await;
        assert_eq!((r, at), (Ok(()), t0 + ms(2100)));
        for t in ahead {
            assert_eq!(outcome(t).await.0, Ok(()));
        }
        assert_eq!(Instant::now(), t0 + ms(1050) * 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_grant_until_it_ends() {
        let l = kommo();
        let t0 = Instant::now();
        l.pause(KEY, t0 + ms(3000));
        // A later, shorter pause does not shorten it.
        l.pause(KEY, t0 + ms(1000));
        assert_eq!(l.snapshot(KEY).paused_until, Some(t0 + ms(3000)));

        let waiting: Vec<_> = (0..3)
            .map(|flow| spawn_acquire(&l, KEY, flow, t0 + HOUR))
            .collect();
        until_queued(&l, KEY, 3).await;
        // A deadline inside the pause fails at once.
        assert!(matches!(
            take(&l, KEY, 9, t0 + ms(2000)).await,
            Err(LimitError::Timeout { .. })
        ));
        for t in waiting {
            assert_eq!(outcome(t).await, (Ok(()), t0 + ms(3000)));
        }
        assert_eq!(l.snapshot(KEY).paused_until, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_held_through_a_pause_is_no_slot() {
        let l = limiter(2, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        l.pause(KEY, t0 + ms(1000));
        let waiting: Vec<_> = (0..3)
            .map(|flow| spawn_acquire(&l, KEY, flow, t0 + HOUR))
            .collect();
        until_queued(&l, KEY, 3).await;
        assert_eq!(l.snapshot(KEY).in_window, 0);
        let mut at = Vec::new();
        for t in waiting {
            let (r, granted) = outcome(t).await;
            assert_eq!(r, Ok(()));
            at.push(granted - t0);
        }
        assert_eq!(at, [ms(1000), ms(1000), ms(2050)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_released_twice_frees_one_slot() {
        let l = limiter(1, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        let grant = l.acquire(KEY, 0, t0 + HOUR).await.expect("a free slot");
        l.release(KEY, grant);
        l.release(KEY, grant);
        tokio::time::sleep_until(t0 + ms(1050)).await;
        assert_eq!(take(&l, KEY, 1, t0 + HOUR).await, Ok(()));
        assert_eq!(l.snapshot(KEY).in_window, 1);
        let next = spawn_acquire(&l, KEY, 2, t0 + HOUR);
        assert_eq!(outcome(next).await, (Ok(()), t0 + ms(2100)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_while_waiting_moves_the_grant_to_its_end() {
        let l = limiter(1, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        assert_eq!(take(&l, KEY, 0, t0 + HOUR).await, Ok(()));
        let waiter = spawn_acquire(&l, KEY, 1, t0 + HOUR);
        // Queued ahead of the pause and due at 1.05 s; the pause until 2 s moves it.
        let doomed = spawn_acquire(&l, KEY, 2, t0 + ms(2500));
        until_queued(&l, KEY, 2).await;
        l.pause(KEY, t0 + ms(2000));
        assert_eq!(outcome(waiter).await, (Ok(()), t0 + ms(2000)));
        // The second would be due at 3.05 s, past its 2.5 s deadline.
        let (r, at) = outcome(doomed).await;
        assert!(matches!(r, Err(LimitError::Timeout { .. })), "{r:?}");
        assert!(at <= t0 + ms(2500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_block_fails_waiters_and_new_acquires_until_it_ends() {
        let l = limiter(1, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        assert_eq!(take(&l, KEY, 0, t0 + HOUR).await, Ok(()));
        let waiter = spawn_acquire(&l, KEY, 1, t0 + HOUR);
        until_queued(&l, KEY, 1).await;

        l.block(KEY, t0 + ms(10_000));
        let blocked = Err(LimitError::Blocked {
            retry_after: ms(10_000),
        });
        assert_eq!(outcome(waiter).await, (blocked.clone(), t0));
        assert_eq!(take(&l, KEY, 2, t0 + HOUR).await, blocked);
        let snap = l.snapshot(KEY);
        assert_eq!(
            (snap.queued, snap.blocked_until),
            (0, Some(t0 + ms(10_000)))
        );

        tokio::time::sleep_until(t0 + ms(10_000)).await;
        assert_eq!(take(&l, KEY, 3, t0 + HOUR).await, Ok(()));
        assert_eq!(l.snapshot(KEY).blocked_until, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_takes_no_permit_and_stalls_nobody() {
        let l = limiter(1, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        assert_eq!(take(&l, KEY, 0, t0 + HOUR).await, Ok(()));
        // `dropped` is polled once: it is queued at the head, with the timer for the next slot.
        let mut dropped = l.acquire(KEY, 1, t0 + HOUR);
        assert!(futures::poll!(dropped.as_mut()).is_pending());
        let next = spawn_acquire(&l, KEY, 2, t0 + HOUR);
        until_queued(&l, KEY, 2).await;

        drop(dropped);
        assert_eq!(l.snapshot(KEY).queued, 1);
        // The next waiter takes the slot the dropped one would have had.
        assert_eq!(outcome(next).await, (Ok(()), t0 + ms(1050)));
        assert_eq!(l.snapshot(KEY).in_window, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_granted_but_never_seen_is_returned_on_drop() {
        let l = limiter(2, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        for flow in 0..2 {
            assert_eq!(take(&l, KEY, flow, t0 + HOUR).await, Ok(()));
        }
        let mut seen = l.acquire(KEY, 10, t0 + HOUR);
        let mut unseen = l.acquire(KEY, 11, t0 + HOUR);
        assert!(futures::poll!(seen.as_mut()).is_pending());
        assert!(futures::poll!(unseen.as_mut()).is_pending());

        // At 1.05 s both slots free; polling the head grants both, but `unseen` is dropped
        // before its future reports the grant, so its request is never sent.
        tokio::time::sleep_until(t0 + ms(1050)).await;
        assert!(matches!(futures::poll!(seen.as_mut()), Poll::Ready(Ok(_))));
        assert_eq!(l.snapshot(KEY).in_window, 2);
        drop(unseen);
        assert_eq!(l.snapshot(KEY).in_window, 1);
        assert_eq!(take(&l, KEY, 12, t0 + HOUR).await, Ok(()));
        assert_eq!(Instant::now(), t0 + ms(1050));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_stays_taken_while_its_request_is_in_flight() {
        let l = limiter(2, Duration::from_secs(1), ms(0));
        let t0 = Instant::now();
        let slow = l.acquire(KEY, 0, t0 + HOUR).await.expect("a free slot");
        assert_eq!(take(&l, KEY, 1, t0 + HOUR).await, Ok(()));
        let waiter = spawn_acquire(&l, KEY, 2, t0 + HOUR);
        until_queued(&l, KEY, 1).await;
        // The quick request's slot frees at 1 s; the slow one answers only at 3 s.
        tokio::time::sleep_until(t0 + ms(3000)).await;
        l.release(KEY, slow);
        assert_eq!(outcome(waiter).await, (Ok(()), t0 + ms(1000)));
        let next = spawn_acquire(&l, KEY, 3, t0 + HOUR);
        // Both slots: one freed by the waiter's release at 1 s (taken again at 1 s, released at
        // once, free at 2 s), the slow one at 3 s + 1 s.
        assert_eq!(outcome(next).await, (Ok(()), t0 + ms(3000)));
        let last = spawn_acquire(&l, KEY, 4, t0 + HOUR);
        assert_eq!(outcome(last).await, (Ok(()), t0 + ms(4000)));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_independent() {
        let l = limiter(1, Duration::from_secs(1), ms(50));
        let t0 = Instant::now();
        assert_eq!(take(&l, "a", 1, t0 + HOUR).await, Ok(()));
        assert_eq!(take(&l, "b", 1, t0 + HOUR).await, Ok(()));
        l.pause("a", t0 + ms(5000));
        l.block("c", t0 + ms(5000));

        let a = spawn_acquire(&l, "a", 2, t0 + HOUR);
        let b = spawn_acquire(&l, "b", 2, t0 + HOUR);
        assert_eq!(
            take(&l, "c", 2, t0 + HOUR).await,
            Err(LimitError::Blocked {
                retry_after: ms(5000)
            })
        );
        assert_eq!(outcome(b).await, (Ok(()), t0 + ms(1050)));
        assert_eq!(outcome(a).await, (Ok(()), t0 + ms(5000)));
        assert_eq!(take(&l, "d", 1, t0 + HOUR).await, Ok(()));
        assert_eq!(Instant::now(), t0 + ms(5000));
    }

    /// A small deterministic generator: the stress tests (here and of the Redis limiter) need
    /// varied schedules, not crypto.
    pub(crate) struct XorShift(pub(crate) u64);

    impl XorShift {
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[tokio::test(start_paused = true)]
    async fn random_arrivals_deadlines_and_drops_never_break_the_window() {
        for seed in 1..=20u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let n = 1 + rng.below(8) as usize;
            let l = limiter(n as u32, ms(1000), ms(rng.below(100)));
            let t0 = Instant::now();
            let grants = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for _ in 0..120 {
                let (l, grants) = (Arc::clone(&l), Arc::clone(&grants));
                let flow = rng.below(6);
                let arrive = t0 + ms(rng.below(15_000));
                let deadline = arrive + ms(rng.below(8_000));
                let task = tokio::spawn(async move {
                    tokio::time::sleep_until(arrive).await;
                    if take(&l, KEY, flow, deadline).await.is_ok() {
                        let now = Instant::now();
                        assert!(now < deadline, "granted at or after the deadline");
                        grants
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(now);
                    }
                });
                // Some clients disconnect: their task, and the acquire in it, is dropped.
                let drop_at = (rng.below(4) == 0).then(|| t0 + ms(rng.below(20_000)));
                tasks.push((task, drop_at));
            }
            for (task, drop_at) in tasks {
                if let Some(at) = drop_at {
                    tokio::time::sleep_until(at).await;
                    task.abort();
                }
                if let Err(e) = task.await {
                    assert!(e.is_cancelled(), "seed {seed}: {e}");
                }
            }
            let mut grants = grants
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            grants.sort();
            assert!(!grants.is_empty());
            assert_at_most_n_per_window(&grants, n, ms(1000));
            let snap = l.snapshot(KEY);
            assert_eq!(snap.queued, 0, "seed {seed}");
        }
    }
}
