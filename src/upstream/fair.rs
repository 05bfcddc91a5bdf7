//! The fair order in which waiting upstream requests get their permits: round-robin across
//! flows (client requests), FIFO within a flow. A one-stage request arriving behind a 40-stage
//! one is served after one more grant to the big one, not after all 40.
//!
//! Shared by the in-process and the Redis limiter; each keeps its own waiter records beside it.

use std::collections::{HashMap, VecDeque};

use super::limiter::FlowId;

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

    pub fn is_empty(&self) -> bool {
        self.len == 0
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

    /// A lower bound on how many grants precede a new waiter of `flow`.
    pub fn min_ahead(&self, flow: FlowId) -> usize {
        let own = self.flows.get(&flow).map_or(0, VecDeque::len);
        if own == 0 {
            // A new flow joins the back of the rotation: every flow in it is served once first.
            return self.rotation.len();
        }
        let others: usize = self
            .flows
            .iter()
            .filter(|(f, _)| **f != flow)
            .map(|(_, q)| q.len().min(own))
            .sum();
        own + others
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_across_flows_fifo_within() {
        let mut q = FairQueue::default();
        for id in 0..4 {
            q.push(1, id);
        }
        q.push(2, 10);
        q.push(3, 20);
        q.push(2, 11);
        assert_eq!(q.len(), 7);
        assert_eq!(q.min_ahead(9), 3);
        let order: Vec<WaiterId> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, vec![0, 10, 20, 1, 11, 2, 3]);
        assert!(q.is_empty() && q.head().is_none());
    }

    #[test]
    fn removing_the_last_waiter_of_a_flow_drops_the_flow() {
        let mut q = FairQueue::default();
        q.push(1, 0);
        q.push(2, 1);
        assert!(q.remove(1, 0));
        assert!(!q.remove(1, 0));
        assert_eq!(q.head(), Some(1));
        assert_eq!(q.min_ahead(1), 1);
        assert_eq!(q.pop(), Some(1));
        assert_eq!(q.pop(), None);
    }
}
