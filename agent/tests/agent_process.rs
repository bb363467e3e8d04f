//! The agent as a real process on 127.0.0.1 with a real RocksDB: round trips, crashes,
//! corruption, audits, and every refusal.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ed25519_dalek::Signature;
use shardfarm_core::audit::{self, ProvenLeaf};
use shardfarm_core::auth::Envelope;
use shardfarm_core::identity::{Identity, NodeId, random_signing_key};
use shardfarm_core::shard::{Cipher, FORMAT_VERSION, SegmentHeader, merkle_root, object_id_for};
use shardfarm_proto::pb as proto;
use shardfarm_proto::{Signer, methods};
use tonic::Code;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn put_get_range_list_delete_round_trips() {
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &[]);
    let (me, signer) = signer();
    let mut c = agent.client(&signer).await;

    // The smallest shard the format allows (an empty object: its 16-byte tag, k = 1), from a
    // hand-made header, and multi-MiB shards from the codec.
    let tiny = Bytes::from(vec![7u8; 16]);
    let mut zero = SegmentHeader {
        version: FORMAT_VERSION,
        cipher: Cipher::Aes256Gcm,
        object_id: object_id_for(&me.public_key(), &[42; 32]),
        segment_index: 0,
        segment_count: 1,
        object_length: 0,
        segment_size: 1 << 20,
        k: 1,
        m: 1,
        shard_length: 16,
        created: 1,
        expires: 0,
        uploader: me.public_key(),
        salt: [42; 32],
        shard_roots: vec![merkle_root(&tiny); 2],
        signature: Signature::from_bytes(&[0; 64]),
    };
    zero.sign(me.signing_key());
    let r = c.put_shard(&zero.encode(), 0, tiny.clone()).await.unwrap();
    assert_eq!(r.stored_bytes, 16);
    let zid = shardfarm_core::shard::ShardId { object_id: zero.object_id, segment: 0, shard: 0 };
    let got = c.get_shard(zid, 0, 0).await.unwrap();
    assert_eq!(got.data, tiny);
    assert_eq!(got.header, zero.encode());

    let seg = segment(&me, 6 << 20, 2, 1); // 3 MiB shards
    for (i, s) in seg.shards.iter().enumerate() {
        let r = c.put_shard(&seg.header_bytes, i as u32, s.clone()).await.unwrap();
        assert_eq!(r.stored_bytes, s.len() as u64);
        assert!(!r.already_present);
    }
    // Idempotent re-upload.
    let again = c.put_shard(&seg.header_bytes, 1, seg.shards[1].clone()).await.unwrap();
    assert!(again.already_present);

    for i in 0..3u32 {
        let got = c.get_shard(seg.id(i), 0, 0).await.unwrap();
        assert_eq!(got.data, seg.shards[i as usize]);
        SegmentHeader::decode(&got.header).unwrap().verify_shard(i as usize, &got.data).unwrap();
    }
    let range = c.get_shard(seg.id(2), 1000, 5000).await.unwrap();
    assert_eq!(range.data, seg.shards[2][1000..6000]);
    let tail = c.get_shard(seg.id(2), seg.shards[2].len() as u64 - 10, 0).await.unwrap();
    assert_eq!(tail.data, seg.shards[2][seg.shards[2].len() - 10..]);
    let err = c.get_shard(seg.id(2), 1 << 40, 1).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let info = c.info().await.unwrap();
    let partition = shardfarm_core::shard::partition(&seg.header.object_id, 0, info.partitions);
    let listed = c.list_shards(partition, None, 0).await.unwrap();
    let mine: Vec<u32> = listed
        .iter()
        .filter(|e| e.key.as_ref().unwrap().object_id[..] == seg.header.object_id)
        .map(|e| e.key.as_ref().unwrap().shard_index)
        .collect();
    assert_eq!(mine, vec![0, 1, 2]);
    // Paging: one entry per page, resuming after the last key.
    let p1 = c.list_shards(partition, None, 1).await.unwrap();
    assert_eq!(p1.len(), 1);
    let after = shardfarm_core::shard::ShardId::try_from(p1[0].key.clone().unwrap()).unwrap();
    let p2 = c.list_shards(partition, Some(after), 1).await.unwrap();
    assert_ne!(p2.first().map(|e| e.key.clone()), Some(p1[0].key.clone()));
    let total: u64 = seg.shards.iter().map(|s| s.len() as u64).sum::<u64>() + 16;
    assert_eq!(info.used_bytes, total);

    assert!(c.delete_shard(seg.id(1)).await.unwrap());
    assert!(!c.delete_shard(seg.id(1)).await.unwrap());
    assert_eq!(c.get_shard(seg.id(1), 0, 0).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(c.get_shard(seg.id(0), 0, 0).await.unwrap().data, seg.shards[0]);
    assert!(!agent.shard_file(&seg.id(1)).exists());

    let m = agent.metrics();
    assert!(
        metric(&m, "shardfarm_agent_requests_total{method=\"PutShard\",result=\"ok\"}").unwrap()
            >= 4.0,
        "{m}"
    );
    let left = (seg.shards[0].len() + seg.shards[2].len() + tiny.len()) as f64;
    assert_eq!(metric(&m, "shardfarm_agent_stored_bytes").unwrap(), left);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill9_mid_upload_leaves_nothing_half_written_and_keeps_acknowledged_shards() {
    let dir = tmp();
    let mut agent = AgentProc::start(&dir.path().join("a"), &[]);
    let (me, signer) = signer();
    let mut c = agent.client(&signer).await;
    let acked: Vec<Seg> = (0..4).map(|i| segment(&me, (1 << 20) + i * 4097, 2, 1)).collect();
    for s in &acked {
        for (i, b) in s.shards.iter().enumerate() {
            c.put_shard(&s.header_bytes, i as u32, b.clone()).await.unwrap();
        }
    }
    // A 24 MiB shard streamed slowly; the agent is killed half way.
    let big = segment(&me, 48 << 20, 2, 1);
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::PutShardRequest>(1);
    let mut raw = agent.raw(&signer).await;
    let first = proto::PutShardRequest {
        part: Some(proto::put_shard_request::Part::Header(proto::PutShardHeader {
            segment_header: big.header_bytes.clone().into(),
            shard_index: 0,
        })),
    };
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    *req.metadata_mut() = signer.request(agent.id(), methods::PUT, first.clone()).into_parts().0;
    let call = tokio::spawn(async move { raw.put_shard(req).await });
    tx.send(first).await.unwrap();
    for i in 0..12 {
        let chunk = big.shards[0].slice(i << 20..(i + 1) << 20);
        tx.send(proto::PutShardRequest {
            part: Some(proto::put_shard_request::Part::Chunk(chunk)),
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.kill9();
    assert!(call.await.unwrap().is_err(), "an interrupted upload must not be acknowledged");

    agent.restart();
    let mut c = agent.client(&signer).await;
    assert_eq!(c.get_shard(big.id(0), 0, 0).await.unwrap_err().code(), Code::NotFound);
    assert!(!agent.shard_file(&big.id(0)).exists());
    let tmp_left = std::fs::read_dir(agent.dir.join("tmp")).unwrap().count();
    assert_eq!(tmp_left, 0, "temp files of the aborted upload were not removed");
    for s in &acked {
        for i in 0..3 {
            let got = c.get_shard(s.id(i), 0, 0).await.unwrap();
            s.header.verify_shard(i as usize, &got.data).unwrap();
        }
    }
}

fn flip_byte(path: &std::path::Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
    f.sync_all().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_files_answer_data_loss_and_scrub_quarantines_them() {
    let dir = tmp();
    let mut agent = AgentProc::start(&dir.path().join("a"), &["--scrub-interval", "3600"]);
    let (me, signer) = signer();
    let mut c = agent.client(&signer).await;
    let segs: Vec<Seg> = (0..3).map(|i| segment(&me, 300_000 + i, 2, 1)).collect();
    for s in &segs {
        c.put_shard(&s.header_bytes, 0, s.shards[0].clone()).await.unwrap();
    }
    for s in &segs {
        flip_byte(&agent.shard_file(&s.id(0)), 70_000);
    }
    let err = c.get_shard(segs[0].id(0), 0, 10).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("quarantined"), "{}", err.message());
    let err = c.audit(segs[1].id(0), &[7; 16], 4).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    // Quarantined: no longer served or listed; kept for inspection.
    assert_eq!(c.get_shard(segs[0].id(0), 0, 0).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(std::fs::read_dir(agent.dir.join("quarantine")).unwrap().count(), 2);
    let m = agent.metrics();
    assert_eq!(metric(&m, "shardfarm_agent_corrupt_shards_total{found_by=\"get\"}"), Some(1.0));
    assert_eq!(metric(&m, "shardfarm_agent_corrupt_shards_total{found_by=\"audit\"}"), Some(1.0));
    assert_eq!(metric(&m, "shardfarm_agent_audits_total{result=\"corrupt\"}"), Some(1.0));

    // Restart with a 1 s scrub interval: the scrub finds the third.
    agent.terminate();
    agent.extra_args(&["--scrub-interval", "1"]);
    agent.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = agent.metrics();
        if metric(&m, "shardfarm_agent_corrupt_shards_total{found_by=\"scrub\"}") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "scrub did not find the corrupt shard:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = agent.client(&signer).await;
    assert_eq!(c.get_shard(segs[2].id(0), 0, 0).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(std::fs::read_dir(agent.dir.join("quarantine")).unwrap().count(), 3);
}

/// GetShard streams a shard while checking it: a corrupt shard of several chunks ends in
/// DataLoss before its last chunk, so no caller ever receives a complete corrupt shard, and it
/// is quarantined. An intact shard of several chunks still arrives whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_shard_never_streams_to_its_end() {
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &["--scrub-interval", "3600"]);
    let (me, signer) = signer();
    let mut c = agent.client(&signer).await;
    // RS(2,1) of 7 MiB: shards of 3.5 MiB, four 1 MiB chunks each.
    let bad = segment(&me, 7 << 20, 2, 1);
    let good = segment(&me, (7 << 20) + 1, 2, 1);
    for s in [&bad, &good] {
        c.put_shard(&s.header_bytes, 0, s.shards[0].clone()).await.unwrap();
    }
    flip_byte(&agent.shard_file(&bad.id(0)), 10);
    let err = c.get_shard(bad.id(0), 0, 0).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("quarantined"), "{}", err.message());
    assert_eq!(c.get_shard(bad.id(0), 0, 0).await.unwrap_err().code(), Code::NotFound);
    let got = c.get_shard(good.id(0), 0, 0).await.unwrap();
    assert_eq!(got.data.len(), good.shards[0].len());
    good.header.verify_shard(0, &got.data).unwrap();
    let m = agent.metrics();
    assert_eq!(metric(&m, "shardfarm_agent_corrupt_shards_total{found_by=\"get\"}"), Some(1.0));
    let data_loss = "shardfarm_agent_requests_total{method=\"GetShard\",result=\"data_loss\"}";
    assert_eq!(metric(&m, data_loss), Some(1.0), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn audits_verify_and_a_node_that_lost_the_shard_cannot_answer() {
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &[]);
    let (me, signer) = signer();
    let mut c = agent.client(&signer).await;
    let seg = segment(&me, 2 << 20, 2, 1);
    for i in 0..2u32 {
        c.put_shard(&seg.header_bytes, i, seg.shards[i as usize].clone()).await.unwrap();
    }
    let nonce = b"auditor nonce 123456";
    let ans = c.audit(seg.id(1), nonce, 6).await.unwrap();
    let header = SegmentHeader::decode(&ans.segment_header).unwrap();
    let leaves: Vec<ProvenLeaf> = ans
        .leaves
        .iter()
        .map(|l| ProvenLeaf {
            index: l.index as usize,
            data: l.data.to_vec(),
            proof: l.proof.iter().map(|p| p[..].try_into().unwrap()).collect(),
        })
        .collect();
    audit::verify_answer(&header, 1, nonce, 6, &leaves).unwrap();
    // Replaying that answer for a fresh nonce fails.
    assert!(audit::verify_answer(&header, 1, b"another nonce 654321", 6, &leaves).is_err());

    // The node loses shard 0's file: it cannot answer.
    std::fs::remove_file(agent.shard_file(&seg.id(0))).unwrap();
    let err = c.audit(seg.id(0), nonce, 6).await.unwrap_err();
    assert_eq!(err.code(), Code::DataLoss);
    // Nor for a shard it never had.
    assert_eq!(c.audit(seg.id(2), nonce, 6).await.unwrap_err().code(), Code::NotFound);
    // Bad challenge parameters.
    assert_eq!(c.audit(seg.id(1), b"short", 6).await.unwrap_err().code(), Code::InvalidArgument);
}

/// Sends Info with a hand-built envelope.
async fn info_with(agent: &AgentProc, signer: Signer, env: Envelope) -> tonic::Status {
    let env = env.to(agent.id());
    let req = env.sign(
        shardfarm_core::identity::Credential::from_bytes(&signer_credential(&signer)).unwrap(),
        signer.key(),
    );
    let mut md = tonic::metadata::MetadataMap::new();
    use shardfarm_proto::keys;
    use tonic::metadata::MetadataValue;
    md.insert_bin(keys::CREDENTIAL, MetadataValue::from_bytes(&req.credential.to_bytes()));
    md.insert_bin(keys::NONCE, MetadataValue::from_bytes(&req.envelope.nonce));
    md.insert_bin(keys::AUDIENCE, MetadataValue::from_bytes(&req.envelope.audience.0));
    md.insert(keys::TIMESTAMP, req.envelope.timestamp_ms.to_string().parse().unwrap());
    md.insert_bin(keys::SIGNATURE, MetadataValue::from_bytes(&req.signature.to_bytes()));
    let mut raw = agent.raw(&signer).await;
    let mut r = tonic::Request::new(proto::InfoRequest {});
    *r.metadata_mut() = md;
    raw.info(r).await.unwrap_err()
}

fn signer_credential(s: &Signer) -> Vec<u8> {
    // The test signer signs Info once to learn its credential bytes from the metadata.
    let r = s.request(NodeId([0; 32]), methods::INFO, proto::InfoRequest {});
    r.metadata().get_bin(shardfarm_proto::keys::CREDENTIAL).unwrap().to_bytes().unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_auth_failure_has_its_own_status_and_changes_nothing() {
    let dir = tmp();
    let (denied, denied_signer) = signer();
    let agent = AgentProc::start(
        &dir.path().join("a"),
        &["--deny", &denied.id().to_hex(), "--capacity", "4MiB", "--quota", "3MiB"],
    );
    let (me, s) = signer();
    let mut c = agent.client(&s).await;
    c.info().await.unwrap();

    // Signature by another key.
    let forged = Arc::new(Signer::raw(me.credential(), random_signing_key()));
    let err = agent.client(&forged).await.info().await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // The very same metadata twice on the signer's own TLS connection: bound to the key the
    // connection proved, the request is its holder's to send again (it could sign a new one);
    // no nonce is remembered for it (core::auth). Over plaintext it is a replay, refused.
    let req = s.request(agent.id(), methods::INFO, proto::InfoRequest {});
    let md = req.metadata().clone();
    let mut raw = agent.raw(&s).await;
    raw.info(req).await.unwrap();
    let mut again = tonic::Request::new(proto::InfoRequest {});
    *again.metadata_mut() = md;
    raw.info(again).await.unwrap();
    let plain = AgentProc::start(&dir.path().join("plain"), &["--insecure-plaintext"]);
    let ps = (*s).clone().with_security(shardfarm_proto::Security::InsecurePlaintext);
    let req = ps.request(plain.id(), methods::INFO, proto::InfoRequest {});
    let md = req.metadata().clone();
    let mut raw = plain.raw(&ps).await;
    raw.info(req).await.unwrap();
    let mut again = tonic::Request::new(proto::InfoRequest {});
    *again.metadata_mut() = md;
    let err = raw.info(again).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("replay"), "{}", err.message());

    // Stale timestamp.
    let mut env = Envelope::new(methods::INFO, &[]);
    env.timestamp_ms -= 3_600_000;
    let err = info_with(&agent, Signer::identity(&me), env).await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("clock"), "{}", err.message());

    // Identity below the pool's difficulty.
    let weak = loop {
        let id = Identity::from_parts(random_signing_key(), 0);
        if id.difficulty() < u32::from(DIFFICULTY) {
            break id;
        }
    };
    let err = agent.client(&Arc::new(Signer::identity(&weak))).await.info().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Denied identity.
    let err = agent.client(&denied_signer).await.info().await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Missing envelope.
    let err = raw.info(tonic::Request::new(proto::InfoRequest {})).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // A header whose signature is wrong.
    let seg = segment(&me, 1 << 20, 2, 1);
    let mut bad_header = seg.header_bytes.clone();
    let last = bad_header.len() - 1;
    bad_header[last] ^= 1;
    let err = c.put_shard(&bad_header, 0, seg.shards[0].clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // A payload whose hash does not match the header.
    let mut wrong = seg.shards[0].to_vec();
    wrong[100] ^= 1;
    let err = c.put_shard(&seg.header_bytes, 0, wrong.into()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("Merkle root"), "{}", err.message());
    // Too few bytes.
    let err = c.put_shard(&seg.header_bytes, 0, seg.shards[0].slice(..1000)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(c.get_shard(seg.id(0), 0, 0).await.unwrap_err().code(), Code::NotFound);

    // An oversized message (the limit is 8 MiB).
    let (tx, rx) = tokio::sync::mpsc::channel::<proto::PutShardRequest>(2);
    let first = proto::PutShardRequest {
        part: Some(proto::put_shard_request::Part::Header(proto::PutShardHeader {
            segment_header: seg.header_bytes.clone().into(),
            shard_index: 0,
        })),
    };
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    *req.metadata_mut() = s.request(agent.id(), methods::PUT, first.clone()).into_parts().0;
    tx.send(first).await.unwrap();
    tx.send(proto::PutShardRequest {
        part: Some(proto::put_shard_request::Part::Chunk(Bytes::from(vec![0u8; 9 << 20]))),
    })
    .await
    .unwrap();
    drop(tx);
    let mut raw_big = agent.raw(&s).await.max_encoding_message_size(64 << 20);
    let err = raw_big.put_shard(req).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert_eq!(c.get_shard(seg.id(0), 0, 0).await.unwrap_err().code(), Code::NotFound);

    // Store it properly, then a delete by someone else is refused and changes nothing.
    c.put_shard(&seg.header_bytes, 0, seg.shards[0].clone()).await.unwrap();
    let (_, other) = signer();
    let err = agent.client(&other).await.delete_shard(seg.id(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(c.get_shard(seg.id(0), 0, 0).await.unwrap().data, seg.shards[0]);

    // Quota (3 MiB per owner): a second 1 MiB+ shard fits, a 2 MiB one does not.
    c.put_shard(&seg.header_bytes, 1, seg.shards[1].clone()).await.unwrap();
    let big = segment(&me, 4 << 20, 2, 1);
    let err = c.put_shard(&big.header_bytes, 0, big.shards[0].clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("quota"), "{}", err.message());
    // Capacity (4 MiB): another owner's 2 MiB shard does not fit beside the 2 MiB stored.
    let (them, them_s) = signer();
    let theirs = segment(&them, 6 << 20, 2, 1);
    let err = agent
        .client(&them_s)
        .await
        .put_shard(&theirs.header_bytes, 0, theirs.shards[0].clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("full"), "{}", err.message());
    assert_eq!(std::fs::read_dir(agent.dir.join("tmp")).unwrap().count(), 0);

    let m = agent.metrics();
    for reason in [
        "bad_signature",
        "replay",
        "stale_timestamp",
        "insufficient_difficulty",
        "permission_denied",
        "malformed",
    ] {
        assert!(
            metric(&m, &format!("shardfarm_agent_auth_failures_total{{reason=\"{reason}\"}}"))
                .is_some(),
            "no auth failure counted for {reason}:\n{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_is_per_identity() {
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &["--rate-limit", "3"]);
    let (_, s) = signer();
    let mut c = agent.client(&s).await;
    let mut codes = Vec::new();
    for _ in 0..10 {
        codes.push(c.info().await.map(|_| Code::Ok).unwrap_or_else(|e| e.code()));
    }
    assert!(codes.contains(&Code::ResourceExhausted), "{codes:?}");
    // Another identity is not limited by the first one's use.
    let (_, s2) = signer();
    agent.client(&s2).await.info().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_root_past_its_request_rate_is_slowed_not_refused() {
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &["--requests-per-root", "50"]);
    let (_, s) = signer();
    let mut c = agent.client(&s).await;
    // 50 a second with a burst of 100: 200 requests take at least 2 s, and all succeed.
    let start = Instant::now();
    for _ in 0..200 {
        c.info().await.unwrap();
    }
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1900), "200 requests in {took:?}");
    // Another root is not held back by the first one's debt: it is answered at once.
    let (_, s2) = signer();
    agent.client(&s2).await.info().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let paced = metric(&agent.metrics(), "shardfarm_agent_requests_paced_total");
        if paced.is_some_and(|n| n > 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "no request was counted as paced");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_cleanly_and_restart_keeps_identity_and_data() {
    let dir = tmp();
    let mut agent = AgentProc::start(&dir.path().join("a"), &[]);
    let (me, s) = signer();
    let mut c = agent.client(&s).await;
    let seg = segment(&me, 1 << 20, 2, 1);
    c.put_shard(&seg.header_bytes, 2, seg.shards[2].clone()).await.unwrap();
    let before = agent.node_id.clone();
    assert!(http_get(&agent.http, "/readyz").contains("200"));
    assert!(http_get(&agent.http, "/healthz").contains("ok"));
    let status = agent.terminate();
    assert_eq!(status.code(), Some(0), "SIGTERM must exit 0");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.dir.join("identity.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    agent.restart();
    assert_eq!(agent.node_id, before, "identity must be reused");
    let mut c = agent.client(&s).await;
    assert_eq!(c.get_shard(seg.id(2), 0, 0).await.unwrap().data, seg.shards[2]);
    // A stranger asking for 2^32 hashes gets a refusal, not free CPU.
    let err = c.prove_capacity(&[9; 32], 32).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("8-20 bits"), "{}", err.message());
    let report = c.prove_capacity(&[9; 32], 8).await.unwrap();
    let r =
        shardfarm_core::capacity::CapacityReport::decode_verified(&report, Some(&[9; 32])).unwrap();
    assert_eq!(r.space_taken, seg.shards[2].len() as u64);
    let info = c.info().await.unwrap();
    assert_eq!(info.capacity_proof.unwrap().report.to_vec(), report);
    assert!(
        metric(&agent.metrics(), "shardfarm_agent_capacity_proof{input=\"capacity\"}").is_some()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_world_readable_identity_key_stops_the_agent_with_a_hint() {
    let dir = tmp();
    let d = dir.path().join("a");
    let mut agent = AgentProc::start(&d, &[]);
    agent.terminate();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.join("identity.key"), std::fs::Permissions::from_mode(0o644))
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shardfarm-agent"))
        .arg("--data-dir")
        .arg(&d)
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_error_that_proves_nothing_is_retried_not_quarantined() {
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &[]);
    let (me, signer) = signer();
    let mut c = agent.client(&signer).await;
    let seg = segment(&me, 1 << 20, 2, 1);
    c.put_shard(&seg.header_bytes, 0, seg.shards[0].clone()).await.unwrap();

    // The agent runs out of file descriptors (EMFILE): its soft RLIMIT_NOFILE drops to 3, so
    // any new descriptor fails while those it has stay open (the connection included).
    let pid = agent.child.id().to_string();
    let limit = |n: String| {
        let s = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--nofile={n}")])
            .status()
            .unwrap();
        assert!(s.success(), "prlimit failed");
    };
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let row: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    let (soft, hard) = (row[3], row[4]);
    limit(format!("3:{hard}"));
    let r = c.get_shard(seg.id(0), 0, 0).await;
    limit(format!("{soft}:{hard}"));
    let Err(err) = r else { panic!("the read succeeded without file descriptors") };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("could not be read"), "{}", err.message());
    let quarantined = std::fs::read_dir(dir.path().join("a/quarantine")).unwrap().count();
    assert_eq!(quarantined, 0, "a healthy shard was quarantined");
    let m = agent.metrics();
    assert_eq!(metric(&m, "shardfarm_agent_read_errors_total"), Some(1.0), "{m}");
    assert_eq!(
        metric(&m, "shardfarm_agent_corrupt_shards_total{found_by=\"get\"}"),
        Some(0.0),
        "{m}"
    );
    // With descriptors back, the same shard reads and verifies.
    let got = c.get_shard(seg.id(0), 0, 0).await.unwrap();
    assert_eq!(got.data, seg.shards[0]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upload_cannot_hold_the_nodes_capacity() {
    let dir = tmp();
    let agent = AgentProc::start(
        &dir.path().join("a"),
        &["--capacity", "4MiB", "--upload-idle-timeout", "8"],
    );
    let (me, signer) = signer();
    let seg = segment(&me, 6 << 20, 2, 1); // 3 MiB shards: one fits, two do not

    // The stranger opens an upload of shard 0, sends the header, and then nothing.
    let (tx, stalled) = stalled_upload(&agent, &me, &seg, 0).await;
    // On a loaded machine the stalled stream can take seconds to reach the node: wait until
    // the node counts it, rather than racing it with a fixed number of attempts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&agent.metrics(), "shardfarm_agent_uploads_in_flight") != Some(1.0) {
        assert!(Instant::now() < deadline, "the stalled upload never reached the node");
        assert!(!stalled.is_finished(), "the stalled upload ended: {:?}", stalled.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // While it holds its reservation, an honest upload of another 3 MiB does not fit…
    let mut c = agent.client(&signer).await;
    let mut refused = None;
    for _ in 0..50 {
        match c.put_shard(&seg.header_bytes, 1, seg.shards[1].clone()).await {
            Err(e) if e.code() == Code::ResourceExhausted => {
                refused = Some(e);
                break;
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => {
                // The stalled stream had not reached the node yet; undo and retry.
                assert!(c.delete_shard(seg.id(1)).await.unwrap());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let refused = refused.expect("the stalled upload never reserved its space");
    assert!(refused.message().contains("promised to uploads in flight"), "{}", refused.message());

    // …until the idle timeout aborts it and releases the reservation.
    let err = stalled.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let r = c.put_shard(&seg.header_bytes, 1, seg.shards[1].clone()).await.unwrap();
    assert_eq!(r.stored_bytes, seg.shards[1].len() as u64);
    drop(tx);
    let m = agent.metrics();
    assert_eq!(
        metric(
            &m,
            "shardfarm_agent_requests_total{method=\"PutShard\",result=\"deadline_exceeded\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

/// Opens an upload of slot `index` of `seg` that sends its header and then nothing; returns
/// the sender that keeps it open and the call's handle.
async fn stalled_upload(
    agent: &AgentProc,
    who: &Identity,
    seg: &Seg,
    index: u32,
) -> (
    tokio::sync::mpsc::Sender<proto::PutShardRequest>,
    tokio::task::JoinHandle<Result<tonic::Response<proto::PutShardResponse>, tonic::Status>>,
) {
    use proto::put_shard_request::Part;
    let first = proto::PutShardRequest {
        part: Some(Part::Header(proto::PutShardHeader {
            segment_header: seg.header_bytes.clone().into(),
            shard_index: index,
        })),
    };
    let mut md = tonic::metadata::MetadataMap::new();
    shardfarm_proto::sign_into(
        &mut md,
        agent.id(),
        methods::PUT,
        &first,
        &who.credential(),
        who.signing_key(),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(first).await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    *req.metadata_mut() = md;
    let mut raw = agent.raw(&Signer::identity(who)).await;
    (tx, tokio::spawn(async move { raw.put_shard(req).await }))
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_in_flight_are_limited_per_identity_and_freed_when_they_end() {
    let dir = tmp();
    let agent = AgentProc::start(
        &dir.path().join("a"),
        &["--max-uploads-per-identity", "2", "--upload-idle-timeout", "60"],
    );
    let (me, signer) = signer();
    let seg = segment(&me, 64 * 1024, 2, 2);
    let mut open = Vec::new();
    for i in 0..2 {
        open.push(stalled_upload(&agent, &me, &seg, i).await);
    }
    let mut c = agent.client(&signer).await;
    // Once both stalled streams hold their places (a third upload racing them would take
    // one), the next upload of this owner is refused.
    let in_flight =
        |n: f64| metric(&agent.metrics(), "shardfarm_agent_uploads_in_flight") == Some(n);
    for _ in 0..200 {
        if in_flight(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(in_flight(2.0), "{}", agent.metrics());
    let refused = c.put_shard(&seg.header_bytes, 2, seg.shards[2].clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("uploads in flight"), "{}", refused.message());
    // Another identity is not held up by this one's uploads.
    let (other, other_signer) = common::signer();
    let theirs = segment(&other, 64 * 1024, 2, 2);
    let mut c2 = agent.client(&other_signer).await;
    c2.put_shard(&theirs.header_bytes, 0, theirs.shards[0].clone()).await.unwrap();
    // The moment a stalled stream dies, its place is free again.
    let (tx, call) = open.pop().unwrap();
    drop(tx);
    let _ = call.await.unwrap();
    let mut stored = None;
    for _ in 0..100 {
        match c.put_shard(&seg.header_bytes, 2, seg.shards[2].clone()).await {
            Ok(r) => {
                stored = Some(r);
                break;
            }
            Err(e) if e.code() == Code::ResourceExhausted => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(stored.is_some(), "the ended upload still counted");
    let m = agent.metrics();
    assert!(
        metric(&m, "shardfarm_agent_uploads_refused_total{reason=\"per_identity\"}") >= Some(1.0),
        "{m}"
    );
    drop(open);
}

#[tokio::test(flavor = "multi_thread")]
async fn maximal_lengths_and_counts_are_refused_and_change_nothing() {
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &[]);
    let (me, signer) = signer();
    let mut c = agent.client(&signer).await;
    let seg = segment(&me, 64 * 1024, 2, 1);
    c.put_shard(&seg.header_bytes, 0, seg.shards[0].clone()).await.unwrap();
    let before = agent.metrics();

    // Headers whose lengths and counts are the largest their fields hold, validly signed by
    // the uploader: refused before anything is reserved or written.
    type Edit = fn(&mut SegmentHeader);
    let edits: [(&str, Edit); 6] = [
        ("shard_length", |h| h.shard_length = u64::MAX),
        ("object_length", |h| h.object_length = u64::MAX),
        ("segment_size", |h| h.segment_size = u64::MAX),
        ("segment_count", |h| h.segment_count = u32::MAX),
        ("segment_index", |h| h.segment_index = u32::MAX),
        ("k", |h| h.k = u16::MAX),
    ];
    for (what, edit) in edits {
        let mut h = seg.header.clone();
        edit(&mut h);
        h.sign(me.signing_key());
        let err = c.put_shard(&h.encode(), 1, seg.shards[1].clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }
    let err = c.put_shard(&seg.header_bytes, u32::MAX, seg.shards[1].clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "shard index: {err:?}");
    // Reads, audits, listings and capacity challenges with maximal numbers.
    let err = c.get_shard(seg.id(0), u64::MAX, u64::MAX).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let got = c.get_shard(seg.id(0), 1, u64::MAX).await.unwrap();
    assert_eq!(got.data, seg.shards[0][1..]);
    let err = c.audit(seg.id(0), &[1; 16], u32::MAX).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let p = shardfarm_core::shard::partition(&seg.header.object_id, 0, 256);
    let page = c.list_shards(p, None, u32::MAX).await.unwrap();
    assert_eq!(page.len(), 1);
    let err = c.list_shards(u32::MAX, None, 10).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c.prove_capacity(&[1; 32], u32::MAX).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Nothing changed: one shard, the same bytes used, nothing in flight.
    let after = agent.metrics();
    for series in ["shardfarm_agent_shards ", "shardfarm_agent_stored_bytes "] {
        assert_eq!(metric(&after, series), metric(&before, series), "{series}");
    }
    assert_eq!(metric(&after, "shardfarm_agent_shards "), Some(1.0));
    // And the node still takes an honest upload of the full size.
    c.put_shard(&seg.header_bytes, 1, seg.shards[1].clone()).await.unwrap();
}

/// A request captured on its way to node A and replayed at node B is refused by B, and
/// counted; at A the same request is answered. Rewriting its audience breaks its signature.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_for_one_node_replayed_at_another_is_refused() {
    let dir = tmp();
    let a = AgentProc::start(&dir.path().join("a"), &[]);
    let b = AgentProc::start(&dir.path().join("b"), &[]);
    let (me, s) = signer();
    let seg = segment(&me, 64 * 1024, 2, 1);
    let mut at_a = a.client(&s).await;
    at_a.put_shard(&seg.header_bytes, 0, seg.shards[0].clone()).await.unwrap();
    let mut at_b = b.client(&s).await;
    at_b.put_shard(&seg.header_bytes, 0, seg.shards[0].clone()).await.unwrap();

    // A deletion signed for A, captured (by A itself, say), and sent to B on the replayer's
    // own TLS connection: the envelope is not signed by the key the connection proved.
    let req = proto::DeleteShardRequest { key: Some(seg.id(0).into()) };
    let captured = s.request(a.id(), methods::DELETE, req.clone()).into_parts().0;
    let (_, replayer) = signer();
    let mut replayed = tonic::Request::new(req.clone());
    *replayed.metadata_mut() = captured.clone();
    let err = b.raw(&replayer).await.delete_shard(replayed).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("signer's own connection"), "{}", err.message());
    // Even on a connection proving the signer's key (as over --insecure-plaintext, where no
    // key is proved), the audience names A: B refuses it.
    let mut rb = b.raw(&s).await;
    let mut replayed = tonic::Request::new(req.clone());
    *replayed.metadata_mut() = captured.clone();
    let err = rb.delete_shard(replayed).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("addressed to node"), "{}", err.message());
    // With the audience rewritten to B, the signature no longer verifies.
    let mut redirected = captured.clone();
    redirected.insert_bin(
        shardfarm_proto::keys::AUDIENCE,
        tonic::metadata::MetadataValue::from_bytes(&b.id().0),
    );
    let mut r = tonic::Request::new(req.clone());
    *r.metadata_mut() = redirected;
    let err = rb.delete_shard(r).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("signature"), "{}", err.message());
    // B still holds its shard; A honours the request meant for it.
    assert!(at_b.get_shard(seg.id(0), 0, 0).await.is_ok());
    let m = b.metrics();
    assert_eq!(
        metric(&m, "shardfarm_agent_auth_failures_total{reason=\"wrong_audience\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "shardfarm_agent_auth_failures_total{reason=\"wrong_channel\"}"),
        Some(1.0),
        "{m}"
    );
    let mut ra = a.raw(&s).await;
    let mut to_a = tonic::Request::new(req);
    *to_a.metadata_mut() = captured;
    ra.delete_shard(to_a).await.unwrap();
    assert!(at_a.get_shard(seg.id(0), 0, 0).await.is_err());
}

/// A node answering at another node's address is refused: the caller pins the id it means to
/// reach, and the TLS handshake fails unless the peer proves that very key; the error names
/// both. A caller that proves no key gets no answer at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_answering_at_another_nodes_address_is_refused() {
    let dir = tmp();
    let a = AgentProc::start(&dir.path().join("a"), &[]);
    let b = AgentProc::start(&dir.path().join("b"), &[]);
    let (_, s) = signer();
    // B's address, A's id: B cannot prove A's key.
    let err = shardfarm_proto::AgentClient::connect(&b.grpc, a.id(), s.clone()).await.err();
    let why = shardfarm_proto::tls::why(&err.expect("the impostor is refused"));
    assert!(why.contains(&format!("is node {}, not node {}", b.id(), a.id())), "{why}");
    // The right pairing connects and answers.
    b.client(&s).await.info().await.unwrap();
    // Plaintext HTTP/2 to a TLS agent: no answer.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", b.grpc)).unwrap();
    let plain = plain.timeout(Duration::from_secs(5)).connect().await;
    if let Ok(ch) = plain {
        let mut raw = proto::agent_client::AgentClient::new(ch);
        let req = s.request(b.id(), methods::INFO, proto::InfoRequest {});
        assert!(raw.info(req).await.is_err(), "a plaintext call was answered");
    }
}

/// A peer that opens hundreds of TCP connections and never says a word (no TLS bytes, no key
/// needed) cannot shut honest callers out: it gets a few handshake slots for its address, the
/// rest of its connections are closed at once, and a caller from another address connects and
/// is answered within its dial deadline while the stalled connections are still open.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_from_one_address_do_not_shut_out_other_callers() {
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &[]);
    let (_, s) = signer();
    let target: std::net::SocketAddr = agent.grpc.parse().unwrap();
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        stalled.push(socket.connect(target).await.unwrap());
    }
    // Another address: connects, proves its key, is answered.
    let mut c = agent.client(&s).await;
    c.info().await.unwrap();
    // The stalled connections beyond the address's share were closed by the agent.
    let mut closed = 0;
    for conn in &stalled {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(20), conn.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => {}
        }
    }
    assert!(closed >= 300 - 16, "only {closed} of 300 stalled connections were closed");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_claiming_a_large_shard_reserves_one_step_and_a_trickle_is_cut_off() {
    let dir = tmp();
    let agent = AgentProc::start(
        &dir.path().join("a"),
        &["--capacity", "64MiB", "--upload-idle-timeout", "60", "--min-upload-rate", "64KiB"],
    );
    let (me, signer) = signer();
    // Two segments of four 16 MiB shards: eight uploads that claim 128 MiB together.
    let segs = [segment(&me, 16 << 20, 1, 3), segment(&me, 16 << 20, 1, 3)];
    let mut open = Vec::new();
    for seg in &segs {
        for i in 0..4 {
            open.push(stalled_upload(&agent, &me, seg, i).await);
        }
    }
    let in_flight = || metric(&agent.metrics(), "shardfarm_agent_uploads_in_flight");
    for _ in 0..200 {
        if in_flight() == Some(8.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(in_flight(), Some(8.0), "{}", agent.metrics());
    // They hold one 4 MiB step each, not what their headers claim: an honest 8 MiB shard
    // still fits beside them (with 128 MiB promised it would not).
    let (other, other_signer) = common::signer();
    let honest = segment(&other, 16 << 20, 2, 1);
    let mut c = agent.client(&other_signer).await;
    let r = c.put_shard(&honest.header_bytes, 0, honest.shards[0].clone()).await.unwrap();
    assert_eq!(r.stored_bytes, honest.shards[0].len() as u64);
    // Sending nothing is below the minimum rate: each is cut off after its first 10 s
    // window (not by the 60 s idle timeout, whose message differs), its reservation released.
    for (_tx, call) in open {
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("minimum upload rate"), "{}", err.message());
    }
    let m = agent.metrics();
    assert_eq!(metric(&m, "shardfarm_agent_uploads_refused_total{reason=\"too_slow\"}"), Some(8.0));
    assert_eq!(metric(&m, "shardfarm_agent_uploads_in_flight"), Some(0.0));
    // All of it is free again: the stranger's own shards now upload in full.
    let mut mine = agent.client(&signer).await;
    mine.put_shard(&segs[0].header_bytes, 0, segs[0].shards[0].clone()).await.unwrap();
}

/// Connections opened from the honest callers' own address and left idle (a full address's
/// worth, each with its own key) shut nobody out: once they have idled, a new caller takes
/// the place of the one idle longest, and those that never carried a request are closed.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_from_the_callers_own_address_do_not_shut_them_out() {
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &[]);
    let limit = shardfarm_proto::tls::MAX_CONNECTIONS_PER_ADDRESS;
    let mut idle = Vec::new();
    for _ in 0..limit {
        let (_, s) = signer();
        idle.push(agent.client(&s).await);
    }
    // The address is full; after the idle ones have idled, an honest caller gets in.
    tokio::time::sleep(shardfarm_proto::conns::EVICTABLE_AFTER + Duration::from_millis(500)).await;
    let (_, honest) = signer();
    let mut c = agent.client(&honest).await;
    c.info().await.unwrap();
    // Those that never carried a request are closed within the deadline (metrics every 2 s).
    let closed = |reason: &str| {
        metric(
            &agent.metrics(),
            &format!("shardfarm_agent_connections_closed_total{{reason=\"{reason}\"}}"),
        )
        .unwrap_or(0.0)
    };
    for _ in 0..200 {
        if closed("no_request") >= (limit - 1) as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed("when_full") >= 1.0, "{}", agent.metrics());
    assert!(closed("no_request") >= (limit - 1) as f64, "{}", agent.metrics());
    // The honest caller, which carried requests, keeps its connection.
    c.info().await.unwrap();
    drop(idle);
}

/// Tombstone spam: one identity deleting objects this node holds nothing of is limited to a
/// rate per owner root; deleting what is stored here is never limited, and other roots are
/// not held up.
#[tokio::test(flavor = "multi_thread")]
async fn tombstones_of_objects_held_nowhere_here_are_rate_limited_per_owner_root() {
    use shardfarm_core::tombstone::Tombstone;
    let dir = tmp();
    let agent = AgentProc::start(&dir.path().join("a"), &[]);
    let (me, signer) = signer();
    let mut c = agent.client(&signer).await;
    let seg = segment(&me, 4096, 2, 1);
    c.put_shard(&seg.header_bytes, 0, seg.shards[0].clone()).await.unwrap();
    let now = shardfarm_core::auth::now_ms();
    let mut refused = None;
    for i in 0..1000 {
        let t = Tombstone::sign(me.signing_key(), random_signing_key().to_bytes(), now);
        if let Err(e) = c.delete_object(&t.encode()).await {
            refused = Some((i, e));
            break;
        }
    }
    let (stored, err) = refused.expect("a thousand tombstones of nothing were all stored");
    assert!(stored >= shardfarm_agent::shard::FOREIGN_TOMBSTONES_BURST as usize, "{stored}");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("its share (1 × 10 per second)"), "{}", err.message());
    // Its own object stored here is deleted at once, budget or not.
    let t = Tombstone::sign(me.signing_key(), seg.header.salt, now);
    assert_eq!(c.delete_object(&t.encode()).await.unwrap(), 1);
    // Another root is not held up by this one.
    let (other, other_signer) = common::signer();
    let mut c2 = agent.client(&other_signer).await;
    let t = Tombstone::sign(other.signing_key(), random_signing_key().to_bytes(), now);
    c2.delete_object(&t.encode()).await.unwrap();
    let m = agent.metrics();
    assert!(metric(&m, "shardfarm_agent_tombstones_refused_total") >= Some(1.0), "{m}");
}
