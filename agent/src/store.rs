//! The durable store: shard payloads in plain files, everything else in RocksDB.
//!
//! # Why files for payloads
//!
//! Shards are large (up to tens of MiB), written once, read whole, and deleted whole. In an
//! LSM tree every value is rewritten by each compaction that passes over it; at terabyte scale
//! that write amplification eats the disk's bandwidth. RocksDB's BlobDB avoids most of it but
//! still garbage-collects blob files by rewriting live blobs, and its reads of large values are
//! several times slower than plain files (LIMITS.md: 1.07 vs 5.2 GB/s warm gets). Plain files
//! written `tmp → fsync → rename → fsync(dir)` cost one write per byte, read at page-cache
//! speed, and free space immediately on delete. This is what Garage and Storj do; the agent
//! benchmark (`agent/benches/store.rs`) measures both on the same workload.
//!
//! RocksDB holds what an LSM suits: small records with ordered keys — and small shards. A
//! shard of at most [`INLINE_MAX`] bytes (the shards of objects up to ~64 KiB at k = 4) is
//! kept as a value beside its index record, written in the same synced batch: no file, no
//! inode, no directory fsync. As one file each, 40 000 4 KiB objects took three times their
//! size on disk (a ~1 KiB shard fills a 4 KiB block, plus its inode); as values they are
//! packed into SST files. Records say where the payload is (`ShardRecord::inline`).
//!
//! | column family | key | value |
//! |---|---|---|
//! | `headers` | object id ‖ segment (BE) | the signed segment header |
//! | `index` | partition (BE) ‖ object id ‖ segment (BE) ‖ shard (BE) | [`ShardRecord`] |
//! | `quota` | owner root id | bytes stored for that owner (u64 LE) |
//! | `state` | name | agent state: used bytes, scrub cursor, capacity proof |
//! | `payloads` | object id ‖ segment (BE) ‖ shard (BE) | a small shard's bytes (≤ [`INLINE_MAX`]) |
//! | `tombstones` | object id | `expires_ms` (LE) ‖ the encoded tombstone |
//! | `tombstone_log` | arrival number (BE) | object id: tombstones in the order they arrived |
//!
//! The index is ordered by partition first, so `ListShards(partition)` is one range scan.
//!
//! # Crash safety
//!
//! A shard is acknowledged only after its file is fsynced and renamed, its directory fsynced,
//! and its index record written with a synced WAL. A crash before the index write leaves an
//! orphan file and nothing acknowledged; [`Store::open`] removes temp files and orphans.
//! A crash after it leaves a complete, verified shard.
//!
//! Every call here blocks; the async layers call it through `spawn_blocking`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rocksdb::{
    ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// RocksDB failed.
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// The object was deleted by its uploader (a tombstone is kept).
    #[error("the object was deleted by its uploader")]
    Deleted,
    /// A stored record does not parse.
    #[error("corrupt record in {cf}: {reason}")]
    Record {
        /// Column family.
        cf: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl StoreError {
    /// True when the disk is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.raw_os_error() == Some(28))
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_path_buf(), source }
}

pub use shardfarm_core::shard::{PartitionSummary, ShardId};

const CF_HEADERS: &str = "headers";
const CF_INDEX: &str = "index";
const CF_QUOTA: &str = "quota";
const CF_STATE: &str = "state";
/// Tombstones by object id: `deleted_ms ‖ expires_ms` (LE) ‖ the encoded tombstone.
const CF_TOMBSTONES: &str = "tombstones";
/// Tombstones in arrival order: arrival number (u64 BE) → object id. Peers page through it
/// from where they stopped, so a quiet pool's tombstone sync reads nothing.
const CF_TOMBSTONE_LOG: &str = "tombstone_log";
/// The last arrival number given (u64 LE) and this store's log id (u64 LE, random, nonzero).
const STATE_TOMBSTONE_SEQ: &[u8] = b"tombstone_seq";
const STATE_TOMBSTONE_LOG: &[u8] = b"tombstone_log";
/// Small shards' bytes by object ‖ segment ‖ shard.
const CF_PAYLOADS: &str = "payloads";
/// Shards of at most this many bytes are kept in RocksDB (`payloads`), larger ones as files.
pub const INLINE_MAX: u64 = 16 << 10;
const STATE_USED: &[u8] = b"used_bytes";
const STATE_QUARANTINED: &[u8] = b"quarantined_bytes";

fn overflow() -> StoreError {
    StoreError::Record { cf: CF_STATE, reason: "byte count overflows u64".into() }
}
/// Version 2 adds where the payload is (version 1 records are files).
const RECORD_VERSION: u8 = 2;

/// What the index says about a stored shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardRecord {
    /// Payload length.
    pub length: u64,
    /// Merkle root of the payload (equal to the header's root for the slot).
    pub root: [u8; 32],
    /// When it was stored, unix ms.
    pub stored_ms: u64,
    /// The owner root the bytes count against.
    pub owner: [u8; 32],
    /// The payload is a value in RocksDB (`payloads`), not a file.
    pub inline: bool,
}

impl ShardRecord {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(82);
        b.push(RECORD_VERSION);
        b.extend_from_slice(&self.length.to_le_bytes());
        b.extend_from_slice(&self.root);
        b.extend_from_slice(&self.stored_ms.to_le_bytes());
        b.extend_from_slice(&self.owner);
        b.push(u8::from(self.inline));
        b
    }

    fn decode(b: &[u8]) -> Result<Self> {
        // Version 1 (81 bytes) is version 2 without the last byte: its payloads are files
        // (Garage `util/migrate.rs` style: older records are read as they were written).
        let inline = match (b.first(), b.len()) {
            (Some(1), 81) => false,
            (Some(2), 82) if b[81] <= 1 => b[81] == 1,
            _ => {
                return Err(StoreError::Record {
                    cf: CF_INDEX,
                    reason: format!("{} bytes, version {:?}", b.len(), b.first()),
                });
            }
        };
        Ok(ShardRecord {
            length: u64::from_le_bytes(b[1..9].try_into().unwrap()),
            root: b[9..41].try_into().unwrap(),
            stored_ms: u64::from_le_bytes(b[41..49].try_into().unwrap()),
            owner: b[49..81].try_into().unwrap(),
            inline,
        })
    }
}

/// Writes `bytes` to `path` through a temp file: fsynced, renamed into place, so `path` is
/// either its old self or the whole new content.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("partial");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// The `payloads` key of a shard: object ‖ segment ‖ shard, big-endian.
fn payload_key(id: &ShardId) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..36].copy_from_slice(&id.header_key());
    k[36..].copy_from_slice(&id.shard.to_be_bytes());
    k
}

/// A shard being written: in memory while it is small enough to be kept inline, then a temp
/// file; and the running Merkle root.
pub struct PendingShard {
    /// Created once the shard outgrows [`INLINE_MAX`].
    file: Option<fs::File>,
    /// The bytes while `file` is None.
    small: Vec<u8>,
    path: PathBuf,
    merkle: shardfarm_core::shard::MerkleBuilder,
    written: u64,
    committed: bool,
}

impl PendingShard {
    /// Appends bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let total = self.written + data.len() as u64;
        match &mut self.file {
            None if total <= INLINE_MAX => self.small.extend_from_slice(data),
            None => {
                // Kept before the first write, so Drop removes the file whatever fails next.
                let f = self
                    .file
                    .insert(fs::File::create(&self.path).map_err(io("create", &self.path))?);
                f.write_all(&self.small).map_err(io("write", &self.path))?;
                f.write_all(data).map_err(io("write", &self.path))?;
                self.small = Vec::new();
            }
            Some(f) => f.write_all(data).map_err(io("write", &self.path))?,
        }
        self.merkle.update(data);
        self.written = total;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// The Merkle root of everything written (call once, after the last write).
    pub fn root(&mut self) -> [u8; 32] {
        std::mem::take(&mut self.merkle).finalize()
    }
}

impl Drop for PendingShard {
    // An aborted upload leaves nothing behind (Garage's DeleteOnDrop).
    fn drop(&mut self) {
        if !self.committed && self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    db: DB,
    shards_dir: PathBuf,
    tmp_dir: PathBuf,
    quarantine_dir: PathBuf,
    /// Payload bytes of indexed shards.
    used: AtomicU64,
    /// Payload bytes in `quarantine/` (still on disk, so still counted).
    quarantined: AtomicU64,
    /// Serialises index/quota read-modify-writes. Shard writes themselves run in parallel;
    /// only the short commit step takes this lock.
    commit: Mutex<()>,
    /// Partition summaries, computed on demand and kept until the partition changes.
    summaries: Mutex<Summaries>,
    /// The last tombstone arrival number given (written under `commit`).
    tombstone_seq: AtomicU64,
    /// This store's tombstone log id.
    tombstone_log: u64,
}

/// The summary cache: a change counter per partition, and the summaries computed at a count.
#[derive(Default)]
struct Summaries {
    changes: std::collections::HashMap<u32, u64>,
    cached: std::collections::HashMap<u32, (u64, PartitionSummary)>,
}

/// What [`Store::commit`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    /// Newly stored.
    Stored,
    /// The same shard (same root) was already there; the new copy was discarded.
    AlreadyPresent,
}

impl Store {
    /// Opens (or creates) the store under `dir`, removing temp files and orphan payloads.
    pub fn open(dir: &Path) -> Result<Self> {
        let shards_dir = dir.join("shards");
        let tmp_dir = dir.join("tmp");
        let quarantine_dir = dir.join("quarantine");
        for d in [&shards_dir, &tmp_dir, &quarantine_dir] {
            fs::create_dir_all(d).map_err(io("create", d))?;
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Small records only: a modest write buffer keeps memory low on edge boxes.
        opts.set_write_buffer_size(16 << 20);
        opts.set_max_open_files(512);
        let cfs = [
            CF_HEADERS,
            CF_INDEX,
            CF_QUOTA,
            CF_STATE,
            CF_TOMBSTONES,
            CF_PAYLOADS,
            CF_TOMBSTONE_LOG,
        ]
        .map(|n| ColumnFamilyDescriptor::new(n, opts.clone()));
        let db_path = dir.join("db");
        let db = DB::open_cf_descriptors(&opts, &db_path, cfs)?;
        let store = Store {
            db,
            shards_dir,
            tmp_dir,
            quarantine_dir,
            used: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            commit: Mutex::new(()),
            summaries: Mutex::default(),
            tombstone_seq: AtomicU64::new(0),
            tombstone_log: 0,
        };
        let counter = |name: &[u8]| -> Result<u64> {
            Ok(store
                .db
                .get_cf(store.cf(CF_STATE), name)?
                .map(|v| u64::from_le_bytes(v.as_slice().try_into().unwrap_or([0; 8])))
                .unwrap_or(0))
        };
        store.used.store(counter(STATE_USED)?, Ordering::SeqCst);
        store.quarantined.store(counter(STATE_QUARANTINED)?, Ordering::SeqCst);
        store.recover()?;
        let log = match counter(STATE_TOMBSTONE_LOG)? {
            0 => store.start_tombstone_log()?,
            log => log,
        };
        store.tombstone_seq.store(counter(STATE_TOMBSTONE_SEQ)?, Ordering::SeqCst);
        Ok(Store { tombstone_log: log, ..store })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }

    fn sync_write(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Removes temp files (aborted uploads) and payload files that no index record names
    /// (a crash between rename and index write: never acknowledged).
    fn recover(&self) -> Result<()> {
        for e in fs::read_dir(&self.tmp_dir).map_err(io("list", &self.tmp_dir))? {
            let e = e.map_err(io("list", &self.tmp_dir))?;
            let _ = fs::remove_file(e.path());
        }
        let mut indexed = std::collections::HashSet::new();
        for item in self.db.iterator_cf(self.cf(CF_INDEX), IteratorMode::Start) {
            let (k, v) = item?;
            // A record that does not decode is taken as a file's: its payload is kept.
            if let Some((_, id)) = ShardId::from_index_key(&k)
                && !ShardRecord::decode(&v).is_ok_and(|r| r.inline)
            {
                indexed.insert(id.file_name());
            }
        }
        for sub in fs::read_dir(&self.shards_dir).map_err(io("list", &self.shards_dir))? {
            let sub = sub.map_err(io("list", &self.shards_dir))?.path();
            let Ok(files) = fs::read_dir(&sub) else { continue };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if !indexed.contains(&name) {
                    tracing::warn!(file = %f.path().display(), "removing orphan shard file (never acknowledged)");
                    let _ = fs::remove_file(f.path());
                }
            }
        }
        Ok(())
    }

    /// The payload path of a shard (`shards/<first byte of object id>/<name>`).
    pub fn shard_path(&self, id: &ShardId) -> PathBuf {
        self.shards_dir.join(hex::encode(&id.object_id[..1])).join(id.file_name())
    }

    /// Payload bytes on disk: indexed shards plus quarantined copies not yet freed. Capacity
    /// and reports use this figure.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst).saturating_add(self.quarantined_bytes())
    }

    /// Payload bytes of indexed shards only.
    pub fn indexed_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Payload bytes in quarantine.
    pub fn quarantined_bytes(&self) -> u64 {
        self.quarantined.load(Ordering::SeqCst)
    }

    fn quarantined_path(&self, id: &ShardId) -> PathBuf {
        self.quarantine_dir.join(format!("{}.corrupted", id.file_name()))
    }

    /// Deletes quarantined copies older than `max_age` (their slot was rebuilt elsewhere or
    /// here long ago) and gives their bytes back. Returns how many were deleted.
    pub fn expire_quarantine(&self, max_age: std::time::Duration) -> Result<usize> {
        let mut n = 0;
        for e in fs::read_dir(&self.quarantine_dir).map_err(io("list", &self.quarantine_dir))? {
            let Ok(e) = e else { continue };
            let Ok(meta) = e.metadata() else { continue };
            let old =
                meta.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a > max_age);
            if !old {
                continue;
            }
            // Under the lock commit and quarantine take, so the count cannot race them.
            let _guard = self.commit.lock().unwrap();
            let Ok(meta) = fs::metadata(e.path()) else { continue };
            if fs::remove_file(e.path()).is_ok() {
                let q = self.quarantined_bytes().saturating_sub(meta.len());
                let mut b = WriteBatch::default();
                b.put_cf(self.cf(CF_STATE), STATE_QUARANTINED, q.to_le_bytes());
                self.sync_write(b)?;
                self.quarantined.store(q, Ordering::SeqCst);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Starts writing a shard (in memory, then a temp file if it grows past [`INLINE_MAX`]).
    pub fn begin(&self) -> Result<PendingShard> {
        let mut rnd = [0u8; 12];
        getrandom::fill(&mut rnd).expect("the operating system's random generator failed");
        let path = self.tmp_dir.join(format!("tmp{}", hex::encode(rnd)));
        Ok(PendingShard {
            file: None,
            small: Vec::new(),
            path,
            merkle: Default::default(),
            written: 0,
            committed: false,
        })
    }

    /// Makes a pending shard durable and indexed. The caller has checked its length and its
    /// `root` (from [`PendingShard::root`]) against the signed header.
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &self,
        mut pending: PendingShard,
        root: [u8; 32],
        id: &ShardId,
        partition: u32,
        header: &[u8],
        owner: [u8; 32],
        now_ms: u64,
    ) -> Result<(Committed, ShardRecord)> {
        let inline = pending.file.is_none();
        let record = ShardRecord { length: pending.len(), root, stored_ms: now_ms, owner, inline };
        if let Some(f) = &pending.file {
            f.sync_all().map_err(io("fsync", &pending.path))?;
        }
        let _guard = self.commit.lock().unwrap();
        // Checked again under the lock a tombstone write takes: an upload that began before
        // an `rm` cannot land after it.
        if self.db.get_cf(self.cf(CF_TOMBSTONES), id.object_id)?.is_some() {
            return Err(StoreError::Deleted);
        }
        let key = id.index_key(partition);
        let mut replaced = None;
        if let Some(old) = self.db.get_cf(self.cf(CF_INDEX), key)? {
            let old = ShardRecord::decode(&old)?;
            if old.root == record.root && self.payload_exists(id, &old)? {
                return Ok((Committed::AlreadyPresent, old));
            }
            replaced = Some(old);
        }
        let dest = self.shard_path(id);
        if !inline {
            let dir = dest.parent().expect("shard path has a parent");
            if !dir.exists() {
                // A new `shards/xx/` directory: its own entry in `shards/` must be durable too.
                fs::create_dir_all(dir).map_err(io("create", dir))?;
                fs::File::open(&self.shards_dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io("fsync dir", &self.shards_dir))?;
            }
            fs::rename(&pending.path, &dest).map_err(io("rename", &dest))?;
            fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync dir", dir))?;
        }
        pending.committed = true;

        // Accounting: a replaced record gives its bytes back (to its own owner) before the
        // new one is charged. All sums are checked: a wrap would be a bug, never silent.
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_HEADERS), id.header_key(), header);
        batch.put_cf(self.cf(CF_INDEX), key, record.encode());
        if inline {
            // The bytes are durable with the index record: one synced batch.
            batch.put_cf(self.cf(CF_PAYLOADS), payload_key(id), &pending.small);
        } else if replaced.as_ref().is_some_and(|old| old.inline) {
            batch.delete_cf(self.cf(CF_PAYLOADS), payload_key(id));
        }
        let mut used = self.used.load(Ordering::SeqCst);
        if let Some(old) = &replaced {
            let q = self.quota_used(&old.owner)?.saturating_sub(old.length);
            batch.put_cf(self.cf(CF_QUOTA), old.owner, q.to_le_bytes());
            used = used.saturating_sub(old.length);
        }
        let prior = match &replaced {
            Some(old) if old.owner == owner => self.quota_used(&owner)?.saturating_sub(old.length),
            _ => self.quota_used(&owner)?,
        };
        let quota = prior.checked_add(record.length).ok_or_else(overflow)?;
        batch.put_cf(self.cf(CF_QUOTA), owner, quota.to_le_bytes());
        let used = used.checked_add(record.length).ok_or_else(overflow)?;
        batch.put_cf(self.cf(CF_STATE), STATE_USED, used.to_le_bytes());
        let stale = self.quarantined_path(id);
        let freed = match fs::symlink_metadata(&stale) {
            Ok(m) => {
                let q = self.quarantined_bytes().saturating_sub(m.len());
                batch.put_cf(self.cf(CF_STATE), STATE_QUARANTINED, q.to_le_bytes());
                Some((q, stale))
            }
            Err(_) => None,
        };
        if let Err(e) = self.sync_write(batch) {
            // Not indexed, not acknowledged: remove the payload so nothing half-exists.
            if !inline {
                let _ = fs::remove_file(&dest);
            }
            return Err(e);
        }
        if inline && replaced.as_ref().is_some_and(|old| !old.inline) {
            // The file it replaced (a crash before this leaves an orphan `open` removes).
            let _ = fs::remove_file(&dest);
        }
        self.used.store(used, Ordering::SeqCst);
        self.changed(partition);
        if let Some((q, stale)) = freed {
            // The slot is healthy again: its quarantined copy has served its purpose.
            let _ = fs::remove_file(stale);
            self.quarantined.store(q, Ordering::SeqCst);
        }
        Ok((Committed::Stored, record))
    }

    /// The index record of a shard.
    pub fn record(&self, id: &ShardId, partition: u32) -> Result<Option<ShardRecord>> {
        self.db
            .get_cf(self.cf(CF_INDEX), id.index_key(partition))?
            .map(|v| ShardRecord::decode(&v))
            .transpose()
    }

    /// Whether the payload a record names is there (its value, or its file).
    fn payload_exists(&self, id: &ShardId, record: &ShardRecord) -> Result<bool> {
        Ok(match record.inline {
            true => self.db.get_pinned_cf(self.cf(CF_PAYLOADS), payload_key(id))?.is_some(),
            false => self.shard_path(id).exists(),
        })
    }

    /// The signed header of a shard's segment.
    pub fn header(&self, id: &ShardId) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_HEADERS), id.header_key())?)
    }

    /// Maps a whole payload read-only: no copy and no fresh allocation (the pages are the page
    /// cache's), which halves the cost of a large GetShard (a fresh 16 MiB buffer costs more in
    /// page faults than hashing it). A file whose length is not `expected` is not mapped and
    /// reported as an error, so a truncated payload is caught as corruption.
    /// A small shard kept in RocksDB is copied out of it.
    pub fn map(&self, id: &ShardId, expected: u64) -> Result<bytes::Bytes> {
        if expected <= INLINE_MAX
            && let Some(v) = self.db.get_cf(self.cf(CF_PAYLOADS), payload_key(id))?
        {
            if v.len() as u64 != expected {
                return Err(StoreError::Record {
                    cf: CF_PAYLOADS,
                    reason: format!("payload is {} bytes, the index says {expected}", v.len()),
                });
            }
            return Ok(bytes::Bytes::from(v));
        }
        let path = self.shard_path(id);
        let f = fs::File::open(&path).map_err(io("open", &path))?;
        let len = f.metadata().map_err(io("stat", &path))?.len();
        if len != expected {
            return Err(StoreError::Record {
                cf: CF_INDEX,
                reason: format!("payload is {len} bytes, the index says {expected}"),
            });
        }
        if len == 0 {
            return Ok(bytes::Bytes::new());
        }
        // SAFETY: payload files are written under a temp name and renamed into place; nothing
        // in the agent writes or truncates them afterwards (delete unlinks, quarantine renames,
        // both leave an existing mapping valid). Another process truncating the file under us
        // would be outside the agent's contract, as with any mmap-based store.
        let m = unsafe { memmap2::Mmap::map(&f) }.map_err(io("mmap", &path))?;
        Ok(bytes::Bytes::from_owner(m))
    }

    /// Removes a shard: index record, quota, payload; the header too when no other shard of
    /// its segment remains here. Returns the removed record.
    pub fn remove(&self, id: &ShardId, partition: u32) -> Result<Option<ShardRecord>> {
        self.remove_to(id, partition, None, None)
    }

    /// Removes a shard from the index and moves its payload to `quarantine/` (kept for
    /// inspection and still counted as used, no longer served), so repair rebuilds it like a
    /// lost one; the copy is freed when the slot is stored here again or it expires.
    ///
    /// `found` is the record of the copy found corrupt: if the index now names another copy (a
    /// repair stored a good one since the bad one was opened), nothing changes and `None` is
    /// returned, as when the shard is gone.
    pub fn quarantine(
        &self,
        id: &ShardId,
        partition: u32,
        found: &ShardRecord,
    ) -> Result<Option<ShardRecord>> {
        let dest = self.quarantined_path(id);
        self.remove_to(id, partition, Some(dest), Some(found))
    }

    fn remove_to(
        &self,
        id: &ShardId,
        partition: u32,
        keep: Option<PathBuf>,
        only: Option<&ShardRecord>,
    ) -> Result<Option<ShardRecord>> {
        let _guard = self.commit.lock().unwrap();
        let key = id.index_key(partition);
        let Some(old) = self.db.get_cf(self.cf(CF_INDEX), key)? else { return Ok(None) };
        let old = ShardRecord::decode(&old)?;
        if only.is_some_and(|want| *want != old) {
            return Ok(None);
        }
        let mut batch = WriteBatch::default();
        batch.delete_cf(self.cf(CF_INDEX), key);
        if old.inline {
            batch.delete_cf(self.cf(CF_PAYLOADS), payload_key(id));
        }
        let quota = self.quota_used(&old.owner)?.saturating_sub(old.length);
        batch.put_cf(self.cf(CF_QUOTA), old.owner, quota.to_le_bytes());
        let used = self.used.load(Ordering::SeqCst).saturating_sub(old.length);
        batch.put_cf(self.cf(CF_STATE), STATE_USED, used.to_le_bytes());
        if !self.segment_has_other_shards(id, partition)? {
            batch.delete_cf(self.cf(CF_HEADERS), id.header_key());
        }
        let path = self.shard_path(id);
        // A quarantined copy stays counted (its real size, if it could be moved) until it is
        // freed; a second quarantine of the same slot replaces the first copy, whose bytes are
        // given back.
        let mut quarantined = None;
        if let Some(dest) = &keep {
            let prev = fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
            let (moved, size) = if old.inline {
                // A small shard's quarantined copy is written out as a file like the others.
                match self.db.get_cf(self.cf(CF_PAYLOADS), payload_key(id))? {
                    Some(v) => (write_durably(dest, &v).is_ok(), v.len() as u64),
                    None => (false, 0),
                }
            } else {
                let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                (fs::rename(&path, dest).is_ok(), size)
            };
            let q = self
                .quarantined_bytes()
                .saturating_sub(if moved { prev } else { 0 })
                .checked_add(if moved { size } else { 0 })
                .ok_or_else(overflow)?;
            batch.put_cf(self.cf(CF_STATE), STATE_QUARANTINED, q.to_le_bytes());
            quarantined = Some(q);
        }
        self.sync_write(batch)?;
        self.used.store(used, Ordering::SeqCst);
        self.changed(partition);
        if let Some(q) = quarantined {
            self.quarantined.store(q, Ordering::SeqCst);
        }
        if keep.is_none() && !old.inline {
            let _ = fs::remove_file(&path);
        }
        Ok(Some(old))
    }

    fn segment_has_other_shards(&self, id: &ShardId, partition: u32) -> Result<bool> {
        let prefix = &id.index_key(partition)[..40];
        let mode = IteratorMode::From(prefix, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_INDEX), mode) {
            let (k, _) = item?;
            if !k.starts_with(prefix) {
                break;
            }
            if let Some((_, other)) = ShardId::from_index_key(&k)
                && other.shard != id.shard
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    // ---- Tombstones ----

    /// Keeps the tombstone of `object_id` (encoded; verified by the caller) until
    /// `expires_ms`. An existing one is kept (the first deletion stands).
    pub fn put_tombstone(
        &self,
        object_id: &[u8; 32],
        encoded: &[u8],
        expires_ms: u64,
    ) -> Result<bool> {
        let _guard = self.commit.lock().unwrap();
        if self.db.get_cf(self.cf(CF_TOMBSTONES), object_id)?.is_some() {
            return Ok(false);
        }
        let mut v = expires_ms.to_le_bytes().to_vec();
        v.extend_from_slice(encoded);
        let seq = self.tombstone_seq.load(Ordering::SeqCst) + 1;
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_TOMBSTONES), object_id, v);
        b.put_cf(self.cf(CF_TOMBSTONE_LOG), seq.to_be_bytes(), object_id);
        b.put_cf(self.cf(CF_STATE), STATE_TOMBSTONE_SEQ, seq.to_le_bytes());
        self.sync_write(b)?;
        self.tombstone_seq.store(seq, Ordering::SeqCst);
        Ok(true)
    }

    /// A new tombstone log: a random id, and every tombstone already kept (a store written
    /// before the log existed) entered in object id order.
    fn start_tombstone_log(&self) -> Result<u64> {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).expect("the operating system's random generator failed");
        let log = u64::from_le_bytes(r).max(1);
        let mut b = WriteBatch::default();
        // Entries of a log whose id was lost would be listed twice under the new one.
        b.delete_range_cf(self.cf(CF_TOMBSTONE_LOG), [0u8; 8], [0xFFu8; 8]);
        b.delete_cf(self.cf(CF_TOMBSTONE_LOG), [0xFFu8; 8]);
        let mut seq = 0u64;
        for item in self.db.iterator_cf(self.cf(CF_TOMBSTONES), IteratorMode::Start) {
            let (k, _) = item?;
            seq += 1;
            b.put_cf(self.cf(CF_TOMBSTONE_LOG), seq.to_be_bytes(), k);
        }
        b.put_cf(self.cf(CF_STATE), STATE_TOMBSTONE_SEQ, seq.to_le_bytes());
        b.put_cf(self.cf(CF_STATE), STATE_TOMBSTONE_LOG, log.to_le_bytes());
        self.sync_write(b)?;
        Ok(log)
    }

    /// This store's tombstone log id (see [`Store::tombstones_since`]).
    pub fn tombstone_log(&self) -> u64 {
        self.tombstone_log
    }

    /// Up to `limit` encoded tombstones that arrived after arrival number `after`, in arrival
    /// order, with the arrival number of the last one (`after` when there is none).
    pub fn tombstones_since(&self, after: u64, limit: usize) -> Result<(Vec<Vec<u8>>, u64)> {
        let start = after.saturating_add(1).to_be_bytes();
        let mode = IteratorMode::From(&start, Direction::Forward);
        let (mut out, mut last) = (Vec::new(), after);
        for item in self.db.iterator_cf(self.cf(CF_TOMBSTONE_LOG), mode) {
            if out.len() >= limit {
                break;
            }
            let (k, id) = item?;
            let Ok(seq) = <[u8; 8]>::try_from(&k[..]) else { continue };
            last = u64::from_be_bytes(seq);
            // Expired since (the log is pruned with the expiry): skipped.
            if let Some(v) = self.db.get_cf(self.cf(CF_TOMBSTONES), &id)?
                && v.len() > 8
            {
                out.push(v[8..].to_vec());
            }
        }
        Ok((out, last))
    }

    /// True when the object has a tombstone here.
    pub fn is_tombstoned(&self, object_id: &[u8; 32]) -> Result<bool> {
        Ok(self.db.get_cf(self.cf(CF_TOMBSTONES), object_id)?.is_some())
    }

    /// Forgets tombstones that expired before `now_ms`, and their entries in the arrival log.
    /// Returns how many.
    pub fn expire_tombstones(&self, now_ms: u64) -> Result<usize> {
        let mut b = WriteBatch::default();
        let mut gone = std::collections::HashSet::new();
        for item in self.db.iterator_cf(self.cf(CF_TOMBSTONES), IteratorMode::Start) {
            let (k, v) = item?;
            let expires = v.get(..8).map_or(0, |e| u64::from_le_bytes(e.try_into().unwrap()));
            if expires < now_ms {
                b.delete_cf(self.cf(CF_TOMBSTONES), &k);
                gone.insert(k);
            }
        }
        if !gone.is_empty() {
            for item in self.db.iterator_cf(self.cf(CF_TOMBSTONE_LOG), IteratorMode::Start) {
                let (k, id) = item?;
                if gone.contains(&id) {
                    b.delete_cf(self.cf(CF_TOMBSTONE_LOG), k);
                }
            }
            self.sync_write(b)?;
        }
        Ok(gone.len())
    }

    /// Every shard of `object_id` held here (any segment, any partition), found through the
    /// segment headers kept for it.
    pub fn shards_of_object(
        &self,
        object_id: &[u8; 32],
        partitions: u32,
    ) -> Result<Vec<(u32, ShardId)>> {
        let mut segments = Vec::new();
        let mode = IteratorMode::From(object_id, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_HEADERS), mode) {
            let (k, _) = item?;
            if !k.starts_with(object_id) || k.len() != 36 {
                break;
            }
            segments.push(u32::from_be_bytes(k[32..36].try_into().unwrap()));
        }
        let mut out = Vec::new();
        for seg in segments {
            let p = shardfarm_core::shard::partition(object_id, seg, partitions);
            let probe = ShardId { object_id: *object_id, segment: seg, shard: 0 };
            let prefix = probe.index_key(p)[..40].to_vec();
            let mode = IteratorMode::From(&prefix, Direction::Forward);
            for item in self.db.iterator_cf(self.cf(CF_INDEX), mode) {
                let (k, _) = item?;
                if !k.starts_with(&prefix) {
                    break;
                }
                if let Some((p, id)) = ShardId::from_index_key(&k) {
                    out.push((p, id));
                }
            }
        }
        Ok(out)
    }

    /// Bytes stored for an owner root.
    pub fn quota_used(&self, owner: &[u8; 32]) -> Result<u64> {
        Ok(self
            .db
            .get_cf(self.cf(CF_QUOTA), owner)?
            .map(|v| u64::from_le_bytes(v.as_slice().try_into().unwrap_or([0; 8])))
            .unwrap_or(0))
    }

    /// Up to `limit` shards of `partition` after `start_after` (exclusive), in key order.
    pub fn list(
        &self,
        partition: u32,
        start_after: Option<ShardId>,
        limit: usize,
    ) -> Result<Vec<(ShardId, ShardRecord)>> {
        self.scan(Some(partition), start_after.map(|s| s.index_key(partition).to_vec()), limit)
            .map(|v| v.into_iter().map(|(_, id, r)| (id, r)).collect())
    }

    /// Up to `limit` shards of any partition after the raw index key `after`, in key order
    /// (the scrub's cursor walk).
    pub fn scan(
        &self,
        partition: Option<u32>,
        after: Option<Vec<u8>>,
        limit: usize,
    ) -> Result<Vec<(u32, ShardId, ShardRecord)>> {
        let start = after
            .clone()
            .unwrap_or_else(|| partition.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default());
        let mode = IteratorMode::From(&start, Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_INDEX), mode) {
            let (k, v) = item?;
            if after.as_deref() == Some(&k[..]) {
                continue;
            }
            let Some((p, id)) = ShardId::from_index_key(&k) else { continue };
            if partition.is_some_and(|want| want != p) || out.len() >= limit {
                break;
            }
            out.push((p, id, ShardRecord::decode(&v)?));
        }
        Ok(out)
    }

    /// What this node holds in `partition`, summarised ([`PartitionSummary`]). Computed by one
    /// scan of the partition's index range the first time, then kept until a shard of the
    /// partition is stored or removed: a quiet partition costs a map lookup.
    pub fn summary(&self, partition: u32) -> Result<PartitionSummary> {
        let at = {
            let s = self.summaries.lock().unwrap();
            let at = s.changes.get(&partition).copied().unwrap_or(0);
            if let Some((when, summary)) = s.cached.get(&partition)
                && *when == at
            {
                return Ok(*summary);
            }
            at
        };
        let mut b = shardfarm_core::shard::SummaryBuilder::default();
        let prefix = partition.to_be_bytes();
        let mode = IteratorMode::From(&prefix, Direction::Forward);
        for item in self.db.iterator_cf(self.cf(CF_INDEX), mode) {
            let (k, _) = item?;
            match ShardId::from_index_key(&k) {
                Some((p, id)) if p == partition => b.add(&id),
                _ => break,
            }
        }
        let summary = b.finish();
        let mut s = self.summaries.lock().unwrap();
        // Kept only if nothing changed in the partition while it was scanned.
        if s.changes.get(&partition).copied().unwrap_or(0) == at {
            s.cached.insert(partition, (at, summary));
        }
        Ok(summary)
    }

    /// A shard of `partition` was stored or removed: its summary is computed again when asked.
    /// Called after the index write, so a scan racing it is never kept.
    fn changed(&self, partition: u32) {
        let mut s = self.summaries.lock().unwrap();
        *s.changes.entry(partition).or_default() += 1;
        s.cached.remove(&partition);
    }

    /// Number of tombstones kept (an estimate from RocksDB for large stores).
    pub fn tombstone_count(&self) -> u64 {
        self.estimate_keys(CF_TOMBSTONES)
    }

    /// Number of shards indexed (an estimate from RocksDB for large stores).
    pub fn shard_count(&self) -> u64 {
        self.estimate_keys(CF_INDEX)
    }

    fn estimate_keys(&self, cf: &str) -> u64 {
        self.db
            .property_int_value_cf(self.cf(cf), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Reads an agent state value.
    pub fn get_state(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_STATE), name.as_bytes())?)
    }

    /// Writes an agent state value (synced).
    pub fn put_state(&self, name: &str, value: &[u8]) -> Result<()> {
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_STATE), name.as_bytes(), value);
        self.sync_write(b)
    }

    /// Deletes an agent state value (synced).
    pub fn delete_state(&self, name: &str) -> Result<()> {
        let mut b = WriteBatch::default();
        b.delete_cf(self.cf(CF_STATE), name.as_bytes());
        self.sync_write(b)
    }

    /// Flushes memtables and the WAL (graceful shutdown).
    pub fn flush(&self) -> Result<()> {
        self.db.flush_wal(true)?;
        for cf in
            [CF_HEADERS, CF_INDEX, CF_QUOTA, CF_STATE, CF_TOMBSTONES, CF_PAYLOADS, CF_TOMBSTONE_LOG]
        {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// One step of the accounting property test.
    #[derive(Debug, Clone)]
    enum Op {
        /// Store (or overwrite) slot `slot` with `len` bytes of `fill`, charged to `owner`.
        Put {
            slot: u8,
            len: u32,
            fill: u8,
            owner: u8,
        },
        Remove {
            slot: u8,
        },
        Quarantine {
            slot: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            // Small shards (kept in RocksDB) and large ones (files), replacing each other.
            4 => (0..6u8, prop_oneof![0..3000u32, 16_000..17_000u32], any::<u8>(), 0..3u8)
                .prop_map(|(slot, len, fill, owner)| Op::Put { slot, len, fill, owner }),
            1 => (0..6u8).prop_map(|slot| Op::Remove { slot }),
            1 => (0..6u8).prop_map(|slot| Op::Quarantine { slot }),
        ]
    }

    fn id(slot: u8) -> ShardId {
        ShardId { object_id: [9; 32], segment: u32::from(slot / 3), shard: u32::from(slot % 3) }
    }

    /// A reader that found a copy corrupt quarantines that copy only: once a repair has
    /// stored a good copy in its place, the late quarantine leaves the good one served.
    #[test]
    fn a_late_quarantine_does_not_remove_a_newer_copy() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let put = |fill: u8, now_ms: u64| {
            let mut p = store.begin().unwrap();
            p.write(&[fill; 100]).unwrap();
            let root = p.root();
            store.commit(p, root, &id(1), 0, b"header", [7; 32], now_ms).unwrap();
        };
        put(1, 1);
        let bad = store.record(&id(1), 0).unwrap().unwrap();
        store.remove(&id(1), 0).unwrap();
        put(2, 2);
        let good = store.record(&id(1), 0).unwrap().unwrap();
        assert_eq!(store.quarantine(&id(1), 0, &bad).unwrap(), None);
        assert_eq!(store.record(&id(1), 0).unwrap(), Some(good.clone()));
        assert_eq!(store.quarantined_bytes(), 0);
        assert_eq!(store.quarantine(&id(1), 0, &good).unwrap(), Some(good));
        assert_eq!(store.record(&id(1), 0).unwrap(), None);
    }

    /// Tombstones are listed in arrival order from any arrival number, survive a restart under
    /// the same log id, leave the log when they expire, and a store kept before the log
    /// existed gets one with every tombstone it keeps.
    #[test]
    fn tombstones_are_listed_since_an_arrival_number() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let log = store.tombstone_log();
        assert_ne!(log, 0);
        assert_eq!(store.tombstones_since(0, 10).unwrap(), (vec![], 0));
        // Object ids in descending order: arrival order is not id order.
        for i in 0..5u8 {
            let expires = if i == 1 { 10 } else { u64::MAX };
            assert!(store.put_tombstone(&[9 - i; 32], &[i; 40], expires).unwrap());
        }
        assert!(!store.put_tombstone(&[9; 32], &[0; 40], u64::MAX).unwrap(), "kept twice");
        let (page, last) = store.tombstones_since(0, 2).unwrap();
        assert_eq!((page, last), (vec![vec![0u8; 40], vec![1; 40]], 2));
        let (page, last) = store.tombstones_since(2, 10).unwrap();
        assert_eq!(page, vec![vec![2u8; 40], vec![3; 40], vec![4; 40]]);
        assert_eq!(last, 5);
        assert_eq!(store.tombstones_since(5, 10).unwrap(), (vec![], 5));
        // Expired: gone from the listing and from the log.
        assert_eq!(store.expire_tombstones(100).unwrap(), 1);
        let (page, _) = store.tombstones_since(0, 10).unwrap();
        assert_eq!(page.len(), 4);
        assert!(!page.contains(&vec![1u8; 40]));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.tombstone_log(), log, "the log id changed on restart");
        assert!(store.put_tombstone(&[1; 32], &[7; 40], u64::MAX).unwrap());
        assert_eq!(store.tombstones_since(5, 10).unwrap(), (vec![vec![7u8; 40]], 6));
        // A store from before the log: its tombstones are entered in a new log.
        let mut b = WriteBatch::default();
        b.delete_cf(store.cf(CF_STATE), STATE_TOMBSTONE_LOG);
        b.delete_cf(store.cf(CF_STATE), STATE_TOMBSTONE_SEQ);
        for seq in 0..10u64 {
            b.delete_cf(store.cf(CF_TOMBSTONE_LOG), seq.to_be_bytes());
        }
        store.sync_write(b).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_ne!(store.tombstone_log(), log);
        let (page, last) = store.tombstones_since(0, 10).unwrap();
        assert_eq!((page.len(), last), (5, 5));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// After any sequence of overwrites, repairs (re-stores), removals and quarantines,
        /// `used_bytes` is what is on disk (indexed payloads plus quarantined copies) and each
        /// owner's quota is the sum of what it stores: nothing is counted twice or lost.
        #[test]
        fn accounting_equals_what_is_stored(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            for op in &ops {
                match *op {
                    Op::Put { slot, len, fill, owner } => {
                        let data = vec![fill; len as usize];
                        let mut p = store.begin().unwrap();
                        p.write(&data).unwrap();
                        let root = p.root();
                        store.commit(p, root, &id(slot), 0, b"header", [owner; 32], 1).unwrap();
                    }
                    Op::Remove { slot } => {
                        store.remove(&id(slot), 0).unwrap();
                    }
                    Op::Quarantine { slot } => {
                        if let Some(found) = store.record(&id(slot), 0).unwrap() {
                            store.quarantine(&id(slot), 0, &found).unwrap().unwrap();
                        }
                    }
                }
                let listed = store.list(0, None, 100).unwrap();
                let mut by_owner: HashMap<[u8; 32], u64> = HashMap::new();
                for (_, r) in &listed {
                    *by_owner.entry(r.owner).or_default() += r.length;
                }
                let indexed: u64 = listed.iter().map(|(_, r)| r.length).sum();
                let on_disk: u64 = fs::read_dir(&store.shards_dir)
                    .unwrap()
                    .flatten()
                    .flat_map(|d| fs::read_dir(d.path()).unwrap().flatten())
                    .map(|f| f.metadata().unwrap().len())
                    .sum::<u64>()
                    + store
                        .db
                        .iterator_cf(store.cf(CF_PAYLOADS), IteratorMode::Start)
                        .map(|kv| kv.unwrap().1.len() as u64)
                        .sum::<u64>();
                let quarantined: u64 = fs::read_dir(&store.quarantine_dir)
                    .unwrap()
                    .flatten()
                    .map(|f| f.metadata().unwrap().len())
                    .sum();
                prop_assert_eq!(store.indexed_bytes(), indexed, "after {:?}", op);
                prop_assert_eq!(on_disk, indexed, "payload files and values after {:?}", op);
                // Each payload reads back whole, wherever it is kept.
                for (id, r) in &listed {
                    prop_assert_eq!(store.map(id, r.length).unwrap().len() as u64, r.length);
                    prop_assert_eq!(r.inline, r.length <= INLINE_MAX);
                }
                prop_assert_eq!(store.quarantined_bytes(), quarantined, "after {:?}", op);
                prop_assert_eq!(store.used_bytes(), indexed + quarantined);
                // The kept summary is what a fresh scan of the listing gives.
                let mut fresh = shardfarm_core::shard::SummaryBuilder::default();
                listed.iter().for_each(|(id, _)| fresh.add(id));
                prop_assert_eq!(store.summary(0).unwrap(), fresh.finish(), "summary after {:?}", op);
                for owner in 0..3u8 {
                    let want = by_owner.get(&[owner; 32]).copied().unwrap_or(0);
                    prop_assert_eq!(store.quota_used(&[owner; 32]).unwrap(), want, "owner {} after {:?}", owner, op);
                }
            }
            // The figures survive a restart.
            let (used, q) = (store.used_bytes(), store.quarantined_bytes());
            drop(store);
            let store = Store::open(dir.path()).unwrap();
            prop_assert_eq!(store.used_bytes(), used);
            prop_assert_eq!(store.quarantined_bytes(), q);
            // Opening removed no payload that is indexed (orphan files only).
            for (id, r) in store.list(0, None, 100).unwrap() {
                prop_assert_eq!(store.map(&id, r.length).unwrap().len() as u64, r.length);
            }
        }
    }
}
