//! The command line: flags (each also read from `KOMMO_FANOUT_<FLAG>`), validated completely
//! before any socket is bound.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches, Parser};

use crate::cache::CacheConfig;
use crate::credentials::{CredentialSource, OAuthArgs};
use crate::gateway::{Bounds, GatewaySettings, RateLimitKey};
use crate::headers::{host_name, valid_host};
use crate::upstream::fetch::FetchPolicy;
use crate::upstream::handover::lock_path;
use crate::upstream::limiter::LimiterConfig;
use crate::upstream::{Origin, UpstreamConfig};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Flags of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A TOML file with any of these flags as keys (`rate_limit = 7`, `cache_ttl = "30s"`);
    /// flags and environment variables take precedence over it.
    #[arg(long, env = "KOMMO_FANOUT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Check the configuration, print it, and exit without serving.
    #[arg(long)]
    pub check: bool,
    /// The Kommo account origin, e.g. https://example.kommo.com.
    #[arg(long, env = "KOMMO_FANOUT_UPSTREAM")]
    pub upstream: Option<String>,
    /// Where clients connect.
    #[arg(long, env = "KOMMO_FANOUT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the admin endpoints (/healthz) listen.
    #[arg(
        long,
        env = "KOMMO_FANOUT_ADMIN_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_listen: SocketAddr,
    /// The base URL clients reach the proxy at, used in links (default: from the Host header).
    #[arg(long, env = "KOMMO_FANOUT_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Most distinct stages (`filter[statuses]` pairs) in one request.
    #[arg(long, env = "KOMMO_FANOUT_MAX_PAIRS", default_value_t = 100,
          value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub max_pairs: u16,
    /// Most upstream requests one client request may cause (cache misses sent upstream); a
    /// merged page that would take more is refused with 400 before they are sent.
    #[arg(long, env = "KOMMO_FANOUT_MAX_UPSTREAM_PER_REQUEST", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_upstream_per_request: u32,
    /// Time limit of one upstream attempt (connect, answer and body).
    #[arg(long, env = "KOMMO_FANOUT_UPSTREAM_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,
    /// The largest upstream answer the proxy buffers, in bytes.
    #[arg(long, env = "KOMMO_FANOUT_MAX_UPSTREAM_BODY", default_value_t = 32 * 1024 * 1024)]
    pub max_upstream_body: usize,
    /// Upstream requests allowed in any window of --rate-window (Kommo: 7 per second).
    #[arg(long, env = "KOMMO_FANOUT_RATE_LIMIT", default_value_t = 7,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rate_limit: u32,
    /// The window --rate-limit counts in.
    #[arg(long, env = "KOMMO_FANOUT_RATE_WINDOW", default_value = "1s", value_parser = humantime::parse_duration)]
    pub rate_window: Duration,
    /// Extra time a slot stays taken after its request completed (clock drift, abandoned requests).
    #[arg(long, env = "KOMMO_FANOUT_RATE_MARGIN", default_value = "25ms", value_parser = humantime::parse_duration)]
    pub rate_margin: Duration,
    /// Where processes of one account on this host take turns sending (a lock file per
    /// account), so a restarted proxy never adds to its predecessor's window; `off` to skip.
    /// Default: `kommo-fanout` in the system's temporary directory.
    #[arg(long, env = "KOMMO_FANOUT_LIMITER_LOCK_DIR")]
    pub limiter_lock_dir: Option<PathBuf>,
    /// What the upstream budget is shared by: the account origin, or each credential.
    #[arg(
        long,
        env = "KOMMO_FANOUT_RATE_LIMIT_KEY",
        value_enum,
        default_value = "origin"
    )]
    pub rate_limit_key: RateLimitKey,
    /// The longest a request waits for an upstream slot before a 503 with Retry-After.
    #[arg(long, env = "KOMMO_FANOUT_MAX_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// Retries of an idempotent upstream GET (connection errors, timeouts, 5xx, unusable body).
    #[arg(long, env = "KOMMO_FANOUT_RETRIES", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=10))]
    pub retries: u32,
    /// How long no upstream request is sent after a 403 that looks like a block.
    #[arg(long, env = "KOMMO_FANOUT_BLOCK_COOLDOWN", default_value = "60s", value_parser = humantime::parse_duration)]
    pub block_cooldown: Duration,
    /// The longest one client request may take (504 after it).
    #[arg(long, env = "KOMMO_FANOUT_REQUEST_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Requests per second one client (credential, else address) may make; unlimited if unset.
    #[arg(long, env = "KOMMO_FANOUT_CLIENT_RATE_LIMIT")]
    pub client_rate_limit: Option<NonZeroU32>,
    /// How long a cached answer is fresh; 0 turns caching off.
    #[arg(long, env = "KOMMO_FANOUT_CACHE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub cache_ttl: Duration,
    /// The bytes the cache may hold (upstream pages and answers together).
    #[arg(long, env = "KOMMO_FANOUT_CACHE_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub cache_max_bytes: u64,
    /// Past the TTL but within this, serve the cached answer and refresh it once in the background.
    #[arg(long, env = "KOMMO_FANOUT_STALE_WHILE_REVALIDATE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub stale_while_revalidate: Duration,
    /// Also cache GETs of paths other than the leads list.
    #[arg(long, env = "KOMMO_FANOUT_CACHE_PASSTHROUGH")]
    pub cache_passthrough: bool,
    /// Deprecated, without effect: cached answers are written like any other. Accepted (with a
    /// warning) so existing command lines and config files keep working.
    #[arg(long, env = "KOMMO_FANOUT_SENDFILE_MIN_BYTES", hide = true)]
    pub sendfile_min_bytes: Option<usize>,
    #[command(flatten)]
    pub sync: crate::sync::live::SyncArgs,
    #[command(flatten)]
    pub credentials: crate::credentials::CredentialArgs,
    /// Shared secret of POST /webhooks/kommo on the admin listener (in `?secret=` or the
    /// X-Webhook-Secret header); the endpoint is off without it.
    #[arg(long, env = "KOMMO_FANOUT_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// A file holding the bearer token the console (`/`, `/status.json`) and `/metrics` of the
    /// admin listener require; open to anyone who reaches the admin listener without it.
    #[arg(long, env = "KOMMO_FANOUT_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Share the upstream budget and the cache with other replicas through this Redis
    /// (`redis://host:6379` or `rediss://...`).
    #[arg(long, env = "KOMMO_FANOUT_REDIS", hide_env_values = true)]
    pub redis: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[arg(
        long,
        env = "KOMMO_FANOUT_REDIS_PREFIX",
        default_value = "kommo-fanout:"
    )]
    pub redis_prefix: String,
    /// How many replicas share the budget: while Redis is unreachable each falls back to
    /// --rate-limit divided by this, so together they stay under the limit.
    #[arg(long, env = "KOMMO_FANOUT_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub replicas: u32,
    /// Honour X-Forwarded-Host and X-Forwarded-Proto for links (only behind a proxy you trust).
    #[arg(long, env = "KOMMO_FANOUT_TRUST_FORWARDED")]
    pub trust_forwarded: bool,
    /// Longest request target (path and query) in bytes; longer gets 414.
    #[arg(long, env = "KOMMO_FANOUT_MAX_URI_LEN", default_value_t = 16 * 1024)]
    pub max_uri_len: usize,
    /// Most bytes of request headers; more gets 431.
    #[arg(long, env = "KOMMO_FANOUT_MAX_HEADER_BYTES", default_value_t = 32 * 1024)]
    pub max_header_bytes: usize,
    /// Largest pass-through request body in bytes; larger gets 413.
    #[arg(long, env = "KOMMO_FANOUT_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: u64,
    /// Most query parameters in one request; more gets 400.
    #[arg(long, env = "KOMMO_FANOUT_MAX_QUERY_PARAMS", default_value_t = 1000)]
    pub max_query_params: usize,
    /// Most client requests served at once; more get 503 with Retry-After (load shedding).
    #[arg(
        long,
        env = "KOMMO_FANOUT_MAX_CONCURRENT_REQUESTS",
        default_value_t = 1024
    )]
    pub max_concurrent_requests: usize,
    /// How long a client may take to send its request headers before the connection is closed.
    #[arg(long, env = "KOMMO_FANOUT_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Most client connections open at once; past it the proxy accepts the next one only when
    /// another closes (each holds a file descriptor).
    #[arg(long, env = "KOMMO_FANOUT_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// How long requests in flight may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "KOMMO_FANOUT_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Threads of the runtime that serves everything (default: one per CPU). Fewer leave CPUs
    /// to what shares the machine.
    #[arg(long, env = "KOMMO_FANOUT_WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

/// Flags of `verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The Kommo account origin, e.g. https://example.kommo.com.
    #[arg(long, env = "KOMMO_FANOUT_UPSTREAM")]
    pub upstream: String,
    /// A file holding the account's bearer token (surrounding whitespace ignored).
    #[arg(long, env = "KOMMO_FANOUT_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// The most upstream requests the run sends, the in-process proxy's included.
    #[arg(long, default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(crate::verify::MIN_REQUESTS..))]
    pub max_requests: u64,
    /// Print the report as one JSON document.
    #[arg(long)]
    pub json: bool,
    /// Save the upstream answers read directly, redacted, as fixtures in this directory.
    #[arg(long)]
    pub record: Option<PathBuf>,
}

/// Where replicas meet.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
    pub prefix: String,
    /// Replicas deployed: the local fallback budget is the limit divided by this.
    pub replicas: u32,
}

/// The validated configuration of the proxy.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub upstream: UpstreamConfig,
    pub gateway: GatewaySettings,
    pub limiter: LimiterConfig,
    pub cache: CacheConfig,
    /// The secret of the webhook endpoint; `None` turns it off.
    pub webhook_secret: Option<String>,
    /// The token of `--admin-token-file` (only its hash); `None`: the console is open.
    pub admin_token: Option<crate::console::AdminToken>,
    /// Replicas share the limiter and the cache through this Redis.
    pub redis: Option<RedisSettings>,
    pub fetch: FetchPolicy,
    pub shutdown_grace: Duration,
    /// The lock file this process takes its turn through (see [`crate::upstream::handover`]);
    /// `None`: `--limiter-lock-dir off`.
    pub limiter_lock: Option<PathBuf>,
    /// The runtime's worker threads; `None`: one per CPU.
    pub worker_threads: Option<usize>,
    /// Live views; `None`: `--sync` is off.
    pub sync: Option<crate::sync::live::SyncSettings>,
    /// The account's credential and the keys that reach it; `None`: clients bring their own
    /// Kommo tokens.
    pub holding: Option<crate::credentials::Holding>,
    /// The `[accounts.NAME]` of the config file; empty: one account, `--upstream`, no prefix.
    pub accounts: Vec<AccountConfig>,
}

impl ServeArgs {
    /// Checks every value and the rules across them; the error names the flag.
    pub fn validate(self) -> Result<ServeConfig, String> {
        if self.sendfile_min_bytes.is_some() {
            tracing::warn!(
                "--sendfile-min-bytes (sendfile_min_bytes) has no effect any more and will be \
                 removed in the next release: remove it from the command line or config file"
            );
        }
        let accounts = match &self.config {
            Some(path) => accounts_in(path, self.rate_limit)?,
            None => Vec::new(),
        };
        let origin = match (accounts.first(), self.upstream.as_deref()) {
            (None, None) => return Err(
                "--upstream is required: give it as a flag, as KOMMO_FANOUT_UPSTREAM, or as `upstream` in the --config file (or declare [accounts.NAME] tables there)".into(),
            ),
            (None, Some(upstream)) => {
                Origin::parse(upstream).map_err(|e| format!("--upstream: {e}"))?
            }
            (Some(_), Some(_)) => return Err(
                "--upstream and [accounts.NAME] tables are two ways to name the upstream: give one (each account sets its own `upstream`)".into(),
            ),
            (Some(first), None) => first.origin.clone(),
        };
        let holding = if accounts.is_empty() {
            self.credentials.validate()?
        } else {
            check_account_flags(&self.credentials, &accounts)?;
            None
        };
        let public_url = match self.public_url.as_deref().map(Origin::parse) {
            Some(Ok(origin)) => Some(Arc::from(origin.url)),
            Some(Err(e)) => return Err(format!("--public-url: {e}")),
            None => None,
        };
        if self.upstream_timeout.is_zero() {
            return Err("--upstream-timeout must be more than zero".into());
        }
        if self.max_upstream_body < 1024 {
            return Err("--max-upstream-body must be at least 1024 bytes".into());
        }
        let limiter = LimiterConfig {
            requests: self.rate_limit,
            window: self.rate_window,
            margin: self.rate_margin,
        };
        limiter
            .validate()
            .map_err(|e| format!("--rate-limit/--rate-window: {e}"))?;
        if self.request_timeout.is_zero() {
            return Err("--request-timeout must be more than zero".into());
        }
        if self.cache_max_bytes < 64 * 1024 && !self.cache_ttl.is_zero() {
            return Err(
                "--cache-max-bytes must be at least 65536 (or turn caching off with --cache-ttl 0)"
                    .into(),
            );
        }
        if let Some(secret) = &self.webhook_secret {
            if secret.len() < 16 || !secret.chars().all(|c| c.is_ascii_graphic()) {
                return Err(
                    "--webhook-secret must be at least 16 printable characters without spaces"
                        .into(),
                );
            }
        }
        for (value, flag, least) in [
            (self.max_uri_len, "--max-uri-len", 1024),
            (self.max_header_bytes, "--max-header-bytes", 4096),
            (self.max_query_params, "--max-query-params", 16),
            (self.max_concurrent_requests, "--max-concurrent-requests", 1),
            (self.max_connections, "--max-connections", 1),
        ] {
            if value < least {
                return Err(format!("{flag} must be at least {least}"));
            }
        }
        if let Some(url) = &self.redis {
            let schemes = ["redis://", "rediss://", "redis+unix://", "unix://"];
            if !schemes.iter().any(|s| url.starts_with(s)) {
                return Err("--redis must be a redis:// or rediss:// URL".into());
            }
            if self.replicas > self.rate_limit {
                return Err(format!(
                    "--replicas {} is more than --rate-limit {}: the fallback of one request per window each would exceed the limit",
                    self.replicas, self.rate_limit
                ));
            }
        }
        if self.header_read_timeout.is_zero() {
            return Err("--header-read-timeout must be more than zero".into());
        }
        if self.listen == self.admin_listen && self.listen.port() != 0 {
            return Err(format!(
                "--listen and --admin-listen are both {}: the admin endpoints need their own address",
                self.listen
            ));
        }
        let default_dir = || std::env::temp_dir().join("kommo-fanout");
        let lock_dir = self.limiter_lock_dir.unwrap_or_else(default_dir);
        if let (Some(_), Some(a)) = (
            &self.redis,
            accounts.iter().find(|a| a.rate_limit < self.replicas),
        ) {
            return Err(format!(
                "--replicas {} is more than the `rate_limit` {} of [accounts.{}]: the fallback of one request per window each would exceed it",
                self.replicas, a.rate_limit, a.name
            ));
        }
        let lock = |origin: &Origin| {
            (lock_dir.as_os_str() != "off").then(|| lock_path(&lock_dir, &origin.url))
        };
        let limiter_lock = lock(&origin);
        let accounts = accounts
            .into_iter()
            .map(|a| AccountConfig {
                limiter_lock: lock(&a.origin),
                holding: a.holding.map(|h| crate::credentials::Holding {
                    keys_file: self.credentials.keys_file.clone().unwrap_or_default(),
                    ..h
                }),
                ..a
            })
            .collect();
        Ok(ServeConfig {
            listen: self.listen,
            admin_listen: self.admin_listen,
            upstream: UpstreamConfig {
                origin,
                timeout: self.upstream_timeout,
                max_body: self.max_upstream_body,
            },
            gateway: GatewaySettings {
                public_url,
                max_pairs: usize::from(self.max_pairs),
                max_upstream_per_request: self.max_upstream_per_request,
                rate_limit_key: self.rate_limit_key,
                request_timeout: self.request_timeout,
                client_rate_limit: self.client_rate_limit,
                trust_forwarded: self.trust_forwarded,
                bounds: Bounds {
                    max_uri_len: self.max_uri_len,
                    max_header_bytes: self.max_header_bytes,
                    max_body_bytes: self.max_body_bytes,
                    max_query_params: self.max_query_params,
                    max_concurrent: self.max_concurrent_requests,
                    header_read_timeout: self.header_read_timeout,
                    max_connections: self.max_connections,
                },
            },
            limiter,
            cache: CacheConfig {
                ttl: self.cache_ttl,
                max_bytes: self.cache_max_bytes,
                stale_while_revalidate: self.stale_while_revalidate,
                passthrough: self.cache_passthrough,
            },
            webhook_secret: self.webhook_secret,
            admin_token: self
                .admin_token_file
                .as_deref()
                .map(crate::console::AdminToken::read)
                .transpose()?,
            redis: self.redis.map(|url| RedisSettings {
                url,
                prefix: self.redis_prefix,
                replicas: self.replicas,
            }),
            fetch: FetchPolicy {
                retries: self.retries,
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(2),
                block_cooldown: self.block_cooldown,
                default_retry_after: self.rate_window.max(Duration::from_secs(1)),
                max_wait: self.max_wait,
            },
            shutdown_grace: self.shutdown_grace,
            limiter_lock,
            worker_threads: self.worker_threads.map(usize::from),
            sync: self.sync.validate()?,
            holding,
            accounts,
        })
    }
}

/// Parses the command line `C`, whose `serve` subcommand holds [`ServeArgs`] (the binary
/// composes it); for `serve`, merges the `--config` file under the flags and environment
/// variables. `clap::Error::exit` prints help and version (exit 0) or the error (exit 2).
pub fn parse_args<C: Parser>(mut args: Vec<OsString>) -> Result<C, clap::Error> {
    let mut command = C::command();
    let matches = command.try_get_matches_from_mut(&args)?;
    let Some(("serve", serve)) = matches.subcommand() else {
        return C::from_arg_matches(&matches);
    };
    let Some(path) = serve.get_one::<PathBuf>("config") else {
        return C::from_arg_matches(&matches);
    };
    let extra = file_args(path, serve)
        .map_err(|e| command.error(clap::error::ErrorKind::ValueValidation, e))?;
    args.extend(extra);
    C::try_parse_from(&args)
}

/// The flags the config file supplies: only those neither the command line nor the
/// environment set. Every key is checked: unknown keys and invalid values are errors naming the
/// key.
fn file_args(path: &Path, given: &ArgMatches) -> Result<Vec<OsString>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--config {}: cannot read it: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("--config {}: not valid TOML: {e}", path.display()))?;
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut out = Vec::new();
    for (key, value) in table {
        // Parsed on its own, by `validate` (see [`accounts_in`]).
        if key == "accounts" {
            continue;
        }
        let id = key.replace('-', "_");
        let bad = |why: String| format!("--config {}: key `{key}`: {why}", path.display());
        let mut flags = command.get_arguments();
        let Some(arg) = flags.find(|a| a.get_id() == id.as_str() && id != "config") else {
            let known = "the keys are the flags of `serve`, e.g. rate_limit, cache_ttl";
            return Err(bad(format!("unknown key ({known})")));
        };
        let flag = format!("--{}", arg.get_long().unwrap_or(&id));
        let args = match value {
            toml::Value::String(s) => vec![flag, s],
            toml::Value::Integer(i) => vec![flag, i.to_string()],
            toml::Value::Float(f) => vec![flag, f.to_string()],
            toml::Value::Boolean(_) if !matches!(arg.get_action(), clap::ArgAction::SetTrue) => {
                return Err(bad("expected a value, not true/false".into()));
            }
            toml::Value::Boolean(on) => on.then_some(flag).into_iter().collect(),
            other => {
                return Err(bad(format!(
                    "expected a string, number or boolean, got {}",
                    other.type_str()
                )))
            }
        };
        let args: Vec<String> = args.into_iter().filter(|a| !a.is_empty()).collect();
        // Each value is checked on its own, so the error names the key.
        let probe = std::iter::once("serve".to_string()).chain(args.iter().cloned());
        if let Err(e) = command.clone().try_get_matches_from(probe) {
            let first = e.render().to_string();
            let first = first.lines().next().unwrap_or("invalid value");
            return Err(bad(first.trim_start_matches("error: ").to_string()));
        }
        let source = given.value_source(&id);
        if !matches!(
            source,
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            out.extend(args.into_iter().map(OsString::from));
        }
    }
    Ok(out)
}

/// One account of the config file, validated.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// The name in `[accounts.NAME]`: the path prefix `/NAME`, the `account` metrics label,
    /// and the account keys are made for.
    pub name: String,
    pub origin: Origin,
    /// Requests with this `Host` (lowercase, no port) reach the account without a prefix.
    pub host: Option<String>,
    /// The account's own budget per window (`rate_limit`, default `--rate-limit`).
    pub rate_limit: u32,
    /// The account's credential; `None`: its clients bring their own Kommo tokens.
    pub holding: Option<crate::credentials::Holding>,
    /// The account's lock file (see [`crate::upstream::handover`]); `None`: turned off.
    pub limiter_lock: Option<PathBuf>,
}

/// An `[accounts.NAME]` table as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountFile {
    upstream: String,
    token_file: Option<PathBuf>,
    oauth: Option<OAuthFile>,
    #[serde(default)]
    allow_client_tokens: bool,
    host: Option<String>,
    rate_limit: Option<u32>,
}

/// An account's `oauth = { ... }`, as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OAuthFile {
    client_id: String,
    client_secret_file: PathBuf,
    redirect_uri: String,
    #[serde(alias = "refresh_token_file")]
    tokens_file: PathBuf,
}

/// The `[accounts.NAME]` tables of the config file at `path`, each checked; an error names the
/// account and the key. `rate_limit` is the default budget of an account.
fn accounts_in(path: &Path, rate_limit: u32) -> Result<Vec<AccountConfig>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--config {}: cannot read it: {e}", path.display()))?;
    parse_accounts(&text, rate_limit).map_err(|e| format!("--config {}: {e}", path.display()))
}

/// The account `name` of the config file at `path` (for `oauth exchange --account`).
pub fn account_in(path: &Path, name: &str) -> Result<AccountConfig, String> {
    let accounts = accounts_in(path, 1)?;
    let names: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
    let missing = format!(
        "--config {} has no [accounts.{name}] (it has: {})",
        path.display(),
        names.join(", ")
    );
    accounts.into_iter().find(|a| a.name == name).ok_or(missing)
}

/// The accounts of a config file's text (see [`accounts_in`]).
fn parse_accounts(text: &str, rate_limit: u32) -> Result<Vec<AccountConfig>, String> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        accounts: toml::Table,
    }
    let file: File = toml::from_str(text).map_err(|e| format!("not valid TOML: {e}"))?;
    let mut out: Vec<AccountConfig> = Vec::new();
    for (name, value) in file.accounts {
        let bad = |why: String| format!("[accounts.{name}]: {why}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
        {
            return Err(bad(
                "an account name is lowercase letters, digits, `_` and `-`".into(),
            ));
        }
        let table: AccountFile = value
            .try_into()
            .map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
        let origin = Origin::parse(&table.upstream).map_err(|e| bad(format!("`upstream`: {e}")))?;
        let host = match table.host {
            Some(h) if valid_host(&h) => Some(host_name(&h)),
            Some(_) => {
                return Err(bad(
                    "`host`: expected a host name, e.g. acme.example.internal".into(),
                ))
            }
            None => None,
        };
        let rate_limit = table.rate_limit.unwrap_or(rate_limit);
        if !(1..=10_000).contains(&rate_limit) {
            return Err(bad(
                "`rate_limit`: expected 1 to 10000 requests per window".into()
            ));
        }
        let oauth = table.oauth.map(|o| OAuthArgs {
            oauth_client_id: Some(o.client_id),
            oauth_client_secret_file: Some(o.client_secret_file),
            oauth_redirect_uri: Some(o.redirect_uri),
            oauth_tokens_file: Some(o.tokens_file),
        });
        let oauth = oauth
            .map(|o| o.validate())
            .transpose()
            .map_err(|e| bad(format!("`oauth`: {e}")))?
            .flatten();
        let source = match (table.token_file, oauth) {
            (Some(_), Some(_)) => return Err(bad("`token_file` and `oauth` are two ways to give the account's credential: give one".into())),
            (Some(path), None) => Some(CredentialSource::TokenFile(path)),
            (None, Some(oauth)) => Some(CredentialSource::OAuth(oauth)),
            (None, None) if table.allow_client_tokens => return Err(bad("`allow_client_tokens` needs the account's credential: give `token_file` or `oauth`".into())),
            (None, None) => None,
        };
        for other in &out {
            if other.origin.url.eq_ignore_ascii_case(&origin.url) {
                return Err(bad(format!("`upstream` {} is also the upstream of [accounts.{}]: one Kommo account has one budget, so declare it once", origin.url, other.name)));
            }
            if host.is_some() && other.host == host {
                return Err(bad(format!(
                    "`host` is also the host of [accounts.{}]",
                    other.name
                )));
            }
        }
        out.push(AccountConfig {
            holding: source.map(|source| crate::credentials::Holding {
                account: name.clone(),
                source,
                keys_file: PathBuf::new(),
                allow_client_tokens: table.allow_client_tokens,
            }),
            name,
            origin,
            host,
            rate_limit,
            limiter_lock: None,
        });
    }
    Ok(out)
}

/// With accounts, the one-account credential flags have no account to belong to, and
/// `--keys-file` is required when any account holds its credential.
fn check_account_flags(
    flags: &crate::credentials::CredentialArgs,
    accounts: &[AccountConfig],
) -> Result<(), String> {
    if flags.token_file.is_some() || flags.oauth.validate()?.is_some() || flags.allow_client_tokens
    {
        return Err("--token-file, --oauth-* and --allow-client-tokens are for one account: with [accounts.NAME] tables, set `token_file`, `oauth` and `allow_client_tokens` in each".into());
    }
    match accounts.iter().find(|a| a.holding.is_some()) {
        Some(a) if flags.keys_file.is_none() => Err(format!(
            "[accounts.{}] holds its credential: --keys-file (`keys_file`) is required, clients send keys made by `kommo-fanout keys add --account {}`",
            a.name, a.name
        )),
        _ => Ok(()),
    }
}

impl ServeConfig {
    /// The configuration of one of its accounts: its origin, budget, lock file, credential,
    /// and its own Redis key prefix (accounts share no budget, cache or fingerprint key).
    pub fn for_account(&self, account: &AccountConfig) -> ServeConfig {
        let mut config = self.clone();
        config.upstream.origin = account.origin.clone();
        config.limiter.requests = account.rate_limit;
        config.limiter_lock = account.limiter_lock.clone();
        config.holding = account.holding.clone();
        config.accounts = Vec::new();
        if let Some(redis) = &mut config.redis {
            redis.prefix = format!("{}{}:", redis.prefix, account.name);
        }
        config
    }

    /// The effective configuration, one `key = value` line each, secrets withheld.
    pub fn describe(&self) -> String {
        let (g, c, f) = (&self.gateway, &self.cache, &self.fetch);
        let b = &g.bounds;
        let q = |s: &dyn std::fmt::Display| format!("\"{s}\"");
        let d = |d: Duration| q(&humantime::format_duration(d));
        let set = |on: bool| q(&if on { "(set)" } else { "(off)" });
        let public_url = g.public_url.as_deref().unwrap_or("(from Host)");
        let lock = self.limiter_lock.as_ref().map(|p| p.display().to_string());
        let key = format!("{:?}", g.rate_limit_key).to_lowercase();
        let client_rate = g.client_rate_limit.map(|n| n.to_string());
        let replicas = self.redis.as_ref().map_or(1, |r| r.replicas);
        let threads = self.worker_threads.map(|n| n.to_string());
        let held = self.holding.as_ref().map(|h| {
            let source = match h.source {
                crate::credentials::CredentialSource::TokenFile(_) => "token file",
                crate::credentials::CredentialSource::OAuth(_) => "OAuth",
            };
            (source, h.keys_file.display().to_string())
        });
        let upstream = match self.accounts.is_empty() {
            true => self.upstream.origin.url.as_str(),
            false => "(per account)",
        };
        let mut lines = vec![
            ("upstream", q(&upstream)),
            ("listen", q(&self.listen)),
            ("admin_listen", q(&self.admin_listen)),
            ("public_url", q(&public_url)),
            ("max_pairs", g.max_pairs.to_string()),
            (
                "max_upstream_per_request",
                g.max_upstream_per_request.to_string(),
            ),
            ("rate_limit", self.limiter.requests.to_string()),
            ("rate_window", d(self.limiter.window)),
            ("rate_margin", d(self.limiter.margin)),
            ("limiter_lock", lock.unwrap_or("off".into())),
            ("rate_limit_key", q(&key)),
            ("max_wait", d(f.max_wait)),
            ("retries", f.retries.to_string()),
            ("block_cooldown", d(f.block_cooldown)),
            ("upstream_timeout", d(self.upstream.timeout)),
            ("request_timeout", d(g.request_timeout)),
            ("client_rate_limit", client_rate.unwrap_or("0 (off)".into())),
            ("max_upstream_body", self.upstream.max_body.to_string()),
            ("cache_ttl", d(c.ttl)),
            ("cache_max_bytes", c.max_bytes.to_string()),
            ("stale_while_revalidate", d(c.stale_while_revalidate)),
            ("cache_passthrough", c.passthrough.to_string()),
            ("sync", self.sync.is_some().to_string()),
            (
                "credential",
                q(&held.as_ref().map_or("(the clients' own)", |h| h.0)),
            ),
            (
                "keys_file",
                q(&held.as_ref().map_or("(off)".into(), |h| h.1.clone())),
            ),
            ("webhook_secret", set(self.webhook_secret.is_some())),
            ("admin_token", set(self.admin_token.is_some())),
            ("trust_forwarded", g.trust_forwarded.to_string()),
            ("max_uri_len", b.max_uri_len.to_string()),
            ("max_header_bytes", b.max_header_bytes.to_string()),
            ("max_body_bytes", b.max_body_bytes.to_string()),
            ("max_query_params", b.max_query_params.to_string()),
            ("max_concurrent_requests", b.max_concurrent.to_string()),
            ("header_read_timeout", d(b.header_read_timeout)),
            ("max_connections", b.max_connections.to_string()),
            ("redis", set(self.redis.is_some())),
            ("replicas", replicas.to_string()),
            ("shutdown_grace", d(self.shutdown_grace)),
            ("worker_threads", threads.unwrap_or(q(&"(one per CPU)"))),
        ];
        if let Some(sync) = &self.sync {
            lines.extend([
                ("sync_interval", d(sync.interval)),
                ("sync_max_staleness", d(sync.max_staleness)),
                ("sync_with", format!("{:?}", sync.with.join(","))),
                ("sync_max_bytes", sync.max_bytes.to_string()),
                ("sync_idle", d(sync.idle)),
                ("sync_reconcile", d(sync.reconcile)),
            ]);
        }
        let mut out: String = lines.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        for a in &self.accounts {
            let credential = match a.holding.as_ref().map(|h| &h.source) {
                Some(CredentialSource::TokenFile(_)) => "token file",
                Some(CredentialSource::OAuth(_)) => "OAuth",
                None => "(the clients' own)",
            };
            let route = match &a.host {
                Some(host) => format!("Host {host}, or /{}", a.name),
                None => format!("/{}", a.name),
            };
            let allow = a.holding.as_ref().is_some_and(|h| h.allow_client_tokens);
            for (k, v) in [
                ("upstream", q(&a.origin.url)),
                ("route", q(&route)),
                ("rate_limit", a.rate_limit.to_string()),
                ("credential", q(&credential)),
                ("allow_client_tokens", allow.to_string()),
            ] {
                out.push_str(&format!("accounts.{}.{k} = {v}\n", a.name));
            }
        }
        out
    }

    /// A configuration for `upstream` with every other value at its default: for tests and
    /// embedding.
    pub fn for_upstream(upstream: &str) -> Result<ServeConfig, String> {
        let matches = ServeArgs::augment_args(clap::Command::new("serve"))
            .try_get_matches_from(["serve", "--upstream", upstream])
            .map_err(|e| e.to_string())?;
        ServeArgs::from_arg_matches(&matches)
            .map_err(|e| e.to_string())?
            .validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Subcommand;

    /// A command line like the binary's: `serve` beside another subcommand.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Debug, Subcommand)]
    enum Command {
        Serve(Box<ServeArgs>),
        Verify(VerifyArgs),
    }

    fn serve(args: &[&str]) -> Result<ServeConfig, String> {
        let mut argv = vec!["kommo-fanout", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Serve(a) => a.validate(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults() {
        let c = serve(&["--upstream", "https://a.kommo.com"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.gateway.max_pairs, 100);
        assert_eq!(c.gateway.max_upstream_per_request, 200);
        assert_eq!(c.upstream.timeout, Duration::from_secs(15));
        assert_eq!(c.upstream.origin.url, "https://a.kommo.com");
        assert_eq!(
            (c.limiter.requests, c.limiter.window),
            (7, Duration::from_secs(1))
        );
        assert_eq!(c.fetch.retries, 2);
        assert_eq!(c.fetch.max_wait, Duration::from_secs(30));
        assert_eq!(c.fetch.block_cooldown, Duration::from_secs(60));
        assert_eq!(c.gateway.request_timeout, Duration::from_secs(60));
        assert_eq!(c.gateway.rate_limit_key, RateLimitKey::Origin);
        assert_eq!(c.cache.ttl, Duration::from_secs(30));
        assert_eq!(c.cache.max_bytes, 256 * 1024 * 1024);
        assert!(!c.cache.passthrough && c.webhook_secret.is_none());
    }

    fn file(text: &str) -> tempfile_path::TempFile {
        tempfile_path::TempFile::new(text)
    }

    /// A file removed when dropped (no crate needed for one test helper).
    mod tempfile_path {
        pub struct TempFile(pub std::path::PathBuf);
        impl TempFile {
            pub fn new(text: &str) -> TempFile {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir()
                    .join(format!("kommo-fanout-test-{}-{n}.toml", std::process::id()));
                std::fs::write(&path, text).unwrap();
                TempFile(path)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn from_args(args: &[&str]) -> Result<ServeConfig, String> {
        let mut argv: Vec<OsString> = vec!["kommo-fanout".into(), "serve".into()];
        argv.extend(args.iter().map(OsString::from));
        match parse_args::<Cli>(argv).map_err(|e| e.to_string())?.command {
            Command::Serve(a) => a.validate(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_config_file_fills_what_flags_do_not_set() {
        let f = file("upstream = \"https://file.kommo.com\"\nrate_limit = 5\ncache-ttl = \"1m\"\ncache_passthrough = true\nmax_pairs = 12\n");
        let path = f.0.to_str().unwrap();
        let c = from_args(&["--config", path]).unwrap();
        assert_eq!(c.upstream.origin.url, "https://file.kommo.com");
        assert_eq!(c.limiter.requests, 5);
        assert_eq!(c.cache.ttl, Duration::from_secs(60));
        assert!(c.cache.passthrough);
        // A flag wins over the file.
        let c = from_args(&[
            "--config",
            path,
            "--rate-limit",
            "3",
            "--upstream",
            "http://127.0.0.1:1",
        ])
        .unwrap();
        assert_eq!(c.limiter.requests, 3);
        assert_eq!(c.upstream.origin.url, "http://127.0.0.1:1");
        assert_eq!(c.gateway.max_pairs, 12);
    }

    #[test]
    fn the_config_file_rejects_unknown_keys_and_bad_values_by_name() {
        for (text, needle) in [
            (
                "upstream = \"http://x\"\nrate_limt = 5\n",
                "`rate_limt`: unknown key",
            ),
            (
                "upstream = \"http://x\"\ncache_ttl = \"soon\"\n",
                "`cache_ttl`",
            ),
            ("upstream = \"http://x\"\nrate_limit = 0\n", "`rate_limit`"),
            ("upstream = \"http://x\"\nretries = [1]\n", "`retries`"),
            (
                "upstream = \"http://x\"\nrate_limit = true\n",
                "`rate_limit`",
            ),
            (
                "upstream = \"http://x\"\nconfig = \"other.toml\"\n",
                "`config`",
            ),
            ("this is not toml", "not valid TOML"),
        ] {
            let f = file(text);
            let err = from_args(&["--config", f.0.to_str().unwrap()]).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        let err = from_args(&["--config", "/nonexistent/kommo.toml"]).unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn accounts_are_parsed_with_their_defaults() {
        let dir = std::env::temp_dir();
        let secret = file("s3cret\n");
        let text = format!(
            "keys_file = \"{keys}\"\nrate_limit = 5\n\
             [accounts.acme]\nupstream = \"https://acme.kommo.com\"\ntoken_file = \"/run/acme.token\"\n\
             host = \"Acme.Example.Internal:8443\"\nallow_client_tokens = true\n\
             [accounts.beta-2]\nupstream = \"http://127.0.0.1:1\"\nrate_limit = 3\n\
             oauth = {{ client_id = \"id\", client_secret_file = \"{secret}\", redirect_uri = \"https://r\", refresh_token_file = \"/var/lib/b.json\" }}\n\
             [accounts.own]\nupstream = \"https://own.kommo.com\"\n",
            keys = dir.join("keys.toml").display(),
            secret = secret.0.display(),
        );
        let f = file(&text);
        let c = from_args(&["--config", f.0.to_str().unwrap()]).unwrap();
        let names: Vec<&str> = c.accounts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["acme", "beta-2", "own"]);
        let (acme, beta, own) = (&c.accounts[0], &c.accounts[1], &c.accounts[2]);
        assert_eq!(acme.host.as_deref(), Some("acme.example.internal"));
        assert_eq!((acme.rate_limit, beta.rate_limit), (5, 3));
        let held = acme.holding.as_ref().unwrap();
        assert!(held.allow_client_tokens && held.account == "acme");
        assert_eq!(held.keys_file, dir.join("keys.toml"));
        match &beta.holding.as_ref().unwrap().source {
            CredentialSource::OAuth(o) => {
                assert_eq!(o.tokens_file, PathBuf::from("/var/lib/b.json"));
                assert_eq!(o.client_secret, "s3cret");
            }
            CredentialSource::TokenFile(_) => panic!("oauth expected"),
        }
        assert!(own.holding.is_none());
        assert_ne!(acme.limiter_lock, beta.limiter_lock);
        let described = c.describe();
        assert!(
            described.contains("accounts.beta-2.credential = \"OAuth\""),
            "{described}"
        );
        assert!(
            described.contains("upstream = \"(per account)\""),
            "{described}"
        );
        assert!(!described.contains("s3cret"));
        let one = c.for_account(beta);
        assert_eq!(one.upstream.origin.url, "http://127.0.0.1:1");
        assert_eq!(one.limiter.requests, 3);
        assert!(one.accounts.is_empty());
        let with_redis = from_args(&["--config", f.0.to_str().unwrap(), "--redis", "redis://r"]);
        let one = with_redis.unwrap().for_account(beta);
        assert_eq!(one.redis.unwrap().prefix, "kommo-fanout:beta-2:");
    }

    #[test]
    fn account_errors_name_the_account_and_the_key() {
        let acme = "[accounts.acme]\nupstream = \"https://acme.kommo.com\"\n";
        for (text, needle) in [
            (format!("{acme}rate_limt = 5\n"), "[accounts.acme]: unknown field `rate_limt`"),
            ("[accounts.acme]\ntoken_file = \"/t\"\n".into(), "[accounts.acme]: missing field `upstream`"),
            ("[accounts.Acme]\nupstream = \"http://x\"\n".into(), "[accounts.Acme]: an account name"),
            (format!("{acme}upstream = \"x\"\n"), "duplicate key"),
            ("[accounts.a]\nupstream = \"acme.kommo.com\"\n".into(), "[accounts.a]: `upstream`"),
            (format!("{acme}rate_limit = 0\n"), "[accounts.acme]: `rate_limit`"),
            (format!("{acme}host = \"a b\"\n"), "[accounts.acme]: `host`"),
            (format!("{acme}allow_client_tokens = true\n"), "`allow_client_tokens` needs"),
            (format!("{acme}token_file = \"/t\"\n"), "--keys-file (`keys_file`) is required"),
            (format!("{acme}oauth = {{ client_id = \"i\" }}\n"), "[accounts.acme]: missing field"),
            (format!("{acme}[accounts.b]\nupstream = \"https://ACME.kommo.com\"\n"), "[accounts.b]: `upstream` https://ACME.kommo.com is also the upstream of [accounts.acme]"),
            (format!("upstream = \"http://x\"\n{acme}"), "--upstream and [accounts.NAME]"),
            (format!("token_file = \"/t\"\n{acme}"), "are for one account"),
        ] {
            let f = file(&text);
            let err = from_args(&["--config", f.0.to_str().unwrap()]).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(serve(&["--upstream", "a.kommo.com"])
            .unwrap_err()
            .contains("--upstream"));
        assert!(serve(&["--upstream", "http://x", "--public-url", "/p"])
            .unwrap_err()
            .contains("--public-url"));
        assert!(serve(&["--upstream", "http://x", "--max-pairs", "0"]).is_err());
        assert!(serve(&["--upstream", "http://x", "--max-upstream-per-request", "0"]).is_err());
        assert!(
            serve(&["--upstream", "http://x", "--upstream-timeout", "soon"])
                .unwrap_err()
                .contains("upstream-timeout")
        );
        assert!(serve(&[
            "--upstream",
            "http://x",
            "--listen",
            "127.0.0.1:1",
            "--admin-listen",
            "127.0.0.1:1"
        ])
        .is_err());
        assert!(serve(&["--upstream", "http://x", "--rate-limit", "0"]).is_err());
        assert!(serve(&["--upstream", "http://x", "--max-connections", "0"])
            .unwrap_err()
            .contains("--max-connections"));
        assert!(serve(&["--upstream", "http://x", "--rate-window", "0s"])
            .unwrap_err()
            .contains("rate"));
        assert!(serve(&["--upstream", "http://x", "--rate-limit-key", "ip"]).is_err());
        assert!(
            serve(&["--upstream", "http://x", "--webhook-secret", "short"])
                .unwrap_err()
                .contains("--webhook-secret")
        );
        assert!(
            serve(&["--upstream", "http://x", "--cache-max-bytes", "10"])
                .unwrap_err()
                .contains("--cache-max-bytes")
        );
        assert!(serve(&[
            "--upstream",
            "http://x",
            "--cache-max-bytes",
            "10",
            "--cache-ttl",
            "0s"
        ])
        .is_ok());
        assert!(serve(&[]).is_err());
    }
}
