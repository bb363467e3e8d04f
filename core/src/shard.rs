//! The signed segment header that travels with every shard, and the Merkle trees over shards.
//!
//! # Binary encoding of [`SegmentHeader`] (version 2, all integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SFH1` |
//! | 4 | 1 | format version (2) |
//! | 5 | 1 | cipher ([`Cipher`]: 1 = AES-256-GCM, 2 = XChaCha20-Poly1305) |
//! | 6 | 32 | object id |
//! | 38 | 4 | segment index |
//! | 42 | 4 | segment count |
//! | 46 | 8 | object length in bytes |
//! | 54 | 8 | segment size (plaintext bytes of every segment but the last) |
//! | 62 | 2 | k (data shards) |
//! | 64 | 2 | m (parity shards) |
//! | 66 | 8 | shard length in bytes |
//! | 74 | 8 | created (unix seconds) |
//! | 82 | 8 | expires (unix seconds, 0 = never) |
//! | 90 | 32 | uploader public key (ed25519) |
//! | 122 | 32 | salt ([`salt_for`] the object key) |
//! | 154 | 32·n | Merkle root of shard 0 … n−1 (n = k + m) |
//! | 154+32n | 64 | ed25519 signature by the uploader over every byte before it |
//!
//! A reader rejects any other magic or version, so a future format can change everything after
//! the version byte. Version 1 (no salt, random object ids) is refused with a message saying
//! so: its ids did not commit to their uploader.
//!
//! # Self-certifying object ids
//!
//! `object id = blake2b-256("shardfarm object id v2" ‖ uploader public key ‖ salt)`
//! ([`object_id_for`]). [`SegmentHeader::decode`] checks it beside the signature, so a header
//! for an id can only be signed by the key the id commits to: nobody can sign a header for
//! someone else's object, and every holder, repairer, auditor and reader that decodes a header
//! checks this without knowing anything else about the object.
//!
//! # Structural bounds
//!
//! Decoding also refuses a header whose `shard_length` is not exactly what the codec produces
//! for that segment (`⌈(plaintext + 16) / k⌉` rounded up to even), so no length a peer can
//! announce is larger than a real segment's shard: `shard_length ≤ ⌈(segment size + 16)/k⌉+1`.
//!
//! # Merkle trees
//!
//! A shard is cut into 64 KiB leaves (the last may be shorter; an empty shard has one empty
//! leaf). Leaves are hashed with BLAKE3 keyed by [`LEAF_KEY`], inner nodes as
//! `BLAKE3-keyed(NODE_KEY, left ‖ right)`; the distinct keys separate the two domains, so a leaf
//! can never pass for a node. A level with an odd count carries its last node up unchanged.
//! BLAKE3 was chosen by measurement (see ARCHITECTURE.md): it hashes ~4× faster than blake2b
//! here, and it is the content hash, not the identity hash.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::identity::parse_key;
use crate::{Error, Result};

/// Merkle leaf size.
pub const LEAF_SIZE: usize = 64 * 1024;
/// Current header format version.
pub const FORMAT_VERSION: u8 = 2;
const MAGIC: &[u8; 4] = b"SFH1";
const FIXED_LEN: usize = 154;
/// Largest segment the format accepts (the codec's default is 64 MiB): every length a header
/// announces is bounded by it, so a signed but hostile header cannot make anyone reserve more
/// than `⌈(MAX_SEGMENT_SIZE + 16)/k⌉` bytes for one shard.
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;
/// Domain separator of object ids.
const OBJECT_ID_DOMAIN: &[u8] = b"shardfarm object id v2";
/// AEAD tag bytes appended to every segment's ciphertext (both ciphers).
const TAG_LEN: u64 = 16;

/// Domain separator of the salt derived from an object key.
const SALT_DOMAIN: &[u8] = b"shardfarm object salt v2";

/// The salt of an object: derived from its (secret) object key, so whoever holds the read
/// capability can name the object's salt — `rm` needs it for the tombstone, even when every
/// header is lost — while the salt reveals nothing about the key.
pub fn salt_for(object_key: &[u8; 32]) -> [u8; 32] {
    crate::identity::blake2b256(&[SALT_DOMAIN, object_key])
}

/// The object id an uploader's key and a salt commit to.
pub fn object_id_for(uploader: &VerifyingKey, salt: &[u8; 32]) -> [u8; 32] {
    crate::identity::blake2b256(&[OBJECT_ID_DOMAIN, uploader.as_bytes(), salt])
}

/// The shard length the codec produces for a segment of `plaintext_len` bytes coded with `k`
/// data shards: the ciphertext and its tag split into k equal, even-length pieces.
pub const fn coded_shard_length(plaintext_len: u64, k: u16) -> u64 {
    let k = if k == 0 { 1 } else { k as u64 };
    let s = plaintext_len.saturating_add(TAG_LEN).div_ceil(k);
    s.saturating_add(s & 1)
}
/// BLAKE3 key for leaves.
pub const LEAF_KEY: [u8; 32] = *b"shardfarm merkle leaf key v1 ...";
/// BLAKE3 key for inner nodes.
pub const NODE_KEY: [u8; 32] = *b"shardfarm merkle node key v1 ...";
/// Largest n = k + m the format accepts (reed-solomon-simd supports up to 65535 in total; we
/// keep headers small).
pub const MAX_SHARDS: usize = 256;

/// The AEAD that encrypted the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    /// AES-256-GCM with a 96-bit nonce.
    Aes256Gcm = 1,
    /// XChaCha20-Poly1305 with a 192-bit nonce.
    XChaCha20Poly1305 = 2,
}

impl Cipher {
    /// Parses the header byte.
    pub fn from_u8(b: u8) -> Result<Self> {
        match b {
            1 => Ok(Cipher::Aes256Gcm),
            2 => Ok(Cipher::XChaCha20Poly1305),
            _ => Err(Error::Malformed(format!("unknown cipher id {b}"))),
        }
    }

    /// The faster cipher on this CPU: AES-256-GCM where the CPU has AES instructions (2.2 vs
    /// 1.4 GB/s measured), XChaCha20-Poly1305 where it has not (AES in software is slow and
    /// risks timing leaks on such CPUs).
    pub fn preferred() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("aes")
                && std::arch::is_x86_feature_detected!("pclmulqdq")
            {
                return Cipher::Aes256Gcm;
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("aes") {
                return Cipher::Aes256Gcm;
            }
        }
        Cipher::XChaCha20Poly1305
    }
}

/// The signed description of one segment, carried by each of its shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version (1).
    pub version: u8,
    /// AEAD used for the segment.
    pub cipher: Cipher,
    /// Object id: [`object_id_for`]`(uploader, salt)`.
    pub object_id: [u8; 32],
    /// Index of this segment in the object.
    pub segment_index: u32,
    /// Number of segments in the object.
    pub segment_count: u32,
    /// Object length in bytes.
    pub object_length: u64,
    /// Plaintext bytes per segment (the last segment may be shorter).
    pub segment_size: u64,
    /// Data shards.
    pub k: u16,
    /// Parity shards.
    pub m: u16,
    /// Bytes per shard.
    pub shard_length: u64,
    /// Creation time, unix seconds.
    pub created: u64,
    /// Expiry time, unix seconds; 0 = never.
    pub expires: u64,
    /// The uploader's key.
    pub uploader: VerifyingKey,
    /// Per object ([`salt_for`] its key); with the uploader's key it determines the object id.
    pub salt: [u8; 32],
    /// Merkle root of each of the n shards.
    pub shard_roots: Vec<[u8; 32]>,
    /// Uploader's signature over the encoding before it.
    pub signature: Signature,
}

impl SegmentHeader {
    /// n = k + m.
    pub fn n(&self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }

    /// Plaintext length of this segment.
    pub fn plaintext_len(&self) -> u64 {
        let start = u64::from(self.segment_index) * self.segment_size;
        self.object_length.saturating_sub(start).min(self.segment_size)
    }

    /// Number of Merkle leaves of each shard.
    pub fn leaf_count(&self) -> usize {
        leaf_count(self.shard_length as usize)
    }

    fn unsigned_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_LEN + 32 * self.shard_roots.len() + 64);
        b.extend_from_slice(MAGIC);
        b.push(self.version);
        b.push(self.cipher as u8);
        b.extend_from_slice(&self.object_id);
        b.extend_from_slice(&self.segment_index.to_le_bytes());
        b.extend_from_slice(&self.segment_count.to_le_bytes());
        b.extend_from_slice(&self.object_length.to_le_bytes());
        b.extend_from_slice(&self.segment_size.to_le_bytes());
        b.extend_from_slice(&self.k.to_le_bytes());
        b.extend_from_slice(&self.m.to_le_bytes());
        b.extend_from_slice(&self.shard_length.to_le_bytes());
        b.extend_from_slice(&self.created.to_le_bytes());
        b.extend_from_slice(&self.expires.to_le_bytes());
        b.extend_from_slice(self.uploader.as_bytes());
        b.extend_from_slice(&self.salt);
        for r in &self.shard_roots {
            b.extend_from_slice(r);
        }
        b
    }

    /// Signs the header with the uploader's key (which must match `uploader`).
    pub fn sign(&mut self, key: &SigningKey) {
        self.uploader = key.verifying_key();
        self.signature = key.sign(&self.unsigned_bytes());
    }

    /// The documented binary encoding, signature included.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.unsigned_bytes();
        b.extend_from_slice(&self.signature.to_bytes());
        b
    }

    /// Parses and checks the structure, the uploader's signature and that the object id
    /// derives from the uploader's key.
    pub fn decode(b: &[u8]) -> Result<Self> {
        let h = Self::decode_unverified(b)?;
        h.verify_object_id()?;
        h.verify_signature()?;
        Ok(h)
    }

    /// Checks that the object id is the one the uploader's key and the salt commit to.
    pub fn verify_object_id(&self) -> Result<()> {
        if object_id_for(&self.uploader, &self.salt) != self.object_id {
            return Err(Error::ForgedObjectId);
        }
        Ok(())
    }

    /// Checks the uploader's signature.
    pub fn verify_signature(&self) -> Result<()> {
        self.uploader
            .verify_strict(&self.unsigned_bytes(), &self.signature)
            .map_err(|_| Error::HeaderSignature)
    }

    /// Parses the structure without checking the signature.
    pub fn decode_unverified(b: &[u8]) -> Result<Self> {
        let bad = |what: String| Error::Malformed(format!("segment header: {what}"));
        if b.len() < FIXED_LEN + 64 {
            return Err(bad(format!("{} bytes is too short", b.len())));
        }
        if &b[0..4] != MAGIC {
            return Err(bad("bad magic (not a shardfarm segment header)".into()));
        }
        if b[4] == 1 {
            return Err(bad("format version 1 is no longer accepted: its object ids do not \
                 commit to their uploader; store the object again with this release"
                .into()));
        }
        if b[4] != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not supported (this build reads {FORMAT_VERSION})",
                b[4]
            )));
        }
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let (k, m) = (u16_at(62), u16_at(64));
        let n = usize::from(k) + usize::from(m);
        if k == 0 || m == 0 || n > MAX_SHARDS {
            return Err(bad(format!("erasure profile k={k} m={m} is not supported")));
        }
        if b.len() != FIXED_LEN + 32 * n + 64 {
            return Err(bad(format!(
                "{} bytes, expected {} for n={n}",
                b.len(),
                FIXED_LEN + 32 * n + 64
            )));
        }
        let h = SegmentHeader {
            version: b[4],
            cipher: Cipher::from_u8(b[5])?,
            object_id: b[6..38].try_into().unwrap(),
            segment_index: u32_at(38),
            segment_count: u32_at(42),
            object_length: u64_at(46),
            segment_size: u64_at(54),
            k,
            m,
            shard_length: u64_at(66),
            created: u64_at(74),
            expires: u64_at(82),
            uploader: parse_key(&b[90..122])?,
            salt: b[122..154].try_into().unwrap(),
            shard_roots: (0..n)
                .map(|i| b[FIXED_LEN + 32 * i..FIXED_LEN + 32 * (i + 1)].try_into().unwrap())
                .collect(),
            signature: Signature::from_bytes(b[FIXED_LEN + 32 * n..].try_into().unwrap()),
        };
        if h.segment_size > MAX_SEGMENT_SIZE {
            return Err(bad(format!(
                "segment size {} exceeds the format's {MAX_SEGMENT_SIZE}",
                h.segment_size
            )));
        }
        if h.segment_size == 0 || h.segment_index >= h.segment_count.max(1) {
            return Err(bad(format!(
                "segment {} of {} with segment size {} is inconsistent",
                h.segment_index, h.segment_count, h.segment_size
            )));
        }
        if u64::from(h.segment_count) != h.object_length.div_ceil(h.segment_size).max(1) {
            return Err(bad(format!(
                "{} segments cannot hold {} bytes in segments of {}",
                h.segment_count, h.object_length, h.segment_size
            )));
        }
        let want = coded_shard_length(h.plaintext_len(), h.k);
        if h.shard_length != want {
            return Err(bad(format!(
                "shard length {} is not what {} bytes coded with k={} give ({want})",
                h.shard_length,
                h.plaintext_len(),
                h.k
            )));
        }
        Ok(h)
    }

    /// Checks `shard` against the signed root of slot `index`: length and Merkle root.
    pub fn verify_shard(&self, index: usize, shard: &[u8]) -> Result<()> {
        if index >= self.n() {
            return Err(Error::Malformed(format!("shard index {index} ≥ n = {}", self.n())));
        }
        if shard.len() as u64 != self.shard_length {
            return Err(Error::ShardCorrupt {
                index,
                reason: format!("length {} ≠ {} in the header", shard.len(), self.shard_length),
            });
        }
        if merkle_root(shard) != self.shard_roots[index] {
            return Err(Error::ShardCorrupt {
                index,
                reason: "content does not match the signed Merkle root".into(),
            });
        }
        Ok(())
    }
}

/// The partition of a segment: `blake2b-256(object id ‖ segment index) mod partitions`.
pub fn partition(object_id: &[u8; 32], segment_index: u32, partitions: u32) -> u32 {
    let h = crate::identity::blake2b256(&[object_id, &segment_index.to_le_bytes()]);
    (u64::from_le_bytes(h[..8].try_into().unwrap()) % u64::from(partitions.max(1))) as u32
}

// ---- Merkle trees ----

/// Number of 64 KiB leaves of a shard of `len` bytes (at least one).
pub fn leaf_count(len: usize) -> usize {
    len.div_ceil(LEAF_SIZE).max(1)
}

/// The hash of one leaf.
pub fn leaf_hash(leaf: &[u8]) -> [u8; 32] {
    *blake3::keyed_hash(&LEAF_KEY, leaf).as_bytes()
}

fn node_hash(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(&NODE_KEY);
    h.update(l);
    h.update(r);
    *h.finalize().as_bytes()
}

/// All levels of the tree over `data`, leaves first, root last.
pub fn merkle_levels(data: &[u8]) -> Vec<Vec<[u8; 32]>> {
    let leaves: Vec<[u8; 32]> = if data.is_empty() {
        vec![leaf_hash(&[])]
    } else {
        data.chunks(LEAF_SIZE).map(leaf_hash).collect()
    };
    let mut levels = vec![leaves];
    while levels.last().unwrap().len() > 1 {
        let prev = levels.last().unwrap();
        let next = prev
            .chunks(2)
            .map(|p| if p.len() == 2 { node_hash(&p[0], &p[1]) } else { p[0] })
            .collect();
        levels.push(next);
    }
    levels
}

/// Builds a Merkle root from bytes that arrive in pieces (an upload stream), with one leaf of
/// buffering state: the same root as [`merkle_root`] over the concatenation.
pub struct MerkleBuilder {
    leaf: blake3::Hasher,
    fill: usize,
    leaves: Vec<[u8; 32]>,
    len: u64,
}

impl Default for MerkleBuilder {
    fn default() -> Self {
        MerkleBuilder {
            leaf: blake3::Hasher::new_keyed(&LEAF_KEY),
            fill: 0,
            leaves: Vec::new(),
            len: 0,
        }
    }
}

impl MerkleBuilder {
    /// Adds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        while !data.is_empty() {
            let take = (LEAF_SIZE - self.fill).min(data.len());
            self.leaf.update(&data[..take]);
            self.fill += take;
            data = &data[take..];
            if self.fill == LEAF_SIZE {
                self.leaves.push(*self.leaf.finalize().as_bytes());
                self.leaf = blake3::Hasher::new_keyed(&LEAF_KEY);
                self.fill = 0;
            }
        }
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when no byte was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The root over everything added.
    pub fn finalize(mut self) -> [u8; 32] {
        if self.fill > 0 || self.leaves.is_empty() {
            self.leaves.push(*self.leaf.finalize().as_bytes());
        }
        let mut level = self.leaves;
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|p| if p.len() == 2 { node_hash(&p[0], &p[1]) } else { p[0] })
                .collect();
        }
        level[0]
    }
}

/// The Merkle root of `data`.
pub fn merkle_root(data: &[u8]) -> [u8; 32] {
    merkle_levels(data).pop().unwrap()[0]
}

/// The sibling hashes that prove leaf `index`, bottom up (levels where the node is carried up
/// have no sibling and add nothing).
pub fn merkle_proof(levels: &[Vec<[u8; 32]>], index: usize) -> Vec<[u8; 32]> {
    let mut proof = Vec::new();
    let mut i = index;
    for level in &levels[..levels.len() - 1] {
        let sib = i ^ 1;
        if sib < level.len() {
            proof.push(level[sib]);
        }
        i /= 2;
    }
    proof
}

/// Checks that `leaf` is leaf `index` of a tree with `leaf_count` leaves and root `root`.
pub fn verify_merkle_proof(
    root: &[u8; 32],
    leaf_count: usize,
    index: usize,
    leaf: &[u8],
    proof: &[[u8; 32]],
) -> bool {
    if index >= leaf_count {
        return false;
    }
    let mut h = leaf_hash(leaf);
    let (mut i, mut width, mut p) = (index, leaf_count, proof.iter());
    while width > 1 {
        let sib = i ^ 1;
        if sib < width {
            let Some(s) = p.next() else { return false };
            h = if i % 2 == 0 { node_hash(&h, s) } else { node_hash(s, &h) };
        }
        i /= 2;
        width = width.div_ceil(2);
    }
    p.next().is_none() && &h == root
}

// ---- Shard ids ----

/// Where a shard lives: object, segment, slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId {
    /// Object id.
    pub object_id: [u8; 32],
    /// Segment index.
    pub segment: u32,
    /// Shard index (slot) within the segment.
    pub shard: u32,
}

impl ShardId {
    /// The header key: object ‖ segment, big-endian.
    pub fn header_key(&self) -> [u8; 36] {
        let mut k = [0u8; 36];
        k[..32].copy_from_slice(&self.object_id);
        k[32..].copy_from_slice(&self.segment.to_be_bytes());
        k
    }

    /// The index key: partition ‖ object ‖ segment ‖ shard, all big-endian.
    pub fn index_key(&self, partition: u32) -> [u8; 44] {
        let mut k = [0u8; 44];
        k[..4].copy_from_slice(&partition.to_be_bytes());
        k[4..36].copy_from_slice(&self.object_id);
        k[36..40].copy_from_slice(&self.segment.to_be_bytes());
        k[40..].copy_from_slice(&self.shard.to_be_bytes());
        k
    }

    /// Parses an index key back into its partition and shard id.
    pub fn from_index_key(k: &[u8]) -> Option<(u32, ShardId)> {
        if k.len() != 44 {
            return None;
        }
        Some((
            u32::from_be_bytes(k[..4].try_into().ok()?),
            ShardId {
                object_id: k[4..36].try_into().ok()?,
                segment: u32::from_be_bytes(k[36..40].try_into().ok()?),
                shard: u32::from_be_bytes(k[40..].try_into().ok()?),
            },
        ))
    }

    /// File name of the payload.
    pub fn file_name(&self) -> String {
        format!("{}-{}-{}", hex::encode(self.object_id), self.segment, self.shard)
    }
}

// ---- Partition summaries ----

/// What a node holds in one partition, summarised so that two holders can tell in one
/// comparison whether they hold the same segments (repair's anti-entropy).
///
/// The digest covers the *segments* (object id, segment index), not the shard indexes: every
/// holder of a partition stores a different slot of the same segments, so holders in sync have
/// equal digests. Which slots a holder stores is in `shards`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionSummary {
    /// blake2b-256 over the sorted distinct (object id ‖ segment, big-endian) held, prefixed
    /// by a domain string.
    pub digest: [u8; 32],
    /// How many distinct segments.
    pub segments: u64,
    /// How many shards (a node holding two slots of a partition holds two per segment).
    pub shards: u64,
    /// Bit `i % 8` of byte `i / 8` set when a shard with index `i` is held (n ≤ 256).
    pub indexes: [u8; 32],
}

impl PartitionSummary {
    /// Whether a shard with index `i` is held.
    pub fn holds_index(&self, i: usize) -> bool {
        i < 256 && self.indexes[i / 8] & (1 << (i % 8)) != 0
    }

    /// The shard indexes held, ascending.
    pub fn held_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        (0..256).filter(|i| self.holds_index(*i))
    }

    /// Whether this holder stores exactly `slots` of every segment it lists: its shard
    /// indexes are `slots` and it holds `slots.len()` shards per segment.
    /// A holder of nothing (no segment in the partition) holds exactly its slots too.
    pub fn holds_exactly(&self, slots: &[usize]) -> bool {
        if self.segments == 0 {
            return self.shards == 0 && self.indexes == [0; 32];
        }
        let mut want: Vec<usize> = slots.to_vec();
        want.sort_unstable();
        want.dedup();
        self.held_indexes().eq(want.iter().copied())
            && self.segments.checked_mul(want.len() as u64) == Some(self.shards)
    }
}

const SUMMARY_DOMAIN: &[u8] = b"shardfarm partition summary v1";

/// Builds a [`PartitionSummary`] from shard ids given in index order (object, segment,
/// shard ascending), as a partition's index scan yields them.
pub struct SummaryBuilder {
    hash: crate::identity::Blake2b256,
    last: Option<([u8; 32], u32)>,
    segments: u64,
    shards: u64,
    indexes: [u8; 32],
}

impl Default for SummaryBuilder {
    fn default() -> Self {
        use blake2::Digest;
        let mut hash = crate::identity::Blake2b256::new();
        hash.update(SUMMARY_DOMAIN);
        SummaryBuilder { hash, last: None, segments: 0, shards: 0, indexes: [0; 32] }
    }
}

impl SummaryBuilder {
    /// Adds one shard. Ids must come in ascending order; a repeated segment counts once.
    pub fn add(&mut self, id: &ShardId) {
        use blake2::Digest;
        if self.last != Some((id.object_id, id.segment)) {
            self.hash.update(id.object_id);
            self.hash.update(id.segment.to_be_bytes());
            self.segments += 1;
            self.last = Some((id.object_id, id.segment));
        }
        self.shards += 1;
        if let Some(b) = self.indexes.get_mut(id.shard as usize / 8) {
            *b |= 1 << (id.shard % 8);
        }
    }

    /// The summary of everything added.
    pub fn finish(self) -> PartitionSummary {
        use blake2::Digest;
        PartitionSummary {
            digest: self.hash.finalize().into(),
            segments: self.segments,
            shards: self.shards,
            indexes: self.indexes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::random_signing_key;

    pub(crate) fn sample_header() -> (SegmentHeader, SigningKey) {
        let key = random_signing_key();
        let salt = [7; 32];
        let mut h = SegmentHeader {
            version: FORMAT_VERSION,
            cipher: Cipher::Aes256Gcm,
            object_id: object_id_for(&key.verifying_key(), &salt),
            segment_index: 1,
            segment_count: 3,
            object_length: 2 * 1024 + 5,
            segment_size: 1024,
            k: 4,
            m: 2,
            shard_length: 260,
            created: 1_700_000_000,
            expires: 0,
            uploader: key.verifying_key(),
            salt,
            shard_roots: (0..6u8).map(|i| [i; 32]).collect(),
            signature: Signature::from_bytes(&[0; 64]),
        };
        h.sign(&key);
        (h, key)
    }

    #[test]
    fn header_round_trips() {
        let (h, _) = sample_header();
        let bytes = h.encode();
        assert_eq!(bytes.len(), FIXED_LEN + 32 * 6 + 64);
        assert_eq!(SegmentHeader::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn every_flipped_bit_in_the_header_is_detected() {
        let (h, _) = sample_header();
        let bytes = h.encode();
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[byte] ^= 1 << bit;
                assert!(SegmentHeader::decode(&b).is_err(), "flip at byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn wrong_version_is_named() {
        let (h, _) = sample_header();
        let mut b = h.encode();
        b[4] = 9;
        let err = SegmentHeader::decode(&b).unwrap_err().to_string();
        assert!(err.contains("format version 9"), "{err}");
    }

    #[test]
    fn a_header_for_someone_elses_object_id_is_refused_even_when_validly_signed() {
        // The attacker copies a victim's header, keeps its object id and segment, and signs it
        // with its own key: the signature verifies, the id does not derive from the signer.
        let (victim, _) = sample_header();
        let attacker = random_signing_key();
        let mut forged = victim.clone();
        forged.sign(&attacker);
        assert!(forged.verify_signature().is_ok());
        let err = SegmentHeader::decode(&forged.encode()).unwrap_err();
        assert!(matches!(err, Error::ForgedObjectId), "{err}");
        // Another salt does not help either: the id is a hash of key and salt.
        forged.salt = [9; 32];
        forged.sign(&attacker);
        assert!(matches!(SegmentHeader::decode(&forged.encode()), Err(Error::ForgedObjectId)));
        // The attacker's own id for that salt is fine.
        forged.object_id = object_id_for(&attacker.verifying_key(), &forged.salt);
        forged.sign(&attacker);
        assert!(SegmentHeader::decode(&forged.encode()).is_ok());
    }

    #[test]
    fn version_1_headers_are_refused_with_a_reason() {
        let (h, _) = sample_header();
        let mut b = h.encode();
        b[4] = 1;
        let err = SegmentHeader::decode(&b).unwrap_err().to_string();
        assert!(err.contains("version 1 is no longer accepted"), "{err}");
    }

    #[test]
    fn a_shard_length_the_codec_cannot_produce_is_refused() {
        let (h, key) = sample_header();
        for len in [0, 259, 261, 262, 1 << 20, u64::MAX] {
            let mut bad = h.clone();
            bad.shard_length = len;
            bad.sign(&key);
            let err = SegmentHeader::decode(&bad.encode()).unwrap_err().to_string();
            assert!(err.contains("shard length"), "{len}: {err}");
        }
    }

    #[test]
    fn coded_shard_length_is_bounded_by_the_segment_size() {
        for k in [1u16, 2, 3, 4, 10, 255] {
            for seg in [1u64, 2, 17, 1024, 64 << 20] {
                for plen in [0, 1, seg / 2, seg] {
                    let s = coded_shard_length(plen, k);
                    assert_eq!(s % 2, 0);
                    assert!(s * u64::from(k) >= plen + TAG_LEN);
                    assert!(s <= (seg + TAG_LEN).div_ceil(u64::from(k)) + 1);
                }
            }
        }
    }

    #[test]
    fn streaming_builder_matches_merkle_root() {
        for len in [0, 1, LEAF_SIZE - 1, LEAF_SIZE, 3 * LEAF_SIZE + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            for piece in [1000, LEAF_SIZE, 3 * LEAF_SIZE] {
                let mut b = MerkleBuilder::default();
                for c in data.chunks(piece) {
                    b.update(c);
                }
                assert_eq!(b.finalize(), merkle_root(&data), "len {len} piece {piece}");
            }
        }
    }

    #[test]
    fn merkle_proofs_verify_for_every_leaf_and_fail_when_tampered() {
        for len in [0, 1, LEAF_SIZE, LEAF_SIZE + 1, 5 * LEAF_SIZE + 3, 8 * LEAF_SIZE] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let levels = merkle_levels(&data);
            let root = levels.last().unwrap()[0];
            assert_eq!(root, merkle_root(&data));
            let n = leaf_count(len);
            for i in 0..n {
                let leaf = if data.is_empty() {
                    &data[..]
                } else {
                    &data[i * LEAF_SIZE..((i + 1) * LEAF_SIZE).min(len)]
                };
                let proof = merkle_proof(&levels, i);
                assert!(verify_merkle_proof(&root, n, i, leaf, &proof), "len {len} leaf {i}");
                let mut bad = leaf.to_vec();
                bad.push(1);
                assert!(!verify_merkle_proof(&root, n, i, &bad, &proof));
                if n > 1 {
                    assert!(!verify_merkle_proof(&root, n, (i + 1) % n, leaf, &proof));
                }
            }
        }
    }

    #[test]
    fn holders_of_the_same_segments_agree_whatever_slots_they_hold() {
        let id = |o: u8, seg: u32, shard: u32| ShardId { object_id: [o; 32], segment: seg, shard };
        let summary = |ids: &[ShardId]| {
            let mut b = SummaryBuilder::default();
            ids.iter().for_each(|i| b.add(i));
            b.finish()
        };
        let a = summary(&[id(1, 0, 0), id(1, 1, 0), id(2, 0, 0)]);
        let b = summary(&[id(1, 0, 3), id(1, 1, 3), id(2, 0, 3)]);
        assert_eq!((a.digest, a.segments), (b.digest, b.segments));
        assert_eq!(a.held_indexes().collect::<Vec<_>>(), vec![0]);
        assert_eq!(b.held_indexes().collect::<Vec<_>>(), vec![3]);
        assert!(a.holds_exactly(&[0]) && b.holds_exactly(&[3]) && !a.holds_exactly(&[0, 3]));
        // Two slots of one segment count it once.
        let two = summary(&[
            id(1, 0, 0),
            id(1, 0, 3),
            id(1, 1, 0),
            id(1, 1, 3),
            id(2, 0, 0),
            id(2, 0, 3),
        ]);
        assert_eq!((two.digest, two.segments), (a.digest, 3));
        assert_eq!(two.held_indexes().collect::<Vec<_>>(), vec![0, 3]);
        assert!(two.holds_exactly(&[3, 0]));
        // Both slots listed, but one segment has only one of them.
        let gap = summary(&[id(1, 0, 0), id(1, 0, 3), id(1, 1, 0), id(2, 0, 0), id(2, 0, 3)]);
        assert!(!gap.holds_exactly(&[0, 3]));
        // One segment missing, or another in its place, changes the digest.
        let short = summary(&[id(1, 0, 0), id(2, 0, 0)]);
        let other = summary(&[id(1, 0, 0), id(1, 2, 0), id(2, 0, 0)]);
        assert_ne!(short.digest, a.digest);
        assert_ne!(other.digest, a.digest);
        assert_ne!(summary(&[]).digest, short.digest);
        assert!(!a.holds_index(300));
        // An empty partition: every holder agrees, whatever its slots.
        let empty = summary(&[]);
        assert!(empty.holds_exactly(&[2]) && empty.holds_exactly(&[0, 5]));
        assert_eq!(empty.digest, summary(&[]).digest);
    }
}
