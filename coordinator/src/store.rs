//! Where the coordinator's durable state lives.
//!
//! The coordinator serialises its state (members, layouts, epoch) to one JSON document and
//! hands it to a [`StateStore`]; the store only keeps bytes. The first backend is a state dir
//! ([`DirStore`]: a file replaced atomically); a Kubernetes backend (the pool's objects) can
//! implement the same two calls.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A place that keeps the coordinator's state document.
pub trait StateStore: Send + Sync {
    /// The last document saved, or `None` before the first save.
    fn load(&self) -> Result<Option<Vec<u8>>>;
    /// Replaces the document; when this returns `Ok` the document survives a crash.
    fn save(&self, document: &[u8]) -> Result<()>;
    /// Where the state lives, for messages (`/var/lib/shardfarm/coordinator.json`).
    fn describe(&self) -> String;
}

/// The state as one file in a directory, written atomically (temp file, fsync, rename,
/// fsync of the directory).
pub struct DirStore {
    path: PathBuf,
}

impl DirStore {
    /// The store at `dir/file`.
    pub fn new(dir: &Path, file: &str) -> Self {
        DirStore { path: dir.join(file) }
    }
}

impl StateStore for DirStore {
    fn load(&self) -> Result<Option<Vec<u8>>> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&self.path, e)),
        }
    }

    fn save(&self, document: &[u8]) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(document).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
