//! The HTTP forward-auth front door: the same decisions as over gRPC, asked over plain HTTP,
//! directly and through real gateways (Debian's nginx and Caddy) running the very configs in
//! `deploy/`, in front of an upstream that echoes what it received.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;

use crate::support::*;

/// `inactive…` is inactive, `unavailable…` makes the IdP answer 503, `nosub…` has no `sub`;
/// anything else is active with `sub` = the token.
async fn idp() -> Idp {
    Idp::start(|seen| {
        if seen.token.starts_with("inactive") {
            Reply::status(204)
        } else if seen.token.starts_with("unavailable") {
            Reply::status(503)
        } else if seen.token.starts_with("nosub") {
            Reply::jwt(&jwt_with(&serde_json::json!({ "exp": unix_now() + 3600 })))
        } else {
            Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 300))
        }
    })
    .await
}

async fn app(idp: &Idp, extra: &[&str]) -> App {
    let mut args = vec![
        "--http-listen",
        "127.0.0.1:0",
        "--claim-header",
        "sub=x-user-id",
        "--circuit-failure-threshold",
        "0",
    ];
    args.extend_from_slice(extra);
    App::start(&idp.url(), "jwt", &args).await
}

fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn asked_directly_it_answers_as_over_grpc() {
    let idp = idp().await;
    let app = app(&idp, &[]).await;
    let url = format!("http://{}/authz", app.http.unwrap());
    let client = http_client();
    let ask = async |token: Option<&str>, headers: &[(&str, &str)]| {
        let mut request = client.get(&url);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    };
    let allowed = ask(Some("alice"), &[]).await;
    assert_eq!(allowed.status(), 200);
    let jwt = allowed.headers()["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(jwt.starts_with("Bearer eyJ"), "{jwt}");
    assert_eq!(allowed.headers()["x-user-id"], "alice");
    assert!(allowed.text().await.unwrap().is_empty());
    // A cache hit: the same JWT, no second introspection.
    let again = ask(Some("alice"), &[]).await;
    assert_eq!(again.headers()["authorization"].to_str().unwrap(), jwt);
    assert_eq!(idp.calls(), 1);

    let bare = ask(None, &[]).await;
    assert_eq!(bare.status(), 401);
    assert_eq!(bare.headers()["www-authenticate"], r#"Bearer realm="api""#);
    let inactive = ask(Some("inactive-1"), &[]).await;
    assert_eq!(inactive.status(), 401);
    assert_eq!(
        inactive.headers()["www-authenticate"],
        r#"Bearer realm="api", error="invalid_token""#
    );
    let body = inactive.text().await.unwrap();
    assert_eq!(body, "{\"decision\":\"deny\",\"reason\":\"inactive\"}\n");
    assert_eq!(ask(Some("unavailable-1"), &[]).await.status(), 503);
    // Two Authorization headers: 400, and the IdP is not asked.
    let calls = idp.calls();
    let twice = client
        .get(&url)
        .header("authorization", "Bearer a")
        .header("authorization", "Bearer b")
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 400);
    assert_eq!(idp.calls(), calls);
    let malformed = [("status", "400"), ("transport", "http")];
    assert_eq!(
        app.metric("phantom_authz_decisions_total", &malformed)
            .await,
        1.0
    );
    // A token without the claim still gets the header, empty: copying it erases the client's.
    let nosub = ask(Some("nosub-1"), &[]).await;
    assert_eq!(nosub.status(), 200);
    assert_eq!(nosub.headers()["x-user-id"], "");

    let http = [("transport", "http"), ("decision", "allow")];
    assert_eq!(
        app.metric("phantom_authz_decisions_total", &http).await,
        3.0
    );
}

#[tokio::test]
async fn the_route_table_sees_the_original_request_where_the_gateway_puts_it() {
    let idp = idp().await;
    let (_dir, routes) = routes();
    let client = http_client();
    for (mode, path, headers, expected) in [
        // Caddy, Traefik, HAProxy: X-Forwarded-*; nginx's convention is then the client's word.
        (
            "x-forwarded",
            "/authz",
            &[("x-forwarded-uri", "/orders/1")][..],
            200,
        ),
        (
            "x-forwarded",
            "/authz",
            &[("x-forwarded-uri", "/admin")][..],
            403,
        ),
        (
            "x-forwarded",
            "/authz",
            &[("x-original-uri", "/orders/1")][..],
            403,
        ),
        // nginx: X-Original-*, and X-Forwarded-* are ignored.
        (
            "x-original",
            "/authz",
            &[("x-original-uri", "/orders/2")][..],
            200,
        ),
        (
            "x-original",
            "/authz",
            &[("x-forwarded-uri", "/orders/2")][..],
            403,
        ),
        // Envoy's http_service: the path after the prefix.
        ("path", "/authz/orders/3", &[][..], 200),
        (
            "path",
            "/authz/admin",
            &[("x-forwarded-uri", "/orders/3")][..],
            403,
        ),
    ] {
        let mut args = vec!["--config", routes.as_str(), "--http-original-request", mode];
        if mode == "path" {
            args.extend(["--http-path-prefix", "/authz"]);
        }
        let app = app(&idp, &args).await;
        let mut request = client
            .get(format!("http://{}{path}", app.http.unwrap()))
            .header("authorization", "Bearer alice");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let status = request.send().await.unwrap().status().as_u16();
        assert_eq!(status, expected, "{mode} {path} {headers:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Real gateways

/// An upstream that answers every request with the headers it received, as JSON, and counts.
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start() -> Upstream {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = Router::new().fallback(move |headers: HeaderMap| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let seen: HashMap<String, String> = headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                    .collect();
                serde_json::to_string(&seen).unwrap()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Upstream { addr, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// A gateway process, killed on drop.
struct Gateway {
    addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The file in `deploy/`, with its example addresses replaced by the test's.
fn deployed(path: &str, replacements: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    for (from, to) in replacements {
        assert!(text.contains(from), "{path} no longer names {from}");
        text = text.replace(from, to);
    }
    text
}

/// Waits until something accepts connections on `addr` (bounded so a gateway that never
/// starts fails the test rather than hanging it).
async fn accepting(addr: SocketAddr, child: &mut Child) {
    let up = eventually(Duration::from_secs(20), async || {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    assert!(up, "the gateway never listened ({:?})", child.try_wait());
}

async fn nginx(authz: SocketAddr, upstream: SocketAddr) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let site = deployed(
        "deploy/nginx/phantom-authz.conf",
        &[
            ("127.0.0.1:9003", authz.to_string()),
            ("127.0.0.1:3000", upstream.to_string()),
            ("127.0.0.1:8080", addr.to_string()),
        ],
    );
    std::fs::write(dir.path().join("phantom-authz.conf"), site).unwrap();
    for temp in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir(dir.path().join(temp)).unwrap();
    }
    // Only what a test run needs around the shipped server block: no daemon, files here.
    let main = format!(
        "daemon off;\nmaster_process off;\npid {0}/nginx.pid;\nerror_log {0}/error.log warn;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {0}/body;\n  proxy_temp_path {0}/proxy;\n  \
         fastcgi_temp_path {0}/fastcgi;\n  uwsgi_temp_path {0}/uwsgi;\n  scgi_temp_path {0}/scgi;\n  \
         include {0}/phantom-authz.conf;\n}}\n",
        dir.path().display()
    );
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, main).unwrap();
    let mut child = spawn_tied(
        Command::new("nginx")
            .args(["-p", &dir.path().display().to_string(), "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    accepting(addr, &mut child).await;
    Gateway {
        addr,
        child,
        _dir: dir,
    }
}

async fn caddy(authz: SocketAddr, upstream: SocketAddr) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let caddyfile = deployed(
        "deploy/caddy/Caddyfile",
        &[
            ("127.0.0.1:9003", authz.to_string()),
            ("127.0.0.1:3000", upstream.to_string()),
            ("127.0.0.1:8081", addr.to_string()),
        ],
    );
    let path = dir.path().join("Caddyfile");
    std::fs::write(&path, caddyfile).unwrap();
    let mut child = spawn_tied(
        Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    accepting(addr, &mut child).await;
    Gateway {
        addr,
        child,
        _dir: dir,
    }
}

/// A route table letting `/orders` through and nothing else, as a `--config` file.
fn routes() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    std::fs::write(
        &file,
        "unmatched-routes = \"deny\"\n[[route]]\npath-prefix = \"/orders\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap().to_owned();
    (dir, path)
}

/// What every gateway must do with phantom-authz behind it.
async fn through(gateway: &Gateway, upstream: &Upstream, idp: &Idp) {
    let client = http_client();
    let url = format!("http://{}/orders/7?page=2", gateway.addr);
    let get = async |token: Option<&str>| {
        let mut request = client.get(&url).header("x-user-id", "mallory");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.send().await.unwrap()
    };

    // A valid token: the upstream gets the JWT (for this token) and never the opaque token, and
    // the claim header from phantom-authz, not the client's.
    let response = get(Some("alice")).await;
    assert_eq!(response.status(), 200);
    let seen: HashMap<String, String> =
        serde_json::from_str(&response.text().await.unwrap()).unwrap();
    let authorization = &seen["authorization"];
    assert!(authorization.starts_with("Bearer eyJ"), "{seen:?}");
    assert!(
        !authorization.contains("alice"),
        "the opaque token reached the upstream"
    );
    assert_eq!(
        seen.get("x-user-id").map(String::as_str),
        Some("alice"),
        "{seen:?}"
    );
    // The check saw the original method and path.
    let asked = idp.calls();
    assert_eq!(asked, 1);

    // No claim in the token: the client's header still does not get through.
    let response = get(Some("nosub-1")).await;
    assert_eq!(response.status(), 200);
    let seen: HashMap<String, String> =
        serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_ne!(
        seen.get("x-user-id").map(String::as_str),
        Some("mallory"),
        "{seen:?}"
    );

    let hits = upstream.hits();
    // No token, an inactive token: 401 with phantom-authz's challenge; the upstream untouched.
    let response = get(None).await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        r#"Bearer realm="api""#
    );
    let response = get(Some("inactive-1")).await;
    assert_eq!(response.status(), 401);
    let challenges: Vec<_> = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .collect();
    assert_eq!(challenges.len(), 1, "{challenges:?}");
    assert_eq!(
        challenges[0],
        r#"Bearer realm="api", error="invalid_token""#
    );
    // The IdP down: an error status, never the upstream.
    let response = get(Some("unavailable-1")).await;
    assert_eq!(response.status(), 503);
    // A client claiming, in either convention, to ask for an open route gets nothing: the
    // route is judged by what the gateway says.
    let spoofed = client
        .get(format!("http://{}/admin", gateway.addr))
        .header("authorization", "Bearer alice")
        .header("x-forwarded-uri", "/orders/1")
        .header("x-forwarded-method", "GET")
        .header("x-original-uri", "/orders/1")
        .header("x-original-method", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), 403);
    assert_eq!(upstream.hits(), hits);
}

#[tokio::test]
async fn nginx_auth_request_with_the_shipped_config() {
    let idp = idp().await;
    let (_dir, routes) = routes();
    let app = app(
        &idp,
        &["--http-original-request", "x-original", "--config", &routes],
    )
    .await;
    let upstream = Upstream::start().await;
    let nginx = nginx(app.http.unwrap(), upstream.addr).await;
    through(&nginx, &upstream, &idp).await;
}

#[tokio::test]
async fn caddy_forward_auth_with_the_shipped_config() {
    let idp = idp().await;
    let (_dir, routes) = routes();
    let app = app(&idp, &["--config", &routes]).await;
    let upstream = Upstream::start().await;
    let caddy = caddy(app.http.unwrap(), upstream.addr).await;
    through(&caddy, &upstream, &idp).await;
}
