//! Faults and hostile input against the real binary: Redis hung, killed or absent; an identity
//! server that is slow, down, flapping, garbage-spewing or enormous; the circuit breaker and the
//! concurrency cap end to end; SIGTERM under load; and each class of bad input, which must be
//! refused without calling the identity server and without the token reaching the log.

mod deadline;
mod guard;
mod idp;
mod input;
mod redis_outages;
mod shutdown;

use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use redis::AsyncCommands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

/// Longest any single Check may take in these tests, whatever the fault: far above the 50 ms
/// Redis timeout and the 500 ms introspection timeout used here (with room for a loaded CI
/// machine), far below "hung".
const CHECK_BOUND: Duration = Duration::from_secs(2);

/// An IdP that vouches for every token with a JWT whose `sub` is the token.
async fn vouching_idp() -> Idp {
    Idp::start(|seen| Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0))).await
}

/// Sends one Check, bounded so that a hung service fails the test instead of hanging it.
async fn timed_check(
    client: &mut AuthorizationClient<Channel>,
    request: CheckRequest,
) -> (Verdict, Duration) {
    let started = Instant::now();
    let verdict = tokio::time::timeout(Duration::from_secs(10), check(client, request))
        .await
        .expect("a Check went unanswered for 10 s");
    (verdict, started.elapsed())
}

/// The `sub` claim of the JWT an allow forwards: proves the allow is for the right token.
fn forwarded_sub(verdict: &Verdict) -> String {
    let value = verdict
        .header("authorization")
        .unwrap_or_else(|| panic!("not an allow: {verdict:?}"));
    let jwt = value.strip_prefix("Bearer ").expect("Bearer <JWT>");
    let payload = URL_SAFE_NO_PAD
        .decode(jwt.split('.').nth(1).expect("three parts"))
        .expect("base64url payload");
    let claims: serde_json::Value = serde_json::from_slice(&payload).expect("JSON claims");
    claims["sub"].as_str().expect("sub").to_owned()
}

/// Asserts an allow carrying the JWT minted for `token`.
fn assert_allowed_for(verdict: &Verdict, token: &str) {
    assert_eq!(verdict.http_status, 200, "{token}: {verdict:?}");
    assert_eq!(forwarded_sub(verdict), token, "{verdict:?}");
}

fn signal_pid(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// SIGSTOPs a process for as long as it lives; SIGCONTs it when dropped, even on panic.
struct Frozen(u32);

impl Frozen {
    fn freeze(pid: u32) -> Frozen {
        signal_pid(pid, "STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal_pid(self.0, "CONT");
    }
}

async fn readyz_redis(service: &Service) -> (u16, String) {
    let (status, body) = service.admin_get("/readyz").await;
    (status, body.trim().to_owned())
}

async fn redis_keys(conn: &mut redis::aio::MultiplexedConnection) -> Vec<String> {
    conn.keys("*").await.unwrap()
}

fn assert_alive(service: &mut Service) {
    assert!(
        service.wait_exit(Duration::ZERO).is_none(),
        "the service died; log:\n{}",
        service.log()
    );
}

/// A bare TCP identity server, for faults an HTTP framework cannot script: bodies that drip,
/// bodies without a length, connections dropped on arrival. Every connection is handed to
/// `serve` with the token read from the request.
struct RawIdp {
    addr: std::net::SocketAddr,
    calls: Arc<AtomicUsize>,
    accept: tokio::task::JoinHandle<()>,
}

impl RawIdp {
    async fn start<F, Fut>(serve: F) -> RawIdp
    where
        F: Fn(TcpStream, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let serve = Arc::new(serve);
        let accept = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (serve, counter) = (serve.clone(), counter.clone());
                tokio::spawn(async move {
                    let Some(token) = read_request(&mut stream).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    serve(stream, token).await;
                });
            }
        });
        RawIdp {
            addr,
            calls,
            accept,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/oauth/v2/oauth-introspect", self.addr)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Stops listening: new connections are refused from now on.
    async fn stop(&self) {
        self.accept.abort();
        while std::net::TcpStream::connect(self.addr).is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Reads one HTTP/1.1 request with a Content-Length body; returns its `token` form value.
async fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buffer);
        let Some(head_end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length = text[..head_end]
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let body = &text[head_end + 4..];
        if body.len() >= length {
            let token = body
                .split('&')
                .find_map(|pair| pair.strip_prefix("token="))
                .unwrap_or_default();
            return Some(token.to_owned());
        }
    }
}

async fn write_jwt(mut stream: TcpStream, token: &str) {
    let jwt = make_jwt(token, Some(unix_now() + 3600), 0);
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/jwt\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{jwt}",
        jwt.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}
