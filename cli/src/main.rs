//! `shardfarm`: store files on a farm nobody has to trust.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shardfarm::ids::{IdentityCommand, PoolCommand};
use shardfarm::progress::Bar;
use shardfarm_client::PoolClient;
use shardfarm_core::cap::ReadCap;

/// Shardfarm: files are encrypted on this machine, Reed-Solomon coded into k+m shards and
/// spread over the farm's nodes; no node can read them, any m lost nodes lose nothing.
///
/// Exit codes: 0 success, 1 failure (unreachable farm, lost data, refused request…),
/// 2 usage error (bad flags or a malformed capability).
#[derive(Parser)]
#[command(name = "shardfarm", version)]
struct Cli {
    /// The pool: a profile name (see `shardfarm pool add`) or a profile file. Give it before
    /// the command: `shardfarm --pool NAME put FILE`.
    #[arg(long, env = "SHARDFARM_POOL")]
    pool: Option<String>,
    /// A farm directory written by `shardfarm local up` (its DIR/pool.toml profile)
    /// [default: ./farm when neither --pool nor --farm is given].
    #[arg(long, global = true, env = "SHARDFARM_FARM")]
    farm: Option<PathBuf>,
    /// The identity to sign with: a mined identity or a delegated client key [default: the
    /// profile's `identity`, else $XDG_CONFIG_HOME/shardfarm/identity.key].
    #[arg(long, global = true, env = "SHARDFARM_IDENTITY")]
    identity: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Store a file (or `-` for stdin); prints its read capability on stdout.
    Put {
        /// The file, or `-`.
        file: String,
    },
    /// Read a file back from its capability.
    Get {
        /// The `sf2:…` read capability.
        cap: String,
        /// Output file, or `-` for stdout [default: -].
        #[arg(short, long, default_value = "-")]
        output: String,
    },
    /// Show where an object's shards are and whether each verifies.
    Stat {
        /// The `sf2:…` read capability.
        cap: String,
    },
    /// Delete an object (its uploader only).
    Rm {
        /// The `sf2:…` read capability.
        cap: String,
    },
    /// List the farm's nodes: state, standing, usage, reputation and rewards.
    Nodes,
    /// Rewards recorded in the coordinator's signed ledger, per node and per farm.
    Rewards,
    /// Client identities: mine one, delegate keys from it, show one.
    Identity {
        #[command(subcommand)]
        command: shardfarm::ids::IdentityCommand,
    },
    /// Pool profiles: how to reach a pool and which pool key to pin.
    Pool {
        #[command(subcommand)]
        command: shardfarm::ids::PoolCommand,
    },
    /// Serve an S3-compatible endpoint over the pool (see `shardfarm gateway --help`).
    Gateway(Box<shardfarm::gateway::GatewayArgs>),
    /// Run a whole farm on this machine.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Run a node agent (see `shardfarm agent --help`).
    Agent(Box<shardfarm_agent::AgentArgs>),
    /// Run a pool's coordinator on its own (without Kubernetes; see `shardfarm coordinator
    /// --help`).
    Coordinator(shardfarm::coordinator::CoordinatorArgs),
    /// Run the Kubernetes operator and the pool's coordinator (in a cluster).
    Operator(shardfarm_operator::run::OperatorArgs),
    /// Create a data directory owned by UID:GID with mode 0700 (the agent pods' init step on
    /// a hostPath, which the kubelet creates root-owned).
    #[command(hide = true)]
    PrepareDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// Its owner, `UID:GID`.
        #[arg(long)]
        owner: String,
    },
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Start the coordinator and N agents on 127.0.0.1; Ctrl-C stops them.
    Up(shardfarm::local::UpArgs),
}

/// An error that is the user's input, not a failure of the farm: exit code 2.
#[derive(Debug)]
struct Usage(String);
impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

fn parse_cap(s: &str) -> anyhow::Result<ReadCap> {
    s.parse::<ReadCap>().map_err(|e| anyhow::Error::new(Usage(e.to_string())))
}

/// Where the pool is and whom to sign as: the global options client commands share.
struct Target {
    pool: Option<String>,
    farm: Option<PathBuf>,
    identity: Option<PathBuf>,
}

/// The profile to open: `--pool` (a name or a file), else `--farm DIR`'s `DIR/pool.toml`,
/// else `./farm/pool.toml`.
fn profile_path(cli: &Target) -> anyhow::Result<PathBuf> {
    use shardfarm_client::profile;
    if let Some(p) = &cli.pool {
        return profile::resolve(p)
            .map_err(|e| anyhow::Error::new(Usage(format!("--pool: {e:#}"))));
    }
    let dir = cli.farm.clone().unwrap_or_else(|| PathBuf::from("farm"));
    let path = dir.join(profile::LOCAL_PROFILE);
    if cli.farm.is_none() && !path.exists() {
        return Err(anyhow::Error::new(Usage(
            "no pool: pass --pool NAME|FILE (`shardfarm pool add` saves one) or --farm DIR \
             (a `shardfarm local up` directory)"
                .into(),
        )));
    }
    if !path.exists() {
        anyhow::bail!(
            "no farm at {}: start one with `shardfarm local up --data {}`, or name a pool with \
             --pool",
            dir.display(),
            dir.display()
        );
    }
    Ok(path)
}

/// Opens the pool for a client command.
async fn open(cli: &Target) -> anyhow::Result<Arc<PoolClient>> {
    let path = profile_path(cli)?;
    let mut identity = cli.identity.clone();
    if identity.is_none() {
        let profile = shardfarm_client::PoolProfile::load(&path)?;
        if profile.identity.is_none() {
            identity = Some(shardfarm::ids::default_identity()?);
        }
    }
    PoolClient::open(&path, identity.as_deref(), Arc::new(Bar::default())).await
}

/// Opens `path`, or spools stdin (`None`) to a temporary file so its length is known.
fn open_input(path: Option<PathBuf>) -> anyhow::Result<std::fs::File> {
    match path {
        Some(p) => std::fs::File::open(&p).with_context(|| format!("cannot read {}", p.display())),
        None => {
            use std::io::Seek;
            let mut spool = tempfile::tempfile().context("creating a spool file for stdin")?;
            std::io::copy(&mut std::io::stdin().lock(), &mut spool)?;
            spool.rewind()?;
            Ok(spool)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let target = Target { pool: cli.pool, farm: cli.farm, identity: cli.identity };
    let json = cli.json;
    match cli.command {
        Command::Put { file } => {
            let path = (file != "-").then(|| PathBuf::from(&file));
            if let Some(p) = &path
                && !p.is_file()
            {
                anyhow::bail!("cannot read {}: no such file", p.display());
            }
            let client = open(&target).await?;
            let cap = client.put(open_input(path)?).await?;
            if json {
                println!("{}", serde_json::json!({ "cap": cap.encode() }));
            } else {
                println!("{cap}");
            }
        }
        Command::Get { cap, output } => {
            let cap = parse_cap(&cap)?;
            let client = open(&target).await?;
            if output == "-" {
                let mut stdout = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout());
                client.get_to(&cap, &mut stdout).await?;
            } else {
                let n = client.get_file(&cap, std::path::Path::new(&output)).await?;
                eprintln!("wrote {} to {output}", shardfarm_core::human_bytes(n));
            }
        }
        Command::Stat { cap } => {
            let cap = parse_cap(&cap)?;
            let client = open(&target).await?;
            let st = client.stat(&cap).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!(
                    "object: {} in pool {}, RS({},{}), {} segments",
                    shardfarm_core::human_bytes(st.length),
                    st.pool,
                    st.k,
                    st.m,
                    st.segments.len()
                );
                for s in &st.segments {
                    let health = if s.present == s.total {
                        "healthy"
                    } else if s.present >= usize::from(st.k) {
                        "degraded"
                    } else {
                        "LOST"
                    };
                    println!(
                        "segment {:>4}: {} of {} {health}{}",
                        s.index,
                        s.present,
                        s.total,
                        if s.missing.is_empty() {
                            String::new()
                        } else {
                            format!(" (missing shards {:?})", s.missing)
                        }
                    );
                    for (i, h) in s.holders.iter().enumerate() {
                        println!("    shard {i}: node {}", &h[..12.min(h.len())]);
                    }
                }
            }
        }
        Command::Rm { cap } => {
            let cap = parse_cap(&cap)?;
            let client = open(&target).await?;
            let n = client.rm(&cap).await?;
            if json {
                println!("{}", serde_json::json!({ "deleted_shards": n }));
            } else {
                eprintln!("deleted {n} shards");
            }
        }
        Command::Nodes => {
            let client = open(&target).await?;
            let nodes = client.nodes().await;
            if json {
                println!("{}", serde_json::to_string_pretty(&nodes)?);
            } else {
                println!(
                    "{:<14} {:<18} {:<8} {:<5} {:<12} {:>10} {:>10} {:>7} {:>6} {:>6} {:>7} {:>12}",
                    "id",
                    "address",
                    "zone",
                    "state",
                    "standing",
                    "capacity",
                    "used",
                    "shards",
                    "slots",
                    "audit",
                    "uptime",
                    "rewards"
                );
                let na = || "n/a".to_string();
                for n in nodes {
                    println!(
                        "{:<14} {:<18} {:<8} {:<5} {:<12} {:>10} {:>10} {:>7} {:>6} {:>6} {:>7} {:>12}",
                        &n.id[..12.min(n.id.len())],
                        n.address,
                        n.zone,
                        n.state,
                        n.standing.clone().unwrap_or_else(na),
                        shardfarm_core::human_bytes(n.capacity_bytes),
                        shardfarm_core::human_bytes(n.used_bytes),
                        n.shards,
                        n.slots.map_or_else(na, |s| s.to_string()),
                        n.reputation.map_or_else(na, |r| format!("{r:.3}")),
                        n.uptime.map_or_else(na, |u| format!("{:.1}%", u * 100.0)),
                        n.rewards.map_or_else(na, |(a, b)| (a + b).to_string()),
                    );
                }
            }
        }
        Command::Rewards => {
            let client = open(&target).await?;
            let members = client.members().await.ok_or_else(|| {
                anyhow::anyhow!(
                    "the farm's coordinator does not answer: is `shardfarm local up` running?"
                )
            })?;
            let mut farms: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
            let mut rows = Vec::new();
            for m in &members {
                let farm =
                    m.labels.get("farm").or(m.labels.get("zone")).cloned().unwrap_or_default();
                let f = farms.entry(farm.clone()).or_default();
                f.0 += m.rewards_rw1;
                f.1 += m.rewards_rw2;
                rows.push(serde_json::json!({
                    "node": hex::encode(&m.node_id), "farm": farm,
                    "rw1": m.rewards_rw1, "rw2": m.rewards_rw2,
                }));
            }
            if json {
                let by_farm: Vec<_> = farms
                    .iter()
                    .map(|(f, (a, b))| serde_json::json!({"farm": f, "rw1": a, "rw2": b}))
                    .collect();
                println!("{}", serde_json::json!({ "nodes": rows, "farms": by_farm }));
            } else {
                println!("{:<14} {:<10} {:>12} {:>12}", "node", "farm", "RW1", "RW2");
                for r in &rows {
                    let id = r["node"].as_str().unwrap_or_default();
                    println!(
                        "{:<14} {:<10} {:>12} {:>12}",
                        &id[..12.min(id.len())],
                        r["farm"].as_str().unwrap_or_default(),
                        r["rw1"],
                        r["rw2"]
                    );
                }
                println!("{:<14} {:<10} {:>12} {:>12}", "farm", "", "RW1", "RW2");
                for (f, (a, b)) in &farms {
                    println!("{:<14} {:<10} {:>12} {:>12}", f, "", a, b);
                }
            }
        }
        Command::Identity { command } => identity(&command, json)?,
        Command::Pool {
            command:
                PoolCommand::Add {
                    name,
                    coordinator,
                    pool_id,
                    identity,
                    insecure_plaintext,
                    seeds,
                    force,
                },
        } => {
            let path = shardfarm::ids::add_pool(
                &name,
                &coordinator,
                &pool_id,
                identity,
                insecure_plaintext,
                seeds,
                force,
            )
            .map_err(|e| anyhow::Error::new(Usage(format!("{e:#}"))))?;
            eprintln!("wrote {}; use it with `shardfarm --pool {name} …`", path.display());
        }
        Command::Pool { command: PoolCommand::Show } => {
            let client = open(&target).await?;
            let v = client.view();
            let out = serde_json::json!({
                "pool": v.pool, "pool_id": client.profile().pool_id,
                "coordinator": client.profile().coordinator,
                "k": v.k, "m": v.m, "partitions": v.partitions,
                "segment_size": v.segment_size, "min_difficulty": v.min_difficulty,
                "layout_version": v.layout.layout.version, "nodes": v.nodes().len(),
                "in_sync": v.layout.previous.is_none(),
            });
            if json {
                println!("{out}");
            } else {
                println!(
                    "pool {} (key {}) at {}\nRS({},{}) over {} partitions, {} segments, identity difficulty {}\nlayout {} over {} nodes{}",
                    v.pool,
                    client.profile().pool_id,
                    client.profile().coordinator,
                    v.k,
                    v.m,
                    v.partitions,
                    shardfarm_core::human_bytes(v.segment_size),
                    v.min_difficulty,
                    v.layout.layout.version,
                    v.nodes().len(),
                    if v.layout.previous.is_some() { " (nodes are moving data)" } else { "" }
                );
            }
        }
        Command::Gateway(args) => {
            shardfarm_agent::run::init_tracing(args.json_logs);
            let profile = match args.coordinator {
                Some(_) => None,
                None => Some(profile_path(&target)?),
            };
            shardfarm::gateway::run(*args, profile).await?
        }
        Command::Local { command: LocalCommand::Up(args) } => shardfarm::local::up(args).await?,
        Command::Agent(args) => shardfarm_agent::run::run(*args).await?,
        Command::Coordinator(args) => {
            shardfarm_agent::run::init_tracing(false);
            shardfarm::coordinator::run(args).await?
        }
        Command::PrepareDir { dir, owner } => shardfarm::prepare_dir(&dir, &owner)?,
        Command::Operator(args) => {
            shardfarm_agent::run::init_tracing(true);
            shardfarm_operator::run::run(args).await?
        }
    }
    Ok(())
}

fn identity(command: &IdentityCommand, json: bool) -> anyhow::Result<()> {
    match command {
        IdentityCommand::New(args) => {
            let path = shardfarm::ids::new_identity(args)?;
            if json {
                let id = shardfarm_client::ClientIdentity::load(&path)?;
                println!("{}", serde_json::json!({"id": id.id().to_hex(), "file": path}));
            }
        }
        IdentityCommand::Delegate(args) => {
            let ck = shardfarm::ids::delegate(args)?;
            let id = shardfarm_core::identity::NodeId::of(&ck.key.verifying_key());
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": id.to_hex(), "root": ck.cert.issuer_id().to_hex(),
                                       "expires": ck.cert.expires, "file": args.out})
                );
            } else {
                eprintln!(
                    "delegated key {} from root {} until unix time {}; wrote {}",
                    id.to_hex(),
                    ck.cert.issuer_id().to_hex(),
                    ck.cert.expires,
                    args.out.display()
                );
            }
        }
        IdentityCommand::Show { file } => println!("{}", shardfarm::ids::show(file.clone())?),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(cli));
    // Whatever is still running (a stream, a blocking task) does not hold the exit up.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<Usage>().is_some() { ExitCode::from(2) } else { ExitCode::FAILURE }
        }
    }
}
