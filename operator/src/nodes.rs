//! `StorageNode` objects: one per member of the pool, so `kubectl get sfnode` shows the nodes
//! with their standing, reputation, capacity, slots and earnings.
//!
//! The coordinator is the truth; these are its view, written by the leader at most every
//! [`EVERY`], only for members whose view changed, at most [`MAX_WRITES`] objects per pass (the
//! rest follow in the next passes), and deleted when a member leaves. They are owned by the
//! StoragePool, so they go with it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use shardfarm_core::identity::NodeId;
use shardfarm_crds::{StorageNode, StorageNodeStatus};

use crate::api_rules::label_value;
use crate::controller::{Fabric, MANAGER};

/// How often the views are refreshed.
pub const EVERY: Duration = Duration::from_secs(30);
/// Most objects written per pass: a pool of thousands of nodes does not flood the API.
pub const MAX_WRITES: usize = 50;

/// The name of the StorageNode of `node` in `pool`.
pub fn name(pool: &str, node: &NodeId) -> String {
    format!("{pool}-{}", node.short())
}

/// The writer of one pool's StorageNodes.
pub struct NodeViews {
    api: Api<StorageNode>,
    pool: String,
    owner: Option<OwnerReference>,
    /// What was last written, per member (None before the first pass read what exists).
    written: Option<HashMap<NodeId, StorageNodeStatus>>,
}

impl NodeViews {
    /// The views of `pool` in `api`'s namespace, owned by `owner` (the StoragePool).
    pub fn new(api: Api<StorageNode>, pool: &str, owner: Option<OwnerReference>) -> Self {
        NodeViews { api, pool: pool.into(), owner, written: None }
    }

    /// Brings the objects in line with `fabric`'s members; returns the objects written or
    /// deleted.
    pub async fn pass(&mut self, fabric: &dyn Fabric) -> Result<usize, kube::Error> {
        let members = fabric.members(&self.pool);
        let layout = fabric.layout(&self.pool);
        let slots: BTreeMap<NodeId, usize> = layout.as_ref().map(|l| l.loads()).unwrap_or_default();
        let now = shardfarm_core::auth::now_ms();
        let written = match self.written.take() {
            Some(w) => w,
            None => {
                // The first pass: objects an earlier leader wrote, whatever their state.
                let lp = ListParams::default()
                    .labels(&format!("shardfarm.io/pool={}", label_value(&self.pool)));
                let mut w = HashMap::new();
                for o in self.api.list(&lp).await?.items {
                    if let Ok(id) = NodeId::from_hex(&o.spec.node_id) {
                        w.insert(id, o.status.unwrap_or_default());
                    }
                }
                w
            }
        };
        let mut written = written;
        let mut changes = 0;
        let pp = PatchParams::apply(MANAGER).force();
        let mut ordered: Vec<_> = members.iter().collect();
        ordered.sort_by_key(|m| m.id);
        for m in ordered {
            let status = StorageNodeStatus {
                farm: m.farm(),
                domain: m.domain.clone(),
                domain_from: m.domain_from.clone(),
                standing: m.standing.as_str().into(),
                up: m.up,
                draining: m.draining,
                in_sync: layout.as_ref().is_some_and(|l| m.in_sync(l.version)),
                audit_score: (m.audit.score() * 1000.0).round() / 1000.0,
                uptime: (m.uptime.ratio(now) * 1000.0).round() / 1000.0,
                audits_passed: m.audits_passed,
                audits_failed: m.audits_failed,
                capacity: shardfarm_core::human_bytes(m.offered_bytes),
                used: shardfarm_core::human_bytes(m.used_bytes),
                slots: slots.get(&m.id).copied().unwrap_or(0) as u64,
                earnings: fabric.earnings(&self.pool, &m.id),
                // To the minute: a heartbeat alone does not rewrite the object.
                last_seen: k8s_openapi::jiff::Timestamp::from_millisecond(
                    (m.last_seen_ms / 60_000 * 60_000) as i64,
                )
                .ok()
                .map(|t| t.to_string()),
            };
            if written.get(&m.id) == Some(&status) {
                continue;
            }
            if changes == MAX_WRITES {
                break;
            }
            let name = name(&self.pool, &m.id);
            let object = json!({
                "apiVersion": "shardfarm.io/v1alpha1",
                "kind": "StorageNode",
                "metadata": {
                    "name": name,
                    "labels": { "shardfarm.io/pool": label_value(&self.pool), "app.kubernetes.io/managed-by": MANAGER },
                    "ownerReferences": self.owner.iter().collect::<Vec<_>>(),
                },
                "spec": { "poolRef": self.pool, "nodeId": m.id.to_hex() },
            });
            self.api.patch(&name, &pp, &Patch::Apply(object)).await?;
            let patch = json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "StorageNode", "status": status });
            self.api.patch_status(&name, &pp, &Patch::Apply(patch)).await?;
            written.insert(m.id, status);
            changes += 1;
        }
        // Members that left.
        let gone: Vec<NodeId> =
            written.keys().filter(|id| !members.iter().any(|m| m.id == **id)).copied().collect();
        for id in gone {
            match self.api.delete(&name(&self.pool, &id), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    self.written = Some(written);
                    return Err(e);
                }
            }
            written.remove(&id);
            changes += 1;
        }
        self.written = Some(written);
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{NS, TestFabric, expect, member, serve};
    use http::Method;
    use kube::Client;
    use tower_test::mock;

    /// A StorageNode as the API server holds it (a status patch is answered with it).
    fn object(id: &NodeId) -> serde_json::Value {
        json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "StorageNode",
                "metadata": { "name": name("main", id), "namespace": NS },
                "spec": { "poolRef": "main", "nodeId": id.to_hex() } })
    }

    fn deleted() -> serde_json::Value {
        json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success" })
    }

    fn path(name: &str) -> String {
        format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/storagenodes{name}")
    }

    #[tokio::test]
    async fn one_object_per_member_written_when_it_changes_and_deleted_when_it_leaves() {
        let fabric = TestFabric::default();
        let a = member("a", "z0", &[("farm", "rack-a")]);
        let b = member("b", "z1", &[]);
        *fabric.members.lock().unwrap() = vec![a.clone(), b.clone()];
        let (svc, handle) = mock::pair();
        let api = Api::namespaced(Client::new(svc, NS), NS);
        let mut views = NodeViews::new(api, "main", None);
        let (first, second) = if a.id < b.id { (&a, &b) } else { (&b, &a) };
        let (na, nb) = (name("main", &first.id), name("main", &second.id));
        let (first, second) = (first.clone(), second.clone());
        let gone = name("main", &b.id);
        let stale = NodeId([9; 32]);
        let list = json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "StorageNodeList", "metadata": {},
            "items": [{ "apiVersion": "shardfarm.io/v1alpha1", "kind": "StorageNode",
                        "metadata": { "name": name("main", &stale), "namespace": NS },
                        "spec": { "poolRef": "main", "nodeId": stale.to_hex() } }] });
        let a_hex = a.id.to_hex();
        let server = serve(
            handle,
            vec![
                // First pass: what exists, both members written (object, then status), and the
                // object of a node that is no longer a member deleted.
                expect(Method::GET, path("")).reply(list),
                expect(Method::PATCH, path(&format!("/{na}"))),
                expect(Method::PATCH, path(&format!("/{na}/status"))).onto(object(&first.id)),
                expect(Method::PATCH, path(&format!("/{nb}"))),
                expect(Method::PATCH, path(&format!("/{nb}/status"))).onto(object(&second.id)),
                expect(Method::DELETE, path(&format!("/{}", name("main", &stale))))
                    .reply(deleted()),
                // Third pass: a's standing changed (only a is written); b left (deleted).
                expect(Method::PATCH, path(&format!("/{}", name("main", &a.id)))).body(move |o| {
                    assert_eq!(o["spec"]["nodeId"], a_hex);
                }),
                expect(Method::PATCH, path(&format!("/{}/status", name("main", &a.id))))
                    .onto(object(&a.id))
                    .body(|o| {
                        assert_eq!(o["status"]["standing"], "suspended");
                        assert_eq!(o["status"]["farm"], "rack-a");
                    }),
                expect(Method::DELETE, path(&format!("/{gone}"))).reply(deleted()),
            ],
        );
        assert_eq!(views.pass(&fabric).await.unwrap(), 3);
        // Nothing changed: nothing written.
        assert_eq!(views.pass(&fabric).await.unwrap(), 0);
        {
            let mut ms = fabric.members.lock().unwrap();
            ms[0].standing = shardfarm_coordinator::economics::Standing::Suspended;
            ms.remove(1);
        }
        assert_eq!(views.pass(&fabric).await.unwrap(), 2);
        server.await.unwrap();
    }
}
