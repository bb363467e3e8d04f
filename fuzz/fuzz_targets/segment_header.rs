//! libFuzzer on `shardfarm_fuzz::targets::segment_header`; its input layout and properties are
//! documented in `fuzz/lib/src/targets/segment_header.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardfarm_fuzz::targets::segment_header(data));
