//! The cache rules against a real `redis-server`: TTL from `max-age`, expiry, `no-store`, the
//! JWT's `exp` cap, sharing between two service instances, sealed values, Redis down, and one
//! introspection for many concurrent Checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::support::*;
use redis::AsyncCommands;

/// An IdP that answers every token with a fresh JWT expiring `exp_in` seconds from now.
async fn idp_with(cache_control: Option<&'static str>, exp_in: u64) -> Idp {
    Idp::start(move |seen| {
        let jwt = make_jwt(&seen.token, Some(unix_now() + exp_in), 900);
        let reply = Reply::jwt(&jwt);
        match cache_control {
            Some(value) => reply.header("cache-control", value),
            None => reply,
        }
    })
    .await
}

/// Waits for the entry the service writes to Redis after answering; returns Redis's keys.
async fn written_keys(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    assert!(
        eventually(Duration::from_secs(2), async || {
            keys = conn.keys("*").await.unwrap();
            !keys.is_empty()
        })
        .await,
        "the entry never reached Redis"
    );
    keys
}

/// Waits until Redis has expired every entry (their TTLs are a few seconds here).
async fn expired(conn: &mut redis::aio::MultiplexedConnection) {
    assert!(
        eventually(Duration::from_secs(10), async || {
            conn.keys::<_, Vec<String>>("*").await.unwrap().is_empty()
        })
        .await,
        "the entry never expired"
    );
}

async fn allowed(service: &App, token: &str) -> String {
    let mut client = service.client().await;
    let verdict = check(&mut client, bearer_request(token)).await;
    assert_eq!(verdict.http_status, 200, "{verdict:?}");
    verdict.header("authorization").unwrap().to_owned()
}

#[tokio::test]
async fn in_process_cache_serves_alone_without_redis() {
    let idp = idp_with(None, 3600).await;
    let service = App::start(&idp.url(), "jwt", &[]).await;
    let first = allowed(&service, "tok-a").await;
    let second = allowed(&service, "tok-a").await;
    assert_eq!(first, second);
    assert_eq!(idp.calls(), 1);
    allowed(&service, "tok-b").await;
    assert_eq!(idp.calls(), 2);
    assert_eq!(
        service
            .metric(
                "phantom_authz_cache_lookups_total",
                &[("tier", "local"), ("result", "hit")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn ttl_comes_from_max_age_and_lives_in_redis() {
    let redis = Redis::start();
    let idp = idp_with(Some("public, max-age=2"), 3600).await;
    let service = App::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--local-cache-ttl", "0"],
    )
    .await;
    let jwt = allowed(&service, "opaque-token-1").await;
    let mut conn = redis.connection().await;
    // The write happens after the answer; wait for it.
    let keys = written_keys(&mut conn).await;
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    assert!(key.starts_with("phantom-authz:v2:"), "{key}");
    assert!(!key.contains("opaque-token-1"));
    let ttl_ms: i64 = conn.pttl(key).await.unwrap();
    assert!(ttl_ms > 0 && ttl_ms <= 2_000, "PTTL {ttl_ms}");
    // The value is sealed: neither the JWT nor its claims can be read from Redis.
    let value: Vec<u8> = conn.get(key).await.unwrap();
    let jwt = jwt.strip_prefix("Bearer ").unwrap();
    assert!(
        !value
            .windows(20)
            .any(|w| jwt.as_bytes().windows(20).any(|j| j == w))
    );

    // Served from Redis while the entry lives, introspected again once Redis expired it.
    allowed(&service, "opaque-token-1").await;
    assert_eq!(idp.calls(), 1);
    expired(&mut conn).await;
    allowed(&service, "opaque-token-1").await;
    assert_eq!(idp.calls(), 2);
}

#[tokio::test]
async fn an_absurd_max_age_is_capped_by_max_cache_ttl() {
    let redis = Redis::start();
    // A JWT without `exp`, so that nothing but the cap bounds the TTL (this panicked the Check
    // in debug builds and wrapped around in release ones).
    let idp = Idp::start(|seen| {
        Reply::jwt(&make_jwt(&seen.token, None, 0))
            .header("cache-control", "max-age=18446744073709551615")
    })
    .await;
    let service = App::start(
        &idp.url(),
        "jwt",
        &[
            "--redis-url",
            &redis.url(),
            "--local-cache-ttl",
            "0",
            "--max-cache-ttl",
            "90s",
        ],
    )
    .await;
    allowed(&service, "forever").await;
    let mut conn = redis.connection().await;
    let keys = written_keys(&mut conn).await;
    let ttl_ms: i64 = conn.pttl(&keys[0]).await.unwrap();
    assert!(ttl_ms > 0 && ttl_ms <= 90_000, "PTTL {ttl_ms}");
    allowed(&service, "forever").await;
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn an_absurd_introspection_timeout_with_redis_starts_and_evicts() {
    // The tombstone's TTL is derived from the timeouts: it saturates instead of overflowing.
    let redis = Redis::start();
    let idp = idp_with(None, 3600).await;
    let app = App::start(
        &idp.url(),
        "jwt",
        &[
            "--redis-url",
            &redis.url(),
            "--introspection-timeout",
            "18446744073709551615s",
        ],
    )
    .await;
    allowed(&app, "timeless").await;
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn no_store_and_max_age_zero_are_not_cached() {
    for directive in ["no-store", "no-cache", "max-age=0"] {
        let redis = Redis::start();
        let idp = idp_with(Some(directive), 3600).await;
        let service = App::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]).await;
        for _ in 0..3 {
            allowed(&service, "tok").await;
        }
        assert_eq!(idp.calls(), 3, "{directive}");
        // No write was even attempted: Redis saw reads only.
        let writes = [("op", "set")];
        assert_eq!(
            service
                .metric("phantom_authz_redis_duration_seconds_count", &writes)
                .await,
            0.0,
            "{directive}"
        );
        let keys: Vec<String> = redis.connection().await.keys("*").await.unwrap();
        assert!(keys.is_empty(), "{directive}: {keys:?}");
    }
}

#[tokio::test]
async fn the_jwt_exp_caps_the_ttl() {
    let redis = Redis::start();
    // max-age says 300 s, but the JWT expires in 2 s.
    let idp = idp_with(Some("max-age=300"), 2).await;
    let service = App::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--check-timeout", "10s"],
    )
    .await;
    allowed(&service, "short-lived").await;
    let mut conn = redis.connection().await;
    let mut ttl_ms = -2i64;
    assert!(
        eventually(Duration::from_secs(2), async || {
            let keys: Vec<String> = conn.keys("*").await.unwrap();
            if let Some(key) = keys.first() {
                ttl_ms = conn.pttl(key).await.unwrap();
            }
            ttl_ms > 0
        })
        .await
    );
    assert!(ttl_ms <= 2_000, "TTL {ttl_ms} ms outlives the JWT");
    allowed(&service, "short-lived").await;
    assert_eq!(idp.calls(), 1);
    expired(&mut conn).await;
    allowed(&service, "short-lived").await;
    assert_eq!(
        idp.calls(),
        2,
        "an expired JWT was handed out from the cache"
    );
}

#[tokio::test]
async fn an_already_expired_jwt_is_denied() {
    let idp = Idp::start(|_| Reply::jwt(&make_jwt("x", Some(unix_now() - 10), 0))).await;
    let service = App::start(&idp.url(), "jwt", &[]).await;
    let mut client = service.client().await;
    let verdict = check(&mut client, bearer_request("tok")).await;
    assert_eq!(verdict.http_status, 401);
}

#[tokio::test]
async fn two_instances_share_one_introspection_through_redis() {
    let redis = Redis::start();
    let idp = idp_with(None, 3600).await;
    let a = App::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]).await;
    let b = App::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]).await;
    let from_a = allowed(&a, "shared-token").await;
    let mut conn = redis.connection().await;
    written_keys(&mut conn).await;
    let from_b = allowed(&b, "shared-token").await;
    assert_eq!(from_a, from_b);
    assert_eq!(
        idp.calls(),
        1,
        "two instances on one Redis introspect a token once"
    );
    assert_eq!(
        b.metric(
            "phantom_authz_cache_lookups_total",
            &[("tier", "redis"), ("result", "hit")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_planted_redis_value_is_a_miss_not_an_allow() {
    let redis = Redis::start();
    let idp = idp_with(None, 3600).await;
    let service = App::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--local-cache-ttl", "0"],
    )
    .await;
    allowed(&service, "victim").await;
    let mut conn = redis.connection().await;
    let keys = written_keys(&mut conn).await;
    // Someone with write access to Redis replaces the value with their own JWT.
    let _: () = conn
        .set(
            &keys[0],
            b"\0\0\0\0\0\0\0\0\0\0\0\0Bearer attacker.jwt.here".as_slice(),
        )
        .await
        .unwrap();
    let jwt = allowed(&service, "victim").await;
    assert!(!jwt.contains("attacker"));
    assert_eq!(idp.calls(), 2);
    assert_eq!(
        service
            .metric(
                "phantom_authz_cache_lookups_total",
                &[("tier", "redis"), ("result", "invalid")]
            )
            .await,
        1.0
    );
}

/// What a Redis writer could plant for a token of their invention without the cache secret:
/// an entry in the layout phantom-authz used before entries were bound to a secret (key and
/// value key both derived from the token alone).
fn forged_without_the_secret(token: &str, authorization: &str) -> (String, Vec<u8>) {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use sha2::Digest as _;
    let digest = sha2::Sha256::new()
        .chain_update(b"phantom-authz cache key v1\0")
        .chain_update(token.as_bytes())
        .finalize();
    let name: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("phantom-authz:v1:{name}");
    let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"phantom-authz cache v1"), token.as_bytes());
    let mut key = [0u8; 32];
    hkdf.expand(b"cache value encryption key", &mut key)
        .unwrap();
    let mut plaintext = (u64::MAX).to_be_bytes().to_vec();
    plaintext.extend_from_slice(authorization.as_bytes());
    let nonce = [7u8; 12];
    let sealed = aes_gcm::Aes256Gcm::new(&key.into())
        .encrypt(
            &aes_gcm::Nonce::from(nonce),
            Payload {
                msg: &plaintext,
                aad: name.as_bytes(),
            },
        )
        .unwrap();
    (name, [&nonce[..], &sealed].concat())
}

/// An entry sealed the way phantom-authz seals them, under `secret`.
fn sealed_under(secret: &str, token: &str, authorization: &str) -> (String, Vec<u8>) {
    let token = phantom_authz::token::parse_token(token, 4096).unwrap();
    let slot = phantom_authz::cache::redis::Slot::derive(secret.as_bytes(), token);
    let expires_at_ms = (unix_now() + 3600) * 1000;
    let sealed = slot.seal_parts(expires_at_ms, &Default::default(), authorization);
    (slot.name().to_owned(), sealed.unwrap())
}

#[tokio::test]
async fn a_redis_writer_without_the_cache_secret_cannot_forge_an_allow() {
    let redis = Redis::start();
    // The IdP has never heard of the invented token.
    let idp = Idp::start(|_| Reply::status(204)).await;
    let service = App::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--inactive-cache-ttl", "0"],
    )
    .await;
    let mut conn = redis.connection().await;
    let forged_jwt = format!(
        "Bearer {}",
        make_jwt("attacker", Some(unix_now() + 3600), 0)
    );
    let mut plants = vec![forged_without_the_secret("invented-token", &forged_jwt)];
    // Guessed secrets, and another deployment's real one.
    for guess in [
        "",
        "invented-token",
        "another-deployment-cache-secret-0123456789",
    ] {
        plants.push(sealed_under(guess, "invented-token", &forged_jwt));
    }
    for (name, value) in &plants {
        let _: () = conn.set(name, value.as_slice()).await.unwrap();
    }
    let verdict = check(
        &mut service.client().await,
        bearer_request("invented-token"),
    )
    .await;
    assert_eq!(
        verdict.http_status, 401,
        "a forged entry was served: {verdict:?}"
    );
    assert_eq!(verdict.header("x-injected"), None);
    assert_eq!(idp.calls(), 1, "the IdP was not asked");
}

#[tokio::test]
async fn an_entry_that_opens_is_still_checked_like_an_idp_answer() {
    let redis = Redis::start();
    let idp = idp_with(None, 3600).await;
    let service = App::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--local-cache-ttl", "0"],
    )
    .await;
    let mut conn = redis.connection().await;
    let expired = format!("Bearer {}", make_jwt("stale", Some(unix_now() - 10), 0));
    for (token, authorization) in [
        ("injected", "Bearer not.a.jwt\r\nX-Injected: yes"),
        ("expired", expired.as_str()),
        ("basic", "Basic YWxhZGRpbjpvcGVuc2VzYW1l"),
    ] {
        // Sealed with the replicas' own secret, as a compromised replica could.
        let (name, value) = sealed_under(CACHE_SECRET, token, authorization);
        let _: () = conn.set(&name, value.as_slice()).await.unwrap();
        let jwt = allowed(&service, token).await;
        assert!(jwt.starts_with("Bearer ey"), "{jwt:?}");
        assert!(
            !jwt.contains("not.a.jwt") && !jwt.contains("Basic"),
            "{jwt:?}"
        );
    }
    assert_eq!(idp.calls(), 3);
    assert_eq!(
        service
            .metric(
                "phantom_authz_cache_lookups_total",
                &[("tier", "redis"), ("result", "invalid")]
            )
            .await,
        3.0
    );
}

#[tokio::test]
async fn replicas_share_entries_only_when_they_share_a_cache_secret() {
    let redis = Redis::start();
    let idp = idp_with(None, 3600).await;
    let first = cache_secret_file(&["first-deployment-cache-secret-0123456789"]);
    let second = cache_secret_file(&["second-deployment-cache-secret-012345678"]);
    let start = async |file: &tempfile::TempPath| {
        App::start(
            &idp.url(),
            "jwt",
            &[
                "--redis-url",
                &redis.url(),
                "--cache-secret-file",
                file.to_str().unwrap(),
            ],
        )
        .await
    };
    let a = start(&first).await;
    let b = start(&second).await;
    allowed(&a, "shared-token").await;
    let mut conn = redis.connection().await;
    written_keys(&mut conn).await;
    // Another secret names another key: a miss, neither a hit nor an invalid entry.
    allowed(&b, "shared-token").await;
    assert_eq!(idp.calls(), 2);
    let invalid = [("tier", "redis"), ("result", "invalid")];
    assert_eq!(
        b.metric("phantom_authz_cache_lookups_total", &invalid)
            .await,
        0.0
    );

    // Rotation: a new secret first, the old one still listed, finds the old entries.
    let rotated = cache_secret_file(&[
        "third-deployment-cache-secret-0123456789",
        "first-deployment-cache-secret-0123456789",
    ]);
    let c = start(&rotated).await;
    allowed(&c, "shared-token").await;
    assert_eq!(
        idp.calls(),
        2,
        "the rotated replica did not read the old secret's entry"
    );
    let hits = [("tier", "redis"), ("result", "hit")];
    assert_eq!(
        c.metric("phantom_authz_cache_lookups_total", &hits).await,
        1.0
    );
}

#[tokio::test]
async fn redis_down_falls_back_to_introspection() {
    let idp = idp_with(None, 3600).await;
    // Nothing listens on this port: every Redis command fails.
    let url = format!("redis://127.0.0.1:{}", free_port());
    let service = App::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &url, "--local-cache-ttl", "0"],
    )
    .await;
    for _ in 0..3 {
        allowed(&service, "tok").await;
    }
    assert_eq!(idp.calls(), 3);
    // Two failures in a row mark Redis down; later Checks skip it instead of paying the timeout.
    assert!(
        service
            .metric("phantom_authz_redis_errors_total", &[])
            .await
            >= 1.0
    );
    let errors = [("tier", "redis"), ("result", "error")];
    assert_eq!(
        service
            .metric("phantom_authz_cache_lookups_total", &errors)
            .await,
        3.0
    );
    assert_eq!(service.metric("phantom_authz_redis_up", &[]).await, 0.0);
    let (status, body) = service.admin_get("/readyz").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"redis\":\"degraded\""), "{body}");
}

#[tokio::test]
async fn redis_killed_mid_flight_then_back() {
    let mut redis = Redis::start();
    let port = redis.port;
    let idp = idp_with(None, 3600).await;
    let service = App::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--local-cache-ttl", "0"],
    )
    .await;
    allowed(&service, "t1").await;
    redis.kill();
    allowed(&service, "t2").await;
    allowed(&service, "t2").await;
    assert_eq!(idp.calls(), 3);
    // Redis returns on the same address; the service reconnects without a restart.
    let redis = Redis::start_on(port);
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            allowed(&service, "t3").await;
            let keys: Vec<String> = conn.keys("*").await.unwrap();
            !keys.is_empty()
        })
        .await,
        "writes did not resume"
    );
}

#[tokio::test]
async fn a_thousand_concurrent_checks_of_one_new_token_call_the_idp_once() {
    let redis = Redis::start();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let idp = Idp::start(move |seen| {
        counter.fetch_add(1, Ordering::SeqCst);
        Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 900))
            .delay(Duration::from_millis(200))
    })
    .await;
    let service = App::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]).await;
    let client = service.client().await;
    let tasks: Vec<_> = (0..1_000)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { check(&mut client, bearer_request("brand-new")).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().http_status, 200);
    }
    assert_eq!(idp.calls(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn concurrent_redis_hits_each_get_their_own_entry_and_a_bad_key_fails_only_its_own() {
    let redis = Redis::start();
    let idp = idp_with(None, 3600).await;
    // The binary itself, on the runtime it runs in production: the scheduler decides whether
    // lookups meet.
    let service = Service::start(
        &idp.url(),
        "jwt",
        // Bounded generously: a lookup timed out on a loaded machine would be introspected.
        &[
            "--redis-url",
            &redis.url(),
            "--local-cache-ttl",
            "0",
            "--redis-timeout",
            "2s",
        ],
    );
    let tokens: Vec<String> = (0..64).map(|i| format!("pipelined-{i}")).collect();
    let mut client = service.client().await;
    for token in &tokens {
        assert_eq!(
            check(&mut client, bearer_request(token)).await.http_status,
            200
        );
    }
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(5), async || {
            conn.keys::<_, Vec<String>>("*").await.unwrap().len() == tokens.len()
        })
        .await,
        "the entries never all reached Redis"
    );
    // Someone with write access to Redis turns one token's key into a list.
    let (name, _) = sealed_under(CACHE_SECRET, &tokens[0], "Bearer a.b.c");
    let _: () = conn.del(&name).await.unwrap();
    let _: () = conn.rpush(&name, "not a string").await.unwrap();
    let calls = idp.calls();

    // Lookups that meet travel in one pipeline: each Check must still get its own token's JWT.
    let tasks: Vec<_> = tokens
        .iter()
        .map(|token| {
            let mut client = client.clone();
            let request = bearer_request(token);
            tokio::spawn(async move { check(&mut client, request).await })
        })
        .collect();
    for (token, task) in tokens.iter().zip(tasks) {
        let verdict = task.await.unwrap();
        assert_eq!(verdict.http_status, 200);
        let jwt = verdict
            .header("authorization")
            .unwrap()
            .strip_prefix("Bearer ");
        let claims = phantom_authz::jwt::claims(jwt.unwrap()).unwrap();
        assert_eq!(claims.sub.as_deref(), Some(token.as_str()));
    }

    // Only the token whose key is a list was introspected again; the others were Redis hits.
    assert_eq!(idp.calls(), calls + 1);
    assert_eq!(
        service
            .metric(
                "phantom_authz_cache_lookups_total",
                &[("tier", "redis"), ("result", "hit")]
            )
            .await,
        63.0
    );
}
