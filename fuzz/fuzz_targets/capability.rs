//! The read capability parser (`sf1:…`, `ReadCap::from_str`): what a user pastes.
//!
//! Input: first byte 0x00 → the rest is a capability *payload* (version, pool length, pool,
//! id, key, uploader) that the target wraps with a valid checksum and base32, so the fuzzer
//! gets past the checksum; anything else → the whole input is the text (lossily UTF-8).
//! Properties: no panic; a parsed capability re-encodes to the canonical form of its text
//! (`sf1:` + lowercase body) and parses back to itself; its pool name is valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardfarm_core::cap::ReadCap;
use shardfarm_fuzz::seeds::wrap_cap_payload;

fuzz_target!(|data: &[u8]| {
    let text = match data.split_first() {
        Some((0, payload)) => wrap_cap_payload(payload),
        _ => String::from_utf8_lossy(data).into_owned(),
    };
    let Ok(cap) = text.parse::<ReadCap>() else { return };
    ReadCap::validate_pool(&cap.pool).expect("a parsed capability has a valid pool name");
    let encoded = cap.encode();
    let body = text.trim().strip_prefix("sf1:").expect("parsed text starts with sf1:");
    assert_eq!(encoded, format!("sf1:{}", body.to_ascii_lowercase()));
    assert_eq!(encoded.parse::<ReadCap>().expect("re-encoded capability parses"), cap);
    let _ = format!("{cap:?} {cap}");
});
