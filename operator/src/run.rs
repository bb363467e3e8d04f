//! The operator process: CRD check, leader election, the pool's coordinator, the four
//! controllers, `/metrics`, graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use shardfarm_core::identity::Identity;
use shardfarm_crds::{MiningFarm, NodeSyndication, ShardPlacement, StoragePool};
use tokio_util::sync::CancellationToken;

use crate::controller::{self, Context, ControllerMetrics, Error};
use crate::fabric::Coordinators;
use shardfarm_coordinator::{Coordinator, PoolConfig};

/// How long a leader's lease lasts without renewal.
const LEASE_SECONDS: i32 = 15;
/// Failed reconciles are retried after this long.
const RETRY: Duration = Duration::from_secs(15);

/// Options of `shardfarm operator`.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Namespace of the pool and its farms.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The StoragePool whose coordinator this operator runs.
    #[arg(long, env = "SHARDFARM_POOL", default_value = "main")]
    pub pool: String,
    /// Coordinator state (identity, members, ledger): a persistent volume.
    #[arg(long, env = "SHARDFARM_STATE_DIR", default_value = "/var/lib/shardfarm")]
    pub state_dir: PathBuf,
    /// Coordinator gRPC address.
    #[arg(long, default_value = "0.0.0.0:7398")]
    pub coordinator_listen: SocketAddr,
    /// `/metrics` and `/healthz` address.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,
    /// Lease used for leader election (empty: no election, for a single replica).
    #[arg(long, default_value = "shardfarm-operator")]
    pub lease: String,
}

/// Runs the operator until SIGTERM/SIGINT.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration: run inside a cluster or set KUBECONFIG")?;
    check_crds(&client, &args.namespace).await?;
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone());
    if !args.lease.is_empty() {
        let holder = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("operator-{}", std::process::id()));
        lead(client.clone(), &args.namespace, &args.lease, &holder, stop.clone()).await?;
    }

    // The pool's coordinator.
    let pools = Arc::new(Coordinators::default());
    let pool_api: Api<StoragePool> = Api::namespaced(client.clone(), &args.namespace);
    let pool = loop {
        match pool_api.get_opt(&args.pool).await? {
            Some(p) => break p,
            None => {
                tracing::warn!(pool = %args.pool, "waiting for the StoragePool to be created");
                tokio::select! { _ = stop.cancelled() => return Ok(()), _ = tokio::time::sleep(RETRY) => {} }
            }
        }
    };
    let s = &pool.spec;
    let config = PoolConfig {
        pool: args.pool.clone(),
        k: s.erasure.data_shards,
        m: s.erasure.parity_shards,
        partitions: s.partitions,
        segment_size: s.segment_size,
        min_difficulty: s.admission.min_identity_difficulty,
        failure_domain: s.failure_domain.label().into(),
        audit_interval_ms: s.audit_interval_seconds * 1000,
        rewards: shardfarm_coordinator::economics::RewardConfig {
            epoch_seconds: s.rewards.epoch_seconds,
            pool_reward: s.rewards.pool_reward,
            pma: s.rewards.pma,
            pmb: s.rewards.pmb,
        },
        ..PoolConfig::default()
    };
    std::fs::create_dir_all(&args.state_dir)?;
    // The pool key lives in a Secret created once (from the key an earlier operator kept in
    // its volume, if any) and never overwritten.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &args.namespace);
    let legacy = args.state_dir.join("coordinator.key");
    let difficulty = config.min_difficulty;
    let identity = crate::pool_key::get_or_create(&secrets, &args.pool, &legacy, || {
        Ok(Identity::generate(difficulty, 0, &|_| {})?.0)
    })
    .await
    .context("the pool key")?;
    let coordinator = Coordinator::open(config, &args.state_dir, identity)?;
    pools.insert(&args.pool, coordinator.clone());
    let listener = tokio::net::TcpListener::bind(args.coordinator_listen).await?;
    let grpc = tokio::spawn(shardfarm_coordinator::service::serve(
        listener,
        coordinator.clone(),
        stop.clone(),
    ));
    let housekeeping = tokio::spawn(coordinator.clone().run(stop.clone()));
    let metrics = Arc::new(ControllerMetrics::new(&coordinator.metrics.registry));
    tokio::spawn(shardfarm_coordinator::serve_metrics(
        tokio::net::TcpListener::bind(args.metrics_listen).await?,
        coordinator.clone(),
        stop.clone(),
    ));

    let ctx = Arc::new(Context::new(client.clone(), pools, metrics));
    let ns = &args.namespace;
    let cfg = || watcher::Config::default().any_semantic();
    let farms = Controller::new(Api::<MiningFarm>::namespaced(client.clone(), ns), cfg())
        .owns(Api::<StatefulSet>::namespaced(client.clone(), ns), watcher::Config::default())
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(controller::farm::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let pools_c = Controller::new(Api::<StoragePool>::namespaced(client.clone(), ns), cfg())
        .owns(Api::<ShardPlacement>::namespaced(client.clone(), ns), watcher::Config::default())
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(controller::pool::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let syndications =
        Controller::new(Api::<NodeSyndication>::namespaced(client.clone(), ns), cfg())
            .graceful_shutdown_on(stop.clone().cancelled_owned())
            .run(controller::syndication::reconcile, error_policy, ctx.clone())
            .for_each(|_| futures::future::ready(()));
    let placements = Controller::new(Api::<ShardPlacement>::namespaced(client.clone(), ns), cfg())
        .owns(Api::<ConfigMap>::namespaced(client.clone(), ns), watcher::Config::default())
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(controller::placement::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    tracing::info!(namespace = %ns, pool = %args.pool, "operator running");
    tokio::join!(farms, pools_c, syndications, placements);
    stop.cancel();
    let _ = grpc.await;
    let _ = housekeeping.await;
    tracing::info!("operator stopped");
    Ok(())
}

fn error_policy<K>(_obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %err, label = err.metric_label(), "reconcile failed; retrying");
    Action::requeue(RETRY)
}

async fn check_one<K>(client: &Client, ns: &str) -> anyhow::Result<()>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let plural = K::plural(&());
    Api::<K>::namespaced(client.clone(), ns).list(&ListParams::default().limit(1)).await.map_err(|e| {
        anyhow::anyhow!(
            "the CRD {plural}.shardfarm.io is not installed or not readable ({e}): install it with \
             `kubectl apply -f crds/` or `helm install shardfarm charts/shardfarm`"
        )
    })?;
    Ok(())
}

/// Exits with an install hint when a CRD is missing.
async fn check_crds(client: &Client, ns: &str) -> anyhow::Result<()> {
    check_one::<StoragePool>(client, ns).await?;
    check_one::<MiningFarm>(client, ns).await?;
    check_one::<NodeSyndication>(client, ns).await?;
    check_one::<ShardPlacement>(client, ns).await?;
    Ok(())
}

/// Becomes the leader (holder of the Lease) and keeps renewing it; losing it stops the
/// process, so two operators never reconcile at once.
async fn lead(
    client: Client,
    ns: &str,
    name: &str,
    holder: &str,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let api: Api<Lease> = Api::namespaced(client, ns);
    loop {
        if try_acquire(&api, name, holder).await? {
            break;
        }
        tracing::info!(lease = name, "another operator leads; waiting");
        tokio::select! { _ = stop.cancelled() => return Ok(()), _ = tokio::time::sleep(Duration::from_secs(5)) => {} }
    }
    tracing::info!(lease = name, holder, "leading");
    let (api, name, holder) = (api.clone(), name.to_string(), holder.to_string());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(LEASE_SECONDS as u64 / 3)) => {}
            }
            match try_acquire(&api, &name, &holder).await {
                Ok(true) => {}
                _ => {
                    tracing::error!("lost the leader lease; stopping");
                    stop.cancel();
                    return;
                }
            }
        }
    });
    Ok(())
}

/// Takes or renews the lease if it is free, expired or ours (optimistic concurrency: a replace
/// with the resourceVersion read fails if someone else wrote in between).
async fn try_acquire(api: &Api<Lease>, name: &str, holder: &str) -> anyhow::Result<bool> {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let now = k8s_openapi::jiff::Timestamp::now();
    let spec = |transitions: i32| LeaseSpec {
        holder_identity: Some(holder.into()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    match api.get_opt(name).await? {
        None => {
            let mut lease = Lease::default();
            lease.metadata.name = Some(name.into());
            lease.spec = Some(spec(0));
            Ok(api.create(&PostParams::default(), &lease).await.is_ok())
        }
        Some(mut lease) => {
            let cur = lease.spec.clone().unwrap_or_default();
            let ours = cur.holder_identity.as_deref() == Some(holder);
            let expired = cur.renew_time.as_ref().is_none_or(|t| {
                let age = now.duration_since(t.0).as_secs();
                age > i64::from(cur.lease_duration_seconds.unwrap_or(LEASE_SECONDS))
            });
            if !ours && !expired {
                return Ok(false);
            }
            let transitions = cur.lease_transitions.unwrap_or(0) + i32::from(!ours);
            lease.spec = Some(spec(transitions));
            Ok(api.replace(name, &PostParams::default(), &lease).await.is_ok())
        }
    }
}

fn spawn_signal_handler(stop: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("shutting down: finishing reconciles in flight (signal again to abort)");
        stop.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        std::process::exit(130);
    });
}
