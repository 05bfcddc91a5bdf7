//! The k-way merge of per-stage lead streams into one globally ordered, deduplicated stream.
//!
//! Pure: the merger is fed pages and asked for the next lead; when it cannot decide without
//! more data it says which streams need their next page, and the caller (which does the I/O)
//! fetches them. A stream's next page is therefore requested only when the merge needs it.
//! The merge reads nothing of a lead but its `id` and the order field (see [`crate::leads::page`]).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet, VecDeque};

use bytes::Bytes;

use super::query::{Direction, Order};

/// One lead as the merge sees it: its identity, its sort value and its raw JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeadRef {
    /// The lead id: the deduplication key and the final tie-breaker.
    pub id: i64,
    /// The value of the order field (`None` when the upstream sent `null`; equal to `id` when
    /// ordering by id).
    pub sort: Option<i64>,
    /// The lead object exactly as the upstream sent it.
    pub raw: Bytes,
}

/// What the merger needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The next lead in global order (never one already emitted).
    Lead(LeadRef),
    /// These streams (by index) have no buffered lead and have not ended: feed each its next
    /// page before asking again.
    Need(Vec<usize>),
    /// Every stream has ended and every lead has been emitted.
    Done,
}

#[derive(Debug, Default)]
struct Stream {
    buffered: VecDeque<LeadRef>,
    ended: bool,
    /// Pages fed so far: the next upstream page to fetch is `pages_fed + 1`.
    pages_fed: u32,
}

impl Stream {
    /// Nothing buffered and more to come: the stream could hold the next lead, so the merge
    /// must wait for its next page.
    fn starved(&self) -> bool {
        self.buffered.is_empty() && !self.ended
    }
}

/// A head of one stream in the heap. Ordered so the heap (a max-heap) pops the lead that comes
/// first in the requested order.
#[derive(Debug)]
struct Head {
    sort: Option<i64>,
    id: i64,
    stream: usize,
    direction: Direction,
}

impl Head {
    fn key(&self) -> (Option<i64>, i64) {
        (self.sort, self.id)
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        let by_key = match self.direction {
            // Max-heap: the smallest key must compare greatest.
            Direction::Asc => other.key().cmp(&self.key()),
            Direction::Desc => self.key().cmp(&other.key()),
        };
        // Equal keys (the same lead in two streams): the lower stream index first, so the
        // result does not depend on heap internals.
        by_key.then_with(|| other.stream.cmp(&self.stream))
    }
}

/// The k-way merge state of one fan-out.
#[derive(Debug)]
pub struct Merger {
    direction: Direction,
    streams: Vec<Stream>,
    /// Heads of the streams that have a buffered lead; at most one entry per stream.
    heap: BinaryHeap<Head>,
    /// Ids already emitted: a lead listed under two stages (it moved between two page reads)
    /// is emitted once, at its first position.
    emitted: HashSet<i64>,
    /// How many streams are starved (see [`Stream::starved`]), kept as they change so that a
    /// step looks at every stream only when one needs a page, not once per lead.
    starved: usize,
}

impl Merger {
    /// A merger of `streams` streams, each sorted by `order` (ties by id in the same direction).
    pub fn new(streams: usize, order: Order) -> Self {
        Merger {
            direction: order.direction,
            streams: (0..streams).map(|_| Stream::default()).collect(),
            heap: BinaryHeap::with_capacity(streams),
            emitted: HashSet::new(),
            // No stream has a page yet.
            starved: streams,
        }
    }

    /// Makes room for the ids of `leads` emitted leads at once. The set of emitted ids would
    /// grow to hold them anyway, rehashing as it goes; a caller that knows how many leads it
    /// takes (the client's page) saves that.
    pub fn reserve(&mut self, leads: usize) {
        self.emitted.reserve(leads);
    }

    /// The number of pages fed to `stream` so far.
    pub fn pages_fed(&self, stream: usize) -> u32 {
        self.streams[stream].pages_fed
    }

    /// How many distinct leads have been emitted.
    pub fn emitted(&self) -> usize {
        self.emitted.len()
    }

    /// Feeds the next page of `stream`. `last` marks the stream's end (a 204, or a page shorter
    /// than the upstream limit).
    pub fn feed(&mut self, stream: usize, leads: Vec<LeadRef>, last: bool) {
        let s = &mut self.streams[stream];
        let was_starved = s.starved();
        s.pages_fed += 1;
        s.ended |= last;
        let had_head = !s.buffered.is_empty();
        s.buffered.extend(leads);
        self.starved = self.starved + usize::from(s.starved()) - usize::from(was_starved);
        if !had_head {
            self.push_head(stream);
        }
    }

    fn push_head(&mut self, stream: usize) {
        if let Some(lead) = self.streams[stream].buffered.front() {
            self.heap.push(Head {
                sort: lead.sort,
                id: lead.id,
                stream,
                direction: self.direction,
            });
        }
    }

    /// The next step of the merge.
    pub fn next_step(&mut self) -> Step {
        loop {
            debug_assert_eq!(
                self.starved,
                self.streams.iter().filter(|s| s.starved()).count(),
                "the starved count must follow the streams"
            );
            if self.starved > 0 {
                let need = self.streams.iter().enumerate();
                let need = need.filter(|(_, s)| s.starved()).map(|(i, _)| i);
                return Step::Need(need.collect());
            }
            let Some(head) = self.heap.pop() else {
                return Step::Done;
            };
            let s = &mut self.streams[head.stream];
            let Some(lead) = s.buffered.pop_front() else {
                continue;
            };
            self.starved += usize::from(s.starved());
            self.push_head(head.stream);
            if self.emitted.insert(lead.id) {
                return Step::Lead(lead);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leads::query::OrderField;
    use proptest::prelude::*;

    fn lead(id: i64, sort: i64) -> LeadRef {
        LeadRef {
            id,
            sort: Some(sort),
            raw: Bytes::from(format!("{{\"id\":{id}}}")),
        }
    }

    const ASC: Order = Order {
        field: OrderField::CreatedAt,
        direction: Direction::Asc,
    };

    /// Runs a merge to the end, feeding pages of `page_size` from in-memory streams.
    fn run(streams: &[Vec<LeadRef>], order: Order, page_size: usize) -> (Vec<LeadRef>, usize) {
        let mut m = Merger::new(streams.len(), order);
        let mut out = Vec::new();
        let mut fetches = 0;
        loop {
            match m.next_step() {
                Step::Lead(l) => out.push(l),
                Step::Done => return (out, fetches),
                Step::Need(ids) => {
                    for i in ids {
                        fetches += 1;
                        let start = m.pages_fed(i) as usize * page_size;
                        let page: Vec<LeadRef> = streams[i]
                            .iter()
                            .skip(start)
                            .take(page_size)
                            .cloned()
                            .collect();
                        let last = page.len() < page_size;
                        m.feed(i, page, last);
                    }
                }
            }
        }
    }

    #[test]
    fn merges_and_dedups() {
        let a = vec![lead(1, 10), lead(3, 10), lead(5, 30)];
        let b = vec![lead(2, 10), lead(3, 10), lead(4, 20)];
        let (out, _) = run(&[a, b], ASC, 2);
        let ids: Vec<i64> = out.iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn descending_ties_by_id_descending() {
        let order = Order {
            field: OrderField::CreatedAt,
            direction: Direction::Desc,
        };
        let a = vec![lead(9, 5), lead(1, 5)];
        let b = vec![lead(7, 6), lead(4, 5)];
        let (out, _) = run(&[a, b], order, 1);
        let ids: Vec<i64> = out.iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![7, 9, 4, 1]);
    }

    #[test]
    fn asks_only_for_what_it_needs() {
        // Stream 0 has 4 leads all before stream 1's first: reading the first lead needs one
        // page of each; stream 1's second page is never needed to emit stream 0's leads.
        let a: Vec<LeadRef> = (1..=4).map(|i| lead(i, i)).collect();
        let b: Vec<LeadRef> = (10..=13).map(|i| lead(i, i)).collect();
        let mut m = Merger::new(2, ASC);
        assert_eq!(m.next_step(), Step::Need(vec![0, 1]));
        m.feed(0, a[..2].to_vec(), false);
        m.feed(1, b[..2].to_vec(), false);
        assert_eq!(m.next_step(), Step::Lead(a[0].clone()));
        assert_eq!(m.next_step(), Step::Lead(a[1].clone()));
        assert_eq!(m.next_step(), Step::Need(vec![0]));
        m.feed(0, Vec::new(), true);
        assert_eq!(m.next_step(), Step::Lead(b[0].clone()));
        assert_eq!(m.pages_fed(1), 1);
    }

    #[test]
    fn empty_streams_end() {
        let (out, fetches) = run(&[vec![], vec![]], ASC, 250);
        assert!(out.is_empty());
        assert_eq!(fetches, 2);
    }

    #[test]
    fn null_sort_values_come_first_ascending() {
        let mut a = vec![lead(5, 1)];
        a.insert(
            0,
            LeadRef {
                id: 8,
                sort: None,
                raw: Bytes::new(),
            },
        );
        let (out, _) = run(&[a, vec![lead(2, 0)]], ASC, 5);
        let ids: Vec<i64> = out.iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![8, 2, 5]);
    }

    fn arb_streams() -> impl Strategy<Value = (Vec<Vec<LeadRef>>, bool)> {
        // Few distinct ids and sort values, so duplicates across streams and ties are common.
        let stream = prop::collection::vec((0i64..60, 0i64..8), 0..40);
        (prop::collection::vec(stream, 1..8), any::<bool>()).prop_map(|(streams, desc)| {
            let direction = if desc {
                Direction::Desc
            } else {
                Direction::Asc
            };
            let streams = streams
                .into_iter()
                .map(|s| {
                    let mut seen = HashSet::new();
                    let mut s: Vec<LeadRef> = s
                        .into_iter()
                        .filter(|(id, _)| seen.insert(*id))
                        .map(|(id, sort)| lead(id, sort))
                        .collect();
                    s.sort_by_key(|l| (l.sort, l.id));
                    if direction == Direction::Desc {
                        s.reverse();
                    }
                    s
                })
                .collect();
            (streams, desc)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, rng_seed: proptest::test_runner::RngSeed::Fixed(7), ..ProptestConfig::default() })]
        #[test]
        fn merge_is_sorted_unique_and_complete((streams, desc) in arb_streams(), page in 1usize..6) {
            let order = Order { field: OrderField::CreatedAt, direction: if desc { Direction::Desc } else { Direction::Asc } };
            let (out, _) = run(&streams, order, page);
            // Sorted by value; a lead with two different values is kept at its first position,
            // so sortedness is checked on the emitted sequence itself.
            for w in out.windows(2) {
                let (a, b) = ((w[0].sort, w[0].id), (w[1].sort, w[1].id));
                if desc { prop_assert!(a >= b) } else { prop_assert!(a <= b) }
            }
            let ids: HashSet<i64> = out.iter().map(|l| l.id).collect();
            prop_assert_eq!(ids.len(), out.len(), "no duplicate ids");
            let all: HashSet<i64> = streams.iter().flatten().map(|l| l.id).collect();
            prop_assert_eq!(ids, all, "nothing lost");
        }
    }
}
