//! Two sites in their own network namespaces, joined by one veth link: a remote farm joins the
//! home coordinator over TLS, the sites are partitioned and healed.
//!
//! The test needs root and `ip` (iproute2). It creates two namespaces and re-runs itself
//! inside the home one, so the farm, the CLI and every helper see only the test's own
//! addresses. Without root it says so and passes, unless `SHARDFARM_REQUIRE_NETNS=1` (the
//! README's test command sets it), where it fails.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::{BIN, Farm, free_base_port, metric, read_all_back, settled, store_files};

const INSIDE: &str = "SHARDFARM_TWO_SITES_INSIDE";
const HOME_IP: &str = "10.231.0.1";
const REMOTE_IP: &str = "10.231.0.2";

/// The namespaces and the link, removed on drop.
struct Sites {
    home: String,
    remote: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Sites {
    fn create() -> Sites {
        let tag = std::process::id();
        let s = Sites { home: format!("sf-home-{tag}"), remote: format!("sf-remote-{tag}") };
        ip(&["netns", "add", &s.home]);
        ip(&["netns", "add", &s.remote]);
        ip(&[
            "-n",
            &s.home,
            "link",
            "add",
            "site-link",
            "type",
            "veth",
            "peer",
            "name",
            "site-link",
            "netns",
            &s.remote,
        ]);
        for (ns, addr) in [(&s.home, HOME_IP), (&s.remote, REMOTE_IP)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "site-link"]);
            ip(&["-n", ns, "link", "set", "site-link", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        s
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for ns in [&self.home, &self.remote] {
            // Whatever still runs in the namespace goes with it.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn can_run() -> Result<(), String> {
    let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if !root {
        return Err("not root: network namespaces need root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Err("no `ip` command: install iproute2".into());
    }
    Ok(())
}

/// A remote agent in the remote namespace, joined to the home coordinator: the home farm's own
/// agent at another site (its farm key vouches for it, so its zone `site-b` is trusted and a
/// partition holds at most one of the two remote agents; as outsiders each would be a failure
/// domain of its own, and a partition holding both could not take a write during the
/// partition).
fn remote_agent(
    remote_ns: &str,
    dir: &Path,
    port: u16,
    coordinator: &str,
    pool: &str,
    farm_key: &Path,
) -> Child {
    Command::new("ip")
        .args(["netns", "exec", remote_ns, BIN, "agent", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("{REMOTE_IP}:{port}")])
        .args(["--http-listen", &format!("127.0.0.1:{}", port + 1)])
        .args(["--zone", "site-b", "--identity-difficulty", "8", "--pool-difficulty", "8"])
        .args(["--capacity", "1GiB", "--partitions", "32", "--repair-interval", "1"])
        .args(["--coordinator", coordinator, "--pool-id", pool])
        .arg("--farm-key")
        .arg(farm_key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
        .spawn()
        .unwrap()
}

/// Remote members of the farm file that answer the client (`shardfarm nodes`).
fn remote_up(farm: &Farm) -> usize {
    let out = farm.sf(&["--json", "nodes"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let nodes = v.as_array().cloned().unwrap_or_default();
    let remote =
        |n: &&serde_json::Value| n["address"].as_str().is_some_and(|a| a.starts_with(REMOTE_IP));
    nodes.iter().filter(remote).filter(|n| n["state"] == "up").count()
}

/// Home: a farm of four agents in four zones, RS(2,2), serving gRPC on the home address.
/// Remote: two agents of zone `site-b` that join it over TLS across the link. Files stored
/// with both sites up read back during a partition (every partition keeps at least k = 2
/// holders at home: the four shards of a partition go to four distinct zones, one at most in
/// `site-b`), new files are written during it, and after the link heals the remote agents
/// come back up and every file still reads back whole.
#[test]
fn a_remote_site_joins_over_tls_and_a_partition_loses_nothing() {
    if std::env::var(INSIDE).is_err() {
        if let Err(why) = can_run() {
            assert!(std::env::var("SHARDFARM_REQUIRE_NETNS").is_err(), "cannot run: {why}");
            eprintln!("skipped: {why}");
            return;
        }
        let sites = Sites::create();
        let status = Command::new("ip")
            .args(["netns", "exec", &sites.home])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "a_remote_site_joins_over_tls_and_a_partition_loses_nothing"])
            .arg("--nocapture")
            .env(INSIDE, &sites.remote)
            .status()
            .unwrap();
        drop(sites);
        assert!(status.success(), "the test inside the home namespace failed");
        return;
    }
    let remote_ns = std::env::var(INSIDE).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        &[
            "--nodes",
            "4",
            "--zones",
            "4",
            "--k",
            "2",
            "--m",
            "2",
            "--partitions",
            "32",
            "--host",
            HOME_IP,
            "--grace",
            "4",
            "--heartbeat-ms",
            "300",
            "--repair-interval",
            "1",
            "--segment-size",
            "1MiB",
            // The remote site takes its share at once (vetting is tested in `sybil_sim`).
            "--vetting-audits",
            "0",
        ],
    );
    let f = settled(&farm);
    let coordinator = f.coordinator.clone().unwrap();
    assert!(coordinator.starts_with(HOME_IP), "{coordinator}");
    let pool = f.pool_id.clone().unwrap();

    let _remote: Vec<Child> = (0..2)
        .map(|i| {
            let dir = tmp.path().join(format!("remote-{i}"));
            let farm_key = farm.dir.join("farm.key");
            remote_agent(&remote_ns, &dir, 7600 + 2 * i, &coordinator, &pool, &farm_key)
        })
        .collect();
    farm.wait_for(60, "both remote agents joined and the layout in sync", || {
        remote_up(&farm) == 2
            && metric(&farm.coordinator_metrics(), "shardfarm_coordinator_layout_in_sync") == 1.0
    });
    let placed = settled(&farm);
    let remote_slots = placed
        .layout
        .iter()
        .flatten()
        .filter(|&&i| placed.nodes[i].grpc.starts_with(REMOTE_IP))
        .count();
    assert!(remote_slots > 0, "the remote site holds slots");
    let (before, during) = (tmp.path().join("before"), tmp.path().join("during"));
    std::fs::create_dir_all(&before).unwrap();
    std::fs::create_dir_all(&during).unwrap();
    let files = store_files(&farm, &before, &[300 * 1024, 3 << 20], 31);

    // Partition: the remote end of the link goes down; home connections to it stall.
    ip(&["-n", &remote_ns, "link", "set", "site-link", "down"]);
    read_all_back(&farm, &files, tmp.path(), "partitioned");
    let written = store_files(&farm, &during, &[500 * 1024, 2 << 20], 47);
    read_all_back(&farm, &written, tmp.path(), "written-partitioned");
    let down = "shardfarm_coordinator_nodes{state=\"active_down\"}";
    farm.wait_for(30, "the coordinator to see the remote site down", || {
        farm.coordinator_metric(down) == 2.0
    });
    read_all_back(&farm, &files, tmp.path(), "remote-down");

    // Heal: the remote agents come back up, the layout settles, nothing is lost.
    ip(&["-n", &remote_ns, "link", "set", "site-link", "up"]);
    farm.wait_for(90, "the remote agents back up and the layout in sync", || {
        remote_up(&farm) == 2
            && farm.coordinator_metric(down) == 0.0
            && metric(&farm.coordinator_metrics(), "shardfarm_coordinator_layout_in_sync") == 1.0
    });
    read_all_back(&farm, &files, tmp.path(), "healed");
    read_all_back(&farm, &written, tmp.path(), "healed-during");
}
