//! A control plane nobody can impersonate: every hop is TLS bound to the identity the caller
//! pins, and, underneath, layouts are believed only when the pool key signs them and only
//! when newer than the last one accepted.

mod common;

use common::mitm::{Mitm, Mode};
use common::{
    Farm, coordinator_pid, free_base_port, metric, read_all_back, settled, start_outsider_via,
    store_files,
};
use shardfarm_core::identity::NodeId;
use shardfarm_proto::Security;

/// Under TLS a man in the middle between an agent and the coordinator gets nowhere: it cannot
/// prove the pool key, so the agent refuses the connection (and says whom it met instead),
/// never joins, and the farm reads on.
#[test]
fn an_agent_refuses_a_man_in_the_middle_that_cannot_prove_the_pool_key() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(&tmp.path().join("farm"), free_base_port(), &["--nodes", "6"]);
    let f = settled(&farm);
    let pool = NodeId::from_hex(f.pool_id.as_deref().unwrap()).unwrap();
    let files = store_files(&farm, tmp.path(), &[300 * 1024], 500);
    let mitm = Mitm::start(f.coordinator.as_deref().unwrap(), pool, Security::Tls);
    let (_agent, http) =
        start_outsider_via(&farm, &mitm.addr, &tmp.path().join("behind"), "zone-3", &[]);
    let log = || std::fs::read_to_string(tmp.path().join("behind.log")).unwrap_or_default();
    farm.wait_for(30, "the agent to refuse the proxy's key", || {
        log().contains(&format!("not node {pool}"))
    });
    let m = common::http_get(&http, "/metrics");
    assert_eq!(metric(&m, "shardfarm_agent_layout_version"), 0.0, "{m}");
    assert_eq!(metric(&m, "shardfarm_agent_shards"), 0.0, "{m}");
    assert_eq!(common::hostile::farm_file(&farm.dir).nodes.len(), 6, "the proxy's agent joined");
    read_all_back(&farm, &files, tmp.path(), "behind-mitm");
}

/// With TLS switched off (`--insecure-plaintext`, for debugging), the signatures still hold:
/// a man in the middle between one agent and the coordinator rewrites the layout it is sent
/// (every slot to itself) four ways: the pool's signature kept over altered bytes, its own key,
/// no signature, an older genuine publication replayed. The agent refuses each with its reason,
/// keeps the last good layout, deletes nothing, and every file still reads back.
#[test]
fn without_tls_an_agent_still_refuses_layouts_forged_on_the_way_and_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        // Vetting off: the agent behind the proxy takes its share at once.
        &[
            "--nodes",
            "6",
            "--grace",
            "5",
            "--repair-interval",
            "1",
            "--insecure-plaintext",
            "--vetting-audits",
            "0",
        ],
    );
    let f = settled(&farm);
    let pool = NodeId::from_hex(f.pool_id.as_deref().unwrap()).unwrap();
    let files = store_files(&farm, tmp.path(), &[200 * 1024, 3 << 20], 500);

    // The agent behind the proxy joins and takes its share of the files while the proxy is
    // honest.
    let plaintext = Security::InsecurePlaintext;
    let mitm = Mitm::start(f.coordinator.as_deref().unwrap(), pool, plaintext);
    let behind = tmp.path().join("behind");
    let (_agent, http) =
        start_outsider_via(&farm, &mitm.addr, &behind, "zone-3", &["--insecure-plaintext"]);
    let scrape = || common::http_get(&http, "/metrics");
    // The move budget hands a newcomer its share over several rounds, each after the last is
    // in sync: on a loaded machine that can take minutes.
    farm.wait_for(180, "the agent behind the proxy holds shards and is in sync", || {
        let m = scrape();
        let v = metric(&m, "shardfarm_agent_layout_version");
        metric(&m, "shardfarm_agent_shards") > 0.0
            && v > 0.0
            && metric(&m, "shardfarm_agent_synced_layout_version") == v
            && farm.coordinator_metric("shardfarm_coordinator_layout_in_sync") == 1.0
    });
    let before = scrape();
    let (shards, version) = (
        metric(&before, "shardfarm_agent_shards"),
        metric(&before, "shardfarm_agent_layout_version"),
    );

    for (mode, reason) in [
        (Mode::Altered, "bad_signature"),
        (Mode::Impostor, "wrong_pool"),
        (Mode::Unsigned, "unsigned"),
        (Mode::Replay, "older"),
    ] {
        mitm.set(mode);
        let series = format!("shardfarm_agent_layouts_refused_total{{reason=\"{reason}\"}}");
        farm.wait_for(90, &format!("the agent to refuse the {mode:?} layout"), || {
            metric(&scrape(), &series) > 0.0
        });
    }
    // Two repair passes under the forgeries: had one been believed, the agent would have
    // handed its slots to the proxy and deleted its shards.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let after = scrape();
    assert_eq!(metric(&after, "shardfarm_agent_layout_version"), version, "{after}");
    assert_eq!(metric(&after, "shardfarm_agent_shards"), shards, "{after}");
    let handed = "shardfarm_agent_handed_off_shards_total";
    assert_eq!(metric(&after, handed), metric(&before, handed), "{after}");
    let log = std::fs::read_to_string(tmp.path().join("behind.log")).unwrap();
    assert!(log.contains("not by the pool"), "{log}");
    read_all_back(&farm, &files, tmp.path(), "forged");

    // Honest again: the agent follows the pool's layouts as before.
    mitm.set(Mode::Honest);
    read_all_back(&farm, &files, tmp.path(), "honest");
}

/// The coordinator's state dir is deleted while the farm runs and the coordinator killed;
/// `local up` starts it again with the same pool key and an empty state dir. It recovers the
/// layout from the agents (same version, same slots) instead of computing a fresh one, and
/// every file reads back.
#[test]
fn a_coordinator_that_lost_its_state_dir_recovers_the_layout_from_the_running_farm() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        &["--nodes", "6", "--grace", "10", "--heartbeat-ms", "200"],
    );
    let before = settled(&farm);
    let files = store_files(&farm, tmp.path(), &[200 * 1024, 2 << 20], 500);

    let pid = coordinator_pid(&farm).expect("the coordinator runs");
    std::fs::remove_dir_all(farm.dir.join("coordinator")).unwrap();
    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    let log = || std::fs::read_to_string(farm.dir.join("coordinator.log")).unwrap_or_default();
    farm.wait_for(60, "the restarted coordinator to recover the layout", || {
        log().contains("layout recovered from the agents")
    });
    assert_ne!(coordinator_pid(&farm), Some(pid), "a new coordinator process");
    let after = settled(&farm);
    assert_eq!(after.layout_version, before.layout_version);
    assert_eq!(after.layout, before.layout, "the same slots");
    assert_eq!(after.pool_id, before.pool_id);
    read_all_back(&farm, &files, tmp.path(), "recovered");
}
