//! The auditor: proof of storage, node by node.
//!
//! Each round, for every node that is up and not disqualified and has repaired for the
//! current layout, it picks one (partition, slot) the node holds, asks two *other* holders of
//! that partition what they hold there, and picks a segment that both list: the node must
//! then hold its shard of it (a single peer cannot frame a node by listing segments that do
//! not exist). It sends a fresh nonce; the node answers with the Merkle leaves the nonce
//! chooses and their proofs, checked against the root in the uploader-signed header.
//! Missing or wrong is a failed audit; an unreachable node is not audited (uptime covers it).
//!
//! The same proof checks sync (`verify_sync`): a node that reports it has repaired for the
//! current layout is asked for up to [`SYNC_SAMPLES`] segments of the slots it *gained*, chosen
//! from what the partition's continuing holders list. Only when it proves them does its report
//! count, so a node cannot end the readers' fallback layout early by saying it is done.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt as _;
use shardfarm_core::audit::{ProvenLeaf, verify_answer};
use shardfarm_core::identity::NodeId;
use shardfarm_core::shard::{SegmentHeader, ShardId};
use shardfarm_proto::{AgentClient, Signer};
use tonic::{Code, Status};

use super::Coordinator;
use crate::economics::Standing;

/// Leaves proven per audit: 4 × 64 KiB read, a fraction of a ms to check.
const LEAVES: u32 = 4;
/// Entries asked of each peer when choosing a segment.
const SAMPLE: u32 = 64;
/// Slots tried per node and round when the first ones hold nothing.
const TRIES: usize = 16;
/// Gained slots whose segments a sync check proves: a node missing a fraction `f` of what
/// it gained passes with probability about `(1 − f)^3`, and is checked again by every audit.
const SYNC_SAMPLES: usize = 3;
/// Gained slots a sync check looks at to find [`SYNC_SAMPLES`] that hold data (most
/// partitions of a young pool are empty; each look is one or two listings, once per node and
/// layout).
const SYNC_TRIES: usize = 256;
/// Peers asked to list a partition before choosing a segment.
const LISTERS: usize = 3;
/// Each call of an audit (connect and list, connect and prove) must end within this: a
/// stalled node or peer costs the auditor no more.
const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// Nodes whose sync is checked at once.
const SYNC_CONCURRENCY: usize = 16;
/// Sync checks a node that claims sync may leave unanswered before that counts as a failed
/// audit (it holds the readers' fallback in place meanwhile).
const SILENT_STRIKES: u32 = 3;

/// A node's failed or unanswered sync checks for one layout version.
struct SyncStrikes {
    version: u64,
    at: std::time::Instant,
    silent: u32,
}

/// `f`, or None if it takes longer than [`CALL_DEADLINE`].
async fn deadline<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(CALL_DEADLINE, f).await.ok()
}

pub(super) struct Auditor {
    c: Arc<Coordinator>,
    signer: Arc<Signer>,
    /// Per node: the layout version and time of its last failed sync check (each failure is a
    /// failed audit; the node is checked again after an audit interval).
    sync_failed: std::sync::Mutex<std::collections::HashMap<NodeId, SyncStrikes>>,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("OS randomness");
    u64::from_le_bytes(b)
}

enum Outcome {
    /// The node proved the leaves.
    Pass,
    /// The node did not hold what it was asked for, or answered wrong.
    Fail(String),
    /// The partition's holders list nothing there: nothing to audit.
    Empty,
    /// Nothing could be decided; `node` says whether the audited node is the one that did not
    /// answer (its peers did).
    Undecided { node: bool, why: String },
}

impl Outcome {
    fn undecided(node: bool, why: impl Into<String>) -> Self {
        Outcome::Undecided { node, why: why.into() }
    }
}

/// What one sync check concluded.
enum SyncVerdict {
    /// Proved what it was asked (or gained only empty partitions).
    Proven(usize),
    /// Failed a proof.
    Failed(String),
    /// Did not answer.
    Silent(String),
    /// Its peers could not be asked, or disagree.
    Undecided(String),
}

impl Auditor {
    pub fn new(c: Arc<Coordinator>) -> Self {
        let signer = Arc::new(Signer::identity(c.identity()).with_security(c.config().security));
        Auditor { c, signer, sync_failed: Default::default() }
    }

    /// Audits every eligible node once.
    pub async fn round(&self) {
        let Some(published) = self.c.layout() else { return };
        let layout = &published.layout;
        let members = self.c.members();
        let up: BTreeSet<NodeId> = members.iter().filter(|m| m.up).map(|m| m.id).collect();
        let tasks = members
            .iter()
            .filter(|m| m.up && m.standing != Standing::Disqualified)
            .filter(|m| m.in_sync(layout.version))
            .map(|m| {
                let slots = layout.slots_of(&m.id);
                let published = published.clone();
                let up = &up;
                async move {
                    // Most partitions of a young pool hold nothing yet: try a few slots until
                    // one has a segment to audit.
                    let mut outcome = Outcome::Empty;
                    for _ in 0..TRIES.min(slots.len()) {
                        let (p, s) = slots[(random_u64() % slots.len() as u64) as usize];
                        let peers: Vec<NodeId> = published.layout.partitions[p as usize]
                            .iter()
                            .filter(|h| **h != m.id && up.contains(h))
                            .copied()
                            .collect();
                        outcome = self.audit(&published, m.id, p, s, &peers).await;
                        if !matches!(outcome, Outcome::Empty) {
                            break;
                        }
                    }
                    (m.id, outcome)
                }
            });
        for (node, outcome) in futures::future::join_all(tasks).await {
            match outcome {
                Outcome::Pass => self.c.record_audit(&node, true),
                Outcome::Fail(why) => {
                    tracing::warn!(node = %node, reason = %why, "audit failed");
                    self.c.record_audit(&node, false);
                }
                Outcome::Empty => {
                    tracing::debug!(node = %node, "not audited: its partitions hold nothing")
                }
                Outcome::Undecided { why, .. } => {
                    tracing::debug!(node = %node, reason = %why, "not audited")
                }
            }
        }
    }

    /// Checks every node that says it repaired for the current layout but was not checked:
    /// it must prove [`SYNC_SAMPLES`] segments of slots it gained (a slot whose holders, old
    /// and new, list nothing is nothing to copy). A node that fails, or stays silent
    /// [`SILENT_STRIKES`] times, has failed an audit; any node not proven is asked again after
    /// `retry`. At most [`SYNC_CONCURRENCY`] nodes are checked at once, each call under
    /// [`CALL_DEADLINE`].
    pub async fn verify_sync(&self, retry: std::time::Duration) {
        let crate::SyncWork { version, previous, nodes: work } = self.c.sync_work();
        let Some(published) = self.c.layout() else { return };
        if work.is_empty() || published.layout.version != version {
            return;
        }
        let up: BTreeSet<NodeId> = self.c.members().iter().filter(|m| m.up).map(|m| m.id).collect();
        let now = std::time::Instant::now();
        let due = |node: &NodeId| {
            self.sync_failed
                .lock()
                .unwrap()
                .get(node)
                .is_none_or(|s| s.version != version || now.duration_since(s.at) >= retry)
        };
        let checks = work.into_iter().filter(|(node, _)| due(node)).map(|(node, gained)| {
            let (published, up, previous) = (published.clone(), &up, previous.as_ref());
            async move { (node, self.check_sync(&published, previous, up, node, gained).await) }
        });
        let results: Vec<_> =
            futures::stream::iter(checks).buffer_unordered(SYNC_CONCURRENCY).collect().await;
        for (node, verdict) in results {
            let mut strikes = self.sync_failed.lock().unwrap();
            let entry = strikes.entry(node).or_insert(SyncStrikes { version, at: now, silent: 0 });
            if entry.version != version {
                *entry = SyncStrikes { version, at: now, silent: 0 };
            }
            entry.at = std::time::Instant::now();
            match verdict {
                SyncVerdict::Proven(proven) => {
                    strikes.remove(&node);
                    drop(strikes);
                    tracing::info!(node = %node, version, proven, "sync checked");
                    self.c.record_sync_check(&node, version, true);
                }
                SyncVerdict::Failed(why) => {
                    drop(strikes);
                    tracing::warn!(node = %node, version, reason = %why, "said it was in sync and is not");
                    self.c.record_sync_check(&node, version, false);
                }
                SyncVerdict::Silent(why) => {
                    entry.silent += 1;
                    let out = entry.silent >= SILENT_STRIKES;
                    if out {
                        entry.silent = 0;
                    }
                    drop(strikes);
                    tracing::warn!(node = %node, version, reason = %why, "said it was in sync and does not answer");
                    if out {
                        self.c.record_sync_check(&node, version, false);
                    }
                }
                SyncVerdict::Undecided(why) => {
                    tracing::debug!(node = %node, version, reason = %why, "sync not checked yet");
                }
            }
        }
        // Forget nodes that left.
        let members: BTreeSet<NodeId> = self.c.members().iter().map(|m| m.id).collect();
        self.sync_failed.lock().unwrap().retain(|n, _| members.contains(n));
    }

    /// Asks `node` for segments of the slots it `gained` in `published`.
    async fn check_sync(
        &self,
        published: &shardfarm_proto::PublishedLayout,
        previous: Option<&shardfarm_core::placement::Layout>,
        up: &BTreeSet<NodeId>,
        node: NodeId,
        mut gained: Vec<(u32, usize)>,
    ) -> SyncVerdict {
        // Random order: the node cannot know which of its new slots will be asked.
        for i in (1..gained.len()).rev() {
            gained.swap(i, (random_u64() % (i as u64 + 1)) as usize);
        }
        let (mut proven, mut undecided) = (0, None);
        for &(p, slot) in gained.iter().take(SYNC_TRIES) {
            // Who lists the partition: the holders that kept it (the data's sources), then
            // the other current holders, then the fallback's (which held it until now).
            let current = &published.layout.partitions[p as usize];
            let before = previous.map_or(&[][..], |l| &l.partitions[p as usize][..]);
            let mut peers: Vec<NodeId> = current
                .iter()
                .chain(before)
                .filter(|h| **h != node && up.contains(h))
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            peers.sort_by_key(|h| (!current.contains(h), !before.contains(h)));
            match self.audit(published, node, p, slot, &peers).await {
                Outcome::Pass => proven += 1,
                Outcome::Fail(why) => return SyncVerdict::Failed(why),
                Outcome::Empty => {}
                Outcome::Undecided { node: true, why } => return SyncVerdict::Silent(why),
                Outcome::Undecided { node: false, why } => undecided = Some(why),
            }
            if proven == SYNC_SAMPLES {
                break;
            }
        }
        // Something could not be checked before enough was proven: ask again later (other
        // slots, in another order) rather than pass it.
        match undecided {
            Some(why) if proven < SYNC_SAMPLES => SyncVerdict::Undecided(why),
            _ => SyncVerdict::Proven(proven),
        }
    }

    /// Audits `node` on one segment of partition `p` (its shard `slot`), choosing the segment
    /// from what the first [`LISTERS`] of `peers` that answer list: one that at least two of
    /// them list (one peer alone cannot frame the node), or what the only one lists. The
    /// partition is empty only if every one that answered lists nothing.
    async fn audit(
        &self,
        published: &shardfarm_proto::PublishedLayout,
        node: NodeId,
        p: u32,
        slot: usize,
        peers: &[NodeId],
    ) -> Outcome {
        let mut counts: std::collections::BTreeMap<([u8; 32], u32), usize> = Default::default();
        let mut answered = 0;
        for peer in peers.iter().take(2 * LISTERS) {
            let Some(addr) = published.address(peer) else { continue };
            let listing = deadline(async {
                let mut c = AgentClient::connect(addr, *peer, self.signer.clone()).await.ok()?;
                c.list_shards(p, None, SAMPLE).await.ok()
            })
            .await
            .flatten();
            let Some(entries) = listing else { continue };
            let set: BTreeSet<([u8; 32], u32)> = entries
                .into_iter()
                .filter_map(|e| e.key)
                .filter_map(|k| Some((k.object_id[..].try_into().ok()?, k.segment_index)))
                .collect();
            for key in set {
                *counts.entry(key).or_default() += 1;
            }
            answered += 1;
            if answered == LISTERS {
                break;
            }
        }
        if answered == 0 {
            return Outcome::undecided(false, "no peer answered");
        }
        if counts.is_empty() {
            return Outcome::Empty;
        }
        let need = if answered == 1 { 1 } else { 2 };
        let listed: Vec<_> = counts.iter().filter(|(_, n)| **n >= need).map(|(k, _)| *k).collect();
        if listed.is_empty() {
            return Outcome::undecided(
                false,
                format!("the holders of partition {p} disagree on what it holds"),
            );
        }
        let pick = listed[(random_u64() % listed.len() as u64) as usize];
        let id = ShardId { object_id: pick.0, segment: pick.1, shard: slot as u32 };
        let Some(addr) = published.address(&node) else {
            return Outcome::undecided(true, "no address");
        };
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).expect("OS randomness");
        let answer = deadline(async {
            let mut client = AgentClient::connect(addr, node, self.signer.clone())
                .await
                .map_err(|e| Status::unavailable(format!("unreachable: {e}")))?;
            client.audit(id, &nonce, LEAVES).await
        })
        .await;
        let resp = match answer {
            None => return Outcome::undecided(true, format!("no answer within {CALL_DEADLINE:?}")),
            Some(Ok(r)) => r,
            // A deleted object (the node keeps its uploader's tombstone) is not the node's
            // fault; peers that still list it are the ones to doubt.
            Some(Err(s)) if s.code() == Code::FailedPrecondition => {
                return Outcome::undecided(
                    false,
                    format!("shard {slot} of partition {p}: {}", s.message()),
                );
            }
            Some(Err(s)) if matches!(s.code(), Code::NotFound | Code::DataLoss) => {
                return Outcome::Fail(format!("shard {slot} of partition {p}: {}", s.message()));
            }
            Some(Err(s)) => return Outcome::undecided(true, format!("audit call failed: {s}")),
        };
        let header = match SegmentHeader::decode(&resp.segment_header) {
            Ok(h) if h.object_id == id.object_id && h.segment_index == id.segment => h,
            Ok(_) => return Outcome::Fail("answered with another segment's header".into()),
            Err(e) => return Outcome::Fail(format!("header does not verify: {e}")),
        };
        let leaves: Vec<ProvenLeaf> = resp.leaves.into_iter().map(ProvenLeaf::from).collect();
        match verify_answer(&header, slot, &nonce, LEAVES, &leaves) {
            Ok(()) => Outcome::Pass,
            Err(e) => Outcome::Fail(e.to_string()),
        }
    }
}
