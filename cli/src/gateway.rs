//! `shardfarm gateway`: the arguments of the S3 gateway (crate `shardfarm-gateway`), resolved
//! into its [`Config`](shardfarm_gateway::Config).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use shardfarm_client::{ClientIdentity, PoolProfile};

/// `shardfarm gateway`.
#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// Address to serve S3 on.
    #[arg(long, env = "SHARDFARM_GATEWAY_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Directory of the gateway's index (RocksDB). It can be lost: a gateway with the same
    /// root key rebuilds it from the pool.
    #[arg(long, env = "SHARDFARM_GATEWAY_DATA")]
    pub data: PathBuf,
    /// The pool's coordinator, host:port (instead of a profile given with --pool or --farm).
    #[arg(long, env = "SHARDFARM_COORDINATOR", requires = "pool_id")]
    pub coordinator: Option<String>,
    /// The pool key id to pin (64 hex digits), with --coordinator.
    #[arg(long, env = "SHARDFARM_POOL_ID", requires = "coordinator")]
    pub pool_id: Option<String>,
    /// The pool runs without TLS (debugging only), with --coordinator.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// The gateway's root identity file (mined or delegated): it signs the namespace log and
    /// its key derives where the log lives. Or SHARDFARM_GATEWAY_ROOT_KEY_TEXT (its text).
    #[arg(long, env = "SHARDFARM_GATEWAY_ROOT_KEY")]
    pub root_key: Option<PathBuf>,
    /// The users file (TOML: `[[users]]` with access_key, secret_key or secret_key_env, and
    /// identity_file or identity_env). Or SHARDFARM_GATEWAY_USERS_TEXT (its text).
    #[arg(long, env = "SHARDFARM_GATEWAY_USERS")]
    pub users: Option<PathBuf>,
    /// How many namespace log entries apart a snapshot of the namespace is written: a gateway
    /// rebuilt from the pool loads the newest snapshot and replays at most this many entries.
    #[arg(long, env = "SHARDFARM_GATEWAY_SNAPSHOT_EVERY", default_value_t = shardfarm_gateway::namespace::SNAPSHOT_EVERY,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every: u64,
    /// How old (seconds) data that no namespace log entry references (a write the gateway
    /// crashed during, a deletion the pool did not answer) must be before it is deleted.
    #[arg(long, env = "SHARDFARM_GATEWAY_COLLECT_GRACE", default_value_t = shardfarm_gateway::collector::COLLECT_GRACE.as_secs())]
    pub collect_grace_secs: u64,
    /// Structured (JSON) logs.
    #[arg(long, env = "SHARDFARM_JSON_LOGS")]
    pub json_logs: bool,
}

/// Runs the gateway until SIGTERM/SIGINT. `profile` is the pool profile from --pool/--farm
/// when --coordinator is not given.
pub async fn run(args: GatewayArgs, profile: Option<PathBuf>) -> anyhow::Result<()> {
    let profile = match (&args.coordinator, &args.pool_id, profile) {
        (Some(addr), Some(id), _) => {
            let id = shardfarm_core::identity::NodeId::from_hex(id)
                .map_err(|e| anyhow::anyhow!("--pool-id: {e}"))?;
            let mut p = PoolProfile::new(addr, id);
            p.insecure_plaintext = args.insecure_plaintext;
            p
        }
        (_, _, Some(path)) => PoolProfile::load(&path)?,
        _ => bail!("no pool: pass --coordinator and --pool-id, or --pool/--farm before `gateway`"),
    };
    let root = match (&args.root_key, std::env::var("SHARDFARM_GATEWAY_ROOT_KEY_TEXT")) {
        (Some(f), _) => ClientIdentity::load(f).context("--root-key")?,
        (None, Ok(text)) => ClientIdentity::from_text(&text, "SHARDFARM_GATEWAY_ROOT_KEY_TEXT")?,
        (None, Err(_)) => {
            bail!("no root key: pass --root-key FILE or set SHARDFARM_GATEWAY_ROOT_KEY_TEXT")
        }
    };
    let users = match (&args.users, std::env::var("SHARDFARM_GATEWAY_USERS_TEXT")) {
        (Some(f), _) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, Ok(text)) => text,
        (None, Err(_)) => bail!("no users: pass --users FILE or set SHARDFARM_GATEWAY_USERS_TEXT"),
    };
    shardfarm_gateway::run(shardfarm_gateway::Config {
        listen: args.listen,
        data: args.data,
        profile,
        root,
        users,
        snapshot_every: args.snapshot_every,
        collect_grace: std::time::Duration::from_secs(args.collect_grace_secs),
    })
    .await
}
