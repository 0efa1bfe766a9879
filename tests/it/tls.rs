//! Transport security with certificates generated at test time: HTTPS to the IdP through a
//! private CA, TLS and mTLS on the gRPC listener, and `rediss://` to a TLS `redis-server`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use phantom_authz::admin::proto::admin_client::AdminClient;
use phantom_authz::admin::proto::{EvictTokenRequest, EvictTokenResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use redis::AsyncCommands;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A private CA with a server certificate (localhost, 127.0.0.1) and a client certificate,
/// written as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    server_cert: rcgen::Certificate,
    server_key: KeyPair,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "phantom-authz test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();

        let server_key = KeyPair::generate().unwrap();
        let server_cert = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        std::fs::write(dir.path().join("server.pem"), server_cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();

        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(vec!["envoy".into()]).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "envoy");
        let client_cert = client_params.signed_by(&client_key, &ca).unwrap();
        std::fs::write(dir.path().join("client.pem"), client_cert.pem()).unwrap();
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem()).unwrap();

        // A second, unrelated CA: its certificates must be refused.
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = CertifiedIssuer::self_signed(other, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other.pem()).unwrap();
        Pki {
            dir,
            server_cert,
            server_key,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_owned()
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

/// Terminates TLS with the test server certificate and relays plaintext to `backend`.
async fn tls_front(pki: &Pki, backend: std::net::SocketAddr) -> std::net::SocketAddr {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server_key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![pki.server_cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

async fn jwt_idp() -> Idp {
    Idp::start(|s| Reply::jwt(&make_jwt(&s.token, Some(unix_now() + 600), 0))).await
}

#[tokio::test]
async fn https_idp_behind_a_private_ca() {
    let pki = Pki::new();
    let idp = jwt_idp().await;
    let front = tls_front(&pki, idp.addr).await;
    let url = format!(
        "https://localhost:{}/oauth/v2/oauth-introspect",
        front.port()
    );

    let trusted = Service::start(&url, "jwt", &["--idp-ca-file", &pki.arg("ca.pem")]);
    let mut client = trusted.client().await;
    assert_eq!(
        check(&mut client, bearer_request("tok-1"))
            .await
            .http_status,
        200
    );
    assert_eq!(idp.calls(), 1);

    // Another CA, or the system roots, do not vouch for this IdP: nothing is sent to it.
    for extra in [vec!["--idp-ca-file", &pki.arg("other-ca.pem")], vec![]] {
        let untrusted = Service::start(&url, "jwt", &extra);
        let mut client = untrusted.client().await;
        assert_eq!(
            check(&mut client, bearer_request("tok-2"))
                .await
                .http_status,
            503
        );
    }
    assert_eq!(idp.calls(), 1);
}

async fn tls_client(
    service: &Service,
    pki: &Pki,
    with_identity: bool,
) -> Result<AuthorizationClient<tonic::transport::Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("ca.pem")))
        .domain_name("localhost");
    if with_identity {
        tls = tls.identity(Identity::from_pem(
            pki.read("client.pem"),
            pki.read("client.key"),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", service.grpc.port()))?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(AuthorizationClient::new(channel))
}

#[tokio::test]
async fn grpc_listener_speaks_tls_and_requires_client_certificates() {
    let pki = Pki::new();
    let idp = jwt_idp().await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--grpc-tls-cert",
            &pki.arg("server.pem"),
            "--grpc-tls-key",
            &pki.arg("server.key"),
            "--grpc-tls-client-ca",
            &pki.arg("ca.pem"),
        ],
    );
    let mut client = tls_client(&service, &pki, true).await.unwrap();
    assert_eq!(
        check(&mut client, bearer_request("tok")).await.http_status,
        200
    );

    // Without a client certificate the handshake or the call fails: no answer either way.
    let refused = match tls_client(&service, &pki, false).await {
        Err(_) => true,
        Ok(mut client) => client.check(bearer_request("tok")).await.is_err(),
    };
    assert!(refused, "a client without a certificate was answered");

    // Plaintext gRPC gets nothing either.
    let plaintext = match AuthorizationClient::connect(format!("http://{}", service.grpc)).await {
        Err(_) => true,
        Ok(mut client) => client.check(bearer_request("tok")).await.is_err(),
    };
    assert!(plaintext, "a plaintext client was answered");

    // `phantom-authz check` speaks mTLS with the same files, and exits 2 when refused.
    let probe = async |identity: &[&str]| {
        let target = format!("127.0.0.1:{}", service.grpc.port());
        tokio::process::Command::new(env!("CARGO_BIN_EXE_phantom-authz"))
            .args(["check", "--target", &target, "--token", "tok"])
            .args([
                "--tls-ca",
                &pki.arg("ca.pem"),
                "--tls-server-name",
                "localhost",
            ])
            .args(identity)
            .env_clear()
            .output()
            .await
            .unwrap()
    };
    let identity = [
        "--tls-cert",
        &pki.arg("client.pem"),
        "--tls-key",
        &pki.arg("client.key"),
    ];
    let output = probe(&identity).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("allow"), "{stdout}");
    assert_eq!(probe(&[]).await.status.code(), Some(2));
}

const ADMIN_SECRET: &str = "admin-Secret-0123456789abcdef";

/// A service whose admin gRPC API speaks TLS with the test certificate; `client_ca` also
/// requires client certificates. Returns the service and the admin address.
fn admin_tls_service(idp: &Idp, pki: &Pki, client_ca: bool) -> (Service, std::net::SocketAddr) {
    let token_file = pki.path("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_SECRET}\n")).unwrap();
    let (token_file, cert, key, ca) = (
        token_file.to_str().unwrap().to_owned(),
        pki.arg("server.pem"),
        pki.arg("server.key"),
        pki.arg("ca.pem"),
    );
    let mut extra = vec![
        "--admin-grpc-listen",
        "127.0.0.1:0",
        "--admin-token-file",
        &token_file,
        "--admin-grpc-tls-cert",
        &cert,
        "--admin-grpc-tls-key",
        &key,
    ];
    if client_ca {
        extra.extend(["--admin-grpc-tls-client-ca", &ca]);
    }
    let service = Service::start(&idp.url(), "jwt", &extra);
    let admin = service.admin_grpc().expect("admin gRPC listening");
    (service, admin)
}

/// `EvictToken` over TLS trusting the test CA, presenting the client certificate when asked;
/// `tls: false` tries plaintext. Any failure, from connecting to the answer, is an `Err`.
async fn evict_with(
    admin: std::net::SocketAddr,
    pki: &Pki,
    tls: bool,
    identity: bool,
    token: &str,
) -> Result<EvictTokenResponse, String> {
    let scheme = if tls { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://127.0.0.1:{}", admin.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if tls {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pki.read("ca.pem")))
            .domain_name("localhost");
        if identity {
            config = config.identity(Identity::from_pem(
                pki.read("client.pem"),
                pki.read("client.key"),
            ));
        }
        endpoint = endpoint.tls_config(config).map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(EvictTokenRequest {
        token: token.to_owned(),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {ADMIN_SECRET}").parse().unwrap(),
    );
    AdminClient::new(channel)
        .evict_token(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| status.to_string())
}

#[tokio::test]
async fn admin_grpc_speaks_tls_and_refuses_plaintext() {
    let pki = Pki::new();
    let idp = jwt_idp().await;
    let (service, admin) = admin_tls_service(&idp, &pki, false);
    let mut client = service.client().await;
    assert_eq!(
        check(&mut client, bearer_request("tok")).await.http_status,
        200
    );
    check(&mut client, bearer_request("tok")).await;
    assert_eq!(idp.calls(), 1, "the second Check is served from memory");

    // Plaintext gets no eviction, and the token stays cached.
    let plaintext = evict_with(admin, &pki, false, false, "tok").await;
    assert!(plaintext.is_err(), "a plaintext client was answered");
    check(&mut client, bearer_request("tok")).await;
    assert_eq!(idp.calls(), 1);

    // Over TLS, trusting the CA, the eviction goes through: the next Check introspects.
    evict_with(admin, &pki, true, false, "tok").await.unwrap();
    assert_eq!(
        check(&mut client, bearer_request("tok")).await.http_status,
        200
    );
    assert_eq!(idp.calls(), 2, "the eviction over TLS did not take");
}

#[tokio::test]
async fn admin_grpc_with_a_client_ca_requires_client_certificates() {
    let pki = Pki::new();
    let idp = jwt_idp().await;
    let (service, admin) = admin_tls_service(&idp, &pki, true);
    let mut client = service.client().await;
    check(&mut client, bearer_request("tok")).await;
    assert_eq!(idp.calls(), 1);

    let without = evict_with(admin, &pki, true, false, "tok").await;
    assert!(
        without.is_err(),
        "a client without a certificate was answered"
    );
    let plaintext = evict_with(admin, &pki, false, false, "tok").await;
    assert!(plaintext.is_err(), "a plaintext client was answered");
    check(&mut client, bearer_request("tok")).await;
    assert_eq!(idp.calls(), 1, "a refused client evicted the token");

    evict_with(admin, &pki, true, true, "tok").await.unwrap();
    check(&mut client, bearer_request("tok")).await;
    assert_eq!(
        idp.calls(),
        2,
        "the eviction with a certificate did not take"
    );
}

#[test]
fn tls_flags_are_checked() {
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_phantom-authz"))
            .args([
                "--introspection-url",
                "https://idp.example/introspect",
                "--client-id",
                "gw",
                "--client-secret",
                "hunter2-secret",
            ])
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(run(&["--grpc-tls-cert", "/x.pem"]).contains("--grpc-tls-key"));
    assert!(run(&["--grpc-tls-client-ca", "/ca.pem"]).contains("--grpc-tls-client-ca"));
    assert!(
        run(&[
            "--redis-url",
            "redis://r:6379",
            "--redis-ca-file",
            "/ca.pem"
        ])
        .contains("--redis-ca-file")
    );
    assert!(
        run(&[
            "--grpc-tls-cert",
            "/missing.pem",
            "--grpc-tls-key",
            "/missing.key"
        ])
        .contains("--grpc-tls-cert")
    );
    assert!(run(&["--idp-ca-file", "/missing-ca.pem"]).contains("--idp-ca-file"));

    // The admin listener's TLS flags, likewise; check-config reads their files too.
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_SECRET).unwrap();
    let admin = [
        "--admin-grpc-listen",
        "127.0.0.1:0",
        "--admin-token-file",
        token_file.to_str().unwrap(),
    ];
    let with_admin = |tls: &[&str]| run(&[&admin[..], tls].concat());
    assert!(with_admin(&["--admin-grpc-tls-cert", "/x.pem"]).contains("--admin-grpc-tls-key"));
    assert!(
        with_admin(&["--admin-grpc-tls-client-ca", "/ca.pem"])
            .contains("--admin-grpc-tls-client-ca")
    );
    let stderr = run(&[
        "--admin-grpc-tls-cert",
        "/x.pem",
        "--admin-grpc-tls-key",
        "/x.key",
    ]);
    assert!(stderr.contains("--admin-grpc-listen"), "{stderr}");
    let missing = [
        "--admin-grpc-tls-cert",
        "/missing.pem",
        "--admin-grpc-tls-key",
        "/missing.key",
    ];
    assert!(with_admin(&missing).contains("--admin-grpc-tls-cert"));
    let check_config = Command::new(env!("CARGO_BIN_EXE_phantom-authz"))
        .args([
            "check-config",
            "--introspection-url",
            "https://idp.example/introspect",
            "--client-id",
            "gw",
            "--client-secret",
            "hunter2-secret",
        ])
        .args(admin)
        .args(missing)
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check_config.stderr);
    assert_eq!(check_config.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--admin-grpc-tls-cert"), "{stderr}");
}

/// A `redis-server` that only speaks TLS, on a free port.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    fn start(pki: &Pki) -> TlsRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--tls-cert-file", &pki.arg("server.pem")])
            .args(["--tls-key-file", &pki.arg("server.key")])
            .args(["--tls-ca-cert-file", &pki.arg("ca.pem")])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_port(port);
        TlsRedis { port, child }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn rediss_with_a_private_ca_is_shared_between_instances() {
    let pki = Pki::new();
    let redis = TlsRedis::start(&pki);
    let idp = jwt_idp().await;
    let url = format!("rediss://localhost:{}", redis.port);
    let ca = pki.arg("ca.pem");
    let flags = [
        "--redis-url",
        url.as_str(),
        "--redis-ca-file",
        ca.as_str(),
        "--local-cache-ttl",
        "0",
        // What is shown is sharing over TLS, not the 50 ms bound on a loaded machine.
        "--redis-timeout",
        "2s",
    ];
    let a = Service::start(&idp.url(), "jwt", &flags);
    let b = Service::start(&idp.url(), "jwt", &flags);
    let mut client_a = a.client().await;
    assert_eq!(
        check(&mut client_a, bearer_request("shared"))
            .await
            .http_status,
        200
    );

    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pki.read("ca.pem")),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    assert!(
        eventually(Duration::from_secs(3), async || {
            let keys: Vec<String> = conn.keys("phantom-authz:*").await.unwrap();
            !keys.is_empty()
        })
        .await,
        "the entry never reached Redis over TLS"
    );
    // B's own TLS connection to Redis may still be under way on a loaded machine.
    assert!(
        eventually(Duration::from_secs(5), async || {
            b.admin_get("/readyz").await.1.contains(r#""redis":"up""#)
        })
        .await,
        "B never reached Redis over TLS"
    );
    let mut client_b = b.client().await;
    assert_eq!(
        check(&mut client_b, bearer_request("shared"))
            .await
            .http_status,
        200
    );
    assert_eq!(idp.calls(), 1);
}
