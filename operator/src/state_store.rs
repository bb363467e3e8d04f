//! The coordinator's durable state in the Kubernetes API, so any operator replica can lead.
//!
//! The state document (members and their standing, drain flags, the current and fallback
//! layouts with their versions, the epoch) is kept in the ConfigMap
//! `shardfarm-state-<pool>`, key `coordinator.json`; the rewards ledger, which the coordinator
//! appends to a file, is copied beside it (key `ledger.jsonl`) every time the state is saved —
//! the coordinator saves right after closing an epoch, so the ledger in the API is never older
//! than the epoch the state says was closed. Writes carry the resourceVersion last read or
//! written: a replica that lost the Lease and writes late gets a conflict, never overwrites
//! its successor. The coordinator saves before it publishes a layout, so a new leader never
//! publishes a version below one the agents saw.
//!
//! An operator upgraded from one that kept its state only in its volume reads that file once;
//! its first save creates the ConfigMap.

use std::path::PathBuf;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use shardfarm_coordinator::store::StateStore;
use shardfarm_coordinator::{Error, Result};

/// The ConfigMap's key for the state document.
pub const STATE_KEY: &str = "coordinator.json";
/// The ConfigMap's key for the ledger.
pub const LEDGER_KEY: &str = "ledger.jsonl";

/// The name of the ConfigMap holding `pool`'s state.
pub fn configmap_name(pool: &str) -> String {
    format!("shardfarm-state-{pool}")
}

/// The coordinator's state in a ConfigMap (see the module docs).
pub struct KubeStore {
    api: Api<ConfigMap>,
    name: String,
    pool: String,
    /// The ledger file the coordinator appends to, copied into the ConfigMap on each save.
    ledger: PathBuf,
    /// The state file an earlier operator kept in its volume, read if the ConfigMap is absent.
    legacy: PathBuf,
    /// The resourceVersion last read or written (None: the ConfigMap does not exist yet).
    version: Mutex<Option<String>>,
    runtime: tokio::runtime::Handle,
}

impl KubeStore {
    /// The store of `pool` in `api`'s namespace; `ledger` is the coordinator's ledger file,
    /// `legacy` the state file of an operator that kept it in its volume.
    pub fn new(api: Api<ConfigMap>, pool: &str, ledger: PathBuf, legacy: PathBuf) -> Self {
        KubeStore {
            api,
            name: configmap_name(pool),
            pool: pool.into(),
            ledger,
            legacy,
            version: Mutex::new(None),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Restores the ledger file from the ConfigMap if the file is missing or shorter (a new
    /// leader on a fresh volume). Call before opening the coordinator.
    pub async fn restore_ledger(&self) -> anyhow::Result<()> {
        let Some(cm) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let Some(text) = cm.data.as_ref().and_then(|d| d.get(LEDGER_KEY)) else { return Ok(()) };
        let local = std::fs::metadata(&self.ledger).map_or(0, |m| m.len());
        if (text.len() as u64) > local {
            if let Some(dir) = self.ledger.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.ledger.with_extension("jsonl.tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &self.ledger)?;
            tracing::info!(configmap = %self.name, bytes = text.len(), "restored the ledger from the API");
        }
        Ok(())
    }

    /// Runs `f` to completion from synchronous code (the housekeeping step runs on the
    /// blocking pool; the final save runs on a runtime worker).
    fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        tokio::task::block_in_place(|| self.runtime.block_on(f))
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::State(format!("ConfigMap {}: {what}: {e}", self.name))
    }
}

impl StateStore for KubeStore {
    fn load(&self) -> Result<Option<Vec<u8>>> {
        let cm = self.block(self.api.get_opt(&self.name)).map_err(|e| self.err("reading", e))?;
        match cm {
            Some(cm) => {
                *self.version.lock().unwrap() = cm.metadata.resource_version.clone();
                Ok(cm.data.and_then(|mut d| d.remove(STATE_KEY)).map(String::into_bytes))
            }
            None => match std::fs::read(&self.legacy) {
                Ok(b) => {
                    tracing::info!(file = %self.legacy.display(), "moving the coordinator state into the API");
                    Ok(Some(b))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(&self.legacy, e)),
            },
        }
    }

    fn save(&self, document: &[u8]) -> Result<()> {
        let text = String::from_utf8(document.to_vec()).map_err(|e| self.err("encoding", e))?;
        let ledger = match std::fs::read_to_string(&self.ledger) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&self.ledger, e)),
        };
        let version = self.version.lock().unwrap().clone();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: version.clone(),
                labels: Some(
                    [
                        (
                            "app.kubernetes.io/managed-by".to_string(),
                            "shardfarm-operator".to_string(),
                        ),
                        ("shardfarm.io/pool".to_string(), self.pool.clone()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            data: Some([(STATE_KEY.to_string(), text), (LEDGER_KEY.to_string(), ledger)].into()),
            ..Default::default()
        };
        let pp = PostParams::default();
        let written = self.block(async {
            match &version {
                Some(_) => self.api.replace(&self.name, &pp, &cm).await,
                None => self.api.create(&pp, &cm).await,
            }
        });
        match written {
            Ok(cm) => {
                *self.version.lock().unwrap() = cm.metadata.resource_version;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Err(Error::State(format!(
                "ConfigMap {} was written by another operator since this one read it: this \
                 replica no longer leads the pool and must not write its state",
                self.name
            ))),
            Err(e) => Err(self.err("writing", e)),
        }
    }

    fn describe(&self) -> String {
        format!("ConfigMap {}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    use http::{Method, Request, Response, StatusCode};
    use kube::Client;
    use kube::client::Body;
    use serde_json::{Value, json};
    use shardfarm_coordinator::{Coordinator, JoinInput, PoolConfig};
    use shardfarm_core::auth::Caller;
    use shardfarm_core::capacity::{CapacityReport, Machine};
    use shardfarm_core::identity::Identity;
    use tower_test::mock;

    const NS: &str = "farms";

    /// A fake API server for ConfigMaps: GET, POST and PUT with resourceVersion checks, over
    /// objects the test can read and change.
    fn fake_api(objects: Arc<Mutex<HashMap<String, Value>>>) -> Client {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            let mut next_version = 100u64;
            while let Some((req, send)) = handle.next_request().await {
                let (method, path) = (req.method().clone(), req.uri().path().to_string());
                let body = req.into_body().collect_bytes().await.unwrap();
                let name = path.rsplit('/').next().unwrap().to_string();
                let mut map = objects.lock().unwrap();
                let status = |code: u16, reason: &str| {
                    (
                        StatusCode::from_u16(code).unwrap(),
                        json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason }),
                    )
                };
                let (code, reply) = match method {
                    Method::GET => match map.get(&name) {
                        Some(o) => (StatusCode::OK, o.clone()),
                        None => status(404, "NotFound"),
                    },
                    Method::POST | Method::PUT => {
                        let mut o: Value = serde_json::from_slice(&body).unwrap();
                        let name = o["metadata"]["name"].as_str().unwrap().to_string();
                        let current =
                            map.get(&name).map(|c| c["metadata"]["resourceVersion"].clone());
                        let conflict = match (&method, &current) {
                            (&Method::POST, Some(_)) => true,
                            (&Method::PUT, Some(v)) => *v != o["metadata"]["resourceVersion"],
                            (&Method::PUT, None) => true,
                            _ => false,
                        };
                        if conflict {
                            status(409, "Conflict")
                        } else {
                            next_version += 1;
                            o["metadata"]["resourceVersion"] = json!(next_version.to_string());
                            map.insert(name, o.clone());
                            (StatusCode::OK, o)
                        }
                    }
                    _ => status(405, "MethodNotAllowed"),
                };
                send.send_response(
                    Response::builder()
                        .status(code)
                        .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                        .unwrap(),
                );
            }
        });
        Client::new(svc, NS)
    }

    fn store(client: &Client, dir: &std::path::Path) -> KubeStore {
        KubeStore::new(
            Api::namespaced(client.clone(), NS),
            "main",
            dir.join("ledger.jsonl"),
            dir.join("coordinator.json"),
        )
    }

    fn config() -> PoolConfig {
        PoolConfig {
            pool: "main".into(),
            min_difficulty: 4,
            capacity_difficulty: 4,
            partitions: 16,
            farms: [(farm().id().to_hex(), Default::default())].into(),
            ..PoolConfig::default()
        }
    }

    fn farm() -> Identity {
        Identity::from_parts(ed25519_dalek::SigningKey::from_bytes(&[3; 32]), 0)
    }

    /// `id` joins `c` in `zone` as one of the test farm's agents.
    fn join(c: &Coordinator, id: &Identity, zone: &str, port: u16, now: u64) {
        let (challenge, difficulty) = c.challenge(now).unwrap();
        let machine = Machine {
            processors: 1,
            cores_per_processor: 1,
            overhead: 1.0,
            space_reported: 1 << 40,
            space_taken: 0,
        };
        let report = CapacityReport::prove(id, &challenge, difficulty, machine).unwrap();
        let grant = shardfarm_core::grant::FarmGrant::issue(
            &farm(),
            id.public_key(),
            c.identity().id(),
            now / 1000 + 60,
        );
        let input = JoinInput {
            grpc: format!("10.0.0.1:{port}"),
            http: format!("10.0.0.1:{}", port + 1),
            labels: [("zone".to_string(), zone.to_string())].into(),
            capacity_report: report.encode(),
            last_layout: None,
            farm_grant: grant.to_bytes(),
        };
        let caller = Caller { credential: id.credential(), id: id.id(), root: id.id() };
        c.join(&caller, input, now).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_leader_continues_the_pool_from_the_api() {
        let objects = Arc::new(Mutex::new(HashMap::new()));
        let client = fake_api(objects.clone());
        let pool_key = Identity::generate(4, 1, &|_| {}).unwrap().0;
        let now = shardfarm_core::auth::now_ms();

        // The first leader: seven agents join, one leaves the layout by draining: versions go up.
        let first_dir = tempfile::tempdir().unwrap();
        let first = store(&client, first_dir.path());
        let a = tokio::task::spawn_blocking({
            let pool_key = Identity::from_text(&pool_key.to_text(), "key").unwrap();
            let dir = first_dir.path().to_path_buf();
            move || {
                let c = Coordinator::open_with(
                    config(),
                    Box::new(first),
                    &dir.join("ledger.jsonl"),
                    pool_key,
                )
                .unwrap();
                let ids: Vec<Identity> =
                    (0..7).map(|_| Identity::generate(4, 1, &|_| {}).unwrap().0).collect();
                for (i, id) in ids.iter().enumerate() {
                    join(&c, id, &format!("z{}", i % 3), 7000 + 2 * i as u16, now);
                }
                c.tick(now);
                c.drain(&ids[6].id());
                c.tick(now + 1_000);
                (
                    c.layout().unwrap().layout.version,
                    c.layout().unwrap().sequence,
                    ids[6].id(),
                    c.members().len(),
                )
            }
        })
        .await
        .unwrap();
        let (version, sequence, drained, members) = a;
        assert!(version >= 2, "layout version {version}");
        let saved = objects.lock().unwrap()["shardfarm-state-main"].clone();
        assert!(saved["data"]["coordinator.json"].as_str().unwrap().contains(&drained.to_hex()));

        // The leader's pod is gone with its volume; another replica leads, with an empty dir.
        let second_dir = tempfile::tempdir().unwrap();
        let second = store(&client, second_dir.path());
        second.restore_ledger().await.unwrap();
        let (v2, s2, draining, n2) = tokio::task::spawn_blocking({
            let dir = second_dir.path().to_path_buf();
            move || {
                let c = Coordinator::open_with(
                    config(),
                    Box::new(second),
                    &dir.join("ledger.jsonl"),
                    pool_key,
                )
                .unwrap();
                let l = c.layout().expect("the layout continues");
                let draining = c.members().iter().find(|m| m.id == drained).map(|m| m.draining);
                (l.layout.version, l.sequence, draining, c.members().len())
            }
        })
        .await
        .unwrap();
        // Same layout version (never 1 again), a newer sequence, the same members, the drain
        // flag kept.
        assert_eq!(v2, version);
        assert!(s2 > sequence, "sequence {s2} after {sequence}");
        assert_eq!(n2, members);
        assert_eq!(draining, Some(true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_that_lost_the_lease_cannot_overwrite_its_successor() {
        let objects = Arc::new(Mutex::new(HashMap::new()));
        let client = fake_api(objects.clone());
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (store(&client, dir.path()), store(&client, dir.path()));
        tokio::task::spawn_blocking(move || {
            assert_eq!(old.load().unwrap(), None);
            old.save(b"{\"by\":\"old\"}").unwrap();
            // The successor reads and writes.
            assert_eq!(new.load().unwrap().as_deref(), Some(&b"{\"by\":\"old\"}"[..]));
            new.save(b"{\"by\":\"new\"}").unwrap();
            // The old leader, late: refused.
            let err = old.save(b"{\"by\":\"old, late\"}").unwrap_err();
            assert!(err.to_string().contains("no longer leads"), "{err}");
        })
        .await
        .unwrap();
        let saved =
            objects.lock().unwrap()["shardfarm-state-main"]["data"]["coordinator.json"].clone();
        assert_eq!(saved, "{\"by\":\"new\"}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_operator_upgraded_from_volume_state_moves_it_into_the_api() {
        let objects = Arc::new(Mutex::new(HashMap::new()));
        let client = fake_api(objects.clone());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("coordinator.json"), b"{\"legacy\":true}").unwrap();
        std::fs::write(dir.path().join("ledger.jsonl"), b"line\n").unwrap();
        let s = store(&client, dir.path());
        tokio::task::spawn_blocking(move || {
            let doc = s.load().unwrap().unwrap();
            s.save(&doc).unwrap();
        })
        .await
        .unwrap();
        let cm = objects.lock().unwrap()["shardfarm-state-main"].clone();
        assert_eq!(cm["data"]["coordinator.json"], "{\"legacy\":true}");
        assert_eq!(cm["data"]["ledger.jsonl"], "line\n");
    }
}
