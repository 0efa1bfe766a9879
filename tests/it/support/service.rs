//! The phantom-authz binary on loopback listeners, and the secrets and files it is given.

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use phantom_authz::admin::proto::admin_client::AdminClient;
use phantom_authz::admin::proto::{EvictTokenRequest, EvictTokenResponse};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

use super::redis::{ChildGuard, spawn_tied};

pub(crate) const CLIENT_ID: &str = "gateway-client";
pub(crate) const CLIENT_SECRET: &str = "Sup3r-Secret+Value/=";

/// The cache secret the tests' replicas share unless a test gives its own.
pub(crate) const CACHE_SECRET: &str = "test-cache-secret-shared-by-replicas-0123456789";

/// A `--cache-secret-file` holding `secrets`, one per line; deleted with the returned value.
pub(crate) fn cache_secret_file(secrets: &[&str]) -> tempfile::TempPath {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), secrets.join("\n")).unwrap();
    file.into_temp_path()
}

/// The file of [`CACHE_SECRET`], written once per test binary.
pub(crate) fn shared_cache_secret_file() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<tempfile::TempPath> = std::sync::OnceLock::new();
    FILE.get_or_init(|| cache_secret_file(&[CACHE_SECRET]))
}

// ---------------------------------------------------------------------------------------------
// The service

/// The phantom-authz binary, started with loopback listeners on port 0; killed on drop.
pub(crate) struct Service {
    pub(crate) grpc: SocketAddr,
    pub(crate) admin: SocketAddr,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Service {
    /// Starts the service in `mode` against `idp_url`, with extra flags.
    pub(crate) fn start(idp_url: &str, mode: &str, extra: &[&str]) -> Service {
        let mut args = vec![
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
        ];
        args.extend_from_slice(extra);
        Self::spawn(&args, &[("PHANTOM_AUTHZ_CLIENT_SECRET", CLIENT_SECRET)])
    }

    pub(crate) fn spawn(args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut command = Command::new(env!("CARGO_BIN_EXE_phantom-authz"));
        command
            .args(args)
            .env_remove("RUST_LOG")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        // Replicas sharing Redis share a cache secret, as in production; a test that gives
        // --cache-secret-file itself overrides it.
        if args.contains(&"--redis-url") {
            command.env(
                "PHANTOM_AUTHZ_CACHE_SECRET_FILE",
                shared_cache_secret_file(),
            );
        }
        let mut child = ChildGuard(Some(spawn_tied(&mut command)));
        let stderr = child.0.as_mut().unwrap().stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("phantom-authz listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("service did not start; log:\n{}", log.lock().unwrap()));
        let grpc = field(&line, "grpc=").parse().unwrap();
        let admin = field(&line, "admin=").parse().unwrap();
        Service {
            grpc,
            admin,
            child: child.0.take().unwrap(),
            log,
        }
    }

    pub(crate) async fn client(&self) -> AuthorizationClient<Channel> {
        AuthorizationClient::new(self.channel().await)
    }

    /// A connected channel to the gRPC listener, for any of its services.
    pub(crate) async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Everything the service logged so far.
    pub(crate) fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, up to `timeout`.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(&format!("http://{}{path}", self.admin)).await
    }

    /// The value of one metric sample line from `/metrics` (summing matching lines).
    pub(crate) async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_at(self.admin, name, labels).await
    }
}

/// The value of one metric from the `/metrics` of the admin listener at `admin`, summing the
/// series that carry every label given.
pub(crate) async fn metric_at(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, body) = http_get(&format!("http://{admin}/metrics")).await;
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            let series = line.split_whitespace().next().unwrap_or_default();
            let metric = series.split('{').next().unwrap_or_default();
            metric == name
                && labels
                    .iter()
                    .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field<'a>(line: &'a str, prefix: &str) -> &'a str {
    let start = line.find(prefix).unwrap() + prefix.len();
    line[start..].split_whitespace().next().unwrap()
}

pub(crate) async fn http_get(url: &str) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

// ---------------------------------------------------------------------------------------------
// The admin gRPC API

impl Service {
    /// The admin gRPC address, when started with `--admin-grpc-listen`.
    pub(crate) fn admin_grpc(&self) -> Option<SocketAddr> {
        let log = self.log();
        let line = log.lines().find(|l| l.contains("admin gRPC listening"))?;
        field(line, "admin_grpc=").parse().ok()
    }

    /// The TCP ports this process listens on, read from Linux's /proc.
    pub(crate) fn listening_ports(&self) -> std::collections::BTreeSet<u16> {
        let inodes: std::collections::HashSet<String> =
            std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .unwrap()
                .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter_map(|link| {
                    let link = link.to_string_lossy().into_owned();
                    Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
                })
                .collect();
        let mut ports = std::collections::BTreeSet::new();
        for socket in tcp_sockets() {
            // 0A: LISTEN.
            if socket.state == "0A" && inodes.contains(&socket.inode) {
                let port = socket.local.rsplit(':').next().unwrap();
                ports.insert(u16::from_str_radix(port, 16).unwrap());
            }
        }
        ports
    }
}

/// One TCP socket as the kernel lists it in /proc/net/tcp and tcp6: addresses in its hex form
/// (`0100007F:1F90` for 127.0.0.1:8080).
pub(crate) struct TcpSocket {
    pub(crate) local: String,
    pub(crate) remote: String,
    pub(crate) state: String,
    /// Bytes received and not yet read by the socket's owner.
    pub(crate) unread: u64,
    pub(crate) inode: String,
}

/// Every IPv4 and IPv6 TCP socket of the machine.
pub(crate) fn tcp_sockets() -> Vec<TcpSocket> {
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address 1, rem_address 2, st 3, tx_queue:rx_queue 4, inode 9.
            let (Some(queues), Some(inode)) = (fields.get(4), fields.get(9)) else {
                continue;
            };
            let Some(unread) = queues
                .split_once(':')
                .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
            else {
                continue;
            };
            sockets.push(TcpSocket {
                local: fields[1].to_owned(),
                remote: fields[2].to_owned(),
                state: fields[3].to_owned(),
                unread,
                inode: (*inode).to_owned(),
            });
        }
    }
    sockets
}

/// Calls `EvictToken` on `addr`, presenting `authorization` as given.
pub(crate) async fn evict(
    addr: SocketAddr,
    authorization: Option<&str>,
    token: &str,
) -> Result<EvictTokenResponse, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(EvictTokenRequest {
        token: token.to_owned(),
    });
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    AdminClient::new(channel)
        .evict_token(request)
        .await
        .map(tonic::Response::into_inner)
}

/// Runs the binary to its end with only `env` in its environment: its exit code and stderr.
pub(crate) fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_phantom-authz"));
    command.args(args).env_clear();
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
