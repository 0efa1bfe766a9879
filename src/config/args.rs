//! The flags, as clap parses them: every setting a user can give, with its help text and
//! default. Plain parsing only; [`super::Config::from_args`] validates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::jose::Algorithm;
use crate::route::Unmatched;

/// Command-line flags. Every flag is also read from the environment variable
/// `PHANTOM_AUTHZ_<FLAG>` and, with `--config`, from a TOML file ([`super::load`]); flags win
/// over the environment, which wins over the file.
#[derive(Parser)]
#[command(
    name = "phantom-authz",
    version,
    args_override_self = true,
    about = "Envoy ext_authz service for the phantom token pattern: swaps opaque access tokens \
             for JWTs through OAuth introspection, with a shared Redis cache.",
    after_help = "Every flag is also read from the environment variable PHANTOM_AUTHZ_<FLAG> \
                  (--redis-url: PHANTOM_AUTHZ_REDIS_URL); flags win over the environment, which \
                  wins over --config's file.\n\n\
                  `phantom-authz check-config [FLAGS]` validates the configuration, reads every \
                  file it names, builds every client, prints the effective settings as a \
                  --config file with secrets masked and exits (2 on any problem).\n\n\
                  `phantom-authz check --target HOST:PORT --token TOKEN` sends one Check to a \
                  running service and shows the answer (`phantom-authz check --help`)."
)]
pub struct Args {
    /// TOML file of settings, keyed by flag name without the dashes
    /// (`introspection-url = "https://…"`, `local-cache-max-entries = 50000`).
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Address of the ext_authz gRPC listener (also serves grpc.health.v1).
    #[arg(long, default_value = "0.0.0.0:9001")]
    pub grpc_listen: SocketAddr,

    /// Address of the admin HTTP listener: /metrics, /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Address of the HTTP forward-auth listener (HTTP/1.1 and h2c) for nginx `auth_request`,
    /// Caddy `forward_auth`, Traefik `forwardAuth`, HAProxy and Envoy's `http_service`: every
    /// request to it is a Check. Off unless given.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,

    /// With --http-listen: where the request being checked is described, by the gateway and
    /// never by the client (the gateway must set these headers itself). `x-forwarded`:
    /// X-Forwarded-Method, X-Forwarded-Uri and X-Forwarded-Host (Caddy, Traefik, HAProxy).
    /// `x-original`: X-Original-Method, X-Original-URI and Host (nginx). `path`: the request
    /// itself, after --http-path-prefix (Envoy's `http_service`). The others are ignored.
    #[arg(long, value_enum, default_value = "x-forwarded")]
    pub http_original_request: OriginalRequest,

    /// With --http-original-request path: a prefix the gateway puts before the original path
    /// (Envoy's `http_service.path_prefix`), removed to find it.
    #[arg(long)]
    pub http_path_prefix: Option<String>,

    /// Address of the admin gRPC listener (phantom_authz.admin.v1.Admin: token eviction).
    /// Off unless given; requires --admin-token-file. Keep it off the data-plane network.
    #[arg(long)]
    pub admin_grpc_listen: Option<SocketAddr>,

    /// File holding the bearer secret every admin gRPC call must present as
    /// `authorization: Bearer <secret>` (surrounding whitespace is trimmed; 16 bytes or more).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,

    /// PEM certificate chain for TLS on the admin gRPC listener (with --admin-grpc-tls-key), so
    /// that the admin secret and the tokens to evict do not travel in plaintext.
    #[arg(long)]
    pub admin_grpc_tls_cert: Option<PathBuf>,

    /// PEM private key for TLS on the admin gRPC listener (with --admin-grpc-tls-cert).
    #[arg(long)]
    pub admin_grpc_tls_key: Option<PathBuf>,

    /// PEM CA(s) for admin client certificates: when given, every admin gRPC client must
    /// present a certificate signed by one of them (mTLS), besides the bearer secret.
    #[arg(long)]
    pub admin_grpc_tls_client_ca: Option<PathBuf>,

    /// The identity server's introspection endpoint (http or https). Without it, --issuer's
    /// discovery metadata names it.
    #[arg(long)]
    pub introspection_url: Option<String>,

    /// The identity server's issuer identifier (http or https). At start the service reads its
    /// metadata (OpenID discovery, then RFC 8414) and takes `introspection_endpoint` from it,
    /// unless --introspection-url is given; it retries with backoff and is not ready until then.
    /// Also the audience of `private_key_jwt` client assertions.
    #[arg(long)]
    pub issuer: Option<String>,

    /// PEM file of the CA(s) that sign the IdP's certificate. When given, only these are
    /// trusted for the IdP; otherwise the system's roots are.
    #[arg(long)]
    pub idp_ca_file: Option<PathBuf>,

    /// HTTP(S) proxy through which every call to the identity server goes (http:// or
    /// https://; credentials allowed, `http://user:password@proxy:3128`, and masked wherever
    /// printed). Without it the IdP is called directly: HTTP_PROXY, HTTPS_PROXY, ALL_PROXY and
    /// their lowercase forms are ignored, so the client secret and tokens never take a route
    /// nobody configured for this service.
    #[arg(long)]
    pub idp_proxy: Option<String>,

    /// PEM certificate chain for TLS on the gRPC listener (with --grpc-tls-key).
    #[arg(long)]
    pub grpc_tls_cert: Option<PathBuf>,

    /// PEM private key for TLS on the gRPC listener (with --grpc-tls-cert).
    #[arg(long)]
    pub grpc_tls_key: Option<PathBuf>,

    /// PEM CA(s) for client certificates: when given, every gRPC client (Envoy) must present a
    /// certificate signed by one of them (mTLS).
    #[arg(long)]
    pub grpc_tls_client_ca: Option<PathBuf>,

    /// Client id of the introspecting client.
    #[arg(long)]
    pub client_id: Option<String>,

    /// How the introspecting client authenticates: `client_secret_basic` (HTTP Basic),
    /// `client_secret_post` (in the form body), or `private_key_jwt` (an RFC 7523 assertion
    /// signed with --client-assertion-key-file, fresh for every call).
    #[arg(long, value_enum, default_value = "client_secret_basic")]
    pub client_auth: ClientAuthMethod,

    /// With --client-auth private_key_jwt: PEM PKCS#8 private key (P-256, Ed25519 or RSA) whose
    /// public half the identity server has registered for --client-id. The assertion is signed
    /// ES256, EdDSA or RS256 accordingly, with the key's RFC 7638 thumbprint as `kid`.
    #[arg(long)]
    pub client_assertion_key_file: Option<PathBuf>,

    /// Client secret of the introspecting client. Prefer --client-secret-file.
    #[arg(long)]
    pub client_secret: Option<String>,

    /// File holding the client secret (surrounding whitespace is trimmed).
    #[arg(long)]
    pub client_secret_file: Option<PathBuf>,

    /// `jwt`: ask for `application/jwt`, the JWT is the body (204 means inactive; Curity).
    /// `json`: RFC 7662 JSON whose `jwt` field holds the JWT (Curity). `rfc7662`: plain RFC 7662
    /// JSON from any OAuth server; phantom-authz signs the JWT itself (--jwt-issuer,
    /// --jwt-signing-key-file).
    #[arg(long, value_enum, default_value = "jwt")]
    pub introspection_mode: IntrospectionMode,

    /// rfc7662 mode: the `iss` of the JWTs phantom-authz signs (required in that mode). The APIs
    /// behind the gateway trust this issuer and the keys at the admin listener's
    /// /.well-known/jwks.json.
    #[arg(long)]
    pub jwt_issuer: Option<String>,

    /// rfc7662 mode: the `aud` of JWTs signed from answers that carry none. An answer's own
    /// `aud` is always kept: a token issued for another API is never relabelled for this one.
    #[arg(long)]
    pub jwt_audience: Option<String>,

    /// rfc7662 mode: claims of the introspection answer copied into the JWT as they are
    /// (comma-separated or repeated), e.g. `username,email`. `sub`, `client_id`, `scope`, `aud`,
    /// `exp`, `cnf` and `act` are always carried; `iss`, `iat`, `jti` are phantom-authz's own.
    #[arg(long, value_delimiter = ',', value_name = "CLAIM")]
    pub jwt_forward_claims: Vec<String>,

    /// rfc7662 mode: PEM file of PKCS#8 private keys (P-256, Ed25519 or RSA). The first signs;
    /// every one is published at /.well-known/jwks.json, so a new key can be added second,
    /// rolled out, and moved first once the APIs have fetched it.
    #[arg(long)]
    pub jwt_signing_key_file: Option<PathBuf>,

    /// rfc7662 mode: the signature algorithm; the first key of --jwt-signing-key-file must be
    /// of its type (ES256: P-256, EdDSA: Ed25519, RS256: RSA).
    #[arg(long, value_enum, ignore_case = true, default_value = "ES256")]
    pub jwt_signing_alg: Algorithm,

    /// Bound on one introspection call, connection included. An introspection runs to its end
    /// even when Envoy gives up on the Check that started it (Envoy's ext_authz `timeout`, 200 ms
    /// by default), so that the retry finds the answer cached: keep this above Envoy's timeout
    /// and well below the time a client waits before retrying.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub introspection_timeout: Duration,

    /// Longest a Check waits for its answer (Redis and introspection); past it the Check gets
    /// 503 while the lookup goes on and fills the cache. Bounds callers that set no deadline.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub check_timeout: Duration,

    /// How long a token the IdP called inactive is answered 401 by this replica without asking
    /// the IdP again, so a replayed bad token costs one IdP call per interval. A token the IdP
    /// wrongly calls inactive (replication lag just after issuance) stays refused that long. 0
    /// turns it off.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub inactive_cache_ttl: Duration,

    /// Most introspection calls under way at once; excess Checks get 503 at once.
    #[arg(long, default_value_t = 256)]
    pub max_concurrent_introspections: usize,

    /// Consecutive IdP failures (unreachable, timeout, 5xx, garbage) that open the circuit
    /// breaker, after which Checks needing introspection fail fast with 503. 0 disables it.
    #[arg(long, default_value_t = 5)]
    pub circuit_failure_threshold: u32,

    /// How long an open circuit fails fast before one probe call is let through.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub circuit_open_duration: Duration,

    /// Shared cache (redis:// or rediss://). Without it the in-process cache serves alone. With
    /// --redis-mode cluster or sentinel, a comma-separated list of nodes, all of one scheme
    /// (`redis://:pw@10.0.0.1:6379,redis://:pw@10.0.0.2:6379`).
    #[arg(long)]
    pub redis_url: Option<String>,

    /// How Redis is deployed. `standalone`: --redis-url is the one server (or a managed
    /// endpoint that is not in cluster mode). `cluster`: Redis Cluster; --redis-url lists seed
    /// nodes (name several), the rest are discovered, and slot moves and failovers are followed.
    /// `sentinel`: --redis-url lists the Sentinels and --redis-sentinel-master names the master
    /// they watch, which is found again after a failover; the URLs' credentials, database and
    /// TLS serve both the Sentinels and the master.
    #[arg(long, value_enum, default_value = "standalone")]
    pub redis_mode: RedisMode,

    /// With --redis-mode sentinel: the name the Sentinels monitor the master under (`sentinel
    /// monitor <name> …` in their configuration).
    #[arg(long)]
    pub redis_sentinel_master: Option<String>,

    /// File of the secrets that Redis entries are bound to: one per line, 32 bytes or more
    /// each (`head -c 32 /dev/urandom | base64`). Required with --redis-url. The first names
    /// and seals new entries; every line is tried when reading, so a new secret can be put
    /// first and the old one dropped later, without a flush. Replicas share entries only when
    /// they share a secret; without it, anyone who can write to Redis could forge an allow.
    #[arg(long)]
    pub cache_secret_file: Option<PathBuf>,

    /// PEM CA(s) that sign Redis's certificate, for rediss:// URLs (default: system roots).
    #[arg(long)]
    pub redis_ca_file: Option<PathBuf>,

    /// Bound on one Redis command; on expiry the Check falls back to introspection.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,

    /// Cache TTL when the identity server sends no Cache-Control max-age.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub default_cache_ttl: Duration,

    /// No cached allow lives longer than this, whatever the identity server's max-age or
    /// --default-cache-ttl say: it bounds how long a token revoked without an eviction keeps
    /// working.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub max_cache_ttl: Duration,

    /// Longest time an in-process entry is trusted before Redis is asked again (with
    /// --redis-url); bounds how long another replica's eviction takes to show. 0 turns the
    /// in-process tier off when Redis is configured.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub local_cache_ttl: Duration,

    /// Most entries held in the in-process cache.
    #[arg(long, default_value_t = 100_000)]
    pub local_cache_max_entries: usize,

    /// Most JWT bytes held in the in-process cache (e.g. 256MiB, 64MB, 1048576).
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    pub local_cache_max_bytes: u64,

    /// Most concurrent Checks on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, default_value_t = 1024)]
    pub grpc_max_concurrent_streams: u32,

    /// Largest CheckRequest accepted (e.g. 256KiB). A request without a body is a few KiB up to
    /// Envoy's header limit (60 KiB by default); raise this if Envoy sends request bodies
    /// (`with_request_body`).
    #[arg(long, default_value = "256KiB", value_parser = parse_bytes)]
    pub grpc_max_request_bytes: u64,

    /// Longest access token accepted; longer ones are rejected without calling the IdP.
    #[arg(long, default_value_t = 4096)]
    pub max_token_length: usize,

    /// Realm announced in `WWW-Authenticate`.
    #[arg(long, default_value = "api")]
    pub realm: String,

    /// A claim set as a request header on every allow, `CLAIM=HEADER` (claims: sub, client_id,
    /// scope, aud), e.g. `sub=x-user-id`; comma-separated or repeated. A client's own copy of
    /// such a header is always removed.
    #[arg(long, value_delimiter = ',', value_name = "CLAIM=HEADER")]
    pub claim_header: Vec<String>,

    /// What a request that no `[[route]]` rule of the config file matches needs: `allow`, an
    /// active token alone; `deny`, nothing lets it through (403). Envoy's per-route
    /// `required_scopes`/`required_audience` context extensions override the table.
    #[arg(long, value_enum, default_value = "allow")]
    pub unmatched_routes: Unmatched,

    /// How long in-flight Checks may take to finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Log line format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// OTLP/gRPC collector to export OpenTelemetry traces to (http:// or https://, e.g.
    /// http://otel-collector:4317): a span per Check, continuing the caller's W3C
    /// `traceparent`. Off unless given. The standard OTEL_BSP_* and OTEL_TRACES_SAMPLER
    /// variables tune batching and sampling.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
}

/// Which headers of a forward-auth request describe the request being checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OriginalRequest {
    /// X-Forwarded-Method, X-Forwarded-Uri, X-Forwarded-Host.
    XForwarded,
    /// X-Original-Method, X-Original-URI, Host.
    XOriginal,
    /// The forward-auth request's own method, path (after the prefix) and Host.
    Path,
}

/// How Redis is deployed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RedisMode {
    /// One server.
    Standalone,
    /// Redis Cluster, through seed nodes.
    Cluster,
    /// A master and its replicas watched by Sentinels.
    Sentinel,
}

/// How the identity server is asked for the JWT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IntrospectionMode {
    /// `Accept: application/jwt`; 200 carries the JWT, 204 means inactive.
    Jwt,
    /// `Accept: application/json`; RFC 7662 JSON with `active` and `jwt`.
    Json,
    /// `Accept: application/json`; plain RFC 7662 JSON, and phantom-authz signs the JWT.
    Rfc7662,
}

/// How the introspecting client authenticates to the identity server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ClientAuthMethod {
    /// `Authorization: Basic` with the client id and secret (RFC 6749 §2.3.1).
    #[value(name = "client_secret_basic")]
    SecretBasic,
    /// `client_id` and `client_secret` in the form body (RFC 6749 §2.3.1).
    #[value(name = "client_secret_post")]
    SecretPost,
    /// A signed JWT assertion (RFC 7523 §2.2), fresh for every call.
    #[value(name = "private_key_jwt")]
    PrivateKeyJwt,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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
