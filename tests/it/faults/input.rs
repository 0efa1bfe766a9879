//! Hostile input: refused without calling the identity server, and never echoed in the log.

use super::*;

/// A canary in every bad token: the log must never contain it.
const CANARY: &str = "Kq7ZxCanary";

async fn bad_input_service(extra: &[&str]) -> (Idp, Service) {
    let idp = vouching_idp().await;
    let service = Service::start(&idp.url(), "jwt", extra);
    (idp, service)
}

/// Sends each request through both header encodings when it is a single value, and asserts the
/// expected status, that the IdP was not called and that the log does not hold the canary.
async fn assert_refused(
    idp: &Idp,
    service: &Service,
    requests: Vec<(String, CheckRequest)>,
    status: u16,
) {
    let mut client = service.client().await;
    for (label, request) in requests {
        let (verdict, took) = timed_check(&mut client, request).await;
        assert_eq!(verdict.http_status, status, "{label}: {verdict:?}");
        assert!(took < CHECK_BOUND, "{label}: {took:?}");
    }
    assert_eq!(idp.calls(), 0, "bad input reached the IdP");
    let log = service.log();
    assert!(
        log.contains("check"),
        "Checks were not logged at all:\n{log}"
    );
    assert!(!log.contains(CANARY), "the log echoes a token:\n{log}");
}

/// The same Authorization value in `headers` and, as raw bytes, in `header_map`.
fn both_encodings(label: &str, value: &[u8]) -> Vec<(String, CheckRequest)> {
    let mut requests = vec![(
        format!("{label} (header_map)"),
        raw_check_request(&[("authorization", value), ("x-request-id", b"bad-input")]),
    )];
    if let Ok(text) = std::str::from_utf8(value) {
        requests.push((
            format!("{label} (headers)"),
            check_request(&[("authorization", text), ("x-request-id", "bad-input")]),
        ));
    }
    requests
}

#[tokio::test]
async fn tokens_over_the_default_4_kib_limit_are_refused_unseen() {
    let (idp, service) = bad_input_service(&[]).await;
    let mut requests = Vec::new();
    for len in [4097, 8192, 64 * 1024] {
        let token = format!("{CANARY}{}", "a".repeat(len - CANARY.len()));
        requests.extend(both_encodings(
            &format!("{len} bytes"),
            format!("Bearer {token}").as_bytes(),
        ));
    }
    assert_refused(&idp, &service, requests, 401).await;
    // Exactly at the limit is a token like any other.
    let mut client = service.client().await;
    let token = format!("edge{}", "b".repeat(4096 - 4));
    let (verdict, _) = timed_check(&mut client, bearer_request(&token)).await;
    assert_allowed_for(&verdict, &token);
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn tokens_over_a_configured_limit_are_refused_unseen() {
    let (idp, service) = bad_input_service(&["--max-token-length", "64"]).await;
    let token = format!("{CANARY}{}", "c".repeat(65 - CANARY.len()));
    assert_refused(
        &idp,
        &service,
        both_encodings("65 bytes", format!("Bearer {token}").as_bytes()),
        401,
    )
    .await;
    let mut client = service.client().await;
    let token = "d".repeat(64);
    let (verdict, _) = timed_check(&mut client, bearer_request(&token)).await;
    assert_allowed_for(&verdict, &token);
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn spaces_inside_a_token_are_refused_unseen() {
    let (idp, service) = bad_input_service(&[]).await;
    let mut requests = Vec::new();
    for value in [
        format!("Bearer {CANARY} rest"),
        format!("Bearer {CANARY}\trest"),
        format!("Bearer {CANARY}  =="),
        format!("Bearer abc,Bearer {CANARY}"),
    ] {
        requests.extend(both_encodings(&format!("{value:?}"), value.as_bytes()));
    }
    assert_refused(&idp, &service, requests, 401).await;
}

#[tokio::test]
async fn control_characters_in_a_token_are_refused_unseen() {
    let (idp, service) = bad_input_service(&[]).await;
    let mut requests = Vec::new();
    for control in [0x00u8, 0x01, 0x08, 0x0a, 0x0d, 0x1b, 0x7f] {
        let mut value = format!("Bearer {CANARY}").into_bytes();
        value.push(control);
        value.extend_from_slice(b"tail");
        requests.extend(both_encodings(&format!("control {control:#04x}"), &value));
    }
    let crlf = format!("Bearer {CANARY}\r\nx-injected: 1");
    requests.extend(both_encodings("header injection", crlf.as_bytes()));
    assert_refused(&idp, &service, requests, 401).await;
}

#[tokio::test]
async fn non_ascii_and_non_b64token_characters_are_refused_unseen() {
    let (idp, service) = bad_input_service(&[]).await;
    let mut requests = Vec::new();
    for suffix in [
        "é", "😀", "\u{200b}", "\"", ",", ";", "=mid", "%41", "(", "\\",
    ] {
        let value = format!("Bearer {CANARY}{suffix}x");
        requests.extend(both_encodings(&format!("{suffix:?}"), value.as_bytes()));
    }
    for raw in [&b"\xff\xfe"[..], b"\xc3\x28", b"\x80"] {
        let mut value = format!("Bearer {CANARY}").into_bytes();
        value.extend_from_slice(raw);
        requests.extend(both_encodings(&format!("invalid UTF-8 {raw:?}"), &value));
    }
    requests.extend(both_encodings("only padding", b"Bearer ===="));
    assert_refused(&idp, &service, requests, 401).await;
}

#[tokio::test]
async fn several_authorization_headers_are_400_unseen() {
    let (idp, service) = bad_input_service(&[]).await;
    let first = format!("Bearer {CANARY}1");
    let second = format!("Bearer {CANARY}2");
    let requests = vec![
        (
            "twice, same case (header_map)".to_owned(),
            raw_check_request(&[
                ("authorization", first.as_bytes()),
                ("authorization", second.as_bytes()),
            ]),
        ),
        (
            "twice, different case (header_map)".to_owned(),
            raw_check_request(&[
                ("authorization", first.as_bytes()),
                (":path", b"/x"),
                ("AUTHORIZATION", second.as_bytes()),
            ]),
        ),
        (
            "twice, same value (header_map)".to_owned(),
            raw_check_request(&[
                ("authorization", first.as_bytes()),
                ("authorization", first.as_bytes()),
            ]),
        ),
        (
            "twice, different case (headers)".to_owned(),
            check_request(&[("authorization", &first), ("Authorization", &second)]),
        ),
        (
            "twice, neither lowercase (headers)".to_owned(),
            check_request(&[("Authorization", &first), ("AUTHORIZATION", &second)]),
        ),
    ];
    assert_refused(&idp, &service, requests, 400).await;
}

#[tokio::test]
async fn oversized_header_maps_are_answered_and_the_service_survives() {
    // Raised from the 256 KiB default so that these large requests reach the service.
    let (idp, mut service) = bad_input_service(&["--grpc-max-request-bytes", "4MiB"]).await;
    let mut client = service.client().await;
    let filler: Vec<(String, String)> = (0..10_000)
        .map(|n| (format!("x-filler-{n}"), format!("value-{n}")))
        .collect();
    let big = "v".repeat(1 << 20);

    // 10,000 headers around a good token, in both encodings: a correct allow.
    let mut headers: Vec<(&str, &str)> = filler
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    headers.push(("authorization", "Bearer many-headers"));
    let (verdict, took) = timed_check(&mut client, check_request(&headers)).await;
    assert_allowed_for(&verdict, "many-headers");
    assert!(took < CHECK_BOUND, "{took:?}");
    let raw: Vec<(&str, &[u8])> = filler
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()))
        .chain([("authorization", &b"Bearer many-raw-headers"[..])])
        .collect();
    let (verdict, took) = timed_check(&mut client, raw_check_request(&raw)).await;
    assert_allowed_for(&verdict, "many-raw-headers");
    assert!(took < CHECK_BOUND, "{took:?}");

    // A 1 MiB value beside a good token: a correct allow.
    let (verdict, _) = timed_check(
        &mut client,
        check_request(&[("x-big", &big), ("authorization", "Bearer big-neighbour")]),
    )
    .await;
    assert_allowed_for(&verdict, "big-neighbour");
    assert_eq!(idp.calls(), 3);

    // A 1 MiB Authorization value and 10,000 Authorization headers: denials, IdP untouched.
    let huge = format!("Bearer {CANARY}{big}");
    let (verdict, _) = timed_check(&mut client, check_request(&[("authorization", &huge)])).await;
    assert_eq!(verdict.http_status, 401, "{verdict:?}");
    let canary = format!("Bearer {CANARY}");
    let many_auth: Vec<(&str, &[u8])> = (0..10_000)
        .map(|_| ("authorization", canary.as_bytes()))
        .collect();
    let (verdict, _) = timed_check(&mut client, raw_check_request(&many_auth)).await;
    assert_eq!(verdict.http_status, 400, "{verdict:?}");

    // Past gRPC's 4 MiB message limit: refused by the transport, which Envoy treats as a
    // denial (failure_mode_allow is off). Never an allow.
    let giant = "g".repeat(5 << 20);
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        client.check(check_request(&[
            ("x-giant", &giant),
            ("authorization", "Bearer giant-neighbour"),
        ])),
    )
    .await
    .expect("unanswered");
    match result {
        Err(status) => assert!(
            matches!(
                status.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ),
            "{status}"
        ),
        Ok(response) => {
            let verdict = crate::support::verdict(response.into_inner());
            assert!(
                verdict.http_status != 200 || forwarded_sub(&verdict) == "giant-neighbour",
                "{verdict:?}"
            );
        }
    }
    assert_eq!(idp.calls(), 3, "oversized input reached the IdP");

    // Still alive and still answering correctly.
    assert_alive(&mut service);
    let mut client = service.client().await;
    let (verdict, _) = timed_check(&mut client, bearer_request("still-here")).await;
    assert_allowed_for(&verdict, "still-here");
    assert!(!service.log().contains(CANARY), "the log echoes a token");
}
