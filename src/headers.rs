//! Header names and checks every stage shares: a leaf, importing nothing of the proxy's own.

use http::header::{self, HeaderMap, HeaderName};

/// The header that carries a request's id, from the client or generated, to the upstream and
/// back to the client.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1): never forwarded.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `headers` without hop-by-hop headers, including those the `Connection` header names.
pub fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    strip_hop_by_hop(&mut out);
    out
}

/// Removes hop-by-hop headers in place, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
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
    // Labels of 1 to 63 letters, digits and hyphens, separated by single dots.
    let mut label = 0;
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|c| {
            if c == b'.' {
                std::mem::replace(&mut label, 0) > 0
            } else {
                label += 1;
                label <= 63 && (c.is_ascii_alphanumeric() || c == b'-')
            }
        })
        && label > 0;
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.parse::<u16>().is_ok());
    name_ok && port_ok
}

/// The name of a `host[:port]`, lowercase: what routing by `Host` compares.
pub fn host_name(host: &str) -> String {
    let name = match host.rsplit_once(':') {
        // An IPv6 address keeps its brackets; a port follows them.
        Some((name, port)) if !port.contains(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    name.to_ascii_lowercase()
}

/// The name a request gives the proxy, when it is a valid host[:port]: `forwarded`
/// (`X-Forwarded-Host`, only behind `--trust-forwarded`) first, else `host` (the `Host`
/// header) or, without one, the target's `authority` (HTTP/2 `:authority`). `true` with a
/// forwarded name. An invalid `Host` is not replaced by the authority.
pub fn request_host<'a>(
    forwarded: Option<&'a str>,
    host: Option<&'a str>,
    authority: Option<&'a str>,
) -> Option<(&'a str, bool)> {
    if let Some(name) = forwarded.filter(|f| valid_host(f)) {
        return Some((name, true));
    }
    host.or(authority)
        .filter(|h| valid_host(h))
        .map(|h| (h, false))
}

/// The token of an `Authorization: Bearer <token>` header (scheme in any case, the token
/// trimmed), if the request carries one.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case("bearer ")
        .then(|| value[7..].trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn the_bearer_token_is_read_in_any_case_of_the_scheme() {
        let with = |v: &'static str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, HeaderValue::from_static(v));
            h
        };
        assert_eq!(bearer(&with("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&with("bEaReR  abc ")), Some("abc"));
        assert_eq!(bearer(&with("Basic abc")), None);
        assert_eq!(bearer(&with("Bear")), None);
        assert_eq!(bearer(&http::HeaderMap::new()), None);
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        for name in ["te", "trailer", "proxy-authorization", "proxy-authenticate"] {
            h.append(name, HeaderValue::from_static("x"));
            h.append(name, HeaderValue::from_static("y"));
        }
        let out = end_to_end(&h);
        assert_eq!(out.len(), 1);
        assert_eq!(out[header::AUTHORIZATION], "Bearer t");
    }

    #[test]
    fn connection_options_alone_remove_only_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, close"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-close", HeaderValue::from_static("kept"));
        let out = end_to_end(&h);
        assert_eq!(out.len(), 2);
        assert_eq!(out[header::CONTENT_TYPE], "application/json");
        assert_eq!(out["x-close"], "kept");

        let mut plain = HeaderMap::new();
        plain.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        assert_eq!(end_to_end(&plain), plain);
    }

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
            ".a",
            "a.",
            "é.com",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
        let label = "a".repeat(63);
        assert!(valid_host(&format!("{label}.com:8080")));
        assert!(!valid_host(&format!("{label}a.com")));
        let long = ["ab"; 85].join(".");
        assert_eq!(long.len(), 254);
        assert!(!valid_host(&long), "a name of 254 bytes");
        assert!(valid_host(&long[1..]), "a name of 253 bytes");
    }
}
