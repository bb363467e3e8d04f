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
//!
//! Requests are paced the same way: an owner root may send a server
//! [`REQUESTS_PER_ROOT`] requests a second per share (a burst of [`PACE_BURST`] of them),
//! all its keys and connections together. A root past its rate is not refused (refusing
//! costs the server a signature check per request, which is what a flood is after): the
//! server stops reading its connections until the root is back within its rate, so what it
//! sends waits in its own socket buffers and TCP flow control slows it down, at no cost to
//! anyone else. Members of the pool are never paced. A root refused for a share (an
//! upload or tombstone past its limit) is left unread for [`REFUSED_PAUSE`]
//! ([`ConnState::pause_root`]), and a connection whose request failed authentication for
//! [`FAILURE_PAUSE`], doubling with each failure within [`FAILURE_MEMORY`] of the last ([`ConnState::note_failure`]):
//! what a server refuses cheaply is still not free, so a caller that keeps sending what is
//! refused is not read at the rate it sends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
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

/// Requests one owner root may send a server per second per share of its proven work, all
/// its keys and connections together (a server may set its own,
/// [`Connections::with_requests_per_root`]); past it, its connections are not read until it
/// is back within the rate.
pub const REQUESTS_PER_ROOT: u32 = 200;
/// A root may send this many seconds' worth of its rate at once.
pub const PACE_BURST: Duration = Duration::from_secs(2);
/// A root refused for one of its shares is not read for this long.
pub const REFUSED_PAUSE: Duration = Duration::from_secs(1);
/// A connection whose request failed authentication is not read for this long, doubled
/// with each further failure within [`FAILURE_MEMORY`] (up to [`MAX_PAUSE`]).
pub const FAILURE_PAUSE: Duration = Duration::from_millis(50);
/// A connection's failures are forgotten once it has had none for this long (valid
/// requests between them do not reset the count: a caller mixing them still doubles).
pub const FAILURE_MEMORY: Duration = Duration::from_secs(10);
/// The longest a root's connections are left unread at once (a root deep in debt is read
/// again after this, and paused again at its next request).
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(5);

/// No request yet.
const NEVER: u64 = u64::MAX;

/// The instant pauses are counted from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// The request rate of one owner root on a server, shared by its connections.
#[derive(Debug)]
struct Pace {
    /// Requests a second (the root's share).
    rate: f64,
    /// Tokens left (negative: requests served beyond the rate), and when they were counted.
    bucket: Mutex<(f64, Instant)>,
    /// Milliseconds after [`epoch`] until which the root's connections are not read.
    until_ms: AtomicU64,
    /// Requests of every root served beyond their rate (the server's count).
    over: Arc<AtomicU64>,
}

impl Pace {
    fn new(rate: f64, over: Arc<AtomicU64>) -> Self {
        let burst = rate * PACE_BURST.as_secs_f64();
        Pace {
            rate,
            bucket: Mutex::new((burst, Instant::now())),
            until_ms: AtomicU64::new(0),
            over,
        }
    }

    /// Counts one request; past the rate, pauses the root's connections until it is back
    /// within it.
    fn spend(&self) {
        let now = Instant::now();
        let mut b = self.bucket.lock().unwrap();
        let burst = self.rate * PACE_BURST.as_secs_f64();
        // A root owes at most MAX_PAUSE of its rate: it is read again within that.
        let floor = -self.rate * MAX_PAUSE.as_secs_f64();
        b.0 =
            ((b.0 + now.duration_since(b.1).as_secs_f64() * self.rate).min(burst) - 1.0).max(floor);
        b.1 = now;
        if b.0 < 0.0 {
            extend(&self.until_ms, Duration::from_secs_f64(-b.0 / self.rate));
            self.over.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn paused_until(&self) -> Option<Instant> {
        unread_until(&self.until_ms)
    }

    /// Whether the root is back at a full burst (nothing to remember about it).
    fn rested(&self) -> bool {
        let b = self.bucket.lock().unwrap();
        let burst = self.rate * PACE_BURST.as_secs_f64();
        b.0 + b.1.elapsed().as_secs_f64() * self.rate >= burst
    }
}

/// The instant in `ms` (after [`epoch`]), if it is still to come.
fn unread_until(ms: &AtomicU64) -> Option<Instant> {
    let until = epoch() + Duration::from_millis(ms.load(Ordering::Relaxed));
    (until > Instant::now()).then_some(until)
}

/// Moves the instant in `ms` to at least `d` from now.
fn extend(ms: &AtomicU64, d: Duration) {
    let until = (Instant::now() + d.min(MAX_PAUSE)).duration_since(epoch()).as_millis() as u64;
    ms.fetch_max(until, Ordering::Relaxed);
}

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
    /// Its root's request rate (set with the root, unless pacing is off).
    pace: OnceLock<Arc<Pace>>,
    /// Requests that failed authentication, the last of them (milliseconds after [`epoch`]),
    /// and until when the connection is not read for them.
    failures: AtomicU64,
    last_failure_ms: AtomicU64,
    unread_until_ms: AtomicU64,
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
    /// Every request of a stranger counts against its root's rate ([`REQUESTS_PER_ROOT`]).
    pub fn note_request(&self, root: &[u8; 32], member: bool, shares: u32) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.last_request_ms.store(now, Ordering::Relaxed);
        if member {
            self.member.store(true, Ordering::Relaxed);
        }
        if self.root.lock().unwrap().is_none() {
            self.first_request(root, shares);
        }
        if !self.member.load(Ordering::Relaxed)
            && let Some(pace) = self.pace.get()
        {
            pace.spend();
        }
    }

    /// Records a request on this connection that failed authentication: the connection is
    /// not read for [`FAILURE_PAUSE`], doubled for each failure within [`FAILURE_MEMORY`] of
    /// the one before.
    pub fn note_failure(&self) {
        let now = epoch().elapsed().as_millis() as u64;
        let last = self.last_failure_ms.swap(now, Ordering::Relaxed);
        if now.saturating_sub(last) >= FAILURE_MEMORY.as_millis() as u64 {
            self.failures.store(0, Ordering::Relaxed);
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed).min(16) as u32;
        extend(&self.unread_until_ms, FAILURE_PAUSE.saturating_mul(1 << n));
    }

    /// Records that this connection's owner root was refused for one of its shares: its
    /// connections (this one alone, before its first verified request) are not read for
    /// [`REFUSED_PAUSE`]. Members are never paused this way.
    pub fn pause_root(&self) {
        if self.member.load(Ordering::Relaxed) {
            return;
        }
        match self.pace.get() {
            Some(pace) => extend(&pace.until_ms, REFUSED_PAUSE),
            None => extend(&self.unread_until_ms, REFUSED_PAUSE),
        }
    }

    /// Until when this connection is left unread: its root sent more than its rate or was
    /// refused a share, or its own requests failed authentication.
    pub(crate) fn paused_until(&self) -> Option<Instant> {
        let own = unread_until(&self.unread_until_ms);
        if self.member.load(Ordering::Relaxed) {
            return own;
        }
        let root = self.pace.get().and_then(|p| p.paused_until());
        own.max(root)
    }

    /// Counts this connection against `root`'s share (its first verified request).
    fn first_request(&self, root: &[u8; 32], shares: u32) {
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
        // Roots without connections are remembered while they owe (closing every connection
        // does not clear a debt); forgotten once rested, when there are many.
        if reg.by_root.len() > 2 * reg.limit.max(crate::tls::MAX_CONNECTIONS) {
            reg.by_root
                .retain(|_, (n, _, pace)| *n > 0 || pace.as_ref().is_some_and(|p| !p.rested()));
        }
        let (per_share, over) = (reg.requests_per_root, reg.paced.clone());
        let held = reg.by_root.entry(*root).or_insert_with(|| {
            let rate = f64::from(per_share) * f64::from(shares);
            (0, shares, (per_share > 0).then(|| Arc::new(Pace::new(rate, over))))
        });
        held.0 += 1;
        if let Some(pace) = &held.2 {
            let _ = self.pace.set(pace.clone());
        }
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
            // The address this connection came from only replaced its root's connections
            // with a handshake: it pays for that in handshake turns (HandshakeTurns::charge).
            let from = address_key(self.ip);
            if reg.churn.len() < MAX_PACED_ADDRESSES || reg.churn.contains_key(&from) {
                *reg.churn.entry(from).or_default() += 1;
            }
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

/// Handshakes a second a server runs from anyone before it counts as under load: past it,
/// each peer address gets [`HANDSHAKES_PER_ADDRESS`] a second (WireGuard's rule: rate by
/// source only under load). A TLS handshake costs the server about what it costs the caller
/// (a key exchange, a signature and a check), so a caller that opens connections as fast as
/// it can would otherwise make a node spend as much CPU as it spends itself.
pub const HANDSHAKES_UNDER_LOAD: u32 = 64;
/// Handshakes a second one peer address (an IPv6 /64) gets while the server is under load,
/// with a burst of twice as many.
pub const HANDSHAKES_PER_ADDRESS: u32 = 8;
/// Longest a connection waits for its address's turn to handshake; past it, it is closed
/// before any cryptography (the caller's dial deadline is longer than this and the
/// handshake deadline together).
pub const HANDSHAKE_TURN_WAIT: Duration = Duration::from_millis(1500);
/// Handshake turns an address pays for each connection that only replaced its owner root's
/// own (closed past the root's share): a caller that churns connections gains nothing by
/// handshaking faster, and while it owes turns it gets none of the free ones either.
pub const CHURN_COST: f64 = 4.0;
/// Addresses whose handshake rate is remembered; past it, those back at a full burst are
/// forgotten.
const MAX_PACED_ADDRESSES: usize = 16_384;

/// When each new connection may handshake (one accept loop owns it).
#[derive(Debug)]
pub(crate) struct HandshakeTurns {
    per_address: u32,
    /// Handshakes free of any address's rate: tokens and when they were counted.
    free: (f64, Instant),
    by_address: HashMap<IpAddr, AddressTurns>,
    /// When rested addresses were last forgotten (at most once a second, when full).
    pruned: Instant,
    /// The turns every address not remembered shares while [`MAX_PACED_ADDRESSES`] are.
    overflow: AddressTurns,
}

/// One address's handshake turns.
#[derive(Debug)]
struct AddressTurns {
    /// Turns left (negative: turns already given to connections waiting for them).
    tokens: f64,
    /// Of what it owes, turns charged for churn, repaid at its rate.
    churn: f64,
    last: Instant,
}

impl HandshakeTurns {
    pub(crate) fn new(per_address: u32) -> Self {
        let free = (f64::from(HANDSHAKES_UNDER_LOAD), Instant::now());
        let overflow =
            AddressTurns { tokens: 2.0 * f64::from(per_address), churn: 0.0, last: Instant::now() };
        HandshakeTurns {
            per_address,
            free,
            by_address: HashMap::new(),
            pruned: Instant::now(),
            overflow,
        }
    }

    /// How long a connection from `ip` accepted at `now` waits before its handshake, or
    /// `None` if it would wait more than [`HANDSHAKE_TURN_WAIT`] (it is closed). Turns are
    /// given in order: a waiting connection has its slot in time already.
    pub(crate) fn turn(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if self.per_address == 0 {
            return Some(Duration::ZERO);
        }
        // An address that owes turns for churn gets none of the free ones (looked up, not
        // added: addresses are remembered only under load or when charged).
        let rate = f64::from(self.per_address);
        let owes = self
            .by_address
            .get(&address_key(ip))
            .is_some_and(|a| a.churn > now.saturating_duration_since(a.last).as_secs_f64() * rate);
        let load = f64::from(HANDSHAKES_UNDER_LOAD);
        let (free, last) = &mut self.free;
        *free = (*free + now.saturating_duration_since(*last).as_secs_f64() * load).min(load);
        *last = now;
        if *free >= 1.0 && !owes {
            *free -= 1.0;
            return Some(Duration::ZERO);
        }
        let tokens = &mut self.address(ip, now).tokens;
        let wait = Duration::from_secs_f64(((1.0 - *tokens) / rate).max(0.0));
        if wait > HANDSHAKE_TURN_WAIT {
            return None;
        }
        *tokens -= 1.0;
        Some(wait)
    }

    /// Charges each address [`CHURN_COST`] turns per connection it opened that only
    /// replaced its root's own ([`Connections::take_churn`]); a debt of at most 10 s of turns.
    pub(crate) fn charge(&mut self, churn: HashMap<IpAddr, u32>, now: Instant) {
        let floor = -10.0 * f64::from(self.per_address);
        for (ip, n) in churn {
            let a = self.address(ip, now);
            let cost = CHURN_COST * f64::from(n);
            a.tokens = (a.tokens - cost).max(floor);
            a.churn = (a.churn + cost).min(-floor);
        }
    }

    /// The turns of `ip`'s address, refilled to `now`: shared by every address not yet
    /// remembered while [`MAX_PACED_ADDRESSES`] are and none of them is back at a full burst.
    fn address(&mut self, ip: IpAddr, now: Instant) -> &mut AddressTurns {
        let rate = f64::from(self.per_address);
        let burst = 2.0 * rate;
        if self.by_address.len() >= MAX_PACED_ADDRESSES
            && now.saturating_duration_since(self.pruned) >= Duration::from_secs(1)
        {
            self.pruned = now;
            self.by_address.retain(|_, a| {
                a.tokens + now.saturating_duration_since(a.last).as_secs_f64() * rate < burst
            });
        }
        let key = address_key(ip);
        let a = if self.by_address.len() >= MAX_PACED_ADDRESSES
            && !self.by_address.contains_key(&key)
        {
            &mut self.overflow
        } else {
            self.by_address.entry(key).or_insert(AddressTurns {
                tokens: burst,
                churn: 0.0,
                last: now,
            })
        };
        let refill = now.saturating_duration_since(a.last).as_secs_f64() * rate;
        a.tokens = (a.tokens + refill).min(burst);
        a.churn = (a.churn - refill).max(0.0);
        a.last = now;
        a
    }
}

/// What a peer address counts as for rates: an IPv4 address, or an IPv6 /64 (one host's
/// usual allocation, so a host cannot take 2^64 shares).
pub(crate) fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::from(o)
            }
        },
        v4 => v4,
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
    /// Requests served beyond their root's rate (each paused the root's connections).
    pub paced: u64,
    /// Connections closed before their handshake: their address was past its handshake
    /// rate while the server was under load.
    pub handshakes_refused: u64,
}

/// What one owner root holds on a server: connections, its share weight, its request rate.
type RootHeld = (usize, u32, Option<Arc<Pace>>);

#[derive(Debug, Default)]
pub(crate) struct Registry {
    conns: HashMap<u64, Weak<ConnState>>,
    /// Connections held per owner root, the root's share weight, and its request rate
    /// (forgotten with its last connection).
    by_root: HashMap<[u8; 32], RootHeld>,
    /// Requests a root may send per second per share (0: not paced).
    requests_per_root: u32,
    /// Requests served beyond their root's rate.
    paced: Arc<AtomicU64>,
    /// Handshakes one address gets a second under load (0: not paced).
    handshakes_per_address: u32,
    /// Connections each address opened that only replaced its root's own (closed past the
    /// root's share), not yet charged to its handshake turns.
    churn: HashMap<IpAddr, u32>,
    handshakes_refused: u64,
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
                .map_or(0, |&(held, shares, _)| held as u64 * 1000 / u64::from(shares.max(1)))
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
        let registry = Registry {
            limit: crate::tls::MAX_CONNECTIONS,
            requests_per_root: REQUESTS_PER_ROOT,
            handshakes_per_address: HANDSHAKES_PER_ADDRESS,
            ..Default::default()
        };
        Connections { inner: Arc::new(Mutex::new(registry)), enforcing: true }
    }

    /// Paces owner roots at `rate` requests a second per share instead of
    /// [`REQUESTS_PER_ROOT`] (0: not paced); for roots that have no connection yet.
    pub fn with_requests_per_root(self, rate: u32) -> Self {
        self.inner.lock().unwrap().requests_per_root = rate;
        self
    }

    /// Gives each peer address `rate` handshakes a second under load instead of
    /// [`HANDSHAKES_PER_ADDRESS`] (0: not paced); for servers accepting after this.
    pub fn with_handshakes_per_address(self, rate: u32) -> Self {
        self.inner.lock().unwrap().handshakes_per_address = rate;
        self
    }

    pub(crate) fn handshakes_per_address(&self) -> u32 {
        self.inner.lock().unwrap().handshakes_per_address
    }

    /// The connections each address opened that only replaced its root's own since the
    /// last call (see [`HandshakeTurns::charge`]).
    pub(crate) fn take_churn(&self) -> HashMap<IpAddr, u32> {
        std::mem::take(&mut self.inner.lock().unwrap().churn)
    }

    pub(crate) fn note_handshake_refused(&self) {
        self.inner.lock().unwrap().handshakes_refused += 1;
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
            pace: OnceLock::new(),
            failures: AtomicU64::new(0),
            last_failure_ms: AtomicU64::new(0),
            unread_until_ms: AtomicU64::new(0),
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
            paced: reg.paced.load(Ordering::Relaxed),
            handshakes_refused: reg.handshakes_refused,
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
            && let Some((n, _, pace)) = reg.by_root.get_mut(&root)
        {
            *n -= 1;
            // A root that still owes is remembered (see `first_request`).
            if *n == 0 && pace.as_ref().is_none_or(|p| p.rested()) {
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
        assert_eq!(
            conns.evictions(),
            Evictions { when_full: 1, per_root: 0, no_request: 1, paced: 0, handshakes_refused: 0 }
        );
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

    #[test]
    fn a_root_past_its_rate_is_left_unread_and_nobody_else_is() {
        let conns = Connections::enforcing().with_requests_per_root(10);
        let burst = (10.0 * PACE_BURST.as_secs_f64()) as usize;
        // Two connections of one root from two keys, an honest root, a member.
        let (a, b) = (conns.open(ip(1)), conns.open(ip(2)));
        let honest = conns.open(ip(3));
        let member = conns.open(ip(4));
        for _ in 0..burst {
            a.state.note_request(&[1; 32], false, 1);
        }
        assert!(a.state.paused_until().is_none(), "its burst is served without a pause");
        b.state.note_request(&[1; 32], false, 1);
        let until = a.state.paused_until().expect("past its rate, the root is paused");
        assert_eq!(b.state.paused_until(), Some(until), "on all its connections");
        // One request over at 10/s: back within the rate in about 0.1 s.
        assert!(until <= Instant::now() + Duration::from_millis(150), "{until:?}");
        honest.state.note_request(&[2; 32], false, 1);
        assert!(honest.state.paused_until().is_none());
        for _ in 0..10 * burst {
            member.state.note_request(&[3; 32], true, 1);
        }
        assert!(member.state.paused_until().is_none(), "members are never paced");
        assert_eq!(conns.evictions().paced, 1);
        // Deep in debt, the pause is at most MAX_PAUSE at a time.
        for _ in 0..1000 {
            a.state.note_request(&[1; 32], false, 1);
        }
        let until = a.state.paused_until().unwrap();
        assert!(until <= Instant::now() + MAX_PAUSE, "{until:?}");
        // A root that proved more work has a share as many times larger.
        let heavy = conns.open(ip(5));
        for _ in 0..4 * burst {
            heavy.state.note_request(&[4; 32], false, 4);
        }
        assert!(heavy.state.paused_until().is_none());
        heavy.state.note_request(&[4; 32], false, 4);
        assert!(heavy.state.paused_until().is_some());
    }

    #[test]
    fn pacing_off_never_pauses() {
        let conns = Connections::enforcing().with_requests_per_root(0);
        let a = conns.open(ip(1));
        for _ in 0..10_000 {
            a.state.note_request(&[1; 32], false, 1);
        }
        assert!(a.state.paused_until().is_none());
        assert_eq!(conns.evictions().paced, 0);
    }

    #[test]
    fn failures_and_refusals_leave_a_connection_unread_for_a_while() {
        let conns = Connections::enforcing();
        let (a, b) = (conns.open(ip(1)), conns.open(ip(2)));
        let stranger = conns.open(ip(3));
        a.state.note_failure();
        let first = a.state.paused_until().expect("a failed request pauses its connection");
        assert!(first <= Instant::now() + FAILURE_PAUSE);
        for _ in 0..3 {
            a.state.note_failure();
        }
        let fourth = a.state.paused_until().unwrap();
        assert!(fourth > Instant::now() + FAILURE_PAUSE * 4, "doubling: {fourth:?}");
        for _ in 0..40 {
            a.state.note_failure();
        }
        assert!(a.state.paused_until().unwrap() <= Instant::now() + MAX_PAUSE);
        assert!(b.state.paused_until().is_none(), "another connection is read");
        // Refused for a share: every connection of the root waits, nobody else's.
        b.state.note_request(&[1; 32], false, 1);
        let c = conns.open(ip(4));
        c.state.note_request(&[1; 32], false, 1);
        b.state.pause_root();
        assert!(c.state.paused_until().is_some());
        stranger.state.note_request(&[2; 32], false, 1);
        assert!(stranger.state.paused_until().is_none());
        let member = conns.open(ip(5));
        member.state.note_request(&[3; 32], true, 1);
        member.state.pause_root();
        assert!(member.state.paused_until().is_none(), "members are never paused for a share");
    }

    #[test]
    fn under_load_each_address_handshakes_at_its_rate_in_turn() {
        let mut turns = HandshakeTurns::new(10);
        let now = Instant::now();
        // Not under load: every handshake at once, from one address too.
        for _ in 0..HANDSHAKES_UNDER_LOAD {
            assert_eq!(turns.turn(ip(1), now), Some(Duration::ZERO));
        }
        // Under load: a burst of 20 per address, then one every 100 ms, in turn...
        for _ in 0..20 {
            assert_eq!(turns.turn(ip(1), now), Some(Duration::ZERO));
        }
        assert_eq!(turns.turn(ip(1), now), Some(Duration::from_millis(100)));
        let mut last = Duration::ZERO;
        while let Some(wait) = turns.turn(ip(1), now) {
            assert!(wait > last && wait <= HANDSHAKE_TURN_WAIT, "{wait:?}");
            last = wait;
        }
        // ...and past the longest wait, closed; another address still gets its burst.
        assert!(last > HANDSHAKE_TURN_WAIT - Duration::from_millis(100), "{last:?}");
        assert_eq!(turns.turn(ip(2), now), Some(Duration::ZERO));
        // Time gives turns back.
        let later = now + Duration::from_secs(5);
        assert_eq!(turns.turn(ip(1), later), Some(Duration::ZERO));
        // One IPv6 host (a /64) is one address.
        for _ in 1..HANDSHAKES_UNDER_LOAD {
            turns.turn(ip(3), later);
        }
        let v6 = |last: u16| IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]);
        for i in 0..20 {
            assert_eq!(turns.turn(v6(i), later), Some(Duration::ZERO));
        }
        assert!(turns.turn(v6(999), later).unwrap() > Duration::ZERO);
        assert_eq!(address_key(IpAddr::from([0, 0, 0, 0, 0, 0xffff, 0x7f00, 1])), ip(1));
    }

    #[test]
    fn an_address_that_churns_its_roots_connections_pays_in_handshake_turns() {
        let conns = Connections::enforcing();
        // One root at its share from address 1; a newcomer from address 2 replaces one.
        let held: Vec<Held> = (0..MAX_CONNECTIONS_PER_ROOT).map(|_| conns.open(ip(1))).collect();
        for h in &held {
            h.state.note_request(&[7; 32], false, 1);
        }
        let newcomer = conns.open(ip(2));
        newcomer.state.note_request(&[7; 32], false, 1);
        let churn = conns.take_churn();
        assert_eq!(churn, HashMap::from([(ip(2), 1)]));
        assert!(conns.take_churn().is_empty(), "charged once");
        // Charged: address 2 owes turns, gets no free one, and waits; address 3 does not.
        let mut turns = HandshakeTurns::new(8);
        let now = Instant::now();
        turns.charge(HashMap::from([(ip(2), 10)]), now);
        assert!(turns.turn(ip(2), now).is_none(), "10 s of turns owed: closed at once");
        assert_eq!(turns.turn(ip(3), now), Some(Duration::ZERO));
        turns.charge(HashMap::from([(ip(4), 5)]), now);
        let wait = turns.turn(ip(4), now).unwrap();
        assert!(wait > Duration::ZERO, "owing, it takes no free turn: {wait:?}");
        // Turns only queued for (no churn) do not keep an address from the free ones later.
        let mut turns = HandshakeTurns::new(8);
        for _ in 0..HANDSHAKES_UNDER_LOAD + 20 {
            turns.turn(ip(5), now);
        }
        let later = now + Duration::from_secs(1);
        assert_eq!(turns.turn(ip(5), later), Some(Duration::ZERO));
    }

    #[test]
    fn closing_every_connection_does_not_clear_a_roots_debt() {
        let conns = Connections::enforcing().with_requests_per_root(10);
        let a = conns.open(ip(1));
        for _ in 0..100 {
            a.state.note_request(&[1; 32], false, 1);
        }
        assert!(a.state.paused_until().is_some());
        drop(a);
        let b = conns.open(ip(1));
        b.state.note_request(&[1; 32], false, 1);
        let until = b.state.paused_until().expect("a new connection owes what the root owed");
        // The debt is at most MAX_PAUSE of the rate, however much was sent.
        assert!(until <= Instant::now() + MAX_PAUSE, "{until:?}");
        // A root back at its full burst is forgotten with its last connection.
        let c = conns.open(ip(2));
        c.state.note_request(&[2; 32], false, 1);
        std::thread::sleep(Duration::from_millis(200));
        drop(c);
        assert!(!conns.inner.lock().unwrap().by_root.contains_key(&[2; 32]));
    }

    #[test]
    fn handshake_turns_remember_a_bounded_number_of_addresses() {
        let mut turns = HandshakeTurns::new(8);
        let now = Instant::now();
        // Not under load: nobody is remembered.
        for i in 0..HANDSHAKES_UNDER_LOAD {
            assert_eq!(turns.turn(ip(i as u8), now), Some(Duration::ZERO));
        }
        assert!(turns.by_address.is_empty());
        // Under load, every new address is remembered up to the bound; past it, those not
        // remembered share one address's turns until some are back at a full burst.
        for i in 0..MAX_PACED_ADDRESSES as u32 {
            let v4 = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            assert_eq!(turns.turn(v4, now), Some(Duration::ZERO));
        }
        assert_eq!(turns.by_address.len(), MAX_PACED_ADDRESSES);
        for i in 0..16 {
            assert_eq!(turns.turn(ip(100 + i), now), Some(Duration::ZERO));
        }
        assert_eq!(turns.turn(ip(200), now), Some(Duration::from_millis(125)), "one burst");
        assert_eq!(turns.by_address.len(), MAX_PACED_ADDRESSES);
        let later = now + Duration::from_secs(2);
        for _ in 0..HANDSHAKES_UNDER_LOAD {
            assert_eq!(turns.turn(ip(201), later), Some(Duration::ZERO));
        }
        assert!(turns.turn(ip(200), later).is_some(), "rested addresses are forgotten");
        assert!(turns.by_address.len() < MAX_PACED_ADDRESSES);
    }
}
