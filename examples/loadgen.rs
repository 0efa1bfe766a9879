//! An HTTP/2 gRPC load generator for ext_authz servers: realistic `CheckRequest`s over a few
//! multiplexed connections, closed-loop at saturation or at a fixed request rate.
//!
//! At a fixed `--rate`, request n is due at `start + n/rate` and its latency is measured from
//! when it was due, so a stalled server is not hidden by the generator waiting for it.
//!
//! ```text
//! cargo run --release --example loadgen -- --target http://127.0.0.1:9001 --tokens same --json
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use phantom_authz::token;
use prost::Message as _;
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(about = "gRPC load generator for envoy.service.auth.v3.Authorization/Check")]
struct Args {
    /// The ext_authz server.
    #[arg(long, default_value = "http://127.0.0.1:9001")]
    target: String,
    /// HTTP/2 connections; requests are spread over them.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight at once (closed loop), or most in flight with --rate.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Length of the measured run, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time before the run.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Requests per second on a fixed schedule; without it, as fast as answers come.
    #[arg(long)]
    rate: Option<f64>,
    /// Stop after this many requests (warm-up included), e.g. to fill a cache.
    #[arg(long)]
    requests: Option<u64>,
    /// `same`: one token (or `--pool` tokens in turn). `uniform`: one of the same `--pool`
    /// tokens drawn uniformly at random (seeded, so runs repeat). `unique`: a new token per
    /// request. `mixed`: a small pool, with some inactive, some unavailable and some token-less
    /// requests.
    #[arg(long, value_enum, default_value = "same")]
    tokens: Tokens,
    /// With `--tokens same`: how many tokens to take turns with. Above the concurrency, no two
    /// requests in flight share a token, so a server cannot merge their lookups.
    #[arg(long, default_value_t = 1)]
    pool: u64,
    /// Names this run's tokens; by default each run's are new. A `--tokens same --pool N
    /// --requests N` run fills caches with exactly the tokens a later `--tokens uniform --pool
    /// N` run with the same `--run` draws from.
    #[arg(long)]
    run: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Write the gRPC message of one Check (5-byte frame header and protobuf, the body of
    /// `POST /envoy.service.auth.v3.Authorization/Check`) carrying `--token` to this file and
    /// exit, for load generators that send fixed bytes (`h2load -d`).
    #[arg(long, value_name = "FILE")]
    write_check: Option<std::path::PathBuf>,
    /// The bearer token of `--write-check`'s request.
    #[arg(long, default_value = "hot-token")]
    token: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Tokens {
    Same,
    Uniform,
    Unique,
    Mixed,
}

/// What the workers share.
struct Plan {
    tokens: Tokens,
    pool: u64,
    /// Distinguishes this run's tokens from earlier runs' against the same caches.
    run: u64,
    template: HashMap<String, String>,
    next: AtomicU64,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    rate: Option<f64>,
    limit: u64,
}

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    ok: u64,
    denied: u64,
    errors: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    if let Some(path) = &args.write_check {
        return write_check(path, &args.token);
    }
    if args.connections == 0 || args.concurrency == 0 {
        return Err("--connections and --concurrency must be at least 1".into());
    }
    let endpoint = Endpoint::from_shared(args.target.clone())
        .map_err(|e| format!("--target {}: {e}", args.target))?
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(5));
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        // One `connect` per channel: each is its own HTTP/2 connection.
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", args.target))?;
        channels.push(channel);
    }

    let start = Instant::now();
    let plan = Arc::new(plan(&args, start));
    let workers: Vec<_> = (0..args.concurrency)
        .map(|i| {
            let client = AuthorizationClient::new(channels[i % channels.len()].clone());
            tokio::spawn(worker(client, plan.clone()))
        })
        .collect();
    let mut total = Tally::default();
    for worker in workers {
        let tally = worker.await.map_err(|e| format!("worker failed: {e}"))?;
        total.latencies_ns.extend(tally.latencies_ns);
        total.ok += tally.ok;
        total.denied += tally.denied;
        total.errors += tally.errors;
    }
    let elapsed = Instant::now()
        .min(plan.end)
        .saturating_duration_since(plan.measure_from);
    report(&args, total, elapsed);
    Ok(())
}

fn plan(args: &Args, start: Instant) -> Plan {
    let measure_from = start + args.warmup;
    Plan {
        tokens: args.tokens,
        pool: args.pool.max(1),
        run: args.run.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        }),
        template: template(),
        next: AtomicU64::new(0),
        start,
        measure_from,
        end: measure_from + args.duration,
        rate: args.rate.filter(|r| *r > 0.0),
        limit: args.requests.unwrap_or(u64::MAX),
    }
}

async fn worker(mut client: AuthorizationClient<Channel>, plan: Arc<Plan>) -> Tally {
    let mut tally = Tally::default();
    loop {
        let n = plan.next.fetch_add(1, Ordering::Relaxed);
        if n >= plan.limit {
            break;
        }
        let sent = match plan.rate {
            Some(rate) => {
                let due = plan.start + Duration::from_secs_f64(n as f64 / rate);
                if due >= plan.end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        if sent >= plan.end {
            break;
        }
        let request = check_request(&plan, n);
        let result = client.check(request).await;
        let done = Instant::now();
        if sent < plan.measure_from || done > plan.end {
            continue;
        }
        tally
            .latencies_ns
            .push(done.duration_since(sent).as_nanos() as u64);
        match result.map(|r| r.into_inner().http_response) {
            Ok(Some(HttpResponse::OkResponse(_))) => tally.ok += 1,
            Ok(_) => tally.denied += 1,
            Err(_) => tally.errors += 1,
        }
    }
    tally
}

/// The headers Envoy sends for a typical API call, without `authorization`.
fn template() -> HashMap<String, String> {
    [
        (":authority", "api.example.com"),
        (":path", "/v1/orders/12345?expand=items"),
        (":method", "GET"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) loadgen/1.0"),
        ("accept", "application/json"),
        ("x-forwarded-for", "203.0.113.7"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn check_request(plan: &Plan, n: u64) -> CheckRequest {
    let mut headers = plan.template.clone();
    headers.insert("x-request-id".into(), format!("{:x}-{n}", plan.run));
    if let Some(token) = token_for(plan, n) {
        headers.insert("authorization".into(), format!("Bearer {token}"));
    }
    token::check_request(HttpRequest {
        headers,
        ..Default::default()
    })
}

/// The Check `--write-check` writes: the template's headers, a request id and the token, as
/// one length-prefixed, uncompressed gRPC message.
fn write_check(path: &std::path::Path, token: &str) -> Result<(), String> {
    let mut headers = template();
    headers.insert("x-request-id".into(), "bench".into());
    headers.insert("authorization".into(), format!("Bearer {token}"));
    let request = token::check_request(HttpRequest {
        headers,
        ..Default::default()
    });
    let body = request.encode_to_vec();
    let length = u32::try_from(body.len()).map_err(|_| "request too large".to_owned())?;
    let mut message = vec![0];
    message.extend_from_slice(&length.to_be_bytes());
    message.extend_from_slice(&body);
    std::fs::write(path, message).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The token of request `n`, or `None` for a request without `Authorization`.
fn token_for(plan: &Plan, n: u64) -> Option<String> {
    let run = plan.run;
    match plan.tokens {
        Tokens::Same => Some(format!("same-{run:x}-{}", n % plan.pool)),
        // Multiply-shift scales the 64-bit draw onto the pool.
        Tokens::Uniform => {
            let i = (u128::from(splitmix64(run ^ n)) * u128::from(plan.pool)) >> 64;
            Some(format!("same-{run:x}-{i}"))
        }
        Tokens::Unique => Some(format!("unique-{run:x}-{n}")),
        // 85% a pool of 16 users, 7% inactive, 5% no token, 3% IdP unavailable.
        Tokens::Mixed => match n % 100 {
            0..85 => Some(format!("pool-{run:x}-{}", n % 16)),
            85..92 => Some(format!("inactive-{run:x}-{n}")),
            92..97 => None,
            _ => Some(format!("unavailable-{run:x}-{n}")),
        },
    }
}

/// SplitMix64's output function: a well-spread 64-bit value for each `n`, without shared state.
fn splitmix64(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn report(args: &Args, mut tally: Tally, elapsed: Duration) {
    tally.latencies_ns.sort_unstable();
    let count = tally.latencies_ns.len();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let rps = count as f64 / secs;
    let quantile_ms = |q: f64| -> f64 {
        if count == 0 {
            return 0.0;
        }
        let index = ((count as f64 * q).ceil() as usize).clamp(1, count) - 1;
        tally.latencies_ns[index] as f64 / 1e6
    };
    let (p50, p99, p999) = (quantile_ms(0.5), quantile_ms(0.99), quantile_ms(0.999));
    let max = tally.latencies_ns.last().map_or(0.0, |ns| *ns as f64 / 1e6);
    if args.json {
        println!(
            "{{\"tokens\":\"{}\",\"pool\":{},\"rate\":{},\"connections\":{},\"concurrency\":{},\
             \"seconds\":{secs:.3},\"requests\":{count},\"rps\":{rps:.1},\"p50_ms\":{p50:.4},\
             \"p99_ms\":{p99:.4},\"p999_ms\":{p999:.4},\"max_ms\":{max:.4},\"ok\":{},\
             \"denied\":{},\"errors\":{}}}",
            format!("{:?}", args.tokens).to_lowercase(),
            args.pool,
            args.rate.map_or("null".to_owned(), |r| r.to_string()),
            args.connections,
            args.concurrency,
            tally.ok,
            tally.denied,
            tally.errors,
        );
    } else {
        println!(
            "{count} requests in {secs:.2}s: {rps:.0} req/s; latency p50 {p50:.3} ms, \
             p99 {p99:.3} ms, p99.9 {p999:.3} ms, max {max:.3} ms; ok {}, denied {}, \
             gRPC errors {}",
            tally.ok, tally.denied, tally.errors
        );
    }
}
