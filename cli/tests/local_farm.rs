//! End to end with real processes: `shardfarm local up` runs six agents; the tests store and
//! read files with the `shardfarm` client, kill agents with SIGKILL and restart the farm.

mod common;

use std::process::{Command, Stdio};

use common::{BIN, Farm, same, write_random};

#[test]
fn six_nodes_store_files_and_survive_any_two_losses_but_not_three() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start(&tmp.path().join("farm"));
    let sizes = [0usize, 1, (1 << 20) + 1, 200 << 20];
    let mut files = Vec::new();
    for (i, len) in sizes.iter().enumerate() {
        let p = tmp.path().join(format!("in-{i}"));
        write_random(&p, *len, i as u64 + 11);
        let cap = farm.put(&p);
        assert!(cap.starts_with("sf2:"), "{cap}");
        files.push((p, cap));
    }
    for (i, (p, cap)) in files.iter().enumerate() {
        let out = tmp.path().join(format!("out-{i}"));
        let r = farm.get(cap, &out);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(same(p, &out), "file {i} differs");
    }
    // The capability names the pool key: the same pool name under another key is refused
    // (exit 1, nothing written); the same capability without its pool id (sf1:) still reads.
    let cap: shardfarm_core::cap::ReadCap = files[2].1.parse().unwrap();
    let other = shardfarm_core::cap::ReadCap { pool_id: Some([0xee; 32]), ..cap.clone() };
    let out = tmp.path().join("other-pool");
    let r = farm.get(&other.encode(), &out);
    assert_eq!(r.status.code(), Some(1), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("pool key is"), "{r:?}");
    assert!(!out.exists());
    let old = shardfarm_core::cap::ReadCap { pool_id: None, ..cap }.encode();
    assert!(old.starts_with("sf1:"));
    let r = farm.get(&old, &out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(same(&files[2].0, &out), "the sf1: read differs");

    // stat --json shape.
    let st = farm.sf(&["--json", "stat", &files[3].1]);
    assert!(st.status.success());
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["length"], 200u64 << 20);
    assert_eq!(v["segments"].as_array().unwrap().len(), 4);
    for s in v["segments"].as_array().unwrap() {
        assert_eq!((s["present"].as_u64(), s["total"].as_u64()), (Some(6), Some(6)));
        assert_eq!(s["holders"].as_array().unwrap().len(), 6);
    }

    // Two nodes of different zones die: everything still reads back.
    farm.kill9(1);
    farm.kill9(5);
    for (i, (p, cap)) in files.iter().enumerate() {
        let out = tmp.path().join(format!("after2-{i}"));
        let r = farm.get(cap, &out);
        assert!(
            r.status.success(),
            "file {i} after 2 losses: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert!(same(p, &out), "file {i} differs after 2 losses");
    }
    let st = farm.sf(&["--json", "stat", &files[2].1]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["segments"][0]["present"], 4);

    // A third: a clear "not enough shards" error, exit code 1, no output file left behind.
    farm.kill9(0);
    let out = tmp.path().join("after3");
    let r = farm.get(&files[3].1, &out);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("not enough shards") && err.contains("need 4"), "{err}");
    assert!(!out.exists(), "a failed get left {}", out.display());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".shardfarm-get-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary output left: {leftovers:?}");
    let nodes = farm.sf(&["--json", "nodes"]);
    let v: serde_json::Value = serde_json::from_slice(&nodes.stdout).unwrap();
    let down = v.as_array().unwrap().iter().filter(|n| n["state"] == "down").count();
    assert_eq!(down, 3);
}

#[test]
fn bad_input_gets_a_clear_error_and_the_documented_exit_code() {
    let tmp = tempfile::tempdir().unwrap();
    let farm = Farm::start(&tmp.path().join("farm"));
    let p = tmp.path().join("f");
    write_random(&p, 1000, 3);
    let cap = farm.put(&p);

    // Garbled capability: usage error, 2.
    let mut garbled = cap.clone().into_bytes();
    let mid = garbled.len() / 2;
    garbled[mid] = if garbled[mid] == b'a' { b'b' } else { b'a' };
    let r = farm.sf(&["get", std::str::from_utf8(&garbled).unwrap()]);
    assert_eq!(r.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("damaged"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let r = farm.sf(&["get", "not-a-cap"]);
    assert_eq!(r.status.code(), Some(2));

    // A capability of another pool: failure, 1, and it says so.
    let mut other: shardfarm_core::cap::ReadCap = cap.parse().unwrap();
    other.pool = "elsewhere".into();
    let r = farm.sf(&["get", &other.encode()]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("pool `elsewhere`"));

    // Missing input file: 1.
    let r = farm.sf(&["put", tmp.path().join("nope").to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("no such file"));

    // Unknown flag: 2 (clap).
    assert_eq!(farm.sf(&["put", "--bogus"]).status.code(), Some(2));

    // stdin put and stdout get.
    let mut child = Command::new(BIN)
        .arg("--farm")
        .arg(&farm.dir)
        .args(["put", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(b"hello from stdin").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let cap2 = String::from_utf8(out.stdout).unwrap();
    let r = farm.sf(&["get", cap2.trim()]);
    assert_eq!(r.stdout, b"hello from stdin");

    // rm removes every shard; a later get fails.
    let r = farm.sf(&["rm", &cap]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("deleted 6 shards"));
    assert_eq!(farm.sf(&["get", &cap]).status.code(), Some(1));

    // A farm that is not running: unreachable, 1.
    farm.stop();
    let r = Command::new(BIN)
        .arg("--farm")
        .arg(tmp.path().join("farm"))
        .args(["put", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("unreachable") || err.contains("did not answer"), "{err}");
    // No farm at all: 1, with a hint.
    let r =
        Command::new(BIN).arg("--farm").arg(tmp.path().join("none")).arg("nodes").output().unwrap();
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("local up"));
}

#[test]
fn a_farm_stopped_and_started_again_on_the_same_dir_still_serves_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("farm");
    let farm = Farm::start(&dir);
    let base = farm.base_port;
    let mut caps = Vec::new();
    for (i, len) in [3usize << 20, 777].iter().enumerate() {
        let p = tmp.path().join(format!("in-{i}"));
        write_random(&p, *len, 40 + i as u64);
        caps.push((p.clone(), farm.put(&p)));
    }
    let before: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("farm.json")).unwrap()).unwrap();
    farm.stop();

    let farm = Farm::start_on(&dir, base);
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("farm.json")).unwrap()).unwrap();
    assert_eq!(before["nodes"], after["nodes"], "identities and addresses must be kept");
    for (i, (p, cap)) in caps.iter().enumerate() {
        let out = tmp.path().join(format!("out-{i}"));
        let r = farm.get(cap, &out);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(same(p, &out));
    }
    farm.stop();
}
