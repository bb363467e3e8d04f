//! Membership and repair: joining the pool, heartbeats, following layouts, and the
//! [`RepairWorker`] that makes this node hold exactly what the layout says it holds.
//!
//! # Why repair is decentralised
//! Nobody ships a node "your missing shards": each node knows, from the published layout, the
//! (partition, slot) pairs it holds, and asks the other holders of each partition — in the
//! current and the previous layout — what they hold there. Every segment some peer lists and
//! this node lacks is repaired, in order of preference:
//! 1. **copy** the shard itself from a peer that has it (the slot's previous holder, after a
//!    rebalance): one read, no decode;
//! 2. **rebuild** it from any `k` other shards of the segment (after a node was lost): fetch,
//!    verify each against the uploader-signed header, decode, re-encode the slot.
//!
//! Either way the bytes are checked against the signed Merkle root before they are stored, so
//! a lying peer can waste bandwidth but cannot plant data. When a pass completes with nothing
//! left to do, the node reports the layout version as synced; the coordinator publishes the
//! previous layout (the readers' fallback) until every holder has.
//!
//! **Handoff**: a shard this node stores for a slot it no longer holds is deleted only after
//! the slot's new holder lists it — so at every moment each shard is on its old holder, its
//! new holder, or both.
//!
//! The worker runs a pass whenever a new layout arrives and every `--repair-interval` otherwise
//! (which also rebuilds shards that scrub quarantined), throttled to `repair_rate` bytes/s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use shardfarm_core::audit::{ProvenLeaf, verify_answer};
use shardfarm_core::codec::Decoder;
use shardfarm_core::identity::NodeId;
use shardfarm_core::shard::{PartitionSummary, SegmentHeader, partition};
use shardfarm_proto::pb as proto;
use shardfarm_proto::{AgentClient, CoordinatorClient, PublishedLayout, Signer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::layouts::LayoutKeeper;
use crate::shard::{Node, Slots};
use crate::store::ShardId;

/// Entries per ListShards page.
const PAGE: u32 = 1000;
/// Partitions summarised per SummarizePartitions call (the agent's limit).
const MAX_SUMMARIES: usize = crate::shard::MAX_SUMMARIES;
/// Peers whose tombstones are copied per pass (a different few each pass).
const TOMBSTONE_PEERS: usize = 3;
/// Tombstones per ListTombstones page (the protocol's maximum).
const TOMBSTONE_PAGE: u32 = 1000;
/// How often each peer's tombstones are read from the start again rather than from where the
/// last pass stopped.
const TOMBSTONE_REREAD: Duration = Duration::from_secs(6 * 3600);
/// Pages read per peer and pass: bounds the work one peer's listing can cause.
const TOMBSTONE_PAGES: usize = 100;
/// How long a quarantined copy is kept for inspection once its slot was not stored here again
/// (repair rebuilds a quarantined slot on its next pass, so this is ample).
const QUARANTINE_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// Deadline of a small peer call (a listing page, an audit): a stalled peer costs this.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one shard fetch (a 64 MiB segment's shard is 16 MiB at k = 4).
const SHARD_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages of one partition's listing read from one peer (bounds what a peer can make us hold).
const MAX_LIST_PAGES: usize = 100;
/// Failed passes after which a slot's repair is given up as lost (not blocking sync).
const LOST_AFTER_FAILURES: u32 = 5;
/// Expiry scans every tombstone and the quarantine dir: at most this often, not every pass.
const EXPIRE_EVERY: Duration = Duration::from_secs(3600);
/// Leaves a new holder proves before a handoff deletes the old copy.
const HANDOFF_LEAVES: u32 = 4;
/// Wait between attempts to reach the coordinator.
const RETRY: Duration = Duration::from_secs(2);
/// A segment with fewer than k shards in the pool that was created this recently is being
/// written (its upload is still reaching its holders), not lost: it is neither counted nor
/// reported as lost, and does not hold back a sync. Past it, the segment is lost (and later
/// collected once older than the GC grace).
const WRITING_GRACE: Duration = Duration::from_secs(600);
/// First wait before a failed pass is retried; it doubles up to the pass interval.
const RETRY_FAILED_PASS: Duration = Duration::from_secs(2);

/// How this agent takes part in a pool.
#[derive(Clone, Debug)]
pub struct Membership {
    /// The coordinator's `host:port`.
    pub coordinator: String,
    /// The pool key's id: only layouts it signs are believed.
    pub pool: NodeId,
    /// The gRPC address peers and clients reach this node on.
    pub advertise_grpc: String,
    /// The HTTP (metrics) address.
    pub advertise_http: String,
    /// Repair write rate, bytes per second.
    pub repair_rate: u64,
    /// How old an unreadable segment must be before it is collected.
    pub gc_grace: Duration,
    /// A full repair pass runs at least this often, even without a new layout: it retries
    /// failed repairs, rebuilds what scrub quarantined, copies tombstones, collects garbage.
    pub pass_interval: Duration,
    /// TLS, or plaintext for debugging (`--insecure-plaintext`).
    pub security: shardfarm_proto::Security,
    /// The farm key that vouches for this agent (None: an outsider).
    pub farm_key: Option<Arc<shardfarm_core::identity::Identity>>,
}

/// How long a farm grant the agent issues itself is valid: a day, fresh at every join.
const GRANT_VALIDITY_S: u64 = 86_400;

/// Shared progress between the worker and the heartbeat.
#[derive(Default)]
struct Progress {
    synced: AtomicU64,
    backlog: AtomicU64,
    lost: AtomicU64,
    /// Peers whose repair sources did not verify, reported with the next heartbeat.
    suspects: std::sync::Mutex<BTreeSet<NodeId>>,
}

/// Joins the pool, then heartbeats, follows layouts and repairs until `stop`.
pub async fn run(
    node: Arc<Node>,
    m: Membership,
    keeper: Arc<LayoutKeeper>,
    stop: CancellationToken,
) {
    let signer = Arc::new(Signer::identity(&node.identity).with_security(m.security));
    let progress = Arc::new(Progress::default());
    // The last layout accepted before a restart is served (and repaired for) until a newer
    // one arrives: the coordinator may be unreachable, or may be recovering it from us.
    let (tx, rx) = watch::channel::<Option<Arc<PublishedLayout>>>(None);
    if let Some(l) = keeper.last() {
        install(&node, &l);
        tx.send_replace(Some(l));
    }
    let Some(heartbeat) = join_until_admitted(&node, &m, &signer, &keeper, &stop).await else {
        return;
    };
    let hb = tokio::spawn(heartbeats(
        node.clone(),
        m.clone(),
        signer.clone(),
        keeper.clone(),
        progress.clone(),
        heartbeat,
        stop.clone(),
    ));
    let watch = tokio::spawn(follow_layouts(
        node.clone(),
        m.clone(),
        signer.clone(),
        keeper,
        tx,
        stop.clone(),
    ));
    let worker = RepairWorker {
        node,
        signer,
        rate: m.repair_rate.max(1),
        gc_grace: m.gc_grace,
        pass_interval: m.pass_interval,
        progress,
        tombstone_cursors: Default::default(),
        tombstone_reread: std::sync::Mutex::new(Instant::now()),
        last_expiry: Default::default(),
        failures: Default::default(),
        partitions: Default::default(),
    };
    worker.run(rx, stop).await;
    let _ = hb.await;
    let _ = watch.await;
}

async fn join_once(
    node: &Arc<Node>,
    m: &Membership,
    signer: &Arc<Signer>,
    keeper: &LayoutKeeper,
) -> Result<proto::JoinResponse, String> {
    let mut c =
        CoordinatorClient::connect(&m.coordinator, signer.clone(), m.pool).await.map_err(|e| {
            let why = shardfarm_proto::tls::why(&e);
            format!("cannot reach the coordinator at {}: {why}", m.coordinator)
        })?;
    let ch = c.challenge().await.map_err(|s| s.message().to_string())?;
    let report = node
        .prove_capacity(ch.challenge.to_vec(), ch.difficulty)
        .await
        .map_err(|e| format!("capacity proof: {e}"))?;
    let req = proto::JoinRequest {
        grpc_address: m.advertise_grpc.clone(),
        http_address: m.advertise_http.clone(),
        labels: node.settings.labels.clone().into_iter().collect(),
        capacity_report: report.into(),
        last_layout: keeper.last().and_then(|l| l.signed.as_deref().cloned()),
        farm_grant: m
            .farm_key
            .as_ref()
            .map(|farm| {
                let now = shardfarm_core::auth::now_ms() / 1000;
                shardfarm_core::grant::FarmGrant::issue(
                    farm,
                    node.identity.public_key(),
                    m.pool,
                    now + GRANT_VALIDITY_S,
                )
                .to_bytes()
                .into()
            })
            .unwrap_or_default(),
    };
    let resp = c.join(req).await.map_err(|s| format!("join refused: {}", s.message()))?;
    if let Some(pool) = &resp.pool
        && pool.partitions != node.settings.partitions
    {
        return Err(format!(
            "the pool has {} partitions and this agent was started with --partitions {}",
            pool.partitions, node.settings.partitions
        ));
    }
    Ok(resp)
}

/// Joins, retrying until admitted or stopped; returns the heartbeat interval.
async fn join_until_admitted(
    node: &Arc<Node>,
    m: &Membership,
    signer: &Arc<Signer>,
    keeper: &LayoutKeeper,
    stop: &CancellationToken,
) -> Option<Duration> {
    loop {
        match join_once(node, m, signer, keeper).await {
            Ok(resp) => {
                let pool = resp.pool.unwrap_or_default();
                tracing::info!(
                    coordinator = %m.coordinator, pool = %pool.pool, standing = %resp.standing,
                    layout = resp.layout_version, "joined the pool"
                );
                return Some(Duration::from_millis(pool.heartbeat_ms.clamp(100, 60_000)));
            }
            Err(e) => tracing::warn!(error = %e, "not joined yet; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

async fn heartbeats(
    node: Arc<Node>,
    m: Membership,
    signer: Arc<Signer>,
    keeper: Arc<LayoutKeeper>,
    progress: Arc<Progress>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut client: Option<CoordinatorClient> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if client.is_none() {
            client = CoordinatorClient::connect(&m.coordinator, signer.clone(), m.pool).await.ok();
        }
        let Some(c) = client.as_mut() else { continue };
        let scrub_errors: u64 = node
            .metrics
            .corrupt_shards
            .collect()
            .iter()
            .flat_map(|f| f.get_metric().iter().map(|x| x.get_counter().get_value() as u64))
            .sum();
        let req = proto::ReportRequest {
            used_bytes: node.store.used_bytes(),
            shards: node.store.shard_count(),
            scrub_errors,
            repair_backlog: progress.backlog.load(Ordering::Relaxed),
            synced_version: progress.synced.load(Ordering::Relaxed),
            lost_segments: progress.lost.load(Ordering::Relaxed),
            suspect_peers: std::mem::take(&mut *progress.suspects.lock().unwrap())
                .into_iter()
                .map(|id| id.0.to_vec().into())
                .collect(),
        };
        match c.report(req).await {
            Ok(r) if r.standing != "active" => {
                tracing::warn!(standing = %r.standing, "the pool reports this node's standing")
            }
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {
                tracing::warn!("the coordinator does not know this node; joining again");
                if let Err(e) = join_once(&node, &m, &signer, &keeper).await {
                    tracing::warn!(error = %e, "rejoin failed");
                }
            }
            Err(s) => {
                tracing::warn!(error = %s, "heartbeat failed");
                client = None;
            }
        }
    }
}

/// Makes `l` the layout this node serves and repairs for.
fn install(node: &Node, l: &PublishedLayout) {
    node.metrics.layout_version.set(l.layout.version as i64);
    // Every peer's listing failures start at zero, so dashboards see 0 rather than no data.
    let me = node.identity.id();
    for id in l.addresses.keys().filter(|id| **id != me) {
        node.metrics.listing_failures.with_label_values(&[&id.short()]);
    }
    node.set_slots(Slots::Known { current: l.layout.clone(), previous: l.previous.clone() });
}

async fn follow_layouts(
    node: Arc<Node>,
    m: Membership,
    signer: Arc<Signer>,
    keeper: Arc<LayoutKeeper>,
    tx: watch::Sender<Option<Arc<PublishedLayout>>>,
    stop: CancellationToken,
) {
    loop {
        let r = async {
            let mut c = CoordinatorClient::connect(&m.coordinator, signer.clone(), m.pool)
                .await
                .map_err(|e| e.to_string())?;
            let mut stream = c.watch_layout().await.map_err(|s| s.to_string())?;
            while let Some(msg) = stream.message().await.map_err(|s| s.to_string())? {
                // A refused publication is logged and counted by the keeper; the last good
                // layout stays in force.
                let Ok(Some(l)) = keeper.offer(&msg, &m.coordinator) else { continue };
                install(&node, &l);
                tracing::info!(version = l.layout.version, sequence = l.sequence, previous = ?l.previous.as_ref().map(|p| p.version), "layout received");
                tx.send_replace(Some(l));
            }
            Ok::<_, String>(())
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = r => if let Err(e) = r { tracing::warn!(error = %e, "layout stream broke; reconnecting") },
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

// ---- The repair worker ----

/// Makes this node hold exactly the shards its slots call for.
pub struct RepairWorker {
    node: Arc<Node>,
    signer: Arc<Signer>,
    /// Bytes per second.
    rate: u64,
    /// Age before an unreadable segment is collected.
    gc_grace: Duration,
    /// Longest wait between passes.
    pass_interval: Duration,
    progress: Arc<Progress>,
    /// Where each peer's tombstone listing resumes.
    /// Per peer: its tombstone log id and the arrival number read up to.
    tombstone_cursors: std::sync::Mutex<HashMap<NodeId, (u64, u64)>>,
    /// When the cursors were last cleared (see [`TOMBSTONE_REREAD`]).
    tombstone_reread: std::sync::Mutex<Instant>,
    /// When tombstones and quarantine were last expired.
    last_expiry: std::sync::Mutex<Option<Instant>>,
    /// Passes each (object, segment, slot) has failed in a row.
    failures: std::sync::Mutex<HashMap<SlotKey, u32>>,
    /// What the passes for the current layout proved of each partition this node holds.
    partitions: std::sync::Mutex<PartitionProof>,
}

/// What is known of each partition this node holds in one layout version. A partition whose
/// holders did not all list it keeps what the last complete listing found; one never listed
/// completely for this version counts each of its slots as one shard to repair. So the
/// backlog a node reports never falls because its peers stopped answering.
#[derive(Default)]
struct PartitionProof {
    version: u64,
    /// Shards missing here, by partition, as of its last complete listing.
    missing: BTreeMap<u32, u64>,
    /// When each partition was last listed by every holder with nothing left to repair (Unix
    /// ms), for this version.
    proven_ms: BTreeMap<u32, u64>,
    /// When this node started repairing for this version (Unix ms): a partition not proven
    /// yet has been unproven since then.
    since_ms: u64,
}

/// Why one shard could not be repaired.
enum RepairError {
    /// Fewer than k verified shards exist among the holders that answered: waiting cannot
    /// help unless a holder that did not answer comes back. Does not block "synced".
    Lost(String),
    /// Anything else (a peer unreachable, a write failed): retried next pass, blocks "synced".
    Failed(String),
    /// Fewer than k shards exist, but the segment is younger than [`WRITING_GRACE`]: its
    /// upload is in progress. Neither lost nor a failure.
    Writing,
}

impl std::fmt::Display for RepairError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepairError::Lost(m) => write!(f, "segment is lost: {m}"),
            RepairError::Failed(m) => f.write_str(m),
            RepairError::Writing => f.write_str("the segment is still being written"),
        }
    }
}

/// `d` scaled by a random factor in [0.75, 1.25).
fn jitter(d: Duration) -> Duration {
    let mut r = [0u8; 2];
    getrandom::fill(&mut r).expect("OS randomness");
    let f = 0.75 + f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX) / 2.0;
    d.mul_f64(f)
}

/// One slot of one segment: (object, segment, slot).
type SlotKey = ([u8; 32], u32, usize);

/// What one segment's shards look like across the peers: shard index → nodes that list it.
type Holders = BTreeMap<u32, Vec<NodeId>>;

/// What one pass did.
#[derive(Debug, Default)]
struct PassReport {
    missing: u64,
    repaired: u64,
    failed: u64,
    lost: u64,
    collected: u64,
    handed_off: u64,
    interrupted: bool,
    /// Segments with fewer than k shards that are still being written (not lost).
    writing: u64,
    /// Listings a holder of the current layout did not answer (unreachable, refused): the pass
    /// did not see the whole partition, so it proves nothing and is not a sync.
    unlisted: u64,
}

impl RepairWorker {
    async fn run(
        self,
        mut rx: watch::Receiver<Option<Arc<PublishedLayout>>>,
        stop: CancellationToken,
    ) {
        // A failed pass is retried sooner than a clean one, backing off to the pass interval.
        let mut retry: Option<Duration> = None;
        loop {
            // Jittered (±25 %) so the agents of a pool do not all pass at once.
            let wait = retry.unwrap_or_else(|| jitter(self.pass_interval));
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
            let Some(published) = rx.borrow_and_update().clone() else { continue };
            let version = published.layout.version;
            let start = Instant::now();
            let report = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.pass(&published, &rx) => r,
            };
            self.node.metrics.repair_pass_seconds.observe(start.elapsed().as_secs_f64());
            if report.missing > 0
                || report.handed_off > 0
                || report.failed > 0
                || report.unlisted > 0
            {
                tracing::info!(
                    version,
                    missing = report.missing,
                    repaired = report.repaired,
                    failed = report.failed,
                    lost = report.lost,
                    writing = report.writing,
                    collected = report.collected,
                    handed_off = report.handed_off,
                    unlisted = report.unlisted,
                    seconds = format!("{:.1}", start.elapsed().as_secs_f64()),
                    "repair pass"
                );
            }
            // Synced means everything repairable is repaired: lost segments are reported (metric,
            // heartbeat, `stat` says LOST) but do not hold the layout back forever.
            self.progress.lost.store(report.lost, Ordering::Relaxed);
            self.node.metrics.lost_segments.set(report.lost as i64);
            self.node.metrics.segments_being_written.set(report.writing as i64);
            // Synced only when proven: every holder of the current layout listed every
            // partition this node holds, and nothing repairable is left. A pass whose peers
            // refused or failed their listings is a failed pass, never a clean one.
            let clean = !report.interrupted && report.failed == 0 && report.unlisted == 0;
            if clean {
                self.progress.synced.fetch_max(version, Ordering::Relaxed);
                self.node
                    .metrics
                    .synced_version
                    .set(self.progress.synced.load(Ordering::Relaxed) as i64);
                retry = None;
            } else if !report.interrupted {
                self.node.metrics.repair_passes_failed.inc();
                let next = retry.map_or(RETRY_FAILED_PASS, |d| d * 2);
                retry = Some(next.min(self.pass_interval));
            }
        }
    }

    async fn client<'a>(
        &self,
        clients: &'a mut HashMap<NodeId, Option<AgentClient>>,
        published: &PublishedLayout,
        id: &NodeId,
    ) -> Option<&'a mut AgentClient> {
        if !clients.contains_key(id) {
            let c = match published.address(id) {
                Some(addr) => AgentClient::connect(addr, *id, self.signer.clone()).await.ok(),
                None => None,
            };
            clients.insert(*id, c);
        }
        clients.get_mut(id).and_then(Option::as_mut)
    }

    /// Lists everything `peer` holds in partition `p`.
    /// Lists a peer's shards of partition `p`, page by page. A peer that lists a shard index
    /// no segment of this pool has (`n` shards per segment) is lying: its listing is refused
    /// at once rather than paged through (an endless member would otherwise cost every
    /// co-holder [`MAX_LIST_PAGES`] pages per partition and pass).
    async fn list_all(
        client: &mut AgentClient,
        p: u32,
        n: usize,
    ) -> Result<Vec<ShardId>, tonic::Status> {
        let mut out = Vec::new();
        let mut after = None;
        for _ in 0..MAX_LIST_PAGES {
            let page = tokio::time::timeout(CALL_TIMEOUT, client.list_shards(p, after, PAGE))
                .await
                .map_err(|_| tonic::Status::deadline_exceeded("listing timed out"))??;
            let full = page.len() == PAGE as usize;
            for e in page {
                if let Some(k) = e.key {
                    let id = ShardId::try_from(k)?;
                    if id.shard as usize >= n {
                        return Err(tonic::Status::out_of_range(format!(
                            "the peer listed shard {} of a segment; this pool has {n} per segment",
                            id.shard
                        )));
                    }
                    out.push(id);
                }
            }
            match (full, out.last()) {
                (true, Some(last)) => after = Some(*last),
                _ => return Ok(out),
            }
        }
        // Cut off: what it did not list is unknown, so this is no listing at all (a partial
        // one would make shards past the cut look missing: collected, or "proven" absent).
        Err(tonic::Status::resource_exhausted(format!(
            "the peer listed more than {MAX_LIST_PAGES} pages of partition {p}: not a complete listing"
        )))
    }

    async fn list_local(&self, p: u32) -> Vec<ShardId> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let Ok(page) = self.node.list(p, after, PAGE as usize).await else { return out };
            let full = page.len() == PAGE as usize;
            out.extend(page.into_iter().map(|(id, _)| id));
            match (full, out.last()) {
                (true, Some(last)) => after = Some(*last),
                _ => return out,
            }
        }
    }

    /// Copies the tombstones this node lacks from a few peers and applies them, so a holder
    /// that was down during an `rm` deletes the object when it returns instead of handing
    /// it back. Bounded: at most [`TOMBSTONE_PAGES`] pages per peer and pass; each pass
    /// resumes where the last one stopped with that peer.
    async fn sync_tombstones(
        &self,
        clients: &mut HashMap<NodeId, Option<AgentClient>>,
        published: &PublishedLayout,
    ) {
        let me = self.node.identity.id();
        let mut peers: Vec<NodeId> =
            published.addresses.keys().filter(|id| **id != me).copied().collect();
        if peers.is_empty() {
            return;
        }
        // A different few peers each pass.
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("OS randomness");
        let turn = u64::from_le_bytes(r) as usize % peers.len();
        peers.rotate_left(turn);
        for peer in peers.iter().take(TOMBSTONE_PEERS) {
            let Some(c) = self.client(clients, published, peer).await else { continue };
            // Each pass asks only for what arrived at the peer since the last one: a quiet
            // pool's sync is one empty page per peer. A peer whose log changed (a new store)
            // is read from its start.
            // Every TOMBSTONE_REREAD each peer is read from its start again: a tombstone this
            // node did not keep when offered (it held nothing of the object yet, its clock was
            // behind) is offered once more.
            {
                let mut last = self.tombstone_reread.lock().unwrap();
                if last.elapsed() >= TOMBSTONE_REREAD {
                    *last = Instant::now();
                    self.tombstone_cursors.lock().unwrap().clear();
                }
            }
            let (mut log, mut after) =
                self.tombstone_cursors.lock().unwrap().get(peer).copied().unwrap_or((0, 0));
            for _ in 0..TOMBSTONE_PAGES {
                let call = c.list_tombstones(after, TOMBSTONE_PAGE);
                let Ok(Ok(page)) = tokio::time::timeout(CALL_TIMEOUT, call).await else { break };
                if page.log != log {
                    let restart = after != 0;
                    (log, after) = (page.log, 0);
                    if restart {
                        continue;
                    }
                }
                let full = page.tombstones.len() >= TOMBSTONE_PAGE as usize;
                for t in page.tombstones {
                    let Some(id) = t.get(4..36).and_then(|b| <[u8; 32]>::try_from(b).ok()) else {
                        continue;
                    };
                    if self.node.is_deleted(&id) {
                        continue;
                    }
                    match self.node.delete_object(t.to_vec(), None).await {
                        Ok(n) => self
                            .node
                            .metrics
                            .collected
                            .with_label_values(&["tombstone"])
                            .inc_by(u64::from(n)),
                        Err(e) => {
                            tracing::warn!(peer = %peer.short(), error = %e, "peer listed a tombstone that does not verify")
                        }
                    }
                }
                // A peer whose arrival numbers do not move on (an older version that pages by
                // object id, or one that lies) gets one page per pass.
                let moved = page.last > after;
                after = page.last;
                if !full || !moved {
                    break;
                }
            }
            self.tombstone_cursors.lock().unwrap().insert(*peer, (log, after));
        }
    }

    /// Forgets expired tombstones and frees quarantined copies older than
    /// [`QUARANTINE_KEEP`] (their slot has long been rebuilt, here or elsewhere).
    async fn expire(&self) {
        let node = self.node.clone();
        let r = tokio::task::spawn_blocking(move || {
            let t = node.store.expire_tombstones(shardfarm_core::auth::now_ms())?;
            let q = node.store.expire_quarantine(QUARANTINE_KEEP)?;
            Ok::<_, crate::store::StoreError>((t, q))
        })
        .await;
        match r {
            Ok(Ok((t, q))) if t + q > 0 => {
                tracing::info!(tombstones = t, quarantined = q, "expired")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "expiry failed"),
            _ => {}
        }
        self.node.metrics.tombstones.set(self.node.store.tombstone_count() as i64);
    }

    async fn pass(
        &self,
        published: &PublishedLayout,
        rx: &watch::Receiver<Option<Arc<PublishedLayout>>>,
    ) -> PassReport {
        let me = self.node.identity.id();
        let layout = &published.layout;
        let mut report = PassReport::default();
        let mut clients: HashMap<NodeId, Option<AgentClient>> = HashMap::new();
        // ---- Tombstones first: nothing deleted is rebuilt or handed back ----
        self.sync_tombstones(&mut clients, published).await;
        if self.last_expiry.lock().unwrap().is_none_or(|t| t.elapsed() >= EXPIRE_EVERY) {
            *self.last_expiry.lock().unwrap() = Some(Instant::now());
            self.expire().await;
        }
        let mut mine: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (p, s) in layout.slots_of(&me) {
            mine.entry(p).or_default().push(s);
        }
        let started = Instant::now();
        let mut written = 0u64;
        let now_s = shardfarm_core::auth::now_ms() / 1000;
        {
            let mut proof = self.partitions.lock().unwrap();
            if proof.version != layout.version {
                *proof = PartitionProof {
                    version: layout.version,
                    since_ms: shardfarm_core::auth::now_ms(),
                    ..Default::default()
                };
            }
            proof.missing.retain(|p, _| mine.contains_key(p));
            proof.proven_ms.retain(|p, _| mine.contains_key(p));
            // Until listed, a slot this node gained from the fallback layout is one shard to
            // repair per segment nobody has listed yet: counted as one, never as none.
            for (p, slots) in &mine {
                let before: BTreeSet<usize> = published
                    .previous
                    .as_ref()
                    .and_then(|prev| prev.partitions.get(*p as usize))
                    .map(|h| h.iter().enumerate().filter(|(_, n)| **n == me).map(|(s, _)| s))
                    .into_iter()
                    .flatten()
                    .collect();
                let gained = slots.iter().filter(|s| !before.contains(s)).count() as u64;
                proof.missing.entry(*p).or_insert(gained);
            }
            self.publish_backlog(&proof);
        }
        // Partitions some current holder did not list, or with a repair that failed.
        let mut unproven: BTreeSet<u32> = BTreeSet::new();
        // Peers that did not answer a listing in this pass.
        let mut silent: BTreeSet<NodeId> = BTreeSet::new();
        // ---- Summaries: one call per peer, covering every partition shared with it ----
        let holders_of = |p: u32| -> BTreeSet<NodeId> {
            let mut peers: BTreeSet<NodeId> =
                layout.partitions[p as usize].iter().copied().collect();
            if let Some(prev) = &published.previous
                && let Some(h) = prev.partitions.get(p as usize)
            {
                peers.extend(h.iter().copied());
            }
            peers.remove(&me);
            peers
        };
        let mut shared: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for &p in mine.keys() {
            for peer in holders_of(p) {
                shared.entry(peer).or_default().push(p);
            }
        }
        let mut theirs: HashMap<(NodeId, u32), PartitionSummary> = HashMap::new();
        for (peer, parts) in &shared {
            for chunk in parts.chunks(MAX_SUMMARIES) {
                let answer = match self.client(&mut clients, published, peer).await {
                    Some(c) => tokio::time::timeout(CALL_TIMEOUT, c.summarize_partitions(chunk))
                        .await
                        .ok()
                        .and_then(Result::ok),
                    None => None,
                };
                // A peer that does not summarise (an older version, a slow first scan) is
                // listed instead: its listing decides whether it answered.
                let Some(list) = answer else { break };
                theirs.extend(chunk.iter().zip(list).map(|(p, s)| ((*peer, *p), s)));
            }
        }
        let ours: HashMap<u32, PartitionSummary> = {
            let all: Vec<u32> = (0..layout.partitions.len() as u32).collect();
            match self.node.summaries(all.clone()).await {
                Ok(s) => all.into_iter().zip(s).collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "local summaries failed; listing every partition");
                    HashMap::new()
                }
            }
        };
        // ---- Repair: every slot this node holds ----
        let mut backlog: Vec<(u32, [u8; 32], u32, usize, Holders, bool)> = Vec::new();
        for (&p, slots) in &mine {
            let peers = holders_of(p);
            // Quiet: every holder (current and fallback) answered with this node's segments,
            // and every current holder, this one included, holds exactly its slots of each.
            // Then every segment has all n shards: nothing to repair, nothing to collect, and
            // the partition is proven without listing it.
            let agreed = ours.get(&p).is_some_and(|mine_now| {
                mine_now.holds_exactly(slots)
                    && peers.iter().all(|peer| {
                        let Some(s) = theirs.get(&(*peer, p)) else { return false };
                        let current: Vec<usize> = layout.partitions[p as usize]
                            .iter()
                            .enumerate()
                            .filter(|(_, h)| *h == peer)
                            .map(|(slot, _)| slot)
                            .collect();
                        s.digest == mine_now.digest
                            && s.segments == mine_now.segments
                            && (current.is_empty() || s.holds_exactly(&current))
                    })
            });
            if agreed {
                self.node.metrics.partitions_compared.with_label_values(&["agreed"]).inc();
                self.partitions.lock().unwrap().missing.insert(p, 0);
                continue;
            }
            self.node.metrics.partitions_compared.with_label_values(&["listed"]).inc();
            let mut segments: BTreeMap<([u8; 32], u32), Holders> = BTreeMap::new();
            // Whether every holder of the partition (current and fallback) answered: only
            // then can a segment be called lost or collected.
            let mut all_answered = true;
            // Whether every holder of the current layout did: only then is what this node
            // holds of the partition proven.
            let mut complete = true;
            for peer in &peers {
                // A peer that failed a listing this pass is not asked again until the next
                // one: a stalled peer costs one deadline per pass, not one per partition.
                let listed = match silent.contains(peer) {
                    true => None,
                    false => match self.client(&mut clients, published, peer).await {
                        Some(c) => {
                            Self::list_all(c, p, layout.partitions[p as usize].len()).await.ok()
                        }
                        None => None,
                    },
                };
                if listed.is_none() {
                    silent.insert(*peer);
                }
                let Some(list) = listed else {
                    all_answered = false;
                    // A holder of the current layout that did not list: what this node holds
                    // of the partition is unproven. A holder only of the fallback layout is
                    // being replaced (often because it is gone) and is not needed.
                    if layout.partitions[p as usize].contains(peer) {
                        complete = false;
                        report.unlisted += 1;
                        self.node
                            .metrics
                            .listing_failures
                            .with_label_values(&[&peer.short()])
                            .inc();
                    }
                    continue;
                };
                for id in list {
                    // A peer may list anything: only ids of this partition count.
                    if partition(&id.object_id, id.segment, self.node.settings.partitions) != p {
                        continue;
                    }
                    segments
                        .entry((id.object_id, id.segment))
                        .or_default()
                        .entry(id.shard)
                        .or_default()
                        .push(*peer);
                }
            }
            let local: BTreeSet<ShardId> = self.list_local(p).await.into_iter().collect();
            let before = backlog.len();
            for ((obj, seg), holders) in &segments {
                if self.node.is_deleted(obj) {
                    continue;
                }
                for &s in slots {
                    let id = ShardId { object_id: *obj, segment: *seg, shard: s as u32 };
                    if !local.contains(&id) {
                        backlog.push((p, *obj, *seg, s, holders.clone(), all_answered));
                    }
                }
            }
            let found = (backlog.len() - before) as u64;
            {
                let mut proof = self.partitions.lock().unwrap();
                let known = if complete {
                    found
                } else {
                    // Unproven: never less than the last complete listing found (or one per
                    // gained slot, if there was none), whatever this partial one saw.
                    let last = proof.missing.get(&p).copied().unwrap_or(0);
                    last.max(found)
                };
                proof.missing.insert(p, known);
                if !complete {
                    unproven.insert(p);
                }
            }
            // ---- Garbage: local shards of segments that never became readable ----
            // Only while no fallback layout is published (no move in flight whose holders are
            // out of sight) and with every holder answering.
            if all_answered && published.previous.is_none() {
                let mut local_by_segment: BTreeMap<([u8; 32], u32), BTreeSet<u32>> =
                    BTreeMap::new();
                for id in &local {
                    local_by_segment
                        .entry((id.object_id, id.segment))
                        .or_default()
                        .insert(id.shard);
                }
                for id in &local {
                    let listed = segments.get(&(id.object_id, id.segment));
                    let mut present: BTreeSet<u32> =
                        listed.map(|h| h.keys().copied().collect()).unwrap_or_default();
                    present.extend(&local_by_segment[&(id.object_id, id.segment)]);
                    if self.collectible(id, p, present.len(), now_s)
                        && self.node.hand_off(*id).await.is_ok()
                    {
                        report.collected += 1;
                        self.node
                            .metrics
                            .collected
                            .with_label_values(&["unreadable_segment"])
                            .inc();
                        tracing::info!(shard = %id.file_name(), shards_in_pool = present.len(), "collected a shard of a segment that never became readable");
                    }
                }
            }
        }
        report.missing = backlog.len() as u64;
        // The backlog reported is what is known missing, partitions whose listing failed
        // included at their last known figure.
        self.publish_backlog(&self.partitions.lock().unwrap());
        let mut lost_segments: BTreeSet<([u8; 32], u32)> = BTreeSet::new();
        let mut writing: BTreeSet<([u8; 32], u32)> = BTreeSet::new();
        for (p, obj, seg, slot, holders, all_answered) in backlog {
            if rx.has_changed().unwrap_or(false) {
                report.interrupted = true;
                return report;
            }
            let r = self.repair_one(&mut clients, published, obj, seg, slot, &holders).await;
            match r {
                Ok((bytes, method)) => {
                    self.failures.lock().unwrap().remove(&(obj, seg, slot));
                    report.repaired += 1;
                    written += bytes;
                    self.node.metrics.repaired.with_label_values(&[method]).inc();
                    self.node.metrics.repair_bytes.inc_by(bytes);
                    self.repaired_in(p);
                    // Throttle: stay at or under `rate` bytes per second on average.
                    let due = Duration::from_secs_f64(written as f64 / self.rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
                Err(RepairError::Failed(why))
                    if self.failed_again((obj, seg, slot)) >= LOST_AFTER_FAILURES =>
                {
                    // A source that keeps failing (a listed shard nobody can serve, shards
                    // that verify but do not decode) cannot hold this node back forever.
                    if lost_segments.insert((obj, seg)) {
                        report.lost += 1;
                        tracing::warn!(partition = p, object = %hex::encode(&obj[..6]), segment = seg, reason = %why, "segment given up after repeated failed passes");
                    }
                }
                Err(RepairError::Writing) => {
                    // Not degraded: its upload is reaching the holders now.
                    if writing.insert((obj, seg)) {
                        report.writing += 1;
                    }
                    self.repaired_in(p);
                }
                Err(RepairError::Lost(why)) if all_answered => {
                    if lost_segments.insert((obj, seg)) {
                        report.lost += 1;
                        tracing::warn!(partition = p, object = %hex::encode(&obj[..6]), segment = seg, reason = %why, "segment is lost: fewer than k shards in the pool");
                    }
                }
                Err(e) => {
                    report.failed += 1;
                    unproven.insert(p);
                    self.node.metrics.repair_failures.inc();
                    tracing::warn!(partition = p, object = %hex::encode(&obj[..6]), segment = seg, slot, error = %e, "repair failed");
                }
            }
        }
        // ---- Proof: partitions every current holder listed, with nothing left undone ----
        {
            let now_ms = shardfarm_core::auth::now_ms();
            let mut proof = self.partitions.lock().unwrap();
            for p in mine.keys().filter(|p| !unproven.contains(p)) {
                proof.proven_ms.insert(*p, now_ms);
            }
            // The oldest proof among the partitions held; one not proven for this layout yet
            // counts from when the layout arrived.
            let oldest = mine
                .keys()
                .map(|p| proof.proven_ms.get(p).copied().unwrap_or(proof.since_ms))
                .min()
                .unwrap_or(now_ms);
            self.node.metrics.repair_proven_timestamp.set(oldest as f64 / 1000.0);
        }
        // ---- Handoff: shards of slots this node no longer holds ----
        // Deleted only once the new holder has *proven* it holds the same shard (an audit
        // with a nonce of ours against our own verified header), and only while this layout
        // is still the newest. A partition whose summary shows only slots this node holds
        // (or nothing) has nothing to hand off and is not listed.
        for p in 0..layout.partitions.len() as u32 {
            if let Some(s) = ours.get(&p) {
                let held: BTreeSet<usize> = mine.get(&p).into_iter().flatten().copied().collect();
                if s.held_indexes().all(|i| held.contains(&i)) {
                    continue;
                }
            }
            let local = self.list_local(p).await;
            for id in local {
                let Some(&holder) = layout.partitions[p as usize].get(id.shard as usize) else {
                    continue;
                };
                if holder == me {
                    continue;
                }
                if rx.has_changed().unwrap_or(false) {
                    report.interrupted = true;
                    return report;
                }
                if self.proven_by(&mut clients, published, &holder, id).await
                    && self.node.hand_off(id).await.is_ok()
                {
                    report.handed_off += 1;
                    self.node.metrics.handed_off.inc();
                }
            }
        }
        report
    }

    /// A local shard may be collected when, with every holder answering, fewer than k shards
    /// of its segment exist in the pool and the segment is older than the grace period.
    fn collectible(&self, id: &ShardId, p: u32, present: usize, now_s: u64) -> bool {
        let Ok(Some(bytes)) = self.node.store.header(id) else { return false };
        let Ok(h) = SegmentHeader::decode_unverified(&bytes) else { return false };
        let Ok(Some(record)) = self.node.store.record(id, p) else { return false };
        // The grace runs from when this node stored it (an upload may take longer than the
        // grace from the header's creation time).
        let since = h.created.max(record.stored_ms / 1000);
        present < usize::from(h.k) && since.saturating_add(self.gc_grace.as_secs()) <= now_s
    }

    /// One shard of partition `p` no longer to repair (rebuilt, or being written).
    fn repaired_in(&self, p: u32) {
        let mut proof = self.partitions.lock().unwrap();
        if let Some(n) = proof.missing.get_mut(&p) {
            *n = n.saturating_sub(1);
        }
        self.publish_backlog(&proof);
    }

    /// Reports the backlog: the sum of what each partition is known to miss (the one figure
    /// the heartbeat and the metric both show).
    fn publish_backlog(&self, proof: &PartitionProof) {
        let known: u64 = proof.missing.values().sum();
        self.progress.backlog.store(known, Ordering::Relaxed);
        self.node.metrics.repair_backlog.set(known as i64);
    }

    /// Counts one more failed pass for a slot; returns the count.
    fn failed_again(&self, key: SlotKey) -> u32 {
        let mut f = self.failures.lock().unwrap();
        if f.len() > 100_000 {
            f.clear();
        }
        let n = f.entry(key).or_default();
        *n += 1;
        *n
    }

    /// Whether `holder` proves it stores the same shard as ours: the leaves our nonce picks,
    /// with Merkle proofs up to the root in our verified copy of the header.
    async fn proven_by(
        &self,
        clients: &mut HashMap<NodeId, Option<AgentClient>>,
        published: &PublishedLayout,
        holder: &NodeId,
        id: ShardId,
    ) -> bool {
        let Ok(Some(bytes)) = self.node.store.header(&id) else { return false };
        let Ok(header) = SegmentHeader::decode(&bytes) else { return false };
        let Some(c) = self.client(clients, published, holder).await else { return false };
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).expect("OS randomness");
        let call = c.audit(id, &nonce, HANDOFF_LEAVES);
        let Ok(Ok(resp)) = tokio::time::timeout(CALL_TIMEOUT, call).await else { return false };
        let leaves: Vec<ProvenLeaf> = resp.leaves.into_iter().map(ProvenLeaf::from).collect();
        verify_answer(&header, id.shard as usize, &nonce, HANDOFF_LEAVES, &leaves).is_ok()
    }

    /// Counts and reports a peer whose repair source did not verify.
    fn bad_source(&self, peer: &NodeId, reason: &'static str, detail: &str) {
        self.node.metrics.bad_sources.with_label_values(&[reason]).inc();
        tracing::warn!(peer = %peer.short(), reason, detail, "refused a repair source");
        let mut s = self.progress.suspects.lock().unwrap();
        if s.len() < 64 {
            s.insert(*peer);
        }
    }

    /// Repairs one shard: copies it from a peer that has it, else rebuilds it from k others.
    /// Every source is checked against a header whose object id and signature verify.
    async fn repair_one(
        &self,
        clients: &mut HashMap<NodeId, Option<AgentClient>>,
        published: &PublishedLayout,
        obj: [u8; 32],
        seg: u32,
        slot: usize,
        holders: &Holders,
    ) -> Result<(u64, &'static str), RepairError> {
        let want = ShardId { object_id: obj, segment: seg, shard: slot as u32 };
        let mut unreachable = false;
        for src in holders.get(&(slot as u32)).into_iter().flatten() {
            let Some(c) = self.client(clients, published, src).await else {
                unreachable = true;
                continue;
            };
            let got = match tokio::time::timeout(SHARD_TIMEOUT, c.get_shard(want, 0, 0)).await {
                Ok(Ok(g)) => g,
                _ => {
                    unreachable = true;
                    continue;
                }
            };
            let Some(header) = self.check_source(src, &got.header, obj, seg) else { continue };
            if let Err(e) = header.verify_shard(slot, &got.data) {
                self.bad_source(src, "corrupt", &e.to_string());
                continue;
            }
            let n = got.data.len() as u64;
            self.store(got.header, slot, got.data).await.map_err(RepairError::Failed)?;
            return Ok((n, "copy"));
        }
        let mut header: Option<(SegmentHeader, Vec<u8>)> = None;
        let mut shards: Vec<Option<Vec<u8>>> = Vec::new();
        let mut have = 0;
        let mut failures = Vec::new();
        for (&idx, srcs) in holders {
            if idx as usize == slot {
                continue;
            }
            if let Some((h, _)) = &header
                && have >= usize::from(h.k)
            {
                break;
            }
            for src in srcs {
                let Some(c) = self.client(clients, published, src).await else {
                    unreachable = true;
                    continue;
                };
                let id = ShardId { object_id: obj, segment: seg, shard: idx };
                let got = match tokio::time::timeout(SHARD_TIMEOUT, c.get_shard(id, 0, 0)).await {
                    Ok(Ok(g)) => g,
                    Ok(Err(s)) => {
                        unreachable = true;
                        failures.push(format!("shard {idx}: {}", s.message()));
                        continue;
                    }
                    Err(_) => {
                        unreachable = true;
                        failures.push(format!("shard {idx}: {} did not answer", src.short()));
                        continue;
                    }
                };
                let Some(h) = self.check_source(src, &got.header, obj, seg) else { continue };
                if let Some((first, _)) = &header
                    && first.uploader != h.uploader
                {
                    continue;
                }
                if let Err(e) = h.verify_shard(idx as usize, &got.data) {
                    self.bad_source(src, "corrupt", &e.to_string());
                    failures.push(format!("shard {idx} from {} is corrupt", src.short()));
                    continue;
                }
                if header.is_none() {
                    shards = vec![None; h.n()];
                    header = Some((h, got.header));
                }
                if let Some(slot_ref) = shards.get_mut(idx as usize) {
                    *slot_ref = Some(got.data);
                    have += 1;
                }
                break;
            }
        }
        // Too few verified sources: lost, unless a source failed to answer (then retry).
        let short = |msg: String| {
            if unreachable { RepairError::Failed(msg) } else { RepairError::Lost(msg) }
        };
        let Some((h, header_bytes)) = header else {
            return Err(short(format!("no peer served a shard ({})", failures.join("; "))));
        };
        if have < usize::from(h.k) {
            // A segment this young is still being uploaded to its holders (by its header's
            // creation time; one dated further ahead than the grace is not believed).
            let now_s = shardfarm_core::auth::now_ms() / 1000;
            let grace = WRITING_GRACE.min(self.gc_grace).as_secs();
            if now_s < h.created.saturating_add(grace) && h.created <= now_s.saturating_add(grace) {
                return Err(RepairError::Writing);
            }
            return Err(short(format!(
                "have {have} shards, need {} ({})",
                h.k,
                failures.join("; ")
            )));
        }
        let rebuilt = tokio::task::spawn_blocking(move || {
            let refs: Vec<Option<&[u8]>> = shards.iter().map(|s| s.as_deref()).collect();
            Decoder::default().rebuild_shard(&h, &refs, slot).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| RepairError::Failed(e.to_string()))?
        .map_err(RepairError::Failed)?;
        let n = rebuilt.len() as u64;
        self.store(header_bytes, slot, rebuilt).await.map_err(RepairError::Failed)?;
        Ok((n, "rebuild"))
    }

    /// Decodes a peer's header for (`obj`, `seg`): its object id must derive from its signer
    /// and its signature verify. Anything else is counted against the peer.
    fn check_source(
        &self,
        src: &NodeId,
        bytes: &[u8],
        obj: [u8; 32],
        seg: u32,
    ) -> Option<SegmentHeader> {
        match SegmentHeader::decode(bytes) {
            Ok(h) if h.object_id == obj && h.segment_index == seg => Some(h),
            Ok(_) => {
                self.bad_source(src, "wrong_segment", "header names another segment");
                None
            }
            Err(e) => {
                self.bad_source(src, "forged_header", &e.to_string());
                None
            }
        }
    }

    async fn store(&self, header: Vec<u8>, slot: usize, data: Vec<u8>) -> Result<(), String> {
        let mut up = self.node.begin_repair(header, slot as u32).map_err(|e| e.to_string())?;
        if !data.is_empty() {
            up.write(bytes::Bytes::from(data)).await.map_err(|e| e.to_string())?;
        }
        up.finish().await.map(|_| ()).map_err(|e| e.to_string())
    }
}
