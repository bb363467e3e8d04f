//! ShardPlacement → the coordinator's declared input and the mirror of its layout.
//!
//! The pool's coordinator is the one layout authority: it computes every layout (with the
//! pool's vetting, assigned failure domains, drain flags and move budget) and signs it. A
//! ShardPlacement declares what the operator may ask of it — `spec.drain` (node ids whose
//! slots are handed away; removing an id undoes its drain) and `spec.maxMovesPerRound` — and
//! mirrors what it did: the layout in a ConfigMap (`<name>-layout`, key `layout.json`) and its
//! version, moves, balance and sync progress in status. Drains and undrains are events.
//!
//! `BALANCE` and `MOVED` come from what is persisted, never from a counter of this process (an
//! operator that restarted or failed over has computed no layout round yet, and showed 0 and
//! 0): the balance is recomputed on every pass from the current layout and the members, both
//! in the coordinator's state ConfigMap, as the coordinator measures it (max load over the
//! capacity-weighted mean load of the nodes it places on); the moves are counted once, when
//! a new layout version is mirrored, as the slots whose holder changed from the layout the
//! ConfigMap mirrored before, and recorded beside it (`movedSlots`, `movedFrom`) and in
//! status. When rounds follow each other faster than the mirror (30 s), `movedFrom` names
//! the older layout the count starts from.

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
/// Key, beside the layout, of the slots whose holder changed from the layout mirrored before.
pub const MOVED_KEY: &str = "movedSlots";
/// Key, beside the layout, of the version of the layout [`MOVED_KEY`] counts from (absent for
/// a first layout: every slot was placed).
pub const MOVED_FROM_KEY: &str = "movedFrom";
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
            let moved = if layout.version != previous.layout_version {
                let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns);
                let (moved, from) = moved_since(&layout, api.get_opt(&cm_name).await?.as_ref());
                let moved = moved.unwrap_or(previous.moved_assignments);
                let mut data = json!({
                    LAYOUT_KEY: serde_json::to_string(&layout).expect("serialisable"),
                    MOVED_KEY: moved.to_string(),
                });
                if let Some(from) = from {
                    data[MOVED_FROM_KEY] = json!(from.to_string());
                }
                let cm = json!({
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": { "name": cm_name, "namespace": ns,
                                  "labels": { "shardfarm.io/layout-mirror": "true" },
                                  "ownerReferences": [sp.controller_owner_ref(&()).expect("uid")] },
                    "data": data,
                });
                api.patch(&cm_name, &pp, &Patch::Apply(cm)).await?;
                moved
            } else {
                // Counted when this version was mirrored, and kept in status since.
                previous.moved_assignments
            };
            let holders: BTreeMap<_, _> = layout.loads();
            let synced = members
                .iter()
                .filter(|m| holders.contains_key(&m.id) && m.in_sync(layout.version))
                .count();
            let vetting = ctx.fabric.config(pool).map(|c| c.vetting).unwrap_or_default();
            ShardPlacementStatus {
                layout_version: layout.version,
                // Over the members as they are now, drains just asked for included.
                balance: balance(&layout, &ctx.fabric.members(pool), &vetting)
                    .map(|b| (b * 1000.0).round() / 1000.0),
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

// ---- The figures, from persisted state ----

/// How balanced `layout` is over `members`, as the coordinator measures a round
/// (`placement::Quality::balance`): the most any node it places on (up, not disqualified, not
/// draining, with a placement weight) holds over its capacity-weighted share of all slots.
/// 1.0 is perfect; None when no node can hold anything.
pub fn balance(
    layout: &shardfarm_core::placement::Layout,
    members: &[shardfarm_coordinator::Member],
    vetting: &shardfarm_coordinator::vetting::VettingConfig,
) -> Option<f64> {
    use shardfarm_coordinator::economics::Standing;
    let eligible: Vec<&shardfarm_coordinator::Member> =
        members.iter().filter(|m| m.up && m.standing != Standing::Disqualified).collect();
    let weights = vetting.placement(&eligible);
    let nodes: Vec<(NodeId, f64)> = eligible
        .iter()
        .zip(weights)
        .filter(|(m, (weight, _))| *weight > 0 && !m.draining)
        .map(|(m, (weight, _))| (m.id, weight as f64))
        .collect();
    let total: f64 = nodes.iter().map(|(_, w)| w).sum();
    let slots = (layout.partitions.len() * layout.n()) as f64;
    if nodes.is_empty() || total <= 0.0 || slots == 0.0 {
        return None;
    }
    let loads = layout.loads();
    Some(
        nodes
            .iter()
            .map(|(id, w)| loads.get(id).copied().unwrap_or(0) as f64 / (slots * w / total))
            .fold(0.0, f64::max),
    )
}

/// The slots whose holder changed in `layout` from the layout `mirror` (its ConfigMap, as the
/// API server holds it) mirrored before, and that layout's version. Every slot for a first
/// layout (no mirror: everything was placed). A mirror that already holds this version (an
/// operator stopped between the ConfigMap and the status) answers what it recorded then, or
/// None if it recorded nothing.
pub fn moved_since(
    layout: &shardfarm_core::placement::Layout,
    mirror: Option<&ConfigMap>,
) -> (Option<u64>, Option<u64>) {
    let data = mirror.and_then(|cm| cm.data.as_ref());
    let before = data
        .and_then(|d| d.get(LAYOUT_KEY))
        .and_then(|text| serde_json::from_str::<shardfarm_core::placement::Layout>(text).ok());
    match before {
        Some(b) if b.version == layout.version => (
            data.and_then(|d| d.get(MOVED_KEY)?.parse().ok()),
            data.and_then(|d| d.get(MOVED_FROM_KEY)?.parse().ok()),
        ),
        Some(b) => (Some(layout.moved_from(&b) as u64), Some(b.version)),
        None => (Some((layout.partitions.len() * layout.n()) as u64), None),
    }
}
