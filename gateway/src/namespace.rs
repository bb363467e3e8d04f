//! The gateway's namespace: buckets and keys, in an embedded index for speed and in the pool
//! itself as an encrypted, signed log for durability.
//!
//! Every change (a bucket created or deleted, an object put or deleted) is first written to
//! the pool as the next entry of the log, then applied to the index (RocksDB), and only then
//! acknowledged to the S3 client. Entry `seq` is a pool object whose key is derived from the
//! gateway's root key and `seq`: nobody without the root key can find or read it (nodes hold
//! ciphertext), everyone can check it was signed by the root key (the segment headers are),
//! and a gateway with the same root key and an empty disk finds entry 0, 1, 2, … again and
//! rebuilds the index from them. Concurrent changes share one entry (group commit).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use shardfarm_client::PoolClient;
use shardfarm_core::cap::ReadCap;
use tokio::sync::{mpsc, oneshot};

/// Domain separation of the log's object keys.
const LOG_DOMAIN: &[u8] = b"shardfarm-gateway-log-v1";
/// Most changes one log entry carries.
const MAX_OPS_PER_ENTRY: usize = 1000;
/// Largest log entry read back (a thousand object records are ~1 MiB).
const MAX_ENTRY_BYTES: usize = 16 << 20;
/// Index keys: the next log sequence number, and the entry being written (its exact bytes).
const NEXT_SEQ: &[u8] = b"m/next_seq";
const PENDING: &[u8] = b"m/pending";
/// The id of the root key whose log the index follows.
const ROOT_ID: &[u8] = b"m/root";

/// One stored piece of an object: a pool object (a multipart object has one per part).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Piece {
    /// Its read capability (`sf2:…`).
    pub cap: String,
    /// Its length.
    pub size: u64,
    /// Its segment size (ranged reads find their segments without asking).
    pub segment_size: u64,
}

/// An object: what S3 shows of it and where its bytes are.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ObjectRecord {
    /// Its pieces, in order.
    pub pieces: Vec<Piece>,
    /// Total length.
    pub size: u64,
    /// The S3 ETag, without quotes (MD5 of the bytes, or of the parts' MD5s + "-N").
    pub etag: String,
    /// Content-Type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// User metadata (x-amz-meta-*).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Last modified, unix milliseconds.
    pub modified_ms: u64,
    /// The access key that stored it (only it may overwrite or delete it).
    pub owner: String,
    /// The standard HTTP headers stored with it and returned by GET and HEAD.
    #[serde(default, skip_serializing_if = "HttpHeaders::is_empty")]
    pub headers: HttpHeaders,
}

/// The HTTP headers S3 stores with an object (set on PUT, CopyObject with REPLACE, or
/// CreateMultipartUpload) and returns on GET and HEAD.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct HttpHeaders {
    /// Cache-Control.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<String>,
    /// Content-Disposition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_disposition: Option<String>,
    /// Content-Encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// Content-Language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_language: Option<String>,
    /// Expires, unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
}

impl HttpHeaders {
    /// Whether none is set.
    pub fn is_empty(&self) -> bool {
        *self == HttpHeaders::default()
    }
}

/// A multipart upload that completed: a retried CompleteMultipartUpload answers it again.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct CompletedUpload {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// The access key that completed it.
    pub owner: String,
    /// The object's ETag, without quotes.
    pub etag: String,
    /// When it completed, unix milliseconds.
    pub completed_ms: u64,
}

/// How long a completed upload is remembered, so that an SDK retrying a CompleteMultipartUpload
/// whose answer it lost (a timeout, a dropped connection) gets the same answer again. SDKs retry
/// within seconds to minutes; a day covers any retry policy and costs ~200 bytes per upload.
pub const COMPLETED_UPLOAD_TTL_MS: u64 = 24 * 3600 * 1000;

/// A bucket.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct BucketRecord {
    /// The access key that created it (only it may delete it).
    pub owner: String,
    /// Creation, unix milliseconds.
    pub created_ms: u64,
}

/// One change to the namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
// Ops live briefly (one request, one log entry) and few at a time: the object record inline is
// simpler than a Box, and the JSON is the same either way.
#[allow(clippy::large_enum_variant)]
pub enum Op {
    /// A bucket is created.
    CreateBucket {
        /// Name.
        bucket: String,
        /// Record.
        record: BucketRecord,
    },
    /// A bucket is deleted (it is empty).
    DeleteBucket {
        /// Name.
        bucket: String,
    },
    /// An object is stored (replacing any object of that key).
    PutObject {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
        /// Record.
        record: ObjectRecord,
        /// The multipart upload this completes, if any (remembered for retried Completes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload: Option<String>,
    },
    /// An object is deleted.
    DeleteObject {
        /// Bucket.
        bucket: String,
        /// Key.
        key: String,
    },
}

/// A log entry as stored in the pool.
#[derive(Serialize, Deserialize, Debug)]
struct Entry {
    seq: u64,
    ops: Vec<Op>,
}

/// The embedded index.
pub struct Index {
    db: rocksdb::DB,
}

fn bucket_key(bucket: &str) -> Vec<u8> {
    format!("b/{bucket}").into_bytes()
}

/// The index key of a completed multipart upload.
fn completed_key(id: &str) -> Vec<u8> {
    format!("c/{id}").into_bytes()
}

/// The index key of an object: bucket names cannot contain `/`, so keys sort within their
/// bucket by their bytes.
pub fn object_key(bucket: &str, key: &str) -> Vec<u8> {
    format!("o/{bucket}/{key}").into_bytes()
}

impl Index {
    /// Opens (or creates) the index in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, dir)
            .with_context(|| format!("opening the gateway index in {}", dir.display()))?;
        Ok(Index { db })
    }

    /// The next log sequence number (entries below it are applied).
    pub fn next_seq(&self) -> anyhow::Result<u64> {
        Ok(match self.db.get(NEXT_SEQ)? {
            Some(v) => u64::from_le_bytes(v[..].try_into().context("corrupt index: next_seq")?),
            None => 0,
        })
    }

    /// Applies entry `seq`'s changes and moves the sequence past it, atomically and durably.
    fn apply(&self, seq: u64, ops: &[Op]) -> anyhow::Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        for op in ops {
            match op {
                Op::CreateBucket { bucket, record } => {
                    batch.put(bucket_key(bucket), serde_json::to_vec(record)?)
                }
                Op::DeleteBucket { bucket } => batch.delete(bucket_key(bucket)),
                Op::PutObject { bucket, key, record, upload } => {
                    batch.put(object_key(bucket, key), serde_json::to_vec(record)?);
                    if let Some(id) = upload {
                        let done = CompletedUpload {
                            bucket: bucket.clone(),
                            key: key.clone(),
                            owner: record.owner.clone(),
                            etag: record.etag.clone(),
                            completed_ms: record.modified_ms,
                        };
                        batch.put(completed_key(id), serde_json::to_vec(&done)?)
                    }
                }
                Op::DeleteObject { bucket, key } => batch.delete(object_key(bucket, key)),
            }
        }
        batch.put(NEXT_SEQ, (seq + 1).to_le_bytes());
        batch.delete(PENDING);
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.db.write_opt(batch, &w)?;
        Ok(())
    }

    /// The entry being written, if a write did not finish: its exact bytes.
    fn pending(&self) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.db.get(PENDING)?)
    }

    /// Records the bytes of the entry about to be written (synced), so that whatever happens
    /// to the write, that sequence number is only ever written with these bytes: its object
    /// key is derived, and one key must never encrypt two contents.
    fn set_pending(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        Ok(self.db.put_opt(PENDING, bytes, &w)?)
    }

    /// Checks that the index follows the log of `root` (and records it for an empty index).
    pub fn check_root(&self, root: &shardfarm_core::identity::NodeId) -> anyhow::Result<()> {
        match self.db.get(ROOT_ID)? {
            Some(id) if id[..] == root.0 => Ok(()),
            Some(id) => bail!(
                "this index follows the namespace log of root key {}, not {root}: start the \
                 gateway with that key (a log cannot move to another key), or with an empty \
                 --data to start a new namespace",
                hex::encode(id)
            ),
            None => Ok(self.db.put(ROOT_ID, root.0)?),
        }
    }

    /// A bucket's record.
    pub fn bucket(&self, bucket: &str) -> anyhow::Result<Option<BucketRecord>> {
        self.db
            .get(bucket_key(bucket))?
            .map(|v| serde_json::from_slice(&v).context("corrupt bucket record"))
            .transpose()
    }

    /// Every bucket, by name.
    pub fn buckets(&self) -> anyhow::Result<Vec<(String, BucketRecord)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(b"b/") {
            let (k, v) = item?;
            let Some(name) = k.strip_prefix(b"b/") else { break };
            out.push((String::from_utf8_lossy(name).into_owned(), serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    /// An object's record.
    pub fn object(&self, bucket: &str, key: &str) -> anyhow::Result<Option<ObjectRecord>> {
        self.db
            .get(object_key(bucket, key))?
            .map(|v| serde_json::from_slice(&v).context("corrupt object record"))
            .transpose()
    }

    /// A multipart upload completed less than [`COMPLETED_UPLOAD_TTL_MS`] ago.
    pub fn completed_upload(&self, id: &str) -> anyhow::Result<Option<CompletedUpload>> {
        let Some(v) = self.db.get(completed_key(id))? else { return Ok(None) };
        let done: CompletedUpload =
            serde_json::from_slice(&v).context("corrupt completed upload record")?;
        let fresh = done.completed_ms.saturating_add(COMPLETED_UPLOAD_TTL_MS)
            > shardfarm_core::auth::now_ms();
        Ok(fresh.then_some(done))
    }

    /// Forgets completed uploads older than [`COMPLETED_UPLOAD_TTL_MS`]; returns how many.
    /// They are derived from the log (a rebuilt index has them again until the next pass),
    /// so they are dropped from the index only, not through the log.
    pub fn forget_completed_uploads(&self) -> anyhow::Result<usize> {
        let cutoff = shardfarm_core::auth::now_ms().saturating_sub(COMPLETED_UPLOAD_TTL_MS);
        let mut batch = rocksdb::WriteBatch::default();
        let mut n = 0;
        for item in self.db.prefix_iterator(b"c/") {
            let (k, v) = item?;
            if !k.starts_with(b"c/") {
                break;
            }
            let old = match serde_json::from_slice::<CompletedUpload>(&v) {
                Ok(d) => d.completed_ms < cutoff,
                Err(_) => true,
            };
            if old {
                batch.delete(k);
                n += 1;
            }
        }
        self.db.write(batch)?;
        Ok(n)
    }

    /// Objects of `bucket` whose keys start with `prefix` and sort after `after`, in key
    /// order, calling `f` until it returns false.
    pub fn scan(
        &self,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        mut f: impl FnMut(String, ObjectRecord) -> bool,
    ) -> anyhow::Result<()> {
        let base = object_key(bucket, "");
        let start = match after {
            // The first key strictly after `after`.
            Some(a) if a >= prefix => {
                let mut k = object_key(bucket, a);
                k.push(0);
                k
            }
            _ => object_key(bucket, prefix),
        };
        let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
        for item in self.db.iterator(mode) {
            let (k, v) = item?;
            let Some(key) = k.strip_prefix(&base[..]) else { break };
            let key = String::from_utf8_lossy(key).into_owned();
            if !key.starts_with(prefix) {
                break;
            }
            if !f(key, serde_json::from_slice(&v)?) {
                break;
            }
        }
        Ok(())
    }

    /// Whether `bucket` holds any object.
    pub fn bucket_is_empty(&self, bucket: &str) -> anyhow::Result<bool> {
        let mut empty = true;
        self.scan(bucket, "", None, |_, _| {
            empty = false;
            false
        })?;
        Ok(empty)
    }

    /// A value of the gateway's own (uploads in progress), outside the log.
    pub fn get_local(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.db.get(format!("l/{key}"))?)
    }

    /// Stores a value of the gateway's own.
    pub fn put_local(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        Ok(self.db.put(format!("l/{key}"), value)?)
    }

    /// Deletes values of the gateway's own whose keys start with `prefix`.
    pub fn delete_local_prefix(&self, prefix: &str) -> anyhow::Result<()> {
        let p = format!("l/{prefix}");
        let mut batch = rocksdb::WriteBatch::default();
        for item in self.db.prefix_iterator(p.as_bytes()) {
            let (k, _) = item?;
            if !k.starts_with(p.as_bytes()) {
                break;
            }
            batch.delete(k);
        }
        Ok(self.db.write(batch)?)
    }

    /// Values of the gateway's own whose keys start with `prefix`, in key order.
    pub fn scan_local(&self, prefix: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let p = format!("l/{prefix}");
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(p.as_bytes()) {
            let (k, v) = item?;
            let Some(rest) = k.strip_prefix(b"l/") else { break };
            if !k.starts_with(p.as_bytes()) {
                break;
            }
            out.push((String::from_utf8_lossy(rest).into_owned(), v.to_vec()));
        }
        Ok(out)
    }
}

// ---- Conditional changes ----
//
// A change may carry conditions on the objects it touches (S3's If-None-Match: * and If-Match,
// and the rule that only an object's owner may replace or delete it). They are decided by the
// log writer, the one task that orders every change, against the index as it will be once the
// changes ahead of it in the same entry are applied: nothing can commit between the check and
// the change, whatever the callers' locks. Two create-only PUTs of one key therefore cannot
// both win — the second is checked against a namespace that already holds the first. Only the
// changes whose conditions held are written to the log, so replaying it needs no conditions.

/// What a change requires of one object before it may commit.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// No object under the key (If-None-Match: *).
    Absent,
    /// An object whose ETag is this one (If-Match); `None` for any object (If-Match: *).
    ETag(Option<String>),
    /// No object, or one stored by this access key.
    OwnedByOrAbsent(String),
}

/// A condition on `bucket/key`.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// What it requires.
    pub expect: Expect,
}

/// Why a conditional change was not committed.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The object exists (Absent), or its ETag differs (ETag): S3's 412 PreconditionFailed.
    PreconditionFailed,
    /// There is no object (ETag): S3's 404 NoSuchKey.
    NoSuchKey,
    /// Another access key stored the object.
    NotOwner,
}

/// The outcome of a commit.
#[derive(Debug)]
pub enum CommitError {
    /// A condition did not hold: nothing was written.
    Refused(Refusal),
    /// The log could not be written (the pool refused, the gateway stops).
    Failed(anyhow::Error),
}

impl Check {
    /// Whether this condition holds for `current` (the object under its key, if any).
    pub fn verdict(&self, current: Option<&ObjectRecord>) -> Result<(), Refusal> {
        match (&self.expect, current) {
            (Expect::Absent, None) => Ok(()),
            (Expect::Absent, Some(_)) => Err(Refusal::PreconditionFailed),
            (Expect::ETag(_), None) => Err(Refusal::NoSuchKey),
            (Expect::ETag(None), Some(_)) => Ok(()),
            (Expect::ETag(Some(e)), Some(o)) if *e == o.etag => Ok(()),
            (Expect::ETag(Some(_)), Some(_)) => Err(Refusal::PreconditionFailed),
            (Expect::OwnedByOrAbsent(_), None) => Ok(()),
            (Expect::OwnedByOrAbsent(a), Some(o)) if *a == o.owner => Ok(()),
            (Expect::OwnedByOrAbsent(_), Some(_)) => Err(Refusal::NotOwner),
        }
    }
}

/// What each committed change replaced: the object records its keys held before it (`None`
/// where there was none, and for bucket changes), in the order of the ops.
pub type Replaced = Vec<Option<ObjectRecord>>;

/// Changes waiting for the next entry, their conditions, and whom to tell how it went.
struct Pending {
    checks: Vec<Check>,
    ops: Vec<Op>,
    done: oneshot::Sender<Result<Replaced, Result<Refusal, String>>>,
}

/// The log writer: commits changes to the pool, then to the index.
#[derive(Clone)]
pub struct Log {
    tx: mpsc::Sender<Pending>,
}

/// The object key of log entry `seq`.
fn entry_key(root: &ed25519_dalek::SigningKey, seq: u64) -> [u8; 32] {
    shardfarm_core::identity::blake2b256(&[LOG_DOMAIN, &root.to_bytes(), &seq.to_le_bytes()])
}

/// The (bucket, key) an op changes, if it changes an object.
fn op_object(op: &Op) -> Option<(&str, &str)> {
    match op {
        Op::PutObject { bucket, key, .. } | Op::DeleteObject { bucket, key } => Some((bucket, key)),
        _ => None,
    }
}

/// Decides which pending changes commit: each is checked against the index as changed by
/// those before it in `batch`. Returns the ops to write and, per pending change, what it
/// replaced or why it was refused.
#[allow(clippy::type_complexity)]
fn decide(
    index: &Index,
    batch: &[Pending],
) -> anyhow::Result<(Vec<Op>, Vec<Result<Replaced, Refusal>>)> {
    use std::collections::HashMap;
    let mut view: HashMap<(String, String), Option<ObjectRecord>> = HashMap::new();
    let current = |view: &mut HashMap<(String, String), Option<ObjectRecord>>,
                   bucket: &str,
                   key: &str|
     -> anyhow::Result<Option<ObjectRecord>> {
        let k = (bucket.to_string(), key.to_string());
        if let Some(v) = view.get(&k) {
            return Ok(v.clone());
        }
        let v = index.object(bucket, key)?;
        view.insert(k, v.clone());
        Ok(v)
    };
    let (mut ops, mut verdicts) = (Vec::new(), Vec::new());
    for p in batch {
        let mut refused = None;
        for c in &p.checks {
            if let Err(r) = c.verdict(current(&mut view, &c.bucket, &c.key)?.as_ref()) {
                refused = Some(r);
                break;
            }
        }
        if let Some(r) = refused {
            verdicts.push(Err(r));
            continue;
        }
        let mut replaced = Vec::new();
        for op in &p.ops {
            match op_object(op) {
                Some((bucket, key)) => {
                    replaced.push(current(&mut view, bucket, key)?);
                    let new = match op {
                        Op::PutObject { record, .. } => Some(record.clone()),
                        _ => None,
                    };
                    view.insert((bucket.to_string(), key.to_string()), new);
                }
                None => replaced.push(None),
            }
            ops.push(op.clone());
        }
        verdicts.push(Ok(replaced));
    }
    Ok((ops, verdicts))
}

impl Log {
    /// Starts the writer. `root` is the client of the gateway's root identity: it signs the
    /// entries, and its key derives their object keys.
    pub fn start(root: Arc<PoolClient>, index: Arc<Index>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Pending>(1024);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut count = first.ops.len();
                let mut batch = vec![first];
                while count < MAX_OPS_PER_ENTRY {
                    match rx.try_recv() {
                        Ok(p) => {
                            count += p.ops.len();
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
                // An entry left unwritten by an earlier failure lands first: the checks must
                // see the namespace its changes make.
                let decided = match finish_pending(&root, &index).await {
                    Ok(()) => decide(&index, &batch),
                    Err(e) => Err(e),
                };
                let (ops, verdicts) = match decided {
                    Ok(d) => d,
                    Err(e) => {
                        let e = format!("{e:#}");
                        tracing::error!(error = %e, "could not decide the namespace changes");
                        for p in batch {
                            let _ = p.done.send(Err(Err(e.clone())));
                        }
                        continue;
                    }
                };
                let r = if ops.is_empty() {
                    Ok(())
                } else {
                    commit(&root, &index, ops).await.map_err(|e| format!("{e:#}"))
                };
                if let Err(e) = &r {
                    tracing::error!(error = %e, "could not write the namespace log");
                }
                for (p, verdict) in batch.into_iter().zip(verdicts) {
                    let answer = match (verdict, &r) {
                        (Err(refusal), _) => Err(Ok(refusal)),
                        (Ok(replaced), Ok(())) => Ok(replaced),
                        (Ok(_), Err(e)) => Err(Err(e.clone())),
                    };
                    let _ = p.done.send(answer);
                }
            }
        });
        Log { tx }
    }

    /// Commits `ops`: when this returns Ok they are in the pool and in the index.
    pub async fn commit(&self, ops: Vec<Op>) -> anyhow::Result<()> {
        match self.commit_checked(Vec::new(), ops).await {
            Ok(_) => Ok(()),
            Err(CommitError::Failed(e)) => Err(e),
            Err(CommitError::Refused(r)) => Err(anyhow::anyhow!("refused: {r:?}")),
        }
    }

    /// Commits `ops` if every check holds when the log writer reaches them (atomically with
    /// the changes ordered before them): what they replaced, or why they were refused.
    pub async fn commit_checked(
        &self,
        checks: Vec<Check>,
        ops: Vec<Op>,
    ) -> Result<Replaced, CommitError> {
        let stopped = || CommitError::Failed(anyhow::anyhow!("the log writer stopped"));
        let (done, wait) = oneshot::channel();
        self.tx.send(Pending { checks, ops, done }).await.map_err(|_| stopped())?;
        match wait.await.map_err(|_| stopped())? {
            Ok(replaced) => Ok(replaced),
            Err(Ok(refusal)) => Err(CommitError::Refused(refusal)),
            Err(Err(e)) => Err(CommitError::Failed(anyhow::anyhow!("{e}"))),
        }
    }
}

async fn commit(root: &Arc<PoolClient>, index: &Index, ops: Vec<Op>) -> anyhow::Result<()> {
    finish_pending(root, index).await?;
    let seq = index.next_seq()?;
    let entry = serde_json::to_vec(&Entry { seq, ops })?;
    index.set_pending(&entry)?;
    write_entry(root, index, &entry).await
}

/// Writes an entry already recorded as pending, then applies it (which clears it).
async fn write_entry(root: &Arc<PoolClient>, index: &Index, bytes: &[u8]) -> anyhow::Result<()> {
    let entry: Entry = serde_json::from_slice(bytes)?;
    root.put_with_key(entry_key(root.key(), entry.seq), bytes.to_vec()).await?;
    index.apply(entry.seq, &entry.ops)
}

/// An entry whose write did not finish (the gateway stopped, the pool refused, the disk was
/// full) is written again, byte for byte, before anything else: its changes were never
/// acknowledged, but some nodes may hold it, so that sequence number is taken by it.
async fn finish_pending(root: &Arc<PoolClient>, index: &Index) -> anyhow::Result<()> {
    let Some(bytes) = index.pending()? else { return Ok(()) };
    let entry: Entry = serde_json::from_slice(&bytes).context("corrupt pending log entry")?;
    if entry.seq != index.next_seq()? {
        bail!("the pending log entry is {}, but the next is {}", entry.seq, index.next_seq()?);
    }
    write_entry(root, index, &bytes).await.context("writing the unfinished log entry again")
}

/// Reads log entry `seq` from the pool: `None` if no holder has it.
async fn read_entry(root: &Arc<PoolClient>, seq: u64) -> anyhow::Result<Option<Vec<Op>>> {
    let cap: ReadCap = root.cap_for_key(entry_key(root.key(), seq));
    let mut out = Vec::new();
    if let Err(e) = root.get_to(&cap, &mut out).await {
        if root.absent(&cap).await {
            return Ok(None);
        }
        return Err(e.context(format!("reading namespace log entry {seq}")));
    }
    if out.len() > MAX_ENTRY_BYTES {
        bail!("namespace log entry {seq} is {} bytes", out.len());
    }
    let entry: Entry = serde_json::from_slice(&out)
        .with_context(|| format!("namespace log entry {seq} is not an entry"))?;
    if entry.seq != seq {
        bail!("namespace log entry {seq} says it is entry {}", entry.seq);
    }
    Ok(Some(entry.ops))
}

/// Brings the index up to the log: applies every entry from the index's next sequence on
/// (all of them for an empty index). Returns how many were applied.
pub async fn catch_up(root: &Arc<PoolClient>, index: &Index) -> anyhow::Result<u64> {
    index.check_root(&shardfarm_core::identity::NodeId::of(&root.key().verifying_key()))?;
    let mut applied = 0;
    loop {
        let seq = index.next_seq()?;
        match read_entry(root, seq).await? {
            Some(ops) => {
                index.apply(seq, &ops)?;
                applied += 1;
            }
            None => {
                // The end of the log, unless a later entry exists (then `seq` is lost, and
                // skipping it would silently drop changes). A probe that cannot tell stops the
                // start: better no gateway than a namespace cut short.
                for later in seq + 1..seq + 3 {
                    if read_entry(root, later).await?.is_some() {
                        bail!(
                            "namespace log entry {seq} cannot be read but entry {later} exists: \
                             the pool lost more than it can repair"
                        );
                    }
                }
                // An entry that was being written when the gateway stopped: write it now.
                finish_pending(root, index).await?;
                return Ok(applied + u64::from(index.next_seq()? > seq));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(etag: &str, owner: &str) -> ObjectRecord {
        ObjectRecord {
            pieces: Vec::new(),
            size: 1,
            etag: etag.into(),
            content_type: None,
            metadata: BTreeMap::new(),
            modified_ms: 1,
            owner: owner.into(),
            headers: HttpHeaders::default(),
        }
    }

    fn pending(checks: Vec<Check>, ops: Vec<Op>) -> Pending {
        Pending { checks, ops, done: oneshot::channel().0 }
    }

    fn put(key: &str, etag: &str) -> Op {
        let record = record(etag, "ALICE");
        Op::PutObject { bucket: "b".into(), key: key.into(), record, upload: None }
    }

    fn check(key: &str, expect: Expect) -> Check {
        Check { bucket: "b".into(), key: key.into(), expect }
    }

    /// Two create-only PUTs of one key in one entry: the second sees the first.
    #[test]
    fn conditions_are_decided_against_the_changes_ahead_in_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        index.apply(0, &[put("old", "e0")]).unwrap();
        let batch = vec![
            pending(vec![check("k", Expect::Absent)], vec![put("k", "e1")]),
            pending(vec![check("k", Expect::Absent)], vec![put("k", "e2")]),
            pending(vec![check("k", Expect::ETag(Some("e1".into())))], vec![put("k", "e3")]),
            pending(vec![check("old", Expect::ETag(Some("nope".into())))], vec![put("old", "x")]),
            pending(vec![check("none", Expect::ETag(None))], vec![put("none", "x")]),
            pending(vec![check("old", Expect::OwnedByOrAbsent("BOB".into()))], vec![]),
            pending(
                vec![check("old", Expect::ETag(Some("e0".into())))],
                vec![Op::DeleteObject { bucket: "b".into(), key: "old".into() }],
            ),
        ];
        let (ops, verdicts) = decide(&index, &batch).unwrap();
        assert_eq!(ops, vec![put("k", "e1"), put("k", "e3"), batch[6].ops[0].clone()]);
        assert_eq!(verdicts[0], Ok(vec![None]));
        assert_eq!(verdicts[1], Err(Refusal::PreconditionFailed));
        assert_eq!(verdicts[2], Ok(vec![Some(record("e1", "ALICE"))]));
        assert_eq!(verdicts[3], Err(Refusal::PreconditionFailed));
        assert_eq!(verdicts[4], Err(Refusal::NoSuchKey));
        assert_eq!(verdicts[5], Err(Refusal::NotOwner));
        assert_eq!(verdicts[6], Ok(vec![Some(record("e0", "ALICE"))]));
    }

    #[test]
    fn a_completed_upload_is_remembered_then_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        let mut rec = record("abc-1", "ALICE");
        rec.modified_ms = shardfarm_core::auth::now_ms();
        let op = |id: &str, rec: ObjectRecord| Op::PutObject {
            bucket: "b".into(),
            key: "k".into(),
            record: rec,
            upload: Some(id.into()),
        };
        let mut old = rec.clone();
        old.modified_ms -= COMPLETED_UPLOAD_TTL_MS + 1;
        index.apply(0, &[op("fresh", rec), op("stale", old)]).unwrap();
        let done = index.completed_upload("fresh").unwrap().unwrap();
        assert_eq!((done.etag.as_str(), done.key.as_str()), ("abc-1", "k"));
        assert!(index.completed_upload("stale").unwrap().is_none());
        assert_eq!(index.forget_completed_uploads().unwrap(), 1);
        assert!(index.completed_upload("fresh").unwrap().is_some());
    }
}
