//! Clients' keys kept in Redis instead of a file: `--keys-file redis://HOST:PORT[/DB]` (or
//! `rediss://`). The Redis key [`KEYS`] holds the same document as a keys file; `keys add` and
//! `keys revoke` replace it only if nobody changed it since they read it (a compare-and-set
//! script), and every replica reads it about once a second, so all of them refuse a revoked
//! key within about a second. A deployment sharing one Redis with another uses another
//! database number.

use std::future::Future;
use std::path::Path;

use redis::aio::ConnectionManager;

/// The Redis key of the keys document.
pub const KEYS: &str = "kommo-fanout:keys";

/// Replaces the document only while it is still `ARGV[1]` (`''`: absent).
static SWAP: std::sync::LazyLock<redis::Script> = script!(
    "if (redis.call('GET', KEYS[1]) or '') == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2]) return 1 end return 0"
);

/// The Redis URL `path` names, when it names one.
pub fn url(path: &Path) -> Option<&str> {
    let text = path.to_str()?;
    (text.starts_with("redis://") || text.starts_with("rediss://")).then_some(text)
}

/// A connection to `url` (lazy, reconnecting, each call under the backends' timeout).
pub fn connect(url: &str) -> Result<ConnectionManager, String> {
    super::connection(url)
}

/// The document, if there is one.
pub async fn read(conn: &ConnectionManager) -> Result<Option<String>, String> {
    let mut conn = conn.clone();
    let mut get = redis::cmd("GET");
    super::timed(get.arg(KEYS).query_async(&mut conn)).await
}

/// Stores `new` if the document is still `old`; `false` when someone changed it meanwhile.
pub async fn swap(conn: &ConnectionManager, old: Option<&str>, new: &str) -> Result<bool, String> {
    let mut conn = conn.clone();
    let mut swapped = SWAP.key(KEYS);
    let swapped = swapped.arg(old.unwrap_or("")).arg(new);
    let stored: i64 = super::timed(swapped.invoke_async(&mut conn)).await?;
    Ok(stored == 1)
}

/// Runs `job` on a runtime of its own on another thread: for the `keys` commands and the
/// first read at start, which are not async (and may be called from within a runtime).
pub fn blocking<T: Send + 'static, F: Future<Output = Result<T, String>> + Send + 'static>(
    job: impl FnOnce() -> F + Send + 'static,
) -> Result<T, String> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime for Redis: {e}"))?;
        runtime.block_on(job())
    })
    .join()
    .map_err(|_| "the Redis call panicked".to_string())?
}
