//! The capacity report decoder (`CapacityReport::decode_verified`): a joining node's proof.
//!
//! Input: first byte mod 2 picks the mode, the rest is
//! - 0: an encoded report, decoded as it is. If it verifies, it re-encodes to the input and
//!   verifies against its own challenge but not another one;
//! - 1: the fields of a report — challenge length and bytes, difficulty, solution (u64),
//!   processors, cores (u32), solve ms (u64), overhead (f64 bits), space reported, taken,
//!   timestamp (u64), and a byte whose bit 0 asks to check the challenge — which the target
//!   signs with the fuzz key. The decoder must then accept it exactly when the proof of work
//!   holds and what it reports is usable; whatever it accepts has a finite capacity figure `C`
//!   (the coordinator stores `C` in its JSON state, where a NaN or infinity becomes `null` and
//!   the state no longer loads).

use crate::Bytes;
use ed25519_dalek::Signer;
use shardfarm_core::capacity::CapacityReport;
use shardfarm_core::identity::{blake2b256, leading_zero_bits};

/// Runs the `capacity_report` target on one input: returns when the properties hold, panics otherwise.
pub fn capacity_report(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let Ok(r) = CapacityReport::decode_verified(rest, None) else { return };
        assert_eq!(r.encode(), rest);
        assert!(r.capacity().is_finite(), "accepted a report with C = {}", r.capacity());
        assert!(CapacityReport::decode_verified(rest, Some(&r.challenge)).is_ok());
        let mut other = r.challenge.clone();
        other.push(0);
        assert!(CapacityReport::decode_verified(rest, Some(&other)).is_err());
        return;
    }
    let mut b = Bytes::new(rest);
    let key = crate::fuzz_key();
    let challenge_len = usize::from(b.u8());
    let mut r = CapacityReport {
        node: key.verifying_key(),
        challenge: b.take(challenge_len).to_vec(),
        difficulty: b.u8(),
        solution: b.u64(),
        processors: b.u32(),
        cores_per_processor: b.u32(),
        solve_ms: b.u64(),
        overhead: f64::from_bits(b.u64()),
        space_reported: b.u64(),
        space_taken: b.u64(),
        timestamp_ms: b.u64(),
        signature: ed25519_dalek::Signature::from_bytes(&[0; 64]),
    };
    let check_challenge = b.u8() & 1 != 0;
    let unsigned = r.encode();
    r.signature = key.sign(&unsigned[..unsigned.len() - 64]);
    let bytes = r.encode();
    let expected = check_challenge.then_some(&r.challenge[..]);
    let got = CapacityReport::decode_verified(&bytes, expected);
    let pow =
        blake2b256(&[&r.challenge, key.verifying_key().as_bytes(), &r.solution.to_le_bytes()]);
    let work_done = leading_zero_bits(&pow) >= u32::from(r.difficulty);
    match got {
        Ok(back) => {
            assert!(work_done, "accepted a solution below the difficulty");
            assert_eq!(back.encode(), bytes);
            assert!(back.capacity().is_finite(), "accepted a report with C = {}", back.capacity());
        }
        Err(e) => {
            assert!(
                !work_done || !r.overhead.is_finite() || !r.capacity().is_finite(),
                "refused a valid report: {e}"
            );
        }
    }
}
