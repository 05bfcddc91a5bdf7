//! Scale-out on Redis: three proxy replicas share one upstream budget and one cache through a
//! real `redis-server` started on a free loopback port (killed on drop).
//!
//! `redis-server` must be installed (`scripts/test.sh` installs Debian's package): a test that
//! cannot start it fails with a message saying so, it is never skipped. Windows are scaled down
//! (300 ms instead of a second) so the tests stay short; the guarantee checked is the same:
//! never more than N arrivals in any window, counted from the simulator's own arrival log.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use kommo_fanout::cache::SharedCache;
use kommo_fanout::config::{RedisSettings, ServeConfig};
use kommo_fanout::gateway::Gateway;
use kommo_fanout::redis::{RedisCache, RedisCacheConfig, RedisLimiter, RedisLimiterConfig};
use kommo_fanout::upstream::limiter::{LimiterConfig, UpstreamLimiter};
use kommo_sim::{Fault, FaultRule, Sim, SimConfig, SimHandle, SimRateLimit};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::support::{eventually, eventually_async, max_in_window, poll_blocking};
use crate::support::{sim_config, stage_sizes, stages, truth, Client, BY_ID, TOKEN};

const LEADS: usize = 3000;
const N: u32 = 7;
const WINDOW: Duration = Duration::from_millis(300);

// === a real redis-server ===

/// A `redis-server` child on a loopback port, without persistence; killed on drop.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port.
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut server = RedisServer { port, child: None };
        server.restart();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on its port and waits until it answers `PING`.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): these tests need a real Redis. Install it \
                     with `apt-get install redis-server` (scripts/test.sh does so when it is missing)"
                )
            });
        self.child = Some(child);
        if poll_blocking(Duration::from_secs(10), || self.ping().then_some(())).is_some() {
            return;
        }
        panic!(
            "redis-server did not answer on port {} within 10 s",
            self.port
        );
    }

    /// Kills the server (as a crash or a network cut would look to the replicas).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `cmd` until its answer passes `done`, at most `tries` times `every` apart, and
    /// returns the last answer.
    async fn poll<T: ::redis::FromRedisValue>(
        &self,
        cmd: &::redis::Cmd,
        (tries, every): (u32, Duration),
        done: impl Fn(&T) -> bool,
    ) -> T {
        let client = ::redis::Client::open(self.url()).expect("a valid URL");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis answers");
        let mut attempt = 1;
        loop {
            let answer: T = cmd.query_async(&mut conn).await.expect("Redis answers");
            if done(&answer) || attempt == tries {
                return answer;
            }
            attempt += 1;
            tokio::time::sleep(every).await;
        }
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// === three replicas ===

/// One proxy replica, built by the same wiring as `serve --redis`.
struct Replica {
    proxy: String,
    admin: String,
    limiter: Arc<RedisLimiter>,
    gateway: Arc<Gateway>,
    _stop: oneshot::Sender<()>,
}

/// The limiter key of the simulator's origin (`--rate-limit-key origin`).
fn origin_key(sim: &SimHandle) -> String {
    ServeConfig::for_upstream(&sim.base_url())
        .expect("valid config")
        .upstream
        .origin
        .url
}

fn limiter_config(url: &str, prefix: &str, requests: u32) -> RedisLimiterConfig {
    RedisLimiterConfig {
        url: url.to_string(),
        key_prefix: prefix.to_string(),
        limiter: LimiterConfig {
            requests,
            window: WINDOW,
            margin: Duration::from_millis(20),
        },
        replicas: 3,
        lease: Duration::from_secs(5),
    }
}

async fn replica(sim: &SimHandle, redis_url: &str, prefix: &str) -> Replica {
    replica_with(sim, redis_url, prefix, Duration::ZERO).await
}

/// A replica with its cache fresh for `cache_ttl` (zero: off) and the webhook endpoint on.
async fn replica_with(
    sim: &SimHandle,
    redis_url: &str,
    prefix: &str,
    cache_ttl: Duration,
) -> Replica {
    let mut config = ServeConfig::for_upstream(&sim.base_url()).expect("valid config");
    let lim = limiter_config(redis_url, prefix, N);
    config.limiter = lim.limiter;
    config.cache.ttl = cache_ttl;
    config.webhook_secret = Some(WEBHOOK_SECRET.into());
    config.gateway.request_timeout = Duration::from_secs(30);
    config.redis = Some(RedisSettings {
        url: redis_url.to_string(),
        prefix: prefix.to_string(),
        replicas: lim.replicas,
    });
    let served = crate::support::serve_proxy(config).await;
    let limiter = served
        .gateway
        .shared
        .as_ref()
        .expect("shared backends")
        .limiter
        .clone();
    Replica {
        proxy: served.proxy,
        admin: served.admin,
        limiter,
        gateway: served.gateway,
        _stop: served.stop,
    }
}

const WEBHOOK_SECRET: &str = "webhook-secret-0123456789";

async fn three_replicas(sim: &SimHandle, redis: &RedisServer, prefix: &str) -> Vec<Replica> {
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(replica(sim, &redis.url(), prefix).await);
    }
    out
}

/// The simulator enforcing Kommo's limit; blocks only after many 429s, so a mistake shows as
/// 429s in the log rather than as a blocked account.
fn sim_limited() -> SimConfig {
    SimConfig {
        rate_limit: Some(SimRateLimit {
            requests: N,
            window: WINDOW,
            block_after: 1000,
            block_for: Duration::from_secs(60),
        }),
        ..sim_config(LEADS)
    }
}

/// The `n` largest stages of the account.
fn largest(sim: &Sim, n: usize) -> Vec<(i64, i64)> {
    stage_sizes(sim)
        .iter()
        .take(n)
        .map(|&(p, s, _)| (p, s))
        .collect()
}

/// `clients` concurrent 4-stage requests (distinct sets), spread round-robin over the replicas;
/// asserts every answer against the simulator's own data.
async fn run_clients(sim: &SimHandle, replicas: &[Replica], clients: usize, offset: usize) {
    let all = largest(sim, 24);
    let leads = sim.leads();
    let client = Client::default();
    let requests = (0..clients).map(|i| {
        let c = i + offset;
        let set: Vec<(i64, i64)> = (0..4).map(|k| all[(c + k * 5) % all.len()]).collect();
        let url = format!(
            "{}/api/v4/leads?{}&limit=50",
            replicas[c % replicas.len()].proxy,
            stages(&set)
        );
        let (client, leads) = (&client, &leads);
        async move {
            let a = client.get(&url, TOKEN).await;
            let want: Vec<i64> = truth(leads, &set, BY_ID, |_| true)
                .into_iter()
                .take(50)
                .collect();
            (a, want)
        }
    });
    for (a, want) in join_all(requests).await {
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(a.ids(), want);
    }
}

/// Fails unless the simulator never refused and no window held more than `N` arrivals.
fn assert_within_budget(sim: &SimHandle) {
    let log = sim.requests();
    let refused = log.iter().filter(|r| r.status == 429).count();
    assert_eq!(refused, 0, "the simulator refused {refused} requests");
    let most = max_in_window(log.iter().map(|r| r.at).collect(), WINDOW);
    assert!(
        most <= N as usize,
        "{most} upstream requests within one window"
    );
}

// === the limiter ===

#[tokio::test]
async fn three_replicas_share_one_window_across_21_clients() {
    let redis = RedisServer::start();
    let sim = Sim::spawn(sim_limited()).await.expect("simulator starts");
    let replicas = three_replicas(&sim, &redis, "share:").await;
    assert!(replicas.iter().all(|r| !r.limiter.degraded()));

    let started = Instant::now();
    run_clients(&sim, &replicas, 21, 0).await;
    let took = started.elapsed();

    let log = sim.requests();
    assert!(log.len() >= 80, "{} upstream requests", log.len());
    assert_within_budget(&sim);
    // Three replicas, one budget: the whole run used about N per W + M + latency, not 3N.
    eprintln!(
        "{} upstream requests in {took:?}: {:.1} per window of {WINDOW:?} (N = {N})",
        log.len(),
        log.len() as f64 / (took.as_secs_f64() / WINDOW.as_secs_f64())
    );
}

#[tokio::test]
async fn a_429_on_one_replica_pauses_the_others() {
    let redis = RedisServer::start();
    let sim = Sim::spawn(SimConfig {
        latency: Duration::from_millis(5),
        ..sim_config(LEADS)
    })
    .await
    .expect("simulator starts");
    let replicas = three_replicas(&sim, &redis, "pause:").await;
    let key = origin_key(&sim);
    let set = largest(&sim, 6);
    let leads = sim.leads();
    let client = Client::default();
    sim.inject(
        FaultRule::always(Fault::TooManyRequests {
            retry_after: Some(1),
            header: false,
        })
        .times(1),
    );

    let on = |r: usize, pairs: &[(i64, i64)]| {
        format!(
            "{}/api/v4/leads?{}&limit=20",
            replicas[r].proxy,
            stages(pairs)
        )
    };
    let (url_a, url_b, url_c) = (on(0, &set[0..2]), on(1, &set[2..4]), on(2, &set[4..6]));
    let a = client.get(&url_a, TOKEN);
    let others = async {
        // As soon as replica A has seen the 429 and shared the pause (one Redis round trip
        // after it; A's requests meanwhile already wait), B and C are asked for other stages.
        eventually("replica A saw the 429", Duration::from_secs(5), || {
            replicas[0].limiter.snapshot(&key).paused_until.is_some()
        })
        .await;
        let pause_ttl: i64 = redis
            .poll(
                ::redis::cmd("PTTL").arg(format!("pause:limiter:{key}:pause")),
                (1000, Duration::from_millis(5)),
                |ttl| *ttl > 0,
            )
            .await;
        assert!(pause_ttl > 0, "the pause reached Redis within 5 s");
        let asked = Instant::now();
        let b = client.get(&url_b, TOKEN);
        let c = client.get(&url_c, TOKEN);
        let (b, c) = tokio::join!(b, c);
        (asked, b, c)
    };
    let (a, (asked, b, c)) = tokio::join!(a, others);
    for (answer, pairs) in [(a, &set[0..2]), (b, &set[2..4]), (c, &set[4..6])] {
        assert_eq!(
            answer.status,
            200,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        let want: Vec<i64> = truth(&leads, pairs, BY_ID, |_| true)
            .into_iter()
            .take(20)
            .collect();
        assert_eq!(answer.ids(), want);
    }

    let log = sim.requests();
    let t429 = log
        .iter()
        .find(|r| r.status == 429)
        .expect("the fault fired")
        .at;
    assert!(
        asked < t429 + Duration::from_millis(800),
        "B and C were asked during the pause"
    );
    // Whatever was granted after the 429 waited it out: B's and C's stages, and A's retry. (A's
    // other first page was granted with the refused one, before the pause, and may arrive late
    // on a busy machine.)
    let stage_of = |query: &str| {
        let value = |key: &str| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == key)
                .and_then(|(_, v)| v.parse::<i64>().ok())
        };
        value("filter[statuses][0][pipeline_id]").zip(value("filter[statuses][0][status_id]"))
    };
    let refused = log
        .iter()
        .find(|r| r.status == 429)
        .map(|r| r.query.clone());
    let paused_ones: Vec<_> = log
        .iter()
        .filter(|r| r.status != 429)
        .filter(|r| {
            Some(&r.query) == refused.as_ref()
                || stage_of(&r.query).is_some_and(|stage| set[2..6].contains(&stage))
        })
        .map(|r| (r.at.saturating_duration_since(t429), r.query.clone()))
        .collect();
    assert_eq!(
        paused_ones.len(),
        5,
        "B's and C's four stages and A's retry"
    );
    let early: Vec<_> = paused_ones
        .iter()
        .filter(|(after, _)| *after < Duration::from_millis(950))
        .collect();
    assert!(
        early.is_empty(),
        "upstream requests during the pause: {early:?}"
    );
}

#[tokio::test]
async fn redis_stopped_mid_run_falls_back_at_n_over_replicas_and_recovers() {
    let mut redis = RedisServer::start();
    let sim = Sim::spawn(sim_limited()).await.expect("simulator starts");
    let replicas = three_replicas(&sim, &redis, "outage:").await;

    // Redis dies while 12 clients are being served.
    let clients = run_clients(&sim, &replicas, 12, 0);
    let kill = async {
        eventually("traffic started", Duration::from_secs(5), || {
            sim.request_count() >= 10
        })
        .await;
        redis.stop();
    };
    tokio::join!(clients, kill);
    eventually("every replica noticed", Duration::from_secs(2), || {
        replicas.iter().all(|r| r.limiter.degraded())
    })
    .await;
    assert_within_budget(&sim);

    // Redis comes back while 12 more are being served on the fallbacks.
    let clients = run_clients(&sim, &replicas, 12, 12);
    let restart = async {
        let seen = sim.request_count();
        eventually("traffic on the fallbacks", Duration::from_secs(5), || {
            sim.request_count() >= seen + 10
        })
        .await;
        redis.restart();
    };
    tokio::join!(clients, restart);
    eventually("every replica shares again", Duration::from_secs(5), || {
        replicas.iter().all(|r| !r.limiter.degraded())
    })
    .await;
    run_clients(&sim, &replicas, 6, 3).await;
    assert_within_budget(&sim);
    // Sharing resumed for real: all three are members of the new server's limiter again.
    let members: i64 = redis
        .poll(
            ::redis::cmd("ZCARD").arg("outage:limiter:members"),
            (100, Duration::from_millis(50)),
            |members| *members == 3,
        )
        .await;
    assert_eq!(members, 3, "replicas registered with the restarted Redis");
}

impl RedisServer {
    /// Stops (`true`) or resumes the server's process, as a stalled host or a long pause of
    /// the process looks to the replicas: connections stay open, commands wait, and whatever
    /// was sent meanwhile runs when it resumes.
    fn freeze(&self, frozen: bool) {
        let pid = self.child.as_ref().expect("a running server").id();
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stalled_and_resumed_under_load_never_lets_a_late_command_exceed_the_window() {
    let redis = RedisServer::start();
    let sim = Sim::spawn(sim_limited()).await.expect("simulator starts");
    let replicas = three_replicas(&sim, &redis, "stall:").await;
    let all = largest(&sim, 24);
    let stop = Arc::new(AtomicBool::new(false));
    // Clients asking distinct 4-stage views through every replica for the whole run.
    let load: Vec<_> = (0..9)
        .map(|c| {
            let proxy = replicas[c % replicas.len()].proxy.clone();
            let (all, stop) = (all.clone(), stop.clone());
            tokio::spawn(async move {
                let client = Client::default();
                let mut n = c;
                while !stop.load(Ordering::Relaxed) {
                    n += 9;
                    let set: Vec<(i64, i64)> =
                        (0..4).map(|k| all[(n + k * 5) % all.len()]).collect();
                    let url = format!(
                        "{proxy}/api/v4/leads?{}&limit=50&filter[id][]={n}",
                        stages(&set)
                    );
                    let _ =
                        tokio::time::timeout(Duration::from_secs(30), client.try_get(&url, TOKEN))
                            .await;
                }
            })
        })
        .collect();
    for round in 0..3 {
        let seen = sim.request_count();
        eventually("traffic before the stall", Duration::from_secs(10), || {
            sim.request_count() >= seen + 10
        })
        .await;
        redis.freeze(true);
        eventually("every replica noticed", Duration::from_secs(10), || {
            replicas.iter().all(|r| r.limiter.degraded())
        })
        .await;
        let seen = sim.request_count();
        eventually("traffic on the fallbacks", Duration::from_secs(10), || {
            sim.request_count() >= seen + 10
        })
        .await;
        redis.freeze(false);
        eventually(
            "every replica shares again",
            Duration::from_secs(10),
            || replicas.iter().all(|r| !r.limiter.degraded()),
        )
        .await;
        let _ = round;
    }
    let seen = sim.request_count();
    eventually(
        "traffic after the last stall",
        Duration::from_secs(10),
        || sim.request_count() >= seen + 14,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.abort();
    }
    assert_within_budget(&sim);
}

#[tokio::test]
async fn the_limiter_rejects_a_bad_url_and_starts_degraded_without_redis() {
    let err = RedisLimiter::connect(limiter_config("http://127.0.0.1:1", "bad:", N)).await;
    assert!(err.is_err(), "an http:// URL is not a Redis URL");

    // Nothing listens on this port: the limiter starts, degraded, and still grants locally.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let limiter = RedisLimiter::connect(limiter_config(&url, "down:", N))
        .await
        .expect("an unreachable Redis is not an error");
    assert!(limiter.degraded());
    let grant = limiter
        .acquire("k", 1, Instant::now() + Duration::from_secs(5))
        .await
        .expect("the fallback grants");
    limiter.release("k", grant);
}

// === the cache ===

fn cache_config(redis: &RedisServer, prefix: &str) -> RedisCacheConfig {
    RedisCacheConfig {
        url: redis.url(),
        key_prefix: prefix.to_string(),
    }
}

#[tokio::test]
async fn the_shared_cache_stores_expires_and_invalidates_for_every_replica() {
    let redis = RedisServer::start();
    let a = RedisCache::connect(cache_config(&redis, "c:"))
        .await
        .expect("connects");
    let b = RedisCache::connect(cache_config(&redis, "c:"))
        .await
        .expect("connects");
    let long = Duration::from_secs(60);
    let key = format!("p\u{1f}fp\u{1f}/api/v4/leads?{}", "x".repeat(2000));

    assert_eq!(a.get(&key).await, None);
    a.put(&key, Bytes::from_static(b"\x00page\xff"), long).await;
    assert_eq!(
        b.get(&key).await,
        Some(Bytes::from_static(b"\x00page\xff")),
        "one replica's fill is another's hit, bytes intact"
    );
    assert_eq!(b.get("another key").await, None);

    a.put(
        "short",
        Bytes::from_static(b"s"),
        Duration::from_millis(100),
    )
    .await;
    assert_eq!(b.get("short").await, Some(Bytes::from_static(b"s")));
    // Gone once its TTL has passed (Redis expires keys a little after, never before).
    eventually_async("the entry expires", Duration::from_secs(2), || async {
        b.get("short").await.is_none()
    })
    .await;

    // A webhook on replica B: replica A no longer sees the entry, at once.
    let before = a.generation().await.expect("a generation");
    b.invalidate_all().await;
    assert_eq!(a.generation().await, Some(before + 1));
    assert_eq!(a.get(&key).await, None);
    a.put(&key, Bytes::from_static(b"new"), long).await;
    assert_eq!(b.get(&key).await, Some(Bytes::from_static(b"new")));
    assert!(!a.degraded() && !b.degraded());
}

#[tokio::test]
async fn the_shared_cache_misses_while_redis_is_down_and_recovers() {
    let mut redis = RedisServer::start();
    let cache = RedisCache::connect(cache_config(&redis, "d:"))
        .await
        .expect("connects");
    let long = Duration::from_secs(60);
    cache.put("k", Bytes::from_static(b"v"), long).await;
    assert_eq!(cache.get("k").await, Some(Bytes::from_static(b"v")));

    redis.stop();
    let t = Instant::now();
    assert_eq!(
        cache.get("k").await,
        None,
        "an unreachable Redis reads as a miss"
    );
    cache.put("k2", Bytes::from_static(b"v"), long).await;
    assert!(cache.degraded());
    // While degraded, lookups do not wait on Redis.
    for _ in 0..100 {
        assert_eq!(cache.get("k").await, None);
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());

    redis.restart();
    eventually_async("the cache recovers", Duration::from_secs(5), || async {
        cache.put("k", Bytes::from_static(b"again"), long).await;
        !cache.degraded()
    })
    .await;
    cache.put("k", Bytes::from_static(b"again"), long).await;
    assert_eq!(cache.get("k").await, Some(Bytes::from_static(b"again")));
}

// === the shared cache, wired ===

#[tokio::test]
async fn a_view_fetched_through_one_replica_is_answered_by_another() {
    let redis = RedisServer::start();
    let sim = Sim::spawn(sim_config(LEADS)).await.expect("simulator");
    let prefix = "shared-view:";
    let ttl = Duration::from_secs(300);
    let a = replica_with(&sim, &redis.url(), prefix, ttl).await;
    let b = replica_with(&sim, &redis.url(), prefix, ttl).await;
    let set = largest(&sim, 3);
    let path = format!("/api/v4/leads?{}&limit=100", stages(&set));
    let client = Client::default();

    let first = client.get(&format!("{}{path}", a.proxy), TOKEN).await;
    assert_eq!(first.status, 200);
    let sent = sim.request_count();
    assert_eq!(sent, 3);
    // A stores its pages in Redis after answering: sharing takes one Redis round trip, which
    // on a loaded machine can outlast the next request.
    let stored: Vec<String> = redis
        .poll(
            ::redis::cmd("KEYS").arg(format!("{prefix}cache:*")),
            (1000, Duration::from_millis(5)),
            |keys: &Vec<String>| keys.len() == 3,
        )
        .await;
    assert_eq!(
        stored.len(),
        3,
        "replica A's 3 pages reached Redis within 5 s"
    );
    let second = client.get(&format!("{}{path}", b.proxy), TOKEN).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.ids(), first.ids());
    assert_eq!(
        sim.request_count(),
        sent,
        "replica B answered from the pages replica A fetched"
    );

    // Another token through replica B: its own rights, its own upstream requests.
    let leads = sim.leads();
    let mine: Vec<i64> = truth(&leads, &set, BY_ID, |l| {
        [1001, 1002].contains(&l.responsible_user_id)
    })
    .into_iter()
    .take(100)
    .collect();
    let limited = client.get(&format!("{}{path}", b.proxy), "limited").await;
    assert_eq!(limited.ids(), mine);
    assert_eq!(
        sim.request_count(),
        sent + 3,
        "no entry of the other token was reused"
    );

    // A webhook received by replica A drops replica B's entries too.
    let hook = client
        .request_with(
            http::Method::POST,
            &format!("{}/webhooks/kommo?secret={WEBHOOK_SECRET}", a.admin),
            None,
            "leads[status][0][id]=1&leads[status][0][status_id]=142",
            &[("content-type", "application/x-www-form-urlencoded")],
        )
        .await;
    assert_eq!(hook.status, 200);
    let before = sim.request_count();
    eventually("replica B drops its cache", Duration::from_secs(3), || {
        b.gateway.cache.as_ref().is_some_and(|c| c.generation() > 0)
    })
    .await;
    let after = client.get(&format!("{}{path}", b.proxy), TOKEN).await;
    assert_eq!(after.headers["x-cache"], "MISS");
    assert_eq!(sim.request_count(), before + 3);
}

/// Two replicas on one Redis holding one OAuth integration, their access tokens expiring at
/// once under load: one refresh reaches Kommo, every request is answered, and both replicas
/// save the same rotated tokens.
#[tokio::test]
async fn two_replicas_refresh_the_oauth_tokens_once_between_them() {
    use kommo_fanout::credentials::{self, CredentialSource, Holding, OAuthArgs, OAuthCommand};
    use kommo_fanout::keys::{self, KeysCommand, Scope};
    let redis = RedisServer::start();
    let ttl = Duration::from_secs(4);
    let mut oauth = kommo_sim::SimOAuth::new("client-1", "secret-1", "https://example.test/cb");
    oauth.token_ttl = ttl;
    let sim = Sim::spawn(SimConfig {
        leads: 500,
        oauth: Some(oauth),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "secret-1").unwrap();
    let args = |tokens: &str| OAuthArgs {
        oauth_client_id: Some("client-1".into()),
        oauth_client_secret_file: Some(secret.clone()),
        oauth_redirect_uri: Some("https://example.test/cb".into()),
        oauth_tokens_file: Some(dir.path().join(tokens)),
    };
    credentials::run_oauth(OAuthCommand::Exchange {
        upstream: Some(sim.base_url()),
        oauth: args("a.tokens"),
        account: None,
        config: None,
        code: sim.oauth_code(),
    })
    .await
    .unwrap();
    let issued = Instant::now();
    std::fs::copy(dir.path().join("a.tokens"), dir.path().join("b.tokens")).unwrap();
    let keys_file = dir.path().join("keys.toml");
    let added = keys::run(KeysCommand::Add {
        keys_file: keys_file.clone(),
        account: "default".into(),
        name: "dash".into(),
        scope: Scope::Read,
    })
    .unwrap();
    let key = added.lines().last().unwrap().trim().to_string();
    let mut replicas = Vec::new();
    for tokens in ["a.tokens", "b.tokens"] {
        let mut config = ServeConfig::for_upstream(&sim.base_url()).unwrap();
        config.limiter.requests = 1000;
        config.cache.ttl = Duration::ZERO;
        config.redis = Some(RedisSettings {
            url: redis.url(),
            prefix: "oauth-test:".into(),
            replicas: 2,
        });
        config.holding = Some(Holding {
            account: "default".into(),
            source: CredentialSource::OAuth(args(tokens).validate().unwrap().unwrap()),
            keys_file: keys_file.clone(),
            allow_client_tokens: false,
        });
        replicas.push(crate::support::serve_proxy(config).await);
    }
    let client = Client::default();
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| format!("{}/api/v4/leads/pipelines", r.proxy))
        .collect();
    for url in &urls {
        assert_eq!(client.get(url, &key).await.status, 200);
    }
    assert_eq!(sim.oauth_refreshes(), 0);
    // Within the refresh margin (a fifth of the life), before the expiry.
    tokio::time::sleep_until(issued + ttl * 17 / 20).await;
    let answers = join_all((0..60).map(|i| client.get(&urls[i % 2], &key))).await;
    for a in &answers {
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    assert_eq!(sim.oauth_refreshes(), 1, "one refresh between the replicas");
    assert_eq!(sim.oauth_refused(), 0);
    let saved = |f: &str| credentials::read_tokens(&dir.path().join(f)).unwrap();
    assert_eq!(
        saved("a.tokens").refresh_token,
        saved("b.tokens").refresh_token
    );
    // The shared tokens are sealed: Redis does not hold the refresh token in the clear.
    let mut conn = TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    conn.write_all(b"GET oauth-test:oauth:default:tokens\r\n")
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let n = conn.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(
        reply.starts_with('$') && !reply.starts_with("$-1"),
        "{reply}"
    );
    assert!(!reply.contains(&saved("a.tokens").refresh_token));
}

/// Keys kept in Redis (`--keys-file redis://...`): made and revoked by `keys add|revoke`
/// against Redis, read by every replica, a revoked key refused by all of them.
#[tokio::test]
async fn keys_in_redis_reach_every_replica_and_a_revoke_reaches_them_all() {
    use kommo_fanout::credentials::{CredentialSource, Holding};
    use kommo_fanout::keys::{self, KeysCommand, Scope};
    let redis = RedisServer::start();
    let sim = Sim::spawn(sim_config(300)).await.unwrap();
    let store = std::path::PathBuf::from(format!("{}/3", redis.url()));
    let add = |name: &str| {
        let out = keys::run(KeysCommand::Add {
            keys_file: store.clone(),
            account: "default".into(),
            name: name.into(),
            scope: Scope::Read,
        })
        .unwrap();
        out.lines().last().unwrap().trim().to_string()
    };
    let (dash, ops) = (add("dash"), add("ops"));
    let listed = keys::run(KeysCommand::List {
        keys_file: store.clone(),
    })
    .unwrap();
    assert!(
        listed.contains("dash") && listed.contains("ops"),
        "{listed}"
    );
    assert!(!listed.contains(&dash));
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("account.token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut config = ServeConfig::for_upstream(&sim.base_url()).unwrap();
        config.limiter.requests = 1000;
        config.cache.ttl = Duration::ZERO;
        config.limiter_lock = None;
        config.holding = Some(Holding {
            account: "default".into(),
            source: CredentialSource::TokenFile(token_file.clone()),
            keys_file: store.clone(),
            allow_client_tokens: false,
        });
        replicas.push(crate::support::serve_proxy(config).await);
    }
    let client = Client::default();
    let url = |r: &crate::support::Served| format!("{}/api/v4/leads/pipelines", r.proxy);
    for r in &replicas {
        assert_eq!(client.get(&url(r), &dash).await.status, 200);
        assert_eq!(client.get(&url(r), &ops).await.status, 200);
    }
    keys::run(KeysCommand::Revoke {
        keys_file: store.clone(),
        name: "dash".into(),
    })
    .unwrap();
    for r in &replicas {
        eventually_async(
            "the revoke reaches every replica",
            Duration::from_secs(20),
            || async { client.get(&url(r), &dash).await.status == 401 },
        )
        .await;
        assert_eq!(
            client.get(&url(r), &ops).await.status,
            200,
            "the other key stays"
        );
    }
}
