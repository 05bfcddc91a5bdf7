//! The fetch stage: one upstream GET through the page cache (this replica's, then the one
//! replicas share), limited and retried by the upstream edge.

use std::sync::Arc;

use http::header;

use crate::cache::{decode, encode, Cache, Entry, FillError, Outcome, SharedCache};
use crate::gateway::{Gateway, RequestContext};
use crate::headers::end_to_end;
use crate::leads::merge::LeadRef;
use crate::metrics::UpstreamKind;
use crate::upstream::fetch::{FetchError, Verdict};
use crate::upstream::Buffered;

/// An upstream GET through the page cache: `read` decides whether a `200` is usable (and
/// may parse its leads once, for every later hit). Answers other than `200`/`204` are
/// returned, never stored.
pub async fn fetch_entry(
    gw: &Gateway,
    ctx: &RequestContext,
    kind: UpstreamKind,
    target: &str,
    read: impl Fn(&Buffered) -> Verdict<Option<Vec<LeadRef>>> + Sync,
) -> Result<(Arc<Entry>, Option<Outcome>), FetchError> {
    let generation = gw.cache.as_ref().map_or(0, Cache::generation);
    let key = match (&gw.cache, &ctx.credential) {
        (Some(_), Some(credential)) => Some(Cache::page_key(credential, target, &ctx.variant)),
        _ => None,
    };
    let shared = gw.shared.as_ref().zip(key.as_ref());
    // Boxed: the fetch is nested inside the cache's fill future, and unboxed the whole
    // chain would be laid out on the stack of whichever task polls it.
    let fetch = Box::pin(async {
        // The second level: a page another replica already fetched.
        if let Some((shared, key)) = shared.filter(|_| !ctx.no_cache) {
            let stored = shared.cache.get(key.as_str()).await;
            if let Some(b) = stored.as_ref().and_then(decode) {
                if let Verdict::Done(leads) = read(&b) {
                    gw.metrics.cache("shared", "hit");
                    return Ok(Entry::new(generation, b, leads));
                }
            }
            gw.metrics.cache("shared", "miss");
        }
        ctx.count_upstream_call();
        let entry = gw
            .fetcher
            .get(
                kind,
                &ctx.flow,
                target,
                &ctx.upstream_headers,
                |b| match read(&b) {
                    Verdict::Done(leads) => {
                        let mut headers = end_to_end(&b.headers);
                        headers.remove(header::CONTENT_LENGTH);
                        let answer = Buffered { headers, ..b };
                        Verdict::Done(Entry::new(generation, answer, leads))
                    }
                    Verdict::Unusable(reason) => Verdict::Unusable(reason),
                },
            )
            .await?;
        if let (Some((shared, key)), Some(cache)) = (shared, &gw.cache) {
            if entry.cacheable() {
                // Written in the background: a slow Redis must not slow the answer.
                let (store, key) = (shared.cache.clone(), key.as_str().to_string());
                let (value, ttl) = (encode(&entry.answer), cache.config().ttl);
                tokio::spawn(async move { store.put(&key, value, ttl).await });
            }
        }
        Ok(entry)
    });
    let (Some(cache), Some(key)) = (&gw.cache, key.clone()) else {
        return fetch.await.map(|e| (e, None));
    };
    match cache
        .page(key, ctx.no_cache, async {
            fetch.await.map_err(FillError::Failed)
        })
        .await
    {
        Ok((entry, outcome)) => Ok((entry, Some(outcome))),
        Err(FillError::Uncacheable(entry)) => Ok((entry, Some(Outcome::Miss))),
        Err(FillError::Failed(e)) => Err(e),
    }
}
