//! The operator's console on the admin listener: `GET /` (one HTML page, every asset
//! embedded, its figures rendered into the HTML and kept live by a small script) and
//! `GET /status.json` (the same figures, which the page polls).
//!
//! The figures are the proxy's own Prometheus metrics, read back once a second by a background
//! task, plus what the gateway knows that is not a metric (the limit, the live views, the
//! keys' names). The last 15 minutes are kept at one-second resolution in a ring buffer in the
//! process; nothing is stored anywhere else. Nothing derived from a token or key is shown.
//!
//! `--admin-token-file` puts `/`, `/status.json` and `/metrics` behind a bearer token.

mod exposition;
mod history;
mod page;
mod status;

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use tokio::time::{Instant, MissedTickBehavior};

use crate::accounts::Accounts;
use crate::body::{self, ProxyBody};
use crate::config::ServeConfig;
use crate::error::problem;
use crate::gateway::Gateway;

pub use exposition::Scrape;
pub use history::{History, Second};
pub use status::METRICS;

/// How much history the console keeps, at one sample a second.
pub const HISTORY: usize = 15 * 60;

/// What the console needs of the configuration.
#[derive(Debug, Clone)]
pub struct ConsoleSettings {
    /// `--rate-limit`: upstream requests allowed per window.
    pub limit: u32,
    /// `--rate-window`.
    pub window: Duration,
    /// `--cache-max-bytes`, when caching is on.
    pub cache_max_bytes: Option<u64>,
    /// `--admin-token-file`, read.
    pub token: Option<AdminToken>,
}

impl ConsoleSettings {
    pub fn of(config: &ServeConfig) -> ConsoleSettings {
        ConsoleSettings {
            limit: config.limiter.requests,
            window: config.limiter.window,
            cache_max_bytes: (!config.cache.ttl.is_zero()).then_some(config.cache.max_bytes),
            token: config.admin_token.clone(),
        }
    }
}

/// The bearer token the console and `/metrics` require. Only its SHA-256 is kept, so neither
/// `Debug` nor a memory dump of the config shows it, and comparing digests of equal length
/// takes the same time whatever the presented token.
#[derive(Clone)]
pub struct AdminToken {
    sha256: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Reads the token from `path` (surrounding whitespace ignored); the error names the flag.
    pub fn read(path: &Path) -> Result<AdminToken, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--admin-token-file {}: cannot read it: {e}", path.display()))?;
        AdminToken::new(text.trim())
            .map_err(|e| format!("--admin-token-file {}: {e}", path.display()))
    }

    /// A token of at least 16 printable characters without spaces.
    pub fn new(token: &str) -> Result<AdminToken, String> {
        if token.len() < 16 || !token.chars().all(|c| c.is_ascii_graphic()) {
            return Err("the token must be at least 16 printable characters without spaces".into());
        }
        Ok(AdminToken {
            sha256: crate::keys::sha256(token.as_bytes()),
        })
    }

    /// Whether `headers` carry `Authorization: Bearer <this token>`.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let presented = crate::headers::bearer(headers);
        let Some(presented) = presented else {
            return false;
        };
        crate::keys::same_hash(&crate::keys::sha256(presented.as_bytes()), &self.sha256)
    }
}

/// The console: its settings and what the sampler has read.
pub struct Console {
    settings: ConsoleSettings,
    /// When the process started the console, for the uptime.
    started: Instant,
    /// A plain mutex: the sampler holds it once a second to push a sample, a request to
    /// copy figures out; never across an await.
    state: Mutex<State>,
}

/// What the sampler has read.
struct State {
    /// One row a second, the last [`HISTORY`].
    history: History,
    /// The last minute of scrapes (61, so the oldest is a minute before the newest), for
    /// rates and quantiles over the last minute.
    scrapes: std::collections::VecDeque<(Instant, Arc<Scrape>)>,
    /// Figures of the newest sample that are not metrics.
    limiter: LimiterNow,
}

/// The limiter's state beyond its gauges, read with each sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimiterNow {
    /// Seconds of block cool-down left, if one is in force.
    pub block_cooldown_remaining_s: Option<f64>,
    /// A `429` paused the budget.
    pub paused_for_429: bool,
    /// Another process of the account still sends.
    pub waiting_for_previous_process: bool,
}

impl Console {
    /// A console with nothing sampled yet; [`Console::start`] starts its sampler.
    pub fn new(settings: ConsoleSettings) -> Arc<Console> {
        Arc::new(Console {
            settings,
            started: Instant::now(),
            state: Mutex::new(State {
                history: History::new(HISTORY),
                scrapes: std::collections::VecDeque::with_capacity(62),
                limiter: LimiterNow::default(),
            }),
        })
    }

    /// A console for `gw`, sampling once a second until either is dropped.
    pub fn start(settings: ConsoleSettings, gw: &Arc<Gateway>) -> Arc<Console> {
        let console = Console::new(settings);
        tokio::spawn(sample_every_second(
            Arc::downgrade(gw),
            Arc::downgrade(&console),
        ));
        console
    }

    /// Reads the gateway's figures now and appends them to the history.
    pub async fn sample(&self, gw: &Gateway) {
        let scrape = Arc::new(Scrape::parse(&gw.scrape().await));
        let origin = &gw.fetcher.upstream.origin().url;
        let snapshot = gw.fetcher.limiter.snapshot(origin);
        let now = Instant::now();
        let limiter = LimiterNow {
            block_cooldown_remaining_s: snapshot
                .blocked_until
                .map(|until| until.saturating_duration_since(now).as_secs_f64().ceil()),
            paused_for_429: snapshot.paused_until.is_some_and(|until| until > now),
            waiting_for_previous_process: snapshot.waiting_for_predecessor,
        };
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut state = self.lock();
        // One row a second, each its own second, even when a sample comes late or early.
        let at = state.history.last().map_or(at, |last| at.max(last.at + 1));
        let previous = state.scrapes.back().map(|(_, s)| s.clone());
        let second = Second::between(at, previous.as_deref(), &scrape);
        state.history.push(second);
        state.scrapes.push_back((now, scrape));
        while state.scrapes.len() > 61 {
            state.scrapes.pop_front();
        }
        state.limiter = limiter;
    }

    /// The figures, as `/status.json` serves them.
    pub fn status(&self, accounts: &Accounts) -> serde_json::Value {
        let state = self.lock();
        let view = status::View {
            settings: &self.settings,
            uptime: self.started.elapsed(),
            history: &state.history,
            scrapes: &state.scrapes,
            limiter: state.limiter,
        };
        status::build(&view, accounts)
    }

    /// Answers the console's own paths; `None` for any other path. Also refuses `/metrics`
    /// without the admin token, when one is configured.
    pub fn answer(
        &self,
        accounts: &Accounts,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Response<ProxyBody>> {
        let guarded = matches!(path, "/" | "/status.json" | "/metrics");
        if !guarded {
            return None;
        }
        if let Some(token) = &self.settings.token {
            if !token.admits(headers) {
                let mut resp = problem(
                    StatusCode::UNAUTHORIZED,
                    "the admin token is required: send `Authorization: Bearer <token>` with the token of --admin-token-file",
                    None,
                );
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"kommo-fanout admin\""),
                );
                return Some(resp);
            }
        }
        if method != Method::GET {
            return (path != "/metrics").then(|| {
                problem(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "only GET is answered here",
                    None,
                )
            });
        }
        match path {
            "/status.json" => {
                let status = self.status(accounts);
                Some(typed(status.to_string(), "application/json"))
            }
            "/" => {
                let status = self.status(accounts);
                Some(typed(page::render(&status), "text/html; charset=utf-8"))
            }
            // `/metrics` itself is the admin handler's.
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A sample is pushed whole; a panic elsewhere leaves the history usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn typed(body: String, content_type: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(body));
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    // The figures change every second, and the page must never be kept by a shared cache.
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}

/// Samples `gw` into `console` once a second, until either is gone.
async fn sample_every_second(gw: Weak<Gateway>, console: Weak<Console>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // A sample late by a busy runtime is taken once, not in a burst that would bunch the
    // chart's seconds.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(gw), Some(console)) = (gw.upgrade(), console.upgrade()) else {
            return;
        };
        console.sample(&gw).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_admits_only_itself_and_never_shows() {
        let token = AdminToken::new("0123456789abcdef-secret").unwrap();
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::AUTHORIZATION,
                HeaderValue::from_str(v).unwrap(),
            );
            h
        };
        assert!(token.admits(&with("Bearer 0123456789abcdef-secret")));
        assert!(token.admits(&with("bearer 0123456789abcdef-secret")));
        assert!(!token.admits(&with("Bearer 0123456789abcdef-secreT")));
        assert!(!token.admits(&with("Bearer 0123456789abcdef-secret2")));
        assert!(!token.admits(&with("Basic 0123456789abcdef-secret")));
        assert!(!token.admits(&HeaderMap::new()));
        assert!(!format!("{token:?}").contains("secret"));
        assert!(AdminToken::new("short").is_err());
        assert!(AdminToken::new("has a space in it, long enough").is_err());
    }
}
