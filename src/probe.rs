//! `phantom-authz check`: sends one Envoy-shaped Check to a running service and reads the answer
//! as a person would (or as JSON, for scripts). A first look at an allow, and an operator's
//! probe of a live deployment. Exit status: 0 allow, 1 deny, 2 the Check could not be made.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::parse_duration;
use crate::token;

/// The flags of `phantom-authz check`.
/// No `Debug`: it holds the token.
#[derive(clap::Parser)]
#[command(
    name = "phantom-authz check",
    about = "Sends one Envoy-shaped ext_authz Check to a running phantom-authz and prints what \
             Envoy would do: forward the request (and with which Authorization) or deny it \
             (with which status and WWW-Authenticate). Exit status: 0 allow, 1 deny, 2 error."
)]
pub struct CheckArgs {
    /// The ext_authz listener: `host:port`, or an `http://` or `https://` URL.
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub target: String,

    /// The opaque access token, sent as `Authorization: Bearer <token>`. Without it (and
    /// without --token-file) the Check carries no Authorization header.
    #[arg(long, conflicts_with = "token_file")]
    pub token: Option<String>,

    /// File holding the token (surrounding whitespace trimmed), to keep it out of `ps`.
    #[arg(long)]
    pub token_file: Option<PathBuf>,

    /// The method of the request being checked.
    #[arg(long, default_value = "GET")]
    pub method: String,

    /// The path of the request being checked.
    #[arg(long, default_value = "/")]
    pub path: String,

    /// The host (`:authority`) of the request being checked.
    #[arg(long, default_value = "localhost")]
    pub host: String,

    /// A further request header, `name: value`; may be repeated.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,

    /// PEM CA(s) that sign the service's certificate: speak TLS (implied by an https:// target).
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate chain, for a service that requires mTLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM client private key (with --tls-cert).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// The name the service's certificate must carry (default: the target's host).
    #[arg(long)]
    pub tls_server_name: Option<String>,

    /// Print the JWT in full instead of its first characters.
    #[arg(long)]
    pub show_jwt: bool,

    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,

    /// Longest wait for the answer, connection included.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Why the Check could not be made: exit 2.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("--token-file: cannot read {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag}: cannot read {}: {source}", path.display())]
    TlsFile {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The flag's value is not echoed: a mistyped `authorization` header would be a token.
    #[error("--header: an argument is not `name: value`")]
    Header,
    #[error("--target: `{0}` is not host:port or an http(s) URL")]
    Target(String),
    #[error("cannot reach {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("{target} answered the Check with gRPC {code:?}: {message}")]
    Rpc {
        target: String,
        code: tonic::Code,
        message: String,
    },
}

/// What the service answered, flattened.
struct Answer {
    grpc: tonic::Code,
    /// 200 for an allow.
    http: u16,
    headers: Vec<(String, String)>,
    elapsed: Duration,
}

/// Runs `phantom-authz check`.
pub fn run(args: CheckArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("phantom-authz check: cannot start the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(probe(&args)) {
        Ok(answer) => {
            if args.json {
                println!("{}", json(&answer, args.show_jwt));
            } else {
                print!("{}", text(&answer, args.show_jwt));
            }
            if answer.http == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("phantom-authz check: {error}");
            ExitCode::from(2)
        }
    }
}

async fn probe(args: &CheckArgs) -> Result<Answer, ProbeError> {
    let request = request(args)?;
    let endpoint = endpoint(args)?;
    let target = args.target.clone();
    let started = Instant::now();
    let unreachable = |reason: String| ProbeError::Unreachable {
        target: target.clone(),
        reason,
    };
    let channel = tokio::time::timeout(args.timeout, endpoint.connect())
        .await
        .map_err(|_| unreachable(format!("no connection within {:?}", args.timeout)))?
        .map_err(|error| unreachable(describe(&error)))?;
    let mut request = tonic::Request::new(request);
    request.set_timeout(args.timeout);
    let response = AuthorizationClient::new(channel)
        .check(request)
        .await
        .map_err(|status| ProbeError::Rpc {
            target: target.clone(),
            code: status.code(),
            message: status.message().to_owned(),
        })?;
    Ok(answer(response.into_inner(), started.elapsed()))
}

/// An error and its causes, on one line.
fn describe(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let cause = cause.to_string();
        // Layers often repeat their cause's words; say them once.
        if !parts.last().is_some_and(|last| last.ends_with(&cause)) {
            parts.push(cause);
        }
        source = source.and_then(std::error::Error::source);
    }
    parts.join(": ")
}

fn endpoint(args: &CheckArgs) -> Result<Endpoint, ProbeError> {
    let tls = args.tls_ca.is_some() || args.target.starts_with("https://");
    let url = if args.target.contains("://") {
        args.target.clone()
    } else if tls {
        format!("https://{}", args.target)
    } else {
        format!("http://{}", args.target)
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|_| ProbeError::Target(args.target.clone()))?
        .connect_timeout(args.timeout)
        .tcp_nodelay(true);
    if tls {
        let mut config = ClientTlsConfig::new();
        if let Some(path) = &args.tls_ca {
            config = config.ca_certificate(Certificate::from_pem(read(path, "--tls-ca")?));
        }
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            config = config.identity(Identity::from_pem(
                read(cert, "--tls-cert")?,
                read(key, "--tls-key")?,
            ));
        }
        if let Some(name) = &args.tls_server_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|error| ProbeError::Unreachable {
                target: args.target.clone(),
                reason: describe(&error),
            })?;
    }
    Ok(endpoint)
}

fn read(path: &std::path::Path, flag: &'static str) -> Result<Vec<u8>, ProbeError> {
    std::fs::read(path).map_err(|source| ProbeError::TlsFile {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// The Check Envoy would send for the request described by the flags.
fn request(args: &CheckArgs) -> Result<CheckRequest, ProbeError> {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;

    let mut headers = std::collections::HashMap::new();
    headers.insert(":authority".to_owned(), args.host.clone());
    headers.insert(":method".to_owned(), args.method.clone());
    headers.insert(":path".to_owned(), args.path.clone());
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .filter(|(name, _)| !name.trim().is_empty())
            .ok_or(ProbeError::Header)?;
        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let token = match (&args.token, &args.token_file) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| ProbeError::TokenFile {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    if let Some(token) = token {
        headers.insert("authorization".to_owned(), format!("Bearer {token}"));
    }
    Ok(token::check_request(HttpRequest {
        method: args.method.clone(),
        path: args.path.clone(),
        host: args.host.clone(),
        scheme: "https".to_owned(),
        protocol: "HTTP/1.1".to_owned(),
        headers,
        ..Default::default()
    }))
}

fn answer(response: CheckResponse, elapsed: Duration) -> Answer {
    let grpc = tonic::Code::from(response.status.map_or(0, |status| status.code));
    let flatten = |headers: Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>| {
        headers
            .into_iter()
            .filter_map(|option| option.header)
            .map(|header| (header.key, header.value))
            .collect()
    };
    let (http, headers) = match response.http_response {
        Some(HttpResponse::OkResponse(ok)) => (200, flatten(ok.headers)),
        Some(HttpResponse::DeniedResponse(denied)) => (
            denied
                .status
                .and_then(|status| u16::try_from(status.code).ok())
                .unwrap_or(403),
            flatten(denied.headers),
        ),
        // Envoy reads an OK status alone as an allow, anything else as a 403.
        Some(HttpResponse::ErrorResponse(_)) | None => {
            (if grpc == tonic::Code::Ok { 200 } else { 403 }, Vec::new())
        }
    };
    Answer {
        grpc,
        http,
        headers,
        elapsed,
    }
}

/// A JWT is shown by its first characters and its length unless asked in full.
fn shown(name: &str, value: &str, show_jwt: bool) -> String {
    const SHOWN: usize = 16;
    match value.strip_prefix("Bearer ") {
        Some(jwt) if name.eq_ignore_ascii_case("authorization") && !show_jwt => {
            let head: String = jwt.chars().take(SHOWN).collect();
            format!(
                "Bearer {head}… ({} bytes; --show-jwt prints it all)",
                jwt.len()
            )
        }
        _ => value.to_owned(),
    }
}

fn text(answer: &Answer, show_jwt: bool) -> String {
    let millis = answer.elapsed.as_secs_f64() * 1000.0;
    let mut out = if answer.http == 200 {
        format!(
            "allow: Envoy forwards the request (gRPC {:?}, {millis:.1} ms)\n",
            answer.grpc
        )
    } else {
        format!(
            "deny: Envoy answers HTTP {} (gRPC {:?}, {millis:.1} ms)\n",
            answer.http, answer.grpc
        )
    };
    for (name, value) in &answer.headers {
        out.push_str(&format!("  {name}: {}\n", shown(name, value, show_jwt)));
    }
    out
}

fn json(answer: &Answer, show_jwt: bool) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = answer
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), shown(name, value, show_jwt).into()))
        .collect();
    serde_json::json!({
        "decision": if answer.http == 200 { "allow" } else { "deny" },
        "http_status": answer.http,
        "grpc_code": answer.grpc as i32,
        "grpc_status": format!("{:?}", answer.grpc),
        "headers": headers,
        "elapsed_ms": (answer.elapsed.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jwt_is_shortened_unless_asked_for() {
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
        let value = format!("Bearer {jwt}");
        let short = shown("authorization", &value, false);
        assert!(short.starts_with("Bearer eyJhbGciOiJSUzI1"), "{short}");
        assert!(!short.contains("c2lnbmF0dXJl"), "{short}");
        assert!(short.contains(&format!("{} bytes", jwt.len())), "{short}");
        assert_eq!(shown("authorization", &value, true), value);
        assert_eq!(
            shown("www-authenticate", "Bearer realm=\"api\"", false),
            "Bearer realm=\"api\""
        );
    }

    #[test]
    fn headers_must_be_name_colon_value() {
        let args = |header: &str| CheckArgs {
            target: "127.0.0.1:9001".into(),
            token: None,
            token_file: None,
            method: "GET".into(),
            path: "/".into(),
            host: "api".into(),
            headers: vec![header.into()],
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
            show_jwt: false,
            json: false,
            timeout: Duration::from_secs(1),
        };
        assert!(request(&args("x-request-id: 42")).is_ok());
        // A mistyped header is not echoed: it could be a token.
        let Err(error) = request(&args("authorization Bearer opaque-secret")) else {
            panic!("accepted");
        };
        assert!(!error.to_string().contains("opaque-secret"), "{error}");
        assert!(matches!(
            request(&args("no colon")),
            Err(ProbeError::Header)
        ));
        assert!(matches!(request(&args(": empty")), Err(ProbeError::Header)));
    }
}
