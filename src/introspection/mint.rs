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
    audience: Option<String>,
    forward_claims: Vec<String>,
    keys: Arc<KeySet>,
    /// An answer without `exp` gets a JWT that lives this long (`--max-cache-ttl`).
    lifetime_without_exp: Duration,
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

impl Minter {
    pub fn new(config: &MintConfig, keys: Arc<KeySet>, lifetime_without_exp: Duration) -> Self {
        Self {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            forward_claims: config.forward_claims.clone(),
            keys,
            lifetime_without_exp,
        }
    }

    /// The keys, whose public halves the admin listener publishes.
    pub fn keys(&self) -> &Arc<KeySet> {
        &self.keys
    }

    /// The JWT for an active answer at `now` (seconds since the epoch): `iss`, `sub` (the
    /// answer's, else its `client_id`: a client acting for itself), `client_id`, `scope`,
    /// `aud`, `exp` (the answer's, never later), `iat`, a fresh `jti`, and the forwarded
    /// claims. `jti` is handed in so that tests can fix it.
    pub fn mint(
        &self,
        answer: &Map<String, Value>,
        now: u64,
        jti: String,
    ) -> Result<String, MintError> {
        let exp = match answer.get("exp") {
            Some(exp) => jwt::numeric_date(exp).map_err(|bad| MintError::Answer(bad.0))?,
            None => now.saturating_add(self.lifetime_without_exp.as_secs()),
        };
        let text = |name: &str| {
            answer
                .get(name)
                .and_then(Value::as_str)
                .filter(|value| !value.is_empty())
        };
        let mut claims = Map::new();
        for name in &self.forward_claims {
            if let Some(value) = answer.get(name) {
                claims.insert(name.clone(), value.clone());
            }
        }
        claims.insert("iss".into(), self.issuer.as_str().into());
        if let Some(sub) = text("sub").or_else(|| text("client_id")) {
            claims.insert("sub".into(), sub.into());
        }
        if let Some(client_id) = text("client_id") {
            claims.insert("client_id".into(), client_id.into());
        }
        if let Some(scope) = text("scope") {
            claims.insert("scope".into(), scope.into());
        }
        match (&self.audience, answer.get("aud")) {
            (Some(audience), _) => {
                claims.insert("aud".into(), audience.as_str().into());
            }
            (None, Some(aud @ Value::String(_))) => {
                claims.insert("aud".into(), aud.clone());
            }
            (None, Some(Value::Array(items))) => {
                let audiences: Vec<Value> = items
                    .iter()
                    .filter(|item| item.is_string())
                    .cloned()
                    .collect();
                if !audiences.is_empty() {
                    claims.insert("aud".into(), Value::Array(audiences));
                }
            }
            (None, _) => {}
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
                        "aud":["api",7],"exp":2000000000,"username":"Alice","iss":"https://idp",
                        "jti":"theirs","token_type":"Bearer"}"#,
                ),
                1_900_000_000,
                "j1".into(),
            )
            .unwrap();
        assert_eq!(
            payload(&jwt),
            serde_json::json!({
                "iss": "https://authz.example", "sub": "alice", "client_id": "app",
                "scope": "read write", "aud": ["api"], "exp": 2000000000u64,
                "iat": 1900000000u64, "jti": "j1", "username": "Alice"
            })
        );
    }

    #[test]
    fn client_credentials_answers_and_fixed_audiences() {
        let minter = minter(Some("orders-api"), &["sub"]);
        let jwt = minter
            .mint(
                &answer(r#"{"active":true,"client_id":"app","aud":"other","sub":""}"#),
                1_000,
                "j2".into(),
            )
            .unwrap();
        let claims = payload(&jwt);
        assert_eq!(claims["sub"], "app", "a client acting for itself");
        assert_eq!(claims["aud"], "orders-api");
        assert_eq!(claims["exp"], 1_300, "no exp: the cache bound");

        assert_eq!(
            minter.mint(&answer(r#"{"exp":"soon"}"#), 1, "j".into()),
            Err(MintError::Answer("`exp` is not a NumericDate"))
        );
    }
}
