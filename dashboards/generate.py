#!/usr/bin/env python3
"""Generates the Grafana dashboards (farm control panel, pool health, node detail) into
dashboards/ and the chart's copy (charts/shardfarm/files/dashboards/). Run after editing;
the test command checks that both copies match this output and that every metric they use is
exported by a running agent or coordinator."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "..", "charts", "shardfarm", "files", "dashboards")
C = 'cluster=~"$cluster"'
# Boards with a pool variable also filter by it (in a cluster a pool is a namespace: the
# ServiceMonitor/PodMonitor targets carry it as the `namespace` label).
P = 'cluster=~"$cluster", namespace=~"$pool"'
DS = {"type": "prometheus", "uid": "${datasource}"}


class Board:
    def __init__(self, uid, title, tags, variables):
        self.uid, self.title, self.tags, self.variables = uid, title, tags, variables
        self.panels, self.y, self.next_id = [], 0, 1

    def row(self, title):
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def _targets(self, exprs):
        return [{"refId": chr(65 + i), "expr": e, "legendFormat": l, "datasource": DS}
                for i, (e, l) in enumerate(exprs)]

    def stats(self, tiles):
        w = 24 // len(tiles)
        for i, (title, expr, unit) in enumerate(tiles):
            self.panels.append({
                "type": "stat", "title": title, "id": self._id(), "datasource": DS,
                "gridPos": {"h": 4, "w": w, "x": i * w, "y": self.y},
                "targets": self._targets([(expr, "")]),
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "area", "textMode": "auto"},
            })
        self.y += 4

    def series(self, panels):
        w = 24 // len(panels)
        for i, (title, exprs, unit) in enumerate(panels):
            self.panels.append({
                "type": "timeseries", "title": title, "id": self._id(), "datasource": DS,
                "gridPos": {"h": 8, "w": w, "x": i * w, "y": self.y},
                "targets": self._targets(exprs),
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}},
            })
        self.y += 8

    def table(self, title, expr):
        self.panels.append({
            "type": "table", "title": title, "id": self._id(), "datasource": DS,
            "gridPos": {"h": 8, "w": 24, "x": 0, "y": self.y},
            "targets": [{"refId": "A", "expr": expr, "format": "table", "instant": True, "datasource": DS}],
            "fieldConfig": {"defaults": {}, "overrides": []}, "options": {"showHeader": True},
        })
        self.y += 8

    def json(self):
        return {
            "uid": self.uid, "title": self.title, "tags": ["shardfarm", *self.tags],
            "editable": False, "refresh": "30s", "schemaVersion": 39, "version": 1,
            "time": {"from": "now-6h", "to": "now"}, "timezone": "utc", "graphTooltip": 1,
            "annotations": {"list": []}, "links": [],
            "templating": {"list": self.variables}, "panels": self.panels,
        }


def var_ds():
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1}


def var_q(name, label, query, hide=0, include_all=True):
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "query": {"query": query, "refId": name}, "definition": query, "refresh": 2,
            "includeAll": include_all, "allValue": ".+", "multi": include_all, "hide": hide,
            "current": {}, "sort": 1}


def cluster():
    return var_q("cluster", "Cluster", "label_values(shardfarm_agent_build_info, cluster)", hide=2)


A = f'{P}, farm=~"$farm"'


def farm_panel():
    b = Board("shardfarm-farm", "Shardfarm / Farm control panel", ["farm"], [
        var_ds(), cluster(),
        var_q("pool", "Pool", "label_values(shardfarm_coordinator_layout_version, namespace)"),
        var_q("farm", "Farm", "label_values(shardfarm_agent_build_info, farm)"),
    ])
    b.row("Nodes")
    b.stats([
        ("Agents up", f"count(shardfarm_agent_build_info{{{A}}})", "none"),
        ("Proving storage (audits answered, 1 h)", f'count(increase(shardfarm_agent_audits_total{{{A}, result="answered"}}[1h]) > 0)', "none"),
        ("Suspended", f'sum(shardfarm_coordinator_nodes{{{P}, state=~"suspended.*"}})', "none"),
        ("Down", f'sum(shardfarm_coordinator_nodes{{{P}, state=~".*_down"}})', "none"),
    ])
    b.series([
        ("Nodes by state", [(f"sum by (state) (shardfarm_coordinator_nodes{{{P}}})", "{{state}}")], "none"),
        ("Agents per farm", [(f"count by (farm) (shardfarm_agent_build_info{{{A}}})", "{{farm}}")], "none"),
    ])
    b.row("Capacity and traffic")
    b.stats([
        ("Capacity offered", f"sum(shardfarm_agent_capacity_bytes{{{A}}})", "bytes"),
        ("Stored", f"sum(shardfarm_agent_stored_bytes{{{A}}})", "bytes"),
        ("Used", f"sum(shardfarm_agent_stored_bytes{{{A}}}) / sum(shardfarm_agent_capacity_bytes{{{A}}})", "percentunit"),
        ("Shards", f"sum(shardfarm_agent_shards{{{A}}})", "none"),
    ])
    b.series([
        ("Throughput in / out", [
            (f"sum by (farm) (rate(shardfarm_agent_received_bytes_total{{{A}}}[$__rate_interval]))", "in {{farm}}"),
            (f"sum by (farm) (rate(shardfarm_agent_sent_bytes_total{{{A}}}[$__rate_interval]))", "out {{farm}}"),
        ], "Bps"),
        ("Requests by result", [(f"sum by (method, result) (rate(shardfarm_agent_requests_total{{{A}}}[$__rate_interval]))", "{{method}} {{result}}")], "reqps"),
    ])
    b.row("Audits, reputation, earnings")
    b.series([
        ("Audits passed vs failed", [(f"sum by (result) (rate(shardfarm_coordinator_audits_total{{{P}}}[$__rate_interval]))", "{{result}}")], "ops"),
        ("Audit answer latency p50", [(f"histogram_quantile(0.5, sum by (le) (rate(shardfarm_agent_request_duration_seconds_bucket{{{A}, method=\"Audit\"}}[$__rate_interval])))", "audit answer p50 latency")], "s"),
    ])
    b.series([
        ("Reputation (audit score) per node", [(f"shardfarm_coordinator_node_audit_score{{{P}}}", "{{node}}")], "percentunit"),
        ("Earnings per farm", [(f"shardfarm_coordinator_farm_rewards{{{P}}}", "{{farm}}")], "none"),
    ])
    b.series([
        ("Capacity proof: solve time", [(f'shardfarm_agent_capacity_proof{{{A}, input="solve_seconds"}}', "{{node}}")], "s"),
        ("Identity difficulty", [(f"shardfarm_agent_identity_difficulty_bits{{{A}}}", "{{node}}")], "none"),
    ])
    b.table("Nodes failing audits", f"sort(shardfarm_coordinator_node_audit_score{{{P}}} < 1)")
    return b


def pool_health():
    b = Board("shardfarm-pool", "Shardfarm / Pool health", ["pool"], [
        var_ds(), cluster(),
        var_q("pool", "Pool", "label_values(shardfarm_coordinator_layout_version, namespace)"),
    ])
    b.row("Layout")
    b.stats([
        ("Layout version", f"max(shardfarm_coordinator_layout_version{{{P}}})", "none"),
        ("In sync", f"min(shardfarm_coordinator_layout_in_sync{{{P}}})", "bool_yes_no"),
        ("Balance (max / mean)", f"max(shardfarm_coordinator_layout_balance_ratio{{{P}}})", "none"),
        ("Slots moved by last change", f"max(shardfarm_coordinator_layout_moved_slots{{{P}}})", "none"),
    ])
    b.row("Repair")
    b.stats([
        ("Degraded shards", f"sum(shardfarm_coordinator_degraded_shards{{{P}}})", "none"),
        ("Repair rate", f"sum(rate(shardfarm_agent_repair_bytes_total{{{P}}}[$__rate_interval]))", "Bps"),
        ("Repair failures (1 h)", f"sum(increase(shardfarm_agent_repair_failures_total{{{P}}}[1h]))", "none"),
        ("Handed off (1 h)", f"sum(increase(shardfarm_agent_handed_off_shards_total{{{P}}}[1h]))", "none"),
    ])
    b.series([
        ("Repair backlog", [
            (f"sum(shardfarm_coordinator_degraded_shards{{{P}}})", "coordinator"),
            (f"sum by (node) (shardfarm_agent_repair_backlog_shards{{{P}}})", "{{node}}"),
        ], "none"),
        ("Shards repaired", [(f"sum by (method) (rate(shardfarm_agent_repaired_shards_total{{{P}}}[$__rate_interval]))", "{{method}}")], "ops"),
    ])
    b.row("Capacity")
    b.series([
        ("Capacity and use", [
            (f"sum(shardfarm_agent_capacity_bytes{{{P}}})", "offered"),
            (f"sum(shardfarm_agent_stored_bytes{{{P}}})", "stored"),
        ], "bytes"),
        ("Capacity forecast (7 days ahead)", [(f"predict_linear(sum(shardfarm_agent_stored_bytes{{{P}}})[1d:1h], 7 * 86400)", "stored in 7 days")], "bytes"),
    ])
    b.series([
        ("Joins", [(f"sum by (result) (rate(shardfarm_coordinator_joins_total{{{P}}}[$__rate_interval]))", "{{result}}")], "ops"),
        ("Refused signatures", [(f"sum by (reason) (rate(shardfarm_coordinator_auth_failures_total{{{P}}}[$__rate_interval]))", "{{reason}}")], "ops"),
    ])
    return b


N = f'{C}, node=~"$node"'


def node_detail():
    b = Board("shardfarm-node", "Shardfarm / Node detail", ["node"], [
        var_ds(), cluster(),
        var_q("node", "Node", "label_values(shardfarm_agent_build_info, node)", include_all=False),
    ])
    b.row("State")
    b.stats([
        ("Stored", f"shardfarm_agent_stored_bytes{{{N}}}", "bytes"),
        ("Capacity", f"shardfarm_agent_capacity_bytes{{{N}}}", "bytes"),
        ("Shards", f"shardfarm_agent_shards{{{N}}}", "none"),
        ("Uptime since start", f"time() - shardfarm_agent_start_time_seconds{{{N}}}", "s"),
    ])
    b.stats([
        ("Layout received", f"shardfarm_agent_layout_version{{{N}}}", "none"),
        ("Layout synced", f"shardfarm_agent_synced_layout_version{{{N}}}", "none"),
        ("Repair backlog", f"shardfarm_agent_repair_backlog_shards{{{N}}}", "none"),
        ("Identity difficulty", f"shardfarm_agent_identity_difficulty_bits{{{N}}}", "none"),
    ])
    b.row("Requests")
    b.series([
        ("Requests", [(f"sum by (method, result) (rate(shardfarm_agent_requests_total{{{N}}}[$__rate_interval]))", "{{method}} {{result}}")], "reqps"),
        ("Latency p99", [(f"histogram_quantile(0.99, sum by (le, method) (rate(shardfarm_agent_request_duration_seconds_bucket{{{N}}}[$__rate_interval])))", "{{method}}")], "s"),
    ])
    b.series([
        ("Bytes in / out", [
            (f"rate(shardfarm_agent_received_bytes_total{{{N}}}[$__rate_interval])", "in"),
            (f"rate(shardfarm_agent_sent_bytes_total{{{N}}}[$__rate_interval])", "out"),
        ], "Bps"),
        ("Refused requests", [(f"sum by (reason) (rate(shardfarm_agent_auth_failures_total{{{N}}}[$__rate_interval]))", "{{reason}}")], "reqps"),
    ])
    b.row("Integrity")
    b.series([
        ("Audits answered", [(f"sum by (result) (rate(shardfarm_agent_audits_total{{{N}}}[$__rate_interval]))", "{{result}}")], "ops"),
        ("Scrub and corruption", [
            (f"rate(shardfarm_agent_scrub_checked_shards_total{{{N}}}[$__rate_interval])", "checked"),
            (f"sum by (found_by) (rate(shardfarm_agent_corrupt_shards_total{{{N}}}[$__rate_interval]))", "corrupt ({{found_by}})"),
        ], "ops"),
    ])
    b.series([
        ("Repair", [
            (f"sum by (method) (rate(shardfarm_agent_repaired_shards_total{{{N}}}[$__rate_interval]))", "{{method}}"),
            (f"rate(shardfarm_agent_repair_failures_total{{{N}}}[$__rate_interval])", "failed"),
            (f"rate(shardfarm_agent_handed_off_shards_total{{{N}}}[$__rate_interval])", "handed off"),
        ], "ops"),
        ("Capacity proof inputs", [(f"shardfarm_agent_capacity_proof{{{N}}}", "{{input}}")], "none"),
    ])
    b.series([
        ("Repair bytes", [(f"rate(shardfarm_agent_repair_bytes_total{{{N}}}[$__rate_interval])", "written")], "Bps"),
        ("Build", [(f"shardfarm_agent_build_info{{{N}}}", "{{version}}")], "none"),
    ])
    return b


def main():
    os.makedirs(CHART, exist_ok=True)
    for name, board in [("farm-control-panel", farm_panel()), ("pool-health", pool_health()), ("node-detail", node_detail())]:
        text = json.dumps(board.json(), indent=2, sort_keys=True) + "\n"
        for d in (HERE, CHART):
            with open(os.path.join(d, f"{name}.json"), "w") as f:
                f.write(text)
    print("wrote dashboards/*.json and charts/shardfarm/files/dashboards/*.json")


if __name__ == "__main__":
    main()
