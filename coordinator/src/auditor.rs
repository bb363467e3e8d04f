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

use futures::FutureExt as _;
use shardfarm_core::audit::{ProvenLeaf, verify_answer};
use shardfarm_core::identity::NodeId;
use shardfarm_core::shard::{SegmentHeader, ShardId};
use shardfarm_proto::{AgentClient, Signer};
use tonic::Code;

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
/// Start of the skip reason for an empty partition.
const EMPTY: &str = "peers hold nothing in partition";

pub(super) struct Auditor {
    c: Arc<Coordinator>,
    signer: Arc<Signer>,
    /// Per node: the layout version and time of its last failed sync check (each failure is a
    /// failed audit; the node is checked again after an audit interval).
    sync_failed: std::sync::Mutex<std::collections::HashMap<NodeId, (u64, std::time::Instant)>>,
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("OS randomness");
    u64::from_le_bytes(b)
}

enum Outcome {
    Pass,
    Fail(String),
    Skip(String),
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
                    let mut outcome = Outcome::Skip("holds no slots".into());
                    for _ in 0..TRIES.min(slots.len()) {
                        let (p, s) = slots[(random_u64() % slots.len() as u64) as usize];
                        let peers: Vec<NodeId> = published.layout.partitions[p as usize]
                            .iter()
                            .filter(|h| **h != m.id && up.contains(h))
                            .copied()
                            .collect();
                        outcome = self.audit(&published, m.id, p, s, &peers).await;
                        if !matches!(&outcome, Outcome::Skip(why) if why.starts_with(EMPTY)) {
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
                Outcome::Skip(why) => tracing::debug!(node = %node, reason = %why, "not audited"),
            }
        }
    }

    /// Checks every node that says it repaired for the current layout but was not checked:
    /// it must prove [`SYNC_SAMPLES`] segments of slots it gained (a slot whose continuing
    /// holders list nothing is nothing to copy). A node that failed is asked again after
    /// `retry`.
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
                .is_none_or(|&(v, at)| v != version || now.duration_since(at) >= retry)
        };
        let tasks = work.into_iter().filter(|(node, _)| due(node)).map(|(node, mut gained)| {
            let published = published.clone();
            let (up, previous) = (&up, previous.as_ref());
            async move {
                // Random order: the node cannot know which of its new slots will be asked.
                for i in (1..gained.len()).rev() {
                    gained.swap(i, (random_u64() % (i as u64 + 1)) as usize);
                }
                let (mut proven, mut undecided) = (0, false);
                for &(p, slot) in gained.iter().take(SYNC_TRIES) {
                    // Who lists the partition's segments: the other holders that are up, those
                    // that kept it from the fallback (the data's sources) first.
                    let holders = &published.layout.partitions[p as usize];
                    let kept =
                        |h: &NodeId| previous.is_none_or(|l| l.partitions[p as usize].contains(h));
                    let mut peers: Vec<NodeId> =
                        holders.iter().filter(|h| **h != node && up.contains(h)).copied().collect();
                    peers.sort_by_key(|h| !kept(h));
                    match self.audit(&published, node, p, slot, &peers).await {
                        Outcome::Pass => proven += 1,
                        Outcome::Fail(why) => return Some(Err(why)),
                        Outcome::Skip(why) if why.starts_with(EMPTY) => {}
                        Outcome::Skip(_) => undecided = true,
                    }
                    if proven == SYNC_SAMPLES {
                        break;
                    }
                }
                // Something could not be checked (a peer or the node did not answer) before
                // enough was proven: ask again later (other slots, in another order) rather
                // than let a node pass by not answering what it cannot prove.
                if undecided && proven < SYNC_SAMPLES { None } else { Some(Ok(proven)) }
            }
            .map(move |r| (node, r))
        });
        for (node, result) in futures::future::join_all(tasks).await {
            match result {
                Some(Ok(proven)) => {
                    tracing::info!(node = %node, version, proven, "sync checked");
                    self.c.record_sync_check(&node, version, true);
                }
                Some(Err(why)) => {
                    self.sync_failed
                        .lock()
                        .unwrap()
                        .insert(node, (version, std::time::Instant::now()));
                    tracing::warn!(node = %node, version, reason = %why, "said it was in sync and is not");
                    self.c.record_sync_check(&node, version, false);
                }
                None => {}
            }
        }
    }

    async fn audit(
        &self,
        published: &shardfarm_proto::PublishedLayout,
        node: NodeId,
        p: u32,
        slot: usize,
        peers: &[NodeId],
    ) -> Outcome {
        // Segments listed by the first two peers that answer (one when n = 2).
        let mut listed: Option<BTreeSet<([u8; 32], u32)>> = None;
        let mut answered = 0;
        for peer in peers.iter().take(4) {
            let Some(addr) = published.address(peer) else { continue };
            let Ok(mut c) = AgentClient::connect(addr, *peer, self.signer.clone()).await else {
                continue;
            };
            let Ok(entries) = c.list_shards(p, None, SAMPLE).await else { continue };
            let set: BTreeSet<([u8; 32], u32)> = entries
                .into_iter()
                .filter_map(|e| e.key)
                .filter_map(|k| Some((k.object_id[..].try_into().ok()?, k.segment_index)))
                .collect();
            listed = Some(match listed {
                None => set,
                Some(prev) => prev.intersection(&set).copied().collect(),
            });
            answered += 1;
            if answered == 2 {
                break;
            }
        }
        let Some(listed) = listed else { return Outcome::Skip("no peer answered".into()) };
        if listed.is_empty() {
            return Outcome::Skip(format!("{EMPTY} {p}"));
        }
        let pick = listed.iter().nth((random_u64() % listed.len() as u64) as usize).unwrap();
        let id = ShardId { object_id: pick.0, segment: pick.1, shard: slot as u32 };
        let Some(addr) = published.address(&node) else {
            return Outcome::Skip("no address".into());
        };
        let mut nonce = [0u8; 32];
        getrandom::fill(&mut nonce).expect("OS randomness");
        let mut client = match AgentClient::connect(addr, node, self.signer.clone()).await {
            Ok(c) => c,
            Err(e) => return Outcome::Skip(format!("unreachable: {e}")),
        };
        let resp = match client.audit(id, &nonce, LEAVES).await {
            Ok(r) => r,
            // A deleted object (the node keeps its uploader's tombstone) is not the node's
            // fault; peers that still list it are the ones to doubt.
            Err(s) if s.code() == Code::FailedPrecondition => {
                return Outcome::Skip(format!("shard {slot} of partition {p}: {}", s.message()));
            }
            Err(s) if matches!(s.code(), Code::NotFound | Code::DataLoss) => {
                return Outcome::Fail(format!("shard {slot} of partition {p}: {}", s.message()));
            }
            Err(s) => return Outcome::Skip(format!("audit call failed: {s}")),
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
