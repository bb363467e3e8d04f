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
//! RocksDB holds what an LSM suits: small records with ordered keys.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `headers` | object id ‖ segment (BE) | the signed segment header |
//! | `index` | partition (BE) ‖ object id ‖ segment (BE) ‖ shard (BE) | [`ShardRecord`] |
//! | `quota` | owner root id | bytes stored for that owner (u64 LE) |
//! | `state` | name | agent state: used bytes, scrub cursor, capacity proof |
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

pub use shardfarm_core::shard::ShardId;

const CF_HEADERS: &str = "headers";
const CF_INDEX: &str = "index";
const CF_QUOTA: &str = "quota";
const CF_STATE: &str = "state";
/// Tombstones by object id: `deleted_ms ‖ expires_ms` (LE) ‖ the encoded tombstone.
const CF_TOMBSTONES: &str = "tombstones";
const STATE_USED: &[u8] = b"used_bytes";
const STATE_QUARANTINED: &[u8] = b"quarantined_bytes";

fn overflow() -> StoreError {
    StoreError::Record { cf: CF_STATE, reason: "byte count overflows u64".into() }
}
const RECORD_VERSION: u8 = 1;

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
}

impl ShardRecord {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(81);
        b.push(RECORD_VERSION);
        b.extend_from_slice(&self.length.to_le_bytes());
        b.extend_from_slice(&self.root);
        b.extend_from_slice(&self.stored_ms.to_le_bytes());
        b.extend_from_slice(&self.owner);
        b
    }

    fn decode(b: &[u8]) -> Result<Self> {
        // Version 1 is the only one so far; a later version adds a branch here that migrates
        // the older layout (Garage `util/migrate.rs` style).
        if b.len() != 81 || b[0] != RECORD_VERSION {
            return Err(StoreError::Record {
                cf: CF_INDEX,
                reason: format!("{} bytes, version {:?}", b.len(), b.first()),
            });
        }
        Ok(ShardRecord {
            length: u64::from_le_bytes(b[1..9].try_into().unwrap()),
            root: b[9..41].try_into().unwrap(),
            stored_ms: u64::from_le_bytes(b[41..49].try_into().unwrap()),
            owner: b[49..81].try_into().unwrap(),
        })
    }
}

/// A shard being written: a temp file and the running Merkle root.
pub struct PendingShard {
    file: fs::File,
    path: PathBuf,
    merkle: shardfarm_core::shard::MerkleBuilder,
    written: u64,
    committed: bool,
}

impl PendingShard {
    /// Appends bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.file.write_all(data).map_err(io("write", &self.path))?;
        self.merkle.update(data);
        self.written += data.len() as u64;
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
        if !self.committed {
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
        let cfs = [CF_HEADERS, CF_INDEX, CF_QUOTA, CF_STATE, CF_TOMBSTONES]
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
        Ok(store)
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
            let (k, _) = item?;
            if let Some((_, id)) = ShardId::from_index_key(&k) {
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

    /// Starts writing a shard into a temp file.
    pub fn begin(&self) -> Result<PendingShard> {
        let mut rnd = [0u8; 12];
        getrandom::fill(&mut rnd).expect("the operating system's random generator failed");
        let path = self.tmp_dir.join(format!("tmp{}", hex::encode(rnd)));
        let file = fs::File::create(&path).map_err(io("create", &path))?;
        Ok(PendingShard { file, path, merkle: Default::default(), written: 0, committed: false })
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
        let record = ShardRecord { length: pending.len(), root, stored_ms: now_ms, owner };
        pending.file.sync_all().map_err(io("fsync", &pending.path))?;
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
            if old.root == record.root && self.shard_path(id).exists() {
                return Ok((Committed::AlreadyPresent, old));
            }
            replaced = Some(old);
        }
        let dest = self.shard_path(id);
        let dir = dest.parent().expect("shard path has a parent");
        if !dir.exists() {
            // A new `shards/xx/` directory: its own entry in `shards/` must be durable too.
            fs::create_dir_all(dir).map_err(io("create", dir))?;
            fs::File::open(&self.shards_dir)
                .and_then(|d| d.sync_all())
                .map_err(io("fsync dir", &self.shards_dir))?;
        }
        fs::rename(&pending.path, &dest).map_err(io("rename", &dest))?;
        pending.committed = true;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync dir", dir))?;

        // Accounting: a replaced record gives its bytes back (to its own owner) before the
        // new one is charged. All sums are checked: a wrap would be a bug, never silent.
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_HEADERS), id.header_key(), header);
        batch.put_cf(self.cf(CF_INDEX), key, record.encode());
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
            let _ = fs::remove_file(&dest);
            return Err(e);
        }
        self.used.store(used, Ordering::SeqCst);
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

    /// The signed header of a shard's segment.
    pub fn header(&self, id: &ShardId) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(CF_HEADERS), id.header_key())?)
    }

    /// Maps a whole payload read-only: no copy and no fresh allocation (the pages are the page
    /// cache's), which halves the cost of a large GetShard (a fresh 16 MiB buffer costs more in
    /// page faults than hashing it). A file whose length is not `expected` is not mapped and
    /// reported as an error, so a truncated payload is caught as corruption.
    pub fn map(&self, id: &ShardId, expected: u64) -> Result<bytes::Bytes> {
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
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let moved = fs::rename(&path, dest).is_ok();
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
        if let Some(q) = quarantined {
            self.quarantined.store(q, Ordering::SeqCst);
        }
        if keep.is_none() {
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
        let mut b = WriteBatch::default();
        b.put_cf(self.cf(CF_TOMBSTONES), object_id, v);
        self.sync_write(b)?;
        Ok(true)
    }

    /// True when the object has a tombstone here.
    pub fn is_tombstoned(&self, object_id: &[u8; 32]) -> Result<bool> {
        Ok(self.db.get_cf(self.cf(CF_TOMBSTONES), object_id)?.is_some())
    }

    /// Up to `limit` encoded tombstones after object id `after`, in object id order.
    pub fn list_tombstones(&self, after: Option<[u8; 32]>, limit: usize) -> Result<Vec<Vec<u8>>> {
        let start = after.unwrap_or([0; 32]);
        let mode = IteratorMode::From(&start, Direction::Forward);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_TOMBSTONES), mode) {
            let (k, v) = item?;
            if after.is_some_and(|a| a[..] == k[..]) {
                continue;
            }
            if out.len() >= limit {
                break;
            }
            if v.len() > 8 {
                out.push(v[8..].to_vec());
            }
        }
        Ok(out)
    }

    /// Forgets tombstones that expired before `now_ms`. Returns how many.
    pub fn expire_tombstones(&self, now_ms: u64) -> Result<usize> {
        let mut b = WriteBatch::default();
        let mut n = 0;
        for item in self.db.iterator_cf(self.cf(CF_TOMBSTONES), IteratorMode::Start) {
            let (k, v) = item?;
            let expires = v.get(..8).map_or(0, |e| u64::from_le_bytes(e.try_into().unwrap()));
            if expires < now_ms {
                b.delete_cf(self.cf(CF_TOMBSTONES), k);
                n += 1;
            }
        }
        if n > 0 {
            self.sync_write(b)?;
        }
        Ok(n)
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
        for cf in [CF_HEADERS, CF_INDEX, CF_QUOTA, CF_STATE, CF_TOMBSTONES] {
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
            len: u16,
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
            4 => (0..6u8, 0..3000u16, any::<u8>(), 0..3u8)
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
                        let data = vec![fill; usize::from(len)];
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
                    .sum();
                let quarantined: u64 = fs::read_dir(&store.quarantine_dir)
                    .unwrap()
                    .flatten()
                    .map(|f| f.metadata().unwrap().len())
                    .sum();
                prop_assert_eq!(store.indexed_bytes(), indexed, "after {:?}", op);
                prop_assert_eq!(on_disk, indexed, "payload files after {:?}", op);
                prop_assert_eq!(store.quarantined_bytes(), quarantined, "after {:?}", op);
                prop_assert_eq!(store.used_bytes(), indexed + quarantined);
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
        }
    }
}
