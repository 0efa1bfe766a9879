//! The shared tier in Redis: entries that nobody without the cache secret can read, name or
//! forge.
//!
//! For each token and each secret of `--cache-secret-file`, HKDF-SHA256 (salt: the secret,
//! input: the token) gives two independent outputs: the key's name,
//! `phantom-authz:v2:<hex>`, and the AES-256-GCM key that seals its value,
//! `nonce ‖ AES-256-GCM(expiry ‖ claims length ‖ claims ‖ Authorization)`, with the name as
//! associated data. The first
//! secret names and seals new entries; every secret is tried when reading, so a secret can be
//! rotated without a flush. A value that opens is still checked like an IdP answer (a compact
//! JWT that has not expired) before it is used. The TTL lives in Redis (one `SET … PX NX`).
//! Every command is bounded by a timeout; the connection reconnects by itself.
//!
//! An eviction overwrites the token's keys with a short-lived [`TOMBSTONE`] (which writes never
//! overwrite, so a lookup that began before the eviction cannot resurrect the entry), then tells
//! every replica and waits for their confirmations ([`super::evictions`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::{Hkdf, HkdfExtract};
use redis::AsyncCommands;
use sha2::Sha256;

use super::batch::Batcher;
use super::connection::Connection;
pub use super::connection::SetupError;
use super::evictions::{self, Confirmations};
use super::{CacheError, CachedJwt, Eviction, Grant, SharedCache, now_ms};
use crate::config::{RedisTopology, Secret};
use crate::jwt::Claims;
use crate::metrics;
use crate::token::{CacheKey, Token};
use crate::{BoxFuture, jwt};

/// Prefix of every key; a new key or value format gets a new version.
pub const KEY_PREFIX: &str = "phantom-authz:v2:";

/// What an evicted token's keys hold until every lookup that could predate the eviction is over.
pub const TOMBSTONE: &[u8] = b"evicted";

/// Shortest secret accepted: 256 bits.
pub const MIN_SECRET_LEN: usize = 32;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const EXPIRY_LEN: usize = 8;

/// The secrets entries are bound to; the first names and seals, all open.
#[derive(Clone)]
pub struct CacheSecrets(Vec<Keyed>);

impl std::fmt::Debug for CacheSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheSecrets({} × ***)", self.0.len())
    }
}

impl CacheSecrets {
    /// Reads a `--cache-secret-file`: one secret per line, surrounding blanks trimmed, blank
    /// lines skipped. Errors name the line, never its content.
    pub fn parse(text: &str) -> Result<Self, SecretFileError> {
        let mut secrets = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if line.len() < MIN_SECRET_LEN {
                return Err(SecretFileError::TooShort {
                    line: number + 1,
                    len: line.len(),
                });
            }
            secrets.push(Keyed::new(line.as_bytes()));
        }
        if secrets.is_empty() {
            return Err(SecretFileError::Empty);
        }
        Ok(Self(secrets))
    }

    fn slots(&self, token: Token<'_>) -> Vec<Slot> {
        self.0.iter().map(|secret| secret.slot(token)).collect()
    }
}

/// One secret, ready to derive slots from: HMAC's key schedule for it (two SHA-256 blocks of
/// the eleven a Redis lookup hashes) runs once, not per lookup. Holds what the secret keys, so
/// it is as secret: no `Debug`.
#[derive(Clone)]
struct Keyed(HkdfExtract<Sha256>);

impl Keyed {
    fn new(secret: &[u8]) -> Self {
        Self(HkdfExtract::new(Some(secret)))
    }

    /// What [`Slot::derive`] gives for this secret.
    fn slot(&self, token: Token<'_>) -> Slot {
        let mut extract = self.0.clone();
        extract.input_ikm(token.expose().as_bytes());
        Slot::expand(&extract.finalize().1)
    }
}

/// What is wrong with a `--cache-secret-file`; never quotes it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretFileError {
    #[error(
        "line {line} holds {len} bytes; every secret must be {MIN_SECRET_LEN} bytes or more \
         (e.g. `head -c 32 /dev/urandom | base64`)"
    )]
    TooShort { line: usize, len: usize },
    #[error("holds no secret")]
    Empty,
}

/// Where one token's entry lives under one secret, and the AEAD that seals it.
pub struct Slot {
    name: String,
    sealer: Aes256Gcm,
}

impl Slot {
    pub fn derive(secret: &[u8], token: Token<'_>) -> Self {
        Keyed::new(secret).slot(token)
    }

    /// The slot of a token's HKDF state (salt: the secret, input: the token).
    fn expand(hkdf: &Hkdf<Sha256>) -> Self {
        let mut name = [0u8; 32];
        let mut key = [0u8; 32];
        hkdf.expand(b"phantom-authz v2 redis key name", &mut name)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        hkdf.expand(b"phantom-authz v2 value key", &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let mut full = String::with_capacity(KEY_PREFIX.len() + 64);
        full.push_str(KEY_PREFIX);
        for byte in name {
            full.push(char::from(HEX[usize::from(byte >> 4)]));
            full.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        Self {
            name: full,
            sealer: Aes256Gcm::new(&key.into()),
        }
    }

    /// The Redis key.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Encrypts `expiry ‖ claims length ‖ claims (JSON) ‖ Authorization` under a fresh random
    /// nonce.
    pub fn seal(&self, entry: &CachedJwt) -> Result<Vec<u8>, CacheError> {
        let grant = &entry.grant;
        self.seal_parts(entry.expires_at_ms, &grant.claims(), grant.authorization())
    }

    /// [`Slot::seal`] from the parts of an entry, whatever they hold: what a replica holding
    /// the secret could write.
    pub fn seal_parts(
        &self,
        expires_at_ms: u64,
        claims: &Claims,
        authorization: &str,
    ) -> Result<Vec<u8>, CacheError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|_| CacheError::NoRandomness)?;
        let claims = serde_json::to_vec(claims).map_err(|_| CacheError::Corrupt)?;
        let claims_len = u32::try_from(claims.len()).map_err(|_| CacheError::Corrupt)?;
        let mut plaintext = Vec::with_capacity(EXPIRY_LEN + 4 + claims.len() + authorization.len());
        plaintext.extend_from_slice(&expires_at_ms.to_be_bytes());
        plaintext.extend_from_slice(&claims_len.to_be_bytes());
        plaintext.extend_from_slice(&claims);
        plaintext.extend_from_slice(authorization.as_bytes());
        let ciphertext = self
            .sealer
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plaintext,
                    aad: self.name.as_bytes(),
                },
            )
            .map_err(|_| CacheError::Corrupt)?;
        let mut value = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        value.extend_from_slice(&nonce);
        value.extend_from_slice(&ciphertext);
        Ok(value)
    }

    /// Decrypts a value and checks it as an IdP answer would be checked: `Bearer ` and a compact
    /// JWT (so nothing but header-safe bytes), neither the JWT's `exp` nor the entry's expiry
    /// past. Anything else is `Corrupt`.
    pub fn open(&self, value: &mut [u8], now_ms: u64) -> Result<CachedJwt, CacheError> {
        // Decrypted where it lies: a Redis hit copies its kilobyte once less.
        let (nonce, sealed) = value
            .split_at_mut_checked(NONCE_LEN)
            .ok_or(CacheError::Corrupt)?;
        let tag_at = sealed
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(CacheError::Corrupt)?;
        let (plaintext, tag) = sealed.split_at_mut(tag_at);
        let nonce: [u8; NONCE_LEN] = (&*nonce).try_into().map_err(|_| CacheError::Corrupt)?;
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| CacheError::Corrupt)?;
        self.sealer
            .decrypt_inout_detached(
                &Nonce::from(nonce),
                self.name.as_bytes(),
                (&mut *plaintext).into(),
                &Tag::from(tag),
            )
            .map_err(|_| CacheError::Corrupt)?;
        let plaintext: &[u8] = plaintext;
        let (expiry, rest) = plaintext
            .split_at_checked(EXPIRY_LEN)
            .ok_or(CacheError::Corrupt)?;
        let expires_at_ms = u64::from_be_bytes(expiry.try_into().map_err(|_| CacheError::Corrupt)?);
        let (claims_len, rest) = rest.split_at_checked(4).ok_or(CacheError::Corrupt)?;
        let claims_len =
            u32::from_be_bytes(claims_len.try_into().map_err(|_| CacheError::Corrupt)?);
        let (claims, authorization) = rest
            .split_at_checked(claims_len as usize)
            .ok_or(CacheError::Corrupt)?;
        let claims: Claims = serde_json::from_slice(claims).map_err(|_| CacheError::Corrupt)?;
        let authorization = std::str::from_utf8(authorization).map_err(|_| CacheError::Corrupt)?;
        let jwt = authorization
            .strip_prefix("Bearer ")
            .ok_or(CacheError::Corrupt)?;
        let jwt_exp = jwt::exp(jwt).map_err(|_| CacheError::Corrupt)?;
        let expired = jwt_exp.is_some_and(|exp| exp.saturating_mul(1000) <= now_ms);
        if expired || expires_at_ms <= now_ms {
            return Err(CacheError::Corrupt);
        }
        Ok(CachedJwt {
            grant: Grant::new(jwt, &claims),
            expires_at_ms,
        })
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The Redis tier.
pub struct RedisCache {
    connection: Connection,
    /// Batches lookups into pipelines, where the topology allows it.
    batcher: Option<Arc<Batcher>>,
    /// Each command's metrics, resolved once.
    metrics: Commands,
    secrets: CacheSecrets,
    timeout: Duration,
    /// How long a tombstone outlives the eviction: past the longest lookup that could predate it.
    tombstone_ttl: Duration,
    healthy: Arc<RedisHealth>,
    /// This replica's evictions waiting for confirmations.
    confirmations: Arc<Confirmations>,
}

/// The metrics of each command the tier sends.
struct Commands {
    get: metrics::RedisCommand,
    set: metrics::RedisCommand,
    evict: metrics::RedisCommand,
    confirm: metrics::RedisCommand,
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
    /// Prepares a lazily connected, self-reconnecting client for `urls` in `topology`: Redis
    /// may be down at start-up. `ca_pem`: CAs for rediss:// servers' certificates instead of
    /// the system roots. `tombstone_ttl` must exceed the longest lookup (Redis, introspection,
    /// write).
    pub fn new(
        urls: &[Secret],
        topology: &RedisTopology,
        ca_pem: Option<Vec<u8>>,
        secrets: CacheSecrets,
        timeout: Duration,
        tombstone_ttl: Duration,
    ) -> Result<Self, SetupError> {
        let connection = Connection::new(urls, topology, ca_pem, timeout)?;
        Ok(Self {
            batcher: connection
                .pipelines_across_keys()
                .then(|| Batcher::new(connection.clone(), timeout)),
            connection,
            metrics: Commands {
                get: metrics::RedisCommand::new("get"),
                set: metrics::RedisCommand::new("set"),
                evict: metrics::RedisCommand::new("evict"),
                confirm: metrics::RedisCommand::new("confirm"),
            },
            secrets,
            timeout,
            tombstone_ttl,
            healthy: Arc::new(RedisHealth::default()),
            confirmations: Arc::default(),
        })
    }

    /// Whether Redis answers; `/readyz` reports it.
    pub fn health(&self) -> Arc<RedisHealth> {
        self.healthy.clone()
    }

    /// The connection, for the eviction subscriber to find where to subscribe.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Tells the evicting replica that this one dropped its copy (`id` as it came, in hex).
    pub async fn confirm(&self, id: &str) -> Result<(), CacheError> {
        let mut connection = self.connection.clone();
        timed(
            &self.metrics.confirm,
            self.timeout,
            &self.healthy,
            &self.connection,
            connection.publish::<_, _, ()>(evictions::CONFIRM_CHANNEL, id),
        )
        .await
    }

    /// This replica's evictions waiting for confirmations.
    pub fn confirmations(&self) -> &Confirmations {
        &self.confirmations
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

/// Runs `command` within `timeout`, unless Redis is being skipped; records the outcome in the
/// metrics and `healthy`, and tells `connection` of a failure.
async fn timed<T, E: Into<CacheError>>(
    op: &metrics::RedisCommand,
    timeout: Duration,
    healthy: &RedisHealth,
    connection: &Connection,
    command: impl Future<Output = Result<T, E>>,
) -> Result<T, CacheError> {
    if !healthy.admit() {
        return Err(CacheError::Skipped);
    }
    let started = Instant::now();
    let result = match tokio::time::timeout(timeout, command).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(CacheError::Timeout),
    };
    op.finished(started.elapsed(), result.is_ok());
    if result.is_err() {
        connection.failed();
    }
    healthy.record(result.as_ref().err());
    result
}

impl SharedCache for RedisCache {
    fn get<'a>(&'a self, token: Token<'a>) -> BoxFuture<'a, Result<Option<CachedJwt>, CacheError>> {
        Box::pin(async move {
            let slots = self.secrets.slots(token);
            let lookup = async {
                match &self.batcher {
                    Some(batcher) => {
                        batcher
                            .get(slots.iter().map(|s| s.name.clone()).collect())
                            .await
                    }
                    None => {
                        let mut connection = self.connection.clone();
                        match slots.as_slice() {
                            [slot] => connection.get(slot.name()).await.map(|value| vec![value]),
                            slots => {
                                let names: Vec<&str> = slots.iter().map(Slot::name).collect();
                                connection.mget(&names).await
                            }
                        }
                        .map_err(CacheError::from)
                    }
                }
            };
            let values = timed(
                &self.metrics.get,
                self.timeout,
                &self.healthy,
                &self.connection,
                lookup,
            )
            .await?;
            let now_ms = now_ms();
            let mut corrupt = false;
            for (slot, mut value) in slots.iter().zip(values) {
                match value.as_deref_mut() {
                    None => {}
                    // Evicted moments ago: a miss, whatever another secret's key holds.
                    Some(value) if *value == *TOMBSTONE => return Ok(None),
                    Some(value) => match slot.open(value, now_ms) {
                        Ok(entry) => return Ok(Some(entry)),
                        Err(_) => corrupt = true,
                    },
                }
            }
            if corrupt {
                Err(CacheError::Corrupt)
            } else {
                Ok(None)
            }
        })
    }

    fn put(
        &self,
        token: Token<'_>,
        entry: &CachedJwt,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), CacheError>> {
        let slot = self.secrets.0[0].slot(token);
        let value = slot.seal(entry);
        let mut connection = self.connection.clone();
        // Told of failures while `connection` is borrowed by a command.
        let failures = self.connection.clone();
        let command = self.metrics.set.clone();
        let timeout = self.timeout;
        let healthy = self.healthy.clone();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        Box::pin(async move {
            let value = value?;
            // NX: an entry already there is as good as ours, and a tombstone must stay.
            let mut set = redis::cmd("SET");
            set.arg(slot.name())
                .arg(value)
                .arg("PX")
                .arg(ttl_ms)
                .arg("NX");
            timed(
                &command,
                timeout,
                &healthy,
                &failures,
                set.query_async::<Option<String>>(&mut connection),
            )
            .await
            .map(drop)
        })
    }

    fn evict(
        &self,
        key: &CacheKey,
        token: Token<'_>,
    ) -> BoxFuture<'static, Result<Eviction, CacheError>> {
        let slots = self.secrets.slots(token);
        let mut connection = self.connection.clone();
        // Told of failures while `connection` is borrowed by a command.
        let failures = self.connection.clone();
        let command = self.metrics.evict.clone();
        let timeout = self.timeout;
        let healthy = self.healthy.clone();
        let tombstone_ms = u64::try_from(self.tombstone_ttl.as_millis()).unwrap_or(u64::MAX);
        let awaited = self.confirmations.expect();
        let notice = evictions::notice(key, awaited.id);
        Box::pin(async move {
            // Tombstones first: a replica told of the eviction must find them in place. One
            // command per key: in a cluster, each secret's key has a slot of its own.
            let mut deleted = false;
            for slot in &slots {
                let mut tombstone = redis::cmd("SET");
                tombstone
                    .arg(slot.name())
                    .arg(TOMBSTONE)
                    .arg("PX")
                    .arg(tombstone_ms)
                    .arg("GET");
                let previous: Option<Vec<u8>> = timed(
                    &command,
                    timeout,
                    &healthy,
                    &failures,
                    tombstone.query_async(&mut connection),
                )
                .await?;
                deleted |= previous.is_some_and(|value| value != TOMBSTONE);
            }
            let notified = timed(
                &command,
                timeout,
                &healthy,
                &failures,
                connection.publish_counted(evictions::EVICTION_CHANNEL, &notice),
            )
            .await?;
            let confirmed = awaited.confirmed_by(notified).await;
            Ok(Eviction {
                deleted,
                notified,
                confirmed,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::parse_token;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn jwt(exp: u64) -> String {
        crate::jwt::tests::jwt(&format!(r#"{{"sub":"alice","exp":{exp}}}"#))
    }

    #[test]
    fn entries_open_only_with_their_token_and_secret() {
        let token = parse_token("token-one", 100).unwrap();
        let other = parse_token("token-two", 100).unwrap();
        let now = 1_700_000_000_000;
        let entry = CachedJwt {
            grant: Grant::new(
                &jwt(1_800_000_000),
                &Claims {
                    sub: Some("alice".into()),
                    scopes: vec!["orders:read".into()],
                    ..Claims::default()
                },
            ),
            expires_at_ms: now + 60_000,
        };
        let slot = Slot::derive(SECRET, token);
        assert!(slot.name().starts_with(KEY_PREFIX));
        let sealed = slot.seal(&entry).unwrap();
        assert!(
            !sealed
                .windows(5)
                .any(|w| w == b"alice" || w == b"token" || w == b"order")
        );
        assert_eq!(slot.open(&mut sealed.clone(), now), Ok(entry.clone()));
        // Another token, or another secret, names another key and opens nothing.
        let theirs = Slot::derive(SECRET, other);
        assert_ne!(theirs.name(), slot.name());
        assert_eq!(
            theirs.open(&mut sealed.clone(), now),
            Err(CacheError::Corrupt)
        );
        let rotated = Slot::derive(b"another secret of thirty-two bytes!", token);
        assert_ne!(rotated.name(), slot.name());
        assert_eq!(
            rotated.open(&mut sealed.clone(), now),
            Err(CacheError::Corrupt)
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(slot.open(&mut tampered, now), Err(CacheError::Corrupt));
        assert_eq!(
            slot.open(&mut b"short".to_vec(), now),
            Err(CacheError::Corrupt)
        );
        // Expired, by the entry's own expiry or by the JWT's.
        assert_eq!(
            slot.open(&mut sealed.clone(), now + 60_000),
            Err(CacheError::Corrupt)
        );
        let stale = CachedJwt {
            grant: Grant::new(&jwt(1_000), &Claims::default()),
            ..entry.clone()
        };
        assert_eq!(
            slot.open(&mut slot.seal(&stale).unwrap(), now),
            Err(CacheError::Corrupt)
        );
        // Two seals of one entry differ (fresh nonces).
        assert_ne!(sealed, slot.seal(&entry).unwrap());
    }

    #[test]
    fn a_keyed_secret_derives_what_plain_hkdf_derives() {
        // Entries written before the key schedule was kept per secret must still be found.
        let token = parse_token("token-one", 100).unwrap();
        let slot = CacheSecrets::parse(std::str::from_utf8(SECRET).unwrap())
            .unwrap()
            .slots(token)
            .remove(0);
        let plain = Hkdf::<Sha256>::new(Some(SECRET), b"token-one");
        let mut name = [0u8; 32];
        plain
            .expand(b"phantom-authz v2 redis key name", &mut name)
            .unwrap();
        let hex: String = name.iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(slot.name(), format!("{KEY_PREFIX}{hex}"));
        let mut key = [0u8; 32];
        plain
            .expand(b"phantom-authz v2 value key", &mut key)
            .unwrap();
        let entry = CachedJwt {
            grant: Grant::new(&jwt(1_800_000_000), &Claims::default()),
            expires_at_ms: u64::MAX,
        };
        let mut sealed = slot.seal(&entry).unwrap();
        let (nonce, sealed_data) = sealed.split_at_mut(NONCE_LEN);
        let opened = Aes256Gcm::new(&key.into()).decrypt(
            &Nonce::try_from(&*nonce).unwrap(),
            Payload {
                msg: sealed_data,
                aad: slot.name().as_bytes(),
            },
        );
        assert!(opened.is_ok());
    }

    #[test]
    fn a_sealed_value_that_is_no_jwt_is_refused() {
        let token = parse_token("token-one", 100).unwrap();
        let slot = Slot::derive(SECRET, token);
        for forged in [
            "Bearer not.a.jwt\r\nX-Injected: yes",
            "Bearer a.b",
            "Basic YWxhZGRpbjpvcGVuc2VzYW1l",
            "",
        ] {
            let sealed = slot
                .seal_parts(u64::MAX, &Claims::default(), forged)
                .unwrap();
            assert_eq!(
                slot.open(&mut sealed.clone(), 1),
                Err(CacheError::Corrupt),
                "{forged:?}"
            );
        }
    }

    #[test]
    fn secret_files_need_long_enough_secrets() {
        let two = CacheSecrets::parse(&format!("\n  {}  \n{}\n", "a".repeat(32), "b".repeat(40)))
            .unwrap();
        assert_eq!(two.0.len(), 2);
        assert!(!format!("{two:?}").contains("aaaa"));
        let err = CacheSecrets::parse(&format!("{}\nshort-secret\n", "a".repeat(32))).unwrap_err();
        assert_eq!(err, SecretFileError::TooShort { line: 2, len: 12 });
        assert!(!err.to_string().contains("short-secret"), "{err}");
        assert!(CacheSecrets::parse(" \n\n").is_err());
    }
}
