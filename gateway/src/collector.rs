//! The collector: deletes data no log entry references.
//!
//! Every piece of data is announced by an intent in the index before it is written (or
//! deleted; see `namespace`). A crash between a data write and its log entry, a commit that
//! failed, a deletion the pool did not answer: each leaves an intent behind. A pass looks at
//! every intent older than the grace period and not being written right now: if the piece is
//! referenced where it was meant to be (the entry did land), the intent is dropped; otherwise
//! the piece is deleted with its owner's identity, and the intent dropped once that worked (a
//! failed deletion is tried again on the next pass).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use shardfarm_client::PoolClient;
use shardfarm_core::cap::ReadCap;

use crate::namespace::Index;
use crate::service::InFlight;

/// How often the collector runs (the grace period is what bounds how old a piece must be
/// before it is deleted; this only bounds how long after that it is).
pub const COLLECT_INTERVAL: Duration = Duration::from_secs(600);

/// How long an unreferenced piece is left alone by default: longer than any write takes
/// (5 GiB at a slow client) and any commit waits, so only what a crash or a failure left is
/// ever deleted. Writes in progress are never touched, whatever their age.
pub const COLLECT_GRACE: Duration = Duration::from_secs(3600);

/// What one pass did.
#[derive(Debug, Default, PartialEq)]
pub struct Collected {
    /// Pieces deleted (nothing referenced them).
    pub deleted: usize,
    /// Intents dropped because their piece is referenced.
    pub referenced: usize,
    /// Intents left for a later pass (younger than the grace period, being written, or their
    /// deletion failed).
    pub left: usize,
}

/// One pass over the intents at `now_ms`: `delete(owner, cap)` deletes a piece.
pub async fn pass<F, Fut>(
    index: &Index,
    writing: &InFlight,
    grace: Duration,
    now_ms: u64,
    delete: F,
) -> anyhow::Result<Collected>
where
    F: Fn(String, String) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut out = Collected::default();
    for (cap, intent) in index.intents()? {
        let young = intent.created_ms.saturating_add(grace.as_millis() as u64) > now_ms;
        if young || writing.lock().unwrap().contains(&cap) {
            out.left += 1;
            continue;
        }
        if let Some(at) = &intent.at
            && index.references(&cap, at)?
        {
            index.drop_intent(&cap)?;
            out.referenced += 1;
            continue;
        }
        match delete(intent.owner.clone(), cap.clone()).await {
            Ok(()) => {
                index.drop_intent(&cap)?;
                out.deleted += 1;
            }
            Err(e) => {
                tracing::warn!(owner = intent.owner, error = %format!("{e:#}"), "could not delete unreferenced data");
                out.left += 1;
            }
        }
    }
    Ok(out)
}

/// Runs a pass every [`COLLECT_INTERVAL`], deleting with the identity of each piece's owner.
pub(crate) fn start(
    index: Arc<Index>,
    writing: InFlight,
    clients: HashMap<String, Arc<PoolClient>>,
    grace: Duration,
) {
    let clients = Arc::new(clients);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(COLLECT_INTERVAL);
        loop {
            every.tick().await;
            let delete = |owner: String, cap: String| {
                let clients = clients.clone();
                async move {
                    let client = clients
                        .get(&owner)
                        .ok_or_else(|| anyhow::anyhow!("{owner} is no longer in the users file"))?;
                    client.rm(&cap.parse::<ReadCap>()?).await.map(|_| ())
                }
            };
            let now = shardfarm_core::auth::now_ms();
            match pass(&index, &writing, grace, now, delete).await {
                Ok(c) if c.deleted + c.referenced > 0 => {
                    tracing::info!(
                        deleted = c.deleted,
                        referenced = c.referenced,
                        left = c.left,
                        "collector pass"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "collector pass failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::namespace::{
        BucketRecord, HttpHeaders, Intent, ObjectRecord, Op, PartRecord, Piece, Target,
        UploadRecord,
    };
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    fn piece(cap: &str) -> Piece {
        Piece { cap: cap.into(), size: 1, segment_size: 1 }
    }

    fn at(key: &str, part: Option<i32>) -> Option<Target> {
        Some(Target { bucket: "b".into(), key: key.into(), part: part.map(|n| ("u1".into(), n)) })
    }

    /// Data written whose log entry never came (a crash in between), a deletion that failed,
    /// data that is referenced, data too young, data being written: only the unreferenced
    /// pieces past the grace period are deleted, and a failed deletion is tried again.
    #[tokio::test]
    async fn only_unreferenced_data_past_the_grace_period_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path()).unwrap();
        let object = ObjectRecord {
            pieces: vec![piece("sf2:in-object")],
            size: 1,
            etag: "e".into(),
            content_type: None,
            metadata: BTreeMap::new(),
            modified_ms: 1,
            owner: "ALICE".into(),
            headers: HttpHeaders::default(),
        };
        let upload = UploadRecord {
            bucket: "b".into(),
            key: "big".into(),
            owner: "ALICE".into(),
            created_ms: 1,
            content_type: None,
            metadata: BTreeMap::new(),
            headers: HttpHeaders::default(),
        };
        let part = PartRecord { piece: piece("sf2:in-part"), md5: "00".into(), modified_ms: 1 };
        index
            .apply_for_tests(&[
                Op::CreateBucket {
                    bucket: "b".into(),
                    record: BucketRecord { owner: "ALICE".into(), created_ms: 1 },
                },
                Op::PutObject { bucket: "b".into(), key: "k".into(), record: object, upload: None },
                Op::CreateUpload { id: "u1".into(), upload },
                Op::PutPart { id: "u1".into(), number: 1, part },
            ])
            .unwrap();
        let grace = Duration::from_secs(3600);
        let now = 10 * 3600 * 1000;
        let old = now - 2 * 3600 * 1000;
        let intent = |created_ms, at| Intent { owner: "ALICE".into(), created_ms, at };
        let intents = [
            // Referenced: its entry landed, the intent was not dropped (a crash after it).
            ("sf2:in-object", intent(old, at("k", None))),
            ("sf2:in-part", intent(old, at("big", Some(1)))),
            // Written, then the gateway died before its entry: nothing references it.
            ("sf2:orphan", intent(old, at("k", None))),
            ("sf2:orphan-part", intent(old, at("big", Some(2)))),
            // A deletion the pool did not answer.
            ("sf2:replaced", intent(old, None)),
            // Too young, and being written.
            ("sf2:young", intent(now - 1000, at("k", None))),
            ("sf2:writing", intent(old, at("k", None))),
            // Its deletion fails (the pool does not answer): tried again next time.
            ("sf2:unlucky", intent(old, at("k", None))),
        ];
        for (cap, i) in &intents {
            index.add_intent(cap, i).unwrap();
        }
        let writing: InFlight = Arc::new(Mutex::new(["sf2:writing".to_string()].into()));
        let deleted = Arc::new(Mutex::new(Vec::new()));
        let delete = |owner: String, cap: String| {
            let deleted = deleted.clone();
            async move {
                assert_eq!(owner, "ALICE");
                if cap == "sf2:unlucky" {
                    anyhow::bail!("the pool did not answer");
                }
                deleted.lock().unwrap().push(cap);
                Ok(())
            }
        };
        let c = pass(&index, &writing, grace, now, &delete).await.unwrap();
        assert_eq!(c, Collected { deleted: 3, referenced: 2, left: 3 });
        let mut gone = deleted.lock().unwrap().clone();
        gone.sort();
        assert_eq!(gone, ["sf2:orphan", "sf2:orphan-part", "sf2:replaced"]);
        let mut left: Vec<String> = index.intents().unwrap().into_iter().map(|(c, _)| c).collect();
        left.sort();
        assert_eq!(left, ["sf2:unlucky", "sf2:writing", "sf2:young"]);

        // Later: the write finished and the young piece grew old, unreferenced; the pool
        // answers again.
        writing.lock().unwrap().clear();
        let later = now + 2 * 3600 * 1000;
        let delete_all = |_: String, cap: String| {
            let deleted = deleted.clone();
            async move {
                deleted.lock().unwrap().push(cap);
                Ok(())
            }
        };
        let c = pass(&index, &writing, grace, later, delete_all).await.unwrap();
        assert_eq!(c, Collected { deleted: 3, referenced: 0, left: 0 });
        assert!(index.intents().unwrap().is_empty());
        // What is referenced was never deleted.
        assert!(!deleted.lock().unwrap().iter().any(|c| c.starts_with("sf2:in-")));
    }
}
