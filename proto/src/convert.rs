//! Conversions between proto messages and domain types (the layout has its own, in
//! [`crate::coordinator`]).

use bytes::Bytes;
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
