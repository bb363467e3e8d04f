//! The Shardfarm client library: what a program uses to store and read objects on a pool.
//!
//! - [`farm`]: the pool profile a client opens (today the local farm's directory: nodes,
//!   layout, the user's delegated key);
//! - [`pool`]: [`FarmClient`] — put (streaming from a file), get (streaming into a writer or
//!   a file that appears only when complete), stat, rm, nodes.
//!
//! It prints nothing and never exits the process: long work is reported through a
//! [`Progress`] the caller supplies, errors are returned. The `shardfarm` CLI and the S3
//! gateway are its users.

#![warn(missing_docs)]

pub mod farm;
pub mod pool;

pub use pool::{FarmClient, NodeStatus, ObjectStat, Progress, SegmentStat, Silent};
