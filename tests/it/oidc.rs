//! `--introspection-mode rfc7662` against a real OAuth server, npm `oidc-provider`: its access
//! tokens exchanged for JWTs that phantom-authz signs and an independent JOSE library verifies,
//! cached until the token's `exp`, revoked, discovered through `--issuer`, with each client
//! authentication method the server accepts; and the mode's own start-up and shutdown edges.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use phantom_authz::metrics::INTROSPECTIONS;

use crate::support::{
    App, OidcOptions, OidcProvider, Service, bearer_request, check, eventually, evict, free_port,
    key_file, run_binary, verify_jwt,
};

const JWT_ISSUER: &str = "https://phantom-authz.test";
const INVALID_TOKEN: &str = "Bearer realm=\"api\", error=\"invalid_token\"";

/// Flags for rfc7662 mode signing with `key`, introspecting as `client` (`gw-basic` or
/// `gw-post`, whose secret is `<client>-secret` in the fixture).
fn rfc7662_flags<'a>(
    introspection_url: &'a str,
    key: &'a str,
    client: &'a str,
    secret: &'a str,
) -> Vec<&'a str> {
    vec![
        "--introspection-url",
        introspection_url,
        "--introspection-mode",
        "rfc7662",
        "--client-id",
        client,
        "--client-secret",
        secret,
        "--jwt-issuer",
        JWT_ISSUER,
        "--jwt-signing-key-file",
        key,
    ]
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The upstream JWT of an allow, verified with npm `jose` against the service's JWKS.
async fn verified(app: &App, authorization: Option<&str>) -> serde_json::Value {
    let jwt = authorization
        .and_then(|value| value.strip_prefix("Bearer "))
        .expect("an allow carries `Authorization: Bearer <JWT>`");
    let jwks = format!("http://{}/.well-known/jwks.json", app.admin);
    verify_jwt(&jwks, JWT_ISSUER, jwt)
        .await
        .unwrap_or_else(|reason| panic!("the JWT does not verify: {reason}"))
}

/// The service in rfc7662 mode against `provider`, introspecting as `gw-basic` and signing
/// with a new ES256 key in `dir`, with `extra` flags.
async fn basic_app(provider: &OidcProvider, dir: &Path, extra: &[&str]) -> App {
    let key = key_file(dir, "signing.pem", "ES256");
    let url = provider.introspection_url();
    let mut flags = rfc7662_flags(&url, key_path(&key), "gw-basic", "gw-basic-secret");
    flags.extend_from_slice(extra);
    App::launch(&flags).await
}

fn key_path(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test]
async fn a_real_token_becomes_a_jwt_that_an_independent_library_verifies() {
    let provider = OidcProvider::start(OidcOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let url = provider.introspection_url();
    for alg in ["ES256", "EdDSA", "RS256"] {
        let key = key_file(dir.path(), &format!("{alg}.pem"), alg);
        // client_secret_post here; the other tests use client_secret_basic and private_key_jwt.
        let mut flags = rfc7662_flags(&url, key_path(&key), "gw-post", "gw-post-secret");
        flags.extend([
            "--client-auth",
            "client_secret_post",
            "--jwt-signing-alg",
            alg,
            "--jwt-forward-claims",
            "token_type",
            // Longer than the token's 600 s, so that the token's own end shows.
            "--max-cache-ttl",
            "15m",
        ]);
        let app = App::launch(&flags).await;
        let mut client = app.client().await;

        let token = provider.token().await;
        let issued = unix_now();
        let verdict = check(&mut client, bearer_request(&token)).await;
        assert_eq!(verdict.http_status, 200, "{alg}: {verdict:?}");
        let jwt = verified(&app, verdict.header("authorization")).await;
        let (header, claims) = (&jwt["header"], &jwt["payload"]);
        assert_eq!(header["alg"], alg);
        assert_eq!(header["typ"], "at+jwt");
        assert!(header["kid"].as_str().is_some_and(|kid| kid.len() == 43));
        assert_eq!(claims["iss"], JWT_ISSUER);
        // A client-credentials token has no user: the client is the subject.
        assert_eq!(claims["sub"], "app");
        assert_eq!(claims["client_id"], "app");
        assert_eq!(claims["scope"], "read write");
        assert_eq!(claims["token_type"], "Bearer");
        // oidc-provider's tokens live 600 s; the JWT ends when the token does, not later.
        let exp = claims["exp"].as_u64().unwrap();
        assert!(
            (issued + 595..=issued + 601).contains(&exp),
            "exp {exp} issued {issued}"
        );
        assert!(claims["jti"].as_str().is_some_and(|jti| !jti.is_empty()));
        assert_eq!(app.metric(INTROSPECTIONS, &[]).await, 1.0);

        // A second Check is a cache hit: the same JWT, no introspection.
        let again = check(&mut client, bearer_request(&token)).await;
        assert_eq!(
            again.header("authorization"),
            verdict.header("authorization")
        );
        assert_eq!(app.metric(INTROSPECTIONS, &[]).await, 1.0);
    }
}

#[tokio::test]
async fn the_tokens_exp_ends_its_cache_entry() {
    let provider = OidcProvider::start(OidcOptions {
        access_token_ttl: Some(2),
        ..OidcOptions::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let app = basic_app(&provider, dir.path(), &[]).await;
    let mut client = app.client().await;

    let token = provider.token().await;
    let first = check(&mut client, bearer_request(&token)).await;
    assert_eq!(first.http_status, 200, "{first:?}");
    let exp = verified(&app, first.header("authorization")).await["payload"]["exp"]
        .as_u64()
        .unwrap();
    // Allowed from the cache until `exp` (5 minutes is the default --max-cache-ttl), then
    // introspected again and denied: never an allow after the token's end.
    let denied = eventually(Duration::from_secs(10), async || {
        let verdict = check(&mut client, bearer_request(&token)).await;
        if verdict.http_status == 200 {
            assert!(unix_now() <= exp, "allowed after the token's exp {exp}");
            return false;
        }
        assert_eq!(verdict.http_status, 401, "{verdict:?}");
        true
    })
    .await;
    assert!(denied, "the expired token was never denied");
    assert!(app.metric(INTROSPECTIONS, &[]).await >= 2.0);
}

#[tokio::test]
async fn a_token_revoked_at_the_server_is_denied_once_evicted() {
    let provider = OidcProvider::start(OidcOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let admin_token = dir.path().join("admin-token");
    std::fs::write(&admin_token, "admin-Secret-0123456789abcdef\n").unwrap();
    let admin = [
        "--admin-grpc-listen",
        "127.0.0.1:0",
        "--admin-token-file",
        key_path(&admin_token),
    ];
    let app = basic_app(&provider, dir.path(), &admin).await;
    let mut client = app.client().await;

    let token = provider.token().await;
    assert_eq!(
        check(&mut client, bearer_request(&token)).await.http_status,
        200
    );
    provider.revoke(&token).await;
    // Still allowed from the cache: the server does not tell phantom-authz (the bound is the
    // token's exp and --max-cache-ttl) ...
    assert_eq!(
        check(&mut client, bearer_request(&token)).await.http_status,
        200
    );
    // ... until the revocation is pushed with EvictToken.
    evict(
        app.admin_grpc.unwrap(),
        Some("Bearer admin-Secret-0123456789abcdef"),
        &token,
    )
    .await
    .unwrap();
    let verdict = check(&mut client, bearer_request(&token)).await;
    assert_eq!(verdict.http_status, 401, "{verdict:?}");
    assert_eq!(verdict.header("www-authenticate"), Some(INVALID_TOKEN));
}

#[tokio::test]
async fn the_endpoint_is_discovered_and_private_key_jwt_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "signing.pem", "ES256");
    let client_key = key_file(dir.path(), "client.pem", "ES256");
    // The service starts first and looks for a server that is not there yet.
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let app = App::launch(&[
        "--issuer",
        &issuer,
        "--introspection-mode",
        "rfc7662",
        "--client-id",
        "gw-jwt",
        "--client-auth",
        "private_key_jwt",
        "--client-assertion-key-file",
        key_path(&client_key),
        "--jwt-issuer",
        JWT_ISSUER,
        "--jwt-signing-key-file",
        key_path(&key),
    ])
    .await;
    let (status, body) = app.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""discovery":"pending""#), "{body}");
    let mut client = app.client().await;
    let verdict = check(&mut client, bearer_request("not-yet-known-tok")).await;
    assert_eq!(verdict.http_status, 503, "{verdict:?}");

    let provider = OidcProvider::start(OidcOptions {
        client_key_file: Some(&client_key),
        port: Some(port),
        ..OidcOptions::default()
    });
    let discovered = eventually(Duration::from_secs(15), async || {
        app.admin_get("/readyz").await.0 == 200
    })
    .await;
    assert!(discovered, "{:?}", app.admin_get("/readyz").await);
    assert!(
        app.admin_get("/readyz")
            .await
            .1
            .contains(r#""discovery":"done""#)
    );

    // oidc-provider accepts gw-jwt's client assertion, and answers for the token.
    let token = provider.token().await;
    let verdict = check(&mut client, bearer_request(&token)).await;
    assert_eq!(verdict.http_status, 200, "{verdict:?}");
    assert_eq!(
        verified(&app, verdict.header("authorization")).await["payload"]["client_id"],
        "app"
    );
    // A fresh assertion for each call (oidc-provider refuses a replayed jti).
    let other = provider.token().await;
    let verdict = check(&mut client, bearer_request(&other)).await;
    assert_eq!(verdict.http_status, 200, "{verdict:?}");
}

#[tokio::test]
async fn an_unknown_token_is_invalid_and_a_stopped_server_is_unavailable() {
    let mut provider = OidcProvider::start(OidcOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let app = basic_app(&provider, dir.path(), &[]).await;
    let mut client = app.client().await;

    let unknown = check(&mut client, bearer_request("NeverIssuedByThisServer0123")).await;
    assert_eq!(unknown.http_status, 401, "{unknown:?}");
    assert_eq!(unknown.header("www-authenticate"), Some(INVALID_TOKEN));
    assert!(unknown.header("authorization").is_none());

    let token = provider.token().await;
    provider.stop();
    let verdict = check(&mut client, bearer_request(&token)).await;
    assert_eq!(verdict.http_status, 503, "{verdict:?}");
    assert!(verdict.header("authorization").is_none());
}

#[tokio::test]
async fn a_service_still_discovering_stops_at_sigterm_without_waiting_out_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "signing.pem", "ES256");
    // Nothing listens there: discovery keeps retrying.
    let issuer = format!("http://127.0.0.1:{}", free_port());
    let mut service = Service::spawn(
        &[
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--issuer",
            &issuer,
            "--introspection-mode",
            "rfc7662",
            "--client-id",
            "gw-basic",
            "--jwt-issuer",
            JWT_ISSUER,
            "--jwt-signing-key-file",
            key_path(&key),
            "--shutdown-grace",
            "30s",
        ],
        &[("PHANTOM_AUTHZ_CLIENT_SECRET", "gw-basic-secret")],
    );
    let retrying = eventually(Duration::from_secs(10), async || {
        service.log().contains("identity server discovery failed")
    })
    .await;
    assert!(retrying, "{}", service.log());
    service.signal("TERM");
    let exit = service
        .wait_exit(Duration::from_secs(5))
        .expect("waited for a discovery that never ends");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

#[test]
fn an_unreadable_key_file_is_one_clear_configuration_error() {
    let (code, stderr) = run_binary(
        &[
            "--introspection-url",
            "http://127.0.0.1:9/introspect",
            "--introspection-mode",
            "rfc7662",
            "--client-id",
            "gw",
            "--client-secret",
            "s3cr3t-value",
            "--jwt-issuer",
            JWT_ISSUER,
            "--jwt-signing-key-file",
            "/nonexistent/jwt-key.pem",
        ],
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--jwt-signing-key-file: cannot read /nonexistent/jwt-key.pem"),
        "{stderr}"
    );
    // The cause once, not once per level of the error chain.
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
}
