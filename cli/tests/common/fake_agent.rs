//! A malicious pool member: it joins the farm's coordinator with its own mined identity and a
//! capacity proof like any agent, heartbeats claiming to be synced, lists every honest segment
//! it can learn under every slot, and serves junk: alternately headers it signed itself for
//! honest object ids and honest headers with bytes that do not match their roots, and audit
//! answers under forged headers. It never stores a byte.
//!
//! With [`Behaviour::Overflow`] it tries to exhaust its peers instead: every shard it serves
//! is an honest header followed by an endless stream of 1 MiB chunks, and every listing is an
//! endless stream of made-up shards claiming 2^62 bytes each.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use shardfarm_client::farm::Farm;
use shardfarm_core::capacity::{CapacityReport, Machine};
use shardfarm_core::identity::{Identity, NodeId};
use shardfarm_core::shard::ShardId;
use shardfarm_proto::pb::agent_server::{Agent, AgentServer};
use shardfarm_proto::pb::{self as proto, get_shard_response::Part};
use shardfarm_proto::{AgentClient, CoordinatorClient, Signer};
use tonic::{Request, Response, Status, Streaming};

use super::hostile::forged_header;

type Known = Arc<Mutex<BTreeMap<u32, BTreeSet<([u8; 32], u32)>>>>;

/// What the fake member does with its peers' requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Serves forged headers and corrupt bytes.
    Junk,
    /// Never stops sending: endless shards and endless listings.
    Overflow,
}

/// The running fake member.
pub struct FakeAgent {
    pub id: String,
    pub grpc: String,
    /// GetShard and ListShards calls its peers made to it.
    served: Arc<std::sync::atomic::AtomicU64>,
    rt: tokio::runtime::Runtime,
}

#[derive(Clone)]
struct Service {
    evil: Identity,
    /// Partition → honest (object, segment) pairs, learned from honest nodes' listings.
    known: Known,
    /// Where it fetches real headers from (any honest node answers GetShard), with their ids.
    honest: Vec<(String, NodeId)>,
    signer: Arc<Signer>,
    calls: Arc<std::sync::atomic::AtomicU64>,
    served: Arc<std::sync::atomic::AtomicU64>,
    behaviour: Behaviour,
    partitions: u32,
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Service {
    async fn real_shard(&self, id: ShardId) -> Option<(Vec<u8>, Vec<u8>)> {
        for (addr, node) in &self.honest {
            let Ok(mut c) = AgentClient::connect(addr, *node, self.signer.clone()).await else {
                continue;
            };
            if let Ok(got) = c.get_shard(id, 0, 0).await {
                return Some((got.header, got.data));
            }
        }
        None
    }

    /// Junk for `id`, alternately: a header it signed itself for the honest id, or the honest
    /// header with bytes that do not match its root (some shard of the segment, flipped).
    async fn junk(&self, id: ShardId) -> (Vec<u8>, Vec<u8>) {
        let turn = self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if turn % 2 == 1 {
            for shard in (0..6).map(|i| (id.shard + i) % 6) {
                let Some((header, mut data)) = self.real_shard(ShardId { shard, ..id }).await
                else {
                    continue;
                };
                for b in data.iter_mut().step_by(97) {
                    *b ^= 0xFF;
                }
                return (header, data);
            }
        }
        let (header, junk) = forged_header(&self.evil, id.object_id, id.segment);
        (header, junk.to_vec())
    }
}

#[tonic::async_trait]
impl Agent for Service {
    type GetShardStream = Stream2<proto::GetShardResponse>;
    type ListShardsStream = Stream2<proto::ShardEntry>;

    async fn put_shard(
        &self,
        _: Request<Streaming<proto::PutShardRequest>>,
    ) -> Result<Response<proto::PutShardResponse>, Status> {
        Err(Status::unavailable("busy"))
    }

    async fn get_shard(
        &self,
        request: Request<proto::GetShardRequest>,
    ) -> Result<Response<Self::GetShardStream>, Status> {
        self.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = shardfarm_proto::convert::shard_id(request.into_inner().key)?;
        if self.behaviour == Behaviour::Overflow {
            let header = match self.real_shard(id).await {
                Some((h, _)) => h,
                None => forged_header(&self.evil, id.object_id, id.segment).0,
            };
            let chunk = Bytes::from(vec![0x5A; 1 << 20]);
            let head = proto::GetShardResponse { part: Some(Part::SegmentHeader(header.into())) };
            let endless =
                futures::stream::iter([Ok(head)]).chain(futures::stream::repeat_with(move || {
                    Ok(proto::GetShardResponse { part: Some(Part::Chunk(chunk.clone())) })
                }));
            return Ok(Response::new(Box::pin(endless)));
        }
        let (header, data) = self.junk(id).await;
        let parts = vec![
            Ok(proto::GetShardResponse { part: Some(Part::SegmentHeader(header.into())) }),
            Ok(proto::GetShardResponse { part: Some(Part::Chunk(data.into())) }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(parts))))
    }

    async fn delete_shard(
        &self,
        _: Request<proto::DeleteShardRequest>,
    ) -> Result<Response<proto::DeleteShardResponse>, Status> {
        Ok(Response::new(proto::DeleteShardResponse { existed: true }))
    }

    async fn delete_object(
        &self,
        _: Request<proto::DeleteObjectRequest>,
    ) -> Result<Response<proto::DeleteObjectResponse>, Status> {
        Ok(Response::new(proto::DeleteObjectResponse { deleted_shards: 0 }))
    }

    async fn list_tombstones(
        &self,
        _: Request<proto::ListTombstonesRequest>,
    ) -> Result<Response<proto::ListTombstonesResponse>, Status> {
        Ok(Response::new(proto::ListTombstonesResponse::default()))
    }

    async fn summarize_partitions(
        &self,
        request: Request<proto::SummarizePartitionsRequest>,
    ) -> Result<Response<proto::SummarizePartitionsResponse>, Status> {
        self.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // It never agrees with anyone (a fresh digest each time, every slot claimed), so its
        // peers always go on to list the partition, where it lies at length.
        let summaries = request
            .into_inner()
            .partitions
            .into_iter()
            .map(|partition| proto::PartitionSummary {
                partition,
                digest: Bytes::copy_from_slice(&rand_bytes()),
                segments: 1,
                shards: 256,
                indexes: Bytes::from_static(&[0xFF; 32]),
            })
            .collect();
        Ok(Response::new(proto::SummarizePartitionsResponse { summaries }))
    }

    async fn list_shards(
        &self,
        request: Request<proto::ListShardsRequest>,
    ) -> Result<Response<Self::ListShardsStream>, Status> {
        self.served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = request.into_inner().partition;
        if self.behaviour == Behaviour::Overflow {
            // One made-up object in the partition, listed with ever new shard indexes (the
            // shard index does not change the partition, so each entry looks plausible).
            let object_id = loop {
                let o: [u8; 32] = rand_bytes();
                if shardfarm_core::shard::partition(&o, 0, self.partitions) == p {
                    break o;
                }
            };
            let mut shard = 0u32;
            let endless = futures::stream::repeat_with(move || {
                shard = shard.wrapping_add(1);
                let id = ShardId { object_id, segment: 0, shard };
                Ok(proto::ShardEntry {
                    key: Some(id.into()),
                    partition: p,
                    shard_length: 1 << 62,
                    merkle_root: Bytes::from_static(&[7; 32]),
                })
            });
            return Ok(Response::new(Box::pin(endless)));
        }
        let known = self.known.lock().unwrap().get(&p).cloned().unwrap_or_default();
        let mut out = Vec::new();
        for (obj, seg) in known {
            for shard in 0..6 {
                let id = ShardId { object_id: obj, segment: seg, shard };
                out.push(Ok(proto::ShardEntry {
                    key: Some(id.into()),
                    partition: p,
                    shard_length: 1,
                    merkle_root: Bytes::from_static(&[0; 32]),
                }));
            }
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    async fn audit(
        &self,
        request: Request<proto::AuditRequest>,
    ) -> Result<Response<proto::AuditResponse>, Status> {
        let id = shardfarm_proto::convert::shard_id(request.into_inner().key)?;
        let (header, _) = forged_header(&self.evil, id.object_id, id.segment);
        Ok(Response::new(proto::AuditResponse { segment_header: header.into(), leaves: vec![] }))
    }

    async fn info(
        &self,
        _: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        Ok(Response::new(proto::InfoResponse::default()))
    }

    async fn prove_capacity(
        &self,
        _: Request<proto::CapacityChallenge>,
    ) -> Result<Response<proto::CapacityReport>, Status> {
        Err(Status::unavailable("busy"))
    }

    async fn get_layout(
        &self,
        _: Request<proto::GetLayoutRequest>,
    ) -> Result<Response<proto::SignedLayout>, Status> {
        Err(Status::unavailable("busy"))
    }
}

impl FakeAgent {
    /// GetShard and ListShards calls its peers have made to it so far.
    pub fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Joins the farm whose coordinator is at `coordinator`, learning honest segments from
    /// `honest` (addresses) over `partitions`.
    pub fn join(farm: &Farm, honest: Vec<String>, zone: &str) -> FakeAgent {
        Self::join_as(farm, honest, zone, Behaviour::Junk)
    }

    /// The same, behaving as `behaviour` says.
    pub fn join_as(
        farm: &Farm,
        honest: Vec<String>,
        zone: &str,
        behaviour: Behaviour,
    ) -> FakeAgent {
        let coordinator = farm.coordinator.as_deref().expect("the farm has a coordinator");
        let pool =
            NodeId::from_hex(farm.pool_id.as_deref().expect("the farm has a pool id")).unwrap();
        let partitions = farm.partitions;
        let honest: Vec<(String, NodeId)> = honest
            .into_iter()
            .map(|a| {
                let n =
                    farm.nodes.iter().find(|n| n.grpc == a).expect("an honest node of the farm");
                (a, NodeId::from_hex(&n.id).unwrap())
            })
            .collect();
        let (evil, _) = Identity::generate(8, 1, &|_| {}).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let signer = Arc::new(Signer::identity(&evil));
        let known: Known = Arc::default();
        let served: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let grpc = listener.local_addr().unwrap().to_string();
        let svc = Service {
            evil: evil.clone(),
            known: known.clone(),
            honest: honest.clone(),
            signer: signer.clone(),
            calls: Arc::default(),
            served: served.clone(),
            behaviour,
            partitions,
        };
        rt.spawn(async move {
            let incoming = shardfarm_proto::tls::incoming(
                listener,
                svc.evil.signing_key(),
                shardfarm_proto::Security::Tls,
            )
            .unwrap();
            tonic::transport::Server::builder()
                .add_service(AgentServer::new(svc))
                .serve_with_incoming(incoming)
                .await
        });
        // Learns what honest nodes list, keeps learning: the junk it serves names their ids. An
        // overflowing member needs none of it (it makes its ids up), and its learning — every
        // partition of every node, every second — would load the farm more than its attack.
        let (learn_signer, learn_known) = (signer.clone(), known.clone());
        let learn = behaviour != Behaviour::Overflow;
        rt.spawn(async move {
            if !learn {
                return;
            }
            loop {
                for (addr, node) in &honest {
                    let Ok(mut c) = AgentClient::connect(addr, *node, learn_signer.clone()).await
                    else {
                        continue;
                    };
                    for p in 0..partitions {
                        for e in c.list_shards(p, None, 10_000).await.unwrap_or_default() {
                            let k = e.key.unwrap();
                            learn_known
                                .lock()
                                .unwrap()
                                .entry(p)
                                .or_default()
                                .insert((k.object_id[..].try_into().unwrap(), k.segment_index));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        // Joins with a real capacity proof, then heartbeats claiming to be synced.
        let coordinator = coordinator.to_string();
        let (id, zone, addr) = (evil.clone(), zone.to_string(), grpc.clone());
        rt.block_on(async {
            let mut c =
                CoordinatorClient::connect(&coordinator, signer.clone(), pool).await.unwrap();
            let ch = c.challenge().await.unwrap();
            let machine = Machine {
                processors: 1,
                cores_per_processor: 2,
                overhead: 1.0,
                space_reported: 10 << 30,
                space_taken: 0,
            };
            let report =
                CapacityReport::prove(&id, &ch.challenge, ch.difficulty as u8, machine).unwrap();
            let req = proto::JoinRequest {
                grpc_address: addr.clone(),
                http_address: addr,
                labels: [("zone".to_string(), zone)].into(),
                capacity_report: report.encode().into(),
                last_layout: None,
                farm_grant: Default::default(),
            };
            c.join(req).await.unwrap();
        });
        let hb_signer = signer.clone();
        rt.spawn(async move {
            let mut c = CoordinatorClient::connect(&coordinator, hb_signer, pool).await.unwrap();
            loop {
                let version = c.get_layout().await.map(|l| l.layout.version).unwrap_or(0);
                let _ = c
                    .report(proto::ReportRequest {
                        used_bytes: 1 << 30,
                        shards: 1000,
                        synced_version: version,
                        ..Default::default()
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        FakeAgent { id: evil.id().to_hex(), grpc, served, rt }
    }
}

fn rand_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).unwrap();
    b
}
