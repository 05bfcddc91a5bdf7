//! The replica of one credential's leads and the indexes that answer a view from memory.
//!
//! Pure: the caller reads Kommo (full reads, the change feed, deletions) and applies what it
//! read here; the rules of [`Replica::upsert`] and [`Replica::delete`] keep a read that is
//! older than what the replica holds from undoing it, whatever order the reads land in. A page
//! of a view is a k-way merge of its stages' sorted indexes, the same merge the fan-out does
//! over Kommo's per-stage streams (see [`crate::leads::merge`]), so both answer alike.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::mem::size_of;

use bytes::Bytes;
use serde::Deserialize;

use super::view::{Range, View};
use crate::leads::merge::LeadRef;
use crate::leads::query::{Direction, Order, OrderField, StagePair};

/// One lead as the replica holds it: the fields views filter and order by, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lead {
    /// The lead's id: the key of the replica and the last tie-breaker of every order.
    pub id: i64,
    /// Its pipeline and stage: which stage index holds it.
    pub stage: StagePair,
    /// `filter[responsible_user_id]` reads it; `None` when Kommo sent `null` or left it out.
    pub responsible_user_id: Option<i64>,
    /// `filter[created_by]` reads it.
    pub created_by: Option<i64>,
    /// `filter[updated_by]` reads it.
    pub updated_by: Option<i64>,
    /// `filter[price]` reads it.
    pub price: Option<i64>,
    /// `order[created_at]` and its filter read it; `None` sorts first ascending, as the merge
    /// orders a `null` sort value.
    pub created_at: Option<i64>,
    /// The version of the lead: a read with an older one never replaces a newer one.
    pub updated_at: i64,
    /// `filter[closed_at]` reads it (`None` while the lead is open).
    pub closed_at: Option<i64>,
    /// `filter[closest_task_at]` reads it.
    pub closest_task_at: Option<i64>,
    /// The lead object as Kommo sent it, with the held `with` parts. Its links carry the
    /// replica's read's query; the answer's rendering gives them the client's.
    pub raw: Bytes,
}

/// The fields the replica reads of a lead; serde skips the others without building values.
#[derive(Deserialize)]
struct Fields {
    id: i64,
    pipeline_id: i64,
    status_id: i64,
    updated_at: i64,
    #[serde(default)]
    responsible_user_id: Option<i64>,
    #[serde(default)]
    created_by: Option<i64>,
    #[serde(default)]
    updated_by: Option<i64>,
    #[serde(default)]
    price: Option<i64>,
    #[serde(default)]
    created_at: Option<i64>,
    #[serde(default)]
    closed_at: Option<i64>,
    #[serde(default)]
    closest_task_at: Option<i64>,
}

/// Parses one `200` leads page body (Kommo's HAL page, in any valid JSON spelling) into leads.
///
/// Each lead's bytes are copied into their own buffer: a slice of the page would keep the whole
/// page alive for as long as any one of its leads stays unchanged. A lead without a
/// `pipeline_id`, `status_id` or `updated_at` (such as a deleted one) is an error, said in
/// words fit for a log line.
pub fn parse_page(body: &[u8]) -> Result<Vec<Lead>, String> {
    let fields = "id, pipeline_id, status_id or updated_at";
    let leads = crate::leads::page::leads_of::<Fields>(body, "leads page", fields)?;
    let leads = leads.into_iter().map(|(raw, f)| Lead {
        id: f.id,
        stage: StagePair {
            pipeline_id: f.pipeline_id,
            status_id: f.status_id,
        },
        responsible_user_id: f.responsible_user_id,
        created_by: f.created_by,
        updated_by: f.updated_by,
        price: f.price,
        created_at: f.created_at,
        updated_at: f.updated_at,
        closed_at: f.closed_at,
        closest_task_at: f.closest_task_at,
        raw: Bytes::copy_from_slice(raw.get().as_bytes()),
    });
    Ok(leads.collect())
}

/// The leads of one stage, sorted in each order Kommo sorts by (ties by id).
#[derive(Debug, Default)]
struct StageIndex {
    by_id: BTreeSet<i64>,
    by_created_at: BTreeSet<(Option<i64>, i64)>,
    by_updated_at: BTreeSet<(i64, i64)>,
}

impl StageIndex {
    fn insert(&mut self, lead: &Lead) {
        self.by_id.insert(lead.id);
        self.by_created_at.insert((lead.created_at, lead.id));
        self.by_updated_at.insert((lead.updated_at, lead.id));
    }

    fn remove(&mut self, lead: &Lead) {
        self.by_id.remove(&lead.id);
        self.by_created_at.remove(&(lead.created_at, lead.id));
        self.by_updated_at.remove(&(lead.updated_at, lead.id));
    }

    /// The keys `(sort value, id)` of the leads in `order` whose order field lies in `range`
    /// (the view's range filter on that field: seeking to it skips what the filter would
    /// drop; the id order has no range filter).
    fn keys<'a>(&'a self, order: Order, range: Range) -> Keys<'a> {
        let from = range.from.unwrap_or(i64::MIN);
        let to = range.to.unwrap_or(i64::MAX);
        if !range.is_open() && from > to {
            return Box::new(std::iter::empty());
        }
        match order.field {
            OrderField::Id => directed(self.by_id.iter().map(|&id| (Some(id), id)), order),
            OrderField::CreatedAt if range.is_open() => {
                directed(self.by_created_at.iter().copied(), order)
            }
            // A bounded range leaves out `None` (below every `Some`), as the filter does.
            OrderField::CreatedAt => directed(
                self.by_created_at
                    .range((Some(from), i64::MIN)..=(Some(to), i64::MAX))
                    .copied(),
                order,
            ),
            OrderField::UpdatedAt => directed(
                self.by_updated_at
                    .range((from, i64::MIN)..=(to, i64::MAX))
                    .map(|&(at, id)| (Some(at), id)),
                order,
            ),
        }
    }
}

/// Index keys in a view's order: the sort value as the merge sees it, and the id.
type Keys<'a> = Box<dyn Iterator<Item = (Option<i64>, i64)> + 'a>;

fn directed<'a, I>(keys: I, order: Order) -> Keys<'a>
where
    I: DoubleEndedIterator<Item = (Option<i64>, i64)> + 'a,
{
    match order.direction {
        Direction::Asc => Box::new(keys),
        Direction::Desc => Box::new(keys.rev()),
    }
}

/// The head of one stage's keys in the merge. Ordered so the heap (a max-heap) pops the key
/// that comes first in the view's order, as [`crate::leads::merge`]'s heads are; a lead is in
/// one stage only, so two heads never tie.
#[derive(Debug)]
struct Head {
    key: (Option<i64>, i64),
    stage: usize,
    direction: Direction,
}

impl Ord for Head {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let by_key = match self.direction {
            Direction::Asc => other.key.cmp(&self.key),
            Direction::Desc => self.key.cmp(&other.key),
        };
        by_key.then_with(|| other.stage.cmp(&self.stage))
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Head {}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The k-way merge of the stages' keys in one order.
struct MergedKeys<'a> {
    stages: Vec<Keys<'a>>,
    heap: BinaryHeap<Head>,
    direction: Direction,
}

impl<'a> MergedKeys<'a> {
    fn new(mut stages: Vec<Keys<'a>>, direction: Direction) -> Self {
        let mut heap = BinaryHeap::with_capacity(stages.len());
        for (stage, keys) in stages.iter_mut().enumerate() {
            if let Some(key) = keys.next() {
                heap.push(Head {
                    key,
                    stage,
                    direction,
                });
            }
        }
        MergedKeys {
            stages,
            heap,
            direction,
        }
    }
}

impl Iterator for MergedKeys<'_> {
    type Item = (Option<i64>, i64);

    fn next(&mut self) -> Option<Self::Item> {
        let head = self.heap.pop()?;
        if let Some(key) = self.stages[head.stage].next() {
            self.heap.push(Head {
                key,
                stage: head.stage,
                direction: self.direction,
            });
        }
        Some(head.key)
    }
}

/// Estimated bytes a held lead costs besides its JSON: its entry in the map of leads (the
/// entry and the map's control byte, the map kept at most 7/8 full) and its three index
/// entries (each counted at 3/2 its size, for B-tree nodes that are partly empty and their
/// headers). Allocator rounding is not counted.
pub const LEAD_OVERHEAD: usize = (size_of::<(i64, Lead)>() + 1) * 8 / 7
    + (size_of::<i64>() + size_of::<(Option<i64>, i64)>() + size_of::<(i64, i64)>()) * 3 / 2;

/// Estimated bytes of one tombstone, counted as a map entry like a lead's.
pub const TOMBSTONE_OVERHEAD: usize = (size_of::<(i64, i64)>() + 1) * 8 / 7;

/// Every lead one credential sees, indexed by stage in each order a view can ask for.
#[derive(Debug, Default)]
pub struct Replica {
    /// The leads by id; the stage indexes refer to these.
    leads: HashMap<i64, Lead>,
    /// Per stage, the ids of its leads in each order. A stage with no lead has no entry.
    stages: BTreeMap<StagePair, StageIndex>,
    /// Deletions by id: the time of the latest, so that an older read cannot bring it back.
    tombstones: HashMap<i64, i64>,
    /// The sum of the held leads' `raw` lengths, kept as they change.
    raw_bytes: usize,
}

impl Replica {
    /// An empty replica.
    pub fn new() -> Self {
        Replica::default()
    }

    /// How many leads are held.
    pub fn len(&self) -> usize {
        self.leads.len()
    }

    /// Whether no lead is held.
    pub fn is_empty(&self) -> bool {
        self.leads.is_empty()
    }

    /// Bytes held: every lead's JSON plus [`LEAD_OVERHEAD`] per lead, plus
    /// [`TOMBSTONE_OVERHEAD`] per tombstone.
    pub fn bytes(&self) -> usize {
        self.raw_bytes
            + self.leads.len() * LEAD_OVERHEAD
            + self.tombstones.len() * TOMBSTONE_OVERHEAD
    }

    /// Applies a lead read from Kommo unless it is older than what the replica knows: its
    /// `updated_at` must be at least the held lead's and at least a tombstone's for its id (a
    /// read at the same second may carry a later change, so it wins). Moves the lead between
    /// stage indexes when its stage changed. Returns whether it was applied.
    pub fn upsert(&mut self, lead: Lead) -> bool {
        if self
            .tombstones
            .get(&lead.id)
            .is_some_and(|&at| lead.updated_at < at)
        {
            return false;
        }
        if self
            .leads
            .get(&lead.id)
            .is_some_and(|held| lead.updated_at < held.updated_at)
        {
            return false;
        }
        // The lead now held is at least as new as the deletion: it guards against older reads.
        self.tombstones.remove(&lead.id);
        match self.leads.remove(&lead.id) {
            Some(old) => {
                self.raw_bytes -= old.raw.len();
                let moved = (old.stage, old.created_at, old.updated_at)
                    != (lead.stage, lead.created_at, lead.updated_at);
                if moved {
                    self.unindex(&old);
                    self.stages.entry(lead.stage).or_default().insert(&lead);
                }
            }
            None => self.stages.entry(lead.stage).or_default().insert(&lead),
        }
        self.raw_bytes += lead.raw.len();
        self.leads.insert(lead.id, lead);
        true
    }

    /// A deletion at `at` (Unix seconds): removes the lead if the held one's `updated_at` is at
    /// most `at`, and leaves a tombstone so that an older read of it cannot bring it back. A
    /// held lead newer than the deletion was restored after it: it stays, and no tombstone is
    /// left. Returns whether a lead was removed.
    pub fn delete(&mut self, id: i64, at: i64) -> bool {
        if self.leads.get(&id).is_some_and(|l| l.updated_at > at) {
            return false;
        }
        let tombstone = self.tombstones.entry(id).or_insert(at);
        *tombstone = (*tombstone).max(at);
        self.remove(id).is_some()
    }

    /// Drops the tombstones of deletions before `before` (the caller prunes past the window in
    /// which an older read can still land).
    pub fn prune_tombstones(&mut self, before: i64) {
        self.tombstones.retain(|_, &mut at| at >= before);
    }

    /// How many tombstones are held.
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// Removes a lead whatever its time and hands it back, leaving no tombstone (the reconcile
    /// repairs with it; a delta moves what it read into the replica with it).
    pub fn remove(&mut self, id: i64) -> Option<Lead> {
        let old = self.leads.remove(&id)?;
        self.raw_bytes -= old.raw.len();
        self.unindex(&old);
        Some(old)
    }

    /// Forgets the deletion of `id`: the feed reported its restore, and a read of it may carry
    /// an `updated_at` older than the deletion (a restore need not move it).
    pub fn forget_tombstone(&mut self, id: i64) {
        self.tombstones.remove(&id);
    }

    fn unindex(&mut self, lead: &Lead) {
        if let Some(index) = self.stages.get_mut(&lead.stage) {
            index.remove(lead);
            if index.by_id.is_empty() {
                self.stages.remove(&lead.stage);
            }
        }
    }

    /// The lead held under `id`.
    pub fn get(&self, id: i64) -> Option<&Lead> {
        self.leads.get(&id)
    }

    /// The ids of each stage that holds a lead, stages in order: what the reconcile compares
    /// with a fresh read.
    pub fn stage_ids(&self) -> impl Iterator<Item = (StagePair, &BTreeSet<i64>)> + '_ {
        self.stages
            .iter()
            .map(|(&stage, index)| (stage, &index.by_id))
    }

    /// Every id held, in no particular order.
    pub fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.leads.keys().copied()
    }

    /// A page of a view: skips `offset` matching leads in the view's order, returns up to
    /// `limit` of the next ones and whether another matching lead follows them. The leads,
    /// their order, their sort values and their bytes are what the fan-out's merge gives for
    /// the same leads.
    pub fn page(&self, view: &View, offset: u64, limit: usize) -> (Vec<LeadRef>, bool) {
        let mut matching = self.matching(view);
        let mut skipped = 0;
        while skipped < offset {
            if matching.next().is_none() {
                return (Vec::new(), false);
            }
            skipped += 1;
        }
        let leads = matching
            .by_ref()
            .take(limit)
            .map(|(sort, lead)| LeadRef {
                id: lead.id,
                sort,
                raw: view.bytes(lead),
            })
            .collect();
        (leads, matching.next().is_some())
    }

    /// The leads of `view` in its order, each with its sort value.
    fn matching<'a>(
        &'a self,
        view: &'a View,
    ) -> Box<dyn Iterator<Item = (Option<i64>, &'a Lead)> + 'a> {
        let order = view.order;
        let filters = &view.filters;
        // A list of ids is short next to the stages it spans: look each up, sort the few.
        if let Some(ids) = &filters.id {
            let mut hits: Vec<(Option<i64>, &Lead)> = ids
                .iter()
                .filter_map(|id| self.leads.get(id))
                .filter(|lead| view.matches(lead))
                .map(|lead| (sort_value(lead, order.field), lead))
                .collect();
            hits.sort_unstable_by_key(|&(sort, lead)| (sort, lead.id));
            if order.direction == Direction::Desc {
                hits.reverse();
            }
            return Box::new(hits.into_iter());
        }
        let range = match order.field {
            OrderField::Id => Range::default(),
            OrderField::CreatedAt => filters.created_at,
            OrderField::UpdatedAt => filters.updated_at,
        };
        let mut stages: Vec<StagePair> = view
            .stages
            .iter()
            .copied()
            .filter(|stage| filters.admits_pipeline(stage.pipeline_id))
            .collect();
        // The request names distinct stages; each is merged once all the same.
        stages.sort_unstable();
        stages.dedup();
        let keys = stages
            .iter()
            .filter_map(|stage| self.stages.get(stage))
            .map(|index| index.keys(order, range))
            .collect();
        Box::new(
            MergedKeys::new(keys, order.direction)
                .filter_map(|(sort, id)| Some((sort, self.leads.get(&id)?)))
                .filter(|(_, lead)| filters.matches(lead)),
        )
    }
}

/// The value a lead is sorted by, as the fan-out reads it from Kommo's page.
fn sort_value(lead: &Lead, field: OrderField) -> Option<i64> {
    match field {
        OrderField::Id => Some(lead.id),
        OrderField::CreatedAt => lead.created_at,
        OrderField::UpdatedAt => Some(lead.updated_at),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::leads::merge::{Merger, Step};
    use crate::leads::query::{parse, QueryLimits};
    use crate::sync::view::{held, view, Held};

    fn stage(pipeline_id: i64, status_id: i64) -> StagePair {
        StagePair {
            pipeline_id,
            status_id,
        }
    }

    fn lead(id: i64, stage: StagePair, updated_at: i64) -> Lead {
        Lead {
            id,
            stage,
            responsible_user_id: Some(1),
            created_by: Some(1),
            updated_by: Some(1),
            price: Some(10),
            created_at: Some(id * 10),
            updated_at,
            closed_at: None,
            closest_task_at: None,
            raw: Bytes::from(format!("{{\"id\":{id},\"updated_at\":{updated_at}}}")),
        }
    }

    fn view_of(query: &str, held: &Held) -> View {
        let q = parse(query, QueryLimits { max_pairs: 100 }).unwrap();
        view(&q, held).unwrap()
    }

    fn page_ids(replica: &Replica, view: &View, offset: u64, limit: usize) -> (Vec<i64>, bool) {
        let (leads, more) = replica.page(view, offset, limit);
        (leads.into_iter().map(|l| l.id).collect(), more)
    }

    fn stage_ids(replica: &Replica) -> Vec<(StagePair, Vec<i64>)> {
        replica
            .stage_ids()
            .map(|(s, ids)| (s, ids.iter().copied().collect()))
            .collect()
    }

    /// The indexes hold exactly the held leads, each under its stage and current keys.
    fn assert_indexes(replica: &Replica) {
        let mut seen = 0;
        for (stage, index) in &replica.stages {
            assert!(!index.by_id.is_empty(), "an empty stage is dropped");
            assert_eq!(index.by_id.len(), index.by_created_at.len());
            assert_eq!(index.by_id.len(), index.by_updated_at.len());
            for &id in &index.by_id {
                let lead = &replica.leads[&id];
                assert_eq!(lead.stage, *stage);
                assert!(index.by_created_at.contains(&(lead.created_at, id)));
                assert!(index.by_updated_at.contains(&(lead.updated_at, id)));
            }
            seen += index.by_id.len();
        }
        assert_eq!(seen, replica.len());
        let raw: usize = replica.leads.values().map(|l| l.raw.len()).sum();
        assert_eq!(replica.raw_bytes, raw);
    }

    #[test]
    fn parse_page_reads_any_spelling_and_copies_each_lead() {
        let body = "{\"_page\":1,\"_links\":{\"self\":{\"href\":\"https:\\/\\/a.kommo.com\\/api\\/v4\\/leads\"}},\n \"_embedded\" : { \"leads\" : [ {\"\\u0069d\":5,\"name\":\"Caf\\u00e9 \\/ x\",\"price\":null,\"pipeline_id\":1,\"status_id\":142,\"created_at\":10,\"updated_at\":11,\"closed_at\":12,\"_embedded\":{\"tags\":[]}} ,\n {\"updated_at\":3,\"status_id\":7,\"id\":6,\"pipeline_id\":2,\"responsible_user_id\":4,\"created_by\":5,\"updated_by\":6,\"price\":100,\"closest_task_at\":9} ] } }";
        let leads = parse_page(body.as_bytes()).unwrap();
        assert_eq!(leads.len(), 2);
        let a = &leads[0];
        assert_eq!((a.id, a.stage, a.updated_at), (5, stage(1, 142), 11));
        assert_eq!(
            (a.price, a.created_at, a.closed_at),
            (None, Some(10), Some(12))
        );
        assert_eq!(
            &a.raw[..],
            "{\"\\u0069d\":5,\"name\":\"Caf\\u00e9 \\/ x\",\"price\":null,\"pipeline_id\":1,\"status_id\":142,\"created_at\":10,\"updated_at\":11,\"closed_at\":12,\"_embedded\":{\"tags\":[]}}".as_bytes()
        );
        let b = &leads[1];
        assert_eq!(
            (
                b.id,
                b.stage,
                b.responsible_user_id,
                b.created_by,
                b.updated_by
            ),
            (6, stage(2, 7), Some(4), Some(5), Some(6))
        );
        assert_eq!(
            (b.price, b.created_at, b.closest_task_at),
            (Some(100), None, Some(9))
        );
        // Copied: no lead points into the page's buffer.
        let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
        for l in &leads {
            assert!(!range.contains(&(l.raw.as_ptr() as usize)));
        }
        assert!(parse_page(br#"{"_embedded":{"leads":[]}}"#)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn parse_page_errors_say_what_is_wrong() {
        for (body, says) in [
            (&br#"{"_embedded":{"leads":[{"id":1,"status_id":2,"updated_at":3}]}}"#[..], "pipeline_id"),
            (br#"{"_embedded":{"leads":[{"id":1,"pipeline_id":2,"updated_at":3}]}}"#, "status_id"),
            (br#"{"_embedded":{"leads":[{"id":1,"pipeline_id":2,"status_id":3}]}}"#, "updated_at"),
            // A deleted lead as `with=only_deleted` lists it.
            (br#"{"_embedded":{"leads":[{"id":1,"pipeline_id":null,"status_id":null,"updated_at":3,"is_deleted":true}]}}"#, "lead 0"),
            (br#"{"_embedded":{"leads":[{"id":1,"pipeline_id":2,"status_id":3,"updated_at":4},[1]]}}"#, "lead 1"),
            (br#"{"_embedded":{"leads":[{"id":1,"pipeline_id":2,"status_id":3,"updated_at":4,"price":"5"}]}}"#, "lead 0"),
            (br#"{"_embedded":{"leads":{}}}"#, "HAL"),
            (b"<html>blocked</html>", "HAL"),
            (b"", "HAL"),
        ] {
            let err = parse_page(body).unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn older_reads_are_rejected_and_equal_times_applied() {
        let mut r = Replica::new();
        assert!(r.upsert(lead(1, stage(1, 10), 100)));
        assert!(!r.upsert(lead(1, stage(1, 11), 99)));
        assert_eq!(r.get(1).unwrap().stage, stage(1, 10));
        let mut same_second = lead(1, stage(1, 10), 100);
        same_second.price = Some(20);
        assert!(r.upsert(same_second));
        assert_eq!(r.get(1).unwrap().price, Some(20));
        assert!(r.upsert(lead(1, stage(1, 10), 150)));
        assert_eq!(r.len(), 1);
        assert_indexes(&r);
    }

    #[test]
    fn stage_moves_move_index_entries() {
        let mut r = Replica::new();
        r.upsert(lead(1, stage(1, 10), 100));
        r.upsert(lead(2, stage(1, 10), 100));
        assert!(r.upsert(lead(1, stage(2, 142), 101)));
        assert_eq!(
            stage_ids(&r),
            vec![(stage(1, 10), vec![2]), (stage(2, 142), vec![1])]
        );
        // The last lead of a stage leaves: the stage goes with it.
        assert!(r.upsert(lead(2, stage(2, 142), 102)));
        assert_eq!(stage_ids(&r), vec![(stage(2, 142), vec![1, 2])]);
        // A new updated_at and created_at in the same stage move the order entries.
        let mut l = lead(1, stage(2, 142), 200);
        l.created_at = None;
        assert!(r.upsert(l));
        assert_indexes(&r);
        let v = view_of("filter[statuses][0][pipeline_id]=2&filter[statuses][0][status_id]=142&filter[statuses][1][pipeline_id]=1&filter[statuses][1][status_id]=10&order[created_at]=asc", &Held::default());
        assert_eq!(page_ids(&r, &v, 0, 10), (vec![1, 2], false));
        let (leads, _) = r.page(&v, 0, 10);
        assert_eq!(leads[0].sort, None);
        let mut ids: Vec<i64> = r.ids().collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn a_delete_then_an_equal_time_restore_read() {
        let mut r = Replica::new();
        r.upsert(lead(1, stage(1, 10), 100));
        assert!(!r.delete(1, 99), "the held lead is newer than the deletion");
        assert_eq!(r.tombstones(), 0);
        assert!(r.delete(1, 100));
        assert!(r.get(1).is_none());
        assert_eq!(r.tombstones(), 1);
        assert!(stage_ids(&r).is_empty());
        // An older read cannot bring it back; a read at the deletion's time (a restore) can.
        assert!(!r.upsert(lead(1, stage(1, 10), 99)));
        assert!(r.upsert(lead(1, stage(1, 11), 100)));
        assert_eq!(r.get(1).unwrap().stage, stage(1, 11));
        assert_eq!(r.tombstones(), 0);
        // Deleting an id never held leaves a tombstone all the same.
        assert!(!r.delete(7, 50));
        assert!(!r.upsert(lead(7, stage(1, 10), 49)));
        // A later deletion of the same id moves its tombstone forward, never back.
        r.delete(7, 60);
        r.delete(7, 55);
        assert!(!r.upsert(lead(7, stage(1, 10), 59)));
        assert!(r.upsert(lead(7, stage(1, 10), 60)));
        assert_indexes(&r);
    }

    #[test]
    fn prune_drops_only_older_tombstones() {
        let mut r = Replica::new();
        r.delete(1, 10);
        r.delete(2, 20);
        r.prune_tombstones(20);
        assert_eq!(r.tombstones(), 1);
        // Pruned: an old read of 1 is applied again; 2 is still guarded.
        assert!(r.upsert(lead(1, stage(1, 10), 5)));
        assert!(!r.upsert(lead(2, stage(1, 10), 19)));
        r.prune_tombstones(21);
        assert_eq!(r.tombstones(), 0);
    }

    #[test]
    fn remove_is_unconditional_and_leaves_no_tombstone() {
        let mut r = Replica::new();
        r.upsert(lead(1, stage(1, 10), 100));
        assert!(r.remove(1).is_some());
        assert!(r.remove(1).is_none());
        assert!(r.is_empty());
        assert_eq!(r.tombstones(), 0);
        assert!(r.upsert(lead(1, stage(1, 10), 1)));
    }

    #[test]
    fn bytes_count_leads_their_overhead_and_tombstones() {
        let mut r = Replica::new();
        assert_eq!(r.bytes(), 0);
        let a = lead(1, stage(1, 10), 100);
        let len = a.raw.len();
        r.upsert(a);
        assert_eq!(r.bytes(), len + LEAD_OVERHEAD);
        let mut b = lead(1, stage(1, 10), 101);
        b.raw = Bytes::from_static(b"{}");
        r.upsert(b);
        assert_eq!(r.bytes(), 2 + LEAD_OVERHEAD);
        r.delete(1, 200);
        assert_eq!(r.bytes(), TOMBSTONE_OVERHEAD);
        assert!(LEAD_OVERHEAD > size_of::<Lead>());
    }

    const TWO_STAGES: &str = "filter[statuses][0][pipeline_id]=1&filter[statuses][0][status_id]=10&filter[statuses][1][pipeline_id]=2&filter[statuses][1][status_id]=142";

    #[test]
    fn pages_cut_the_merged_order_and_say_whether_more_follow() {
        let mut r = Replica::new();
        for id in 1..=6 {
            let s = if id % 2 == 0 {
                stage(1, 10)
            } else {
                stage(2, 142)
            };
            r.upsert(lead(id, s, 100 - id));
        }
        // A stage the view does not name.
        r.upsert(lead(7, stage(3, 10), 1));
        let by_id = view_of(TWO_STAGES, &Held::default());
        assert_eq!(page_ids(&r, &by_id, 0, 4), (vec![1, 2, 3, 4], true));
        assert_eq!(page_ids(&r, &by_id, 4, 2), (vec![5, 6], false));
        assert_eq!(page_ids(&r, &by_id, 4, 3), (vec![5, 6], false));
        assert_eq!(page_ids(&r, &by_id, 6, 3), (vec![], false));
        assert_eq!(page_ids(&r, &by_id, u64::MAX, 3), (vec![], false));
        let (leads, _) = r.page(&by_id, 0, 1);
        assert_eq!(leads[0].sort, Some(1));
        let q = format!("{TWO_STAGES}&order[updated_at]=desc&filter[updated_at][to]=97");
        let by_update = view_of(&q, &Held::default());
        assert_eq!(page_ids(&r, &by_update, 0, 2), (vec![3, 4], true));
        let (leads, _) = r.page(&by_update, 0, 1);
        assert_eq!(leads[0].sort, Some(97));
        let q = format!("{TWO_STAGES}&order[id]=desc&filter[pipeline_id]=1&filter[id][]=2&filter[id][]=3&filter[id][]=4&filter[id][]=7");
        assert_eq!(
            page_ids(&r, &view_of(&q, &Held::default()), 0, 5),
            (vec![4, 2], false)
        );
        // An empty range: nothing, and no panic seeking it.
        let q = format!("{TWO_STAGES}&order[created_at]=asc&filter[created_at][from]=50&filter[created_at][to]=40");
        assert_eq!(
            page_ids(&r, &view_of(&q, &Held::default()), 0, 5),
            (vec![], false)
        );
    }

    #[test]
    fn pages_carry_the_bytes_the_view_asks_for() {
        let contacts = held(&["contacts".to_string()]).unwrap();
        let mut r = Replica::new();
        let mut l = lead(1, stage(1, 10), 1);
        l.raw = Bytes::from_static(br#"{"id":1,"_embedded":{"tags":[],"contacts":[{"id":3}]}}"#);
        r.upsert(l.clone());
        let (leads, _) = r.page(&view_of(TWO_STAGES, &contacts), 0, 1);
        assert_eq!(&leads[0].raw[..], br#"{"id":1,"_embedded":{"tags":[]}}"#);
        let asked = format!("{TWO_STAGES}&with=contacts");
        let (leads, _) = r.page(&view_of(&asked, &contacts), 0, 1);
        assert_eq!(leads[0].raw, l.raw);
    }

    // === the replica's pages against the fan-out's merge ===

    const STAGE_POOL: [(i64, i64); 5] = [(1, 10), (1, 11), (2, 10), (2, 142), (3, 142)];
    const LIST_FIELDS: [&str; 5] = [
        "id",
        "pipeline_id",
        "responsible_user_id",
        "created_by",
        "updated_by",
    ];
    const RANGE_FIELDS: [&str; 5] = [
        "price",
        "created_at",
        "updated_at",
        "closed_at",
        "closest_task_at",
    ];

    #[derive(Debug, Clone)]
    enum Op {
        Upsert(Lead),
        Delete(i64, i64),
        Remove(i64),
        Prune(i64),
    }

    /// A request: stages (indices into the pool), order, filters, `with=contacts` or not.
    #[derive(Debug, Clone)]
    struct Request {
        stages: Vec<usize>,
        order: Option<(usize, bool)>,
        lists: Vec<Option<(Vec<i64>, u8)>>,
        ranges: Vec<Option<(Option<i64>, Option<i64>)>>,
        contacts: bool,
    }

    fn small() -> impl Strategy<Value = Option<i64>> {
        prop::option::weighted(0.8, 0i64..10)
    }

    fn raw(id: i64, contacts: bool) -> Bytes {
        let contacts = if contacts {
            r#","contacts":[{"id":9}]"#
        } else {
            ""
        };
        Bytes::from(format!(
            r#"{{"id":{id},"name":"\u00e9\/{id}","_embedded":{{"tags":[]{contacts}}}}}"#
        ))
    }

    fn arb_lead() -> impl Strategy<Value = Lead> {
        (
            (0i64..40, 0usize..5, 0i64..12),
            (
                prop::option::weighted(0.8, 0i64..4),
                prop::option::weighted(0.8, 0i64..4),
                prop::option::weighted(0.8, 0i64..4),
            ),
            (small(), small(), small(), small()),
        )
            .prop_map(
                |(
                    (id, s, updated_at),
                    (responsible, created_by, updated_by),
                    (price, created_at, closed_at, closest_task_at),
                )| Lead {
                    id,
                    stage: stage(STAGE_POOL[s].0, STAGE_POOL[s].1),
                    responsible_user_id: responsible,
                    created_by,
                    updated_by,
                    price,
                    created_at,
                    updated_at,
                    closed_at,
                    closest_task_at,
                    raw: raw(id, true),
                },
            )
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => arb_lead().prop_map(Op::Upsert),
            1 => (0i64..40, 0i64..12).prop_map(|(id, at)| Op::Delete(id, at)),
            1 => (0i64..40).prop_map(Op::Remove),
            1 => (0i64..12).prop_map(Op::Prune),
        ]
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let list =
            |hi: i64| prop::option::weighted(0.25, (prop::collection::vec(0..hi, 1..4), 0u8..4));
        let range = prop::option::weighted(
            0.2,
            (small(), small()).prop_filter("a bound", |(f, t)| f.is_some() || t.is_some()),
        );
        (
            prop::sample::subsequence((0..5).collect::<Vec<usize>>(), 1..5).prop_shuffle(),
            prop::option::of((0usize..3, any::<bool>())),
            (list(40), list(4), list(4), list(4), list(4)),
            prop::collection::vec(range, 5),
            any::<bool>(),
        )
            .prop_map(
                |(stages, order, (a, b, c, d, e), ranges, contacts)| Request {
                    stages,
                    order,
                    lists: vec![a, b, c, d, e],
                    ranges,
                    contacts,
                },
            )
    }

    impl Request {
        fn query(&self) -> String {
            let mut params = Vec::new();
            for (i, &s) in self.stages.iter().enumerate() {
                let (p, st) = STAGE_POOL[s];
                params.push(format!("filter[statuses][{i}][pipeline_id]={p}"));
                params.push(format!("filter%5Bstatuses%5D%5B{i}%5D%5Bstatus_id%5D={st}"));
            }
            if let Some((field, desc)) = self.order {
                let field = ["id", "created_at", "updated_at"][field];
                params.push(format!(
                    "order[{field}]={}",
                    if desc { "desc" } else { "asc" }
                ));
            }
            for (field, list) in LIST_FIELDS.iter().zip(&self.lists) {
                let Some((values, spelling)) = list else {
                    continue;
                };
                for (j, v) in values.iter().enumerate() {
                    let key = match spelling {
                        0 => format!("filter[{field}]"),
                        1 => format!("filter[{field}][]"),
                        2 => format!("filter[{field}][{j}]"),
                        _ => format!("filter%5B{field}%5D%5B%5D"),
                    };
                    params.push(format!("{key}={v}"));
                }
            }
            for (field, range) in RANGE_FIELDS.iter().zip(&self.ranges) {
                let Some((from, to)) = range else { continue };
                if let Some(from) = from {
                    params.push(format!("filter[{field}][from]={from}"));
                }
                if let Some(to) = to {
                    params.push(format!("filter%5B{field}%5D%5Bto%5D={to}"));
                }
            }
            if self.contacts {
                params.push("with=contacts".into());
            }
            params.join("&")
        }

        fn order(&self) -> Order {
            self.order.map_or(Order::DEFAULT, |(field, desc)| Order {
                field: [OrderField::Id, OrderField::CreatedAt, OrderField::UpdatedAt][field],
                direction: if desc {
                    Direction::Desc
                } else {
                    Direction::Asc
                },
            })
        }

        /// The filters, restated from the request: AND across, OR within a list, a `null`
        /// outside every bounded range and every list.
        fn admits(&self, l: &Lead) -> bool {
            let values = [
                Some(l.id),
                Some(l.stage.pipeline_id),
                l.responsible_user_id,
                l.created_by,
                l.updated_by,
            ];
            let lists = self.lists.iter().zip(values).all(|(list, v)| match list {
                None => true,
                Some((values, _)) => v.is_some_and(|v| values.contains(&v)),
            });
            let fields = [
                l.price,
                l.created_at,
                Some(l.updated_at),
                l.closed_at,
                l.closest_task_at,
            ];
            let ranges = self
                .ranges
                .iter()
                .zip(fields)
                .all(|(range, v)| match range {
                    None => true,
                    Some((from, to)) => {
                        v.is_some_and(|v| from.is_none_or(|f| f <= v) && to.is_none_or(|t| v <= t))
                    }
                });
            lists && ranges
        }
    }

    /// The fan-out's answer over the same leads: one stream per stage, each filtered and
    /// sorted as Kommo sends it, merged by `Merger` fed in pages of `page_size`.
    fn fan_out(
        leads: &[Lead],
        req: &Request,
        offset: u64,
        limit: usize,
        page_size: usize,
    ) -> (Vec<LeadRef>, bool) {
        let order = req.order();
        let streams: Vec<Vec<LeadRef>> = req
            .stages
            .iter()
            .map(|&s| {
                let (p, st) = STAGE_POOL[s];
                let mut stream: Vec<LeadRef> = leads
                    .iter()
                    .filter(|l| l.stage == stage(p, st) && req.admits(l))
                    .map(|l| LeadRef {
                        id: l.id,
                        sort: sort_value(l, order.field),
                        raw: raw(l.id, req.contacts),
                    })
                    .collect();
                stream.sort_by_key(|l| (l.sort, l.id));
                if order.direction == Direction::Desc {
                    stream.reverse();
                }
                stream
            })
            .collect();
        let mut merger = Merger::new(streams.len(), order);
        let mut all = Vec::new();
        loop {
            match merger.next_step() {
                Step::Lead(l) => all.push(l),
                Step::Done => break,
                Step::Need(need) => {
                    for i in need {
                        let start = merger.pages_fed(i) as usize * page_size;
                        let page: Vec<LeadRef> = streams[i]
                            .iter()
                            .skip(start)
                            .take(page_size)
                            .cloned()
                            .collect();
                        let last = page.len() < page_size;
                        merger.feed(i, page, last);
                    }
                }
            }
        }
        let offset = offset as usize;
        let page = all.iter().skip(offset).take(limit).cloned().collect();
        (page, all.len() > offset + limit)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 384, rng_seed: proptest::test_runner::RngSeed::Fixed(11), ..ProptestConfig::default() })]
        #[test]
        fn pages_equal_the_fan_out_merge(
            ops in prop::collection::vec(arb_op(), 0..90),
            requests in prop::collection::vec((arb_request(), 0u64..30, 1usize..12, 1usize..6), 1..4),
        ) {
            let contacts = held(&["contacts".to_string()]).unwrap();
            let mut r = Replica::new();
            // The rules restated: what the replica must hold after each operation.
            let mut model: HashMap<i64, Lead> = HashMap::new();
            let mut tombstones: HashMap<i64, i64> = HashMap::new();
            for op in ops {
                match op {
                    Op::Upsert(l) => {
                        let older = tombstones.get(&l.id).is_some_and(|&t| l.updated_at < t)
                            || model.get(&l.id).is_some_and(|h| l.updated_at < h.updated_at);
                        prop_assert_eq!(r.upsert(l.clone()), !older);
                        if !older {
                            tombstones.remove(&l.id);
                            model.insert(l.id, l);
                        }
                    }
                    Op::Delete(id, at) => {
                        let newer = model.get(&id).is_some_and(|h| h.updated_at > at);
                        let removed = !newer && model.remove(&id).is_some();
                        if !newer {
                            let t = tombstones.entry(id).or_insert(at);
                            *t = (*t).max(at);
                        }
                        prop_assert_eq!(r.delete(id, at), removed);
                    }
                    Op::Remove(id) => prop_assert_eq!(r.remove(id).is_some(), model.remove(&id).is_some()),
                    Op::Prune(before) => {
                        tombstones.retain(|_, &mut t| t >= before);
                        r.prune_tombstones(before);
                    }
                }
            }
            prop_assert_eq!(r.len(), model.len());
            prop_assert_eq!(r.tombstones(), tombstones.len());
            for (id, l) in &model {
                prop_assert_eq!(r.get(*id), Some(l));
            }
            let ids: HashSet<i64> = r.ids().collect();
            prop_assert_eq!(ids, model.keys().copied().collect::<HashSet<i64>>());
            assert_indexes(&r);

            let leads: Vec<Lead> = model.into_values().collect();
            for (req, offset, limit, page_size) in requests {
                let q = req.query();
                let v = view(&parse(&q, QueryLimits { max_pairs: 100 }).unwrap(), &contacts).unwrap();
                prop_assert_eq!(v.order, req.order());
                for l in &leads {
                    let in_view = req.stages.iter().any(|&s| l.stage == stage(STAGE_POOL[s].0, STAGE_POOL[s].1)) && req.admits(l);
                    prop_assert_eq!(v.matches(l), in_view, "{} {:?}", q, l);
                }
                let got = r.page(&v, offset, limit);
                let want = fan_out(&leads, &req, offset, limit, page_size);
                prop_assert_eq!(got, want, "{}", q);
            }
        }
    }
}
