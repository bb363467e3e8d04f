//! MiningFarm → a StatefulSet of agents, its headless Service and PodDisruptionBudget.
//!
//! Scaling down never removes an agent that still holds data: the highest ordinal is drained
//! first (the pool hands its slots away and rebuilds them elsewhere), the StatefulSet keeps its
//! size with `status.draining` set and a `Progressing` condition, and only when the node holds
//! no slot and the layout is in sync does the StatefulSet shrink — one agent per step.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use shardfarm_crds::{MiningFarm, MiningFarmStatus};

use super::{Context, Error, FARM_FINALIZER, MANAGER, Result, condition, counted};
use shardfarm_coordinator::Member;

/// Port of the agents' gRPC service.
pub const AGENT_GRPC_PORT: u16 = 7400;
/// Port of the agents' /metrics.
pub const AGENT_HTTP_PORT: u16 = 7401;
/// The in-cluster coordinator Service (created by the chart) and its port.
pub const COORDINATOR_SERVICE: &str = "shardfarm-coordinator";
/// Coordinator gRPC port.
pub const COORDINATOR_PORT: u16 = 7398;
/// Requeue while draining: drains are watched, not waited on.
const DRAIN_POLL: Duration = Duration::from_secs(10);
/// Requeue otherwise, to refresh status from the coordinator.
const REFRESH: Duration = Duration::from_secs(60);

/// The pool key a farm's reference names (a local StoragePool, or `remote:<endpoint>`).
pub fn pool_key(farm: &MiningFarm) -> String {
    match (&farm.spec.pool_ref.name, &farm.spec.pool_ref.coordinator_endpoint) {
        (Some(name), _) => name.clone(),
        (None, Some(ep)) => format!("remote:{ep}"),
        (None, None) => String::new(),
    }
}

fn coordinator_endpoint(farm: &MiningFarm, ns: &str) -> String {
    farm.spec
        .pool_ref
        .coordinator_endpoint
        .clone()
        .unwrap_or_else(|| format!("{COORDINATOR_SERVICE}.{ns}.svc:{COORDINATOR_PORT}"))
}

/// The members of the pool that belong to this farm.
pub fn farm_members(ctx: &Context, farm: &MiningFarm) -> Vec<Member> {
    let name = farm.name_any();
    ctx.fabric
        .members(&pool_key(farm))
        .into_iter()
        .filter(|m| m.labels.get("farm") == Some(&name))
        .collect()
}

/// Reconciles one MiningFarm (with its finalizer).
pub async fn reconcile(farm: Arc<MiningFarm>, ctx: Arc<Context>) -> Result<Action> {
    let ns = farm.namespace().ok_or_else(|| Error::Invalid("MiningFarm is namespaced".into()))?;
    let api: Api<MiningFarm> = Api::namespaced(ctx.client.clone(), &ns);
    let r = finalizer(&api, FARM_FINALIZER, farm, |ev| async {
        match ev {
            Finalizer::Apply(f) => apply(f, ctx.clone()).await,
            Finalizer::Cleanup(f) => cleanup(f, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    counted(&ctx, "MiningFarm", r)
}

fn labels(name: &str) -> serde_json::Value {
    json!({
        "app.kubernetes.io/name": "shardfarm-agent",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGER,
        "shardfarm.io/farm": name,
    })
}

/// The id of the pool key the farm's agents pin: the remote pool's `poolId`, or the key of the
/// local pool's coordinator once it runs.
pub fn pool_id(ctx: &Context, farm: &MiningFarm) -> Option<String> {
    match &farm.spec.pool_ref.pool_id {
        Some(id) => Some(id.clone()),
        None => ctx.fabric.pool_id(&pool_key(farm)).map(|id| id.to_hex()),
    }
}

/// Whether the farm's agents join a pool of this cluster (whose coordinator knows the farm's
/// key), rather than a remote pool to which they are outsiders.
fn local_pool(farm: &MiningFarm) -> bool {
    farm.spec.pool_ref.pool_id.is_none() && farm.spec.pool_ref.name.is_some()
}

/// The labels a farm assigns its agents: the coordinator overrides whatever they claim.
pub fn assigned_labels(farm: &MiningFarm) -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([
        ("farm".to_string(), farm.name_any()),
        ("zone".to_string(), farm.spec.zone.clone()),
    ])
}

/// The StatefulSet of a farm with `replicas` agents pinned to the pool key `pool_id`.
pub fn statefulset(farm: &MiningFarm, ns: &str, replicas: i32, pool_id: &str) -> serde_json::Value {
    let name = farm.name_any();
    let spec = &farm.spec;
    let selector = json!({ "app.kubernetes.io/instance": name, "shardfarm.io/farm": name });
    let mut args = vec![
        "agent".to_string(),
        "--data-dir=/data".into(),
        format!("--listen=0.0.0.0:{AGENT_GRPC_PORT}"),
        format!("--http-listen=0.0.0.0:{AGENT_HTTP_PORT}"),
        format!("--zone={}", spec.zone),
        format!("--coordinator={}", coordinator_endpoint(farm, ns)),
        format!("--pool-id={pool_id}"),
        format!("--advertise=$(POD_NAME).{name}-agents.{ns}.svc:{AGENT_GRPC_PORT}"),
        format!("--label=farm={name}"),
        "--label=pod=$(POD_NAME)".into(),
        "--log-format=json".into(),
    ];
    if let Some(c) = spec.agent.capacity.as_ref().or(spec.agent.storage.size.as_ref()) {
        args.push(format!(
            "--capacity={}",
            c.replace("Gi", "GiB").replace("Ti", "TiB").replace("Mi", "MiB")
        ));
    }
    let mut env = vec![
        json!({ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }),
    ];
    if local_pool(farm) {
        // The farm key vouches for the agents as the owner's own (their labels are trusted).
        // An environment variable, not a file: a Secret volume under an fsGroup is
        // group-readable, and the agent refuses key files others can read.
        env.push(json!({
            "name": "SHARDFARM_FARM_KEY_TEXT",
            "valueFrom": { "secretKeyRef": {
                "name": crate::pool_key::farm_secret_name(&name),
                "key": crate::pool_key::DATA_KEY,
            } },
        }));
    }
    let mut pod = json!({
        "containers": [{
            "name": "agent",
            "image": spec.agent.image,
            "args": args,
            "env": env,
            "ports": [
                { "name": "grpc", "containerPort": AGENT_GRPC_PORT },
                { "name": "http", "containerPort": AGENT_HTTP_PORT },
            ],
            "readinessProbe": { "httpGet": { "path": "/readyz", "port": "http" } },
            "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http" }, "periodSeconds": 20 },
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
            "resources": spec.agent.resources.clone().unwrap_or_default(),
        }],
        // The agent drains in-flight requests and flushes its store on SIGTERM.
        "terminationGracePeriodSeconds": 30,
        "nodeSelector": spec.node_selector,
        "tolerations": spec.tolerations,
    });
    let mut sts_spec = json!({
        "replicas": replicas,
        "serviceName": format!("{name}-agents"),
        "podManagementPolicy": "Parallel",
        "selector": { "matchLabels": selector },
        "template": { "metadata": { "labels": labels(&name) }, "spec": pod.clone() },
    });
    match (&spec.agent.storage.host_path, &spec.agent.storage.size) {
        (Some(path), _) => {
            pod["volumes"] = json!([{ "name": "data", "hostPath": { "path": path, "type": "DirectoryOrCreate" } }]);
            // One directory per agent under the host path.
            pod["containers"][0]["volumeMounts"][0]["subPathExpr"] = json!("$(POD_NAME)");
            sts_spec["template"]["spec"] = pod;
        }
        (None, size) => {
            let mut claim = json!({
                "metadata": { "name": "data" },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": { "requests": { "storage": size.clone().unwrap_or_else(|| "10Gi".into()) } },
                },
            });
            if let Some(class) = &spec.agent.storage.storage_class_name {
                claim["spec"]["storageClassName"] = json!(class);
            }
            sts_spec["volumeClaimTemplates"] = json!([claim]);
        }
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels(&name),
            "ownerReferences": [farm.controller_owner_ref(&()).expect("farm has a uid")],
        },
        "spec": sts_spec,
    })
}

async fn apply(farm: Arc<MiningFarm>, ctx: Arc<Context>) -> Result<Action> {
    let name = farm.name_any();
    let ns = farm.namespace().unwrap_or_default();
    let pool = pool_key(&farm);
    let Some(pool_id) = pool_id(&ctx, &farm) else {
        // The agents must pin the pool key; the local pool's coordinator has not started.
        tracing::info!(farm = %name, pool = %pool, "waiting for the pool's coordinator");
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let pp = PatchParams::apply(MANAGER).force();
    let owner = farm.controller_owner_ref(&()).expect("farm has a uid");
    if local_pool(&farm) {
        let secrets = Api::namespaced(ctx.client.clone(), &ns);
        let key = crate::pool_key::farm_key(&secrets, &name, owner.clone())
            .await
            .map_err(|e| Error::Invalid(format!("farm key: {e:#}")))?;
        ctx.fabric.set_farm(&pool, key.id(), assigned_labels(&farm));
    }
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = sts_api.get_opt(&name).await?;
    let current = existing.as_ref().and_then(|s| s.spec.as_ref()?.replicas).unwrap_or(0);

    let svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": format!("{name}-agents"), "namespace": ns, "labels": labels(&name), "ownerReferences": [owner] },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": true,
            "selector": { "app.kubernetes.io/instance": name, "shardfarm.io/farm": name },
            "ports": [
                { "name": "grpc", "port": AGENT_GRPC_PORT },
                { "name": "http", "port": AGENT_HTTP_PORT },
            ],
        },
    });
    let svc_name = format!("{name}-agents");
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&svc_name, &pp, &Patch::Apply(svc))
        .await?;
    // Voluntary evictions take one agent at a time: repair of one node's slots at a time.
    let pdb = json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": { "name": name, "namespace": ns, "labels": labels(&name), "ownerReferences": [owner] },
        "spec": {
            "maxUnavailable": 1,
            "selector": { "matchLabels": { "app.kubernetes.io/instance": name, "shardfarm.io/farm": name } },
        },
    });
    Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &pp, &Patch::Apply(pdb))
        .await?;

    // Scale: up at once, down one drained agent at a time.
    let desired = farm.spec.replicas;
    let members = farm_members(&ctx, &farm);
    let (replicas, draining) = if desired >= current {
        (desired, None)
    } else {
        let ord = current - 1;
        let pod = format!("{name}-{ord}");
        let node = members.iter().find(|m| m.labels.get("pod") == Some(&pod));
        let layout = ctx.fabric.layout(&pool);
        let holds = |m: &Member| layout.as_ref().is_some_and(|l| !l.slots_of(&m.id).is_empty());
        match node {
            Some(m) if holds(m) || !ctx.fabric.in_sync(&pool) => {
                if farm.status.as_ref().and_then(|s| s.draining) != Some(ord) {
                    ctx.fabric.drain(&pool, m.id);
                    ctx.event(
                        &*farm,
                        false,
                        "Draining",
                        format!("draining {pod} before scaling down to {desired}"),
                    )
                    .await?;
                }
                (current, Some(ord))
            }
            _ => (current - 1, None),
        }
    };
    sts_api.patch(&name, &pp, &Patch::Apply(statefulset(&farm, &ns, replicas, &pool_id))).await?;

    let ready = existing.as_ref().and_then(|s| s.status.as_ref()?.ready_replicas).unwrap_or(0);
    let previous = farm.status.clone().unwrap_or_default();
    let generation = farm.metadata.generation;
    let passed: u64 = members.iter().map(|m| m.audits_passed).sum();
    let audited: u64 = passed + members.iter().map(|m| m.audits_failed).sum::<u64>();
    let status = MiningFarmStatus {
        replicas,
        ready_replicas: ready,
        selector: Some(format!("app.kubernetes.io/instance={name},shardfarm.io/farm={name}")),
        capacity: Some(shardfarm_core::human_bytes(members.iter().map(|m| m.offered_bytes).sum())),
        used: Some(shardfarm_core::human_bytes(members.iter().map(|m| m.used_bytes).sum())),
        audit_pass_rate: (audited > 0).then(|| passed as f64 / audited as f64),
        earnings: members.iter().map(|m| ctx.fabric.earnings(&pool, &m.id)).sum(),
        draining,
        conditions: vec![
            condition(
                &previous.conditions,
                "Ready",
                ready >= desired,
                if ready >= desired { "AgentsReady" } else { "AgentsStarting" },
                format!("{ready} of {desired} agents ready"),
                generation,
            ),
            condition(
                &previous.conditions,
                "Progressing",
                draining.is_some() || replicas != desired,
                if draining.is_some() { "Draining" } else { "Scaling" },
                match draining {
                    Some(o) => {
                        format!("draining {name}-{o}: its slots are being rebuilt elsewhere")
                    }
                    None => format!("{replicas} agents, {desired} wanted"),
                },
                generation,
            ),
        ],
        observed_generation: generation,
    };
    let api: Api<MiningFarm> = Api::namespaced(ctx.client.clone(), &ns);
    let patch =
        json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "MiningFarm", "status": status });
    api.patch_status(&name, &pp, &Patch::Apply(patch)).await?;
    Ok(Action::requeue(if draining.is_some() { DRAIN_POLL } else { REFRESH }))
}

async fn cleanup(farm: Arc<MiningFarm>, ctx: Arc<Context>) -> Result<Action> {
    let pool = pool_key(&farm);
    let members = farm_members(&ctx, &farm);
    for m in &members {
        ctx.fabric.remove(&pool, m.id);
    }
    if local_pool(&farm) {
        let ns = farm.namespace().unwrap_or_default();
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(ctx.client.clone(), &ns);
        let name = crate::pool_key::farm_secret_name(&farm.name_any());
        if let Some(key) =
            secrets.get_opt(&name).await?.and_then(|s| crate::pool_key::parse(&s).ok())
        {
            ctx.fabric.remove_farm(&pool, &key.id());
        }
    }
    ctx.event(
        &*farm,
        false,
        "FarmDeleted",
        format!("{} nodes left pool {pool}; their slots are rebuilt elsewhere", members.len()),
    )
    .await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The StatefulSets the operator makes for the example farms are committed under
    /// `examples/rendered/` (so the test command validates them against the Kubernetes
    /// schemas); this fails when the operator's output and the committed files differ.
    /// `SHARDFARM_REGENERATE=1` rewrites them.
    #[test]
    fn rendered_statefulsets_of_the_examples_are_committed() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = std::fs::read_to_string(root.join("examples/miningfarm.yaml")).unwrap();
        let dir = root.join("examples/rendered");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let mut farm: MiningFarm = serde::Deserialize::deserialize(doc).unwrap();
            farm.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
            let ns = farm.namespace().unwrap();
            let sts = statefulset(&farm, &ns, farm.spec.replicas, &"0f".repeat(32));
            let yaml = format!(
                "# Rendered by the operator from examples/miningfarm.yaml (test \
                 rendered_statefulsets_of_the_examples_are_committed): do not edit.\n{}",
                serde_yaml::to_string(&sts).unwrap()
            );
            let path = dir.join(format!("statefulset-{}.yaml", farm.name_any()));
            if std::env::var_os("SHARDFARM_REGENERATE").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &yaml).unwrap();
            }
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == yaml,
                "{} is stale: run with SHARDFARM_REGENERATE=1",
                path.display()
            );
        }
    }
}
