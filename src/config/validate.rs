//! From parsed flags to a validated [`Config`]: each section checked on its own, every problem
//! named by its flag, no secret value in any message. No I/O.

use std::path::PathBuf;
use std::time::Duration;

use super::*;

impl Config {
    /// Validates parsed flags. Missing required flags are reported together, in one message.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        required(&args)?;
        let introspection = introspection(&args)?;
        let redis = redis(&args)?;
        let admin_grpc = admin_grpc(&args)?;
        let http = http(&args)?;
        let grpc_tls = tls_files(
            GRPC_TLS_FLAGS,
            args.grpc_tls_cert,
            args.grpc_tls_key,
            args.grpc_tls_client_ca,
        )?;
        above_zero("--check-timeout", args.check_timeout)?;
        above_zero("--max-cache-ttl", args.max_cache_ttl)?;
        at_least_one(
            "--grpc-max-concurrent-streams",
            args.grpc_max_concurrent_streams.into(),
        )?;
        let max_request_bytes = usize::try_from(args.grpc_max_request_bytes)
            .ok()
            .filter(|bytes| (1024..=64 << 20).contains(bytes))
            .ok_or_else(|| invalid("--grpc-max-request-bytes", "must be between 1KiB and 64MiB"))?;
        if args.local_cache_max_entries == 0 {
            return Err(invalid(
                "--local-cache-max-entries",
                "must be at least 1 (use --local-cache-ttl 0 to turn the tier off)",
            ));
        }
        at_least_one("--max-token-length", args.max_token_length as u64)?;
        validate_realm(&args.realm)?;
        let claim_headers = claim_headers(&args.claim_header)?;
        let otlp_endpoint = args
            .otlp_endpoint
            .map(|url| http_url("--otlp-endpoint", &url, Credentials::Refused).map(|()| url))
            .transpose()?;

        Ok(Config {
            grpc_listen: args.grpc_listen,
            grpc_tls,
            admin_listen: args.admin_listen,
            admin_grpc,
            http,
            introspection,
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
            claim_headers,
            routes: RouteTable {
                rules: Vec::new(),
                unmatched: args.unmatched_routes,
            },
            shutdown_grace: args.shutdown_grace,
            log_format: args.log_format,
            otlp_endpoint,
        })
    }
}

/// The flags without which nothing can start, all named at once when missing.
fn required(args: &Args) -> Result<(), ConfigError> {
    let missing: Vec<(&'static str, &'static str)> = [
        (
            "--introspection-url",
            " (or --issuer)",
            args.introspection_url.is_none() && args.issuer.is_none(),
        ),
        (
            "--client-id",
            "",
            args.client_id.as_deref().is_none_or(str::is_empty),
        ),
        (
            "--client-secret",
            " (or --client-secret-file)",
            args.client_auth != ClientAuthMethod::PrivateKeyJwt
                && args.client_secret.is_none()
                && args.client_secret_file.is_none(),
        ),
    ]
    .into_iter()
    .filter_map(|(flag, or, absent)| absent.then_some((flag, or)))
    .collect();
    match missing.as_slice() {
        [] => Ok(()),
        [(flag, or)] => Err(invalid(flag, format!("is required{or}"))),
        [(first, _), ..] => Err(invalid(
            first,
            format!(
                "required flags are missing: {}",
                missing
                    .iter()
                    .map(|(flag, or)| format!("{flag}{or}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

fn introspection(args: &Args) -> Result<IntrospectionConfig, ConfigError> {
    if let Some(url) = &args.introspection_url {
        http_url("--introspection-url", url, Credentials::Refused)?;
    }
    if let Some(issuer) = &args.issuer {
        http_url("--issuer", issuer, Credentials::Refused)?;
    }
    let endpoint = match (&args.introspection_url, &args.issuer) {
        (Some(url), _) => Endpoint::Url(url.clone()),
        (None, Some(issuer)) => Endpoint::Discover {
            issuer: issuer.clone(),
        },
        (None, None) => return Err(invalid("--introspection-url", "is required (or --issuer)")),
    };
    let client_id = args.client_id.clone().unwrap_or_default();
    let client_auth = client_auth(args, &client_id)?;
    let plain_http = match &endpoint {
        Endpoint::Url(url) => url.starts_with("http://"),
        Endpoint::Discover { issuer } => issuer.starts_with("http://"),
    };
    if args.idp_ca_file.is_some() && plain_http {
        return Err(invalid(
            "--idp-ca-file",
            "needs an https:// --introspection-url (or --issuer)",
        ));
    }
    let proxy = args
        .idp_proxy
        .as_ref()
        .map(|url| {
            http_url("--idp-proxy", url, Credentials::Allowed)
                .map(|()| ProxyUrl(Secret::new(url.as_str())))
        })
        .transpose()?;
    above_zero("--introspection-timeout", args.introspection_timeout)?;
    at_least_one(
        "--max-concurrent-introspections",
        args.max_concurrent_introspections as u64,
    )?;
    if args.circuit_failure_threshold > 0 {
        above_zero("--circuit-open-duration", args.circuit_open_duration)?;
    }
    Ok(IntrospectionConfig {
        endpoint,
        issuer: args.issuer.clone(),
        ca_file: args.idp_ca_file.clone(),
        proxy,
        client_id,
        client_auth,
        mode: args.introspection_mode,
        mint: mint(args)?,
        timeout: args.introspection_timeout,
        guard: GuardConfig {
            max_concurrent: args.max_concurrent_introspections,
            failure_threshold: args.circuit_failure_threshold,
            open_for: args.circuit_open_duration,
        },
    })
}

/// The introspecting client's credential: a secret (Basic or in the body) or a key.
fn client_auth(args: &Args, client_id: &str) -> Result<ClientAuthConfig, ConfigError> {
    if args.client_auth == ClientAuthMethod::PrivateKeyJwt {
        for (flag, given) in [
            ("--client-secret", args.client_secret.is_some()),
            ("--client-secret-file", args.client_secret_file.is_some()),
        ] {
            if given {
                return Err(invalid(
                    flag,
                    "has no use with --client-auth private_key_jwt",
                ));
            }
        }
        let key_file = args.client_assertion_key_file.clone().ok_or_else(|| {
            invalid(
                "--client-assertion-key-file",
                "is required with --client-auth private_key_jwt",
            )
        })?;
        return Ok(ClientAuthConfig::PrivateKeyJwt { key_file });
    }
    if args.client_assertion_key_file.is_some() {
        return Err(invalid(
            "--client-assertion-key-file",
            "has no use without --client-auth private_key_jwt",
        ));
    }
    if args.client_auth == ClientAuthMethod::SecretBasic && client_id.contains(':') {
        // RFC 6749 §2.3.1 form-encodes the id, but ids almost never contain ':' and a colon
        // here is almost always a pasted "id:secret" pair.
        return Err(invalid("--client-id", "must not contain ':'"));
    }
    let secret = match (&args.client_secret, &args.client_secret_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "--client-secret",
                "give either --client-secret or --client-secret-file, not both",
            ));
        }
        (Some(secret), None) if secret.is_empty() => {
            return Err(invalid("--client-secret", "must not be empty"));
        }
        (Some(secret), None) => SecretSource::Value(Secret::new(secret.as_str())),
        (None, Some(path)) => SecretSource::File(path.clone()),
        (None, None) => {
            return Err(invalid(
                "--client-secret",
                "is required (or --client-secret-file)",
            ));
        }
    };
    Ok(match args.client_auth {
        ClientAuthMethod::SecretPost => ClientAuthConfig::SecretPost(secret),
        _ => ClientAuthConfig::SecretBasic(secret),
    })
}

/// Claims phantom-authz sets itself in the JWTs it signs, which no answer may override.
const OWN_CLAIMS: &[&str] = &[
    "iss",
    "sub",
    "aud",
    "exp",
    "iat",
    "jti",
    "client_id",
    "scope",
];

/// rfc7662 mode's signing settings; in the other modes, none of its flags may be given.
fn mint(args: &Args) -> Result<Option<MintConfig>, ConfigError> {
    if args.introspection_mode != IntrospectionMode::Rfc7662 {
        for (flag, given) in [
            ("--jwt-issuer", args.jwt_issuer.is_some()),
            ("--jwt-audience", args.jwt_audience.is_some()),
            ("--jwt-forward-claims", !args.jwt_forward_claims.is_empty()),
            (
                "--jwt-signing-key-file",
                args.jwt_signing_key_file.is_some(),
            ),
        ] {
            if given {
                return Err(invalid(
                    flag,
                    "has no use without --introspection-mode rfc7662 (the identity server signs \
                     the JWT in the other modes)",
                ));
            }
        }
        return Ok(None);
    }
    let text = |flag: &'static str,
                value: &Option<String>|
     -> Result<Option<String>, ConfigError> {
        match value {
            Some(value) if value.is_empty() || value.chars().any(char::is_control) => Err(invalid(
                flag,
                "must be a non-empty string without control characters",
            )),
            other => Ok(other.clone()),
        }
    };
    let issuer = text("--jwt-issuer", &args.jwt_issuer)?.ok_or_else(|| {
        invalid(
            "--jwt-issuer",
            "is required with --introspection-mode rfc7662: the `iss` of the JWTs phantom-authz \
             signs",
        )
    })?;
    let audience = text("--jwt-audience", &args.jwt_audience)?;
    let key_file = args.jwt_signing_key_file.clone().ok_or_else(|| {
        invalid(
            "--jwt-signing-key-file",
            "is required with --introspection-mode rfc7662: a PEM PKCS#8 private key \
             (`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out jwt-key.pem`)",
        )
    })?;
    let mut forward_claims: Vec<String> = Vec::new();
    for claim in args.jwt_forward_claims.iter().map(|c| c.trim()) {
        if claim.is_empty() || claim.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid(
                "--jwt-forward-claims",
                "a claim name is empty or has spaces",
            ));
        }
        if OWN_CLAIMS.contains(&claim) {
            return Err(invalid(
                "--jwt-forward-claims",
                format!("`{claim}` is always set by phantom-authz itself"),
            ));
        }
        if !forward_claims.iter().any(|c| c == claim) {
            forward_claims.push(claim.to_owned());
        }
    }
    Ok(Some(MintConfig {
        issuer,
        audience,
        forward_claims,
        key_file,
        algorithm: args.jwt_signing_alg,
    }))
}

fn redis(args: &Args) -> Result<Option<RedisConfig>, ConfigError> {
    let Some(list) = &args.redis_url else {
        if args.redis_mode != RedisMode::Standalone {
            return Err(invalid("--redis-mode", "has no use without --redis-url"));
        }
        if args.cache_secret_file.is_some() {
            return Err(invalid(
                "--cache-secret-file",
                "has no use without --redis-url",
            ));
        }
        if args.redis_sentinel_master.is_some() {
            return Err(invalid(
                "--redis-sentinel-master",
                "has no use without --redis-url",
            ));
        }
        return Ok(None);
    };
    let urls = redis_urls(list)?;
    let topology = match (args.redis_mode, &args.redis_sentinel_master) {
        (RedisMode::Standalone, _) if urls.len() > 1 => {
            return Err(invalid(
                "--redis-url",
                format!(
                    "lists {} URLs, but --redis-mode standalone takes one server (a list is \
                     for --redis-mode cluster or sentinel)",
                    urls.len()
                ),
            ));
        }
        (RedisMode::Standalone | RedisMode::Cluster, Some(_)) => {
            return Err(invalid(
                "--redis-sentinel-master",
                "needs --redis-mode sentinel",
            ));
        }
        (RedisMode::Standalone, None) => RedisTopology::Standalone,
        (RedisMode::Cluster, None) => RedisTopology::Cluster,
        (RedisMode::Sentinel, None) => {
            return Err(invalid(
                "--redis-sentinel-master",
                "is required with --redis-mode sentinel: the name the Sentinels monitor the \
                 master under",
            ));
        }
        (RedisMode::Sentinel, Some(master)) => {
            if master.is_empty() || !master.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "--redis-sentinel-master",
                    "must be a name of printable ASCII without spaces",
                ));
            }
            RedisTopology::Sentinel {
                master: master.clone(),
            }
        }
    };
    above_zero("--redis-timeout", args.redis_timeout)?;
    if args.redis_ca_file.is_some() && !list.trim_start().starts_with("rediss://") {
        return Err(invalid("--redis-ca-file", "needs a rediss:// --redis-url"));
    }
    let secret_file = args.cache_secret_file.clone().ok_or_else(|| {
        invalid(
            "--cache-secret-file",
            "is required with --redis-url: a file of one or more secrets of 32 bytes or more, \
             one per line, shared by the replicas that share Redis \
             (`head -c 32 /dev/urandom | base64 > cache-secret`)",
        )
    })?;
    Ok(Some(RedisConfig {
        urls,
        topology,
        ca_file: args.redis_ca_file.clone(),
        secret_file,
        timeout: args.redis_timeout,
    }))
}

/// The URLs of `--redis-url`: each a redis:// or rediss:// URL that parses, all of one scheme.
/// Errors say which URL, by its place in the list, never what it holds.
fn redis_urls(list: &str) -> Result<Vec<Secret>, ConfigError> {
    let urls = split_urls(list);
    let several = urls.len() > 1;
    let which = |n: usize| {
        if several {
            format!("URL {} of the list", n + 1)
        } else {
            "the URL".to_owned()
        }
    };
    let scheme = |url: &str| url.split_once("://").map(|(scheme, _)| scheme.to_owned());
    let first = scheme(urls[0]);
    for (n, url) in urls.iter().enumerate() {
        if url.is_empty() {
            return Err(invalid("--redis-url", format!("{} is empty", which(n))));
        }
        let scheme = scheme(url);
        if !matches!(scheme.as_deref(), Some("redis" | "rediss")) {
            return Err(invalid(
                "--redis-url",
                format!("{} must start with redis:// or rediss://", which(n)),
            ));
        }
        if scheme != first {
            return Err(invalid(
                "--redis-url",
                "mixes redis:// and rediss://: every node must be reached the same way",
            ));
        }
        if redis::IntoConnectionInfo::into_connection_info(*url).is_err() {
            return Err(invalid(
                "--redis-url",
                format!(
                    "{} is not a valid redis:// or rediss:// URL (a list separates URLs with \
                     commas, each starting with redis:// or rediss://)",
                    which(n)
                ),
            ));
        }
    }
    Ok(urls.into_iter().map(Secret::new).collect())
}

fn http(args: &Args) -> Result<Option<HttpConfig>, ConfigError> {
    let Some(listen) = args.http_listen else {
        if args.http_path_prefix.is_some() {
            return Err(invalid(
                "--http-path-prefix",
                "has no use without --http-listen",
            ));
        }
        return Ok(None);
    };
    if listen.port() != 0
        && [
            Some(args.grpc_listen),
            Some(args.admin_listen),
            args.admin_grpc_listen,
        ]
        .contains(&Some(listen))
    {
        return Err(invalid(
            "--http-listen",
            "must differ from the other listeners",
        ));
    }
    let path_prefix = match args.http_path_prefix.as_deref() {
        None => None,
        Some(prefix)
            if prefix.starts_with('/')
                && prefix.len() > 1
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#') =>
        {
            Some(prefix.trim_end_matches('/').to_owned())
        }
        Some(_) => {
            return Err(invalid(
                "--http-path-prefix",
                "must be a path such as /authz (starting with /, no query)",
            ));
        }
    };
    if path_prefix.is_some() && args.http_original_request != OriginalRequest::Path {
        return Err(invalid(
            "--http-path-prefix",
            "needs --http-original-request path",
        ));
    }
    Ok(Some(HttpConfig {
        listen,
        original: args.http_original_request,
        path_prefix,
    }))
}

fn admin_grpc(args: &Args) -> Result<Option<AdminGrpcConfig>, ConfigError> {
    let tls = tls_files(
        ADMIN_GRPC_TLS_FLAGS,
        args.admin_grpc_tls_cert.clone(),
        args.admin_grpc_tls_key.clone(),
        args.admin_grpc_tls_client_ca.clone(),
    )?;
    if tls.is_some() && args.admin_grpc_listen.is_none() {
        return Err(invalid(
            "--admin-grpc-tls-cert",
            "has no use without --admin-grpc-listen",
        ));
    }
    match (args.admin_grpc_listen, &args.admin_token_file) {
        (Some(listen), Some(_))
            if listen.port() != 0
                && (listen == args.grpc_listen || listen == args.admin_listen) =>
        {
            Err(invalid(
                "--admin-grpc-listen",
                "must differ from --grpc-listen and --admin-listen",
            ))
        }
        (Some(listen), Some(token_file)) => Ok(Some(AdminGrpcConfig {
            listen,
            token_file: token_file.clone(),
            tls,
        })),
        (Some(_), None) => Err(invalid(
            "--admin-token-file",
            "is required with --admin-grpc-listen",
        )),
        (None, Some(_)) => Err(invalid(
            "--admin-token-file",
            "has no use without --admin-grpc-listen",
        )),
        (None, None) => Ok(None),
    }
}

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

/// Whether a URL may carry `user:password@`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Credentials {
    /// Refused: the introspection URL has flags for its credentials, the collector none.
    Refused,
    /// Allowed (a proxy's), and then they may hold '/', '?' or '#'.
    Allowed,
}

/// An `http://` or `https://` URL with a host and no whitespace. Problems are described without
/// echoing the URL, which may hold a password.
fn http_url(flag: &'static str, url: &str, credentials: Credentials) -> Result<(), ConfigError> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| invalid(flag, "must start with http:// or https://"))?;
    let after = match credentials {
        // The host follows the last '@'.
        Credentials::Allowed => rest.rsplit_once('@').map_or(rest, |(_, host)| host),
        Credentials::Refused => rest,
    };
    let authority = after.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.is_empty() {
        return Err(invalid(flag, "has no host"));
    }
    if credentials == Credentials::Refused && authority.contains('@') {
        return Err(invalid(
            flag,
            if flag == "--introspection-url" {
                "must not carry credentials; use --client-id and --client-secret"
            } else {
                "must not carry credentials"
            },
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(flag, "contains whitespace"));
    }
    Ok(())
}

/// `CLAIM=HEADER` pairs: a known claim, a lower-case header name that is not one the gateway or
/// HTTP itself depends on, each header once.
fn claim_headers(pairs: &[String]) -> Result<Vec<(ClaimName, String)>, ConfigError> {
    const FLAG: &str = "--claim-header";
    const RESERVED: &[&str] = &[
        "authorization",
        "proxy-authorization",
        "host",
        "cookie",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ];
    let mut headers: Vec<(ClaimName, String)> = Vec::new();
    for pair in pairs.iter().filter(|p| !p.trim().is_empty()) {
        let (claim, header) = pair
            .split_once('=')
            .ok_or_else(|| invalid(FLAG, format!("`{pair}` is not CLAIM=HEADER")))?;
        let claim = <ClaimName as clap::ValueEnum>::from_str(claim.trim(), true).map_err(|_| {
            invalid(
                FLAG,
                format!(
                    "unknown claim `{}` (sub, client_id, scope, aud)",
                    claim.trim()
                ),
            )
        })?;
        let header = header.trim().to_ascii_lowercase();
        let token = !header.is_empty()
            && header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !token || RESERVED.contains(&header.as_str()) || header.starts_with("x-envoy-") {
            return Err(invalid(
                FLAG,
                format!(
                    "`{header}` cannot carry a claim (a plain header name, not one HTTP or the gateway relies on)"
                ),
            ));
        }
        if headers.iter().any(|(_, existing)| *existing == header) {
            return Err(invalid(FLAG, format!("`{header}` is named twice")));
        }
        headers.push((claim, header));
    }
    Ok(headers)
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

fn above_zero(flag: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(flag, "must be above zero"));
    }
    Ok(())
}

fn at_least_one(flag: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(flag, "must be at least 1"));
    }
    Ok(())
}
