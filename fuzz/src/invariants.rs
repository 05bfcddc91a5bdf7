//! The invariants the fuzz targets check, shared with the property tests.
//!
//! This file is the library of the fuzz crate (`fuzz/Cargo.toml`) and is also compiled into
//! `tests/properties.rs` with `#[path]`, so the fuzzers and the property tests check exactly the
//! same things. It depends only on `kommo_fanout`, `bytes` and `serde_json`, which both have.
//! Every check panics (with the input in the message) when an invariant is broken.
#![allow(dead_code)]

use std::collections::HashSet;

use bytes::Bytes;
use kommo_fanout::cache::canonical_target;
use kommo_fanout::leads::merge::{LeadRef, Merger, Step};
use kommo_fanout::leads::page::parse_page;
use kommo_fanout::leads::plan::{plan, Plan, LEADS_PATH, STREAM_LIMIT};
use kommo_fanout::leads::query::{
    key_path, parse, split_params, Direction, LeadsQuery, Order, OrderField, QueryLimits,
    DEFAULT_LIMIT, MAX_LIMIT,
};
use kommo_fanout::leads::render::{render_page, PageLinks};
use kommo_fanout::links::LinkRewrite;

/// The limits the fuzzers parse with (the `--max-pairs` default).
pub const LIMITS: QueryLimits = QueryLimits { max_pairs: 100 };

/// The upstream origin and public base the rendering checks use.
pub const UPSTREAM: &str = "https://example.kommo.com";
pub const PUBLIC: &str = "http://127.0.0.1:8080";

/// How the upstream (PHP) names a decoded parameter key: leading spaces are dropped, the name
/// stops at a NUL byte (PHP reads it as a C string), and `.`/` ` in the base name become `_`.
/// Returns the base name and the bracketed segments, `None` when PHP would not read it as an
/// array (then it is a plain variable, or an unbalanced key that is never a stage filter).
pub fn php_path(key: &str) -> (String, Option<Vec<String>>) {
    let key = key.trim_start_matches(' ');
    let key = key.split('\0').next().unwrap_or("");
    match key_path(key) {
        Some((name, segs)) => (
            name.replace([' ', '.'], "_"),
            (!segs.is_empty()).then(|| segs.into_iter().map(str::to_string).collect()),
        ),
        None => (key.replace([' ', '.'], "_"), None),
    }
}

/// Whether the upstream reads this decoded key as a `filter[statuses]...` parameter.
fn php_is_stage(key: &str) -> bool {
    matches!(php_path(key), (name, Some(segs)) if name == "filter" && segs[0] == "statuses")
}

/// Whether the upstream reads this decoded key as an `order[...]` parameter.
fn php_is_order(key: &str) -> bool {
    matches!(php_path(key), (name, Some(_)) if name == "order")
}

/// `canonical_target` is a fixed point after one application.
pub fn check_canonical(target: &str) -> String {
    let once = canonical_target(target);
    let twice = canonical_target(&once);
    assert_eq!(
        twice, once,
        "canonical_target is not idempotent on {target:?}"
    );
    once
}

/// The `query_parse` target: parse, validate the result, plan it, and check every planned
/// upstream target. Returns the parsed query when it is valid.
pub fn check_query(raw: &str) -> Option<LeadsQuery> {
    let q = match parse(raw, LIMITS) {
        Ok(q) => q,
        Err(invalid) => {
            assert!(!invalid.is_empty(), "an error without a reason: {raw:?}");
            return None;
        }
    };
    assert!(
        (1..=MAX_LIMIT).contains(&q.limit),
        "limit {} out of range: {raw:?}",
        q.limit
    );
    assert!(q.page >= 1, "page 0: {raw:?}");
    let _ = q.offset();
    let distinct: HashSet<_> = q.pairs.iter().collect();
    assert_eq!(distinct.len(), q.pairs.len(), "repeated pairs: {raw:?}");
    assert!(q.pairs.len() <= LIMITS.max_pairs, "too many pairs: {raw:?}");
    assert!(q.pair_entries >= q.pairs.len(), "{raw:?}");
    for p in &q.link_params {
        assert!(
            !matches!(split_params(p).first(), Some(x) if x.key == "page"),
            "page in the link params: {raw:?}"
        );
    }

    match plan(&q, raw) {
        Plan::Relay { target } => {
            assert!(q.pairs.len() <= 1, "{raw:?}");
            assert!(target.starts_with(LEADS_PATH), "{target:?}");
            check_canonical(&target);
            if q.pair_entries > 1 {
                // A repeated stage is asked for once, in the proxy's own spelling.
                check_one_stage(&target, q.pairs[0], raw);
            }
        }
        Plan::FanOut(fan_out) => {
            assert!(q.pairs.len() >= 2, "{raw:?}");
            assert_eq!(fan_out.streams.len(), q.pairs.len(), "{raw:?}");
            assert_eq!(fan_out.order, q.effective_order(), "{raw:?}");
            let k = fan_out.streams.len();
            for (i, (stream, pair)) in fan_out.streams.iter().zip(&q.pairs).enumerate() {
                assert_eq!(stream.pair, *pair, "{raw:?}");
                // Every stream carries its own stage; the full checks (which cost a pass over the
                // target each) run on the first two and the last stream, whose targets differ
                // from the others' only in the stage values.
                if i >= 2 && i + 1 < k {
                    check_one_stage(&stream.target(1), *pair, raw);
                    continue;
                }
                for page in [1, u32::MAX] {
                    let target = stream.target(page);
                    check_one_stage(&target, *pair, raw);
                    check_stream_extras(&target, fan_out.order, page, raw);
                    let canonical = check_canonical(&target);
                    // The canonical key still says which stage and which page it is.
                    let (_, cq) = canonical.split_once('?').expect("a query");
                    let cparams = split_params(cq);
                    let has =
                        |k: &str, v: String| cparams.iter().any(|p| p.key == k && p.value == v);
                    assert!(
                        has(
                            "filter[statuses][0][pipeline_id]",
                            pair.pipeline_id.to_string()
                        ) && has("filter[statuses][0][status_id]", pair.status_id.to_string())
                            && has("page", page.to_string()),
                        "{canonical:?} lost the stage or the page: {raw:?}"
                    );
                }
            }
        }
    }
    Some(q)
}

/// `target` carries exactly one `filter[statuses][0][pipeline_id]` and one `[status_id]`, with
/// the pair's values, and the upstream (PHP) reads no other stage parameter in it.
fn check_one_stage(target: &str, pair: kommo_fanout::leads::query::StagePair, raw: &str) {
    let (path, query) = target
        .split_once('?')
        .expect("a planned target has a query");
    assert_eq!(path, LEADS_PATH, "{raw:?}");
    let params = split_params(query);
    let pipeline: Vec<_> = params
        .iter()
        .filter(|p| p.key == "filter[statuses][0][pipeline_id]")
        .collect();
    let status: Vec<_> = params
        .iter()
        .filter(|p| p.key == "filter[statuses][0][status_id]")
        .collect();
    assert!(
        pipeline.len() == 1 && status.len() == 1,
        "{target:?} has {} pipeline_id and {} status_id: {raw:?}",
        pipeline.len(),
        status.len()
    );
    assert_eq!(pipeline[0].value, pair.pipeline_id.to_string(), "{raw:?}");
    assert_eq!(status[0].value, pair.status_id.to_string(), "{raw:?}");
    let stage_params = params.iter().filter(|p| php_is_stage(&p.key)).count();
    assert_eq!(
        stage_params, 2,
        "the upstream reads {stage_params} stage parameters in {target:?}: {raw:?}"
    );
}

/// A fan-out stream target asks for the merge order, 250 leads and the page, once each as the
/// upstream reads them.
fn check_stream_extras(target: &str, order: Order, page: u32, raw: &str) {
    let (_, query) = target.split_once('?').expect("a query");
    let params = split_params(query);
    let orders: Vec<_> = params.iter().filter(|p| php_is_order(&p.key)).collect();
    assert!(
        orders.len() == 1
            && orders[0].key == format!("order[{}]", order.field.as_str())
            && orders[0].value == order.direction.as_str(),
        "{target:?} does not ask for exactly the merge order {order:?}: {raw:?}"
    );
    // PHP keeps the last value of a repeated scalar: the proxy's own `limit` and `page` must
    // be the last of their names.
    let last = |name: &str| {
        params
            .iter()
            .rev()
            .find(|p| matches!(php_path(&p.key), (n, None) if n == name))
            .map(|p| p.value.clone())
    };
    assert_eq!(last("limit"), Some(STREAM_LIMIT.to_string()), "{raw:?}");
    assert_eq!(last("page"), Some(page.to_string()), "{raw:?}");
}

/// The `page_parse` target: `parse_page` under each order field; every lead it returns is its
/// own valid JSON object whose integer `id` (and order field) it read correctly; and the page
/// rendered from those leads is valid JSON holding the same leads.
pub fn check_page(body: &[u8], page: u32, has_next: bool) {
    let bytes = Bytes::copy_from_slice(body);
    let mut outcome = None;
    for field in [OrderField::Id, OrderField::CreatedAt, OrderField::UpdatedAt] {
        let result = parse_page(&bytes, field);
        // Whether a page parses does not depend on the order field.
        match outcome {
            None => outcome = Some(result.is_ok()),
            Some(ok) => assert_eq!(ok, result.is_ok(), "{:?}", String::from_utf8_lossy(body)),
        }
        let Ok(leads) = result else { continue };
        for lead in &leads {
            let v = lead_value(&lead.raw).unwrap_or_else(|e| {
                panic!(
                    "lead {:?} is not valid JSON ({e}) in {:?}",
                    String::from_utf8_lossy(&lead.raw),
                    String::from_utf8_lossy(body)
                )
            });
            let obj = v.as_object().unwrap_or_else(|| {
                panic!(
                    "lead {v} is not an object in {:?}",
                    String::from_utf8_lossy(body)
                )
            });
            assert_eq!(
                obj.get("id").and_then(|id| id.as_i64()),
                Some(lead.id),
                "lead {v}: id differs"
            );
            let expected = match field {
                OrderField::Id => Some(lead.id),
                f => obj.get(f.as_str()).and_then(|s| s.as_i64()),
            };
            assert_eq!(lead.sort, expected, "lead {v}: {} differs", field.as_str());
        }
        check_render(&leads, page, has_next);
    }
}

/// A lead's raw bytes as a JSON value. JSON's grammar allows what `serde_json::Value` cannot
/// hold: a lone UTF-16 surrogate escape (`"\ud800"`) and a number out of `f64`'s range
/// (`1e999`). The proxy passes those through untouched, as Kommo sent them, so they count as
/// JSON here: the bytes must pass serde's grammar check (`IgnoredAny`), and the value is then
/// built with such escapes replaced by `\ufffd` and such numbers by `0`.
pub fn lead_value(raw: &[u8]) -> Result<serde_json::Value, String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(raw).map_err(|e| e.to_string())?;
    match serde_json::from_slice(raw) {
        Ok(v) => Ok(v),
        Err(_) => {
            let text = std::str::from_utf8(raw).map_err(|e| e.to_string())?;
            serde_json::from_str(&tame(text)).map_err(|e| e.to_string())
        }
    }
}

/// `text` (grammatical JSON) with surrogate escapes in strings replaced by `\uFFFD` and numbers
/// out of `f64`'s range replaced by `0`.
fn tame(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut in_string = false;
    while i < b.len() {
        let c = b[i];
        if in_string {
            if c == b'\\' {
                if b.get(i + 1) == Some(&b'u') && i + 6 <= b.len() {
                    if let Ok(cp) = u16::from_str_radix(&text[i + 2..i + 6], 16) {
                        if (0xD800..=0xDFFF).contains(&cp) {
                            out.push_str("\\uFFFD");
                            i += 6;
                            continue;
                        }
                    }
                }
                out.push_str(&text[i..i + 2]);
                i += 2;
                continue;
            }
            in_string = c != b'"';
        } else if c == b'"' {
            in_string = true;
        } else if c == b'-' || c.is_ascii_digit() {
            let end = text[i..]
                .find(|ch: char| !matches!(ch, '0'..='9' | '-' | '+' | '.' | 'e' | 'E'))
                .map_or(b.len(), |n| i + n);
            let number = &text[i..end];
            let finite = number.parse::<f64>().is_ok_and(f64::is_finite);
            out.push_str(if finite { number } else { "0" });
            i = end;
            continue;
        }
        let ch = text[i..].chars().next().expect("a char");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// `render_page` of `leads` is valid JSON with Kommo's shape and the same leads, in order.
pub fn check_render(leads: &[LeadRef], page: u32, has_next: bool) {
    let rewrite = LinkRewrite::new(UPSTREAM, PUBLIC);
    let params = vec!["limit=2".to_string(), "filter%5Bid%5D=1".to_string()];
    let base = format!("{PUBLIC}{LEADS_PATH}");
    let links = PageLinks {
        base: &base,
        params: &params,
    };
    let out = render_page(page, links, has_next, leads, &rewrite, "");
    let v = lead_value(&out).unwrap_or_else(|e| {
        panic!(
            "rendered page is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    assert_eq!(v["_page"].as_u64(), Some(u64::from(page)));
    let rendered = v["_embedded"]["leads"].as_array().expect("leads array");
    assert_eq!(rendered.len(), leads.len());
    for (r, l) in rendered.iter().zip(leads) {
        assert_eq!(r["id"].as_i64(), Some(l.id), "{r}");
    }
    let href = |name: &str| v["_links"][name]["href"].as_str().map(str::to_string);
    assert_eq!(href("self"), Some(links.href(page)));
    assert_eq!(href("first"), Some(links.href(1)));
    assert_eq!(href("prev").is_some(), page > 1);
    if let Some(next) = href("next") {
        assert!(has_next);
        assert_eq!(
            next,
            links.href(page.checked_add(1).expect("no page after u32::MAX"))
        );
    }
    // The origin moved, and only in hrefs: nothing else of a lead changed length but by the
    // difference of the origins at each rewritten place.
    let upstream_href = format!("\"href\":\"{UPSTREAM}/");
    assert!(
        !memchr_find(&out, upstream_href.as_bytes()),
        "an upstream href survived: {:?}",
        String::from_utf8_lossy(&out)
    );
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// One merge scenario: streams of `(id, sort)`, each already in `order`, fed in pages.
#[derive(Debug, Clone)]
pub struct MergeCase {
    pub order: Order,
    /// Per stream, its leads in stream order.
    pub streams: Vec<Vec<(i64, Option<i64>)>>,
    /// Per stream, its upstream page size (at least 1).
    pub page_sizes: Vec<usize>,
}

impl MergeCase {
    /// Builds a case from unsorted streams: each stream is sorted by `order` (ties by id in the
    /// same direction), as the upstream sends it. With `OrderField::Id` the sort value is the id.
    pub fn new(
        order: Order,
        streams: Vec<Vec<(i64, Option<i64>)>>,
        page_sizes: Vec<usize>,
    ) -> Self {
        let streams = streams
            .into_iter()
            .map(|mut s| {
                if order.field == OrderField::Id {
                    for l in &mut s {
                        l.1 = Some(l.0);
                    }
                }
                s.sort_by_key(|&(id, sort)| (sort, id));
                if order.direction == Direction::Desc {
                    s.reverse();
                }
                s
            })
            .collect();
        MergeCase {
            order,
            streams,
            page_sizes,
        }
    }
}

/// The `merge` target: the merger's output is sorted, has no repeated id, loses nothing, and is
/// exactly the reference merge (a stable sort by key then stream, first occurrence of each id
/// kept); it never asks for an ended stream and ends in a bounded number of steps.
pub fn check_merge(case: &MergeCase) -> Vec<(i64, Option<i64>)> {
    let k = case.streams.len();
    let mut m = Merger::new(k, case.order);
    let mut ended = vec![false; k];
    let mut out: Vec<LeadRef> = Vec::new();
    let total: usize = case.streams.iter().map(Vec::len).sum();
    let page_size = |i: usize| case.page_sizes.get(i).copied().unwrap_or(1).max(1);
    let max_fetches: usize = case
        .streams
        .iter()
        .enumerate()
        .map(|(i, s)| s.len() / page_size(i) + 1)
        .sum();
    let mut fetches = 0;
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(
            steps <= 2 * total + max_fetches + 2,
            "the merge does not end: {case:?}"
        );
        match m.next_step() {
            Step::Lead(l) => out.push(l),
            Step::Done => break,
            Step::Need(need) => {
                assert!(!need.is_empty(), "an empty Need: {case:?}");
                let distinct: HashSet<_> = need.iter().collect();
                assert_eq!(distinct.len(), need.len(), "{case:?}");
                for i in need {
                    assert!(i < k && !ended[i], "asked for ended stream {i}: {case:?}");
                    fetches += 1;
                    let size = page_size(i);
                    let start = m.pages_fed(i) as usize * size;
                    let page: Vec<LeadRef> = case.streams[i]
                        .iter()
                        .skip(start)
                        .take(size)
                        .map(|&(id, sort)| LeadRef {
                            id,
                            sort,
                            raw: Bytes::from(format!("{{\"id\":{id}}}")),
                        })
                        .collect();
                    let last = page.len() < size;
                    ended[i] = last;
                    m.feed(i, page, last);
                }
            }
        }
    }
    assert!(fetches <= max_fetches, "{fetches} fetches: {case:?}");
    assert_eq!(m.emitted(), out.len());
    let got: Vec<(i64, Option<i64>)> = out.iter().map(|l| (l.id, l.sort)).collect();

    // Sorted by (sort, id) in the order's direction.
    for w in got.windows(2) {
        let (a, b) = ((w[0].1, w[0].0), (w[1].1, w[1].0));
        match case.order.direction {
            Direction::Asc => assert!(a <= b, "not sorted: {got:?} from {case:?}"),
            Direction::Desc => assert!(a >= b, "not sorted: {got:?} from {case:?}"),
        }
    }
    let ids: HashSet<i64> = got.iter().map(|l| l.0).collect();
    assert_eq!(ids.len(), got.len(), "a repeated id: {got:?} from {case:?}");
    let all: HashSet<i64> = case.streams.iter().flatten().map(|l| l.0).collect();
    assert_eq!(ids, all, "a lead was lost: {case:?}");
    // Exactly the reference merge.
    let mut reference: Vec<((Option<i64>, i64), usize, usize)> = case
        .streams
        .iter()
        .enumerate()
        .flat_map(|(s, leads)| {
            leads
                .iter()
                .enumerate()
                .map(move |(p, &(id, sort))| ((sort, id), s, p))
        })
        .collect();
    reference.sort_by(|a, b| {
        let by_key = match case.order.direction {
            Direction::Asc => a.0.cmp(&b.0),
            Direction::Desc => b.0.cmp(&a.0),
        };
        by_key.then((a.1, a.2).cmp(&(b.1, b.2)))
    });
    let mut seen = HashSet::new();
    let expected: Vec<(i64, Option<i64>)> = reference
        .into_iter()
        .filter(|((_, id), _, _)| seen.insert(*id))
        .map(|((sort, id), _, _)| (id, sort))
        .collect();
    assert_eq!(got, expected, "differs from the reference merge: {case:?}");
    got
}

/// Kommo's defaults, for the generators.
pub const DEFAULTS: (u32, u32) = (1, DEFAULT_LIMIT);
