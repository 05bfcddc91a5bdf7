//! The fair order in which waiting upstream requests get their turn: round-robin across flows
//! (client requests), FIFO within a flow. A one-stage request arriving behind a 40-stage one is
//! served after one more grant to the big one, not after all 40.
//!
//! Built from tokio's primitives. The turns are a semaphore, which is FIFO and cancel-safe: a
//! dropped waiter leaves its queue, and a turn it was handed but never saw goes back. Each flow
//! has a gate, a FIFO mutex its oldest waiter holds while it queues for a turn, so a flow has at
//! most one waiter in the semaphore's queue: the semaphore then serves the flows in turn, and
//! a flow's next waiter joins the back of that queue when the one before it is served.
//!
//! Shared by the in-process limiter (a turn is a slot) and the Redis one (a turn is being the
//! head that asks Redis for a slot).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{watch, Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::limiter::FlowId;

/// The flow of background work (the live views' sync). Its waiter takes its turn only while no
/// client request waits, so a client request waits behind at most one background request.
pub const BACKGROUND: FlowId = FlowId::MAX;

/// The flow of the account's OAuth refresh: a flow of its own, served in turn with client
/// requests (they wait for it), never behind the background.
pub const CREDENTIAL: FlowId = FlowId::MAX - 1;

/// Waiters of one key in fair order.
pub struct FairQueue {
    /// The turns waiters queue for.
    turns: Semaphore,
    /// The flows with waiters. A blocking mutex: held for a few map operations, never across
    /// an await.
    flows: Mutex<Flows>,
    /// Sent whenever what waiters check may have changed (a pause, a block, Redis lost), so
    /// they look again.
    news: watch::Sender<()>,
    /// Waiters of client flows (every flow but [`BACKGROUND`]), watched by the background one.
    clients: watch::Sender<usize>,
}

#[derive(Default)]
struct Flows {
    /// Each flow's gate and how many of its waiters are queued; a flow leaves the map with its
    /// last waiter, so the map does not grow with the client requests ever seen.
    gates: HashMap<FlowId, (Arc<tokio::sync::Mutex<()>>, usize)>,
    /// Waiters queued, kept so callers need not sum the flows.
    len: usize,
}

/// One waiter's place in the queue; dropping it withdraws the waiter.
pub struct Place<'a> {
    queue: &'a FairQueue,
    flow: FlowId,
    gate: Arc<tokio::sync::Mutex<()>>,
}

// === impl FairQueue ===

impl FairQueue {
    /// A queue with `turns` turns (at most tokio's limit for a semaphore).
    pub fn new(turns: usize) -> Self {
        FairQueue {
            turns: Semaphore::new(turns.min(Semaphore::MAX_PERMITS)),
            flows: Mutex::default(),
            news: watch::Sender::new(()),
            clients: watch::Sender::new(0),
        }
    }

    fn flows(&self) -> MutexGuard<'_, Flows> {
        // Every update is a few map writes; a panic elsewhere leaves nothing half-done.
        self.flows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The turns, for a caller that hands turns back later or counts the free ones.
    pub fn turns(&self) -> &Semaphore {
        &self.turns
    }

    /// Waiters queued.
    pub fn len(&self) -> usize {
        self.flows().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A turn at once, only when nobody waits: a newcomer never overtakes the queue.
    pub fn try_turn(&self) -> Option<SemaphorePermit<'_>> {
        self.is_empty().then(|| self.turns.try_acquire().ok())?
    }

    /// A lower bound on how many turns go before a new waiter of `flow`: its flow's waiters,
    /// and one of every other flow waiting (each has one in the semaphore's queue).
    pub fn min_ahead(&self, flow: FlowId) -> usize {
        let flows = self.flows();
        let own = flows.gates.get(&flow).map_or(0, |(_, n)| *n);
        own + flows.gates.len() - usize::from(own > 0)
    }

    /// Queues a waiter of `flow`.
    pub fn join(&self, flow: FlowId) -> Place<'_> {
        let mut flows = self.flows();
        flows.len += 1;
        let (gate, n) = flows.gates.entry(flow).or_default();
        *n += 1;
        if flow != BACKGROUND {
            self.clients.send_modify(|n| *n += 1);
        }
        Place {
            queue: self,
            flow,
            gate: gate.clone(),
        }
    }

    /// Makes every waiter run its check again.
    pub fn notify(&self) {
        self.news.send_replace(());
    }

    /// Runs a waiter's `work` until it resolves, failing with `check`'s error as soon as that
    /// fails (asked now and after every [`notify`](Self::notify)) and with `late()` once
    /// `deadline` passes.
    pub async fn guard<T, E>(
        &self,
        deadline: Instant,
        mut check: impl FnMut() -> Result<(), E>,
        late: impl FnOnce() -> E,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let mut news = self.news.subscribe();
        let mut work = std::pin::pin!(work);
        loop {
            check()?;
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(deadline) => return Err(late()),
                // The sender lives as long as the queue: this never fails while it is borrowed.
                _ = news.changed() => {}
                result = &mut work => return result,
            }
        }
    }
}

// === impl Place ===

impl Place<'_> {
    /// Waits for this waiter's turn: after the earlier waiters of its flow (the gate), in the
    /// semaphore's FIFO with one waiter of every other flow.
    /// A [`BACKGROUND`] waiter also waits until no client request is queued.
    pub async fn turn(&self) -> SemaphorePermit<'_> {
        let _gate = self.gate.lock().await;
        if self.flow == BACKGROUND {
            let mut clients = self.queue.clients.subscribe();
            // The sender lives as long as the queue this place borrows.
            let _ = clients.wait_for(|n| *n == 0).await;
        }
        self.queue
            .turns
            .acquire()
            .await
            .expect("a fair queue never closes its turns")
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut flows = self.queue.flows();
        flows.len -= 1;
        if self.flow != BACKGROUND {
            self.queue.clients.send_modify(|n| *n -= 1);
        }
        if let Some((_, n)) = flows.gates.get_mut(&self.flow) {
            *n -= 1;
            if *n == 0 {
                flows.gates.remove(&self.flow);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Waiters of flows 1, 1, 1, 1, 2, 3, 2 queue for one turn, handed out one at a time once
    /// all are queued: the flows take turns.
    #[tokio::test(start_paused = true)]
    async fn round_robin_across_flows_fifo_within() {
        let q = Arc::new(FairQueue::new(1));
        let first = q.try_turn().expect("a free turn");
        let order = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = [1, 1, 1, 1, 2, 3, 2]
            .into_iter()
            .map(|flow| {
                let (q, order) = (q.clone(), order.clone());
                tokio::spawn(async move {
                    let place = q.join(flow);
                    place.turn().await.forget();
                    order.lock().unwrap().push(flow);
                })
            })
            .collect();
        while q.len() < 7 {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.min_ahead(9), 3);
        // Its own two, and one of flow 1 and of flow 3.
        assert_eq!(q.min_ahead(2), 2 + 1 + 1);
        drop(first);
        for _ in 0..7 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            q.turns().add_permits(1);
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![1, 2, 3, 1, 2, 1, 1]);
        assert_eq!(q.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_place_leaves_the_queue_and_its_flow() {
        let q = FairQueue::new(0);
        let a = q.join(1);
        let b = q.join(2);
        assert_eq!((q.len(), q.min_ahead(3)), (2, 2));
        drop(a);
        assert_eq!((q.len(), q.min_ahead(3)), (1, 1));
        let waited = tokio::time::timeout(Duration::from_secs(1), b.turn()).await;
        assert!(waited.is_err(), "no turn to take");
        drop(waited);
        drop(b);
        assert_eq!(q.len(), 0);
        assert!(q.try_turn().is_none());
    }

    /// Background waiters give way to client waiters, however late the clients come, except
    /// the one background waiter already queued for a turn while no client waited: a client
    /// waits behind at most one background request.
    #[tokio::test(start_paused = true)]
    async fn background_gives_way_to_clients() {
        let q = Arc::new(FairQueue::new(1));
        let first = q.try_turn().expect("a free turn");
        let order = Arc::new(Mutex::new(Vec::new()));
        let spawn = |flow: FlowId| {
            let (q, order) = (q.clone(), order.clone());
            tokio::spawn(async move {
                let place = q.join(flow);
                place.turn().await.forget();
                order.lock().unwrap().push(flow);
            })
        };
        let mut tasks = vec![spawn(BACKGROUND), spawn(BACKGROUND)];
        while q.len() < 2 {
            tokio::task::yield_now().await;
        }
        tasks.extend([spawn(1), spawn(2), spawn(1)]);
        while q.len() < 5 {
            tokio::task::yield_now().await;
        }
        drop(first);
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            q.turns().add_permits(1);
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec![BACKGROUND, 1, 2, 1, BACKGROUND]
        );
    }
}
