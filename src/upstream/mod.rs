//! The one way out to the Kommo account: an HTTP(S) client bound to the configured origin.
//!
//! Every upstream request, fan-out stream and pass-through alike, goes through [`Upstream`]
//! (by way of [`fetch::Fetcher`]), so the origin can never be chosen by a client and the
//! limits apply to all traffic.

pub mod admission;
mod classify;
pub mod fair;
pub mod fetch;
pub mod handover;
pub mod limiter;
mod retry;

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::ProxyBody;

/// The upstream account's origin, validated at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub scheme: Scheme,
    pub authority: Authority,
    /// `scheme://authority`, as the upstream writes it in its links.
    pub url: String,
}

impl Origin {
    /// Parses an origin such as `https://example.kommo.com` or `http://127.0.0.1:8081`.
    /// A path other than `/`, a query, or user info is refused: the proxy maps paths 1:1.
    pub fn parse(s: &str) -> Result<Origin, String> {
        let uri: Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| format!("{s:?} needs a scheme: http:// or https://"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(format!("{s:?}: the scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("{s:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{s:?}: credentials in the URL are not supported"));
        }
        if authority.host().is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        if uri.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
            return Err(format!(
                "{s:?}: give the account origin only (scheme, host and port), without a path or query"
            ));
        }
        let url = format!("{scheme}://{authority}");
        Ok(Origin {
            scheme,
            authority,
            url,
        })
    }

    /// `pq` at this origin, from the parts already parsed.
    pub fn at(&self, pq: PathAndQuery) -> Result<Uri, String> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|e| e.to_string())
    }
}

/// Where an upstream failure came from, worded for the client's `502` detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// Connecting or sending failed (refused, reset, TLS).
    Connect(String),
    /// No complete answer within the per-attempt timeout.
    Timeout(Duration),
    /// The answer's body was larger than the proxy buffers.
    TooLarge(usize),
    /// The body broke off or could not be read.
    Body(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "could not reach the upstream: {e}"),
            UpstreamError::Timeout(d) => write!(
                f,
                "the upstream did not answer within {}",
                humantime::format_duration(*d)
            ),
            UpstreamError::TooLarge(n) => {
                write!(f, "the upstream answer was larger than {n} bytes")
            }
            UpstreamError::Body(e) => write!(f, "the upstream answer broke off: {e}"),
        }
    }
}

impl std::error::Error for UpstreamError {}

pub use crate::body::Buffered;

/// Settings of the upstream client.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub origin: Origin,
    /// Per-attempt limit: for connecting, for a streamed answer's head, for a buffered
    /// answer's whole body.
    pub timeout: Duration,
    /// The largest upstream body the proxy buffers.
    pub max_body: usize,
}

/// TCP, then TLS for `https` origins, offering HTTP/2 and HTTP/1.1 by ALPN.
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The most an HTTP/1.1 connection reads from the origin at once. hyper's default lets the read
/// buffer grow far past this on a large body, and while a read's chunk lives, the next read
/// takes a new buffer of that size: memory spent for nothing at Kommo's rate. It also bounds an
/// answer's head.
const READ_BUFFER: usize = 32 * 1024;

/// The client for the configured upstream origin: connections are pooled and kept warm
/// across requests; when TLS negotiates HTTP/2, one connection carries every request.
#[derive(Clone)]
pub struct Upstream {
    config: UpstreamConfig,
    client: Client<Connector, ProxyBody>,
    /// The `Host` every upstream request carries: the origin's authority.
    host: HeaderValue,
}

impl Upstream {
    /// Builds the client; fails only if the TLS provider cannot be set up.
    pub fn new(config: UpstreamConfig) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.timeout));
        // rustls with ring and Mozilla's roots compiled in: no system certificate store or C
        // toolchain needed, the same trust on every machine.
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("TLS setup failed: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        // The idle timeout sits below the keep-alive timeouts servers commonly use, so a
        // pooled connection is not reused just as the upstream closes it. A request that a
        // reused connection closed under before it was written is sent again by the client.
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .http1_max_buf_size(READ_BUFFER)
            .build(connector);
        let host = HeaderValue::from_str(config.origin.authority.as_str())
            .map_err(|e| format!("the origin's host is not a header value: {e}"))?;
        Ok(Upstream {
            config,
            client,
            host,
        })
    }

    pub fn origin(&self) -> &Origin {
        &self.config.origin
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Sends a request to the configured origin only: of its URI only the path and query are
    /// kept (an absolute-form target's host is dropped), and `Host` is set here. The response
    /// body is streamed back to the caller. No timeout: the caller's.
    pub async fn send(
        &self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // The client needs the absolute form; it writes the origin form on HTTP/1.1.
        *req.uri_mut() = self.config.origin.at(pq).map_err(UpstreamError::Connect)?;
        req.headers_mut().insert(header::HOST, self.host.clone());
        self.client
            .request(req)
            .await
            .map_err(|e| UpstreamError::Connect(error_chain(&e)))
    }

    /// Sends `req` and reads its whole answer, up to the body limit. No timeout: the caller's.
    pub async fn read(&self, req: Request<ProxyBody>) -> Result<Buffered, UpstreamError> {
        let max = self.config.max_body;
        let (parts, incoming) = self.send(req).await?.into_parts();
        let body = Limited::new(incoming, max).collect().await.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                UpstreamError::TooLarge(max)
            } else {
                UpstreamError::Body(error_chain(e.as_ref()))
            }
        })?;
        Ok(Buffered {
            status: parts.status,
            headers: owned_headers(&parts.headers),
            body: owned_body(body.aggregate()),
        })
    }
}

/// `headers` with values of their own. hyper's parsed values are slices of the connection's
/// read buffer; kept in a cache, each would pin that buffer.
fn owned_headers(headers: &HeaderMap) -> HeaderMap {
    let mut owned = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        owned.append(name.clone(), copy);
    }
    owned
}

/// The body's chunks copied once into one allocation of its own. The chunks are slices of the
/// connection's read buffer (`Collected::to_bytes` hands back a lone chunk as it is), and a
/// cached slice would keep that whole buffer (up to hundreds of KiB) alive as long as it is
/// cached.
fn owned_body(mut chunks: impl bytes::Buf) -> Bytes {
    let mut body = Vec::with_capacity(chunks.remaining());
    while chunks.has_remaining() {
        let chunk = chunks.chunk();
        body.extend_from_slice(chunk);
        let n = chunk.len();
        chunks.advance(n);
    }
    Bytes::from(body)
}

/// An error and its sources on one line: hyper's outer errors ("client error (Connect)") say
/// little without their causes.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_body_joins_the_chunks_into_one() {
        use bytes::Buf;
        let chunks = Bytes::from_static(b"{\"a\"").chain(Bytes::from_static(b":1}"));
        assert_eq!(owned_body(chunks), Bytes::from_static(b"{\"a\":1}"));
        assert!(owned_body(Bytes::new()).is_empty());
    }

    #[test]
    fn origins() {
        let o = Origin::parse("https://example.kommo.com").unwrap();
        assert_eq!(o.url, "https://example.kommo.com");
        assert_eq!(
            Origin::parse("http://127.0.0.1:8081/").unwrap().url,
            "http://127.0.0.1:8081"
        );
        for bad in [
            "example.kommo.com",
            "ftp://example.com",
            "https://example.com/api",
            "https://example.com/?a=1",
            "https://user:pw@example.com",
            "",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
    }
}
