//! The shared tier on Redis Cluster and behind Sentinel, each real and local: replicas share
//! entries and evictions through them, keys spread over a cluster's masters, and a master
//! killed costs introspections, never a deny or an error, until the failover is followed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;
use phantom_authz::cache::redis::Slot;
use phantom_authz::token::parse_token;

const ADMIN_SECRET: &str = "admin-Secret-0123456789abcdef";

/// Failovers take a few seconds (a node is called down after 1 s); the bound is generous for
/// a loaded machine, and the tests poll, so they take only as long as the failover does.
const FAILOVER: Duration = Duration::from_secs(60);

/// An IdP that vouches for every token but the revoked ones.
async fn idp() -> (Idp, Arc<Mutex<HashSet<String>>>) {
    let revoked = Arc::new(Mutex::new(HashSet::new()));
    let list = revoked.clone();
    let idp = Idp::start(move |seen| {
        if list.lock().unwrap().contains(&seen.token) {
            Reply::status(204)
        } else {
            Reply::jwt(&make_jwt(&seen.token, Some(unix_now() + 3600), 300))
        }
    })
    .await;
    (idp, revoked)
}

/// A replica in `mode` on `urls`, keeping in-process entries for a minute, with the admin API.
/// Redis gets a timeout a loaded machine keeps to, so that sharing is not lost to it.
async fn replica(idp: &Idp, mode: &[&str], urls: &str, admin_token: &std::path::Path) -> App {
    let mut extra = vec![
        "--redis-url",
        urls,
        "--redis-timeout",
        "1s",
        "--local-cache-ttl",
        "60s",
        "--check-timeout",
        "10s",
        "--admin-grpc-listen",
        "127.0.0.1:0",
        "--admin-token-file",
        admin_token.to_str().unwrap(),
    ];
    extra.extend_from_slice(mode);
    App::start(&idp.url(), "jwt", &extra).await
}

fn admin_token_file() -> tempfile::TempPath {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), ADMIN_SECRET).unwrap();
    file.into_temp_path()
}

async fn status(app: &App, token: &str) -> u16 {
    check(&mut app.client().await, bearer_request(token))
        .await
        .http_status
}

/// The Redis key of `token`'s entry under the tests' cache secret.
fn key_of(token: &str) -> String {
    Slot::derive(CACHE_SECRET.as_bytes(), parse_token(token, 4096).unwrap())
        .name()
        .to_owned()
}

/// How many times the IdP was asked about `token`.
fn introspections(idp: &Idp, token: &str) -> usize {
    idp.seen().iter().filter(|seen| seen.token == token).count()
}

async fn evict_through(app: &App, token: &str) -> phantom_authz::admin::proto::EvictTokenResponse {
    evict(
        app.admin_grpc.unwrap(),
        Some(&format!("Bearer {ADMIN_SECRET}")),
        token,
    )
    .await
    .unwrap()
}

/// `token`, allowed by `b`, revoked at the IdP and evicted through `a`: both replicas confirm,
/// and `b` denies it from then on.
async fn evicted_everywhere(a: &App, b: &App, revoked: &Mutex<HashSet<String>>, token: &str) {
    assert_eq!(status(b, token).await, 200);
    revoked.lock().unwrap().insert(token.to_owned());
    let eviction = evict_through(a, token).await;
    assert_eq!(
        (eviction.replicas_notified, eviction.replicas_confirmed),
        (2, 2)
    );
    assert_eq!(status(b, token).await, 401);
}

/// Waits until `condition` holds, failing with `what` past `timeout`.
async fn wait_for(what: &str, timeout: Duration, condition: impl AsyncFnMut() -> bool) {
    assert!(eventually(timeout, condition).await, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_shares_entries_spreads_keys_and_carries_evictions() {
    let cluster = Cluster::start();
    let (idp, revoked) = idp().await;
    let admin = admin_token_file();
    let mode = ["--redis-mode", "cluster"];
    let a = replica(&idp, &mode, &cluster.urls(), &admin).await;
    let b = replica(&idp, &mode, &cluster.urls(), &admin).await;

    let tokens: Vec<String> = (0..50).map(|n| format!("cluster-token-{n}")).collect();
    for token in &tokens {
        assert_eq!(status(&a, token).await, 200);
    }
    assert_eq!(idp.calls(), 50);
    // Writes follow the answers: wait until every entry is in, then count each master's.
    let masters: Vec<u16> = cluster.masters().iter().map(|m| m.port).collect();
    assert_eq!(masters.len(), 3);
    wait_for(
        "the entries never all reached the cluster",
        FAILOVER,
        async || masters.iter().map(|&port| dbsize(port)).sum::<u64>() == 50,
    )
    .await;
    let holding = masters.iter().filter(|&&port| dbsize(port) > 0).count();
    assert!(holding > 1, "every key on one master");

    // The other replica finds every entry in the cluster: not one introspection.
    for token in &tokens {
        assert_eq!(status(&b, token).await, 200);
    }
    assert_eq!(idp.calls(), 50, "B introspected tokens A had cached");

    // An eviction through A reaches B, which held the token in memory.
    revoked.lock().unwrap().insert(tokens[0].clone());
    let eviction = evict_through(&a, &tokens[0]).await;
    assert!(eviction.redis_deleted);
    assert_eq!(eviction.replicas_notified, 2);
    assert_eq!(eviction.replicas_confirmed, 2);
    assert_eq!(status(&b, &tokens[0]).await, 401);
    assert_eq!(introspections(&idp, &tokens[0]), 2);
    // The rest stay shared and cached.
    assert_eq!(status(&b, &tokens[1]).await, 200);
    assert_eq!(idp.calls(), 51);
}

/// Checks fresh tokens on `a` then `b` until `b` finds one that `a` cached: every Check must be
/// allowed, whatever Redis is going through. `tokens` are tried in turn; a try whose entry does
/// not reach `on` (the server that must hold it, polled) within a few seconds is given up.
/// Returns how many Checks were answered on the way.
async fn until_shared(
    idp: &Idp,
    a: &App,
    b: &App,
    tokens: &mut impl Iterator<Item = String>,
    holds: impl Fn(&str) -> bool,
) -> usize {
    let deadline = Instant::now() + FAILOVER;
    let mut answered = 0;
    loop {
        assert!(Instant::now() < deadline, "sharing did not resume");
        let token = tokens.next().expect("enough tokens");
        assert_eq!(status(a, &token).await, 200, "A refused a valid token");
        answered += 1;
        let key = key_of(&token);
        let stored = eventually(Duration::from_secs(3), async || holds(&key)).await;
        assert_eq!(status(b, &token).await, 200, "B refused a valid token");
        answered += 1;
        if stored && introspections(idp, &token) == 1 {
            return answered;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_killed_costs_introspections_until_its_replica_takes_over() {
    let mut cluster = Cluster::start();
    let (idp, revoked) = idp().await;
    let admin = admin_token_file();
    let mode = ["--redis-mode", "cluster"];
    let a = replica(&idp, &mode, &cluster.urls(), &admin).await;
    let b = replica(&idp, &mode, &cluster.urls(), &admin).await;

    // Tokens whose entries live on the master about to be killed, found while it is up.
    let victim = cluster.masters()[0].port;
    let heir = cluster.replica_of(victim).port;
    let mut tokens = (0..)
        .map(|n| format!("failover-token-{n}"))
        .filter(|token| serves(victim, &key_of(token)));
    let owned: Vec<String> = tokens.by_ref().take(60).collect();
    let mut tokens = owned.into_iter();

    // Shared before the failure.
    let before = until_shared(&idp, &a, &b, &mut tokens, |key| {
        redis_cli(victim, &["EXISTS", key]).trim() == "1"
    })
    .await;
    assert_eq!(before, 2, "sharing needed retries before any failure");

    let index = cluster.nodes.iter().position(|n| n.port == victim).unwrap();
    cluster.nodes[index].kill();
    // Until the replica takes the slots over, the entries' writes fail and Checks introspect;
    // then the entries land on the replica, and B finds them there.
    let answered = until_shared(&idp, &a, &b, &mut tokens, |key| {
        redis_cli(heir, &["EXISTS", key]).trim() == "1"
    })
    .await;
    assert!(redis_cli(heir, &["ROLE"]).starts_with("master"));
    eprintln!("{answered} Checks answered, all allowed, until sharing resumed");

    // Both replicas hear evictions again, whichever node they listened on.
    let token = tokens.next().unwrap();
    assert_eq!(status(&b, &token).await, 200);
    revoked.lock().unwrap().insert(token.clone());
    // A replica whose node died resubscribes after a back-off; until then, and while the
    // cluster's view of its nodes settles, an eviction may reach fewer replicas or fail.
    wait_for(
        "a replica never heard evictions again",
        FAILOVER,
        async || {
            evict(
                a.admin_grpc.unwrap(),
                Some(&format!("Bearer {ADMIN_SECRET}")),
                &token,
            )
            .await
            .is_ok_and(|eviction| eviction.replicas_confirmed == 2)
        },
    )
    .await;
    assert_eq!(status(&b, &token).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_absent_at_start_is_used_once_it_forms() {
    let ports = [(); 6].map(|()| cluster_port());
    let urls: Vec<String> = ports
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect();
    let urls = urls.join(",");
    let (idp, _) = idp().await;
    let admin = admin_token_file();
    let mode = ["--redis-mode", "cluster"];
    let a = replica(&idp, &mode, &urls, &admin).await;
    let b = replica(&idp, &mode, &urls, &admin).await;
    // No node listens: Checks are answered by introspection.
    assert_eq!(status(&a, "before-the-cluster").await, 200);
    assert_eq!(status(&b, "before-the-cluster").await, 200);

    let cluster = Cluster::start_on(ports);
    let mut tokens = (0..).map(|n| format!("formed-token-{n}"));
    until_shared(&idp, &a, &b, &mut tokens, |key| {
        cluster
            .nodes
            .iter()
            .any(|node| redis_cli(node.port, &["EXISTS", key]).trim() == "1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_replicas_share_and_follow_a_failover() {
    let mut set = Sentinels::start();
    let (idp, revoked) = idp().await;
    let admin = admin_token_file();
    let mode = [
        "--redis-mode",
        "sentinel",
        "--redis-sentinel-master",
        SENTINEL_MASTER,
    ];
    let a = replica(&idp, &mode, &set.urls(), &admin).await;
    let b = replica(&idp, &mode, &set.urls(), &admin).await;
    let mut tokens = (0..).map(|n| format!("sentinel-token-{n}"));

    let master = set.master.port;
    let before = until_shared(&idp, &a, &b, &mut tokens, |key| {
        redis_cli(master, &["EXISTS", key]).trim() == "1"
    })
    .await;
    assert_eq!(before, 2, "sharing needed retries before any failure");
    // An eviction through A reaches B.
    evicted_everywhere(&a, &b, &revoked, &tokens.next().unwrap()).await;

    set.master.kill();
    let heir = set.replica.port;
    let answered = until_shared(&idp, &a, &b, &mut tokens, |key| {
        redis_cli(heir, &["EXISTS", key]).trim() == "1"
    })
    .await;
    assert_eq!(set.master_port(), Some(heir));
    eprintln!("{answered} Checks answered, all allowed, until sharing resumed");

    // Both replicas listen on the new master.
    wait_for("the replicas did not resubscribe", FAILOVER, async || {
        eviction_subscribers_on(heir) == 2
    })
    .await;
    evicted_everywhere(&a, &b, &revoked, &tokens.next().unwrap()).await;
}
