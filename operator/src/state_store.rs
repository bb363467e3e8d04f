//! The coordinator's durable state in the Kubernetes API, so any operator replica can lead.
//!
//! The state document (members and their standing, drain flags, the current and fallback
//! layouts with their versions, the epoch) is kept in the ConfigMap
//! `shardfarm-state-<pool>`, in a compact form ([`compact`]): every 64-hex string of the
//! document (node ids, owner roots, farm keys) is written once, in a table (key `nodeIds`, one
//! a line), and stands in the document (key `coordinator.compact.json`) as `~<line>`. A
//! layout of 1024 partitions × RS(10,4) names 14 336 slots, twice (current and fallback):
//! 64 hex digits each came to 1.9 MB, over the 1 MiB a ConfigMap holds; as `"~12"` they are
//! about 200 kB (see the test `the_state_of_1024_partitions_of_rs_10_4_fits_a_configmap`).
//! A state written by an earlier operator under `coordinator.json` is still read.
//!
//! The rewards ledger, which the coordinator
//! appends to a file, is copied into the API every time the state is saved, before it — the
//! coordinator saves right after closing an epoch, so the ledger in the API is never older
//! than the epoch the state says was closed. A ConfigMap holds at most 1 MiB, so the ledger is
//! cut at line boundaries into chunks of at most [`CHUNK`] bytes, `shardfarm-ledger-<pool>-<i>`
//! (key `ledger.jsonl`), and the state ConfigMap records how many (key `ledgerChunks`); a full
//! chunk never changes, so a save rewrites only the last one. Writes carry the resourceVersion last read or
//! written: a replica that lost the Lease and writes late gets a conflict, never overwrites
//! its successor. The coordinator saves before it publishes a layout, so a new leader never
//! publishes a version below one the agents saw.
//!
//! An operator upgraded from one that kept its state only in its volume reads that file once;
//! its first save creates the ConfigMap.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use serde_json::Value;
use shardfarm_coordinator::store::StateStore;
use shardfarm_coordinator::{Error, Result};

/// The ConfigMap's key for the state document as it is (an earlier operator's form, and a
/// document that is not JSON).
pub const STATE_KEY: &str = "coordinator.json";
/// The ConfigMap's key for the state document in its compact form ([`compact`]).
pub const COMPACT_KEY: &str = "coordinator.compact.json";
/// The ConfigMap's key for the id table of the compact form: one 64-hex id a line.
pub const IDS_KEY: &str = "nodeIds";

/// The mark of a table reference in the compact form (`~12`); a string of the document that
/// starts with it is written with another in front (`~~x` for `~x`).
const MARK: char = '~';

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The compact form of a JSON `document`: the document with every string (value or key) of
/// 64 lower-case hex digits replaced by `~<n>`, `n` its line in the returned table. None if
/// the document is not JSON (it is then stored as it is).
pub fn compact(document: &[u8]) -> Option<(String, String)> {
    fn squeeze(s: String, ids: &mut Vec<String>, index: &mut HashMap<String, usize>) -> String {
        if is_id(&s) {
            let n = *index.entry(s.clone()).or_insert_with(|| {
                ids.push(s);
                ids.len() - 1
            });
            format!("{MARK}{n}")
        } else if s.starts_with(MARK) {
            format!("{MARK}{s}")
        } else {
            s
        }
    }
    fn walk(v: Value, ids: &mut Vec<String>, index: &mut HashMap<String, usize>) -> Value {
        match v {
            Value::String(s) => Value::String(squeeze(s, ids, index)),
            Value::Array(a) => Value::Array(a.into_iter().map(|v| walk(v, ids, index)).collect()),
            Value::Object(m) => Value::Object(
                m.into_iter().map(|(k, v)| (squeeze(k, ids, index), walk(v, ids, index))).collect(),
            ),
            other => other,
        }
    }
    let doc: Value = serde_json::from_slice(document).ok()?;
    let (mut ids, mut index) = (Vec::new(), HashMap::new());
    let doc = walk(doc, &mut ids, &mut index);
    Some((serde_json::to_string(&doc).expect("a JSON value"), ids.join("\n")))
}

/// The document whose compact form is `doc` with the id table `ids` ([`compact`]).
pub fn expand(doc: &str, ids: &str) -> std::result::Result<Vec<u8>, String> {
    let ids: Vec<&str> = ids.lines().collect();
    let open = |s: String| -> std::result::Result<String, String> {
        match s.strip_prefix(MARK) {
            None => Ok(s),
            Some(rest) if rest.starts_with(MARK) => Ok(rest.to_string()),
            Some(rest) => rest
                .parse::<usize>()
                .ok()
                .and_then(|n| ids.get(n))
                .map(|id| id.to_string())
                .ok_or_else(|| format!("`{s}` names no id of the table ({} ids)", ids.len())),
        }
    };
    fn walk(
        v: Value,
        open: &dyn Fn(String) -> std::result::Result<String, String>,
    ) -> std::result::Result<Value, String> {
        Ok(match v {
            Value::String(s) => Value::String(open(s)?),
            Value::Array(a) => Value::Array(
                a.into_iter().map(|v| walk(v, open)).collect::<std::result::Result<_, _>>()?,
            ),
            Value::Object(m) => Value::Object(
                m.into_iter()
                    .map(|(k, v)| Ok((open(k)?, walk(v, open)?)))
                    .collect::<std::result::Result<_, String>>()?,
            ),
            other => other,
        })
    }
    let doc: Value = serde_json::from_str(doc).map_err(|e| e.to_string())?;
    Ok(serde_json::to_vec(&walk(doc, &open)?).expect("a JSON value"))
}
/// A ledger chunk's key.
pub const LEDGER_KEY: &str = "ledger.jsonl";
/// The state ConfigMap's key for the number of ledger chunks.
pub const CHUNKS_KEY: &str = "ledgerChunks";
/// Most bytes of ledger in one ConfigMap (half the API's 1 MiB object limit).
pub const CHUNK: usize = 512 * 1024;

/// `text` (whole lines) cut into chunks of at most `max` bytes, at line ends (a longer line
/// is a chunk of its own).
fn chunks(text: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut end = 0;
    for line in text.split_inclusive('\n') {
        if end > start && end - start + line.len() > max {
            out.push(&text[start..end]);
            start = end;
        }
        end += line.len();
    }
    if end > start {
        out.push(&text[start..end]);
    }
    out
}

/// The name of the ConfigMap holding chunk `i` of `pool`'s ledger.
pub fn ledger_chunk_name(pool: &str, i: usize) -> String {
    format!("shardfarm-ledger-{pool}-{i}")
}

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
    /// The ledger chunks written so far (their contents), so unchanged ones are not rewritten.
    written: Mutex<Vec<String>>,
    /// Cancelled when another replica is found to have written the state: this one no longer
    /// leads and must stop (its process exits, and it comes back as a standby).
    deposed: Option<tokio_util::sync::CancellationToken>,
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
            written: Mutex::new(Vec::new()),
            deposed: None,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// The same store, cancelling `stop` when it finds another replica wrote the state.
    pub fn stopping(mut self, stop: tokio_util::sync::CancellationToken) -> Self {
        self.deposed = Some(stop);
        self
    }

    /// Another replica wrote the state since this one read it.
    fn deposed(&self) -> Error {
        tracing::error!(configmap = %self.name, "another operator wrote the pool's state: this replica no longer leads; stopping");
        if let Some(stop) = &self.deposed {
            stop.cancel();
        }
        Error::State(format!(
            "ConfigMap {} was written by another operator since this one read it: this \
             replica no longer leads the pool and must not write its state",
            self.name
        ))
    }

    /// Restores the ledger file from the API if the file is missing or shorter (a new leader
    /// on a fresh volume). Call before opening the coordinator.
    pub async fn restore_ledger(&self) -> anyhow::Result<()> {
        let Some(cm) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let n: usize = cm
            .data
            .as_ref()
            .and_then(|d| d.get(CHUNKS_KEY))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let mut text = String::new();
        let mut written = Vec::new();
        for i in 0..n {
            let name = ledger_chunk_name(&self.pool, i);
            let chunk = self
                .api
                .get_opt(&name)
                .await?
                .and_then(|c| c.data?.remove(LEDGER_KEY))
                .ok_or_else(|| {
                    anyhow::anyhow!("ConfigMap {name} (ledger chunk {i} of {n}) is missing")
                })?;
            text.push_str(&chunk);
            written.push(chunk);
        }
        *self.written.lock().unwrap() = written;
        let local = std::fs::metadata(&self.ledger).map_or(0, |m| m.len());
        if (text.len() as u64) > local {
            if let Some(dir) = self.ledger.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.ledger.with_extension("jsonl.tmp");
            std::fs::write(&tmp, &text)?;
            std::fs::rename(&tmp, &self.ledger)?;
            tracing::info!(chunks = n, bytes = text.len(), "restored the ledger from the API");
        }
        Ok(())
    }

    /// Writes the ledger chunks that changed; returns how many there are.
    fn save_ledger(&self) -> Result<usize> {
        let text = match std::fs::read_to_string(&self.ledger) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&self.ledger, e)),
        };
        let parts = chunks(&text, CHUNK);
        let mut written = self.written.lock().unwrap();
        let changed = parts.iter().enumerate().any(|(i, p)| written.get(i).is_none_or(|w| w != p));
        if changed && let Some(mine) = self.version.lock().unwrap().clone() {
            // Chunks carry no version of their own: before rewriting one, make sure the state
            // is still as this replica left it (a deposed leader must not touch its
            // successor's ledger).
            let current = self
                .block(self.api.get_opt(&self.name))
                .map_err(|e| self.err("reading", e))?
                .and_then(|cm| cm.metadata.resource_version);
            if current.as_deref() != Some(mine.as_str()) {
                return Err(self.deposed());
            }
        }
        for (i, part) in parts.iter().enumerate() {
            if written.get(i).is_some_and(|w| w == part) {
                continue;
            }
            let name = ledger_chunk_name(&self.pool, i);
            let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": { "name": name, "labels": {
                    "app.kubernetes.io/managed-by": "shardfarm-operator",
                    "shardfarm.io/pool": crate::api_rules::label_value(&self.pool),
                } },
                "data": { LEDGER_KEY: part },
            }))
            .expect("a ConfigMap");
            let pp = kube::api::PatchParams::apply("shardfarm-operator").force();
            self.block(self.api.patch(&name, &pp, &kube::api::Patch::Apply(&cm)))
                .map_err(|e| Error::State(format!("ConfigMap {name}: writing: {e}")))?;
            if written.len() > i {
                written[i] = part.to_string();
            } else {
                written.push(part.to_string());
            }
        }
        Ok(parts.len())
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
                let mut data = cm.data.unwrap_or_default();
                match data.remove(COMPACT_KEY) {
                    Some(doc) => expand(&doc, &data.remove(IDS_KEY).unwrap_or_default())
                        .map(Some)
                        .map_err(|e| self.err("reading the compact state", e)),
                    None => Ok(data.remove(STATE_KEY).map(String::into_bytes)),
                }
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
        // The ledger first: the state never names an epoch whose rewards the API lacks.
        let chunks = self.save_ledger()?;
        let mut data: std::collections::BTreeMap<String, String> = match compact(document) {
            Some((doc, ids)) => [(COMPACT_KEY.to_string(), doc), (IDS_KEY.to_string(), ids)].into(),
            None => [(STATE_KEY.to_string(), text)].into(),
        };
        data.insert(CHUNKS_KEY.to_string(), chunks.to_string());
        let size: usize = data.values().map(String::len).sum();
        if size > crate::api_rules::MAX_DATA {
            // Said plainly, not left to the API server's 422 on every save.
            return Err(self.err(
                "writing",
                format!(
                    "the pool's state is {size} bytes in its compact form, more than the \
                     {} a ConfigMap holds",
                    crate::api_rules::MAX_DATA
                ),
            ));
        }
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
                        (
                            "shardfarm.io/pool".to_string(),
                            crate::api_rules::label_value(&self.pool),
                        ),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            data: Some(data),
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
            Err(kube::Error::Api(e)) if e.code == 409 => Err(self.deposed()),
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

    #[test]
    fn a_ledger_is_cut_at_line_ends_into_bounded_chunks() {
        let text = "aaaa\nbbbb\ncc\ndddddddddd\ne\n";
        let parts = chunks(text, 10);
        assert_eq!(parts, ["aaaa\nbbbb\n", "cc\n", "dddddddddd\n", "e\n"]);
        assert_eq!(parts.concat(), text);
        assert!(chunks("", 10).is_empty());
    }

    /// A pool's state as the coordinator writes it: `members` members (each with a week of
    /// uptime), a current and a fallback layout of `partitions` × RS(10,4).
    fn big_state(members: usize, partitions: usize) -> Value {
        use shardfarm_coordinator::economics::Day;
        let ms: Vec<shardfarm_coordinator::Member> = (0..members)
            .map(|i| {
                let mut m = crate::controller::fixtures::member(
                    &format!("node-{i}"),
                    &format!("zone-{}", i % 16),
                    &[("farm", &format!("farm-{}", i % 16)), ("pod", &format!("farm-{i}"))],
                );
                m.grpc = format!("farm-{i}.farm-agents.farms.svc:7400");
                m.http = format!("farm-{i}.farm-agents.farms.svc:7401");
                m.uptime.days = (0..7)
                    .map(|d| Day { day: 20_000 + d, up_ms: 86_000_000, observed_ms: 86_400_000 })
                    .collect();
                m
            })
            .collect();
        let layout = |version: u64, shift: usize| shardfarm_core::placement::Layout {
            version,
            k: 10,
            m: 4,
            partitions: (0..partitions)
                .map(|p| (0..14).map(|s| ms[(p * 7 + s * 13 + shift) % members].id).collect())
                .collect(),
        };
        json!({
            "version": 1,
            "nodes": ms.iter().map(|m| (m.id.to_hex(), serde_json::to_value(m).unwrap()))
                .collect::<serde_json::Map<_, _>>(),
            "layout": layout(41, 0),
            "previous": layout(40, 1),
            "layout_published_ms": 1_800_000_000_000u64,
            "epoch": 12,
            "deferred": 0,
            "publication": 1_800_000_000_001u64,
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_state_of_1024_partitions_of_rs_10_4_fits_a_configmap() {
        let doc = big_state(300, 1024);
        let bytes = serde_json::to_vec(&doc).unwrap();
        // As it was written before, the API server refuses it.
        let old = json!({ "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": "shardfarm-state-main" },
            "data": { STATE_KEY: String::from_utf8(bytes.clone()).unwrap(), CHUNKS_KEY: "0" } });
        let refused = check_write(Write::Create, "/api/v1/namespaces/farms/configmaps", &old, None)
            .unwrap_err();
        assert_eq!(refused.code, 422);
        assert!(
            refused.message().ends_with("[]: Too long: may not be more than 1048576 bytes"),
            "{}",
            refused.message()
        );
        // Now it is saved through the API server's rules and read back whole.
        let objects = Arc::new(Mutex::new(HashMap::new()));
        let client = fake_api(objects.clone());
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (store(&client, dir.path()), store(&client, dir.path()));
        let read = tokio::task::spawn_blocking(move || {
            first.save(&bytes).unwrap();
            second.load().unwrap().unwrap()
        })
        .await
        .unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&read).unwrap(), doc);
        let cm = objects.lock().unwrap()["shardfarm-state-main"].clone();
        let size: usize =
            cm["data"].as_object().unwrap().values().map(|v| v.as_str().unwrap().len()).sum();
        // With room to spare: the size of the state is no longer set by the layouts.
        assert!(size < 512 * 1024, "{size} bytes");
    }

    #[test]
    fn the_compact_form_reads_back_every_string() {
        let id = "ab".repeat(32);
        let doc = json!({ id.clone(): [id.clone(), "~x", "~~", "~1", "AB".repeat(32), 3, null],
                          "k": { "~": id.clone() } });
        let (c, ids) = compact(&serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(ids, id);
        assert!(!c.contains(&id), "{c}");
        let back: Value = serde_json::from_slice(&expand(&c, &ids).unwrap()).unwrap();
        assert_eq!(back, doc);
        assert!(compact(b"not json").is_none());
        assert!(expand("[\"~7\"]", &id).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_ledger_spans_configmaps_and_is_restored_whole() {
        let objects = Arc::new(Mutex::new(HashMap::new()));
        let client = fake_api(objects.clone());
        let dir = tempfile::tempdir().unwrap();
        // 1.5 MiB of ledger: three chunks, none over the API's object limit.
        let line = format!("{}\n", "x".repeat(1023));
        let text = line.repeat(1536);
        std::fs::write(dir.path().join("ledger.jsonl"), &text).unwrap();
        let s = store(&client, dir.path());
        tokio::task::spawn_blocking(move || s.save(b"{}").unwrap()).await.unwrap();
        assert_eq!(objects.lock().unwrap()["shardfarm-state-main"]["data"]["ledgerChunks"], "3");
        for i in 0..3 {
            let cm = &objects.lock().unwrap()[&format!("shardfarm-ledger-main-{i}")];
            assert!(cm["data"]["ledger.jsonl"].as_str().unwrap().len() <= CHUNK);
        }
        // A new leader on an empty volume gets the whole ledger back.
        let fresh = tempfile::tempdir().unwrap();
        store(&client, fresh.path()).restore_ledger().await.unwrap();
        assert_eq!(std::fs::read_to_string(fresh.path().join("ledger.jsonl")).unwrap(), text);
    }
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

    use crate::api_rules::{Write, check_write};

    const NS: &str = "farms";

    /// A fake API server for ConfigMaps: GET, POST, PUT and PATCH judged by the rules of
    /// kube-apiserver (`api_rules::check_write`: sizes, names, labels, resourceVersion
    /// conflicts), over objects the test can read and change.
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
                    Method::PATCH | Method::POST | Method::PUT => {
                        // Judged as kube-apiserver would (sizes, names, labels, versions).
                        let mut o: Value = serde_json::from_slice(&body).unwrap();
                        let (write, name) = match method {
                            Method::POST => (
                                Write::Create,
                                o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                            ),
                            Method::PUT => (Write::Replace, name),
                            _ => (Write::Patch, name),
                        };
                        let stored = map.get(&name);
                        if write == Write::Replace && stored.is_none() {
                            status(404, "NotFound")
                        } else {
                            match check_write(write, &path, &o, stored) {
                                Err(r) => (StatusCode::from_u16(r.code).unwrap(), r.status),
                                Ok(()) => {
                                    next_version += 1;
                                    o["metadata"]["resourceVersion"] =
                                        json!(next_version.to_string());
                                    map.insert(name, o.clone());
                                    (StatusCode::OK, o)
                                }
                            }
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

    /// The state document a stored ConfigMap holds.
    fn state_in(cm: &Value) -> String {
        let data = &cm["data"];
        let doc = expand(data[COMPACT_KEY].as_str().unwrap(), data[IDS_KEY].as_str().unwrap());
        String::from_utf8(doc.unwrap()).unwrap()
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
        assert!(state_in(&saved).contains(&drained.to_hex()));
        // In the compact form the drained node's id is written once, in the table.
        assert!(!saved["data"][COMPACT_KEY].as_str().unwrap().contains(&drained.to_hex()));

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
        let stop = tokio_util::sync::CancellationToken::new();
        let (old, new) =
            (store(&client, dir.path()).stopping(stop.clone()), store(&client, dir.path()));
        let deposed = stop.clone();
        tokio::task::spawn_blocking(move || {
            assert_eq!(old.load().unwrap(), None);
            std::fs::write(old.ledger.clone(), "epoch 1\n").unwrap();
            old.save(b"{\"by\":\"old\"}").unwrap();
            // The successor reads and writes.
            assert_eq!(new.load().unwrap().as_deref(), Some(&b"{\"by\":\"old\"}"[..]));
            new.save(b"{\"by\":\"new\"}").unwrap();
            // The old leader, late: refused.
            assert!(!deposed.is_cancelled());
            // The old leader closes an epoch late: neither its ledger nor its state lands.
            std::fs::write(old.ledger.clone(), "epoch 1\nepoch 2 by the old leader\n").unwrap();
            let err = old.save(b"{\"by\":\"old, late\"}").unwrap_err();
            assert!(err.to_string().contains("no longer leads"), "{err}");
            // …and it stops: its process exits and comes back as a standby.
            assert!(deposed.is_cancelled());
        })
        .await
        .unwrap();
        let saved = state_in(&objects.lock().unwrap()["shardfarm-state-main"]);
        assert_eq!(saved, "{\"by\":\"new\"}");
        let ledger =
            objects.lock().unwrap()["shardfarm-ledger-main-0"]["data"]["ledger.jsonl"].clone();
        assert_eq!(ledger, "epoch 1\n");
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
        assert_eq!(state_in(&cm), "{\"legacy\":true}");
        assert_eq!(cm["data"]["ledgerChunks"], "1");
        assert_eq!(
            objects.lock().unwrap()["shardfarm-ledger-main-0"]["data"]["ledger.jsonl"],
            "line\n"
        );
    }
}
