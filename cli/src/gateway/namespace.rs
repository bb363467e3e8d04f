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
                Op::PutObject { bucket, key, record } => {
                    batch.put(object_key(bucket, key), serde_json::to_vec(record)?)
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

/// Changes waiting for the next entry, each with whom to tell when it is committed.
type Pending = (Vec<Op>, oneshot::Sender<Result<(), String>>);

/// The log writer: commits changes to the pool, then to the index.
#[derive(Clone)]
pub struct Log {
    tx: mpsc::Sender<Pending>,
}

/// The object key of log entry `seq`.
fn entry_key(root: &ed25519_dalek::SigningKey, seq: u64) -> [u8; 32] {
    shardfarm_core::identity::blake2b256(&[LOG_DOMAIN, &root.to_bytes(), &seq.to_le_bytes()])
}

impl Log {
    /// Starts the writer. `root` is the client of the gateway's root identity: it signs the
    /// entries, and its key derives their object keys.
    pub fn start(root: Arc<PoolClient>, index: Arc<Index>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Pending>(1024);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                let mut count = batch[0].0.len();
                while count < MAX_OPS_PER_ENTRY {
                    match rx.try_recv() {
                        Ok(p) => {
                            count += p.0.len();
                            batch.push(p);
                        }
                        Err(_) => break,
                    }
                }
                let ops: Vec<Op> = batch.iter().flat_map(|(ops, _)| ops.clone()).collect();
                let r = commit(&root, &index, ops).await.map_err(|e| format!("{e:#}"));
                if let Err(e) = &r {
                    tracing::error!(error = %e, "could not write the namespace log");
                }
                for (_, done) in batch {
                    let _ = done.send(r.clone());
                }
            }
        });
        Log { tx }
    }

    /// Commits `ops`: when this returns Ok they are in the pool and in the index.
    pub async fn commit(&self, ops: Vec<Op>) -> anyhow::Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx.send((ops, done)).await.map_err(|_| anyhow::anyhow!("the log writer stopped"))?;
        wait.await
            .map_err(|_| anyhow::anyhow!("the log writer stopped"))?
            .map_err(|e| anyhow::anyhow!("{e}"))
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
