//! End-to-end tests of the account's changes: the methods that change leads, what listings,
//! `with=only_deleted` and `GET /api/v4/events` show of them, the churn, and the `Date` header.
//! Time is paused, so the sim's clock moves only when a test advances it.

use std::collections::BTreeSet;

use super::*;

/// The ids of a list of events, or of leads, as JSON values.
fn ids_of(items: &[Value]) -> Vec<Value> {
    items.iter().map(|e| e["id"].clone()).collect()
}

impl Harness {
    /// Every event of a query (limit 100, page by page until a 204).
    async fn all_events(&self, query: &str, token: &str) -> Vec<Value> {
        let mut events = Vec::new();
        for page in 1.. {
            let a = self
                .get_as(
                    &format!("/api/v4/events?{query}&limit=100&page={page}"),
                    Some(token),
                )
                .await;
            if a.status == StatusCode::NO_CONTENT {
                assert!(a.body.is_empty());
                break;
            }
            assert_eq!(
                a.status,
                StatusCode::OK,
                "{query}: {}",
                String::from_utf8_lossy(&a.body)
            );
            assert_eq!(a.content_type(), "application/hal+json");
            let page_events = a.json()["_embedded"]["events"].as_array().unwrap().clone();
            assert!(!page_events.is_empty() && page_events.len() <= 100);
            events.extend(page_events);
        }
        events
    }

    /// One lead of the ground truth.
    fn lead(&self, id: i64) -> SimLead {
        self.sim.leads().into_iter().find(|l| l.id == id).unwrap()
    }
}

/// The first live leads responsible users 1001 (a [`LIMITED`] token sees them) and 1005 (it does
/// not) are responsible for.
fn seen_and_hidden(sim: &Sim) -> (Vec<i64>, Vec<i64>) {
    let leads = sim.leads();
    let of = |user: i64| {
        leads
            .iter()
            .filter(|l| !l.is_deleted && l.responsible_user_id == user)
            .map(|l| l.id)
            .take(20)
            .collect::<Vec<_>>()
    };
    (of(1001), of(1005))
}

/// A stage of `pipeline` other than `status` and "Incoming leads".
fn another_stage(sim: &Sim, pipeline: i64, status: i64) -> i64 {
    sim.pipelines()
        .into_iter()
        .find(|p| p.id == pipeline)
        .unwrap()
        .statuses
        .into_iter()
        .find(|s| s.type_ != 1 && s.id != status && s.id != 142 && s.id != 143)
        .unwrap()
        .id
}

#[tokio::test(start_paused = true)]
async fn changes_bump_updated_at_and_show_in_lists() {
    let h = Harness::new(config(1000)).await;
    let sim = &h.sim;
    let t0 = sim.now_ts();
    assert_eq!(t0, data::NOW);
    let (seen, _) = seen_and_hidden(sim);
    let (a, b) = (seen[0], seen[1]);
    let before = h.lead(a);

    // Delete: listed only with only_deleted, in Kommo's mostly-null shape.
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(sim.delete_lead(a));
    assert!(!sim.delete_lead(a), "already deleted");
    let deleted = h.lead(a);
    assert!(deleted.is_deleted);
    assert_eq!(deleted.updated_at, t0 + 10);
    assert!(!h.all_ids("", TOKEN).await.contains(&a));
    let stage = stage_query(before.pipeline_id, before.status_id);
    assert!(!h.all_ids(&stage, TOKEN).await.contains(&a));
    assert!(h.all_ids("with=only_deleted", TOKEN).await.contains(&a));
    let v = h
        .get(&format!("/api/v4/leads?with=only_deleted&filter[id]={a}"))
        .await
        .json();
    let lead = v["_embedded"]["leads"][0].as_object().unwrap().clone();
    assert_eq!(lead["id"], a);
    assert_eq!(lead["is_deleted"], true);
    assert_eq!(lead["updated_at"], t0 + 10);
    assert_eq!(lead["updated_by"], deleted.updated_by);
    assert_eq!(lead["account_id"], data::ACCOUNT_ID);
    for (key, value) in &lead {
        let filled = ["id", "updated_by", "updated_at", "is_deleted", "account_id"];
        if !filled.contains(&key.as_str()) && !key.starts_with('_') {
            assert!(value.is_null(), "{key} is {value}");
        }
    }
    assert_eq!(h.get(&format!("/api/v4/leads/{a}")).await.status, 204);

    // Restore: back in its stage, out of only_deleted, updated later still.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(sim.restore_lead(a));
    assert!(!sim.restore_lead(a), "not deleted");
    assert_eq!(h.lead(a).updated_at, t0 + 15);
    assert!(h.all_ids(&stage, TOKEN).await.contains(&a));
    assert!(!h.all_ids("with=only_deleted", TOKEN).await.contains(&a));

    // Edit: the price changes, updated_at follows; the same price records nothing.
    tokio::time::advance(Duration::from_secs(5)).await;
    let price = h.lead(b).price + 1234;
    assert!(sim.edit_lead(b, price));
    assert_eq!((h.lead(b).price, h.lead(b).updated_at), (price, t0 + 20));
    let events = sim.events().len();
    assert!(sim.edit_lead(b, price));
    assert_eq!(sim.events().len(), events);
    assert!(!sim.edit_lead(1, 5));

    // Moves: closed_at follows 142 and 143.
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(sim.move_lead(b, 2000, 142));
    let won = h.lead(b);
    assert_eq!((won.closed_at, won.updated_at), (Some(t0 + 25), t0 + 25));
    tokio::time::advance(Duration::from_secs(5)).await;
    let open = another_stage(sim, 2000, 142);
    assert!(sim.move_lead(b, 2000, open));
    assert_eq!(h.lead(b).closed_at, None);
    assert!(sim.move_lead(b, 2000, 143));
    assert_eq!(h.lead(b).closed_at, Some(t0 + 30));

    // Create: an id above every other, plausible fields, now as its times, listed in its stage.
    let max_id = sim.leads().iter().map(|l| l.id).max().unwrap();
    let created = sim.create_lead(3000, 142).unwrap();
    assert!(created > max_id);
    let lead = h.lead(created);
    assert_eq!((lead.pipeline_id, lead.status_id), (3000, 142));
    assert_eq!((lead.created_at, lead.updated_at), (t0 + 30, t0 + 30));
    assert_eq!(lead.closed_at, Some(t0 + 30));
    assert!(!lead.name.is_empty() && data::USERS.contains(&lead.responsible_user_id));
    assert!(!lead.is_deleted);
    let contacts: BTreeSet<i64> = sim.contacts().iter().map(|c| c.id).collect();
    assert!(lead.contact_ids.iter().all(|id| contacts.contains(id)));
    assert!(h
        .all_ids(&stage_query(3000, 142), TOKEN)
        .await
        .contains(&created));
    assert_eq!(sim.create_lead(3000, 99), None);
    assert_eq!(
        sim.create_lead(1000, 2010),
        None,
        "a stage of another pipeline"
    );

    // What changed since a moment: filter[updated_at] with order[updated_at], ties by id.
    tokio::time::advance(Duration::from_secs(10)).await;
    let t = sim.now_ts();
    let (c, d) = (seen[2], seen[3]);
    assert!(c < d);
    assert!(sim.delete_lead(d));
    assert!(sim.delete_lead(c));
    let range = format!("filter[updated_at][from]={t}&filter[updated_at][to]={t}");
    for (order, want) in [("asc", vec![c, d]), ("desc", vec![d, c])] {
        let q = format!("with=only_deleted&{range}&order[updated_at]={order}");
        assert_eq!(h.all_ids(&q, TOKEN).await, want, "{order}");
    }
    let q = format!(
        "with=only_deleted&filter[updated_at][from]={}&order[updated_at]=desc",
        t0 + 1
    );
    assert_eq!(h.all_ids(&q, TOKEN).await, vec![d, c], "a is restored");
    assert!(sim.edit_lead(seen[5], 1));
    assert!(sim.edit_lead(seen[4], 1));
    let q = format!("filter[updated_at][from]={t}&order[updated_at]=asc");
    assert_eq!(h.all_ids(&q, TOKEN).await, vec![seen[4], seen[5]]);
    let q = format!("filter[updated_at][from]={}&order[updated_at]=desc", t0 + 1);
    let ids = h.all_ids(&q, TOKEN).await;
    assert_eq!(ids, vec![seen[5], seen[4], created, b, a]);

    // Every change stamped later than the one before, and no updated_at went back.
    let events = sim.events();
    assert!(events
        .windows(2)
        .all(|w| w[0].created_at <= w[1].created_at));
    for e in &events {
        assert!(h.lead(e.entity_id).updated_at >= e.created_at);
    }
}

#[tokio::test(start_paused = true)]
async fn silent_changes_leave_updated_at_and_the_feed_alone() {
    let h = Harness::new(config(1000)).await;
    let sim = &h.sim;
    let (seen, _) = seen_and_hidden(sim);
    let (a, b) = (seen[0], seen[1]);
    let (before_a, before_b) = (h.lead(a), h.lead(b));
    tokio::time::advance(Duration::from_secs(60)).await;
    let t = sim.now_ts();

    let target = if before_a.pipeline_id == 4000 {
        5000
    } else {
        4000
    };
    assert!(sim.move_lead_silently(a, target, 142));
    assert!(sim.delete_lead_silently(b));
    assert!(!sim.delete_lead_silently(b));
    assert!(!sim.move_lead_silently(a, target, 1));
    assert!(!sim.move_lead_silently(-5, target, 142));

    let (after_a, after_b) = (h.lead(a), h.lead(b));
    assert_eq!((after_a.pipeline_id, after_a.status_id), (target, 142));
    assert!(after_a.closed_at.is_some());
    assert_eq!(after_a.updated_at, before_a.updated_at);
    assert!(after_b.is_deleted);
    assert_eq!(after_b.updated_at, before_b.updated_at);
    assert!(sim.events().is_empty(), "{:?}", sim.events());
    assert_eq!(h.get("/api/v4/events").await.status, 204);

    // The data changed: the lists show it, but nothing says it changed since `t`.
    assert!(h
        .all_ids(&stage_query(target, 142), TOKEN)
        .await
        .contains(&a));
    assert!(!h
        .all_ids(
            &stage_query(before_a.pipeline_id, before_a.status_id),
            TOKEN
        )
        .await
        .contains(&a));
    assert!(!h.all_ids("", TOKEN).await.contains(&b));
    assert!(h.all_ids("with=only_deleted", TOKEN).await.contains(&b));
    let since = format!("filter[updated_at][from]={t}");
    assert!(h.all_ids(&since, TOKEN).await.is_empty());
    assert!(h
        .all_ids(&format!("with=only_deleted&{since}"), TOKEN)
        .await
        .is_empty());
}

#[tokio::test(start_paused = true)]
async fn events_feed_filters_orders_and_pages() {
    let h = Harness::new(config(2000)).await;
    let sim = &h.sim;
    let base = sim.base_url();
    let (seen, hidden) = seen_and_hidden(sim);
    let t0 = sim.now_ts();

    // One of each kind, 10 seconds apart, on a lead the limited token sees and on one it does not.
    let a = h.lead(seen[0]);
    let to = another_stage(sim, a.pipeline_id, a.status_id);
    assert!(sim.move_lead(a.id, a.pipeline_id, to));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(sim.edit_lead(hidden[0], 777));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(sim.delete_lead(seen[1]));
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(sim.restore_lead(seen[1]));
    tokio::time::advance(Duration::from_secs(10)).await;
    let created = sim.create_lead(1000, 142).unwrap();
    // Then 120 price edits, 20 per second, on both leads.
    for i in 0..120 {
        if i % 20 == 0 {
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let id = if i % 3 == 0 { hidden[1] } else { seen[2] };
        // Never a multiple of 500, as generated prices are: every edit changes the price.
        assert!(sim.edit_lead(id, 1001 + i));
    }
    let truth = sim.events();
    assert_eq!(truth.len(), 125);

    // Everything, newest first by created_at, then id.
    let all = h.all_events("", TOKEN).await;
    let want: Vec<Value> = truth
        .iter()
        .rev()
        .map(|e| Value::from(e.id.clone()))
        .collect();
    assert_eq!(ids_of(&all), want);
    let keys: Vec<(i64, String)> = all
        .iter()
        .map(|e| {
            (
                e["created_at"].as_i64().unwrap(),
                e["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(keys, sorted);
    assert!(
        keys.windows(2).any(|w| w[0].0 == w[1].0),
        "ties on created_at"
    );

    // The shape of one event, a status change.
    let moved = all.last().unwrap();
    let id = moved["id"].as_str().unwrap();
    assert_eq!(id.len(), 26);
    assert_eq!(moved["type"], "lead_status_changed");
    assert_eq!(moved["entity_id"], a.id);
    assert_eq!(moved["entity_type"], "lead");
    assert_eq!(moved["created_by"], a.updated_by);
    assert_eq!(moved["created_at"], t0);
    assert_eq!(moved["account_id"], data::ACCOUNT_ID);
    assert_eq!(
        moved["value_before"],
        serde_json::json!([{"lead_status": {"id": a.status_id, "pipeline_id": a.pipeline_id}}])
    );
    assert_eq!(
        moved["value_after"],
        serde_json::json!([{"lead_status": {"id": to, "pipeline_id": a.pipeline_id}}])
    );
    assert_eq!(
        moved["_links"]["self"]["href"],
        format!("{base}/api/v4/events/{id}")
    );
    assert_eq!(moved["_embedded"]["entity"]["id"], a.id);
    assert_eq!(
        moved["_embedded"]["entity"]["_links"]["self"]["href"],
        format!("{base}/api/v4/leads/{}", a.id)
    );
    let one = h.get(&format!("/api/v4/events/{id}")).await;
    assert_eq!(one.json(), *moved);
    assert_eq!(h.get("/api/v4/events/01nosuchevent").await.status, 204);
    let sale = &all[0];
    assert_eq!(sale["type"], "sale_field_changed");
    assert_eq!(
        (sale["value_before"].clone(), sale["value_after"].clone()),
        (
            serde_json::json!([{"sale_field_value": {"sale": 1119}}]),
            serde_json::json!([{"sale_field_value": {"sale": 1120}}])
        )
    );

    // filter[type] in every spelling.
    let deleted_or_restored: Vec<Value> = truth
        .iter()
        .rev()
        .filter(|e| {
            matches!(
                e.type_,
                SimEventType::LeadDeleted | SimEventType::LeadRestored
            )
        })
        .map(|e| Value::from(e.id.clone()))
        .collect();
    assert_eq!(deleted_or_restored.len(), 2);
    for q in [
        "filter[type]=lead_deleted,lead_restored",
        "filter[type]=lead_deleted&filter[type]=lead_restored",
        "filter[type][]=lead_deleted&filter[type][]=lead_restored",
        "filter[type][0]=lead_deleted&filter[type][1]=lead_restored",
        "filter%5Btype%5D%5B%5D=lead_restored&filter%5Btype%5D%5B%5D=lead_deleted",
        "filter[type]=lead_restored,%20lead_deleted,no_such_type",
    ] {
        assert_eq!(
            ids_of(&h.all_events(q, TOKEN).await),
            deleted_or_restored,
            "{q}"
        );
    }
    let added = h.all_events("filter[type]=lead_added", TOKEN).await;
    assert_eq!(added.len(), 1);
    assert_eq!(added[0]["entity_id"], created);
    assert_eq!(
        (
            added[0]["value_before"].clone(),
            added[0]["value_after"].clone()
        ),
        (serde_json::json!([]), serde_json::json!([]))
    );
    assert_eq!(
        h.get("/api/v4/events?filter[type]=nothing").await.status,
        204
    );

    // filter[entity] and filter[entity_id] (at most 10).
    assert_eq!(
        h.all_events("filter[entity][]=lead", TOKEN).await.len(),
        125
    );
    assert_eq!(
        h.all_events("filter[entity]=contact,lead", TOKEN)
            .await
            .len(),
        125
    );
    assert_eq!(
        h.get("/api/v4/events?filter[entity][]=contact")
            .await
            .status,
        204
    );
    let of_a = h
        .all_events(
            &format!("filter[entity]=lead&filter[entity_id]={}", a.id),
            TOKEN,
        )
        .await;
    assert_eq!(ids_of(&of_a), vec![Value::from(id)]);
    let two = h
        .all_events(
            &format!(
                "filter[entity_id][]={}&filter[entity_id][]={}",
                seen[1], a.id
            ),
            TOKEN,
        )
        .await;
    assert_eq!(two.len(), 3);
    let eleven: Vec<String> = seen[..11].iter().map(i64::to_string).collect();
    let bad = h
        .get(&format!(
            "/api/v4/events?filter[entity_id]={}",
            eleven.join(",")
        ))
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.content_type(), "application/problem+json");
    assert!(String::from_utf8_lossy(&bad.body).contains("filter.entity_id"));
    let ten = eleven[..10].join(",");
    // a's move, seen[1]'s deletion and restore, seen[2]'s 80 edits.
    assert_eq!(
        h.all_events(&format!("filter[entity_id]={ten}"), TOKEN)
            .await
            .len(),
        83
    );

    // filter[created_at]: one timestamp means "from"; [from]/[to] and `from,to` are inclusive.
    let newer = |from: i64, to: i64| -> Vec<Value> {
        truth
            .iter()
            .rev()
            .filter(|e| (from..=to).contains(&e.created_at))
            .map(|e| Value::from(e.id.clone()))
            .collect()
    };
    let t10 = t0 + 10;
    let t30 = t0 + 30;
    let from_t10 = ids_of(
        &h.all_events(&format!("filter[created_at]={t10}"), TOKEN)
            .await,
    );
    assert_eq!(from_t10, newer(t10, i64::MAX));
    assert_eq!(from_t10.len(), 124);
    let ranged = newer(t10, t30);
    assert_eq!(ranged.len(), 3);
    for q in [
        format!("filter[created_at][from]={t10}&filter[created_at][to]={t30}"),
        format!("filter[created_at]={t10},{t30}"),
    ] {
        assert_eq!(ids_of(&h.all_events(&q, TOKEN).await), ranged, "{q}");
    }
    let to_only = format!("filter[created_at][to]={t10}");
    assert_eq!(ids_of(&h.all_events(&to_only, TOKEN).await), newer(0, t10));
    let late = h
        .get(&format!("/api/v4/events?filter[created_at]={}", t0 + 3600))
        .await;
    assert_eq!(late.status, 204);
    assert!(late.body.is_empty());

    // Paging: `next` always present, 204 past the end; the limit caps at 100, more reads 50.
    let page = h.get("/api/v4/events?limit=2&page=3").await;
    let v = page.json();
    assert_eq!(v["_page"], 3);
    assert_eq!(
        v["_links"]["self"]["href"],
        format!("{base}/api/v4/events?limit=2&page=3")
    );
    assert_eq!(
        v["_links"]["next"]["href"],
        format!("{base}/api/v4/events?limit=2&page=4")
    );
    assert_eq!(
        ids_of(v["_embedded"]["events"].as_array().unwrap()),
        want[4..6]
    );
    let len = |a: &Answer| a.json()["_embedded"]["events"].as_array().unwrap().len();
    assert_eq!(len(&h.get("/api/v4/events").await), 50, "the default page");
    assert_eq!(len(&h.get("/api/v4/events?limit=100").await), 100);
    let capped = h.get("/api/v4/events?limit=101&page=2").await;
    assert_eq!(len(&capped), 50);
    assert_eq!(
        ids_of(capped.json()["_embedded"]["events"].as_array().unwrap()),
        want[50..100]
    );
    assert_eq!(len(&h.get("/api/v4/events?limit=100&page=2").await), 25);
    let past = h.get("/api/v4/events?limit=100&page=3").await;
    assert_eq!((past.status.as_u16(), past.body.len()), (204, 0));
    for bad in [
        "limit=0",
        "limit=x",
        "page=0",
        "filter[created_at]=yesterday",
    ] {
        assert_eq!(
            h.get(&format!("/api/v4/events?{bad}")).await.status,
            400,
            "{bad}"
        );
    }

    // A token sees the events of the leads it sees.
    let limited = h.all_events("", LIMITED).await;
    let visible: Vec<Value> = truth
        .iter()
        .rev()
        .filter(|e| [1001, 1002].contains(&h.lead(e.entity_id).responsible_user_id))
        .map(|e| Value::from(e.id.clone()))
        .collect();
    assert_eq!(ids_of(&limited), visible);
    assert!(visible.len() < truth.len() && !visible.is_empty());
    let hidden_event = truth.iter().find(|e| e.entity_id == hidden[0]).unwrap();
    let path = format!("/api/v4/events/{}", hidden_event.id);
    assert_eq!(h.get_as(&path, Some(LIMITED)).await.status, 204);
    assert_eq!(h.get_as(&path, Some(TOKEN)).await.status, 200);
    assert_eq!(h.get_as("/api/v4/events", None).await.status, 401);
    let a = h
        .try_request(Method::POST, "/api/v4/events", Some(TOKEN), "")
        .await
        .unwrap();
    assert_eq!(a.status, 405);
}

#[tokio::test(start_paused = true)]
async fn writes_over_http_record_events_too() {
    let h = Harness::new(config(500)).await;
    let (seen, _) = seen_and_hidden(&h.sim);
    let lead = h.lead(seen[0]);
    let to = another_stage(&h.sim, lead.pipeline_id, lead.status_id);
    let a = h
        .try_request(
            Method::PATCH,
            &format!("/api/v4/leads/{}", lead.id),
            Some(TOKEN),
            &format!(r#"{{"price":{},"status_id":{to}}}"#, lead.price + 1),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let a = h
        .try_request(
            Method::POST,
            "/api/v4/leads",
            Some(TOKEN),
            r#"[{"name":"Fresh","pipeline_id":2000}]"#,
        )
        .await
        .unwrap();
    let created = a.json()["_embedded"]["leads"][0]["id"].as_i64().unwrap();
    let kinds: Vec<(SimEventType, i64)> = h
        .sim
        .events()
        .iter()
        .map(|e| (e.type_, e.entity_id))
        .collect();
    assert_eq!(
        kinds,
        [
            (SimEventType::LeadStatusChanged, lead.id),
            (SimEventType::SaleFieldChanged, lead.id),
            (SimEventType::LeadAdded, created),
        ]
    );
    assert_eq!(h.sim.events()[0].created_by, 1001, "the token's user");
}

#[tokio::test(start_paused = true)]
async fn churn_applies_its_rate_and_stops_with_the_server() {
    const RATE: f64 = 20.0;
    let mut cfg = config(2000);
    cfg.churn = RATE;
    let h = Harness::new(cfg).await;
    let sim = h.sim.sim().clone();
    let start = tokio::time::Instant::now();
    let deadline = Duration::from_secs(60);
    while sim.events().len() < 200 {
        assert!(start.elapsed() < deadline, "{} changes", sim.events().len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 200 changes at 20 a second: ten seconds of the sim's clock.
    let took = start.elapsed();
    assert!(
        (Duration::from_millis(9_900)..=Duration::from_millis(10_100)).contains(&took),
        "{took:?}"
    );
    let events = sim.events();
    let kinds: BTreeSet<&str> = events.iter().map(|e| e.type_.as_str()).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "lead_added",
            "lead_deleted",
            "lead_restored",
            "lead_status_changed",
            "sale_field_changed"
        ]
    );
    let t0 = data::NOW;
    assert!(events
        .iter()
        .all(|e| (t0..=t0 + 10).contains(&e.created_at)));
    // Every change shows: in the feed (for a token that sees the lead), in updated_at, and in the
    // lists of deleted leads.
    for e in &events {
        assert!(h.lead(e.entity_id).updated_at >= e.created_at);
    }
    // The churn goes on while the lists are read: compare a read with the ground truth only when
    // nothing changed during it.
    let mut compared = 0;
    for _ in 0..20 {
        let count = sim.events().len();
        let listed = h.all_ids("with=only_deleted", TOKEN).await;
        let feed = h.all_events("", LIMITED).await;
        let events = sim.events();
        if events.len() != count {
            continue;
        }
        let leads = sim.leads();
        let deleted: Vec<i64> = leads
            .iter()
            .filter(|l| l.is_deleted)
            .map(|l| l.id)
            .collect();
        assert_eq!(listed, deleted);
        let responsible = |id: i64| {
            leads
                .iter()
                .find(|l| l.id == id)
                .map(|l| l.responsible_user_id)
        };
        let visible: Vec<Value> = events
            .iter()
            .rev()
            .filter(|e| [Some(1001), Some(1002)].contains(&responsible(e.entity_id)))
            .map(|e| Value::from(e.id.clone()))
            .collect();
        assert!(!visible.is_empty());
        assert_eq!(ids_of(&feed), visible);
        compared += 1;
        break;
    }
    assert_eq!(compared, 1, "the account never stood still during a read");

    // Dropping the handle stops the server, and the churn with it.
    drop(h);
    let stopped = tokio::time::Instant::now();
    loop {
        let before = sim.events().len();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if sim.events().len() == before {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "still churning"
        );
    }
    let settled = sim.events().len();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(sim.events().len(), settled);
}

#[tokio::test(start_paused = true)]
async fn date_header_is_the_sim_clock() {
    let h = Harness::new(config(300)).await;
    let date_of = |a: &Answer| {
        let value = a.headers[http::header::DATE].to_str().unwrap().to_string();
        query::parse_http_date(&value).unwrap_or_else(|| panic!("not an HTTP date: {value}"))
    };
    let a = h.get("/api/v4/account").await;
    assert_eq!(a.headers.get_all(http::header::DATE).iter().count(), 1);
    let date = date_of(&a);
    assert!((data::NOW..=h.sim.now_ts()).contains(&date), "{date}");
    assert_eq!(
        a.headers[http::header::DATE].to_str().unwrap(),
        http_date(date)
    );

    tokio::time::advance(Duration::from_secs(3 * 86_400 + 7)).await;
    let before = h.sim.now_ts();
    assert_eq!(before, data::NOW + 3 * 86_400 + 7);
    h.sim.inject(FaultRule::always(Fault::Status500).times(1));
    for path in [
        "/api/v4/leads",
        "/api/v4/leads?limit=5",
        "/api/v4/leads/1",
        "/api/v4/nowhere",
        "/api/v4/events",
    ] {
        let a = h.get(path).await;
        let date = date_of(&a);
        assert!((before..=h.sim.now_ts()).contains(&date), "{path}: {date}");
    }
    let unauthorized = h.get_as("/api/v4/leads", None).await;
    assert_eq!(unauthorized.status, 401);
    assert!(date_of(&unauthorized) >= before);

    // The Date of a write's answer agrees with the updated_at it reports.
    let lead = h.sim.leads().into_iter().find(|l| !l.is_deleted).unwrap();
    let a = h
        .try_request(
            Method::PATCH,
            &format!("/api/v4/leads/{}", lead.id),
            Some(TOKEN),
            r#"{"price":5}"#,
        )
        .await
        .unwrap();
    assert_eq!(a.json()["updated_at"].as_i64().unwrap(), date_of(&a));
}

#[tokio::test(start_paused = true)]
async fn event_bodies_spell_the_same_in_every_style() {
    let mut bodies = Vec::new();
    for style in [JsonStyle::Compact, JsonStyle::Php, JsonStyle::Pretty] {
        let mut cfg = config(300);
        cfg.json_style = style;
        let h = Harness::new(cfg).await;
        let (seen, _) = seen_and_hidden(&h.sim);
        assert!(h.sim.move_lead(seen[0], 2000, 143));
        assert!(h.sim.edit_lead(seen[1], 10));
        assert!(h.sim.delete_lead(seen[2]));
        h.sim.create_lead(1000, 142).unwrap();
        let page = h.get("/api/v4/events?filter[type]=lead_added,lead_status_changed,sale_field_changed,lead_deleted").await;
        let text = String::from_utf8_lossy(&page.body).into_owned();
        match style {
            JsonStyle::Php => assert!(text.contains("\\/api\\/v4\\/events"), "{text}"),
            JsonStyle::Pretty => assert!(text.contains("\n    \""), "{text}"),
            JsonStyle::Compact => assert!(!text.contains("\\/") && !text.contains('\n')),
        }
        bodies.push(decoded(&h.sim.base_url(), &page.body));
    }
    assert_eq!(
        bodies[0]["_embedded"]["events"].as_array().unwrap().len(),
        4
    );
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(bodies[0], bodies[2]);
}
