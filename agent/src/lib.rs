//! The Shardfarm node agent: a gRPC shard server over a durable store that answers signed
//! requests only.
//!
//! Layers, lowest first (nothing depends upward): [`store`] (RocksDB + payload files, no tonic
//! types) ← [`shard`] (the domain: uploads, reads, deletes, audits, capacity, policy) ←
//! [`grpc`] (proto conversions and the one error → status mapping) ← [`run`] (wiring). The
//! [`scrub`] worker and the [`http`] endpoint sit beside `grpc` on top of the domain.

#![warn(missing_docs)]

pub mod config;
pub mod grpc;
pub mod http;
pub mod layouts;
pub mod metrics;
pub mod repair;
pub mod run;
pub mod scrub;
pub mod shard;
pub mod store;

pub use config::AgentArgs;
