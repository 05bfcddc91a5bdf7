//! Which leads requests the replica can answer exactly, and how: the filters of a view, and the
//! `with` parts stripped from leads the replica holds with more than a request asked for.
//!
//! The replica answers only what it can answer exactly as Kommo would. The integer lists and the
//! `[from]`/`[to]` ranges are evaluated here, read the way the simulated account reads them
//! (`sim/src/query.rs`); anything else (full-text `query`, custom fields, names, a lone scalar
//! range, a `with` the replica did not fetch, a spelling whose meaning on Kommo's side is
//! uncertain) is [`NotEvaluable`], and the fan-out answers it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use bytes::Bytes;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::replica::Lead;
use crate::leads::query::{key_path, split_params, LeadsQuery, Order, StagePair};

/// One `with` value whose data the replica can hold in its leads: what it adds to a lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WithPart {
    /// `_embedded.contacts`.
    Contacts,
    /// `_embedded.loss_reason`.
    LossReason,
    /// `_embedded.catalog_elements`.
    CatalogElements,
    /// The top-level `source_id`, filled in (it is `null` without it).
    SourceId,
    /// The top-level `is_price_modified_by_robot` member.
    IsPriceModifiedByRobot,
    /// `_embedded.source`.
    Source,
}

impl WithPart {
    /// Every part, in the order [`Held::with_param`] names them.
    pub const ALL: [WithPart; 6] = [
        WithPart::Contacts,
        WithPart::LossReason,
        WithPart::CatalogElements,
        WithPart::SourceId,
        WithPart::IsPriceModifiedByRobot,
        WithPart::Source,
    ];

    /// The name Kommo uses in `with`.
    pub fn as_str(self) -> &'static str {
        match self {
            WithPart::Contacts => "contacts",
            WithPart::LossReason => "loss_reason",
            WithPart::CatalogElements => "catalog_elements",
            WithPart::SourceId => "source_id",
            WithPart::IsPriceModifiedByRobot => "is_price_modified_by_robot",
            WithPart::Source => "source",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        WithPart::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// The member of `_embedded` it adds, for the parts that add one.
    fn embedded_key(self) -> Option<&'static str> {
        match self {
            WithPart::Contacts | WithPart::LossReason | WithPart::CatalogElements => {
                Some(self.as_str())
            }
            WithPart::Source => Some("source"),
            WithPart::SourceId | WithPart::IsPriceModifiedByRobot => None,
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of [`WithPart`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct WithParts(u8);

impl WithParts {
    /// Whether `part` is in the set.
    pub fn contains(self, part: WithPart) -> bool {
        self.0 & part.bit() != 0
    }

    /// Adds `part` to the set.
    pub fn insert(&mut self, part: WithPart) {
        self.0 |= part.bit();
    }

    /// Whether the set has no part.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The parts of `self` not in `other`.
    pub fn without(self, other: WithParts) -> WithParts {
        WithParts(self.0 & !other.0)
    }

    /// The parts in the set, in [`WithPart::ALL`]'s order.
    pub fn iter(self) -> impl Iterator<Item = WithPart> {
        WithPart::ALL.into_iter().filter(move |&p| self.contains(p))
    }
}

/// What the replica holds besides the plain lead: the `with` values its reads ask for
/// (`--sync-with`). A request may ask for these or fewer; the replica strips the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    parts: WithParts,
}

impl Held {
    /// The parts held.
    pub fn parts(&self) -> WithParts {
        self.parts
    }

    /// The value of `with` the replica's reads send (`contacts,loss_reason`), `None` when it
    /// holds nothing besides the plain lead.
    pub fn with_param(&self) -> Option<String> {
        let names: Vec<&str> = self.parts.iter().map(WithPart::as_str).collect();
        (!names.is_empty()).then(|| names.join(","))
    }
}

/// The held set of a list of `with` names (each trimmed; duplicates are harmless).
pub fn held(names: &[String]) -> Result<Held, String> {
    let mut parts = WithParts::default();
    for name in names {
        match name.trim() {
            "only_deleted" => {
                return Err(
                    "with=only_deleted cannot be held: it lists deleted leads instead of adding \
                     to each lead"
                        .into(),
                )
            }
            name => match WithPart::parse(name) {
                Some(part) => parts.insert(part),
                None => {
                    let known: Vec<&str> = WithPart::ALL.iter().map(|p| p.as_str()).collect();
                    return Err(format!(
                        "unknown with value {name:?}: the replica can hold {}",
                        known.join(", ")
                    ));
                }
            },
        }
    }
    Ok(Held { parts })
}

/// An inclusive range of one field, either bound optional. A lead whose field is `null` is
/// outside every range that has a bound (as `closed_at` of an open lead is in Kommo's reading).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    /// `[from]`: the least value inside.
    pub from: Option<i64>,
    /// `[to]`: the greatest value inside.
    pub to: Option<i64>,
}

impl Range {
    /// No bound: every lead is inside, `null` or not.
    pub fn is_open(&self) -> bool {
        self.from.is_none() && self.to.is_none()
    }

    /// Whether a lead whose field is `value` is inside.
    pub fn contains(&self, value: Option<i64>) -> bool {
        if self.is_open() {
            return true;
        }
        value.is_some_and(|v| self.from.is_none_or(|f| f <= v) && self.to.is_none_or(|t| v <= t))
    }
}

/// The filters of a view. They combine with AND; the values of one list with OR. A list is
/// sorted and without duplicates; `None` is no filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// `filter[id]`.
    pub id: Option<Vec<i64>>,
    /// `filter[pipeline_id]`: a stage of another pipeline has no leads in the view.
    pub pipeline_id: Option<Vec<i64>>,
    /// `filter[responsible_user_id]`.
    pub responsible_user_id: Option<Vec<i64>>,
    /// `filter[created_by]`.
    pub created_by: Option<Vec<i64>>,
    /// `filter[updated_by]`.
    pub updated_by: Option<Vec<i64>>,
    /// `filter[price][from|to]`.
    pub price: Range,
    /// `filter[created_at][from|to]`.
    pub created_at: Range,
    /// `filter[updated_at][from|to]`.
    pub updated_at: Range,
    /// `filter[closed_at][from|to]`.
    pub closed_at: Range,
    /// `filter[closest_task_at][from|to]`.
    pub closest_task_at: Range,
}

impl Filters {
    /// Whether `lead` passes every filter (its stage aside).
    pub fn matches(&self, lead: &Lead) -> bool {
        in_list(&self.id, Some(lead.id))
            && in_list(&self.pipeline_id, Some(lead.stage.pipeline_id))
            && in_list(&self.responsible_user_id, lead.responsible_user_id)
            && in_list(&self.created_by, lead.created_by)
            && in_list(&self.updated_by, lead.updated_by)
            && self.price.contains(lead.price)
            && self.created_at.contains(lead.created_at)
            && self.updated_at.contains(Some(lead.updated_at))
            && self.closed_at.contains(lead.closed_at)
            && self.closest_task_at.contains(lead.closest_task_at)
    }

    /// Whether a lead of pipeline `pipeline_id` can pass the `pipeline_id` filter: a stage
    /// whose pipeline is not listed has no leads in the view.
    pub fn admits_pipeline(&self, pipeline_id: i64) -> bool {
        in_list(&self.pipeline_id, Some(pipeline_id))
    }

    fn list_mut(&mut self, field: &str) -> Option<&mut Option<Vec<i64>>> {
        Some(match field {
            "id" => &mut self.id,
            "pipeline_id" => &mut self.pipeline_id,
            "responsible_user_id" => &mut self.responsible_user_id,
            "created_by" => &mut self.created_by,
            "updated_by" => &mut self.updated_by,
            _ => return None,
        })
    }

    fn range_mut(&mut self, field: &str) -> Option<&mut Range> {
        Some(match field {
            "price" => &mut self.price,
            "created_at" => &mut self.created_at,
            "updated_at" => &mut self.updated_at,
            "closed_at" => &mut self.closed_at,
            "closest_task_at" => &mut self.closest_task_at,
            _ => return None,
        })
    }
}

/// No list: every value passes. A list: the value must be in it (a `null` never is).
fn in_list(list: &Option<Vec<i64>>, value: Option<i64>) -> bool {
    match list {
        None => true,
        Some(list) => value.is_some_and(|v| list.binary_search(&v).is_ok()),
    }
}

/// A view the replica can evaluate exactly: the leads of `stages` that pass `filters`, in
/// `order`, each carrying the `with` parts the request asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The request's distinct stages, in the order it named them.
    pub stages: Vec<StagePair>,
    /// The order of the answer (ties by id in the same direction).
    pub order: Order,
    /// What a lead must pass besides its stage.
    pub filters: Filters,
    /// The held parts the request did not ask for: removed from each lead's bytes.
    strip: WithParts,
}

impl View {
    /// Whether `lead` is in the view: in one of its stages, and passing every filter.
    pub fn matches(&self, lead: &Lead) -> bool {
        self.stages.contains(&lead.stage) && self.filters.matches(lead)
    }

    /// The held parts this view removes from each lead.
    pub fn strip(&self) -> WithParts {
        self.strip
    }

    /// The lead's bytes as this view's answer carries them: the held bytes unchanged when the
    /// request asked for every held part, else with exactly what the other parts add removed.
    /// Every member left is kept as its bytes were; a lead that is not a JSON object (no lead
    /// from [`super::replica::parse_page`]) is returned as it is.
    pub fn bytes(&self, lead: &Lead) -> Bytes {
        if self.strip.is_empty() {
            return lead.raw.clone();
        }
        strip_parts(&lead.raw, self.strip).map_or_else(|| lead.raw.clone(), Bytes::from)
    }
}

/// Why the replica cannot answer a request exactly: the fan-out answers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotEvaluable {
    /// What kind of parameter it is.
    pub reason: Reason,
    /// The parameter that decided it, as the client named it (decoded).
    pub param: String,
}

impl fmt::Display for NotEvaluable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.param)
    }
}

/// The kind of a [`NotEvaluable`], with a short fixed name fit for a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No `filter[statuses]`: not a view of stages.
    NoStages,
    /// `query`: full-text search over fields the replica does not index.
    Search,
    /// `filter[custom_fields_values]`.
    CustomFields,
    /// A filter the replica does not evaluate (`filter[name]`, unknown ones).
    Filter,
    /// A list element spelled other than `[]`, `[N]` or a repeated key, or one index twice.
    ListIndex,
    /// A range given as one value (`filter[updated_at]=T`), whose meaning on Kommo's side is
    /// uncertain.
    ScalarRange,
    /// `with=only_deleted`.
    OnlyDeleted,
    /// A `with` value the replica does not hold.
    WithNotHeld,
    /// `with` given twice or as an array.
    WithSpelling,
    /// A parameter name with leading spaces: the upstream drops them, the simulated account
    /// does not, so its meaning is uncertain.
    LeadingSpace,
    /// Any other parameter.
    Parameter,
}

impl Reason {
    /// The short name, e.g. `scalar_range`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoStages => "no_stages",
            Reason::Search => "query",
            Reason::CustomFields => "custom_fields",
            Reason::Filter => "filter",
            Reason::ListIndex => "list_index",
            Reason::ScalarRange => "scalar_range",
            Reason::OnlyDeleted => "only_deleted",
            Reason::WithNotHeld => "with_not_held",
            Reason::WithSpelling => "with_spelling",
            Reason::LeadingSpace => "leading_space",
            Reason::Parameter => "parameter",
        }
    }
}

/// The view of a parsed leads query, or why the replica cannot answer it exactly.
///
/// Reads `query.forward`, every parameter but paging, order and stages, in any of Kommo's
/// list spellings (repeated keys, `[]`, `[N]`, percent-encoded brackets; values of one list are
/// alternatives). A repeated `[from]` or `[to]` keeps the last value, as PHP and the simulated
/// account both do. Headers are not read: a request whose `If-Modified-Since` filters the list
/// is the caller's to leave to the fan-out.
pub fn view(query: &LeadsQuery, held: &Held) -> Result<View, NotEvaluable> {
    if query.pairs.is_empty() {
        return Err(NotEvaluable {
            reason: Reason::NoStages,
            param: "filter[statuses]".into(),
        });
    }
    let mut filters = Filters::default();
    let mut asked = WithParts::default();
    let mut with_seen = false;
    // Explicit list indices seen, per filter: PHP keeps the last value of an index given twice,
    // the simulated account keeps both.
    let mut indices: HashSet<(String, String)> = HashSet::new();
    for raw in &query.forward {
        for param in split_params(raw) {
            let refuse = |reason: Reason| NotEvaluable {
                reason,
                param: param.key.clone(),
            };
            if param.key.starts_with(' ') {
                return Err(refuse(Reason::LeadingSpace));
            }
            let Some((name, segments)) = key_path(&param.key) else {
                return Err(refuse(Reason::Parameter));
            };
            match (name, segments.as_slice()) {
                ("query", []) => return Err(refuse(Reason::Search)),
                ("with", []) if !with_seen => {
                    with_seen = true;
                    for name in param.value.split(',').map(str::trim) {
                        match name {
                            "" => {}
                            "only_deleted" => return Err(refuse(Reason::OnlyDeleted)),
                            name => match WithPart::parse(name) {
                                Some(part) if held.parts.contains(part) => asked.insert(part),
                                _ => return Err(refuse(Reason::WithNotHeld)),
                            },
                        }
                    }
                }
                ("with", _) => return Err(refuse(Reason::WithSpelling)),
                ("filter", ["custom_fields_values", ..]) => {
                    return Err(refuse(Reason::CustomFields))
                }
                ("filter", [field, rest @ ..]) => {
                    // The parser let only integers through for these; checked again all the same.
                    let Ok(value) = param.value.trim().parse::<i64>() else {
                        return Err(refuse(Reason::Filter));
                    };
                    if let Some(list) = filters.list_mut(field) {
                        match rest {
                            [] | [""] => {}
                            [index] if index.bytes().all(|b| b.is_ascii_digit()) => {
                                if !indices.insert((field.to_string(), index.to_string())) {
                                    return Err(refuse(Reason::ListIndex));
                                }
                            }
                            _ => return Err(refuse(Reason::ListIndex)),
                        }
                        list.get_or_insert_with(Vec::new).push(value);
                    } else if let Some(range) = filters.range_mut(field) {
                        match rest {
                            ["from"] => range.from = Some(value),
                            ["to"] => range.to = Some(value),
                            [] => return Err(refuse(Reason::ScalarRange)),
                            _ => return Err(refuse(Reason::Filter)),
                        }
                    } else {
                        return Err(refuse(Reason::Filter));
                    }
                }
                ("filter", _) => return Err(refuse(Reason::Filter)),
                _ => return Err(refuse(Reason::Parameter)),
            }
        }
    }
    for list in [
        &mut filters.id,
        &mut filters.pipeline_id,
        &mut filters.responsible_user_id,
        &mut filters.created_by,
        &mut filters.updated_by,
    ]
    .into_iter()
    .flatten()
    {
        list.sort_unstable();
        list.dedup();
    }
    Ok(View {
        stages: query.pairs.clone(),
        order: query.effective_order(),
        filters,
        strip: held.parts.without(asked),
    })
}

// === stripping ===

/// The members of one JSON object in their order: decoded names, values as written.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(MembersVisitor)
    }
}

/// Writes an object of `members`: names as JSON strings, values as given.
fn write_object<'a>(members: impl Iterator<Item = (&'a str, &'a [u8])>, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    out.push(b'{');
    for (i, (name, value)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Serializing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, name);
        out.push(b':');
        out.extend_from_slice(value);
    }
    out.push(b'}');
    out
}

/// `lead` without what `parts` add: the top-level `is_price_modified_by_robot` member removed,
/// the top-level `source_id` set to `null` (Kommo lists it as `null` without the `with`), the
/// parts' members of `_embedded` removed. `None` when nothing changes or `lead` is no object.
fn strip_parts(lead: &[u8], parts: WithParts) -> Option<Vec<u8>> {
    let members: Members<'_> = serde_json::from_slice(lead).ok()?;
    let mut changed = false;
    let mut kept: Vec<(&str, Cow<'_, [u8]>)> = Vec::with_capacity(members.0.len());
    for (name, value) in &members.0 {
        let value = value.get().as_bytes();
        let value = match name.as_str() {
            "is_price_modified_by_robot" if parts.contains(WithPart::IsPriceModifiedByRobot) => {
                changed = true;
                continue;
            }
            "source_id" if parts.contains(WithPart::SourceId) && value != b"null" => {
                changed = true;
                Cow::Borrowed(&b"null"[..])
            }
            "_embedded" => match strip_embedded(value, parts) {
                Some(stripped) => {
                    changed = true;
                    Cow::Owned(stripped)
                }
                None => Cow::Borrowed(value),
            },
            _ => Cow::Borrowed(value),
        };
        kept.push((name, value));
    }
    changed.then(|| write_object(kept.iter().map(|(n, v)| (*n, v.as_ref())), lead.len()))
}

/// `_embedded` without the members `parts` add; `None` when none is there (or it is no object).
fn strip_embedded(text: &[u8], parts: WithParts) -> Option<Vec<u8>> {
    let members: Members<'_> = serde_json::from_slice(text).ok()?;
    let drop = |name: &str| parts.iter().any(|p| p.embedded_key() == Some(name));
    if !members.0.iter().any(|(name, _)| drop(name)) {
        return None;
    }
    let kept = members
        .0
        .iter()
        .filter(|(name, _)| !drop(name))
        .map(|(name, value)| (name.as_str(), value.get().as_bytes()));
    Some(write_object(kept, text.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leads::query::{parse, Direction, OrderField, QueryLimits};

    const STAGES: &str = "filter[statuses][0][pipeline_id]=1&filter[statuses][0][status_id]=10&filter[statuses][1][pipeline_id]=2&filter[statuses][1][status_id]=142";

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn all_held() -> Held {
        held(&names(&WithPart::ALL.map(WithPart::as_str))).unwrap()
    }

    fn view_of(extra: &str, held: &Held) -> Result<View, NotEvaluable> {
        let q = format!("{STAGES}&{extra}");
        let query =
            parse(&q, QueryLimits { max_pairs: 100 }).unwrap_or_else(|e| panic!("{q}: {e:?}"));
        view(&query, held)
    }

    fn ok(extra: &str) -> View {
        view_of(extra, &all_held()).unwrap_or_else(|e| panic!("{extra}: {e}"))
    }

    fn refused(extra: &str, held: &Held) -> Reason {
        match view_of(extra, held) {
            Ok(v) => panic!("{extra} was evaluable: {v:?}"),
            Err(e) => e.reason,
        }
    }

    fn lead() -> Lead {
        Lead {
            id: 5,
            stage: StagePair {
                pipeline_id: 1,
                status_id: 10,
            },
            responsible_user_id: Some(7),
            created_by: Some(8),
            updated_by: None,
            price: Some(100),
            created_at: Some(1_000),
            updated_at: 2_000,
            closed_at: None,
            closest_task_at: Some(3_000),
            raw: Bytes::from_static(b"{\"id\":5}"),
        }
    }

    #[test]
    fn held_accepts_the_six_and_refuses_only_deleted_and_unknown() {
        let h = all_held();
        assert_eq!(h.parts().iter().count(), 6);
        assert_eq!(
            h.with_param().as_deref(),
            Some(
                "contacts,loss_reason,catalog_elements,source_id,is_price_modified_by_robot,source"
            )
        );
        let h = held(&names(&[" loss_reason", "contacts", "contacts"])).unwrap();
        assert_eq!(h.with_param().as_deref(), Some("contacts,loss_reason"));
        assert_eq!(held(&[]).unwrap().with_param(), None);
        let err = held(&names(&["contacts", "only_deleted"])).unwrap_err();
        assert!(err.contains("only_deleted"), "{err}");
        let err = held(&names(&["companies"])).unwrap_err();
        assert!(
            err.contains("\"companies\"") && err.contains("source_id"),
            "{err}"
        );
    }

    #[test]
    fn stages_and_order_come_from_the_query() {
        let v = ok("order[updated_at]=desc");
        assert_eq!(v.stages.len(), 2);
        assert_eq!(
            v.order,
            Order {
                field: OrderField::UpdatedAt,
                direction: Direction::Desc
            }
        );
        assert_eq!(ok("").order, Order::DEFAULT);
        assert_eq!(ok("").filters, Filters::default());
        let one = parse(
            "filter[statuses][0][pipeline_id]=1&filter[statuses][0][status_id]=2",
            QueryLimits { max_pairs: 9 },
        )
        .unwrap();
        assert!(view(&one, &Held::default()).is_ok());
        let none = parse("filter[id]=1", QueryLimits { max_pairs: 9 }).unwrap();
        assert_eq!(
            view(&none, &Held::default()).unwrap_err().reason,
            Reason::NoStages
        );
    }

    #[test]
    fn every_list_spelling_reads_alike() {
        for field in [
            "id",
            "pipeline_id",
            "responsible_user_id",
            "created_by",
            "updated_by",
        ] {
            for q in [
                format!("filter[{field}]=7&filter[{field}]=3"),
                format!("filter[{field}][]=7&filter[{field}][]=3"),
                format!("filter[{field}][0]=7&filter[{field}][1]=3"),
                format!("filter%5B{field}%5D%5B%5D=7&filter%5B{field}%5D%5B%5D=3"),
                format!("filter%5b{field}%5d%5b1%5d=3&filter[{field}]=%207&filter[{field}][]=3"),
            ] {
                let f = ok(&q).filters;
                let list = match field {
                    "id" => f.id,
                    "pipeline_id" => f.pipeline_id,
                    "responsible_user_id" => f.responsible_user_id,
                    "created_by" => f.created_by,
                    _ => f.updated_by,
                };
                assert_eq!(list, Some(vec![3, 7]), "{q}");
            }
        }
    }

    #[test]
    fn ranges_take_from_and_to() {
        let f = ok("filter[price][from]=5&filter%5Bcreated_at%5D%5Bto%5D=9&filter[closed_at][from]=1&filter[closed_at][from]=2&filter[updated_at][to]=3&filter[closest_task_at][from]=-4").filters;
        assert_eq!(
            f.price,
            Range {
                from: Some(5),
                to: None
            }
        );
        assert_eq!(f.created_at.to, Some(9));
        // The last of a repeated bound.
        assert_eq!(f.closed_at.from, Some(2));
        assert_eq!(f.updated_at.to, Some(3));
        assert_eq!(f.closest_task_at.from, Some(-4));
    }

    #[test]
    fn refuses_what_it_cannot_evaluate() {
        let all = all_held();
        let cases = [
            ("query=acme", Reason::Search),
            ("query=", Reason::Search),
            ("filter[custom_fields_values][77][]=a", Reason::CustomFields),
            (
                "filter[custom_fields_values][77][from]=1",
                Reason::CustomFields,
            ),
            ("filter[name]=x", Reason::Filter),
            ("filter[name][]=x", Reason::Filter),
            ("filter[bogus]=1", Reason::Filter),
            ("filter=1", Reason::Filter),
            ("unknown=1", Reason::Parameter),
            ("_=1700000000", Reason::Parameter),
            ("order=desc", Reason::Parameter),
            ("filter[updated_at]=5", Reason::ScalarRange),
            ("filter[price]=5", Reason::ScalarRange),
            ("filter%5Bcreated_at%5D=5", Reason::ScalarRange),
            ("with=only_deleted", Reason::OnlyDeleted),
            ("with=contacts,only_deleted", Reason::OnlyDeleted),
            ("with=companies", Reason::WithNotHeld),
            ("with[]=contacts", Reason::WithSpelling),
            ("with[0]=contacts", Reason::WithSpelling),
            ("with=contacts&with=source", Reason::WithSpelling),
            ("+filter[id]=1", Reason::LeadingSpace),
            ("%20with=contacts", Reason::LeadingSpace),
            ("filter[id][0]=1&filter[id][0]=2", Reason::ListIndex),
            ("filter[id][a]=1", Reason::ListIndex),
        ];
        for (q, reason) in cases {
            assert_eq!(refused(q, &all), reason, "{q}");
        }
        // Held parts only.
        let contacts = held(&names(&["contacts"])).unwrap();
        assert_eq!(refused("with=loss_reason", &contacts), Reason::WithNotHeld);
        assert_eq!(
            refused("with=contacts", &Held::default()),
            Reason::WithNotHeld
        );
        let e = view_of("query=x", &all).unwrap_err();
        assert_eq!(e.to_string(), "query: query");
    }

    #[test]
    fn with_values_in_any_spelling_within_the_held_set() {
        let contacts_loss = held(&names(&["contacts", "loss_reason", "source"])).unwrap();
        for q in [
            "with=contacts,loss_reason",
            "with=loss_reason%2Ccontacts",
            "with=+contacts+,,loss_reason,",
            "%77ith=contacts,loss_reason,contacts",
        ] {
            let v = view_of(q, &contacts_loss).unwrap_or_else(|e| panic!("{q}: {e}"));
            assert_eq!(
                v.strip().iter().collect::<Vec<_>>(),
                vec![WithPart::Source],
                "{q}"
            );
        }
        let v = view_of("with=", &contacts_loss).unwrap();
        assert_eq!(v.strip(), contacts_loss.parts());
        let v = view_of("with=contacts,loss_reason,source", &contacts_loss).unwrap();
        assert!(v.strip().is_empty());
    }

    #[test]
    fn matches_ands_filters_and_ors_lists() {
        let l = lead();
        assert!(ok("").matches(&l));
        assert!(ok("filter[id][]=4&filter[id][]=5").matches(&l));
        assert!(!ok("filter[id][]=4").matches(&l));
        assert!(ok("filter[pipeline_id]=1&filter[responsible_user_id]=7").matches(&l));
        assert!(!ok("filter[pipeline_id]=2&filter[responsible_user_id]=7").matches(&l));
        assert!(!ok("filter[pipeline_id]=1&filter[responsible_user_id]=6").matches(&l));
        assert!(
            ok("filter[created_by]=8&filter[price][from]=100&filter[price][to]=100").matches(&l)
        );
        assert!(!ok("filter[price][to]=99").matches(&l));
        assert!(ok("filter[updated_at][from]=2000&filter[created_at][to]=1000").matches(&l));
        assert!(!ok("filter[updated_at][from]=2001").matches(&l));
        // A stage outside the view.
        let mut moved = lead();
        moved.stage.status_id = 11;
        assert!(!ok("").matches(&moved));
    }

    #[test]
    fn a_null_field_is_outside_every_bounded_range() {
        let l = lead();
        assert!(!ok("filter[closed_at][from]=0").matches(&l));
        assert!(!ok("filter[closed_at][to]=9999999999").matches(&l));
        assert!(!ok("filter[updated_by]=1").matches(&l));
        assert!(ok("filter[closest_task_at][to]=3000").matches(&l));
        assert!(Range::default().contains(None));
    }

    /// A lead as the simulated account renders it with every `with` part, PHP-style escaping.
    const FULL: &str = r#"{"id":5,"name":"Caf\u00e9 \/ \"5\"","price":100,"responsible_user_id":7,"group_id":0,"status_id":10,"pipeline_id":1,"loss_reason_id":3,"source_id":11,"created_by":8,"updated_by":8,"created_at":1000,"updated_at":2000,"closed_at":null,"closest_task_at":null,"is_deleted":false,"custom_fields_values":[{"field_id":1,"field_name":"Sch\u00f6n","field_code":null,"field_type":"text","values":[{"value":"a\/b"}]}],"score":null,"account_id":1,"labor_cost":null,"is_price_modified_by_robot":false,"_links":{"self":{"href":"https:\/\/a.kommo.com\/api\/v4\/leads\/5?with=contacts"}},"_embedded":{"tags":[{"id":1,"name":"\u00e9","color":null}],"companies":[],"contacts":[{"id":9,"is_main":true,"_links":{"self":{"href":"https:\/\/a.kommo.com\/api\/v4\/contacts\/9"}}}],"loss_reason":[{"id":3,"name":"Price","sort":1,"created_at":1,"updated_at":1,"_links":{"self":{"href":"x"}}}],"catalog_elements":[{"id":4,"metadata":{"quantity":2,"catalog_id":6}}],"source":{"id":11,"name":"Web"}}}"#;

    fn with_raw(raw: &str) -> Lead {
        Lead {
            raw: Bytes::copy_from_slice(raw.as_bytes()),
            ..lead()
        }
    }

    #[test]
    fn bytes_are_unchanged_when_the_request_asks_for_the_held_set() {
        let l = with_raw(FULL);
        let v = ok("with=source,contacts,loss_reason,catalog_elements,source_id,is_price_modified_by_robot");
        assert_eq!(v.bytes(&l), l.raw);
    }

    #[test]
    fn bytes_strip_exactly_what_the_parts_not_asked_add() {
        let l = with_raw(FULL);
        let plain = ok("").bytes(&l);
        let text = std::str::from_utf8(&plain).unwrap();
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let full: serde_json::Value = serde_json::from_str(FULL).unwrap();
        let mut expected = full.clone();
        let top = expected.as_object_mut().unwrap();
        top.remove("is_price_modified_by_robot");
        top.insert("source_id".into(), serde_json::Value::Null);
        let embedded = top["_embedded"].as_object_mut().unwrap();
        for key in ["contacts", "loss_reason", "catalog_elements", "source"] {
            embedded.remove(key);
        }
        assert_eq!(v, expected);
        // Every member left keeps its bytes, escapes included, and its place.
        for member in [
            r#""name":"Caf\u00e9 \/ \"5\"""#,
            r#""custom_fields_values":[{"field_id":1,"field_name":"Sch\u00f6n","field_code":null,"field_type":"text","values":[{"value":"a\/b"}]}]"#,
            r#""_links":{"self":{"href":"https:\/\/a.kommo.com\/api\/v4\/leads\/5?with=contacts"}}"#,
            r#""_embedded":{"tags":[{"id":1,"name":"\u00e9","color":null}],"companies":[]}"#,
            r#""loss_reason_id":3,"source_id":null,"created_by":8"#,
            r#""labor_cost":null,"_links""#,
        ] {
            assert!(text.contains(member), "{member} missing from {text}");
        }

        // One part at a time: only its own data goes.
        let only =
            |q: &str| -> serde_json::Value { serde_json::from_slice(&ok(q).bytes(&l)).unwrap() };
        let v =
            only("with=loss_reason,catalog_elements,source_id,is_price_modified_by_robot,source");
        assert!(v["_embedded"].get("contacts").is_none());
        assert_eq!(
            v["_embedded"]["loss_reason"],
            full["_embedded"]["loss_reason"]
        );
        assert_eq!(v["source_id"], 11);
        let v =
            only("with=contacts,loss_reason,catalog_elements,is_price_modified_by_robot,source");
        assert_eq!(v["source_id"], serde_json::Value::Null);
        assert_eq!(v["_embedded"], full["_embedded"]);
        let v = only("with=contacts,loss_reason,catalog_elements,source_id,source");
        assert!(v.get("is_price_modified_by_robot").is_none());
        assert_eq!(v["_embedded"], full["_embedded"]);
    }

    #[test]
    fn bytes_of_a_lead_without_the_parts_stay_identical() {
        // Pretty-printed and already without contacts: nothing to strip, nothing rewritten.
        let raw = "{\n  \"id\": 5,\n  \"source_id\": null,\n  \"_embedded\": {\"tags\": []}\n}";
        let l = with_raw(raw);
        assert_eq!(&ok("").bytes(&l)[..], raw.as_bytes());
        // Not an object: returned as it is.
        let l = with_raw("[1]");
        assert_eq!(&ok("").bytes(&l)[..], b"[1]");
        // Pretty-printed with a part: members keep their value bytes, whitespace inside kept.
        let raw = "{ \"id\" : 5 ,\n \"_embedded\" : { \"tags\" : [ 1 ], \"contacts\" : [ ] } , \"x\" : { \"a\" : [ 1 , 2 ] } }";
        let l = with_raw(raw);
        assert_eq!(
            &ok("").bytes(&l)[..],
            &br#"{"id":5,"_embedded":{"tags":[ 1 ]},"x":{ "a" : [ 1 , 2 ] }}"#[..]
        );
    }
}
