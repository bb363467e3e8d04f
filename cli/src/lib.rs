//! The `shardfarm` command: argument parsing, output and exit codes over the client library
//! (put, get, stat, rm, nodes), `local up` (a farm of supervised processes), and the
//! subcommands that run the agent, a standalone coordinator and the operator. One binary.

#![warn(missing_docs)]

pub mod coordinator;
pub mod local;
pub mod progress;
