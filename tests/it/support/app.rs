//! The service in process: built by `App::build` from flags, served on port-0 listeners on a
//! thread of its own, with its own metrics recorder, until dropped. No process to spawn and no
//! log to scrape for the addresses; for what needs the real binary (exit codes, signals, the
//! log), see [`super::Service`].

use std::ffi::OsString;
use std::net::SocketAddr;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use phantom_authz::config::load;
use tonic::transport::Channel;

use super::{CLIENT_ID, CLIENT_SECRET, http_get, metric_at, shared_cache_secret_file};

/// A running in-process service; stopped when dropped.
pub(crate) struct App {
    pub(crate) grpc: SocketAddr,
    pub(crate) admin: SocketAddr,
    /// The HTTP forward-auth listener, when started with `--http-listen`.
    pub(crate) http: Option<SocketAddr>,
    /// The admin gRPC listener, when started with `--admin-grpc-listen`.
    pub(crate) admin_grpc: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl App {
    /// Starts the service in `mode` against `idp_url`, with extra flags, as
    /// [`super::Service::start`] does; replicas sharing Redis share the tests' cache secret.
    ///
    /// With Redis, it returns once the service listens for evictions (a replica drops what it
    /// looked up before it subscribed, so Checks sent earlier would not be cached).
    pub(crate) async fn start(idp_url: &str, mode: &str, extra: &[&str]) -> App {
        let mut argv: Vec<OsString> = [
            "phantom-authz",
            "--grpc-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--introspection-url",
            idp_url,
            "--introspection-mode",
            mode,
            "--client-id",
            CLIENT_ID,
            "--client-secret",
            CLIENT_SECRET,
        ]
        .iter()
        .chain(extra)
        .map(Into::into)
        .collect();
        if extra.contains(&"--redis-url") && !extra.contains(&"--cache-secret-file") {
            argv.push("--cache-secret-file".into());
            argv.push(shared_cache_secret_file().into());
        }
        let config = load::load(argv, &|_| None, &|path| std::fs::read_to_string(path))
            .unwrap_or_else(|e| panic!("configuration: {e}"));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (addresses_tx, addresses) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            // Every task of this service runs on this thread, so a thread-local recorder sees
            // all of its metrics and none of another service's.
            let recorder = phantom_authz::metrics::recorder().unwrap();
            let handle = recorder.handle();
            let _local = metrics::set_default_local_recorder(&recorder);
            phantom_authz::metrics::describe();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let app = phantom_authz::app::App::build(&config).unwrap();
                let listeners = app.bind().await.unwrap();
                addresses_tx.send(listeners.addresses()).unwrap();
                let shutdown = async {
                    let _ = stopped.await;
                };
                app.run(listeners, handle, shutdown).await.unwrap();
            });
        });
        let bound = addresses.recv().expect("the service did not start");
        let app = App {
            grpc: bound.grpc,
            admin: bound.admin,
            http: bound.http,
            admin_grpc: bound.admin_grpc,
            stop: Some(stop),
        };
        if extra.contains(&"--redis-url") {
            // Bounded only so that a Redis that never comes up does not hang the test; tests
            // that start without Redis on purpose do not wait.
            super::eventually(std::time::Duration::from_secs(2), async || {
                app.admin_get("/readyz")
                    .await
                    .1
                    .contains(r#""evictions":"listening""#)
            })
            .await;
        }
        app
    }

    pub(crate) async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    pub(crate) async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://{}{path}", self.admin)).await
    }

    /// The value of one metric, as [`super::Service::metric`].
    pub(crate) async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_at(self.admin, name, labels).await
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // The service drains and its thread ends by itself; nothing waits for it.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
