//! Where the shared limiter's slots live: the few atomic steps the limiter needs from a store
//! ([`SlotStore`]), and their Redis implementation, each step one Lua script.
//!
//! Per key (upstream origin) a sorted set holds the taken slots, member = slot name, score = the
//! instant (ms, the store's clock) the slot frees. A take adds a slot scored with a lease (an
//! upper bound on one request), so a replica that crashes with requests in flight does not hold
//! its slots forever; a release re-scores it to release time + `W + M`. A pause or block is a
//! key holding its end. Members are a sorted set of replica ids scored by expiry. Redis runs a
//! script atomically, and scripts read the time with `TIME`: only Redis's clock decides when a
//! slot frees, so replicas with skewed clocks still agree.
//!
//! Unit tests use an in-memory stand-in with the same rules ([`mem::MemStore`]).

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{AsyncCommands, FromRedisValue, RedisError, Script, ScriptInvocation};

/// The numbers a take decides with, fixed at construction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `N`, at least 1.
    pub requests: u32,
    /// `W + M`.
    pub span: Duration,
    /// The in-flight lease, at least `span`.
    pub lease: Duration,
    /// Configured replica count, at least 1.
    pub replicas: u32,
    /// `N / replicas`, at least 1: the fallback's budget and each absent replica's reserve.
    pub share: u32,
}

/// What a take found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Take {
    pub granted: bool,
    /// When nothing was granted for a full window: the least time until a slot frees.
    pub wait: Duration,
    /// What is left of a pause (`429`); zero if none.
    pub paused: Duration,
    /// What is left of a block (`403`); zero if none.
    pub blocked: Duration,
    /// Slots taken after this take.
    pub taken: usize,
}

/// A pause or a block, shared with every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Hold {
    Pause,
    Block,
}

/// The slots, pauses, blocks and memberships every replica shares. Each step is atomic and
/// reads the store's own clock.
pub(crate) trait SlotStore: Send + Sync + 'static {
    /// Takes the slot named `slot` under `key`, unless a block or pause is in force or the
    /// window is full: `N` less a reserve of `share` for every configured replica that is not
    /// a member, since it may be granting from its fallback.
    fn take(&self, key: &str, slot: &str, limits: Limits) -> impl Reply<Take>;

    /// The request of `slot` completed: the slot frees `span` from now. A slot whose lease
    /// already ran out is not brought back.
    fn release(&self, key: &str, slot: &str, span: Duration) -> impl Reply<()>;

    /// A slot whose request was never sent frees at once.
    fn give_back(&self, key: &str, slot: &str) -> impl Reply<()>;

    /// Extends (never shortens) a pause or block of `key` to `d` from now.
    fn hold(&self, key: &str, hold: Hold, d: Duration) -> impl Reply<()>;

    /// Makes `replica` a member for `ttl`, unless the store's clock is past `deadline` (Unix
    /// ms): then false, and nothing changes.
    fn register(&self, replica: &str, ttl: Duration, deadline: i64) -> impl Reply<bool>;

    /// The store's clock, Unix ms.
    fn time(&self) -> impl Reply<i64>;
}

/// What a store's step returns: its answer, or why the store did not give one.
pub(crate) trait Reply<T>: Future<Output = Result<T, String>> + Send {}

impl<T, F: Future<Output = Result<T, String>> + Send> Reply<T> for F {}

/// The store in Redis.
pub(crate) struct RedisStore {
    /// Reconnects by itself; cloned per call (a handle onto one multiplexed connection, so
    /// commands run in the order they were sent).
    conn: ConnectionManager,
    /// Prepended to every key.
    prefix: String,
}

/// Takes one slot. KEYS: slots, pause, block, members. ARGV: N, span ms, lease ms, replicas,
/// share, slot. Returns {granted, wait ms, pause ms, block ms, taken}.
static TAKE: LazyLock<Script> = script!(
    clock,
    r"
local block_ms = math.max(0, tonumber(redis.call('GET', KEYS[3]) or '0') - now)
local pause_ms = math.max(0, tonumber(redis.call('GET', KEYS[2]) or '0') - now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local taken = redis.call('ZCARD', KEYS[1])
if block_ms > 0 or pause_ms > 0 then
  return {0, 0, pause_ms, block_ms, taken}
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local missing = math.max(0, tonumber(ARGV[4]) - redis.call('ZCARD', KEYS[4]))
local cap = math.max(0, tonumber(ARGV[1]) - missing * tonumber(ARGV[5]))
local span = tonumber(ARGV[2])
if taken < cap then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[6])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + span)
  return {1, 0, 0, 0, taken + 1}
end
local wait_ms = span
local nth = redis.call('ZRANGE', KEYS[1], taken - cap, taken - cap, 'WITHSCORES')
if nth[2] then
  wait_ms = math.max(1, math.min(span, tonumber(nth[2]) - now))
end
return {0, wait_ms, 0, 0, taken}
"
);

/// KEYS: slots. ARGV: slot, span ms. `XX`: a slot whose lease already ran out is not brought back.
static RELEASE: LazyLock<Script> = script!(
    clock,
    r"
return redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
"
);

/// KEYS: the pause or block. ARGV: ms from now.
static EXTEND: LazyLock<Script> = script!(
    clock,
    r"
local ms = tonumber(ARGV[1])
if now + ms > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], now + ms, 'PX', ms)
end
return 1
"
);

/// KEYS: members. ARGV: id, ttl ms, deadline (Unix ms). Returns -1 past the deadline.
static REGISTER: LazyLock<Script> = script!(
    clock,
    r"
if now > tonumber(ARGV[3]) then
  return -1
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"
);

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// === impl RedisStore ===

impl RedisStore {
    pub fn new(conn: ConnectionManager, prefix: String) -> Self {
        RedisStore { conn, prefix }
    }

    fn key(&self, key: &str, what: &str) -> String {
        format!("{}limiter:{key}:{what}", self.prefix)
    }

    fn members(&self) -> String {
        format!("{}limiter:members", self.prefix)
    }

    /// Runs `script` on a handle of the shared connection.
    async fn invoke<T: FromRedisValue>(&self, script: &ScriptInvocation<'_>) -> Result<T, String> {
        let reply = script.invoke_async(&mut self.conn.clone()).await;
        reply.map_err(|e| e.to_string())
    }
}

impl SlotStore for RedisStore {
    async fn take(&self, key: &str, slot: &str, lim: Limits) -> Result<Take, String> {
        let mut take = TAKE.key(self.key(key, "slots"));
        let (pause, block) = (self.key(key, "pause"), self.key(key, "block"));
        take.key(pause).key(block).key(self.members());
        take.arg(lim.requests)
            .arg(millis(lim.span))
            .arg(millis(lim.lease));
        take.arg(lim.replicas).arg(lim.share).arg(slot);
        let reply: Vec<u64> = self.invoke(&take).await?;
        let ms = Duration::from_millis;
        match reply[..] {
            [granted, wait, paused, blocked, taken] => Ok(Take {
                granted: granted == 1,
                wait: ms(wait),
                paused: ms(paused),
                blocked: ms(blocked),
                taken: usize::try_from(taken).unwrap_or(usize::MAX),
            }),
            _ => Err(format!("unexpected reply from the take script: {reply:?}")),
        }
    }

    async fn release(&self, key: &str, slot: &str, span: Duration) -> Result<(), String> {
        let mut release = RELEASE.key(self.key(key, "slots"));
        self.invoke(release.arg(slot).arg(millis(span))).await
    }

    async fn give_back(&self, key: &str, slot: &str) -> Result<(), String> {
        let removed = self.conn.clone().zrem(self.key(key, "slots"), slot).await;
        removed.map_err(|e: RedisError| e.to_string())
    }

    async fn hold(&self, key: &str, hold: Hold, d: Duration) -> Result<(), String> {
        let what = match hold {
            Hold::Pause => "pause",
            Hold::Block => "block",
        };
        self.invoke(EXTEND.key(self.key(key, what)).arg(millis(d).max(1)))
            .await
    }

    async fn register(&self, replica: &str, ttl: Duration, deadline: i64) -> Result<bool, String> {
        let mut register = REGISTER.key(self.members());
        register.arg(replica).arg(millis(ttl)).arg(deadline);
        Ok(self.invoke::<i64>(&register).await? >= 0)
    }

    async fn time(&self) -> Result<i64, String> {
        let time = ::redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await;
        let (secs, micros): (i64, i64) = time.map_err(|e| e.to_string())?;
        Ok(secs * 1000 + micros / 1000)
    }
}

#[cfg(test)]
pub(crate) mod mem {
    //! An in-memory stand-in for Redis: the scripts' rules on tokio's clock, so paused-time
    //! tests drive it, with switches for the failures the limiter must survive.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

    use tokio::sync::oneshot;
    use tokio::time::Instant;

    use super::*;

    /// The store's clock at `epoch`, so its readings look like Unix ms.
    const EPOCH_MS: i64 = 1_700_000_000_000;

    /// One connection to a shared in-memory server: clones share the connection, and
    /// [`link`](Self::link) opens another one to the same server.
    #[derive(Clone)]
    pub struct MemStore {
        server: Arc<Mutex<Server>>,
        /// Set while this connection is cut: every call fails at once.
        cut: Arc<AtomicBool>,
    }

    type Command = Box<dyn FnOnce(&mut Data, i64) + Send>;

    struct Server {
        data: Data,
        /// The instant the store's clock reads [`EPOCH_MS`].
        epoch: Instant,
        /// While stalled: the commands sent meanwhile, run when it resumes (as Redis runs what
        /// waited in its sockets), whether or not their sender still waits.
        stalled: Option<Vec<Command>>,
    }

    #[derive(Default)]
    pub struct Data {
        /// Per key: slot name to the ms it frees.
        slots: HashMap<String, HashMap<String, i64>>,
        /// Per key and kind: the ms a pause or block ends.
        holds: HashMap<(String, Hold), i64>,
        /// Replica id to the ms its membership ends.
        members: HashMap<String, i64>,
    }

    impl MemStore {
        pub fn new() -> Self {
            MemStore {
                server: Arc::new(Mutex::new(Server {
                    data: Data::default(),
                    epoch: Instant::now(),
                    stalled: None,
                })),
                cut: Arc::default(),
            }
        }

        fn server(&self) -> MutexGuard<'_, Server> {
            self.server.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// Another connection to the same server.
        pub fn link(&self) -> Self {
            MemStore {
                server: self.server.clone(),
                cut: Arc::default(),
            }
        }

        /// Cuts this connection (`true`) or restores it.
        pub fn cut(&self, cut: bool) {
            self.cut.store(cut, Ordering::SeqCst);
        }

        /// Stops the server: commands wait until [`resume`](Self::resume).
        pub fn stall(&self) {
            self.server().stalled.get_or_insert_with(Vec::new);
        }

        /// Runs the commands that waited, now, and serves again.
        pub fn resume(&self) {
            let mut server = self.server();
            let now = server.now();
            for command in server.stalled.take().unwrap_or_default() {
                command(&mut server.data, now);
            }
        }

        /// When the membership of `replica` ends, as the server has it.
        pub fn member_until(&self, replica: &str) -> Option<Instant> {
            let server = self.server();
            let ms = *server.data.members.get(replica)?;
            let after = u64::try_from(ms - EPOCH_MS).unwrap_or(0);
            Some(server.epoch + Duration::from_millis(after))
        }

        /// The replicas whose membership is in force.
        pub fn members(&self) -> Vec<String> {
            let server = self.server();
            let now = server.now();
            let live = server
                .data
                .members
                .iter()
                .filter(|(_, until)| **until > now);
            live.map(|(id, _)| id.clone()).collect()
        }

        /// Slots taken under `key` now.
        pub fn taken(&self, key: &str) -> usize {
            let server = self.server();
            let now = server.now();
            let slots = server.data.slots.get(key);
            slots.map_or(0, |s| s.values().filter(|free| **free > now).count())
        }

        /// Sends `command`: runs it now, or when the server resumes.
        async fn run<T: Send + 'static>(
            &self,
            command: impl FnOnce(&mut Data, i64) -> T + Send + 'static,
        ) -> Result<T, String> {
            if self.cut.load(Ordering::SeqCst) {
                return Err("connection refused".into());
            }
            let answer = {
                let mut server = self.server();
                let now = server.now();
                let Server { data, stalled, .. } = &mut *server;
                let Some(waiting) = stalled else {
                    return Ok(command(data, now));
                };
                let (tx, rx) = oneshot::channel();
                waiting.push(Box::new(move |data, now| {
                    let _ = tx.send(command(data, now));
                }));
                rx
            };
            answer
                .await
                .map_err(|_| "the server dropped a command".into())
        }
    }

    impl Server {
        fn now(&self) -> i64 {
            let since = Instant::now().saturating_duration_since(self.epoch);
            EPOCH_MS + i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        }
    }

    fn ms(d: Duration) -> i64 {
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }

    impl Data {
        /// The take script's rules.
        fn take(&mut self, key: &str, slot: &str, lim: Limits, now: i64) -> Take {
            let left = |hold| {
                let until = self.holds.get(&(key.to_owned(), hold)).copied();
                Duration::from_millis(u64::try_from(until.unwrap_or(0) - now).unwrap_or(0))
            };
            let (paused, blocked) = (left(Hold::Pause), left(Hold::Block));
            let slots = self.slots.entry(key.to_owned()).or_default();
            slots.retain(|_, free| *free > now);
            let taken = slots.len();
            if !paused.is_zero() || !blocked.is_zero() {
                return Take {
                    paused,
                    blocked,
                    taken,
                    ..Take::default()
                };
            }
            self.members.retain(|_, until| *until > now);
            let missing = (lim.replicas as usize).saturating_sub(self.members.len());
            let cap = (lim.requests as usize).saturating_sub(missing * lim.share as usize);
            if taken < cap {
                slots.insert(slot.to_owned(), now + ms(lim.lease));
                return Take {
                    granted: true,
                    taken: taken + 1,
                    ..Take::default()
                };
            }
            let mut frees: Vec<i64> = slots.values().copied().collect();
            frees.sort_unstable();
            let wait = frees
                .get(taken - cap)
                .map_or(ms(lim.span), |free| (free - now).clamp(1, ms(lim.span)));
            Take {
                wait: Duration::from_millis(u64::try_from(wait).unwrap_or(0)),
                taken,
                ..Take::default()
            }
        }
    }

    impl SlotStore for MemStore {
        fn take(&self, key: &str, slot: &str, lim: Limits) -> impl Reply<Take> {
            let (key, slot) = (key.to_owned(), slot.to_owned());
            self.run(move |d, now| d.take(&key, &slot, lim, now))
        }

        fn release(&self, key: &str, slot: &str, span: Duration) -> impl Reply<()> {
            let (key, slot) = (key.to_owned(), slot.to_owned());
            self.run(move |d, now| {
                let slots = d.slots.get_mut(&key);
                if let Some(free) = slots.and_then(|s| s.get_mut(&slot)) {
                    *free = now + ms(span);
                }
            })
        }

        fn give_back(&self, key: &str, slot: &str) -> impl Reply<()> {
            let (key, slot) = (key.to_owned(), slot.to_owned());
            self.run(move |d, _| {
                d.slots.get_mut(&key).map(|s| s.remove(&slot));
            })
        }

        fn hold(&self, key: &str, hold: Hold, d: Duration) -> impl Reply<()> {
            let key = key.to_owned();
            self.run(move |data, now| {
                let until = data.holds.entry((key, hold)).or_default();
                *until = (*until).max(now + ms(d));
            })
        }

        fn register(&self, replica: &str, ttl: Duration, deadline: i64) -> impl Reply<bool> {
            let replica = replica.to_owned();
            self.run(move |d, now| {
                if now > deadline {
                    return false;
                }
                d.members.insert(replica, now + ms(ttl));
                true
            })
        }

        fn time(&self) -> impl Reply<i64> {
            self.run(|_, now| now)
        }
    }
}
