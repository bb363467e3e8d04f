//! libFuzzer on `shardfarm_fuzz::targets::capacity_report`; its input layout and properties are
//! documented in `fuzz/lib/src/targets/capacity_report.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardfarm_fuzz::targets::capacity_report(data));
