//! Micro-benchmarks of the pure stages of a fan-out leads request: `query::parse` and
//! `plan::plan` of a 30-stage query (`query/*`), `page::parse_page` of one real 250-lead
//! upstream page (`page/*`), the k-way `Merger` over K = 2, 10, 30 streams of 250 leads, cut
//! at the client's first page of 250 and drained to the end (`merge/*`), and
//! `render::render_page` of 250 leads with the href rewrite (`render/*`), `cache::canonical_target`
//! of the 30-stage query (`query/canonical_30_pairs`), and a hit of the in-process answer cache
//! (`cached_answer/*`): the key built from credential, base and raw query, the lookup, and the
//! response made from the stored page, for a rendered 250-lead page. `replica_page_*` times a
//! page of an 8-stage view (`order[updated_at]=desc`, 250 leads) from a live view's replica of
//! every lead of a 100 000-lead account: the first page, a page at offset 5000, and the first
//! page rendered as the answer (`render::render_page`).
//!
//! Three groups time a baseline beside the proxy's code, on the same input, checked to give
//! the same result: `page/parse_250_value_baseline` parses the page into a `serde_json::Value`
//! and writes each lead out again; `merge/k=K/first_page_sort_baseline` sorts every stream's
//! leads into one list and deduplicates it, as a client merging the stages itself does;
//! `render/page_250_value_baseline` builds the page as a `Value`, hrefs moved, and writes it.
//!
//! The lead bodies are real: the setup starts the simulator (`Sim`, 20 000 leads) on loopback
//! and reads `GET /api/v4/leads?filter[statuses][0][...]&limit=250&order[created_at]=asc`
//! pages from it once, before anything is timed. A few leads are listed under a second stage
//! too (`Sim::add_ghost`, as Kommo does while a lead moves), so the merge also deduplicates.
//! The replica is read the same way from a second simulator of 100 000 leads, every page of
//! `GET /api/v4/leads?limit=250&order[id]=asc`, parsed by `replica::parse_page`.
//!
//! Run all:        `cargo bench --bench micro`
//! Run one group:  `cargo bench --bench micro -- merge`
//! Smoke test:     `cargo bench --bench micro -- --test` (each bench once, no measurement)

use std::collections::HashSet;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput,
};
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kommo_fanout::cache::{canonical_target, Cache, CacheConfig, Entry, FillError, Outcome};
use kommo_fanout::leads::merge::{LeadRef, Merger, Step};
use kommo_fanout::leads::page::parse_page;
use kommo_fanout::leads::plan;
use kommo_fanout::leads::query::{
    self, Direction, LeadsQuery, Order, OrderField, QueryLimits, StagePair, MAX_LIMIT,
};
use kommo_fanout::leads::render::{render_page, PageLinks};
use kommo_fanout::leads::respond;
use kommo_fanout::links::LinkRewrite;
use kommo_fanout::sync::replica::{self, Replica};
use kommo_fanout::sync::view;
use kommo_sim::{Sim, SimConfig, DEMO_TOKEN};
use serde_json::{json, Value};

/// The most streams any merge bench uses.
const MAX_K: usize = 30;
/// The merge sizes measured.
const KS: [usize; 3] = [2, 10, 30];
/// Upstream (and client) page size.
const PAGE: usize = MAX_LIMIT as usize;
/// Where the proxy's answer points (the rewrite target).
const PUBLIC_URL: &str = "http://127.0.0.1:8080";
/// The order of every stream and of the merge.
const ORDER: Order = Order {
    field: OrderField::CreatedAt,
    direction: Direction::Asc,
};
/// The gateway's default `--max-pairs`.
const LIMITS: QueryLimits = QueryLimits { max_pairs: 100 };

/// Everything read from the simulator, once.
struct Fixture {
    /// The simulator's base URL (the origin in the leads' hrefs).
    sim_base: String,
    /// `MAX_K` full upstream pages (250 leads each), one per stream, as received.
    bodies: Vec<Bytes>,
    /// The same pages parsed, ordered by `created_at` ascending as the upstream sent them.
    streams: Vec<Vec<LeadRef>>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(load_fixture)
}

fn load_fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fixture = rt.block_on(async {
        let sim = Sim::spawn(SimConfig {
            leads: 20_000,
            ..Default::default()
        })
        .await
        .unwrap();
        let base = sim.base_url();
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let get = |pipeline_id: i64, status_id: i64, page: usize| {
            let uri = format!(
                "{base}/api/v4/leads?filter[statuses][0][pipeline_id]={pipeline_id}\
                 &filter[statuses][0][status_id]={status_id}&limit={PAGE}\
                 &order[created_at]=asc&page={page}"
            );
            let req = Request::get(uri)
                .header(header::AUTHORIZATION, format!("Bearer {DEMO_TOKEN}"))
                .body(Empty::new())
                .unwrap();
            let client = client.clone();
            async move {
                let resp = client.request(req).await.unwrap();
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                match status {
                    StatusCode::OK => {
                        let leads = parse_page(&body, ORDER.field).unwrap();
                        Some((body, leads))
                    }
                    StatusCode::NO_CONTENT => None,
                    s => panic!("simulator answered {s} to a leads page"),
                }
            }
        };

        // Page 1 of every stage; the stages with a full page are the streams.
        let stages: Vec<(i64, i64)> = sim
            .pipelines()
            .iter()
            .flat_map(|p| p.statuses.iter().map(move |s| (p.id, s.id)))
            .collect();
        let mut full = Vec::new();
        for &(p, s) in &stages {
            if let Some((_, leads)) = get(p, s, 1).await {
                if leads.len() == PAGE {
                    full.push(((p, s), leads));
                }
            }
        }
        assert!(
            full.len() >= 2,
            "the simulated account has too few full stages"
        );

        // Realistic overlap: three leads of each stage's first page are also listed under the
        // next stage (Kommo does this while a lead moves); the merge must emit them once.
        for w in full.windows(2) {
            let (from, to) = (&w[0].1, w[1].0);
            for at in [7, 90, 180] {
                assert!(sim.add_ghost(from[at].id, to.0, to.1));
            }
        }

        // The streams: page 1 of every full stage, then (when the account has fewer than
        // MAX_K full stages) the next pages of the largest stages: real, distinct leads that
        // start later in the order, as a newer stage's do.
        let mut picked: Vec<(Bytes, Vec<LeadRef>)> = Vec::new();
        let mut page = 1;
        while picked.len() < MAX_K {
            let mut any = false;
            for &((p, s), _) in &full {
                if picked.len() == MAX_K {
                    break;
                }
                if let Some((body, leads)) = get(p, s, page).await {
                    if leads.len() == PAGE {
                        picked.push((body, leads));
                        any = true;
                    }
                }
            }
            assert!(any, "not enough full pages for {MAX_K} streams");
            page += 1;
        }
        eprintln!(
            "fixture: {} stages, {} with a full first page; {MAX_K} streams use pages 1..={}",
            stages.len(),
            full.len(),
            page - 1
        );
        let (bodies, streams) = picked.into_iter().unzip();
        Fixture {
            sim_base: base,
            bodies,
            streams,
        }
    });
    drop(rt);

    for k in KS {
        let all = fixture.streams[..k].iter().flatten().count();
        let unique: HashSet<i64> = fixture.streams[..k]
            .iter()
            .flatten()
            .map(|l| l.id)
            .collect();
        eprintln!(
            "fixture: k={k}: {all} leads, {} unique ({} duplicate)",
            unique.len(),
            all - unique.len()
        );
    }
    fixture
}

/// The 30-stage client query: PHP's `http_build_query` spelling (encoded brackets) with the
/// usual extras, asking for page 3 of 250.
fn query_30_pairs() -> String {
    let mut params = vec![
        "with=contacts".to_string(),
        "filter%5Bresponsible_user_id%5D%5B%5D=1001".to_string(),
        "filter%5Bresponsible_user_id%5D%5B%5D=1003".to_string(),
    ];
    for i in 0..30i64 {
        let pipeline_id = (i % 5 + 1) * 1000;
        let status_id = if i % 6 == 5 {
            142 + (i / 6) % 2
        } else {
            pipeline_id * 10 + i / 5
        };
        params.push(format!(
            "filter%5Bstatuses%5D%5B{i}%5D%5Bpipeline_id%5D={pipeline_id}"
        ));
        params.push(format!(
            "filter%5Bstatuses%5D%5B{i}%5D%5Bstatus_id%5D={status_id}"
        ));
    }
    params.push("order%5Bcreated_at%5D=desc".to_string());
    params.push("limit=250".to_string());
    params.push("page=3".to_string());
    params.join("&")
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
}

fn bench_query(c: &mut Criterion) {
    let raw = query_30_pairs();
    let parsed = query::parse(&raw, LIMITS).unwrap();
    assert_eq!(parsed.pairs.len(), 30);
    assert!(matches!(
        plan::plan(&parsed, &raw),
        plan::Plan::FanOut(ref p) if p.streams.len() == 30
    ));

    let mut g = c.benchmark_group("query");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("parse_30_pairs", |b| {
        b.iter(|| query::parse(black_box(&raw), LIMITS))
    });
    g.throughput(Throughput::Elements(30));
    g.bench_function("plan_30_pairs", |b| {
        b.iter(|| plan::plan(black_box(&parsed), black_box(&raw)))
    });
    let target = format!("{}?{raw}", plan::LEADS_PATH);
    g.bench_function("canonical_30_pairs", |b| {
        b.iter(|| canonical_target(black_box(&target)))
    });
    g.finish();
}

/// A hit of the answer cache as a request makes it: key, lookup, response.
fn bench_cached_answer(c: &mut Criterion) {
    let f = fixture();
    let setup = RenderSetup::new(f);
    let body = Bytes::from(setup.render(&f.streams[0]));
    let cache = Cache::new(CacheConfig {
        ttl: Duration::from_secs(600),
        max_bytes: 64 << 20,
        stale_while_revalidate: Duration::ZERO,
        passthrough: false,
    })
    .expect("a cache");
    let credential = "0123456789abcdef0123456789abcdef";
    let raw = &setup.raw;
    let key = Cache::answer_key(credential, "", PUBLIC_URL, plan::LEADS_PATH, raw);
    let mut headers = http::HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(kommo_fanout::leads::HAL_JSON),
    );
    let answer = kommo_fanout::body::Buffered {
        status: StatusCode::OK,
        headers,
        body,
    };
    let entry = Entry::new(cache.generation(), answer, None);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(cache.store_answer(key, entry));
    // What a request does on a hit; the fill (a miss) never runs.
    let hit = || async {
        let key = Cache::answer_key(credential, "", PUBLIC_URL, plan::LEADS_PATH, black_box(raw));
        let not_stored = async { Err(FillError::Failed("the bench's page is not stored")) };
        let (entry, outcome) = cache.answer(key, false, not_stored).await.expect("a hit");
        respond(&entry, Some(outcome))
    };
    // Sanity: the stored page is found under the key a request builds.
    let probe = runtime.block_on(hit());
    assert_eq!(probe.headers()["x-cache"], Outcome::Hit.as_str());

    let mut g = c.benchmark_group("cached_answer");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hit_30_pairs_250_leads", |b| b.to_async(&runtime).iter(hit));
    g.finish();
}

fn bench_page(c: &mut Criterion) {
    let f = fixture();
    let body = &f.bodies[0];
    let mut g = c.benchmark_group("page");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse_250", |b| {
        b.iter(|| parse_page(black_box(body), ORDER.field).unwrap())
    });
    // Sanity: the baseline reads the same leads, in the same order, byte for byte alike once
    // both are parsed.
    let ours = parse_page(body, ORDER.field).unwrap();
    let naive = parse_page_value(body);
    assert_eq!(ours.len(), naive.len());
    for (a, (id, sort, raw)) in ours.iter().zip(&naive) {
        assert_eq!((a.id, a.sort), (*id, *sort));
        let a: Value = serde_json::from_slice(&a.raw).unwrap();
        assert_eq!(a, serde_json::from_slice::<Value>(raw).unwrap());
    }
    g.bench_function("parse_250_value_baseline", |b| {
        b.iter(|| parse_page_value(black_box(body)))
    });
    g.finish();
}

/// The baseline of `page/*`: the page parsed into a `serde_json::Value` tree and each lead
/// written out again as bytes to be kept, as a proxy without borrowed raw values would.
fn parse_page_value(body: &[u8]) -> Vec<(i64, Option<i64>, Vec<u8>)> {
    let page: Value = serde_json::from_slice(body).unwrap();
    let leads = page["_embedded"]["leads"].as_array().unwrap();
    leads
        .iter()
        .map(|lead| {
            let id = lead["id"].as_i64().unwrap();
            let sort = lead["created_at"].as_i64();
            (id, sort, serde_json::to_vec(lead).unwrap())
        })
        .collect()
}

/// Runs a merge the way the gateway does: reserves room for the page, feeds each stream's page
/// when the merger asks (one page of 250 marked not-last, then an empty last page) until `want`
/// leads are emitted or every stream has ended.
fn merge(streams: Vec<Vec<LeadRef>>, want: usize) -> Vec<LeadRef> {
    let mut merger = Merger::new(streams.len(), ORDER);
    // As the gateway does: room for the client's page (at most `PAGE`) and one lead past it.
    merger.reserve(want.min(PAGE) + 1);
    let mut pages: Vec<Option<Vec<LeadRef>>> = streams.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(want.min(pages.len() * PAGE));
    while out.len() < want {
        match merger.next_step() {
            Step::Lead(lead) => out.push(lead),
            Step::Done => break,
            Step::Need(ids) => {
                for i in ids {
                    match pages[i].take() {
                        Some(page) => merger.feed(i, page, false),
                        None => merger.feed(i, Vec::new(), true),
                    }
                }
            }
        }
    }
    out
}

fn bench_merge(c: &mut Criterion) {
    let f = fixture();
    let mut g = c.benchmark_group("merge");
    for k in KS {
        let input = &f.streams[..k];
        let unique = merge(input.to_vec(), usize::MAX);
        // Sanity: the whole merge is sorted and complete.
        assert!(unique
            .windows(2)
            .all(|w| (w[0].sort, w[0].id) <= (w[1].sort, w[1].id)));
        let ids: HashSet<i64> = input.iter().flatten().map(|l| l.id).collect();
        assert_eq!(unique.len(), ids.len());

        // Sanity: the baseline emits the same leads in the same order.
        let ids = |leads: &[LeadRef]| leads.iter().map(|l| l.id).collect::<Vec<_>>();
        assert_eq!(
            ids(&merge_by_sorting(input.to_vec(), PAGE)),
            ids(&merge(input.to_vec(), PAGE))
        );
        type Run = fn(Vec<Vec<LeadRef>>, usize) -> Vec<LeadRef>;
        let variants: [(&str, usize, Run); 3] = [
            ("first_page", PAGE, merge),
            ("all", usize::MAX, merge),
            ("first_page_sort_baseline", PAGE, merge_by_sorting),
        ];
        for (variant, want, run) in variants {
            let emitted = want.min(unique.len());
            g.throughput(Throughput::Elements(emitted as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("k={k}"), variant),
                &input,
                |b, input| {
                    b.iter_batched(
                        || input.to_vec(),
                        |streams| run(streams, want),
                        BatchSize::LargeInput,
                    )
                },
            );
        }
    }
    g.finish();
}

/// The baseline of `merge/*`: every stream's leads in one list, sorted, deduplicated by id,
/// cut at `want`: what a client merging the stages itself does.
fn merge_by_sorting(streams: Vec<Vec<LeadRef>>, want: usize) -> Vec<LeadRef> {
    let mut all: Vec<LeadRef> = streams.into_iter().flatten().collect();
    all.sort_by_key(|l| (l.sort, l.id));
    let mut seen = HashSet::with_capacity(all.len());
    all.into_iter()
        .filter(|l| seen.insert(l.id))
        .take(want)
        .collect()
}

/// What rendering the 30-stage query's page needs: the query, its links' base, the rewrite.
struct RenderSetup {
    raw: String,
    parsed: LeadsQuery,
    base: String,
    rewrite: LinkRewrite,
}

impl RenderSetup {
    fn new(f: &Fixture) -> RenderSetup {
        let raw = query_30_pairs();
        let parsed = query::parse(&raw, LIMITS).unwrap();
        RenderSetup {
            raw,
            parsed,
            base: format!("{PUBLIC_URL}{}", plan::LEADS_PATH),
            rewrite: LinkRewrite::new(&f.sim_base, PUBLIC_URL),
        }
    }

    /// The client's page of `leads`, with a `next` link.
    fn render(&self, leads: &[LeadRef]) -> Vec<u8> {
        let links = PageLinks {
            base: &self.base,
            params: &self.parsed.link_params,
        };
        render_page(
            self.parsed.page,
            links,
            true,
            leads,
            &self.rewrite,
            &self.raw,
        )
    }

    /// The baseline of `render/*`: each lead parsed into a `serde_json::Value`, its hrefs
    /// moved from `upstream` to the public URL with the client's query, and the page built as a
    /// `Value` and written out.
    fn render_value(&self, leads: &[LeadRef], upstream: &str) -> Vec<u8> {
        fn rehome(v: &mut Value, from: &str, query: &str) {
            match v {
                Value::Object(map) => {
                    for (k, v) in map.iter_mut() {
                        match v {
                            Value::String(href) if k == "href" && href.starts_with(from) => {
                                let path = href[from.len()..].split('?').next().unwrap_or("");
                                *href = format!("{PUBLIC_URL}{path}?{query}");
                            }
                            _ => rehome(v, from, query),
                        }
                    }
                }
                Value::Array(items) => items.iter_mut().for_each(|v| rehome(v, from, query)),
                _ => {}
            }
        }
        let links = PageLinks {
            base: &self.base,
            params: &self.parsed.link_params,
        };
        let page = self.parsed.page;
        let leads: Vec<Value> = leads
            .iter()
            .map(|l| {
                let mut lead: Value = serde_json::from_slice(&l.raw).unwrap();
                rehome(&mut lead, upstream, &self.raw);
                lead
            })
            .collect();
        let mut link_map = serde_json::Map::new();
        link_map.insert("self".into(), json!({ "href": links.href(page) }));
        link_map.insert("next".into(), json!({ "href": links.href(page + 1) }));
        link_map.insert("first".into(), json!({ "href": links.href(1) }));
        if page > 1 {
            link_map.insert("prev".into(), json!({ "href": links.href(page - 1) }));
        }
        let doc = json!({
            "_page": page,
            "_links": link_map,
            "_embedded": { "leads": leads },
        });
        serde_json::to_vec(&doc).unwrap()
    }
}

fn bench_render(c: &mut Criterion) {
    let f = fixture();
    let leads = &f.streams[0];
    let setup = RenderSetup::new(f);
    // Sanity: the hrefs really are rewritten.
    let sample = setup.render(leads);
    let needle = format!("\"href\":\"{PUBLIC_URL}/api/v4/leads/");
    let upstream = format!("\"href\":\"{}/", f.sim_base);
    let text = String::from_utf8_lossy(&sample);
    assert!(text.contains(&needle));
    assert!(!text.contains(&upstream));

    // Sanity: the baseline renders the same document.
    let naive = setup.render_value(leads, &f.sim_base);
    assert_eq!(
        serde_json::from_slice::<Value>(&sample).unwrap(),
        serde_json::from_slice::<Value>(&naive).unwrap()
    );

    let mut g = c.benchmark_group("render");
    g.throughput(Throughput::Bytes(sample.len() as u64));
    g.bench_function("page_250", |b| b.iter(|| setup.render(black_box(leads))));
    g.bench_function("page_250_value_baseline", |b| {
        b.iter(|| setup.render_value(black_box(leads), &f.sim_base))
    });
    g.finish();
}

/// The replica of `replica_page_*`: every live lead of a 100 000-lead simulated account, read
/// from it once, and where its leads' hrefs point.
struct ReplicaFixture {
    sim_base: String,
    replica: Replica,
}

/// Leads in the replica of `replica_page_*`.
const REPLICA_LEADS: usize = 100_000;
/// Stages in the view of `replica_page_*`.
const VIEW_STAGES: usize = 8;
/// The deep page's offset in `replica_page_*`.
const DEEP_OFFSET: u64 = 5000;

fn replica_fixture() -> &'static ReplicaFixture {
    static FIXTURE: OnceLock<ReplicaFixture> = OnceLock::new();
    FIXTURE.get_or_init(load_replica_fixture)
}

/// Reads every live lead of a fresh simulated account page by page (nothing changes it
/// meanwhile) and upserts them into a replica, as the live view's load does.
fn load_replica_fixture() -> ReplicaFixture {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let fixture = rt.block_on(async {
        let sim = Sim::spawn(SimConfig {
            leads: REPLICA_LEADS,
            ..Default::default()
        })
        .await
        .unwrap();
        let base = sim.base_url();
        let client: Client<HttpConnector, Empty<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut replica = Replica::new();
        for page in 1.. {
            let uri = format!("{base}/api/v4/leads?limit={PAGE}&order[id]=asc&page={page}");
            let req = Request::get(uri)
                .header(header::AUTHORIZATION, format!("Bearer {DEMO_TOKEN}"))
                .body(Empty::new())
                .unwrap();
            let resp = client.request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            match status {
                StatusCode::OK => {
                    for lead in replica::parse_page(&body).unwrap() {
                        assert!(replica.upsert(lead));
                    }
                }
                StatusCode::NO_CONTENT => break,
                s => panic!("simulator answered {s} to a leads page"),
            }
        }
        let live = sim.leads().iter().filter(|l| !l.is_deleted).count();
        assert_eq!(replica.len(), live, "the replica holds every live lead");
        ReplicaFixture {
            sim_base: base,
            replica,
        }
    });
    drop(rt);
    let r = &fixture.replica;
    let raw = r.ids().filter_map(|id| r.get(id)).map(|l| l.raw.len());
    eprintln!(
        "replica fixture: {} leads over {} stages, {} bytes of lead JSON, {} bytes counted",
        r.len(),
        r.stage_ids().count(),
        raw.sum::<usize>(),
        r.bytes()
    );
    fixture
}

/// A page of an 8-stage view (`order[updated_at]=desc`, `limit=250`) from the replica of a
/// 100 000-lead account: the first page, a deep one, and the first rendered as the answer is.
fn bench_replica_page(c: &mut Criterion) {
    let f = replica_fixture();
    let replica = &f.replica;
    // The largest stages: the view spans the most leads, and the deep page exists.
    let mut stages: Vec<(StagePair, usize)> = replica
        .stage_ids()
        .map(|(stage, ids)| (stage, ids.len()))
        .collect();
    stages.sort_by_key(|&(stage, n)| (std::cmp::Reverse(n), stage));
    let stages: Vec<StagePair> = stages.iter().take(VIEW_STAGES).map(|&(s, _)| s).collect();
    assert_eq!(stages.len(), VIEW_STAGES);
    let raw: String = stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "filter%5Bstatuses%5D%5B{i}%5D%5Bpipeline_id%5D={}&\
                 filter%5Bstatuses%5D%5B{i}%5D%5Bstatus_id%5D={}&",
                s.pipeline_id, s.status_id
            )
        })
        .chain(["order%5Bupdated_at%5D=desc&limit=250".to_string()])
        .collect();
    let parsed = query::parse(&raw, LIMITS).unwrap();
    let held = view::held(&[]).unwrap();
    let view = view::view(&parsed, &held).unwrap();

    // Sanity: both pages are the view's leads in its order, ties by id, as a sort of all of
    // them gives.
    let mut truth: Vec<(i64, i64)> = replica
        .ids()
        .filter_map(|id| replica.get(id))
        .filter(|l| stages.contains(&l.stage))
        .map(|l| (l.updated_at, l.id))
        .collect();
    truth.sort_unstable_by(|a, b| b.cmp(a));
    assert!(truth.len() as u64 > DEEP_OFFSET + PAGE as u64);
    for offset in [0, DEEP_OFFSET] {
        let (leads, has_next) = replica.page(&view, offset, PAGE);
        assert!(has_next);
        let at = offset as usize;
        let want: Vec<i64> = truth[at..at + PAGE].iter().map(|&(_, id)| id).collect();
        assert_eq!(leads.iter().map(|l| l.id).collect::<Vec<_>>(), want);
    }

    let base = format!("{PUBLIC_URL}{}", plan::LEADS_PATH);
    let rewrite = LinkRewrite::new(&f.sim_base, PUBLIC_URL);
    let rendered = || {
        let (leads, has_next) = replica.page(black_box(&view), 0, PAGE);
        let links = PageLinks {
            base: &base,
            params: &parsed.link_params,
        };
        render_page(parsed.page, links, has_next, &leads, &rewrite, &raw)
    };
    let sample = rendered();
    let text = String::from_utf8_lossy(&sample);
    assert!(text.contains(&format!("\"href\":\"{PUBLIC_URL}/api/v4/leads/")));
    assert!(!text.contains(&f.sim_base));

    let mut g = c.benchmark_group("replica_page_250_of_8_stages_100k");
    g.throughput(Throughput::Elements(PAGE as u64));
    g.bench_function("page_1", |b| {
        b.iter(|| replica.page(black_box(&view), 0, PAGE))
    });
    g.bench_function("offset_5000", |b| {
        b.iter(|| replica.page(black_box(&view), DEEP_OFFSET, PAGE))
    });
    g.bench_function("page_1_rendered", |b| b.iter(&rendered));
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_query, bench_page, bench_merge, bench_render, bench_cached_answer,
        bench_replica_page
}
criterion_main!(benches);
