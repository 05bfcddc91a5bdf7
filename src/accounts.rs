//! Several Kommo accounts behind one proxy: which account's gateway answers a request.
//!
//! Each account has its own [`Gateway`] (upstream, budget, cache, replicas, credential). A
//! request reaches an account by its `Host` when the account sets one, else by the first path
//! segment, `/NAME/api/v4/...`, which is stripped before the request is handled and kept in
//! every link of the answer. In single-account mode there is one gateway and no prefix.

use std::sync::Arc;

use http::{Request, StatusCode};

use crate::error::ProxyError;
use crate::gateway::{BasePath, Gateway};
use crate::headers::{host_name, request_host};

/// One configured account.
pub struct Account {
    /// The name in `[accounts.NAME]`: the path prefix and the `account` metrics label.
    pub name: String,
    /// Requests with this `Host` (lowercase, no port) reach the account without a prefix.
    pub host: Option<String>,
    pub gateway: Arc<Gateway>,
}

/// The gateways the proxy serves.
pub struct Accounts {
    list: Vec<Account>,
    /// Whether the accounts are configured by name (routed), or one unnamed gateway serves all.
    named: bool,
}

/// The gateway a request was routed to, put in its extensions for the inner layers.
#[derive(Clone)]
pub struct Routed(pub Arc<Gateway>);

impl Accounts {
    /// Single-account mode: `gateway` answers every request, paths as they came.
    pub fn single(gateway: Arc<Gateway>) -> Accounts {
        let name = String::new();
        let list = vec![Account {
            name,
            host: None,
            gateway,
        }];
        Accounts { list, named: false }
    }

    /// The configured accounts (at least one).
    pub fn named(list: Vec<Account>) -> Accounts {
        Accounts { list, named: true }
    }

    /// The first account's gateway: its settings (bounds, timeouts) are the whole proxy's.
    pub fn front(&self) -> &Arc<Gateway> {
        &self.list[0].gateway
    }

    /// Whether accounts are configured by name.
    pub fn is_named(&self) -> bool {
        self.named
    }

    pub fn iter(&self) -> impl Iterator<Item = &Account> {
        self.list.iter()
    }

    /// The account of `req`, by `Host` (or, with `--trust-forwarded`, `X-Forwarded-Host`) or
    /// path prefix; a prefix is stripped from the request's target and kept as its
    /// [`BasePath`], so links in the answer keep it. An unknown host or prefix is a `404` that
    /// gives the number of accounts, never their names. (A key sent to an account whose
    /// clients bring their own tokens is refused by [`Gateway::authorize`].)
    pub fn route<B>(&self, req: &mut Request<B>) -> Result<&Account, ProxyError> {
        if !self.named {
            return Ok(&self.list[0]);
        }
        let header = |name| req.headers().get(name).and_then(|h| h.to_str().ok());
        let forwarded =
            header("x-forwarded-host").filter(|_| self.front().settings.trust_forwarded);
        let authority = req.uri().authority().map(|a| a.as_str());
        let named = request_host(forwarded, header(http::header::HOST.as_str()), authority);
        let host = named.map(|(host, _)| host);
        let keys = self
            .list
            .iter()
            .map(|a| (a.name.as_str(), a.host.as_deref()));
        let Some((index, prefix)) = choose(keys, host, req.uri().path()) else {
            return Err(ProxyError::Rejected(
                StatusCode::NOT_FOUND,
                format!(
                    "no account here: this proxy serves {} accounts, each at /NAME/api/v4/... or at its own host name; ask its operator for yours",
                    self.list.len()
                ),
            ));
        };
        let account = &self.list[index];
        if prefix > 0 {
            strip_prefix(req, prefix)?;
            let base = BasePath(format!("/{}", account.name).into());
            req.extensions_mut().insert(base);
        }
        Ok(account)
    }
}

/// Which of `accounts` (name, host) a request for `host` and `path` is for, and how many bytes
/// of the path are its `/NAME` prefix (0 when routed by host). A host an account sets wins;
/// else the first path segment names the account.
fn choose<'a>(
    accounts: impl Iterator<Item = (&'a str, Option<&'a str>)> + Clone,
    host: Option<&str>,
    path: &str,
) -> Option<(usize, usize)> {
    if let Some(host) = host.map(host_name) {
        if let Some(i) = accounts.clone().position(|(_, h)| h == Some(host.as_str())) {
            return Some((i, 0));
        }
    }
    let segment = path.strip_prefix('/')?.split('/').next()?;
    let i = accounts.clone().position(|(name, _)| name == segment)?;
    Some((i, segment.len() + 1))
}

/// Removes the first `len` bytes (the `/NAME` prefix) from the path of `req`'s target.
fn strip_prefix<B>(req: &mut Request<B>, len: usize) -> Result<(), ProxyError> {
    let bad =
        |_: String| ProxyError::Rejected(StatusCode::BAD_REQUEST, "invalid request target".into());
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let rest = &target[len.min(target.len())..];
    let rest = if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        rest.parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.to_string()))?,
    );
    *req.uri_mut() = http::Uri::from_parts(parts).map_err(|e| bad(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNTS: [(&str, Option<&str>); 3] = [
        ("acme", None),
        ("beta", Some("beta.example.internal")),
        ("api", None),
    ];

    fn pick(host: Option<&str>, path: &str) -> Option<(usize, usize)> {
        choose(ACCOUNTS.iter().copied(), host, path)
    }

    #[test]
    fn a_host_wins_then_the_first_path_segment() {
        let cases = [
            (Some("proxy:8080"), "/acme/api/v4/leads", Some((0, 5))),
            (None, "/acme", Some((0, 5))),
            (
                Some("BETA.example.internal:8080"),
                "/acme/api/v4/leads",
                Some((1, 0)),
            ),
            (Some("beta.example.internal"), "/api/v4/leads", Some((1, 0))),
            (Some("proxy"), "/beta/api/v4/leads", Some((1, 5))),
            (Some("proxy"), "/api/v4/leads", Some((2, 4))),
            (Some("proxy"), "/acmex/api/v4/leads", None),
            (Some("proxy"), "/ACME/api/v4/leads", None),
            (Some("other.example.internal"), "/", None),
            (None, "*", None),
        ];
        for (host, path, want) in cases {
            assert_eq!(pick(host, path), want, "{host:?} {path}");
        }
    }

    #[test]
    fn the_prefix_is_stripped_and_the_query_kept() {
        for (target, want) in [
            ("/acme/api/v4/leads?page=2", "/api/v4/leads?page=2"),
            ("/acme", "/"),
            ("/acme?x=1", "/?x=1"),
            (
                "http://proxy/acme/api/v4/account",
                "http://proxy/api/v4/account",
            ),
        ] {
            let mut req = Request::get(target).body(()).unwrap();
            strip_prefix(&mut req, 5).unwrap();
            assert_eq!(req.uri().to_string(), want);
        }
    }
}
