//! Keeping every link at the proxy: hrefs at the upstream's origin in JSON answers, and
//! `Location` headers, are moved to the proxy's base URL.
//!
//! Links are found by meaning, not by bytes: any string value of a member named `href`,
//! wherever it sits and however the JSON is spelled (see [`crate::json_text`]), whose URL has
//! the upstream's origin (scheme and host in any case, the default port written or not).

use std::borrow::Cow;

use crate::json_text::{edit_strings, Edit, Seg};

/// Moves links from the upstream's origin to the proxy's base URL.
#[derive(Debug, Clone)]
pub struct LinkRewrite {
    /// The upstream's origin URL, to recognise its URLs (see [`Origin`]).
    upstream: String,
    /// The proxy's base URL as the client reaches it, without a trailing slash.
    public: String,
}

/// Which query the links of items carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemQuery<'q> {
    /// As the upstream wrote them.
    Kept,
    /// Kommo writes the list request's query into each item's links; when the upstream request
    /// was not the client's, the links of items (everything but the page's own top-level
    /// `_links`) get the client's query instead.
    Items(&'q str),
    /// As `Items`, for one item object on its own: all its links.
    All(&'q str),
}

impl LinkRewrite {
    /// A rewrite from `upstream` (e.g. `https://a.kommo.com`) to `public` (e.g.
    /// `http://127.0.0.1:8080`).
    pub fn new(upstream: &str, public: &str) -> Self {
        LinkRewrite {
            upstream: upstream.to_string(),
            public: public.trim_end_matches('/').to_string(),
        }
    }

    /// `json` with every upstream href moved to the proxy, and item links carrying `query`.
    /// A text that is not valid JSON comes back unchanged (it has no links to follow).
    pub fn rewrite<'a>(&self, json: &'a [u8], query: ItemQuery<'_>) -> Cow<'a, [u8]> {
        let edited = edit_strings(json, |v| {
            if v.key() != Some("href") {
                return Edit::Keep;
            }
            let Some(len) = self.prefix_len(v.text) else {
                return Edit::Keep;
            };
            let page_links = v.path.first() == Some(&Seg::Key("_links".into()));
            let item_query = match query {
                ItemQuery::Kept => None,
                ItemQuery::All(q) => Some(q),
                ItemQuery::Items(q) => (!page_links).then_some(q),
            };
            let rest = &v.text[len..];
            match item_query {
                // Only a link that carries a query gets the client's.
                Some(q) if rest.contains('?') => {
                    let (path, fragment) = split_at_any(rest, '#');
                    let (path, _) = split_at_any(path, '?');
                    let mark = if q.is_empty() { "" } else { "?" };
                    Edit::Replace(format!("{}{path}{mark}{q}{fragment}", self.public))
                }
                _ => Edit::ReplacePrefix {
                    len,
                    with: self.public.clone(),
                },
            }
        });
        edited.unwrap_or(Cow::Borrowed(json))
    }

    /// How many leading bytes of `url` spell the upstream's origin, if `url` is at it.
    fn prefix_len(&self, url: &str) -> Option<usize> {
        let (upstream, _) = Origin::split(&self.upstream)?;
        Origin::split(url)
            .filter(|(o, _)| o.same(&upstream))
            .map(|(_, len)| len)
    }

    /// A `Location` value at the upstream's origin, moved to the proxy.
    pub fn location(&self, value: &str) -> Option<String> {
        let len = self.prefix_len(value)?;
        Some(format!("{}{}", self.public, &value[len..]))
    }
}

/// Whether an answer's body is JSON, whose links are moved: `application/json`, and any
/// `+json` type (`application/hal+json`, `application/problem+json`), parameters ignored.
pub fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .is_some_and(|media| media == "application/json" || media.ends_with("+json"))
}

/// `s` split before the first `c` (the second part starts with `c`), or `(s, "")`.
fn split_at_any(s: &str, c: char) -> (&str, &str) {
    s.find(c).map_or((s, ""), |at| s.split_at(at))
}

/// Scheme, host and port of a URL, compared by meaning: scheme and host in any case, the
/// scheme's default port written or not.
#[derive(Debug, Clone, Copy)]
struct Origin<'a> {
    scheme: &'a str,
    host: &'a str,
    /// Explicit, or the scheme's default.
    port: Option<u16>,
}

impl<'a> Origin<'a> {
    /// The origin of `url` and the length of the part of `url` that spells it. Borrows: every
    /// href of every answer passes here.
    fn split(url: &'a str) -> Option<(Origin<'a>, usize)> {
        let (scheme, rest) = url.split_once("://")?;
        let scheme_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.');
        if scheme.is_empty() || !scheme.bytes().all(scheme_byte) {
            return None;
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let authority = &rest[..end];
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, "")) => (host, None),
            Some((host, port)) if !port.contains(']') => (host, Some(port.parse::<u16>().ok()?)),
            _ => (authority, None),
        };
        let defaults = [("http", 80), ("https", 443)];
        let default = defaults
            .iter()
            .find(|(s, _)| scheme.eq_ignore_ascii_case(s));
        let origin = Origin {
            scheme,
            host,
            port: port.or(default.map(|(_, port)| *port)),
        };
        Some((origin, url.len() - rest.len() + end))
    }

    fn same(&self, other: &Origin<'_>) -> bool {
        self.scheme.eq_ignore_ascii_case(other.scheme)
            && self.host.eq_ignore_ascii_case(other.host)
            && self.port == other.port
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn rw() -> LinkRewrite {
        LinkRewrite::new("https://a.kommo.com", "http://proxy:8080")
    }

    fn hrefs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("href", Value::String(s)) => out.push(s.clone()),
                        _ => hrefs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| hrefs(v, out)),
            _ => {}
        }
    }

    /// Every href in `body`, sorted.
    fn all_hrefs(body: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        hrefs(&serde_json::from_slice(body).unwrap(), &mut out);
        out.sort();
        out
    }

    #[test]
    fn moves_hrefs_in_every_spelling_and_nothing_else() {
        let bodies = [
            r#"{"_links":{"next":{"href":"https://a.kommo.com/api/v4/contacts?page=2"}},"name":"https://a.kommo.com/x"}"#,
            "{\n    \"_links\": {\n        \"next\": {\n            \"href\": \"https:\\/\\/a.kommo.com\\/api\\/v4\\/contacts?page=2\"\n        }\n    },\n    \"name\": \"https://a.kommo.com/x\"\n}",
            r#"{"name":"https://a.kommo.com/x","_links":{"next":{"hr\u0065f":"HTTPS://A.Kommo.COM:443/api/v4/contacts?page=2"}}}"#,
        ];
        for body in bodies {
            let out = rw().rewrite(body.as_bytes(), ItemQuery::Kept);
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(
                v["_links"]["next"]["href"], "http://proxy:8080/api/v4/contacts?page=2",
                "{body}"
            );
            // Data that merely holds the URL is not a link.
            assert_eq!(v["name"], "https://a.kommo.com/x");
        }
    }

    #[test]
    fn other_origins_and_relative_links_stay() {
        let body = br#"{"a":{"href":"https://a.kommo.com.evil/x"},"b":{"href":"http://a.kommo.com/x"},"c":{"href":"/api/v4/leads"},"d":{"href":"https://a.kommo.com:8443/x"},"e":{"href":"https://u@a.kommo.com/x"}}"#;
        assert!(matches!(
            rw().rewrite(body, ItemQuery::Kept),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn an_origin_alone_and_with_a_query_is_moved() {
        let body = br#"[{"href":"https://a.kommo.com"},{"href":"https://a.kommo.com?x=1"}]"#;
        assert_eq!(
            all_hrefs(&rw().rewrite(body, ItemQuery::Kept)),
            vec!["http://proxy:8080", "http://proxy:8080?x=1"]
        );
    }

    #[test]
    fn item_links_carry_the_clients_query() {
        let body = r#"{"_links":{"self":{"href":"https://a.kommo.com/api/v4/leads?limit=250&page=1"}},"_embedded":{"leads":[{"id":1,"_links":{"self":{"href":"https:\/\/a.kommo.com\/api\/v4\/leads\/1?limit=250\u0026page=1"}},"_embedded":{"contacts":[{"id":7,"_links":{"self":{"href":"https://a.kommo.com/api/v4/contacts/7?limit=250#x"}}}],"tags":[{"href":"https://a.kommo.com/api/v4/tags/1"}]}}]}}"#;
        let client = "filter[statuses][0][status_id]=1&a=%26";
        let out = rw().rewrite(body.as_bytes(), ItemQuery::Items(client));
        assert_eq!(
            all_hrefs(&out),
            vec![
                format!("http://proxy:8080/api/v4/contacts/7?{client}#x"),
                format!("http://proxy:8080/api/v4/leads/1?{client}"),
                "http://proxy:8080/api/v4/leads?limit=250&page=1".to_string(),
                "http://proxy:8080/api/v4/tags/1".to_string(),
            ]
        );
        // The replaced link is spelled as the upstream spelled it.
        let text = String::from_utf8(out.into_owned()).unwrap();
        assert!(text.contains(r#""http:\/\/proxy:8080\/api\/v4\/leads\/1?filter[statuses][0][status_id]=1\u0026a=%26""#), "{text}");
        let lead = br#"{"id":1,"_links":{"self":{"href":"https://a.kommo.com/api/v4/leads/1?limit=250"}}}"#;
        assert_eq!(
            all_hrefs(&rw().rewrite(lead, ItemQuery::All("x=1"))),
            vec!["http://proxy:8080/api/v4/leads/1?x=1"]
        );
    }

    #[test]
    fn non_json_is_left_alone() {
        let html = b"<html><a href=\"https://a.kommo.com/\">x</a></html>";
        assert_eq!(&rw().rewrite(html, ItemQuery::Kept)[..], &html[..]);
    }

    #[test]
    fn json_types_are_told_by_their_media_type() {
        let with = |ct: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            is_json(&h)
        };
        for ct in [
            "application/json",
            "application/hal+json",
            "Application/Problem+JSON; charset=utf-8",
        ] {
            assert!(with(ct), "{ct}");
        }
        for ct in ["text/html", "application/jsonx", "text/plain; note=json"] {
            assert!(!with(ct), "{ct}");
        }
        assert!(!is_json(&http::HeaderMap::new()));
    }

    #[test]
    fn locations_move_by_origin() {
        assert_eq!(
            rw().location("https://A.kommo.com/oauth?x=1").as_deref(),
            Some("http://proxy:8080/oauth?x=1")
        );
        assert_eq!(rw().location("https://b.kommo.com/oauth"), None);
        assert_eq!(rw().location("/relative"), None);
    }
}
