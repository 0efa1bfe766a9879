//! phantom-authz: parse the configuration, set up logging and metrics, build the service, serve
//! until SIGTERM, drain. Exit status 2 for any configuration problem, files included.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::Context as _;

use clap::Parser as _;
use phantom_authz::app::App;
use phantom_authz::config::load::{self, LoadError};
use phantom_authz::config::{Config, LogFormat};
use phantom_authz::probe;
use phantom_authz::telemetry::{self, Telemetry};

fn main() -> ExitCode {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|arg| arg == "check") {
        argv.remove(1);
        return probe::run(probe::CheckArgs::parse_from(argv));
    }
    let check_only = argv.get(1).is_some_and(|arg| arg == "check-config");
    if check_only {
        argv.remove(1);
    }
    let config = match load_config(argv.clone()) {
        Ok(config) => config,
        // `--help`, `--version` and flag syntax: clap prints them and picks the status (2).
        Err(LoadError::Flags(error)) => error.exit(),
        Err(error) => return configuration_error(&error),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("phantom-authz: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("phantom-authz: cannot install the TLS crypto provider");
        return ExitCode::FAILURE;
    }
    if check_only {
        // Building is everything start-up does short of binding: every file read, every client.
        return match runtime.block_on(async { App::build(&config) }) {
            Ok(_) => print_settings(argv),
            Err(error) => configuration_error(&error),
        };
    }
    // The OTLP exporter's gRPC channel lives on the runtime, so it is built inside it.
    let telemetry = match config.otlp_endpoint.as_deref().map(|endpoint| {
        let _entered = runtime.enter();
        Telemetry::start(endpoint)
    }) {
        None => None,
        Some(Ok(telemetry)) => Some(telemetry),
        Some(Err(error)) => return configuration_error(&error),
    };
    init_logging(config.log_format, telemetry.as_ref());
    let result = runtime.block_on(serve(config));
    // Spans still queued are exported while the runtime that carries the exporter lives on.
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    // Whatever was abandoned at the end of the grace (a blocking DNS lookup, say) must not
    // keep the process alive: tasks are dropped without waiting for blocking threads.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Logging is up by now: the reason goes out once, in the log's format.
        Err(Failure::Configuration(error)) => {
            tracing::error!("configuration error: {}", reasons(&error));
            ExitCode::from(2)
        }
        Err(Failure::Serving(error)) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Why the service stopped other than by SIGTERM.
enum Failure {
    /// It could not be built or bound: exit 2.
    Configuration(anyhow::Error),
    /// It failed while serving: exit 1.
    Serving(anyhow::Error),
}

async fn serve(config: Config) -> Result<(), Failure> {
    let metrics = phantom_authz::metrics::install()
        .context("installing the metrics recorder")
        .map_err(Failure::Serving)?;
    let app = App::build(&config).map_err(|e| Failure::Configuration(e.into()))?;
    // Listening for SIGTERM before the listeners are announced, so that a SIGTERM sent as soon
    // as the service is up drains it rather than killing it outright.
    let sigterm = terminated();
    let listeners = app
        .bind()
        .await
        .map_err(|e| Failure::Configuration(e.into()))?;
    app.run(listeners, metrics, sigterm)
        .await
        .context("serving gRPC")
        .map_err(Failure::Serving)
}

fn configuration_error(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("phantom-authz: configuration error: {error:#}");
    ExitCode::from(2)
}

/// `check-config`'s report: the effective settings as a `--config` file, secrets masked.
fn print_settings(argv: Vec<OsString>) -> ExitCode {
    let effective = match load::settings(argv, &|name| std::env::var_os(name), &|path| {
        std::fs::read_to_string(path)
    }) {
        Ok(effective) => effective,
        Err(error) => return configuration_error(&error),
    };
    println!(
        "# phantom-authz check-config: configuration OK (every file read, every client built)"
    );
    println!("# The effective settings as a --config file; fill in the values shown as ***.");
    for (name, value) in effective.settings {
        // A JSON string is a valid TOML basic string.
        let value = serde_json::Value::String(value);
        println!("{name} = {value}");
    }
    for rule in &effective.rules {
        print!("\n{}", load::rule_toml(rule));
    }
    ExitCode::SUCCESS
}

/// Flags, environment, then `--config`'s file beneath both; validated.
fn load_config(argv: Vec<OsString>) -> Result<Config, LoadError> {
    load::load(argv, &|name| std::env::var_os(name), &|path| {
        std::fs::read_to_string(path)
    })
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

/// The error and its causes in one line, each cause once: most messages already end with their
/// source's text, which `{:#}` would repeat.
fn reasons(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
}
