//! The layouts this node believes: only publications signed by the pinned pool key, never an
//! older or forked one, kept on disk so a restarted node (and a coordinator that lost its
//! state) finds the newest one again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use prost::Message;
use shardfarm_core::identity::NodeId;
use shardfarm_proto::pb as proto;
use shardfarm_proto::{LayoutGuard, LayoutRefusal, PublishedLayout};

use crate::metrics::Metrics;

/// File in the data dir holding the last accepted publication, as signed.
pub const LAYOUT_FILE: &str = "layout.signed";

/// The last layout publication this node accepted, and the guard every new one passes.
pub struct LayoutKeeper {
    path: PathBuf,
    metrics: Arc<Metrics>,
    inner: Mutex<(LayoutGuard, Option<Arc<PublishedLayout>>)>,
}

impl LayoutKeeper {
    /// Opens the keeper for pool `pool` in `data_dir`, taking in the publication saved there
    /// if it verifies (a file that does not is set aside, with a warning, and ignored).
    pub fn open(data_dir: &std::path::Path, pool: NodeId, metrics: Arc<Metrics>) -> Self {
        let path = data_dir.join(LAYOUT_FILE);
        let mut guard = LayoutGuard::new(pool);
        let mut last = None;
        if let Ok(bytes) = std::fs::read(&path) {
            let read = proto::SignedLayout::decode(&bytes[..])
                .map_err(|e| LayoutRefusal::Malformed(e.to_string()))
                .and_then(|s| guard.accept(&s));
            match read {
                Ok(l) => last = l.map(Arc::new),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "saved layout refused; setting it aside");
                    let _ = std::fs::rename(&path, path.with_extension("refused"));
                }
            }
        }
        LayoutKeeper { path, metrics, inner: Mutex::new((guard, last)) }
    }

    /// The last accepted publication.
    pub fn last(&self) -> Option<Arc<PublishedLayout>> {
        self.inner.lock().unwrap().1.clone()
    }

    /// Checks a publication from the network: the new layout (saved before it is returned),
    /// `Ok(None)` for the one already held, or the refusal, logged and counted.
    pub fn offer(
        &self,
        signed: &proto::SignedLayout,
        from: &str,
    ) -> Result<Option<Arc<PublishedLayout>>, LayoutRefusal> {
        let mut inner = self.inner.lock().unwrap();
        let mut guard = inner.0.clone();
        let accepted = guard.accept(signed).inspect_err(|e| {
            self.metrics.layouts_refused.with_label_values(&[e.metric_label()]).inc();
            tracing::warn!(from, reason = e.metric_label(), error = %e, "layout refused; keeping the last good one");
        })?;
        let Some(l) = accepted else { return Ok(None) };
        // Saved before it is acted on: a node that hands off under a layout must still know it
        // after a restart.
        if let Err(e) =
            shardfarm_core::identity::write_secret_file(&self.path, &signed.encode_to_vec())
        {
            tracing::error!(file = %self.path.display(), error = %e, "could not save the layout");
        }
        let l = Arc::new(l);
        *inner = (guard, Some(l.clone()));
        Ok(Some(l))
    }
}
