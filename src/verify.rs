//! `kommo-fanout verify`: before an integration is switched to the proxy, checks against the
//! user's own account that the proxy's merged views are what Kommo itself lists, stage by stage.
//!
//! The proxy runs in process, built by the real wiring and served on `127.0.0.1:0`. For each
//! order, verify reads every picked stage directly (one request per stage, `limit=250`, in that
//! order), computes the expected merge itself (sorted, ties by id in the same direction,
//! deduplicated: no code of the proxy's merge is used) and walks the proxy's pages of views over
//! those stages, comparing leads, positions, links, content types and the `204` past the end.
//! Direct reads come first, then the proxy's; a lead missing or misplaced on either side fails a
//! check. Every upstream request, verify's and the proxy's, goes through the gateway's one
//! fetcher: one limiter, and a hard cap of `--max-requests` attempts.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::config::{ServeConfig, VerifyArgs};
use crate::gateway::Gateway;
use crate::json_text::{edit_strings, Edit, Seg};
use crate::leads::query::{pair_params, StagePair};
use crate::links::{ItemQuery, LinkRewrite};
use crate::metrics::UpstreamKind;
use crate::upstream::fetch::{FetchError, Flow, Verdict};
use crate::upstream::Buffered;

/// The smallest `--max-requests`: two stages (four requests each), the pipelines, the one-stage
/// relay check and a reserve for retries.
pub const MIN_REQUESTS: u64 = 12;
/// Kommo's largest page: a direct read of fewer leads holds the whole stage.
const FULL_PAGE: usize = 250;
/// Most pages of one view walked from the first (then the last one and the one past it).
const MAX_WALK: usize = 20;
/// How long verify waits for a previous process of the account to finish its window.
const PREDECESSOR_WAIT: Duration = Duration::from_secs(5);
/// Where recorded hrefs point instead of the account's origin.
pub const RECORDED_ORIGIN: &str = "https://example.kommo.com";
const HAL_JSON: &str = "application/hal+json";

/// One stage: `(pipeline_id, status_id)`.
pub type Stage = (i64, i64);

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The account origin, e.g. `https://example.kommo.com`.
    pub upstream: String,
    /// The bearer token; sent upstream only, never printed or written.
    pub token: String,
    /// The most upstream requests the run may send, the proxy's included.
    pub max_requests: u64,
    /// Where to save the direct answers as fixtures.
    pub record: Option<PathBuf>,
}

impl Options {
    /// Validated options of the command line: a usage error names the flag.
    pub fn from_args(args: &VerifyArgs) -> Result<Options, String> {
        crate::upstream::Origin::parse(&args.upstream).map_err(|e| format!("--upstream: {e}"))?;
        let path = args.token_file.display();
        let text = std::fs::read_to_string(&args.token_file)
            .map_err(|e| format!("--token-file {path}: cannot read it: {e}"))?;
        let token = text.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "--token-file {path}: expected one bearer token (no spaces inside)"
            ));
        }
        Ok(Options {
            upstream: args.upstream.clone(),
            token: token.to_string(),
            max_requests: args.max_requests,
            record: args.record.clone(),
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub ok: bool,
    /// What was checked: a view by its order, limit and stages, or a kind of answer.
    pub name: String,
    /// What was seen, or for a failure what differed (and where).
    pub detail: String,
}

/// What a run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub upstream: String,
    /// The stages picked, as `pipeline_id/status_id`.
    pub stages: Vec<String>,
    /// How many stages were picked, and why.
    pub plan: String,
    pub checks: Vec<Check>,
    /// What was not checked, and why.
    pub notes: Vec<String>,
    /// Upstream requests sent, the proxy's included.
    pub requests_spent: u64,
    pub max_requests: u64,
    /// Why the run stopped before its checks were done: the account unreachable, the token
    /// refused, the budget exhausted.
    pub error: Option<String>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.checks.iter().filter(|c| !c.ok).count()
    }

    /// 0: every check passed; 1: a mismatch; 3: the run could not complete (2 is a usage
    /// error, found before a run starts).
    pub fn exit_code(&self) -> u8 {
        match (&self.error, self.failed()) {
            (Some(_), _) => 3,
            (None, 0) => 0,
            _ => 1,
        }
    }

    pub fn text(&self) -> String {
        let mut out = format!("kommo-fanout verify: upstream {}\n", self.upstream);
        if !self.plan.is_empty() {
            out += &format!("plan: {}\n", self.plan);
        }
        for c in &self.checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            out += &format!("{mark} {}: {}\n", c.name, c.detail);
        }
        for n in &self.notes {
            out += &format!("note: {n}\n");
        }
        if let Some(e) = &self.error {
            out += &format!("error: {e}\n");
        }
        let verdict = match self.exit_code() {
            0 => "PASS",
            1 => "MISMATCH",
            _ => "INCOMPLETE",
        };
        out += &format!(
            "summary: {verdict}: {} checks, {} ok, {} failed; {} of {} upstream requests spent\n",
            self.checks.len(),
            self.checks.len() - self.failed(),
            self.failed(),
            self.requests_spent,
            self.max_requests
        );
        out
    }

    pub fn json(&self) -> String {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        v["passed"] = json!(self.exit_code() == 0);
        v["exit_code"] = json!(self.exit_code());
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }
}

/// Runs every check and reports; never panics on what the account or the network sends.
pub async fn run(opts: &Options) -> Report {
    let mut report = Report {
        upstream: opts.upstream.clone(),
        max_requests: opts.max_requests,
        ..Report::default()
    };
    match Verifier::start(opts).await {
        Ok(mut v) => {
            let outcome = v.all(&mut report).await;
            report.requests_spent = v.gw.fetcher.requests_sent();
            if let Err(e) = outcome {
                report.error = Some(if report.requests_spent >= opts.max_requests {
                    format!(
                        "budget exhausted: the run needed more than --max-requests {} upstream \
                         requests ({e})",
                        opts.max_requests
                    )
                } else {
                    e
                });
            }
            if let Some(rec) = &v.recorder {
                if let Err(e) = rec.finish() {
                    report.error.get_or_insert(e);
                }
            }
        }
        Err(e) => report.error = Some(e),
    }
    report
}

/// The order of a view, kept apart from the proxy's types: the expectation is computed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ViewOrder {
    field: &'static str,
    desc: bool,
}

const ORDERS: [ViewOrder; 2] = [
    ViewOrder {
        field: "id",
        desc: false,
    },
    ViewOrder {
        field: "updated_at",
        desc: true,
    },
];

impl ViewOrder {
    fn dir(self) -> &'static str {
        if self.desc {
            "desc"
        } else {
            "asc"
        }
    }

    fn param(self) -> String {
        format!("order%5B{}%5D={}", self.field, self.dir())
    }

    fn name(self) -> String {
        format!("order[{}]={}", self.field, self.dir())
    }

    /// The sort key: the field (a missing or null value first ascending), then the id.
    fn key(self, lead: &Lead) -> (Option<i64>, i64) {
        let v = match self.field {
            "id" => Some(lead.id),
            f => lead.fields.get(f).and_then(Value::as_i64),
        };
        (v, lead.id)
    }

    /// Whether `a` may come before `b`.
    fn before(self, a: &Lead, b: &Lead) -> bool {
        (self.key(a) <= self.key(b)) != self.desc || self.key(a) == self.key(b)
    }

    fn sort(self, leads: &mut [Lead]) {
        leads.sort_by(|a, b| {
            let o = self.key(a).cmp(&self.key(b));
            if self.desc {
                o.reverse()
            } else {
                o
            }
        });
    }
}

/// One lead as verify compares it.
#[derive(Debug, Clone)]
struct Lead {
    id: i64,
    stage: Stage,
    /// The lead's object with every `_links` member removed, at any depth.
    fields: Value,
    /// `_links.self.href`.
    self_href: Option<String>,
}

impl Lead {
    fn parse(v: &Value) -> Result<Lead, String> {
        let int = |k: &str| v.get(k).and_then(Value::as_i64);
        let id = int("id").ok_or("a lead without an integer id")?;
        let stage = (
            int("pipeline_id").unwrap_or(0),
            int("status_id").unwrap_or(0),
        );
        let self_href = v
            .pointer("/_links/self/href")
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut fields = v.clone();
        strip_links(&mut fields);
        Ok(Lead {
            id,
            stage,
            fields,
            self_href,
        })
    }
}

fn strip_links(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("_links");
            m.values_mut().for_each(strip_links);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_links),
        _ => {}
    }
}

fn stage_name((p, s): Stage) -> String {
    format!("{p}/{s}")
}

fn stages_name(stages: &[Stage]) -> String {
    stages
        .iter()
        .map(|&s| stage_name(s))
        .collect::<Vec<_>>()
        .join(",")
}

/// The leads of a `200` leads page (a `204` has none).
fn parse_leads(body: &[u8]) -> Result<Vec<Lead>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    v.pointer("/_embedded/leads")
        .and_then(Value::as_array)
        .ok_or("no `_embedded.leads` list")?
        .iter()
        .map(Lead::parse)
        .collect()
}

/// One stage read directly: its leads, and whether they are the whole stage.
#[derive(Clone)]
struct StageRead {
    stage: Stage,
    leads: Vec<Lead>,
    complete: bool,
}

/// The merge the proxy should answer, computed from direct reads: every lead sorted in `order`,
/// each once at its first position, cut where the reads stop being certain (past the last lead
/// of a stage that holds more than one page). `true` when that is the whole union.
fn expected(reads: &[&StageRead], order: ViewOrder) -> (Vec<Lead>, bool) {
    let mut all: Vec<Lead> = reads.iter().flat_map(|r| r.leads.clone()).collect();
    order.sort(&mut all);
    let mut seen = HashSet::new();
    all.retain(|l| seen.insert(l.id));
    let bound = reads
        .iter()
        .filter(|r| !r.complete)
        .filter_map(|r| r.leads.last())
        .reduce(|a, b| if order.before(a, b) { a } else { b });
    match bound {
        None => (all, true),
        Some(b) => {
            let b = b.clone();
            all.retain(|l| order.before(l, &b));
            (all, false)
        }
    }
}

/// A view: stages, an order (`explicit: false` leaves it to the default, `id` ascending), a
/// page size.
struct View {
    stages: Vec<Stage>,
    order: ViewOrder,
    explicit: bool,
    limit: usize,
}

impl View {
    fn query(&self, page: usize) -> String {
        let mut q: Vec<String> = self
            .stages
            .iter()
            .enumerate()
            .flat_map(|(i, (p, s))| {
                [
                    format!("filter%5Bstatuses%5D%5B{i}%5D%5Bpipeline_id%5D={p}"),
                    format!("filter%5Bstatuses%5D%5B{i}%5D%5Bstatus_id%5D={s}"),
                ]
            })
            .collect();
        if self.explicit {
            q.push(self.order.param());
        }
        q.push(format!("limit={}", self.limit));
        q.push(format!("page={page}"));
        q.join("&")
    }

    fn name(&self) -> String {
        let order = if self.explicit {
            self.order.name()
        } else {
            "order (default)".into()
        };
        format!(
            "view {order} limit={} stages {}",
            self.limit,
            stages_name(&self.stages)
        )
    }
}

/// The pages of a view to walk: the first ones, and with the whole union known the last one and
/// the one past it; without, only pages whose next lead is still certain.
fn pages_to_walk(leads: usize, complete: bool, limit: usize) -> Vec<usize> {
    if !complete {
        return (1..=MAX_WALK).take_while(|p| p * limit < leads).collect();
    }
    let last = leads.div_ceil(limit);
    let mut pages: Vec<usize> = (1..=last.min(MAX_WALK)).collect();
    pages.extend([last, last + 1].into_iter().filter(|&p| p > 0));
    pages.dedup();
    pages
}

/// An answer of the in-process proxy.
struct Answer {
    status: StatusCode,
    content_type: String,
    body: Bytes,
}

struct Verifier {
    gw: Arc<Gateway>,
    /// The in-process proxy's base URL.
    proxy: String,
    origin: String,
    client: Client<HttpConnector, Full<Bytes>>,
    auth: HeaderMap,
    max_requests: u64,
    recorder: Option<Recorder>,
    /// Stops the proxy when dropped.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Verifier {
    async fn start(opts: &Options) -> Result<Verifier, String> {
        let mut config = ServeConfig::for_upstream(&opts.upstream)?;
        // Pages stay cached for the whole run: walking a view's pages costs no more upstream
        // requests than its first page.
        config.cache.ttl = Duration::from_secs(600);
        let gw = crate::gateway(&config).await?;
        gw.fetcher.cap_requests(opts.max_requests);
        // A proxy of this account on this host holds its turn to send: verify alongside it
        // would add to its window, so it waits for it, briefly, and otherwise says why.
        let origin = gw.fetcher.upstream.origin().url.clone();
        let waited = Instant::now() + PREDECESSOR_WAIT;
        while gw.fetcher.limiter.snapshot(&origin).waiting_for_predecessor {
            if Instant::now() >= waited {
                return Err(format!(
                    "another kommo-fanout process sends to {origin} from this host (it holds {}): \
                     verify would spend the account's budget alongside it; stop it and run verify again",
                    config.limiter_lock.as_ref().map_or(String::new(), |p| p.display().to_string())
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let bind = || TcpListener::bind("127.0.0.1:0");
        let (listener, admin) = (bind().await, bind().await);
        let (listener, admin) = listener
            .and_then(|l| Ok((l, admin?)))
            .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let proxy = format!(
            "http://{}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = gw.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = crate::serve(&config, served, listener, admin, shutdown).await {
                tracing::error!(error = %e, "the in-process proxy stopped");
            }
        });
        let mut auth = HeaderMap::new();
        let mut value = HeaderValue::from_str(&format!("Bearer {}", opts.token))
            .map_err(|_| "the token is not a valid header value".to_string())?;
        value.set_sensitive(true);
        auth.insert(header::AUTHORIZATION, value);
        let recorder = match &opts.record {
            Some(dir) => Some(Recorder::new(dir, &gw.fetcher.upstream.origin().url)?),
            None => None,
        };
        Ok(Verifier {
            origin: gw.fetcher.upstream.origin().url.clone(),
            gw,
            proxy,
            client: Client::builder(TokioExecutor::new()).build_http(),
            auth,
            max_requests: opts.max_requests,
            recorder,
            _stop: stop,
        })
    }

    /// Every check, in order; an `Err` stops the run.
    async fn all(&mut self, report: &mut Report) -> Result<(), String> {
        let stages = self.plan(report).await?;
        report.stages = stages.iter().map(|&s| stage_name(s)).collect();
        let mut first_reads: Option<Vec<StageRead>> = None;
        for (i, order) in ORDERS.into_iter().enumerate() {
            let reads = self.direct_reads(&stages, order).await?;
            report
                .checks
                .push(direct_check(&reads, order, first_reads.as_deref()));
            let all: Vec<&StageRead> = reads.iter().collect();
            let (expect, complete) = expected(&all, order);
            // The second view of the first order leaves the order to the proxy's default.
            for (limit, explicit) in [(7, true), (50, i > 0)] {
                let view = View {
                    stages: stages.clone(),
                    order,
                    explicit,
                    limit,
                };
                report
                    .checks
                    .push(self.walk(&view, &expect, complete).await?);
            }
            if first_reads.is_none() {
                first_reads = Some(reads.clone());
            }
            if complete {
                continue;
            }
            // The end of the list, on the stages read whole: their pages are cached already.
            let whole: Vec<&StageRead> = reads.iter().filter(|r| r.complete).collect();
            if whole.len() < 2 {
                report.notes.push(format!(
                    "{}: the end of the list was not walked: fewer than 2 stages hold under \
                     {FULL_PAGE} leads, and reading on would cost more upstream requests",
                    order.name()
                ));
                continue;
            }
            let view = View {
                stages: whole.iter().map(|r| r.stage).collect(),
                order,
                explicit: true,
                limit: 50,
            };
            let (expect, _) = expected(&whole, order);
            report.checks.push(self.walk(&view, &expect, true).await?);
        }
        if let Some(read) = first_reads.as_ref().and_then(|r| r.first()) {
            report.checks.push(self.relay_check(read).await?);
        }
        report.checks.push(self.error_check(&stages).await?);
        Ok(())
    }

    /// Reads the pipelines and picks the stages.
    async fn plan(&mut self, report: &mut Report) -> Result<Vec<Stage>, String> {
        let target = "/api/v4/leads/pipelines";
        let answer = self.direct(target).await?;
        self.record(target, &answer, json!({"kind": "pipelines"}))?;
        if answer.status != StatusCode::OK {
            return Err(format!(
                "GET {target} answered {}; cannot plan",
                answer.status
            ));
        }
        let v: Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("GET {target}: the answer is not JSON: {e}"))?;
        let pipelines = v
            .pointer("/_embedded/pipelines")
            .and_then(Value::as_array)
            .ok_or(format!("GET {target}: no `_embedded.pipelines` list"))?;
        let listed: Vec<(i64, Vec<i64>)> = pipelines
            .iter()
            .filter_map(|p| {
                let statuses = p.pointer("/_embedded/statuses")?.as_array()?;
                let ids = statuses.iter().filter_map(|s| s.get("id")?.as_i64());
                Some((p.get("id")?.as_i64()?, ids.collect()))
            })
            .collect();
        let (plan, stages) = pick_stages(&listed, self.max_requests);
        report.plan = plan;
        report.checks.push(Check {
            ok: true,
            name: "pipelines".into(),
            detail: format!(
                "{} pipelines, {} stages",
                listed.len(),
                listed.iter().map(|(_, s)| s.len()).sum::<usize>()
            ),
        });
        if stages.len() < 2 {
            return Err("the account has fewer than 2 stages: nothing to merge".into());
        }
        Ok(stages)
    }

    /// One GET to the account through the gateway's fetcher (its limiter and cap), not the proxy.
    async fn direct(&self, target: &str) -> Result<Buffered, String> {
        let flow = Flow {
            // Verify's own share of the budget, apart from the proxy's client flows.
            id: u64::MAX,
            key: Arc::from(self.origin.as_str()),
            deadline: Instant::now() + Duration::from_secs(120),
        };
        let fetcher = &self.gw.fetcher;
        let got = fetcher
            .get(UpstreamKind::Single, &flow, target, &self.auth, |b| {
                Verdict::Done(b)
            })
            .await;
        let answer = match got {
            Ok(b) => b,
            Err(FetchError::Status(b)) => b,
            Err(e @ FetchError::Transport(_)) => {
                return Err(format!("cannot reach {}: {e}", self.origin))
            }
            Err(e) => {
                return Err(format!(
                    "GET {}: {e}",
                    target.split('?').next().unwrap_or("")
                ))
            }
        };
        match answer.status.as_u16() {
            401 => Err(format!(
                "{} refused the token (401 Unauthorized): check --token-file",
                self.origin
            )),
            403 => Err(format!(
                "{} answered 403 Forbidden: the token's user may not read this, or the address is blocked",
                self.origin
            )),
            200 | 204 => Ok(answer),
            s => Err(format!("GET {} answered {s}", target.split('?').next().unwrap_or(""))),
        }
    }

    fn record(&mut self, target: &str, answer: &Buffered, meta: Value) -> Result<(), String> {
        match &mut self.recorder {
            Some(r) => r.save(target, answer, meta),
            None => Ok(()),
        }
    }

    /// The first page (limit 250) of each stage in `order`, read at once (the limiter paces
    /// them).
    async fn direct_reads(
        &mut self,
        stages: &[Stage],
        order: ViewOrder,
    ) -> Result<Vec<StageRead>, String> {
        let targets: Vec<String> = stages
            .iter()
            .map(|&(pipeline_id, status_id)| {
                let [pipeline, status] = pair_params(StagePair {
                    pipeline_id,
                    status_id,
                });
                format!(
                    "/api/v4/leads?{pipeline}&{status}&{}&limit={FULL_PAGE}",
                    order.param()
                )
            })
            .collect();
        let answers = futures::future::join_all(targets.iter().map(|t| self.direct(t))).await;
        let mut reads = Vec::new();
        for ((&stage, target), answer) in stages.iter().zip(&targets).zip(answers) {
            let answer = answer?;
            let meta = json!({"kind": "leads", "pipeline_id": stage.0, "status_id": stage.1,
                              "order_field": order.field, "direction": order.dir(), "page": 1});
            self.record(target, &answer, meta)?;
            let leads = match answer.status {
                StatusCode::OK => parse_leads(&answer.body)
                    .map_err(|e| format!("the direct read of {}: {e}", stage_name(stage)))?,
                _ => Vec::new(),
            };
            reads.push(StageRead {
                stage,
                complete: leads.len() < FULL_PAGE,
                leads,
            });
        }
        Ok(reads)
    }

    async fn get_proxy(&self, query: &str) -> Result<Answer, String> {
        let url = format!("{}/api/v4/leads?{query}", self.proxy);
        let mut req = Request::get(&url)
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("GET {url}: {e}"))?;
        *req.headers_mut() = self.auth.clone();
        let sent = tokio::time::timeout(Duration::from_secs(120), async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok::<_, String>((parts, body))
        });
        let (parts, body) = sent
            .await
            .map_err(|_| "the in-process proxy did not answer within 120s".to_string())?
            .map_err(|e| format!("the in-process proxy: {e}"))?;
        // The proxy could not reach the account for lack of budget: the run's failure, not
        // the proxy's.
        if parts.status.is_server_error() && self.gw.fetcher.requests_sent() >= self.max_requests {
            return Err(format!("the proxy answered {}", parts.status));
        }
        let content_type = parts.headers.get(header::CONTENT_TYPE);
        Ok(Answer {
            status: parts.status,
            content_type: content_type
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            body,
        })
    }

    /// Walks the pages of `view` and compares each with `expect` (the whole union when
    /// `complete`, else a certain prefix of it).
    async fn walk(&self, view: &View, expect: &[Lead], complete: bool) -> Result<Check, String> {
        let pages = pages_to_walk(expect.len(), complete, view.limit);
        let mut seen = HashSet::new();
        let mut failures = Vec::new();
        for &page in &pages {
            let query = view.query(page);
            let answer = self.get_proxy(&query).await?;
            let from = ((page - 1) * view.limit).min(expect.len());
            let slice = &expect[from..(page * view.limit).min(expect.len())];
            let more = page * view.limit < expect.len();
            let diffs = self.page_diffs(view, page, &query, &answer, slice, Some(more), &mut seen);
            if let Some(first) = diffs.first() {
                failures.push(format!("page {page}: {first}"));
            }
        }
        Ok(match failures.first() {
            None => Check {
                ok: true,
                name: view.name(),
                detail: match (complete, pages.split_last()) {
                    (true, Some((end, rest))) if !rest.is_empty() => format!(
                        "pages {} (all {} leads), page {end}: 204",
                        ranges(rest),
                        expect.len()
                    ),
                    (true, _) => "page 1: 204 (no leads)".into(),
                    _ => format!(
                        "pages {} (of {} leads certain)",
                        ranges(&pages),
                        expect.len()
                    ),
                },
            },
            Some(first) => Check {
                ok: false,
                name: view.name(),
                detail: format!(
                    "{first} ({} of {} pages differ)",
                    failures.len(),
                    pages.len()
                ),
            },
        })
    }

    /// What is wrong with one answer of the proxy, first difference first. `more`: whether a
    /// `next` link must be present (`None`: the upstream's links, relayed, are not checked).
    #[allow(clippy::too_many_arguments)]
    fn page_diffs(
        &self,
        view: &View,
        page: usize,
        query: &str,
        answer: &Answer,
        expect: &[Lead],
        more: Option<bool>,
        seen: &mut HashSet<i64>,
    ) -> Vec<String> {
        if expect.is_empty() {
            return match (answer.status, answer.body.is_empty()) {
                (StatusCode::NO_CONTENT, true) => Vec::new(),
                (s, _) => vec![format!(
                    "expected 204 with no body past the end, got {s} with {} bytes",
                    answer.body.len()
                )],
            };
        }
        if answer.status != StatusCode::OK {
            let body = String::from_utf8_lossy(&answer.body);
            return vec![format!(
                "expected 200 with {} leads, got {}: {}",
                expect.len(),
                answer.status,
                body.chars().take(200).collect::<String>()
            )];
        }
        let mut diffs = Vec::new();
        if answer.content_type != HAL_JSON {
            diffs.push(format!(
                "content type {:?}, expected exactly {HAL_JSON:?}",
                answer.content_type
            ));
        }
        let doc: Value = match serde_json::from_slice(&answer.body) {
            Ok(v) => v,
            Err(e) => return vec![format!("the answer is not JSON: {e}")],
        };
        diffs.extend(self.link_diffs(&doc));
        if let Some(more) = more {
            let base = format!("{}/api/v4/leads?", self.proxy);
            let other = |p: usize| format!("{base}{}", view.query(p));
            let want = [
                ("self", Some(other(page))),
                ("first", Some(other(1))),
                ("prev", (page > 1).then(|| other(page - 1))),
                ("next", more.then(|| other(page + 1))),
            ];
            for (rel, want) in want {
                let got = doc
                    .pointer(&format!("/_links/{rel}/href"))
                    .and_then(Value::as_str);
                if got != want.as_deref() {
                    diffs.push(format!("`{rel}` link {got:?}, expected {want:?}"));
                }
            }
            if doc.get("_page").and_then(Value::as_u64) != Some(page as u64) {
                diffs.push(format!("`_page` {:?}, expected {page}", doc.get("_page")));
            }
        }
        let got = match doc.pointer("/_embedded/leads").and_then(Value::as_array) {
            Some(leads) => leads.iter().map(Lead::parse).collect::<Result<Vec<_>, _>>(),
            None => Err("no `_embedded.leads` list".into()),
        };
        let got = match got {
            Ok(g) => g,
            Err(e) => {
                diffs.push(e);
                return diffs;
            }
        };
        for lead in &got {
            if !view.stages.contains(&lead.stage) {
                diffs.push(format!(
                    "lead {} listed under {}, not a requested stage",
                    lead.id,
                    stage_name(lead.stage)
                ));
            }
            if !seen.insert(lead.id) {
                diffs.push(format!("lead {} listed twice", lead.id));
            }
            let want = format!("{}/api/v4/leads/{}?{query}", self.proxy, lead.id);
            if lead.self_href.as_deref() != Some(want.as_str()) {
                diffs.push(format!(
                    "lead {} self link {:?}, expected {want:?}",
                    lead.id, lead.self_href
                ));
            }
        }
        for (i, (want, got)) in expect.iter().zip(&got).enumerate() {
            if want.id != got.id {
                diffs.push(format!(
                    "lead {} expected at position {}, got {}",
                    want.id,
                    i + 1,
                    got.id
                ));
            } else if want.fields != got.fields {
                diffs.push(format!(
                    "lead {} differs from the upstream's: {}",
                    want.id,
                    first_difference(&want.fields, &got.fields)
                ));
            }
        }
        if got.len() != expect.len() {
            diffs.push(format!("{} leads, expected {}", got.len(), expect.len()));
        }
        diffs
    }

    /// Hrefs not at the proxy, and any string at the upstream's origin.
    fn link_diffs(&self, doc: &Value) -> Vec<String> {
        let mut diffs = Vec::new();
        let origin = self.origin.to_ascii_lowercase();
        let proxy = format!("{}/", self.proxy);
        walk_strings(doc, None, &mut |key, s| {
            let at_origin = s
                .get(..origin.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(&origin));
            if at_origin {
                diffs.push(format!("{s:?} is at the upstream's origin"));
            } else if key == Some("href") && !s.starts_with(&proxy) {
                diffs.push(format!("href {s:?} is not at the proxy"));
            }
        });
        diffs
    }

    /// A one-stage view is relayed: its leads are the direct read's first ones, its links moved.
    async fn relay_check(&self, read: &StageRead) -> Result<Check, String> {
        let view = View {
            stages: vec![read.stage],
            order: ORDERS[0],
            explicit: true,
            limit: 7,
        };
        let query = view.query(1);
        let answer = self.get_proxy(&query).await?;
        let expect = &read.leads[..read.leads.len().min(view.limit)];
        let diffs = self.page_diffs(&view, 1, &query, &answer, expect, None, &mut HashSet::new());
        Ok(check(
            format!("one-stage {} page 1 (relayed)", view.name()),
            diffs,
            format!("{} leads, links at the proxy", expect.len()),
        ))
    }

    /// An invalid request is the proxy's own `400` in `application/problem+json`.
    async fn error_check(&self, stages: &[Stage]) -> Result<Check, String> {
        let view = View {
            stages: stages.to_vec(),
            order: ORDERS[0],
            explicit: true,
            limit: 0,
        };
        let answer = self.get_proxy(&view.query(1)).await?;
        let mut diffs = Vec::new();
        if answer.status != StatusCode::BAD_REQUEST {
            diffs.push(format!("status {}, expected 400", answer.status));
        }
        if answer.content_type != crate::error::PROBLEM_JSON {
            diffs.push(format!(
                "content type {:?}, expected exactly {:?}",
                answer.content_type,
                crate::error::PROBLEM_JSON
            ));
        }
        match serde_json::from_slice::<Value>(&answer.body) {
            Ok(v) if v.get("status").and_then(Value::as_u64) == Some(400) => {}
            _ => diffs.push("the body is not a problem document with status 400".into()),
        }
        Ok(check(
            "error answer (limit=0)".into(),
            diffs,
            "400 application/problem+json".into(),
        ))
    }
}

fn check(name: String, diffs: Vec<String>, ok_detail: String) -> Check {
    match diffs.split_first() {
        None => Check {
            ok: true,
            name,
            detail: ok_detail,
        },
        Some((first, rest)) => Check {
            ok: false,
            name,
            detail: if rest.is_empty() {
                first.clone()
            } else {
                format!("{first} (and {} more differences)", rest.len())
            },
        },
    }
}

/// The direct reads themselves: each lead under its own stage, each page in the order asked
/// for (ties by id in the same direction, as the proxy assumes), no lead twice, and a stage
/// read whole in two orders the same leads both times.
fn direct_check(reads: &[StageRead], order: ViewOrder, before: Option<&[StageRead]>) -> Check {
    let mut diffs = Vec::new();
    for r in reads {
        let mut ids = HashSet::new();
        for (i, lead) in r.leads.iter().enumerate() {
            if lead.stage != r.stage {
                diffs.push(format!(
                    "the upstream listed lead {} under {}, but its stage is {}",
                    lead.id,
                    stage_name(r.stage),
                    stage_name(lead.stage)
                ));
            }
            if !ids.insert(lead.id) {
                diffs.push(format!("the upstream listed lead {} twice", lead.id));
            }
            if let Some(prev) = i.checked_sub(1).map(|j| &r.leads[j]) {
                if !order.before(prev, lead) {
                    diffs.push(format!(
                        "the upstream's page of {} is not in {} (ties by id): lead {} before {}",
                        stage_name(r.stage),
                        order.name(),
                        prev.id,
                        lead.id
                    ));
                }
            }
        }
    }
    for (r, b) in reads.iter().zip(before.unwrap_or_default()) {
        if !(r.complete && b.complete) {
            continue;
        }
        let ids = |r: &StageRead| r.leads.iter().map(|l| l.id).collect::<HashSet<_>>();
        let (now, then) = (ids(r), ids(b));
        if let Some(id) = now.symmetric_difference(&then).min() {
            diffs.push(format!(
                "stage {} read whole in both orders lists lead {id} in one of them only ({} and {} leads)",
                stage_name(r.stage),
                now.len(),
                then.len()
            ));
        }
    }
    let leads: usize = reads.iter().map(|r| r.leads.len()).sum();
    let whole = reads.iter().filter(|r| r.complete).count();
    check(
        format!("direct reads {}", order.name()),
        diffs,
        format!(
            "{} stages ({whole} read whole), {leads} leads, each under its own stage",
            reads.len()
        ),
    )
}

/// `1,2,3,7` as `1-3,7`.
fn ranges(pages: &[usize]) -> String {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == p => *end = p,
            _ => out.push((p, p)),
        }
    }
    let text = out.iter().map(|&(a, b)| match a == b {
        true => a.to_string(),
        false => format!("{a}-{b}"),
    });
    text.collect::<Vec<_>>().join(",")
}

/// Where two decoded leads first differ, by member.
fn first_difference(want: &Value, got: &Value) -> String {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            let keys = w.keys().chain(g.keys().filter(|k| !w.contains_key(*k)));
            for k in keys {
                if w.get(k) != g.get(k) {
                    return format!("`{k}` is {:?}, upstream {:?}", g.get(k), w.get(k));
                }
            }
            "no difference".into()
        }
        _ => "not an object".into(),
    }
}

/// Calls `f` with every string value of `v` and the name of the member holding it.
fn walk_strings(v: &Value, key: Option<&str>, f: &mut impl FnMut(Option<&str>, &str)) {
    match v {
        Value::String(s) => f(key, s),
        Value::Array(a) => a.iter().for_each(|x| walk_strings(x, None, f)),
        Value::Object(m) => m.iter().for_each(|(k, x)| walk_strings(x, Some(k), f)),
        _ => {}
    }
}

/// The stages to check and why: the largest pipeline's (most stages) and won/lost (142/143) of
/// every other pipeline, taken in turn, as many as `max_requests` pays for (each stage costs
/// 4 upstream requests: a direct and a proxy read in each of 2 orders).
fn pick_stages(pipelines: &[(i64, Vec<i64>)], max_requests: u64) -> (String, Vec<Stage>) {
    let Some((largest, statuses)) = pipelines
        .iter()
        .max_by_key(|(_, s)| s.len())
        .map(|(p, s)| (*p, s.iter().map(|&s| (*p, s)).collect::<Vec<Stage>>()))
    else {
        return ("the account lists no pipelines".into(), Vec::new());
    };
    let closed: Vec<Stage> = pipelines
        .iter()
        .filter(|(p, _)| *p != largest)
        .flat_map(|(p, s)| {
            s.iter()
                .filter(|&&s| s == 142 || s == 143)
                .map(|&s| (*p, s))
        })
        .collect();
    let mut all = Vec::new();
    for i in 0..statuses.len().max(closed.len()) {
        all.extend(statuses.get(i));
        all.extend(closed.get(i));
    }
    // The pipelines, the one-stage relay check, and a reserve for retries.
    let fixed = 2 + (max_requests / 20).max(2);
    let fits = (max_requests.saturating_sub(fixed) / 4) as usize;
    let picked: Vec<Stage> = all.iter().copied().take(fits).collect();
    let why = if picked.len() < all.len() {
        format!(
            "capped by --max-requests {max_requests}: each stage costs 4 upstream requests (a \
             direct and a proxy read in each of 2 orders), {fixed} are kept for the pipelines, \
             the one-stage check and retries"
        )
    } else {
        "all of them fit --max-requests".into()
    };
    let plan = format!(
        "picked {} of {} stages: the {} stages of pipeline {largest} (the largest) and won/lost \
         (142/143) of the {} other pipelines, in turn; {why}",
        picked.len(),
        all.len(),
        statuses.len(),
        pipelines.len() - 1,
    );
    (plan, picked)
}

/// Saves direct answers, redacted, with a manifest: a fixture for `tests/e2e/fixtures.rs`.
struct Recorder {
    dir: PathBuf,
    origin: String,
    entries: Vec<Value>,
}

impl Recorder {
    fn new(dir: &Path, origin: &str) -> Result<Recorder, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("--record {}: cannot create it: {e}", dir.display()))?;
        Ok(Recorder {
            dir: dir.to_path_buf(),
            origin: origin.to_string(),
            entries: Vec::new(),
        })
    }

    fn save(&mut self, target: &str, answer: &Buffered, mut meta: Value) -> Result<(), String> {
        let name = match (meta["pipeline_id"].as_i64(), meta["status_id"].as_i64()) {
            (Some(p), Some(s)) => format!(
                "{:02}-leads-{p}-{s}-{}-{}.json",
                self.entries.len(),
                meta["order_field"].as_str().unwrap_or(""),
                meta["direction"].as_str().unwrap_or("")
            ),
            _ => format!("{:02}-pipelines.json", self.entries.len()),
        };
        let body = redact(&answer.body, &self.origin);
        let path = self.dir.join(&name);
        std::fs::write(&path, &body)
            .map_err(|e| format!("--record: cannot write {}: {e}", path.display()))?;
        let content_type = answer.headers.get(header::CONTENT_TYPE);
        meta["file"] = json!(name);
        meta["target"] = json!(target);
        meta["status"] = json!(answer.status.as_u16());
        meta["content_type"] = json!(content_type.and_then(|v| v.to_str().ok()));
        self.entries.push(meta);
        Ok(())
    }

    fn finish(&self) -> Result<(), String> {
        let manifest = json!({"upstream": RECORDED_ORIGIN, "answers": self.entries});
        let path = self.dir.join("manifest.json");
        let text = serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n";
        std::fs::write(&path, text)
            .map_err(|e| format!("--record: cannot write {}: {e}", path.display()))
    }
}

/// `body` with personal values replaced by `"redacted"`: every `name`, `phone` and `email`
/// string and every string custom field value; hrefs at `origin` moved to
/// [`RECORDED_ORIGIN`]. Every other byte stays as the account spelled it. A body that is not
/// JSON is kept as it is (it holds no lead).
pub fn redact(body: &[u8], origin: &str) -> Vec<u8> {
    let personal = |path: &[Seg]| match path {
        [.., Seg::Key(k)] if matches!(&**k, "name" | "phone" | "email") => true,
        [.., Seg::Key(c), Seg::Index(_), Seg::Key(v), Seg::Index(_), Seg::Key(x)] => {
            c == "custom_fields_values" && v == "values" && x == "value"
        }
        _ => false,
    };
    let redacted = edit_strings(body, |v| {
        if personal(v.path) {
            Edit::Replace("redacted".into())
        } else {
            Edit::Keep
        }
    });
    let redacted = redacted
        .map(|b| b.into_owned())
        .unwrap_or_else(|_| body.to_vec());
    LinkRewrite::new(origin, RECORDED_ORIGIN)
        .rewrite(&redacted, ItemQuery::Kept)
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lead(id: i64, updated_at: i64) -> Lead {
        Lead::parse(&json!({"id": id, "updated_at": updated_at, "pipeline_id": 1, "status_id": 2}))
            .unwrap()
    }

    fn read(leads: &[(i64, i64)], complete: bool) -> StageRead {
        StageRead {
            stage: (1, 2),
            leads: leads.iter().map(|&(id, u)| lead(id, u)).collect(),
            complete,
        }
    }

    #[test]
    fn expected_merges_dedups_and_stops_where_reads_stop_being_certain() {
        let by_update = ORDERS[1];
        let a = read(&[(5, 30), (9, 20), (2, 20)], false);
        let b = read(&[(7, 25), (9, 20), (3, 20), (1, 10)], true);
        let ids = |(l, c): (Vec<Lead>, bool)| (l.iter().map(|l| l.id).collect::<Vec<_>>(), c);
        // `a` holds more than it listed: nothing after its last lead (2, at 20) is certain.
        assert_eq!(
            ids(expected(&[&a, &b], by_update)),
            (vec![5, 7, 9, 3, 2], false)
        );
        assert_eq!(ids(expected(&[&b], by_update)), (vec![7, 9, 3, 1], true));
        assert_eq!(ids(expected(&[&b], ORDERS[0])), (vec![1, 3, 7, 9], true));
    }

    #[test]
    fn pages_to_walk_stop_where_the_next_lead_is_unknown() {
        assert_eq!(pages_to_walk(20, true, 7), vec![1, 2, 3, 4]);
        assert_eq!(pages_to_walk(0, true, 7), vec![1]);
        assert_eq!(pages_to_walk(21, false, 7), vec![1, 2]);
        assert_eq!(pages_to_walk(1000, true, 7).len(), MAX_WALK + 2);
    }

    #[test]
    fn stages_fit_the_budget() {
        let pipelines = vec![
            (1, vec![10, 11, 142, 143]),
            (2, vec![20, 142, 143]),
            (3, vec![30, 142, 143]),
        ];
        let (_, all) = pick_stages(&pipelines, 1000);
        assert_eq!(
            all,
            vec![
                (1, 10),
                (2, 142),
                (1, 11),
                (2, 143),
                (1, 142),
                (3, 142),
                (1, 143),
                (3, 143)
            ]
        );
        let (plan, few) = pick_stages(&pipelines, MIN_REQUESTS);
        assert_eq!(few.len(), 2, "{plan}");
        assert!(plan.contains("capped by --max-requests 12"), "{plan}");
    }

    #[test]
    fn redaction_changes_only_personal_strings() {
        let body = br#"{"name":"Ann","price":5,"_links":{"self":{"href":"https:\/\/a.kommo.com\/x"}},"custom_fields_values":[{"field_name":"Phone","values":[{"value":"+1 555","enum_code":"WORK"},{"value":true}]}]}"#;
        let out = redact(body, "https://a.kommo.com");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"name":"redacted","price":5,"_links":{"self":{"href":"https:\/\/example.kommo.com\/x"}},"custom_fields_values":[{"field_name":"Phone","values":[{"value":"redacted","enum_code":"WORK"},{"value":true}]}]}"#
        );
    }
}
