//! `SegmentHeader::decode` / `decode_unverified` on bytes from a peer or a shard file.
//!
//! Input: the header bytes as they arrive. Properties:
//! - neither decoder panics, and `decode` accepts only what `decode_unverified` accepts;
//! - whatever `decode_unverified` accepts re-encodes to exactly the input bytes, and keeps the
//!   documented bounds (plaintext ≤ segment size, shard length ≤ ⌈(segment size + 16)/k⌉ + 1);
//! - signed afresh (by the fuzz key, with the object id it commits to), every structurally
//!   valid header decodes fully, to the same fields;
//! - `verify_shard` on arbitrary indices and bytes never panics.
//!
//! The first 44 bytes also go through `ShardId::from_index_key` (RocksDB index keys).

use shardfarm_core::shard::{self, SegmentHeader, ShardId};

/// Runs the `segment_header` target on one input: returns when the properties hold, panics otherwise.
pub fn segment_header(data: &[u8]) {
    let full = SegmentHeader::decode(data);
    let Ok(h) = SegmentHeader::decode_unverified(data) else {
        assert!(full.is_err(), "decode accepted what decode_unverified refused");
        index_key(data);
        return;
    };
    if let Ok(f) = &full {
        assert_eq!(f, &h);
    }
    assert_eq!(h.encode(), data, "a decoded header does not re-encode to its bytes");
    assert!(h.plaintext_len() <= h.segment_size);
    let bound = (h.segment_size + 16).div_ceil(u64::from(h.k)) + 1;
    assert!(h.shard_length <= bound, "shard length {} above {bound}", h.shard_length);
    assert_eq!(h.n(), h.shard_roots.len());
    let _ = h.leaf_count();
    let _ = shard::partition(&h.object_id, h.segment_index, u32::from(data[70]));

    for i in [0, h.n() - 1, h.n(), usize::MAX] {
        let _ = h.verify_shard(i, data);
        let _ = h.verify_shard(i, &[]);
    }
    // A shard of the announced length (small ones only: the format allows up to 1 GiB).
    if h.shard_length <= 4096 {
        let s = vec![data[0]; h.shard_length as usize];
        assert!(h.verify_shard(h.n(), &s).is_err());
        let r = h.verify_shard(0, &s);
        assert_eq!(r.is_ok(), shard::merkle_root(&s) == h.shard_roots[0]);
    }

    // Re-signed by a key we hold, with the id that key commits to: must decode.
    let k = crate::fuzz_key();
    let mut g = h.clone();
    g.object_id = shard::object_id_for(&k.verifying_key(), &g.salt);
    g.sign(&k);
    let bytes = g.encode();
    let back = SegmentHeader::decode(&bytes).expect("a re-signed valid header must decode");
    assert_eq!(back, g);
    index_key(data);
}

fn index_key(data: &[u8]) {
    let k = &data[..data.len().min(44)];
    if let Some((p, id)) = ShardId::from_index_key(k) {
        assert_eq!(id.index_key(p), k);
        assert_eq!(ShardId::from_index_key(&id.header_key()), None);
        let _ = id.file_name();
    }
}
