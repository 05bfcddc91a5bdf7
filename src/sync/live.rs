//! Live views: one replica of the leads per credential, loaded once and kept fresh from Kommo's
//! change feed by a background task, answering multi-stage views from memory.
//!
//! A replica starts after the first multi-stage request of a credential that Kommo answered:
//! a keyset load by `(updated_at, id)`, then a delta every `--sync-interval` (the leads changed
//! since the last one, with an overlap, and the deletions and restores of the events feed), and
//! a full comparison every `--sync-reconcile`. Every upstream request of the sync goes through
//! the limiter as [`BACKGROUND`] work: it gives way while client requests wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap};
use http::StatusCode;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::feed::{events_target, parse_events, Keyset, EVENTS_LIMIT};
use super::replica::{self, Lead, Replica};
use super::view::{self, Held};
use crate::gateway::Gateway;
use crate::leads::merge::LeadRef;
use crate::leads::query::{LeadsQuery, MAX_LIMIT};
use crate::metrics::{Metrics, OutcomeLabels, StateLabels, UpstreamKind};
use crate::upstream::fair::BACKGROUND;
use crate::upstream::fetch::{FetchError, Flow, Verdict};

/// The flags of live views (part of `serve`'s).
#[derive(Debug, Clone, clap::Args)]
pub struct SyncArgs {
    /// Live views: keep a replica of each credential's leads fresh from Kommo's change feed and
    /// answer multi-stage views from it.
    #[arg(long, env = "KOMMO_FANOUT_SYNC")]
    pub sync: bool,
    /// Time between a replica's deltas.
    #[arg(long, env = "KOMMO_FANOUT_SYNC_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub sync_interval: Duration,
    /// A replica whose last delta is older than this answers nothing (the fan-out does);
    /// default: three intervals.
    #[arg(long, env = "KOMMO_FANOUT_SYNC_MAX_STALENESS", value_parser = humantime::parse_duration)]
    pub sync_max_staleness: Option<Duration>,
    /// `with` values the replicas fetch (comma-separated: contacts, loss_reason, ...); requests
    /// asking for any subset of them are answered from the replica.
    #[arg(long, env = "KOMMO_FANOUT_SYNC_WITH", value_delimiter = ',')]
    pub sync_with: Vec<String>,
    /// The bytes all replicas together may hold; past it the least recently used is dropped.
    #[arg(long, env = "KOMMO_FANOUT_SYNC_MAX_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub sync_max_bytes: u64,
    /// A replica no request asked for this long stops syncing and is dropped.
    #[arg(long, env = "KOMMO_FANOUT_SYNC_IDLE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub sync_idle: Duration,
    /// Time between full comparisons of a replica with Kommo (repairs what the feed missed).
    #[arg(long, env = "KOMMO_FANOUT_SYNC_RECONCILE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub sync_reconcile: Duration,
}

impl SyncArgs {
    /// The settings, when `--sync` is on; the error names the flag.
    pub fn validate(&self) -> Result<Option<SyncSettings>, String> {
        if !self.sync {
            return Ok(None);
        }
        let interval = self.sync_interval;
        if interval < Duration::from_secs(1) {
            return Err("--sync-interval must be at least 1s".into());
        }
        let max_staleness = self.sync_max_staleness.unwrap_or(interval * 3);
        if max_staleness < interval {
            return Err(format!(
                "--sync-max-staleness ({}) must be at least --sync-interval ({})",
                humantime::format_duration(max_staleness),
                humantime::format_duration(interval)
            ));
        }
        let with: Vec<String> = (self.sync_with.iter())
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty())
            .collect();
        view::held(&with).map_err(|e| format!("--sync-with: {e}"))?;
        Ok(Some(SyncSettings {
            interval,
            max_staleness,
            with,
            max_bytes: self.sync_max_bytes,
            idle: self.sync_idle.max(interval),
            reconcile: self.sync_reconcile.max(interval),
        }))
    }
}

/// The `--sync*` settings, validated.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// Time between deltas (`--sync-interval`).
    pub interval: Duration,
    /// A replica whose last delta is older than this answers nothing (`--sync-max-staleness`).
    pub max_staleness: Duration,
    /// The `with` values every replica fetches (`--sync-with`).
    pub with: Vec<String>,
    /// All replicas together hold at most this many bytes (`--sync-max-bytes`).
    pub max_bytes: u64,
    /// A replica no request asked for this long is dropped (`--sync-idle`).
    pub idle: Duration,
    /// Time between full comparisons with Kommo (`--sync-reconcile`).
    pub reconcile: Duration,
}

/// Seconds each delta reads back past the last one: `updated_at` has whole seconds, and a
/// change may be committed a little after the second it is stamped with.
const OVERLAP: i64 = 5;
/// How long a webhook's delta waits for the rest of a burst of deliveries.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// The longest one sync request may wait for the limiter and the upstream.
const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// Every replica and the settings they share.
pub struct Live {
    settings: SyncSettings,
    held: Held,
    /// `with` as the sync asks for it.
    with: String,
    replicas: Mutex<HashMap<Arc<str>, Arc<Slot>>>,
    /// Credentials that may not start a replica again before the instant: dropped as
    /// unauthorized, or for memory (a replica that does not fit must not reload in a loop).
    cooldown: Mutex<HashMap<Arc<str>, Instant>>,
    metrics: Arc<Metrics>,
}

/// One credential's replica and its sync task's state.
struct Slot {
    key: Arc<str>,
    /// A short public name for `/sync` and the logs (a prefix of the keyed fingerprint).
    name: String,
    /// The headers the sync sends upstream: the first request's credential and variant.
    headers: HeaderMap,
    /// The limiter key of the credential's requests.
    limit_key: Arc<str>,
    replica: RwLock<Replica>,
    status: Mutex<Status>,
    /// Bytes of the replica, or of the one being loaded: what the memory bound counts.
    bytes: AtomicUsize,
    /// A webhook asked for a delta now.
    wake: Notify,
    /// Upstream requests the sync made for this replica.
    spent: AtomicU64,
}

impl Slot {
    fn replica(&self) -> std::sync::RwLockReadGuard<'_, Replica> {
        self.replica.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn replica_mut(&self) -> std::sync::RwLockWriteGuard<'_, Replica> {
        self.replica.write().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Status {
    /// Whether the load completed (the replica answers only then).
    loaded: bool,
    /// When the last delta (or the load) succeeded.
    fresh_at: Option<Instant>,
    /// When a request last asked for this replica.
    used_at: Instant,
    /// The account's clock at the start of the last successful delta: the next reads from it.
    watermark: i64,
    /// Why the last delta failed, until one succeeds.
    error: Option<String>,
    task: Option<tokio::task::AbortHandle>,
}

/// Why a sync read stopped.
#[derive(Debug)]
enum SyncError {
    /// `401`, or a `403` that is no block: the credential may no longer read; drop at once.
    Refused(StatusCode),
    /// The replica no longer fits `--sync-max-bytes`.
    TooBig,
    /// Anything else: tried again at the next interval.
    Failed(String),
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncError::Refused(s) => write!(f, "Kommo answered {s}"),
            SyncError::TooBig => write!(f, "the replicas need more than --sync-max-bytes"),
            SyncError::Failed(e) => f.write_str(e),
        }
    }
}

/// The key of a credential's replica: its fingerprint and the headers that change Kommo's
/// answer.
pub fn key(credential: &str, variant: &str) -> Arc<str> {
    Arc::from(format!("{credential}\u{1e}{variant}"))
}

/// Unix seconds on this machine's clock.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Live {
    pub fn new(settings: SyncSettings, metrics: Arc<Metrics>) -> Result<Live, String> {
        let held = view::held(&settings.with)?;
        Ok(Live {
            with: settings.with.join(","),
            held,
            settings,
            replicas: Mutex::default(),
            cooldown: Mutex::default(),
            metrics,
        })
    }

    /// Whether a replica could evaluate `query` exactly (its filters, order and `with`).
    pub fn can_answer(&self, query: &LeadsQuery) -> bool {
        view::view(query, &self.held).is_ok()
    }

    /// The page of `query` from the replica of `key`, when that replica is loaded, fresh and
    /// can evaluate the query exactly: its leads, whether more follow, and the seconds since
    /// the last delta. `None`: the fan-out answers.
    pub fn page(&self, key: &str, query: &LeadsQuery) -> Option<(Vec<LeadRef>, bool, u64)> {
        let slot = lock(&self.replicas).get(key).cloned()?;
        let fresh_at = {
            let mut status = lock(&slot.status);
            status.used_at = Instant::now();
            status.fresh_at.filter(|_| status.loaded)?
        };
        let age = fresh_at.elapsed();
        if age > self.settings.max_staleness {
            return None;
        }
        let view = match view::view(query, &self.held) {
            Ok(view) => view,
            Err(why) => {
                debug!(
                    replica = slot.name,
                    ?why,
                    "the replica cannot answer this view"
                );
                return None;
            }
        };
        let (leads, has_next) = slot
            .replica()
            .page(&view, query.offset(), query.limit as usize);
        self.metrics.sync_answers.inc();
        Some((leads, has_next, age.as_secs()))
    }

    /// Starts the replica of `key` unless it exists or is cooling down. `headers` are the ones
    /// the sync sends upstream (the credential's); `limit_key` its limiter key.
    pub fn start(&self, gw: &Arc<Gateway>, key: Arc<str>, headers: HeaderMap, limit_key: Arc<str>) {
        let mut replicas = lock(&self.replicas);
        if let Some(slot) = replicas.get(&key) {
            lock(&slot.status).used_at = Instant::now();
            return;
        }
        {
            let mut cooldown = lock(&self.cooldown);
            let now = Instant::now();
            cooldown.retain(|_, until| *until > now);
            if cooldown.contains_key(&key) {
                return;
            }
        }
        let name: String = key.chars().take(12).collect();
        let slot = Arc::new(Slot {
            key: key.clone(),
            name,
            headers,
            limit_key,
            replica: RwLock::new(Replica::new()),
            status: Mutex::new(Status {
                loaded: false,
                fresh_at: None,
                used_at: Instant::now(),
                watermark: 0,
                error: None,
                task: None,
            }),
            bytes: AtomicUsize::new(0),
            wake: Notify::new(),
            spent: AtomicU64::new(0),
        });
        info!(replica = slot.name, "live view: loading a replica");
        let task = tokio::spawn(run(Arc::downgrade(gw), slot.clone()));
        lock(&slot.status).task = Some(task.abort_handle());
        replicas.insert(key, slot);
    }

    /// Asks every replica for a delta now (a webhook reported a change).
    pub fn wake_all(&self) {
        for slot in lock(&self.replicas).values() {
            slot.wake.notify_one();
        }
    }

    /// Drops the replica of `key` and stops its task; `cooldown` keeps it from starting again
    /// for that long.
    fn drop_replica(&self, slot: &Slot, reason: &'static str, cooldown: Option<Duration>) {
        let removed = {
            let mut replicas = lock(&self.replicas);
            match replicas.get(&slot.key) {
                Some(s) if std::ptr::eq(Arc::as_ptr(s), slot) => replicas.remove(&slot.key),
                _ => None,
            }
        };
        if let Some(until) = cooldown.map(|c| Instant::now() + c) {
            lock(&self.cooldown).insert(slot.key.clone(), until);
        }
        if let Some(removed) = removed {
            self.metrics
                .sync_dropped
                .get_or_create(&OutcomeLabels { outcome: reason })
                .inc();
            if let Some(task) = lock(&removed.status).task.take() {
                task.abort();
            }
        }
    }

    /// Drops the least recently used replicas until all fit `--sync-max-bytes`; `false` when
    /// `slot` itself was dropped.
    fn enforce_bound(&self, slot: &Slot) -> bool {
        loop {
            let victim = {
                let replicas = lock(&self.replicas);
                let total: usize = replicas
                    .values()
                    .map(|s| s.bytes.load(Ordering::Relaxed))
                    .sum();
                if total as u64 <= self.settings.max_bytes {
                    return replicas.contains_key(&slot.key);
                }
                replicas
                    .values()
                    .min_by_key(|s| lock(&s.status).used_at)
                    .cloned()
            };
            let Some(victim) = victim else { return false };
            warn!(
                replica = victim.name,
                max_bytes = self.settings.max_bytes,
                "live view: replicas over --sync-max-bytes, dropping the least recently used"
            );
            self.drop_replica(&victim, "memory", Some(self.settings.idle));
            if std::ptr::eq(Arc::as_ptr(&victim), slot) {
                return false;
            }
        }
    }

    /// The admin `GET /sync` report: every replica's state and figures.
    pub fn report(&self) -> serde_json::Value {
        let replicas: Vec<_> = lock(&self.replicas)
            .values()
            .map(|slot| {
                let replica = slot.replica();
                let status = lock(&slot.status);
                serde_json::json!({
                    "replica": slot.name,
                    "state": self.state(&status),
                    "leads": replica.len(),
                    "bytes": slot.bytes.load(Ordering::Relaxed),
                    "watermark": status.watermark,
                    "seconds_since_delta": status.fresh_at.map(|t| t.elapsed().as_secs()),
                    "upstream_requests": slot.spent.load(Ordering::Relaxed),
                    "last_error": status.error,
                })
            })
            .collect();
        serde_json::json!({
            "interval_s": self.settings.interval.as_secs_f64(),
            "max_staleness_s": self.settings.max_staleness.as_secs_f64(),
            "max_bytes": self.settings.max_bytes,
            "with": self.settings.with,
            "replicas": replicas,
        })
    }

    fn state(&self, status: &Status) -> &'static str {
        match status.fresh_at {
            _ if !status.loaded => "loading",
            Some(t) if t.elapsed() <= self.settings.max_staleness => "live",
            _ => "stale",
        }
    }

    /// Sets the sync gauges; called at scrape time.
    pub fn observe(&self) {
        let (mut leads, mut bytes) = (0, 0);
        let mut states: HashMap<&'static str, i64> =
            [("loading", 0), ("live", 0), ("stale", 0)].into();
        for slot in lock(&self.replicas).values() {
            leads += slot.replica().len();
            bytes += slot.bytes.load(Ordering::Relaxed);
            *states.entry(self.state(&lock(&slot.status))).or_default() += 1;
        }
        for (state, n) in states {
            self.metrics
                .sync_replicas
                .get_or_create(&StateLabels { state })
                .set(n);
        }
        self.metrics.sync_leads.set(leads as i64);
        self.metrics.sync_bytes.set(bytes as u64);
    }
}

/// The account's clock, estimated from the `Date` of its answers (this machine's without one).
#[derive(Default)]
struct Clock {
    offset: i64,
}

impl Clock {
    fn now(&self) -> i64 {
        unix_now() + self.offset
    }

    fn observe(&mut self, date: Option<i64>) {
        if let Some(date) = date {
            self.offset = date - unix_now();
        }
    }
}

/// What a sync task keeps between its rounds.
struct Task {
    gw: Weak<Gateway>,
    slot: Arc<Slot>,
    clock: Clock,
    /// Events already applied, by id, with their time: the overlap reads them again.
    seen: HashMap<String, i64>,
    /// The account's clock when the events were last read completely.
    events_from: i64,
    /// When the next reconcile is due.
    reconcile_at: Instant,
}

/// A replica's life: load, then deltas (and reconciles) until it is dropped or the gateway ends.
async fn run(gw: Weak<Gateway>, slot: Arc<Slot>) {
    let mut task = Task {
        gw,
        slot,
        clock: Clock::default(),
        seen: HashMap::new(),
        events_from: 0,
        reconcile_at: Instant::now(),
    };
    let Some(interval) = task.live(|l| l.settings.interval) else {
        return;
    };
    // The load, tried again every interval until it succeeds or the credential is refused.
    loop {
        match task.load().await {
            Ok(()) => break,
            Err(e) => {
                if !task.failed(e) {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        }
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = task.slot.wake.notified() => tokio::time::sleep(DEBOUNCE).await,
        }
        let Some((idle, reconcile)) = task.live(|l| (l.settings.idle, l.settings.reconcile)) else {
            return;
        };
        if lock(&task.slot.status).used_at.elapsed() > idle {
            info!(
                replica = task.slot.name,
                "live view: idle, dropping the replica"
            );
            task.live(|l| l.drop_replica(&task.slot, "idle", None));
            return;
        }
        let round = if Instant::now() >= task.reconcile_at {
            task.reconcile_at = Instant::now() + reconcile;
            task.reconcile().await
        } else {
            task.delta().await
        };
        if let Err(e) = round {
            if !task.failed(e) {
                return;
            }
        }
    }
}

impl Task {
    /// Runs `f` on the live views while the gateway lives.
    fn live<T>(&self, f: impl FnOnce(&Live) -> T) -> Option<T> {
        let gw = self.gw.upgrade()?;
        gw.live.as_ref().map(f)
    }

    /// Records a failure; `false` when the replica is dropped for it.
    fn failed(&self, e: SyncError) -> bool {
        let slot = &self.slot;
        self.live(|l| {
            l.metrics
                .sync_deltas
                .get_or_create(&OutcomeLabels { outcome: "failed" })
                .inc();
        });
        match e {
            SyncError::Refused(status) => {
                warn!(
                    replica = slot.name,
                    %status,
                    "live view: Kommo refused the credential, dropping its replica"
                );
                let cooldown = self.live(|l| l.settings.max_staleness);
                self.live(|l| l.drop_replica(slot, "unauthorized", cooldown));
                false
            }
            SyncError::TooBig => {
                // `enforce_bound` dropped it (or another replica: then try again later).
                self.live(|l| lock(&l.replicas).contains_key(&slot.key)) == Some(true)
            }
            SyncError::Failed(reason) => {
                warn!(replica = slot.name, %reason, "live view: sync read failed");
                lock(&slot.status).error = Some(reason);
                true
            }
        }
    }

    /// One GET of the sync: limited as background work. `Ok(None)` for a `204`.
    async fn get<T: Send>(
        &mut self,
        target: &str,
        parse: impl Fn(&[u8]) -> Result<T, String> + Sync,
    ) -> Result<Option<T>, SyncError> {
        let Some(gw) = self.gw.upgrade() else {
            return Err(SyncError::Failed("the proxy is stopping".into()));
        };
        let flow = Flow {
            id: BACKGROUND,
            key: self.slot.limit_key.clone(),
            deadline: Instant::now() + REQUEST_DEADLINE,
        };
        self.slot.spent.fetch_add(1, Ordering::Relaxed);
        let got = gw
            .fetcher
            .get(UpstreamKind::Sync, &flow, target, &self.slot.headers, |b| {
                let date = b
                    .headers
                    .get(header::DATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| httpdate::parse_http_date(v).ok())
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs() as i64);
                let read = match b.status {
                    StatusCode::OK => match parse(&b.body) {
                        Ok(t) => Ok(Some(t)),
                        // Truncated or malformed: another attempt, like a 5xx.
                        Err(reason) => return Verdict::Unusable(reason),
                    },
                    StatusCode::NO_CONTENT => Ok(None),
                    s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                        Err(SyncError::Refused(s))
                    }
                    s => Err(SyncError::Failed(format!("{target} answered {s}"))),
                };
                Verdict::Done((read, date))
            })
            .await;
        match got {
            Ok((read, date)) => {
                self.clock.observe(date);
                read
            }
            Err(FetchError::Status(b)) => {
                Err(SyncError::Failed(format!("{target} answered {}", b.status)))
            }
            Err(e) => Err(SyncError::Failed(format!("{target}: {e}"))),
        }
    }

    /// Reads every lead of `keyset`'s range into `into`, page by page, keeping the slot's byte
    /// count current for the memory bound. With `bound`, a read without an upper bound gets
    /// the account's clock after its first page as one (the first answer's `Date` tells it).
    /// Returns the upper bound read to, or the clock at the end.
    async fn read_all(
        &mut self,
        mut keyset: Keyset,
        into: &mut Replica,
        bound: bool,
    ) -> Result<i64, SyncError> {
        let with = self.live(|l| l.with.clone()).unwrap_or_default();
        loop {
            let leads = self
                .get(&keyset.target(&with), replica::parse_page)
                .await?
                .unwrap_or_default();
            if bound && keyset.to.is_none() {
                keyset.to = Some(self.clock.now());
            }
            let (n, last) = (leads.len(), leads.last().map(|l| l.updated_at));
            for lead in leads {
                into.upsert(lead);
            }
            let held = self.slot.replica().bytes();
            self.slot
                .bytes
                .store(held + into.bytes(), Ordering::Relaxed);
            if self.live(|l| l.enforce_bound(&self.slot)) != Some(true) {
                return Err(SyncError::TooBig);
            }
            if !keyset.advance(n, last) {
                return Ok(keyset.to.unwrap_or_else(|| self.clock.now()));
            }
        }
    }

    /// The full load: every lead the credential sees, up to the account's clock when the load
    /// began (learnt from the first answer).
    async fn load(&mut self) -> Result<(), SyncError> {
        let started = Instant::now();
        let mut replica = Replica::new();
        let to = self
            .read_all(Keyset::new(0, None), &mut replica, true)
            .await?;
        let (leads, bytes) = (replica.len(), replica.bytes());
        *self.slot.replica_mut() = replica;
        self.slot.bytes.store(bytes, Ordering::Relaxed);
        self.events_from = to;
        {
            let mut status = lock(&self.slot.status);
            status.loaded = true;
            status.fresh_at = Some(Instant::now());
            status.watermark = to;
            status.error = None;
        }
        info!(
            replica = self.slot.name,
            leads,
            bytes,
            requests = self.slot.spent.load(Ordering::Relaxed),
            seconds = started.elapsed().as_secs_f64(),
            "live view: replica loaded"
        );
        self.reconcile_at =
            Instant::now() + self.live(|l| l.settings.reconcile).unwrap_or_default();
        Ok(())
    }

    /// One delta: the leads changed since the watermark (less the overlap), then the deletions
    /// and restores of the events feed, applied in the order they happened.
    async fn delta(&mut self) -> Result<(), SyncError> {
        let started = self.clock.now();
        let spent = self.slot.spent.load(Ordering::Relaxed);
        let watermark = lock(&self.slot.status).watermark;
        let mut changed = Replica::new();
        self.read_all(Keyset::new(watermark - OVERLAP, None), &mut changed, false)
            .await?;
        let events = self.events().await?;
        // Leads restored but not read above (a restore that kept its `updated_at`): by id.
        let (mut applied, mut removed) = (0, 0);
        let mut restored = Vec::new();
        {
            let mut replica = self.slot.replica_mut();
            for id in changed.ids().collect::<Vec<_>>() {
                if let Some(lead) = changed.remove(id) {
                    applied += usize::from(replica.upsert(lead));
                }
            }
            for event in events {
                if event.deleted {
                    removed += usize::from(replica.delete(event.lead, event.created_at));
                } else if replica.get(event.lead).is_none() {
                    replica.forget_tombstone(event.lead);
                    restored.push(event.lead);
                }
            }
            replica.prune_tombstones(started - 4 * OVERLAP);
        }
        for ids in restored.chunks(MAX_LIMIT as usize) {
            let with = self.live(|l| l.with.clone()).unwrap_or_default();
            let target = by_ids(ids, &with);
            let leads = self
                .get(&target, replica::parse_page)
                .await?
                .unwrap_or_default();
            let mut replica = self.slot.replica_mut();
            for lead in leads {
                applied += usize::from(replica.upsert(lead));
            }
        }
        let bytes = self.slot.replica().bytes();
        self.slot.bytes.store(bytes, Ordering::Relaxed);
        self.seen.retain(|_, at| *at >= started - 4 * OVERLAP);
        {
            let mut status = lock(&self.slot.status);
            status.watermark = started;
            status.fresh_at = Some(Instant::now());
            status.error = None;
        }
        self.events_from = started;
        self.live(|l| {
            l.metrics
                .sync_deltas
                .get_or_create(&OutcomeLabels { outcome: "ok" })
                .inc();
            l.enforce_bound(&self.slot)
        });
        debug!(
            replica = self.slot.name,
            applied,
            removed,
            requests = self.slot.spent.load(Ordering::Relaxed) - spent,
            watermark = started,
            "live view: delta applied"
        );
        Ok(())
    }

    /// The deletions and restores since the last delta (less the overlap) not applied yet,
    /// oldest first.
    async fn events(&mut self) -> Result<Vec<super::feed::Event>, SyncError> {
        let from = self.events_from - OVERLAP;
        let mut all = Vec::new();
        for page in 1.. {
            let Some((events, len)) = self.get(&events_target(from, page), parse_events).await?
            else {
                break;
            };
            all.extend(events);
            if len < EVENTS_LIMIT {
                break;
            }
        }
        // Newest first on the wire; a page boundary moving under new events repeats some.
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all.retain(|e| self.seen.insert(e.id.clone(), e.created_at).is_none());
        Ok(all)
    }

    /// Reads every lead again and repairs what the replica holds differently: what the change
    /// feed should have reported and did not. Runs a delta just before comparing, so every
    /// reported change is applied first.
    async fn reconcile(&mut self) -> Result<(), SyncError> {
        let to = self.clock.now();
        let mut fresh = Replica::new();
        self.read_all(Keyset::new(0, Some(to)), &mut fresh, false)
            .await?;
        self.delta().await?;
        let mut repairs = Vec::new();
        {
            let mut replica = self.slot.replica_mut();
            // Held, but gone from a read that covered it: a deletion the feed missed.
            let gone: Vec<i64> = replica
                .ids()
                .filter(|id| fresh.get(*id).is_none())
                .filter(|id| replica.get(*id).is_some_and(|l| l.updated_at <= to))
                .collect();
            for id in gone {
                replica.remove(id);
                repairs.push(format!("lead {id} was deleted"));
            }
            for id in fresh.ids().collect::<Vec<_>>() {
                let Some(lead) = fresh.remove(id) else {
                    continue;
                };
                let repair = match replica.get(id) {
                    None => format!("lead {id} was missing"),
                    Some(held) if held.updated_at > lead.updated_at => continue,
                    Some(held) if held.stage != lead.stage => format!(
                        "lead {id} is in {} (pipeline {}), not {} (pipeline {})",
                        lead.stage.status_id,
                        lead.stage.pipeline_id,
                        held.stage.status_id,
                        held.stage.pipeline_id
                    ),
                    // Its bytes differ anyway: their links carry each read's query.
                    Some(held) if !same_fields(held, &lead) => {
                        format!("lead {id} changed without a new updated_at")
                    }
                    Some(_) => continue,
                };
                replica.remove(id);
                if replica.upsert(lead) {
                    repairs.push(repair);
                }
            }
        }
        if !repairs.is_empty() {
            warn!(
                replica = self.slot.name,
                repairs = repairs.len(),
                details = repairs.join("; "),
                "live view: the reconcile repaired what the change feed did not report"
            );
            self.live(|l| l.metrics.sync_repairs.inc_by(repairs.len() as u64));
        }
        Ok(())
    }
}

/// The target of the leads with these ids.
fn by_ids(ids: &[i64], with: &str) -> String {
    let mut t = String::from("/api/v4/leads?");
    for id in ids {
        t.push_str(&format!("filter%5Bid%5D%5B%5D={id}&"));
    }
    if !with.is_empty() {
        t.push_str("with=");
        t.push_str(&form_urlencoded::byte_serialize(with.as_bytes()).collect::<String>());
        t.push('&');
    }
    t.push_str(&format!("limit={MAX_LIMIT}"));
    t
}

/// Whether two reads of a lead agree on everything views filter and order by.
fn same_fields(a: &Lead, b: &Lead) -> bool {
    (
        a.stage,
        a.responsible_user_id,
        a.created_by,
        a.updated_by,
        a.price,
        a.created_at,
        a.updated_at,
        a.closed_at,
        a.closest_task_at,
    ) == (
        b.stage,
        b.responsible_user_id,
        b.created_by,
        b.updated_by,
        b.price,
        b.created_at,
        b.updated_at,
        b.closed_at,
        b.closest_task_at,
    )
}
