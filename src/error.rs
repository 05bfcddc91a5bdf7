//! The one place where failures become HTTP answers: `application/problem+json` bodies
//! (RFC 9457) in the shape Kommo itself uses (`type`, `title`, `status`, `detail`).

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde_json::{json, Value};

use crate::body::{self, ProxyBody};
use crate::credentials::CredentialError;
use crate::leads::plan::OverBudget;
use crate::leads::query::{InvalidParam, StagePair};
use crate::upstream::admission::Refusal;
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
    /// The page would take more upstream requests than one request may cause
    /// (`--max-upstream-per-request`): `400` naming `page`, with what it would take and how
    /// to ask for it cheaply. `cache`: whether pages read are cached (walking pages in order
    /// then costs little).
    OverBudget {
        page: u32,
        cache: bool,
        over: OverBudget,
    },
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
            ProxyError::InvalidQuery(_) | ProxyError::OverBudget { .. } => StatusCode::BAD_REQUEST,
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
        let retry_after = match self {
            ProxyError::Unavailable { retry_after, .. } => retry_after,
            ProxyError::TooManyRequests { retry_after, .. } => Some(retry_after),
            _ => None,
        };
        let (detail, extra) = match self {
            ProxyError::InvalidQuery(params) => {
                let list: Vec<Value> = params
                    .iter()
                    .map(|p| json!({"name": p.name, "reason": p.reason}))
                    .collect();
                let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
                let detail = match params.as_slice() {
                    [one] => format!("invalid parameter {}: {}", one.name, one.reason),
                    _ => format!("{} invalid parameters: {}", names.len(), names.join(", ")),
                };
                (detail, Some(("invalid-params", Value::Array(list))))
            }
            ProxyError::OverBudget { page, cache, over } => over_budget(page, cache, &over),
            ProxyError::StreamsFailed(failures) => {
                let list: Vec<Value> = failures
                    .iter()
                    .map(|f| {
                        json!({"pipeline_id": f.pair.pipeline_id, "status_id": f.pair.status_id,
                               "upstream_status": f.status, "reason": f.reason})
                    })
                    .collect();
                let each: Vec<String> = failures
                    .iter()
                    .map(|f| match f.status {
                        Some(s) => format!("({}) upstream status {s}: {}", f.pair, f.reason),
                        None => format!("({}) {}", f.pair, f.reason),
                    })
                    .collect();
                let detail = format!(
                    "{} of the requested stages could not be read from the upstream, so no partial list is returned: {}",
                    failures.len(),
                    each.join("; ")
                );
                (detail, Some(("failed-stages", Value::Array(list))))
            }
            ProxyError::Upstream(e) => (e.to_string(), None),
            ProxyError::BadUpstreamAnswer(d)
            | ProxyError::Rejected(_, d)
            | ProxyError::MethodNotAllowed(d)
            | ProxyError::Timeout(d)
            | ProxyError::Internal(d)
            | ProxyError::Unavailable { detail: d, .. }
            | ProxyError::TooManyRequests { detail: d, .. } => (d, None),
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

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.status())
    }
}

/// So a layer of the client edge can refuse a request with it (see [`crate::server::edge`]).
impl std::error::Error for ProxyError {}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        ProxyError::Upstream(e)
    }
}

impl From<Refusal> for ProxyError {
    fn from(r: Refusal) -> Self {
        let secs = r.busy_for.as_secs_f64().ceil();
        ProxyError::Unavailable {
            detail: format!(
                "the Kommo account's upstream budget (--rate-limit per --rate-window) is fully booked for about {secs}s by requests admitted before this one, so this request's {} upstream request(s) could not all start within --max-wait (or --request-timeout); nothing was sent, try again then",
                r.cost
            ),
            retry_after: Some(r.busy_for),
        }
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
            FetchError::Credential(CredentialError::Refused(reason)) => ProxyError::Unavailable {
                detail: format!(
                    "nothing is sent to Kommo with the account's credential until a person acts: {reason}"
                ),
                retry_after: None,
            },
            FetchError::Credential(CredentialError::Unavailable(reason)) => ProxyError::Unavailable {
                detail: format!("the account's credential is not available: {reason}"),
                retry_after: Some(Duration::from_secs(5)),
            },
        }
    }
}

/// The `detail` and `invalid-params` of a page refused for its upstream cost.
fn over_budget(
    page: u32,
    cache: bool,
    over: &OverBudget,
) -> (String, Option<(&'static str, Value)>) {
    let at = &over.at;
    let cost = match over.estimate {
        Some(estimate) => format!(
            "about {estimate} upstream requests if the view holds that many leads (going by the {} leads the merge passed in {} upstream pages on its way to lead {}), more than",
            at.passed, at.pages_read, at.target
        ),
        None => "more upstream requests than".into(),
    };
    let walk = if cache {
        "walk the pages in order (pages already read are cached, so page N+1 after page N costs little)"
    } else {
        "walk the pages in order with the page cache on (it is off: --cache-ttl 0)"
    };
    let detail = format!(
        "page {page} of this view would take {cost} one request may cause (--max-upstream-per-request {}): {} were sent, and the next reads, up to {} more, were not. Narrow the view with filters, {walk}, or ask for fewer stages.",
        over.limit, at.spent, at.batch
    );
    let reason = format!(
        "reaching this page takes more than {} upstream requests (--max-upstream-per-request)",
        over.limit
    );
    let params = json!([{"name": "page", "reason": reason}]);
    (detail, Some(("invalid-params", params)))
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
    async fn over_budget_names_page_the_cost_and_the_advice() {
        use crate::leads::plan::MergeProgress;
        let over = OverBudget {
            limit: 10,
            at: MergeProgress {
                spent: 9,
                batch: 2,
                pages_read: 9,
                passed: 2_000,
                target: 500_000,
            },
            estimate: Some(2_250),
        };
        let e = ProxyError::OverBudget {
            page: 10_000,
            cache: true,
            over,
        };
        let resp = e.into_response();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
        let v = body_json(resp).await;
        assert_eq!(v["invalid-params"][0]["name"], "page");
        let detail = v["detail"].as_str().unwrap();
        for needle in [
            "page 10000",
            "about 2250 upstream requests",
            "--max-upstream-per-request 10",
            "9 were sent",
            "up to 2 more",
            "filters",
            "in order",
            "fewer stages",
        ] {
            assert!(detail.contains(needle), "{needle}: {detail}");
        }
        let e = ProxyError::OverBudget {
            page: 1,
            cache: false,
            over: OverBudget {
                estimate: None,
                ..over
            },
        };
        let v = body_json(e.into_response()).await;
        let detail = v["detail"].as_str().unwrap();
        assert!(
            detail.contains("would take more upstream requests than"),
            "{detail}"
        );
        assert!(detail.contains("--cache-ttl 0"), "{detail}");
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

    #[tokio::test]
    async fn a_refused_admission_says_how_long_the_budget_is_booked() {
        let e = ProxyError::from(Refusal {
            cost: 6,
            busy_for: Duration::from_millis(12_300),
        });
        let resp = e.into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "13");
        let detail = body_json(resp).await["detail"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(detail.contains("fully booked for about 13s"), "{detail}");
        assert!(detail.contains("6 upstream request(s)"), "{detail}");
    }
}
