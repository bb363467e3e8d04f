//! The scrub worker: re-hashes every stored shard at a bounded rate and quarantines corrupt
//! ones, so repair can rebuild them like lost ones.
//!
//! It walks the index in key order with a cursor persisted in the `state` column family, so a
//! restart resumes where it stopped instead of re-reading terabytes. A pass starts every
//! `interval` (counted from the start of the previous pass, also persisted). Reading is
//! throttled to `rate` bytes per second so scrubbing never competes with client traffic for
//! the disk.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::shard::{Error, Node};

const CURSOR: &str = "scrub_cursor";
const LAST_PASS: &str = "scrub_last_pass_ms";
/// Index entries fetched per step: small enough to persist progress often.
const BATCH: usize = 64;

/// Re-hashes stored shards on a schedule.
pub struct ScrubWorker {
    node: Arc<Node>,
    interval: Duration,
    rate: u64,
    stop: CancellationToken,
}

impl ScrubWorker {
    /// A worker over `node` that starts a pass every `interval`, reading `rate` bytes/s.
    pub fn new(node: Arc<Node>, interval: Duration, rate: u64, stop: CancellationToken) -> Self {
        ScrubWorker { node, interval, rate: rate.max(1), stop }
    }

    async fn state(&self, name: &'static str) -> Option<Vec<u8>> {
        let store = self.node.store.clone();
        tokio::task::spawn_blocking(move || store.get_state(name).ok().flatten())
            .await
            .ok()
            .flatten()
    }

    async fn set_state(&self, name: &'static str, value: Vec<u8>) {
        let store = self.node.store.clone();
        let r = tokio::task::spawn_blocking(move || store.put_state(name, &value)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "scrub could not save its progress");
        }
    }

    /// Runs until the stop token is cancelled.
    pub async fn run(self) {
        loop {
            let last = self
                .state(LAST_PASS)
                .await
                .and_then(|v| v.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            let due = last + self.interval.as_millis() as u64;
            let now = shardfarm_core::auth::now_ms();
            if due > now {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(due - now)) => {}
                }
            }
            let resuming = self.state(CURSOR).await;
            if resuming.is_none() {
                self.set_state(LAST_PASS, shardfarm_core::auth::now_ms().to_le_bytes().to_vec())
                    .await;
            }
            if !self.pass(resuming).await {
                return;
            }
        }
    }

    /// One pass from `cursor`; false when stopped.
    async fn pass(&self, mut cursor: Option<Vec<u8>>) -> bool {
        let (mut checked, mut corrupt) = (0u64, 0u64);
        loop {
            let store = self.node.store.clone();
            let after = cursor.clone();
            let batch = tokio::task::spawn_blocking(move || store.scan(None, after, BATCH)).await;
            let batch = match batch {
                Ok(Ok(b)) => b,
                other => {
                    tracing::warn!(?other, "scrub could not read the index; retrying later");
                    return !self.stop.is_cancelled();
                }
            };
            let Some((p, last, _)) = batch.last() else { break };
            let next = last.index_key(*p).to_vec();
            for (_, id, rec) in batch {
                if self.stop.is_cancelled() {
                    return false;
                }
                match self.node.verify_stored(id, "scrub").await {
                    Ok(()) => {}
                    Err(Error::DataLoss(_)) => corrupt += 1,
                    Err(Error::NotFound(_)) => {} // deleted meanwhile
                    Err(e) => tracing::warn!(error = %e, "scrub could not check a shard"),
                }
                checked += 1;
                self.node.metrics.scrub_checked.inc();
                let pause = Duration::from_secs_f64(rec.length as f64 / self.rate as f64);
                tokio::select! {
                    _ = self.stop.cancelled() => return false,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            cursor = Some(next.clone());
            self.set_state(CURSOR, next).await;
        }
        // Pass complete: clear the cursor so the next pass starts from the beginning.
        let store = self.node.store.clone();
        let _ = tokio::task::spawn_blocking(move || store.delete_state(CURSOR)).await;
        tracing::info!(checked, corrupt, "scrub pass complete");
        true
    }
}
