//! The composition root. [`App::build`] turns a validated [`Config`] into every part of the
//! service, reading each file and constructing each client once (so `check-config` is `build`
//! without binding); [`App::run`] serves the given listeners until the shutdown future resolves,
//! then drains everything within the grace.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::admin::{self, AdminGuard, AdminService};
use crate::authorizer::{Authorizer, Ttls};
use crate::cache::SharedCache;
use crate::cache::evictions;
use crate::cache::local::LocalCache;
use crate::cache::redis::{self, CacheSecrets, RedisCache, SecretFileError};
use crate::config::{
    ADMIN_GRPC_TLS_FLAGS, ClientAuthConfig, Config, Endpoint, GRPC_TLS_FLAGS, GrpcLimits, GrpcTls,
    HttpConfig, IntrospectionConfig, IntrospectionMode, Secret, SecretSource, TlsFlags,
};
use crate::decision::Responder;
use crate::forward;
use crate::introspection::discovery::Discovery;
use crate::introspection::guard::Guarded;
use crate::introspection::mint::Minter;
use crate::introspection::{self, ClientAuth, HttpIntrospector};
use crate::jose::{self, KeySet};
use crate::server::{self, CheckService, Readiness};

/// Shortest admin secret accepted.
const MIN_ADMIN_SECRET_LEN: usize = 16;

/// Why the service could not be built or started. Every message names the flag at fault and
/// never a secret; `main` exits 2 on any of them.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{flag}: cannot read {}: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--client-secret-file: {} is empty", path.display())]
    EmptyClientSecret { path: PathBuf },
    #[error("{flag}: {}: {source}", path.display())]
    Keys {
        flag: &'static str,
        path: PathBuf,
        source: jose::KeyError,
    },
    #[error(
        "--admin-token-file: {} must hold a secret of {MIN_ADMIN_SECRET_LEN} bytes or more",
        path.display()
    )]
    ShortAdminToken { path: PathBuf },
    #[error("--cache-secret-file: {}: {source}", path.display())]
    CacheSecrets {
        path: PathBuf,
        source: SecretFileError,
    },
    #[error(transparent)]
    Introspection(#[from] introspection::SetupError),
    #[error(transparent)]
    Redis(#[from] redis::SetupError),
    #[error("{flag}: cannot bind {addr}: {source}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The service, built and not yet serving.
pub struct App {
    authorizer: Arc<Authorizer>,
    checks: Arc<CheckService>,
    grpc_tls: Option<ServerTlsConfig>,
    grpc_limits: GrpcLimits,
    admin: Option<AdminApi>,
    redis: Option<Arc<RedisCache>>,
    addresses: Addresses,
    mode: IntrospectionMode,
    max_token_length: usize,
    grace: Duration,
    http: Option<HttpConfig>,
    /// Finds the introspection endpoint, when `--issuer` is to name it.
    discovery: Option<Discovery>,
    /// The public keys of the JWTs phantom-authz signs (rfc7662 mode), as served.
    jwks: Option<Arc<str>>,
}

/// The admin gRPC API, ready to serve.
struct AdminApi {
    guard: AdminGuard,
    tls: Option<ServerTlsConfig>,
}

/// Where the configuration asks each listener to be.
#[derive(Clone, Copy)]
struct Addresses {
    grpc: SocketAddr,
    admin: SocketAddr,
    admin_grpc: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

/// The bound listeners [`App::run`] serves; tests bind port 0 and read the addresses back.
#[derive(Debug)]
pub struct Listeners {
    /// ext_authz, gRPC health and reflection.
    pub grpc: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: TcpListener,
    /// The admin gRPC API, when configured.
    pub admin_grpc: Option<TcpListener>,
    /// HTTP forward-auth, when configured.
    pub http: Option<TcpListener>,
}

/// Where [`Listeners`] are bound.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub admin_grpc: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

impl App {
    /// Reads every file the configuration names and builds every client. Binds nothing and
    /// spawns nothing; call it inside a Tokio runtime (the Redis client wants one).
    pub fn build(config: &Config) -> Result<App, BuildError> {
        let introspection = &config.introspection;
        let auth = client_auth(introspection)?;
        let minter = introspection
            .mint
            .as_ref()
            .map(|mint| {
                let pem = read(&mint.key_file, "--jwt-signing-key-file")?;
                let keys = jose::read_pem_keys(&pem)
                    .and_then(|keys| KeySet::new(keys, mint.algorithm))
                    .map_err(|source| BuildError::Keys {
                        flag: "--jwt-signing-key-file",
                        path: mint.key_file.clone(),
                        source,
                    })?;
                Ok::<_, BuildError>(Arc::new(Minter::new(
                    mint,
                    Arc::new(keys),
                    config.cache.max_ttl,
                )))
            })
            .transpose()?;
        let idp_ca = read_optional(introspection.ca_file.as_deref(), "--idp-ca-file")?;
        let url = match &introspection.endpoint {
            Endpoint::Url(url) => Some(url.as_str()),
            Endpoint::Discover { .. } => None,
        };
        let idp = HttpIntrospector::new(
            url,
            introspection.issuer.as_deref(),
            idp_ca.as_deref(),
            introspection.proxy.as_ref(),
            auth,
            introspection.mode,
            minter.clone(),
            introspection.timeout,
        )?;
        let discovery = idp.discovery();
        let idp = Guarded::new(idp, introspection.guard);

        let redis = match &config.redis {
            Some(redis) => {
                let ca = read_optional(redis.ca_file.as_deref(), "--redis-ca-file")?;
                let secrets = read_cache_secrets(&redis.secret_file)?;
                // A tombstone outlives any lookup that could have begun before its eviction:
                // a Redis read, an introspection, and the write that follows.
                // Saturating, and within a day: an absurd timeout must neither panic here nor
                // make every tombstone's SET fail.
                let tombstone_ttl = config
                    .introspection
                    .timeout
                    .saturating_add(redis.timeout.saturating_mul(2))
                    .saturating_add(Duration::from_secs(5))
                    .min(Duration::from_secs(24 * 3600));
                let cache = RedisCache::new(
                    &redis.urls,
                    &redis.topology,
                    ca,
                    secrets,
                    redis.timeout,
                    tombstone_ttl,
                )?;
                Some(Arc::new(cache))
            }
            None => None,
        };
        // With Redis, the in-process tier is a short-lived front (off at --local-cache-ttl 0);
        // without it, the in-process tier is the cache.
        let local_cap = redis.is_some().then_some(config.cache.local_ttl);
        let local = (local_cap != Some(Duration::ZERO))
            .then(|| LocalCache::new(config.cache.local_max_entries, config.cache.local_max_bytes));
        let authorizer = Arc::new(Authorizer::new(
            local,
            redis.clone().map(|r| r as Arc<dyn SharedCache>),
            Arc::new(idp),
            Ttls {
                default: config.cache.default_ttl,
                max: config.cache.max_ttl,
                local_cap,
                inactive: config.cache.inactive_ttl,
                check_timeout: config.check_timeout,
            },
        ));
        let checks = Arc::new(CheckService::new(
            authorizer.clone(),
            Responder::new(&config.realm, config.claim_headers.clone()),
            config.max_token_length,
            config.routes.clone(),
        ));
        let grpc_tls = config
            .grpc_tls
            .as_ref()
            .map(|tls| server_tls(tls, GRPC_TLS_FLAGS))
            .transpose()?;
        let admin = config
            .admin_grpc
            .as_ref()
            .map(|admin| {
                Ok::<_, BuildError>(AdminApi {
                    guard: AdminGuard::new(&read_admin_token(&admin.token_file)?),
                    tls: admin
                        .tls
                        .as_ref()
                        .map(|tls| server_tls(tls, ADMIN_GRPC_TLS_FLAGS))
                        .transpose()?,
                })
            })
            .transpose()?;
        Ok(App {
            authorizer,
            checks,
            grpc_tls,
            grpc_limits: config.grpc_limits,
            admin,
            redis,
            addresses: Addresses {
                grpc: config.grpc_listen,
                admin: config.admin_listen,
                admin_grpc: config.admin_grpc.as_ref().map(|admin| admin.listen),
                http: config.http.as_ref().map(|http| http.listen),
            },
            http: config.http.clone(),
            mode: config.introspection.mode,
            max_token_length: config.max_token_length,
            grace: config.shutdown_grace,
            discovery,
            jwks: minter.map(|minter| Arc::from(minter.keys().jwks())),
        })
    }

    /// Binds the addresses the configuration names.
    pub async fn bind(&self) -> Result<Listeners, BuildError> {
        let addresses = self.addresses;
        Ok(Listeners {
            grpc: bind("--grpc-listen", addresses.grpc).await?,
            admin: bind("--admin-listen", addresses.admin).await?,
            admin_grpc: match addresses.admin_grpc {
                Some(addr) => Some(bind("--admin-grpc-listen", addr).await?),
                None => None,
            },
            http: match addresses.http {
                Some(addr) => Some(bind("--http-listen", addr).await?),
                None => None,
            },
        })
    }

    /// Serves `listeners` until `shutdown` resolves; then reports NOT_SERVING, drains in-flight
    /// Checks and admin calls, and stops everything within the grace, abandoning what still
    /// runs at its end. `metrics` renders `/metrics`.
    pub async fn run(
        self,
        listeners: Listeners,
        metrics: PrometheusHandle,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let Listeners {
            grpc,
            admin,
            admin_grpc,
            http,
        } = listeners;
        if let Some(listener) = &admin_grpc {
            tracing::info!(
                admin_grpc = %display_addr(listener),
                tls = self.admin.as_ref().is_some_and(|admin| admin.tls.is_some()),
                "admin gRPC listening"
            );
        }
        if let Some(listener) = &http {
            tracing::info!(http = %display_addr(listener), "HTTP forward-auth listening");
        }
        tracing::info!(
            grpc = %display_addr(&grpc),
            admin = %display_addr(&admin),
            mode = ?self.mode,
            redis = self.redis.is_some(),
            "phantom-authz listening"
        );

        // Histogram samples queue up until drained: without this they would grow without bound
        // between scrapes (or forever, on a replica nobody scrapes).
        let upkeep = metrics.clone();
        let upkeep = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });

        let serving = Arc::new(AtomicBool::new(true));
        let (health, health_service) = tonic_health::server::health_reporter();
        // Set when shutdown begins, to the instant by which everything must have stopped.
        let (deadline_tx, deadline_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        let redis_health = self.redis.as_deref().map(|redis| {
            let health = redis.health();
            Arc::new(move || health.is_up()) as server::Health
        });
        let listening = Arc::new(AtomicBool::new(false));
        let evictions_health = self.redis.as_ref().map(|_| {
            let listening = listening.clone();
            Arc::new(move || listening.load(Ordering::Relaxed)) as server::Health
        });
        let discovery_health = self
            .discovery
            .clone()
            .map(|discovery| Arc::new(move || discovery.is_done()) as server::Health);
        let readiness = Readiness {
            serving: serving.clone(),
            redis: redis_health,
            evictions: evictions_health,
            discovery: discovery_health,
        };
        let mut tasks = vec![(
            "admin HTTP",
            tokio::spawn(server::serve_admin(
                admin,
                metrics,
                readiness,
                self.jwks.clone(),
                stopped(stop_rx.clone()),
            )),
        )];
        // Ends once the endpoint is known, or at shutdown if it never is.
        if let Some(discovery) = self.discovery {
            let stop = stopped(stop_rx.clone());
            let discovering = async move {
                tokio::select! {
                    () = discovery.run() => {}
                    () = stop => {}
                }
            };
            tasks.push(("identity server discovery", tokio::spawn(discovering)));
        }

        let signal_health = health.clone();
        let grace = self.grace;
        tokio::spawn(async move {
            shutdown.await;
            let deadline = grace_deadline(grace);
            tracing::info!("shutting down: not serving, draining in-flight checks");
            serving.store(false, Ordering::Relaxed);
            // Envoy's `grpc_health_check: {}` asks about the whole server: the service "".
            signal_health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            signal_health.set_not_serving::<server::CheckServer>().await;
            let _ = deadline_tx.send(Some(deadline));
        });

        // Eviction calls stop with Checks; the subscriber listens until the very end.
        if let (Some(listener), Some(api)) = (admin_grpc, self.admin) {
            let service = AdminService::new(self.authorizer.clone(), self.max_token_length);
            let shutdown = draining(deadline_rx.clone());
            let task = tokio::spawn(async move {
                if let Err(error) =
                    admin::serve(listener, service, api.guard, api.tls, shutdown).await
                {
                    tracing::error!(%error, "admin gRPC listener failed; evictions unavailable");
                }
            });
            tasks.push(("admin gRPC", task));
        }
        if let (Some(listener), Some(config)) = (http, self.http.clone()) {
            let shutdown = draining(deadline_rx.clone());
            let task = tokio::spawn(forward::serve(
                listener,
                self.checks.clone(),
                config,
                shutdown,
            ));
            tasks.push(("HTTP forward-auth", task));
        }
        if let Some(redis) = self.redis {
            let shutdown = stopped(stop_rx.clone());
            let forget = self.authorizer as Arc<dyn evictions::Forget>;
            let task = tokio::spawn(evictions::subscribe(redis, forget, listening, shutdown));
            tasks.push(("eviction subscriber", task));
        }

        // Everything, the ext_authz listener included, ends within the grace counted from the
        // shutdown signal: a connection that never finishes its request must not hold it up.
        let mut cut = Vec::new();
        let past_deadline = {
            let deadline_rx = deadline_rx.clone();
            async move { tokio::time::sleep_until(shutdown_deadline(deadline_rx).await).await }
        };
        let serve = server::serve_grpc(
            grpc,
            self.checks,
            health,
            health_service,
            self.grpc_tls,
            self.grpc_limits,
            draining(deadline_rx.clone()),
        );
        tokio::select! {
            result = serve => result?,
            () = past_deadline => cut.push("ext_authz"),
        }
        let deadline = deadline_rx
            .borrow()
            .unwrap_or_else(|| grace_deadline(grace));
        let _ = stop_tx.send(true);
        cut.extend(finish_by(deadline, tasks).await);
        if !cut.is_empty() {
            tracing::warn!(
                grace = ?grace,
                cut = %cut.join(", "),
                "still running at the end of the shutdown grace period; abandoned"
            );
        }
        upkeep.abort();
        tracing::info!("stopped");
        Ok(())
    }
}

impl Listeners {
    /// Where each listener is bound.
    pub fn addresses(&self) -> Bound {
        let addr = |listener: &TcpListener| {
            listener
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
        };
        Bound {
            grpc: addr(&self.grpc),
            admin: addr(&self.admin),
            admin_grpc: self.admin_grpc.as_ref().map(addr),
            http: self.http.as_ref().map(addr),
        }
    }
}

fn display_addr(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map_or_else(|_| "?".to_owned(), |addr| addr.to_string())
}

async fn bind(flag: &'static str, addr: SocketAddr) -> Result<TcpListener, BuildError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BuildError::Bind { flag, addr, source })
}

/// Resolves with the shutdown deadline once shutdown began.
async fn shutdown_deadline(mut rx: watch::Receiver<Option<Instant>>) -> Instant {
    let deadline = rx.wait_for(Option::is_some).await.ok().and_then(|d| *d);
    match deadline {
        Some(deadline) => deadline,
        // The signal task is gone without a deadline: nothing will ask to stop.
        None => std::future::pending().await,
    }
}

/// Resolves once shutdown began: the signal for listeners that drain.
async fn draining(rx: watch::Receiver<Option<Instant>>) {
    shutdown_deadline(rx).await;
}

/// Resolves once the flag is set (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// When the grace from now ends; a grace too long for the clock means "as long as it takes".
fn grace_deadline(grace: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(grace)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

/// Waits for every task until `deadline`, then aborts those still running and names them.
async fn finish_by(
    deadline: Instant,
    mut tasks: Vec<(&'static str, JoinHandle<()>)>,
) -> Vec<&'static str> {
    let all = async {
        for (_, task) in &mut tasks {
            let _ = task.await;
        }
    };
    let _ = tokio::time::timeout_at(deadline, all).await;
    tasks
        .into_iter()
        .filter(|(_, task)| !task.is_finished())
        .map(|(name, task)| {
            task.abort();
            name
        })
        .collect()
}

/// Reads a start-up file, naming its flag when that fails.
fn read(path: &Path, flag: &'static str) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|source| BuildError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

fn read_optional(path: Option<&Path>, flag: &'static str) -> Result<Option<Vec<u8>>, BuildError> {
    path.map(|path| read(path, flag)).transpose()
}

fn read_text(path: &Path, flag: &'static str) -> Result<String, BuildError> {
    std::fs::read_to_string(path).map_err(|source| BuildError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// Reads a listener's TLS files, naming the listener's `flags` when that fails.
fn server_tls(tls: &GrpcTls, flags: TlsFlags) -> Result<ServerTlsConfig, BuildError> {
    let [cert_flag, key_flag, client_ca_flag] = flags;
    let cert = read(&tls.cert, cert_flag)?;
    let key = read(&tls.key, key_flag)?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = read_optional(tls.client_ca.as_deref(), client_ca_flag)? {
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(config)
}

/// The admin API's bearer secret: long enough not to be guessed.
fn read_admin_token(path: &Path) -> Result<Secret, BuildError> {
    let text = read_text(path, "--admin-token-file")?;
    let secret = text.trim();
    if secret.len() < MIN_ADMIN_SECRET_LEN {
        return Err(BuildError::ShortAdminToken {
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(secret))
}

/// The secrets Redis entries are bound to.
fn read_cache_secrets(path: &Path) -> Result<CacheSecrets, BuildError> {
    let text = read_text(path, "--cache-secret-file")?;
    CacheSecrets::parse(&text).map_err(|source| BuildError::CacheSecrets {
        path: path.to_owned(),
        source,
    })
}

/// The introspecting client's credential, read from its file.
fn client_auth(introspection: &IntrospectionConfig) -> Result<ClientAuth, BuildError> {
    let secret = |source: &SecretSource| match source {
        SecretSource::Value(secret) => Ok(secret.clone()),
        SecretSource::File(path) => read_client_secret(path),
    };
    let client_id = introspection.client_id.clone();
    Ok(match &introspection.client_auth {
        ClientAuthConfig::SecretBasic(source) => ClientAuth::Basic {
            client_id,
            secret: secret(source)?,
        },
        ClientAuthConfig::SecretPost(source) => ClientAuth::Post {
            client_id,
            secret: secret(source)?,
        },
        ClientAuthConfig::PrivateKeyJwt { key_file } => {
            const FLAG: &str = "--client-assertion-key-file";
            let keys = jose::read_pem_keys(&read(key_file, FLAG)?);
            let key = keys
                .map(|mut keys| Box::new(keys.swap_remove(0)))
                .map_err(|source| BuildError::Keys {
                    flag: FLAG,
                    path: key_file.clone(),
                    source,
                })?;
            // RFC 7523bis: the issuer identifier is the audience every server accepts; without
            // one, the endpoint the assertion is sent to.
            let audience = match (&introspection.issuer, &introspection.endpoint) {
                (Some(issuer), _) => issuer.clone(),
                (None, Endpoint::Url(url)) => url.clone(),
                (None, Endpoint::Discover { issuer }) => issuer.clone(),
            };
            ClientAuth::PrivateKeyJwt {
                client_id,
                key,
                audience,
            }
        }
    })
}

fn read_client_secret(path: &Path) -> Result<Secret, BuildError> {
    let text = read_text(path, "--client-secret-file")?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(BuildError::EmptyClientSecret {
            path: path.to_owned(),
        });
    }
    Ok(Secret::new(secret))
}
