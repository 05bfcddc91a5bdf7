//! The multi-stage leads list: `GET /api/v4/leads` with any number of `filter[statuses]` pairs.
//!
//! The request flows `query` (parse, validate) → `plan` (relay, or one stream per stage) →
//! `fetch` (cache, limit, retry: the only part that does I/O) → `merge` (k-way, dedup) →
//! `render` (Kommo's HAL page). Every stage but the fetch is pure and tested on its own.

pub mod fetch;
pub mod merge;
pub mod page;
pub mod plan;
pub mod query;
pub mod render;

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::join_all;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::body::{self, ProxyBody};
use crate::cache::{Cache, Entry, FillError, Outcome};
use crate::error::{ProxyError, StreamFailure};
use crate::gateway::{Gateway, RequestContext};
use crate::headers::end_to_end;
use crate::links::ItemQuery;
use crate::metrics::UpstreamKind;
use crate::upstream::fetch::{FetchError, Verdict};
use crate::upstream::Buffered;
use merge::{LeadRef, Merger, Step};
use plan::{FanOutPlan, MergeProgress, Plan, StreamPlan, UpstreamBudget, STREAM_LIMIT};
use query::LeadsQuery;
use render::{render_page, PageLinks};

/// The content type of a successful leads page.
pub const HAL_JSON: &str = "application/hal+json";

/// Answers a leads list request, from the answer cache when it can.
///
/// With the cache, the query is parsed inside the fill, that is only when no answer is stored:
/// only a query that parsed has an answer stored, and the same bytes parse the same way, so a
/// hit skips the parse (most of what it would cost). An invalid query is a failed fill: never
/// stored, answered `400` like without the cache.
pub async fn answer(
    gw: &Arc<Gateway>,
    ctx: &RequestContext,
    raw_query: &str,
    client_headers: &HeaderMap,
) -> Result<Response<ProxyBody>, ProxyError> {
    let parse = || {
        query::parse(
            raw_query,
            query::QueryLimits {
                max_pairs: gw.settings.max_pairs,
            },
        )
        .map_err(ProxyError::InvalidQuery)
    };
    // Live views first: a fresh replica always wins over an older cached answer.
    let mut start_live = None;
    if let (Some(live), Some(credential)) = (&gw.live, &ctx.credential) {
        let query = parse().ok().filter(|q| q.pairs.len() > 1);
        // `If-Modified-Since` filters what Kommo lists: such a view is the fan-out's.
        let query = query.filter(|_| !client_headers.contains_key(header::IF_MODIFIED_SINCE));
        if let Some(query) = query.filter(|q| live.can_answer(q)) {
            let key = crate::sync::live::key(credential, &ctx.variant);
            if let Some((leads, has_next, age)) = live.page(&key, &query) {
                tracing::Span::current().record("cache", "SYNC");
                let answer = page_answer(ctx, &query, raw_query, &leads, has_next);
                let mut resp = respond(&Entry::new(0, answer, None), None);
                let headers = resp.headers_mut();
                headers.insert(header::AGE, HeaderValue::from(age));
                headers.insert(
                    HeaderName::from_static("x-cache"),
                    HeaderValue::from_static("SYNC"),
                );
                return Ok(resp);
            }
            start_live = Some(key);
        }
    }
    let resp = answer_fanned_out(gw, ctx, raw_query, client_headers, parse).await;
    // A view Kommo answered starts the credential's replica (a refused credential never does).
    if let (Some(key), Some(live), Ok(r)) = (start_live, &gw.live, &resp) {
        if matches!(r.status(), StatusCode::OK | StatusCode::NO_CONTENT) {
            let mut headers = ctx.with_upstream_headers(client_headers).upstream_headers;
            headers.remove(crate::headers::REQUEST_ID);
            live.start(gw, key, headers, ctx.flow.key.clone());
        }
    }
    resp
}

/// [`answer`] by the fan-out (or a relay), through the answer cache when there is one.
async fn answer_fanned_out(
    gw: &Arc<Gateway>,
    ctx: &RequestContext,
    raw_query: &str,
    client_headers: &HeaderMap,
    parse: impl Fn() -> Result<LeadsQuery, ProxyError>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (Some(cache), Some(credential)) = (&gw.cache, &ctx.credential) else {
        let query = parse()?;
        let ctx = &ctx.with_upstream_headers(client_headers);
        return compute(gw, ctx, &query, raw_query)
            .await
            .map(|e| respond(&e, None));
    };
    let (base, variant) = (ctx.public_base(), &ctx.variant);
    let key = Cache::answer_key(credential, variant, base, plan::LEADS_PATH, raw_query);
    let fill = Box::pin(async {
        let query = parse().map_err(FillError::Failed)?;
        let ctx = &ctx.with_upstream_headers(client_headers);
        compute(gw, ctx, &query, raw_query)
            .await
            .map_err(FillError::Failed)
    });
    let (entry, outcome) = FillError::settle(cache.answer(key.clone(), ctx.no_cache, fill).await)?;
    tracing::Span::current().record("cache", outcome.as_str());
    if outcome == Outcome::Hit && cache.claim_refresh(&entry) {
        refresh_in_background(
            gw,
            &ctx.with_upstream_headers(client_headers),
            key,
            raw_query,
        );
    }
    Ok(respond(&entry, Some(outcome)))
}

/// A stored answer is stale within --stale-while-revalidate: it is served, and this one
/// refresh replaces it.
fn refresh_in_background(
    gw: &Arc<Gateway>,
    ctx: &RequestContext,
    key: crate::cache::CacheKey,
    raw_query: &str,
) {
    let (gw, ctx) = (gw.clone(), gw.refresh_context(ctx));
    let raw = raw_query.to_string();
    tokio::spawn(async move {
        // The stored answer's query parsed when it was filled.
        let Ok(query) = query::parse(
            &raw,
            query::QueryLimits {
                max_pairs: gw.settings.max_pairs,
            },
        ) else {
            return;
        };
        if let (Ok(fresh), Some(cache)) = (compute(&gw, &ctx, &query, &raw).await, &gw.cache) {
            cache.store_answer(key, fresh).await;
        }
    });
}

/// The client's response for a computed or stored answer.
pub fn respond(entry: &Entry, outcome: Option<Outcome>) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(entry.answer.body.clone()));
    *resp.status_mut() = entry.answer.status;
    *resp.headers_mut() = entry.answer.headers.clone();
    let headers = resp.headers_mut();
    if let Some(outcome) = outcome {
        headers.insert(header::AGE, HeaderValue::from(entry.age()));
        headers.insert(
            HeaderName::from_static("x-cache"),
            HeaderValue::from_static(outcome.as_str()),
        );
    }
    resp
}

/// Computes the answer: relayed or merged.
async fn compute(
    gw: &Gateway,
    ctx: &RequestContext,
    query: &LeadsQuery,
    raw_query: &str,
) -> Result<Arc<Entry>, ProxyError> {
    let generation = gw.cache.as_ref().map_or(0, Cache::generation);
    let answer = match plan::plan(query, raw_query) {
        Plan::Relay { target } => {
            let links = ItemQuery::Items(raw_query);
            relay(gw, ctx, UpstreamKind::Single, &target, links).await?
        }
        Plan::FanOut(fan_out) => merged_page(gw, ctx, query, raw_query, &fan_out).await?,
    };
    Ok(Entry::new(generation, answer, None))
}

/// One upstream request; its answer is relayed with hrefs moved to the proxy (JSON bodies
/// only, and only their `href`s: see [`crate::links`]).
pub(crate) async fn relay(
    gw: &Gateway,
    ctx: &RequestContext,
    kind: UpstreamKind,
    target: &str,
    item_links: ItemQuery<'_>,
) -> Result<Buffered, ProxyError> {
    let _admitted = gw.fetcher.admit(&ctx.flow, 1)?;
    let entry = match fetch::fetch_entry(gw, ctx, kind, target, |_| Verdict::Done(None)).await {
        Ok((entry, _)) => entry,
        // Kommo's own 5xx, still failing after the retries: the client sees it as it came.
        Err(FetchError::Status(b)) => {
            let headers = end_to_end(&b.headers);
            Entry::new(0, Buffered { headers, ..b }, None)
        }
        Err(e) => return Err(e.into()),
    };
    let stored = &entry.answer;
    let body = if crate::links::is_json(&stored.headers) {
        match ctx.rewrite().rewrite(&stored.body, item_links) {
            Cow::Borrowed(_) => stored.body.clone(),
            Cow::Owned(body) => body.into(),
        }
    } else {
        stored.body.clone()
    };
    let mut headers = stored.headers.clone();
    headers.remove(header::CONTENT_LENGTH);
    Ok(Buffered {
        status: stored.status,
        headers,
        body,
    })
}

/// What one upstream page read of one stream came to.
enum StreamRead {
    Page {
        leads: Vec<LeadRef>,
        last: bool,
    },
    /// An answer that is the client's to see as it came (401, 402, 403, other 4xx).
    Relay(Buffered),
    Failed(StreamFailure),
    /// Not the stream's fault: the budget or a block stops the whole request.
    Stopped(ProxyError),
}

async fn read_stream_page(
    gw: &Gateway,
    ctx: &RequestContext,
    stream: &StreamPlan,
    page: u32,
    order: query::OrderField,
) -> StreamRead {
    let failed = |status: Option<u16>, reason: String| {
        StreamRead::Failed(StreamFailure {
            pair: stream.pair,
            status,
            reason,
        })
    };
    let read = |upstream: &Buffered| match upstream.status {
        // Parsed once, when read: cache hits reuse the leads.
        StatusCode::OK => match page::parse_page(&upstream.body, order) {
            Ok(leads) => Verdict::Done(Some(leads)),
            // Truncated or malformed: worth another attempt, like a 5xx.
            Err(reason) => Verdict::Unusable(reason),
        },
        _ => Verdict::Done(None),
    };
    let entry =
        match fetch::fetch_entry(gw, ctx, UpstreamKind::Stream, &stream.target(page), read).await {
            Ok((entry, _)) => entry,
            Err(FetchError::Status(b)) => {
                return failed(
                    Some(b.status.as_u16()),
                    format!("page {page} answered {}{}", b.status, error_detail(&b.body)),
                )
            }
            Err(e @ (FetchError::Transport(_) | FetchError::Unusable { .. })) => {
                return failed(e.status(), format!("page {page}: {e}"))
            }
            Err(e) => return StreamRead::Stopped(e.into()),
        };
    match (entry.answer.status, &entry.leads) {
        (StatusCode::OK, Some(leads)) => StreamRead::Page {
            last: leads.len() < STREAM_LIMIT as usize,
            leads: leads.clone(),
        },
        // 304: nothing of this stage changed since the client's `If-Modified-Since`, which on a
        // list is a filter: the stream is empty.
        (StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED, _) => StreamRead::Page {
            leads: Vec::new(),
            last: true,
        },
        (s, _) if s.is_client_error() => StreamRead::Relay(entry.answer.clone()),
        (s, _) => failed(Some(s.as_u16()), format!("page {page} answered {s}")),
    }
}

/// Kommo's `detail`, when the body is a problem document.
fn error_detail(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string))
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

/// Fans out, merges, and cuts the client's page out of the merged stream.
///
/// Each batch of stream reads is first checked against `--max-upstream-per-request` (see
/// [`UpstreamBudget`]): a batch that could take the request past it is not sent, and the
/// request ends with a `400` saying what the page would take.
async fn merged_page(
    gw: &Gateway,
    ctx: &RequestContext,
    query: &LeadsQuery,
    raw_query: &str,
    fan_out: &FanOutPlan,
) -> Result<Buffered, ProxyError> {
    gw.fetcher
        .metrics
        .fanout_width
        .observe(fan_out.streams.len() as f64);
    tracing::Span::current().record("fanout", fan_out.streams.len());
    let mut merger = Merger::new(fan_out.streams.len(), fan_out.order);
    let skip = query.offset();
    let want = query.limit as usize;
    let mut skipped = 0u64;
    let mut leads = Vec::with_capacity(want);
    // The page and the one lead past it that says whether another page exists; a later page
    // also emits the leads it skips, and the set grows for those.
    merger.reserve(want + 1);
    let mut has_next = false;
    let budget = UpstreamBudget {
        limit: gw.settings.max_upstream_per_request,
    };
    // Upstream pages fed to the merge, from the cache or not: what the cost estimate of a
    // refused page extrapolates from.
    let mut pages_read = 0u64;
    // The first pages of every stream, booked before the first batch (after the budget check,
    // so a page over `--max-upstream-per-request` is still a `400`); held to the end.
    let mut admitted = None;
    loop {
        match merger.next_step() {
            Step::Lead(lead) if skipped < skip => {
                skipped += 1;
                drop(lead);
            }
            Step::Lead(lead) if leads.len() < want => leads.push(lead),
            Step::Lead(_) => {
                has_next = true;
                break;
            }
            Step::Done => break,
            Step::Need(streams) => {
                let progress = MergeProgress {
                    spent: ctx.upstream_calls(),
                    batch: streams.len(),
                    pages_read,
                    passed: skipped + leads.len() as u64,
                    target: skip + want as u64,
                };
                budget
                    .check(progress)
                    .map_err(|over| ProxyError::OverBudget {
                        page: query.page,
                        cache: gw.cache.is_some() && ctx.credential.is_some(),
                        over,
                    })?;
                if admitted.is_none() {
                    let cost = u32::try_from(fan_out.streams.len()).unwrap_or(u32::MAX);
                    admitted = Some(gw.fetcher.admit(&ctx.flow, cost)?);
                }
                pages_read += streams.len() as u64;
                // Every stream that could hold the next lead is read at once: at the start
                // that is all of them, so the first page costs one round trip, not K.
                let reads = join_all(streams.iter().map(|&i| {
                    let page = merger.pages_fed(i) + 1;
                    read_stream_page(gw, ctx, &fan_out.streams[i], page, fan_out.order.field)
                }))
                .await;
                let mut failures = Vec::new();
                let mut relay = None;
                let mut stopped = None;
                for (&i, read) in streams.iter().zip(reads) {
                    match read {
                        StreamRead::Page { leads, last } => merger.feed(i, leads, last),
                        StreamRead::Relay(b) => {
                            relay.get_or_insert(b);
                        }
                        StreamRead::Failed(f) => failures.push(f),
                        StreamRead::Stopped(e) => {
                            stopped.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = stopped {
                    return Err(e);
                }
                if let Some(b) = relay {
                    return Ok(relay_error(b));
                }
                if !failures.is_empty() {
                    return Err(ProxyError::StreamsFailed(failures));
                }
            }
        }
    }
    Ok(page_answer(ctx, query, raw_query, &leads, has_next))
}

/// The client's page of merged `leads` (a `204` when there are none), as Kommo renders it.
fn page_answer(
    ctx: &RequestContext,
    query: &LeadsQuery,
    raw_query: &str,
    leads: &[LeadRef],
    has_next: bool,
) -> Buffered {
    if leads.is_empty() {
        return Buffered {
            status: StatusCode::NO_CONTENT,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
    }
    let base = format!("{}{}", ctx.public_base(), plan::LEADS_PATH);
    let links = PageLinks {
        base: &base,
        params: &query.link_params,
    };
    let bytes = render_page(query.page, links, has_next, leads, ctx.rewrite(), raw_query);
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(HAL_JSON));
    Buffered {
        status: StatusCode::OK,
        headers,
        body: bytes.into(),
    }
}

/// An upstream client error, relayed with its status, type and body as it came.
fn relay_error(upstream: Buffered) -> Buffered {
    let mut headers = HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::WWW_AUTHENTICATE,
        header::RETRY_AFTER,
    ] {
        if let Some(v) = upstream.headers.get(&name) {
            headers.insert(name, v.clone());
        }
    }
    Buffered {
        headers,
        ..upstream
    }
}
