//! The dashboards and alerts against a real Prometheus scraping a real farm.
//!
//! `metric_names.rs` proves every metric name a dashboard or alert uses is exported; a name that
//! exists can still feed an empty or wrong panel (a label that never carries the value the panel
//! filters on, a variable whose `label_values` finds nothing, coordinator and agent series whose
//! `node` labels never meet). This test starts a local farm with short intervals and Debian's
//! `prometheus` on loopback, scraping the coordinator and every agent through a generated scrape
//! config whose target labels are the ones the chart's monitors produce
//! (`charts/shardfarm/templates/monitoring.yaml`):
//!
//! | target      | labels (as Prometheus Operator and our relabelling set them)                   |
//! |-------------|---------------------------------------------------------------------------------|
//! | coordinator | `cluster`, `namespace` (the pool's), `service`, `pod` (the operator's), `job`    |
//! | agent *i*   | `cluster`, `namespace`, `farm` (its MiningFarm), `node` and `pod` (its pod name) |
//!
//! `local up` names its agents as the operator does (`pod=node-<i>`, `farm=<dir name>`), so the
//! coordinator's per-node series carry the same `node`/`farm` values as the agents' targets. The
//! test stores and reads files, waits for audits and a closed rewards epoch, kills one agent for
//! good (it goes down, its slots are repaired elsewhere), and then evaluates through the HTTP API:
//! - every dashboard variable's query: it must return the farm's values;
//! - every panel target, with each variable set to its first value (sorted, as a user picking the
//!   first entry would) and `$__rate_interval` = [`RATE_INTERVAL`]: it must return a series,
//!   unless the panel is in [`MAY_BE_EMPTY`] with the reason; units are sanity-checked;
//! - every alert rule: evaluated without error; `ShardfarmNodeDown` (its `for:` shortened in the
//!   test's copy of the rules) fires naming the killed agent, and no alert is pending or firing
//!   for anything else except those in [`MAY_BE_ACTIVE`].
//!
//! With `SHARDFARM_RENDER_DIR` set, `scripts/render-dashboards.py` renders every dashboard from
//! the live Prometheus into that directory before the farm stops (when the script exists).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Farm, free_base_port, http_get};
use serde_json::Value;

/// Prometheus scrapes and evaluates rules this often.
const SCRAPE_SECONDS: u64 = 1;
/// What `$__rate_interval` becomes: Grafana's rule is at least four scrape intervals; 10 s is
/// that with room for a late scrape, so a rate always has two samples to work with.
const RATE_INTERVAL: &str = "10s";
/// Agents: RS(4,2) needs six nodes, so with seven the pool re-places a lost node's slots.
const NODES: usize = 7;
/// The cluster and namespace (pool) labels the test's scrape config sets.
const CLUSTER: &str = "local";
const NAMESPACE: &str = "shardfarm";

/// Panels that may legitimately show nothing on this farm, by dashboard uid and panel title,
/// with the reason. A panel empty for any other reason is a bug to fix, not to list here.
const MAY_BE_EMPTY: &[(&str, &str, &str)] = &[(
    "shardfarm-farm",
    "Nodes failing audits",
    "lists nodes whose audit score is below 1; every node of this farm passes its audits",
)];

/// Tiles whose value this farm fixes, by dashboard uid and a prefix of the panel title: the
/// latest value of the first series must lie in `min..=max`. A tile that is present but says
/// the wrong thing (counts series instead of nodes, an epoch that never closes) fails here.
const EXPECT: &[(&str, &str, f64, f64)] = &[
    // Nodes whose audited slot held a segment and passed (a young farm's node may not have had
    // one yet); never more than there are nodes, however many series a node has.
    ("shardfarm-farm", "Nodes proving storage", 1.0, NODES as f64),
    ("shardfarm-farm", "Nodes down (silent)", 1.0, 1.0),
    ("shardfarm-farm", "Earnings, last closed epoch", 1.0, f64::MAX),
    ("shardfarm-farm", "Earnings, all epochs", 1.0, f64::MAX),
    ("shardfarm-farm", "Agents scraped", (NODES - 1) as f64, (NODES - 1) as f64),
];

/// The latest value of the first series of a query result.
fn latest(series: &[Value]) -> Option<f64> {
    let s = series.first()?;
    let p = s["values"].as_array().and_then(|v| v.last().cloned()).unwrap_or(s["value"].clone());
    p[1].as_str().and_then(|v| v.parse().ok())
}

/// Alerts other than `ShardfarmNodeDown` that may be pending or firing after one agent died
/// for good, with the reason. Every other alert must stay silent.
const MAY_BE_ACTIVE: &[(&str, &str)] = &[
    ("ShardfarmDegradedSegments", "the killed agent's shards are being rebuilt"),
    (
        "ShardfarmRepairBacklogGrowing",
        "the backlog grows while the killed agent's shards are counted",
    ),
];

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

// ---- Prometheus ----

/// A `prometheus` server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Prometheus {
    /// Starts `/usr/bin/prometheus` (or `prometheus` on the PATH) with `config` in `dir`.
    fn start(dir: &Path, config: &str) -> Prometheus {
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let bin = if Path::new("/usr/bin/prometheus").exists() {
            "/usr/bin/prometheus"
        } else {
            "prometheus"
        };
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): install Debian's `prometheus` (scripts/chart-tools.sh does)")
            });
        let mut p = Prometheus { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(&p.addr, "/-/ready").contains("Ready") {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
                panic!("prometheus exited ({status}):\n{log}");
            }
            assert!(Instant::now() < deadline, "prometheus not ready within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        p.child.try_wait().unwrap();
        p
    }

    /// GET `path` with `params`; the `data` of a successful answer, or the error.
    fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let query: Vec<String> =
            params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
        let body = http_get(&self.addr, &format!("{path}?{}", query.join("&")));
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body:.200}"))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!("{}: {}", v["errorType"], v["error"]))
        }
    }

    /// The series of an instant query at now.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("/api/v1/query", &[("query", expr)])?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The series of a range query from `start` to now, one point per `step_s` seconds.
    fn query_range(&self, expr: &str, start: f64, step_s: u64) -> Result<Vec<Value>, String> {
        let (s, e, st) = (format!("{start:.3}"), format!("{:.3}", now()), step_s.to_string());
        let params = [("query", expr), ("start", &s), ("end", &e), ("step", &st)];
        let data = self.api("/api/v1/query_range", &params)?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The scrape config the chart's monitors amount to for this farm (see the module doc).
fn scrape_config(farm: &Farm, farm_name: &str, rules: &Path) -> String {
    let target = |port: usize, labels: &[(&str, String)]| {
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
        format!(
            "      - targets: [\"127.0.0.1:{port}\"]\n        labels: {{ {} }}\n",
            labels.join(", ")
        )
    };
    let common = |extra: Vec<(&'static str, String)>| {
        let mut l = vec![("cluster", CLUSTER.to_string()), ("namespace", NAMESPACE.to_string())];
        l.extend(extra);
        l
    };
    let mut out = format!(
        "global:\n  scrape_interval: {SCRAPE_SECONDS}s\n  scrape_timeout: {SCRAPE_SECONDS}s\n  \
         evaluation_interval: {SCRAPE_SECONDS}s\nrule_files:\n  - \"{}\"\nscrape_configs:\n",
        rules.display()
    );
    // ServiceMonitor: job = the Service's name; pod = the operator's pod.
    out.push_str("  - job_name: shardfarm-operator\n    static_configs:\n");
    out.push_str(&target(
        farm.base_port as usize - 1,
        &common(vec![
            ("service", "shardfarm-operator".into()),
            ("pod", "shardfarm-operator-5d8f7-abcde".into()),
            ("container", "operator".into()),
            ("endpoint", "metrics".into()),
        ]),
    ));
    // PodMonitor: job = namespace/name; farm from the pod label, node = the pod's name.
    out.push_str(&format!("  - job_name: {NAMESPACE}/shardfarm-agents\n    static_configs:\n"));
    for i in 0..NODES {
        let pod = format!("node-{i}");
        out.push_str(&target(
            farm.base_port as usize + 2 * i + 1,
            &common(vec![
                ("farm", farm_name.to_string()),
                ("node", pod.clone()),
                ("pod", pod),
                ("container", "agent".into()),
                ("endpoint", "http".into()),
            ]),
        ));
    }
    out
}

/// The chart's alert rules with `ShardfarmNodeDown`'s `for:` cut to 2 s, so it fires within the
/// test; every other alert keeps its own `for:` (a pending alert shows its condition holds).
fn rules_for_test() -> String {
    let text =
        std::fs::read_to_string(root().join("charts/shardfarm/files/alerts/shardfarm.rules.yaml"))
            .unwrap();
    let mut alert = String::new();
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            alert = name.trim().to_string();
        }
        if t.starts_with("for:") && alert == "ShardfarmNodeDown" {
            let indent = &line[..line.len() - t.len()];
            out.push_str(&format!("{indent}for: 2s\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

// ---- Dashboards ----

/// One dashboard's variables and panel targets.
struct Board {
    uid: String,
    variables: Vec<Value>,
    /// (panel title, unit, refId, expr, instant)
    targets: Vec<(String, String, String, String, bool)>,
    titles: BTreeSet<String>,
}

fn boards() -> Vec<Board> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no dashboards in dashboards/");
    paths
        .iter()
        .map(|p| {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
            let mut b = Board {
                uid: v["uid"].as_str().unwrap_or_default().to_string(),
                variables: v["templating"]["list"].as_array().cloned().unwrap_or_default(),
                targets: Vec::new(),
                titles: BTreeSet::new(),
            };
            let mut panels: Vec<Value> = v["panels"].as_array().cloned().unwrap_or_default();
            while let Some(panel) = panels.pop() {
                // A collapsed row carries its panels inside it.
                panels.extend(panel["panels"].as_array().cloned().unwrap_or_default());
                if panel["type"] == "row" {
                    continue;
                }
                let title = panel["title"].as_str().unwrap_or_default().to_string();
                let unit = panel["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                b.titles.insert(title.clone());
                for t in panel["targets"].as_array().into_iter().flatten() {
                    if t["hide"] == true {
                        continue;
                    }
                    let Some(expr) = t["expr"].as_str() else { continue };
                    let instant = t["instant"] == true && t["range"] != true;
                    let r = t["refId"].as_str().unwrap_or("A").to_string();
                    b.targets.push((title.clone(), unit.clone(), r, expr.to_string(), instant));
                }
            }
            b.targets.sort();
            b
        })
        .collect()
}

/// A variable's query text (the SDK and older Grafana JSON put it in different places).
fn variable_query(v: &Value) -> String {
    match &v["query"] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.get("query").and_then(Value::as_str).unwrap_or_default().to_string(),
        _ => v["definition"].as_str().unwrap_or_default().to_string(),
    }
}

/// `expr` with the dashboard's variables and Grafana's built-ins substituted.
fn substitute(expr: &str, vars: &BTreeMap<String, String>, range_s: u64) -> String {
    let mut out = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("${__rate_interval}", RATE_INTERVAL)
        .replace("$__interval_ms", &(SCRAPE_SECONDS * 1000).to_string())
        .replace("$__interval", &format!("{SCRAPE_SECONDS}s"))
        .replace("$__range", &format!("{range_s}s"));
    // Longest names first: `$pool` must not eat the start of `$pool_id`.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        let value = &vars[name];
        out = out
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("[[{name}]]"), value)
            .replace(&format!("${name}"), value);
    }
    out
}

/// The values of a `label_values(...)` variable query over the farm's lifetime, sorted.
fn label_values(prom: &Prometheus, query: &str, start: f64) -> Result<Vec<String>, String> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .ok_or_else(|| format!("not a label_values(…) query: {query}"))?;
    // The label is after the last comma outside braces and quotes.
    let (mut depth, mut quoted, mut split) = (0, false, None);
    for (i, c) in inner.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '{' | '(' if !quoted => depth += 1,
            '}' | ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => split = Some(i),
            _ => {}
        }
    }
    let (selector, label) = match split {
        Some(i) => (Some(inner[..i].trim()), inner[i + 1..].trim()),
        None => (None, inner.trim()),
    };
    let (s, e) = (format!("{start:.3}"), format!("{:.3}", now()));
    let mut params = vec![("start", s.as_str()), ("end", e.as_str())];
    if let Some(sel) = selector {
        params.push(("match[]", sel));
    }
    let data = prom.api(&format!("/api/v1/label/{label}/values"), &params)?;
    let mut values: Vec<String> = data
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    values.sort();
    Ok(values)
}

/// Every value of every series of a query result (range or instant).
fn values(series: &[Value]) -> Vec<f64> {
    let mut out = Vec::new();
    for s in series {
        let points = s["values"].as_array().cloned().unwrap_or_else(|| vec![s["value"].clone()]);
        for p in points {
            if let Some(v) = p[1].as_str().and_then(|v| v.parse::<f64>().ok()) {
                out.push(v);
            }
        }
    }
    out
}

/// Why `values` cannot be right for `unit` (a ratio above 1, seconds that are milliseconds…).
fn unit_problem(unit: &str, values: &[f64], farm_age_s: f64) -> Option<String> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let max = finite.iter().copied().fold(f64::MIN, f64::max);
    let min = finite.iter().copied().fold(f64::MAX, f64::min);
    if finite.is_empty() {
        return None;
    }
    match unit {
        "percentunit" if min < 0.0 || max > 1.0 + 1e-9 => {
            Some(format!("a ratio (percentunit) outside [0, 1]: {min}..{max}"))
        }
        // Latencies, solve times and uptimes of a farm that lives minutes.
        "s" if min < 0.0 || max > farm_age_s + 60.0 => {
            Some(format!("seconds outside [0, farm age {farm_age_s:.0} s]: {min}..{max}"))
        }
        "bytes" | "Bps" | "reqps" | "ops" if min < 0.0 => Some(format!("negative {unit}: {min}")),
        // 7 agents × 10 GiB: anything near a petabyte is a unit error.
        "bytes" if max > 1e15 => Some(format!("{max} bytes on a 70 GiB farm")),
        _ => None,
    }
}

// ---- The test ----

#[test]
fn dashboards_and_alerts_show_a_live_farm() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        &[
            "--nodes",
            &NODES.to_string(),
            "--heartbeat-ms",
            "300",
            "--grace",
            "2",
            "--audit-interval",
            "1",
            "--epoch-seconds",
            "2",
            "--repair-interval",
            "1",
            "--segment-size",
            "1MiB",
        ],
    );
    let farm_start = now() - 1.0;
    let prom_dir = tmp.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    std::fs::write(prom_dir.join("shardfarm.rules.yaml"), rules_for_test()).unwrap();
    let prom = Prometheus::start(
        &prom_dir,
        &scrape_config(&farm, "farm", &prom_dir.join("shardfarm.rules.yaml")),
    );
    // Alerts are judged from the first rule evaluation after every target was scraped: before
    // it, "no coordinator metrics" is true of any Prometheus that has just started.
    farm.wait_for(30, "Prometheus scraping every target", || {
        let up = prom.query("sum(up)").unwrap_or_default();
        values(&up).first() == Some(&((NODES + 1) as f64))
    });
    std::thread::sleep(Duration::from_secs(2 * SCRAPE_SECONDS));
    let watch_start = now();

    // Work: files in and out, audits, a closed epoch.
    let files = common::store_files(&farm, tmp.path(), &[3 << 20, 2 << 20, 1 << 20], 11);
    common::read_all_back(&farm, &files, tmp.path(), "healthy");
    // Closed: the last epoch is set and some node earned in it (every gauge starts at 0).
    farm.wait_for(60, "audits and a closed rewards epoch", || {
        let c = farm.coordinator_metrics();
        let earned = c.lines().any(|l| {
            l.starts_with("shardfarm_coordinator_epoch_rewards{")
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0)
        });
        common::metric(&c, "shardfarm_coordinator_audits_total{result=\"pass\"}") > 0.0
            && common::metric(&c, "shardfarm_coordinator_last_epoch") > 0.0
            && earned
    });

    // The agent killed for good is one that holds shards (a node may hold none of a few
    // segments, and then killing it leaves nothing to rebuild), in zone 0 (`local up` puts node
    // i in zone i % 3: only zone 0 has three nodes, so losing one still leaves 2 + 2 + 2 slots
    // per partition and the pool can re-place), and never node-0, so the first value of
    // `$node` stays a live agent: node-3 or node-6.
    let shards_of = |i: usize| farm.agent_metric(i, "shardfarm_agent_shards");
    let candidates = [3, 6];
    farm.wait_for(60, "node-3 or node-6 holding shards", || {
        candidates.iter().any(|&i| shards_of(i) > 0.0)
    });
    let killed =
        candidates.into_iter().max_by(|&a, &b| shards_of(a).total_cmp(&shards_of(b))).unwrap();

    // One agent dies for good: it goes down, its slots are re-placed and rebuilt.
    let killed_id = common::hostile::farm_file(&farm.dir).nodes[killed].id.clone();
    let killed_short = killed_id[..12].to_string();
    farm.kill9(killed);
    // Down after the grace period; on a farm this young its uptime soon falls below the
    // pool's threshold too, so it may be `suspended_down` by then.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = farm.coordinator_metrics();
        let state = |s: &str| {
            common::metric(
                &c,
                &format!(
                    "shardfarm_coordinator_node_state{{farm=\"farm\",node=\"node-{killed}\",node_id=\"{killed_short}\",state=\"{s}\"}}"
                ),
            )
        };
        let repaired = |m: &str| {
            let series = format!("shardfarm_agent_repaired_shards_total{{method=\"{m}\"}}");
            (0..NODES).filter(|&i| i != killed).map(|i| farm.agent_metric(i, &series)).sum::<f64>()
        };
        let down = state("active_down") + state("suspended_down");
        let rebuilt = repaired("rebuild") + repaired("copy");
        if down == 1.0 && rebuilt > 0.0 {
            break;
        }
        // On failure, say which half is missing and what the coordinator thinks of the node.
        assert!(
            Instant::now() < deadline,
            "timed out after 60 s waiting for the killed agent down (active_down + suspended_down = \
             {down}) and its shards repaired (rebuilt or copied: {rebuilt}); the coordinator \
             says:\n{}",
            c.lines()
                .filter(|l| l.contains(&killed_short)
                    || l.starts_with("shardfarm_coordinator_degraded"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    common::read_all_back(&farm, &files, tmp.path(), "degraded");

    // The alert: ShardfarmNodeDown fires and names the killed agent.
    let down_alert = format!(
        "ALERTS{{alertname=\"ShardfarmNodeDown\", alertstate=\"firing\", node=\"node-{killed}\"}}"
    );
    farm.wait_for(60, "ShardfarmNodeDown firing for the killed agent", || {
        prom.query(&down_alert).is_ok_and(|r| !r.is_empty())
    });
    // Rates over RATE_INTERVAL see the farm as it is now, after the kill.
    std::thread::sleep(Duration::from_secs(3));
    let farm_age = now() - farm_start;
    let mut problems: Vec<String> = Vec::new();

    // ---- Alerts ----
    let fired = prom.query(&down_alert).unwrap();
    let l = &fired[0]["metric"];
    for (k, want) in [
        ("farm", "farm".to_string()),
        ("node_id", killed_short.clone()),
        ("namespace", NAMESPACE.to_string()),
        ("cluster", CLUSTER.to_string()),
    ] {
        if l[k] != want.as_str() {
            problems.push(format!("ShardfarmNodeDown's label {k} is {} (want {want}): {l}", l[k]));
        }
    }
    let rules = prom.api("/api/v1/rules", &[]).unwrap();
    let mut n_rules = 0;
    for g in rules["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            n_rules += 1;
            if r["health"] != "ok" {
                problems.push(format!(
                    "alert {} does not evaluate: {} ({})",
                    r["name"], r["lastError"], r["query"]
                ));
            }
        }
    }
    if n_rules == 0 {
        problems.push("Prometheus loaded no alert rules".into());
    }
    // Everything pending or firing at any time since the farm started.
    let active = prom.query_range("ALERTS", watch_start, SCRAPE_SECONDS).unwrap();
    for a in &active {
        let m = &a["metric"];
        let name = m["alertname"].as_str().unwrap_or_default();
        let node = m["node"].as_str();
        let about_killed = node == Some(&format!("node-{killed}"));
        if matches!(
            name,
            "ShardfarmNodeDown" | "ShardfarmNodeSuspended" | "ShardfarmNodeDisqualified"
        ) && about_killed
        {
            continue;
        }
        if node.is_none() && MAY_BE_ACTIVE.iter().any(|(n, _)| *n == name) {
            continue;
        }
        problems.push(format!(
            "alert {name} became {} on the healthy part of the farm: {m}",
            m["alertstate"]
        ));
    }

    // ---- Labels line up ----
    // Every node and farm the coordinator names is one Prometheus scrapes an agent as (a node
    // that is down has no agent series now, but had them before).
    for label in ["node", "farm"] {
        let of = |selector: &str| {
            label_values(&prom, &format!("label_values({selector}, {label})"), farm_start)
        };
        let agents: BTreeSet<String> =
            of("shardfarm_agent_build_info").unwrap().into_iter().collect();
        let coordinator = of("shardfarm_coordinator_node_state").unwrap();
        let strangers: Vec<&String> = coordinator.iter().filter(|v| !agents.contains(*v)).collect();
        if coordinator.is_empty() || !strangers.is_empty() {
            problems.push(format!(
                "the coordinator's per-node {label} values {coordinator:?} are not the agents' {agents:?}"
            ));
        }
    }
    let labels = prom.api("/api/v1/labels", &[]).unwrap();
    for l in labels.as_array().into_iter().flatten().filter_map(Value::as_str) {
        if l.starts_with("exported_") {
            problems.push(format!("label {l}: a metric label collides with a target label"));
        }
    }

    // ---- Dashboards ----
    let mut evaluated = 0;
    let mut checked_values = 0;
    for board in boards() {
        for (uid, title, _) in MAY_BE_EMPTY {
            if *uid == board.uid && !board.titles.contains(*title) {
                problems
                    .push(format!("MAY_BE_EMPTY names {uid} / {title}, which has no such panel"));
            }
        }
        let mut vars: BTreeMap<String, String> = BTreeMap::new();
        for v in &board.variables {
            let name = v["name"].as_str().unwrap_or_default().to_string();
            match v["type"].as_str().unwrap_or_default() {
                "query" => {
                    let q = substitute(&variable_query(v), &vars, farm_age as u64);
                    match label_values(&prom, &q, farm_start) {
                        Ok(values) if !values.is_empty() => {
                            vars.insert(name, values[0].clone());
                        }
                        Ok(_) => problems
                            .push(format!("{} variable ${name} has no values: {q}", board.uid)),
                        Err(e) => {
                            problems.push(format!("{} variable ${name}: {q}: {e}", board.uid))
                        }
                    }
                }
                "custom" | "interval" => {
                    let q = variable_query(v);
                    let first = q.split(',').next().unwrap_or_default().trim().to_string();
                    vars.insert(name, first);
                }
                "constant" | "textbox" => {
                    vars.insert(name, variable_query(v));
                }
                _ => {} // datasource
            }
        }
        for (title, unit, ref_id, expr, instant) in &board.targets {
            evaluated += 1;
            let q = substitute(expr, &vars, farm_age as u64);
            let at = format!("{} / {title} / {ref_id}", board.uid);
            if q.contains('$') {
                problems.push(format!("{at}: a variable is left unsubstituted: {q}"));
                continue;
            }
            let result =
                if *instant { prom.query(&q) } else { prom.query_range(&q, farm_start, 2) };
            match result {
                Err(e) => problems.push(format!("{at}: {e}\n    {q}")),
                Ok(r) if r.is_empty() => {
                    if !MAY_BE_EMPTY.iter().any(|(u, t, _)| *u == board.uid && t == title) {
                        problems.push(format!("{at}: no series\n    {q}"));
                    }
                }
                // Grafana draws a NaN-only result as "No data" too.
                Ok(r) if values(&r).iter().all(|v| v.is_nan()) => {
                    if !MAY_BE_EMPTY.iter().any(|(u, t, _)| *u == board.uid && t == title) {
                        problems.push(format!("{at}: only NaN\n    {q}"));
                    }
                }
                Ok(r) => {
                    if let Some(p) = unit_problem(unit, &values(&r), farm_age) {
                        problems.push(format!("{at}: {p}\n    {q}"));
                    }
                    let expected =
                        EXPECT.iter().find(|(u, t, ..)| *u == board.uid && title.starts_with(t));
                    if let Some((.., min, max)) = expected {
                        let v = latest(&r).unwrap_or(f64::NAN);
                        if !(*min..=*max).contains(&v) {
                            problems.push(format!(
                                "{at}: shows {v}, this farm has {min}..={max}\n    {q}"
                            ));
                        }
                        checked_values += 1;
                    }
                }
            }
        }
    }
    assert!(evaluated > 30, "only {evaluated} panel targets found");
    assert_eq!(checked_values, EXPECT.len(), "a tile of EXPECT was not found on its dashboard");

    if let Ok(dir) = std::env::var("SHARDFARM_RENDER_DIR") {
        render(&prom, Path::new(&dir));
    }
    eprintln!(
        "dashboards_live: {evaluated} targets evaluated, {} alerts seen, {:.0} s",
        active.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(problems.is_empty(), "{} problems:\n  {}", problems.len(), problems.join("\n  "));
    drop(prom);
    farm.stop();
}

/// Renders every dashboard from the live Prometheus with `scripts/render-dashboards.py` (with
/// the set-up venv's python, matplotlib installed by `manifest-tools.sh --render`), when the
/// script exists.
fn render(prom: &Prometheus, out: &Path) {
    let script = root().join("scripts/render-dashboards.py");
    if !script.exists() {
        eprintln!(
            "SHARDFARM_RENDER_DIR is set but {} does not exist: nothing rendered",
            script.display()
        );
        return;
    }
    let tools = root().join("scripts/manifest-tools.sh");
    let py = Command::new("bash").arg(tools).arg("--render").output().unwrap();
    let py = String::from_utf8_lossy(&py.stdout).lines().last().unwrap_or("python3").to_string();
    // The farm lives a minute or two: draw its whole life, with the test's rate interval.
    let status = Command::new(py)
        .arg(&script)
        .args(["--prometheus", &format!("http://{}", prom.addr)])
        .args(["--minutes", "5", "--rate-interval", RATE_INTERVAL, "--out"])
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "render-dashboards.py failed: {status}");
}
