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

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
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
use crate::error::PROBLEM_JSON;
use crate::gateway::Gateway;
use crate::json_text::{edit_strings, Edit, Seg};
use crate::leads::query::{Direction, Order, OrderField};
use crate::leads::HAL_JSON;
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
/// The two orders checked: the default (`id` ascending), and the one integrations sync by.
const ORDERS: [Order; 2] = [
    Order::DEFAULT,
    Order {
        field: OrderField::UpdatedAt,
        direction: Direction::Desc,
    },
];

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
        if token.is_empty() || token.contains(|c: char| c.is_whitespace() || c.is_control()) {
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

/// A check named `name`: passed with `ok_detail` when nothing differs, else failed on the
/// first difference.
fn check(name: String, diffs: Vec<String>, ok_detail: String) -> Check {
    let detail = match diffs.as_slice() {
        [] => ok_detail,
        [only] => only.clone(),
        [first, rest @ ..] => format!("{first} (and {} more differences)", rest.len()),
    };
    let ok = diffs.is_empty();
    Check { ok, name, detail }
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
        out.extend(self.notes.iter().map(|n| format!("note: {n}\n")));
        out.extend(self.error.iter().map(|e| format!("error: {e}\n")));
        let verdict = match self.exit_code() {
            0 => "PASS",
            1 => "MISMATCH",
            _ => "INCOMPLETE",
        };
        let (checks, failed) = (self.checks.len(), self.failed());
        let (spent, max) = (self.requests_spent, self.max_requests);
        out + &format!(
            "summary: {verdict}: {checks} checks, {} ok, {failed} failed; {spent} of {max} \
             upstream requests spent\n",
            checks - failed
        )
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
    report.error = Verifier::run(opts, &mut report).await.err();
    report
}

/// `order[field]=dir`, as the report names an order.
fn order_name(order: Order) -> String {
    let (field, dir) = (order.field.as_str(), order.direction.as_str());
    format!("order[{field}]={dir}")
}

/// Leads in `order`, computed here rather than by the proxy's merge: the field (a missing or
/// null value first ascending), then the id, both in the order's direction.
fn cmp(order: Order, a: &Lead, b: &Lead) -> Ordering {
    let key = |l: &Lead| (l.fields[order.field.as_str()].as_i64(), l.id);
    let ascending = key(a).cmp(&key(b));
    match order.direction {
        Direction::Asc => ascending,
        Direction::Desc => ascending.reverse(),
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
        let id_or_0 = |k: &str| v[k].as_i64().unwrap_or(0);
        let mut fields = v.clone();
        strip_links(&mut fields);
        Ok(Lead {
            id: v["id"].as_i64().ok_or("a lead without an integer id")?,
            stage: (id_or_0("pipeline_id"), id_or_0("status_id")),
            fields,
            self_href: v["_links"]["self"]["href"].as_str().map(str::to_string),
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

/// The leads of a leads page.
fn parse_leads(doc: &Value) -> Result<Vec<Lead>, String> {
    let leads = doc["_embedded"]["leads"].as_array();
    let leads = leads.ok_or("no `_embedded.leads` list")?;
    leads.iter().map(Lead::parse).collect()
}

fn stage_name((p, s): Stage) -> String {
    format!("{p}/{s}")
}

/// The raw parameters that select `stage` as the `i`th of a request's stages.
fn stage_params(i: usize, (p, s): Stage) -> String {
    let key = |member| format!("filter%5Bstatuses%5D%5B{i}%5D%5B{member}%5D");
    format!("{}={p}&{}={s}", key("pipeline_id"), key("status_id"))
}

/// One stage read directly: its leads, and whether they are the whole stage.
struct StageRead {
    stage: Stage,
    leads: Vec<Lead>,
    complete: bool,
}

/// The merge the proxy should answer, computed from direct reads: every lead sorted in `order`,
/// each once at its first position, cut where the reads stop being certain (past the last lead
/// of a stage that holds more than one page). `true` when that is the whole union.
fn expected(reads: &[&StageRead], order: Order) -> (Vec<Lead>, bool) {
    let mut all: Vec<Lead> = reads.iter().flat_map(|r| r.leads.clone()).collect();
    all.sort_by(|a, b| cmp(order, a, b));
    let mut seen = HashSet::new();
    all.retain(|l| seen.insert(l.id));
    let partial = reads.iter().filter(|r| !r.complete);
    let bound = partial
        .filter_map(|r| r.leads.last())
        .min_by(|a, b| cmp(order, a, b));
    if let Some(bound) = bound {
        all.retain(|l| cmp(order, l, bound).is_le());
    }
    (all, bound.is_none())
}

/// A view: stages, an order (`None` leaves it to the default, `id` ascending), a page size.
struct View {
    stages: Vec<Stage>,
    order: Option<Order>,
    limit: usize,
}

impl View {
    fn new(stages: Vec<Stage>, order: Option<Order>, limit: usize) -> View {
        View {
            stages,
            order,
            limit,
        }
    }

    fn query(&self, page: usize) -> String {
        let stages = self.stages.iter().enumerate();
        let mut q: Vec<String> = stages.map(|(i, &s)| stage_params(i, s)).collect();
        q.extend(self.order.map(Order::to_param));
        q.push(format!("limit={}&page={page}", self.limit));
        q.join("&")
    }

    fn name(&self) -> String {
        let order = self.order.map_or("order (default)".into(), order_name);
        let stages: Vec<String> = self.stages.iter().map(|&s| stage_name(s)).collect();
        let stages = stages.join(",");
        format!("view {order} limit={} stages {stages}", self.limit)
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

/// A difference when the answer's content type is not exactly `want`.
fn content_type_diff(answer: &Buffered, want: &str) -> Option<String> {
    let got = answer.headers.get(header::CONTENT_TYPE);
    let got = got.and_then(|v| v.to_str().ok()).unwrap_or("");
    (got != want).then(|| format!("content type {got:?}, expected exactly {want:?}"))
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
        let bound = async { Ok::<_, std::io::Error>((bind().await?, bind().await?)) };
        let (listener, admin) = bound
            .await
            .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = gw.clone();
        tokio::spawn(async move {
            let shutdown = stopped.map(drop);
            if let Err(e) = crate::serve(&config, served, listener, admin, shutdown).await {
                tracing::error!(error = %e, "the in-process proxy stopped");
            }
        });
        let mut token = HeaderValue::from_str(&format!("Bearer {}", opts.token))
            .map_err(|_| "the token is not a valid header value".to_string())?;
        token.set_sensitive(true);
        let record = opts.record.as_deref();
        Ok(Verifier {
            recorder: record.map(|dir| Recorder::new(dir, &origin)).transpose()?,
            origin,
            gw,
            proxy: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
            auth: HeaderMap::from_iter([(header::AUTHORIZATION, token)]),
            max_requests: opts.max_requests,
            _stop: stop,
        })
    }

    /// Starts, runs every check and saves the recording; an `Err` is why the run stopped.
    async fn run(opts: &Options, report: &mut Report) -> Result<(), String> {
        let mut v = Verifier::start(opts).await?;
        let outcome = v.all(report).await;
        report.requests_spent = v.gw.fetcher.requests_sent();
        let recorded = v.recorder.as_ref().map_or(Ok(()), Recorder::finish);
        match outcome {
            Err(e) if report.requests_spent >= opts.max_requests => Err(format!(
                "budget exhausted: the run needed more than --max-requests {} upstream requests ({e})",
                opts.max_requests
            )),
            outcome => outcome.and(recorded),
        }
    }

    /// Every check, in order; an `Err` stops the run.
    async fn all(&mut self, report: &mut Report) -> Result<(), String> {
        let stages = self.plan(report).await?;
        report.stages = stages.iter().map(|&s| stage_name(s)).collect();
        let mut first_reads = Vec::new();
        for (i, order) in ORDERS.into_iter().enumerate() {
            let reads = self.direct_reads(&stages, order).await?;
            let checks = &mut report.checks;
            checks.push(direct_check(&reads, order, &first_reads));
            let all: Vec<&StageRead> = reads.iter().collect();
            let (expect, complete) = expected(&all, order);
            // The second view of the first order leaves the order to the proxy's default.
            for (limit, explicit) in [(7, true), (50, i > 0)] {
                let view = View::new(stages.clone(), explicit.then_some(order), limit);
                checks.push(self.walk(&view, &expect, complete).await?);
            }
            // The end of the list, on the stages read whole: their pages are cached already.
            let whole: Vec<&StageRead> = reads.iter().filter(|r| r.complete).collect();
            if !complete && whole.len() < 2 {
                report.notes.push(format!(
                    "{}: the end of the list was not walked: fewer than 2 stages hold under \
                     {FULL_PAGE} leads, and reading on would cost more upstream requests",
                    order_name(order)
                ));
            } else if !complete {
                let view = View::new(whole.iter().map(|r| r.stage).collect(), Some(order), 50);
                let (expect, _) = expected(&whole, order);
                checks.push(self.walk(&view, &expect, true).await?);
            }
            if i == 0 {
                first_reads = reads;
            }
        }
        if let Some(read) = first_reads.first() {
            report.checks.push(self.relay_check(read).await?);
        }
        report.checks.push(self.error_check(&stages).await?);
        Ok(())
    }

    /// Reads the pipelines and picks the stages.
    async fn plan(&mut self, report: &mut Report) -> Result<Vec<Stage>, String> {
        let target = "/api/v4/leads/pipelines";
        let answer = self.direct(target).await?;
        if let Some(r) = &mut self.recorder {
            let meta = json!({"kind": "pipelines", "target": target});
            r.save("pipelines", &answer, meta)?;
        }
        if answer.status != StatusCode::OK {
            return Err(format!(
                "GET {target} answered {}; cannot plan",
                answer.status
            ));
        }
        let v: Value = serde_json::from_slice(&answer.body)
            .map_err(|e| format!("GET {target}: the answer is not JSON: {e}"))?;
        let pipelines = v["_embedded"]["pipelines"].as_array();
        let pipelines = pipelines.ok_or(format!("GET {target}: no `_embedded.pipelines` list"))?;
        let listed: Vec<(i64, Vec<i64>)> = pipelines
            .iter()
            .filter_map(|p| {
                let statuses = p["_embedded"]["statuses"].as_array()?;
                let ids = statuses.iter().filter_map(|s| s["id"].as_i64());
                Some((p["id"].as_i64()?, ids.collect()))
            })
            .collect();
        let (plan, stages) = pick_stages(&listed, self.max_requests);
        report.plan = plan;
        let count: usize = listed.iter().map(|(_, s)| s.len()).sum();
        let detail = format!("{} pipelines, {count} stages", listed.len());
        report
            .checks
            .push(check("pipelines".into(), Vec::new(), detail));
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
        let (fetcher, kind) = (&self.gw.fetcher, UpstreamKind::Single);
        let got = fetcher.get(kind, &flow, target, &self.auth, Verdict::Done);
        let path = target.split('?').next().unwrap_or("");
        let origin = &self.origin;
        let answer = match got.await {
            Ok(b) | Err(FetchError::Status(b)) => b,
            Err(e @ FetchError::Transport(_)) => return Err(format!("cannot reach {origin}: {e}")),
            Err(e) => return Err(format!("GET {path}: {e}")),
        };
        match answer.status.as_u16() {
            401 => Err(format!(
                "{origin} refused the token (401 Unauthorized): check --token-file"
            )),
            403 => Err(format!(
                "{origin} answered 403 Forbidden: the token's user may not read this, or the address is blocked"
            )),
            200 | 204 => Ok(answer),
            s => Err(format!("GET {path} answered {s}")),
        }
    }

    /// The first page (limit 250) of each stage in `order`, read at once (the limiter paces
    /// them).
    async fn direct_reads(
        &mut self,
        stages: &[Stage],
        order: Order,
    ) -> Result<Vec<StageRead>, String> {
        let param = order.to_param();
        let target = |s| {
            format!(
                "/api/v4/leads?{}&{param}&limit={FULL_PAGE}",
                stage_params(0, s)
            )
        };
        let targets: Vec<String> = stages.iter().map(|&s| target(s)).collect();
        let answers = futures::future::join_all(targets.iter().map(|t| self.direct(t))).await;
        let mut reads = Vec::new();
        for ((&stage, target), answer) in stages.iter().zip(&targets).zip(answers) {
            let answer = answer?;
            if let Some(r) = &mut self.recorder {
                let (field, dir) = (order.field.as_str(), order.direction.as_str());
                let file = format!("leads-{}-{}-{field}-{dir}", stage.0, stage.1);
                let meta = json!({"kind": "leads", "target": target, "pipeline_id": stage.0,
                                  "status_id": stage.1, "order_field": field, "direction": dir,
                                  "page": 1});
                r.save(&file, &answer, meta)?;
            }
            let leads = match answer.status {
                StatusCode::OK => serde_json::from_slice(&answer.body)
                    .map_err(|e| format!("not JSON: {e}"))
                    .and_then(|doc| parse_leads(&doc))
                    .map_err(|e| format!("the direct read of {}: {e}", stage_name(stage)))?,
                _ => Vec::new(),
            };
            let complete = leads.len() < FULL_PAGE;
            reads.push(StageRead {
                stage,
                leads,
                complete,
            });
        }
        Ok(reads)
    }

    async fn get_proxy(&self, query: &str) -> Result<Buffered, String> {
        let url = format!("{}/api/v4/leads?{query}", self.proxy);
        let mut req = Request::get(&url)
            .body(Full::default())
            .map_err(|e| format!("GET {url}: {e}"))?;
        *req.headers_mut() = self.auth.clone();
        let sent = async {
            let (parts, body) = self.client.request(req).await?.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error>>(Buffered {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        let answer = tokio::time::timeout(Duration::from_secs(120), sent)
            .await
            .map_err(|_| "the in-process proxy did not answer within 120s".to_string())?
            .map_err(|e| format!("the in-process proxy: {e}"))?;
        // The proxy could not reach the account for lack of budget: the run's failure, not
        // the proxy's.
        if answer.status.is_server_error() && self.gw.fetcher.requests_sent() >= self.max_requests {
            return Err(format!("the proxy answered {}", answer.status));
        }
        Ok(answer)
    }

    /// Walks the pages of `view` and compares each with `expect` (the whole union when
    /// `complete`, else a certain prefix of it).
    async fn walk(&self, view: &View, expect: &[Lead], complete: bool) -> Result<Check, String> {
        let pages = pages_to_walk(expect.len(), complete, view.limit);
        let mut seen = HashSet::new();
        let mut failures = Vec::new();
        for &page in &pages {
            let slice = expect.chunks(view.limit).nth(page - 1).unwrap_or_default();
            let more = Some(page * view.limit < expect.len());
            let diffs = self.page_diffs(view, page, slice, more, &mut seen).await?;
            failures.extend(diffs.first().map(|d| format!("page {page}: {d}")));
        }
        let (n, differ, walked) = (expect.len(), failures.len(), pages.len());
        let detail = match (failures.first(), complete, pages.split_last()) {
            (Some(first), ..) => format!("{first} ({differ} of {walked} pages differ)"),
            (None, true, Some((end, rest))) if !rest.is_empty() => {
                format!("pages {} (all {n} leads), page {end}: 204", ranges(rest))
            }
            (None, true, _) => "page 1: 204 (no leads)".into(),
            (None, false, _) => format!("pages {} (of {n} leads certain)", ranges(&pages)),
        };
        let (ok, name) = (failures.is_empty(), view.name());
        Ok(Check { ok, name, detail })
    }

    /// Reads one page of `view` from the proxy and says what is wrong with it, first difference
    /// first. `more`: whether a `next` link must be present (`None`: the upstream's links,
    /// relayed, are not checked).
    async fn page_diffs(
        &self,
        view: &View,
        page: usize,
        expect: &[Lead],
        more: Option<bool>,
        seen: &mut HashSet<i64>,
    ) -> Result<Vec<String>, String> {
        let query = view.query(page);
        let answer = self.get_proxy(&query).await?;
        let (status, body) = (answer.status, &answer.body);
        if expect.is_empty() {
            return Ok(match (status, body.is_empty()) {
                (StatusCode::NO_CONTENT, true) => Vec::new(),
                _ => vec![format!(
                    "expected 204 with no body past the end, got {status} with {} bytes",
                    body.len()
                )],
            });
        }
        if status != StatusCode::OK {
            let body: String = String::from_utf8_lossy(body).chars().take(200).collect();
            let n = expect.len();
            return Ok(vec![format!(
                "expected 200 with {n} leads, got {status}: {body}"
            )]);
        }
        let doc: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return Ok(vec![format!("the answer is not JSON: {e}")]),
        };
        let mut diffs: Vec<String> = content_type_diff(&answer, HAL_JSON).into_iter().collect();
        self.link_diffs(&doc, None, &mut diffs);
        if let Some(more) = more {
            let other = |p: usize| format!("{}/api/v4/leads?{}", self.proxy, view.query(p));
            let want = [
                ("self", Some(other(page))),
                ("first", Some(other(1))),
                ("prev", (page > 1).then(|| other(page - 1))),
                ("next", more.then(|| other(page + 1))),
            ];
            for (rel, want) in want {
                let got = doc["_links"][rel]["href"].as_str();
                if got != want.as_deref() {
                    diffs.push(format!("`{rel}` link {got:?}, expected {want:?}"));
                }
            }
            if doc["_page"].as_u64() != Some(page as u64) {
                diffs.push(format!("`_page` {:?}, expected {page}", doc.get("_page")));
            }
        }
        let got = match parse_leads(&doc) {
            Ok(got) => got,
            Err(e) => {
                diffs.push(e);
                return Ok(diffs);
            }
        };
        for lead in &got {
            let (id, stage) = (lead.id, stage_name(lead.stage));
            if !view.stages.contains(&lead.stage) {
                diffs.push(format!(
                    "lead {id} listed under {stage}, not a requested stage"
                ));
            }
            if !seen.insert(id) {
                diffs.push(format!("lead {id} listed twice"));
            }
            let want = format!("{}/api/v4/leads/{id}?{query}", self.proxy);
            if lead.self_href.as_deref() != Some(want.as_str()) {
                let got = &lead.self_href;
                diffs.push(format!("lead {id} self link {got:?}, expected {want:?}"));
            }
        }
        for (i, (want, got)) in expect.iter().zip(&got).enumerate() {
            if want.id != got.id {
                let (id, at) = (want.id, i + 1);
                diffs.push(format!(
                    "lead {id} expected at position {at}, got {}",
                    got.id
                ));
            } else if want.fields != got.fields {
                let what = first_difference(&want.fields, &got.fields);
                diffs.push(format!(
                    "lead {} differs from the upstream's: {what}",
                    want.id
                ));
            }
        }
        if got.len() != expect.len() {
            diffs.push(format!("{} leads, expected {}", got.len(), expect.len()));
        }
        Ok(diffs)
    }

    /// Hrefs in `v` not at the proxy, and any string at the upstream's origin. `key` names the
    /// member holding `v`.
    fn link_diffs(&self, v: &Value, key: Option<&str>, diffs: &mut Vec<String>) {
        match v {
            Value::String(s) => {
                let origin = &self.origin;
                let at_origin = s
                    .get(..origin.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(origin));
                if at_origin {
                    diffs.push(format!("{s:?} is at the upstream's origin"));
                } else if key == Some("href") && !s.starts_with(&format!("{}/", self.proxy)) {
                    diffs.push(format!("href {s:?} is not at the proxy"));
                }
            }
            Value::Array(a) => a.iter().for_each(|x| self.link_diffs(x, None, diffs)),
            Value::Object(m) => m
                .iter()
                .for_each(|(k, x)| self.link_diffs(x, Some(k), diffs)),
            _ => {}
        }
    }

    /// A one-stage view is relayed: its leads are the direct read's first ones, its links moved.
    async fn relay_check(&self, read: &StageRead) -> Result<Check, String> {
        let view = View::new(vec![read.stage], Some(ORDERS[0]), 7);
        let expect = &read.leads[..read.leads.len().min(view.limit)];
        let seen = &mut HashSet::new();
        let diffs = self.page_diffs(&view, 1, expect, None, seen).await?;
        let name = format!("one-stage {} page 1 (relayed)", view.name());
        let ok = format!("{} leads, links at the proxy", expect.len());
        Ok(check(name, diffs, ok))
    }

    /// An invalid request is the proxy's own `400` in `application/problem+json`.
    async fn error_check(&self, stages: &[Stage]) -> Result<Check, String> {
        let view = View::new(stages.to_vec(), Some(ORDERS[0]), 0);
        let answer = self.get_proxy(&view.query(1)).await?;
        let mut diffs = Vec::new();
        if answer.status != StatusCode::BAD_REQUEST {
            diffs.push(format!("status {}, expected 400", answer.status));
        }
        diffs.extend(content_type_diff(&answer, PROBLEM_JSON));
        match serde_json::from_slice::<Value>(&answer.body) {
            Ok(v) if v["status"].as_u64() == Some(400) => {}
            _ => diffs.push("the body is not a problem document with status 400".into()),
        }
        let ok = "400 application/problem+json".into();
        Ok(check("error answer (limit=0)".into(), diffs, ok))
    }
}

/// The direct reads themselves: each lead under its own stage, each page in the order asked
/// for (ties by id in the same direction, as the proxy assumes), no lead twice, and a stage
/// read whole in two orders (`reads` and `before`) the same leads both times.
fn direct_check(reads: &[StageRead], order: Order, before: &[StageRead]) -> Check {
    let name = order_name(order);
    let mut diffs = Vec::new();
    for r in reads {
        let mut ids = HashSet::new();
        let stage = stage_name(r.stage);
        for (i, lead) in r.leads.iter().enumerate() {
            let id = lead.id;
            if lead.stage != r.stage {
                let own = stage_name(lead.stage);
                diffs.push(format!(
                    "the upstream listed lead {id} under {stage}, but its stage is {own}"
                ));
            }
            if !ids.insert(id) {
                diffs.push(format!("the upstream listed lead {id} twice"));
            }
            let prev = i.checked_sub(1).map(|j| &r.leads[j]);
            if let Some(prev) = prev.filter(|prev| cmp(order, prev, lead).is_gt()) {
                diffs.push(format!(
                    "the upstream's page of {stage} is not in {name} (ties by id): lead {} before {id}",
                    prev.id
                ));
            }
        }
    }
    let read_whole_twice = reads
        .iter()
        .zip(before)
        .filter(|(r, b)| r.complete && b.complete);
    for (r, b) in read_whole_twice {
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
    let (stages, leads) = (
        reads.len(),
        reads.iter().map(|r| r.leads.len()).sum::<usize>(),
    );
    let whole = reads.iter().filter(|r| r.complete).count();
    let detail =
        format!("{stages} stages ({whole} read whole), {leads} leads, each under its own stage");
    check(format!("direct reads {name}"), diffs, detail)
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

/// Where two decoded leads (objects) first differ, by member.
fn first_difference(want: &Value, got: &Value) -> String {
    let members = [want, got].into_iter().filter_map(Value::as_object);
    let mut keys = members.flat_map(|m| m.keys());
    match keys.find(|&k| want.get(k) != got.get(k)) {
        Some(k) => format!("`{k}` is {:?}, upstream {:?}", got.get(k), want.get(k)),
        None => "no difference".into(),
    }
}

/// The stages to check and why: the largest pipeline's (most stages) and won/lost (142/143) of
/// every other pipeline, taken in turn, as many as `max_requests` pays for (each stage costs
/// 4 upstream requests: a direct and a proxy read in each of 2 orders).
fn pick_stages(pipelines: &[(i64, Vec<i64>)], max_requests: u64) -> (String, Vec<Stage>) {
    let Some((largest, statuses)) = pipelines.iter().max_by_key(|(_, s)| s.len()) else {
        return ("the account lists no pipelines".into(), Vec::new());
    };
    let stages = pipelines
        .iter()
        .flat_map(|(p, s)| s.iter().map(move |&s| (*p, s)));
    let won_lost = |&(p, s): &Stage| p != *largest && (s == 142 || s == 143);
    let closed: Vec<Stage> = stages.filter(won_lost).collect();
    let mut all = Vec::new();
    for i in 0..statuses.len().max(closed.len()) {
        all.extend(statuses.get(i).map(|&s| (*largest, s)));
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
        let (dir, origin) = (dir.to_path_buf(), origin.to_string());
        Ok(Recorder {
            dir,
            origin,
            entries: Vec::new(),
        })
    }

    /// Saves `answer` as the next file, named after `what`, and its entry in the manifest:
    /// `meta` (the request target, what was read) with the file and the answer's status and
    /// content type.
    fn save(&mut self, what: &str, answer: &Buffered, mut meta: Value) -> Result<(), String> {
        let name = format!("{:02}-{what}.json", self.entries.len());
        self.write(&name, &redact(&answer.body, &self.origin))?;
        let content_type = answer.headers.get(header::CONTENT_TYPE);
        meta["file"] = json!(name);
        meta["status"] = json!(answer.status.as_u16());
        meta["content_type"] = json!(content_type.and_then(|v| v.to_str().ok()));
        self.entries.push(meta);
        Ok(())
    }

    fn finish(&self) -> Result<(), String> {
        let manifest = json!({"upstream": RECORDED_ORIGIN, "answers": self.entries});
        let text = serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n";
        self.write("manifest.json", text.as_bytes())
    }

    fn write(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        let path = self.dir.join(name);
        std::fs::write(&path, bytes)
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
    let redacted = edit_strings(body, |v| match personal(v.path) {
        true => Edit::Replace("redacted".into()),
        false => Edit::Keep,
    });
    let redacted = redacted.unwrap_or(Cow::Borrowed(body));
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
