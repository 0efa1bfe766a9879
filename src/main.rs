//! phantom-authz: parse configuration, set up logging and metrics, build the service, serve,
//! and drain on SIGTERM.

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::Parser as _;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use phantom_authz::authorizer::{Authorizer, Ttls};
use phantom_authz::cache::SharedCache;
use phantom_authz::cache::local::LocalCache;
use phantom_authz::cache::redis::{CacheSecrets, RedisCache};
use phantom_authz::config::{
    ADMIN_GRPC_TLS_FLAGS, Args, Config, GRPC_TLS_FLAGS, GrpcTls, LogFormat, Secret, SecretSource,
    TlsFlags, file_args,
};
use phantom_authz::decision::Responder;
use phantom_authz::introspection::HttpIntrospector;
use phantom_authz::introspection::guard::Guarded;
use phantom_authz::revocation::{self, AdminGuard, AdminService};
use phantom_authz::server::{self, CheckService, Readiness};
use phantom_authz::telemetry::{self, Telemetry};

fn main() -> ExitCode {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let check_only = argv.get(1).is_some_and(|arg| arg == "check-config");
    if check_only {
        argv.remove(1);
    }
    let config = match load_config(argv) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("phantom-authz: configuration error: {error:#}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        return match check_files(&config) {
            Ok(()) => {
                println!("configuration OK\n{config:#?}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("phantom-authz: configuration error: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("phantom-authz: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's gRPC channel lives on the runtime, so it is built inside it.
    let telemetry = match config.otlp_endpoint.as_deref().map(|endpoint| {
        let _entered = runtime.enter();
        Telemetry::start(endpoint)
    }) {
        None => None,
        Some(Ok(telemetry)) => Some(telemetry),
        Some(Err(error)) => {
            eprintln!("phantom-authz: {error}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(config.log_format, telemetry.as_ref());
    let result = runtime.block_on(run(config));
    // Spans still queued are exported while the runtime that carries the exporter lives on.
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    // Whatever was abandoned at the end of the grace (a blocking DNS lookup, say) must not
    // keep the process alive: tasks are dropped without waiting for blocking threads.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("phantom-authz: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Flags, environment, then `--config`'s file beneath both; validated.
fn load_config(argv: Vec<OsString>) -> anyhow::Result<Config> {
    let args = Args::try_parse_from(&argv).unwrap_or_else(|e| e.exit());
    let args = match &args.config {
        None => args,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--config: cannot read {}", path.display()))?;
            let from_file = file_args(&text, |name| std::env::var_os(name).is_some())?;
            let mut merged = vec![argv[0].clone()];
            merged.extend(from_file.into_iter().map(OsString::from));
            merged.extend(argv.into_iter().skip(1));
            Args::try_parse_from(merged).unwrap_or_else(|e| e.exit())
        }
    };
    Ok(Config::from_args(args)?)
}

/// Reads every file the configuration names, as start-up would, without serving.
fn check_files(config: &Config) -> anyhow::Result<()> {
    if let SecretSource::File(path) = &config.introspection.client_secret {
        read_secret(path)?;
    }
    read_file(config.introspection.ca_file.as_deref(), "--idp-ca-file")?;
    if let Some(redis) = &config.redis {
        read_file(redis.ca_file.as_deref(), "--redis-ca-file")?;
        read_cache_secrets(&redis.secret_file)?;
    }
    if let Some(tls) = &config.grpc_tls {
        server_tls(tls, GRPC_TLS_FLAGS)?;
    }
    if let Some(admin) = &config.admin_grpc {
        read_admin_token(&admin.token_file)?;
        if let Some(tls) = &admin.tls {
            server_tls(tls, ADMIN_GRPC_TLS_FLAGS)?;
        }
    }
    Ok(())
}

/// Log lines to stderr, filtered by `RUST_LOG`; with `--otlp-endpoint`, spans to the collector
/// too. Span targets are the telemetry layer's alone, so log lines are the same either way.
fn init_logging(format: LogFormat, telemetry: Option<&Telemetry>) {
    use tracing_subscriber::filter::{FilterExt as _, filter_fn};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .and(filter_fn(|metadata| {
            metadata.target() != telemetry::SPAN_TARGET
        }));
    let logs = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    // No `Option` layer when tracing is off: an absent `Option` layer counts as interested in
    // every callsite, which would keep the per-Check spans alive (and paid for) with nobody
    // listening. Left out, they are disabled where they are created.
    match telemetry {
        Some(telemetry) => registry.with(telemetry.layer()).init(),
        None => registry.init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = phantom_authz::metrics::install().context("installing the metrics recorder")?;
    // Histogram samples queue up until drained: without this they would grow without bound
    // between scrapes (or forever, on a replica nobody scrapes).
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("installing the TLS crypto provider"))?;

    let client_secret = match &config.introspection.client_secret {
        SecretSource::Value(secret) => secret.clone(),
        SecretSource::File(path) => read_secret(path)?,
    };
    let idp_ca = read_file(config.introspection.ca_file.as_deref(), "--idp-ca-file")?;
    let idp = HttpIntrospector::new(
        &config.introspection.url,
        idp_ca.as_deref(),
        config.introspection.proxy.as_ref(),
        &config.introspection.client_id,
        &client_secret,
        config.introspection.mode,
        config.introspection.timeout,
    )
    .map_err(anyhow::Error::msg)?;
    let idp = Guarded::new(idp, config.introspection.guard);

    let redis = match &config.redis {
        Some(redis) => {
            let ca = read_file(redis.ca_file.as_deref(), "--redis-ca-file")?;
            let secrets = read_cache_secrets(&redis.secret_file)?;
            // A tombstone outlives any lookup that could have begun before its eviction: a
            // Redis read, an introspection, and the write that follows.
            let tombstone_ttl = config.introspection.timeout
                + 2 * redis.timeout
                + std::time::Duration::from_secs(5);
            let cache = RedisCache::new(&redis.url, ca, secrets, redis.timeout, tombstone_ttl)?;
            Some(Arc::new(cache))
        }
        None => None,
    };
    let redis_health = redis.as_deref().map(RedisCache::health);
    // With Redis, the in-process tier is a short-lived front (off at --local-cache-ttl 0);
    // without it, the in-process tier is the cache.
    let local_cap = redis.is_some().then_some(config.cache.local_ttl);
    let local = (local_cap != Some(std::time::Duration::ZERO))
        .then(|| LocalCache::new(config.cache.local_max_entries, config.cache.local_max_bytes));
    let shared = redis.clone().map(|r| r as Arc<dyn SharedCache>);
    let authorizer = Arc::new(Authorizer::new(
        local,
        shared,
        Arc::new(idp),
        Ttls {
            default: config.cache.default_ttl,
            max: config.cache.max_ttl,
            local_cap,
            inactive: config.cache.inactive_ttl,
            check_timeout: config.check_timeout,
        },
    ));
    let service = CheckService::new(
        authorizer.clone(),
        Responder::new(&config.realm),
        config.max_token_length,
    );

    let grpc_tls = config
        .grpc_tls
        .as_ref()
        .map(|tls| server_tls(tls, GRPC_TLS_FLAGS))
        .transpose()?;
    let sigterm = terminated();
    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("--grpc-listen: cannot bind {}", config.grpc_listen))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("--admin-listen: cannot bind {}", config.admin_listen))?;
    let admin_grpc = match &config.admin_grpc {
        Some(admin) => {
            let guard = AdminGuard::new(&read_admin_token(&admin.token_file)?);
            let tls = admin
                .tls
                .as_ref()
                .map(|tls| server_tls(tls, ADMIN_GRPC_TLS_FLAGS))
                .transpose()?;
            let listener = TcpListener::bind(admin.listen)
                .await
                .with_context(|| format!("--admin-grpc-listen: cannot bind {}", admin.listen))?;
            tracing::info!(
                admin_grpc = %listener.local_addr()?,
                tls = tls.is_some(),
                "admin gRPC listening"
            );
            Some((listener, guard, tls))
        }
        None => None,
    };
    tracing::info!(
        grpc = %grpc_listener.local_addr()?,
        admin = %admin_listener.local_addr()?,
        mode = ?config.introspection.mode,
        redis = config.redis.is_some(),
        "phantom-authz listening"
    );

    let serving = Arc::new(AtomicBool::new(true));
    let (health, health_service) = tonic_health::server::health_reporter();
    // Set when SIGTERM arrives, to the instant by which everything must have stopped.
    let (deadline_tx, deadline_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = vec![(
        "admin HTTP",
        tokio::spawn(server::serve_admin(
            admin_listener,
            metrics,
            Readiness {
                serving: serving.clone(),
                redis: redis_health,
            },
            stopped(stop_rx.clone(), true),
        )),
    )];

    let signal_health = health.clone();
    let signal_serving = serving.clone();
    let grace = config.shutdown_grace;
    tokio::spawn(async move {
        sigterm.await;
        let deadline = grace_deadline(grace);
        tracing::info!("shutting down: not serving, draining in-flight checks");
        signal_serving.store(false, Ordering::Relaxed);
        // Envoy's `grpc_health_check: {}` asks about the whole server: the service name "".
        signal_health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        signal_health
            .set_not_serving::<AuthorizationServer<CheckService>>()
            .await;
        let _ = deadline_tx.send(Some(deadline));
    });

    // Eviction calls stop with Checks; the subscriber listens until the very end.
    if let Some((listener, guard, tls)) = admin_grpc {
        let service = AdminService::new(authorizer.clone(), config.max_token_length);
        let shutdown = draining(deadline_rx.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = revocation::serve(listener, service, guard, tls, shutdown).await {
                tracing::error!(%error, "admin gRPC listener failed; evictions unavailable");
            }
        });
        tasks.push(("admin gRPC", task));
    }
    if let Some(redis) = redis {
        let shutdown = stopped(stop_rx.clone(), true);
        let task = tokio::spawn(revocation::subscribe(redis, authorizer.clone(), shutdown));
        tasks.push(("eviction subscriber", task));
    }

    // Everything, the ext_authz listener included, ends within the grace counted from SIGTERM:
    // a connection that never finishes its request must not hold the process past it.
    let mut cut = Vec::new();
    let past_deadline = {
        let deadline_rx = deadline_rx.clone();
        async move { tokio::time::sleep_until(shutdown_deadline(deadline_rx).await).await }
    };
    tokio::select! {
        result = server::serve_grpc(grpc_listener, service, health, health_service, grpc_tls, config.grpc_limits, draining(deadline_rx.clone())) => {
            result.context("serving gRPC")?;
        }
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
    tracing::info!("stopped");
    Ok(())
}

/// Resolves with the shutdown deadline once SIGTERM arrived.
async fn shutdown_deadline(mut rx: watch::Receiver<Option<Instant>>) -> Instant {
    let deadline = rx.wait_for(Option::is_some).await.ok().and_then(|d| *d);
    match deadline {
        Some(deadline) => deadline,
        // The signal task is gone without a deadline: it cannot listen, so never stop.
        None => std::future::pending().await,
    }
}

/// Resolves once SIGTERM arrived: the shutdown signal for listeners that drain.
async fn draining(rx: watch::Receiver<Option<Instant>>) {
    shutdown_deadline(rx).await;
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

/// Resolves once the watched flag equals `value` (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>, value: bool) {
    let _ = rx.wait_for(|v| *v == value).await;
}

/// Listens for SIGTERM and SIGINT from now on; the future resolves at the first of them.
/// Installed before the listeners are announced, so that a SIGTERM sent as soon as the service
/// is up drains it rather than killing it outright.
fn terminated() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let signals = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = signals else {
            tracing::error!("cannot listen for SIGTERM; shutdown will not drain");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// Reads an optional start-up file, naming its flag when that fails.
fn read_file(path: Option<&std::path::Path>, flag: &str) -> anyhow::Result<Option<Vec<u8>>> {
    path.map(|path| {
        std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
    })
    .transpose()
}

/// Reads a listener's TLS files, naming the listener's `flags` when that fails.
fn server_tls(tls: &GrpcTls, flags: TlsFlags) -> anyhow::Result<ServerTlsConfig> {
    let [cert_flag, key_flag, client_ca_flag] = flags;
    let cert = read_file(Some(&tls.cert), cert_flag)?.unwrap_or_default();
    let key = read_file(Some(&tls.key), key_flag)?.unwrap_or_default();
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = read_file(tls.client_ca.as_deref(), client_ca_flag)? {
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(config)
}

/// The admin API's bearer secret: long enough not to be guessed.
fn read_admin_token(path: &std::path::Path) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--admin-token-file: cannot read {}", path.display()))?;
    let secret = text.trim();
    if secret.len() < 16 {
        anyhow::bail!(
            "--admin-token-file: {} must hold a secret of 16 bytes or more",
            path.display()
        );
    }
    Ok(Secret::new(secret))
}

/// The secrets Redis entries are bound to.
fn read_cache_secrets(path: &std::path::Path) -> anyhow::Result<CacheSecrets> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--cache-secret-file: cannot read {}", path.display()))?;
    CacheSecrets::parse(&text)
        .map_err(|problem| anyhow::anyhow!("--cache-secret-file: {}: {problem}", path.display()))
}

fn read_secret(path: &std::path::Path) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--client-secret-file: cannot read {}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        anyhow::bail!("--client-secret-file: {} is empty", path.display());
    }
    Ok(Secret::new(secret))
}
