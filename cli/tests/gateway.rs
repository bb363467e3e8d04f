//! The S3 gateway against a local farm, driven by real S3 clients: boto3 (PyPI) and rclone
//! (Debian), installed by scripts/s3-tools.sh.
//!
//! One farm, one story: populate through the gateway (sizes, multipart, ranges, 1 500 keys,
//! copy, delete), abuse it (wrong secrets, another user's key, malformed requests), list and
//! delete 1 000 awkward keys with encoding-type=url, race create-only PUTs, check conditional
//! requests, S3's refusals, headers (non-ASCII metadata as RFC 2047) and SSE answers, SigV2
//! bucket operations,
//! kill the gateway with a multipart upload in progress and delete its index (the new one
//! loads a snapshot, replays the entries after it, and the upload completes), sync a
//! tree both ways with rclone, stall an agent (SIGSTOP), kill -9 two agents (RS(4,2)) and read everything back, then
//! kill the gateway, delete its index, and let a new one rebuild the namespace from the pool.

mod common;

use std::path::Path;
use std::process::Command;

use common::Farm;
use common::s3::{ALICE, BOB, Gateway, SNAPSHOT_EVERY, delegate, s3_tools, start_gateway};

/// The S3 clients: the virtualenv's python (with boto3) and rclone.
fn boto(python: &Path, gw: &Gateway, phase: &str, state: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3/s3_client.py");
    let out = Command::new(python)
        .env_remove("AWS_CA_BUNDLE")
        .arg(script)
        .args([&gw.endpoint, phase])
        .arg(state)
        .env("ALICE_KEY", ALICE.0)
        .env("ALICE_SECRET", ALICE.1)
        .env("BOB_KEY", BOB.0)
        .env("BOB_SECRET", BOB.1)
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "boto3 phase {phase} failed:\n{text}");
    eprint!("{text}");
}

fn rclone(rclone: &Path, conf: &Path, args: &[&str]) -> String {
    // The gateway here is plain HTTP on loopback: a CA bundle from the environment is not
    // for it (and rclone's S3 client refuses to start with one on a plain-HTTP transport).
    let out = Command::new(rclone)
        .env_remove("AWS_CA_BUNDLE")
        .arg("--config")
        .arg(conf)
        .args(args)
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "rclone {args:?} failed:\n{text}");
    text
}

/// A small tree: nested directories, an empty file, a file over rclone's 1 MiB segments.
fn write_tree(root: &Path) {
    for (i, (path, len)) in [
        ("a.txt", 10usize),
        ("empty", 0),
        ("docs/b.bin", 300_000),
        ("docs/deep/c.bin", 2_500_000),
        ("docs/deep/d e.txt", 17),
    ]
    .iter()
    .enumerate()
    {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        common::write_random(&p, *len, 100 + i as u64);
    }
}

#[test]
fn s3_clients_store_and_read_through_the_gateway_and_it_survives_loss() {
    let (python, rclone_bin) = s3_tools();
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("farm");
    let farm = Farm::start_with(
        &dir,
        common::free_base_port(),
        &["--segment-size", "1MiB", "--repair-interval", "2"],
    );
    common::settled(&farm);

    // Identities: the gateway's root key (its namespace log) and one per S3 user.
    for name in ["gateway-root", "alice", "bob"] {
        delegate(&farm, &work.path().join(format!("{name}.key")));
    }
    let users = format!(
        "[[users]]\naccess_key = \"{}\"\nsecret_key = \"{}\"\nidentity_file = \"{}\"\n\n\
         [[users]]\naccess_key = \"{}\"\nsecret_key = \"{}\"\nidentity_file = \"{}\"\n",
        ALICE.0,
        ALICE.1,
        work.path().join("alice.key").display(),
        BOB.0,
        BOB.1,
        work.path().join("bob.key").display()
    );
    std::fs::write(work.path().join("users.toml"), users).unwrap();

    let state = work.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let index = work.path().join("gateway-data");
    let gw = start_gateway(&farm, work.path(), &index);
    boto(&python, &gw, "populate", &state);
    boto(&python, &gw, "abuse", &state);
    // What standard clients at their defaults rely on (issue 31): listings of awkward keys
    // with encoding-type=url, conditional requests and the create-only race, refusals, headers
    // and server-side encryption.
    boto(&python, &gw, "listing", &state);
    boto(&python, &gw, "conditional", &state);
    boto(&python, &gw, "refusals", &state);
    // SigV2-signed bucket operations (botocore signs /bucket/, minio-go /bucket).
    boto(&python, &gw, "sigv2", &state);

    // The gateway dies with its disk while a multipart upload is in progress: a new one loads
    // the newest snapshot of the namespace and replays only the entries after it, and the
    // upload is still there and completes.
    boto(&python, &gw, "upload_begin", &state);
    drop(gw);
    std::fs::remove_dir_all(&index).unwrap();
    let gw = start_gateway(&farm, work.path(), &index);
    let (snapshot, replayed) = gw.rebuild_report();
    eprintln!(
        "ok: rebuilt from the snapshot at entry {snapshot:?} and {replayed} entries after it \
         (a snapshot every {SNAPSHOT_EVERY})"
    );
    assert!(snapshot.is_some() && replayed <= SNAPSHOT_EVERY, "{snapshot:?}, {replayed}");
    boto(&python, &gw, "upload_finish", &state);

    // rclone: a tree up, back down, `rclone check` clean both ways.
    let conf = work.path().join("rclone.conf");
    std::fs::write(
        &conf,
        format!(
            "[sf]\ntype = s3\nprovider = Other\naccess_key_id = {}\nsecret_access_key = {}\n\
             endpoint = {}\nregion = us-east-1\nforce_path_style = true\nlist_version = 2\n",
            ALICE.0, ALICE.1, gw.endpoint
        ),
    )
    .unwrap();
    let tree = work.path().join("tree");
    write_tree(&tree);
    let t = tree.to_str().unwrap();
    rclone(&rclone_bin, &conf, &["mkdir", "sf:tree"]);
    rclone(&rclone_bin, &conf, &["sync", t, "sf:tree"]);
    rclone(&rclone_bin, &conf, &["check", t, "sf:tree"]);
    let back = work.path().join("back");
    rclone(&rclone_bin, &conf, &["sync", "sf:tree", back.to_str().unwrap()]);
    rclone(&rclone_bin, &conf, &["check", t, back.to_str().unwrap()]);
    // A change and a deletion on the local side travel up on the next sync.
    common::write_random(&tree.join("docs/b.bin"), 123_456, 999);
    std::fs::remove_file(tree.join("a.txt")).unwrap();
    rclone(&rclone_bin, &conf, &["sync", t, "sf:tree"]);
    rclone(&rclone_bin, &conf, &["check", t, "sf:tree"]);
    eprintln!("ok: rclone sync up and down, rclone check clean, changes and deletions synced");

    // An agent stalls (SIGSTOP): stores and reads go on without it.
    let shards = || farm.agent_metric_sum(6, "shardfarm_agent_shards");
    let before = shards();
    let stalled = farm.agent_pid(2).to_string();
    assert!(Command::new("kill").args(["-STOP", &stalled]).status().unwrap().success());
    boto(&python, &gw, "stalled", &state);
    assert!(Command::new("kill").args(["-CONT", &stalled]).status().unwrap().success());
    // What it missed (acknowledged at n − 1) is rebuilt once it answers again: 4 segments of
    // the object and 1 of its log entry, 6 shards each. Only then may two more nodes die.
    farm.wait_for(120, "the stalled agent to rebuild what it missed", || shards() >= before + 30.0);

    // Two agents die: every object still reads through the gateway.
    farm.kill9(1);
    farm.kill9(4);
    boto(&python, &gw, "verify", &state);
    rclone(&rclone_bin, &conf, &["check", t, "sf:tree"]);

    // The gateway dies with its disk: a new one rebuilds the namespace from the pool.
    drop(gw);
    std::fs::remove_dir_all(&index).unwrap();
    let gw = start_gateway(&farm, work.path(), &index);
    boto(&python, &gw, "verify", &state);
    rclone(&rclone_bin, &conf.clone(), &["--s3-endpoint", &gw.endpoint, "check", t, "sf:tree"]);
    eprintln!("ok: a new gateway rebuilt the namespace from the pool's log");
}
