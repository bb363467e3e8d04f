//! Tombstones: an uploader's signed word that an object is deleted.
//!
//! `rm` hands one to every node of the pool's layouts. A node that holds shards of the object
//! deletes them; every node keeps the tombstone until it expires and refuses puts and repairs
//! of the object meanwhile; repair copies tombstones between peers like shards, so a holder
//! that was down during the `rm` learns of it when it returns instead of resurrecting the
//! object. A tombstone verifies on its own — the object id must derive from the signer's key
//! and the salt ([`crate::shard::object_id_for`]) — so it can be forwarded by anyone.
//!
//! # Binary encoding (version 1, little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SFT1` |
//! | 4 | 32 | object id |
//! | 36 | 32 | uploader public key |
//! | 68 | 32 | salt |
//! | 100 | 8 | deleted at, unix ms |
//! | 108 | 64 | ed25519 signature by the uploader over every byte before it |

use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::identity::parse_key;
use crate::shard::object_id_for;
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"SFT1";
/// Encoded length.
pub const TOMBSTONE_LEN: usize = 172;
/// How long a tombstone is kept: longer than any layout move takes to complete (a move waits
/// for every new holder to repair; at the default 64 MiB/s repair rate even a 10 TB node
/// rebuilds in under two days) and longer than a node may be down before it is disqualified
/// and its data given up, so a returning holder always finds the tombstone before it could
/// hand its stale shards back.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How far in the future a tombstone's time may lie (clock skew).
const MAX_SKEW_MS: u64 = 5 * 60 * 1000;

/// A signed deletion of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tombstone {
    /// The deleted object.
    pub object_id: [u8; 32],
    /// Its uploader (the signer).
    pub uploader: VerifyingKey,
    /// The object's salt.
    pub salt: [u8; 32],
    /// When it was deleted, unix ms.
    pub deleted_ms: u64,
    /// The uploader's signature.
    pub signature: Signature,
}

impl Tombstone {
    /// Signs the deletion of the object `key` uploaded with `salt`.
    pub fn sign(key: &SigningKey, salt: [u8; 32], deleted_ms: u64) -> Self {
        let uploader = key.verifying_key();
        let mut t = Tombstone {
            object_id: object_id_for(&uploader, &salt),
            uploader,
            salt,
            deleted_ms,
            signature: Signature::from_bytes(&[0; 64]),
        };
        t.signature = key.sign(&t.unsigned_bytes());
        t
    }

    fn unsigned_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(TOMBSTONE_LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.object_id);
        b.extend_from_slice(self.uploader.as_bytes());
        b.extend_from_slice(&self.salt);
        b.extend_from_slice(&self.deleted_ms.to_le_bytes());
        b
    }

    /// The binary encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.unsigned_bytes();
        b.extend_from_slice(&self.signature.to_bytes());
        b
    }

    /// Parses and verifies: structure, self-certifying id, signature, and a time not in the
    /// future beyond clock skew (`now_ms`).
    pub fn decode(b: &[u8], now_ms: u64) -> Result<Self> {
        let bad = |what: &str| Error::Malformed(format!("tombstone: {what}"));
        if b.len() != TOMBSTONE_LEN {
            return Err(bad(&format!("{} bytes, expected {TOMBSTONE_LEN}", b.len())));
        }
        if &b[..4] != MAGIC {
            return Err(bad("bad magic"));
        }
        let t = Tombstone {
            object_id: b[4..36].try_into().unwrap(),
            uploader: parse_key(&b[36..68])?,
            salt: b[68..100].try_into().unwrap(),
            deleted_ms: u64::from_le_bytes(b[100..108].try_into().unwrap()),
            signature: Signature::from_bytes(b[108..].try_into().unwrap()),
        };
        if object_id_for(&t.uploader, &t.salt) != t.object_id {
            return Err(Error::ForgedObjectId);
        }
        t.uploader
            .verify_strict(&t.unsigned_bytes(), &t.signature)
            .map_err(|_| bad("signature does not verify for its uploader key"))?;
        if t.deleted_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(bad("deletion time is in the future"));
        }
        Ok(t)
    }

    /// When the tombstone may be forgotten, unix ms.
    pub fn expires_ms(&self) -> u64 {
        self.deleted_ms.saturating_add(TOMBSTONE_TTL.as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::random_signing_key;

    #[test]
    fn round_trips_and_binds_the_object_to_its_uploader() {
        let key = random_signing_key();
        let t = Tombstone::sign(&key, [3; 32], 1_000);
        let b = t.encode();
        assert_eq!(b.len(), TOMBSTONE_LEN);
        assert_eq!(Tombstone::decode(&b, 2_000).unwrap(), t);
        assert_eq!(t.object_id, object_id_for(&key.verifying_key(), &[3; 32]));
    }

    #[test]
    fn nobody_but_the_uploader_can_delete() {
        let victim = random_signing_key();
        let attacker = random_signing_key();
        let real = Tombstone::sign(&victim, [3; 32], 1_000);
        // The attacker's tombstone for the victim's id: the id does not derive from its key.
        let mut forged = Tombstone::sign(&attacker, [3; 32], 1_000);
        forged.object_id = real.object_id;
        forged.signature = attacker.sign(&forged.unsigned_bytes());
        assert!(matches!(Tombstone::decode(&forged.encode(), 2_000), Err(Error::ForgedObjectId)));
        // The victim's tombstone with the time changed: the signature fails.
        let mut b = real.encode();
        b[100] ^= 1;
        assert!(Tombstone::decode(&b, 2_000).is_err());
        for i in 0..b.len() {
            let mut b = real.encode();
            b[i] ^= 0x10;
            assert!(Tombstone::decode(&b, 2_000).is_err(), "byte {i}");
        }
    }

    #[test]
    fn truncated_future_and_foreign_bytes_are_refused() {
        let key = random_signing_key();
        let t = Tombstone::sign(&key, [3; 32], 10_000_000);
        assert!(Tombstone::decode(&t.encode()[..100], 10_000_000).is_err());
        assert!(Tombstone::decode(&t.encode(), 1_000).unwrap_err().to_string().contains("future"));
        assert!(Tombstone::decode(&[0; TOMBSTONE_LEN], 0).is_err());
    }
}
