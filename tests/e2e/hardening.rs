//! Hardening: only the configured upstream, no poisoned links, bounded everything, unambiguous
//! framing. Raw requests go over a plain TCP socket, byte for byte.

use std::time::Duration;

use kommo_fanout::config::ServeConfig;
use kommo_sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// Sends `raw` and reads until the server closes or `limit` passes; returns what came back.
async fn raw(proxy: &str, request: &[u8]) -> String {
    let addr = proxy.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

#[tokio::test]
async fn absolute_form_and_any_host_still_go_to_the_configured_upstream() {
    let s = stack(sim_config(300)).await;
    let response = raw(
        &s.proxy,
        b"GET http://evil.example/api/v4/account HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer demo-token\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&response), 200, "{response}");
    let seen = s.sim.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/api/v4/account");
}

#[tokio::test]
async fn connect_is_refused() {
    let s = stack(sim_config(300)).await;
    let response = raw(
        &s.proxy,
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&response), 405, "{response}");
    assert!(response.contains("application/problem+json"));
    assert_eq!(s.sim.request_count(), 0);
}

#[tokio::test]
async fn ambiguous_framing_is_refused_never_forwarded() {
    let s = stack(sim_config(300)).await;
    // Content-Length with Transfer-Encoding: hyper reads it as chunked (RFC 9112 §6.1), drops
    // the length and closes the connection after answering, so a request smuggled behind the
    // body is never read, and the upstream gets a freshly framed request.
    let smuggle = b"POST /api/v4/leads HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/v4/smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let response = raw(&s.proxy, smuggle).await;
    assert_eq!(
        response.matches("HTTP/1.1 ").count(),
        1,
        "one answer, then the connection closes: {response}"
    );
    assert!(s
        .sim
        .requests()
        .iter()
        .all(|r| r.path != "/api/v4/smuggled"));
    let before = s.sim.request_count();
    let ambiguous: [&[u8]; 4] = [
        b"POST /api/v4/leads HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"POST /api/v4/leads HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n0\r\n\r\n",
        b"GET /api/v4/account HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
        b"GET /api/v4/account HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
    ];
    for request in ambiguous {
        let response = raw(&s.proxy, request).await;
        let status = status_of(&response);
        assert_eq!(
            status,
            400,
            "{}\n{response}",
            String::from_utf8_lossy(request)
        );
    }
    assert_eq!(
        s.sim.request_count(),
        before,
        "nothing ambiguous reached the upstream"
    );
}

#[tokio::test]
async fn links_follow_each_clients_host_and_never_leak_into_anothers_cached_answer() {
    let s = stack_with(sim_config(3000), cached(Duration::from_secs(300))).await;
    let q = format!("/api/v4/leads?{}", stages(&largest_stages(&s, 2)));
    let url = format!("{}{q}", s.proxy);
    let s = &s;
    let url = &url;
    let ask = |host: &'static str| async move {
        s.request_with(http::Method::GET, url, Some(TOKEN), "", &[("host", host)])
            .await
    };
    let a = ask("dashboards.internal:8080").await;
    let b = ask("reports.internal").await;
    assert_eq!((a.status.as_u16(), b.status.as_u16()), (200, 200));
    let (a, b) = (
        String::from_utf8_lossy(&a.body).into_owned(),
        String::from_utf8_lossy(&b.body).into_owned(),
    );
    assert!(
        a.contains("http://dashboards.internal:8080/api/v4/leads")
            && !a.contains("reports.internal")
    );
    assert!(
        b.contains("http://reports.internal/api/v4/leads") && !b.contains("dashboards.internal")
    );
    let again = ask("dashboards.internal:8080").await;
    assert_eq!(again.headers["x-cache"], "HIT");
    assert!(!String::from_utf8_lossy(&again.body).contains("reports.internal"));

    for bad in ["evil.example/x", "a\"b", "x y"] {
        let answer = s
            .request_with(
                http::Method::GET,
                &format!("{}{q}", s.proxy),
                Some(TOKEN),
                "",
                &[("host", bad)],
            )
            .await;
        assert_eq!(answer.status, 400, "{bad}");
    }
    // X-Forwarded-Host is not trusted by default.
    let forwarded = s
        .request_with(
            http::Method::GET,
            &format!("{}{q}", s.proxy),
            Some(TOKEN),
            "",
            &[("x-forwarded-host", "evil.example")],
        )
        .await;
    assert!(!String::from_utf8_lossy(&forwarded.body).contains("evil.example"));
}

#[tokio::test]
async fn forwarded_headers_are_honoured_only_when_trusted() {
    let s = stack_with(sim_config(3000), |c| c.gateway.trust_forwarded = true).await;
    let q = format!(
        "{}/api/v4/leads?{}",
        s.proxy,
        stages(&largest_stages(&s, 2))
    );
    let a = s
        .request_with(
            http::Method::GET,
            &q,
            Some(TOKEN),
            "",
            &[
                ("x-forwarded-host", "crm.example.com"),
                ("x-forwarded-proto", "https"),
            ],
        )
        .await;
    assert!(String::from_utf8_lossy(&a.body).contains("https://crm.example.com/api/v4/leads?"));
}

fn bounded(c: &mut ServeConfig) {
    c.gateway.bounds.max_uri_len = 2048;
    c.gateway.bounds.max_header_bytes = 4096;
    c.gateway.bounds.max_body_bytes = 1000;
    c.gateway.bounds.max_query_params = 50;
    c.upstream.max_body = 64 * 1024;
}

#[tokio::test]
async fn every_bound_answers_its_status_with_a_problem() {
    let s = stack_with(sim_config(3000), bounded).await;
    let check = |a: Answer, status: u16, needle: &str| {
        assert_eq!(a.status, status, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.content_type(), "application/problem+json");
        assert!(
            a.json()["detail"].as_str().unwrap().contains(needle),
            "{}",
            a.json()
        );
    };
    let long = format!("/api/v4/leads?query={}", "x".repeat(3000));
    check(s.get(&long, TOKEN).await, 414, "--max-uri-len");
    let big_header = "y".repeat(5000);
    let a = s
        .request_with(
            http::Method::GET,
            &format!("{}/api/v4/account", s.proxy),
            Some(TOKEN),
            "",
            &[("x-padding", &big_header)],
        )
        .await;
    check(a, 431, "--max-header-bytes");
    let many = (0..60)
        .map(|i| format!("p{i}=1"))
        .collect::<Vec<_>>()
        .join("&");
    check(
        s.get(&format!("/api/v4/account?{many}"), TOKEN).await,
        400,
        "--max-query-params",
    );
    let body = format!("[{{\"name\":\"{}\"}}]", "z".repeat(2000));
    let a = s
        .request(
            http::Method::POST,
            &format!("{}/api/v4/leads", s.proxy),
            Some(TOKEN),
            &body,
        )
        .await;
    check(a, 413, "--max-body-bytes");
    assert_eq!(
        s.sim.request_count(),
        0,
        "refused requests never reach the upstream"
    );

    // A chunked body that grows past the bound while it streams.
    let chunk = "z".repeat(600);
    let request = format!(
        "POST /api/v4/leads HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer demo-token\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    let response = raw(&s.proxy, request.as_bytes()).await;
    assert_eq!(status_of(&response), 413, "{response}");

    // An upstream answer larger than the proxy buffers: 502 naming the stream.
    let a = s
        .leads(&format!("{}&limit=250", stages(&largest_stages(&s, 2))))
        .await;
    assert_eq!(a.status, 502);
    assert!(a.json()["failed-stages"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("larger than"));
}

#[tokio::test]
async fn load_is_shed_past_the_concurrency_bound() {
    let s = std::sync::Arc::new(
        stack_with(
            SimConfig {
                latency: Duration::from_millis(800),
                ..sim_config(300)
            },
            |c| {
                c.gateway.bounds.max_concurrent = 1;
            },
        )
        .await,
    );
    let slow = {
        let s = s.clone();
        tokio::spawn(async move { s.get("/api/v4/account", TOKEN).await })
    };
    eventually(
        "the slow request reaches the upstream",
        Duration::from_secs(10),
        || s.sim.request_count() > 0,
    )
    .await;
    let shed = s.get("/api/v4/account", TOKEN).await;
    assert_eq!(shed.status, 503);
    assert!(shed.headers.contains_key("retry-after"));
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(
        s.get("/api/v4/account", TOKEN).await.status,
        200,
        "served again once the load is gone"
    );
}

#[tokio::test]
async fn slow_clients_are_dropped_after_the_header_read_timeout() {
    let s = stack_with(sim_config(300), |c| {
        c.gateway.bounds.header_read_timeout = Duration::from_millis(300)
    })
    .await;
    let mut stream = TcpStream::connect(s.proxy.trim_start_matches("http://"))
        .await
        .unwrap();
    // The slow client sends its headers a byte at a time, never finishing.
    let slow = tokio::spawn(async move {
        for b in b"GET /api/v4/account HTTP/1.1\r\nHost: a\r\nX-Slow: ".iter() {
            if stream.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
        read.is_ok()
    });
    // Meanwhile others are served.
    assert_eq!(s.get("/api/v4/account", TOKEN).await.status, 200);
    assert!(
        slow.await.unwrap(),
        "the server closed the slow connection instead of waiting forever"
    );
    assert_eq!(
        s.sim.request_count(),
        1,
        "only the other client's request went upstream"
    );
}
