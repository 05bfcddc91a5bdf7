//! Protected upstream requests: every attempt waits for a limiter permit; `429`s pause the
//! whole key for Kommo's `retry_after`; a `403` that looks like a block stops all traffic for a
//! cool-down; idempotent GETs are retried with backoff and jitter within the client's deadline.
//!
//! The retry decision reads the failure's kind (transport, status, unusable body), never its
//! text, and non-idempotent requests are sent exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{error, warn};

use super::admission::{Admission, Outlook, Refusal, Ticket};
use super::limiter::{FlowId, GrantId, LimitError, LimiterConfig, UpstreamLimiter};
use super::{Buffered, Upstream, UpstreamError};
use crate::body::{self, ProxyBody};
use crate::metrics::{KindLabels, Metrics, UpstreamKind};

/// Retry and protection settings.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Retries after the first attempt of an idempotent GET (`--retries`).
    pub retries: u32,
    /// The first backoff; each retry doubles it, with full jitter.
    pub backoff_base: Duration,
    /// The largest backoff.
    pub backoff_max: Duration,
    /// How long all traffic stops after a block-like `403` (`--block-cooldown`).
    pub block_cooldown: Duration,
    /// The pause after a `429` that names no `retry_after`: one rate window.
    pub default_retry_after: Duration,
    /// How long a permit may be waited for (`--max-wait`).
    pub max_wait: Duration,
}

/// One client request as the limiter and the retry policy see it.
#[derive(Debug, Clone)]
pub struct Flow {
    /// Shares permits fairly with other client requests.
    pub id: FlowId,
    /// The limiter key: the upstream origin, or the credential with `--rate-limit-key token`.
    pub key: Arc<str>,
    /// The client request's deadline (`--request-timeout`); nothing is sent after it.
    pub deadline: Instant,
}

/// What the caller made of an upstream answer.
pub enum Verdict<T> {
    /// Usable: done.
    Done(T),
    /// A `200` whose body cannot be used (truncated, unparsable): retry like a `5xx`.
    Unusable(String),
}

/// Why a protected request gave up.
#[derive(Debug, Clone)]
pub enum FetchError {
    /// No answer after every attempt (connect, reset, timeout, oversized body).
    Transport(UpstreamError),
    /// Still a `5xx` after every attempt: the last answer.
    Status(Buffered),
    /// A `200` that could not be used after every attempt.
    Unusable { reason: String },
    /// The upstream asks to wait past the client's deadline.
    RateLimited { retry_after: Duration },
    /// No permit within `--max-wait` (or the deadline), or a block cool-down is in force.
    Limited(LimitError),
}

impl FetchError {
    /// The upstream status involved, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            FetchError::Status(b) => Some(b.status.as_u16()),
            FetchError::Unusable { .. } => Some(200),
            FetchError::RateLimited { .. } => Some(429),
            _ => None,
        }
    }
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Transport(e) => write!(f, "{e}"),
            FetchError::Status(b) => write!(f, "the upstream answered {}", b.status),
            FetchError::Unusable { reason } => write!(f, "{reason}"),
            FetchError::RateLimited { retry_after } => write!(
                f,
                "the upstream rate limit asks to wait {}s, past this request's deadline",
                retry_after.as_secs_f64().ceil()
            ),
            FetchError::Limited(e) => write!(f, "{e}"),
        }
    }
}

/// A granted limiter slot, released when dropped.
struct Permit<'a> {
    limiter: &'a dyn UpstreamLimiter,
    key: &'a str,
    grant: GrantId,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limiter.release(self.key, self.grant);
    }
}

/// The protected way to the upstream.
pub struct Fetcher {
    pub upstream: Upstream,
    pub limiter: Arc<dyn UpstreamLimiter>,
    pub policy: FetchPolicy,
    /// The gateway's metrics (created here, shared by everything built on this fetcher).
    pub metrics: Arc<Metrics>,
    /// When each key last saw a `429`: a `403` soon after one is taken as a block. A plain
    /// mutex: held for one map operation, never across an await.
    recent_429: Mutex<HashMap<String, Instant>>,
    /// Jitter source; quality does not matter, only spread.
    jitter: AtomicU64,
    /// Upstream attempts sent, and the most that may be (`verify --max-requests`; unlimited
    /// unless [`Fetcher::cap_requests`] set it): past it an attempt is refused, not sent.
    sent: AtomicU64,
    cap: AtomicU64,
    /// Which client requests may start their upstream work now (see [`Admission`]); admits
    /// everything until [`Fetcher::with_admission`] names the limiter's settings.
    pub admission: Arc<Admission>,
}

/// How long after a `429` a `403` counts as Kommo's block rather than a permission error.
const BLOCK_AFTER_429_WINDOW: Duration = Duration::from_secs(120);
/// `429`s one request waits out before giving up, beyond which the upstream is overloaded.
const MAX_429_WAITS: u32 = 5;

impl Fetcher {
    pub fn new(upstream: Upstream, limiter: Arc<dyn UpstreamLimiter>, policy: FetchPolicy) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Fetcher {
            upstream,
            limiter,
            policy,
            metrics: Arc::new(Metrics::new()),
            recent_429: Mutex::new(HashMap::new()),
            jitter: AtomicU64::new(seed | 1),
            sent: AtomicU64::new(0),
            cap: AtomicU64::new(u64::MAX),
            admission: Arc::new(Admission::unlimited()),
        }
    }

    /// Admits client requests by what the limiter of `limits` can serve before their deadlines.
    pub fn with_admission(mut self, limits: LimiterConfig) -> Self {
        self.admission = Arc::new(Admission::new(limits));
        self
    }

    /// Books `cost` upstream calls for `flow` if the budget can start them all before the
    /// earlier of its deadline and `--max-wait` from now; refused at once otherwise. The
    /// booking is given back when the ticket drops.
    pub fn admit(&self, flow: &Flow, cost: u32) -> Result<Ticket, Refusal> {
        let deadline = flow.deadline.min(Instant::now() + self.policy.max_wait);
        let limiter = self.limiter.snapshot(&flow.key);
        self.admission
            .admit(&flow.key, flow.id, cost, deadline, limiter)
            .inspect_err(|_| {
                self.metrics.admission_refused.inc();
            })
    }

    /// The booked work of the busiest key (`origin` or one with bookings) and when the budget
    /// could start more: what readiness and the gauges report.
    pub fn admission_outlook(&self, origin: &str) -> Outlook {
        let mut keys = self.admission.keys();
        if !keys.iter().any(|k| &**k == origin) {
            keys.push(Arc::from(origin));
        }
        keys.iter()
            .map(|key| self.admission.outlook(key, self.limiter.snapshot(key)))
            .max_by_key(|o| o.wait)
            .unwrap_or_default()
    }

    /// Refuses every upstream attempt past the first `max` (sent ones included): a hard budget.
    pub fn cap_requests(&self, max: u64) {
        self.cap.store(max, Ordering::SeqCst);
    }

    /// Upstream attempts sent so far (each retry counts).
    pub fn requests_sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// Waits for a permit for one attempt of `flow`; the permit's slot is released when the
    /// returned guard drops, after the attempt completed (or was abandoned).
    async fn permit<'a>(&'a self, flow: &'a Flow) -> Result<Permit<'a>, FetchError> {
        // Counted before the wait, so concurrent attempts cannot pass the cap together; given
        // back when no permit comes (a wait withdrawn midway stays counted: the count errs high).
        let cap = self.cap.load(Ordering::SeqCst);
        if self
            .sent
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_err()
        {
            return Err(FetchError::Limited(LimitError::Timeout {
                retry_after: Duration::ZERO,
            }));
        }
        let start = Instant::now();
        let deadline = flow.deadline.min(start + self.policy.max_wait);
        let grant = self.limiter.acquire(&flow.key, flow.id, deadline).await;
        self.metrics
            .limiter_wait_seconds
            .observe(start.elapsed().as_secs_f64());
        let grant = grant.map_err(|e| {
            self.sent.fetch_sub(1, Ordering::SeqCst);
            FetchError::Limited(e)
        })?;
        self.admission.consume(&flow.key, flow.id);
        Ok(Permit {
            limiter: self.limiter.as_ref(),
            key: &flow.key,
            grant,
        })
    }

    /// A buffered, idempotent GET: limited, retried, and read by `read`.
    pub async fn get<T>(
        &self,
        kind: UpstreamKind,
        flow: &Flow,
        target: &str,
        headers: &HeaderMap,
        read: impl Fn(Buffered) -> Verdict<T>,
    ) -> Result<T, FetchError> {
        let mut retries = 0;
        let mut waits_429 = 0;
        loop {
            let permit = self.permit(flow).await?;
            let sent = Instant::now();
            let answer = self.upstream.get(target, headers.clone()).await;
            drop(permit);
            let status = answer.as_ref().map_or(0, |b| b.status.as_u16());
            self.admission.observe(sent.elapsed());
            self.metrics.upstream(kind, status, sent.elapsed());
            let failure = match answer {
                Err(e) => FetchError::Transport(e),
                Ok(b) if b.status == StatusCode::TOO_MANY_REQUESTS => {
                    let after = self.saw_429(&flow.key, &b);
                    if waits_429 < MAX_429_WAITS && Instant::now() + after < flow.deadline {
                        // The pause holds this attempt and every other one for the key.
                        waits_429 += 1;
                        continue;
                    }
                    return Err(FetchError::RateLimited { retry_after: after });
                }
                Ok(b) if b.status.is_server_error() => FetchError::Status(b),
                Ok(b) => {
                    if b.status == StatusCode::FORBIDDEN {
                        self.check_block(&flow.key, &b);
                    }
                    match read(b) {
                        Verdict::Done(t) => return Ok(t),
                        Verdict::Unusable(reason) => FetchError::Unusable { reason },
                    }
                }
            };
            if retries >= self.policy.retries {
                return Err(failure);
            }
            retries += 1;
            let backoff = self.backoff(retries);
            if Instant::now() + backoff >= flow.deadline {
                return Err(failure);
            }
            self.metrics
                .retries
                .get_or_create(&KindLabels {
                    kind: kind.as_str(),
                })
                .inc();
            warn!(path = target.split('?').next().unwrap_or(""), attempt = retries, error = %failure, "retrying upstream GET");
            tokio::time::sleep(backoff).await;
        }
    }

    /// Sends a pass-through request. Bodiless GET, HEAD and OPTIONS requests are retried on
    /// transport failures; anything else is sent exactly once. `429` and block-like `403`
    /// answers protect the key and are relayed.
    pub async fn send(
        &self,
        flow: &Flow,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, FetchError> {
        let retryable = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
            && http_body::Body::size_hint(req.body()).exact() == Some(0);
        let (parts, body) = req.into_parts();
        let mut body = Some(body);
        let timeout = self.upstream.config().timeout;
        let mut retries = 0;
        loop {
            let permit = self.permit(flow).await?;
            let mut attempt = Request::new(body.take().unwrap_or_else(body::empty));
            *attempt.method_mut() = parts.method.clone();
            *attempt.uri_mut() = parts.uri.clone();
            *attempt.headers_mut() = parts.headers.clone();
            let sent = Instant::now();
            let result = match tokio::time::timeout(timeout, self.upstream.send(attempt)).await {
                Ok(r) => r,
                Err(_) => Err(UpstreamError::Timeout(timeout)),
            };
            // The answer's head has arrived: the upstream has counted the request.
            drop(permit);
            self.admission.observe(sent.elapsed());
            let status = result.as_ref().map_or(0, |r| r.status().as_u16());
            self.metrics
                .upstream(UpstreamKind::Passthrough, status, sent.elapsed());
            match result {
                Ok(resp) => {
                    if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                        let after = retry_after_header(resp.headers())
                            .unwrap_or(self.policy.default_retry_after);
                        self.pause(&flow.key, after);
                    } else if resp.status() == StatusCode::FORBIDDEN {
                        let html = resp
                            .headers()
                            .get(header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|ct| ct.contains("html"));
                        if html || self.recently_429(&flow.key) {
                            self.block(&flow.key);
                        }
                    }
                    return Ok(resp);
                }
                Err(e) if retryable && retries < self.policy.retries => {
                    retries += 1;
                    self.metrics
                        .retries
                        .get_or_create(&KindLabels {
                            kind: UpstreamKind::Passthrough.as_str(),
                        })
                        .inc();
                    let backoff = self.backoff(retries);
                    if Instant::now() + backoff >= flow.deadline {
                        return Err(FetchError::Transport(e));
                    }
                    warn!(attempt = retries, error = %e, "retrying pass-through request");
                    tokio::time::sleep(backoff).await;
                }
                Err(e) => return Err(FetchError::Transport(e)),
            }
        }
    }

    /// Records a `429`: pauses the key for Kommo's `retry_after` and returns it.
    fn saw_429(&self, key: &str, answer: &Buffered) -> Duration {
        let after = retry_after(answer).unwrap_or(self.policy.default_retry_after);
        self.pause(key, after);
        after
    }

    fn pause(&self, key: &str, after: Duration) {
        self.metrics.rate_limited.inc();
        warn!(
            retry_after_ms = after.as_millis() as u64,
            "upstream answered 429: pausing all upstream requests"
        );
        let now = Instant::now();
        self.recent_429
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), now);
        self.limiter.pause(key, now + after);
    }

    fn recently_429(&self, key: &str) -> bool {
        self.recent_429
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .is_some_and(|at| at.elapsed() < BLOCK_AFTER_429_WINDOW)
    }

    /// A `403` with an HTML body, or soon after a `429`, is Kommo blocking this address.
    fn check_block(&self, key: &str, answer: &Buffered) {
        let json = serde_json::from_slice::<serde_json::Value>(&answer.body).is_ok();
        if !json || self.recently_429(key) {
            self.block(key);
        }
    }

    fn block(&self, key: &str) {
        self.metrics.blocks.inc();
        error!(
            cooldown_s = self.policy.block_cooldown.as_secs(),
            "upstream answered 403 like a block of this address: no upstream requests until the cool-down ends"
        );
        self.limiter
            .block(key, Instant::now() + self.policy.block_cooldown);
    }

    /// Exponential backoff with full jitter: a uniform wait in [base·2^(n-1) / 2, base·2^(n-1)],
    /// capped.
    fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .policy
            .backoff_base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(self.policy.backoff_max);
        let x = self.next_random();
        let half = exp / 2;
        half + Duration::from_nanos(x % (half.as_nanos() as u64 + 1))
    }

    fn next_random(&self) -> u64 {
        // SplitMix64 over an atomic counter: distinct values across concurrent callers.
        let mut z = self
            .jitter
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Kommo's `retry_after` (seconds, in the JSON body), else a `Retry-After` header in seconds.
pub fn retry_after(answer: &Buffered) -> Option<Duration> {
    serde_json::from_slice::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| {
            let r = v.get("retry_after")?;
            r.as_f64()
                .or_else(|| r.as_str().and_then(|s| s.trim().parse().ok()))
        })
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(86_400.0)))
        .or_else(|| retry_after_header(&answer.headers))
}

fn retry_after_header(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn answer(body: &str, header: Option<&str>) -> Buffered {
        let mut headers = HeaderMap::new();
        if let Some(h) = header {
            headers.insert(header::RETRY_AFTER, h.parse().unwrap());
        }
        Buffered {
            status: StatusCode::TOO_MANY_REQUESTS,
            headers,
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn retry_after_from_body_or_header() {
        assert_eq!(
            retry_after(&answer(r#"{"retry_after":3}"#, None)),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            retry_after(&answer(r#"{"retry_after":"2"}"#, Some("9"))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&answer("<html>slow down</html>", Some("7"))),
            Some(Duration::from_secs(7))
        );
        assert_eq!(retry_after(&answer(r#"{"detail":"x"}"#, None)), None);
        assert_eq!(
            retry_after(&answer(r#"{"retry_after":-1}"#, Some("x"))),
            None
        );
    }
}
