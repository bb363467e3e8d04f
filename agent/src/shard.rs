//! The agent's domain: what a node does with shards, independent of gRPC.
//!
//! Every operation that touches the store runs on tokio's blocking pool. Errors are the
//! domain's own [`Error`]; `grpc` maps them to statuses in one function.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use shardfarm_core::audit::{self, MAX_AUDIT_LEAVES, ProvenLeaf};
use shardfarm_core::auth::{AuthError, Caller, now_ms};
use shardfarm_core::capacity::{CapacityReport, Machine};
use shardfarm_core::identity::{Identity, NodeId};
use shardfarm_core::placement::Layout;
use shardfarm_core::shard::{SegmentHeader, partition};
use shardfarm_core::tombstone::Tombstone;

use crate::metrics::Metrics;
use crate::store::{
    Committed, PartitionSummary, PendingShard, ShardId, ShardRecord, Store, StoreError,
};

/// What can go wrong, by the kind of answer the caller should get.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or inconsistent with the signed header.
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller is authenticated but not allowed.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request could not be authenticated.
    #[error(transparent)]
    Unauthenticated(AuthError),
    /// Capacity or a node-wide limit exhausted.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller's owner root is past one of its own shares (uploads or upload bytes in
    /// flight, quota, tombstones, rate): `RESOURCE_EXHAUSTED` to the caller, and its
    /// connections are not read for a while (`shardfarm_proto::conns`).
    #[error("{0}")]
    OverShare(String),
    /// No such shard here.
    #[error("{0}")]
    NotFound(String),
    /// Another shard is stored under this key.
    #[error("{0}")]
    AlreadyExists(String),
    /// The stored shard is corrupt (it has been quarantined).
    #[error("{0}")]
    DataLoss(String),
    /// The request is valid but not here or not now: a slot this node does not hold, a
    /// deleted object.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A stream went quiet for longer than allowed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The node cannot answer this now (a read error that may pass, no layout yet): retry.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A background task failed.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "invalid_argument",
            Error::PermissionDenied(_) => "permission_denied",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::ResourceExhausted(_) | Error::OverShare(_) => "resource_exhausted",
            Error::NotFound(_) => "not_found",
            Error::AlreadyExists(_) => "already_exists",
            Error::DataLoss(_) => "data_loss",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::Unavailable(_) => "unavailable",
            Error::DeadlineExceeded(_) => "deadline_exceeded",
            Error::Store(e) if e.is_disk_full() => "resource_exhausted",
            Error::Store(StoreError::Deleted) => "failed_precondition",
            Error::Store(_) | Error::Internal(_) => "internal",
        }
    }
}

/// Result with the domain error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(e.to_string()))?
}

/// Node settings the domain needs.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// Partitions of the pool.
    pub partitions: u32,
    /// Capacity offered.
    pub capacity: u64,
    /// Bytes per owner root; 0 = unlimited.
    pub quota: u64,
    /// Labels (zone, …).
    pub labels: BTreeMap<String, String>,
    /// Overhead factor for capacity proofs.
    pub overhead: f64,
    /// Hardest capacity challenge answered (work a caller can ask of this node).
    pub max_capacity_difficulty: u32,
    /// Uploads in flight, all owners.
    pub max_uploads: u32,
    /// Uploads in flight per owner root.
    pub max_uploads_per_owner: u32,
    /// Bytes reserved for uploads in flight per owner root.
    pub max_upload_bytes_per_owner: u64,
    /// Proof-of-work bits the pool requires: an owner root's per-root limits are multiplied
    /// by its `shardfarm_core::auth::share_weight` above them.
    pub min_difficulty: u8,
}

/// Capacity is reserved for an upload in steps of this many bytes as they arrive, never for
/// the length a header claims: a stream that claims 1 GiB and trickles holds one step.
pub const RESERVE_STEP: u64 = 4 << 20;

/// One node: its identity, store and settings.
pub struct Node {
    /// This node's identity.
    pub identity: Identity,
    /// The store.
    pub store: Arc<Store>,
    /// Settings.
    pub settings: NodeSettings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Bytes promised to uploads in flight, so parallel uploads cannot overfill the disk.
    reserved: AtomicU64,
    /// Uploads in flight (reservations held).
    uploads: AtomicU64,
    /// Uploads in flight per owner root (for the quota).
    reserved_by_owner: Mutex<HashMap<[u8; 32], InFlight>>,
    latest_proof: Mutex<Option<Vec<u8>>>,
    /// Which slots this node holds, for deciding which puts it accepts.
    slots: RwLock<Slots>,
    /// The nodes of the current and fallback layouts (their connections are never evicted).
    members: RwLock<std::collections::HashSet<NodeId>>,
    /// Tombstones each owner root may store for objects this node holds nothing of.
    tombstone_budget: shardfarm_core::limit::KeyedBuckets<[u8; 32]>,
}

/// Tombstones per second an owner root may store for objects this node holds nothing of (a
/// deletion of what is stored here is never limited: it frees space and names what exists).
pub const FOREIGN_TOMBSTONES_PER_S: f64 = 10.0;
/// Partitions one SummarizePartitions call may ask for (~85 bytes of answer each).
pub const MAX_SUMMARIES: usize = 4096;
/// How many it may store at once before that rate applies.
pub const FOREIGN_TOMBSTONES_BURST: f64 = 200.0;

/// What a node knows of the pool's layouts when a put arrives.
#[derive(Clone, Debug)]
pub enum Slots {
    /// Not in a pool (a standalone agent): every slot is its own.
    Standalone,
    /// In a pool, before the first layout arrived: no put is accepted yet.
    Waiting,
    /// The coordinator's current layout and the readers' fallback.
    Known {
        /// The current layout.
        current: Layout,
        /// The previous in-sync layout, while the current one is not yet.
        previous: Option<Layout>,
    },
}

/// A reservation of capacity for one upload, released on drop; it grows in [`RESERVE_STEP`]s
/// as the upload's bytes arrive.
pub struct Reservation<'a> {
    node: &'a Node,
    bytes: u64,
    owner: [u8; 32],
    /// The owner root's share weight: its per-root limits are this many times the base.
    shares: u32,
}

/// What one owner root has in flight on this node.
#[derive(Clone, Copy, Debug, Default)]
struct InFlight {
    bytes: u64,
    uploads: u32,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.node.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
        self.node.uploads.fetch_sub(1, Ordering::SeqCst);
        self.node.metrics.uploads_in_flight.dec();
        let mut m = self.node.reserved_by_owner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = m.get_mut(&self.owner) {
            v.bytes = v.bytes.saturating_sub(self.bytes);
            v.uploads = v.uploads.saturating_sub(1);
            if v.uploads == 0 {
                m.remove(&self.owner);
            }
        }
    }
}

/// An upload in progress: the verified header, the slot, the temp file.
pub struct Upload<'a> {
    node: &'a Node,
    header: SegmentHeader,
    header_bytes: Vec<u8>,
    id: ShardId,
    partition: u32,
    pending: Option<PendingShard>,
    reservation: Reservation<'a>,
    owner: [u8; 32],
}

/// What a finished upload reports.
#[derive(Debug)]
pub struct PutOutcome {
    /// The verified root.
    pub root: [u8; 32],
    /// Bytes stored.
    pub length: u64,
    /// The same shard was already stored.
    pub already_present: bool,
}

/// One answer to a get.
#[derive(Debug)]
pub struct GetOutcome {
    /// The signed header.
    pub header: Vec<u8>,
    /// The requested bytes, mapped from the payload file and not yet verified.
    pub data: bytes::Bytes,
    /// The check of the whole shard against its signed root, running beside the caller.
    pub verified: Verification,
}

/// A shard check running on the blocking pool.
#[derive(Debug)]
pub struct Verification(tokio::task::JoinHandle<Result<()>>);

impl Verification {
    /// Waits for the check: `Ok` if the shard matched its signed root.
    pub async fn wait(self) -> Result<()> {
        self.0.await.map_err(|e| Error::Internal(e.to_string()))?
    }
}

/// A stored shard mapped with its header, before its bytes are checked.
struct OpenShard {
    id: ShardId,
    partition: u32,
    /// The index record of the copy mapped: a copy found corrupt is quarantined only while
    /// the index still names it.
    record: ShardRecord,
    header: SegmentHeader,
    header_bytes: Vec<u8>,
    shard: bytes::Bytes,
}

impl Node {
    /// A node over `store`.
    pub fn new(
        identity: Identity,
        store: Arc<Store>,
        settings: NodeSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.capacity_bytes.set(settings.capacity as i64);
        metrics.identity_difficulty.set(i64::from(identity.difficulty()));
        metrics.stored_bytes.set(store.used_bytes() as i64);
        metrics.shards.set(store.shard_count() as i64);
        Node {
            identity,
            store,
            settings,
            metrics,
            reserved: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            reserved_by_owner: Mutex::new(HashMap::new()),
            latest_proof: Mutex::new(None),
            slots: RwLock::new(Slots::Standalone),
            members: RwLock::new(std::collections::HashSet::new()),
            tombstone_budget: shardfarm_core::limit::KeyedBuckets::new(
                FOREIGN_TOMBSTONES_PER_S,
                FOREIGN_TOMBSTONES_BURST,
                10_000,
            ),
        }
    }

    /// Sets what the node knows of the pool's layouts (the membership worker calls this).
    pub fn set_slots(&self, slots: Slots) {
        let members = match &slots {
            Slots::Known { current, previous } => std::iter::once(current)
                .chain(previous)
                .flat_map(|l| l.partitions.iter().flatten().copied())
                .collect(),
            _ => std::collections::HashSet::new(),
        };
        *self.members.write().unwrap() = members;
        *self.slots.write().unwrap() = slots;
    }

    /// Upload bytes reserved now, by owner root.
    pub fn uploads_by_root(&self) -> Vec<([u8; 32], u64)> {
        let m = self.reserved_by_owner.lock().unwrap();
        m.iter().map(|(root, f)| (*root, f.bytes)).collect()
    }

    /// Whether `id` holds a slot in the current or the fallback layout.
    pub fn is_member(&self, id: &NodeId) -> bool {
        self.members.read().unwrap().contains(id)
    }

    /// Refuses a put for slot `shard` of partition `p` unless the current or the fallback
    /// layout gives it to this node.
    fn check_slot(&self, p: u32, shard: u32) -> Result<()> {
        let me = self.identity.id();
        match &*self.slots.read().unwrap() {
            Slots::Standalone => Ok(()),
            Slots::Waiting => Err(Error::Unavailable(
                "this node has not received the pool's layout yet: retry shortly".into(),
            )),
            Slots::Known { current, previous } => {
                let holder = |l: &Layout| {
                    l.partitions.get(p as usize).and_then(|h| h.get(shard as usize)).copied()
                };
                if holder(current) == Some(me) || previous.as_ref().and_then(holder) == Some(me) {
                    return Ok(());
                }
                Err(Error::FailedPrecondition(format!(
                    "slot {shard} of partition {p} is held by node {} in layout {}, not by this \
                     node: send it there",
                    holder(current).map_or_else(|| "none".into(), |h| h.to_hex()),
                    current.version
                )))
            }
        }
    }

    /// The partition of a segment in this pool.
    pub fn partition_of(&self, object_id: &[u8; 32], segment: u32) -> u32 {
        partition(object_id, segment, self.settings.partitions)
    }

    /// Opens a reservation for one more upload of `owner` (holding `shares` base shares) and
    /// reserves its first `bytes`.
    fn reserve(&self, bytes: u64, owner: [u8; 32], shares: u32) -> Result<Reservation<'_>> {
        // However much work a root proved, it holds at most a quarter of the node's uploads.
        let base = self.settings.max_uploads_per_owner.max(1);
        let cap = (self.settings.max_uploads / 4).max(base);
        let shares = (base.saturating_mul(shares.max(1)).min(cap) / base).max(1);
        let uploads = self.uploads.fetch_add(1, Ordering::SeqCst) + 1;
        self.metrics.uploads_in_flight.inc();
        let mut r = Reservation { node: self, bytes: 0, owner, shares };
        let mine = {
            let mut m = self.reserved_by_owner.lock().unwrap();
            let v = m.entry(owner).or_default();
            v.uploads = v.uploads.saturating_add(1);
            *v
        };
        let limit = self.settings.max_uploads_per_owner.saturating_mul(shares.max(1));
        if mine.uploads > limit {
            self.metrics.uploads_refused.with_label_values(&["per_identity"]).inc();
            return Err(Error::OverShare(format!(
                "your owner root has {} uploads in flight on this node, its share ({shares} × \
                 {}): wait for some to finish",
                mine.uploads - 1,
                self.settings.max_uploads_per_owner
            )));
        }
        if uploads > u64::from(self.settings.max_uploads) {
            self.metrics.uploads_refused.with_label_values(&["node_busy"]).inc();
            return Err(Error::Unavailable(format!(
                "node has {} uploads in flight, its limit: retry shortly or store elsewhere",
                uploads - 1
            )));
        }
        self.grow(&mut r, bytes)?;
        Ok(r)
    }

    /// Reserves `bytes` more for the upload holding `r`: refused, and nothing reserved, when
    /// the disk, the owner root's bytes in flight or its quota would be exceeded.
    fn grow(&self, r: &mut Reservation<'_>, bytes: u64) -> Result<()> {
        let cap = self.settings.capacity;
        let owner = r.owner;
        // `bytes` is at most one step or one maximal shard, so these sums of at most a few
        // thousand in-flight uploads cannot wrap; the checks below saturate anyway.
        let prev = self.reserved.fetch_add(bytes, Ordering::SeqCst);
        r.bytes += bytes;
        let mine = {
            let mut m = self.reserved_by_owner.lock().unwrap();
            let v = m.entry(owner).or_default();
            v.bytes = v.bytes.saturating_add(bytes);
            *v
        };
        let undo = |r: &mut Reservation<'_>| {
            self.reserved.fetch_sub(bytes, Ordering::SeqCst);
            r.bytes -= bytes;
            if let Some(v) = self.reserved_by_owner.lock().unwrap().get_mut(&owner) {
                v.bytes = v.bytes.saturating_sub(bytes);
            }
        };
        let limit = self.settings.max_upload_bytes_per_owner.saturating_mul(u64::from(r.shares));
        if mine.bytes > limit {
            undo(r);
            self.metrics.uploads_refused.with_label_values(&["per_identity_bytes"]).inc();
            return Err(Error::OverShare(format!(
                "your owner root has {} bytes of uploads in flight on this node, its share is \
                 {limit} ({} × {}): wait for some to finish",
                mine.bytes - bytes,
                r.shares,
                self.settings.max_upload_bytes_per_owner
            )));
        }
        let used = self.store.used_bytes();
        if used.saturating_add(prev).saturating_add(bytes) > cap {
            undo(r);
            return Err(Error::ResourceExhausted(format!(
                "node is full: {used} of {cap} bytes used, {prev} promised to uploads in flight, \
                 this shard needs {bytes}: store it on another node"
            )));
        }
        if self.settings.quota > 0 {
            let in_flight = mine.bytes;
            let stored = self.store.quota_used(&owner)?;
            if stored.saturating_add(in_flight) > self.settings.quota {
                undo(r);
                return Err(Error::OverShare(format!(
                    "quota exceeded: your owner root stores {stored} of {} bytes on this node",
                    self.settings.quota
                )));
            }
        }
        Ok(())
    }

    /// Starts an upload of slot `shard_index` of the segment whose signed header is
    /// `header_bytes`: checks the header, the slot and capacity before any byte is written.
    pub fn begin_put(
        &self,
        caller: &Caller,
        header_bytes: Vec<u8>,
        shard_index: u32,
    ) -> Result<Upload<'_>> {
        let shares = caller.share_weight(self.settings.min_difficulty);
        self.begin(caller.root.0, shares, header_bytes, shard_index)
    }

    /// Starts storing a shard this node rebuilt or copied for its slot (repair). The same
    /// checks as an upload; the quota is charged to the segment's uploader.
    pub fn begin_repair(&self, header_bytes: Vec<u8>, shard_index: u32) -> Result<Upload<'_>> {
        let uploader = SegmentHeader::decode_unverified(&header_bytes)
            .map_err(|e| Error::InvalidArgument(format!("segment header refused: {e}")))?
            .uploader;
        // Repair is not the owner's traffic: the owner's largest share, so a busy owner's
        // uploads never keep its data from being repaired.
        let shares = shardfarm_core::auth::MAX_SHARE_WEIGHT;
        self.begin(NodeId::of(&uploader).0, shares, header_bytes, shard_index)
    }

    fn begin(
        &self,
        owner: [u8; 32],
        shares: u32,
        header_bytes: Vec<u8>,
        shard_index: u32,
    ) -> Result<Upload<'_>> {
        let header = SegmentHeader::decode(&header_bytes)
            .map_err(|e| Error::InvalidArgument(format!("segment header refused: {e}")))?;
        if shard_index as usize >= header.n() {
            return Err(Error::InvalidArgument(format!(
                "shard index {shard_index} is out of range for n = {}",
                header.n()
            )));
        }
        if header.expires != 0 && header.expires.saturating_mul(1000) <= now_ms() {
            return Err(Error::InvalidArgument("segment header has expired".into()));
        }
        if self.store.is_tombstoned(&header.object_id)? {
            return Err(Error::FailedPrecondition(format!(
                "object {} was deleted by its uploader; its shards are not accepted again",
                hex::encode(&header.object_id[..8])
            )));
        }
        // A slot the layout does not give this node is refused before anything is reserved.
        let partition = self.partition_of(&header.object_id, header.segment_index);
        self.check_slot(partition, shard_index)?;
        let reservation = self.reserve(header.shard_length.min(RESERVE_STEP), owner, shares)?;
        let id = ShardId {
            object_id: header.object_id,
            segment: header.segment_index,
            shard: shard_index,
        };
        if let Some(existing) = self.store.header(&id)?
            && existing != header_bytes
        {
            let old = SegmentHeader::decode_unverified(&existing).ok();
            if old.is_some_and(|o| o.uploader != header.uploader) {
                return Err(Error::AlreadyExists(
                    "another uploader's segment is stored under this object id".into(),
                ));
            }
        }
        Ok(Upload {
            node: self,
            partition,
            header,
            header_bytes,
            id,
            pending: Some(self.store.begin()?),
            reservation,
            owner,
        })
    }

    /// Reads a shard (all of it, or `length` bytes from `offset`; `length` 0 = to the end).
    /// The bytes are mapped, not yet verified: [`GetOutcome::verified`] checks the whole
    /// shard against its signed root while the caller streams them, and the caller holds
    /// back the last chunk until it has passed. A corrupt shard is quarantined and the check
    /// answers [`Error::DataLoss`], so no reader gets a complete corrupt shard from here.
    pub async fn get(
        self: &Arc<Self>,
        id: ShardId,
        offset: u64,
        length: u64,
    ) -> Result<GetOutcome> {
        let me = self.clone();
        let opened = blocking(move || me.open_shard(id, "get")).await?;
        let len = opened.shard.len() as u64;
        if offset > len {
            return Err(Error::InvalidArgument(format!(
                "offset {offset} is past the shard's {len} bytes"
            )));
        }
        let end = if length == 0 { len } else { offset.saturating_add(length).min(len) };
        let data = opened.shard.slice(offset as usize..end as usize);
        let header = opened.header_bytes.clone();
        let me = self.clone();
        let verified = tokio::task::spawn_blocking(move || me.check_shard(opened, "get"));
        self.metrics.bytes_out.inc_by(data.len() as u64);
        Ok(GetOutcome { header, data, verified: Verification(verified) })
    }

    /// Checks a stored shard against its signed root (scrub); quarantines it if corrupt.
    pub async fn verify_stored(
        self: &Arc<Self>,
        id: ShardId,
        found_by: &'static str,
    ) -> Result<()> {
        self.read_verified(id, found_by).await.map(|_| ())
    }

    /// Reads a shard and its header and checks the bytes against the signed root.
    async fn read_verified(
        self: &Arc<Self>,
        id: ShardId,
        found_by: &'static str,
    ) -> Result<(Vec<u8>, bytes::Bytes)> {
        let me = self.clone();
        blocking(move || {
            let opened = me.open_shard(id, found_by)?;
            let out = (opened.header_bytes.clone(), opened.shard.clone());
            me.check_shard(opened, found_by)?;
            Ok(out)
        })
        .await
    }

    /// Maps a stored shard and reads its header, unverified. A payload of the wrong length
    /// or missing while the index names it is quarantined here ([`Error::DataLoss`]).
    fn open_shard(&self, id: ShardId, found_by: &'static str) -> Result<OpenShard> {
        let p = self.partition_of(&id.object_id, id.segment);
        let not_found = || Error::NotFound(format!("no shard {} here", id.file_name()));
        let record = self.store.record(&id, p)?.ok_or_else(not_found)?;
        let header_bytes = self.store.header(&id)?.ok_or_else(not_found)?;
        let header = SegmentHeader::decode_unverified(&header_bytes)
            .map_err(|e| Error::Internal(format!("stored header does not parse: {e}")))?;
        let reason = match self.store.map(&id, record.length) {
            Ok(shard) => {
                return Ok(OpenShard { id, partition: p, record, header, header_bytes, shard });
            }
            // A payload of the wrong length is corrupt. A missing payload is corrupt only if the
            // index still names it after the failed open (else a delete raced us: not found).
            // Any other failure to read it (EMFILE, ENOMEM from mmap, EIO that may pass) says
            // nothing about the bytes: it is reported and retried, never quarantined.
            Err(e @ StoreError::Record { .. }) => e.to_string(),
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                if self.store.record(&id, p)?.is_none() {
                    return Err(not_found());
                }
                "payload file is missing".to_string()
            }
            Err(e) => {
                self.metrics.read_errors.inc();
                tracing::warn!(shard = %id.file_name(), found_by, error = %e, "shard could not be read");
                return Err(Error::Unavailable(format!(
                    "shard {} could not be read on this node ({e}): retry, or read it from other \
                     holders",
                    id.file_name()
                )));
            }
        };
        Err(self.corrupt(&id, p, &record, found_by, &reason))
    }

    /// Checks an opened shard's bytes against its signed root; quarantines it if corrupt.
    fn check_shard(&self, opened: OpenShard, found_by: &'static str) -> Result<()> {
        let OpenShard { id, partition, record, header, shard, .. } = opened;
        let reason = match header.verify_shard(id.shard as usize, &shard) {
            Ok(()) if record.root == header.shard_roots[id.shard as usize] => return Ok(()),
            Ok(()) => "index record disagrees with the header".to_string(),
            Err(e) => e.to_string(),
        };
        Err(self.corrupt(&id, partition, &record, found_by, &reason))
    }

    /// Quarantines a corrupt shard; the error to answer with (or the quarantine's own).
    fn corrupt(
        &self,
        id: &ShardId,
        partition: u32,
        found: &ShardRecord,
        found_by: &'static str,
        reason: &str,
    ) -> Error {
        if let Err(e) = self.quarantine(id, partition, found, found_by, reason) {
            return e;
        }
        Error::DataLoss(format!(
            "shard {} is corrupt on this node ({reason}); it was quarantined: read it from other \
             holders, repair will rebuild it",
            id.file_name()
        ))
    }

    /// Quarantines a corrupt shard (the copy `found` names) and counts it. A copy the index no
    /// longer names (quarantined already by a concurrent reader or scrub, or replaced by a
    /// repaired one) is left alone and not counted again.
    pub fn quarantine(
        &self,
        id: &ShardId,
        partition: u32,
        found: &ShardRecord,
        found_by: &'static str,
        reason: &str,
    ) -> Result<()> {
        if self.store.quarantine(id, partition, found)?.is_none() {
            return Ok(());
        }
        tracing::error!(shard = %id.file_name(), found_by, reason, "corrupt shard quarantined");
        self.metrics.corrupt_shards.with_label_values(&[found_by]).inc();
        self.refresh_gauges();
        Ok(())
    }

    fn refresh_gauges(&self) {
        self.metrics.stored_bytes.set(self.store.used_bytes() as i64);
        self.metrics.shards.set(self.store.shard_count() as i64);
    }

    /// Deletes a shard; only the uploader named in its signed header may.
    pub async fn delete(self: &Arc<Self>, caller: Caller, id: ShardId) -> Result<bool> {
        let me = self.clone();
        blocking(move || {
            let p = me.partition_of(&id.object_id, id.segment);
            let Some(header) = me.store.header(&id)? else { return Ok(false) };
            let header = SegmentHeader::decode_unverified(&header)
                .map_err(|e| Error::Internal(format!("stored header does not parse: {e}")))?;
            if caller.credential.signing_key() != &header.uploader {
                return Err(Error::PermissionDenied(
                    "only the uploader named in the segment header may delete its shards".into(),
                ));
            }
            let existed = me.store.remove(&id, p)?.is_some();
            me.refresh_gauges();
            Ok(existed)
        })
        .await
    }

    /// Applies an uploader's tombstone: verifies it, keeps it, and deletes every shard of the
    /// object held here. Anyone may deliver one (it verifies on its own), so peers forward
    /// them. Returns the shards deleted.
    ///
    /// A tombstone costs a synced write and is kept for 30 days, so a node keeps one only when
    /// it holds shards of the object or when the uploader itself delivers it (`by_uploader`,
    /// `rm`'s own call): a stranger cannot fill nodes with tombstones for objects that never
    /// existed, and a forwarded one matters only where the object is.
    pub async fn delete_object(
        self: &Arc<Self>,
        encoded: Vec<u8>,
        by_uploader: Option<&Caller>,
    ) -> Result<u32> {
        let t = Tombstone::decode(&encoded, now_ms())
            .map_err(|e| Error::InvalidArgument(format!("tombstone refused: {e}")))?;
        if t.expires_ms() < now_ms() {
            return Err(Error::InvalidArgument("tombstone has expired".into()));
        }
        let uploader = by_uploader.is_some_and(|c| c.credential.signing_key() == &t.uploader);
        let root = by_uploader.map(|c| (c.root.0, c.share_weight(self.settings.min_difficulty)));
        let me = self.clone();
        let n = blocking(move || {
            let held = me.store.shards_of_object(&t.object_id, me.settings.partitions)?;
            if held.is_empty() && !uploader {
                return Ok(0);
            }
            // Of an object with nothing here (its shards may still be on their way), an owner
            // root stores tombstones at a bounded rate: spam cannot fill the disk and the
            // write path with deletions of objects that never existed.
            if held.is_empty()
                && !me.store.is_tombstoned(&t.object_id)?
                && let Some((root, shares)) = root
                && !me.tombstone_budget.try_take_share(&root, std::time::Instant::now(), shares)
            {
                me.metrics.tombstones_refused.inc();
                return Err(Error::OverShare(format!(
                    "your owner root stored more tombstones for objects this node holds nothing \
                     of than its share ({shares} × {FOREIGN_TOMBSTONES_PER_S} per second): retry \
                     later"
                )));
            }
            let fresh = me.store.put_tombstone(&t.object_id, &encoded, t.expires_ms())?;
            let mut n = 0;
            for (p, id) in held {
                if me.store.remove(&id, p)?.is_some() {
                    n += 1;
                }
            }
            if fresh {
                tracing::info!(object = %hex::encode(&t.object_id[..8]), deleted = n, "object deleted by its uploader");
            }
            me.refresh_gauges();
            Ok(n)
        })
        .await?;
        self.metrics.tombstones.set(self.store.tombstone_count() as i64);
        Ok(n)
    }

    /// True when the object was deleted (a tombstone is kept here).
    pub fn is_deleted(&self, object_id: &[u8; 32]) -> bool {
        self.store.is_tombstoned(object_id).unwrap_or(false)
    }

    /// Up to `limit` (≤ 1000) tombstones that arrived after arrival number `after`: this
    /// store's log id, the encoded tombstones, and the arrival number of the last one.
    pub async fn tombstones_since(
        self: &Arc<Self>,
        after: u64,
        limit: usize,
    ) -> Result<(u64, Vec<Vec<u8>>, u64)> {
        let me = self.clone();
        blocking(move || {
            let (list, last) = me.store.tombstones_since(after, limit.clamp(1, 1000))?;
            Ok((me.store.tombstone_log(), list, last))
        })
        .await
    }

    /// Drops a shard this node no longer holds a slot for, once its new holder has it (the
    /// repair worker's handoff; never called on a client's behalf).
    pub async fn hand_off(self: &Arc<Self>, id: ShardId) -> Result<bool> {
        let me = self.clone();
        blocking(move || {
            let p = me.partition_of(&id.object_id, id.segment);
            let existed = me.store.remove(&id, p)?.is_some();
            me.refresh_gauges();
            Ok(existed)
        })
        .await
    }

    /// Lists up to `limit` shards of `partition` after `start_after`.
    pub async fn list(
        self: &Arc<Self>,
        partition: u32,
        start_after: Option<ShardId>,
        limit: usize,
    ) -> Result<Vec<(ShardId, ShardRecord)>> {
        if partition >= self.settings.partitions {
            return Err(Error::InvalidArgument(format!(
                "partition {partition} ≥ the pool's {} partitions",
                self.settings.partitions
            )));
        }
        let me = self.clone();
        blocking(move || Ok(me.store.list(partition, start_after, limit.clamp(1, 10_000))?)).await
    }

    /// Summaries of what this node holds in `partitions` (distinct, each below the pool's
    /// partition count), in the order asked.
    pub async fn summaries(
        self: &Arc<Self>,
        partitions: Vec<u32>,
    ) -> Result<Vec<PartitionSummary>> {
        let total = self.settings.partitions;
        if partitions.len() > MAX_SUMMARIES {
            return Err(Error::InvalidArgument(format!(
                "{} partitions asked; at most {MAX_SUMMARIES} per call",
                partitions.len()
            )));
        }
        if let Some(p) = partitions.iter().find(|p| **p >= total) {
            return Err(Error::InvalidArgument(format!(
                "partition {p} ≥ the pool's {total} partitions"
            )));
        }
        let distinct: std::collections::HashSet<u32> = partitions.iter().copied().collect();
        if distinct.len() != partitions.len() {
            return Err(Error::InvalidArgument("a partition is asked for twice".into()));
        }
        let me = self.clone();
        blocking(move || {
            partitions.iter().map(|p| Ok(me.store.summary(*p)?)).collect::<Result<Vec<_>>>()
        })
        .await
    }

    /// Answers an audit: the leaves the nonce selects, with Merkle proofs.
    pub async fn audit(
        self: &Arc<Self>,
        id: ShardId,
        nonce: Vec<u8>,
        leaves: u32,
    ) -> Result<(Vec<u8>, Vec<ProvenLeaf>)> {
        if !(16..=32).contains(&nonce.len()) || !(1..=MAX_AUDIT_LEAVES).contains(&leaves) {
            return Err(Error::InvalidArgument(format!(
                "audit needs a 16-32 byte nonce and 1-{MAX_AUDIT_LEAVES} leaves"
            )));
        }
        if self.is_deleted(&id.object_id) {
            return Err(Error::FailedPrecondition(format!(
                "object {} was deleted by its uploader (a tombstone is kept here)",
                hex::encode(&id.object_id[..8])
            )));
        }
        let r = self.read_verified(id, "audit").await;
        let result = r.map(|(header, shard)| (header, audit::answer(&shard, &nonce, leaves)));
        let label = match &result {
            Ok(_) => "answered",
            Err(Error::DataLoss(_)) => "corrupt",
            Err(_) => "missing",
        };
        self.metrics.audits.with_label_values(&[label]).inc();
        result
    }

    /// Solves a capacity challenge and signs the report (the latest is kept for `Info`).
    pub async fn prove_capacity(
        self: &Arc<Self>,
        challenge: Vec<u8>,
        difficulty: u32,
    ) -> Result<Vec<u8>> {
        let max = self.settings.max_capacity_difficulty;
        if !(8..=max).contains(&difficulty) || !(16..=64).contains(&challenge.len()) {
            return Err(Error::InvalidArgument(format!(
                "capacity challenge needs 16-64 bytes and a difficulty of 8-{max} bits \
                 (--max-capacity-difficulty)"
            )));
        }
        let me = self.clone();
        let report = blocking(move || {
            let m = me.machine();
            CapacityReport::prove(&me.identity, &challenge, difficulty as u8, m)
                .map_err(|e| Error::InvalidArgument(e.to_string()))
        })
        .await?;
        let g = &self.metrics.capacity_proof;
        g.with_label_values(&["processors"]).set(f64::from(report.processors));
        g.with_label_values(&["cores"]).set(f64::from(report.cores_per_processor));
        g.with_label_values(&["solve_seconds"]).set(report.solve_ms as f64 / 1000.0);
        g.with_label_values(&["overhead"]).set(report.overhead);
        g.with_label_values(&["reported_bytes"]).set(report.space_reported as f64);
        g.with_label_values(&["taken_bytes"]).set(report.space_taken as f64);
        g.with_label_values(&["capacity"]).set(report.capacity());
        let bytes = report.encode();
        *self.latest_proof.lock().unwrap() = Some(bytes.clone());
        Ok(bytes)
    }

    /// The latest capacity proof, if any.
    pub fn latest_proof(&self) -> Option<Vec<u8>> {
        self.latest_proof.lock().unwrap().clone()
    }

    fn machine(&self) -> Machine {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let sockets = processor_sockets();
        Machine {
            processors: sockets,
            cores_per_processor: (cores / sockets).max(1),
            overhead: self.settings.overhead,
            space_reported: self.settings.capacity,
            space_taken: self.store.used_bytes(),
        }
    }
}

/// Distinct `physical id`s in /proc/cpuinfo (1 where it says nothing, e.g. in most VMs/ARM).
fn processor_sockets() -> u32 {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return 1 };
    let ids: std::collections::HashSet<&str> =
        info.lines().filter(|l| l.starts_with("physical id")).collect();
    (ids.len() as u32).max(1)
}

impl Upload<'_> {
    /// The segment header being uploaded.
    pub fn header(&self) -> &SegmentHeader {
        &self.header
    }

    /// Appends a chunk; refuses bytes beyond the header's shard length.
    pub async fn write(&mut self, chunk: bytes::Bytes) -> Result<()> {
        let mut pending = self.pending.take().expect("upload not finished");
        if pending.len() + chunk.len() as u64 > self.header.shard_length {
            return Err(Error::InvalidArgument(format!(
                "more bytes than the header's shard length {}",
                self.header.shard_length
            )));
        }
        let n = chunk.len() as u64;
        // Capacity follows the bytes: one more step once they pass what is reserved.
        let needed = pending.len() + n;
        if needed > self.reservation.bytes {
            let step = (needed - self.reservation.bytes)
                .max(RESERVE_STEP)
                .min(self.header.shard_length - self.reservation.bytes);
            if let Err(e) = self.node.grow(&mut self.reservation, step) {
                self.pending = Some(pending);
                return Err(e);
            }
        }
        let pending = blocking(move || {
            pending.write(&chunk)?;
            Ok(pending)
        })
        .await?;
        self.node.metrics.bytes_in.inc_by(n);
        self.pending = Some(pending);
        Ok(())
    }

    /// Checks length and root against the signed header, then makes the shard durable.
    /// Nothing is acknowledged before this returns `Ok`.
    pub async fn finish(mut self) -> Result<PutOutcome> {
        let mut pending = self.pending.take().expect("upload not finished");
        let slot = self.id.shard as usize;
        if pending.len() != self.header.shard_length {
            return Err(Error::InvalidArgument(format!(
                "stream ended after {} bytes; the header says {}",
                pending.len(),
                self.header.shard_length
            )));
        }
        let store = self.node.store.clone();
        let (id, p, owner) = (self.id, self.partition, self.owner);
        let header_bytes = std::mem::take(&mut self.header_bytes);
        let expected = self.header.shard_roots[slot];
        let (committed, record) = blocking(move || {
            let root = pending.root();
            if root != expected {
                return Err(Error::InvalidArgument(format!(
                    "payload does not match the signed Merkle root of shard {slot}"
                )));
            }
            Ok(store.commit(pending, root, &id, p, &header_bytes, owner, now_ms())?)
        })
        .await?;
        self.node.refresh_gauges();
        Ok(PutOutcome {
            root: record.root,
            length: record.length,
            already_present: committed == Committed::AlreadyPresent,
        })
    }
}

// ---- Policy ----

/// Allow/deny lists and per-identity rate limits, applied after authentication.
pub struct Policy {
    allow: Vec<[u8; 32]>,
    deny: Vec<[u8; 32]>,
    rate: u32,
    buckets: Mutex<HashMap<[u8; 32], (f64, Instant)>>,
}

/// Most identities whose rate buckets are remembered; beyond it idle ones are dropped.
const MAX_BUCKETS: usize = 100_000;

impl Policy {
    /// A policy; `rate` requests per second per caller (burst of the same), 0 = unlimited.
    pub fn new(allow: Vec<[u8; 32]>, deny: Vec<[u8; 32]>, rate: u32) -> Self {
        Policy { allow, deny, rate, buckets: Mutex::new(HashMap::new()) }
    }

    /// Checks the caller against the lists and its rate bucket.
    pub fn check(&self, caller: &Caller) -> Result<()> {
        if self.deny.iter().any(|d| *d == caller.id.0 || *d == caller.root.0) {
            return Err(Error::PermissionDenied(format!(
                "identity {} is on this node's deny list",
                caller.id.short()
            )));
        }
        if !self.allow.is_empty()
            && !self.allow.iter().any(|a| *a == caller.id.0 || *a == caller.root.0)
        {
            return Err(Error::PermissionDenied(format!(
                "identity {} is not on this node's allow list: ask the operator to add it",
                caller.id.short()
            )));
        }
        if self.rate > 0 {
            let mut b = self.buckets.lock().unwrap();
            let now = Instant::now();
            if b.len() >= MAX_BUCKETS {
                b.retain(|_, (_, t)| now.duration_since(*t) < Duration::from_secs(10));
            }
            let rate = f64::from(self.rate);
            let (tokens, last) = b.entry(caller.id.0).or_insert((rate, now));
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
            *last = now;
            if *tokens < 1.0 {
                return Err(Error::OverShare(format!(
                    "rate limit of {} requests/s exceeded for identity {}: slow down and retry",
                    self.rate,
                    caller.id.short()
                )));
            }
            *tokens -= 1.0;
        }
        Ok(())
    }
}
