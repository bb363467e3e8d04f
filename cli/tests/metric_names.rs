//! Every metric a dashboard or an alert uses is exported by a running agent or coordinator:
//! the test starts a local farm, gives it work (a put, a get, audits, a closed rewards epoch),
//! scrapes `/metrics` of an agent and of the coordinator, and looks up every `shardfarm_*` name
//! found in `dashboards/*.json` and the chart's alert rules.

mod common;

use std::collections::BTreeSet;

use common::{Farm, free_base_port, http_get, write_random};

/// `shardfarm_*` names in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("shardfarm_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end] == b'_'
                || bytes[end].is_ascii_digit())
        {
            end += 1;
        }
        // Skip identifiers that merely contain the prefix (e.g. a label value).
        let before = if start == 0 { b' ' } else { bytes[start - 1] };
        if !(before.is_ascii_alphanumeric() || before == b'_') {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Names with samples in a scrape.
fn exported(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_metric_in_dashboards_and_alerts_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut used = BTreeSet::new();
    for entry in std::fs::read_dir(root.join("dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            used.extend(names(&std::fs::read_to_string(&path).unwrap()));
        }
    }
    let alerts = root.join("charts/shardfarm/files/alerts/shardfarm.rules.yaml");
    used.extend(names(&std::fs::read_to_string(alerts).unwrap()));
    assert!(used.len() > 20, "found only {used:?}");

    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        &[
            "--heartbeat-ms",
            "300",
            "--audit-interval",
            "1",
            "--epoch-seconds",
            "1",
            "--segment-size",
            "1MiB",
        ],
    );
    let file = tmp.path().join("in");
    write_random(&file, 3 << 20, 7);
    let cap = farm.put(&file);
    assert!(farm.get(&cap, &tmp.path().join("out")).status.success());
    farm.wait_for(60, "audits and a closed rewards epoch", || {
        let c = farm.coordinator_metrics();
        common::metric(&c, "shardfarm_coordinator_audits_total{result=\"pass\"}") > 0.0
            && c.contains("shardfarm_coordinator_rewards{")
            && c.contains("shardfarm_coordinator_farm_rewards{")
    });
    let mut have = exported(&farm.coordinator_metrics());
    for i in 0..6 {
        have.extend(exported(&http_get(
            &format!("127.0.0.1:{}", farm.base_port as usize + 2 * i + 1),
            "/metrics",
        )));
    }
    let missing: Vec<&String> = used.iter().filter(|n| !have.contains(*n)).collect();
    assert!(missing.is_empty(), "used in dashboards/alerts but not exported: {missing:?}");
}
