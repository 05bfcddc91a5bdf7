//! The account's OAuth tokens shared by replicas through Redis, and the lock that lets one
//! replica at a time refresh them (Kommo's refresh tokens are single-use: two replicas
//! refreshing with one token would leave one of them, or both, with a refused token).
//!
//! The tokens are sealed with AES-256-GCM under a key derived from the integration's client
//! secret, which every replica holds and Redis does not: whoever reads Redis alone cannot use
//! them. The lock is `SET NX PX` with this replica's own random value, released by a script
//! that deletes it only while it still holds that value.

use std::time::Duration;

use futures::future::BoxFuture;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::credentials::{SharedTokens, Tokens};

/// Deletes the lock only while it holds this replica's value.
static UNLOCK: std::sync::LazyLock<redis::Script> = script!(
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
);

/// One account's shared tokens and refresh lock in Redis.
pub struct RedisTokens {
    conn: ConnectionManager,
    tokens: String,
    lock: String,
    /// This replica's value in the lock.
    owner: String,
    key: LessSafeKey,
    random: SystemRandom,
}

impl RedisTokens {
    /// The tokens of `account` under `prefix`, sealed with a key derived from `client_secret`.
    pub fn new(
        url: &str,
        prefix: &str,
        account: &str,
        client_secret: &str,
    ) -> Result<RedisTokens, String> {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(b"kommo-fanout shared OAuth tokens\0");
        context.update(client_secret.as_bytes());
        let key = UnboundKey::new(&AES_256_GCM, context.finish().as_ref())
            .map_err(|_| "cannot make the tokens' sealing key")?;
        Ok(RedisTokens {
            conn: super::connection(url)?,
            tokens: format!("{prefix}oauth:{account}:tokens"),
            lock: format!("{prefix}oauth:{account}:lock"),
            owner: super::random_hex(2),
            key: LessSafeKey::new(key),
            random: SystemRandom::new(),
        })
    }

    fn seal(&self, tokens: &Tokens) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| "no system randomness")?;
        let mut data = serde_json::to_vec(tokens).map_err(|e| e.to_string())?;
        let aad = Aad::from(self.tokens.as_bytes());
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), aad, &mut data)
            .map_err(|_| "cannot seal the tokens")?;
        Ok([&nonce[..], &data].concat())
    }

    fn open(&self, mut sealed: Vec<u8>) -> Result<Tokens, String> {
        let refused =
            "the shared tokens in Redis cannot be opened: another client secret sealed them";
        if sealed.len() < NONCE_LEN {
            return Err(refused.into());
        }
        let mut data = sealed.split_off(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(&sealed).map_err(|_| refused)?;
        let aad = Aad::from(self.tokens.as_bytes());
        let plain = self
            .key
            .open_in_place(nonce, aad, &mut data)
            .map_err(|_| refused)?;
        serde_json::from_slice(plain).map_err(|e| e.to_string())
    }
}

/// One Redis call under the backends' timeout; the error says it was Redis.
async fn call<T>(
    call: impl std::future::Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, String> {
    super::timed(call).await.map_err(|e| format!("Redis: {e}"))
}

impl SharedTokens for RedisTokens {
    fn load(&self) -> BoxFuture<'_, Result<Option<Tokens>, String>> {
        Box::pin(async move {
            let sealed: Option<Vec<u8>> = call(self.conn.clone().get(&self.tokens)).await?;
            sealed.map(|s| self.open(s)).transpose()
        })
    }

    fn lock(&self, ttl: Duration) -> BoxFuture<'_, Result<bool, String>> {
        Box::pin(async move {
            let options = redis::SetOptions::default()
                .conditional_set(redis::ExistenceCheck::NX)
                .with_expiration(redis::SetExpiry::PX(ttl.as_millis() as u64));
            let mut conn = self.conn.clone();
            let set: Option<String> =
                call(conn.set_options(&self.lock, &self.owner, options)).await?;
            Ok(set.is_some())
        })
    }

    fn store(&self, tokens: &Tokens) -> BoxFuture<'_, Result<(), String>> {
        let sealed = self.seal(tokens);
        Box::pin(async move {
            let sealed = sealed?;
            call(self.conn.clone().set::<_, _, ()>(&self.tokens, sealed)).await
        })
    }

    fn unlock(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let _: i64 = call(
                UNLOCK
                    .key(&self.lock)
                    .arg(&self.owner)
                    .invoke_async(&mut conn),
            )
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (A runtime: the lazy connection is set up on one, and never used here.)
    #[tokio::test]
    async fn sealed_tokens_open_with_the_same_secret_only() {
        let tokens = Tokens {
            access_token: "a".into(),
            refresh_token: "r".into(),
            expires_at: 10,
            issued_at: 1,
        };
        let url = "redis://127.0.0.1:1";
        let ours = RedisTokens::new(url, "p:", "acme", "secret").unwrap();
        let sealed = ours.seal(&tokens).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("\"r\""));
        assert_eq!(ours.open(sealed.clone()).unwrap().refresh_token, "r");
        let theirs = RedisTokens::new(url, "p:", "acme", "another").unwrap();
        assert!(theirs.open(sealed.clone()).is_err());
        let other_account = RedisTokens::new(url, "p:", "other", "secret").unwrap();
        assert!(other_account.open(sealed).is_err(), "bound to its key name");
        assert!(ours.open(vec![1, 2]).is_err());
    }
}
