//! The compact JWS shape every JWT we forward must have, and the claims read from it. Pure.
//!
//! phantom-authz does not verify signatures (the API behind the gateway does); it checks that
//! what it forwards is three non-empty base64url parts, nothing else (so nothing that could
//! break out of a header), with a JSON object payload, reads `exp` so that no JWT is ever handed
//! out after it expired, and reads `sub`, `client_id`, the scopes and the audiences that routes
//! are checked against and Envoy is told.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a value is not a usable JWT: a fixed, bounded description, never the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

const NOT_A_JWT: Malformed = Malformed("not a compact JWT");

/// What a JWT says about its caller that routes and Envoy use. Bounded: at most
/// [`MAX_LISTED`] scopes and audiences, and no value over [`MAX_VALUE_LEN`] bytes is kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    /// `exp`, in seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<Box<str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<Box<str>>,
    /// From `scope` (space-separated) and `scp` (an array, or a string).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<Box<str>>,
    /// From `aud` (a string or an array).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<Box<str>>,
}

/// Most scopes, and most audiences, one token may carry.
pub const MAX_LISTED: usize = 256;
/// Longest scope, audience, subject or client id kept.
pub const MAX_VALUE_LEN: usize = 1024;

impl Claims {
    /// Whether the token holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|held| &**held == scope)
    }

    /// Whether the token is meant for `audience`.
    pub fn has_audience(&self, audience: &str) -> bool {
        self.audiences.iter().any(|held| &**held == audience)
    }

    /// Adds space-separated scopes not already held (json mode's response `scope`).
    pub fn add_scopes(&mut self, scopes: &str) {
        for scope in scopes.split(' ').filter_map(bounded) {
            if self.scopes.len() < MAX_LISTED && !self.has_scope(&scope) {
                self.scopes.push(scope);
            }
        }
    }
}

/// A value worth keeping: not empty, not over [`MAX_VALUE_LEN`].
fn bounded(value: &str) -> Option<Box<str>> {
    (!value.is_empty() && value.len() <= MAX_VALUE_LEN).then(|| value.into())
}

/// Checks the compact JWS shape (three non-empty base64url parts, a JSON object payload) and
/// returns the payload's `exp`, in seconds since the epoch. Only `exp` is read: the rest of the
/// payload is skipped, not checked, so this is for JWTs [`claims`] has read before (each Redis
/// hit checks its sealed JWT this way). A second `exp` makes the JWT malformed, here and there.
pub fn exp(jwt: &str) -> Result<Option<u64>, Malformed> {
    exp_of(&payload(jwt)?)
}

/// The payload of a compact JWS, decoded.
fn payload(jwt: &str) -> Result<Vec<u8>, Malformed> {
    let payload = compact_payload(jwt).ok_or(NOT_A_JWT)?;
    URL_SAFE_NO_PAD.decode(payload).map_err(|_| NOT_A_JWT)
}

fn exp_of(payload: &[u8]) -> Result<Option<u64>, Malformed> {
    #[derive(serde::Deserialize)]
    struct Payload {
        #[serde(default, deserialize_with = "present")]
        exp: Option<serde_json::Value>,
    }
    /// `Some` even for `null`, which is no NumericDate.
    fn present<'de, D: serde::Deserializer<'de>>(
        value: D,
    ) -> Result<Option<serde_json::Value>, D::Error> {
        serde::Deserialize::deserialize(value).map(Some)
    }
    // A JSON object, not an array a struct would also be read from.
    if payload.trim_ascii_start().first() != Some(&b'{') {
        return Err(NOT_A_JWT);
    }
    let Payload { exp } = serde_json::from_slice(payload).map_err(|_| NOT_A_JWT)?;
    exp.as_ref().map(numeric_date).transpose()
}

/// Checks the compact JWS shape and reads the claims phantom-authz uses.
pub fn claims(jwt: &str) -> Result<Claims, Malformed> {
    let payload = payload(jwt)?;
    let exp = exp_of(&payload)?;
    let payload: serde_json::Value = serde_json::from_slice(&payload).map_err(|_| NOT_A_JWT)?;
    let payload = payload.as_object().ok_or(NOT_A_JWT)?;
    // Only `exp` must be well-formed: it bounds how long the JWT is handed out. The others are
    // read leniently: a value of another type, or past the bounds, is left out, which can only
    // ever deny a route that requires it, never open one.
    let string = |name: &str| match payload.get(name) {
        Some(serde_json::Value::String(value)) => bounded(value),
        _ => None,
    };
    let list = |name: &str| -> Vec<Box<str>> {
        let items: Vec<&str> = match payload.get(name) {
            Some(serde_json::Value::String(value)) => vec![value.as_str()],
            Some(serde_json::Value::Array(items)) => {
                items.iter().filter_map(serde_json::Value::as_str).collect()
            }
            _ => Vec::new(),
        };
        items
            .into_iter()
            .filter_map(bounded)
            .take(MAX_LISTED)
            .collect()
    };
    let mut claims = Claims {
        exp,
        sub: string("sub"),
        client_id: string("client_id"),
        scopes: list("scp"),
        audiences: list("aud"),
    };
    // Bounded scope by scope, not as a whole: a token with many scopes keeps them.
    if let Some(serde_json::Value::String(scope)) = payload.get("scope") {
        claims.add_scopes(scope);
    }
    Ok(claims)
}

/// The payload part of a compact JWS, if `jwt` has that shape.
fn compact_payload(jwt: &str) -> Option<&str> {
    let mut parts = jwt.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let base64url = |part: &str| !part.is_empty() && is_base64url(part.as_bytes());
    (base64url(header) && base64url(payload) && base64url(signature)).then_some(payload)
}

/// Whether every byte is in the base64url alphabet. Without branches, so that the compiler
/// checks many bytes an instruction: a JWT's kilobyte is checked on every Redis hit.
fn is_base64url(bytes: &[u8]) -> bool {
    bytes.iter().fold(true, |all, &b| {
        let digit = b.wrapping_sub(b'0') < 10;
        let letter = (b | 0x20).wrapping_sub(b'a') < 26;
        all & (digit | letter | (b == b'-') | (b == b'_'))
    })
}

/// An RFC 7519 NumericDate: seconds since the epoch, possibly fractional, rounded down (never
/// trust a JWT past its expiry).
pub fn numeric_date(value: &serde_json::Value) -> Result<u64, Malformed> {
    let seconds = value
        .as_f64()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .ok_or(Malformed("`exp` is not a NumericDate"))?;
    Ok(seconds.floor() as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A compact JWT with `payload` as its claims, for the tests of every module that reads one.
    pub(crate) fn jwt(payload: &str) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256"}"#),
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn exp_alone_reads_as_the_claims_do() {
        for payload in [
            r#"{"exp":2000000000}"#,
            r#"{"sub":"a","nested":{"exp":1},"list":[1,{"x":null}],"exp":1999999999.9}"#,
            r#"  {"iat":1}"#,
            r#"{"exp":"soon"}"#,
            r#"{"exp":null}"#,
            r#"{"exp":-1}"#,
            r#"[2000000000]"#,
            r#""text""#,
            r#"{"exp":1"#,
            r#"{"exp":1,"exp":2}"#,
        ] {
            assert_eq!(
                exp(&jwt(payload)),
                claims(&jwt(payload)).map(|claims| claims.exp),
                "{payload}"
            );
        }
        assert_eq!(exp(&jwt(r#"[2000000000]"#)), Err(NOT_A_JWT));
        // Read exactly (serde_json's float_roundtrip): the fast parse made this ...014.
        let exact = jwt(r#"{"exp":8292522231370015.0}"#);
        assert_eq!(exp(&exact), Ok(Some(8_292_522_231_370_015)));
        for shape in ["a.b", "a.b.c.d", "a..c", "a.b.c=", "a.b+.c", "a.b.c\r\n"] {
            assert_eq!(exp(shape), Err(NOT_A_JWT), "{shape}");
        }
    }

    #[test]
    fn the_base64url_alphabet_is_exactly_its_64_bytes() {
        for b in 0..=u8::MAX {
            let expected = b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
            assert_eq!(is_base64url(&[b]), expected, "{b:#04x}");
            // Also past the first vector's width.
            let mut long = vec![b'Z'; 40];
            long.push(b);
            assert_eq!(is_base64url(&long), expected, "{b:#04x} at 40");
        }
        assert!(is_base64url(b""));
    }

    #[test]
    fn scopes_come_from_scope_and_scp_and_audiences_from_aud() {
        let claims = claims(&jwt(
            r#"{"sub":"alice","client_id":"web","scope":"read write","scp":["admin","read"],
                "aud":["api","other"],"exp":2000000000}"#,
        ))
        .unwrap();
        assert_eq!(claims.sub.as_deref(), Some("alice"));
        assert_eq!(claims.client_id.as_deref(), Some("web"));
        assert_eq!(claims.exp, Some(2_000_000_000));
        for scope in ["read", "write", "admin"] {
            assert!(claims.has_scope(scope), "{scope}");
        }
        assert_eq!(claims.scopes.len(), 3, "no duplicates");
        assert!(claims.has_audience("api") && claims.has_audience("other"));
        let single = claims_of(r#"{"aud":"api","scp":"one"}"#);
        assert!(single.has_audience("api") && single.has_scope("one"));
        let none = claims_of(r#"{}"#);
        assert_eq!(none, Claims::default());
    }

    fn claims_of(payload: &str) -> Claims {
        claims(&jwt(payload)).unwrap()
    }

    #[test]
    fn a_long_scope_claim_keeps_its_scopes() {
        let scopes: Vec<String> = (0..200).map(|n| format!("scope:{n:04}")).collect();
        let claims = claims_of(&format!(r#"{{"scope":"{}"}}"#, scopes.join(" ")));
        assert!(scopes.join(" ").len() > MAX_VALUE_LEN);
        assert_eq!(claims.scopes.len(), 200);
        assert!(claims.has_scope("scope:0199"));
    }

    #[test]
    fn misshapen_claims_are_left_out_and_only_exp_must_be_well_formed() {
        for payload in [
            r#"{"sub":42}"#,
            r#"{"aud":[1]}"#,
            r#"{"scp":{"a":1}}"#,
            r#"{"scope":["a"]}"#,
        ] {
            assert_eq!(claims_of(payload), Claims::default(), "{payload}");
        }
        assert!(claims(&jwt(r#"{"exp":"soon"}"#)).is_err());
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        let kept = claims_of(&format!(r#"{{"sub":"{long}","aud":["{long}","api"]}}"#));
        assert_eq!(kept.sub, None);
        assert_eq!(kept.audiences, vec![Box::from("api")]);
        let many: Vec<String> = (0..MAX_LISTED + 5).map(|n| format!("\"s{n}\"")).collect();
        let capped = claims_of(&format!(r#"{{"scp":[{}]}}"#, many.join(",")));
        assert_eq!(capped.scopes.len(), MAX_LISTED);
    }
}
