//! `shardfarm local up`: a whole farm on one machine.
//!
//! The process supervises the farm: its state lives in the data dir (`farm.json`, the farm
//! root identity — which is also the pool key —, the local user's delegated key), and it runs
//! the coordinator (`shardfarm coordinator …`, state in DIR/coordinator) and N agents
//! (`shardfarm agent …`) as child processes of this same binary on 127.0.0.1 (or `--host`), each with its
//! own ports, data dir and zone label. It follows the coordinator's signed layouts over gRPC
//! (as any client would: verified against the pool key, never an older one) into
//! `farm.json`. It restarts the coordinator whenever it exits and an agent that dies (unless
//! `--no-restart`), and stops them all with SIGTERM when it gets SIGTERM or Ctrl-C. A later
//! `local up` on the same dir resumes with the same identities, ports and data.
//!
//! Its agents carry the labels a MiningFarm's pods carry in a cluster: `farm` (the data dir's
//! name, assigned to every agent the farm key vouches for) and `pod=node-<i>`, which is how
//! the coordinator names them in its per-node metrics; scrape agent i with the target labels
//! `farm=<dir name>, node=node-<i>` and dashboards line both sides up as in a cluster.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shardfarm_core::identity::Identity;
use tokio::process::{Child, Command};

use shardfarm_coordinator::PoolConfig;
use shardfarm_coordinator::economics::RewardConfig;
use shardfarm_core::identity::NodeId;
use shardfarm_proto::{CoordinatorClient, LayoutGuard, Security, Signer};
use std::collections::BTreeMap;
use std::sync::Arc;

use shardfarm_client::farm::{CLIENT_KEY, ClientKey, Farm, NodeEntry, ROOT_KEY};

/// Identity difficulty of a local farm: enough to exercise the checks, quick to mine.
pub const LOCAL_DIFFICULTY: u8 = 8;
/// The pool settings `local up` hands its coordinator (DIR/pool.json).
const POOL_CONFIG: &str = "pool.json";
/// The farm key: grants from it tell the coordinator an agent is one of this farm's own (whose
/// zone label it trusts); agents started without it are outsiders.
const FARM_KEY: &str = "farm.key";
/// How long agents get to exit after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Options of `local up`.
#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Number of agents.
    #[arg(long, default_value_t = 6)]
    pub nodes: usize,
    /// Farm directory (state, keys, node data).
    #[arg(long, default_value = "farm", env = "SHARDFARM_FARM")]
    pub data: PathBuf,
    /// Data shards per segment.
    #[arg(long, default_value_t = 4)]
    pub k: u16,
    /// Parity shards per segment (any m nodes may be lost).
    #[arg(long, default_value_t = 2)]
    pub m: u16,
    /// Zones the nodes are spread over (node i is in zone i mod ZONES).
    #[arg(long, default_value_t = 3)]
    pub zones: usize,
    /// Do not restart agents that die (tests kill them on purpose).
    #[arg(long)]
    pub no_restart: bool,
    /// First port; node i uses BASE+2i (gRPC) and BASE+2i+1 (HTTP metrics).
    #[arg(long, default_value_t = 7400)]
    pub base_port: u16,
    /// Capacity each agent offers, e.g. 10GiB.
    #[arg(long, default_value = "10GiB")]
    pub capacity: String,
    /// Segment size, e.g. 64MiB.
    #[arg(long, default_value = "64MiB")]
    pub segment_size: String,
    /// Placement partitions.
    #[arg(long, default_value_t = 256)]
    pub partitions: u32,
    /// Agents report to the coordinator this often, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Seconds of silence after which a node is down and its slots are re-placed.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// Seconds between storage audits of each node.
    #[arg(long, default_value_t = 30)]
    pub audit_interval: u64,
    /// Rewards epoch, seconds.
    #[arg(long, default_value_t = 3600)]
    pub epoch_seconds: u64,
    /// Agents: seconds between repair passes without a new layout.
    #[arg(long, default_value_t = 30)]
    pub repair_interval: u64,
    /// Agents: seconds before a segment that never became readable is collected.
    #[arg(long, default_value_t = 86_400)]
    pub gc_grace: u64,
    /// Coordinator gRPC port (its /metrics is on the next port). [default: BASE-2]
    #[arg(long)]
    pub coordinator_port: Option<u16>,
    /// Audits a node that joins a running farm must pass before placement believes its
    /// capacity and zone (until then it holds few slots and earns no capacity reward; the
    /// farm's own agents are its founders and need none). 0: every node is trusted at once.
    #[arg(long, default_value_t = shardfarm_coordinator::vetting::VettingConfig::default().audits)]
    pub vetting_audits: u64,
    /// Address the agents and the coordinator serve gRPC on, for nodes of another site to
    /// join (`/metrics` stays on 127.0.0.1).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// DEBUGGING ONLY: run every hop as plaintext HTTP/2 instead of TLS (recorded in the farm
    /// file, so clients of this farm dial plaintext too).
    #[arg(long)]
    pub insecure_plaintext: bool,
}

impl UpArgs {
    fn coordinator_port(&self) -> u16 {
        self.coordinator_port.unwrap_or(self.base_port.saturating_sub(2))
    }

    fn coordinator_address(&self) -> String {
        std::net::SocketAddr::new(self.host, self.coordinator_port()).to_string()
    }

    /// The farm's name: its data dir's (the `farm` label of its agents and their rewards).
    fn farm_name(&self) -> String {
        let name = self.data.file_name().map(|n| n.to_string_lossy().into_owned());
        name.filter(|n| !n.is_empty()).unwrap_or_else(|| "farm".into())
    }

    fn pool(&self, segment_size: u64, farm: &Identity) -> PoolConfig {
        PoolConfig {
            // This farm's agents' labels are trusted as they are (it set them), and it names
            // itself in every one, as a MiningFarm does.
            farms: [(farm.id().to_hex(), [("farm".to_string(), self.farm_name())].into())].into(),
            pool: "local".into(),
            k: self.k,
            m: self.m,
            partitions: self.partitions,
            segment_size,
            min_difficulty: LOCAL_DIFFICULTY,
            failure_domain: "zone".into(),
            heartbeat_ms: self.heartbeat_ms,
            grace_ms: self.grace.max(1) * 1000,
            audit_interval_ms: self.audit_interval.max(1) * 1000,
            capacity_difficulty: LOCAL_DIFFICULTY,
            rewards: RewardConfig {
                epoch_seconds: self.epoch_seconds.max(1),
                ..Default::default()
            },
            security: Security::from_flag(self.insecure_plaintext),
            vetting: shardfarm_coordinator::vetting::VettingConfig {
                audits: self.vetting_audits,
                ..Default::default()
            },
            ..PoolConfig::default()
        }
    }
}

struct Agent {
    entry: NodeEntry,
    dir: PathBuf,
    child: Option<Child>,
}

/// `shardfarm SUBCOMMAND` as a supervised child: no stdin or stdout, stderr appended to
/// `log`, killed if the supervisor drops it.
fn supervised(subcommand: &str, log: &Path) -> anyhow::Result<Command> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let exe = std::env::current_exe().context("finding the shardfarm binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg(subcommand).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).kill_on_drop(true);
    Ok(cmd)
}

fn spawn_agent(a: &NodeEntry, dir: &Path, args: &UpArgs, pool: &str) -> anyhow::Result<Child> {
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    let d = LOCAL_DIFFICULTY.to_string();
    let child = supervised("agent", &dir.with_extension("log"))?
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", &a.grpc, "--http-listen", &a.http, "--zone", &a.zone])
        .args(["--label", &format!("pod=node-{}", a.index)])
        .args(["--identity-difficulty", &d, "--pool-difficulty", &d])
        .args(["--partitions", &args.partitions.to_string(), "--capacity", &args.capacity])
        .args(["--coordinator", &args.coordinator_address()])
        .args(["--pool-id", pool])
        .arg("--farm-key")
        .arg(args.data.join(FARM_KEY))
        .args(["--repair-interval", &args.repair_interval.to_string()])
        .args(["--gc-grace", &args.gc_grace.to_string()])
        .args(args.insecure_plaintext.then_some("--insecure-plaintext"))
        .spawn()
        .context("starting an agent")?;
    Ok(child)
}

async fn wait_ready(dir: &Path, child: &mut Child, within: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    let ep = dir.join("endpoints.json");
    loop {
        if let Ok(text) = std::fs::read_to_string(&ep)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["pid"].as_u64() == child.id().map(u64::from)
        {
            return Ok(v["node_id"].as_str().unwrap_or_default().to_string());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "agent in {} exited ({status}) during start: see {}",
                dir.display(),
                dir.with_extension("log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "agent in {} did not start in time: see {}",
                dir.display(),
                dir.with_extension("log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts the coordinator: state in DIR/coordinator, the farm root as the pool key, the pool
/// settings from DIR/pool.json, its log appended to DIR/coordinator.log.
fn spawn_coordinator(dir: &Path, args: &UpArgs) -> anyhow::Result<Child> {
    let port = args.coordinator_port();
    supervised("coordinator", &dir.join("coordinator.log"))?
        .arg("--state-dir")
        .arg(dir.join("coordinator"))
        .arg("--key")
        .arg(dir.join(ROOT_KEY))
        .arg("--pool-config")
        .arg(dir.join(POOL_CONFIG))
        .args(["--listen", &args.coordinator_address()])
        .args(["--metrics-listen", &format!("127.0.0.1:{}", port + 1)])
        .args(args.insecure_plaintext.then_some("--insecure-plaintext"))
        .spawn()
        .context("starting the coordinator")
}

/// A client of the coordinator at `addr`, which must prove the pool key `pool`; retried
/// until `within` has passed or the coordinator process exits (its log's last lines then say
/// why, e.g. "binding the coordinator's address").
async fn reach_coordinator(
    addr: &str,
    signer: &Arc<Signer>,
    pool: NodeId,
    within: Duration,
    (child, log): (&mut Child, &Path),
) -> anyhow::Result<CoordinatorClient> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let mut tail: Vec<&str> = text.lines().rev().take(5).collect();
            tail.reverse();
            bail!("the coordinator exited ({status}) during start:\n{}", tail.join("\n"));
        }
        match CoordinatorClient::connect(addr, signer.clone(), pool).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => bail!(
                "the coordinator at {addr} does not answer: {}",
                shardfarm_proto::tls::why(&e)
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// HTTP address and zone of every member, for the farm file.
async fn member_addresses(
    c: &mut CoordinatorClient,
) -> anyhow::Result<BTreeMap<NodeId, (String, String)>> {
    let nodes = c.list_nodes().await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.nodes;
    Ok(nodes
        .into_iter()
        .filter_map(|n| {
            let id = NodeId(n.node_id.as_ref().try_into().ok()?);
            let zone = n.labels.get("zone").cloned().unwrap_or_default();
            Some((id, (n.http_address, zone)))
        })
        .collect())
}

/// Follows the coordinator's layouts into the farm file, forever: each publication is
/// verified against the pool key and must be newer than the last (a [`LayoutGuard`]); the
/// stream is reopened whenever the coordinator goes away.
async fn follow_layouts(
    addr: String,
    signer: Arc<Signer>,
    mut guard: LayoutGuard,
    mut farm: Farm,
    dir: PathBuf,
) {
    loop {
        if let Ok(mut c) = CoordinatorClient::connect(&addr, signer.clone(), guard.pool()).await
            && let Ok(mut stream) = c.watch_layout().await
        {
            while let Ok(Some(signed)) = stream.message().await {
                let l = match guard.accept(&signed) {
                    Ok(Some(l)) => l,
                    Ok(None) => continue,
                    Err(why) => {
                        eprintln!("refused a layout from the coordinator: {why}");
                        continue;
                    }
                };
                match member_addresses(&mut c).await {
                    Ok(http) => farm.apply_layout(&l, &http),
                    Err(e) => eprintln!("could not list the members: {e:#}"),
                }
                match farm.save(&dir) {
                    Ok(()) if l.previous.is_some() => {
                        eprintln!("layout {} published; nodes are moving data", l.layout.version)
                    }
                    Ok(()) => eprintln!("layout {} in sync", l.layout.version),
                    Err(e) => eprintln!("could not write the farm file: {e:#}"),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Asks `child` to stop (SIGTERM) and waits [`STOP_GRACE`] before killing it.
async fn stop_child(child: &mut Child, what: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    }
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        eprintln!("{what} did not stop in {STOP_GRACE:?}; killing it");
        let _ = child.kill().await;
    }
}

/// The address a client on this machine dials for a service bound to `addr` (an unspecified
/// address, 0.0.0.0 or ::, is reached on loopback).
fn client_address(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let ip: std::net::IpAddr = if a.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            };
            std::net::SocketAddr::new(ip, a.port()).to_string()
        }
        _ => addr.to_string(),
    }
}

/// Runs the farm until SIGTERM/SIGINT.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let dir = &args.data;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let segment_size = shardfarm_agent::config::parse_size(&args.segment_size)?;
    let root_path = dir.join(ROOT_KEY);
    let root = if root_path.exists() {
        Identity::load(&root_path)?
    } else {
        let (id, _) = Identity::generate(LOCAL_DIFFICULTY, 0, &|_| {})?;
        id.save(&root_path)?;
        id
    };
    let client_path = dir.join(CLIENT_KEY);
    if !client_path.exists() {
        ClientKey::issue(&root, 365).save(&client_path)?;
    }

    let mut farm = match Farm::load(dir) {
        Ok(f) => {
            if f.nodes.len() < args.nodes || f.k != args.k || f.m != args.m {
                bail!(
                    "{} holds a farm of {} nodes with RS({},{}); start it with the same --k/--m \
                     and at most as many --nodes",
                    dir.display(),
                    f.nodes.len(),
                    f.k,
                    f.m
                );
            }
            eprintln!("resuming the farm in {}", dir.display());
            f
        }
        Err(_) => {
            if args.zones == 0 {
                bail!("--zones must be at least 1");
            }
            let nodes: Vec<NodeEntry> = (0..args.nodes)
                .map(|i| {
                    let port = usize::from(args.base_port) + 2 * i;
                    NodeEntry {
                        index: i,
                        id: String::new(),
                        grpc: format!("{}", std::net::SocketAddr::new(args.host, port as u16)),
                        http: format!("127.0.0.1:{}", port + 1),
                        zone: format!("zone-{}", i % args.zones),
                    }
                })
                .collect();
            Farm {
                version: 1,
                pool: "local".into(),
                k: args.k,
                m: args.m,
                segment_size,
                partitions: args.partitions,
                difficulty: LOCAL_DIFFICULTY,
                nodes,
                layout_version: 0,
                layout: Vec::new(),
                previous_layout: None,
                coordinator: None,
                pool_id: None,
                insecure_plaintext: false,
            }
        }
    };
    let coord_addr = args.coordinator_address();
    farm.coordinator = Some(coord_addr.clone());

    // The coordinator, a child process: its state is DIR/coordinator, it signs as the farm
    // root, whose id is the pool id every agent pins.
    let root = Identity::load(&root_path)?;
    let pool = root.id();
    let pool_id = pool.to_hex();
    farm.pool_id = Some(pool_id.clone());
    farm.insecure_plaintext = args.insecure_plaintext;
    // The client profile: every client command, and the gateway, open the pool through it
    // (the coordinator's address and the pinned pool key), signing with the farm's client key.
    let mut profile = shardfarm_client::PoolProfile::new(&client_address(&coord_addr), pool);
    profile.identity = Some(CLIENT_KEY.into());
    profile.insecure_plaintext = args.insecure_plaintext;
    profile.save(&dir.join(shardfarm_client::profile::LOCAL_PROFILE))?;
    let farm_key_path = dir.join(FARM_KEY);
    let farm_key = if farm_key_path.exists() {
        Identity::load(&farm_key_path)?
    } else {
        let (id, _) = Identity::generate(0, 1, &|_| {})?;
        id.save(&farm_key_path)?;
        id
    };
    let config = serde_json::to_vec_pretty(&args.pool(segment_size, &farm_key))?;
    std::fs::write(dir.join(POOL_CONFIG), config)?;
    let mut coordinator = spawn_coordinator(dir, &args)?;
    let security = Security::from_flag(args.insecure_plaintext);
    let signer = Arc::new(Signer::identity(&root).with_security(security));
    let log = dir.join("coordinator.log");
    let mut client = reach_coordinator(
        &coord_addr,
        &signer,
        pool,
        Duration::from_secs(30),
        (&mut coordinator, &log),
    )
    .await
    .with_context(|| format!("see {}", log.display()))?;
    let metrics_addr = format!("127.0.0.1:{}", args.coordinator_port() + 1);

    // The first --nodes entries are this farm's own agents; nodes that joined from outside are
    // listed in the farm file but not supervised here.
    let mut agents: Vec<Agent> = farm
        .nodes
        .iter()
        .take(args.nodes)
        .map(|e| Agent {
            entry: e.clone(),
            dir: dir.join(format!("node-{}", e.index)),
            child: None,
        })
        .collect();
    for a in agents.iter_mut() {
        a.child = Some(spawn_agent(&a.entry, &a.dir, &args, &pool_id)?);
    }
    for a in agents.iter_mut() {
        let child = a.child.as_mut().expect("spawned");
        let id = wait_ready(&a.dir, child, Duration::from_secs(60)).await?;
        farm.nodes[a.entry.index].id = id;
    }
    // The agents are the profile's seeds: a client reads and writes while the coordinator is
    // away, from any agent's signed layout.
    profile.seeds = agents
        .iter()
        .map(|a| format!("{}@{}", farm.nodes[a.entry.index].id, client_address(&a.entry.grpc)))
        .collect();
    profile.save(&dir.join(shardfarm_client::profile::LOCAL_PROFILE))?;
    // Up when the layout places every one of this farm's agents.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ours: Vec<shardfarm_core::identity::NodeId> = farm
        .nodes
        .iter()
        .take(args.nodes)
        .filter_map(|n| shardfarm_core::identity::NodeId::from_hex(&n.id).ok())
        .collect();
    let mut problem;
    let first = loop {
        match client.get_layout().await {
            Ok(l) if ours.iter().all(|id| l.layout.loads().contains_key(id)) => break l,
            Ok(_) => problem = "not every agent is placed yet".into(),
            Err(s) => problem = s.message().to_string(),
        }
        if Instant::now() > deadline {
            bail!("the coordinator published no layout within 60 s: {problem}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    farm.apply_layout(&first, &member_addresses(&mut client).await?);
    farm.save(dir)?;
    // The follower never goes back behind the layout just written.
    let mut guard = LayoutGuard::new(pool);
    if let Some(signed) = &first.signed {
        let _ = guard.accept(signed);
    }
    let writer = tokio::spawn(follow_layouts(
        coord_addr.clone(),
        signer.clone(),
        guard,
        farm.clone(),
        dir.clone(),
    ));

    println!(
        "shardfarm local farm is up: {} nodes, RS({},{}), pool `{}`",
        farm.nodes.len(),
        farm.k,
        farm.m,
        farm.pool
    );
    println!("{:<5} {:<14} {:<8} {:<18} metrics", "node", "id", "zone", "gRPC");
    for n in &farm.nodes {
        println!(
            "{:<5} {:<14} {:<8} {:<18} http://{}/metrics",
            n.index,
            &n.id[..12.min(n.id.len())],
            n.zone,
            n.grpc,
            n.http
        );
    }
    println!("coordinator: {coord_addr}   metrics: http://{metrics_addr}/metrics");
    println!("state: {}   try: shardfarm --farm {} put FILE", dir.display(), dir.display());
    println!("stop with Ctrl-C (or SIGTERM)");

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if let Some(status) = coordinator.try_wait()? {
            // Always restarted: with the same key and an empty state dir it recovers the
            // layout from the agents.
            eprintln!("the coordinator exited ({status}); restarting it");
            coordinator = spawn_coordinator(dir, &args)?;
        }
        for a in agents.iter_mut() {
            let Some(child) = a.child.as_mut() else { continue };
            if let Some(status) = child.try_wait()? {
                eprintln!("node {} exited ({status})", a.entry.index);
                a.child = None;
                if !args.no_restart {
                    eprintln!("restarting node {}", a.entry.index);
                    match spawn_agent(&a.entry, &a.dir, &args, &pool_id) {
                        Ok(c) => a.child = Some(c),
                        Err(e) => eprintln!("could not restart node {}: {e:#}", a.entry.index),
                    }
                }
            }
        }
    }
    eprintln!("stopping {} agents", agents.len());
    for a in agents.iter_mut() {
        if let Some(pid) = a.child.as_ref().and_then(Child::id) {
            // SIGTERM: each agent finishes its in-flight requests and flushes its store.
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
    for a in agents.iter_mut() {
        if let Some(child) = a.child.as_mut() {
            match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("node {} did not stop in {STOP_GRACE:?}; killing it", a.entry.index);
                    let _ = child.kill().await;
                }
            }
        }
    }
    writer.abort();
    stop_child(&mut coordinator, "the coordinator").await;
    eprintln!("farm stopped");
    Ok(())
}
