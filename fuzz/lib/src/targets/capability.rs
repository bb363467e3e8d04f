//! The read capability parser (`sf2:…` and the older `sf1:…`, `ReadCap::from_str`): what a
//! user pastes.
//!
//! Input: first byte 0x00 → the rest is a capability *payload* (version, pool length, pool,
//! id, key, uploader) that the target wraps with a valid checksum and base32, so the fuzzer
//! gets past the checksum; anything else → the whole input is the text (lossily UTF-8).
//! Properties: no panic; a parsed capability re-encodes to the canonical form of its text
//! (its prefix + lowercase body) and parses back to itself; its pool name is valid.

use crate::seeds::wrap_cap_payload;
use shardfarm_core::cap::ReadCap;

/// Runs the `capability` target on one input: returns when the properties hold, panics otherwise.
pub fn capability(data: &[u8]) {
    let text = match data.split_first() {
        Some((0, payload)) => wrap_cap_payload(payload),
        _ => String::from_utf8_lossy(data).into_owned(),
    };
    let Ok(cap) = text.parse::<ReadCap>() else { return };
    ReadCap::validate_pool(&cap.pool).expect("a parsed capability has a valid pool name");
    let encoded = cap.encode();
    let text = text.trim();
    let (prefix, body) = text.split_at(4);
    assert!(prefix == "sf1:" || prefix == "sf2:", "parsed text starts with {prefix}");
    assert_eq!(encoded, format!("{prefix}{}", body.to_ascii_lowercase()));
    assert_eq!(encoded.parse::<ReadCap>().expect("re-encoded capability parses"), cap);
    let _ = format!("{cap:?} {cap}");
}
