//! The in-process tier (`LocalCache`, on `quick_cache`'s S3-FIFO) against `quick_cache` alone,
//! `moka` (W-TinyLFU) and the tier's former policy (a map dropping expired entries and then an
//! eighth of the rest, in the map's own order, whenever full), on one seeded Zipf-like key
//! stream over a key space larger than the cap: each operation is a read-through (a get, and an insert when
//! it misses), as the tier is used. Prints the hit ratio, the mean time per operation and the
//! slowest insert, single-threaded. `--memory NAME` instead fills one cache to its cap and
//! prints its own bytes per entry (VmRSS delta; every entry shares one value).
//!
//! ```text
//! cargo run --release --example cache_policy -- --cap 100000
//! cargo run --release --example cache_policy -- --cap 1000000 --memory local
//! ```

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

use phantom_authz::cache::Grant;
use phantom_authz::cache::local::LocalCache;
use phantom_authz::jwt::Claims;
use phantom_authz::token::{CacheKey, parse_bearer};

#[derive(Parser)]
#[command(
    about = "Hit ratio and cost of the in-process tier's policy against quick_cache and moka"
)]
struct Args {
    /// Entries each cache may hold.
    #[arg(long, default_value_t = 100_000)]
    cap: usize,
    /// Distinct keys in the stream, as a multiple of the cap.
    #[arg(long, default_value_t = 10)]
    keys_per_cap: usize,
    /// Operations replayed (after a warm-up of twice the cap, not counted).
    #[arg(long, default_value_t = 4_000_000)]
    ops: usize,
    /// Zipf exponents: key of rank k is drawn with weight 1/k^s.
    #[arg(long, value_delimiter = ',', default_value = "0.9,1.0")]
    s: Vec<f64>,
    /// Seeds the key stream; the same seed replays the same stream.
    #[arg(long, default_value_t = 12)]
    seed: u64,
    /// Fill this cache to its cap with distinct keys and print its bytes per entry.
    #[arg(long, value_enum)]
    memory: Option<Policy>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Policy {
    Local,
    Eighth,
    QuickCache,
    Moka,
}

const TTL: Duration = Duration::from_secs(3600);

/// The three caches behind the two calls a read-through needs.
enum Cache {
    Local(LocalCache<Grant>),
    Eighth(Eighth),
    Quick(quick_cache::sync::Cache<CacheKey, Grant>),
    Moka(moka::sync::Cache<CacheKey, Grant>),
}

impl Cache {
    fn new(policy: Policy, cap: usize) -> Self {
        match policy {
            Policy::Local => Cache::Local(LocalCache::new(cap, u64::MAX / 2).without_gauges()),
            Policy::Eighth => Cache::Eighth(Eighth::new(cap)),
            Policy::QuickCache => Cache::Quick(quick_cache::sync::Cache::new(cap)),
            Policy::Moka => Cache::Moka(moka::sync::Cache::new(cap as u64)),
        }
    }

    fn get(&self, key: &CacheKey) -> bool {
        match self {
            Cache::Local(cache) => cache.get(key).is_some(),
            Cache::Eighth(cache) => cache.get(key).is_some(),
            Cache::Quick(cache) => cache.get(key).is_some(),
            Cache::Moka(cache) => cache.get(key).is_some(),
        }
    }

    fn insert(&self, key: CacheKey, grant: &Grant) {
        match self {
            Cache::Local(cache) => cache.put(key, grant.clone(), TTL),
            Cache::Eighth(cache) => cache.put(key, grant.clone()),
            Cache::Quick(cache) => cache.insert(key, grant.clone()),
            Cache::Moka(cache) => cache.insert(key, grant.clone()),
        }
    }
}

fn main() {
    let args = Args::parse();
    let grant = Grant::new(
        &format!("eyJhbGciOiJSUzI1NiJ9.{}.sig", "x".repeat(1000)),
        &Claims::default(),
    );
    if let Some(policy) = args.memory {
        memory(policy, args.cap, &grant);
        return;
    }
    let n = args.cap * args.keys_per_cap;
    let keys: Vec<CacheKey> = (0..n).map(key).collect();
    println!(
        "cap {} entries, {} keys, {} operations after {} of warm-up, seed {}",
        args.cap,
        n,
        args.ops,
        2 * args.cap,
        args.seed
    );
    println!("| s | cache | hit ratio | ns per operation | slowest insert |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for &s in &args.s {
        let stream = zipf_stream(n, s, 2 * args.cap + args.ops, args.seed);
        for policy in [
            Policy::Local,
            Policy::Eighth,
            Policy::QuickCache,
            Policy::Moka,
        ] {
            let cache = Cache::new(policy, args.cap);
            let (warm, measured) = stream.split_at(2 * args.cap);
            for &i in warm {
                let key = &keys[i as usize];
                if !cache.get(key) {
                    cache.insert(*key, &grant);
                }
            }
            let (mut hits, mut slowest) = (0u64, Duration::ZERO);
            let start = Instant::now();
            for &i in measured {
                let key = &keys[i as usize];
                if cache.get(key) {
                    hits += 1;
                } else {
                    let t = Instant::now();
                    cache.insert(*key, &grant);
                    slowest = slowest.max(t.elapsed());
                }
            }
            let elapsed = start.elapsed();
            println!(
                "| {s} | {policy:?} | {:.3} | {:.0} | {:.2} ms |",
                hits as f64 / measured.len() as f64,
                elapsed.as_nanos() as f64 / measured.len() as f64,
                slowest.as_secs_f64() * 1e3
            );
        }
    }
}

/// The former policy, as it was: one map behind one lock; when full, expired entries go, then
/// an eighth of the rest in the map's iteration order (keys are digests, so effectively random).
struct Eighth {
    map: Mutex<HashMap<CacheKey, (Grant, Instant)>>,
    cap: usize,
}

impl Eighth {
    fn new(cap: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            cap,
        }
    }

    fn get(&self, key: &CacheKey) -> Option<Grant> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (grant, expires) = map.get(key)?;
        if *expires > now {
            return Some(grant.clone());
        }
        map.remove(key);
        None
    }

    fn put(&self, key: CacheKey, grant: Grant) {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&key);
        if map.len() >= self.cap {
            map.retain(|_, (_, expires)| *expires > now);
            let target = self.cap - self.cap / 8 - 1;
            let excess = map.len().saturating_sub(target);
            let victims: Vec<CacheKey> = map.keys().take(excess).copied().collect();
            for victim in victims {
                map.remove(&victim);
            }
        }
        map.insert(key, (grant, now + TTL));
    }
}

fn key(i: usize) -> CacheKey {
    let value = format!("Bearer zipf-key-{i}");
    CacheKey::of(parse_bearer(&value, 100).expect("a valid bearer value"))
}

/// `len` key indexes in `0..n`, index k drawn with weight 1/(k+1)^s (inverse CDF over a table
/// of cumulative weights), from a SplitMix64 stream seeded with `seed`.
fn zipf_stream(n: usize, s: f64, len: usize, seed: u64) -> Vec<u32> {
    let mut cumulative = Vec::with_capacity(n);
    let mut total = 0.0;
    for k in 1..=n {
        total += (k as f64).powf(-s);
        cumulative.push(total);
    }
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let u = (splitmix64(state) >> 11) as f64 / (1u64 << 53) as f64 * total;
            cumulative.partition_point(|&c| c < u).min(n - 1) as u32
        })
        .collect()
}

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills one cache with `cap` distinct keys sharing `grant`: what the RSS grows by is the
/// cache's own cost per entry (key, expiry, slot, policy state).
fn memory(policy: Policy, cap: usize, grant: &Grant) {
    let keys: Vec<CacheKey> = (0..cap).map(key).collect();
    let cache = Cache::new(policy, cap + cap / 4);
    let before = rss_bytes();
    for key in &keys {
        cache.insert(*key, grant);
    }
    if let Cache::Moka(cache) = &cache {
        cache.run_pending_tasks();
    }
    let after = rss_bytes();
    let held = keys.iter().filter(|key| cache.get(key)).count();
    println!(
        "{policy:?}: {held} of {cap} entries held, {:.0} bytes per entry",
        (after - before) as f64 / held.max(1) as f64
    );
}

fn rss_bytes() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<i64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}
