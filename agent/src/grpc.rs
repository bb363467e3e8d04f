//! The agent's gRPC service: the only agent code that sees proto types or maps errors to
//! `Status`.
//!
//! Each method authenticates (signed envelope over its opening message), converts the proto
//! message into domain types, calls the domain and converts the answer back.

use shardfarm_proto::PeerInfo;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::Stream;
use shardfarm_core::auth::{Caller, Verifier};
use shardfarm_core::shard::ShardId;
use shardfarm_proto::convert::shard_id;
use shardfarm_proto::pb as proto;
use shardfarm_proto::{FirstMessageHash, auth_status, methods, verify_request};
use tokio_stream::StreamExt;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::shard::{Error, Node, Policy};

use proto::agent_server::Agent;

/// Bytes per GetShard chunk.
const CHUNK: usize = 1 << 20;

// ---- Errors ----

/// The one place where errors become statuses.
pub fn to_status(e: &Error) -> Status {
    match e {
        Error::InvalidArgument(m) => Status::invalid_argument(m),
        Error::PermissionDenied(m) => Status::permission_denied(m),
        Error::Unauthenticated(a) => auth_status(a),
        Error::ResourceExhausted(m) | Error::OverShare(m) => Status::resource_exhausted(m),
        Error::NotFound(m) => Status::not_found(m),
        Error::AlreadyExists(m) => Status::already_exists(m),
        Error::DataLoss(m) => Status::data_loss(m),
        Error::FailedPrecondition(m) => Status::failed_precondition(m),
        Error::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        Error::Unavailable(m) => Status::unavailable(m),
        Error::Store(s @ crate::store::StoreError::Deleted) => {
            Status::failed_precondition(format!("{s}; its shards are not accepted again"))
        }
        // The node's own failures: the details (file paths, RocksDB messages) go to its log,
        // not to the caller.
        Error::Store(s) if s.is_disk_full() => {
            tracing::error!(error = %s, "disk full");
            Status::resource_exhausted("the node's disk is full: store it elsewhere")
        }
        Error::Store(_) | Error::Internal(_) => {
            tracing::error!(error = %e, "internal error");
            Status::internal("internal error on this node (its log has the details)")
        }
    }
}

// ---- The service ----

/// The gRPC service over a [`Node`].
#[derive(Clone)]
pub struct AgentService {
    node: Arc<Node>,
    verifier: Arc<Verifier>,
    policy: Arc<Policy>,
    version: &'static str,
    /// Longest silence within an upload stream.
    upload_idle: std::time::Duration,
    /// Slowest an upload may send, bytes per second over [`RATE_WINDOW`] (0: unchecked).
    min_upload_rate: u64,
    /// The layouts this node believes (none when it serves alone, without a pool).
    layouts: Option<Arc<crate::layouts::LayoutKeeper>>,
}

/// The window over which an upload's rate is measured.
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl AgentService {
    /// A service for `node`, checking requests with `verifier` and `policy`.
    pub fn new(node: Arc<Node>, verifier: Arc<Verifier>, policy: Arc<Policy>) -> Self {
        AgentService {
            node,
            verifier,
            policy,
            version: env!("CARGO_PKG_VERSION"),
            upload_idle: std::time::Duration::from_secs(30),
            min_upload_rate: 0,
            layouts: None,
        }
    }

    /// Serves the publications `keeper` accepted to GetLayout.
    pub fn with_layouts(mut self, keeper: Arc<crate::layouts::LayoutKeeper>) -> Self {
        self.layouts = Some(keeper);
        self
    }

    /// Aborts uploads that send nothing for `idle` (their reservation is released).
    pub fn with_upload_idle(mut self, idle: std::time::Duration) -> Self {
        self.upload_idle = idle;
        self
    }

    /// Aborts uploads slower than `rate` bytes per second over a [`RATE_WINDOW`] (the last
    /// window only needs what is left of the shard); 0 turns the check off.
    pub fn with_min_upload_rate(mut self, rate: u64) -> Self {
        self.min_upload_rate = rate;
        self
    }

    /// Authenticates `msg` on `method` and applies the policy.
    fn authenticate<M>(&self, request: &Request<M>, method: &str) -> Result<Caller, Status> {
        let first = request.extensions().get::<FirstMessageHash>();
        self.authenticate_parts(request.metadata(), first, &PeerInfo::of(request), method)
    }

    /// [`Self::authenticate`] from a request's parts (a stream's opening message).
    fn authenticate_parts(
        &self,
        md: &MetadataMap,
        first: Option<&FirstMessageHash>,
        peer: &PeerInfo,
        method: &str,
    ) -> Result<Caller, Status> {
        // A connection that keeps sending what fails is not read for a while (proto::conns).
        // (Not when the server is busy or the address throttled: that is not this caller's
        // doing, and a neighbour at the same address could otherwise keep it paused.)
        let caller = verify_request(&self.verifier, md, first, peer, method).map_err(|e| {
            self.node.metrics.auth_failures.with_label_values(&[e.metric_label()]).inc();
            if e.is_peer_fault() {
                peer.note_failure();
            }
            auth_status(&e)
        })?;
        self.policy.check(&caller).map_err(|e| {
            self.node.metrics.auth_failures.with_label_values(&[e.metric_label()]).inc();
            if !self.node.is_member(&caller.id) {
                match e {
                    Error::OverShare(_) => peer.pause_root(),
                    _ => peer.note_failure(),
                }
            }
            to_status(&e)
        })?;
        // The connection now counts against the caller's owner root (pool members exempt).
        let shares = caller.share_weight(self.verifier.min_difficulty());
        peer.note_request(&caller.root.0, self.node.is_member(&caller.id), shares);
        self.node.metrics.note_root(&caller.root.0);
        Ok(caller)
    }

    /// Counts a refusal for a share or limit of `caller`'s (see `Metrics::refused`); a root
    /// refused for one of its shares is not read for a while (`proto::conns`).
    fn count_refusal<T>(
        &self,
        method: &str,
        caller: &Caller,
        peer: &PeerInfo,
        r: &Result<T, Error>,
    ) {
        if let Err(Error::OverShare(_)) = r {
            peer.pause_root();
        }
        if let Err(Error::ResourceExhausted(_) | Error::OverShare(_) | Error::Unavailable(_)) = r {
            let short = method.rsplit('/').next().unwrap_or(method);
            let who = if self.node.is_member(&caller.id) { "member" } else { "stranger" };
            self.node.metrics.refused.with_label_values(&[short, who]).inc();
        }
    }

    /// Counts and times a finished call.
    fn observe<T>(&self, method: &str, start: Instant, r: Result<T, Error>) -> Result<T, Status> {
        let short = method.rsplit('/').next().unwrap_or(method);
        let label = match &r {
            Ok(_) => "ok",
            Err(e) => e.metric_label(),
        };
        let m = &self.node.metrics;
        m.requests.with_label_values(&[short, label]).inc();
        m.request_seconds.with_label_values(&[short]).observe(start.elapsed().as_secs_f64());
        r.map_err(|e| to_status(&e))
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn put_shard(
        &self,
        request: Request<Streaming<proto::PutShardRequest>>,
    ) -> Result<Response<proto::PutShardResponse>, Status> {
        let start = Instant::now();
        let md = request.metadata().clone();
        let peer = PeerInfo::of(&request);
        let first_hash = request.extensions().get::<FirstMessageHash>().cloned();
        let mut stream = request.into_inner();
        let idle = self.upload_idle;
        let first = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no header within the idle timeout"))??
            .ok_or_else(|| Status::invalid_argument("empty stream: send the header first"))?;
        let caller = self.authenticate_parts(&md, first_hash.as_ref(), &peer, methods::PUT)?;
        let Some(proto::put_shard_request::Part::Header(h)) = first.part else {
            return Err(Status::invalid_argument("the first message must be the header"));
        };
        let rate = self.min_upload_rate;
        let r = async {
            let mut upload =
                self.node.begin_put(&caller, h.segment_header.to_vec(), h.shard_index)?;
            let length = upload.header().shard_length;
            // A stream that goes quiet, or sends slower than the minimum rate, is aborted;
            // dropping the upload releases its reservation and its temp file at once.
            let mut received = 0u64;
            let mut last = Instant::now();
            let mut window = (Instant::now(), 0u64, length);
            loop {
                let idle_end = last + idle;
                let deadline =
                    if rate > 0 { idle_end.min(window.0 + RATE_WINDOW) } else { idle_end };
                match tokio::time::timeout_at(deadline.into(), stream.next()).await {
                    Ok(None) => break,
                    Ok(Some(msg)) => {
                        let msg =
                            msg.map_err(|s| Error::InvalidArgument(format!("stream broke: {s}")))?;
                        let Some(proto::put_shard_request::Part::Chunk(c)) = msg.part else {
                            return Err(Error::InvalidArgument(
                                "only chunks may follow the header".into(),
                            ));
                        };
                        last = Instant::now();
                        received += c.len() as u64;
                        window.1 += c.len() as u64;
                        upload.write(c).await?;
                    }
                    Err(_) if Instant::now() >= idle_end => {
                        return Err(Error::DeadlineExceeded(format!(
                            "upload sent nothing for {} s: aborted, its reserved capacity released",
                            idle.as_secs()
                        )));
                    }
                    Err(_) => {}
                }
                let elapsed = window.0.elapsed();
                if rate > 0 && elapsed >= RATE_WINDOW {
                    let need = ((rate as f64 * elapsed.as_secs_f64()) as u64).min(window.2);
                    if window.1 < need {
                        self.node.metrics.uploads_refused.with_label_values(&["too_slow"]).inc();
                        return Err(Error::ResourceExhausted(format!(
                            "upload too slow: {} bytes in {:.0} s, below the minimum upload rate \
                             of {rate} bytes/s: aborted, its reserved capacity released",
                            window.1,
                            elapsed.as_secs_f64()
                        )));
                    }
                    window = (Instant::now(), 0, length.saturating_sub(received));
                }
            }
            upload.finish().await
        }
        .await;
        self.count_refusal(methods::PUT, &caller, &peer, &r);
        let out = self.observe(methods::PUT, start, r)?;
        Ok(Response::new(proto::PutShardResponse {
            merkle_root: Bytes::copy_from_slice(&out.root),
            stored_bytes: out.length,
            already_present: out.already_present,
        }))
    }

    type GetShardStream = Stream2<proto::GetShardResponse>;

    async fn get_shard(
        &self,
        request: Request<proto::GetShardRequest>,
    ) -> Result<Response<Self::GetShardStream>, Status> {
        let start = Instant::now();
        self.authenticate(&request, methods::GET)?;
        let req = request.into_inner();
        let id = shard_id(req.key)?;
        // A shard that opens is counted when its stream ends (below), with the check's result.
        let out = match self.node.get(id, req.offset, req.length).await {
            Ok(out) => out,
            Err(e) => return Err(self.observe::<()>(methods::GET, start, Err(e)).unwrap_err()),
        };
        // A bounded channel fed by a task: a client that goes away stops the work. The shard
        // is checked against its root while it streams; the last chunk waits for the check,
        // so a corrupt shard ends in DataLoss, never in a complete stream.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let metrics = self.node.metrics.clone();
        tokio::spawn(async move {
            use proto::get_shard_response::Part;
            let header = Part::SegmentHeader(Bytes::from(out.header));
            if tx.send(Ok(proto::GetShardResponse { part: Some(header) })).await.is_err() {
                return;
            }
            let mut data = out.data;
            while data.len() > CHUNK {
                let chunk = data.split_to(CHUNK);
                let msg = proto::GetShardResponse { part: Some(Part::Chunk(chunk)) };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
            let checked = out.verified.wait().await;
            let label = checked.as_ref().map_or_else(Error::metric_label, |()| "ok");
            metrics.requests.with_label_values(&["GetShard", label]).inc();
            metrics
                .request_seconds
                .with_label_values(&["GetShard"])
                .observe(start.elapsed().as_secs_f64());
            let last = match checked {
                Ok(()) if data.is_empty() => return,
                Ok(()) => Ok(proto::GetShardResponse { part: Some(Part::Chunk(data)) }),
                Err(e) => Err(to_status(&e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn delete_shard(
        &self,
        request: Request<proto::DeleteShardRequest>,
    ) -> Result<Response<proto::DeleteShardResponse>, Status> {
        let start = Instant::now();
        let caller = self.authenticate(&request, methods::DELETE)?;
        let id = shard_id(request.into_inner().key)?;
        let existed = self.observe(methods::DELETE, start, self.node.delete(caller, id).await)?;
        Ok(Response::new(proto::DeleteShardResponse { existed }))
    }

    type ListShardsStream = Stream2<proto::ShardEntry>;

    async fn delete_object(
        &self,
        request: Request<proto::DeleteObjectRequest>,
    ) -> Result<Response<proto::DeleteObjectResponse>, Status> {
        let start = Instant::now();
        let caller = self.authenticate(&request, methods::DELETE_OBJECT)?;
        let peer = PeerInfo::of(&request);
        let tombstone = request.into_inner().tombstone.to_vec();
        let r = self.node.delete_object(tombstone, Some(&caller)).await;
        self.count_refusal(methods::DELETE_OBJECT, &caller, &peer, &r);
        let deleted_shards = self.observe(methods::DELETE_OBJECT, start, r)?;
        Ok(Response::new(proto::DeleteObjectResponse { deleted_shards }))
    }

    async fn list_tombstones(
        &self,
        request: Request<proto::ListTombstonesRequest>,
    ) -> Result<Response<proto::ListTombstonesResponse>, Status> {
        let start = Instant::now();
        self.authenticate(&request, methods::LIST_TOMBSTONES)?;
        let req = request.into_inner();
        let limit = if req.limit == 0 { 1000 } else { req.limit as usize };
        let r = self.node.tombstones_since(req.after, limit).await;
        let (log, list, last) = self.observe(methods::LIST_TOMBSTONES, start, r)?;
        Ok(Response::new(proto::ListTombstonesResponse {
            tombstones: list.into_iter().map(Bytes::from).collect(),
            log,
            last,
        }))
    }

    async fn list_shards(
        &self,
        request: Request<proto::ListShardsRequest>,
    ) -> Result<Response<Self::ListShardsStream>, Status> {
        let start = Instant::now();
        self.authenticate(&request, methods::LIST)?;
        let req = request.into_inner();
        let after = req.start_after.map(ShardId::try_from).transpose()?;
        let limit = if req.limit == 0 { 1000 } else { req.limit as usize };
        let r = self.node.list(req.partition, after, limit).await;
        let entries = self.observe(methods::LIST, start, r)?;
        let p = req.partition;
        let items = entries.into_iter().map(move |(id, rec)| {
            Ok(proto::ShardEntry {
                key: Some(id.into()),
                partition: p,
                shard_length: rec.length,
                merkle_root: Bytes::copy_from_slice(&rec.root),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    async fn summarize_partitions(
        &self,
        request: Request<proto::SummarizePartitionsRequest>,
    ) -> Result<Response<proto::SummarizePartitionsResponse>, Status> {
        let start = Instant::now();
        self.authenticate(&request, methods::SUMMARIZE)?;
        let partitions = request.into_inner().partitions;
        let r = self.node.summaries(partitions.clone()).await;
        let summaries = self.observe(methods::SUMMARIZE, start, r)?;
        let summaries = partitions
            .into_iter()
            .zip(summaries)
            .map(|(partition, s)| proto::PartitionSummary {
                partition,
                digest: Bytes::copy_from_slice(&s.digest),
                segments: s.segments,
                shards: s.shards,
                indexes: Bytes::copy_from_slice(&s.indexes),
            })
            .collect();
        Ok(Response::new(proto::SummarizePartitionsResponse { summaries }))
    }

    async fn audit(
        &self,
        request: Request<proto::AuditRequest>,
    ) -> Result<Response<proto::AuditResponse>, Status> {
        let start = Instant::now();
        self.authenticate(&request, methods::AUDIT)?;
        let req = request.into_inner();
        let id = shard_id(req.key)?;
        let r = self.node.audit(id, req.nonce.to_vec(), req.leaves).await;
        let (header, leaves) = self.observe(methods::AUDIT, start, r)?;
        Ok(Response::new(proto::AuditResponse {
            segment_header: header.into(),
            leaves: leaves
                .into_iter()
                .map(|l| proto::AuditLeaf {
                    index: l.index as u32,
                    data: l.data.into(),
                    proof: l.proof.iter().map(|p| Bytes::copy_from_slice(p)).collect(),
                })
                .collect(),
        }))
    }

    async fn info(
        &self,
        request: Request<proto::InfoRequest>,
    ) -> Result<Response<proto::InfoResponse>, Status> {
        let start = Instant::now();
        self.authenticate(&request, methods::INFO)?;
        let n = &self.node;
        let resp = proto::InfoResponse {
            node_id: Bytes::copy_from_slice(&n.identity.id().0),
            credential: n.identity.credential().to_bytes().into(),
            version: self.version.into(),
            labels: n.settings.labels.clone().into_iter().collect(),
            identity_difficulty: n.identity.difficulty(),
            capacity_bytes: n.settings.capacity,
            used_bytes: n.store.used_bytes(),
            shards: n.store.shard_count(),
            capacity_proof: n.latest_proof().map(|r| proto::CapacityReport { report: r.into() }),
            partitions: n.settings.partitions,
        };
        self.observe(methods::INFO, start, Ok(()))?;
        Ok(Response::new(resp))
    }

    async fn prove_capacity(
        &self,
        request: Request<proto::CapacityChallenge>,
    ) -> Result<Response<proto::CapacityReport>, Status> {
        let start = Instant::now();
        self.authenticate(&request, methods::PROVE)?;
        let req = request.into_inner();
        let r = self.node.prove_capacity(req.challenge.to_vec(), req.difficulty).await;
        let report = self.observe(methods::PROVE, start, r)?;
        Ok(Response::new(proto::CapacityReport { report: report.into() }))
    }

    async fn get_layout(
        &self,
        request: Request<proto::GetLayoutRequest>,
    ) -> Result<Response<proto::SignedLayout>, Status> {
        let start = Instant::now();
        self.authenticate(&request, methods::AGENT_LAYOUT)?;
        let signed = self.layouts.as_ref().and_then(|k| k.last()).and_then(|l| l.signed.clone());
        let r = signed.ok_or_else(|| {
            Error::NotFound("this node has accepted no layout of a pool yet".into())
        });
        let signed = self.observe(methods::AGENT_LAYOUT, start, r)?;
        Ok(Response::new((*signed).clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node's own failures reach the caller without the node's file paths or database
    /// messages (the log keeps them); a full disk still says what to do.
    #[test]
    fn internal_failures_do_not_tell_callers_the_nodes_paths() {
        let io = crate::store::StoreError::Io {
            what: "writing",
            path: "/srv/shardfarm/secret-layout/shards/ab/x.tmp".into(),
            source: std::io::Error::other("input/output error"),
        };
        let s = to_status(&Error::Store(io));
        assert_eq!(s.code(), tonic::Code::Internal);
        assert!(!s.message().contains("/srv"), "{}", s.message());
        let full = crate::store::StoreError::Io {
            what: "writing",
            path: "/srv/shardfarm/x".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let s = to_status(&Error::Store(full));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().contains("disk is full") && !s.message().contains("/srv"), "{s:?}");
    }
}
