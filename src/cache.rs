//! Response caching and request coalescing, isolated by credential.
//!
//! Two levels, each a moka cache bounded by bytes with a TTL:
//! - **upstream pages**, keyed by (credential, canonical upstream request, `Accept-Language`):
//!   every fan-out stream page and every relayed single-stage answer. Equivalent client requests
//!   (parameters or pairs reordered, another list spelling, explicit defaults) map to the same
//!   upstream requests, and walking `page=1..N` of a view reuses the pages already read;
//! - **answers**, keyed by (credential, the proxy's public base, the client's exact query): the
//!   ready bytes of a client answer, so a repeated poll costs a hash and a lookup.
//!
//! Concurrent identical misses run one fill (`try_get_with`) and the others wait for it. Only
//! `200` and `204` are stored; requests without credentials never touch the cache. A Kommo
//! webhook bumps the generation: entries filled before it are never served again, even a fill
//! that was in flight when it arrived.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderMap, StatusCode};
use moka::future::Cache as Moka;
use moka::notification::RemovalCause;
use tokio::time::Instant;

use crate::body::Buffered;
use crate::leads::merge::LeadRef;
use crate::leads::query::{key_path, split_params};
use crate::metrics::Metrics;

/// A cache shared by several proxy replicas (Redis), behind the in-process levels: a miss in
/// moka looks here before it goes upstream, and fills are written here too. Failures are not
/// errors: an unreachable store reads as a miss and drops writes, so requests are still served
/// from the local level.
pub trait SharedCache: Send + Sync + 'static {
    /// The bytes stored under `key`, if any and not expired.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Option<Bytes>>;
    /// Stores `value` under `key` for `ttl`.
    fn put<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> BoxFuture<'a, ()>;
    /// Drops every entry of every replica (a Kommo webhook), e.g. by bumping a shared
    /// generation that is part of every key.
    fn invalidate_all(&self) -> BoxFuture<'_, ()>;
}

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// How long an entry is fresh (`--cache-ttl`); zero disables caching.
    pub ttl: Duration,
    /// The bytes both levels may hold together (`--cache-max-bytes`).
    pub max_bytes: u64,
    /// Past the TTL but within this, an answer is served and refreshed once in the background.
    pub stale_while_revalidate: Duration,
    /// Cache GETs of other paths too (`--cache-passthrough`).
    pub passthrough: bool,
}

/// A stored answer: what the client (or the merge) needs of it, and when it was stored.
#[derive(Debug)]
pub struct Entry {
    /// The answer, with the headers it is served with.
    pub answer: Buffered,
    /// For fan-out stream pages: the leads, already parsed, so a hit is not parsed again.
    pub leads: Option<Vec<LeadRef>>,
    pub stored_at: Instant,
    /// The invalidation generation the fill started in.
    generation: u64,
    /// Set once a background refresh of this stale entry has started.
    refreshing: AtomicBool,
}

impl Entry {
    /// An entry filled now, by a fill that started in `generation`.
    pub fn new(generation: u64, answer: Buffered, leads: Option<Vec<LeadRef>>) -> Arc<Entry> {
        Arc::new(Entry {
            answer,
            leads,
            stored_at: Instant::now(),
            generation,
            refreshing: AtomicBool::new(false),
        })
    }

    /// Only `200` and `204` answers are stored.
    pub fn cacheable(&self) -> bool {
        matches!(self.answer.status, StatusCode::OK | StatusCode::NO_CONTENT)
    }

    /// Whole seconds since it was stored, for the `Age` header.
    pub fn age(&self) -> u64 {
        self.stored_at.elapsed().as_secs()
    }

    fn weight(&self, key: &CacheKey) -> u32 {
        // The body dominates; parsed leads share its bytes and add their own small records.
        let leads = self.leads.as_ref().map_or(0, Vec::len) * std::mem::size_of::<LeadRef>();
        let headers = self.answer.headers.iter();
        let headers: usize = headers.map(|(k, v)| k.as_str().len() + v.len() + 32).sum();
        let total = self.answer.body.len() + leads + headers + key.0.len() + 128;
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

/// Where a lookup found the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
        }
    }
}

/// A cache key: the credential fingerprint and the canonical request, joined.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(Arc<str>);

impl CacheKey {
    /// The key as a string, e.g. for a shared store.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Encodes a stored answer for a [`SharedCache`]: a tag, the status, the headers, the body.
pub fn encode(answer: &Buffered) -> Bytes {
    let (status, headers, body) = (answer.status, &answer.headers, &answer.body);
    let mut out = Vec::with_capacity(body.len() + 256);
    out.extend_from_slice(b"KF1");
    out.extend_from_slice(&status.as_u16().to_be_bytes());
    let count = u16::try_from(headers.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for (name, value) in headers.iter().take(usize::from(count)) {
        let (n, v) = (name.as_str().as_bytes(), value.as_bytes());
        out.extend_from_slice(&u16::try_from(n.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&n[..n.len().min(usize::from(u16::MAX))]);
        out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(v);
    }
    out.extend_from_slice(body);
    out.into()
}

/// Decodes what [`encode`] wrote; `None` for anything else (an entry of another version, or
/// corrupted), which the caller treats as a miss.
pub fn decode(bytes: &Bytes) -> Option<Buffered> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let slice = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(slice)
    };
    if take(3)? != b"KF1" {
        return None;
    }
    let status = StatusCode::from_u16(u16::from_be_bytes(take(2)?.try_into().ok()?)).ok()?;
    let count = u16::from_be_bytes(take(2)?.try_into().ok()?);
    let mut headers = HeaderMap::new();
    for _ in 0..count {
        let n = usize::from(u16::from_be_bytes(take(2)?.try_into().ok()?));
        let name = http::HeaderName::from_bytes(take(n)?).ok()?;
        let v = u32::from_be_bytes(take(4)?.try_into().ok()?) as usize;
        let value = http::HeaderValue::from_bytes(take(v)?).ok()?;
        headers.append(name, value);
    }
    Some(Buffered {
        status,
        headers,
        body: bytes.slice(at..),
    })
}

/// What a lookup found and where, or why its fill produced nothing to store.
pub type Found<E> = Result<(Arc<Entry>, Outcome), FillError<E>>;

/// What a fill made, or why it produced nothing to store.
pub type Filled<E> = Result<Arc<Entry>, FillError<E>>;

/// Why a fill produced nothing to store.
#[derive(Debug, Clone)]
pub enum FillError<E> {
    /// The fill failed; nothing is stored, the next request tries again.
    Failed(E),
    /// The answer is not storable (a `4xx`, a `5xx` relayed as it came): returned, not stored.
    Uncacheable(Arc<Entry>),
}

impl<E> FillError<E> {
    /// The answer of a lookup whose fill produced nothing to store: an uncacheable answer is
    /// still the answer (a miss); a failure is the caller's error.
    pub fn settle(found: Found<E>) -> Result<(Arc<Entry>, Outcome), E> {
        match found {
            Ok(found) => Ok(found),
            Err(FillError::Uncacheable(entry)) => Ok((entry, Outcome::Miss)),
            Err(FillError::Failed(e)) => Err(e),
        }
    }
}

/// Both cache levels.
pub struct Cache {
    config: CacheConfig,
    pages: Moka<CacheKey, Arc<Entry>>,
    answers: Moka<CacheKey, Arc<Entry>>,
    /// Bumped by each invalidation.
    generation: AtomicU64,
    /// The gateway's metrics, attached once it is built (shared with the eviction listeners).
    metrics: Arc<OnceLock<Arc<Metrics>>>,
}

impl Cache {
    /// The caches of `config`, or `None` when its TTL is zero (caching off).
    pub fn new(config: CacheConfig) -> Option<Cache> {
        if config.ttl.is_zero() {
            return None;
        }
        // Pages hold the raw material, answers only rendered pages: pages get three quarters.
        let pages_bytes = config.max_bytes / 4 * 3;
        let answers_bytes = config.max_bytes - pages_bytes;
        let metrics: Arc<OnceLock<Arc<Metrics>>> = Arc::default();
        let build = |bytes: u64, ttl: Duration| {
            let metrics = metrics.clone();
            Moka::builder()
                .max_capacity(bytes)
                .weigher(|k: &CacheKey, v: &Arc<Entry>| v.weight(k))
                .time_to_live(ttl)
                .eviction_listener(move |_, _, cause| {
                    if let Some(m) = metrics.get().filter(|_| cause == RemovalCause::Size) {
                        m.cache_evictions.inc();
                    }
                })
                .build()
        };
        let pages = build(pages_bytes, config.ttl);
        let answers = build(answers_bytes, config.ttl + config.stale_while_revalidate);
        Some(Cache {
            config,
            pages,
            answers,
            generation: AtomicU64::new(0),
            metrics,
        })
    }

    /// Counts lookups and evictions into `metrics` from now on.
    pub fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    fn count(&self, level: &'static str, outcome: &'static str) {
        if let Some(m) = self.metrics.get() {
            m.cache(level, outcome);
        }
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The current invalidation generation: a fill records it when it starts.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Drops every entry of this process (the account changed: a Kommo webhook here, or one
    /// another replica received).
    pub fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.pages.invalidate_all();
        self.answers.invalidate_all();
    }

    /// The bytes held now, both levels (after pending evictions have run).
    pub async fn weighted_bytes(&self) -> u64 {
        self.pages.run_pending_tasks().await;
        self.answers.run_pending_tasks().await;
        self.pages.weighted_size() + self.answers.weighted_size()
    }

    /// The key of an upstream request; `variant`: the client's headers that change an answer
    /// (see `RequestContext::variant`).
    pub fn page_key(credential: &str, target: &str, variant: &str) -> CacheKey {
        let target = canonical_target(target);
        CacheKey(format!("p\u{1f}{credential}\u{1f}{target}\u{1f}{variant}").into())
    }

    /// The key of a client answer.
    pub fn answer_key(
        credential: &str,
        variant: &str,
        public_base: &str,
        path: &str,
        query: &str,
    ) -> CacheKey {
        let key =
            format!("a\u{1f}{credential}\u{1f}{variant}\u{1f}{public_base}\u{1f}{path}?{query}");
        CacheKey(key.into())
    }

    /// A fresh upstream page, or the result of one coalesced `fill`. With `refresh`, the
    /// stored entry is ignored and replaced.
    pub async fn page<E: Clone + Send + Sync + 'static>(
        &self,
        key: CacheKey,
        refresh: bool,
        fill: impl Future<Output = Filled<E>>,
    ) -> Found<E> {
        self.lookup("page", &self.pages, key, refresh, self.config.ttl, fill)
            .await
    }

    /// A client answer, fresh or (within stale-while-revalidate) stale, or the result of one
    /// coalesced `fill`. The caller refreshes a stale answer when [`Cache::claim_refresh`] says so.
    pub async fn answer<E: Clone + Send + Sync + 'static>(
        &self,
        key: CacheKey,
        refresh: bool,
        fill: impl Future<Output = Filled<E>>,
    ) -> Found<E> {
        let usable = self.config.ttl + self.config.stale_while_revalidate;
        self.lookup("answer", &self.answers, key, refresh, usable, fill)
            .await
    }

    /// Stores a refreshed answer.
    pub async fn store_answer(&self, key: CacheKey, entry: Arc<Entry>) {
        if entry.cacheable() && entry.generation == self.generation() {
            self.answers.insert(key, entry).await;
        }
    }

    /// Whether `entry` is past its TTL and no refresh of it has started yet; claims the refresh.
    pub fn claim_refresh(&self, entry: &Entry) -> bool {
        entry.stored_at.elapsed() >= self.config.ttl
            && !entry.refreshing.swap(true, Ordering::AcqRel)
    }

    async fn lookup<E: Clone + Send + Sync + 'static>(
        &self,
        name: &'static str,
        level: &Moka<CacheKey, Arc<Entry>>,
        key: CacheKey,
        refresh: bool,
        usable_for: Duration,
        fill: impl Future<Output = Filled<E>>,
    ) -> Found<E> {
        if refresh {
            self.count(name, "miss");
            let entry = fill.await?;
            if entry.cacheable() && entry.generation == self.generation() {
                level.insert(key, entry.clone()).await;
            }
            return Ok((entry, Outcome::Miss));
        }
        if let Some(entry) = level.get(&key).await {
            if entry.generation == self.generation() && entry.stored_at.elapsed() < usable_for {
                self.count(name, "hit");
                return Ok((entry, Outcome::Hit));
            }
            level.invalidate(&key).await;
        }
        let generation = self.generation();
        let leader = AtomicBool::new(false);
        // Boxed: moka's coalescing future is several KiB, and unboxed it would be part of
        // every lookup's future (and copied with it), hits included.
        let result = Box::pin(level.try_get_with(key, async {
            leader.store(true, Ordering::Relaxed);
            let entry = fill.await?;
            if entry.generation != generation || !entry.cacheable() {
                return Err(FillError::Uncacheable(entry));
            }
            Ok(entry)
        }))
        .await;
        let led = leader.load(Ordering::Relaxed);
        self.count(name, if led { "miss" } else { "coalesced" });
        match result {
            // A waiter's answer was filled by the request it waited for: a hit for it.
            Ok(entry) => Ok((entry, if led { Outcome::Miss } else { Outcome::Hit })),
            Err(e) => Err(FillError::clone(&e)),
        }
    }
}

/// Integer-list filters whose values form an unordered set, whatever their spelling.
const SET_FILTERS: &[&str] = &[
    "id",
    "name",
    "pipeline_id",
    "created_by",
    "updated_by",
    "responsible_user_id",
];

/// The canonical form of an upstream request target: parameters decoded, list spellings
/// (`[]`, `[N]`, repeated) folded into one, sorted, and re-encoded. Two targets Kommo answers
/// alike map to the same string.
pub fn canonical_target(target: &str) -> String {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    // (key, value, whether the key is an unordered set, position): values of a set filter are
    // sorted and deduplicated; any other repeated parameter keeps its order, since the
    // upstream (PHP) lets the last one win and `query=a&query=b` is not `query=b&query=a`.
    let mut params: Vec<(String, String, bool, usize)> = split_params(query)
        .into_iter()
        .enumerate()
        .map(|(i, p)| match key_path(&p.key) {
            Some(("filter", segs))
                if (segs.len() == 1 || segs.len() == 2) && SET_FILTERS.contains(&segs[0]) =>
            {
                (format!("filter[{}][]", segs[0]), p.value, true, i)
            }
            _ => (p.key, p.value, false, i),
        })
        .collect();
    params.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| if a.2 { a.1.cmp(&b.1) } else { a.3.cmp(&b.3) })
    });
    params.dedup_by(|a, b| a.2 && a.0 == b.0 && a.1 == b.1);
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v, _, _) in &params {
        out.append_pair(k, v);
    }
    format!("{path}?{}", out.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_entries_round_trip_and_garbage_is_a_miss() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/hal+json".parse().unwrap());
        headers.append("x-a", "1".parse().unwrap());
        headers.append("x-a", "2".parse().unwrap());
        let body = Bytes::from_static(b"{\"_embedded\":{}}");
        let bytes = encode(&Buffered {
            status: StatusCode::OK,
            headers: headers.clone(),
            body: body.clone(),
        });
        let b = decode(&bytes).unwrap();
        assert_eq!(
            (b.status, b.headers, b.body),
            (StatusCode::OK, headers, body)
        );
        for garbage in [
            &b""[..],
            b"KF1",
            b"KF2\x00\xc8\x00\x00",
            b"KF1\x00\xc8\x00\x05\x00",
        ] {
            assert!(decode(&Bytes::copy_from_slice(garbage)).is_none());
        }
        assert_eq!(
            decode(&Bytes::from_static(b"KF1\x00\xcc\x00\x00"))
                .unwrap()
                .status,
            StatusCode::NO_CONTENT
        );
    }

    #[test]
    fn repeated_scalars_keep_their_order_in_the_key() {
        // The upstream keeps the last of a repeated scalar: `query=a&query=b` is not
        // `query=b&query=a`, and must not share a cache entry with it.
        assert_ne!(
            canonical_target("/api/v4/leads?query=a&query=b"),
            canonical_target("/api/v4/leads?query=b&query=a")
        );
        assert_eq!(
            canonical_target("/api/v4/leads?query=a&limit=5&query=b"),
            canonical_target("/api/v4/leads?limit=5&query=a&query=b")
        );
    }

    #[test]
    fn canonical_targets_fold_spellings_and_order() {
        let a =
            canonical_target("/api/v4/leads?filter[id][]=2&filter[id][]=1&limit=250&with=contacts");
        for b in [
            "/api/v4/leads?with=contacts&limit=250&filter[id]=1&filter[id]=2",
            "/api/v4/leads?filter%5Bid%5D%5B0%5D=1&filter%5Bid%5D%5B1%5D=2&with=contacts&limit=250",
            "/api/v4/leads?limit=250&filter[id][]=1&filter[id][]=2&filter[id][]=1&with=contacts",
        ] {
            assert_eq!(canonical_target(b), a, "{b}");
        }
        assert_ne!(
            canonical_target("/api/v4/leads?filter[id][]=1"),
            canonical_target("/api/v4/leads?filter[id][]=2")
        );
        assert_ne!(
            canonical_target("/api/v4/leads?page=1"),
            canonical_target("/api/v4/leads?page=2")
        );
    }

    fn cache(ttl_ms: u64, swr_ms: u64, max_bytes: u64) -> Cache {
        Cache::new(CacheConfig {
            ttl: Duration::from_millis(ttl_ms),
            max_bytes,
            stale_while_revalidate: Duration::from_millis(swr_ms),
            passthrough: false,
        })
        .expect("ttl > 0")
    }

    fn entry(c: &Cache, status: u16, body: &str) -> Arc<Entry> {
        let answer = Buffered {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        };
        Entry::new(c.generation(), answer, None)
    }

    #[tokio::test]
    async fn concurrent_misses_fill_once_and_errors_are_not_stored() {
        let c = Arc::new(cache(60_000, 0, 1 << 20));
        let fills = Arc::new(AtomicU64::new(0));
        let key = Cache::page_key("fp", "/x?a=1", "");
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (c, fills, key) = (c.clone(), fills.clone(), key.clone());
                tokio::spawn(async move {
                    c.page::<String>(key, false, async {
                        fills.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(entry(&c, 200, "body"))
                    })
                    .await
                    .map(|(e, _)| e.answer.body.clone())
                    .map_err(|_| ())
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), Bytes::from("body"));
        }
        assert_eq!(fills.load(Ordering::SeqCst), 1);

        let other = Cache::page_key("fp", "/y", "");
        let failed = c
            .page::<String>(other.clone(), false, async {
                Err(FillError::Failed("boom".to_string()))
            })
            .await;
        assert!(matches!(failed, Err(FillError::Failed(_))));
        let uncacheable = c
            .page::<String>(other.clone(), false, async { Ok(entry(&c, 401, "no")) })
            .await;
        assert!(matches!(uncacheable, Err(FillError::Uncacheable(e)) if e.answer.status == 401));
        let (e, outcome) = c
            .page::<String>(other, false, async { Ok(entry(&c, 204, "")) })
            .await
            .map_err(|_| ())
            .unwrap();
        assert_eq!((e.answer.status.as_u16(), outcome), (204, Outcome::Miss));
    }

    #[tokio::test]
    async fn invalidation_discards_fills_started_before_it() {
        let c = cache(60_000, 0, 1 << 20);
        let key = Cache::page_key("fp", "/x", "");
        let stale = entry(&c, 200, "old");
        c.invalidate_all();
        // A fill that began in the old generation completes after the webhook: not stored.
        let r = c
            .page::<String>(key.clone(), false, async { Ok(stale) })
            .await;
        assert!(matches!(r, Err(FillError::Uncacheable(_))));
        let (e, outcome) = c
            .page::<String>(key, false, async { Ok(entry(&c, 200, "new")) })
            .await
            .map_err(|_| ())
            .unwrap();
        assert_eq!(
            (e.answer.body.clone(), outcome),
            (Bytes::from("new"), Outcome::Miss)
        );
    }

    #[tokio::test]
    async fn the_byte_bound_holds() {
        let c = cache(60_000, 0, 200_000);
        for i in 0..500 {
            let key = Cache::page_key("fp", &format!("/x?i={i}"), "");
            let body = "x".repeat(2_000);
            let _ = c
                .page::<String>(key, false, async { Ok(entry(&c, 200, &body)) })
                .await;
        }
        assert!(c.weighted_bytes().await <= 200_000);
    }
}
