//! Protected upstream requests: one path for buffered GETs and streamed pass-through alike.
//!
//! Every attempt waits for a limiter permit, is sent within the per-attempt timeout, and its
//! answer is classified once (`classify`): a `429` pauses the whole key for
//! Kommo's `retry_after`, a `403` that looks like a block stops all traffic for a cool-down.
//! One retry policy (`retry`) decides on another attempt.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tracing::{error, warn};

use super::admission::{Admission, Outlook, Refusal, Ticket};
use super::classify::{Answer, Class, Classifier};
use super::limiter::{FlowId, GrantId, LimitError, LimiterConfig, UpstreamLimiter};
use super::retry::{Outcome, Retries};
use super::{Buffered, Upstream, UpstreamError};
use crate::body::{self, ProxyBody};
use crate::credentials::{CredentialError, Credentials, PLACEHOLDER};
use crate::metrics::{Metrics, UpstreamKind};

/// Retry and protection settings.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Retries after the first attempt of an idempotent request (`--retries`).
    pub retries: u32,
    /// The first backoff; each retry doubles it, with jitter.
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
    /// Still a `429`: the pause would outlast the client's deadline, or the upstream kept
    /// refusing.
    RateLimited { retry_after: Duration },
    /// No permit within `--max-wait` (or the deadline), or a block cool-down is in force.
    Limited(LimitError),
    /// The account's credential, held by the proxy, could not be had.
    Credential(CredentialError),
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
            FetchError::Credential(e) => write!(f, "{e}"),
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

/// `attempts` boxed as a `Send` future, proved so here where its lifetimes are known (the
/// compiler cannot prove it for the retry future's bounds once nested in a caller's future).
fn boxed<'a, O>(
    attempts: impl Future<Output = O> + Send + 'a,
) -> std::pin::Pin<Box<dyn Future<Output = O> + Send + 'a>> {
    Box::pin(attempts)
}

/// The answer a pass-through relays: the last one, whatever its status.
#[allow(clippy::result_large_err)] // as every fetch result: moved once, never held
fn relayed<A>(outcome: Outcome<A, A>) -> Result<A, FetchError> {
    match outcome {
        Outcome::Done(answer)
        | Outcome::RateLimited { answer, .. }
        | Outcome::ServerError(answer)
        | Outcome::Unauthorized(answer) => Ok(answer),
        Outcome::Unusable(reason) => Err(FetchError::Unusable { reason }),
    }
}

/// The protected way to the upstream.
pub struct Fetcher {
    pub upstream: Upstream,
    pub limiter: Arc<dyn UpstreamLimiter>,
    pub policy: FetchPolicy,
    /// The gateway's metrics.
    pub metrics: Arc<Metrics>,
    /// What answers mean; remembers each key's last `429`.
    classifier: Classifier,
    /// Upstream attempts sent, and the most that may be (`verify --max-requests`; unlimited
    /// unless [`Fetcher::cap_requests`] set it): past it an attempt is refused, not sent.
    sent: AtomicU64,
    cap: AtomicU64,
    /// Which client requests may start their upstream work now (see [`Admission`]); admits
    /// everything until [`Fetcher::with_admission`] names the limiter's settings.
    pub admission: Arc<Admission>,
    /// The account's credential, put in place of [`PLACEHOLDER`] as each attempt is sent.
    pub credentials: Option<Arc<Credentials>>,
    /// The longest wait for a permit within the last minute, for the metrics.
    pub longest_wait: crate::metrics::RecentMax,
}

impl Fetcher {
    pub fn new(
        upstream: Upstream,
        limiter: Arc<dyn UpstreamLimiter>,
        policy: FetchPolicy,
        metrics: Arc<Metrics>,
    ) -> Self {
        Fetcher {
            upstream,
            limiter,
            classifier: Classifier::new(policy.default_retry_after),
            policy,
            metrics,
            sent: AtomicU64::new(0),
            cap: AtomicU64::new(u64::MAX),
            admission: Arc::new(Admission::unlimited()),
            credentials: None,
            longest_wait: crate::metrics::RecentMax::default(),
        }
    }

    /// Sends the account's credential on requests that carry [`PLACEHOLDER`].
    pub fn with_credentials(mut self, credentials: Arc<Credentials>) -> Self {
        self.credentials = Some(credentials);
        self
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
        let admitted = self
            .admission
            .admit(&flow.key, flow.id, cost, deadline, limiter);
        admitted.inspect_err(|_| {
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

    /// A buffered, idempotent GET of `target` (path and query): limited, retried, and read by
    /// `read`.
    pub async fn get<T: Send>(
        &self,
        kind: UpstreamKind,
        flow: &Flow,
        target: &str,
        headers: &HeaderMap,
        read: impl Fn(Buffered) -> Verdict<T> + Sync,
    ) -> Result<T, FetchError> {
        // A GET: the method of a new request.
        let mut req = Request::new(body::empty());
        *req.uri_mut() = target.parse().map_err(|e| {
            FetchError::Transport(UpstreamError::Connect(format!(
                "invalid request target {target:?}: {e}"
            )))
        })?;
        *req.headers_mut() = headers.clone();
        let read = &read;
        let attempts = ServiceBuilder::new()
            .retry(self.retries(kind, flow))
            .service_fn(move |req| self.attempt(kind, flow, req, |r| self.upstream.read(r), read));
        let outcome = boxed(attempts.oneshot(req)).await?;
        match outcome {
            Outcome::Done(t) => Ok(t),
            Outcome::RateLimited { after, .. } => {
                Err(FetchError::RateLimited { retry_after: after })
            }
            Outcome::ServerError(answer) => Err(FetchError::Status(answer)),
            Outcome::Unusable(reason) => Err(FetchError::Unusable { reason }),
            Outcome::Unauthorized(answer) => match read(answer) {
                Verdict::Done(t) => Ok(t),
                Verdict::Unusable(reason) => Err(FetchError::Unusable { reason }),
            },
        }
    }

    /// Sends a pass-through request; the answer's body streams back. Bodiless GET, HEAD and
    /// OPTIONS requests are retried; anything else is sent exactly once. The last answer is
    /// relayed, a `429` or a `5xx` included.
    pub async fn send(
        &self,
        flow: &Flow,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, FetchError> {
        let kind = UpstreamKind::Passthrough;
        let attempts = ServiceBuilder::new()
            .retry(self.retries(kind, flow))
            .service_fn(move |req| {
                self.attempt(kind, flow, req, |r| self.upstream.send(r), Verdict::Done)
            });
        relayed(boxed(attempts.oneshot(req)).await?)
    }

    fn retries<'a>(&'a self, kind: UpstreamKind, flow: &Flow) -> Retries<'a> {
        Retries::new(&self.policy, &self.metrics, kind, flow.deadline)
    }

    /// One attempt: the account's credential, then [`Fetcher::exchange`]. The answer is
    /// classified; usable ones are read by `read`.
    async fn attempt<A: Answer, T, F: Future<Output = Result<A, UpstreamError>>>(
        &self,
        kind: UpstreamKind,
        flow: &Flow,
        mut req: Request<ProxyBody>,
        exchange: impl FnOnce(Request<ProxyBody>) -> F,
        read: impl FnOnce(A) -> Verdict<T>,
    ) -> Result<Outcome<T, A>, FetchError> {
        let used = self.put_credential(req.headers_mut()).await?;
        let answer = self.exchange(kind, flow, exchange(req)).await?;
        if let (Some(used), Some(credentials)) = (used, &self.credentials) {
            if answer.status() == StatusCode::UNAUTHORIZED {
                // Kommo no longer takes the account's token: a new one (one refresh for all
                // the requests that saw this), and one more attempt if it differs.
                let fresh = credentials.after_unauthorized(self, &used).await;
                if fresh.map_err(FetchError::Credential)? != used {
                    return Ok(Outcome::Unauthorized(answer));
                }
            }
        }
        Ok(self.judge(flow, answer, read))
    }

    /// A permit, then `exchange` within the per-attempt timeout. The permit is released once
    /// the exchange completed (a streamed answer's head, a buffered answer's whole body): the
    /// limiter counts a request until the upstream has answered it.
    async fn exchange<A: Answer>(
        &self,
        kind: UpstreamKind,
        flow: &Flow,
        exchange: impl Future<Output = Result<A, UpstreamError>>,
    ) -> Result<A, FetchError> {
        let permit = self.permit(flow).await?;
        let sent = Instant::now();
        let timeout = self.upstream.config().timeout;
        let answer = tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(UpstreamError::Timeout(timeout)));
        drop(permit);
        self.admission.observe(sent.elapsed());
        let status = answer.as_ref().map_or(0, |a| a.status().as_u16());
        self.metrics.upstream(kind, status, sent.elapsed());
        answer.map_err(FetchError::Transport)
    }

    /// What an answer means: a `429` pauses the key, a block stops it; a usable answer is
    /// read by `read`.
    fn judge<A: Answer, T>(
        &self,
        flow: &Flow,
        answer: A,
        read: impl FnOnce(A) -> Verdict<T>,
    ) -> Outcome<T, A> {
        match self.classifier.classify(&flow.key, &answer) {
            Class::RateLimited(after) => {
                self.pause(&flow.key, after);
                Outcome::RateLimited { after, answer }
            }
            Class::ServerError => Outcome::ServerError(answer),
            class => {
                if class == Class::Blocked {
                    self.block(&flow.key);
                }
                match read(answer) {
                    Verdict::Done(t) => Outcome::Done(t),
                    Verdict::Unusable(reason) => Outcome::Unusable(reason),
                }
            }
        }
    }

    /// Sends `req` once as it is, under the limiter, with no credential put in: the way to
    /// Kommo's token endpoint (which must not wait for the credential it renews).
    pub async fn send_once(
        &self,
        flow: &Flow,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, FetchError> {
        let kind = UpstreamKind::Passthrough;
        let answer = self.exchange(kind, flow, self.upstream.send(req)).await?;
        relayed(self.judge(flow, answer, Verdict::Done))
    }

    /// Puts the account's credential in place of [`PLACEHOLDER`]; the value sent, if any.
    async fn put_credential(
        &self,
        headers: &mut HeaderMap,
    ) -> Result<Option<HeaderValue>, FetchError> {
        let Some(credentials) = &self.credentials else {
            return Ok(None);
        };
        if headers.get(AUTHORIZATION) != Some(&PLACEHOLDER) {
            return Ok(None);
        }
        let value = credentials
            .authorization(self)
            .await
            .map_err(FetchError::Credential)?;
        headers.insert(AUTHORIZATION, value.clone());
        Ok(Some(value))
    }

    /// Waits for a permit for one attempt of `flow`; the permit's slot is released when the
    /// returned guard drops, after the attempt completed (or was abandoned).
    async fn permit<'a>(&'a self, flow: &'a Flow) -> Result<Permit<'a>, FetchError> {
        // Counted before the wait, so concurrent attempts cannot pass the cap together; given
        // back when no permit comes (a wait withdrawn midway stays counted: the count errs high).
        let cap = self.cap.load(Ordering::SeqCst);
        let count = |n| (n < cap).then_some(n + 1);
        let counted = self
            .sent
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, count);
        if counted.is_err() {
            let retry_after = Duration::ZERO;
            return Err(FetchError::Limited(LimitError::Timeout { retry_after }));
        }
        let start = Instant::now();
        let deadline = flow.deadline.min(start + self.policy.max_wait);
        let grant = self.limiter.acquire(&flow.key, flow.id, deadline).await;
        let waited = start.elapsed();
        self.metrics
            .limiter_wait_seconds
            .observe(waited.as_secs_f64());
        self.longest_wait.record(waited);
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

    /// A `429`: nothing is granted under `key` for `after`.
    fn pause(&self, key: &str, after: Duration) {
        self.metrics.rate_limited.inc();
        warn!(
            retry_after_ms = after.as_millis() as u64,
            "upstream answered 429: pausing all upstream requests"
        );
        self.limiter.pause(key, Instant::now() + after);
    }

    /// A block: nothing is sent under `key` until the cool-down ends.
    fn block(&self, key: &str) {
        self.metrics.blocks.inc();
        error!(
            cooldown_s = self.policy.block_cooldown.as_secs(),
            "upstream answered 403 like a block of this address: no upstream requests until the cool-down ends"
        );
        self.limiter
            .block(key, Instant::now() + self.policy.block_cooldown);
    }
}
