//! The coordinator's gRPC adapter: authenticate, convert, call, map the result.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use shardfarm_core::auth::{Caller, now_ms};
use shardfarm_proto::pb as proto;
use shardfarm_proto::{auth_status, methods, verify_request};
use tonic::{Request, Response, Status};

use super::{Coordinator, JoinInput, Member, Refusal, ReportInput};

/// The one place where refusals become statuses.
fn to_status(r: Refusal) -> Status {
    match r {
        Refusal::InvalidArgument(m) => Status::invalid_argument(m),
        Refusal::PermissionDenied(m) => Status::permission_denied(m),
        Refusal::FailedPrecondition(m) => Status::failed_precondition(m),
        Refusal::NotFound(m) => Status::not_found(m),
        Refusal::Unavailable(m) => Status::unavailable(m),
        Refusal::ResourceExhausted(m) => Status::resource_exhausted(m),
        Refusal::Internal(m) => Status::internal(m),
    }
}

/// Largest request the coordinator decodes: joins and heartbeats are a few KiB.
pub const MAX_REQUEST: usize = 1 << 20;
/// Largest answer it sends: a layout of 65 536 partitions × 14 slots and its fallback.
pub const MAX_RESPONSE: usize = 64 << 20;
/// Concurrent calls per connection (an agent needs two: WatchLayout and one more).
const CONCURRENT_STREAMS: usize = 64;

/// Serves the coordinator's gRPC API on `listener` until `stop`: under TLS proving the pool
/// key (unless the pool's config says `InsecurePlaintext`), with explicit message size limits,
/// HTTP/2 keepalive (a peer that stops answering is dropped: pings every 30 s, 10 s to answer)
/// and a per-connection stream limit.
pub async fn serve(
    listener: tokio::net::TcpListener,
    c: Arc<Coordinator>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let svc = proto::coordinator_server::CoordinatorServer::new(CoordinatorService::new(c.clone()))
        .max_decoding_message_size(MAX_REQUEST)
        .max_encoding_message_size(MAX_RESPONSE);
    // Connections are divided by owner root; members' are never closed to make room.
    let incoming = shardfarm_proto::tls::incoming_tracked(
        listener,
        c.identity().signing_key(),
        c.config().security,
        shardfarm_proto::conns::Connections::enforcing(),
    )?;
    tonic::transport::Server::builder()
        .layer(shardfarm_proto::HashFirstMessage)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .concurrency_limit_per_connection(CONCURRENT_STREAMS)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}

/// The gRPC service over a [`Coordinator`].
#[derive(Clone)]
pub struct CoordinatorService {
    c: Arc<Coordinator>,
}

impl CoordinatorService {
    /// A service for `c`.
    pub fn new(c: Arc<Coordinator>) -> Self {
        CoordinatorService { c }
    }

    fn auth<M: prost::Message>(&self, r: &Request<M>, method: &str) -> Result<Caller, Status> {
        let first = r.extensions().get::<shardfarm_proto::FirstMessageHash>();
        let peer = shardfarm_proto::PeerInfo::of(r);
        let caller =
            verify_request(&self.c.verifier, r.metadata(), first, &peer, method).map_err(|e| {
                self.c.metrics.auth_failures.with_label_values(&[e.metric_label()]).inc();
                // A connection that keeps sending what fails is not read for a while (not
                // when the server is busy or the address throttled: not this caller's doing).
                if e.is_peer_fault() {
                    peer.note_failure();
                }
                auth_status(&e)
            })?;
        let shares = caller.share_weight(self.c.verifier.min_difficulty());
        peer.note_request(&caller.root.0, self.c.is_member(&caller.id), shares);
        Ok(caller)
    }

    /// Counts a refusal for a share or limit (see `Metrics::refused`); a root refused for one
    /// of its shares is not read for a while (`shardfarm_proto::conns`).
    fn count_refusal(
        &self,
        method: &str,
        caller: &Caller,
        peer: &shardfarm_proto::PeerInfo,
        refusal: Option<&Refusal>,
    ) {
        if let Some(Refusal::ResourceExhausted(_)) = refusal {
            peer.pause_root();
        }
        if let Some(Refusal::ResourceExhausted(_) | Refusal::Unavailable(_)) = refusal {
            let who = if self.c.is_member(&caller.id) { "member" } else { "stranger" };
            self.c.metrics.refused.with_label_values(&[method, who]).inc();
        }
    }
}

fn node_status(m: &Member, slots: u64, rw: (u64, u64), now: u64) -> proto::NodeStatus {
    proto::NodeStatus {
        node_id: m.id.0.to_vec().into(),
        grpc_address: m.grpc.clone(),
        http_address: m.http.clone(),
        labels: m.labels.clone().into_iter().collect(),
        standing: m.standing.as_str().into(),
        up: m.up,
        last_seen_ms: m.last_seen_ms,
        audit_score: m.audit.score(),
        uptime: m.uptime.ratio(now),
        audits_passed: m.audits_passed,
        audits_failed: m.audits_failed,
        capacity: m.capacity,
        used_bytes: m.used_bytes,
        slots,
        rewards_rw1: rw.0,
        rewards_rw2: rw.1,
        synced_version: m.synced_version,
        root: m.root.0.to_vec().into(),
    }
}

/// The pool's settings as clients read them (GetPool, and inside every signed layout).
pub(crate) fn pool_info(cfg: &super::PoolConfig) -> proto::PoolInfo {
    proto::PoolInfo {
        pool: cfg.pool.clone(),
        k: u32::from(cfg.k),
        m: u32::from(cfg.m),
        partitions: cfg.partitions,
        segment_size: cfg.segment_size,
        min_difficulty: u32::from(cfg.min_difficulty),
        heartbeat_ms: cfg.heartbeat_ms,
        failure_domain: cfg.failure_domain.clone(),
    }
}

type LayoutStream = Pin<Box<dyn Stream<Item = Result<proto::SignedLayout, Status>> + Send>>;

#[tonic::async_trait]
impl proto::coordinator_server::Coordinator for CoordinatorService {
    async fn challenge(
        &self,
        request: Request<proto::ChallengeRequest>,
    ) -> Result<Response<proto::ChallengeResponse>, Status> {
        let caller = self.auth(&request, methods::CHALLENGE)?;
        let peer = shardfarm_proto::PeerInfo::of(&request);
        let issued = self.c.challenge_for(&caller, now_ms());
        self.count_refusal("Challenge", &caller, &peer, issued.as_ref().err());
        let (challenge, difficulty) = issued.map_err(to_status)?;
        Ok(Response::new(proto::ChallengeResponse {
            challenge: challenge.into(),
            difficulty: u32::from(difficulty),
        }))
    }

    async fn join(
        &self,
        request: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinResponse>, Status> {
        let caller = self.auth(&request, methods::JOIN)?;
        let peer = shardfarm_proto::PeerInfo::of(&request);
        let r = request.into_inner();
        let input = JoinInput {
            grpc: r.grpc_address,
            http: r.http_address,
            labels: r.labels.into_iter().collect(),
            capacity_report: r.capacity_report.to_vec(),
            last_layout: r.last_layout,
            farm_grant: r.farm_grant.to_vec(),
        };
        let joined = self.c.join(&caller, input, now_ms());
        self.count_refusal("Join", &caller, &peer, joined.as_ref().err());
        let result = if joined.is_ok() { "ok" } else { "refused" };
        self.c.metrics.joins.with_label_values(&[result]).inc();
        let m = joined.map_err(to_status)?;
        let cfg = self.c.config();
        Ok(Response::new(proto::JoinResponse {
            node_id: m.id.0.to_vec().into(),
            pool: Some(pool_info(cfg)),
            layout_version: self.c.layout().map_or(0, |l| l.layout.version),
            standing: m.standing.as_str().into(),
        }))
    }

    async fn report(
        &self,
        request: Request<proto::ReportRequest>,
    ) -> Result<Response<proto::ReportResponse>, Status> {
        let caller = self.auth(&request, methods::REPORT)?;
        let r = request.into_inner();
        let input = ReportInput {
            used_bytes: r.used_bytes,
            shards: r.shards,
            scrub_errors: r.scrub_errors,
            repair_backlog: r.repair_backlog,
            synced_version: r.synced_version,
            lost_segments: r.lost_segments,
            suspect_peers: r
                .suspect_peers
                .iter()
                .take(64)
                .filter_map(|b| Some(shardfarm_core::identity::NodeId(b[..].try_into().ok()?)))
                .collect(),
        };
        let (standing, layout_version) =
            self.c.report(&caller, input, now_ms()).map_err(to_status)?;
        Ok(Response::new(proto::ReportResponse {
            standing: standing.as_str().into(),
            layout_version,
        }))
    }

    async fn get_layout(
        &self,
        request: Request<proto::GetLayoutRequest>,
    ) -> Result<Response<proto::SignedLayout>, Status> {
        self.auth(&request, methods::GET_LAYOUT)?;
        match self.c.layout().and_then(|l| l.signed.clone()) {
            Some(signed) => Ok(Response::new((*signed).clone())),
            None => Err(Status::unavailable(format!(
                "no layout yet: {}",
                self.c.layout_problem().unwrap_or_else(|| "waiting for nodes to join".into())
            ))),
        }
    }

    type WatchLayoutStream = LayoutStream;

    async fn watch_layout(
        &self,
        request: Request<proto::WatchLayoutRequest>,
    ) -> Result<Response<Self::WatchLayoutStream>, Status> {
        self.auth(&request, methods::WATCH_LAYOUT)?;
        let rx = self.c.subscribe();
        let stream = tokio_stream::wrappers::WatchStream::new(rx)
            .filter_map(|l| l.and_then(|l| l.signed.clone()).map(|s| Ok((*s).clone())));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_nodes(
        &self,
        request: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        self.auth(&request, methods::LIST_NODES)?;
        let layout = self.c.layout();
        let loads = layout.as_ref().map(|l| l.layout.loads()).unwrap_or_default();
        let (by_node, _) = self.c.reward_totals();
        let now = now_ms();
        let nodes = self
            .c
            .members()
            .iter()
            .map(|m| {
                let rw = by_node.get(&m.id.to_hex()).map_or((0, 0), |t| (t.rw1, t.rw2));
                node_status(m, loads.get(&m.id).copied().unwrap_or(0) as u64, rw, now)
            })
            .collect();
        Ok(Response::new(proto::ListNodesResponse {
            nodes,
            layout_version: layout.map_or(0, |l| l.layout.version),
        }))
    }

    async fn get_pool(
        &self,
        request: Request<proto::GetPoolRequest>,
    ) -> Result<Response<proto::PoolInfo>, Status> {
        self.auth(&request, methods::GET_POOL)?;
        Ok(Response::new(pool_info(self.c.config())))
    }
}

use tokio_stream::StreamExt as _;
