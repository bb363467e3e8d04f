//! Conversions between proto messages and domain types (the layout has its own, in
//! [`crate::coordinator`]).

use bytes::Bytes;
use shardfarm_core::audit::ProvenLeaf;
use shardfarm_core::shard::ShardId;
use tonic::Status;

use crate::pb as proto;

/// The shard id of a request, which must be present.
pub fn shard_id(key: Option<proto::ShardKey>) -> Result<ShardId, Status> {
    let k = key.ok_or_else(|| Status::invalid_argument("key is required"))?;
    ShardId::try_from(k)
}

impl TryFrom<proto::ShardKey> for ShardId {
    type Error = Status;
    fn try_from(k: proto::ShardKey) -> Result<Self, Status> {
        Ok(ShardId {
            object_id: k.object_id[..]
                .try_into()
                .map_err(|_| Status::invalid_argument("object_id must be 32 bytes"))?,
            segment: k.segment_index,
            shard: k.shard_index,
        })
    }
}

impl From<ShardId> for proto::ShardKey {
    fn from(id: ShardId) -> Self {
        proto::ShardKey {
            object_id: Bytes::copy_from_slice(&id.object_id),
            segment_index: id.segment,
            shard_index: id.shard,
        }
    }
}

impl From<proto::AuditLeaf> for ProvenLeaf {
    /// A leaf as the auditor checks it; proof hashes that are not 32 bytes are dropped, so
    /// the proof fails to verify rather than the conversion panicking.
    fn from(l: proto::AuditLeaf) -> Self {
        ProvenLeaf {
            index: l.index as usize,
            data: l.data.to_vec(),
            proof: l.proof.iter().filter_map(|h| h[..].try_into().ok()).collect(),
        }
    }
}
