//! The data path needs no control plane. Layout publications are signed by the pool key the
//! profile pins, so a client takes them from agents as readily as from the coordinator: with
//! the coordinator frozen (SIGSTOP: how a hung operator pod or a leader election looks from
//! outside), new client processes read, write and stat from the profile's seeds; an agent
//! that comes back on another port is in the next publication within seconds; and what a
//! hostile seed serves (an older genuine publication, one signed by another key) is refused.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use common::layout_server::LayoutServer;
use common::s3::{ALICE, Gateway, delegate, s3_tools, start_gateway};
use common::{
    BIN, Farm, Frozen, coordinator_pid, free_base_port, read_all_back, same, settled,
    start_outsider, store_files, write_random,
};
use prost::Message;
use shardfarm_core::identity::{Identity, NodeId};
use shardfarm_proto::pb::SignedLayout;

/// Every segment of `cap` has all n shards, each answering an audit.
fn whole(farm: &Farm, cap: &str) -> bool {
    let out = farm.sf(&["--json", "stat", cap]);
    if !out.status.success() {
        return false;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["segments"].as_array().unwrap().iter().all(|s| s["present"] == s["total"])
}

/// boto3 at its defaults (path-style addressing, as for any IP endpoint): `put` creates a
/// bucket and stores one object under an awkward key; both phases list exactly that key and
/// read the same bytes back.
const BOTO: &str = r#"
import sys, boto3
from botocore.config import Config
endpoint, phase, key, secret = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key,
                  aws_secret_access_key=secret, region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}))
data = bytes(range(256)) * 4096
name = "frozen/a+b c%.bin"
if phase == "put":
    s3.create_bucket(Bucket="frozen")
    s3.put_object(Bucket="frozen", Key=name, Body=data)
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="frozen").get("Contents", [])]
assert keys == [name], keys
assert s3.get_object(Bucket="frozen", Key=name)["Body"].read() == data
print("ok:", phase, "with the coordinator frozen")
"#;

fn boto(python: &Path, gw: &Gateway, phase: &str) {
    let out = Command::new(python)
        .env_remove("AWS_CA_BUNDLE")
        .args(["-c", BOTO, &gw.endpoint, phase, ALICE.0, ALICE.1])
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "boto3 {phase} through the gateway failed:\n{text}");
    eprint!("{text}");
}

/// Runs the CLI with the profile `profile`.
fn sf_with(profile: &Path, args: &[&str]) -> Output {
    Command::new(BIN).arg("--pool").arg(profile).args(args).output().unwrap()
}

/// Writes a profile for the farm's pool whose coordinator address answers nothing, with
/// `seeds`, signing with the farm's client key.
fn profile_without_coordinator(farm: &Farm, path: &Path, seeds: &[String]) {
    let pool = common::hostile::farm_file(&farm.dir).pool_id.unwrap();
    let key = farm.dir.join(shardfarm_client::farm::CLIENT_KEY);
    let seeds: Vec<String> = seeds.iter().map(|s| format!("\"{s}\"")).collect();
    let text = format!(
        "coordinator = \"127.0.0.1:1\"\npool_id = \"{pool}\"\nidentity = \"{}\"\nseeds = [{}]\n",
        key.display(),
        seeds.join(", ")
    );
    std::fs::write(path, text).unwrap();
}

/// With the coordinator frozen for the whole test, new client processes started from the
/// farm's profile (its seeds are the agents; the saved layout is deleted first) read every
/// object stored before, store a 50 MiB object and read it back, and `stat` it; a profile
/// whose only reachable seed is one agent (by address alone) reads everything too; the S3
/// gateway starts, serves PUT/GET/LIST and starts again. An agent
/// killed meanwhile changes nothing for readers; after SIGCONT the coordinator does not hold
/// its own pause against the living, re-places the dead one, and every object, the new one
/// included, is n of n again.
#[test]
fn clients_read_write_and_stat_while_the_coordinator_is_frozen() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        &["--nodes", "7", "--grace", "5"],
    );
    settled(&farm);
    let files = store_files(&farm, tmp.path(), &[300 * 1024, (1 << 20) + 3, 5 << 20], 900);
    let saved = farm.dir.join("pool.layout");
    assert!(saved.exists(), "a client saves the layout beside its profile");

    let frozen = Frozen::new(coordinator_pid(&farm).expect("the coordinator runs"));
    std::fs::remove_file(&saved).unwrap();
    farm.kill9(6);
    let started = Instant::now();
    read_all_back(&farm, &files, tmp.path(), "frozen");
    eprintln!(
        "read {} objects with the coordinator frozen in {:?}",
        files.len(),
        started.elapsed()
    );
    assert!(saved.exists(), "the layout read from the seeds is saved for the next run");

    let big = tmp.path().join("big");
    write_random(&big, 50 << 20, 77);
    let started = Instant::now();
    let cap = farm.put(&big);
    eprintln!("stored 50 MiB with the coordinator frozen in {:?}", started.elapsed());
    let back = tmp.path().join("big.back");
    let out = farm.get(&cap, &back);
    assert!(out.status.success(), "get: {}", String::from_utf8_lossy(&out.stderr));
    assert!(same(&big, &back), "the 50 MiB object differs");
    std::fs::remove_file(&back).unwrap();
    let stat = farm.stat(&cap);
    assert!(!stat["segments"].as_array().unwrap().is_empty(), "{stat}");

    // One agent, named by address only, is the only source that answers.
    let lone = tmp.path().join("lone.toml");
    profile_without_coordinator(&farm, &lone, &[format!("127.0.0.1:{}", farm.base_port + 4)]);
    for (i, (p, cap)) in files.iter().enumerate() {
        let out_path = tmp.path().join(format!("lone-{i}"));
        let out = sf_with(&lone, &["get", cap, "-o", out_path.to_str().unwrap()]);
        assert!(out.status.success(), "lone seed: {}", String::from_utf8_lossy(&out.stderr));
        assert!(same(p, &out_path), "lone seed: object {i} differs");
    }

    // The S3 gateway starts, serves PUT/GET/LIST, and starts again, from the profile's seeds.
    let (python, _) = s3_tools();
    delegate(&farm, &tmp.path().join("gateway-root.key"));
    delegate(&farm, &tmp.path().join("alice.key"));
    let users = format!(
        "[[users]]\naccess_key = \"{}\"\nsecret_key = \"{}\"\nidentity_file = \"{}\"\n",
        ALICE.0,
        ALICE.1,
        tmp.path().join("alice.key").display()
    );
    std::fs::write(tmp.path().join("users.toml"), users).unwrap();
    let index = tmp.path().join("gateway-data");
    let gw = start_gateway(&farm, tmp.path(), &index);
    boto(&python, &gw, "put");
    drop(gw);
    let gw = start_gateway(&farm, tmp.path(), &index);
    boto(&python, &gw, "read");
    drop(gw);

    let log = std::fs::read_to_string(farm.dir.join("coordinator.log")).unwrap_or_default();
    drop(frozen);
    // The killed agent is marked down after the grace period (the objects may hold nothing on
    // it, so being whole alone does not show that), and every object is whole.
    let since = |log_now: &str| log_now[log.len().min(log_now.len())..].to_string();
    farm.wait_for(180, "the killed agent down and every object n of n after SIGCONT", || {
        let now = std::fs::read_to_string(farm.dir.join("coordinator.log")).unwrap_or_default();
        since(&now).contains("node is down")
            && whole(&farm, &cap)
            && files.iter().all(|(_, c)| whole(&farm, c))
    });
    let log_after = std::fs::read_to_string(farm.dir.join("coordinator.log")).unwrap();
    let new_lines = &log_after[log.len().min(log_after.len())..];
    let downs = new_lines.matches("node is down").count();
    assert!(new_lines.contains("did not run for a while"), "{new_lines}");
    assert_eq!(downs, 1, "only the killed agent is down:\n{new_lines}");
}

/// A hostile seed serves a publication signed by another key and an older genuine one (the
/// pool key signed it, with every slot moved to the hostile node): the client refuses the
/// first, never settles on the second while a newer one is served, reads every object, and,
/// with the hostile seeds alone, keeps the newer layout it saved and says why.
#[test]
fn a_client_refuses_forged_and_older_layouts_from_a_hostile_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(&tmp.path().join("farm"), free_base_port(), &["--nodes", "6"]);
    settled(&farm);
    let files = store_files(&farm, tmp.path(), &[200 * 1024, 3 << 20], 901);
    let pool = NodeId::from_hex(&common::hostile::farm_file(&farm.dir).pool_id.unwrap()).unwrap();
    let current =
        SignedLayout::decode(&std::fs::read(farm.dir.join("pool.layout")).unwrap()[..]).unwrap();
    let mut published = shardfarm_proto::verify_layout(&current, &pool).unwrap();
    assert!(published.pool.is_some(), "the publication carries the pool's settings");

    // Every slot "moved" to the hostile server.
    let (evil, _) = Identity::generate(0, 1, &|_| {}).unwrap();
    let forged_server = LayoutServer::start(SignedLayout::default());
    for a in published.addresses.values_mut() {
        *a = forged_server.addr.clone();
    }
    let root = Identity::load(&farm.dir.join(shardfarm_client::farm::ROOT_KEY)).unwrap();
    let older = published.clone().sign(&root, 1, 0).signed.unwrap();
    let forged = published.sign(&evil, u64::MAX - 1, 0).signed.unwrap();
    let old_seed = LayoutServer::start((*older).clone());
    let forged_seed = LayoutServer::start((*forged).clone());

    let profile = tmp.path().join("hostile.toml");
    let honest = format!("127.0.0.1:{}", farm.base_port + 6);
    profile_without_coordinator(
        &farm,
        &profile,
        &[old_seed.addr.clone(), forged_seed.addr.clone(), honest],
    );
    let mut warnings = String::new();
    for (i, (p, cap)) in files.iter().enumerate() {
        let out_path = tmp.path().join(format!("h-{i}"));
        let out = sf_with(&profile, &["get", cap, "-o", out_path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "with hostile seeds: {err}");
        assert!(same(p, &out_path), "object {i} differs");
        warnings.push_str(&err);
    }
    assert!(warnings.contains("not by the pool"), "the forged layout is refused: {warnings}");

    // The hostile seeds alone: the saved (newer) layout stands, the older one is refused.
    profile_without_coordinator(&farm, &profile, &[old_seed.addr.clone(), forged_seed.addr]);
    let out_path = tmp.path().join("alone");
    let out = sf_with(&profile, &["get", &files[0].1, "-o", out_path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "hostile seeds only, with a saved layout: {err}");
    assert!(same(&files[0].0, &out_path));
    assert!(err.contains("older than the one accepted"), "{err}");
    drop(old_seed);
}

/// An agent that comes back on another port (a pod recreated with a new IP) is reachable by
/// clients within 10 s of rejoining: the coordinator republishes its address at once.
#[test]
fn an_agent_back_on_another_port_is_reachable_within_seconds() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start_with(
        &tmp.path().join("farm"),
        free_base_port(),
        &["--nodes", "6", "--vetting-audits", "0", "--grace", "60"],
    );
    settled(&farm);
    let dir = tmp.path().join("mover");
    let (agent, _) = start_outsider(&farm, &dir, "zone-3", &[]);
    let endpoints = || -> serde_json::Value {
        serde_json::from_str(
            &std::fs::read_to_string(dir.join("endpoints.json")).unwrap_or_default(),
        )
        .unwrap_or_default()
    };
    farm.wait_for(30, "the outsider to serve", || endpoints()["node_id"].is_string());
    let id = endpoints()["node_id"].as_str().unwrap().to_string();
    farm.wait_for(60, "the outsider in the layout", || {
        let f = settled(&farm);
        f.layout.iter().flatten().any(|&i| f.nodes.get(i).is_some_and(|n| n.id == id))
    });
    // An object with a shard on the outsider.
    let mut cap = None;
    for seed in 0..20 {
        let p = tmp.path().join(format!("o-{seed}"));
        write_random(&p, 64 * 1024, 1000 + seed);
        let c = farm.put(&p);
        let stat = farm.stat(&c);
        let held = stat["segments"][0]["holders"].as_array().unwrap().iter().any(|h| h == &id);
        if held {
            cap = Some(c);
            break;
        }
    }
    let cap = cap.expect("one of 20 objects has a shard on the outsider");
    assert!(whole(&farm, &cap));

    drop(agent);
    let (agent, _) = start_outsider(&farm, &dir, "zone-3", &[]);
    let pid = u64::from(agent.0.id());
    farm.wait_for(30, "the outsider serving again", || endpoints()["pid"].as_u64() == Some(pid));
    let moved = endpoints()["grpc"].as_str().unwrap().to_string();
    let back = Instant::now();
    farm.wait_for(20, "a client to reach the moved agent (n of n)", || whole(&farm, &cap));
    eprintln!(
        "clients reached the agent at its new address {moved} {:?} after it served",
        back.elapsed()
    );
}
