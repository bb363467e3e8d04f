//! Token buckets keyed by who asks (an identity, a peer address), with bounded memory.
//!
//! A bucket holds up to `burst` tokens and refills at `rate` per second; an action takes one.
//! A bucket that has refilled completely is indistinguishable from a new one, so when the map
//! reaches its key limit those are dropped first. If it is still full — many keys, all busy,
//! which is what a flood from many addresses looks like — new keys share one overflow bucket:
//! memory stays bounded and the flood competes with itself rather than with known peers.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Self {
        Bucket { tokens: burst, at: now }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(burst);
        self.at = now;
    }
}

/// Token buckets per key, at most `max_keys` of them.
pub struct KeyedBuckets<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    inner: Mutex<Inner<K>>,
}

struct Inner<K> {
    buckets: HashMap<K, Bucket>,
    overflow: Option<Bucket>,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// Buckets of `burst` tokens refilled at `rate` per second, for at most `max_keys` keys.
    pub fn new(rate: f64, burst: f64, max_keys: usize) -> Self {
        KeyedBuckets {
            rate: rate.max(0.0),
            burst: burst.max(1.0),
            max_keys: max_keys.max(1),
            inner: Mutex::new(Inner { buckets: HashMap::new(), overflow: None }),
        }
    }

    /// Takes a token for `key`; false (and nothing taken) if its bucket is empty.
    pub fn try_take(&self, key: &K, now: Instant) -> bool {
        self.with_bucket(key, now, |b| {
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }

    /// [`Self::try_take`] for a key holding `shares` base shares (`crate::auth::share_weight`):
    /// an action costs 1/`shares` of a token, so its rate and burst are `shares` times the base.
    pub fn try_take_share(&self, key: &K, now: Instant, shares: u32) -> bool {
        let cost = 1.0 / f64::from(shares.max(1));
        self.with_bucket(key, now, |b| {
            if b.tokens >= cost {
                b.tokens -= cost;
                true
            } else {
                false
            }
        })
    }

    /// Takes a token for `key` if one is left (an event is recorded, never refused).
    pub fn spend(&self, key: &K, now: Instant) {
        self.with_bucket(key, now, |b| b.tokens = (b.tokens - 1.0).max(0.0));
    }

    /// How long until `key` has a token again (zero if it has one now).
    pub fn wait(&self, key: &K, now: Instant) -> Duration {
        let (rate, burst) = (self.rate, self.burst);
        let inner = self.inner.lock().unwrap();
        let Some(mut b) = inner.buckets.get(key).copied().or(inner.overflow) else {
            return Duration::ZERO;
        };
        b.refill(rate, burst, now);
        if b.tokens >= 1.0 || rate == 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - b.tokens) / rate)
        }
    }

    /// Keys with a bucket of their own.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().buckets.len()
    }

    /// True when no key has a bucket of its own.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn with_bucket<T>(&self, key: &K, now: Instant, f: impl FnOnce(&mut Bucket) -> T) -> T {
        let (rate, burst) = (self.rate, self.burst);
        let mut inner = self.inner.lock().unwrap();
        if !inner.buckets.contains_key(key) && inner.buckets.len() >= self.max_keys {
            inner.buckets.retain(|_, b| {
                b.refill(rate, burst, now);
                b.tokens < burst
            });
        }
        let Inner { buckets, overflow } = &mut *inner;
        let bucket = if buckets.contains_key(key) || buckets.len() < self.max_keys {
            buckets.entry(key.clone()).or_insert_with(|| Bucket::full(burst, now))
        } else {
            overflow.get_or_insert_with(|| Bucket::full(burst, now))
        };
        bucket.refill(rate, burst, now);
        f(bucket)
    }
}

/// The part of a peer's address that identifies it for rate limits: the whole IPv4 address,
/// an IPv6 address's /64 prefix (one subscriber usually holds a whole /64), and IPv4-mapped
/// IPv6 addresses as the IPv4 address they carry.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_with_more_shares_gets_that_many_times_the_burst_and_rate() {
        let b = KeyedBuckets::new(1.0, 10.0, 16);
        let now = Instant::now();
        let taken = |key: u8, shares: u32, at: Instant| {
            (0..1000).take_while(|_| b.try_take_share(&key, at, shares)).count()
        };
        assert_eq!(taken(1, 1, now), 10);
        assert_eq!(taken(2, 4, now), 40);
        let later = now + Duration::from_secs(2);
        assert_eq!(taken(1, 1, later), 2);
        assert_eq!(taken(2, 4, later), 8);
    }

    #[test]
    fn a_bucket_empties_and_refills_at_its_rate() {
        let b = KeyedBuckets::new(10.0, 3.0, 16);
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.try_take(&1, t0)));
        assert!(!b.try_take(&1, t0));
        assert_eq!(b.wait(&1, t0), Duration::from_millis(100));
        assert!(b.try_take(&2, t0), "another key has its own bucket");
        assert!(!b.try_take(&1, t0 + Duration::from_millis(50)));
        assert!(b.try_take(&1, t0 + Duration::from_millis(160)));
        assert_eq!(b.wait(&3, t0), Duration::ZERO);
    }

    #[test]
    fn memory_is_bounded_and_a_flood_of_new_keys_shares_one_bucket() {
        let b = KeyedBuckets::new(1.0, 2.0, 4);
        let t0 = Instant::now();
        for k in 0..4 {
            b.spend(&k, t0);
        }
        assert_eq!(b.len(), 4);
        // Full of busy keys: new ones share the overflow bucket.
        assert!(b.try_take(&100, t0));
        assert!(b.try_take(&101, t0));
        assert!(!b.try_take(&102, t0), "the overflow bucket is shared");
        assert_eq!(b.len(), 4);
        // Known keys keep their own bucket.
        assert!(b.try_take(&0, t0));
        // Once the old keys have refilled they are forgotten and new keys get their own.
        let later = t0 + Duration::from_secs(5);
        assert!(b.try_take(&200, later));
        assert!(b.len() <= 4);
    }

    #[test]
    fn ipv6_peers_are_keyed_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        assert_ne!(peer_key(a), peer_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(peer_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
