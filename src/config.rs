//! The service's configuration: [`args`] parses flags, [`load`] merges the environment and the
//! `--config` file beneath them, and validation turns them into the plain types below. Secrets
//! are typed as secrets. No I/O happens here.

pub mod args;
pub mod load;
mod validate;

pub use args::{
    Args, ClientAuthMethod, IntrospectionMode, LogFormat, OriginalRequest, RedisMode, parse_bytes,
    parse_duration,
};

use crate::decision::ClaimName;
use crate::route::RouteTable;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// The HTTP forward-auth listener, when there is one.
    pub http: Option<HttpConfig>,
    pub introspection: IntrospectionConfig,
    pub cache: CacheConfig,
    pub redis: Option<RedisConfig>,
    pub max_token_length: usize,
    /// Longest a Check waits for its answer.
    pub check_timeout: Duration,
    pub grpc_limits: GrpcLimits,
    pub realm: String,
    /// Claims set as request headers on every allow.
    pub claim_headers: Vec<(ClaimName, String)>,
    /// What each route requires; its rules come from the `--config` file.
    pub routes: RouteTable,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// Where traces go; `None`: no exporter, spans stay disabled.
    pub otlp_endpoint: Option<String>,
}

/// The HTTP forward-auth front door.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Where the request being checked is described.
    pub original: OriginalRequest,
    /// Removed from the request path to find the path being checked (with `Path`).
    pub path_prefix: Option<String>,
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

/// Everything the introspection client needs except the files' contents.
#[derive(Debug)]
pub struct IntrospectionConfig {
    /// Where the endpoint is, or how to find it.
    pub endpoint: Endpoint,
    /// The issuer identifier (`--issuer`), when given.
    pub issuer: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// The proxy for every IdP call; `None`: direct, whatever the environment says.
    pub proxy: Option<ProxyUrl>,
    pub client_id: String,
    pub client_auth: ClientAuthConfig,
    pub mode: IntrospectionMode,
    /// rfc7662 mode's JWT signing; `None` in the other modes.
    pub mint: Option<MintConfig>,
    pub timeout: Duration,
    pub guard: GuardConfig,
}

/// The introspection endpoint: given, or read from the issuer's metadata at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Url(String),
    Discover { issuer: String },
}

/// How the introspecting client authenticates, and where its credential is.
#[derive(Debug)]
pub enum ClientAuthConfig {
    SecretBasic(SecretSource),
    SecretPost(SecretSource),
    PrivateKeyJwt { key_file: PathBuf },
}

/// rfc7662 mode: the JWT phantom-authz signs from each active introspection answer.
#[derive(Debug, Clone)]
pub struct MintConfig {
    pub issuer: String,
    /// Replaces the answer's `aud` when given.
    pub audience: Option<String>,
    /// Claims of the answer copied as they are.
    pub forward_claims: Vec<String>,
    pub key_file: PathBuf,
    pub algorithm: crate::jose::Algorithm,
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
    /// The server; in cluster mode the seed nodes, in sentinel mode the Sentinels. One scheme
    /// throughout.
    pub urls: Vec<Secret>,
    pub topology: RedisTopology,
    pub ca_file: Option<PathBuf>,
    /// `--cache-secret-file`, read at start-up.
    pub secret_file: PathBuf,
    pub timeout: Duration,
}

/// How Redis is deployed, with what each kind needs besides the URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTopology {
    Standalone,
    Cluster,
    /// Sentinels watching the master named `master`.
    Sentinel {
        master: String,
    },
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| masked_url(u.expose())).collect();
        f.debug_struct("RedisConfig")
            .field("urls", &urls)
            .field("topology", &self.topology)
            .field("ca_file", &self.ca_file)
            .field("secret_file", &self.secret_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A URL with any userinfo (`user:password@`) replaced by `***@`: everything between `://` and
/// the last `@`, so that a password holding `/`, `?`, `#` or `@` is masked whole. An `@` later
/// in the URL masks more than needed, never less.
pub(crate) fn masked_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_string();
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The URLs of a comma-separated `--redis-url` list. A comma ends a URL only where the next
/// one begins (`redis://` or `rediss://`, blanks allowed before it), so that a password
/// holding a comma is never split, nor left unmasked by [`masked_urls`].
pub(crate) fn split_urls(list: &str) -> Vec<&str> {
    let mut urls = Vec::new();
    let mut start = 0;
    for (comma, _) in list.match_indices(',') {
        let next = list[comma + 1..].trim_start();
        if comma >= start && (next.starts_with("redis://") || next.starts_with("rediss://")) {
            urls.push(list[start..comma].trim());
            start = list.len() - next.len();
        }
    }
    urls.push(list[start..].trim());
    urls
}

/// A `--redis-url` list with each URL's userinfo masked, as [`masked_url`] does for one.
pub(crate) fn masked_urls(list: &str) -> String {
    split_urls(list)
        .into_iter()
        .map(masked_url)
        .collect::<Vec<_>>()
        .join(",")
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

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

    /// Loads with an environment of `env` and a file system holding only `/etc/pa.toml`.
    fn load_with(
        argv: &[&str],
        env: &[(&str, &str)],
        file: &str,
    ) -> Result<Config, load::LoadError> {
        let env: std::collections::HashMap<String, std::ffi::OsString> =
            env.iter().map(|(k, v)| (k.to_string(), v.into())).collect();
        let argv = std::iter::once("phantom-authz")
            .chain(argv.iter().copied())
            .map(Into::into)
            .collect();
        load::load(argv, &|name| env.get(name).cloned(), &|path| {
            if path == std::path::Path::new("/etc/pa.toml") {
                Ok(file.to_owned())
            } else {
                Err(std::io::ErrorKind::NotFound.into())
            }
        })
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
        let config = load_with(
            &["--config", "/etc/pa.toml", "--client-id", "from-flag"],
            &[
                ("PHANTOM_AUTHZ_REALM", "from-env"),
                ("PHANTOM_AUTHZ_CLIENT_ID", "from-env"),
            ],
            file,
        )
        .unwrap();
        assert_eq!(config.introspection.client_id, "from-flag");
        assert_eq!(config.cache.local_max_entries, 5000);
        assert_eq!(config.realm, "from-env");
        assert!(!format!("{config:?}").contains("file-secret"));

        // The file may be named by the environment too; an empty variable counts as unset.
        let config = load_with(
            &[],
            &[
                ("PHANTOM_AUTHZ_CONFIG", "/etc/pa.toml"),
                ("PHANTOM_AUTHZ_REALM", ""),
            ],
            file,
        )
        .unwrap();
        assert_eq!(config.introspection.client_id, "from-file");
        assert_eq!(config.realm, "from-file");
        let err = load_with(&["--config", "/etc/missing.toml"], &[], file).unwrap_err();
        assert!(
            err.to_string().starts_with("--config: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn missing_required_flags_are_named_together() {
        let err = load_with(&[], &[], "").unwrap_err().to_string();
        assert!(
            err.contains("--introspection-url")
                && err.contains("--client-id")
                && err.contains("--client-secret"),
            "{err}"
        );
        let err = load_with(&["--client-id", "gw", "--client-secret", "x"], &[], "")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "--introspection-url: is required (or --issuer)");
    }

    #[test]
    fn every_flag_has_its_environment_variable() {
        let config = load_with(
            &[],
            &[
                ("PHANTOM_AUTHZ_INTROSPECTION_URL", "https://idp.example/i"),
                ("PHANTOM_AUTHZ_CLIENT_ID", "gw"),
                ("PHANTOM_AUTHZ_CLIENT_SECRET", "s3cr3t-value"),
                ("PHANTOM_AUTHZ_MAX_CACHE_TTL", "90s"),
            ],
            "",
        )
        .unwrap();
        assert_eq!(config.cache.max_ttl, Duration::from_secs(90));
        assert_eq!(
            load::env_var("local-cache-max-bytes"),
            "PHANTOM_AUTHZ_LOCAL_CACHE_MAX_BYTES"
        );
    }

    #[test]
    fn config_file_mistakes_name_the_setting() {
        use load::file_settings;
        let err = file_settings("introspection_url = \"x\"").unwrap_err();
        assert!(err.to_string().contains("introspection_url"), "{err}");
        assert!(file_settings("realm = [1, 2]").is_err());
        assert!(file_settings("config = \"/etc/other.toml\"").is_err());
        let err = file_settings("client-secret = \"unterminated").unwrap_err();
        assert_eq!(err.flag, "--config");
        assert!(!err.to_string().contains("unterminated"), "{err}");
    }

    #[test]
    fn the_route_table_is_read_in_order_and_checked() {
        use crate::route::{PathMatch, Unmatched};
        let file = r#"
            introspection-url = "https://idp.example/introspect"
            client-id = "gw"
            client-secret = "s3cr3t-value"
            unmatched-routes = "deny"

            [[route]]
            path-prefix = "/orders"
            methods = ["post", "PUT"]
            scopes = "orders:write orders:read"

            [[route]]
            host = "admin.example"
            audience = "admin-api"
            scopes = ["admin"]
        "#;
        let config = load_with(&["--config", "/etc/pa.toml"], &[], file).unwrap();
        assert_eq!(config.routes.unmatched, Unmatched::Deny);
        assert_eq!(config.routes.rules.len(), 2);
        let first = &config.routes.rules[0];
        assert_eq!(first.path, PathMatch::Prefix("/orders".into()));
        assert_eq!(first.methods, ["POST", "PUT"]);
        assert_eq!(first.scopes, ["orders:write", "orders:read"]);
        assert_eq!(
            config.routes.rules[1].audience.as_deref(),
            Some("admin-api")
        );
        // Printed back, the rules read the same.
        let printed: String = config.routes.rules.iter().map(load::rule_toml).collect();
        let (_, again) = load::file_settings(&printed).unwrap();
        assert_eq!(again, config.routes.rules);

        for (bad, says) in [
            ("[[route]]\npath = \"orders\"", "must start with /"),
            ("[[route]]\npath = \"/a\"\npath-prefix = \"/b\"", "not both"),
            ("[[route]]\nscopes = \"a \\\"b\\\"\"", "scope tokens"),
            ("[[route]]\nmethod = [\"GET\"]", "unknown key `method`"),
            ("[[route]]\naudience = \"a b\"", "audience"),
            ("route = 1", "array of tables"),
        ] {
            let err = load::file_settings(bad).unwrap_err().to_string();
            assert!(
                err.starts_with("--config:") && err.contains(says),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn rfc7662_mode_takes_its_signing_settings() {
        let config = args(&[
            "--introspection-mode",
            "rfc7662",
            "--jwt-issuer",
            "https://gateway.example",
            "--jwt-signing-key-file",
            "/run/keys/jwt.pem",
            "--jwt-signing-alg",
            "eddsa",
            "--jwt-forward-claims",
            "username,email",
            "--jwt-forward-claims",
            "department,email",
        ])
        .unwrap();
        let mint = config.introspection.mint.unwrap();
        assert_eq!(mint.issuer, "https://gateway.example");
        assert_eq!(mint.forward_claims, ["username", "email", "department"]);
        assert_eq!(mint.algorithm, crate::jose::Algorithm::EdDsa);
        assert_eq!(mint.audience, None);
        // The Curity modes sign nothing.
        assert!(args(&[]).unwrap().introspection.mint.is_none());

        let rfc7662 = ["--introspection-mode", "rfc7662"];
        let signing = [
            "--jwt-issuer",
            "https://gw",
            "--jwt-signing-key-file",
            "/k.pem",
        ];
        for (extra, says) in [
            (
                &rfc7662[..],
                "--jwt-issuer: is required with --introspection-mode rfc7662",
            ),
            (
                &[
                    "--introspection-mode",
                    "rfc7662",
                    "--jwt-issuer",
                    "https://gw",
                ][..],
                "--jwt-signing-key-file: is required",
            ),
            (
                &["--jwt-issuer", "https://gw"][..],
                "--jwt-issuer: has no use without --introspection-mode rfc7662",
            ),
            (
                &[&rfc7662[..], &signing[..], &["--jwt-forward-claims", "sub"]].concat()[..],
                "`sub` is always set by phantom-authz itself",
            ),
            (
                &[
                    &rfc7662[..],
                    &signing[..],
                    &["--jwt-forward-claims", "a,,b"],
                ]
                .concat()[..],
                "a claim name is empty",
            ),
            (
                &[
                    &rfc7662[..],
                    &["--jwt-issuer", "", "--jwt-signing-key-file", "/k"],
                ]
                .concat()[..],
                "--jwt-issuer: must be a non-empty string",
            ),
        ] {
            let err = args(extra).unwrap_err().to_string();
            assert!(err.contains(says), "{extra:?}: {err}");
        }
    }

    #[test]
    fn the_endpoint_may_be_discovered_and_the_client_may_sign_its_assertions() {
        let config = load_with(
            &[
                "--issuer",
                "https://idp.example/realms/main",
                "--client-id",
                "gw",
                "--client-auth",
                "private_key_jwt",
                "--client-assertion-key-file",
                "/run/keys/client.pem",
            ],
            &[],
            "",
        )
        .unwrap();
        assert!(matches!(
            &config.introspection.endpoint,
            Endpoint::Discover { issuer } if issuer == "https://idp.example/realms/main"
        ));
        assert!(matches!(
            &config.introspection.client_auth,
            ClientAuthConfig::PrivateKeyJwt { key_file } if key_file.ends_with("client.pem")
        ));
        // An explicit endpoint wins over discovery.
        let config = args(&["--issuer", "https://idp.example"]).unwrap();
        assert!(matches!(config.introspection.endpoint, Endpoint::Url(_)));
        assert!(matches!(
            config.introspection.client_auth,
            ClientAuthConfig::SecretBasic(_)
        ));
        let post = args(&["--client-auth", "client_secret_post"]).unwrap();
        assert!(matches!(
            post.introspection.client_auth,
            ClientAuthConfig::SecretPost(_)
        ));

        for (extra, says) in [
            (
                &["--client-auth", "private_key_jwt"][..],
                "--client-secret: has no use with --client-auth private_key_jwt",
            ),
            (
                &["--client-assertion-key-file", "/k.pem"][..],
                "--client-assertion-key-file: has no use without --client-auth private_key_jwt",
            ),
            (
                &["--issuer", "https://user:pw@idp.example"][..],
                "--issuer:",
            ),
        ] {
            let err = args(extra).unwrap_err().to_string();
            assert!(err.starts_with(says), "{extra:?}: {err}");
            assert!(!err.contains("pw@"), "{err}");
        }
        let err = load_with(
            &[
                "--issuer",
                "https://idp.example",
                "--client-id",
                "gw",
                "--client-auth",
                "private_key_jwt",
            ],
            &[],
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("--client-assertion-key-file: is required"),
            "{err}"
        );
    }

    #[test]
    fn check_config_prints_every_value_of_a_list_flag() {
        let argv = [
            "phantom-authz",
            "--jwt-forward-claims",
            "username",
            "--jwt-forward-claims",
            "email,department",
        ]
        .iter()
        .map(Into::into)
        .collect();
        let effective = load::settings(argv, &|_| None, &|_| {
            Err(std::io::ErrorKind::NotFound.into())
        })
        .unwrap();
        let shown = effective
            .settings
            .iter()
            .find(|(flag, _)| flag == "jwt-forward-claims")
            .map(|(_, value)| value.as_str());
        assert_eq!(shown, Some("username,email,department"));
    }

    #[test]
    fn claim_headers_are_checked() {
        let config = args(&["--claim-header", "sub=X-User-Id,client_id=x-client-id"]).unwrap();
        assert_eq!(
            config.claim_headers,
            [
                (ClaimName::Sub, "x-user-id".to_owned()),
                (ClaimName::ClientId, "x-client-id".to_owned())
            ]
        );
        for bad in [
            "sub",
            "name=x-name",
            "sub=authorization",
            "sub=x-envoy-original-path",
            "sub=x user",
            "sub=x-a,scope=x-a",
        ] {
            let err = args(&["--claim-header", bad]).unwrap_err();
            assert_eq!(err.flag, "--claim-header", "{bad}");
        }
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

    #[test]
    fn redis_topologies_take_their_urls() {
        let with = |flags: &[&str]| {
            args(&[&["--cache-secret-file", "/run/cache-secret"][..], flags].concat())
                .map(|config| config.redis.unwrap())
        };
        let exposed = |redis: &RedisConfig| -> Vec<String> {
            redis.urls.iter().map(|u| u.expose().to_owned()).collect()
        };
        let redis = with(&["--redis-url", "redis://cache:6379"]).unwrap();
        assert_eq!(redis.topology, RedisTopology::Standalone);
        assert_eq!(exposed(&redis), ["redis://cache:6379"]);

        let cluster = with(&[
            "--redis-mode",
            "cluster",
            "--redis-url",
            "redis://:p,w@a:7000, redis://:p,w@b:7001,redis://:p,w@c:7002",
        ])
        .unwrap();
        assert_eq!(cluster.topology, RedisTopology::Cluster);
        assert_eq!(
            exposed(&cluster),
            [
                "redis://:p,w@a:7000",
                "redis://:p,w@b:7001",
                "redis://:p,w@c:7002"
            ]
        );
        let printed = format!("{cluster:?}");
        assert!(!printed.contains("p,w"), "{printed}");
        assert!(printed.contains("redis://***@b:7001"), "{printed}");
        assert_eq!(
            masked_urls("redis://:p,w@a:7000, redis://u:x@b:7001"),
            "redis://***@a:7000,redis://***@b:7001"
        );

        let sentinel = with(&[
            "--redis-mode",
            "sentinel",
            "--redis-sentinel-master",
            "cache",
            "--redis-url",
            "rediss://s1:26379,rediss://s2:26379",
        ])
        .unwrap();
        assert_eq!(
            sentinel.topology,
            RedisTopology::Sentinel {
                master: "cache".into()
            }
        );
        assert_eq!(sentinel.urls.len(), 2);

        for (flags, flag, says) in [
            (
                &["--redis-url", "redis://a:1,redis://b:2"][..],
                "--redis-url",
                "standalone takes one server",
            ),
            (
                &[
                    "--redis-mode",
                    "cluster",
                    "--redis-url",
                    "redis://a:1,rediss://b:2",
                ],
                "--redis-url",
                "mixes",
            ),
            (
                &[
                    "--redis-mode",
                    "cluster",
                    "--redis-url",
                    "redis://:pw@a:1,redis://:pw@b:x",
                ],
                "--redis-url",
                "URL 2 of the list is not a valid",
            ),
            (
                &[
                    "--redis-mode",
                    "cluster",
                    "--redis-url",
                    "redis://:pw@a:1,b:2",
                ],
                "--redis-url",
                "not a valid",
            ),
            (
                &["--redis-mode", "sentinel", "--redis-url", "redis://s:26379"],
                "--redis-sentinel-master",
                "is required",
            ),
            (
                &[
                    "--redis-mode",
                    "cluster",
                    "--redis-sentinel-master",
                    "m",
                    "--redis-url",
                    "redis://a:1",
                ],
                "--redis-sentinel-master",
                "needs --redis-mode sentinel",
            ),
            (&["--redis-mode", "cluster"], "--redis-mode", "no use"),
        ] {
            let err = with(flags).unwrap_err();
            assert_eq!(err.flag, flag, "{flags:?}: {err}");
            assert!(err.to_string().contains(says), "{flags:?}: {err}");
            assert!(!err.to_string().contains("pw"), "{err}");
        }
    }
}
