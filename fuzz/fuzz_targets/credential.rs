//! libFuzzer on `shardfarm_fuzz::targets::credential`; its input layout and properties are
//! documented in `fuzz/lib/src/targets/credential.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardfarm_fuzz::targets::credential(data));
