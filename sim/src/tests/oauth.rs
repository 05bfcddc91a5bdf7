//! End-to-end tests of the OAuth server: `POST /oauth2/access_token` with both grants, single-use
//! codes and refresh tokens, refused clients, access tokens that expire, and what they may read.
//! Most tests pause time, so a token expires only when a test advances the clock past its TTL.

use serde_json::json;

use super::*;

const CLIENT_ID: &str = "c0ffee-integration";
const CLIENT_SECRET: &str = "s3cret-key";
const REDIRECT_URI: &str = "https://example.test/oauth/callback";
const TOKEN_PATH: &str = "/oauth2/access_token";
const OAUTH_PROBLEM: &str = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson";

/// A sim of `leads` leads serving OAuth for [`CLIENT_ID`], besides the static tokens of `config`.
fn oauth_config(leads: usize, token_ttl: Duration, sees: Option<Vec<i64>>) -> SimConfig {
    SimConfig {
        oauth: Some(SimOAuth {
            token_ttl,
            sees,
            ..SimOAuth::new(CLIENT_ID, CLIENT_SECRET, REDIRECT_URI)
        }),
        ..config(leads)
    }
}

/// How a token request's parameters are sent.
enum Body<'a> {
    /// `application/json`.
    Json(Value),
    /// `application/x-www-form-urlencoded`.
    Form(&'a [(&'a str, &'a str)]),
    /// The raw bytes, with no `Content-Type`.
    Bare(String),
}

/// A token endpoint answer that granted tokens.
struct Tokens {
    access: String,
    refresh: String,
    json: Value,
}

impl Harness {
    async fn token_request(&self, body: Body<'_>) -> Answer {
        let (content_type, text) = match body {
            Body::Json(value) => (Some("application/json"), value.to_string()),
            Body::Form(pairs) => (
                Some("application/x-www-form-urlencoded"),
                form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(pairs)
                    .finish(),
            ),
            Body::Bare(text) => (None, text),
        };
        let headers: Vec<(&str, &str)> = content_type
            .map(|ct| vec![("content-type", ct)])
            .unwrap_or_default();
        self.try_request_with(Method::POST, TOKEN_PATH, None, &headers, &text)
            .await
            .unwrap()
    }

    /// Trade `code` (JSON body, as Kommo's reference shows it).
    async fn exchange(&self, code: &str) -> Answer {
        self.token_request(Body::Json(json!({
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
        })))
        .await
    }

    /// Trade `refresh_token` (form body, as the PHP SDK sends it).
    async fn refresh(&self, refresh_token: &str) -> Answer {
        self.token_request(Body::Form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("redirect_uri", REDIRECT_URI),
        ]))
        .await
    }

    /// `GET /api/v4/account` with `token`: 200 while the token is accepted.
    async fn account_status(&self, token: &str) -> StatusCode {
        self.get_as("/api/v4/account", Some(token)).await.status
    }
}

/// The tokens of a `200` answer, after checking its shape against Kommo's reference.
fn granted(a: &Answer) -> Tokens {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.content_type(), "application/json");
    assert_eq!(a.headers["cache-control"], "no-store");
    let json = a.json();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "access_token",
            "expires_in",
            "refresh_token",
            "server_time",
            "token_type"
        ]
    );
    assert_eq!(json["token_type"], "Bearer");
    let access = json["access_token"].as_str().unwrap().to_string();
    let refresh = json["refresh_token"].as_str().unwrap().to_string();
    assert!(!refresh.is_empty() && refresh != access);
    Tokens {
        access,
        refresh,
        json,
    }
}

/// The body of a refused token request, after checking it is Kommo's OAuth problem with `status`.
fn refused(a: &Answer, status: u16) -> Value {
    assert_eq!(
        a.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.content_type(), "application/problem+json");
    let json = a.json();
    assert_eq!(json["type"], OAUTH_PROBLEM);
    assert_eq!(json["status"], status);
    json
}

/// Base64url (no padding) back to bytes.
fn unbase64url(text: &str) -> Vec<u8> {
    let digit = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            other => panic!("not base64url: {:?} in {text}", other as char),
        }
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0u32);
    for &c in text.as_bytes() {
        acc = (acc << 6) | digit(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The header and payload of a JWT.
fn jwt_parts(token: &str) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    assert!(parts.iter().all(|p| !p.is_empty()), "{token}");
    let decode = |p: &str| -> Value { serde_json::from_slice(&unbase64url(p)).unwrap() };
    let _signature = unbase64url(parts[2]);
    (decode(parts[0]), decode(parts[1]))
}

#[tokio::test(start_paused = true)]
async fn a_code_is_traded_once_within_20_minutes() {
    let h = Harness::new(oauth_config(200, Duration::from_secs(86_400), None)).await;
    let code = h.sim.oauth_code();
    let first = granted(&h.exchange(&code).await);
    assert_eq!(first.json["expires_in"], 86_400);
    assert_eq!(h.account_status(&first.access).await, StatusCode::OK);

    let again = refused(&h.exchange(&code).await, 400);
    assert_eq!(again["hint"], "Authorization code has been revoked");
    assert_eq!(again["title"], "Invalid request");
    let unknown = refused(&h.exchange("not-a-code").await, 400);
    assert_eq!(unknown["hint"], "Cannot decrypt the authorization code");

    // A code is good for 20 minutes of the sim's clock, not a moment longer.
    let (late, in_time) = (h.sim.oauth_code(), h.sim.oauth_code());
    tokio::time::advance(Duration::from_secs(20 * 60 - 1)).await;
    granted(&h.exchange(&in_time).await);
    tokio::time::advance(Duration::from_secs(1)).await;
    let expired = refused(&h.exchange(&late).await, 400);
    assert_eq!(expired["hint"], "Authorization code has expired");

    // Kommo's reference sends `redirect_uri` with a code; without it the code is not spent.
    let code = h.sim.oauth_code();
    let no_redirect = h
        .token_request(Body::Json(json!({
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "grant_type": "authorization_code",
            "code": code,
        })))
        .await;
    assert_eq!(
        refused(&no_redirect, 400)["hint"],
        "Check the `redirect_uri` parameter"
    );
    granted(&h.exchange(&code).await);

    assert_eq!((h.sim.oauth_refused(), h.sim.oauth_refreshes()), (4, 0));
    let statuses: Vec<u16> = h
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == TOKEN_PATH)
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [200, 400, 400, 200, 400, 400, 200]);
}

#[tokio::test(start_paused = true)]
async fn refresh_tokens_rotate_and_are_single_use() {
    let h = Harness::new(oauth_config(200, Duration::from_secs(86_400), None)).await;
    let first = granted(&h.exchange(&h.sim.oauth_code()).await);
    let second = granted(&h.refresh(&first.refresh).await);
    assert_eq!(h.sim.oauth_refreshes(), 1);
    assert_ne!(second.access, first.access);
    assert_ne!(second.refresh, first.refresh);

    // The used refresh token is refused exactly as amocrm-api-php#123 and #315 recorded it.
    let reused = h.refresh(&first.refresh).await;
    assert_eq!(
        refused(&reused, 401),
        json!({
            "hint": "Token has been revoked",
            "title": "Invalid request",
            "type": OAUTH_PROBLEM,
            "status": 401,
            "detail": "Some parameters are missing from the request or are invalid",
        })
    );
    assert_eq!(h.sim.oauth_refreshes(), 1);

    // The rotated one works once, and so on.
    let third = granted(&h.refresh(&second.refresh).await);
    assert_eq!(
        refused(&h.refresh(&second.refresh).await, 401)["hint"],
        "Token has been revoked"
    );
    let unknown = refused(&h.refresh("never-issued").await, 401);
    assert_eq!(unknown["hint"], "Cannot decrypt the refresh token");
    assert_eq!((h.sim.oauth_refreshes(), h.sim.oauth_refused()), (2, 3));

    // Spending a refresh token does not revoke the access tokens issued before.
    for token in [&first.access, &second.access, &third.access] {
        assert_eq!(h.account_status(token).await, StatusCode::OK);
    }

    let log = h.sim.requests();
    let token_requests: Vec<(&str, u16)> = log
        .iter()
        .filter(|r| r.path == TOKEN_PATH)
        .map(|r| (r.method.as_str(), r.status))
        .collect();
    assert_eq!(
        token_requests,
        [
            ("POST", 200),
            ("POST", 200),
            ("POST", 401),
            ("POST", 200),
            ("POST", 401),
            ("POST", 401)
        ]
    );
    // The secret travels in bodies, which the log does not keep.
    for r in &log {
        for value in r.headers.values() {
            assert!(!value.to_str().unwrap_or("").contains(CLIENT_SECRET));
        }
    }
}

#[tokio::test]
async fn a_wrong_client_is_refused_and_spends_nothing() {
    let h = Harness::new(oauth_config(200, Duration::from_secs(60), None)).await;
    let code = h.sim.oauth_code();
    let invalid_client = json!({
        "title": "Invalid client",
        "type": OAUTH_PROBLEM,
        "status": 401,
        "detail": "Client authentication failed",
    });
    for (client_id, client_secret, redirect_uri) in [
        (CLIENT_ID, "wrong-secret", REDIRECT_URI),
        ("another-integration", CLIENT_SECRET, REDIRECT_URI),
        (CLIENT_ID, CLIENT_SECRET, "https://elsewhere.test/cb"),
    ] {
        let a = h
            .token_request(Body::Form(&[
                ("client_id", client_id),
                ("client_secret", client_secret),
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", redirect_uri),
            ]))
            .await;
        assert_eq!(
            refused(&a, 401),
            invalid_client,
            "{client_id} {redirect_uri}"
        );
    }
    let no_secret = h
        .token_request(Body::Json(json!({
            "client_id": CLIENT_ID,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
        })))
        .await;
    assert_eq!(refused(&no_secret, 401), invalid_client);
    for grant_type in [None, Some("password")] {
        let mut body = json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET});
        if let Some(g) = grant_type {
            body["grant_type"] = json!(g);
        }
        let a = h.token_request(Body::Json(body)).await;
        assert_eq!(refused(&a, 400)["title"], "Unsupported grant type");
    }
    let not_json = h
        .try_request_with(
            Method::POST,
            TOKEN_PATH,
            None,
            &[("content-type", "application/json")],
            "{grant_type=",
        )
        .await
        .unwrap();
    assert_eq!(refused(&not_json, 400)["title"], "Invalid request");
    let get = h.get_as(TOKEN_PATH, None).await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(h.sim.oauth_refused(), 8);

    // None of that spent the code.
    let tokens = granted(&h.exchange(&code).await);
    assert_eq!(h.account_status(&tokens.access).await, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn an_expired_access_token_gets_401_and_a_fresh_one_works() {
    let ttl = Duration::from_secs(5);
    let h = Harness::new(oauth_config(200, ttl, None)).await;
    let first = granted(&h.exchange(&h.sim.oauth_code()).await);
    assert_eq!(first.json["expires_in"], 5);
    assert_eq!(h.account_status(&first.access).await, StatusCode::OK);
    tokio::time::advance(ttl - Duration::from_millis(1)).await;
    assert_eq!(h.account_status(&first.access).await, StatusCode::OK);
    tokio::time::advance(Duration::from_millis(1)).await;

    // Expired: the 401 Kommo answers a stale token.
    let stale = h.get_as("/api/v4/leads", Some(&first.access)).await;
    assert_eq!(stale.status, StatusCode::UNAUTHORIZED);
    assert_eq!(stale.content_type(), "application/problem+json");
    assert_eq!(
        stale.json(),
        json!({"title":"Unauthorized","type":"https://httpstatus.es/401","status":401,"detail":"Invalid user name or password"})
    );

    // The refresh token outlives the access token; its new access token works for its own TTL.
    let second = granted(&h.refresh(&first.refresh).await);
    assert_eq!(h.account_status(&second.access).await, StatusCode::OK);
    assert_eq!(
        h.account_status(&first.access).await,
        StatusCode::UNAUTHORIZED
    );
    tokio::time::advance(ttl).await;
    assert_eq!(
        h.account_status(&second.access).await,
        StatusCode::UNAUTHORIZED
    );
    // The static tokens never expire.
    assert_eq!(h.account_status(TOKEN).await, StatusCode::OK);
}

#[tokio::test]
async fn access_tokens_expire_in_real_time_too() {
    let ttl = Duration::from_secs(1);
    let h = Harness::new(oauth_config(100, ttl, None)).await;
    let asked = tokio::time::Instant::now();
    let tokens = granted(&h.exchange(&h.sim.oauth_code()).await);
    let deadline = asked + Duration::from_secs(20);
    loop {
        match h.account_status(&tokens.access).await {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => break,
            other => panic!("unexpected {other}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Issued after `asked`, so refused no earlier than one TTL after it.
    assert!(asked.elapsed() >= ttl);
    let fresh = granted(&h.refresh(&tokens.refresh).await);
    assert_eq!(h.account_status(&fresh.access).await, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn the_jwt_exp_is_issue_time_plus_ttl() {
    let ttl = Duration::from_secs(3600);
    let h = Harness::new(oauth_config(100, ttl, Some(vec![1003]))).await;
    tokio::time::advance(Duration::from_secs(42)).await;
    // The first round checks a code's tokens, the second a refresh's, 100 seconds later.
    for round in 0..2 {
        if round == 1 {
            tokio::time::advance(Duration::from_secs(100)).await;
        }
        let before = h.sim.now_ts();
        let first = granted(&h.exchange(&h.sim.oauth_code()).await);
        let tokens = if round == 0 {
            first
        } else {
            granted(&h.refresh(&first.refresh).await)
        };
        let after = h.sim.now_ts();
        let (header, payload) = jwt_parts(&tokens.access);
        assert_eq!(header, json!({"typ": "JWT", "alg": "RS256"}));
        let iat = payload["iat"].as_i64().unwrap();
        assert_eq!(tokens.json["server_time"], iat);
        assert!((before..=after).contains(&iat), "{before} {iat} {after}");
        assert!(iat >= data::NOW + 42);
        assert_eq!(payload["exp"].as_i64().unwrap(), iat + 3600);
        assert_eq!(tokens.json["expires_in"], 3600);
        assert_eq!(payload["nbf"], iat);
        assert_eq!(payload["aud"], CLIENT_ID);
        assert_eq!(payload["sub"], "1003");
        assert!(payload["jti"].as_str().is_some_and(|j| j.len() >= 32));
    }
}

#[tokio::test]
async fn form_and_json_bodies_are_both_accepted() {
    let h = Harness::new(oauth_config(100, Duration::from_secs(60), None)).await;
    let code = h.sim.oauth_code();
    let by_form = granted(
        &h.token_request(Body::Form(&[
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT_URI),
        ]))
        .await,
    );
    let by_json = granted(
        &h.token_request(Body::Json(json!({
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "grant_type": "refresh_token",
            "refresh_token": by_form.refresh,
            "redirect_uri": REDIRECT_URI,
        })))
        .await,
    );
    // Without a Content-Type, the body speaks for itself.
    let bare_json = granted(
        &h.token_request(Body::Bare(
            json!({
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "grant_type": "refresh_token",
                "refresh_token": by_json.refresh,
            })
            .to_string(),
        ))
        .await,
    );
    let bare_form = granted(
        &h.token_request(Body::Bare(format!(
            "client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}&grant_type=refresh_token&refresh_token={}",
            bare_json.refresh
        )))
        .await,
    );
    for token in [&by_form, &by_json, &bare_json, &bare_form] {
        assert_eq!(h.account_status(&token.access).await, StatusCode::OK);
    }
    assert_eq!((h.sim.oauth_refreshes(), h.sim.oauth_refused()), (3, 0));
}

#[tokio::test]
async fn an_oauth_token_sees_what_its_user_sees() {
    let h = Harness::new(oauth_config(
        2000,
        Duration::from_secs(600),
        Some(vec![1001, 1002]),
    ))
    .await;
    let limited = granted(&h.exchange(&h.sim.oauth_code()).await).access;
    let ((p, s), _) = largest_stage(&h.sim);
    let q = stage_query(p, s);
    let expected = ids_of_users(&h.sim, (p, s), &[1001, 1002]);
    assert!(!expected.is_empty());
    assert_eq!(h.all_ids(&q, &limited).await, expected);
    // The same list as a static token limited to the same users.
    assert_eq!(h.all_ids(&q, LIMITED).await, expected);
    let hidden = h
        .sim
        .leads()
        .into_iter()
        .find(|l| !l.is_deleted && l.responsible_user_id == 1005)
        .unwrap();
    let path = format!("/api/v4/leads/{}", hidden.id);
    assert_eq!(h.get_as(&path, Some(&limited)).await.status, 204);
    assert_eq!(h.get_as(&path, Some(TOKEN)).await.status, 200);
    let account = h.get_as("/api/v4/account", Some(&limited)).await.json();
    assert_eq!(account["current_user_id"], 1001);

    // With `sees: None` the OAuth user sees every lead.
    let all = Harness::new(oauth_config(2000, Duration::from_secs(600), None)).await;
    let full = granted(&all.exchange(&all.sim.oauth_code()).await).access;
    assert_eq!(all.get_as(&path, Some(&full)).await.status, 200);
    assert_eq!(all.all_ids(&q, &full).await, all.all_ids(&q, TOKEN).await);
    // A token one sim minted means nothing to another.
    assert_eq!(all.account_status(&limited).await, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_oauth_the_path_is_not_served() {
    let h = Harness::new(config(100)).await;
    let code = h.sim.oauth_code();
    let a = h.exchange(&code).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["title"], "Unauthorized");
    let with_token = h
        .try_request(Method::POST, TOKEN_PATH, Some(TOKEN), "{}")
        .await
        .unwrap();
    assert_eq!(with_token.status, StatusCode::NOT_FOUND);
    assert_eq!((h.sim.oauth_refused(), h.sim.oauth_refreshes()), (0, 0));
}
