//! ShardPlacement → the layout, computed with `core::placement` from the pool's current
//! members, stored in a ConfigMap (`<name>-layout`, key `layout.json`) and handed to the
//! coordinator. Nodes on the drain list hand their slots away; suspended nodes are frozen;
//! `maxMovesPerRound` bounds rebalancing per round.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use shardfarm_core::placement::{self, Layout, Options, Profile};
use shardfarm_crds::{ShardPlacement, ShardPlacementStatus, StoragePool};

use super::{Context, Error, MANAGER, Result, condition, counted};
use shardfarm_coordinator::economics::Standing;

/// Key of the layout in its ConfigMap.
pub const LAYOUT_KEY: &str = "layout.json";
/// Recompute period (membership changes also arrive through the coordinator's watch).
const REFRESH: Duration = Duration::from_secs(30);

/// Reconciles one ShardPlacement.
pub async fn reconcile(sp: Arc<ShardPlacement>, ctx: Arc<Context>) -> Result<Action> {
    counted(&ctx, "ShardPlacement", apply(sp, &ctx).await)
}

async fn apply(sp: Arc<ShardPlacement>, ctx: &Context) -> Result<Action> {
    let ns = sp.namespace().ok_or_else(|| Error::Invalid("ShardPlacement is namespaced".into()))?;
    let name = sp.name_any();
    let pool_name = &sp.spec.pool_ref;
    let pool = Api::<StoragePool>::namespaced(ctx.client.clone(), &ns)
        .get_opt(pool_name)
        .await?
        .ok_or_else(|| Error::Invalid(format!("pool `{pool_name}` does not exist")))?;
    let cm_name = format!("{name}-layout");
    let cm_api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let previous: Option<Layout> = cm_api
        .get_opt(&cm_name)
        .await?
        .and_then(|cm| cm.data?.get(LAYOUT_KEY).and_then(|t| serde_json::from_str(t).ok()));

    let label = pool.spec.failure_domain.label();
    let members = ctx.fabric.members(pool_name);
    let nodes: Vec<placement::Node> = members
        .iter()
        .filter(|m| m.up && m.standing != Standing::Disqualified)
        .map(|m| placement::Node {
            id: m.id,
            root: m.root,
            domain: m.labels.get(label).cloned().unwrap_or_else(|| m.domain.clone()),
            capacity: m.capacity.max(0.0) as u64,
            draining: sp.spec.drain.contains(&m.id.to_hex()),
            frozen: m.standing == Standing::Suspended,
        })
        .collect();
    let profile = Profile {
        k: pool.spec.erasure.data_shards,
        m: pool.spec.erasure.parity_shards,
        partitions: sp.spec.partitions,
        domain_kind: label.into(),
    };
    let options = Options { max_transfers: sp.spec.max_moves_per_round.map(|x| x as usize) };
    let previous_status = sp.status.clone().unwrap_or_default();
    let generation = sp.metadata.generation;
    let pp = PatchParams::apply(MANAGER).force();
    let status = match placement::compute(&nodes, &profile, previous.as_ref(), &options) {
        Err(e) => ShardPlacementStatus {
            conditions: vec![condition(
                &previous_status.conditions,
                "Degraded",
                true,
                "NoLayout",
                e.to_string(),
                generation,
            )],
            observed_generation: generation,
            ..previous_status.clone()
        },
        Ok(plan) => {
            let changed = previous.as_ref().is_none_or(|p| p.partitions != plan.layout.partitions);
            let layout = if changed { plan.layout } else { previous.clone().expect("unchanged") };
            if changed {
                let cm = json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": { "name": cm_name, "namespace": ns, "ownerReferences": [sp.controller_owner_ref(&()).expect("uid")] },
                    "data": { LAYOUT_KEY: serde_json::to_string(&layout).expect("serialisable") },
                });
                cm_api.patch(&cm_name, &pp, &Patch::Apply(cm)).await?;
                ctx.fabric.publish(pool_name, layout.clone());
            }
            let holders: BTreeMap<_, _> = layout.loads();
            let synced = members
                .iter()
                .filter(|m| holders.contains_key(&m.id) && m.in_sync(layout.version))
                .count();
            ShardPlacementStatus {
                layout_version: layout.version,
                balance: Some((plan.quality.balance * 1000.0).round() / 1000.0),
                moved_assignments: if changed {
                    plan.quality.moved as u64
                } else {
                    previous_status.moved_assignments
                },
                sync_progress: Some(if holders.is_empty() {
                    1.0
                } else {
                    synced as f64 / holders.len() as f64
                }),
                layout_config_map: Some(cm_name.clone()),
                conditions: vec![condition(
                    &previous_status.conditions,
                    "Degraded",
                    false,
                    "LayoutPublished",
                    format!("layout {} over {} nodes", layout.version, holders.len()),
                    generation,
                )],
                observed_generation: generation,
            }
        }
    };
    let patch = json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "ShardPlacement", "status": status });
    Api::<ShardPlacement>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&name, &pp, &Patch::Apply(patch))
        .await?;
    Ok(Action::requeue(REFRESH))
}
