//! `shardfarm`: store files on a farm nobody has to trust.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use shardfarm::progress::Bar;
use shardfarm_client::FarmClient;
use shardfarm_core::cap::ReadCap;

/// Shardfarm: files are encrypted on this machine, Reed-Solomon coded into k+m shards and
/// spread over the farm's nodes; no node can read them, any m lost nodes lose nothing.
///
/// Exit codes: 0 success, 1 failure (unreachable farm, lost data, refused request…),
/// 2 usage error (bad flags or a malformed capability).
#[derive(Parser)]
#[command(name = "shardfarm", version)]
struct Cli {
    /// Farm directory written by `shardfarm local up` [default: ./farm].
    #[arg(long, global = true, env = "SHARDFARM_FARM")]
    farm: Option<PathBuf>,
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

/// Where the farm is: `--farm DIR`, else `SHARDFARM_FARM` (both through clap), else `./farm`.
fn farm_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| PathBuf::from("farm"))
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
    let dir = farm_dir(cli.farm.clone());
    match cli.command {
        Command::Put { file } => {
            let path = (file != "-").then(|| PathBuf::from(&file));
            if let Some(p) = &path
                && !p.is_file()
            {
                anyhow::bail!("cannot read {}: no such file", p.display());
            }
            let client = FarmClient::open_with(&dir, Arc::new(Bar::default()))?;
            let cap = client.put(open_input(path)?).await?;
            if cli.json {
                println!("{}", serde_json::json!({ "cap": cap.encode() }));
            } else {
                println!("{cap}");
            }
        }
        Command::Get { cap, output } => {
            let cap = parse_cap(&cap)?;
            let client = FarmClient::open_with(&dir, Arc::new(Bar::default()))?;
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
            let client = FarmClient::open_with(&dir, Arc::new(Bar::default()))?;
            let st = client.stat(&cap).await?;
            if cli.json {
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
            let client = FarmClient::open_with(&dir, Arc::new(Bar::default()))?;
            let n = client.rm(&cap).await?;
            if cli.json {
                println!("{}", serde_json::json!({ "deleted_shards": n }));
            } else {
                eprintln!("deleted {n} shards");
            }
        }
        Command::Nodes => {
            let client = FarmClient::open_with(&dir, Arc::new(Bar::default()))?;
            let nodes = client.nodes().await;
            if cli.json {
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
            let client = FarmClient::open_with(&dir, Arc::new(Bar::default()))?;
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
            if cli.json {
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
