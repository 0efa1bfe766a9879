//! The shared tier in Redis, sealed so that reading Redis reveals nothing.
//!
//! Key: `phantom-authz:v1:<hex SHA-256 of the token>`. Value: `nonce ‖ AES-256-GCM(expiry ‖ JWT)`
//! under a key derived from the token with HKDF-SHA256, the Redis key as associated data. Only a
//! holder of the token can read an entry or plant one that decrypts; the TTL lives in Redis
//! (one `SET … PX`). Every command is bounded by a timeout; the connection reconnects by itself.
//!
//! An eviction deletes the key and publishes the digest on [`EVICTION_CHANNEL`], to which every
//! replica subscribes (see [`crate::revocation`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, IntoConnectionInfo};
use sha2::Sha256;

use super::{CacheError, CachedJwt, Eviction, SharedCache, now_ms};
use crate::config::Secret;
use crate::decision::Authorization;
use crate::introspection::BoxFuture;
use crate::metrics;
use crate::token::{CacheKey, Token};

/// The pub/sub channel on which evictions travel; a message is a digest in hex, never a token.
pub const EVICTION_CHANNEL: &str = "phantom-authz:v1:evict";

const NONCE_LEN: usize = 12;
const EXPIRY_LEN: usize = 8;

/// The Redis tier.
pub struct RedisCache {
    connection: ConnectionManager,
    /// The client the connection came from, for the eviction subscriber's own connection.
    client: Client,
    timeout: Duration,
    healthy: Arc<RedisHealth>,
}

/// Whether Redis answers, and when to try it again while it does not.
///
/// After [`FAILURES_TO_SKIP`] failed commands in a row, Checks skip Redis for [`RETRY_AFTER`]
/// instead of each paying the command timeout; then one command probes it. A single failure
/// does not count: the first command on a connection Redis dropped fails while the client
/// reconnects. Transitions are logged once, not per Check.
#[derive(Debug, Default)]
pub struct RedisHealth {
    down: AtomicBool,
    failures: AtomicU32,
    retry_at_ms: AtomicU64,
}

/// Consecutive failed commands after which Redis is skipped.
pub const FAILURES_TO_SKIP: u32 = 2;

/// How long Redis is skipped after a failure before one command probes it again.
pub const RETRY_AFTER: Duration = Duration::from_millis(500);

impl RedisHealth {
    /// Whether the last command succeeded; `/readyz` reports it.
    pub fn is_up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// Whether a command may go to Redis now: always while up; while down, one probe per
    /// [`RETRY_AFTER`].
    fn admit(&self) -> bool {
        if self.is_up() {
            return true;
        }
        let now = now_ms();
        let retry_at = self.retry_at_ms.load(Ordering::Relaxed);
        now >= retry_at
            && self
                .retry_at_ms
                .compare_exchange(
                    retry_at,
                    now + RETRY_AFTER.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    fn record(&self, error: Option<&CacheError>) {
        match error {
            None => {
                self.failures.store(0, Ordering::Relaxed);
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("redis answers again; shared cache back in use");
                }
            }
            Some(error) => {
                if self.failures.fetch_add(1, Ordering::Relaxed) + 1 < FAILURES_TO_SKIP {
                    return;
                }
                self.retry_at_ms
                    .store(now_ms() + RETRY_AFTER.as_millis() as u64, Ordering::Relaxed);
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "redis unavailable; introspecting until it answers again");
                }
            }
        }
    }
}

impl RedisCache {
    /// Prepares a lazily connected, self-reconnecting client: Redis may be down at start-up.
    /// `ca_pem`: CAs for a rediss:// server's certificate instead of the system roots.
    pub fn new(url: &Secret, ca_pem: Option<Vec<u8>>, timeout: Duration) -> Result<Self, String> {
        // The URL may carry a password: errors name the flag, never the value.
        let info = url
            .expose()
            .into_connection_info()
            .map_err(|_| "--redis-url: not a valid redis:// or rediss:// URL".to_string())?;
        let info = info.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = match ca_pem {
            Some(pem) => Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            ),
            None => Client::open(info),
        }
        .map_err(|e| {
            format!(
                "--redis-url: cannot build a Redis client ({})",
                e.kind_name()
            )
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(250))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("--redis-url: {}", e.kind_name()))?;
        Ok(Self {
            connection,
            client,
            timeout,
            healthy: Arc::new(RedisHealth::default()),
        })
    }

    /// Whether Redis answers; `/readyz` reports it.
    pub fn health(&self) -> Arc<RedisHealth> {
        self.healthy.clone()
    }

    /// A client for the same server, with the same settings: pub/sub needs its own connection.
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

pub(crate) trait KindName {
    fn kind_name(&self) -> String;
}

impl KindName for redis::RedisError {
    /// The error's category only: Redis error texts may quote arguments.
    fn kind_name(&self) -> String {
        format!("{:?}", self.kind())
    }
}

async fn timed<T>(
    op: &'static str,
    timeout: Duration,
    healthy: &RedisHealth,
    command: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, CacheError> {
    if !healthy.admit() {
        return Err(CacheError::Skipped);
    }
    let started = Instant::now();
    let result = match tokio::time::timeout(timeout, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) if e.is_timeout() => Err(CacheError::Timeout),
        Ok(Err(e)) => Err(CacheError::Redis(e.kind_name())),
        Err(_) => Err(CacheError::Timeout),
    };
    metrics::redis_command(op, started.elapsed(), result.is_ok());
    healthy.record(result.as_ref().err());
    result
}

impl SharedCache for RedisCache {
    fn get<'a>(
        &'a self,
        key: &'a CacheKey,
        token: Token<'a>,
    ) -> BoxFuture<'a, Result<Option<CachedJwt>, CacheError>> {
        Box::pin(async move {
            let redis_key = key.redis_key();
            let mut connection = self.connection.clone();
            let value: Option<Vec<u8>> = timed(
                "get",
                self.timeout,
                &self.healthy,
                connection.get(&redis_key),
            )
            .await?;
            let Some(value) = value else {
                return Ok(None);
            };
            let entry = open(&Sealer::for_token(token), &redis_key, &value)?;
            Ok((entry.expires_at_ms > now_ms()).then_some(entry))
        })
    }

    fn put(
        &self,
        key: &CacheKey,
        token: Token<'_>,
        entry: &CachedJwt,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), CacheError>> {
        let redis_key = key.redis_key();
        let value = seal(&Sealer::for_token(token), &redis_key, entry);
        let mut connection = self.connection.clone();
        let timeout = self.timeout;
        let healthy = self.healthy.clone();
        let ttl_ms = ttl.as_millis().max(1) as u64;
        Box::pin(async move {
            let value = value?;
            timed(
                "set",
                timeout,
                &healthy,
                connection.pset_ex::<_, _, ()>(redis_key, value, ttl_ms),
            )
            .await
        })
    }

    fn evict(&self, key: &CacheKey) -> BoxFuture<'static, Result<Eviction, CacheError>> {
        let mut connection = self.connection.clone();
        let timeout = self.timeout;
        let healthy = self.healthy.clone();
        let mut pipeline = redis::pipe();
        pipeline
            .del(key.redis_key())
            .publish(EVICTION_CHANNEL, key.to_hex());
        Box::pin(async move {
            let (deleted, notified): (u64, u64) = timed(
                "evict",
                timeout,
                &healthy,
                pipeline.query_async(&mut connection),
            )
            .await?;
            Ok(Eviction {
                deleted: deleted > 0,
                notified,
            })
        })
    }
}

/// The AEAD keyed from the token.
pub struct Sealer(Aes256Gcm);

impl Sealer {
    pub fn for_token(token: Token<'_>) -> Self {
        let hkdf = Hkdf::<Sha256>::new(Some(b"phantom-authz cache v1"), token.expose().as_bytes());
        let mut key = [0u8; 32];
        hkdf.expand(b"cache value encryption key", &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        Self(Aes256Gcm::new(&key.into()))
    }
}

/// Encrypts `expiry ‖ JWT-authorization` under a fresh random nonce.
pub fn seal(sealer: &Sealer, redis_key: &str, entry: &CachedJwt) -> Result<Vec<u8>, CacheError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|_| CacheError::Redis("no randomness".into()))?;
    let mut plaintext = Vec::with_capacity(EXPIRY_LEN + entry.authorization.len());
    plaintext.extend_from_slice(&entry.expires_at_ms.to_be_bytes());
    plaintext.extend_from_slice(entry.authorization.as_bytes());
    let ciphertext = sealer
        .0
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &plaintext,
                aad: redis_key.as_bytes(),
            },
        )
        .map_err(|_| CacheError::Corrupt)?;
    let mut value = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    value.extend_from_slice(&nonce);
    value.extend_from_slice(&ciphertext);
    Ok(value)
}

/// Decrypts and checks a value; anything that fails is `Corrupt`.
pub fn open(sealer: &Sealer, redis_key: &str, value: &[u8]) -> Result<CachedJwt, CacheError> {
    if value.len() < NONCE_LEN {
        return Err(CacheError::Corrupt);
    }
    let (nonce, ciphertext) = value.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CacheError::Corrupt)?;
    let plaintext = sealer
        .0
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: ciphertext,
                aad: redis_key.as_bytes(),
            },
        )
        .map_err(|_| CacheError::Corrupt)?;
    if plaintext.len() <= EXPIRY_LEN {
        return Err(CacheError::Corrupt);
    }
    let (expiry, authorization) = plaintext.split_at(EXPIRY_LEN);
    let expires_at_ms = u64::from_be_bytes(expiry.try_into().map_err(|_| CacheError::Corrupt)?);
    let authorization = std::str::from_utf8(authorization).map_err(|_| CacheError::Corrupt)?;
    if !authorization.starts_with("Bearer ") {
        return Err(CacheError::Corrupt);
    }
    Ok(CachedJwt {
        authorization: Authorization::from(authorization),
        expires_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::bearer;
    use crate::token::parse_bearer;

    #[test]
    fn sealed_entries_open_only_with_their_token() {
        let header = "Bearer token-one".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        let other = "Bearer token-two".to_string();
        let other = parse_bearer(&other, 100).unwrap();
        let key = CacheKey::of(token).redis_key();
        let entry = CachedJwt {
            authorization: bearer("eyJ.eyJzdWIiOiJhbGljZSJ9.sig"),
            expires_at_ms: 1_234,
        };
        let sealed = seal(&Sealer::for_token(token), &key, &entry).unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"alice" || w == b"token"));
        assert_eq!(
            open(&Sealer::for_token(token), &key, &sealed),
            Ok(entry.clone())
        );
        assert_eq!(
            open(&Sealer::for_token(other), &key, &sealed),
            Err(CacheError::Corrupt)
        );
        assert_eq!(
            open(&Sealer::for_token(token), "phantom-authz:v1:other", &sealed),
            Err(CacheError::Corrupt)
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(
            open(&Sealer::for_token(token), &key, &tampered),
            Err(CacheError::Corrupt)
        );
        assert_eq!(
            open(&Sealer::for_token(token), &key, b"short"),
            Err(CacheError::Corrupt)
        );
        // Two seals of one entry differ (fresh nonces).
        assert_ne!(
            sealed,
            seal(&Sealer::for_token(token), &key, &entry).unwrap()
        );
    }
}
