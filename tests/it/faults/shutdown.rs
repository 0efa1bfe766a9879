//! SIGTERM under load: in-flight Checks finish correctly within the grace.

use super::*;

#[tokio::test]
async fn sigterm_under_mixed_load_completes_every_check_correctly_and_exits_zero() {
    let redis = Redis::start();
    let idp = Idp::start(|seen| {
        let reply = match seen.token.split('-').next().unwrap() {
            "active" => Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0)),
            "inactive" => Reply::status(204),
            _ => Reply::status(503),
        };
        reply.delay(Duration::from_millis(700))
    })
    .await;
    let mut service = Service::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]);
    let client = service.client().await;
    let kinds = ["active", "inactive", "down"];
    let in_flight: Vec<_> = (0..60)
        .map(|n| {
            let mut client = client.clone();
            let token = format!("{}-{n}", kinds[n % 3]);
            tokio::spawn(async move {
                let verdict = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.check(bearer_request(&token)),
                )
                .await
                .expect("unanswered");
                (token, verdict)
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), async || idp.calls() == 60).await);
    service.signal("TERM");
    for task in in_flight {
        let (token, result) = task.await.unwrap();
        let verdict = verdict(
            result
                .unwrap_or_else(|e| panic!("{token} was cut: {e}"))
                .into_inner(),
        );
        match token.split('-').next().unwrap() {
            "active" => assert_allowed_for(&verdict, &token),
            "inactive" => assert_eq!(verdict.http_status, 401, "{token}: {verdict:?}"),
            _ => assert_eq!(verdict.http_status, 503, "{token}: {verdict:?}"),
        }
    }
    let exit = service
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit after draining");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

#[tokio::test]
async fn sigterm_with_checks_outlasting_the_grace_exits_within_the_grace() {
    let idp = Idp::start(|seen| {
        Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0))
            .delay(Duration::from_secs(20))
    })
    .await;
    let mut service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--shutdown-grace",
            "300ms",
            "--introspection-timeout",
            "30s",
            "--check-timeout",
            "30s",
        ],
    );
    let client = service.client().await;
    let in_flight: Vec<_> = (0..5)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    client.check(bearer_request(&format!("stuck-{n}"))),
                )
                .await
                .expect("a stuck Check outlived the process")
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), async || idp.calls() == 5).await);
    let signalled = Instant::now();
    service.signal("TERM");
    let exit = service
        .wait_exit(Duration::from_secs(5))
        .expect("did not exit after the grace period");
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    for task in in_flight {
        // Cut short: the client sees an error (Envoy then denies), never an allow.
        if let Ok(response) = task.await.unwrap() {
            assert_ne!(verdict(response.into_inner()).http_status, 200);
        }
    }
    assert!(service.log().contains("grace period"), "{}", service.log());
}
