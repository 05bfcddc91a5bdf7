//! Serving threads: one single-threaded runtime per thread, each with the client connections
//! handed to it and its own upstream connection pool.
//!
//! A request, its upstream connection and the tasks that drive both stay on one thread: no
//! work stealing, no wake-ups across threads on the hot path (on 2 CPUs, about 30 % less CPU
//! per pass-through request than one work-stealing runtime of the same size). One acceptor hands
//! each connection to the thread with the fewest open ones, so a burst of connections cannot
//! pile onto one thread as it can when every thread accepts from a shared socket. The price: a
//! CPU-heavy step (parsing a 250-lead upstream page takes ~0.5 ms) delays the other requests of
//! its thread, as in any event-loop server.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::error;

thread_local! {
    /// This thread's index among the serving threads; `None` on every other thread.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the serving thread this runs on, `None` elsewhere (the acceptor, the admin
/// listener, tests).
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The number of serving threads when none is configured: one per CPU.
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// A client connection on its way to a serving thread.
pub struct Accepted<S = ()> {
    pub stream: std::net::TcpStream,
    pub peer: SocketAddr,
    /// Counts the connection as open on its thread until dropped with the connection.
    pub open: Open,
    /// What the acceptor ties to the connection's life (its place among the connections the
    /// listener allows), dropped with the connection.
    pub slot: S,
}

/// One open connection of a serving thread; dropping it counts the connection closed.
pub struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The serving threads, fed by the acceptor.
pub struct Workers<S = ()> {
    threads: Vec<Thread<S>>,
    /// Where the search for the least loaded thread starts, so ties rotate.
    next: usize,
}

struct Thread<S> {
    /// Unbounded: the acceptor never waits on a serving thread, and the queue holds at most
    /// the connections accepted while the thread was busy.
    tx: mpsc::UnboundedSender<Accepted<S>>,
    open: Arc<AtomicUsize>,
    /// Completes when the thread's serving loop has returned and its runtime is gone.
    done: oneshot::Receiver<()>,
}

impl<S: Send + 'static> Workers<S> {
    /// Starts `count` threads, each running `serve(connections)` on a runtime of its own until
    /// the connections end (see [`Workers::finish`]).
    pub fn start<F, Fut>(count: usize, serve: F) -> Result<Workers<S>, String>
    where
        F: Fn(mpsc::UnboundedReceiver<Accepted<S>>) -> Fut + Send + Clone + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let count = count.max(1);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start a serving thread's runtime: {e}"))?;
            let (tx, rx) = mpsc::unbounded_channel();
            let (done_tx, done) = oneshot::channel();
            let serve = serve.clone();
            std::thread::Builder::new()
                .name("fanout-worker".into())
                .spawn(move || {
                    CURRENT.with(|c| c.set(Some(index)));
                    runtime.block_on(serve(rx));
                    // Tasks still spawned on it (idle upstream connections) end here.
                    drop(runtime);
                    let _ = done_tx.send(());
                })
                .map_err(|e| format!("cannot start a serving thread: {e}"))?;
            threads.push(Thread {
                tx,
                open: Arc::new(AtomicUsize::new(0)),
                done,
            });
        }
        Ok(Workers { threads, next: 0 })
    }

    /// Hands a connection to the thread with the fewest open connections, with its `slot`.
    pub fn hand(&mut self, stream: std::net::TcpStream, peer: SocketAddr, slot: S) {
        let n = self.threads.len();
        let pick = (0..n)
            .map(|i| (self.next + i) % n)
            .min_by_key(|&i| self.threads[i].open.load(Ordering::Relaxed))
            .unwrap_or(0);
        self.next = (pick + 1) % n;
        let thread = &self.threads[pick];
        thread.open.fetch_add(1, Ordering::Relaxed);
        let accepted = Accepted {
            stream,
            peer,
            open: Open(thread.open.clone()),
            slot,
        };
        if thread.tx.send(accepted).is_err() {
            // Only a serving loop that panicked drops its receiver; the connection closes.
            error!(%peer, thread = pick, "a serving thread has stopped; connection dropped");
        }
    }

    /// Ends the connection queues and waits until every thread has drained its connections
    /// and stopped.
    pub async fn finish(self) {
        let mut done = Vec::with_capacity(self.threads.len());
        for thread in self.threads {
            drop(thread.tx);
            done.push(thread.done);
        }
        for d in done {
            // An error means the thread panicked: it is gone either way.
            let _ = d.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each thread's count of open connections.
    fn open_counts<S: Send + 'static>(workers: &Workers<S>) -> Vec<usize> {
        workers
            .threads
            .iter()
            .map(|t| t.open.load(Ordering::Relaxed))
            .collect()
    }

    /// Connected loopback sockets; the listener is kept so the peers stay open.
    fn sockets(
        n: usize,
    ) -> (
        std::net::TcpListener,
        Vec<(std::net::TcpStream, SocketAddr)>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = (0..n)
            .map(|_| {
                let s = std::net::TcpStream::connect(addr).unwrap();
                let peer = s.local_addr().unwrap();
                (s, peer)
            })
            .collect();
        (listener, conns)
    }

    #[tokio::test]
    async fn connections_go_to_the_least_loaded_thread_and_finish_waits_for_the_threads() {
        // Each thread keeps what it is handed (so its count stays up) until its queue ends,
        // and reports its index and how many it held.
        let (report_tx, mut report) = mpsc::unbounded_channel();
        let workers = Workers::start(3, move |mut rx: mpsc::UnboundedReceiver<Accepted>| {
            let report = report_tx.clone();
            async move {
                let mut held = Vec::new();
                while let Some(a) = rx.recv().await {
                    held.push(a);
                }
                let _ = report.send((current(), held.len()));
            }
        });
        let mut workers = workers.unwrap();
        let (_listener, conns) = sockets(7);
        for (s, peer) in conns {
            workers.hand(s, peer, ());
        }
        assert_eq!(open_counts(&workers), [3, 2, 2]);
        workers.finish().await;
        let mut seen: Vec<_> = std::iter::from_fn(|| report.try_recv().ok()).collect();
        seen.sort();
        assert_eq!(seen, [(Some(0), 3), (Some(1), 2), (Some(2), 2)]);
        assert_eq!(
            current(),
            None,
            "the test's own thread is no serving thread"
        );
    }

    #[tokio::test]
    async fn a_closed_connection_frees_its_place() {
        let (_listener, conns) = sockets(3);
        let mut workers =
            Workers::start(2, |mut rx: mpsc::UnboundedReceiver<Accepted>| async move {
                // Closes every connection at once.
                while rx.recv().await.is_some() {}
            })
            .unwrap();
        for (s, peer) in conns {
            workers.hand(s, peer, ());
        }
        // Both threads drop what they get; once they have, every count is back to zero.
        for _ in 0..1000 {
            if open_counts(&workers) == [0, 0] {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(open_counts(&workers), [0, 0]);
        workers.finish().await;
    }
}
