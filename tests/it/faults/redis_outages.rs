//! Redis hung, killed, absent or back: every Check is still answered, and correctly.

use super::*;

#[tokio::test]
async fn redis_hung_by_sigstop_checks_fall_back_within_bound_and_readyz_degrades() {
    let redis = Redis::start();
    let idp = vouching_idp().await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--local-cache-ttl", "0"],
    );
    let mut client = service.client().await;
    let (verdict, _) = timed_check(&mut client, bearer_request("cached-before")).await;
    assert_allowed_for(&verdict, "cached-before");
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(2), async || !redis_keys(&mut conn)
            .await
            .is_empty())
        .await
    );
    let (_, body) = readyz_redis(&service).await;
    assert!(body.contains(r#""status":"ready","redis":"up""#), "{body}");
    assert_eq!(service.metric("phantom_authz_redis_up", &[]).await, 1.0);

    let frozen = Frozen::freeze(redis.pid());
    // The cached token and new ones alike: Redis never answers, every Check falls back to
    // introspection and still answers, each well within the bound.
    let calls_before = idp.calls();
    let mut slowest = Duration::ZERO;
    for n in 0..8 {
        let token = if n % 2 == 0 {
            "cached-before".to_owned()
        } else {
            format!("while-hung-{n}")
        };
        let (verdict, took) = timed_check(&mut client, bearer_request(&token)).await;
        assert_allowed_for(&verdict, &token);
        slowest = slowest.max(took);
    }
    assert!(
        slowest < CHECK_BOUND,
        "a Check took {slowest:?} with Redis hung"
    );
    assert_eq!(idp.calls(), calls_before + 8, "Redis cannot have answered");
    let (status, body) = readyz_redis(&service).await;
    assert_eq!(
        status, 200,
        "a hung Redis must not make the service unready"
    );
    assert!(body.contains(r#""redis":"degraded""#), "{body}");
    assert_eq!(service.metric("phantom_authz_redis_up", &[]).await, 0.0);
    // Two timeouts in a row mark Redis down; later Checks skip it (until a probe) rather than
    // each paying the command timeout. Every lookup is still counted as an error.
    assert!(
        service
            .metric("phantom_authz_redis_errors_total", &[("op", "get")])
            .await
            >= 1.0
    );
    assert_eq!(
        service
            .metric(
                "phantom_authz_cache_lookups_total",
                &[("tier", "redis"), ("result", "error")]
            )
            .await,
        8.0
    );

    // Thawed, Redis is used again without a restart: a new token's entry is written.
    drop(frozen);
    assert!(
        eventually(Duration::from_secs(10), async || {
            let (verdict, _) = timed_check(&mut client, bearer_request("after-thaw")).await;
            assert_allowed_for(&verdict, "after-thaw");
            readyz_redis(&service).await.1.contains(r#""redis":"up""#)
        })
        .await,
        "Redis not used again after SIGCONT"
    );
    assert_eq!(service.metric("phantom_authz_redis_up", &[]).await, 1.0);
    assert!(
        eventually(Duration::from_secs(5), async || redis_keys(&mut conn)
            .await
            .len()
            >= 2)
        .await,
        "writes did not resume after SIGCONT"
    );
}

#[tokio::test]
async fn redis_sigkilled_under_load_answers_throughout_and_recovers_on_the_same_port() {
    let mut redis = Redis::start();
    let port = redis.port;
    let idp = vouching_idp().await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--local-cache-ttl", "0"],
    );
    let client = service.client().await;
    // Checks keep arriving from four clients while Redis is killed and brought back.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let (mut client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < 2_000 {
                    let token = format!("load-{worker}-{}", n % 5);
                    let (verdict, took) = timed_check(&mut client, bearer_request(&token)).await;
                    assert_allowed_for(&verdict, &token);
                    slowest = slowest.max(took);
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (n, slowest)
            })
        })
        .collect();
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(5), async || !redis_keys(&mut conn)
            .await
            .is_empty())
        .await
    );
    drop(conn);

    redis.kill(); // SIGKILL
    assert!(
        eventually(Duration::from_secs(5), async || {
            readyz_redis(&service)
                .await
                .1
                .contains(r#""redis":"degraded""#)
        })
        .await
    );
    assert_eq!(service.metric("phantom_authz_redis_up", &[]).await, 0.0);
    assert_eq!(readyz_redis(&service).await.0, 200);

    let redis = Redis::start_on(port);
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(10), async || !redis_keys(&mut conn)
            .await
            .is_empty())
        .await,
        "writes did not resume on the restarted Redis"
    );
    assert!(
        eventually(Duration::from_secs(5), async || {
            readyz_redis(&service).await.1.contains(r#""redis":"up""#)
        })
        .await
    );
    stop.store(true, Ordering::SeqCst);
    for worker in load {
        let (answered, slowest) = worker.await.expect("a Check under load failed");
        assert!(answered > 0);
        assert!(
            slowest < CHECK_BOUND,
            "a Check took {slowest:?} around a Redis kill"
        );
    }
}

#[tokio::test]
async fn redis_absent_at_start_is_used_once_it_appears() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let idp = vouching_idp().await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &url, "--local-cache-ttl", "0"],
    );
    let mut client = service.client().await;
    for _ in 0..2 {
        let (verdict, took) = timed_check(&mut client, bearer_request("before-redis")).await;
        assert_allowed_for(&verdict, "before-redis");
        assert!(took < CHECK_BOUND, "{took:?}");
    }
    assert_eq!(idp.calls(), 2, "nothing to cache in");
    let (status, body) = readyz_redis(&service).await;
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            r#"{"status":"ready","redis":"degraded","evictions":"lost"}"#
        )
    );

    let redis = Redis::start_on(port);
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            let (verdict, _) = timed_check(&mut client, bearer_request("after-redis")).await;
            assert_allowed_for(&verdict, "after-redis");
            // The entry is in Redis, and the service has seen its write succeed (until then
            // it may still be skipping Redis between probes).
            !redis_keys(&mut conn).await.is_empty()
                && readyz_redis(&service).await.1.contains(r#""redis":"up""#)
        })
        .await,
        "the service never started using Redis"
    );
    // The entry is read back: with the in-process tier off, only Redis can spare the IdP.
    let calls = idp.calls();
    let (verdict, _) = timed_check(&mut client, bearer_request("after-redis")).await;
    assert_allowed_for(&verdict, "after-redis");
    assert_eq!(idp.calls(), calls, "served from Redis");
    let (_, body) = readyz_redis(&service).await;
    assert!(body.contains(r#""status":"ready","redis":"up""#), "{body}");
}
