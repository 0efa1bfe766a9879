//! Every row of the decision table, in both introspection modes, against the real binary and a
//! scripted identity server over loopback.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

const OVERWRITE_IF_EXISTS_OR_ADD: i32 = 2;
const OK: i32 = 0;
const INVALID_ARGUMENT: i32 = 3;
const INTERNAL: i32 = 13;
const UNAVAILABLE: i32 = 14;
const UNAUTHENTICATED: i32 = 16;

const BARE: &str = "Bearer realm=\"api\"";
const INVALID_TOKEN: &str = "Bearer realm=\"api\", error=\"invalid_token\"";

/// Answers by token prefix, the way Curity would in `mode`.
fn curity(mode: &'static str) -> impl Fn(&Seen) -> Reply + Send + Sync + 'static {
    move |seen: &Seen| {
        let token = seen.token.as_str();
        let jwt = make_jwt(token, Some(unix_now() + 3600), 0);
        if let Some(rest) = token.strip_prefix("status-") {
            return Reply::status(rest[..3].parse().unwrap());
        }
        match (mode, token.split('-').next().unwrap()) {
            ("jwt", "active") => Reply::jwt(&jwt),
            ("json", "active") => Reply::json(json!({"active": true, "jwt": jwt, "sub": token})),
            ("jwt", "inactive") => Reply::status(204),
            ("json", "inactive") => Reply::json(json!({"active": false})),
            ("jwt", "garbage") => Reply::jwt("<html>this is not a JWT</html>"),
            ("json", "garbage") => Reply::status(200).body(b"{\"active\": tru"),
            ("jwt", "nojwt") => Reply::status(200),
            ("json", "nojwt") => Reply::json(json!({"active": true, "sub": "x"})),
            ("json", "notobject") => Reply::json(json!(["active", true])),
            (_, "slow") => Reply::jwt(&jwt).delay(Duration::from_secs(3)),
            (_, "redirect") => Reply::status(302).header("location", "http://127.0.0.1:9/steal"),
            _ => Reply::status(500),
        }
    }
}

async fn start(mode: &'static str) -> (Idp, App) {
    let idp = Idp::start(curity(mode)).await;
    // The circuit breaker would turn a run of IdP failures into 503s: these tests are about
    // how each single answer maps, so it is off here (tests/faults.rs covers it).
    let service = App::start(
        &idp.url(),
        mode,
        &[
            "--introspection-timeout",
            "500ms",
            "--circuit-failure-threshold",
            "0",
        ],
    )
    .await;
    (idp, service)
}

/// Checks `token` and asserts the denial's status, gRPC code and challenge.
async fn assert_denied(service: &App, token: &str, http: u16, code: i32, challenge: Option<&str>) {
    let mut client = service.client().await;
    let verdict = check(&mut client, bearer_request(token)).await;
    assert_eq!(verdict.http_status, http, "{token}: {verdict:?}");
    assert_eq!(verdict.grpc_code, code, "{token}: {verdict:?}");
    assert_eq!(
        verdict.header("www-authenticate"),
        challenge,
        "{token}: {verdict:?}"
    );
    if challenge.is_none() {
        assert!(verdict.headers.is_empty(), "{token}: {verdict:?}");
    }
}

async fn active_allows(mode: &'static str) {
    let (idp, service) = start(mode).await;
    let mut client = service.client().await;
    let verdict = check(&mut client, bearer_request("active-abc123")).await;
    assert_eq!(verdict.grpc_code, OK);
    assert_eq!(verdict.http_status, 200);
    // Exactly one header: Authorization overwritten with the JWT, never appended.
    assert_eq!(verdict.headers.len(), 1, "{verdict:?}");
    let (name, value, action) = &verdict.headers[0];
    assert_eq!(name, "authorization");
    assert_eq!(*action, OVERWRITE_IF_EXISTS_OR_ADD);
    let jwt = value.strip_prefix("Bearer ").unwrap();
    assert_eq!(jwt.split('.').count(), 3);
    assert!(jwt.starts_with("eyJ"));

    // The introspection request was what RFC 7662 and Curity expect.
    let seen = idp.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.token, "active-abc123");
    assert_eq!(request.body, "token=active-abc123");
    assert_eq!(
        request.content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    let accept = if mode == "jwt" {
        "application/jwt"
    } else {
        "application/json"
    };
    assert_eq!(request.accept.as_deref(), Some(accept));
    let expected = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "gateway-client:Sup3r-Secret%2BValue%2F%3D"
        )
    );
    assert_eq!(request.authorization.as_deref(), Some(expected.as_str()));
}

#[tokio::test]
async fn jwt_mode_active_token_is_allowed_with_the_jwt() {
    active_allows("jwt").await;
}

#[tokio::test]
async fn json_mode_active_token_is_allowed_with_the_jwt() {
    active_allows("json").await;
}

async fn no_token_rows(mode: &'static str) {
    let (idp, service) = start(mode).await;
    let mut client = service.client().await;
    for request in [
        check_request(&[("accept", "*/*")]),
        check_request(&[("authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")]),
        check_request(&[("authorization", "Bearer")]),
        check_request(&[("authorization", "Bearer    ")]),
        check_request(&[("authorization", "")]),
        raw_check_request(&[(":path", b"/"), ("authorization", b"Digest x")]),
        Default::default(),
    ] {
        let verdict = check(&mut client, request).await;
        assert_eq!(verdict.http_status, 401, "{verdict:?}");
        assert_eq!(verdict.grpc_code, UNAUTHENTICATED);
        assert_eq!(verdict.header("www-authenticate"), Some(BARE));
    }
    assert_eq!(idp.calls(), 0, "the IdP must not be called without a token");
}

#[tokio::test]
async fn jwt_mode_missing_or_foreign_credentials_get_a_bare_challenge() {
    no_token_rows("jwt").await;
}

#[tokio::test]
async fn json_mode_missing_or_foreign_credentials_get_a_bare_challenge() {
    no_token_rows("json").await;
}

async fn inactive_rows(mode: &'static str) {
    let (idp, service) = start(mode).await;
    assert_denied(
        &service,
        "inactive-1",
        401,
        UNAUTHENTICATED,
        Some(INVALID_TOKEN),
    )
    .await;
    // The replay is answered from the negative cache (--inactive-cache-ttl, 10 s by default):
    // a bad token sent in a loop costs the IdP one call per interval, not one per request.
    for _ in 0..5 {
        assert_denied(
            &service,
            "inactive-1",
            401,
            UNAUTHENTICATED,
            Some(INVALID_TOKEN),
        )
        .await;
    }
    assert_eq!(idp.calls(), 1);
    let hits = [("tier", "inactive"), ("result", "hit")];
    assert_eq!(
        service
            .metric("phantom_authz_cache_lookups_total", &hits)
            .await,
        5.0
    );

    // Turned off, every presentation asks the IdP.
    let service = App::start(
        &idp.url(),
        mode,
        &[
            "--inactive-cache-ttl",
            "0",
            "--circuit-failure-threshold",
            "0",
        ],
    )
    .await;
    for _ in 0..2 {
        assert_denied(
            &service,
            "inactive-1",
            401,
            UNAUTHENTICATED,
            Some(INVALID_TOKEN),
        )
        .await;
    }
    assert_eq!(idp.calls(), 3);
}

#[tokio::test]
async fn jwt_mode_204_is_invalid_token() {
    inactive_rows("jwt").await;
}

#[tokio::test]
async fn json_mode_inactive_is_invalid_token() {
    inactive_rows("json").await;
}

async fn unusable_bodies(mode: &'static str) {
    let (idp, service) = start(mode).await;
    let mut tokens = vec!["garbage-1", "nojwt-1"];
    if mode == "json" {
        tokens.push("notobject-1");
    }
    for token in &tokens {
        assert_denied(&service, token, 502, UNAVAILABLE, None).await;
    }
    assert_eq!(idp.calls(), tokens.len());
}

#[tokio::test]
async fn jwt_mode_unusable_body_is_502() {
    unusable_bodies("jwt").await;
}

#[tokio::test]
async fn json_mode_unusable_body_is_502() {
    unusable_bodies("json").await;
}

async fn idp_status_rows(mode: &'static str) {
    let (idp, service) = start(mode).await;
    assert_denied(&service, "status-503-a", 503, UNAVAILABLE, None).await;
    for status in [401, 403, 404, 500, 501, 502, 504, 599] {
        assert_denied(
            &service,
            &format!("status-{status}-a"),
            502,
            UNAVAILABLE,
            None,
        )
        .await;
    }
    let mut others = vec![400, 301, 302, 418, 429, 201];
    if mode == "json" {
        // 204 means "inactive" only to an application/jwt client.
        others.push(204);
    }
    for status in others {
        assert_denied(&service, &format!("status-{status}-a"), 500, INTERNAL, None).await;
    }
    // None of those were cached: asking again calls the IdP again.
    let before = idp.calls();
    assert_denied(&service, "status-503-a", 503, UNAVAILABLE, None).await;
    assert_eq!(idp.calls(), before + 1);
}

#[tokio::test]
async fn jwt_mode_idp_statuses_map_to_the_table() {
    idp_status_rows("jwt").await;
}

#[tokio::test]
async fn json_mode_idp_statuses_map_to_the_table() {
    idp_status_rows("json").await;
}

async fn unreachable_and_timeout(mode: &'static str) {
    // Nothing listens on this port.
    let url = format!("http://127.0.0.1:{}/introspect", free_port());
    let service = App::start(&url, mode, &["--introspection-timeout", "500ms"]).await;
    assert_denied(&service, "active-1", 503, UNAVAILABLE, None).await;

    let (_idp, service) = start(mode).await;
    let started = std::time::Instant::now();
    assert_denied(&service, "slow-1", 503, UNAVAILABLE, None).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(2),
        "timeout not applied: {elapsed:?}"
    );
}

#[tokio::test]
async fn jwt_mode_unreachable_or_slow_idp_is_503() {
    unreachable_and_timeout("jwt").await;
}

#[tokio::test]
async fn json_mode_unreachable_or_slow_idp_is_503() {
    unreachable_and_timeout("json").await;
}

async fn redirects_are_not_followed(mode: &'static str) {
    let elsewhere = Idp::start(|_| Reply::jwt("a.b.c")).await;
    let target = elsewhere.url();
    let idp = Idp::start(move |_| Reply::status(307).header("location", &target)).await;
    let service = App::start(&idp.url(), mode, &[]).await;
    assert_denied(&service, "active-1", 500, INTERNAL, None).await;
    assert_eq!(idp.calls(), 1);
    assert_eq!(
        elsewhere.calls(),
        0,
        "credentials must not follow a redirect"
    );
}

#[tokio::test]
async fn jwt_mode_redirects_are_not_followed() {
    redirects_are_not_followed("jwt").await;
}

#[tokio::test]
async fn json_mode_redirects_are_not_followed() {
    redirects_are_not_followed("json").await;
}

#[tokio::test]
async fn scheme_is_case_insensitive_and_raw_headers_work() {
    let (idp, service) = start("jwt").await;
    let mut client = service.client().await;
    for (n, scheme) in ["bearer", "BEARER", "BeArEr"].iter().enumerate() {
        let request = check_request(&[("authorization", &format!("{scheme} active-{n}"))]);
        assert_eq!(
            check(&mut client, request).await.http_status,
            200,
            "{scheme}"
        );
    }
    // encode_raw_headers: true puts every header, Authorization included, in header_map.
    let request = raw_check_request(&[
        (":authority", b"api.example"),
        (":path", b"/orders"),
        ("authorization", b"Bearer active-raw"),
        ("x-request-id", b"abc"),
    ]);
    let verdict = check(&mut client, request).await;
    assert_eq!(verdict.http_status, 200);
    assert_eq!(verdict.headers.len(), 1);
    assert!(
        verdict
            .header("authorization")
            .unwrap()
            .starts_with("Bearer eyJ")
    );
    assert_eq!(idp.seen().last().unwrap().token, "active-raw");
}

#[tokio::test]
async fn malformed_tokens_and_requests_never_reach_the_idp() {
    let (idp, service) = start("jwt").await;
    let mut client = service.client().await;
    let long = format!("Bearer {}", "a".repeat(4097));
    for value in [
        "Bearer two words",
        "Bearer caf\u{e9}",
        "Bearer a\tb",
        long.as_str(),
    ] {
        let verdict = check(&mut client, check_request(&[("authorization", value)])).await;
        assert_eq!(verdict.http_status, 401, "{value:?}");
        assert_eq!(verdict.header("www-authenticate"), Some(INVALID_TOKEN));
    }
    let control = raw_check_request(&[("authorization", b"Bearer abc\x01def")]);
    assert_eq!(check(&mut client, control).await.http_status, 401);
    let twice = raw_check_request(&[
        ("authorization", b"Bearer active-1"),
        ("authorization", b"Bearer active-2"),
    ]);
    let verdict = check(&mut client, twice).await;
    assert_eq!(
        (verdict.http_status, verdict.grpc_code),
        (400, INVALID_ARGUMENT)
    );
    assert_eq!(idp.calls(), 0);
}
