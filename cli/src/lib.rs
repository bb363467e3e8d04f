//! The `shardfarm` command: the client (put, get, stat, rm, nodes), `local up`, and the agent.

#![warn(missing_docs)]

pub mod client;
pub mod farm;
pub mod local;
