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
    pools: RwLock<BTreeMap<String, Arc<Coordinator>>>,
}

impl Coordinators {
    /// Registers the coordinator of `pool`.
    pub fn insert(&self, pool: &str, c: Arc<Coordinator>) {
        self.pools.write().unwrap().insert(pool.to_string(), c);
    }

    fn get(&self, pool: &str) -> Option<Arc<Coordinator>> {
        self.pools.read().unwrap().get(pool).cloned()
    }
}

impl Fabric for Coordinators {
    fn members(&self, pool: &str) -> Vec<Member> {
        self.get(pool).map(|c| c.members()).unwrap_or_default()
    }

    fn layout(&self, pool: &str) -> Option<Layout> {
        self.get(pool)?.layout().map(|l| l.layout.clone())
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

    fn last_round(&self, pool: &str) -> (u64, f64) {
        self.get(pool).map_or((0, 0.0), |c| c.last_round())
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
