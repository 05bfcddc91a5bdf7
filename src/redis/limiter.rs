//! The upstream limiter shared by every replica through Redis: the same guarantee as
//! [`LocalLimiter`] — at most `N` upstream requests arriving in any window `W` — for the whole
//! deployment instead of one process.
//!
//! # Slots in Redis
//!
//! The slots of every replica live in Redis, each held from its grant until `W + M` after its
//! request completed (or until a lease ends, if its replica crashed); `slots.rs` has the
//! layout and the scripts. Why a slot is held until `W + M` after completion (not after the
//! grant) is explained in [`crate::upstream::limiter`]; nothing changes here.
//!
//! # Waiting and fairness
//!
//! Waiters of one key queue on their replica in the same [`FairQueue`] as the in-process
//! limiter's: FIFO per flow, round-robin across flows, withdrawn when dropped. Here the queue has
//! one turn, the head's: the head asks Redis for a slot (one take at a time per key and replica)
//! and passes the turn on once it has one. When the window is full Redis also says when the next
//! slot frees: the head asks again then, at most [`POLL_CAP`] later because another replica's
//! release can free one earlier, and waiters whose deadline comes first fail at once. A take
//! abandoned mid-call (its waiter dropped, Redis slow) gives its slot back.
//!
//! # Pauses and blocks
//!
//! `pause` and `block` are written to Redis (extended only) so that a `429` seen by one replica
//! pauses all of them; the take script refuses to grant while either is in force and returns how
//! long they last. A local mirror (the fallback limiter's own pause and block) is set at once, so
//! this replica honours them even before Redis has them, and feeds `snapshot`. The head does not
//! ask Redis while the mirror says paused.
//!
//! # When Redis is unreachable
//!
//! The limiter falls back to a [`LocalLimiter`] at `N / replicas` (at least 1), logs an error
//! once, and reports [`RedisLimiter::degraded`]. A background task probes Redis and switches
//! back when it answers. The window guarantee survives both transitions:
//!
//! - Every replica that uses Redis registers as a **member** (a heartbeat with a short TTL). The
//!   take script keeps `N / replicas` slots in reserve for every configured replica that is not
//!   a member, since it may be granting from its fallback. So fallback grants plus Redis grants
//!   stay within `N` while only some replicas reach Redis.
//! - A replica that loses Redis grants nothing from its fallback until its membership has
//!   surely expired and its own Redis slots have freed (`W + M` after both), so the others'
//!   reserve is in force before it sends.
//! - A replica that reaches Redis again takes Redis slots as a non-member at once (its fallback
//!   use is covered by the reserve), and registers only once its fallback slots have all freed.
//! - A stalled Redis (a paused process, a frozen host) runs the commands queued meanwhile when it
//!   resumes, long after the replica gave up on them. Late takes, releases and pauses only hold
//!   slots longer. A late registration would count a replica that grants from its fallback as a
//!   member again, handing its reserve to the others: so each registration carries a deadline
//!   on Redis's clock (measured with `TIME`), `REGISTER_VALID` after it was sent, and the
//!   script refuses it past that. The fallback's wait counts registrations still on their way.
//!
//! What remains unguarded is another replica's request that was granted by Redis just before
//! the outage and reaches Kommo more than `M` after it: the same margin the single-process
//! limiter relies on for in-flight arrivals. A deployment running fewer replicas than
//! `replicas` says keeps the missing ones' reserve unused: configure the real count.
//!
//! Redis is behind a `SlotStore` trait, so the logic above is unit-tested against an in-memory
//! stand-in; the end-to-end tests run it against a real `redis-server`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::slots::{millis, Hold, Limits, RedisStore, SlotStore, Take};
use super::timed;
use crate::upstream::fair::FairQueue;
use crate::upstream::limiter::{
    FlowId, GrantId, LimitError, LimiterConfig, LimiterSnapshot, LocalLimiter, UpstreamLimiter,
};

/// The longest a waiting head trusts "no slot before T": another replica may release sooner.
pub const POLL_CAP: Duration = Duration::from_millis(50);
/// How long a membership lasts without a heartbeat. Short, because a replica that loses Redis
/// waits this long (plus `W + M`) before granting from its fallback.
const MEMBER_TTL: Duration = Duration::from_millis(1000);
/// How often the background task renews the membership, or probes Redis while degraded.
const HEARTBEAT: Duration = Duration::from_millis(200);
/// How long after it was sent a registration may still take effect. A heartbeat queued behind
/// a stalled Redis runs when the server resumes, maybe long after this replica gave up on it
/// and began granting from its fallback; counted as a member again, it would hand its reserve
/// to the others. Past this, measured on Redis's clock, the script refuses it.
const REGISTER_VALID: Duration = Duration::from_millis(250);

/// Settings of the shared limiter.
#[derive(Debug, Clone)]
pub struct RedisLimiterConfig {
    /// `redis://host:port[/db]` or `rediss://…` (TLS); credentials may be in the URL.
    pub url: String,
    /// Prepended to every Redis key, so several deployments can share one Redis.
    pub key_prefix: String,
    /// `N`, `W` and `M`: the budget the whole deployment shares.
    pub limiter: LimiterConfig,
    /// How many replicas are deployed: each falls back to `N / replicas` without Redis, and
    /// replicas not seen in Redis have that share reserved for them.
    pub replicas: u32,
    /// The longest a slot stays taken for a request that is never released (its replica
    /// crashed): at least the upstream timeout + `W + M`, or a live slow request loses its slot.
    pub lease: Duration,
}

/// The shared limiter. Cheap to share behind an `Arc<dyn UpstreamLimiter>`; the background
/// heartbeat task stops when it is dropped.
pub struct RedisLimiter {
    core: Arc<Core<RedisStore>>,
}

/// The limiter over any store: Redis, or an in-memory stand-in in unit tests.
struct Core<S> {
    store: S,
    limits: Limits,
    /// This replica's id in slot names and the membership set; random per process.
    replica: String,
    /// Serves while Redis is unreachable, and mirrors pauses and blocks meanwhile.
    fallback: LocalLimiter,
    /// Source of slot numbers (unique per replica; the replica id makes them global).
    next_slot: AtomicU64,
    /// All mutable state behind one blocking mutex: every critical section is short and never
    /// spans an await.
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// Redis answers and this replica is a member: slots come from Redis.
    Shared,
    /// Redis answers again but the fallback's slots have not all freed: slots come from Redis,
    /// and this replica stays out of the membership set so its reserve covers those slots.
    Recovering,
    /// Redis does not answer: slots come from the fallback.
    #[default]
    Fallback,
}

#[derive(Default)]
struct State {
    mode: Mode,
    /// When the current (or last) fallback period began.
    degraded_since: Option<Instant>,
    /// A bound on when this replica's membership in Redis expires, counting registrations
    /// still on their way (they take effect within [`REGISTER_VALID`] of being sent, or never).
    member_until: Option<Instant>,
    /// Redis's clock (Unix ms) as of a local instant, and the error of that reading: what a
    /// registration's deadline is written in.
    clock: Option<(Instant, i64, Duration)>,
    /// Fallback acquires not resolved yet (a granted one counts in the fallback's window).
    fallback_waiting: usize,
    /// Per key: the waiters on this replica; entries are never removed (keys are few).
    keys: HashMap<String, Arc<KeyQueue>>,
}

/// The waiters of one key on this replica, in front of Redis.
struct KeyQueue {
    /// In fair order; its one turn is the head's, which asks Redis.
    fair: FairQueue,
    /// What the last take said.
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    /// Slots taken in Redis as of the last take, for snapshots.
    in_window: usize,
    /// No slot before this (a full window or a pause): waiters due earlier fail at once.
    free_at: Option<Instant>,
    /// Do not ask Redis again before this.
    retry_at: Option<Instant>,
    /// When this replica last released a Redis slot of this key, so the fallback waits for it.
    last_release: Option<Instant>,
}

/// Why a waiter of the shared queue stopped.
enum Stop {
    Limit(LimitError),
    /// Redis became unreachable: go again, on the fallback.
    Fallback,
}

/// Gives a slot back to Redis when dropped armed: a take abandoned mid-call, or one granted
/// past its waiter's deadline, must not hold a slot no request uses.
struct Taking<'a, S: SlotStore> {
    core: &'a Arc<Core<S>>,
    key: &'a str,
    slot: Option<String>,
}

/// Counts a fallback acquire until it resolves.
struct FallbackWaiting<'a, S: SlotStore>(&'a Core<S>);

// === impl RedisLimiter ===

impl RedisLimiter {
    /// A limiter sharing `cfg.limiter` through the Redis at `cfg.url`.
    ///
    /// Fails on a URL that can never work. An unreachable Redis is not an error: the limiter
    /// starts degraded (on its fallback) and switches to Redis when it answers.
    pub async fn connect(cfg: RedisLimiterConfig) -> Result<RedisLimiter, String> {
        let store = RedisStore::new(super::connection(&cfg.url)?, cfg.key_prefix.clone());
        let core = Core::start(store, &cfg).await;
        Ok(RedisLimiter { core })
    }

    /// Whether Redis is unreachable and this replica limits itself locally at `N / replicas`.
    pub fn degraded(&self) -> bool {
        self.core.degraded()
    }
}

impl UpstreamLimiter for RedisLimiter {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        flow: FlowId,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<GrantId, LimitError>> {
        Box::pin(self.core.acquire(key, flow, deadline))
    }

    fn release(&self, key: &str, grant: GrantId) {
        self.core.release(key, grant);
    }

    fn pause(&self, key: &str, until: Instant) {
        self.core.pause(key, until);
    }

    fn block(&self, key: &str, until: Instant) {
        self.core.block(key, until);
    }

    fn snapshot(&self, key: &str) -> LimiterSnapshot {
        self.core.snapshot(key)
    }
}

// === impl Core ===

impl<S: SlotStore> Core<S> {
    /// Registers with the store when it answers (so the first requests already share the
    /// budget) and starts the heartbeat.
    async fn start(store: S, cfg: &RedisLimiterConfig) -> Arc<Self> {
        let requests = cfg.limiter.requests.max(1);
        let (replicas, span) = (cfg.replicas.max(1), cfg.limiter.window + cfg.limiter.margin);
        let share = (requests / replicas).max(1);
        let core = Arc::new(Core {
            store,
            limits: Limits {
                requests,
                span,
                lease: cfg.lease.max(span),
                replicas,
                share,
            },
            // Random per process: no two replicas (or restarts) may share slot ids.
            replica: super::random_hex(1),
            fallback: LocalLimiter::new(LimiterConfig {
                requests: share,
                ..cfg.limiter
            }),
            next_slot: AtomicU64::new(0),
            state: Mutex::new(State {
                degraded_since: Some(Instant::now()),
                ..State::default()
            }),
        });
        match core.register().await {
            Ok(()) => {
                let mut st = core.lock();
                (st.mode, st.degraded_since) = (Mode::Shared, None);
                info!(replica = %core.replica, requests, replicas, "shared upstream limiter on Redis");
            }
            Err(e) => error!(
                error = %e,
                fallback_requests = share,
                "Redis is unreachable at start: the upstream limiter runs locally at N / replicas until it answers"
            ),
        }
        tokio::spawn(heartbeat(Arc::downgrade(&core)));
        core
    }

    fn degraded(&self) -> bool {
        self.lock().mode == Mode::Fallback
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few field writes; a panic elsewhere leaves nothing half-granted.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The queue of `key`, created on first use.
    fn key(&self, key: &str) -> Arc<KeyQueue> {
        let mut st = self.lock();
        if let Some(kq) = st.keys.get(key) {
            return kq.clone();
        }
        let kq = Arc::new(KeyQueue {
            fair: FairQueue::new(1),
            seen: Mutex::default(),
        });
        st.keys.insert(key.to_owned(), kq.clone());
        kq
    }

    fn slot(&self, n: u64) -> String {
        format!("{}:{n}", self.replica)
    }

    /// Grant ids: a Redis slot's number times two, or a fallback grant's id times two plus one.
    async fn acquire(
        self: &Arc<Self>,
        key: &str,
        flow: FlowId,
        deadline: Instant,
    ) -> Result<GrantId, LimitError> {
        let kq = self.key(key);
        loop {
            let waiting = {
                let mut st = self.lock();
                let fallback = st.mode == Mode::Fallback;
                st.fallback_waiting += usize::from(fallback);
                fallback.then(|| FallbackWaiting(self))
            };
            if let Some(_waiting) = waiting {
                let last_release = kq.seen().last_release;
                let hold = {
                    let st = self.lock();
                    st.degraded_since.max(st.member_until).max(last_release)
                };
                // Until the others see this replica gone and its Redis slots have freed, it may
                // not grant locally: a pause of the fallback is exactly that wait.
                let hold = hold.map(|t| t + self.limits.span);
                if let Some(hold) = hold.filter(|&hold| hold > Instant::now()) {
                    self.fallback.pause(key, hold);
                }
                let grant = self.fallback.acquire(key, flow, deadline).await?;
                return Ok(grant << 1 | 1);
            }
            let place = kq.fair.join(flow);
            let check = || self.check(&kq, key, deadline);
            let late = || Stop::Limit(self.timeout(&kq));
            let head = async {
                let _turn = place.turn().await;
                self.take(&kq, key, deadline).await
            };
            match kq.fair.guard(deadline, check, late, head).await {
                Ok(slot) => return Ok(slot << 1),
                Err(Stop::Limit(e)) => return Err(e),
                Err(Stop::Fallback) => {}
            }
        }
    }

    /// Why a waiter must stop now: Redis was lost, a block, or no slot before its deadline.
    fn check(&self, kq: &KeyQueue, key: &str, deadline: Instant) -> Result<(), Stop> {
        if self.degraded() {
            return Err(Stop::Fallback);
        }
        let local = self.fallback.snapshot(key);
        if let Some(until) = local.blocked_until {
            let retry_after = until.saturating_duration_since(Instant::now());
            return Err(Stop::Limit(LimitError::Blocked { retry_after }));
        }
        if (local.paused_until.max(kq.seen().free_at)).is_some_and(|t| t >= deadline) {
            return Err(Stop::Limit(self.timeout(kq)));
        }
        Ok(())
    }

    /// The head's part: asks Redis for a slot until it has one, waiting out pauses and a full
    /// window; the slot's number.
    async fn take(
        self: &Arc<Self>,
        kq: &KeyQueue,
        key: &str,
        deadline: Instant,
    ) -> Result<u64, Stop> {
        loop {
            let now = Instant::now();
            let paused = self.fallback.snapshot(key).paused_until;
            let retry_at = kq.seen().retry_at.max(paused).filter(|at| *at > now);
            if let Some(at) = retry_at {
                tokio::time::sleep_until(at).await;
                continue;
            }
            let n = self.next_slot.fetch_add(1, Ordering::Relaxed);
            let slot = self.slot(n);
            let reply = timed(self.store.take(key, &slot, self.limits));
            let mut taking = Taking {
                core: self,
                key,
                slot: Some(slot.clone()),
            };
            let reply = reply.await.inspect_err(|e| self.degrade(e));
            let reply = reply.map_err(|_| Stop::Fallback)?;
            self.took(kq, key, reply);
            if reply.granted {
                // Never grant at or after the deadline: the caller has given up by then.
                if Instant::now() >= deadline {
                    return Err(Stop::Limit(self.timeout(kq)));
                }
                taking.slot = None;
                return Ok(n);
            }
            taking.slot = None;
            if !reply.blocked.is_zero() {
                let retry_after = reply.blocked;
                return Err(Stop::Limit(LimitError::Blocked { retry_after }));
            }
        }
    }

    /// Mirrors what Redis said about pauses and blocks, and when to ask again.
    fn took(&self, kq: &KeyQueue, key: &str, reply: Take) {
        let now = Instant::now();
        if !reply.paused.is_zero() {
            // Ignored unless it ends later than the mirror's.
            self.fallback.pause(key, now + reply.paused);
        }
        // A block only when the mirror has none, so it is logged once, not on every take.
        if !reply.blocked.is_zero() && self.fallback.snapshot(key).blocked_until.is_none() {
            self.fallback.block(key, now + reply.blocked);
        }
        let mut seen = kq.seen();
        seen.in_window = reply.taken;
        let free = reply.wait.max(reply.paused);
        seen.free_at = (!free.is_zero()).then(|| now + free);
        seen.retry_at = (!reply.wait.is_zero()).then(|| now + reply.wait.min(POLL_CAP));
        drop(seen);
        if !reply.granted {
            kq.fair.notify();
        }
    }

    /// A timeout with a hint: when a request arriving now would likely be served, the queue
    /// ahead of it included.
    fn timeout(&self, kq: &KeyQueue) -> LimitError {
        let free = kq
            .seen()
            .free_at
            .map(|t| t.saturating_duration_since(Instant::now()));
        let rounds = kq.fair.len() / self.limits.requests as usize;
        let rounds = u32::try_from(rounds).unwrap_or(u32::MAX).saturating_add(1);
        let retry_after =
            (self.limits.span.saturating_mul(rounds) / 2).max(free.unwrap_or_default());
        LimitError::Timeout { retry_after }
    }

    fn release(self: &Arc<Self>, key: &str, grant: GrantId) {
        if grant & 1 == 1 {
            return self.fallback.release(key, grant >> 1);
        }
        let now = Instant::now();
        self.key(key).seen().last_release = Some(now);
        if self.degraded() {
            // Sent under Redis, completed under the fallback: the fallback waits for it.
            self.fallback.pause(key, now + self.limits.span);
        }
        let (core, key, slot) = (self.clone(), key.to_owned(), self.slot(grant >> 1));
        spawn(async move {
            let released = core.store.release(&key, &slot, core.limits.span);
            if let Err(e) = timed(released).await {
                // The slot keeps its lease: the budget shrinks until it ends, never grows.
                debug!(error = %e, "could not release a slot in Redis");
            }
        });
    }

    /// The mirror first, so this replica honours it before Redis has it.
    fn pause(self: &Arc<Self>, key: &str, until: Instant) {
        self.fallback.pause(key, until);
        self.share(key, Hold::Pause, until);
    }

    fn block(self: &Arc<Self>, key: &str, until: Instant) {
        self.fallback.block(key, until);
        self.share(key, Hold::Block, until);
    }

    /// Tells this replica's waiters of a pause or block, and every other replica through Redis.
    fn share(self: &Arc<Self>, key: &str, hold: Hold, until: Instant) {
        self.key(key).fair.notify();
        let left = until.saturating_duration_since(Instant::now());
        if millis(left) == 0 {
            return;
        }
        let (core, key) = (self.clone(), key.to_owned());
        spawn(async move {
            if let Err(e) = timed(core.store.hold(&key, hold, left)).await {
                warn!(error = %e, key, "could not share a pause or block through Redis");
                core.degrade(&e);
            }
        });
    }

    fn snapshot(&self, key: &str) -> LimiterSnapshot {
        let local = self.fallback.snapshot(key);
        let kq = self.key(key);
        let fallback = self.degraded();
        LimiterSnapshot {
            queued: kq.fair.len() + local.queued,
            in_window: if fallback {
                local.in_window
            } else {
                kq.seen().in_window
            },
            ..local
        }
    }

    /// Renews (or takes) this replica's membership, valid only if it reaches Redis within
    /// [`REGISTER_VALID`].
    async fn register(&self) -> Result<(), String> {
        if self.lock().clock.is_none() {
            self.read_clock().await?;
        }
        let deadline = {
            let mut st = self.lock();
            let (at, redis_ms, error) = st.clock.ok_or("Redis's clock is not known")?;
            let now = Instant::now();
            // Before it is sent: from now on the membership may last this long, answered or not.
            let bound = now + REGISTER_VALID + MEMBER_TTL + error;
            st.member_until = Some(st.member_until.map_or(bound, |m| m.max(bound)));
            let ms = |d: Duration| i64::try_from(millis(d)).unwrap_or(i64::MAX);
            redis_ms.saturating_add(ms(now - at) + ms(REGISTER_VALID))
        };
        let register = self.store.register(&self.replica, MEMBER_TTL, deadline);
        if timed(register).await? {
            return Ok(());
        }
        // Slow, or the clocks moved: measure again before the next try.
        self.lock().clock = None;
        Err("a registration reached Redis past its deadline".into())
    }

    /// Reads Redis's clock: proves Redis answers, and measures its clock against this host's.
    async fn read_clock(&self) -> Result<(), String> {
        let sent = Instant::now();
        let redis_ms = timed(self.store.time()).await?;
        let half = (Instant::now() - sent) / 2;
        self.lock().clock = Some((sent + half, redis_ms, half + Duration::from_millis(1)));
        Ok(())
    }

    /// Redis failed: switch to the fallback (once) and send every waiter there.
    fn degrade(&self, why: &str) {
        let keys: Vec<Arc<KeyQueue>> = {
            let mut st = self.lock();
            if st.mode == Mode::Fallback {
                return;
            }
            (st.mode, st.degraded_since) = (Mode::Fallback, Some(Instant::now()));
            st.keys.values().cloned().collect()
        };
        error!(
            error = why,
            fallback_requests = self.limits.share,
            replicas = self.limits.replicas,
            "Redis is unreachable: the upstream limiter falls back to a local one at N / replicas until it answers"
        );
        keys.iter().for_each(|kq| kq.fair.notify());
    }

    /// Whether no fallback slot can still be counting: no fallback acquire unresolved, and no
    /// fallback grant in flight or released within `W + M`.
    fn fallback_drained(&self) -> bool {
        let keys: Vec<String> = {
            let st = self.lock();
            if st.fallback_waiting > 0 {
                return false;
            }
            st.keys.keys().cloned().collect()
        };
        keys.iter().all(|key| {
            let local = self.fallback.snapshot(key);
            local.in_window == 0 && local.queued == 0
        })
    }

    /// One round of the background task: renew the membership, or probe Redis and move back.
    async fn beat(&self) {
        let mode = self.lock().mode;
        match mode {
            Mode::Fallback => {
                if self.read_clock().await.is_ok() {
                    let mut st = self.lock();
                    if st.mode == Mode::Fallback {
                        st.mode = Mode::Recovering;
                        info!("Redis answers again: the upstream limiter is shared again");
                    }
                }
            }
            Mode::Recovering if !self.fallback_drained() => {
                if let Err(e) = self.read_clock().await {
                    self.degrade(&e);
                }
            }
            Mode::Shared | Mode::Recovering => match self.register().await {
                Ok(()) => {
                    let mut st = self.lock();
                    if st.mode == Mode::Recovering {
                        st.mode = Mode::Shared;
                        debug!("fallback slots freed: this replica counts as a member again");
                    }
                }
                Err(e) => self.degrade(&e),
            },
        }
    }
}

/// Renews the membership and probes Redis until the limiter is dropped.
async fn heartbeat<S: SlotStore>(core: Weak<Core<S>>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let Some(core) = core.upgrade() else {
            return;
        };
        core.beat().await;
    }
}

/// Spawns on the current runtime; outside one (a release from a drop at shutdown) the work is
/// skipped, which only keeps a slot until its lease ends.
fn spawn(task: impl Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(task);
    }
}

impl KeyQueue {
    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<S: SlotStore> Drop for Taking<'_, S> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        // Sent after the take on the same connection, so it runs after it, even late.
        let (core, key) = (self.core.clone(), self.key.to_owned());
        spawn(async move {
            if let Err(e) = timed(core.store.give_back(&key, &slot)).await {
                // The lease frees it; meanwhile the budget is smaller, never larger.
                debug!(error = %e, "could not return an unused slot to Redis");
            }
        });
    }
}

impl<S: SlotStore> Drop for FallbackWaiting<'_, S> {
    fn drop(&mut self) {
        self.0.lock().fallback_waiting -= 1;
    }
}

#[cfg(test)]
mod tests {
    use crate::upstream::limiter::tests::{assert_at_most_n_per_window, XorShift};
    use std::sync::{Arc, Mutex, PoisonError};

    use tokio::task::JoinHandle;

    use super::super::slots::mem::MemStore;
    use super::*;

    const KEY: &str = "https://example.kommo.com";
    const HOUR: Duration = Duration::from_secs(3600);
    /// `W + M` of [`config`].
    const SPAN: Duration = Duration::from_millis(1050);

    type Replica = Arc<Core<MemStore>>;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `requests` per second, 50 ms margin, shared by `replicas`.
    fn config(requests: u32, replicas: u32) -> RedisLimiterConfig {
        RedisLimiterConfig {
            url: String::new(),
            key_prefix: String::new(),
            limiter: LimiterConfig {
                requests,
                window: Duration::from_secs(1),
                margin: ms(50),
            },
            replicas,
            lease: Duration::from_secs(5),
        }
    }

    /// A replica on its own connection to `store`'s server.
    async fn replica(store: &MemStore, cfg: &RedisLimiterConfig) -> Replica {
        Core::start(store.link(), cfg).await
    }

    /// An acquire whose request completes at once; the instant it was granted.
    async fn take(r: &Replica, flow: FlowId, deadline: Instant) -> Result<Instant, LimitError> {
        let grant = r.acquire(KEY, flow, deadline).await?;
        r.release(KEY, grant);
        Ok(Instant::now())
    }

    fn spawn_take(
        r: &Replica,
        flow: FlowId,
        deadline: Instant,
    ) -> JoinHandle<Result<Instant, LimitError>> {
        let r = r.clone();
        tokio::spawn(async move { take(&r, flow, deadline).await })
    }

    /// When each of `tasks` was granted, after `t0`, sorted.
    async fn granted(
        tasks: Vec<JoinHandle<Result<Instant, LimitError>>>,
        t0: Instant,
    ) -> Vec<Duration> {
        let mut at = Vec::new();
        for t in tasks {
            at.push(t.await.expect("the task ran").expect("a grant") - t0);
        }
        at.sort();
        at
    }

    /// Lets (paused) time pass until `done`; the instant it was.
    async fn until(what: &str, done: impl Fn() -> bool) -> Instant {
        for _ in 0..10_000 {
            if done() {
                return Instant::now();
            }
            tokio::time::sleep(ms(10)).await;
        }
        panic!("{what}: not within 100 s");
    }

    #[tokio::test(start_paused = true)]
    async fn every_replica_not_a_member_has_its_share_in_reserve() {
        let store = MemStore::new();
        let cfg = config(6, 3);
        let a = replica(&store, &cfg).await;
        assert_eq!(store.members(), std::slice::from_ref(&a.replica));

        // Alone, A may use N less two absent replicas' shares of 2.
        let t0 = Instant::now();
        let tasks = (0..3).map(|flow| spawn_take(&a, flow, t0 + HOUR)).collect();
        let at = granted(tasks, t0).await;
        assert_eq!(at[..2], [Duration::ZERO; 2]);
        assert!(at[2] >= SPAN && at[2] <= SPAN + POLL_CAP, "{at:?}");

        // With B, one share stays in reserve.
        tokio::time::sleep(ms(3000)).await;
        let b = replica(&store, &cfg).await;
        let t1 = Instant::now();
        let tasks = (0..5)
            .map(|flow| spawn_take(if flow < 3 { &a } else { &b }, flow, t1 + HOUR))
            .collect();
        let at = granted(tasks, t1).await;
        assert_eq!(at[..4], [Duration::ZERO; 4]);
        assert!(at[4] >= SPAN, "{at:?}");

        // With C, none.
        tokio::time::sleep(ms(3000)).await;
        let c = replica(&store, &cfg).await;
        let t2 = Instant::now();
        let tasks = (0..6)
            .map(|flow| spawn_take([&a, &b, &c][flow as usize % 3], flow, t2 + HOUR))
            .collect();
        assert_eq!(granted(tasks, t2).await, [Duration::ZERO; 6]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_cut_off_grants_locally_only_once_its_membership_and_slots_expired() {
        let store = MemStore::new();
        let cfg = config(6, 3);
        let a = replica(&store, &cfg).await;
        let t0 = Instant::now();
        let in_flight = a.acquire(KEY, 1, t0 + HOUR).await.expect("a slot");
        tokio::time::sleep(ms(500)).await;

        a.store.cut(true);
        let member_until = store.member_until(&a.replica).expect("a member");
        let first = spawn_take(&a, 2, t0 + HOUR);
        until("A falls back", || a.degraded()).await;
        let first = first
            .await
            .expect("the task ran")
            .expect("a fallback grant");
        assert!(first >= member_until + SPAN, "{:?}", first - t0);

        // A request sent under Redis and completed under the fallback holds it W + M.
        a.release(KEY, in_flight);
        let next = take(&a, 3, t0 + HOUR).await.expect("a fallback grant");
        assert_eq!(next, first + SPAN);
        // The fallback's budget is N / replicas.
        let burst = (4..8).map(|flow| spawn_take(&a, flow, t0 + HOUR)).collect();
        let at = granted(burst, next).await;
        assert_eq!(at, [ms(0), SPAN, SPAN, SPAN * 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn back_on_redis_a_replica_takes_slots_at_once_and_registers_once_its_fallback_freed() {
        let store = MemStore::new();
        let cfg = config(6, 3);
        let a = replica(&store, &cfg).await;
        let _b = replica(&store, &cfg).await;
        a.store.cut(true);
        until("A falls back", || a.degraded()).await;
        let fallback = take(&a, 1, Instant::now() + HOUR)
            .await
            .expect("a fallback grant");

        a.store.cut(false);
        until("A shares again", || !a.degraded()).await;
        assert_eq!(store.members().len(), 1, "only B is a member");
        // A takes from Redis at once, as a non-member: its reserve covers its fallback slot.
        let t = Instant::now();
        assert_eq!(take(&a, 2, t + HOUR).await, Ok(t));
        assert_eq!(store.taken(KEY), 1);
        // It registers only once its fallback slot has freed.
        let joined = until("A registers", || store.members().contains(&a.replica)).await;
        assert!(joined >= fallback + SPAN, "{:?}", joined - fallback);
        assert!(joined <= fallback + SPAN + HEARTBEAT + ms(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_registration_that_waited_behind_a_stalled_redis_past_its_deadline_is_refused() {
        let store = MemStore::new();
        let a = replica(&store, &config(6, 3)).await;
        let t0 = Instant::now();
        // A short stall: the registration sent at 1.2 s waits until 1.3 s, and still counts.
        tokio::time::sleep_until(t0 + ms(1010)).await;
        store.stall();
        tokio::time::sleep_until(t0 + ms(1300)).await;
        store.resume();
        assert_eq!(
            store.member_until(&a.replica),
            Some(t0 + ms(1300) + MEMBER_TTL)
        );
        assert!(!a.degraded());

        // A long one: A gives up on the next registration and falls back; when Redis runs it,
        // far past its deadline, it is refused.
        store.stall();
        until("A falls back", || a.degraded()).await;
        tokio::time::sleep_until(t0 + ms(5000)).await;
        store.resume();
        assert_eq!(
            store.member_until(&a.replica),
            Some(t0 + ms(1300) + MEMBER_TTL)
        );
        assert!(store.members().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_take_given_up_behind_a_stalled_redis_gives_its_slot_back_when_it_runs() {
        let store = MemStore::new();
        let a = replica(&store, &config(6, 3)).await;
        let t0 = Instant::now();
        store.stall();
        let waiting = spawn_take(&a, 1, t0 + HOUR);
        until("A falls back", || a.degraded()).await;
        // Resumed while A is still a member: the late take is granted, and given back at once.
        tokio::time::sleep_until(t0 + ms(800)).await;
        store.resume();
        assert_eq!(store.taken(KEY), 0);
        assert!(
            waiting.await.expect("the task ran").is_ok(),
            "served by the fallback"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_or_block_seen_by_one_replica_holds_the_others() {
        let store = MemStore::new();
        let cfg = config(6, 2);
        let (a, b) = (replica(&store, &cfg).await, replica(&store, &cfg).await);
        let t0 = Instant::now();
        a.pause(KEY, t0 + ms(2000));
        // A honours it at once: a deadline inside it fails without waiting.
        let doomed = take(&a, 1, t0 + ms(1500)).await;
        assert!(
            matches!(doomed, Err(LimitError::Timeout { .. })),
            "{doomed:?}"
        );

        // B learns it from Redis on its first take, and waits it out.
        let waiting = spawn_take(&b, 2, t0 + HOUR);
        until("B sees the pause", || {
            b.snapshot(KEY).paused_until.is_some()
        })
        .await;
        let doomed = take(&b, 3, t0 + ms(1500)).await;
        assert!(
            matches!(doomed, Err(LimitError::Timeout { .. })),
            "{doomed:?}"
        );
        let at = waiting.await.expect("the task ran").expect("a grant");
        assert!(at >= t0 + ms(2000), "{:?}", at - t0);

        let t1 = Instant::now();
        a.block(KEY, t1 + ms(10_000));
        tokio::time::sleep(ms(1)).await;
        let blocked = take(&b, 4, t1 + HOUR).await;
        assert!(
            matches!(blocked, Err(LimitError::Blocked { .. })),
            "{blocked:?}"
        );
        assert!(b.snapshot(KEY).blocked_until.is_some());
        assert!(matches!(
            take(&b, 5, t1 + HOUR).await,
            Err(LimitError::Blocked { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_holds_more_than_n_across_outages_stalls_and_recoveries() {
        for seed in 1..=4u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let store = MemStore::new();
            let cfg = config(6, 3);
            let mut replicas = Vec::new();
            for _ in 0..3 {
                replicas.push(replica(&store, &cfg).await);
            }
            let t0 = Instant::now();
            let grants = Arc::new(Mutex::new(Vec::new()));
            let tasks: Vec<_> = (0..400)
                .map(|_| {
                    let r = replicas[rng.below(3) as usize].clone();
                    let (flow, grants) = (rng.below(5), grants.clone());
                    let arrive = t0 + ms(rng.below(30_000));
                    let deadline = arrive + ms(rng.below(5_000));
                    tokio::spawn(async move {
                        tokio::time::sleep_until(arrive).await;
                        if let Ok(at) = take(&r, flow, deadline).await {
                            assert!(at < deadline, "granted at or after the deadline");
                            grants
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(at);
                        }
                    })
                })
                .collect();
            // One replica cut off, then all of them, then Redis back, then a stall.
            let cut =
                |which: &[usize], cut: bool| which.iter().for_each(|i| replicas[*i].store.cut(cut));
            tokio::time::sleep_until(t0 + ms(5_000)).await;
            cut(&[0], true);
            tokio::time::sleep_until(t0 + ms(10_000)).await;
            cut(&[1, 2], true);
            tokio::time::sleep_until(t0 + ms(15_000)).await;
            cut(&[0, 1, 2], false);
            tokio::time::sleep_until(t0 + ms(20_000)).await;
            store.stall();
            tokio::time::sleep_until(t0 + ms(22_000)).await;
            store.resume();
            for t in tasks {
                t.await.expect("the task ran");
            }
            let mut grants = grants
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            grants.sort();
            assert!(grants.len() > 100, "seed {seed}: {} grants", grants.len());
            assert_at_most_n_per_window(&grants, 6, Duration::from_secs(1));
            assert!(replicas.iter().all(|r| !r.degraded()));
        }
    }
}
