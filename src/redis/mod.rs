//! Scale-out backends on Redis: several proxy replicas share one upstream budget
//! ([`RedisLimiter`]) and one second-level cache ([`RedisCache`]).
//!
//! Kommo's limit belongs to the account and the IP, not to a replica: three replicas each with
//! their own 7-per-second limiter would send 21. Redis is the field's standard engine for both
//! jobs, and every decision that must be atomic across replicas (take a slot, release it, extend
//! a pause) is one Lua script, which Redis runs without interleaving anything else. Scripts read
//! the time from Redis (`TIME`), never from a replica's clock, so replicas whose clocks disagree
//! still agree on when a slot frees.
//!
//! Both backends are built to keep serving when Redis is not: the limiter falls back to a local
//! limiter at `N / replicas`, the cache reads as a miss. Both reconnect on their own and expose
//! `degraded()` for readiness and metrics.
//!
//! The client is `redis` (redis-rs) with its `ConnectionManager`: the most used async Redis
//! client for Rust, on tokio, with a multiplexed connection that reconnects by itself, `EVALSHA`
//! with a transparent `EVAL` fallback after a server restart empties the script cache, and
//! `rediss://` over rustls (the TLS stack the proxy already uses).

/// A Lua script, compiled once. A `clock` script first reads Redis's time, in ms, into `now`.
macro_rules! script {
    (clock, $body:literal) => {
        script!(concat!(
            "local t = redis.call('TIME')\n",
            "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n",
            $body
        ))
    };
    ($body:expr) => {
        std::sync::LazyLock::new(|| ::redis::Script::new($body))
    };
}

pub mod cache;
pub mod keys;
pub mod limiter;
mod slots;
pub mod tokens;

use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use cache::{RedisCache, RedisCacheConfig};
pub use limiter::{RedisLimiter, RedisLimiterConfig};
pub use tokens::RedisTokens;

/// The longest one Redis call may take before the backend treats Redis as unreachable. Loopback
/// or same-zone calls take well under a millisecond; a stalled server must not stall requests.
pub(crate) const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// A lazily connecting, self-reconnecting connection to `url` (`redis://` or `rediss://`).
///
/// Fails only on a URL that can never work; an unreachable server is not an error here (the
/// first calls fail and the backends degrade until it answers).
pub(crate) fn connection(url: &str) -> Result<ConnectionManager, String> {
    let client = ::redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT))
        // One attempt per call: the backends probe again on their own schedule, and a request
        // must never wait through a chain of reconnect backoffs.
        .set_number_of_retries(0);
    ConnectionManager::new_lazy_with_config(client, config)
        .map_err(|e| format!("cannot set up the Redis connection: {e}"))
}

/// Runs one Redis call under [`REDIS_TIMEOUT`]; a timeout is an error like any other.
pub(crate) async fn timed<T, E: ToString>(
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer from Redis within {REDIS_TIMEOUT:?}")),
    }
}

/// The secret every replica fingerprints credentials with, so a token's cache entries are
/// shared across replicas: the first replica stores a random one (`SET NX`), the others read
/// it. `None` when Redis does not answer (the caller keeps a local secret and says so).
pub async fn shared_fingerprint_secret(url: &str, key_prefix: &str) -> Option<[u8; 32]> {
    use ::redis::{AsyncCommands, ExistenceCheck, SetOptions};
    let mut conn = connection(url).ok()?;
    let key = format!("{key_prefix}fingerprint-secret");
    let only_new = SetOptions::default().conditional_set(ExistenceCheck::NX);
    let _: Option<String> = timed(conn.set_options(&key, random_hex(4), only_new))
        .await
        .ok()?;
    let stored: String = timed(conn.get(&key)).await.ok()?;
    decode_hex32(&stored)
}

/// `words` random 64-bit words in hex, from the process's random source (std's hasher keys
/// are random per process and differ for every `RandomState`).
pub(crate) fn random_hex(words: usize) -> String {
    use std::hash::{BuildHasher, RandomState};
    let word = || RandomState::new().hash_one(());
    (0..words).map(|_| format!("{:016x}", word())).collect()
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    let byte = |i: usize| u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok();
    let bytes: Option<Vec<u8>> = (0..32).map(byte).collect();
    bytes.filter(|_| s.len() == 64)?.try_into().ok()
}
