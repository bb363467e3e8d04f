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
//! - an owner root holds at most [`MAX_CONNECTIONS_PER_ROOT`] connections per share of its
//!   proven work (`shardfarm_core::auth::share_weight`) however many keys it delegates: past
//!   that, its own least recently used connection is closed;
//! - when the server is full (in total or for one address), the new caller is not refused
//!   while a stranger's connection sits idle: one that never carried a request is closed at
//!   once; otherwise the newcomer is admitted beyond the limit (at most twice it) and, at its
//!   first verified request, the stranger's connection idle longest is closed. A TCP connect
//!   or a TLS handshake (which cost no work) never closes a connection that proved an
//!   identity. Members' connections are never closed this way.
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
/// Connections one owner root may hold on a server per share of its proven work, all its
/// delegated keys together (an honest client or gateway holds one per node).
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
    /// Milliseconds after `opened` of the last bytes read or written: a long stream (a 1 GiB
    /// GetShard) is busy, not idle, however long ago its request came.
    last_io_ms: AtomicU64,
    /// The owner root of the first verified request.
    root: Mutex<Option<[u8; 32]>>,
    member: AtomicBool,
    evicted: AtomicBool,
    /// Admitted beyond a limit (`Some(None)`: the total, `Some(Some(ip))`: its address's):
    /// its first verified request closes an idle stranger's connection to make room.
    over: Mutex<Option<Option<IpAddr>>>,
    waker: Mutex<Option<Waker>>,
    registry: Arc<Mutex<Registry>>,
}

impl ConnState {
    /// Records a verified request on this connection from a caller of owner `root`;
    /// `member`: the caller belongs to the pool (its connections are never evicted); `shares`:
    /// the root's share weight. The first request of a connection counts it against its
    /// root's share, closing the root's least recently used connection if it holds more than
    /// [`MAX_CONNECTIONS_PER_ROOT`] × `shares`.
    pub fn note_request(&self, root: &[u8; 32], member: bool, shares: u32) {
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
        let shares = shares.max(1);
        let held = reg.by_root.entry(*root).or_insert((0, shares));
        held.0 += 1;
        let held = held.0;
        // Admitted beyond a limit: now that it proved an identity, room is made for it (if
        // no connection is idle now, `Connections::reap` brings the total back later).
        if let Some(only) = self.over.lock().unwrap().take() {
            let serial = self.serial;
            let eligible = |c: &ConnState| c.serial != serial && only.is_none_or(|ip| c.ip == ip);
            if let Some(v) = reg.pick(eligible, EVICTABLE_AFTER) {
                v.evict();
                reg.evicted_when_full += 1;
            }
        }
        // Never more than a quarter of the server's connections, whatever the work.
        let cap = MAX_CONNECTIONS_PER_ROOT.max(reg.limit / 4);
        let share = MAX_CONNECTIONS_PER_ROOT.saturating_mul(shares as usize).min(cap);
        if held <= share || self.member.load(Ordering::Relaxed) {
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

    /// Records bytes read or written on this connection.
    pub(crate) fn note_io(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last_io_ms.store(now, Ordering::Relaxed);
    }

    /// When it last did something: its last request or bytes moved after one, or its
    /// opening (bytes moved before any verified request prove nothing).
    fn last_active(&self) -> Instant {
        let ms = match self.last_request_ms.load(Ordering::Relaxed) {
            NEVER => 0,
            ms => ms.max(self.last_io_ms.load(Ordering::Relaxed)),
        };
        self.opened + Duration::from_millis(ms)
    }

    fn carried_a_request(&self) -> bool {
        self.last_request_ms.load(Ordering::Relaxed) != NEVER
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
    /// Connections held per owner root, and the root's share weight.
    by_root: HashMap<[u8; 32], (usize, u32)>,
    /// Connections the server admits (0: no limit known); beyond it, [`Connections::reap`]
    /// closes idle strangers' connections.
    limit: usize,
    next: u64,
    evicted_when_full: u64,
    evicted_per_root: u64,
    evicted_no_request: u64,
}

impl Registry {
    /// The connection to close among those `eligible`: never a member's or one already
    /// closing, idle at least `idle`; those that never carried a request first, then those
    /// of the root holding the most for its share (an honest client's one connection goes
    /// after every connection of a root that holds hundreds), then the one idle longest.
    fn pick(
        &self,
        eligible: impl Fn(&ConnState) -> bool,
        idle: Duration,
    ) -> Option<Arc<ConnState>> {
        let now = Instant::now();
        let load = |c: &ConnState| -> u64 {
            let root = *c.root.lock().unwrap();
            root.and_then(|r| self.by_root.get(&r))
                .map_or(0, |&(held, shares)| held as u64 * 1000 / u64::from(shares.max(1)))
        };
        self.conns
            .values()
            .filter_map(Weak::upgrade)
            .filter(|c| !c.member.load(Ordering::Relaxed) && !c.is_evicted() && eligible(c))
            .filter(|c| now.saturating_duration_since(c.last_active()) >= idle)
            .min_by_key(|c| {
                (c.carried_a_request(), std::cmp::Reverse(load(c)), c.last_active(), c.serial)
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
        let registry = Registry { limit: crate::tls::MAX_CONNECTIONS, ..Default::default() };
        Connections { inner: Arc::new(Mutex::new(registry)), enforcing: true }
    }

    /// Registers a connection accepted from `ip`; it is forgotten when the returned
    /// [`Held`] is dropped.
    #[cfg(test)]
    pub(crate) fn open(&self, ip: IpAddr) -> Held {
        self.open_admitted(ip, None)
    }

    /// [`Self::open`] for a connection admitted beyond a limit if `over` is set (`Some(None)`:
    /// the total, `Some(Some(ip))`: its address's share).
    pub(crate) fn open_admitted(&self, ip: IpAddr, over: Option<Option<IpAddr>>) -> Held {
        let held = self.open_at(ip, Instant::now());
        if self.enforcing {
            *held.state.over.lock().unwrap() = over;
        }
        held
    }

    fn open_at(&self, ip: IpAddr, opened: Instant) -> Held {
        let mut reg = self.inner.lock().unwrap();
        reg.next += 1;
        let state = Arc::new(ConnState {
            serial: reg.next,
            ip,
            opened,
            last_request_ms: AtomicU64::new(NEVER),
            last_io_ms: AtomicU64::new(0),
            root: Mutex::new(None),
            member: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            over: Mutex::new(None),
            waker: Mutex::new(None),
            registry: self.inner.clone(),
        });
        reg.conns.insert(state.serial, Arc::downgrade(&state));
        Held { state }
    }

    /// Closes the connection that carried no request and was opened longest ago (from `ip`
    /// only, if given) to make room for a new caller; false if there is none at least
    /// [`EVICTABLE_AFTER`] old. Connections that proved an identity are closed only for a
    /// newcomer that did too (its first request, [`ConnState::note_request`]).
    pub(crate) fn evict_silent_for(&self, ip: Option<IpAddr>) -> bool {
        if !self.enforcing {
            return false;
        }
        let mut reg = self.inner.lock().unwrap();
        let silent = |c: &ConnState| c.last_request_ms.load(Ordering::Relaxed) == NEVER;
        let victim = reg.pick(|c| silent(c) && ip.is_none_or(|ip| c.ip == ip), EVICTABLE_AFTER);
        match victim {
            Some(v) => {
                v.evict();
                reg.evicted_when_full += 1;
                true
            }
            None => false,
        }
    }

    /// Closes every connection that carried no request within [`FIRST_REQUEST_DEADLINE`]
    /// (within [`EVICTABLE_AFTER`] if it was admitted beyond a limit), then, while more are
    /// open than the limit (newcomers admitted beyond it found nobody idle), idle strangers'
    /// connections.
    pub(crate) fn reap(&self) {
        if !self.enforcing {
            return;
        }
        let mut reg = self.inner.lock().unwrap();
        let live: Vec<Arc<ConnState>> =
            reg.conns.values().filter_map(Weak::upgrade).filter(|c| !c.is_evicted()).collect();
        let stale: Vec<&Arc<ConnState>> = live
            .iter()
            .filter(|c| {
                let deadline = if c.over.lock().unwrap().is_some() {
                    EVICTABLE_AFTER
                } else {
                    FIRST_REQUEST_DEADLINE
                };
                !c.carried_a_request() && c.opened.elapsed() >= deadline
            })
            .collect();
        for c in &stale {
            c.evict();
        }
        reg.evicted_no_request += stale.len() as u64;
        let excess = (live.len() - stale.len()).saturating_sub(reg.limit);
        if reg.limit == 0 {
            return;
        }
        for _ in 0..excess {
            let Some(v) = reg.pick(|_| true, EVICTABLE_AFTER) else { break };
            v.evict();
            reg.evicted_when_full += 1;
        }
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
            && let Some((n, _)) = reg.by_root.get_mut(&root)
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
            h.state.note_request(&[7; 32], false, 1);
        }
        let evicted: Vec<usize> = (0..held.len()).filter(|&i| held[i].state.is_evicted()).collect();
        assert_eq!(evicted, vec![0], "the oldest of the root's connections goes");
        assert_eq!(conns.evictions().per_root, 1);
        // Another root, and a member, are untouched by this root's excess.
        let other = conns.open(ip(9));
        other.state.note_request(&[8; 32], false, 1);
        assert!(!other.state.is_evicted());
    }

    #[test]
    fn a_root_that_proved_more_work_holds_more_connections_and_ten_roots_ten_shares() {
        let conns = Connections::enforcing();
        // A root with four shares holds four times the base share…
        let strong: Vec<Held> =
            (0..4 * MAX_CONNECTIONS_PER_ROOT + 1).map(|_| conns.open(ip(1))).collect();
        for h in &strong {
            h.state.note_request(&[4; 32], false, 4);
        }
        assert_eq!(strong.iter().filter(|h| h.state.is_evicted()).count(), 1);
        // …and ten roots of one share each hold ten base shares between them, no more.
        let mut weak = Vec::new();
        for r in 0..10u8 {
            for _ in 0..MAX_CONNECTIONS_PER_ROOT + 3 {
                let h = conns.open(ip(10 + r));
                h.state.note_request(&[20 + r; 32], false, 1);
                weak.push(h);
            }
        }
        let kept = weak.iter().filter(|h| !h.state.is_evicted()).count();
        assert_eq!(kept, 10 * MAX_CONNECTIONS_PER_ROOT);
        assert_eq!(conns.evictions().per_root, 1 + 10 * 3);
    }

    #[test]
    fn a_connection_moving_bytes_is_busy_however_old_its_request() {
        let conns = Connections::enforcing();
        let past = Instant::now().checked_sub(EVICTABLE_AFTER * 10).unwrap();
        let streaming = conns.open_at(ip(1), past);
        streaming.state.note_request(&[1; 32], false, 1);
        streaming.state.last_request_ms.store(0, Ordering::Relaxed);
        let idle = conns.open_at(ip(2), past);
        idle.state.note_request(&[2; 32], false, 1);
        idle.state.last_request_ms.store(0, Ordering::Relaxed);
        // The stream's request came long ago, but its bytes are moving now.
        streaming.state.note_io();
        let newcomer = conns.open_admitted(ip(3), Some(None));
        newcomer.state.note_request(&[3; 32], false, 1);
        assert!(idle.state.is_evicted() && !streaming.state.is_evicted());
        let another = conns.open_admitted(ip(4), Some(None));
        another.state.note_request(&[4; 32], false, 1);
        assert!(!streaming.state.is_evicted(), "a busy stream is never closed to admit a caller");
        assert_eq!(conns.evictions().when_full, 1);
    }

    #[test]
    fn beyond_the_limit_the_busiest_roots_idle_connections_go_and_silent_newcomers_soon() {
        let conns = Connections::enforcing();
        conns.inner.lock().unwrap().limit = 3;
        let past = Instant::now().checked_sub(EVICTABLE_AFTER * 10).unwrap();
        let idle_since_long = |h: &Held, root: u8| {
            h.state.note_request(&[root; 32], false, 1);
            h.state.last_request_ms.store(0, Ordering::Relaxed);
        };
        // An honest client's one connection, idle longest, and a root's three.
        let honest = conns.open_at(ip(1), past);
        idle_since_long(&honest, 1);
        let root: Vec<Held> = (0..3).map(|_| conns.open_at(ip(2), past)).collect();
        for h in &root {
            idle_since_long(h, 2);
        }
        // A newcomer admitted beyond the limit that never sent a request.
        let silent = conns.open_at(ip(3), past);
        *silent.state.over.lock().unwrap() = Some(None);
        conns.reap();
        assert!(silent.state.is_evicted(), "a silent newcomer beyond the limit goes soon");
        // Four proven connections for a limit of three: one of the busiest root's goes.
        assert_eq!(root.iter().filter(|h| h.state.is_evicted()).count(), 1);
        assert!(!honest.state.is_evicted(), "one connection goes after a root's hundreds");
        assert_eq!(conns.evictions(), Evictions { when_full: 1, per_root: 0, no_request: 1 });
    }

    #[test]
    fn a_member_past_the_share_keeps_every_connection() {
        let conns = Connections::enforcing();
        let held: Vec<Held> =
            (0..MAX_CONNECTIONS_PER_ROOT + 5).map(|_| conns.open(ip(1))).collect();
        for h in &held {
            h.state.note_request(&[3; 32], true, 1);
        }
        assert!(held.iter().all(|h| !h.state.is_evicted()));
    }

    #[test]
    fn when_full_a_connect_closes_only_the_silent_and_a_proven_newcomer_an_idle_stranger() {
        let conns = Connections::enforcing();
        let past = Instant::now().checked_sub(EVICTABLE_AFTER * 10).unwrap();
        // A member and a client whose last requests were long ago, a connection that never
        // carried one, and one opened just now.
        let member = conns.open_at(ip(1), past);
        member.state.note_request(&[1; 32], true, 1);
        member.state.last_request_ms.store(0, Ordering::Relaxed);
        let client = conns.open_at(ip(2), past);
        client.state.note_request(&[2; 32], false, 1);
        client.state.last_request_ms.store(0, Ordering::Relaxed);
        let silent = conns.open_at(ip(3), past);
        let fresh = conns.open(ip(4));
        // A bare connect closes only a connection that never carried a request.
        assert!(conns.evict_silent_for(None));
        assert!(silent.state.is_evicted(), "the one that never carried a request goes first");
        assert!(!conns.evict_silent_for(None), "nobody who proved an identity, for a connect");
        assert!(!client.state.is_evicted());
        // A newcomer admitted beyond the limit makes room at its first verified request, but
        // never from a member: beyond its address's share (ip 1, the member's), nobody goes.
        let by_member = conns.open_admitted(ip(1), Some(Some(ip(1))));
        by_member.state.note_request(&[5; 32], false, 1);
        assert!(!member.state.is_evicted() && !client.state.is_evicted());
        let newcomer = conns.open_admitted(ip(5), Some(None));
        newcomer.state.note_request(&[6; 32], false, 1);
        assert!(client.state.is_evicted());
        // What is left is a member and connections not yet idle: nobody else goes.
        let late = conns.open_admitted(ip(6), Some(None));
        late.state.note_request(&[7; 32], false, 1);
        assert!(!member.state.is_evicted() && !fresh.state.is_evicted());
        assert!(!newcomer.state.is_evicted() && !late.state.is_evicted());
        assert_eq!(conns.evictions().when_full, 2);
    }

    #[test]
    fn a_connection_without_a_request_is_closed_after_the_deadline() {
        let conns = Connections::enforcing();
        let past = Instant::now().checked_sub(FIRST_REQUEST_DEADLINE * 2).unwrap();
        let silent = conns.open_at(ip(1), past);
        let used = conns.open_at(ip(1), past);
        used.state.note_request(&[5; 32], false, 1);
        let fresh = conns.open(ip(1));
        conns.reap();
        assert!(silent.state.is_evicted());
        assert!(!used.state.is_evicted() && !fresh.state.is_evicted());
        assert_eq!(conns.evictions().no_request, 1);
        drop(silent);
        assert_eq!(conns.open_count(), 2);
    }
}
