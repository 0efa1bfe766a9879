//! Per-route authorization: required scopes and audience from Envoy's context extensions or the
//! config file's route table, enforced on the first Check of a token and on every cache hit
//! after it; who the caller is, handed to Envoy as claim headers and dynamic metadata.

use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::google::protobuf::value::Kind;

use crate::support::*;

/// The claims each token's JWT carries.
fn claims_of(token: &str) -> serde_json::Value {
    match token {
        // `scope` as a space-separated string, `aud` as a string.
        "reader" => serde_json::json!({
            "sub": "alice", "client_id": "web", "scope": "orders:read", "aud": "orders-api"
        }),
        // `scp` as an array, `aud` as an array.
        "writer" => serde_json::json!({
            "sub": "bob", "scp": ["orders:read", "orders:write"], "aud": ["orders-api", "other"]
        }),
        // A claim that would break out of its header.
        "crafty" => serde_json::json!({ "sub": "eve\r\nx-admin: yes", "scope": "orders:read" }),
        _ => serde_json::json!({ "sub": token }),
    }
}

/// Both modes: jwt answers with the JWT; json adds `scope` in the response itself (for
/// `json-extra`, a scope only the response names).
async fn idp(mode: &'static str) -> Idp {
    Idp::start(move |seen| {
        let mut claims = claims_of(&seen.token);
        claims["exp"] = (unix_now() + 3600).into();
        let jwt = jwt_with(&claims);
        match mode {
            "jwt" => Reply::jwt(&jwt),
            _ => {
                let mut answer = serde_json::json!({ "active": true, "jwt": jwt });
                if seen.token == "reader" {
                    answer["scope"] = "reports:read".into();
                }
                Reply::json(answer)
            }
        }
    })
    .await
}

async fn status(
    app: &App,
    request: envoy_types::pb::envoy::service::auth::v3::CheckRequest,
) -> Verdict {
    check(&mut app.client().await, request).await
}

async fn scopes_and_audience_from_context_extensions(mode: &'static str) {
    let idp = idp(mode).await;
    let app = App::start(&idp.url(), mode, &[]).await;
    let needs = |token: &str, scopes: &str| {
        route_request(
            "POST",
            "api.example",
            "/orders",
            token,
            &[("required_scopes", scopes)],
        )
    };
    // The first Check of each token introspects; everything after is a cache hit.
    let verdict = status(&app, needs("reader", "orders:write")).await;
    assert_eq!(verdict.http_status, 403, "{verdict:?}");
    assert_eq!(verdict.grpc_code, tonic::Code::PermissionDenied as i32);
    assert_eq!(
        verdict.header("www-authenticate"),
        Some(r#"Bearer realm="api", error="insufficient_scope", scope="orders:write""#)
    );
    assert_eq!(
        status(&app, needs("writer", "orders:write"))
            .await
            .http_status,
        200
    );
    assert_eq!(idp.calls(), 2);
    // All of them, from a cache hit: reader lacks one of two, writer holds both.
    let verdict = status(&app, needs("reader", "orders:read orders:write")).await;
    assert_eq!(verdict.http_status, 403);
    assert!(
        verdict
            .header("www-authenticate")
            .unwrap()
            .ends_with(r#"scope="orders:read orders:write""#),
        "{verdict:?}"
    );
    assert_eq!(
        status(&app, needs("writer", "orders:read orders:write"))
            .await
            .http_status,
        200
    );
    assert_eq!(
        status(&app, needs("reader", "orders:read"))
            .await
            .http_status,
        200
    );
    // The json response's own `scope` counts in json mode only.
    let reports = status(&app, needs("reader", "reports:read"))
        .await
        .http_status;
    assert_eq!(reports, if mode == "json" { 200 } else { 403 }, "{mode}");
    // Audience: a string or an array.
    let audience = |token: &str, aud: &str| {
        route_request(
            "GET",
            "api.example",
            "/orders",
            token,
            &[("required_audience", aud)],
        )
    };
    assert_eq!(
        status(&app, audience("reader", "orders-api"))
            .await
            .http_status,
        200
    );
    assert_eq!(
        status(&app, audience("writer", "other")).await.http_status,
        200
    );
    let verdict = status(&app, audience("reader", "billing-api")).await;
    assert_eq!(verdict.http_status, 401, "{verdict:?}");
    assert_eq!(
        verdict.header("www-authenticate"),
        Some(r#"Bearer realm="api", error="invalid_token""#)
    );
    assert_eq!(
        idp.calls(),
        2,
        "a route's requirement is checked from the cache"
    );
    let denied = [("reason", "insufficient_scope")];
    assert_eq!(
        app.metric("phantom_authz_decisions_total", &denied).await,
        if mode == "json" { 2.0 } else { 3.0 }
    );
    let foreign = [("reason", "audience_mismatch"), ("status", "401")];
    assert_eq!(
        app.metric("phantom_authz_decisions_total", &foreign).await,
        1.0
    );
}

#[tokio::test]
async fn jwt_mode_scopes_and_audience_from_context_extensions() {
    scopes_and_audience_from_context_extensions("jwt").await;
}

#[tokio::test]
async fn json_mode_scopes_and_audience_from_context_extensions() {
    scopes_and_audience_from_context_extensions("json").await;
}

#[tokio::test]
async fn a_malformed_route_setting_is_500_and_never_an_allow() {
    let idp = idp("jwt").await;
    let app = App::start(&idp.url(), "jwt", &[]).await;
    for (setting, value) in [
        ("required_scopes", ""),
        ("required_scopes", "orders:write \"x\""),
        ("required_audience", "two words"),
    ] {
        let request = route_request("GET", "api.example", "/", "writer", &[(setting, value)]);
        let verdict = status(&app, request).await;
        assert_eq!(verdict.http_status, 500, "{setting}={value:?}: {verdict:?}");
        assert_eq!(verdict.grpc_code, tonic::Code::Internal as i32);
    }
    assert_eq!(idp.calls(), 0, "a misconfigured route asks nobody");
}

#[tokio::test]
async fn the_route_table_applies_unless_context_extensions_are_given() {
    let idp = idp("jwt").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("phantom-authz.toml");
    std::fs::write(
        &file,
        r#"
unmatched-routes = "deny"

[[route]]
path-prefix = "/orders"
methods = ["POST"]
scopes = ["orders:write"]

[[route]]
path-prefix = "/orders"
scopes = "orders:read"

[[route]]
host = "admin.example"
audience = "admin-api"
"#,
    )
    .unwrap();
    let app = App::start(&idp.url(), "jwt", &["--config", file.to_str().unwrap()]).await;
    let check_route = async |method: &str, host: &str, path: &str, token: &str| {
        status(&app, route_request(method, host, path, token, &[]))
            .await
            .http_status
    };
    assert_eq!(
        check_route("POST", "api.example", "/orders/7", "reader").await,
        403
    );
    assert_eq!(
        check_route("POST", "api.example", "/orders/7", "writer").await,
        200
    );
    assert_eq!(
        check_route("GET", "api.example", "/orders?page=2", "reader").await,
        200
    );
    assert_eq!(
        check_route("GET", "admin.example:443", "/", "reader").await,
        401
    );
    // Unmatched and denied: before the token is even looked at.
    let calls = idp.calls();
    assert_eq!(
        check_route("GET", "api.example", "/invoices", "writer").await,
        403
    );
    assert_eq!(idp.calls(), calls);
    let no_route = [("reason", "no_route"), ("status", "403")];
    assert_eq!(
        app.metric("phantom_authz_decisions_total", &no_route).await,
        1.0
    );
    // Context extensions override the table, for this route only.
    let request = route_request(
        "POST",
        "api.example",
        "/orders/7",
        "reader",
        &[("required_scopes", "orders:read")],
    );
    assert_eq!(status(&app, request).await.http_status, 200);
}

#[tokio::test]
async fn the_caller_reaches_envoy_as_claim_headers_and_dynamic_metadata() {
    let idp = idp("jwt").await;
    let app = App::start(
        &idp.url(),
        "jwt",
        &[
            "--claim-header",
            "sub=x-user-id,scope=x-scopes,client_id=x-client-id",
        ],
    )
    .await;
    let mut client = app.client().await;
    // A client sending its own x-user-id: Envoy is told to remove it on every allow.
    let mut request = bearer_request("reader");
    request
        .attributes
        .as_mut()
        .unwrap()
        .request
        .as_mut()
        .unwrap()
        .http
        .as_mut()
        .unwrap()
        .headers
        .insert("x-user-id".into(), "mallory".into());
    for round in 0..2 {
        let response = client.check(request.clone()).await.unwrap().into_inner();
        let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
            panic!("not an allow: {response:?}");
        };
        let headers: Vec<(String, String)> = ok
            .headers
            .iter()
            .map(|h| {
                let h = h.header.as_ref().unwrap();
                (h.key.clone(), h.value.clone())
            })
            .collect();
        assert!(
            headers.contains(&("x-user-id".into(), "alice".into())),
            "{round}: {headers:?}"
        );
        assert!(headers.contains(&("x-scopes".into(), "orders:read".into())));
        assert!(headers.contains(&("x-client-id".into(), "web".into())));
        assert_eq!(
            ok.headers_to_remove,
            ["x-user-id", "x-scopes", "x-client-id"]
        );
        let metadata = response.dynamic_metadata.expect("dynamic metadata");
        let text = |name: &str| match &metadata.fields[name].kind {
            Some(Kind::StringValue(value)) => value.clone(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(text("sub"), "alice");
        assert_eq!(text("client_id"), "web");
        assert_eq!(text("scope"), "orders:read");
        assert!(matches!(metadata.fields["exp"].kind, Some(Kind::NumberValue(exp)) if exp > 0.0));
    }
    assert_eq!(idp.calls(), 1, "the second round was a cache hit");

    // A claim that would break out of its header is not set, and the client's copy still goes.
    let response = client
        .check(bearer_request("crafty"))
        .await
        .unwrap()
        .into_inner();
    let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
        panic!("not an allow");
    };
    assert!(
        ok.headers
            .iter()
            .all(|h| h.header.as_ref().unwrap().key != "x-user-id")
    );
    assert!(ok.headers_to_remove.contains(&"x-user-id".to_owned()));
}
