#!/usr/bin/env python3
"""Generates the Grafana dashboards (farm control panel, pool health, node detail) with Grafana's
typed builders (PyPI grafana-foundation-sdk) into dashboards/ and the chart's copy
(charts/shardfarm/files/dashboards/). Run after editing, with the python of the set-up venv
(it has the pinned SDK):

    PY=$(bash scripts/manifest-tools.sh | tail -1); "$PY" dashboards/generate.py

`--out DIR` writes the three files into DIR only (the test command generates into a temporary
directory and fails if the committed JSON differs). The test command also checks that every
metric the dashboards use is exported by a running agent or coordinator.

The queries are the tables in farm_panel(), pool_health() and node_detail(): one list per row,
stat tiles as (title, expr, unit), time series as (title, [(expr, legend), ...], unit)."""
import argparse
import json
import os
import sys

try:
    from grafana_foundation_sdk.builders import common as cb
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat
except ImportError:
    sys.exit("grafana-foundation-sdk is not installed for this python: run "
             "PY=$(bash scripts/manifest-tools.sh | tail -1); \"$PY\" dashboards/generate.py")

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "..", "charts", "shardfarm", "files", "dashboards")
C = 'cluster=~"$cluster"'
# Boards with a pool variable also filter by it (in a cluster a pool is a namespace: the
# ServiceMonitor/PodMonitor targets carry it as the `namespace` label).
P = 'cluster=~"$cluster", namespace=~"$pool"'
DS = cm.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Stat tiles that turn red, by title, and from which value; every other tile stays green.
ALARM = {
    "Nodes down (silent)": 1, "Suspended": 1, "Disqualified": 1, "Capacity used": 0.85,
    "Used": 0.85, "Degraded shards": 1, "Repair failures (1 h)": 1,
}


def thresholds(title):
    steps = [dm.Threshold(value=None, color="green")]
    if title in ALARM:
        steps.append(dm.Threshold(value=ALARM[title], color="red"))
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)


# Grid heights (Grafana's grid is 24 columns wide; a height unit is 30 px).
ROW_H, STAT_H, SERIES_H, TABLE_H = 1, 4, 8, 8


class Board:
    """A dashboard laid out top to bottom: a row header, then lines of panels that share the
    24 columns equally. Positions and panel ids are set here, not by the SDK's auto-layout, so
    the JSON does not depend on how the SDK packs panels."""

    def __init__(self, uid, title, tags, variables):
        self.b = (db.Dashboard(title).uid(uid).tags(["shardfarm", *tags]).readonly()
                  .refresh("30s").version(1).time("now-6h", "now").timezone("utc")
                  .tooltip(dm.DashboardCursorSync.CROSSHAIR).annotations([]).links([])
                  .variables(variables))
        self.y, self.next_id = 0, 1

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def _place(self, panel, i, w, h):
        return panel.id(self._id()).datasource(DS).grid_pos(dm.GridPos(h=h, w=w, x=i * w, y=self.y))

    def row(self, title):
        self.b.with_row(db.Row(title).id(self._id()).collapsed(False)
                        .grid_pos(dm.GridPos(h=ROW_H, w=24, x=0, y=self.y)))
        self.y += ROW_H

    def stats(self, tiles):
        """Tiles (title, expr, unit) show the value; (title, expr, unit, legend) show the
        series' name instead (a state: the query's value is 1 for the state it names). A tile
        is green, or red from its value in ALARM (Grafana's default, red from 80, would paint
        a normal byte count or an earnings total red)."""
        w = 24 // len(tiles)
        for i, (title, expr, unit, *legend) in enumerate(tiles):
            mode = cm.BigValueTextMode.NAME if legend else cm.BigValueTextMode.AUTO
            self.b.with_panel(self._place(stat.Panel(), i, w, STAT_H).title(title).unit(unit)
                              .with_target(query("A", expr, legend[0] if legend else ""))
                              .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"])
                                              .fields("").values(False))
                              .color_mode(cm.BigValueColorMode.VALUE)
                              .graph_mode(cm.BigValueGraphMode.AREA)
                              .text_mode(mode).thresholds(thresholds(title)))
        self.y += STAT_H

    def series(self, panels):
        w = 24 // len(panels)
        for i, (title, exprs, unit) in enumerate(panels):
            p = (self._place(timeseries.Panel(), i, w, SERIES_H).title(title).unit(unit)
                 .legend(cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                         .placement(cm.LegendPlacement.BOTTOM).show_legend(True))
                 .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI)
                          .sort(cm.SortOrder.DESCENDING)))
            for j, (expr, legend) in enumerate(exprs):
                p.with_target(query(chr(65 + j), expr, legend))
            self.b.with_panel(p)
        self.y += SERIES_H

    def table(self, title, expr):
        self.b.with_panel(self._place(table.Panel(), 0, 24, TABLE_H).title(title).show_header(True)
                          .with_target(query("A", expr).format(PromQueryFormat.TABLE).instant()))
        self.y += TABLE_H

    def json(self):
        return json.loads(JSONEncoder().encode(self.b.build()))


def query(ref, expr, legend=None):
    q = prometheus.Dataquery().ref_id(ref).expr(expr).datasource(DS)
    return q if legend is None else q.legend_format(legend)


def var_ds():
    v = (db.DatasourceVariable("datasource").label("Data source").type("prometheus")
         .hide(dm.VariableHide.DONT_HIDE))
    # The builder has no refresh() for a datasource variable; the model has the field, and
    # Grafana's own export writes 1 (on dashboard load), as the hand-written JSON did.
    v.build().refresh = dm.VariableRefresh.ON_DASHBOARD_LOAD
    return v


def var_q(name, label, expr, hide=dm.VariableHide.DONT_HIDE, include_all=True):
    return (db.QueryVariable(name).label(label).datasource(DS).query({"query": expr, "refId": name})
            .definition(expr).refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .include_all(include_all).multi(include_all).all_value(".+").hide(hide)
            .sort(dm.VariableSort.ALPHABETICAL_ASC))


def cluster():
    return var_q("cluster", "Cluster", "label_values(shardfarm_agent_build_info, cluster)",
                 hide=dm.VariableHide.HIDE_VARIABLE)


A = f'{P}, farm=~"$farm"'
# Coordinator-side series of the chosen farm: its per-node series carry `farm` and `node` with
# the values the PodMonitor gives the agents (see coordinator/src/metrics.rs).
F = A
# A node is proving storage when it passed an audit within this window: two audit intervals
# at the pool's default (a StoragePool's auditIntervalSeconds, 1 h), so one missed round does
# not flip it.
PROVING = "2h"


def farm_panel():
    b = Board("shardfarm-farm", "Shardfarm / Farm control panel", ["farm"], [
        var_ds(), cluster(),
        var_q("pool", "Pool", "label_values(shardfarm_coordinator_layout_version, namespace)"),
        var_q("farm", "Farm", "label_values(shardfarm_agent_build_info, farm)"),
    ])
    # What a miner looks at first: is each node doing the work (audits passed, not heartbeats),
    # what did it earn, how full is it, what is left to repair.
    b.row("Farm at a glance")
    b.stats([
        (f"Nodes proving storage (audit passed, {PROVING})", f'count(sum by (node_id) (increase(shardfarm_coordinator_node_audits_total{{{F}, result="pass"}}[{PROVING}])) > 0) or vector(0)', "none"),
        ("Nodes down (silent)", f'sum(shardfarm_coordinator_node_state{{{F}, state=~"active_down|suspended_down"}})', "none"),
        ("Earnings, last closed epoch", f"sum(shardfarm_coordinator_epoch_rewards{{{F}}})", "none"),
        ("Earnings, all epochs", f"sum(shardfarm_coordinator_farm_rewards{{{F}}})", "none"),
        ("Capacity used", f"sum(shardfarm_agent_stored_bytes{{{A}}}) / sum(shardfarm_agent_capacity_bytes{{{A}}})", "percentunit"),
        ("Repair backlog (shards)", f"sum(shardfarm_agent_repair_backlog_shards{{{A}}})", "none"),
    ])
    b.table("Nodes: standing (active, suspended, disqualified; _down when silent)",
            f"max by (farm, node, node_id, state) (shardfarm_coordinator_node_state{{{F}}}) == 1")
    b.row("Per node")
    b.series([
        (f"Audits per node ({PROVING})", [
            (f'sum by (node) (increase(shardfarm_coordinator_node_audits_total{{{F}, result="pass"}}[{PROVING}]))', "{{node}} passed"),
            (f'sum by (node) (increase(shardfarm_coordinator_node_audits_total{{{F}, result="fail"}}[{PROVING}]))', "{{node}} failed"),
        ], "none"),
        ("Audit score per node", [(f"shardfarm_coordinator_node_audit_score{{{F}}}", "{{node}}")], "percentunit"),
    ])
    b.series([
        ("Earnings per node, last closed epoch", [(f"sum by (node) (shardfarm_coordinator_epoch_rewards{{{F}}})", "{{node}}")], "none"),
        ("Earnings per node, all epochs", [(f"sum by (node) (shardfarm_coordinator_rewards{{{F}}})", "{{node}}")], "none"),
    ])
    b.series([
        ("Capacity offered vs stored per node", [
            (f"shardfarm_agent_capacity_bytes{{{A}}}", "{{node}} offered"),
            (f"shardfarm_agent_stored_bytes{{{A}}}", "{{node}} stored"),
        ], "bytes"),
        ("Repair backlog per node", [(f"sum by (node) (shardfarm_agent_repair_backlog_shards{{{A}}})", "{{node}}")], "none"),
    ])
    b.row("Nodes")
    b.stats([
        ("Agents scraped", f"count(shardfarm_agent_build_info{{{A}}})", "none"),
        ("Audits answered by agents (1 h)", f'count(sum by (node) (increase(shardfarm_agent_audits_total{{{A}, result="answered"}}[1h])) > 0) or vector(0)', "none"),
        ("Suspended", f'sum(shardfarm_coordinator_node_state{{{F}, state=~"suspended.*"}})', "none"),
        ("Disqualified", f'sum(shardfarm_coordinator_node_state{{{F}, state=~"disqualified.*"}})', "none"),
    ])
    b.series([
        ("Nodes by state", [(f"sum by (state) (shardfarm_coordinator_node_state{{{F}}})", "{{state}}")], "none"),
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
        ("Audits passed vs failed", [(f"sum by (result) (rate(shardfarm_coordinator_node_audits_total{{{F}}}[$__rate_interval]))", "{{result}}")], "ops"),
        ("Audit answer latency p50", [(f"histogram_quantile(0.5, sum by (le) (rate(shardfarm_agent_request_duration_seconds_bucket{{{A}, method=\"Audit\"}}[$__rate_interval])))", "audit answer p50 latency")], "s"),
    ])
    b.series([
        ("Uptime per node (7 days)", [(f"shardfarm_coordinator_node_uptime_ratio{{{F}}}", "{{node}}")], "percentunit"),
        ("Earnings per farm, all epochs", [(f"shardfarm_coordinator_farm_rewards{{{F}}}", "{{farm}}")], "none"),
    ])
    b.series([
        ("Capacity proof: solve time", [(f'shardfarm_agent_capacity_proof{{{A}, input="solve_seconds"}}', "{{node}}")], "s"),
        ("Identity difficulty", [(f"shardfarm_agent_identity_difficulty_bits{{{A}}}", "{{node}}")], "none"),
    ])
    b.table("Nodes failing audits", f"sort(shardfarm_coordinator_node_audit_score{{{F}}} < 1)")
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
    # Repair that tells the truth (issue 36): how long since each holder last proved every
    # partition it holds, and which peers did not list for it.
    b.series([
        ("Since each holder last proved its partitions", [(f"time() - min by (node) (shardfarm_agent_repair_proven_timestamp_seconds{{{P}}})", "{{node}}")], "s"),
        ("Listings not answered, by peer", [(f"sum by (peer) (rate(shardfarm_agent_repair_listing_failures_total{{{P}}}[$__rate_interval]))", "{{peer}}")], "ops"),
    ])
    b.row("Capacity")
    b.series([
        ("Capacity and use", [
            (f"sum(shardfarm_agent_capacity_bytes{{{P}}})", "offered"),
            (f"sum(shardfarm_agent_stored_bytes{{{P}}})", "stored"),
        ], "bytes"),
        # Each agent's trend over the last day (from its second scrape on), summed: a
        # [1d:1h] subquery of the sum had no point until two hour boundaries had passed.
        ("Capacity forecast (7 days ahead)", [(f"sum(predict_linear(shardfarm_agent_stored_bytes{{{P}}}[1d], 7 * 86400))", "stored in 7 days")], "bytes"),
    ])
    b.series([
        ("Joins", [(f"sum by (result) (rate(shardfarm_coordinator_joins_total{{{P}}}[$__rate_interval]))", "{{result}}")], "ops"),
        ("Refused signatures", [(f"sum by (reason) (rate(shardfarm_coordinator_auth_failures_total{{{P}}}[$__rate_interval]))", "{{reason}}")], "ops"),
    ])
    # Shared by owner root (issue 34): who spends the pool's finite resources, and whether
    # members of the pool are ever refused for a share (they should not be: an alert fires).
    b.row("Who is spending the pool")
    b.series([
        ("Requests per minute, top owner roots", [(f"topk(10, sum by (root) (shardfarm_agent_top_root_requests{{{P}}}))", "{{root}}")], "none"),
        ("Upload bytes in flight, top owner roots", [(f"topk(10, sum by (root) (shardfarm_agent_top_root_upload_bytes{{{P}}}))", "{{root}}")], "bytes"),
    ])
    b.series([
        ("Refused for a share, by caller", [
            (f"sum by (method, caller) (rate(shardfarm_agent_refused_total{{{P}}}[$__rate_interval]))", "agents {{method}} {{caller}}"),
            (f"sum by (method, caller) (rate(shardfarm_coordinator_refused_total{{{P}}}[$__rate_interval]))", "coordinator {{method}} {{caller}}"),
        ], "ops"),
        ("Connections closed by admission", [(f"sum by (reason) (rate(shardfarm_agent_connections_closed_total{{{P}}}[$__rate_interval]))", "{{reason}}")], "ops"),
        ("Requests paced (a root past its rate, left unread)", [(f"sum(rate(shardfarm_agent_requests_paced_total{{{P}}}[$__rate_interval]))", "paced")], "ops"),
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
    b.row("The pool's view: standing, audits, earnings")
    b.stats([
        ("Standing", f"max by (state) (shardfarm_coordinator_node_state{{{N}}}) == 1", "none", "{{state}}"),
        ("Audit score", f"max(shardfarm_coordinator_node_audit_score{{{N}}})", "percentunit"),
        (f"Audits passed ({PROVING})", f'sum(increase(shardfarm_coordinator_node_audits_total{{{N}, result="pass"}}[{PROVING}]))', "none"),
        ("Earnings, last closed epoch", f"sum(shardfarm_coordinator_epoch_rewards{{{N}}})", "none"),
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


BOARDS = [("farm-control-panel", farm_panel), ("pool-health", pool_health), ("node-detail", node_detail)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", metavar="DIR",
                    help="write the dashboards into DIR only (default: dashboards/ and the chart's copy)")
    args = ap.parse_args()
    dirs = [args.out] if args.out else [HERE, CHART]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    for name, build in BOARDS:
        text = json.dumps(build().json(), indent=2, sort_keys=True) + "\n"
        for d in dirs:
            with open(os.path.join(d, f"{name}.json"), "w") as f:
                f.write(text)
    print(f"wrote {', '.join(f'{n}.json' for n, _ in BOARDS)} into {' and '.join(os.path.normpath(d) for d in dirs)}")


if __name__ == "__main__":
    main()
