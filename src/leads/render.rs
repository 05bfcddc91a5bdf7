//! Rendering the merged page as Kommo's HAL document.
//!
//! Lead objects are copied into the answer as the upstream sent them; the only change is to
//! their hrefs: moved to the proxy, and carrying the client's query as Kommo's item links carry
//! the list request's.

use crate::links::{ItemQuery, LinkRewrite};

use super::merge::LeadRef;

/// Where the page's own links point: the proxy's leads URL and the client's parameters.
#[derive(Debug, Clone, Copy)]
pub struct PageLinks<'a> {
    /// `{public url}/api/v4/leads`.
    pub base: &'a str,
    /// The client's raw parameters except `page`, in the client's order.
    pub params: &'a [String],
}

impl PageLinks<'_> {
    /// The href of page `page`.
    pub fn href(&self, page: u32) -> String {
        let mut href = String::with_capacity(self.base.len() + 16 + self.params.len() * 24);
        href.push_str(self.base);
        href.push('?');
        for p in self.params {
            href.push_str(p);
            href.push('&');
        }
        href.push_str("page=");
        href.push_str(&page.to_string());
        href
    }
}

/// Renders a `200` page: `_page`, `_links` (`self`, `first`, `prev` past the first page, `next`
/// only when another lead exists) and `_embedded.leads`.
pub fn render_page(
    page: u32,
    links: PageLinks<'_>,
    has_next: bool,
    leads: &[LeadRef],
    rewrite: &LinkRewrite,
    client_query: &str,
) -> Vec<u8> {
    let body_len: usize = leads.iter().map(|l| l.raw.len() + 1).sum();
    let mut out = Vec::with_capacity(body_len + 512);
    out.extend_from_slice(b"{\"_page\":");
    out.extend_from_slice(page.to_string().as_bytes());
    out.extend_from_slice(b",\"_links\":{");
    let link = |out: &mut Vec<u8>, name: &str, page: u32, first: bool| {
        if !first {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":{\"href\":");
        write_json_string(out, &links.href(page));
        out.push(b'}');
    };
    link(&mut out, "self", page, true);
    // No page follows `u32::MAX`: `next` is left out rather than overflowing.
    if let Some(next) = page.checked_add(1).filter(|_| has_next) {
        link(&mut out, "next", next, false);
    }
    link(&mut out, "first", 1, false);
    if page > 1 {
        link(&mut out, "prev", page - 1, false);
    }
    out.extend_from_slice(b"},\"_embedded\":{\"leads\":[");
    for (i, lead) in leads.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&rewrite.rewrite(&lead.raw, ItemQuery::All(client_query)));
    }
    out.extend_from_slice(b"]}}");
    out
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::Value;

    fn lead(id: i64, origin: &str, escaped: bool) -> LeadRef {
        let mut href = format!("{origin}/api/v4/leads/{id}?limit=250");
        if escaped {
            href = href.replace('/', "\\/");
        }
        LeadRef {
            id,
            sort: Some(id),
            raw: Bytes::from(format!(
                r#"{{"id":{id},"_links":{{"self":{{"href":"{href}"}}}}}}"#
            )),
        }
    }

    #[test]
    fn renders_kommo_shape_with_rewritten_hrefs() {
        let rw = LinkRewrite::new("https://a.kommo.com", "http://proxy:8080");
        let params = vec!["limit=2".to_string(), "filter%5Bid%5D=1".to_string()];
        let links = PageLinks {
            base: "http://proxy:8080/api/v4/leads",
            params: &params,
        };
        let leads = [
            lead(1, "https://a.kommo.com", false),
            lead(2, "https://a.kommo.com", true),
        ];
        let body = render_page(
            2,
            links,
            true,
            &leads,
            &rw,
            "limit=2&filter%5Bid%5D=1&page=2",
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["_page"], 2);
        assert_eq!(
            v["_links"]["next"]["href"],
            "http://proxy:8080/api/v4/leads?limit=2&filter%5Bid%5D=1&page=3"
        );
        assert_eq!(
            v["_links"]["prev"]["href"],
            "http://proxy:8080/api/v4/leads?limit=2&filter%5Bid%5D=1&page=1"
        );
        assert_eq!(
            v["_embedded"]["leads"][0]["_links"]["self"]["href"],
            "http://proxy:8080/api/v4/leads/1?limit=2&filter%5Bid%5D=1&page=2"
        );
        assert_eq!(
            v["_embedded"]["leads"][1]["_links"]["self"]["href"],
            "http://proxy:8080/api/v4/leads/2?limit=2&filter%5Bid%5D=1&page=2"
        );
    }

    #[test]
    fn first_and_last_pages() {
        let rw = LinkRewrite::new("x", "x");
        let links = PageLinks {
            base: "/l",
            params: &[],
        };
        let v: Value = serde_json::from_slice(&render_page(1, links, false, &[], &rw, "")).unwrap();
        assert!(v["_links"].get("prev").is_none());
        assert!(v["_links"].get("next").is_none());
        assert_eq!(v["_links"]["self"]["href"], "/l?page=1");
        assert_eq!(v["_embedded"]["leads"], serde_json::json!([]));
    }

    #[test]
    fn fuzz_last_possible_page_has_no_next_and_does_not_overflow() {
        // Found by fuzz/page_parse: `page + 1` overflowed (a panic with overflow checks, a
        // `page=0` link without) when the last possible page had a next one.
        let rw = LinkRewrite::new("x", "x");
        let links = PageLinks {
            base: "/l",
            params: &[],
        };
        let body = render_page(u32::MAX, links, true, &[], &rw, "");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v["_links"].get("next").is_none());
        assert_eq!(v["_links"]["prev"]["href"], "/l?page=4294967294");
        let v: Value =
            serde_json::from_slice(&render_page(u32::MAX - 1, links, true, &[], &rw, "")).unwrap();
        assert_eq!(v["_links"]["next"]["href"], "/l?page=4294967295");
    }
}
