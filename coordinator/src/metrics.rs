//! Coordinator metrics (`shardfarm_coordinator_*`, base units).

use prometheus::{Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
    /// Audit score per node.
    pub audit_score: GaugeVec,
    /// 7-day uptime per node.
    pub uptime: GaugeVec,
    /// Rewards recorded per node, farm and share (rw1, rw2), in the pool's unit.
    pub rewards: IntGaugeVec,
    /// Rewards recorded per farm.
    pub farm_rewards: IntGaugeVec,
    /// Joins by result.
    pub joins: IntCounterVec,
    /// Authentication failures by reason.
    pub auth_failures: IntCounterVec,
    /// Segments nodes report as lost (sum of reports).
    pub lost_segments: IntGauge,
    /// Reports by other nodes that a node served a repair source that did not verify.
    pub peer_complaints: IntCounterVec,
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
                "Shards nodes still have to rebuild (sum of reports)",
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
                &["node"],
            )
            .unwrap(),
            uptime: GaugeVec::new(
                o("shardfarm_coordinator_node_uptime_ratio", "7-day floating uptime per node"),
                &["node"],
            )
            .unwrap(),
            rewards: IntGaugeVec::new(
                o("shardfarm_coordinator_rewards", "Rewards recorded per node, farm and share"),
                &["node", "farm", "share"],
            )
            .unwrap(),
            farm_rewards: IntGaugeVec::new(
                o("shardfarm_coordinator_farm_rewards", "Rewards recorded per farm"),
                &["farm"],
            )
            .unwrap(),
            joins: IntCounterVec::new(
                o("shardfarm_coordinator_joins_total", "Join requests by result"),
                &["result"],
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
                &["node"],
            )
            .unwrap(),
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
        reg.register(Box::new(m.rewards.clone())).unwrap();
        reg.register(Box::new(m.farm_rewards.clone())).unwrap();
        reg.register(Box::new(m.joins.clone())).unwrap();
        reg.register(Box::new(m.auth_failures.clone())).unwrap();
        reg.register(Box::new(m.lost_segments.clone())).unwrap();
        reg.register(Box::new(m.peer_complaints.clone())).unwrap();
        m
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
