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
//!
//! Every `snapshot_every` entries (1 000 by default) the log writer also stores a **snapshot**
//! of the namespace as of that point (the index's buckets, objects, multipart uploads in
//! progress and their parts, recently completed uploads) in chunks at keys derived from the
//! root key and a random snapshot id, and every later entry names the newest snapshot. A
//! rebuild finds the last entry (a galloping then binary search over entries: O(log n) reads),
//! loads the snapshot that entry names, and replays only the entries after it: O(snapshot +
//! tail), not every change ever made. Snapshot ids are random because a snapshot's content
//! at a given point is not unique (completed uploads are forgotten, formats change), and one
//! derived key must never encrypt two contents.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use shardfarm_client::PoolClient;
use shardfarm_core::cap::ReadCap;
use shardfarm_core::identity::NodeId;
use tokio::sync::{mpsc, oneshot};

/// Domain separation of the log's object keys.
const LOG_DOMAIN: &[u8] = b"shardfarm-gateway-log-v1";
/// Domain separation of the snapshots' object keys.
const SNAPSHOT_DOMAIN: &[u8] = b"shardfarm-gateway-snapshot-v1";
/// How many entries apart snapshots are written by default: a rebuild replays at most this
/// many entries after the snapshot it loads (each about one segment fetch), and each snapshot
/// costs a write of the whole namespace (~300 bytes per object), so the cost per change is the
/// namespace's size / 1 000.
pub const SNAPSHOT_EVERY: u64 = 1000;
/// Bytes of records per snapshot chunk (a chunk is one pool object, read whole).
const SNAPSHOT_CHUNK: usize = 4 << 20;
/// The index prefixes a snapshot holds: what the log's entries make (buckets, objects,
/// completed uploads, uploads in progress, their parts), not the index's own keys.
const SNAPSHOT_PREFIXES: [&[u8]; 5] = [b"b/", b"o/", b"c/", b"u/", b"p/"];
/// Most changes one log entry carries.
const MAX_OPS_PER_ENTRY: usize = 1000;
/// Largest log entry read back (a thousand object records are ~1 MiB).
const MAX_ENTRY_BYTES: usize = 16 << 20;
/// Index keys: the next log sequence number, and the entry being written (its exact bytes).
const NEXT_SEQ: &[u8] = b"m/next_seq";
const PENDING: &[u8] = b"m/pending";
/// The id of the root key whose log the index follows.
const ROOT_ID: &[u8] = b"m/root";
/// The newest snapshot written or loaded (a [`SnapshotRef`]).
const SNAPSHOT: &[u8] = b"m/snapshot";

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

/// A multipart upload in progress (in the log, so it survives a rebuild).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct UploadRecord {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// The access key that created it (only it may add parts, complete or abort it).
    pub owner: String,
    /// Creation, unix milliseconds.
    pub created_ms: u64,
    /// Content-Type of the object it makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// User metadata of the object it makes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// HTTP headers of the object it makes.
    #[serde(default, skip_serializing_if = "HttpHeaders::is_empty")]
    pub headers: HttpHeaders,
}

/// A part of an upload in progress.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct PartRecord {
    /// Where its bytes are.
    pub piece: Piece,
    /// Its MD5, hex (its ETag).
    pub md5: String,
    /// When it was stored, unix milliseconds.
    pub modified_ms: u64,
}

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
    /// A multipart upload begins.
    CreateUpload {
        /// Its id.
        id: String,
        /// Record.
        upload: UploadRecord,
    },
    /// A part of an upload is stored (replacing any part of that number).
    PutPart {
        /// The upload's id.
        id: String,
        /// Part number.
        number: i32,
        /// Record.
        part: PartRecord,
    },
    /// An upload and its parts are forgotten (aborted; a completion is a `PutObject` naming
    /// its upload, which forgets it too).
    AbortUpload {
        /// Its id.
        id: String,
    },
}

/// A log entry as stored in the pool.
#[derive(Serialize, Deserialize, Debug)]
struct Entry {
    seq: u64,
    ops: Vec<Op>,
    /// The newest snapshot written before this entry: a rebuild that reads this entry last
    /// starts from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<SnapshotRef>,
}

/// Where a snapshot is: the state before entry `seq`, in `parts` chunks under `id`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SnapshotRef {
    /// The entries it covers: every one below `seq`.
    pub seq: u64,
    /// Its random id (hex of 16 bytes), from which its chunks' keys are derived.
    pub id: String,
    /// How many chunks it has.
    pub parts: u32,
}

/// One chunk of a snapshot as stored in the pool: index keys and values, in key order.
#[derive(Serialize, Deserialize, Debug)]
struct SnapshotChunk {
    seq: u64,
    part: u32,
    records: Vec<(String, String)>,
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

/// The index key of an upload in progress.
fn upload_key(id: &str) -> Vec<u8> {
    format!("u/{id}").into_bytes()
}

/// The index key of an upload's part (numbers sort as they are: 5 digits).
fn part_key(id: &str, n: i32) -> Vec<u8> {
    format!("p/{id}/{n:05}").into_bytes()
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
                Op::CreateUpload { id, upload } => {
                    batch.put(upload_key(id), serde_json::to_vec(upload)?)
                }
                Op::PutPart { id, number, part } => {
                    batch.put(part_key(id, *number), serde_json::to_vec(part)?)
                }
                Op::AbortUpload { .. } => {}
            }
            if let Op::AbortUpload { id } | Op::PutObject { upload: Some(id), .. } = op {
                batch.delete(upload_key(id));
                // Every part: `p/<id>/` up to `p/<id>0` (`0` follows `/`).
                batch
                    .delete_range(format!("p/{id}/").into_bytes(), format!("p/{id}0").into_bytes());
            }
        }
        batch.put(NEXT_SEQ, (seq + 1).to_le_bytes());
        batch.delete(PENDING);
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        self.db.write_opt(batch, &w)?;
        Ok(())
    }

    /// Applies changes as the next entry would (tests of other modules build an index so).
    #[cfg(test)]
    pub(crate) fn apply_for_tests(&self, ops: &[Op]) -> anyhow::Result<()> {
        self.apply(self.next_seq()?, ops)
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

    /// An upload in progress.
    pub fn upload(&self, id: &str) -> anyhow::Result<Option<UploadRecord>> {
        self.db
            .get(upload_key(id))?
            .map(|v| serde_json::from_slice(&v).context("corrupt upload record"))
            .transpose()
    }

    /// Every upload in progress: (id, record), by id.
    pub fn uploads(&self) -> anyhow::Result<Vec<(String, UploadRecord)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(b"u/") {
            let (k, v) = item?;
            let Some(id) = k.strip_prefix(b"u/") else { break };
            out.push((String::from_utf8_lossy(id).into_owned(), serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    /// An upload's parts, by number.
    pub fn parts(&self, id: &str) -> anyhow::Result<Vec<(i32, PartRecord)>> {
        let p = format!("p/{id}/");
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(p.as_bytes()) {
            let (k, v) = item?;
            let Some(n) = k.strip_prefix(p.as_bytes()) else { break };
            let n = String::from_utf8_lossy(n).parse().context("corrupt part key")?;
            out.push((n, serde_json::from_slice(&v).context("corrupt part record")?));
        }
        Ok(out)
    }

    /// One part of an upload.
    pub fn part(&self, id: &str, n: i32) -> anyhow::Result<Option<PartRecord>> {
        self.db
            .get(part_key(id, n))?
            .map(|v| serde_json::from_slice(&v).context("corrupt part record"))
            .transpose()
    }

    /// The newest snapshot written or loaded.
    pub fn snapshot(&self) -> anyhow::Result<Option<SnapshotRef>> {
        self.db
            .get(SNAPSHOT)?
            .map(|v| serde_json::from_slice(&v).context("corrupt snapshot reference"))
            .transpose()
    }

    fn set_snapshot(&self, r: &SnapshotRef) -> anyhow::Result<()> {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        Ok(self.db.put_opt(SNAPSHOT, serde_json::to_vec(r)?, &w)?)
    }

    /// The namespace as a snapshot holds it: every (key, value) under [`SNAPSHOT_PREFIXES`],
    /// in key order, passed to `f`.
    fn dump(&self, mut f: impl FnMut(String, String) -> anyhow::Result<()>) -> anyhow::Result<()> {
        for prefix in SNAPSHOT_PREFIXES {
            for item in self.db.prefix_iterator(prefix) {
                let (k, v) = item?;
                if !k.starts_with(prefix) {
                    break;
                }
                let k = String::from_utf8(k.to_vec()).context("an index key is not UTF-8")?;
                let v = String::from_utf8(v.to_vec()).context("an index value is not UTF-8")?;
                f(k, v)?;
            }
        }
        Ok(())
    }

    /// Starts loading a snapshot: clears the namespace (every [`SNAPSHOT_PREFIXES`] key) and
    /// any pending entry (it came after the snapshot's point or was never acknowledged).
    fn clear_namespace(&self) -> anyhow::Result<()> {
        let mut clear = rocksdb::WriteBatch::default();
        for prefix in SNAPSHOT_PREFIXES {
            let mut end = prefix.to_vec();
            *end.last_mut().expect("a prefix") += 1;
            clear.delete_range(prefix, &end[..]);
        }
        clear.delete(PENDING);
        clear.delete(NEXT_SEQ);
        clear.delete(SNAPSHOT);
        Ok(self.db.write(clear)?)
    }

    /// Puts one chunk of a snapshot being loaded.
    fn load_records(&self, at: &SnapshotRef, records: Vec<(String, String)>) -> anyhow::Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        for (k, v) in records {
            if !SNAPSHOT_PREFIXES.iter().any(|p| k.as_bytes().starts_with(p)) {
                bail!("snapshot {} holds the key {k:?}, outside the namespace", at.id);
            }
            batch.put(k.as_bytes(), v.as_bytes());
        }
        Ok(self.db.write(batch)?)
    }

    /// Ends loading a snapshot: the index is at its point (entries from `at.seq` on follow).
    fn loaded(&self, at: &SnapshotRef) -> anyhow::Result<()> {
        let mut done = rocksdb::WriteBatch::default();
        done.put(NEXT_SEQ, at.seq.to_le_bytes());
        done.put(SNAPSHOT, serde_json::to_vec(at)?);
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        Ok(self.db.write_opt(done, &w)?)
    }
}

// ---- Data that no entry may reference ----
//
// Data is stored before the log entry that references it, and deleted after the entry that
// stops referencing it; a crash (or a pool that does not answer) between the two leaves data
// nothing references. So the index records an *intent* for each such piece before the data
// write begins (or before a deletion): its capability, owner, time and where it was meant to
// be referenced. A successful commit or deletion drops it; the collector (`collector.rs`)
// drops the ones it finds referenced and deletes the data of the others once they are older
// than a grace period. Intents are the gateway's own (not in the log): a gateway rebuilt on
// an empty disk does not know of writes its predecessor left unfinished.

/// Where a piece was meant to be referenced.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Target {
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// The upload and part number, for a part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<(String, i32)>,
}

/// A piece that may end up referenced by no entry.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Intent {
    /// The access key whose identity stored it (and may delete it).
    pub owner: String,
    /// When it was recorded, unix milliseconds.
    pub created_ms: u64,
    /// Where it was meant to be referenced; `None` for data being deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Target>,
}

fn intent_key(cap: &str) -> Vec<u8> {
    format!("d/{cap}").into_bytes()
}

impl Index {
    /// Records an intent (synced: it must outlive a crash of the write it announces).
    pub fn add_intent(&self, cap: &str, intent: &Intent) -> anyhow::Result<()> {
        let mut w = rocksdb::WriteOptions::default();
        w.set_sync(true);
        Ok(self.db.put_opt(intent_key(cap), serde_json::to_vec(intent)?, &w)?)
    }

    /// Whether an intent is recorded for `cap`.
    pub fn has_intent(&self, cap: &str) -> anyhow::Result<bool> {
        Ok(self.db.get(intent_key(cap))?.is_some())
    }

    /// Drops an intent: its piece is referenced, or deleted.
    pub fn drop_intent(&self, cap: &str) -> anyhow::Result<()> {
        Ok(self.db.delete(intent_key(cap))?)
    }

    /// Every intent: (capability, intent).
    pub fn intents(&self) -> anyhow::Result<Vec<(String, Intent)>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(b"d/") {
            let (k, v) = item?;
            let Some(cap) = k.strip_prefix(b"d/") else { break };
            let intent = serde_json::from_slice(&v).context("corrupt intent")?;
            out.push((String::from_utf8_lossy(cap).into_owned(), intent));
        }
        Ok(out)
    }

    /// Whether `cap` is referenced where it was meant to be: by the object under its key (a
    /// completed upload's parts are that object's pieces), or by its upload's part.
    pub fn references(&self, cap: &str, at: &Target) -> anyhow::Result<bool> {
        if let Some(o) = self.object(&at.bucket, &at.key)?
            && o.pieces.iter().any(|p| p.cap == cap)
        {
            return Ok(true);
        }
        Ok(match &at.part {
            Some((id, n)) => self.part(id, *n)?.is_some_and(|p| p.piece.cap == cap),
            None => false,
        })
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

// ---- Where the log lives ----

/// Where the log's entries and snapshots are stored: the pool, through the root key's client
/// ([`PoolLog`]); memory in tests. Every object is written once under a key derived from the
/// root key's secret, and read back by that key.
#[async_trait::async_trait]
pub trait LogStore: Send + Sync + 'static {
    /// The secret the log's object keys are derived from (the root key's).
    fn secret(&self) -> [u8; 32];
    /// The root key's id: an index follows the log of one root key.
    fn root_id(&self) -> NodeId;
    /// Stores `bytes` under `key`.
    async fn put(&self, key: [u8; 32], bytes: Vec<u8>) -> anyhow::Result<()>;
    /// Reads the object under `key` (at most `limit` bytes): `None` if it is certainly not
    /// stored, an error if that cannot be told.
    async fn get(&self, key: [u8; 32], limit: usize) -> anyhow::Result<Option<Vec<u8>>>;
}

/// The log in the pool: objects stored with the root key's client.
pub struct PoolLog(pub Arc<PoolClient>);

#[async_trait::async_trait]
impl LogStore for PoolLog {
    fn secret(&self) -> [u8; 32] {
        self.0.key().to_bytes()
    }

    fn root_id(&self) -> NodeId {
        NodeId::of(&self.0.key().verifying_key())
    }

    async fn put(&self, key: [u8; 32], bytes: Vec<u8>) -> anyhow::Result<()> {
        self.0.put_with_key(key, bytes).await.map(|_| ())
    }

    async fn get(&self, key: [u8; 32], limit: usize) -> anyhow::Result<Option<Vec<u8>>> {
        let cap: ReadCap = self.0.cap_for_key(key);
        let mut out = Vec::new();
        if let Err(e) = self.0.get_to(&cap, &mut out).await {
            if self.0.absent(&cap).await {
                return Ok(None);
            }
            return Err(e);
        }
        if out.len() > limit {
            bail!("{} bytes, above {limit}", out.len());
        }
        Ok(Some(out))
    }
}

/// The object key of log entry `seq`.
fn entry_key(secret: &[u8; 32], seq: u64) -> [u8; 32] {
    shardfarm_core::identity::blake2b256(&[LOG_DOMAIN, secret, &seq.to_le_bytes()])
}

/// The object key of chunk `part` of snapshot `id`.
fn snapshot_key(secret: &[u8; 32], id: &str, part: u32) -> [u8; 32] {
    shardfarm_core::identity::blake2b256(&[
        SNAPSHOT_DOMAIN,
        secret,
        id.as_bytes(),
        &part.to_le_bytes(),
    ])
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
    /// Starts the writer over `store` (the root key's log) and `index`; a snapshot is written
    /// every `snapshot_every` entries (at least 1).
    pub fn start(store: Arc<dyn LogStore>, index: Arc<Index>, snapshot_every: u64) -> Self {
        let (tx, mut rx) = mpsc::channel::<Pending>(1024);
        let every = snapshot_every.max(1);
        tokio::spawn(async move {
            // After a failed snapshot, the next try waits for a quarter of the interval more
            // entries (not every entry: a snapshot is the whole namespace).
            let mut next_try = 0u64;
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
                let decided = match finish_pending(&*store, &index).await {
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
                    commit(&*store, &index, ops).await.map_err(|e| format!("{e:#}"))
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
                // The snapshot is written here, between entries, so that it is the namespace
                // exactly as of `next_seq` (nothing else changes it meanwhile); changes queued
                // meanwhile wait and then share the next entry.
                if r.is_ok() && snapshot_due(&index, every, next_try) {
                    match write_snapshot(&*store, &index).await {
                        Ok(at) => tracing::info!(
                            seq = at.seq,
                            parts = at.parts,
                            "namespace snapshot written"
                        ),
                        Err(e) => {
                            next_try = index.next_seq().unwrap_or(0) + every.div_ceil(4);
                            tracing::warn!(error = %format!("{e:#}"), "could not write a namespace snapshot");
                        }
                    }
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

async fn commit(store: &dyn LogStore, index: &Index, ops: Vec<Op>) -> anyhow::Result<()> {
    finish_pending(store, index).await?;
    let seq = index.next_seq()?;
    let entry = serde_json::to_vec(&Entry { seq, ops, snapshot: index.snapshot()? })?;
    index.set_pending(&entry)?;
    write_entry(store, index, &entry).await
}

/// Writes an entry already recorded as pending, then applies it (which clears it).
async fn write_entry(store: &dyn LogStore, index: &Index, bytes: &[u8]) -> anyhow::Result<()> {
    let entry: Entry = serde_json::from_slice(bytes)?;
    store.put(entry_key(&store.secret(), entry.seq), bytes.to_vec()).await?;
    index.apply(entry.seq, &entry.ops)
}

/// An entry whose write did not finish (the gateway stopped, the pool refused, the disk was
/// full) is written again, byte for byte, before anything else: its changes were never
/// acknowledged, but some nodes may hold it, so that sequence number is taken by it.
async fn finish_pending(store: &dyn LogStore, index: &Index) -> anyhow::Result<()> {
    let Some(bytes) = index.pending()? else { return Ok(()) };
    let entry: Entry = serde_json::from_slice(&bytes).context("corrupt pending log entry")?;
    if entry.seq != index.next_seq()? {
        bail!("the pending log entry is {}, but the next is {}", entry.seq, index.next_seq()?);
    }
    write_entry(store, index, &bytes).await.context("writing the unfinished log entry again")
}

/// Reads log entry `seq` from the pool: `None` if no holder has it.
async fn read_entry(store: &dyn LogStore, seq: u64) -> anyhow::Result<Option<Entry>> {
    let bytes = store
        .get(entry_key(&store.secret(), seq), MAX_ENTRY_BYTES)
        .await
        .with_context(|| format!("reading namespace log entry {seq}"))?;
    let Some(bytes) = bytes else { return Ok(None) };
    let entry: Entry = serde_json::from_slice(&bytes)
        .with_context(|| format!("namespace log entry {seq} is not an entry"))?;
    if entry.seq != seq {
        bail!("namespace log entry {seq} says it is entry {}", entry.seq);
    }
    Ok(Some(entry))
}

// ---- Snapshots ----

/// Whether a snapshot is due: `every` entries or more since the newest one (or since the
/// start of the log), and not before `not_before` (a failed one's retry).
fn snapshot_due(index: &Index, every: u64, not_before: u64) -> bool {
    let (Ok(next), Ok(last)) = (index.next_seq(), index.snapshot()) else { return false };
    let since = next - last.map_or(0, |s| s.seq);
    since >= every && next >= not_before
}

/// Writes a snapshot of the namespace as of the index's next sequence number, in chunks of
/// about [`SNAPSHOT_CHUNK`] bytes, and records it in the index: the entries written from now
/// on name it.
async fn write_snapshot(store: &dyn LogStore, index: &Index) -> anyhow::Result<SnapshotRef> {
    let seq = index.next_seq()?;
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| anyhow::anyhow!("random id: {e}"))?;
    let id = hex::encode(id);
    let secret = store.secret();
    // The index is read into chunks first (the writer is the only one changing it, and it
    // is here), then each chunk is stored.
    let mut chunks: Vec<Vec<(String, String)>> = vec![Vec::new()];
    let mut size = 0;
    index.dump(|k, v| {
        if size >= SNAPSHOT_CHUNK {
            chunks.push(Vec::new());
            size = 0;
        }
        size += k.len() + v.len() + 8;
        chunks.last_mut().expect("a chunk").push((k, v));
        Ok(())
    })?;
    let parts = chunks.len() as u32;
    for (part, records) in chunks.into_iter().enumerate() {
        let part = part as u32;
        let bytes = serde_json::to_vec(&SnapshotChunk { seq, part, records })?;
        store.put(snapshot_key(&secret, &id, part), bytes).await.with_context(|| {
            format!("storing chunk {part} of the namespace snapshot at entry {seq}")
        })?;
    }
    let at = SnapshotRef { seq, id, parts };
    index.set_snapshot(&at)?;
    Ok(at)
}

/// Loads snapshot `at` into the index (replacing its namespace): the records loaded.
async fn load_snapshot(
    store: &dyn LogStore,
    index: &Index,
    at: &SnapshotRef,
) -> anyhow::Result<u64> {
    let secret = store.secret();
    index.clear_namespace()?;
    let mut records = 0;
    for part in 0..at.parts {
        let what = || format!("chunk {part} of the namespace snapshot at entry {}", at.seq);
        let bytes = store
            .get(snapshot_key(&secret, &at.id, part), MAX_ENTRY_BYTES)
            .await
            .with_context(what)?
            .with_context(|| format!("{} is not in the pool", what()))?;
        let chunk: SnapshotChunk = serde_json::from_slice(&bytes).with_context(what)?;
        if chunk.seq != at.seq || chunk.part != part {
            bail!("{} says it is chunk {} at entry {}", what(), chunk.part, chunk.seq);
        }
        records += chunk.records.len() as u64;
        index.load_records(at, chunk.records)?;
    }
    index.loaded(at)?;
    Ok(records)
}

// ---- Catching up with the log ----

/// What bringing the index up to the log took.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CatchUp {
    /// The snapshot loaded, if one was (its entry and the records it held).
    pub snapshot: Option<(u64, u64)>,
    /// Entries read only to find the end of the log (a galloping and binary search).
    pub probes: u64,
    /// Entries applied after the snapshot (or the index's own point).
    pub entries: u64,
}

/// The last entry of the log at or after `from`, which exists: a galloping search (`from`
/// plus 1, 2, 4, …) until an entry is absent, then a binary search between the last present
/// and the first absent. Entries are written in order and never deleted, so presence is a
/// prefix; a lost entry in the middle can only make the search stop early, and the replay that
/// follows refuses to skip a lost entry (see [`catch_up`]). Returns it and the entries read.
async fn last_entry(store: &dyn LogStore, from: u64) -> anyhow::Result<(u64, Entry, u64)> {
    let mut probes = 0;
    let mut read = async |seq: u64| {
        probes += 1;
        read_entry(store, seq).await
    };
    let mut last = (from, read(from).await?.context("the first entry vanished")?);
    let mut step = 1u64;
    let mut absent = loop {
        let seq = from + step;
        match read(seq).await? {
            Some(e) => last = (seq, e),
            None => break seq,
        }
        step *= 2;
    };
    while absent - last.0 > 1 {
        let mid = last.0 + (absent - last.0) / 2;
        match read(mid).await? {
            Some(e) => last = (mid, e),
            None => absent = mid,
        }
    }
    Ok((last.0, last.1, probes))
}

/// Brings the index up to the log. An index behind the log (empty, or stale) first looks for
/// the log's last entry; if it names a snapshot past the index's point, the snapshot replaces
/// the index's namespace. Then every entry from the index's next sequence on is applied.
pub async fn catch_up(store: &dyn LogStore, index: &Index) -> anyhow::Result<CatchUp> {
    index.check_root(&store.root_id())?;
    let mut report = CatchUp::default();
    let from = index.next_seq()?;
    if index.pending()?.is_none() && read_entry(store, from).await?.is_some() {
        let (_, last, probes) = last_entry(store, from).await?;
        report.probes = probes + 1;
        if let Some(at) = last.snapshot.filter(|at| at.seq > from) {
            let records = load_snapshot(store, index, &at).await?;
            report.snapshot = Some((at.seq, records));
        }
    }
    loop {
        let seq = index.next_seq()?;
        match read_entry(store, seq).await? {
            Some(entry) => {
                index.apply(seq, &entry.ops)?;
                report.entries += 1;
            }
            None => {
                // The end of the log, unless a later entry exists (then `seq` is lost, and
                // skipping it would silently drop changes). A probe that cannot tell stops the
                // start: better no gateway than a namespace cut short.
                for later in seq + 1..seq + 3 {
                    if read_entry(store, later).await?.is_some() {
                        bail!(
                            "namespace log entry {seq} cannot be read but entry {later} exists: \
                             the pool lost more than it can repair"
                        );
                    }
                }
                // An entry that was being written when the gateway stopped: write it now.
                finish_pending(store, index).await?;
                report.entries += u64::from(index.next_seq()? > seq);
                return Ok(report);
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

    /// The pool as the log sees it, in memory. Like the pool, a key is written with one
    /// content only: a second write of other bytes under a key fails the test.
    struct MemStore {
        secret: [u8; 32],
        objects: std::sync::Mutex<std::collections::HashMap<[u8; 32], Vec<u8>>>,
    }

    impl MemStore {
        fn new() -> Self {
            MemStore { secret: [7; 32], objects: Default::default() }
        }
    }

    #[async_trait::async_trait]
    impl LogStore for MemStore {
        fn secret(&self) -> [u8; 32] {
            self.secret
        }

        fn root_id(&self) -> NodeId {
            NodeId([9; 32])
        }

        async fn put(&self, key: [u8; 32], bytes: Vec<u8>) -> anyhow::Result<()> {
            let mut objects = self.objects.lock().unwrap();
            if let Some(old) = objects.get(&key) {
                assert_eq!(*old, bytes, "one key written with two contents");
            }
            objects.insert(key, bytes);
            Ok(())
        }

        async fn get(&self, key: [u8; 32], limit: usize) -> anyhow::Result<Option<Vec<u8>>> {
            let found = self.objects.lock().unwrap().get(&key).cloned();
            if found.as_ref().is_some_and(|b| b.len() > limit) {
                bail!("above {limit} bytes");
            }
            Ok(found)
        }
    }

    fn dump(index: &Index) -> Vec<(String, String)> {
        let mut out = Vec::new();
        index
            .dump(|k, v| {
                out.push((k, v));
                Ok(())
            })
            .unwrap();
        out
    }

    fn env_or(var: &str, default: u64) -> u64 {
        std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
    }

    /// A gateway killed after many changes and rebuilt on an empty disk from the pool loads
    /// the newest snapshot and replays at most one interval of entries; the namespace is the
    /// one the old gateway had, and an upload begun before the first snapshot still completes.
    /// The figure is 10 000 changes with a snapshot every 1 000 (scripts/bench-gateway.sh
    /// rebuild runs that); the suite runs a tenth of it, snapshot every 200.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebuild_loads_the_newest_snapshot_and_replays_only_the_tail() {
        let changes = env_or("SHARDFARM_REBUILD_CHANGES", 2_000);
        let every = env_or("SHARDFARM_REBUILD_SNAPSHOT_EVERY", changes / 10).max(1);
        let store = Arc::new(MemStore::new());
        let dir = tempfile::tempdir().unwrap();
        let old = Arc::new(Index::open(&dir.path().join("old")).unwrap());
        assert_eq!(catch_up(&*store, &old).await.unwrap(), CatchUp::default());
        let log = Log::start(store.clone(), old.clone(), every);
        let bucket = BucketRecord { owner: "ALICE".into(), created_ms: 1 };
        log.commit(vec![Op::CreateBucket { bucket: "b".into(), record: bucket }]).await.unwrap();
        let upload = UploadRecord {
            bucket: "b".into(),
            key: "big".into(),
            owner: "ALICE".into(),
            created_ms: 2,
            content_type: Some("text/plain".into()),
            metadata: BTreeMap::new(),
            headers: HttpHeaders::default(),
        };
        log.commit(vec![Op::CreateUpload { id: "up1".into(), upload }]).await.unwrap();
        let piece = |n: u64| Piece { cap: format!("sf2:part{n}"), size: n, segment_size: 1 << 20 };
        for number in [1, 2] {
            let part = PartRecord { piece: piece(number as u64), md5: "00".into(), modified_ms: 3 };
            log.commit(vec![Op::PutPart { id: "up1".into(), number, part }]).await.unwrap();
        }
        // One change per entry (sequential commits): puts over 300 keys, every seventh a
        // delete.
        for i in 4..changes {
            let key = format!("k{:03}", i % 300);
            let op = if i % 7 == 0 {
                Op::DeleteObject { bucket: "b".into(), key }
            } else {
                Op::PutObject {
                    bucket: "b".into(),
                    key,
                    record: record(&i.to_string(), "ALICE"),
                    upload: None,
                }
            };
            log.commit(vec![op]).await.unwrap();
        }
        assert_eq!(old.next_seq().unwrap(), changes);
        drop(log);

        // The gateway dies with its disk; a new one rebuilds from the pool.
        let fresh = Arc::new(Index::open(&dir.path().join("fresh")).unwrap());
        let report = catch_up(&*store, &fresh).await.unwrap();
        let (at, records) = report.snapshot.expect("a snapshot was loaded");
        println!(
            "rebuilt after {changes} changes (a snapshot every {every}): snapshot at entry {at} \
             ({records} records), {} entries replayed, {} entries probed to find the end",
            report.entries, report.probes
        );
        assert!(report.entries <= every, "replayed {} entries, more than {every}", report.entries);
        assert_eq!(at + report.entries, changes);
        // Finding the end is a galloping and a binary search: O(log n) entries.
        let log2 = u64::from(64 - changes.leading_zeros());
        assert!(report.probes <= 2 * log2 + 2, "{} probes for {changes} entries", report.probes);
        assert_eq!(dump(&fresh), dump(&old));
        assert!(fresh.object("b", "k001").unwrap().is_some());

        // The upload begun before every snapshot is still there, and completes.
        let parts = fresh.parts("up1").unwrap();
        assert_eq!(parts.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2]);
        let log = Log::start(store.clone(), fresh.clone(), every);
        let mut done = record("abc-2", "ALICE");
        done.pieces = parts.into_iter().map(|(_, p)| p.piece).collect();
        let op = Op::PutObject {
            bucket: "b".into(),
            key: "big".into(),
            record: done.clone(),
            upload: Some("up1".into()),
        };
        log.commit(vec![op]).await.unwrap();
        assert_eq!(fresh.object("b", "big").unwrap(), Some(done));
        assert!(fresh.upload("up1").unwrap().is_none() && fresh.parts("up1").unwrap().is_empty());
    }

    /// An aborted upload leaves neither its record nor its parts, in the index or a snapshot.
    #[test]
    fn an_abort_forgets_the_upload_and_every_part() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        let upload = UploadRecord {
            bucket: "b".into(),
            key: "k".into(),
            owner: "ALICE".into(),
            created_ms: 1,
            content_type: None,
            metadata: BTreeMap::new(),
            headers: HttpHeaders::default(),
        };
        let part_of = |id: &str, n: i32| Op::PutPart {
            id: id.into(),
            number: n,
            part: PartRecord {
                piece: Piece { cap: format!("sf2:{n}"), size: 1, segment_size: 1 },
                md5: "00".into(),
                modified_ms: 1,
            },
        };
        let part = |n: i32| part_of("u1", n);
        let other = Op::CreateUpload { id: "u10".into(), upload: upload.clone() };
        index.apply(0, &[Op::CreateUpload { id: "u1".into(), upload }, other, part(1)]).unwrap();
        index.apply(1, &[part(2), part(10_000), part_of("u10", 3)]).unwrap();
        assert_eq!(index.parts("u1").unwrap().len(), 3);
        index.apply(2, &[Op::AbortUpload { id: "u1".into() }]).unwrap();
        assert!(index.upload("u1").unwrap().is_none());
        assert!(index.parts("u1").unwrap().is_empty());
        // Another upload whose id shares the prefix keeps its part.
        assert_eq!(index.parts("u10").unwrap().len(), 1);
        assert_eq!(index.uploads().unwrap().len(), 1);
    }
}
