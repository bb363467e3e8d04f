//! The Shardfarm client library: what a program uses to store and read objects on a pool.
//!
//! - [`profile`]: a pool profile — the coordinator's address and the pinned pool key id;
//! - [`identity`]: what a client signs with — a mined identity or a delegated key;
//! - [`pool`]: [`PoolClient`] — opens a pool from a profile (reads the pool's settings and
//!   its signed layout from the coordinator, follows later layouts), then put (streaming from
//!   any reader), get (whole or a byte range, streaming into a writer or a file that appears
//!   only when complete), stat, rm, nodes;
//! - [`farm`]: the local farm's own bookkeeping (`shardfarm local up`'s directory).
//!
//! It prints nothing and never exits the process: long work is reported through a
//! [`Progress`] the caller supplies, errors are returned. The `shardfarm` CLI and the S3
//! gateway are its users.

#![warn(missing_docs)]

pub mod farm;
pub mod identity;
pub mod pool;
pub mod profile;

pub use identity::{ClientIdentity, ClientKey};
pub use pool::{NodeStatus, ObjectStat, PoolClient, PoolView, Progress, SegmentStat, Silent};
pub use profile::PoolProfile;
