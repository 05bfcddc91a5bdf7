//! The window guarantee across process lifetimes, on one host.
//!
//! A proxy that starts while another process still sends to the same account (one draining
//! after SIGTERM), or right after one died under load (kill -9, a crash loop, a supervisor's
//! restart), must not add to what that process sent in the current window: its limiter starts
//! empty. So processes of one account on one host take turns through a lock file: only the
//! holder sends, and it writes down the last moment it granted or released a slot. A successor
//! waits for the lock (the predecessor exits, or the kernel frees a killed one's), reads that
//! moment, and sends nothing until two slot spans (`W + M`) after it: one for the slot rule,
//! one for requests a killed predecessor had already handed to the kernel. A fresh lock, or a
//! predecessor idle that long, costs no wait at all.
//!
//! A file lock rather than shared send times: it needs no format shared between versions, and
//! two live processes never split the budget, so neither can exceed it. Replicas on several
//! hosts share their limiter through Redis instead (`--redis`).

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::limiter::{FlowId, GrantId, LimitError, LimiterSnapshot, UpstreamLimiter};

/// How often a successor tries the lock while a predecessor holds it.
const RETRY: Duration = Duration::from_millis(50);

/// A limiter that grants nothing until this process holds the account's lock and the
/// predecessor's last requests are a window behind.
pub struct Handover<L> {
    inner: L,
    /// Set once sending may start.
    ready: watch::Receiver<bool>,
    state: Arc<State>,
}

/// What the background start and the limiter share.
struct State {
    /// The locked file, once held: every grant and release writes its moment into it.
    file: OnceLock<File>,
    /// When sending may start, once the lock is held (until then unknown).
    start_at: OnceLock<Instant>,
    /// `W + M`, how long a slot stays taken after its request completed.
    span: Duration,
}

/// The lock file of `origin` in `dir`: one per account origin.
pub fn lock_path(dir: &Path, origin: &str) -> PathBuf {
    let name = origin.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.', "_");
    dir.join(format!("{name}.lock"))
}

// === impl Handover ===

impl<L: UpstreamLimiter> Handover<L> {
    /// Wraps `inner` and starts taking the lock at `path` in the background (on the current
    /// tokio runtime). `span` is the limiter's `W + M`. A lock that cannot be opened is logged
    /// and sending starts at once: the proxy must not refuse to serve because of `/tmp`.
    pub fn start(inner: L, path: PathBuf, span: Duration) -> Self {
        let (tx, ready) = watch::channel(false);
        let state = Arc::new(State {
            file: OnceLock::new(),
            start_at: OnceLock::new(),
            span,
        });
        tokio::spawn(take_turn(path, state.clone(), tx));
        Handover {
            inner,
            ready,
            state,
        }
    }

    /// Writes now as the last moment this process sent or completed a request.
    fn touch(&self) {
        if let Some(file) = self.state.file.get() {
            // Best effort: a failed write only makes a successor's wait shorter than it could
            // be, and the successor still waits for the lock.
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            let _ = file.write_at(&(now.as_millis() as u64).to_le_bytes(), 0);
        }
    }
}

/// Takes the lock, waits out the predecessor's last window, then opens the gate.
async fn take_turn(path: PathBuf, state: Arc<State>, ready: watch::Sender<bool>) {
    let file = match open(&path) {
        Ok(file) => file,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot open the limiter's lock file: sending without waiting for other processes of this account");
            let _ = state.start_at.set(Instant::now());
            let _ = ready.send(true);
            return;
        }
    };
    for attempt in 0u64.. {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) => {
                if attempt == 0 {
                    warn!(path = %path.display(), "another kommo-fanout process sends to this account: waiting for it to finish before sending");
                }
                tokio::time::sleep(RETRY).await;
            }
            Err(TryLockError::Error(e)) => {
                warn!(path = %path.display(), error = %e, "cannot lock the limiter's lock file: sending without waiting for other processes of this account");
                break;
            }
        }
    }
    let mut last = [0u8; 8];
    let last = match file.read_at(&mut last, 0) {
        Ok(8) => UNIX_EPOCH + Duration::from_millis(u64::from_le_bytes(last)),
        _ => UNIX_EPOCH,
    };
    let hold = (last + 2 * state.span)
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let start_at = Instant::now() + hold;
    let _ = state.start_at.set(start_at);
    if !hold.is_zero() {
        info!(
            hold_ms = hold.as_millis() as u64,
            "the previous process of this account sent recently: holding upstream requests until its window is over"
        );
        tokio::time::sleep_until(start_at).await;
    }
    let _ = state.file.set(file);
    let _ = ready.send(true);
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

impl<L: UpstreamLimiter> UpstreamLimiter for Handover<L> {
    fn acquire<'a>(
        &'a self,
        key: &'a str,
        flow: FlowId,
        deadline: Instant,
    ) -> BoxFuture<'a, Result<GrantId, LimitError>> {
        Box::pin(async move {
            if !*self.ready.borrow() {
                // Known to start past the deadline: fail now rather than at the deadline.
                if let Some(&at) = self.state.start_at.get().filter(|&&at| at >= deadline) {
                    let retry_after = at.saturating_duration_since(Instant::now());
                    return Err(LimitError::Timeout { retry_after });
                }
                let mut ready = self.ready.clone();
                let opened = tokio::time::timeout_at(deadline, ready.wait_for(|r| *r)).await;
                if !matches!(opened, Ok(Ok(_))) {
                    let retry_after = self.state.span;
                    return Err(LimitError::Timeout { retry_after });
                }
            }
            let grant = self.inner.acquire(key, flow, deadline).await?;
            self.touch();
            Ok(grant)
        })
    }

    fn release(&self, key: &str, grant: GrantId) {
        self.inner.release(key, grant);
        self.touch();
    }

    fn pause(&self, key: &str, until: Instant) {
        self.inner.pause(key, until);
    }

    fn block(&self, key: &str, until: Instant) {
        self.inner.block(key, until);
    }

    fn snapshot(&self, key: &str) -> LimiterSnapshot {
        LimiterSnapshot {
            waiting_for_predecessor: !*self.ready.borrow(),
            ..self.inner.snapshot(key)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::limiter::{LimiterConfig, LocalLimiter};

    fn limiter(path: &Path) -> Handover<LocalLimiter> {
        let cfg = LimiterConfig {
            requests: 7,
            window: Duration::from_secs(1),
            margin: Duration::from_millis(100),
        };
        Handover::start(
            LocalLimiter::new(cfg),
            path.to_path_buf(),
            cfg.window + cfg.margin,
        )
    }

    async fn granted(l: &Handover<LocalLimiter>, within: Duration) -> bool {
        l.acquire("k", 1, Instant::now() + within).await.is_ok()
    }

    #[tokio::test]
    async fn a_fresh_lock_costs_no_wait() {
        let dir = tempfile::tempdir().unwrap();
        let l = limiter(&lock_path(dir.path(), "https://a.kommo.com"));
        assert!(granted(&l, Duration::from_secs(5)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_successor_waits_for_the_lock_then_for_the_last_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = lock_path(dir.path(), "https://a.kommo.com");
        let first = limiter(&path);
        let grant = first
            .acquire("k", 1, Instant::now() + Duration::from_secs(5))
            .await
            .unwrap();
        let second = limiter(&path);
        // The first still holds the account: the second grants nothing, and says why.
        assert!(!granted(&second, Duration::from_secs(3)).await);
        assert!(second.snapshot("k").waiting_for_predecessor);
        first.release("k", grant);
        // Gone (as a process that exits or is killed): its lock is free.
        drop(first);
        // Its last release was just now: a window and more to wait.
        assert!(!granted(&second, Duration::from_millis(500)).await);
        assert!(granted(&second, Duration::from_secs(5)).await);
        assert!(!second.snapshot("k").waiting_for_predecessor);
    }
}
