//! ShardPlacement → the coordinator's declared input and the mirror of its layout.
//!
//! The pool's coordinator is the one layout authority: it computes every layout (with the
//! pool's vetting, assigned failure domains, drain flags and move budget) and signs it. A
//! ShardPlacement declares what the operator may ask of it — `spec.drain` (node ids whose
//! slots are handed away; removing an id undoes its drain) and `spec.maxMovesPerRound` — and
//! mirrors what it did: the layout in a ConfigMap (`<name>-layout`, key `layout.json`) and its
//! version, moves, balance and sync progress in status. Drains and undrains are events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use shardfarm_core::identity::NodeId;
use shardfarm_crds::{ShardPlacement, ShardPlacementStatus};

use super::{Context, Error, MANAGER, Result, condition, counted};

/// Key of the layout in its ConfigMap.
pub const LAYOUT_KEY: &str = "layout.json";
/// The label of the layout ConfigMaps (what the placement controller watches).
pub const LAYOUT_LABEL: &str = "shardfarm.io/layout-mirror=true";
/// Mirror period (layouts change when members do; the mirror follows within this).
const REFRESH: Duration = Duration::from_secs(30);

/// Reconciles one ShardPlacement.
pub async fn reconcile(sp: Arc<ShardPlacement>, ctx: Arc<Context>) -> Result<Action> {
    counted(&ctx, "ShardPlacement", apply(sp, &ctx).await)
}

async fn apply(sp: Arc<ShardPlacement>, ctx: &Context) -> Result<Action> {
    let ns = sp.namespace().ok_or_else(|| Error::Invalid("ShardPlacement is namespaced".into()))?;
    let name = sp.name_any();
    let pool = &sp.spec.pool_ref;
    let previous = sp.status.clone().unwrap_or_default();
    let generation = sp.metadata.generation;
    let members = ctx.fabric.members(pool);
    let known: BTreeSet<NodeId> = members.iter().map(|m| m.id).collect();

    // Declared input: the drain list (ids that are not members are ignored until they join)
    // and the move budget.
    // An incomplete view (an operator just restarted) applies no drain or undrain and keeps
    // the drained list it had: read as "no members", it would forget drains it must undo.
    let view = ctx.fabric.view(pool);
    let drained: Vec<String> = if view.is_ok() {
        let wanted: BTreeSet<NodeId> =
            sp.spec.drain.iter().filter_map(|id| NodeId::from_hex(id).ok()).collect();
        let before: BTreeSet<NodeId> =
            previous.drained.iter().filter_map(|id| NodeId::from_hex(id).ok()).collect();
        for id in wanted.difference(&before).filter(|id| known.contains(id)) {
            ctx.fabric.drain(pool, *id);
            ctx.event(
                &*sp,
                false,
                "Draining",
                format!("draining node {id}: its slots are re-placed"),
            )
            .await?;
        }
        for id in before.difference(&wanted).filter(|id| known.contains(id)) {
            ctx.fabric.undrain(pool, *id);
            ctx.event(&*sp, false, "Undrained", format!("node {id} is no longer drained")).await?;
        }
        wanted.iter().filter(|id| known.contains(id)).map(|id| id.to_hex()).collect()
    } else {
        previous.drained.clone()
    };
    let view_condition = condition(
        &previous.conditions,
        "ViewComplete",
        view.is_ok(),
        if view.is_ok() { "CoordinatorReporting" } else { "ViewIncomplete" },
        match &view {
            Ok(()) => "drains are applied".to_string(),
            Err(why) => format!("drains wait: {why}"),
        },
        generation,
    );
    ctx.fabric.set_max_moves(pool, sp.spec.max_moves_per_round.map(|x| x as usize));

    // The mirror: the coordinator's layout.
    let pp = PatchParams::apply(MANAGER).force();
    let cm_name = format!("{name}-layout");
    let mut status = match ctx.fabric.layout(pool) {
        None => ShardPlacementStatus {
            drained,
            conditions: vec![condition(
                &previous.conditions,
                "Degraded",
                true,
                "NoLayout",
                "the pool's coordinator has not published a layout yet".into(),
                generation,
            )],
            observed_generation: generation,
            ..previous.clone()
        },
        Some(layout) => {
            if layout.version != previous.layout_version {
                let cm = json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": { "name": cm_name, "namespace": ns,
                                  "labels": { "shardfarm.io/layout-mirror": "true" },
                                  "ownerReferences": [sp.controller_owner_ref(&()).expect("uid")] },
                    "data": { LAYOUT_KEY: serde_json::to_string(&layout).expect("serialisable") },
                });
                Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
                    .patch(&cm_name, &pp, &Patch::Apply(cm))
                    .await?;
            }
            let holders: BTreeMap<_, _> = layout.loads();
            let synced = members
                .iter()
                .filter(|m| holders.contains_key(&m.id) && m.in_sync(layout.version))
                .count();
            let (moved, balance) = ctx.fabric.last_round(pool);
            ShardPlacementStatus {
                layout_version: layout.version,
                balance: Some((balance * 1000.0).round() / 1000.0),
                moved_assignments: moved,
                sync_progress: Some(if holders.is_empty() {
                    1.0
                } else {
                    synced as f64 / holders.len() as f64
                }),
                layout_config_map: Some(cm_name.clone()),
                drained,
                conditions: vec![condition(
                    &previous.conditions,
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
    status.conditions.retain(|c| c.type_ != "ViewComplete");
    status.conditions.push(view_condition);
    let patch = json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "ShardPlacement", "status": status });
    Api::<ShardPlacement>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&name, &pp, &Patch::Apply(patch))
        .await?;
    Ok(Action::requeue(if view.is_ok() { REFRESH } else { Duration::from_secs(5) }))
}
