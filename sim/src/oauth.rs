//! The sim as Kommo's OAuth server: authorization codes, single-use refresh tokens, JWT-shaped
//! access tokens, and the two grants of `POST /oauth2/access_token`.
//!
//! What it rests on: Kommo's reference of the endpoint (developers.kommo.com/reference/get-token:
//! `client_id`, `client_secret`, `grant_type` = `authorization_code` | `refresh_token`, `code` or
//! `refresh_token`, `redirect_uri`; the answer `token_type`, `expires_in`, `access_token`,
//! `refresh_token`, `server_time`), `kommo-api-notes.md` (access tokens are JWTs living 24 hours;
//! refresh tokens live 3 months and are single-use: amocrm-api-php#475, #123, #269, #315), and the
//! errors SDK users recorded. Those errors carry the `hint` and the status codes of
//! league/oauth2-server 8 (`invalidRefreshToken`: `401`; `invalidClient`: `401`; `invalidRequest`:
//! `400`), so the cases nobody recorded follow that library too, and say so where they do.
//!
//! Every time here is on tokio's clock (the clock behind [`crate::Sim::now_ts`]): a token minted
//! with a TTL of `d` is accepted for exactly `d` of tokio time, so `tokio::time::pause` and
//! `advance` drive expiry in tests, and in real time it follows the wall clock's pace.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::data::USERS;
use super::rng::SplitMix64;
use super::{SimOAuth, TokenSpec};

/// The token endpoint's path.
pub(crate) const TOKEN_PATH: &str = "/oauth2/access_token";

/// How long an authorization code may be traded: "действителен у нас в течение 20 минут" (a code
/// from the integration's settings is valid for 20 minutes: webkyrs.info's walk-through of amoCRM's
/// OAuth, and amocrm-api-php#141 "20 мин. не проходит").
pub(crate) const CODE_TTL: Duration = Duration::from_secs(20 * 60);

/// How long a refresh token lives if unused: 3 months (amocrm-api-php#475, #246).
pub(crate) const REFRESH_TTL: Duration = Duration::from_secs(90 * 86_400);

/// The `type` of Kommo's OAuth problems, as recorded in amocrm-api-php#123, #235 and #315.
const PROBLEM_TYPE: &str = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson";

/// The parameters of one token request, from a JSON object or a form body (Kommo's reference shows
/// JSON; the PHP SDK sends a form, amocrm-api-php#563).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct TokenParams {
    /// `authorization_code` or `refresh_token`.
    pub(crate) grant_type: Option<String>,
    /// The integration's id.
    pub(crate) client_id: Option<String>,
    /// The integration's secret key.
    pub(crate) client_secret: Option<String>,
    /// Must be the integration's redirect URI when given (required with a code).
    pub(crate) redirect_uri: Option<String>,
    /// The authorization code (`authorization_code` grant).
    pub(crate) code: Option<String>,
    /// The refresh token (`refresh_token` grant).
    pub(crate) refresh_token: Option<String>,
}

/// Why a token request is refused, in league/oauth2-server's terms (which Kommo's answers show).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OAuthError {
    /// `invalid_request`: a missing or bad parameter, code or refresh token; `status` is `400`, or
    /// `401` for a refresh token (league's `invalidRefreshToken`, as amocrm-api-php#123 and #315
    /// recorded: `"status":401` with `"hint":"Token has been revoked"`).
    InvalidRequest {
        /// The HTTP status.
        status: u16,
        /// What exactly was wrong, in league's words.
        hint: String,
    },
    /// `invalid_client`: unknown client id, wrong secret, or a redirect URI not the client's
    /// (`401` "Некорректный клиент" / "Авторизация клиента не прошла": amocrm-api-php#235).
    InvalidClient,
    /// `unsupported_grant_type`: no or another `grant_type` (league's `400`; not recorded for Kommo).
    UnsupportedGrantType,
}

/// Tokens minted by a successful grant: the token endpoint's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issued {
    /// The JWT-shaped access token.
    pub(crate) access_token: String,
    /// The new single-use refresh token.
    pub(crate) refresh_token: String,
    /// Seconds the access token is accepted for.
    pub(crate) expires_in: u64,
    /// Issue time, Unix seconds on the sim's clock (the JWT's `iat`).
    pub(crate) server_time: i64,
}

/// The OAuth side of one sim: its client, what it minted, and counters for tests.
pub(crate) struct Issuer {
    /// The one integration this account knows; `None` turns the token endpoint off.
    config: Option<SimOAuth>,
    /// Codes and tokens. A plain `Mutex`: each use is a few map operations and never awaits.
    grants: Mutex<Grants>,
    /// Source of credentials, seeded unpredictably (not from [`crate::SimConfig::seed`]) so that two
    /// sims of one seed never mint the same token and a token sent to the wrong account is refused.
    entropy: Mutex<SplitMix64>,
    /// `refresh_token` grants answered with tokens.
    refreshes: AtomicU64,
    /// Token requests refused with a 4xx.
    refused: AtomicU64,
}

/// What the issuer has minted and not yet forgotten.
#[derive(Default)]
struct Grants {
    /// Authorization codes by value.
    codes: HashMap<String, Spendable>,
    /// Refresh tokens by value.
    refresh_tokens: HashMap<String, Spendable>,
    /// Access tokens by value, with the instant they stop being accepted.
    access_tokens: HashMap<String, Instant>,
}

/// A single-use credential: a code or a refresh token.
#[derive(Debug, Clone, Copy)]
struct Spendable {
    /// When it stops being accepted even unused.
    expires: Instant,
    /// Used once already: refused from then on.
    spent: bool,
}

/// Why a single-use credential is refused.
enum Unusable {
    /// Never minted here.
    Unknown,
    /// Past its lifetime.
    Expired,
    /// Used before.
    Spent,
}

// === impl TokenParams ===

impl TokenParams {
    /// The fields of a JSON object; strings as they are, numbers as their digits (a client id sent
    /// as a number is still meant as that id), anything else absent. `None` if it is not an object.
    pub(crate) fn from_json(value: &Value) -> Option<Self> {
        let object = value.as_object()?;
        let field = |name: &str| match object.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Some(Self {
            grant_type: field("grant_type"),
            client_id: field("client_id"),
            client_secret: field("client_secret"),
            redirect_uri: field("redirect_uri"),
            code: field("code"),
            refresh_token: field("refresh_token"),
        })
    }

    /// The fields of an `application/x-www-form-urlencoded` body (the first of a repeated name).
    pub(crate) fn from_form(body: &[u8]) -> Self {
        let mut params = Self::default();
        for (name, value) in form_urlencoded::parse(body) {
            let slot = match name.as_ref() {
                "grant_type" => &mut params.grant_type,
                "client_id" => &mut params.client_id,
                "client_secret" => &mut params.client_secret,
                "redirect_uri" => &mut params.redirect_uri,
                "code" => &mut params.code,
                "refresh_token" => &mut params.refresh_token,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(value.into_owned());
            }
        }
        params
    }
}

// === impl OAuthError ===

impl OAuthError {
    /// A missing parameter, worded as league words it.
    fn missing(parameter: &str) -> Self {
        Self::InvalidRequest {
            status: 400,
            hint: format!("Check the `{parameter}` parameter"),
        }
    }

    /// A refused authorization code (`400`).
    fn code(hint: &str) -> Self {
        Self::InvalidRequest {
            status: 400,
            hint: hint.to_string(),
        }
    }

    /// A refused refresh token (`401`, as recorded).
    fn refresh_token(hint: &str) -> Self {
        Self::InvalidRequest {
            status: 401,
            hint: hint.to_string(),
        }
    }

    /// The HTTP status (and the body's `status`).
    pub(crate) fn status(&self) -> u16 {
        match self {
            Self::InvalidRequest { status, .. } => *status,
            Self::InvalidClient => 401,
            Self::UnsupportedGrantType => 400,
        }
    }

    /// The body's `title`: the English of the recorded "Некорректный запрос" and "Некорректный
    /// клиент"; league's name for the unrecorded one.
    pub(crate) fn title(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "Invalid request",
            Self::InvalidClient => "Invalid client",
            Self::UnsupportedGrantType => "Unsupported grant type",
        }
    }

    /// The body's `detail`: the English of the recorded "В запросе отсутствует ряд параметров или
    /// параметры невалидны" and "Авторизация клиента не прошла"; league's message otherwise.
    pub(crate) fn detail(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => {
                "Some parameters are missing from the request or are invalid"
            }
            Self::InvalidClient => "Client authentication failed",
            Self::UnsupportedGrantType => {
                "The authorization grant type is not supported by the authorization server"
            }
        }
    }

    /// The body's `hint`, when there is one (league gives none for a bad client).
    pub(crate) fn hint(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { hint, .. } => Some(hint),
            Self::InvalidClient => None,
            Self::UnsupportedGrantType => {
                Some("Check that all required parameters have been provided")
            }
        }
    }

    /// The body's `type`.
    pub(crate) fn problem_type(&self) -> &'static str {
        PROBLEM_TYPE
    }
}

// === impl Issuer ===

impl Issuer {
    /// An issuer for `config` (`None`: the endpoint is off, codes are still minted but useless).
    pub(crate) fn new(config: Option<SimOAuth>) -> Self {
        // std's RandomState is keyed randomly per process and differently per instance: what is
        // hashed does not matter, only that the keys are fresh.
        let seed = RandomState::new().hash_one(TOKEN_PATH);
        Self {
            config,
            grants: Mutex::new(Grants::default()),
            entropy: Mutex::new(SplitMix64::new(seed)),
            refreshes: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Whether `POST /oauth2/access_token` is served.
    pub(crate) fn is_on(&self) -> bool {
        self.config.is_some()
    }

    /// The configured integration, if any.
    pub(crate) fn config(&self) -> Option<&SimOAuth> {
        self.config.as_ref()
    }

    /// A fresh authorization code, tradeable once within [`CODE_TTL`] of `now`.
    pub(crate) fn mint_code(&self, now: Instant) -> String {
        let code = self.fresh_hex(32);
        self.grants().codes.insert(
            code.clone(),
            Spendable {
                expires: now + CODE_TTL,
                spent: false,
            },
        );
        code
    }

    /// Answer one token request at `now` (`now_ts` the same moment on the sim's clock), counting
    /// the refresh or the refusal.
    pub(crate) fn grant(
        &self,
        params: &TokenParams,
        now: Instant,
        now_ts: i64,
    ) -> Result<Issued, OAuthError> {
        let result = self.decide(params, now, now_ts);
        match &result {
            Ok(_) if params.grant_type.as_deref() == Some("refresh_token") => {
                self.refreshes.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => self.count_refused(),
        }
        result
    }

    /// Count a token request refused before [`Issuer::grant`] could look at it (a bad body or method).
    pub(crate) fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The grant itself, checked in league's order: grant type, client, then the code or token.
    fn decide(
        &self,
        params: &TokenParams,
        now: Instant,
        now_ts: i64,
    ) -> Result<Issued, OAuthError> {
        let Some(config) = &self.config else {
            return Err(OAuthError::InvalidClient);
        };
        let grant_type = match params.grant_type.as_deref() {
            Some(g @ ("authorization_code" | "refresh_token")) => g,
            _ => return Err(OAuthError::UnsupportedGrantType),
        };
        let client_id = params
            .client_id
            .as_deref()
            .ok_or_else(|| OAuthError::missing("client_id"))?;
        if client_id != config.client_id
            || params.client_secret.as_deref() != Some(config.client_secret.as_str())
        {
            return Err(OAuthError::InvalidClient);
        }
        // league's `validateClient`: a redirect URI, when sent, must be the client's.
        if params
            .redirect_uri
            .as_deref()
            .is_some_and(|uri| uri != config.redirect_uri)
        {
            return Err(OAuthError::InvalidClient);
        }
        let mut grants = self.grants();
        match grant_type {
            "authorization_code" => {
                if params.redirect_uri.is_none() {
                    return Err(OAuthError::missing("redirect_uri"));
                }
                let code = params
                    .code
                    .as_deref()
                    .ok_or_else(|| OAuthError::missing("code"))?;
                // league's hints for a code it cannot read, an old one and a used one.
                spend(&mut grants.codes, code, now).map_err(|why| match why {
                    Unusable::Unknown => OAuthError::code("Cannot decrypt the authorization code"),
                    Unusable::Expired => OAuthError::code("Authorization code has expired"),
                    Unusable::Spent => OAuthError::code("Authorization code has been revoked"),
                })?;
            }
            _ => {
                let token = params
                    .refresh_token
                    .as_deref()
                    .ok_or_else(|| OAuthError::missing("refresh_token"))?;
                // "Token has been revoked" for a used one is what amocrm-api-php#123 and #315
                // recorded ("такая ошибка может происходить, если вы используете refresh token,
                // который уже был использован": #123); the other two are league's.
                spend(&mut grants.refresh_tokens, token, now).map_err(|why| match why {
                    Unusable::Unknown => {
                        OAuthError::refresh_token("Cannot decrypt the refresh token")
                    }
                    Unusable::Expired => OAuthError::refresh_token("Token has expired"),
                    Unusable::Spent => OAuthError::refresh_token("Token has been revoked"),
                })?;
            }
        }
        Ok(self.issue(&mut grants, config, now, now_ts))
    }

    /// Mint an access token and a refresh token at `now`. Earlier access tokens stay accepted until
    /// their own expiry: a used refresh token does not revoke the access token issued with it.
    /// Nothing Kommo publishes says otherwise, and a JWT checked by its signature and `exp` alone
    /// behaves so; it also keeps requests in flight during a refresh from being refused.
    fn issue(&self, grants: &mut Grants, config: &SimOAuth, now: Instant, now_ts: i64) -> Issued {
        let expires_in = config.expires_in();
        let expires = now + Duration::from_secs(expires_in);
        grants.access_tokens.retain(|_, until| *until > now);
        let access_token = self.jwt(config, now_ts, expires_in);
        let refresh_token = self.fresh_hex(64);
        grants.access_tokens.insert(access_token.clone(), expires);
        grants.refresh_tokens.insert(
            refresh_token.clone(),
            Spendable {
                expires: now + REFRESH_TTL,
                spent: false,
            },
        );
        Issued {
            access_token,
            refresh_token,
            expires_in,
            server_time: now_ts,
        }
    }

    /// What a bearer `token` may read at `now`, if it is an access token minted here and not
    /// expired: the leads [`SimOAuth::sees`] allows, through the same check as a [`TokenSpec`].
    pub(crate) fn access(&self, token: &str, now: Instant) -> Option<TokenSpec> {
        let config = self.config.as_ref()?;
        let expires = *self.grants().access_tokens.get(token)?;
        (now < expires).then(|| TokenSpec {
            token: token.to_string(),
            responsible_user_ids: config.sees.clone(),
        })
    }

    /// `refresh_token` grants answered with tokens so far.
    pub(crate) fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// Token requests refused so far.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A JWT-shaped access token: header and payload as league/oauth2-server writes them (`aud`,
    /// `jti`, `iat`, `nbf`, `exp`, `sub`, `scopes`), base64url without padding, and a signature of
    /// random bytes (nobody can check it: the sim publishes no key). `exp` is `iat + expires_in`.
    fn jwt(&self, config: &SimOAuth, iat: i64, expires_in: u64) -> String {
        let header = serde_json::json!({"typ": "JWT", "alg": "RS256"});
        let subject = config
            .sees
            .as_ref()
            .and_then(|ids| ids.first().copied())
            .unwrap_or(USERS[0]);
        let payload = serde_json::json!({
            "aud": config.client_id,
            "jti": self.fresh_hex(40),
            "iat": iat,
            "nbf": iat,
            "exp": iat.saturating_add(i64::try_from(expires_in).unwrap_or(i64::MAX)),
            "sub": subject.to_string(),
            "scopes": ["crm"],
        });
        // Inside a token, not a response body: always compact, whatever the sim's JSON style.
        let part = |value: &Value| base64url(&serde_json::to_vec(value).unwrap_or_default());
        let signature: Vec<u8> = {
            let mut entropy = self.entropy();
            (0..32)
                .flat_map(|_| entropy.next_u64().to_le_bytes())
                .collect()
        };
        format!(
            "{}.{}.{}",
            part(&header),
            part(&payload),
            base64url(&signature)
        )
    }

    /// `chars` lower-case hex digits of fresh entropy.
    fn fresh_hex(&self, chars: usize) -> String {
        let mut entropy = self.entropy();
        let mut out = String::with_capacity(chars + 16);
        while out.len() < chars {
            out.push_str(&format!("{:016x}", entropy.next_u64()));
        }
        out.truncate(chars);
        out
    }

    fn grants(&self) -> std::sync::MutexGuard<'_, Grants> {
        self.grants.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn entropy(&self) -> std::sync::MutexGuard<'_, SplitMix64> {
        self.entropy.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for Issuer {
    /// Never prints the secret or any credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("on", &self.is_on())
            .field("refreshes", &self.refreshes())
            .field("refused", &self.refused())
            .finish_non_exhaustive()
    }
}

/// Use a single-use credential at `now`: fine once, then refused as spent; checked for expiry
/// before use, as league does.
fn spend(map: &mut HashMap<String, Spendable>, value: &str, now: Instant) -> Result<(), Unusable> {
    let entry = map.get_mut(value).ok_or(Unusable::Unknown)?;
    if now >= entry.expires {
        return Err(Unusable::Expired);
    }
    if entry.spent {
        return Err(Unusable::Spent);
    }
    entry.spent = true;
    Ok(())
}

/// Base64url without padding (RFC 7515 §2, as JWTs are written).
pub(crate) fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        // A chunk of k bytes carries k + 1 six-bit digits.
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc_4648_vectors() {
        // RFC 4648 §10, padding dropped; and the two characters that differ from plain base64.
        for (input, expected) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64url(input.as_bytes()), expected, "{input:?}");
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn form_and_json_params_agree() {
        let form = TokenParams::from_form(
            b"grant_type=refresh_token&client_id=abc&client_secret=s%26t&refresh_token=r1&client_id=other",
        );
        let json = TokenParams::from_json(&serde_json::json!({
            "grant_type": "refresh_token",
            "client_id": "abc",
            "client_secret": "s&t",
            "refresh_token": "r1",
            "scope": "ignored",
        }))
        .unwrap();
        assert_eq!(form, json);
        assert_eq!(form.client_secret.as_deref(), Some("s&t"));
        assert!(TokenParams::from_json(&serde_json::json!(["grant_type"])).is_none());
        let numeric = TokenParams::from_json(&serde_json::json!({"client_id": 42})).unwrap();
        assert_eq!(numeric.client_id.as_deref(), Some("42"));
    }
}
