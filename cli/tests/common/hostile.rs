//! A hostile client: a stranger with its own cheap mined identity that speaks the agent
//! protocol directly, to try what an attacker would.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use ed25519_dalek::Signature;
use shardfarm_client::farm::{Farm as FarmFile, NodeEntry};
use shardfarm_core::codec::{CodecParams, Encoder};
use shardfarm_core::identity::{Identity, NodeId};
use shardfarm_core::shard::{
    Cipher, FORMAT_VERSION, SegmentHeader, ShardId, coded_shard_length, merkle_root, object_id_for,
};
use shardfarm_proto::pb::ShardEntry;
use shardfarm_proto::{AgentClient, Signer};

/// The attacker: a one-second identity at the local farm's difficulty.
pub struct Hostile {
    pub id: Identity,
    pub signer: Arc<Signer>,
    rt: tokio::runtime::Runtime,
}

/// One segment coded by the attacker under its own (valid) object id.
pub struct OwnSegment {
    pub header: SegmentHeader,
    pub header_bytes: Vec<u8>,
    pub shards: Vec<Bytes>,
}

impl Hostile {
    pub fn new() -> Self {
        let (id, _) = Identity::generate(8, 1, &|_| {}).unwrap();
        let signer = Arc::new(Signer::identity(&id));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Hostile { id, signer, rt }
    }

    fn client(&self, node: &NodeEntry) -> AgentClient {
        let id = NodeId::from_hex(&node.id).unwrap();
        self.rt.block_on(AgentClient::connect(&node.grpc, id, self.signer.clone())).unwrap()
    }

    /// PutShard of `data` as slot `index` under `header`, at `node`.
    pub fn put(
        &self,
        node: &NodeEntry,
        header: &[u8],
        index: u32,
        data: Bytes,
    ) -> Result<(), tonic::Status> {
        let mut c = self.client(node);
        self.rt.block_on(c.put_shard(header, index, data)).map(|_| ())
    }

    /// Every entry `node` lists in partition `p`.
    pub fn list(&self, node: &NodeEntry, p: u32) -> Vec<ShardEntry> {
        let mut c = self.client(node);
        self.rt.block_on(c.list_shards(p, None, 10_000)).unwrap_or_default()
    }

    /// A header for someone else's (`object_id`, `segment`), signed with the attacker's own
    /// key (see [`forged_header`]).
    pub fn forged_header(&self, object_id: [u8; 32], segment: u32) -> (Vec<u8>, Bytes) {
        forged_header(&self.id, object_id, segment)
    }

    /// One segment of the attacker's own object, coded with the farm's profile.
    pub fn own_segment(&self, farm: &FarmFile, len: usize) -> OwnSegment {
        let params = CodecParams {
            k: farm.k,
            m: farm.m,
            segment_size: farm.segment_size,
            cipher: Cipher::preferred(),
        };
        let now = shardfarm_core::auth::now_ms() / 1000;
        let mut enc =
            Encoder::new(params, len as u64, self.id.signing_key().clone(), now, 0).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let seg = enc.encode_segment(0, &data).unwrap();
        OwnSegment {
            header: seg.header.clone(),
            header_bytes: seg.header.encode(),
            shards: seg.shards.iter().map(|s| Bytes::copy_from_slice(s)).collect(),
        }
    }
}

/// A header for someone else's (`object_id`, `segment`), signed with the attacker's own
/// key, structurally valid in every other way (k = 1, m = 5, a 2-byte segment).
pub fn forged_header(id: &Identity, object_id: [u8; 32], segment: u32) -> (Vec<u8>, Bytes) {
    let size = 1u64 << 20;
    let object_length = u64::from(segment) * size + 2;
    let shard_length = coded_shard_length(2, 1);
    let junk = Bytes::from(vec![0xAA; shard_length as usize]);
    let mut h = SegmentHeader {
        version: FORMAT_VERSION,
        cipher: Cipher::Aes256Gcm,
        object_id,
        segment_index: segment,
        segment_count: segment + 1,
        object_length,
        segment_size: size,
        k: 1,
        m: 5,
        shard_length,
        created: shardfarm_core::auth::now_ms() / 1000,
        expires: 0,
        uploader: id.public_key(),
        salt: [0x55; 32],
        shard_roots: vec![merkle_root(&junk); 6],
        signature: Signature::from_bytes(&[0; 64]),
    };
    h.sign(id.signing_key());
    assert_ne!(object_id_for(&h.uploader, &h.salt), object_id);
    (h.encode(), junk)
}

impl OwnSegment {
    pub fn id(&self, shard: u32) -> ShardId {
        ShardId { object_id: self.header.object_id, segment: 0, shard }
    }
}

/// The farm's description as `local up` wrote it (nodes, layout).
pub fn farm_file(dir: &Path) -> FarmFile {
    FarmFile::load(dir).unwrap()
}
