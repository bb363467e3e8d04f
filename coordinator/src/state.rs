//! The coordinator's durable state: members, the current and previous layouts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shardfarm_core::auth::Caller;
use shardfarm_core::identity::NodeId;
use shardfarm_core::placement::Layout;

use crate::economics::{AuditScore, ReputationConfig, Standing, Uptime};
use crate::store::StateStore;
use crate::{Error, Result};

/// File name of the state in the coordinator's dir.
pub const STATE_FILE: &str = "coordinator.json";
/// Format version of the state file.
const VERSION: u32 = 1;

/// One member of the pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// Owner root.
    pub root: NodeId,
    /// Joined with a delegated id.
    pub delegated: bool,
    /// gRPC address.
    pub grpc: String,
    /// HTTP address.
    pub http: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Failure-domain value.
    pub domain: String,
    /// C of the latest capacity proof.
    pub capacity: f64,
    /// Disk space offered (sR), bytes.
    pub offered_bytes: u64,
    /// Bytes stored (last report).
    pub used_bytes: u64,
    /// Shards stored.
    pub shards: u64,
    /// Scrub errors reported.
    pub scrub_errors: u64,
    /// Shards still to rebuild.
    pub repair_backlog: u64,
    /// Newest layout fully repaired for.
    pub synced_version: u64,
    /// First joined, unix ms.
    pub joined_ms: u64,
    /// Last heard from, unix ms.
    pub last_seen_ms: u64,
    /// Heard from within the grace period.
    pub up: bool,
    /// Standing.
    pub standing: Standing,
    /// Audit reputation.
    pub audit: AuditScore,
    /// 7-day uptime.
    pub uptime: Uptime,
    /// Audits passed, ever.
    pub audits_passed: u64,
    /// Audits failed, ever.
    pub audits_failed: u64,
    /// Audits passed this epoch.
    pub epoch_passed: u64,
    /// Audits asked this epoch.
    pub epoch_total: u64,
    /// Segments of its slots it reports as lost (fewer than k shards anywhere).
    #[serde(default)]
    pub lost_segments: u64,
    /// Handing its slots away (scale down, drain list).
    #[serde(default)]
    pub draining: bool,
    /// One of the pool's founders: joined before its first layout, or held slots in a layout
    /// recovered from the agents. Founders are vetted without audits (see `vetting`).
    #[serde(default)]
    pub founding: bool,
    /// Newest layout version whose new slots the coordinator checked it holds (by sampling,
    /// `Auditor::verify_sync`): its report of `synced_version` alone drops no fallback.
    #[serde(default)]
    pub verified_version: u64,
    /// Where its failure domain came from: `farm <key>`, `syndication` or `owner root`.
    #[serde(default)]
    pub domain_from: String,
}

impl Member {
    /// It says it has repaired for `version`, and the coordinator checked it.
    pub fn in_sync(&self, version: u64) -> bool {
        self.synced_version >= version && self.verified_version >= version
    }

    /// A new member admitted as `caller` at `now_ms`.
    pub fn new(caller: &Caller, now_ms: u64, cfg: &ReputationConfig) -> Self {
        Member {
            id: caller.id,
            root: caller.root,
            delegated: false,
            grpc: String::new(),
            http: String::new(),
            labels: BTreeMap::new(),
            domain: String::new(),
            capacity: 0.0,
            offered_bytes: 0,
            used_bytes: 0,
            shards: 0,
            scrub_errors: 0,
            repair_backlog: 0,
            lost_segments: 0,
            synced_version: 0,
            joined_ms: now_ms,
            last_seen_ms: now_ms,
            up: true,
            standing: Standing::Active,
            audit: AuditScore::new(cfg),
            uptime: Uptime::default(),
            audits_passed: 0,
            audits_failed: 0,
            epoch_passed: 0,
            epoch_total: 0,
            draining: false,
            founding: false,
            domain_from: String::new(),
            verified_version: 0,
        }
    }

    /// Marks the node heard from now.
    pub(super) fn seen(&mut self, now_ms: u64) {
        self.last_seen_ms = now_ms;
        self.up = true;
    }

    /// The farm it belongs to: its `farm` label, else its failure domain.
    pub fn farm(&self) -> String {
        self.labels.get("farm").cloned().unwrap_or_else(|| self.domain.clone())
    }

    /// The values of its per-node metric labels (`crate::metrics::NODE_LABELS`): the name its
    /// agent is scraped under (its `pod` label, which only a farm's own agents keep; else its
    /// short id), its short id, its farm.
    pub fn metric_labels(&self) -> [String; 3] {
        let short = self.id.short();
        let name = self.labels.get("pod").cloned().unwrap_or_else(|| short.clone());
        [name, short, self.farm()]
    }
}

/// Everything the coordinator keeps.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Persisted {
    pub version: u32,
    /// Members by hex id.
    pub nodes: BTreeMap<String, Member>,
    pub layout: Option<Layout>,
    pub previous: Option<Layout>,
    pub layout_published_ms: u64,
    /// The epoch being accumulated.
    pub epoch: Option<u64>,
    /// Transfers the last layout round deferred.
    pub deferred: usize,
    /// Sequence number of the last signed publication: the next one is
    /// `max(publication + 1, now_ms)`, so it increases across restarts even when the newest
    /// number was not written before a crash.
    #[serde(default)]
    pub publication: u64,
    #[serde(skip)]
    pub dirty: bool,
    #[serde(skip)]
    pub saved_ms: u64,
    #[serde(skip)]
    pub last_tick_ms: Option<u64>,
    #[serde(skip)]
    pub problem: Option<String>,
    /// Set while a coordinator that started with no state waits for its agents to present
    /// the newest layout the pool key signed (see `Coordinator::finish_recovery`).
    #[serde(skip)]
    pub recovery: Option<Recovery>,
}

/// A coordinator recovering its layout from its agents.
#[derive(Debug, Default)]
pub(super) struct Recovery {
    /// Give up waiting for the nodes the recovered layout names at this time (unix ms).
    pub until_ms: u64,
    /// The newest layout signed by the pool key that a joining node presented.
    pub best: Option<shardfarm_proto::PublishedLayout>,
}

impl Persisted {
    /// Reads the state from `store` (a fresh state when it holds none).
    pub fn load(store: &dyn StateStore) -> Result<Self> {
        let Some(bytes) = store.load()? else {
            return Ok(Persisted { version: VERSION, dirty: true, ..Default::default() });
        };
        let where_ = store.describe();
        let mut st: Persisted =
            serde_json::from_slice(&bytes).map_err(|e| Error::State(format!("{where_}: {e}")))?;
        if st.version != VERSION {
            return Err(Error::State(format!(
                "{where_} has version {}; this build reads version {VERSION}",
                st.version
            )));
        }
        for (what, layout) in [("layout", &st.layout), ("previous layout", &st.previous)] {
            if let Some(l) = layout {
                check_layout(l).map_err(|e| Error::State(format!("{where_}: {what}: {e}")))?;
            }
        }
        // Everyone is presumed up again after a restart of the coordinator; the grace period
        // runs from now.
        let now = shardfarm_core::auth::now_ms();
        for m in st.nodes.values_mut() {
            m.last_seen_ms = m.last_seen_ms.max(now);
        }
        Ok(st)
    }

    /// Every holder of the current layout has repaired for it.
    pub fn in_sync(&self) -> bool {
        let Some(l) = &self.layout else { return true };
        let holders: std::collections::BTreeSet<&NodeId> = l.partitions.iter().flatten().collect();
        holders
            .into_iter()
            .all(|id| self.nodes.get(&id.to_hex()).is_some_and(|m| m.in_sync(l.version)))
    }

    /// The slots `node` holds in the current layout that it did not hold in the fallback (all
    /// of them when there is none): what it had to copy, and what a sync check samples.
    pub fn gained(&self, node: &NodeId) -> Vec<(u32, usize)> {
        let Some(l) = &self.layout else { return Vec::new() };
        l.slots_of(node)
            .into_iter()
            .filter(|&(p, s)| {
                self.previous.as_ref().is_none_or(|prev| {
                    prev.partitions.get(p as usize).and_then(|h| h.get(s)) != Some(node)
                })
            })
            .collect()
    }
}

/// What the layout engine relies on of a layout it continues from (`placement::compute` reuses
/// the previous layout's slots by index): n = k + m holders in every partition, and a version
/// that can still be incremented. A document that breaks this was not written by a coordinator
/// (found by the `coordinator_state` fuzz target: an extra holder made the next relayout index
/// out of bounds).
fn check_layout(l: &Layout) -> std::result::Result<(), String> {
    if let Some((p, h)) = l.partitions.iter().enumerate().find(|(_, h)| h.len() != l.n()) {
        return Err(format!(
            "partition {p} has {} holders, not k + m = {} (the file is damaged)",
            h.len(),
            l.n()
        ));
    }
    if l.version == u64::MAX {
        return Err("version is u64::MAX: no later layout can follow (the file is damaged)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Doc(Vec<u8>);

    impl StateStore for Doc {
        fn load(&self) -> Result<Option<Vec<u8>>> {
            Ok(Some(self.0.clone()))
        }
        fn save(&self, _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "doc".into()
        }
    }

    fn with_layout(partitions: Vec<Vec<NodeId>>, version: u64) -> Doc {
        let st = Persisted {
            version: VERSION,
            layout: Some(Layout { version, k: 2, m: 1, partitions }),
            ..Default::default()
        };
        Doc(serde_json::to_vec(&st).unwrap())
    }

    /// Found by the `coordinator_state` fuzz target: a partition with k + m + 1 holders loaded
    /// fine and the next relayout panicked (index out of bounds in `placement::compute`).
    #[test]
    fn damaged_layouts_are_refused_on_load() {
        let ids: Vec<NodeId> = (1..=4u8).map(|i| NodeId([i; 32])).collect();
        let good = vec![ids[..3].to_vec(), ids[1..].to_vec()];
        assert!(Persisted::load(&with_layout(good.clone(), 7)).is_ok());

        let extra = vec![ids[..3].to_vec(), ids.clone()];
        let err = Persisted::load(&with_layout(extra, 7)).unwrap_err().to_string();
        assert!(err.contains("partition 1 has 4 holders, not k + m = 3"), "{err}");

        let short = vec![ids[..2].to_vec(), ids[1..].to_vec()];
        assert!(Persisted::load(&with_layout(short, 7)).is_err());

        let err = Persisted::load(&with_layout(good, u64::MAX)).unwrap_err().to_string();
        assert!(err.contains("u64::MAX"), "{err}");
    }
}
