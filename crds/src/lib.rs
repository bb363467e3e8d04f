//! Shardfarm's custom resources (group `shardfarm.io`, version `v1alpha1`).
//!
//! | kind | what it is |
//! |---|---|
//! | [`StoragePool`] | a pool: erasure profile, partitions, failure domain, admission, rewards |
//! | [`MiningFarm`] | a set of agents in this cluster (a StatefulSet); `kubectl scale` works |
//! | [`NodeSyndication`] | admission of nodes from outside the cluster, and remote clusters |
//! | [`ShardPlacement`] | the pool's layout: partitions, moves per round, drains |
//!
//! The YAML in `crds/*.yaml` is generated from these types by `crdgen` (never written by
//! hand); a test fails when it differs. Ranges are schema bounds; rules that span fields are
//! CEL (`x-kubernetes-validations`), checked by the API server.

#![warn(missing_docs)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group.
pub const GROUP: &str = "shardfarm.io";
/// API version.
pub const VERSION: &str = "v1alpha1";

// ---- StoragePool ----

/// A storage pool: the erasure profile and rules every node of the pool follows.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shardfarm.io",
    version = "v1alpha1",
    kind = "StoragePool",
    namespaced,
    status = "StoragePoolStatus",
    shortname = "sfpool",
    printcolumn = r#"{"name":"Profile","type":"string","jsonPath":".status.profile"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.nodesReady"}"#,
    printcolumn = r#"{"name":"Degraded","type":"integer","jsonPath":".status.degradedSegments"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolSpec {
    /// The erasure profile. Immutable: data written as RS(k,m) is read as RS(k,m).
    #[x_kube(validation = Rule::new("self == oldSelf").message("erasure is immutable: segments written with one profile cannot be read with another; create a new pool and copy the data"))]
    pub erasure: Erasure,
    /// Segment size in bytes (1 MiB to 1 GiB). Immutable.
    #[serde(default = "default_segment_size")]
    #[schemars(range(min = 1_048_576, max = 1_073_741_824))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("segmentSize is immutable; create a new pool"))]
    pub segment_size: u64,
    /// Placement partitions. Immutable: every agent and every stored shard is placed by it.
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 1_048_576))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("partitions is immutable: every agent and stored shard is placed by it; create a new pool"))]
    pub partitions: u32,
    /// The label placement spreads shards over. Immutable.
    #[serde(default)]
    #[schemars(extend("maxLength" = 16))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("failureDomain is immutable; create a new pool"))]
    pub failure_domain: FailureDomain,
    /// Who may join.
    #[serde(default)]
    pub admission: Admission,
    /// The economics.
    #[serde(default)]
    pub rewards: Rewards,
    /// Seconds between audits of each node.
    #[serde(default = "default_audit_interval")]
    #[schemars(range(min = 10, max = 604_800))]
    pub audit_interval_seconds: u64,
    /// Programs that store and read objects in the pool (a gateway, an application): for each,
    /// the operator keeps a key delegated by the pool key in the Secret
    /// `shardfarm-client-<pool>-<name>` (key `client.key`), owned by the pool; it is issued
    /// again when less than a fifth of its lifetime is left, and the Secret is deleted when its
    /// entry goes (the delegation itself stays valid until it expires).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub clients: Vec<PoolClient>,
}

/// Most client entries a pool takes.
pub const MAX_CLIENTS: usize = 32;
/// Longest client name: `shardfarm-client-<pool>-<name>` must stay a valid Secret name.
pub const MAX_CLIENT_NAME: usize = 40;

/// A client of the pool, issued a delegated key by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolClient {
    /// Its name: a DNS label of at most 40 characters (`gateway`, `s3-alice`).
    #[schemars(length(min = 1, max = 40), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Days each issued key is valid (1 to 3650; default 365).
    #[serde(default = "default_client_days")]
    #[schemars(range(min = 1, max = 3650))]
    pub days: u32,
}

fn default_client_days() -> u32 {
    365
}

/// Data and parity shards per segment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.dataShards + self.parityShards <= 255").message("dataShards + parityShards must be at most 255"))]
pub struct Erasure {
    /// k.
    #[schemars(range(min = 1, max = 254))]
    pub data_shards: u16,
    /// m: any m lost nodes lose nothing. At least 1.
    #[schemars(range(min = 1, max = 254))]
    pub parity_shards: u16,
}

/// What a failure domain is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailureDomain {
    /// The node's `zone` label.
    #[default]
    Zone,
    /// The MiningFarm (or `farm` label).
    Farm,
    /// The host.
    Host,
    /// The cluster the node runs in.
    Cluster,
}

impl FailureDomain {
    /// The label name.
    pub fn label(self) -> &'static str {
        match self {
            FailureDomain::Zone => "zone",
            FailureDomain::Farm => "farm",
            FailureDomain::Host => "host",
            FailureDomain::Cluster => "cluster",
        }
    }
}

/// Admission rules of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    /// Least proof-of-work difficulty of a node identity, in bits.
    #[schemars(range(min = 8, max = 40))]
    pub min_identity_difficulty: u8,
    /// Least audit score (0–1) to take new data.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_reputation: f64,
}

impl Default for Admission {
    fn default() -> Self {
        Admission { min_identity_difficulty: 28, min_reputation: 0.8 }
    }
}

/// Rewards per epoch: RW1 = SP·PMA·C_i/ΣC, RW2 = SP·PMB·stored_i/Σstored.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.pma + self.pmb <= 1.0").message("pma + pmb must be at most 1"))]
pub struct Rewards {
    /// Epoch length, seconds.
    #[schemars(range(min = 60))]
    pub epoch_seconds: u64,
    /// SP, the pool's reward per epoch.
    pub pool_reward: u64,
    /// PMA, the capacity share.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub pma: f64,
    /// PMB, the storage share.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub pmb: f64,
}

impl Default for Rewards {
    fn default() -> Self {
        Rewards { epoch_seconds: 86_400, pool_reward: 1_000_000, pma: 0.3, pmb: 0.7 }
    }
}

fn default_segment_size() -> u64 {
    64 << 20
}
fn default_partitions() -> u32 {
    256
}
fn default_audit_interval() -> u64 {
    3600
}

/// The observed state of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolStatus {
    /// `Ready`, `Degraded` or `Pending`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `RS(k,m)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// The pool's id (64 hex digits): its coordinator's key, which signs every layout. Agents
    /// pin it; remote farms put it in `poolRef.poolId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<String>,
    /// Conditions (`Ready`, `Degraded`, `Progressing`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Nodes up and active.
    #[serde(default)]
    pub nodes_ready: u32,
    /// Nodes suspended.
    #[serde(default)]
    pub nodes_suspended: u32,
    /// Capacity offered, bytes.
    #[serde(default)]
    pub capacity_bytes: u64,
    /// Bytes stored.
    #[serde(default)]
    pub used_bytes: u64,
    /// Current layout version.
    #[serde(default)]
    pub layout_version: u64,
    /// Shards below full redundancy (the `Degraded` column): those the nodes up still have
    /// to rebuild, and those the current layout places on nodes that are down or have left
    /// the pool. Despite its name, counted in shards.
    #[serde(default)]
    pub degraded_segments: u64,
    /// The client keys issued for `spec.clients`, as their Secrets hold them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<IssuedClient>,
    /// The generation these facts describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A client key the operator issued.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuedClient {
    /// The entry of `spec.clients`.
    pub name: String,
    /// The Secret holding its key (`client.key`).
    pub secret: String,
    /// The id of the delegated key (64 hex digits): what servers see as the caller.
    pub key_id: String,
    /// When its delegation expires (RFC 3339).
    pub expires: String,
}

// ---- MiningFarm ----

/// A farm of agents in this cluster: one StatefulSet (or DaemonSet), one zone.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shardfarm.io",
    version = "v1alpha1",
    kind = "MiningFarm",
    namespaced,
    status = "MiningFarmStatus",
    shortname = "farm",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".status.capacity"}"#,
    printcolumn = r#"{"name":"Used","type":"string","jsonPath":".status.used"}"#,
    printcolumn = r#"{"name":"Earnings","type":"integer","jsonPath":".status.earnings"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MiningFarmSpec {
    /// The pool the agents join.
    pub pool_ref: PoolRef,
    /// Number of agents.
    #[schemars(range(min = 0, max = 10_000))]
    pub replicas: i32,
    /// The zone label of every agent of this farm.
    #[schemars(length(max = 63))]
    #[x_kube(validation = Rule::new("self.size() > 0 && self.size() <= 63").message("zone must be 1-63 characters"))]
    pub zone: String,
    /// Node selector for the agent pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations for the agent pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// The agent container.
    pub agent: AgentSpec,
    /// How the agents run: `StatefulSet` (`replicas` agents, each on its own volume; the
    /// default) or `DaemonSet` (one agent on every machine `nodeSelector` matches, on that
    /// machine's disk at `agent.storage.hostPath`, which it requires: a mining farm's racks).
    /// Immutable.
    #[serde(default)]
    #[schemars(extend("maxLength" = 16))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("mode is immutable: create a new farm to change how its agents run"))]
    pub mode: FarmMode,
}

/// How a farm's agents run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FarmMode {
    /// `replicas` agents with their own volumes; scale-down drains.
    #[default]
    StatefulSet,
    /// One agent per matching machine, on its host path.
    DaemonSet,
}

/// Which pool: a StoragePool in this namespace, or a remote pool's coordinator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.name) != has(self.coordinatorEndpoint)").message("set exactly one of name (a local StoragePool) or coordinatorEndpoint (a remote pool)"))]
#[x_kube(validation = Rule::new("has(self.coordinatorEndpoint) == has(self.poolId)").message("a remote pool (coordinatorEndpoint) needs its poolId, and only a remote pool takes one"))]
pub struct PoolRef {
    /// A StoragePool in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,
    /// `host:port` of a remote pool's coordinator (the pool's home cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 261))]
    pub coordinator_endpoint: Option<String>,
    /// The remote pool's id (64 hex digits): its coordinator's key, which signs every layout
    /// the agents accept. Ask the pool's operator (`status.poolId` of its StoragePool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 64, max = 64), regex(pattern = r"^[0-9a-f]{64}$"))]
    pub pool_id: Option<String>,
}

/// The agent container of a farm.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Container image.
    pub image: String,
    /// Resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where shards live.
    pub storage: StorageSpec,
    /// Capacity each agent offers (e.g. `500Gi`); default: the volume size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// The address the agents tell the pool to reach them on (default: `PodDNS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<Advertise>,
}

/// How the pool's other parties (agents, clients, gateways) reach a farm's agents.
///
/// `PodDNS` (the default) advertises `<pod>.<farm>-agents.<namespace>.svc:7400` (a
/// `DaemonSet` farm: the pod IP): reachable only from inside the cluster. `HostNetwork` runs
/// each agent in its machine's network namespace and advertises `<node IP>:<hostPort>`, so
/// clients outside the cluster that can route to the machines reach it; the agent's TLS gRPC
/// port is then open on the machine's address, a NetworkPolicy no longer applies to it, and a
/// machine holds at most one agent of the farm (two farms on one machine need different
/// `hostPort`s). The mode may change: an agent's key and shards stay on its volume, and the
/// restarted agent rejoins with its new address, which the coordinator records.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Advertise {
    /// `PodDNS` or `HostNetwork`.
    #[serde(default)]
    #[schemars(extend("maxLength" = 16))]
    pub mode: AdvertiseMode,
    /// `HostNetwork` only: the machine's port of the agent's gRPC service; its `/metrics`
    /// listens on the next port (so at most 65534). Default 7400.
    #[serde(default = "default_host_port")]
    #[schemars(range(min = 1024, max = 65534))]
    pub host_port: u16,
}

impl Default for Advertise {
    fn default() -> Self {
        Advertise { mode: AdvertiseMode::PodDNS, host_port: default_host_port() }
    }
}

fn default_host_port() -> u16 {
    7400
}

/// The address an agent advertises.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AdvertiseMode {
    /// The pod's DNS name under the farm's headless Service (in-cluster only).
    #[default]
    PodDNS,
    /// The machine's address (`status.hostIP`) and `hostPort`, on the host network.
    HostNetwork,
}

/// An agent's volume: a PersistentVolumeClaim template, or a host path.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.size) != has(self.hostPath)").message("set exactly one of size (a PersistentVolumeClaim) or hostPath"))]
pub struct StorageSpec {
    /// Volume size (e.g. `1Ti`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub size: Option<String>,
    /// Storage class of the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// A host directory instead of a claim (bare metal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub host_path: Option<String>,
}

/// The observed state of a farm.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MiningFarmStatus {
    /// Agents that exist (the scale subresource reads this).
    #[serde(default)]
    pub replicas: i32,
    /// Agents ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the agent pods (the scale subresource reads this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Capacity offered, human readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<String>,
    /// Bytes stored, human readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<String>,
    /// Audit pass rate of the farm's nodes (0–1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_pass_rate: Option<f64>,
    /// Rewards recorded for the farm's nodes.
    #[serde(default)]
    pub earnings: u64,
    /// The ordinal being drained before a scale down, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining: Option<i32>,
    /// Conditions (`Ready`, `Progressing`, `Degraded`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation these facts describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---- NodeSyndication ----

/// Admission of nodes from outside the cluster: edge and bare-metal agents, and the agents of
/// MiningFarms in other clusters that name this cluster's coordinator.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shardfarm.io",
    version = "v1alpha1",
    kind = "NodeSyndication",
    namespaced,
    status = "NodeSyndicationStatus",
    shortname = "sfsyn",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.poolRef"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.admission.mode"}"#,
    printcolumn = r#"{"name":"Admitted","type":"integer","jsonPath":".status.admitted"}"#,
    printcolumn = r#"{"name":"Refused","type":"integer","jsonPath":".status.refused"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeSyndicationSpec {
    /// The StoragePool (in this namespace) members join.
    pub pool_ref: String,
    /// Who is admitted.
    pub admission: SyndicationAdmission,
    /// Nodes listed ahead of time (edge boxes, bare metal); at most 1000.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub static_members: Vec<StaticMember>,
    /// Other clusters whose MiningFarms join this pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_clusters: Vec<RemoteCluster>,
}

/// How nodes are admitted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'AllowList' || size(self.allow) > 0").message("mode AllowList needs at least one node id in allow"))]
pub struct SyndicationAdmission {
    /// `Open` (anyone mined to the difficulty) or `AllowList`.
    pub mode: AdmissionMode,
    /// Least identity difficulty, bits (the pool's, if higher, wins).
    #[schemars(range(min = 8, max = 40))]
    pub min_identity_difficulty: u8,
    /// Node ids (64 lowercase hex digits) admitted in `AllowList` mode.
    #[serde(default)]
    #[schemars(length(max = 1000), inner(length(min = 64, max = 64), pattern(r"^[0-9a-f]{64}$")))]
    pub allow: Vec<String>,
}

/// Admission mode.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[schemars(extend("maxLength" = 16))]
pub enum AdmissionMode {
    /// Any node mined to the difficulty.
    Open,
    /// Only the listed node ids.
    AllowList,
}

/// A node known ahead of time.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StaticMember {
    /// Node id, 64 hex digits.
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("nodeId must be 64 lowercase hex digits"))]
    pub node_id: String,
    /// Proof-of-work difficulty of its identity, bits (as it reports it).
    pub identity_difficulty: u8,
    /// `host:port`.
    pub address: String,
    /// Labels (zone, host, …).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Another cluster whose farms join this pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemoteCluster {
    /// Its name (a failure-domain label of its nodes).
    pub name: String,
    /// `host:port` its agents reach this coordinator on. Its agents pin the pool id
    /// (`StoragePool.status.poolId`) and the coordinator proves the pool key in the TLS
    /// handshake, so no certificate authority is involved (there is no `caSecret`).
    pub coordinator_endpoint: String,
}

/// The observed state of a syndication.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSyndicationStatus {
    /// Members and their state.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// Members admitted.
    #[serde(default)]
    pub admitted: u32,
    /// Members refused.
    #[serde(default)]
    pub refused: u32,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation these facts describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One member's state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Node id.
    pub node_id: String,
    /// Cluster it comes from (`local` for static members).
    pub cluster: String,
    /// `admitted`, `refused`, `suspended`, `disqualified`.
    pub state: String,
    /// Why, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Last report, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report: Option<String>,
}

// ---- ShardPlacement ----

/// The pool's layout: computed and published by the operator.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shardfarm.io",
    version = "v1alpha1",
    kind = "ShardPlacement",
    namespaced,
    status = "ShardPlacementStatus",
    shortname = "sfplace",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.poolRef"}"#,
    printcolumn = r#"{"name":"Version","type":"integer","jsonPath":".status.layoutVersion"}"#,
    printcolumn = r#"{"name":"Balance","type":"number","jsonPath":".status.balance"}"#,
    printcolumn = r#"{"name":"Moved","type":"integer","jsonPath":".status.movedAssignments"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ShardPlacementSpec {
    /// The StoragePool this places.
    pub pool_ref: String,
    /// Partitions (the pool's).
    #[schemars(range(min = 1, max = 1_048_576))]
    pub partitions: u32,
    /// Most rebalancing moves per round (vacated slots are always re-placed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_moves_per_round: Option<u32>,
    /// Node ids (64 lowercase hex digits) to drain: the coordinator re-places their slots and
    /// they hand their shards away. Removing an id undoes its drain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(min = 64, max = 64), pattern(r"^[0-9a-f]{64}$")))]
    pub drain: Vec<String>,
}

/// The observed state of a placement.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShardPlacementStatus {
    /// Layout version.
    #[serde(default)]
    pub layout_version: u64,
    /// Max node load / capacity-weighted mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<f64>,
    /// Slots moved by the last change.
    #[serde(default)]
    pub moved_assignments: u64,
    /// Fraction of holders synced to the layout (0–1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_progress: Option<f64>,
    /// ConfigMap holding the layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout_config_map: Option<String>,
    /// Node ids this placement's drain list has drained (so removing one undoes its drain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drained: Vec<String>,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The generation these facts describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

// ---- StorageNode ----

/// One member of a pool, as its coordinator sees it: written by the operator (at most every
/// 30 s, only when something changed) so `kubectl get sfnode` lists the nodes with their
/// standing. Read-only for users: the coordinator is the truth, this is its view.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "shardfarm.io",
    version = "v1alpha1",
    kind = "StorageNode",
    namespaced,
    status = "StorageNodeStatus",
    shortname = "sfnode",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.poolRef"}"#,
    printcolumn = r#"{"name":"Farm","type":"string","jsonPath":".status.farm"}"#,
    printcolumn = r#"{"name":"Domain","type":"string","jsonPath":".status.domain"}"#,
    printcolumn = r#"{"name":"Standing","type":"string","jsonPath":".status.standing"}"#,
    printcolumn = r#"{"name":"Up","type":"boolean","jsonPath":".status.up"}"#,
    printcolumn = r#"{"name":"Reputation","type":"number","jsonPath":".status.auditScore"}"#,
    printcolumn = r#"{"name":"Capacity","type":"string","jsonPath":".status.capacity"}"#,
    printcolumn = r#"{"name":"Slots","type":"integer","jsonPath":".status.slots"}"#,
    printcolumn = r#"{"name":"Earnings","type":"integer","jsonPath":".status.earnings"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StorageNodeSpec {
    /// The pool it is a member of.
    #[schemars(length(max = 253))]
    pub pool_ref: String,
    /// Its node id, 64 hex digits.
    #[schemars(length(min = 64, max = 64), pattern(r"^[0-9a-f]{64}$"))]
    pub node_id: String,
}

/// A member's standing, as the coordinator last saw it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageNodeStatus {
    /// Its farm (or, for an outsider, its failure domain).
    #[serde(default)]
    pub farm: String,
    /// Its failure domain, as the pool assigned it.
    #[serde(default)]
    pub domain: String,
    /// Where the domain came from: `farm <key>`, `syndication` or `owner root`.
    #[serde(default)]
    pub domain_from: String,
    /// `active`, `suspended` or `disqualified`.
    #[serde(default)]
    pub standing: String,
    /// Heartbeating within the grace period.
    #[serde(default)]
    pub up: bool,
    /// Being drained (its slots are re-placed).
    #[serde(default)]
    pub draining: bool,
    /// Repaired for the current layout, and checked.
    #[serde(default)]
    pub in_sync: bool,
    /// Beta audit score (0–1).
    #[serde(default)]
    pub audit_score: f64,
    /// 7-day uptime (0–1).
    #[serde(default)]
    pub uptime: f64,
    /// Audits passed and failed.
    #[serde(default)]
    pub audits_passed: u64,
    /// Audits failed.
    #[serde(default)]
    pub audits_failed: u64,
    /// Space offered.
    #[serde(default)]
    pub capacity: String,
    /// Space used.
    #[serde(default)]
    pub used: String,
    /// Slots it holds in the current layout.
    #[serde(default)]
    pub slots: u64,
    /// RW1 + RW2 recorded in the ledger.
    #[serde(default)]
    pub earnings: u64,
    /// Its last heartbeat (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

// ---- Generation ----

/// Every CRD with the file name `crdgen` writes it to.
pub fn all() -> Vec<(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
)> {
    vec![
        ("storagepools.yaml", openapi_formats(StoragePool::crd())),
        ("miningfarms.yaml", openapi_formats(MiningFarm::crd())),
        ("nodesyndications.yaml", openapi_formats(NodeSyndication::crd())),
        ("shardplacements.yaml", openapi_formats(ShardPlacement::crd())),
        ("storagenodes.yaml", openapi_formats(StorageNode::crd())),
    ]
}

/// Integer formats OpenAPI and the API server know. schemars names Rust's unsigned types
/// (`uint8` … `uint64`), which kube-apiserver warns about as `unrecognized format`; they become
/// `int32` (8/16 bits) or `int64` (32/64 bits), with the `minimum: 0` schemars already sets.
pub const KNOWN_FORMATS: [&str; 9] =
    ["int32", "int64", "float", "double", "byte", "binary", "date", "date-time", "password"];

fn openapi_formats(
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::String(f)) = map.get_mut("format") {
                    let mapped = match f.as_str() {
                        "uint8" | "uint16" | "int8" | "int16" => Some("int32"),
                        "uint32" | "uint64" | "uint" | "int" => Some("int64"),
                        _ => None,
                    };
                    if let Some(m) = mapped {
                        *f = m.to_string();
                    }
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let mut v = serde_json::to_value(&crd).expect("serialisable");
    walk(&mut v);
    serde_json::from_value(v).expect("same shape")
}

/// The YAML of one CRD, as committed.
pub fn to_yaml(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> String {
    format!(
        "# Generated by `cargo run --bin crdgen` from crds/src/lib.rs: do not edit.\n{}",
        serde_yaml::to_string(crd).expect("serialisable")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_is_one_the_api_server_knows() {
        fn formats(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::String(f)) = m.get("format") {
                        out.push(f.clone());
                    }
                    m.values().for_each(|x| formats(x, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| formats(x, out)),
                _ => {}
            }
        }
        for (file, crd) in all() {
            let mut found = Vec::new();
            formats(&serde_json::to_value(&crd).unwrap(), &mut found);
            for f in found {
                assert!(KNOWN_FORMATS.contains(&f.as_str()), "{file}: format {f}");
            }
        }
    }

    /// Every string, list and map a CEL rule can touch is bounded, and so is every list or
    /// map a rule sits inside (the API server multiplies a rule's cost by how many times it
    /// may run): unbounded, the rule is refused as over its cost budget.
    #[test]
    fn every_cel_rule_touches_only_bounded_values() {
        use serde_json::Value;
        fn walk(v: &Value, path: &str, inside: Option<&str>, ruled: bool, errs: &mut Vec<String>) {
            let Value::Object(m) = v else { return };
            let has_rule = m.contains_key("x-kubernetes-validations");
            if has_rule && let Some(list) = inside {
                errs.push(format!("rule at {path} runs once per item of unbounded {list}"));
            }
            let ruled = ruled || has_rule;
            let ty = m.get("type").and_then(Value::as_str);
            let map = matches!(m.get("additionalProperties"), Some(Value::Object(_)));
            if ruled {
                let need = match ty {
                    Some("string") => Some("maxLength"),
                    Some("array") => Some("maxItems"),
                    Some("object") if map => Some("maxProperties"),
                    _ => None,
                };
                if let Some(need) = need
                    && !m.contains_key(need)
                {
                    errs.push(format!("{path} is touched by a rule but has no {need}"));
                }
            }
            if let Some(Value::Object(props)) = m.get("properties") {
                for (k, child) in props {
                    walk(child, &format!("{path}.{k}"), inside, ruled, errs);
                }
            }
            if let Some(items) = m.get("items") {
                let bounded = m.contains_key("maxItems");
                let here = format!("{path}[]");
                walk(items, &here, if bounded { inside } else { Some(path) }, ruled, errs);
            }
            if let Some(add @ Value::Object(_)) = m.get("additionalProperties") {
                let bounded = m.contains_key("maxProperties");
                let here = format!("{path}{{}}");
                walk(add, &here, if bounded { inside } else { Some(path) }, ruled, errs);
            }
        }
        let mut errs = Vec::new();
        for (file, crd) in all() {
            for v in &crd.spec.versions {
                let schema = serde_json::to_value(&v.schema).unwrap();
                walk(&schema["openAPIV3Schema"], file, None, false, &mut errs);
            }
        }
        assert!(errs.is_empty(), "{}", errs.join("\n"));
    }

    #[test]
    fn committed_yaml_matches_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for (file, crd) in all() {
            for copy in [dir.join(file), dir.join("../charts/shardfarm/crds").join(file)] {
                let committed = std::fs::read_to_string(&copy).unwrap_or_default();
                assert!(
                    committed == to_yaml(&crd),
                    "{} differs from what the types generate: run `cargo run --bin crdgen`",
                    copy.display()
                );
            }
        }
    }

    #[test]
    fn scale_and_status_subresources_and_cel_rules_are_there() {
        let farm = serde_json::to_value(MiningFarm::crd()).unwrap();
        let v = &farm["spec"]["versions"][0];
        assert_eq!(v["subresources"]["scale"]["specReplicasPath"], ".spec.replicas");
        assert_eq!(v["subresources"]["scale"]["statusReplicasPath"], ".status.replicas");
        assert!(v["subresources"]["status"].is_object());
        let text = serde_json::to_string(&StoragePool::crd()).unwrap();
        assert!(text.contains("dataShards + parityShards must be at most 255"));
        assert!(text.contains("pma + pmb must be at most 1"));
        let text = serde_json::to_string(&MiningFarm::crd()).unwrap();
        assert!(text.contains("set exactly one of name"));
    }
}
