//! Valid inputs for every target, made with the real encoders and fixed keys, so
//! `cargo run --example seeds` writes the same bytes every time. The fuzzer starts from these:
//! without them it would have to discover magic numbers, lengths and checksums first.
//!
//! Layouts of the mode-prefixed inputs are documented on each target in `fuzz_targets/`.

use std::collections::BTreeMap;

use data_encoding::BASE32_NOPAD;
use ed25519_dalek::{Signature, Signer, SigningKey};
use shardfarm_coordinator::economics::Reward;
use shardfarm_coordinator::ledger::Ledger;
use shardfarm_coordinator::{Coordinator, JoinInput};
use shardfarm_core::auth::{Caller, Envelope};
use shardfarm_core::cap::ReadCap;
use shardfarm_core::capacity::CapacityReport;
use shardfarm_core::identity::{Delegation, NodeId, blake2b256, leading_zero_bits};
use shardfarm_core::shard::{
    Cipher, FORMAT_VERSION, SegmentHeader, ShardId, coded_shard_length, object_id_for,
};
use shardfarm_core::tombstone::Tombstone;

use crate::{MemStore, coordinator_identity, fuzz_key, key, mined, pool_config, scratch_file};

/// Named seed inputs of one target.
pub type Seeds = Vec<(String, Vec<u8>)>;

/// A fixed "now" for everything time-stamped (2023-11-14).
pub const NOW_MS: u64 = 1_700_000_000_000;

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("segment_header", segment_header()),
        ("capability", capability()),
        ("credential", credential()),
        ("capacity_report", capacity_report()),
        ("tombstone", tombstone()),
        ("ledger", ledger()),
        ("coordinator_state", coordinator_state()),
    ]
}

/// `sf2:` (for a payload starting with version 2, else `sf1:`) + lowercase base32 of `payload`
/// and its 4-byte checksum: a capability around any payload (the `capability` target's mode 0).
pub fn wrap_cap_payload(payload: &[u8]) -> String {
    let mut b = payload.to_vec();
    b.extend_from_slice(&blake2b256(&[payload])[..4]);
    let prefix = if payload.first() == Some(&2) { "sf2:" } else { "sf1:" };
    format!("{prefix}{}", BASE32_NOPAD.encode(&b).to_ascii_lowercase())
}

// ---- Per target ----

#[allow(clippy::too_many_arguments)]
fn header(
    key: &SigningKey,
    cipher: Cipher,
    segment_index: u32,
    object_length: u64,
    segment_size: u64,
    k: u16,
    m: u16,
) -> SegmentHeader {
    let salt = blake2b256(&[b"seed salt", &object_length.to_le_bytes()]);
    let mut h = SegmentHeader {
        version: FORMAT_VERSION,
        cipher,
        object_id: object_id_for(&key.verifying_key(), &salt),
        segment_index,
        segment_count: object_length.div_ceil(segment_size).max(1) as u32,
        object_length,
        segment_size,
        k,
        m,
        shard_length: 0,
        created: NOW_MS / 1000,
        expires: 0,
        uploader: key.verifying_key(),
        salt,
        shard_roots: (0..usize::from(k + m)).map(|i| [i as u8; 32]).collect(),
        signature: Signature::from_bytes(&[0; 64]),
    };
    h.shard_length = coded_shard_length(h.plaintext_len(), k);
    h.sign(key);
    h
}

fn segment_header() -> Seeds {
    let k = key(1);
    let mut out: Seeds = vec![
        ("rs4-2-middle", header(&k, Cipher::Aes256Gcm, 1, 2 * 1024 + 5, 1024, 4, 2)),
        ("rs4-2-last-short", header(&k, Cipher::Aes256Gcm, 2, 2 * 1024 + 5, 1024, 4, 2)),
        ("rs1-1-empty-object", header(&k, Cipher::XChaCha20Poly1305, 0, 0, 4096, 1, 1)),
        ("rs10-4-64mib", header(&k, Cipher::XChaCha20Poly1305, 3, 200 << 20, 64 << 20, 10, 4)),
        ("rs128-128-max-n", header(&k, Cipher::Aes256Gcm, 0, 1 << 30, 1 << 30, 128, 128)),
    ]
    .into_iter()
    .map(|(n, h)| (n.to_string(), h.encode()))
    .collect();
    let id = ShardId { object_id: [7; 32], segment: 3, shard: 5 };
    out.push(("index-key".into(), id.index_key(11).to_vec()));
    out
}

fn capability() -> Seeds {
    let cap = |pool: &str| ReadCap {
        pool: pool.into(),
        pool_id: Some([7; 32]),
        object_id: [1; 32],
        key: [2; 32],
        uploader: key(1).verifying_key().to_bytes(),
    };
    let caps = [
        ("local", cap("local")),
        ("local-sf1", ReadCap { pool_id: None, ..cap("local") }),
        ("pool-64-bytes", cap(&"p".repeat(64))),
        ("pool-utf8", cap("zürich-€-pool")),
    ];
    let mut out = Seeds::new();
    for (name, c) in &caps {
        let s = c.encode();
        out.push((format!("text-{name}"), s.clone().into_bytes()));
        // The decoded payload (mode 0): the bytes between `sf2:`/`sf1:` and the checksum.
        let body = BASE32_NOPAD.decode(s[4..].to_ascii_uppercase().as_bytes()).unwrap();
        let mut payload = vec![0u8];
        payload.extend_from_slice(&body[..body.len() - 4]);
        out.push((format!("payload-{name}"), payload));
    }
    let s = caps[0].1.encode();
    out.push((
        "text-uppercase-padded".into(),
        format!("  {}{}\n", &s[..4], s[4..].to_uppercase()).into(),
    ));
    out
}

fn credential() -> Seeds {
    let issuer = mined(2, 8);
    let node = mined(1, 8);
    let d = Delegation::issue(&issuer, key(3).verifying_key(), NOW_MS / 1000 + 3600);
    let delegated = shardfarm_core::identity::Credential::Delegated(Box::new(d.clone()));
    let with_mode = |mode: u8, b: &[u8]| [&[mode][..], b].concat();
    let mut out = vec![
        ("credential-mined".to_string(), with_mode(0, &node.credential().to_bytes())),
        ("credential-delegated".to_string(), with_mode(0, &delegated.to_bytes())),
        ("delegation".to_string(), with_mode(1, &d.to_bytes())),
    ];
    // Requests (mode 2), signed by a key that is not the credential's: refused at the last
    // check, after the time window, the proof of work and the body hash pass.
    for (name, cred, flags) in [
        ("request-mined", node.credential(), 1u8),
        ("request-delegated", delegated, 1),
        ("request-body-hash-given", node.credential(), 0),
    ] {
        let body = b"hello shard".to_vec();
        let env = Envelope {
            audience: NodeId([0; 32]),
            method: "/shardfarm.v1.Agent/PutShard".into(),
            nonce: [9; 16],
            timestamp_ms: NOW_MS,
            body_hash: blake2b256(&[&body]),
        };
        let signature = key(99).sign(&env.signed_bytes());
        let cred = cred.to_bytes();
        let mut b = vec![2, flags, 8];
        b.extend_from_slice(&NOW_MS.to_le_bytes());
        b.push(cred.len() as u8);
        b.extend_from_slice(&cred);
        b.push(env.method.len() as u8);
        b.extend_from_slice(env.method.as_bytes());
        b.extend_from_slice(&env.nonce);
        b.extend_from_slice(&env.timestamp_ms.to_le_bytes());
        b.extend_from_slice(&env.body_hash);
        b.extend_from_slice(&signature.to_bytes());
        b.extend_from_slice(&body);
        out.push((name.to_string(), b));
    }
    out
}

/// A report signed by `key` whose proof of work holds: the first solution found.
fn report(key: &SigningKey, challenge: &[u8], difficulty: u8, overhead: f64) -> CapacityReport {
    let node = key.verifying_key();
    let solution = (0u64..)
        .find(|n| {
            let h = blake2b256(&[challenge, node.as_bytes(), &n.to_le_bytes()]);
            leading_zero_bits(&h) >= u32::from(difficulty)
        })
        .unwrap();
    let mut r = CapacityReport {
        node,
        challenge: challenge.to_vec(),
        difficulty,
        solution,
        processors: 2,
        cores_per_processor: 8,
        solve_ms: 400,
        overhead,
        space_reported: 10 << 30,
        space_taken: 1 << 20,
        timestamp_ms: NOW_MS,
        signature: Signature::from_bytes(&[0; 64]),
    };
    let unsigned = r.encode();
    r.signature = key.sign(&unsigned[..unsigned.len() - 64]);
    r
}

/// The field layout of the `capacity_report` target's mode 1.
fn report_fields(r: &CapacityReport, check_challenge: bool) -> Vec<u8> {
    let mut b = vec![1, r.challenge.len() as u8];
    b.extend_from_slice(&r.challenge);
    b.push(r.difficulty);
    b.extend_from_slice(&r.solution.to_le_bytes());
    b.extend_from_slice(&r.processors.to_le_bytes());
    b.extend_from_slice(&r.cores_per_processor.to_le_bytes());
    b.extend_from_slice(&r.solve_ms.to_le_bytes());
    b.extend_from_slice(&r.overhead.to_bits().to_le_bytes());
    b.extend_from_slice(&r.space_reported.to_le_bytes());
    b.extend_from_slice(&r.space_taken.to_le_bytes());
    b.extend_from_slice(&r.timestamp_ms.to_le_bytes());
    b.push(u8::from(check_challenge));
    b
}

fn capacity_report() -> Seeds {
    let k = key(4);
    let reports = [
        ("d8", report(&k, &[0xab; 32], 8, 1.0)),
        ("d0", report(&k, b"c", 0, 1.5)),
        ("d12-challenge-64", report(&k, &[0x11; 64], 12, 0.25)),
    ];
    let mut out = Seeds::new();
    for (name, r) in &reports {
        out.push((format!("encoded-{name}"), [&[0u8][..], &r.encode()].concat()));
        let ours = report(&fuzz_key(), &r.challenge, r.difficulty, r.overhead);
        out.push((format!("fields-{name}"), report_fields(&ours, true)));
    }
    out
}

fn tombstone() -> Seeds {
    let t = Tombstone::sign(&key(5), [3; 32], NOW_MS);
    let mut later = vec![0u8];
    later.extend_from_slice(&t.encode());
    later.extend_from_slice(&(NOW_MS + 60_000).to_le_bytes());
    let mut fields = vec![1u8, 5];
    fields.extend_from_slice(&[3; 32]);
    fields.extend_from_slice(&NOW_MS.to_le_bytes());
    fields.extend_from_slice(&(NOW_MS + 60_000).to_le_bytes());
    vec![
        ("encoded".into(), [&[0u8][..], &t.encode()].concat()),
        ("encoded-with-now".into(), later),
        ("fields".into(), fields),
    ]
}

fn reward(node: &str, farm: &str, rw1: u64, rw2: u64, capacity: f64) -> Reward {
    Reward { node: node.into(), farm: farm.into(), rw1, rw2, capacity, proven_bytes: rw2 * 3 }
}

fn ledger() -> Seeds {
    let epochs = [
        (
            19_700u64,
            vec![reward("aa11", "f1", 30_000, 70_000, 757.5), reward("bb22", "f2", 1, 2, 0.0)],
        ),
        (19_701, vec![reward("aa11", "f1", 5, 5, 1e12)]),
    ];
    // Mode 0: the file the coordinator writes.
    let id = coordinator_identity();
    let path = scratch_file("seed-ledger.jsonl");
    let _ = std::fs::remove_file(&path);
    let mut l = Ledger::from_text(&path, "", &id.public_key()).unwrap();
    let mut out = Seeds::new();
    for (i, (epoch, rewards)) in epochs.iter().enumerate() {
        l.append(*epoch, rewards, &id).unwrap();
        let text = std::fs::read(&path).unwrap();
        out.push((format!("file-{}-epochs", i + 1), [&[0u8][..], &text].concat()));
    }
    let _ = std::fs::remove_file(&path);
    // Mode 1: the same rewards as fields.
    let mut b = vec![1u8];
    let mut prev = 0;
    for (epoch, rewards) in &epochs {
        b.push(if prev == 0 { 3 } else { (epoch - prev) as u8 });
        prev = *epoch;
        b.push(rewards.len() as u8);
        for r in rewards {
            for s in [&r.node, &r.farm] {
                b.push(s.len() as u8);
                b.extend_from_slice(s.as_bytes());
            }
            for v in [r.rw1, r.rw2, r.capacity.to_bits(), r.proven_bytes] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out.push(("rewards-2-epochs".into(), b));
    out
}

fn coordinator_state() -> Seeds {
    let store = MemStore::default();
    let ledger = scratch_file("seed-state-ledger.jsonl");
    let _ = std::fs::remove_file(&ledger);
    let c = Coordinator::open_with(
        pool_config(),
        Box::new(store.clone()),
        &ledger,
        coordinator_identity(),
    )
    .unwrap();
    let mut out = Seeds::new();
    c.tick(NOW_MS);
    out.push(("fresh".into(), store.document().unwrap()));
    let nodes: Vec<_> = (10..14u8).map(|s| mined(s, 0)).collect();
    for (i, id) in nodes.iter().enumerate() {
        let (challenge, _) = c.challenge(NOW_MS).unwrap();
        let r = report(id.signing_key(), &challenge, 0, 1.0);
        let caller = Caller { credential: id.credential(), id: id.id(), root: id.id() };
        let mut labels = BTreeMap::new();
        labels.insert("zone".to_string(), format!("z{}", i % 3));
        labels.insert("farm".to_string(), format!("farm-{}", i % 2));
        let input = JoinInput {
            grpc: format!("127.0.0.1:{}", 7000 + i),
            http: format!("127.0.0.1:{}", 8000 + i),
            labels,
            capacity_report: r.encode(),
            last_layout: None,
            farm_grant: Default::default(),
        };
        c.join(&caller, input, NOW_MS).unwrap();
    }
    c.tick(NOW_MS + 1_000);
    out.push(("four-nodes-layout".into(), store.document().unwrap()));
    c.drain(&nodes[0].id());
    c.tick(NOW_MS + 2_000);
    out.push(("draining-previous-layout".into(), store.document().unwrap()));
    // A day later, one node silent: down, uptime recorded, an epoch closed into the ledger.
    let day = 86_400_000;
    c.tick(NOW_MS + day);
    out.push(("a-day-later-all-down".into(), store.document().unwrap()));
    let _ = std::fs::remove_file(&ledger);
    out
}
