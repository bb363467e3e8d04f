//! The codec: object → segments → AEAD → Reed-Solomon k+m → shards + signed header, and back.
//!
//! Memory is bounded by one segment at a time (the plaintext, its k data shards — which share
//! one buffer with the ciphertext — and m parity shards), whatever the object size:
//! [`Encoder::encode_reader`] reads the input one segment at a time and hands each encoded
//! segment to a sink before reading the next.
//!
//! Per segment:
//! 1. the plaintext is encrypted with the object key (random per object, so deriving the nonce
//!    from the segment index never repeats a (key, nonce) pair); the associated data binds the
//!    object id, segment index, segment count and object length, so segments cannot be swapped,
//!    dropped or re-ordered without the tag failing;
//! 2. the ciphertext and its 16-byte tag are split into k data shards of equal length `S`
//!    (zero padded; `S` is even because reed-solomon-simd wants it so) and m parity shards are
//!    computed;
//! 3. each of the n shards gets a Merkle root; the header holding all n roots is signed by the
//!    uploader.
//!
//! Decoding takes any k shards that verify against the header, rebuilds missing data shards,
//! decrypts and checks the tag.

use std::io::Read;

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{AeadInOut, KeyInit};
use ed25519_dalek::{Signature, SigningKey};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

use crate::shard::{Cipher, FORMAT_VERSION, MAX_SHARDS, SegmentHeader, merkle_root};
use crate::{Error, Result};

/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 * 1024 * 1024;
/// AEAD tag length (both ciphers).
pub const TAG_LEN: usize = 16;

/// How an object is coded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodecParams {
    /// Data shards per segment.
    pub k: u16,
    /// Parity shards per segment.
    pub m: u16,
    /// Plaintext bytes per segment.
    pub segment_size: u64,
    /// The AEAD.
    pub cipher: Cipher,
}

impl CodecParams {
    /// RS(k, m) with the default segment size and this CPU's faster cipher.
    pub fn new(k: u16, m: u16) -> Result<Self> {
        let p =
            CodecParams { k, m, segment_size: DEFAULT_SEGMENT_SIZE, cipher: Cipher::preferred() };
        p.validate()?;
        Ok(p)
    }

    /// Checks the profile is one the format and the coder support.
    pub fn validate(&self) -> Result<()> {
        let n = usize::from(self.k) + usize::from(self.m);
        if self.k == 0 || self.m == 0 || n > MAX_SHARDS {
            return Err(Error::Malformed(format!(
                "erasure profile RS({}, {}) is not supported: need k ≥ 1, m ≥ 1, k + m ≤ {MAX_SHARDS}",
                self.k, self.m
            )));
        }
        if self.segment_size == 0 || self.segment_size > (1 << 32) {
            return Err(Error::Malformed(format!(
                "segment size {} must be between 1 byte and 4 GiB",
                self.segment_size
            )));
        }
        Ok(())
    }

    /// Number of segments of an object of `len` bytes (an empty object has one empty segment).
    pub fn segment_count(&self, len: u64) -> u64 {
        len.div_ceil(self.segment_size).max(1)
    }

    /// Shard length for a segment of `plaintext_len` bytes.
    pub fn shard_length(&self, plaintext_len: usize) -> usize {
        crate::shard::coded_shard_length(plaintext_len as u64, self.k) as usize
    }
}

// ---- Erasure coders ----

/// A Reed-Solomon implementation behind one interface, so the benchmark can compare crates on
/// the same shards and the codec can use whichever measures faster.
pub trait ErasureCoder: Send {
    /// Computes the m parity shards of `data` (k shards of equal, even length) into
    /// `parity` (m buffers of the same length).
    fn encode(&mut self, k: usize, m: usize, data: &[&[u8]], parity: &mut [Vec<u8>]) -> Result<()>;

    /// Given at least k of the n shards as `(index, bytes)`, writes every missing data shard
    /// (index < k) into `out` as `(index, bytes)`, reusing the buffers `out` already holds.
    fn reconstruct_data(
        &mut self,
        k: usize,
        m: usize,
        shard_len: usize,
        present: &[(usize, &[u8])],
        out: &mut Vec<(usize, Vec<u8>)>,
    ) -> Result<()>;
}

/// `reed-solomon-simd`: O(n log n) Leopard-style codes, SIMD kernels chosen at run time
/// (AVX2, SSSE3, NEON, or portable), so one binary is correct on every CPU and fast where it
/// can be. See ARCHITECTURE.md for the measurements that chose it.
#[derive(Default)]
pub struct SimdCoder {
    enc: Option<(usize, usize, usize, reed_solomon_simd::ReedSolomonEncoder)>,
    dec: Option<(usize, usize, usize, reed_solomon_simd::ReedSolomonDecoder)>,
}

fn rs_err(e: reed_solomon_simd::Error) -> Error {
    Error::Malformed(format!("reed-solomon: {e}"))
}

/// Bytes of each shard that one erasure call works on. Working stripe by stripe keeps the
/// coder's inputs and outputs in the CPU cache: on this machine RS(4,2) encodes at ~20 GB/s
/// with 1 MiB shards but ~2 GB/s with 16 MiB shards (see the core benchmark). reed-solomon-simd
/// works on independent 64-byte blocks, so striping at a multiple of 64 gives the same bytes
/// as one call over the whole shard (a test checks it); the stripe is therefore not part of
/// the data format. Each call also has a fixed cost (~0.2 ms to decode), which is why stripes
/// are not smaller.
pub const STRIPE: usize = 1024 * 1024;

impl SimdCoder {
    fn encoder(
        &mut self,
        k: usize,
        m: usize,
        len: usize,
    ) -> Result<&mut reed_solomon_simd::ReedSolomonEncoder> {
        match &mut self.enc {
            Some((ek, em, el, e)) if (*ek, *em) == (k, m) => {
                if *el != len {
                    e.reset(k, m, len).map_err(rs_err)?;
                    *el = len;
                }
            }
            slot => {
                let e = reed_solomon_simd::ReedSolomonEncoder::new(k, m, len).map_err(rs_err)?;
                *slot = Some((k, m, len, e));
            }
        }
        Ok(&mut self.enc.as_mut().expect("set above").3)
    }

    fn decoder(
        &mut self,
        k: usize,
        m: usize,
        len: usize,
    ) -> Result<&mut reed_solomon_simd::ReedSolomonDecoder> {
        match &mut self.dec {
            Some((dk, dm, dl, d)) if (*dk, *dm) == (k, m) => {
                if *dl != len {
                    d.reset(k, m, len).map_err(rs_err)?;
                    *dl = len;
                }
            }
            slot => {
                let d = reed_solomon_simd::ReedSolomonDecoder::new(k, m, len).map_err(rs_err)?;
                *slot = Some((k, m, len, d));
            }
        }
        Ok(&mut self.dec.as_mut().expect("set above").3)
    }
}

impl ErasureCoder for SimdCoder {
    fn encode(&mut self, k: usize, m: usize, data: &[&[u8]], parity: &mut [Vec<u8>]) -> Result<()> {
        let len = data.first().map_or(0, |d| d.len());
        for p in parity.iter_mut() {
            p.resize(len, 0);
        }
        let mut off = 0;
        while off < len {
            let end = (off + STRIPE).min(len);
            let enc = self.encoder(k, m, end - off)?;
            for d in data {
                enc.add_original_shard(&d[off..end]).map_err(rs_err)?;
            }
            let out = enc.encode().map_err(rs_err)?;
            for (p, r) in parity.iter_mut().zip(out.recovery_iter()) {
                p[off..end].copy_from_slice(r);
            }
            off = end;
        }
        Ok(())
    }

    fn reconstruct_data(
        &mut self,
        k: usize,
        m: usize,
        shard_len: usize,
        present: &[(usize, &[u8])],
        out: &mut Vec<(usize, Vec<u8>)>,
    ) -> Result<()> {
        let missing = (0..k).filter(|i| !present.iter().any(|(j, _)| j == i));
        let mut spare: Vec<Vec<u8>> = out.drain(..).map(|(_, b)| b).collect();
        for i in missing {
            let mut b = spare.pop().unwrap_or_default();
            b.resize(shard_len, 0);
            out.push((i, b));
        }
        let mut off = 0;
        while off < shard_len {
            let end = (off + STRIPE).min(shard_len);
            let dec = self.decoder(k, m, end - off)?;
            // Exactly k shards suffice; more only cost time.
            for (i, s) in present.iter().take(k) {
                if *i < k {
                    dec.add_original_shard(*i, &s[off..end]).map_err(rs_err)?;
                } else {
                    dec.add_recovery_shard(*i - k, &s[off..end]).map_err(rs_err)?;
                }
            }
            let res = dec.decode().map_err(rs_err)?;
            for (i, buf) in out.iter_mut() {
                let r = res.restored_original(*i).ok_or_else(|| {
                    Error::Malformed(format!("erasure decoder did not restore shard {i}"))
                })?;
                buf[off..end].copy_from_slice(r);
            }
            off = end;
        }
        Ok(())
    }
}

// ---- AEAD ----

fn aad(object_id: &[u8; 32], index: u32, count: u32, object_len: u64) -> [u8; 48] {
    let mut a = [0u8; 48];
    a[..32].copy_from_slice(object_id);
    a[32..36].copy_from_slice(&index.to_le_bytes());
    a[36..40].copy_from_slice(&count.to_le_bytes());
    a[40..48].copy_from_slice(&object_len.to_le_bytes());
    a
}

/// AES-256-GCM from `ring` (the same standard construction as the `aes-gcm` crate, so the
/// bytes are identical): its VAES/AVX2 code runs several times faster here (ARCHITECTURE.md,
/// "Erasure code"/codec figures).
fn aes_gcm_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key"))
}

fn seal(cipher: Cipher, key: &[u8; 32], index: u32, aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
    // The nonce is the segment index: unique because each object has a fresh random key.
    let mut nonce = [0u8; 24];
    nonce[..4].copy_from_slice(&index.to_le_bytes());
    match cipher {
        Cipher::Aes256Gcm => {
            let n: [u8; 12] = nonce[..12].try_into().unwrap();
            let tag = aes_gcm_key(key)
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(aad), buf)
                .expect("segment fits the AEAD's length limit");
            tag.as_ref().try_into().expect("a 16-byte tag")
        }
        Cipher::XChaCha20Poly1305 => {
            let c = XChaCha20Poly1305::new(key.into());
            c.encrypt_inout_detached((&nonce).into(), aad, buf.into())
                .expect("segment fits the AEAD's length limit")
                .into()
        }
    }
}

fn open(
    cipher: Cipher,
    key: &[u8; 32],
    index: u32,
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; 16],
) -> Result<()> {
    let mut nonce = [0u8; 24];
    nonce[..4].copy_from_slice(&index.to_le_bytes());
    let ok = match cipher {
        Cipher::Aes256Gcm => {
            let n: [u8; 12] = nonce[..12].try_into().unwrap();
            aes_gcm_key(key)
                .open_in_place_separate_tag(
                    Nonce::assume_unique_for_key(n),
                    Aad::from(aad),
                    Tag::from(*tag),
                    buf,
                    0..,
                )
                .is_ok()
        }
        Cipher::XChaCha20Poly1305 => {
            let c = XChaCha20Poly1305::new(key.into());
            c.decrypt_inout_detached((&nonce).into(), aad, buf.into(), tag.into()).is_ok()
        }
    };
    if ok { Ok(()) } else { Err(Error::Decrypt { segment: index }) }
}

// ---- Encoding ----

/// One encoded segment: its signed header and its n shards (data first, then parity). The
/// shards borrow the encoder's buffers, which are reused for the next segment: copy what
/// must outlive it ([`EncodedSegment::to_owned_shards`]).
#[derive(Debug)]
pub struct EncodedSegment<'a> {
    /// The signed header.
    pub header: SegmentHeader,
    /// The n shards.
    pub shards: Vec<&'a [u8]>,
}

impl EncodedSegment<'_> {
    /// Copies of the shards.
    pub fn to_owned_shards(&self) -> Vec<Vec<u8>> {
        self.shards.iter().map(|s| s.to_vec()).collect()
    }
}

/// Encodes one object, segment by segment, reusing its buffers (a fresh 64 MiB allocation per
/// segment costs more in page faults than the erasure code itself).
pub struct Encoder {
    params: CodecParams,
    object_id: [u8; 32],
    salt: [u8; 32],
    key: [u8; 32],
    object_length: u64,
    uploader: SigningKey,
    created: u64,
    expires: u64,
    coder: Box<dyn ErasureCoder>,
    /// Plaintext, then ciphertext + tag + padding in place: the k data shards.
    data: Vec<u8>,
    parity: Vec<Vec<u8>>,
}

impl Encoder {
    /// An encoder for an object of `object_length` bytes with a fresh random key; the object
    /// id derives from the uploader's key and the key's salt.
    pub fn new(
        params: CodecParams,
        object_length: u64,
        uploader: SigningKey,
        created: u64,
        expires: u64,
    ) -> Result<Self> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("OS random generator failed");
        Self::with_key(params, object_length, uploader, key, created, expires)
    }

    /// An encoder whose object key is `key` instead of a random one, so the object id (and
    /// the read capability) can be derived again from what made the key: a gateway's
    /// namespace log lives at ids derived from its root key. The key must never encrypt
    /// different content (the nonces derive from the segment index).
    pub fn with_key(
        params: CodecParams,
        object_length: u64,
        uploader: SigningKey,
        key: [u8; 32],
        created: u64,
        expires: u64,
    ) -> Result<Self> {
        params.validate()?;
        if params.segment_count(object_length) > u64::from(u32::MAX) {
            return Err(Error::Malformed(format!(
                "object of {object_length} bytes needs more than 2^32 segments"
            )));
        }
        let salt = crate::shard::salt_for(&key);
        let object_id = crate::shard::object_id_for(&uploader.verifying_key(), &salt);
        Ok(Encoder {
            params,
            object_id,
            salt,
            key,
            object_length,
            uploader,
            created,
            expires,
            coder: Box::new(SimdCoder::default()),
            data: Vec::new(),
            parity: vec![Vec::new(); usize::from(params.m)],
        })
    }

    /// Uses another erasure coder (for benchmarks).
    pub fn with_coder(mut self, coder: Box<dyn ErasureCoder>) -> Self {
        self.coder = coder;
        self
    }

    /// The object id.
    pub fn object_id(&self) -> [u8; 32] {
        self.object_id
    }

    /// The object key (goes into the read capability, never to a node).
    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// The uploader's public key.
    pub fn uploader(&self) -> [u8; 32] {
        self.uploader.verifying_key().to_bytes()
    }

    /// Number of segments.
    pub fn segment_count(&self) -> u32 {
        self.params.segment_count(self.object_length) as u32
    }

    /// Plaintext length of segment `index`.
    pub fn segment_len(&self, index: u32) -> usize {
        self.object_length
            .saturating_sub(u64::from(index) * self.params.segment_size)
            .min(self.params.segment_size) as usize
    }

    /// Encodes segment `index` whose plaintext is `plaintext`.
    pub fn encode_segment(&mut self, index: u32, plaintext: &[u8]) -> Result<EncodedSegment<'_>> {
        let s = self.prepare(index, plaintext.len())?;
        self.data[..plaintext.len()].copy_from_slice(plaintext);
        self.finish(index, plaintext.len(), s)
    }

    /// Sizes the data buffer for segment `index` of `plen` bytes; returns the shard length.
    fn prepare(&mut self, index: u32, plen: usize) -> Result<usize> {
        let count = self.segment_count();
        let expected = self.segment_len(index);
        if index >= count || plen != expected {
            return Err(Error::Malformed(format!(
                "segment {index} of {count} has {plen} bytes, expected {expected}"
            )));
        }
        let s = self.params.shard_length(plen);
        self.data.resize(usize::from(self.params.k) * s, 0);
        Ok(s)
    }

    /// Encrypts the plaintext already in `self.data[..plen]`, codes and signs the segment.
    fn finish(&mut self, index: u32, plen: usize, s: usize) -> Result<EncodedSegment<'_>> {
        let p = self.params;
        let count = self.segment_count();
        let (k, m) = (usize::from(p.k), usize::from(p.m));
        let aad = aad(&self.object_id, index, count, self.object_length);
        let tag = seal(p.cipher, &self.key, index, &aad, &mut self.data[..plen]);
        self.data[plen..plen + TAG_LEN].copy_from_slice(&tag);
        self.data[plen + TAG_LEN..].fill(0);

        let data: Vec<&[u8]> = self.data.chunks(s).collect();
        self.coder.encode(k, m, &data, &mut self.parity)?;
        let mut shards = data;
        shards.extend(self.parity.iter().map(Vec::as_slice));
        let shard_roots = shards.iter().map(|s| merkle_root(s)).collect();
        let mut header = SegmentHeader {
            version: FORMAT_VERSION,
            cipher: p.cipher,
            object_id: self.object_id,
            segment_index: index,
            segment_count: count,
            object_length: self.object_length,
            segment_size: p.segment_size,
            k: p.k,
            m: p.m,
            shard_length: s as u64,
            created: self.created,
            expires: self.expires,
            uploader: self.uploader.verifying_key(),
            salt: self.salt,
            shard_roots,
            signature: Signature::from_bytes(&[0; 64]),
        };
        header.sign(&self.uploader);
        Ok(EncodedSegment { header, shards })
    }

    /// Reads the object from `reader` one segment at a time (straight into the data-shard
    /// buffer) and hands each encoded segment to `sink`. Fails if the reader yields more or
    /// fewer bytes than the declared length.
    pub fn encode_reader<R: Read>(
        &mut self,
        mut reader: R,
        mut sink: impl FnMut(EncodedSegment<'_>) -> Result<()>,
    ) -> Result<()> {
        for index in 0..self.segment_count() {
            let plen = self.segment_len(index);
            let s = self.prepare(index, plen)?;
            reader.read_exact(&mut self.data[..plen]).map_err(|e| {
                Error::Malformed(format!("input ended before its declared length: {e}"))
            })?;
            sink(self.finish(index, plen, s)?)?;
        }
        let mut extra = [0u8; 1];
        loop {
            return match reader.read(&mut extra) {
                Ok(0) => Ok(()),
                Ok(_) => Err(Error::Malformed("input is longer than its declared length".into())),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(Error::Malformed(format!("reading input: {e}"))),
            };
        }
    }
}

// ---- Decoding ----

/// Decodes segments; keeps the erasure decoder between calls.
pub struct Decoder {
    coder: Box<dyn ErasureCoder>,
    /// Rebuilt data shards, kept to reuse their memory.
    rebuilt: Vec<(usize, Vec<u8>)>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::with_coder(Box::new(SimdCoder::default()))
    }
}

impl Decoder {
    /// A decoder using `coder`.
    pub fn with_coder(coder: Box<dyn ErasureCoder>) -> Self {
        Decoder { coder, rebuilt: Vec::new() }
    }

    /// Rebuilds the plaintext of the segment described by `header` (whose signature the
    /// caller has checked against the expected uploader) from `shards[i]` = shard i if the
    /// caller has it. Every shard used is verified against its signed root first; those that
    /// fail are named in the error if fewer than k remain.
    pub fn decode_segment(
        &mut self,
        key: &[u8; 32],
        header: &SegmentHeader,
        shards: &[Option<&[u8]>],
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.decode_segment_into(key, header, shards, &mut out)?;
        Ok(out)
    }

    /// [`Decoder::decode_segment`] into a reusable buffer (cleared first). On error `out` holds
    /// nothing that could be mistaken for plaintext.
    pub fn decode_segment_into(
        &mut self,
        key: &[u8; 32],
        header: &SegmentHeader,
        shards: &[Option<&[u8]>],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        out.clear();
        let plen = header.plaintext_len() as usize;
        let s = header.shard_length as usize;
        if (plen + TAG_LEN).div_ceil(usize::from(header.k)) > s {
            return Err(Error::Malformed("shard length too small for the segment".into()));
        }
        let data = self.data_shards(header, shards)?;
        for d in &data {
            let take = (plen + TAG_LEN - out.len()).min(d.len());
            out.extend_from_slice(&d[..take]);
        }
        let tag: [u8; 16] = out[plen..].try_into().unwrap();
        out.truncate(plen);
        let aad = aad(
            &header.object_id,
            header.segment_index,
            header.segment_count,
            header.object_length,
        );
        let r = open(header.cipher, key, header.segment_index, &aad, out, &tag);
        if r.is_err() {
            out.clear();
        }
        r
    }

    /// Rebuilds shard `index` from the given shards (repair), verified against the header.
    pub fn rebuild_shard(
        &mut self,
        header: &SegmentHeader,
        shards: &[Option<&[u8]>],
        index: usize,
    ) -> Result<Vec<u8>> {
        let (k, m) = (usize::from(header.k), usize::from(header.m));
        // Repair is a cold path: own the data shards so this decoder's own coder (the one
        // `with_coder` chose) can re-encode parity.
        let data: Vec<Vec<u8>> =
            self.data_shards(header, shards)?.into_iter().map(<[u8]>::to_vec).collect();
        let shard = if index < k {
            data.into_iter().nth(index).expect("k data shards")
        } else {
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let mut parity = vec![Vec::new(); m];
            self.coder.encode(k, m, &refs, &mut parity)?;
            parity.swap_remove(index - k)
        };
        header.verify_shard(index, &shard)?;
        Ok(shard)
    }

    /// The k data shards, verified, rebuilt where missing (borrowed where given).
    fn data_shards<'a>(
        &'a mut self,
        header: &SegmentHeader,
        shards: &[Option<&'a [u8]>],
    ) -> Result<Vec<&'a [u8]>> {
        let (k, m, n) = (usize::from(header.k), usize::from(header.m), header.n());
        if shards.len() != n {
            return Err(Error::Malformed(format!("{} shard slots given, n = {n}", shards.len())));
        }
        let mut good: Vec<(usize, &[u8])> = Vec::with_capacity(n);
        let mut failures = Vec::new();
        for (i, s) in shards.iter().enumerate() {
            // Stop verifying once k data-first shards are good: the rest would not be used.
            if good.len() == k {
                break;
            }
            if let Some(s) = s {
                match header.verify_shard(i, s) {
                    Ok(()) => good.push((i, s)),
                    Err(e) => failures.push(e.to_string()),
                }
            }
        }
        if good.len() < k {
            return Err(Error::NotEnoughShards { have: good.len(), need: k, failures });
        }
        let mut out: Vec<Option<&'a [u8]>> = vec![None; k];
        for (i, s) in &good {
            if *i < k {
                out[*i] = Some(s);
            }
        }
        self.rebuilt.clear();
        if out.iter().any(Option::is_none) {
            let len = header.shard_length as usize;
            self.coder.reconstruct_data(k, m, len, &good, &mut self.rebuilt)?;
            for (i, s) in &self.rebuilt {
                out[*i] = Some(s.as_slice());
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.ok_or_else(|| Error::Malformed(format!("erasure coder did not rebuild {i}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_aes_gcm_matches_the_aes_gcm_crate_byte_for_byte() {
        use aes_gcm::aead::{AeadInOut, KeyInit};
        let key = [7u8; 32];
        let aad = aad(&[9; 32], 3, 5, 12345);
        let plain: Vec<u8> = (0..100_003u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut ours = plain.clone();
        let tag = seal(Cipher::Aes256Gcm, &key, 3, &aad, &mut ours);
        let mut theirs = plain.clone();
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&3u32.to_le_bytes());
        let c = aes_gcm::Aes256Gcm::new((&key).into());
        let their_tag: [u8; 16] = c
            .encrypt_inout_detached((&nonce).into(), &aad, theirs.as_mut_slice().into())
            .unwrap()
            .into();
        assert_eq!(ours, theirs);
        assert_eq!(tag, their_tag);
        open(Cipher::Aes256Gcm, &key, 3, &aad, &mut ours, &tag).unwrap();
        assert_eq!(ours, plain);
        theirs[0] ^= 1;
        assert!(open(Cipher::Aes256Gcm, &key, 3, &aad, &mut theirs, &tag).is_err());
    }
    use crate::identity::random_signing_key;
    use proptest::prelude::*;

    fn params(k: u16, m: u16, seg: u64, cipher: Cipher) -> CodecParams {
        CodecParams { k, m, segment_size: seg, cipher }
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[derive(Clone)]
    struct Seg {
        header: SegmentHeader,
        shards: Vec<Vec<u8>>,
    }

    fn encode_all(p: CodecParams, data: &[u8]) -> (Encoder, Vec<Seg>) {
        let mut enc = Encoder::new(p, data.len() as u64, random_signing_key(), 1, 0).unwrap();
        let mut segs = Vec::new();
        enc.encode_reader(data, |s| {
            segs.push(Seg { shards: s.to_owned_shards(), header: s.header });
            Ok(())
        })
        .unwrap();
        (enc, segs)
    }

    fn decode_all(key: &[u8; 32], segs: &[Seg], lost: &[usize]) -> Result<Vec<u8>> {
        let mut dec = Decoder::default();
        let mut out = Vec::new();
        for s in segs {
            let given: Vec<Option<&[u8]>> = s
                .shards
                .iter()
                .enumerate()
                .map(|(i, b)| (!lost.contains(&i)).then_some(b.as_slice()))
                .collect();
            out.extend(dec.decode_segment(key, &s.header, &given)?);
        }
        Ok(out)
    }

    /// Every subset of `max` or fewer elements of 0..n.
    fn subsets(n: usize, max: usize) -> Vec<Vec<usize>> {
        (0u32..1 << n)
            .filter(|b| b.count_ones() as usize <= max)
            .map(|b| (0..n).filter(|i| b & (1 << i) != 0).collect())
            .collect()
    }

    #[test]
    fn every_loss_of_up_to_m_shards_decodes_exactly() {
        let seg = 4096u64;
        for cipher in [Cipher::Aes256Gcm, Cipher::XChaCha20Poly1305] {
            for (k, m) in [(4u16, 2u16), (2, 1), (3, 3)] {
                let p = params(k, m, seg, cipher);
                for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 17] {
                    let data = random(len, len as u64 + 7);
                    let (enc, segs) = encode_all(p, &data);
                    assert_eq!(segs.len() as u64, p.segment_count(len as u64));
                    for lost in subsets(usize::from(k + m), usize::from(m)) {
                        let back = decode_all(&enc.key(), &segs, &lost).unwrap();
                        assert_eq!(back, data, "RS({k},{m}) len {len} lost {lost:?}");
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn wide_codes_decode_after_random_losses(
            len in 0usize..40_000,
            k in 1u16..20,
            m in 1u16..12,
            seed in any::<u64>(),
        ) {
            let p = params(k, m, 8192, Cipher::Aes256Gcm);
            let data = random(len, seed);
            let (enc, segs) = encode_all(p, &data);
            let n = usize::from(k + m);
            // Lose m shards chosen by the seed.
            let mut idx: Vec<usize> = (0..n).collect();
            let mut x = seed | 1;
            for i in (1..n).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                idx.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let lost = &idx[..usize::from(m)];
            prop_assert_eq!(decode_all(&enc.key(), &segs, lost).unwrap(), data);
        }
    }

    #[test]
    fn fewer_than_k_shards_says_have_and_need() {
        let p = params(4, 2, 1024, Cipher::Aes256Gcm);
        let data = random(3000, 1);
        let (enc, segs) = encode_all(p, &data);
        let err = decode_all(&enc.key(), &segs, &[0, 2, 5]).unwrap_err();
        assert!(matches!(err, Error::NotEnoughShards { have: 3, need: 4, .. }));
        assert!(err.to_string().contains("have 3, need 4"), "{err}");
    }

    #[test]
    fn a_flipped_bit_in_a_shard_is_detected_and_named() {
        let p = params(4, 2, 100_000, Cipher::Aes256Gcm);
        let data = random(200_000, 2);
        let (enc, mut segs) = encode_all(p, &data);
        for shard in 0..6 {
            let mut s = segs[0].clone();
            let pos = (shard * 7919) % s.shards[shard].len();
            s.shards[shard][pos] ^= 0x10;
            let err = s.header.verify_shard(shard, &s.shards[shard]).unwrap_err();
            assert!(matches!(err, Error::ShardCorrupt { index, .. } if index == shard));
            // With the corrupt shard given, decoding still succeeds from the others.
            assert_eq!(
                decode_all(&enc.key(), std::slice::from_ref(&s), &[]).unwrap(),
                data[..100_000]
            );
        }
        // Two corrupt and one missing: not enough, and the failures are named.
        segs[0].shards[0][0] ^= 1;
        segs[0].shards[1][5] ^= 1;
        let err = decode_all(&enc.key(), &segs[..1], &[2]).unwrap_err();
        match err {
            Error::NotEnoughShards { have: 3, need: 4, failures } => {
                assert_eq!(failures.len(), 2);
                assert!(failures[0].contains("shard 0"), "{failures:?}");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn a_shard_of_another_segment_or_object_is_refused() {
        let p = params(2, 1, 1000, Cipher::Aes256Gcm);
        let data = random(2000, 3);
        let (enc, segs) = encode_all(p, &data);
        let (_, other) = encode_all(p, &data);
        assert_eq!(segs[0].header.shard_length, segs[1].header.shard_length);
        // Segment 1's shard 0 handed in as segment 0's shard 0.
        assert!(segs[0].header.verify_shard(0, &segs[1].shards[0]).is_err());
        // The same position of another object (same plaintext, other key) is refused too.
        assert!(segs[0].header.verify_shard(0, &other[0].shards[0]).is_err());
        let mixed: Vec<Option<&[u8]>> =
            vec![Some(&other[0].shards[0]), Some(&segs[1].shards[1]), None];
        let err = Decoder::default().decode_segment(&enc.key(), &segs[0].header, &mixed);
        assert!(matches!(err, Err(Error::NotEnoughShards { have: 0, .. })));
    }

    #[test]
    fn wrong_key_fails_to_decrypt() {
        let p = params(2, 1, 1000, Cipher::XChaCha20Poly1305);
        let data = random(500, 4);
        let (_, segs) = encode_all(p, &data);
        let err = decode_all(&[9; 32], &segs, &[]).unwrap_err();
        assert!(matches!(err, Error::Decrypt { segment: 0 }));
    }

    #[test]
    fn rebuilt_shards_match_the_signed_roots() {
        let p = params(4, 2, 50_000, Cipher::Aes256Gcm);
        let data = random(50_000, 5);
        let (_, segs) = encode_all(p, &data);
        let s = &segs[0];
        let mut dec = Decoder::default();
        for lost in 0..6 {
            let given: Vec<Option<&[u8]>> = s
                .shards
                .iter()
                .enumerate()
                .map(|(i, b)| (i != lost && i != (lost + 1) % 6).then_some(b.as_slice()))
                .collect();
            assert_eq!(dec.rebuild_shard(&s.header, &given, lost).unwrap(), s.shards[lost]);
        }
    }

    #[test]
    fn striped_parity_equals_whole_shard_parity() {
        // The stripe is not part of the format: coding stripe by stripe must give the bytes
        // one call over the whole shard gives.
        for (k, m, len) in [(4usize, 2usize, STRIPE * 2 + 130), (3, 2, STRIPE + 64), (2, 1, 6)] {
            let data: Vec<Vec<u8>> = (0..k).map(|i| random(len, i as u64 + 1)).collect();
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let mut striped = vec![Vec::new(); m];
            SimdCoder::default().encode(k, m, &refs, &mut striped).unwrap();
            let whole = reed_solomon_simd::encode(k, m, &refs).unwrap();
            assert_eq!(striped, whole, "RS({k},{m}) len {len}");
        }
    }

    #[test]
    fn input_shorter_or_longer_than_declared_is_an_error() {
        let p = params(2, 1, 1000, Cipher::Aes256Gcm);
        let mut enc = Encoder::new(p, 10, random_signing_key(), 1, 0).unwrap();
        assert!(enc.encode_reader(&[0u8; 9][..], |_| Ok(())).is_err());
        let mut enc = Encoder::new(p, 10, random_signing_key(), 1, 0).unwrap();
        assert!(enc.encode_reader(&[0u8; 11][..], |_| Ok(())).is_err());
    }
}
