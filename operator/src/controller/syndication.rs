//! NodeSyndication → admission of nodes from outside the cluster.
//!
//! Static members (edge boxes, bare metal) are judged by the admission rules here: a node id
//! that is not 64 hex digits, an identity mined below the syndication's or the pool's
//! difficulty (whichever is higher), or — in `AllowList` mode — an id not listed, is refused
//! with the reason in status and a Warning event. A static member's failure domain is the label
//! the syndication gives it (of the pool's failure-domain kind), or else its owner root; what
//! the node claims at Join is not used. Members that joined the coordinator from a listed
//! remote cluster appear with their standing.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::json;
use shardfarm_crds::{
    AdmissionMode, MemberStatus, NodeSyndication, NodeSyndicationStatus, StaticMember, StoragePool,
    SyndicationAdmission,
};

use super::{Context, Error, MANAGER, Result, condition, counted};

/// Status refresh period.
const REFRESH: Duration = Duration::from_secs(60);

/// Whether `member` may join under `admission` and the pool's least difficulty.
pub fn admit(
    admission: &SyndicationAdmission,
    pool_min: u8,
    member: &StaticMember,
) -> Result<(), String> {
    let id = &member.node_id;
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(format!("node id `{id}` is not 64 lowercase hex digits"));
    }
    let need = admission.min_identity_difficulty.max(pool_min);
    if member.identity_difficulty < need {
        return Err(format!(
            "identity mined to {} bits; this syndication and its pool require {need}",
            member.identity_difficulty
        ));
    }
    if admission.mode == AdmissionMode::AllowList && !admission.allow.contains(id) {
        return Err("not in the allow list".into());
    }
    Ok(())
}

/// The pool `pool`'s admission from its syndications: one rule each (its least difficulty and,
/// in AllowList mode, its list), and the failure domain each static member's labels give it
/// (its label of the pool's failure-domain kind `kind`).
pub fn admission_of(
    syndications: &[NodeSyndication],
    pool: &str,
    kind: &str,
) -> shardfarm_coordinator::Admission {
    use shardfarm_core::identity::NodeId;
    let mut admission = shardfarm_coordinator::Admission::default();
    for syn in syndications.iter().filter(|s| s.spec.pool_ref == pool) {
        let allow = (syn.spec.admission.mode == AdmissionMode::AllowList).then(|| {
            syn.spec.admission.allow.iter().filter_map(|id| NodeId::from_hex(id).ok()).collect()
        });
        admission.rules.push(shardfarm_coordinator::AdmissionRule {
            name: syn.name_any(),
            min_difficulty: syn.spec.admission.min_identity_difficulty,
            allow,
        });
        for m in &syn.spec.static_members {
            if let (Ok(id), Some(domain)) = (NodeId::from_hex(&m.node_id), m.labels.get(kind)) {
                admission.domains.insert(id, domain.clone());
            }
        }
    }
    admission
}

/// Reconciles one NodeSyndication.
pub async fn reconcile(syn: Arc<NodeSyndication>, ctx: Arc<Context>) -> Result<Action> {
    counted(&ctx, "NodeSyndication", apply(syn, &ctx).await)
}

async fn apply(syn: Arc<NodeSyndication>, ctx: &Context) -> Result<Action> {
    let ns =
        syn.namespace().ok_or_else(|| Error::Invalid("NodeSyndication is namespaced".into()))?;
    let name = syn.name_any();
    let pool_name = &syn.spec.pool_ref;
    let pool = Api::<StoragePool>::namespaced(ctx.client.clone(), &ns).get_opt(pool_name).await?;
    let pool_min = pool.as_ref().map_or(u8::MAX, |p| p.spec.admission.min_identity_difficulty);
    let previous = syn.status.clone().unwrap_or_default();
    let was_refused =
        |id: &str| previous.members.iter().any(|m| m.node_id == id && m.state == "refused");

    // The same rules apply to nodes that join the coordinator directly (edge boxes, agents of
    // remote clusters): every syndication of the pool is one way in, so the pool's admission
    // is recomputed from all of them (the pool's reconciler does the same, so a deleted
    // syndication's way in closes within its refresh).
    if let Some(pool) = &pool {
        let all = Api::<NodeSyndication>::namespaced(ctx.client.clone(), &ns)
            .list(&Default::default())
            .await?
            .items;
        ctx.fabric.set_admission(
            pool_name,
            admission_of(&all, pool_name, pool.spec.failure_domain.label()),
        );
    }
    let mut members = Vec::new();
    let mut newly_refused = Vec::new();
    for m in &syn.spec.static_members {
        let verdict = match &pool {
            Some(_) => admit(&syn.spec.admission, pool_min, m),
            None => Err(format!("pool `{pool_name}` does not exist")),
        };
        if let Err(reason) = &verdict
            && !was_refused(&m.node_id)
        {
            newly_refused.push((m.node_id.clone(), reason.clone()));
        }
        // Admitted once it has joined; until then only allowed.
        let joined = shardfarm_core::identity::NodeId::from_hex(&m.node_id)
            .is_ok_and(|id| ctx.fabric.members(pool_name).iter().any(|x| x.id == id));
        members.push(MemberStatus {
            node_id: m.node_id.clone(),
            cluster: "local".into(),
            state: match (&verdict, joined) {
                (Err(_), _) => "refused",
                (Ok(()), true) => "admitted",
                (Ok(()), false) => "allowed",
            }
            .into(),
            reason: verdict.err(),
            last_report: None,
        });
    }
    for remote in &syn.spec.remote_clusters {
        for m in ctx.fabric.members(pool_name) {
            if m.labels.get("cluster") != Some(&remote.name) {
                continue;
            }
            members.push(MemberStatus {
                node_id: m.id.to_hex(),
                cluster: remote.name.clone(),
                state: match m.standing.as_str() {
                    "active" => "admitted".into(),
                    other => other.into(),
                },
                reason: None,
                last_report: k8s_openapi::jiff::Timestamp::from_millisecond(m.last_seen_ms as i64)
                    .ok()
                    .map(|t| t.to_string()),
            });
        }
    }
    let refused = members.iter().filter(|m| m.state == "refused").count() as u32;
    let admitted = members.iter().filter(|m| m.state == "admitted").count() as u32;
    let generation = syn.metadata.generation;
    let status = NodeSyndicationStatus {
        members,
        admitted,
        refused,
        conditions: vec![condition(
            &previous.conditions,
            "Ready",
            pool.is_some(),
            if pool.is_some() { "PoolFound" } else { "PoolMissing" },
            if pool.is_some() {
                format!("{admitted} admitted, {refused} refused")
            } else {
                format!("pool `{pool_name}` does not exist")
            },
            generation,
        )],
        observed_generation: generation,
    };
    let pp = PatchParams::apply(MANAGER).force();
    let patch = json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "NodeSyndication", "status": status });
    Api::<NodeSyndication>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&name, &pp, &Patch::Apply(patch))
        .await?;
    for (id, reason) in newly_refused {
        ctx.event(
            &*syn,
            true,
            "NodeRefused",
            format!("node {}: {reason}", &id[..id.len().min(12)]),
        )
        .await?;
    }
    Ok(Action::requeue(REFRESH))
}
