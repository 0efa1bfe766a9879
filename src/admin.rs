//! The operators' gRPC API, `phantom_authz.admin.v1.Admin`: `EvictToken` drops a token from
//! every cache tier of every replica (see [`crate::cache::evictions`] for how replicas hear of
//! it), behind a bearer-secret guard compared in constant time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tonic::service::Interceptor;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::authorizer::Authorizer;
use crate::config::Secret;
use crate::metrics::{self, EvictionSource};
use crate::reflection;
use crate::token::{self, CacheKey};

/// Code generated from `proto/phantom_authz/admin/v1/admin.proto`.
pub mod proto {
    tonic::include_proto!("phantom_authz.admin.v1");
}

use proto::admin_server::{Admin, AdminServer};
use proto::{EvictTokenRequest, EvictTokenResponse};

impl std::fmt::Debug for EvictTokenRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EvictTokenRequest(token len={})", self.token.len())
    }
}

/// Bound on one admin call; an eviction takes at most two Redis timeouts and the 2 s wait for
/// replicas' confirmations.
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin API: evicts tokens through the authorizer's cache tiers.
pub struct AdminService {
    authorizer: Arc<Authorizer>,
    max_token_length: usize,
}

impl AdminService {
    pub fn new(authorizer: Arc<Authorizer>, max_token_length: usize) -> Self {
        Self {
            authorizer,
            max_token_length,
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn evict_token(
        &self,
        request: Request<EvictTokenRequest>,
    ) -> Result<Response<EvictTokenResponse>, Status> {
        let request = request.into_inner();
        let token = token::parse_token(&request.token, self.max_token_length).map_err(|_| {
            Status::invalid_argument(
                "token: not a bearer token (give it without the `Bearer ` scheme; RFC 6750 \
                 characters only, at most --max-token-length long)",
            )
        })?;
        let key = CacheKey::of(token);
        match self.authorizer.evict(token).await {
            Ok(eviction) => {
                metrics::eviction(EvictionSource::Api);
                if eviction.confirmed < eviction.notified {
                    tracing::warn!(
                        key = ?key,
                        replicas_notified = eviction.notified,
                        replicas_confirmed = eviction.confirmed,
                        "token evicted, but not every replica confirmed in time"
                    );
                } else {
                    tracing::info!(
                        key = ?key,
                        redis_deleted = eviction.deleted,
                        replicas_notified = eviction.notified,
                        "token evicted"
                    );
                }
                Ok(Response::new(EvictTokenResponse {
                    redis_deleted: eviction.deleted,
                    replicas_notified: u32::try_from(eviction.notified).unwrap_or(u32::MAX),
                    replicas_confirmed: u32::try_from(eviction.confirmed).unwrap_or(u32::MAX),
                }))
            }
            Err(error) => {
                tracing::warn!(key = ?key, %error, "eviction did not reach redis");
                Err(Status::unavailable(
                    "redis did not answer: this replica dropped its copy, but other replicas may \
                     not have heard of the eviction (and the Redis entry may remain); retry",
                ))
            }
        }
    }
}

/// Admits admin calls carrying `authorization: Bearer <secret>`.
///
/// Only a digest of the secret is kept, and a presented value is compared by its digest in
/// constant time: the time taken says nothing about how much of the secret a guess got right.
#[derive(Clone)]
pub struct AdminGuard {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminGuard(***)")
    }
}

impl AdminGuard {
    pub fn new(secret: &Secret) -> Self {
        Self {
            digest: digest(secret.expose().as_bytes()),
        }
    }

    /// Whether an `authorization` header value carries the secret.
    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(value) = authorization else {
            return false;
        };
        let Some(presented) = strip_bearer(value) else {
            return false;
        };
        constant_time_eq(&digest(presented), &self.digest)
    }
}

impl Interceptor for AdminGuard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        if self.admits(authorization) {
            Ok(request)
        } else {
            tracing::warn!("admin call refused: missing or wrong bearer secret");
            Err(Status::unauthenticated(
                "admin API: missing or wrong `authorization: Bearer` secret",
            ))
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"phantom-authz admin secret v1\0");
    hasher.update(bytes);
    hasher.finalize().into()
}

/// `Bearer <credential>`, scheme case-insensitive; the credential with surrounding blanks cut.
fn strip_bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let credential = rest.trim_ascii();
    (!credential.is_empty()).then_some(credential)
}

/// Compares two digests without an early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// The admin API's descriptors, for reflection; encoded by the build script.
const ADMIN_DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/admin_descriptor.bin"));

/// Serves the admin API on `listener`, every call behind `guard`, until `shutdown` resolves;
/// over TLS when `tls` is given. Reflection describes the API's schema (not guarded: it reveals
/// no data).
pub async fn serve(
    listener: TcpListener,
    service: AdminService,
    guard: AdminGuard,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .timeout(ADMIN_CALL_TIMEOUT)
        .add_service(AdminServer::with_interceptor(service, guard))
        .add_optional_service(reflection::service(&[ADMIN_DESCRIPTORS]))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_admits_only_the_secret() {
        let guard = AdminGuard::new(&Secret::new("correct-horse-battery-staple"));
        assert!(guard.admits(Some(b"Bearer correct-horse-battery-staple")));
        assert!(guard.admits(Some(b"bearer  correct-horse-battery-staple ")));
        for refused in [
            &b"Bearer correct-horse-battery-stapl"[..],
            b"Bearer correct-horse-battery-staple2",
            b"Basic correct-horse-battery-staple",
            b"correct-horse-battery-staple",
            b"Bearer ",
            b"Bearer",
            b"",
        ] {
            assert!(
                !guard.admits(Some(refused)),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
        assert!(!guard.admits(None));
        assert!(!format!("{guard:?}").contains("horse"));
    }

    #[test]
    fn requests_do_not_debug_print_the_token() {
        let request = EvictTokenRequest {
            token: "opaque-secret-token".into(),
        };
        assert!(!format!("{request:?}").contains("opaque"));
    }

    #[test]
    fn constant_time_eq_compares_every_byte() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[31] ^= 1;
        assert!(!constant_time_eq(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!constant_time_eq(&a, &b));
    }
}
