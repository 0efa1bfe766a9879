//! Revocation against the real binary and a real `redis-server`: an eviction through one
//! replica's admin API reaches every replica, the admin secret guards it, the listener is off by
//! default, the subscriber survives a Redis restart, and bad flags are refused by name.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use redis::AsyncCommands;
use tonic::Code;

const ADMIN_SECRET: &str = "admin-Secret-0123456789abcdef";

/// An IdP that vouches for every token until `revoked` is set, then calls them all inactive.
async fn revocable_idp() -> (Idp, Arc<AtomicBool>) {
    slow_revocable_idp(Duration::ZERO).await
}

/// The same, taking `delay` to answer a vouching introspection.
async fn slow_revocable_idp(delay: Duration) -> (Idp, Arc<AtomicBool>) {
    let revoked = Arc::new(AtomicBool::new(false));
    let flag = revoked.clone();
    let idp = Idp::start(move |seen| {
        if flag.load(Ordering::SeqCst) {
            Reply::status(204)
        } else {
            Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 300)).delay(delay)
        }
    })
    .await;
    (idp, revoked)
}

/// A file holding `secret`, alive as long as the returned directory.
fn secret_file(secret: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin-token");
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    (dir, path)
}

/// A replica on `redis` keeping in-process entries for a minute, with the admin API when
/// `admin_token_file` is given.
fn replica(idp: &Idp, redis: &Redis, admin_token_file: Option<&PathBuf>) -> Service {
    replica_with(idp, redis, admin_token_file, "60s")
}

fn replica_with(
    idp: &Idp,
    redis: &Redis,
    admin_token_file: Option<&PathBuf>,
    local_cache_ttl: &str,
) -> Service {
    let url = redis.url();
    let mut extra = vec![
        "--redis-url",
        &url,
        "--local-cache-ttl",
        local_cache_ttl,
        "--check-timeout",
        "10s",
    ];
    let file;
    if let Some(path) = admin_token_file {
        file = path.to_str().unwrap().to_owned();
        extra.extend_from_slice(&[
            "--admin-grpc-listen",
            "127.0.0.1:0",
            "--admin-token-file",
            &file,
        ]);
    }
    Service::start(&idp.url(), "jwt", &extra)
}

async fn status_of(service: &Service, token: &str) -> u16 {
    let mut client = service.client().await;
    check(&mut client, bearer_request(token)).await.http_status
}

async fn redis_keys(redis: &Redis) -> Vec<String> {
    let mut conn = redis.connection().await;
    conn.keys("phantom-authz:v2:*").await.unwrap()
}

/// The values of every cache key: sealed entries, or tombstones after an eviction.
async fn redis_values(redis: &Redis) -> Vec<Vec<u8>> {
    let mut conn = redis.connection().await;
    let mut values = Vec::new();
    for key in redis_keys(redis).await {
        values.push(conn.get(key).await.unwrap());
    }
    values
}

/// A Check left running in the background, as a client waiting on a slow introspection.
fn check_in_background(service: &Service, token: &'static str) -> tokio::task::JoinHandle<u16> {
    let grpc = service.grpc;
    tokio::spawn(async move {
        let mut client = AuthorizationClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        check(&mut client, bearer_request(token)).await.http_status
    })
}

async fn wait_for_subscribers(redis: &Redis, count: u64) {
    assert!(
        eventually(Duration::from_secs(15), async || {
            eviction_subscribers(redis).await == count
        })
        .await,
        "{count} replicas did not subscribe to evictions"
    );
}

async fn wait_for_redis_entry(redis: &Redis) {
    assert!(
        eventually(Duration::from_secs(2), async || !redis_keys(redis)
            .await
            .is_empty())
        .await,
        "the entry never reached Redis"
    );
}

/// Waits until `service` has (re)subscribed `times` times, its in-process tier dropped each time.
async fn wait_until_listening(service: &Service, times: usize) {
    assert!(
        eventually(Duration::from_secs(15), async || {
            service.log().matches("listening for evictions").count() >= times
        })
        .await,
        "the replica did not subscribe {times} times"
    );
}

/// The `evictions` field of `/readyz`.
async fn evictions_state(service: &Service) -> String {
    let (_, body) = service.admin_get("/readyz").await;
    let start = body.find(r#""evictions":"#).expect("an evictions field");
    body[start..].to_owned()
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

#[tokio::test]
async fn an_eviction_through_one_replica_reaches_every_replica() {
    let redis = Redis::start();
    let (idp, revoked) = revocable_idp().await;
    let (_dir, admin_token) = secret_file(ADMIN_SECRET);
    let a = replica(&idp, &redis, Some(&admin_token));
    let b = replica(&idp, &redis, None);
    // Subscribing drops a replica's in-process tier: let both subscribe before warming up.
    wait_for_subscribers(&redis, 2).await;
    wait_until_listening(&a, 1).await;
    wait_until_listening(&b, 1).await;

    // Both replicas hold the token: A introspected it, B found it in Redis.
    assert_eq!(status_of(&a, "soon-revoked").await, 200);
    wait_for_redis_entry(&redis).await;
    assert_eq!(status_of(&b, "soon-revoked").await, 200);
    for replica in [&a, &b] {
        assert_eq!(status_of(replica, "soon-revoked").await, 200);
    }
    assert_eq!(idp.calls(), 1);

    // The token is revoked at the IdP, then evicted through A.
    revoked.store(true, Ordering::SeqCst);
    let response = evict(
        a.admin_grpc().unwrap(),
        Some(&bearer(ADMIN_SECRET)),
        "soon-revoked",
    )
    .await
    .unwrap();
    assert!(response.redis_deleted);
    assert_eq!(response.replicas_notified, 2);
    // Both replicas confirmed before the call returned: no waiting for the notice here.
    assert_eq!(response.replicas_confirmed, 2);
    assert_eq!(redis_values(&redis).await, [b"evicted".to_vec()]);
    for replica in [&a, &b] {
        assert_eq!(
            replica
                .metric("phantom_authz_evictions_total", &[("source", "pubsub")])
                .await,
            1.0,
            "a replica had not heard of the eviction when it returned"
        );
    }
    assert_eq!(
        a.metric("phantom_authz_evictions_total", &[("source", "api")])
            .await,
        1.0
    );

    // Neither replica serves its cached copy any more: each introspects and denies.
    assert_eq!(status_of(&a, "soon-revoked").await, 401);
    assert_eq!(idp.calls(), 2);
    assert_eq!(status_of(&b, "soon-revoked").await, 401);
    assert_eq!(idp.calls(), 3);

    // Evicting again is harmless, and the log names neither the token nor the secret.
    let again = evict(
        a.admin_grpc().unwrap(),
        Some(&bearer(ADMIN_SECRET)),
        "soon-revoked",
    )
    .await
    .unwrap();
    assert!(!again.redis_deleted);
    for log in [a.log(), b.log()] {
        assert!(!log.contains("soon-revoked"), "{log}");
        assert!(!log.contains(ADMIN_SECRET), "{log}");
    }
}

#[tokio::test]
async fn an_eviction_during_an_introspection_sticks_on_the_evicting_replica() {
    let redis = Redis::start();
    let (idp, revoked) = slow_revocable_idp(Duration::from_millis(1_500)).await;
    let (_dir, admin_token) = secret_file(ADMIN_SECRET);
    let a = replica(&idp, &redis, Some(&admin_token));
    wait_for_subscribers(&redis, 1).await;
    wait_until_listening(&a, 1).await;

    // A Check is waiting on an introspection that began before the revocation…
    let racing = check_in_background(&a, "racing");
    assert!(eventually(Duration::from_secs(5), async || idp.calls() == 1).await);
    revoked.store(true, Ordering::SeqCst);
    let response = evict(
        a.admin_grpc().unwrap(),
        Some(&bearer(ADMIN_SECRET)),
        "racing",
    )
    .await
    .unwrap();
    assert_eq!(response.replicas_confirmed, 1);
    // …and gets its answer, as any Check concurrent with an eviction may; but the answer is
    // not remembered: the next Check asks the IdP, which now says inactive.
    assert_eq!(racing.await.unwrap(), 200);
    assert_eq!(status_of(&a, "racing").await, 401);
    assert_eq!(idp.calls(), 2);
    assert_eq!(redis_values(&redis).await, [b"evicted".to_vec()]);
}

#[tokio::test]
async fn an_eviction_during_a_lookup_on_another_replica_sticks_there_and_in_redis() {
    let redis = Redis::start();
    let (idp, revoked) = slow_revocable_idp(Duration::from_millis(1_500)).await;
    let (_dir, admin_token) = secret_file(ADMIN_SECRET);
    let a = replica(&idp, &redis, Some(&admin_token));
    // Without an in-process tier, B's late answer goes straight to Redis: the tombstone the
    // eviction left must hold it off.
    let b = replica_with(&idp, &redis, None, "0");
    wait_for_subscribers(&redis, 2).await;
    wait_until_listening(&a, 1).await;
    wait_until_listening(&b, 1).await;

    let racing = check_in_background(&b, "racing");
    assert!(eventually(Duration::from_secs(5), async || idp.calls() == 1).await);
    revoked.store(true, Ordering::SeqCst);
    let response = evict(
        a.admin_grpc().unwrap(),
        Some(&bearer(ADMIN_SECRET)),
        "racing",
    )
    .await
    .unwrap();
    assert_eq!(
        (response.replicas_notified, response.replicas_confirmed),
        (2, 2)
    );
    assert_eq!(racing.await.unwrap(), 200);
    // B tried to store its late answer (one SET, refused by the tombstone).
    let writes = [("op", "set")];
    assert!(
        eventually(Duration::from_secs(5), async || {
            b.metric("phantom_authz_redis_duration_seconds_count", &writes)
                .await
                == 1.0
        })
        .await,
        "B never wrote its answer"
    );
    assert_eq!(redis_values(&redis).await, [b"evicted".to_vec()]);
    for replica in [&a, &b] {
        assert_eq!(status_of(replica, "racing").await, 401);
    }
    assert_eq!(idp.calls(), 3);
}

#[tokio::test]
async fn a_missing_or_wrong_admin_secret_is_unauthenticated_and_evicts_nothing() {
    let redis = Redis::start();
    let (idp, _) = revocable_idp().await;
    let (_dir, admin_token) = secret_file(ADMIN_SECRET);
    let a = replica(&idp, &redis, Some(&admin_token));
    wait_for_subscribers(&redis, 1).await;
    assert_eq!(status_of(&a, "kept").await, 200);
    wait_for_redis_entry(&redis).await;
    let addr = a.admin_grpc().unwrap();

    let wrong_secret = bearer(&format!("{ADMIN_SECRET}x"));
    let truncated = bearer(&ADMIN_SECRET[..ADMIN_SECRET.len() - 1]);
    let other_scheme = format!("Basic {ADMIN_SECRET}");
    for authorization in [
        None,
        Some(wrong_secret.as_str()),
        Some(truncated.as_str()),
        Some(other_scheme.as_str()),
        Some(ADMIN_SECRET),
        Some("Bearer "),
    ] {
        let status = evict(addr, authorization, "kept").await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{authorization:?}");
        assert!(!status.message().contains(ADMIN_SECRET));
    }
    // Nothing was evicted anywhere.
    assert_eq!(redis_keys(&redis).await.len(), 1);
    assert_eq!(status_of(&a, "kept").await, 200);
    assert_eq!(idp.calls(), 1);
    assert_eq!(a.metric("phantom_authz_evictions_total", &[]).await, 0.0);

    // A token that cannot be one is refused before anything is touched.
    for bad in ["", "Bearer kept", "two words", &"x".repeat(5_000)] {
        let status = evict(addr, Some(&bearer(ADMIN_SECRET)), bad)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    assert_eq!(redis_keys(&redis).await.len(), 1);
    assert!(!a.log().contains(ADMIN_SECRET));
}

#[tokio::test]
async fn the_admin_listener_is_absent_by_default_and_stops_on_sigterm() {
    let redis = Redis::start();
    let (idp, _) = revocable_idp().await;
    let default = replica(&idp, &redis, None);
    assert_eq!(default.admin_grpc(), None);
    assert_eq!(
        default.listening_ports(),
        [default.grpc.port(), default.admin.port()].into()
    );

    let (_dir, admin_token) = secret_file(ADMIN_SECRET);
    let mut with_admin = replica(&idp, &redis, Some(&admin_token));
    let admin_grpc = with_admin.admin_grpc().unwrap();
    assert_eq!(
        with_admin.listening_ports(),
        [
            with_admin.grpc.port(),
            with_admin.admin.port(),
            admin_grpc.port()
        ]
        .into()
    );
    wait_for_subscribers(&redis, 2).await;
    with_admin.signal("TERM");
    let exit = with_admin
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit on SIGTERM");
    assert!(exit.success(), "{exit:?}");
    assert!(std::net::TcpStream::connect(admin_grpc).is_err());
}

#[tokio::test]
async fn the_subscriber_resubscribes_after_redis_restarts() {
    let mut redis = Redis::start();
    let port = redis.port;
    let (idp, _) = revocable_idp().await;
    let (_dir, admin_token) = secret_file(ADMIN_SECRET);
    let a = replica(&idp, &redis, Some(&admin_token));
    let b = replica(&idp, &redis, None);
    wait_for_subscribers(&redis, 2).await;
    wait_until_listening(&b, 1).await;
    assert!(evictions_state(&b).await.contains("listening"));
    assert_eq!(status_of(&b, "tok").await, 200);
    assert_eq!(idp.calls(), 1);

    redis.kill();
    // Checks go on without Redis; B keeps its in-process copy meanwhile, and says on /readyz
    // that it no longer hears of evictions.
    assert_eq!(status_of(&b, "tok").await, 200);
    assert_eq!(idp.calls(), 1);
    assert!(
        eventually(Duration::from_secs(15), async || evictions_state(&b)
            .await
            .contains("lost"))
        .await,
        "/readyz never reported the lost subscription"
    );

    let redis = Redis::start_on(port);
    wait_for_subscribers(&redis, 2).await;
    wait_until_listening(&b, 2).await;
    assert!(evictions_state(&b).await.contains("listening"));
    // Evictions sent while B was away are lost, so B dropped everything when it came back.
    assert_eq!(status_of(&b, "tok").await, 200);
    assert_eq!(idp.calls(), 2);
    wait_for_redis_entry(&redis).await;

    let response = evict(a.admin_grpc().unwrap(), Some(&bearer(ADMIN_SECRET)), "tok")
        .await
        .unwrap();
    assert!(response.redis_deleted);
    assert_eq!(response.replicas_notified, 2);
    assert_eq!(response.replicas_confirmed, 2);
    assert_eq!(
        b.metric("phantom_authz_evictions_total", &[("source", "pubsub")])
            .await,
        1.0
    );
    assert_eq!(status_of(&b, "tok").await, 200);
    assert_eq!(idp.calls(), 3, "B served an evicted token from memory");
    assert!(!b.log().contains("panicked"));
}

#[test]
fn bad_admin_flags_exit_2_naming_the_flag() {
    let (_dir, good) = secret_file(ADMIN_SECRET);
    let (_short_dir, short) = secret_file("hunter2-short");
    let good = good.to_str().unwrap();
    let short = short.to_str().unwrap();
    let base = [
        "--introspection-url",
        "http://127.0.0.1:9/introspect",
        "--client-id",
        "gw",
        "--client-secret",
        "x",
    ];
    let listen = [
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let cases: &[(&[&str], &str)] = &[
        (
            &["--admin-grpc-listen", "127.0.0.1:0"],
            "--admin-token-file",
        ),
        (&["--admin-token-file", good], "--admin-token-file"),
        (
            &[
                "--admin-grpc-listen",
                "127.0.0.1:0",
                "--admin-token-file",
                "/nonexistent/admin-token",
            ],
            "--admin-token-file",
        ),
        (
            &[
                "--admin-grpc-listen",
                "127.0.0.1:0",
                "--admin-token-file",
                short,
            ],
            "--admin-token-file",
        ),
        (
            &["--admin-grpc-listen", "nowhere", "--admin-token-file", good],
            "--admin-grpc-listen",
        ),
        (
            &[
                "--admin-grpc-listen",
                "127.0.0.1:9001",
                "--grpc-listen",
                "127.0.0.1:9001",
                "--admin-token-file",
                good,
            ],
            "--admin-grpc-listen",
        ),
    ];
    for (extra, flag) in cases {
        let listen = if extra.contains(&"--grpc-listen") {
            &[][..]
        } else {
            &listen[..]
        };
        let args = [&base[..], listen, extra].concat();
        let (code, stderr) = run_binary(&args, &[]);
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{extra:?} echoed the secret");
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
    }
}
