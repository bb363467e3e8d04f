//! Who holds a server's connections, and whom to let go when they run out.
//!
//! Connections are a finite thing strangers can spend, so they are divided the way every
//! shared resource of a node is: by owner root (the identity at the top of a delegation
//! chain), never by key or address alone. Each accepted connection has a [`ConnState`] the
//! server's handlers see through [`crate::tls::PeerInfo`]; a handler that verified a request
//! reports its owner root and whether the caller is a member of the pool
//! ([`ConnState::note_request`]). From that:
//! - a connection that has carried no verified request [`FIRST_REQUEST_DEADLINE`] after it was
//!   accepted is closed (opening connections and leaving them idle holds nothing for long);
//! - an owner root holds at most [`MAX_CONNECTIONS_PER_ROOT`] connections however many keys it
//!   delegates: past that, its own least recently used connection is closed;
//! - when the server is full (in total or for one address), the new caller is not refused
//!   while a stranger's connection sits idle: the one idle longest is closed instead, those
//!   that never carried a request first. Members' connections are never closed this way.
//!
//! Closing is cooperative: the connection's next read fails, which ends its HTTP/2 session.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

/// An accepted connection that carried no verified request this long after it was accepted
/// is closed.
pub const FIRST_REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Connections one owner root may hold on a server, all its delegated keys together (an
/// honest client or gateway holds one per node).
pub const MAX_CONNECTIONS_PER_ROOT: usize = 256;
/// A connection idle at least this long may be closed to admit a new caller when the server
/// is full.
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(2);

/// No request yet.
const NEVER: u64 = u64::MAX;

/// One accepted connection, as its server's handlers and admission see it.
#[derive(Debug)]
pub struct ConnState {
    serial: u64,
    ip: IpAddr,
    opened: Instant,
    /// Milliseconds after `opened` of the last verified request ([`NEVER`]: none yet).
    last_request_ms: AtomicU64,
    /// The owner root of the first verified request.
    root: Mutex<Option<[u8; 32]>>,
    member: AtomicBool,
    evicted: AtomicBool,
    waker: Mutex<Option<Waker>>,
    registry: Arc<Mutex<Registry>>,
}

impl ConnState {
    /// Records a verified request on this connection from a caller of owner `root`;
    /// `member`: the caller belongs to the pool (its connections are never evicted). The
    /// first request of a connection counts it against its root's share, closing the root's
    /// least recently used connection if it holds more than [`MAX_CONNECTIONS_PER_ROOT`].
    pub fn note_request(&self, root: &[u8; 32], member: bool) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last_request_ms.store(now, Ordering::Relaxed);
        if member {
            self.member.store(true, Ordering::Relaxed);
        }
        if self.root.lock().unwrap().is_some() {
            return;
        }
        // Counted under the registry's lock, and only while the connection is registered:
        // one closing at the same moment must not leave its root's count behind.
        let mut reg = self.registry.lock().unwrap();
        let mut mine = self.root.lock().unwrap();
        if mine.is_some() || !reg.conns.contains_key(&self.serial) {
            return;
        }
        *mine = Some(*root);
        drop(mine);
        let held = reg.by_root.entry(*root).or_default();
        *held += 1;
        if *held <= MAX_CONNECTIONS_PER_ROOT || self.member.load(Ordering::Relaxed) {
            return;
        }
        let victim = reg.pick(|c| c.serial != self.serial && c.root_is(root), Duration::ZERO);
        if let Some(v) = victim {
            v.evict();
            reg.evicted_per_root += 1;
        }
    }

    /// Whether this connection was closed by admission.
    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Relaxed)
    }

    fn root_is(&self, root: &[u8; 32]) -> bool {
        self.root.lock().unwrap().as_ref() == Some(root)
    }

    /// When it last did something: its last request, or its opening.
    fn last_active(&self) -> Instant {
        match self.last_request_ms.load(Ordering::Relaxed) {
            NEVER => self.opened,
            ms => self.opened + Duration::from_millis(ms),
        }
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Relaxed);
        if let Some(w) = self.waker.lock().unwrap().take() {
            w.wake();
        }
    }

    /// Remembers the task reading this connection, so eviction can wake it.
    pub(crate) fn register(&self, waker: &Waker) {
        let mut w = self.waker.lock().unwrap();
        if !w.as_ref().is_some_and(|old| old.will_wake(waker)) {
            *w = Some(waker.clone());
        }
    }
}

/// Counts of what admission did, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evictions {
    /// Closed to admit a caller when the server (or an address) was full.
    pub when_full: u64,
    /// Closed because their owner root held more than its share.
    pub per_root: u64,
    /// Closed because they carried no request within [`FIRST_REQUEST_DEADLINE`].
    pub no_request: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    conns: HashMap<u64, Weak<ConnState>>,
    by_root: HashMap<[u8; 32], usize>,
    next: u64,
    evicted_when_full: u64,
    evicted_per_root: u64,
    evicted_no_request: u64,
}

impl Registry {
    /// The connection to close among those `eligible`: never a member's or one already
    /// closing, idle at least `idle`; those that never carried a request first, then the one
    /// idle longest.
    fn pick(
        &self,
        eligible: impl Fn(&ConnState) -> bool,
        idle: Duration,
    ) -> Option<Arc<ConnState>> {
        let now = Instant::now();
        self.conns
            .values()
            .filter_map(Weak::upgrade)
            .filter(|c| !c.member.load(Ordering::Relaxed) && !c.is_evicted() && eligible(c))
            .filter(|c| now.saturating_duration_since(c.last_active()) >= idle)
            .min_by_key(|c| {
                (c.last_request_ms.load(Ordering::Relaxed) != NEVER, c.last_active(), c.serial)
            })
    }
}

/// The connections of one server.
#[derive(Clone, Debug, Default)]
pub struct Connections {
    inner: Arc<Mutex<Registry>>,
    /// Whether admission closes connections (a server whose handlers report requests);
    /// otherwise connections are only counted.
    enforcing: bool,
}

impl Connections {
    /// Connections whose handlers report every verified request
    /// ([`ConnState::note_request`]): admission closes them as the module says.
    pub fn enforcing() -> Self {
        Connections { enforcing: true, ..Default::default() }
    }

    /// Registers a connection accepted from `ip`; it is forgotten when the returned
    /// [`Held`] is dropped.
    pub(crate) fn open(&self, ip: IpAddr) -> Held {
        self.open_at(ip, Instant::now())
    }

    fn open_at(&self, ip: IpAddr, opened: Instant) -> Held {
        let mut reg = self.inner.lock().unwrap();
        reg.next += 1;
        let state = Arc::new(ConnState {
            serial: reg.next,
            ip,
            opened,
            last_request_ms: AtomicU64::new(NEVER),
            root: Mutex::new(None),
            member: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            waker: Mutex::new(None),
            registry: self.inner.clone(),
        });
        reg.conns.insert(state.serial, Arc::downgrade(&state));
        Held { state }
    }

    /// Closes the stranger's connection idle longest (from `ip` only, if given) to make room
    /// for a new caller; false if none is idle long enough.
    pub(crate) fn evict_for(&self, ip: Option<IpAddr>) -> bool {
        if !self.enforcing {
            return false;
        }
        let mut reg = self.inner.lock().unwrap();
        let victim = reg.pick(|c| ip.is_none_or(|ip| c.ip == ip), EVICTABLE_AFTER);
        match victim {
            Some(v) => {
                v.evict();
                reg.evicted_when_full += 1;
                true
            }
            None => false,
        }
    }

    /// Closes every connection that carried no request within [`FIRST_REQUEST_DEADLINE`].
    pub(crate) fn reap(&self) {
        if !self.enforcing {
            return;
        }
        let mut reg = self.inner.lock().unwrap();
        let stale: Vec<Arc<ConnState>> = reg
            .conns
            .values()
            .filter_map(Weak::upgrade)
            .filter(|c| {
                !c.is_evicted()
                    && c.last_request_ms.load(Ordering::Relaxed) == NEVER
                    && c.opened.elapsed() >= FIRST_REQUEST_DEADLINE
            })
            .collect();
        for c in &stale {
            c.evict();
        }
        reg.evicted_no_request += stale.len() as u64;
    }

    /// What admission closed so far.
    pub fn evictions(&self) -> Evictions {
        let reg = self.inner.lock().unwrap();
        Evictions {
            when_full: reg.evicted_when_full,
            per_root: reg.evicted_per_root,
            no_request: reg.evicted_no_request,
        }
    }

    /// Connections open now.
    pub fn open_count(&self) -> usize {
        self.inner.lock().unwrap().conns.len()
    }
}

/// A registered connection; dropping it forgets the connection and its root's share.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) state: Arc<ConnState>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut reg = self.state.registry.lock().unwrap();
        reg.conns.remove(&self.state.serial);
        if let Some(root) = *self.state.root.lock().unwrap()
            && let Some(n) = reg.by_root.get_mut(&root)
        {
            *n -= 1;
            if *n == 0 {
                reg.by_root.remove(&root);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_root_past_its_share_loses_its_least_recently_used_connection() {
        let conns = Connections::enforcing();
        let held: Vec<Held> =
            (0..=MAX_CONNECTIONS_PER_ROOT).map(|i| conns.open(ip(1 + (i % 200) as u8))).collect();
        // Each key of the root opens its own connection from its own address.
        for h in &held {
            h.state.note_request(&[7; 32], false);
        }
        let evicted: Vec<usize> = (0..held.len()).filter(|&i| held[i].state.is_evicted()).collect();
        assert_eq!(evicted, vec![0], "the oldest of the root's connections goes");
        assert_eq!(conns.evictions().per_root, 1);
        // Another root, and a member, are untouched by this root's excess.
        let other = conns.open(ip(9));
        other.state.note_request(&[8; 32], false);
        assert!(!other.state.is_evicted());
    }

    #[test]
    fn a_member_past_the_share_keeps_every_connection() {
        let conns = Connections::enforcing();
        let held: Vec<Held> =
            (0..MAX_CONNECTIONS_PER_ROOT + 5).map(|_| conns.open(ip(1))).collect();
        for h in &held {
            h.state.note_request(&[3; 32], true);
        }
        assert!(held.iter().all(|h| !h.state.is_evicted()));
    }

    #[test]
    fn when_full_the_idle_stranger_without_a_request_goes_first_and_members_never() {
        let conns = Connections::enforcing();
        let past = Instant::now().checked_sub(EVICTABLE_AFTER * 10).unwrap();
        // A member and a client whose last requests were long ago, a connection that never
        // carried one, and one opened just now.
        let member = conns.open_at(ip(1), past);
        member.state.note_request(&[1; 32], true);
        member.state.last_request_ms.store(0, Ordering::Relaxed);
        let client = conns.open_at(ip(2), past);
        client.state.note_request(&[2; 32], false);
        client.state.last_request_ms.store(0, Ordering::Relaxed);
        let silent = conns.open_at(ip(3), past);
        let fresh = conns.open(ip(4));
        assert!(conns.evict_for(None));
        assert!(silent.state.is_evicted(), "the one that never carried a request goes first");
        assert!(!conns.evict_for(Some(ip(1))), "a member is never closed to admit another");
        assert!(conns.evict_for(None));
        assert!(client.state.is_evicted());
        // What is left is a member and a connection not yet idle: the newcomer is refused.
        assert!(!conns.evict_for(None));
        assert!(!member.state.is_evicted() && !fresh.state.is_evicted());
        assert_eq!(conns.evictions().when_full, 2);
    }

    #[test]
    fn a_connection_without_a_request_is_closed_after_the_deadline() {
        let conns = Connections::enforcing();
        let past = Instant::now().checked_sub(FIRST_REQUEST_DEADLINE * 2).unwrap();
        let silent = conns.open_at(ip(1), past);
        let used = conns.open_at(ip(1), past);
        used.state.note_request(&[5; 32], false);
        let fresh = conns.open(ip(1));
        conns.reap();
        assert!(silent.state.is_evicted());
        assert!(!used.state.is_evicted() && !fresh.state.is_evicted());
        assert_eq!(conns.evictions().no_request, 1);
        drop(silent);
        assert_eq!(conns.open_count(), 2);
    }
}
