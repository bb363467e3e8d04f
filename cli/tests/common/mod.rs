//! The test harness shared by the end-to-end tests: a `shardfarm local up` process, the
//! client, and helpers to kill agents and read metrics.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod attacks;
pub mod fake_agent;
pub mod flood;
pub mod hostile;
pub mod layout_server;
pub mod mitm;
pub mod s3;

pub const BIN: &str = env!("CARGO_BIN_EXE_shardfarm");

/// A running `local up`.
pub struct Farm {
    pub dir: PathBuf,
    pub base_port: u16,
    up: Child,
}

/// A base port with the two ports before it (coordinator) and 20 after it (two per node)
/// free.
pub fn free_base_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = l.local_addr().unwrap().port();
        drop(l);
        if !(1_100..60_000).contains(&base) {
            continue;
        }
        let free =
            (base - 2..base + 20).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
    }
}

impl Farm {
    pub fn start(dir: &Path) -> Farm {
        Self::start_with(dir, free_base_port(), &[])
    }

    pub fn start_on(dir: &Path, base_port: u16) -> Farm {
        Self::start_with(dir, base_port, &[])
    }

    /// Starts `local up` on `base_port` with extra flags. Tests run in parallel and ports are
    /// picked before they are bound, so a farm that loses a port race is started again on
    /// fresh ports.
    pub fn start_with(dir: &Path, base_port: u16, extra: &[&str]) -> Farm {
        let mut base_port = base_port;
        for _ in 0..3 {
            match Self::try_start(dir, base_port, extra) {
                Ok(farm) => return farm,
                // A port taken between choosing and binding (by `local up` or one of its
                // agents): start afresh on other ports.
                Err(log) if log.contains("binding") || log.contains("in use") => {
                    let _ = std::fs::remove_dir_all(dir);
                    base_port = free_base_port();
                }
                Err(log) => panic!("farm did not come up:\n{log}"),
            }
        }
        panic!("farm did not come up: no free ports after 3 tries");
    }

    fn try_start(dir: &Path, base_port: u16, extra: &[&str]) -> Result<Farm, String> {
        let log = std::fs::File::create(dir.with_extension("up.log")).unwrap();
        let up = Command::new(BIN)
            .args(["local", "up", "--no-restart", "--base-port", &base_port.to_string()])
            .arg("--data")
            .arg(dir)
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut farm = Farm { dir: dir.to_path_buf(), base_port, up };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let log = std::fs::read_to_string(dir.with_extension("up.log")).unwrap_or_default();
            if log.contains("stop with Ctrl-C") {
                return Ok(farm);
            }
            if let Ok(Some(_)) = farm.up.try_wait() {
                // The logs of the children it names ("see …/node-1.log") say why.
                let mut log = log;
                let named: Vec<String> = log
                    .split_whitespace()
                    .filter(|w| w.ends_with(".log"))
                    .map(|w| w.trim_end_matches([',', ')', '.']).to_string())
                    .collect();
                for path in named {
                    if let Ok(child) = std::fs::read_to_string(&path) {
                        log.push_str(&format!("\n--- {path}:\n{child}"));
                    }
                }
                return Err(log);
            }
            if Instant::now() > deadline {
                return Err(format!("not up within 90 s:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn sf(&self, args: &[&str]) -> Output {
        Command::new(BIN).arg("--farm").arg(&self.dir).args(args).output().unwrap()
    }

    pub fn put(&self, file: &Path) -> String {
        let out = self.sf(&["put", file.to_str().unwrap()]);
        assert!(out.status.success(), "put failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn get(&self, cap: &str, to: &Path) -> Output {
        self.sf(&["get", cap, "-o", to.to_str().unwrap()])
    }

    pub fn agent_pid(&self, node: usize) -> u32 {
        let text =
            std::fs::read_to_string(self.dir.join(format!("node-{node}/endpoints.json"))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["pid"].as_u64().unwrap() as u32
    }

    pub fn kill9(&self, node: usize) {
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

    /// The coordinator's metrics as text.
    pub fn coordinator_metrics(&self) -> String {
        http_get(&format!("127.0.0.1:{}", self.base_port - 1), "/metrics")
    }

    /// One sample of a coordinator metric (exact series name with labels), 0 if absent.
    pub fn coordinator_metric(&self, series: &str) -> f64 {
        metric(&self.coordinator_metrics(), series)
    }

    /// The sum of `series` over the metrics of local nodes `0..nodes`.
    pub fn agent_metric_sum(&self, nodes: usize, series: &str) -> f64 {
        (0..nodes).map(|i| self.agent_metric(i, series)).sum()
    }

    /// The value of `series` in agent `i`'s `/metrics` (0 if absent).
    pub fn agent_metric(&self, i: usize, series: &str) -> f64 {
        let addr = format!("127.0.0.1:{}", self.base_port as usize + 2 * i + 1);
        metric(&http_get(&addr, "/metrics"), series)
    }

    /// Polls `f` every 100 ms until it returns true; panics with `what` after `secs`.
    pub fn wait_for(&self, secs: u64, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The `stat --json` of `cap`.
    pub fn stat(&self, cap: &str) -> serde_json::Value {
        let out = self.sf(&["--json", "stat", cap]);
        assert!(out.status.success(), "stat: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn stop(mut self) {
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
/// Stores one random file per length in `lens` (seeded from `seed`); returns (path, cap).
#[allow(dead_code)]
pub fn store_files(farm: &Farm, dir: &Path, lens: &[usize], seed: u64) -> Vec<(PathBuf, String)> {
    lens.iter()
        .enumerate()
        .map(|(i, len)| {
            let p = dir.join(format!("in-{i}"));
            write_random(&p, *len, seed + i as u64);
            let cap = farm.put(&p);
            (p, cap)
        })
        .collect()
}

/// Reads every file back and compares it with what was stored; `tag` names the round.
#[allow(dead_code)]
pub fn read_all_back(farm: &Farm, files: &[(PathBuf, String)], dir: &Path, tag: &str) {
    for (i, (p, cap)) in files.iter().enumerate() {
        let out = dir.join(format!("{tag}-{i}"));
        let r = farm.get(cap, &out);
        assert!(r.status.success(), "{tag}: file {i}: {}", String::from_utf8_lossy(&r.stderr));
        assert!(same(p, &out), "{tag}: file {i} differs");
        std::fs::remove_file(&out).unwrap();
    }
}

pub fn write_random(path: &Path, len: usize, seed: u64) {
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

pub fn same(a: &Path, b: &Path) -> bool {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    x.len() == y.len() && x == y
}

/// A plain HTTP/1.0 GET, returning the body ("" when unreachable).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// The value of one series (exact name with labels) in a metrics text, 0 if absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// An agent started by hand that joins the running farm through its coordinator.
pub struct Outsider(pub Child);

impl Drop for Outsider {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_outsider(farm: &Farm, dir: &Path, zone: &str, extra: &[&str]) -> (Outsider, String) {
    let coordinator = format!("127.0.0.1:{}", farm.base_port - 2);
    start_outsider_via(farm, &coordinator, dir, zone, extra)
}

/// The same, joining through `coordinator` (say, a man in the middle).
pub fn start_outsider_via(
    farm: &Farm,
    coordinator: &str,
    dir: &Path,
    zone: &str,
    extra: &[&str],
) -> (Outsider, String) {
    let port = free_base_port();
    let child = Command::new(BIN)
        .arg("agent")
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", &format!("127.0.0.1:{}", port + 1)])
        .args(["--zone", zone, "--identity-difficulty", "8", "--pool-difficulty", "8"])
        .args(["--coordinator", coordinator])
        .args(["--pool-id", hostile::farm_file(&farm.dir).pool_id.as_deref().unwrap()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension("log")).unwrap())
        .spawn()
        .unwrap();
    (Outsider(child), format!("127.0.0.1:{}", port + 1))
}

/// Resident memory of a process, in bytes (0 if it is gone).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The pid of the farm's coordinator process, if it runs.
pub fn coordinator_pid(farm: &Farm) -> Option<u32> {
    let state = farm.dir.join("coordinator");
    let state = state.to_str().unwrap();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is = args.contains(&&b"coordinator"[..]) && args.contains(&state.as_bytes());
        is.then_some(pid)
    })
}

/// A process frozen with SIGSTOP (a hung pod, a leader election in progress, from outside),
/// woken with SIGCONT when dropped.
pub struct Frozen(pub u32);

impl Frozen {
    pub fn new(pid: u32) -> Frozen {
        assert!(Command::new("kill").args(["-STOP", &pid.to_string()]).status().unwrap().success());
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

/// The farm file once the coordinator's layout is in sync and the file shows that layout.
pub fn settled(farm: &Farm) -> shardfarm_client::farm::Farm {
    let mut f = hostile::farm_file(&farm.dir);
    farm.wait_for(60, "the first layout in sync", || {
        let text = farm.coordinator_metrics();
        f = hostile::farm_file(&farm.dir);
        metric(&text, "shardfarm_coordinator_layout_in_sync") == 1.0
            && metric(&text, "shardfarm_coordinator_layout_version") == f.layout_version as f64
    });
    f
}
