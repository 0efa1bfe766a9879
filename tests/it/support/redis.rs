//! A real `redis-server` on a free loopback port.

use phantom_authz::cache::evictions::EVICTION_CHANNEL;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// redis-server

/// A real `redis-server` on a free loopback port, killed on drop.
pub(crate) struct Redis {
    pub(crate) port: u16,
    child: Child,
}

impl Redis {
    pub(crate) fn start() -> Redis {
        Self::start_on(free_port())
    }

    pub(crate) fn start_on(port: u16) -> Redis {
        Self::start_with(port, &[])
    }

    /// A `redis-server` on `port` with `extra` arguments (a config file first, if any).
    pub(crate) fn start_with(port: u16, extra: &[&str]) -> Redis {
        let mut command = Command::new("redis-server");
        command
            .args(extra)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_tied(&mut command);
        let redis = Redis { port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        redis
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `command` so that it dies with the test process, even if the test is killed.
pub(crate) fn spawn_tied(command: &mut Command) -> Child {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl is async-signal-safe and touches only the child being started.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", command.get_program()))
}

/// Kills a child that never made it into its owner (a failed start-up).
pub(crate) struct ChildGuard(pub(crate) Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How many connections are subscribed to the eviction channel.
pub(crate) async fn eviction_subscribers(redis: &Redis) -> u64 {
    let mut conn = redis.connection().await;
    let (_, count): (String, u64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(EVICTION_CHANNEL)
        .query_async(&mut conn)
        .await
        .unwrap();
    count
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster

/// A free port for a cluster node, below the kernel's ephemeral range (32768 and up), with its
/// cluster bus port (10000 higher) free too. A port the kernel hands out for port 0 will not do:
/// above 55535 its bus port does not exist and redis-server refuses to start, and another test's
/// `free_port` may take it while a test holds it for a cluster it has yet to start. Ports are
/// handed out once per test process, from a start that differs between processes.
pub(crate) fn cluster_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % 10_000,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..10_000 {
        let port = 10_000 + (NEXT.fetch_add(1, Ordering::Relaxed) % 10_000) as u16;
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a cluster node between 10000 and 30000");
}

/// A Redis Cluster of three masters with a replica each, on free loopback ports, its nodes
/// killed on drop. Nodes fail over within a few seconds (`cluster-node-timeout` 1 s), and the
/// masters still up keep serving their slots while one is down.
pub(crate) struct Cluster {
    pub(crate) nodes: Vec<Redis>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub(crate) fn start() -> Cluster {
        Self::start_on([(); 6].map(|()| cluster_port()))
    }

    pub(crate) fn start_on(ports: [u16; 6]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<Redis> = (0..6)
            .map(|n| {
                let config = dir.path().join(format!("nodes-{n}.conf"));
                Redis::start_with(
                    ports[n],
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        config.to_str().unwrap(),
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-require-full-coverage",
                        "no",
                        // A fresh replica may not have heard from its master for long: it
                        // must take over all the same.
                        "--cluster-replica-validity-factor",
                        "0",
                        "--dir",
                        dir.path().to_str().unwrap(),
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        let cluster = Cluster { nodes, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Formed once every node serves and names every other in its slot map, replicas
        // included (a client that reads it too early would not know them all).
        let ports: Vec<String> = cluster.nodes.iter().map(|n| n.port.to_string()).collect();
        while !cluster.nodes.iter().all(|node| {
            let slots = redis_cli(node.port, &["CLUSTER", "SLOTS"]);
            redis_cli(node.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
                && ports
                    .iter()
                    .all(|port| slots.lines().any(|line| line == port))
        }) {
            assert!(Instant::now() < deadline, "the cluster did not form");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// Every node, as `--redis-url` takes seed nodes.
    pub(crate) fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(Redis::url).collect();
        urls.join(",")
    }

    /// The nodes that are masters now (the killed ones left out).
    pub(crate) fn masters(&self) -> Vec<&Redis> {
        self.nodes
            .iter()
            .filter(|node| redis_cli(node.port, &["ROLE"]).starts_with("master"))
            .collect()
    }

    /// The replica of the master on `port`.
    pub(crate) fn replica_of(&self, port: u16) -> &Redis {
        self.nodes
            .iter()
            .find(|node| {
                let role = redis_cli(node.port, &["ROLE"]);
                role.starts_with("slave") && role.lines().any(|l| l == port.to_string())
            })
            .expect("every master has a replica")
    }
}

/// Whether the cluster node on `port` serves `key`'s slot (it answers rather than redirects).
pub(crate) fn serves(port: u16, key: &str) -> bool {
    !redis_cli(port, &["EXISTS", key]).contains("MOVED")
}

/// Keys on the node on `port`.
pub(crate) fn dbsize(port: u16) -> u64 {
    redis_cli(port, &["DBSIZE"]).trim().parse().unwrap_or(0)
}

/// What `redis-cli -p port args…` prints (errors included), or "" if it cannot connect.
pub(crate) fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text
}

// ---------------------------------------------------------------------------------------------
// Sentinel

/// The master name the Sentinels watch.
pub(crate) const SENTINEL_MASTER: &str = "cache";

/// A master, its replica and three Sentinels (quorum 2) on free loopback ports, killed on drop.
/// The Sentinels call the master down after 1 s of silence and fail over at once.
pub(crate) struct Sentinels {
    pub(crate) master: Redis,
    pub(crate) replica: Redis,
    pub(crate) sentinels: Vec<Redis>,
    _dir: tempfile::TempDir,
}

impl Sentinels {
    pub(crate) fn start() -> Sentinels {
        let dir = tempfile::tempdir().unwrap();
        let master = Redis::start();
        let replica = Redis::start_with(
            free_port(),
            &[
                "--replicaof",
                "127.0.0.1",
                &master.port.to_string(),
                // Where the replica keeps the copy it is sent.
                "--dir",
                dir.path().to_str().unwrap(),
            ],
        );
        let sentinels = (0..3)
            .map(|n| {
                // A Sentinel rewrites its configuration file: each has its own.
                let config = dir.path().join(format!("sentinel-{n}.conf"));
                std::fs::write(
                    &config,
                    format!(
                        "sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                         sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                         sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                        master.port
                    ),
                )
                .unwrap();
                Redis::start_with(free_port(), &[config.to_str().unwrap(), "--sentinel"])
            })
            .collect();
        let set = Sentinels {
            master,
            replica,
            sentinels,
            _dir: dir,
        };
        // A failover needs Sentinels that know the replica and each other (they learn through
        // the master, every couple of seconds).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !set.sentinels.iter().all(|sentinel| {
            let replicas = redis_cli(sentinel.port, &["SENTINEL", "REPLICAS", SENTINEL_MASTER]);
            let others = redis_cli(sentinel.port, &["SENTINEL", "SENTINELS", SENTINEL_MASTER]);
            replicas.contains(&set.replica.port.to_string())
                && others.lines().filter(|l| *l == "name").count() == 2
        }) {
            assert!(Instant::now() < deadline, "the sentinels did not meet");
            std::thread::sleep(Duration::from_millis(50));
        }
        set
    }

    /// The Sentinels, as `--redis-url` takes them.
    pub(crate) fn urls(&self) -> String {
        let urls: Vec<String> = self.sentinels.iter().map(Redis::url).collect();
        urls.join(",")
    }

    /// The port of the master the Sentinels name now.
    pub(crate) fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|sentinel| {
            let answer = redis_cli(
                sentinel.port,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER],
            );
            answer.lines().nth(1)?.trim().parse().ok()
        })
    }
}

/// How many connections on the server on `port` are subscribed to the eviction channel.
pub(crate) fn eviction_subscribers_on(port: u16) -> u64 {
    let answer = redis_cli(port, &["PUBSUB", "NUMSUB", EVICTION_CHANNEL]);
    answer
        .lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
