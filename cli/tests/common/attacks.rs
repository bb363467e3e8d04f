//! The five attacks of the hostile round (issue 34), each by one root identity at the pool's
//! minimum difficulty with as many delegated keys, connections and loopback source addresses
//! as it likes, sending only well-formed requests. Each runs at full speed against a live
//! `local up` farm (real processes) for a given time and returns what the servers answered,
//! by status code and the first words of the message.
//!
//! 1. [`Attack::ReplayFill`]: cheap signed requests from 9 delegated keys to every agent and
//!    the coordinator, as fast as they are answered: half signed by the key the TLS connection
//!    proved (valid: each would have spent a nonce of the replay cache), half by another key of
//!    the same root (not bound to the connection).
//! 2. [`Attack::UploadSquat`]: PutShard streams for slots the layout gives each node, whose
//!    headers claim ~256 MiB shards, trickling one byte every 20 s; every stream that ends is
//!    opened again.
//! 3. [`Attack::IdleConnections`]: as many TLS connections as a node admits, from 8
//!    addresses, each carrying one request and then idle, plus bare TCP connections that never
//!    handshake, reopened as they close.
//! 4. [`Attack::JoinFlood`]: Challenge and Join from 40 delegated keys at the coordinator.
//! 5. [`Attack::TombstoneSpam`]: tombstones for made-up objects of the attacker's own keys.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ed25519_dalek::{Signature, SigningKey};
use shardfarm_client::farm::Farm as FarmFile;
use shardfarm_core::identity::{Credential, Delegation, Identity, NodeId, random_signing_key};
use shardfarm_core::shard::{
    Cipher, FORMAT_VERSION, MAX_SEGMENT_SIZE, SegmentHeader, coded_shard_length, object_id_for,
    partition,
};
use shardfarm_core::tombstone::Tombstone;
use shardfarm_proto::pb::{self as proto, agent_client, coordinator_client};
use shardfarm_proto::{Signer, methods, sign_into};
use tokio::net::TcpSocket;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// The attacks, in the issue's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attack {
    ReplayFill,
    UploadSquat,
    IdleConnections,
    JoinFlood,
    TombstoneSpam,
}

/// What the attacked servers answered: "Code: first words of the message" → count.
#[derive(Clone, Default)]
pub struct Tally(Arc<Mutex<BTreeMap<String, u64>>>);

impl Tally {
    fn add(&self, r: &Result<(), Status>) {
        let k = match r {
            Ok(()) => "Ok".to_string(),
            Err(s) => {
                // Enough words to tell the reasons apart, without the ids and numbers in them.
                let words: Vec<&str> = s
                    .message()
                    .split_whitespace()
                    .take(9)
                    .map(|w| {
                        let w = w.trim_matches(|c: char| !c.is_ascii_alphanumeric());
                        let id = w.len() >= 8 && w.chars().all(|c| c.is_ascii_hexdigit());
                        if id || w.parse::<f64>().is_ok() { "#" } else { w }
                    })
                    .collect();
                format!("{:?}: {}", s.code(), words.join(" "))
            }
        };
        *self.0.lock().unwrap().entry(k).or_default() += 1;
    }

    fn note(&self, what: &str) {
        *self.0.lock().unwrap().entry(what.to_string()).or_default() += 1;
    }

    /// Answers whose key contains `needle`.
    pub fn count(&self, needle: &str) -> u64 {
        self.0.lock().unwrap().iter().filter(|(k, _)| k.contains(needle)).map(|(_, v)| v).sum()
    }

    /// All answers.
    pub fn total(&self) -> u64 {
        self.0.lock().unwrap().values().sum()
    }
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.lock().unwrap().fmt(f)
    }
}

/// One delegated key of the attacker's root.
#[derive(Clone)]
struct Key {
    credential: Credential,
    key: SigningKey,
}

impl Key {
    fn signer(&self) -> Signer {
        Signer::raw(self.credential.clone(), self.key.clone())
    }

    fn sign<M: prost::Message>(&self, audience: NodeId, method: &str, msg: M) -> Request<M> {
        let mut md = tonic::metadata::MetadataMap::new();
        sign_into(&mut md, audience, method, &msg, &self.credential, &self.key);
        let mut r = Request::new(msg);
        *r.metadata_mut() = md;
        r
    }
}

/// The attacker: one mined root, the keys it delegated, and the farm it attacks.
pub struct Attacker {
    pub root: Identity,
    keys: Vec<Key>,
    /// Loopback source addresses (127.0.0.2 on).
    from: Vec<IpAddr>,
    agents: Vec<(String, NodeId)>,
    coordinator: String,
    pool: NodeId,
    farm: FarmFile,
}

/// The attacker's source addresses: 127.0.0.2 … 127.0.0.(1 + n).
pub fn sources(n: u8) -> Vec<IpAddr> {
    (0..n).map(|i| IpAddr::from([127, 0, 0, 2 + i])).collect()
}

impl Attacker {
    /// A root mined at the farm's difficulty and `keys` keys it delegated.
    pub fn new(farm: FarmFile, coordinator: String, keys: usize) -> Self {
        // Mined to exactly the pool's minimum: one base share (a harder one gets more).
        let root = std::iter::repeat_with(|| Identity::generate(farm.difficulty, 1, &|_| {}))
            .map(|r| r.unwrap().0)
            .find(|r| r.difficulty() == u32::from(farm.difficulty))
            .unwrap();
        let keys = (0..keys)
            .map(|_| {
                let key = random_signing_key();
                let cert = Delegation::issue(&root, key.verifying_key(), u64::MAX / 2000);
                Key { credential: Credential::Delegated(Box::new(cert)), key }
            })
            .collect();
        let agents =
            farm.nodes.iter().map(|n| (n.grpc.clone(), NodeId::from_hex(&n.id).unwrap())).collect();
        let pool = NodeId::from_hex(farm.pool_id.as_deref().unwrap()).unwrap();
        Attacker { root, keys, from: sources(8), agents, coordinator, pool, farm }
    }

    /// Runs `attack` for `length` on a runtime of its own (two workers, like a small
    /// attacking machine; on the CPUs `SHARDFARM_ATTACK_CPUS` names, if set, as `taskset -c`
    /// reads them: benchmarks keep the attacker off the farm's cores, as if it were another
    /// machine); returns what the servers answered.
    pub fn run(&self, attack: Attack, length: Duration) -> Tally {
        let cpus = std::env::var("SHARDFARM_ATTACK_CPUS").ok();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                if let Some(cpus) = &cpus {
                    pin_this_thread(cpus);
                }
            })
            .build()
            .unwrap();
        let tally = Tally::default();
        let until = Instant::now() + length;
        rt.block_on(async {
            match attack {
                Attack::ReplayFill => self.replay_fill(until, &tally).await,
                Attack::UploadSquat => self.upload_squat(until, &tally).await,
                Attack::IdleConnections => self.idle_connections(until, &tally).await,
                Attack::JoinFlood => self.join_flood(until, &tally).await,
                Attack::TombstoneSpam => self.tombstone_spam(until, &tally).await,
            }
        });
        // Connections the attack left open close with its runtime.
        rt.shutdown_timeout(Duration::from_secs(5));
        tally
    }

    /// A TLS channel from `from` to `peer`, proving `key`.
    async fn channel(
        addr: &str,
        from: IpAddr,
        peer: NodeId,
        key: &SigningKey,
    ) -> Result<Channel, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let endpoint = endpoint.timeout(Duration::from_secs(10));
        shardfarm_proto::tls::connect_from(
            endpoint,
            Some(from),
            peer,
            key,
            shardfarm_proto::tls::Security::Tls,
        )
        .await
    }

    async fn replay_fill(&self, until: Instant, tally: &Tally) {
        let mut tasks = Vec::new();
        let targets = self.agents.iter().map(|(a, n)| (a.clone(), *n, true));
        let targets = targets.chain(std::iter::once((self.coordinator.clone(), self.pool, false)));
        for (addr, node, agent) in targets {
            for (i, key) in self.keys.iter().enumerate() {
                let from = self.from[i % self.from.len()];
                let Ok(ch) = Self::channel(&addr, from, node, &key.key).await else {
                    tally.note("connect failed");
                    continue;
                };
                // Half the loops sign with the connection's own key, half with the next key:
                // not the one this connection proved, so not bound to it.
                for turn in 0..4 {
                    let other = self.keys[(i + turn % 2) % self.keys.len()].clone();
                    let (ch, tally) = (ch.clone(), tally.clone());
                    tasks.push(tokio::spawn(async move {
                        while Instant::now() < until {
                            let r = if agent {
                                let mut c = agent_client::AgentClient::new(ch.clone());
                                let req = other.sign(node, methods::INFO, proto::InfoRequest {});
                                c.info(req).await.map(|_| ())
                            } else {
                                let mut c = coordinator_client::CoordinatorClient::new(ch.clone());
                                let req =
                                    other.sign(node, methods::GET_POOL, proto::GetPoolRequest {});
                                c.get_pool(req).await.map(|_| ())
                            };
                            tally.add(&r);
                        }
                    }));
                }
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// A header of an object of `key`'s whose segment 0 falls in partition `p`, claiming the
    /// largest shard the format allows for the pool's k.
    fn squat_header(&self, key: &Key, p: u32) -> Vec<u8> {
        let uploader = key.key.verifying_key();
        let (salt, object_id) = loop {
            let salt: [u8; 32] = rand_bytes();
            let id = object_id_for(&uploader, &salt);
            if partition(&id, 0, self.farm.partitions) == p {
                break (salt, id);
            }
        };
        let (k, m) = (self.farm.k, self.farm.m);
        let size = MAX_SEGMENT_SIZE;
        let mut h = SegmentHeader {
            version: FORMAT_VERSION,
            cipher: Cipher::Aes256Gcm,
            object_id,
            segment_index: 0,
            segment_count: 1,
            object_length: size,
            segment_size: size,
            k,
            m,
            shard_length: coded_shard_length(size, k),
            created: shardfarm_core::auth::now_ms() / 1000,
            expires: 0,
            uploader,
            salt,
            shard_roots: (0..usize::from(k + m)).map(|_| rand_bytes()).collect(),
            signature: Signature::from_bytes(&[0; 64]),
        };
        h.sign(&key.key);
        h.encode()
    }

    async fn upload_squat(&self, until: Instant, tally: &Tally) {
        let mut tasks = Vec::new();
        for (j, (addr, node)) in self.agents.iter().enumerate() {
            // A slot the layout gives this node.
            let Some((p, shard)) = self.farm.layout.iter().enumerate().find_map(|(p, holders)| {
                holders.iter().position(|&h| h == j).map(|s| (p as u32, s as u32))
            }) else {
                continue;
            };
            for (i, key) in self.keys.iter().enumerate() {
                let from = self.from[i % self.from.len()];
                let Ok(ch) = Self::channel(addr, from, *node, &key.key).await else {
                    tally.note("connect failed");
                    continue;
                };
                // More streams per key than a root may hold: 160 per node in all.
                for _ in 0..(160 / self.keys.len()).max(1) {
                    let (ch, tally, key, node) = (ch.clone(), tally.clone(), key.clone(), *node);
                    let header = self.squat_header(&key, p);
                    tasks.push(tokio::spawn(async move {
                        while Instant::now() < until {
                            let r = trickle(ch.clone(), &key, node, &header, shard, until).await;
                            tally.add(&r);
                            if r.is_err() {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }));
                }
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn idle_connections(&self, until: Instant, tally: &Tally) {
        let open = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        // Bare TCP connections come from addresses of their own, so they do not spend the
        // handshake slots of the addresses the TLS connections come from.
        let bare_from = sources(12).split_off(8);
        for (addr, node) in &self.agents {
            // TLS connections that carry one request each, then sit idle: more than an
            // address may hold (512), from every address, each reopened when it closes. At
            // most 12 handshakes at a time per address (a node takes 16), so they get in.
            for (a, &from) in self.from.iter().enumerate() {
                let handshakes = Arc::new(tokio::sync::Semaphore::new(12));
                for c in 0..560 {
                    let key = self.keys[(a * 560 + c) % self.keys.len()].clone();
                    let (addr, node, tally, open) =
                        (addr.clone(), *node, tally.clone(), open.clone());
                    let handshakes = handshakes.clone();
                    tasks.push(tokio::spawn(async move {
                        while Instant::now() < until {
                            let permit = handshakes.acquire().await.unwrap();
                            let ch = Self::channel(&addr, from, node, &key.key).await;
                            drop(permit);
                            let ch = match ch {
                                Ok(ch) => ch,
                                Err(e) => {
                                    tally.add(&Err(Status::unavailable(format!("connect: {e}"))));
                                    tokio::time::sleep(Duration::from_millis(500)).await;
                                    continue;
                                }
                            };
                            let mut c = agent_client::AgentClient::new(ch);
                            let r =
                                c.info(key.sign(node, methods::INFO, proto::InfoRequest {})).await;
                            tally.add(&r.as_ref().map(|_| ()).map_err(Clone::clone));
                            open.fetch_add(1, Ordering::Relaxed);
                            // Idle until the server closes it (the next call fails) or the end.
                            loop {
                                tokio::time::sleep(Duration::from_secs(2)).await;
                                if Instant::now() >= until {
                                    break;
                                }
                                // A keepalive of the cheapest kind: is it still open?
                                if c.info(key.sign(node, methods::INFO, proto::InfoRequest {}))
                                    .await
                                    .is_err()
                                {
                                    tally.note("idle connection closed by the server");
                                    break;
                                }
                                // Idle for long stretches, as an idle squatter would be.
                                tokio::time::sleep(Duration::from_secs(8)).await;
                            }
                            open.fetch_sub(1, Ordering::Relaxed);
                        }
                    }));
                }
            }
            // Bare TCP connections that never handshake, reopened as they close.
            for &from in &bare_from {
                for _ in 0..16 {
                    let (addr, tally) = (addr.clone(), tally.clone());
                    tasks.push(tokio::spawn(async move {
                        let to: SocketAddr = addr.parse().unwrap();
                        while Instant::now() < until {
                            let s = TcpSocket::new_v4().unwrap();
                            if s.bind(SocketAddr::new(from, 0)).is_err() {
                                break;
                            }
                            match s.connect(to).await {
                                Ok(mut tcp) => {
                                    use tokio::io::AsyncReadExt;
                                    let mut b = [0u8; 1];
                                    let left = until.saturating_duration_since(Instant::now());
                                    let _ = tokio::time::timeout(left, tcp.read(&mut b)).await;
                                    tally.note("bare TCP connection closed");
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                            }
                        }
                    }));
                }
            }
        }
        // Reports how many TLS connections it holds, every 5 s.
        let (t, o) = (tally.clone(), open.clone());
        let report = tokio::spawn(async move {
            let mut peak = 0;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(500)).await;
                peak = peak.max(o.load(Ordering::Relaxed));
            }
            t.note(&format!("peak open TLS connections (all agents): {peak}"));
        });
        for t in tasks {
            let _ = t.await;
        }
        let _ = report.await;
    }

    async fn join_flood(&self, until: Instant, tally: &Tally) {
        let mut tasks = Vec::new();
        for (i, key) in self.keys.iter().enumerate() {
            let from = self.from[i % self.from.len()];
            let Ok(ch) = Self::channel(&self.coordinator, from, self.pool, &key.key).await else {
                tally.note("connect failed");
                continue;
            };
            for _ in 0..2 {
                let (ch, tally, key, pool) = (ch.clone(), tally.clone(), key.clone(), self.pool);
                tasks.push(tokio::spawn(async move {
                    let mut c = coordinator_client::CoordinatorClient::new(ch);
                    let mut turn = 0u64;
                    while Instant::now() < until {
                        turn += 1;
                        let r = if turn.is_multiple_of(2) {
                            let req =
                                key.sign(pool, methods::CHALLENGE, proto::ChallengeRequest {});
                            c.challenge(req).await.map(|_| ())
                        } else {
                            let join = proto::JoinRequest {
                                grpc_address: format!("127.0.0.9:{}", 20_000 + turn % 1000),
                                http_address: "127.0.0.9:1".into(),
                                capacity_report: Bytes::from(rand_bytes::<64>().to_vec()),
                                ..Default::default()
                            };
                            c.join(key.sign(pool, methods::JOIN, join)).await.map(|_| ())
                        };
                        tally.add(&r);
                    }
                }));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    async fn tombstone_spam(&self, until: Instant, tally: &Tally) {
        let mut tasks = Vec::new();
        for (addr, node) in &self.agents {
            for (i, key) in self.keys.iter().enumerate() {
                let from = self.from[i % self.from.len()];
                let Ok(ch) = Self::channel(addr, from, *node, &key.key).await else {
                    tally.note("connect failed");
                    continue;
                };
                for _ in 0..2 {
                    let (ch, tally, key, node) = (ch.clone(), tally.clone(), key.clone(), *node);
                    tasks.push(tokio::spawn(async move {
                        let mut c = agent_client::AgentClient::new(ch);
                        while Instant::now() < until {
                            let now = shardfarm_core::auth::now_ms();
                            let t = Tombstone::sign(&key.key, rand_bytes(), now);
                            let req = proto::DeleteObjectRequest { tombstone: t.encode().into() };
                            let r = c.delete_object(key.sign(node, methods::DELETE_OBJECT, req));
                            tally.add(&r.await.map(|_| ()));
                        }
                    }));
                }
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// One PutShard stream: `header`, then one byte every 20 s until the server ends it or the
/// attack does.
async fn trickle(
    ch: Channel,
    key: &Key,
    node: NodeId,
    header: &[u8],
    shard: u32,
    until: Instant,
) -> Result<(), Status> {
    use proto::put_shard_request::Part;
    let first = proto::PutShardRequest {
        part: Some(Part::Header(proto::PutShardHeader {
            segment_header: Bytes::copy_from_slice(header),
            shard_index: shard,
        })),
    };
    let mut req = key.sign(node, methods::PUT, first.clone());
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(first).await.unwrap();
    let feeder = tokio::spawn(async move {
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_secs(20).min(until - Instant::now())).await;
            let chunk =
                proto::PutShardRequest { part: Some(Part::Chunk(Bytes::from_static(b"x"))) };
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(rx);
    let md = std::mem::take(req.metadata_mut());
    let mut streamed = Request::new(body);
    *streamed.metadata_mut() = md;
    let mut c = agent_client::AgentClient::new(ch);
    let left = until.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let r = match tokio::time::timeout(left, c.put_shard(streamed)).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => Err(Status::deadline_exceeded("still open when the attack ended")),
    };
    feeder.abort();
    r
}

/// Pins the calling thread (and the processes it starts later) to `cpus` (a `taskset -c`
/// list).
pub fn pin_this_thread(cpus: &str) {
    let me = std::fs::read_link("/proc/thread-self").unwrap_or_default();
    let tid = me.file_name().and_then(|t| t.to_str()).unwrap_or_default().to_string();
    let ok = std::process::Command::new("taskset")
        .args(["-p", "-c", cpus, &tid])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset -p -c {cpus} {tid} failed");
}

/// Pins every thread of process `pid` to `cpus` (a `taskset -c` list).
pub fn pin_process(pid: u32, cpus: &str) {
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "taskset -a -p -c {cpus} {pid} failed");
}

fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).unwrap();
    b
}
