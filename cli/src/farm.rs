//! The local farm's state directory: `farm.json` (pool, profile, nodes, layout) and the keys.
//!
//! `shardfarm local up` is the coordinator of a local farm: it owns this directory. Client
//! commands read it (`--farm DIR` or `SHARDFARM_FARM`) to find the nodes, the layout and the
//! local user's delegated credential.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use shardfarm_core::identity::{Delegation, Identity};

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

    /// The nodes holding partition `p`, in shard order.
    pub fn holders(&self, p: u32) -> Vec<&NodeEntry> {
        self.layout[p as usize].iter().map(|&i| &self.nodes[i]).collect()
    }
}

/// A simple correct layout (until the placement engine lands): interleave nodes by zone, then
/// give partition `p` the `n` consecutive nodes starting at `p mod N`. Every partition gets n
/// distinct nodes; the result is checked so that no zone holds more than `m` shards of a
/// partition, and refused with the reason when the zones cannot allow that.
pub fn simple_layout(
    nodes: &[NodeEntry],
    k: u16,
    m: u16,
    partitions: u32,
) -> anyhow::Result<Vec<Vec<usize>>> {
    let n = usize::from(k) + usize::from(m);
    if nodes.len() < n {
        bail!("RS({k},{m}) needs {n} nodes, the farm has {}", nodes.len());
    }
    let mut by_zone: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for node in nodes {
        by_zone.entry(&node.zone).or_default().push(node.index);
    }
    let zones = by_zone.len();
    let min_zones = n.div_ceil(usize::from(m));
    if zones < min_zones {
        bail!(
            "RS({k},{m}) needs at least {min_zones} zones so that no zone holds more than {m} of a \
             segment's {n} shards; the farm has {zones}"
        );
    }
    let mut order = Vec::with_capacity(nodes.len());
    let mut queues: Vec<std::collections::VecDeque<usize>> =
        by_zone.into_values().map(Into::into).collect();
    while order.len() < nodes.len() {
        for q in queues.iter_mut() {
            if let Some(i) = q.pop_front() {
                order.push(i);
            }
        }
    }
    let mut layout = Vec::with_capacity(partitions as usize);
    for p in 0..partitions as usize {
        let holders: Vec<usize> = (0..n).map(|j| order[(p + j) % order.len()]).collect();
        let mut per_zone: BTreeMap<&str, usize> = BTreeMap::new();
        for &h in &holders {
            *per_zone.entry(&nodes[h].zone).or_default() += 1;
        }
        if let Some((z, c)) = per_zone.iter().find(|(_, c)| **c > usize::from(m)) {
            bail!(
                "zones are too uneven for RS({k},{m}): partition {p} would put {c} shards in zone {z}; \
                 spread the nodes more evenly over zones"
            );
        }
        layout.push(holders);
    }
    Ok(layout)
}

/// The local user's credential: a fresh key with a delegation from the farm root.
pub struct ClientKey {
    /// The key.
    pub key: ed25519_dalek::SigningKey,
    /// The delegation certificate.
    pub cert: Delegation,
}

impl ClientKey {
    /// Issues a new client key valid for `days`.
    pub fn issue(root: &Identity, days: u64) -> Self {
        let key = shardfarm_core::identity::random_signing_key();
        let expires = shardfarm_core::auth::now_ms() / 1000 + days * 86_400;
        let cert = Delegation::issue(root, key.verifying_key(), expires);
        ClientKey { key, cert }
    }

    /// Writes it with mode 0600.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = format!(
            "# shardfarm client key and delegation: keep secret (mode 0600)\nsecret = \"{}\"\ndelegation = \"{}\"\n",
            hex::encode(self.key.to_bytes()),
            hex::encode(self.cert.to_bytes())
        );
        shardfarm_core::identity::write_secret_file(path, text.as_bytes())?;
        Ok(())
    }

    /// Reads it back (refusing a group/world-readable file).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        shardfarm_core::identity::check_private(path)?;
        let text = std::fs::read_to_string(path)?;
        let field = |name: &str| -> anyhow::Result<Vec<u8>> {
            let line = text
                .lines()
                .find_map(|l| l.trim().strip_prefix(name)?.trim().strip_prefix('=').map(str::trim))
                .with_context(|| format!("{}: no `{name}`", path.display()))?;
            Ok(hex::decode(line.trim_matches('"'))?)
        };
        let secret: [u8; 32] =
            field("secret")?.try_into().map_err(|_| anyhow::anyhow!("bad secret"))?;
        Ok(ClientKey {
            key: ed25519_dalek::SigningKey::from_bytes(&secret),
            cert: Delegation::from_bytes(&field("delegation")?)?,
        })
    }
}

/// Where the farm is: `--farm DIR`, else `SHARDFARM_FARM`, else `./farm`.
pub fn farm_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(|| PathBuf::from("farm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(zones: &[&str]) -> Vec<NodeEntry> {
        zones
            .iter()
            .enumerate()
            .map(|(i, z)| NodeEntry {
                index: i,
                id: String::new(),
                grpc: String::new(),
                http: String::new(),
                zone: z.to_string(),
            })
            .collect()
    }

    #[test]
    fn six_nodes_three_zones_hold_rs42_with_at_most_m_per_zone() {
        let ns = nodes(&["a", "a", "b", "b", "c", "c"]);
        let l = simple_layout(&ns, 4, 2, 256).unwrap();
        for p in &l {
            let mut d = p.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 6);
            for z in ["a", "b", "c"] {
                assert!(p.iter().filter(|&&i| ns[i].zone == z).count() <= 2);
            }
        }
    }

    #[test]
    fn too_few_zones_or_nodes_are_refused_with_the_reason() {
        let err = simple_layout(&nodes(&["a", "a", "a", "b", "b", "b"]), 4, 2, 8).unwrap_err();
        assert!(err.to_string().contains("needs at least 3 zones"), "{err}");
        let err = simple_layout(&nodes(&["a", "b", "c"]), 4, 2, 8).unwrap_err();
        assert!(err.to_string().contains("needs 6 nodes"), "{err}");
        let err = simple_layout(&nodes(&["a", "a", "a", "a", "b", "c"]), 4, 2, 8).unwrap_err();
        assert!(err.to_string().contains("uneven"), "{err}");
    }
}
