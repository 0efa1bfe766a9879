//! Faults and hostile input against the real binary: Redis hung, killed or absent; an identity
//! server that is slow, down, flapping, garbage-spewing or enormous; the circuit breaker and the
//! concurrency cap end to end; SIGTERM under load; and each class of bad input, which must be
//! refused without calling the identity server and without the token reaching the log.

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
/// machine), far below "hung" (the defaults would be 20 s).
const CHECK_BOUND: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Helpers

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

// ---------------------------------------------------------------------------------------------
// Redis faults

#[tokio::test]
async fn redis_hung_by_sigstop_checks_fall_back_within_bound_and_readyz_degrades() {
    let redis = Redis::start();
    let idp = vouching_idp().await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--local-cache-ttl", "0"],
    );
    let mut client = service.client().await;
    let (verdict, _) = timed_check(&mut client, bearer_request("cached-before")).await;
    assert_allowed_for(&verdict, "cached-before");
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(2), async || !redis_keys(&mut conn)
            .await
            .is_empty())
        .await
    );
    let (_, body) = readyz_redis(&service).await;
    assert!(body.contains(r#""status":"ready","redis":"up""#), "{body}");
    assert_eq!(service.metric("phantom_authz_redis_up", &[]).await, 1.0);

    let frozen = Frozen::freeze(redis.pid());
    // The cached token and new ones alike: Redis never answers, every Check falls back to
    // introspection and still answers, each well within the bound.
    let calls_before = idp.calls();
    let mut slowest = Duration::ZERO;
    for n in 0..8 {
        let token = if n % 2 == 0 {
            "cached-before".to_owned()
        } else {
            format!("while-hung-{n}")
        };
        let (verdict, took) = timed_check(&mut client, bearer_request(&token)).await;
        assert_allowed_for(&verdict, &token);
        slowest = slowest.max(took);
    }
    assert!(
        slowest < CHECK_BOUND,
        "a Check took {slowest:?} with Redis hung"
    );
    assert_eq!(idp.calls(), calls_before + 8, "Redis cannot have answered");
    let (status, body) = readyz_redis(&service).await;
    assert_eq!(
        status, 200,
        "a hung Redis must not make the service unready"
    );
    assert!(body.contains(r#""redis":"degraded""#), "{body}");
    assert_eq!(service.metric("phantom_authz_redis_up", &[]).await, 0.0);
    // Two timeouts in a row mark Redis down; later Checks skip it (until a probe) rather than
    // each paying the command timeout. Every lookup is still counted as an error.
    assert!(
        service
            .metric("phantom_authz_redis_errors_total", &[("op", "get")])
            .await
            >= 1.0
    );
    assert_eq!(
        service
            .metric(
                "phantom_authz_cache_lookups_total",
                &[("tier", "redis"), ("result", "error")]
            )
            .await,
        8.0
    );

    // Thawed, Redis is used again without a restart: a new token's entry is written.
    drop(frozen);
    assert!(
        eventually(Duration::from_secs(10), async || {
            let (verdict, _) = timed_check(&mut client, bearer_request("after-thaw")).await;
            assert_allowed_for(&verdict, "after-thaw");
            readyz_redis(&service).await.1.contains(r#""redis":"up""#)
        })
        .await,
        "Redis not used again after SIGCONT"
    );
    assert_eq!(service.metric("phantom_authz_redis_up", &[]).await, 1.0);
    assert!(
        eventually(Duration::from_secs(5), async || redis_keys(&mut conn)
            .await
            .len()
            >= 2)
        .await,
        "writes did not resume after SIGCONT"
    );
}

#[tokio::test]
async fn redis_sigkilled_under_load_answers_throughout_and_recovers_on_the_same_port() {
    let mut redis = Redis::start();
    let port = redis.port;
    let idp = vouching_idp().await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &redis.url(), "--local-cache-ttl", "0"],
    );
    let client = service.client().await;
    // Checks keep arriving from four clients while Redis is killed and brought back.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let (mut client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut slowest = Duration::ZERO;
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && n < 2_000 {
                    let token = format!("load-{worker}-{}", n % 5);
                    let (verdict, took) = timed_check(&mut client, bearer_request(&token)).await;
                    assert_allowed_for(&verdict, &token);
                    slowest = slowest.max(took);
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (n, slowest)
            })
        })
        .collect();
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(5), async || !redis_keys(&mut conn)
            .await
            .is_empty())
        .await
    );
    drop(conn);

    redis.kill(); // SIGKILL
    assert!(
        eventually(Duration::from_secs(5), async || {
            readyz_redis(&service)
                .await
                .1
                .contains(r#""redis":"degraded""#)
        })
        .await
    );
    assert_eq!(service.metric("phantom_authz_redis_up", &[]).await, 0.0);
    assert_eq!(readyz_redis(&service).await.0, 200);

    let redis = Redis::start_on(port);
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(10), async || !redis_keys(&mut conn)
            .await
            .is_empty())
        .await,
        "writes did not resume on the restarted Redis"
    );
    assert!(
        eventually(Duration::from_secs(5), async || {
            readyz_redis(&service).await.1.contains(r#""redis":"up""#)
        })
        .await
    );
    stop.store(true, Ordering::SeqCst);
    for worker in load {
        let (answered, slowest) = worker.await.expect("a Check under load failed");
        assert!(answered > 0);
        assert!(
            slowest < CHECK_BOUND,
            "a Check took {slowest:?} around a Redis kill"
        );
    }
}

#[tokio::test]
async fn redis_absent_at_start_is_used_once_it_appears() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let idp = vouching_idp().await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &["--redis-url", &url, "--local-cache-ttl", "0"],
    );
    let mut client = service.client().await;
    for _ in 0..2 {
        let (verdict, took) = timed_check(&mut client, bearer_request("before-redis")).await;
        assert_allowed_for(&verdict, "before-redis");
        assert!(took < CHECK_BOUND, "{took:?}");
    }
    assert_eq!(idp.calls(), 2, "nothing to cache in");
    let (status, body) = readyz_redis(&service).await;
    assert_eq!(
        (status, body.as_str()),
        (
            200,
            r#"{"status":"ready","redis":"degraded","evictions":"lost"}"#
        )
    );

    let redis = Redis::start_on(port);
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            let (verdict, _) = timed_check(&mut client, bearer_request("after-redis")).await;
            assert_allowed_for(&verdict, "after-redis");
            // The entry is in Redis, and the service has seen its write succeed (until then
            // it may still be skipping Redis between probes).
            !redis_keys(&mut conn).await.is_empty()
                && readyz_redis(&service).await.1.contains(r#""redis":"up""#)
        })
        .await,
        "the service never started using Redis"
    );
    // The entry is read back: with the in-process tier off, only Redis can spare the IdP.
    let calls = idp.calls();
    let (verdict, _) = timed_check(&mut client, bearer_request("after-redis")).await;
    assert_allowed_for(&verdict, "after-redis");
    assert_eq!(idp.calls(), calls, "served from Redis");
    let (_, body) = readyz_redis(&service).await;
    assert!(body.contains(r#""status":"ready","redis":"up""#), "{body}");
}

// ---------------------------------------------------------------------------------------------
// Envoy's deadline, and the bounds of the gRPC listener

/// Sends a Check the way Envoy does with its ext_authz `timeout`: a `grpc-timeout` deadline,
/// and the stream reset when it passes. Returns the verdict if one came in time.
async fn cut_check(
    client: &mut AuthorizationClient<Channel>,
    request: CheckRequest,
    deadline: Duration,
) -> Option<Verdict> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(deadline);
    match tokio::time::timeout(deadline, client.check(request)).await {
        Ok(Ok(response)) => Some(verdict(response.into_inner())),
        Ok(Err(_)) | Err(_) => None,
    }
}

#[tokio::test]
async fn checks_envoy_gives_up_on_leave_one_introspection_that_fills_both_tiers() {
    let redis = Redis::start();
    let idp = Idp::start(|seen| {
        Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0))
            .delay(Duration::from_millis(400))
    })
    .await;
    let a = Service::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]);
    let b = Service::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]);
    let mut client = a.client().await;
    for _ in 0..3 {
        if let Some(verdict) = cut_check(
            &mut client,
            bearer_request("slow-idp"),
            Duration::from_millis(200),
        )
        .await
        {
            assert_allowed_for(&verdict, "slow-idp");
        }
    }
    // The introspection the first Check started went on to its end and was counted…
    let active = [("result", "active")];
    assert!(
        eventually(Duration::from_secs(5), async || {
            a.metric("phantom_authz_introspections_total", &active)
                .await
                == 1.0
        })
        .await,
        "the introspection was not counted"
    );
    // …and cached: the next Check here is a local hit, and on the other replica a Redis hit.
    let (verdict, _) = timed_check(&mut client, bearer_request("slow-idp")).await;
    assert_allowed_for(&verdict, "slow-idp");
    let local_hits = [("tier", "local"), ("result", "hit")];
    assert!(
        a.metric("phantom_authz_cache_lookups_total", &local_hits)
            .await
            >= 1.0
    );
    let mut conn = redis.connection().await;
    assert!(
        eventually(Duration::from_secs(5), async || redis_keys(&mut conn)
            .await
            .len()
            == 1)
        .await,
        "the allow never reached Redis"
    );
    let (verdict, _) = timed_check(&mut b.client().await, bearer_request("slow-idp")).await;
    assert_allowed_for(&verdict, "slow-idp");
    assert_eq!(idp.calls(), 1, "every cut Check introspected again");
}

#[tokio::test]
async fn a_hung_idp_behind_cut_checks_counts_timeouts_and_opens_the_circuit() {
    let idp = Idp::start(|_| Reply::status(200).delay(Duration::from_secs(3600))).await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--introspection-timeout",
            "300ms",
            "--circuit-failure-threshold",
            "2",
            "--circuit-open-duration",
            "1h",
        ],
    );
    let mut client = service.client().await;
    for n in 0..2 {
        let cut = cut_check(
            &mut client,
            bearer_request(&format!("hung-{n}")),
            Duration::from_millis(200),
        )
        .await;
        assert!(cut.is_none(), "{cut:?}");
    }
    let timeouts = [("result", "timeout")];
    assert!(
        eventually(Duration::from_secs(5), async || {
            service
                .metric("phantom_authz_introspections_total", &timeouts)
                .await
                == 2.0
                && service.metric("phantom_authz_circuit_state", &[]).await == 1.0
        })
        .await,
        "the cut introspections never timed out into the breaker"
    );
    let (verdict, took) = timed_check(&mut client, bearer_request("hung-2")).await;
    assert_eq!(verdict.http_status, 503, "{verdict:?}");
    assert!(took < CHECK_BOUND, "{took:?}");
    assert_eq!(idp.calls(), 2, "an open circuit must not reach the IdP");
}

#[tokio::test]
async fn a_check_without_a_deadline_gets_503_at_the_check_timeout() {
    let idp = Idp::start(|_| Reply::status(200).delay(Duration::from_secs(3600))).await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &["--introspection-timeout", "1h", "--check-timeout", "300ms"],
    );
    let mut client = service.client().await;
    for _ in 0..2 {
        let (verdict, took) = timed_check(&mut client, bearer_request("no-deadline")).await;
        assert_eq!(verdict.http_status, 503, "{verdict:?}");
        assert!(took < CHECK_BOUND, "{took:?}");
    }
    // The second Check waited on the first one's introspection.
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn check_requests_over_the_size_bound_are_refused_by_the_transport() {
    let idp = vouching_idp().await;
    let service = Service::start(&idp.url(), "jwt", &[]);
    let mut client = service.client().await;
    let fits = "f".repeat(200 << 10);
    let (verdict, _) = timed_check(
        &mut client,
        check_request(&[("x-fits", &fits), ("authorization", "Bearer fits")]),
    )
    .await;
    assert_allowed_for(&verdict, "fits");
    // Past the 256 KiB default: an error status, which Envoy turns into a denial.
    let over = "o".repeat(300 << 10);
    let status = client
        .check(check_request(&[
            ("x-over", &over),
            ("authorization", "Bearer over"),
        ]))
        .await
        .expect_err("a 300 KiB CheckRequest was accepted");
    assert!(
        matches!(
            status.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{status}"
    );
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn one_connection_carries_at_most_the_configured_concurrent_checks() {
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let idp = Idp::start(move |request| {
        seen.lock().unwrap().push(Instant::now());
        Reply::jwt(&make_jwt(&request.token, Some(unix_now() + 3600), 0))
            .delay(Duration::from_millis(300))
    })
    .await;
    let service = Service::start(&idp.url(), "jwt", &["--grpc-max-concurrent-streams", "2"]);
    let client = service.client().await;
    // Settle the connection first: streams opened before the client has read the server's
    // SETTINGS are refused (REFUSED_STREAM, which Envoy retries) rather than queued.
    check(&mut client.clone(), check_request(&[])).await;
    let checks: Vec<_> = (0..3)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let token = format!("stream-{n}");
                let (verdict, _) = timed_check(&mut client, bearer_request(&token)).await;
                assert_allowed_for(&verdict, &token);
            })
        })
        .collect();
    for check in checks {
        check.await.unwrap();
    }
    // The third Check could only start once a stream was free, which takes the IdP's 300 ms
    // answer to one of the first two: a causal bound, not a timing guess.
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 3);
    let gap = arrivals[2] - arrivals[0];
    assert!(
        gap >= Duration::from_millis(300),
        "three Checks ran at once on one connection ({gap:?} apart)"
    );
}

// ---------------------------------------------------------------------------------------------
// Identity server faults

#[tokio::test]
async fn idp_silent_or_dripping_past_the_timeout_is_503_within_bound() {
    // One IdP accepts and never answers; the other sends headers, then a byte every 100 ms.
    let silent = RawIdp::start(|stream, _| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(stream);
    })
    .await;
    let drip = RawIdp::start(|mut stream, _| async move {
        let head =
            "HTTP/1.1 200 OK\r\ncontent-type: application/jwt\r\ncontent-length: 1000\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for _ in 0..300 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if stream.write_all(b"e").await.is_err() {
                return;
            }
        }
    })
    .await;
    for url in [silent.url(), drip.url()] {
        let service = Service::start(
            &url,
            "jwt",
            &[
                "--introspection-timeout",
                "500ms",
                "--circuit-failure-threshold",
                "0",
            ],
        );
        let client = service.client().await;
        let checks: Vec<_> = (0..4)
            .map(|n| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    timed_check(&mut client, bearer_request(&format!("slow-{n}"))).await
                })
            })
            .collect();
        for task in checks {
            let (verdict, took) = task.await.unwrap();
            assert_eq!(verdict.http_status, 503, "{url}: {verdict:?}");
            // Not before the 500 ms timeout (a causal bound), and not hung.
            assert!(
                took >= Duration::from_millis(450) && took < CHECK_BOUND,
                "{url}: answered after {took:?}, not at the 500 ms timeout"
            );
        }
        assert_eq!(
            service
                .metric(
                    "phantom_authz_introspections_total",
                    &[("result", "timeout")]
                )
                .await,
            4.0
        );
    }
    assert_eq!(silent.calls(), 4);
    assert_eq!(drip.calls(), 4);
}

#[tokio::test]
async fn idp_going_down_mid_life_is_503_and_cached_allows_survive() {
    let idp = RawIdp::start(|stream, token| async move { write_jwt(stream, &token).await }).await;
    let service = Service::start(&idp.url(), "jwt", &["--introspection-timeout", "500ms"]);
    let mut client = service.client().await;
    let (verdict, _) = timed_check(&mut client, bearer_request("up-1")).await;
    assert_allowed_for(&verdict, "up-1");
    idp.stop().await;
    for n in 0..3 {
        let (verdict, took) = timed_check(&mut client, bearer_request(&format!("down-{n}"))).await;
        assert_eq!(verdict.http_status, 503, "{verdict:?}");
        assert!(took < CHECK_BOUND, "connection refused took {took:?}");
    }
    // Cached allows survive the IdP being down.
    let (verdict, _) = timed_check(&mut client, bearer_request("up-1")).await;
    assert_allowed_for(&verdict, "up-1");
    assert_eq!(
        service
            .metric(
                "phantom_authz_introspections_total",
                &[("result", "unreachable")]
            )
            .await,
        3.0
    );
}

/// A TCP listener that counts connections and drops each one: a proxy nobody should use.
async fn counting_listener() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (addr, connections)
}

/// The service against `introspection_url` with `extra` flags and `env` variables.
fn service_with_env(introspection_url: &str, extra: &[&str], env: &[(&str, &str)]) -> Service {
    let mut args = vec![
        "--grpc-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--introspection-url",
        introspection_url,
        "--client-id",
        CLIENT_ID,
    ];
    args.extend_from_slice(extra);
    let mut env = env.to_vec();
    env.push(("PHANTOM_AUTHZ_CLIENT_SECRET", CLIENT_SECRET));
    Service::spawn(&args, &env)
}

#[tokio::test]
async fn proxy_variables_in_the_environment_are_ignored() {
    let idp = vouching_idp().await;
    let (proxy, connections) = counting_listener().await;
    let proxy = format!("http://{proxy}");
    let mut env: Vec<(&str, &str)> = [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ]
    .map(|name| (name, proxy.as_str()))
    .to_vec();
    // An exemption inherited from the test's own environment would hide the fault.
    env.extend([("NO_PROXY", ""), ("no_proxy", "")]);
    let service = service_with_env(&idp.url(), &[], &env);
    let mut client = service.client().await;
    for token in ["direct-1", "direct-2"] {
        let (verdict, _) = timed_check(&mut client, bearer_request(token)).await;
        assert_allowed_for(&verdict, token);
    }
    assert_eq!(idp.calls(), 2);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "the client secret and tokens went to a proxy from the environment"
    );
}

#[tokio::test]
async fn idp_proxy_carries_every_introspection() {
    // The scripted IdP stands in for the proxy: it answers the absolute-form request
    // (`POST http://idp.invalid/… HTTP/1.1`) itself. `.invalid` never resolves, so an answer
    // proves the call went through the proxy.
    let idp = vouching_idp().await;
    let proxy = format!("http://proxy-user:Pr0xy-Pa55@{}", idp.addr);
    let service = service_with_env(
        "http://idp.invalid/oauth/v2/oauth-introspect",
        &["--idp-proxy", &proxy],
        &[],
    );
    let mut client = service.client().await;
    let (verdict, _) = timed_check(&mut client, bearer_request("proxied")).await;
    assert_allowed_for(&verdict, "proxied");
    assert_eq!(idp.calls(), 1);
    assert_eq!(idp.seen()[0].token, "proxied");
    assert!(!service.log().contains("Pr0xy-Pa55"), "{}", service.log());
}

#[tokio::test]
async fn flapping_idp_never_yields_an_allow_on_a_failure() {
    // Every other call fails, in turn with 500, 503, a garbage 200 and a connection-level 502.
    let outcomes = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
    let record = outcomes.clone();
    let idp = Idp::start(move |seen| {
        let mut outcomes = record.lock().unwrap();
        let n = outcomes.len();
        let ok = n.is_multiple_of(2);
        outcomes.push((seen.token.clone(), ok));
        if ok {
            return Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0));
        }
        match (n / 2) % 4 {
            0 => Reply::status(500),
            1 => Reply::status(503),
            2 => Reply::jwt("<html>maintenance</html>"),
            _ => Reply::status(502),
        }
    })
    .await;
    let service = Service::start(&idp.url(), "jwt", &["--introspection-timeout", "500ms"]);
    let mut client = service.client().await;
    let (mut allows, mut denials) = (0, 0);
    for n in 0..24 {
        // Each token is asked twice in a row: a failure must not stick, a success is cached.
        let token = format!("flap-{}", n / 2);
        let calls_before = idp.calls();
        let (verdict, took) = timed_check(&mut client, bearer_request(&token)).await;
        assert!(took < CHECK_BOUND);
        if idp.calls() == calls_before {
            // Served from the cache: only a previous success can be there.
            let seen = outcomes.lock().unwrap().clone();
            assert!(
                seen.iter().any(|(t, ok)| t == &token && *ok),
                "{token} allowed from cache without a success"
            );
            assert_allowed_for(&verdict, &token);
            continue;
        }
        let (seen_token, ok) = outcomes.lock().unwrap().last().cloned().unwrap();
        assert_eq!(seen_token, token);
        if ok {
            assert_allowed_for(&verdict, &token);
            allows += 1;
        } else {
            assert_ne!(verdict.http_status, 200, "allow on a failure: {verdict:?}");
            assert!([502, 503].contains(&verdict.http_status), "{verdict:?}");
            denials += 1;
        }
    }
    assert!(
        allows >= 6 && denials >= 6,
        "{allows} allows, {denials} denials"
    );
    // Failures interleaved with successes never open the circuit.
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        0.0
    );
}

/// IdP bodies that must each end in 502 (never an allow), in both modes.
fn garbage_bodies(mode: &str) -> Vec<Vec<u8>> {
    let jwt = make_jwt("x", Some(unix_now() + 3600), 0);
    let [header, payload, signature]: [&str; 3] =
        jwt.split('.').collect::<Vec<_>>().try_into().unwrap();
    let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
    // JWT shape checks: each of these is not a compact JWS with a JSON object payload.
    let bad_jwts: Vec<String> = vec![
        String::new(),
        "a.b".into(),
        format!("{jwt}.{signature}"),
        format!("{header}..{signature}"),
        format!("{header}.{payload}."),
        format!(".{payload}.{signature}"),
        format!("{header}=.{payload}.{signature}"),
        format!("{header}.{payload}==.{signature}"),
        format!("{header}.{payload}.{signature}\r\nx-injected: 1"),
        format!("{header}.{payload} .{signature}"),
        format!("{header}.{}.{signature}", b64("[1,2]")),
        format!("{header}.{}.{signature}", b64("not json")),
        format!("{header}.{}.{signature}", b64(r#"{"exp":"tomorrow"}"#)),
        format!("{header}.{}.{signature}", b64(r#"{"exp":-5}"#)),
        format!("{header}.{}.{signature}", b64(&"[".repeat(20_000))),
        format!("{header}.{}.{signature}", "A".repeat(5)),
    ];
    let mut bodies: Vec<Vec<u8>> = vec![
        b"\xff\xfe\x00binary".to_vec(),
        b"<html><body>Service Unavailable</body></html>".to_vec(),
    ];
    match mode {
        "jwt" => bodies.extend(bad_jwts.into_iter().map(String::into_bytes)),
        _ => {
            bodies.extend(bad_jwts.into_iter().map(|bad| {
                serde_json::json!({"active": true, "jwt": bad})
                    .to_string()
                    .into_bytes()
            }));
            for raw in [
                "",
                "null",
                "true",
                r#"{"active":1}"#,
                r#"{"active":null,"jwt":"a.b.c"}"#,
                r#"{"active":true,"jwt":null}"#,
                r#"{"active":true,"jwt":["a","b","c"]}"#,
                r#"{"active":true,"active":"yes"}"#,
            ] {
                bodies.push(raw.as_bytes().to_vec());
            }
            bodies.push(format!(r#"{{"active":true,"jwt":"{jwt}","exp":"never"}}"#).into_bytes());
            bodies.push(format!("{}{}", "[".repeat(50_000), "]".repeat(10)).into_bytes());
            bodies.push(format!(r#"{{"active":true,"jwt":"{jwt}"}} trailing"#).into_bytes());
        }
    }
    bodies
}

async fn garbage_is_502(mode: &'static str) {
    let bodies = Arc::new(garbage_bodies(mode));
    let script = bodies.clone();
    let idp = Idp::start(move |seen| {
        let n: usize = seen.token.trim_start_matches("garbage-").parse().unwrap();
        Reply::status(200)
            .header("content-type", "application/octet-stream")
            .body(&script[n])
    })
    .await;
    let service = Service::start(&idp.url(), mode, &["--circuit-failure-threshold", "0"]);
    let mut client = service.client().await;
    for (n, body) in bodies.iter().enumerate() {
        let (verdict, took) =
            timed_check(&mut client, bearer_request(&format!("garbage-{n}"))).await;
        assert_eq!(
            verdict.http_status,
            502,
            "{mode} body {:?} gave {verdict:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        assert!(took < CHECK_BOUND, "{took:?}");
    }
    assert_eq!(idp.calls(), bodies.len());
    let mut service = service;
    assert_alive(&mut service);
}

#[tokio::test]
async fn jwt_mode_garbage_and_misshapen_jwts_are_502() {
    garbage_is_502("jwt").await;
}

#[tokio::test]
async fn json_mode_garbage_and_misshapen_jwts_are_502() {
    garbage_is_502("json").await;
}

#[tokio::test]
async fn enormous_idp_bodies_are_502_quickly_without_blowing_memory() {
    const TEN_MIB: usize = 10 << 20;
    // A 10 MiB body announced by Content-Length, and one streamed chunked with no length.
    let body = Arc::new(vec![b'e'; TEN_MIB]);
    let announced = Idp::start(move |_| Reply::jwt("").body(&body)).await;
    let chunked = RawIdp::start(|mut stream, _| async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/jwt\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = format!("10000\r\n{}\r\n", "e".repeat(0x10000));
        for _ in 0..TEN_MIB / 0x10000 {
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = stream.write_all(b"0\r\n\r\n").await;
    })
    .await;
    for url in [announced.url(), chunked.url()] {
        let mut service = Service::start(&url, "jwt", &["--circuit-failure-threshold", "0"]);
        let baseline = peak_rss(service.pid());
        let client = service.client().await;
        let checks: Vec<_> = (0..8)
            .map(|n| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    timed_check(&mut client, bearer_request(&format!("huge-{n}"))).await
                })
            })
            .collect();
        for task in checks {
            let (verdict, took) = task.await.unwrap();
            assert_eq!(verdict.http_status, 502, "{url}: {verdict:?}");
            assert!(took < CHECK_BOUND, "{url}: {took:?}");
        }
        // Eight 10 MiB bodies read whole would add 80 MiB; capped reads add a few.
        let grown = peak_rss(service.pid()).saturating_sub(baseline);
        assert!(
            grown < 32 << 20,
            "{url}: peak memory grew by {} MiB",
            grown >> 20
        );
        assert_alive(&mut service);
    }
    assert_eq!(chunked.calls(), 8);
}

// ---------------------------------------------------------------------------------------------
// The guard: circuit breaker and concurrency cap

#[tokio::test]
async fn circuit_opens_after_three_failures_fails_fast_then_one_probe_closes_it() {
    let failing = Arc::new(AtomicBool::new(true));
    let state = failing.clone();
    let idp = Idp::start(move |seen| {
        if state.load(Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0))
        }
    })
    .await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--circuit-failure-threshold",
            "3",
            "--circuit-open-duration",
            "1s",
        ],
    );
    let mut client = service.client().await;
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        0.0
    );
    for n in 0..3 {
        let (verdict, _) = timed_check(&mut client, bearer_request(&format!("t{n}"))).await;
        assert_eq!(verdict.http_status, 502, "the IdP's 500: {verdict:?}");
    }
    let opened = Instant::now();
    assert_eq!(idp.calls(), 3);
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        1.0
    );
    for n in 3..8 {
        let (verdict, took) = timed_check(&mut client, bearer_request(&format!("t{n}"))).await;
        assert_eq!(verdict.http_status, 503, "{verdict:?}");
        // Failing fast means not reaching the IdP (asserted below); the bound only catches a
        // Check that hangs.
        assert!(took < CHECK_BOUND, "failing fast took {took:?}");
    }
    assert_eq!(idp.calls(), 3, "an open circuit must not reach the IdP");
    assert_eq!(
        service
            .metric(
                "phantom_authz_introspection_rejected_total",
                &[("reason", "circuit_open")]
            )
            .await,
        5.0
    );

    // The IdP recovers; Checks keep failing fast until the open period ends, then one probe
    // goes through and closes the circuit.
    failing.store(false, Ordering::SeqCst);
    let mut allowed_at = None;
    assert!(
        eventually(Duration::from_secs(5), async || {
            let (verdict, _) = timed_check(&mut client, bearer_request("probe")).await;
            if verdict.http_status == 200 {
                allowed_at = Some(opened.elapsed());
                return true;
            }
            assert_eq!(verdict.http_status, 503, "{verdict:?}");
            false
        })
        .await,
        "the circuit never closed"
    );
    let allowed_at = allowed_at.unwrap();
    assert!(
        allowed_at >= Duration::from_millis(900),
        "allowed {allowed_at:?} after opening: the open period was not honoured"
    );
    assert_eq!(idp.calls(), 4, "exactly one probe reached the IdP");
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        0.0
    );
    let (verdict, _) = timed_check(&mut client, bearer_request("after")).await;
    assert_allowed_for(&verdict, "after");
    assert_eq!(idp.calls(), 5);
}

#[tokio::test]
async fn an_absurd_circuit_open_duration_keeps_the_circuit_open_without_crashing() {
    let idp = Idp::start(|_| Reply::status(500)).await;
    let mut service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--circuit-failure-threshold",
            "1",
            "--circuit-open-duration",
            "18446744073709551615s",
        ],
    );
    let mut client = service.client().await;
    let (verdict, _) = timed_check(&mut client, bearer_request("first")).await;
    assert_eq!(verdict.http_status, 502, "the IdP's 500: {verdict:?}");
    let (verdict, _) = timed_check(&mut client, bearer_request("second")).await;
    assert_eq!(verdict.http_status, 503, "the circuit is open: {verdict:?}");
    assert_eq!(idp.calls(), 1);
    assert_alive(&mut service);
    assert!(!service.log().contains("panicked"), "{}", service.log());
}

#[tokio::test]
async fn concurrency_cap_lets_two_reach_the_idp_and_fails_the_rest_fast() {
    let idp = Idp::start(|seen| {
        Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0))
            .delay(Duration::from_millis(1_500))
    })
    .await;
    let service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--max-concurrent-introspections",
            "2",
            "--check-timeout",
            "5s",
        ],
    );
    let client = service.client().await;
    // Warm the HTTP/2 connection so timings measure the service, not the handshake.
    let mut warm = client.clone();
    check(&mut warm, check_request(&[])).await;
    let checks: Vec<_> = (0..10)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let token = format!("capped-{n}");
                let (verdict, _) = timed_check(&mut client, bearer_request(&token)).await;
                (token, verdict, Instant::now())
            })
        })
        .collect();
    let (mut allowed, mut refused) = (Vec::new(), Vec::new());
    for task in checks {
        let (token, verdict, finished) = task.await.unwrap();
        if verdict.http_status == 200 {
            assert_allowed_for(&verdict, &token);
            allowed.push(finished);
        } else {
            assert_eq!(verdict.http_status, 503, "{verdict:?}");
            refused.push(finished);
        }
    }
    assert_eq!(allowed.len(), 2);
    // Failing fast: every capped Check was answered before the IdP answered either of the two
    // it was working on.
    assert!(
        refused.iter().max() < allowed.iter().min(),
        "a capped Check waited for the IdP instead of failing fast"
    );
    assert_eq!(idp.calls(), 2, "at most two introspections at once");
    assert_eq!(
        service
            .metric(
                "phantom_authz_introspection_rejected_total",
                &[("reason", "overloaded")]
            )
            .await,
        8.0
    );
    // Being overloaded is not the IdP failing: the circuit stays closed.
    assert_eq!(
        service.metric("phantom_authz_circuit_state", &[]).await,
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// SIGTERM

#[tokio::test]
async fn sigterm_under_mixed_load_completes_every_check_correctly_and_exits_zero() {
    let redis = Redis::start();
    let idp = Idp::start(|seen| {
        let reply = match seen.token.split('-').next().unwrap() {
            "active" => Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0)),
            "inactive" => Reply::status(204),
            _ => Reply::status(503),
        };
        reply.delay(Duration::from_millis(700))
    })
    .await;
    let mut service = Service::start(&idp.url(), "jwt", &["--redis-url", &redis.url()]);
    let client = service.client().await;
    let kinds = ["active", "inactive", "down"];
    let in_flight: Vec<_> = (0..60)
        .map(|n| {
            let mut client = client.clone();
            let token = format!("{}-{n}", kinds[n % 3]);
            tokio::spawn(async move {
                let verdict = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.check(bearer_request(&token)),
                )
                .await
                .expect("unanswered");
                (token, verdict)
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), async || idp.calls() == 60).await);
    service.signal("TERM");
    for task in in_flight {
        let (token, result) = task.await.unwrap();
        let verdict = verdict(
            result
                .unwrap_or_else(|e| panic!("{token} was cut: {e}"))
                .into_inner(),
        );
        match token.split('-').next().unwrap() {
            "active" => assert_allowed_for(&verdict, &token),
            "inactive" => assert_eq!(verdict.http_status, 401, "{token}: {verdict:?}"),
            _ => assert_eq!(verdict.http_status, 503, "{token}: {verdict:?}"),
        }
    }
    let exit = service
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit after draining");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

#[tokio::test]
async fn sigterm_with_checks_outlasting_the_grace_exits_within_the_grace() {
    let idp = Idp::start(|seen| {
        Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 0))
            .delay(Duration::from_secs(20))
    })
    .await;
    let mut service = Service::start(
        &idp.url(),
        "jwt",
        &[
            "--shutdown-grace",
            "300ms",
            "--introspection-timeout",
            "30s",
            "--check-timeout",
            "30s",
        ],
    );
    let client = service.client().await;
    let in_flight: Vec<_> = (0..5)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    client.check(bearer_request(&format!("stuck-{n}"))),
                )
                .await
                .expect("a stuck Check outlived the process")
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(5), async || idp.calls() == 5).await);
    let signalled = Instant::now();
    service.signal("TERM");
    let exit = service
        .wait_exit(Duration::from_secs(5))
        .expect("did not exit after the grace period");
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    for task in in_flight {
        // Cut short: the client sees an error (Envoy then denies), never an allow.
        if let Ok(response) = task.await.unwrap() {
            assert_ne!(verdict(response.into_inner()).http_status, 200);
        }
    }
    assert!(service.log().contains("grace period"), "{}", service.log());
}

// ---------------------------------------------------------------------------------------------
// Bad input: never reaches the IdP, never reaches the log

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
