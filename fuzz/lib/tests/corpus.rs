//! Replays every committed fuzz input, the seeds and the crash inputs once found
//! (`regression-*`), through its target's function, in the ordinary test build: one test per
//! target, each reading every file of `fuzz/corpus/<target>/`.
//!
//! This is how the test command keeps every decoder covered by its committed inputs without
//! cargo-fuzz and a second, instrumented build of the dependency tree (14 minutes on 2 cores).
//! The coverage-guided search for new inputs is `bash scripts/fuzz.sh`, run by hand or as a
//! separate CI-length job; what it finds is committed to `fuzz/corpus/<target>/` and replayed
//! here from then on.
//!
//! So coverage cannot vanish silently, a target whose directory is missing or empty fails, and
//! `every_target_is_replayed` fails when a target is added in one place only: the targets'
//! functions, the libFuzzer binaries, the corpus directories and `scripts/fuzz.sh` must all
//! name the same targets as the tests below.

use std::any::Any;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use shardfarm_fuzz::targets;

/// `fuzz/`, beside this crate.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The text a panic carried.
fn panic_message(p: &(dyn Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".into())
}

/// Runs target `name` on every file of `fuzz/corpus/<name>/`; fails naming every input that
/// panicked, and when there is no input at all.
fn replay(name: &str) {
    let (_, target) = targets::ALL
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no target {name} in shardfarm_fuzz::targets::ALL"));
    let dir = fuzz_dir().join("corpus").join(name);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!("{}: {e}: every target needs its committed inputs", dir.display())
    });
    let mut files: Vec<PathBuf> =
        entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "{} holds no input: every target needs its committed seeds (cargo run -p shardfarm-fuzz --example seeds)",
        dir.display()
    );
    let started = Instant::now();
    let mut failures = Vec::new();
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if let Err(p) = std::panic::catch_unwind(|| target(&data)) {
            failures.push(format!("{}: {}", file.display(), panic_message(&*p)));
        }
    }
    let regressions = files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n.to_string_lossy().starts_with("regression-")))
        .count();
    eprintln!(
        "{name}: {} inputs ({regressions} regression) replayed in {:.3} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{name}: {} of {} committed inputs panic (each panic is printed above):\n  {}",
        failures.len(),
        files.len(),
        failures.join("\n  ")
    );
}

/// One test per target, and the list of them for `every_target_is_replayed`.
macro_rules! replay_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                replay(stringify!($name));
            }
        )*
        const REPLAYED: &[&str] = &[$(stringify!($name)),*];
    };
}

replay_tests!(
    segment_header,
    capability,
    credential,
    capacity_report,
    tombstone,
    coordinator_state,
    ledger,
);

/// The names in a directory (file stems with `strip`: `ledger.rs` → `ledger`).
fn names_in(dir: &Path, strip: Option<&str>) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| match strip {
            Some(ext) => n.strip_suffix(ext).map(str::to_string),
            None => Some(n),
        })
        .collect()
}

#[test]
fn every_target_is_replayed() {
    let replayed: BTreeSet<String> = REPLAYED.iter().map(|s| s.to_string()).collect();
    let fuzz = fuzz_dir();
    let functions = targets::ALL.iter().map(|(n, _)| n.to_string()).collect();
    let binaries = names_in(&fuzz.join("fuzz_targets"), Some(".rs"));
    let corpora = names_in(&fuzz.join("corpus"), None);
    // `[[bin]]` sections of fuzz/Cargo.toml: cargo-fuzz builds only what is declared there.
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    let declared = manifest
        .split("[[bin]]")
        .skip(1)
        .filter_map(|s| s.lines().find_map(|l| l.trim().strip_prefix("name = ")))
        .map(|n| n.trim_matches('"').to_string())
        .collect();
    // scripts/fuzz.sh: `ALL_TARGETS=(a b c)`.
    let script = std::fs::read_to_string(fuzz.join("../scripts/fuzz.sh")).unwrap();
    let campaign = script
        .lines()
        .find_map(|l| l.strip_prefix("ALL_TARGETS=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("scripts/fuzz.sh sets ALL_TARGETS=(…) on one line")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    for (what, names) in [
        ("shardfarm_fuzz::targets::ALL", functions),
        ("fuzz/fuzz_targets/*.rs", binaries),
        ("[[bin]] of fuzz/Cargo.toml", declared),
        ("fuzz/corpus/*/", corpora),
        ("ALL_TARGETS of scripts/fuzz.sh", campaign),
    ] {
        assert_eq!(names, replayed, "{what} (left) and the replay tests (right) differ");
    }
}
