//! Running it: health endpoints, metrics, graceful shutdown, secret-free logs and configuration
//! errors, all against the real binary.

use std::process::Command;
use std::time::Duration;

use crate::support::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

async fn health_status(service: &Service, name: &str) -> Option<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.grpc))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: name.into(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status())
}

#[tokio::test]
async fn health_endpoints_and_metrics() {
    let idp = Idp::start(|s| Reply::jwt(&make_jwt(&s.token, Some(unix_now() + 60), 0))).await;
    let service = Service::start(&idp.url(), "jwt", &[]);
    assert_eq!(
        health_status(&service, "").await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(
        health_status(&service, AUTHZ_SERVICE).await,
        Some(ServingStatus::Serving)
    );
    assert_eq!(service.admin_get("/healthz").await.0, 200);
    let (status, body) = service.admin_get("/readyz").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(r#""redis":"disabled","evictions":"disabled""#),
        "{body}"
    );

    let mut client = service.client().await;
    check(&mut client, bearer_request("tok")).await;
    check(&mut client, bearer_request("tok")).await;
    check(&mut client, check_request(&[])).await;

    let (_, metrics) = service.admin_get("/metrics").await;
    for name in [
        "phantom_authz_check_duration_seconds_bucket",
        "phantom_authz_decisions_total",
        "phantom_authz_cache_lookups_total",
        "phantom_authz_introspections_total",
        "phantom_authz_introspection_duration_seconds_bucket",
        "phantom_authz_build_info",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    let allowed = [("decision", "allow"), ("status", "200")];
    assert_eq!(
        service
            .metric("phantom_authz_decisions_total", &allowed)
            .await,
        2.0
    );
    let no_token = [("status", "401"), ("reason", "no_token")];
    assert_eq!(
        service
            .metric("phantom_authz_decisions_total", &no_token)
            .await,
        1.0
    );
    let active = [("result", "active")];
    assert_eq!(
        service
            .metric("phantom_authz_introspections_total", &active)
            .await,
        1.0
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_checks_and_exits_zero() {
    let idp = Idp::start(|s| {
        Reply::jwt(&make_jwt(&s.token, Some(unix_now() + 60), 0)).delay(Duration::from_millis(800))
    })
    .await;
    let mut service = Service::start(&idp.url(), "jwt", &[]);
    let client = service.client().await;
    let in_flight: Vec<_> = (0..20)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move { check(&mut client, bearer_request(&format!("t{n}"))).await })
        })
        .collect();
    // Let the Checks reach the slow IdP, then ask the service to stop.
    assert!(eventually(Duration::from_secs(5), async || idp.calls() == 20).await);
    service.signal("TERM");
    assert!(
        eventually(Duration::from_secs(5), async || service
            .admin_get("/readyz")
            .await
            .0
            == 503)
        .await,
        "/readyz never reported shutting down"
    );
    for check in in_flight {
        assert_eq!(
            check.await.unwrap().http_status,
            200,
            "an in-flight Check was cut"
        );
    }
    let exit = service
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit");
    assert!(exit.success(), "{exit:?}");
    assert!(service.log().contains("shutting down"));
}

#[tokio::test]
async fn overall_health_is_not_serving_from_sigterm_on_while_checks_drain() {
    let idp = Idp::start(|s| {
        Reply::jwt(&make_jwt(&s.token, Some(unix_now() + 60), 0)).delay(Duration::from_secs(3))
    })
    .await;
    let mut service = Service::start(
        &idp.url(),
        "jwt",
        &["--check-timeout", "10s", "--introspection-timeout", "10s"],
    );
    // At SIGTERM the listener stops accepting and open connections take no new calls, so the
    // status is watched on a stream opened before (as `Watch` streams its changes).
    let channel = service.channel().await;
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let mut client = AuthorizationClient::new(channel);
    let in_flight = tokio::spawn(async move { check(&mut client, bearer_request("slow")).await });
    assert!(eventually(Duration::from_secs(5), async || idp.calls() == 1).await);
    service.signal("TERM");
    // The IdP holds the Check for 3 s, so the drain is still under way; the change is pushed
    // at once, the bound only stops a missing change from hanging the test.
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("\"\" did not change while Checks drained")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    assert_eq!(in_flight.await.unwrap().http_status, 200);
    let exit = service
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit");
    assert!(exit.success(), "{exit:?}");
}

/// Sends SIGTERM to a service started with `--shutdown-grace 500ms` while `held` is open, and
/// asserts a clean exit within 3.5 s. The bound is seven times the grace, for a loaded machine,
/// and still below the admin listener's 5 s header-read timeout, so the grace ends it, not
/// that timeout; without a deadline the process stays up as long as the connection does.
fn assert_exits_within_the_grace(service: &mut Service, held: &tokio::net::TcpStream) {
    assert!(held.peer_addr().is_ok());
    let signalled = std::time::Instant::now();
    service.signal("TERM");
    let exit = service.wait_exit(Duration::from_millis(3_500));
    let took = signalled.elapsed();
    let exit = exit.unwrap_or_else(|| {
        panic!(
            "still running {took:?} after SIGTERM; log:\n{}",
            service.log()
        )
    });
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    let log = service.log();
    assert!(log.contains("grace period"), "{log}");
}

/// Bytes the server has received from `client` on its `server` socket but not read yet; `None`
/// while there is no such socket.
fn unread_by_server(server: std::net::SocketAddr, client: std::net::SocketAddr) -> Option<u64> {
    let hex = |addr: std::net::SocketAddr| match addr {
        std::net::SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        ),
        std::net::SocketAddr::V6(_) => String::new(),
    };
    let (local, remote) = (hex(server), hex(client));
    tcp_sockets()
        .into_iter()
        .find(|socket| socket.local == local && socket.remote == remote)
        .map(|socket| socket.unread)
}

#[tokio::test]
async fn sigterm_exits_within_the_grace_despite_a_half_sent_admin_request() {
    use tokio::io::AsyncWriteExt as _;
    let idp = Idp::start(|_| Reply::status(204)).await;
    let mut service = Service::start(&idp.url(), "jwt", &["--shutdown-grace", "500ms"]);
    let mut held = tokio::net::TcpStream::connect(service.admin).await.unwrap();
    held.write_all(b"GET /metrics HTTP/1.1\r\nHost: phantom-authz\r\n")
        .await
        .unwrap();
    // Signalled before the server reads those bytes, it would close the connection as idle,
    // without the wait this test is about.
    let client = held.local_addr().unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || unread_by_server(
            service.admin,
            client
        ) == Some(0))
        .await,
        "the server never read the half-sent request"
    );
    assert_exits_within_the_grace(&mut service, &held);
    assert!(service.log().contains("admin HTTP"), "{}", service.log());
}

#[tokio::test]
async fn sigterm_exits_within_the_grace_despite_an_idle_admin_grpc_connection() {
    let idp = Idp::start(|_| Reply::status(204)).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "an-admin-secret-of-some-length\n").unwrap();
    let mut service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--shutdown-grace",
            "500ms",
            "--admin-grpc-listen",
            "127.0.0.1:0",
            "--admin-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let admin_grpc = service.admin_grpc().expect("admin gRPC listening");
    // Connected, and nothing sent: not even the HTTP/2 preface. The server's own SETTINGS
    // frame arriving shows that it accepted the connection and is serving it.
    let held = tokio::net::TcpStream::connect(admin_grpc).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), held.readable())
        .await
        .expect("the admin gRPC listener never served the connection")
        .unwrap();
    assert_exits_within_the_grace(&mut service, &held);
    assert!(service.log().contains("admin gRPC"), "{}", service.log());
}

#[tokio::test]
async fn the_admin_listener_closes_connections_that_never_finish_their_headers() {
    use phantom_authz::server::ADMIN_HEADER_READ_TIMEOUT;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let idp = Idp::start(|_| Reply::status(204)).await;
    let service = Service::start(&idp.url(), "jwt", &[]);
    let mut slow = tokio::net::TcpStream::connect(service.admin).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: phantom-authz\r\nX-Slow: ")
        .await
        .unwrap();
    let silent = tokio::net::TcpStream::connect(service.admin).await.unwrap();
    // The server closes both at the header-read timeout; 10 s more is for a loaded machine.
    let bound = ADMIN_HEADER_READ_TIMEOUT + Duration::from_secs(10);
    let (slow, silent) = tokio::join!(
        tokio::time::timeout(bound, closed_by_peer(slow)),
        tokio::time::timeout(bound, closed_by_peer(silent)),
    );
    assert!(slow.is_ok(), "a half-sent request held its connection open");
    assert!(silent.is_ok(), "a silent connection was held open");
    // The listener itself serves on.
    assert_eq!(service.admin_get("/healthz").await.0, 200);

    /// Reads until the other side closes (EOF) or resets the connection.
    async fn closed_by_peer(mut stream: tokio::net::TcpStream) {
        let mut buffer = [0u8; 1024];
        while let Ok(1..) = stream.read(&mut buffer).await {}
    }
}

#[tokio::test]
async fn logs_never_contain_tokens_jwts_or_the_secret() {
    let redis = Redis::start();
    let jwt = make_jwt("alice", Some(unix_now() + 600), 0);
    let served = jwt.clone();
    let idp = Idp::start(move |s| match s.token.as_str() {
        t if t.starts_with("bad") => Reply::status(503),
        t if t.starts_with("garbage") => Reply::jwt("not-a-jwt-Zm9vYmFy"),
        _ => Reply::jwt(&served),
    })
    .await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--local-cache-ttl", "0"],
    );
    let mut client = service.client().await;
    let tokens = ["good-TOKEN-7f3a9", "bad-TOKEN-1c2d3", "garbage-TOKEN-5e6f7"];
    for token in tokens {
        check(&mut client, bearer_request(token)).await;
        check(&mut client, bearer_request(token)).await;
    }
    check(
        &mut client,
        check_request(&[("authorization", "Bearer has spaces-TOKEN-x")]),
    )
    .await;
    // A Redis outage, and an IdP that disappears, exercise the error paths' logging too.
    drop(redis);
    check(&mut client, bearer_request("good-TOKEN-after")).await;
    drop(idp);
    check(&mut client, bearer_request("gone-TOKEN-9a8b")).await;
    let log = service.log();
    assert!(
        log.contains("introspection failed"),
        "error paths were not logged:\n{log}"
    );
    for secret in [
        "TOKEN",
        CLIENT_SECRET,
        "Sup3r",
        jwt.as_str(),
        jwt.split('.').nth(1).unwrap(),
        "not-a-jwt",
    ] {
        assert!(!log.contains(secret), "log leaks {secret:?}:\n{log}");
    }
}

#[test]
fn bad_configuration_exits_2_naming_the_flag() {
    let base = [
        "--introspection-url",
        "https://idp.example/introspect",
        "--client-id",
        "gw",
    ];
    let cases: &[(&[&str], &str)] = &[
        (
            &["--client-id", "gw", "--client-secret", "hunter2-secret"],
            "--introspection-url",
        ),
        (
            &[
                &base[..],
                &[
                    "--client-secret",
                    "hunter2-secret",
                    "--default-cache-ttl",
                    "soon",
                ],
            ]
            .concat(),
            "--default-cache-ttl",
        ),
        (
            &[
                &base[..],
                &[
                    "--client-secret",
                    "hunter2-secret",
                    "--introspection-mode",
                    "xml",
                ],
            ]
            .concat(),
            "--introspection-mode",
        ),
        (
            &[
                &base[..],
                &[
                    "--client-secret",
                    "hunter2-secret",
                    "--redis-url",
                    "memcached://x",
                ],
            ]
            .concat(),
            "--redis-url",
        ),
        (
            &[
                &base[..],
                &[
                    "--client-secret",
                    "hunter2-secret",
                    "--grpc-listen",
                    "nowhere",
                ],
            ]
            .concat(),
            "--grpc-listen",
        ),
        (&base[..], "--client-secret"),
        (
            &[
                &base[..],
                &[
                    "--client-secret",
                    "hunter2-secret",
                    "--redis-url",
                    "redis://cache:6379",
                ],
            ]
            .concat(),
            "--cache-secret-file",
        ),
        (
            &[&base[..], &["--client-secret-file", "/nonexistent/secret"]].concat(),
            "--client-secret-file",
        ),
    ];
    for (args, flag) in cases {
        let (code, stderr) = run_binary(args, &[]);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "{args:?} echoed the secret: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // A file that cannot be read at start-up: exit 2 and one line saying so, not two.
    let (code, stderr) = run_binary(
        &[&base[..], &["--client-secret-file", "/nonexistent/secret"]].concat(),
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.matches("cannot read").count(), 1, "{stderr}");
    // Environment variables work as flags do.
    let (code, stderr) = run_binary(
        &[],
        &[
            (
                "PHANTOM_AUTHZ_INTROSPECTION_URL",
                "https://idp.example/introspect",
            ),
            ("PHANTOM_AUTHZ_CLIENT_ID", "gw"),
            ("PHANTOM_AUTHZ_CLIENT_SECRET", "hunter2-secret"),
            ("PHANTOM_AUTHZ_INTROSPECTION_TIMEOUT", "never"),
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("--introspection-timeout"), "{stderr}");
    assert!(!stderr.contains("hunter2"));
}

#[tokio::test]
async fn client_secret_file_is_read_and_trimmed() {
    let idp = Idp::start(|s| Reply::jwt(&make_jwt(&s.token, Some(unix_now() + 60), 0))).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, format!("{CLIENT_SECRET}\n")).unwrap();
    let url = idp.url();
    let service = Service::spawn(
        &[
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--introspection-url",
            &url,
            "--client-id",
            CLIENT_ID,
            "--client-secret-file",
            path.to_str().unwrap(),
        ],
        &[],
    );
    let mut client = service.client().await;
    assert_eq!(
        check(&mut client, bearer_request("tok")).await.http_status,
        200
    );
    let seen = idp.seen();
    let expected = format!(
        "Basic {}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "gateway-client:Sup3r-Secret%2BValue%2F%3D"
        )
    );
    assert_eq!(seen[0].authorization.as_deref(), Some(expected.as_str()));
}

#[tokio::test]
async fn a_config_file_sits_beneath_environment_and_flags() {
    let idp = Idp::start(|s| Reply::jwt(&make_jwt(&s.token, Some(unix_now() + 60), 0))).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phantom-authz.toml");
    std::fs::write(
        &path,
        format!(
            "introspection-url = \"{}\"\nclient-id = \"{CLIENT_ID}\"\nrealm = \"from-file\"\n\
             introspection-mode = \"json\"\ngrpc-listen = \"127.0.0.1:1\"\n",
            idp.url()
        ),
    )
    .unwrap();
    // The flags given here override the file's listen address and mode; the secret comes from
    // the environment.
    let service = Service::spawn(
        &[
            "--config",
            path.to_str().unwrap(),
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--introspection-mode",
            "jwt",
        ],
        &[("PHANTOM_AUTHZ_CLIENT_SECRET", CLIENT_SECRET)],
    );
    let mut client = service.client().await;
    assert_eq!(
        check(&mut client, bearer_request("tok")).await.http_status,
        200
    );
    assert_eq!(idp.seen()[0].accept.as_deref(), Some("application/jwt"));
    let verdict = check(&mut client, check_request(&[])).await;
    assert_eq!(
        verdict.header("www-authenticate"),
        Some("Bearer realm=\"from-file\"")
    );
}

#[test]
fn check_config_validates_and_prints_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "hunter2-secret\n").unwrap();
    let cache_secret = dir.path().join("cache-secret");
    std::fs::write(&cache_secret, "cache-secret-of-thirty-two-bytes-or-more\n").unwrap();
    let config = dir.path().join("phantom-authz.toml");
    std::fs::write(
        &config,
        format!(
            "introspection-url = \"https://idp.example/introspect\"\nclient-id = \"gw\"\n\
             client-secret-file = \"{}\"\nredis-url = \"redis://:redis-password@cache:6379\"\n\
             cache-secret-file = \"{}\"\n",
            secret.display(),
            cache_secret.display()
        ),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_phantom-authz"))
        .args(["check-config", "--config", config.to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(
        stdout.contains("https://idp.example/introspect"),
        "{stdout}"
    );
    assert!(stdout.contains("redis://***@cache:6379"), "{stdout}");
    assert!(
        !stdout.contains("hunter2")
            && !stdout.contains("redis-password")
            && !stdout.contains("cache-secret-of"),
        "{stdout}"
    );

    // A cluster's seed nodes from the environment: every URL of the list masked.
    let output = Command::new(env!("CARGO_BIN_EXE_phantom-authz"))
        .args(["check-config", "--config", config.to_str().unwrap()])
        .env_clear()
        .env("PHANTOM_AUTHZ_REDIS_MODE", "cluster")
        .env(
            "PHANTOM_AUTHZ_REDIS_URL",
            "redis://:pass,word@node-a:7000,redis://:pass,word@node-b:7001",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("cluster"), "{stdout}");
    assert!(
        stdout.contains("redis://***@node-a:7000,redis://***@node-b:7001"),
        "{stdout}"
    );
    assert!(!stdout.contains("pass"), "{stdout}");

    // A cache secret too short to be one fails the check, naming the flag and not the secret.
    std::fs::write(&cache_secret, "short-cache-secret\n").unwrap();
    let (code, stderr) = run_binary(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--cache-secret-file"), "{stderr}");
    assert!(!stderr.contains("short-cache-secret"), "{stderr}");

    // A file it names that cannot be read fails the check, naming the flag.
    std::fs::remove_file(&secret).unwrap();
    let (code, stderr) = run_binary(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--client-secret-file"), "{stderr}");
    // So does a mistake in the file itself.
    std::fs::write(&config, "introspection_url = \"x\"\n").unwrap();
    let (code, stderr) = run_binary(&["check-config", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("--config") && stderr.contains("introspection_url"),
        "{stderr}"
    );
}

#[test]
fn check_config_prints_a_config_file_that_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let cache_secret = dir.path().join("cache-secret");
    std::fs::write(&cache_secret, format!("{CACHE_SECRET}\n")).unwrap();
    let (code, printed, stderr) = check_config(&[
        "--introspection-url",
        "https://idp.example/introspect",
        "--client-id",
        "gw",
        "--client-secret",
        "hunter2-secret",
        "--redis-url",
        "redis://:redis-password@cache:6379/0",
        "--cache-secret-file",
        cache_secret.to_str().unwrap(),
        "--local-cache-ttl",
        "3s",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(printed.contains("client-secret = \"***\""), "{printed}");
    assert!(printed.contains("local-cache-ttl = \"3s\""), "{printed}");
    assert!(printed.contains("max-cache-ttl = \"5m\""), "{printed}");
    assert!(
        !printed.contains("hunter2") && !printed.contains("redis-password"),
        "{printed}"
    );
    // With the secrets filled back in, the report is a config file giving the same settings.
    let file = dir.path().join("phantom-authz.toml");
    let filled = printed
        .replace(
            "client-secret = \"***\"",
            "client-secret = \"hunter2-secret\"",
        )
        .replace("redis://***@", "redis://:redis-password@");
    std::fs::write(&file, &filled).unwrap();
    let (code, again, stderr) = check_config(&["--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(again, printed);
}

/// Runs `check-config` with `args` and an empty environment: exit code, stdout, stderr.
fn check_config(args: &[&str]) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_phantom-authz"))
        .arg("check-config")
        .args(args)
        .env_clear()
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn check_config_masks_a_redis_password_holding_url_delimiters() {
    let cache_secret = cache_secret_file(&[CACHE_SECRET]);
    let check_redis_url = |redis_url: &str| {
        check_config(&[
            "--cache-secret-file",
            cache_secret.to_str().unwrap(),
            "--introspection-url",
            "https://idp.example/introspect",
            "--client-id",
            "gw",
            "--client-secret",
            "hunter2-secret",
            "--redis-url",
            redis_url,
        ])
    };
    // `#`, `/` and `?` inside the password end a URL's authority for a naive parser, which
    // then finds no `@` before them and prints the URL as it is. Written raw, the URL is not
    // one the Redis client accepts: the check fails, naming the flag and nothing of the value.
    let (code, stdout, stderr) = check_redis_url("redis://:pa#ss/wo?rd@cache:6379/0");
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("--redis-url"), "{stderr}");
    for fragment in ["pa#ss", "wo?rd", "pa#", "ss/wo", "?rd", "hunter2"] {
        assert!(
            !stdout.contains(fragment) && !stderr.contains(fragment),
            "{fragment:?} printed:\n{stdout}{stderr}"
        );
    }
    // Percent-encoded, it is valid, and printed masked.
    let (code, stdout, stderr) = check_redis_url("redis://:pa%23ss%2Fwo%3Frd@cache:6379/0");
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("redis://***@cache:6379/0"), "{stdout}");
    assert!(
        !stdout.contains("pa%23ss") && !stdout.contains("wo%3Frd"),
        "{stdout}"
    );
}

#[tokio::test]
async fn grpc_reflection_describes_ext_authz_and_health() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let idp = Idp::start(|_| Reply::status(204)).await;
    let service = Service::start(&idp.url(), "jwt", &[]);
    let channel = service.channel().await;
    let mut client = ServerReflectionClient::new(channel);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("envoy.service.auth.v3.Authorization".into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(
        names.contains(&"envoy.service.auth.v3.Authorization"),
        "{names:?}"
    );
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn a_method_or_service_that_is_not_served_is_unimplemented() {
    use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
    let idp = Idp::start(|_| Reply::status(204)).await;
    let service = Service::start(&idp.url(), "jwt", &[]);
    let channel = service.channel().await;
    // Checks skip the router; everything else still goes through it.
    for path in [
        "/envoy.service.auth.v3.Authorization/Report",
        "/envoy.service.auth.v3.Authorization/Check/",
        "/envoy.service.auth.v2.Authorization/Check",
        "/no.such.Service/Check",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let answer = grpc
            .unary(
                tonic::Request::new(CheckRequest::default()),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                tonic_prost::ProstCodec::<CheckRequest, CheckResponse>::default(),
            )
            .await;
        let status = answer.expect_err(path);
        assert_eq!(
            status.code(),
            tonic::Code::Unimplemented,
            "{path}: {status:?}"
        );
    }
    // And the Check itself still answers.
    let verdict = check(&mut service.client().await, bearer_request("any-token")).await;
    assert_eq!(verdict.http_status, 401);
}
