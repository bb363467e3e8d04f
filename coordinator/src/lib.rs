//! The coordinator of a pool: admission, heartbeats, layouts and their sync, audits,
//! reputation and the signed rewards ledger, and its gRPC service. The same code runs in
//! `shardfarm local up` and in the operator's pod.
//!
//! - [`economics`]: uptime, audit reputation, standing and per-epoch rewards (pure arithmetic);
//! - [`ledger`]: the signed, hash-chained rewards ledger;
//! - [`store`]: where the durable state lives (the [`store::StateStore`] trait; today a state
//!   dir, [`store::DirStore`]);
//! - [`metrics`]: the `shardfarm_coordinator_*` metrics.
//!
//! One [`Coordinator`] owns a pool. Its durable state is one JSON document in its
//! [`store::StateStore`] (`coordinator.json` in the state dir, written atomically) plus the
//! rewards ledger (`ledger.jsonl`). Heartbeats stay in memory and reach the store at most every
//! [`SAVE_EVERY`].
//!
//! # Layouts and sync
//! A layout is recomputed when the set of nodes that may hold data changes: a node joins, is
//! marked down after the grace period, or is disqualified (suspended nodes stay, frozen). The
//! new layout is published at once — a lost node cannot wait — and agents rebuild the slots
//! they newly hold. Each agent reports the newest version it has fully repaired for; when
//! every holder of the current layout has, the layout is *in sync*. Until then the previous
//! in-sync layout is published beside it and readers fall back to it. Rebalancing rounds that
//! the engine deferred (`Quality::deferred`) only run once the current layout is in sync, so
//! data never moves twice before it has landed once.

#![warn(missing_docs)]

mod auditor;
pub mod economics;
mod error;
pub mod ledger;
pub mod metrics;
pub mod service;
mod state;
pub mod store;
#[cfg(test)]
mod sybil_sim;
pub mod vetting;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shardfarm_core::auth::{Caller, Verifier};
use shardfarm_core::capacity::CapacityReport;
use shardfarm_core::identity::{Credential, Identity, NodeId};
use shardfarm_core::limit::KeyedBuckets;
use shardfarm_core::placement::{self, Options, Profile};
use shardfarm_proto::PublishedLayout;
use tokio::sync::watch;

pub use service::CoordinatorService;
pub use state::Member;

use crate::economics::{EpochInput, ReputationConfig, RewardConfig, Standing};
pub use error::{Error, Result};

use crate::ledger::Ledger;
use crate::store::{DirStore, StateStore};
use state::Persisted;

/// Heartbeat-only changes reach the state file at most this often (uptime loses at most this
/// much on a crash).
pub const SAVE_EVERY: Duration = Duration::from_secs(10);
/// How long an issued capacity challenge may be answered.
const CHALLENGE_TTL_MS: u64 = 60_000;
/// Most outstanding challenges (each is 32 bytes; joins beyond this wait a minute).
const MAX_CHALLENGES: usize = 10_000;
/// Joins one identity may make in a burst, then one every [`JOIN_EVERY_IDENTITY`] seconds (an
/// agent joins once per start, and again only if the coordinator forgot it).
const JOIN_BURST_IDENTITY: f64 = 10.0;
const JOIN_EVERY_IDENTITY: f64 = 2.0;
/// Joins the whole pool accepts in a burst, then per second (a farm of hundreds of agents
/// starting at once is admitted within seconds; a flood of fresh identities is not).
const JOIN_BURST_POOL: f64 = 200.0;
const JOIN_RATE_POOL: f64 = 50.0;
/// Outstanding challenges one owner root may hold, all its keys together (a member holds its
/// own share, outside the pool-wide limit: a flood cannot keep a restarting member out).
pub const MAX_CHALLENGES_PER_ROOT: usize = 4;
/// Joins a stranger's owner root may make in a burst, then per second, all its keys together
/// (members rejoin outside this and the pool-wide budget).
const JOIN_BURST_ROOT: f64 = 20.0;
const JOIN_RATE_ROOT: f64 = 2.0;

/// Whose share an outstanding challenge counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChallengeOwner {
    /// A member of the pool (its own share, outside the pool-wide limit).
    Member(NodeId),
    /// A stranger's owner root.
    Root(NodeId),
    /// Nobody in particular (simulations): the pool-wide limit only.
    Anyone,
}

// ---- Public interface ----

/// A sum of figures nodes report about themselves, for a gauge: it saturates instead of
/// wrapping or panicking (under the state lock) when a node reports `u64::MAX`.
fn saturating_sum(xs: impl IntoIterator<Item = u64>) -> i64 {
    let sum = xs.into_iter().fold(0u64, u64::saturating_add);
    i64::try_from(sum).unwrap_or(i64::MAX)
}

/// Makes `layout` current. The current one becomes the readers' fallback if it was in sync (or
/// there is no fallback yet); otherwise the older, in-sync fallback stays.
fn install(st: &mut Persisted, layout: placement::Layout, now_ms: u64) {
    let in_sync = st.in_sync();
    if let Some(cur) = st.layout.take()
        && (in_sync || st.previous.is_none())
    {
        st.previous = Some(cur);
    }
    st.layout = Some(layout);
    st.layout_published_ms = now_ms;
}

/// Serves the coordinator's `/metrics` (and `/healthz`) on `listener` until `stop`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    c: Arc<Coordinator>,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(move || std::future::ready(c.metrics.render())))
        .route("/healthz", get(|| std::future::ready("ok")));
    axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await
}

/// A pool's configuration (a StoragePool spec, or `local up`'s flags).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PoolConfig {
    /// Pool name (goes into read capabilities).
    pub pool: String,
    /// Data shards.
    pub k: u16,
    /// Parity shards.
    pub m: u16,
    /// Placement partitions.
    pub partitions: u32,
    /// Segment size, bytes.
    pub segment_size: u64,
    /// Least identity difficulty admitted.
    pub min_difficulty: u8,
    /// The label placement spreads over (`zone`, `farm`, `host`, `cluster`).
    pub failure_domain: String,
    /// Agents report this often, ms.
    pub heartbeat_ms: u64,
    /// A node silent this long is down and its slots are re-placed, ms.
    pub grace_ms: u64,
    /// A member silent this long that holds no slot in the current or the previous layout is
    /// forgotten, ms (0: never). Its series leave the metrics and its alerts stop; if it comes
    /// back it joins again as a newcomer. Its recorded rewards stay in the ledger.
    pub forget_after_ms: u64,
    /// Each node is audited about this often, ms.
    pub audit_interval_ms: u64,
    /// Leading zero bits a capacity proof must find.
    pub capacity_difficulty: u8,
    /// Most delegated node ids one owner root may join.
    pub max_delegated_per_root: usize,
    /// Most rebalancing transfers per layout round (vacated slots are always re-placed);
    /// `None`: the default budget, [`PoolConfig::transfer_budget`].
    pub max_transfers_per_round: Option<usize>,
    /// Reputation thresholds.
    pub reputation: ReputationConfig,
    /// Rewards.
    pub rewards: RewardConfig,
    /// TLS on every hop (the default), or plaintext behind `--insecure-plaintext`; not part
    /// of the persisted pool.
    #[serde(skip)]
    pub security: shardfarm_proto::Security,
    /// How newcomers are vetted before their claims count.
    pub vetting: vetting::VettingConfig,
    /// The pool owner's own farms: farm key id (hex) → the labels the farm assigns its agents.
    /// A node presenting a grant from one of these keys has its labels trusted (and these
    /// override them); every other node is an outsider (see [`Coordinator::join`]).
    pub farms: BTreeMap<String, BTreeMap<String, String>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            pool: "default".into(),
            k: 4,
            m: 2,
            partitions: 256,
            segment_size: 64 << 20,
            min_difficulty: shardfarm_core::identity::DEFAULT_DIFFICULTY,
            failure_domain: "zone".into(),
            heartbeat_ms: 5_000,
            grace_ms: 60_000,
            forget_after_ms: 7 * 24 * 3600 * 1000,
            audit_interval_ms: 60_000,
            capacity_difficulty: 12,
            max_delegated_per_root: 16,
            max_transfers_per_round: None,
            reputation: ReputationConfig::default(),
            rewards: RewardConfig::default(),
            security: shardfarm_proto::Security::Tls,
            vetting: vetting::VettingConfig::default(),
            farms: BTreeMap::new(),
        }
    }
}

impl PoolConfig {
    /// Slots one layout round may move to rebalance: the configured number, or by default a
    /// sixteenth of all slots (at least n). Whatever a newcomer claims, it gains at most this
    /// many slots per round, and the next round waits until the last one is in sync.
    pub fn transfer_budget(&self) -> usize {
        let n = usize::from(self.k) + usize::from(self.m);
        self.max_transfers_per_round.unwrap_or((self.partitions as usize * n / 16).max(n))
    }

    /// The erasure profile and placement this pool runs.
    pub fn profile(&self) -> Profile {
        Profile {
            k: self.k,
            m: self.m,
            partitions: self.partitions,
            domain_kind: self.failure_domain.clone(),
        }
    }
}

/// Why a request was refused (mapped to a gRPC status in `service`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Malformed input.
    #[error("{0}")]
    InvalidArgument(String),
    /// Not allowed.
    #[error("{0}")]
    PermissionDenied(String),
    /// Not possible now.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Unknown node.
    #[error("{0}")]
    NotFound(String),
    /// Nothing to serve yet.
    #[error("{0}")]
    Unavailable(String),
    /// A rate limit was reached: retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The state could not be saved.
    #[error("{0}")]
    Internal(String),
}

/// Admission rules for outsiders beyond the pool's identity difficulty: in a cluster, one rule
/// per NodeSyndication of the pool. An outsider joins if any rule admits it (or there are
/// none); the owner's own agents (a farm vouches for them) are not subject to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// The rules (a syndication's each).
    pub rules: Vec<AdmissionRule>,
    /// Failure domains the pool assigns to outsiders, by node id or owner root (a
    /// syndication's sites).
    pub domains: BTreeMap<NodeId, String>,
}

/// One way in for outsiders.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdmissionRule {
    /// Whose rule (a NodeSyndication's name), for refusals.
    pub name: String,
    /// Least identity difficulty, bits (0: the pool's alone).
    pub min_difficulty: u8,
    /// When set, only these nodes (or their owner roots) may join by this rule.
    pub allow: Option<std::collections::BTreeSet<NodeId>>,
}

impl AdmissionRule {
    /// Why this rule does not admit `caller` (mined to `difficulty` bits), if it does not.
    fn refuses(&self, caller: &Caller, difficulty: u32) -> Option<String> {
        if difficulty < u32::from(self.min_difficulty) {
            return Some(format!(
                "identity mined to {difficulty} bits; admission requires {}",
                self.min_difficulty
            ));
        }
        match &self.allow {
            Some(allow) if !allow.contains(&caller.id) && !allow.contains(&caller.root) => {
                Some(format!("node {} is not on the pool's allow list", caller.id))
            }
            _ => None,
        }
    }
}

impl Admission {
    /// Admits `caller` if any rule does (or there is none); otherwise every rule's reason.
    fn check(&self, caller: &Caller) -> Result<(), Refusal> {
        let difficulty = caller.credential.difficulty();
        let reasons: Vec<(String, String)> = match self
            .rules
            .iter()
            .map(|r| r.refuses(caller, difficulty).map(|why| (r.name.clone(), why)))
            .collect::<Option<Vec<_>>>()
        {
            None => return Ok(()),
            Some(reasons) if reasons.is_empty() => return Ok(()),
            Some(reasons) => reasons,
        };
        let text = if reasons.len() == 1 {
            reasons[0].1.clone()
        } else {
            reasons.iter().map(|(n, why)| format!("{n}: {why}")).collect::<Vec<_>>().join("; ")
        };
        // Below every rule's difficulty is a precondition the caller can meet by mining.
        let all_difficulty = reasons.iter().all(|(_, why)| why.starts_with("identity mined"));
        Err(if all_difficulty {
            Refusal::FailedPrecondition(text)
        } else {
            Refusal::PermissionDenied(text)
        })
    }
}

/// What a node sends to join.
#[derive(Clone, Debug)]
pub struct JoinInput {
    /// gRPC address.
    pub grpc: String,
    /// HTTP (metrics) address.
    pub http: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// The encoded, signed capacity report.
    pub capacity_report: Vec<u8>,
    /// The newest layout publication the node accepted, if any.
    pub last_layout: Option<shardfarm_proto::pb::SignedLayout>,
    /// A [`shardfarm_core::grant::FarmGrant`] (empty for outsiders).
    pub farm_grant: Vec<u8>,
}

/// What a node sends with each heartbeat.
#[derive(Clone, Debug, Default)]
pub struct ReportInput {
    /// Bytes stored.
    pub used_bytes: u64,
    /// Shards stored.
    pub shards: u64,
    /// Scrub errors so far.
    pub scrub_errors: u64,
    /// Shards still to rebuild.
    pub repair_backlog: u64,
    /// Newest layout fully repaired for.
    pub synced_version: u64,
    /// Segments of its slots that cannot be repaired (fewer than k shards anywhere).
    pub lost_segments: u64,
    /// Peers that served it repair sources that did not verify (at most 64 are read).
    pub suspect_peers: Vec<NodeId>,
}

/// The name of the state document in a state dir (`coordinator.json`).
pub fn store_file() -> &'static str {
    state::STATE_FILE
}

/// Nodes whose report of sync awaits the check that they hold what they gained.
#[derive(Clone, Debug, Default)]
pub struct SyncWork {
    /// The current layout's version.
    pub version: u64,
    /// The readers' fallback layout (the data's sources), if any.
    pub previous: Option<placement::Layout>,
    /// Each node to check, with the (partition, slot)s it gained.
    pub nodes: Vec<(NodeId, Vec<(u32, usize)>)>,
}

/// The coordinator of one pool.
pub struct Coordinator {
    config: PoolConfig,
    identity: Identity,
    store: Box<dyn StateStore>,
    state: Mutex<Persisted>,
    layout_tx: watch::Sender<Option<Arc<PublishedLayout>>>,
    /// Outstanding challenges: expiry, and whose share it counts against.
    challenges: Mutex<HashMap<Vec<u8>, (u64, ChallengeOwner)>>,
    verifier: Verifier,
    ledger: Mutex<Ledger>,
    admission: Mutex<Admission>,
    /// The pool owner's farms: farm key id → the labels it assigns.
    farms: Mutex<BTreeMap<NodeId, BTreeMap<String, String>>>,
    /// Rebalancing moves per round set at run time (a ShardPlacement's); 0: the config's.
    max_transfers: std::sync::atomic::AtomicUsize,
    /// Joins per identity and for the whole pool.
    joins_by_id: KeyedBuckets<NodeId>,
    joins_pool: KeyedBuckets<()>,
    /// Joins per stranger's owner root (all its keys together).
    joins_by_root: KeyedBuckets<NodeId>,
    /// Wakes the housekeeping loop when membership changed (a join): the layout is recomputed
    /// and the state written there, never on a request's path.
    wake: tokio::sync::Notify,
    /// Orders state writes: each one snapshots the state after the previous one finished.
    save_order: Mutex<()>,
    /// The coordinator's metrics.
    pub metrics: crate::metrics::CoordinatorMetrics,
}

impl Coordinator {
    /// Opens the coordinator whose state and ledger live in `dir`, signing as `identity`.
    pub fn open(config: PoolConfig, dir: &Path, identity: Identity) -> Result<Arc<Self>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let store = Box::new(DirStore::new(dir, state::STATE_FILE));
        Self::open_with(config, store, &dir.join("ledger.jsonl"), identity)
    }

    /// Opens the coordinator whose state lives in `store` and whose ledger is `ledger`.
    pub fn open_with(
        config: PoolConfig,
        store: Box<dyn StateStore>,
        ledger: &Path,
        identity: Identity,
    ) -> Result<Arc<Self>> {
        let mut state = Persisted::load(store.as_ref())?;
        if state.layout.is_none() && state.nodes.is_empty() {
            // No state: a new pool, or one whose state was lost. The layout — the only map
            // from partitions to holders — is recovered from the agents if any present one
            // this pool key signed; a new pool's first joiners present none.
            state.recovery = Some(state::Recovery {
                until_ms: shardfarm_core::auth::now_ms().saturating_add(config.grace_ms),
                best: None,
            });
        }
        let ledger = Ledger::open(ledger, &identity.public_key())?;
        let farms = config
            .farms
            .iter()
            .map(|(id, labels)| {
                NodeId::from_hex(id)
                    .map(|id| (id, labels.clone()))
                    .map_err(|e| Error::Config(format!("farms: `{id}` is not a farm key id: {e}")))
            })
            .collect::<Result<_>>()?;
        // Requests within 5 minutes of our clock; 100 000 nonces ≈ 20 MB.
        // Only requests addressed to this pool.
        let verifier = Verifier::new(config.min_difficulty, Duration::from_secs(300), 100_000)
            .with_audience(identity.id());
        let (layout_tx, _) = watch::channel(None);
        let c = Coordinator {
            config,
            identity,
            store,
            state: Mutex::new(state),
            layout_tx,
            challenges: Mutex::new(HashMap::new()),
            verifier,
            ledger: Mutex::new(ledger),
            admission: Mutex::new(Admission::default()),
            farms: Mutex::new(farms),
            max_transfers: std::sync::atomic::AtomicUsize::new(0),
            joins_by_id: KeyedBuckets::new(
                1.0 / JOIN_EVERY_IDENTITY,
                JOIN_BURST_IDENTITY,
                MAX_CHALLENGES,
            ),
            joins_pool: KeyedBuckets::new(JOIN_RATE_POOL, JOIN_BURST_POOL, 1),
            joins_by_root: KeyedBuckets::new(JOIN_RATE_ROOT, JOIN_BURST_ROOT, MAX_CHALLENGES),
            wake: tokio::sync::Notify::new(),
            save_order: Mutex::new(()),
            metrics: crate::metrics::CoordinatorMetrics::new(),
        };
        c.publish_current();
        c.refresh_metrics();
        Ok(Arc::new(c))
    }

    /// The pool's configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// The coordinator's identity (it signs audits and the ledger).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Issues a capacity challenge to nobody in particular (simulations and tests): it counts
    /// against the pool-wide limit only.
    pub fn challenge(&self, now_ms: u64) -> Result<(Vec<u8>, u8), Refusal> {
        self.issue_challenge(ChallengeOwner::Anyone, 1, now_ms)
    }

    /// Issues a capacity challenge to `caller`: a member of the pool gets one from its own
    /// share; a stranger's owner root holds at most [`MAX_CHALLENGES_PER_ROOT`] outstanding per
    /// share of its proven work (`share_weight`, however many keys it delegates), within the
    /// pool-wide limit.
    pub fn challenge_for(&self, caller: &Caller, now_ms: u64) -> Result<(Vec<u8>, u8), Refusal> {
        let owner = if self.is_member(&caller.id) {
            ChallengeOwner::Member(caller.id)
        } else {
            ChallengeOwner::Root(caller.root)
        };
        self.issue_challenge(owner, caller.share_weight(self.config.min_difficulty), now_ms)
    }

    /// Whether `id` is a member of the pool (admitted before and not disqualified).
    pub fn is_member(&self, id: &NodeId) -> bool {
        let st = self.state.lock().unwrap();
        st.nodes.get(&id.to_hex()).is_some_and(|m| m.standing != Standing::Disqualified)
    }

    fn issue_challenge(
        &self,
        owner: ChallengeOwner,
        shares: u32,
        now_ms: u64,
    ) -> Result<(Vec<u8>, u8), Refusal> {
        let share = MAX_CHALLENGES_PER_ROOT.saturating_mul(shares.max(1) as usize);
        let mut ch = self.challenges.lock().unwrap();
        ch.retain(|_, (exp, _)| *exp > now_ms);
        let held = |o: &ChallengeOwner| ch.values().filter(|(_, x)| x == o).count();
        match &owner {
            ChallengeOwner::Member(id) if held(&owner) >= MAX_CHALLENGES_PER_ROOT => {
                return Err(Refusal::ResourceExhausted(format!(
                    "member {id} holds {MAX_CHALLENGES_PER_ROOT} unanswered challenges, its \
                     share: answer one or retry in a minute"
                )));
            }
            ChallengeOwner::Member(_) => {}
            ChallengeOwner::Root(root) if held(&owner) >= share => {
                return Err(Refusal::ResourceExhausted(format!(
                    "owner root {} holds {share} unanswered challenges (all its keys together), \
                     its share ({shares} × {MAX_CHALLENGES_PER_ROOT}): answer one or retry in a \
                     minute",
                    root.short()
                )));
            }
            _ if ch.len() >= MAX_CHALLENGES => {
                return Err(Refusal::Unavailable(
                    "too many joins in flight; retry in a minute".into(),
                ));
            }
            _ => {}
        }
        let mut c = vec![0u8; 32];
        getrandom::fill(&mut c).expect("OS randomness");
        ch.insert(c.clone(), (now_ms + CHALLENGE_TTL_MS, owner));
        Ok((c, self.config.capacity_difficulty))
    }

    /// Admits (or re-admits) the caller. The membership changes at once; the state file and
    /// the layout follow within a housekeeping step (a join that is lost in a crash before it
    /// is written is repeated by the agent, whose heartbeat then gets NotFound).
    pub fn join(&self, caller: &Caller, input: JoinInput, now_ms: u64) -> Result<Member, Refusal> {
        let now = std::time::Instant::now();
        if !self.joins_by_id.try_take(&caller.id, now) {
            let wait = self.joins_by_id.wait(&caller.id, now);
            return Err(Refusal::ResourceExhausted(format!(
                "node {} joined {JOIN_BURST_IDENTITY} times in quick succession: retry in {} ms",
                caller.id,
                wait.as_millis().max(1)
            )));
        }
        // A member rejoins (after a restart, a move) through its own budget above; strangers
        // share one per owner root and the pool's, which a flood of them spends.
        if !self.is_member(&caller.id) {
            let shares = caller.share_weight(self.config.min_difficulty);
            if !self.joins_by_root.try_take_share(&caller.root, now, shares) {
                return Err(Refusal::ResourceExhausted(format!(
                    "owner root {} made {} joins in quick succession (all its keys together), \
                     its share ({shares} × {JOIN_BURST_ROOT}): retry in {} ms",
                    caller.root.short(),
                    f64::from(shares) * JOIN_BURST_ROOT,
                    self.joins_by_root.wait(&caller.root, now).as_millis().max(1)
                )));
            }
            // The pool's budget, not the caller's share: busy, not this caller's doing.
            if !self.joins_pool.try_take(&(), now) {
                return Err(Refusal::Unavailable(format!(
                    "the pool admits at most {JOIN_RATE_POOL} joins a second: retry in a second"
                )));
            }
        }
        let report = CapacityReport::decode_verified(&input.capacity_report, None)
            .map_err(|e| Refusal::InvalidArgument(format!("capacity proof refused: {e}")))?;
        if report.node != *caller.credential.signing_key() {
            return Err(Refusal::PermissionDenied(
                "the capacity proof is signed by another key than the caller's".into(),
            ));
        }
        // Finite is checked by the decoder; a negative figure (more space taken than offered,
        // or a negative overhead) ranks nothing and is refused before it reaches the state.
        if report.capacity() < 0.0 || report.overhead < 0.0 {
            return Err(Refusal::InvalidArgument(format!(
                "capacity proof refused: overhead {} gives the capacity figure {}: it must not \
                 be negative (is more space taken than offered?)",
                report.overhead,
                report.capacity()
            )));
        }
        let issued = self.challenges.lock().unwrap().remove(&report.challenge);
        if issued.is_none_or(|(exp, _)| exp <= now_ms) {
            return Err(Refusal::FailedPrecondition(
                "the capacity proof answers a challenge this coordinator did not issue or that \
                 expired: ask Challenge first and join within a minute"
                    .into(),
            ));
        }
        if report.difficulty < self.config.capacity_difficulty {
            return Err(Refusal::FailedPrecondition(format!(
                "the capacity proof solves difficulty {}; the pool asks {}",
                report.difficulty, self.config.capacity_difficulty
            )));
        }
        check_labels(&input.labels)?;
        for (what, addr) in [("grpc", &input.grpc), ("http", &input.http)] {
            if addr.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(Refusal::InvalidArgument(format!(
                    "{what} address `{addr}` is not host:port"
                )));
            }
        }
        let admission = self.admission.lock().unwrap().clone();
        let (labels, domain, domain_from) =
            self.assign_domain(caller, &admission, input.labels, &input.farm_grant, now_ms)?;
        // A syndication's rules are for outsiders: the owner's own agents (a farm vouches for
        // them) are never locked out by an allow list meant for edge boxes.
        if !domain_from.starts_with("farm ") {
            admission.check(caller)?;
        }
        let delegated = matches!(caller.credential, Credential::Delegated(_));
        let mut st = self.state.lock().unwrap();
        if let Some(m) = st.nodes.get(&caller.id.to_hex())
            && m.standing == Standing::Disqualified
        {
            return Err(Refusal::PermissionDenied(format!(
                "node {} is disqualified from pool `{}`",
                caller.id, self.config.pool
            )));
        }
        if delegated {
            let same_root = st
                .nodes
                .values()
                .filter(|m| m.delegated && m.root == caller.root && m.id != caller.id)
                .count();
            if same_root >= self.config.max_delegated_per_root {
                return Err(Refusal::PermissionDenied(format!(
                    "owner root {} already has {same_root} delegated nodes, the pool's limit",
                    caller.root
                )));
            }
        }
        // Before the pool's first layout every joiner founds it, unless an agent has presented
        // a layout to recover (the holders of that layout are the founders then).
        let founding = st.layout.is_none() && st.recovery.as_ref().is_none_or(|r| r.best.is_none());
        let m = st
            .nodes
            .entry(caller.id.to_hex())
            .or_insert_with(|| Member::new(caller, now_ms, &self.config.reputation));
        m.founding |= founding;
        // A member the published layouts name that comes back at another address (a pod
        // recreated with a new IP, an agent restarted on another port) is republished at
        // once: clients only reach the addresses the signed layout gives them.
        let moved = !m.grpc.is_empty() && m.grpc != input.grpc;
        m.grpc = input.grpc;
        m.http = input.http;
        m.labels = labels;
        m.domain = domain;
        m.domain_from = domain_from;
        m.capacity = report.capacity();
        m.offered_bytes = report.space_reported;
        m.delegated = delegated;
        m.seen(now_ms);
        let out = m.clone();
        if let (Some(rec), Some(signed)) = (st.recovery.as_mut(), input.last_layout.as_ref()) {
            match shardfarm_proto::verify_layout(signed, &self.identity.id()) {
                Ok(l)
                    if rec.best.as_ref().is_none_or(|b| {
                        (l.layout.version, l.sequence) > (b.layout.version, b.sequence)
                    }) =>
                {
                    tracing::info!(node = %caller.id, version = l.layout.version, sequence = l.sequence, "a joining node presented a newer layout to recover");
                    rec.best = Some(l);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = %caller.id, error = %e, "the layout a joining node presented is refused")
                }
            }
        }
        tracing::info!(node = %caller.id, domain = %out.domain, capacity = out.capacity, "node joined");
        st.dirty = true;
        let named = |l: &Option<placement::Layout>| {
            l.as_ref().is_some_and(|l| l.partitions.iter().flatten().any(|n| *n == caller.id))
        };
        let republish = moved && (named(&st.layout) || named(&st.previous));
        drop(st);
        if republish {
            tracing::info!(node = %caller.id, grpc = %out.grpc, "a member of the layout moved; republishing its address");
            self.publish_current();
        }
        self.wake.notify_one();
        Ok(out)
    }

    /// Records a heartbeat; returns the node's standing and the current layout version.
    pub fn report(
        &self,
        caller: &Caller,
        r: ReportInput,
        now_ms: u64,
    ) -> Result<(Standing, u64), Refusal> {
        let mut st = self.state.lock().unwrap();
        let version = st.layout.as_ref().map_or(0, |l| l.version);
        // A claim of sync for a layout that gave the node nothing new needs no check.
        let unchecked = st
            .nodes
            .get(&caller.id.to_hex())
            .is_some_and(|m| m.verified_version < version && r.synced_version >= version);
        let nothing_new = unchecked && st.gained(&caller.id).is_empty();
        // Only members can be suspects (bounded metric labels, no made-up ids).
        let members: BTreeMap<NodeId, [String; 3]> =
            st.nodes.values().map(|m| (m.id, m.metric_labels())).collect();
        let m = st.nodes.get_mut(&caller.id.to_hex()).ok_or_else(|| {
            Refusal::NotFound(format!("node {} has not joined: call Join first", caller.id))
        })?;
        let was_up = m.up;
        m.seen(now_ms);
        m.used_bytes = r.used_bytes;
        m.shards = r.shards;
        m.scrub_errors = r.scrub_errors;
        m.repair_backlog = r.repair_backlog;
        m.lost_segments = r.lost_segments;
        for peer in &r.suspect_peers {
            let Some(l) = members.get(peer) else { continue };
            tracing::warn!(reporter = %caller.id, suspect = %peer, "a node served a repair source that did not verify");
            self.metrics.peer_complaints.with_label_values(&[&l[0], &l[1], &l[2]]).inc();
        }
        m.synced_version = r.synced_version;
        if nothing_new {
            m.verified_version = m.verified_version.max(version);
        }
        let standing = m.standing;
        if !was_up {
            tracing::info!(node = %caller.id, "node is back up");
            st.dirty = true;
        }
        drop(st);
        Ok((standing, version))
    }

    /// A node's labels, failure domain and where the domain came from:
    /// - one of the owner's farms vouches for it (a valid grant): its labels are trusted, the
    ///   farm's override them, and the domain is its `failure_domain` label;
    /// - the pool assigns its id or owner root a domain (a syndication's site): that one;
    /// - otherwise its owner root is its domain, whatever it claims: a stranger with many
    ///   roots pays for each one, and a claimed `zone=` buys nothing.
    ///
    /// Outsiders' claimed domain labels are overwritten, so nothing downstream reads a claim.
    fn assign_domain(
        &self,
        caller: &Caller,
        admission: &Admission,
        mut labels: BTreeMap<String, String>,
        grant: &[u8],
        now_ms: u64,
    ) -> Result<(BTreeMap<String, String>, String, String), Refusal> {
        let kind = &self.config.failure_domain;
        if !grant.is_empty() {
            let g = shardfarm_core::grant::FarmGrant::from_bytes(grant)
                .map_err(|e| Refusal::InvalidArgument(format!("farm grant refused: {e}")))?;
            g.verify(caller.credential.signing_key(), &self.identity.id(), now_ms / 1000)
                .map_err(|e| Refusal::PermissionDenied(format!("farm grant refused: {e}")))?;
            let farm = g.farm_id();
            let Some(assigned) = self.farms.lock().unwrap().get(&farm).cloned() else {
                return Err(Refusal::FailedPrecondition(format!(
                    "farm key {farm} is not one of pool `{}`'s farms (yet): retry once its \
                     MiningFarm is reconciled",
                    self.config.pool
                )));
            };
            labels.extend(assigned);
            let domain = labels.get(kind).cloned().ok_or_else(|| {
                Refusal::InvalidArgument(format!(
                    "label `{kind}` is required: the pool spreads shards over {kind}s"
                ))
            })?;
            return Ok((labels, domain, format!("farm {}", farm.short())));
        }
        // Labels only a farm assigns: an outsider cannot pass for one of a farm's pods.
        for reserved in RESERVED_LABELS {
            labels.remove(*reserved);
        }
        let (domain, from) =
            match admission.domains.get(&caller.id).or_else(|| admission.domains.get(&caller.root))
            {
                Some(d) => (d.clone(), "syndication".to_string()),
                None => (format!("root-{}", caller.root.short()), "owner root".to_string()),
            };
        labels.insert(kind.clone(), domain.clone());
        Ok((labels, domain, from))
    }

    /// The owner's farm `farm` assigns its agents `labels` (a MiningFarm's, in a cluster).
    pub fn set_farm(&self, farm: NodeId, labels: BTreeMap<String, String>) {
        self.farms.lock().unwrap().insert(farm, labels);
    }

    /// Forgets the farm `farm`: its grants no longer vouch for anyone, and the members it
    /// vouched for become outsiders at once.
    pub fn remove_farm(&self, farm: &NodeId) {
        self.farms.lock().unwrap().remove(farm);
        // Its agents are outsiders from now on: owner-root domains, no farm labels.
        let from = format!("farm {}", farm.short());
        let kind = self.config.failure_domain.clone();
        let mut st = self.state.lock().unwrap();
        let mut changed = false;
        for m in st.nodes.values_mut().filter(|m| m.domain_from == from) {
            for reserved in RESERVED_LABELS {
                m.labels.remove(*reserved);
            }
            m.domain = format!("root-{}", m.root.short());
            m.labels.insert(kind.clone(), m.domain.clone());
            m.domain_from = "owner root".into();
            changed = true;
        }
        st.dirty |= changed;
    }

    /// The current layout, if there is one.
    pub fn layout(&self) -> Option<Arc<PublishedLayout>> {
        self.layout_tx.borrow().clone()
    }

    /// Why there is no layout (yet), if there is none.
    pub fn layout_problem(&self) -> Option<String> {
        self.state.lock().unwrap().problem.clone()
    }

    /// A receiver that sees every layout published from now on.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<PublishedLayout>>> {
        self.layout_tx.subscribe()
    }

    /// All members.
    pub fn members(&self) -> Vec<Member> {
        self.state.lock().unwrap().nodes.values().cloned().collect()
    }

    /// Sets the admission rules that later joins must meet (members already admitted stay).
    pub fn set_admission(&self, admission: Admission) {
        *self.admission.lock().unwrap() = admission;
    }

    /// Hands `node`'s slots away: the next layout places nothing on it.
    pub fn drain(&self, node: &NodeId) {
        let mut st = self.state.lock().unwrap();
        if let Some(m) = st.nodes.get_mut(&node.to_hex())
            && !m.draining
        {
            tracing::info!(node = %node, "draining");
            m.draining = true;
            st.dirty = true;
        }
    }

    /// Sets the most rebalancing moves per layout round (None: the pool's default budget).
    pub fn set_max_transfers(&self, moves: Option<usize>) {
        self.max_transfers.store(moves.unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
    }

    /// Slots moved by the last layout round and its balance (max load / mean).
    pub fn last_round(&self) -> (u64, f64) {
        (self.metrics.layout_moved.get().max(0) as u64, self.metrics.layout_balance.get())
    }

    /// Takes `node` back (a scale-down was undone): it may hold slots again.
    pub fn undrain(&self, node: &NodeId) {
        let mut st = self.state.lock().unwrap();
        if let Some(m) = st.nodes.get_mut(&node.to_hex())
            && m.draining
        {
            tracing::info!(node = %node, "drain undone");
            m.draining = false;
            st.dirty = true;
        }
    }

    /// Removes `node` from the pool (its farm was deleted); its slots are re-placed.
    pub fn remove(&self, node: &NodeId) {
        let mut st = self.state.lock().unwrap();
        if st.nodes.remove(&node.to_hex()).is_some() {
            tracing::info!(node = %node, "removed from the pool");
            st.dirty = true;
        }
    }

    /// Publishes a layout computed elsewhere (a ShardPlacement), if it is newer than ours.
    pub fn adopt_layout(&self, layout: placement::Layout, now_ms: u64) {
        let mut st = self.state.lock().unwrap();
        if st
            .layout
            .as_ref()
            .is_some_and(|l| l.version >= layout.version || l.partitions == layout.partitions)
        {
            return;
        }
        // A layout the operator hands over (a ShardPlacement) names the pool's holders.
        for id in layout.partitions.iter().flatten() {
            if let Some(m) = st.nodes.get_mut(&id.to_hex()) {
                m.founding = true;
            }
        }
        install(&mut st, layout, now_ms);
        st.recovery = None;
        drop(st);
        self.publish_current();
    }

    /// Rewards totals per node (hex id) and per farm.
    pub fn reward_totals(
        &self,
    ) -> (BTreeMap<String, crate::ledger::Totals>, BTreeMap<String, crate::ledger::Totals>) {
        let l = self.ledger.lock().unwrap();
        (l.by_node(), l.by_farm())
    }

    /// After a pause of `gap` during which this coordinator ran nothing, every member that was
    /// up is presumed up again from `now_ms` (see [`Self::run`]).
    pub fn presume_up_after_pause(&self, gap: Duration, now_ms: u64) {
        let mut st = self.state.lock().unwrap();
        let mut presumed = 0;
        for m in st.nodes.values_mut().filter(|m| m.up) {
            m.last_seen_ms = m.last_seen_ms.max(now_ms);
            presumed += 1;
        }
        tracing::warn!(
            paused_ms = gap.as_millis() as u64,
            presumed,
            "this coordinator did not run for a while: its members' silence meanwhile is not held against them"
        );
    }

    /// One step of housekeeping: uptime, nodes going down, layouts, epochs, metrics.
    pub fn tick(&self, now_ms: u64) {
        let mut st = self.state.lock().unwrap();
        let grace = self.config.grace_ms;
        let last = st.last_tick_ms.unwrap_or(now_ms);
        let mut dirty = false;
        for m in st.nodes.values_mut() {
            let up = now_ms.saturating_sub(m.last_seen_ms) <= grace;
            if m.standing != Standing::Disqualified && now_ms > last {
                m.uptime.record(last, now_ms, up);
            }
            if m.up && !up {
                tracing::warn!(node = %m.id, silent_ms = now_ms - m.last_seen_ms, "node is down");
                m.up = false;
                dirty = true;
            }
            let judged = economics::judge(
                m.standing,
                &m.audit,
                m.uptime.ratio(now_ms),
                &self.config.reputation,
            );
            if judged != m.standing {
                tracing::warn!(node = %m.id, from = m.standing.as_str(), to = judged.as_str(), "standing changed");
                m.standing = judged;
                dirty = true;
            }
        }
        // Members long gone and holding nothing any reader may still need are forgotten: without
        // this a replaced machine (a new id under the same pod) stayed a down member for ever,
        // alerting and counted, and every identity that ever joined kept its series.
        let forget = self.config.forget_after_ms;
        if forget > 0 {
            let holds = |id: &NodeId| {
                st.layout.iter().chain(st.previous.iter()).any(|l| !l.slots_of(id).is_empty())
            };
            let gone: Vec<String> = st
                .nodes
                .iter()
                .filter(|(_, m)| !m.up && now_ms.saturating_sub(m.last_seen_ms) > forget)
                .filter(|(_, m)| !holds(&m.id))
                .map(|(hex, _)| hex.clone())
                .collect();
            for hex in gone {
                if let Some(m) = st.nodes.remove(&hex) {
                    let silent_s = now_ms.saturating_sub(m.last_seen_ms) / 1000;
                    tracing::warn!(node = %m.id, silent_s, "forgotten: silent past the retention and holding no slot");
                    dirty = true;
                }
            }
        }
        st.dirty |= dirty;
        st.last_tick_ms = Some(now_ms);
        let epoch_ms = self.config.rewards.epoch_seconds.max(1) * 1000;
        let epoch = now_ms / epoch_ms;
        let closing = match st.epoch {
            Some(e) if e < epoch => Some(e),
            None => {
                st.epoch = Some(epoch);
                None
            }
            _ => None,
        };
        if let Some(e) = closing {
            self.close_epoch(&mut st, e);
            st.epoch = Some(epoch);
        }
        let save_now =
            now_ms.saturating_sub(st.saved_ms) >= SAVE_EVERY.as_millis() as u64 || st.dirty;
        let in_sync = st.in_sync();
        if in_sync && st.previous.is_some() {
            tracing::info!(version = st.layout.as_ref().map_or(0, |l| l.version), "layout in sync");
            st.previous = None;
            drop(st);
            self.publish_current();
            st = self.state.lock().unwrap();
        }
        let pending = st.dirty || (in_sync && st.deferred > 0);
        drop(st);
        if save_now {
            let _ = self.persist();
        }
        if pending {
            self.relayout(now_ms);
        }
        self.refresh_metrics();
    }

    fn close_epoch(&self, st: &mut Persisted, epoch: u64) {
        let members: Vec<&Member> = st.nodes.values().collect();
        let factors = vetting::delegation_factors(&members);
        // RW2 follows what the layout assigns, not what a node says it stores: its slots ×
        // the pool's average bytes per slot (the average cancels out of the shares; it only
        // keeps the ledger's unit in bytes), times the audits it passed (in `epoch_rewards`).
        let mut slots: BTreeMap<NodeId, u64> = BTreeMap::new();
        for id in st.layout.iter().flat_map(|l| l.partitions.iter().flatten()) {
            *slots.entry(*id).or_default() += 1;
        }
        let total_slots: u128 = slots.values().map(|&n| u128::from(n)).sum();
        let total_used: u128 = st.nodes.values().map(|m| u128::from(m.used_bytes)).sum();
        let per_slot = total_used.checked_div(total_slots).map_or(0, |p| p.max(1));
        let assigned = |id: &NodeId| -> u64 {
            let n = u128::from(slots.get(id).copied().unwrap_or(0));
            u64::try_from(n * per_slot).unwrap_or(u64::MAX)
        };
        let inputs: Vec<EpochInput> = st
            .nodes
            .values()
            .map(|m| EpochInput {
                node: m.id.to_hex(),
                farm: m.farm(),
                // An unvetted node's claim earns nothing, a delegated id past its root's share
                // less (see `vetting`).
                capacity: if self.config.vetting.vetted(m) {
                    m.capacity * factors.get(&m.id).copied().unwrap_or(1.0)
                } else {
                    0.0
                },
                stored_bytes: assigned(&m.id),
                audits_passed: m.epoch_passed,
                audits_total: m.epoch_total,
                standing: m.standing,
            })
            .collect();
        let rewards = economics::epoch_rewards(&self.config.rewards, &inputs);
        match self.ledger.lock().unwrap().append(epoch, &rewards, &self.identity) {
            Ok(()) => {
                for m in st.nodes.values_mut() {
                    m.epoch_passed = 0;
                    m.epoch_total = 0;
                }
                tracing::info!(epoch, nodes = rewards.len(), "epoch rewards recorded");
            }
            Err(e) => tracing::error!(epoch, error = %e, "could not record the epoch's rewards"),
        }
    }

    /// Recomputes the layout if the eligible nodes changed, and publishes it. Placement runs
    /// on a snapshot without the state lock; if membership or the layout changed meanwhile,
    /// the result is dropped and the next step starts over.
    fn relayout(&self, now_ms: u64) {
        if !self.finish_recovery(now_ms) {
            return;
        }
        // Unvetted nodes weigh little and share one pseudo failure domain (see `vetting`).
        let vetting = &self.config.vetting;
        let eligible = |st: &Persisted| -> Vec<placement::Node> {
            let members: Vec<&Member> = st
                .nodes
                .values()
                .filter(|m| m.up && m.standing != Standing::Disqualified)
                .collect();
            let placed = vetting.placement(&members);
            members
                .iter()
                .zip(placed)
                .map(|(m, (capacity, domain))| placement::Node {
                    id: m.id,
                    root: m.root,
                    domain,
                    capacity,
                    draining: m.draining,
                    frozen: m.standing == Standing::Suspended,
                })
                .collect()
        };
        let (nodes, current) = {
            let mut st = self.state.lock().unwrap();
            st.dirty = false;
            (eligible(&st), st.layout.clone())
        };
        let budget = match self.max_transfers.load(std::sync::atomic::Ordering::Relaxed) {
            0 => self.config.transfer_budget(),
            n => n,
        };
        let opts = Options { max_transfers: Some(budget) };
        let plan = placement::compute(&nodes, &self.config.profile(), current.as_ref(), &opts);
        let mut st = self.state.lock().unwrap();
        let version = |l: &Option<placement::Layout>| l.as_ref().map(|l| l.version);
        if version(&st.layout) != version(&current) || eligible(&st) != nodes {
            st.dirty = true;
            return;
        }
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                if st.problem.as_deref() != Some(&e.to_string()) {
                    tracing::warn!(error = %e, "no layout can be computed");
                }
                st.problem = Some(e.to_string());
                return;
            }
        };
        st.problem = None;
        st.deferred = plan.quality.deferred;
        if st.layout.as_ref().is_some_and(|l| l.partitions == plan.layout.partitions) {
            return;
        }
        tracing::info!(version = plan.layout.version, quality = %plan.quality, "layout published");
        self.metrics.layout_moved.set(plan.quality.moved as i64);
        self.metrics.layout_balance.set(plan.quality.balance);
        install(&mut st, plan.layout, now_ms);
        // The first layout computed ends a recovery that nothing was presented to.
        st.recovery = None;
        drop(st);
        self.publish_current();
    }

    /// While recovering: installs the newest layout the agents presented (highest version, then
    /// sequence) once every node it names has joined again (or the grace period is over; the
    /// next round then re-places the slots of those that did not come back). Without any
    /// presented layout placement may run (a new pool); the first layout installed, computed or
    /// recovered, ends the recovery. True when layouts may be computed.
    fn finish_recovery(&self, now_ms: u64) -> bool {
        let mut st = self.state.lock().unwrap();
        let Some(rec) = &st.recovery else { return true };
        // Nothing presented yet: placement may compute a layout (a new pool), which ends the
        // recovery when it is installed; until then a presented layout still wins, so a few
        // layout-less joiners (new nodes, a stranger) cannot make it start over.
        let Some(best) = &rec.best else { return true };
        let named =
            best.layout.partitions.iter().chain(best.previous.iter().flat_map(|l| &l.partitions));
        let missing = named.flatten().filter(|id| !st.nodes.contains_key(&id.to_hex())).count();
        if missing > 0 && now_ms < rec.until_ms {
            return false;
        }
        let best = st.recovery.take().and_then(|r| r.best).expect("checked above");
        // The holders of the pool's own signed layout were vetted before the state was lost;
        // nobody else who joined meanwhile founds anything.
        let named = named_ids(&best);
        for m in st.nodes.values_mut() {
            m.founding = named.contains(&m.id);
        }
        tracing::warn!(
            version = best.layout.version,
            sequence = best.sequence,
            missing_slots = missing,
            "layout recovered from the agents"
        );
        st.publication = st.publication.max(best.sequence);
        st.layout = Some(best.layout);
        st.previous = best.previous;
        st.layout_published_ms = now_ms;
        st.dirty = true;
        drop(st);
        self.publish_current();
        false
    }

    /// Signs the current layout (and fallback) as the pool under the next sequence number,
    /// writes the state, and hands the publication to every watcher.
    fn publish_current(&self) {
        let mut st = self.state.lock().unwrap();
        let Some(layout) = st.layout.clone() else { return };
        let addresses =
            st.nodes.values().map(|m| (m.id, m.grpc.clone())).collect::<BTreeMap<NodeId, String>>();
        let now = shardfarm_core::auth::now_ms();
        let sequence = st.publication.saturating_add(1).max(now);
        st.publication = sequence;
        let published = PublishedLayout::new(layout, st.previous.clone(), addresses)
            .with_pool(service::pool_info(&self.config))
            .sign(&self.identity, sequence, now);
        drop(st);
        // Write-ahead: the layout and its sequence number are durable before any agent sees
        // them, so whoever continues the pool (a restart, another operator replica) publishes
        // above both. A write that fails (a replica that no longer leads) publishes nothing.
        if self.persist().is_err() {
            return;
        }
        self.layout_tx.send_replace(Some(Arc::new(published)));
    }

    /// Writes the state. The state lock is held only to serialise it, never across the write
    /// and its fsync; writes are ordered, so an older snapshot never overwrites a newer one.
    fn persist(&self) -> Result<(), Refusal> {
        let _order = self.save_order.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = {
            let mut st = self.state.lock().unwrap();
            st.saved_ms = shardfarm_core::auth::now_ms();
            serde_json::to_vec(&*st).expect("the state serialises")
        };
        self.store.save(&bytes).map_err(|e| {
            tracing::error!(error = %e, "could not save the coordinator state");
            Refusal::Internal(format!("could not save the coordinator state: {e}"))
        })
    }

    fn refresh_metrics(&self) {
        let st = self.state.lock().unwrap();
        let m = &self.metrics;
        for s in [Standing::Active, Standing::Suspended, Standing::Disqualified] {
            for up in [true, false] {
                let n = st.nodes.values().filter(|x| x.standing == s && x.up == up).count();
                m.nodes.with_label_values(&[&state_label(s, up)]).set(n as i64);
            }
        }
        m.layout_version.set(st.layout.as_ref().map_or(0, |l| l.version) as i64);
        m.layout_in_sync.set(i64::from(st.in_sync()));
        // A holder that has not proven the current layout counts at least one shard per slot it
        // gained, whatever it last reported: it may not have listed them yet.
        let version = st.layout.as_ref().map(|l| l.version);
        m.repair_backlog.set(saturating_sum(st.nodes.values().filter(|x| x.up).map(|x| {
            let unproven = match version {
                Some(v) if !x.in_sync(v) => st.gained(&x.id).len() as u64,
                _ => 0,
            };
            x.repair_backlog.max(unproven)
        })));
        m.lost_segments
            .set(saturating_sum(st.nodes.values().filter(|x| x.up).map(|x| x.lost_segments)));
        // Per node: the labels it is exported under, by hex id (see `metrics`' module doc).
        let named: BTreeMap<String, [String; 3]> =
            st.nodes.iter().map(|(hex, x)| (hex.clone(), x.metric_labels())).collect();
        m.forget_nodes_except(&named.keys().cloned().collect());
        for (hex, x) in &st.nodes {
            let l = &named[hex];
            m.name_node(hex, l);
            let [a, b, c] = [l[0].as_str(), l[1].as_str(), l[2].as_str()];
            m.audit_score.with_label_values(&[a, b, c]).set(x.audit.score());
            m.uptime
                .with_label_values(&[a, b, c])
                .set(x.uptime.ratio(st.last_tick_ms.unwrap_or(0)));
            let current = state_label(x.standing, x.up);
            for s in crate::metrics::NODE_STATES {
                m.node_state.with_label_values(&[a, b, c, s]).set(i64::from(s == current));
            }
            for r in ["pass", "fail"] {
                m.node_audits.with_label_values(&[a, b, c, r]);
            }
        }
        drop(st);
        // Rewards: the ledger's totals, and the last closed epoch's, of every current member
        // (a node that left keeps its share in its farm's total).
        let (by_node, by_farm, last_epoch, last) = {
            let l = self.ledger.lock().unwrap();
            let last_epoch = l.last_epoch();
            let mut last: BTreeMap<String, crate::ledger::Totals> = BTreeMap::new();
            for e in l.entries().iter().rev().take_while(|e| Some(e.epoch) == last_epoch) {
                let t = last.entry(e.reward.node.clone()).or_default();
                t.rw1 = t.rw1.saturating_add(e.reward.rw1);
                t.rw2 = t.rw2.saturating_add(e.reward.rw2);
                t.epochs += 1;
            }
            (l.by_node(), l.by_farm(), last_epoch, last)
        };
        if let Some(e) = last_epoch {
            m.last_epoch.set(i64::try_from(e).unwrap_or(i64::MAX));
        }
        for (hex, l) in &named {
            let [a, b, c] = [l[0].as_str(), l[1].as_str(), l[2].as_str()];
            for (gauge, totals) in [(&m.rewards, &by_node), (&m.epoch_rewards, &last)] {
                // Zero until the node earns: its row of the earnings table is never empty.
                let t = totals.get(hex).cloned().unwrap_or_default();
                gauge.with_label_values(&[a, b, c, "rw1"]).set(saturating_sum([t.rw1]));
                gauge.with_label_values(&[a, b, c, "rw2"]).set(saturating_sum([t.rw2]));
            }
        }
        for (farm, t) in by_farm {
            m.farm_rewards.with_label_values(&[&farm]).set(saturating_sum([t.rw1, t.rw2]));
        }
    }

    /// Records an audit result (the auditor calls this).
    /// What the sync checker has to do: the current layout's version, the fallback layout
    /// (the data's sources), and each node that says it repaired for the current layout but
    /// was not checked yet, with the slots it gained. Public for simulations and tests.
    pub fn sync_work(&self) -> SyncWork {
        let st = self.state.lock().unwrap();
        let Some(l) = &st.layout else { return SyncWork::default() };
        let nodes = st
            .nodes
            .values()
            .filter(|m| m.up && m.standing != Standing::Disqualified)
            .filter(|m| m.synced_version >= l.version && m.verified_version < l.version)
            .map(|m| (m.id, st.gained(&m.id)))
            .collect();
        SyncWork { version: l.version, previous: st.previous.clone(), nodes }
    }

    /// The outcome of checking that `node` holds what it gained in layout `version`: a pass
    /// lets its report of sync count (if `version` is still current); a failure is a failed
    /// audit — it said it had repaired and did not hold what it was asked for. Called by the
    /// auditor; public for simulations.
    pub fn record_sync_check(&self, node: &NodeId, version: u64, passed: bool) {
        if !passed {
            self.record_audit(node, false);
            self.metrics.sync_checks.with_label_values(&["fail"]).inc();
            return;
        }
        self.metrics.sync_checks.with_label_values(&["pass"]).inc();
        let mut st = self.state.lock().unwrap();
        if st.layout.as_ref().is_some_and(|l| l.version == version)
            && let Some(m) = st.nodes.get_mut(&node.to_hex())
        {
            m.verified_version = m.verified_version.max(version);
        }
        drop(st);
        self.wake.notify_one();
    }

    fn record_audit(&self, node: &NodeId, passed: bool) {
        let mut st = self.state.lock().unwrap();
        let cfg = &self.config.reputation;
        let now = st.last_tick_ms.unwrap_or(0);
        let result = if passed { "pass" } else { "fail" };
        if let Some(m) = st.nodes.get_mut(&node.to_hex()) {
            let l = m.metric_labels();
            self.metrics.node_audits.with_label_values(&[&l[0], &l[1], &l[2], result]).inc();
            m.audit.record(passed, cfg);
            m.epoch_total += 1;
            if passed {
                m.audits_passed += 1;
                m.epoch_passed += 1;
            } else {
                m.audits_failed += 1;
            }
            let judged = economics::judge(m.standing, &m.audit, m.uptime.ratio(now), cfg);
            if judged != m.standing {
                tracing::warn!(node = %m.id, from = m.standing.as_str(), to = judged.as_str(), score = m.audit.score(), "standing changed");
                m.standing = judged;
                st.dirty = true;
            }
        }
        self.metrics.audits.with_label_values(&[result]).inc();
    }

    /// Runs housekeeping (on a timer, and at once after a join) and audits (on their own
    /// timer, so a slow audit round never delays a layout) until `stop`. Housekeeping runs on
    /// the blocking pool: placement and the state write never hold up request handlers.
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let tick = Duration::from_millis((self.config.heartbeat_ms / 2).clamp(100, 1000));
        let audit_every = Duration::from_millis(self.config.audit_interval_ms.max(100));
        let auditor = Arc::new(auditor::Auditor::new(self.clone()));
        let (audit_stop, a) = (stop.clone(), auditor.clone());
        let audits = tokio::spawn(async move {
            let mut next = tokio::time::interval(audit_every);
            next.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            next.tick().await;
            loop {
                tokio::select! {
                    _ = audit_stop.cancelled() => break,
                    _ = next.tick() => a.round().await,
                }
            }
        });
        // Sync checks on their own task: a slow one never delays the audits, nor they it.
        let sync_stop = stop.clone();
        let sync_checks = tokio::spawn(async move {
            let mut next = tokio::time::interval(tick);
            next.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = sync_stop.cancelled() => break,
                    _ = next.tick() => auditor.verify_sync(audit_every).await,
                }
            }
        });
        let mut last_step = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
                _ = self.wake.notified() => {}
            }
            // A coordinator that did not run for a while (SIGSTOPped, a VM paused, a node
            // starved) heard nobody meanwhile: that silence is its own, not the members'. As
            // after a restart, the grace period of everyone it had up runs from now, so no
            // layout is recomputed from a view that went stale while it was away.
            let gap = last_step.elapsed();
            last_step = std::time::Instant::now();
            if gap > PAUSE_FLOOR.max(Duration::from_millis(self.config.grace_ms / 2)) {
                self.presume_up_after_pause(gap, shardfarm_core::auth::now_ms());
            }
            let me = self.clone();
            let step = tokio::task::spawn_blocking(move || me.tick(shardfarm_core::auth::now_ms()));
            if let Err(e) = step.await {
                tracing::error!(error = %e, "housekeeping step failed");
            }
        }
        let _ = audits.await;
        let _ = sync_checks.await;
        let _ = self.persist();
    }
}

/// The `state` label of a node's standing and up/down in `shardfarm_coordinator_nodes` and
/// `shardfarm_coordinator_node_state`.
fn state_label(s: Standing, up: bool) -> String {
    if up { s.as_str().to_string() } else { format!("{}_down", s.as_str()) }
}

/// The shortest stall of the housekeeping loop taken for a pause of the coordinator (beside
/// half the grace period): well above any step's own duration under load, so a slow step on a
/// busy machine never excuses a node that really went silent.
const PAUSE_FLOOR: Duration = Duration::from_secs(5);

/// Labels the operator reads to find a farm's agents: kept only on nodes a farm vouches for.
const RESERVED_LABELS: &[&str] = &["farm", "pod"];

/// Most labels a node may send, and the longest key or value (a Kubernetes label's bounds).
const MAX_LABELS: usize = 16;
const MAX_LABEL_LEN: usize = 63;

/// Refuses label sets a stranger could use to bloat the state or the metrics.
fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), Refusal> {
    if labels.len() > MAX_LABELS {
        return Err(Refusal::InvalidArgument(format!(
            "{} labels sent; at most {MAX_LABELS} are accepted",
            labels.len()
        )));
    }
    let fine = |s: &str| {
        s.len() <= MAX_LABEL_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    };
    for (k, v) in labels {
        if k.is_empty() || !fine(k) || !fine(v) {
            return Err(Refusal::InvalidArgument(format!(
                "label `{}={}` refused: keys (1-{MAX_LABEL_LEN} characters) and values \
                 (0-{MAX_LABEL_LEN}) are letters, digits and - _ . /",
                k.escape_debug(),
                v.escape_debug()
            )));
        }
    }
    Ok(())
}

/// Every node a published layout (or its fallback) gives a slot.
fn named_ids(l: &PublishedLayout) -> BTreeSet<NodeId> {
    l.layout
        .partitions
        .iter()
        .chain(l.previous.iter().flat_map(|p| &p.partitions))
        .flatten()
        .copied()
        .collect()
}
