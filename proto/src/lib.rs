//! The wire protocol of Shardfarm, in one place: the `.proto` files and their generated code
//! ([`pb`]), the signed request envelope ([`envelope`]), proto ↔ domain conversions
//! ([`convert`], and the published layout in [`coordinator`]), the signing clients every
//! party dials with ([`client::AgentClient`], [`coordinator::CoordinatorClient`]), and the
//! transport security of every hop ([`tls`]: TLS 1.3 bound to identity keys).
//!
//! Servers live with their domain (the agent in `shardfarm-agent`, the coordinator in
//! `shardfarm-coordinator`); what both sides of a hop must agree on lives here.

#![warn(missing_docs)]

pub mod client;
pub mod conns;
pub mod convert;
pub mod coordinator;
pub mod envelope;
pub mod signed_body;
pub mod tls;

/// Generated protocol types (`shardfarm.v1`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("shardfarm.v1");
}

pub use client::{AgentClient, Signer, TombstonePage};
pub use coordinator::{
    CoordinatorClient, LayoutGuard, LayoutRefusal, PublishedLayout, verify_layout,
};
pub use envelope::{auth_status, keys, methods, sign_into, verify_request};
pub use signed_body::{FirstMessageHash, HashFirstMessage};
pub use tls::{PeerInfo, Security};
