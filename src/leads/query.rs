//! Parsing and validating the query string of `GET /api/v4/leads` in all of Kommo's spellings.
//!
//! Kommo (a PHP application) accepts a list as repeated keys (`filter[id]=1&filter[id]=2`), as
//! `[]` (`filter[id][]=1`) or PHP-indexed (`filter[id][0]=1`), with the brackets raw or
//! percent-encoded. The parser reads every spelling, validates what the proxy must understand
//! (paging, order, stage pairs, the integer filters) and keeps every parameter it does not need
//! to change in its original raw form, so it reaches the upstream byte for byte.

use std::collections::BTreeMap;
use std::fmt;

/// Kommo's largest page.
pub const MAX_LIMIT: u32 = 250;
/// Kommo's (and its PHP SDK's) default page size.
pub const DEFAULT_LIMIT: u32 = 50;

/// One stage of one pipeline: the unit Kommo can filter by in one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StagePair {
    /// The pipeline the stage belongs to (142 and 143 exist in every pipeline).
    pub pipeline_id: i64,
    /// The stage (status) within that pipeline.
    pub status_id: i64,
}

impl fmt::Display for StagePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pipeline_id={} status_id={}",
            self.pipeline_id, self.status_id
        )
    }
}

/// The field a leads list is ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderField {
    Id,
    CreatedAt,
    UpdatedAt,
}

impl OrderField {
    /// The name Kommo uses, both in `order[...]` and in the lead object.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderField::Id => "id",
            OrderField::CreatedAt => "created_at",
            OrderField::UpdatedAt => "updated_at",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "id" => Some(OrderField::Id),
            "created_at" => Some(OrderField::CreatedAt),
            "updated_at" => Some(OrderField::UpdatedAt),
            _ => None,
        }
    }
}

/// Ascending or descending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Asc,
    Desc,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Asc => "asc",
            Direction::Desc => "desc",
        }
    }
}

/// A complete order: the field, its direction; ties are broken by `id` in the same direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Order {
    pub field: OrderField,
    pub direction: Direction,
}

impl Order {
    /// The merged order when the client names none: Kommo's observed default, ascending id.
    pub const DEFAULT: Order = Order {
        field: OrderField::Id,
        direction: Direction::Asc,
    };

    /// The `order[field]=dir` parameter that asks the upstream for this order.
    pub fn to_param(self) -> String {
        format!(
            "order%5B{}%5D={}",
            self.field.as_str(),
            self.direction.as_str()
        )
    }
}

/// One parameter the client sent that the request is invalid because of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidParam {
    /// The parameter as the client spelled it (decoded).
    pub name: String,
    /// What is wrong with it, in words a person can act on.
    pub reason: String,
}

/// A parsed, validated leads list query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeadsQuery {
    /// The client's page, from 1.
    pub page: u32,
    /// The client's page size, 1..=250.
    pub limit: u32,
    /// The order the client asked for, if any.
    pub order: Option<Order>,
    /// Distinct stage pairs in the order first seen.
    pub pairs: Vec<StagePair>,
    /// How many `filter[statuses]` entries the client sent (duplicates included).
    pub pair_entries: usize,
    /// Every parameter other than `page`, `limit`, `order[...]` and `filter[statuses]...`, in
    /// its original raw (still percent-encoded) form and order: forwarded unchanged.
    pub forward: Vec<String>,
    /// The raw form of every parameter except `page`: what the HAL links repeat.
    pub link_params: Vec<String>,
}

impl LeadsQuery {
    /// The order the merged answer follows.
    pub fn effective_order(&self) -> Order {
        self.order.unwrap_or(Order::DEFAULT)
    }

    /// Number of leads to skip before the requested page.
    pub fn offset(&self) -> u64 {
        u64::from(self.page - 1) * u64::from(self.limit)
    }
}

/// Limits the parser enforces (from the configuration).
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// At most this many distinct stage pairs per request (`--max-pairs`).
    pub max_pairs: usize,
}

/// A decoded query parameter with its raw form.
#[derive(Debug, Clone)]
pub struct RawParam<'a> {
    /// The `key=value` segment exactly as it arrived.
    pub raw: &'a str,
    /// The decoded key, e.g. `filter[statuses][0][status_id]`.
    pub key: String,
    /// The decoded value.
    pub value: String,
}

/// Splits a query string into its parameters, decoding keys and values but keeping each raw
/// segment. Empty segments (`a=1&&b=2`) are dropped.
pub fn split_params(query: &str) -> Vec<RawParam<'_>> {
    query
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|raw| {
            let (k, v) = raw.split_once('=').unwrap_or((raw, ""));
            RawParam {
                raw,
                key: decode(k),
                value: decode(v),
            }
        })
        .collect()
}

fn decode(s: &str) -> String {
    // Only `%XX` and `+` change in decoding; most names and values have neither.
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return s.to_string();
    }
    form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// A key split into its name and bracketed segments: `filter[id][]` → (`filter`, `["id", ""]`).
/// Returns `None` for keys with unbalanced brackets.
pub fn key_path(key: &str) -> Option<(&str, Vec<&str>)> {
    let Some(open) = key.find('[') else {
        return Some((key, Vec::new()));
    };
    let name = &key[..open];
    let mut rest = &key[open..];
    let mut segments = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let close = inner.find(']')?;
        segments.push(&inner[..close]);
        rest = &inner[close + 1..];
    }
    Some((name, segments))
}

/// Integer filters: the values must be integers, whatever the list spelling.
const INT_LIST_FILTERS: &[&str] = &[
    "id",
    "pipeline_id",
    "created_by",
    "updated_by",
    "responsible_user_id",
];
/// Range filters: `[from]`, `[to]` or a single value, all integers.
const RANGE_FILTERS: &[&str] = &[
    "created_at",
    "updated_at",
    "closed_at",
    "closest_task_at",
    "price",
];

/// Where one `filter[statuses]` entry stands: an explicit index, or (for `[]` and unindexed
/// spellings) its position among the entries of the same field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum EntrySlot {
    Indexed(String),
    Positional(usize),
}

#[derive(Default)]
struct PartialPair {
    pipeline_id: Option<(String, Result<i64, String>)>,
    status_id: Option<(String, Result<i64, String>)>,
}

/// Parses and validates the query string of a leads list request.
pub fn parse(query: &str, limits: QueryLimits) -> Result<LeadsQuery, Vec<InvalidParam>> {
    let mut invalid = Vec::new();
    let mut page = None;
    let mut limit = None;
    let mut order: Option<(String, Order)> = None;
    let mut forward = Vec::new();
    let mut link_params = Vec::new();
    let mut entries: BTreeMap<EntrySlot, PartialPair> = BTreeMap::new();
    let mut positional = [0usize; 2];

    for param in split_params(query) {
        let bad = |reason: String| InvalidParam {
            name: param.key.clone(),
            reason,
        };
        // The upstream (PHP) ignores leading spaces in a parameter name: ` filter[statuses]...`
        // is a stage filter there, so it is one here too, never forwarded as an unknown key.
        let Some((name, segments)) = key_path(param.key.trim_start_matches(' ')) else {
            invalid.push(bad("unbalanced brackets in the parameter name".into()));
            continue;
        };
        if name != "page" {
            link_params.push(param.raw.to_string());
        }
        match (name, segments.as_slice()) {
            ("page", []) => match parse_bounded(&param.value, 1, u32::MAX) {
                Ok(v) => page = Some(v),
                Err(_) => invalid.push(bad(format!(
                    "must be a whole number from 1 (got {:?})",
                    param.value
                ))),
            },
            ("limit", []) => match parse_limit(&param.value) {
                Ok(v) => limit = Some(v),
                Err(_) => invalid.push(bad(format!(
                    "must be a whole number from 1 to {MAX_LIMIT} (got {:?})",
                    param.value
                ))),
            },
            ("order", [field]) => {
                let Some(field) = OrderField::parse(field) else {
                    invalid.push(bad(format!(
                        "unknown order field {field:?}: use order[id], order[created_at] or order[updated_at]"
                    )));
                    continue;
                };
                let direction = match param.value.to_ascii_lowercase().as_str() {
                    "asc" => Direction::Asc,
                    "desc" => Direction::Desc,
                    _ => {
                        invalid.push(bad(format!(
                            "order direction must be asc or desc (got {:?})",
                            param.value
                        )));
                        continue;
                    }
                };
                let new = Order { field, direction };
                match &order {
                    Some((first, o)) if *o != new => invalid.push(bad(format!(
                        "only one order is allowed per request; {first} already given"
                    ))),
                    _ => order = Some((param.key.clone(), new)),
                }
            }
            // `order[a][b]...` is no order Kommo knows; forwarded, it would add a second order
            // to every fan-out stream next to the merge order.
            ("order", [_, _, ..]) => invalid.push(bad(
                "unknown order: use order[id], order[created_at] or order[updated_at]".into(),
            )),
            ("filter", ["statuses", rest @ ..]) => {
                let (slot, field) = match rest {
                    [index, field] if !index.is_empty() => {
                        (EntrySlot::Indexed(index.to_string()), *field)
                    }
                    [_, field] | [field] => {
                        let counter = match *field {
                            "pipeline_id" => &mut positional[0],
                            "status_id" => &mut positional[1],
                            _ => {
                                invalid.push(bad(
                                    "a stage entry takes pipeline_id and status_id".into()
                                ));
                                continue;
                            }
                        };
                        *counter += 1;
                        (EntrySlot::Positional(*counter - 1), *field)
                    }
                    _ => {
                        invalid.push(bad(
                            "use filter[statuses][N][pipeline_id] and filter[statuses][N][status_id]"
                                .into(),
                        ));
                        continue;
                    }
                };
                let entry = entries.entry(slot).or_default();
                let value = (param.key.clone(), parse_int(&param.value));
                match field {
                    "pipeline_id" => entry.pipeline_id = Some(value),
                    "status_id" => entry.status_id = Some(value),
                    other => invalid.push(bad(format!(
                        "unknown stage field {other:?}: a stage entry takes pipeline_id and status_id"
                    ))),
                }
            }
            ("filter", [field, ..]) if INT_LIST_FILTERS.contains(field) => {
                if segments.len() > 2 {
                    invalid.push(bad(format!("filter[{field}] is a list of integers")));
                } else if parse_int(&param.value).is_err() {
                    invalid.push(bad(format!("must be an integer (got {:?})", param.value)));
                }
                forward.push(param.raw.to_string());
            }
            ("filter", [field, rest @ ..]) if RANGE_FILTERS.contains(field) => {
                if !matches!(rest, [] | ["from" | "to"]) {
                    invalid.push(bad(format!(
                        "use filter[{field}][from], filter[{field}][to] or filter[{field}]"
                    )));
                } else if parse_int(&param.value).is_err() {
                    invalid.push(bad(format!(
                        "must be an integer{} (got {:?})",
                        if *field == "price" {
                            ""
                        } else {
                            ", a Unix timestamp"
                        },
                        param.value
                    )));
                }
                forward.push(param.raw.to_string());
            }
            ("filter", ["custom_fields_values", field_id, ..]) => {
                if parse_int(field_id).is_err() {
                    invalid.push(bad(format!(
                        "the custom field id must be an integer (got {field_id:?})"
                    )));
                }
                forward.push(param.raw.to_string());
            }
            _ => forward.push(param.raw.to_string()),
        }
    }

    let mut pairs: Vec<StagePair> = Vec::new();
    let mut pair_entries = 0;
    for (slot, entry) in entries {
        pair_entries += 1;
        let label = match &slot {
            EntrySlot::Indexed(i) => format!("filter[statuses][{i}]"),
            EntrySlot::Positional(i) => format!("filter[statuses] entry {}", i + 1),
        };
        let mut get = |part: Option<(String, Result<i64, String>)>, what: &str| match part {
            None => {
                invalid.push(InvalidParam {
                    name: format!("{label}[{what}]"),
                    reason: format!("missing: every stage entry needs both pipeline_id and status_id ({what} is absent)"),
                });
                None
            }
            Some((name, Err(value))) => {
                invalid.push(InvalidParam {
                    name,
                    reason: format!("must be an integer (got {value:?})"),
                });
                None
            }
            Some((_, Ok(v))) => Some(v),
        };
        let pipeline_id = get(entry.pipeline_id, "pipeline_id");
        let status_id = get(entry.status_id, "status_id");
        if let (Some(pipeline_id), Some(status_id)) = (pipeline_id, status_id) {
            let pair = StagePair {
                pipeline_id,
                status_id,
            };
            if !pairs.contains(&pair) {
                pairs.push(pair);
            }
        }
    }
    if pairs.len() > limits.max_pairs {
        invalid.push(InvalidParam {
            name: "filter[statuses]".into(),
            reason: format!(
                "{} distinct stages requested; at most {} are allowed per request",
                pairs.len(),
                limits.max_pairs
            ),
        });
    }

    if !invalid.is_empty() {
        return Err(invalid);
    }
    Ok(LeadsQuery {
        page: page.unwrap_or(1),
        limit: limit.unwrap_or(DEFAULT_LIMIT),
        order: order.map(|(_, o)| o),
        pairs,
        pair_entries,
        forward,
        link_params,
    })
}

fn parse_int(s: &str) -> Result<i64, String> {
    s.trim().parse::<i64>().map_err(|_| s.to_string())
}

/// `limit` as Kommo reads it: above the maximum it quietly answers its default page
/// (amocrm/amocrm-api-php#210), so an integration that asks for 500 gets pages of 50.
fn parse_limit(s: &str) -> Result<u32, ()> {
    let digits = s.trim().strip_prefix('+').unwrap_or(s.trim());
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    match digits.parse::<u32>() {
        Ok(0) => Err(()),
        Ok(v) if v <= MAX_LIMIT => Ok(v),
        _ => Ok(DEFAULT_LIMIT),
    }
}

fn parse_bounded(s: &str, min: u32, max: u32) -> Result<u32, ()> {
    match s.trim().parse::<u32>() {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => Err(()),
    }
}

/// The raw parameters that select one stage, as the upstream gets them.
pub fn pair_params(pair: StagePair) -> [String; 2] {
    [
        format!(
            "filter%5Bstatuses%5D%5B0%5D%5Bpipeline_id%5D={}",
            pair.pipeline_id
        ),
        format!(
            "filter%5Bstatuses%5D%5B0%5D%5Bstatus_id%5D={}",
            pair.status_id
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: QueryLimits = QueryLimits { max_pairs: 100 };

    fn ok(q: &str) -> LeadsQuery {
        parse(q, LIMITS).unwrap_or_else(|e| panic!("{q}: {e:?}"))
    }

    fn names(q: &str) -> Vec<String> {
        parse(q, LIMITS)
            .expect_err("should be invalid")
            .into_iter()
            .map(|p| p.name)
            .collect()
    }

    fn pair(pipeline_id: i64, status_id: i64) -> StagePair {
        StagePair {
            pipeline_id,
            status_id,
        }
    }

    #[test]
    fn defaults() {
        let q = ok("");
        assert_eq!((q.page, q.limit, q.order), (1, 50, None));
        assert!(q.pairs.is_empty());
        assert_eq!(q.effective_order(), Order::DEFAULT);
    }

    #[test]
    fn indexed_pairs_raw_and_encoded_brackets() {
        let raw = "filter[statuses][0][pipeline_id]=1&filter[statuses][0][status_id]=142&filter[statuses][7][pipeline_id]=2&filter[statuses][7][status_id]=142";
        let enc = raw.replace('[', "%5B").replace(']', "%5D");
        let lower = raw.replace('[', "%5b").replace(']', "%5d");
        for q in [raw.to_string(), enc, lower] {
            assert_eq!(ok(&q).pairs, vec![pair(1, 142), pair(2, 142)], "{q}");
        }
    }

    #[test]
    fn duplicate_pairs_count_once_and_order_is_first_seen() {
        let q = ok("filter[statuses][3][status_id]=10&filter[statuses][3][pipeline_id]=1&filter[statuses][9][pipeline_id]=1&filter[statuses][9][status_id]=10&filter[statuses][10][pipeline_id]=5&filter[statuses][10][status_id]=142");
        assert_eq!(q.pairs.len(), 2);
        assert_eq!(q.pair_entries, 3);
        assert!(q.pairs.contains(&pair(1, 10)) && q.pairs.contains(&pair(5, 142)));
    }

    #[test]
    fn unindexed_and_bracket_pairs_zip_by_position() {
        let q = ok("filter[statuses][][pipeline_id]=1&filter[statuses][][status_id]=2&filter[statuses][][pipeline_id]=3&filter[statuses][][status_id]=4");
        assert_eq!(q.pairs, vec![pair(1, 2), pair(3, 4)]);
        let q = ok("filter[statuses][pipeline_id]=1&filter[statuses][status_id]=2");
        assert_eq!(q.pairs, vec![pair(1, 2)]);
    }

    #[test]
    fn incomplete_pair_names_the_missing_half() {
        let n = names("filter[statuses][0][pipeline_id]=1");
        assert_eq!(n, vec!["filter[statuses][0][status_id]"]);
        let n = names("filter[statuses][2][status_id]=1");
        assert_eq!(n, vec!["filter[statuses][2][pipeline_id]"]);
    }

    #[test]
    fn non_integer_ids_are_named() {
        let n = names("filter[statuses][0][pipeline_id]=x&filter[statuses][0][status_id]=1&filter[id][]=5&filter[id][]=abc&filter[responsible_user_id][0]=1.5");
        assert_eq!(
            n,
            vec![
                "filter[id][]",
                "filter[responsible_user_id][0]",
                "filter[statuses][0][pipeline_id]"
            ]
        );
    }

    #[test]
    fn list_spellings_validated_alike() {
        for q in [
            "filter[id]=1&filter[id]=2",
            "filter[id][]=1&filter[id][]=2",
            "filter[id][0]=1&filter[id][1]=2",
            "filter%5Bid%5D%5B%5D=1",
        ] {
            assert!(parse(q, LIMITS).is_ok(), "{q}");
        }
        assert_eq!(names("filter[id]=1&filter[id]=x"), vec!["filter[id]"]);
    }

    #[test]
    fn paging_bounds() {
        assert_eq!(ok("limit=250&page=3").limit, 250);
        assert_eq!(ok("limit=1").limit, 1);
        // Above the maximum, Kommo's default page.
        for q in ["limit=251", "limit=500", "limit=99999999999999"] {
            assert_eq!(ok(q).limit, 50, "{q}");
        }
        assert_eq!(ok("limit=%2B7").limit, 7);
        for q in [
            "limit=0",
            "limit=000",
            "limit=abc",
            "limit=-1",
            "limit=",
            "limit=1.5",
        ] {
            assert_eq!(names(q), vec!["limit"], "{q}");
        }
        for q in ["page=0", "page=-2", "page=x", "page="] {
            assert_eq!(names(q), vec!["page"], "{q}");
        }
        assert_eq!(ok("page=3&limit=7").offset(), 14);
    }

    #[test]
    fn orders() {
        let q = ok("order[created_at]=desc");
        assert_eq!(
            q.order,
            Some(Order {
                field: OrderField::CreatedAt,
                direction: Direction::Desc
            })
        );
        assert_eq!(
            ok("order%5Bupdated_at%5D=ASC").order.map(|o| o.field),
            Some(OrderField::UpdatedAt)
        );
        assert_eq!(names("order[price]=asc"), vec!["order[price]"]);
        assert_eq!(names("order[id]=up"), vec!["order[id]"]);
        assert_eq!(
            names("order[id]=asc&order[created_at]=asc"),
            vec!["order[created_at]"]
        );
        // The same order twice is not a conflict.
        assert!(parse("order[id]=asc&order[id]=asc", LIMITS).is_ok());
    }

    #[test]
    fn ranges_and_custom_fields() {
        assert!(parse("filter[created_at][from]=1&filter[created_at][to]=2&filter[price]=5&filter[custom_fields_values][77][]=a&filter[custom_fields_values][77][from]=1", LIMITS).is_ok());
        assert_eq!(
            names("filter[created_at][from]=yesterday"),
            vec!["filter[created_at][from]"]
        );
        assert_eq!(
            names("filter[closed_at][since]=1"),
            vec!["filter[closed_at][since]"]
        );
        assert_eq!(
            names("filter[custom_fields_values][abc][]=1"),
            vec!["filter[custom_fields_values][abc][]"]
        );
    }

    #[test]
    fn max_pairs() {
        let q: Vec<String> = (0..3)
            .map(|i| {
                format!("filter[statuses][{i}][pipeline_id]=1&filter[statuses][{i}][status_id]={i}")
            })
            .collect();
        let err = parse(&q.join("&"), QueryLimits { max_pairs: 2 }).unwrap_err();
        assert_eq!(err[0].name, "filter[statuses]");
        assert!(err[0].reason.contains("at most 2"));
    }

    #[test]
    fn other_parameters_forwarded_raw_in_order() {
        let q = ok("with=contacts,loss_reason&query=%D0%90+b&page=2&filter%5Bname%5D=x&unknown[a]=1&limit=5&order[id]=desc&filter[statuses][0][pipeline_id]=1&filter[statuses][0][status_id]=2");
        assert_eq!(
            q.forward,
            vec![
                "with=contacts,loss_reason",
                "query=%D0%90+b",
                "filter%5Bname%5D=x",
                "unknown[a]=1"
            ]
        );
        assert!(!q.link_params.iter().any(|p| p.starts_with("page=")));
        assert_eq!(q.link_params.len(), 8);
    }

    #[test]
    fn fuzz_leading_spaces_do_not_hide_a_stage_or_an_order() {
        // Broke the fuzz/query_parse invariant: PHP drops leading spaces of a name, so these
        // reached every fan-out stream as a second stage (or order) when forwarded raw.
        let q = ok("+filter[statuses][1][pipeline_id]=5&%20filter[statuses][1][status_id]=6&filter[statuses][0][pipeline_id]=1&filter[statuses][0][status_id]=2");
        assert_eq!(q.pairs, vec![pair(1, 2), pair(5, 6)]);
        assert!(q.forward.is_empty());
        let q = ok("+order[created_at]=desc");
        assert_eq!(q.order.map(|o| o.field), Some(OrderField::CreatedAt));
        assert!(q.forward.is_empty());
        assert_eq!(ok("+page=2&+limit=3").limit, 3);
        // Only leading spaces: elsewhere a space keeps the name unknown, and it is forwarded.
        assert_eq!(
            ok("filter+[statuses]=1").forward,
            vec!["filter+[statuses]=1"]
        );
    }

    #[test]
    fn fuzz_nested_order_keys_are_invalid() {
        // Found by fuzz/query_parse: `order[x][y]=...` was forwarded, so each fan-out stream
        // asked the upstream for two orders.
        assert_eq!(
            names("order[created_at][x]=desc"),
            vec!["order[created_at][x]"]
        );
        assert_eq!(
            names("order%5Bupdated_at%5s][77_at][from]=1"),
            vec!["order[updated_at%5s][77_at][from]"]
        );
        // A plain `order=...` is still forwarded as before.
        assert_eq!(ok("order=desc").forward, vec!["order=desc"]);
    }

    #[test]
    fn split_params_decodes() {
        let p = split_params("a%5Bb%5D=c+d&&e");
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].key.as_str(), p[0].value.as_str()), ("a[b]", "c d"));
        assert_eq!((p[1].key.as_str(), p[1].value.as_str()), ("e", ""));
        assert_eq!(key_path("filter[id][]"), Some(("filter", vec!["id", ""])));
        assert_eq!(key_path("filter[id"), None);
    }
}
