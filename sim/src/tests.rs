//! End-to-end tests of the sim: the real server on loopback, driven by a small hyper client.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::*;

mod changes;
mod oauth;

const TOKEN: &str = "t-all";
const LIMITED: &str = "t-limited";

fn config(leads: usize) -> SimConfig {
    SimConfig {
        leads,
        tokens: vec![
            TokenSpec::full(TOKEN),
            TokenSpec {
                token: LIMITED.to_string(),
                responsible_user_ids: Some(vec![1001, 1002]),
            },
        ],
        ..SimConfig::default()
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn ids(&self) -> Vec<i64> {
        self.json()["_embedded"]["leads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["id"].as_i64().unwrap())
            .collect()
    }
}

struct Harness {
    sim: SimHandle,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Harness {
    async fn new(cfg: SimConfig) -> Self {
        Self {
            sim: Sim::spawn(cfg).await.unwrap(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn try_request(
        &self,
        method: Method,
        path_and_query: &str,
        token: Option<&str>,
        body: &str,
    ) -> Result<Answer, String> {
        self.try_request_with(method, path_and_query, token, &[], body)
            .await
    }

    async fn try_request_with(
        &self,
        method: Method,
        path_and_query: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Answer, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path_and_query}", self.sim.base_url()));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn get_as(&self, path_and_query: &str, token: Option<&str>) -> Answer {
        self.try_request(Method::GET, path_and_query, token, "")
            .await
            .unwrap()
    }

    async fn get(&self, path_and_query: &str) -> Answer {
        self.get_as(path_and_query, Some(TOKEN)).await
    }

    /// Every id of a listing, page by page (limit 250), stopping on 204.
    async fn all_ids(&self, query: &str, token: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        for page in 1.. {
            let a = self
                .get_as(
                    &format!("/api/v4/leads?{query}&limit=250&page={page}"),
                    Some(token),
                )
                .await;
            if a.status == StatusCode::NO_CONTENT {
                break;
            }
            assert_eq!(
                a.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&a.body)
            );
            ids.extend(a.ids());
        }
        ids
    }
}

fn stage_query(p: i64, s: i64) -> String {
    format!("filter[statuses][0][pipeline_id]={p}&filter[statuses][0][status_id]={s}")
}

/// The ids of the live leads of `stage` that `users` are responsible for.
fn ids_of_users(sim: &Sim, stage: (i64, i64), users: &[i64]) -> Vec<i64> {
    let leads = sim.leads();
    let of = |l: &&SimLead| !l.is_deleted && (l.pipeline_id, l.status_id) == stage;
    let ids = leads
        .iter()
        .filter(of)
        .filter(|l| users.contains(&l.responsible_user_id));
    ids.map(|l| l.id).collect()
}

/// The largest stage and its live leads' ids (ascending).
fn largest_stage(sim: &Sim) -> ((i64, i64), Vec<i64>) {
    let mut by_stage: BTreeMap<(i64, i64), Vec<i64>> = BTreeMap::new();
    for l in sim.leads().iter().filter(|l| !l.is_deleted) {
        by_stage
            .entry((l.pipeline_id, l.status_id))
            .or_default()
            .push(l.id);
    }
    by_stage
        .into_iter()
        .max_by_key(|(_, ids)| ids.len())
        .unwrap()
}

#[test]
fn same_seed_same_account() {
    let a = Sim::new(SimConfig {
        leads: 3000,
        ..SimConfig::default()
    });
    let b = Sim::new(SimConfig {
        leads: 3000,
        ..SimConfig::default()
    });
    assert_eq!(a.leads(), b.leads());
    assert_eq!(a.pipelines(), b.pipelines());
    assert_eq!(a.tokens(), vec![TokenSpec::full(DEMO_TOKEN)]);
    let (_, ids) = largest_stage(&a);
    assert!(ids.len() > 250);
}

#[test]
fn token_and_fault_syntax() {
    assert_eq!("abc".parse::<TokenSpec>().unwrap(), TokenSpec::full("abc"));
    let t: TokenSpec = "abc:users=1001,1002".parse().unwrap();
    assert_eq!(t.responsible_user_ids, Some(vec![1001, 1002]));
    assert!("".parse::<TokenSpec>().is_err());
    assert!("abc:people=1".parse::<TokenSpec>().is_err());
    let f: FaultRule = "truncate@0.5".parse().unwrap();
    assert_eq!(
        (f.fault, f.probability, f.times),
        (Fault::TruncatedBody, 0.5, None)
    );
    assert!("html403@-1".parse::<FaultRule>().is_err());
    let f: FaultRule = "misplace@0.5".parse().unwrap();
    assert_eq!((f.fault, f.probability), (Fault::MisplaceLead, 0.5));
    let f: FaultRule = "drop".parse().unwrap();
    assert_eq!((f.fault, f.probability), (Fault::DropLead, 1.0));
    assert_eq!(FaultRule::always(Fault::DropLead).times(1).times, Some(1));
    assert_eq!("php".parse::<JsonStyle>(), Ok(JsonStyle::Php));
    assert!("xml".parse::<JsonStyle>().is_err());
    assert_eq!(JsonStyle::default(), JsonStyle::Compact);
}

#[tokio::test]
async fn one_stage_pages_through_to_204() {
    let h = Harness::new(config(3000)).await;
    let ((p, s), expected) = largest_stage(&h.sim);
    let q = stage_query(p, s);

    let first = h.get(&format!("/api/v4/leads?{q}&limit=250")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.content_type(), "application/hal+json");
    let body = first.json();
    assert_eq!(body["_page"], 1);
    let base = h.sim.base_url();
    assert_eq!(
        body["_links"]["next"]["href"],
        format!("{base}/api/v4/leads?{q}&limit=250&page=2")
    );
    assert!(body["_links"].get("prev").is_none());
    let lead = &body["_embedded"]["leads"][0];
    assert_eq!(
        lead["_links"]["self"]["href"],
        format!("{base}/api/v4/leads/{}?{q}&limit=250", lead["id"])
    );
    // Raw text: no escaped slashes, Kommo's key order.
    let text = String::from_utf8_lossy(&first.body);
    assert!(!text.contains("\\/"));
    assert!(text.starts_with("{\"_page\":1,\"_links\":{\"self\":"));
    let keys: Vec<&String> = lead.as_object().unwrap().keys().collect();
    assert!(keys.len() >= 20, "{keys:?}");

    assert_eq!(h.all_ids(&q, TOKEN).await, expected);

    // The last page still links a next page, which answers 204 with an empty body.
    let last_page = expected.len().div_ceil(250);
    let last = h
        .get(&format!("/api/v4/leads?{q}&limit=250&page={last_page}"))
        .await;
    let body = last.json();
    assert!(body["_links"]["next"]["href"].is_string());
    assert!(body["_links"]["prev"]["href"]
        .as_str()
        .unwrap()
        .ends_with(&format!("page={}", last_page - 1)));
    let past = h
        .get(&format!(
            "/api/v4/leads?{q}&limit=250&page={}",
            last_page + 1
        ))
        .await;
    assert_eq!(past.status, StatusCode::NO_CONTENT);
    assert!(past.body.is_empty());
}

#[tokio::test]
async fn validation_errors_are_400_problems() {
    let h = Harness::new(config(500)).await;
    let two = format!(
        "{}&filter[statuses][1][pipeline_id]=2000&filter[statuses][1][status_id]=142",
        stage_query(1000, 142)
    );
    for (query, needle) in [
        (two.as_str(), "filter.statuses"),
        ("limit=many", "limit"),
        ("limit=0", "limit"),
        ("filter[id]=abc", "filter.id"),
        ("order[price]=asc", "order"),
        ("order[id]=sideways", "order"),
        ("page=0", "page"),
    ] {
        let a = h.get(&format!("/api/v4/leads?{query}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(a.content_type(), "application/problem+json");
        let text = String::from_utf8_lossy(&a.body);
        assert!(text.contains(needle), "{query}: {text}");
        assert_eq!(a.json()["status"], 400);
    }
    let a = h.get(&format!("/api/v4/leads?{two}")).await;
    assert!(a.json()["validation-errors"][0]["errors"][0]["code"].is_string());
    // Unknown parameters are ignored.
    assert_eq!(
        h.get("/api/v4/leads?foo=bar&filter[nope]=1").await.status,
        200
    );
    assert_eq!(h.sim.request_count(), 9);
}

#[tokio::test]
async fn order_breaks_ties_by_id_in_the_same_direction() {
    let h = Harness::new(config(3000)).await;
    let ((p, s), _) = largest_stage(&h.sim);
    let leads = h.sim.leads();
    let created = |id: i64| leads.iter().find(|l| l.id == id).unwrap().created_at;
    for dir in ["asc", "desc"] {
        let ids = h
            .all_ids(
                &format!("{}&order[created_at]={dir}", stage_query(p, s)),
                TOKEN,
            )
            .await;
        let keys: Vec<(i64, i64)> = ids.iter().map(|&id| (created(id), id)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        if dir == "desc" {
            sorted.reverse();
        }
        assert_eq!(keys, sorted, "{dir}");
        assert!(
            keys.windows(2).any(|w| w[0].0 == w[1].0),
            "the data has ties"
        );
    }
    let desc = h
        .all_ids(&format!("{}&order[id]=desc", stage_query(p, s)), TOKEN)
        .await;
    assert!(desc.windows(2).all(|w| w[0] > w[1]));
}

#[tokio::test]
async fn list_spellings_and_encoded_brackets_agree() {
    let h = Harness::new(config(1000)).await;
    let leads = h.sim.leads();
    let (a, b, c) = (leads[3].id, leads[70].id, leads[500].id);
    let mut answers = Vec::new();
    for q in [
        format!("filter[id]={a}&filter[id]={b}&filter[id]={c}"),
        format!("filter[id][]={a}&filter[id][]={b}&filter[id][]={c}"),
        format!("filter[id][0]={a}&filter[id][1]={b}&filter[id][2]={c}"),
        format!("filter%5Bid%5D%5B%5D={a}&filter%5Bid%5D%5B%5D={b}&filter%5Bid%5D%5B%5D={c}"),
        format!("filter%5Bid%5D%5B0%5D={a}&filter%5Bid%5D%5B1%5D={b}&filter%5Bid%5D%5B2%5D={c}"),
    ] {
        let answer = h.get(&format!("/api/v4/leads?{q}")).await;
        assert_eq!(answer.status, 200, "{q}");
        answers.push(answer.ids());
    }
    let live: Vec<i64> = [a, b, c]
        .into_iter()
        .filter(|id| leads.iter().any(|l| l.id == *id && !l.is_deleted))
        .collect();
    for ids in &answers {
        assert_eq!(ids, &live);
    }
}

#[tokio::test]
async fn filters_and_with_extras() {
    let h = Harness::new(config(2000)).await;
    let leads = h.sim.leads();
    let live = || leads.iter().filter(|l| !l.is_deleted);

    // Ranges (inclusive), lists (OR) and their AND.
    let t = live().nth(10).unwrap().created_at;
    let expected: Vec<i64> = live()
        .filter(|l| l.created_at == t && [1001, 1003].contains(&l.responsible_user_id))
        .map(|l| l.id)
        .collect();
    let q = format!(
        "filter[created_at][from]={t}&filter[created_at][to]={t}&filter[responsible_user_id][]=1001&filter[responsible_user_id][]=1003"
    );
    assert_eq!(h.all_ids(&q, TOKEN).await, expected);
    let q = format!(
        "filter[created_at]={t}&filter[responsible_user_id]=1001&filter[responsible_user_id]=1003"
    );
    assert_eq!(h.all_ids(&q, TOKEN).await, expected);

    // Custom field values, numeric range.
    let expected: Vec<i64> = live()
        .filter(|l| {
            l.custom_fields
                .iter()
                .any(|(f, v)| *f == 501 && v.parse::<i64>().is_ok_and(|n| n <= 1000))
        })
        .map(|l| l.id)
        .collect();
    assert!(!expected.is_empty());
    let q = "filter[custom_fields_values][501][to]=1000";
    assert_eq!(h.all_ids(q, TOKEN).await, expected);

    // Search: case-insensitive substring of the name.
    let expected: Vec<i64> = live()
        .filter(|l| l.name.to_lowercase().contains("globex"))
        .map(|l| l.id)
        .collect();
    assert_eq!(h.all_ids("query=GLOBEX", TOKEN).await, expected);

    // with=contacts,loss_reason,source_id on a lost lead with contacts.
    let lost = live()
        .find(|l| l.status_id == 143 && l.loss_reason_id.is_some() && !l.contact_ids.is_empty())
        .unwrap();
    let a = h
        .get(&format!(
            "/api/v4/leads?filter[id]={}&with=contacts,loss_reason,source_id,is_price_modified_by_robot",
            lost.id
        ))
        .await;
    let lead = &a.json()["_embedded"]["leads"][0];
    assert_eq!(lead["_embedded"]["contacts"][0]["id"], lost.contact_ids[0]);
    assert_eq!(lead["_embedded"]["contacts"][0]["is_main"], true);
    assert_eq!(
        lead["_embedded"]["loss_reason"][0]["id"],
        lost.loss_reason_id.unwrap()
    );
    assert_eq!(lead["source_id"], serde_json::json!(lost.source_id));
    assert!(lead["is_price_modified_by_robot"].is_boolean());
    // Without `with`, none of that.
    let a = h
        .get(&format!("/api/v4/leads?filter[id]={}", lost.id))
        .await;
    let lead = &a.json()["_embedded"]["leads"][0];
    assert!(lead["_embedded"].get("contacts").is_none());
    assert!(lead["source_id"].is_null());
    assert!(lead.get("is_price_modified_by_robot").is_none());

    // Deleted leads only with only_deleted, mostly null.
    let deleted: Vec<i64> = leads
        .iter()
        .filter(|l| l.is_deleted)
        .map(|l| l.id)
        .collect();
    assert!(!deleted.is_empty());
    assert_eq!(h.all_ids("with=only_deleted", TOKEN).await, deleted);
    let a = h.get("/api/v4/leads?with=only_deleted").await;
    let lead = &a.json()["_embedded"]["leads"][0];
    assert_eq!(lead["is_deleted"], true);
    assert!(lead["name"].is_null() && lead["status_id"].is_null());
    assert!(lead["updated_at"].is_i64() && lead["account_id"].is_i64());
    let all = h.all_ids("", TOKEN).await;
    assert!(!all.contains(&deleted[0]));
    assert_eq!(all.len(), leads.len() - deleted.len());
}

#[tokio::test]
async fn tokens_scope_and_authenticate() {
    let h = Harness::new(config(2000)).await;
    let ((p, s), _) = largest_stage(&h.sim);
    let q = stage_query(p, s);
    let expected = ids_of_users(&h.sim, (p, s), &[1001, 1002]);
    assert!(!expected.is_empty());
    assert_eq!(h.all_ids(&q, LIMITED).await, expected);
    let other = h
        .sim
        .leads()
        .into_iter()
        .find(|l| !l.is_deleted && l.responsible_user_id == 1005)
        .unwrap();
    let path = format!("/api/v4/leads/{}", other.id);
    assert_eq!(h.get_as(&path, Some(LIMITED)).await.status, 204);
    assert_eq!(h.get_as(&path, Some(TOKEN)).await.status, 200);

    for token in [None, Some("wrong")] {
        let a = h.get_as("/api/v4/leads", token).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(a.content_type(), "application/problem+json");
        assert_eq!(
            a.json(),
            serde_json::json!({"title":"Unauthorized","type":"https://httpstatus.es/401","status":401,"detail":"Invalid user name or password"})
        );
    }
    let log = h.sim.requests();
    assert_eq!(log.last().unwrap().token.as_deref(), Some("wrong"));
    assert_eq!(log.last().unwrap().status, 401);
}

#[tokio::test(start_paused = true)]
async fn rate_limit_then_block() {
    let mut cfg = config(200);
    cfg.rate_limit = Some(SimRateLimit {
        requests: 3,
        window: Duration::from_secs(1),
        block_after: 2,
        block_for: Duration::from_secs(60),
    });
    let h = Harness::new(cfg).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(h.get("/api/v4/account").await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 403]);
    let log: Vec<u16> = h.sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(log, statuses);

    tokio::time::advance(Duration::from_secs(30)).await;
    let blocked = h.get("/api/v4/account").await;
    assert_eq!(blocked.status, 403);
    assert!(blocked.content_type().starts_with("text/html"));
    assert!(String::from_utf8_lossy(&blocked.body).contains("<html"));

    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(h.get("/api/v4/account").await.status, 200);
    // The window slides: after a second the budget is back.
    for _ in 0..2 {
        assert_eq!(h.get("/api/v4/account").await.status, 200);
    }
    let limited = h.get("/api/v4/account").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.content_type(), "application/problem+json");
    assert_eq!(limited.json()["retry_after"], 1);
    assert_eq!(limited.json()["title"], "Too Many Requests");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(h.get("/api/v4/account").await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn latency_is_applied_after_arrival() {
    let mut cfg = config(100);
    cfg.latency = Duration::from_millis(80);
    let h = Harness::new(cfg).await;
    let start = tokio::time::Instant::now();
    assert_eq!(h.get("/api/v4/account").await.status, 200);
    assert!(start.elapsed() >= Duration::from_millis(80));
    let log = h.sim.requests();
    assert!(log[0].at - start < Duration::from_millis(80));
}

#[tokio::test]
async fn faults_fire_as_configured() {
    let h = Harness::new(config(300)).await;
    h.sim.inject(
        FaultRule::always(Fault::Status500)
            .on_path("/api/v4/leads")
            .times(2),
    );
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(h.get("/api/v4/leads").await.status.as_u16());
    }
    assert_eq!(statuses, [500, 500, 200]);
    assert_eq!(h.sim.request_count(), 3);
    let first = h.get("/api/v4/account").await;
    assert_eq!(first.status, 200, "another path is untouched");

    h.sim.inject(
        FaultRule::always(Fault::TooManyRequests {
            retry_after: Some(3),
            header: true,
        })
        .on_query("filter[id]")
        .times(1),
    );
    let a = h.get("/api/v4/leads?filter%5Bid%5D=1").await;
    assert_eq!(a.status, 429);
    assert_eq!(a.headers["retry-after"], "3");
    assert_eq!(a.json()["retry_after"], 3);

    h.sim.inject(
        FaultRule::always(Fault::HtmlForbidden)
            .on_path("/api/v4/account")
            .times(1),
    );
    let a = h.get("/api/v4/account").await;
    assert_eq!(
        (a.status.as_u16(), a.content_type().starts_with("text/html")),
        (403, true)
    );

    h.sim
        .inject(FaultRule::always(Fault::ConnectionReset).times(1));
    let reset = h
        .try_request(Method::GET, "/api/v4/leads", Some(TOKEN), "")
        .await;
    assert!(reset.is_err());
    assert_eq!(h.sim.requests().last().unwrap().status, 0);

    h.sim
        .inject(FaultRule::always(Fault::TruncatedBody).times(1));
    let cut = h
        .try_request(Method::GET, "/api/v4/leads", Some(TOKEN), "")
        .await;
    assert!(cut.is_err(), "the body must end early");
    assert_eq!(h.sim.requests().last().unwrap().status, 200);

    h.sim.inject(FaultRule::always(Fault::Status {
        status: 418,
        body: "teapot".into(),
        content_type: "text/plain".into(),
    }));
    assert_eq!(h.get("/api/v4/leads").await.status, 418);
    h.sim.clear_faults();
    assert_eq!(h.get("/api/v4/leads").await.status, 200);
    h.sim.clear_requests();
    assert_eq!(h.sim.request_count(), 0);
}

#[tokio::test]
async fn moves_ghosts_and_writes() {
    let h = Harness::new(config(1000)).await;
    let ((p, s), ids) = largest_stage(&h.sim);
    let target = (p, h.sim.pipelines()[0].statuses[2].id);
    let moving = ids[0];
    let before = h.sim.leads().into_iter().find(|l| l.id == moving).unwrap();
    assert!(h.sim.move_lead(moving, target.0, target.1));
    let after = h.sim.leads().into_iter().find(|l| l.id == moving).unwrap();
    assert!(after.updated_at >= before.updated_at);
    assert!(!h.all_ids(&stage_query(p, s), TOKEN).await.contains(&moving));
    assert!(h
        .all_ids(&stage_query(target.0, target.1), TOKEN)
        .await
        .contains(&moving));
    // Mid-move, Kommo lists it under both stages with the same body.
    assert!(h.sim.add_ghost(moving, p, s));
    let a = h
        .get(&format!(
            "/api/v4/leads?{}&filter[id]={moving}",
            stage_query(p, s)
        ))
        .await;
    let b = h
        .get(&format!(
            "/api/v4/leads?{}&filter[id]={moving}",
            stage_query(target.0, target.1)
        ))
        .await;
    assert_eq!(a.json()["_embedded"]["leads"][0]["status_id"], target.1);
    assert_eq!(b.json()["_embedded"]["leads"][0]["status_id"], target.1);
    assert!(!h.sim.move_lead(moving, p, 99_999));

    // POST creates, PATCH updates, both visible in the ground truth.
    let a = h
        .try_request(
            Method::POST,
            "/api/v4/leads",
            Some(TOKEN),
            r#"[{"name":"New deal","price":1500,"pipeline_id":2000,"status_id":142}]"#,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    let id = a.json()["_embedded"]["leads"][0]["id"].as_i64().unwrap();
    assert_eq!(a.json()["_embedded"]["leads"][0]["request_id"], "0");
    let created = h.sim.leads().into_iter().find(|l| l.id == id).unwrap();
    assert_eq!((created.name.as_str(), created.price), ("New deal", 1500));
    assert!(created.closed_at.is_some());
    let a = h
        .try_request(
            Method::PATCH,
            &format!("/api/v4/leads/{id}"),
            Some(TOKEN),
            r#"{"price":2500}"#,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        h.sim
            .leads()
            .into_iter()
            .find(|l| l.id == id)
            .unwrap()
            .price,
        2500
    );
    let bad = h
        .try_request(
            Method::POST,
            "/api/v4/leads",
            Some(TOKEN),
            r#"[{"pipeline_id":2000,"status_id":10}]"#,
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400);

    // Other endpoints.
    let pipes = h.get("/api/v4/leads/pipelines").await.json();
    assert_eq!(pipes["_total_items"], 5);
    assert_eq!(
        pipes["_embedded"]["pipelines"][0]["_embedded"]["statuses"][0]["type"],
        1
    );
    assert_eq!(
        h.get("/api/v4/leads/pipelines/1000").await.json()["id"],
        1000
    );
    assert_eq!(h.get("/api/v4/account").await.json()["subdomain"], "sim");
    assert_eq!(h.get(&format!("/api/v4/leads/{id}")).await.json()["id"], id);
    assert_eq!(h.get("/api/v4/leads/1").await.status, 204);
    assert_eq!(h.get("/api/v4/tasks").await.status, 404);
    let a = h
        .try_request(Method::DELETE, "/api/v4/leads", Some(TOKEN), "")
        .await
        .unwrap();
    assert_eq!(a.status, 405);
}

#[tokio::test]
async fn handle_drop_stops_the_server() {
    let h = Harness::new(config(10)).await;
    let addr = h.sim.addr();
    assert_eq!(h.get("/api/v4/account").await.status, 200);
    drop(h);
    // Once the accept loop has stopped, new connections are refused.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused);
}

/// The requests whose bodies the style tests compare: every kind of JSON body the sim writes.
const STYLED_GETS: [&str; 12] = [
    "/api/v4/leads?limit=60",
    "/api/v4/leads?limit=60&page=2&with=contacts",
    "/api/v4/leads/pipelines",
    "/api/v4/leads/pipelines/1000",
    "/api/v4/account",
    "/api/v4/contacts?limit=100",
    "/api/v4/companies?limit=100&order[id]=desc",
    "/api/v4/leads?limit=x",
    "/api/v4/leads?order[price]=asc",
    "/api/v4/contacts?order[name]=asc",
    "/api/v4/nowhere",
    "/api/v4/leads?filter[id]=BAD",
];

/// Every JSON answer of a sim in `style` for the same requests, and its base URL.
async fn styled_bodies(style: JsonStyle) -> (String, Vec<(String, Bytes)>) {
    let mut cfg = config(300);
    cfg.json_style = style;
    let h = Harness::new(cfg).await;
    let leads = h.sim.leads();
    let lead = leads.iter().find(|l| !l.is_deleted).unwrap();
    let contact = h.sim.contacts()[0].id;
    let mut out = Vec::new();
    let mut gets: Vec<String> = STYLED_GETS.iter().map(|s| s.to_string()).collect();
    gets.push(format!("/api/v4/leads/{}?with=contacts", lead.id));
    gets.push(format!("/api/v4/contacts/{contact}"));
    for path in gets {
        let a = h.get(&path).await;
        assert!(!a.body.is_empty(), "{path}: {}", a.status);
        out.push((path, a.body));
    }
    for (name, method, path, token, body) in [
        (
            "post",
            Method::POST,
            "/api/v4/leads",
            Some(TOKEN),
            r#"[{"name":"Crème & <Brûlée> 'x' \"y\" 🚀","pipeline_id":2000}]"#.to_string(),
        ),
        (
            "patch one",
            Method::PATCH,
            &format!("/api/v4/leads/{}", lead.id),
            Some(TOKEN),
            r#"{"price":7}"#.to_string(),
        ),
        (
            "patch many",
            Method::PATCH,
            "/api/v4/leads",
            Some(TOKEN),
            format!(r#"[{{"id":{},"price":8}}]"#, lead.id),
        ),
        (
            "bad write",
            Method::POST,
            "/api/v4/leads",
            Some(TOKEN),
            r#"[{"status_id":1}]"#.to_string(),
        ),
        (
            "not json",
            Method::POST,
            "/api/v4/leads",
            Some(TOKEN),
            "{".to_string(),
        ),
        (
            "no token",
            Method::GET,
            "/api/v4/leads",
            None,
            String::new(),
        ),
        (
            "405",
            Method::DELETE,
            "/api/v4/contacts",
            Some(TOKEN),
            String::new(),
        ),
    ] {
        let a = h.try_request(method, path, token, &body).await.unwrap();
        out.push((name.to_string(), a.body));
    }
    // Fault bodies: 500 and 429.
    h.sim.inject(FaultRule::always(Fault::Status500).times(1));
    h.sim.inject(
        FaultRule::always(Fault::TooManyRequests {
            retry_after: Some(2),
            header: false,
        })
        .times(1),
    );
    for name in ["500", "429"] {
        out.push((name.to_string(), h.get("/api/v4/account").await.body));
    }
    (h.sim.base_url(), out)
}

/// A body decoded, with the sim's base URL (its port differs between sims) made neutral.
fn decoded(base: &str, body: &[u8]) -> Value {
    let value: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)));
    let text = value.to_string().replace(base, "BASE");
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn json_styles_spell_the_same_values() {
    let (compact_base, compact) = styled_bodies(JsonStyle::Compact).await;
    let compact_text: String = compact
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    // The data gives every escape something to do.
    for needle in [
        "Café & Co's",
        "Ромашка",
        "<Partners>",
        "Zürich/Genève",
        "\\\"Trading\\\"",
        "🚀",
        "José",
    ] {
        assert!(
            compact_text.contains(needle),
            "compact bodies lack {needle:?}"
        );
    }
    assert!(!compact_text.contains("\\/") && !compact_text.contains("\\u"));

    for style in [JsonStyle::Php, JsonStyle::Pretty] {
        let (base, bodies) = styled_bodies(style).await;
        assert_eq!(bodies.len(), compact.len());
        for ((name, body), (_, want)) in bodies.iter().zip(&compact) {
            assert_eq!(
                decoded(&base, body),
                decoded(&compact_base, want),
                "{style}: {name}"
            );
            let text = String::from_utf8_lossy(body);
            match style {
                JsonStyle::Php => {
                    assert!(body.is_ascii(), "{name}: a non-ASCII byte");
                    // Outside strings JSON has no `/`, so any left after `\/` is a raw one.
                    let unescaped = text.replace("\\/", "");
                    for raw in ['/', '&', '<', '>', '\''] {
                        assert!(!unescaped.contains(raw), "{name}: a raw {raw:?}");
                    }
                    assert!(!text.contains(": ") && !text.contains('\n'), "{name}");
                    assert!(!text.contains("\\\""), "{name}: quotes are \\u0022");
                }
                _ => {
                    assert!(text.contains('\n') && text.contains("\": "), "{name}");
                    assert!(text.contains("\n    \""), "{name}: indented by 4");
                }
            }
        }
        let all: String = bodies
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        if style == JsonStyle::Php {
            for escape in [
                "\\/api\\/v4\\/leads",
                "Caf\\u00e9 \\u0026 Co\\u0027s",
                "\\u0420\\u043e\\u043c\\u0430\\u0448\\u043a\\u0430",
                "\\u003CPartners\\u003E",
                "\\u0022Trading\\u0022",
                "\\ud83d\\ude80",
            ] {
                assert!(all.contains(escape), "php bodies lack {escape:?}");
            }
        }
    }
}

#[tokio::test]
async fn contacts_and_companies_lists() {
    let h = Harness::new(config(2000)).await;
    let base = h.sim.base_url();
    let leads = h.sim.leads();
    let live = || leads.iter().filter(|l| !l.is_deleted);
    let contact_ids: std::collections::BTreeSet<i64> =
        live().flat_map(|l| l.contact_ids.clone()).collect();
    let company_ids: std::collections::BTreeSet<i64> =
        live().filter_map(|l| l.company_id).collect();
    assert!(contact_ids.len() > 500 && company_ids.len() > 300);
    for (path, want, truth) in [
        (
            "contacts",
            contact_ids.clone(),
            h.sim
                .contacts()
                .iter()
                .map(|c| (c.id, c.name.clone()))
                .collect::<Vec<_>>(),
        ),
        (
            "companies",
            company_ids.clone(),
            h.sim
                .companies()
                .iter()
                .map(|c| (c.id, c.name.clone()))
                .collect(),
        ),
    ] {
        // Page by page to the 204, in ascending id order.
        let mut got = Vec::new();
        for page in 1.. {
            let a = h
                .get(&format!("/api/v4/{path}?limit=250&page={page}"))
                .await;
            if a.status == StatusCode::NO_CONTENT {
                assert!(a.body.is_empty());
                break;
            }
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(a.content_type(), "application/hal+json");
            let v = a.json();
            assert_eq!(v["_page"], page);
            assert_eq!(
                v["_links"]["next"]["href"],
                format!("{base}/api/v4/{path}?limit=250&page={}", page + 1)
            );
            let items = v["_embedded"][path].as_array().unwrap().clone();
            for item in &items {
                let id = item["id"].as_i64().unwrap();
                assert_eq!(
                    item["_links"]["self"]["href"],
                    format!("{base}/api/v4/{path}/{id}?limit=250&page={page}")
                );
                let name = &truth.iter().find(|(t, _)| *t == id).unwrap().1;
                assert_eq!(item["name"], name.as_str());
                for key in [
                    "responsible_user_id",
                    "created_at",
                    "updated_at",
                    "account_id",
                ] {
                    assert!(item[key].is_i64(), "{key}");
                }
                got.push(id);
            }
        }
        assert_eq!(got, want.iter().copied().collect::<Vec<_>>(), "{path}");

        // Descending, a quiet 50 for a limit over 250, the query kept in links as sent.
        let a = h
            .get(&format!("/api/v4/{path}?order[id]=desc&limit=500&page=2"))
            .await;
        let v = a.json();
        let ids: Vec<i64> = v["_embedded"][path]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_i64().unwrap())
            .collect();
        let desc: Vec<i64> = want.iter().rev().skip(50).take(50).copied().collect();
        assert_eq!(ids, desc);
        assert_eq!(
            v["_links"]["next"]["href"],
            format!("{base}/api/v4/{path}?order[id]=desc&limit=500&page=3")
        );
        assert_eq!(
            v["_links"]["prev"]["href"],
            format!("{base}/api/v4/{path}?order[id]=desc&limit=500&page=1")
        );
        // No query: a bare self link.
        let first = h.get(&format!("/api/v4/{path}")).await.json();
        assert_eq!(
            first["_embedded"][path][0]["_links"]["self"]["href"],
            format!("{base}/api/v4/{path}/{}", want.iter().next().unwrap())
        );
        assert_eq!(h.get(&format!("/api/v4/{path}?limit=x")).await.status, 400);
        assert_eq!(h.get(&format!("/api/v4/{path}?limit=0")).await.status, 400);
    }

    // A limited token sees the contacts of its leads only.
    let mine: std::collections::BTreeSet<i64> = live()
        .filter(|l| [1001, 1002].contains(&l.responsible_user_id))
        .flat_map(|l| l.contact_ids.clone())
        .collect();
    let mut got = Vec::new();
    for page in 1.. {
        let a = h
            .get_as(
                &format!("/api/v4/contacts?limit=250&page={page}"),
                Some(LIMITED),
            )
            .await;
        if a.status == StatusCode::NO_CONTENT {
            break;
        }
        got.extend(
            a.json()["_embedded"]["contacts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_i64().unwrap()),
        );
    }
    assert_eq!(got, mine.iter().copied().collect::<Vec<_>>());
    let hidden = contact_ids.difference(&mine).next().copied().unwrap();
    let shown = *mine.iter().next().unwrap();
    assert_eq!(
        h.get_as(&format!("/api/v4/contacts/{hidden}"), Some(LIMITED))
            .await
            .status,
        204
    );
    let a = h
        .get_as(
            &format!("/api/v4/contacts/{shown}?with=leads"),
            Some(LIMITED),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["id"], shown);
    assert_eq!(
        a.json()["_links"]["self"]["href"],
        format!("{base}/api/v4/contacts/{shown}?with=leads")
    );
    let company = *company_ids.iter().next().unwrap();
    assert_eq!(
        h.get(&format!("/api/v4/companies/{company}")).await.json()["id"],
        company
    );
    assert_eq!(h.get("/api/v4/contacts/1").await.status, 204);
    assert_eq!(h.get("/api/v4/contacts/abc").await.status, 404);

    // A lead's embedded contacts and companies link with the request's query, as the lead does.
    let lead = live()
        .find(|l| !l.contact_ids.is_empty() && l.company_id.is_some())
        .unwrap();
    let q = format!("filter[id]={}&with=contacts", lead.id);
    let v = h.get(&format!("/api/v4/leads?{q}")).await.json();
    let embedded = &v["_embedded"]["leads"][0]["_embedded"];
    assert_eq!(
        embedded["contacts"][0]["_links"]["self"]["href"],
        format!("{base}/api/v4/contacts/{}?{q}", lead.contact_ids[0])
    );
    assert_eq!(
        embedded["companies"][0]["_links"]["self"]["href"],
        format!("{base}/api/v4/companies/{}?{q}", lead.company_id.unwrap())
    );
}

#[tokio::test]
async fn limit_over_the_maximum_reads_a_default_page() {
    let h = Harness::new(config(3000)).await;
    let base = h.sim.base_url();
    let ((p, s), expected) = largest_stage(&h.sim);
    let q = stage_query(p, s);
    for limit in ["251", "500", "100000000000000000000000"] {
        let a = h
            .get(&format!("/api/v4/leads?{q}&limit={limit}&page=2"))
            .await;
        assert_eq!(a.status, 200, "{limit}");
        assert_eq!(a.ids(), expected[50..100].to_vec(), "{limit}");
        assert_eq!(
            a.json()["_links"]["next"]["href"],
            format!("{base}/api/v4/leads?{q}&limit={limit}&page=3")
        );
    }
    for bad in ["abc", "0", "-3"] {
        assert_eq!(
            h.get(&format!("/api/v4/leads?limit={bad}")).await.status,
            400,
            "{bad}"
        );
    }
    // Writes keep their hard maximum.
    let many = format!("[{}]", vec!["{}"; 251].join(","));
    let a = h
        .try_request(Method::POST, "/api/v4/leads", Some(TOKEN), &many)
        .await
        .unwrap();
    assert_eq!(a.status, 422);
}

#[tokio::test]
async fn if_modified_since_lists_recent_leads() {
    let h = Harness::new(config(2000)).await;
    let leads = h.sim.leads();
    let mut stamps: Vec<i64> = leads.iter().map(|l| l.updated_at).collect();
    stamps.sort_unstable();
    let t = stamps[stamps.len() * 9 / 10];
    let expected: Vec<i64> = leads
        .iter()
        .filter(|l| !l.is_deleted && l.updated_at >= t)
        .map(|l| l.id)
        .collect();
    assert!(!expected.is_empty() && expected.len() < leads.len() / 5);
    let date = http_date(t);
    let list = |header: String| {
        let h = &h;
        async move {
            let mut ids = Vec::new();
            for page in 1.. {
                let a = h
                    .try_request_with(
                        Method::GET,
                        &format!("/api/v4/leads?limit=250&page={page}"),
                        Some(TOKEN),
                        &[("if-modified-since", header.as_str())],
                        "",
                    )
                    .await
                    .unwrap();
                if a.status == StatusCode::NO_CONTENT {
                    break;
                }
                ids.extend(a.ids());
            }
            ids
        }
    };
    assert_eq!(list(date).await, expected);
    // Unparsable: ignored.
    let all = h.all_ids("", TOKEN).await;
    assert_eq!(list("last tuesday".into()).await, all);
    // After everything: 204.
    let a = h
        .try_request_with(
            Method::GET,
            "/api/v4/leads",
            Some(TOKEN),
            &[("if-modified-since", &http_date(data::NOW + 86_400))],
            "",
        )
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::NO_CONTENT);
}

/// Unix seconds as an IMF-fixdate, written independently of the parser under test.
fn http_date(t: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Walk the calendar from 1970: slow but plainly right.
    let (mut year, mut left) = (1970, days);
    loop {
        let len = if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) {
            366
        } else {
            365
        };
        if left < len {
            break;
        }
        left -= len;
        year += 1;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let lengths = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let mut month = 0;
    while left >= lengths[month] {
        left -= lengths[month];
        month += 1;
    }
    format!(
        "{}, {:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        left + 1,
        MONTHS[month],
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[test]
fn http_date_helper_agrees_with_known_dates() {
    assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(http_date(data::NOW), "Sat, 01 Jun 2024 00:00:00 GMT");
}

#[tokio::test]
async fn drop_and_misplace_faults_change_only_leads_pages() {
    let h = Harness::new(config(2000)).await;
    let ((p, s), expected) = largest_stage(&h.sim);
    let q = format!("{}&limit=20", stage_query(p, s));
    let page = format!("/api/v4/leads?{q}");

    // Drop: other answers neither fire it nor use it up.
    h.sim.inject(FaultRule::always(Fault::DropLead).times(1));
    assert_eq!(h.get("/api/v4/account").await.status, 200);
    assert_eq!(h.get("/api/v4/contacts?limit=5").await.status, 200);
    assert_eq!(h.get(&format!("{page}&page=1000")).await.status, 204);
    assert_eq!(h.get("/api/v4/leads?limit=x").await.status, 400);
    let a = h.get(&page).await;
    assert_eq!(a.ids(), expected[1..20].to_vec(), "the first lead dropped");
    assert_eq!(
        h.get(&page).await.ids(),
        expected[..20].to_vec(),
        "once only"
    );

    // Misplace: only on a one-stage list.
    h.sim
        .inject(FaultRule::always(Fault::MisplaceLead).times(1));
    let all = h.get("/api/v4/leads?limit=20").await;
    assert_eq!(all.status, 200);
    let a = h.get(&page).await;
    let ids = a.ids();
    assert_eq!(ids[..19], expected[..19]);
    assert!(!expected.contains(&ids[19]), "the last lead is a stranger");
    let stranger = &a.json()["_embedded"]["leads"][19];
    assert_ne!(stranger["pipeline_id"], p);
    assert_eq!(
        h.get(&page).await.ids(),
        expected[..20].to_vec(),
        "once only"
    );

    // With a limited token the stranger is one it may see; the rule's order and dice still hold.
    h.sim.inject(
        FaultRule::always(Fault::MisplaceLead)
            .on_query("status_id")
            .times(1),
    );
    let a = h.get_as(&page, Some(LIMITED)).await;
    let last = a.json()["_embedded"]["leads"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert!([1001, 1002].contains(&last["responsible_user_id"].as_i64().unwrap()));
    assert_ne!(last["pipeline_id"], p);

    // A replacing fault checked earlier wins on arrival; the body fault stays armed.
    h.sim.clear_faults();
    h.sim.inject(FaultRule::always(Fault::Status500).times(1));
    h.sim.inject(FaultRule::always(Fault::DropLead).times(1));
    assert_eq!(h.get(&page).await.status, 500);
    assert_eq!(h.get(&page).await.ids(), expected[1..20].to_vec());
}
