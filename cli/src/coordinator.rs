//! `shardfarm coordinator`: a pool's coordinator as its own process, for a farm run without
//! Kubernetes (`local up` supervises one; a bare-metal pool runs one under systemd).
//!
//! Its state directory may be lost: started again with the same pool key and an empty state
//! directory, it recovers the newest layout its agents present, signed by that key.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use shardfarm_coordinator::{Coordinator, PoolConfig};
use shardfarm_core::identity::Identity;
use tokio_util::sync::CancellationToken;

/// Options of `shardfarm coordinator`.
#[derive(clap::Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Directory of the coordinator's state (members, layouts, ledger).
    #[arg(long, env = "SHARDFARM_STATE_DIR")]
    pub state_dir: PathBuf,
    /// The pool key (an identity file). Created, mined at the pool's difficulty, if absent.
    /// Its id is the pool id every agent and client pins: keep it, and back it up.
    #[arg(long, env = "SHARDFARM_POOL_KEY")]
    pub key: PathBuf,
    /// The pool's settings, a JSON object (`{"pool": "home", "k": 4, "m": 2, "partitions":
    /// 256, "segmentSize": 67108864, "minDifficulty": 28, "failureDomain": "zone",
    /// "heartbeatMs": 5000, "graceMs": 60000, …}`); fields left out take those defaults.
    #[arg(long, env = "SHARDFARM_POOL_CONFIG")]
    pub pool_config: Option<PathBuf>,
    /// gRPC address agents and clients reach the coordinator on.
    #[arg(long, env = "SHARDFARM_LISTEN", default_value = "127.0.0.1:7398")]
    pub listen: SocketAddr,
    /// `/metrics` and `/healthz` address.
    #[arg(long, env = "SHARDFARM_METRICS_LISTEN", default_value = "127.0.0.1:7399")]
    pub metrics_listen: SocketAddr,
    /// DEBUGGING ONLY: serve plaintext HTTP/2 instead of TLS (agents must agree).
    #[arg(long, env = "SHARDFARM_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
}

/// Runs the coordinator until SIGTERM/SIGINT.
pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut config = match &args.pool_config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str::<PoolConfig>(&text)
                .with_context(|| format!("{}: not a pool configuration", p.display()))?
        }
        None => PoolConfig::default(),
    };
    config.security = shardfarm_proto::Security::from_flag(args.insecure_plaintext);
    let key = if args.key.exists() {
        Identity::load(&args.key)?
    } else {
        let (id, _) = Identity::generate(config.min_difficulty, 0, &|_| {})?;
        id.save(&args.key)?;
        id
    };
    let pool_id = key.id();
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let coordinator = Coordinator::open(config, &args.state_dir, key)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding the coordinator's address {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding the metrics address {}", args.metrics_listen))?;
    tracing::info!(
        pool_id = %pool_id, grpc = %args.listen, metrics = %args.metrics_listen,
        state = %args.state_dir.display(), "coordinator serving"
    );
    let stop = CancellationToken::new();
    let server = tokio::spawn(shardfarm_coordinator::service::serve(
        listener,
        coordinator.clone(),
        stop.clone(),
    ));
    let http = tokio::spawn(shardfarm_coordinator::serve_metrics(
        metrics,
        coordinator.clone(),
        stop.clone(),
    ));
    let housekeeping = tokio::spawn(coordinator.clone().run(stop.clone()));

    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
    stop.cancel();
    let served = server.await?;
    let _ = http.await;
    let _ = housekeeping.await;
    served.map_err(|e| anyhow::anyhow!("gRPC server: {e}"))
}
