//! What an active token is granted, as every cache entry holds it: the `Authorization` value
//! forwarded upstream and the claims routes are checked against, in one reference-counted
//! allocation.
//!
//! A million entries are a million of these, so the layout is packed: a 17-byte header
//! (`exp`, the claims' length and how many scopes and audiences there are), the claims as
//! NUL-terminated strings (`sub`, `client_id`, each scope, each audience), then `Bearer <JWT>`.
//! One allocation instead of four (the grant, its `Authorization`, `sub`, the scope list): about
//! 180 bytes less per entry in the structure, and one cache miss instead of four when a hit
//! reads it. In the service the bytes saved only show once entries are settled ([`Grant::settle`]).

use std::sync::{Arc, OnceLock, mpsc};

use tokio::sync::oneshot;

use crate::jwt::{Claims, MAX_LISTED, MAX_VALUE_LEN};

/// An active token's grant; cloning it is a reference count.
#[derive(Clone, PartialEq, Eq)]
pub struct Grant(Arc<[u8]>);

const EXP: usize = 0; // 1 byte: whether there is one; then 8, little-endian
const CLAIMS_LEN: usize = 9; // u32, little-endian
const SCOPES: usize = 13; // u16
const AUDIENCES: usize = 15; // u16
const HEADER: usize = 17;
const BEARER: &str = "Bearer ";

impl Grant {
    /// The grant of `jwt` with `claims`. A claim value holding a NUL is left out, as values
    /// past the bounds are when a JWT is read: that can only ever deny a route, never open one
    /// (though the claim headers and Envoy's metadata then lack it too).
    pub fn new<'a>(jwt: &str, claims: &'a Claims) -> Grant {
        // Bounded as a JWT's claims are when read, whatever the source (a sealed Redis entry
        // is read without them): the lengths below then always fit their fields.
        let kept = |value: &&str| value.len() <= MAX_VALUE_LEN && !value.contains('\0');
        let list = |values: &'a [Box<str>]| -> Vec<&'a str> {
            values
                .iter()
                .map(|v| &**v)
                .filter(kept)
                .take(MAX_LISTED)
                .collect()
        };
        let scopes = list(&claims.scopes);
        let audiences = list(&claims.audiences);
        let sub = claims.sub.as_deref().filter(kept).unwrap_or_default();
        let client_id = claims.client_id.as_deref().filter(kept).unwrap_or_default();
        let strings = [sub, client_id].into_iter().chain(scopes.iter().copied());
        let strings = strings.chain(audiences.iter().copied());
        let claims_len: usize = strings.clone().map(|s| s.len() + 1).sum();

        // Written in place: collected into a `Vec` first, the kilobyte would be allocated and
        // copied twice (a Redis hit builds one of these per Check).
        let len = HEADER + claims_len + BEARER.len() + jwt.len();
        let mut grant: Arc<[u8]> = std::iter::repeat_n(0, len).collect();
        let mut out = Arc::get_mut(&mut grant).expect("a new Arc is not shared");
        let (present, exp) = claims.exp.map_or((0, 0), |exp| (1, exp));
        put(&mut out, &[present]);
        put(&mut out, &exp.to_le_bytes());
        // At most 514 values of at most 1 KiB each: well inside u32, and the counts in u16.
        put(&mut out, &(claims_len as u32).to_le_bytes());
        put(&mut out, &(scopes.len() as u16).to_le_bytes());
        put(&mut out, &(audiences.len() as u16).to_le_bytes());
        for string in strings {
            put(&mut out, string.as_bytes());
            put(&mut out, &[0]);
        }
        put(&mut out, BEARER.as_bytes());
        put(&mut out, jwt.as_bytes());
        debug_assert!(out.is_empty());
        Grant(grant)
    }

    /// A copy of the grant, made on a thread of its own: where it is to stay, in the in-process
    /// tier, for minutes or hours.
    ///
    /// glibc's malloc gives each thread an arena of its own. Made on the runtime's thread, a
    /// long-lived entry lands among the kilobytes every miss allocates and frees around it
    /// (the IdP's answer, its JSON, the decoded claims) and pins the holes they leave: a quarter
    /// more memory per entry. Made on the one settling thread, entries are packed with entries.
    /// Measured with 100k introspected tokens and a 1,000-byte JWT: 1,386 → 1,161 bytes per
    /// cached token (1,158 at a million). The flight answers its Checks before this runs, so no
    /// Check waits for it.
    pub async fn settle(self) -> Grant {
        let (settled, copy) = oneshot::channel();
        match settler() {
            Some(settler) if settler.send((self.clone(), settled)).is_ok() => {
                copy.await.unwrap_or(self)
            }
            // No thread could be started: the entry is kept as it is.
            _ => self,
        }
    }

    /// `Bearer <JWT>`, as forwarded.
    pub fn authorization(&self) -> &str {
        // Copied from a `&str` in `new`.
        std::str::from_utf8(self.authorization_bytes()).unwrap_or_default()
    }

    /// The same, as the bytes a response is written from.
    pub fn authorization_bytes(&self) -> &[u8] {
        &self.0[HEADER + self.claims_len()..]
    }

    /// `exp`, in seconds since the epoch.
    pub fn exp(&self) -> Option<u64> {
        let exp = u64::from_le_bytes(self.0[EXP + 1..CLAIMS_LEN].try_into().unwrap_or_default());
        (self.0[EXP] == 1).then_some(exp)
    }

    pub fn sub(&self) -> Option<&str> {
        self.strings().next().filter(|s| !s.is_empty())
    }

    pub fn client_id(&self) -> Option<&str> {
        self.strings().nth(1).filter(|s| !s.is_empty())
    }

    /// The scopes, from `scope` and `scp`.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.strings().skip(2).take(self.count(SCOPES))
    }

    /// The audiences, from `aud`.
    pub fn audiences(&self) -> impl Iterator<Item = &str> {
        self.strings()
            .skip(2 + self.count(SCOPES))
            .take(self.count(AUDIENCES))
    }

    /// Whether the token holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes().any(|held| held == scope)
    }

    /// Whether the token is meant for `audience`.
    pub fn has_audience(&self, audience: &str) -> bool {
        self.audiences().any(|held| held == audience)
    }

    /// The claims, owned again: what a Redis entry seals.
    pub fn claims(&self) -> Claims {
        Claims {
            exp: self.exp(),
            sub: self.sub().map(Into::into),
            client_id: self.client_id().map(Into::into),
            scopes: self.scopes().map(Into::into).collect(),
            audiences: self.audiences().map(Into::into).collect(),
        }
    }

    /// Bytes held, for the in-process tier's byte bound.
    pub fn size(&self) -> usize {
        self.0.len()
    }

    fn claims_len(&self) -> usize {
        u32::from_le_bytes(self.0[CLAIMS_LEN..SCOPES].try_into().unwrap_or_default()) as usize
    }

    fn count(&self, at: usize) -> usize {
        usize::from(u16::from_le_bytes([self.0[at], self.0[at + 1]]))
    }

    /// `sub`, `client_id`, the scopes and the audiences, in that order.
    fn strings(&self) -> impl Iterator<Item = &str> {
        let claims = &self.0[HEADER..HEADER + self.claims_len()];
        claims
            .split(|&b| b == 0)
            .map(|s| std::str::from_utf8(s).unwrap_or_default())
    }
}

/// Writes `bytes` at the start of `out` and moves `out` past them.
fn put(out: &mut &mut [u8], bytes: &[u8]) {
    let (head, rest) = std::mem::take(out).split_at_mut(bytes.len());
    head.copy_from_slice(bytes);
    *out = rest;
}

type Settle = (Grant, oneshot::Sender<Grant>);

/// The settling thread's queue, started on first use; one thread for the process, so one
/// arena for its entries.
fn settler() -> Option<&'static mpsc::Sender<Settle>> {
    static SETTLER: OnceLock<Option<mpsc::Sender<Settle>>> = OnceLock::new();
    SETTLER
        .get_or_init(|| {
            let (queue, grants) = mpsc::channel::<Settle>();
            let started = std::thread::Builder::new()
                .name("phantom-authz-settle".into())
                .spawn(move || {
                    for (grant, settled) in grants {
                        let _ = settled.send(Grant(Arc::from(&grant.0[..])));
                    }
                });
            match started {
                Ok(_) => Some(queue),
                Err(error) => {
                    tracing::warn!(%error, "no thread to settle cache entries on; keeping them where they are made");
                    None
                }
            }
        })
        .as_ref()
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Claims name the caller; the JWT is a credential: only its length is shown.
        f.debug_struct("Grant")
            .field("authorization_len", &self.authorization_bytes().len())
            .field("scopes", &self.count(SCOPES))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(
        sub: Option<&str>,
        client_id: Option<&str>,
        scopes: &[&str],
        auds: &[&str],
    ) -> Claims {
        Claims {
            exp: Some(2_000_000_000),
            sub: sub.map(Into::into),
            client_id: client_id.map(Into::into),
            scopes: scopes.iter().map(|&s| s.into()).collect(),
            audiences: auds.iter().map(|&a| a.into()).collect(),
        }
    }

    #[test]
    fn every_claim_reads_back_as_given() {
        let long = "x".repeat(1024);
        for claims in [
            Claims::default(),
            claims(Some("alice"), Some("web"), &["read", "write"], &["api"]),
            claims(None, Some("svc"), &[], &["a", "b", "c"]),
            claims(Some("ü-ñ"), None, &["only"], &[]),
            claims(
                Some(&long),
                Some(&long),
                &[long.as_str(); 256],
                &[long.as_str(); 256],
            ),
        ] {
            for jwt in ["a.b.c", &format!("h.{}.s", "p".repeat(5000))] {
                let grant = Grant::new(jwt, &claims);
                assert_eq!(grant.claims(), claims);
                assert_eq!(grant.authorization(), format!("Bearer {jwt}"));
                assert_eq!(
                    grant.authorization_bytes(),
                    grant.authorization().as_bytes()
                );
                assert_eq!(grant.has_scope("read"), claims.has_scope("read"));
                assert_eq!(grant.has_audience("api"), claims.has_audience("api"));
            }
        }
        let none = Claims {
            exp: None,
            ..Claims::default()
        };
        assert_eq!(Grant::new("a.b.c", &none).exp(), None);
        let zero = Claims {
            exp: Some(0),
            ..Claims::default()
        };
        assert_eq!(Grant::new("a.b.c", &zero).exp(), Some(0));
    }

    #[test]
    fn a_value_holding_a_nul_is_left_out_and_cannot_shift_the_others() {
        let grant = Grant::new(
            "a.b.c",
            &claims(
                Some("a\0b"),
                Some("web"),
                &["read\0admin", "write"],
                &["x\0", "api"],
            ),
        );
        assert_eq!(grant.sub(), None);
        assert_eq!(grant.client_id(), Some("web"));
        assert_eq!(grant.scopes().collect::<Vec<_>>(), ["write"]);
        assert_eq!(grant.audiences().collect::<Vec<_>>(), ["api"]);
        assert!(!grant.has_scope("admin") && !grant.has_scope("read"));
    }

    #[test]
    fn lists_past_the_bounds_are_cut_and_cannot_spill_into_each_other() {
        // A sealed Redis entry is read without the bounds a JWT is read with.
        let many: Vec<String> = (0..70_000).map(|i| format!("s{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let grant = Grant::new("a.b.c", &claims(None, None, &many, &["api"]));
        assert_eq!(grant.scopes().count(), MAX_LISTED);
        assert_eq!(grant.audiences().collect::<Vec<_>>(), ["api"]);
        assert!(!grant.has_audience("s1"));
        let long = "x".repeat(MAX_VALUE_LEN + 1);
        let grant = Grant::new("a.b.c", &claims(Some(&long), None, &[&long], &[]));
        assert_eq!((grant.sub(), grant.scopes().count()), (None, 0));
    }

    #[test]
    fn debug_hides_the_jwt_and_the_claims() {
        let grant = Grant::new(
            "eyJ.secret.sig",
            &claims(Some("alice"), None, &["read"], &[]),
        );
        let shown = format!("{grant:?}");
        assert!(
            !shown.contains("secret") && !shown.contains("alice"),
            "{shown}"
        );
    }
}
