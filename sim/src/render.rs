//! Response bodies in Kommo's shapes: HAL pages of leads, contacts, companies and events, single
//! leads, contacts and events, pipelines, the account, write results, the OAuth token endpoint's
//! answers and problem+json errors. Pure: bytes in, bytes out.
//!
//! Every body is written by [`to_vec`] in the sim's [`JsonStyle`]; nothing serializes on its own.

use std::io;

use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::ser::{CharEscape, CompactFormatter, Formatter, PrettyFormatter};

use super::data::{self, CardKind, FieldKind, ACCOUNT_ID, CATALOG_ID, LOSS_REASONS, SOURCES};
use super::events::{SimEvent, SimEventValue};
use super::oauth::{Issued, OAuthError};
use super::query::{LeadsQuery, ListQuery, QueryError, WithSet};
use super::{JsonStyle, SimCard, SimLead, SimPipeline};

/// `{"href": ...}`.
#[derive(Serialize)]
struct Href {
    href: String,
}

impl Href {
    fn new(href: String) -> Self {
        Self { href }
    }
}

/// `{"self": {"href": ...}}`.
#[derive(Serialize)]
struct SelfLink {
    #[serde(rename = "self")]
    this: Href,
}

impl SelfLink {
    fn new(href: String) -> Self {
        Self {
            this: Href::new(href),
        }
    }
}

/// The raw query string with `page` set to `page` (replaced in place, or appended).
pub(crate) fn with_page(raw_query: &str, page: u32) -> String {
    let mut out = String::with_capacity(raw_query.len() + 8);
    let mut replaced = false;
    for pair in raw_query.split('&').filter(|p| !p.is_empty()) {
        if !out.is_empty() {
            out.push('&');
        }
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if key == "page" && !replaced {
            out.push_str(&format!("page={page}"));
            replaced = true;
        } else if key == "page" {
            // A second `page` would contradict the first; drop it.
            out.pop();
        } else {
            out.push_str(pair);
        }
    }
    if !replaced {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&format!("page={page}"));
    }
    out
}

/// What every lead of one response is rendered with.
pub(crate) struct LeadCtx<'a> {
    /// `http://host`.
    pub(crate) base: &'a str,
    /// `?` + the request's raw query, or empty: appended to each lead's self link.
    pub(crate) query_suffix: String,
    /// The `with` extras.
    pub(crate) with: WithSet,
}

impl<'a> LeadCtx<'a> {
    /// The context for a request with this raw query.
    pub(crate) fn new(base: &'a str, raw_query: &str, with: WithSet) -> Self {
        let query_suffix = if raw_query.is_empty() {
            String::new()
        } else {
            format!("?{raw_query}")
        };
        Self {
            base,
            query_suffix,
            with,
        }
    }
}

/// A lead as Kommo renders it, keys in Kommo's order.
struct LeadJson<'a> {
    lead: &'a SimLead,
    ctx: &'a LeadCtx<'a>,
}

impl Serialize for LeadJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (l, ctx) = (self.lead, self.ctx);
        // `with=only_deleted`: id, updated_by, updated_at, is_deleted and account_id; the rest null.
        let full = !ctx.with.only_deleted;
        let some = |v: i64| full.then_some(v);
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &l.id)?;
        m.serialize_entry("name", &full.then_some(l.name.as_str()))?;
        m.serialize_entry("price", &some(l.price))?;
        m.serialize_entry("responsible_user_id", &some(l.responsible_user_id))?;
        m.serialize_entry("group_id", &some(l.group_id))?;
        m.serialize_entry("status_id", &some(l.status_id))?;
        m.serialize_entry("pipeline_id", &some(l.pipeline_id))?;
        m.serialize_entry("loss_reason_id", &l.loss_reason_id.filter(|_| full))?;
        let source_id = l.source_id.filter(|_| full && ctx.with.source_id);
        m.serialize_entry("source_id", &source_id)?;
        m.serialize_entry("created_by", &some(l.created_by))?;
        m.serialize_entry("updated_by", &l.updated_by)?;
        m.serialize_entry("created_at", &some(l.created_at))?;
        m.serialize_entry("updated_at", &l.updated_at)?;
        m.serialize_entry("closed_at", &l.closed_at.filter(|_| full))?;
        m.serialize_entry("closest_task_at", &l.closest_task_at.filter(|_| full))?;
        m.serialize_entry("is_deleted", &l.is_deleted)?;
        if full && !l.custom_fields.is_empty() {
            m.serialize_entry("custom_fields_values", &CustomFields(&l.custom_fields))?;
        } else {
            m.serialize_entry("custom_fields_values", &None::<()>)?;
        }
        m.serialize_entry("score", &l.score.filter(|_| full))?;
        m.serialize_entry("account_id", &ACCOUNT_ID)?;
        m.serialize_entry("labor_cost", &l.labor_cost.filter(|_| full))?;
        if ctx.with.is_price_modified_by_robot {
            m.serialize_entry(
                "is_price_modified_by_robot",
                &full.then_some(l.is_price_modified_by_robot),
            )?;
        }
        m.serialize_entry(
            "_links",
            &SelfLink::new(format!(
                "{}/api/v4/leads/{}{}",
                ctx.base, l.id, ctx.query_suffix
            )),
        )?;
        m.serialize_entry("_embedded", &LeadEmbedded { lead: l, ctx, full })?;
        m.end()
    }
}

/// A lead's `_embedded`: tags and companies always, the rest as `with` asks.
struct LeadEmbedded<'a> {
    lead: &'a SimLead,
    ctx: &'a LeadCtx<'a>,
    full: bool,
}

#[derive(Serialize)]
struct TagJson<'a> {
    id: i64,
    name: &'a str,
    color: Option<&'a str>,
}

#[derive(Serialize)]
struct LinkedJson {
    id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_main: Option<bool>,
    _links: SelfLink,
}

#[derive(Serialize)]
struct LossReasonJson {
    id: i64,
    name: &'static str,
    sort: i64,
    created_at: i64,
    updated_at: i64,
    _links: SelfLink,
}

#[derive(Serialize)]
struct CatalogElementJson {
    id: i64,
    metadata: CatalogMetadata,
}

#[derive(Serialize)]
struct CatalogMetadata {
    quantity: i64,
    catalog_id: i64,
}

#[derive(Serialize)]
struct SourceJson {
    id: i64,
    name: &'static str,
}

impl Serialize for LeadEmbedded<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (l, base, with) = (self.lead, self.ctx.base, self.ctx.with);
        // Kommo repeats the request's query in the links of embedded contacts and companies too
        // (`kommo-api-notes.md`, "Links"), as in the lead's own.
        let suffix = &self.ctx.query_suffix;
        let mut m = s.serialize_map(None)?;
        let none = !self.full;
        let tags: Vec<TagJson<'_>> = if none {
            Vec::new()
        } else {
            l.tags
                .iter()
                .map(|t| TagJson {
                    id: t.id,
                    name: &t.name,
                    color: t.color.as_deref(),
                })
                .collect()
        };
        m.serialize_entry("tags", &tags)?;
        let companies: Vec<LinkedJson> = l
            .company_id
            .filter(|_| self.full)
            .map(|id| LinkedJson {
                id,
                is_main: None,
                _links: SelfLink::new(format!("{base}/api/v4/companies/{id}{suffix}")),
            })
            .into_iter()
            .collect();
        m.serialize_entry("companies", &companies)?;
        if with.contacts && self.full {
            let contacts: Vec<LinkedJson> = l
                .contact_ids
                .iter()
                .enumerate()
                .map(|(i, &id)| LinkedJson {
                    id,
                    is_main: Some(i == 0),
                    _links: SelfLink::new(format!("{base}/api/v4/contacts/{id}{suffix}")),
                })
                .collect();
            m.serialize_entry("contacts", &contacts)?;
        }
        if with.loss_reason && self.full {
            let reasons: Vec<LossReasonJson> = l
                .loss_reason_id
                .and_then(|id| LOSS_REASONS.iter().find(|r| r.0 == id))
                .map(|&(id, name, sort)| LossReasonJson {
                    id,
                    name,
                    sort,
                    created_at: data::NOW - 365 * 86_400,
                    updated_at: data::NOW - 365 * 86_400,
                    _links: SelfLink::new(format!("{base}/api/v4/leads/loss_reasons/{id}")),
                })
                .into_iter()
                .collect();
            m.serialize_entry("loss_reason", &reasons)?;
        }
        if with.catalog_elements && self.full {
            let elements: Vec<CatalogElementJson> = l
                .catalog_elements
                .iter()
                .map(|&(id, quantity)| CatalogElementJson {
                    id,
                    metadata: CatalogMetadata {
                        quantity,
                        catalog_id: CATALOG_ID,
                    },
                })
                .collect();
            m.serialize_entry("catalog_elements", &elements)?;
        }
        if with.source && self.full {
            if let Some(&(id, name)) = l
                .source_id
                .and_then(|id| SOURCES.iter().find(|s| s.0 == id))
            {
                m.serialize_entry("source", &SourceJson { id, name })?;
            }
        }
        m.end()
    }
}

/// `custom_fields_values`: one entry per field, values typed by the field's kind.
struct CustomFields<'a>(&'a [(i64, String)]);

#[derive(Serialize)]
struct FieldJson<'a> {
    field_id: i64,
    field_name: &'a str,
    field_code: Option<&'a str>,
    field_type: &'a str,
    values: [ValueJson<'a>; 1],
}

#[derive(Serialize)]
#[serde(untagged)]
enum ValueJson<'a> {
    Plain {
        value: &'a str,
    },
    Flag {
        value: bool,
    },
    Enum {
        value: &'a str,
        enum_id: i64,
        enum_code: Option<&'a str>,
    },
}

impl Serialize for CustomFields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (field_id, value) in self.0 {
            let def = data::field(*field_id);
            let kind = def.map(|d| d.kind);
            let value_json = match kind {
                Some(FieldKind::Checkbox) => ValueJson::Flag {
                    value: value == "true",
                },
                Some(FieldKind::Select) => ValueJson::Enum {
                    value,
                    enum_id: def
                        .and_then(|d| d.enums.iter().find(|e| e.1 == value))
                        .map_or(0, |e| e.0),
                    enum_code: None,
                },
                _ => ValueJson::Plain { value },
            };
            seq.serialize_element(&FieldJson {
                field_id: *field_id,
                field_name: def.map_or("Field", |d| d.name),
                field_code: def.and_then(|d| d.code),
                field_type: kind.map_or("text", FieldKind::as_str),
                values: [value_json],
            })?;
        }
        seq.end()
    }
}

/// Links of a list page: `next` is always present (Kommo's is unreliable too), `prev` from page 2.
#[derive(Serialize)]
struct PageLinks {
    #[serde(rename = "self")]
    this: Href,
    next: Href,
    first: Href,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev: Option<Href>,
}

/// Serializes a slice of positions as lead objects.
struct LeadList<'a> {
    leads: &'a [SimLead],
    positions: &'a [u32],
    ctx: &'a LeadCtx<'a>,
}

impl Serialize for LeadList<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.positions.len()))?;
        for &pos in self.positions {
            seq.serialize_element(&LeadJson {
                lead: &self.leads[pos as usize],
                ctx: self.ctx,
            })?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct LeadsEmbedded<'a> {
    leads: LeadList<'a>,
}

#[derive(Serialize)]
struct PageJson<'a> {
    _page: u32,
    _links: PageLinks,
    _embedded: LeadsEmbedded<'a>,
}

impl PageLinks {
    /// The links of page `page` of the list at `{base}/api/v4/{path}`, each repeating the request's
    /// raw query with `page` changed.
    fn new(base: &str, path: &str, raw_query: &str, page: u32) -> Self {
        let link = |page: u32| {
            Href::new(format!(
                "{base}/api/v4/{path}?{}",
                with_page(raw_query, page)
            ))
        };
        Self {
            this: link(page),
            next: link(page.saturating_add(1)),
            first: link(1),
            prev: (page > 1).then(|| link(page - 1)),
        }
    }
}

/// One page of `GET /api/v4/leads`.
pub(crate) fn leads_page(
    style: JsonStyle,
    leads: &[SimLead],
    positions: &[u32],
    q: &LeadsQuery,
    base: &str,
    raw_query: &str,
) -> Vec<u8> {
    let ctx = LeadCtx::new(base, raw_query, q.with);
    let page = PageJson {
        _page: q.page,
        _links: PageLinks::new(base, "leads", raw_query, q.page),
        _embedded: LeadsEmbedded {
            leads: LeadList {
                leads,
                positions,
                ctx: &ctx,
            },
        },
    };
    to_vec(style, &page)
}

/// `GET /api/v4/leads/{id}`: the lead object itself.
pub(crate) fn lead(style: JsonStyle, lead: &SimLead, ctx: &LeadCtx<'_>) -> Vec<u8> {
    to_vec(style, &LeadJson { lead, ctx })
}

/// An event as Kommo lists it: `id` (a string), `type`, `entity_id`, `entity_type`, `created_by`,
/// `created_at`, `value_after`, `value_before` (arrays), `account_id`, then `_links` and
/// `_embedded.entity` (the fields of Kommo's reference, developers.kommo.com/reference/events-list,
/// and of the PHP SDK's `EventModel::fromArray`).
struct EventJson<'a> {
    event: &'a SimEvent,
    base: &'a str,
}

impl Serialize for EventJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (e, base) = (self.event, self.base);
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("id", &e.id)?;
        m.serialize_entry("type", e.type_.as_str())?;
        m.serialize_entry("entity_id", &e.entity_id)?;
        m.serialize_entry("entity_type", "lead")?;
        m.serialize_entry("created_by", &e.created_by)?;
        m.serialize_entry("created_at", &e.created_at)?;
        m.serialize_entry("value_after", &EventValueJson(e.value_after))?;
        m.serialize_entry("value_before", &EventValueJson(e.value_before))?;
        m.serialize_entry("account_id", &ACCOUNT_ID)?;
        m.serialize_entry(
            "_links",
            &SelfLink::new(format!("{base}/api/v4/events/{}", e.id)),
        )?;
        m.serialize_entry(
            "_embedded",
            &EventEmbedded {
                entity: LinkedJson {
                    id: e.entity_id,
                    is_main: None,
                    _links: SelfLink::new(format!("{base}/api/v4/leads/{}", e.entity_id)),
                },
            },
        )?;
        m.end()
    }
}

#[derive(Serialize)]
struct EventEmbedded {
    entity: LinkedJson,
}

/// `value_before` / `value_after`: always an array (Kommo's reference types both as arrays). A stage
/// is `{"lead_status": {"id", "pipeline_id"}}` (the `leads_statuses` filter of the reference's
/// "Events filtration" takes the same pair); a sale value `{"sale_field_value": {"sale"}}`.
struct EventValueJson(SimEventValue);

#[derive(Serialize)]
struct LeadStatusJson {
    id: i64,
    pipeline_id: i64,
}

#[derive(Serialize)]
struct SaleJson {
    sale: i64,
}

impl Serialize for EventValueJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        enum Item {
            #[serde(rename = "lead_status")]
            Status(LeadStatusJson),
            #[serde(rename = "sale_field_value")]
            Sale(SaleJson),
        }
        let item = match self.0 {
            SimEventValue::Empty => None,
            SimEventValue::Status {
                pipeline_id,
                status_id,
            } => Some(Item::Status(LeadStatusJson {
                id: status_id,
                pipeline_id,
            })),
            SimEventValue::Sale(sale) => Some(Item::Sale(SaleJson { sale })),
        };
        let mut seq = s.serialize_seq(Some(usize::from(item.is_some())))?;
        if let Some(item) = item {
            seq.serialize_element(&item)?;
        }
        seq.end()
    }
}

/// Links of an events page: `self` and `next` (always present, as on the leads list).
#[derive(Serialize)]
struct EventPageLinks {
    #[serde(rename = "self")]
    this: Href,
    next: Href,
}

#[derive(Serialize)]
struct EventsEmbedded<'a> {
    events: Vec<EventJson<'a>>,
}

#[derive(Serialize)]
struct EventsPageJson<'a> {
    _page: u32,
    _links: EventPageLinks,
    _embedded: EventsEmbedded<'a>,
}

/// One page of `GET /api/v4/events`.
pub(crate) fn events_page(
    style: JsonStyle,
    events: &[&SimEvent],
    page: u32,
    base: &str,
    raw_query: &str,
) -> Vec<u8> {
    let link = |page: u32| {
        Href::new(format!(
            "{base}/api/v4/events?{}",
            with_page(raw_query, page)
        ))
    };
    to_vec(
        style,
        &EventsPageJson {
            _page: page,
            _links: EventPageLinks {
                this: link(page),
                next: link(page.saturating_add(1)),
            },
            _embedded: EventsEmbedded {
                events: events
                    .iter()
                    .map(|&event| EventJson { event, base })
                    .collect(),
            },
        },
    )
}

/// `GET /api/v4/events/{id}`: the event object itself.
pub(crate) fn event(style: JsonStyle, event: &SimEvent, base: &str) -> Vec<u8> {
    to_vec(style, &EventJson { event, base })
}

/// A contact or company as Kommo lists it (the fields this sim keeps).
#[derive(Serialize)]
pub(crate) struct CardJson<'a> {
    id: i64,
    name: &'a str,
    responsible_user_id: i64,
    created_at: i64,
    updated_at: i64,
    account_id: i64,
    _links: SelfLink,
}

impl<'a> CardJson<'a> {
    /// `card` as listed under `kind` by a request with `raw_query`: its self link repeats the
    /// query, as Kommo repeats a list request's query in its items' links.
    fn new(card: &'a SimCard, kind: CardKind, base: &str, raw_query: &str) -> Self {
        let mut href = format!("{base}/api/v4/{}/{}", kind.path(), card.id);
        if !raw_query.is_empty() {
            href.push('?');
            href.push_str(raw_query);
        }
        CardJson {
            id: card.id,
            name: &card.name,
            responsible_user_id: card.responsible_user_id,
            created_at: card.created_at,
            updated_at: card.updated_at,
            account_id: ACCOUNT_ID,
            _links: SelfLink::new(href),
        }
    }
}

/// One page of `GET /api/v4/contacts` or `GET /api/v4/companies`.
pub(crate) fn cards_page(
    style: JsonStyle,
    kind: CardKind,
    cards: &[&SimCard],
    q: &ListQuery,
    base: &str,
    raw_query: &str,
) -> Vec<u8> {
    struct Items<'a>(CardKind, Vec<CardJson<'a>>);
    impl Serialize for Items<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(Some(1))?;
            m.serialize_entry(self.0.path(), &self.1)?;
            m.end()
        }
    }
    #[derive(Serialize)]
    struct CardsPage<'a> {
        _page: u32,
        _links: PageLinks,
        _embedded: Items<'a>,
    }
    let items = cards
        .iter()
        .map(|c| CardJson::new(c, kind, base, raw_query))
        .collect();
    to_vec(
        style,
        &CardsPage {
            _page: q.page,
            _links: PageLinks::new(base, kind.path(), raw_query, q.page),
            _embedded: Items(kind, items),
        },
    )
}

/// `GET /api/v4/contacts/{id}` or `GET /api/v4/companies/{id}`: the object itself.
pub(crate) fn card(
    style: JsonStyle,
    kind: CardKind,
    card: &SimCard,
    base: &str,
    raw_query: &str,
) -> Vec<u8> {
    to_vec(style, &CardJson::new(card, kind, base, raw_query))
}

#[derive(Serialize)]
struct StatusJson<'a> {
    id: i64,
    name: &'a str,
    sort: i64,
    is_editable: bool,
    pipeline_id: i64,
    color: &'a str,
    #[serde(rename = "type")]
    type_: u8,
    account_id: i64,
    _links: SelfLink,
}

#[derive(Serialize)]
struct StatusesEmbedded<'a> {
    statuses: Vec<StatusJson<'a>>,
}

#[derive(Serialize)]
struct PipelineJson<'a> {
    id: i64,
    name: &'a str,
    sort: i64,
    is_main: bool,
    is_unsorted_on: bool,
    is_archive: bool,
    account_id: i64,
    _links: SelfLink,
    _embedded: StatusesEmbedded<'a>,
}

#[derive(Serialize)]
struct PipelinesEmbedded<'a> {
    pipelines: Vec<PipelineJson<'a>>,
}

#[derive(Serialize)]
struct PipelinesJson<'a> {
    _total_items: usize,
    _links: SelfLink,
    _embedded: PipelinesEmbedded<'a>,
}

fn pipeline_json<'a>(p: &'a SimPipeline, base: &str) -> PipelineJson<'a> {
    PipelineJson {
        id: p.id,
        name: &p.name,
        sort: p.sort,
        is_main: p.is_main,
        is_unsorted_on: true,
        is_archive: false,
        account_id: ACCOUNT_ID,
        _links: SelfLink::new(format!("{base}/api/v4/leads/pipelines/{}", p.id)),
        _embedded: StatusesEmbedded {
            statuses: p
                .statuses
                .iter()
                .map(|st| StatusJson {
                    id: st.id,
                    name: &st.name,
                    sort: st.sort,
                    is_editable: st.is_editable,
                    pipeline_id: p.id,
                    color: &st.color,
                    type_: st.type_,
                    account_id: ACCOUNT_ID,
                    _links: SelfLink::new(format!(
                        "{base}/api/v4/leads/pipelines/{}/statuses/{}",
                        p.id, st.id
                    )),
                })
                .collect(),
        },
    }
}

/// `GET /api/v4/leads/pipelines`.
pub(crate) fn pipelines(style: JsonStyle, pipelines: &[SimPipeline], base: &str) -> Vec<u8> {
    to_vec(
        style,
        &PipelinesJson {
            _total_items: pipelines.len(),
            _links: SelfLink::new(format!("{base}/api/v4/leads/pipelines")),
            _embedded: PipelinesEmbedded {
                pipelines: pipelines.iter().map(|p| pipeline_json(p, base)).collect(),
            },
        },
    )
}

/// `GET /api/v4/leads/pipelines/{id}`.
pub(crate) fn pipeline(style: JsonStyle, p: &SimPipeline, base: &str) -> Vec<u8> {
    to_vec(style, &pipeline_json(p, base))
}

#[derive(Serialize)]
struct AccountJson {
    id: i64,
    name: &'static str,
    subdomain: &'static str,
    created_at: i64,
    created_by: i64,
    updated_at: i64,
    updated_by: i64,
    current_user_id: i64,
    country: &'static str,
    currency: &'static str,
    currency_symbol: &'static str,
    customers_mode: &'static str,
    is_unsorted_on: bool,
    is_loss_reason_enabled: bool,
    is_helpbot_enabled: bool,
    is_technical_account: bool,
    contact_name_display_order: i64,
    _links: SelfLink,
}

/// `GET /api/v4/account`; `current_user_id` is the token's first user.
pub(crate) fn account(style: JsonStyle, base: &str, current_user_id: i64) -> Vec<u8> {
    to_vec(
        style,
        &AccountJson {
            id: ACCOUNT_ID,
            name: "Simulated account",
            subdomain: "sim",
            created_at: data::NOW - 3 * 365 * 86_400,
            created_by: data::USERS[0],
            updated_at: data::NOW - 30 * 86_400,
            updated_by: data::USERS[0],
            current_user_id,
            country: "US",
            currency: "USD",
            currency_symbol: "$",
            customers_mode: "disabled",
            is_unsorted_on: true,
            is_loss_reason_enabled: true,
            is_helpbot_enabled: false,
            is_technical_account: false,
            contact_name_display_order: 1,
            _links: SelfLink::new(format!("{base}/api/v4/account")),
        },
    )
}

#[derive(Serialize)]
struct WrittenLead {
    id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    updated_at: Option<i64>,
    _links: SelfLink,
}

#[derive(Serialize)]
struct WrittenEmbedded {
    leads: Vec<WrittenLead>,
}

#[derive(Serialize)]
struct WrittenJson {
    _links: SelfLink,
    _embedded: WrittenEmbedded,
}

/// The answer to `POST /api/v4/leads`: `(id, request_id)` per created lead.
pub(crate) fn created(style: JsonStyle, base: &str, leads: &[(i64, String)]) -> Vec<u8> {
    to_vec(
        style,
        &WrittenJson {
            _links: SelfLink::new(format!("{base}/api/v4/leads")),
            _embedded: WrittenEmbedded {
                leads: leads
                    .iter()
                    .map(|(id, request_id)| WrittenLead {
                        id: *id,
                        request_id: Some(request_id.clone()),
                        updated_at: None,
                        _links: SelfLink::new(format!("{base}/api/v4/leads/{id}")),
                    })
                    .collect(),
            },
        },
    )
}

/// The answer to `PATCH /api/v4/leads` (a list): `(id, updated_at)` per lead.
pub(crate) fn updated_many(style: JsonStyle, base: &str, leads: &[(i64, i64)]) -> Vec<u8> {
    to_vec(
        style,
        &WrittenJson {
            _links: SelfLink::new(format!("{base}/api/v4/leads")),
            _embedded: WrittenEmbedded {
                leads: leads
                    .iter()
                    .map(|&(id, at)| updated_json(base, id, at))
                    .collect(),
            },
        },
    )
}

/// The answer to `PATCH /api/v4/leads/{id}`.
pub(crate) fn updated_one(style: JsonStyle, base: &str, id: i64, updated_at: i64) -> Vec<u8> {
    to_vec(style, &updated_json(base, id, updated_at))
}

fn updated_json(base: &str, id: i64, updated_at: i64) -> WrittenLead {
    WrittenLead {
        id,
        request_id: None,
        updated_at: Some(updated_at),
        _links: SelfLink::new(format!("{base}/api/v4/leads/{id}")),
    }
}

/// A Kommo problem+json body.
#[derive(Serialize)]
struct ProblemJson<'a> {
    title: &'a str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    type_: Option<String>,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
    #[serde(rename = "validation-errors", skip_serializing_if = "Option::is_none")]
    validation_errors: Option<Vec<ValidationJson<'a>>>,
}

#[derive(Serialize)]
struct ValidationJson<'a> {
    request_id: String,
    errors: Vec<ErrorJson<'a>>,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    code: &'a str,
    path: &'a str,
    detail: &'a str,
}

impl<'a> ProblemJson<'a> {
    fn new(status: u16, title: &'a str, detail: &'a str) -> Self {
        Self {
            title,
            type_: Some(format!("https://httpstatus.es/{status}")),
            status,
            detail,
            retry_after: None,
            trace_id: None,
            validation_errors: None,
        }
    }
}

/// `{"title", "type", "status", "detail"}`.
pub(crate) fn problem(style: JsonStyle, status: u16, title: &str, detail: &str) -> Vec<u8> {
    to_vec(style, &ProblemJson::new(status, title, detail))
}

/// Kommo's `400` for a bad query.
pub(crate) fn query_problem(style: JsonStyle, e: &QueryError) -> Vec<u8> {
    let mut p = ProblemJson::new(400, "Bad Request", &e.detail);
    p.validation_errors = Some(vec![ValidationJson {
        request_id: "0".to_string(),
        errors: vec![ErrorJson {
            code: e.code,
            path: &e.path,
            detail: &e.message,
        }],
    }]);
    to_vec(style, &p)
}

/// Kommo's `400` for a refused write of element `request_id`.
pub(crate) fn write_problem(
    style: JsonStyle,
    request_id: &str,
    path: &str,
    detail: &str,
) -> Vec<u8> {
    let mut p = ProblemJson::new(400, "Bad Request", "Request validation failed");
    p.validation_errors = Some(vec![ValidationJson {
        request_id: request_id.to_string(),
        errors: vec![ErrorJson {
            code: "InvalidValue",
            path,
            detail,
        }],
    }]);
    to_vec(style, &p)
}

/// Kommo's `429` body.
pub(crate) fn too_many_requests(style: JsonStyle, retry_after: Option<u64>) -> Vec<u8> {
    let mut p = ProblemJson::new(
        429,
        "Too Many Requests",
        "You have sent too many requests in a given amount of time. Please try again later.",
    );
    p.retry_after = retry_after;
    to_vec(style, &p)
}

/// Kommo's `500` body (no `type`, a `trace_id`).
pub(crate) fn internal_error(style: JsonStyle, trace_id: u64) -> Vec<u8> {
    let mut p = ProblemJson::new(
        500,
        "ErrInternalServer",
        "Our team are probably already working on the elimination of the problem",
    );
    p.type_ = None;
    p.trace_id = Some(format!("{trace_id:016x}"));
    to_vec(style, &p)
}

/// `POST /oauth2/access_token`'s answer, in the order Kommo's reference lists it
/// (developers.kommo.com/reference/get-token; amocrm-api-php#475 shows the first four).
pub(crate) fn oauth_tokens(style: JsonStyle, issued: &Issued) -> Vec<u8> {
    #[derive(Serialize)]
    struct TokensJson<'a> {
        token_type: &'static str,
        expires_in: u64,
        access_token: &'a str,
        refresh_token: &'a str,
        server_time: i64,
    }
    to_vec(
        style,
        &TokensJson {
            token_type: "Bearer",
            expires_in: issued.expires_in,
            access_token: &issued.access_token,
            refresh_token: &issued.refresh_token,
            server_time: issued.server_time,
        },
    )
}

/// A refused token request: `{"hint", "title", "type", "status", "detail"}` in the order
/// amocrm-api-php#123 and #315 recorded (no `hint` for a bad client: #235).
pub(crate) fn oauth_problem(style: JsonStyle, error: &OAuthError) -> Vec<u8> {
    #[derive(Serialize)]
    struct OAuthProblemJson<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        hint: Option<&'a str>,
        title: &'a str,
        #[serde(rename = "type")]
        type_: &'a str,
        status: u16,
        detail: &'a str,
    }
    to_vec(
        style,
        &OAuthProblemJson {
            hint: error.hint(),
            title: error.title(),
            type_: error.problem_type(),
            status: error.status(),
            detail: error.detail(),
        },
    )
}

/// The HTML page a blocked account or IP gets.
pub(crate) const FORBIDDEN_HTML: &str = "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>403 Forbidden</title></head>\n<body><h1>403 Forbidden</h1><p>Access to this account has been temporarily restricted because of too many requests. Please try again later.</p></body></html>\n";

/// The body of a truncated answer that had no `200` body to cut: an empty leads page.
pub(crate) fn empty_leads_page(style: JsonStyle) -> Vec<u8> {
    #[derive(Serialize)]
    struct Empty {
        _page: u32,
        _links: SelfLink,
        _embedded: EmptyLeads,
    }
    #[derive(Serialize)]
    struct EmptyLeads {
        leads: [(); 0],
    }
    to_vec(
        style,
        &Empty {
            _page: 1,
            _links: SelfLink::new("/api/v4/leads".to_string()),
            _embedded: EmptyLeads { leads: [] },
        },
    )
}

/// The one place a body is serialized: `value` spelled in `style`.
pub(crate) fn to_vec<T: Serialize>(style: JsonStyle, value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let written = match style {
        JsonStyle::Compact => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            CompactFormatter,
        )),
        JsonStyle::Php => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PhpFormatter,
        )),
        JsonStyle::Pretty => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PrettyFormatter::with_indent(b"    "),
        )),
    };
    // Our own types with string keys cannot fail to serialize; an empty body would show up at once.
    match written {
        Ok(()) => out,
        Err(_) => Vec::new(),
    }
}

/// PHP's `json_encode` with the flags of Symfony's `JsonResponse` (`JSON_HEX_TAG | JSON_HEX_APOS |
/// JSON_HEX_AMP | JSON_HEX_QUOT`, without `JSON_UNESCAPED_SLASHES` or `JSON_UNESCAPED_UNICODE`):
/// compact, `/` as `\/`, `<` `>` `&` `'` `"` as `\u003C` `\u003E` `\u0026` `\u0027` `\u0022`,
/// and every non-ASCII character as lower-case `\uXXXX` UTF-16 units, as PHP writes them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PhpFormatter;

impl Formatter for PhpFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        // Plain runs go out whole; only the characters PHP escapes are written one by one.
        let mut plain_from = 0;
        for (at, c) in fragment.char_indices() {
            if c.is_ascii() && !matches!(c, '/' | '<' | '>' | '&' | '\'') {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[plain_from..at])?;
            plain_from = at + c.len_utf8();
            match c {
                '/' => writer.write_all(b"\\/")?,
                '<' => writer.write_all(b"\\u003C")?,
                '>' => writer.write_all(b"\\u003E")?,
                '&' => writer.write_all(b"\\u0026")?,
                '\'' => writer.write_all(b"\\u0027")?,
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        write!(writer, "\\u{unit:04x}")?;
                    }
                }
            }
        }
        writer.write_all(&fragment.as_bytes()[plain_from..])
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        char_escape: CharEscape,
    ) -> io::Result<()> {
        match char_escape {
            // JSON_HEX_QUOT.
            CharEscape::Quote => writer.write_all(b"\\u0022"),
            other => CompactFormatter.write_char_escape(writer, other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_is_set_in_place_or_appended() {
        assert_eq!(with_page("", 2), "page=2");
        assert_eq!(with_page("limit=2", 2), "limit=2&page=2");
        assert_eq!(with_page("limit=2&page=1&x=3", 5), "limit=2&page=5&x=3");
        assert_eq!(with_page("page=1&limit=2&page=9", 3), "page=3&limit=2");
    }

    #[test]
    fn problem_shapes() {
        let v: serde_json::Value =
            serde_json::from_slice(&too_many_requests(JsonStyle::Compact, Some(1))).unwrap();
        assert_eq!(v["retry_after"], 1);
        assert_eq!(v["type"], "https://httpstatus.es/429");
        let v: serde_json::Value =
            serde_json::from_slice(&internal_error(JsonStyle::Compact, 7)).unwrap();
        assert_eq!(v["title"], "ErrInternalServer");
        assert!(v.get("type").is_none());
    }

    #[test]
    fn php_spelling_is_json_encodes() {
        let value = serde_json::json!({
            "href": "http://h/api/v4/leads?a=1&b=<2>",
            "name": "Café 'Ромашка' \"q\" \\ 🚀\n\u{1}",
        });
        let php = String::from_utf8(to_vec(JsonStyle::Php, &value)).unwrap();
        assert_eq!(
            php,
            r#"{"href":"http:\/\/h\/api\/v4\/leads?a=1\u0026b=\u003C2\u003E","name":"Caf\u00e9 \u0027\u0420\u043e\u043c\u0430\u0448\u043a\u0430\u0027 \u0022q\u0022 \\ \ud83d\ude80\n\u0001"}"#
        );
        let back: serde_json::Value = serde_json::from_str(&php).unwrap();
        assert_eq!(back, value);
        let pretty = String::from_utf8(to_vec(JsonStyle::Pretty, &value)).unwrap();
        assert!(
            pretty.starts_with("{\n    \"href\": \"http://h/"),
            "{pretty}"
        );
        assert_eq!(
            to_vec(JsonStyle::Compact, &value),
            serde_json::to_vec(&value).unwrap()
        );
    }
}
