//! Connections to the origin kept open between requests: one pool per serving thread.
//!
//! There is one origin, so a pool is a list, not a map keyed by host: checking a connection
//! out is a pop from the thread's own list, and one goes back as soon as its answer's head
//! has arrived. HTTP/1.1 connections carry one request at a time; when TLS negotiates
//! HTTP/2 (ALPN), that one connection carries every request of the thread.
//!
//! A request that could not be written because a reused connection had just closed (the
//! origin's keep-alive timeout ran out) is sent again on another connection: hyper hands such a
//! request back unsent, so this is safe for every method. A failure after the request went out
//! is returned as it is: whether to try again is the caller's decision (see
//! [`crate::upstream::fetch`]).

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;
use tower_service::Service;
use tracing::debug;

use super::{error_chain, Origin};
use crate::body::ProxyBody;

/// The connector: TCP, then TLS for `https` origins (offering HTTP/2 and HTTP/1.1).
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The open connections of one serving thread to the origin.
pub struct Pool {
    connector: Connector,
    origin: Origin,
    /// Idle connections older than this are closed; the reaper runs once per period.
    idle_timeout: Duration,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// HTTP/1.1 connections not carrying a request, the most recently used last.
    idle: Vec<Idle>,
    /// The HTTP/2 connection, once the origin chose HTTP/2.
    h2: Option<http2::SendRequest<ProxyBody>>,
    /// The task that closes connections idle past the timeout (on the runtime that last
    /// returned a connection; a new one starts if that runtime has gone).
    reaper: Option<JoinHandle<()>>,
}

struct Idle {
    tx: http1::SendRequest<ProxyBody>,
    since: Instant,
}

impl Idle {
    /// Worth keeping at `now`: still open, and back in the pool for less than `timeout`.
    fn fresh(&self, now: Instant, timeout: Duration) -> bool {
        !self.tx.is_closed() && now.duration_since(self.since) < timeout
    }
}

/// Reused connections tried for one request before a new one is dialled.
const MAX_REUSES: u32 = 3;

/// The most an HTTP/1.1 connection reads from the origin at once. hyper's default lets the
/// read buffer grow to about 400 KB on a large body, and while a read's chunk lives, the next
/// read takes a new buffer of that size. Those buffers cost memory for nothing: at Kommo's
/// 7 requests/s, reading a 220 KB page in 32 KiB steps costs microseconds. In the soak
/// (1 minute, 64 MiB cache) peak RSS fell from 153–160 to 134 MiB with glibc's defaults.
/// Under `MALLOC_MMAP_THRESHOLD_=131072` each larger buffer was mapped, faulted in and unmapped
/// per read: a 220 KB pass-through body then took about twice the CPU. The bound also caps an
/// answer's head at 32 KiB, far above what Kommo sends.
const READ_BUFFER: usize = 32 * 1024;

enum Conn {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Pool {
    pub fn new(connector: Connector, origin: &Origin, idle_timeout: Duration) -> Self {
        Pool {
            connector,
            origin: origin.clone(),
            idle_timeout,
            state: Arc::default(),
        }
    }

    /// Sends `req` to the origin, on a pooled connection or on a new one, and returns the
    /// answer with its body still streaming. Of the request's URI only the path and query are
    /// used. Errors are one line, causes included.
    pub async fn send(&self, mut req: Request<ProxyBody>) -> Result<Response<Incoming>, String> {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut reuses = 0;
        loop {
            // After a few reused connections failed in a row, a new one settles it.
            let pooled = (reuses < MAX_REUSES).then(|| self.checkout()).flatten();
            let reused = pooled.is_some();
            reuses += 1;
            let conn = match pooled {
                Some(conn) => conn,
                // Boxed: dialling (TLS included) is a large future, and rare; inline, it would
                // grow every request's future, which is moved into place on each request.
                None => Box::pin(self.connect()).await?,
            };
            let mut unsent = match conn {
                Conn::H1(mut tx) => {
                    // HTTP/1.1 names only the path and query; `Host` carries the authority.
                    *req.uri_mut() = Uri::from(pq.clone());
                    match tx.try_send_request(req).await {
                        Ok(resp) => {
                            self.put(tx);
                            return Ok(resp);
                        }
                        Err(e) => e,
                    }
                }
                Conn::H2(mut tx) => {
                    // HTTP/2 carries the scheme and authority as pseudo-headers.
                    *req.uri_mut() = self.origin.at(pq.clone())?;
                    match tx.try_send_request(req).await {
                        Ok(resp) => return Ok(resp),
                        Err(e) => e,
                    }
                }
            };
            match unsent.take_message() {
                // A reused connection closed before the request went out: try another. A new
                // one failing at once is a real failure, as every later try would be.
                Some(again) if reused => {
                    debug!(error = %unsent.error(), "pooled upstream connection closed; sending again");
                    req = again;
                }
                _ => return Err(error_chain(&unsent.into_error())),
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned one still holds a valid list.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection ready for a request: the HTTP/2 one, or the most recently used idle
    /// HTTP/1.1 one. Closed and expired connections met on the way are dropped; those still
    /// finishing an answer's body stay for later.
    fn checkout(&self) -> Option<Conn> {
        let mut state = self.lock();
        if let Some(h2) = &state.h2 {
            if !h2.is_closed() {
                return Some(Conn::H2(h2.clone()));
            }
            state.h2 = None;
        }
        let now = Instant::now();
        let mut i = state.idle.len();
        while i > 0 {
            i -= 1;
            let idle = &state.idle[i];
            if !idle.fresh(now, self.idle_timeout) {
                state.idle.remove(i);
            } else if idle.tx.is_ready() {
                return Some(Conn::H1(state.idle.remove(i).tx));
            }
        }
        None
    }

    /// Returns an HTTP/1.1 connection whose answer's head has arrived. Its body may still be
    /// streaming; checkout skips it until the connection is ready again. Its idle time counts
    /// from here: one streaming past the timeout leaves the pool, and closes once its answer
    /// has been read.
    fn put(&self, tx: http1::SendRequest<ProxyBody>) {
        let mut state = self.lock();
        state.idle.push(Idle {
            tx,
            since: Instant::now(),
        });
        if state.reaper.as_ref().is_none_or(JoinHandle::is_finished) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let reap = reap(Arc::downgrade(&self.state), self.idle_timeout);
                state.reaper = Some(runtime.spawn(reap));
            }
        }
    }

    /// Dials the origin and sets up HTTP/2 or HTTP/1.1 on the connection, as TLS negotiated.
    async fn connect(&self) -> Result<Conn, String> {
        // `scheme://authority/`: what is dialled.
        let dial = self.origin.at(PathAndQuery::from_static("/"))?;
        let mut connector = self.connector.clone();
        let io = async {
            std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
            connector.call(dial).await
        }
        .await
        .map_err(|e| format!("connect: {}", error_chain(e.as_ref())))?;
        let handshake = |e: hyper::Error| format!("handshake: {}", error_chain(&e));
        if io.connected().is_negotiated_h2() {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(handshake)?;
            drive(conn, "HTTP/2");
            self.lock().h2 = Some(tx.clone());
            Ok(Conn::H2(tx))
        } else {
            let (mut tx, conn) = http1::Builder::new()
                .max_buf_size(READ_BUFFER)
                .handshake(io)
                .await
                .map_err(handshake)?;
            drive(conn, "HTTP/1.1");
            tx.ready().await.map_err(handshake)?;
            Ok(Conn::H1(tx))
        }
    }

    /// How many HTTP/1.1 connections the pool holds (idle or finishing a body).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().idle.len()
    }
}

/// Runs a connection on this thread until it closes; an error that ends it is logged.
fn drive(
    conn: impl std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
    version: &'static str,
) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, version, "upstream connection ended");
        }
    });
}

/// Once per `every`, closes the connections idle for `every` or more, until the pool is gone.
async fn reap(state: Weak<Mutex<State>>, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        state.idle.retain(|idle| idle.fresh(now, every));
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::{Method, StatusCode, Version};
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    use super::*;
    use crate::body;

    /// A self-signed certificate for 127.0.0.1, made for these tests only.
    const CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBszCCAVigAwIBAgIUE+S/fgy/A2H2S/4hfH+yJZ643QMwCgYIKoZIzj0EAwIw
HDEaMBgGA1UEAwwRa29tbW8tZmFub3V0IHRlc3QwIBcNMjYxMTMwMTgxNTQ2WhgP
MjEyNjExMDYxODE1NDZaMBwxGjAYBgNVBAMMEWtvbW1vLWZhbm91dCB0ZXN0MFkw
EwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEHucJaH5gf2RF4K1u6zdxUq08jbwiwIUh
ycNx9Kw13vhDkfsMrOZtr2NbJFwYuKR83fPYUdo2eP+MgbwqM6ibOKN2MHQwHQYD
VR0OBBYEFEjszm9/jP5ABLvMaItpeSXUZtU3MB8GA1UdIwQYMBaAFEjszm9/jP5A
BLvMaItpeSXUZtU3MA8GA1UdEQQIMAaHBH8AAAEwDAYDVR0TAQH/BAIwADATBgNV
HSUEDDAKBggrBgEFBQcDATAKBggqhkjOPQQDAgNJADBGAiEAjX4/Zx7E1BbRWHDB
Wgv1kASaw2jWOqYVDvqSzaqXCnYCIQD8ZopxDqtWcr5ekyw2cKyvemOEfN3lpF9+
SEY63fUTDA==
-----END CERTIFICATE-----";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgaserlS+Sqcw+NaX1
AFwTmHU1OXZVEk+hsLhBnTbcATOhRANCAAQe5wlofmB/ZEXgrW7rN3FSrTyNvCLA
hSHJw3H0rDXe+EOR+wys5m2vY1skXBi4pHzd89hR2jZ4/4yBvCozqJs4
-----END PRIVATE KEY-----";

    /// An origin on loopback. `/slow` streams its body once `release` fires; anything else
    /// answers `ok` at once. It counts the connections it accepted and those that ended.
    struct Origin {
        url: Uri,
        accepted: Arc<AtomicUsize>,
        ended: Arc<AtomicUsize>,
        release: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    }

    impl Origin {
        async fn start(keep_alive: bool, tls: Option<tokio_rustls::TlsAcceptor>) -> Origin {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let scheme = if tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://{}", listener.local_addr().unwrap());
            let origin = Origin {
                url: url.parse().unwrap(),
                accepted: Arc::default(),
                ended: Arc::default(),
                release: Arc::default(),
            };
            let (accepted, ended, release) = (
                origin.accepted.clone(),
                origin.ended.clone(),
                origin.release.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let (ended, release, tls) = (ended.clone(), release.clone(), tls.clone());
                    tokio::spawn(async move {
                        let answer = service_fn(move |req: Request<hyper::body::Incoming>| {
                            let release = release.clone();
                            async move {
                                let body = if req.uri().path() == "/slow" {
                                    let (tx, rx) = oneshot::channel();
                                    *release.lock().unwrap() = Some(tx);
                                    let last = futures::stream::once(async move {
                                        let _ = rx.await;
                                        Ok::<_, Infallible>(Frame::data(Bytes::from("slow")))
                                    });
                                    body::boxed(StreamBody::new(last))
                                } else {
                                    body::boxed(Full::new(Bytes::from("ok")))
                                };
                                Ok::<_, Infallible>(Response::new(body))
                            }
                        });
                        match tls {
                            Some(tls) => {
                                let io = TokioIo::new(tls.accept(tcp).await.unwrap());
                                let auto = hyper_util::server::conn::auto::Builder::new(
                                    TokioExecutor::new(),
                                );
                                let _ = auto.serve_connection(io, answer).await;
                            }
                            None => {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .keep_alive(keep_alive)
                                    .serve_connection(TokioIo::new(tcp), answer)
                                    .await;
                            }
                        }
                        ended.fetch_add(1, Ordering::SeqCst);
                    });
                }
            });
            origin
        }

        /// Sends `/slow` and returns its answer once the head is in; the body waits for
        /// [`Origin::finish_slow`].
        async fn start_slow(&self, pool: &Pool) -> Response<Incoming> {
            pool.send(request(self, Method::GET, "/slow"))
                .await
                .unwrap()
        }

        /// Lets the `/slow` body go; it must arrive whole.
        async fn finish_slow(&self, slow: Response<Incoming>) {
            let release = self.release.lock().unwrap().take().unwrap();
            release.send(()).unwrap();
            assert_eq!(read(slow).await.2, "slow");
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        fn ended(&self) -> usize {
            self.ended.load(Ordering::SeqCst)
        }
    }

    fn connector(roots: rustls::RootCertStore) -> Connector {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http)
    }

    fn pool(origin: &Origin, idle: Duration) -> Pool {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap())
            .unwrap();
        let url = super::Origin::parse(&origin.url.to_string()).unwrap();
        Pool::new(connector(roots), &url, idle)
    }

    fn request(origin: &Origin, method: Method, path: &str) -> Request<ProxyBody> {
        let body = if method == Method::POST {
            body::full("posted")
        } else {
            body::empty()
        };
        let mut req = Request::new(body);
        *req.method_mut() = method;
        let (scheme, host) = (origin.url.scheme_str(), origin.url.authority());
        *req.uri_mut() = format!("{}://{}{path}", scheme.unwrap(), host.unwrap())
            .parse()
            .unwrap();
        req
    }

    async fn read(resp: Response<Incoming>) -> (StatusCode, Version, Bytes) {
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.version, bytes)
    }

    /// A GET answered within 5 s (a request queued behind a streaming body would hang).
    async fn get(pool: &Pool, origin: &Origin, path: &str) -> (StatusCode, Version, Bytes) {
        let answer =
            async { read(pool.send(request(origin, Method::GET, path)).await.unwrap()).await };
        tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .expect("answered within 5 s")
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection() {
        let origin = Origin::start(true, None).await;
        let pool = pool(&origin, Duration::from_secs(30));
        for _ in 0..5 {
            let (status, version, body) = get(&pool, &origin, "/x").await;
            assert_eq!(
                (status, version, &body[..]),
                (StatusCode::OK, Version::HTTP_11, &b"ok"[..])
            );
        }
        assert_eq!(origin.accepted(), 1);
        assert_eq!(pool.held(), 1);
    }

    #[tokio::test]
    async fn a_connection_still_streaming_a_body_is_not_handed_out() {
        let origin = Origin::start(true, None).await;
        let pool = pool(&origin, Duration::from_secs(30));
        let slow = origin.start_slow(&pool).await;
        // The slow answer's head is in, its body is not: the next request needs a second
        // connection.
        answered_ok(&pool, &origin, 1).await;
        assert_eq!(origin.accepted(), 2);
        origin.finish_slow(slow).await;
        // Both are free again: no third.
        answered_ok(&pool, &origin, 3).await;
        assert_eq!(origin.accepted(), 2);
    }

    #[tokio::test]
    async fn a_body_streaming_past_the_idle_timeout_is_not_cut() {
        let origin = Origin::start(true, None).await;
        let pool = pool(&origin, Duration::from_millis(100));
        let slow = origin.start_slow(&pool).await;
        // Three reaper rounds pass while the body streams: the connection leaves the pool, but
        // the answer on it is read to the end.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(pool.held(), 0);
        origin.finish_slow(slow).await;
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closes_is_not_reused() {
        let origin = Origin::start(false, None).await;
        let pool = pool(&origin, Duration::from_secs(30));
        answered_ok(&pool, &origin, 3).await;
        assert_eq!(origin.accepted(), 3);
    }

    /// An origin on a thread of its own that answers one request per connection, keep-alive
    /// announced, then runs `close` with the connection's number and closes it: a server
    /// whose keep-alive timeout ran out.
    fn one_answer_origin(close: impl Fn(usize) + Send + 'static) -> Origin {
        raw_origin(ok_answer(b"ok"), close)
    }

    /// `200 OK` with `body`, as the bytes of the wire.
    fn ok_answer(body: &[u8]) -> Vec<u8> {
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        [head.as_bytes(), body].concat()
    }

    /// An origin on a thread of its own that writes `answer` (in one write) to one request per
    /// connection, then runs `close` with the connection's number and closes it.
    fn raw_origin(answer: Vec<u8>, close: impl Fn(usize) + Send + 'static) -> Origin {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            for tcp in listener.incoming() {
                let mut tcp = tcp.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let read = tcp.read(&mut buf).unwrap();
                    head.extend_from_slice(&buf[..read]);
                }
                // A client that gave up on the answer has closed: the test sees to that.
                let _ = tcp.write_all(&answer);
                close(n);
            }
        });
        Origin {
            url: url.parse().unwrap(),
            accepted,
            ended: Arc::default(),
            release: Arc::default(),
        }
    }

    #[tokio::test]
    async fn a_large_body_is_read_in_chunks_of_at_most_the_read_buffer() {
        const LEN: usize = 2 << 20;
        let body: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let origin = raw_origin(ok_answer(&body), |_| ());
        let pool = pool(&origin, Duration::from_secs(30));
        let answer = pool
            .send(request(&origin, Method::GET, "/big"))
            .await
            .unwrap();
        let mut body_in = answer.into_body();
        let (mut received, mut largest) = (Vec::with_capacity(LEN), 0);
        // Read slowly, so that the socket holds more than any buffer each time a read is made:
        // a read fills the whole buffer, and hyper grows the buffer after every full read.
        while let Some(frame) = body_in.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            largest = largest.max(data.len());
            received.extend_from_slice(&data);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(received == body, "the body arrives whole and in order");
        // Without the bound, hyper's reads here grow to about 400 KB.
        assert!(
            largest <= READ_BUFFER,
            "largest read {largest} bytes, buffer {READ_BUFFER}"
        );
    }

    #[tokio::test]
    async fn an_answer_head_larger_than_the_read_buffer_is_an_error() {
        let cookie = "x".repeat(4 * READ_BUFFER);
        let answer =
            format!("HTTP/1.1 200 OK\r\nset-cookie: {cookie}\r\ncontent-length: 2\r\n\r\nok");
        let origin = raw_origin(answer.into_bytes(), |_| ());
        let pool = pool(&origin, Duration::from_secs(30));
        match pool.send(request(&origin, Method::GET, "/x")).await {
            Ok(_) => panic!("a head of over {} bytes was accepted", 4 * READ_BUFFER),
            Err(e) => assert!(e.contains("too large"), "{e}"),
        }
    }

    /// `n` GETs, each answered `ok`.
    async fn answered_ok(pool: &Pool, origin: &Origin, n: usize) {
        for _ in 0..n {
            assert_eq!(get(pool, origin, "/x").await.2, "ok");
        }
    }

    #[tokio::test]
    async fn an_idle_connection_closed_by_the_upstream_costs_no_request() {
        let origin = one_answer_origin(|_| std::thread::sleep(Duration::from_millis(20)));
        let pool = pool(&origin, Duration::from_secs(30));
        answered_ok(&pool, &origin, 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Not a GET: sent once, on a connection that is open.
        let resp = pool.send(request(&origin, Method::POST, "/x")).await;
        assert_eq!(read(resp.expect("answered")).await.2, "ok");
        assert_eq!(origin.accepted(), 2);
    }

    #[tokio::test]
    async fn a_request_written_to_a_connection_closing_under_it_is_not_sent_again() {
        // The first connection closes on a signal sent while this test's runtime is blocked:
        // the pool cannot have seen the close when it hands the next request to it.
        let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
        let close_rx = Mutex::new(close_rx);
        let origin = one_answer_origin(move |n| {
            if n == 0 {
                let _ = close_rx.lock().unwrap().recv();
            }
        });
        let pool = pool(&origin, Duration::from_secs(30));
        answered_ok(&pool, &origin, 1).await;
        close_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        // hyper writes the POST, then reads the close: the POST may have reached the origin,
        // so it must not go out a second time. (GET, HEAD and OPTIONS are tried again a level
        // up, in `fetch`.)
        let failed = pool.send(request(&origin, Method::POST, "/x")).await;
        let error = failed.expect_err("the connection closed under the request");
        assert!(error.contains("closed"), "{error}");
        assert_eq!(origin.accepted(), 1, "not sent again on a new connection");
        // The dead connection is gone from the pool: the next request dials.
        answered_ok(&pool, &origin, 1).await;
        assert_eq!(origin.accepted(), 2);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let origin = Origin::start(true, None).await;
        let pool = pool(&origin, Duration::from_millis(100));
        answered_ok(&pool, &origin, 1).await;
        assert_eq!(origin.ended(), 0);
        // The reaper runs every 100 ms: the connection goes within 200 ms of going idle.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(origin.ended(), 1, "the idle connection was closed");
        assert_eq!(pool.held(), 0);
        answered_ok(&pool, &origin, 1).await;
        assert_eq!(origin.accepted(), 2);
    }

    /// A TLS acceptor for 127.0.0.1 offering `alpn`, in order of preference.
    fn tls(alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(CERT.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(KEY.as_bytes()).unwrap(),
        )
        .unwrap();
        tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsAcceptor::from(Arc::new(tls))
    }

    #[tokio::test]
    async fn https_with_http1_keeps_its_connection_for_the_next_request() {
        let origin = Origin::start(true, Some(tls(&[b"http/1.1"]))).await;
        let pool = pool(&origin, Duration::from_secs(30));
        for _ in 0..3 {
            let answer = get(&pool, &origin, "/x").await;
            assert_eq!(
                answer,
                (StatusCode::OK, Version::HTTP_11, Bytes::from("ok"))
            );
        }
        assert_eq!(origin.accepted(), 1, "one TLS handshake");
        assert_eq!(pool.held(), 1);
    }

    #[tokio::test]
    async fn http2_when_tls_negotiates_it_carries_every_request_on_one_connection() {
        let acceptor = tls(&[b"h2", b"http/1.1"]);
        let origin = Origin::start(true, Some(acceptor)).await;
        let pool = pool(&origin, Duration::from_secs(30));
        let first = get(&pool, &origin, "/x").await;
        assert_eq!(first, (StatusCode::OK, Version::HTTP_2, Bytes::from("ok")));
        let slow = origin.start_slow(&pool).await;
        let answers = futures::future::join_all((0..4).map(|_| get(&pool, &origin, "/x"))).await;
        assert!(answers.iter().all(|a| a.2 == "ok"));
        origin.finish_slow(slow).await;
        assert_eq!(origin.accepted(), 1, "one connection carried them all");
        assert_eq!(pool.held(), 0, "no HTTP/1.1 connection was made");
    }
}
