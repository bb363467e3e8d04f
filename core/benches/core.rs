//! Core benchmarks: prints figures, asserts nothing. Run with
//! `cargo bench -p shardfarm-core --bench core` (add `-- quick` for a smaller run).
//!
//! Figures are medians of several runs, in GB/s of *object* (input) bytes unless stated.

use std::hint::black_box;
use std::time::{Duration, Instant};

use shardfarm_core::codec::{CodecParams, Decoder, Encoder, ErasureCoder, SimdCoder};
use shardfarm_core::identity::{self, random_signing_key};
use shardfarm_core::shard::{Cipher, merkle_root};
use shardfarm_core::{Error, Result};

const MIB: usize = 1024 * 1024;

/// `reed-solomon-erasure` (built here with `simd-accel`: its AVX2 C kernel) behind the codec's
/// interface, on the same shards as `reed-solomon-simd`.
struct ErasureCrate;

impl ErasureCoder for ErasureCrate {
    fn encode(&mut self, k: usize, m: usize, data: &[&[u8]], parity: &mut [Vec<u8>]) -> Result<()> {
        let rs = reed_solomon_erasure::galois_8::ReedSolomon::new(k, m)
            .map_err(|e| Error::Malformed(format!("{e:?}")))?;
        for p in parity.iter_mut() {
            p.resize(data[0].len(), 0);
        }
        rs.encode_sep(data, parity).map_err(|e| Error::Malformed(format!("{e:?}")))
    }

    fn reconstruct_data(
        &mut self,
        k: usize,
        m: usize,
        len: usize,
        present: &[(usize, &[u8])],
        out: &mut Vec<(usize, Vec<u8>)>,
    ) -> Result<()> {
        let rs = reed_solomon_erasure::galois_8::ReedSolomon::new(k, m)
            .map_err(|e| Error::Malformed(format!("{e:?}")))?;
        let mut shards: Vec<Option<Vec<u8>>> = vec![None; k + m];
        for (i, s) in present {
            shards[*i] = Some(s.to_vec());
        }
        let missing: Vec<usize> = (0..k).filter(|i| shards[*i].is_none()).collect();
        rs.reconstruct_data(&mut shards).map_err(|e| Error::Malformed(format!("{e:?}")))?;
        out.clear();
        out.extend(
            missing.into_iter().map(|i| (i, shards[i].take().unwrap_or_else(|| vec![0; len]))),
        );
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs `f` `reps` times and returns the median GB/s for `bytes` per run.
fn rate(reps: usize, bytes: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                bytes as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .collect(),
    )
}

fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    v
}

fn mining(quick: bool) {
    let key = random_signing_key().verifying_key();
    let secs = if quick { 1.0 } else { 3.0 };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for threads in [1, cores] {
        let (mut hashes, mut time) = (0u64, 0f64);
        while time < secs {
            // Difficulty 20 ≈ 1 M hashes per solution; sum many solutions for a rate.
            let r = identity::mine(&key, 20, threads, &|_| {}).unwrap();
            hashes += r.hashes;
            time += r.seconds;
        }
        println!(
            "mining  blake2b-256 PoW, {threads} thread(s): {:.2} M hashes/s ({:.2} M/s per thread)",
            hashes as f64 / time / 1e6,
            hashes as f64 / time / 1e6 / threads as f64
        );
    }
}

fn hashing(quick: bool) {
    let data = random(64 * MIB);
    let reps = if quick { 3 } else { 7 };
    let copy = rate(reps, data.len(), || {
        black_box(data.clone());
    });
    let b3 = rate(reps, data.len(), || {
        black_box(blake3::hash(&data));
    });
    let b2 = rate(reps, data.len(), || {
        black_box(identity::blake2b256(&[&data]));
    });
    let merkle = rate(reps, data.len(), || {
        black_box(merkle_root(&data));
    });
    println!(
        "hash    64 MiB: memcpy {copy:.2} GB/s | blake3 {b3:.2} | blake2b-256 {b2:.2} | BLAKE3 Merkle (64 KiB leaves) {merkle:.2} GB/s"
    );
}

fn erasure_compare(quick: bool) {
    let reps = if quick { 3 } else { 5 };
    let cases: &[(usize, usize, usize)] = &[
        (4, 2, 16 * MIB), // RS(4,2), 64 MiB segments
        (4, 2, MIB),
        (10, 4, MIB),
        (16, 8, 256 * 1024),
        (29, 51, 64 * 1024),
    ];
    for &(k, m, len) in cases {
        let data: Vec<Vec<u8>> = (0..k).map(|i| random(len + i * 2)[i * 2..].to_vec()).collect();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let bytes = k * len;
        let mut row = format!("erasure RS({k},{m}) shard {:>5} KiB:", len / 1024);
        let coders: [(&str, Box<dyn ErasureCoder>); 2] = [
            ("reed-solomon-simd", Box::new(SimdCoder::default())),
            ("reed-solomon-erasure+simd-accel", Box::new(ErasureCrate)),
        ];
        for (name, mut coder) in coders {
            let mut parity = vec![Vec::new(); m];
            coder.encode(k, m, &refs, &mut parity).unwrap();
            let mut scratch = vec![Vec::new(); m];
            let enc = rate(reps, bytes, || {
                coder.encode(k, m, &refs, &mut scratch).unwrap();
                black_box(&scratch);
            });
            // Lose min(m, k) data shards; decode from the rest.
            let lost = m.min(k);
            let mut present: Vec<(usize, &[u8])> =
                (lost..k).map(|i| (i, data[i].as_slice())).collect();
            present
                .extend(parity.iter().enumerate().take(lost).map(|(i, p)| (k + i, p.as_slice())));
            let mut rebuilt = Vec::new();
            coder.reconstruct_data(k, m, len, &present, &mut rebuilt).unwrap();
            assert_eq!(rebuilt[0].1, data[rebuilt[0].0], "{name} rebuilt wrong bytes");
            let dec = rate(reps, bytes, || {
                coder.reconstruct_data(k, m, len, &present, &mut rebuilt).unwrap();
                black_box(&rebuilt);
            });
            row += &format!("  {name}: enc {enc:.2} / rebuild {lost} data {dec:.2} GB/s");
        }
        println!("{row}");
    }
}

/// AES-256-GCM over one 64 MiB buffer: the `aes-gcm` crate against `ring` (which the codec
/// uses), in the same run.
fn aead(quick: bool) {
    use aes_gcm::aead::{AeadInOut, KeyInit};
    use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let mut buf = random(64 * MIB);
    let reps = if quick { 3 } else { 7 };
    let key = [5u8; 32];
    let c = aes_gcm::Aes256Gcm::new((&key).into());
    let crate_rate = rate(reps, buf.len(), || {
        let t = c.encrypt_inout_detached((&[0u8; 12]).into(), b"", buf.as_mut_slice().into());
        black_box(t.unwrap());
    });
    let r = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).unwrap());
    let ring_rate = rate(reps, buf.len(), || {
        let n = Nonce::assume_unique_for_key([0; 12]);
        let tag = r.seal_in_place_separate_tag(n, Aad::empty(), &mut buf).unwrap();
        black_box(tag.as_ref());
    });
    println!(
        "aead    AES-256-GCM 64 MiB, 1 thread: aes-gcm crate {crate_rate:.2} GB/s | ring {ring_rate:.2} GB/s"
    );
}

fn pipeline(quick: bool) {
    let len = if quick { 64 * MIB } else { 256 * MIB };
    let object = random(len);
    let reps = if quick { 2 } else { 3 };
    for (k, m) in [(4u16, 2u16), (10, 4)] {
        for cipher in [Cipher::Aes256Gcm, Cipher::XChaCha20Poly1305] {
            let params = CodecParams { k, m, segment_size: 64 * MIB as u64, cipher };
            let mut segs = Vec::new();
            let mut enc = Encoder::new(params, len as u64, random_signing_key(), 0, 0).unwrap();
            let key = enc.key();
            let e = rate(reps, len, || {
                segs.clear();
                enc.encode_reader(&object[..], |s| {
                    black_box(&s);
                    Ok(())
                })
                .unwrap();
            });
            enc.encode_reader(&object[..], |s| {
                segs.push((s.header.clone(), s.to_owned_shards()));
                Ok(())
            })
            .unwrap();
            // Decode with m data shards lost (rebuild + verify + decrypt).
            let mut dec = Decoder::default();
            let mut out = Vec::new();
            let d = rate(reps, len, || {
                for (h, shards) in &segs {
                    let given: Vec<Option<&[u8]>> = shards
                        .iter()
                        .enumerate()
                        .map(|(i, b)| (i >= usize::from(m)).then_some(b.as_slice()))
                        .collect();
                    dec.decode_segment_into(&key, h, &given, &mut out).unwrap();
                    black_box(&out);
                }
            });
            let d_all = rate(reps, len, || {
                for (h, shards) in &segs {
                    let given: Vec<Option<&[u8]>> =
                        shards.iter().map(|b| Some(b.as_slice())).collect();
                    dec.decode_segment_into(&key, h, &given, &mut out).unwrap();
                    black_box(&out);
                }
            });
            println!(
                "codec   {} MiB RS({k},{m}) {cipher:?}, 1 thread: encode {e:.2} GB/s | decode, {m} data shards lost {d:.2} GB/s | decode, none lost {d_all:.2} GB/s",
                len / MIB
            );
        }
        // The same without encryption: erasure coding + Merkle hashing only.
        let (ku, mu) = (usize::from(k), usize::from(m));
        let s = (64 * MIB).div_ceil(ku).next_multiple_of(2);
        let mut coder = SimdCoder::default();
        let mut padded = vec![0u8; ku * s];
        let mut parity = vec![Vec::new(); mu];
        let e = rate(reps, len, || {
            for seg in object.chunks(64 * MIB) {
                padded[..seg.len()].copy_from_slice(seg);
                let data: Vec<&[u8]> = padded.chunks(s).collect();
                coder.encode(ku, mu, &data, &mut parity).unwrap();
                for d in data.iter().copied().chain(parity.iter().map(Vec::as_slice)) {
                    black_box(merkle_root(d));
                }
            }
        });
        println!(
            "codec   {} MiB RS({k},{m}) no encryption (copy + erasure + Merkle): encode {e:.2} GB/s",
            len / MIB
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "quick");
    let only = args.iter().skip(1).find(|a| !a.starts_with('-') && *a != "quick").cloned();
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let t = Instant::now();
    println!(
        "shardfarm-core benchmarks ({} cores){}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if quick { ", quick" } else { "" }
    );
    if want("mining") {
        mining(quick);
    }
    if want("hash") {
        hashing(quick);
    }
    if want("erasure") {
        erasure_compare(quick);
    }
    if want("aead") {
        aead(quick);
    }
    if want("codec") {
        pipeline(quick);
    }
    let _ = Duration::from_secs(0);
    println!("(took {:.1} s)", t.elapsed().as_secs_f64());
}
