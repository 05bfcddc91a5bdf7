//! Paths other than the leads list reach the upstream unchanged.

use http::Method;

use crate::support::*;

#[tokio::test]
async fn post_body_reaches_the_upstream_and_the_answer_comes_back() {
    let s = stack(sim_config(300)).await;
    let body = r#"[{"name":"Through the proxy","price":1234}]"#;
    let a = s
        .request(
            Method::POST,
            &format!("{}/api/v4/leads", s.proxy),
            Some(TOKEN),
            body,
        )
        .await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let id = a.json()["_embedded"]["leads"][0]["id"]
        .as_i64()
        .expect("created id");
    let created = s
        .sim
        .leads()
        .into_iter()
        .find(|l| l.id == id)
        .expect("the upstream stored it");
    assert_eq!(created.name, "Through the proxy");
    assert_eq!(created.price, 1234);
    let last = s.sim.requests().pop().unwrap();
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        ("POST", "/api/v4/leads")
    );
    assert_eq!(
        last.token.as_deref(),
        Some(TOKEN),
        "Authorization passes through"
    );
}

#[tokio::test]
async fn every_answer_carries_a_request_id_and_the_upstream_sees_the_same() {
    let s = stack(sim_config(300)).await;
    let url = format!("{}/api/v4/leads/pipelines", s.proxy);
    let id_of = |a: &Answer| {
        a.headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("an x-request-id on the answer")
            .to_owned()
    };
    let upstream_id = || s.sim.requests().pop().unwrap().request_id;

    // None sent: one is made, 128 bits in hex, and a new one for every request.
    let first = s.request(Method::GET, &url, Some(TOKEN), "").await;
    assert_eq!(first.status, 200);
    let made = id_of(&first);
    assert_eq!(made.len(), 32, "{made}");
    assert!(made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
    assert_eq!(upstream_id().as_deref(), Some(made.as_str()));
    let second = s.request(Method::GET, &url, Some(TOKEN), "").await;
    assert_ne!(id_of(&second), made);

    // A plain one from the client is kept, upstream and back.
    let mine = "dashboard-7:req_42.a";
    let kept = get_with_id(&s, &url, mine).await;
    assert_eq!(id_of(&kept), mine);
    assert_eq!(upstream_id().as_deref(), Some(mine));

    // One that is not plain (a space, or over 128 bytes) is replaced, upstream too.
    let long = "a".repeat(129);
    for bad in ["two words", long.as_str()] {
        let replaced = get_with_id(&s, &url, bad).await;
        let id = id_of(&replaced);
        assert_eq!(id.len(), 32, "{bad:?} -> {id}");
        assert_eq!(upstream_id().as_deref(), Some(id.as_str()));
    }

    // A leads page goes upstream with the same id as the answer's.
    let page = get_with_id(
        &s,
        &format!("{}/api/v4/leads?limit=5", s.proxy),
        "leads-page-1",
    )
    .await;
    assert_eq!(page.status, 200);
    assert_eq!(id_of(&page), "leads-page-1");
    assert_eq!(upstream_id().as_deref(), Some("leads-page-1"));
}

/// `GET url` with the demo token and `id` as the request id.
async fn get_with_id(s: &Stack, url: &str, id: &str) -> Answer {
    s.request_with(Method::GET, url, Some(TOKEN), "", &[("x-request-id", id)])
        .await
}

#[tokio::test]
async fn upstream_404_and_other_paths_are_relayed() {
    let s = stack(sim_config(300)).await;
    let a = s.get("/api/v4/no-such-thing?x=1", TOKEN).await;
    assert_eq!(a.status, 404);
    assert_eq!(a.content_type(), "application/problem+json");
    let last = s.sim.requests().pop().unwrap();
    assert_eq!(
        (last.path.as_str(), last.query.as_str()),
        ("/api/v4/no-such-thing", "x=1")
    );

    let via = s.get("/api/v4/leads/pipelines", TOKEN).await;
    let direct = s
        .request(
            Method::GET,
            &format!("{}/api/v4/leads/pipelines", s.sim.base_url()),
            Some(TOKEN),
            "",
        )
        .await;
    assert_eq!(via.status, 200);
    // The same pipelines, with their links moved to the proxy.
    let at_proxy = moved(&direct.body, &s.sim.base_url(), &s.proxy);
    assert_eq!(String::from_utf8_lossy(&via.body), at_proxy);

    let unauthorized = s.get("/api/v4/leads/pipelines", "wrong").await;
    assert_eq!(unauthorized.status, 401);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_problem() {
    // Bind and drop a listener: nothing listens on that port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = stack_with(sim_config(10), |c| {
        c.upstream.origin =
            kommo_fanout::upstream::Origin::parse(&format!("http://127.0.0.1:{port}")).unwrap();
    })
    .await;
    for path in ["/api/v4/account", "/api/v4/leads?filter[statuses][0][pipeline_id]=1&filter[statuses][0][status_id]=2&filter[statuses][1][pipeline_id]=1&filter[statuses][1][status_id]=3"] {
        let a = s.get(path, TOKEN).await;
        assert_eq!(a.status, 502, "{path}");
        assert_eq!(a.content_type(), "application/problem+json");
    }
}

#[tokio::test]
async fn serving_threads_share_kept_upstream_connections() {
    let s = stack_with(sim_config(300), |c| c.worker_threads = Some(2)).await;
    // Two clients, each on one keep-alive connection: the first goes to serving thread 0, the
    // second (while the first is still open) to thread 1.
    let (a, b) = (Client::default(), Client::default());
    let url = format!("{}/api/v4/account", s.proxy);
    for round in 0..3 {
        for client in [&a, &b] {
            assert_eq!(client.get(&url, TOKEN).await.status, 200);
            // The upstream connection is back in the pool before the next request.
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        // One upstream connection, opened by the first request and reused after by both
        // threads: a pool per thread would have two, a connection per request six.
        assert_eq!(s.sim.connections_accepted(), 1, "after round {round}");
    }
}
