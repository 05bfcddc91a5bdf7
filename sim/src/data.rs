//! The simulated account's data: seeded generation of pipelines and leads, and the [`Store`] that keeps
//! them indexed by stage so a one-stage list touches only that stage's leads, changes them the way
//! Kommo does (bumping `updated_at`, recording an event) and keeps the account's change feed.

use std::collections::{BTreeSet, HashMap};

use super::events::{EventLog, SimEventType, SimEventValue};
use super::rng::SplitMix64;
use super::{SimCard, SimCompany, SimContact, SimLead, SimPipeline, SimStatus, SimTag, TokenSpec};

/// The dataset's "now": 2024-06-01T00:00:00Z. Generated timestamps lie before it; changes made while
/// the sim runs are stamped after it.
pub(crate) const NOW: i64 = 1_717_200_000;
/// The account id every lead and pipeline reports.
pub(crate) const ACCOUNT_ID: i64 = 31_415_926;
/// Kommo's fixed id of the "won" stage, present in every pipeline.
pub(crate) const WON: i64 = 142;
/// Kommo's fixed id of the "lost" stage, present in every pipeline.
pub(crate) const LOST: i64 = 143;
/// The account's users (responsible, created_by, updated_by).
pub(crate) const USERS: [i64; 8] = [1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008];
/// The catalog every linked list element belongs to.
pub(crate) const CATALOG_ID: i64 = 4001;

/// Loss reasons: `(id, name, sort)`.
pub(crate) const LOSS_REASONS: [(i64, &str, i64); 3] = [
    (7001, "Too expensive", 1),
    (7002, "Chose a competitor", 2),
    (7003, "No response", 3),
];
/// Lead sources: `(id, name)`.
pub(crate) const SOURCES: [(i64, &str); 4] = [
    (9101, "Website"),
    (9102, "Phone"),
    (9103, "Email"),
    (9104, "Facebook"),
];
/// Tags: `(id, name, color)`.
const TAGS: [(i64, &str, Option<&str>); 6] = [
    (801, "vip", Some("#DDEBB5")),
    (802, "partner", None),
    (803, "urgent", Some("#FFC8C8")),
    (804, "follow-up", None),
    (805, "webinar", None),
    (806, "referral", Some("#D6EAFF")),
];

/// How a custom field's values are typed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldKind {
    /// A number, sent as a string.
    Numeric,
    /// One of `enums`, sent with its `enum_id`.
    Select,
    /// `true`/`false`, sent as a JSON boolean.
    Checkbox,
    /// Free text (UTM tracking data).
    Tracking,
}

impl FieldKind {
    /// Kommo's `field_type`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FieldKind::Numeric => "numeric",
            FieldKind::Select => "select",
            FieldKind::Checkbox => "checkbox",
            FieldKind::Tracking => "tracking_data",
        }
    }
}

/// A custom field of leads.
#[derive(Debug)]
pub(crate) struct FieldDef {
    /// `field_id`.
    pub(crate) id: i64,
    /// `field_name`.
    pub(crate) name: &'static str,
    /// `field_code` (null for most user fields).
    pub(crate) code: Option<&'static str>,
    /// Value typing.
    pub(crate) kind: FieldKind,
    /// For selects: `(enum_id, value)`; for the others, the values generated.
    pub(crate) enums: &'static [(i64, &'static str)],
}

/// The account's custom fields of leads.
pub(crate) const FIELDS: [FieldDef; 4] = [
    FieldDef {
        id: 501,
        name: "Deal size",
        code: None,
        kind: FieldKind::Numeric,
        enums: &[],
    },
    FieldDef {
        id: 502,
        name: "Region",
        code: None,
        kind: FieldKind::Select,
        enums: &[(601, "North"), (602, "South"), (603, "East"), (604, "West")],
    },
    FieldDef {
        id: 503,
        name: "Priority",
        code: None,
        kind: FieldKind::Checkbox,
        enums: &[],
    },
    FieldDef {
        id: 504,
        name: "utm_source",
        code: Some("UTM_SOURCE"),
        kind: FieldKind::Tracking,
        enums: &[
            (0, "google"),
            (0, "facebook"),
            (0, "newsletter"),
            (0, "partner"),
        ],
    },
];

/// The definition of a custom field, if the account has it.
pub(crate) fn field(id: i64) -> Option<&'static FieldDef> {
    FIELDS.iter().find(|f| f.id == id)
}

const PIPELINE_NAMES: [&str; 5] = ["Sales", "Partners", "Renewals", "Enterprise", "Events"];
const STAGE_NAMES: [&str; 10] = [
    "Qualification",
    "First contact",
    "Needs analysis",
    "Offer made",
    "Negotiation",
    "Contract sent",
    "Invoice issued",
    "Awaiting payment",
    "Onboarding",
    "Demo scheduled",
];
const STAGE_COLORS: [&str; 6] = [
    "#fffeb2", "#ffdc7f", "#ffce5a", "#d6eaff", "#99ccff", "#ffc8c8",
];
const COMPANIES: [&str; 9] = [
    "Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Müller",
];
const DEAL_KINDS: [&str; 6] = ["order", "renewal", "pilot", "upgrade", "license", "support"];
/// Names that put every character JSON styles spell differently into lead names: `&`, `'`, `<`, `>`,
/// `/`, `"`, non-ASCII letters and a character above the BMP.
const SPECIAL_NAMES: [&str; 6] = [
    "Café & Co's",
    "Ромашка",
    "O'Brien <Partners>",
    "Zürich/Genève",
    "東京 \"Trading\"",
    "Rocket 🚀",
];
/// Every `SPECIAL_EVERY`-th lead (from the `SPECIAL_FROM`-th on) gets a [`SPECIAL_NAMES`] name.
const SPECIAL_EVERY: usize = 13;
/// The first lead keeps its plain name: tests search by its first word in a URL.
const SPECIAL_FROM: usize = 7;
/// Contacts' first and last names; some non-ASCII, some with `'`.
const FIRST_NAMES: [&str; 8] = [
    "Anna", "José", "Zoë", "Иван", "Liam", "Søren", "Mei", "Seán",
];
const LAST_NAMES: [&str; 8] = [
    "Smith",
    "García",
    "O'Neil",
    "Смирнов",
    "Müller",
    "Ng",
    "D'Angelo",
    "Kowalski",
];
/// Company name suffixes.
const COMPANY_FORMS: [&str; 5] = ["Ltd", "GmbH", "& Sons", "S.A.", "LLC"];

/// How many leads a stage gets in the generated dataset.
#[derive(Debug, Clone, Copy)]
enum Share {
    /// The deliberately large stage: spans several pages of 250 at every realistic size.
    Big,
    /// Exactly this many (a handful).
    Fixed(usize),
    /// Nothing at all.
    Empty,
    /// A share of what is left, proportional to the weight.
    Weight(u64),
}

/// Generate the account: ~5 pipelines and `n` leads, fully determined by `seed`.
pub(crate) fn generate(n: usize, seed: u64) -> (Vec<SimPipeline>, Vec<SimLead>) {
    let mut rng = SplitMix64::derived(seed, 0);
    let pipelines = generate_pipelines(&mut rng);

    // Which stage gets how many leads. The shapes tests rely on are placed on purpose; the rest is
    // weighted at random.
    let mut stages: Vec<((i64, i64), Share)> = Vec::new();
    for (p, pipeline) in pipelines.iter().enumerate() {
        let customs = pipeline.statuses.len() - 3;
        for (s, status) in pipeline.statuses.iter().enumerate() {
            let share = match (p, s, status.id) {
                (0, 1, _) => Share::Big,
                (0, _, WON) => Share::Weight(30),
                (0, _, LOST) => Share::Weight(20),
                (1, s, _) if s == customs => Share::Empty,
                (2, 1, _) => Share::Fixed(3),
                (3, 0, _) => Share::Fixed(5),
                (4, _, WON) => Share::Fixed(2),
                (4, _, LOST) => Share::Fixed(4),
                _ => Share::Weight(rng.range(2, 16) as u64),
            };
            stages.push(((pipeline.id, status.id), share));
        }
    }
    let counts = allocate(n, &stages);
    let mut stage_of: Vec<(i64, i64)> = Vec::with_capacity(n);
    for ((stage, _), count) in stages.iter().zip(&counts) {
        stage_of.extend(std::iter::repeat_n(*stage, *count));
    }
    rng.shuffle(&mut stage_of);

    let mut leads = Vec::with_capacity(n);
    let mut id: i64 = 2_000_000;
    for (pipeline_id, status_id) in stage_of {
        id += rng.range(1, 4);
        leads.push(generate_lead(&mut rng, id, pipeline_id, status_id));
    }

    // Names with escapable characters, placed without drawing from `rng` so the rest of the dataset
    // is the same as without them.
    for (i, lead) in leads.iter_mut().enumerate().skip(SPECIAL_FROM) {
        if (i - SPECIAL_FROM).is_multiple_of(SPECIAL_EVERY) {
            let special = SPECIAL_NAMES[(i / SPECIAL_EVERY) % SPECIAL_NAMES.len()];
            let rest = lead.name.split_once(' ').map_or("", |(_, rest)| rest);
            lead.name = format!("{special} {rest}");
        }
    }

    // A few deleted-but-restorable leads.
    let deleted = (n / 20).min(n / 1000 + 3);
    let mut marked = 0;
    while marked < deleted {
        let i = rng.below(n as u64) as usize;
        if !leads[i].is_deleted {
            leads[i].is_deleted = true;
            marked += 1;
        }
    }
    (pipelines, leads)
}

/// Split `n` leads over the stages according to their shares.
fn allocate(n: usize, stages: &[((i64, i64), Share)]) -> Vec<usize> {
    let big = (n * 12 / 100).max(n.min(300));
    let mut rest = n - big;
    let mut counts: Vec<usize> = Vec::with_capacity(stages.len());
    for (_, share) in stages {
        counts.push(match share {
            Share::Big => big,
            Share::Fixed(k) => {
                let k = (*k).min(rest);
                rest -= k;
                k
            }
            Share::Empty | Share::Weight(_) => 0,
        });
    }
    let total: u64 = stages
        .iter()
        .map(|(_, s)| match s {
            Share::Weight(w) => *w,
            _ => 0,
        })
        .sum();
    let mut given = 0;
    let mut heaviest = (0, 0);
    for (i, (_, share)) in stages.iter().enumerate() {
        if let Share::Weight(w) = share {
            let c = (rest as u128 * u128::from(*w) / u128::from(total.max(1))) as usize;
            counts[i] = c;
            given += c;
            if *w > heaviest.1 {
                heaviest = (i, *w);
            }
        }
    }
    counts[heaviest.0] += rest - given;
    counts
}

fn generate_pipelines(rng: &mut SplitMix64) -> Vec<SimPipeline> {
    let mut out = Vec::new();
    for (p, name) in PIPELINE_NAMES.iter().enumerate() {
        let id = (p as i64 + 1) * 1000;
        let mut statuses = vec![SimStatus {
            id: id * 10,
            name: "Incoming leads".to_string(),
            sort: 10,
            type_: 1,
            is_editable: false,
            color: "#c1c1c1".to_string(),
        }];
        let customs = rng.range(3, 6);
        let first_name = rng.below(STAGE_NAMES.len() as u64) as usize;
        for k in 1..=customs {
            let at = k as usize - 1;
            statuses.push(SimStatus {
                id: id * 10 + k,
                name: STAGE_NAMES[(first_name + at) % STAGE_NAMES.len()].to_string(),
                sort: 10 + 10 * k,
                type_: 0,
                is_editable: true,
                color: rng.pick(&STAGE_COLORS).to_string(),
            });
        }
        statuses.push(SimStatus {
            id: WON,
            name: "Closed - won".to_string(),
            sort: 10_000,
            type_: 0,
            is_editable: false,
            color: "#CCFF66".to_string(),
        });
        statuses.push(SimStatus {
            id: LOST,
            name: "Closed - lost".to_string(),
            sort: 11_000,
            type_: 0,
            is_editable: false,
            color: "#D5D8DB".to_string(),
        });
        out.push(SimPipeline {
            id,
            name: name.to_string(),
            sort: (p as i64 + 1) * 10,
            is_main: p == 0,
            statuses,
        });
    }
    out
}

fn generate_lead(rng: &mut SplitMix64, id: i64, pipeline_id: i64, status_id: i64) -> SimLead {
    const HOUR: i64 = 3600;
    const DAY: i64 = 86_400;
    let responsible_user_id = *rng.pick(&USERS);
    let closed = status_id == WON || status_id == LOST;
    // Hour-aligned business hours over 120 days: ~1200 distinct values, so ties are common.
    let created_at = NOW - rng.range(1, 120) * DAY + rng.range(9, 18) * HOUR;
    let updated_at = (created_at + rng.range(0, 30) * DAY + rng.range(0, 3) * HOUR).min(NOW);
    let closest_task_at =
        (!closed && rng.chance(0.4)).then(|| NOW + rng.range(-10, 30) * DAY + 12 * HOUR);
    let price = if rng.chance(0.1) {
        0
    } else {
        rng.range(1, 400) * 500
    };
    let name = format!(
        "{} {} {}",
        rng.pick(&COMPANIES),
        rng.pick(&DEAL_KINDS),
        rng.range(100, 999)
    );
    let created_by = if rng.chance(0.85) {
        responsible_user_id
    } else {
        *rng.pick(&USERS)
    };
    let updated_by = *rng.pick(&USERS);
    let loss_reason_id = (status_id == LOST && rng.chance(0.8)).then(|| rng.pick(&LOSS_REASONS).0);
    let source_id = rng.chance(0.5).then(|| rng.pick(&SOURCES).0);

    let mut custom_fields = Vec::new();
    if rng.chance(0.7) {
        if rng.chance(0.8) {
            custom_fields.push((501, (rng.range(1, 500) * 100).to_string()));
        }
        if rng.chance(0.6) {
            custom_fields.push((502, rng.pick(FIELDS[1].enums).1.to_string()));
        }
        if rng.chance(0.4) {
            custom_fields.push((503, rng.chance(0.5).to_string()));
        }
        if rng.chance(0.3) {
            custom_fields.push((504, rng.pick(FIELDS[3].enums).1.to_string()));
        }
        if custom_fields.is_empty() {
            custom_fields.push((501, (rng.range(1, 500) * 100).to_string()));
        }
    }

    let mut tags: Vec<SimTag> = Vec::new();
    for _ in 0..rng.below(3) {
        let (tag_id, tag_name, color) = *rng.pick(&TAGS);
        if tags.iter().all(|t| t.id != tag_id) {
            tags.push(SimTag {
                id: tag_id,
                name: tag_name.to_string(),
                color: color.map(str::to_string),
            });
        }
    }
    let company_id = rng.chance(0.6).then(|| 40_000_000 + rng.below(3000) as i64);
    let contact_ids = (0..rng.below(4))
        .map(|_| 60_000_000 + rng.below(50_000) as i64)
        .collect();
    let catalog_elements = if rng.chance(0.1) {
        vec![(500_000 + rng.below(1000) as i64, rng.range(1, 5))]
    } else {
        Vec::new()
    };

    SimLead {
        id,
        name,
        price,
        responsible_user_id,
        group_id: group_of(responsible_user_id),
        status_id,
        pipeline_id,
        loss_reason_id,
        source_id,
        created_by,
        updated_by,
        created_at,
        updated_at,
        closed_at: closed.then_some(updated_at),
        closest_task_at,
        is_deleted: false,
        score: None,
        labor_cost: None,
        is_price_modified_by_robot: rng.chance(0.05),
        custom_fields,
        tags,
        company_id,
        contact_ids,
        catalog_elements,
        ghost_stages: Vec::new(),
    }
}

/// A per-id stream of draws, independent of the dataset's rng: a contact's or company's fields depend
/// on its id alone.
fn id_rng(kind: u64, id: i64) -> SplitMix64 {
    SplitMix64::derived(id as u64, kind)
}

/// Creation and update times of a contact or company: before [`NOW`], hour-aligned.
fn card_times(rng: &mut SplitMix64) -> (i64, i64) {
    const DAY: i64 = 86_400;
    let created_at = NOW - rng.range(120, 720) * DAY + rng.range(9, 18) * 3600;
    let updated_at = (created_at + rng.range(0, 200) * DAY).min(NOW);
    (created_at, updated_at)
}

/// The contact with this id.
fn contact(id: i64) -> SimContact {
    let mut rng = id_rng(3, id);
    let name = format!("{} {}", rng.pick(&FIRST_NAMES), rng.pick(&LAST_NAMES));
    let responsible_user_id = *rng.pick(&USERS);
    let (created_at, updated_at) = card_times(&mut rng);
    SimContact {
        id,
        name,
        responsible_user_id,
        created_at,
        updated_at,
    }
}

/// The company with this id.
fn company(id: i64) -> SimCompany {
    let mut rng = id_rng(4, id);
    let name = if rng.chance(0.2) {
        rng.pick(&SPECIAL_NAMES).to_string()
    } else {
        format!("{} {}", rng.pick(&COMPANIES), rng.pick(&COMPANY_FORMS))
    };
    let responsible_user_id = *rng.pick(&USERS);
    let (created_at, updated_at) = card_times(&mut rng);
    SimCompany {
        id,
        name,
        responsible_user_id,
        created_at,
        updated_at,
    }
}

/// The user group a responsible user belongs to.
pub(crate) fn group_of(user_id: i64) -> i64 {
    if user_id <= 1004 {
        0
    } else {
        7301
    }
}

/// A change to a lead, from `PATCH` or [`Sim::move_lead`](super::Sim::move_lead).
#[derive(Debug, Default)]
pub(crate) struct LeadPatch {
    /// New name.
    pub(crate) name: Option<String>,
    /// New price.
    pub(crate) price: Option<i64>,
    /// New pipeline (with `status_id`, or alone: its first stage after "Incoming leads").
    pub(crate) pipeline_id: Option<i64>,
    /// New stage (alone: within the lead's pipeline).
    pub(crate) status_id: Option<i64>,
    /// New responsible user.
    pub(crate) responsible_user_id: Option<i64>,
}

/// Why a write was refused; `path` names the offending field for the problem body.
#[derive(Debug)]
pub(crate) struct WriteError {
    /// Field path, e.g. `status_id`.
    pub(crate) path: &'static str,
    /// What was wrong.
    pub(crate) detail: String,
}

/// Which of the two card lists: its path under `/api/v4/` and its `_embedded` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CardKind {
    Contacts,
    Companies,
}

impl CardKind {
    pub(crate) fn path(self) -> &'static str {
        match self {
            CardKind::Contacts => "contacts",
            CardKind::Companies => "companies",
        }
    }
}

/// Leads and pipelines, indexed.
#[derive(Debug)]
pub(crate) struct Store {
    /// The pipelines, main first.
    pub(crate) pipelines: Vec<SimPipeline>,
    /// Every lead, sorted by id (new leads get larger ids, so pushing keeps it sorted).
    pub(crate) leads: Vec<SimLead>,
    /// The contacts the leads link to, sorted by id.
    pub(crate) contacts: Vec<SimContact>,
    /// The companies the leads link to, sorted by id.
    pub(crate) companies: Vec<SimCompany>,
    /// Lead id → position in `leads`.
    by_id: HashMap<i64, u32>,
    /// Stage → positions in `leads` of the leads listed under it (its own and ghosts), ascending.
    by_stage: HashMap<(i64, i64), Vec<u32>>,
    /// Positions of the deleted leads, ascending: what a restore picks from.
    deleted: Vec<u32>,
    /// The account's change feed, appended to under the same lock as the change it records.
    pub(crate) events: EventLog,
    /// Draws of the changes made while the sim runs: new leads' fields and the churn's choices.
    pub(crate) rng: SplitMix64,
}

impl Store {
    /// Index `leads`, and make the contacts and companies they link to; `seed` drives the changes
    /// made later (new leads' fields, churn) and the event ids.
    pub(crate) fn new(pipelines: Vec<SimPipeline>, mut leads: Vec<SimLead>, seed: u64) -> Self {
        leads.sort_by_key(|l| l.id);
        let contact_ids: BTreeSet<i64> = leads
            .iter()
            .flat_map(|l| l.contact_ids.iter().copied())
            .collect();
        let company_ids: BTreeSet<i64> = leads.iter().filter_map(|l| l.company_id).collect();
        let mut store = Self {
            pipelines,
            leads,
            contacts: contact_ids.into_iter().map(contact).collect(),
            companies: company_ids.into_iter().map(company).collect(),
            by_id: HashMap::new(),
            by_stage: HashMap::new(),
            deleted: Vec::new(),
            events: EventLog::new(seed),
            rng: SplitMix64::derived(seed, 3),
        };
        for i in 0..store.leads.len() {
            store.index_new(i as u32);
        }
        store
    }

    fn index_new(&mut self, pos: u32) {
        let lead = &self.leads[pos as usize];
        self.by_id.insert(lead.id, pos);
        if lead.is_deleted {
            sorted_insert(&mut self.deleted, pos);
        }
        let mut stages = vec![(lead.pipeline_id, lead.status_id)];
        stages.extend(lead.ghost_stages.iter().copied());
        for stage in stages {
            self.index_add(stage, pos);
        }
    }

    fn index_add(&mut self, stage: (i64, i64), pos: u32) {
        let list = self.by_stage.entry(stage).or_default();
        if let Err(at) = list.binary_search(&pos) {
            list.insert(at, pos);
        }
    }

    fn index_remove(&mut self, stage: (i64, i64), pos: u32) {
        if let Some(list) = self.by_stage.get_mut(&stage) {
            if let Ok(at) = list.binary_search(&pos) {
                list.remove(at);
            }
        }
    }

    /// Positions of the leads listed under a stage, ascending (= by id).
    pub(crate) fn stage_positions(&self, stage: (i64, i64)) -> &[u32] {
        self.by_stage.get(&stage).map_or(&[], Vec::as_slice)
    }

    /// Position of a lead by id.
    pub(crate) fn position(&self, id: i64) -> Option<u32> {
        self.by_id.get(&id).copied()
    }

    /// A lead by id, deleted or not.
    pub(crate) fn lead(&self, id: i64) -> Option<&SimLead> {
        self.position(id).map(|pos| &self.leads[pos as usize])
    }

    /// Positions of the deleted leads, ascending.
    pub(crate) fn deleted_positions(&self) -> &[u32] {
        &self.deleted
    }

    /// The contacts or companies leads `token` sees (deleted leads aside) link to, ascending.
    pub(crate) fn visible_cards(&self, kind: CardKind, token: &TokenSpec) -> Vec<&SimCard> {
        let ids: BTreeSet<i64> = match kind {
            CardKind::Contacts => self
                .visible_leads(token)
                .flat_map(|l| l.contact_ids.iter().copied())
                .collect(),
            CardKind::Companies => self
                .visible_leads(token)
                .filter_map(|l| l.company_id)
                .collect(),
        };
        let all = match kind {
            CardKind::Contacts => &self.contacts,
            CardKind::Companies => &self.companies,
        };
        ids.into_iter()
            .filter_map(|id| {
                let at = all.binary_search_by_key(&id, |c| c.id).ok()?;
                all.get(at)
            })
            .collect()
    }

    fn visible_leads<'a>(&'a self, token: &'a TokenSpec) -> impl Iterator<Item = &'a SimLead> {
        self.leads
            .iter()
            .filter(move |l| !l.is_deleted && token.sees(l.responsible_user_id))
    }

    /// A pipeline by id.
    pub(crate) fn pipeline(&self, id: i64) -> Option<&SimPipeline> {
        self.pipelines.iter().find(|p| p.id == id)
    }

    /// Whether `(pipeline_id, status_id)` is a stage of the account.
    pub(crate) fn stage_exists(&self, pipeline_id: i64, status_id: i64) -> bool {
        self.pipeline(pipeline_id)
            .is_some_and(|p| p.statuses.iter().any(|s| s.id == status_id))
    }

    /// Where a new lead goes when the request names only a pipeline, or nothing: the first stage
    /// after "Incoming leads".
    fn default_status(&self, pipeline_id: i64) -> Option<i64> {
        let pipeline = self.pipeline(pipeline_id)?;
        pipeline
            .statuses
            .iter()
            .find(|s| s.type_ != 1)
            .map(|s| s.id)
    }

    /// The main pipeline's id.
    pub(crate) fn main_pipeline(&self) -> i64 {
        self.pipelines
            .iter()
            .find(|p| p.is_main)
            .or(self.pipelines.first())
            .map_or(0, |p| p.id)
    }

    /// Resolve the target stage of a write.
    fn resolve_stage(
        &self,
        current_pipeline: i64,
        pipeline_id: Option<i64>,
        status_id: Option<i64>,
    ) -> Result<(i64, i64), WriteError> {
        let pipeline = pipeline_id.unwrap_or(current_pipeline);
        if self.pipeline(pipeline).is_none() {
            return Err(WriteError {
                path: "pipeline_id",
                detail: format!("Pipeline {pipeline} not found"),
            });
        }
        let status = match status_id {
            Some(s) => s,
            None => self.default_status(pipeline).ok_or(WriteError {
                path: "pipeline_id",
                detail: format!("Pipeline {pipeline} has no stages"),
            })?,
        };
        if !self.stage_exists(pipeline, status) {
            return Err(WriteError {
                path: "status_id",
                detail: format!("Status {status} not found in pipeline {pipeline}"),
            });
        }
        Ok((pipeline, status))
    }

    /// Create a lead from a `POST`; returns its id.
    pub(crate) fn create(
        &mut self,
        patch: LeadPatch,
        by_user: i64,
        now: i64,
    ) -> Result<i64, WriteError> {
        let main = self.main_pipeline();
        let (pipeline_id, status_id) =
            self.resolve_stage(main, patch.pipeline_id, patch.status_id)?;
        let id = self.leads.last().map_or(2_000_001, |l| l.id + 1);
        let responsible_user_id = patch.responsible_user_id.unwrap_or(by_user);
        let closed = status_id == WON || status_id == LOST;
        let lead = SimLead {
            id,
            name: patch.name.unwrap_or_else(|| format!("Lead #{id}")),
            price: patch.price.unwrap_or(0),
            responsible_user_id,
            group_id: group_of(responsible_user_id),
            status_id,
            pipeline_id,
            loss_reason_id: None,
            source_id: None,
            created_by: by_user,
            updated_by: by_user,
            created_at: now,
            updated_at: now,
            closed_at: closed.then_some(now),
            closest_task_at: None,
            is_deleted: false,
            score: None,
            labor_cost: None,
            is_price_modified_by_robot: false,
            custom_fields: Vec::new(),
            tags: Vec::new(),
            company_id: None,
            contact_ids: Vec::new(),
            catalog_elements: Vec::new(),
            ghost_stages: Vec::new(),
        };
        self.push_new(lead, now);
        Ok(id)
    }

    /// A lead made like the generated ones (name, price, users, fields, links) in a stage, created
    /// at `now` with an id above every other: [`Sim::create_lead`](super::Sim::create_lead).
    pub(crate) fn create_generated(
        &mut self,
        pipeline_id: i64,
        status_id: i64,
        now: i64,
    ) -> Option<i64> {
        if !self.stage_exists(pipeline_id, status_id) {
            return None;
        }
        let id = self.leads.last().map_or(2_000_001, |l| l.id) + self.rng.range(1, 3);
        let mut lead = generate_lead(&mut self.rng, id, pipeline_id, status_id);
        lead.created_at = now;
        lead.updated_at = now;
        lead.updated_by = lead.created_by;
        lead.closed_at = lead.closed_at.map(|_| now);
        lead.closest_task_at = lead.closest_task_at.map(|t| t.max(now));
        // The contacts and companies it links to exist, as those of every other lead do.
        if let Some(company_id) = lead.company_id {
            insert_card(&mut self.companies, company_id, company);
        }
        for &contact_id in &lead.contact_ids {
            insert_card(&mut self.contacts, contact_id, contact);
        }
        self.push_new(lead, now);
        Some(id)
    }

    /// Append a new lead (its id above every other), index it and record `lead_added`.
    fn push_new(&mut self, lead: SimLead, now: i64) {
        let (id, by) = (lead.id, lead.created_by);
        self.leads.push(lead);
        self.index_new((self.leads.len() - 1) as u32);
        self.events.record(
            SimEventType::LeadAdded,
            id,
            by,
            now,
            SimEventValue::Empty,
            SimEventValue::Empty,
        );
    }

    /// Apply a change to an existing lead; returns its new `updated_at`.
    pub(crate) fn update(
        &mut self,
        pos: u32,
        patch: LeadPatch,
        by_user: i64,
        now: i64,
    ) -> Result<i64, WriteError> {
        let current = &self.leads[pos as usize];
        let old_stage = (current.pipeline_id, current.status_id);
        let new_stage = if patch.pipeline_id.is_some() || patch.status_id.is_some() {
            self.resolve_stage(current.pipeline_id, patch.pipeline_id, patch.status_id)?
        } else {
            old_stage
        };
        let lead = &mut self.leads[pos as usize];
        let (id, old_price) = (lead.id, lead.price);
        if let Some(name) = patch.name {
            lead.name = name;
        }
        if let Some(price) = patch.price {
            lead.price = price;
        }
        if let Some(user) = patch.responsible_user_id {
            lead.responsible_user_id = user;
            lead.group_id = group_of(user);
        }
        lead.updated_by = by_user;
        // `updated_at` never goes back, whatever the clock read.
        lead.updated_at = lead.updated_at.max(now);
        let (updated_at, new_price) = (lead.updated_at, lead.price);
        self.set_stage(pos, new_stage, now);
        if new_stage != old_stage {
            let status = |(pipeline_id, status_id)| SimEventValue::Status {
                pipeline_id,
                status_id,
            };
            self.events.record(
                SimEventType::LeadStatusChanged,
                id,
                by_user,
                now,
                status(old_stage),
                status(new_stage),
            );
        }
        if new_price != old_price {
            self.events.record(
                SimEventType::SaleFieldChanged,
                id,
                by_user,
                now,
                SimEventValue::Sale(old_price),
                SimEventValue::Sale(new_price),
            );
        }
        Ok(updated_at)
    }

    /// Put a lead in `stage` (nothing if it is there): the stage index follows, `closed_at` is set
    /// on entering 142 or 143 and cleared elsewhere, a loss reason stays only in 143.
    fn set_stage(&mut self, pos: u32, stage: (i64, i64), now: i64) {
        let lead = &mut self.leads[pos as usize];
        let old = (lead.pipeline_id, lead.status_id);
        if stage == old {
            return;
        }
        (lead.pipeline_id, lead.status_id) = stage;
        lead.closed_at = (stage.1 == WON || stage.1 == LOST).then_some(now);
        if stage.1 != LOST {
            lead.loss_reason_id = None;
        }
        if !lead.ghost_stages.contains(&old) {
            self.index_remove(old, pos);
        }
        self.index_add(stage, pos);
    }

    /// [`Sim::move_lead`](super::Sim::move_lead).
    pub(crate) fn move_lead(
        &mut self,
        id: i64,
        pipeline_id: i64,
        status_id: i64,
        now: i64,
    ) -> bool {
        let Some(pos) = self.position(id) else {
            return false;
        };
        if !self.stage_exists(pipeline_id, status_id) {
            return false;
        }
        let by_user = self.leads[pos as usize].updated_by;
        let patch = LeadPatch {
            pipeline_id: Some(pipeline_id),
            status_id: Some(status_id),
            ..LeadPatch::default()
        };
        self.update(pos, patch, by_user, now).is_ok()
    }

    /// [`Sim::edit_lead`](super::Sim::edit_lead).
    pub(crate) fn edit_price(&mut self, id: i64, price: i64, now: i64) -> bool {
        let Some(pos) = self.position(id) else {
            return false;
        };
        let by_user = self.leads[pos as usize].updated_by;
        let patch = LeadPatch {
            price: Some(price),
            ..LeadPatch::default()
        };
        self.update(pos, patch, by_user, now).is_ok()
    }

    /// [`Sim::move_lead_silently`](super::Sim::move_lead_silently): the stage changes,
    /// `updated_at` does not, and no event is recorded.
    pub(crate) fn move_silently(
        &mut self,
        id: i64,
        pipeline_id: i64,
        status_id: i64,
        now: i64,
    ) -> bool {
        let Some(pos) = self.position(id) else {
            return false;
        };
        if !self.stage_exists(pipeline_id, status_id) {
            return false;
        }
        self.set_stage(pos, (pipeline_id, status_id), now);
        true
    }

    /// [`Sim::delete_lead`](super::Sim::delete_lead), or with `silent`
    /// [`Sim::delete_lead_silently`](super::Sim::delete_lead_silently). False if there is no such
    /// live lead.
    pub(crate) fn delete(&mut self, id: i64, now: i64, silent: bool) -> bool {
        self.set_deleted(id, true, now, silent)
    }

    /// [`Sim::restore_lead`](super::Sim::restore_lead). False if there is no such deleted lead.
    pub(crate) fn restore(&mut self, id: i64, now: i64) -> bool {
        self.set_deleted(id, false, now, false)
    }

    fn set_deleted(&mut self, id: i64, deleted: bool, now: i64, silent: bool) -> bool {
        let Some(pos) = self.position(id) else {
            return false;
        };
        let lead = &mut self.leads[pos as usize];
        if lead.is_deleted == deleted {
            return false;
        }
        lead.is_deleted = deleted;
        let by = lead.updated_by;
        if deleted {
            sorted_insert(&mut self.deleted, pos);
        } else if let Ok(at) = self.deleted.binary_search(&pos) {
            self.deleted.remove(at);
        }
        if !silent {
            lead.updated_at = lead.updated_at.max(now);
            let type_ = if deleted {
                SimEventType::LeadDeleted
            } else {
                SimEventType::LeadRestored
            };
            self.events.record(
                type_,
                id,
                by,
                now,
                SimEventValue::Empty,
                SimEventValue::Empty,
            );
        }
        true
    }

    /// [`Sim::add_ghost`](super::Sim::add_ghost).
    pub(crate) fn add_ghost(&mut self, id: i64, pipeline_id: i64, status_id: i64) -> bool {
        let Some(pos) = self.position(id) else {
            return false;
        };
        if !self.stage_exists(pipeline_id, status_id) {
            return false;
        }
        let lead = &mut self.leads[pos as usize];
        if !lead.ghost_stages.contains(&(pipeline_id, status_id)) {
            lead.ghost_stages.push((pipeline_id, status_id));
        }
        self.index_add((pipeline_id, status_id), pos);
        true
    }

    /// [`Sim::clear_ghosts`](super::Sim::clear_ghosts).
    pub(crate) fn clear_ghosts(&mut self, id: i64) -> bool {
        let Some(pos) = self.position(id) else {
            return false;
        };
        let lead = &mut self.leads[pos as usize];
        let own = (lead.pipeline_id, lead.status_id);
        let ghosts = std::mem::take(&mut lead.ghost_stages);
        for stage in ghosts {
            if stage != own {
                self.index_remove(stage, pos);
            }
        }
        true
    }
}

/// Insert `value` into an ascending list, unless it is there.
fn sorted_insert(list: &mut Vec<u32>, value: u32) {
    if let Err(at) = list.binary_search(&value) {
        list.insert(at, value);
    }
}

/// Add the card with this id (made by `make`) to an id-sorted list, unless it is there.
fn insert_card(cards: &mut Vec<SimCard>, id: i64, make: fn(i64) -> SimCard) {
    if let Err(at) = cards.binary_search_by_key(&id, |c| c.id) {
        cards.insert(at, make(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};

    fn stage_sizes(leads: &[SimLead]) -> BTreeMap<(i64, i64), usize> {
        let mut sizes = BTreeMap::new();
        for lead in leads.iter().filter(|l| !l.is_deleted) {
            *sizes.entry((lead.pipeline_id, lead.status_id)).or_insert(0) += 1;
        }
        sizes
    }

    #[test]
    fn deterministic_from_seed() {
        let a = generate(5000, 42);
        let b = generate(5000, 42);
        assert_eq!(a, b);
        let c = generate(5000, 43);
        assert_ne!(a.1, c.1);
    }

    #[test]
    fn pipelines_have_kommo_shape() {
        let (pipelines, _) = generate(100, 42);
        assert_eq!(pipelines.len(), 5);
        assert_eq!(pipelines.iter().filter(|p| p.is_main).count(), 1);
        let mut custom_ids = HashSet::new();
        for p in &pipelines {
            assert_eq!(p.statuses[0].type_, 1);
            assert_eq!(p.statuses[0].name, "Incoming leads");
            assert!(p.statuses.iter().any(|s| s.id == WON));
            assert!(p.statuses.iter().any(|s| s.id == LOST));
            let customs = p.statuses.len() - 3;
            assert!((3..=6).contains(&customs), "{customs} custom stages");
            for s in &p.statuses {
                if s.id != WON && s.id != LOST {
                    assert!(custom_ids.insert(s.id), "status id {} repeats", s.id);
                }
            }
        }
    }

    #[test]
    fn stage_sizes_vary_widely() {
        for (n, big_at_least) in [(20_000, 800), (3000, 251), (1000, 251)] {
            let (pipelines, leads) = generate(n, 42);
            assert_eq!(leads.len(), n);
            let sizes = stage_sizes(&leads);
            let largest = sizes.values().copied().max().unwrap_or(0);
            assert!(largest >= big_at_least, "n={n}: largest stage {largest}");
            assert!(sizes.values().any(|&c| (1..=10).contains(&c)), "n={n}");
            let empty_custom = pipelines.iter().any(|p| {
                p.statuses
                    .iter()
                    .filter(|s| s.is_editable)
                    .any(|s| !sizes.contains_key(&(p.id, s.id)))
            });
            assert!(empty_custom, "n={n}: no empty custom stage");
        }
    }

    #[test]
    fn leads_look_like_kommo() {
        let (_, leads) = generate(20_000, 42);
        let ids: Vec<i64> = leads.iter().map(|l| l.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        assert!(ids.windows(2).any(|w| w[1] - w[0] > 1), "ids contiguous");
        let users: HashSet<i64> = leads.iter().map(|l| l.responsible_user_id).collect();
        assert_eq!(users.len(), 8);
        let created: HashSet<i64> = leads.iter().map(|l| l.created_at).collect();
        assert!(created.len() * 5 < leads.len(), "created_at rarely ties");
        let mut null_fields = 0;
        for l in &leads {
            assert!(l.updated_at >= l.created_at);
            assert_eq!(
                l.closed_at.is_some(),
                l.status_id == WON || l.status_id == LOST
            );
            assert_eq!(l.created_at % 3600, 0);
            if l.custom_fields.is_empty() {
                null_fields += 1;
            }
        }
        let share = null_fields as f64 / leads.len() as f64;
        assert!((0.2..0.4).contains(&share), "{share}");
        let deleted = leads.iter().filter(|l| l.is_deleted).count();
        assert!((3..=50).contains(&deleted), "{deleted}");
    }

    #[test]
    fn store_moves_and_ghosts_keep_the_index() {
        let (pipelines, leads) = generate(500, 1);
        let mut store = Store::new(pipelines, leads, 1);
        let id = store.leads[10].id;
        let from = (store.leads[10].pipeline_id, store.leads[10].status_id);
        let to = (2000, WON);
        assert!(store.move_lead(id, to.0, to.1, NOW + 5));
        let pos = store.position(id).unwrap();
        assert!(!store.stage_positions(from).contains(&pos));
        assert!(store.stage_positions(to).contains(&pos));
        assert_eq!(store.leads[pos as usize].closed_at, Some(NOW + 5));
        assert!(store.add_ghost(id, from.0, from.1));
        assert!(store.stage_positions(from).contains(&pos));
        assert!(store.clear_ghosts(id));
        assert!(!store.stage_positions(from).contains(&pos));
        assert!(!store.move_lead(id, 1000, 99, NOW));
        assert!(!store.add_ghost(-1, from.0, from.1));
    }
}
