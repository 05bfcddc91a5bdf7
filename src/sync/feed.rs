//! What the live views read from Kommo, and how: the targets of the keyset reads and of the
//! events feed, and the events page. Pure: the sync task does the I/O.
//!
//! Leads changed since a moment are `filter[updated_at][from]` with `order[updated_at]=asc`
//! (`kommo-api-notes.md`, "Changes since a moment"); deletions and restores are in the events
//! feed (`GET /api/v4/events`, newest first, at most 100 a page).

use serde::Deserialize;

use crate::leads::plan::LEADS_PATH;
use crate::leads::query::MAX_LIMIT;

/// Kommo's largest events page.
pub const EVENTS_LIMIT: usize = 100;

/// The event types the sync reads: a deleted lead leaves the replica; a restored one is read
/// again (its `updated_at` moves too, but the feed says so for certain).
pub const EVENT_TYPES: &str = "lead_deleted,lead_restored";

/// A keyset read of leads by `(updated_at, id)`: page numbers shift while the account changes,
/// a lower bound on `updated_at` does not. Each page starts at the last `updated_at` read (so
/// the leads of that second are read again, harmlessly); only when a whole page shares one
/// second does the read move to the next page of the same bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyset {
    pub from: i64,
    /// The upper bound (inclusive), if any: a load reads up to the moment it started.
    pub to: Option<i64>,
    pub page: u32,
}

impl Keyset {
    pub fn new(from: i64, to: Option<i64>) -> Self {
        Keyset { from, to, page: 1 }
    }

    /// The target of the current page; `with` is the `with` value to ask for (may be empty).
    pub fn target(&self, with: &str) -> String {
        let mut t = format!(
            "{LEADS_PATH}?filter%5Bupdated_at%5D%5Bfrom%5D={}",
            self.from
        );
        if let Some(to) = self.to {
            t.push_str(&format!("&filter%5Bupdated_at%5D%5Bto%5D={to}"));
        }
        if !with.is_empty() {
            t.push_str("&with=");
            t.push_str(&form_urlencoded::byte_serialize(with.as_bytes()).collect::<String>());
        }
        t.push_str(&format!(
            "&order%5Bupdated_at%5D=asc&limit={MAX_LIMIT}&page={}",
            self.page
        ));
        t
    }

    /// Moves past a page of `read` leads whose last `updated_at` is `last`; `false` when the
    /// read is complete (a short page, or an empty one).
    pub fn advance(&mut self, read: usize, last: Option<i64>) -> bool {
        let Some(last) = last.filter(|_| read >= MAX_LIMIT as usize) else {
            return false;
        };
        if last > self.from {
            self.from = last;
            self.page = 1;
        } else {
            self.page += 1;
        }
        true
    }
}

/// The target of page `page` of the deletions and restores at or after `from`.
pub fn events_target(from: i64, page: u32) -> String {
    format!(
        "/api/v4/events?filter%5Btype%5D={}&filter%5Bcreated_at%5D%5Bfrom%5D={from}&limit={EVENTS_LIMIT}&page={page}",
        form_urlencoded::byte_serialize(EVENT_TYPES.as_bytes()).collect::<String>()
    )
}

/// One event of the feed, as the sync reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Kommo's event id (a string; a number is read as its decimal text).
    pub id: String,
    pub deleted: bool,
    pub lead: i64,
    pub created_at: i64,
}

#[derive(Deserialize)]
struct Page {
    #[serde(rename = "_embedded")]
    embedded: Embedded,
}

#[derive(Deserialize)]
struct Embedded {
    events: Vec<RawEvent>,
}

#[derive(Deserialize)]
struct RawEvent {
    id: serde_json::Value,
    #[serde(rename = "type")]
    kind: String,
    entity_id: i64,
    #[serde(default)]
    entity_type: Option<String>,
    created_at: i64,
}

/// The lead deletions and restores of a `200` events page (other events skipped), and how
/// many events the page held (a full page means another may follow).
pub fn parse_events(body: &[u8]) -> Result<(Vec<Event>, usize), String> {
    let page: Page = serde_json::from_slice(body)
        .map_err(|e| format!("the events page is not the expected HAL document: {e}"))?;
    let len = page.embedded.events.len();
    let events = page
        .embedded
        .events
        .into_iter()
        .filter(|e| e.entity_type.as_deref().is_none_or(|t| t == "lead"))
        .filter_map(|e| {
            let deleted = match e.kind.as_str() {
                "lead_deleted" => true,
                "lead_restored" => false,
                _ => return None,
            };
            let id = match e.id {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            Some(Event {
                id,
                deleted,
                lead: e.entity_id,
                created_at: e.created_at,
            })
        })
        .collect();
    Ok((events, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyset_moves_its_bound_and_pages_only_within_one_second() {
        let mut k = Keyset::new(0, Some(500));
        assert_eq!(
            k.target(""),
            "/api/v4/leads?filter%5Bupdated_at%5D%5Bfrom%5D=0&filter%5Bupdated_at%5D%5Bto%5D=500\
             &order%5Bupdated_at%5D=asc&limit=250&page=1"
        );
        assert!(k.advance(250, Some(100)));
        assert_eq!((k.from, k.page), (100, 1));
        // A whole page of the same second: the next page of that bound.
        assert!(k.advance(250, Some(100)));
        assert_eq!((k.from, k.page), (100, 2));
        assert!(k.advance(250, Some(101)));
        assert_eq!((k.from, k.page), (101, 1));
        assert!(!k.advance(249, Some(300)), "a short page ends the read");
        assert!(!k.advance(0, None), "an empty page (204) ends the read");
        let with = Keyset::new(7, None).target("contacts,loss_reason");
        assert!(with.contains("&with=contacts%2Closs_reason&"), "{with}");
        assert!(!with.contains("%5Bto%5D"));
    }

    #[test]
    fn events_are_read_in_any_spelling_and_others_skipped() {
        let body = br#"{"_page":1,"_links":{},"_embedded":{"events":[
            {"id":"01jd","type":"lead_deleted","entity_id":5,"entity_type":"lead","created_at":10},
            {"id":77,"type":"lead_restored","entity_id":6,"created_at":11,"value_after":[]},
            {"id":"x","type":"lead_status_changed","entity_id":7,"entity_type":"lead","created_at":12},
            {"id":"y","type":"lead_deleted","entity_id":8,"entity_type":"contact","created_at":12}]}}"#;
        let (events, len) = parse_events(body).unwrap();
        assert_eq!(len, 4);
        assert_eq!(
            events,
            vec![
                Event {
                    id: "01jd".into(),
                    deleted: true,
                    lead: 5,
                    created_at: 10
                },
                Event {
                    id: "77".into(),
                    deleted: false,
                    lead: 6,
                    created_at: 11
                },
            ]
        );
        let php = br#"{"_embedded":{"events":[{"id":"a\/b","type":"lead_deleted","entity_id":1,"created_at":1}]}}"#;
        assert_eq!(parse_events(php).unwrap().0[0].id, "a/b");
        assert!(parse_events(b"<html>").is_err());
        assert!(events_target(99, 2).contains("filter%5Btype%5D=lead_deleted%2Clead_restored"));
    }
}
