//! A signing client for the agent protocol, used by the CLI, the coordinator, peers and tests.

use std::sync::Arc;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use prost::Message;
use shardfarm_core::identity::{Credential, Delegation, Identity, NodeId};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use shardfarm_core::shard::{PartitionSummary, ShardId};

use crate::envelope::{methods, sign_into};
use crate::pb as proto;
use crate::pb::agent_client::AgentClient as Raw;
use crate::tls::Security;

/// Bytes per PutShard chunk (the protocol allows 1–4 MiB).
pub const PUT_CHUNK: usize = 1 << 20;
/// Default message size limit on both sides.
pub const MAX_MESSAGE: usize = 8 << 20;
/// The longest shard any valid header can describe (a maximal segment at k = 1).
const MAX_SHARD: u64 =
    shardfarm_core::shard::coded_shard_length(shardfarm_core::shard::MAX_SEGMENT_SIZE, 1);
/// What an agent lists when asked for 0 entries, and the most it lists at once.
const LIST_DEFAULT: u32 = 1000;
const LIST_MAX: u32 = 10_000;

/// A page of an agent's tombstones in arrival order ([`AgentClient::list_tombstones`]).
#[derive(Debug)]
pub struct TombstonePage {
    /// The agent's tombstone log id: arrival numbers from another log do not apply.
    pub log: u64,
    /// Encoded tombstones, unverified.
    pub tombstones: Vec<Bytes>,
    /// Arrival number of the last one listed (the `after` asked, when none).
    pub last: u64,
}

/// Who signs requests: a credential and the key that matches it; the same key is proved on
/// every connection it opens (see [`crate::tls`]).
#[derive(Clone)]
pub struct Signer {
    credential: Credential,
    key: SigningKey,
    security: Security,
}

impl Signer {
    /// Signs as a mined identity.
    pub fn identity(id: &Identity) -> Self {
        Signer {
            credential: id.credential(),
            key: id.signing_key().clone(),
            security: Security::Tls,
        }
    }

    /// Signs with a delegated key.
    pub fn delegated(cert: Delegation, key: SigningKey) -> Self {
        Signer { credential: Credential::Delegated(Box::new(cert)), key, security: Security::Tls }
    }

    /// A signer with any credential/key pair (tests use mismatched ones on purpose).
    pub fn raw(credential: Credential, key: SigningKey) -> Self {
        Signer { credential, key, security: Security::Tls }
    }

    /// The same signer, dialing with `security` (TLS unless a binary's
    /// `--insecure-plaintext` debugging flag says otherwise).
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    /// How this signer's connections are protected.
    pub fn security(&self) -> Security {
        self.security
    }

    /// Opens a channel on `endpoint` to the node (or pool) `peer`, proving this signer's key.
    pub async fn dial(
        &self,
        endpoint: Endpoint,
        peer: NodeId,
    ) -> Result<Channel, tonic::transport::Error> {
        crate::tls::connect(endpoint, peer, &self.key, self.security).await
    }

    /// The signing key.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// Wraps `msg` in a request signed for `method`.
    pub fn request<M: Message>(&self, audience: NodeId, method: &str, msg: M) -> Request<M> {
        let mut md = tonic::metadata::MetadataMap::new();
        sign_into(&mut md, audience, method, &msg, &self.credential, &self.key);
        let mut r = Request::new(msg);
        *r.metadata_mut() = md;
        r
    }
}

/// A connection to one agent.
#[derive(Clone)]
pub struct AgentClient {
    raw: Raw<Channel>,
    signer: Arc<Signer>,
    /// The node this client talks to: every request is addressed to it.
    node: NodeId,
}

/// What a shard read returns: the signed header and the bytes.
#[derive(Debug)]
pub struct FetchedShard {
    /// Encoded segment header.
    pub header: Vec<u8>,
    /// The bytes asked for.
    pub data: Vec<u8>,
}

impl AgentClient {
    /// Connects to `addr` (`host:port`), where the node `node` must answer, signing with
    /// `signer`.
    pub async fn connect(
        addr: &str,
        node: NodeId,
        signer: Arc<Signer>,
    ) -> Result<Self, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            // Larger HTTP/2 windows: 1-4 MiB chunks otherwise stall on flow control.
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(32 << 20)
            .max_frame_size(1 << 20);
        let channel = signer.dial(endpoint, node).await?;
        Ok(Self::with_channel(channel, node, signer))
    }

    /// Connects to a seed address whose node is not known yet, learning its id from the
    /// handshake. Use it only for [`AgentClient::get_layout`], whose answer is checked
    /// against the pinned pool key, not against this peer. `None` under plaintext (no id).
    pub async fn discover(
        addr: &str,
        signer: Arc<Signer>,
    ) -> Result<Option<Self>, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?.tcp_nodelay(true);
        let (channel, id) =
            crate::tls::connect_discover(endpoint, signer.key(), signer.security()).await?;
        Ok(id.map(|node| Self::with_channel(channel, node, signer)))
    }

    /// The node this client talks to.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The newest layout publication the node accepted, as the pool signed it: pass it
    /// through a [`crate::LayoutGuard`] before believing it.
    pub async fn get_layout(&mut self) -> Result<proto::SignedLayout, Status> {
        let req = self.signer.request(self.node, methods::AGENT_LAYOUT, proto::GetLayoutRequest {});
        Ok(self.raw.get_layout(req).await?.into_inner())
    }

    /// A client over an existing channel.
    pub fn with_channel(channel: Channel, node: NodeId, signer: Arc<Signer>) -> Self {
        let raw = Raw::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        AgentClient { raw, signer, node }
    }

    /// The signer.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Uploads slot `shard_index` of a segment: the header, then the bytes in chunks.
    pub async fn put_shard(
        &mut self,
        header: &[u8],
        shard_index: u32,
        data: Bytes,
    ) -> Result<proto::PutShardResponse, Status> {
        use proto::put_shard_request::Part;
        let first = proto::PutShardRequest {
            part: Some(Part::Header(proto::PutShardHeader {
                segment_header: Bytes::copy_from_slice(header),
                shard_index,
            })),
        };
        // Sign the opening message; the payload is bound by the signed header's Merkle root.
        let mut md = tonic::metadata::MetadataMap::new();
        sign_into(
            &mut md,
            self.node,
            methods::PUT,
            &first,
            &self.signer.credential,
            &self.signer.key,
        );
        let chunks = (0..data.len().div_ceil(PUT_CHUNK)).map(move |i| proto::PutShardRequest {
            part: Some(Part::Chunk(
                data.slice(i * PUT_CHUNK..((i + 1) * PUT_CHUNK).min(data.len())),
            )),
        });
        let stream = tokio_stream::iter(std::iter::once(first).chain(chunks));
        let mut req = Request::new(stream);
        *req.metadata_mut() = md;
        Ok(self.raw.put_shard(req).await?.into_inner())
    }

    /// Reads a shard (`length` 0 = to the end).
    pub async fn get_shard(
        &mut self,
        id: ShardId,
        offset: u64,
        length: u64,
    ) -> Result<FetchedShard, Status> {
        use proto::get_shard_response::Part;
        let req = proto::GetShardRequest { key: Some(id.into()), offset, length };
        let mut stream = self
            .raw
            .get_shard(self.signer.request(self.node, methods::GET, req))
            .await?
            .into_inner();
        let mut out = FetchedShard { header: Vec::new(), data: Vec::new() };
        // Nothing the agent says is trusted yet: the header bounds what may follow, and no
        // header can promise more than one maximal shard.
        let mut room: Option<usize> = None;
        while let Some(msg) = stream.next().await {
            match msg?.part {
                Some(Part::SegmentHeader(h)) => {
                    if room.is_some() {
                        return Err(Status::internal("agent sent a second segment header"));
                    }
                    let hd = shardfarm_core::shard::SegmentHeader::decode_unverified(&h).map_err(
                        |e| {
                            Status::internal(format!(
                                "agent sent a header that does not parse: {e}"
                            ))
                        },
                    )?;
                    let shard = hd.shard_length.min(MAX_SHARD);
                    let left = shard.saturating_sub(offset);
                    let want = if length == 0 { left } else { length.min(left) };
                    room = Some(want as usize);
                    out.data.reserve(want as usize);
                    out.header = h.to_vec();
                }
                Some(Part::Chunk(c)) => {
                    let Some(left) = room.as_mut() else {
                        return Err(Status::internal("agent sent bytes before the segment header"));
                    };
                    *left = left.checked_sub(c.len()).ok_or_else(|| {
                        Status::internal("agent sent more bytes than the shard or range holds")
                    })?;
                    out.data.extend_from_slice(&c);
                }
                None => {}
            }
        }
        if out.header.is_empty() {
            return Err(Status::internal("agent sent no segment header"));
        }
        Ok(out)
    }

    /// Deletes a shard (must be signed by its uploader).
    pub async fn delete_shard(&mut self, id: ShardId) -> Result<bool, Status> {
        let req = proto::DeleteShardRequest { key: Some(id.into()) };
        Ok(self
            .raw
            .delete_shard(self.signer.request(self.node, methods::DELETE, req))
            .await?
            .into_inner()
            .existed)
    }

    /// Delivers a tombstone: the agent deletes the object's shards it holds and keeps the
    /// tombstone. Returns the shards deleted.
    pub async fn delete_object(&mut self, tombstone: &[u8]) -> Result<u32, Status> {
        let req = proto::DeleteObjectRequest { tombstone: Bytes::copy_from_slice(tombstone) };
        Ok(self
            .raw
            .delete_object(self.signer.request(self.node, methods::DELETE_OBJECT, req))
            .await?
            .into_inner()
            .deleted_shards)
    }

    /// One page of the tombstones that arrived at the agent after arrival number `after`:
    /// the agent's log id, the tombstones (unverified: the caller verifies each), and the
    /// arrival number of the last one.
    pub async fn list_tombstones(
        &mut self,
        after: u64,
        limit: u32,
    ) -> Result<TombstonePage, Status> {
        let req = proto::ListTombstonesRequest { after, limit };
        let most = if limit == 0 { LIST_DEFAULT } else { limit.min(LIST_MAX) } as usize;
        let r = self
            .raw
            .list_tombstones(self.signer.request(self.node, methods::LIST_TOMBSTONES, req))
            .await?
            .into_inner();
        if r.tombstones.len() > most {
            return Err(Status::internal(format!(
                "agent sent {} tombstones for a page of {most}",
                r.tombstones.len()
            )));
        }
        Ok(TombstonePage { log: r.log, tombstones: r.tombstones, last: r.last })
    }

    /// Lists one page of a partition.
    pub async fn list_shards(
        &mut self,
        partition: u32,
        start_after: Option<ShardId>,
        limit: u32,
    ) -> Result<Vec<proto::ShardEntry>, Status> {
        let req =
            proto::ListShardsRequest { partition, start_after: start_after.map(Into::into), limit };
        let mut s = self
            .raw
            .list_shards(self.signer.request(self.node, methods::LIST, req))
            .await?
            .into_inner();
        let most = if limit == 0 { LIST_DEFAULT } else { limit.min(LIST_MAX) } as usize;
        let mut out = Vec::new();
        while let Some(e) = s.next().await {
            if out.len() == most {
                return Err(Status::internal(format!(
                    "agent listed more than the {most} entries asked for"
                )));
            }
            out.push(e?);
        }
        Ok(out)
    }

    /// Summaries of what the agent holds in `partitions`, in the order asked. The answer is
    /// checked: one summary per partition asked, in order, with a 32-byte digest and bitmap.
    pub async fn summarize_partitions(
        &mut self,
        partitions: &[u32],
    ) -> Result<Vec<PartitionSummary>, Status> {
        let req = proto::SummarizePartitionsRequest { partitions: partitions.to_vec() };
        let r = self
            .raw
            .summarize_partitions(self.signer.request(self.node, methods::SUMMARIZE, req))
            .await?
            .into_inner();
        if r.summaries.len() != partitions.len() {
            return Err(Status::internal(format!(
                "agent answered {} summaries for {} partitions",
                r.summaries.len(),
                partitions.len()
            )));
        }
        partitions
            .iter()
            .zip(r.summaries)
            .map(|(want, s)| {
                let bad = |what: &str| {
                    Status::internal(format!("agent's summary of partition {want}: {what}"))
                };
                if s.partition != *want {
                    return Err(bad(&format!("it names partition {}", s.partition)));
                }
                Ok(PartitionSummary {
                    digest: s.digest[..].try_into().map_err(|_| bad("digest is not 32 bytes"))?,
                    segments: s.segments,
                    shards: s.shards,
                    indexes: s.indexes[..]
                        .try_into()
                        .map_err(|_| bad("index bitmap is not 32 bytes"))?,
                })
            })
            .collect()
    }

    /// Audits a shard.
    pub async fn audit(
        &mut self,
        id: ShardId,
        nonce: &[u8],
        leaves: u32,
    ) -> Result<proto::AuditResponse, Status> {
        let req = proto::AuditRequest {
            key: Some(id.into()),
            nonce: Bytes::copy_from_slice(nonce),
            leaves,
        };
        Ok(self.raw.audit(self.signer.request(self.node, methods::AUDIT, req)).await?.into_inner())
    }

    /// The agent's identity and state.
    pub async fn info(&mut self) -> Result<proto::InfoResponse, Status> {
        Ok(self
            .raw
            .info(self.signer.request(self.node, methods::INFO, proto::InfoRequest {}))
            .await?
            .into_inner())
    }

    /// Asks for a capacity proof.
    pub async fn prove_capacity(
        &mut self,
        challenge: &[u8],
        difficulty: u32,
    ) -> Result<Vec<u8>, Status> {
        let req =
            proto::CapacityChallenge { challenge: Bytes::copy_from_slice(challenge), difficulty };
        Ok(self
            .raw
            .prove_capacity(self.signer.request(self.node, methods::PROVE, req))
            .await?
            .into_inner()
            .report
            .to_vec())
    }
}
