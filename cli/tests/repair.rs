//! Repair, rebalance and audits end to end, with real processes: `shardfarm local up` runs the
//! coordinator in-process and the agents as children; the tests kill agents for good, add an
//! agent from outside, or delete a node's data, and check that the fabric heals itself.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::{Farm, free_base_port, metric, read_all_back, start_outsider, write_random};

/// Fast timings for tests: heartbeats every 300 ms, down after 3 s, audits every second,
/// 256 KiB segments so a few MiB spread over many partitions.
/// Quick heartbeats, grace and audits; vetting off, so a node that joins takes its share at
/// once (vetting is tested in the coordinator's `sybil_sim`).
const FAST: &[&str] = &[
    "--heartbeat-ms",
    "300",
    "--grace",
    "3",
    "--audit-interval",
    "1",
    "--segment-size",
    "256KiB",
    "--vetting-audits",
    "0",
];

fn start(dir: &Path, nodes: usize) -> Farm {
    let n = nodes.to_string();
    let mut args = vec!["--nodes", n.as_str()];
    args.extend_from_slice(FAST);
    Farm::start_with(dir, free_base_port(), &args)
}

/// Stores a few files; returns (path, cap).
fn store_files(farm: &Farm, dir: &Path) -> Vec<(PathBuf, String)> {
    common::store_files(farm, dir, &[0, 1, 3 << 20, (5 << 20) + 7], 100)
}

/// Every segment of every file is on n of n holders, none of them in `excluded`.
fn fully_placed(farm: &Farm, files: &[(PathBuf, String)], excluded: &BTreeSet<String>) -> bool {
    files.iter().all(|(_, cap)| {
        let out = farm.sf(&["--json", "stat", cap]);
        if !out.status.success() {
            return false;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["segments"].as_array().unwrap().iter().all(|s| {
            s["present"] == s["total"]
                && s["holders"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|h| !excluded.contains(h.as_str().unwrap()))
        })
    })
}

fn node_id(farm: &Farm, node: usize) -> String {
    let text =
        std::fs::read_to_string(farm.dir.join(format!("node-{node}/endpoints.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["node_id"].as_str().unwrap().to_string()
}

#[test]
fn a_node_lost_for_good_is_rebuilt_elsewhere_and_then_two_more_can_fail() {
    let tmp = tempfile::tempdir().unwrap();
    // Seven nodes over three zones (3 + 2 + 2): after losing one, six remain for RS(4,2).
    let farm = start(&tmp.path().join("farm"), 7);
    let files = store_files(&farm, tmp.path());
    let v0 = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    assert!(v0 >= 1.0);

    let lost = node_id(&farm, 6);
    farm.kill9(6);
    farm.wait_for(30, "the node to be marked down", || {
        farm.coordinator_metric("shardfarm_coordinator_nodes{state=\"active_down\"}") == 1.0
    });
    farm.wait_for(30, "a layout without the lost node", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_version") > v0
    });
    // Survivors rebuild: every segment back at 6 of 6, none on the lost node.
    let excluded: BTreeSet<String> = [lost].into();
    farm.wait_for(90, "every segment back at n of n", || fully_placed(&farm, &files, &excluded));
    farm.wait_for(30, "the layout in sync", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_in_sync") == 1.0
    });
    let rebuilt =
        farm.agent_metric_sum(6, "shardfarm_agent_repaired_shards_total{method=\"rebuild\"}");
    assert!(rebuilt > 0.0, "no shard was rebuilt");

    // Now any two more nodes can fail (one from each of two zones) with nothing lost.
    farm.kill9(0);
    farm.kill9(4);
    read_all_back(&farm, &files, tmp.path(), "after-3-losses");
}

#[test]
fn a_put_with_one_holder_down_succeeds_and_repair_completes_it() {
    let tmp = tempfile::tempdir().unwrap();
    // A long grace period: the dead node stays in the layout while the file is stored.
    let mut args = vec!["--nodes", "7"];
    args.extend_from_slice(FAST);
    let at = args.iter().position(|a| *a == "--grace").unwrap();
    args[at + 1] = "15";
    let farm = Farm::start_with(&tmp.path().join("farm"), free_base_port(), &args);
    let dead = node_id(&farm, 6);
    farm.kill9(6);
    let input = tmp.path().join("in");
    write_random(&input, (4 << 20) + 3, 41);
    let out = farm.sf(&["put", input.to_str().unwrap()]);
    assert!(out.status.success(), "put: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("repair will rebuild the rest"), "{err}");
    let cap = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // Some segment has the dead node among its holders and 5 of 6 shards.
    let v = farm.stat(&cap);
    let short = v["segments"].as_array().unwrap().iter().filter(|s| s["present"] == 5).count();
    assert!(short > 0, "{v}");
    let files = vec![(input, cap)];
    read_all_back(&farm, &files, tmp.path(), "with-one-down");
    // After the grace period its slots move and the survivors complete every segment.
    let excluded: BTreeSet<String> = [dead].into();
    farm.wait_for(90, "every segment at n of n", || fully_placed(&farm, &files, &excluded));
}

#[test]
fn a_joining_node_takes_its_share_and_every_file_stays_readable_during_the_move() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = start(&tmp.path().join("farm"), 6);
    let files = store_files(&farm, tmp.path());
    let v0 = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    let (_new, http) = start_outsider(&farm, &tmp.path().join("outsider"), "zone-1", &[]);
    farm.wait_for(30, "a layout with the new node", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_version") > v0
    });
    // Read everything, again and again, until the move is done.
    let mut rounds = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        read_all_back(&farm, &files, tmp.path(), &format!("during-{rounds}"));
        rounds += 1;
        let synced = farm.coordinator_metric("shardfarm_coordinator_layout_in_sync") == 1.0;
        let held = metric(&common::http_get(&http, "/metrics"), "shardfarm_agent_shards");
        if synced && held > 0.0 && fully_placed(&farm, &files, &BTreeSet::new()) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the move did not finish in 90 s");
    }
    // The new node holds about its share (6/7 of the slots are elsewhere) and old holders
    // handed their copies off: no shard is stored twice.
    let text = common::http_get(&http, "/metrics");
    assert!(metric(&text, "shardfarm_agent_repaired_shards_total{method=\"copy\"}") > 0.0);
    farm.wait_for(60, "old holders to hand their copies off", || {
        let total: f64 = farm.agent_metric_sum(6, "shardfarm_agent_shards")
            + metric(&common::http_get(&http, "/metrics"), "shardfarm_agent_shards");
        let segments: u64 = files
            .iter()
            .map(|(_, cap)| farm.stat(cap)["segments"].as_array().unwrap().len() as u64)
            .sum();
        total == (segments * 6) as f64
    });
    read_all_back(&farm, &files, tmp.path(), "after-move");
}

#[test]
fn a_node_that_drops_its_data_is_suspended_then_disqualified_and_rebuilt_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = start(&tmp.path().join("farm"), 7);
    let files = store_files(&farm, tmp.path());
    let cheat = node_id(&farm, 3);
    // The node loses every payload file but keeps running and answering.
    let shards = farm.dir.join("node-3/shards");
    assert!(shards.is_dir(), "{} is not the payload dir", shards.display());
    std::fs::remove_dir_all(&shards).unwrap();
    std::fs::create_dir_all(&shards).unwrap();
    let mut seen_suspended = false;
    farm.wait_for(60, "the node to be disqualified", || {
        let text = farm.coordinator_metrics();
        seen_suspended |= metric(&text, "shardfarm_coordinator_nodes{state=\"suspended\"}") >= 1.0;
        metric(&text, "shardfarm_coordinator_nodes{state=\"disqualified\"}") == 1.0
    });
    assert!(seen_suspended, "the node was disqualified without being suspended first");
    assert!(farm.coordinator_metric("shardfarm_coordinator_audits_total{result=\"fail\"}") >= 2.0);
    let nodes = farm.sf(&["--json", "nodes"]);
    assert!(nodes.status.success(), "{}", String::from_utf8_lossy(&nodes.stderr));
    let v: serde_json::Value = serde_json::from_slice(&nodes.stdout).unwrap();
    let row = v.as_array().unwrap().iter().find(|n| n["id"] == cheat.as_str()).unwrap();
    assert_eq!(row["standing"], "disqualified", "{row}");
    assert!(row["reputation"].as_f64().unwrap() < 0.6, "{row}");
    let excluded: BTreeSet<String> = [cheat].into();
    farm.wait_for(90, "its data rebuilt elsewhere", || fully_placed(&farm, &files, &excluded));
    read_all_back(&farm, &files, tmp.path(), "after-dq");
    let rewards = farm.sf(&["--json", "rewards"]);
    assert!(rewards.status.success(), "{}", String::from_utf8_lossy(&rewards.stderr));
}

#[test]
fn a_holder_whose_peers_do_not_list_is_not_synced_and_the_pool_says_degraded() {
    let tmp = tempfile::tempdir().unwrap();
    // The fast timings, with a grace longer than the stall so the stalled peer stays a holder.
    let mut args = vec!["--nodes", "6"];
    args.extend_from_slice(FAST);
    let grace = args.iter().position(|a| *a == "--grace").unwrap() + 1;
    args[grace] = "30";
    let farm = Farm::start_with(&tmp.path().join("farm"), free_base_port(), &args);
    common::settled(&farm);
    let files = store_files(&farm, tmp.path());
    farm.wait_for(60, "the first layout in sync", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_in_sync") == 1.0
    });
    let v0 = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    // A holder of every partition stalls (SIGSTOP: it accepts connections and answers
    // nothing) while a new node joins and has to copy its share.
    let stalled = common::Frozen::new(farm.agent_pid(1));
    let stall_began = std::time::Instant::now();
    let (_new, http) = start_outsider(&farm, &tmp.path().join("outsider"), "zone-1", &[]);
    farm.wait_for(20, "a layout with the new node", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_version") > v0
    });
    // While the stalled holder cannot list, the new node has proven nothing: the pool is
    // not in sync (the fallback layout stays published) and reports shards to repair.
    let v1 = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    // Watched until just before the stall would outlive the grace (25 s of 30): long enough
    // for the new node's passes to meet the stalled holder and finish without it.
    while stall_began.elapsed() < std::time::Duration::from_secs(25) {
        let text = farm.coordinator_metrics();
        assert_eq!(
            metric(&text, "shardfarm_coordinator_layout_in_sync"),
            0.0,
            "the layout was declared in sync while a holder had not listed"
        );
        assert!(
            metric(&text, "shardfarm_coordinator_degraded_shards") > 0.0,
            "the pool reported nothing to repair while a holder had not listed"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let newcomer = common::http_get(&http, "/metrics");
    assert!(
        metric(&newcomer, "shardfarm_agent_synced_layout_version") < v1,
        "the new node claimed sync while a holder had not listed"
    );
    let stalled_for = stall_began.elapsed();
    assert!(stalled_for < std::time::Duration::from_secs(28), "the stall outlived the grace");
    let thawed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    drop(stalled);
    // Once it answers again the move completes and is proven.
    farm.wait_for(90, "the layout in sync after the stall", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_in_sync") == 1.0
    });
    assert!(fully_placed(&farm, &files, &BTreeSet::new()));
    // The pass that met the stalled holder failed (and was retried), it did not sync.
    let newcomer = common::http_get(&http, "/metrics");
    assert!(metric(&newcomer, "shardfarm_agent_repair_passes_failed_total") >= 1.0);
    // Every partition it holds was proven after the stall ended, none during it.
    let proven = metric(&newcomer, "shardfarm_agent_repair_proven_timestamp_seconds");
    assert!(proven >= thawed - 1.0, "proven at {proven}, the stall ended at {thawed}");
    read_all_back(&farm, &files, tmp.path(), "after-stall");
}

#[test]
fn a_segment_still_being_written_is_not_counted_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec!["--nodes", "6", "--repair-interval", "1"];
    args.extend_from_slice(FAST);
    let farm = Farm::start_with(&tmp.path().join("farm"), free_base_port(), &args);
    let f = common::settled(&farm);
    // An upload caught halfway: 2 of its 6 shards (k = 4) have reached their holders.
    let writer = common::hostile::Hostile::new();
    let own = writer.own_segment(&f, 4096);
    let p = shardfarm_core::shard::partition(&own.header.object_id, 0, f.partitions);
    let holders = &f.layout[p as usize];
    for (slot, &holder) in holders.iter().enumerate().take(2) {
        writer
            .put(&f.nodes[holder], &own.header_bytes, slot as u32, own.shards[slot].clone())
            .unwrap();
    }
    // The other holders see fewer than k shards of a segment created seconds ago: being
    // written, not lost.
    farm.wait_for(30, "the holders to see the segment being written", || {
        farm.agent_metric_sum(6, "shardfarm_agent_segments_being_written") > 0.0
    });
    let passes = farm.agent_metric_sum(6, "shardfarm_agent_repair_pass_duration_seconds_count");
    farm.wait_for(30, "two more passes on every node", || {
        farm.agent_metric_sum(6, "shardfarm_agent_repair_pass_duration_seconds_count")
            >= passes + 12.0
    });
    assert_eq!(farm.agent_metric_sum(6, "shardfarm_agent_lost_segments"), 0.0);
    assert_eq!(farm.coordinator_metric("shardfarm_coordinator_lost_segments"), 0.0);
    assert_eq!(farm.coordinator_metric("shardfarm_coordinator_layout_in_sync"), 1.0);
}

/// Anti-entropy costs a comparison while nothing changes: a pool in sync compares partition
/// summaries and lists nothing; a holder that missed a put disagrees, is listed and repaired.
#[test]
fn a_quiet_pool_lists_nothing_and_a_holder_that_missed_a_put_is_listed_and_repaired() {
    let tmp = tempfile::tempdir().unwrap();
    // A grace longer than the stall below, and passes every 2 s.
    let mut args = vec!["--nodes", "6", "--repair-interval", "2"];
    args.extend_from_slice(FAST);
    let grace = args.iter().position(|a| *a == "--grace").unwrap() + 1;
    args[grace] = "30";
    let farm = Farm::start_with(&tmp.path().join("farm"), free_base_port(), &args);
    common::settled(&farm);
    let mut files = store_files(&farm, tmp.path());
    farm.wait_for(60, "the layout in sync", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_in_sync") == 1.0
    });
    let agreed = || {
        farm.agent_metric_sum(
            6,
            "shardfarm_agent_repair_partitions_compared_total{result=\"agreed\"}",
        )
    };
    let listed = || {
        farm.agent_metric_sum(
            6,
            "shardfarm_agent_repair_partitions_compared_total{result=\"listed\"}",
        )
    };
    // Once every holder has everything, passes agree on every partition (256 per node and
    // pass: six nodes, RS(4,2), each holds a slot of every partition) and list none.
    farm.wait_for(60, "a pass of every node agreeing on every partition", || {
        let a0 = agreed();
        let l0 = listed();
        std::thread::sleep(std::time::Duration::from_secs(6));
        agreed() >= a0 + 6.0 * 256.0 && listed() == l0
    });
    let (a0, l0) = (agreed(), listed());
    std::thread::sleep(std::time::Duration::from_secs(8));
    assert!(agreed() >= a0 + 6.0 * 256.0, "quiet passes did not compare summaries");
    assert_eq!(listed(), l0, "a quiet pool listed partitions");

    // Node 5 stalls through a put: the file lands on five nodes of six.
    let stalled = common::Frozen::new(farm.agent_pid(5));
    let input = tmp.path().join("missed");
    write_random(&input, (2 << 20) + 5, 77);
    let out = farm.sf(&["put", input.to_str().unwrap()]);
    assert!(out.status.success(), "put: {}", String::from_utf8_lossy(&out.stderr));
    let cap = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        farm.stat(&cap)["segments"].as_array().unwrap().iter().any(|s| s["present"] == 5),
        "the stalled node got the file anyway"
    );
    drop(stalled);
    files.push((input, cap));
    // Its summaries now differ from its peers': the partitions are listed and it repairs.
    farm.wait_for(90, "every segment at n of n", || fully_placed(&farm, &files, &BTreeSet::new()));
    assert!(listed() > l0, "the partitions that differ were not listed");
    assert!(
        farm.agent_metric(5, "shardfarm_agent_repaired_shards_total{method=\"rebuild\"}") > 0.0,
        "the node that missed the put rebuilt nothing"
    );
    read_all_back(&farm, &files, tmp.path(), "after-missed-put");
}
