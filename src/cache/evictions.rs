//! The eviction protocol between replicas, both ends, over Redis pub/sub.
//!
//! The evicting replica, once the token's Redis entries are tombstoned, publishes
//! `<token digest hex> <eviction id hex>` on [`EVICTION_CHANNEL`] (a digest, never a token) and
//! waits for confirmations. Every subscribed replica, the evicting one included, drops its
//! in-process copy and refuses results of lookups already under way ([`Forget`]), then publishes
//! the id on [`CONFIRM_CHANNEL`]. A replica that was not subscribed when a notice went out cannot
//! know what it missed, so it drops its whole in-process tier each time it (re)subscribes.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::watch;

use super::now_ms;
use super::redis::{KindName as _, RedisCache};
use crate::metrics::{self, EvictionSource};
use crate::token::CacheKey;

/// The channel on which evictions travel.
pub const EVICTION_CHANNEL: &str = "phantom-authz:v2:evict";

/// The channel on which replicas confirm an eviction: `<eviction id hex>`.
pub const CONFIRM_CHANNEL: &str = "phantom-authz:v2:evicted";

/// How long an eviction waits for replicas to confirm they dropped their copies.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// What a replica drops when it hears of evictions: its in-process copies, and the results of
/// lookups under way.
pub trait Forget: Send + Sync {
    /// One token, by its digest.
    fn forget(&self, key: &CacheKey);
    /// Everything, when notices may have been missed.
    fn forget_all(&self);
}

/// The notice for one eviction.
pub fn notice(key: &CacheKey, id: u64) -> String {
    format!("{} {id:016x}", key.to_hex())
}

/// Reads an eviction notice: the token's digest and the eviction's id.
pub fn parse_notice(payload: &[u8]) -> Option<(CacheKey, &str)> {
    let text = std::str::from_utf8(payload).ok()?;
    let (key, id) = text.split_once(' ')?;
    parse_id(id.as_bytes())?;
    Some((CacheKey::from_hex(key.as_bytes())?, id))
}

fn parse_id(id: &[u8]) -> Option<u64> {
    if id.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(id).ok()?, 16).ok()
}

/// This replica's evictions waiting for confirmations, by id: how many came in.
#[derive(Default)]
pub struct Confirmations(Mutex<HashMap<u64, watch::Sender<u64>>>);

impl Confirmations {
    /// Registers a new eviction; it is forgotten when the returned [`Awaited`] drops.
    pub fn expect(self: &Arc<Self>) -> Awaited {
        let id = random_id();
        let (count, receiver) = watch::channel(0u64);
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, count);
        Awaited {
            confirmations: self.clone(),
            id,
            receiver,
        }
    }

    /// Counts a confirmation of one of this replica's evictions; others' are ignored.
    pub fn confirmed(&self, id: &[u8]) {
        let Some(id) = parse_id(id) else { return };
        if let Some(count) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&id) {
            count.send_modify(|n| *n += 1);
        }
    }
}

/// One eviction waiting for its confirmations.
pub struct Awaited {
    confirmations: Arc<Confirmations>,
    /// Travels in the notice.
    pub id: u64,
    receiver: watch::Receiver<u64>,
}

impl Awaited {
    /// Waits, at most 2 s, until `notified` replicas confirmed; returns how
    /// many did.
    pub async fn confirmed_by(mut self, notified: u64) -> u64 {
        let _ = tokio::time::timeout(
            CONFIRM_TIMEOUT,
            self.receiver.wait_for(|confirmed| *confirmed >= notified),
        )
        .await;
        let confirmed = *self.receiver.borrow();
        confirmed.min(notified)
    }
}

impl Drop for Awaited {
    fn drop(&mut self) {
        self.confirmations
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

fn random_id() -> u64 {
    let mut bytes = [0u8; 8];
    // Ids only tell this replica's evictions apart; a clock-derived one serves if randomness
    // fails.
    getrandom::fill(&mut bytes).map_or_else(|_| now_ms(), |()| u64::from_ne_bytes(bytes))
}

// ---------------------------------------------------------------------------------------------
// The subscriber

/// Bound on connecting and subscribing, and on each keep-alive ping.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a quiet subscription is checked with a ping: a connection that died without a
/// word (a partition, a failover) is noticed within this plus [`SUBSCRIBE_TIMEOUT`].
const PING_EVERY: Duration = Duration::from_secs(5);

/// Listens for evictions on Redis until `shutdown` resolves, dropping each evicted token's
/// in-process entry and confirming it to the evicting replica, and passing on confirmations of
/// this replica's own evictions. Reconnects and resubscribes by itself, waiting a bounded,
/// jittered, growing delay between attempts; never gives up and never fails the service.
/// `listening` is true while subscribed (and its in-process tier cleared), for `/readyz`.
pub async fn subscribe(
    redis: Arc<RedisCache>,
    forget: Arc<dyn Forget>,
    listening: Arc<AtomicBool>,
    shutdown: impl Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    // Replicas of a cluster start on different nodes, and move on to the next when one fails.
    let mut attempt = random_u32() as usize;
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            reason = listen(attempt, &redis, &*forget, &listening, &mut backoff) => {
                listening.store(false, Ordering::Relaxed);
                tracing::warn!(%reason, "eviction subscription lost; resubscribing");
            }
        }
        attempt = attempt.wrapping_add(1);
        let delay = backoff.next_delay(random_u32());
        tokio::select! {
            () = &mut shutdown => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One subscription, from connecting until it breaks; returns why it broke. `attempt` picks the
/// node in a cluster.
async fn listen(
    attempt: usize,
    redis: &Arc<RedisCache>,
    forget: &dyn Forget,
    listening: &AtomicBool,
    backoff: &mut Backoff,
) -> String {
    let connect = async {
        let client = redis.connection().pubsub_client(attempt).await?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub
            .subscribe(&[EVICTION_CHANNEL, CONFIRM_CHANNEL])
            .await?;
        redis::RedisResult::Ok(pubsub)
    };
    let pubsub = match tokio::time::timeout(SUBSCRIBE_TIMEOUT, connect).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(error)) => return error.kind_name(),
        Err(_) => return "subscribing timed out".into(),
    };
    // Notices sent while this replica was not listening are lost: trust nothing held.
    forget.forget_all();
    listening.store(true, Ordering::Relaxed);
    backoff.reset();
    tracing::info!(channel = EVICTION_CHANNEL, "listening for evictions");

    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return "connection closed".into();
                };
                if message.get_channel_name() == CONFIRM_CHANNEL {
                    redis.confirmations().confirmed(message.get_payload_bytes());
                    continue;
                }
                match parse_notice(message.get_payload_bytes()) {
                    Some((key, id)) => {
                        forget.forget(&key);
                        metrics::eviction(EvictionSource::Pubsub);
                        tracing::debug!(key = ?key, "evicted on notice");
                        // Confirmed off the read loop, which must keep draining messages.
                        let (redis, id) = (redis.clone(), id.to_owned());
                        tokio::spawn(async move {
                            if let Err(error) = redis.confirm(&id).await {
                                tracing::debug!(%error, "eviction confirmation failed");
                            }
                        });
                    }
                    None => tracing::warn!("ignoring a malformed eviction notice"),
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return error.kind_name(),
                    Err(_) => return "ping timed out".into(),
                }
            }
        }
    }
}

/// Delays between reconnection attempts: doubling from `min` up to `max`, each one drawn
/// between half and all of its nominal value so that replicas do not reconnect in step.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    nominal: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            nominal: min,
        }
    }

    /// The next delay; `random` picks where it falls in its jitter range.
    pub fn next_delay(&mut self, random: u32) -> Duration {
        let nominal = self.nominal;
        self.nominal = (nominal * 2).min(self.max);
        let fraction = 0.5 + 0.5 * f64::from(random) / f64::from(u32::MAX);
        nominal.mul_f64(fraction)
    }

    /// Back to the shortest delay, after a success.
    pub fn reset(&mut self) {
        self.nominal = self.min;
    }
}

fn random_u32() -> u32 {
    let mut bytes = [0u8; 4];
    // Jitter only: without randomness, the largest delay of the range is as good.
    getrandom::fill(&mut bytes).map_or(u32::MAX, |()| u32::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::parse_token;

    #[test]
    fn notices_carry_a_digest_and_an_id() {
        let key = CacheKey::of(parse_token("t", 10).unwrap());
        let notice = notice(&key, 42);
        assert_eq!(
            parse_notice(notice.as_bytes()),
            Some((key, "000000000000002a"))
        );
        assert_eq!(parse_notice(key.to_hex().as_bytes()), None);
        assert_eq!(parse_notice(b"zz 000000000000002a"), None);
        assert_eq!(parse_id(b"000000000000002a"), Some(42));
        assert_eq!(parse_id(b"2a"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_eviction_counts_its_own_confirmations_only() {
        let confirmations = Arc::new(Confirmations::default());
        let awaited = confirmations.expect();
        let id = format!("{:016x}", awaited.id);
        confirmations.confirmed(id.as_bytes());
        confirmations.confirmed(b"00000000000000ff");
        confirmations.confirmed(id.as_bytes());
        // Two of three confirmed: the wait ends at its bound with two.
        assert_eq!(awaited.confirmed_by(3).await, 2);
        assert!(confirmations.0.lock().unwrap().is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_its_bound_with_jitter_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut backoff = Backoff::new(min, max);
        let top: Vec<_> = (0..10).map(|_| backoff.next_delay(u32::MAX)).collect();
        assert_eq!(top[0], min);
        assert_eq!(top[1], Duration::from_millis(200));
        assert_eq!(top[5], Duration::from_millis(3_200));
        assert!(top[6..].iter().all(|&d| d == max), "{top:?}");
        // The bottom of the jitter range is half the nominal delay.
        backoff.reset();
        assert_eq!(backoff.next_delay(0), min / 2);
        assert_eq!(backoff.next_delay(0), min);
        for random in [0, 1, u32::MAX / 2, u32::MAX] {
            let delay = Backoff::new(min, max).next_delay(random);
            assert!(delay >= min / 2 && delay <= min, "{delay:?}");
        }
    }
}
