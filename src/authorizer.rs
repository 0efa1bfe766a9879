//! The flow of one Check once a token is in hand: local cache, Redis, then at most one
//! introspection per token at a time, and the TTL under which an allow is remembered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tracing::Instrument as _;

use crate::cache::local::LocalCache;
use crate::cache::{CacheError, CachedJwt, Eviction, SharedCache, now_ms};
use crate::decision::{AllowedJwt, Outcome, bearer};
use crate::introspection::{ActiveToken, CacheDirective, IdpError, Introspect, Introspected};
use crate::metrics::{self, Lookup, Tier};
use crate::telemetry;
use crate::token::{CacheKey, Token};

/// How long entries live in each tier.
#[derive(Clone, Copy, Debug)]
pub struct Ttls {
    /// Used when the IdP sends no `max-age`.
    pub default: Duration,
    /// Cap on in-process entries while Redis is the source of truth; `None` without Redis,
    /// where the in-process tier is the only cache and keeps entries for their whole TTL.
    pub local_cap: Option<Duration>,
}

/// Answers Checks for tokens: owns the cache tiers and the identity server client.
pub struct Authorizer {
    local: Option<LocalCache>,
    shared: Option<Arc<dyn SharedCache>>,
    idp: Arc<dyn Introspect>,
    ttls: Ttls,
    flights: Mutex<HashMap<CacheKey, Arc<OnceCell<Outcome>>>>,
}

impl Authorizer {
    pub fn new(
        local: Option<LocalCache>,
        shared: Option<Arc<dyn SharedCache>>,
        idp: Arc<dyn Introspect>,
        ttls: Ttls,
    ) -> Self {
        Self {
            local,
            shared,
            idp,
            ttls,
            flights: Mutex::new(HashMap::new()),
        }
    }

    /// Decides for one bearer token.
    pub async fn authorize(&self, token: Token<'_>) -> Outcome {
        let key = CacheKey::of(token);
        if let Some(local) = &self.local {
            let span = telemetry::cache_span(Tier::Local);
            if let Some(authorization) = span.in_scope(|| local.get(&key)) {
                looked_up(&span, Tier::Local, Lookup::Hit);
                return Outcome::Allow(AllowedJwt(authorization));
            }
            looked_up(&span, Tier::Local, Lookup::Miss);
        }
        // Concurrent Checks of one token share a single Redis lookup and IdP call. If the
        // Check leading the flight is cancelled, a waiting one takes over.
        let flight = Flight::join(&self.flights, key);
        flight
            .cell
            .get_or_init(|| self.resolve(key, token))
            .await
            .clone()
    }

    async fn resolve(&self, key: CacheKey, token: Token<'_>) -> Outcome {
        if let Some(shared) = &self.shared {
            let span = telemetry::cache_span(Tier::Redis);
            match shared.get(&key, token).instrument(span.clone()).await {
                Ok(Some(entry)) => {
                    looked_up(&span, Tier::Redis, Lookup::Hit);
                    self.remember_locally(key, &entry);
                    return Outcome::Allow(AllowedJwt(entry.authorization));
                }
                Ok(None) => looked_up(&span, Tier::Redis, Lookup::Miss),
                Err(CacheError::Corrupt) => {
                    looked_up(&span, Tier::Redis, Lookup::Invalid);
                    tracing::warn!(key = ?key, "redis entry failed to decrypt; introspecting");
                }
                Err(error) => {
                    // Outages are logged once by the Redis tier, not once per Check.
                    looked_up(&span, Tier::Redis, Lookup::Error);
                    tracing::debug!(%error, "redis lookup failed; introspecting");
                }
            }
        }
        let span = telemetry::introspection_span();
        let introspected = self.idp.introspect(token).instrument(span.clone()).await;
        telemetry::record_introspection(
            &span,
            match &introspected {
                Ok(Introspected::Active(_)) => "active",
                Ok(Introspected::Inactive) => "inactive",
                Err(error) => error.label(),
            },
        );
        drop(span);
        match introspected {
            Ok(Introspected::Active(active)) => self.admit(key, token, active),
            Ok(Introspected::Inactive) => Outcome::Inactive,
            Err(error) => {
                tracing::warn!(%error, "introspection failed");
                idp_failure(&error)
            }
        }
    }

    /// Turns an active answer into an allow, and caches it for as long as it may be.
    fn admit(&self, key: CacheKey, token: Token<'_>, active: ActiveToken) -> Outcome {
        let now_ms = now_ms();
        let Some(ttl) = cache_ttl(&active, self.ttls.default, now_ms) else {
            tracing::warn!("identity server vouched for an expired JWT; denying");
            return Outcome::ExpiredJwt;
        };
        let entry = CachedJwt {
            authorization: bearer(&active.jwt),
            expires_at_ms: now_ms + ttl.as_millis() as u64,
        };
        if !ttl.is_zero() {
            self.remember_locally(key, &entry);
            if let Some(shared) = &self.shared {
                // The write does not delay the answer; its failure is counted inside.
                let write = shared.put(&key, token, &entry, ttl);
                tokio::spawn(async move {
                    if let Err(error) = write.await {
                        tracing::debug!(%error, "redis write failed");
                    }
                });
            }
        }
        Outcome::Allow(AllowedJwt(entry.authorization))
    }

    fn remember_locally(&self, key: CacheKey, entry: &CachedJwt) {
        let Some(local) = &self.local else { return };
        let remaining = entry.remaining(now_ms());
        let ttl = match self.ttls.local_cap {
            Some(cap) => remaining.min(cap),
            None => remaining,
        };
        local.put(key, entry.authorization.clone(), ttl);
    }

    /// Drops a token's in-process entry.
    pub fn forget_locally(&self, key: &CacheKey) {
        if let Some(local) = &self.local {
            local.remove(key);
        }
    }

    /// Drops every in-process entry, for when evictions may have been missed.
    pub fn forget_all_locally(&self) {
        if let Some(local) = &self.local {
            local.clear();
        }
    }

    /// Revokes a token's cached allow: here first, so this replica stops serving it even when
    /// Redis fails, then in Redis and, through it, on every replica.
    pub async fn evict(&self, key: &CacheKey) -> Result<Eviction, CacheError> {
        self.forget_locally(key);
        match &self.shared {
            Some(shared) => shared.evict(key).await,
            None => Ok(Eviction::default()),
        }
    }
}

/// The TTL for an active answer: `max-age` or the default, never past the JWT's or the
/// response's `exp`. `None` when the JWT has already expired; zero means do not cache.
pub fn cache_ttl(active: &ActiveToken, default: Duration, now_ms: u64) -> Option<Duration> {
    let mut ttl = match active.cache {
        CacheDirective::Unspecified => default,
        CacheDirective::MaxAge(max_age) => max_age,
        CacheDirective::DoNotCache => Duration::ZERO,
    };
    if let Some(exp) = active.jwt_exp {
        let exp_ms = exp.saturating_mul(1000);
        if exp_ms <= now_ms {
            return None;
        }
        ttl = ttl.min(Duration::from_millis(exp_ms - now_ms));
    }
    if let Some(exp) = active.response_exp {
        ttl = ttl.min(Duration::from_millis(
            exp.saturating_mul(1000).saturating_sub(now_ms),
        ));
    }
    Some(ttl)
}

/// Counts a cache lookup and records it on the lookup's span.
fn looked_up(span: &tracing::Span, tier: Tier, result: Lookup) {
    metrics::cache_lookup(tier, result);
    telemetry::record_lookup(span, result);
}

/// Maps an introspection failure to what Envoy is told.
pub fn idp_failure(error: &IdpError) -> Outcome {
    match error {
        IdpError::Unreachable
        | IdpError::Timeout
        | IdpError::Status(503)
        | IdpError::CircuitOpen
        | IdpError::Overloaded => Outcome::IdpUnavailable,
        IdpError::Status(401 | 403 | 404 | 500..=502 | 504..=599) => Outcome::IdpRejected,
        IdpError::Status(_) => Outcome::IdpUnexpected,
        IdpError::BadResponse(_) => Outcome::IdpBadResponse,
    }
}

/// A Check's place in the flight for its token; leaving removes the flight once it is done.
struct Flight<'a> {
    flights: &'a Mutex<HashMap<CacheKey, Arc<OnceCell<Outcome>>>>,
    key: CacheKey,
    cell: Arc<OnceCell<Outcome>>,
}

impl<'a> Flight<'a> {
    fn join(flights: &'a Mutex<HashMap<CacheKey, Arc<OnceCell<Outcome>>>>, key: CacheKey) -> Self {
        let cell = flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        Self { flights, key, cell }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        let Some(current) = flights.get(&self.key) else {
            return;
        };
        // Remove a finished flight (later Checks find the caches filled), or an abandoned one
        // that nobody else holds; never one that others still wait on.
        let ours = Arc::ptr_eq(current, &self.cell);
        if ours && (self.cell.initialized() || Arc::strong_count(&self.cell) <= 2) {
            flights.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::introspection::BoxFuture;
    use crate::token::parse_bearer;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An IdP double: every call waits, then answers the scripted result.
    struct ScriptedIdp {
        calls: AtomicUsize,
        delay: Duration,
        answer: Result<Introspected, IdpError>,
    }

    impl Introspect for ScriptedIdp {
        fn introspect<'a>(
            &'a self,
            _token: Token<'a>,
        ) -> BoxFuture<'a, Result<Introspected, IdpError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                self.answer.clone()
            })
        }
    }

    fn active(cache: CacheDirective, jwt_exp: Option<u64>) -> ActiveToken {
        ActiveToken {
            jwt: "h.p.s".into(),
            jwt_exp,
            response_exp: None,
            cache,
        }
    }

    fn authorizer(idp: Arc<ScriptedIdp>) -> Authorizer {
        Authorizer::new(
            Some(LocalCache::new(100, 1 << 20)),
            None,
            idp,
            Ttls {
                default: Duration::from_secs(300),
                local_cap: None,
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_checks_share_one_introspection() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(5),
            answer: Ok(Introspected::Active(active(
                CacheDirective::Unspecified,
                None,
            ))),
        });
        let authorizer = Arc::new(authorizer(idp.clone()));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let authorizer = authorizer.clone();
                tokio::spawn(async move {
                    let header = "Bearer same-token".to_string();
                    authorizer
                        .authorize(parse_bearer(&header, 100).unwrap())
                        .await
                })
            })
            .collect();
        for task in tasks {
            assert!(matches!(task.await.unwrap(), Outcome::Allow(_)));
        }
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
        assert!(authorizer.flights.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_shared_and_not_cached() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(5),
            answer: Err(IdpError::Status(503)),
        });
        let authorizer = Arc::new(authorizer(idp.clone()));
        let header = "Bearer flaky".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        let (a, b) = tokio::join!(authorizer.authorize(token), authorizer.authorize(token));
        assert_eq!((a, b), (Outcome::IdpUnavailable, Outcome::IdpUnavailable));
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
        assert_eq!(authorizer.authorize(token).await, Outcome::IdpUnavailable);
        assert_eq!(idp.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_flight_is_cleaned_up() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_secs(10),
            answer: Ok(Introspected::Inactive),
        });
        let authorizer = authorizer(idp.clone());
        let header = "Bearer slow".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        let timed_out =
            tokio::time::timeout(Duration::from_millis(10), authorizer.authorize(token)).await;
        assert!(timed_out.is_err());
        assert!(authorizer.flights.lock().unwrap().is_empty());
    }

    /// A shared-cache double whose eviction always fails, as when Redis is down.
    struct DownCache;

    impl SharedCache for DownCache {
        fn get<'a>(
            &'a self,
            _key: &'a CacheKey,
            _token: Token<'a>,
        ) -> BoxFuture<'a, Result<Option<CachedJwt>, CacheError>> {
            Box::pin(async { Err(CacheError::Timeout) })
        }

        fn put(
            &self,
            _key: &CacheKey,
            _token: Token<'_>,
            _entry: &CachedJwt,
            _ttl: Duration,
        ) -> BoxFuture<'static, Result<(), CacheError>> {
            Box::pin(async { Err(CacheError::Timeout) })
        }

        fn evict(&self, _key: &CacheKey) -> BoxFuture<'static, Result<Eviction, CacheError>> {
            Box::pin(async { Err(CacheError::Timeout) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_drops_the_local_copy_even_when_redis_fails() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::ZERO,
            answer: Ok(Introspected::Active(active(
                CacheDirective::Unspecified,
                None,
            ))),
        });
        let ttls = Ttls {
            default: Duration::from_secs(300),
            local_cap: Some(Duration::from_secs(60)),
        };
        let with_redis = Authorizer::new(
            Some(LocalCache::new(100, 1 << 20)),
            Some(Arc::new(DownCache)),
            idp.clone(),
            ttls,
        );
        let header = "Bearer revoked".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        let key = CacheKey::of(token);
        with_redis.authorize(token).await;
        with_redis.authorize(token).await;
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
        assert_eq!(with_redis.evict(&key).await, Err(CacheError::Timeout));
        with_redis.authorize(token).await;
        assert_eq!(idp.calls.load(Ordering::SeqCst), 2);

        // Without Redis, an eviction is local only and reaches nobody else.
        let alone = authorizer(idp.clone());
        alone.authorize(token).await;
        assert_eq!(alone.evict(&key).await, Ok(Eviction::default()));
        alone.authorize(token).await;
        assert_eq!(idp.calls.load(Ordering::SeqCst), 4);
        alone.forget_all_locally();
        alone.authorize(token).await;
        assert_eq!(idp.calls.load(Ordering::SeqCst), 5);
    }

    #[test]
    fn ttl_rules() {
        let now = 1_000_000_000_000; // ms
        let default = Duration::from_secs(300);
        let ttl = |cache, exp| cache_ttl(&active(cache, exp), default, now);
        assert_eq!(ttl(CacheDirective::Unspecified, None), Some(default));
        assert_eq!(
            ttl(CacheDirective::MaxAge(Duration::from_secs(60)), None),
            Some(Duration::from_secs(60))
        );
        assert_eq!(ttl(CacheDirective::DoNotCache, None), Some(Duration::ZERO));
        // exp 30 s away caps both the default and a longer max-age.
        assert_eq!(
            ttl(CacheDirective::Unspecified, Some(now / 1000 + 30)),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            ttl(
                CacheDirective::MaxAge(Duration::from_secs(600)),
                Some(now / 1000 + 30)
            ),
            Some(Duration::from_secs(30))
        );
        // An expired JWT is never handed out.
        assert_eq!(ttl(CacheDirective::Unspecified, Some(now / 1000)), None);
        let mut json = active(CacheDirective::Unspecified, None);
        json.response_exp = Some(now / 1000 + 5);
        assert_eq!(cache_ttl(&json, default, now), Some(Duration::from_secs(5)));
    }

    #[test]
    fn idp_statuses_map_to_rows() {
        for status in [401, 403, 404, 500, 501, 502, 504, 599] {
            assert_eq!(
                idp_failure(&IdpError::Status(status)),
                Outcome::IdpRejected,
                "{status}"
            );
        }
        for status in [400, 301, 302, 418, 429, 204, 201] {
            assert_eq!(
                idp_failure(&IdpError::Status(status)),
                Outcome::IdpUnexpected,
                "{status}"
            );
        }
        assert_eq!(idp_failure(&IdpError::Status(503)), Outcome::IdpUnavailable);
        assert_eq!(idp_failure(&IdpError::Timeout), Outcome::IdpUnavailable);
        assert_eq!(idp_failure(&IdpError::Unreachable), Outcome::IdpUnavailable);
        assert_eq!(
            idp_failure(&IdpError::BadResponse("x")),
            Outcome::IdpBadResponse
        );
    }
}
