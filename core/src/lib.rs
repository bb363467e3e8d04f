//! Shardfarm core: everything that needs no I/O beyond what a codec needs.
//!
//! - [`identity`]: mined ed25519 identities (proof of work), key files, delegated ids;
//! - [`auth`]: signed request envelopes and the replay cache;
//! - [`shard`]: the signed segment header and Merkle trees over shards;
//! - [`codec`]: segments → AEAD → Reed-Solomon → shards, and back;
//! - [`cap`]: read capabilities (`sf2:…`, and the older `sf1:…`);
//! - [`capacity`]: signed proofs of capacity;
//! - [`audit`]: storage audits (Merkle leaves chosen by a nonce);
//! - [`placement`]: the layout engine (partitions → nodes across failure domains);
//! - [`tombstone`]: an uploader's signed deletion of an object.

#![warn(missing_docs)]

pub mod audit;
pub mod auth;
pub mod cap;
pub mod capacity;
pub mod codec;
pub mod grant;
pub mod identity;
pub mod limit;
pub mod placement;
pub mod shard;
pub mod tombstone;

use std::path::{Path, PathBuf};

/// Errors of the core crate (auth failures have their own enum, [`auth::AuthError`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bytes that do not parse, or parameters out of range.
    #[error("{0}")]
    Malformed(String),
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key file is readable by others.
    #[error(
        "key file {path} has mode {mode:04o}: it must be readable by its owner only; \
         run `chmod 600 {path}`"
    )]
    KeyFilePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The header's object id does not derive from its uploader's key and salt.
    #[error(
        "segment header's object id does not derive from its uploader's key: only the \
         uploader an object id commits to can sign its headers"
    )]
    ForgedObjectId,
    /// The segment header's signature does not verify.
    #[error("segment header signature does not verify for its uploader key")]
    HeaderSignature,
    /// A shard does not match its signed root.
    #[error("shard {index} is corrupt: {reason}")]
    ShardCorrupt {
        /// Shard index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Too few good shards to decode.
    #[error("not enough shards: have {have}, need {need}{}", fmt_failures(.failures))]
    NotEnoughShards {
        /// Good shards.
        have: usize,
        /// Shards needed (k).
        need: usize,
        /// Why the others were rejected.
        failures: Vec<String>,
    },
    /// The AEAD tag did not verify: wrong key or tampered ciphertext.
    #[error("segment {segment} failed to decrypt: wrong key or tampered data")]
    Decrypt {
        /// Segment index.
        segment: u32,
    },
    /// A malformed read capability.
    #[error("invalid read capability: {0}")]
    Cap(String),
}

fn fmt_failures(f: &[String]) -> String {
    if f.is_empty() { String::new() } else { format!(" ({})", f.join("; ")) }
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }
}

/// Bytes for people: `512 B`, `1.5 GiB` (binary units, one decimal).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Result with the core error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
