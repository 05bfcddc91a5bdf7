//! A drop-in whatever JSON spelling Kommo writes: every link at the proxy, lead objects as the
//! upstream wrote them, item links with the client's query, `limit` as Kommo reads it, header
//! names and types as Kommo's, and long request lines and heads answered by their status.

use std::collections::HashMap;

use kommo_sim::JsonStyle;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const STYLES: [JsonStyle; 3] = [JsonStyle::Compact, JsonStyle::Php, JsonStyle::Pretty];

async fn styled(style: JsonStyle) -> Stack {
    let mut sim = sim_config(3000);
    sim.json_style = style;
    stack(sim).await
}

/// Every string value anywhere in `v`, with the member name it belongs to.
fn strings<'a>(v: &'a Value, key: &'a str, out: &mut Vec<(&'a str, &'a str)>) {
    match v {
        Value::String(s) => out.push((key, s)),
        Value::Array(a) => a.iter().for_each(|v| strings(v, key, out)),
        Value::Object(m) => m.iter().for_each(|(k, v)| strings(v, k, out)),
        _ => {}
    }
}

/// No string in the answer starts with the upstream's origin, and every href is at the proxy.
fn assert_all_links_at_proxy(s: &Stack, v: &Value) -> usize {
    let mut all = Vec::new();
    strings(v, "", &mut all);
    let upstream = s.sim.base_url();
    let mut hrefs = 0;
    for (key, text) in all {
        assert!(
            !text.starts_with(&upstream),
            "{key}: {text} leaks the upstream"
        );
        if key == "href" {
            hrefs += 1;
            assert!(
                text.starts_with(&s.proxy),
                "href {text} is not at the proxy"
            );
        }
    }
    hrefs
}

/// The leads of the sim's own single-stage pages for `pairs` (with `extra` parameters), by id.
async fn upstream_leads(s: &Stack, pairs: &[(i64, i64)], extra: &str) -> HashMap<i64, Value> {
    let mut out = HashMap::new();
    for &pair in pairs {
        let url = format!(
            "{}/api/v4/leads?{}&limit=250&{extra}",
            s.sim.base_url(),
            stages(&[pair])
        );
        let a = Client::default().get(&url, TOKEN).await;
        assert_eq!(a.status, 200, "{url}");
        for lead in a.json()["_embedded"]["leads"].as_array().unwrap() {
            out.insert(lead["id"].as_i64().unwrap(), lead.clone());
        }
    }
    out
}

/// Each lead equals the upstream's, and its links (its own and its embedded entities') carry
/// the client's query.
fn assert_leads_as_upstream(s: &Stack, a: &Answer, query: &str, upstream: &HashMap<i64, Value>) {
    let v = a.json();
    let leads = v["_embedded"]["leads"].as_array().expect("leads");
    assert!(!leads.is_empty());
    for lead in leads {
        let id = lead["id"].as_i64().unwrap();
        let theirs = upstream.get(&id).expect("a lead of the requested stages");
        assert_eq!(without_links(lead), without_links(theirs), "lead {id}");
        let own = format!("{}/api/v4/leads/{id}?{query}", s.proxy);
        assert_eq!(lead["_links"]["self"]["href"], own.as_str());
        for contact in lead["_embedded"]["contacts"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let href = contact["_links"]["self"]["href"].as_str().unwrap();
            assert!(href.ends_with(&format!("?{query}")), "{href}");
        }
    }
}

#[tokio::test]
async fn a_relayed_stage_keeps_the_client_at_the_proxy_in_every_style() {
    for style in STYLES {
        let s = styled(style).await;
        let pair = largest_stages(&s, 1)[0];
        let query = format!("{}&with=contacts&limit=5&page=2", stages(&[pair]));
        let a = s.leads(&query).await;
        assert_eq!(a.status, 200, "{style:?}");
        assert_eq!(a.content_type(), "application/hal+json");
        let direct = Client::default()
            .get(&format!("{}/api/v4/leads?{query}", s.sim.base_url()), TOKEN)
            .await;
        // Apart from links, the page is the upstream's; the page's links keep their page.
        assert_eq!(without_links(&a.json()), without_links(&direct.json()));
        assert!(assert_all_links_at_proxy(&s, &a.json()) > 5);
        let next = a.json()["_links"]["next"]["href"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(next.contains("page=3"), "{next}");
        assert_leads_as_upstream(
            &s,
            &a,
            &query,
            &upstream_leads(&s, &[pair], "with=contacts").await,
        );
        if style == JsonStyle::Php {
            // Relayed as written, not re-serialized: the upstream's escapes are still there.
            let text = String::from_utf8_lossy(&a.body);
            assert!(text.contains("\\/"), "{text}");
        }
    }
}

#[tokio::test]
async fn a_merged_page_keeps_the_client_at_the_proxy_in_every_style() {
    for style in STYLES {
        let s = styled(style).await;
        let pairs = largest_stages(&s, 3);
        for with in ["", "&with=contacts"] {
            let query = format!(
                "{}&order[created_at]=desc&limit=7&page=2{with}",
                stages(&pairs)
            );
            let a = s.leads(&query).await;
            assert_eq!(a.status, 200, "{style:?} {query}");
            assert_eq!(a.content_type(), "application/hal+json");
            assert_eq!(a.ids().len(), 7);
            assert!(assert_all_links_at_proxy(&s, &a.json()) >= 7 + 3);
            let extra = with.trim_start_matches('&');
            assert_leads_as_upstream(&s, &a, &query, &upstream_leads(&s, &pairs, extra).await);
        }
    }
}

#[tokio::test]
async fn a_passed_through_list_links_back_to_the_proxy_in_every_style() {
    for style in STYLES {
        let s = styled(style).await;
        let a = s.get("/api/v4/contacts?limit=5", TOKEN).await;
        assert_eq!(a.status, 200, "{style:?}");
        assert!(assert_all_links_at_proxy(&s, &a.json()) > 5);
        let direct = Client::default()
            .get(
                &format!("{}/api/v4/contacts?limit=5", s.sim.base_url()),
                TOKEN,
            )
            .await;
        assert_eq!(without_links(&a.json()), without_links(&direct.json()));
        // An SDK that follows `next` stays on the proxy.
        let next = a.json()["_links"]["next"]["href"]
            .as_str()
            .unwrap()
            .to_string();
        let before = s.sim.request_count();
        let b = Client::default().get(&next, TOKEN).await;
        assert_eq!(b.status, 200);
        assert_eq!(b.json()["_page"], 2);
        assert_eq!(
            s.sim.request_count(),
            before + 1,
            "followed through the proxy"
        );
    }
}

#[tokio::test]
async fn limit_above_the_maximum_pages_as_kommo_does() {
    let s = styled(JsonStyle::Compact).await;
    // One stage: relayed, and the upstream's own reading of `limit=500`.
    let pair = largest_stages(&s, 1)[0];
    let one = format!("{}&limit=500", stages(&[pair]));
    let direct = Client::default()
        .get(&format!("{}/api/v4/leads?{one}", s.sim.base_url()), TOKEN)
        .await;
    let kommo_page = direct.ids().len();
    assert_eq!(s.leads(&one).await.ids(), direct.ids());
    // Several stages: the same page size, and pages that follow on from each other.
    let pairs = largest_stages(&s, 3);
    let truth = truth(&s.sim.leads(), &pairs, BY_ID, |_| true);
    for page in 1..=2 {
        let a = s
            .leads(&format!("{}&limit=500&page={page}", stages(&pairs)))
            .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.ids(), truth[(page - 1) * kommo_page..page * kommo_page]);
        let next = a.json()["_links"]["next"]["href"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(next.contains("limit=500"), "{next}");
    }
    // Not a number: still refused.
    assert_eq!(
        s.leads(&format!("{}&limit=many", stages(&pairs)))
            .await
            .status,
        400
    );
}

/// Sends `head` on a new connection and reads the answer's head.
async fn raw_answer_head(addr: &str, head: &[u8]) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    // A server may answer and close before it has read everything: a failed write is fine.
    let _ = conn.write_all(head).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout_at(deadline, conn.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn long_targets_and_heads_are_answered_by_their_status() {
    let s = styled(JsonStyle::Compact).await;
    let addr = s.proxy.trim_start_matches("http://").to_string();
    let target = format!("/api/v4/leads?query={}", "x".repeat(120 * 1024));
    let head = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let answer = raw_answer_head(&addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer}");
    let padding = "y".repeat(200 * 1024);
    let head =
        format!("GET /api/v4/account HTTP/1.1\r\nHost: {addr}\r\nX-Padding: {padding}\r\n\r\n");
    let answer = raw_answer_head(&addr, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn header_names_and_content_types_are_written_as_kommo_writes_them() {
    let s = styled(JsonStyle::Compact).await;
    let addr = s.proxy.trim_start_matches("http://").to_string();
    let pairs = largest_stages(&s, 2);
    for (query, status, content_type) in [
        (stages(&pairs), "200", "application/hal+json"),
        (stages(&pairs[..1]), "200", "application/hal+json"),
        (
            format!("{}&limit=x", stages(&pairs)),
            "400",
            "application/problem+json",
        ),
    ] {
        let head = format!(
            "GET /api/v4/leads?{query} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
        );
        let answer = raw_answer_head(&addr, head.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
        assert!(
            answer.contains(&format!("\r\nContent-Type: {content_type}\r\n")),
            "{answer}"
        );
        assert!(answer.contains("\r\nX-Request-Id: "), "{answer}");
    }
}

#[tokio::test]
async fn if_modified_since_lists_recent_changes_and_keys_the_cache() {
    let s = stack_with(sim_config(3000), cached(std::time::Duration::from_secs(60))).await;
    let pairs = largest_stages(&s, 3);
    let query = stages(&pairs);
    let all = s.leads(&query).await;
    assert_eq!(all.status, 200);
    // A moment after every lead was last changed: nothing to list.
    let future = "Wed, 01 Jan 2100 00:00:00 GMT";
    let url = format!("{}/api/v4/leads?{query}", s.proxy);
    let recent = s
        .request_with(
            http::Method::GET,
            &url,
            Some(TOKEN),
            "",
            &[("if-modified-since", future)],
        )
        .await;
    assert_eq!(recent.status, 204, "the header reached every stream");
    let forwarded = [
        ("if-modified-since", future),
        ("x-context-user-id", "1002"),
        ("x-client-uuid", "5f0e2b2c-0000-4000-8000-000000000001"),
    ];
    s.sim.clear_requests();
    let a = s
        .request_with(http::Method::GET, &url, Some(TOKEN), "", &forwarded)
        .await;
    assert_eq!(a.status, 204);
    let seen = s.sim.requests();
    assert_eq!(seen.len(), pairs.len(), "one upstream request per stage");
    for r in seen {
        for (name, value) in forwarded {
            assert_eq!(r.headers[name], value, "{name} on {}", r.query);
        }
    }
    // The stored answer without the header is still the one without it.
    let again = s.leads(&query).await;
    assert_eq!(again.ids(), all.ids());
    assert_eq!(again.headers["x-cache"], "HIT");
    // Read with another user's rights: never the stored answer of the credential alone.
    let as_user = s
        .request_with(
            http::Method::GET,
            &url,
            Some(TOKEN),
            "",
            &[("x-context-user-id", "1002")],
        )
        .await;
    assert_eq!(as_user.headers["x-cache"], "MISS");
}

#[tokio::test]
async fn a_pass_through_body_past_the_buffering_bound_streams_unchanged() {
    let s = stack_with(sim_config(3000), |c| c.upstream.max_body = 4096).await;
    let a = s.get("/api/v4/contacts?limit=100", TOKEN).await;
    let direct = Client::default()
        .get(
            &format!("{}/api/v4/contacts?limit=100", s.sim.base_url()),
            TOKEN,
        )
        .await;
    assert_eq!(a.status, 200);
    assert!(direct.body.len() > 4096);
    assert_eq!(a.body, direct.body);
    // Under the bound, its links are moved.
    let small = s.get("/api/v4/contacts?limit=1", TOKEN).await;
    assert!(small.body.len() < 4096);
    assert_all_links_at_proxy(&s, &small.json());
}
