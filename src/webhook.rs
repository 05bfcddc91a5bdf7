//! Kommo's lead webhooks on the admin listener: a lead changed, so cached views are stale.
//!
//! Kommo posts `application/x-www-form-urlencoded` bodies such as
//! `leads[status][0][id]=1&leads[status][0][status_id]=142&account[subdomain]=example`. Any lead
//! event drops every cached entry of the account this proxy fronts: the next poll of every view
//! reads fresh pages instead of waiting out the TTL.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tracing::{info, warn};

use crate::body::{self, ProxyBody};
use crate::error::problem;

/// Where Kommo is configured to post.
pub const PATH: &str = "/webhooks/kommo";

/// The header that may carry the secret instead of the `secret` query parameter.
pub const SECRET_HEADER: &str = "x-webhook-secret";

/// Kommo's webhook bodies are small; anything larger is not one.
const MAX_BODY: usize = 256 * 1024;

/// Handles one webhook delivery: `invalidate` drops the cached entries of the account when the
/// delivery reports a lead event.
pub async fn receive<F: std::future::Future<Output = ()>>(
    secret: &str,
    req: Request<Incoming>,
    invalidate: impl FnOnce() -> F,
) -> Response<ProxyBody> {
    let given = req
        .headers()
        .get(SECRET_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .find(|(k, _)| k == "secret")
                .map(|(_, v)| v.into_owned())
        });
    if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), secret.as_bytes())) {
        warn!("webhook with a missing or wrong secret refused");
        return problem(
            StatusCode::UNAUTHORIZED,
            "missing or wrong webhook secret",
            None,
        );
    }
    let body: Bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "a Kommo webhook body is at most a few kilobytes",
                None,
            )
        }
    };
    let lead_events = lead_events(&body);
    if lead_events > 0 {
        invalidate().await;
        info!(
            lead_events,
            "Kommo webhook: dropped the cached entries of the account"
        );
    }
    let mut resp = Response::new(body::full(format!("{{\"lead_events\":{lead_events}}}")));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// How many lead events (`leads[<event>][<n>][id]`) the body reports.
pub fn lead_events(body: &[u8]) -> usize {
    form_urlencoded::parse(body)
        .filter(|(k, _)| k.starts_with("leads[") && k.ends_with("[id]"))
        .count()
}

/// Compares without an early exit, so the time taken says nothing about the secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lead_events_only() {
        let body = b"leads%5Bstatus%5D%5B0%5D%5Bid%5D=5&leads[status][0][status_id]=142&leads[update][0][id]=6&contacts[add][0][id]=9&account[subdomain]=x";
        assert_eq!(lead_events(body), 2);
        assert_eq!(lead_events(b"account[id]=1"), 0);
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
