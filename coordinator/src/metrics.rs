//! Coordinator metrics (`shardfarm_coordinator_*`, base units).
//!
//! # Per-node labels
//! Every per-node series carries [`NODE_LABELS`]: `node`, `node_id` and `farm`. `node` is the
//! name Prometheus scrapes the node's agent under, so dashboards and alerts can put the
//! coordinator's view of a node (its standing, score, earnings) beside the agent's own metrics:
//! in a cluster the chart's PodMonitor sets an agent's `node` target label to its pod's name,
//! and the operator starts each agent with `--label pod=<its pod name>`, which the coordinator
//! keeps for the nodes a farm vouches for; `local up` does the same with `node-<i>`. A node
//! without a `pod` label (an outsider) is named by its short id. `node_id` is always the short
//! id (the first 6 bytes of the node id in hex: what `shardfarm nodes` prints), `farm` the
//! farm it belongs to ([`crate::state::Member::farm`]): the same value the PodMonitor puts on
//! the farm's agents (its MiningFarm's name). None of these collides with a target label the
//! chart's ServiceMonitor sets on the coordinator (`namespace`, `service`, `pod`, `job`,
//! `instance`, `container`, `endpoint`), so Prometheus keeps them as they are.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::{Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The labels of every per-node series, in this order (see the module doc).
pub const NODE_LABELS: [&str; 3] = ["node", "node_id", "farm"];

/// The states of [`CoordinatorMetrics::node_state`]: standing, and `_down` when the node has
/// been silent beyond the grace period.
pub const NODE_STATES: [&str; 6] =
    ["active", "suspended", "disqualified", "active_down", "suspended_down", "disqualified_down"];

/// The coordinator's metrics, registered in their own registry.
pub struct CoordinatorMetrics {
    /// The registry (served at /metrics).
    pub registry: Registry,
    /// Nodes by state (`active`, `suspended`, `disqualified`, each also `_down`).
    pub nodes: IntGaugeVec,
    /// Current layout version.
    pub layout_version: IntGauge,
    /// 1 when every holder has repaired for the current layout.
    pub layout_in_sync: IntGauge,
    /// Slots the last layout change moved.
    pub layout_moved: IntGauge,
    /// Balance of the last layout (max load / capacity-weighted mean).
    pub layout_balance: Gauge,
    /// Shards the nodes still have to rebuild (sum of their reports).
    pub repair_backlog: IntGauge,
    /// Audits by result.
    pub audits: IntCounterVec,
    /// Checks that a node holds what it gained before its sync counts, by result.
    pub sync_checks: IntCounterVec,
    /// Audit score per node ([`NODE_LABELS`]).
    pub audit_score: GaugeVec,
    /// 7-day uptime per node ([`NODE_LABELS`]).
    pub uptime: GaugeVec,
    /// Per node ([`NODE_LABELS`]) and each of [`NODE_STATES`]: 1 for the state it is in, 0
    /// for the others (every state is always exported, so a node's series never vanish
    /// while its state changes and `for:` clauses of alerts on them keep counting).
    pub node_state: IntGaugeVec,
    /// Audits per node ([`NODE_LABELS`]) and result (`pass`, `fail`) since the coordinator
    /// started: whether a node answers audits is whether it does the work, not just whether
    /// it sends heartbeats.
    pub node_audits: IntCounterVec,
    /// Rewards recorded in all epochs per node ([`NODE_LABELS`]) and share (rw1, rw2), in the
    /// pool's unit.
    pub rewards: IntGaugeVec,
    /// Rewards of the last closed epoch per node ([`NODE_LABELS`]) and share.
    pub epoch_rewards: IntGaugeVec,
    /// Rewards recorded in all epochs per farm.
    pub farm_rewards: IntGaugeVec,
    /// The last closed (recorded) rewards epoch (epoch start / epoch length).
    pub last_epoch: IntGauge,
    /// Joins by result.
    pub joins: IntCounterVec,
    /// Challenges and joins refused for a share or limit (`ResourceExhausted`,
    /// `Unavailable`), by method and caller (`member` of the pool, or `stranger`).
    pub refused: IntCounterVec,
    /// Authentication failures by reason.
    pub auth_failures: IntCounterVec,
    /// Segments nodes report as lost (sum of reports).
    pub lost_segments: IntGauge,
    /// Reports by other nodes that a node ([`NODE_LABELS`]) served a repair source that did
    /// not verify.
    pub peer_complaints: IntCounterVec,
    /// The per-node label values exported so far, by hex node id: a node that leaves the
    /// pool (or changes name or farm) has its series removed rather than kept at their last
    /// values.
    exported: Mutex<BTreeMap<String, [String; 3]>>,
}

impl CoordinatorMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let r = Registry::new();
        let o = |n: &str, h: &str| Opts::new(n, h);
        let m = CoordinatorMetrics {
            nodes: IntGaugeVec::new(o("shardfarm_coordinator_nodes", "Nodes by state"), &["state"])
                .unwrap(),
            layout_version: IntGauge::with_opts(o(
                "shardfarm_coordinator_layout_version",
                "Current layout version",
            ))
            .unwrap(),
            layout_in_sync: IntGauge::with_opts(o(
                "shardfarm_coordinator_layout_in_sync",
                "1 when every holder has repaired for the current layout",
            ))
            .unwrap(),
            layout_moved: IntGauge::with_opts(o(
                "shardfarm_coordinator_layout_moved_slots",
                "Slots the last layout change moved",
            ))
            .unwrap(),
            layout_balance: Gauge::with_opts(o(
                "shardfarm_coordinator_layout_balance_ratio",
                "Max node load over capacity-weighted mean load",
            ))
            .unwrap(),
            repair_backlog: IntGauge::with_opts(o(
                "shardfarm_coordinator_degraded_shards",
                "Shards nodes still have to rebuild (sum of reports; a holder that has not proven the current layout counts at least one per slot it gained)",
            ))
            .unwrap(),
            audits: IntCounterVec::new(
                o("shardfarm_coordinator_audits_total", "Audits by result"),
                &["result"],
            )
            .unwrap(),
            sync_checks: IntCounterVec::new(
                o(
                    "shardfarm_coordinator_sync_checks_total",
                    "Sampled checks that a node holds the slots it gained before its sync counts",
                ),
                &["result"],
            )
            .unwrap(),
            audit_score: GaugeVec::new(
                o("shardfarm_coordinator_node_audit_score", "Beta audit score per node"),
                &NODE_LABELS,
            )
            .unwrap(),
            uptime: GaugeVec::new(
                o("shardfarm_coordinator_node_uptime_ratio", "7-day floating uptime per node"),
                &NODE_LABELS,
            )
            .unwrap(),
            node_state: IntGaugeVec::new(
                o(
                    "shardfarm_coordinator_node_state",
                    "1 for the state a node is in (standing, _down when silent beyond the grace)",
                ),
                &[NODE_LABELS[0], NODE_LABELS[1], NODE_LABELS[2], "state"],
            )
            .unwrap(),
            node_audits: IntCounterVec::new(
                o("shardfarm_coordinator_node_audits_total", "Audits per node by result"),
                &[NODE_LABELS[0], NODE_LABELS[1], NODE_LABELS[2], "result"],
            )
            .unwrap(),
            rewards: IntGaugeVec::new(
                o(
                    "shardfarm_coordinator_rewards",
                    "Rewards recorded in all epochs per node and share",
                ),
                &[NODE_LABELS[0], NODE_LABELS[1], NODE_LABELS[2], "share"],
            )
            .unwrap(),
            epoch_rewards: IntGaugeVec::new(
                o(
                    "shardfarm_coordinator_epoch_rewards",
                    "Rewards of the last closed epoch per node and share",
                ),
                &[NODE_LABELS[0], NODE_LABELS[1], NODE_LABELS[2], "share"],
            )
            .unwrap(),
            farm_rewards: IntGaugeVec::new(
                o("shardfarm_coordinator_farm_rewards", "Rewards recorded in all epochs per farm"),
                &["farm"],
            )
            .unwrap(),
            last_epoch: IntGauge::with_opts(o(
                "shardfarm_coordinator_last_epoch",
                "The last closed rewards epoch (epoch start / epoch length)",
            ))
            .unwrap(),
            joins: IntCounterVec::new(
                o("shardfarm_coordinator_joins_total", "Join requests by result"),
                &["result"],
            )
            .unwrap(),
            refused: IntCounterVec::new(
                o(
                    "shardfarm_coordinator_refused_total",
                    "Challenges and joins refused for a share or limit, by method and caller \
                     (member of the pool, or stranger)",
                ),
                &["method", "caller"],
            )
            .unwrap(),
            auth_failures: IntCounterVec::new(
                o("shardfarm_coordinator_auth_failures_total", "Refused signatures by reason"),
                &["reason"],
            )
            .unwrap(),
            lost_segments: IntGauge::with_opts(o(
                "shardfarm_coordinator_lost_segments",
                "Segments with fewer than k shards in the pool (sum of node reports)",
            ))
            .unwrap(),
            peer_complaints: IntCounterVec::new(
                o(
                    "shardfarm_coordinator_peer_complaints_total",
                    "Repair sources a node served that did not verify, as reported by its peers",
                ),
                &NODE_LABELS,
            )
            .unwrap(),
            exported: Mutex::new(BTreeMap::new()),
            registry: r,
        };
        // Known label values start at zero, so dashboards and alerts see 0 rather than no data.
        for r in ["pass", "fail"] {
            m.audits.with_label_values(&[r]);
            m.sync_checks.with_label_values(&[r]);
        }
        for r in ["ok", "refused"] {
            m.joins.with_label_values(&[r]);
        }
        for method in ["Challenge", "Join"] {
            for caller in ["member", "stranger"] {
                m.refused.with_label_values(&[method, caller]);
            }
        }
        for r in shardfarm_core::auth::AuthError::METRIC_LABELS {
            m.auth_failures.with_label_values(&[r]);
        }
        let reg = &m.registry;
        reg.register(Box::new(m.nodes.clone())).unwrap();
        reg.register(Box::new(m.layout_version.clone())).unwrap();
        reg.register(Box::new(m.layout_in_sync.clone())).unwrap();
        reg.register(Box::new(m.layout_moved.clone())).unwrap();
        reg.register(Box::new(m.layout_balance.clone())).unwrap();
        reg.register(Box::new(m.repair_backlog.clone())).unwrap();
        reg.register(Box::new(m.audits.clone())).unwrap();
        reg.register(Box::new(m.sync_checks.clone())).unwrap();
        reg.register(Box::new(m.audit_score.clone())).unwrap();
        reg.register(Box::new(m.uptime.clone())).unwrap();
        reg.register(Box::new(m.node_state.clone())).unwrap();
        reg.register(Box::new(m.node_audits.clone())).unwrap();
        reg.register(Box::new(m.rewards.clone())).unwrap();
        reg.register(Box::new(m.epoch_rewards.clone())).unwrap();
        reg.register(Box::new(m.last_epoch.clone())).unwrap();
        reg.register(Box::new(m.farm_rewards.clone())).unwrap();
        reg.register(Box::new(m.joins.clone())).unwrap();
        reg.register(Box::new(m.refused.clone())).unwrap();
        reg.register(Box::new(m.auth_failures.clone())).unwrap();
        reg.register(Box::new(m.lost_segments.clone())).unwrap();
        reg.register(Box::new(m.peer_complaints.clone())).unwrap();
        m
    }

    /// Records that node `hex` is exported under `labels` ([`NODE_LABELS`] values); when it
    /// was exported under other labels before, its old series are removed.
    pub fn name_node(&self, hex: &str, labels: &[String; 3]) {
        let mut exported = self.exported.lock().unwrap();
        match exported.insert(hex.to_string(), labels.clone()) {
            Some(old) if &old != labels => self.remove_series(&old),
            _ => {}
        }
    }

    /// Removes the series of every node exported before but not in `keep` (hex ids).
    pub fn forget_nodes_except(&self, keep: &std::collections::BTreeSet<String>) {
        let mut exported = self.exported.lock().unwrap();
        let gone: Vec<String> = exported.keys().filter(|h| !keep.contains(*h)).cloned().collect();
        for hex in gone {
            if let Some(old) = exported.remove(&hex) {
                self.remove_series(&old);
            }
        }
    }

    fn remove_series(&self, l: &[String; 3]) {
        let [a, b, c] = [l[0].as_str(), l[1].as_str(), l[2].as_str()];
        let _ = self.audit_score.remove_label_values(&[a, b, c]);
        let _ = self.uptime.remove_label_values(&[a, b, c]);
        let _ = self.peer_complaints.remove_label_values(&[a, b, c]);
        for s in NODE_STATES {
            let _ = self.node_state.remove_label_values(&[a, b, c, s]);
        }
        for r in ["pass", "fail"] {
            let _ = self.node_audits.remove_label_values(&[a, b, c, r]);
        }
        for share in ["rw1", "rw2"] {
            let _ = self.rewards.remove_label_values(&[a, b, c, share]);
            let _ = self.epoch_rewards.remove_label_values(&[a, b, c, share]);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("encodable");
        out
    }
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}
