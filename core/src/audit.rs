//! Storage audits: the auditor sends a fresh nonce; the leaves to prove follow from it, so the
//! node cannot choose them, and each comes with its Merkle path to the root signed in the
//! segment header. A node that dropped or damaged its shard cannot answer.

use crate::identity::blake2b256;
use crate::shard::{SegmentHeader, verify_merkle_proof};

/// Most leaves one audit may ask for.
pub const MAX_AUDIT_LEAVES: u32 = 16;

/// The leaf indices an audit with `nonce` asks of a shard with `leaf_count` leaves.
pub fn challenge_leaves(nonce: &[u8], leaf_count: usize, count: u32) -> Vec<usize> {
    (0..count.min(MAX_AUDIT_LEAVES))
        .map(|i| {
            let h = blake2b256(&[b"shardfarm-audit-v1", nonce, &i.to_le_bytes()]);
            (u64::from_le_bytes(h[..8].try_into().unwrap()) % leaf_count.max(1) as u64) as usize
        })
        .collect()
}

/// One proven leaf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProvenLeaf {
    /// Leaf index.
    pub index: usize,
    /// Leaf bytes.
    pub data: Vec<u8>,
    /// Sibling hashes, bottom up.
    pub proof: Vec<[u8; 32]>,
}

/// Why an audit answer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditFailure {
    /// Wrong number of leaves or wrong indices.
    #[error("answer proves leaves {got:?}, the challenge asked for {want:?}")]
    WrongLeaves {
        /// Asked.
        want: Vec<usize>,
        /// Answered.
        got: Vec<usize>,
    },
    /// A leaf does not hash up to the signed root.
    #[error("leaf {0} does not verify against the signed Merkle root")]
    BadProof(usize),
}

/// Checks an audit answer for shard `shard_index` of the segment `header` (whose signature the
/// auditor has verified).
pub fn verify_answer(
    header: &SegmentHeader,
    shard_index: usize,
    nonce: &[u8],
    count: u32,
    leaves: &[ProvenLeaf],
) -> Result<(), AuditFailure> {
    let want = challenge_leaves(nonce, header.leaf_count(), count);
    let got: Vec<usize> = leaves.iter().map(|l| l.index).collect();
    if want != got || shard_index >= header.n() {
        return Err(AuditFailure::WrongLeaves { want, got });
    }
    let root = &header.shard_roots[shard_index];
    for l in leaves {
        if !verify_merkle_proof(root, header.leaf_count(), l.index, &l.data, &l.proof) {
            return Err(AuditFailure::BadProof(l.index));
        }
    }
    Ok(())
}

/// Answers an audit from the shard's bytes (the caller has checked them against the root).
pub fn answer(shard: &[u8], nonce: &[u8], count: u32) -> Vec<ProvenLeaf> {
    let levels = crate::shard::merkle_levels(shard);
    challenge_leaves(nonce, levels[0].len(), count)
        .into_iter()
        .map(|index| {
            let start = (index * crate::shard::LEAF_SIZE).min(shard.len());
            let end = (start + crate::shard::LEAF_SIZE).min(shard.len());
            ProvenLeaf {
                index,
                data: shard[start..end].to_vec(),
                proof: crate::shard::merkle_proof(&levels, index),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{CodecParams, Encoder};
    use crate::identity::random_signing_key;
    use crate::shard::Cipher;

    #[test]
    fn honest_answer_verifies_and_a_lost_shard_cannot_answer() {
        let p = CodecParams { k: 2, m: 1, segment_size: 1 << 20, cipher: Cipher::Aes256Gcm };
        let data = vec![5u8; 700_000];
        let mut enc = Encoder::new(p, data.len() as u64, random_signing_key(), 0, 0).unwrap();
        let seg = enc.encode_segment(0, &data).unwrap();
        let (header, shard) = (seg.header.clone(), seg.shards[1].to_vec());
        let nonce = b"fresh nonce 0001";
        let ans = answer(&shard, nonce, 4);
        assert_eq!(ans.len(), 4);
        verify_answer(&header, 1, nonce, 4, &ans).unwrap();
        // The same answer does not satisfy another nonce (no replaying old answers).
        assert!(verify_answer(&header, 1, b"other nonce 0002", 4, &ans).is_err());
        // A node that lost the shard and answers with other bytes fails.
        let fake = answer(&vec![0u8; shard.len()], nonce, 4);
        assert!(matches!(
            verify_answer(&header, 1, nonce, 4, &fake),
            Err(AuditFailure::BadProof(_))
        ));
        // Answering with another shard of the same segment fails too.
        let other = answer(seg.shards[0], nonce, 4);
        assert!(verify_answer(&header, 1, nonce, 4, &other).is_err());
    }
}
