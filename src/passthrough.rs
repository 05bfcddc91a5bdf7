//! Everything that is not the leads list: relayed to the upstream as it came, bodies streamed.

use bytes::Bytes;
use futures::StreamExt;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use hyper::body::Incoming;

use std::sync::atomic::Ordering;

use crate::body::{self, CappedBody, ProxyBody};
use crate::cache::{Cache, Entry, FillError};
use crate::error::ProxyError;
use crate::gateway::{Gateway, RequestContext};
use crate::headers::{strip_hop_by_hop, REQUEST_ID};
use crate::leads;
use crate::links::ItemQuery;
use crate::metrics::UpstreamKind;

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
        let why =
            "CONNECT is not supported: this is a gateway to one Kommo account, not a forward proxy";
        return Err(ProxyError::MethodNotAllowed(why.into()));
    }
    let cached = is_cached(gw, req.method(), ctx.credential.is_some());
    if let Some(cache) = gw.cache.as_ref().filter(|_| cached) {
        let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        // Boxed: the cache's future is several times the size of the plain relay below,
        // and every pass-through request would carry (and copy) it unboxed.
        let ctx = ctx.with_upstream_headers(req.headers());
        return Box::pin(cached_get(gw, cache, &ctx, target)).await;
    }
    let max_body = gw.settings.bounds.max_body_bytes;
    let declared = req.headers().get(header::CONTENT_LENGTH);
    let declared = declared.and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body) {
        return Err(too_large(max_body));
    }
    let (mut parts, incoming) = req.into_parts();
    let is_head = parts.method == Method::HEAD;
    let (incoming, exceeded) = CappedBody::new(incoming, max_body);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    // After the removals: the id usually takes a freed place instead of growing the map.
    parts.headers.insert(REQUEST_ID, ctx.request_id.clone());
    // Only the path and query of the request are used, even of an absolute-form request
    // (`GET http://other.host/x`): `Upstream::send` puts them at the configured origin.
    let mut upstream_req = Request::new(body::boxed(incoming));
    *upstream_req.method_mut() = parts.method;
    *upstream_req.uri_mut() = parts.uri;
    *upstream_req.headers_mut() = parts.headers;

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
    let location = parts.headers.get(header::LOCATION);
    let location = location.and_then(|v| ctx.rewrite().location(v.to_str().ok()?));
    if let Some(location) = location.and_then(|v| HeaderValue::from_str(&v).ok()) {
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
            None => return Read::Whole(concat(chunks)),
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

/// The chunks as one, copied only when there are several.
fn concat(mut chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => chunks.concat().into(),
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
    let missing = || ProxyError::Internal("cached GET without a credential".into());
    let credential = ctx.credential.as_ref().ok_or_else(missing)?;
    let key = Cache::answer_key(credential, &ctx.variant, ctx.public_base(), target, "");
    let fill = async {
        let generation = cache.generation();
        let kind = UpstreamKind::Passthrough;
        let answer = leads::relay(gw, ctx, kind, target, ItemQuery::Kept)
            .await
            .map_err(FillError::Failed)?;
        Ok(Entry::new(generation, answer, None))
    };
    let (entry, outcome) = FillError::settle(cache.answer(key, ctx.no_cache, fill).await)?;
    Ok(leads::respond(&entry, Some(outcome)))
}
