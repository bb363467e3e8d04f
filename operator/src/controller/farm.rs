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

use super::{Context, Error, FARM_FINALIZER, MANAGER, Result, condition, counted, has_condition};
use shardfarm_coordinator::Member;

/// Port of the agents' gRPC service.
pub const AGENT_GRPC_PORT: u16 = 7400;
/// Port of the agents' /metrics.
pub const AGENT_HTTP_PORT: u16 = 7401;
pub use super::{COORDINATOR_PORT, COORDINATOR_SERVICE};
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
        ("cluster".to_string(), "local".to_string()),
    ])
}

/// The pool settings every agent must start with (the running coordinator's, not the
/// StoragePool's spec, which may have been edited since).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentSettings {
    /// Placement partitions.
    pub partitions: u32,
    /// The identity difficulty the pool requires: agents mine to it and require it of callers.
    pub difficulty: u8,
}

impl AgentSettings {
    /// The settings of a pool with configuration `c`.
    pub fn of(c: &shardfarm_coordinator::PoolConfig) -> Self {
        AgentSettings { partitions: c.partitions, difficulty: c.min_difficulty }
    }
}

/// The machine port a `HostNetwork` farm's agents serve gRPC on (their `/metrics` is on the
/// next one), or None for a farm whose agents advertise their pod's DNS name.
pub fn host_port(farm: &MiningFarm) -> Option<u16> {
    farm.spec
        .agent
        .advertise
        .as_ref()
        .filter(|a| a.mode == shardfarm_crds::AdvertiseMode::HostNetwork)
        // The schema bounds it to 1024..=65534; a stored object from before that bound (or a
        // hand-made one) must not wrap the metrics port to 0.
        .map(|a| a.host_port.clamp(1024, 65534))
}

/// The gRPC and `/metrics` ports of the farm's agents.
fn agent_ports(farm: &MiningFarm) -> (u16, u16) {
    match host_port(farm) {
        Some(p) => (p, p + 1),
        None => (AGENT_GRPC_PORT, AGENT_HTTP_PORT),
    }
}

/// The uid and gid the agent image runs as (distroless `nonroot`).
pub const AGENT_UID: i64 = 65532;
/// Seconds an agent may take to start (mine its identity, scan its store) before the
/// kubelet restarts it: 60 probes 10 s apart.
const STARTUP_PROBES: i32 = 60;

/// The StatefulSet of a farm with `replicas` agents pinned to the pool key `pool_id`, started
/// with the pool's `settings` (None for a remote pool: the agents' defaults).
pub fn statefulset(
    farm: &MiningFarm,
    ns: &str,
    replicas: i32,
    pool_id: &str,
    settings: Option<AgentSettings>,
) -> serde_json::Value {
    let name = farm.name_any();
    let spec = &farm.spec;
    let selector = json!({ "app.kubernetes.io/instance": name, "shardfarm.io/farm": name });
    let host = host_port(farm);
    let (grpc_port, http_port) = agent_ports(farm);
    let advertise = match host {
        Some(p) => format!("--advertise=$(HOST_IP):{p}"),
        None => format!("--advertise=$(POD_NAME).{name}-agents.{ns}.svc:{AGENT_GRPC_PORT}"),
    };
    let mut args = vec![
        "agent".to_string(),
        "--data-dir=/data".into(),
        format!("--listen=0.0.0.0:{grpc_port}"),
        format!("--http-listen=0.0.0.0:{http_port}"),
        format!("--zone={}", spec.zone),
        format!("--coordinator={}", coordinator_endpoint(farm, ns)),
        format!("--pool-id={pool_id}"),
        advertise,
        format!("--label=farm={name}"),
        "--label=pod=$(POD_NAME)".into(),
        // The machine it runs on (a pool whose failure domain is `host`).
        "--label=host=$(NODE_NAME)".into(),
        "--log-format=json".into(),
    ];
    if let Some(p) = settings {
        args.push(format!("--partitions={}", p.partitions));
        args.push(format!("--identity-difficulty={}", p.difficulty));
        args.push(format!("--pool-difficulty={}", p.difficulty));
    }
    if let Some(c) = spec.agent.capacity.as_ref().or(spec.agent.storage.size.as_ref()) {
        args.push(format!(
            "--capacity={}",
            c.replace("Gi", "GiB").replace("Ti", "TiB").replace("Mi", "MiB")
        ));
    }
    let mut env = vec![
        json!({ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }),
        json!({ "name": "NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } }),
    ];
    if host.is_some() {
        // The machine's address, which the agent advertises (the pod has no address of its
        // own on the host network).
        env.push(json!({ "name": "HOST_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.hostIP" } } }));
    }
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
            // The agent mines its identity and scans its store before it serves: liveness
            // waits until it has started once.
            "startupProbe": {
                "httpGet": { "path": "/healthz", "port": "http" },
                "periodSeconds": 10,
                "failureThreshold": STARTUP_PROBES,
            },
            "readinessProbe": { "httpGet": { "path": "/readyz", "port": "http" } },
            "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http" }, "periodSeconds": 20 },
            "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
            "resources": spec.agent.resources.clone().unwrap_or_default(),
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": { "drop": ["ALL"] },
            },
        }],
        // The image runs as an unprivileged user; a claimed volume is made its group's.
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": AGENT_UID,
            "runAsGroup": AGENT_UID,
            "fsGroup": AGENT_UID,
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        // The agent drains in-flight requests and flushes its store on SIGTERM.
        "terminationGracePeriodSeconds": 30,
        "nodeSelector": spec.node_selector,
        "tolerations": spec.tolerations,
    });
    if let Some(p) = host {
        // The machine's network: the ports are the machine's (declared as host ports so the
        // scheduler never puts two pods wanting them on one machine, whatever their farm),
        // and cluster DNS still resolves the coordinator's Service.
        pod["hostNetwork"] = json!(true);
        pod["dnsPolicy"] = json!("ClusterFirstWithHostNet");
        pod["containers"][0]["ports"] = json!([
            { "name": "grpc", "containerPort": p, "hostPort": p },
            { "name": "http", "containerPort": p + 1, "hostPort": p + 1 },
        ]);
        // At most one agent of the farm per machine: two would advertise the same address.
        pod["affinity"] = json!({ "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": { "matchLabels": selector.clone() },
                "topologyKey": "kubernetes.io/hostname",
            }],
        } });
    }
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
            // fsGroup does not apply to hostPath: the agent's directory (created root-owned by
            // the kubelet) is handed to the agent's user first, by the same image with only
            // the CHOWN capability.
            pod["initContainers"] = json!([{
                "name": "data-owner",
                "image": spec.agent.image,
                "args": ["prepare-dir", "/data", "--owner", format!("{AGENT_UID}:{AGENT_UID}")],
                "env": [{ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
                "volumeMounts": [{ "name": "data", "mountPath": "/data", "subPathExpr": "$(POD_NAME)" }],
                "securityContext": {
                    "runAsUser": 0,
                    "runAsNonRoot": false,
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": { "drop": ["ALL"], "add": ["CHOWN"] },
                },
            }]);
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

/// The DaemonSet of a farm in `DaemonSet` mode: one agent on every machine the node selector
/// matches, on that machine's disk (`hostPath`, one directory per machine), advertising its
/// pod IP (on the host network: the machine's address, as the StatefulSet's pod does). The pod
/// is the StatefulSet's, with these differences.
pub fn daemonset(
    farm: &MiningFarm,
    ns: &str,
    pool_id: &str,
    settings: Option<AgentSettings>,
) -> serde_json::Value {
    let sts = statefulset(farm, ns, 0, pool_id, settings);
    let mut template = sts["spec"]["template"].clone();
    let pod = &mut template["spec"];
    // On the host network the StatefulSet's pod already advertises the machine's address.
    if let Some(args) =
        pod["containers"][0]["args"].as_array_mut().filter(|_| host_port(farm).is_none())
    {
        for a in args.iter_mut() {
            if a.as_str().is_some_and(|s| s.starts_with("--advertise=")) {
                *a = json!(format!("--advertise=$(POD_IP):{AGENT_GRPC_PORT}"));
            }
        }
    }
    if let Some(env) =
        pod["containers"][0]["env"].as_array_mut().filter(|_| host_port(farm).is_none())
    {
        env.push(json!({ "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } }));
    }
    // A pod's name changes when it is recreated; the machine's does not.
    pod["containers"][0]["volumeMounts"][0]["subPathExpr"] = json!("$(NODE_NAME)");
    if let Some(init) = pod["initContainers"].get_mut(0) {
        init["volumeMounts"][0]["subPathExpr"] = json!("$(NODE_NAME)");
        init["env"] = json!([{ "name": "NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } }]);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": sts["metadata"].clone(),
        "spec": {
            "selector": sts["spec"]["selector"].clone(),
            // One machine's agent at a time: repair of one node's slots at a time.
            "updateStrategy": { "type": "RollingUpdate", "rollingUpdate": { "maxUnavailable": 1 } },
            "template": template,
        },
    })
}

/// Longest farm name: its StatefulSet's pods carry the label `controller-revision-hash:
/// <name>-<10 characters>`, and a label value holds at most 63.
pub const MAX_FARM_NAME: usize = 52;

/// Whether the objects a farm named `name` needs can be named after it: its Service
/// `<name>-agents` must be a DNS-1035 label (the API server refuses it otherwise) and its
/// pods' labels fit (see [`MAX_FARM_NAME`]). `Err` says what to do.
pub fn check_name(name: &str) -> Result<(), String> {
    let service = serde_json::json!({ "metadata": { "name": format!("{name}-agents") } });
    let errors = crate::api_rules::validate("Service", &service, true);
    if name.len() > MAX_FARM_NAME || !errors.is_empty() {
        return Err(format!(
            "the farm's name cannot name its agents: it must be at most {MAX_FARM_NAME} \
             characters of lower case letters, digits and '-', starting with a letter (its \
             Service is {name}-agents, its pods are labelled {name}-<revision>); create the \
             farm under such a name"
        ));
    }
    Ok(())
}

async fn apply(farm: Arc<MiningFarm>, ctx: Arc<Context>) -> Result<Action> {
    let name = farm.name_any();
    let ns = farm.namespace().unwrap_or_default();
    let pool = pool_key(&farm);
    if let Err(why) = check_name(&name) {
        ctx.event(&*farm, true, "InvalidFarm", why.clone()).await?;
        return Err(Error::Invalid(why));
    }
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
    let daemon = farm.spec.mode == shardfarm_crds::FarmMode::DaemonSet;
    if daemon && farm.spec.agent.storage.host_path.is_none() {
        let why = "a DaemonSet farm runs each agent on its machine's disk: set \
                   spec.agent.storage.hostPath"
            .to_string();
        ctx.event(&*farm, true, "InvalidFarm", why.clone()).await?;
        return Err(Error::Invalid(why));
    }
    let existing = if daemon { None } else { sts_api.get_opt(&name).await? };
    let current = existing.as_ref().and_then(|s| s.spec.as_ref()?.replicas).unwrap_or(0);

    let mut svc = json!({
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
    if host_port(&farm).is_some() {
        // The Service keeps its ports (Prometheus and the dashboards find agents by them);
        // on the host network they lead to the machine's ports.
        let (grpc, http) = agent_ports(&farm);
        svc["spec"]["ports"][0]["targetPort"] = json!(grpc);
        svc["spec"]["ports"][1]["targetPort"] = json!(http);
    }
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

    if daemon {
        return apply_daemonset(&farm, &ctx, &pool, &pool_id).await;
    }

    // Scale: up at once (undoing drains of agents kept), down one drained agent at a time,
    // and never below what the pool's profile needs.
    let desired = farm.spec.replicas;
    let members = farm_members(&ctx, &farm);
    let ordinal =
        |m: &Member| m.labels.get("pod")?.strip_prefix(&format!("{name}-"))?.parse::<i32>().ok();
    let mut held = None;
    let (replicas, draining) = if desired >= current {
        for m in members.iter().filter(|m| m.draining && ordinal(m).is_some_and(|o| o < desired)) {
            ctx.fabric.undrain(&pool, m.id);
            let pod = m.labels.get("pod").cloned().unwrap_or_default();
            ctx.event(
                &*farm,
                false,
                "Undrained",
                format!("{pod} stays: the farm wants {desired} agents again"),
            )
            .await?;
        }
        (desired, None)
    } else if let Err(why) = ctx.fabric.view(&pool) {
        // Whether the agent holds data, and whether the pool can do without it, is not known
        // yet: nothing is drained or removed until it is.
        held = Some(("ViewIncomplete", format!("scale-down to {desired} waits: {why}")));
        (current, None)
    } else {
        let ord = current - 1;
        let pod = format!("{name}-{ord}");
        let node = members.iter().find(|m| ordinal(m) == Some(ord));
        let layout = ctx.fabric.layout(&pool);
        let holds = |m: &Member| layout.as_ref().is_some_and(|l| !l.slots_of(&m.id).is_empty());
        match node {
            Some(m) if holds(m) || !ctx.fabric.in_sync(&pool) => {
                // The pool must hold its profile without it, or the drain could never end.
                let rest: Vec<Member> =
                    ctx.fabric.members(&pool).into_iter().filter(|x| x.id != m.id).collect();
                let verdict = ctx
                    .fabric
                    .config(&pool)
                    .map_or(Ok(()), |c| super::pool::check_live(&c.profile(), &rest));
                match verdict {
                    Err(reason) => {
                        let why = format!(
                            "scale-down to {desired} held: without {pod} the pool cannot hold its \
                             profile ({reason}); add capacity elsewhere first, or scale back to \
                             {current}"
                        );
                        if !has_condition(
                            &farm.status.clone().unwrap_or_default().conditions,
                            "ScaleDownHeld",
                            true,
                        ) {
                            ctx.event(&*farm, true, "ScaleDownHeld", why.clone()).await?;
                        }
                        held = Some(("ProfileNeedsIt", why));
                        (current, None)
                    }
                    Ok(()) => {
                        if !m.draining {
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
                }
            }
            _ => (current - 1, None),
        }
    };
    let settings = if local_pool(&farm) {
        ctx.fabric.config(&pool).map(|c| AgentSettings::of(&c))
    } else {
        None
    };
    let mut desired_sts = statefulset(&farm, &ns, replicas, &pool_id, settings);
    // Claim templates are immutable once the StatefulSet exists: keep the ones it has, and
    // say so if the farm asks for other ones (they would apply to new agents only, and the
    // API server refuses the change).
    if let Some(existing_vct) =
        existing.as_ref().and_then(|s| s.spec.as_ref()?.volume_claim_templates.clone())
    {
        let wanted = desired_sts["spec"]["volumeClaimTemplates"].clone();
        let kept = serde_json::to_value(&existing_vct).unwrap_or_default();
        let size = |v: &serde_json::Value| v[0]["spec"]["resources"]["requests"]["storage"].clone();
        if !wanted.is_null() && size(&wanted) != size(&kept) {
            ctx.event(
                &*farm,
                true,
                "StorageUnchanged",
                format!(
                    "agents keep their {} volumes: a StatefulSet's claim templates cannot change \
                     (resize the PVCs, or create a new farm)",
                    size(&kept).as_str().unwrap_or("existing")
                ),
            )
            .await?;
        }
        desired_sts["spec"]["volumeClaimTemplates"] = kept;
    }
    let pod = desired_sts["spec"]["template"]["spec"].clone();
    sts_api.patch(&name, &pp, &Patch::Apply(desired_sts)).await?;
    let admission = pod_security(&ctx, &farm, &ns, &pod).await;

    let ready = existing.as_ref().and_then(|s| s.status.as_ref()?.ready_replicas).unwrap_or(0);
    let previous = farm.status.clone().unwrap_or_default();
    let generation = farm.metadata.generation;
    let passed: u64 = members.iter().map(|m| m.audits_passed).sum();
    let audited: u64 = passed + members.iter().map(|m| m.audits_failed).sum::<u64>();
    let mut status = MiningFarmStatus {
        replicas,
        ready_replicas: ready,
        audit_pass_rate: (audited > 0).then(|| passed as f64 / audited as f64),
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
                "ScaleDownHeld",
                held.is_some(),
                held.as_ref().map_or("NotHeld", |h| h.0),
                held.as_ref().map(|h| h.1.clone()).unwrap_or_default(),
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
        ..figures(&ctx, &pool, &name, &members)
    };
    let refused = admission.condition(&previous.conditions, generation, &mut status.conditions);
    let api: Api<MiningFarm> = Api::namespaced(ctx.client.clone(), &ns);
    let patch =
        json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "MiningFarm", "status": status });
    api.patch_status(&name, &pp, &Patch::Apply(patch)).await?;
    if let Some(why) = refused {
        ctx.event(&*farm, true, "PodSecurityRefused", why).await?;
    }
    let waiting = held.as_ref().is_some_and(|h| h.0 == "ViewIncomplete");
    Ok(Action::requeue(if draining.is_some() || waiting { DRAIN_POLL } else { REFRESH }))
}

/// What a farm's status says of its members, in either mode: its selector, what its agents
/// that are up offer and use (down ones offer nothing now), and their earnings.
fn figures(ctx: &Context, pool: &str, name: &str, members: &[Member]) -> MiningFarmStatus {
    let up = || members.iter().filter(|m| m.up);
    MiningFarmStatus {
        selector: Some(format!("app.kubernetes.io/instance={name},shardfarm.io/farm={name}")),
        capacity: Some(shardfarm_core::human_bytes(up().map(|m| m.offered_bytes).sum())),
        used: Some(shardfarm_core::human_bytes(up().map(|m| m.used_bytes).sum())),
        earnings: members.iter().map(|m| ctx.fabric.earnings(pool, &m.id)).sum(),
        ..Default::default()
    }
}

/// A `DaemonSet` farm: the DaemonSet applied, status from what it scheduled. Machines come
/// and go with the node selector; an agent whose machine leaves is gone at once (its slots
/// are rebuilt after the pool's grace period) — drain it through the ShardPlacement first.
async fn apply_daemonset(
    farm: &MiningFarm,
    ctx: &Context,
    pool: &str,
    pool_id: &str,
) -> Result<Action> {
    let name = farm.name_any();
    let ns = farm.namespace().unwrap_or_default();
    let pp = PatchParams::apply(MANAGER).force();
    let settings = if local_pool(farm) {
        ctx.fabric.config(pool).map(|c| AgentSettings::of(&c))
    } else {
        None
    };
    let api: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    let desired = daemonset(farm, &ns, pool_id, settings);
    let pod = desired["spec"]["template"]["spec"].clone();
    let ds = api.patch(&name, &pp, &Patch::Apply(desired)).await?;
    let admission = pod_security(ctx, farm, &ns, &pod).await;
    let st = ds.status.unwrap_or_default();
    let (scheduled, ready) = (st.desired_number_scheduled, st.number_ready);
    let members = farm_members(ctx, farm);
    let previous = farm.status.clone().unwrap_or_default();
    let generation = farm.metadata.generation;
    let mut status = MiningFarmStatus {
        replicas: scheduled,
        ready_replicas: ready,
        conditions: vec![condition(
            &previous.conditions,
            "Ready",
            ready >= scheduled,
            if ready >= scheduled { "AgentsReady" } else { "AgentsStarting" },
            format!("{ready} of {scheduled} machines' agents ready"),
            generation,
        )],
        observed_generation: generation,
        ..figures(ctx, pool, &name, &members)
    };
    let refused = admission.condition(&previous.conditions, generation, &mut status.conditions);
    let patch =
        json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "MiningFarm", "status": status });
    Api::<MiningFarm>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&name, &pp, &Patch::Apply(patch))
        .await?;
    if let Some(why) = refused {
        ctx.event(farm, true, "PodSecurityRefused", why).await?;
    }
    Ok(Action::requeue(REFRESH))
}

/// What the namespace's Pod Security admission makes of the farm's pods.
enum Admission {
    /// The namespace could not be read: nothing is said (the farm is reconciled all the same).
    Unknown,
    /// Refused (`true`) or not, and why.
    Known(bool, String),
}

impl Admission {
    /// Adds the `PodSecurityRefused` condition to `conditions` (none when unknown); returns
    /// the Warning to publish when the pods have just become refused.
    fn condition(
        &self,
        previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
        generation: Option<i64>,
        conditions: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    ) -> Option<String> {
        let Admission::Known(refused, why) = self else { return None };
        conditions.push(condition(
            previous,
            "PodSecurityRefused",
            *refused,
            if *refused { "NamespaceLevelTooStrict" } else { "NamespaceLevelAllows" },
            why.clone(),
            generation,
        ));
        (*refused && !has_condition(previous, "PodSecurityRefused", true)).then(|| why.clone())
    }
}

/// Whether the Pod Security level namespace `ns` enforces (its
/// `pod-security.kubernetes.io/enforce` label) admits `pod`, the farm's pod spec: a farm on
/// hostPath or the host network needs `privileged`, and `restricted` or `baseline` refuses every
/// one of its pods (`FailedCreate` on the StatefulSet or DaemonSet, nothing on the farm but this).
async fn pod_security(
    ctx: &Context,
    farm: &MiningFarm,
    ns: &str,
    pod: &serde_json::Value,
) -> Admission {
    use crate::pod_security::{ENFORCE_LABEL, needs, refused_by};
    let (needed, why) = needs(pod);
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ctx.client.clone());
    let namespace = match api.get(ns).await {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(namespace = %ns, error = %e, "cannot read the namespace's Pod Security level");
            return Admission::Unknown;
        }
    };
    let labels = namespace.labels();
    let what = match farm.spec.mode {
        shardfarm_crds::FarmMode::DaemonSet => "DaemonSet",
        shardfarm_crds::FarmMode::StatefulSet => "StatefulSet",
    };
    match (refused_by(labels, needed), labels.get(ENFORCE_LABEL)) {
        (Some(level), _) => Admission::Known(
            true,
            format!(
                "namespace {ns} enforces Pod Security `{level}`, and this farm's agents need \
                 `{needed}` ({}): every pod is refused (FailedCreate events on its {what}). \
                 Label the namespace: kubectl label namespace {ns} \
                 {ENFORCE_LABEL}={needed} --overwrite",
                why.join("; ")
            ),
        ),
        (None, Some(level)) => Admission::Known(
            false,
            format!("namespace {ns} enforces Pod Security `{level}`; the agents need `{needed}`"),
        ),
        (None, None) => Admission::Known(
            false,
            format!(
                "namespace {ns} has no {ENFORCE_LABEL} label: the cluster's default level \
                 applies (the operator cannot read it); the agents need `{needed}`"
            ),
        ),
    }
}

/// A deleted farm leaves the pool: its farm key stops vouching (so its agents, still running
/// until garbage collection, cannot rejoin), and its nodes are removed — unless the pool is
/// still there and could not hold its profile without them, in which case the deletion is
/// held with a Warning that says why. When the pool itself is going (its namespace is being
/// deleted) nothing is held. Events are best effort here: in a terminating namespace they
/// cannot be created, and the finalizer must still come off.
async fn cleanup(farm: Arc<MiningFarm>, ctx: Arc<Context>) -> Result<Action> {
    let pool = pool_key(&farm);
    let ns = farm.namespace().unwrap_or_default();
    let pool_going = match &farm.spec.pool_ref.name {
        Some(p) if local_pool(&farm) => {
            Api::<shardfarm_crds::StoragePool>::namespaced(ctx.client.clone(), &ns)
                .get_opt(p)
                .await?
                .is_none_or(|sp| sp.metadata.deletion_timestamp.is_some())
        }
        _ => true,
    };
    // Which nodes are the farm's, and whether the pool can do without them, is read from the
    // pool's view: an operator just restarted or failed over has none yet (or one its members
    // have not reported to), and "no members" there is not "nothing to lose".
    if !pool_going && let Err(why) = ctx.fabric.view(&pool) {
        let why = format!("deletion waits: {why}; retried until the pool's view is complete");
        if let Err(e) = ctx.event(&*farm, false, "DeletionWaiting", why.clone()).await {
            tracing::warn!(error = %e, "could not record the waiting deletion");
        }
        return Err(Error::Held(why));
    }
    let members = farm_members(&ctx, &farm);
    if !pool_going && !members.is_empty() {
        let rest: Vec<Member> = ctx
            .fabric
            .members(&pool)
            .into_iter()
            .filter(|x| !members.iter().any(|m| m.id == x.id))
            .collect();
        // Held only if the farm's nodes are what keeps the pool whole: a pool already unable
        // to hold its profile with them is not made whole by keeping them.
        let verdict = ctx.fabric.config(&pool).map_or(Ok(()), |c| {
            let profile = c.profile();
            match super::pool::check_live(&profile, &ctx.fabric.members(&pool)) {
                Ok(()) => super::pool::check_live(&profile, &rest),
                Err(_) => Ok(()),
            }
        });
        if let Err(reason) = verdict {
            let why = format!(
                "deletion held: without its {} nodes pool {pool} cannot hold its profile \
                 ({reason}); add capacity elsewhere first",
                members.len()
            );
            if let Err(e) = ctx.event(&*farm, true, "DeletionHeld", why.clone()).await {
                tracing::warn!(error = %e, "could not record the held deletion");
            }
            // An error keeps the finalizer (and the farm) and retries the cleanup.
            return Err(Error::Held(why));
        }
    }
    if local_pool(&farm) {
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(ctx.client.clone(), &ns);
        let name = crate::pool_key::farm_secret_name(&farm.name_any());
        match secrets.get_opt(&name).await {
            Ok(Some(s)) => {
                if let Ok(key) = crate::pool_key::parse(&s) {
                    ctx.fabric.remove_farm(&pool, &key.id());
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, secret = %name, "cannot read the farm key"),
        }
    }
    for m in &members {
        ctx.fabric.remove(&pool, m.id);
    }
    let note = if pool_going {
        format!("{} nodes left pool {pool}, which is being deleted", members.len())
    } else {
        format!("{} nodes left pool {pool}; their slots are rebuilt elsewhere", members.len())
    };
    if let Err(e) = ctx.event(&*farm, false, "FarmDeleted", note).await {
        tracing::warn!(error = %e, "could not record the farm's deletion");
    }
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
            let settings = AgentSettings::of(&shardfarm_coordinator::PoolConfig::default());
            let pool = "0f".repeat(32);
            let (kind, object) = match farm.spec.mode {
                shardfarm_crds::FarmMode::StatefulSet => (
                    "statefulset",
                    statefulset(&farm, &ns, farm.spec.replicas, &pool, Some(settings)),
                ),
                shardfarm_crds::FarmMode::DaemonSet => {
                    ("daemonset", daemonset(&farm, &ns, &pool, Some(settings)))
                }
            };
            let yaml = format!(
                "# Rendered by the operator from examples/miningfarm.yaml (test \
                 rendered_statefulsets_of_the_examples_are_committed): do not edit.\n{}",
                serde_yaml::to_string(&object).unwrap()
            );
            let path = dir.join(format!("{kind}-{}.yaml", farm.name_any()));
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
