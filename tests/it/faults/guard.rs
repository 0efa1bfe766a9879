//! The circuit breaker and the concurrency cap in front of the identity server, end to end.

use super::*;

#[tokio::test]
async fn circuit_opens_after_three_failures_fails_fast_then_one_probe_closes_it() {
    let failing = Arc::new(AtomicBool::new(true));
    let state = failing.clone();
    let idp = Idp::start(move |seen| {
        if state.load(Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0))
        }
    })
    .await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--circuit-failure-threshold",
            "3",
            "--circuit-open-duration",
            "1s",
        ],
    );
    let mut client = service.client().await;
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        0.0
    );
    for n in 0..3 {
        let (verdict, _) = timed_check(&mut client, bearer_request(&format!("t{n}"))).await;
        assert_eq!(verdict.http_status, 502, "the IdP's 500: {verdict:?}");
    }
    let opened = Instant::now();
    assert_eq!(idp.calls(), 3);
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        1.0
    );
    for n in 3..8 {
        let (verdict, took) = timed_check(&mut client, bearer_request(&format!("t{n}"))).await;
        assert_eq!(verdict.http_status, 503, "{verdict:?}");
        // Failing fast means not reaching the IdP (asserted below); the bound only catches a
        // Check that hangs.
        assert!(took < CHECK_BOUND, "failing fast took {took:?}");
    }
    assert_eq!(idp.calls(), 3, "an open circuit must not reach the IdP");
    assert_eq!(
        service
            .metric(
                "phantom_authz_introspection_rejected_total",
                &[("reason", "circuit_open")]
            )
            .await,
        5.0
    );

    // The IdP recovers; Checks keep failing fast until the open period ends, then one probe
    // goes through and closes the circuit.
    failing.store(false, Ordering::SeqCst);
    let mut allowed_at = None;
    assert!(
        eventually(Duration::from_secs(5), async || {
            let (verdict, _) = timed_check(&mut client, bearer_request("probe")).await;
            if verdict.http_status == 200 {
                allowed_at = Some(opened.elapsed());
                return true;
            }
            assert_eq!(verdict.http_status, 503, "{verdict:?}");
            false
        })
        .await,
        "the circuit never closed"
    );
    let allowed_at = allowed_at.unwrap();
    assert!(
        allowed_at >= Duration::from_millis(900),
        "allowed {allowed_at:?} after opening: the open period was not honoured"
    );
    assert_eq!(idp.calls(), 4, "exactly one probe reached the IdP");
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        0.0
    );
    let (verdict, _) = timed_check(&mut client, bearer_request("after")).await;
    assert_allowed_for(&verdict, "after");
    assert_eq!(idp.calls(), 5);
}

#[tokio::test]
async fn an_absurd_circuit_open_duration_keeps_the_circuit_open_without_crashing() {
    let idp = Idp::start(|_| Reply::status(500)).await;
    let mut service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--circuit-failure-threshold",
            "1",
            "--circuit-open-duration",
            "18446744073709551615s",
        ],
    );
    let mut client = service.client().await;
    let (verdict, _) = timed_check(&mut client, bearer_request("first")).await;
    assert_eq!(verdict.http_status, 502, "the IdP's 500: {verdict:?}");
    let (verdict, _) = timed_check(&mut client, bearer_request("second")).await;
    assert_eq!(verdict.http_status, 503, "the circuit is open: {verdict:?}");
    assert_eq!(idp.calls(), 1);
    assert_alive(&mut service);
    assert!(!service.log().contains("panicked"), "{}", service.log());
}

#[tokio::test]
async fn concurrency_cap_lets_two_reach_the_idp_and_fails_the_rest_fast() {
    let idp = Idp::start(|seen| {
        Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0))
            .delay(Duration::from_millis(1_500))
    })
    .await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--max-concurrent-introspections",
            "2",
            "--check-timeout",
            "5s",
        ],
    );
    let client = service.client().await;
    // Warm the HTTP/2 connection so timings measure the service, not the handshake.
    let mut warm = client.clone();
    check(&mut warm, check_request(&[])).await;
    let checks: Vec<_> = (0..10)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let token = format!("capped-{n}");
                let (verdict, _) = timed_check(&mut client, bearer_request(&token)).await;
                (token, verdict, Instant::now())
            })
        })
        .collect();
    let (mut allowed, mut refused) = (Vec::new(), Vec::new());
    for task in checks {
        let (token, verdict, finished) = task.await.unwrap();
        if verdict.http_status == 200 {
            assert_allowed_for(&verdict, &token);
            allowed.push(finished);
        } else {
            assert_eq!(verdict.http_status, 503, "{verdict:?}");
            refused.push(finished);
        }
    }
    assert_eq!(allowed.len(), 2);
    // Failing fast: every capped Check was answered before the IdP answered either of the two
    // it was working on.
    assert!(
        refused.iter().max() < allowed.iter().min(),
        "a capped Check waited for the IdP instead of failing fast"
    );
    assert_eq!(idp.calls(), 2, "at most two introspections at once");
    assert_eq!(
        service
            .metric(
                "phantom_authz_introspection_rejected_total",
                &[("reason", "overloaded")]
            )
            .await,
        8.0
    );
    // Being overloaded is not the IdP failing: the circuit stays closed.
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        0.0
    );
}
