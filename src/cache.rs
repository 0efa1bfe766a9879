//! The cache tiers holding token→JWT entries ([`Grant`]s): [`local`] in process, [`redis`]
//! shared between replicas behind the [`SharedCache`] trait (over one server, a Redis Cluster or
//! Sentinel: [`connection`]; lookups made together pipelined by [`batch`]), and [`evictions`],
//! how replicas tell each other to drop an entry. Allows are cached in both tiers, inactive
//! tokens briefly in process only.

pub mod batch;
pub mod connection;
pub mod evictions;
mod grant;
pub mod local;
pub mod redis;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use grant::Grant;

use crate::BoxFuture;
use crate::token::{CacheKey, Token};

impl local::Weigh for Grant {
    fn weight(&self) -> u64 {
        self.size() as u64
    }
}

/// A cached allow: the grant and when the entry dies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedJwt {
    pub grant: Grant,
    /// Milliseconds since the epoch after which the entry must not be used.
    pub expires_at_ms: u64,
}

impl CachedJwt {
    /// Time left before expiry, zero if already expired.
    pub fn remaining(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.expires_at_ms.saturating_sub(now_ms))
    }
}

/// Why the shared cache could not answer. A Check never fails for it: it introspects instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("redis command timed out")]
    Timeout,
    /// Redis answered with an error, or the connection failed; only the error's kind is kept,
    /// since Redis error texts may quote arguments.
    #[error("redis error: {0:?}")]
    Redis(::redis::ErrorKind),
    /// The system gave no randomness for a nonce: the entry is not written.
    #[error("no randomness for a nonce")]
    NoRandomness,
    /// Redis failed moments ago and is skipped until its next probe.
    #[error("redis skipped while unavailable")]
    Skipped,
    /// The entry was there but did not decrypt or parse.
    #[error("cache entry failed to decrypt or parse")]
    Corrupt,
}

impl From<::redis::RedisError> for CacheError {
    fn from(error: ::redis::RedisError) -> Self {
        if error.is_timeout() {
            CacheError::Timeout
        } else {
            CacheError::Redis(error.kind())
        }
    }
}

impl From<::redis::ParsingError> for CacheError {
    fn from(_: ::redis::ParsingError) -> Self {
        CacheError::Redis(::redis::ErrorKind::Parse)
    }
}

/// The cache every replica shares.
pub trait SharedCache: Send + Sync {
    /// Looks up the entry for `token`, opening it with what only a holder of both the token
    /// and the cache secret can derive.
    fn get<'a>(&'a self, token: Token<'a>) -> BoxFuture<'a, Result<Option<CachedJwt>, CacheError>>;

    /// Prepares the write now (sealing the entry needs the token) and returns a future that owns
    /// everything it needs, so the caller can run it after answering Envoy.
    fn put(
        &self,
        token: Token<'_>,
        entry: &CachedJwt,
        ttl: Duration,
    ) -> BoxFuture<'static, Result<(), CacheError>>;

    /// Deletes the entry for `token` (in-process key `key`), tells every replica to drop its
    /// in-process copy, and waits for them to confirm.
    fn evict(
        &self,
        key: &CacheKey,
        token: Token<'_>,
    ) -> BoxFuture<'static, Result<Eviction, CacheError>>;
}

/// What an eviction reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Eviction {
    /// The shared cache held an entry for the key.
    pub deleted: bool,
    /// Replicas (the evicting one included) that received the notice to drop their copy.
    pub notified: u64,
    /// Replicas that confirmed they dropped it before the eviction returned.
    pub confirmed: u64,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
