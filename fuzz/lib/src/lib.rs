//! The fuzz targets of the decoders that take bytes from the network or disk ([`targets`]),
//! what they share (a byte cursor that never fails, the fixed keys the targets re-sign with, an
//! in-memory [`StateStore`]), and the seed inputs ([`seeds`]) that `examples/seeds.rs` writes to
//! `fuzz/corpus/<target>/`.
//!
//! A member of the main workspace with no fuzzing dependency: libFuzzer only comes in with the
//! thin binaries of `fuzz/` (cargo-fuzz, its own workspace), so the test command replays the
//! committed corpus in the one ordinary build (`tests/corpus.rs`).
//!
//! Most decoders here check a signature or a hash before anything else, which a fuzzer cannot
//! forge. So besides feeding raw bytes, several targets have a second, "re-signing" mode: the
//! input is read as the fields of a message, the target signs them with a fixed key, and then
//! checks that the decoder accepts exactly what it should (every byte the structure allows, a
//! round trip to the same bytes, no value that a later step cannot handle). The first input
//! byte picks the mode; the layouts are documented on each target.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use shardfarm_coordinator::PoolConfig;
use shardfarm_coordinator::store::StateStore;
use shardfarm_core::identity::Identity;

pub mod seeds;
pub mod targets;

// ---- Public interface ----

/// Reads fields off fuzz bytes; past the end every read yields zeros, so any input maps to a
/// message and the fuzzer never wastes runs on "too short".
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    /// A cursor over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data }
    }

    /// The next `n` bytes (fewer at the end).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// The next `N` bytes, zero-padded at the end.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.take(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// Little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// Little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A string of at most `max` bytes: a length byte, then that many bytes, lossily UTF-8.
    pub fn string(&mut self, max: usize) -> String {
        let n = usize::from(self.u8()) % (max + 1);
        String::from_utf8_lossy(self.take(n)).into_owned()
    }

    /// True when every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}

/// A fixed ed25519 key, `[n; 32]` as its secret: fuzz targets and seeds must be reproducible.
pub fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// The key the re-signing modes sign with.
pub fn fuzz_key() -> SigningKey {
    key(0x5f)
}

/// The coordinator's identity in the `coordinator_state` and `ledger` targets: ledger lines in
/// the corpus are signed by it.
pub fn coordinator_identity() -> Identity {
    Identity::from_parts(key(0xc0), 0)
}

/// An identity mined to `difficulty` bits on one thread, so always the same nonce.
pub fn mined(seed: u8, difficulty: u8) -> Identity {
    let k = key(seed);
    let report = shardfarm_core::identity::mine(&k.verifying_key(), difficulty, 1, &|_| {})
        .expect("difficulty within bounds");
    Identity::from_parts(k, report.nonce)
}

/// The pool the `coordinator_state` target opens its state with: small, so a relayout costs
/// little, and nothing a join would have to mine for.
pub fn pool_config() -> PoolConfig {
    PoolConfig {
        pool: "fuzz".into(),
        k: 2,
        m: 1,
        partitions: 16,
        min_difficulty: 0,
        capacity_difficulty: 0,
        ..PoolConfig::default()
    }
}

/// A ledger path that can never be opened for writing (a file below `/dev/null`): the
/// coordinator target must not write to disk, and an epoch it closes fails to append.
pub const NO_LEDGER: &str = "/dev/null/shardfarm-fuzz-ledger.jsonl";

/// A scratch file for the `ledger` target, private to this process (in `/dev/shm` where it
/// exists: the ledger fsyncs every append).
pub fn scratch_file(name: &str) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    dir.join(format!("shardfarm-fuzz-{}-{name}", std::process::id()))
}

/// A [`StateStore`] in memory; clones share the document.
#[derive(Clone, Default)]
pub struct MemStore {
    doc: Arc<Mutex<Option<Vec<u8>>>>,
}

impl MemStore {
    /// A store that holds `doc`.
    pub fn holding(doc: &[u8]) -> Self {
        MemStore { doc: Arc::new(Mutex::new(Some(doc.to_vec()))) }
    }

    /// The document last saved.
    pub fn document(&self) -> Option<Vec<u8>> {
        self.doc.lock().unwrap().clone()
    }
}

impl StateStore for MemStore {
    fn load(&self) -> shardfarm_coordinator::Result<Option<Vec<u8>>> {
        Ok(self.document())
    }

    fn save(&self, document: &[u8]) -> shardfarm_coordinator::Result<()> {
        *self.doc.lock().unwrap() = Some(document.to_vec());
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}
