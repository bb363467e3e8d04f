//! The coordinator's state document (`coordinator.json`), loaded as the coordinator starts:
//! `Coordinator::open_with` over an in-memory `StateStore` holding the input, which runs the
//! real loader (`Persisted::load`), publishes the layout and computes the metrics.
//!
//! Input: the document's bytes. Properties: opening never panics; once open, a housekeeping
//! step (`tick`: uptime, standing, epoch, relayout, save) never panics; and the document it
//! saves opens again, with the same members. The ledger path cannot be written (an epoch the
//! tick closes fails to append), so the target never touches the disk.

use std::collections::BTreeSet;
use std::path::Path;

use crate::{MemStore, NO_LEDGER, coordinator_identity, pool_config};
use shardfarm_coordinator::Coordinator;

/// Runs the `coordinator_state` target on one input: returns when the properties hold, panics otherwise.
pub fn coordinator_state(data: &[u8]) {
    let store = MemStore::holding(data);
    let open = |s: &MemStore| {
        Coordinator::open_with(
            pool_config(),
            Box::new(s.clone()),
            Path::new(NO_LEDGER),
            coordinator_identity(),
        )
    };
    let Ok(c) = open(&store) else { return };
    let ids = |c: &Coordinator| c.members().iter().map(|m| m.id).collect::<BTreeSet<_>>();
    let before = ids(&c);
    let _ = (c.layout(), c.layout_problem(), c.reward_totals());
    c.tick(shardfarm_core::auth::now_ms());
    let saved = store.document().expect("a tick saves the state");
    let again = open(&MemStore::holding(&saved)).unwrap_or_else(|e| {
        panic!(
            "the coordinator cannot reopen the state it saved: {e}\n{}",
            String::from_utf8_lossy(&saved)
        )
    });
    assert_eq!(ids(&again), before);
}
