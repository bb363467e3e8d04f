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

use serde::{Deserialize, Serialize};

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
        let claim = |m: &Member| m.capacity.max(0.0) as u64;
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
