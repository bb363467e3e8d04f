//! libFuzzer on `shardfarm_fuzz::targets::tombstone`; its input layout and properties are
//! documented in `fuzz/lib/src/targets/tombstone.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardfarm_fuzz::targets::tombstone(data));
