//! What the fuzz targets found, end to end: a coordinator must always be able to start again
//! on the state and ledger it wrote. (Unit-level regressions sit beside the code, in
//! `ledger.rs` and `core/src/capacity.rs`; the inputs are in `fuzz/corpus/`.)

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey};
use shardfarm_coordinator::economics::RewardConfig;
use shardfarm_coordinator::{Coordinator, JoinInput, PoolConfig, Refusal};
use shardfarm_core::auth::Caller;
use shardfarm_core::capacity::CapacityReport;
use shardfarm_core::identity::Identity;

const NOW: u64 = 1_700_000_000_000;

fn pool() -> PoolConfig {
    PoolConfig {
        pool: "regressions".into(),
        k: 2,
        m: 1,
        partitions: 16,
        min_difficulty: 0,
        capacity_difficulty: 0,
        rewards: RewardConfig { epoch_seconds: 60, ..RewardConfig::default() },
        ..PoolConfig::default()
    }
}

fn coordinator_identity() -> Identity {
    Identity::from_parts(SigningKey::from_bytes(&[0xc0; 32]), 0)
}

/// A report with exactly these figures, signed by `id` (what a node may send: it measures and
/// signs its own report).
fn report(id: &Identity, challenge: &[u8], solve_ms: u64, overhead: f64) -> Vec<u8> {
    let mut r = CapacityReport {
        node: id.public_key(),
        challenge: challenge.to_vec(),
        difficulty: 0, // the pool asks for none: any solution holds
        solution: 0,
        processors: 1,
        cores_per_processor: 2,
        solve_ms,
        overhead,
        space_reported: 10 << 30,
        space_taken: 1 << 20,
        timestamp_ms: NOW,
        signature: Signature::from_bytes(&[0; 64]),
    };
    let unsigned = r.encode();
    r.signature = id.signing_key().sign(&unsigned[..unsigned.len() - 64]);
    r.encode()
}

fn join(c: &Coordinator, seed: u8, zone: &str, overhead: f64) -> Result<(), Refusal> {
    let id = Identity::from_parts(SigningKey::from_bytes(&[seed; 32]), 0);
    let (challenge, _) = c.challenge(NOW).unwrap();
    let caller = Caller { credential: id.credential(), id: id.id(), root: id.id() };
    let input = JoinInput {
        grpc: format!("127.0.0.1:{}", 7000 + u16::from(seed)),
        http: format!("127.0.0.1:{}", 8000 + u16::from(seed)),
        labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
        // P = 1, Q = 2, t = 8 ms, o = 1, sR = 10 GiB, sT = 1 MiB: C = 10736369665.414213, a
        // figure serde_json's default parser reads back as …665.414211.
        capacity_report: report(&id, &challenge, 8, overhead),
        last_layout: None,
        farm_grant: Default::default(),
    };
    c.join(&caller, input, NOW).map(|_| ())
}

/// Found by the `ledger` fuzz target: an epoch's ledger lines carry each node's capacity
/// figure, and for ~8% of real figures serde_json's default float parser returned a
/// neighbouring value, so the line's signature did not verify when the coordinator restarted:
/// it refused to open its own ledger. Fixed by serde_json's `float_roundtrip` feature.
#[test]
fn a_coordinator_restarts_after_recording_fractional_capacities() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::open(pool(), dir.path(), coordinator_identity()).unwrap();
    for (seed, zone) in [(1, "z0"), (2, "z1"), (3, "z2")] {
        join(&c, seed, zone, 1.0).unwrap();
    }
    c.tick(NOW);
    c.tick(NOW + 61_000); // closes the epoch: one ledger line per node
    assert_eq!(c.reward_totals().0.len(), 3, "the epoch was not recorded");
    drop(c);
    let again = Coordinator::open(pool(), dir.path(), coordinator_identity())
        .unwrap_or_else(|e| panic!("the coordinator cannot start on its own files: {e}"));
    assert_eq!(again.members().len(), 3);
    assert_eq!(again.reward_totals().0.len(), 3);
}

/// Found by the `capacity_report` fuzz target: a validly signed report with a NaN (or
/// infinite) overhead was accepted; the member's capacity was saved as `null` and the
/// coordinator could not load its state again.
#[test]
fn a_non_finite_capacity_is_refused_at_join_and_the_state_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::open(pool(), dir.path(), coordinator_identity()).unwrap();
    join(&c, 1, "z0", 1.0).unwrap();
    for (seed, overhead) in [(2, f64::NAN), (3, f64::INFINITY)] {
        match join(&c, seed, "z1", overhead) {
            Err(Refusal::InvalidArgument(m)) => assert!(m.contains("finite"), "{m}"),
            other => panic!("overhead {overhead}: {other:?}"),
        }
    }
    c.tick(NOW);
    drop(c);
    let again = Coordinator::open(pool(), dir.path(), coordinator_identity()).unwrap();
    assert_eq!(again.members().len(), 1);
}
