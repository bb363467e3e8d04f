//! The fuzz targets' bodies, one module per decoder of network or disk bytes: each is a plain
//! function of the input that returns when the target's properties hold and panics otherwise.
//!
//! Two callers run them. `fuzz/fuzz_targets/<target>.rs` hands each one to libFuzzer
//! (`bash scripts/fuzz.sh`, the coverage-guided campaign, an instrumented build of its own);
//! `tests/corpus.rs` replays every committed input of `fuzz/corpus/<target>/` through it in the
//! main workspace build, as an ordinary test of `bash scripts/test.sh`. So a decoder that
//! starts panicking on a seed or on a crash input once found (`regression-*`) fails the test
//! command, without cargo-fuzz or a second build of the dependency tree.

mod capability;
mod capacity_report;
mod coordinator_state;
mod credential;
mod ledger;
mod segment_header;
mod tombstone;

pub use capability::capability;
pub use capacity_report::capacity_report;
pub use coordinator_state::coordinator_state;
pub use credential::credential;
pub use ledger::ledger;
pub use segment_header::segment_header;
pub use tombstone::tombstone;

// ---- Public interface ----

/// A target: returns when its properties hold for the input, panics otherwise.
pub type Target = fn(&[u8]);

/// Every target by name: the name is its libFuzzer binary (`fuzz/Cargo.toml`), its corpus
/// directory (`fuzz/corpus/<name>/`) and its entry in `scripts/fuzz.sh`.
pub const ALL: [(&str, Target); 7] = [
    ("segment_header", segment_header),
    ("capability", capability),
    ("credential", credential),
    ("capacity_report", capacity_report),
    ("tombstone", tombstone),
    ("coordinator_state", coordinator_state),
    ("ledger", ledger),
];
