//! The S3 gateway: an S3-compatible endpoint over a pool, on the `s3s` crate (the S3
//! protocol: types generated from the AWS Smithy model, SigV4 and aws-chunked payloads).
//! `shardfarm gateway` parses its arguments into a [`Config`] and calls [`run`].
//!
//! Each S3 access key maps to a client identity of its own: what a user uploads is signed by
//! that identity, so only that user can delete it, at the gateway and at every node. The
//! namespace (buckets, keys → capabilities, sizes, ETags, metadata) lives in an embedded
//! index and, durably, in the pool as a log signed by the gateway's root key
//! ([`namespace`]). One gateway per root key: two writers would fork the log.
//!
//! Where things are:
//! - [`namespace`]: the index and the log (entries, group commit, conditional changes, the
//!   rebuild from the pool);
//! - `service`: the gateway's state and what every operation shares (locks, storing and
//!   streaming bytes, commits), and the `S3` trait, each operation one call into its area:
//! - `buckets`, `objects`, `listing`, `multipart`: the S3 operations by area;
//! - [`collector`]: deletes data no log entry references (what a crash left);
//! - `auth`: the users file, SigV4 secrets, presigned-URL limits;
//! - `server`: the HTTP front (request ids, chunked PUTs, graceful shutdown).

#![warn(missing_docs)]

mod auth;
mod buckets;
pub mod collector;
mod listing;
mod multipart;
pub mod namespace;
mod objects;
mod server;
mod service;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use shardfarm_client::{ClientIdentity, PoolClient, PoolProfile, Silent};

/// How often completed multipart uploads older than their retention are forgotten (an hour:
/// they are ~200 bytes each, and the retention is a day).
const FORGET_INTERVAL: Duration = Duration::from_secs(3600);

/// How long in-flight requests may finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// What the gateway runs with (the CLI's `shardfarm gateway` arguments, resolved).
pub struct Config {
    /// Address to serve S3 on.
    pub listen: SocketAddr,
    /// Directory of the gateway's index (RocksDB) and spool files.
    pub data: PathBuf,
    /// The pool.
    pub profile: PoolProfile,
    /// The gateway's root identity: it signs the namespace log and its key derives where the
    /// log lives.
    pub root: ClientIdentity,
    /// The users file's text (TOML: `[[users]]` with access_key, secret_key or secret_key_env,
    /// and identity_file or identity_env).
    pub users: String,
    /// How many log entries apart namespace snapshots are written
    /// ([`namespace::SNAPSHOT_EVERY`] by default).
    pub snapshot_every: u64,
    /// How old data no log entry references must be before the collector deletes it
    /// ([`collector::COLLECT_GRACE`] by default).
    pub collect_grace: Duration,
}

/// Runs the gateway until SIGTERM/SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let Config { listen, data, profile, root, users, snapshot_every, collect_grace } = config;
    let root = PoolClient::connect(profile.clone(), &root, Arc::new(Silent))
        .await
        .context("opening the pool with the root key")?;
    let users = auth::load_users(&users, &profile).await?;

    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let index = Arc::new(namespace::Index::open(&data.join("index"))?);
    let store: Arc<dyn namespace::LogStore> = Arc::new(namespace::PoolLog(root));
    let before = index.next_seq()?;
    let report = namespace::catch_up(&*store, &index).await?;
    tracing::info!(
        entries = report.entries,
        snapshot = ?report.snapshot.map(|(seq, _)| seq),
        snapshot_records = report.snapshot.map_or(0, |(_, n)| n),
        probes = report.probes,
        from = before,
        next = index.next_seq()?,
        "namespace index is up to date with the pool's log"
    );
    // Completed multipart uploads are remembered for retried Completes, then forgotten.
    let forgetting = index.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(FORGET_INTERVAL);
        loop {
            every.tick().await;
            let idx = forgetting.clone();
            match tokio::task::spawn_blocking(move || idx.forget_completed_uploads()).await {
                Ok(Ok(n)) if n > 0 => tracing::info!(n, "forgot old completed uploads"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not forget completed uploads"),
                _ => {}
            }
        }
    });
    let log = namespace::Log::start(store, index.clone(), snapshot_every);
    let spool = data.join("spool");
    std::fs::create_dir_all(&spool)?;
    let writing = service::InFlight::default();
    let clients = users.iter().map(|(k, u)| (k.clone(), u.client.clone())).collect();
    collector::start(index.clone(), writing.clone(), clients, collect_grace);
    let gateway = service::Gateway::new(users, index, log, spool, writing);
    server::serve(gateway, listen, SHUTDOWN_GRACE).await
}
