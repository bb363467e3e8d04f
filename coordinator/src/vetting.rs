//! Vetting: what a node's own claims are worth before it has proven anything.
//!
//! A capacity proof is self-measured and a failure-domain label is self-declared; a mined
//! identity costs about a second. So until a node has passed [`VettingConfig::audits`] audits
//! (or is one of the pool's founders: it joined before the pool's first layout, or holds slots
//! in a layout recovered from the agents), placement:
//! - puts it in one shared pseudo failure domain, [`UNVETTED_DOMAIN`], whatever zone it
//!   claims: unvetted nodes together hold at most the per-domain cap of any partition (m, or 1
//!   when the pool has n domains or more), so never enough to leave a segment with fewer than
//!   k vetted holders;
//! - weighs it at most [`VettingConfig::weight`] × the average vetted node's weight, whatever
//!   capacity it claims: its share of all slots stays small.
//!
//! It also earns no capacity reward (RW1). Its standing and its RW2 follow its audits as for
//! any node.
//!
//! Delegated ids (Bitcloud's law): the delegated ids of one owner root count fully up to N,
//! the pool's average number of delegated ids per root; past it the i-th (in join order)
//! weighs `1 − log10(i / N)`, reaching 0 at 10·N ([`delegated_weight`]). The factor
//! multiplies the node's placement weight and its capacity reward (RW1).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shardfarm_core::identity::NodeId;

use crate::state::Member;

/// The failure domain placement gives every unvetted node (not a valid label value, so no
/// real zone can share it).
pub const UNVETTED_DOMAIN: &str = "(unvetted)";

/// How a pool vets newcomers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VettingConfig {
    /// Audits a newcomer must pass before its claims count (0: every node is vetted).
    pub audits: u64,
    /// An unvetted node's placement weight, as a fraction of the average vetted weight.
    pub weight: f64,
}

impl Default for VettingConfig {
    fn default() -> Self {
        VettingConfig { audits: 10, weight: 0.02 }
    }
}

impl VettingConfig {
    /// Whether `m`'s claims count.
    pub fn vetted(&self, m: &Member) -> bool {
        m.founding || m.audits_passed >= self.audits
    }

    /// Placement weight and failure domain of each of `members`, in order.
    pub fn placement(&self, members: &[&Member]) -> Vec<(u64, String)> {
        let factors = delegation_factors(members);
        let claim = |m: &Member| (m.capacity.max(0.0) * factors[&m.id]) as u64;
        let vetted: Vec<u64> =
            members.iter().filter(|m| self.vetted(m)).map(|m| claim(m)).collect();
        let average = if vetted.is_empty() {
            0.0
        } else {
            vetted.iter().map(|&c| c as f64).sum::<f64>() / vetted.len() as f64
        };
        // At least 1: a pool of unvetted nodes only (a new pool with vetting on and no
        // founders) still places, evenly.
        let ceiling = ((average * self.weight.clamp(0.0, 1.0)) as u64).max(1);
        members
            .iter()
            .map(|m| {
                if self.vetted(m) {
                    (claim(m), m.domain.clone())
                } else {
                    (claim(m).min(ceiling), UNVETTED_DOMAIN.to_string())
                }
            })
            .collect()
    }
}

/// The weight of a root's `i`-th delegated id (1-based, in join order) when the pool's
/// average is `n` delegated ids per root: 1 up to `n`, then `1 − log10(i / n)`, 0 from 10·n.
pub fn delegated_weight(i: usize, n: f64) -> f64 {
    let n = n.max(1.0);
    if (i as f64) <= n {
        return 1.0;
    }
    (1.0 - (i as f64 / n).log10()).clamp(0.0, 1.0)
}

/// [`delegated_weight`] of every one of `members` (1 for ids that are not delegated), with
/// N the average number of delegated ids per owner root among them.
pub fn delegation_factors(members: &[&Member]) -> BTreeMap<NodeId, f64> {
    let mut by_root: BTreeMap<NodeId, Vec<&Member>> = BTreeMap::new();
    for m in members.iter().filter(|m| m.delegated) {
        by_root.entry(m.root).or_default().push(m);
    }
    let n = if by_root.is_empty() {
        1.0
    } else {
        by_root.values().map(Vec::len).sum::<usize>() as f64 / by_root.len() as f64
    };
    let mut out: BTreeMap<NodeId, f64> = members.iter().map(|m| (m.id, 1.0)).collect();
    for ids in by_root.values_mut() {
        ids.sort_by_key(|m| (m.joined_ms, m.id));
        for (i, m) in ids.iter().enumerate() {
            out.insert(m.id, delegated_weight(i + 1, n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delegated_id_weight_curve() {
        let n = 8.0;
        assert_eq!(delegated_weight(7, n), 1.0, "N − 1");
        assert_eq!(delegated_weight(8, n), 1.0, "N");
        assert!((delegated_weight(16, n) - (1.0 - 2f64.log10())).abs() < 1e-12, "2N: 0.699");
        assert_eq!(delegated_weight(80, n), 0.0, "10N");
        assert_eq!(delegated_weight(800, n), 0.0, "beyond 10N");
        // Decreasing past N, and never below 0 or above 1 for any average.
        let w: Vec<f64> = (1..=100).map(|i| delegated_weight(i, n)).collect();
        assert!(w.windows(2).all(|p| p[1] <= p[0]), "{w:?}");
        assert_eq!(delegated_weight(1, 0.0), 1.0);
    }
}
