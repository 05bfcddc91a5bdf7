//! Connections that send nothing: closed within the header read timeout of being accepted or
//! of their last answer, and never more open than `--max-connections`, while the admin
//! listener and real requests keep being answered.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use kommo_sim::SimConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::*;

/// The tests of this module open thousands of sockets each: one at a time, so the descriptor
/// counts of one are not another's.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Past the header read timeout, the time the proxy is given to close what it should.
const SLACK: Duration = Duration::from_secs(4);

fn small_account() -> SimConfig {
    sim_config(50)
}

/// Room for thousands of sockets, client and server side, in this one process.
fn raise_open_files() {
    #[cfg(target_os = "linux")]
    kommo_fanout::raise_open_files_limit().expect("the open-files limit can be raised");
}

fn addr(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// `n` connections to `url` that send nothing.
async fn silent(url: &str, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(TcpStream::connect(addr(url)).await.expect("connects"));
    }
    out
}

/// Whether the server closes `stream` (end of stream or reset) before `deadline`; whatever it
/// writes before closing is skipped.
async fn closed_by(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// How many of `streams` the server closes before `deadline`.
async fn count_closed(streams: &mut [TcpStream], deadline: Instant) -> usize {
    futures::future::join_all(streams.iter_mut().map(|s| closed_by(s, deadline)))
        .await
        .into_iter()
        .filter(|&closed| closed)
        .count()
}

/// Whether the server still holds `stream` open: nothing to read and no end of stream.
fn still_open(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(stream.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

fn open_connections(s: &Stack) -> i64 {
    s.gateway.metrics.open_connections.get()
}

async fn healthz(s: &Stack) -> StatusCode {
    s.request(Method::GET, &format!("{}/healthz", s.admin), None, "")
        .await
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_within_the_header_read_timeout_of_their_accept() {
    let _one = ONE_AT_A_TIME.lock().await;
    raise_open_files();
    let timeout = Duration::from_secs(1);
    let s = stack_with(small_account(), |c| {
        c.gateway.bounds.header_read_timeout = timeout
    })
    .await;
    let mut clients = silent(&s.proxy, 3000).await;
    let connected = Instant::now();
    // Not closed on sight: the last one, just connected, is still waiting for its head.
    let last = clients.last().expect("connections were opened");
    assert!(still_open(last), "a fresh connection is given its time");
    // Meanwhile the admin listener and the proxy answer.
    assert_eq!(healthz(&s).await, StatusCode::OK);
    assert_eq!(s.get("/api/v4/account", TOKEN).await.status, StatusCode::OK);
    let closed = count_closed(&mut clients, connected + timeout + SLACK).await;
    assert_eq!(
        closed, 3000,
        "every silent connection is closed by the proxy"
    );
    // The test client's keep-alive connection idles out the same way: none is left open.
    eventually("no open connection is left", timeout + SLACK, || {
        open_connections(&s) == 0
    })
    .await;
    assert_eq!(healthz(&s).await, StatusCode::OK);
    assert_eq!(s.get("/api/v4/account", TOKEN).await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_heads_and_a_bare_http2_preface_are_closed_too() {
    let _one = ONE_AT_A_TIME.lock().await;
    let timeout = Duration::from_secs(1);
    let s = stack_with(small_account(), |c| {
        c.gateway.bounds.header_read_timeout = timeout
    })
    .await;
    // A byte, part of an HTTP/1.1 head, part of the HTTP/2 preface, the whole preface alone
    // (the server's SETTINGS come back; no request follows), and the preface with SETTINGS.
    let starts: [&[u8]; 5] = [
        b"G",
        b"GET /api/v4/account HTTP/1.1\r\nHost: a\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    ];
    let mut clients = Vec::new();
    for start in starts {
        let mut c = TcpStream::connect(addr(&s.proxy)).await.expect("connects");
        c.write_all(start).await.expect("writes");
        clients.push(c);
    }
    let sent = Instant::now();
    let closed = count_closed(&mut clients, sent + timeout + SLACK).await;
    assert_eq!(closed, starts.len(), "every stalled connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_that_goes_silent_after_its_answers_is_closed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let timeout = Duration::from_secs(1);
    let s = stack_with(small_account(), |c| {
        c.gateway.bounds.header_read_timeout = timeout
    })
    .await;
    let stream = TcpStream::connect(addr(&s.proxy)).await.expect("connects");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    // Completes when the server closes the connection.
    let driver = tokio::spawn(conn);
    // Two requests on the one connection: it is kept alive between answers.
    for _ in 0..2 {
        let req = Request::get("/api/v4/account")
            .header(http::header::HOST, addr(&s.proxy))
            .header(http::header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Empty::<Bytes>::new())
            .expect("a valid request");
        // The previous exchange may still be winding down in the connection's task.
        sender.ready().await.expect("the connection stays open");
        let resp = sender.send_request(req).await.expect("answered");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp.headers().contains_key(http::header::CONNECTION));
        resp.into_body().collect().await.expect("body reads");
    }
    let answered = Instant::now();
    let ended = tokio::time::timeout_at(answered + timeout + SLACK, driver).await;
    assert!(
        ended.is_ok(),
        "the proxy closes a keep-alive connection that sends no next request"
    );
    assert_eq!(s.sim.request_count(), 2);
}

/// The descriptors this process has open.
fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The sockets of this process accepted on `port` (the server's side of its connections), as
/// listed in `/proc/net/tcp` with an inode among this process's descriptors.
fn accepted_sockets(port: u16) -> usize {
    let ours: HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local_port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        // Local address, state (0A: listening) and inode.
        .filter(|f| f.len() > 9 && f[1].ends_with(&local_port) && f[3] != "0A")
        .filter(|f| ours.contains(f[9]))
        .count()
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_clients_wait_and_descriptors_stay_bounded() {
    let _one = ONE_AT_A_TIME.lock().await;
    raise_open_files();
    const MAX: usize = 100;
    const CLIENTS: usize = 1000;
    // The default header read timeout: the silent connections stay while they are counted.
    let s = stack_with(small_account(), |c| c.gateway.bounds.max_connections = MAX).await;
    let port: u16 = addr(&s.proxy)
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the proxy's port");
    let before = open_descriptors();
    // All at once: past the bound and the listen backlog a connect waits for the server, so
    // each runs on its own task, holding its socket until it is aborted.
    let proxy = addr(&s.proxy).to_string();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(TcpStream::connect(proxy.clone())))
        .collect();
    eventually("the proxy takes connections up to its bound", SLACK, || {
        open_connections(&s) == MAX as i64
    })
    .await;
    eventually("every client has its socket", SLACK, || {
        open_descriptors() >= before + CLIENTS
    })
    .await;
    assert_eq!(accepted_sockets(port), MAX, "no more are accepted");
    // Each client holds a descriptor; the server at most MAX more, not one per client. The
    // slack is for what other tests of this binary open meanwhile.
    let grown = open_descriptors().saturating_sub(before);
    assert!(
        grown <= CLIENTS + MAX + 400,
        "{grown} more descriptors for {CLIENTS} clients"
    );
    assert_eq!(
        healthz(&s).await,
        StatusCode::OK,
        "the admin listener answers"
    );
    assert_eq!(open_connections(&s), MAX as i64);
    assert_eq!(accepted_sockets(port), MAX);
    // The silent ones leave: those waiting in the backlog are accepted in turn, see the end of
    // stream and close, and a real request gets through.
    for client in &clients {
        client.abort();
    }
    for client in clients {
        drop(client.await);
    }
    assert_eq!(s.get("/api/v4/account", TOKEN).await.status, StatusCode::OK);
    eventually("the silent connections are closed", SLACK, || {
        open_connections(&s) <= 1
    })
    .await;
}
