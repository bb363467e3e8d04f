//! Real agent processes for tests: each runs the `shardfarm-agent` binary on 127.0.0.1 with
//! its own temporary data dir and OS-assigned ports (read back from `endpoints.json`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shardfarm_core::codec::{CodecParams, Encoder};
use shardfarm_core::identity::Identity;
use shardfarm_core::shard::ShardId;
use shardfarm_core::shard::{Cipher, SegmentHeader};
use shardfarm_proto::{AgentClient, Signer};

/// Difficulty used by test identities and agents (cheap to mine).
pub const DIFFICULTY: u8 = 8;

/// A running agent process.
pub struct AgentProc {
    pub child: Child,
    pub dir: PathBuf,
    pub grpc: String,
    pub http: String,
    pub node_id: String,
    extra: Vec<String>,
}

impl AgentProc {
    /// Starts an agent in `dir` with extra flags.
    pub fn start(dir: &Path, extra: &[&str]) -> AgentProc {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(dir, extra)
    }

    // The child moves into the returned AgentProc, whose Drop kills and waits for it.
    #[allow(clippy::zombie_processes)]
    fn spawn(dir: &Path, extra: Vec<String>) -> AgentProc {
        let ep = dir.join("endpoints.json");
        let _ = std::fs::remove_file(&ep);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_shardfarm-agent"))
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(["--identity-difficulty", "8", "--pool-difficulty", "8"])
            .args(&extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn shardfarm-agent");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&ep)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && v["pid"].as_u64() == Some(u64::from(child.id()))
            {
                let s = |k: &str| v[k].as_str().unwrap().to_string();
                return AgentProc {
                    grpc: s("grpc"),
                    http: s("http"),
                    node_id: s("node_id"),
                    child,
                    dir: dir.to_path_buf(),
                    extra,
                };
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agent did not start: see {}", dir.with_extension("log").display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        unsafe_kill(self.child.id(), 15);
        self.child.wait().unwrap()
    }

    /// Starts the agent again on the same data dir with the same flags (new ports).
    pub fn restart(&mut self) {
        let _ = self.child.try_wait();
        *self = Self::spawn(&self.dir.clone(), self.extra.clone());
    }

    /// Replaces the extra flags used by the next [`AgentProc::restart`].
    pub fn extra_args(&mut self, args: &[&str]) {
        self.extra = args.iter().map(|s| s.to_string()).collect();
    }

    /// The agent's node id (every request to it is addressed to it).
    pub fn id(&self) -> shardfarm_core::identity::NodeId {
        shardfarm_core::identity::NodeId::from_hex(&self.node_id).unwrap()
    }

    /// A client signing as `signer`.
    pub async fn client(&self, signer: &Arc<Signer>) -> AgentClient {
        AgentClient::connect(&self.grpc, self.id(), signer.clone()).await.expect("connect to agent")
    }

    /// A generated-code client for hand-built requests, on a TLS connection that proves
    /// `signer`'s key (requests it carries must be signed by that key).
    pub async fn raw(
        &self,
        signer: &Signer,
    ) -> shardfarm_proto::pb::agent_client::AgentClient<tonic::transport::Channel> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc));
        let channel = signer.dial(endpoint.unwrap(), self.id()).await.expect("TLS to the agent");
        shardfarm_proto::pb::agent_client::AgentClient::new(channel)
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> String {
        http_get(&self.http, "/metrics")
    }

    /// The payload file of a shard.
    pub fn shard_file(&self, id: &ShardId) -> PathBuf {
        self.dir.join("shards").join(hex::encode(&id.object_id[..1])).join(id.file_name())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
}

/// A minimal HTTP/1.0 GET over loopback (no client dependency needed).
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Value of a metric sample line `name{labels} value` (first match of `prefix`).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A mined test identity and its signer.
/// A caller mined to exactly the agents' difficulty: one base share of every per-root limit
/// (`shardfarm_core::auth::share_weight`).
pub fn signer() -> (Identity, Arc<Signer>) {
    let id = std::iter::repeat_with(|| Identity::generate(DIFFICULTY, 1, &|_| {}).unwrap().0)
        .find(|id| id.difficulty() == u32::from(DIFFICULTY))
        .unwrap();
    let s = Arc::new(Signer::identity(&id));
    (id, s)
}

/// One encoded segment as owned data.
pub struct Seg {
    pub header: SegmentHeader,
    pub header_bytes: Vec<u8>,
    pub shards: Vec<Bytes>,
}

impl Seg {
    pub fn id(&self, shard: u32) -> ShardId {
        ShardId { object_id: self.header.object_id, segment: self.header.segment_index, shard }
    }
}

/// Encodes `len` pseudo-random bytes as one RS(k, m) segment uploaded by `uploader`.
pub fn segment(uploader: &Identity, len: usize, k: u16, m: u16) -> Seg {
    let p = CodecParams { k, m, segment_size: (len as u64).max(1), cipher: Cipher::preferred() };
    let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    let mut enc = Encoder::new(p, len as u64, uploader.signing_key().clone(), 1, 0).unwrap();
    let s = enc.encode_segment(0, &data).unwrap();
    Seg {
        header_bytes: s.header.encode(),
        shards: s.shards.iter().map(|b| Bytes::copy_from_slice(b)).collect(),
        header: s.header,
    }
}
