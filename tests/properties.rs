//! Property tests of the pure leads stages, with the invariants of the fuzz targets.
//!
//! The checks live in `fuzz/src/invariants.rs`, compiled here too, so the fuzzers (which feed
//! arbitrary bytes) and these tests (which feed realistic inputs built from a grammar, with a
//! fixed seed, fast enough for CI) check exactly the same invariants. See docs/FUZZING.md.

#[path = "../fuzz/src/invariants.rs"]
mod invariants;

use std::collections::BTreeMap;

use bytes::Bytes;
use kommo_fanout::leads::page::parse_page;
use kommo_fanout::leads::plan::{plan, Plan};
use kommo_fanout::leads::query::{parse, Direction, Order, OrderField, StagePair};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

use invariants::{check_canonical, check_merge, check_page, check_query, MergeCase, LIMITS};

fn config(cases: u32, seed: u64) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Query strings from a grammar of realistic fragments.

/// How a bracket pair is written.
#[derive(Debug, Clone, Copy)]
enum Brackets {
    Raw,
    Upper,
    Lower,
}

fn brackets() -> impl Strategy<Value = Brackets> {
    prop_oneof![
        Just(Brackets::Raw),
        Just(Brackets::Upper),
        Just(Brackets::Lower)
    ]
}

/// `name[a][b]...` with the brackets spelled as asked.
fn key(name: &str, segments: &[&str], b: Brackets) -> String {
    let (open, close) = match b {
        Brackets::Raw => ("[", "]"),
        Brackets::Upper => ("%5B", "%5D"),
        Brackets::Lower => ("%5b", "%5d"),
    };
    let mut k = name.to_string();
    for s in segments {
        k.push_str(open);
        k.push_str(s);
        k.push_str(close);
    }
    k
}

/// How a list is written: repeated key, `[]`, or PHP-indexed from `first`.
#[derive(Debug, Clone, Copy)]
enum Spelling {
    Repeated,
    Empty,
    Indexed(u32),
}

fn spelling() -> impl Strategy<Value = Spelling> {
    prop_oneof![
        Just(Spelling::Repeated),
        Just(Spelling::Empty),
        (0u32..20).prop_map(Spelling::Indexed)
    ]
}

/// An id: mostly from a handful (so stages repeat), sometimes an extreme.
fn id() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => 0i64..4,
        1 => Just(142),
        1 => prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(-1), any::<i64>()],
    ]
}

/// A value: an integer as text, sometimes padded or not an integer at all.
fn int_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => id().prop_map(|v| v.to_string()),
        1 => id().prop_map(|v| format!("+{v}")),
        1 => prop_oneof![
            Just("".to_string()),
            Just("x".to_string()),
            Just("1.5".to_string()),
            Just("9223372036854775808".to_string()),
            Just("%201".to_string()),
        ],
    ]
}

/// Garbage: a short run of the characters that matter to the parser.
fn garbage() -> impl Strategy<Value = String> {
    "[a-z_\\[\\]%&=+ 0-9A-Fa-f.\\x00-\\x1f\u{e9}\u{fffd}]{0,16}"
}

/// One fragment of a query string (possibly several `&`-joined parameters).
fn fragment() -> impl Strategy<Value = String> {
    let stage = (
        id(),
        id(),
        spelling(),
        brackets(),
        brackets(),
        any::<bool>(),
        0usize..3,
    )
        .prop_map(|(p, s, sp, b1, b2, swap, drop)| {
            let index;
            let segs: Vec<&str> = match sp {
                Spelling::Repeated => vec!["statuses"],
                Spelling::Empty => vec!["statuses", ""],
                Spelling::Indexed(i) => {
                    index = i.to_string();
                    return {
                        let mut parts = vec![
                            format!(
                                "{}={p}",
                                key("filter", &["statuses", &index, "pipeline_id"], b1)
                            ),
                            format!(
                                "{}={s}",
                                key("filter", &["statuses", &index, "status_id"], b2)
                            ),
                        ];
                        if swap {
                            parts.reverse();
                        }
                        // Sometimes only one half: an invalid entry.
                        if drop == 0 {
                            parts.pop();
                        }
                        parts.join("&")
                    };
                }
            };
            let with = |f: &str, b| {
                let mut s = segs.clone();
                s.push(f);
                key("filter", &s, b)
            };
            let mut parts = [
                format!("{}={p}", with("pipeline_id", b1)),
                format!("{}={s}", with("status_id", b2)),
            ];
            if swap {
                parts.reverse();
            }
            parts.join("&")
        });
    let set_filter = (
        prop::sample::select(vec![
            "id",
            "pipeline_id",
            "created_by",
            "updated_by",
            "responsible_user_id",
            "name",
        ]),
        prop::collection::vec(int_text(), 1..4),
        spelling(),
        brackets(),
    )
        .prop_map(|(name, values, sp, b)| {
            values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let index = match sp {
                        Spelling::Indexed(first) => (first as usize + i).to_string(),
                        _ => String::new(),
                    };
                    let segs: Vec<&str> = match sp {
                        Spelling::Repeated => vec![name],
                        _ => vec![name, &index],
                    };
                    format!("{}={v}", key("filter", &segs, b))
                })
                .collect::<Vec<_>>()
                .join("&")
        });
    let range = (
        prop::sample::select(vec![
            "created_at",
            "updated_at",
            "closed_at",
            "closest_task_at",
            "price",
        ]),
        prop::sample::select(vec!["from", "to", "", "since"]),
        int_text(),
        brackets(),
    )
        .prop_map(|(name, end, v, b)| {
            let segs: Vec<&str> = if end.is_empty() {
                vec![name]
            } else {
                vec![name, end]
            };
            format!("{}={v}", key("filter", &segs, b))
        });
    let custom = (
        prop_oneof![Just("77".to_string()), garbage()],
        int_text(),
        brackets(),
    )
        .prop_map(|(f, v, b)| {
            format!(
                "{}={v}",
                key("filter", &["custom_fields_values", &f, ""], b)
            )
        });
    let order = (
        prop::sample::select(vec!["id", "created_at", "updated_at", "price", ""]),
        prop::sample::select(vec!["asc", "desc", "ASC", "Desc", "up", ""]),
        brackets(),
    )
        .prop_map(|(f, d, b)| format!("{}={d}", key("order", &[f], b)));
    let paging = (
        prop::sample::select(vec!["limit", "page"]),
        prop_oneof![
            (0u64..300).prop_map(|v| v.to_string()),
            Just("4294967295".to_string()),
            Just("4294967296".to_string()),
            Just("-1".to_string()),
            Just(" 7".to_string()),
            garbage(),
        ],
    )
        .prop_map(|(k, v)| format!("{k}={v}"));
    let other = prop_oneof![
        Just("with=contacts,loss_reason".to_string()),
        Just("query=%D0%90+b".to_string()),
        Just("unknown[a]=1".to_string()),
        garbage().prop_map(|g| format!("query={g}")),
    ];
    prop_oneof![
        6 => stage,
        2 => set_filter,
        1 => range,
        1 => custom,
        1 => order,
        2 => paging,
        1 => other,
        1 => garbage(),
    ]
}

fn query_string() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(fragment(), 0..12),
        prop::sample::select(vec!["&", "&&", "&"]),
    )
        .prop_map(|(fragments, sep)| fragments.join(sep))
}

proptest! {
    #![proptest_config(config(2000, 0x6b6f_6d6d_6f01))]

    /// The `query_parse` fuzz target's invariants on realistic query strings.
    #[test]
    fn query_parse_plan_and_canonical_keys(q in query_string()) {
        check_query(&q);
    }
}

// ---------------------------------------------------------------------------------------------
// Equivalent spellings of one view plan the same canonical upstream requests.

/// A leads view: what the client means, independent of how it is written.
#[derive(Debug, Clone)]
struct View {
    /// Stage entries (a stage may be listed twice).
    stages: Vec<(i64, i64)>,
    /// Set filters: name and values.
    sets: Vec<(&'static str, Vec<i64>)>,
    /// Other parameters, already raw: (decoded value, two raw spellings of it).
    others: Vec<(String, String)>,
    order: Option<(OrderField, Direction)>,
    limit: Option<u32>,
    page: Option<u32>,
}

fn view() -> impl Strategy<Value = View> {
    let stages = prop::collection::vec(
        (0i64..5, prop_oneof![Just(142i64), Just(143), 0i64..3]),
        1..6,
    );
    let sets = prop::collection::vec(
        (
            prop::sample::select(vec![
                "id",
                "pipeline_id",
                "created_by",
                "updated_by",
                "responsible_user_id",
            ]),
            prop::collection::vec(0i64..6, 1..4),
        ),
        0..3,
    );
    let others = prop::collection::vec(
        prop::sample::select(vec![
            ("with=contacts,loss_reason", "with=contacts%2Closs_reason"),
            ("query=a b", "query=a%20b"),
            (
                "filter[created_at][from]=100",
                "filter%5Bcreated_at%5D%5Bfrom%5D=100",
            ),
            ("filter[price][to]=9", "filter%5bprice%5d%5bto%5d=9"),
        ]),
        0..3,
    )
    .prop_map(|v| {
        let mut seen = std::collections::HashSet::new();
        v.into_iter()
            .filter(|(a, _)| seen.insert(a.split('=').next().unwrap_or_default().to_string()))
            .map(|(a, b)| {
                // The first spelling is the readable one; percent-encode nothing else.
                let a = a.replace(' ', "+");
                (a, b.to_string())
            })
            .collect()
    });
    let order = prop::option::of((
        prop::sample::select(vec![
            OrderField::Id,
            OrderField::CreatedAt,
            OrderField::UpdatedAt,
        ]),
        prop::sample::select(vec![Direction::Asc, Direction::Desc]),
    ));
    (
        stages,
        sets,
        others,
        order,
        prop::option::of(1u32..=250),
        prop::option::of(1u32..5),
    )
        .prop_map(|(stages, sets, others, order, limit, page)| View {
            stages,
            sets,
            others,
            order,
            limit,
            page,
        })
}

/// One way of writing a view.
#[derive(Debug, Clone)]
struct Writing {
    stage_spelling: Spelling,
    set_spelling: Spelling,
    brackets: Brackets,
    /// Second raw spelling of the other parameters.
    alt_others: bool,
    /// Shuffles the units (a stage is one unit when its spelling pairs by position).
    shuffle: Vec<prop::sample::Index>,
    /// Reverses every list's values.
    reverse_values: bool,
    order_upper: bool,
}

fn writing() -> impl Strategy<Value = Writing> {
    (
        spelling(),
        spelling(),
        brackets(),
        any::<bool>(),
        prop::collection::vec(any::<prop::sample::Index>(), 32),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                stage_spelling,
                set_spelling,
                brackets,
                alt_others,
                shuffle,
                reverse_values,
                order_upper,
            )| Writing {
                stage_spelling,
                set_spelling,
                brackets,
                alt_others,
                shuffle,
                reverse_values,
                order_upper,
            },
        )
}

fn write(view: &View, w: &Writing) -> String {
    let b = w.brackets;
    let mut units: Vec<String> = Vec::new();
    let mut stages = view.stages.clone();
    if w.reverse_values {
        stages.reverse();
    }
    for (i, (p, s)) in stages.iter().enumerate() {
        match w.stage_spelling {
            Spelling::Indexed(first) => {
                // Indexed halves can go anywhere: two units.
                let index = (first as usize + i).to_string();
                units.push(format!(
                    "{}={p}",
                    key("filter", &["statuses", &index, "pipeline_id"], b)
                ));
                units.push(format!(
                    "{}={s}",
                    key("filter", &["statuses", &index, "status_id"], b)
                ));
            }
            Spelling::Empty => units.push(format!(
                "{}={p}&{}={s}",
                key("filter", &["statuses", "", "pipeline_id"], b),
                key("filter", &["statuses", "", "status_id"], b)
            )),
            Spelling::Repeated => units.push(format!(
                "{}={p}&{}={s}",
                key("filter", &["statuses", "pipeline_id"], b),
                key("filter", &["statuses", "status_id"], b)
            )),
        }
    }
    for (name, values) in &view.sets {
        let mut values = values.clone();
        if w.reverse_values {
            values.reverse();
        }
        for (i, v) in values.iter().enumerate() {
            let index = match w.set_spelling {
                Spelling::Indexed(first) => (first as usize + i).to_string(),
                _ => String::new(),
            };
            let segs: Vec<&str> = match w.set_spelling {
                Spelling::Repeated => vec![name],
                _ => vec![name, &index],
            };
            units.push(format!("{}={v}", key("filter", &segs, b)));
        }
    }
    for (a, alt) in &view.others {
        units.push(if w.alt_others { alt.clone() } else { a.clone() });
    }
    if let Some((field, dir)) = view.order {
        let dir = if w.order_upper {
            dir.as_str().to_ascii_uppercase()
        } else {
            dir.as_str().to_string()
        };
        units.push(format!("{}={dir}", key("order", &[field.as_str()], b)));
    }
    if let Some(limit) = view.limit {
        units.push(format!("limit={limit}"));
    }
    if let Some(page) = view.page {
        units.push(format!("page={page}"));
    }
    // Fisher-Yates with the drawn indices.
    for i in (1..units.len()).rev() {
        let j = w.shuffle[i % w.shuffle.len()].index(i + 1);
        units.swap(i, j);
    }
    units.join("&")
}

/// The canonical upstream requests a query plans, by stage; `None` for the stage of a relay.
fn canonical_plan(q: &str) -> BTreeMap<Option<StagePair>, Vec<String>> {
    let parsed = parse(q, LIMITS).unwrap_or_else(|e| panic!("{q}: {e:?}"));
    check_query(q);
    match plan(&parsed, q) {
        Plan::Relay { target } => BTreeMap::from([(None, vec![check_canonical(&target)])]),
        Plan::FanOut(f) => f
            .streams
            .iter()
            .map(|s| {
                (
                    Some(s.pair),
                    [1, 2, 9].map(|p| check_canonical(&s.target(p))).to_vec(),
                )
            })
            .collect(),
    }
}

proptest! {
    #![proptest_config(config(600, 0x6b6f_6d6d_6f02))]

    /// Reordering parameters and changing list spellings never changes the canonical target of a
    /// planned upstream request.
    ///
    /// A query with a single stage entry is relayed as the client wrote it, so its stage keeps
    /// one spelling in both writings (its canonical key does not fold the stage's spellings, nor
    /// `ASC`/`asc`).
    #[test]
    fn spellings_and_order_do_not_change_canonical_targets(v in view(), a in writing(), mut b in writing()) {
        if v.stages.len() == 1 {
            // Relayed as written: the same stage spelling and order value case in both.
            b.stage_spelling = a.stage_spelling;
            b.order_upper = a.order_upper;
        }
        let (qa, qb) = (write(&v, &a), write(&v, &b));
        prop_assert_eq!(canonical_plan(&qa), canonical_plan(&qb), "{}\n{}", qa, qb);
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream pages: JSON with random leads, plus random corruption.

#[derive(Debug, Clone)]
struct GenLead {
    id: i64,
    created_at: Option<Option<i64>>,
    updated_at: Option<Option<i64>>,
    name: String,
    escaped_href: bool,
    fields_first: bool,
}

fn gen_lead() -> impl Strategy<Value = GenLead> {
    let ts = prop::option::of(prop::option::of(prop_oneof![0i64..100, any::<i64>()]));
    (
        prop_oneof![0i64..1000, any::<i64>()],
        ts.clone(),
        ts,
        "[a-zA-Z \"\\\\/\u{e9}\u{1f600}\\x00-\\x1f]{0,12}",
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(id, created_at, updated_at, name, escaped_href, fields_first)| GenLead {
                id,
                created_at,
                updated_at,
                name,
                escaped_href,
                fields_first,
            },
        )
}

fn lead_json(l: &GenLead) -> String {
    let mut href = format!("{}/api/v4/leads/{}", invariants::UPSTREAM, l.id);
    if l.escaped_href {
        href = href.replace('/', "\\/");
    }
    let mut parts = vec![format!("\"id\":{}", l.id)];
    for (name, v) in [("created_at", l.created_at), ("updated_at", l.updated_at)] {
        match v {
            None => {}
            Some(None) => parts.push(format!("\"{name}\":null")),
            Some(Some(t)) => parts.push(format!("\"{name}\":{t}")),
        }
    }
    parts.push(format!(
        "\"name\":{}",
        serde_json::to_string(&l.name).expect("a string")
    ));
    parts.push(format!("\"_links\":{{\"self\":{{\"href\":\"{href}\"}}}}"));
    parts.push("\"_embedded\":{\"tags\":[{\"id\":1,\"name\":null}]}".to_string());
    if l.fields_first {
        parts.rotate_left(1);
    }
    format!("{{{}}}", parts.join(","))
}

fn page_json(leads: &[GenLead]) -> String {
    let leads: Vec<String> = leads.iter().map(lead_json).collect();
    format!(
        "{{\"_page\":1,\"_links\":{{\"self\":{{\"href\":\"{}/api/v4/leads?page=1\"}}}},\"_embedded\":{{\"leads\":[{}]}}}}",
        invariants::UPSTREAM,
        leads.join(", ")
    )
}

#[derive(Debug, Clone)]
enum Corruption {
    None,
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
    Replace(prop::sample::Index, &'static str),
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        4 => Just(Corruption::None),
        1 => any::<prop::sample::Index>().prop_map(Corruption::Truncate),
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Corruption::Insert(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Corruption::Delete),
        2 => (
            any::<prop::sample::Index>(),
            prop::sample::select(vec![
                "\"id\":\"5\"", "\"id\":1.5", "\"id\":[1]", "[1,2,3]", "null", "\"\\ud800\"", "\"id\":1,\"id\":2",
                "{\"id\":9223372036854775808}", "\\", "\"", "{", "]", "\"created_at\":\"x\"",
            ]),
        )
            .prop_map(|(i, s)| Corruption::Replace(i, s)),
    ]
}

fn corrupt(page: &str, c: &Corruption) -> Vec<u8> {
    let mut b = page.as_bytes().to_vec();
    match c {
        Corruption::None => {}
        Corruption::Truncate(i) => b.truncate(i.index(b.len() + 1)),
        Corruption::Insert(i, byte) => b.insert(i.index(b.len() + 1), *byte),
        Corruption::Delete(i) => {
            if !b.is_empty() {
                b.remove(i.index(b.len()));
            }
        }
        Corruption::Replace(i, s) => {
            let at = i.index(b.len() + 1);
            let end = (at + s.len()).min(b.len());
            b.splice(at..end, s.bytes());
        }
    }
    b
}

proptest! {
    #![proptest_config(config(2000, 0x6b6f_6d6d_6f03))]

    /// The `page_parse` fuzz target's invariants on generated, sometimes corrupted pages; an
    /// intact page parses, with every lead's id and order value read as generated.
    #[test]
    fn page_parse_and_render(leads in prop::collection::vec(gen_lead(), 0..6), c in corruption(), page in prop_oneof![Just(1u32), 2u32..10, Just(u32::MAX)], has_next in any::<bool>()) {
        let json = page_json(&leads);
        let body = corrupt(&json, &c);
        check_page(&body, page, has_next);
        if matches!(c, Corruption::None) {
            for field in [OrderField::Id, OrderField::CreatedAt, OrderField::UpdatedAt] {
                let parsed = parse_page(&Bytes::from(json.clone()), field).unwrap_or_else(|e| panic!("{e}: {json}"));
                prop_assert_eq!(parsed.len(), leads.len());
                for (p, l) in parsed.iter().zip(&leads) {
                    let sort = match field {
                        OrderField::Id => Some(l.id),
                        OrderField::CreatedAt => l.created_at.flatten(),
                        OrderField::UpdatedAt => l.updated_at.flatten(),
                    };
                    prop_assert_eq!((p.id, p.sort), (l.id, sort));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The merge.

fn merge_case() -> impl Strategy<Value = MergeCase> {
    // Few distinct ids and sort values, so duplicates (across and within streams) and ties are
    // common; sometimes null sort values and extremes.
    let value = prop_oneof![8 => 0i64..40, 1 => prop_oneof![Just(i64::MIN), Just(i64::MAX)]];
    let lead = (value.clone(), prop::option::weighted(0.9, value));
    let stream = (prop::collection::vec(lead, 0..40), 1usize..9);
    (
        prop::collection::vec(stream, 1..9),
        prop::sample::select(vec![
            OrderField::Id,
            OrderField::CreatedAt,
            OrderField::UpdatedAt,
        ]),
        any::<bool>(),
    )
        .prop_map(|(streams, field, desc)| {
            let order = Order {
                field,
                direction: if desc {
                    Direction::Desc
                } else {
                    Direction::Asc
                },
            };
            let sizes = streams.iter().map(|(_, size)| *size).collect();
            MergeCase::new(order, streams.into_iter().map(|(s, _)| s).collect(), sizes)
        })
}

proptest! {
    #![proptest_config(config(600, 0x6b6f_6d6d_6f04))]

    /// The `merge` fuzz target's invariants: sorted, no repeated id, nothing lost, exactly the
    /// reference merge, never asking an ended stream.
    #[test]
    fn merge_is_sorted_unique_complete_and_lazy(case in merge_case()) {
        check_merge(&case);
    }
}
