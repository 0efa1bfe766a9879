//! Every metric the service records: names, descriptions and typed record functions.
//!
//! Labels take `&'static str` values only, so their number stays bounded.

use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::decision::{Decision, Outcome, Row};

pub const CHECK_DURATION: &str = "phantom_authz_check_duration_seconds";
pub const DECISIONS: &str = "phantom_authz_decisions_total";
pub const CACHE_LOOKUPS: &str = "phantom_authz_cache_lookups_total";
pub const INTROSPECTIONS: &str = "phantom_authz_introspections_total";
pub const INTROSPECTION_DURATION: &str = "phantom_authz_introspection_duration_seconds";
pub const INTROSPECTIONS_IN_FLIGHT: &str = "phantom_authz_introspections_in_flight";
pub const REDIS_ERRORS: &str = "phantom_authz_redis_errors_total";
pub const REDIS_DURATION: &str = "phantom_authz_redis_duration_seconds";
pub const REDIS_UP: &str = "phantom_authz_redis_up";
pub const LOCAL_CACHE_ENTRIES: &str = "phantom_authz_local_cache_entries";
pub const LOCAL_CACHE_BYTES: &str = "phantom_authz_local_cache_bytes";
pub const BUILD_INFO: &str = "phantom_authz_build_info";
pub const EVICTIONS: &str = "phantom_authz_evictions_total";
pub const CIRCUIT_STATE: &str = "phantom_authz_circuit_state";
pub const INTROSPECTIONS_REJECTED: &str = "phantom_authz_introspection_rejected_total";

/// Histogram buckets in seconds, from a local cache hit (tens of µs) to the 20 s IdP timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5,
    1.0, 2.5, 5.0, 10.0, 20.0,
];

/// Installs the Prometheus recorder as the global one; the handle renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let recorder = recorder()?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(BuildError::FailedToSetGlobalRecorder)?;
    describe();
    Ok(handle)
}

/// The Prometheus recorder with the service's buckets, not installed: for a process that runs
/// several services, each on a thread of its own with this as its local recorder.
pub fn recorder() -> Result<PrometheusRecorder, BuildError> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)?
        .build_recorder())
}

/// Describes every metric to the current recorder (and sets the build-info gauge).
pub fn describe() {
    describe_histogram!(
        CHECK_DURATION,
        Unit::Seconds,
        "Time to answer one ext_authz Check."
    );
    describe_counter!(
        DECISIONS,
        "Checks answered, by decision (allow|deny), HTTP status, reason and transport (grpc|http)."
    );
    describe_counter!(
        CACHE_LOOKUPS,
        "Cache lookups by tier (local|inactive|redis) and result (hit|miss|error|invalid)."
    );
    describe_counter!(
        INTROSPECTIONS,
        "Calls to the introspection endpoint, by result."
    );
    describe_histogram!(
        INTROSPECTION_DURATION,
        Unit::Seconds,
        "Time of one introspection call, connection included."
    );
    describe_gauge!(INTROSPECTIONS_IN_FLIGHT, "Introspection calls under way.");
    describe_counter!(
        REDIS_ERRORS,
        "Failed Redis commands, by operation (get|set|evict)."
    );
    describe_histogram!(
        REDIS_DURATION,
        Unit::Seconds,
        "Time of one Redis command, by operation."
    );
    describe_gauge!(
        REDIS_UP,
        "1 while the last Redis command succeeded, 0 while Redis fails."
    );
    describe_gauge!(LOCAL_CACHE_ENTRIES, "Entries in the in-process cache.");
    describe_gauge!(
        LOCAL_CACHE_BYTES,
        Unit::Bytes,
        "JWT bytes held by the in-process cache."
    );
    describe_counter!(
        EVICTIONS,
        "Tokens dropped from the caches, by source: api (this replica's admin API) or pubsub \
         (a notice from any replica, this one included)."
    );
    describe_gauge!(
        CIRCUIT_STATE,
        "IdP circuit breaker: 0 closed, 1 open (failing fast), 2 half-open (probing)."
    );
    describe_counter!(
        INTROSPECTIONS_REJECTED,
        "Introspections refused before calling the IdP, by reason (circuit_open|overloaded)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label names the running build."
    );
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Which front door a Check came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Envoy's ext_authz gRPC `Check`.
    Grpc = 0,
    /// HTTP forward-auth (nginx, Caddy, Traefik, HAProxy, Envoy's `http_service`).
    Http = 1,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Grpc => "grpc",
            Transport::Http => "http",
        }
    }
}

/// What a Check records, resolved once against the recorder in place when the service is built:
/// a Check then adds to atomics, without a registry lookup, label hashing or key copy.
pub struct CheckMetrics {
    duration: Histogram,
    /// Allows (most Checks) by transport, `[grpc, http]`; a denial is looked up by its labels.
    allowed: [Counter; 2],
}

impl CheckMetrics {
    pub fn new() -> Self {
        Self {
            duration: histogram!(CHECK_DURATION),
            allowed: [Transport::Grpc, Transport::Http].map(|t| decisions(&Row::ALLOW, t)),
        }
    }

    /// One Check answered.
    pub fn finished(&self, outcome: &Outcome, elapsed: Duration, transport: Transport) {
        self.duration.record(elapsed.as_secs_f64());
        let row = outcome.row();
        match row.decision {
            Decision::Allow => self.allowed[transport as usize].increment(1),
            Decision::Deny => decisions(&row, transport).increment(1),
        }
    }
}

impl Default for CheckMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn decisions(row: &Row, transport: Transport) -> Counter {
    counter!(
        DECISIONS,
        "decision" => row.decision.as_str(),
        "status" => row.http.label(),
        "reason" => row.reason,
        "transport" => transport.as_str(),
    )
}

/// Which cache tier a lookup went to.
#[derive(Clone, Copy, Debug)]
pub enum Tier {
    Local = 0,
    /// The in-process negative cache of tokens the IdP called inactive.
    Inactive = 1,
    Redis = 2,
}

/// What a cache lookup found.
#[derive(Clone, Copy, Debug)]
pub enum Lookup {
    Hit,
    Miss,
    /// The tier could not answer (Redis down, timed out).
    Error,
    /// An entry was there but failed to decrypt or parse: treated as a miss.
    Invalid,
}

impl Lookup {
    /// The bounded label for metrics and spans.
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Error => "error",
            Lookup::Invalid => "invalid",
        }
    }
}

pub fn cache_lookup(tier: Tier, result: Lookup) {
    lookups(tier, result).increment(1);
}

fn lookups(tier: Tier, result: Lookup) -> Counter {
    let tier = match tier {
        Tier::Local => "local",
        Tier::Inactive => "inactive",
        Tier::Redis => "redis",
    };
    counter!(CACHE_LOOKUPS, "tier" => tier, "result" => result.as_str())
}

/// One tier's hit and miss counters, resolved once (see [`CheckMetrics`]); the rarer results
/// go through [`cache_lookup`].
pub struct TierLookups {
    hit: Counter,
    miss: Counter,
    tier: Tier,
}

impl TierLookups {
    pub fn new(tier: Tier) -> Self {
        Self {
            hit: lookups(tier, Lookup::Hit),
            miss: lookups(tier, Lookup::Miss),
            tier,
        }
    }

    pub fn record(&self, result: Lookup) {
        match result {
            Lookup::Hit => self.hit.increment(1),
            Lookup::Miss => self.miss.increment(1),
            Lookup::Error | Lookup::Invalid => cache_lookup(self.tier, result),
        }
    }
}

/// One introspection call finished; `result` is a bounded label from the introspection module.
pub fn introspection(result: &'static str, elapsed: Duration) {
    counter!(INTROSPECTIONS, "result" => result).increment(1);
    histogram!(INTROSPECTION_DURATION).record(elapsed.as_secs_f64());
}

/// Tracks introspections under way for as long as the guard lives.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> Self {
        gauge!(INTROSPECTIONS_IN_FLIGHT).increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(INTROSPECTIONS_IN_FLIGHT).decrement(1.0);
    }
}

/// The metrics of one kind of Redis command, resolved once: the lookup every Redis hit makes
/// then costs no registry search.
#[derive(Clone)]
pub struct RedisCommand {
    duration: Histogram,
    errors: Counter,
    up: Gauge,
}

impl RedisCommand {
    pub fn new(op: &'static str) -> Self {
        Self {
            duration: histogram!(REDIS_DURATION, "op" => op),
            errors: counter!(REDIS_ERRORS, "op" => op),
            up: gauge!(REDIS_UP),
        }
    }

    /// One command finished, successfully or not.
    pub fn finished(&self, elapsed: Duration, ok: bool) {
        self.duration.record(elapsed.as_secs_f64());
        if !ok {
            self.errors.increment(1);
        }
        self.up.set(if ok { 1.0 } else { 0.0 });
    }
}

/// The IdP circuit breaker's state.
#[derive(Clone, Copy, Debug)]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

pub fn circuit_state(state: Circuit) {
    let value = match state {
        Circuit::Closed => 0.0,
        Circuit::Open => 1.0,
        Circuit::HalfOpen => 2.0,
    };
    gauge!(CIRCUIT_STATE).set(value);
}

/// An introspection refused by the guard; `reason` is a bounded label.
pub fn introspection_rejected(reason: &'static str) {
    counter!(INTROSPECTIONS_REJECTED, "reason" => reason).increment(1);
}

pub fn local_cache_size(entries: usize, bytes: u64) {
    gauge!(LOCAL_CACHE_ENTRIES).set(entries as f64);
    gauge!(LOCAL_CACHE_BYTES).set(bytes as f64);
}

/// Where an eviction came from.
#[derive(Clone, Copy, Debug)]
pub enum EvictionSource {
    /// A call to this replica's admin API.
    Api,
    /// A notice on the Redis eviction channel.
    Pubsub,
}

pub fn eviction(source: EvictionSource) {
    let source = match source {
        EvictionSource::Api => "api",
        EvictionSource::Pubsub => "pubsub",
    };
    counter!(EVICTIONS, "source" => source).increment(1);
}
