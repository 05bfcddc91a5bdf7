//! The sim's own reading of Kommo's `GET /api/v4/leads` query language (written apart from the
//! proxy's parser on purpose, so each checks the other), and the selection of matching leads.
//!
//! The contacts and companies lists take only paging and `order[id]` ([`ListQuery`]); a leads list
//! may also carry `If-Modified-Since` ([`parse_http_date`]).
//!
//! Keys are percent-decoded first, so `filter%5Bid%5D%5B%5D` is `filter[id][]`. Lists accept the three
//! spellings in use: repeated keys, `[]`, and PHP indices `[0]`. Unknown parameters are ignored.
//!
//! The events feed's query (`events.rs`) is read with the same key and paging helpers, and the
//! `Date` header every answer carries is written by [`format_http_date`], the inverse of
//! [`parse_http_date`].

use std::collections::BTreeSet;

use super::data::{self, FieldKind, Store};
use super::{SimLead, TokenSpec};

/// Kommo's maximum of `limit`: more on a write is a `422`, more on a read gives [`DEFAULT_LIMIT`].
pub(crate) const MAX_LIMIT: u32 = 250;
/// `limit` when none is given (the SDK's default).
pub(crate) const DEFAULT_LIMIT: u32 = 50;

/// A parsed `GET /api/v4/leads` request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LeadsQuery {
    /// Page number, from 1.
    pub(crate) page: u32,
    /// Page size, 1..=250.
    pub(crate) limit: u32,
    /// The `with` extras.
    pub(crate) with: WithSet,
    /// Sort order.
    pub(crate) order: Order,
    /// `query`, lower-cased; `None` when absent or blank.
    pub(crate) search: Option<String>,
    /// The filters.
    pub(crate) filter: Filter,
    /// `If-Modified-Since` as Unix seconds: only leads with `updated_at` at or after it.
    pub(crate) modified_since: Option<i64>,
}

/// Every `filter[...]` of a request; each `Some`/non-empty part must match (AND), values within a
/// list are alternatives (OR).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Filter {
    /// `filter[id]`.
    pub(crate) ids: Option<Vec<i64>>,
    /// `filter[name]`: exact names.
    pub(crate) names: Option<Vec<String>>,
    /// `filter[pipeline_id]`.
    pub(crate) pipeline_ids: Option<Vec<i64>>,
    /// `filter[created_by]`.
    pub(crate) created_by: Option<Vec<i64>>,
    /// `filter[updated_by]`.
    pub(crate) updated_by: Option<Vec<i64>>,
    /// `filter[responsible_user_id]`.
    pub(crate) responsible_user_ids: Option<Vec<i64>>,
    /// `filter[created_at]`.
    pub(crate) created_at: Range,
    /// `filter[updated_at]`.
    pub(crate) updated_at: Range,
    /// `filter[closed_at]`.
    pub(crate) closed_at: Range,
    /// `filter[closest_task_at]`.
    pub(crate) closest_task_at: Range,
    /// `filter[price]`.
    pub(crate) price: Range,
    /// `filter[statuses]`: at most one distinct `(pipeline_id, status_id)` pair.
    pub(crate) stage: Option<(i64, i64)>,
    /// `filter[custom_fields_values]`.
    pub(crate) custom_fields: Vec<FieldFilter>,
}

/// An inclusive range; a single value `filter[x]=v` sets both ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Range {
    /// Lower bound.
    pub(crate) from: Option<i64>,
    /// Upper bound.
    pub(crate) to: Option<i64>,
}

/// A filter on one custom field.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldFilter {
    /// The field.
    pub(crate) field_id: i64,
    /// Accepted values (any of them); empty: no value condition.
    pub(crate) values: Vec<String>,
    /// Numeric lower bound.
    pub(crate) from: Option<f64>,
    /// Numeric upper bound.
    pub(crate) to: Option<f64>,
}

/// The `with` extras a request asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WithSet {
    /// `_embedded.contacts`.
    pub(crate) contacts: bool,
    /// `_embedded.loss_reason`.
    pub(crate) loss_reason: bool,
    /// `_embedded.catalog_elements`.
    pub(crate) catalog_elements: bool,
    /// Top-level `is_price_modified_by_robot`.
    pub(crate) is_price_modified_by_robot: bool,
    /// Top-level `source_id` filled in.
    pub(crate) source_id: bool,
    /// `_embedded.source`.
    pub(crate) source: bool,
    /// Only deleted leads, mostly-null shape.
    pub(crate) only_deleted: bool,
}

/// A sort order: one field, ties broken by id in the same direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Order {
    /// The field.
    pub(crate) field: OrderField,
    /// Descending?
    pub(crate) desc: bool,
}

/// The fields Kommo sorts leads by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum OrderField {
    /// `order[id]`, also the default.
    #[default]
    Id,
    /// `order[created_at]`.
    CreatedAt,
    /// `order[updated_at]`.
    UpdatedAt,
}

/// A `400` the query earned; rendered as Kommo's validation problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueryError {
    /// The problem's top-level `detail`.
    pub(crate) detail: String,
    /// The failing parameter, dotted (`filter.statuses`).
    pub(crate) path: String,
    /// Kommo-style error code.
    pub(crate) code: &'static str,
    /// What was wrong with it.
    pub(crate) message: String,
}

impl QueryError {
    pub(crate) fn new(
        path: impl Into<String>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            detail: "Request validation failed".to_string(),
            path: path.into(),
            code,
            message: message.into(),
        }
    }

    fn not_int(path: &str, value: &str) -> Self {
        Self::new(
            path,
            "InvalidType",
            format!("This value should be of type int, got {value:?}."),
        )
    }
}

impl Default for LeadsQuery {
    fn default() -> Self {
        Self {
            page: 1,
            limit: DEFAULT_LIMIT,
            with: WithSet::default(),
            order: Order::default(),
            search: None,
            filter: Filter::default(),
            modified_since: None,
        }
    }
}

/// Parse a raw query string (without the `?`).
pub(crate) fn parse(raw: &str) -> Result<LeadsQuery, QueryError> {
    let mut q = LeadsQuery::default();
    // filter[statuses][N][...] entries by N, in first-seen order: (N, pipeline_id, status_id).
    let mut stages: Vec<(String, Option<i64>, Option<i64>)> = Vec::new();
    let mut order_fields: BTreeSet<String> = BTreeSet::new();
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        let Some((base, segs)) = split_key(&key) else {
            continue;
        };
        match (base, segs.as_slice()) {
            ("page", []) => q.page = parse_page(&value)?,
            ("limit", []) => q.limit = parse_limit(&value)?,
            ("query", []) => {
                let needle = value.trim();
                q.search = (!needle.is_empty()).then(|| needle.to_lowercase());
            }
            ("with", []) => {
                for part in value.split(',') {
                    q.with.add(part.trim());
                }
            }
            ("order", [field]) => {
                q.order.field = match *field {
                    "id" => OrderField::Id,
                    "created_at" => OrderField::CreatedAt,
                    "updated_at" => OrderField::UpdatedAt,
                    other => {
                        return Err(QueryError::new(
                            format!("order.{other}"),
                            "NotSupportedChoice",
                            "The value you selected is not a valid choice.",
                        ))
                    }
                };
                q.order.desc = match value.trim().to_ascii_lowercase().as_str() {
                    "asc" => false,
                    "desc" => true,
                    _ => {
                        return Err(QueryError::new(
                            format!("order.{field}"),
                            "NotSupportedChoice",
                            format!("Sort direction must be asc or desc, got {value:?}."),
                        ))
                    }
                };
                order_fields.insert((*field).to_string());
            }
            ("filter", [field, rest @ ..]) => {
                parse_filter(&mut q.filter, &mut stages, field, rest, &value)?
            }
            _ => {}
        }
    }
    if order_fields.len() > 1 {
        return Err(QueryError::new(
            "order",
            "NotSupportedChoice",
            "Only one sort field is allowed.",
        ));
    }
    let mut pairs: BTreeSet<(i64, i64)> = BTreeSet::new();
    for (n, pipeline_id, status_id) in stages {
        match (pipeline_id, status_id) {
            (Some(p), Some(s)) => {
                pairs.insert((p, s));
            }
            (None, _) => {
                return Err(QueryError::new(
                    format!("filter.statuses.{n}.pipeline_id"),
                    "NotBlank",
                    "This value should not be blank.",
                ))
            }
            (_, None) => {
                return Err(QueryError::new(
                    format!("filter.statuses.{n}.status_id"),
                    "NotBlank",
                    "This value should not be blank.",
                ))
            }
        }
    }
    if pairs.len() > 1 {
        return Err(QueryError::new(
            "filter.statuses",
            "NotSupportedChoice",
            "Only one stage of one pipeline can be filtered in one request.",
        ));
    }
    q.filter.stage = pairs.into_iter().next();
    Ok(q)
}

pub(crate) fn parse_page(value: &str) -> Result<u32, QueryError> {
    match value.trim().parse::<u32>() {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(QueryError::new(
            "page",
            "InvalidValue",
            format!("page must be an integer from 1, got {value:?}."),
        )),
    }
}

/// `limit` of a read. Above [`MAX_LIMIT`] it quietly falls back to [`DEFAULT_LIMIT`], no error: so
/// SDK users report the live API (amocrm/amocrm-api-php#210; the events list alike,
/// Krukov/amocrm_api#76; `kommo-api-notes.md`). Not a number, or below 1: `400`.
fn parse_limit(value: &str) -> Result<u32, QueryError> {
    parse_limit_up_to(value, MAX_LIMIT)
}

/// `limit` of a read whose maximum is `max`: above it, quietly [`DEFAULT_LIMIT`] (see
/// `parse_limit`); not a number, or below 1: `400`.
pub(crate) fn parse_limit_up_to(value: &str, max: u32) -> Result<u32, QueryError> {
    let digits = value.trim();
    let limit: i64 = match digits.parse() {
        Ok(limit) => limit,
        // A number too long for i64 is still a number above the maximum.
        Err(_) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => i64::MAX,
        Err(_) => return Err(QueryError::not_int("limit", value)),
    };
    if limit > i64::from(max) {
        return Ok(DEFAULT_LIMIT);
    }
    if limit < 1 {
        return Err(QueryError::new(
            "limit",
            "InvalidValue",
            "limit must be at least 1.",
        ));
    }
    Ok(limit as u32)
}

/// A parsed `GET /api/v4/contacts` or `GET /api/v4/companies` request: paging and `order[id]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListQuery {
    /// Page number, from 1.
    pub(crate) page: u32,
    /// Page size, 1..=250 (more falls back to 50, as for leads).
    pub(crate) limit: u32,
    /// `order[id]=desc`.
    pub(crate) desc: bool,
}

impl Default for ListQuery {
    fn default() -> Self {
        Self {
            page: 1,
            limit: DEFAULT_LIMIT,
            desc: false,
        }
    }
}

/// Parse the query of a contacts or companies list; other parameters are ignored.
pub(crate) fn parse_list(raw: &str) -> Result<ListQuery, QueryError> {
    let mut q = ListQuery::default();
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        let Some((base, segs)) = split_key(&key) else {
            continue;
        };
        match (base, segs.as_slice()) {
            ("page", []) => q.page = parse_page(&value)?,
            ("limit", []) => q.limit = parse_limit(&value)?,
            ("order", ["id"]) => {
                q.desc = match value.trim().to_ascii_lowercase().as_str() {
                    "asc" => false,
                    "desc" => true,
                    _ => {
                        return Err(QueryError::new(
                            "order.id",
                            "NotSupportedChoice",
                            format!("Sort direction must be asc or desc, got {value:?}."),
                        ))
                    }
                }
            }
            ("order", [other]) => {
                return Err(QueryError::new(
                    format!("order.{other}"),
                    "NotSupportedChoice",
                    "The value you selected is not a valid choice.",
                ))
            }
            _ => {}
        }
    }
    Ok(q)
}

/// An `If-Modified-Since` value in RFC 9110's IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) as Unix
/// seconds; `None` for anything else, which the caller ignores (RFC 9110 §13.1.3).
///
/// Kommo's API recommendations advise the header to fetch "recently updated entities"
/// (amocrm/amocrm-api-php#162; `kommo-api-notes.md`: "Kommo recommends `If-Modified-Since`").
pub(crate) fn parse_http_date(value: &str) -> Option<i64> {
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let b = value.trim().as_bytes();
    // "Sun, 06 Nov 1994 08:49:37 GMT": fixed positions, 29 bytes.
    if b.len() != 29 || &b[3..5] != b", " || b[7] != b' ' || b[11] != b' ' || b[16] != b' ' {
        return None;
    }
    if b[19] != b':' || b[22] != b':' || &b[25..] != b" GMT" {
        return None;
    }
    let text = |range: std::ops::Range<usize>| std::str::from_utf8(&b[range]).ok();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = &b[range];
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    if !DAYS.iter().any(|d| Some(*d) == text(0..3)) {
        return None;
    }
    let day = number(5..7)?;
    let month = MONTHS.iter().position(|m| Some(*m) == text(8..11))? as i64 + 1;
    let year = number(12..16)?;
    let (hour, minute, second) = (number(17..19)?, number(20..22)?, number(23..25)?);
    let days_in_month = match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    // 60 seconds allows a leap second's spelling.
    if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // The day name is redundant (RFC 9110 §5.6.7): one that does not fit the date is a client's
    // slip, not another moment, so only its spelling is checked.
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 §5.6.7): the sim's
/// `Date` header, so that a client reading it learns the clock behind the timestamps the sim writes.
pub(crate) fn format_http_date(unix: i64) -> String {
    use std::fmt::Write as _;
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    let mut out = String::with_capacity(29);
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "{}, {day:02} {} {year:04} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    );
    out
}

/// The proleptic Gregorian date `(year, month, day)` of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, the inverse of [`days_from_civil`]).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `filter[a][b][]` → `("filter", ["a", "b", ""])`; `None` for a malformed bracket.
pub(crate) fn split_key(key: &str) -> Option<(&str, Vec<&str>)> {
    let Some(open) = key.find('[') else {
        return Some((key, Vec::new()));
    };
    let base = &key[..open];
    let mut rest = &key[open..];
    let mut segs = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let close = inner.find(']')?;
        segs.push(&inner[..close]);
        rest = &inner[close + 1..];
    }
    Some((base, segs))
}

/// Whether the remaining segments spell one element of a list: nothing, `[]` or `[N]`.
pub(crate) fn is_list_element(rest: &[&str]) -> bool {
    match rest {
        [] => true,
        [index] => index.is_empty() || index.bytes().all(|b| b.is_ascii_digit()),
        _ => false,
    }
}

pub(crate) fn parse_int(path: &str, value: &str) -> Result<i64, QueryError> {
    value
        .trim()
        .parse()
        .map_err(|_| QueryError::not_int(path, value))
}

fn parse_filter(
    filter: &mut Filter,
    stages: &mut Vec<(String, Option<i64>, Option<i64>)>,
    field: &str,
    rest: &[&str],
    value: &str,
) -> Result<(), QueryError> {
    let path = format!("filter.{field}");
    match field {
        "id" | "pipeline_id" | "created_by" | "updated_by" | "responsible_user_id" => {
            if !is_list_element(rest) {
                return Ok(());
            }
            let v = parse_int(&path, value)?;
            let list = match field {
                "id" => &mut filter.ids,
                "pipeline_id" => &mut filter.pipeline_ids,
                "created_by" => &mut filter.created_by,
                "updated_by" => &mut filter.updated_by,
                _ => &mut filter.responsible_user_ids,
            };
            list.get_or_insert_with(Vec::new).push(v);
        }
        "name" if is_list_element(rest) => {
            filter
                .names
                .get_or_insert_with(Vec::new)
                .push(value.to_string());
        }
        "created_at" | "updated_at" | "closed_at" | "closest_task_at" | "price" => {
            let range = match field {
                "created_at" => &mut filter.created_at,
                "updated_at" => &mut filter.updated_at,
                "closed_at" => &mut filter.closed_at,
                "closest_task_at" => &mut filter.closest_task_at,
                _ => &mut filter.price,
            };
            match rest {
                [] => {
                    let v = parse_int(&path, value)?;
                    *range = Range {
                        from: Some(v),
                        to: Some(v),
                    };
                }
                ["from"] => range.from = Some(parse_int(&format!("{path}.from"), value)?),
                ["to"] => range.to = Some(parse_int(&format!("{path}.to"), value)?),
                _ => {}
            }
        }
        "statuses" => {
            let [n, which] = rest else {
                return Ok(());
            };
            let slot = match stages.iter().position(|(k, _, _)| k == n) {
                Some(i) => i,
                None => {
                    stages.push(((*n).to_string(), None, None));
                    stages.len() - 1
                }
            };
            match *which {
                "pipeline_id" => {
                    stages[slot].1 = Some(parse_int(&format!("{path}.{n}.pipeline_id"), value)?)
                }
                "status_id" => {
                    stages[slot].2 = Some(parse_int(&format!("{path}.{n}.status_id"), value)?)
                }
                _ => {}
            }
        }
        "custom_fields_values" => {
            let [field_id, tail @ ..] = rest else {
                return Ok(());
            };
            let field_id = parse_int(&format!("{path}.field_id"), field_id)?;
            let slot = match filter
                .custom_fields
                .iter()
                .position(|f| f.field_id == field_id)
            {
                Some(i) => i,
                None => {
                    filter.custom_fields.push(FieldFilter {
                        field_id,
                        ..FieldFilter::default()
                    });
                    filter.custom_fields.len() - 1
                }
            };
            let entry = &mut filter.custom_fields[slot];
            let number = |bound: &str| {
                value.trim().parse::<f64>().map_err(|_| {
                    QueryError::new(
                        format!("{path}.{field_id}.{bound}"),
                        "InvalidType",
                        format!("This value should be a number, got {value:?}."),
                    )
                })
            };
            match tail {
                ["from"] => entry.from = Some(number("from")?),
                ["to"] => entry.to = Some(number("to")?),
                t if is_list_element(t) => entry.values.push(value.to_string()),
                _ => {}
            }
        }
        _ => {}
    }
    Ok(())
}

// === impl WithSet ===

impl WithSet {
    fn add(&mut self, name: &str) {
        match name {
            "contacts" => self.contacts = true,
            "loss_reason" => self.loss_reason = true,
            "catalog_elements" => self.catalog_elements = true,
            "is_price_modified_by_robot" => self.is_price_modified_by_robot = true,
            "source_id" => self.source_id = true,
            "source" => self.source = true,
            "only_deleted" => self.only_deleted = true,
            _ => {}
        }
    }
}

// === impl LeadsQuery ===

impl LeadsQuery {
    /// Whether a lead matches every filter (the stage filter excepted: the caller reads the stage
    /// index) and is visible to `token`.
    fn matches(&self, lead: &SimLead, token: &TokenSpec) -> bool {
        let f = &self.filter;
        lead.is_deleted == self.with.only_deleted
            && token.sees(lead.responsible_user_id)
            && self.modified_since.is_none_or(|t| lead.updated_at >= t)
            && in_list(&f.ids, &lead.id)
            && in_list(&f.names, &lead.name)
            && in_list(&f.pipeline_ids, &lead.pipeline_id)
            && in_list(&f.created_by, &lead.created_by)
            && in_list(&f.updated_by, &lead.updated_by)
            && in_list(&f.responsible_user_ids, &lead.responsible_user_id)
            && f.created_at.contains(Some(lead.created_at))
            && f.updated_at.contains(Some(lead.updated_at))
            && f.closed_at.contains(lead.closed_at)
            && f.closest_task_at.contains(lead.closest_task_at)
            && f.price.contains(Some(lead.price))
            && f.custom_fields.iter().all(|cf| cf.matches(lead))
            && match &self.search {
                None => true,
                Some(needle) => search_hit(needle, lead),
            }
    }

    /// Positions in `store.leads` of the matching leads, in the requested order.
    pub(crate) fn select(&self, store: &Store, token: &TokenSpec) -> Vec<u32> {
        let lead = |pos: u32| &store.leads[pos as usize];
        // Candidates in ascending id order (positions follow ids).
        let mut hits: Vec<u32> = if let Some(stage) = self.filter.stage {
            store
                .stage_positions(stage)
                .iter()
                .copied()
                .filter(|&p| self.matches(lead(p), token))
                .collect()
        } else if let Some(ids) = &self.filter.ids {
            let mut positions: Vec<u32> = ids.iter().filter_map(|&id| store.position(id)).collect();
            positions.sort_unstable();
            positions.dedup();
            positions.retain(|&p| self.matches(lead(p), token));
            positions
        } else {
            (0..store.leads.len() as u32)
                .filter(|&p| self.matches(lead(p), token))
                .collect()
        };
        match self.order.field {
            OrderField::Id => {}
            OrderField::CreatedAt => hits.sort_by_key(|&p| (lead(p).created_at, lead(p).id)),
            OrderField::UpdatedAt => hits.sort_by_key(|&p| (lead(p).updated_at, lead(p).id)),
        }
        if self.order.desc {
            // Reversing the (key, id) order keeps ties broken by id in the same direction.
            hits.reverse();
        }
        hits
    }
}

/// `None` (no such filter) matches; a list matches if it holds the value.
fn in_list<T: PartialEq>(list: &Option<Vec<T>>, value: &T) -> bool {
    match list {
        None => true,
        Some(list) => list.contains(value),
    }
}

/// `query`: case-insensitive substring of the name or a custom field value, or the exact id or price.
fn search_hit(needle: &str, lead: &SimLead) -> bool {
    contains_ci(&lead.name, needle)
        || lead.id.to_string() == needle
        || lead.price.to_string() == needle
        || lead
            .custom_fields
            .iter()
            .any(|(_, value)| contains_ci(value, needle))
}

/// Case-insensitive substring test; `needle` is already lower-case.
fn contains_ci(haystack: &str, needle: &str) -> bool {
    if haystack.is_ascii() && needle.is_ascii() {
        let (h, n) = (haystack.as_bytes(), needle.as_bytes());
        n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
    } else {
        haystack.to_lowercase().contains(needle)
    }
}

// === impl Range ===

impl Range {
    /// Whether a value is inside; a missing value (e.g. `closed_at` of an open lead) is inside only
    /// an unconstrained range.
    fn contains(&self, value: Option<i64>) -> bool {
        if self.from.is_none() && self.to.is_none() {
            return true;
        }
        let Some(v) = value else {
            return false;
        };
        self.from.is_none_or(|b| b <= v) && self.to.is_none_or(|b| b >= v)
    }
}

// === impl FieldFilter ===

impl FieldFilter {
    fn matches(&self, lead: &SimLead) -> bool {
        let checkbox = data::field(self.field_id).is_some_and(|f| f.kind == FieldKind::Checkbox);
        let mut values = lead
            .custom_fields
            .iter()
            .filter(|(id, _)| *id == self.field_id)
            .map(|(_, v)| v.as_str());
        values.any(|v| {
            let value_ok = self.values.is_empty()
                || self.values.iter().any(|want| {
                    want == v
                        || (checkbox
                            && matches!((want.as_str(), v), ("1", "true") | ("0", "false")))
                });
            let range_ok = if self.from.is_some() || self.to.is_some() {
                v.parse::<f64>().is_ok_and(|n| {
                    self.from.is_none_or(|b| b <= n) && self.to.is_none_or(|b| b >= n)
                })
            } else {
                true
            };
            value_ok && range_ok
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_spellings_are_equivalent() {
        let spellings = [
            "filter[id]=5&filter[id]=7",
            "filter[id][]=5&filter[id][]=7",
            "filter[id][0]=5&filter[id][1]=7",
            "filter%5Bid%5D%5B%5D=5&filter%5Bid%5D%5B%5D=7",
            "filter%5Bid%5D%5B0%5D=5&filter%5Bid%5D%5B1%5D=7",
        ];
        for raw in spellings {
            let q = parse(raw).unwrap();
            assert_eq!(q.filter.ids, Some(vec![5, 7]), "{raw}");
        }
    }

    #[test]
    fn statuses_one_pair_ok_two_pairs_rejected() {
        let q = parse("filter[statuses][0][pipeline_id]=1000&filter[statuses][0][status_id]=142")
            .unwrap();
        assert_eq!(q.filter.stage, Some((1000, 142)));
        // The same pair twice is still one stage.
        let q = parse(
            "filter[statuses][0][pipeline_id]=1000&filter[statuses][0][status_id]=142\
             &filter[statuses][1][pipeline_id]=1000&filter[statuses][1][status_id]=142",
        )
        .unwrap();
        assert_eq!(q.filter.stage, Some((1000, 142)));
        let err = parse(
            "filter[statuses][0][pipeline_id]=1000&filter[statuses][0][status_id]=142\
             &filter[statuses][1][pipeline_id]=2000&filter[statuses][1][status_id]=142",
        )
        .unwrap_err();
        assert_eq!(err.path, "filter.statuses");
        let err = parse("filter[statuses][0][status_id]=142").unwrap_err();
        assert_eq!(err.path, "filter.statuses.0.pipeline_id");
    }

    #[test]
    fn paging_and_order() {
        let q = parse("").unwrap();
        assert_eq!((q.page, q.limit, q.order), (1, 50, Order::default()));
        let q = parse("page=3&limit=250&order[updated_at]=DESC").unwrap();
        assert_eq!((q.page, q.limit), (3, 250));
        assert_eq!(
            q.order,
            Order {
                field: OrderField::UpdatedAt,
                desc: true
            }
        );
        // Over the maximum, a read quietly gets the default page size.
        assert_eq!(parse("limit=251").unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(parse("limit=500&page=2").unwrap().limit, DEFAULT_LIMIT);
        assert_eq!(parse("limit=99999999999999999999999").unwrap().limit, 50);
        assert!(parse("limit=0").is_err());
        assert!(parse("limit=-5").is_err());
        assert!(parse("limit=1.5").is_err());
        assert!(parse("limit=abc").is_err());
        assert!(parse("page=0").is_err());
        assert!(parse("order[price]=asc").is_err());
        assert!(parse("order[id]=up").is_err());
        assert!(parse("order[id]=asc&order[created_at]=asc").is_err());
    }

    #[test]
    fn ranges_fields_and_garbage() {
        let q = parse(
            "filter[created_at][from]=10&filter[created_at][to]=20&filter[price]=5\
             &filter[custom_fields_values][501][]=300&filter[custom_fields_values][501][from]=1\
             &with=contacts,only_deleted&query=%20Acme%20&unknown=1&filter[bogus]=x&weird[=1",
        )
        .unwrap();
        assert_eq!(
            q.filter.created_at,
            Range {
                from: Some(10),
                to: Some(20)
            }
        );
        assert_eq!(
            q.filter.price,
            Range {
                from: Some(5),
                to: Some(5)
            }
        );
        assert_eq!(q.filter.custom_fields.len(), 1);
        assert_eq!(q.filter.custom_fields[0].values, vec!["300".to_string()]);
        assert_eq!(q.filter.custom_fields[0].from, Some(1.0));
        assert!(q.with.contacts && q.with.only_deleted && !q.with.source);
        assert_eq!(q.search.as_deref(), Some("acme"));
        assert!(parse("filter[id][]=x").is_err());
        assert!(parse("filter[created_at][from]=yesterday").is_err());
        assert!(parse("filter[statuses][0][pipeline_id]=a").is_err());
    }

    #[test]
    fn case_insensitive_search() {
        assert!(contains_ci("Globex pilot 123", "pilot"));
        assert!(contains_ci("GLOBEX", "globex"));
        assert!(contains_ci("Müller order 5", "müller"));
        assert!(!contains_ci("Acme", "acmee"));
    }

    #[test]
    fn contacts_list_query() {
        assert_eq!(parse_list("").unwrap(), ListQuery::default());
        let q = parse_list("page=2&limit=10&order[id]=DESC&filter[id]=3&with=leads").unwrap();
        assert_eq!(
            q,
            ListQuery {
                page: 2,
                limit: 10,
                desc: true
            }
        );
        assert_eq!(parse_list("limit=300").unwrap().limit, DEFAULT_LIMIT);
        assert!(parse_list("order%5Bid%5D=desc").unwrap().desc);
        for bad in [
            "limit=x",
            "limit=0",
            "page=0",
            "order[id]=up",
            "order[name]=asc",
        ] {
            assert!(parse_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn http_dates_are_written_as_read() {
        assert_eq!(
            format_http_date(784_111_777),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(format_http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(format_http_date(data::NOW), "Sat, 01 Jun 2024 00:00:00 GMT");
        assert_eq!(
            format_http_date(1_709_251_199),
            "Thu, 29 Feb 2024 23:59:59 GMT"
        );
        assert_eq!(
            format_http_date(4_102_444_800),
            "Fri, 01 Jan 2100 00:00:00 GMT"
        );
        // Every day over some centuries, at a moment that moves through the day.
        let mut t = -2_208_988_800; // 1900-01-01
        while t < 4_133_980_800 {
            let text = format_http_date(t);
            assert_eq!(text.len(), 29, "{text}");
            assert_eq!(parse_http_date(&text), Some(t), "{text}");
            t += 86_400 + 3_607;
        }
    }

    #[test]
    fn http_dates() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        // A day name that does not fit the date is forgiven (2100-01-01 is a Friday).
        assert_eq!(
            parse_http_date("Wed, 01 Jan 2100 00:00:00 GMT"),
            Some(4_102_444_800)
        );
        // The dataset's "now".
        assert_eq!(
            parse_http_date(" Sat, 01 Jun 2024 00:00:00 GMT "),
            Some(data::NOW)
        );
        assert_eq!(
            parse_http_date("Thu, 29 Feb 2024 23:59:59 GMT"),
            Some(1_709_251_199)
        );
        for bad in [
            "",
            "yesterday",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 31 Nov 1994 08:49:37 GMT",
            "Fri, 29 Feb 2023 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 0x Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49:37 GMT!",
            "Sun, 06 Növ 1994 08:49:37GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad:?}");
        }
    }
}
