//! The upstream limiter shared by every replica through Redis: the same guarantee as
//! [`LocalLimiter`] — at most `N` upstream requests arriving in any window `W` — for the whole
//! deployment instead of one process.
//!
//! # Slots in Redis
//!
//! Each key (upstream origin) has a sorted set of taken slots, member = slot id, score = the
//! Redis-time instant (ms) at which the slot frees. A grant adds a slot scored with a **lease**
//! (an upper bound on one request, e.g. upstream timeout + `W`), so a replica that crashes with
//! requests in flight does not hold its slots forever; a release re-scores the slot to
//! release time + `W + M`. Why a slot is held until `W + M` after completion (not after the
//! grant) is explained in [`crate::upstream::limiter`]; nothing changes here.
//!
//! Taking, releasing and extending a pause are each one Lua script: Redis runs a script
//! atomically, so "prune freed slots, count, grant if fewer than N" cannot interleave with
//! another replica's grant. Scripts read the time with `TIME`: only Redis's clock decides when a
//! slot frees, so replicas with skewed clocks still agree. A take asks for as many slots as this
//! replica has waiters (up to `N`), so a fan-out's burst costs one round trip.
//!
//! # Waiting and fairness
//!
//! Waiters of one key queue locally, FIFO per flow and round-robin across flows as in
//! [`LocalLimiter`]. Only the head asks Redis, one take at a time per key and replica; the take
//! runs on its own task and hands the slots it won to the waiters in the fair order, so a waiter
//! dropped mid-call costs no slot (unused slots are removed again). When Redis says the window
//! is full it also says when the next slot frees; the head sleeps until then, capped at
//! [`POLL_CAP`] because another replica's release can free one earlier.
//!
//! # Pauses and blocks
//!
//! `pause` and `block` are written to Redis (`SET … PX`, extended only) so that a `429` seen by
//! one replica pauses all of them; the take script refuses to grant while either is in force and
//! returns how long they last. A local mirror (the fallback limiter's own pause and block) is set
//! at once, so this replica honours them even before Redis has them, and feeds `snapshot`.
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
//!   on Redis's clock (measured with `TIME`), [`REGISTER_VALID`] after it was sent, and the
//!   script refuses it past that. The fallback's wait counts registrations still on their way.
//!
//! What remains unguarded is another replica's request that was granted by Redis just before
//! the outage and reaches Kommo more than `M` after it: the same margin the single-process
//! limiter relies on for in-flight arrivals. A deployment running fewer replicas than
//! `replicas` says keeps the missing ones' reserve unused: configure the real count.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use fair::{FairQueue, WaiterId};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::Script;
use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::timed;
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
/// While a pause is in force the head still looks at Redis this often, to see a block.
const PAUSE_POLL: Duration = Duration::from_millis(1000);
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
    shared: Arc<Shared>,
}

/// The numbers every decision uses, fixed at construction.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// `N`.
    requests: u32,
    /// `W + M`, in ms for the scripts.
    span: Duration,
    /// The in-flight lease, at least `span`.
    lease: Duration,
    /// Configured replica count, at least 1.
    replicas: u32,
    /// `N / replicas`, at least 1: the fallback's budget and each absent replica's reserve.
    share: u32,
}

struct Shared {
    /// Reconnects by itself; cloned per call (a handle onto one multiplexed connection).
    conn: ConnectionManager,
    /// Prepended to every key.
    prefix: String,
    limits: Limits,
    /// This replica's id in slot ids and the membership set; random per process.
    replica: String,
    /// Serves while Redis is unreachable, and mirrors pauses and blocks meanwhile.
    fallback: LocalLimiter,
    /// Mirrors `state.mode == Fallback` for a lock-free `degraded()`.
    degraded: AtomicBool,
    /// Source of slot numbers (unique per replica; the replica id makes them global).
    next_slot: AtomicU64,
    /// All mutable state behind one blocking mutex: every critical section is short and never
    /// spans an await (as in `LocalLimiter`), and keys are few.
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Redis answers and this replica is a member: slots come from Redis.
    Shared,
    /// Redis answers again but the fallback's slots have not all freed: slots come from Redis,
    /// and this replica stays out of the membership set so its reserve covers those slots.
    Recovering,
    /// Redis does not answer: slots come from the fallback.
    Fallback,
}

struct State {
    mode: Mode,
    /// When the current (or last) fallback period began.
    degraded_since: Option<Instant>,
    /// A bound on when this replica's membership in Redis expires, counting registrations
    /// still on their way (they take effect within [`REGISTER_VALID`] of being sent, or never).
    member_until: Option<Instant>,
    /// Redis's clock against this host's (Unix ms, Redis minus local) and the error of that
    /// estimate, from the last `TIME`: what a registration's deadline is written in.
    clock: Option<(i64, u64)>,
    /// Fallback acquires in progress plus fallback grants not yet released.
    fallback_active: usize,
    /// When the last fallback grant was released.
    fallback_last_release: Option<Instant>,
    /// Every grant handed out and not yet released, by this limiter's grant id.
    held: HashMap<GrantId, Held>,
    next_grant: GrantId,
    keys: HashMap<String, KeyQueue>,
    next_waiter: WaiterId,
}

/// Where a grant's slot lives.
enum Held {
    /// A slot in Redis, by its member name in the key's sorted set.
    Redis { key: String, slot: String },
    /// A grant of the fallback limiter.
    Fallback(GrantId),
}

/// The local queue of one key, in front of Redis.
#[derive(Default)]
struct KeyQueue {
    /// Queued waiters in fair order.
    queue: FairQueue,
    /// Queued waiters and decided ones whose future has not taken the outcome yet.
    waiters: HashMap<WaiterId, Waiter>,
    /// A take for this key is running: the head waits for it instead of starting another.
    driving: bool,
    /// Do not ask Redis again before this (the window is full or a pause is in force).
    retry_at: Option<Instant>,
    /// Slots taken in Redis as of the last take, for snapshots.
    in_window: usize,
    /// When this replica last released a Redis slot of this key, so the fallback waits for it.
    last_redis_release: Option<Instant>,
}

struct Waiter {
    flow: FlowId,
    deadline: Instant,
    /// Wakes the waiting future; `notify_one` keeps a permit, so no wake-up is lost.
    notify: Arc<Notify>,
    outcome: Option<Result<GrantId, LimitError>>,
}

/// What a take script returned.
#[derive(Debug, Clone, Copy)]
struct TakeReply {
    granted: u64,
    /// Until the next slot can free, when the window is full.
    wait: Duration,
    paused: Duration,
    blocked: Duration,
    /// Slots taken after this take.
    taken: u64,
}

/// Grants `want` slots if the window (less the absent replicas' reserve) allows, unless a block
/// or pause is in force. KEYS: slots, pause, block, members. ARGV: N, span ms, lease ms, want,
/// replicas, share, slot-id prefix, first slot number.
/// Returns {granted, wait ms, pause ms, block ms, taken}.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local block_ms = math.max(0, tonumber(redis.call('GET', KEYS[3]) or '0') - now)
local pause_ms = math.max(0, tonumber(redis.call('GET', KEYS[2]) or '0') - now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local taken = redis.call('ZCARD', KEYS[1])
if block_ms > 0 or pause_ms > 0 then
  return {0, 0, pause_ms, block_ms, taken}
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local missing = math.max(0, tonumber(ARGV[5]) - redis.call('ZCARD', KEYS[4]))
local cap = math.max(1, tonumber(ARGV[1]) - missing * tonumber(ARGV[6]))
local span = tonumber(ARGV[2])
local lease = now + tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local first = tonumber(ARGV[8])
local granted = 0
while granted < want and taken < cap do
  redis.call('ZADD', KEYS[1], lease, ARGV[7] .. (first + granted))
  granted = granted + 1
  taken = taken + 1
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + span)
local wait_ms = 0
if taken >= cap then
  wait_ms = span
  local nth = redis.call('ZRANGE', KEYS[1], taken - cap, taken - cap, 'WITHSCORES')
  if nth[2] then
    wait_ms = math.max(1, math.min(span, tonumber(nth[2]) - now))
  end
end
return {granted, wait_ms, pause_ms, block_ms, taken}
",
    )
});

/// A request completed: its slot frees `W + M` from now (Redis time). KEYS: slots. ARGV: slot,
/// span ms. `XX`: a slot whose lease already ran out is not brought back.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
",
    )
});

/// Extends (never shortens) a pause or block to `ARGV[1]` ms from now. KEYS: the pause or block.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[1])
if now + ms > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], now + ms, 'PX', ms)
end
return 1
",
    )
});

/// Registers this replica as a member for `ARGV[2]` ms, unless Redis's clock is past
/// `ARGV[3]` (then -1: a registration that waited behind a stall is refused). KEYS: members.
/// ARGV: id, ttl ms, deadline (Unix ms).
static HEARTBEAT_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > tonumber(ARGV[3]) then
  return -1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
",
    )
});

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// This host's clock, Unix ms.
fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// === impl RedisLimiter ===

impl RedisLimiter {
    /// A limiter sharing `cfg.limiter` through the Redis at `cfg.url`.
    ///
    /// Fails on a URL that can never work. An unreachable Redis is not an error: the limiter
    /// starts degraded (on its fallback) and switches to Redis when it answers.
    pub async fn connect(cfg: RedisLimiterConfig) -> Result<RedisLimiter, String> {
        let conn = super::connection(&cfg.url)?;
        let requests = cfg.limiter.requests.max(1);
        let replicas = cfg.replicas.max(1);
        let share = (requests / replicas).max(1);
        let span = cfg.limiter.window.saturating_add(cfg.limiter.margin);
        let limits = Limits {
            requests,
            span,
            lease: cfg.lease.max(span),
            replicas,
            share,
        };
        let fallback = LocalLimiter::new(LimiterConfig {
            requests: share,
            ..cfg.limiter
        });
        let now = Instant::now();
        let shared = Arc::new(Shared {
            conn,
            prefix: cfg.key_prefix,
            limits,
            replica: replica_id(),
            fallback,
            degraded: AtomicBool::new(true),
            next_slot: AtomicU64::new(0),
            state: Mutex::new(State {
                mode: Mode::Fallback,
                degraded_since: Some(now),
                member_until: None,
                clock: None,
                fallback_active: 0,
                fallback_last_release: None,
                held: HashMap::new(),
                next_grant: 0,
                keys: HashMap::new(),
                next_waiter: 0,
            }),
        });
        // Join at once when Redis answers, so the first requests already share the budget.
        match shared.register().await {
            Ok(()) => {
                let mut st = shared.lock();
                st.mode = Mode::Shared;
                st.degraded_since = None;
                shared.degraded.store(false, Ordering::Release);
                info!(
                    replica = %shared.replica,
                    requests, replicas, "shared upstream limiter on Redis"
                );
            }
            Err(e) => error!(
                error = %e,
                fallback_requests = share,
                "Redis is unreachable at start: the upstream limiter runs locally at N / replicas until it answers"
            ),
        }
        tokio::spawn(heartbeat(Arc::downgrade(&shared)));
        Ok(RedisLimiter { shared })
    }

    /// Whether Redis is unreachable and this replica limits itself locally at `N / replicas`.
    pub fn degraded(&self) -> bool {
        self.shared.degraded.load(Ordering::Acquire)
    }

    /// This replica's id in Redis (slot ids, membership).
    pub fn replica_id(&self) -> &str {
        &self.shared.replica
    }
}

/// A random id for this process: no two replicas (or restarts) may share slot ids.
fn replica_id() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    format!("{:016x}", h.finish())
}

impl UpstreamLimiter for RedisLimiter {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        flow: FlowId,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<GrantId, LimitError>> {
        Box::pin(self.shared.acquire(key, flow, deadline))
    }

    fn release(&self, key: &str, grant: GrantId) {
        Shared::release(&self.shared, key, grant);
    }

    fn pause(&self, key: &str, until: Instant) {
        Shared::pause(&self.shared, key, until);
    }

    fn block(&self, key: &str, until: Instant) {
        Shared::block(&self.shared, key, until);
    }

    fn snapshot(&self, key: &str) -> LimiterSnapshot {
        let local = self.shared.fallback.snapshot(key);
        let st = self.shared.lock();
        let (queued, in_window) = st
            .keys
            .get(key)
            .map_or((0, 0), |kq| (kq.queue.len(), kq.in_window));
        LimiterSnapshot {
            queued: queued + local.queued,
            in_window: if st.mode == Mode::Fallback {
                local.in_window
            } else {
                in_window
            },
            paused_until: local.paused_until,
            blocked_until: local.blocked_until,
            waiting_for_predecessor: false,
        }
    }
}

// === impl Shared ===

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update is a few field writes; a panic elsewhere leaves nothing half-granted.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slots_key(&self, key: &str) -> String {
        format!("{}limiter:{key}:slots", self.prefix)
    }

    fn pause_key(&self, key: &str) -> String {
        format!("{}limiter:{key}:pause", self.prefix)
    }

    fn block_key(&self, key: &str) -> String {
        format!("{}limiter:{key}:block", self.prefix)
    }

    fn members_key(&self) -> String {
        format!("{}limiter:members", self.prefix)
    }

    async fn acquire(
        self: &Arc<Self>,
        key: &str,
        flow: FlowId,
        deadline: Instant,
    ) -> Result<GrantId, LimitError> {
        // The local mirror first: a block or pause seen here holds before Redis has it.
        let now = Instant::now();
        if let Some(until) = self.fallback.snapshot(key).blocked_until {
            return Err(LimitError::Blocked {
                retry_after: until.saturating_duration_since(now),
            });
        }
        loop {
            if self.lock().mode == Mode::Fallback {
                return self.acquire_fallback(key, flow, deadline).await;
            }
            if let Some(result) = self.acquire_shared(key, flow, deadline).await {
                return result;
            }
            // Redis failed while this waiter queued: go again, on the fallback.
        }
    }

    /// Waits in the local fair queue; the head drives takes from Redis. `None` when Redis
    /// became unreachable before this waiter was served.
    async fn acquire_shared(
        self: &Arc<Self>,
        key: &str,
        flow: FlowId,
        deadline: Instant,
    ) -> Option<Result<GrantId, LimitError>> {
        let notify = Arc::new(Notify::new());
        let id = {
            let mut st = self.lock();
            if st.mode == Mode::Fallback {
                return None;
            }
            let id = st.next_waiter;
            st.next_waiter += 1;
            key_queue(&mut st.keys, key).enqueue(id, flow, deadline, notify.clone());
            id
        };
        let mut guard = QueueGuard {
            shared: self,
            key,
            id,
            armed: true,
        };
        loop {
            let wake_at = {
                let mut st = self.lock();
                let mode = st.mode;
                let kq = key_queue(&mut st.keys, key);
                if let Some(outcome) = kq.waiters.get_mut(&id).and_then(|w| w.outcome.take()) {
                    kq.waiters.remove(&id);
                    guard.armed = false;
                    return Some(outcome);
                }
                let now = Instant::now();
                if mode == Mode::Fallback || now >= deadline {
                    let head = kq.head();
                    kq.withdraw(id);
                    if head == Some(id) {
                        kq.notify_head();
                    }
                    guard.armed = false;
                    return (mode != Mode::Fallback).then(|| Err(kq.timeout(now, self.limits)));
                }
                if kq.head() == Some(id) && !kq.driving {
                    let paused = self.fallback.snapshot(key).paused_until;
                    match kq.retry_at.max(paused).filter(|at| *at > now) {
                        Some(at) => at.min(deadline),
                        None => {
                            kq.driving = true;
                            kq.retry_at = None;
                            let want = kq.queue.len().min(self.limits.requests as usize).max(1);
                            self.spawn_take(key.to_owned(), want as u64);
                            deadline
                        }
                    }
                } else {
                    deadline
                }
            };
            tokio::select! {
                () = notify.notified() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// One take on its own task, so its outcome reaches the queue even if the head that asked
    /// is dropped meanwhile.
    fn spawn_take(self: &Arc<Self>, key: String, want: u64) {
        let shared = self.clone();
        let first = self.next_slot.fetch_add(want, Ordering::Relaxed);
        tokio::spawn(async move {
            let lim = shared.limits;
            let mut conn = shared.conn.clone();
            let reply: Result<Vec<u64>, String> = timed(
                TAKE.key(shared.slots_key(&key))
                    .key(shared.pause_key(&key))
                    .key(shared.block_key(&key))
                    .key(shared.members_key())
                    .arg(lim.requests)
                    .arg(millis(lim.span))
                    .arg(millis(lim.lease))
                    .arg(want)
                    .arg(lim.replicas)
                    .arg(lim.share)
                    .arg(format!("{}:", shared.replica))
                    .arg(first)
                    .invoke_async(&mut conn),
            )
            .await;
            let reply = reply.and_then(|v| match v[..] {
                [granted, wait, paused, blocked, taken] => Ok(TakeReply {
                    granted: granted.min(want),
                    wait: Duration::from_millis(wait),
                    paused: Duration::from_millis(paused),
                    blocked: Duration::from_millis(blocked),
                    taken,
                }),
                _ => Err(format!("unexpected reply from the take script: {v:?}")),
            });
            match reply {
                Ok(reply) => shared.took(&key, first, reply),
                Err(e) => {
                    {
                        let mut st = shared.lock();
                        let kq = key_queue(&mut st.keys, &key);
                        kq.driving = false;
                    }
                    shared.degrade(&e);
                }
            }
        });
    }

    /// Hands the slots a take won to the waiters in the fair order, and mirrors what Redis
    /// said about pauses and blocks.
    fn took(self: &Arc<Self>, key: &str, first: u64, reply: TakeReply) {
        let now = Instant::now();
        // The mirror lives in the fallback limiter; only touch it when Redis knows more, so a
        // block seen on every poll is not logged on every poll.
        let local = self.fallback.snapshot(key);
        let paused_until = (!reply.paused.is_zero()).then(|| now + reply.paused);
        let blocked_until = (!reply.blocked.is_zero()).then(|| now + reply.blocked);
        if let Some(until) = paused_until {
            if local
                .paused_until
                .is_none_or(|p| p + Duration::from_millis(5) < until)
            {
                self.fallback.pause(key, until);
            }
        }
        if let Some(until) = blocked_until {
            if local
                .blocked_until
                .is_none_or(|b| b + Duration::from_millis(5) < until)
            {
                self.fallback.block(key, until);
            }
        }
        let mut unused = Vec::new();
        {
            let mut st = self.lock();
            let State {
                held,
                next_grant,
                keys,
                ..
            } = &mut *st;
            let kq = key_queue(keys, key);
            kq.driving = false;
            kq.in_window = usize::try_from(reply.taken).unwrap_or(usize::MAX);
            if let Some(until) = blocked_until {
                kq.fail_all(LimitError::Blocked {
                    retry_after: until - now,
                });
            }
            for i in 0..reply.granted {
                let slot = format!("{}:{}", self.replica, first + i);
                loop {
                    let Some(id) = kq.pop_next() else {
                        unused.push(slot);
                        break;
                    };
                    let Some(w) = kq.waiters.get_mut(&id) else {
                        continue;
                    };
                    if now >= w.deadline {
                        w.outcome = Some(Err(LimitError::Timeout {
                            retry_after: self.limits.span,
                        }));
                        w.notify.notify_one();
                        continue;
                    }
                    let grant = *next_grant;
                    *next_grant += 1;
                    held.insert(
                        grant,
                        Held::Redis {
                            key: key.to_owned(),
                            slot,
                        },
                    );
                    w.outcome = Some(Ok(grant));
                    w.notify.notify_one();
                    break;
                }
            }
            // No slot before `free`: waiters whose deadline comes first cannot be served.
            let free = paused_until.or((!reply.wait.is_zero()).then(|| now + reply.wait));
            if let Some(free) = free {
                kq.fail_doomed(free, self.limits);
            }
            kq.retry_at = match paused_until {
                Some(until) => Some(until.min(now + PAUSE_POLL)),
                None => (!reply.wait.is_zero()).then(|| now + reply.wait.min(POLL_CAP)),
            };
            kq.notify_head();
        }
        for slot in unused {
            self.spawn_return(key, slot);
        }
    }

    /// Gives back a slot whose request was never sent: it frees at once.
    fn spawn_return(self: &Arc<Self>, key: &str, slot: String) {
        let shared = self.clone();
        let slots = self.slots_key(key);
        spawn(async move {
            let mut conn = shared.conn.clone();
            let r: Result<i64, String> = timed(
                ::redis::cmd("ZREM")
                    .arg(&slots)
                    .arg(&slot)
                    .query_async(&mut conn),
            )
            .await;
            if let Err(e) = r {
                // The lease frees it; meanwhile the budget is smaller, never larger.
                debug!(error = %e, "could not return an unused slot to Redis");
            }
        });
    }

    async fn acquire_fallback(
        self: &Arc<Self>,
        key: &str,
        flow: FlowId,
        deadline: Instant,
    ) -> Result<GrantId, LimitError> {
        let hold = {
            let mut st = self.lock();
            st.fallback_active += 1;
            let last_release = st.keys.get(key).and_then(|kq| kq.last_redis_release);
            [st.degraded_since, st.member_until, last_release]
                .into_iter()
                .flatten()
                .max()
                .map(|t| t + self.limits.span)
        };
        let mut active = ActiveGuard {
            shared: self,
            armed: true,
        };
        if let Some(hold) = hold.filter(|h| *h > Instant::now()) {
            // Until the others see this replica gone and its Redis slots have freed, it may
            // not grant locally: a pause of the fallback is exactly that wait.
            self.fallback.pause(key, hold);
        }
        let grant = self.fallback.acquire(key, flow, deadline).await?;
        let mut st = self.lock();
        let id = st.next_grant;
        st.next_grant += 1;
        st.held.insert(id, Held::Fallback(grant));
        // The grant keeps the fallback active until it is released.
        active.armed = false;
        Ok(id)
    }

    fn release(self: &Arc<Self>, key: &str, grant: GrantId) {
        let now = Instant::now();
        let (held, mode) = {
            let mut st = self.lock();
            let held = st.held.remove(&grant);
            match &held {
                Some(Held::Fallback(_)) => {
                    st.fallback_active = st.fallback_active.saturating_sub(1);
                    st.fallback_last_release = Some(now);
                }
                Some(Held::Redis { key, .. }) => {
                    key_queue(&mut st.keys, key).last_redis_release = Some(now);
                }
                None => {}
            }
            (held, st.mode)
        };
        match held {
            Some(Held::Fallback(g)) => self.fallback.release(key, g),
            Some(Held::Redis { key, slot }) => {
                if mode == Mode::Fallback {
                    // Sent under Redis, completed under the fallback: the fallback waits for it.
                    self.fallback.pause(&key, now + self.limits.span);
                }
                let shared = self.clone();
                spawn(async move {
                    let mut conn = shared.conn.clone();
                    let r: Result<i64, String> = timed(
                        RELEASE
                            .key(shared.slots_key(&key))
                            .arg(&slot)
                            .arg(millis(shared.limits.span))
                            .invoke_async(&mut conn),
                    )
                    .await;
                    if let Err(e) = r {
                        // The slot keeps its lease: the budget shrinks until it ends, never grows.
                        debug!(error = %e, "could not release a slot in Redis");
                    }
                });
            }
            None => {}
        }
    }

    fn pause(self: &Arc<Self>, key: &str, until: Instant) {
        let now = Instant::now();
        self.fallback.pause(key, until);
        {
            let mut st = self.lock();
            let kq = key_queue(&mut st.keys, key);
            kq.fail_doomed(until, self.limits);
            kq.notify_head();
        }
        self.spawn_extend(self.pause_key(key), until.saturating_duration_since(now));
    }

    fn block(self: &Arc<Self>, key: &str, until: Instant) {
        let now = Instant::now();
        self.fallback.block(key, until);
        {
            let mut st = self.lock();
            let kq = key_queue(&mut st.keys, key);
            kq.fail_all(LimitError::Blocked {
                retry_after: until.saturating_duration_since(now),
            });
            kq.notify_head();
        }
        self.spawn_extend(self.block_key(key), until.saturating_duration_since(now));
    }

    /// Shares a pause or block with every replica.
    fn spawn_extend(self: &Arc<Self>, redis_key: String, d: Duration) {
        let ms = millis(d);
        if ms == 0 {
            return;
        }
        let shared = self.clone();
        spawn(async move {
            let mut conn = shared.conn.clone();
            let r: Result<i64, String> =
                timed(EXTEND.key(&redis_key).arg(ms).invoke_async(&mut conn)).await;
            if let Err(e) = r {
                warn!(error = %e, key = %redis_key, "could not share a pause or block through Redis");
                shared.degrade(&e);
            }
        });
    }

    /// Renews (or takes) this replica's membership, valid only if it reaches Redis within
    /// [`REGISTER_VALID`].
    async fn register(&self) -> Result<(), String> {
        if self.lock().clock.is_none() {
            self.read_clock().await?;
        }
        let deadline = {
            let mut st = self.lock();
            let (offset, error) = st.clock.unwrap_or_default();
            // Before it is sent: from now on the membership may last this long, answered or not.
            let bound = Instant::now() + REGISTER_VALID + MEMBER_TTL + Duration::from_millis(error);
            st.member_until = Some(st.member_until.map_or(bound, |m| m.max(bound)));
            unix_millis() + offset + i64::try_from(millis(REGISTER_VALID)).unwrap_or(i64::MAX)
        };
        let mut conn = self.conn.clone();
        let members: i64 = timed(
            HEARTBEAT_SCRIPT
                .key(self.members_key())
                .arg(&self.replica)
                .arg(millis(MEMBER_TTL))
                .arg(deadline)
                .invoke_async(&mut conn),
        )
        .await?;
        if members < 0 {
            // Slow, or the clocks moved: measure again before the next try.
            self.lock().clock = None;
            return Err("a registration reached Redis past its deadline".into());
        }
        Ok(())
    }

    /// Reads Redis's `TIME`: proves Redis answers, and measures its clock against this host's.
    async fn read_clock(&self) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let sent = unix_millis();
        let (secs, micros): (i64, i64) = timed(::redis::cmd("TIME").query_async(&mut conn)).await?;
        let received = unix_millis();
        let redis_ms = secs * 1000 + micros / 1000;
        let offset = redis_ms - (sent + received) / 2;
        let error = u64::try_from((received - sent) / 2 + 1).unwrap_or(u64::MAX);
        self.lock().clock = Some((offset, error));
        Ok(())
    }

    /// Redis failed: switch to the fallback (once) and move every waiter there.
    fn degrade(&self, why: &str) {
        let mut st = self.lock();
        if st.mode == Mode::Fallback {
            return;
        }
        st.mode = Mode::Fallback;
        st.degraded_since = Some(Instant::now());
        self.degraded.store(true, Ordering::Release);
        error!(
            error = why,
            fallback_requests = self.limits.share,
            replicas = self.limits.replicas,
            "Redis is unreachable: the upstream limiter falls back to a local one at N / replicas until it answers"
        );
        for kq in st.keys.values_mut() {
            for w in kq.waiters.values() {
                w.notify.notify_one();
            }
        }
    }

    /// Whether no fallback slot can still be counting: none held or being acquired, and the
    /// last released `W + M` ago.
    fn fallback_drained(&self, st: &State, now: Instant) -> bool {
        st.fallback_active == 0
            && st
                .fallback_last_release
                .is_none_or(|r| now >= r + self.limits.span)
    }

    /// One round of the background task: renew the membership, or probe Redis and move back.
    async fn beat(&self) {
        let (mode, drained) = {
            let st = self.lock();
            (st.mode, self.fallback_drained(&st, Instant::now()))
        };
        match mode {
            Mode::Fallback => {
                if self.read_clock().await.is_ok() {
                    let mut st = self.lock();
                    if st.mode == Mode::Fallback {
                        st.mode = Mode::Recovering;
                        self.degraded.store(false, Ordering::Release);
                        info!("Redis answers again: the upstream limiter is shared again");
                    }
                }
            }
            Mode::Recovering if !drained => {
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
async fn heartbeat(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.beat().await;
    }
}

/// Spawns on the current runtime; outside one (a release from a drop at shutdown) the work is
/// skipped, which only keeps a slot until its lease ends.
fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(task);
    }
}

/// The queue of `key`, created on first use.
fn key_queue<'m>(keys: &'m mut HashMap<String, KeyQueue>, key: &str) -> &'m mut KeyQueue {
    if !keys.contains_key(key) {
        keys.insert(key.to_owned(), KeyQueue::default());
    }
    keys.get_mut(key)
        .expect("the key queue was inserted just above")
}

/// Withdraws a queued waiter whose future is dropped, returning a slot it won but never saw.
struct QueueGuard<'a> {
    shared: &'a Arc<Shared>,
    key: &'a str,
    id: WaiterId,
    armed: bool,
}

impl Drop for QueueGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let unused = {
            let mut st = self.shared.lock();
            let State { held, keys, .. } = &mut *st;
            let kq = key_queue(keys, self.key);
            let head = kq.head();
            let outcome = kq.waiters.get_mut(&self.id).and_then(|w| w.outcome.take());
            kq.withdraw(self.id);
            if head == Some(self.id) {
                kq.notify_head();
            }
            match outcome {
                Some(Ok(grant)) => match held.remove(&grant) {
                    Some(Held::Redis { slot, .. }) => Some(slot),
                    _ => None,
                },
                _ => None,
            }
        };
        if let Some(slot) = unused {
            self.shared.spawn_return(self.key, slot);
        }
    }
}

/// Counts a fallback acquire as active until it is granted (then the grant counts) or dropped.
struct ActiveGuard<'a> {
    shared: &'a Shared,
    armed: bool,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.shared.lock();
            st.fallback_active = st.fallback_active.saturating_sub(1);
        }
    }
}

// === impl KeyQueue ===

impl KeyQueue {
    fn head(&self) -> Option<WaiterId> {
        self.queue.head()
    }

    fn notify_head(&self) {
        if let Some(w) = self.head().and_then(|id| self.waiters.get(&id)) {
            w.notify.notify_one();
        }
    }

    fn enqueue(&mut self, id: WaiterId, flow: FlowId, deadline: Instant, notify: Arc<Notify>) {
        self.queue.push(flow, id);
        self.waiters.insert(
            id,
            Waiter {
                flow,
                deadline,
                notify,
                outcome: None,
            },
        );
    }

    /// The next waiter in the fair order, taken out of its flow's queue (its entry stays).
    fn pop_next(&mut self) -> Option<WaiterId> {
        self.queue.pop()
    }

    /// Takes a waiter out of the queue and forgets it.
    fn withdraw(&mut self, id: WaiterId) {
        if let Some(flow) = self.waiters.remove(&id).map(|w| w.flow) {
            self.queue.remove(flow, id);
        }
    }

    fn fail_all(&mut self, err: LimitError) {
        while let Some(id) = self.pop_next() {
            if let Some(w) = self.waiters.get_mut(&id) {
                w.outcome = Some(Err(err.clone()));
                w.notify.notify_one();
            }
        }
    }

    /// Fails the queued waiters whose deadline comes before `free`, the earliest grant.
    fn fail_doomed(&mut self, free: Instant, lim: Limits) {
        let now = Instant::now();
        let doomed: Vec<WaiterId> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.outcome.is_none() && w.deadline <= free)
            .map(|(id, _)| *id)
            .collect();
        for id in doomed {
            let err = self.timeout(now, lim);
            let Some(flow) = self.waiters.get(&id).map(|w| w.flow) else {
                continue;
            };
            self.queue.remove(flow, id);
            if let Some(w) = self.waiters.get_mut(&id) {
                w.outcome = Some(Err(err));
                w.notify.notify_one();
            }
        }
    }

    /// A timeout with a hint: when a request arriving now would likely be served, the queue
    /// ahead of it included.
    fn timeout(&self, now: Instant, lim: Limits) -> LimitError {
        let rounds = u32::try_from(self.queue.len() / lim.requests as usize).unwrap_or(u32::MAX);
        let free = self
            .retry_at
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        LimitError::Timeout {
            retry_after: free.max(lim.span.saturating_mul(rounds.saturating_add(1)) / 2),
        }
    }
}

/// The round-robin queue this limiter keeps in front of Redis.
mod fair {
    use std::collections::{HashMap, VecDeque};

    use crate::upstream::limiter::FlowId;

    /// Identifies one waiter within a limiter.
    pub type WaiterId = u64;

    /// Waiters of one key in fair order.
    #[derive(Debug, Default)]
    pub struct FairQueue {
        /// Flows with waiters, in round-robin order: the front flow is served next.
        rotation: VecDeque<FlowId>,
        /// Each flow's waiters, FIFO. A flow is removed when its queue empties, so the map does not
        /// grow with the number of client requests ever seen.
        flows: HashMap<FlowId, VecDeque<WaiterId>>,
        /// Waiters queued, kept so callers need not sum the queues.
        len: usize,
    }

    impl FairQueue {
        pub fn len(&self) -> usize {
            self.len
        }

        /// The waiter served next.
        pub fn head(&self) -> Option<WaiterId> {
            let flow = self.rotation.front()?;
            self.flows.get(flow)?.front().copied()
        }

        /// Queues `id` at the back of its flow; a flow new to the queue joins the back of the
        /// rotation.
        pub fn push(&mut self, flow: FlowId, id: WaiterId) {
            let queue = self.flows.entry(flow).or_default();
            if queue.is_empty() {
                self.rotation.push_back(flow);
            }
            queue.push_back(id);
            self.len += 1;
        }

        /// Takes the next waiter in the fair order: the front flow's oldest, after which the flow
        /// goes to the back of the rotation if it still waits for more.
        pub fn pop(&mut self) -> Option<WaiterId> {
            while let Some(flow) = self.rotation.pop_front() {
                let Some(queue) = self.flows.get_mut(&flow) else {
                    continue;
                };
                let Some(id) = queue.pop_front() else {
                    self.flows.remove(&flow);
                    continue;
                };
                if queue.is_empty() {
                    self.flows.remove(&flow);
                } else {
                    self.rotation.push_back(flow);
                }
                self.len -= 1;
                return Some(id);
            }
            None
        }

        /// Takes `id` (of `flow`) out of the queue; false if it was not queued.
        pub fn remove(&mut self, flow: FlowId, id: WaiterId) -> bool {
            let Some(queue) = self.flows.get_mut(&flow) else {
                return false;
            };
            let Some(pos) = queue.iter().position(|w| *w == id) else {
                return false;
            };
            queue.remove(pos);
            self.len -= 1;
            if queue.is_empty() {
                self.flows.remove(&flow);
                self.rotation.retain(|f| *f != flow);
            }
            true
        }
    }
}
