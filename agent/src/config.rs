//! Agent configuration: flags, `SHARDFARM_*` environment variables and a TOML file, in that
//! order of precedence, then built-in defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use shardfarm_core::identity::DEFAULT_DIFFICULTY;

/// Every option of the agent. Each may come from a flag, its environment variable, or the
/// same key (with underscores) in the `--config` TOML file.
#[derive(Args, Deserialize, Debug, Default, Clone)]
#[serde(default, deny_unknown_fields)]
pub struct AgentArgs {
    /// TOML file with any of these options (keys with underscores, e.g. `data_dir = "/srv"`).
    #[arg(long, env = "SHARDFARM_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Directory for the identity, the RocksDB index and the shard files. [default: ./agent-data]
    #[arg(long, env = "SHARDFARM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// gRPC listen address; port 0 picks a free port (written to DATA_DIR/endpoints.json).
    /// [default: 127.0.0.1:7400]
    #[arg(long, env = "SHARDFARM_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// HTTP address for /metrics, /healthz and /readyz. [default: 127.0.0.1:7401]
    #[arg(long, env = "SHARDFARM_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// Capacity offered to the pool, e.g. `500GiB`, `2TB`, `1048576`. [default: 10GiB]
    #[arg(long, env = "SHARDFARM_CAPACITY")]
    pub capacity: Option<String>,

    /// Proof-of-work bits to mine this node's identity to on first start. [default: 28]
    #[arg(long, env = "SHARDFARM_IDENTITY_DIFFICULTY")]
    pub identity_difficulty: Option<u8>,

    /// Minimum proof-of-work bits the pool requires of callers. [default: 28]
    #[arg(long, env = "SHARDFARM_POOL_DIFFICULTY")]
    pub pool_difficulty: Option<u8>,

    /// Number of placement partitions in the pool. [default: 256]
    #[arg(long, env = "SHARDFARM_PARTITIONS")]
    pub partitions: Option<u32>,

    /// Failure-domain zone label of this node. [default: none]
    #[arg(long, env = "SHARDFARM_ZONE")]
    pub zone: Option<String>,

    /// Extra labels, `key=value`, repeatable (e.g. `--label rack=r12`).
    #[arg(long = "label", env = "SHARDFARM_LABELS", value_delimiter = ',')]
    pub labels: Option<Vec<String>>,

    /// Accepted clock skew of request timestamps, in seconds. [default: 300]
    #[arg(long, env = "SHARDFARM_TIMESTAMP_WINDOW")]
    pub timestamp_window: Option<u64>,

    /// Requests per second allowed per caller identity; 0 = unlimited. [default: 0]
    #[arg(long, env = "SHARDFARM_RATE_LIMIT")]
    pub rate_limit: Option<u32>,

    /// Bytes an owner root may store on this node, e.g. `100GiB`; 0 = unlimited. [default: 0]
    #[arg(long, env = "SHARDFARM_QUOTA")]
    pub quota: Option<String>,

    /// Only these caller ids (hex) may call; repeatable. Empty = anyone mined enough.
    #[arg(long = "allow", env = "SHARDFARM_ALLOW", value_delimiter = ',')]
    pub allow: Option<Vec<String>>,

    /// These caller or owner-root ids (hex) are refused; repeatable.
    #[arg(long = "deny", env = "SHARDFARM_DENY", value_delimiter = ',')]
    pub deny: Option<Vec<String>>,

    /// Seconds between the starts of two scrub passes. [default: 86400]
    #[arg(long, env = "SHARDFARM_SCRUB_INTERVAL")]
    pub scrub_interval: Option<u64>,

    /// Scrub read rate, bytes per second (e.g. `50MiB`). [default: 50MiB]
    #[arg(long, env = "SHARDFARM_SCRUB_RATE")]
    pub scrub_rate: Option<String>,

    /// Largest gRPC message accepted or sent, e.g. `8MiB`. [default: 8MiB]
    #[arg(long, env = "SHARDFARM_MAX_MESSAGE")]
    pub max_message: Option<String>,

    /// Overhead factor `o` reported in capacity proofs. [default: 1.0]
    #[arg(long, env = "SHARDFARM_OVERHEAD")]
    pub overhead: Option<f64>,

    /// Most leading zero bits a capacity challenge may ask for (each bit doubles the work a
    /// caller can make this node do; the pool's own challenge must fit). [default: 20]
    #[arg(long, env = "SHARDFARM_MAX_CAPACITY_DIFFICULTY")]
    pub max_capacity_difficulty: Option<u32>,

    /// Seconds an upload may go without a byte before it is aborted and its reserved
    /// capacity released (a stalled client cannot hold space). [default: 30]
    #[arg(long, env = "SHARDFARM_UPLOAD_IDLE_TIMEOUT")]
    pub upload_idle_timeout: Option<u64>,

    /// Uploads in flight on this node, from everyone (each holds a temp file and a
    /// reservation; more are refused with RESOURCE_EXHAUSTED). [default: 1024]
    #[arg(long, env = "SHARDFARM_MAX_UPLOADS")]
    pub max_uploads: Option<u32>,

    /// Uploads in flight for one owner root (an identity and its delegated ids): one client
    /// cannot take every upload slot. [default: 128]
    #[arg(long, env = "SHARDFARM_MAX_UPLOADS_PER_IDENTITY")]
    pub max_uploads_per_identity: Option<u32>,

    /// Bytes reserved for uploads in flight of one owner root (capacity is reserved in 4 MiB
    /// steps as bytes arrive, never for what a header claims). [default: 1GiB]
    #[arg(long, env = "SHARDFARM_MAX_UPLOAD_BYTES_PER_IDENTITY")]
    pub max_upload_bytes_per_identity: Option<String>,

    /// Slowest an upload may send, bytes per second averaged over 10 s windows (the last
    /// window only needs what is left): a slower stream is aborted and its reservation
    /// released. `0` turns the check off. [default: 64KiB]
    #[arg(long, env = "SHARDFARM_MIN_UPLOAD_RATE")]
    pub min_upload_rate: Option<String>,

    /// Requests a second one owner root (all its keys and connections) may send this node
    /// per share of its proven work (2^(bits above the pool's minimum), at most 8), with a
    /// burst of 2 s of it. Past it the root is not refused: its connections are not read
    /// until it is back within the rate. Pool members are never paced. `0` turns pacing off.
    /// [default: 200]
    #[arg(long, env = "SHARDFARM_REQUESTS_PER_ROOT")]
    pub requests_per_root: Option<u32>,

    /// Log format: `text` or `json`. [default: text]
    #[arg(long, env = "SHARDFARM_LOG_FORMAT")]
    pub log_format: Option<String>,

    /// Coordinator to join (`host:port`). Without it the agent serves alone: no layouts, no
    /// repair.
    #[arg(long, env = "SHARDFARM_COORDINATOR")]
    pub coordinator: Option<String>,

    /// Id (64 hex digits) of the pool key: the coordinator's identity, which signs every
    /// layout. Required with --coordinator; layouts signed by any other key are refused. Find
    /// it in the farm dir's `farm.json` (`pool_id`), the coordinator's first log line, or the
    /// StoragePool's status (`kubectl get storagepool -o jsonpath='{.status.poolId}'`).
    #[arg(long, env = "SHARDFARM_POOL_ID")]
    pub pool_id: Option<String>,

    /// Key file of the farm this agent belongs to (`local up`'s `farm.key`; in Kubernetes the
    /// operator passes the MiningFarm's key in SHARDFARM_FARM_KEY_TEXT instead). With it the
    /// agent presents a grant at every join, and the pool trusts its labels as the owner's own
    /// agent's; without it the agent is an outsider, whose failure domain the pool assigns.
    #[arg(long, env = "SHARDFARM_FARM_KEY")]
    pub farm_key: Option<PathBuf>,

    /// The farm key itself, as the text of a key file (how Kubernetes hands over a Secret).
    #[arg(long, env = "SHARDFARM_FARM_KEY_TEXT", hide = true, hide_env_values = true)]
    #[serde(skip)]
    pub farm_key_text: Option<String>,

    /// gRPC address to advertise to the pool (`host:port`). [default: the --listen address]
    #[arg(long, env = "SHARDFARM_ADVERTISE")]
    pub advertise: Option<String>,

    /// DEBUGGING ONLY: serve and dial plaintext HTTP/2 instead of TLS. Nobody's identity is
    /// then checked on the connection and anyone on the path can read and rewrite traffic
    /// (layouts stay signed). Every party of the farm must agree. [default: false]
    #[arg(long, env = "SHARDFARM_INSECURE_PLAINTEXT", num_args = 0..=1, default_missing_value = "true")]
    pub insecure_plaintext: Option<bool>,

    /// Repair write rate, bytes per second (e.g. `100MiB`). [default: 100MiB]
    #[arg(long, env = "SHARDFARM_REPAIR_RATE")]
    pub repair_rate: Option<String>,

    /// Seconds after its creation a segment that never became readable (fewer than k shards
    /// in the whole pool, every holder answering) is garbage-collected. [default: 86400]
    #[arg(long, env = "SHARDFARM_GC_GRACE")]
    pub gc_grace: Option<u64>,

    /// Seconds between repair passes when no new layout arrives (a pass retries failed
    /// repairs, copies peers' tombstones and collects garbage). [default: 30]
    #[arg(long, env = "SHARDFARM_REPAIR_INTERVAL")]
    pub repair_interval: Option<u64>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// gRPC address.
    pub listen: SocketAddr,
    /// HTTP address.
    pub http_listen: SocketAddr,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Identity difficulty to mine.
    pub identity_difficulty: u8,
    /// Pool's minimum difficulty.
    pub pool_difficulty: u8,
    /// Partitions.
    pub partitions: u32,
    /// Labels, including `zone`.
    pub labels: BTreeMap<String, String>,
    /// Timestamp window.
    pub timestamp_window: Duration,
    /// Requests per second per caller, 0 = off.
    pub rate_limit: u32,
    /// Bytes per owner root, 0 = off.
    pub quota: u64,
    /// Allow list (empty = all).
    pub allow: Vec<[u8; 32]>,
    /// Deny list.
    pub deny: Vec<[u8; 32]>,
    /// Scrub interval.
    pub scrub_interval: Duration,
    /// Scrub rate, bytes/s.
    pub scrub_rate: u64,
    /// Max gRPC message size.
    pub max_message: usize,
    /// Capacity-proof overhead factor.
    pub overhead: f64,
    /// Hardest capacity challenge answered.
    pub max_capacity_difficulty: u32,
    /// Longest silence within an upload.
    pub upload_idle_timeout: std::time::Duration,
    /// Uploads in flight, all callers.
    pub max_uploads: u32,
    /// Uploads in flight per owner root.
    pub max_uploads_per_identity: u32,
    /// Bytes of uploads in flight per owner root.
    pub max_upload_bytes_per_identity: u64,
    /// Slowest upload, bytes/s over 10 s windows (0: unchecked).
    pub min_upload_rate: u64,
    /// Requests a second per owner root per share (0: not paced).
    pub requests_per_root: u32,
    /// JSON logs.
    pub json_logs: bool,
    /// Coordinator to join, and the id of the pool key it signs layouts with.
    pub coordinator: Option<(String, shardfarm_core::identity::NodeId)>,
    /// The farm key this agent's joins are vouched for with (None: an outsider).
    pub farm_key: Option<std::sync::Arc<shardfarm_core::identity::Identity>>,
    /// gRPC address to advertise (None: the bound address).
    pub advertise: Option<String>,
    /// TLS, or plaintext behind `--insecure-plaintext`.
    pub security: shardfarm_proto::Security,
    /// Repair write rate, bytes per second.
    pub repair_rate: u64,
    /// Grace period before an unreadable segment is collected.
    pub gc_grace: std::time::Duration,
    /// Repair pass interval.
    pub repair_interval: std::time::Duration,
}

/// Parses `10GiB`, `500MB`, `4096`, `1.5TiB`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| anyhow::anyhow!("`{s}` is not a size like 10GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        u => anyhow::bail!("unknown size unit `{u}` in `{s}` (use B, KiB, MiB, GiB, TiB, KB, MB…)"),
    };
    Ok((n * mult as f64) as u64)
}

fn parse_ids(list: &[String], what: &str) -> anyhow::Result<Vec<[u8; 32]>> {
    list.iter()
        .filter(|s| !s.is_empty())
        .map(|s| {
            shardfarm_core::identity::NodeId::from_hex(s.trim())
                .map(|id| id.0)
                .map_err(|e| anyhow::anyhow!("--{what} {s}: {e}"))
        })
        .collect()
}

/// The smallest per-root in-flight limit that lets one upload step through.
const RESERVE_STEP_FLOOR: u64 = crate::shard::RESERVE_STEP;

macro_rules! merge {
    ($cli:expr, $file:expr, $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.take(); } )* };
}

impl AgentArgs {
    /// Fills options not given by flag or environment from the `--config` file.
    pub fn with_file(mut self) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("reading config file {}: {e}", path.display()))?;
        let mut file: AgentArgs = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        merge!(
            self,
            file,
            data_dir,
            listen,
            http_listen,
            capacity,
            identity_difficulty,
            pool_difficulty,
            partitions,
            zone,
            labels,
            timestamp_window,
            rate_limit,
            quota,
            allow,
            deny,
            scrub_interval,
            scrub_rate,
            max_message,
            overhead,
            max_capacity_difficulty,
            upload_idle_timeout,
            max_uploads,
            max_uploads_per_identity,
            max_upload_bytes_per_identity,
            min_upload_rate,
            requests_per_root,
            log_format,
            coordinator,
            pool_id,
            farm_key,
            advertise,
            insecure_plaintext,
            repair_rate,
            gc_grace,
            repair_interval
        );
        Ok(self)
    }

    /// Applies defaults and checks every value.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let a = self.with_file()?;
        let mut labels = BTreeMap::new();
        for l in a.labels.unwrap_or_default() {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--label `{l}` must look like key=value"))?;
            labels.insert(k.trim().to_string(), v.trim().to_string());
        }
        if let Some(z) = a.zone {
            labels.insert("zone".into(), z);
        }
        let identity_difficulty = a.identity_difficulty.unwrap_or(DEFAULT_DIFFICULTY);
        let pool_difficulty = a.pool_difficulty.unwrap_or(DEFAULT_DIFFICULTY);
        for (name, d) in
            [("identity-difficulty", identity_difficulty), ("pool-difficulty", pool_difficulty)]
        {
            anyhow::ensure!(d <= 40, "--{name} {d} is above 40 bits (days of mining per node)");
        }
        let partitions = a.partitions.unwrap_or(256);
        anyhow::ensure!((1..=1 << 20).contains(&partitions), "--partitions must be 1..=1048576");
        let json_logs = match a.log_format.as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            f => anyhow::bail!("--log-format `{f}`: use text or json"),
        };
        let max_message = parse_size(a.max_message.as_deref().unwrap_or("8MiB"))? as usize;
        anyhow::ensure!(
            (1 << 20..=64 << 20).contains(&max_message),
            "--max-message must be between 1MiB and 64MiB"
        );
        Ok(Config {
            data_dir: a.data_dir.unwrap_or_else(|| PathBuf::from("agent-data")),
            listen: a.listen.unwrap_or_else(|| "127.0.0.1:7400".parse().unwrap()),
            http_listen: a.http_listen.unwrap_or_else(|| "127.0.0.1:7401".parse().unwrap()),
            capacity: parse_size(a.capacity.as_deref().unwrap_or("10GiB"))?,
            identity_difficulty,
            pool_difficulty,
            partitions,
            labels,
            timestamp_window: Duration::from_secs(a.timestamp_window.unwrap_or(300)),
            rate_limit: a.rate_limit.unwrap_or(0),
            quota: parse_size(a.quota.as_deref().unwrap_or("0"))?,
            allow: parse_ids(&a.allow.unwrap_or_default(), "allow")?,
            deny: parse_ids(&a.deny.unwrap_or_default(), "deny")?,
            scrub_interval: Duration::from_secs(a.scrub_interval.unwrap_or(86_400).max(1)),
            scrub_rate: parse_size(a.scrub_rate.as_deref().unwrap_or("50MiB"))?.max(1),
            max_message,
            overhead: a.overhead.unwrap_or(1.0),
            max_capacity_difficulty: a.max_capacity_difficulty.unwrap_or(20).clamp(8, 32),
            upload_idle_timeout: std::time::Duration::from_secs(
                a.upload_idle_timeout.unwrap_or(30).max(1),
            ),
            max_uploads: a.max_uploads.unwrap_or(1024).max(1),
            max_uploads_per_identity: a.max_uploads_per_identity.unwrap_or(128).max(1),
            max_upload_bytes_per_identity: parse_size(
                a.max_upload_bytes_per_identity.as_deref().unwrap_or("1GiB"),
            )?
            .max(RESERVE_STEP_FLOOR),
            min_upload_rate: parse_size(a.min_upload_rate.as_deref().unwrap_or("64KiB"))?,
            requests_per_root: a
                .requests_per_root
                .unwrap_or(shardfarm_proto::conns::REQUESTS_PER_ROOT),
            json_logs,
            coordinator: match (a.coordinator, a.pool_id) {
                (Some(c), Some(p)) => Some((
                    c,
                    shardfarm_core::identity::NodeId::from_hex(p.trim())
                        .map_err(|e| anyhow::anyhow!("--pool-id {p}: {e}"))?,
                )),
                (Some(_), None) => anyhow::bail!(
                    "--pool-id is required with --coordinator: layouts are only believed when \
                     the pool key signs them (see --help for where to find the id)"
                ),
                (None, Some(_)) => anyhow::bail!("--pool-id needs --coordinator"),
                (None, None) => None,
            },
            farm_key: match (a.farm_key_text, a.farm_key) {
                (Some(text), _) => Some(
                    shardfarm_core::identity::Identity::from_text(&text, "SHARDFARM_FARM_KEY_TEXT")
                        .map_err(|e| anyhow::anyhow!("farm key: {e}"))?,
                ),
                (None, Some(path)) => Some(
                    shardfarm_core::identity::Identity::load(&path)
                        .map_err(|e| anyhow::anyhow!("--farm-key: {e}"))?,
                ),
                (None, None) => None,
            }
            .map(std::sync::Arc::new),
            advertise: a.advertise,
            security: shardfarm_proto::Security::from_flag(a.insecure_plaintext.unwrap_or(false)),
            repair_rate: parse_size(a.repair_rate.as_deref().unwrap_or("100MiB"))?.max(1),
            gc_grace: std::time::Duration::from_secs(a.gc_grace.unwrap_or(86_400)),
            repair_interval: std::time::Duration::from_secs(a.repair_interval.unwrap_or(30).max(1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5XB").is_err());
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "capacity = \"1GiB\"\nzone = \"z1\"\nrate_limit = 5\n").unwrap();
        let args =
            AgentArgs { config: Some(file), capacity: Some("2GiB".into()), ..Default::default() };
        let c = args.resolve().unwrap();
        assert_eq!(c.capacity, 2 << 30);
        assert_eq!(c.labels["zone"], "z1");
        assert_eq!(c.rate_limit, 5);
        assert_eq!(c.partitions, 256);
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "capacityy = 1\n").unwrap();
        let err = AgentArgs { config: Some(file), ..Default::default() }.resolve().unwrap_err();
        assert!(err.to_string().contains("capacityy"), "{err}");
    }
}
