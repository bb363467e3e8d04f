//! The S3 gateway as a test starts it: the real S3 clients (scripts/s3-tools.sh), the
//! gateway process over a local farm, and the delegated identities it signs with.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{BIN, Farm};

/// The Python with boto3 and the AWS CLI, and rclone: installed when missing.
pub fn s3_tools() -> (PathBuf, PathBuf) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/s3-tools.sh");
    let out = Command::new("bash").arg(script).stderr(Stdio::inherit()).output().unwrap();
    assert!(out.status.success(), "scripts/s3-tools.sh failed: install boto3 and rclone");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().rev();
    let rclone = PathBuf::from(lines.next().unwrap());
    let python = PathBuf::from(lines.next().unwrap());
    (python, rclone)
}

pub const ALICE: (&str, &str) = ("ALICE", "alice-secret-key-0123");
pub const BOB: (&str, &str) = ("BOB", "bob-secret-key-456789");

/// How many namespace log entries apart the tests' gateways write a snapshot (a rebuild
/// replays at most this many entries after the snapshot it loads).
pub const SNAPSHOT_EVERY: u64 = 400;

pub struct Gateway {
    pub child: Child,
    pub endpoint: String,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl Gateway {
    /// What the gateway's start read from the pool: (the snapshot loaded, if one was; the log
    /// entries replayed after it), from its log line.
    pub fn rebuild_report(&self) -> (Option<u64>, u64) {
        let text = std::fs::read_to_string(&self.log).unwrap();
        // Without the terminal colours tracing may add around field names.
        let mut plain = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| c.is_ascii_alphabetic());
            } else {
                plain.push(c);
            }
        }
        let line = plain
            .lines()
            .find(|l| l.contains("namespace index is up to date"))
            .unwrap_or_else(|| panic!("no catch-up line in the gateway's log:\n{plain}"));
        let field = |name: &str| {
            let at = line.find(&format!(" {name}=")).unwrap_or_else(|| panic!("{name}: {line}"));
            line[at + name.len() + 2..].split_whitespace().next().unwrap().to_string()
        };
        let snapshot = field("snapshot");
        let snapshot = snapshot
            .strip_prefix("Some(")
            .and_then(|s| s.strip_suffix(')'))
            .map(|s| s.parse().unwrap());
        (snapshot, field("entries").parse().unwrap())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts a gateway over `farm` with its index in `data`; waits until it serves.
pub fn start_gateway(farm: &Farm, work: &Path, data: &Path) -> Gateway {
    let port = free_port();
    let log_path = work.join(format!("gateway-{port}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(BIN)
        .arg("--farm")
        .arg(&farm.dir)
        .args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data")
        .arg(data)
        .arg("--users")
        .arg(work.join("users.toml"))
        .arg("--root-key")
        .arg(work.join("gateway-root.key"))
        .env("SHARDFARM_GATEWAY_SNAPSHOT_EVERY", SNAPSHOT_EVERY.to_string())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut gw = Gateway { child, endpoint: format!("http://127.0.0.1:{port}"), log: log_path };
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = gw.child.try_wait() {
            let log = std::fs::read_to_string(work.join(format!("gateway-{port}.log")));
            panic!("the gateway exited ({status}):\n{}", log.unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "the gateway did not listen within 120 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    gw
}

pub fn delegate(farm: &Farm, out: &Path) {
    let st = Command::new(BIN)
        .args(["identity", "delegate", "--days", "2", "--root"])
        .arg(farm.dir.join("farm-root.key"))
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "identity delegate failed");
}
