//! Abuse load benchmark (issue 14): honest clients mixing put, get, stat and list against a
//! running local farm for a bounded time, optionally while an abusive client floods every agent
//! and the coordinator with requests that must all be refused. Prints figures, asserts nothing.
//!
//! `scripts/bench-abuse.sh` builds the workspace, starts a farm, runs this binary once per
//! phase (baseline, flood, longer flood) and samples each agent's RSS around it. To run it by
//! hand against a farm from `shardfarm local up --data DIR`:
//!
//! ```sh
//! cargo build --workspace --all-targets        # the binary is target/debug/deps/abuse-<hash>
//! abuse-<hash> --farm DIR --seconds 20 --clients 64 --flood
//! ```
//!
//! Not through `cargo bench`: that builds the release profile, RocksDB's C++ included (15 min).
//!
//! ## Honest side
//!
//! Each of `--clients` clients is the real client library ([`PoolClient`]) with a key of its
//! own: a fresh delegation from the farm root, as 64 users of one pool would have (with
//! `--shared-key` they all use the farm's `client.key`, as one user on 64 connections; they
//! then share one identity's replay-cache share on every agent). A client loops until the
//! deadline over a random mix: put of a 4–256 KiB random object (30 %), get of one of its own
//! objects, compared byte for byte (40 %), stat (20 %, every shard must answer an audit) and
//! list (`nodes`: every agent's Info and the coordinator's ListNodes, 10 %). Latency is timed
//! around the library call only; anything that is not a clean success is an error.
//!
//! ## Flood
//!
//! The abusive client dials every agent and the coordinator directly with the generated gRPC
//! clients (`--flood-connections` HTTP/2 connections per target, `--flood-streams` requests in
//! flight on each) and sends, in rotation, as fast as it can:
//!
//! - `unsigned`: no envelope metadata at all;
//! - `unmined`: a well-formed envelope signed by an identity mined below the pool's difficulty;
//! - `replay`: one validly signed request (a mined identity) sent again and again with the
//!   same metadata; the first copy is accepted, every later one must be refused as a replay;
//! - `bad-signature`: a mined identity's envelope signed by another key: a well-formed
//!   signature that fails only the full ed25519 verification (64 random bytes would mostly be
//!   refused by the cheap canonical-scalar check and cost the server less).
//!
//! The flood's connections come from `--flood-from` (127.0.0.2, another loopback address than
//! the honest clients' 127.0.0.1), so limits kept per peer address see two peers, as they would
//! on a network; `--flood-from 127.0.0.1` shows what such limits do to honest clients that
//! share the attacker's address (one NAT, one host; the agents' own heartbeats too), and
//! `--flood-sources N` spreads the connections over N addresses from there (a botnet).
//!
//! Agent methods rotate over Info, GetShard (a random key) and ListShards; coordinator methods
//! over GetLayout and ListNodes (the replay is Info and GetLayout). Envelopes are prepared up
//! front and re-signed every [`RESIGN_EVERY`], so the flooder spends its CPU on sending, and
//! every request is fresh enough to reach the check it is meant to fail.

use std::collections::{BTreeMap, HashMap};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use shardfarm_client::PoolClient;
use shardfarm_client::farm::{CLIENT_KEY, ClientKey, FARM_FILE, Farm, ROOT_KEY};
use shardfarm_client::profile::LOCAL_PROFILE;
use shardfarm_core::cap::ReadCap;
use shardfarm_core::identity::{Credential, Identity, NodeId, random_signing_key};
use shardfarm_core::shard::ShardId;
use shardfarm_proto::pb;
use shardfarm_proto::pb::agent_client::AgentClient as RawAgent;
use shardfarm_proto::pb::coordinator_client::CoordinatorClient as RawCoordinator;
use shardfarm_proto::{methods, sign_into};
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// The longest an honest operation may take before it counts as an error. The client's own
/// deadlines (10 s per call plus 1 s per MiB) end it sooner; this only catches a hang.
const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest a flood request waits for its answer before it counts as `Timeout`.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the flood's envelopes are signed again. Servers accept timestamps within 300 s
/// of their clock; one minute keeps every prepared request well inside that window for a phase
/// of any length.
const RESIGN_EVERY: Duration = Duration::from_secs(60);
/// Prepared envelopes per kind and method: enough variety that no cache in front of the
/// check could matter, few enough to sign in a few milliseconds.
const VARIANTS: usize = 8;
/// Honest object sizes: 4 KiB to 256 KiB, uniformly (one segment, one shard per node).
const MIN_OBJECT: u64 = 4 << 10;
const MAX_OBJECT: u64 = 256 << 10;
/// How many distinct honest error messages the table prints.
const ERRORS_SHOWN: usize = 6;

// ---- Arguments ----

#[derive(Parser, Debug)]
#[command(name = "abuse", about = "Honest load against a local farm, with or without a flood")]
struct Args {
    /// Farm directory written by `shardfarm local up`.
    #[arg(long)]
    farm: PathBuf,
    /// Length of the run, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Honest clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Run the abusive client too.
    #[arg(long)]
    flood: bool,
    /// Flood kinds, in rotation.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "unsigned,unmined,replay,bad-signature"
    )]
    flood_kinds: Vec<Kind>,
    /// Flood HTTP/2 connections per target (each agent and the coordinator).
    #[arg(long, default_value_t = 2)]
    flood_connections: usize,
    /// Flood requests in flight per connection (the agent allows 256 streams per connection).
    #[arg(long, default_value_t = 64)]
    flood_streams: usize,
    /// Source address of the flood's connections. The default is another loopback address than
    /// the honest clients' (127.0.0.1), as an attacker on a network has its own; 127.0.0.1
    /// puts the flood behind the honest clients' address (one NAT, one host).
    #[arg(long, default_value = "127.0.0.2")]
    flood_from: std::net::IpAddr,
    /// Source addresses of the flood: connection i of each target comes from `--flood-from`
    /// plus (i mod N), e.g. 127.0.0.2 to 127.0.0.33 for 32 (IPv4; a botnet, to limits kept
    /// per address). Use at least as many connections.
    #[arg(long, default_value_t = 1)]
    flood_sources: u32,
    /// Honest clients share the farm's client key instead of one delegated key each.
    #[arg(long)]
    shared_key: bool,
    /// Name of this run in the output.
    #[arg(long, default_value = "run")]
    label: String,
    /// Also write the figures as JSON here (the bench script compares phases with it).
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One kind of abusive request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
enum Kind {
    /// No envelope metadata.
    Unsigned,
    /// Signed by an identity mined below the pool's difficulty.
    Unmined,
    /// One validly signed request, replayed.
    Replay,
    /// A mined identity's envelope, signed by another key.
    BadSignature,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Unsigned => "unsigned",
            Kind::Unmined => "unmined",
            Kind::Replay => "replay",
            Kind::BadSignature => "bad-signature",
        }
    }
}

// ---- Small helpers ----

/// xorshift64*: object contents and the operation mix; seeded from the OS.
struct Rng(u64);

impl Rng {
    fn seeded() -> Self {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("OS random generator");
        Rng(u64::from_le_bytes(b) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The content of an honest object: `len` bytes from `seed`, so a get can be checked without
/// keeping every object in memory.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("OS random generator");
    b
}

/// Latencies in microseconds, sorted in place; `p` in 0..=100.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

fn code_name(c: Code) -> String {
    format!("{c:?}")
}

// ---- Honest clients ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Put,
    Get,
    Stat,
    List,
}

const OPS: [Op; 4] = [Op::Put, Op::Get, Op::Stat, Op::List];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Stat => "stat",
            Op::List => "list",
        }
    }
}

/// One object a client stored: enough to read it back and check it.
struct Stored {
    cap: ReadCap,
    seed: u64,
    len: usize,
}

/// What one client (or all of them, merged) measured.
#[derive(Default)]
struct Honest {
    /// Latencies of finished operations (successes and failures), per [`OPS`] index.
    latency: [Vec<u32>; 4],
    /// Failures per [`OPS`] index.
    errors: [u64; 4],
    /// Failure messages with how often each came.
    messages: BTreeMap<String, u64>,
    /// Bytes put and got.
    bytes: u64,
}

impl Honest {
    fn record(&mut self, op: Op, took: Duration, r: anyhow::Result<u64>) {
        let i = OPS.iter().position(|o| *o == op).expect("listed");
        self.latency[i].push(micros(took));
        match r {
            Ok(bytes) => self.bytes += bytes,
            Err(e) => {
                self.errors[i] += 1;
                let mut msg = format!("{}: {e:#}", op.name());
                if msg.len() > 300 {
                    let cut = (0..=300).rev().find(|&c| msg.is_char_boundary(c)).unwrap_or(0);
                    msg.truncate(cut);
                    msg.push('…');
                }
                *self.messages.entry(msg).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: Honest) {
        for (i, l) in other.latency.into_iter().enumerate() {
            self.latency[i].extend(l);
            self.errors[i] += other.errors[i];
        }
        for (m, n) in other.messages {
            *self.messages.entry(m).or_default() += n;
        }
        self.bytes += other.bytes;
    }
}

async fn timed<T>(f: impl Future<Output = anyhow::Result<T>>) -> (Duration, anyhow::Result<T>) {
    let t = Instant::now();
    let r = tokio::time::timeout(OP_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {} s", OP_TIMEOUT.as_secs())));
    (t.elapsed(), r)
}

/// One honest client: random operations until `deadline` (the one in flight then finishes).
async fn honest_client(client: Arc<PoolClient>, deadline: Instant) -> Honest {
    let mut rng = Rng::seeded();
    let mut mine: Vec<Stored> = Vec::new();
    let mut h = Honest::default();
    while Instant::now() < deadline {
        let op = if mine.is_empty() {
            Op::Put
        } else {
            match rng.below(100) {
                0..30 => Op::Put,
                30..70 => Op::Get,
                70..90 => Op::Stat,
                _ => Op::List,
            }
        };
        match op {
            Op::Put => {
                let len = (MIN_OBJECT + rng.below(MAX_OBJECT - MIN_OBJECT + 1)) as usize;
                let seed = rng.next();
                let file = spool(&content(seed, len)).expect("writing a temporary file");
                let (took, r) = timed(client.put(file)).await;
                let r = r.map(|cap| {
                    mine.push(Stored { cap, seed, len });
                    len as u64
                });
                h.record(op, took, r);
            }
            Op::Get => {
                let s = &mine[rng.below(mine.len() as u64) as usize];
                let mut out = Vec::with_capacity(s.len);
                let (took, r) = timed(client.get_to(&s.cap, &mut out)).await;
                let r = r.and_then(|n| {
                    if out != content(s.seed, s.len) {
                        anyhow::bail!("read back {n} bytes that differ from the {} put", s.len);
                    }
                    Ok(n)
                });
                h.record(op, took, r);
            }
            Op::Stat => {
                let s = &mine[rng.below(mine.len() as u64) as usize];
                let (took, r) = timed(client.stat(&s.cap)).await;
                let r = r.and_then(|st| {
                    for seg in &st.segments {
                        if seg.present < seg.total {
                            anyhow::bail!(
                                "segment {}: {} of {} shards answer (missing {:?})",
                                seg.index,
                                seg.present,
                                seg.total,
                                seg.missing
                            );
                        }
                    }
                    Ok(0)
                });
                h.record(op, took, r);
            }
            Op::List => {
                let (took, r) = timed(async { Ok(client.nodes().await) }).await;
                let r = r.and_then(|nodes| {
                    let down: Vec<&str> = nodes
                        .iter()
                        .filter(|n| n.state != "up")
                        .map(|n| &n.id[..12.min(n.id.len())])
                        .collect();
                    if !down.is_empty() {
                        anyhow::bail!("Info failed or took over 3 s at {}", down.join(", "));
                    }
                    if nodes.iter().all(|n| n.standing.is_none()) {
                        anyhow::bail!("the coordinator's ListNodes failed or took over 3 s");
                    }
                    Ok(0)
                });
                h.record(op, took, r);
            }
        }
    }
    h
}

/// `data` in an unnamed temporary file, rewound (the client puts files).
fn spool(data: &[u8]) -> std::io::Result<std::fs::File> {
    let mut f = tempfile::tempfile()?;
    f.write_all(data)?;
    f.rewind()?;
    Ok(f)
}

/// One directory per client under `root`: the farm file and a client key of its own,
/// delegated by the farm root (or the farm's own key with `shared`).
fn client_dirs(farm: &Path, root: &Path, clients: usize, shared: bool) -> anyhow::Result<()> {
    let issuer = Identity::load(&farm.join(ROOT_KEY))?;
    for i in 0..clients {
        let dir = root.join(format!("client-{i}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(farm.join(FARM_FILE), dir.join(FARM_FILE))?;
        std::fs::copy(farm.join(LOCAL_PROFILE), dir.join(LOCAL_PROFILE))?;
        if shared {
            std::fs::copy(farm.join(CLIENT_KEY), dir.join(CLIENT_KEY))?;
        } else {
            ClientKey::issue(&issuer, 1).save(&dir.join(CLIENT_KEY))?;
        }
    }
    Ok(())
}

// ---- Flood ----

/// One abusive call, with its message.
#[derive(Clone)]
enum Call {
    Info(pb::InfoRequest),
    GetShard(pb::GetShardRequest),
    ListShards(pb::ListShardsRequest),
    GetLayout(pb::GetLayoutRequest),
    ListNodes(pb::ListNodesRequest),
}

impl Call {
    /// Signs `self` into `md` as `id`, addressed to `to`.
    fn sign(&self, md: &mut MetadataMap, to: NodeId, id: &Identity) {
        self.sign_as(md, to, &id.credential(), id.signing_key());
    }

    /// Signs `self` into `md` presenting `c`, with `k` (which need not be `c`'s key).
    fn sign_as(
        &self,
        md: &mut MetadataMap,
        to: NodeId,
        c: &Credential,
        k: &ed25519_dalek::SigningKey,
    ) {
        match self {
            Call::Info(m) => sign_into(md, to, methods::INFO, m, c, k),
            Call::GetShard(m) => sign_into(md, to, methods::GET, m, c, k),
            Call::ListShards(m) => sign_into(md, to, methods::LIST, m, c, k),
            Call::GetLayout(m) => sign_into(md, to, methods::GET_LAYOUT, m, c, k),
            Call::ListNodes(m) => sign_into(md, to, methods::LIST_NODES, m, c, k),
        }
    }
}

/// A connection to one flood target.
#[derive(Clone)]
enum Conn {
    Agent(RawAgent<Channel>),
    Coordinator(RawCoordinator<Channel>),
}

impl Conn {
    /// Sends `call` with exactly the metadata `md`; the answer's body is dropped.
    async fn send(&mut self, call: &Call, md: &MetadataMap) -> Result<(), Status> {
        fn req<M: Clone>(m: &M, md: &MetadataMap) -> Request<M> {
            let mut r = Request::new(m.clone());
            *r.metadata_mut() = md.clone();
            r
        }
        match (self, call) {
            (Conn::Agent(c), Call::Info(m)) => c.info(req(m, md)).await.map(drop),
            (Conn::Agent(c), Call::GetShard(m)) => c.get_shard(req(m, md)).await.map(drop),
            (Conn::Agent(c), Call::ListShards(m)) => c.list_shards(req(m, md)).await.map(drop),
            (Conn::Coordinator(c), Call::GetLayout(m)) => c.get_layout(req(m, md)).await.map(drop),
            (Conn::Coordinator(c), Call::ListNodes(m)) => c.list_nodes(req(m, md)).await.map(drop),
            _ => unreachable!("calls are prepared for their target"),
        }
    }
}

/// The prepared requests for one target, per kind: (call, metadata) pairs to cycle over.
struct Prepared {
    by_kind: HashMap<Kind, Vec<(Call, MetadataMap)>>,
}

/// Prepares every kind's requests for an agent (`agent`) or the coordinator whose id is `to`,
/// signing with `mined` (at the pool's difficulty) or with identities below `difficulty`.
fn prepare(agent: bool, to: NodeId, mined: &Identity, difficulty: u8) -> Prepared {
    let calls: Vec<Call> = if agent {
        let key = ShardId { object_id: random_bytes(), segment: 0, shard: 0 };
        vec![
            Call::Info(pb::InfoRequest {}),
            Call::GetShard(pb::GetShardRequest { key: Some(key.into()), offset: 0, length: 0 }),
            Call::ListShards(pb::ListShardsRequest { partition: 0, start_after: None, limit: 0 }),
        ]
    } else {
        vec![Call::GetLayout(pb::GetLayoutRequest {}), Call::ListNodes(pb::ListNodesRequest {})]
    };
    let unmined = || loop {
        let id = Identity::from_parts(random_signing_key(), 0);
        if id.difficulty() < u32::from(difficulty) {
            return id;
        }
    };
    let mut by_kind = HashMap::new();
    by_kind.insert(Kind::Unsigned, calls.iter().map(|c| (c.clone(), MetadataMap::new())).collect());
    let mut signed = |kind: Kind, make: &dyn Fn(&Call) -> MetadataMap| {
        let v = calls.iter().flat_map(|c| (0..VARIANTS).map(move |_| (c.clone(), make(c))));
        by_kind.insert(kind, v.collect::<Vec<_>>());
    };
    signed(Kind::Unmined, &|c| {
        let mut md = MetadataMap::new();
        c.sign(&mut md, to, &unmined());
        md
    });
    signed(Kind::BadSignature, &|c| {
        let mut md = MetadataMap::new();
        c.sign_as(&mut md, to, &mined.credential(), &random_signing_key());
        md
    });
    // One request, replayed: its first copy is accepted, every other one must be refused.
    let mut md = MetadataMap::new();
    calls[0].sign(&mut md, to, mined);
    by_kind.insert(Kind::Replay, vec![(calls[0].clone(), md)]);
    Prepared { by_kind }
}

/// One flood target.
struct Target {
    agent: bool,
    node: NodeId,
    addr: String,
    prepared: RwLock<Arc<Prepared>>,
}

/// What flood workers saw, per (kind, target class): statuses and latencies.
#[derive(Default)]
struct Flood {
    statuses: BTreeMap<(Kind, &'static str, String), u64>,
    latency: BTreeMap<(Kind, &'static str), Vec<u32>>,
    connect_failures: u64,
    /// Seconds from the first request to the deadline.
    secs: f64,
}

impl Flood {
    fn merge(&mut self, o: Flood) {
        for (k, n) in o.statuses {
            *self.statuses.entry(k).or_default() += n;
        }
        for (k, l) in o.latency {
            self.latency.entry(k).or_default().extend(l);
        }
        self.connect_failures += o.connect_failures;
    }
}

/// `first` plus `i` (IPv4), or `first` itself.
fn source_address(first: std::net::IpAddr, i: u32) -> std::net::IpAddr {
    match first {
        std::net::IpAddr::V4(a) => std::net::Ipv4Addr::from(u32::from(a).wrapping_add(i)).into(),
        v6 => v6,
    }
}

/// A TLS connection from `from` to `peer` at `addr`, proving the flooder's `key`.
async fn connect(
    addr: &str,
    from: std::net::IpAddr,
    peer: NodeId,
    key: &Identity,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
    let security = shardfarm_proto::Security::Tls;
    shardfarm_proto::tls::connect_from(endpoint, Some(from), peer, key.signing_key(), security)
        .await
}

/// Floods until `deadline`: requests that are still unanswered then are not counted.
async fn flood_worker(
    target: Arc<Target>,
    conn: Conn,
    kinds: Vec<Kind>,
    first: usize,
    deadline: tokio::time::Instant,
) -> Flood {
    let mut conn = conn;
    let mut f = Flood::default();
    let class = if target.agent { "agents" } else { "coordinator" };
    let mut i = first;
    'run: loop {
        let prepared = target.prepared.read().unwrap().clone();
        for _ in 0..256 {
            let kind = kinds[i % kinds.len()];
            let set = &prepared.by_kind[&kind];
            let (call, md) = &set[(i / kinds.len()) % set.len()];
            i += 1;
            let t = Instant::now();
            let limit = (tokio::time::Instant::now() + FLOOD_TIMEOUT).min(deadline);
            let status = match tokio::time::timeout_at(limit, conn.send(call, md)).await {
                Ok(Ok(())) => "OK".to_string(),
                Ok(Err(s)) => code_name(s.code()),
                Err(_) if limit == deadline => break 'run,
                Err(_) => "Timeout".to_string(),
            };
            f.latency.entry((kind, class)).or_default().push(micros(t.elapsed()));
            *f.statuses.entry((kind, class, status)).or_default() += 1;
        }
    }
    f
}

/// Runs the flood against every agent and the coordinator of `farm` until `deadline`. `ready`
/// fires once every connection is up (or has failed), so honest clients start under fire.
async fn flood(
    farm: Farm,
    args: Arc<Args>,
    deadline: tokio::time::Instant,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Flood {
    let (mined, _) = Identity::generate(farm.difficulty, 1, &|_| {}).expect("mining");
    let mut targets: Vec<Arc<Target>> = Vec::new();
    let id = |hex: &str| NodeId::from_hex(hex).expect("the farm file names every id");
    let addrs = farm.nodes.iter().map(|n| (true, id(&n.id), n.grpc.clone()));
    let pool =
        farm.coordinator.clone().map(|c| (false, id(farm.pool_id.as_deref().unwrap_or("")), c));
    for (agent, node, addr) in addrs.chain(pool) {
        let prepared = RwLock::new(Arc::new(prepare(agent, node, &mined, farm.difficulty)));
        targets.push(Arc::new(Target { agent, node, addr, prepared }));
    }
    let resign = {
        let (targets, mined, difficulty) = (targets.clone(), mined.clone(), farm.difficulty);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RESIGN_EVERY).await;
                for t in &targets {
                    let p = Arc::new(prepare(t.agent, t.node, &mined, difficulty));
                    *t.prepared.write().unwrap() = p;
                }
            }
        })
    };
    let mut workers = Vec::new();
    let mut total = Flood::default();
    for t in &targets {
        for c in 0..args.flood_connections {
            let from = source_address(args.flood_from, c as u32 % args.flood_sources.max(1));
            let channel = match connect(&t.addr, from, t.node, &mined).await {
                Ok(c) => c,
                Err(_) => {
                    total.connect_failures += 1;
                    continue;
                }
            };
            let conn = if t.agent {
                Conn::Agent(RawAgent::new(channel))
            } else {
                Conn::Coordinator(RawCoordinator::new(channel))
            };
            for s in 0..args.flood_streams {
                let w =
                    flood_worker(t.clone(), conn.clone(), args.flood_kinds.clone(), s, deadline);
                workers.push(tokio::spawn(w));
            }
        }
    }
    let started = Instant::now();
    let _ = ready.send(());
    for w in workers {
        total.merge(w.await.expect("flood worker"));
    }
    total.secs = started.elapsed().as_secs_f64();
    resign.abort();
    total
}

// ---- Report ----

/// CPU seconds (user + system) of this process, or of its threads named `thread` (the flood
/// runtime's), from /proc (0 where it cannot be read).
fn own_cpu_seconds(thread: Option<&str>) -> f64 {
    // utime and stime are fields 14 and 15 of `stat`, counted from after the `(comm)` field.
    fn ticks(stat: &str) -> u64 {
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let at = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        at(11) + at(12)
    }
    // USER_HZ: 100 on every Linux this runs on (the kernel ABI fixes it for /proc).
    const HZ: f64 = 100.0;
    let Some(name) = thread else {
        return ticks(&std::fs::read_to_string("/proc/self/stat").unwrap_or_default()) as f64 / HZ;
    };
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return 0.0 };
    let mut total = 0;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            total += ticks(&std::fs::read_to_string(t.path().join("stat")).unwrap_or_default());
        }
    }
    total as f64 / HZ
}

fn print_honest(h: &mut Honest, secs: f64, clients: usize) -> serde_json::Value {
    println!(
        "{:<6} {:>8} {:>8} {:>9} {:>9} {:>9} {:>7}",
        "op", "ops", "ops/s", "p50 ms", "p99 ms", "max ms", "errors"
    );
    let mut json = serde_json::Map::new();
    let mut all = Vec::new();
    let mut row = |name: &str, lat: &mut Vec<u32>, errors: u64| {
        lat.sort_unstable();
        let (n, p50, p99) = (lat.len(), percentile(lat, 50.0), percentile(lat, 99.0));
        let max = f64::from(lat.last().copied().unwrap_or(0)) / 1000.0;
        let rate = n as f64 / secs;
        println!("{name:<6} {n:>8} {rate:>8.1} {p50:>9.1} {p99:>9.1} {max:>9.1} {errors:>7}");
        json.insert(
            name.into(),
            serde_json::json!({"ops": n, "ops_per_s": rate, "p50_ms": p50, "p99_ms": p99,
                               "max_ms": max, "errors": errors}),
        );
    };
    for (i, op) in OPS.iter().enumerate() {
        all.extend_from_slice(&h.latency[i]);
        row(op.name(), &mut h.latency[i], h.errors[i]);
    }
    let errors: u64 = h.errors.iter().sum();
    row("all", &mut all, errors);
    println!(
        "{clients} clients, {:.1} MB moved ({:.1} MB/s)",
        h.bytes as f64 / 1e6,
        h.bytes as f64 / 1e6 / secs
    );
    let mut msgs: Vec<(&String, &u64)> = h.messages.iter().collect();
    msgs.sort_by(|a, b| b.1.cmp(a.1));
    // The most frequent message of every operation that failed, then the most frequent ones.
    let mut firsts: Vec<(&String, &u64)> = OPS
        .iter()
        .filter_map(|op| msgs.iter().find(|(m, _)| m.starts_with(&format!("{}:", op.name()))))
        .copied()
        .collect();
    for m in &msgs {
        if firsts.len() >= ERRORS_SHOWN {
            break;
        }
        if !firsts.contains(m) {
            firsts.push(*m);
        }
    }
    let total = msgs.len();
    let msgs = firsts;
    if msgs.is_empty() {
        println!("honest errors: none");
    } else {
        println!(
            "honest errors ({total} distinct messages; each operation's most frequent first):"
        );
        for (m, n) in &msgs {
            println!("  {n:>6} × {m}");
        }
    }
    let first: Vec<String> = msgs.iter().map(|(m, n)| format!("{n} × {m}")).collect();
    json.insert("error_messages".into(), serde_json::json!(first));
    serde_json::Value::Object(json)
}

fn print_flood(f: &mut Flood) -> serde_json::Value {
    let secs = f.secs;
    let sent: usize = f.latency.values().map(Vec::len).sum();
    println!(
        "flood: {sent} requests answered in {secs:.1} s = {:.0} req/s{}",
        sent as f64 / secs,
        if f.connect_failures > 0 {
            format!(", {} connections failed", f.connect_failures)
        } else {
            String::new()
        }
    );
    println!(
        "{:<14} {:<12} {:>9} {:>8} {:>8} {:>8}  statuses",
        "kind", "target", "answered", "req/s", "p50 ms", "p99 ms"
    );
    let mut rows = Vec::new();
    for ((kind, class), lat) in f.latency.iter_mut() {
        lat.sort_unstable();
        let statuses: Vec<String> = f
            .statuses
            .iter()
            .filter(|((k, c, _), _)| k == kind && c == class)
            .map(|((_, _, s), n)| format!("{s} {n}"))
            .collect();
        let (p50, p99) = (percentile(lat, 50.0), percentile(lat, 99.0));
        let rate = lat.len() as f64 / secs;
        println!(
            "{:<14} {:<12} {:>9} {:>8.0} {:>8.2} {:>8.2}  {}",
            kind.name(),
            class,
            lat.len(),
            rate,
            p50,
            p99,
            statuses.join(", ")
        );
        rows.push(serde_json::json!({"kind": kind.name(), "target": class, "answered": lat.len(),
            "req_per_s": rate, "p50_ms": p50, "p99_ms": p99, "statuses": statuses}));
    }
    serde_json::json!({"answered": sent, "req_per_s": sent as f64 / secs, "rows": rows,
                       "connect_failures": f.connect_failures})
}

// ---- Main ----

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let farm = Farm::load(&args.farm)?;
    let layout_before = farm.layout_version;
    let scratch = tempfile::tempdir()?;
    client_dirs(&args.farm, scratch.path(), args.clients, args.shared_key)?;

    // Two runtimes: the flood's tasks never queue ahead of the honest ones in one scheduler
    // (they still share the machine's cores with the farm, which is the point).
    let honest_rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let flood_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flood")
        .enable_all()
        .build()?;

    let clients = honest_rt.block_on(async {
        let mut clients = Vec::new();
        for i in 0..args.clients {
            let profile = scratch.path().join(format!("client-{i}")).join(LOCAL_PROFILE);
            clients
                .push(PoolClient::open(&profile, None, Arc::new(shardfarm_client::Silent)).await?);
        }
        anyhow::Ok(clients)
    })?;
    let duration = Duration::from_secs(args.seconds);

    let (mut honest, mut flood_result, secs) = honest_rt.block_on(async {
        let flood_task = if args.flood {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let deadline = tokio::time::Instant::now() + duration + Duration::from_secs(1);
            let task = flood_rt.spawn(flood(farm.clone(), args.clone(), deadline, tx));
            let _ = rx.await;
            Some(task)
        } else {
            None
        };
        let start = Instant::now();
        let deadline = start + duration;
        let tasks: Vec<_> =
            clients.into_iter().map(|c| tokio::spawn(honest_client(c, deadline))).collect();
        let mut all = Honest::default();
        for t in tasks {
            all.merge(t.await.expect("honest client"));
        }
        // With no honest clients (a flood alone), the phase still lasts its length.
        tokio::time::sleep_until(deadline.into()).await;
        let secs = start.elapsed().as_secs_f64();
        let flood = match flood_task {
            Some(t) => Some(t.await.expect("flood")),
            None => None,
        };
        (all, flood, secs)
    });
    // Read before the flood's threads exit: their times leave /proc/self/task with them.
    let (cpu_total, cpu_flood) = (own_cpu_seconds(None), own_cpu_seconds(Some("flood")));
    flood_rt.shutdown_timeout(Duration::from_secs(1));

    let layout_after = Farm::load(&args.farm).map(|f| f.layout_version).unwrap_or(0);
    let kinds: Vec<&str> = args.flood_kinds.iter().map(|k| k.name()).collect();
    println!(
        "== {}: {} honest clients for {:.1} s, flood {} ==",
        args.label,
        args.clients,
        secs,
        if args.flood {
            format!(
                "on ({}; {} targets × {} connections × {} streams from {}{})",
                kinds.join(", "),
                farm.nodes.len() + usize::from(farm.coordinator.is_some()),
                args.flood_connections,
                args.flood_streams,
                args.flood_from,
                if args.flood_sources > 1 {
                    format!(" + {} more addresses", args.flood_sources - 1)
                } else {
                    String::new()
                }
            )
        } else {
            "off".into()
        }
    );
    let honest_json = print_honest(&mut honest, secs, args.clients);
    let flood_json = flood_result.as_mut().map(print_flood);
    println!(
        "this process: {:.1} CPU s (flood threads {:.1}, honest clients and set-up {:.1})",
        cpu_total,
        cpu_flood,
        cpu_total - cpu_flood
    );
    if layout_after != layout_before {
        println!("layout changed during the run: {layout_before} → {layout_after}");
    }
    if let Some(path) = &args.summary {
        let v = serde_json::json!({
            "label": args.label, "seconds": secs, "clients": args.clients, "flood": args.flood,
            "flood_kinds": kinds, "flood_from": args.flood_from.to_string(),
            "flood_sources": args.flood_sources, "honest": honest_json, "flood_figures": flood_json,
            "layout_before": layout_before, "layout_after": layout_after,
            "cpu_s": {"total": cpu_total, "flood": cpu_flood},
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)?;
    }
    Ok(())
}
