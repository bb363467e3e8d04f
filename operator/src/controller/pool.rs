//! StoragePool → validation against the farms' failure domains, an owned ShardPlacement, the
//! keys of its clients (`clients`), and the pool's status aggregated from the coordinator.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use shardfarm_core::identity::{NodeId, blake2b256};
use shardfarm_core::placement::{self, Options, Profile};
use shardfarm_crds::{FailureDomain, MiningFarm, StoragePool, StoragePoolStatus};

use super::{Context, Error, MANAGER, Result, condition, counted, has_condition};
use shardfarm_coordinator::economics::Standing;

/// Status refresh period.
const REFRESH: Duration = Duration::from_secs(60);

/// Whether the farms (and members joined from outside) can hold the pool's profile: one node
/// per agent of every farm that references the pool, placed by the same engine the pool uses.
/// `Err` carries the engine's exact reason.
pub fn check_profile(
    pool: &StoragePool,
    farms: &[MiningFarm],
    outside: &[(NodeId, String)],
) -> Result<(), String> {
    let spec = &pool.spec;
    let mut nodes = Vec::new();
    for f in farms {
        // A DaemonSet farm has as many agents as machines it was scheduled on.
        let agents = match f.spec.mode {
            shardfarm_crds::FarmMode::StatefulSet => f.spec.replicas,
            shardfarm_crds::FarmMode::DaemonSet => f.status.as_ref().map_or(0, |s| s.replicas),
        };
        for i in 0..agents.max(0) {
            let who = format!("{}/{}/{i}", f.namespace().unwrap_or_default(), f.name_any());
            let id = NodeId(blake2b256(&[who.as_bytes()]));
            let domain = match spec.failure_domain {
                FailureDomain::Zone => f.spec.zone.clone(),
                FailureDomain::Farm => f.name_any(),
                // Agents of a StatefulSet may share hosts; without a pod anti-affinity we
                // cannot know, so each agent counts as its own host.
                FailureDomain::Host => who.clone(),
                FailureDomain::Cluster => "local".into(),
            };
            nodes.push(placement::Node {
                id,
                root: id,
                domain,
                capacity: 1,
                draining: false,
                frozen: false,
            });
        }
    }
    for (id, domain) in outside {
        nodes.push(placement::Node {
            id: *id,
            root: *id,
            domain: domain.clone(),
            capacity: 1,
            draining: false,
            frozen: false,
        });
    }
    let profile = Profile {
        k: spec.erasure.data_shards,
        m: spec.erasure.parity_shards,
        partitions: spec.partitions.min(4096),
        domain_kind: spec.failure_domain.label().into(),
    };
    placement::compute(&nodes, &profile, None, &Options::default())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Whether the pool's live members — up, in good standing, in the failure domains the
/// coordinator assigned them — can hold its profile now. `Err` carries the engine's reason.
pub fn check_live(
    profile: &Profile,
    members: &[shardfarm_coordinator::Member],
) -> Result<(), String> {
    let nodes: Vec<placement::Node> = members
        .iter()
        .filter(|m| m.up && m.standing == Standing::Active)
        .map(|m| placement::Node {
            id: m.id,
            root: m.root,
            domain: m.domain.clone(),
            capacity: 1,
            draining: m.draining,
            frozen: false,
        })
        .collect();
    let profile = Profile { partitions: profile.partitions.min(4096), ..profile.clone() };
    placement::compute(&nodes, &profile, None, &Options::default())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Shards of the pool below full redundancy: what its coordinator counts the nodes that are
/// up still have to rebuild (`backlog`, [`super::Fabric::degraded_shards`]), plus what the
/// current layout places on nodes that are down or no longer members — nobody rebuilds those
/// while the layout still names them (within the grace period, or when the nodes left cannot
/// hold the profile and no new layout can be computed), and a segment then reads "4 of 6"
/// while no node has a backlog. A down member counts the shards it last reported; a holder
/// that left the pool counts its slots at the mean shards per slot of the holders that
/// reported.
pub fn degraded_shards(
    backlog: u64,
    members: &[shardfarm_coordinator::Member],
    layout: Option<&placement::Layout>,
) -> u64 {
    let Some(layout) = layout else { return backlog };
    let by_id: std::collections::BTreeMap<NodeId, &shardfarm_coordinator::Member> =
        members.iter().map(|m| (m.id, m)).collect();
    let loads = layout.loads();
    let (mut known_shards, mut known_slots) = (0u64, 0u64);
    for (id, slots) in &loads {
        if let Some(m) = by_id.get(id) {
            known_shards = known_shards.saturating_add(m.shards);
            known_slots += *slots as u64;
        }
    }
    let mut unavailable = 0u64;
    for (id, slots) in &loads {
        let missing = match by_id.get(id) {
            Some(m) if m.up => 0,
            Some(m) => m.shards,
            None if known_slots > 0 => {
                ((*slots as u128 * known_shards as u128) / known_slots as u128) as u64
            }
            None => 0,
        };
        unavailable = unavailable.saturating_add(missing);
    }
    backlog.saturating_add(unavailable)
}

/// Reconciles one StoragePool.
pub async fn reconcile(pool: Arc<StoragePool>, ctx: Arc<Context>) -> Result<Action> {
    counted(&ctx, "StoragePool", apply(pool, &ctx).await)
}

async fn apply(pool: Arc<StoragePool>, ctx: &Context) -> Result<Action> {
    let ns = pool.namespace().ok_or_else(|| Error::Invalid("StoragePool is namespaced".into()))?;
    let name = pool.name_any();
    // Everything this reconcile writes (the ShardPlacement, the clients' Secrets with new keys,
    // the `shardfarm-pool-<name>` ConfigMap) is owned by the pool and goes with it. A pool
    // being deleted (`helm uninstall`, `kubectl delete`) gets none of it again: the garbage
    // collector would only remove it after keys had been minted for nobody. The controller's
    // cache trails the API (a farm's deletion can trigger this reconcile before the pool's
    // own deletion reaches the cache), so the pool is read from the API first, and one that
    // is gone, going, or another object under the same name (its own reconcile follows) is
    // left alone.
    if pool.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let pool = match Api::<StoragePool>::namespaced(ctx.client.clone(), &ns).get_opt(&name).await? {
        Some(fresh)
            if fresh.metadata.deletion_timestamp.is_none()
                && fresh.metadata.uid == pool.metadata.uid =>
        {
            Arc::new(fresh)
        }
        _ => {
            tracing::debug!(pool = %name, "the pool is gone or being deleted: nothing is written");
            return Ok(Action::await_change());
        }
    };
    let farms: Vec<MiningFarm> = Api::<MiningFarm>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|f| f.spec.pool_ref.name.as_deref() == Some(name.as_str()))
        .collect();
    // The ways in for outsiders: every syndication of this pool (a deleted one's closes here).
    let syndications = Api::<shardfarm_crds::NodeSyndication>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    ctx.fabric.set_admission(
        &name,
        super::syndication::admission_of(&syndications, &name, pool.spec.failure_domain.label()),
    );
    let members = ctx.fabric.members(&name);
    let outside: Vec<(NodeId, String)> = members
        .iter()
        .filter(|m| !m.labels.contains_key("farm") && m.standing != Standing::Disqualified)
        .map(|m| (m.id, m.domain.clone()))
        .collect();
    let agents: i32 = farms
        .iter()
        .map(|f| match f.spec.mode {
            shardfarm_crds::FarmMode::StatefulSet => f.spec.replicas.max(0),
            shardfarm_crds::FarmMode::DaemonSet => {
                f.status.as_ref().map_or(0, |s| s.replicas.max(0))
            }
        })
        .sum();
    let check = if agents == 0 && outside.is_empty() {
        Err(String::new())
    } else {
        check_profile(&pool, &farms, &outside)
    };

    // The pool's ShardPlacement, owned by it.
    let pp = PatchParams::apply(MANAGER).force();
    let placement = json!({
        "apiVersion": "shardfarm.io/v1alpha1",
        "kind": "ShardPlacement",
        "metadata": { "name": name, "namespace": ns, "ownerReferences": [pool.controller_owner_ref(&()).expect("pool has a uid")] },
        "spec": { "poolRef": name, "partitions": pool.spec.partitions },
    });
    Api::<shardfarm_crds::ShardPlacement>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &pp, &Patch::Apply(placement))
        .await?;
    // The keys of the pool's clients (and the ConfigMap that names the pool to them).
    let clients =
        super::clients::reconcile(&pool, ctx, shardfarm_core::auth::now_ms() / 1000).await?;

    let previous = pool.status.clone().unwrap_or_default();
    let generation = pool.metadata.generation;
    let (k, m) = (pool.spec.erasure.data_shards, pool.spec.erasure.parity_shards);
    // Ready is what runs, not what is declared: a published layout, and members up and in
    // good standing that can hold the profile.
    let layout = ctx.fabric.layout(&name);
    let live = check_live(
        &Profile {
            k,
            m,
            partitions: pool.spec.partitions,
            domain_kind: pool.spec.failure_domain.label().into(),
        },
        &members,
    );
    let active = members.iter().filter(|x| x.up && x.standing == Standing::Active).count();
    let (phase, ready, degraded) = match (&check, &live, &layout) {
        (Err(reason), _, _) if reason.is_empty() => {
            ("Pending", Err("no MiningFarm references this pool yet".to_string()), None)
        }
        (Err(reason), _, _) => ("Degraded", Err(reason.clone()), Some(reason.clone())),
        (Ok(()), Ok(()), Some(l)) => (
            "Ready",
            Ok(format!(
                "{active} nodes up and in good standing hold RS({k},{m}) (layout version {})",
                l.version
            )),
            None,
        ),
        (Ok(()), Err(reason), Some(_)) => (
            "Degraded",
            Err(format!("{active} nodes up and in good standing: {reason}")),
            Some(format!("the nodes up now cannot hold RS({k},{m}): {reason}")),
        ),
        (Ok(()), _, None) => (
            "Pending",
            Err(format!(
                "waiting for agents: {active} nodes up and in good standing ({agents} agents \
                 declared by farms); no layout is published yet"
            )),
            None,
        ),
    };
    let up = |s: Standing| members.iter().filter(|x| x.up && x.standing == s).count() as u32;
    let clients_problem = (!clients.problems.is_empty()).then(|| clients.problems.join("; "));
    let mut conditions = vec![
        condition(
            &previous.conditions,
            "Ready",
            ready.is_ok(),
            if ready.is_ok() { "ProfileSatisfied" } else { "NotReady" },
            match &ready {
                Ok(msg) | Err(msg) => msg.clone(),
            },
            generation,
        ),
        condition(
            &previous.conditions,
            "Degraded",
            degraded.is_some(),
            if degraded.is_some() { "ProfileUnsatisfiable" } else { "ProfileSatisfiable" },
            degraded.clone().unwrap_or_default(),
            generation,
        ),
    ];
    if clients.active {
        conditions.push(condition(
            &previous.conditions,
            "ClientsIssued",
            clients_problem.is_none(),
            if clients_problem.is_none() { "KeysValid" } else { "ClientsRefused" },
            clients_problem.clone().unwrap_or_else(|| {
                format!("{} client keys issued and valid", clients.issued.len())
            }),
            generation,
        ));
    }
    let status = StoragePoolStatus {
        phase: Some(phase.into()),
        profile: Some(format!("RS({k},{m})")),
        pool_id: ctx.fabric.pool_id(&name).map(|id| id.to_hex()),
        conditions,
        nodes_ready: up(Standing::Active),
        nodes_suspended: up(Standing::Suspended),
        capacity_bytes: members.iter().filter(|x| x.up).map(|x| x.offered_bytes).sum(),
        used_bytes: members.iter().filter(|x| x.up).map(|x| x.used_bytes).sum(),
        layout_version: layout.as_ref().map_or(0, |l| l.version),
        degraded_segments: degraded_shards(
            ctx.fabric.degraded_shards(&name),
            &members,
            layout.as_ref(),
        ),
        clients: clients.issued,
        observed_generation: generation,
    };
    let patch =
        json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "StoragePool", "status": status });
    Api::<StoragePool>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&name, &pp, &Patch::Apply(patch))
        .await?;
    if let Some(reason) = degraded
        && !has_condition(&previous.conditions, "Degraded", true)
    {
        ctx.event(&*pool, true, "ProfileUnsatisfiable", reason).await?;
    }
    if let Some(why) = clients_problem
        && !has_condition(&previous.conditions, "ClientsIssued", false)
    {
        ctx.event(&*pool, true, "ClientsRefused", why).await?;
    }
    Ok(Action::requeue(REFRESH))
}
