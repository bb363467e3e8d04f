//! Test fixtures: a mocked API server that expects an exact sequence of requests, a fabric
//! whose members the test sets, and builders of the objects under test.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use shardfarm_core::auth::Caller;
use shardfarm_core::identity::{Credential, NodeId, blake2b256};
use shardfarm_core::placement::Layout;
use tower_test::mock;

use super::{Context, ControllerMetrics, Fabric};
use crate::api_rules::{self, Write};
use shardfarm_coordinator::Member;
use shardfarm_coordinator::economics::{ReputationConfig, Standing};

pub const NS: &str = "farms";

// ---- The fabric ----

/// A fabric whose state the test sets and whose requests it records.
#[derive(Default)]
pub struct TestFabric {
    pub members: Mutex<Vec<Member>>,
    pub layout: Mutex<Option<Layout>>,
    pub out_of_sync: Mutex<bool>,
    pub drained: Mutex<Vec<NodeId>>,
    pub undrained: Mutex<Vec<NodeId>>,
    pub removed: Mutex<Vec<NodeId>>,
    pub max_moves: Mutex<Option<usize>>,
    pub admission: Mutex<Option<shardfarm_coordinator::Admission>>,
    pub farms:
        Mutex<std::collections::BTreeMap<NodeId, std::collections::BTreeMap<String, String>>>,
    /// The pool configuration the coordinator runs with (None: [`test_config`]).
    pub config: Mutex<Option<shardfarm_coordinator::PoolConfig>>,
    /// Set: this operator does not hold the pool's key (it runs another pool).
    pub no_pool_key: Mutex<bool>,
    /// Set: the pool's view is incomplete, for this reason ([`Fabric::view`]).
    pub incomplete: Mutex<Option<String>>,
}

/// The pool configuration of the tests' coordinator unless one sets another: RS(4,2), 512
/// partitions, difficulty 26.
pub fn test_config() -> shardfarm_coordinator::PoolConfig {
    shardfarm_coordinator::PoolConfig { partitions: 512, min_difficulty: 26, ..Default::default() }
}

impl Fabric for TestFabric {
    fn view(&self, _pool: &str) -> Result<(), String> {
        self.incomplete.lock().unwrap().clone().map_or(Ok(()), Err)
    }
    fn members(&self, _pool: &str) -> Vec<Member> {
        self.members.lock().unwrap().clone()
    }
    fn layout(&self, _pool: &str) -> Option<Layout> {
        self.layout.lock().unwrap().clone()
    }
    fn degraded_shards(&self, _pool: &str) -> u64 {
        // What the coordinator sums: the reports of the nodes that are up.
        self.members.lock().unwrap().iter().filter(|m| m.up).map(|m| m.repair_backlog).sum()
    }
    fn in_sync(&self, _pool: &str) -> bool {
        !*self.out_of_sync.lock().unwrap()
    }
    fn drain(&self, _pool: &str, node: NodeId) {
        self.drained.lock().unwrap().push(node);
        for m in self.members.lock().unwrap().iter_mut().filter(|m| m.id == node) {
            m.draining = true;
        }
    }
    fn remove(&self, _pool: &str, node: NodeId) {
        self.removed.lock().unwrap().push(node);
    }
    fn set_max_moves(&self, _pool: &str, moves: Option<usize>) {
        *self.max_moves.lock().unwrap() = moves;
    }
    fn earnings(&self, _pool: &str, _node: &NodeId) -> u64 {
        7
    }
    fn set_admission(&self, _pool: &str, admission: shardfarm_coordinator::Admission) {
        *self.admission.lock().unwrap() = Some(admission);
    }
    fn set_farm(
        &self,
        _pool: &str,
        farm: NodeId,
        labels: std::collections::BTreeMap<String, String>,
    ) {
        self.farms.lock().unwrap().insert(farm, labels);
    }
    fn remove_farm(&self, _pool: &str, farm: &NodeId) {
        self.farms.lock().unwrap().remove(farm);
    }
    fn undrain(&self, _pool: &str, node: NodeId) {
        self.undrained.lock().unwrap().push(node);
        for m in self.members.lock().unwrap().iter_mut().filter(|m| m.id == node) {
            m.draining = false;
        }
    }
    fn config(&self, _pool: &str) -> Option<shardfarm_coordinator::PoolConfig> {
        Some(self.config.lock().unwrap().clone().unwrap_or_else(test_config))
    }
    fn pool_id(&self, pool: &str) -> Option<NodeId> {
        Some(pool_id(pool))
    }
    fn delegate(
        &self,
        pool: &str,
        delegate: ed25519_dalek::VerifyingKey,
        expires: u64,
    ) -> Option<shardfarm_core::identity::Delegation> {
        (!*self.no_pool_key.lock().unwrap()).then(|| {
            shardfarm_core::identity::Delegation::issue(&pool_key(pool), delegate, expires)
        })
    }
}

/// The pool id the test fabric reports for `pool`: its [`pool_key`]'s.
pub fn pool_id(pool: &str) -> NodeId {
    pool_key(pool).id()
}

/// The key of `pool` the test fabric signs with (derived from its name; not mined).
pub fn pool_key(pool: &str) -> shardfarm_core::identity::Identity {
    let seed = blake2b256(&[b"test pool key ", pool.as_bytes()]);
    shardfarm_core::identity::Identity::from_parts(ed25519_dalek::SigningKey::from_bytes(&seed), 0)
}

/// A node id named `name`.
pub fn node(name: &str) -> NodeId {
    NodeId(blake2b256(&[name.as_bytes()]))
}

/// A member `name` in `zone` with labels.
pub fn member(name: &str, zone: &str, labels: &[(&str, &str)]) -> Member {
    let key = shardfarm_core::identity::random_signing_key();
    let caller = Caller {
        credential: Credential::Mined { key: key.verifying_key(), nonce: 0 },
        id: node(name),
        root: node(name),
    };
    let mut m = Member::new(&caller, 0, &ReputationConfig::default());
    m.domain = zone.into();
    m.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    m.labels.insert("zone".into(), zone.into());
    m.capacity = (10u64 << 30) as f64;
    m.offered_bytes = 10 << 30;
    m.up = true;
    m.standing = Standing::Active;
    m
}

// ---- The mocked API server ----

/// A check of a request body.
type BodyCheck = Box<dyn FnOnce(&Value) + Send>;

/// One expected request and the answer to it.
pub struct Expect {
    method: Method,
    path: String,
    check: Option<BodyCheck>,
    status: StatusCode,
    reply: Option<Value>,
    onto: Option<Value>,
}

/// Expects `method` on `path` (the URI path; server-side applies are also checked for our
/// field manager and `force`).
pub fn expect(method: Method, path: impl Into<String>) -> Expect {
    Expect {
        method,
        path: path.into(),
        check: None,
        status: StatusCode::OK,
        reply: None,
        onto: None,
    }
}

impl Expect {
    /// Checks the request body.
    pub fn body(mut self, f: impl FnOnce(&Value) + Send + 'static) -> Self {
        self.check = Some(Box::new(f));
        self
    }

    /// Answers with `value` (default: the request body echoed back).
    pub fn reply(mut self, value: Value) -> Self {
        self.reply = Some(value);
        self
    }

    /// Answers with `object` carrying the patched status (a status patch's answer).
    pub fn onto(mut self, object: Value) -> Self {
        self.onto = Some(object);
        self
    }

    /// Answers 409 Conflict (the object already exists).
    pub fn conflict(mut self) -> Self {
        self.status = StatusCode::CONFLICT;
        self.reply = Some(json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
            "code": 409, "message": "already exists",
        }));
        self
    }

    /// Answers 403 Forbidden with `message` (say, a namespace being terminated).
    pub fn forbidden(mut self, message: &str) -> Self {
        self.status = StatusCode::FORBIDDEN;
        self.reply = Some(json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
            "code": 403, "message": message,
        }));
        self
    }

    /// Answers 404 Not Found.
    pub fn not_found(mut self) -> Self {
        self.status = StatusCode::NOT_FOUND;
        self.reply = Some(json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
            "code": 404, "message": "not found",
        }));
        self
    }
}

/// Serves `script` in order and fails the test on any other request. Every write is first
/// judged as kube-apiserver would (`api_rules::check_write`, over the objects this server
/// answered or took so far): one the real server refuses is refused the same way (a 422
/// Invalid, a 409 Conflict at a stale resourceVersion, …), whatever the script says.
pub fn serve(
    handle: mock::Handle<Request<Body>, Response<Body>>,
    script: Vec<Expect>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut handle = handle;
        let mut script: VecDeque<Expect> = script.into();
        // The objects as the server holds them, by path; and the last resourceVersion given.
        let mut cluster: HashMap<String, Value> = HashMap::new();
        let mut version = 1000u64;
        while let Some(e) = script.pop_front() {
            let (req, send) = handle.next_request().await.expect("a request");
            let (method, uri) = (req.method().clone(), req.uri().clone());
            assert_eq!(
                (&method, uri.path()),
                (&e.method, e.path.as_str()),
                "unexpected request {method} {uri}; expected {} {}",
                e.method,
                e.path
            );
            let is_apply = req
                .headers()
                .get("content-type")
                .is_some_and(|v| v.to_str().unwrap_or("").contains("apply-patch"));
            if is_apply {
                let q = uri.query().unwrap_or_default();
                assert!(
                    q.contains("fieldManager=shardfarm-operator") && q.contains("force=true"),
                    "{uri}"
                );
            }
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            if let Some(check) = e.check {
                check(&body);
            }
            let path = uri.path().to_string();
            let status_of = path.ends_with("/status");
            let write = match method {
                Method::POST => Some(Write::Create),
                Method::PUT => Some(Write::Replace),
                Method::PATCH => Some(Write::Patch),
                _ => None,
            };
            // The object's own path.
            let object_path = match write {
                Some(Write::Create) => {
                    format!("{path}/{}", body["metadata"]["name"].as_str().unwrap_or_default())
                }
                _ => path.trim_end_matches("/status").to_string(),
            };
            if let Some(w) = write.filter(|_| e.status.is_success()) {
                let stored = cluster.get(&object_path);
                if let Err(refusal) = api_rules::check_write(w, &path, &body, stored) {
                    send.send_response(
                        Response::builder()
                            .status(refusal.code)
                            .body(Body::from(serde_json::to_vec(&refusal.status).unwrap()))
                            .unwrap(),
                    );
                    continue;
                }
            }
            // Echo the body, as the API server would answer a patch with the object; a status
            // patch carries no metadata, so give it the name from the path.
            let onto = e.onto.map(|mut o| {
                o["status"] = body["status"].clone();
                o
            });
            let echoed = e.reply.is_none() && onto.is_none();
            let mut reply = e.reply.or(onto).unwrap_or_else(|| {
                let mut body = body.clone();
                if body.is_object() && body.get("metadata").is_none() {
                    let segs: Vec<&str> = uri.path().split('/').collect();
                    let name = if segs.last() == Some(&"status") {
                        segs[segs.len() - 2]
                    } else {
                        segs[segs.len() - 1]
                    };
                    body["metadata"] = json!({ "name": name, "namespace": NS });
                }
                body
            });
            if e.status.is_success() {
                match (&method, write) {
                    (_, Some(_)) if !status_of && body.is_object() => {
                        // What was written is what the server now holds, at a new version.
                        if echoed && reply["metadata"].is_object() {
                            version += 1;
                            reply["metadata"]["resourceVersion"] = json!(version.to_string());
                        }
                        cluster.insert(object_path, reply.clone());
                    }
                    (&Method::GET, _) => match reply["items"].as_array() {
                        Some(items) => {
                            for item in items {
                                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                                cluster.insert(format!("{path}/{name}"), item.clone());
                            }
                        }
                        None => {
                            cluster.insert(path.clone(), reply.clone());
                        }
                    },
                    (&Method::DELETE, _) => {
                        cluster.remove(&path);
                    }
                    _ => {}
                }
            } else if method == Method::GET && e.status == StatusCode::NOT_FOUND {
                cluster.remove(&path);
            }
            send.send_response(
                Response::builder()
                    .status(e.status)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    })
}

/// A context over a mocked API server and `fabric`.
pub fn context(
    fabric: Arc<TestFabric>,
) -> (Arc<Context>, mock::Handle<Request<Body>, Response<Body>>) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, NS);
    let metrics = Arc::new(ControllerMetrics::new(&prometheus::Registry::new()));
    (Arc::new(Context::new(client, fabric, metrics)), handle)
}

/// A context over a mocked API server and any fabric (an operator's own, say).
pub fn context_over(
    fabric: Arc<dyn Fabric>,
) -> (Arc<Context>, mock::Handle<Request<Body>, Response<Body>>) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, NS);
    let metrics = Arc::new(ControllerMetrics::new(&prometheus::Registry::new()));
    (Arc::new(Context::new(client, fabric, metrics)), handle)
}

/// Runs `reconcile` against `script`: every expected request must come, in order, and the
/// reconcile must then finish (an unexpected extra request would leave it waiting).
pub async fn run<F, T>(
    handle: mock::Handle<Request<Body>, Response<Body>>,
    script: Vec<Expect>,
    reconcile: F,
) -> T
where
    F: std::future::Future<Output = T>,
{
    let server = serve(handle, script);
    let out = tokio::time::timeout(Duration::from_secs(5), reconcile)
        .await
        .expect("reconcile did not finish: a request it made was not expected");
    tokio::time::timeout(Duration::from_secs(1), server)
        .await
        .expect("an expected request was never made")
        .expect("the API server script failed");
    out
}

/// The path of a namespaced shardfarm.io object.
pub fn sf_path(plural: &str, name: &str) -> String {
    format!("/apis/shardfarm.io/v1alpha1/namespaces/{NS}/{plural}/{name}")
}

/// The events endpoint.
pub fn events_path() -> String {
    format!("/apis/events.k8s.io/v1/namespaces/{NS}/events")
}

/// Adds name, namespace, uid and generation to an object's JSON.
pub fn meta(mut v: Value, name: &str) -> Value {
    v["metadata"] =
        json!({ "name": name, "namespace": NS, "uid": format!("uid-{name}"), "generation": 1 });
    v
}
