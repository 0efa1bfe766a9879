//! Envoy's deadline: cut Checks leave their introspection to finish; the gRPC listener's bounds.

use super::*;

/// Sends a Check the way Envoy does with its ext_authz `timeout`: a `grpc-timeout` deadline,
/// and the stream reset when it passes. Returns the verdict if one came in time.
async fn cut_check(
    client: &mut AuthorizationClient<Channel>,
    request: CheckRequest,
    deadline: Duration,
) -> Option<Verdict> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(deadline);
    match tokio::time::timeout(deadline, client.check(request)).await {
        Ok(Ok(response)) => Some(verdict(response.into_inner())),
        Ok(Err(_)) | Err(_) => None,
    }
}

#[tokio::test]
async fn checks_envoy_gives_up_on_leave_one_introspection_that_fills_both_tiers() {
    let redis = Redis::start();
    let idp = Idp::start(|seen| {
        Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0))
            .delay(Duration::from_millis(400))
    })
    .await;
    let a = Service::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]);
    let b = Service::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]);
    let mut client = a.client().await;
    for _ in 0..3 {
        if let Some(verdict) = cut_check(
            &mut client,
            bearer_request("slow-idp"),
            Duration::from_millis(200),
        )
        .await
        {
            assert_allowed_for(&verdict, "slow-idp");
        }
    }
    // The introspection the first Check started went on to its end and was counted…
    let active = [("result", "active")];
    assert!(
        eventually(Duration::from_secs(5), async || {
            a.metric("phantom_authz_introspections_total", &active)
                .await
                == 1.0
        })
        .await,
        "the introspection was not counted"
    );
    // …and cached: the next Check here is a local hit, and on the other replica a Redis hit.
    let (verdict, _) = timed_check(&mut client, bearer_request("slow-idp")).await;
    assert_allowed_for(&verdict, "slow-idp");
    let local_hits = [("tier", "local"), ("result", "hit")];
    assert!(
        a.metric("phantom_authz_cache_lookups_total", &local_hits)
            .await
            >= 1.0
    );
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(5), async || redis_keys(&mut conn)
            .await
            .len()
            == 1)
        .await,
        "the allow never reached Redis"
    );
    let (verdict, _) = timed_check(&mut b.client().await, bearer_request("slow-idp")).await;
    assert_allowed_for(&verdict, "slow-idp");
    assert_eq!(idp.calls(), 1, "every cut Check introspected again");
}

#[tokio::test]
async fn a_hung_idp_behind_cut_checks_counts_timeouts_and_opens_the_circuit() {
    let idp = Idp::start(|_| Reply::status(200).delay(Duration::from_secs(3600))).await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--introspection-timeout",
            "300ms",
            "--circuit-failure-threshold",
            "2",
            "--circuit-open-duration",
            "1h",
        ],
    );
    let mut client = service.client().await;
    for n in 0..2 {
        let cut = cut_check(
            &mut client,
            bearer_request(&format!("hung-{n}")),
            Duration::from_millis(200),
        )
        .await;
        assert!(cut.is_none(), "{cut:?}");
    }
    let timeouts = [("result", "timeout")];
    assert!(
        eventually(Duration::from_secs(5), async || {
            service
                .metric("phantom_authz_introspections_total", &timeouts)
                .await
                == 2.0
                && service.metric("phantom_authz_circuit_state", &[]).await == 1.0
        })
        .await,
        "the cut introspections never timed out into the breaker"
    );
    let (verdict, took) = timed_check(&mut client, bearer_request("hung-2")).await;
    assert_eq!(verdict.http_status, 503, "{verdict:?}");
    assert!(took < CHECK_BOUND, "{took:?}");
    assert_eq!(idp.calls(), 2, "an open circuit must not reach the IdP");
}

#[tokio::test]
async fn a_check_without_a_deadline_gets_503_at_the_check_timeout() {
    let idp = Idp::start(|_| Reply::status(200).delay(Duration::from_secs(3600))).await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &["--introspection-timeout", "1h", "--check-timeout", "300ms"],
    );
    let mut client = service.client().await;
    for _ in 0..2 {
        let (verdict, took) = timed_check(&mut client, bearer_request("no-deadline")).await;
        assert_eq!(verdict.http_status, 503, "{verdict:?}");
        assert!(took < CHECK_BOUND, "{took:?}");
    }
    // The second Check waited on the first one's introspection.
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn check_requests_over_the_size_bound_are_refused_by_the_transport() {
    let idp = vouching_idp().await;
    let service = Service::start(&idp.url(), "jwt", &[]);
    let mut client = service.client().await;
    let fits = "f".repeat(200 << 10);
    let (verdict, _) = timed_check(
        &mut client,
        check_request(&[("x-fits", &fits), ("authorization", "Bearer fits")]),
    )
    .await;
    assert_allowed_for(&verdict, "fits");
    // Past the 256 KiB default: an error status, which Envoy turns into a denial.
    let over = "o".repeat(300 << 10);
    let status = client
        .check(check_request(&[
            ("x-over", &over),
            ("authorization", "Bearer over"),
        ]))
        .await
        .expect_err("a 300 KiB CheckRequest was accepted");
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status}"
    );
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn one_connection_carries_at_most_the_configured_concurrent_checks() {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let idp = Idp::start(move |request| {
        seen.lock().unwrap().push(Instant::now());
        Reply::jwt(&make_jwt(&request.token, Some(unix_now() + 3600), 0))
            .delay(Duration::from_millis(300))
    })
    .await;
    let service = Service::start(&idp.url(), "jwt", &["--grpc-max-concurrent-streams", "2"]);
    let client = service.client().await;
    // Settle the connection first: streams opened before the client has read the server's
    // SETTINGS are refused (REFUSED_STREAM, which Envoy retries) rather than queued.
    check(&mut client.clone(), check_request(&[])).await;
    let checks: Vec<_> = (0..3)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let token = format!("stream-{n}");
                let (verdict, _) = timed_check(&mut client, bearer_request(&token)).await;
                assert_allowed_for(&verdict, &token);
            })
        })
        .collect();
    for check in checks {
        check.await.unwrap();
    }
    // The third Check could only start once a stream was free, which takes the IdP's 300 ms
    // answer to one of the first two: a causal bound, not a timing guess.
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 3);
    let gap = arrivals[2] - arrivals[0];
    assert!(
        gap >= Duration::from_millis(300),
        "three Checks ran at once on one connection ({gap:?} apart)"
    );
}
