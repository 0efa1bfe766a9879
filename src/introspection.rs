//! The HTTP client for the identity server's introspection endpoint, and the parsing of what it
//! answers (Curity's `application/jwt` or RFC 7662 JSON with a `jwt`, or plain RFC 7662 JSON from
//! which [`mint`] makes the JWT). [`guard`] caps and breaks its calls; [`discovery`] finds the
//! endpoint from `--issuer`.

pub mod discovery;
pub mod guard;
pub mod mint;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::header::{ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};

use crate::BoxFuture;
use crate::config::{IntrospectionMode, ProxyUrl, Secret};
use crate::jose::{self, SigningKey};
use crate::jwt::{self, Claims};
use crate::metrics;
use crate::token::Token;

/// Largest introspection response read; anything bigger is a bad response, not an allow.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The identity server, as the authorizer sees it.
pub trait Introspect: Send + Sync {
    fn introspect<'a>(&'a self, token: Token<'a>) -> BoxFuture<'a, Result<Introspected, IdpError>>;
}

/// A usable answer from the identity server.
#[derive(Clone, PartialEq, Eq)]
pub enum Introspected {
    Active(ActiveToken),
    Inactive,
}

/// An active token's JWT and what bounds how long it may be cached.
#[derive(Clone, PartialEq, Eq)]
pub struct ActiveToken {
    pub jwt: String,
    /// The JWT's own `exp`, in seconds since the epoch.
    pub jwt_exp: Option<u64>,
    /// Who the caller is and what the token may do (the JWT's claims; in json mode with the
    /// response's `scope`, `sub` and `client_id` too).
    pub claims: Claims,
    /// The JSON response's `exp` (json mode), in seconds since the epoch.
    pub response_exp: Option<u64>,
    /// What `Cache-Control` said.
    pub cache: CacheDirective,
}

impl std::fmt::Debug for Introspected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Introspected::Active(active) => f
                .debug_struct("Active")
                .field("jwt_len", &active.jwt.len())
                .field("jwt_exp", &active.jwt_exp)
                .field("response_exp", &active.response_exp)
                .field("cache", &active.cache)
                .finish(),
            Introspected::Inactive => f.write_str("Inactive"),
        }
    }
}

/// The caching instruction in the IdP's `Cache-Control` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheDirective {
    /// No usable directive: the default TTL applies.
    Unspecified,
    /// `max-age` (or `s-maxage`, which wins for a shared cache like ours).
    MaxAge(Duration),
    /// `no-store`, `no-cache`, `max-age=0` or a malformed `max-age`: do not cache.
    DoNotCache,
    /// rfc7662 mode without `max-age`: the token's own `exp` bounds the TTL (with
    /// `--max-cache-ttl`). Standard servers say `no-store` of every introspection answer
    /// while its `exp` is authoritative.
    UntilExpiry,
}

/// Why introspection gave no usable answer. Never carries a token, JWT or secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdpError {
    #[error("identity server unreachable")]
    Unreachable,
    #[error("introspection timed out")]
    Timeout,
    #[error("identity server answered HTTP {0}")]
    Status(u16),
    #[error("introspection response unusable: {0}")]
    BadResponse(&'static str),
    /// The circuit breaker is open after repeated IdP failures: failing fast.
    #[error("identity server circuit open")]
    CircuitOpen,
    /// Too many introspections under way: failing fast rather than queueing.
    #[error("too many introspections under way")]
    Overloaded,
    /// `--issuer`'s metadata has not been read yet: the endpoint is unknown.
    #[error("introspection endpoint not discovered yet")]
    Undiscovered,
    /// A JWT (ours, or a client assertion) could not be signed.
    #[error("signing failed")]
    Signing,
}

impl IdpError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            IdpError::Unreachable => "unreachable",
            IdpError::Timeout => "timeout",
            IdpError::Status(503) => "status_503",
            IdpError::Status(400..=499) => "status_4xx",
            IdpError::Status(500..=599) => "status_5xx",
            IdpError::Status(_) => "status_other",
            IdpError::BadResponse(_) => "bad_response",
            IdpError::CircuitOpen => "circuit_open",
            IdpError::Overloaded => "overloaded",
            IdpError::Undiscovered => "undiscovered",
            IdpError::Signing => "signing_failed",
        }
    }

    /// Whether this says the IdP itself is failing (what the circuit breaker counts). Our own
    /// credentials being refused (401/403) or a 4xx is not the IdP being down.
    pub fn is_idp_failure(&self) -> bool {
        match self {
            IdpError::Unreachable | IdpError::Timeout | IdpError::BadResponse(_) => true,
            IdpError::Status(status) => *status >= 500,
            IdpError::CircuitOpen
            | IdpError::Overloaded
            | IdpError::Undiscovered
            | IdpError::Signing => false,
        }
    }
}

/// Why the introspection client could not be built; names the flag, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--introspection-url: {0}")]
    Url(url::ParseError),
    #[error("--idp-ca-file: no usable PEM certificate")]
    Ca,
    #[error("--idp-proxy: not a usable proxy URL")]
    Proxy,
    #[error("--client-id: cannot form a Basic credential")]
    Credentials,
    #[error("introspection client: cannot be built (TLS back end unavailable)")]
    Client,
    #[error("--introspection-mode rfc7662: no signing key")]
    Minter,
}

/// How the introspecting client proves who it is.
pub enum ClientAuth {
    /// `client_secret_basic`.
    Basic { client_id: String, secret: Secret },
    /// `client_secret_post`.
    Post { client_id: String, secret: Secret },
    /// `private_key_jwt`: a fresh assertion for `audience` on every call.
    PrivateKeyJwt {
        client_id: String,
        key: Box<SigningKey>,
        audience: String,
    },
}

/// How long a client assertion is valid: long enough for one call and clock skew.
const ASSERTION_LIFETIME_SECS: u64 = 60;

/// How an answer becomes a JWT.
enum Answer {
    /// The identity server's own JWT (`jwt` and `json` modes).
    Curity(IntrospectionMode),
    /// rfc7662 mode: phantom-authz signs one.
    Mint(Arc<mint::Minter>),
}

/// Introspection over HTTP(S) with pooled, reused connections and no redirects.
pub struct HttpIntrospector {
    client: reqwest::Client,
    /// Set at start, or once `--issuer`'s metadata is read.
    endpoint: Arc<OnceLock<reqwest::Url>>,
    /// The issuer to discover the endpoint from, when it is not given.
    issuer: Option<String>,
    auth: ClientAuth,
    basic_auth: Option<HeaderValue>,
    accept: HeaderValue,
    answer: Answer,
}

impl HttpIntrospector {
    /// `url`: the endpoint, or `None` to discover it from `issuer` ([`Self::discovery`]).
    /// `ca_pem`: when given, the only CAs trusted for the IdP's certificate. `proxy`: when
    /// given, every call goes through it; otherwise none does, whatever the environment says.
    /// `minter`: rfc7662 mode's signer (required in that mode, ignored in the others).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        url: Option<&str>,
        issuer: Option<&str>,
        ca_pem: Option<&[u8]>,
        proxy: Option<&ProxyUrl>,
        auth: ClientAuth,
        mode: IntrospectionMode,
        minter: Option<Arc<mint::Minter>>,
        timeout: Duration,
    ) -> Result<Self, SetupError> {
        let endpoint = Arc::new(OnceLock::new());
        if let Some(url) = url {
            let _ = endpoint.set(reqwest::Url::parse(url).map_err(SetupError::Url)?);
        }
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = ca_pem {
            let roots = reqwest::Certificate::from_pem_bundle(pem).map_err(|_| SetupError::Ca)?;
            if roots.is_empty() {
                return Err(SetupError::Ca);
            }
            builder = builder.tls_certs_only(roots);
        }
        builder = match proxy {
            // The error is not kept: it could hold the URL, and the URL a password.
            Some(proxy) => {
                builder.proxy(reqwest::Proxy::all(proxy.expose()).map_err(|_| SetupError::Proxy)?)
            }
            // HTTP(S)_PROXY and ALL_PROXY were not set for this service: the client secret and
            // tokens must not follow them.
            None => builder.no_proxy(),
        };
        let client = builder
            // The credentials must never travel to wherever a redirect points.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|_| SetupError::Client)?;
        let answer = match (mode, minter) {
            (IntrospectionMode::Rfc7662, Some(minter)) => Answer::Mint(minter),
            (IntrospectionMode::Rfc7662, None) => return Err(SetupError::Minter),
            (mode, _) => Answer::Curity(mode),
        };
        Ok(Self {
            client,
            endpoint,
            issuer: issuer.map(str::to_owned),
            basic_auth: match &auth {
                ClientAuth::Basic { client_id, secret } => Some(basic_auth(client_id, secret)?),
                _ => None,
            },
            auth,
            accept: HeaderValue::from_static(match mode {
                IntrospectionMode::Jwt => "application/jwt",
                IntrospectionMode::Json | IntrospectionMode::Rfc7662 => "application/json",
            }),
            answer,
        })
    }

    /// What must run for the endpoint to be known, when it was not given.
    pub fn discovery(&self) -> Option<discovery::Discovery> {
        match (&self.issuer, self.endpoint.get()) {
            (Some(issuer), None) => Some(discovery::Discovery {
                client: self.client.clone(),
                issuer: issuer.clone(),
                endpoint: self.endpoint.clone(),
            }),
            _ => None,
        }
    }

    async fn call(&self, token: Token<'_>) -> Result<Introspected, IdpError> {
        let url = self.endpoint.get().ok_or(IdpError::Undiscovered)?;
        let mut body = String::with_capacity(6 + token.len() + 8);
        body.push_str("token=");
        form_encode_into(token.expose(), &mut body);
        let mut request = self
            .client
            .post(url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, self.accept.clone());
        match &self.auth {
            ClientAuth::Basic { .. } => {
                if let Some(basic) = &self.basic_auth {
                    request = request.header(AUTHORIZATION, basic.clone());
                }
            }
            ClientAuth::Post { client_id, secret } => {
                for (name, value) in [
                    ("client_id", client_id.as_str()),
                    ("client_secret", secret.expose()),
                ] {
                    body.push('&');
                    body.push_str(name);
                    body.push('=');
                    form_encode_into(value, &mut body);
                }
            }
            ClientAuth::PrivateKeyJwt {
                client_id,
                key,
                audience,
            } => {
                let assertion = client_assertion(client_id, key, audience, now_secs())?;
                body.push_str("&client_id=");
                form_encode_into(client_id, &mut body);
                body.push_str("&client_assertion_type=");
                form_encode_into(CLIENT_ASSERTION_TYPE, &mut body);
                body.push_str("&client_assertion=");
                body.push_str(&assertion);
            }
        }
        let response = request.body(body).send().await.map_err(transport_error)?;
        let status = response.status().as_u16();
        let cache = cache_control(response.headers().get_all(CACHE_CONTROL).iter());
        match (&self.answer, status) {
            (Answer::Curity(IntrospectionMode::Jwt), 204) => return Ok(Introspected::Inactive),
            (_, 200) => {}
            (_, other) => return Err(IdpError::Status(other)),
        }
        let body = read_capped(response).await?;
        match &self.answer {
            Answer::Curity(IntrospectionMode::Jwt) => parse_jwt_body(&body, cache.directive()),
            Answer::Curity(_) => parse_json_body(&body, cache.directive()),
            Answer::Mint(minter) => {
                parse_rfc7662_body(&body, cache.until_expiry(), minter, now_secs())
            }
        }
    }
}

/// RFC 7523 §2.2's `client_assertion_type`.
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A `private_key_jwt` assertion (RFC 7523 §3): the client is both issuer and subject, for the
/// identity server's `audience`, short-lived, with a fresh `jti` so it cannot be replayed.
pub fn client_assertion(
    client_id: &str,
    key: &SigningKey,
    audience: &str,
    now: u64,
) -> Result<String, IdpError> {
    let jti = jose::random_id().map_err(|_| IdpError::Signing)?;
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
        "jti": jti,
    });
    let serde_json::Value::Object(claims) = claims else {
        unreachable!("a JSON object literal");
    };
    key.sign("JWT", &claims).map_err(|_| IdpError::Signing)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

impl Introspect for HttpIntrospector {
    fn introspect<'a>(&'a self, token: Token<'a>) -> BoxFuture<'a, Result<Introspected, IdpError>> {
        Box::pin(async move {
            let _in_flight = metrics::InFlight::start();
            let started = Instant::now();
            let result = self.call(token).await;
            let label = match &result {
                Ok(Introspected::Active(_)) => "active",
                Ok(Introspected::Inactive) => "inactive",
                Err(e) => e.label(),
            };
            metrics::introspection(label, started.elapsed());
            result
        })
    }
}

fn transport_error(error: reqwest::Error) -> IdpError {
    // reqwest errors can print the URL but never the body or headers we sent.
    if error.is_timeout() {
        IdpError::Timeout
    } else {
        tracing::debug!(error = %error, "introspection transport error");
        IdpError::Unreachable
    }
}

pub(crate) async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, IdpError> {
    if response
        .content_length()
        .is_some_and(|len| len > MAX_BODY_BYTES as u64)
    {
        return Err(IdpError::BadResponse("body too large"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(IdpError::BadResponse("body too large"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Authorization: Basic base64(form(id):form(secret))` (RFC 6749 §2.3.1), marked sensitive so
/// the HTTP stack never prints it.
fn basic_auth(client_id: &str, client_secret: &Secret) -> Result<HeaderValue, SetupError> {
    let mut credentials = String::new();
    form_encode_into(client_id, &mut credentials);
    credentials.push(':');
    form_encode_into(client_secret.expose(), &mut credentials);
    let mut value = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(credentials)))
        .map_err(|_| SetupError::Credentials)?;
    value.set_sensitive(true);
    Ok(value)
}

/// application/x-www-form-urlencoded, as RFC 6749 Appendix B asks for credentials and the token.
fn form_encode_into(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for byte in value.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(HEX[usize::from(byte >> 4)] as char);
                out.push(HEX[usize::from(byte & 0xf)] as char);
            }
        }
    }
}

/// What the IdP's `Cache-Control` says, before a mode reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-store`, `no-cache`, a malformed `max-age`, or a header that is not ASCII.
    pub forbids: bool,
    /// `s-maxage` (which wins for a shared cache like ours), else `max-age`, in seconds.
    pub max_age: Option<u64>,
}

impl CacheControl {
    /// The Curity modes: the header decides; `max-age=0` or `forbids` mean do not cache.
    pub fn directive(self) -> CacheDirective {
        match self.max_age {
            _ if self.forbids => CacheDirective::DoNotCache,
            Some(0) => CacheDirective::DoNotCache,
            Some(seconds) => CacheDirective::MaxAge(Duration::from_secs(seconds)),
            None => CacheDirective::Unspecified,
        }
    }

    /// rfc7662 mode: the token's `exp` (and `--max-cache-ttl`) decide, and only a positive
    /// `max-age` shortens that. `no-store`, `no-cache` and `max-age=0` are what standard servers
    /// put on every introspection answer (oidc-provider: `no-store`; Spring Security's default:
    /// `no-cache, no-store, max-age=0, must-revalidate`): generic HTTP, not a word about the
    /// token.
    pub fn until_expiry(self) -> CacheDirective {
        match self.max_age {
            Some(seconds) if seconds > 0 => CacheDirective::MaxAge(Duration::from_secs(seconds)),
            _ => CacheDirective::UntilExpiry,
        }
    }
}

/// The Curity modes' reading of `Cache-Control` ([`CacheControl::directive`]).
pub fn cache_directive<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> CacheDirective {
    cache_control(values).directive()
}

/// Reads `Cache-Control` (all header lines together). Unknown directives are ignored.
pub fn cache_control<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> CacheControl {
    let mut forbids = false;
    let mut max_age = None;
    let mut s_maxage = None;
    for value in values {
        let Ok(value) = value.to_str() else {
            forbids = true;
            continue;
        };
        for directive in value.split(',') {
            let directive = directive.trim();
            if directive.is_empty() {
                continue;
            }
            let (name, argument) = match directive.split_once('=') {
                Some((name, arg)) => (name.trim(), Some(arg.trim().trim_matches('"'))),
                None => (directive, None),
            };
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                forbids = true;
                continue;
            }
            let slot = if name.eq_ignore_ascii_case("max-age") {
                &mut max_age
            } else if name.eq_ignore_ascii_case("s-maxage") {
                &mut s_maxage
            } else {
                continue;
            };
            match argument.and_then(|a| a.parse::<u64>().ok()) {
                Some(seconds) => *slot = Some(seconds),
                // RFC 9111 §4.2.1: an invalid max-age makes the response stale.
                None => forbids = true,
            }
        }
    }
    CacheControl {
        forbids,
        max_age: s_maxage.or(max_age),
    }
}

/// jwt mode: the 200 body is the JWT itself.
pub fn parse_jwt_body(body: &[u8], cache: CacheDirective) -> Result<Introspected, IdpError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| IdpError::BadResponse("body is not a compact JWT"))?
        .trim_ascii();
    let claims = jwt_claims(text)?;
    Ok(Introspected::Active(ActiveToken {
        jwt: text.to_owned(),
        jwt_exp: claims.exp,
        claims,
        response_exp: None,
        cache,
    }))
}

/// The RFC 7662 answer as a JSON object, or `None` when `active` is false.
fn active_answer(
    body: &[u8],
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, IdpError> {
    let response: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| IdpError::BadResponse("body is not JSON"))?;
    let serde_json::Value::Object(response) = response else {
        return Err(IdpError::BadResponse("body is not a JSON object"));
    };
    match response.get("active") {
        Some(serde_json::Value::Bool(true)) => Ok(Some(response)),
        Some(serde_json::Value::Bool(false)) => Ok(None),
        _ => Err(IdpError::BadResponse(
            "`active` is missing or not a boolean",
        )),
    }
}

/// json mode: RFC 7662 JSON; `active` decides, `jwt` holds the JWT.
pub fn parse_json_body(body: &[u8], cache: CacheDirective) -> Result<Introspected, IdpError> {
    let Some(response) = active_answer(body)? else {
        return Ok(Introspected::Inactive);
    };
    let jwt = response
        .get("jwt")
        .and_then(serde_json::Value::as_str)
        .ok_or(IdpError::BadResponse(
            "active response without a `jwt` string (a server that issues none needs \
             --introspection-mode rfc7662)",
        ))?;
    let mut claims = jwt_claims(jwt)?;
    let response_exp = response.get("exp").map(numeric_date).transpose()?;
    // Read leniently, as the JWT's claims are: a field of another type is left out.
    let text = |name: &str| response.get(name).and_then(serde_json::Value::as_str);
    if let Some(scope) = text("scope") {
        claims.add_scopes(scope);
    }
    for (field, claim) in [
        ("sub", &mut claims.sub),
        ("client_id", &mut claims.client_id),
    ] {
        if claim.is_none()
            && let Some(value) =
                text(field).filter(|v| !v.is_empty() && v.len() <= jwt::MAX_VALUE_LEN)
        {
            *claim = Some(value.into());
        }
    }
    Ok(Introspected::Active(ActiveToken {
        jwt: jwt.to_owned(),
        jwt_exp: claims.exp,
        claims,
        response_exp,
        cache,
    }))
}

/// rfc7662 mode: plain RFC 7662 JSON; `active` decides and phantom-authz signs the JWT, whose
/// claims are then read back like any other JWT's; `cache` is [`CacheControl::until_expiry`].
pub fn parse_rfc7662_body(
    body: &[u8],
    cache: CacheDirective,
    minter: &mint::Minter,
    now: u64,
) -> Result<Introspected, IdpError> {
    let Some(response) = active_answer(body)? else {
        return Ok(Introspected::Inactive);
    };
    let jti = jose::random_id().map_err(|_| IdpError::Signing)?;
    let jwt = minter
        .mint(&response, now, jti)
        .map_err(|error| match error {
            mint::MintError::Answer(problem) => IdpError::BadResponse(problem),
            mint::MintError::Sign(_) => IdpError::Signing,
        })?;
    let claims = jwt_claims(&jwt)?;
    Ok(Introspected::Active(ActiveToken {
        jwt_exp: claims.exp,
        jwt,
        claims,
        response_exp: None,
        cache,
    }))
}

/// Checks the compact JWS shape and returns the payload's `exp` (see [`crate::jwt`]).
pub fn jwt_exp(jwt: &str) -> Result<Option<u64>, IdpError> {
    jwt::exp(jwt).map_err(|malformed| IdpError::BadResponse(malformed.0))
}

fn jwt_claims(jwt: &str) -> Result<Claims, IdpError> {
    jwt::claims(jwt).map_err(|malformed| IdpError::BadResponse(malformed.0))
}

/// An RFC 7519 NumericDate in the response itself (json mode's `exp`).
fn numeric_date(value: &serde_json::Value) -> Result<u64, IdpError> {
    jwt::numeric_date(value).map_err(|malformed| IdpError::BadResponse(malformed.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::jwt;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn header(values: &[&str]) -> CacheControl {
        let values: Vec<HeaderValue> = values
            .iter()
            .map(|v| HeaderValue::from_str(v).unwrap())
            .collect();
        cache_control(values.iter())
    }

    fn directive(values: &[&str]) -> CacheDirective {
        header(values).directive()
    }

    #[test]
    fn rfc7662_mode_caches_until_expiry_unless_a_max_age_shortens_it() {
        let until_expiry = |values: &[&str]| header(values).until_expiry();
        for generic in [
            &[][..],
            &["no-store"],
            &["no-cache, no-store, max-age=0, must-revalidate"],
            &["max-age=soon"],
        ] {
            assert_eq!(
                until_expiry(generic),
                CacheDirective::UntilExpiry,
                "{generic:?}"
            );
        }
        for shortened in [
            &["max-age=60"][..],
            &["no-store, max-age=60"],
            &["s-maxage=60, no-cache"],
        ] {
            assert_eq!(
                until_expiry(shortened),
                CacheDirective::MaxAge(Duration::from_secs(60)),
                "{shortened:?}"
            );
        }
    }

    #[test]
    fn cache_control_rules() {
        assert_eq!(directive(&[]), CacheDirective::Unspecified);
        assert_eq!(directive(&["public"]), CacheDirective::Unspecified);
        assert_eq!(
            directive(&["max-age=60"]),
            CacheDirective::MaxAge(Duration::from_secs(60))
        );
        assert_eq!(
            directive(&["public, MAX-AGE=\"30\""]),
            CacheDirective::MaxAge(Duration::from_secs(30))
        );
        assert_eq!(
            directive(&["max-age=60, s-maxage=10"]),
            CacheDirective::MaxAge(Duration::from_secs(10))
        );
        assert_eq!(directive(&["max-age=0"]), CacheDirective::DoNotCache);
        assert_eq!(directive(&["no-store"]), CacheDirective::DoNotCache);
        assert_eq!(
            directive(&["max-age=60", "no-cache"]),
            CacheDirective::DoNotCache
        );
        assert_eq!(directive(&["max-age=soon"]), CacheDirective::DoNotCache);
        assert_eq!(directive(&["max-age=-5"]), CacheDirective::DoNotCache);
    }

    #[test]
    fn jwt_body_is_checked_and_exp_read() {
        let token = jwt(r#"{"sub":"alice","exp":2000000000}"#);
        let Introspected::Active(active) =
            parse_jwt_body(format!("{token}\n").as_bytes(), CacheDirective::Unspecified).unwrap()
        else {
            panic!("expected active");
        };
        assert_eq!(active.jwt, token);
        assert_eq!(active.jwt_exp, Some(2_000_000_000));

        for bad in [
            "",
            "not a jwt",
            "a.b",
            "a.b.c.d",
            "a..c",
            "<html>",
            "e30.e30.",
            "a.b.c",
        ] {
            assert!(
                parse_jwt_body(bad.as_bytes(), CacheDirective::Unspecified).is_err(),
                "{bad:?}"
            );
        }
        let not_object = format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode("[1]"));
        assert!(jwt_exp(&not_object).is_err());
        assert!(jwt_exp(&jwt(r#"{"exp":"tomorrow"}"#)).is_err());
        assert_eq!(
            jwt_exp(&jwt(r#"{"exp":1700000000.9}"#)),
            Ok(Some(1_700_000_000))
        );
        assert_eq!(jwt_exp(&jwt(r#"{"sub":"x"}"#)), Ok(None));
    }

    #[test]
    fn json_body_rules() {
        let token = jwt(r#"{"exp":2000000000}"#);
        let active =
            format!(r#"{{"active":true,"jwt":"{token}","exp":1999999999,"scope":"read"}}"#);
        let Introspected::Active(parsed) =
            parse_json_body(active.as_bytes(), CacheDirective::Unspecified).unwrap()
        else {
            panic!("expected active");
        };
        assert_eq!(parsed.jwt, token);
        assert_eq!(parsed.response_exp, Some(1_999_999_999));

        assert_eq!(
            parse_json_body(br#"{"active":false}"#, CacheDirective::Unspecified),
            Ok(Introspected::Inactive)
        );
        for bad in [
            &br#"{"active":true}"#[..],
            br#"{"active":true,"jwt":42}"#,
            br#"{"active":true,"jwt":"nope"}"#,
            br#"{"active":"true","jwt":"a.b.c"}"#,
            br#"{"jwt":"a.b.c"}"#,
            b"[]",
            b"not json",
            b"",
        ] {
            assert!(
                parse_json_body(bad, CacheDirective::Unspecified).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn form_encoding() {
        let mut out = String::new();
        form_encode_into("a+b/c=d e~", &mut out);
        assert_eq!(out, "a%2Bb%2Fc%3Dd+e%7E");
    }

    #[test]
    fn basic_auth_is_sensitive() {
        let value = basic_auth("gateway", &Secret::new("s3cr3t")).unwrap();
        assert!(value.is_sensitive());
        assert_eq!(
            value.to_str().unwrap(),
            format!("Basic {}", STANDARD.encode("gateway:s3cr3t"))
        );
    }
}
