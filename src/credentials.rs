//! The account's own credential, held by the proxy: a long-lived token read from a file, or
//! OAuth tokens refreshed before they expire.
//!
//! Requests the proxy authorizes for a client (a key, see [`crate::keys`]) carry
//! [`PLACEHOLDER`] as their `Authorization` through the whole request path, so cache keys,
//! replicas and logs never see the account's token; the fetcher puts the token in at the last
//! moment. Kommo's refresh tokens are single-use (`kommo-api-notes.md`, "OAuth"): one refresh
//! runs at a time, and the rotated refresh token is on disk before the new access token is
//! used, so neither a race nor a crash can burn it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::body;
use crate::upstream::fetch::{Fetcher, Flow};

/// The `Authorization` of a request the proxy authorizes with the account's own credential.
pub const PLACEHOLDER: HeaderValue = HeaderValue::from_static("Bearer kommo-fanout:account");

/// Where the token endpoint is, on the account's origin.
pub const TOKEN_PATH: &str = "/oauth2/access_token";

/// The longest an access token is used before its expiry: a fifth of its life, at most this.
const MAX_MARGIN: Duration = Duration::from_secs(300);

/// The flags of the account's credential and the clients' keys (part of `serve`'s).
#[derive(Debug, Clone, clap::Args)]
pub struct CredentialArgs {
    /// The account's name: keys made with `keys add --account NAME` reach it.
    #[arg(long, env = "KOMMO_FANOUT_ACCOUNT", default_value = "default")]
    pub account: String,
    /// A file holding the account's long-lived token (read again when it changes); clients
    /// then send keys (--keys-file), not tokens.
    #[arg(long, env = "KOMMO_FANOUT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    #[command(flatten)]
    pub oauth: OAuthArgs,
    /// The keys clients send instead of a Kommo token (`kommo-fanout keys add`); read again
    /// when it changes. Required with --token-file or --oauth-tokens-file.
    #[arg(long, env = "KOMMO_FANOUT_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,
    /// Also pass requests that carry a client's own Kommo token, as they came.
    #[arg(long, env = "KOMMO_FANOUT_ALLOW_CLIENT_TOKENS")]
    pub allow_client_tokens: bool,
}

/// The OAuth integration's flags, of `serve` and of `oauth exchange`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OAuthArgs {
    /// The integration's ID (Kommo: Settings > Integrations > Keys and scopes).
    #[arg(long, env = "KOMMO_FANOUT_OAUTH_CLIENT_ID")]
    pub oauth_client_id: Option<String>,
    /// A file holding the integration's secret key.
    #[arg(long, env = "KOMMO_FANOUT_OAUTH_CLIENT_SECRET_FILE")]
    pub oauth_client_secret_file: Option<PathBuf>,
    /// The integration's redirect URI, exactly as registered in Kommo.
    #[arg(long, env = "KOMMO_FANOUT_OAUTH_REDIRECT_URI")]
    pub oauth_redirect_uri: Option<String>,
    /// Where the OAuth tokens are kept (`oauth exchange` writes it; each refresh replaces it
    /// before the new token is used). Owner-only.
    #[arg(long, env = "KOMMO_FANOUT_OAUTH_TOKENS_FILE")]
    pub oauth_tokens_file: Option<PathBuf>,
}

impl OAuthArgs {
    /// The settings, when any `--oauth-*` flag is given; the error names the missing flag.
    pub fn validate(&self) -> Result<Option<OAuthSettings>, String> {
        let given = self.oauth_client_id.is_some()
            || self.oauth_client_secret_file.is_some()
            || self.oauth_redirect_uri.is_some()
            || self.oauth_tokens_file.is_some();
        if !given {
            return Ok(None);
        }
        let need = |flag: &str| format!("--{flag} is required with the other --oauth-* flags");
        let client_id = self
            .oauth_client_id
            .clone()
            .ok_or(need("oauth-client-id"))?;
        let secret_file =
            (self.oauth_client_secret_file.as_ref()).ok_or(need("oauth-client-secret-file"))?;
        let redirect_uri = (self.oauth_redirect_uri.clone()).ok_or(need("oauth-redirect-uri"))?;
        let tokens_file = (self.oauth_tokens_file.clone()).ok_or(need("oauth-tokens-file"))?;
        let secret = std::fs::read_to_string(secret_file)
            .map_err(|e| format!("--oauth-client-secret-file {}: {e}", secret_file.display()))?;
        let client_secret = secret.trim().to_string();
        if client_secret.is_empty() {
            return Err(format!(
                "--oauth-client-secret-file {} is empty",
                secret_file.display()
            ));
        }
        Ok(Some(OAuthSettings {
            client_id,
            client_secret,
            redirect_uri,
            tokens_file,
        }))
    }
}

/// Where the account's credential comes from.
#[derive(Debug, Clone)]
pub enum CredentialSource {
    TokenFile(PathBuf),
    OAuth(OAuthSettings),
}

/// What `serve` holds for its clients: the account's credential and the keys that reach it.
#[derive(Debug, Clone)]
pub struct Holding {
    pub account: String,
    pub source: CredentialSource,
    pub keys_file: PathBuf,
    pub allow_client_tokens: bool,
}

impl CredentialArgs {
    /// The holding, when a credential is configured; the error names the flag.
    pub fn validate(&self) -> Result<Option<Holding>, String> {
        let oauth = self.oauth.validate()?;
        let source = match (&self.token_file, oauth) {
            (Some(_), Some(_)) => {
                return Err("--token-file and --oauth-* are two ways to give the account's credential: give one".into())
            }
            (Some(path), None) => CredentialSource::TokenFile(path.clone()),
            (None, Some(oauth)) => CredentialSource::OAuth(oauth),
            (None, None) => {
                if self.keys_file.is_some() || self.allow_client_tokens {
                    return Err("--keys-file and --allow-client-tokens need the account's credential: give --token-file or the --oauth-* flags".into());
                }
                return Ok(None);
            }
        };
        let keys_file = self.keys_file.clone().ok_or(
            "--keys-file is required when the proxy holds the account's credential: clients send keys made by `kommo-fanout keys add`",
        )?;
        if self.account.is_empty() {
            return Err("--account must not be empty".into());
        }
        Ok(Some(Holding {
            account: self.account.clone(),
            source,
            keys_file,
            allow_client_tokens: self.allow_client_tokens,
        }))
    }
}

/// The account's credential.
pub enum Credentials {
    /// A long-lived token in a file, read again when the file changes.
    Static(TokenFile),
    OAuth(OAuth),
}

/// A token file and what was last read from it.
pub struct TokenFile {
    path: PathBuf,
    current: std::sync::Mutex<(Option<SystemTime>, HeaderValue)>,
    /// Why Kommo does not take the token (a `401` to it); cleared when the file changes.
    refused: std::sync::Mutex<Option<String>>,
}

/// An OAuth integration's settings (`--oauth-*`).
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uri: String,
    /// Where the current tokens are kept (the refresh token above all).
    pub tokens_file: PathBuf,
}

/// OAuth tokens and the one refresh that may run at a time.
pub struct OAuth {
    settings: OAuthSettings,
    state: Mutex<Held>,
    /// Why the last refresh was refused, for readiness; `None` while tokens work.
    refused: std::sync::Mutex<Option<String>>,
    /// Where replicas share the tokens and take turns refreshing (with `--redis`).
    shared: Option<Box<dyn SharedTokens>>,
}

/// Where replicas share an account's OAuth tokens and the lock that lets one of them at a
/// time refresh them ([`crate::redis::RedisTokens`]).
pub trait SharedTokens: Send + Sync {
    /// The tokens the replicas share, if any were stored.
    fn load(&self) -> BoxFuture<'_, Result<Option<Tokens>, String>>;
    /// Takes the refresh lock for at most `ttl`; `false` while another replica holds it.
    fn lock(&self, ttl: Duration) -> BoxFuture<'_, Result<bool, String>>;
    /// Stores refreshed tokens (the lock is still held).
    fn store(&self, tokens: &Tokens) -> BoxFuture<'_, Result<(), String>>;
    /// Releases the lock, if this replica still holds it.
    fn unlock(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// How long a replica holds the refresh lock at most, and waits for another's refresh.
const SHARED_REFRESH: Duration = Duration::from_secs(30);

/// The tokens in use and the tokens file's modification time when they were read or written.
struct Held {
    tokens: Tokens,
    modified: Option<SystemTime>,
}

/// What the tokens file holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    /// Unix seconds; 0 when unknown (a file holding only a refresh token).
    #[serde(default)]
    pub expires_at: u64,
    /// Unix seconds when the access token was issued (to size the refresh margin).
    #[serde(default)]
    pub issued_at: u64,
}

/// Kommo's token endpoint answer.
#[derive(Deserialize)]
struct Granted {
    access_token: String,
    refresh_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Why no usable credential could be had.
#[derive(Debug, Clone)]
pub enum CredentialError {
    /// Kommo refused the refresh token or the client: a person must authorize again.
    Refused(String),
    /// Anything else (the token endpoint unreachable, a file unreadable): may pass.
    Unavailable(String),
}

impl std::fmt::Display for CredentialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialError::Refused(e) | CredentialError::Unavailable(e) => f.write_str(e),
        }
    }
}

fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

fn unix_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn bearer(token: &str) -> Result<HeaderValue, CredentialError> {
    HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        CredentialError::Unavailable("the token holds characters a header cannot carry".into())
    })
}

impl Credentials {
    /// A long-lived token from `path` (surrounding whitespace ignored).
    pub fn token_file(path: PathBuf) -> Result<Credentials, String> {
        let (modified, value) = read_token(&path)?;
        Ok(Credentials::Static(TokenFile {
            path,
            current: std::sync::Mutex::new((modified, value)),
            refused: std::sync::Mutex::new(None),
        }))
    }

    /// OAuth tokens from `settings.tokens_file`, which must exist (`oauth exchange` writes it).
    pub fn oauth(settings: OAuthSettings) -> Result<Credentials, String> {
        let tokens = read_tokens(&settings.tokens_file)?;
        let modified = modified(&settings.tokens_file);
        Ok(Credentials::OAuth(OAuth {
            settings,
            state: Mutex::new(Held { tokens, modified }),
            refused: std::sync::Mutex::new(None),
            shared: None,
        }))
    }

    /// Shares OAuth tokens with other replicas through `shared` (a long-lived token needs
    /// nothing shared).
    pub fn with_shared(mut self, shared: Box<dyn SharedTokens>) -> Credentials {
        if let Credentials::OAuth(oauth) = &mut self {
            oauth.shared = Some(shared);
        }
        self
    }

    /// The `Authorization` value for the next upstream request: refreshed first when the
    /// access token is near its expiry.
    pub async fn authorization(&self, fetcher: &Fetcher) -> Result<HeaderValue, CredentialError> {
        match self {
            Credentials::Static(file) => file.current(),
            Credentials::OAuth(oauth) => oauth.authorization(fetcher, None).await,
        }
    }

    /// After Kommo answered `401` to `used`: a new access token (one refresh, unless another
    /// request already replaced `used`).
    pub async fn after_unauthorized(
        &self,
        fetcher: &Fetcher,
        used: &HeaderValue,
    ) -> Result<HeaderValue, CredentialError> {
        match self {
            Credentials::Static(file) => file.after_unauthorized(used),
            Credentials::OAuth(oauth) => oauth.authorization(fetcher, Some(used)).await,
        }
    }

    /// Why the credential cannot work until a person acts, for readiness.
    pub fn refused(&self) -> Option<String> {
        let refused = match self {
            Credentials::Static(file) => &file.refused,
            Credentials::OAuth(oauth) => &oauth.refused,
        };
        refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The token in `path` and the file's modification time.
fn read_token(path: &Path) -> Result<(Option<SystemTime>, HeaderValue), String> {
    let modified = modified(path);
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    let value = bearer(token).map_err(|e| format!("the token file {}: {e}", path.display()))?;
    Ok((modified, value))
}

impl TokenFile {
    /// The token, read again when the file's modification time changed; a file that cannot be
    /// read now keeps the last token (and says so).
    fn current(&self) -> Result<HeaderValue, CredentialError> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let modified = modified(&self.path);
        let mut refused = self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if modified != current.0 {
            match read_token(&self.path) {
                Ok(read) => {
                    info!(file = %self.path.display(), "the account's token file changed: using the new token");
                    *current = read;
                    *refused = None;
                }
                Err(e) => warn!(error = %e, "keeping the last token"),
            }
        }
        match &*refused {
            Some(reason) => Err(CredentialError::Refused(reason.clone())),
            None => Ok(current.1.clone()),
        }
    }

    /// After Kommo answered `401` to `used`: the file's token if it changed since, else the
    /// token is refused until the file changes (every request would cost Kommo another `401`).
    fn after_unauthorized(&self, used: &HeaderValue) -> Result<HeaderValue, CredentialError> {
        let current = self.current()?;
        if current != *used {
            return Ok(current);
        }
        let reason = format!(
            "Kommo answered 401 Unauthorized to the token in {}: put a valid long-lived token in that file (it is read again when it changes)",
            self.path.display()
        );
        warn!(%reason, "the account's token is refused");
        *self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason.clone());
        Err(CredentialError::Refused(reason))
    }
}

/// The tokens in `path`: the JSON this proxy writes, or a refresh token alone.
pub fn read_tokens(path: &Path) -> Result<Tokens, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the OAuth tokens file {}: {e} (run `kommo-fanout oauth exchange` to create it)",
            path.display()
        )
    })?;
    let text = text.trim();
    if text.starts_with('{') {
        return serde_json::from_str(text)
            .map_err(|e| format!("the OAuth tokens file {}: {e}", path.display()));
    }
    if text.is_empty() {
        return Err(format!("the OAuth tokens file {} is empty", path.display()));
    }
    Ok(Tokens {
        refresh_token: text.to_string(),
        ..Tokens::default()
    })
}

impl Tokens {
    /// Whether the access token should be replaced at `now_ms` (Unix milliseconds).
    fn due(&self, now_ms: u64) -> bool {
        if self.access_token.is_empty() || self.expires_at == 0 {
            return true;
        }
        let life_ms = self.expires_at.saturating_sub(self.issued_at) * 1000;
        let margin_ms = (life_ms / 5).min(MAX_MARGIN.as_millis() as u64);
        now_ms + margin_ms >= self.expires_at * 1000
    }

    fn from_grant(granted: Granted, now: u64) -> Tokens {
        let expires_at = granted
            .expires_in
            .map(|s| now + s)
            .or_else(|| jwt_exp(&granted.access_token))
            .unwrap_or(now + 3600);
        Tokens {
            access_token: granted.access_token,
            refresh_token: granted.refresh_token,
            expires_at,
            issued_at: now,
        }
    }
}

/// The `exp` claim of a JWT, read without checking its signature (only to schedule a refresh).
fn jwt_exp(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    // Unpadded base64url (RFC 7515), padding tolerated.
    let config = general_purpose::NO_PAD.with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let engine = GeneralPurpose::new(&base64::alphabet::URL_SAFE, config);
    let bytes = base64::Engine::decode(&engine, payload).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()?
        .get("exp")?
        .as_u64()
}

impl OAuth {
    fn set_refused(&self, reason: Option<String>) {
        *self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }

    /// The current access token, after one refresh when it is due or when it is `stale` (the
    /// token a `401` answered). Concurrent callers wait for that one refresh. Tokens written to
    /// the file by someone else (`oauth exchange` while the proxy runs) replace the held ones;
    /// after Kommo refused the refresh token, nothing is sent until they do.
    async fn authorization(
        &self,
        fetcher: &Fetcher,
        stale: Option<&HeaderValue>,
    ) -> Result<HeaderValue, CredentialError> {
        let mut held = self.state.lock().await;
        let path = &self.settings.tokens_file;
        let on_disk = modified(path);
        if on_disk != held.modified {
            held.modified = on_disk;
            match read_tokens(path) {
                Ok(tokens) if tokens.refresh_token != held.tokens.refresh_token => {
                    info!(file = %path.display(), "the OAuth tokens file changed: using its tokens");
                    held.tokens = tokens;
                    self.set_refused(None);
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "keeping the OAuth tokens held in memory"),
            }
        }
        if let Some(reason) = self.refused.lock().ok().and_then(|r| r.clone()) {
            return Err(CredentialError::Refused(reason));
        }
        let current = bearer(&held.tokens.access_token);
        let replaced = match (stale, &current) {
            (Some(stale), Ok(current)) => current != stale,
            _ => false,
        };
        if replaced || (stale.is_none() && !held.tokens.due(unix_now_ms())) {
            return current;
        }
        let refreshed = match &self.shared {
            None => self.refresh(fetcher, &held.tokens).await,
            Some(shared) => {
                self.refresh_shared(fetcher, shared.as_ref(), &held.tokens)
                    .await
            }
        };
        match refreshed {
            Ok(tokens) => held.tokens = tokens,
            // Refreshed early for a passing failure: the token works until it expires.
            Err(CredentialError::Unavailable(e))
                if stale.is_none() && unix_now() < held.tokens.expires_at =>
            {
                warn!(error = %e, "cannot refresh the OAuth tokens yet: using the current access token until it expires");
                return current;
            }
            Err(e) => return Err(e),
        }
        held.modified = modified(path);
        bearer(&held.tokens.access_token)
    }

    /// A refresh among replicas: tokens another replica refreshed meanwhile are taken as they
    /// are; else the one replica that takes the lock refreshes and stores, and the others
    /// wait for its tokens. Without Redis, nothing is refreshed: a refresh without the lock
    /// could burn the token another replica is refreshing.
    async fn refresh_shared(
        &self,
        fetcher: &Fetcher,
        shared: &dyn SharedTokens,
        held: &Tokens,
    ) -> Result<Tokens, CredentialError> {
        let redis = |e: String| {
            CredentialError::Unavailable(format!(
                "the OAuth refresh waits for the replicas' shared lock: {e}"
            ))
        };
        let deadline = tokio::time::Instant::now() + SHARED_REFRESH;
        loop {
            let newer =
                shared.load().await.map_err(redis)?.filter(|t| {
                    t.refresh_token != held.refresh_token && t.issued_at >= held.issued_at
                });
            if let Some(tokens) = newer.as_ref().filter(|t| !t.due(unix_now_ms())) {
                info!("took the OAuth tokens another replica refreshed");
                self.save(tokens)?;
                return Ok(tokens.clone());
            }
            if shared.lock(SHARED_REFRESH).await.map_err(redis)? {
                // Newer tokens that are due themselves are the ones to refresh.
                let base = newer.unwrap_or_else(|| held.clone());
                let refreshed = self.refresh(fetcher, &base).await;
                if let Ok(tokens) = &refreshed {
                    if let Err(e) = shared.store(tokens).await {
                        warn!(error = %e, "the refreshed OAuth tokens are saved to the tokens file but not shared: other replicas will find the refresh token they hold refused");
                    }
                }
                if let Err(e) = shared.unlock().await {
                    warn!(error = %e, "the OAuth refresh lock is released when it expires");
                }
                return refreshed;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(redis("another replica's refresh did not finish".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes `tokens` to the tokens file (atomically, owner-only).
    fn save(&self, tokens: &Tokens) -> Result<(), CredentialError> {
        let path = &self.settings.tokens_file;
        let json = serde_json::to_vec_pretty(tokens).unwrap_or_default();
        crate::keys::write_private(path, &json).map_err(|e| {
            CredentialError::Unavailable(format!(
                "cannot save the OAuth tokens to {}: {e}",
                path.display()
            ))
        })
    }

    /// One refresh: the new tokens are on disk before they are returned.
    async fn refresh(&self, fetcher: &Fetcher, tokens: &Tokens) -> Result<Tokens, CredentialError> {
        let s = &self.settings;
        let body = serde_json::json!({
            "client_id": s.client_id,
            "client_secret": s.client_secret,
            "grant_type": "refresh_token",
            "refresh_token": tokens.refresh_token,
            "redirect_uri": s.redirect_uri,
        });
        let now = unix_now();
        let granted = exchange(fetcher, &body).await.map_err(|e| match e {
            CredentialError::Refused(why) => {
                let reason = format!(
                    "Kommo refused the OAuth refresh token ({why}): get a new authorization code and run `kommo-fanout oauth exchange --code CODE` with this proxy's --oauth-* settings (for an account of the config file: `--config FILE --account NAME`)"
                );
                warn!(%reason, "the account's OAuth tokens are refused");
                self.set_refused(Some(reason.clone()));
                CredentialError::Refused(reason)
            }
            e => e,
        })?;
        let fresh = Tokens::from_grant(granted, now);
        // Kommo has rotated the refresh token: unsaved, the new one exists only in memory.
        self.save(&fresh)?;
        info!(
            expires_at = fresh.expires_at,
            "refreshed the account's OAuth tokens"
        );
        Ok(fresh)
    }
}

/// A file's modification time, if it can be read.
fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// One call of the token endpoint through the limiter. `400`/`401` mean the grant or the
/// client was refused.
async fn exchange(fetcher: &Fetcher, body: &serde_json::Value) -> Result<Granted, CredentialError> {
    let mut req = Request::new(body::full(Bytes::from(body.to_string())));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = http::Uri::from_static(TOKEN_PATH);
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let flow = Flow {
        id: crate::upstream::fair::CREDENTIAL,
        key: fetcher.upstream.origin().url.as_str().into(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(30),
    };
    let resp = fetcher
        .send_once(&flow, req)
        .await
        .map_err(|e| CredentialError::Unavailable(format!("the token endpoint: {e}")))?;
    let status = resp.status();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .map_err(|e| CredentialError::Unavailable(format!("the token endpoint: {e}")))?
        .to_bytes();
    let detail = || {
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                ["hint", "detail", "title"]
                    .iter()
                    .find_map(|k| v.get(k).and_then(|d| d.as_str()).map(str::to_string))
            })
            .unwrap_or_else(|| status.to_string())
    };
    match status {
        StatusCode::OK => serde_json::from_slice(&body)
            .map_err(|e| CredentialError::Unavailable(format!("the token endpoint's answer: {e}"))),
        StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Err(CredentialError::Refused(format!(
                "the token endpoint answered {status}: {}",
                detail()
            )))
        }
        _ => Err(CredentialError::Unavailable(format!(
            "the token endpoint answered {status}: {}",
            detail()
        ))),
    }
}

/// `oauth exchange`: trades an authorization code for tokens and writes them.
pub async fn exchange_code(
    fetcher: &Fetcher,
    settings: &OAuthSettings,
    code: &str,
) -> Result<Tokens, String> {
    let body = serde_json::json!({
        "client_id": settings.client_id,
        "client_secret": settings.client_secret,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": settings.redirect_uri,
    });
    let granted = exchange(fetcher, &body).await.map_err(|e| e.to_string())?;
    let tokens = Tokens::from_grant(granted, unix_now());
    let json = serde_json::to_vec_pretty(&tokens).unwrap_or_default();
    crate::keys::write_private(&settings.tokens_file, &json)
        .map_err(|e| format!("cannot write {}: {e}", settings.tokens_file.display()))?;
    Ok(tokens)
}

/// `kommo-fanout oauth`: the integration's authorization, done once by a person.
#[derive(Debug, clap::Subcommand)]
pub enum OAuthCommand {
    /// Trade an authorization code (from the integration's settings in Kommo, or its redirect)
    /// for tokens, and write them to the tokens file `serve` reads: of `--account NAME` in the
    /// --config file, or of the --upstream and --oauth-* flags (and the KOMMO_FANOUT_*
    /// variables `serve` takes). A running proxy picks the new tokens up.
    Exchange {
        /// The Kommo account origin, e.g. https://example.kommo.com (without --account).
        #[arg(long, env = "KOMMO_FANOUT_UPSTREAM")]
        upstream: Option<String>,
        #[command(flatten)]
        oauth: OAuthArgs,
        /// The account of the --config file's `[accounts.NAME]` tables to authorize, with its
        /// `upstream` and `oauth` values.
        #[arg(long, requires = "config")]
        account: Option<String>,
        /// The config file `serve` reads (with --account).
        #[arg(long, env = "KOMMO_FANOUT_CONFIG")]
        config: Option<PathBuf>,
        /// The authorization code (valid 20 minutes, once).
        #[arg(long)]
        code: String,
    },
}

/// Runs an `oauth` command; what to print, or why it failed.
pub async fn run_oauth(command: OAuthCommand) -> Result<String, String> {
    let OAuthCommand::Exchange {
        upstream,
        oauth,
        account,
        config,
        code,
    } = command;
    let (upstream, settings) = match (account, config) {
        (Some(name), Some(path)) => {
            let account = crate::config::account_in(&path, &name)?;
            match account.holding.map(|h| h.source) {
                Some(CredentialSource::OAuth(settings)) => (account.origin.url, settings),
                _ => {
                    return Err(format!(
                        "[accounts.{name}] in {} has no `oauth`",
                        path.display()
                    ))
                }
            }
        }
        _ => {
            let upstream = upstream.ok_or("--upstream (or --account with --config) is required")?;
            let settings = oauth.validate()?.ok_or(
                "the --oauth-* flags are required: client id, secret file, redirect URI, tokens file",
            )?;
            (upstream, settings)
        }
    };
    let config = crate::config::ServeConfig::for_upstream(&upstream)?;
    let limiter = crate::upstream::limiter::LocalLimiter::new(config.limiter);
    let fetcher = Fetcher::new(
        crate::upstream::Upstream::new(config.upstream)?,
        std::sync::Arc::new(limiter),
        config.fetch,
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    );
    let tokens = exchange_code(&fetcher, &settings, code.trim()).await?;
    let expires = UNIX_EPOCH + Duration::from_secs(tokens.expires_at);
    Ok(format!(
        "wrote the account's OAuth tokens to {} (the access token expires {}; the proxy refreshes it)",
        settings.tokens_file.display(),
        httpdate::fmt_http_date(expires)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_exp_is_read_from_the_payload() {
        // {"alg":"none"} . {"exp":1717203600,"iat":1717200000} . sig
        let token = "eyJhbGciOiJub25lIn0.eyJleHAiOjE3MTcyMDM2MDAsImlhdCI6MTcxNzIwMDAwMH0.c2ln";
        assert_eq!(jwt_exp(token), Some(1_717_203_600));
        assert_eq!(jwt_exp("not-a-jwt"), None);
        assert_eq!(jwt_exp("a.!!!.c"), None);
    }

    #[test]
    fn a_token_is_due_a_fifth_of_its_life_before_expiry_at_most_five_minutes() {
        let t = |issued_at, expires_at| Tokens {
            access_token: "a".into(),
            refresh_token: "r".into(),
            expires_at,
            issued_at,
        };
        assert!(!t(1000, 1010).due(1_007_999));
        assert!(t(1000, 1010).due(1_008_000));
        assert!(
            !t(1000, 1004).due(1_003_199),
            "short lives are timed in milliseconds"
        );
        assert!(t(1000, 1004).due(1_003_200));
        assert!(!t(0, 86_400).due((86_400 - 301) * 1000));
        assert!(t(0, 86_400).due((86_400 - 300) * 1000));
        assert!(Tokens::default().due(0), "no token yet");
    }

    #[test]
    fn tokens_files_hold_json_or_a_refresh_token_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acme.tokens");
        std::fs::write(&path, "  r-123\n").unwrap();
        let t = read_tokens(&path).unwrap();
        assert_eq!((t.refresh_token.as_str(), t.expires_at), ("r-123", 0));
        let fresh = Tokens {
            access_token: "a".into(),
            refresh_token: "r-2".into(),
            expires_at: 99,
            issued_at: 9,
        };
        crate::keys::write_private(&path, &serde_json::to_vec(&fresh).unwrap()).unwrap();
        assert_eq!(read_tokens(&path).unwrap().refresh_token, "r-2");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file is left");
        assert!(read_tokens(&dir.path().join("missing")).is_err());
    }
}
