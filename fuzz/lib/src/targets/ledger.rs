//! The rewards ledger loader (`Ledger::from_text`, what `Ledger::open` runs on the file).
//!
//! Input: first byte mod 2 picks the mode, the rest is
//! - 0: the ledger file's text (lossily UTF-8), verified against the coordinator key of the
//!   corpus. If it loads, it has one entry per line, in sequence, and its totals compute;
//! - 1: epochs of rewards: repeatedly an epoch step (u8), a count (u8, mod 4) and that many
//!   rewards (node, farm: length byte and bytes; rw1, rw2, capacity as f64 bits, proven bytes:
//!   u64 each), two at most. The target appends them with `Ledger::append` to a scratch file,
//!   then `Ledger::open`s it: whatever the coordinator appended, it must be able to read back
//!   (the same entries), or it cannot start again.

use std::path::Path;

use crate::{Bytes, coordinator_identity, scratch_file};
use shardfarm_coordinator::economics::Reward;
use shardfarm_coordinator::ledger::Ledger;

const MAX_REWARDS: u8 = 2;

/// Runs the `ledger` target on one input: returns when the properties hold, panics otherwise.
pub fn ledger(data: &[u8]) {
    let Some((mode, rest)) = data.split_first() else { return };
    let id = coordinator_identity();
    let key = id.public_key();
    if mode % 2 == 0 {
        let text = String::from_utf8_lossy(rest);
        let Ok(l) = Ledger::from_text(Path::new("fuzz.jsonl"), &text, &key) else { return };
        assert_eq!(l.entries().len(), text.lines().count());
        for (i, e) in l.entries().iter().enumerate() {
            assert_eq!(e.seq, i as u64 + 1);
        }
        let _ = (l.by_node(), l.by_farm(), l.last_epoch());
        return;
    }
    let path = scratch_file("ledger.jsonl");
    let _ = std::fs::remove_file(&path);
    let mut ledger = Ledger::from_text(&path, "", &key).unwrap();
    let mut b = Bytes::new(rest);
    let mut epoch = 0u64;
    // At most MAX_REWARDS lines per input: each costs a signature and a verification, which
    // dominate the run time; two lines already cover chaining, within an epoch or across two.
    let mut budget = MAX_REWARDS;
    while !b.is_empty() && budget > 0 {
        epoch = epoch.wrapping_add(u64::from(b.u8()));
        let count = (b.u8() % 4).min(budget);
        budget -= count;
        let rewards: Vec<Reward> = (0..count)
            .map(|_| Reward {
                node: b.string(32),
                farm: b.string(32),
                rw1: b.u64(),
                rw2: b.u64(),
                capacity: f64::from_bits(b.u64()),
                proven_bytes: b.u64(),
            })
            .collect();
        let _ = ledger.append(epoch, &rewards, &id);
    }
    let back = Ledger::open(&path, &key);
    let _ = std::fs::remove_file(&path);
    let back = back.expect("the coordinator cannot read back the ledger it appended");
    assert_eq!(back.entries(), ledger.entries());
    let _ = (back.by_node(), back.by_farm(), back.last_epoch());
}
