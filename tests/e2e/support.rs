//! Starting the simulator and the proxy on loopback, a small client, and ground truth computed
//! from the simulator's own data (never from the proxy's code).

use std::collections::HashSet;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use kommo_fanout::config::ServeConfig;
use kommo_sim::{Sim, SimConfig, SimHandle, SimLead, TokenSpec};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const TOKEN: &str = "demo-token";

/// The simulator and the proxy in front of it.
pub struct Stack {
    pub sim: SimHandle,
    pub proxy: String,
    /// The admin listener's base URL.
    pub admin: String,
    /// The proxy's state, for assertions on the cache.
    pub gateway: std::sync::Arc<kommo_fanout::gateway::Gateway>,
    client: Client,
    _stop: oneshot::Sender<()>,
}

/// A simulated account of `leads` leads with the demo token and a token limited to users 1001
/// and 1002 (`"limited"`), writing its JSON in the style `KOMMO_FANOUT_TEST_JSON_STYLE` names
/// (compact by default): `scripts/test.sh` runs the fan-out, relay and pass-through tests
/// again under each other style.
pub fn sim_config(leads: usize) -> SimConfig {
    let json_style = std::env::var("KOMMO_FANOUT_TEST_JSON_STYLE")
        .ok()
        .map(|s| {
            s.parse()
                .expect("KOMMO_FANOUT_TEST_JSON_STYLE: compact, php or pretty")
        })
        .unwrap_or_default();
    SimConfig {
        leads,
        json_style,
        tokens: vec![
            TokenSpec::full(TOKEN),
            TokenSpec {
                token: "limited".into(),
                responsible_user_ids: Some(vec![1001, 1002]),
            },
        ],
        ..SimConfig::default()
    }
}

/// Turns the cache on with `ttl`.
pub fn cached(ttl: std::time::Duration) -> impl FnOnce(&mut ServeConfig) {
    move |c| c.cache.ttl = ttl
}

pub async fn stack(sim: SimConfig) -> Stack {
    stack_with(sim, |_| {}).await
}

pub async fn stack_with(sim: SimConfig, tweak: impl FnOnce(&mut ServeConfig)) -> Stack {
    let sim = Sim::spawn(sim).await.expect("simulator starts");
    let mut config = ServeConfig::for_upstream(&sim.base_url()).expect("valid config");
    // Functional tests are not about the rate limit: an effectively unlimited budget, unless
    // the test sets one.
    config.limiter.requests = 1_000_000;
    // Nor about the cache, which hides upstream faults a test injects; cache tests turn it on.
    config.cache.ttl = std::time::Duration::ZERO;
    tweak(&mut config);
    let served = serve_proxy(config).await;
    Stack {
        sim,
        proxy: served.proxy,
        admin: served.admin,
        gateway: served.gateway,
        client: Client::default(),
        _stop: served.stop,
    }
}

/// A proxy built from `config` by the real wiring, serving on loopback port 0 until `stop`
/// is dropped.
pub struct Served {
    pub proxy: String,
    pub admin: String,
    pub gateway: std::sync::Arc<kommo_fanout::gateway::Gateway>,
    pub stop: oneshot::Sender<()>,
}

pub async fn serve_proxy(config: ServeConfig) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy = format!("http://{}", listener.local_addr().expect("bound"));
    let admin_url = format!("http://{}", admin.local_addr().expect("bound"));
    let gateway = kommo_fanout::gateway(&config)
        .await
        .expect("gateway builds");
    let (stop, rx) = oneshot::channel::<()>();
    let gw = gateway.clone();
    tokio::spawn(async move {
        kommo_fanout::serve(&config, gw, listener, admin, async move {
            let _ = rx.await;
        })
        .await
        .expect("the proxy serves");
    });
    Served {
        proxy,
        admin: admin_url,
        gateway,
        stop,
    }
}

/// An answer, fully read.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The ids of `_embedded.leads` in order.
    pub fn ids(&self) -> Vec<i64> {
        self.json()["_embedded"]["leads"]
            .as_array()
            .expect("_embedded.leads is a list")
            .iter()
            .map(|l| l["id"].as_i64().expect("integer id"))
            .collect()
    }
}

impl Stack {
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: &str,
    ) -> Answer {
        self.request_with(method, url, token, body, &[]).await
    }

    /// A request with extra headers (a `content-type` among them replaces the JSON default).
    pub async fn request_with(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        self.client
            .request_with(method, url, token, body, headers)
            .await
    }

    /// `GET {proxy}/api/v4/leads?{query}` with the demo token.
    pub async fn leads(&self, query: &str) -> Answer {
        self.get(&format!("/api/v4/leads?{query}"), TOKEN).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.request(
            Method::GET,
            &format!("{}{path}", self.proxy),
            Some(token),
            "",
        )
        .await
    }
}

/// A plain HTTP client for loopback.
pub struct Client(pub HyperClient<HttpConnector, Full<Bytes>>);

impl Default for Client {
    fn default() -> Self {
        Client(HyperClient::builder(TokioExecutor::new()).build_http())
    }
}

impl Client {
    /// `GET url` with a bearer token, its status read and its body dropped, or why it failed
    /// (a server that went away).
    pub async fn try_get(&self, url: &str, token: &str) -> Result<StatusCode, String> {
        let req = Request::get(url)
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = self.0.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(status)
    }

    /// `GET url` with a bearer token.
    pub async fn get(&self, url: &str, token: &str) -> Answer {
        self.request_with(Method::GET, url, Some(token), "", &[])
            .await
    }

    pub async fn request_with(
        &self,
        method: Method,
        url: &str,
        token: Option<&str>,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(url);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if !body.is_empty()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = self.0.request(req).await.expect("request completes");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body reads").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

/// `filter[statuses][i][...]` parameters for `pairs`.
pub fn stages(pairs: &[(i64, i64)]) -> String {
    pairs
        .iter()
        .enumerate()
        .map(|(i, (p, s))| {
            format!("filter[statuses][{i}][pipeline_id]={p}&filter[statuses][{i}][status_id]={s}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The order to compute truth in: field name and descending.
#[derive(Clone, Copy, Debug)]
pub struct TruthOrder {
    pub field: &'static str,
    pub desc: bool,
}

pub const BY_ID: TruthOrder = TruthOrder {
    field: "id",
    desc: false,
};

/// The ids a client should see, in order: live leads in any of `pairs` (by their stage or a
/// ghost listing) that `keep` accepts, ordered by the field with ties by id.
pub fn truth(
    leads: &[SimLead],
    pairs: &[(i64, i64)],
    order: TruthOrder,
    keep: impl Fn(&SimLead) -> bool,
) -> Vec<i64> {
    let wanted: HashSet<(i64, i64)> = pairs.iter().copied().collect();
    let mut hits: Vec<&SimLead> = leads
        .iter()
        .filter(|l| !l.is_deleted)
        .filter(|l| {
            wanted.contains(&(l.pipeline_id, l.status_id))
                || l.ghost_stages.iter().any(|g| wanted.contains(g))
        })
        .filter(|l| keep(l))
        .collect();
    let key = |l: &SimLead| -> (i64, i64) {
        match order.field {
            "created_at" => (l.created_at, l.id),
            "updated_at" => (l.updated_at, l.id),
            _ => (l.id, l.id),
        }
    };
    hits.sort_by_key(|l| key(l));
    if order.desc {
        hits.reverse();
    }
    hits.into_iter().map(|l| l.id).collect()
}

/// Stage sizes of the simulated account: (pipeline, status, live leads), largest first.
pub fn stage_sizes(sim: &Sim) -> Vec<(i64, i64, usize)> {
    let leads = sim.leads();
    let mut out = Vec::new();
    for p in sim.pipelines() {
        for s in p.statuses {
            let n = leads
                .iter()
                .filter(|l| !l.is_deleted && l.pipeline_id == p.id && l.status_id == s.id)
                .count();
            out.push((p.id, s.id, n));
        }
    }
    out.sort_by_key(|&(_, _, n)| std::cmp::Reverse(n));
    out
}

/// The `n` largest stages of the simulated account.
pub fn largest_stages(s: &Stack, n: usize) -> Vec<(i64, i64)> {
    stage_sizes(&s.sim)
        .iter()
        .take(n)
        .map(|&(p, st, _)| (p, st))
        .collect()
}

/// The most arrivals within any window of length `window`.
pub fn max_in_window(mut at: Vec<tokio::time::Instant>, window: std::time::Duration) -> usize {
    at.sort();
    let mut best = 0;
    let mut start = 0;
    for end in 0..at.len() {
        while at[end] - at[start] >= window {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// The value of the metrics sample `name` (with its labels, as exposed), or 0 when absent.
pub fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `body` with the origin `from` moved to `to` as the proxy moves links: in each spelling the
/// upstream may use (slashes plain or escaped), so the rest must match byte for byte.
pub fn moved(body: &[u8], from: &str, to: &str) -> String {
    let escaped = |s: &str| s.replace('/', "\\/");
    String::from_utf8_lossy(body)
        .replace(from, to)
        .replace(&escaped(from), &escaped(to))
}

/// `v` without any `_links` member, at any depth: what the proxy passes through unchanged.
pub fn without_links(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| *k != "_links")
                .map(|(k, v)| (k.clone(), without_links(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_links).collect()),
        v => v.clone(),
    }
}

/// Polls `check` every 20 ms until it holds; fails the test, naming `what`, after `limit`.
pub async fn eventually(what: &str, limit: std::time::Duration, mut check: impl FnMut() -> bool) {
    eventually_async(what, limit, || std::future::ready(check())).await
}

/// [`eventually`] for a check that does I/O (a request, a connect).
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: std::time::Duration,
    mut check: impl FnMut() -> F,
) {
    eventually_some(what, limit, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await
}

/// Polls `check` every 20 ms until it gives a value, and returns it; fails the test, naming
/// `what`, after `limit`.
pub async fn eventually_some<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: std::time::Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let until = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{what}: not within {limit:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// [`eventually_some`] for code off the runtime (a child process, a blocking socket): `None`
/// when `check` gave nothing within `limit`.
pub fn poll_blocking<T>(
    limit: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Option<T> {
    let until = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if std::time::Instant::now() >= until {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
