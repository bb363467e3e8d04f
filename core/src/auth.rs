//! Signed request envelopes and the replay cache, independent of any transport.
//!
//! Every call carries the caller's [`Credential`], a random nonce, a timestamp and an ed25519
//! signature over `method ‖ nonce ‖ timestamp ‖ blake2b-256(message)`. A server checks the
//! cheapest things first, spends nothing on strangers, and stops at the first failure:
//!
//! 0. the peer address has not failed too often lately — [`AuthError::PeerThrottled`] (a map
//!    lookup; see [`Verifier::admit_peer`]);
//! 1. the timestamp inside the window — [`AuthError::StaleTimestamp`];
//! 2. the identity mined to the pool's difficulty (one hash), or a valid unexpired delegation;
//! 3. the signature (by the credential's signing key) — [`AuthError::BadSignature`];
//! 4. only then, for a request that did not arrive on a connection proving its signer's key,
//!    the replay cache: the nonce not seen inside the window — [`AuthError::Replay`], with a
//!    share per owner root so one root's keys cannot fill it for others.
//!
//! **Replay defense under TLS is the connection itself.** A request that arrives on a TLS
//! connection must be signed by the very key that connection proved in its handshake
//! (`WrongChannel` otherwise, checked by the transport before [`Verifier::verify_bound`]); TLS
//! 1.3 refuses a record replayed within a connection, and a request copied onto another
//! connection needs that connection to prove the signer's key. Only the key's holder can
//! therefore "replay" a bound request, which gains it nothing it could not get by signing a
//! new one. So bound requests cost no state at all: no nonce is remembered, no share is
//! spent, and nothing caps how fast one honest identity works (the nonce cache had become a
//! rate limit of ~41 requests/s per identity and node). The cache remains for plaintext
//! (`--insecure-plaintext`) hops, where a request can be captured and sent again by anyone.
//!
//! Every failure but a full cache costs the peer address a token ([`Verifier::record_failure`]);
//! an address out of tokens is refused before anything else is looked at, until it refills —
//! except for identities that have authenticated from that address before, which are charged
//! for their own failures only (a stranger behind the same NAT cannot lock them out).
//! Policy (allow/deny, rate limits, quotas) is the server's business and comes after.
//!
//! The replay cache only has to remember nonces for as long as their timestamps are inside the
//! window, because anything older is refused as stale. That bounds it by (request rate × 2 ×
//! window); it also has a hard cap so a flood cannot grow it without limit, and above the cap it
//! refuses new requests ([`AuthError::ReplayCacheFull`]) rather than forget nonces that a
//! replay could then reuse.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, Signer, SigningKey};

use crate::identity::{Credential, NodeId, blake2b256, pow_difficulty};
use crate::limit::{KeyedBuckets, peer_key};

/// Failed authentications a peer address may cause in a burst before it is refused outright.
pub const FAILED_AUTH_BURST: f64 = 100.0;
/// Failed authentications per second a peer address is allowed after its burst.
pub const FAILED_AUTH_RATE: f64 = 20.0;
/// Peer addresses whose failures are remembered (≈ 3 MB); beyond it they share one bucket.
const MAX_THROTTLED_PEERS: usize = 65_536;

const ENVELOPE_DOMAIN: &[u8] = b"shardfarm-request-v2";

/// Why a request was refused. Each reason has its own variant so servers can map them to
/// precise statuses and clients can say what to do.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// A required part of the envelope is absent or malformed.
    #[error("malformed request envelope: {0}")]
    Malformed(String),
    /// The signature does not verify with the credential's key.
    #[error("request signature does not verify for the presented key")]
    BadSignature,
    /// The timestamp is outside the accepted window.
    #[error(
        "request timestamp is {skew_ms} ms away from this server's clock, outside the \
         {window_ms} ms window: check the clocks (NTP) of both machines"
    )]
    StaleTimestamp {
        /// Distance between request time and server time.
        skew_ms: u64,
        /// The configured window.
        window_ms: u64,
    },
    /// The nonce was already used within the window.
    #[error("request nonce was already used (replayed request)")]
    Replay,
    /// Too many requests are in the replay window to remember another.
    #[error("replay cache is full ({0} nonces in the window); retry later")]
    ReplayCacheFull(usize),
    /// This identity alone has as many requests in the window as one identity may.
    #[error(
        "this owner root has {0} unbound (plaintext) requests in the replay window, its share: \
         slow down and retry, or use TLS, whose requests need no replay cache"
    )]
    IdentityReplayShare(usize),
    /// The identity has not done enough proof of work.
    #[error("identity is mined to {have} bits but this pool requires {need}: mine a new identity")]
    InsufficientDifficulty {
        /// Difficulty proven.
        have: u32,
        /// Difficulty required.
        need: u8,
    },
    /// The delegation certificate's signature is wrong.
    #[error("delegation certificate is not signed by its issuer")]
    DelegationSignature,
    /// The delegation certificate has expired.
    #[error(
        "delegation certificate expired at {expired} (now {now}): ask the issuer for a new one"
    )]
    DelegationExpired {
        /// Expiry (unix seconds).
        expired: u64,
        /// Server time (unix seconds).
        now: u64,
    },
    /// The request was signed for another server (captured on its way there and replayed).
    #[error(
        "request is addressed to node {to}, not to this server ({this}): refusing it (a request \
         captured on its way to another node cannot be replayed here)"
    )]
    WrongAudience {
        /// The audience the request names (hex).
        to: String,
        /// This server's id (hex).
        this: String,
    },
    /// The request is signed by a key other than the one its connection proved in the TLS
    /// handshake: somebody else's request, replayed on the sender's own connection.
    #[error(
        "request is signed by {signer} but arrived on a connection that proved key {channel}: \
         a request is only accepted on its signer's own connection"
    )]
    WrongChannel {
        /// The id of the envelope's signing key (hex).
        signer: String,
        /// The id of the connection's key (hex).
        channel: String,
    },
    /// Requests from this address failed authentication too often; it is refused unheard.
    #[error(
        "too many failed authentications from your address: refused for {wait_ms} ms; fix the \
         client's identity, clock or signatures"
    )]
    PeerThrottled {
        /// How long until the address is heard again.
        wait_ms: u64,
    },
}

impl AuthError {
    /// Every label [`AuthError::metric_label`] can return (metrics start them at zero).
    pub const METRIC_LABELS: [&'static str; 12] = [
        "malformed",
        "bad_signature",
        "stale_timestamp",
        "replay",
        "replay_cache_full",
        "identity_replay_share",
        "insufficient_difficulty",
        "delegation_signature",
        "delegation_expired",
        "peer_throttled",
        "wrong_audience",
        "wrong_channel",
    ];

    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            AuthError::Malformed(_) => "malformed",
            AuthError::BadSignature => "bad_signature",
            AuthError::StaleTimestamp { .. } => "stale_timestamp",
            AuthError::Replay => "replay",
            AuthError::ReplayCacheFull(_) => "replay_cache_full",
            AuthError::IdentityReplayShare(_) => "identity_replay_share",
            AuthError::InsufficientDifficulty { .. } => "insufficient_difficulty",
            AuthError::DelegationSignature => "delegation_signature",
            AuthError::DelegationExpired { .. } => "delegation_expired",
            AuthError::PeerThrottled { .. } => "peer_throttled",
            AuthError::WrongAudience { .. } => "wrong_audience",
            AuthError::WrongChannel { .. } => "wrong_channel",
        }
    }

    /// True for failures that say something about the peer (a bad or replayed request), as
    /// opposed to the server being busy.
    pub fn is_peer_fault(&self) -> bool {
        !matches!(
            self,
            AuthError::ReplayCacheFull(_)
                | AuthError::IdentityReplayShare(_)
                | AuthError::PeerThrottled { .. }
        )
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What the caller signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The server the request is for (its node id; the pool id for the coordinator). A server
    /// that checks audiences refuses any other, so a request captured on its way to one node
    /// cannot be replayed at another.
    pub audience: NodeId,
    /// The full method name, e.g. `/shardfarm.v1.Agent/PutShard`.
    pub method: String,
    /// 16 random bytes, never reused.
    pub nonce: [u8; 16],
    /// Milliseconds since the Unix epoch at the caller.
    pub timestamp_ms: u64,
    /// `blake2b-256` of the encoded request message.
    pub body_hash: [u8; 32],
}

impl Envelope {
    /// A fresh envelope for `method` over `body` (the encoded message), timestamped now,
    /// addressed to no one (see [`Envelope::to`]).
    pub fn new(method: &str, body: &[u8]) -> Self {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("the operating system's random generator failed");
        Envelope {
            audience: NodeId([0; 32]),
            method: method.to_string(),
            nonce,
            timestamp_ms: now_ms(),
            body_hash: blake2b256(&[body]),
        }
    }

    /// The same envelope addressed to `audience`.
    pub fn to(mut self, audience: NodeId) -> Self {
        self.audience = audience;
        self
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(ENVELOPE_DOMAIN.len() + self.method.len() + 96);
        b.extend_from_slice(ENVELOPE_DOMAIN);
        b.extend_from_slice(&self.audience.0);
        b.extend_from_slice(&(self.method.len() as u32).to_le_bytes());
        b.extend_from_slice(self.method.as_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        b.extend_from_slice(&self.body_hash);
        b
    }

    /// Signs the envelope with `key`, which must be the credential's signing key.
    pub fn sign(self, credential: Credential, key: &SigningKey) -> SignedRequest {
        let signature = key.sign(&self.signed_bytes());
        SignedRequest { credential, envelope: self, signature }
    }
}

/// An envelope with its credential and signature, as it travels.
#[derive(Clone, Debug)]
pub struct SignedRequest {
    /// Who is asking.
    pub credential: Credential,
    /// What they sign.
    pub envelope: Envelope,
    /// Signature by `credential.signing_key()` over `envelope.signed_bytes()`.
    pub signature: Signature,
}

/// Who a verified request came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's credential.
    pub credential: Credential,
    /// `blake2b-256` of its signing key.
    pub id: NodeId,
    /// Its owner root (itself, or its delegation issuer).
    pub root: NodeId,
}

/// The most base shares one owner root can earn by its proof of work (see [`share_weight`]).
pub const MAX_SHARE_WEIGHT: u32 = 8;

/// How many base shares of a node's finite resources (connections, uploads, tombstones,
/// challenges, joins) an owner root whose proof of work has `difficulty` bits gets in a pool
/// that requires `min`: one at the minimum, doubling with each bit above it (each bit doubles
/// the expected mining work), up to [`MAX_SHARE_WEIGHT`]. The same work buys the same share
/// whether it is spent on one root or on many, and ten roots at the minimum get ten shares.
pub fn share_weight(difficulty: u32, min: u8) -> u32 {
    let extra = difficulty.saturating_sub(u32::from(min));
    1u32.checked_shl(extra).unwrap_or(u32::MAX).min(MAX_SHARE_WEIGHT)
}

impl Caller {
    /// This caller's owner root's [`share_weight`] in a pool that requires `min` bits.
    pub fn share_weight(&self, min: u8) -> u32 {
        share_weight(self.credential.difficulty(), min)
    }
}

/// Verifies signed requests for one server: peer throttle, difficulty, clock window and replay
/// cache.
pub struct Verifier {
    min_difficulty: u8,
    window: Duration,
    /// This server's id: requests addressed to anyone else are refused.
    audience: Option<NodeId>,
    replay: ReplayCache,
    /// An identity exempt from the difficulty (the pool key a node pins by id: an existing
    /// pool's key may be mined below a newer default).
    pinned: Option<NodeId>,
    /// Failures per peer address, for callers not known there.
    failures: KeyedBuckets<IpAddr>,
    /// Failures per (address, identity) for identities that have authenticated from that
    /// address: a stranger flooding from a shared address (a NAT, the same host) cannot lock
    /// out the honest callers behind it.
    known_failures: KeyedBuckets<(IpAddr, NodeId)>,
    /// (address, identity) pairs that authenticated lately, and when.
    known: Mutex<HashMap<(IpAddr, NodeId), Instant>>,
}

/// How long an identity stays known at an address after its last good request.
const KNOWN_FOR: Duration = Duration::from_secs(3600);

impl Verifier {
    /// A verifier for a pool that requires `min_difficulty` bits and accepts timestamps within
    /// `window` of the server's clock, remembering at most `max_nonces` nonces. A peer address
    /// may fail [`FAILED_AUTH_BURST`] times, then [`FAILED_AUTH_RATE`] times a second.
    pub fn new(min_difficulty: u8, window: Duration, max_nonces: usize) -> Self {
        Verifier {
            min_difficulty,
            window,
            audience: None,
            pinned: None,
            replay: ReplayCache::new(window, max_nonces),
            failures: KeyedBuckets::new(FAILED_AUTH_RATE, FAILED_AUTH_BURST, MAX_THROTTLED_PEERS),
            known_failures: KeyedBuckets::new(
                FAILED_AUTH_RATE,
                FAILED_AUTH_BURST,
                MAX_THROTTLED_PEERS,
            ),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The same verifier accepting only requests addressed to `me` (every server sets this).
    pub fn with_audience(mut self, me: NodeId) -> Self {
        self.audience = Some(me);
        self
    }

    /// The same verifier accepting `id` whatever its difficulty: an identity known by id (the
    /// pool key an agent pins) needs no proof of work to be told from a sybil.
    pub fn with_pinned(mut self, id: NodeId) -> Self {
        self.pinned = Some(id);
        self
    }

    /// The same verifier allowing each peer address `burst` failures, then `rate` a second.
    pub fn with_peer_throttle(mut self, rate: f64, burst: f64) -> Self {
        self.failures = KeyedBuckets::new(rate, burst, MAX_THROTTLED_PEERS);
        self.known_failures = KeyedBuckets::new(rate, burst, MAX_THROTTLED_PEERS);
        self
    }

    fn is_known(&self, key: (IpAddr, NodeId), now: Instant) -> bool {
        let known = self.known.lock().unwrap();
        known.get(&key).is_some_and(|t| now.saturating_duration_since(*t) < KNOWN_FOR)
    }

    /// Refuses a peer that has used up its failures (step 0: before the request is verified).
    /// `claimed` is the identity the request's credential names, unverified: an identity that
    /// has authenticated from this address before is throttled on its own failures only.
    /// `None` for the address (an in-process transport) passes.
    pub fn admit_peer(
        &self,
        peer: Option<IpAddr>,
        claimed: Option<NodeId>,
    ) -> Result<(), AuthError> {
        let Some(ip) = peer else { return Ok(()) };
        let (key, now) = (peer_key(ip), Instant::now());
        let wait = match claimed {
            Some(id) if self.is_known((key, id), now) => self.known_failures.wait(&(key, id), now),
            _ => self.failures.wait(&key, now),
        };
        if wait.is_zero() {
            Ok(())
        } else {
            Err(AuthError::PeerThrottled { wait_ms: wait.as_millis().max(1) as u64 })
        }
    }

    /// Charges a failed authentication to the peer (its address, or its known identity there);
    /// only failures that are the peer's fault count: a full cache does not.
    pub fn record_failure(&self, peer: Option<IpAddr>, claimed: Option<NodeId>, error: &AuthError) {
        let Some(ip) = peer else { return };
        if !error.is_peer_fault() {
            return;
        }
        let (key, now) = (peer_key(ip), Instant::now());
        match claimed {
            Some(id) if self.is_known((key, id), now) => self.known_failures.spend(&(key, id), now),
            _ => self.failures.spend(&key, now),
        }
    }

    /// Remembers that `caller` authenticated from `peer`. Bounded: when full, pairs not seen
    /// for [`KNOWN_FOR`] are forgotten, and if none are, the new pair is not remembered.
    pub fn record_success(&self, peer: Option<IpAddr>, caller: NodeId) {
        let Some(ip) = peer else { return };
        let (key, now) = ((peer_key(ip), caller), Instant::now());
        let mut known = self.known.lock().unwrap();
        if known.len() >= MAX_THROTTLED_PEERS && !known.contains_key(&key) {
            known.retain(|_, t| now.saturating_duration_since(*t) < KNOWN_FOR);
            if known.len() >= MAX_THROTTLED_PEERS {
                return;
            }
        }
        known.insert(key, now);
    }

    /// The pool's minimum identity difficulty.
    pub fn min_difficulty(&self) -> u8 {
        self.min_difficulty
    }

    /// Checks `req` for `method` and a message whose encoding is `body`, at server time
    /// `now_ms`. See the module documentation for the order of checks.
    pub fn verify(
        &self,
        req: &SignedRequest,
        method: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<Caller, AuthError> {
        // The hash is the server's own, never the one the request claims.
        let mut req = req.clone();
        req.envelope.body_hash = blake2b256(&[body]);
        self.verify_hashed(&req, method, now_ms)
    }

    /// [`Verifier::verify`] for a request whose `envelope.body_hash` the server computed itself
    /// from the message's bytes as they arrived.
    pub fn verify_hashed(
        &self,
        req: &SignedRequest,
        method: &str,
        now_ms: u64,
    ) -> Result<Caller, AuthError> {
        let caller = self.verify_bound(req, method, now_ms)?;
        let env = &req.envelope;
        self.replay.check_and_insert(
            caller.root,
            caller.id,
            env.nonce,
            env.timestamp_ms,
            now_ms,
        )?;
        Ok(caller)
    }

    /// Every check but the replay cache: method, timestamp, audience, credential, signature.
    fn check(&self, req: &SignedRequest, method: &str, now_ms: u64) -> Result<(), AuthError> {
        let env = &req.envelope;
        if env.method != method {
            return Err(AuthError::Malformed(format!(
                "envelope is for method {} but the call is {method}",
                env.method
            )));
        }
        // Cheapest first, and nothing is remembered for a stranger: the timestamp (a
        // comparison), the identity's proof of work (one hash; a delegation also checks its
        // certificate), the request signature, and only then the replay cache, so unmined or
        // unsigned floods cannot fill it.
        let window_ms = self.window.as_millis() as u64;
        let skew_ms = env.timestamp_ms.abs_diff(now_ms);
        if skew_ms > window_ms {
            return Err(AuthError::StaleTimestamp { skew_ms, window_ms });
        }
        if let Some(me) = self.audience
            && env.audience != me
        {
            return Err(AuthError::WrongAudience { to: env.audience.to_hex(), this: me.to_hex() });
        }
        match &req.credential {
            Credential::Mined { key, nonce } => {
                let have = pow_difficulty(key, *nonce);
                if have < u32::from(self.min_difficulty) && self.pinned != Some(NodeId::of(key)) {
                    return Err(AuthError::InsufficientDifficulty {
                        have,
                        need: self.min_difficulty,
                    });
                }
            }
            Credential::Delegated(d) => d.verify(self.min_difficulty, now_ms / 1000)?,
        }
        req.credential
            .signing_key()
            .verify_strict(&env.signed_bytes(), &req.signature)
            .map_err(|_| AuthError::BadSignature)
    }

    /// [`Verifier::verify_hashed`] for a request that arrived on a connection whose TLS
    /// handshake proved the request's signing key (the caller checked that): everything but
    /// the replay cache, which such a request does not need (see the module documentation).
    pub fn verify_bound(
        &self,
        req: &SignedRequest,
        method: &str,
        now_ms: u64,
    ) -> Result<Caller, AuthError> {
        self.check(req, method, now_ms)?;
        Ok(Caller {
            root: req.credential.root(),
            credential: req.credential.clone(),
            id: req.credential.id(),
        })
    }
}

/// Remembers `(caller, nonce)` pairs for as long as their timestamps are inside the window.
pub struct ReplayCache {
    window_ms: u64,
    max: usize,
    /// Most nonces one owner root (all the keys it delegated together) may hold: one root
    /// cannot fill the cache for everyone, however many keys it delegates.
    per_identity: usize,
    inner: Mutex<ReplayInner>,
}

/// (caller id, nonce).
type NonceKey = ([u8; 32], [u8; 16]);

#[derive(Default)]
struct ReplayInner {
    seen: HashSet<NonceKey>,
    /// Nonces remembered per owner root.
    per: HashMap<[u8; 32], usize>,
    // (expiry in server ms, root, key) in insertion order. Expiries are not strictly monotonic
    // (timestamps vary within the window), so pruning stops at the first live entry; an entry
    // may thus live up to one window longer than needed, which only costs memory.
    order: VecDeque<(u64, [u8; 32], NonceKey)>,
}

impl ReplayCache {
    /// A cache for `window` that holds at most `max` nonces, and at most an eighth of them
    /// (but at least `min(max, 1024)`) for any one owner root.
    pub fn new(window: Duration, max: usize) -> Self {
        ReplayCache {
            window_ms: window.as_millis() as u64,
            max,
            per_identity: (max / 8).max(max.min(1024)),
            inner: Mutex::new(ReplayInner::default()),
        }
    }

    /// Number of nonces remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().seen.len()
    }

    /// True when no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records the nonce, or fails if it was seen or the cache is full.
    pub fn check_and_insert(
        &self,
        root: NodeId,
        caller: NodeId,
        nonce: [u8; 16],
        timestamp_ms: u64,
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let mut inner = self.inner.lock().unwrap();
        while let Some((expiry, owner, key)) = inner.order.front().copied() {
            if expiry > now_ms {
                break;
            }
            inner.order.pop_front();
            inner.seen.remove(&key);
            if let Some(n) = inner.per.get_mut(&owner) {
                *n -= 1;
                if *n == 0 {
                    inner.per.remove(&owner);
                }
            }
        }
        let key = (caller.0, nonce);
        if inner.seen.contains(&key) {
            return Err(AuthError::Replay);
        }
        if inner.seen.len() >= self.max {
            return Err(AuthError::ReplayCacheFull(self.max));
        }
        let mine = inner.per.get(&root.0).copied().unwrap_or(0);
        if mine >= self.per_identity {
            return Err(AuthError::IdentityReplayShare(mine));
        }
        inner.seen.insert(key);
        *inner.per.entry(root.0).or_default() += 1;
        // A nonce must be remembered until its timestamp leaves the window.
        inner.order.push_back((timestamp_ms.max(now_ms) + self.window_ms, root.0, key));
        Ok(())
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn metric_labels_list_every_variant() {
        let all = [
            AuthError::Malformed(String::new()),
            AuthError::BadSignature,
            AuthError::StaleTimestamp { skew_ms: 0, window_ms: 0 },
            AuthError::Replay,
            AuthError::ReplayCacheFull(0),
            AuthError::IdentityReplayShare(0),
            AuthError::InsufficientDifficulty { have: 0, need: 0 },
            AuthError::DelegationSignature,
            AuthError::DelegationExpired { expired: 0, now: 0 },
            AuthError::PeerThrottled { wait_ms: 0 },
            AuthError::WrongAudience { to: String::new(), this: String::new() },
            AuthError::WrongChannel { signer: String::new(), channel: String::new() },
        ];
        let labels: Vec<&str> = all.iter().map(AuthError::metric_label).collect();
        assert_eq!(labels, AuthError::METRIC_LABELS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Delegation, Identity, random_signing_key};

    const METHOD: &str = "/shardfarm.v1.Agent/Info";
    const WINDOW: Duration = Duration::from_secs(300);

    fn mined(d: u8) -> Identity {
        Identity::generate(d, 1, &|_| {}).unwrap().0
    }

    fn signed(id: &Identity, body: &[u8]) -> SignedRequest {
        Envelope::new(METHOD, body).sign(id.credential(), id.signing_key())
    }

    #[test]
    fn a_roots_share_doubles_with_each_bit_of_work_up_to_its_cap() {
        assert_eq!(share_weight(8, 8), 1);
        assert_eq!(share_weight(9, 8), 2);
        assert_eq!(share_weight(10, 8), 4);
        assert_eq!(share_weight(11, 8), MAX_SHARE_WEIGHT);
        assert_eq!(share_weight(64, 8), MAX_SHARE_WEIGHT);
        assert_eq!(share_weight(300, 0), MAX_SHARE_WEIGHT);
        // Below the minimum (a pinned pool key): one share, never zero.
        assert_eq!(share_weight(3, 8), 1);
        // A delegated key carries its issuer's work.
        let root = loop {
            let r = mined(8);
            if r.difficulty() == 9 {
                break r;
            }
        };
        let key = random_signing_key();
        let cert = Delegation::issue(&root, key.verifying_key(), u64::MAX / 2000);
        let credential = Credential::Delegated(Box::new(cert));
        let caller = Caller { id: credential.id(), root: root.id(), credential };
        assert_eq!(caller.share_weight(8), 2);
    }

    #[test]
    fn valid_request_is_accepted_once() {
        let id = mined(8);
        let v = Verifier::new(8, WINDOW, 1000);
        let req = signed(&id, b"hello");
        let caller = v.verify(&req, METHOD, b"hello", now_ms()).unwrap();
        assert_eq!(caller.id, id.id());
        assert_eq!(v.verify(&req, METHOD, b"hello", now_ms()), Err(AuthError::Replay));
    }

    #[test]
    fn signature_by_another_key_is_rejected() {
        let id = mined(8);
        let other = random_signing_key();
        let req = Envelope::new(METHOD, b"x").sign(id.credential(), &other);
        let v = Verifier::new(8, WINDOW, 1000);
        assert_eq!(v.verify(&req, METHOD, b"x", now_ms()), Err(AuthError::BadSignature));
    }

    #[test]
    fn a_request_for_one_server_is_refused_by_another() {
        let id = mined(8);
        let (a, b) = (NodeId([1; 32]), NodeId([2; 32]));
        let for_a = Envelope::new(METHOD, b"x").to(a).sign(id.credential(), id.signing_key());
        let at_b = Verifier::new(8, WINDOW, 1000).with_audience(b);
        let err = at_b.verify(&for_a, METHOD, b"x", now_ms()).unwrap_err();
        assert!(matches!(err, AuthError::WrongAudience { .. }), "{err}");
        assert!(err.is_peer_fault());
        // Rewriting the audience breaks the signature.
        let mut redirected = for_a.clone();
        redirected.envelope.audience = b;
        assert_eq!(at_b.verify(&redirected, METHOD, b"x", now_ms()), Err(AuthError::BadSignature));
        // At A it is accepted (once).
        let at_a = Verifier::new(8, WINDOW, 1000).with_audience(a);
        assert!(at_a.verify(&for_a, METHOD, b"x", now_ms()).is_ok());
        // Unaddressed requests are refused by a server that checks audiences.
        let unaddressed = signed(&id, b"x");
        let err = at_a.verify(&unaddressed, METHOD, b"x", now_ms()).unwrap_err();
        assert!(matches!(err, AuthError::WrongAudience { .. }), "{err}");
    }

    #[test]
    fn tampered_body_is_rejected() {
        let id = mined(8);
        let v = Verifier::new(8, WINDOW, 1000);
        let req = signed(&id, b"put 1");
        assert_eq!(v.verify(&req, METHOD, b"put 2", now_ms()), Err(AuthError::BadSignature));
    }

    #[test]
    fn wrong_method_is_rejected() {
        let id = mined(8);
        let v = Verifier::new(8, WINDOW, 1000);
        let req = signed(&id, b"");
        let err = v.verify(&req, "/shardfarm.v1.Agent/DeleteShard", b"", now_ms()).unwrap_err();
        assert!(matches!(err, AuthError::Malformed(_)));
    }

    #[test]
    fn stale_and_future_timestamps_are_rejected() {
        let id = mined(8);
        let v = Verifier::new(8, WINDOW, 1000);
        let mut env = Envelope::new(METHOD, b"");
        env.timestamp_ms -= 301_000;
        let req = env.sign(id.credential(), id.signing_key());
        let err = v.verify(&req, METHOD, b"", now_ms()).unwrap_err();
        assert!(matches!(err, AuthError::StaleTimestamp { window_ms: 300_000, .. }), "{err}");
        assert!(err.to_string().contains("NTP"));
        let mut env = Envelope::new(METHOD, b"");
        env.timestamp_ms += 400_000;
        let req = env.sign(id.credential(), id.signing_key());
        assert!(matches!(
            v.verify(&req, METHOD, b"", now_ms()),
            Err(AuthError::StaleTimestamp { .. })
        ));
    }

    #[test]
    fn identity_below_difficulty_is_rejected() {
        // Find a key whose nonce 0 proves fewer than 20 bits (almost every key).
        let id = Identity::from_parts(random_signing_key(), 0);
        assert!(id.difficulty() < 20);
        let v = Verifier::new(20, WINDOW, 1000);
        let err = v.verify(&signed(&id, b""), METHOD, b"", now_ms()).unwrap_err();
        assert!(matches!(err, AuthError::InsufficientDifficulty { need: 20, .. }));
        // The pinned identity (the pool key an agent knows by id) passes; only it.
        let pinned = Verifier::new(20, WINDOW, 1000).with_pinned(id.id());
        pinned.verify(&signed(&id, b""), METHOD, b"", now_ms()).unwrap();
        let other = Identity::from_parts(random_signing_key(), 0);
        assert!(matches!(
            pinned.verify(&signed(&other, b""), METHOD, b"", now_ms()),
            Err(AuthError::InsufficientDifficulty { .. })
        ));
    }

    #[test]
    fn delegation_accepted_then_expired_or_forged_rejected() {
        let issuer = mined(8);
        let client = random_signing_key();
        let now = now_ms();
        let v = Verifier::new(8, WINDOW, 1000);

        let d = Delegation::issue(&issuer, client.verifying_key(), now / 1000 + 60);
        let req = Envelope::new(METHOD, b"").sign(Credential::Delegated(Box::new(d)), &client);
        let caller = v.verify(&req, METHOD, b"", now).unwrap();
        assert_eq!(caller.root, issuer.id());

        let d = Delegation::issue(&issuer, client.verifying_key(), now / 1000 - 1);
        let req = Envelope::new(METHOD, b"").sign(Credential::Delegated(Box::new(d)), &client);
        assert!(matches!(
            v.verify(&req, METHOD, b"", now),
            Err(AuthError::DelegationExpired { .. })
        ));

        let mut d = Delegation::issue(&issuer, client.verifying_key(), now / 1000 + 60);
        d.expires += 3600; // extend it without the issuer's consent
        let req = Envelope::new(METHOD, b"").sign(Credential::Delegated(Box::new(d)), &client);
        assert_eq!(v.verify(&req, METHOD, b"", now), Err(AuthError::DelegationSignature));

        let unmined = Identity::from_parts(random_signing_key(), 0);
        let d = Delegation::issue(&unmined, client.verifying_key(), now / 1000 + 60);
        let req = Envelope::new(METHOD, b"").sign(Credential::Delegated(Box::new(d)), &client);
        let strict = Verifier::new(20, WINDOW, 1000);
        assert!(matches!(
            strict.verify(&req, METHOD, b"", now),
            Err(AuthError::InsufficientDifficulty { .. })
        ));
    }

    #[test]
    fn strangers_spend_nothing_of_the_replay_cache() {
        let v = Verifier::new(8, WINDOW, 1000);
        // Unmined, stale, or badly signed: refused before a nonce is remembered.
        let unmined = std::iter::repeat_with(|| Identity::from_parts(random_signing_key(), 0))
            .find(|i| i.difficulty() < 8)
            .unwrap();
        for _ in 0..50 {
            let err = v.verify(&signed(&unmined, b""), METHOD, b"", now_ms()).unwrap_err();
            assert!(matches!(err, AuthError::InsufficientDifficulty { .. }));
        }
        let id = mined(8);
        let forged = Envelope::new(METHOD, b"").sign(id.credential(), &random_signing_key());
        assert_eq!(v.verify(&forged, METHOD, b"", now_ms()), Err(AuthError::BadSignature));
        let mut old = Envelope::new(METHOD, b"");
        old.timestamp_ms -= 400_000;
        let old = old.sign(id.credential(), id.signing_key());
        assert!(matches!(
            v.verify(&old, METHOD, b"", now_ms()),
            Err(AuthError::StaleTimestamp { .. })
        ));
        assert!(v.replay.is_empty(), "a refused request was remembered");
    }

    #[test]
    fn one_root_cannot_fill_the_replay_cache_for_others_however_many_keys_it_delegates() {
        let cache = ReplayCache::new(Duration::from_secs(60), 16_384);
        let (flood, honest) = (NodeId([1; 32]), NodeId([2; 32]));
        let mut n = 0u32;
        let refused = loop {
            let mut nonce = [0; 16];
            nonce[..4].copy_from_slice(&n.to_le_bytes());
            // A new delegated key for every request: the share is the root's.
            let key = NodeId(blake2b256(&[&n.to_le_bytes()]));
            if let Err(e) = cache.check_and_insert(flood, key, nonce, 1000, 1000) {
                break e;
            }
            n += 1;
        };
        assert_eq!(refused, AuthError::IdentityReplayShare(2048));
        assert_eq!(n, 2048);
        cache.check_and_insert(honest, honest, [7; 16], 1000, 1000).unwrap();
        // Its share comes back as its nonces leave the window.
        cache.check_and_insert(flood, flood, [9; 16], 1000, 70_000).unwrap();
    }

    /// A request bound to a connection that proved its key needs no nonce: one identity
    /// verifies as many as it sends (no share, no cap), and nothing is remembered.
    #[test]
    fn bound_requests_spend_no_replay_state_and_have_no_cap() {
        let v = Verifier::new(8, WINDOW, 64);
        let id = mined(8);
        for _ in 0..1_000 {
            v.verify_bound(&signed(&id, b""), METHOD, now_ms()).unwrap();
        }
        assert!(v.replay.is_empty());
        // The checks before the cache still hold.
        let forged = Envelope::new(METHOD, b"").sign(id.credential(), &random_signing_key());
        assert_eq!(v.verify_bound(&forged, METHOD, now_ms()), Err(AuthError::BadSignature));
        // The same requests unbound fill the small cache.
        let full = (0..100).find_map(|_| v.verify(&signed(&id, b""), METHOD, b"", now_ms()).err());
        assert!(
            matches!(full, Some(AuthError::IdentityReplayShare(_) | AuthError::ReplayCacheFull(_))),
            "{full:?}"
        );
    }

    #[test]
    fn replay_cache_forgets_after_window_and_is_bounded() {
        let cache = ReplayCache::new(Duration::from_millis(100), 2);
        let who = NodeId([1; 32]);
        cache.check_and_insert(who, who, [1; 16], 1000, 1000).unwrap();
        assert_eq!(cache.check_and_insert(who, who, [1; 16], 1000, 1050), Err(AuthError::Replay));
        cache.check_and_insert(who, who, [2; 16], 1000, 1050).unwrap();
        assert_eq!(
            cache.check_and_insert(who, who, [3; 16], 1000, 1060),
            Err(AuthError::ReplayCacheFull(2))
        );
        // After the window both expire; the old nonce is then refused as stale by the
        // verifier, so the cache may forget it.
        cache.check_and_insert(who, who, [3; 16], 1200, 1200).unwrap();
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_peer_that_keeps_failing_is_refused_unheard_and_others_are_not() {
        let v = Verifier::new(8, WINDOW, 1000).with_peer_throttle(1.0, 5.0);
        let bad: IpAddr = "192.0.2.1".parse().unwrap();
        let good: IpAddr = "192.0.2.2".parse().unwrap();
        let id = mined(8);
        // An honest caller behind the same address authenticated before the flood.
        let honest = mined(8);
        let ok = v.verify(&signed(&honest, b""), METHOD, b"", now_ms()).unwrap();
        v.record_success(Some(bad), ok.id);
        for _ in 0..5 {
            v.admit_peer(Some(bad), Some(id.id())).unwrap();
            let forged = Envelope::new(METHOD, b"").sign(id.credential(), &random_signing_key());
            let err = v.verify(&forged, METHOD, b"", now_ms()).unwrap_err();
            v.record_failure(Some(bad), Some(id.id()), &err);
        }
        let err = v.admit_peer(Some(bad), Some(id.id())).unwrap_err();
        assert!(
            matches!(err, AuthError::PeerThrottled { wait_ms } if wait_ms > 0 && wait_ms <= 1000)
        );
        assert_eq!(err.metric_label(), "peer_throttled");
        v.admit_peer(Some(bad), None).unwrap_err();
        // The known caller at that address, and everyone elsewhere, are still heard.
        v.admit_peer(Some(bad), Some(honest.id())).unwrap();
        v.admit_peer(Some(good), Some(id.id())).unwrap();
        v.admit_peer(None, None).unwrap();
        // A stranger claiming the known identity pays from that identity's own bucket there.
        for _ in 0..5 {
            v.record_failure(Some(bad), Some(honest.id()), &AuthError::BadSignature);
        }
        v.admit_peer(Some(bad), Some(honest.id())).unwrap_err();
        // Busy-server refusals are not the peer's fault and cost it nothing.
        for _ in 0..10 {
            v.record_failure(Some(good), None, &AuthError::ReplayCacheFull(1));
        }
        v.admit_peer(Some(good), None).unwrap();
    }
}
