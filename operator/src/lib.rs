//! The Shardfarm operator: kube-rs controllers and the `shardfarm operator` process.
//!
//! - [`api_rules`]: what kube-apiserver refuses, which the tests' API servers enforce;
//! - [`controller`]: the Kubernetes reconcilers (StoragePool, MiningFarm, NodeSyndication,
//!   ShardPlacement) over a [`controller::Fabric`];
//! - [`fabric`]: the fabric the controllers see, backed by the pool's coordinator
//!   (`shardfarm-coordinator`, which this crate runs but does not contain);
//! - [`health`]: `/healthz`, `/readyz` (leading, controllers and the hosted pools' coordinators
//!   running, those pools still there) and `/metrics`;
//! - [`lease`]: leader election that tolerates transient API errors and releases on exit;
//! - [`nodes`]: one `StorageNode` object per member, for `kubectl get sfnode`;
//! - [`pod_security`]: the Pod Security level the farms' pods need, against their namespace's;
//! - [`pool_key`]: the pool key in a Secret created once and never overwritten;
//! - [`state_store`]: the coordinator's state and ledger in a ConfigMap, so any replica leads;
//! - [`run`]: CRD check, leader election, the coordinator's server, the controllers.

#![warn(missing_docs)]

pub mod api_rules;
pub mod controller;
pub mod fabric;
pub mod health;
pub mod lease;
pub mod nodes;
pub mod pod_security;
pub mod pool_key;
pub mod run;
pub mod state_store;
