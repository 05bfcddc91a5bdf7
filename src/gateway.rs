//! The gateway's shared state and the per-request context every handler reads.

use http::header::{self, HeaderMap, HeaderName};
use http::request::Parts;

use crate::leads::hal::OriginRewrite;
use crate::leads::query::QueryLimits;
use crate::upstream::{Buffered, Upstream, UpstreamError};

/// Settings of the request path, validated before anything is bound.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// The base URL clients reach the proxy at (`--public-url`), without a trailing slash.
    /// When absent, links are built from the request's validated `Host`.
    pub public_url: Option<String>,
    /// At most this many distinct stages per leads request.
    pub max_pairs: usize,
}

/// What every request handler shares.
pub struct Gateway {
    /// The only way out: a client for the configured origin.
    pub upstream: Upstream,
    pub settings: GatewaySettings,
}

/// What one client request carries into the fetches it causes.
pub struct RequestContext {
    /// The client's headers as they are sent upstream with buffered GETs.
    pub upstream_headers: HeaderMap,
    /// The proxy's base URL as this client reaches it.
    pub public_base: String,
    /// Moves upstream hrefs to `public_base`.
    pub rewrite: OriginRewrite,
}

/// Headers of the client's request that reach the upstream with the GETs the proxy makes on
/// its behalf. A whitelist: conditional and encoding headers would change what the proxy has
/// to parse, and nothing else of the client's request concerns Kommo.
const UPSTREAM_GET_HEADERS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::ACCEPT_LANGUAGE,
    header::USER_AGENT,
    HeaderName::from_static("x-request-id"),
];

impl Gateway {
    pub fn query_limits(&self) -> QueryLimits {
        QueryLimits {
            max_pairs: self.settings.max_pairs,
        }
    }

    /// The context of one client request.
    pub fn context(&self, parts: &Parts) -> RequestContext {
        let mut upstream_headers = HeaderMap::new();
        for name in UPSTREAM_GET_HEADERS {
            for v in parts.headers.get_all(&name) {
                upstream_headers.append(name.clone(), v.clone());
            }
        }
        let public_base = self.public_base(&parts.headers);
        let rewrite = OriginRewrite::new(&self.upstream.origin().url, &public_base);
        RequestContext {
            upstream_headers,
            public_base,
            rewrite,
        }
    }

    /// The base URL links in answers use: `--public-url`, else `http://` and the request's
    /// `Host` when it is a plain host name or address with an optional port, else the
    /// upstream origin unchanged (nothing better is known).
    pub fn public_base(&self, headers: &HeaderMap) -> String {
        if let Some(url) = &self.settings.public_url {
            return url.clone();
        }
        match headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| valid_host(h))
        {
            Some(host) => format!("http://{host}"),
            None => self.upstream.origin().url.clone(),
        }
    }

    /// A buffered GET of `target` at the upstream on behalf of a client request.
    pub async fn get(&self, ctx: &RequestContext, target: &str) -> Result<Buffered, UpstreamError> {
        self.upstream
            .get(target, ctx.upstream_headers.clone())
            .await
    }
}

/// A `Host` value fit to appear in links: a DNS name or IPv4 address, or a bracketed IPv6
/// address, with an optional numeric port. Anything else (spaces, slashes, `@`, quotes) is
/// refused, so a client cannot inject markup or another origin into the links.
pub fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return false;
        };
        if addr.is_empty()
            || !addr
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(port) => ("x", Some(port)),
                None => return false,
            },
        }
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    name_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::valid_host;

    #[test]
    fn hosts() {
        for ok in [
            "localhost",
            "127.0.0.1:8080",
            "proxy.internal",
            "[::1]:8080",
            "[::1]",
            "a-b.c",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "evil.com/x",
            "user@host",
            "h:port",
            "h:",
            "[::1",
            "a..b",
            "h:99999",
            "\"x",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
    }
}
