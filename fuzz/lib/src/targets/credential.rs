//! Credentials and delegation certificates (`identity.rs`), and the request verifier
//! (`auth::Verifier::verify`) on a signed request built from fuzz bytes.
//!
//! Input: first byte mod 3 picks the mode, the rest is
//! - 0: `Credential::from_bytes`; if it parses, `to_bytes` gives the input back;
//! - 1: `Delegation::from_bytes`; if it parses, `to_bytes` gives the input back, and
//!   `verify` at a time and difficulty from the certificate itself does not panic;
//! - 2: a `SignedRequest`, laid out as: flags (bit 0: the target fills in the true body hash,
//!   so the fuzzer reaches the signature check; bit 1: verify for another method), minimum
//!   difficulty, server time (u64), credential length and bytes (when they do not parse: a
//!   mined credential of the fuzz key), method length and bytes, nonce (16), timestamp (u64),
//!   body hash (32), signature (64), body (the rest). `verify` must refuse it: nobody without
//!   the keys can sign a request, so an `Ok` is a forgery, and a panic is a crash.

use crate::Bytes;
use shardfarm_core::auth::{Envelope, SignedRequest, Verifier};
use shardfarm_core::identity::{Credential, Delegation, NodeId, blake2b256};

/// Runs the `credential` target on one input: returns when the properties hold, panics otherwise.
pub fn credential(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            if let Ok(c) = Credential::from_bytes(rest) {
                assert_eq!(c.to_bytes(), rest);
                let _ = (c.id(), c.root(), c.difficulty(), c.signing_key());
            }
        }
        1 => {
            if let Ok(d) = Delegation::from_bytes(rest) {
                assert_eq!(d.to_bytes(), rest);
                let _ = d.issuer_id();
                let _ = d.verify(rest[70], d.expires.wrapping_sub(u64::from(rest[71])));
            }
        }
        _ => request(rest),
    }
}

fn request(data: &[u8]) {
    let mut b = Bytes::new(data);
    let flags = b.u8();
    let min_difficulty = b.u8();
    let now_ms = b.u64();
    let cred_len = usize::from(b.u8());
    let credential = Credential::from_bytes(b.take(cred_len))
        .unwrap_or_else(|_| Credential::Mined { key: crate::fuzz_key().verifying_key(), nonce: 0 });
    let method = b.string(255);
    let nonce = b.array::<16>();
    let timestamp_ms = b.u64();
    let mut body_hash = b.array::<32>();
    let signature = ed25519_dalek::Signature::from_bytes(&b.array::<64>());
    let body = b.rest();
    if flags & 1 != 0 {
        body_hash = blake2b256(&[body]);
    }
    let audience = NodeId([0; 32]);
    let envelope = Envelope { audience, method: method.clone(), nonce, timestamp_ms, body_hash };
    let _ = envelope.signed_bytes();
    let req = SignedRequest { credential, envelope, signature };
    let called = if flags & 2 != 0 { format!("{method}/other") } else { method };
    let mut v = Verifier::new(min_difficulty, std::time::Duration::from_secs(300), 1000);
    if flags & 4 != 0 {
        // A server that checks audiences, addressed or not by the request.
        v = v.with_audience(NodeId([flags >> 3 & 1; 32]));
    }
    let r = v.verify(&req, &called, body, now_ms);
    assert!(r.is_err(), "a request nobody signed was accepted: {r:?}");
    let _ = r.unwrap_err().metric_label();
}
