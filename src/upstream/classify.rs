//! What an upstream answer means for the limiter and the retry policy, decided in one place
//! for buffered and streamed answers alike.
//!
//! Kommo answers `429` when the account's rate is exceeded, with `retry_after` in a JSON body,
//! a `Retry-After` header, or neither (its gateway's HTML page). Repeated excess gets the
//! address blocked: a `403` with an HTML page, or any `403` soon after a `429`. A `403` with a
//! JSON body at other times is a permission error of the request, relayed like any answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use tokio::time::Instant;

use super::Buffered;

/// An upstream answer as the classifier sees it: its head, and its body once read whole.
pub trait Answer {
    fn status(&self) -> StatusCode;
    fn headers(&self) -> &HeaderMap;
    /// The whole body, if it was read (a streamed answer's is not).
    fn body(&self) -> Option<&[u8]>;
}

impl Answer for Buffered {
    fn status(&self) -> StatusCode {
        self.status
    }
    fn headers(&self) -> &HeaderMap {
        &self.headers
    }
    fn body(&self) -> Option<&[u8]> {
        Some(&self.body)
    }
}

impl<B> Answer for Response<B> {
    fn status(&self) -> StatusCode {
        self.status()
    }
    fn headers(&self) -> &HeaderMap {
        self.headers()
    }
    fn body(&self) -> Option<&[u8]> {
        None
    }
}

/// What an answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Any other answer: the caller's to use (and, for a `200`, to judge usable or not).
    Answered,
    /// `429`: nothing may be sent under the key for this long.
    RateLimited(Duration),
    /// A `403` that is Kommo blocking this address: relayed, and the key cools down.
    Blocked,
    /// `5xx`: worth another attempt.
    ServerError,
}

/// How long after a `429` a `403` counts as Kommo's block rather than a permission error.
const BLOCK_AFTER_429_WINDOW: Duration = Duration::from_secs(120);

/// Classifies answers, remembering per limiter key when the last `429` came.
#[derive(Debug)]
pub struct Classifier {
    /// The pause after a `429` that names none.
    default_retry_after: Duration,
    /// When each key last saw a `429`. A plain mutex: held for one map operation, never
    /// across an await.
    last_429: Mutex<HashMap<String, Instant>>,
}

impl Classifier {
    pub fn new(default_retry_after: Duration) -> Self {
        Classifier {
            default_retry_after,
            last_429: Mutex::default(),
        }
    }

    /// What `answer`, received under limiter key `key`, means.
    pub fn classify(&self, key: &str, answer: &impl Answer) -> Class {
        match answer.status() {
            StatusCode::TOO_MANY_REQUESTS => {
                self.last_429().insert(key.to_string(), Instant::now());
                Class::RateLimited(retry_after(answer).unwrap_or(self.default_retry_after))
            }
            StatusCode::FORBIDDEN if looks_blocked(answer) || self.after_429(key) => Class::Blocked,
            status if status.is_server_error() => Class::ServerError,
            _ => Class::Answered,
        }
    }

    fn after_429(&self, key: &str) -> bool {
        self.last_429()
            .get(key)
            .is_some_and(|at| at.elapsed() < BLOCK_AFTER_429_WINDOW)
    }

    fn last_429(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        // Nothing panics while holding the lock; a poisoned one still holds a valid map.
        self.last_429.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An HTML page, or a read body that is not JSON: Kommo's API answers in JSON, its gateway's
/// block page does not.
fn looks_blocked(answer: &impl Answer) -> bool {
    let html = |ct: &HeaderValue| ct.to_str().is_ok_and(|ct| ct.contains("html"));
    let not_json = |b: &[u8]| serde_json::from_slice::<serde::de::IgnoredAny>(b).is_err();
    let content_type = answer.headers().get(header::CONTENT_TYPE);
    content_type.is_some_and(html) || answer.body().is_some_and(not_json)
}

/// Kommo's `retry_after` (seconds, a number or a string, in a JSON body), else a
/// `Retry-After` header in seconds.
pub fn retry_after(answer: &impl Answer) -> Option<Duration> {
    let body: Option<serde_json::Value> =
        answer.body().and_then(|b| serde_json::from_slice(b).ok());
    let given = body.as_ref().and_then(|v| v.get("retry_after"));
    let seconds = given.and_then(|r| r.as_f64().or_else(|| r.as_str()?.trim().parse().ok()));
    if let Some(seconds) = seconds.filter(|s| s.is_finite() && *s >= 0.0) {
        return Some(Duration::from_secs_f64(seconds.min(86_400.0)));
    }
    let seconds = answer.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    let seconds = seconds.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(seconds.min(86_400)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const DEFAULT: Duration = Duration::from_secs(1);

    fn answer(status: u16, content_type: &str, body: &str, retry_after: Option<&str>) -> Buffered {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        if let Some(h) = retry_after {
            headers.insert(header::RETRY_AFTER, h.parse().unwrap());
        }
        Buffered {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::from(body.to_string()),
        }
    }

    fn json(status: u16, body: &str) -> Buffered {
        answer(status, "application/problem+json", body, None)
    }

    fn html(status: u16) -> Buffered {
        answer(status, "text/html", "<html><body>stop</body></html>", None)
    }

    /// `b`'s head alone, as a streamed answer shows it.
    fn head(b: &Buffered) -> Response<()> {
        let mut resp = Response::new(());
        *resp.status_mut() = b.status;
        *resp.headers_mut() = b.headers.clone();
        resp
    }

    fn classify(b: &Buffered) -> Class {
        Classifier::new(DEFAULT).classify("k", b)
    }

    #[test]
    fn a_429_names_its_pause_in_the_json_body_or_a_header_else_the_default() {
        let secs = |s| Class::RateLimited(Duration::from_secs(s));
        assert_eq!(classify(&json(429, r#"{"retry_after":3}"#)), secs(3));
        assert_eq!(classify(&json(429, r#"{"retry_after":"2"}"#)), secs(2));
        let both = answer(429, "application/json", r#"{"retry_after":2}"#, Some("9"));
        assert_eq!(classify(&both), secs(2), "the body's value wins");
        let header = answer(429, "text/html", "<html>slow down</html>", Some("7"));
        assert_eq!(classify(&header), secs(7));
        assert_eq!(
            Classifier::new(DEFAULT).classify("k", &head(&header)),
            secs(7),
            "a streamed answer's header"
        );
        assert_eq!(classify(&html(429)), Class::RateLimited(DEFAULT));
        assert_eq!(
            classify(&json(429, r#"{"detail":"x"}"#)),
            Class::RateLimited(DEFAULT)
        );
        let negative = answer(429, "application/json", r#"{"retry_after":-1}"#, Some("x"));
        assert_eq!(classify(&negative), Class::RateLimited(DEFAULT));
    }

    #[test]
    fn an_html_403_is_a_block_a_json_403_a_permission_error() {
        assert_eq!(classify(&html(403)), Class::Blocked);
        assert_eq!(
            classify(&answer(403, "text/plain", "Forbidden", None)),
            Class::Blocked,
            "a body that is not JSON"
        );
        let denied = json(403, r#"{"title":"Forbidden","status":403}"#);
        assert_eq!(classify(&denied), Class::Answered);
        // A streamed answer: only its content type tells.
        let classifier = Classifier::new(DEFAULT);
        assert_eq!(classifier.classify("k", &head(&html(403))), Class::Blocked);
        assert_eq!(classifier.classify("k", &head(&denied)), Class::Answered);
    }

    #[test]
    fn any_403_soon_after_a_429_of_the_key_is_a_block() {
        let classifier = Classifier::new(DEFAULT);
        let denied = json(403, r#"{"title":"Forbidden","status":403}"#);
        classifier.classify("k", &json(429, r#"{"retry_after":1}"#));
        assert_eq!(classifier.classify("k", &denied), Class::Blocked);
        assert_eq!(classifier.classify("k", &head(&denied)), Class::Blocked);
        assert_eq!(
            classifier.classify("other", &denied),
            Class::Answered,
            "another key saw no 429"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_403_long_after_a_429_is_a_permission_error_again() {
        let classifier = Classifier::new(DEFAULT);
        classifier.classify("k", &html(429));
        tokio::time::advance(BLOCK_AFTER_429_WINDOW).await;
        let denied = json(403, r#"{"title":"Forbidden","status":403}"#);
        assert_eq!(classifier.classify("k", &denied), Class::Answered);
    }

    #[test]
    fn server_errors_and_other_answers() {
        for status in [500, 502, 503, 504] {
            assert_eq!(classify(&html(status)), Class::ServerError);
            assert_eq!(classify(&json(status, "{}")), Class::ServerError);
        }
        for status in [200, 204, 301, 400, 401, 404] {
            assert_eq!(classify(&json(status, "{}")), Class::Answered, "{status}");
        }
        assert_eq!(
            classify(&answer(200, "text/html", "<html></html>", None)),
            Class::Answered,
            "a 200 is the caller's to judge"
        );
    }
}
