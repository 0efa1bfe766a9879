//! Finding the bearer token in a `CheckRequest`, and the cache key derived from it. Pure.

use std::fmt;

use envoy_types::pb::envoy::service::auth::v3 as envoy;
use sha2::{Digest, Sha256};

use crate::request::{self, CheckRequest, Entries as _, HttpRequest};

/// An opaque access token borrowed from the request. Its `Debug` never shows the value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Token<'a>(&'a str);

impl<'a> Token<'a> {
    /// The token itself, for the introspection request and key derivation only.
    pub fn expose(&self) -> &'a str {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A copy of a validated token, for work that outlives the request it came in (an
/// introspection that goes on after Envoy gave up on its Check). Its `Debug` never shows it.
#[derive(Clone)]
pub struct OwnedToken(Box<str>);

impl OwnedToken {
    pub fn of(token: Token<'_>) -> Self {
        Self(token.0.into())
    }

    pub fn borrow(&self) -> Token<'_> {
        Token(&self.0)
    }
}

impl fmt::Debug for OwnedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnedToken(len={})", self.0.len())
    }
}

impl fmt::Debug for Token<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(len={})", self.0.len())
    }
}

/// Why no usable token was found. The token never travels inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenProblem {
    /// No `Authorization` header, another scheme, or an empty token: a bare challenge.
    Missing,
    /// A bearer token that cannot be one: too long, or outside RFC 6750's `b64token`.
    Invalid,
    /// The request itself is malformed, e.g. several `Authorization` headers.
    Malformed,
}

/// Finds the bearer token in Envoy's request attributes, in either header encoding:
/// `headers` (a map of lowercase names) or, with `encode_raw_headers: true`, `header_map`.
pub fn bearer_token(request: &CheckRequest, max_len: usize) -> Result<Token<'_>, TokenProblem> {
    let http = request.http().ok_or(TokenProblem::Missing)?;
    let value = authorization_header(http)?.ok_or(TokenProblem::Missing)?;
    parse_bearer(value, max_len)
}

/// The `CheckRequest` Envoy sends about `http`, in Envoy's own type: for clients that start
/// from an HTTP request rather than from Envoy (`phantom-authz check`, the tests).
pub fn check_request(http: envoy::attribute_context::HttpRequest) -> envoy::CheckRequest {
    envoy::CheckRequest {
        attributes: Some(envoy::AttributeContext {
            request: Some(envoy::attribute_context::Request {
                http: Some(http),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The first value of the header `name` (any case) in whichever encoding Envoy used; a raw
/// value that is not UTF-8 counts as absent. For headers that are not credentials.
pub fn header<'a>(http: &'a HttpRequest, name: &str) -> Option<&'a str> {
    if let Some(map) = http.header_map.as_ref().filter(|m| !m.headers.is_empty()) {
        return map
            .headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(name.as_bytes()))?
            .text();
    }
    http.headers.named(name).or_else(|| {
        http.headers
            .iter()
            .find(|entry| entry.key.eq_ignore_ascii_case(name.as_bytes()))
            .map(|entry| request::text(&entry.value))
    })
}

fn authorization_header(http: &HttpRequest) -> Result<Option<&str>, TokenProblem> {
    if let Some(map) = http.header_map.as_ref().filter(|m| !m.headers.is_empty()) {
        let mut found = None;
        for header in &map.headers {
            if !header.key.eq_ignore_ascii_case(b"authorization") {
                continue;
            }
            if found.is_some() {
                return Err(TokenProblem::Malformed);
            }
            found = Some(header.text().ok_or(TokenProblem::Invalid)?);
        }
        return Ok(found);
    }
    // Envoy lowercases names; a hand-written client might not, and may send one name in two
    // cases, or one name twice in the map: that is as ambiguous as two headers, so every entry
    // is compared.
    let mut found = None;
    for entry in &http.headers {
        if entry.key.eq_ignore_ascii_case(b"authorization") {
            if found.is_some() {
                return Err(TokenProblem::Malformed);
            }
            found = Some(request::text(&entry.value));
        }
    }
    Ok(found)
}

/// Parses `Bearer <token>` (scheme case-insensitive, RFC 6750 §2.1).
pub fn parse_bearer(value: &str, max_len: usize) -> Result<Token<'_>, TokenProblem> {
    let value = value.trim_matches([' ', '\t']);
    let Some((scheme, rest)) = value.split_once([' ', '\t']) else {
        // "Bearer" alone (empty token) or a bare credential without a scheme.
        return Err(TokenProblem::Missing);
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(TokenProblem::Missing);
    }
    parse_token(rest.trim_start_matches([' ', '\t']), max_len)
}

/// Checks a bare token (no scheme), as an operator hands it to the admin API.
pub fn parse_token(token: &str, max_len: usize) -> Result<Token<'_>, TokenProblem> {
    if token.is_empty() {
        return Err(TokenProblem::Missing);
    }
    if token.len() > max_len || !is_b64token(token) {
        return Err(TokenProblem::Invalid);
    }
    Ok(Token(token))
}

/// RFC 6750 §2.1: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(token: &str) -> bool {
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// A digest of the token: how the in-process tiers and the flights know it, and how replicas
/// name it to each other in eviction notices. Redis keys are derived with the cache secret
/// instead (see [`crate::cache::redis`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CacheKey([u8; 32]);

impl std::hash::Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // A SHA-256 digest's first eight bytes are already a uniform hash.
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_ne_bytes(word));
    }
}

impl CacheKey {
    pub fn of(token: Token<'_>) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"phantom-authz cache key v1\0");
        hasher.update(token.expose().as_bytes());
        Self(hasher.finalize().into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest in lowercase hex: 64 characters, as replicas tell each other of evictions.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = String::with_capacity(64);
        for byte in self.0 {
            hex.push(HEX[usize::from(byte >> 4)] as char);
            hex.push(HEX[usize::from(byte & 0xf)] as char);
        }
        hex
    }

    /// Reads what [`CacheKey::to_hex`] wrote (either case); `None` for anything else.
    pub fn from_hex(hex: &[u8]) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        let mut digest = [0u8; 32];
        for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
        }
        Some(Self(digest))
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first bytes of a digest identify an entry in logs without revealing anything.
        write!(
            f,
            "CacheKey({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};

    fn request_with_headers(headers: &[(&str, &str)]) -> CheckRequest {
        let http = envoy::attribute_context::HttpRequest {
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        CheckRequest::from_envoy(&check_request(http)).unwrap()
    }

    fn request_with_raw(headers: &[(&str, &[u8])]) -> CheckRequest {
        let http = envoy::attribute_context::HttpRequest {
            header_map: Some(HeaderMap {
                headers: headers
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: k.to_string(),
                        raw_value: v.to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            ..Default::default()
        };
        CheckRequest::from_envoy(&check_request(http)).unwrap()
    }

    #[test]
    fn finds_bearer_in_header_map_of_strings() {
        let req = request_with_headers(&[("authorization", "Bearer abc.DEF-123"), ("x", "y")]);
        assert_eq!(bearer_token(&req, 4096).unwrap().expose(), "abc.DEF-123");
    }

    #[test]
    fn finds_bearer_in_raw_header_map() {
        let req = request_with_raw(&[(":path", b"/"), ("authorization", b"bearer tok_1")]);
        assert_eq!(bearer_token(&req, 4096).unwrap().expose(), "tok_1");
    }

    #[test]
    fn scheme_is_case_insensitive() {
        for value in [
            "Bearer t",
            "bearer t",
            "BEARER t",
            "bEaReR   t",
            "Bearer t  ",
        ] {
            assert_eq!(parse_bearer(value, 10).unwrap().expose(), "t", "{value:?}");
        }
    }

    #[test]
    fn missing_other_scheme_and_empty_are_bare_challenges() {
        assert_eq!(
            bearer_token(&request_with_headers(&[]), 10),
            Err(TokenProblem::Missing)
        );
        assert_eq!(
            bearer_token(&CheckRequest::default(), 10),
            Err(TokenProblem::Missing)
        );
        for value in [
            "Basic dXNlcjpwdw==",
            "Bearer",
            "Bearer   ",
            "",
            "tokenonly",
            "Bearerx y",
        ] {
            assert_eq!(
                parse_bearer(value, 10),
                Err(TokenProblem::Missing),
                "{value:?}"
            );
        }
    }

    #[test]
    fn bad_tokens_are_invalid() {
        for value in [
            "Bearer a b",
            "Bearer a\u{1}",
            "Bearer caf\u{e9}",
            "Bearer ====",
            "Bearer a,b",
        ] {
            assert_eq!(
                parse_bearer(value, 100),
                Err(TokenProblem::Invalid),
                "{value:?}"
            );
        }
        assert_eq!(parse_bearer("Bearer abcdef", 5), Err(TokenProblem::Invalid));
        assert!(parse_bearer("Bearer abcde", 5).is_ok());
        assert!(parse_bearer("Bearer a+/b~c_d-e.f==", 100).is_ok());
    }

    #[test]
    fn several_authorization_headers_are_malformed() {
        let req = request_with_raw(&[
            ("authorization", b"Bearer a"),
            ("Authorization", b"Bearer b"),
        ]);
        assert_eq!(bearer_token(&req, 100), Err(TokenProblem::Malformed));
        let req =
            request_with_headers(&[("authorization", "Bearer a"), ("Authorization", "Bearer b")]);
        assert_eq!(bearer_token(&req, 100), Err(TokenProblem::Malformed));
    }

    #[test]
    fn other_headers_are_found_in_either_encoding() {
        let req = request_with_headers(&[("X-Request-Id", "abc"), ("traceparent", "00-x")]);
        let http = req.http().unwrap();
        assert_eq!(header(http, "x-request-id"), Some("abc"));
        assert_eq!(header(http, "traceparent"), Some("00-x"));
        assert_eq!(header(http, "missing"), None);
        let req = request_with_raw(&[("x-request-id", b"raw-id"), ("bad", b"\xff")]);
        let http = req.http().unwrap();
        assert_eq!(header(http, "X-REQUEST-ID"), Some("raw-id"));
        assert_eq!(header(http, "bad"), None);
        assert!(CheckRequest::default().http().is_none());
    }

    #[test]
    fn one_name_twice_in_the_map_is_malformed() {
        // Envoy's generated map would have kept one of them; which one a client meant is unknown.
        let entry = |value: &'static str| crate::request::Entry {
            key: bytes::Bytes::from_static(b"authorization"),
            value: bytes::Bytes::from_static(value.as_bytes()),
        };
        let req = CheckRequest::about(HttpRequest {
            headers: vec![entry("Bearer a"), entry("Bearer b")],
            ..Default::default()
        });
        assert_eq!(bearer_token(&req, 100), Err(TokenProblem::Malformed));
    }

    #[test]
    fn non_utf8_raw_value_is_invalid() {
        let req = request_with_raw(&[("authorization", b"Bearer \xff\xfe")]);
        assert_eq!(bearer_token(&req, 100), Err(TokenProblem::Invalid));
    }

    #[test]
    fn cache_key_is_a_digest() {
        let token = parse_bearer("Bearer secret-token", 100).unwrap();
        let key = CacheKey::of(token);
        assert!(!key.to_hex().contains("secret-token"));
        assert_eq!(
            key,
            CacheKey::of(parse_bearer("Bearer secret-token", 100).unwrap())
        );
        assert_ne!(
            key,
            CacheKey::of(parse_bearer("Bearer secret-tokem", 100).unwrap())
        );
        assert!(!format!("{token:?}{key:?}").contains("secret"));
    }

    #[test]
    fn cache_key_hex_round_trips() {
        let key = CacheKey::of(parse_token("tok", 100).unwrap());
        let hex = key.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(CacheKey::from_hex(hex.as_bytes()), Some(key));
        assert_eq!(CacheKey::from_hex(hex.to_uppercase().as_bytes()), Some(key));
        assert_eq!(CacheKey::from_hex(&hex.as_bytes()[..63]), None);
        assert_eq!(CacheKey::from_hex(format!("{hex}0").as_bytes()), None);
        let mut bad = hex.into_bytes();
        bad[10] = b'g';
        assert_eq!(CacheKey::from_hex(&bad), None);
        bad[10] = 0xc3;
        assert_eq!(CacheKey::from_hex(&bad), None);
        assert_eq!(CacheKey::from_hex(b""), None);
    }

    #[test]
    fn bare_tokens_follow_the_bearer_rules() {
        assert_eq!(parse_token("abc.DEF-1", 100).unwrap().expose(), "abc.DEF-1");
        assert_eq!(parse_token("", 100), Err(TokenProblem::Missing));
        assert_eq!(parse_token("Bearer abc", 100), Err(TokenProblem::Invalid));
        assert_eq!(parse_token(" abc", 100), Err(TokenProblem::Invalid));
        assert_eq!(parse_token("abcdef", 5), Err(TokenProblem::Invalid));
        assert_eq!(
            CacheKey::of(parse_token("abc", 100).unwrap()),
            CacheKey::of(parse_bearer("Bearer abc", 100).unwrap())
        );
    }
}
