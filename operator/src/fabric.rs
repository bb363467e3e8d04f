//! The [`Fabric`] the controllers see, backed by the coordinators this operator runs.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use shardfarm_core::identity::NodeId;
use shardfarm_core::placement::Layout;

use crate::controller::Fabric;
use shardfarm_coordinator::{Coordinator, Member};

/// Coordinators by pool name.
#[derive(Default)]
pub struct Coordinators {
    /// The running coordinators and when (unix ms) each was registered.
    pools: RwLock<BTreeMap<String, (Arc<Coordinator>, u64)>>,
    /// Pools this operator runs (or will, once their coordinator starts).
    expected: RwLock<std::collections::BTreeSet<String>>,
}

impl Coordinators {
    /// Declares that this operator runs `pool`: until its coordinator is registered, the
    /// pool's view is incomplete ([`Fabric::view`]), not empty.
    pub fn expect(&self, pool: &str) {
        self.expected.write().unwrap().insert(pool.to_string());
    }

    /// Registers the coordinator of `pool` (its state loaded).
    pub fn insert(&self, pool: &str, c: Arc<Coordinator>) {
        self.insert_at(pool, c, shardfarm_core::auth::now_ms());
    }

    /// Registers the coordinator of `pool` as started at `started_ms`.
    pub fn insert_at(&self, pool: &str, c: Arc<Coordinator>, started_ms: u64) {
        self.expect(pool);
        self.pools.write().unwrap().insert(pool.to_string(), (c, started_ms));
    }

    fn get(&self, pool: &str) -> Option<Arc<Coordinator>> {
        self.pools.read().unwrap().get(pool).map(|(c, _)| c.clone())
    }

    /// [`Fabric::view`] at `now_ms`.
    pub fn view_at(&self, pool: &str, now_ms: u64) -> Result<(), String> {
        let Some((c, started)) = self.pools.read().unwrap().get(pool).cloned() else {
            return if self.expected.read().unwrap().contains(pool) {
                Err(format!(
                    "pool {pool}'s coordinator has not started in this operator yet (it loads \
                     the pool's state, or mines its key, first)"
                ))
            } else {
                Ok(())
            };
        };
        let grace = c.config().grace_ms;
        if now_ms >= started.saturating_add(grace) {
            return Ok(());
        }
        let members = c.members();
        let silent = members.iter().filter(|m| m.last_seen_ms < started).count();
        if members.is_empty() || silent > 0 {
            return Err(format!(
                "pool {pool}'s coordinator started {}s ago and has heard from {} of its {} \
                 members since; its view is complete when all have reported or after {}s",
                now_ms.saturating_sub(started) / 1000,
                members.len() - silent,
                members.len(),
                grace / 1000
            ));
        }
        Ok(())
    }
}

impl Fabric for Coordinators {
    fn view(&self, pool: &str) -> Result<(), String> {
        self.view_at(pool, shardfarm_core::auth::now_ms())
    }

    fn members(&self, pool: &str) -> Vec<Member> {
        self.get(pool).map(|c| c.members()).unwrap_or_default()
    }

    fn layout(&self, pool: &str) -> Option<Layout> {
        self.get(pool)?.layout().map(|l| l.layout.clone())
    }

    fn degraded_shards(&self, pool: &str) -> u64 {
        // Recomputed from the coordinator's state on every one of its ticks.
        self.get(pool).map_or(0, |c| c.metrics.repair_backlog.get().max(0) as u64)
    }

    fn in_sync(&self, pool: &str) -> bool {
        self.get(pool).is_none_or(|c| c.layout().is_none_or(|l| l.previous.is_none()))
    }

    fn drain(&self, pool: &str, node: NodeId) {
        if let Some(c) = self.get(pool) {
            c.drain(&node);
        }
    }

    fn remove(&self, pool: &str, node: NodeId) {
        if let Some(c) = self.get(pool) {
            c.remove(&node);
        }
    }

    fn set_max_moves(&self, pool: &str, moves: Option<usize>) {
        if let Some(c) = self.get(pool) {
            c.set_max_transfers(moves);
        }
    }

    fn set_admission(&self, pool: &str, admission: shardfarm_coordinator::Admission) {
        if let Some(c) = self.get(pool) {
            c.set_admission(admission);
        }
    }

    fn set_farm(
        &self,
        pool: &str,
        farm: NodeId,
        labels: std::collections::BTreeMap<String, String>,
    ) {
        if let Some(c) = self.get(pool) {
            c.set_farm(farm, labels);
        }
    }

    fn remove_farm(&self, pool: &str, farm: &NodeId) {
        if let Some(c) = self.get(pool) {
            c.remove_farm(farm);
        }
    }

    fn undrain(&self, pool: &str, node: NodeId) {
        if let Some(c) = self.get(pool) {
            c.undrain(&node);
        }
    }

    fn config(&self, pool: &str) -> Option<shardfarm_coordinator::PoolConfig> {
        Some(self.get(pool)?.config().clone())
    }

    fn pool_id(&self, pool: &str) -> Option<NodeId> {
        Some(self.get(pool)?.identity().id())
    }

    fn delegate(
        &self,
        pool: &str,
        delegate: ed25519_dalek::VerifyingKey,
        expires: u64,
    ) -> Option<shardfarm_core::identity::Delegation> {
        let c = self.get(pool)?;
        Some(shardfarm_core::identity::Delegation::issue(c.identity(), delegate, expires))
    }

    fn earnings(&self, pool: &str, node: &NodeId) -> u64 {
        self.get(pool)
            .and_then(|c| {
                c.reward_totals().0.get(&node.to_hex()).map(|t| t.rw1.saturating_add(t.rw2))
            })
            .unwrap_or(0)
    }
}
