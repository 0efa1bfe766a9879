//! Micro-benchmarks of the per-Check work on the hot path: token extraction (both header
//! encodings), cache-key derivation, response building, a local-cache hit, and the metrics a
//! Check records.
//!
//! ```text
//! cargo bench --bench hot_path
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;

use phantom_authz::cache::Grant;
use phantom_authz::cache::local::LocalCache;
use phantom_authz::decision::{AllowedJwt, Outcome, Responder};
use phantom_authz::jwt::Claims;
use phantom_authz::metrics::{self, CheckMetrics, Lookup, Tier, TierLookups, Transport};
use phantom_authz::request;
use phantom_authz::token::{CacheKey, bearer_token, check_request, parse_bearer};
use prost::Message as _;

const TOKEN: &str = "_0XBPWQQ_2a4e0a6a-8b6f-4a67-9f09-2f1c2c6f0d3e";

/// The headers Envoy typically sends for one API call.
fn headers() -> Vec<(&'static str, String)> {
    vec![
        (":authority", "api.example.com".to_owned()),
        (":path", "/v1/orders/12345?expand=items".to_owned()),
        (":method", "GET".to_owned()),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) bench/1.0".to_owned(),
        ),
        ("accept", "application/json".to_owned()),
        (
            "x-request-id",
            "9f1c2c6f-0d3e-4a67-8b6f-2a4e0a6a9f09".to_owned(),
        ),
        ("x-forwarded-for", "203.0.113.7".to_owned()),
        ("authorization", format!("Bearer {TOKEN}")),
    ]
}

/// `headers` map encoding (Envoy's default).
fn map_request() -> CheckRequest {
    check_request(HttpRequest {
        headers: headers()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        ..Default::default()
    })
}

/// `header_map` encoding (`encode_raw_headers: true`).
fn raw_request() -> CheckRequest {
    check_request(HttpRequest {
        header_map: Some(HeaderMap {
            headers: headers()
                .into_iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_owned(),
                    raw_value: v.into_bytes(),
                    ..Default::default()
                })
                .collect(),
        }),
        ..Default::default()
    })
}

fn jwt_1k() -> String {
    let mut jwt = String::from("eyJhbGciOiJSUzI1NiJ9.");
    jwt.push_str(&"e".repeat(1024 - jwt.len() - 1 - 342));
    jwt.push('.');
    jwt.push_str(&"s".repeat(342));
    jwt
}

fn key_of(authorization: &str) -> CacheKey {
    CacheKey::of(parse_bearer(authorization, 4096).expect("valid token"))
}

fn token_extraction(c: &mut Criterion) {
    let map = request::CheckRequest::from_envoy(&map_request()).expect("decodes");
    let raw = request::CheckRequest::from_envoy(&raw_request()).expect("decodes");
    c.bench_function("bearer_token/headers", |b| {
        b.iter(|| bearer_token(black_box(&map), 4096).is_ok())
    });
    c.bench_function("bearer_token/header_map", |b| {
        b.iter(|| bearer_token(black_box(&raw), 4096).is_ok())
    });
}

/// A Check's request decoded as Envoy's generated type (as tonic's prost decoder would, and as
/// the no-op baseline does) and as phantom-authz decodes it, from the same bytes; dropped too.
fn request_decoding(c: &mut Criterion) {
    for (name, request) in [("headers", map_request()), ("header_map", raw_request())] {
        let wire = bytes::Bytes::from(request.encode_to_vec());
        c.bench_function(&format!("decode/{name}/envoy_types"), |b| {
            b.iter(|| CheckRequest::decode(black_box(wire.clone())).is_ok())
        });
        c.bench_function(&format!("decode/{name}/phantom_authz"), |b| {
            b.iter(|| request::decode(black_box(wire.clone())).is_ok())
        });
    }
}

fn cache_key(c: &mut Criterion) {
    let header = format!("Bearer {TOKEN}");
    let token = parse_bearer(&header, 4096).expect("valid token");
    c.bench_function("CacheKey::of", |b| {
        b.iter(|| CacheKey::of(black_box(token)))
    });
}

fn respond(c: &mut Criterion) {
    let responder = Responder::new("api", Vec::new());
    // An allow with the claims that become dynamic metadata (sub, exp), as most grants have,
    // written from the grant into the buffer tonic hands over (here one reused, as tonic
    // reuses its own).
    let claims = Claims {
        sub: Some("user-2a4e0a6a".into()),
        exp: Some(4_102_444_800),
        ..Default::default()
    };
    let grant = Grant::new(&jwt_1k(), &claims);
    let mut buf = Vec::with_capacity(2048);
    c.bench_function("Responder::encode_allow/1k_jwt_sub_exp", |b| {
        b.iter(|| {
            buf.clear();
            responder.encode_allow(black_box(&grant), &mut buf);
            buf.len()
        })
    });
    c.bench_function("Responder::answer/401", |b| {
        b.iter(|| responder.answer(black_box(Outcome::Inactive)))
    });
}

fn local_cache_hit(c: &mut Criterion) {
    let cache = LocalCache::new(200_000, 1 << 30);
    // A realistically full map: the probe competes with 100k other entries.
    for i in 0..100_000 {
        let key = key_of(&format!("Bearer {TOKEN}{i}"));
        cache.put(
            key,
            Grant::new(&jwt_1k(), &Default::default()),
            Duration::from_secs(3600),
        );
    }
    let key = key_of(&format!("Bearer {TOKEN}42"));
    c.bench_function("LocalCache::get/hit", |b| {
        b.iter(|| cache.get(black_box(&key)).is_some())
    });
}

/// What one local hit records, against the Prometheus recorder the service runs with: handles
/// resolved once, next to a lookup of the counter by its labels per event.
fn check_metrics(c: &mut Criterion) {
    let recorder = metrics::recorder().expect("recorder");
    let _local = ::metrics::set_default_local_recorder(&recorder);
    let check = CheckMetrics::new();
    let local = TierLookups::new(Tier::Local);
    let allow = Outcome::Allow(AllowedJwt(Grant::new(&jwt_1k(), &Default::default())));
    c.bench_function("CheckMetrics::finished/allow", |b| {
        b.iter(|| {
            check.finished(
                black_box(&allow),
                Duration::from_micros(20),
                Transport::Grpc,
            )
        })
    });
    c.bench_function("TierLookups::record/hit", |b| {
        b.iter(|| local.record(black_box(Lookup::Hit)))
    });
    c.bench_function(
        "metrics::cache_lookup/hit (registry lookup per event)",
        |b| b.iter(|| metrics::cache_lookup(Tier::Local, black_box(Lookup::Hit))),
    );
}

criterion_group!(
    benches,
    request_decoding,
    token_extraction,
    cache_key,
    respond,
    local_cache_hit,
    check_metrics
);
criterion_main!(benches);
