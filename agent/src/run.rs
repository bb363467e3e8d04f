//! Wiring: identity, store, gRPC and HTTP servers, scrub, signals.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use shardfarm_core::auth::Verifier;
use shardfarm_core::identity::Identity;
use shardfarm_proto::pb::agent_server::AgentServer;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::config::{AgentArgs, Config};
use crate::grpc::AgentService;
use crate::metrics::Metrics;
use crate::scrub::ScrubWorker;
use crate::shard::{Node, NodeSettings, Policy};
use crate::store::Store;

/// Most nonces the replay cache remembers (≈ 20 MB at ~200 bytes each).
const MAX_NONCES: usize = 100_000;
/// How long background workers get to stop after the servers have drained (Garage: 8 s).
const WORKER_EXIT_DEADLINE: Duration = Duration::from_secs(8);
/// Concurrent requests per connection (uploads, reads, listings): generous for a client that
/// pipelines every shard of several segments, small enough that one socket cannot pin the
/// node's memory and file descriptors.
const CONCURRENT_STREAMS: usize = 256;

/// Sets up logging: text or JSON, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = if json { b.json().try_init() } else { b.try_init() };
}

/// Loads the identity in `dir/identity.key`, or mines and saves one.
pub fn load_or_mine(dir: &Path, difficulty: u8) -> anyhow::Result<Identity> {
    let path = dir.join("identity.key");
    if path.exists() {
        let id = Identity::load(&path)?;
        tracing::info!(node = %id.id(), difficulty = id.difficulty(), "identity loaded");
        if id.difficulty() < u32::from(difficulty) {
            tracing::warn!(
                have = id.difficulty(),
                want = difficulty,
                "stored identity is mined below the configured difficulty; keeping it (delete {} to mine a new one)",
                path.display()
            );
        }
        return Ok(id);
    }
    tracing::info!(difficulty, "mining a node identity (expected {} hashes)", 1u64 << difficulty);
    let progress = |hashes: u64| tracing::info!(hashes, "mining…");
    let (id, report) = Identity::generate(difficulty, 0, &progress)?;
    tracing::info!(
        node = %id.id(),
        difficulty = id.difficulty(),
        seconds = format!("{:.2}", report.seconds),
        hash_rate = format!("{:.0}", report.hash_rate()),
        "identity mined"
    );
    id.save(&path)?;
    Ok(id)
}

/// Runs the agent until SIGTERM/SIGINT; a second signal aborts at once.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    init_tracing(cfg.json_logs);
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone());
    serve(cfg, stop).await
}

fn spawn_signal_handler(stop: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!(
            "shutting down: no new requests, finishing those in flight (signal again to abort)"
        );
        stop.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: aborting");
        std::process::exit(130);
    });
}

/// Runs the agent with `cfg` until `stop` is cancelled.
pub async fn serve(cfg: Config, stop: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let identity = {
        let (dir, d) = (cfg.data_dir.clone(), cfg.identity_difficulty);
        tokio::task::spawn_blocking(move || load_or_mine(&dir, d)).await??
    };
    let store = {
        let dir = cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&dir))
            .await?
            .with_context(|| format!("opening the store in {}", cfg.data_dir.display()))?
    };
    let metrics = Arc::new(Metrics::new());
    metrics.start_time.set(shardfarm_core::auth::now_ms() as f64 / 1000.0);
    let settings = NodeSettings {
        partitions: cfg.partitions,
        capacity: cfg.capacity,
        quota: cfg.quota,
        labels: cfg.labels.clone(),
        overhead: cfg.overhead,
        max_capacity_difficulty: cfg.max_capacity_difficulty,
        max_uploads: cfg.max_uploads,
        max_uploads_per_owner: cfg.max_uploads_per_identity,
        max_upload_bytes_per_owner: cfg.max_upload_bytes_per_identity,
        min_difficulty: cfg.pool_difficulty,
    };
    let node = Arc::new(Node::new(identity, Arc::new(store), settings, metrics.clone()));
    // Only requests addressed to this node: one captured on its way to another node cannot
    // be replayed here.
    // The pool key (the coordinator auditing and deleting) is known by id: a pool whose key
    // was mined below today's default still reaches its agents.
    let verifier = Verifier::new(cfg.pool_difficulty, cfg.timestamp_window, MAX_NONCES)
        .with_audience(node.identity.id());
    let verifier = Arc::new(match &cfg.coordinator {
        Some((_, pool)) => verifier.with_pinned(*pool),
        None => verifier,
    });
    let policy = Arc::new(Policy::new(cfg.allow.clone(), cfg.deny.clone(), cfg.rate_limit));
    let keeper = cfg.coordinator.as_ref().map(|(_, pool)| {
        Arc::new(crate::layouts::LayoutKeeper::open(&cfg.data_dir, *pool, metrics.clone()))
    });
    let mut service = AgentService::new(node.clone(), verifier, policy)
        .with_upload_idle(cfg.upload_idle_timeout)
        .with_min_upload_rate(cfg.min_upload_rate);
    if let Some(k) = &keeper {
        service = service.with_layouts(k.clone());
    }
    let service = AgentServer::new(service)
        .max_decoding_message_size(cfg.max_message)
        .max_encoding_message_size(cfg.max_message);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServer<AgentService>>().await;

    let grpc_listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding gRPC address {}", cfg.listen))?;
    let http_listener = tokio::net::TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("binding HTTP address {}", cfg.http_listen))?;
    let (grpc_addr, http_addr) = (grpc_listener.local_addr()?, http_listener.local_addr()?);
    let endpoints = serde_json::json!({
        "grpc": grpc_addr.to_string(),
        "http": http_addr.to_string(),
        "node_id": node.identity.id().to_hex(),
        "pid": std::process::id(),
    });
    let ep_path = cfg.data_dir.join("endpoints.json");
    let tmp = ep_path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&endpoints)?)?;
    std::fs::rename(&tmp, &ep_path)?;

    let ready = Arc::new(AtomicBool::new(false));
    let ops = crate::http::Ops { metrics: metrics.clone(), ready: ready.clone() };
    let http_stop = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(http_listener, crate::http::router(ops))
            .with_graceful_shutdown(async move { http_stop.cancelled().await })
            .await
    });
    let scrub = tokio::spawn(
        ScrubWorker::new(node.clone(), cfg.scrub_interval, cfg.scrub_rate, stop.clone()).run(),
    );
    let membership = cfg.coordinator.clone().map(|(coordinator, pool)| {
        let m = crate::repair::Membership {
            coordinator,
            pool,
            advertise_grpc: cfg.advertise.clone().unwrap_or_else(|| grpc_addr.to_string()),
            advertise_http: http_addr.to_string(),
            repair_rate: cfg.repair_rate,
            gc_grace: cfg.gc_grace,
            pass_interval: cfg.repair_interval,
            security: cfg.security,
            farm_key: cfg.farm_key.clone(),
        };
        let keeper = keeper.clone().expect("opened with a coordinator");
        node.set_slots(crate::shard::Slots::Waiting);
        tokio::spawn(crate::repair::run(node.clone(), m, keeper, stop.clone()))
    });

    // TLS proving this node's identity key, and learning each caller's (shardfarm_proto::tls).
    let conns = shardfarm_proto::conns::Connections::enforcing()
        .with_requests_per_root(cfg.requests_per_root);
    let incoming = shardfarm_proto::tls::incoming_tracked(
        grpc_listener,
        node.identity.signing_key(),
        cfg.security,
        conns.clone(),
    )
    .context("TLS configuration")?;
    tokio::spawn(crate::metrics::follow_connections(node.metrics.clone(), conns, stop.clone()));
    // Who is spending this node: the top owner roots, published once a minute.
    let (spending, stopped) = (node.clone(), stop.clone());
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stopped.cancelled() => return,
                _ = every.tick() => spending.metrics.publish_spending(spending.uploads_by_root()),
            }
        }
    });
    tracing::info!(grpc = %grpc_addr, http = %http_addr, node = %node.identity.id(), zone = ?cfg.labels.get("zone"), "agent serving");
    ready.store(true, Ordering::SeqCst);
    let grpc_stop = stop.clone();
    let ready_flag = ready.clone();
    Server::builder()
        // Signatures are checked over the first message's bytes as they arrived.
        .layer(shardfarm_proto::HashFirstMessage)
        // A peer that stops answering is dropped: pings every 30 s, 10 s to answer.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Streams per connection: one client cannot open unbounded uploads on one socket.
        .concurrency_limit_per_connection(CONCURRENT_STREAMS)
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(32 << 20)
        // 1 MiB HTTP/2 frames instead of 16 KiB: shard chunks are 1 MiB (LIMITS.md).
        .max_frame_size(1 << 20)
        .add_service(health_service)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            grpc_stop.cancelled().await;
            ready_flag.store(false, Ordering::SeqCst);
        })
        .await
        .context("gRPC server")?;

    stop.cancel();
    let _ = tokio::time::timeout(WORKER_EXIT_DEADLINE, scrub).await;
    if let Some(m) = membership {
        let _ = tokio::time::timeout(WORKER_EXIT_DEADLINE, m).await;
    }
    let _ = tokio::time::timeout(WORKER_EXIT_DEADLINE, http).await;
    let store = node.store.clone();
    tokio::task::spawn_blocking(move || store.flush()).await??;
    tracing::info!("agent stopped cleanly");
    Ok(())
}
