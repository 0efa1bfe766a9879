//! The compact JWS shape every JWT we forward must have, and the `exp` it carries. Pure.
//!
//! phantom-authz does not verify signatures (the API behind the gateway does); it checks that
//! what it forwards is three non-empty base64url parts, nothing else (so nothing that could
//! break out of a header), with a JSON object payload, and reads `exp` so that no JWT is ever
//! handed out after it expired.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a value is not a usable JWT: a fixed, bounded description, never the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

const NOT_A_JWT: Malformed = Malformed("not a compact JWT");

/// Checks the compact JWS shape (three non-empty base64url parts, a JSON object payload) and
/// returns the payload's `exp`, in seconds since the epoch.
pub fn exp(jwt: &str) -> Result<Option<u64>, Malformed> {
    let mut parts = jwt.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(NOT_A_JWT);
    };
    let base64url = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !(base64url(header) && base64url(payload) && base64url(signature)) {
        return Err(NOT_A_JWT);
    }
    let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| NOT_A_JWT)?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).map_err(|_| NOT_A_JWT)?;
    let claims = claims.as_object().ok_or(NOT_A_JWT)?;
    claims.get("exp").map(numeric_date).transpose()
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
