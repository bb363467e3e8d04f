//! The local farm's state directory: `farm.json` (pool, profile, nodes, layout) and the keys.
//!
//! `shardfarm local up` owns this directory and keeps `farm.json` as its own bookkeeping (and
//! for tests and benchmarks that look at the nodes). Clients do not read it: they open the
//! pool profile `pool.toml` beside it, like any other pool.

use std::collections::BTreeMap;
use std::path::Path;

pub use crate::identity::ClientKey;
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use shardfarm_core::identity::NodeId;
use shardfarm_core::placement::Layout;
use shardfarm_proto::PublishedLayout;

/// File name of the farm description.
pub const FARM_FILE: &str = "farm.json";
/// The farm root identity (issues delegations).
pub const ROOT_KEY: &str = "farm-root.key";
/// The local user's key and delegation certificate.
pub const CLIENT_KEY: &str = "client.key";

/// One node of the farm.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct NodeEntry {
    /// Index (also its directory `node-<i>`).
    pub index: usize,
    /// Hex node id, once known.
    pub id: String,
    /// gRPC address.
    pub grpc: String,
    /// HTTP (metrics) address.
    pub http: String,
    /// Zone label.
    pub zone: String,
}

/// `farm.json`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Farm {
    /// Format version of this file.
    pub version: u32,
    /// Pool name (goes into read capabilities).
    pub pool: String,
    /// Data shards.
    pub k: u16,
    /// Parity shards.
    pub m: u16,
    /// Segment size in bytes.
    pub segment_size: u64,
    /// Partitions.
    pub partitions: u32,
    /// Identity difficulty of the local farm.
    pub difficulty: u8,
    /// Nodes.
    pub nodes: Vec<NodeEntry>,
    /// Layout version.
    pub layout_version: u64,
    /// `layout[p]` = node indices holding shards 0..n of partition p.
    pub layout: Vec<Vec<usize>>,
    /// The previous layout (readers fall back to it), if any.
    #[serde(default)]
    pub previous_layout: Option<Vec<Vec<usize>>>,
    /// The coordinator's gRPC address.
    #[serde(default)]
    pub coordinator: Option<String>,
    /// Id of the pool key (hex): the coordinator's identity, which signs every layout.
    #[serde(default)]
    pub pool_id: Option<String>,
    /// The farm runs plaintext HTTP/2 (`local up --insecure-plaintext`, debugging only);
    /// otherwise every hop is TLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_plaintext: bool,
}

impl Farm {
    /// Reads `DIR/farm.json`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(FARM_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no farm at {}: start one with `shardfarm local up --data {}` or pass --farm DIR",
                dir.display(),
                dir.display()
            )
        })?;
        let farm: Farm = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid farm file", path.display()))?;
        if farm.version != 1 {
            bail!("{} has version {}; this build reads version 1", path.display(), farm.version);
        }
        Ok(farm)
    }

    /// Writes `DIR/farm.json` atomically.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join(FARM_FILE);
        let tmp = dir.join("farm.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// n = k + m.
    pub fn n(&self) -> usize {
        usize::from(self.k) + usize::from(self.m)
    }

    /// Takes in a layout the coordinator published: nodes it names that the farm does not know
    /// yet are appended (indices never change), then both layouts are stored as indices.
    pub fn apply_layout(
        &mut self,
        published: &PublishedLayout,
        http: &BTreeMap<NodeId, (String, String)>,
    ) {
        let mut index: BTreeMap<String, usize> =
            self.nodes.iter().map(|n| (n.id.clone(), n.index)).collect();
        let ids = published.layout.partitions.iter().flatten();
        let prev = published.previous.iter().flat_map(|l| l.partitions.iter().flatten());
        for id in ids.chain(prev) {
            let hex = id.to_hex();
            let grpc = published.address(id).unwrap_or_default().to_string();
            let (http_addr, zone) = http.get(id).cloned().unwrap_or_default();
            match index.get(&hex) {
                Some(&i) => {
                    let n = &mut self.nodes[i];
                    n.grpc = grpc;
                    if !http_addr.is_empty() {
                        (n.http, n.zone) = (http_addr, zone);
                    }
                }
                None => {
                    let i = self.nodes.len();
                    self.nodes.push(NodeEntry {
                        index: i,
                        id: hex.clone(),
                        grpc,
                        http: http_addr,
                        zone,
                    });
                    index.insert(hex, i);
                }
            }
        }
        let to_indices = |l: &Layout| -> Vec<Vec<usize>> {
            l.partitions.iter().map(|p| p.iter().map(|id| index[&id.to_hex()]).collect()).collect()
        };
        self.layout_version = published.layout.version;
        self.layout = to_indices(&published.layout);
        self.previous_layout = published.previous.as_ref().map(to_indices);
    }
}
