//! The coordinator crate's one error type.

use std::path::{Path, PathBuf};

/// Errors of the coordinator crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The ledger does not verify.
    #[error("ledger: {0}")]
    Ledger(String),
    /// The coordinator's state file is unreadable.
    #[error("coordinator state: {0}")]
    State(String),
    /// The pool's configuration is unusable.
    #[error("pool configuration: {0}")]
    Config(String),
    /// No layout can be computed.
    #[error(transparent)]
    Placement(#[from] shardfarm_core::placement::PlacementError),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Ledger(_) => "ledger",
            Error::State(_) => "state",
            Error::Config(_) => "config",
            Error::Placement(_) => "placement",
        }
    }
}

/// Result with the coordinator error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
