//! The flow of one Check once a token is in hand: local cache, then Redis, then one flight per
//! token to the IdP, and the TTL under which an answer is remembered.
//!
//! A Check reads Redis itself: a Redis hit costs one pipelined `GET` and no task. Checks that
//! find a flight under way join it instead of reading Redis; Checks of one token that meet
//! before any flight each read Redis, and after a miss join one flight, or find what a flight
//! that landed meanwhile left in the in-process tiers. With no in-process tier
//! (`--local-cache-ttl 0`), a Check whose Redis read outlasts such a flight introspects again: a
//! burst then costs at most about one IdP call per Redis read time. A flight
//! runs as a task of its own, not inside the Check that started it: Envoy cancels a Check at its
//! deadline, and the introspection goes on to its end anyway (bounded by the IdP client's
//! timeout), is counted by the guard and the metrics, and fills the caches, so the retry is a hit
//! instead of another call to a slow IdP. A Check cancelled while it reads Redis hands its lookup
//! to a flight the same way ([`Handoff`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument as _;

use crate::cache::local::{Generation, LocalCache};
use crate::cache::{CacheError, CachedJwt, Eviction, Grant, SharedCache, now_ms};
use crate::decision::{AllowedJwt, Outcome};
use crate::introspection::{ActiveToken, CacheDirective, IdpError, Introspect, Introspected};
use crate::metrics::{self, Lookup, Tier, TierLookups};
use crate::telemetry;
use crate::token::{CacheKey, OwnedToken, Token};

/// How long entries live in each tier, and how long a Check waits.
#[derive(Clone, Copy, Debug)]
pub struct Ttls {
    /// Used when the IdP sends no `max-age`.
    pub default: Duration,
    /// No entry lives longer, whatever the IdP says.
    pub max: Duration,
    /// Cap on in-process entries while Redis is the source of truth; `None` without Redis,
    /// where the in-process tier is the only cache and keeps entries for their whole TTL.
    pub local_cap: Option<Duration>,
    /// How long a token the IdP called inactive is answered 401 without asking again; zero
    /// turns the negative cache off.
    pub inactive: Duration,
    /// Longest a Check waits for its flight; it then gets 503 while the flight goes on.
    pub check_timeout: Duration,
}

/// Most inactive tokens remembered at once; a flood of distinct tokens displaces old ones.
const INACTIVE_MAX_ENTRIES: usize = 50_000;

/// A flight's answer, once there is one.
type Answer = watch::Receiver<Option<Outcome>>;

/// Answers Checks for tokens: owns the cache tiers and the identity server client.
pub struct Authorizer {
    local: Option<LocalCache<Grant>>,
    inactive: Option<LocalCache<()>>,
    shared: Option<Arc<dyn SharedCache>>,
    idp: Arc<dyn Introspect>,
    ttls: Ttls,
    flights: Mutex<HashMap<CacheKey, Answer>>,
    /// Hit and miss counters of the tiers present, by [`Tier`], resolved once.
    lookups: [Option<TierLookups>; 3],
}

impl Authorizer {
    pub fn new(
        local: Option<LocalCache<Grant>>,
        shared: Option<Arc<dyn SharedCache>>,
        idp: Arc<dyn Introspect>,
        ttls: Ttls,
    ) -> Self {
        let inactive = (!ttls.inactive.is_zero()).then(|| {
            LocalCache::new(INACTIVE_MAX_ENTRIES, INACTIVE_MAX_ENTRIES as u64 * 128)
                .without_gauges()
        });
        let lookups = [
            local.is_some().then(|| TierLookups::new(Tier::Local)),
            inactive.is_some().then(|| TierLookups::new(Tier::Inactive)),
            shared.is_some().then(|| TierLookups::new(Tier::Redis)),
        ];
        Self {
            local,
            inactive,
            shared,
            idp,
            ttls,
            flights: Mutex::new(HashMap::new()),
            lookups,
        }
    }

    /// Decides for one bearer token.
    pub async fn authorize(self: &Arc<Self>, token: Token<'_>) -> Outcome {
        let key = CacheKey::of(token);
        if let Some(local) = &self.local {
            let span = telemetry::cache_span(Tier::Local);
            if let Some(grant) = span.in_scope(|| local.get(&key)) {
                self.looked_up(&span, Tier::Local, Lookup::Hit);
                return Outcome::Allow(AllowedJwt(grant));
            }
            self.looked_up(&span, Tier::Local, Lookup::Miss);
        }
        if let Some(inactive) = &self.inactive {
            if inactive.get(&key).is_some() {
                self.count(Tier::Inactive, Lookup::Hit);
                return Outcome::Inactive;
            }
            self.count(Tier::Inactive, Lookup::Miss);
        }
        // Boxed: a local hit's future stays small, where the rest is not.
        Box::pin(self.look_further(key, token)).await
    }

    /// Past this process: Redis, read by the Check itself, then the flight to the IdP; all
    /// within the Check's timeout.
    async fn look_further(self: &Arc<Self>, key: CacheKey, token: Token<'_>) -> Outcome {
        let deadline = tokio::time::Instant::now() + self.ttls.check_timeout;
        let Some(shared) = &self.shared else {
            return self
                .wait_for(key, self.flight(key, token, Via::Idp), deadline)
                .await;
        };
        // A flight under way has read Redis already, or is about to.
        if let Some(answer) = self.flight_under_way(&key) {
            return self.wait_for(key, answer, deadline).await;
        }
        let since = self.local.as_ref().map(LocalCache::generation);
        let handoff = Handoff {
            authorizer: self,
            key,
            token,
        };
        let looked =
            tokio::time::timeout_at(deadline, self.read_redis(&**shared, key, token, since));
        let Ok(found) = looked.await else {
            // The Check's own timeout: the lookup goes on in a flight, as a cancelled one does.
            drop(handoff);
            tracing::debug!(key = ?key, "check timed out waiting for redis");
            return Outcome::IdpUnavailable;
        };
        handoff.done();
        if let Some((outcome, kept)) = found {
            if let Some(kept) = kept {
                let authorizer = Arc::clone(self);
                tokio::spawn(async move { authorizer.settle(since, key, kept).await });
            }
            return outcome;
        }
        // A flight that answered while this Check read Redis has filled the in-process tiers.
        if let Some(grant) = self.local.as_ref().and_then(|local| local.get(&key)) {
            return Outcome::Allow(AllowedJwt(grant));
        }
        if self
            .inactive
            .as_ref()
            .is_some_and(|inactive| inactive.get(&key).is_some())
        {
            return Outcome::Inactive;
        }
        self.wait_for(key, self.flight(key, token, Via::Idp), deadline)
            .await
    }

    /// Waits, until `deadline`, for a flight's answer.
    async fn wait_for(
        &self,
        key: CacheKey,
        mut answer: Answer,
        deadline: tokio::time::Instant,
    ) -> Outcome {
        let waited = tokio::time::timeout_at(deadline, answer.wait_for(Option::is_some));
        match waited.await {
            Ok(Ok(outcome)) => outcome.clone().unwrap_or(Outcome::IdpUnexpected),
            Ok(Err(_)) => {
                // The flight's task ended without an answer: it panicked. Never an allow.
                tracing::error!(key = ?key, "introspection task failed");
                Outcome::IdpUnexpected
            }
            Err(_) => {
                tracing::debug!(key = ?key, "check timed out waiting for introspection");
                Outcome::IdpUnavailable
            }
        }
    }

    /// The answer of the flight under way for `key`, if there is one.
    fn flight_under_way(&self, key: &CacheKey) -> Option<Answer> {
        let flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        flights.get(key).cloned()
    }

    /// Joins the flight under way for `key`, or starts one that goes `via` Redis or straight to
    /// the IdP. Concurrent Checks of one token share a single IdP call, and its answer, errors
    /// included.
    fn flight(self: &Arc<Self>, key: CacheKey, token: Token<'_>, via: Via) -> Answer {
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(answer) = flights.get(&key) {
            return answer.clone();
        }
        let (tx, answer) = watch::channel(None);
        flights.insert(key, answer.clone());
        drop(flights);
        // Read before the flight's first lookup: an eviction after this point keeps the
        // flight's result out of the in-process tier.
        let since = self.local.as_ref().map(LocalCache::generation);
        let landing = Landing {
            authorizer: Arc::clone(self),
            key,
            answer: answer.clone(),
        };
        let token = OwnedToken::of(token);
        tokio::spawn(
            async move {
                let authorizer = &landing.authorizer;
                let (outcome, kept) = authorizer.resolve(key, token.borrow(), since, via).await;
                let _ = tx.send(Some(outcome));
                // Once the answer is out, the entry kept in process moves to where entries live.
                if let Some(kept) = kept {
                    authorizer.settle(since, key, kept).await;
                }
                // Then the flight leaves the map; later Checks find the caches filled.
                drop(landing);
            }
            .instrument(tracing::Span::current()),
        );
        answer
    }

    /// The flight's answer, and the entry it kept in process, if any.
    async fn resolve(
        &self,
        key: CacheKey,
        token: Token<'_>,
        since: Option<Generation>,
        via: Via,
    ) -> (Outcome, Option<CachedJwt>) {
        if let (Via::Redis, Some(shared)) = (via, &self.shared)
            && let Some(found) = self.read_redis(&**shared, key, token, since).await
        {
            return found;
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
            Ok(Introspected::Active(active)) => self.admit(since, key, token, active),
            Ok(Introspected::Inactive) => {
                if let Some(inactive) = &self.inactive {
                    inactive.put(key, (), self.ttls.inactive);
                }
                (Outcome::Inactive, None)
            }
            Err(error) => {
                tracing::warn!(%error, "introspection failed");
                (idp_failure(&error), None)
            }
        }
    }

    /// A Redis hit's allow, and the entry when it was kept in process; `None` when the IdP
    /// must answer (a miss, an entry that fails to open, Redis failing).
    async fn read_redis(
        &self,
        shared: &dyn SharedCache,
        key: CacheKey,
        token: Token<'_>,
        since: Option<Generation>,
    ) -> Option<(Outcome, Option<CachedJwt>)> {
        let span = telemetry::cache_span(Tier::Redis);
        match shared.get(token).instrument(span.clone()).await {
            Ok(Some(entry)) => {
                self.looked_up(&span, Tier::Redis, Lookup::Hit);
                let kept = self.remember_locally(since, key, &entry) && self.local.is_some();
                let outcome = Outcome::Allow(AllowedJwt(entry.grant.clone()));
                return Some((outcome, kept.then_some(entry)));
            }
            Ok(None) => self.looked_up(&span, Tier::Redis, Lookup::Miss),
            Err(CacheError::Corrupt) => {
                self.looked_up(&span, Tier::Redis, Lookup::Invalid);
                tracing::warn!(
                    key = ?key,
                    "redis entry failed to open or to pass the checks of an IdP answer; \
                     introspecting"
                );
            }
            Err(error) => {
                // Outages are logged once by the Redis tier, not once per Check.
                self.looked_up(&span, Tier::Redis, Lookup::Error);
                tracing::debug!(%error, "redis lookup failed; introspecting");
            }
        }
        None
    }

    /// Turns an active answer into an allow, and caches it for as long as it may be; returns
    /// the entry too when it was kept in process.
    fn admit(
        &self,
        since: Option<Generation>,
        key: CacheKey,
        token: Token<'_>,
        active: ActiveToken,
    ) -> (Outcome, Option<CachedJwt>) {
        let now_ms = now_ms();
        let Some(ttl) = cache_ttl(&active, self.ttls.default, self.ttls.max, now_ms) else {
            tracing::warn!("identity server vouched for an expired JWT; denying");
            return (Outcome::ExpiredJwt, None);
        };
        let entry = CachedJwt {
            grant: Grant::new(&active.jwt, &active.claims),
            expires_at_ms: now_ms
                .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
        };
        let outcome = Outcome::Allow(AllowedJwt(entry.grant.clone()));
        if ttl.is_zero() {
            return (outcome, None);
        }
        let fresh = self.remember_locally(since, key, &entry);
        if let Some(shared) = self.shared.as_ref().filter(|_| fresh) {
            // The write does not delay the answer; its failure is counted inside. An eviction
            // that lands first leaves a tombstone the write does not overwrite.
            let write = shared.put(token, &entry, ttl);
            tokio::spawn(async move {
                if let Err(error) = write.await {
                    tracing::debug!(%error, "redis write failed");
                }
            });
        }
        (outcome, (fresh && self.local.is_some()).then_some(entry))
    }

    /// Replaces an entry just kept in process with a copy made where entries live
    /// ([`Grant::settle`]), unless an eviction came after `since`.
    async fn settle(&self, since: Option<Generation>, key: CacheKey, mut entry: CachedJwt) {
        // The Checks waiting on this flight write their answers first.
        tokio::task::yield_now().await;
        entry.grant = entry.grant.settle().await;
        self.remember_locally(since, key, &entry);
    }

    /// Keeps an entry in process unless an eviction came after `since`; returns false when one
    /// did (the value may be stale, so it goes nowhere else either).
    fn remember_locally(
        &self,
        since: Option<Generation>,
        key: CacheKey,
        entry: &CachedJwt,
    ) -> bool {
        let Some(local) = &self.local else {
            return true;
        };
        let remaining = entry.remaining(now_ms());
        let ttl = match self.ttls.local_cap {
            Some(cap) => remaining.min(cap),
            None => remaining,
        };
        match since {
            Some(since) => {
                local.put_since(since, key, entry.grant.clone(), ttl) || local.generation() == since
            }
            None => {
                local.put(key, entry.grant.clone(), ttl);
                true
            }
        }
    }

    /// Counts a cache lookup and records it on the lookup's span.
    fn looked_up(&self, span: &tracing::Span, tier: Tier, result: Lookup) {
        self.count(tier, result);
        telemetry::record_lookup(span, result);
    }

    fn count(&self, tier: Tier, result: Lookup) {
        match &self.lookups[tier as usize] {
            Some(lookups) => lookups.record(result),
            None => metrics::cache_lookup(tier, result),
        }
    }

    /// Drops a token's in-process entry, refuses results of lookups already under way, and
    /// detaches its flight so that later Checks start a new one.
    pub fn forget_locally(&self, key: &CacheKey) {
        if let Some(local) = &self.local {
            local.remove(key);
        }
        self.flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Drops every in-process entry and flight, for when evictions may have been missed.
    pub fn forget_all_locally(&self) {
        if let Some(local) = &self.local {
            local.clear();
        }
        self.flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Revokes a token's cached allow: here first, so this replica stops serving it even when
    /// Redis fails; then in Redis and, through it, on every replica; then here again, for a
    /// lookup that read Redis before the eviction reached it.
    pub async fn evict(&self, token: Token<'_>) -> Result<Eviction, CacheError> {
        let key = CacheKey::of(token);
        self.forget_locally(&key);
        let eviction = match &self.shared {
            Some(shared) => shared.evict(&key, token).await,
            None => Ok(Eviction::default()),
        };
        self.forget_locally(&key);
        eviction
    }
}

impl crate::cache::evictions::Forget for Authorizer {
    fn forget(&self, key: &CacheKey) {
        self.forget_locally(key);
    }

    fn forget_all(&self) {
        self.forget_all_locally();
    }
}

/// Where a flight starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// Redis first: for a Check that did not finish reading it.
    Redis,
    /// Straight to the IdP: the Check that starts the flight has read Redis, or there is none.
    Idp,
}

/// A Check's Redis lookup, owed to a flight should the Check be dropped before the lookup ends
/// (Envoy's deadline, or the Check's own): the flight reads Redis again and goes on to the IdP,
/// so that a Redis slower than the deadline still ends in a filled cache for the retry, and
/// counts its failures. Forgotten once the lookup has ended.
struct Handoff<'a> {
    authorizer: &'a Arc<Authorizer>,
    key: CacheKey,
    token: Token<'a>,
}

impl Handoff<'_> {
    /// The lookup ended: nothing is owed.
    fn done(self) {
        std::mem::forget(self);
    }
}

impl Drop for Handoff<'_> {
    fn drop(&mut self) {
        // No runtime to hand to while the process shuts down: the lookup is simply dropped.
        if tokio::runtime::Handle::try_current().is_ok() {
            let _ = self.authorizer.flight(self.key, self.token, Via::Redis);
        }
    }
}

/// Removes a flight from the map when its task ends, however it ends (a panic included, so
/// that the next Check starts afresh), unless an eviction already replaced it with a newer one.
struct Landing {
    authorizer: Arc<Authorizer>,
    key: CacheKey,
    answer: Answer,
}

impl Drop for Landing {
    fn drop(&mut self) {
        let mut flights = self
            .authorizer
            .flights
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if flights
            .get(&self.key)
            .is_some_and(|f| f.same_channel(&self.answer))
        {
            flights.remove(&self.key);
        }
    }
}

/// The TTL for an active answer: `max-age`, the default, or (rfc7662 mode without `max-age`)
/// `max`; never past the JWT's or the response's `exp`, nor past `max`. `None` when the JWT has already expired; zero means do
/// not cache.
pub fn cache_ttl(
    active: &ActiveToken,
    default: Duration,
    max: Duration,
    now_ms: u64,
) -> Option<Duration> {
    let mut ttl = match active.cache {
        CacheDirective::Unspecified => default,
        CacheDirective::MaxAge(max_age) => max_age,
        CacheDirective::DoNotCache => Duration::ZERO,
        CacheDirective::UntilExpiry => max,
    };
    ttl = ttl.min(max);
    if let Some(exp) = active.jwt_exp {
        let exp_ms = exp.saturating_mul(1000);
        if exp_ms <= now_ms {
            return None;
        }
        ttl = ttl.min(Duration::from_millis(exp_ms - now_ms));
    }
    if let Some(exp) = active.response_exp {
        let exp_ms = exp.saturating_mul(1000);
        // The IdP's answer itself says the token has expired: as good as an expired JWT.
        if exp_ms <= now_ms {
            return None;
        }
        ttl = ttl.min(Duration::from_millis(exp_ms - now_ms));
    }
    Some(ttl)
}

/// Maps an introspection failure to what Envoy is told.
pub fn idp_failure(error: &IdpError) -> Outcome {
    match error {
        IdpError::Unreachable
        | IdpError::Timeout
        | IdpError::Status(503)
        | IdpError::CircuitOpen
        | IdpError::Overloaded
        | IdpError::Undiscovered
        | IdpError::Signing => Outcome::IdpUnavailable,
        IdpError::Status(401 | 403 | 404 | 500..=502 | 504..=599) => Outcome::IdpRejected,
        IdpError::Status(_) => Outcome::IdpUnexpected,
        IdpError::BadResponse(_) => Outcome::IdpBadResponse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxFuture;
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
            claims: Default::default(),
            response_exp: None,
            cache,
        }
    }

    fn ttls() -> Ttls {
        Ttls {
            default: Duration::from_secs(300),
            max: Duration::from_secs(600),
            local_cap: None,
            inactive: Duration::ZERO,
            check_timeout: Duration::from_secs(60),
        }
    }

    fn authorizer(idp: Arc<ScriptedIdp>) -> Arc<Authorizer> {
        Arc::new(Authorizer::new(
            Some(LocalCache::new(100, 1 << 20)),
            None,
            idp,
            ttls(),
        ))
    }

    /// Waits until every flight has landed (they land after answering and caching).
    async fn landed(authorizer: &Authorizer) {
        while !authorizer.flights.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
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
        let authorizer = authorizer(idp.clone());
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
        landed(&authorizer).await;
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_shared_and_not_cached() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(5),
            answer: Err(IdpError::Status(503)),
        });
        let authorizer = authorizer(idp.clone());
        let header = "Bearer flaky".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        let (a, b) = tokio::join!(authorizer.authorize(token), authorizer.authorize(token));
        assert_eq!((a, b), (Outcome::IdpUnavailable, Outcome::IdpUnavailable));
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
        landed(&authorizer).await;
        assert_eq!(authorizer.authorize(token).await, Outcome::IdpUnavailable);
        assert_eq!(idp.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_check_leaves_its_introspection_to_finish_and_fill_the_cache() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(400),
            answer: Ok(Introspected::Active(active(
                CacheDirective::Unspecified,
                None,
            ))),
        });
        let authorizer = authorizer(idp.clone());
        let header = "Bearer slow".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        // Envoy gives up on three Checks in a row, each after 200 ms…
        for _ in 0..3 {
            let cut =
                tokio::time::timeout(Duration::from_millis(200), authorizer.authorize(token)).await;
            if cut.is_ok() {
                break;
            }
        }
        landed(&authorizer).await;
        // …yet the one introspection went on, and the next Check is a hit.
        assert!(matches!(
            authorizer.authorize(token).await,
            Outcome::Allow(_)
        ));
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_stops_waiting_at_its_time_limit() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_secs(3600),
            answer: Ok(Introspected::Inactive),
        });
        let authorizer = Arc::new(Authorizer::new(
            None,
            None,
            idp.clone(),
            Ttls {
                check_timeout: Duration::from_secs(1),
                ..ttls()
            },
        ));
        let header = "Bearer hung".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        assert_eq!(authorizer.authorize(token).await, Outcome::IdpUnavailable);
        assert_eq!(authorizer.authorize(token).await, Outcome::IdpUnavailable);
        // Both Checks waited on the one flight.
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_inactive_token_is_remembered_for_the_negative_ttl() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::ZERO,
            answer: Ok(Introspected::Inactive),
        });
        let authorizer = Arc::new(Authorizer::new(
            Some(LocalCache::new(100, 1 << 20)),
            None,
            idp.clone(),
            Ttls {
                inactive: Duration::from_secs(10),
                ..ttls()
            },
        ));
        let header = "Bearer replayed".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        for _ in 0..5 {
            assert_eq!(authorizer.authorize(token).await, Outcome::Inactive);
            landed(&authorizer).await;
        }
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_eviction_during_a_lookup_keeps_its_result_out_of_the_cache() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(500),
            answer: Ok(Introspected::Active(active(
                CacheDirective::Unspecified,
                None,
            ))),
        });
        let authorizer = authorizer(idp.clone());
        let header = "Bearer revoked-mid-flight".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        let in_flight = {
            let authorizer = authorizer.clone();
            tokio::spawn(async move {
                let header = "Bearer revoked-mid-flight".to_string();
                authorizer
                    .authorize(parse_bearer(&header, 100).unwrap())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
        authorizer.evict(token).await.unwrap();
        // A Check after the eviction does not join the old flight: it introspects anew.
        let after = authorizer.authorize(token);
        let (during, after) = tokio::join!(in_flight, after);
        assert!(matches!(during.unwrap(), Outcome::Allow(_)));
        assert!(matches!(after, Outcome::Allow(_)));
        assert_eq!(idp.calls.load(Ordering::SeqCst), 2);
        landed(&authorizer).await;
        // The flight that began before the eviction cached nothing; the later one did.
        assert!(matches!(
            authorizer.authorize(token).await,
            Outcome::Allow(_)
        ));
        assert_eq!(idp.calls.load(Ordering::SeqCst), 2);
    }

    /// A shared-cache double whose eviction always fails, as when Redis is down.
    struct DownCache;

    impl SharedCache for DownCache {
        fn get<'a>(
            &'a self,
            _token: Token<'a>,
        ) -> BoxFuture<'a, Result<Option<CachedJwt>, CacheError>> {
            Box::pin(async { Err(CacheError::Timeout) })
        }

        fn put(
            &self,
            _token: Token<'_>,
            _entry: &CachedJwt,
            _ttl: Duration,
        ) -> BoxFuture<'static, Result<(), CacheError>> {
            Box::pin(async { Err(CacheError::Timeout) })
        }

        fn evict(
            &self,
            _key: &CacheKey,
            _token: Token<'_>,
        ) -> BoxFuture<'static, Result<Eviction, CacheError>> {
            Box::pin(async { Err(CacheError::Timeout) })
        }
    }

    /// A shared-cache double that finds nothing, after a delay, and counts its lookups.
    struct EmptyCache {
        delay: Duration,
        gets: AtomicUsize,
    }

    impl SharedCache for EmptyCache {
        fn get<'a>(
            &'a self,
            _token: Token<'a>,
        ) -> BoxFuture<'a, Result<Option<CachedJwt>, CacheError>> {
            Box::pin(async {
                self.gets.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                Ok(None)
            })
        }

        fn put(
            &self,
            _token: Token<'_>,
            _entry: &CachedJwt,
            _ttl: Duration,
        ) -> BoxFuture<'static, Result<(), CacheError>> {
            Box::pin(async { Ok(()) })
        }

        fn evict(
            &self,
            _key: &CacheKey,
            _token: Token<'_>,
        ) -> BoxFuture<'static, Result<Eviction, CacheError>> {
            Box::pin(async { Ok(Eviction::default()) })
        }
    }

    fn with_cache(idp: Arc<ScriptedIdp>, cache: Arc<EmptyCache>) -> Arc<Authorizer> {
        Arc::new(Authorizer::new(
            Some(LocalCache::new(100, 1 << 20)),
            Some(cache),
            idp,
            Ttls {
                local_cap: Some(Duration::from_secs(60)),
                ..ttls()
            },
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn checks_that_read_redis_together_still_share_one_introspection() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(5),
            answer: Ok(Introspected::Active(active(
                CacheDirective::Unspecified,
                None,
            ))),
        });
        let cache = Arc::new(EmptyCache {
            delay: Duration::from_millis(1),
            gets: AtomicUsize::new(0),
        });
        let authorizer = with_cache(idp.clone(), cache.clone());
        let header = "Bearer cold".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        let checks: Vec<_> = (0..50).map(|_| authorizer.authorize(token)).collect();
        for outcome in futures_util::future::join_all(checks).await {
            assert!(matches!(outcome, Outcome::Allow(_)));
        }
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.gets.load(Ordering::SeqCst), 50);
        landed(&authorizer).await;
        // A Check that finds the flight under way joins it without reading Redis.
        let late = "Bearer late".to_string();
        let late = parse_bearer(&late, 100).unwrap();
        let first = authorizer.authorize(late);
        let joined = async {
            tokio::time::sleep(Duration::from_millis(3)).await;
            authorizer.authorize(late).await
        };
        let (first, joined) = tokio::join!(first, joined);
        assert!(matches!(
            (first, joined),
            (Outcome::Allow(_), Outcome::Allow(_))
        ));
        assert_eq!(cache.gets.load(Ordering::SeqCst), 51);
        assert_eq!(idp.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_inactive_answer_that_lands_during_a_redis_read_is_not_asked_again() {
        // Redis slower than the IdP: the first Check's flight lands while the second still
        // reads Redis; the second finds the answer in the inactive tier.
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(2),
            answer: Ok(Introspected::Inactive),
        });
        let cache = Arc::new(EmptyCache {
            delay: Duration::from_millis(10),
            gets: AtomicUsize::new(0),
        });
        let authorizer = Arc::new(Authorizer::new(
            Some(LocalCache::new(100, 1 << 20)),
            Some(cache.clone()),
            idp.clone(),
            Ttls {
                inactive: Duration::from_secs(60),
                ..ttls()
            },
        ));
        let header = "Bearer revoked".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        let first = authorizer.authorize(token);
        let second = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            authorizer.authorize(token).await
        };
        let (first, second) = tokio::join!(first, second);
        assert_eq!((first, second), (Outcome::Inactive, Outcome::Inactive));
        assert_eq!(cache.gets.load(Ordering::SeqCst), 2);
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_cancelled_while_it_reads_redis_hands_the_lookup_to_a_flight() {
        let idp = Arc::new(ScriptedIdp {
            calls: AtomicUsize::new(0),
            delay: Duration::from_millis(5),
            answer: Ok(Introspected::Active(active(
                CacheDirective::Unspecified,
                None,
            ))),
        });
        // Redis answers later than Envoy waits.
        let cache = Arc::new(EmptyCache {
            delay: Duration::from_millis(300),
            gets: AtomicUsize::new(0),
        });
        let authorizer = with_cache(idp.clone(), cache.clone());
        let header = "Bearer behind-slow-redis".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        let envoy =
            || tokio::time::timeout(Duration::from_millis(200), authorizer.authorize(token));
        assert!(envoy().await.is_err());
        // The first Check's lookup went on in a flight (Redis again, then the IdP), which the
        // retries join: the third gets its answer.
        assert!(envoy().await.is_err());
        assert!(matches!(envoy().await, Ok(Outcome::Allow(_))));
        landed(&authorizer).await;
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.gets.load(Ordering::SeqCst), 2);
        assert!(matches!(
            authorizer.authorize(token).await,
            Outcome::Allow(_)
        ));
        assert_eq!(cache.gets.load(Ordering::SeqCst), 2);
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
            local_cap: Some(Duration::from_secs(60)),
            ..ttls()
        };
        let with_redis = Arc::new(Authorizer::new(
            Some(LocalCache::new(100, 1 << 20)),
            Some(Arc::new(DownCache)),
            idp.clone(),
            ttls,
        ));
        let header = "Bearer revoked".to_string();
        let token = parse_bearer(&header, 100).unwrap();
        with_redis.authorize(token).await;
        with_redis.authorize(token).await;
        assert_eq!(idp.calls.load(Ordering::SeqCst), 1);
        assert_eq!(with_redis.evict(token).await, Err(CacheError::Timeout));
        with_redis.authorize(token).await;
        assert_eq!(idp.calls.load(Ordering::SeqCst), 2);

        // Without Redis, an eviction is local only and reaches nobody else.
        let alone = authorizer(idp.clone());
        alone.authorize(token).await;
        assert_eq!(alone.evict(token).await, Ok(Eviction::default()));
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
        let max = Duration::from_secs(600);
        let ttl = |cache, exp| cache_ttl(&active(cache, exp), default, max, now);
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
        assert_eq!(
            cache_ttl(&json, default, max, now),
            Some(Duration::from_secs(5))
        );
        // The response's own `exp` already past: expired, whatever the JWT says.
        json.response_exp = Some(now / 1000 - 1);
        assert_eq!(cache_ttl(&json, default, max, now), None);
        // An absurd max-age is capped, never overflowing.
        assert_eq!(
            ttl(CacheDirective::MaxAge(Duration::from_secs(u64::MAX)), None),
            Some(max)
        );
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
