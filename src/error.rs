//! The one place where failures become HTTP answers: `application/problem+json` bodies
//! (RFC 9457) in the shape Kommo itself uses (`type`, `title`, `status`, `detail`).

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde_json::{json, Value};

use crate::body::{self, ProxyBody};
use crate::leads::query::{InvalidParam, StagePair};
use crate::upstream::fetch::FetchError;
use crate::upstream::limiter::LimitError;
use crate::upstream::UpstreamError;

/// The content type of every error the proxy itself produces.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One fan-out stream that did not deliver its leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFailure {
    /// The stage the stream was reading.
    pub pair: StagePair,
    /// The upstream status, when the upstream answered at all.
    pub status: Option<u16>,
    /// What went wrong.
    pub reason: String,
}

/// A failure that ends a client request with an error answer.
#[derive(Debug, Clone)]
pub enum ProxyError {
    /// The client's query is invalid: `400` naming every bad parameter.
    InvalidQuery(Vec<InvalidParam>),
    /// One or more fan-out streams failed: `502` naming each; never a partial `200`.
    StreamsFailed(Vec<StreamFailure>),
    /// A single upstream request failed without an HTTP answer: `502`.
    Upstream(UpstreamError),
    /// The upstream answered something the proxy cannot use: `502`.
    BadUpstreamAnswer(String),
    /// The request breaks a bound (`413`, `414`, `431`, or `400` for too many parameters).
    Rejected(StatusCode, String),
    /// The request is not something this proxy serves (e.g. `CONNECT`): `405`.
    MethodNotAllowed(String),
    /// The proxy cannot serve now; the client may retry after the hint.
    Unavailable {
        detail: String,
        retry_after: Option<Duration>,
    },
    /// This client exceeded its inbound quota: `429` with `Retry-After`.
    TooManyRequests {
        detail: String,
        retry_after: Duration,
    },
    /// The request did not complete in time: `504`.
    Timeout(String),
    /// A bug or an impossible state, reported instead of panicking: `500`.
    Internal(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::InvalidQuery(_) => StatusCode::BAD_REQUEST,
            ProxyError::StreamsFailed(_)
            | ProxyError::Upstream(_)
            | ProxyError::BadUpstreamAnswer(_) => StatusCode::BAD_GATEWAY,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Rejected(status, _) => *status,
            ProxyError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `problem+json` answer for this failure.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let mut retry_after = None;
        let (detail, extra) = match self {
            ProxyError::InvalidQuery(params) => {
                let list: Vec<Value> = params
                    .iter()
                    .map(|p| json!({"name": p.name, "reason": p.reason}))
                    .collect();
                let detail = match params.as_slice() {
                    [one] => format!("invalid parameter {}: {}", one.name, one.reason),
                    _ => format!(
                        "{} invalid parameters: {}",
                        params.len(),
                        params
                            .iter()
                            .map(|p| p.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                (detail, Some(("invalid-params", Value::Array(list))))
            }
            ProxyError::StreamsFailed(failures) => {
                let list: Vec<Value> = failures
                    .iter()
                    .map(|f| {
                        json!({"pipeline_id": f.pair.pipeline_id, "status_id": f.pair.status_id,
                               "upstream_status": f.status, "reason": f.reason})
                    })
                    .collect();
                let detail = format!(
                    "{} of the requested stages could not be read from the upstream, so no partial list is returned: {}",
                    failures.len(),
                    failures
                        .iter()
                        .map(|f| match f.status {
                            Some(s) => format!("({}) upstream status {s}: {}", f.pair, f.reason),
                            None => format!("({}) {}", f.pair, f.reason),
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                );
                (detail, Some(("failed-stages", Value::Array(list))))
            }
            ProxyError::Upstream(e) => (e.to_string(), None),
            ProxyError::BadUpstreamAnswer(d)
            | ProxyError::Rejected(_, d)
            | ProxyError::MethodNotAllowed(d)
            | ProxyError::Timeout(d)
            | ProxyError::Internal(d) => (d, None),
            ProxyError::Unavailable {
                detail,
                retry_after: hint,
            } => {
                retry_after = hint;
                (detail, None)
            }
            ProxyError::TooManyRequests {
                detail,
                retry_after: hint,
            } => {
                retry_after = Some(hint);
                (detail, None)
            }
        };
        let mut resp = problem(status, &detail, extra);
        if let Some(after) = retry_after {
            // Whole seconds, rounded up: a client that waits the hint must find room.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        ProxyError::Upstream(e)
    }
}

impl From<FetchError> for ProxyError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Transport(e) => ProxyError::Upstream(e),
            FetchError::Status(b) => {
                ProxyError::BadUpstreamAnswer(format!("the upstream answered {}", b.status))
            }
            FetchError::Unusable { reason } => ProxyError::BadUpstreamAnswer(reason),
            FetchError::RateLimited { retry_after } => ProxyError::Unavailable {
                detail: format!(
                    "the Kommo account's rate limit asks to wait {}s, longer than this request may take; try again then",
                    retry_after.as_secs_f64().ceil()
                ),
                retry_after: Some(retry_after),
            },
            FetchError::Limited(LimitError::Timeout { retry_after }) => ProxyError::Unavailable {
                detail: "the upstream request budget (--rate-limit per --rate-window) is taken by requests queued ahead of this one; no slot came within --max-wait".into(),
                retry_after: Some(retry_after),
            },
            FetchError::Limited(LimitError::Blocked { retry_after }) => ProxyError::Unavailable {
                detail: "Kommo answered like a block of this proxy's address (403), so no requests are sent to it until the cool-down (--block-cooldown) ends".into(),
                retry_after: Some(retry_after),
            },
        }
    }
}

/// A `problem+json` response with `detail` and an optional extension member.
pub fn problem(
    status: StatusCode,
    detail: &str,
    extra: Option<(&str, Value)>,
) -> Response<ProxyBody> {
    let mut body = json!({
        "type": format!("https://httpstatus.es/{}", status.as_u16()),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some((key, value)), Some(obj)) = (extra, body.as_object_mut()) {
        obj.insert(key.to_string(), value);
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut resp = Response::new(body::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(resp: Response<ProxyBody>) -> Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn invalid_query_lists_every_parameter() {
        let e = ProxyError::InvalidQuery(vec![
            InvalidParam {
                name: "limit".into(),
                reason: "too big".into(),
            },
            InvalidParam {
                name: "page".into(),
                reason: "zero".into(),
            },
        ]);
        let resp = e.into_response();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let v = body_json(resp).await;
        assert_eq!(v["status"], 400);
        assert_eq!(v["invalid-params"][1]["name"], "page");
        assert!(v["detail"].as_str().unwrap().contains("limit, page"));
    }

    #[tokio::test]
    async fn stream_failures_name_the_pair_and_status() {
        let e = ProxyError::StreamsFailed(vec![StreamFailure {
            pair: StagePair {
                pipeline_id: 3,
                status_id: 142,
            },
            status: Some(500),
            reason: "internal error".into(),
        }]);
        let v = body_json(e.into_response()).await;
        assert_eq!(v["status"], 502);
        assert_eq!(v["failed-stages"][0]["upstream_status"], 500);
        assert!(v["detail"]
            .as_str()
            .unwrap()
            .contains("pipeline_id=3 status_id=142"));
    }

    #[tokio::test]
    async fn unavailable_carries_retry_after_rounded_up() {
        let e = ProxyError::Unavailable {
            detail: "busy".into(),
            retry_after: Some(Duration::from_millis(1200)),
        };
        let resp = e.into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
    }
}
