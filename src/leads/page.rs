//! Reading one upstream leads page without re-serializing it.
//!
//! Only `_embedded.leads` is read, and of each lead only `id` and the order field; every lead
//! is kept as a zero-copy slice of the upstream body so the answer can pass it through as sent.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::merge::LeadRef;
use super::query::OrderField;

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(borrow, rename = "_embedded")]
    embedded: Embedded<'a>,
}

#[derive(Deserialize)]
struct Embedded<'a> {
    #[serde(borrow)]
    leads: Vec<&'a RawValue>,
}

/// The fields the merge reads. Unknown fields are skipped by serde without building values.
#[derive(Deserialize)]
struct Keys {
    id: i64,
    #[serde(default)]
    created_at: Option<i64>,
    #[serde(default)]
    updated_at: Option<i64>,
}

/// Each lead object of a leads page (`_embedded.leads`), as sent, with the fields `F` reads of
/// it. `what` names the page in errors (`upstream page`), which are fit for a `502` detail.
pub fn leads_of<'a, F: Deserialize<'a>>(
    body: &'a [u8],
    what: &str,
    fields: &str,
) -> Result<Vec<(&'a RawValue, F)>, String> {
    let page: Page<'_> = serde_json::from_slice(body)
        .map_err(|e| format!("the {what} is not the expected HAL leads document: {e}"))?;
    page.embedded
        .leads
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            // serde reads a struct from a JSON array too (`[5]` as `{"id":5}`): a lead that is
            // not an object is no lead.
            if !raw.get().starts_with('{') {
                return Err(format!("lead {i} of the {what} is not a JSON object"));
            }
            let read = serde_json::from_str(raw.get())
                .map_err(|e| format!("lead {i} of the {what} has no usable {fields}: {e}"))?;
            Ok((raw, read))
        })
        .collect()
}

/// Parses a `200` leads page body into merge entries.
///
/// The error says what is wrong in words fit for a `502` detail.
pub fn parse_page(body: &Bytes, order_field: OrderField) -> Result<Vec<LeadRef>, String> {
    let base = body.as_ptr() as usize;
    let leads = leads_of::<Keys>(body, "upstream page", "id or order field")?;
    let entries = leads.into_iter().map(|(raw, keys)| {
        let sort = match order_field {
            OrderField::Id => Some(keys.id),
            OrderField::CreatedAt => keys.created_at,
            OrderField::UpdatedAt => keys.updated_at,
        };
        // `raw` borrows from `body`: its offset there lets the lead be kept as a slice of the
        // shared buffer instead of a copy.
        let start = raw.get().as_ptr() as usize - base;
        LeadRef {
            id: keys.id,
            sort,
            raw: body.slice(start..start + raw.get().len()),
        }
    });
    Ok(entries.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_leads_without_copying() {
        let body = Bytes::from_static(
            br#"{"_page":1,"_links":{},"_embedded":{"leads":[{"id":5,"created_at":10,"updated_at":11,"_embedded":{"tags":[{"id":1}]}},{"updated_at":3,"id":7,"created_at":null}]}}"#,
        );
        let leads = parse_page(&body, OrderField::CreatedAt).unwrap();
        assert_eq!(leads.len(), 2);
        assert_eq!((leads[0].id, leads[0].sort), (5, Some(10)));
        assert_eq!((leads[1].id, leads[1].sort), (7, None));
        assert_eq!(
            &leads[1].raw[..],
            br#"{"updated_at":3,"id":7,"created_at":null}"#
        );
        let by_update = parse_page(&body, OrderField::UpdatedAt).unwrap();
        assert_eq!(by_update[1].sort, Some(3));
    }

    #[test]
    fn malformed_pages_are_errors() {
        for body in [
            &br#"{"_embedded":{"leads":{"id":1}}}"#[..],
            br#"{"_embedded":{"leads":[{"name":"no id"}]}}"#,
            br#"{"_embedded":{"leads":[{"id":"5"}]}}"#,
            br#"{"_embedded":{"leads":[{"id":5,"created_at":"yesterday"}]}}"#,
            br#"{"_embedded":{"leads":[{"id":5}"#,
            br#"<html>blocked</html>"#,
            b"{\"_embedded\":{\"leads\":[{\"id\":5,\"name\":\"\xff\"}]}}",
        ] {
            let err = parse_page(&Bytes::copy_from_slice(body), OrderField::CreatedAt);
            assert!(err.is_err(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn fuzz_leads_that_are_not_objects_are_errors() {
        // Found by fuzz/page_parse: `[[[[1]]]]` parsed as a page holding the lead `[1]` with id 1,
        // since serde reads a struct from a sequence.
        for body in [
            &b"[[[[1]]    ]            ]"[..],
            br#"{"_embedded":{"leads":[[7,1,2]]}}"#,
            br#"{"_embedded":{"leads":[{"id":1},[2]]}}"#,
        ] {
            let err = parse_page(&Bytes::copy_from_slice(body), OrderField::Id);
            assert!(err.is_err(), "{}", String::from_utf8_lossy(body));
        }
        let ok = parse_page(
            &Bytes::from_static(br#"{"_embedded":{"leads":[ {"id":1} ]}}"#),
            OrderField::Id,
        )
        .unwrap();
        assert_eq!(&ok[0].raw[..], br#"{"id":1}"#);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let mut body = String::from(r#"{"_embedded":{"leads":[{"id":1,"x":"#);
        body.push_str(&"[".repeat(100_000));
        assert!(parse_page(&Bytes::from(body), OrderField::Id).is_err());
    }
}
