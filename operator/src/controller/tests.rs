//! Reconciler tests against a mocked API server: each asserts the exact requests a reconcile
//! makes, in order, and what it asks of the fabric.

use std::sync::Arc;

use http::Method;
use serde_json::{Value, json};
use shardfarm_core::identity::NodeId;
use shardfarm_core::placement;
use shardfarm_crds::{MiningFarm, NodeSyndication, ShardPlacement, StoragePool};

use super::fixtures::*;
use super::{FARM_FINALIZER, farm, placement as sp, pool, syndication};

fn farm_json(replicas: i32) -> Value {
    meta(
        json!({
            "apiVersion": "shardfarm.io/v1alpha1", "kind": "MiningFarm",
            "spec": {
                "poolRef": { "name": "main" }, "replicas": replicas, "zone": "rack-a",
                "agent": { "image": "shardfarm:0.1", "storage": { "size": "100Gi" } },
            },
        }),
        "alpha",
    )
}

fn farm_obj(replicas: i32, finalized: bool) -> MiningFarm {
    let mut f: MiningFarm = serde_json::from_value(farm_json(replicas)).unwrap();
    if finalized {
        f.metadata.finalizers = Some(vec![FARM_FINALIZER.into()]);
    }
    f
}

fn sts(replicas: i32, ready: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": { "name": "alpha", "namespace": NS },
        "spec": {
            "replicas": replicas, "serviceName": "alpha-agents", "podManagementPolicy": "Parallel",
            "selector": { "matchLabels": { "app.kubernetes.io/instance": "alpha", "shardfarm.io/farm": "alpha" } },
            "template": {},
            "volumeClaimTemplates": [{
                "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": { "name": "data" },
                "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "100Gi" } } },
            }],
        },
        "status": { "replicas": replicas, "readyReplicas": ready },
    })
}

/// The requests of an apply pass after the StatefulSet GET: Service, PDB, StatefulSet, status.
fn apply_pass(
    current: Option<Value>,
    check_sts: impl FnOnce(&Value) + Send + 'static,
    check_status: impl FnOnce(&Value) + Send + 'static,
) -> Vec<Expect> {
    let new = current.is_none();
    let get = expect(Method::GET, "/apis/apps/v1/namespaces/farms/statefulsets/alpha");
    let get = match current {
        Some(s) => get.reply(s),
        None => get.not_found(),
    };
    let mut script = farm_key_requests(new);
    script.extend([
        get,
        expect(Method::PATCH, "/api/v1/namespaces/farms/services/alpha-agents").body(|b| {
            assert_eq!(b["spec"]["clusterIP"], "None");
            assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "MiningFarm");
        }),
        expect(Method::PATCH, "/apis/policy/v1/namespaces/farms/poddisruptionbudgets/alpha")
            .body(|b| assert_eq!(b["spec"]["maxUnavailable"], 1)),
        expect(Method::PATCH, "/apis/apps/v1/namespaces/farms/statefulsets/alpha").body(check_sts),
        namespace_read(None),
        expect(Method::PATCH, format!("{}/status", sf_path("miningfarms", "alpha")))
            .onto(farm_json(1))
            .body(check_status),
    ]);
    script
}

/// The farm's namespace read for its Pod Security level (`enforce`: its label, if any).
fn namespace_read(enforce: Option<&str>) -> Expect {
    let mut ns = json!({ "apiVersion": "v1", "kind": "Namespace",
                         "metadata": { "name": NS, "labels": { "kubernetes.io/metadata.name": NS } } });
    if let Some(level) = enforce {
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] = json!(level);
    }
    expect(Method::GET, format!("/api/v1/namespaces/{NS}")).reply(ns)
}

/// The key of farm `alpha` the tests' API server holds.
fn farm_key() -> shardfarm_core::identity::Identity {
    shardfarm_core::identity::Identity::from_parts(
        ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        0,
    )
}

fn farm_key_path() -> String {
    format!("/api/v1/namespaces/{NS}/secrets/shardfarm-farm-key-alpha")
}

/// The farm key's Secret: read, or for a new farm created (immutable, owned by the farm).
fn farm_key_requests(new: bool) -> Vec<Expect> {
    let mut secret = serde_json::to_value(crate::pool_key::secret("x", &farm_key())).unwrap();
    secret["metadata"]["name"] = json!("shardfarm-farm-key-alpha");
    if !new {
        return vec![expect(Method::GET, farm_key_path()).reply(secret)];
    }
    vec![
        expect(Method::GET, farm_key_path()).not_found(),
        expect(Method::POST, format!("/api/v1/namespaces/{NS}/secrets")).body(|b| {
            assert_eq!(b["metadata"]["name"], "shardfarm-farm-key-alpha");
            assert_eq!(b["immutable"], true);
            assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "MiningFarm");
            assert_eq!(b["metadata"]["labels"]["shardfarm.io/farm"], "alpha");
        }),
    ]
}

#[tokio::test]
async fn a_new_farm_gets_its_finalizer_then_agents_service_and_budget() {
    let fabric = Arc::new(TestFabric::default());
    let (ctx, handle) = context(fabric.clone());
    // First pass: only the finalizer is added (JSON patch on the object).
    let script = vec![
        expect(Method::PATCH, sf_path("miningfarms", "alpha"))
            .body(|b| {
                let ops = b.as_array().unwrap();
                assert!(
                    ops.iter().any(|op| op["op"] == "add" && op["path"] == "/metadata/finalizers"),
                    "{b}"
                );
                assert!(b.to_string().contains(FARM_FINALIZER));
            })
            .reply(serde_json::to_value(farm_obj(3, true)).unwrap()),
    ];
    run(handle, script, farm::reconcile(Arc::new(farm_obj(3, false)), ctx)).await.unwrap();

    // Second pass, finalized: StatefulSet of 3 agents with their volume, zone and coordinator.
    let (ctx, handle) = context(fabric.clone());
    let script = apply_pass(
        None,
        |b| {
            assert_eq!(b["spec"]["replicas"], 3);
            assert_eq!(b["spec"]["serviceName"], "alpha-agents");
            let args = b["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
            assert!(
                args.contains("--zone=rack-a")
                    && args.contains("--coordinator=shardfarm-coordinator.farms.svc:7398"),
                "{args}"
            );
            assert!(
                args.contains("--label=farm=alpha") && args.contains("--capacity=100GiB"),
                "{args}"
            );
            // The pool's settings, as its coordinator runs them.
            assert!(
                args.contains("--partitions=512")
                    && args.contains("--identity-difficulty=26")
                    && args.contains("--pool-difficulty=26"),
                "{args}"
            );
            let pod = &b["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["fsGroup"], 65532);
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            assert_eq!(pod["containers"][0]["startupProbe"]["httpGet"]["path"], "/healthz");
            // The farm key reaches the agents from its Secret, as an environment variable.
            let env = &b["spec"]["template"]["spec"]["containers"][0]["env"];
            let key =
                env.as_array().unwrap().iter().find(|e| e["name"] == "SHARDFARM_FARM_KEY_TEXT");
            assert_eq!(
                key.unwrap()["valueFrom"]["secretKeyRef"]["name"],
                "shardfarm-farm-key-alpha",
                "{env}"
            );
            assert_eq!(
                b["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
                "100Gi"
            );
        },
        |b| {
            let st = &b["status"];
            assert_eq!(st["replicas"], 3);
            assert_eq!(st["readyReplicas"], 0);
            assert_eq!(st["selector"], "app.kubernetes.io/instance=alpha,shardfarm.io/farm=alpha");
            assert_eq!(st["observedGeneration"], 1);
            let ready =
                st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
            assert_eq!(
                (ready["status"].as_str(), ready["message"].as_str()),
                (Some("False"), Some("0 of 3 agents ready"))
            );
        },
    );
    run(handle, script, farm::reconcile(Arc::new(farm_obj(3, true)), ctx)).await.unwrap();
    // The pool now trusts the farm's key, and assigns its agents the farm's name and zone.
    let farms = fabric.farms.lock().unwrap();
    let (_, labels) = farms.iter().next().expect("the farm is registered with the pool");
    assert_eq!((labels["farm"].as_str(), labels["zone"].as_str()), ("alpha", "rack-a"));
}

#[tokio::test]
async fn scaling_up_grows_the_statefulset_at_once() {
    let fabric = Arc::new(TestFabric::default());
    let (ctx, handle) = context(fabric.clone());
    let script = apply_pass(
        Some(sts(3, 3)),
        |b| assert_eq!(b["spec"]["replicas"], 5),
        |b| {
            assert_eq!(b["status"]["replicas"], 5);
            assert!(b["status"]["draining"].is_null());
        },
    );
    run(handle, script, farm::reconcile(Arc::new(farm_obj(5, true)), ctx)).await.unwrap();
    assert!(fabric.drained.lock().unwrap().is_empty());
}

#[tokio::test]
async fn scaling_down_drains_the_highest_ordinal_before_removing_it() {
    let fabric = Arc::new(TestFabric::default());
    let leaving = member("alpha-2", "rack-a", &[("farm", "alpha"), ("pod", "alpha-2")]);
    let staying = member("alpha-1", "rack-a", &[("farm", "alpha"), ("pod", "alpha-1")]);
    let elsewhere = member("beta-0", "rack-b", &[("farm", "beta"), ("pod", "beta-0")]);
    *fabric.members.lock().unwrap() = vec![leaving.clone(), staying.clone(), elsewhere];
    // RS(1,1) over two racks: the pool holds its profile without the leaving agent.
    *fabric.config.lock().unwrap() =
        Some(shardfarm_coordinator::PoolConfig { k: 1, m: 1, partitions: 4, ..test_config() });
    // The leaving node holds slots in the current layout.
    *fabric.layout.lock().unwrap() = Some(placement::Layout {
        version: 4,
        k: 1,
        m: 1,
        partitions: vec![vec![leaving.id, staying.id]],
    });
    let (ctx, handle) = context(fabric.clone());
    let mut script = apply_pass(
        Some(sts(3, 3)),
        |b| assert_eq!(b["spec"]["replicas"], 3, "nothing removed while draining"),
        |b| {
            assert_eq!(b["status"]["draining"], 2);
            let p = b["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Progressing")
                .unwrap()
                .clone();
            assert_eq!(
                (p["status"].as_str(), p["reason"].as_str()),
                (Some("True"), Some("Draining"))
            );
        },
    );
    // The Draining event comes before the StatefulSet apply.
    script.insert(
        script.len() - 3,
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(b["reason"], "Draining");
            assert!(b["note"].as_str().unwrap().contains("alpha-2"));
        }),
    );
    run(handle, script, farm::reconcile(Arc::new(farm_obj(2, true)), ctx)).await.unwrap();
    assert_eq!(*fabric.drained.lock().unwrap(), vec![leaving.id]);

    // Its slots were rebuilt elsewhere and the layout is in sync: now the StatefulSet shrinks.
    *fabric.layout.lock().unwrap() = Some(placement::Layout {
        version: 5,
        k: 1,
        m: 1,
        partitions: vec![vec![staying.id, staying.id]],
    });
    let (ctx, handle) = context(fabric.clone());
    let script = apply_pass(
        Some(sts(3, 3)),
        |b| assert_eq!(b["spec"]["replicas"], 2),
        |b| {
            assert_eq!(b["status"]["replicas"], 2);
            assert!(b["status"]["draining"].is_null());
        },
    );
    let mut f = farm_obj(2, true);
    f.status = Some(shardfarm_crds::MiningFarmStatus { draining: Some(2), ..Default::default() });
    run(handle, script, farm::reconcile(Arc::new(f), ctx)).await.unwrap();
    assert_eq!(fabric.drained.lock().unwrap().len(), 1, "drained once only");
}

/// The six agents of farm `alpha` in three zones: all RS(4,2) has, and nothing more.
fn six_agents_of_alpha() -> Vec<shardfarm_coordinator::Member> {
    (0..6)
        .map(|i| {
            let pod = format!("alpha-{i}");
            member(&pod, &format!("z{}", i % 3), &[("farm", "alpha"), ("pod", &pod)])
        })
        .collect()
}

fn deleted(mut f: MiningFarm) -> MiningFarm {
    f.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    f
}

fn finalizer_removed() -> Expect {
    expect(Method::PATCH, sf_path("miningfarms", "alpha"))
        .body(|b| {
            let ops = b.as_array().unwrap();
            assert!(
                ops.iter().any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"),
                "{b}"
            );
        })
        .reply(serde_json::to_value(farm_obj(1, false)).unwrap())
}

#[tokio::test]
async fn a_deleted_farm_takes_its_nodes_out_of_the_pool_then_drops_its_finalizer() {
    let fabric = Arc::new(TestFabric::default());
    let mine = member("alpha-0", "rack-a", &[("farm", "alpha"), ("pod", "alpha-0")]);
    let others: Vec<_> = ["b", "c"]
        .iter()
        .map(|r| member(&format!("{r}-0"), &format!("rack-{r}"), &[("farm", r), ("pod", "x")]))
        .collect();
    let mut all = vec![mine.clone()];
    all.extend(others);
    *fabric.members.lock().unwrap() = all;
    *fabric.config.lock().unwrap() =
        Some(shardfarm_coordinator::PoolConfig { k: 1, m: 1, partitions: 4, ..test_config() });
    fabric.farms.lock().unwrap().insert(farm_key().id(), Default::default());
    let (ctx, handle) = context(fabric.clone());
    let pool = serde_json::to_value(pool_obj(1, 1)).unwrap();
    let mut script = vec![expect(Method::GET, sf_path("storagepools", "main")).reply(pool)];
    script.extend(farm_key_requests(false));
    script.extend([
        expect(Method::POST, events_path()).body(|b| assert_eq!(b["reason"], "FarmDeleted")),
        finalizer_removed(),
    ]);
    run(handle, script, farm::reconcile(Arc::new(deleted(farm_obj(1, true))), ctx)).await.unwrap();
    assert_eq!(*fabric.removed.lock().unwrap(), vec![mine.id]);
    assert!(fabric.farms.lock().unwrap().is_empty(), "the farm's key still vouches");
}

#[tokio::test]
async fn a_deletion_the_pool_cannot_survive_is_held_with_the_reason() {
    let fabric = Arc::new(TestFabric::default());
    // Six agents of RS(4,2) in this farm and nowhere else: without them, nothing.
    let mine = six_agents_of_alpha();
    *fabric.members.lock().unwrap() = mine;
    let (ctx, handle) = context(fabric.clone());
    let pool = serde_json::to_value(pool_obj(4, 2)).unwrap();
    let script = vec![
        expect(Method::GET, sf_path("storagepools", "main")).reply(pool),
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(
                (b["reason"].as_str(), b["type"].as_str()),
                (Some("DeletionHeld"), Some("Warning"))
            );
            assert!(b["note"].as_str().unwrap().contains("cannot hold its profile"), "{b}");
        }),
    ];
    // No finalizer removal: the farm stays until capacity elsewhere can take its slots.
    let r = run(handle, script, farm::reconcile(Arc::new(deleted(farm_obj(1, true))), ctx)).await;
    assert!(r.unwrap_err().to_string().contains("deletion held"));
    assert!(fabric.removed.lock().unwrap().is_empty());
}

/// Issue 28: an operator restarted (or failed over) between a held deletion and its next
/// reconcile ran the cleanup before the pool's coordinator was registered, saw no members, and
/// let the farm go. Restarted here: a fresh operator fabric that runs pool `main` (as
/// `run::lead` declares before starting the farm controller) but whose coordinator has not
/// started. The deletion stays held, and says why.
#[tokio::test]
async fn a_held_deletion_stays_held_across_an_operator_restart() {
    let fabric = Arc::new(TestFabric::default());
    *fabric.members.lock().unwrap() = six_agents_of_alpha();
    let pool = serde_json::to_value(pool_obj(4, 2)).unwrap();
    let (ctx, handle) = context(fabric.clone());
    let script = vec![
        expect(Method::GET, sf_path("storagepools", "main")).reply(pool.clone()),
        expect(Method::POST, events_path()).body(|b| assert_eq!(b["reason"], "DeletionHeld")),
    ];
    let r = run(handle, script, farm::reconcile(Arc::new(deleted(farm_obj(1, true))), ctx)).await;
    assert!(r.unwrap_err().to_string().contains("deletion held"));

    // The restart: the operator's own fabric, the pool declared, its coordinator not yet up.
    let restarted = Arc::new(crate::fabric::Coordinators::default());
    restarted.expect("main");
    let (ctx, handle) = context_over(restarted.clone());
    let script = vec![
        expect(Method::GET, sf_path("storagepools", "main")).reply(pool.clone()),
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(
                (b["reason"].as_str(), b["type"].as_str()),
                (Some("DeletionWaiting"), Some("Normal"))
            );
            assert!(b["note"].as_str().unwrap().contains("coordinator has not started"), "{b}");
        }),
        // No finalizer removal.
    ];
    let r = run(handle, script, farm::reconcile(Arc::new(deleted(farm_obj(1, true))), ctx)).await;
    let err = r.unwrap_err().to_string();
    assert!(err.contains("deletion waits"), "{err}");

    // Coordinator registered but its members not heard from yet (any fabric that says its
    // view is incomplete): still held, nothing removed.
    *fabric.incomplete.lock().unwrap() =
        Some("pool main's coordinator started 2s ago and has heard from 0 of its 6 members".into());
    let (ctx, handle) = context(fabric.clone());
    let script = vec![
        expect(Method::GET, sf_path("storagepools", "main")).reply(pool),
        expect(Method::POST, events_path()).body(|b| assert_eq!(b["reason"], "DeletionWaiting")),
    ];
    let r = run(handle, script, farm::reconcile(Arc::new(deleted(farm_obj(1, true))), ctx)).await;
    assert!(r.is_err());
    assert!(fabric.removed.lock().unwrap().is_empty(), "nodes removed from an incomplete view");
}

#[tokio::test]
async fn scale_down_and_drains_wait_for_a_complete_view() {
    let fabric = Arc::new(TestFabric::default());
    let mine = six_agents_of_alpha();
    *fabric.members.lock().unwrap() = mine.clone();
    *fabric.incomplete.lock().unwrap() = Some("pool main's coordinator has not started".into());
    // 6 → 5: nothing drained or removed, the condition says why.
    let (ctx, handle) = context(fabric.clone());
    let script = apply_pass(
        Some(sts(6, 6)),
        |b| assert_eq!(b["spec"]["replicas"], 6, "nothing removed"),
        |b| {
            let held = b["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "ScaleDownHeld")
                .unwrap()
                .clone();
            assert_eq!(
                (held["status"].as_str(), held["reason"].as_str()),
                (Some("True"), Some("ViewIncomplete"))
            );
            assert!(held["message"].as_str().unwrap().contains("has not started"), "{held}");
        },
    );
    run(handle, script, farm::reconcile(Arc::new(farm_obj(5, true)), ctx)).await.unwrap();
    assert!(fabric.drained.lock().unwrap().is_empty());

    // A ShardPlacement whose drain list changed while the view is incomplete: no drain, no
    // undrain, and the drained list it had is kept (not forgotten as "no such member").
    let was = mine[0].id;
    let mut v = meta(
        json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "ShardPlacement",
                "spec": { "poolRef": "main", "partitions": 64, "drain": [mine[1].id.to_hex()] } }),
        "main",
    );
    v["status"] = json!({ "layoutVersion": 0, "drained": [was.to_hex()] });
    let obj: ShardPlacement = serde_json::from_value(v).unwrap();
    let (ctx, handle) = context(fabric.clone());
    let script = vec![
        expect(Method::PATCH, format!("{}/status", sf_path("shardplacements", "main")))
            .onto(serde_json::to_value(&obj).unwrap())
            .body(move |b| {
                assert_eq!(b["status"]["drained"], json!([was.to_hex()]));
                let c = b["status"]["conditions"].as_array().unwrap();
                let view = c.iter().find(|c| c["type"] == "ViewComplete").unwrap();
                assert_eq!(view["status"], "False", "{view}");
            }),
    ];
    run(handle, script, sp::reconcile(Arc::new(obj), ctx)).await.unwrap();
    assert!(fabric.drained.lock().unwrap().is_empty());
    assert!(fabric.undrained.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_farm_whose_name_cannot_name_its_agents_is_refused_before_anything_is_written() {
    let fabric = Arc::new(TestFabric::default());
    for name in ["rack.a", "1rack", &"a".repeat(53)] {
        let mut f = farm_json(1);
        f["metadata"]["name"] = json!(name);
        let mut farm: MiningFarm = serde_json::from_value(f).unwrap();
        farm.metadata.finalizers = Some(vec![FARM_FINALIZER.into()]);
        let (ctx, handle) = context(fabric.clone());
        let script = vec![expect(Method::POST, events_path()).body(|b| {
            assert_eq!(b["reason"], "InvalidFarm");
            assert!(b["note"].as_str().unwrap().contains("starting with a letter"), "{b}");
        })];
        let r = run(handle, script, farm::reconcile(Arc::new(farm), ctx)).await;
        assert!(r.is_err(), "{name}");
    }
    assert!(farm::check_name(&"a".repeat(farm::MAX_FARM_NAME)).is_ok());
}

#[tokio::test]
async fn namespace_deletion_completes_even_when_events_cannot_be_created() {
    let fabric = Arc::new(TestFabric::default());
    let mine = six_agents_of_alpha();
    *fabric.members.lock().unwrap() = mine;
    let (ctx, handle) = context(fabric.clone());
    let terminating =
        "unable to create new content in namespace farms because it is being terminated";
    let script = vec![
        // The pool went first: nothing to hold the farm for.
        expect(Method::GET, sf_path("storagepools", "main")).not_found(),
        // The farm key Secret is already gone, and events cannot be created.
        expect(Method::GET, farm_key_path()).not_found(),
        expect(Method::POST, events_path()).forbidden(terminating),
        finalizer_removed(),
    ];
    run(handle, script, farm::reconcile(Arc::new(deleted(farm_obj(1, true))), ctx)).await.unwrap();
    assert_eq!(fabric.removed.lock().unwrap().len(), 6);
}

#[tokio::test]
async fn a_scale_down_the_pool_cannot_survive_is_held_and_a_drain_is_undone_on_scale_up() {
    let fabric = Arc::new(TestFabric::default());
    let mine = six_agents_of_alpha();
    *fabric.members.lock().unwrap() = mine.clone();
    let partitions = vec![mine.iter().map(|m| m.id).collect::<Vec<_>>()];
    *fabric.layout.lock().unwrap() = Some(placement::Layout { version: 2, k: 4, m: 2, partitions });
    // 6 → 5 on RS(4,2): refused, with a Warning and a condition that say why.
    let (ctx, handle) = context(fabric.clone());
    let mut script = apply_pass(
        Some(sts(6, 6)),
        |b| assert_eq!(b["spec"]["replicas"], 6, "nothing removed"),
        |b| {
            let held = b["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "ScaleDownHeld")
                .unwrap()
                .clone();
            assert_eq!(held["status"], "True", "{held}");
            assert!(
                held["message"].as_str().unwrap().contains("cannot hold its profile"),
                "{held}"
            );
            assert!(b["status"]["draining"].is_null());
        },
    );
    script.insert(
        script.len() - 3,
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(
                (b["reason"].as_str(), b["type"].as_str()),
                (Some("ScaleDownHeld"), Some("Warning"))
            );
        }),
    );
    run(handle, script, farm::reconcile(Arc::new(farm_obj(5, true)), ctx)).await.unwrap();
    assert!(fabric.drained.lock().unwrap().is_empty(), "a drain that could never end was started");

    // A drain left from before (alpha-5 draining) is undone when the farm wants 6 again.
    fabric.members.lock().unwrap()[5].draining = true;
    let (ctx, handle) = context(fabric.clone());
    let mut script = apply_pass(Some(sts(6, 6)), |b| assert_eq!(b["spec"]["replicas"], 6), |_| {});
    script.insert(
        script.len() - 3,
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(b["reason"], "Undrained");
            assert!(b["note"].as_str().unwrap().contains("alpha-5"), "{b}");
        }),
    );
    run(handle, script, farm::reconcile(Arc::new(farm_obj(6, true)), ctx)).await.unwrap();
    assert_eq!(*fabric.undrained.lock().unwrap(), vec![mine[5].id]);
    assert!(!fabric.members.lock().unwrap()[5].draining);
}

fn pool_obj(k: u16, m: u16) -> StoragePool {
    serde_json::from_value(meta(
        json!({
            "apiVersion": "shardfarm.io/v1alpha1", "kind": "StoragePool",
            "spec": { "erasure": { "dataShards": k, "parityShards": m } },
        }),
        "main",
    ))
    .unwrap()
}

/// The pool's own read at the start of a pass: the API server holds `pool`.
fn pool_read(pool: &StoragePool) -> Expect {
    expect(Method::GET, sf_path("storagepools", &pool.metadata.name.clone().unwrap()))
        .reply(serde_json::to_value(pool).unwrap())
}

#[tokio::test]
async fn a_pool_its_farms_cannot_hold_is_degraded_with_the_exact_reason() {
    let fabric = Arc::new(TestFabric::default());
    let (ctx, handle) = context(fabric);
    // Two farms of 10 agents in two zones cannot hold RS(10,4).
    let mut a = farm_json(10);
    let mut b = farm_json(10);
    b["metadata"]["name"] = json!("beta");
    b["spec"]["zone"] = json!("rack-b");
    a["metadata"]["namespace"] = json!(NS);
    let list = json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "MiningFarmList", "metadata": {}, "items": [a, b] });
    let reason = "RS(10,4) needs 14 zones, or at least 4 zones holding at most 4 shards each; 2 zones have capacity";
    let script = vec![
        pool_read(&pool_obj(10, 4)),
        expect(Method::GET, format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/miningfarms"))
            .reply(list),
        expect(Method::GET, format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/nodesyndications"))
            .reply(json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "NodeSyndicationList", "metadata": {}, "items": [] })),
        expect(Method::PATCH, sf_path("shardplacements", "main")).body(|b| {
            assert_eq!(b["spec"]["poolRef"], "main");
            assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "StoragePool");
        }),
        expect(Method::PATCH, format!("{}/status", sf_path("storagepools", "main")))
            .onto(serde_json::to_value(pool_obj(10, 4)).unwrap())
            .body(move |b| {
                assert_eq!(b["status"]["phase"], "Degraded");
                assert_eq!(b["status"]["profile"], "RS(10,4)");
                let d = b["status"]["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["type"] == "Degraded")
                    .unwrap()
                    .clone();
                assert_eq!(
                    (d["status"].as_str(), d["message"].as_str()),
                    (Some("True"), Some(reason))
                );
            }),
        expect(Method::POST, events_path()).body(move |b| {
            assert_eq!(
                (b["reason"].as_str(), b["type"].as_str()),
                (Some("ProfileUnsatisfiable"), Some("Warning"))
            );
            assert_eq!(b["note"], reason);
        }),
    ];
    run(handle, script, pool::reconcile(Arc::new(pool_obj(10, 4)), ctx)).await.unwrap();
}

#[tokio::test]
async fn a_pool_is_ready_only_when_its_live_members_hold_the_profile() {
    let fabric = Arc::new(TestFabric::default());
    // A syndication's rule the coordinator still has, though the syndication was deleted: the
    // pool recomputes the rules from the syndications that exist (none) and the way in closes.
    *fabric.admission.lock().unwrap() = Some(shardfarm_coordinator::Admission {
        rules: vec![shardfarm_coordinator::AdmissionRule {
            name: "gone".into(),
            ..Default::default()
        }],
        domains: Default::default(),
    });
    let (ctx, handle) = context(fabric.clone());
    let zones = ["a", "b", "c"];
    let items: Vec<Value> = zones
        .iter()
        .map(|z| {
            let mut f = farm_json(2);
            f["metadata"]["name"] = json!(format!("farm-{z}"));
            f["spec"]["zone"] = json!(z);
            f
        })
        .collect();
    let list = json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "MiningFarmList", "metadata": {}, "items": items });
    let pass = |check: fn(&Value)| {
        vec![
            pool_read(&pool_obj(4, 2)),
            expect(Method::GET, format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/miningfarms"))
                .reply(list.clone()),
            expect(Method::GET, format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/nodesyndications"))
                .reply(json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "NodeSyndicationList", "metadata": {}, "items": [] })),
            expect(Method::PATCH, sf_path("shardplacements", "main")),
            expect(Method::PATCH, format!("{}/status", sf_path("storagepools", "main")))
                .onto(serde_json::to_value(pool_obj(4, 2)).unwrap())
                .body(check),
        ]
    };
    // Farms that could hold the profile are applied, but no agent has joined yet: Pending,
    // not Ready (the status follows live members, not spec.replicas).
    let script = pass(|b| {
        assert_eq!(b["status"]["phase"], "Pending", "{b}");
        assert_eq!(b["status"]["nodesReady"], 0);
        let ready = &b["status"]["conditions"][0];
        assert_eq!(ready["status"], "False");
        assert!(ready["message"].as_str().unwrap().contains("waiting for agents"), "{ready}");
    });
    run(handle, script, pool::reconcile(Arc::new(pool_obj(4, 2)), ctx)).await.unwrap();
    assert!(fabric.admission.lock().unwrap().as_ref().unwrap().rules.is_empty());

    // Six agents up in three zones and a published layout: Ready.
    let members: Vec<_> =
        (0..6).map(|i| member(&format!("n{i}"), zones[i % 3], &[("farm", "x")])).collect();
    *fabric.members.lock().unwrap() = members.clone();
    *fabric.layout.lock().unwrap() =
        Some(placement::Layout { version: 3, k: 4, m: 2, partitions: Vec::new() });
    let (ctx, handle) = context(fabric.clone());
    let script = pass(|b| {
        assert_eq!(b["status"]["phase"], "Ready", "{b}");
        assert_eq!(b["status"]["nodesReady"], 6);
        let msg = b["status"]["conditions"][0]["message"].as_str().unwrap().to_string();
        assert!(msg.contains("6 nodes up and in good standing"), "{msg}");
    });
    run(handle, script, pool::reconcile(Arc::new(pool_obj(4, 2)), ctx)).await.unwrap();

    // Two of them go down: the four left cannot hold RS(4,2) — Degraded, with the reason.
    for m in fabric.members.lock().unwrap().iter_mut().take(2) {
        m.up = false;
    }
    let (ctx, handle) = context(fabric.clone());
    let mut script = pass(|b| {
        assert_eq!(b["status"]["phase"], "Degraded", "{b}");
        assert_eq!(b["status"]["nodesReady"], 4);
    });
    script.push(expect(Method::POST, events_path()).body(|b| {
        assert_eq!(b["reason"], "ProfileUnsatisfiable");
        assert!(b["note"].as_str().unwrap().contains("the nodes up now cannot hold"), "{b}");
    }));
    run(handle, script, pool::reconcile(Arc::new(pool_obj(4, 2)), ctx)).await.unwrap();
}

#[tokio::test]
async fn an_outside_node_below_the_difficulty_is_refused_with_the_reason() {
    let fabric = Arc::new(TestFabric::default());
    let (ctx, handle) = context(fabric.clone());
    let good = "a".repeat(64);
    let weak = "b".repeat(64);
    let syn_json = meta(
        json!({
            "apiVersion": "shardfarm.io/v1alpha1", "kind": "NodeSyndication",
            "spec": {
                "poolRef": "main",
                "admission": { "mode": "Open", "minIdentityDifficulty": 20 },
                "staticMembers": [
                    { "nodeId": good, "identityDifficulty": 29, "address": "10.0.0.5:7400", "labels": { "zone": "edge" } },
                    { "nodeId": weak, "identityDifficulty": 12, "address": "10.0.0.6:7400" },
                ],
            },
        }),
        "edge",
    );
    let syn: NodeSyndication = serde_json::from_value(syn_json.clone()).unwrap();
    let pool = serde_json::to_value(pool_obj(4, 2)).unwrap();
    let others = meta(
        json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "NodeSyndication",
                "spec": { "poolRef": "main", "admission": { "mode": "AllowList", "minIdentityDifficulty": 30,
                          "allow": ["c".repeat(64)] } } }),
        "lab",
    );
    let list = json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "NodeSyndicationList", "metadata": {},
                       "items": [syn_json.clone(), others] });
    let script = vec![
        expect(Method::GET, sf_path("storagepools", "main")).reply(pool),
        expect(
            Method::GET,
            format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/nodesyndications"),
        )
        .reply(list),
        expect(Method::PATCH, format!("{}/status", sf_path("nodesyndications", "edge")))
            .onto(syn_json.clone())
            .body(move |b| {
                let members = b["status"]["members"].as_array().unwrap();
                // Allowed, not admitted: it has not joined.
                assert_eq!(members[0]["state"], "allowed");
                assert_eq!(members[1]["state"], "refused");
                // The pool's default difficulty (28) is higher than the syndication's (20).
                assert_eq!(
                    members[1]["reason"],
                    "identity mined to 12 bits; this syndication and its pool require 28"
                );
                assert_eq!(
                    (b["status"]["admitted"].as_u64(), b["status"]["refused"].as_u64()),
                    (Some(0), Some(1))
                );
            }),
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(
                (b["reason"].as_str(), b["type"].as_str()),
                (Some("NodeRefused"), Some("Warning"))
            );
            assert!(b["note"].as_str().unwrap().contains("12 bits"));
        }),
    ];
    run(handle, script, syndication::reconcile(Arc::new(syn), ctx)).await.unwrap();
    // The rules reach the coordinator's Join too (Open mode: no allow list).
    // Both syndications are ways in, neither overwrites the other.
    let admission = fabric.admission.lock().unwrap().clone().unwrap();
    let rules: Vec<_> = admission
        .rules
        .iter()
        .map(|r| (r.name.as_str(), r.min_difficulty, r.allow.is_some()))
        .collect();
    assert_eq!(rules, [("edge", 20, false), ("lab", 30, true)]);
    // The member the syndication labels `zone=edge` gets that domain, whatever it claims at
    // Join; the one without a label gets its owner root.
    let good_id = shardfarm_core::identity::NodeId::from_hex(&"a".repeat(64)).unwrap();
    assert_eq!(admission.domains, [(good_id, "edge".to_string())].into());
}

#[tokio::test]
async fn a_placement_mirrors_the_coordinators_layout_and_declares_drains() {
    let fabric = Arc::new(TestFabric::default());
    let members: Vec<_> =
        (0..7).map(|i| member(&format!("n{i}"), &format!("zone-{}", i % 3), &[])).collect();
    *fabric.members.lock().unwrap() = members.clone();
    let layout = placement::Layout {
        version: 4,
        k: 4,
        m: 2,
        partitions: vec![members[..6].iter().map(|m| m.id).collect()],
    };
    *fabric.layout.lock().unwrap() = Some(layout.clone());
    let drained = members[6].id;
    let placement_obj = |drain: &[NodeId], status_drained: &[NodeId]| -> ShardPlacement {
        let mut v = meta(
            json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "ShardPlacement",
                    "spec": { "poolRef": "main", "partitions": 64, "maxMovesPerRound": 32,
                              "drain": drain.iter().map(|d| d.to_hex()).collect::<Vec<_>>() } }),
            "main",
        );
        v["status"] = json!({ "layoutVersion": 3,
                              "drained": status_drained.iter().map(|d| d.to_hex()).collect::<Vec<_>>() });
        serde_json::from_value(v).unwrap()
    };
    // Drain n6 by listing it: a drain request to the coordinator, an event, the coordinator's
    // layout (version 4) mirrored into the ConfigMap and status, with its real move count.
    let obj = placement_obj(&[drained], &[]);
    let (ctx, handle) = context(fabric.clone());
    // Layout 3, mirrored before, had n6 in the last slot.
    let mut before = layout.clone();
    before.version = 3;
    before.partitions[0][5] = drained;
    let script = vec![
        expect(Method::POST, events_path()).body(|b| assert_eq!(b["reason"], "Draining")),
        expect(Method::GET, format!("/api/v1/namespaces/{NS}/configmaps/main-layout"))
            .reply(layout_mirror(&before, None)),
        expect(Method::PATCH, format!("/api/v1/namespaces/{NS}/configmaps/main-layout")).body(
            |b| {
                let l: placement::Layout =
                    serde_json::from_str(b["data"]["layout.json"].as_str().unwrap()).unwrap();
                assert_eq!(l.version, 4);
                assert_eq!(
                    (&b["data"]["movedSlots"], &b["data"]["movedFrom"]),
                    (&json!("1"), &json!("3"))
                );
            },
        ),
        expect(Method::PATCH, format!("{}/status", sf_path("shardplacements", "main")))
            .onto(serde_json::to_value(&obj).unwrap())
            .body(move |b| {
                assert_eq!(b["status"]["layoutVersion"], 4);
                // One slot changed holder from layout 3; six nodes hold one slot each.
                assert_eq!(b["status"]["movedAssignments"], 1);
                assert_eq!(b["status"]["balance"], 1.0);
                assert_eq!(b["status"]["drained"][0], drained.to_hex());
            }),
    ];
    run(handle, script, sp::reconcile(Arc::new(obj), ctx)).await.unwrap();
    assert_eq!(*fabric.drained.lock().unwrap(), vec![drained]);
    assert_eq!(*fabric.max_moves.lock().unwrap(), Some(32));

    // Removing it from the list undoes the drain; the layout is unchanged, so no ConfigMap write.
    let mut obj = placement_obj(&[], &[drained]);
    obj.status.as_mut().unwrap().layout_version = 4;
    let (ctx, handle) = context(fabric.clone());
    let script = vec![
        expect(Method::POST, events_path()).body(|b| assert_eq!(b["reason"], "Undrained")),
        expect(Method::PATCH, format!("{}/status", sf_path("shardplacements", "main")))
            .onto(serde_json::to_value(&obj).unwrap())
            .body(|b| assert!(b["status"]["drained"].is_null(), "{b}")),
    ];
    run(handle, script, sp::reconcile(Arc::new(obj), ctx)).await.unwrap();
    assert_eq!(*fabric.undrained.lock().unwrap(), vec![drained]);
}

/// The layout ConfigMap as a placement wrote it for `layout` (with the moves it recorded).
fn layout_mirror(layout: &placement::Layout, moved: Option<(u64, u64)>) -> Value {
    let mut data = json!({ "layout.json": serde_json::to_string(layout).unwrap() });
    if let Some((moved, from)) = moved {
        data["movedSlots"] = json!(moved.to_string());
        data["movedFrom"] = json!(from.to_string());
    }
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "main-layout", "namespace": NS, "resourceVersion": "77",
                      "labels": { "shardfarm.io/layout-mirror": "true" } },
        "data": data,
    })
}

/// After an operator failover the new leader has computed no layout round (the coordinator's
/// counters start at 0), yet `kubectl get sfplace` keeps showing the layout's balance and the
/// moves that made it: both come from what is persisted (the layout and members the
/// coordinator loaded from its state ConfigMap, the mirror ConfigMap, the status), whenever
/// the leader stopped.
#[tokio::test]
async fn balance_and_moves_are_recomputed_from_persisted_state_after_a_failover() {
    let fabric = Arc::new(TestFabric::default());
    let members: Vec<_> =
        (0..7).map(|i| member(&format!("n{i}"), &format!("zone-{}", i % 3), &[])).collect();
    *fabric.members.lock().unwrap() = members.clone();
    let ids: Vec<NodeId> = members.iter().map(|m| m.id).collect();
    // Layout 5, as the new leader loaded it: n0..n4 hold 2 slots, n5 and n6 one; seven nodes
    // share 12 slots, so the most loaded holds 2 / (12 / 7) = 1.167 of its share.
    let v5 = placement::Layout {
        version: 5,
        k: 4,
        m: 2,
        partitions: vec![ids[..6].to_vec(), [&ids[..5], &ids[6..7]].concat()],
    };
    *fabric.layout.lock().unwrap() = Some(v5.clone());
    let obj = |version: u64, moved: u64| -> ShardPlacement {
        let mut v = meta(
            json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "ShardPlacement",
                    "spec": { "poolRef": "main", "partitions": 2 } }),
            "main",
        );
        v["status"] =
            json!({ "layoutVersion": version, "movedAssignments": moved, "balance": 1.167 });
        serde_json::from_value(v).unwrap()
    };
    let status_path = format!("{}/status", sf_path("shardplacements", "main"));
    let cm_path = format!("/api/v1/namespaces/{NS}/configmaps/main-layout");

    // The previous leader mirrored layout 5 (3 slots moved) and wrote its status; the new one,
    // same layout, shows the same figures.
    let (ctx, handle) = context(fabric.clone());
    let script = vec![
        expect(Method::PATCH, status_path.clone())
            .onto(serde_json::to_value(obj(5, 3)).unwrap())
            .body(|b| {
                assert_eq!(b["status"]["layoutVersion"], 5);
                assert_eq!(b["status"]["movedAssignments"], 3, "{b}");
                assert_eq!(b["status"]["balance"], 1.167, "{b}");
            }),
    ];
    run(handle, script, sp::reconcile(Arc::new(obj(5, 3)), ctx)).await.unwrap();

    // Layout 6 was published while no operator led (n6 drained, its slot to n5): counted
    // from the mirror of layout 5 and recorded beside layout 6.
    let mut v6 = v5.clone();
    v6.version = 6;
    v6.partitions[1][5] = ids[5];
    fabric.members.lock().unwrap()[6].draining = true;
    *fabric.layout.lock().unwrap() = Some(v6.clone());
    let (ctx, handle) = context(fabric.clone());
    let script = vec![
        expect(Method::GET, cm_path.clone()).reply(layout_mirror(&v5, Some((3, 4)))),
        expect(Method::PATCH, cm_path.clone()).body(|b| {
            assert_eq!(
                (&b["data"]["movedSlots"], &b["data"]["movedFrom"]),
                (&json!("1"), &json!("5"))
            );
        }),
        expect(Method::PATCH, status_path.clone())
            .onto(serde_json::to_value(obj(5, 3)).unwrap())
            .body(|b| {
                assert_eq!(b["status"]["layoutVersion"], 6);
                assert_eq!(b["status"]["movedAssignments"], 1, "{b}");
                // Six nodes place now, two slots each.
                assert_eq!(b["status"]["balance"], 1.0, "{b}");
            }),
    ];
    run(handle, script, sp::reconcile(Arc::new(obj(5, 3)), ctx)).await.unwrap();

    // A leader that stopped after mirroring layout 6 but before its status: the next one
    // takes the count recorded beside it (the layout it was counted from is gone).
    let (ctx, handle) = context(fabric.clone());
    let script = vec![
        expect(Method::GET, cm_path.clone()).reply(layout_mirror(&v6, Some((1, 5)))),
        expect(Method::PATCH, cm_path.clone()).body(|b| {
            assert_eq!(
                (&b["data"]["movedSlots"], &b["data"]["movedFrom"]),
                (&json!("1"), &json!("5"))
            );
        }),
        expect(Method::PATCH, status_path.clone())
            .onto(serde_json::to_value(obj(5, 3)).unwrap())
            .body(|b| {
                assert_eq!(b["status"]["movedAssignments"], 1, "{b}");
            }),
    ];
    run(handle, script, sp::reconcile(Arc::new(obj(5, 3)), ctx)).await.unwrap();
}

#[test]
fn a_storage_pool_defaults_to_the_identity_difficulty_every_part_defaults_to() {
    let admission = shardfarm_crds::Admission::default();
    assert_eq!(admission.min_identity_difficulty, shardfarm_core::identity::DEFAULT_DIFFICULTY);
    let config = shardfarm_coordinator::PoolConfig::default();
    assert_eq!(config.min_difficulty, shardfarm_core::identity::DEFAULT_DIFFICULTY);
}

#[tokio::test]
async fn claim_templates_of_an_existing_statefulset_are_kept_and_a_change_is_reported() {
    let fabric = Arc::new(TestFabric::default());
    let (ctx, handle) = context(fabric);
    let mut existing = sts(3, 3);
    existing["spec"]["volumeClaimTemplates"] = json!([{
        "metadata": { "name": "data" },
        "spec": { "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "50Gi" } } },
    }]);
    // The farm now asks for 100Gi: the StatefulSet keeps its 50Gi templates (the API server
    // refuses any change to them), and a Warning says so.
    let mut script = apply_pass(
        Some(existing),
        |b| {
            let vct = &b["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"];
            assert_eq!(vct["storage"], "50Gi", "{b}");
        },
        |_| {},
    );
    script.insert(
        script.len() - 3,
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(
                (b["reason"].as_str(), b["type"].as_str()),
                (Some("StorageUnchanged"), Some("Warning"))
            );
            assert!(b["note"].as_str().unwrap().contains("50Gi"), "{b}");
        }),
    );
    run(handle, script, farm::reconcile(Arc::new(farm_obj(3, true)), ctx)).await.unwrap();
}

#[tokio::test]
async fn a_daemonset_farm_runs_one_agent_per_machine_on_its_disk() {
    let fabric = Arc::new(TestFabric::default());
    let mut f = farm_json(0);
    f["spec"]["mode"] = json!("DaemonSet");
    f["spec"]["agent"]["storage"] = json!({ "hostPath": "/srv/shardfarm" });
    let farm: MiningFarm = serde_json::from_value(f.clone()).unwrap();
    let mut farm = farm;
    farm.metadata.finalizers = Some(vec![FARM_FINALIZER.into()]);
    let (ctx, handle) = context(fabric.clone());
    let mut script = farm_key_requests(false);
    script.extend([
        expect(Method::PATCH, "/api/v1/namespaces/farms/services/alpha-agents"),
        expect(Method::PATCH, "/apis/policy/v1/namespaces/farms/poddisruptionbudgets/alpha"),
        expect(Method::PATCH, "/apis/apps/v1/namespaces/farms/daemonsets/alpha").body(|b| {
            let pod = &b["spec"]["template"]["spec"];
            let args = pod["containers"][0]["args"].to_string();
            assert!(args.contains("--advertise=$(POD_IP):7400"), "{args}");
            assert_eq!(pod["volumes"][0]["hostPath"]["path"], "/srv/shardfarm");
            assert_eq!(pod["containers"][0]["volumeMounts"][0]["subPathExpr"], "$(NODE_NAME)");
            assert_eq!(pod["initContainers"][0]["args"][0], "prepare-dir");
        }),
        namespace_read(Some("privileged")),
        expect(Method::PATCH, format!("{}/status", sf_path("miningfarms", "alpha")))
            .onto(f.clone())
            .body(|b| assert_eq!(b["status"]["replicas"], 0)),
    ]);
    run(handle, script, farm::reconcile(Arc::new(farm.clone()), ctx)).await.unwrap();

    // Without a host path it is refused with a Warning that says what to set.
    farm.spec.agent.storage.host_path = None;
    farm.spec.agent.storage.size = Some("10Gi".into());
    let (ctx, handle) = context(fabric);
    let mut script = farm_key_requests(false);
    script.push(expect(Method::POST, events_path()).body(|b| {
        assert_eq!(b["reason"], "InvalidFarm");
        assert!(b["note"].as_str().unwrap().contains("hostPath"), "{b}");
    }));
    let r = run(handle, script, farm::reconcile(Arc::new(farm), ctx)).await;
    assert!(r.is_err());
}

/// The env entry `name` of the agent container of a pod spec.
fn env_of<'a>(pod: &'a Value, name: &str) -> Option<&'a Value> {
    pod["containers"][0]["env"].as_array().unwrap().iter().find(|e| e["name"] == name)
}

#[tokio::test]
async fn a_host_network_farm_advertises_its_machines_address_on_its_host_port() {
    let fabric = Arc::new(TestFabric::default());
    let mut f = farm_json(2);
    f["spec"]["agent"]["advertise"] = json!({ "mode": "HostNetwork", "hostPort": 7410 });
    let mut farm: MiningFarm = serde_json::from_value(f.clone()).unwrap();
    farm.metadata.finalizers = Some(vec![FARM_FINALIZER.into()]);
    let (ctx, handle) = context(fabric);
    let mut script = farm_key_requests(false);
    script.extend([
        expect(Method::GET, "/apis/apps/v1/namespaces/farms/statefulsets/alpha").not_found(),
        // The headless Service keeps its ports and leads them to the machine's.
        expect(Method::PATCH, "/api/v1/namespaces/farms/services/alpha-agents").body(|b| {
            let ports = &b["spec"]["ports"];
            assert_eq!((ports[0]["port"].as_u64(), ports[0]["targetPort"].as_u64()), (Some(7400), Some(7410)));
            assert_eq!((ports[1]["port"].as_u64(), ports[1]["targetPort"].as_u64()), (Some(7401), Some(7411)));
        }),
        expect(Method::PATCH, "/apis/policy/v1/namespaces/farms/poddisruptionbudgets/alpha"),
        expect(Method::PATCH, "/apis/apps/v1/namespaces/farms/statefulsets/alpha").body(|b| {
            let pod = &b["spec"]["template"]["spec"];
            assert_eq!(pod["hostNetwork"], true, "{pod}");
            assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
            let c = &pod["containers"][0];
            let args = c["args"].to_string();
            assert!(args.contains("\"--advertise=$(HOST_IP):7410\""), "{args}");
            assert!(args.contains("\"--listen=0.0.0.0:7410\""), "{args}");
            assert!(args.contains("\"--http-listen=0.0.0.0:7411\""), "{args}");
            assert_eq!(c["ports"][0], json!({ "name": "grpc", "containerPort": 7410, "hostPort": 7410 }));
            assert_eq!(c["ports"][1], json!({ "name": "http", "containerPort": 7411, "hostPort": 7411 }));
            let host_ip = env_of(pod, "HOST_IP").expect("HOST_IP from the downward API");
            assert_eq!(host_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");
            // One agent of the farm per machine.
            let term = &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0];
            assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
            assert_eq!(term["labelSelector"]["matchLabels"]["shardfarm.io/farm"], "alpha");
            // Probes follow the named port.
            assert_eq!(c["readinessProbe"]["httpGet"]["port"], "http");
        }),
        namespace_read(Some("privileged")),
        expect(Method::PATCH, format!("{}/status", sf_path("miningfarms", "alpha"))).onto(f),
    ]);
    run(handle, script, farm::reconcile(Arc::new(farm), ctx)).await.unwrap();
}

#[test]
fn a_host_network_daemonset_advertises_the_host_ip_not_the_pod_ip() {
    let mut f = farm_json(0);
    f["spec"]["mode"] = json!("DaemonSet");
    f["spec"]["agent"]["storage"] = json!({ "hostPath": "/srv/shardfarm" });
    f["spec"]["agent"]["advertise"] = json!({ "mode": "HostNetwork" });
    let farm: MiningFarm = serde_json::from_value(f).unwrap();
    let ds = farm::daemonset(&farm, NS, &"0f".repeat(32), None);
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    let args = pod["containers"][0]["args"].to_string();
    // The default host port is the agents' usual port.
    assert!(args.contains("\"--advertise=$(HOST_IP):7400\""), "{args}");
    assert!(!args.contains("POD_IP"), "{args}");
    assert!(env_of(pod, "POD_IP").is_none());
    assert!(env_of(pod, "HOST_IP").is_some());
    assert_eq!(pod["containers"][0]["ports"][0]["hostPort"], 7400);
    assert_eq!(pod["containers"][0]["ports"][1]["hostPort"], 7401);
    // The machine's directory, as in any DaemonSet farm.
    assert_eq!(pod["containers"][0]["volumeMounts"][0]["subPathExpr"], "$(NODE_NAME)");
}

#[test]
fn a_pod_dns_farm_renders_as_a_farm_that_says_nothing() {
    for mode in ["StatefulSet", "DaemonSet"] {
        let mut plain = farm_json(3);
        plain["spec"]["mode"] = json!(mode);
        plain["spec"]["agent"]["storage"] = json!({ "hostPath": "/srv/shardfarm" });
        let mut explicit = plain.clone();
        explicit["spec"]["agent"]["advertise"] = json!({ "mode": "PodDNS", "hostPort": 9000 });
        let render = |v: Value| {
            let farm: MiningFarm = serde_json::from_value(v).unwrap();
            let id = "0f".repeat(32);
            match farm.spec.mode {
                shardfarm_crds::FarmMode::StatefulSet => farm::statefulset(&farm, NS, 3, &id, None),
                shardfarm_crds::FarmMode::DaemonSet => farm::daemonset(&farm, NS, &id, None),
            }
        };
        let (a, b) = (render(plain), render(explicit));
        assert_eq!(a, b, "{mode}");
        let pod = &a["spec"]["template"]["spec"];
        assert!(pod.get("hostNetwork").is_none() && pod.get("affinity").is_none(), "{pod}");
        assert!(env_of(pod, "HOST_IP").is_none());
        assert!(pod["containers"][0]["ports"][0].get("hostPort").is_none());
        let args = pod["containers"][0]["args"].to_string();
        let want = if mode == "StatefulSet" {
            "--advertise=$(POD_NAME).alpha-agents.farms.svc:7400"
        } else {
            "--advertise=$(POD_IP):7400"
        };
        assert!(args.contains(want), "{args}");
    }
}

// ---- Client keys ----

fn pool_with_clients(clients: Value) -> StoragePool {
    let mut p = serde_json::to_value(pool_obj(4, 2)).unwrap();
    p["spec"]["clients"] = clients;
    serde_json::from_value(p).unwrap()
}

/// The requests of a pool pass with no farm, up to the client Secrets: farms, syndications,
/// the placement, the pool's ConfigMap (read, and created when `cm` is None).
fn pool_pass_to_clients(pool: &StoragePool, cm: Option<Value>) -> Vec<Expect> {
    let empty = |kind: &str| json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": kind, "metadata": {}, "items": [] });
    let cm_path = format!("/api/v1/namespaces/{NS}/configmaps/shardfarm-pool-main");
    let mut script = vec![
        pool_read(pool),
        expect(Method::GET, format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/miningfarms"))
            .reply(empty("MiningFarmList")),
        expect(
            Method::GET,
            format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/nodesyndications"),
        )
        .reply(empty("NodeSyndicationList")),
        expect(Method::PATCH, sf_path("shardplacements", "main")),
    ];
    match cm {
        Some(cm) => script.push(expect(Method::GET, cm_path).reply(cm)),
        None => script.extend([
            expect(Method::GET, cm_path).not_found(),
            expect(Method::POST, format!("/api/v1/namespaces/{NS}/configmaps")).body(|b| {
                assert_eq!(b["metadata"]["name"], "shardfarm-pool-main");
                assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "StoragePool");
                assert_eq!(b["data"]["poolId"], pool_id("main").to_hex());
                assert_eq!(b["data"]["coordinator"], "shardfarm-coordinator.farms.svc:7398");
            }),
        ]),
    }
    script
}

fn secrets_path() -> String {
    format!("/api/v1/namespaces/{NS}/secrets")
}

fn secret_list(items: Vec<Value>) -> Value {
    json!({ "apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": items })
}

/// A client Secret of pool `main` as the operator writes it, its key expiring at `expires`.
fn client_secret(client: &str, expires: u64) -> Value {
    let key = shardfarm_core::identity::random_signing_key();
    let cert = shardfarm_core::identity::Delegation::issue(
        &pool_key("main"),
        key.verifying_key(),
        expires,
    );
    let text = super::clients::key_text(&key, &cert);
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": format!("shardfarm-client-main-{client}"), "namespace": NS,
            "resourceVersion": "41",
            "labels": { "shardfarm.io/client-of": "main", "shardfarm.io/client": client },
        },
        "data": { "client.key": base64(text.as_bytes()) },
    })
}

fn base64(b: &[u8]) -> String {
    serde_json::to_value(k8s_openapi::ByteString(b.to_vec())).unwrap().as_str().unwrap().to_string()
}

/// The delegation in a Secret body the operator sent, checked to be signed by the pool key.
fn sent_delegation(b: &Value) -> shardfarm_core::identity::Delegation {
    let bytes: k8s_openapi::ByteString =
        serde_json::from_value(b["data"]["client.key"].clone()).unwrap();
    let text = String::from_utf8(bytes.0).unwrap();
    assert!(text.contains("\nsecret = \""), "{text}");
    let d = super::clients::parse_delegation(&text).expect("a delegation");
    assert_eq!(d.issuer_id(), pool_id("main"));
    d.verify(0, shardfarm_core::auth::now_ms() / 1000).expect("a valid delegation");
    d
}

fn now_s() -> u64 {
    shardfarm_core::auth::now_ms() / 1000
}

#[tokio::test]
async fn a_pools_clients_get_delegated_keys_in_secrets_the_pool_owns() {
    let fabric = Arc::new(TestFabric::default());
    let (ctx, handle) = context(fabric);
    let pool =
        pool_with_clients(json!([{ "name": "gateway" }, { "name": "s3-alice", "days": 30 }]));
    let mut script = pool_pass_to_clients(&pool, None);
    script.push(expect(Method::GET, secrets_path()).reply(secret_list(vec![])));
    for (client, days) in [("gateway", 365u64), ("s3-alice", 30)] {
        script.push(expect(Method::POST, secrets_path()).body(move |b| {
            assert_eq!(b["metadata"]["name"], format!("shardfarm-client-main-{client}"));
            assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "StoragePool");
            assert_eq!(b["metadata"]["labels"]["shardfarm.io/client-of"], "main");
            assert_eq!(b["metadata"]["labels"]["shardfarm.io/client"], client);
            assert_eq!(b["immutable"], false);
            let d = sent_delegation(b);
            let left = d.expires - now_s();
            assert!(left > days * 86_400 - 60 && left <= days * 86_400, "{left}");
        }));
    }
    // One Event for the pass, naming both.
    script.push(expect(Method::POST, events_path()).body(|b| {
        assert_eq!(
            (b["reason"].as_str(), b["type"].as_str()),
            (Some("ClientIssued"), Some("Normal"))
        );
        let note = b["note"].as_str().unwrap();
        assert!(note.contains("gateway: key") && note.contains("s3-alice: key"), "{b}");
    }));
    script.push(
        expect(Method::PATCH, format!("{}/status", sf_path("storagepools", "main")))
            .onto(serde_json::to_value(pool.clone()).unwrap())
            .body(|b| {
                let clients = b["status"]["clients"].as_array().unwrap();
                assert_eq!(clients.len(), 2, "{b}");
                assert_eq!(clients[0]["name"], "gateway");
                assert_eq!(clients[0]["secret"], "shardfarm-client-main-gateway");
                assert_eq!(clients[0]["keyId"].as_str().unwrap().len(), 64);
                assert!(clients[1]["expires"].as_str().unwrap().ends_with('Z'), "{b}");
                let c = b["status"]["conditions"].as_array().unwrap();
                let issued = c.iter().find(|c| c["type"] == "ClientsIssued").unwrap();
                assert_eq!(issued["status"], "True", "{issued}");
            }),
    );
    run(handle, script, pool::reconcile(Arc::new(pool), ctx)).await.unwrap();
}

#[tokio::test]
async fn a_key_near_its_expiry_is_issued_again_in_place_and_a_removed_clients_secret_goes() {
    let fabric = Arc::new(TestFabric::default());
    let (ctx, handle) = context(fabric);
    let pool = pool_with_clients(json!([{ "name": "gateway" }, { "name": "s3-alice" }]));
    let day = 86_400;
    // gateway: 10 of 365 days left (under a fifth); s3-alice: 300 left (kept); old: removed.
    let listed = vec![
        client_secret("gateway", now_s() + 10 * day),
        client_secret("s3-alice", now_s() + 300 * day),
        client_secret("old", now_s() + 300 * day),
    ];
    let kept_id = {
        let s: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(listed[1].clone()).unwrap();
        let text = String::from_utf8(s.data.unwrap()["client.key"].0.clone()).unwrap();
        shardfarm_core::identity::NodeId::of(
            &super::clients::parse_delegation(&text).unwrap().delegate,
        )
        .to_hex()
    };
    let cm = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "shardfarm-pool-main", "namespace": NS } });
    let mut script = pool_pass_to_clients(&pool, Some(cm));
    script.extend([
        expect(Method::GET, secrets_path()).reply(secret_list(listed)),
        // Replaced at the version read.
        expect(Method::PUT, format!("{}/shardfarm-client-main-gateway", secrets_path())).body(
            |b| {
                assert_eq!(b["metadata"]["resourceVersion"], "41");
                let d = sent_delegation(b);
                assert!(d.expires > now_s() + 364 * 86_400);
            },
        ),
        expect(Method::DELETE, format!("{}/shardfarm-client-main-old", secrets_path())).reply(
            json!({
                "kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {},
            }),
        ),
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(b["reason"], "ClientIssued");
            assert!(b["note"].as_str().unwrap().contains("less than a fifth"), "{b}");
        }),
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(b["reason"], "ClientRemoved");
            assert!(b["note"].as_str().unwrap().contains("stays valid until"), "{b}");
        }),
        expect(Method::PATCH, format!("{}/status", sf_path("storagepools", "main")))
            .onto(serde_json::to_value(pool.clone()).unwrap())
            .body(move |b| {
                let clients = b["status"]["clients"].as_array().unwrap();
                assert_eq!(clients.len(), 2, "{b}");
                assert_eq!(clients[1]["name"], "s3-alice");
                assert_eq!(clients[1]["keyId"], kept_id.as_str());
            }),
    ]);
    run(handle, script, pool::reconcile(Arc::new(pool), ctx)).await.unwrap();
}

#[tokio::test]
async fn a_secret_the_operator_did_not_make_is_never_overwritten() {
    let fabric = Arc::new(TestFabric::default());
    let (ctx, handle) = context(fabric.clone());
    let pool = pool_with_clients(json!([{ "name": "gateway" }]));
    let cm = json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": "shardfarm-pool-main", "namespace": NS } });
    let mut script = pool_pass_to_clients(&pool, Some(cm.clone()));
    script.extend([
        // Not labelled as ours, so not listed; the create finds it.
        expect(Method::GET, secrets_path()).reply(secret_list(vec![])),
        expect(Method::POST, secrets_path()).conflict(),
        expect(Method::PATCH, format!("{}/status", sf_path("storagepools", "main")))
            .onto(serde_json::to_value(pool.clone()).unwrap())
            .body(|b| {
                assert!(b["status"].get("clients").is_none(), "{b}");
                let c = b["status"]["conditions"].as_array().unwrap();
                let issued = c.iter().find(|c| c["type"] == "ClientsIssued").unwrap();
                assert_eq!(
                    (issued["status"].as_str(), issued["reason"].as_str()),
                    (Some("False"), Some("ClientsRefused"))
                );
                assert!(issued["message"].as_str().unwrap().contains("did not make"), "{issued}");
            }),
        expect(Method::POST, events_path()).body(|b| {
            assert_eq!(
                (b["reason"].as_str(), b["type"].as_str()),
                (Some("ClientsRefused"), Some("Warning"))
            );
        }),
    ]);
    run(handle, script, pool::reconcile(Arc::new(pool.clone()), ctx)).await.unwrap();

    // An operator that does not hold the pool's key issues nothing, and says why.
    *fabric.no_pool_key.lock().unwrap() = true;
    let (ctx, handle) = context(fabric);
    let mut script = pool_pass_to_clients(&pool, Some(cm));
    script.extend([
        expect(Method::GET, secrets_path()).reply(secret_list(vec![])),
        expect(Method::PATCH, format!("{}/status", sf_path("storagepools", "main")))
            .onto(serde_json::to_value(pool.clone()).unwrap())
            .body(|b| {
                let c = b["status"]["conditions"].as_array().unwrap();
                let issued = c.iter().find(|c| c["type"] == "ClientsIssued").unwrap();
                assert!(issued["message"].as_str().unwrap().contains("does not hold"), "{issued}");
            }),
        expect(Method::POST, events_path()),
    ]);
    run(handle, script, pool::reconcile(Arc::new(pool), ctx)).await.unwrap();
}

/// After `helm uninstall` (the pool deleted, the garbage collector about to remove what it
/// owns), a reconcile of the pool writes nothing: no new client Secrets (new keys), no
/// `shardfarm-pool-<name>` ConfigMap, no ShardPlacement. Whether the cache still shows it
/// being deleted, or shows it alive while the API server no longer has it (the cache trails a
/// farm's deletion that triggered this reconcile), or has it under deletion, or holds another
/// pool under the same name.
#[tokio::test]
async fn a_pool_being_deleted_or_gone_gets_nothing_written_again() {
    let pool = pool_with_clients(json!([{ "name": "gateway" }, { "name": "s3-alice" }]));
    let mut deleting = pool.clone();
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    deleting.metadata.finalizers = Some(vec!["foregroundDeletion".into()]);
    let mut replaced = pool.clone();
    replaced.metadata.uid = Some("uid-main-2".into());
    let path = sf_path("storagepools", "main");
    let cases: Vec<(&str, StoragePool, Vec<Expect>)> = vec![
        ("deletion timestamp in the cache", deleting.clone(), vec![]),
        ("gone from the API", pool.clone(), vec![expect(Method::GET, path.clone()).not_found()]),
        (
            "being deleted in the API",
            pool.clone(),
            vec![expect(Method::GET, path.clone()).reply(serde_json::to_value(&deleting).unwrap())],
        ),
        (
            "another pool under its name",
            pool.clone(),
            vec![expect(Method::GET, path.clone()).reply(serde_json::to_value(&replaced).unwrap())],
        ),
    ];
    for (case, cached, script) in cases {
        let fabric = Arc::new(TestFabric::default());
        let (ctx, handle) = context(fabric.clone());
        let r = run(handle, script, pool::reconcile(Arc::new(cached), ctx)).await;
        assert!(r.is_ok(), "{case}: {r:?}");
        // Not even the syndications' rules were recomputed from a stale pool.
        assert!(fabric.admission.lock().unwrap().is_none(), "{case}");
    }
}

/// The pool's `Degraded` column (`kubectl get sfpool`) reads the status field the reconciler
/// writes, and that field counts shards below full redundancy: two of a segment's six holders
/// stopped (the layout still names them, nobody has a backlog to report) is not 0.
#[tokio::test]
async fn the_degraded_column_counts_shards_on_nodes_that_are_down() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(StoragePool::crd()).unwrap();
    let columns = crd["spec"]["versions"][0]["additionalPrinterColumns"].as_array().unwrap();
    let column = columns.iter().find(|c| c["name"] == "Degraded").expect("a Degraded column");
    assert_eq!(column["jsonPath"], ".status.degradedSegments");

    let fabric = Arc::new(TestFabric::default());
    let zones = ["a", "b", "c"];
    let mut members: Vec<_> =
        (0..9).map(|i| member(&format!("n{i}"), zones[i % 3], &[("farm", "x")])).collect();
    for m in members.iter_mut() {
        m.shards = 10;
    }
    // n0 and n1 stopped: the seven left still hold RS(4,2) (the pool is Ready), but the
    // segments of the one partition, on n0..n5, are 4 of 6.
    members[0].up = false;
    members[1].up = false;
    *fabric.members.lock().unwrap() = members.clone();
    *fabric.layout.lock().unwrap() = Some(placement::Layout {
        version: 3,
        k: 4,
        m: 2,
        partitions: vec![members[..6].iter().map(|m| m.id).collect()],
    });
    let items: Vec<Value> = zones
        .iter()
        .map(|z| {
            let mut f = farm_json(3);
            f["metadata"]["name"] = json!(format!("farm-{z}"));
            f["spec"]["zone"] = json!(z);
            f
        })
        .collect();
    let list = json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "MiningFarmList", "metadata": {}, "items": items });
    let pass = |want: u64| {
        vec![
            pool_read(&pool_obj(4, 2)),
            expect(Method::GET, format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/miningfarms"))
                .reply(list.clone()),
            expect(Method::GET, format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/nodesyndications"))
                .reply(json!({ "apiVersion": "shardfarm.io/v1alpha1", "kind": "NodeSyndicationList", "metadata": {}, "items": [] })),
            expect(Method::PATCH, sf_path("shardplacements", "main")),
            expect(Method::PATCH, format!("{}/status", sf_path("storagepools", "main")))
                .onto(serde_json::to_value(pool_obj(4, 2)).unwrap())
                .body(move |b| {
                    assert_eq!(b["status"]["phase"], "Ready", "{b}");
                    assert_eq!(b["status"]["degradedSegments"], want, "{b}");
                }),
        ]
    };
    let (ctx, handle) = context(fabric.clone());
    run(handle, pass(20), pool::reconcile(Arc::new(pool_obj(4, 2)), ctx)).await.unwrap();

    // n0 is removed from the pool (its farm deleted) while no new layout could be computed
    // yet, and n2 reports 5 shards to rebuild: n0's one slot counts at the mean of the
    // holders that reported (10 shards a slot), n1 its 10, n2's backlog 5.
    {
        let mut ms = fabric.members.lock().unwrap();
        ms.remove(0);
        ms[1].repair_backlog = 5;
    }
    let (ctx, handle) = context(fabric.clone());
    run(handle, pass(25), pool::reconcile(Arc::new(pool_obj(4, 2)), ctx)).await.unwrap();
    assert_eq!(
        pool::degraded_shards(5, &fabric.members.lock().unwrap(), None),
        5,
        "without a layout only the coordinator's count counts"
    );
}

/// A farm whose pods need more than its namespace's Pod Security admission enforces is told so
/// on the farm (condition and Warning, once), not only in FailedCreate events on a StatefulSet:
/// `restricted` refuses a hostPath farm's pods and a HostNetwork DaemonSet's; a farm on a
/// PersistentVolume is admitted.
#[tokio::test]
async fn a_namespace_whose_pod_security_refuses_the_farms_pods_is_reported_on_the_farm() {
    let fabric = Arc::new(TestFabric::default());
    let status_path = format!("{}/status", sf_path("miningfarms", "alpha"));
    let sts_pass = |f: &Value, enforce: &'static str, check: fn(&Value)| {
        let mut script = farm_key_requests(false);
        script.extend([
            expect(Method::GET, "/apis/apps/v1/namespaces/farms/statefulsets/alpha").not_found(),
            expect(Method::PATCH, "/api/v1/namespaces/farms/services/alpha-agents"),
            expect(Method::PATCH, "/apis/policy/v1/namespaces/farms/poddisruptionbudgets/alpha"),
            expect(Method::PATCH, "/apis/apps/v1/namespaces/farms/statefulsets/alpha"),
            namespace_read(Some(enforce)),
            expect(Method::PATCH, status_path.clone()).onto(f.clone()).body(check),
        ]);
        script
    };
    let refused = |b: &Value| -> Value {
        b["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "PodSecurityRefused")
            .cloned()
            .unwrap_or_else(|| panic!("no PodSecurityRefused condition: {b}"))
    };

    // On hostPath, in a namespace that enforces `restricted`: refused, with the way out.
    let mut f = farm_json(2);
    f["spec"]["agent"]["storage"] = json!({ "hostPath": "/srv/shardfarm" });
    let mut farm: MiningFarm = serde_json::from_value(f.clone()).unwrap();
    farm.metadata.finalizers = Some(vec![FARM_FINALIZER.into()]);
    let mut script = sts_pass(&f, "restricted", |b| {
        let c = &b["status"]["conditions"].as_array().unwrap();
        let c = c.iter().find(|c| c["type"] == "PodSecurityRefused").expect("the condition");
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("True"), Some("NamespaceLevelTooStrict"))
        );
        let msg = c["message"].as_str().unwrap();
        assert!(msg.contains("enforces Pod Security `restricted`"), "{msg}");
        assert!(msg.contains("need `privileged`") && msg.contains("hostPath volume data"), "{msg}");
        assert!(msg.contains("kubectl label namespace farms pod-security.kubernetes.io/enforce=privileged --overwrite"), "{msg}");
    });
    script.push(expect(Method::POST, events_path()).body(|b| {
        assert_eq!(
            (b["reason"].as_str(), b["type"].as_str()),
            (Some("PodSecurityRefused"), Some("Warning"))
        );
        assert!(b["note"].as_str().unwrap().contains("hostPath"), "{b}");
    }));
    let (ctx, handle) = context(fabric.clone());
    run(handle, script, farm::reconcile(Arc::new(farm.clone()), ctx)).await.unwrap();

    // Still refused on the next pass: the condition stays, the Warning is not repeated.
    let mut again = farm.clone();
    again.status = Some(shardfarm_crds::MiningFarmStatus {
        conditions: vec![super::condition(
            &[],
            "PodSecurityRefused",
            true,
            "NamespaceLevelTooStrict",
            "x".into(),
            Some(1),
        )],
        ..Default::default()
    });
    let script = sts_pass(&f, "restricted", |b| {
        assert_eq!(b["status"]["conditions"][3]["status"], "True", "{b}")
    });
    let (ctx, handle) = context(fabric.clone());
    run(handle, script, farm::reconcile(Arc::new(again), ctx)).await.unwrap();

    // The same namespace admits a farm on a PersistentVolume.
    let f = farm_json(2);
    let mut farm: MiningFarm = serde_json::from_value(f.clone()).unwrap();
    farm.metadata.finalizers = Some(vec![FARM_FINALIZER.into()]);
    let script = sts_pass(&f, "restricted", |b| {
        let c = &b["status"]["conditions"].as_array().unwrap();
        let c = c.iter().find(|c| c["type"] == "PodSecurityRefused").expect("the condition");
        assert_eq!(c["status"], "False", "{c}");
        assert!(c["message"].as_str().unwrap().contains("need `restricted`"), "{c}");
    });
    let (ctx, handle) = context(fabric.clone());
    run(handle, script, farm::reconcile(Arc::new(farm), ctx)).await.unwrap();

    // A HostNetwork DaemonSet farm in a `baseline` namespace: refused.
    let mut f = farm_json(0);
    f["spec"]["mode"] = json!("DaemonSet");
    f["spec"]["agent"]["storage"] = json!({ "hostPath": "/srv/shardfarm" });
    f["spec"]["agent"]["advertise"] = json!({ "mode": "HostNetwork" });
    let mut farm: MiningFarm = serde_json::from_value(f.clone()).unwrap();
    farm.metadata.finalizers = Some(vec![FARM_FINALIZER.into()]);
    let mut script = farm_key_requests(false);
    script.extend([
        expect(Method::PATCH, "/api/v1/namespaces/farms/services/alpha-agents"),
        expect(Method::PATCH, "/apis/policy/v1/namespaces/farms/poddisruptionbudgets/alpha"),
        expect(Method::PATCH, "/apis/apps/v1/namespaces/farms/daemonsets/alpha"),
        namespace_read(Some("baseline")),
        expect(Method::PATCH, status_path.clone()).onto(f.clone()).body(move |b| {
            let c = refused(b);
            assert_eq!(c["status"], "True", "{c}");
            let msg = c["message"].as_str().unwrap();
            assert!(msg.contains("`baseline`") && msg.contains("hostNetwork"), "{msg}");
            assert!(msg.contains("its DaemonSet"), "{msg}");
        }),
        expect(Method::POST, events_path()).body(|b| assert_eq!(b["reason"], "PodSecurityRefused")),
    ]);
    let (ctx, handle) = context(fabric);
    run(handle, script, farm::reconcile(Arc::new(farm), ctx)).await.unwrap();
}
