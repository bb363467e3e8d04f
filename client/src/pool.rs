//! A client bound to one pool: put, get, stat, rm, nodes.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use shardfarm_core::cap::ReadCap;
use shardfarm_core::codec::{CodecParams, Decoder, Encoder};
use shardfarm_core::identity::NodeId;
use shardfarm_core::shard::{Cipher, SegmentHeader, ShardId, partition, salt_for};
use shardfarm_core::tombstone::Tombstone;
use shardfarm_proto::{AgentClient, CoordinatorClient, LayoutGuard, PublishedLayout, Signer};

use crate::identity::ClientIdentity;
use crate::profile::PoolProfile;

/// How long to wait for a node to accept a connection before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a small call (stat's audit, rm's delete, the coordinator's answers) may take
/// before its peer counts as not answering: a stalled node (SIGSTOPped, black-holed) accepts
/// connections and never answers.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a read waits without any holder answering before it asks one more.
const HEDGE: Duration = Duration::from_secs(2);

/// How long the last holders of a segment may take once enough others have acknowledged it.
const STRAGGLER_GRACE: Duration = Duration::from_secs(2);

/// Largest segment a pool may ask clients to buffer (the agents' own limit is the same).
const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// A shard transfer's deadline: [`CALL_TIMEOUT`] plus one second per MiB (a 1 MiB/s floor).
fn transfer_deadline(bytes: u64) -> Duration {
    CALL_TIMEOUT + Duration::from_secs(bytes >> 20)
}

/// Runs `f` against `node` within `d`.
async fn within<T>(
    d: Duration,
    node: &NodeId,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(d, f).await.map_err(|_| {
        anyhow::anyhow!("node {} did not answer within {} s", node.short(), d.as_secs())
    })?
}

/// What the client knows of the pool: its settings and its newest verified layout.
#[derive(Debug, Clone)]
pub struct PoolView {
    /// Pool name (goes into read capabilities).
    pub pool: String,
    /// Data shards.
    pub k: u16,
    /// Parity shards.
    pub m: u16,
    /// Partitions.
    pub partitions: u32,
    /// Segment size new objects are cut into.
    pub segment_size: u64,
    /// The identity difficulty the pool demands.
    pub min_difficulty: u8,
    /// The layout (and its fallback), verified as signed by the pinned pool key.
    pub layout: PublishedLayout,
}

impl PoolView {
    fn new(info: shardfarm_proto::pb::PoolInfo, layout: PublishedLayout) -> anyhow::Result<Self> {
        let k = u16::try_from(info.k).context("pool: k out of range")?;
        let m = u16::try_from(info.m).context("pool: m out of range")?;
        if (k, m) != (layout.layout.k, layout.layout.m)
            || info.partitions as usize != layout.layout.partitions.len()
        {
            bail!(
                "the coordinator describes RS({k},{m}) over {} partitions, but its signed layout \
                 is RS({},{}) over {}",
                info.partitions,
                layout.layout.k,
                layout.layout.m,
                layout.layout.partitions.len()
            );
        }
        if info.segment_size == 0 || info.segment_size > MAX_SEGMENT_SIZE {
            bail!("the pool's segment size {} is out of range", info.segment_size);
        }
        if info.pool.is_empty() || info.pool.len() > 253 {
            bail!("the pool's name is empty or too long");
        }
        Ok(PoolView {
            pool: info.pool,
            k,
            m,
            partitions: info.partitions,
            segment_size: info.segment_size,
            min_difficulty: u8::try_from(info.min_difficulty).unwrap_or(u8::MAX),
            layout,
        })
    }

    /// n = k + m.
    pub fn n(&self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }

    /// The holders of partition `p` in the current layout, in slot order.
    pub fn holders(&self, p: u32) -> Vec<NodeId> {
        self.layout.layout.partitions[p as usize].clone()
    }

    /// Every node either layout names.
    pub fn nodes(&self) -> BTreeSet<NodeId> {
        let l = &self.layout;
        l.layout
            .partitions
            .iter()
            .chain(l.previous.iter().flat_map(|p| p.partitions.iter()))
            .flatten()
            .copied()
            .collect()
    }
}

/// A client bound to one pool.
pub struct PoolClient {
    profile: PoolProfile,
    signer: Arc<Signer>,
    view: RwLock<Arc<PoolView>>,
    guard: Mutex<LayoutGuard>,
    conns: Mutex<HashMap<NodeId, (String, AgentClient)>>,
    progress: Arc<dyn Progress>,
    watcher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for PoolClient {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.lock().unwrap().take() {
            w.abort();
        }
    }
}

/// The verified shards of one segment, ready to decode.
struct Fetched {
    header: SegmentHeader,
    shards: Vec<Option<Vec<u8>>>,
}

/// Health of one segment.
#[derive(serde::Serialize, Debug)]
pub struct SegmentStat {
    /// Segment index.
    pub index: u32,
    /// Shards that answered an audit and verified.
    pub present: usize,
    /// n.
    pub total: usize,
    /// Node ids holding shards 0..n, per the layout.
    pub holders: Vec<String>,
    /// Shard indices that did not answer or did not verify.
    pub missing: Vec<usize>,
}

/// `stat` output.
#[derive(serde::Serialize, Debug)]
pub struct ObjectStat {
    /// Object length in bytes.
    pub length: u64,
    /// Pool.
    pub pool: String,
    /// Profile.
    pub k: u16,
    /// Profile.
    pub m: u16,
    /// Segments.
    pub segments: Vec<SegmentStat>,
}

/// One row of `nodes`.
#[derive(serde::Serialize, Debug)]
pub struct NodeStatus {
    /// Node id (hex).
    pub id: String,
    /// gRPC address.
    pub address: String,
    /// Zone.
    pub zone: String,
    /// `up` or `down`.
    pub state: String,
    /// Capacity offered.
    pub capacity_bytes: u64,
    /// Bytes used.
    pub used_bytes: u64,
    /// Shards stored.
    pub shards: u64,
    /// Audit score (beta reputation) from the coordinator.
    pub reputation: Option<f64>,
    /// Standing in the pool: active, suspended, disqualified (from the coordinator).
    pub standing: Option<String>,
    /// 7-day uptime from the coordinator.
    pub uptime: Option<f64>,
    /// Slots held in the current layout.
    pub slots: Option<u64>,
    /// Rewards recorded: RW1 (capacity) and RW2 (proven storage).
    pub rewards: Option<(u64, u64)>,
}

/// What a caller sees of long work: bytes moved and warnings. The CLI draws a progress bar
/// and prints warnings; a server logs them. Every method has a silent default.
pub trait Progress: Send + Sync {
    /// Work on `total` bytes begins (`what` is `put` or `get`).
    fn begin(&self, _what: &'static str, _total: u64) {}
    /// `bytes` more are done.
    fn advance(&self, _bytes: u64) {}
    /// The work is over (done or failed).
    fn finish(&self) {}
    /// Something went wrong that did not fail the operation.
    fn warn(&self, _message: &str) {}
}

/// Reports nothing.
pub struct Silent;
impl Progress for Silent {}

impl PoolClient {
    /// Opens the pool a profile file describes, signing with `identity` (else the profile's
    /// identity file).
    pub async fn open(
        profile: &Path,
        identity: Option<&Path>,
        progress: Arc<dyn Progress>,
    ) -> anyhow::Result<Arc<Self>> {
        let profile = PoolProfile::load(profile)?;
        let path = identity.map(Path::to_path_buf).or_else(|| profile.identity_path());
        let Some(path) = path else {
            bail!(
                "no client identity: pass --identity FILE, set `identity` in {}, or mine one with \
                 `shardfarm identity new`",
                profile.origin.as_deref().unwrap_or(Path::new("the profile")).display()
            );
        };
        let id = ClientIdentity::load(&path)
            .with_context(|| format!("reading the client identity {}", path.display()))?;
        Self::connect(profile, &id, progress).await
    }

    /// Reads the pool's settings and signed layout from whichever of its coordinator, seeds
    /// and known agents answers (see "Layouts without the coordinator"), and follows later
    /// layouts in the background.
    pub async fn connect(
        profile: PoolProfile,
        identity: &ClientIdentity,
        progress: Arc<dyn Progress>,
    ) -> anyhow::Result<Arc<Self>> {
        profile.validate()?;
        let pool = profile.pool()?;
        let security = shardfarm_proto::Security::from_flag(profile.insecure_plaintext);
        let signer = Arc::new(identity.signer().with_security(security));
        let mut guard = LayoutGuard::new(pool);
        let view = bootstrap(&profile, &signer, &mut guard, &*progress).await?;
        let client = Arc::new(PoolClient {
            profile,
            signer,
            view: RwLock::new(Arc::new(view)),
            guard: Mutex::new(guard),
            conns: Mutex::new(HashMap::new()),
            progress,
            watcher: Mutex::new(None),
        });
        let task = tokio::spawn(follow_layouts(Arc::downgrade(&client)));
        *client.watcher.lock().unwrap() = Some(task);
        Ok(client)
    }

    /// The pool as the client sees it now.
    pub fn view(&self) -> Arc<PoolView> {
        self.view.read().unwrap().clone()
    }

    /// The profile it was opened with.
    pub fn profile(&self) -> &PoolProfile {
        &self.profile
    }

    /// The key requests are signed with (the uploader of what this client stores).
    pub fn key(&self) -> &ed25519_dalek::SigningKey {
        self.signer.key()
    }

    /// Takes in a signed layout if it is the pinned pool's and newer than the one held.
    fn offer(&self, signed: &shardfarm_proto::pb::SignedLayout) -> Result<bool, String> {
        let accepted = self.guard.lock().unwrap().accept(signed).map_err(|e| e.to_string())?;
        let Some(layout) = accepted else { return Ok(false) };
        let mut view = self.view.write().unwrap();
        if layout.layout.k != view.k
            || layout.layout.m != view.m
            || layout.layout.partitions.len() != view.partitions as usize
        {
            return Err("a layout with another profile or partition count".into());
        }
        let mut next = (**view).clone();
        next.layout = layout;
        *view = Arc::new(next);
        drop(view);
        if let Some(path) = self.profile.layout_cache() {
            write_cache(&path, signed);
        }
        Ok(true)
    }

    /// Asks the coordinator and some agents for their current layout now (after a failure
    /// that a newer layout may explain). True if a newer one was taken in.
    pub async fn refresh(&self) -> bool {
        self.refresh_from(Vec::new()).await
    }

    /// [`Self::refresh`], asking the agents `first` (a segment's holders that refused it)
    /// beside the coordinator.
    async fn refresh_from(&self, first: Vec<NodeId>) -> bool {
        let coordinator = async {
            let r = async {
                let mut c = CoordinatorClient::connect(
                    &self.profile.coordinator,
                    self.signer.clone(),
                    self.profile.pool().ok()?,
                )
                .await
                .ok()?;
                c.get_layout().await.ok()?.signed
            };
            match tokio::time::timeout(CALL_TIMEOUT, r).await.ok().flatten() {
                Some(signed) => self.offer(&signed).unwrap_or(false),
                None => false,
            }
        };
        let agents = self.poll_agents(first, POLL_AGENTS);
        futures::pin_mut!(coordinator, agents);
        // Whichever brings a newer layout first ends the wait.
        match futures::future::select(coordinator, agents).await {
            futures::future::Either::Left((true, _))
            | futures::future::Either::Right((true, _)) => true,
            futures::future::Either::Left((false, other)) => other.await,
            futures::future::Either::Right((false, other)) => other.await,
        }
    }

    /// Asks the agents `first` and `more` others of the current layout for their
    /// publications at once; true if one was newer than the layout held.
    async fn poll_agents(&self, first: Vec<NodeId>, more: usize) -> bool {
        let view = self.view();
        let mut all: Vec<NodeId> = view.layout.addresses.keys().copied().collect();
        // A different few on each poll, so one stalled agent is not always the one asked.
        let turn = (shardfarm_core::auth::now_ms() as usize / 1000) % all.len().max(1);
        all.rotate_left(turn);
        let limit = first.len() + more;
        let mut ask: Vec<NodeId> = first;
        for id in all {
            if ask.len() >= limit {
                break;
            }
            if !ask.contains(&id) {
                ask.push(id);
            }
        }
        let asks = ask.into_iter().map(|node| {
            let view = view.clone();
            async move {
                let r = within(CALL_TIMEOUT, &node, async {
                    let mut c = self.conn(&node, &view).await?;
                    c.get_layout().await.map_err(|s| anyhow::anyhow!("{}", s.message()))
                })
                .await;
                match r {
                    // An agent behind the others (it missed a publication while the
                    // coordinator was away) is normal, not hostile: its older one is skipped.
                    Ok(signed)
                        if self.profile.pool().is_ok_and(|pool| {
                            shardfarm_proto::verify_layout(&signed, &pool)
                                .is_ok_and(|l| l.sequence < view.layout.sequence)
                        }) =>
                    {
                        false
                    }
                    Ok(signed) => match self.offer(&signed) {
                        Ok(newer) => newer,
                        Err(why) => {
                            self.progress.warn(&format!(
                                "refused the layout node {} serves: {why}",
                                node.short()
                            ));
                            false
                        }
                    },
                    Err(_) => false,
                }
            }
        });
        futures::future::join_all(asks).await.into_iter().any(|b| b)
    }

    async fn conn(&self, node: &NodeId, view: &PoolView) -> anyhow::Result<AgentClient> {
        let addr = view
            .layout
            .address(node)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| anyhow::anyhow!("node {} has no address in the layout", node.short()))?
            .to_string();
        self.conn_at(node, &addr).await
    }

    async fn conn_at(&self, node: &NodeId, addr: &str) -> anyhow::Result<AgentClient> {
        if let Some((a, c)) = self.conns.lock().unwrap().get(node)
            && a == addr
        {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(
            CONNECT_TIMEOUT,
            AgentClient::connect(addr, *node, self.signer.clone()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("node {} ({addr}) did not answer in time", node.short()))?
        .map_err(|e| {
            let why = shardfarm_proto::tls::why(&e);
            anyhow::anyhow!("node {} ({addr}) is unreachable: {why}", node.short())
        })?;
        self.conns.lock().unwrap().insert(*node, (addr.to_string(), c.clone()));
        Ok(c)
    }

    fn params(view: &PoolView) -> CodecParams {
        CodecParams {
            k: view.k,
            m: view.m,
            segment_size: view.segment_size,
            cipher: Cipher::preferred(),
        }
    }

    /// Stores an open file from its current position to its end and returns its read
    /// capability.
    pub async fn put(self: &Arc<Self>, file: std::fs::File) -> anyhow::Result<ReadCap> {
        use std::io::Seek;
        let mut file = file;
        let len = file.metadata()?.len().saturating_sub(file.stream_position()?);
        let reader = std::io::BufReader::with_capacity(1 << 20, file);
        self.put_reader(reader, len).await
    }

    /// Stores exactly `len` bytes read from `reader` (a blocking reader: it is read on a
    /// blocking thread) and returns the read capability. Fails, storing nothing the
    /// capability could name, if the reader ends early or errs.
    pub async fn put_reader(
        self: &Arc<Self>,
        reader: impl Read + Send + 'static,
        len: u64,
    ) -> anyhow::Result<ReadCap> {
        let view = self.view();
        let now = shardfarm_core::auth::now_ms() / 1000;
        let enc = Encoder::new(Self::params(&view), len, self.signer.key().clone(), now, 0)?;
        self.put_encoded(enc, &view, reader, len).await
    }

    /// Stores `data` under the object key `key` (so its capability can be derived again from
    /// whatever made the key): a gateway's namespace log lives at such derived ids.
    pub async fn put_with_key(
        self: &Arc<Self>,
        key: [u8; 32],
        data: Vec<u8>,
    ) -> anyhow::Result<ReadCap> {
        let view = self.view();
        let now = shardfarm_core::auth::now_ms() / 1000;
        let len = data.len() as u64;
        let enc =
            Encoder::with_key(Self::params(&view), len, self.signer.key().clone(), key, now, 0)?;
        self.put_encoded(enc, &view, std::io::Cursor::new(data), len).await
    }

    /// Stores exactly `len` bytes read from `reader` under the object key `key` (fresh and
    /// random: one key must never encrypt two contents), so that its capability
    /// ([`cap_for_key`](Self::cap_for_key)) is known, and can be recorded, before any byte is
    /// stored: the gateway's collector finds what a failed or abandoned write left.
    pub async fn put_reader_with_key(
        self: &Arc<Self>,
        key: [u8; 32],
        reader: impl Read + Send + 'static,
        len: u64,
    ) -> anyhow::Result<ReadCap> {
        let view = self.view();
        let now = shardfarm_core::auth::now_ms() / 1000;
        let enc =
            Encoder::with_key(Self::params(&view), len, self.signer.key().clone(), key, now, 0)?;
        self.put_encoded(enc, &view, reader, len).await
    }

    /// The capability of the object this client would store under `key`.
    pub fn cap_for_key(&self, key: [u8; 32]) -> ReadCap {
        let salt = salt_for(&key);
        let uploader = self.signer.key().verifying_key();
        ReadCap {
            pool: self.view().pool.clone(),
            pool_id: self.profile.pool().ok().map(|id| id.0),
            object_id: shardfarm_core::shard::object_id_for(&uploader, &salt),
            key,
            uploader: uploader.to_bytes(),
        }
    }

    async fn put_encoded(
        self: &Arc<Self>,
        mut enc: Encoder,
        view: &PoolView,
        reader: impl Read + Send + 'static,
        len: u64,
    ) -> anyhow::Result<ReadCap> {
        let cap = ReadCap {
            pool: view.pool.clone(),
            pool_id: Some(self.profile.pool()?.0),
            object_id: enc.object_id(),
            key: enc.key(),
            uploader: enc.uploader(),
        };
        let me = self.clone();
        let handle = tokio::runtime::Handle::current();
        self.progress.begin("put", len);
        let progress = self.progress.clone();
        let r = tokio::task::spawn_blocking(move || {
            // Segment i is stored while segment i + 1 is read and encoded (the agents' disk
            // work overlaps the client's CPU work); at most two segments are in memory.
            type Storing = tokio::task::JoinHandle<anyhow::Result<u64>>;
            let wait = |t: Storing| -> shardfarm_core::Result<()> {
                let plen = handle
                    .block_on(t)
                    .map_err(|e| shardfarm_core::Error::Malformed(format!("store task: {e}")))?
                    .map_err(|e| shardfarm_core::Error::Malformed(format!("{e:#}")))?;
                progress.advance(plen);
                Ok(())
            };
            let mut storing: Option<Storing> = None;
            let encoded = enc.encode_reader(reader, |seg| {
                let shards: Vec<Bytes> =
                    seg.shards.iter().map(|s| Bytes::copy_from_slice(s)).collect();
                let (me, header) = (me.clone(), seg.header.clone());
                let next = handle.spawn(async move {
                    me.store_segment(header.encode(), &header, shards).await?;
                    Ok(header.plaintext_len())
                });
                if let Some(previous) = storing.replace(next) {
                    wait(previous)?;
                }
                Ok(())
            });
            // The last segment's store, or (after an error) whatever is still in flight.
            let last = storing.map_or(Ok(()), wait);
            encoded.and(last)
        })
        .await;
        self.progress.finish();
        r??;
        Ok(cap)
    }

    /// Acks a segment needs: all but one when m ≥ 2 (repair rebuilds the missing shard, and
    /// until then any m − 1 more losses lose nothing), all when m ≤ 1.
    fn success_threshold(view: &PoolView) -> usize {
        if view.m >= 2 { view.n() - 1 } else { view.n() }
    }

    /// Sends the n shards of a segment to the nodes the layout names. When too few accept,
    /// the layout may have changed under the transfer: the client asks the coordinator for
    /// the newest one and, if there is one, sends the segment again by it.
    async fn store_segment(
        &self,
        header_bytes: Vec<u8>,
        header: &SegmentHeader,
        shards: Vec<Bytes>,
    ) -> anyhow::Result<()> {
        let header_bytes = Bytes::from(header_bytes);
        let first = self.store_segment_by(&self.view(), &header_bytes, header, &shards).await;
        match first {
            Err(e)
                if self
                    .refresh_from(self.view().holders(partition(
                        &header.object_id,
                        header.segment_index,
                        self.view().partitions,
                    )))
                    .await =>
            {
                self.progress.warn(&format!(
                    "{e:#}; the pool published layout {} meanwhile: sending the segment again",
                    self.view().layout.layout.version
                ));
                self.store_segment_by(&self.view(), &header_bytes, header, &shards).await
            }
            r => r,
        }
    }

    /// Sends the n shards of a segment to the nodes `view`'s layout names, in parallel.
    /// Success needs [`Self::success_threshold`] acks (see ARCHITECTURE.md, "Upload success
    /// threshold"); each failed shard is retried once.
    async fn store_segment_by(
        &self,
        view: &PoolView,
        header_bytes: &Bytes,
        header: &SegmentHeader,
        shards: &[Bytes],
    ) -> anyhow::Result<()> {
        let p = partition(&header.object_id, header.segment_index, view.partitions);
        let holders = view.holders(p);
        let mut tasks = FuturesUnordered::new();
        for (i, shard) in shards.iter().enumerate() {
            let node = holders[i];
            tasks.push(async move {
                let mut last = None;
                for _attempt in 0..2 {
                    let r = within(transfer_deadline(shard.len() as u64), &node, async {
                        let mut c = self.conn(&node, view).await?;
                        c.put_shard(header_bytes, i as u32, shard.clone()).await.map_err(|s| {
                            let (code, msg) = (code_name(s.code()), s.message().to_string());
                            anyhow::anyhow!("node {}: {code}: {msg}", node.short())
                        })
                    })
                    .await;
                    match r {
                        Ok(_) => return Ok(()),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.expect("at least one attempt"))
            });
        }
        let need = Self::success_threshold(view);
        let (mut stored, mut failures) = (0, Vec::new());
        // Once enough holders have acknowledged, the rest get a short grace: a stalled node
        // (it accepts connections and never answers) must not hold every segment up for its
        // full deadline; what it misses, repair rebuilds.
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let next = match grace {
                Some(until) => match tokio::time::timeout_at(until, tasks.next()).await {
                    Ok(n) => n,
                    Err(_) => {
                        let late = tasks.len();
                        failures.push(format!(
                            "{late} holder(s) did not answer within {} s of the others",
                            STRAGGLER_GRACE.as_secs()
                        ));
                        break;
                    }
                },
                None => tasks.next().await,
            };
            match next {
                Some(Ok(())) => stored += 1,
                Some(Err(e)) => failures.push(format!("{e:#}")),
                None => break,
            }
            if stored >= need && grace.is_none() {
                grace = Some(tokio::time::Instant::now() + STRAGGLER_GRACE);
            }
        }
        drop(tasks);
        if stored < need {
            bail!(
                "segment {} stored on {stored} of {} nodes; at least {need} are needed: {}",
                header.segment_index,
                view.n(),
                failures.join("; ")
            );
        }
        if !failures.is_empty() {
            self.progress.warn(&format!(
                "segment {} stored on {stored} of {} nodes; repair will rebuild the rest ({})",
                header.segment_index,
                view.n(),
                failures.join("; ")
            ));
        }
        Ok(())
    }

    fn check_cap(&self, cap: &ReadCap) -> anyhow::Result<()> {
        let view = self.view();
        if cap.pool != view.pool {
            bail!(
                "this capability is for pool `{}`, but this is pool `{}`: use the pool it came from",
                cap.pool,
                view.pool
            );
        }
        // An sf2: capability also names the pool key: a pool of the same name under another
        // key is another pool.
        let ours = self.profile.pool()?;
        if let Some(theirs) = cap.pool_id
            && theirs != ours.0
        {
            bail!(
                "this capability is for the pool whose key is {}, but the profile's pool key is \
                 {ours}: use the pool it came from",
                hex::encode(theirs)
            );
        }
        Ok(())
    }

    /// Fetches segment `index`: asks every holder, keeps the first k shards that verify
    /// against a header signed by the capability's uploader, cancels the rest. Falls back to
    /// the previous layout when the newest one cannot serve the segment, and asks the
    /// coordinator for a newer layout when neither can.
    async fn fetch_segment(self: Arc<Self>, cap: ReadCap, index: u32) -> anyhow::Result<Fetched> {
        let mut errors = Vec::new();
        for round in 0..2 {
            let view = self.view();
            let p = partition(&cap.object_id, index, view.partitions);
            let mut layouts = vec![view.holders(p)];
            if let Some(prev) = &view.layout.previous {
                layouts.push(prev.partitions[p as usize].clone());
            }
            for holders in layouts {
                match self.fetch_from(&view, &cap, index, &holders).await {
                    Ok(f) => return Ok(f),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            if round == 0 && !self.refresh().await {
                break;
            }
        }
        bail!("{}", errors.join("; then: "))
    }

    async fn fetch_from(
        self: &Arc<Self>,
        view: &Arc<PoolView>,
        cap: &ReadCap,
        index: u32,
        holders: &[NodeId],
    ) -> anyhow::Result<Fetched> {
        let k = usize::from(view.k);
        // Ask the k data-shard holders first (a segment whose data shards all arrive needs no
        // Reed-Solomon decode, and on a small machine the n − k other answers are pure waste);
        // ask one more holder for each that fails, and one more whenever none has answered for
        // HEDGE (a stalled node).
        let fetch = |i: usize| {
            let (me, view, node) = (self.clone(), view.clone(), holders[i]);
            let id = ShardId { object_id: cap.object_id, segment: index, shard: i as u32 };
            async move {
                let d = transfer_deadline(view.segment_size / u64::from(view.k.max(1)));
                let r = within(d, &node, async {
                    let mut c = me.conn(&node, &view).await?;
                    c.get_shard(id, 0, 0).await.map_err(|s| {
                        let (code, msg) = (code_name(s.code()), s.message().to_string());
                        anyhow::anyhow!("node {}: {code}: {msg}", node.short())
                    })
                })
                .await;
                (i, r)
            }
        };
        let mut tasks = FuturesUnordered::new();
        let mut asked = k.min(holders.len());
        for i in 0..asked {
            tasks.push(fetch(i));
        }
        let mut header: Option<(Vec<u8>, SegmentHeader)> = None;
        let mut good: Vec<Option<Vec<u8>>> = vec![None; holders.len()];
        let (mut have, mut failures) = (0, Vec::new());
        loop {
            let hedge = tokio::time::sleep(HEDGE);
            let next = tokio::select! {
                n = tasks.next() => n,
                _ = hedge, if asked < holders.len() => {
                    tasks.push(fetch(asked));
                    asked += 1;
                    continue;
                }
            };
            let Some((i, r)) = next else { break };
            let failed_before = failures.len();
            let shard = match r {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{e:#}"));
                    if asked < holders.len() {
                        tasks.push(fetch(asked));
                        asked += 1;
                    }
                    continue;
                }
            };
            let verified = match &header {
                Some((bytes, h)) if *bytes == shard.header => {
                    h.verify_shard(i, &shard.data).map(|_| None)
                }
                Some(_) => {
                    Err(shardfarm_core::Error::Malformed("header differs from the others".into()))
                }
                None => SegmentHeader::decode(&shard.header).and_then(|h| {
                    if h.uploader.to_bytes() != cap.uploader
                        || h.object_id != cap.object_id
                        || h.segment_index != index
                    {
                        return Err(shardfarm_core::Error::Malformed(
                            "header is not signed by this capability's uploader for this segment"
                                .into(),
                        ));
                    }
                    h.verify_shard(i, &shard.data)?;
                    Ok(Some(h))
                }),
            };
            match verified {
                Ok(h) => {
                    if let Some(h) = h {
                        header = Some((shard.header, h));
                    }
                    good[i] = Some(shard.data);
                    have += 1;
                    if have == k {
                        break; // dropping `tasks` cancels the slower requests
                    }
                }
                Err(e) => failures.push(format!("node {}: shard {i}: {e}", holders[i].short())),
            }
            if failures.len() > failed_before && asked < holders.len() {
                tasks.push(fetch(asked));
                asked += 1;
            }
        }
        drop(tasks);
        let Some((_, header)) = header else {
            bail!(
                "not enough shards for segment {index}: have 0, need {k} ({})",
                failures.join("; ")
            );
        };
        if have < k {
            bail!(
                "not enough shards for segment {index}: have {have}, need {k} ({})",
                failures.join("; ")
            );
        }
        Ok(Fetched { header, shards: good })
    }

    /// Whether the object is certainly not stored: at least m + 1 holders of its first
    /// segment answer NotFound, so fewer than k could hold it, while a stored object has at
    /// least n − 1 shards of every segment. Nodes that do not answer prove nothing.
    pub async fn absent(self: &Arc<Self>, cap: &ReadCap) -> bool {
        let view = self.view();
        let p = partition(&cap.object_id, 0, view.partitions);
        let tasks = view.holders(p).into_iter().enumerate().map(|(i, node)| {
            let (me, view) = (self.clone(), view.clone());
            let id = ShardId { object_id: cap.object_id, segment: 0, shard: i as u32 };
            async move {
                let call = async {
                    let mut c = me.conn(&node, &view).await.ok()?;
                    Some(c.get_shard(id, 0, 1).await)
                };
                matches!(
                    tokio::time::timeout(CALL_TIMEOUT, call).await,
                    Ok(Some(Err(s))) if s.code() == tonic::Code::NotFound
                )
            }
        });
        let not_found = futures::future::join_all(tasks).await.into_iter().filter(|&n| n).count();
        not_found > usize::from(view.m)
    }

    /// Reads an object into the file `path`. It is written to a temporary name beside it and
    /// renamed only when every segment has decoded and verified, so a failed get never leaves a
    /// partial file that looks complete. Returns the bytes written.
    pub async fn get_file(self: &Arc<Self>, cap: &ReadCap, path: &Path) -> anyhow::Result<u64> {
        self.check_cap(cap)?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".shardfarm-get-")
            .tempfile_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        let written = self.get_to(cap, tmp.as_file_mut()).await?;
        tmp.as_file().sync_all()?;
        tmp.persist(path)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {}", path.display(), e.error))?;
        Ok(written)
    }

    /// Reads an object into `out`, segment by segment as each decodes and verifies (a failure
    /// part-way leaves what was written so far). Returns the bytes written.
    pub async fn get_to(
        self: &Arc<Self>,
        cap: &ReadCap,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<u64> {
        self.get_range(cap, 0, u64::MAX, None, out).await
    }

    /// Reads bytes `start ..= end` (clamped to the object) into `out`, fetching only the
    /// segments the range touches. `segment_size` is the object's segment size if the caller
    /// knows it (else the pool's current one is tried, and corrected from the first header
    /// read). Returns the bytes written.
    pub async fn get_range(
        self: &Arc<Self>,
        cap: &ReadCap,
        start: u64,
        end: u64,
        segment_size: Option<u64>,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<u64> {
        self.check_cap(cap)?;
        let mut seg_size = segment_size.unwrap_or_else(|| self.view().segment_size).max(1);
        let whole = start == 0 && end == u64::MAX;
        let mut decoder = Decoder::default();
        let mut buf = Vec::new();
        let mut index = u32::try_from(start / seg_size).context("range start out of range")?;
        let mut next = Some(tokio::spawn(self.clone().fetch_segment(cap.clone(), index)));
        let mut first: Option<SegmentHeader> = None;
        let mut written = 0u64;
        let r = async {
            while let Some(task) = next.take() {
                let seg = task.await??;
                if first.is_none() && seg.header.segment_size != seg_size {
                    // The guess was wrong: start again at the right segment.
                    seg_size = seg.header.segment_size.max(1);
                    let right = u32::try_from(start / seg_size).context("range out of range")?;
                    if right != index {
                        index = right;
                        next = Some(tokio::spawn(self.clone().fetch_segment(cap.clone(), index)));
                        continue;
                    }
                }
                let first = first.get_or_insert_with(|| {
                    let len = seg.header.object_length;
                    let want = if whole {
                        len
                    } else {
                        end.min(len.saturating_sub(1)) + 1 - start.min(len)
                    };
                    self.progress.begin("get", want);
                    seg.header.clone()
                });
                if seg.header.object_length != first.object_length
                    || seg.header.segment_count != first.segment_count
                    || seg.header.segment_size != first.segment_size
                {
                    bail!("segment {index} disagrees with the first about the object's size");
                }
                let len = first.object_length;
                if len == 0 || start >= len {
                    if whole || len == 0 && start == 0 {
                        break;
                    }
                    bail!("range starts at {start}, past the object's {len} bytes");
                }
                let last = end.min(len - 1);
                let last_index = (last / seg_size) as u32;
                if index < last_index {
                    next = Some(tokio::spawn(self.clone().fetch_segment(cap.clone(), index + 1)));
                }
                let seg_start = u64::from(index) * seg_size;
                tokio::task::block_in_place(|| -> anyhow::Result<()> {
                    let refs: Vec<Option<&[u8]>> =
                        seg.shards.iter().map(|s| s.as_deref()).collect();
                    decoder.decode_segment_into(&cap.key, &seg.header, &refs, &mut buf)?;
                    let from = start.saturating_sub(seg_start) as usize;
                    let to = ((last + 1 - seg_start) as usize).min(buf.len());
                    out.write_all(&buf[from.min(to)..to])?;
                    written += (to - from.min(to)) as u64;
                    self.progress.advance((to - from.min(to)) as u64);
                    Ok(())
                })?;
                index += 1;
            }
            Ok(())
        }
        .await;
        if first.is_some() {
            self.progress.finish();
        }
        r?;
        let first = first.context("no segment was read")?;
        if whole && written != first.object_length {
            bail!("decoded {written} bytes but the object has {}", first.object_length);
        }
        out.flush()?;
        Ok(written)
    }

    /// Audits every shard of the object: which nodes hold it and whether their copy verifies.
    pub async fn stat(self: &Arc<Self>, cap: &ReadCap) -> anyhow::Result<ObjectStat> {
        self.check_cap(cap)?;
        let mut segments = Vec::new();
        let mut first: Option<SegmentHeader> = None;
        let mut index = 0u32;
        loop {
            let (st, header) = self.stat_segment(cap, index).await;
            let header = match (header, &first) {
                (Some(h), _) => h,
                (None, Some(f)) => f.clone(),
                (None, None) => bail!(
                    "no node answers for this object's first segment ({} of {} present): it is lost, deleted, or not in this pool",
                    st.present,
                    st.total
                ),
            };
            if first.is_none() {
                first = Some(header.clone());
            }
            segments.push(st);
            index += 1;
            if index >= header.segment_count {
                break;
            }
        }
        let f = first.expect("set above");
        Ok(ObjectStat { length: f.object_length, pool: cap.pool.clone(), k: f.k, m: f.m, segments })
    }

    async fn stat_segment(
        self: &Arc<Self>,
        cap: &ReadCap,
        index: u32,
    ) -> (SegmentStat, Option<SegmentHeader>) {
        let view = self.view();
        let p = partition(&cap.object_id, index, view.partitions);
        let holders = view.holders(p);
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("OS random generator");
        let tasks = holders.iter().enumerate().map(|(i, node)| {
            let me = self.clone();
            let view = view.clone();
            let id = ShardId { object_id: cap.object_id, segment: index, shard: i as u32 };
            async move {
                let call = async {
                    let mut c = me.conn(node, &view).await?;
                    c.audit(id, &nonce, 1).await.map_err(anyhow::Error::from)
                };
                let ans = within(CALL_TIMEOUT, node, call).await.ok()?;
                let h = SegmentHeader::decode(&ans.segment_header).ok()?;
                if h.uploader.to_bytes() != cap.uploader || h.object_id != cap.object_id {
                    return None;
                }
                let leaves: Vec<_> = ans
                    .leaves
                    .iter()
                    .map(|l| shardfarm_core::audit::ProvenLeaf {
                        index: l.index as usize,
                        data: l.data.to_vec(),
                        proof: l.proof.iter().filter_map(|p| p[..].try_into().ok()).collect(),
                    })
                    .collect();
                shardfarm_core::audit::verify_answer(&h, i, &nonce, 1, &leaves).ok()?;
                Some(h)
            }
        });
        let answers = futures::future::join_all(tasks).await;
        let missing: Vec<usize> =
            answers.iter().enumerate().filter(|(_, a)| a.is_none()).map(|(i, _)| i).collect();
        let header = answers.into_iter().flatten().next();
        let st = SegmentStat {
            index,
            present: holders.len() - missing.len(),
            total: holders.len(),
            holders: holders.iter().map(NodeId::to_hex).collect(),
            missing,
        };
        (st, header)
    }

    /// Deletes every shard of the object (only its uploader may). Returns shards deleted.
    pub async fn rm(self: &Arc<Self>, cap: &ReadCap) -> anyhow::Result<usize> {
        self.check_cap(cap)?;
        if self.signer.key().verifying_key().to_bytes() != cap.uploader {
            bail!("only the uploader may delete this object (it was stored by another key)");
        }
        // One uploader-signed tombstone for the whole object, to every node of either layout:
        // the holders of every segment (whatever the layout, even with segment 0 lost) delete
        // their shards, and every node refuses the object from now on. A node that does not
        // answer learns of it from its peers' tombstones when it is back.
        let now = shardfarm_core::auth::now_ms();
        let t = Tombstone::sign(self.signer.key(), salt_for(&cap.key), now);
        if t.object_id != cap.object_id {
            bail!("this capability's object id does not derive from its key and uploader");
        }
        let tombstone = t.encode();
        let view = self.view();
        let nodes = view.nodes();
        let mut tasks = FuturesUnordered::new();
        for node in &nodes {
            let (tombstone, view) = (&tombstone, &view);
            tasks.push(within(CALL_TIMEOUT, node, async move {
                let mut c = self.conn(node, view).await?;
                c.delete_object(tombstone).await.map_err(|s| {
                    let (code, msg) = (code_name(s.code()), s.message().to_string());
                    anyhow::anyhow!("node {}: {code}: {msg}", node.short())
                })
            }));
        }
        let (mut deleted, mut answered, mut silent) = (0usize, 0usize, Vec::new());
        while let Some(r) = tasks.next().await {
            match r {
                Ok(n) => {
                    deleted += n as usize;
                    answered += 1;
                }
                Err(e) => silent.push(format!("{e:#}")),
            }
        }
        if answered == 0 {
            bail!("no node accepted the deletion: {}", silent.join("; "));
        }
        if !silent.is_empty() {
            self.progress.warn(&format!(
                "{} of {} nodes did not answer; they delete the object when they are back ({})",
                silent.len(),
                nodes.len(),
                silent.join("; ")
            ));
        }
        Ok(deleted)
    }

    /// The coordinator's view of the members (standing, reputation, rewards), if it answers.
    pub async fn members(&self) -> Option<Vec<shardfarm_proto::pb::NodeStatus>> {
        let pool = self.profile.pool().ok()?;
        let r = async {
            let mut c =
                CoordinatorClient::connect(&self.profile.coordinator, self.signer.clone(), pool)
                    .await
                    .ok()?;
            c.list_nodes().await.ok()
        };
        tokio::time::timeout(CALL_TIMEOUT, r).await.ok().flatten().map(|r| r.nodes)
    }

    /// Asks every member (and every node the layout names) for its state, and the coordinator
    /// for their standing.
    pub async fn nodes(self: &Arc<Self>) -> Vec<NodeStatus> {
        let members: HashMap<NodeId, shardfarm_proto::pb::NodeStatus> = self
            .members()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| Some((NodeId(m.node_id[..].try_into().ok()?), m)))
            .collect();
        let view = self.view();
        let mut ids: BTreeSet<NodeId> = view.nodes();
        ids.extend(members.keys().copied());
        let (members, view) = (&members, &view);
        let tasks = ids.into_iter().map(|id| {
            let me = self.clone();
            async move {
                let m = members.get(&id);
                let addr = view
                    .layout
                    .address(&id)
                    .map(str::to_string)
                    .or_else(|| m.map(|m| m.grpc_address.clone()))
                    .unwrap_or_default();
                let info = async { me.conn_at(&id, &addr).await.ok()?.info().await.ok() };
                let info = tokio::time::timeout(CONNECT_TIMEOUT, info).await.ok().flatten();
                let label = |k: &str| m.and_then(|m| m.labels.get(k).cloned());
                NodeStatus {
                    id: id.to_hex(),
                    address: addr,
                    zone: label("zone").or_else(|| label("farm")).unwrap_or_default(),
                    state: if info.is_some() { "up" } else { "down" }.into(),
                    capacity_bytes: info.as_ref().map_or(0, |i| i.capacity_bytes),
                    used_bytes: info.as_ref().map_or(0, |i| i.used_bytes),
                    shards: info.as_ref().map_or(0, |i| i.shards),
                    reputation: m.map(|m| m.audit_score),
                    standing: m.map(|m| m.standing.clone()),
                    uptime: m.map(|m| m.uptime),
                    slots: m.map(|m| m.slots),
                    rewards: m.map(|m| (m.rewards_rw1, m.rewards_rw2)),
                }
            }
        });
        futures::future::join_all(tasks).await
    }
}

// ---- Layouts without the coordinator ----
//
// The data path needs no control plane. A layout publication is signed by the pool key the
// profile pins, so it is as good from an agent as from the coordinator: a client starts from
// the publication it saved last time, asks the coordinator, the profile's seeds and some
// agents of that saved layout at once, and passes every answer through its LayoutGuard
// (pinned pool key, never older, never forked). What a hostile agent serves (an older genuine
// publication, one signed by another key) is refused or superseded by the newer ones the
// others serve. While the coordinator's watch is down, the client polls agents instead.

/// How long bootstrap waits for more answers once one publication was accepted: the
/// coordinator and the seeds are asked at once, and a newer publication may be a moment
/// behind the first.
const SETTLE: Duration = Duration::from_millis(500);

/// Agents of the saved layout asked beside the coordinator and the seeds at start-up.
const BOOTSTRAP_AGENTS: usize = 6;

/// Agents asked for their publication on each poll while the coordinator's watch is down.
const POLL_AGENTS: usize = 2;

/// How often agents are polled while the coordinator's watch is down.
const POLL_EVERY: Duration = Duration::from_secs(3);

/// Largest saved publication read back (1024 partitions of RS(10,4) are ~100 KiB).
const MAX_CACHE_BYTES: u64 = 16 << 20;

/// Where a client may read the pool's layout.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// The coordinator (it proves the pool key).
    Coordinator(String),
    /// An agent, by id when known (else learnt in the handshake), at an address.
    Agent(Option<NodeId>, String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Coordinator(a) => write!(f, "the coordinator at {a}"),
            Source::Agent(Some(id), a) => write!(f, "node {} ({a})", id.short()),
            Source::Agent(None, a) => write!(f, "the seed {a}"),
        }
    }
}

/// One source's answer: the publication as signed, and the coordinator's unsigned settings
/// (only asked of a coordinator whose publications predate signed settings).
struct Answer {
    signed: shardfarm_proto::pb::SignedLayout,
    info: Option<shardfarm_proto::pb::PoolInfo>,
}

async fn ask(source: &Source, signer: &Arc<Signer>, pool: NodeId) -> anyhow::Result<Answer> {
    let call = |s: tonic::Status| anyhow::anyhow!("{}: {}", code_name(s.code()), s.message());
    let dial = |e: tonic::transport::Error| {
        anyhow::anyhow!("unreachable: {}", shardfarm_proto::tls::why(&e))
    };
    match source {
        Source::Coordinator(addr) => {
            let mut c =
                CoordinatorClient::connect(addr, signer.clone(), pool).await.map_err(dial)?;
            let published = c.get_layout().await.map_err(call)?;
            let signed = published.signed.as_deref().cloned().context("an unsigned layout")?;
            let info = match published.pool {
                Some(_) => None,
                None => Some(c.get_pool().await.map_err(call)?),
            };
            Ok(Answer { signed, info })
        }
        Source::Agent(id, addr) => {
            let mut c = match id {
                Some(id) => AgentClient::connect(addr, *id, signer.clone()).await.map_err(dial)?,
                None => AgentClient::discover(addr, signer.clone())
                    .await
                    .map_err(dial)?
                    .context("a plaintext seed proves no node id: name it as NODEID@host:port")?,
            };
            Ok(Answer { signed: c.get_layout().await.map_err(call)?, info: None })
        }
    }
}

/// The publication saved beside the profile, if any (a file that does not read is ignored;
/// one the guard refuses is reported).
fn read_cache(path: &Path) -> Option<shardfarm_proto::pb::SignedLayout> {
    use prost::Message;
    let f = std::fs::File::open(path).ok()?;
    if f.metadata().ok()?.len() > MAX_CACHE_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(MAX_CACHE_BYTES).read_to_end(&mut bytes).ok()?;
    shardfarm_proto::pb::SignedLayout::decode(&bytes[..]).ok()
}

/// Saves `signed` as the starting point of the next run (atomically; best effort).
fn write_cache(path: &Path, signed: &shardfarm_proto::pb::SignedLayout) {
    use prost::Message;
    let tmp = path.with_extension(format!("layout.tmp{}", std::process::id()));
    let ok =
        std::fs::write(&tmp, signed.encode_to_vec()).is_ok() && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Everyone a starting client asks: the coordinator, the profile's seeds, and up to
/// [`BOOTSTRAP_AGENTS`] agents of the saved layout, each address once.
fn sources(profile: &PoolProfile, saved: Option<&PublishedLayout>) -> Vec<Source> {
    let mut out = vec![Source::Coordinator(profile.coordinator.clone())];
    let mut seen: BTreeSet<String> = [profile.coordinator.clone()].into();
    for (id, addr) in profile.seed_list() {
        if seen.insert(addr.clone()) {
            out.push(Source::Agent(id, addr));
        }
    }
    if let Some(l) = saved {
        // A different start on each run, so one dead agent is not always asked first.
        let skip = (shardfarm_core::auth::now_ms() as usize) % l.addresses.len().max(1);
        let mut agents: Vec<_> = l.addresses.iter().collect();
        agents.rotate_left(skip);
        for (id, addr) in agents.into_iter().take(BOOTSTRAP_AGENTS) {
            if !addr.is_empty() && seen.insert(addr.clone()) {
                out.push(Source::Agent(Some(*id), addr.clone()));
            }
        }
    }
    out
}

/// Reads the pool's settings and newest layout from whichever sources answer (see the
/// section comment), starting from the publication saved beside the profile.
async fn bootstrap(
    profile: &PoolProfile,
    signer: &Arc<Signer>,
    guard: &mut LayoutGuard,
    progress: &dyn Progress,
) -> anyhow::Result<PoolView> {
    let cache = profile.layout_cache();
    let mut best: Option<PublishedLayout> = None;
    if let Some(saved) = cache.as_deref().and_then(read_cache) {
        match guard.accept(&saved) {
            Ok(l) => best = l,
            Err(e) => progress.warn(&format!("the saved layout is refused: {e}")),
        }
    }
    let pool = guard.pool();
    let mut asks: FuturesUnordered<_> = sources(profile, best.as_ref())
        .into_iter()
        .map(|src| async move {
            let r = tokio::time::timeout(CALL_TIMEOUT, ask(&src, signer, pool)).await;
            let r = r.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within 10 s")));
            (src, r)
        })
        .collect();
    let (mut info, mut errors, mut fresh) = (None, Vec::new(), false);
    let mut settle: Option<tokio::time::Instant> = None;
    loop {
        let next = match settle {
            Some(at) => tokio::time::timeout_at(at, asks.next()).await.ok().flatten(),
            None => asks.next().await,
        };
        let Some((src, answer)) = next else { break };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                errors.push(format!("{src}: {e:#}"));
                continue;
            }
        };
        if let (Source::Coordinator(_), Some(i)) = (&src, answer.info) {
            info = Some(i);
        }
        match guard.accept(&answer.signed) {
            Ok(Some(l)) => {
                best = Some(l);
                fresh = true;
            }
            Ok(None) => {}
            Err(e) => {
                // A refused publication is not an answer: keep asking the others.
                progress.warn(&format!("refused the layout {src} serves: {e}"));
                errors.push(format!("{src}: refused its layout: {e}"));
                continue;
            }
        }
        settle.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
    }
    let Some(layout) = best else {
        bail!("no source of the pool answered with its layout: {}", errors.join("; "));
    };
    if settle.is_none() {
        progress.warn(&format!(
            "no source of the pool answered ({}); starting from the layout saved in {}",
            errors.join("; "),
            cache.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_default()
        ));
    }
    let Some(info) = layout.pool.clone().or(info) else {
        bail!(
            "the pool's layout carries no settings and its coordinator did not answer GetPool: {}",
            errors.join("; ")
        );
    };
    if fresh && let (Some(path), Some(signed)) = (&cache, &layout.signed) {
        write_cache(path, signed);
    }
    PoolView::new(info, layout)
}

/// Follows the pool's layout publications for as long as the client lives: the
/// coordinator's watch while it answers (reconnecting after 1 s, doubling to 10 s), and
/// [`POLL_AGENTS`] agents every [`POLL_EVERY`] while it does not.
async fn follow_layouts(client: Weak<PoolClient>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let Some(me) = client.upgrade() else { return };
        let (addr, signer, pool) =
            (me.profile.coordinator.clone(), me.signer.clone(), me.profile.pool());
        drop(me);
        let Ok(pool) = pool else { return };
        let stream = async {
            let mut c = CoordinatorClient::connect(&addr, signer, pool).await.ok()?;
            c.watch_layout().await.ok()
        };
        if let Ok(Some(mut stream)) = tokio::time::timeout(CALL_TIMEOUT, stream).await {
            backoff = Duration::from_secs(1);
            while let Ok(Some(signed)) = stream.message().await {
                let Some(me) = client.upgrade() else { return };
                if let Err(why) = me.offer(&signed) {
                    me.progress.warn(&format!("refused a layout from the coordinator: {why}"));
                }
            }
        }
        // The watch is down: the agents carry the publications meanwhile.
        let until = tokio::time::Instant::now() + backoff;
        loop {
            let Some(me) = client.upgrade() else { return };
            me.poll_agents(Vec::new(), POLL_AGENTS).await;
            drop(me);
            tokio::time::sleep(POLL_EVERY.min(backoff)).await;
            if tokio::time::Instant::now() >= until {
                break;
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}
