//! Flags and environment, parsed and validated into plain types. No I/O happens here.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Command-line flags. Every flag is also read from `PHANTOM_AUTHZ_<FLAG>` and, with
/// `--config`, from a TOML file; flags win over the environment, which wins over the file.
#[derive(Parser)]
#[command(
    name = "phantom-authz",
    version,
    args_override_self = true,
    about = "Envoy ext_authz service for the phantom token pattern: swaps opaque access tokens \
             for JWTs through OAuth introspection, with a shared Redis cache.",
    after_help = "`phantom-authz check-config [FLAGS]` validates the configuration, reads every \
                  file it names, prints the effective settings with secrets masked and exits."
)]
pub struct Args {
    /// TOML file of settings, keyed by flag name without the dashes
    /// (`introspection-url = "https://…"`, `local-cache-max-entries = 50000`).
    #[arg(long, env = "PHANTOM_AUTHZ_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address of the ext_authz gRPC listener (also serves grpc.health.v1).
    #[arg(
        long,
        env = "PHANTOM_AUTHZ_GRPC_LISTEN",
        default_value = "0.0.0.0:9001"
    )]
    pub grpc_listen: SocketAddr,

    /// Address of the admin HTTP listener: /metrics, /healthz, /readyz.
    #[arg(
        long,
        env = "PHANTOM_AUTHZ_ADMIN_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub admin_listen: SocketAddr,

    /// Address of the admin gRPC listener (phantom_authz.admin.v1.Admin: token eviction).
    /// Off unless given; requires --admin-token-file. Keep it off the data-plane network.
    #[arg(long, env = "PHANTOM_AUTHZ_ADMIN_GRPC_LISTEN")]
    pub admin_grpc_listen: Option<SocketAddr>,

    /// File holding the bearer secret every admin gRPC call must present as
    /// `authorization: Bearer <secret>` (surrounding whitespace is trimmed; 16 bytes or more).
    #[arg(long, env = "PHANTOM_AUTHZ_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// PEM certificate chain for TLS on the admin gRPC listener (with --admin-grpc-tls-key), so
    /// that the admin secret and the tokens to evict do not travel in plaintext.
    #[arg(long, env = "PHANTOM_AUTHZ_ADMIN_GRPC_TLS_CERT")]
    pub admin_grpc_tls_cert: Option<PathBuf>,

    /// PEM private key for TLS on the admin gRPC listener (with --admin-grpc-tls-cert).
    #[arg(long, env = "PHANTOM_AUTHZ_ADMIN_GRPC_TLS_KEY")]
    pub admin_grpc_tls_key: Option<PathBuf>,

    /// PEM CA(s) for admin client certificates: when given, every admin gRPC client must
    /// present a certificate signed by one of them (mTLS), besides the bearer secret.
    #[arg(long, env = "PHANTOM_AUTHZ_ADMIN_GRPC_TLS_CLIENT_CA")]
    pub admin_grpc_tls_client_ca: Option<PathBuf>,

    /// The identity server's introspection endpoint (http or https).
    #[arg(long, env = "PHANTOM_AUTHZ_INTROSPECTION_URL")]
    pub introspection_url: Option<String>,

    /// PEM file of the CA(s) that sign the IdP's certificate. When given, only these are
    /// trusted for the IdP; otherwise the system's roots are.
    #[arg(long, env = "PHANTOM_AUTHZ_IDP_CA_FILE")]
    pub idp_ca_file: Option<PathBuf>,

    /// HTTP(S) proxy through which every call to the identity server goes (http:// or
    /// https://; credentials allowed, `http://user:password@proxy:3128`, and masked wherever
    /// printed). Without it the IdP is called directly: HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and
    /// their lowercase forms are ignored, so the client secret and tokens never take a route
    /// nobody configured for this service.
    #[arg(long, env = "PHANTOM_AUTHZ_IDP_PROXY", hide_env_values = true)]
    pub idp_proxy: Option<String>,

    /// PEM certificate chain for TLS on the gRPC listener (with --grpc-tls-key).
    #[arg(long, env = "PHANTOM_AUTHZ_GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// PEM private key for TLS on the gRPC listener (with --grpc-tls-cert).
    #[arg(long, env = "PHANTOM_AUTHZ_GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,

    /// PEM CA(s) for client certificates: when given, every gRPC client (Envoy) must present a
    /// certificate signed by one of them (mTLS).
    #[arg(long, env = "PHANTOM_AUTHZ_GRPC_TLS_CLIENT_CA")]
    pub grpc_tls_client_ca: Option<PathBuf>,

    /// Client id of the introspecting client.
    #[arg(long, env = "PHANTOM_AUTHZ_CLIENT_ID")]
    pub client_id: Option<String>,

    /// Client secret of the introspecting client. Prefer --client-secret-file.
    #[arg(long, env = "PHANTOM_AUTHZ_CLIENT_SECRET", hide_env_values = true)]
    pub client_secret: Option<String>,

    /// File holding the client secret (surrounding whitespace is trimmed).
    #[arg(long, env = "PHANTOM_AUTHZ_CLIENT_SECRET_FILE")]
    pub client_secret_file: Option<PathBuf>,

    /// `jwt`: ask for `application/jwt`, the JWT is the body (204 means inactive).
    /// `json`: RFC 7662 JSON whose `jwt` field holds the JWT.
    #[arg(
        long,
        env = "PHANTOM_AUTHZ_INTROSPECTION_MODE",
        value_enum,
        default_value = "jwt"
    )]
    pub introspection_mode: IntrospectionMode,

    /// Bound on one introspection call, connection included. An introspection runs to its end
    /// even when Envoy gives up on the Check that started it (Envoy's ext_authz `timeout`, 200 ms
    /// by default), so that the retry finds the answer cached: keep this above Envoy's timeout
    /// and well below the time a client waits before retrying.
    #[arg(long, env = "PHANTOM_AUTHZ_INTROSPECTION_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub introspection_timeout: Duration,

    /// Longest a Check waits for its answer (Redis and introspection); past it the Check gets
    /// 503 while the lookup goes on and fills the cache. Bounds callers that set no deadline.
    #[arg(long, env = "PHANTOM_AUTHZ_CHECK_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub check_timeout: Duration,

    /// How long a token the IdP called inactive is answered 401 by this replica without asking
    /// the IdP again, so a replayed bad token costs one IdP call per interval. A token the IdP
    /// wrongly calls inactive (replication lag just after issuance) stays refused that long. 0
    /// turns it off.
    #[arg(long, env = "PHANTOM_AUTHZ_INACTIVE_CACHE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub inactive_cache_ttl: Duration,

    /// Most introspection calls under way at once; excess Checks get 503 at once.
    #[arg(
        long,
        env = "PHANTOM_AUTHZ_MAX_CONCURRENT_INTROSPECTIONS",
        default_value_t = 256
    )]
    pub max_concurrent_introspections: usize,

    /// Consecutive IdP failures (unreachable, timeout, 5xx, garbage) that open the circuit
    /// breaker, after which Checks needing introspection fail fast with 503. 0 disables it.
    #[arg(
        long,
        env = "PHANTOM_AUTHZ_CIRCUIT_FAILURE_THRESHOLD",
        default_value_t = 5
    )]
    pub circuit_failure_threshold: u32,

    /// How long an open circuit fails fast before one probe call is let through.
    #[arg(long, env = "PHANTOM_AUTHZ_CIRCUIT_OPEN_DURATION", default_value = "5s", value_parser = parse_duration)]
    pub circuit_open_duration: Duration,

    /// Shared cache (redis:// or rediss://). Without it the in-process cache serves alone.
    #[arg(long, env = "PHANTOM_AUTHZ_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// File of the secrets that Redis entries are bound to: one per line, 32 bytes or more
    /// each (`head -c 32 /dev/urandom | base64`). Required with --redis-url. The first names
    /// and seals new entries; every line is tried when reading, so a new secret can be put
    /// first and the old one dropped later, without a flush. Replicas share entries only when
    /// they share a secret; without it, anyone who can write to Redis could forge an allow.
    #[arg(long, env = "PHANTOM_AUTHZ_CACHE_SECRET_FILE")]
    pub cache_secret_file: Option<PathBuf>,

    /// PEM CA(s) that sign Redis's certificate, for rediss:// URLs (default: system roots).
    #[arg(long, env = "PHANTOM_AUTHZ_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Bound on one Redis command; on expiry the Check falls back to introspection.
    #[arg(long, env = "PHANTOM_AUTHZ_REDIS_TIMEOUT", default_value = "50ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// Cache TTL when the identity server sends no Cache-Control max-age.
    #[arg(long, env = "PHANTOM_AUTHZ_DEFAULT_CACHE_TTL", default_value = "300s", value_parser = parse_duration)]
    pub default_cache_ttl: Duration,

    /// No cached allow lives longer than this, whatever the identity server's max-age or
    /// --default-cache-ttl say: it bounds how long a token revoked without an eviction keeps
    /// working.
    #[arg(long, env = "PHANTOM_AUTHZ_MAX_CACHE_TTL", default_value = "5m", value_parser = parse_duration)]
    pub max_cache_ttl: Duration,

    /// Longest time an in-process entry is trusted before Redis is asked again (with
    /// --redis-url); bounds how long another replica's eviction takes to show. 0 turns the
    /// in-process tier off when Redis is configured.
    #[arg(long, env = "PHANTOM_AUTHZ_LOCAL_CACHE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub local_cache_ttl: Duration,

    /// Most entries held in the in-process cache.
    #[arg(
        long,
        env = "PHANTOM_AUTHZ_LOCAL_CACHE_MAX_ENTRIES",
        default_value_t = 100_000
    )]
    pub local_cache_max_entries: usize,

    /// Most JWT bytes held in the in-process cache (e.g. 256MiB, 64MB, 1048576).
    #[arg(long, env = "PHANTOM_AUTHZ_LOCAL_CACHE_MAX_BYTES", default_value = "256MiB", value_parser = parse_bytes)]
    pub local_cache_max_bytes: u64,

    /// Most concurrent Checks on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(
        long,
        env = "PHANTOM_AUTHZ_GRPC_MAX_CONCURRENT_STREAMS",
        default_value_t = 1024
    )]
    pub grpc_max_concurrent_streams: u32,

    /// Largest CheckRequest accepted (e.g. 256KiB). A request without a body is a few KiB up to
    /// Envoy's header limit (60 KiB by default); raise this if Envoy sends request bodies
    /// (`with_request_body`).
    #[arg(long, env = "PHANTOM_AUTHZ_GRPC_MAX_REQUEST_BYTES", default_value = "256KiB", value_parser = parse_bytes)]
    pub grpc_max_request_bytes: u64,

    /// Longest access token accepted; longer ones are rejected without calling the IdP.
    #[arg(long, env = "PHANTOM_AUTHZ_MAX_TOKEN_LENGTH", default_value_t = 4096)]
    pub max_token_length: usize,

    /// Realm announced in `WWW-Authenticate`.
    #[arg(long, env = "PHANTOM_AUTHZ_REALM", default_value = "api")]
    pub realm: String,

    /// How long in-flight Checks may take to finish after SIGTERM.
    #[arg(long, env = "PHANTOM_AUTHZ_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log line format.
    #[arg(
        long,
        env = "PHANTOM_AUTHZ_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// OTLP/gRPC collector to export OpenTelemetry traces to (http:// or https://, e.g.
    /// http://otel-collector:4317): a span per Check, continuing the caller's W3C
    /// `traceparent`. Off unless given. The standard OTEL_BSP_* and OTEL_TRACES_SAMPLER
    /// variables tune batching and sampling.
    #[arg(long, env = "PHANTOM_AUTHZ_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// How the identity server is asked for the JWT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IntrospectionMode {
    /// `Accept: application/jwt`; 200 carries the JWT, 204 means inactive.
    Jwt,
    /// `Accept: application/json`; RFC 7662 JSON with `active` and `jwt`.
    Json,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A value that must never be printed: its `Debug` and `Display` are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the client secret comes from; reading a file is left to start-up code.
#[derive(Debug)]
pub enum SecretSource {
    Value(Secret),
    File(PathBuf),
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub grpc_listen: SocketAddr,
    pub grpc_tls: Option<GrpcTls>,
    pub admin_listen: SocketAddr,
    pub admin_grpc: Option<AdminGrpcConfig>,
    pub introspection: IntrospectionConfig,
    pub cache: CacheConfig,
    pub redis: Option<RedisConfig>,
    pub max_token_length: usize,
    /// Longest a Check waits for its answer.
    pub check_timeout: Duration,
    pub grpc_limits: GrpcLimits,
    pub realm: String,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// Where traces go; `None`: no exporter, spans stay disabled.
    pub otlp_endpoint: Option<String>,
}

/// Bounds on what one ext_authz client may ask of the gRPC listener.
#[derive(Debug, Clone, Copy)]
pub struct GrpcLimits {
    pub max_concurrent_streams: u32,
    pub max_request_bytes: usize,
}

/// TLS on a gRPC listener (ext_authz or admin); files are read at start-up.
#[derive(Debug)]
pub struct GrpcTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Present: client certificates are required (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// Everything the introspection client needs except the secret's value.
#[derive(Debug)]
pub struct IntrospectionConfig {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    /// The proxy for every IdP call; `None`: direct, whatever the environment says.
    pub proxy: Option<ProxyUrl>,
    pub client_id: String,
    pub client_secret: SecretSource,
    pub mode: IntrospectionMode,
    pub timeout: Duration,
    pub guard: GuardConfig,
}

/// The concurrency cap and circuit breaker in front of the IdP.
#[derive(Clone, Copy, Debug)]
pub struct GuardConfig {
    /// Most introspections under way at once.
    pub max_concurrent: usize,
    /// Consecutive IdP failures that open the circuit; 0 never opens it.
    pub failure_threshold: u32,
    /// How long an open circuit fails fast before letting a probe through.
    pub open_for: Duration,
}

/// Cache TTLs and bounds.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub inactive_ttl: Duration,
    pub local_ttl: Duration,
    pub local_max_entries: usize,
    pub local_max_bytes: u64,
}

/// The admin gRPC API; the secret file is read at start-up.
#[derive(Debug)]
pub struct AdminGrpcConfig {
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    /// TLS on the admin listener; `None`: plaintext.
    pub tls: Option<GrpcTls>,
}

/// The shared cache.
pub struct RedisConfig {
    pub url: Secret,
    pub ca_file: Option<PathBuf>,
    /// `--cache-secret-file`, read at start-up.
    pub secret_file: PathBuf,
    pub timeout: Duration,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &masked_url(self.url.expose()))
            .field("ca_file", &self.ca_file)
            .field("secret_file", &self.secret_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A URL with any userinfo (`user:password@`) replaced by `***@`: everything between `://` and
/// the last `@`, so that a password holding `/`, `?`, `#` or `@` is masked whole. An `@` later
/// in the URL masks more than needed, never less.
fn masked_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_string();
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// A proxy's URL, which may carry credentials: its `Debug` masks them.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl(Secret);

impl ProxyUrl {
    /// The URL itself, credentials included, for the one place that uses it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", masked_url(self.0.expose()))
    }
}

/// A configuration mistake, naming the flag and never a secret's value.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub problem: String,
}

fn invalid(flag: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        flag,
        problem: problem.into(),
    }
}

impl Config {
    /// Validates parsed flags.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let url = args
            .introspection_url
            .ok_or_else(|| invalid("--introspection-url", "is required"))?;
        validate_http_url(&url)?;

        let client_id = args
            .client_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| invalid("--client-id", "is required"))?;
        if client_id.contains(':') {
            // RFC 6749 §2.3.1 form-encodes the id, but Curity ids never contain ':' and a
            // colon here is almost always a pasted "id:secret" pair.
            return Err(invalid("--client-id", "must not contain ':'"));
        }
        let client_secret = match (args.client_secret, args.client_secret_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "--client-secret",
                    "give either --client-secret or --client-secret-file, not both",
                ));
            }
            (Some(secret), None) if secret.is_empty() => {
                return Err(invalid("--client-secret", "must not be empty"));
            }
            (Some(secret), None) => SecretSource::Value(Secret::new(secret)),
            (None, Some(path)) => SecretSource::File(path),
            (None, None) => {
                return Err(invalid(
                    "--client-secret",
                    "is required (or --client-secret-file)",
                ));
            }
        };
        if args.max_concurrent_introspections == 0 {
            return Err(invalid(
                "--max-concurrent-introspections",
                "must be at least 1",
            ));
        }
        if args.circuit_failure_threshold > 0 && args.circuit_open_duration.is_zero() {
            return Err(invalid("--circuit-open-duration", "must be above zero"));
        }
        if args.introspection_timeout.is_zero() {
            return Err(invalid("--introspection-timeout", "must be above zero"));
        }
        if args.check_timeout.is_zero() {
            return Err(invalid("--check-timeout", "must be above zero"));
        }
        if args.max_cache_ttl.is_zero() {
            return Err(invalid("--max-cache-ttl", "must be above zero"));
        }
        if args.grpc_max_concurrent_streams == 0 {
            return Err(invalid(
                "--grpc-max-concurrent-streams",
                "must be at least 1",
            ));
        }
        let max_request_bytes = usize::try_from(args.grpc_max_request_bytes)
            .ok()
            .filter(|bytes| (1024..=64 << 20).contains(bytes))
            .ok_or_else(|| invalid("--grpc-max-request-bytes", "must be between 1KiB and 64MiB"))?;

        let redis = match args.redis_url {
            None if args.cache_secret_file.is_some() => {
                return Err(invalid(
                    "--cache-secret-file",
                    "has no use without --redis-url",
                ));
            }
            None => None,
            Some(url) => {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err(invalid(
                        "--redis-url",
                        "must start with redis:// or rediss://",
                    ));
                }
                if args.redis_timeout.is_zero() {
                    return Err(invalid("--redis-timeout", "must be above zero"));
                }
                if args.redis_ca_file.is_some() && !url.starts_with("rediss://") {
                    return Err(invalid("--redis-ca-file", "needs a rediss:// --redis-url"));
                }
                let secret_file = args.cache_secret_file.ok_or_else(|| {
                    invalid(
                        "--cache-secret-file",
                        "is required with --redis-url: a file of one or more secrets of 32 \
                         bytes or more, one per line, shared by the replicas that share Redis \
                         (`head -c 32 /dev/urandom | base64 > cache-secret`)",
                    )
                })?;
                Some(RedisConfig {
                    url: Secret::new(url),
                    ca_file: args.redis_ca_file,
                    secret_file,
                    timeout: args.redis_timeout,
                })
            }
        };

        if args.local_cache_max_entries == 0 {
            return Err(invalid(
                "--local-cache-max-entries",
                "must be at least 1 (use --local-cache-ttl 0 to turn the tier off)",
            ));
        }
        if args.max_token_length == 0 {
            return Err(invalid("--max-token-length", "must be at least 1"));
        }
        validate_realm(&args.realm)?;
        let admin_grpc_tls = tls_files(
            ADMIN_GRPC_TLS_FLAGS,
            args.admin_grpc_tls_cert,
            args.admin_grpc_tls_key,
            args.admin_grpc_tls_client_ca,
        )?;
        if admin_grpc_tls.is_some() && args.admin_grpc_listen.is_none() {
            return Err(invalid(
                "--admin-grpc-tls-cert",
                "has no use without --admin-grpc-listen",
            ));
        }
        let admin_grpc = match (args.admin_grpc_listen, args.admin_token_file) {
            (Some(listen), Some(_))
                if listen.port() != 0
                    && (listen == args.grpc_listen || listen == args.admin_listen) =>
            {
                return Err(invalid(
                    "--admin-grpc-listen",
                    "must differ from --grpc-listen and --admin-listen",
                ));
            }
            (Some(listen), Some(token_file)) => Some(AdminGrpcConfig {
                listen,
                token_file,
                tls: admin_grpc_tls,
            }),
            (Some(_), None) => {
                return Err(invalid(
                    "--admin-token-file",
                    "is required with --admin-grpc-listen",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "--admin-token-file",
                    "has no use without --admin-grpc-listen",
                ));
            }
            (None, None) => None,
        };

        let grpc_tls = tls_files(
            GRPC_TLS_FLAGS,
            args.grpc_tls_cert,
            args.grpc_tls_key,
            args.grpc_tls_client_ca,
        )?;
        let otlp_endpoint = args.otlp_endpoint.map(validate_otlp_endpoint).transpose()?;
        let idp_proxy = args.idp_proxy.map(validate_proxy_url).transpose()?;
        if args.idp_ca_file.is_some() && url.starts_with("http://") {
            return Err(invalid(
                "--idp-ca-file",
                "needs an https:// --introspection-url",
            ));
        }

        Ok(Config {
            grpc_listen: args.grpc_listen,
            grpc_tls,
            admin_listen: args.admin_listen,
            admin_grpc,
            introspection: IntrospectionConfig {
                url,
                ca_file: args.idp_ca_file,
                proxy: idp_proxy,
                client_id,
                client_secret,
                mode: args.introspection_mode,
                timeout: args.introspection_timeout,
                guard: GuardConfig {
                    max_concurrent: args.max_concurrent_introspections,
                    failure_threshold: args.circuit_failure_threshold,
                    open_for: args.circuit_open_duration,
                },
            },
            cache: CacheConfig {
                default_ttl: args.default_cache_ttl,
                max_ttl: args.max_cache_ttl,
                inactive_ttl: args.inactive_cache_ttl,
                local_ttl: args.local_cache_ttl,
                local_max_entries: args.local_cache_max_entries,
                local_max_bytes: args.local_cache_max_bytes,
            },
            redis,
            max_token_length: args.max_token_length,
            check_timeout: args.check_timeout,
            grpc_limits: GrpcLimits {
                max_concurrent_streams: args.grpc_max_concurrent_streams,
                max_request_bytes,
            },
            realm: args.realm,
            shutdown_grace: args.shutdown_grace,
            log_format: args.log_format,
            otlp_endpoint,
        })
    }
}

/// The flags naming a listener's TLS files: certificate, key, client CA.
pub type TlsFlags = [&'static str; 3];

/// The ext_authz listener's TLS flags.
pub const GRPC_TLS_FLAGS: TlsFlags = ["--grpc-tls-cert", "--grpc-tls-key", "--grpc-tls-client-ca"];

/// The admin gRPC listener's TLS flags.
pub const ADMIN_GRPC_TLS_FLAGS: TlsFlags = [
    "--admin-grpc-tls-cert",
    "--admin-grpc-tls-key",
    "--admin-grpc-tls-client-ca",
];

/// A listener's TLS files: none, or a certificate and key with an optional client CA.
fn tls_files(
    [cert_flag, key_flag, client_ca_flag]: TlsFlags,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<GrpcTls>, ConfigError> {
    match (cert, key, client_ca) {
        (Some(cert), Some(key), client_ca) => Ok(Some(GrpcTls {
            cert,
            key,
            client_ca,
        })),
        (None, None, None) => Ok(None),
        (None, None, Some(_)) => Err(invalid(
            client_ca_flag,
            format!("needs {cert_flag} and {key_flag}"),
        )),
        (Some(_), None, _) => Err(invalid(key_flag, format!("is required with {cert_flag}"))),
        (None, Some(_), _) => Err(invalid(cert_flag, format!("is required with {key_flag}"))),
    }
}

fn validate_http_url(url: &str) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| invalid("--introspection-url", "must start with http:// or https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(invalid("--introspection-url", "has no host"));
    }
    if authority.contains('@') {
        return Err(invalid(
            "--introspection-url",
            "must not carry credentials; use --client-id and --client-secret",
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("--introspection-url", "contains whitespace"));
    }
    Ok(())
}

/// The collector's address: http or https, a host, no credentials, no whitespace.
fn validate_otlp_endpoint(url: String) -> Result<String, ConfigError> {
    let flag = "--otlp-endpoint";
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| invalid(flag, "must start with http:// or https://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() {
        return Err(invalid(flag, "has no host"));
    }
    if authority.contains('@') {
        return Err(invalid(flag, "must not carry credentials"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(flag, "contains whitespace"));
    }
    Ok(url)
}

/// The IdP proxy: http or https, a host, no whitespace; credentials are allowed. Problems are
/// described without echoing the URL, which may hold a password.
fn validate_proxy_url(url: String) -> Result<ProxyUrl, ConfigError> {
    let flag = "--idp-proxy";
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| invalid(flag, "must start with http:// or https://"))?;
    // Credentials may hold '/', '?' or '#': the host follows the last '@'.
    let after_credentials = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let host = after_credentials
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    if host.is_empty() {
        return Err(invalid(flag, "has no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(flag, "contains whitespace"));
    }
    Ok(ProxyUrl(Secret::new(url)))
}

/// The realm goes inside a quoted-string in `WWW-Authenticate`.
fn validate_realm(realm: &str) -> Result<(), ConfigError> {
    let ok = !realm.is_empty()
        && realm
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "--realm",
            "must be non-empty printable ASCII without '\"' or '\\'",
        ))
    }
}

/// Turns a `--config` TOML document into flags placed before the command line's, so that
/// command-line flags override them. Keys whose environment variable is set (`env_is_set`) are
/// left out: the environment wins over the file. Unknown keys are errors.
pub fn file_args(
    text: &str,
    env_is_set: impl Fn(&str) -> bool,
) -> Result<Vec<String>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        invalid("--config", format!("not valid TOML: {}", e.message()))
    })?;
    let command = <Args as clap::CommandFactory>::command();
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(key.as_str()) && key != "config")
            .ok_or_else(|| invalid("--config", format!("unknown setting `{key}`")))?;
        if flag
            .get_env()
            .and_then(|env| env.to_str())
            .is_some_and(&env_is_set)
        {
            continue;
        }
        let value = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(n) => n.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => {
                return Err(invalid(
                    "--config",
                    format!("`{key}` must be a string, number or boolean"),
                ));
            }
        };
        args.push(format!("--{key}={value}"));
    }
    Ok(args)
}

/// Parses `500ms`, `20s`, `5m`, `1h 30m`, or `0`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    if value.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(value.trim())
        .map_err(|e| format!("{e} (expected a duration such as 500ms, 20s or 5m)"))
}

/// Parses a byte size: a plain number, or one with a KB/MB/GB or KiB/MiB/GiB suffix.
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| "expected a size such as 256MiB or 1048576".to_string())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| "size too large".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_grpc_is_off_by_default_and_needs_its_secret_file() {
        assert!(args(&[]).unwrap().admin_grpc.is_none());
        let config = args(&[
            "--admin-grpc-listen",
            "127.0.0.1:9002",
            "--admin-token-file",
            "/run/admin",
        ])
        .unwrap();
        let admin = config.admin_grpc.unwrap();
        assert_eq!(admin.listen.port(), 9002);
        assert_eq!(admin.token_file, PathBuf::from("/run/admin"));

        let err = args(&["--admin-grpc-listen", "127.0.0.1:9002"]).unwrap_err();
        assert_eq!(err.flag, "--admin-token-file");
        let err = args(&["--admin-token-file", "/run/admin"]).unwrap_err();
        assert_eq!(err.flag, "--admin-token-file");
        let err = args(&[
            "--admin-grpc-listen",
            "0.0.0.0:9090",
            "--admin-token-file",
            "/run/admin",
        ])
        .unwrap_err();
        assert_eq!(err.flag, "--admin-grpc-listen");
    }

    #[test]
    fn admin_grpc_tls_takes_a_certificate_and_key_and_needs_its_listener() {
        let admin = [
            "--admin-grpc-listen",
            "127.0.0.1:9002",
            "--admin-token-file",
            "/run/admin",
        ];
        let with = |tls: &[&str]| args(&[&admin[..], tls].concat());
        assert!(with(&[]).unwrap().admin_grpc.unwrap().tls.is_none());
        let config = with(&[
            "--admin-grpc-tls-cert",
            "/tls/admin.pem",
            "--admin-grpc-tls-key",
            "/tls/admin.key",
            "--admin-grpc-tls-client-ca",
            "/tls/ca.pem",
        ])
        .unwrap();
        let tls = config.admin_grpc.unwrap().tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/tls/admin.pem"));
        assert_eq!(tls.key, PathBuf::from("/tls/admin.key"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/tls/ca.pem")));
        // The data plane's TLS stays separate.
        assert!(config.grpc_tls.is_none());

        for (tls, flag) in [
            (&["--admin-grpc-tls-cert", "/c"][..], "--admin-grpc-tls-key"),
            (&["--admin-grpc-tls-key", "/k"][..], "--admin-grpc-tls-cert"),
            (
                &["--admin-grpc-tls-client-ca", "/ca"][..],
                "--admin-grpc-tls-client-ca",
            ),
        ] {
            assert_eq!(with(tls).unwrap_err().flag, flag, "{tls:?}");
        }
        let err = args(&["--admin-grpc-tls-cert", "/c", "--admin-grpc-tls-key", "/k"]).unwrap_err();
        assert_eq!(err.flag, "--admin-grpc-tls-cert");
        assert!(err.to_string().contains("--admin-grpc-listen"), "{err}");
    }

    fn args(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec![
            "phantom-authz",
            "--introspection-url",
            "https://idp.example/oauth/v2/oauth-introspect",
            "--client-id",
            "gateway",
            "--client-secret",
            "s3cr3t-value",
        ];
        argv.extend_from_slice(extra);
        Config::from_args(Args::try_parse_from(argv).expect("flags parse"))
    }

    #[test]
    fn defaults_are_production_safe() {
        let config = args(&[]).unwrap();
        assert_eq!(config.grpc_listen.port(), 9001);
        assert_eq!(config.admin_listen.port(), 9090);
        assert_eq!(config.introspection.mode, IntrospectionMode::Jwt);
        assert_eq!(config.introspection.timeout, Duration::from_secs(2));
        assert_eq!(config.check_timeout, Duration::from_secs(1));
        assert_eq!(config.cache.max_ttl, Duration::from_secs(300));
        assert_eq!(config.cache.inactive_ttl, Duration::from_secs(10));
        assert_eq!(config.grpc_limits.max_concurrent_streams, 1024);
        assert_eq!(config.grpc_limits.max_request_bytes, 256 << 10);
        assert_eq!(config.cache.default_ttl, Duration::from_secs(300));
        assert_eq!(config.realm, "api");
        assert!(config.redis.is_none());
    }

    #[test]
    fn config_file_sits_below_environment_and_flags() {
        let file = r#"
            introspection-url = "https://idp.example/introspect"
            client-id = "from-file"
            client-secret = "file-secret"
            local-cache-max-entries = 5000
            redis-timeout = "80ms"
            realm = "from-file"
        "#;
        let env_has_realm = |name: &str| name == "PHANTOM_AUTHZ_REALM";
        let mut argv = vec!["phantom-authz".to_string()];
        argv.extend(file_args(file, env_has_realm).unwrap());
        argv.extend(["--client-id".to_string(), "from-flag".to_string()]);
        let args = Args::try_parse_from(argv).unwrap();
        assert_eq!(args.client_id.as_deref(), Some("from-flag"));
        assert_eq!(args.local_cache_max_entries, 5000);
        assert_eq!(args.redis_timeout, Duration::from_millis(80));
        // The environment's realm wins over the file's: the file's value was left out.
        assert_ne!(args.realm, "from-file");
        let config = Config::from_args(args).unwrap();
        assert!(!format!("{config:?}").contains("file-secret"));
    }

    #[test]
    fn config_file_mistakes_name_the_setting() {
        let no_env = |_: &str| false;
        let err = file_args("introspection_url = \"x\"", no_env).unwrap_err();
        assert!(err.to_string().contains("introspection_url"), "{err}");
        assert!(file_args("realm = [1, 2]", no_env).is_err());
        assert!(file_args("config = \"/etc/other.toml\"", no_env).is_err());
        let err = file_args("client-secret = \"unterminated", no_env).unwrap_err();
        assert_eq!(err.flag, "--config");
        assert!(!err.to_string().contains("unterminated"), "{err}");
    }

    #[test]
    fn durations_take_human_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("64MB"), Ok(64_000_000));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999GiB").is_err());
    }

    #[test]
    fn errors_name_the_flag_and_hide_secrets() {
        let err = args(&["--client-secret-file", "/run/secret"]).unwrap_err();
        assert_eq!(err.flag, "--client-secret");
        assert!(!err.to_string().contains("s3cr3t-value"));

        let err = args(&["--redis-url", "http://cache:6379"]).unwrap_err();
        assert_eq!(err.flag, "--redis-url");

        let err = args(&["--realm", "a\"b"]).unwrap_err();
        assert_eq!(err.flag, "--realm");

        let err = args(&["--introspection-timeout", "0"]).unwrap_err();
        assert_eq!(err.flag, "--introspection-timeout");

        let err = args(&["--grpc-max-request-bytes", "100"]).unwrap_err();
        assert_eq!(err.flag, "--grpc-max-request-bytes");
        let err = args(&["--check-timeout", "0"]).unwrap_err();
        assert_eq!(err.flag, "--check-timeout");
    }

    #[test]
    fn introspection_url_is_checked() {
        for bad in [
            "ftp://idp/introspect",
            "https://",
            "https://user:pw@idp/x",
            "idp/x",
        ] {
            let argv = [
                "phantom-authz",
                "--introspection-url",
                bad,
                "--client-id",
                "gw",
                "--client-secret",
                "x",
            ];
            let err = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap_err();
            assert_eq!(err.flag, "--introspection-url", "{bad}");
        }
    }

    #[test]
    fn otlp_endpoint_is_off_by_default_and_checked() {
        assert_eq!(args(&[]).unwrap().otlp_endpoint, None);
        let config = args(&["--otlp-endpoint", "http://collector:4317"]).unwrap();
        assert_eq!(
            config.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        assert!(args(&["--otlp-endpoint", "https://collector.example:4317"]).is_ok());
        for bad in [
            "collector:4317",
            "grpc://collector:4317",
            "http://",
            "http://u:p@collector:4317",
            "http://collector :4317",
        ] {
            let err = args(&["--otlp-endpoint", bad]).unwrap_err();
            assert_eq!(err.flag, "--otlp-endpoint", "{bad}");
        }
    }

    #[test]
    fn redis_needs_a_cache_secret_file() {
        let err = args(&["--redis-url", "redis://cache:6379"]).unwrap_err();
        assert_eq!(err.flag, "--cache-secret-file");
        assert!(err.to_string().contains("required"), "{err}");
        let err = args(&["--cache-secret-file", "/run/cache-secret"]).unwrap_err();
        assert_eq!(err.flag, "--cache-secret-file");
    }

    #[test]
    fn idp_proxy_is_off_by_default_checked_and_masked() {
        assert!(args(&[]).unwrap().introspection.proxy.is_none());
        let config = args(&["--idp-proxy", "http://proxy.internal:3128"]).unwrap();
        let proxy = config.introspection.proxy.as_ref().unwrap();
        assert_eq!(proxy.expose(), "http://proxy.internal:3128");
        assert!(format!("{config:?}").contains("http://proxy.internal:3128"));

        let config = args(&["--idp-proxy", "https://gw:pr0xy#p/w?d@proxy.internal:3128"]).unwrap();
        let proxy = config.introspection.proxy.as_ref().unwrap();
        assert_eq!(proxy.expose(), "https://gw:pr0xy#p/w?d@proxy.internal:3128");
        let printed = format!("{config:?}");
        assert!(
            printed.contains("https://***@proxy.internal:3128"),
            "{printed}"
        );
        assert!(
            !printed.contains("pr0xy") && !printed.contains("w?d"),
            "{printed}"
        );

        for bad in [
            "proxy.internal:3128",
            "socks5://proxy.internal:1080",
            "http://",
            "http://user:pw@",
            "http://proxy .internal:3128",
        ] {
            let err = args(&["--idp-proxy", bad]).unwrap_err();
            assert_eq!(err.flag, "--idp-proxy", "{bad}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let config = args(&[
            "--redis-url",
            "redis://:hunter2@cache:6379",
            "--cache-secret-file",
            "/run/cache-secret",
        ])
        .unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cr3t-value"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("redis://***@cache:6379"), "{printed}");
        assert_eq!(masked_url("rediss://r:6380/0"), "rediss://r:6380/0");
        assert_eq!(masked_url("redis://u:p@w@r:1/0"), "redis://***@r:1/0");
        for (url, host) in [
            (
                "redis://:pa#ss/wo?rd@host:6379/0",
                "redis://***@host:6379/0",
            ),
            ("rediss://user:p/w@host:6380", "rediss://***@host:6380"),
            ("redis://:p?w#x@host", "redis://***@host"),
            ("redis://:a@b/c?d#e@host:1/2", "redis://***@host:1/2"),
        ] {
            let masked = masked_url(url);
            assert_eq!(masked, host, "{url}");
            for fragment in ["pa#ss", "wo?rd", "p/w", "p?w", "#x", "b/c"] {
                assert!(!masked.contains(fragment), "{url}: {masked}");
            }
        }
    }
}
