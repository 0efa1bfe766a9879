//! rfc7662 mode: the JWT phantom-authz signs from a standard introspection answer, for identity
//! servers that do not issue one themselves. Pure but for the clock and the random `jti`, both
//! handed in.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::MintConfig;
use crate::jose::{KeySet, SignError};
use crate::jwt;

/// The `typ` of the JWTs signed: an OAuth access token in JWT form (RFC 9068).
const TYP: &str = "at+jwt";

/// Signs a JWT for each active answer.
#[derive(Debug)]
pub struct Minter {
    issuer: String,
    /// The `aud` of answers that carry none.
    audience: Option<String>,
    forward_claims: Vec<String>,
    keys: Arc<KeySet>,
    /// No JWT lives longer than this from its signing (`--max-cache-ttl`), whatever the
    /// answer's `exp`: no cache entry outlives it, and a JWT that leaks upstream ends soon.
    max_lifetime: Duration,
}

/// Why an active answer yields no JWT. Never carries the answer's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// The answer itself is unusable (as an IdP's bad response).
    #[error("{0}")]
    Answer(&'static str),
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// Claims of the answer that are part of the token's meaning and always carried as they are:
/// a sender constraint (RFC 8705 `cnf`) that the API may check, and a delegation (RFC 8693
/// `act`). Dropping them would turn a bound or delegated token into a plain bearer one.
const MEANING_CLAIMS: &[&str] = &["cnf", "act"];

impl Minter {
    pub fn new(config: &MintConfig, keys: Arc<KeySet>, max_lifetime: Duration) -> Self {
        Self {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            forward_claims: config.forward_claims.clone(),
            keys,
            max_lifetime,
        }
    }

    /// The keys, whose public halves the admin listener publishes.
    pub fn keys(&self) -> &Arc<KeySet> {
        &self.keys
    }

    /// The JWT for an active answer at `now` (seconds since the epoch): `iss`, `sub` (the
    /// answer's; a client-credentials answer, without one, gets its `client_id`: a client acting
    /// for itself), `client_id`, `scope`, `aud` (the answer's, else `--jwt-audience`), `exp`
    /// (the answer's, never later, and at most `max_lifetime` away), `iat`, a fresh `jti`,
    /// `cnf` and `act`, and the forwarded claims. `jti` is handed in so that tests can fix it.
    pub fn mint(
        &self,
        answer: &Map<String, Value>,
        now: u64,
        jti: String,
    ) -> Result<String, MintError> {
        let latest = now.saturating_add(self.max_lifetime.as_secs());
        let exp = match answer.get("exp") {
            Some(exp) => jwt::numeric_date(exp)
                .map_err(|bad| MintError::Answer(bad.0))?
                .min(latest),
            None => latest,
        };
        // Who the token is for is never guessed: a field of the wrong type is a bad answer,
        // not a missing one (a numeric `sub` must not make every user the client).
        let text = |name: &str| match answer.get(name) {
            None => Ok(None),
            Some(Value::String(value)) if !value.is_empty() => Ok(Some(value.as_str())),
            Some(_) => Err(MintError::Answer(
                "`sub`, `client_id` or `scope` is not a non-empty string",
            )),
        };
        let (sub, client_id, scope) = (text("sub")?, text("client_id")?, text("scope")?);
        let aud = match answer.get("aud") {
            None => self.audience.as_deref().map(Value::from),
            Some(aud @ Value::String(value)) if !value.is_empty() => Some(aud.clone()),
            Some(Value::Array(items))
                if !items.is_empty() && items.iter().all(|item| item.is_string()) =>
            {
                Some(Value::Array(items.clone()))
            }
            Some(_) => {
                return Err(MintError::Answer(
                    "`aud` is not a string or an array of strings",
                ));
            }
        };

        let mut claims = Map::new();
        for name in self
            .forward_claims
            .iter()
            .map(String::as_str)
            .chain(MEANING_CLAIMS.iter().copied())
        {
            if let Some(value) = answer.get(name) {
                claims.insert(name.to_owned(), value.clone());
            }
        }
        claims.insert("iss".into(), self.issuer.as_str().into());
        if let Some(sub) = sub.or(client_id) {
            claims.insert("sub".into(), sub.into());
        }
        if let Some(client_id) = client_id {
            claims.insert("client_id".into(), client_id.into());
        }
        if let Some(scope) = scope {
            claims.insert("scope".into(), scope.into());
        }
        if let Some(aud) = aud {
            claims.insert("aud".into(), aud);
        }
        claims.insert("exp".into(), exp.into());
        claims.insert("iat".into(), now.into());
        claims.insert("jti".into(), jti.into());
        Ok(self.keys.signing().sign(TYP, &claims)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::tests::pem;
    use crate::jose::{Algorithm, read_pem_keys};
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn minter(audience: Option<&str>, forward: &[&str]) -> Minter {
        let keys = read_pem_keys(pem(Algorithm::Es256).as_bytes()).unwrap();
        let config = MintConfig {
            issuer: "https://authz.example".into(),
            audience: audience.map(str::to_owned),
            forward_claims: forward.iter().map(|c| (*c).to_owned()).collect(),
            key_file: "unused".into(),
            algorithm: Algorithm::Es256,
        };
        Minter::new(
            &config,
            Arc::new(KeySet::new(keys, Algorithm::Es256).unwrap()),
            Duration::from_secs(300),
        )
    }

    fn payload(jwt: &str) -> Value {
        let part = jwt.split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
    }

    fn answer(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_jwt_carries_the_answer_and_our_own_claims() {
        let minter = minter(None, &["username", "missing"]);
        let jwt = minter
            .mint(
                &answer(
                    r#"{"active":true,"sub":"alice","client_id":"app","scope":"read write",
                        "aud":["api","web"],"exp":1900000200,"username":"Alice",
                        "iss":"https://idp","jti":"theirs","token_type":"Bearer",
                        "cnf":{"x5t#S256":"bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}}"#,
                ),
                1_900_000_000,
                "j1".into(),
            )
            .unwrap();
        assert_eq!(
            payload(&jwt),
            serde_json::json!({
                "iss": "https://authz.example", "sub": "alice", "client_id": "app",
                "scope": "read write", "aud": ["api", "web"], "exp": 1900000200u64,
                "iat": 1900000000u64, "jti": "j1", "username": "Alice",
                "cnf": {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}
            })
        );
    }

    #[test]
    fn the_jwt_never_outlives_the_token_nor_the_cache_bound() {
        let minter = minter(None, &[]);
        let exp = |answer_json: &str| {
            payload(
                &minter
                    .mint(&answer(answer_json), 1_000, "j".into())
                    .unwrap(),
            )["exp"]
                .clone()
        };
        assert_eq!(exp(r#"{"exp":1100}"#), 1_100, "the token's own end");
        assert_eq!(
            exp(r#"{"exp":9999999999}"#),
            1_300,
            "--max-cache-ttl from now"
        );
        assert_eq!(exp(r#"{"exp":1e300}"#), 1_300, "an absurd exp");
        assert_eq!(exp(r#"{}"#), 1_300, "no exp: the cache bound");
        assert_eq!(
            minter.mint(&answer(r#"{"exp":"soon"}"#), 1, "j".into()),
            Err(MintError::Answer("`exp` is not a NumericDate"))
        );
    }

    #[test]
    fn the_configured_audience_fills_in_and_never_replaces() {
        let minter = minter(Some("orders-api"), &[]);
        let claims = |answer_json: &str| {
            payload(
                &minter
                    .mint(&answer(answer_json), 1_000, "j".into())
                    .unwrap(),
            )
        };
        let client_credentials = claims(r#"{"client_id":"app"}"#);
        assert_eq!(
            client_credentials["sub"], "app",
            "a client acting for itself"
        );
        assert_eq!(client_credentials["aud"], "orders-api");
        // A token the server issued for another API stays that API's.
        assert_eq!(claims(r#"{"aud":"payments-api"}"#)["aud"], "payments-api");
    }

    #[test]
    fn identity_fields_of_the_wrong_type_are_a_bad_answer() {
        let minter = minter(Some("orders-api"), &[]);
        for bad in [
            r#"{"sub":12345,"client_id":"web"}"#,
            r#"{"sub":"","client_id":"web"}"#,
            r#"{"client_id":["web"]}"#,
            r#"{"scope":["read"]}"#,
            r#"{"aud":7}"#,
            r#"{"aud":["api",7]}"#,
            r#"{"aud":[]}"#,
        ] {
            assert!(
                matches!(
                    minter.mint(&answer(bad), 1_000, "j".into()),
                    Err(MintError::Answer(_))
                ),
                "{bad}"
            );
        }
    }
}
