//! The coordinator's protocol as agents and clients use it: a signing client and the layout
//! as published ([`PublishedLayout`], converted from and to its proto form here only).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use shardfarm_core::identity::NodeId;
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
}

impl PublishedLayout {
    /// The address of `node`.
    pub fn address(&self, node: &NodeId) -> Option<&str> {
        self.addresses.get(node).map(String::as_str)
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
        Ok(PublishedLayout { layout, previous, addresses })
    }
}

/// A connection to the coordinator.
#[derive(Clone)]
pub struct CoordinatorClient {
    raw: Raw<Channel>,
    signer: Arc<Signer>,
}

impl CoordinatorClient {
    /// Connects to `addr` (`host:port`).
    pub async fn connect(addr: &str, signer: Arc<Signer>) -> Result<Self, tonic::transport::Error> {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .connect()
            .await?;
        let raw = Raw::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        Ok(CoordinatorClient { raw, signer })
    }

    /// A fresh capacity challenge.
    pub async fn challenge(&mut self) -> Result<proto::ChallengeResponse, Status> {
        let req = self.signer.request(methods::CHALLENGE, proto::ChallengeRequest {});
        Ok(self.raw.challenge(req).await?.into_inner())
    }

    /// Joins the pool.
    pub async fn join(&mut self, msg: proto::JoinRequest) -> Result<proto::JoinResponse, Status> {
        Ok(self.raw.join(self.signer.request(methods::JOIN, msg)).await?.into_inner())
    }

    /// Sends a heartbeat.
    pub async fn report(
        &mut self,
        msg: proto::ReportRequest,
    ) -> Result<proto::ReportResponse, Status> {
        Ok(self.raw.report(self.signer.request(methods::REPORT, msg)).await?.into_inner())
    }

    /// The current layout.
    pub async fn get_layout(&mut self) -> Result<PublishedLayout, Status> {
        let req = self.signer.request(methods::GET_LAYOUT, proto::GetLayoutRequest {});
        self.raw.get_layout(req).await?.into_inner().try_into()
    }

    /// Every layout from the current one on.
    pub async fn watch_layout(&mut self) -> Result<Streaming<proto::LayoutMessage>, Status> {
        let req = self.signer.request(methods::WATCH_LAYOUT, proto::WatchLayoutRequest {});
        Ok(self.raw.watch_layout(req).await?.into_inner())
    }

    /// The members.
    pub async fn list_nodes(&mut self) -> Result<proto::ListNodesResponse, Status> {
        let req = self.signer.request(methods::LIST_NODES, proto::ListNodesRequest {});
        Ok(self.raw.list_nodes(req).await?.into_inner())
    }
}
