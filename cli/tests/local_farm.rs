//! End to end with real processes: `shardfarm local up` runs six agents; the tests store and
//! read files with the `shardfarm` client, kill agents with SIGKILL and restart the farm.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_shardfarm");

/// A running `local up`.
struct Farm {
    dir: PathBuf,
    base_port: u16,
    up: Child,
}

/// A base port with 12 free ports after it (two per node).
fn free_base_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = l.local_addr().unwrap().port();
        drop(l);
        if base > 60_000 {
            continue;
        }
        let free = (0..12).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
}

impl Farm {
    fn start(dir: &Path) -> Farm {
        Self::start_on(dir, free_base_port())
    }

    fn start_on(dir: &Path, base_port: u16) -> Farm {
        let _ = std::fs::remove_file(dir.join("farm.json.ready"));
        let log = std::fs::File::create(dir.with_extension("up.log")).unwrap();
        let up = Command::new(BIN)
            .args(["local", "up", "--no-restart", "--base-port", &base_port.to_string()])
            .arg("--data")
            .arg(dir)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let farm = Farm { dir: dir.to_path_buf(), base_port, up };
        let deadline = Instant::now() + Duration::from_secs(90);
        // Ready when every node's endpoints file names a live agent and farm.json is written.
        loop {
            let log = std::fs::read_to_string(dir.with_extension("up.log")).unwrap_or_default();
            if log.contains("stop with Ctrl-C") {
                return farm;
            }
            assert!(Instant::now() < deadline, "farm did not come up:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn sf(&self, args: &[&str]) -> Output {
        Command::new(BIN).arg("--farm").arg(&self.dir).args(args).output().unwrap()
    }

    fn put(&self, file: &Path) -> String {
        let out = self.sf(&["put", file.to_str().unwrap()]);
        assert!(out.status.success(), "put failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn get(&self, cap: &str, to: &Path) -> Output {
        self.sf(&["get", cap, "-o", to.to_str().unwrap()])
    }

    fn agent_pid(&self, node: usize) -> u32 {
        let text =
            std::fs::read_to_string(self.dir.join(format!("node-{node}/endpoints.json"))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["pid"].as_u64().unwrap() as u32
    }

    fn kill9(&self, node: usize) {
        let pid = self.agent_pid(node);
        Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
        // Wait until the node stops answering.
        let addr = format!("127.0.0.1:{}", self.base_port as usize + 2 * node);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_ok() {
            assert!(Instant::now() < deadline, "node {node} still answers after kill -9");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(mut self) {
        Command::new("kill").args(["-TERM", &self.up.id().to_string()]).status().unwrap();
        let status = self.up.wait().unwrap();
        assert!(status.success(), "local up did not stop cleanly: {status}");
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        if let Ok(None) = self.up.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.up.id().to_string()]).status();
            let _ = self.up.wait();
        }
    }
}

/// Writes `len` deterministic pseudo-random bytes.
fn write_random(path: &Path, len: usize, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n]).unwrap();
        left -= n;
    }
}

fn same(a: &Path, b: &Path) -> bool {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    x.len() == y.len() && x == y
}

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
        assert!(cap.starts_with("sf1:"), "{cap}");
        files.push((p, cap));
    }
    for (i, (p, cap)) in files.iter().enumerate() {
        let out = tmp.path().join(format!("out-{i}"));
        let r = farm.get(cap, &out);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(same(p, &out), "file {i} differs");
    }
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
