//! The account's change feed: the events Kommo records when a lead changes, kept in memory in
//! recording order, and the sim's reading of a `GET /api/v4/events` query.
//!
//! Kommo documents the method on its reference pages
//! (<https://developers.kommo.com/reference/events-list>,
//! <https://kommo.com/developers/content/api_v4/events-and-notes>, and in Russian
//! <https://www.amocrm.ru/developers/content/crm_platform/events-and-notes>);
//! `kommo-api-notes.md` ("Events") sums up what SDK users report.

use std::collections::VecDeque;

use super::data::Store;
use super::query::{self, QueryError, Range};
use super::rng::SplitMix64;
use super::TokenSpec;

/// Most `limit` of one events page: Kommo's Russian reference ("Максимум – 100") and
/// `kommo-api-notes.md` ("`limit` up to 100"; the English reference says 250). More reads the
/// default page of 50, as SDK users saw (Krukov/amocrm_api#76: "only the first 50 events").
pub(crate) const MAX_EVENTS_LIMIT: u32 = 100;
/// Most ids `filter[entity_id]` takes: "An array of up to 10 ID can be passed" (Kommo's reference).
pub(crate) const MAX_ENTITY_IDS: usize = 10;
/// How many events the sim keeps; older ones are dropped, as a bounded history.
pub(crate) const MAX_EVENTS: usize = 100_000;

/// What happened to a lead: Kommo's event `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimEventType {
    /// `lead_added`: a lead was created.
    LeadAdded,
    /// `lead_deleted`: a lead was deleted (it stays restorable, listed with `with=only_deleted`).
    LeadDeleted,
    /// `lead_restored`: a deleted lead came back.
    LeadRestored,
    /// `lead_status_changed`: a lead moved to another stage, of its pipeline or of another.
    LeadStatusChanged,
    /// `sale_field_changed`: a lead's sale value (`price`) changed.
    SaleFieldChanged,
}

/// What an event records before or after the change (its `value_before` / `value_after`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimEventValue {
    /// Nothing recorded: `[]`.
    Empty,
    /// A stage: `[{"lead_status": {"id": status_id, "pipeline_id": pipeline_id}}]`.
    Status {
        /// The pipeline.
        pipeline_id: i64,
        /// The stage within it.
        status_id: i64,
    },
    /// A sale value: `[{"sale_field_value": {"sale": N}}]`.
    Sale(i64),
}

/// One event of the account's feed, as the sim recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimEvent {
    /// Kommo's event id: a string, here a ULID (26 lower-case Crockford base-32 characters) made
    /// from `created_at` and a sequence number, so ids sort as the events were recorded.
    pub id: String,
    /// What happened.
    pub type_: SimEventType,
    /// The lead it happened to.
    pub entity_id: i64,
    /// The user who made the change.
    pub created_by: i64,
    /// When, Unix seconds on the sim's clock; never before the event recorded just before it.
    pub created_at: i64,
    /// The value before the change.
    pub value_before: SimEventValue,
    /// The value after the change.
    pub value_after: SimEventValue,
}

/// The recorded events, oldest first; sorted by `(created_at, id)` because `created_at` never goes
/// back and ids grow with each event.
#[derive(Debug)]
pub(crate) struct EventLog {
    /// At most [`MAX_EVENTS`], oldest first. A `VecDeque`: append at one end, drop at the other.
    events: VecDeque<SimEvent>,
    /// Sequence number of the next event (the low bits of its id).
    next_seq: u64,
    /// Seed-derived high bits of every id's random part, so two accounts' ids differ.
    salt: u16,
}

impl SimEventType {
    /// Kommo's spelling of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            SimEventType::LeadAdded => "lead_added",
            SimEventType::LeadDeleted => "lead_deleted",
            SimEventType::LeadRestored => "lead_restored",
            SimEventType::LeadStatusChanged => "lead_status_changed",
            SimEventType::SaleFieldChanged => "sale_field_changed",
        }
    }
}

impl std::fmt::Display for SimEventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl EventLog ===

impl EventLog {
    /// An empty log whose ids depend on `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            events: VecDeque::new(),
            next_seq: 0,
            salt: SplitMix64::derived(seed, 4).next_u64() as u16,
        }
    }

    /// Record an event at `now` (or at the last event's time, if the clock read earlier); the
    /// oldest event goes once there are more than [`MAX_EVENTS`].
    pub(crate) fn record(
        &mut self,
        type_: SimEventType,
        entity_id: i64,
        created_by: i64,
        now: i64,
        value_before: SimEventValue,
        value_after: SimEventValue,
    ) {
        let created_at = self.events.back().map_or(now, |e| e.created_at.max(now));
        let seq = self.next_seq;
        self.next_seq += 1;
        self.events.push_back(SimEvent {
            id: ulid(created_at, self.salt, seq),
            type_,
            entity_id,
            created_by,
            created_at,
            value_before,
            value_after,
        });
        if self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// Every event kept, oldest first.
    pub(crate) fn all(&self) -> Vec<SimEvent> {
        self.events.iter().cloned().collect()
    }

    /// The events with `created_at` inside `range`, oldest first.
    fn within(&self, range: Range) -> impl DoubleEndedIterator<Item = &SimEvent> {
        let start = range.from.map_or(0, |from| {
            self.events.partition_point(|e| e.created_at < from)
        });
        let end = range.to.map_or(self.events.len(), |to| {
            self.events.partition_point(|e| e.created_at <= to)
        });
        self.events.range(start..end.max(start))
    }

    /// An event by id.
    pub(crate) fn find(&self, id: &str) -> Option<&SimEvent> {
        self.events.iter().find(|e| e.id == id)
    }
}

/// A ULID: 48 bits of milliseconds, then 80 bits (`salt`, then `seq`), as 26 Crockford base-32
/// digits in lower case, the way Kommo's event ids look (`01drbfj5a8k9zd60bgg907a6w9` in its
/// reference). Deterministic: the same account records the same ids.
fn ulid(created_at: i64, salt: u16, seq: u64) -> String {
    const DIGITS: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let millis = (created_at.max(0) as u128 * 1000) & ((1 << 48) - 1);
    let value = (millis << 80) | (u128::from(salt) << 64) | u128::from(seq);
    (0..26)
        .rev()
        .map(|i| char::from(DIGITS[((value >> (i * 5)) & 31) as usize]))
        .collect()
}

/// A parsed `GET /api/v4/events` request.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct EventsQuery {
    /// Page number, from 1.
    pub(crate) page: u32,
    /// Page size, 1..=100.
    pub(crate) limit: u32,
    /// `filter[id]`: event ids.
    ids: Option<Vec<String>>,
    /// `filter[type]`: type names; one the sim does not know matches nothing.
    types: Option<Vec<String>>,
    /// `filter[entity]`: entity kinds (`lead`, `contact`, ...); the sim records only `lead`.
    entities: Option<Vec<String>>,
    /// `filter[entity_id]`: at most [`MAX_ENTITY_IDS`].
    entity_ids: Option<Vec<i64>>,
    /// `filter[created_by]`: users.
    created_by: Option<Vec<i64>>,
    /// `filter[created_at]`, inclusive.
    created_at: Range,
}

/// Parse the query of an events list.
///
/// Lists (`filter[type]`, `filter[entity]`, `filter[entity_id]`, `filter[id]`,
/// `filter[created_by]`) come as a comma list, the way the official PHP SDK sends them
/// (`EventsFilter::buildFilter` joins with `,`), or as an array in any of the three spellings
/// (`kommo-api-notes.md`, "Events" and "Filters"). `filter[created_at]` is one timestamp meaning
/// "from" ("events created after the timestamp value", Kommo's reference), `from,to` (the Russian
/// reference: "до 2-ух timestamp через запятую"), or `[from]`/`[to]`; every bound is inclusive.
pub(crate) fn parse(raw: &str) -> Result<EventsQuery, QueryError> {
    let mut q = EventsQuery {
        page: 1,
        limit: query::DEFAULT_LIMIT,
        ..EventsQuery::default()
    };
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        let Some((base, segs)) = query::split_key(&key) else {
            continue;
        };
        match (base, segs.as_slice()) {
            ("page", []) => q.page = query::parse_page(&value)?,
            ("limit", []) => q.limit = query::parse_limit_up_to(&value, MAX_EVENTS_LIMIT)?,
            ("filter", [field, rest @ ..]) => parse_filter(&mut q, field, rest, &value)?,
            _ => {}
        }
    }
    if q.entity_ids
        .as_ref()
        .is_some_and(|ids| ids.len() > MAX_ENTITY_IDS)
    {
        return Err(QueryError::new(
            "filter.entity_id",
            "InvalidValue",
            format!("At most {MAX_ENTITY_IDS} entity ids can be filtered in one request."),
        ));
    }
    Ok(q)
}

fn parse_filter(
    q: &mut EventsQuery,
    field: &str,
    rest: &[&str],
    value: &str,
) -> Result<(), QueryError> {
    let path = format!("filter.{field}");
    let items = || {
        value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
    };
    let ints = |list: &mut Option<Vec<i64>>| -> Result<(), QueryError> {
        let list = list.get_or_insert_with(Vec::new);
        for item in items() {
            list.push(query::parse_int(&path, item)?);
        }
        Ok(())
    };
    match field {
        "id" | "type" | "entity" if query::is_list_element(rest) => {
            let list = match field {
                "id" => &mut q.ids,
                "type" => &mut q.types,
                _ => &mut q.entities,
            };
            list.get_or_insert_with(Vec::new)
                .extend(items().map(str::to_string));
        }
        "entity_id" if query::is_list_element(rest) => ints(&mut q.entity_ids)?,
        "created_by" if query::is_list_element(rest) => ints(&mut q.created_by)?,
        "created_at" => match rest {
            [] => {
                let mut bounds = items();
                let from = bounds
                    .next()
                    .map(|v| query::parse_int(&path, v))
                    .transpose()?;
                let to = bounds
                    .next()
                    .map(|v| query::parse_int(&path, v))
                    .transpose()?;
                q.created_at = Range { from, to };
            }
            ["from"] => q.created_at.from = Some(query::parse_int(&format!("{path}.from"), value)?),
            ["to"] => q.created_at.to = Some(query::parse_int(&format!("{path}.to"), value)?),
            _ => {}
        },
        _ => {}
    }
    Ok(())
}

// === impl EventsQuery ===

impl EventsQuery {
    /// Whether an event matches every filter and `token` may see it: "The returned data depends on
    /// the user's rights for the entity" (Kommo's reference), so a token sees the events of the leads
    /// it sees (deleted ones included: their events stay in the feed).
    fn matches(&self, event: &SimEvent, store: &Store, token: &TokenSpec) -> bool {
        let in_list = |list: &Option<Vec<String>>, value: &str| {
            list.as_ref().is_none_or(|l| l.iter().any(|v| v == value))
        };
        in_list(&self.ids, &event.id)
            && in_list(&self.types, event.type_.as_str())
            && in_list(&self.entities, "lead")
            && self
                .entity_ids
                .as_ref()
                .is_none_or(|ids| ids.contains(&event.entity_id))
            && self
                .created_by
                .as_ref()
                .is_none_or(|ids| ids.contains(&event.created_by))
            && store
                .lead(event.entity_id)
                .is_some_and(|lead| token.sees(lead.responsible_user_id))
    }

    /// The page this query asks for, newest first (by `created_at`, then id, both descending:
    /// "newest first", `kommo-api-notes.md`); empty past the end.
    pub(crate) fn page_of<'a>(&self, store: &'a Store, token: &TokenSpec) -> Vec<&'a SimEvent> {
        let skip = (self.page as usize - 1).saturating_mul(self.limit as usize);
        store
            .events
            .within(self.created_at)
            .rev()
            .filter(|e| self.matches(e, store, token))
            .skip(skip)
            .take(self.limit as usize)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulids_sort_as_recorded() {
        let a = ulid(1_717_200_000, 7, 0);
        let b = ulid(1_717_200_000, 7, 1);
        let c = ulid(1_717_200_001, 7, 0);
        assert_eq!(a.len(), 26);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(a.starts_with("01"), "{a}");
        assert!(a
            .bytes()
            .all(|ch| ch.is_ascii_digit() || ch.is_ascii_lowercase()));
    }

    #[test]
    fn the_log_keeps_time_order_and_its_bound() {
        let mut log = EventLog::new(1);
        log.record(
            SimEventType::LeadAdded,
            1,
            1001,
            100,
            SimEventValue::Empty,
            SimEventValue::Empty,
        );
        // A clock read earlier than the last event's is recorded at the last event's time.
        log.record(
            SimEventType::LeadDeleted,
            1,
            1001,
            99,
            SimEventValue::Empty,
            SimEventValue::Empty,
        );
        let all = log.all();
        assert_eq!((all[0].created_at, all[1].created_at), (100, 100));
        assert!(all[0].id < all[1].id);
        for i in 0..MAX_EVENTS as i64 {
            log.record(
                SimEventType::SaleFieldChanged,
                2,
                1001,
                200 + i / 1000,
                SimEventValue::Sale(i),
                SimEventValue::Sale(i + 1),
            );
        }
        let all = log.all();
        assert_eq!(all.len(), MAX_EVENTS);
        // The two oldest went.
        assert!(all
            .iter()
            .all(|e| e.type_ == SimEventType::SaleFieldChanged));
        assert_eq!(all[0].value_before, SimEventValue::Sale(0));
        let range = Range {
            from: Some(201),
            to: Some(202),
        };
        let within: Vec<&SimEvent> = log.within(range).collect();
        assert_eq!(within.len(), 2000);
        assert!(within.iter().all(|e| (201..=202).contains(&e.created_at)));
    }

    #[test]
    fn query_spellings() {
        let spellings = [
            "filter[type]=lead_deleted,lead_restored",
            "filter[type][]=lead_deleted&filter[type][]=lead_restored",
            "filter[type][0]=lead_deleted&filter[type][1]=lead_restored",
            "filter[type]=lead_deleted&filter[type]=lead_restored",
            "filter%5Btype%5D%5B%5D=lead_deleted&filter%5Btype%5D%5B%5D=lead_restored",
        ];
        for raw in spellings {
            let q = parse(raw).unwrap();
            assert_eq!(
                q.types,
                Some(vec!["lead_deleted".into(), "lead_restored".into()]),
                "{raw}"
            );
        }
        let q = parse("filter[entity]=lead&filter[entity_id]=5,6&filter[entity_id][]=7").unwrap();
        assert_eq!(q.entities, Some(vec!["lead".into()]));
        assert_eq!(q.entity_ids, Some(vec![5, 6, 7]));
        let range = |raw: &str| parse(raw).unwrap().created_at;
        let r = |from, to| Range { from, to };
        assert_eq!(range("filter[created_at]=10"), r(Some(10), None));
        assert_eq!(range("filter[created_at]=10,20"), r(Some(10), Some(20)));
        assert_eq!(
            range("filter[created_at][from]=10&filter[created_at][to]=20"),
            r(Some(10), Some(20))
        );
        assert_eq!(range("filter[created_at][to]=20"), r(None, Some(20)));
        let q = parse("limit=100&page=3").unwrap();
        assert_eq!((q.limit, q.page), (100, 3));
        assert_eq!(parse("limit=101").unwrap().limit, query::DEFAULT_LIMIT);
        assert_eq!(parse("").unwrap().limit, query::DEFAULT_LIMIT);
        let eleven: Vec<String> = (1..=11).map(|i| i.to_string()).collect();
        let err = parse(&format!("filter[entity_id]={}", eleven.join(","))).unwrap_err();
        assert_eq!(err.path, "filter.entity_id");
        assert!(parse(&format!("filter[entity_id]={}", eleven[..10].join(","))).is_ok());
        for bad in [
            "filter[entity_id]=x",
            "filter[created_at]=soon",
            "filter[created_at][from]=1.5",
            "limit=0",
            "page=0",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
