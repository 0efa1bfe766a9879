//! Real parts for black-box tests: the phantom-authz binary, a `redis-server` on a free port,
//! and a scripted identity server on port 0 that answers like Curity.

// Each test binary compiles this module and uses only some of it, and its items are reachable
// only from that binary.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use envoy_types::pb::envoy::config::core::v3::{HeaderMap as EnvoyHeaderMap, HeaderValue};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use phantom_authz::admin::proto::admin_client::AdminClient;
use phantom_authz::admin::proto::{EvictTokenRequest, EvictTokenResponse};
use phantom_authz::cache::evictions::EVICTION_CHANNEL;
use tonic::transport::Channel;

pub const CLIENT_ID: &str = "gateway-client";
pub const CLIENT_SECRET: &str = "Sup3r-Secret+Value/=";

/// The cache secret the tests' replicas share unless a test gives its own.
pub const CACHE_SECRET: &str = "test-cache-secret-shared-by-replicas-0123456789";

/// A `--cache-secret-file` holding `secrets`, one per line; deleted with the returned value.
pub fn cache_secret_file(secrets: &[&str]) -> tempfile::TempPath {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), secrets.join("\n")).unwrap();
    file.into_temp_path()
}

/// The file of [`CACHE_SECRET`], written once per test binary.
fn shared_cache_secret_file() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<tempfile::TempPath> = std::sync::OnceLock::new();
    FILE.get_or_init(|| cache_secret_file(&[CACHE_SECRET]))
}

// ---------------------------------------------------------------------------------------------
// The scripted identity server

/// What the IdP saw in one introspection request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub token: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub body: String,
}

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Reply {
            status,
            headers: vec![],
            body: vec![],
            delay: Duration::ZERO,
        }
    }

    pub fn jwt(jwt: &str) -> Self {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/jwt".into())],
            body: jwt.as_bytes().to_vec(),
            delay: Duration::ZERO,
        }
    }

    pub fn json(value: serde_json::Value) -> Self {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: value.to_string().into_bytes(),
            delay: Duration::ZERO,
        }
    }

    pub fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A scripted identity server listening on 127.0.0.1:0.
pub struct Idp {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Idp {
    pub async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Idp {
        let script: Arc<Script> = Arc::new(script);
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (calls.clone(), seen.clone());
        let app = Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let (script, calls, seen) = (script.clone(), c.clone(), s.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let body = String::from_utf8_lossy(&body).into_owned();
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let request = Seen {
                    token: form_value(&body, "token").unwrap_or_default(),
                    authorization: header("authorization"),
                    content_type: header("content-type"),
                    accept: header("accept"),
                    body,
                };
                let reply = script(&request);
                seen.lock().unwrap().push(request);
                tokio::time::sleep(reply.delay).await;
                let mut response: Response = (
                    StatusCode::from_u16(reply.status).unwrap(),
                    reply.body.clone(),
                )
                    .into_response();
                for (name, value) in &reply.headers {
                    response.headers_mut().append(
                        axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                        value.parse().unwrap(),
                    );
                }
                response
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Idp {
            addr,
            calls,
            seen,
            _task: task,
        }
    }

    /// The URL to pass as `--introspection-url`.
    pub fn url(&self) -> String {
        format!("http://{}/oauth/v2/oauth-introspect", self.addr)
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Decodes one field of an x-www-form-urlencoded body.
fn form_value(body: &str, name: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// A compact JWS-shaped JWT (unsigned signature bytes; phantom-authz does not verify, the API
/// does) with the given `exp` and subject, padded to about `size` bytes when asked.
pub fn make_jwt(sub: &str, exp: Option<u64>, size: usize) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let mut claims = serde_json::json!({ "sub": sub, "iss": "https://idp.test" });
    if let Some(exp) = exp {
        claims["exp"] = exp.into();
    }
    let base = format!(
        "{header}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    if base.len() < size {
        claims["pad"] = "x".repeat((size - base.len()) * 3 / 4).into();
    }
    format!(
        "{header}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// redis-server

/// A real `redis-server` on a free loopback port, killed on drop.
pub struct Redis {
    pub port: u16,
    child: Child,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        let mut command = Command::new("redis-server");
        command
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied(&mut command);
        let redis = Redis { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `command` so that it dies with the test process, even if the test is killed.
pub fn spawn_tied(command: &mut Command) -> Child {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe and touches only the child being started.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", command.get_program()))
}

/// Kills a child that never made it into its owner (a failed start-up).
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// The service

/// The phantom-authz binary, started with loopback listeners on port 0; killed on drop.
pub struct Service {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Service {
    /// Starts the service in `mode` against `idp_url`, with extra flags.
    pub fn start(idp_url: &str, mode: &str, extra: &[&str]) -> Service {
        let mut args = vec![
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--introspection-url",
            idp_url,
            "--introspection-mode",
            mode,
            "--client-id",
            CLIENT_ID,
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args, &[("PHANTOM_AUTHZ_CLIENT_SECRET", CLIENT_SECRET)])
    }

    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut command = Command::new(env!("CARGO_BIN_EXE_phantom-authz"));
        command
            .args(args)
            .env_remove("RUST_LOG")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        // Replicas sharing Redis share a cache secret, as in production; a test that gives
        // --cache-secret-file itself overrides it.
        if args.contains(&"--redis-url") {
            command.env(
                "PHANTOM_AUTHZ_CACHE_SECRET_FILE",
                shared_cache_secret_file(),
            );
        }
        let mut child = ChildGuard(Some(spawn_tied(&mut command)));
        let stderr = child.0.as_mut().unwrap().stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("phantom-authz listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("service did not start; log:\n{}", log.lock().unwrap()));
        let grpc = field(&line, "grpc=").parse().unwrap();
        let admin = field(&line, "admin=").parse().unwrap();
        Service {
            grpc,
            admin,
            child: child.0.take().unwrap(),
            log,
        }
    }

    pub async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    /// Everything the service logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://{}{path}", self.admin)).await
    }

    /// The value of one metric sample line from `/metrics` (summing matching lines).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (_, body) = self.admin_get("/metrics").await;
        body.lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| {
                let series = line.split_whitespace().next().unwrap_or_default();
                let metric = series.split('{').next().unwrap_or_default();
                metric == name
                    && labels
                        .iter()
                        .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field<'a>(line: &'a str, prefix: &str) -> &'a str {
    let start = line.find(prefix).unwrap() + prefix.len();
    line[start..].split_whitespace().next().unwrap()
}

pub async fn http_get(url: &str) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

// ---------------------------------------------------------------------------------------------
// Check requests and responses

/// A CheckRequest with headers in `attributes.request.http.headers`, as Envoy sends by default.
pub fn check_request(headers: &[(&str, &str)]) -> CheckRequest {
    let http = HttpRequest {
        method: "GET".into(),
        path: "/api/orders".into(),
        host: "api.example".into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        ..Default::default()
    };
    wrap(http)
}

/// A CheckRequest with `encode_raw_headers: true`: headers as raw bytes in `header_map`.
pub fn raw_check_request(headers: &[(&str, &[u8])]) -> CheckRequest {
    let http = HttpRequest {
        method: "GET".into(),
        path: "/api/orders".into(),
        header_map: Some(EnvoyHeaderMap {
            headers: headers
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.to_vec(),
                    ..Default::default()
                })
                .collect(),
        }),
        ..Default::default()
    };
    wrap(http)
}

fn wrap(http: HttpRequest) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(http),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

pub fn bearer_request(token: &str) -> CheckRequest {
    check_request(&[
        ("authorization", &format!("Bearer {token}")),
        ("x-request-id", "req-1"),
        ("accept", "application/json"),
    ])
}

/// What Envoy would do with a CheckResponse, flattened for assertions.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub grpc_code: i32,
    pub http_status: u16,
    /// Headers set on the upstream request (allow) or on the response to the client (deny).
    pub headers: Vec<(String, String, i32)>,
}

impl Verdict {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v, _)| v.as_str())
    }
}

pub fn verdict(response: CheckResponse) -> Verdict {
    let grpc_code = response.status.map_or(0, |s| s.code);
    let flatten = |headers: Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>| {
        headers
            .into_iter()
            .map(|h| {
                let header = h.header.unwrap();
                (header.key, header.value, h.append_action)
            })
            .collect()
    };
    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) => Verdict {
            grpc_code,
            http_status: 200,
            headers: flatten(ok.headers),
        },
        Some(HttpResponse::DeniedResponse(denied)) => Verdict {
            grpc_code,
            http_status: denied.status.map_or(0, |s| s.code as u16),
            headers: flatten(denied.headers),
        },
        other => panic!("unexpected http_response {other:?}"),
    }
}

/// Sends one Check and flattens the answer.
pub async fn check(client: &mut AuthorizationClient<Channel>, request: CheckRequest) -> Verdict {
    verdict(client.check(request).await.expect("Check RPC").into_inner())
}

/// Polls `condition` until true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The admin gRPC API

impl Service {
    /// The admin gRPC address, when started with `--admin-grpc-listen`.
    pub fn admin_grpc(&self) -> Option<SocketAddr> {
        let log = self.log();
        let line = log.lines().find(|l| l.contains("admin gRPC listening"))?;
        field(line, "admin_grpc=").parse().ok()
    }

    /// The TCP ports this process listens on, read from Linux's /proc.
    pub fn listening_ports(&self) -> std::collections::BTreeSet<u16> {
        let inodes: std::collections::HashSet<String> =
            std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .unwrap()
                .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect();
        let mut ports = std::collections::BTreeSet::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local_address is field 1, state 3 (0A = LISTEN), inode 9.
                if fields.len() > 9 && fields[3] == "0A" && inodes.contains(fields[9]) {
                    let port = fields[1].rsplit(':').next().unwrap();
                    ports.insert(u16::from_str_radix(port, 16).unwrap());
                }
            }
        }
        ports
    }
}

/// Calls `EvictToken` on `addr`, presenting `authorization` as given.
pub async fn evict(
    addr: SocketAddr,
    authorization: Option<&str>,
    token: &str,
) -> Result<EvictTokenResponse, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(EvictTokenRequest {
        token: token.to_owned(),
    });
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    AdminClient::new(channel)
        .evict_token(request)
        .await
        .map(tonic::Response::into_inner)
}

/// How many connections are subscribed to the eviction channel.
pub async fn eviction_subscribers(redis: &Redis) -> u64 {
    let mut conn = redis.connection().await;
    let (_, count): (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(EVICTION_CHANNEL)
        .query_async(&mut conn)
        .await
        .unwrap();
    count
}
