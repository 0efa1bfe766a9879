//! The connection to Redis in each topology, behind redis-rs's own `ConnectionLike`: one
//! server through a self-reconnecting connection manager, Redis Cluster through redis-rs's
//! cluster client (slots, MOVED/ASK and failovers followed), or the master Sentinel names,
//! asked for again after a failure. Each kind also says where to subscribe to pub/sub.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    Pipeline, RedisFuture, RedisResult, TlsCertificates, TlsMode, Value,
};

use crate::config::{RedisTopology, Secret};

/// Why the Redis tier could not be set up; names the flag, never the URL (it may hold a
/// password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    #[error("--redis-url: not a valid redis:// or rediss:// URL")]
    InvalidUrl,
    #[error("--redis-url: cannot build a Redis client ({0:?})")]
    Client(redis::ErrorKind),
}

/// Bound on finding the master through the Sentinels and connecting to it.
const SENTINEL_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The connection every command goes through; cheap to clone, clones share it.
#[derive(Clone)]
pub enum Connection {
    /// One server; the manager reconnects by itself.
    Standalone {
        connection: ConnectionManager,
        client: Arc<Client>,
    },
    /// Redis Cluster. Pub/sub goes through one node at a time: a classic PUBLISH on any node
    /// reaches the subscribers of every node.
    Cluster {
        connection: ClusterConnection,
        nodes: Arc<[Client]>,
    },
    /// The master the Sentinels name.
    Sentinel(Arc<SentinelMaster>),
}

impl Connection {
    /// Prepares the connection for `urls` in `topology`, connecting lazily: Redis may be down at
    /// start-up. `ca_pem`: CAs for rediss:// servers' certificates instead of the system roots.
    pub fn new(
        urls: &[Secret],
        topology: &RedisTopology,
        ca_pem: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Self, SetupError> {
        let infos = urls
            .iter()
            .map(|url| {
                url.expose()
                    .into_connection_info()
                    .map(|info| info.set_tcp_settings(nodelay()))
                    .map_err(|_| SetupError::InvalidUrl)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let first = infos.first().ok_or(SetupError::InvalidUrl)?.clone();
        let certificates = ca_pem.map(|pem| TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        });
        let connect_timeout = timeout.max(Duration::from_millis(250));
        let client = |info: ConnectionInfo| {
            match &certificates {
                Some(certificates) => Client::build_with_tls(info, certificates.clone()),
                None => Client::open(info),
            }
            .map_err(|e| SetupError::Client(e.kind()))
        };
        match topology {
            RedisTopology::Standalone => {
                let client = client(first)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_secs(1));
                let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)
                    .map_err(|e| SetupError::Client(e.kind()))?;
                Ok(Self::Standalone {
                    connection,
                    client: Arc::new(client),
                })
            }
            RedisTopology::Cluster => {
                let nodes = infos
                    .iter()
                    .cloned()
                    .map(client)
                    .collect::<Result<Arc<[Client]>, _>>()?;
                let mut builder = ClusterClientBuilder::new(infos)
                    .connection_timeout(connect_timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(100)
                    .tcp_settings(nodelay());
                if let Some(certificates) = &certificates {
                    builder = builder.certs(certificates.clone());
                }
                let client = builder.build().map_err(|e| SetupError::Client(e.kind()))?;
                let connection = client.get_pending_async_connection_with_config(
                    ClusterConfig::new()
                        .set_connection_timeout(connect_timeout)
                        .set_response_timeout(timeout),
                );
                Ok(Self::Cluster { connection, nodes })
            }
            RedisTopology::Sentinel { master } => {
                let settings = first.redis_settings();
                let mut builder = SentinelClientBuilder::new(
                    infos.iter().map(|info| info.addr().clone()),
                    master,
                    SentinelServerType::Master,
                )
                .map_err(|e| SetupError::Client(e.kind()))?
                .set_client_to_redis_db(settings.db())
                .set_client_to_redis_tcp_settings(nodelay())
                .set_client_to_sentinel_tcp_settings(nodelay());
                if let Some(username) = settings.username() {
                    builder = builder
                        .set_client_to_redis_username(username)
                        .set_client_to_sentinel_username(username);
                }
                if let Some(password) = settings.password() {
                    builder = builder
                        .set_client_to_redis_password(password)
                        .set_client_to_sentinel_password(password);
                }
                if matches!(first.addr(), ConnectionAddr::TcpTls { .. }) {
                    builder = builder.set_client_to_redis_tls_mode(TlsMode::Secure);
                    if let Some(certificates) = &certificates {
                        builder = builder
                            .set_client_to_redis_certificates(certificates.clone())
                            .set_client_to_sentinel_certificates(certificates.clone());
                    }
                }
                let sentinel = builder.build().map_err(|e| SetupError::Client(e.kind()))?;
                Ok(Self::Sentinel(Arc::new(SentinelMaster {
                    sentinel: tokio::sync::Mutex::new(sentinel),
                    config: AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(connect_timeout))
                        .set_response_timeout(Some(timeout)),
                    current: Mutex::default(),
                    db: settings.db(),
                })))
            }
        }
    }

    /// A client for a server to subscribe on: the server itself; a cluster node, the next one
    /// of the list at each `attempt` (any node hears every PUBLISH); or the master the
    /// Sentinels name now.
    pub async fn pubsub_client(&self, attempt: usize) -> RedisResult<Client> {
        match self {
            Self::Standalone { client, .. } => Ok(Client::clone(client)),
            Self::Cluster { nodes, .. } => Ok(nodes[attempt % nodes.len()].clone()),
            Self::Sentinel(master) => master.client().await,
        }
    }

    /// How many subscribers a PUBLISH on `channel` reaches: PUBLISH's own count, except in a
    /// cluster, where it counts only the receiving node's and the subscribers of every node are
    /// added up first.
    pub async fn publish_counted(&mut self, channel: &str, message: &str) -> RedisResult<u64> {
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(channel).arg(message);
        let Self::Cluster { connection, .. } = self else {
            return publish.query_async(self).await;
        };
        let mut numsub = redis::cmd("PUBSUB");
        numsub.arg("NUMSUB").arg(channel);
        let listening = numsub
            .query_async::<std::collections::HashMap<String, u64>>(connection)
            .await
            .map(|counts| counts.get(channel).copied().unwrap_or(0));
        let reached: u64 = publish.query_async(connection).await?;
        // Without every node's count, the receiving node's is all there is.
        Ok(listening.unwrap_or(reached))
    }

    /// Whether one pipeline may hold any keys: not in a cluster, where it must stay in one slot.
    pub fn pipelines_across_keys(&self) -> bool {
        !matches!(self, Self::Cluster { .. })
    }

    /// A command failed or timed out: with Sentinel, ask which server is master before the next
    /// one (the others follow failures by themselves).
    pub fn failed(&self) {
        if let Self::Sentinel(master) = self {
            master.forget();
        }
    }
}

fn nodelay() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Standalone { connection, .. } => connection.req_packed_command(cmd),
            Self::Cluster { connection, .. } => connection.req_packed_command(cmd),
            Self::Sentinel(master) => Box::pin(async move {
                let mut connection = master.connection().await?;
                connection.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Standalone { connection, .. } => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Self::Cluster { connection, .. } => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Self::Sentinel(master) => Box::pin(async move {
                let mut connection = master.connection().await?;
                connection
                    .req_packed_commands(pipeline, offset, count)
                    .await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone { connection, .. } => connection.get_db(),
            Self::Cluster { connection, .. } => connection.get_db(),
            Self::Sentinel(master) => master.db,
        }
    }
}

/// The master of a Sentinel-watched set: looked up and connected to on first use, and again
/// after a failure, when a failover may have named another.
pub struct SentinelMaster {
    /// Also serialises lookups: one at a time, the others wait for its connection.
    sentinel: tokio::sync::Mutex<SentinelClient>,
    config: AsyncConnectionConfig,
    current: Mutex<Option<MultiplexedConnection>>,
    db: i64,
}

impl SentinelMaster {
    /// The current master's connection, looked up first if there is none. The lookup runs on
    /// a task of its own, so that a command that times out does not cancel it.
    async fn connection(self: &Arc<Self>) -> RedisResult<MultiplexedConnection> {
        if let Some(connection) = self.current() {
            return Ok(connection);
        }
        let master = self.clone();
        tokio::spawn(async move {
            let mut sentinel = master.sentinel.lock().await;
            // Another lookup may have finished while this one waited.
            if let Some(connection) = master.current() {
                return Ok(connection);
            }
            let connect = sentinel.get_async_connection_with_config(&master.config);
            let connection = tokio::time::timeout(SENTINEL_LOOKUP_TIMEOUT, connect)
                .await
                .map_err(|_| {
                    redis::RedisError::from((redis::ErrorKind::Io, "sentinel lookup timed out"))
                })??;
            *master.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(connection.clone());
            tracing::info!("connected to the master the sentinels name");
            Ok(connection)
        })
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "sentinel lookup failed")))?
    }

    /// A client for the master the Sentinels name now.
    async fn client(&self) -> RedisResult<Client> {
        self.sentinel.lock().await.async_get_client().await
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn forget(&self) {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}
