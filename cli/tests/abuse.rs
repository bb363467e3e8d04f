//! Abuse that must cost a farm nothing: a flood of requests from a stranger who has not done
//! the work (unsigned, unmined, replayed, forged), and a member that never stops sending.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::fake_agent::{Behaviour, FakeAgent};
use common::flood::{FLOOD_FROM, answered, flood};
use common::{Farm, free_base_port, metric, rss, same, settled, write_random};
use shardfarm_core::identity::NodeId;
use tonic::Code;

fn put_and_read_back(farm: &Farm, dir: &Path, name: &str, len: usize, seed: u64) {
    let p = dir.join(format!("{name}.bin"));
    write_random(&p, len, seed);
    let cap = farm.put(&p);
    let back = dir.join(format!("{name}.back"));
    let r = farm.get(&cap, &back);
    assert!(r.status.success(), "get {name}: {}", String::from_utf8_lossy(&r.stderr));
    assert!(same(&p, &back), "{name} changed");
}

/// Floods the farm's agents and coordinator from `from` for `secs` while the farm's client
/// puts and reads back files of `len` bytes; returns the flood's tally.
fn flood_during_honest_work(
    farm: &Farm,
    dir: &Path,
    from: &'static str,
    secs: u64,
    len: usize,
) -> common::flood::Tally {
    let f = common::hostile::farm_file(&farm.dir);
    let agents: Vec<(String, NodeId)> =
        f.nodes.iter().map(|n| (n.grpc.clone(), NodeId::from_hex(&n.id).unwrap())).collect();
    let coordinator = format!("127.0.0.1:{}", farm.base_port - 2);
    let pool = NodeId::from_hex(f.pool_id.as_deref().unwrap()).unwrap();
    let length = Duration::from_secs(secs);
    let flooding = std::thread::spawn(move || flood(from, &agents, &coordinator, pool, length, 8));
    // Honest work all through the flood: every put and get succeeds.
    let mut rounds = 0;
    while !flooding.is_finished() {
        put_and_read_back(farm, dir, &format!("during-{rounds}"), len, rounds);
        rounds += 1;
    }
    let tally = flooding.join().unwrap();
    println!("honest rounds: {rounds}; flood answers: {:?}", tally.lock().unwrap());
    assert!(rounds >= 2, "too few honest rounds ran: {rounds}");
    tally
}

/// The flood's connections (one to each of the 6 agents and the coordinator, 8 request loops
/// on each) were left unread after their failures, not answered at the rate they sent: a
/// connection whose requests fail is not read for 50 ms, doubled with each failure in a row
/// up to 5 s, so each is read about once per 5 s, answering (or timing out, 5 s) its 8 loops.
/// An unpaused flood is answered thousands of times a second.
fn flood_was_left_unread(tally: &common::flood::Tally, secs: u64) {
    let total: u64 = tally.lock().unwrap().values().sum();
    let bound = 7 * 8 * 2 * (secs / 5 + 2);
    assert!(total <= bound, "{total} answers in {secs} s, more than {bound}: {tally:?}");
    assert!(answered(tally, Code::Cancelled) > 0, "no request waited unread: {tally:?}");
}

/// Heartbeats went on through a flood: no node was marked down, all `nodes` are active and
/// the layout is still at `version` (coordinator metrics `c`).
fn heartbeats_went_on(c: &str, nodes: usize, version: f64) {
    assert_eq!(metric(c, "shardfarm_coordinator_nodes{state=\"active_down\"}"), 0.0);
    assert_eq!(metric(c, "shardfarm_coordinator_nodes{state=\"active\"}"), nodes as f64);
    assert_eq!(metric(c, "shardfarm_coordinator_layout_version"), version);
}

#[test]
fn an_unmined_flood_leaves_honest_clients_and_heartbeats_unaffected() {
    // The flood comes from its own loopback address, as from another machine.
    if std::net::TcpListener::bind((FLOOD_FROM, 0)).is_err() {
        panic!("{FLOOD_FROM} is not a usable loopback address on this machine");
    }
    let tmp = tempfile::tempdir().unwrap();
    // A 3 s grace: heartbeats held up for 3 s would mark nodes down and churn the layout.
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        &["--nodes", "6", "--grace", "3"],
    );
    settled(&farm);
    let version = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    let tally = flood_during_honest_work(&farm, tmp.path(), FLOOD_FROM, 15, 700 * 1024);
    // Only the first use of the replayed request is answered, once per agent.
    assert!(answered(&tally, Code::Ok) <= 6, "{tally:?}");
    flood_was_left_unread(&tally, 15);
    let series =
        |reason: &str| format!("shardfarm_agent_auth_failures_total{{reason=\"{reason}\"}}");
    assert_eq!(farm.agent_metric_sum(6, &series("replay_cache_full")), 0.0);
    assert_eq!(farm.agent_metric_sum(6, &series("identity_replay_share")), 0.0);
    let c = farm.coordinator_metrics();
    let failures: f64 = c
        .lines()
        .filter(|l| l.starts_with("shardfarm_coordinator_auth_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(failures > 0.0, "the coordinator was flooded too");
    heartbeats_went_on(&c, 6, version);
}

#[test]
fn a_flood_from_the_same_address_does_not_lock_out_callers_known_there() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        &["--nodes", "6", "--grace", "3"],
    );
    settled(&farm);
    // The farm's client has worked with every node before the flood starts.
    put_and_read_back(&farm, tmp.path(), "before", 700 * 1024, 1);
    let version = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    // From 127.0.0.1, like the honest client and every agent's heartbeat.
    let tally = flood_during_honest_work(&farm, tmp.path(), "127.0.0.1", 10, 300 * 1024);
    flood_was_left_unread(&tally, 10);
    heartbeats_went_on(&farm.coordinator_metrics(), 6, version);
}

#[test]
fn a_member_that_never_stops_sending_cannot_exhaust_its_peers() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        // Vetting off: the endless member gets its share of slots at once.
        &["--nodes", "7", "--grace", "5", "--repair-interval", "2", "--vetting-audits", "0"],
    );
    let files: Vec<(PathBuf, String)> = (0..8)
        .map(|i| {
            let p = tmp.path().join(format!("f-{i}.bin"));
            write_random(&p, 64 * 1024 + i, 900 + i as u64);
            (p.clone(), farm.put(&p))
        })
        .collect();
    let f = settled(&farm);
    let v0 = farm.coordinator_metric("shardfarm_coordinator_layout_version");
    let honest: Vec<String> = f.nodes.iter().map(|n| n.grpc.clone()).collect();
    let fake = FakeAgent::join_as(&f, honest, "zone-9", Behaviour::Overflow);
    farm.wait_for(60, "a layout that gives the endless member slots", || {
        farm.coordinator_metric("shardfarm_coordinator_layout_version") > v0
    });
    // A node dies: its slots are repaired by peers that list and fetch from the endless
    // member too (it is a holder of the partitions it was given).
    farm.kill9(1);
    let survivors: Vec<usize> = (0..7).filter(|&i| i != 1).collect();
    let pids: Vec<u32> = survivors.iter().map(|&i| farm.agent_pid(i)).collect();
    // Repair passes that met the endless member: its peers listed from it and fetched from it
    // after the kill (it counts the calls it serves). Whether their passes also finish while it
    // is a holder is not asserted: under a full test run's load some did not within 240 s (a
    // known gap in ARCHITECTURE.md); what is asserted is that it exhausts nobody.
    let served_before_kill = fake.served();
    farm.wait_for(240, "repair passes that met the endless member", || {
        fake.served() >= served_before_kill + 20
    });
    // Several more repair passes (2 s apart) against it.
    std::thread::sleep(Duration::from_secs(10));
    for (&i, &pid) in survivors.iter().zip(&pids) {
        assert_eq!(farm.agent_pid(i), pid, "agent {i} restarted");
        let r = rss(pid);
        assert!(r > 0, "agent {i} (pid {pid}) is gone");
        assert!(r < 1 << 30, "agent {i} holds {} MiB", r >> 20);
    }
    // Readers that meet it as a holder get every file back.
    for (i, (p, cap)) in files.iter().enumerate() {
        let out = tmp.path().join(format!("back-{i}.bin"));
        let r = farm.get(cap, &out);
        assert!(r.status.success(), "get {i}: {}", String::from_utf8_lossy(&r.stderr));
        assert!(same(p, &out), "file {i} changed");
    }
    // What bounded them: the client library every reader, repairer and the auditor use
    // stops at the header's shard length and at the page size asked for.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (me, _) = shardfarm_core::identity::Identity::generate(8, 1, &|_| {}).unwrap();
    let signer = std::sync::Arc::new(shardfarm_proto::Signer::identity(&me));
    let cap: shardfarm_core::cap::ReadCap = files[0].1.parse().unwrap();
    rt.block_on(async {
        let mut c = shardfarm_proto::AgentClient::connect(
            &fake.grpc,
            NodeId::from_hex(&fake.id).unwrap(),
            signer,
        )
        .await
        .unwrap();
        let id = shardfarm_core::shard::ShardId { object_id: cap.object_id, segment: 0, shard: 0 };
        let call = c.get_shard(id, 0, 0);
        let err = tokio::time::timeout(Duration::from_secs(30), call).await.unwrap().unwrap_err();
        assert!(err.message().contains("more bytes than the shard"), "{err}");
        let err = c.list_shards(0, None, 100).await.unwrap_err();
        assert!(err.message().contains("listed more than the 100 entries"), "{err}");
    });
}
