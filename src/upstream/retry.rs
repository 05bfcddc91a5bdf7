//! The one retry policy of the upstream edge, for buffered GETs and pass-through alike.
//!
//! Only idempotent requests without a body (GET, HEAD, OPTIONS) are sent again; anything else
//! goes out exactly once. Transport failures, `5xx` and unusable answers are retried with
//! exponential backoff and jitter while the client's deadline allows; a `429` is waited
//! out (the limiter's pause holds the next attempt) a few times. The decision reads the
//! failure's kind, never its text.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use http::{Method, Request};
use http_body::Body as _;
use tokio::time::{Instant, Sleep};
use tracing::warn;

use super::classify::Answer;
use super::fetch::{FetchError, FetchPolicy};
use crate::body::{self, ProxyBody};
use crate::metrics::{KindLabels, Metrics, UpstreamKind};

/// What one attempt came to, as the retry policy reads it.
pub enum Outcome<T, A> {
    /// A usable answer, as the caller read it.
    Done(T),
    /// `429`: the key is paused for `after`.
    RateLimited { after: Duration, answer: A },
    /// A `5xx` answer.
    ServerError(A),
    /// A `200` the caller could not use (truncated, unparsable).
    Unusable(String),
    /// `401` to the account's credential, which has been renewed since: worth one more try.
    Unauthorized(A),
}

/// `429`s one request waits out before giving up, beyond which the upstream is overloaded.
const MAX_429_WAITS: u32 = 5;

/// The retry state of one client request: a [`tower::retry::Policy`].
#[derive(Clone)]
pub struct Retries<'a> {
    settings: &'a FetchPolicy,
    metrics: &'a Metrics,
    kind: UpstreamKind,
    /// The client request's deadline: no attempt starts after it.
    deadline: Instant,
    retries: u32,
    waits_429: u32,
    /// Whether the one attempt after a renewed credential was made.
    renewed: bool,
}

impl<'a> Retries<'a> {
    pub fn new(
        settings: &'a FetchPolicy,
        metrics: &'a Metrics,
        kind: UpstreamKind,
        deadline: Instant,
    ) -> Self {
        Retries {
            settings,
            metrics,
            kind,
            deadline,
            retries: 0,
            waits_429: 0,
            renewed: false,
        }
    }

    /// Exponential backoff with jitter: a uniform wait in [b/2, b] for
    /// b = base·2^(retry-1), capped.
    fn backoff(&self, retry: u32) -> Duration {
        let (base, max) = (self.settings.backoff_base, self.settings.backoff_max);
        let exp = base
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(max);
        // Random enough to spread retries: std's hasher keys are random per thread and differ
        // for every `RandomState`.
        let z = RandomState::new().hash_one(retry);
        let half = exp / 2;
        half + Duration::from_nanos(z % (half.as_nanos() as u64 + 1))
    }
}

impl<T, A: Answer> tower::retry::Policy<Request<ProxyBody>, Outcome<T, A>, FetchError>
    for Retries<'_>
{
    type Future = Sleep;

    fn retry(
        &mut self,
        req: &mut Request<ProxyBody>,
        result: &mut Result<Outcome<T, A>, FetchError>,
    ) -> Option<Sleep> {
        let failure: &dyn std::fmt::Display = match result {
            Ok(Outcome::RateLimited { after, .. }) => {
                // No sleep here: the limiter's pause holds this attempt and every other one of
                // the key.
                let wait =
                    self.waits_429 < MAX_429_WAITS && Instant::now() + *after < self.deadline;
                self.waits_429 += u32::from(wait);
                return wait.then(|| tokio::time::sleep(Duration::ZERO));
            }
            Ok(Outcome::Unauthorized(_)) => {
                let again = !self.renewed && Instant::now() < self.deadline;
                self.renewed = true;
                return again.then(|| tokio::time::sleep(Duration::ZERO));
            }
            Ok(Outcome::ServerError(answer)) => &answer.status(),
            Ok(Outcome::Unusable(reason)) => reason,
            Err(e @ FetchError::Transport(_)) => e,
            Ok(Outcome::Done(_)) | Err(_) => return None,
        };
        let backoff = self.backoff(self.retries + 1);
        if self.retries >= self.settings.retries || Instant::now() + backoff >= self.deadline {
            return None;
        }
        self.retries += 1;
        let kind = self.kind.as_str();
        let counter = self.metrics.retries.get_or_create(&KindLabels { kind });
        counter.inc();
        warn!(method = %req.method(), path = req.uri().path(), attempt = self.retries, error = %failure, "retrying upstream request");
        Some(tokio::time::sleep(backoff))
    }

    /// A copy for the next attempt, of an idempotent request without a body only.
    fn clone_request(&mut self, req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
        let idempotent = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        if !idempotent || req.body().size_hint().exact() != Some(0) {
            return None;
        }
        let mut copy = Request::new(body::empty());
        *copy.method_mut() = req.method().clone();
        *copy.uri_mut() = req.uri().clone();
        *copy.version_mut() = req.version();
        *copy.headers_mut() = req.headers().clone();
        Some(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::limiter::LimitError;
    use crate::upstream::{Buffered, UpstreamError};
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use tower::retry::Policy;

    type Result = std::result::Result<Outcome<(), Buffered>, FetchError>;

    fn settings() -> FetchPolicy {
        FetchPolicy {
            retries: 2,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(150),
            block_cooldown: Duration::from_secs(60),
            default_retry_after: Duration::from_secs(1),
            max_wait: Duration::from_secs(10),
        }
    }

    fn answer(status: u16) -> Buffered {
        Buffered {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    fn server_error() -> Outcome<(), Buffered> {
        Outcome::ServerError(answer(500))
    }

    fn too_many(seconds: u64) -> Outcome<(), Buffered> {
        Outcome::RateLimited {
            after: Duration::from_secs(seconds),
            answer: answer(429),
        }
    }

    fn get() -> Request<ProxyBody> {
        let mut req = Request::new(body::empty());
        *req.uri_mut() = "/api/v4/leads?page=2".parse().unwrap();
        req
    }

    /// The waits the policy decides on for `results` in turn, `None` where it gives up, from
    /// a request whose deadline is `deadline` from now.
    fn decisions(deadline: Duration, results: Vec<Result>) -> Vec<Option<Duration>> {
        let (settings, metrics) = (settings(), Metrics::new());
        let start = Instant::now();
        let mut policy = Retries::new(&settings, &metrics, UpstreamKind::Stream, start + deadline);
        results
            .into_iter()
            .map(|mut result| {
                let wait = policy.retry(&mut get(), &mut result)?;
                Some(wait.deadline() - start)
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_with_growing_jittered_backoff_up_to_the_limit() {
        let minute = Duration::from_secs(60);
        let waits = decisions(
            minute,
            vec![Ok(server_error()), Ok(server_error()), Ok(server_error())],
        );
        let first = waits[0].expect("a first retry");
        assert!((50..=100).contains(&first.as_millis()), "{first:?}");
        let second = waits[1].expect("a second retry");
        assert!(
            (75..=150).contains(&second.as_millis()),
            "capped: {second:?}"
        );
        assert_eq!(waits[2], None, "--retries 2: three attempts in all");

        let transport = Err(FetchError::Transport(UpstreamError::Connect(
            "reset".into(),
        )));
        let unusable = Ok(Outcome::Unusable("truncated".into()));
        let waits = decisions(minute, vec![transport, unusable]);
        assert!(waits.iter().all(Option::is_some), "{waits:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn answers_and_refused_permits_are_final() {
        let minute = Duration::from_secs(60);
        let limited = Err(FetchError::Limited(LimitError::Timeout {
            retry_after: Duration::ZERO,
        }));
        assert_eq!(
            decisions(minute, vec![Ok(Outcome::Done(())), limited]),
            vec![None, None]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_retried_past_the_deadline() {
        assert_eq!(
            decisions(Duration::from_millis(40), vec![Ok(server_error())]),
            vec![None],
            "the backoff would end past the deadline"
        );
        assert_eq!(
            decisions(
                Duration::from_secs(2),
                vec![Ok(too_many(1)), Ok(too_many(3))]
            ),
            vec![Some(Duration::ZERO), None]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_is_waited_out_five_times_at_most_by_the_limiter() {
        let six = (0..6).map(|_| too_many(1)).map(Ok).collect();
        let waits = decisions(Duration::from_secs(60), six);
        assert_eq!(waits[..5], [Some(Duration::ZERO); 5]);
        assert_eq!(waits[5], None);
    }

    #[test]
    fn only_idempotent_requests_without_a_body_are_sent_again() {
        let (settings, metrics) = (settings(), Metrics::new());
        let mut policy = Retries::new(
            &settings,
            &metrics,
            UpstreamKind::Passthrough,
            Instant::now(),
        );
        let mut clone = |method: Method, body: ProxyBody| {
            let mut req = get();
            *req.method_mut() = method;
            *req.body_mut() = body;
            req.headers_mut()
                .insert("x-request-id", "1".parse().unwrap());
            <Retries as Policy<_, Outcome<(), Buffered>, _>>::clone_request(&mut policy, &req)
        };
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            let copy = clone(method.clone(), body::empty()).expect("sent again");
            assert_eq!(copy.method(), method);
            assert_eq!(copy.uri(), "/api/v4/leads?page=2");
            assert_eq!(copy.headers()["x-request-id"], "1");
        }
        assert!(clone(Method::GET, body::full("x")).is_none(), "a body");
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            assert!(clone(method, body::empty()).is_none());
        }
    }
}
