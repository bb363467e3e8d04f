//! The tombstone decoder (`Tombstone::decode`): an uploader's signed deletion, forwarded by
//! anyone and kept on every node.
//!
//! Input: first byte mod 2 picks the mode, the rest is
//! - 0: the encoded tombstone (172 bytes), then optionally the server time (u64; default
//!   far in the future). If it decodes, it re-encodes to its bytes, its id derives from its
//!   uploader and salt, it is not from the future and it expires after it was made;
//! - 1: signer key byte, salt (32), deletion time and server time (u64 each): the target signs
//!   the tombstone, which must decode exactly when it is not more than the allowed skew
//!   (5 minutes) in the future.

use crate::Bytes;
use shardfarm_core::shard::object_id_for;
use shardfarm_core::tombstone::{TOMBSTONE_LEN, Tombstone};

/// Tombstone's clock skew allowance (`MAX_SKEW_MS`, private there).
const SKEW_MS: u64 = 5 * 60 * 1000;

/// Runs the `tombstone` target on one input: returns when the properties hold, panics otherwise.
pub fn tombstone(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        let (t, now) = if rest.len() >= TOMBSTONE_LEN + 8 {
            let now =
                u64::from_le_bytes(rest[TOMBSTONE_LEN..TOMBSTONE_LEN + 8].try_into().unwrap());
            (&rest[..TOMBSTONE_LEN], now)
        } else {
            (rest, u64::MAX / 2)
        };
        let Ok(d) = Tombstone::decode(t, now) else { return };
        assert_eq!(d.encode(), t);
        assert_eq!(d.object_id, object_id_for(&d.uploader, &d.salt));
        assert!(d.deleted_ms <= now.saturating_add(SKEW_MS));
        assert!(d.expires_ms() >= d.deleted_ms);
        return;
    }
    let mut b = Bytes::new(rest);
    let key = crate::key(b.u8());
    let salt = b.array::<32>();
    let deleted_ms = b.u64();
    let now = b.u64();
    let t = Tombstone::sign(&key, salt, deleted_ms);
    let got = Tombstone::decode(&t.encode(), now);
    if deleted_ms <= now.saturating_add(SKEW_MS) {
        assert_eq!(got.expect("a fresh, validly signed tombstone must decode"), t);
    } else {
        assert!(got.is_err(), "a tombstone from the future was accepted");
    }
}
