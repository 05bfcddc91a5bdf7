//! Every recorded fixture in `tests/fixtures/` (a folder with a `manifest.json`, as
//! `kommo-fanout verify --record DIR` writes it) replayed through the proxy's pure parts: each
//! leads page parsed, the pages of each order merged, the merge rendered as the proxy's page.
//! A recording of a real account dropped there becomes a regression test.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kommo_fanout::leads::merge::{LeadRef, Merger, Step};
use kommo_fanout::leads::page::parse_page;
use kommo_fanout::leads::query::{Direction, Order, OrderField};
use kommo_fanout::leads::render::{render_page, PageLinks};
use kommo_fanout::links::LinkRewrite;
use serde_json::Value;

use crate::support::without_links;

const PROXY: &str = "http://proxy.test";
const FULL_PAGE: usize = 250;

/// The fixture folders under `tests/fixtures`.
pub fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/fixtures is readable")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    dirs.sort();
    dirs
}

fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
        Value::Object(m) => m.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// Replays one fixture folder; returns how many leads were merged. Panics naming the file
/// and what is wrong.
pub fn replay(dir: &Path) -> usize {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", dir.display()))
    };
    let manifest: Value = serde_json::from_slice(&read("manifest.json")).expect("manifest JSON");
    let upstream = manifest["upstream"]
        .as_str()
        .expect("manifest names its upstream");
    // Each order's pages, one stage each, in the order recorded.
    let mut orders: BTreeMap<(String, String), Vec<Option<Bytes>>> = BTreeMap::new();
    for a in manifest["answers"].as_array().expect("answers") {
        let file = a["file"].as_str().expect("file");
        if a["kind"] == "pipelines" {
            let v: Value = serde_json::from_slice(&read(file)).expect("pipelines JSON");
            assert!(v["_embedded"]["pipelines"].is_array(), "{file}");
            continue;
        }
        let key = (
            a["order_field"].as_str().expect("order_field").to_string(),
            a["direction"].as_str().expect("direction").to_string(),
        );
        assert!(
            a["pipeline_id"].is_i64() && a["status_id"].is_i64(),
            "{file}"
        );
        let body = (a["status"] == 200).then(|| Bytes::from(read(file)));
        assert!(
            body.is_some() || a["status"] == 204,
            "{file}: {}",
            a["status"]
        );
        orders.entry(key).or_default().push(body);
    }
    let mut merged = 0;
    for ((field, direction), pages) in orders {
        let order = Order {
            field: match field.as_str() {
                "id" => OrderField::Id,
                "created_at" => OrderField::CreatedAt,
                _ => OrderField::UpdatedAt,
            },
            direction: if direction == "desc" {
                Direction::Desc
            } else {
                Direction::Asc
            },
        };
        let what = format!("{}: order[{field}]={direction}", dir.display());
        // The expected merge, from the decoded leads: sorted with ties by id, once each, cut
        // after the last lead of any stage recorded with a full page (more may follow it).
        let mut decoded: Vec<Value> = Vec::new();
        let mut bound: Option<(Option<i64>, i64)> = None;
        let key = |l: &Value| (l[field.as_str()].as_i64(), l["id"].as_i64().unwrap_or(0));
        let before = |a, b| (a <= b) != (direction == "desc") || a == b;
        let mut merger = Merger::new(pages.len(), order);
        for (i, body) in pages.iter().enumerate() {
            let refs = match body {
                Some(b) => parse_page(b, order.field).unwrap_or_else(|e| panic!("{what}: {e}")),
                None => Vec::new(),
            };
            let v: Value = body.as_ref().map_or(Value::Null, |b| {
                serde_json::from_slice(b).expect("a leads page is JSON")
            });
            let leads = v["_embedded"]["leads"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            assert_eq!(refs.len(), leads.len(), "{what}");
            if leads.len() >= FULL_PAGE {
                let last = key(leads.last().expect("a full page"));
                bound = Some(bound.map_or(last, |b| if before(last, b) { last } else { b }));
            }
            // A stage ends with a page shorter than Kommo's largest.
            merger.feed(i, refs, leads.len() < FULL_PAGE);
            decoded.extend(leads);
        }
        decoded.sort_by(|a, b| {
            let o = key(a).cmp(&key(b));
            if direction == "desc" {
                o.reverse()
            } else {
                o
            }
        });
        let mut seen = HashSet::new();
        decoded.retain(|l| seen.insert(l["id"].as_i64()));
        if let Some(b) = bound {
            decoded.retain(|l| before(key(l), b));
        }
        let mut out: Vec<LeadRef> = Vec::new();
        while out.len() < decoded.len() {
            match merger.next_step() {
                Step::Lead(l) => out.push(l),
                Step::Done => break,
                Step::Need(streams) => panic!("{what}: the merge needs pages of {streams:?}"),
            }
        }
        let ids: Vec<i64> = out.iter().map(|l| l.id).collect();
        let want: Vec<i64> = decoded.iter().filter_map(|l| l["id"].as_i64()).collect();
        assert_eq!(ids, want, "{what}: merge order");
        // The merged leads rendered as the proxy's page, links moved to the proxy.
        let query = format!("order%5B{field}%5D={direction}&limit={}", out.len().max(1));
        let params = vec![query.clone()];
        let links = PageLinks {
            base: &format!("{PROXY}/api/v4/leads"),
            params: &params,
        };
        let rewrite = LinkRewrite::new(upstream, PROXY);
        let page = render_page(1, links, false, &out, &rewrite, &query);
        let doc: Value = serde_json::from_slice(&page)
            .unwrap_or_else(|e| panic!("{what}: the rendered page is not JSON: {e}"));
        let rendered = doc["_embedded"]["leads"].as_array().expect("leads");
        let rendered_ids: Vec<i64> = rendered.iter().filter_map(|l| l["id"].as_i64()).collect();
        assert_eq!(rendered_ids, want, "{what}: rendered order");
        assert_eq!(
            rendered_ids.iter().collect::<HashSet<_>>().len(),
            rendered_ids.len(),
            "{what}: a lead twice"
        );
        for (got, want) in rendered.iter().zip(&decoded) {
            assert_eq!(
                without_links(got),
                without_links(want),
                "{what}: lead {}",
                got["id"]
            );
        }
        let mut all = Vec::new();
        strings(&doc, &mut all);
        let origin = upstream.to_ascii_lowercase();
        for s in all {
            assert!(
                !s.to_ascii_lowercase().starts_with(&origin),
                "{what}: {s:?} is at the upstream's origin"
            );
        }
        merged += out.len();
    }
    merged
}

#[test]
fn every_fixture_replays_through_parse_merge_and_render() {
    let dirs = fixture_dirs();
    assert!(
        dirs.len() >= 3,
        "the recorded fixtures are in tests/fixtures"
    );
    for dir in dirs {
        assert!(replay(&dir) > 0, "{}: no leads merged", dir.display());
    }
}
