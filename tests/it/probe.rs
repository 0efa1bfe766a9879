//! `phantom-authz check`, the built-in client: what it prints and the status it exits with, for
//! an allow, each kind of deny, and a service it cannot reach.

use crate::support::*;

/// An IdP answering like the scripted one: `inactive…` inactive, `unavailable…` 503, anything
/// else active with a JWT whose `sub` is the token.
async fn idp() -> Idp {
    Idp::start(|seen| {
        if seen.token.starts_with("inactive") {
            Reply::status(204)
        } else if seen.token.starts_with("unavailable") {
            Reply::status(503)
        } else {
            Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 600))
        }
    })
    .await
}

/// Runs `phantom-authz check` against `target`: exit code, stdout, stderr. Asynchronous, so
/// that the IdP on this test's runtime keeps answering meanwhile.
async fn check_command(target: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_phantom-authz"))
        .args(["check", "--target", target])
        .args(args)
        .env_clear()
        .output()
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_allow_shows_the_forwarded_jwt_shortened_and_exits_0() {
    let idp = idp().await;
    let app = App::start(&idp.url(), "jwt", &[]).await;
    let target = app.grpc.to_string();
    let (code, out, err) = check_command(&target, &["--token", "alice-token"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.starts_with("allow: Envoy forwards the request"),
        "{out}"
    );
    assert!(out.contains("authorization: Bearer eyJ"), "{out}");
    assert!(out.contains("--show-jwt"), "{out}");
    // The JWT's signature is not printed; with --show-jwt the whole JWT is.
    assert!(!out.contains("c2lnbmF0dXJl"), "{out}");
    let (code, full, _) = check_command(&target, &["--token", "alice-token", "--show-jwt"]).await;
    assert_eq!(code, Some(0));
    assert!(full.contains(".c2lnbmF0dXJl"), "{full}");
    // The token itself never appears.
    assert!(!out.contains("alice-token") && !full.contains("alice-token"));
}

#[tokio::test]
async fn denials_show_the_status_and_challenge_and_exit_1() {
    let idp = idp().await;
    let app = App::start(&idp.url(), "jwt", &["--circuit-failure-threshold", "0"]).await;
    let target = app.grpc.to_string();
    let (code, out, _) = check_command(&target, &["--token", "inactive-1"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("deny: Envoy answers HTTP 401"), "{out}");
    assert!(
        out.contains(r#"www-authenticate: Bearer realm="api", error="invalid_token""#),
        "{out}"
    );
    let (code, out, _) = check_command(&target, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(r#"www-authenticate: Bearer realm="api""#),
        "{out}"
    );
    let (code, out, _) = check_command(&target, &["--token", "unavailable-1"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("deny: Envoy answers HTTP 503"), "{out}");
}

#[tokio::test]
async fn json_output_reads_back_and_the_request_is_envoy_shaped() {
    let idp = idp().await;
    let app = App::start(&idp.url(), "jwt", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "bob-token\n").unwrap();
    let (code, out, err) = check_command(
        &format!("http://{}", app.grpc),
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "--method",
            "POST",
            "--path",
            "/orders",
            "--header",
            "x-request-id: probe-1",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{out}{err}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["decision"], "allow");
    assert_eq!(answer["http_status"], 200);
    assert_eq!(answer["grpc_code"], 0);
    assert!(answer["elapsed_ms"].as_f64().is_some());
    let authorization = answer["headers"]["authorization"].as_str().unwrap();
    assert!(authorization.starts_with("Bearer eyJ"), "{authorization}");
    // The token came from the file, trimmed.
    assert_eq!(idp.seen()[0].token, "bob-token");
}

#[tokio::test]
async fn a_service_that_cannot_be_reached_exits_2_naming_it() {
    let target = format!("127.0.0.1:{}", free_port());
    let (code, out, err) = check_command(&target, &["--token", "t", "--timeout", "2s"]).await;
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains(&format!("cannot reach {target}")), "{err}");
    let (code, _, err) = check_command(&target, &["--header", "no colon"]).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("--header"), "{err}");
}
