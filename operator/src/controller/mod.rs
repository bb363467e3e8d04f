//! The Kubernetes controllers: one reconciler per kind, written as plain async functions over a
//! [`Context`] so tests drive them against a mocked API server (`tower-test`, see `fixtures`).
//!
//! | kind | the reconciler does |
//! |---|---|
//! | `StoragePool` | checks the profile against the farms' failure domains (`Degraded` with the exact reason), owns a `ShardPlacement`, issues its clients' delegated keys into Secrets (`clients`), aggregates status |
//! | `MiningFarm` | a StatefulSet + headless Service + PodDisruptionBudget of agents and the farm key; scale down drains the highest ordinal first, undone on scale-up, held if the profile needs it |
//! | `NodeSyndication` | admits or refuses nodes from outside the cluster; members in status |
//! | `ShardPlacement` | the coordinator's declared input (drain list, moves per round) and the mirror of its layout (ConfigMap + status); the coordinator alone computes layouts |
//!
//! Everything the reconcilers learn about the running fabric (members, slots, sync) comes from
//! a [`Fabric`]: in the operator process it is the pool's coordinator.

pub mod clients;
pub mod farm;
pub mod placement;
pub mod pool;
pub mod syndication;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;

use std::sync::Arc;

/// The in-cluster coordinator Service (the operator creates it) and its port: where agents and
/// in-cluster clients reach the pool.
pub const COORDINATOR_SERVICE: &str = "shardfarm-coordinator";
/// Coordinator gRPC port.
pub const COORDINATOR_PORT: u16 = 7398;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use shardfarm_core::identity::NodeId;
use shardfarm_core::placement::Layout;

use shardfarm_coordinator::Member;

/// Field manager of every server-side apply.
pub const MANAGER: &str = "shardfarm-operator";
/// Finalizer of MiningFarms (their nodes leave the pool before the farm goes).
pub const FARM_FINALIZER: &str = "miningfarms.shardfarm.io/cleanup";

/// Errors of the controllers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] Box<kube::Error>),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// An object is missing something the reconciler needs.
    #[error("{0}")]
    Invalid(String),
    /// A deletion is held until the pool can do without what is deleted (retried).
    #[error("{0}")]
    Held(String),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(Box::new(e))
    }
}

impl Error {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Invalid(_) => "invalid",
            Error::Held(_) => "held",
        }
    }
}

/// Result of the controllers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the reconcilers need to know of, and ask of, the running fabric.
pub trait Fabric: Send + Sync {
    /// Whether this operator's view of `pool` (its members, their state, its layout) may be
    /// acted on by a decision that can lose redundancy: removing a deleted farm's nodes,
    /// draining, shrinking a farm. `Err` says why not yet: the pool's coordinator has not
    /// started in this process (an operator restarted or failed over mines or loads it
    /// first), or it started less than a grace period ago and has not heard from every member
    /// since. Such decisions wait (requeued) rather than read an empty or stale view as the
    /// truth. A pool this operator does not run is `Ok`: it has no members here to lose.
    fn view(&self, pool: &str) -> std::result::Result<(), String>;
    /// The members of `pool`.
    fn members(&self, pool: &str) -> Vec<Member>;
    /// The current layout of `pool`, if any.
    fn layout(&self, pool: &str) -> Option<Layout>;
    /// Shards the nodes of `pool` that are up still have to rebuild, as its coordinator counts
    /// them (`shardfarm_coordinator_degraded_shards`: their reports, and at least a shard per
    /// slot a holder gained and has not proven yet).
    fn degraded_shards(&self, pool: &str) -> u64;
    /// Whether every holder of the current layout has repaired for it.
    fn in_sync(&self, pool: &str) -> bool;
    /// Asks the pool to hand `node`'s slots away (scale down, drain list).
    fn drain(&self, pool: &str, node: NodeId);
    /// Removes `node` from the pool (its farm was deleted).
    fn remove(&self, pool: &str, node: NodeId);
    /// Sets `pool`'s rebalancing moves per layout round (None: the pool's default).
    fn set_max_moves(&self, pool: &str, moves: Option<usize>);
    /// Rewards recorded for `node` (RW1 + RW2).
    fn earnings(&self, pool: &str, node: &NodeId) -> u64;
    /// Sets the admission rules later joins to `pool` must meet.
    fn set_admission(&self, pool: &str, admission: shardfarm_coordinator::Admission);
    /// The owner's farm with key `farm` assigns its agents `labels` in `pool`.
    fn set_farm(
        &self,
        pool: &str,
        farm: NodeId,
        labels: std::collections::BTreeMap<String, String>,
    );
    /// The farm with key `farm` no longer vouches for anyone in `pool`.
    fn remove_farm(&self, pool: &str, farm: &NodeId);
    /// Takes `node` back into `pool` after a drain (a scale-down undone).
    fn undrain(&self, pool: &str, node: NodeId);
    /// The configuration `pool`'s coordinator runs with, once it runs.
    fn config(&self, pool: &str) -> Option<shardfarm_coordinator::PoolConfig>;
    /// The id of `pool`'s key (its coordinator's identity), once its coordinator runs.
    fn pool_id(&self, pool: &str) -> Option<NodeId>;
    /// A delegation by `pool`'s key to `delegate` until `expires` (unix seconds), if this
    /// operator holds that key (it runs the pool's coordinator). The key itself never leaves
    /// the fabric.
    fn delegate(
        &self,
        pool: &str,
        delegate: ed25519_dalek::VerifyingKey,
        expires: u64,
    ) -> Option<shardfarm_core::identity::Delegation>;
}

/// Shared state of the controllers.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// The running fabric.
    pub fabric: Arc<dyn Fabric>,
    /// Reconcile counters.
    pub metrics: Arc<ControllerMetrics>,
}

impl Context {
    /// A context over `client` and `fabric`.
    pub fn new(client: Client, fabric: Arc<dyn Fabric>, metrics: Arc<ControllerMetrics>) -> Self {
        let reporter =
            Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Context { recorder: Recorder::new(client.clone(), reporter), client, fabric, metrics }
    }

    /// Publishes an Event about `obj`.
    pub async fn event<K: kube::Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) -> Result<()> {
        let ev = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        self.recorder.publish(&ev, &obj.object_ref(&())).await?;
        Ok(())
    }
}

/// Reconcile counters per kind and result.
pub struct ControllerMetrics {
    /// `shardfarm_operator_reconciles_total{kind, result}`.
    pub reconciles: prometheus::IntCounterVec,
}

impl ControllerMetrics {
    /// Creates the counters and registers them in `registry`.
    pub fn new(registry: &prometheus::Registry) -> Self {
        let reconciles = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "shardfarm_operator_reconciles_total",
                "Reconciles by kind and result",
            ),
            &["kind", "result"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(reconciles.clone()));
        ControllerMetrics { reconciles }
    }
}

/// Counts a finished reconcile of `kind` and passes its result on.
pub fn counted<T>(ctx: &Context, kind: &str, r: Result<T>) -> Result<T> {
    let result = if r.is_ok() { "ok" } else { "error" };
    ctx.metrics.reconciles.with_label_values(&[kind, result]).inc();
    r
}

/// A condition of `type_` at `generation`, carrying over the transition time when its status
/// did not change (so `lastTransitionTime` means what it says).
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Whether `conditions` has `type_` at `status`.
pub fn has_condition(conditions: &[Condition], type_: &str, status: bool) -> bool {
    let s = if status { "True" } else { "False" };
    conditions.iter().any(|c| c.type_ == type_ && c.status == s)
}
