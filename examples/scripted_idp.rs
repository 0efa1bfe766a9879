//! A stand-in Curity introspection endpoint for benchmarks and ops scripts.
//!
//! Any POST needs `Authorization: Basic …` (else 401) and a form body `token=…`. Tokens starting
//! with `inactive` are inactive (204, or `{"active":false}` in json mode), tokens starting with
//! `unavailable` get 503, and any other token gets, after `--delay`, a JWT padded to about
//! `--jwt-bytes` with `Cache-Control: max-age=<--max-age>`. `GET /stats` reports
//! `calls <n>` and `connections <n>` (accepted TCP connections) as plain text.
//!
//! ```text
//! cargo run --release --example scripted_idp -- --listen 127.0.0.1:0 --delay 5ms --jwt-bytes 1000
//! ```

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::{Parser, ValueEnum};

#[derive(Parser)]
#[command(
    about = "A scripted stand-in for Curity's introspection endpoint, for trying phantom-authz \
             out, benchmarks and ops scripts.",
    after_help = "Tokens, by how they begin:\n  \
                  inactive…     inactive: 204 (jwt mode) or {\"active\":false} (json mode)\n  \
                  unavailable…  the IdP fails: 503\n  \
                  anything else active: after --delay, a JWT of about --jwt-bytes whose sub is \
                  the token, with Cache-Control: max-age=<--max-age>\n\n\
                  Every POST needs some Authorization: Basic credential (any) and a form body \
                  token=…; GET /stats reports `calls <n>` and `connections <n>`. It prints \
                  `listening <addr>` once it accepts connections."
)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Time taken to answer an active token.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Approximate length of the JWTs handed out.
    #[arg(long, default_value_t = 1000)]
    jwt_bytes: usize,
    /// `Cache-Control: max-age` sent with each JWT.
    #[arg(long, default_value_t = 300)]
    max_age: u64,
    /// `jwt`: `application/jwt` body, 204 when inactive. `json`: RFC 7662 JSON with `jwt`.
    #[arg(long, value_enum, default_value = "jwt")]
    mode: Mode,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Jwt,
    Json,
}

struct Idp {
    delay: Duration,
    jwt_bytes: usize,
    cache_control: String,
    mode: Mode,
    calls: AtomicU64,
    connections: Arc<AtomicU64>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("scripted_idp: cannot bind {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    let connections = Arc::new(AtomicU64::new(0));
    let idp = Arc::new(Idp {
        delay: args.delay,
        jwt_bytes: args.jwt_bytes,
        cache_control: format!("max-age={}", args.max_age),
        mode: args.mode,
        calls: AtomicU64::new(0),
        connections: connections.clone(),
    });
    let app = Router::new()
        .route("/stats", get(stats))
        .fallback(introspect)
        .with_state(idp);
    let listener = listener.tap_io(move |tcp| {
        connections.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
    });
    println!("listening {addr}");
    let _ = std::io::stdout().flush();
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("scripted_idp: {e}");
        std::process::exit(1);
    }
}

async fn stats(State(idp): State<Arc<Idp>>) -> String {
    format!(
        "calls {}\nconnections {}\n",
        idp.calls.load(Ordering::Relaxed),
        idp.connections.load(Ordering::Relaxed)
    )
}

async fn introspect(
    State(idp): State<Arc<Idp>>,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method != axum::http::Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    idp.calls.fetch_add(1, Ordering::Relaxed);
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 6 && v[..6].eq_ignore_ascii_case("basic "));
    if !basic {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let Some(token) = form_token(&body) else {
        return (StatusCode::BAD_REQUEST, "missing token").into_response();
    };
    if token.starts_with("inactive") {
        return match idp.mode {
            Mode::Jwt => StatusCode::NO_CONTENT.into_response(),
            Mode::Json => json(r#"{"active":false}"#.to_owned()),
        };
    }
    if token.starts_with("unavailable") {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if !idp.delay.is_zero() {
        // tokio's timer rounds a sleep up to its next 1 ms tick (a 5 ms delay answers in 5–6 ms);
        // a blocking-pool thread sleeps to within tens of microseconds of the delay asked for.
        let delay = idp.delay;
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(delay)).await;
    }
    let jwt = make_jwt(idp.jwt_bytes);
    let cache_control = [(header::CACHE_CONTROL, idp.cache_control.clone())];
    match idp.mode {
        Mode::Jwt => (
            cache_control,
            [(header::CONTENT_TYPE, "application/jwt")],
            jwt,
        )
            .into_response(),
        Mode::Json => {
            let body = format!(r#"{{"active":true,"sub":"bench-user","jwt":"{jwt}"}}"#);
            (cache_control, json(body)).into_response()
        }
    }
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The `token` field of an `application/x-www-form-urlencoded` body. Benchmark tokens are
/// b64token characters, so only `+` and `%XX` need decoding.
fn form_token(body: &[u8]) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    let raw = body
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))?;
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    let token = String::from_utf8(out).ok()?;
    (!token.is_empty()).then_some(token)
}

/// An unsigned-looking RS256 JWT (`sub`, `exp` = now + 1 h) padded to about `target` bytes.
fn make_jwt(target: usize) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT","kid":"bench"}"#);
    // An RS256 signature is 256 bytes, 342 base64url characters.
    let signature = "s".repeat(342);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 3600;
    let bare = format!(r#"{{"sub":"bench-user","exp":{exp},"pad":""}}"#);
    let fixed = header.len() + 2 + signature.len() + bare.len().div_ceil(3) * 4;
    // Base64url grows the payload by 4/3; pad in raw bytes to hit the target.
    let pad = target.saturating_sub(fixed) * 3 / 4;
    let payload = format!(
        r#"{{"sub":"bench-user","exp":{exp},"pad":"{}"}}"#,
        "x".repeat(pad)
    );
    format!("{header}.{}.{signature}", URL_SAFE_NO_PAD.encode(payload))
}
