//! The coordinator's protocol as agents and clients use it: a signing client, the layout as
//! published ([`PublishedLayout`], converted from and to its proto form here only), and the
//! pool's signature over every publication ([`PublishedLayout::sign`], [`LayoutGuard`]).
//!
//! A layout maps every slot to a node and an address: whoever can make a node believe a
//! layout can make it hand its shards off and delete them. So the coordinator signs each
//! publication with the pool key (its mined identity, whose id every party pins), and a
//! receiver only believes a publication that is signed by that key, is not older than the
//! last one it accepted, and does not fork it (same sequence, other bytes).

use std::collections::BTreeMap;
use std::sync::Arc;

use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use prost::Message;
use shardfarm_core::identity::{Identity, NodeId, blake2b256};
use shardfarm_core::placement::Layout;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

use crate::client::Signer;
use crate::envelope::methods;
use crate::pb as proto;
use crate::pb::coordinator_client::CoordinatorClient as Raw;

/// A layout with the addresses of its nodes and the previous layout readers fall back to.
#[derive(Clone, Debug, PartialEq)]
pub struct PublishedLayout {
    /// The current layout.
    pub layout: Layout,
    /// The newest layout that was in sync, while the current one is not yet.
    pub previous: Option<Layout>,
    /// gRPC address of every node in either layout.
    pub addresses: BTreeMap<NodeId, String>,
    /// The publication's sequence number (0 until signed).
    pub sequence: u64,
    /// The signed publication as it travels, once signed or received.
    pub signed: Option<Arc<proto::SignedLayout>>,
    /// The pool's settings, signed with the layout (None from a coordinator that predates
    /// them: ask its GetPool).
    pub pool: Option<proto::PoolInfo>,
}

/// How long one call to the coordinator may take before it fails with DeadlineExceeded.
pub const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Domain separation of the pool's signature over a layout publication.
const LAYOUT_DOMAIN: &[u8] = b"shardfarm-layout-v1";

impl PublishedLayout {
    /// An unsigned publication of `layout` (sign it before it leaves the coordinator).
    pub fn new(
        layout: Layout,
        previous: Option<Layout>,
        addresses: BTreeMap<NodeId, String>,
    ) -> Self {
        PublishedLayout { layout, previous, addresses, sequence: 0, signed: None, pool: None }
    }

    /// The same publication carrying the pool's settings `info` (signed with it).
    pub fn with_pool(mut self, info: proto::PoolInfo) -> Self {
        self.pool = Some(info);
        self
    }

    /// The address of `node`.
    pub fn address(&self, node: &NodeId) -> Option<&str> {
        self.addresses.get(node).map(String::as_str)
    }

    /// Signs this publication as the pool, with sequence number `sequence`.
    pub fn sign(mut self, pool: &Identity, sequence: u64, published_ms: u64) -> Self {
        let publication = proto::LayoutPublication {
            pool_id: pool.id().0.to_vec().into(),
            sequence,
            published_ms,
            layout: Some(proto::LayoutMessage::from(&self)),
            pool: self.pool.clone(),
        }
        .encode_to_vec();
        let signature = pool.sign(&[LAYOUT_DOMAIN, &publication].concat());
        self.sequence = sequence;
        self.signed = Some(Arc::new(proto::SignedLayout {
            pool_key: pool.public_key().to_bytes().to_vec().into(),
            publication: publication.into(),
            signature: signature.to_bytes().to_vec().into(),
        }));
        self
    }
}

/// Why a layout publication was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutRefusal {
    /// No signature, or not the parts of one.
    #[error("layout is not signed: refusing it")]
    Unsigned,
    /// Signed by a key that is not the pinned pool's.
    #[error(
        "layout is signed by {signer}, not by the pool {pool} this node is pinned to: an \
         impostor coordinator, or the wrong --pool-id"
    )]
    WrongPool {
        /// The signer's id.
        signer: String,
        /// The pinned pool id.
        pool: String,
    },
    /// The signature does not verify over the bytes sent.
    #[error("layout signature does not verify: it was altered on the way")]
    BadSignature,
    /// Signed, but not a well-formed layout.
    #[error("signed layout is malformed: {0}")]
    Malformed(String),
    /// Older than the last publication accepted.
    #[error(
        "layout publication {sequence} (version {version}) is older than the one accepted \
         ({last_sequence}, version {last_version}): keeping the newer one"
    )]
    Older {
        /// The refused publication's sequence.
        sequence: u64,
        /// Its layout version.
        version: u64,
        /// The last accepted sequence.
        last_sequence: u64,
        /// Its layout version.
        last_version: u64,
    },
    /// The same sequence as the last accepted publication with different contents.
    #[error(
        "layout publication {0} differs from the one accepted under the same number: two \
         coordinators sign for this pool (a fork); keeping the first"
    )]
    Forked(u64),
}

impl LayoutRefusal {
    /// Every label [`LayoutRefusal::metric_label`] can return.
    pub const METRIC_LABELS: [&'static str; 6] =
        ["unsigned", "wrong_pool", "bad_signature", "malformed", "older", "forked"];

    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            LayoutRefusal::Unsigned => "unsigned",
            LayoutRefusal::WrongPool { .. } => "wrong_pool",
            LayoutRefusal::BadSignature => "bad_signature",
            LayoutRefusal::Malformed(_) => "malformed",
            LayoutRefusal::Older { .. } => "older",
            LayoutRefusal::Forked(_) => "forked",
        }
    }
}

/// Verifies `signed` as a publication of the pool `pool`, on its own (no history).
pub fn verify_layout(
    signed: &proto::SignedLayout,
    pool: &NodeId,
) -> Result<PublishedLayout, LayoutRefusal> {
    let key: [u8; 32] = signed.pool_key[..].try_into().map_err(|_| LayoutRefusal::Unsigned)?;
    let sig: [u8; 64] = signed.signature[..].try_into().map_err(|_| LayoutRefusal::Unsigned)?;
    let signer = NodeId(blake2b256(&[&key]));
    if signer != *pool {
        return Err(LayoutRefusal::WrongPool { signer: signer.to_hex(), pool: pool.to_hex() });
    }
    let key = VerifyingKey::from_bytes(&key).map_err(|_| LayoutRefusal::BadSignature)?;
    key.verify(&[LAYOUT_DOMAIN, &signed.publication].concat(), &Signature::from_bytes(&sig))
        .map_err(|_| LayoutRefusal::BadSignature)?;
    let p = proto::LayoutPublication::decode(&signed.publication[..])
        .map_err(|e| LayoutRefusal::Malformed(e.to_string()))?;
    if p.pool_id[..] != pool.0 {
        return Err(LayoutRefusal::Malformed("the publication names another pool".into()));
    }
    let layout = p.layout.ok_or_else(|| LayoutRefusal::Malformed("no layout".into()))?;
    let mut published = PublishedLayout::try_from(layout)
        .map_err(|s| LayoutRefusal::Malformed(s.message().to_string()))?;
    published.sequence = p.sequence;
    published.pool = p.pool;
    published.signed = Some(Arc::new(signed.clone()));
    Ok(published)
}

/// What a receiver remembers of the pool's publications: the pinned pool and the last
/// publication it accepted. Agents and clients pass every layout they receive through one.
#[derive(Debug, Clone)]
pub struct LayoutGuard {
    pool: NodeId,
    last: Option<Accepted>,
}

#[derive(Debug, Clone, Copy)]
struct Accepted {
    sequence: u64,
    version: u64,
    digest: [u8; 32],
}

impl LayoutGuard {
    /// A guard for the pool `pool` that has accepted nothing yet.
    pub fn new(pool: NodeId) -> Self {
        LayoutGuard { pool, last: None }
    }

    /// The pinned pool.
    pub fn pool(&self) -> NodeId {
        self.pool
    }

    /// Checks `signed` against the pinned pool and the last publication accepted: the new
    /// layout, `Ok(None)` for the same publication again, or why it is refused (the last
    /// accepted one stays).
    pub fn accept(
        &mut self,
        signed: &proto::SignedLayout,
    ) -> Result<Option<PublishedLayout>, LayoutRefusal> {
        let published = verify_layout(signed, &self.pool)?;
        let digest = blake2b256(&[&signed.publication]);
        let (sequence, version) = (published.sequence, published.layout.version);
        if let Some(last) = self.last {
            if sequence == last.sequence && digest == last.digest {
                return Ok(None);
            }
            if sequence == last.sequence {
                return Err(LayoutRefusal::Forked(sequence));
            }
            if sequence < last.sequence || version < last.version {
                return Err(LayoutRefusal::Older {
                    sequence,
                    version,
                    last_sequence: last.sequence,
                    last_version: last.version,
                });
            }
        }
        self.last = Some(Accepted { sequence, version, digest });
        Ok(Some(published))
    }
}

fn layout_to_proto(l: &Layout, addresses: &BTreeMap<NodeId, String>) -> proto::LayoutMessage {
    let mut index: BTreeMap<NodeId, u32> = BTreeMap::new();
    let mut nodes = Vec::new();
    let mut slots = Vec::with_capacity(l.partitions.len() * l.n());
    for id in l.partitions.iter().flatten() {
        let i = *index.entry(*id).or_insert_with(|| {
            nodes.push(proto::LayoutNode {
                node_id: id.0.to_vec().into(),
                grpc_address: addresses.get(id).cloned().unwrap_or_default(),
            });
            nodes.len() as u32 - 1
        });
        slots.push(i);
    }
    proto::LayoutMessage {
        version: l.version,
        k: u32::from(l.k),
        m: u32::from(l.m),
        partitions: l.partitions.len() as u32,
        nodes,
        slots,
        previous: None,
    }
}

impl From<&PublishedLayout> for proto::LayoutMessage {
    fn from(p: &PublishedLayout) -> Self {
        let mut msg = layout_to_proto(&p.layout, &p.addresses);
        msg.previous = p.previous.as_ref().map(|l| Box::new(layout_to_proto(l, &p.addresses)));
        msg
    }
}

fn layout_from_proto(
    m: &proto::LayoutMessage,
    addresses: &mut BTreeMap<NodeId, String>,
) -> Result<Layout, Status> {
    let bad = |why: &str| Status::invalid_argument(format!("layout {}: {why}", m.version));
    let (k, mm) = (u16::try_from(m.k), u16::try_from(m.m));
    let (Ok(k), Ok(mm)) = (k, mm) else { return Err(bad("k or m out of range")) };
    let n = usize::from(k) + usize::from(mm);
    if n == 0 || m.slots.len() != m.partitions as usize * n {
        return Err(bad("slot count is not partitions × n"));
    }
    let mut ids = Vec::with_capacity(m.nodes.len());
    for node in &m.nodes {
        let id = NodeId(node.node_id[..].try_into().map_err(|_| bad("node id is not 32 bytes"))?);
        addresses.insert(id, node.grpc_address.clone());
        ids.push(id);
    }
    let partitions = m
        .slots
        .chunks(n)
        .map(|c| {
            c.iter()
                .map(|&i| ids.get(i as usize).copied().ok_or_else(|| bad("slot names no node")))
                .collect()
        })
        .collect::<Result<_, _>>()?;
    Ok(Layout { version: m.version, k, m: mm, partitions })
}

impl TryFrom<proto::LayoutMessage> for PublishedLayout {
    type Error = Status;
    fn try_from(m: proto::LayoutMessage) -> Result<Self, Status> {
        let mut addresses = BTreeMap::new();
        let previous = m.previous.as_deref().map(|p| layout_from_proto(p, &mut addresses));
        let previous = previous.transpose()?;
        // The current layout's addresses win over the previous one's.
        let layout = layout_from_proto(&m, &mut addresses)?;
        Ok(PublishedLayout { layout, previous, addresses, sequence: 0, signed: None, pool: None })
    }
}

/// A connection to the coordinator of the pool whose id the caller pins.
#[derive(Clone)]
pub struct CoordinatorClient {
    raw: Raw<Channel>,
    signer: Arc<Signer>,
    pool: NodeId,
}

impl CoordinatorClient {
    /// Connects to `addr` (`host:port`), the coordinator of the pool `pool`.
    pub async fn connect(
        addr: &str,
        signer: Arc<Signer>,
        pool: NodeId,
    ) -> Result<Self, tonic::transport::Error> {
        // Every call has a deadline: a coordinator that stalls (SIGSTOPped, a hung pod) costs
        // a caller CALL_DEADLINE, never a task for ever (a stream's deadline is its opening).
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .timeout(CALL_DEADLINE);
        // The coordinator must prove the pool key.
        let channel = signer.dial(endpoint, pool).await?;
        let raw = Raw::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        Ok(CoordinatorClient { raw, signer, pool })
    }

    /// A fresh capacity challenge.
    pub async fn challenge(&mut self) -> Result<proto::ChallengeResponse, Status> {
        let req = self.signer.request(self.pool, methods::CHALLENGE, proto::ChallengeRequest {});
        Ok(self.raw.challenge(req).await?.into_inner())
    }

    /// Joins the pool.
    pub async fn join(&mut self, msg: proto::JoinRequest) -> Result<proto::JoinResponse, Status> {
        Ok(self.raw.join(self.signer.request(self.pool, methods::JOIN, msg)).await?.into_inner())
    }

    /// Sends a heartbeat.
    pub async fn report(
        &mut self,
        msg: proto::ReportRequest,
    ) -> Result<proto::ReportResponse, Status> {
        Ok(self
            .raw
            .report(self.signer.request(self.pool, methods::REPORT, msg))
            .await?
            .into_inner())
    }

    /// The pinned pool.
    pub fn pool(&self) -> NodeId {
        self.pool
    }

    /// The current layout, verified as the pinned pool's (a refusal is `PermissionDenied`).
    pub async fn get_layout(&mut self) -> Result<PublishedLayout, Status> {
        let req = self.signer.request(self.pool, methods::GET_LAYOUT, proto::GetLayoutRequest {});
        let signed = self.raw.get_layout(req).await?.into_inner();
        verify_layout(&signed, &self.pool).map_err(|e| Status::permission_denied(e.to_string()))
    }

    /// Every layout publication from the current one on, as sent: pass each through a
    /// [`LayoutGuard`] for the pool.
    pub async fn watch_layout(&mut self) -> Result<Streaming<proto::SignedLayout>, Status> {
        let req =
            self.signer.request(self.pool, methods::WATCH_LAYOUT, proto::WatchLayoutRequest {});
        Ok(self.raw.watch_layout(req).await?.into_inner())
    }

    /// The members.
    pub async fn list_nodes(&mut self) -> Result<proto::ListNodesResponse, Status> {
        let req = self.signer.request(self.pool, methods::LIST_NODES, proto::ListNodesRequest {});
        Ok(self.raw.list_nodes(req).await?.into_inner())
    }

    /// The pool's settings.
    pub async fn get_pool(&mut self) -> Result<proto::PoolInfo, Status> {
        let req = self.signer.request(self.pool, methods::GET_POOL, proto::GetPoolRequest {});
        Ok(self.raw.get_pool(req).await?.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Identity {
        Identity::from_parts(shardfarm_core::identity::random_signing_key(), 0)
    }

    fn published(version: u64) -> PublishedLayout {
        let ids: Vec<NodeId> = (1..=3u8).map(|i| NodeId([i; 32])).collect();
        let layout = Layout { version, k: 2, m: 1, partitions: vec![ids.clone(), ids.clone()] };
        let addresses = ids.iter().map(|id| (*id, format!("10.0.0.{}:7400", id.0[0]))).collect();
        PublishedLayout::new(layout, None, addresses)
    }

    fn signed(p: &PublishedLayout) -> proto::SignedLayout {
        (**p.signed.as_ref().unwrap()).clone()
    }

    /// The pool's settings travel inside the signed publication: a client bootstrapping
    /// from any agent reads them there, and nobody on the way can change them.
    #[test]
    fn the_pools_settings_are_signed_with_the_layout() {
        let key = pool();
        let info = proto::PoolInfo {
            pool: "p".into(),
            k: 2,
            m: 1,
            partitions: 2,
            segment_size: 1 << 20,
            ..Default::default()
        };
        let one = published(1).with_pool(info.clone()).sign(&key, 10, 0);
        let back = verify_layout(&signed(&one), &key.id()).unwrap();
        assert_eq!(back.pool, Some(info));
        let mut altered = proto::LayoutPublication::decode(&signed(&one).publication[..]).unwrap();
        altered.pool.as_mut().unwrap().segment_size = 1;
        let mut s = signed(&one);
        s.publication = altered.encode_to_vec().into();
        assert_eq!(verify_layout(&s, &key.id()).unwrap_err(), LayoutRefusal::BadSignature);
        // A publication without settings (an older coordinator's) still verifies.
        let bare = published(1).sign(&key, 11, 0);
        assert_eq!(verify_layout(&signed(&bare), &key.id()).unwrap().pool, None);
    }

    #[test]
    fn only_the_pinned_pools_newer_publications_are_accepted() {
        let key = pool();
        let mut guard = LayoutGuard::new(key.id());
        let one = published(1).sign(&key, 10, 0);
        let got = guard.accept(&signed(&one)).unwrap().unwrap();
        assert_eq!(
            (got.layout, got.addresses, got.sequence),
            (one.layout.clone(), one.addresses.clone(), 10)
        );
        // The same publication again changes nothing.
        assert_eq!(guard.accept(&signed(&one)), Ok(None));

        // An impostor's key, however well-formed its layout.
        let impostor = published(2).sign(&pool(), 11, 0);
        let e = guard.accept(&signed(&impostor)).unwrap_err();
        assert_eq!(e.metric_label(), "wrong_pool", "{e}");
        // The pool's key presented with the impostor's signature.
        let mut mixed = signed(&impostor);
        mixed.pool_key = signed(&one).pool_key;
        assert_eq!(guard.accept(&mixed), Err(LayoutRefusal::BadSignature));

        // One address rewritten on the way (the publication's bytes altered).
        let two = published(2).sign(&key, 11, 0);
        let mut altered = signed(&two);
        let mut p = proto::LayoutPublication::decode(&altered.publication[..]).unwrap();
        p.layout.as_mut().unwrap().nodes[0].grpc_address = "203.0.113.9:7400".into();
        altered.publication = p.encode_to_vec().into();
        assert_eq!(guard.accept(&altered), Err(LayoutRefusal::BadSignature));

        // Unsigned or truncated signatures.
        let mut unsigned = signed(&two);
        unsigned.signature = Default::default();
        assert_eq!(guard.accept(&unsigned), Err(LayoutRefusal::Unsigned));
        assert_eq!(guard.accept(&proto::SignedLayout::default()), Err(LayoutRefusal::Unsigned));

        // A fork: the same sequence as the accepted one, other contents.
        let fork = published(1).sign(&key, 10, 1);
        assert_eq!(guard.accept(&signed(&fork)), Err(LayoutRefusal::Forked(10)));
        // Older sequences, and newer sequences of older layouts, are refused.
        let old = published(1).sign(&key, 9, 0);
        assert_eq!(guard.accept(&signed(&old)).unwrap_err().metric_label(), "older");
        assert!(guard.accept(&signed(&two)).unwrap().is_some());
        let rolled_back = published(1).sign(&key, 12, 0);
        assert_eq!(guard.accept(&signed(&rolled_back)).unwrap_err().metric_label(), "older");

        // Throughout, the last good publication stays the one accepted.
        let three = published(3).sign(&key, 13, 0);
        assert_eq!(guard.accept(&signed(&three)).unwrap().unwrap().layout.version, 3);
    }

    #[test]
    fn a_signed_but_malformed_layout_is_refused() {
        let key = pool();
        let publication = proto::LayoutPublication {
            pool_id: key.id().0.to_vec().into(),
            sequence: 1,
            published_ms: 0,
            layout: Some(proto::LayoutMessage {
                version: 1,
                k: 2,
                m: 1,
                partitions: 2,
                slots: vec![0; 5],
                ..Default::default()
            }),
            pool: None,
        }
        .encode_to_vec();
        let s = proto::SignedLayout {
            pool_key: key.public_key().to_bytes().to_vec().into(),
            signature: key.sign(&[LAYOUT_DOMAIN, &publication].concat()).to_bytes().to_vec().into(),
            publication: publication.into(),
        };
        let e = LayoutGuard::new(key.id()).accept(&s).unwrap_err();
        assert_eq!(e.metric_label(), "malformed", "{e}");
    }
}
