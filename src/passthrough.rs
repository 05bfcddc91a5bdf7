//! Everything that is not the leads list: relayed to the upstream as it came, bodies streamed.

use bytes::Bytes;
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Incoming;

use std::sync::atomic::Ordering;

use crate::body::{self, CappedBody, ProxyBody};
use crate::cache::{Cache, Entry, FillError};
use crate::error::ProxyError;
use crate::gateway::{Gateway, RequestContext};
use crate::leads;
use crate::links::ItemQuery;
use crate::metrics::UpstreamKind;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1): never forwarded.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `headers` without hop-by-hop headers, including those the `Connection` header names.
pub fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    strip_hop_by_hop(&mut out);
    out
}

/// Removes hop-by-hop headers in place, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names: most messages carry no hop-by-hop header, or only `Connection:
    // keep-alive`; only what is there is removed, and nothing is allocated unless `Connection`
    // names a header.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("close") && !n.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    let fixed = HOP_BY_HOP.iter().zip(present).filter(|(_, here)| *here);
    for name in fixed.map(|(name, _)| name).chain(&named) {
        headers.remove(name);
    }
}

/// Where `name` is in [`HOP_BY_HOP`]: one string match, which compares lengths first, instead
/// of eight `HeaderName` comparisons for every header of every relayed message.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-authenticate" => Some(2),
        "proxy-authorization" => Some(3),
        "te" => Some(4),
        "trailer" => Some(5),
        "transfer-encoding" => Some(6),
        "upgrade" => Some(7),
        _ => None,
    }
}

/// Whether a pass-through request is answered through the cache (`--cache-passthrough`): GETs
/// with a credential (an `Authorization` header) only, as anonymous answers are never stored.
pub fn is_cached(gw: &Gateway, method: &Method, has_credential: bool) -> bool {
    *method == Method::GET
        && has_credential
        && gw.cache.as_ref().is_some_and(|c| c.config().passthrough)
}

/// Relays `req` to the upstream and its answer back, both bodies streamed.
pub async fn forward(
    gw: &Gateway,
    ctx: &RequestContext,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed(
            "CONNECT is not supported: this is a gateway to one Kommo account, not a forward proxy"
                .into(),
        ));
    }
    if let Some(cache) = gw
        .cache
        .as_ref()
        .filter(|_| is_cached(gw, req.method(), ctx.credential.is_some()))
    {
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        // Boxed: the cache's future is several times the size of the plain relay below,
        // and every pass-through request would carry (and copy) it unboxed.
        let ctx = ctx.with_upstream_headers(req.headers());
        return Box::pin(cached_get(gw, cache, &ctx, target)).await;
    }
    let max_body = gw.settings.bounds.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(too_large(max_body));
    }
    let (parts, incoming) = req.into_parts();
    let is_head = parts.method == Method::HEAD;
    let (incoming, exceeded) = CappedBody::new(incoming, max_body);
    // Only the path and query of the request are used, even of an absolute-form request
    // (`GET http://other.host/x`): `Upstream::send` puts them at the configured origin.
    let mut upstream_req = Request::new(body::boxed(incoming));
    *upstream_req.method_mut() = parts.method;
    *upstream_req.uri_mut() = parts.uri;
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    // After the removals: the id usually takes a freed place instead of growing the map.
    headers.insert(crate::server::REQUEST_ID, ctx.request_id.clone());
    *upstream_req.headers_mut() = headers;

    let _admitted = gw.fetcher.admit(&ctx.flow, 1)?;
    ctx.count_upstream_call();
    let resp = match gw.fetcher.send(&ctx.flow, upstream_req).await {
        Ok(resp) => resp,
        // A chunked body that grew past the bound while it streamed.
        Err(_) if exceeded.load(Ordering::Acquire) => return Err(too_large(max_body)),
        Err(e) => return Err(e.into()),
    };

    let (mut parts, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // A redirect to the account is a redirect to the proxy.
    if let Some(location) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| ctx.rewrite().location(v))
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        parts.headers.insert(header::LOCATION, location);
    }
    if is_head || !crate::links::is_json(&parts.headers) {
        return Ok(Response::from_parts(parts, body::boxed(incoming)));
    }
    let max = gw.fetcher.upstream.config().max_body;
    let body = match read_up_to(incoming, max).await {
        Read::Whole(bytes) => match ctx.rewrite().rewrite(&bytes, ItemQuery::Kept) {
            std::borrow::Cow::Borrowed(_) => body::full(bytes),
            std::borrow::Cow::Owned(edited) => {
                parts.headers.remove(header::CONTENT_LENGTH);
                body::full(edited)
            }
        },
        Read::Partial(body) => body,
    };
    Ok(Response::from_parts(parts, body))
}

/// A pass-through body read whole to move its links, or, past the bound or on an error, what
/// was read followed by the rest as it comes.
enum Read {
    Whole(Bytes),
    Partial(ProxyBody),
}

/// Reads `incoming` whole if it is at most `max` bytes.
async fn read_up_to(mut incoming: Incoming, max: usize) -> Read {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut len = 0;
    // Past the bound, at trailers or at an error: what was read, then the rest as it comes.
    let stop = loop {
        match incoming.frame().await {
            None => return Read::Whole(concat(chunks, len)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    len += data.len();
                    chunks.push(data);
                    if len > max {
                        break None;
                    }
                }
                Err(trailers) => break Some(Ok(trailers)),
            },
            Some(Err(e)) => break Some(Err(body::BoxError::from(e))),
        }
    };
    let read = chunks.into_iter().map(|c| Ok(Frame::data(c))).chain(stop);
    let rest = BodyStream::new(incoming).map(|f| f.map_err(body::BoxError::from));
    Read::Partial(body::boxed(StreamBody::new(
        futures::stream::iter(read).chain(rest),
    )))
}

fn concat(chunks: Vec<Bytes>, len: usize) -> Bytes {
    match <[Bytes; 1]>::try_from(chunks) {
        Ok([one]) => one,
        Err(chunks) => {
            let mut out = Vec::with_capacity(len);
            chunks.iter().for_each(|c| out.extend_from_slice(c));
            out.into()
        }
    }
}

fn too_large(max: u64) -> ProxyError {
    ProxyError::Rejected(
        http::StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is larger than {max} bytes (--max-body-bytes)"),
    )
}

/// A GET answered through the cache (`--cache-passthrough`): buffered, stored when `200`/`204`.
async fn cached_get(
    gw: &Gateway,
    cache: &Cache,
    ctx: &RequestContext,
    target: &str,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(credential) = &ctx.credential else {
        return Err(ProxyError::Internal(
            "cached GET without a credential".into(),
        ));
    };
    let key = Cache::answer_key(credential, &ctx.variant, ctx.public_base(), target, "");
    let fill = async {
        let generation = cache.generation();
        let kind = UpstreamKind::Passthrough;
        let (status, headers, body) = leads::relay(gw, ctx, kind, target, ItemQuery::Kept)
            .await
            .map_err(FillError::Failed)?;
        Ok(Entry::new(generation, status, headers, body, None))
    };
    let (entry, outcome) = FillError::settle(cache.answer(key, ctx.no_cache, fill).await)?;
    Ok(leads::respond(&entry, Some(outcome)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hop_by_hop_match_finds_each_listed_name_at_its_place_and_nothing_else() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        for name in [
            "host",
            "authorization",
            "x-request-id",
            "tee",
            "upgrades",
            "keepalive",
        ] {
            assert_eq!(
                hop_by_hop_index(&HeaderName::from_static(name)),
                None,
                "{name}"
            );
        }
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        for name in ["te", "trailer", "proxy-authorization", "proxy-authenticate"] {
            h.append(name, HeaderValue::from_static("x"));
            h.append(name, HeaderValue::from_static("y"));
        }
        let out = end_to_end(&h);
        assert_eq!(out.len(), 1);
        assert_eq!(out[header::AUTHORIZATION], "Bearer t");
    }

    #[test]
    fn connection_options_alone_remove_only_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, close"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-close", HeaderValue::from_static("kept"));
        let out = end_to_end(&h);
        assert_eq!(out.len(), 2);
        assert_eq!(out[header::CONTENT_TYPE], "application/json");
        assert_eq!(out["x-close"], "kept");

        let mut plain = HeaderMap::new();
        plain.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        assert_eq!(end_to_end(&plain), plain);
    }
}
