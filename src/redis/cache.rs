//! The cache level shared by every replica through Redis, behind each replica's moka levels
//! (see [`SharedCache`]).
//!
//! Entries are plain `GET`/`SET … PX` under `{prefix}cache:{generation}:{key}`; values are the
//! caller's opaque bytes and keys are used as given (Redis keys may be long). The generation is a
//! shared counter (`{prefix}cache:gen`): a Kommo webhook on any replica `INCR`s it, and from
//! that instant no replica reads an entry of the old generation, which then expires by its TTL.
//! Reading the generation and the entry is one Lua script, so a lookup is one round trip and
//! never sees a stale generation.
//!
//! Redis is a cache here, never a dependency: an error reads as a miss and drops the write.
//! While Redis is unreachable the cache stops asking it on every request (a blackholed server
//! would add a timeout to each) and probes it about once a second; errors are logged at warn at
//! most every 30 s, and [`RedisCache::degraded`] says so for readiness and metrics.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{AsyncCommands, RedisResult, Script};
use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::time::Instant;
use tracing::{info, warn};

use super::timed;
use crate::cache::SharedCache;

/// While degraded, Redis is asked at most this often; other calls miss at once.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// At most one warning per this interval while Redis fails.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Settings of the shared cache.
#[derive(Debug, Clone)]
pub struct RedisCacheConfig {
    /// `redis://host:port[/db]` or `rediss://…` (TLS).
    pub url: String,
    /// Prepended to every Redis key, so several deployments can share one Redis.
    pub key_prefix: String,
}

/// A [`SharedCache`] on Redis.
pub struct RedisCache {
    /// Reconnects by itself; cloned per call (a handle onto one multiplexed connection).
    conn: ConnectionManager,
    /// `{prefix}cache:`: the start of every entry key.
    entries: String,
    /// `{prefix}cache:gen`: the shared generation.
    generation: String,
    /// Set while Redis fails; read lock-free by `degraded()`.
    degraded: AtomicBool,
    /// An invalidation failed: bump the generation before the next lookup may read Redis.
    invalidation_pending: AtomicBool,
    /// When to probe next and when the last warning was logged; a plain mutex held for a
    /// few field reads, never across an await.
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// While degraded, no call before this.
    next_probe: Option<Instant>,
    last_warning: Option<Instant>,
}

/// The entry under the current generation. KEYS: the generation. ARGV: entry prefix, key.
static GET: LazyLock<Script> = script!(
    r"
local g = redis.call('GET', KEYS[1]) or '0'
return redis.call('GET', ARGV[1] .. g .. ':' .. ARGV[2])
"
);

/// Stores under the current generation. KEYS: the generation. ARGV: entry prefix, key, value,
/// ttl ms.
static PUT: LazyLock<Script> = script!(
    r"
local g = redis.call('GET', KEYS[1]) or '0'
return redis.call('SET', ARGV[1] .. g .. ':' .. ARGV[2], ARGV[3], 'PX', ARGV[4])
"
);

// === impl RedisCache ===

impl RedisCache {
    /// A cache on the Redis at `cfg.url`. Fails on a URL that can never work; an unreachable
    /// Redis is not an error (lookups miss until it answers).
    pub async fn connect(cfg: RedisCacheConfig) -> Result<RedisCache, String> {
        let conn = super::connection(&cfg.url)?;
        Ok(RedisCache {
            conn,
            entries: format!("{}cache:", cfg.key_prefix),
            generation: format!("{}cache:gen", cfg.key_prefix),
            degraded: AtomicBool::new(false),
            invalidation_pending: AtomicBool::new(false),
            health: Mutex::new(Health::default()),
        })
    }

    /// Whether the last call to Redis failed (lookups miss, writes are dropped).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// The shared generation, `None` when Redis does not answer.
    pub async fn generation(&self) -> Option<u64> {
        let generation = self.call(self.conn.clone().get(&self.generation)).await;
        generation.map(|g: Option<u64>| g.unwrap_or(0))
    }

    /// Whether to call Redis now: always when healthy, once per probe interval when not. A
    /// webhook that could not be shared while Redis failed is shared first, so no replica reads
    /// an entry filled before it.
    async fn may_call(&self) -> bool {
        if self.degraded() {
            let now = Instant::now();
            let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            match h.next_probe {
                Some(at) if now < at => return false,
                _ => h.next_probe = Some(now + PROBE_EVERY),
            }
        }
        if self.invalidation_pending.load(Ordering::Acquire) {
            return self.bump().await;
        }
        true
    }

    /// `INCR`s the shared generation; remembers to do it later if Redis does not answer.
    async fn bump(&self) -> bool {
        let mut conn = self.conn.clone();
        let incremented = self.call(conn.incr::<_, _, u64>(&self.generation, 1)).await;
        let done = incremented.is_some();
        self.invalidation_pending.store(!done, Ordering::Release);
        done
    }

    /// One call to Redis, under [`timed`]: how it went is recorded, an error becomes `None`.
    async fn call<T>(&self, call: impl Future<Output = RedisResult<T>>) -> Option<T> {
        match timed(call).await {
            Ok(v) => {
                if self.degraded.swap(false, Ordering::AcqRel) {
                    info!("Redis answers again: the shared cache is back");
                }
                Some(v)
            }
            Err(e) => {
                let now = Instant::now();
                let was = self.degraded.swap(true, Ordering::AcqRel);
                let mut h = self.health.lock().unwrap_or_else(PoisonError::into_inner);
                if !was {
                    h.next_probe = Some(now + PROBE_EVERY);
                }
                if h.last_warning.is_none_or(|t| now >= t + WARN_EVERY) {
                    h.last_warning = Some(now);
                    warn!(error = %e, "the shared cache on Redis fails: serving from the local cache only");
                }
                None
            }
        }
    }
}

impl SharedCache for RedisCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            if !self.may_call().await {
                return None;
            }
            let mut get = GET.key(&self.generation);
            get.arg(&self.entries).arg(key);
            let entry: Option<Option<Vec<u8>>> =
                self.call(get.invoke_async(&mut self.conn.clone())).await;
            entry.flatten().map(Bytes::from)
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            if ms == 0 || !self.may_call().await {
                return;
            }
            let mut put = PUT.key(&self.generation);
            put.arg(&self.entries).arg(key).arg(value.as_ref()).arg(ms);
            self.call(put.invoke_async::<()>(&mut self.conn.clone()))
                .await;
        })
    }

    fn invalidate_all(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // Always tried, degraded or not; if Redis does not answer, the bump is retried
            // before the next lookup reads from it.
            if !self.bump().await {
                warn!("could not invalidate the shared cache now: it is done when Redis answers");
            }
        })
    }
}
