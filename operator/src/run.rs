//! The operator process: CRD check, leader election, the pool's coordinator (its state in the
//! API), the four controllers, the StorageNode views, health and `/metrics`, graceful
//! shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use shardfarm_core::identity::Identity;
use shardfarm_crds::{MiningFarm, NodeSyndication, ShardPlacement, StoragePool};
use tokio_util::sync::CancellationToken;

use crate::controller::{self, Context, ControllerMetrics, Error};
use crate::fabric::Coordinators;
use crate::health::{Health, Presence};
use shardfarm_coordinator::{Coordinator, PoolConfig};

/// Failed reconciles are retried after this long.
const RETRY: Duration = Duration::from_secs(15);
/// After SIGTERM or a lost Lease, work in flight gets this long before the process exits
/// anyway (agents' layout streams never end on their own); within the chart's 30 s grace.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

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

/// Runs the operator until SIGTERM/SIGINT or a lost Lease; releases the Lease on the way out.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone());
    let health = Arc::new(Health::default());
    health.phase("starting");
    let health_stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    let health_server =
        tokio::spawn(crate::health::serve(listener, health.clone(), health_stop.clone()));
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration: run inside a cluster or set KUBECONFIG")?;
    check_crds(&client, &args.namespace).await?;
    let leadership = (!args.lease.is_empty()).then(|| {
        // The pod's name (every container's pid may be 1): POD_NAME, else the hostname the
        // kubelet sets to it, else something unique.
        let holder =
            std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_else(|_| {
                let mut b = [0u8; 6];
                let _ = getrandom::fill(&mut b);
                format!("operator-{}", hex::encode(b))
            });
        crate::lease::Leadership::new(
            Api::namespaced(client.clone(), &args.namespace),
            &args.lease,
            &holder,
        )
    });
    let mut keeper = None;
    if let Some(l) = &leadership {
        health.phase(format!("standby: waiting for the Lease {}", args.lease));
        if !l.acquire(&stop).await {
            health_stop.cancel();
            return Ok(());
        }
        keeper = Some(l.keep(stop.clone()));
    }
    let result = lead(&args, client, &health, &stop).await;
    stop.cancel();
    if let Some(l) = &leadership {
        // No renewal may run after the release (it would take the Lease back).
        if let Some(k) = keeper {
            let _ = k.await;
        }
        l.release().await;
    }
    health_stop.cancel();
    let _ = health_server.await;
    tracing::info!("operator stopped");
    result
}

/// The leader's work: the pool's coordinator and the controllers, until `stop`.
async fn lead(
    args: &OperatorArgs,
    client: Client,
    health: &Health,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let stop = stop.clone();
    let ns = &args.namespace;
    let cfg = || watcher::Config::default().any_semantic();
    let pools = Arc::new(Coordinators::default());
    // Until its coordinator runs, the pool's view is incomplete, not empty: the farm
    // controller, which starts first, takes no decision that can lose redundancy from it.
    pools.expect(&args.pool);
    let metrics = Arc::new(ControllerMetrics::new(&health.controllers));
    let ctx = Arc::new(Context::new(client.clone(), pools.clone(), metrics));
    // Farms first: a farm's deletion must complete even when its pool is gone (an operator
    // restarted after the pool was deleted never gets past waiting for it).
    let farms = Controller::new(Api::<MiningFarm>::namespaced(client.clone(), ns), cfg())
        .owns(Api::<StatefulSet>::namespaced(client.clone(), ns), watcher::Config::default())
        .owns(
            Api::<k8s_openapi::api::apps::v1::DaemonSet>::namespaced(client.clone(), ns),
            watcher::Config::default(),
        )
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(controller::farm::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let farms = tokio::spawn(running(health, "the MiningFarm controller", farms));
    // The pool's coordinator.
    let pool_api: Api<StoragePool> = Api::namespaced(client.clone(), &args.namespace);
    let pool = loop {
        match pool_api.get_opt(&args.pool).await? {
            Some(p) => break p,
            None => {
                tracing::warn!(pool = %args.pool, "waiting for the StoragePool to be created");
                health.phase(format!("waiting for StoragePool {}", args.pool));
                tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, farms).await;
                        return Ok(());
                    }
                    _ = tokio::time::sleep(RETRY) => {}
                }
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
    // The coordinator's state lives in the API (any replica continues the pool); the ledger
    // file is restored from there first if this replica's volume is new.
    let store = crate::state_store::KubeStore::new(
        Api::namespaced(client.clone(), &args.namespace),
        &args.pool,
        args.state_dir.join("ledger.jsonl"),
        args.state_dir.join(shardfarm_coordinator::store_file()),
    )
    .stopping(stop.clone());
    store.restore_ledger().await.context("restoring the ledger from the API")?;
    let coordinator = Coordinator::open_with(
        config,
        Box::new(store),
        &args.state_dir.join("ledger.jsonl"),
        identity,
    )?;
    pools.insert(&args.pool, coordinator.clone());
    // Outsiders meet the syndications' rules from the first join on.
    let syndications =
        Api::<NodeSyndication>::namespaced(client.clone(), ns).list(&Default::default()).await?;
    coordinator.set_admission(controller::syndication::admission_of(
        &syndications.items,
        &args.pool,
        pool.spec.failure_domain.label(),
    ));
    let listener = tokio::net::TcpListener::bind(args.coordinator_listen).await?;
    let grpc = tokio::spawn(running(
        health,
        &format!("pool {}'s coordinator (gRPC server)", args.pool),
        shardfarm_coordinator::service::serve(listener, coordinator.clone(), stop.clone()),
    ));
    let housekeeping = tokio::spawn(running(
        health,
        &format!("pool {}'s coordinator (housekeeping)", args.pool),
        coordinator.clone().run(stop.clone()),
    ));
    let _ = health.coordinator.set(coordinator.clone());

    ensure_coordinator_service(&Api::namespaced(client.clone(), &args.namespace)).await?;
    let pools_c = Controller::new(Api::<StoragePool>::namespaced(client.clone(), ns), cfg())
        .owns(Api::<ShardPlacement>::namespaced(client.clone(), ns), watcher::Config::default())
        // A farm applied, scaled or deleted changes what its pool can hold: at once, not at
        // the next refresh.
        .watches(
            Api::<MiningFarm>::namespaced(client.clone(), ns),
            watcher::Config::default(),
            |farm| {
                use kube::ResourceExt as _;
                let ns = farm.namespace()?;
                farm.spec.pool_ref.name.clone().map(|n| ObjectRef::new(&n).within(&ns))
            },
        );
    // Readiness follows the pool through this controller's cache: deleted, gone or replaced
    // by another object of its name, the pool this coordinator serves is no more.
    health.host(&args.pool);
    health.pools_from(presence(pools_c.store(), ns, pool.metadata.uid.clone()));
    let pools_c = pools_c
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(controller::pool::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let pools_c = running(health, "the StoragePool controller", pools_c);
    let syndications =
        Controller::new(Api::<NodeSyndication>::namespaced(client.clone(), ns), cfg())
            .graceful_shutdown_on(stop.clone().cancelled_owned())
            .run(controller::syndication::reconcile, error_policy, ctx.clone())
            .for_each(|_| futures::future::ready(()));
    let syndications = running(health, "the NodeSyndication controller", syndications);
    let placements = Controller::new(Api::<ShardPlacement>::namespaced(client.clone(), ns), cfg())
        // Only the layout mirrors: the state and ledger ConfigMaps are large and rewritten
        // often, and are not this controller's business.
        .owns(
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            watcher::Config::default().labels(controller::placement::LAYOUT_LABEL),
        )
        .graceful_shutdown_on(stop.clone().cancelled_owned())
        .run(controller::placement::reconcile, error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let placements = running(health, "the ShardPlacement controller", placements);
    // The members as StorageNode objects, for `kubectl get sfnode`.
    let mut views = crate::nodes::NodeViews::new(
        Api::namespaced(client.clone(), ns),
        &args.pool,
        pool.controller_owner_ref(&()),
    );
    let (views_fabric, views_stop) = (ctx.fabric.clone(), stop.clone());
    let node_views = tokio::spawn(async move {
        loop {
            if let Err(e) = views.pass(views_fabric.as_ref()).await {
                tracing::warn!(error = %e, "could not write the StorageNode objects; retrying");
            }
            tokio::select! {
                _ = views_stop.cancelled() => break,
                _ = tokio::time::sleep(crate::nodes::EVERY) => {}
            }
        }
    });
    tracing::info!(namespace = %ns, pool = %args.pool, "operator running");
    health.phase("");
    let controllers = tokio::spawn(async move {
        tokio::join!(pools_c, syndications, placements);
    });
    stop.cancelled().await;
    health.phase("stopping");
    // Reconciles in flight finish and the coordinator writes its state (before the Lease is
    // released: the next leader reads it); the gRPC server is not waited for (agents' layout
    // streams never end on their own) and goes with the process.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = housekeeping.await;
        let _ = farms.await;
        let _ = controllers.await;
        let _ = node_views.await;
    })
    .await;
    drop(grpc);
    if drained.is_err() {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "work still in flight after the grace period; exiting anyway");
    }
    Ok(())
}

/// `work`, counted by readiness as the component `name` for as long as it runs.
fn running<F: std::future::Future>(
    health: &Health,
    name: &str,
    work: F,
) -> impl std::future::Future<Output = F::Output> + use<F> {
    let up = health.component(name);
    async move {
        let _up = up;
        work.await
    }
}

/// Whether a pool of namespace `ns` is there, as `cache` (the StoragePool controller's) sees
/// it: the one whose coordinator was started, with uid `uid` — another object under its name
/// is not the pool this coordinator serves.
fn presence(
    cache: kube::runtime::reflector::Store<StoragePool>,
    ns: &str,
    uid: Option<String>,
) -> crate::health::PresenceOf {
    let synced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (waiting, flag) = (cache.clone(), synced.clone());
    tokio::spawn(async move {
        if waiting.wait_until_ready().await.is_ok() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let ns = ns.to_string();
    Box::new(move |name| {
        if !synced.load(std::sync::atomic::Ordering::SeqCst) {
            return Presence::Unknown;
        }
        match cache.get(&ObjectRef::new(name).within(&ns)) {
            Some(p) if p.metadata.uid != uid => Presence::Gone,
            Some(p) if p.metadata.deletion_timestamp.is_some() => Presence::Deleting,
            Some(_) => Presence::Present,
            None => Presence::Gone,
        }
    })
}

/// Creates the `shardfarm-coordinator` Service that farms' agents dial, if nothing created it
/// (the chart does, with its own type and annotations; the operator never overwrites it). It
/// selects the pods labelled `shardfarm.io/coordinator=true`, of which only the leader is
/// ready.
pub async fn ensure_coordinator_service(
    api: &Api<k8s_openapi::api::core::v1::Service>,
) -> anyhow::Result<()> {
    use crate::controller::farm::{COORDINATOR_PORT, COORDINATOR_SERVICE};
    if api.get_opt(COORDINATOR_SERVICE).await?.is_some() {
        return Ok(());
    }
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": COORDINATOR_SERVICE,
            "labels": { "app.kubernetes.io/managed-by": crate::controller::MANAGER },
        },
        "spec": {
            "selector": { "shardfarm.io/coordinator": "true" },
            "ports": [
                { "name": "grpc", "port": COORDINATOR_PORT, "targetPort": COORDINATOR_PORT },
                { "name": "metrics", "port": 9090, "targetPort": 9090 },
            ],
        },
    }))?;
    match api.create(&kube::api::PostParams::default(), &svc).await {
        Ok(_) => tracing::info!(service = COORDINATOR_SERVICE, "created the coordinator Service"),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
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
    Api::<K>::namespaced(client.clone(), ns)
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|e| anyhow::anyhow!(crd_hint(&plural, ns, &e)))?;
    Ok(())
}

/// What to do when listing `plural` in `ns` failed with `e`: every command the hint names
/// carries the namespace (the operator's chart is installed into one; a command without `-n`
/// targets the kubeconfig's default namespace instead).
fn crd_hint(plural: &str, ns: &str, e: &kube::Error) -> String {
    let install = format!(
        "install the CRDs with `kubectl apply --server-side -f crds/`, or the operator with \
         `helm install shardfarm charts/shardfarm -n {ns} --create-namespace` (its chart \
         brings them)"
    );
    match e {
        kube::Error::Api(s) if s.is_not_found() => {
            format!("the CRD {plural}.shardfarm.io is not installed ({e}): {install}")
        }
        kube::Error::Api(s) if s.is_forbidden() => format!(
            "this operator may not list {plural}.shardfarm.io in namespace {ns} ({e}): its Role \
             comes with the chart (`helm upgrade --install shardfarm charts/shardfarm -n {ns}`); \
             check with `kubectl auth can-i list {plural}.shardfarm.io -n {ns} \
             --as=system:serviceaccount:{ns}:<its service account>`"
        ),
        _ => format!(
            "the CRD {plural}.shardfarm.io is not installed or not readable in namespace {ns} \
             ({e}): {install}"
        ),
    }
}

/// Exits with an install hint when a CRD is missing.
async fn check_crds(client: &Client, ns: &str) -> anyhow::Result<()> {
    check_one::<StoragePool>(client, ns).await?;
    check_one::<MiningFarm>(client, ns).await?;
    check_one::<NodeSyndication>(client, ns).await?;
    check_one::<ShardPlacement>(client, ns).await?;
    check_one::<shardfarm_crds::StorageNode>(client, ns).await?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{NS, expect, serve};
    use http::Method;
    use tower_test::mock;

    #[tokio::test]
    async fn the_coordinator_service_is_created_only_when_missing() {
        let (svc, handle) = mock::pair();
        let api = Api::namespaced(Client::new(svc, NS), NS);
        let path = format!("/api/v1/namespaces/{NS}/services/shardfarm-coordinator");
        let server = serve(
            handle,
            vec![
                expect(Method::GET, path.clone()).not_found(),
                expect(Method::POST, format!("/api/v1/namespaces/{NS}/services")).body(|b| {
                    assert_eq!(b["spec"]["selector"]["shardfarm.io/coordinator"], "true");
                    assert_eq!(b["spec"]["ports"][0]["port"], 7398);
                }),
                // The chart's (or an earlier one's) exists: left alone.
                expect(Method::GET, path).reply(serde_json::json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": { "name": "shardfarm-coordinator", "namespace": NS },
                })),
            ],
        );
        ensure_coordinator_service(&api).await.unwrap();
        ensure_coordinator_service(&api).await.unwrap();
        server.await.unwrap();
    }

    /// Every command the missing-CRD hint names targets the operator's namespace (a hint
    /// without `-n` installs into the kubeconfig's default namespace instead).
    #[tokio::test]
    async fn the_missing_crd_hint_names_the_namespace() {
        let list = format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/storagepools");
        for (answer, must) in [
            (expect(Method::GET, list.clone()).not_found(), "--create-namespace"),
            (expect(Method::GET, list.clone()).forbidden("storagepools is forbidden"), "can-i"),
        ] {
            let (svc, handle) = mock::pair();
            let client = Client::new(svc, NS);
            let server = serve(handle, vec![answer]);
            let e = check_crds(&client, NS).await.unwrap_err().to_string();
            server.await.unwrap();
            assert!(e.contains(must), "{e}");
            // Every `helm` and `kubectl` command of the hint carries `-n farms`.
            for command in e.split('`').skip(1).step_by(2) {
                if command.starts_with("helm install")
                    || command.starts_with("helm upgrade")
                    || command.starts_with("kubectl auth")
                {
                    assert!(command.contains(&format!(" -n {NS}")), "{command} in {e}");
                }
            }
            assert!(e.contains(&format!("-n {NS}")), "{e}");
        }
    }
}
