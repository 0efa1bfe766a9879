//! An identity server that is slow, down, flapping, garbage-spewing or enormous: never an allow on a failure.

use super::*;

#[tokio::test]
async fn idp_silent_or_dripping_past_the_timeout_is_503_within_bound() {
    // One IdP accepts and never answers; the other sends headers, then a byte every 100 ms.
    let silent = RawIdp::start(|stream, _| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    })
    .await;
    let drip = RawIdp::start(|mut stream, _| async move {
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: application/jwt\r\ncontent-length: 1000\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if stream.write_all(b"e").await.is_err() {
                return;
            }
        }
    })
    .await;
    for url in [silent.url(), drip.url()] {
        let service = Service::start(
            &url,
            "jwt",
            &[
                "--introspection-timeout",
                "500ms",
                "--circuit-failure-threshold",
                "0",
            ],
        );
        let client = service.client().await;
        let checks: Vec<_> = (0..4)
            .map(|n| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    timed_check(&mut client, bearer_request(&format!("slow-{n}"))).await
                })
            })
            .collect();
        for task in checks {
            let (verdict, took) = task.await.unwrap();
            assert_eq!(verdict.http_status, 503, "{url}: {verdict:?}");
            // Not before the 500 ms timeout (a causal bound), and not hung.
            assert!(
                took >= Duration::from_millis(450) && took < CHECK_BOUND,
                "{url}: answered after {took:?}, not at the 500 ms timeout"
            );
        }
        assert_eq!(
            service
                .metric(
                    "phantom_authz_introspections_total",
                    &[("result", "timeout")]
                )
                .await,
            4.0
        );
    }
    assert_eq!(silent.calls(), 4);
    assert_eq!(drip.calls(), 4);
}

#[tokio::test]
async fn idp_going_down_mid_life_is_503_and_cached_allows_survive() {
    let idp = RawIdp::start(|stream, token| async move { write_jwt(stream, &token).await }).await;
    let service = Service::start(&idp.url(), "jwt", &["--introspection-timeout", "500ms"]);
    let mut client = service.client().await;
    let (verdict, _) = timed_check(&mut client, bearer_request("up-1")).await;
    assert_allowed_for(&verdict, "up-1");
    idp.stop().await;
    for n in 0..3 {
        let (verdict, took) = timed_check(&mut client, bearer_request(&format!("down-{n}"))).await;
        assert_eq!(verdict.http_status, 503, "{verdict:?}");
        assert!(took < CHECK_BOUND, "connection refused took {took:?}");
    }
    // Cached allows survive the IdP being down.
    let (verdict, _) = timed_check(&mut client, bearer_request("up-1")).await;
    assert_allowed_for(&verdict, "up-1");
    assert_eq!(
        service
            .metric(
                "phantom_authz_introspections_total",
                &[("result", "unreachable")]
            )
            .await,
        3.0
    );
}

/// A TCP listener that counts connections and drops each one: a proxy nobody should use.
async fn counting_listener() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (addr, connections)
}

/// The service against `introspection_url` with `extra` flags and `env` variables.
fn service_with_env(introspection_url: &str, extra: &[&str], env: &[(&str, &str)]) -> Service {
    let mut args = vec![
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--introspection-url",
        introspection_url,
        "--client-id",
        CLIENT_ID,
    ];
    args.extend_from_slice(extra);
    let mut env = env.to_vec();
    env.push(("PHANTOM_AUTHZ_CLIENT_SECRET", CLIENT_SECRET));
    Service::spawn(&args, &env)
}

#[tokio::test]
async fn proxy_variables_in_the_environment_are_ignored() {
    let idp = vouching_idp().await;
    let (proxy, connections) = counting_listener().await;
    let proxy = format!("http://{proxy}");
    let mut env: Vec<(&str, &str)> = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .map(|name| (name, proxy.as_str()))
    .to_vec();
    // An exemption inherited from the test's own environment would hide the fault.
    env.extend([("NO_PROXY", ""), ("no_proxy", "")]);
    let service = service_with_env(&idp.url(), &[], &env);
    let mut client = service.client().await;
    for token in ["direct-1", "direct-2"] {
        let (verdict, _) = timed_check(&mut client, bearer_request(token)).await;
        assert_allowed_for(&verdict, token);
    }
    assert_eq!(idp.calls(), 2);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the client secret and tokens went to a proxy from the environment"
    );
}

#[tokio::test]
async fn idp_proxy_carries_every_introspection() {
    // The scripted IdP stands in for the proxy: it answers the absolute-form request
    // (`POST http://idp.invalid/… HTTP/1.1`) itself. `.invalid` never resolves, so an answer
    // proves the call went through the proxy.
    let idp = vouching_idp().await;
    let proxy = format!("http://proxy-user:Pr0xy-Pa55@{}", idp.addr);
    let service = service_with_env(
        "http://idp.invalid/oauth/v2/oauth-introspect",
        &["--idp-proxy", &proxy],
        &[],
    );
    let mut client = service.client().await;
    let (verdict, _) = timed_check(&mut client, bearer_request("proxied")).await;
    assert_allowed_for(&verdict, "proxied");
    assert_eq!(idp.calls(), 1);
    assert_eq!(idp.seen()[0].token, "proxied");
    assert!(!service.log().contains("Pr0xy-Pa55"), "{}", service.log());
}

#[tokio::test]
async fn flapping_idp_never_yields_an_allow_on_a_failure() {
    // Every other call fails, in turn with 500, 503, a garbage 200 and a connection-level 502.
    let outcomes = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
    let record = outcomes.clone();
    let idp = Idp::start(move |seen| {
        let mut outcomes = record.lock().unwrap();
        let n = outcomes.len();
        let ok = n.is_multiple_of(2);
        outcomes.push((seen.token.clone(), ok));
        if ok {
            return Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0));
        }
        match (n / 2) % 4 {
            0 => Reply::status(500),
            1 => Reply::status(503),
            2 => Reply::jwt("<html>maintenance</html>"),
            _ => Reply::status(502),
        }
    })
    .await;
    let service = Service::start(&idp.url(), "jwt", &["--introspection-timeout", "500ms"]);
    let mut client = service.client().await;
    let (mut allows, mut denials) = (0, 0);
    for n in 0..24 {
        // Each token is asked twice in a row: a failure must not stick, a success is cached.
        let token = format!("flap-{}", n / 2);
        let calls_before = idp.calls();
        let (verdict, took) = timed_check(&mut client, bearer_request(&token)).await;
        assert!(took < CHECK_BOUND);
        if idp.calls() == calls_before {
            // Served from the cache: only a previous success can be there.
            let seen = outcomes.lock().unwrap().clone();
            assert!(
                seen.iter().any(|(t, ok)| t == &token && *ok),
                "{token} allowed from cache without a success"
            );
            assert_allowed_for(&verdict, &token);
            continue;
        }
        let (seen_token, ok) = outcomes.lock().unwrap().last().cloned().unwrap();
        assert_eq!(seen_token, token);
        if ok {
            assert_allowed_for(&verdict, &token);
            allows += 1;
        } else {
            assert_ne!(verdict.http_status, 200, "allow on a failure: {verdict:?}");
            assert!([502, 503].contains(&verdict.http_status), "{verdict:?}");
            denials += 1;
        }
    }
    assert!(
        allows >= 6 && denials >= 6,
        "{allows} allows, {denials} denials"
    );
    // Failures interleaved with successes never open the circuit.
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        0.0
    );
}

/// IdP bodies that must each end in 502 (never an allow), in both modes.
fn garbage_bodies(mode: &str) -> Vec<Vec<u8>> {
    let jwt = make_jwt("x", Some(unix_now() + 3600), 0);
    let [header, payload, signature]: [&str; 3] =
        jwt.split('.').collect::<Vec<_>>().try_into().unwrap();
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    // JWT shape checks: each of these is not a compact JWS with a JSON object payload.
    let bad_jwts: Vec<String> = vec![
        String::new(),
        "a.b".into(),
        format!("{jwt}.{signature}"),
        format!("{header}..{signature}"),
        format!("{header}.{payload}."),
        format!(".{payload}.{signature}"),
        format!("{header}=.{payload}.{signature}"),
        format!("{header}.{payload}==.{signature}"),
        format!("{header}.{payload}.{signature}\r\nx-injected: 1"),
        format!("{header}.{payload} .{signature}"),
        format!("{header}.{}.{signature}", b64("[1,2]")),
        format!("{header}.{}.{signature}", b64("not json")),
        format!("{header}.{}.{signature}", b64(r#"{"exp":"tomorrow"}"#)),
        format!("{header}.{}.{signature}", b64(r#"{"exp":-5}"#)),
        format!("{header}.{}.{signature}", b64(&"[".repeat(20_000))),
        format!("{header}.{}.{signature}", "A".repeat(5)),
    ];
    let mut bodies: Vec<Vec<u8>> = vec![
        b"\xff\xfe\x00binary".to_vec(),
        b"<html><body>Service Unavailable</body></html>".to_vec(),
    ];
    match mode {
        "jwt" => bodies.extend(bad_jwts.into_iter().map(String::into_bytes)),
        _ => {
            bodies.extend(bad_jwts.into_iter().map(|bad| {
                serde_json::json!({"active": true, "jwt": bad})
                    .to_string()
                    .into_bytes()
            }));
            for raw in [
                "",
                "null",
                "true",
                r#"{"active":1}"#,
                r#"{"active":null,"jwt":"a.b.c"}"#,
                r#"{"active":true,"jwt":null}"#,
                r#"{"active":true,"jwt":["a","b","c"]}"#,
                r#"{"active":true,"active":"yes"}"#,
            ] {
                bodies.push(raw.as_bytes().to_vec());
            }
            bodies.push(format!(r#"{{"active":true,"jwt":"{jwt}","exp":"never"}}"#).into_bytes());
            bodies.push(format!("{}{}", "[".repeat(50_000), "]".repeat(10)).into_bytes());
            bodies.push(format!(r#"{{"active":true,"jwt":"{jwt}"}} trailing"#).into_bytes());
        }
    }
    bodies
}

async fn garbage_is_502(mode: &'static str) {
    let bodies = Arc::new(garbage_bodies(mode));
    let script = bodies.clone();
    let idp = Idp::start(move |seen| {
        let n: usize = seen.token.trim_start_matches("garbage-").parse().unwrap();
        Reply::status(200)
            .header("content-type", "application/octet-stream")
            .body(&script[n])
    })
    .await;
    let service = Service::start(&idp.url(), mode, &["--circuit-failure-threshold", "0"]);
    let mut client = service.client().await;
    for (n, body) in bodies.iter().enumerate() {
        let (verdict, took) =
            timed_check(&mut client, bearer_request(&format!("garbage-{n}"))).await;
        assert_eq!(
            verdict.http_status,
            502,
            "{mode} body {:?} gave {verdict:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        assert!(took < CHECK_BOUND, "{took:?}");
    }
    assert_eq!(idp.calls(), bodies.len());
    let mut service = service;
    assert_alive(&mut service);
}

#[tokio::test]
async fn jwt_mode_garbage_and_misshapen_jwts_are_502() {
    garbage_is_502("jwt").await;
}

#[tokio::test]
async fn json_mode_garbage_and_misshapen_jwts_are_502() {
    garbage_is_502("json").await;
}

#[tokio::test]
async fn enormous_idp_bodies_are_502_quickly_without_blowing_memory() {
    const TEN_MIB: usize = 10 << 20;
    // A 10 MiB body announced by Content-Length, and one streamed chunked with no length.
    let body = Arc::new(vec![b'e'; TEN_MIB]);
    let announced = Idp::start(move |_| Reply::jwt("").body(&body)).await;
    let chunked = RawIdp::start(|mut stream, _| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/jwt\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = format!("10000\r\n{}\r\n", "e".repeat(0x10000));
        for _ in 0..TEN_MIB / 0x10000 {
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
    })
    .await;
    for url in [announced.url(), chunked.url()] {
        let mut service = Service::start(&url, "jwt", &["--circuit-failure-threshold", "0"]);
        let baseline = peak_rss(service.pid());
        let client = service.client().await;
        let checks: Vec<_> = (0..8)
            .map(|n| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    timed_check(&mut client, bearer_request(&format!("huge-{n}"))).await
                })
            })
            .collect();
        for task in checks {
            let (verdict, took) = task.await.unwrap();
            assert_eq!(verdict.http_status, 502, "{url}: {verdict:?}");
            assert!(took < CHECK_BOUND, "{url}: {took:?}");
        }
        // Eight 10 MiB bodies read whole would add 80 MiB; capped reads add a few.
        let grown = peak_rss(service.pid()).saturating_sub(baseline);
        assert!(
            grown < 32 << 20,
            "{url}: peak memory grew by {} MiB",
            grown >> 20
        );
        assert_alive(&mut service);
    }
    assert_eq!(chunked.calls(), 8);
}
