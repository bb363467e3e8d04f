//! libFuzzer on `shardfarm_fuzz::targets::coordinator_state`; its input layout and properties are
//! documented in `fuzz/lib/src/targets/coordinator_state.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardfarm_fuzz::targets::coordinator_state(data));
