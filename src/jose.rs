//! Signing keys for the JWTs phantom-authz issues itself (rfc7662 mode's access tokens and
//! `private_key_jwt` client assertions): PKCS#8 PEM in, compact JWS out, and the public half as a
//! JWK named by its RFC 7638 thumbprint. The cryptography is ring's; this module only frames it.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject as _;
use serde_json::{Map, Value, json};
use sha2::{Digest as _, Sha256};

/// A JWS algorithm phantom-authz signs with; each key type has exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    /// ECDSA on P-256 with SHA-256.
    #[value(name = "ES256")]
    Es256,
    /// Ed25519.
    #[value(name = "EdDSA")]
    EdDsa,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (keys of 2048 to 4096 bits).
    #[value(name = "RS256")]
    Rs256,
}

impl Algorithm {
    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Es256 => "ES256",
            Algorithm::EdDsa => "EdDSA",
            Algorithm::Rs256 => "RS256",
        }
    }
}

/// Why a key file holds no usable key. Never carries key material.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no PEM private key found")]
    NoKey,
    #[error("not valid PEM")]
    Pem,
    #[error(
        "key {0} is not PKCS#8 (`-----BEGIN PRIVATE KEY-----`); convert it with \
         `openssl pkcs8 -topk8 -nocrypt -in old.pem -out new.pem`"
    )]
    NotPkcs8(usize),
    #[error("key {0} is not a P-256, Ed25519 or RSA (2048 to 4096 bits) private key")]
    Unsupported(usize),
    #[error("the first key is {found}, not {wanted} as --jwt-signing-alg asks")]
    WrongAlgorithm {
        found: &'static str,
        wanted: &'static str,
    },
}

/// The signature could not be made (the system's random source failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("signing failed")]
pub struct SignError;

/// A private key, its algorithm and its public JWK. `Debug` shows the `kid` only.
pub struct SigningKey {
    pair: Pair,
    kid: String,
    /// The public JWK, `kid`, `alg` and `use` included.
    jwk: Map<String, Value>,
}

enum Pair {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
    Rs256(RsaKeyPair),
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.algorithm())
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Reads one PKCS#8 DER private key of a supported type; `index` numbers it in errors.
    fn from_pkcs8(der: &[u8], index: usize) -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let pair = if let Ok(pair) =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
        {
            Pair::Es256(pair)
        } else if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            Pair::EdDsa(pair)
        } else if let Ok(pair) = RsaKeyPair::from_pkcs8(der) {
            Pair::Rs256(pair)
        } else {
            return Err(KeyError::Unsupported(index));
        };
        // RFC 7638: the required members only, in lexicographic order, no whitespace.
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let members: Vec<(&str, String)> = match &pair {
            Pair::Es256(pair) => {
                // Uncompressed SEC1 point: 0x04, then x and y.
                let point = pair.public_key().as_ref();
                vec![
                    ("crv", "P-256".into()),
                    ("kty", "EC".into()),
                    ("x", b64(&point[1..33])),
                    ("y", b64(&point[33..65])),
                ]
            }
            Pair::EdDsa(pair) => vec![
                ("crv", "Ed25519".into()),
                ("kty", "OKP".into()),
                ("x", b64(pair.public_key().as_ref())),
            ],
            Pair::Rs256(pair) => {
                let public: signature::RsaPublicKeyComponents<Vec<u8>> = pair.public().into();
                // JWK integers are unsigned big-endian without leading zero bytes (RFC 7518 §6.3).
                let unsigned = |bytes: &[u8]| {
                    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
                    b64(&bytes[start..])
                };
                vec![
                    ("e", unsigned(&public.e)),
                    ("kty", "RSA".into()),
                    ("n", unsigned(&public.n)),
                ]
            }
        };
        let canonical: Map<String, Value> = members
            .iter()
            .map(|(name, value)| ((*name).to_owned(), Value::from(value.as_str())))
            .collect();
        // serde_json's map is ordered by key, which is RFC 7638's order.
        let kid = b64(&Sha256::digest(
            Value::Object(canonical.clone()).to_string(),
        ));
        let mut key = Self {
            pair,
            kid,
            jwk: canonical,
        };
        let alg = key.algorithm().name();
        key.jwk.insert("kid".into(), key.kid.clone().into());
        key.jwk.insert("alg".into(), alg.into());
        key.jwk.insert("use".into(), "sig".into());
        Ok(key)
    }

    pub fn algorithm(&self) -> Algorithm {
        match self.pair {
            Pair::Es256(_) => Algorithm::Es256,
            Pair::EdDsa(_) => Algorithm::EdDsa,
            Pair::Rs256(_) => Algorithm::Rs256,
        }
    }

    /// The RFC 7638 thumbprint of the public key, base64url: the `kid` of what it signs.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public JWK.
    pub fn jwk(&self) -> &Map<String, Value> {
        &self.jwk
    }

    /// A compact JWS of `claims`, with `alg`, `kid` and the given `typ` in its header.
    pub fn sign(&self, typ: &str, claims: &Map<String, Value>) -> Result<String, SignError> {
        let header = json!({ "alg": self.algorithm().name(), "kid": self.kid, "typ": typ });
        let mut jws = URL_SAFE_NO_PAD.encode(header.to_string());
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(claims).map_err(|_| SignError)?, &mut jws);
        let rng = SystemRandom::new();
        let signature = match &self.pair {
            Pair::Es256(pair) => pair
                .sign(&rng, jws.as_bytes())
                .map_err(|_| SignError)?
                .as_ref()
                .to_vec(),
            Pair::EdDsa(pair) => pair.sign(jws.as_bytes()).as_ref().to_vec(),
            Pair::Rs256(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(
                    &signature::RSA_PKCS1_SHA256,
                    &rng,
                    jws.as_bytes(),
                    &mut signature,
                )
                .map_err(|_| SignError)?;
                signature
            }
        };
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut jws);
        Ok(jws)
    }
}

/// Every PKCS#8 private key in a PEM file, in order. Certificates and other sections are
/// skipped; a key in another encoding (SEC1 `EC PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY`) is an
/// error that says how to convert it.
pub fn read_pem_keys(pem: &[u8]) -> Result<Vec<SigningKey>, KeyError> {
    let mut keys = Vec::new();
    for (index, key) in PrivateKeyDer::pem_slice_iter(pem).enumerate() {
        let number = index + 1;
        match key.map_err(|_| KeyError::Pem)? {
            PrivateKeyDer::Pkcs8(der) => {
                keys.push(SigningKey::from_pkcs8(der.secret_pkcs8_der(), number)?)
            }
            _ => return Err(KeyError::NotPkcs8(number)),
        }
    }
    if keys.is_empty() {
        return Err(KeyError::NoKey);
    }
    Ok(keys)
}

/// The signing keys of a deployment: the first signs, all are published.
#[derive(Debug)]
pub struct KeySet {
    keys: Vec<SigningKey>,
}

impl KeySet {
    /// `keys` from [`read_pem_keys`]; the first must be of `algorithm`.
    pub fn new(keys: Vec<SigningKey>, algorithm: Algorithm) -> Result<Self, KeyError> {
        let first = keys.first().ok_or(KeyError::NoKey)?;
        if first.algorithm() != algorithm {
            return Err(KeyError::WrongAlgorithm {
                found: first.algorithm().name(),
                wanted: algorithm.name(),
            });
        }
        Ok(Self { keys })
    }

    /// The key that signs.
    pub fn signing(&self) -> &SigningKey {
        &self.keys[0]
    }

    /// The JWK Set (RFC 7517 §5) of every key's public half.
    pub fn jwks(&self) -> String {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|key| Value::Object(key.jwk.clone()))
            .collect();
        json!({ "keys": keys }).to_string()
    }
}

/// A fresh, unguessable `jti`: 128 random bits, base64url.
pub fn random_id() -> Result<String, SignError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|_| SignError)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A PEM PKCS#8 private key of each supported type, made for these tests.
    pub(crate) fn pem(algorithm: Algorithm) -> String {
        let rng = SystemRandom::new();
        let der = match algorithm {
            Algorithm::Es256 => {
                EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .unwrap()
                    .as_ref()
                    .to_vec()
            }
            Algorithm::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng)
                .unwrap()
                .as_ref()
                .to_vec(),
            // ring cannot generate RSA keys; openssl (on every Debian, with ca-certificates) can.
            Algorithm::Rs256 => {
                let out = std::process::Command::new("openssl")
                    .args([
                        "genpkey",
                        "-algorithm",
                        "RSA",
                        "-pkeyopt",
                        "rsa_keygen_bits:2048",
                    ])
                    .output()
                    .expect("openssl");
                assert!(out.status.success());
                return String::from_utf8(out.stdout).unwrap();
            }
        };
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        )
    }

    fn verify(key: &SigningKey, jws: &str) -> bool {
        let (signed, signature) = jws.rsplit_once('.').unwrap();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        let jwk = key.jwk();
        let field = |name: &str| URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap()).unwrap();
        match key.algorithm() {
            Algorithm::Es256 => {
                let mut point = vec![4];
                point.extend(field("x"));
                point.extend(field("y"));
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(signed.as_bytes(), &signature)
                    .is_ok()
            }
            Algorithm::EdDsa => signature::UnparsedPublicKey::new(&signature::ED25519, field("x"))
                .verify(signed.as_bytes(), &signature)
                .is_ok(),
            Algorithm::Rs256 => signature::RsaPublicKeyComponents {
                n: field("n"),
                e: field("e"),
            }
            .verify(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                signed.as_bytes(),
                &signature,
            )
            .is_ok(),
        }
    }

    #[test]
    fn each_algorithm_signs_what_its_jwk_verifies() {
        for algorithm in [Algorithm::Es256, Algorithm::EdDsa, Algorithm::Rs256] {
            let keys = read_pem_keys(pem(algorithm).as_bytes()).unwrap();
            let key = &keys[0];
            assert_eq!(key.algorithm(), algorithm);
            let claims: Map<String, Value> =
                serde_json::from_str(r#"{"sub":"alice","exp":2000000000}"#).unwrap();
            let jws = key.sign("at+jwt", &claims).unwrap();
            assert!(verify(key, &jws), "{algorithm:?}");
            let mut tampered = jws.clone();
            tampered.insert(jws.find('.').unwrap() + 1, 'A');
            assert!(!verify(key, &tampered), "{algorithm:?}");

            let parsed = crate::jwt::claims(&jws).unwrap();
            assert_eq!(parsed.sub.as_deref(), Some("alice"));
            let header: Value = serde_json::from_slice(
                &URL_SAFE_NO_PAD
                    .decode(jws.split('.').next().unwrap())
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(header["alg"], algorithm.name());
            assert_eq!(header["kid"], key.kid());
            assert_eq!(header["typ"], "at+jwt");
            assert_eq!(key.jwk()["alg"], algorithm.name());
        }
    }

    #[test]
    fn thumbprint_matches_rfc_7638_example() {
        // RFC 7638 §3.1: this RSA key's thumbprint is NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs.
        // The check recomputes it the way SigningKey does, from the canonical members.
        let canonical = r#"{"e":"AQAB","kty":"RSA","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}"#;
        assert_eq!(
            URL_SAFE_NO_PAD.encode(Sha256::digest(canonical)),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        let parsed: Value = serde_json::from_str(canonical).unwrap();
        assert_eq!(
            parsed.to_string(),
            canonical,
            "serde_json keeps RFC 7638's order"
        );
    }

    #[test]
    fn key_files_are_read_in_order_and_checked() {
        let es = pem(Algorithm::Es256);
        let ed = pem(Algorithm::EdDsa);
        let both = format!("{es}{ed}");
        let keys = read_pem_keys(both.as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].algorithm(), Algorithm::EdDsa);
        assert_ne!(keys[0].kid(), keys[1].kid());
        let set = KeySet::new(keys, Algorithm::Es256).unwrap();
        let jwks: Value = serde_json::from_str(&set.jwks()).unwrap();
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
        assert!(jwks["keys"][0].get("d").is_none(), "no private part");

        let keys = read_pem_keys(both.as_bytes()).unwrap();
        assert_eq!(
            KeySet::new(keys, Algorithm::EdDsa).unwrap_err(),
            KeyError::WrongAlgorithm {
                found: "ES256",
                wanted: "EdDSA"
            }
        );
        assert_eq!(read_pem_keys(b"").unwrap_err(), KeyError::NoKey);
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIA==\n-----END EC PRIVATE KEY-----\n";
        assert_eq!(
            read_pem_keys(sec1.as_bytes()).unwrap_err(),
            KeyError::NotPkcs8(1)
        );
        let junk = "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n";
        assert_eq!(
            read_pem_keys(format!("{es}{junk}").as_bytes()).unwrap_err(),
            KeyError::Unsupported(2)
        );
        let key = read_pem_keys(es.as_bytes()).unwrap().remove(0);
        let shown = format!("{key:?}");
        assert!(
            shown.contains(key.kid()) && !shown.contains("BEGIN"),
            "{shown}"
        );
    }
}
