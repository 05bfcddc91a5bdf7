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
    assert_eq!(via.json()["_embedded"], direct.json()["_embedded"]);

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
async fn each_serving_thread_keeps_its_own_upstream_connections() {
    let s = stack_with(sim_config(300), |c| c.worker_threads = Some(2)).await;
    // Two clients, each on one keep-alive connection: the first goes to serving thread 0, the
    // second (while the first is still open) to thread 1.
    let (a, b) = (Client::default(), Client::default());
    let url = format!("{}/api/v4/account", s.proxy);
    for round in 0..3 {
        for client in [&a, &b] {
            assert_eq!(client.get(&url, TOKEN).await.status, 200);
            // The upstream connection is back in its pool before the next request.
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        // One upstream connection per thread, opened by its first request and reused after:
        // a pool shared by the threads would have one, a pool per request six.
        assert_eq!(s.sim.connections_accepted(), 2, "after round {round}");
    }
}
