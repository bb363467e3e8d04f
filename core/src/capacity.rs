//! Proof of capacity (from the decentralized-datacenter paper).
//!
//! A coordinator issues a random challenge and a difficulty; the node searches a nonce so
//! that `blake2b-256(challenge ‖ node key ‖ nonce)` has that many leading zero bits, timing
//! itself, and reports processors `P`, cores per processor `Q`, the time `t` in ms, an
//! overhead factor `o`, the disk space it offers `sR` and the space taken `sT`. The figure
//!
//! `C = P/Q·(√t·o) + (sR − sT)`
//!
//! is computed exactly as written and published beside its inputs, signed by the node. Anyone
//! checks the work in one hash and recomputes `C`.

use std::time::Instant;

use ed25519_dalek::{Signature, VerifyingKey};

use crate::identity::{Identity, blake2b256, leading_zero_bits, parse_key};
use crate::{Error, Result};

const DOMAIN: &[u8] = b"shardfarm-capacity-v1";

/// A signed capacity report.
#[derive(Clone, Debug, PartialEq)]
pub struct CapacityReport {
    /// The node's public key.
    pub node: VerifyingKey,
    /// The coordinator's challenge.
    pub challenge: Vec<u8>,
    /// Leading zero bits asked for.
    pub difficulty: u8,
    /// The solution.
    pub solution: u64,
    /// Processors (sockets).
    pub processors: u32,
    /// Cores per processor.
    pub cores_per_processor: u32,
    /// Time to solve, ms.
    pub solve_ms: u64,
    /// Overhead factor.
    pub overhead: f64,
    /// Disk space reported (offered), bytes.
    pub space_reported: u64,
    /// Disk space taken, bytes.
    pub space_taken: u64,
    /// When the report was made, unix ms.
    pub timestamp_ms: u64,
    /// Signature by `node` over everything above.
    pub signature: Signature,
}

/// `C = P/Q·(√t·o) + (sR − sT)`, exactly as the design writes it.
pub fn capacity_figure(p: u32, q: u32, t_ms: u64, o: f64, s_r: u64, s_t: u64) -> f64 {
    f64::from(p) / f64::from(q.max(1)) * ((t_ms as f64).sqrt() * o) + (s_r as f64 - s_t as f64)
}

fn pow_ok(challenge: &[u8], node: &VerifyingKey, solution: u64, difficulty: u8) -> bool {
    let h = blake2b256(&[challenge, node.as_bytes(), &solution.to_le_bytes()]);
    leading_zero_bits(&h) >= u32::from(difficulty)
}

/// Inputs of a report that the node measures itself.
#[derive(Clone, Copy, Debug)]
pub struct Machine {
    /// Processors (sockets).
    pub processors: u32,
    /// Cores per processor.
    pub cores_per_processor: u32,
    /// Overhead factor.
    pub overhead: f64,
    /// Space offered, bytes.
    pub space_reported: u64,
    /// Space taken, bytes.
    pub space_taken: u64,
}

impl CapacityReport {
    /// The figure C of this report.
    pub fn capacity(&self) -> f64 {
        capacity_figure(
            self.processors,
            self.cores_per_processor,
            self.solve_ms,
            self.overhead,
            self.space_reported,
            self.space_taken,
        )
    }

    /// Solves `challenge` at `difficulty` on one thread and signs the report.
    pub fn prove(id: &Identity, challenge: &[u8], difficulty: u8, m: Machine) -> Result<Self> {
        if !(1..=64).contains(&challenge.len()) || difficulty > 40 {
            return Err(Error::Malformed(format!(
                "capacity challenge of {} bytes at difficulty {difficulty}: need 1-64 bytes, ≤ 40 bits",
                challenge.len()
            )));
        }
        let node = id.public_key();
        let start = Instant::now();
        let solution = (0u64..)
            .find(|n| pow_ok(challenge, &node, *n, difficulty))
            .expect("u64 nonce space is not exhausted");
        let mut r = CapacityReport {
            node,
            challenge: challenge.to_vec(),
            difficulty,
            solution,
            processors: m.processors,
            cores_per_processor: m.cores_per_processor,
            solve_ms: start.elapsed().as_millis() as u64,
            overhead: m.overhead,
            space_reported: m.space_reported,
            space_taken: m.space_taken,
            timestamp_ms: crate::auth::now_ms(),
            signature: Signature::from_bytes(&[0; 64]),
        };
        r.signature = id.sign(&r.unsigned_bytes());
        Ok(r)
    }

    fn unsigned_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(DOMAIN.len() + 150 + self.challenge.len());
        b.extend_from_slice(DOMAIN);
        b.extend_from_slice(self.node.as_bytes());
        b.push(self.challenge.len() as u8);
        b.extend_from_slice(&self.challenge);
        b.push(self.difficulty);
        b.extend_from_slice(&self.solution.to_le_bytes());
        b.extend_from_slice(&self.processors.to_le_bytes());
        b.extend_from_slice(&self.cores_per_processor.to_le_bytes());
        b.extend_from_slice(&self.solve_ms.to_le_bytes());
        b.extend_from_slice(&self.overhead.to_le_bytes());
        b.extend_from_slice(&self.space_reported.to_le_bytes());
        b.extend_from_slice(&self.space_taken.to_le_bytes());
        b.extend_from_slice(&self.timestamp_ms.to_le_bytes());
        b
    }

    /// Encoding: the signed bytes followed by the signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.unsigned_bytes();
        b.extend_from_slice(&self.signature.to_bytes());
        b
    }

    /// Parses and verifies: signature, the work (one hash) and, if given, the challenge.
    pub fn decode_verified(b: &[u8], expected_challenge: Option<&[u8]>) -> Result<Self> {
        let bad = |w: &str| Error::Malformed(format!("capacity report: {w}"));
        let d = DOMAIN.len();
        if b.len() < d + 33 || &b[..d] != DOMAIN {
            return Err(bad("not a capacity report"));
        }
        let node = parse_key(&b[d..d + 32])?;
        let cl = usize::from(b[d + 32]);
        let rest = &b[d + 33..];
        // challenge, difficulty, solution, P, Q, t, o, sR, sT, timestamp, signature
        let want = cl + 1 + 8 + 4 + 4 + 8 + 8 + 8 + 8 + 8 + 64;
        if rest.len() != want {
            return Err(bad(&format!("{} bytes after the key, expected {want}", rest.len())));
        }
        let challenge = rest[..cl].to_vec();
        let mut o = cl;
        let mut take = |n: usize| {
            let s = &rest[o..o + n];
            o += n;
            s
        };
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap());
        let u32_of = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap());
        let difficulty = take(1)[0];
        let solution = u64_of(take(8));
        let processors = u32_of(take(4));
        let cores_per_processor = u32_of(take(4));
        let solve_ms = u64_of(take(8));
        let overhead = f64::from_le_bytes(take(8).try_into().unwrap());
        let space_reported = u64_of(take(8));
        let space_taken = u64_of(take(8));
        let timestamp_ms = u64_of(take(8));
        let signature = Signature::from_bytes(take(64).try_into().unwrap());
        let r = CapacityReport {
            node,
            challenge,
            difficulty,
            solution,
            processors,
            cores_per_processor,
            solve_ms,
            overhead,
            space_reported,
            space_taken,
            timestamp_ms,
            signature,
        };
        node.verify_strict(&r.unsigned_bytes(), &r.signature)
            .map_err(|_| bad("signature does not verify for the node key"))?;
        // A NaN or infinite overhead, or inputs whose C overflows, make a figure nobody can
        // rank nodes or share rewards by; and a coordinator that stored it could not read its
        // state back (JSON has no NaN: it is written as `null`).
        if !r.overhead.is_finite() || !r.capacity().is_finite() {
            return Err(bad(&format!(
                "overhead {} gives the capacity figure {}: it must be a finite number",
                r.overhead,
                r.capacity()
            )));
        }
        if !pow_ok(&r.challenge, &r.node, r.solution, r.difficulty) {
            return Err(bad("the solution does not meet the challenge's difficulty"));
        }
        if let Some(c) = expected_challenge
            && c != r.challenge
        {
            return Err(bad("answers another challenge"));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figure_is_computed_as_written() {
        // P=2, Q=8, t=400 ms, o=1.5, sR=1000, sT=250: 2/8·(20·1.5) + 750 = 7.5 + 750.
        assert_eq!(capacity_figure(2, 8, 400, 1.5, 1000, 250), 757.5);
        // Taken above reported goes negative, as written.
        assert_eq!(capacity_figure(1, 1, 0, 1.0, 10, 20), -10.0);
    }

    #[test]
    fn report_round_trips_and_forgeries_fail() {
        let (id, _) = Identity::generate(4, 1, &|_| {}).unwrap();
        let m = Machine {
            processors: 1,
            cores_per_processor: 2,
            overhead: 1.0,
            space_reported: 1 << 30,
            space_taken: 1 << 20,
        };
        let r = CapacityReport::prove(&id, b"challenge-1", 8, m).unwrap();
        let b = r.encode();
        let back = CapacityReport::decode_verified(&b, Some(b"challenge-1")).unwrap();
        assert_eq!(back, r);
        assert!(CapacityReport::decode_verified(&b, Some(b"challenge-2")).is_err());
        // Inflating the offered space breaks the signature.
        let mut forged = r.clone();
        forged.space_reported *= 2;
        assert!(CapacityReport::decode_verified(&forged.encode(), None).is_err());
        // A solution that does not meet the difficulty is refused even if signed.
        let mut lazy = r.clone();
        lazy.difficulty = 30;
        lazy.signature = id.sign(&lazy.unsigned_bytes());
        assert!(CapacityReport::decode_verified(&lazy.encode(), None).is_err());
    }

    /// Found by the `capacity_report` fuzz target: a validly signed report whose overhead is
    /// NaN (or whose figure overflows to infinity) was accepted; the coordinator then saved a
    /// state document with `"capacity":null` that it could not load again.
    #[test]
    fn non_finite_capacity_figures_are_refused() {
        let (id, _) = Identity::generate(0, 1, &|_| {}).unwrap();
        let m = Machine {
            processors: 1,
            cores_per_processor: 1,
            overhead: 1.0,
            space_reported: 1,
            space_taken: 0,
        };
        for (overhead, solve_ms) in
            [(f64::NAN, 1), (f64::INFINITY, 1), (f64::NEG_INFINITY, 1), (f64::MAX, u64::MAX)]
        {
            let mut r = CapacityReport::prove(&id, b"c", 0, m).unwrap();
            r.overhead = overhead;
            r.solve_ms = solve_ms;
            r.signature = id.sign(&r.unsigned_bytes());
            let err = CapacityReport::decode_verified(&r.encode(), None).unwrap_err();
            assert!(err.to_string().contains("finite"), "{overhead}: {err}");
        }
        // Large but finite figures, and negative ones (taken above reported), stay valid.
        let mut r = CapacityReport::prove(&id, b"c", 0, m).unwrap();
        r.overhead = 1e300;
        r.space_taken = u64::MAX;
        r.signature = id.sign(&r.unsigned_bytes());
        assert!(CapacityReport::decode_verified(&r.encode(), None).is_ok());
    }
}
