//! A stranger with a one-second identity against a running farm: it cannot plant shards
//! under other people's object ids, cannot put where the layout does not say, cannot make a
//! handoff delete real data, and cannot bring back what its uploader deleted.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::hostile::{Hostile, farm_file};
use common::{Farm, free_base_port, metric, same, settled, start_outsider, write_random};
use tonic::Code;

/// A farm whose hostile members get slots as soon as they join: vetting (which would keep a
/// newcomer's share tiny until it passes audits) is off here, so the attacks reach the data
/// path; vetting itself is tested in the coordinator's `sybil_sim`.
fn start(dir: &Path, extra: &[&str]) -> Farm {
    let mut args =
        vec!["--nodes", "7", "--grace", "5", "--repair-interval", "2", "--vetting-audits", "0"];
    args.extend_from_slice(extra);
    Farm::start_with(dir, free_base_port(), &args)
}

fn store_files(farm: &Farm, dir: &Path) -> Vec<(PathBuf, String)> {
    [300 * 1024, 1 << 20, 5 << 20]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let p = dir.join(format!("honest-{i}.bin"));
            write_random(&p, len, 100 + i as u64);
            let cap = farm.put(&p);
            (p, cap)
        })
        .collect()
}

fn read_all_back(farm: &Farm, files: &[(PathBuf, String)], dir: &Path) {
    for (i, (p, cap)) in files.iter().enumerate() {
        let out = dir.join(format!("back-{i}.bin"));
        let r = farm.get(cap, &out);
        assert!(r.status.success(), "get {i}: {}", String::from_utf8_lossy(&r.stderr));
        assert!(same(p, &out), "file {i} changed");
    }
}

fn fully_present(farm: &Farm, cap: &str) -> bool {
    farm.stat(cap)["segments"].as_array().unwrap().iter().all(|s| s["present"] == s["total"])
}

#[test]
fn a_stranger_cannot_plant_shards_under_honest_ids_nor_outside_the_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = start(&tmp.path().join("farm"), &[]);
    let files = store_files(&farm, tmp.path());
    let f = settled(&farm);
    let evil = Hostile::new();

    // 1. It lists partitions and learns the honest object ids (listing stays open).
    let mut victims: BTreeSet<([u8; 32], u32, u32)> = BTreeSet::new();
    for p in 0..f.partitions {
        let holder = &f.nodes[f.layout[p as usize][0]];
        for e in evil.list(holder, p) {
            let k = e.key.unwrap();
            victims.insert((k.object_id[..].try_into().unwrap(), k.segment_index, p));
        }
    }
    assert!(victims.len() >= 3, "the stranger should see the honest segments: {victims:?}");

    // 2. It sends its own 18-byte junk under each victim's (object, segment), k = 1, m = 5,
    //    signed with its own key, to every node, every slot: all refused, each saying why.
    let mut refused = 0;
    for &(obj, seg, _) in &victims {
        let (header, junk) = evil.forged_header(obj, seg);
        for node in &f.nodes {
            for slot in 0..6 {
                let err = evil.put(node, &header, slot, junk.clone()).unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
                assert!(err.message().contains("does not derive"), "{}", err.message());
                refused += 1;
            }
        }
    }
    // Its own, validly signed object, sent to nodes the layout does not name for the slot.
    let own = evil.own_segment(&f, 4096);
    let p = shardfarm_core::shard::partition(&own.header.object_id, 0, f.partitions);
    let holders = &f.layout[p as usize];
    let fallback = f.previous_layout.as_ref().map(|l| l[p as usize].clone()).unwrap_or_default();
    for (slot, shard) in own.shards.iter().enumerate() {
        let outsider = (0..f.nodes.len())
            .find(|n| !holders.contains(n) && fallback.get(slot) != Some(n))
            .unwrap();
        let err = evil
            .put(&f.nodes[outsider], &own.header_bytes, slot as u32, shard.clone())
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let holder = &f.nodes[holders[slot]].id;
        assert!(err.message().contains(holder.as_str()), "{}", err.message());
        refused += 1;
    }
    let refused_by_agents = farm.agent_metric_sum(
        7,
        "shardfarm_agent_requests_total{method=\"PutShard\",result=\"invalid_argument\"}",
    ) + farm.agent_metric_sum(
        7,
        "shardfarm_agent_requests_total{method=\"PutShard\",result=\"failed_precondition\"}",
    );
    assert_eq!(refused_by_agents, f64::from(refused));

    // 3. A layout change and a full repair and handoff round: a new node joins.
    let v0 = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    let (_new, _http) =
        start_outsider(&farm, &tmp.path().join("outsider"), "zone-1", &["--repair-interval", "2"]);
    farm.wait_for(120, "a new layout, fully synced", || {
        let text = farm.coordinator_metrics();
        metric(&text, "shardfarm_coordinator_layout_version") > v0
            && metric(&text, "shardfarm_coordinator_layout_in_sync") == 1.0
    });
    farm.wait_for(60, "every shard handed off with a proof", || {
        farm.agent_metric_sum(7, "shardfarm_agent_handed_off_shards_total") > 0.0
    });
    // It claimed zone-1, but it holds no grant of the farm's key: the pool gave it its owner
    // root as its failure domain, and the farm's own agents kept their zones.
    farm.wait_for(30, "the newcomer in the farm file", || {
        common::hostile::farm_file(&farm.dir).nodes.len() == 8
    });
    let f = common::hostile::farm_file(&farm.dir);
    assert!(f.nodes[7].zone.starts_with("root-"), "outsider's domain: {:?}", f.nodes[7]);
    assert!(f.nodes[..7].iter().all(|n| n.zone.starts_with("zone-")), "{:?}", f.nodes);

    // 4. Every honest file reads back identical; no honest shard was deleted.
    read_all_back(&farm, &files, tmp.path());
    for (_, cap) in &files {
        farm.wait_for(60, "every honest segment whole", || fully_present(&farm, cap));
    }
}

#[test]
fn rm_while_a_holder_is_stalled_is_not_resurrected_when_it_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = start(&tmp.path().join("farm"), &[]);
    let file = tmp.path().join("doomed.bin");
    write_random(&file, 1 << 20, 7);
    let cap = farm.put(&file);
    let f = farm_file(&farm.dir);
    let holder0 = farm.stat(&cap)["segments"][0]["holders"][0].as_str().unwrap().to_string();
    let node = f.nodes.iter().find(|n| n.id == holder0).unwrap().index;
    let pid = farm.agent_pid(node).to_string();

    // The holder of shard 0 hangs (accepts connections, never answers) during the rm.
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let r = farm.sf(&["rm", &cap]);
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr).to_string();
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("deleted 5 shards"), "{stderr}");
    assert!(stderr.contains("did not answer"), "{stderr}");

    // It comes back with its shard; its next repair pass copies the tombstone and deletes
    // it; nobody rebuilds the object; the layout stays in sync.
    let http = &f.nodes[node].http;
    farm.wait_for(60, "the returning holder to apply the tombstone", || {
        let m = common::http_get(http, "/metrics");
        metric(&m, "shardfarm_agent_collected_shards_total{reason=\"tombstone\"}") >= 1.0
    });
    let st = farm.sf(&["stat", &cap]);
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(!st.status.success() && err.contains("0 of 6 present"), "resurrected? {err}");
    // The stall outlasted the 5 s grace, so the holder was also marked down and its slots
    // re-placed meanwhile: the new holders must not rebuild the deleted object either.
    farm.wait_for(60, "the layout in sync again", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_in_sync") == 1.0
    });
    assert_eq!(farm.agent_metric_sum(7, "shardfarm_agent_shards"), 0.0);
    // A later put of the same object (say, a replayed upload) is refused everywhere.
    assert_eq!(farm.get(&cap, &tmp.path().join("gone.bin")).status.code(), Some(1));
}

#[test]
fn a_segment_that_never_became_readable_is_collected_and_does_not_block_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = start(&tmp.path().join("farm"), &["--gc-grace", "3"]);
    let f = settled(&farm);
    let evil = Hostile::new();
    // Only shard 0 of a segment, to the node the layout names for it.
    let own = evil.own_segment(&f, 10_000);
    let p = shardfarm_core::shard::partition(&own.header.object_id, 0, f.partitions);
    let holder = &f.nodes[f.layout[p as usize][0]];
    evil.put(holder, &own.header_bytes, 0, own.shards[0].clone()).unwrap();
    assert_eq!(evil.list(holder, p).len(), 1);

    // The other holders cannot rebuild their slots (1 shard < k): they report the segment
    // lost and still reach sync; after the grace period the lone shard is collected.
    farm.wait_for(60, "the lone shard to be collected", || evil.list(holder, p).is_empty());
    assert!(
        farm.agent_metric_sum(
            7,
            "shardfarm_agent_collected_shards_total{reason=\"unreadable_segment\"}"
        ) >= 1.0
    );
    // A layout change completes: nothing is stuck on the unreadable segment.
    let v0 = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    let (_new, _http) =
        start_outsider(&farm, &tmp.path().join("outsider"), "zone-1", &["--repair-interval", "2"]);
    farm.wait_for(120, "the new layout in sync", || {
        let text = farm.coordinator_metrics();
        metric(&text, "shardfarm_coordinator_layout_version") > v0
            && metric(&text, "shardfarm_coordinator_layout_in_sync") == 1.0
    });
    for n in &f.nodes {
        assert!(
            evil.list(n, p)
                .iter()
                .all(|e| { e.key.as_ref().unwrap().object_id[..] != own.header.object_id })
        );
    }
}

#[test]
fn a_member_serving_junk_is_not_copied_from_is_reported_and_fails_its_audits() {
    let tmp = tempfile::tempdir().unwrap();
    // Audits every 20 s: the junk server fails a sync check at once and then one per
    // interval, so it is suspended (and its slots re-placed) only after the repairs below
    // have met it; at 2 s it could be gone before a repairer lists from it.
    let farm = start(&tmp.path().join("farm"), &["--audit-interval", "20"]);
    // 32 one-segment files: partitions enough that the junk server and the node that dies
    // share some with data. The junk server never proves its sync, so the pool stays out of
    // sync and gives it only the first round's share of slots (a sixteenth of all): with 8
    // files about one run in twenty had no such partition.
    let files: Vec<(PathBuf, String)> = (0..32)
        .map(|i| {
            let p = tmp.path().join(format!("small-{i}.bin"));
            write_random(&p, 64 * 1024 + i, 500 + i as u64);
            let cap = farm.put(&p);
            (p, cap)
        })
        .collect();
    let f = settled(&farm);
    let v0 = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    let honest: Vec<String> = f.nodes.iter().map(|n| n.grpc.clone()).collect();
    let fake = common::fake_agent::FakeAgent::join(&f, honest, "zone-9");
    farm.wait_for(60, "a layout that gives the junk server slots", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_version") > v0
    });
    // It says at once that it has repaired for the layout; asked for segments of the slots
    // it gained, it cannot prove them, so its word does not end the readers' fallback.
    farm.wait_for(60, "the junk server's claim of sync to be checked and refused", || {
        farm.coordinator_metric("shardfarm_coordinator_sync_checks_total{result=\"fail\"}") > 0.0
    });
    assert_eq!(farm.coordinator_metric("shardfarm_coordinator_layout_in_sync"), 0.0);

    // An honest node dies for good: the new holders of its slots repair, and the junk server
    // lists a copy of every shard. Forged headers and corrupt bytes are refused and counted;
    // the shards are rebuilt from honest peers instead.
    farm.kill9(1);
    let refused = |reason: &str| {
        farm.agent_metric_sum(
            7,
            &format!("shardfarm_agent_repair_bad_sources_total{{reason=\"{reason}\"}}"),
        )
    };
    farm.wait_for(120, "repairers to refuse the junk server's forged headers", || {
        refused("forged_header") > 0.0
    });
    farm.wait_for(60, "…and its corrupt bytes", || refused("corrupt") > 0.0);
    // Per-node series carry the node's short id (an outsider is also named by it).
    let fake_id = format!("node_id=\"{}\"", &fake.id[..12]);
    farm.wait_for(60, "peers to report it to the coordinator", || {
        farm.coordinator_metrics().lines().any(|l| {
            l.starts_with("shardfarm_coordinator_peer_complaints_total{")
                && l.contains(&fake_id)
                && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) > 0.0
        })
    });
    // The auditor checks the id against the signer of the header it is given: it fails.
    farm.wait_for(60, "the junk server to fail audits", || {
        farm.coordinator_metric("shardfarm_coordinator_audits_total{result=\"fail\"}") > 0.0
    });
    read_all_back(&farm, &files, tmp.path());
}

#[test]
fn a_stalled_node_costs_each_call_at_most_its_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    // A long grace: the frozen node stays in the layout for the whole test, as a hung edge
    // box that still accepts connections would until it is declared down.
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        &["--nodes", "7", "--grace", "600", "--repair-interval", "2"],
    );
    let f = settled(&farm);
    let before = tmp.path().join("before.bin");
    write_random(&before, 3 << 20, 11);
    let cap_before = farm.put(&before);
    // The frozen node holds a shard of `before` (so stat and rm meet it).
    let holder0 = farm.stat(&cap_before)["segments"][0]["holders"][0].as_str().unwrap().to_string();
    let frozen = f.nodes.iter().find(|n| n.id == holder0).unwrap().index;
    let pid = farm.agent_pid(frozen).to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();

    // put: the shard for the frozen node times out, the segment lands on n - 1.
    let during = tmp.path().join("during.bin");
    write_random(&during, 3 << 20, 12);
    let started = std::time::Instant::now();
    let out = farm.sf(&["put", during.to_str().unwrap()]);
    let put_took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let cap_during = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let parsed: shardfarm_core::cap::ReadCap = cap_during.parse().unwrap();
    let p = shardfarm_core::shard::partition(&parsed.object_id, 0, f.partitions);
    if f.layout[p as usize].contains(&frozen) {
        assert!(stderr.contains("repair will rebuild the rest"), "{stderr}");
    }
    // get, stat and rm answer with the frozen node silent.
    read_all_back(
        &farm,
        &[(before.clone(), cap_before.clone()), (during.clone(), cap_during.clone())],
        tmp.path(),
    );
    let st = farm.stat(&cap_before);
    assert_eq!(st["segments"][0]["present"], 5, "{st}");
    let r = farm.sf(&["rm", &cap_before]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("did not answer"));
    // Bounded: two 10 s attempts for the frozen node's shard, not forever.
    assert!(put_took < std::time::Duration::from_secs(60), "put took {put_took:?}");

    // Back: repair completes the segment put meanwhile, and the rm reaches it too.
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    farm.wait_for(90, "the segment put meanwhile to be whole", || {
        fully_present(&farm, &cap_during)
    });
    farm.wait_for(60, "the deleted object gone from the frozen node too", || {
        let m = common::http_get(&f.nodes[frozen].http, "/metrics");
        metric(&m, "shardfarm_agent_collected_shards_total{reason=\"tombstone\"}") >= 1.0
    });
}
