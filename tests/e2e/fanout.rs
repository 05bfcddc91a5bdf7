//! Multi-stage lead lists against ground truth from the simulator's data.

use std::collections::HashSet;
use std::time::Duration;

use kommo_sim::{Fault, FaultRule};
use serde_json::Value;

use crate::support::*;

const LEADS: usize = 3000;

/// Interesting stage sets of the simulated account: the largest stage (several upstream pages),
/// an empty stage, won and lost across pipelines, and wide sets up to 30 stages.
fn stage_sets(sizes: &[(i64, i64, usize)]) -> Vec<Vec<(i64, i64)>> {
    let all: Vec<(i64, i64)> = sizes.iter().map(|&(p, s, _)| (p, s)).collect();
    let empty = sizes
        .iter()
        .find(|s| s.2 == 0)
        .map(|&(p, s, _)| (p, s))
        .expect("an empty stage");
    let won_lost: Vec<(i64, i64)> = all
        .iter()
        .copied()
        .filter(|&(_, s)| s == 142 || s == 143)
        .collect();
    vec![
        vec![all[0], all[1]],
        vec![all[0], empty, all[5]],
        won_lost.clone(),
        // Repeated pairs count once.
        vec![all[2], all[3], all[2], all[3], all[4]],
        all.iter().copied().take(10).collect(),
        all.iter().copied().rev().take(30).collect(),
    ]
}

const ORDERS: [(&str, TruthOrder); 7] = [
    ("", BY_ID),
    ("order[id]=asc", BY_ID),
    (
        "order[id]=desc",
        TruthOrder {
            field: "id",
            desc: true,
        },
    ),
    (
        "order[created_at]=asc",
        TruthOrder {
            field: "created_at",
            desc: false,
        },
    ),
    (
        "order[created_at]=desc",
        TruthOrder {
            field: "created_at",
            desc: true,
        },
    ),
    (
        "order[updated_at]=asc",
        TruthOrder {
            field: "updated_at",
            desc: false,
        },
    ),
    (
        "order[updated_at]=desc",
        TruthOrder {
            field: "updated_at",
            desc: true,
        },
    ),
];

#[tokio::test]
async fn pages_match_truth_across_stage_sets_orders_and_limits() {
    // With the cache on: pages read for one order, limit or page are reused by the others.
    let s = stack_with(sim_config(LEADS), cached(Duration::from_secs(300))).await;
    let sizes = stage_sizes(&s.sim);
    assert!(
        sizes[0].2 > 250,
        "the largest stage spans several upstream pages"
    );
    let leads = s.sim.leads();
    for set in stage_sets(&sizes) {
        for (order_param, order) in ORDERS {
            let expected = truth(&leads, &set, order, |_| true);
            for limit in [1usize, 7, 50, 250] {
                for page in [1usize, 2] {
                    let q = format!("{}&{order_param}&limit={limit}&page={page}", stages(&set));
                    let a = s.leads(&q).await;
                    let want: Vec<i64> = expected
                        .iter()
                        .copied()
                        .skip((page - 1) * limit)
                        .take(limit)
                        .collect();
                    if want.is_empty() {
                        assert_eq!(a.status, 204, "{q}");
                        assert!(a.body.is_empty());
                        continue;
                    }
                    assert_eq!(a.status, 200, "{q}: {}", String::from_utf8_lossy(&a.body));
                    assert_eq!(a.content_type(), "application/hal+json");
                    assert_eq!(a.ids(), want, "{q}");
                    let v = a.json();
                    assert_eq!(v["_page"], page as u64);
                    assert_eq!(
                        v["_links"]["next"].is_object(),
                        expected.len() > page * limit,
                        "{q}"
                    );
                    assert_eq!(v["_links"]["prev"].is_object(), page > 1, "{q}");
                }
            }
        }
    }
}

#[tokio::test]
async fn walking_every_page_by_number_and_by_next_link_yields_the_true_set() {
    let s = stack_with(sim_config(LEADS), cached(Duration::from_secs(300))).await;
    let sizes = stage_sizes(&s.sim);
    let set = vec![
        (sizes[0].0, sizes[0].1),
        (sizes[1].0, sizes[1].1),
        (sizes[3].0, sizes[3].1),
        (sizes[8].0, sizes[8].1),
    ];
    let order = TruthOrder {
        field: "created_at",
        desc: true,
    };
    let expected = truth(&s.sim.leads(), &set, order, |_| true);
    assert!(expected.len() > 300);
    let base = format!("{}&order[created_at]=desc&limit=37", stages(&set));

    // By page number, until the 204 after the last page.
    let mut by_number = Vec::new();
    let mut page = 1;
    loop {
        let a = s.leads(&format!("{base}&page={page}")).await;
        if a.status == 204 {
            break;
        }
        assert_eq!(a.status, 200);
        let v = a.json();
        let ids = a.ids();
        by_number.extend(ids);
        let last = by_number.len() == expected.len();
        assert_eq!(v["_links"].get("next").is_some(), !last, "page {page}");
        page += 1;
        assert!(page < 100, "runaway paging");
    }
    assert_eq!(by_number, expected);

    // By following next links from the first page.
    let mut by_link = Vec::new();
    let mut url = format!("{}/api/v4/leads?{base}", s.proxy);
    loop {
        let path = url
            .strip_prefix(&s.proxy)
            .expect("links point at the proxy")
            .to_string();
        let a = s.get(&path, TOKEN).await;
        assert_eq!(a.status, 200, "{url}");
        let v = a.json();
        by_link.extend(a.ids());
        match v["_links"]["next"]["href"].as_str() {
            Some(next) => url = next.to_string(),
            None => break,
        }
    }
    assert_eq!(by_link, expected);
    let unique: HashSet<i64> = by_link.iter().copied().collect();
    assert_eq!(unique.len(), by_link.len(), "no lead twice");
}

#[tokio::test]
async fn first_page_costs_one_request_per_stage() {
    let s = stack(sim_config(LEADS)).await;
    let sizes = stage_sizes(&s.sim);
    let set: Vec<(i64, i64)> = sizes.iter().take(7).map(|&(p, st, _)| (p, st)).collect();
    s.sim.clear_requests();
    let a = s.leads(&format!("{}&limit=50", stages(&set))).await;
    assert_eq!(a.status, 200);
    let reqs = s.sim.requests();
    assert_eq!(reqs.len(), 7, "one upstream request per stage");
    for r in &reqs {
        assert_eq!(r.path, "/api/v4/leads");
        let decoded: String = form_urlencoded::parse(r.query.as_bytes())
            .map(|(k, v)| format!("{k}={v}&"))
            .collect();
        assert_eq!(
            decoded.matches("[statuses]").count(),
            2,
            "exactly one pair upstream: {decoded}"
        );
        assert!(decoded.contains("limit=250&"), "{decoded}");
    }
}

#[tokio::test]
async fn filters_and_with_are_forwarded_to_every_stream() {
    let s = stack(sim_config(LEADS)).await;
    let sizes = stage_sizes(&s.sim);
    let set: Vec<(i64, i64)> = sizes.iter().take(5).map(|&(p, st, _)| (p, st)).collect();
    let leads = s.sim.leads();
    let mid = {
        let mut c: Vec<i64> = leads.iter().map(|l| l.created_at).collect();
        c.sort();
        (c[c.len() / 4], c[c.len() * 3 / 4])
    };
    // Three list spellings and encoded brackets in one request.
    let q = format!(
        "{}&filter[responsible_user_id][]=1001&filter%5Bresponsible_user_id%5D%5B1%5D=1003&filter[responsible_user_id]=1004&filter[created_at][from]={}&filter[created_at][to]={}&with=contacts&limit=250",
        stages(&set), mid.0, mid.1
    );
    let expected = truth(&leads, &set, BY_ID, |l| {
        [1001, 1003, 1004].contains(&l.responsible_user_id)
            && l.created_at >= mid.0
            && l.created_at <= mid.1
    });
    assert!(!expected.is_empty());
    let mut got = Vec::new();
    for page in 1.. {
        let a = s.leads(&format!("{q}&page={page}")).await;
        if a.status == 204 {
            break;
        }
        for lead in a.json()["_embedded"]["leads"].as_array().unwrap() {
            assert!(
                lead["_embedded"]["contacts"].is_array(),
                "with=contacts reached the stream"
            );
        }
        got.extend(a.ids());
    }
    assert_eq!(got, expected);
}

#[tokio::test]
async fn query_search_matches_the_union_of_direct_single_stage_answers() {
    let s = stack(sim_config(LEADS)).await;
    let sizes = stage_sizes(&s.sim);
    let set: Vec<(i64, i64)> = sizes.iter().take(4).map(|&(p, st, _)| (p, st)).collect();
    let word = s.sim.leads()[0]
        .name
        .split_whitespace()
        .next()
        .unwrap()
        .to_lowercase();
    // Ground truth from the simulator's own answers, one stage at a time, straight from it.
    let mut expected: Vec<i64> = Vec::new();
    for pair in &set {
        for page in 1.. {
            let url = format!(
                "{}/api/v4/leads?{}&query={word}&limit=250&page={page}",
                s.sim.base_url(),
                stages(&[*pair])
            );
            let a = s.request(http::Method::GET, &url, Some(TOKEN), "").await;
            if a.status == 204 {
                break;
            }
            expected.extend(a.ids());
        }
    }
    expected.sort();
    expected.dedup();
    assert!(!expected.is_empty(), "the search word matches something");
    let a = s
        .leads(&format!("{}&query={word}&limit=250", stages(&set)))
        .await;
    assert_eq!(a.ids(), expected.into_iter().take(250).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_lead_listed_under_two_requested_stages_appears_once() {
    let s = stack(sim_config(LEADS)).await;
    let sizes = stage_sizes(&s.sim);
    let (a, b) = ((sizes[2].0, sizes[2].1), (sizes[3].0, sizes[3].1));
    let moving = s
        .sim
        .leads()
        .into_iter()
        .find(|l| (l.pipeline_id, l.status_id) == a && !l.is_deleted)
        .unwrap();
    assert!(s.sim.add_ghost(moving.id, b.0, b.1));
    // Straight from the simulator, the lead is listed under both stages.
    for pair in [a, b] {
        let url = format!(
            "{}/api/v4/leads?{}&filter[id]={}",
            s.sim.base_url(),
            stages(&[pair]),
            moving.id
        );
        assert_eq!(
            s.request(http::Method::GET, &url, Some(TOKEN), "")
                .await
                .ids(),
            vec![moving.id]
        );
    }
    let expected = truth(&s.sim.leads(), &[a, b], BY_ID, |_| true);
    let mut got = Vec::new();
    for page in 1.. {
        let ans = s
            .leads(&format!("{}&limit=250&page={page}", stages(&[a, b])))
            .await;
        if ans.status == 204 {
            break;
        }
        got.extend(ans.ids());
    }
    assert_eq!(got.iter().filter(|&&id| id == moving.id).count(), 1);
    assert_eq!(got, expected);
}

#[tokio::test]
async fn tokens_see_their_own_leads_and_bad_tokens_get_the_upstream_401() {
    let s = stack(sim_config(LEADS)).await;
    let sizes = stage_sizes(&s.sim);
    let set: Vec<(i64, i64)> = sizes.iter().take(3).map(|&(p, st, _)| (p, st)).collect();
    let q = format!("/api/v4/leads?{}&limit=250", stages(&set));
    let limited = s.get(&q, "limited").await;
    let expected = truth(&s.sim.leads(), &set, BY_ID, |l| {
        [1001, 1002].contains(&l.responsible_user_id)
    });
    assert_eq!(
        limited.ids(),
        expected.into_iter().take(250).collect::<Vec<_>>()
    );

    for path in [q.clone(), format!("/api/v4/leads?{}", stages(&set[..1]))] {
        let a = s.get(&path, "not-a-token").await;
        assert_eq!(a.status, 401, "{path}");
        assert_eq!(a.content_type(), "application/problem+json");
        assert_eq!(a.json()["detail"], "Invalid user name or password");
    }
}

#[tokio::test]
async fn single_stage_is_relayed_with_hrefs_at_the_proxy() {
    let s = stack(sim_config(LEADS)).await;
    let sizes = stage_sizes(&s.sim);
    let q = format!(
        "{}&limit=5&page=2&with=contacts",
        stages(&[(sizes[0].0, sizes[0].1)])
    );
    let via_proxy = s.leads(&q).await;
    let direct = s
        .request(
            http::Method::GET,
            &format!("{}/api/v4/leads?{q}", s.sim.base_url()),
            Some(TOKEN),
            "",
        )
        .await;
    assert_eq!(via_proxy.status, 200);
    assert_eq!(via_proxy.content_type(), "application/hal+json");
    let expected = moved(&direct.body, &s.sim.base_url(), &s.proxy);
    assert_eq!(String::from_utf8_lossy(&via_proxy.body), expected);
    assert!(!String::from_utf8_lossy(&via_proxy.body).contains(&s.sim.base_url()));

    let empty = sizes.iter().find(|s| s.2 == 0).unwrap();
    let a = s.leads(&stages(&[(empty.0, empty.1)])).await;
    assert_eq!(a.status, 204);
    assert!(a.body.is_empty());
}

#[tokio::test]
async fn merged_lead_hrefs_point_at_the_proxy() {
    let s = stack(sim_config(LEADS)).await;
    let sizes = stage_sizes(&s.sim);
    let set: Vec<(i64, i64)> = sizes.iter().take(3).map(|&(p, st, _)| (p, st)).collect();
    let a = s.leads(&format!("{}&limit=20&page=2", stages(&set))).await;
    let v = a.json();
    for lead in v["_embedded"]["leads"].as_array().unwrap() {
        let href = lead["_links"]["self"]["href"].as_str().unwrap();
        assert!(
            href.starts_with(&format!("{}/api/v4/leads/{}", s.proxy, lead["id"])),
            "{href}"
        );
    }
    let self_href = v["_links"]["self"]["href"].as_str().unwrap();
    assert!(self_href.starts_with(&format!("{}/api/v4/leads?", s.proxy)));
    assert!(
        self_href.contains("limit=20") && self_href.ends_with("page=2"),
        "{self_href}"
    );
    assert!(v["_links"]["first"]["href"]
        .as_str()
        .unwrap()
        .ends_with("page=1"));
}

#[tokio::test]
async fn bad_input_gets_400_naming_each_parameter() {
    let s = stack(sim_config(300)).await;
    let two = stages(&[(1, 2), (3, 4)]);
    let cases: Vec<(String, Vec<&str>)> = vec![
        (format!("{two}&filter[id][]=abc"), vec!["filter[id][]"]),
        ("filter[statuses][0][pipeline_id]=1&filter[statuses][1][pipeline_id]=2&filter[statuses][1][status_id]=3".into(), vec!["filter[statuses][0][status_id]"]),
        ("filter[statuses][0][status_id]=1".into(), vec!["filter[statuses][0][pipeline_id]"]),
        (format!("{two}&limit=0"), vec!["limit"]),
        (format!("{two}&limit=fifty"), vec!["limit"]),
        (format!("{two}&page=0"), vec!["page"]),
        (format!("{two}&order[price]=asc"), vec!["order[price]"]),
        (format!("{two}&order[id]=sideways"), vec!["order[id]"]),
        ("limit=5x&page=-1".into(), vec!["page", "limit"]),
    ];
    for (q, names) in cases {
        let a = s.leads(&q).await;
        assert_eq!(a.status, 400, "{q}");
        assert_eq!(a.content_type(), "application/problem+json");
        let v = a.json();
        let mut got: Vec<&str> = v["invalid-params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        let mut want = names.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{q}");
        assert!(!v["detail"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        s.sim.request_count(),
        0,
        "invalid requests never reach the upstream"
    );

    let too_many: Vec<(i64, i64)> = (0..101).map(|i| (1, i)).collect();
    let a = s.leads(&stages(&too_many)).await;
    assert_eq!(a.status, 400);
    assert!(a.json()["detail"].as_str().unwrap().contains("at most 100"));
}

#[tokio::test]
async fn a_failing_stream_fails_the_request_with_502_naming_the_stage() {
    let s = stack(sim_config(LEADS)).await;
    let sizes = stage_sizes(&s.sim);
    let set: Vec<(i64, i64)> = sizes.iter().take(3).map(|&(p, st, _)| (p, st)).collect();
    let bad = set[1];
    s.sim.inject(
        FaultRule::always(Fault::Status500)
            .on_query(format!("filter[statuses][0][status_id]={}", bad.1)),
    );
    let a = s.leads(&stages(&set)).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.content_type(), "application/problem+json");
    let v = a.json();
    let failed = v["failed-stages"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["pipeline_id"], bad.0);
    assert_eq!(failed[0]["status_id"], bad.1);
    assert_eq!(failed[0]["upstream_status"], 500);
    assert!(v["detail"]
        .as_str()
        .unwrap()
        .contains(&format!("status_id={}", bad.1)));
    assert!(v.get("_embedded").is_none(), "no partial data");
}

#[tokio::test]
async fn unparsable_upstream_pages_are_502_never_partial() {
    let s = stack(sim_config(LEADS)).await;
    let sizes = stage_sizes(&s.sim);
    let set: Vec<(i64, i64)> = sizes.iter().take(2).map(|&(p, st, _)| (p, st)).collect();
    for fault in [
        Fault::Status {
            status: 200,
            body: r#"{"_embedded":{"leads":{"id":1}}}"#.into(),
            content_type: "application/hal+json".into(),
        },
        Fault::Status {
            status: 200,
            body: r#"{"_embedded":{"leads":[{"name":"no id"}]}}"#.into(),
            content_type: "application/hal+json".into(),
        },
        Fault::Status {
            status: 200,
            body: r#"{"_embedded":{"leads":[{"id":1,"created_at":"x"}]}}"#.into(),
            content_type: "application/hal+json".into(),
        },
        Fault::Status {
            status: 200,
            body: "<html>maintenance</html>".into(),
            content_type: "text/html".into(),
        },
    ] {
        s.sim.clear_faults();
        s.sim.inject(
            FaultRule::always(fault.clone())
                .on_query(format!("filter[statuses][0][status_id]={}", set[0].1)),
        );
        let a = s
            .leads(&format!("{}&order[created_at]=asc", stages(&set)))
            .await;
        assert_eq!(a.status, 502, "{fault:?}");
        let v: Value = a.json();
        assert_eq!(v["failed-stages"][0]["status_id"], set[0].1);
    }
}

#[tokio::test]
async fn upstream_client_errors_are_relayed_as_they_came() {
    let s = stack(sim_config(300)).await;
    s.sim.inject(FaultRule::always(Fault::Status {
        status: 402,
        body: r#"{"title":"Payment Required","type":"https://httpstatus.es/402","status":402,"detail":"Payment required"}"#.into(),
        content_type: "application/problem+json".into(),
    }));
    let a = s.leads(&stages(&[(1, 2), (3, 4)])).await;
    assert_eq!(a.status, 402);
    assert_eq!(a.content_type(), "application/problem+json");
    assert_eq!(a.json()["detail"], "Payment required");
}
