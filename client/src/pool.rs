//! A client bound to one pool: put, get, stat, rm, nodes.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use shardfarm_core::cap::ReadCap;
use shardfarm_core::codec::{CodecParams, Decoder, Encoder};
use shardfarm_core::shard::{Cipher, SegmentHeader, ShardId, partition, salt_for};
use shardfarm_core::tombstone::Tombstone;
use shardfarm_proto::{AgentClient, Signer};

use crate::farm::{CLIENT_KEY, ClientKey, Farm};

/// How long to wait for a node to accept a connection before calling it unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a small call (stat's audit, rm's delete) may take before its node counts as not
/// answering: a stalled node (SIGSTOPped, black-holed) accepts connections and never answers.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A shard transfer's deadline: [`CALL_TIMEOUT`] plus one second per MiB (a 1 MiB/s floor).
fn transfer_deadline(bytes: u64) -> Duration {
    CALL_TIMEOUT + Duration::from_secs(bytes >> 20)
}

/// Runs `f` against `node` within `d`.
async fn within<T>(
    d: Duration,
    node: usize,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| anyhow::anyhow!("node {node} did not answer within {} s", d.as_secs()))?
}

/// A client bound to one farm.
pub struct FarmClient {
    /// The farm description.
    pub farm: Farm,
    signer: Arc<Signer>,
    conns: Mutex<HashMap<usize, AgentClient>>,
    progress: Arc<dyn Progress>,
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

impl FarmClient {
    /// Opens the farm in `dir` with the local user's delegated key.
    pub fn open(dir: &Path) -> anyhow::Result<Arc<Self>> {
        Self::open_with(dir, Arc::new(Silent))
    }

    /// Opens the farm in `dir`, reporting long work to `progress`.
    pub fn open_with(dir: &Path, progress: Arc<dyn Progress>) -> anyhow::Result<Arc<Self>> {
        let farm = Farm::load(dir)?;
        let ck = ClientKey::load(&dir.join(CLIENT_KEY))
            .with_context(|| format!("reading the client key in {}", dir.display()))?;
        let security = shardfarm_proto::Security::from_flag(farm.insecure_plaintext);
        let signer = Arc::new(Signer::delegated(ck.cert, ck.key).with_security(security));
        Ok(Arc::new(FarmClient { farm, signer, conns: Mutex::new(HashMap::new()), progress }))
    }

    async fn conn(&self, node: usize) -> anyhow::Result<AgentClient> {
        if let Some(c) = self.conns.lock().unwrap().get(&node) {
            return Ok(c.clone());
        }
        let addr = &self.farm.nodes[node].grpc;
        let id = shardfarm_core::identity::NodeId::from_hex(&self.farm.nodes[node].id)
            .map_err(|_| anyhow::anyhow!("node {node} ({addr}) has no known id yet"))?;
        let c = tokio::time::timeout(
            CONNECT_TIMEOUT,
            AgentClient::connect(addr, id, self.signer.clone()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("node {node} ({addr}) did not answer in time"))?
        .map_err(|e| {
            let why = shardfarm_proto::tls::why(&e);
            anyhow::anyhow!("node {node} ({addr}) is unreachable: {why}")
        })?;
        self.conns.lock().unwrap().insert(node, c.clone());
        Ok(c)
    }

    fn params(&self) -> CodecParams {
        CodecParams {
            k: self.farm.k,
            m: self.farm.m,
            segment_size: self.farm.segment_size,
            cipher: Cipher::preferred(),
        }
    }

    /// Stores an open file from its current position to its end (its length must be known
    /// up front: spool a pipe to a temporary file first) and returns its read capability.
    pub async fn put(self: &Arc<Self>, file: std::fs::File) -> anyhow::Result<ReadCap> {
        use std::io::Seek;
        let mut file = file;
        let len = file.metadata()?.len().saturating_sub(file.stream_position()?);
        let now = shardfarm_core::auth::now_ms() / 1000;
        let mut enc = Encoder::new(self.params(), len, self.signer.key().clone(), now, 0)?;
        let cap = ReadCap {
            pool: self.farm.pool.clone(),
            pool_id: self.pool_id()?.map(|id| id.0),
            object_id: enc.object_id(),
            key: enc.key(),
            uploader: enc.uploader(),
        };
        let me = self.clone();
        let handle = tokio::runtime::Handle::current();
        self.progress.begin("put", len);
        let progress = self.progress.clone();
        let r = tokio::task::spawn_blocking(move || {
            let reader = std::io::BufReader::with_capacity(1 << 20, file);
            enc.encode_reader(reader, |seg| {
                let shards: Vec<Bytes> =
                    seg.shards.iter().map(|s| Bytes::copy_from_slice(s)).collect();
                let plen = seg.header.plaintext_len();
                handle
                    .block_on(me.store_segment(seg.header.encode(), &seg.header, shards))
                    .map_err(|e| shardfarm_core::Error::Malformed(format!("{e:#}")))?;
                progress.advance(plen);
                Ok(())
            })
        })
        .await;
        self.progress.finish();
        r??;
        Ok(cap)
    }

    /// Acks a segment needs: all but one when m ≥ 2 (repair rebuilds the missing shard, and
    /// until then any m − 1 more losses lose nothing), all when m ≤ 1.
    fn success_threshold(&self) -> usize {
        if self.farm.m >= 2 { self.farm.n() - 1 } else { self.farm.n() }
    }

    /// Sends the n shards of a segment to the nodes the layout names, in parallel. Success
    /// needs [`Self::success_threshold`] acks (see ARCHITECTURE.md, "Upload success
    /// threshold"); each failed shard is retried once.
    async fn store_segment(
        &self,
        header_bytes: Vec<u8>,
        header: &SegmentHeader,
        shards: Vec<Bytes>,
    ) -> anyhow::Result<()> {
        let p = partition(&header.object_id, header.segment_index, self.farm.partitions);
        let holders = self.farm.layout[p as usize].clone();
        let header_bytes = Bytes::from(header_bytes);
        let mut tasks = FuturesUnordered::new();
        for (i, shard) in shards.into_iter().enumerate() {
            let node = holders[i];
            let hb = header_bytes.clone();
            tasks.push(async move {
                let mut last = None;
                for _attempt in 0..2 {
                    let r = within(transfer_deadline(shard.len() as u64), node, async {
                        let mut c = self.conn(node).await?;
                        c.put_shard(&hb, i as u32, shard.clone()).await.map_err(|s| {
                            anyhow::anyhow!("node {node}: {}: {}", code_name(s.code()), s.message())
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
        let mut failures = Vec::new();
        while let Some(r) = tasks.next().await {
            if let Err(e) = r {
                failures.push(format!("{e:#}"));
            }
        }
        let stored = self.farm.n() - failures.len();
        if stored < self.success_threshold() {
            bail!(
                "segment {} stored on {stored} of {} nodes; at least {} are needed: {}",
                header.segment_index,
                self.farm.n(),
                self.success_threshold(),
                failures.join("; ")
            );
        }
        if !failures.is_empty() {
            self.progress.warn(&format!(
                "segment {} stored on {stored} of {} nodes; repair will rebuild the rest ({})",
                header.segment_index,
                self.farm.n(),
                failures.join("; ")
            ));
        }
        Ok(())
    }

    fn check_cap(&self, cap: &ReadCap) -> anyhow::Result<()> {
        if cap.pool != self.farm.pool {
            bail!(
                "this capability is for pool `{}`, but the farm serves pool `{}`: use the farm it came from",
                cap.pool,
                self.farm.pool
            );
        }
        // An sf2: capability also names the pool key: a pool of the same name under another
        // key is another pool.
        if let (Some(theirs), Some(ours)) = (cap.pool_id, self.pool_id()?)
            && theirs != ours.0
        {
            bail!(
                "this capability is for the pool whose key is {}, but this farm's pool key is \
                 {ours}: use the farm it came from",
                hex::encode(theirs)
            );
        }
        Ok(())
    }

    /// The farm's pool id, if the farm file names one.
    fn pool_id(&self) -> anyhow::Result<Option<shardfarm_core::identity::NodeId>> {
        let Some(hex) = &self.farm.pool_id else { return Ok(None) };
        let id = shardfarm_core::identity::NodeId::from_hex(hex)
            .map_err(|e| anyhow::anyhow!("farm file: pool_id: {e}"))?;
        Ok(Some(id))
    }

    /// Fetches segment `index`: asks every holder, keeps the first k shards that verify
    /// against a header signed by the capability's uploader, cancels the rest. Falls back to
    /// the previous layout when the newest one cannot serve the segment.
    async fn fetch_segment(self: Arc<Self>, cap: ReadCap, index: u32) -> anyhow::Result<Fetched> {
        let p = partition(&cap.object_id, index, self.farm.partitions);
        let mut layouts = vec![self.farm.layout[p as usize].clone()];
        if let Some(prev) = &self.farm.previous_layout {
            layouts.push(prev[p as usize].clone());
        }
        let mut errors = Vec::new();
        for holders in layouts {
            match self.fetch_from(&cap, index, &holders).await {
                Ok(f) => return Ok(f),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        bail!("{}", errors.join("; then, with the previous layout: "))
    }

    async fn fetch_from(
        self: &Arc<Self>,
        cap: &ReadCap,
        index: u32,
        holders: &[usize],
    ) -> anyhow::Result<Fetched> {
        let k = usize::from(self.farm.k);
        let mut tasks = FuturesUnordered::new();
        for (i, &node) in holders.iter().enumerate() {
            let me = self.clone();
            let id = ShardId { object_id: cap.object_id, segment: index, shard: i as u32 };
            tasks.push(async move {
                let d = transfer_deadline(me.farm.segment_size / u64::from(me.farm.k.max(1)));
                let r = within(d, node, async {
                    let mut c = me.conn(node).await?;
                    c.get_shard(id, 0, 0).await.map_err(|s| {
                        anyhow::anyhow!("node {node}: {}: {}", code_name(s.code()), s.message())
                    })
                })
                .await;
                (i, r)
            });
        }
        let mut header: Option<(Vec<u8>, SegmentHeader)> = None;
        let mut good: Vec<Option<Vec<u8>>> = vec![None; holders.len()];
        let (mut have, mut failures) = (0, Vec::new());
        while let Some((i, r)) = tasks.next().await {
            let shard = match r {
                Ok(s) => s,
                Err(e) => {
                    failures.push(format!("{e:#}"));
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
                Err(e) => failures.push(format!("node {}: shard {i}: {e}", holders[i])),
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
        self.check_cap(cap)?;
        let mut decoder = Decoder::default();
        let mut buf = Vec::new();
        // Segment i+1 is fetched while segment i is decoded and written.
        let mut next = Some(tokio::spawn(self.clone().fetch_segment(cap.clone(), 0)));
        let mut first: Option<SegmentHeader> = None;
        let (mut written, mut index) = (0u64, 0u32);
        let r = async {
            while let Some(task) = next.take() {
                let seg = task.await??;
                let first = first.get_or_insert_with(|| {
                    self.progress.begin("get", seg.header.object_length);
                    seg.header.clone()
                });
                if seg.header.object_length != first.object_length
                    || seg.header.segment_count != first.segment_count
                {
                    bail!("segment {index} disagrees with segment 0 about the object's size");
                }
                if index + 1 < first.segment_count {
                    next = Some(tokio::spawn(self.clone().fetch_segment(cap.clone(), index + 1)));
                }
                tokio::task::block_in_place(|| -> anyhow::Result<()> {
                    let refs: Vec<Option<&[u8]>> =
                        seg.shards.iter().map(|s| s.as_deref()).collect();
                    decoder.decode_segment_into(&cap.key, &seg.header, &refs, &mut buf)?;
                    out.write_all(&buf)?;
                    Ok(())
                })?;
                written += buf.len() as u64;
                self.progress.advance(buf.len() as u64);
                index += 1;
            }
            Ok(())
        }
        .await;
        if first.is_some() {
            self.progress.finish();
        }
        r?;
        let first = first.expect("at least one segment");
        if written != first.object_length {
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
                    "no node answers for this object's first segment ({} of {} present): it is lost, deleted, or not in this farm",
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
        let p = partition(&cap.object_id, index, self.farm.partitions);
        let holders = self.farm.layout[p as usize].clone();
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("OS random generator");
        let tasks = holders.iter().enumerate().map(|(i, &node)| {
            let me = self.clone();
            let id = ShardId { object_id: cap.object_id, segment: index, shard: i as u32 };
            async move {
                let call = async {
                    let mut c = me.conn(node).await?;
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
            holders: holders.iter().map(|&n| self.farm.nodes[n].id.clone()).collect(),
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
        // One uploader-signed tombstone for the whole object, to every node of the pool: the
        // holders of every segment (whatever the layout, even with segment 0 lost) delete
        // their shards, and every node refuses the object from now on. A node that does not
        // answer learns of it from its peers' tombstones when it is back.
        let now = shardfarm_core::auth::now_ms();
        let t = Tombstone::sign(self.signer.key(), salt_for(&cap.key), now);
        if t.object_id != cap.object_id {
            bail!("this capability's object id does not derive from its key and uploader");
        }
        let tombstone = t.encode();
        let mut tasks = FuturesUnordered::new();
        for node in 0..self.farm.nodes.len() {
            let tombstone = &tombstone;
            tasks.push(within(CALL_TIMEOUT, node, async move {
                let mut c = self.conn(node).await?;
                c.delete_object(tombstone).await.map_err(|s| {
                    anyhow::anyhow!("node {node}: {}: {}", code_name(s.code()), s.message())
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
                self.farm.nodes.len(),
                silent.join("; ")
            ));
        }
        Ok(deleted)
    }

    /// The coordinator's view of the members (standing, reputation, rewards), if it answers.
    pub async fn members(&self) -> Option<Vec<shardfarm_proto::pb::NodeStatus>> {
        let addr = self.farm.coordinator.as_ref()?;
        let pool = shardfarm_core::identity::NodeId::from_hex(self.farm.pool_id.as_ref()?).ok()?;
        let r = async {
            let mut c =
                shardfarm_proto::CoordinatorClient::connect(addr, self.signer.clone(), pool)
                    .await
                    .ok()?;
            c.list_nodes().await.ok()
        };
        tokio::time::timeout(CONNECT_TIMEOUT, r).await.ok().flatten().map(|r| r.nodes)
    }

    /// Asks every node for its state, and the coordinator for their standing.
    pub async fn nodes(self: &Arc<Self>) -> Vec<NodeStatus> {
        let members: HashMap<String, shardfarm_proto::pb::NodeStatus> = self
            .members()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|m| (hex::encode(&m.node_id), m))
            .collect();
        let members = &members;
        let tasks = self.farm.nodes.iter().map(|n| {
            let me = self.clone();
            async move {
                let info = async { me.conn(n.index).await.ok()?.info().await.ok() };
                let info = tokio::time::timeout(CONNECT_TIMEOUT, info).await.ok().flatten();
                let m = members.get(&n.id);
                NodeStatus {
                    id: n.id.clone(),
                    address: n.grpc.clone(),
                    zone: n.zone.clone(),
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

fn code_name(c: tonic::Code) -> String {
    format!("{c:?}")
}
