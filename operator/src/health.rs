//! What the operator's `/healthz`, `/readyz` and `/metrics` answer.
//!
//! Readiness here routes traffic: the `shardfarm-coordinator` Service selects every operator
//! pod and sends agents and clients to the ready one, so `/readyz` must be true exactly while
//! this replica can do the pool's work, and turn false as soon as it cannot — not stay what it
//! was when the operator started. A replica is ready when all of these hold, checked on every
//! probe:
//!
//! - it leads (holds the Lease) and has started: standbys, a replica still loading its pool
//!   and one stopping are not ready;
//! - every controller it runs is still running (a controller's stream that ended, or its task
//!   that panicked, is not "running");
//! - for every pool whose coordinator it hosts: the StoragePool exists and is not being
//!   deleted, as the controllers' watch cache sees it (a pool uninstalled with Helm leaves no
//!   "ready" behind), and the coordinator's gRPC server and housekeeping are running.
//!
//! `/healthz` is liveness only (the process answers): restarting a replica whose pool is gone
//! or that waits for the Lease would not help, and would only churn the Lease.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use shardfarm_coordinator::Coordinator;
use tokio_util::sync::CancellationToken;

// ---- Public interface ----

/// Whether a hosted pool's StoragePool is there, as the watch cache sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// It exists and is not being deleted.
    Present,
    /// It has a deletion timestamp.
    Deleting,
    /// It does not exist (any more).
    Gone,
    /// The watch has not listed the pools yet.
    Unknown,
}

/// Looks a pool up by name.
pub type PresenceOf = Box<dyn Fn(&str) -> Presence + Send + Sync>;

/// A part of the operator that must run for it to be ready (a controller, a coordinator's
/// server): up from [`Health::component`] until the [`Running`] guard is dropped — when the
/// task that holds it ends, returns or panics.
pub struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// What `/healthz`, `/readyz` and `/metrics` answer, from process start.
#[derive(Default)]
pub struct Health {
    /// Why the operator is not doing its work at all (starting, standby, waiting for its
    /// pool, stopping); empty while it leads and runs.
    phase: Mutex<String>,
    /// The components that must be running, by name.
    components: Mutex<BTreeMap<String, Arc<AtomicBool>>>,
    /// The pools whose coordinators run here, and how to find whether each still exists.
    pools: Mutex<Vec<String>>,
    presence: Mutex<Option<PresenceOf>>,
    /// The pool's coordinator, once it runs (its metrics).
    pub coordinator: OnceLock<Arc<Coordinator>>,
    /// The controllers' metrics.
    pub controllers: prometheus::Registry,
}

impl Health {
    /// Sets why the operator is not doing its work (empty: it leads and runs).
    pub fn phase(&self, why: impl Into<String>) {
        *self.phase.lock().unwrap() = why.into();
    }

    /// Declares a component that must run for the operator to be ready; it is up until the
    /// returned guard is dropped (hold it in the component's task).
    pub fn component(&self, name: impl Into<String>) -> Running {
        let up = Arc::new(AtomicBool::new(true));
        self.components.lock().unwrap().insert(name.into(), up.clone());
        Running(up)
    }

    /// Declares that this operator hosts the coordinator of `pool`.
    pub fn host(&self, pool: &str) {
        self.pools.lock().unwrap().push(pool.to_string());
    }

    /// Sets how to find whether a hosted pool's StoragePool exists.
    pub fn pools_from(&self, presence: PresenceOf) {
        *self.presence.lock().unwrap() = Some(presence);
    }

    /// `Ok` when ready; else every reason it is not.
    pub fn readiness(&self) -> Result<(), String> {
        let phase = self.phase.lock().unwrap().clone();
        if !phase.is_empty() {
            return Err(phase);
        }
        let mut why = Vec::new();
        for (name, up) in self.components.lock().unwrap().iter() {
            if !up.load(Ordering::SeqCst) {
                why.push(format!("{name} has stopped"));
            }
        }
        let presence = self.presence.lock().unwrap();
        for pool in self.pools.lock().unwrap().iter() {
            let p = presence.as_ref().map_or(Presence::Unknown, |f| f(pool));
            match p {
                Presence::Present => {}
                Presence::Deleting => why.push(format!("StoragePool {pool} is being deleted")),
                Presence::Gone => why.push(format!(
                    "StoragePool {pool} is gone: its coordinator serves a pool that no longer \
                     exists"
                )),
                Presence::Unknown => {
                    why.push(format!("waiting for the watch of StoragePool {pool}"))
                }
            }
        }
        if why.is_empty() { Ok(()) } else { Err(why.join("; ")) }
    }
}

/// Serves `/healthz` (alive), `/readyz` ([`Health::readiness`]) and `/metrics` on `listener`
/// until `stop`: liveness probes pass while the operator waits for its pool or for the Lease.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let (h1, h2) = (health.clone(), health);
    let app = axum::Router::new()
        .route("/healthz", get(|| std::future::ready("ok")))
        .route(
            "/readyz",
            get(move || {
                std::future::ready(match h1.readiness() {
                    Ok(()) => (StatusCode::OK, "ok".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                })
            }),
        )
        .route(
            "/metrics",
            get(move || {
                std::future::ready(
                    h2.coordinator.get().map(|c| c.metrics.render()).unwrap_or_default(),
                )
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `GET path` on `addr`: the status code and the body.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out.split(' ').nth(1).unwrap().parse().unwrap();
        (code, out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
    }

    /// The operator's `/readyz` over HTTP as a kubelet probes it: 200 only while it leads,
    /// its controllers and its pool's coordinator run and the pool exists; a pool uninstalled
    /// under it, or a coordinator (or controller) that stopped, is 503 with the reason — it
    /// does not stay what it was at start. `/healthz` stays 200 throughout.
    #[tokio::test]
    async fn readyz_follows_the_pool_and_the_coordinator_not_the_start() {
        let health = Arc::new(Health::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, health.clone(), stop.clone()));

        health.phase("standby: waiting for the Lease shardfarm-operator");
        assert_eq!(get(addr, "/readyz").await.0, 503);
        assert_eq!(get(addr, "/healthz").await.0, 200);

        // Leading, running pool main, whose StoragePool exists.
        let pool = Arc::new(Mutex::new(Presence::Unknown));
        let seen = pool.clone();
        health.pools_from(Box::new(move |name| {
            if name == "main" { *seen.lock().unwrap() } else { Presence::Gone }
        }));
        health.host("main");
        let grpc = health.component("pool main's coordinator gRPC server");
        let controllers = health.component("the StoragePool controller");
        health.phase("");
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!((code, body.contains("watch")), (503, true), "{body}");
        *pool.lock().unwrap() = Presence::Present;
        assert_eq!(get(addr, "/readyz").await, (200, "ok".to_string()));

        // helm uninstall: the pool is deleted, then gone.
        *pool.lock().unwrap() = Presence::Deleting;
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("being deleted"), "{body}");
        *pool.lock().unwrap() = Presence::Gone;
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("StoragePool main is gone"), "{body}");
        assert_eq!(get(addr, "/healthz").await.0, 200);

        // The pool is back, but its coordinator's server stopped.
        *pool.lock().unwrap() = Presence::Present;
        assert_eq!(get(addr, "/readyz").await.0, 200);
        // The server's task returns (say, its listener failed): its guard goes with it.
        tokio::spawn(async move {
            let _up = grpc;
        })
        .await
        .unwrap();
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("gRPC server has stopped"), "{body}");
        drop(controllers);
        let (_, body) = get(addr, "/readyz").await;
        assert!(body.contains("StoragePool controller has stopped"), "{body}");

        stop.cancel();
        server.await.unwrap().unwrap();
    }
}
