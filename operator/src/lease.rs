//! Leader election over a `coordination.k8s.io` Lease.
//!
//! One replica leads (runs the coordinator and the controllers); the others wait. The leader
//! renews every [`RENEW_EVERY`]. A renewal that fails for a transient reason (the API server
//! restarting, a timeout) is retried: leadership is only given up when someone else holds the
//! Lease, or when no renewal has succeeded for long enough that the Lease may have expired in
//! others' eyes ([`verdict`]); an attempt that gets no answer is cut off when that time is up.
//! On shutdown the leader releases the Lease, so the next replica takes over at once instead of
//! waiting for expiry. Expiry of another's Lease is judged on this replica's clock against the
//! renewal time the holder wrote (as the coordination API defines it), so replicas' clocks
//! must agree to within the 3 s margin.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use tokio_util::sync::CancellationToken;

/// How long a Lease lasts without renewal, seconds.
pub const LEASE_SECONDS: i32 = 15;
/// The leader renews this often.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// A failed renewal is retried this soon.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Leadership is given up this long before the Lease would expire without a renewal: the
/// process must stop acting before another replica may start.
const SAFETY: Duration = Duration::from_secs(3);

/// How long after its last renewal a leader may still act: the Lease's duration less the
/// safety margin.
fn lease_deadline() -> Duration {
    Duration::from_secs(LEASE_SECONDS as u64).saturating_sub(SAFETY)
}

/// What the leader does after a renewal attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Renewed: wait for the next renewal.
    Keep,
    /// The attempt failed, but the Lease cannot have expired yet: try again soon.
    Retry,
    /// Someone else holds the Lease, or it may have expired: stop leading.
    Lost,
}

/// The verdict on a renewal attempt made `since_renewed` after the last successful one:
/// `Ok(true)` renewed, `Ok(false)` held by another, `Err` the API could not be asked.
pub fn verdict<E>(attempt: &Result<bool, E>, since_renewed: Duration) -> Verdict {
    let deadline = lease_deadline();
    match attempt {
        Ok(true) => Verdict::Keep,
        Ok(false) => Verdict::Lost,
        Err(_) if since_renewed < deadline => Verdict::Retry,
        Err(_) => Verdict::Lost,
    }
}

/// One replica's claim on the Lease `name`.
#[derive(Clone)]
pub struct Leadership {
    api: Api<Lease>,
    name: String,
    holder: String,
}

impl Leadership {
    /// The replica `holder` contending for the Lease `name` through `api`.
    pub fn new(api: Api<Lease>, name: &str, holder: &str) -> Self {
        Leadership { api, name: name.into(), holder: holder.into() }
    }

    /// Waits until this replica leads (true) or `stop` (false). API errors are retried.
    pub async fn acquire(&self, stop: &CancellationToken) -> bool {
        loop {
            let attempt = tokio::time::timeout(RENEW_EVERY, self.try_acquire()).await;
            match attempt.unwrap_or_else(|_| Ok(false)) {
                Ok(true) => {
                    tracing::info!(lease = %self.name, holder = %self.holder, "leading");
                    return true;
                }
                Ok(false) => tracing::info!(lease = %self.name, "another replica leads; waiting"),
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot read the lease; retrying")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(RENEW_EVERY) => {}
            }
        }
    }

    /// Renews the Lease until `stop`; cancels `stop` when leadership is lost.
    pub fn keep(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut renewed = tokio::time::Instant::now();
            let mut wait = RENEW_EVERY;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                // An API server that never answers must not hold leadership past the point
                // where others may take it: the attempt gets the time left, no more.
                let left = lease_deadline().saturating_sub(renewed.elapsed()).max(RETRY_EVERY);
                let attempt = match tokio::time::timeout(left, me.try_acquire()).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {left:?}")),
                };
                match verdict(&attempt, renewed.elapsed()) {
                    Verdict::Keep => {
                        renewed = tokio::time::Instant::now();
                        wait = RENEW_EVERY;
                    }
                    Verdict::Retry => {
                        if let Err(e) = &attempt {
                            tracing::warn!(lease = %me.name, error = %e, "renewing the lease failed; retrying");
                        }
                        wait = RETRY_EVERY;
                    }
                    Verdict::Lost => {
                        tracing::error!(lease = %me.name, "lost the leader lease; stopping");
                        stop.cancel();
                        return;
                    }
                }
            }
        })
    }

    /// Gives the Lease up if this replica holds it (on shutdown): the next replica need not
    /// wait for it to expire.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else { return };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.holder.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.name, "released the leader lease"),
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "could not release the lease; it expires on its own")
            }
        }
    }

    /// Takes or renews the Lease if it is free, expired or ours (optimistic concurrency: a
    /// replace with the resourceVersion read fails if someone else wrote in between).
    async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let now = k8s_openapi::jiff::Timestamp::now();
        let spec = |transitions: i32| LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(LEASE_SECONDS),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        match self.api.get_opt(&self.name).await? {
            None => {
                let mut lease = Lease::default();
                lease.metadata.name = Some(self.name.clone());
                lease.spec = Some(spec(0));
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(mut lease) => {
                let cur = lease.spec.clone().unwrap_or_default();
                let ours = cur.holder_identity.as_deref() == Some(self.holder.as_str());
                let free = cur.holder_identity.is_none();
                let expired = cur.renew_time.as_ref().is_none_or(|t| {
                    let age = now.duration_since(t.0).as_secs();
                    age > i64::from(cur.lease_duration_seconds.unwrap_or(LEASE_SECONDS))
                });
                if !ours && !free && !expired {
                    return Ok(false);
                }
                let transitions = cur.lease_transitions.unwrap_or(0) + i32::from(!ours);
                lease.spec = Some(spec(transitions));
                match self.api.replace(&self.name, &PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    // Someone else wrote first.
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{NS, expect, serve};
    use http::Method;
    use kube::Client;
    use serde_json::json;
    use tower_test::mock;

    #[test]
    fn transient_failures_are_retried_until_the_lease_could_have_expired() {
        let err: Result<bool, ()> = Err(());
        assert_eq!(verdict(&Ok::<_, ()>(true), Duration::from_secs(30)), Verdict::Keep);
        assert_eq!(verdict(&Ok::<_, ()>(false), Duration::ZERO), Verdict::Lost);
        assert_eq!(verdict(&err, Duration::from_secs(1)), Verdict::Retry);
        assert_eq!(verdict(&err, Duration::from_secs(11)), Verdict::Retry);
        assert_eq!(verdict(&err, Duration::from_secs(12)), Verdict::Lost);
        assert_eq!(verdict(&err, Duration::from_secs(60)), Verdict::Lost);
    }

    fn lease(holder: Option<&str>, renewed_secs_ago: i64) -> serde_json::Value {
        let t = k8s_openapi::jiff::Timestamp::now()
            - k8s_openapi::jiff::SignedDuration::from_secs(renewed_secs_ago);
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": "op", "namespace": NS, "resourceVersion": "7" },
            "spec": { "holderIdentity": holder, "leaseDurationSeconds": LEASE_SECONDS,
                      "renewTime": t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "leaseTransitions": 2 },
        })
    }

    fn leadership() -> (
        Leadership,
        mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>,
    ) {
        let (svc, handle) = mock::pair();
        let api = Api::namespaced(Client::new(svc, NS), NS);
        (Leadership::new(api, "op", "me"), handle)
    }

    fn path() -> String {
        format!("/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/op")
    }

    #[tokio::test]
    async fn a_held_lease_is_waited_for_and_an_expired_or_released_one_taken() {
        let (l, handle) = leadership();
        let server = serve(
            handle,
            vec![
                expect(Method::GET, path()).reply(lease(Some("other"), 1)),
                expect(Method::GET, path()).reply(lease(None, 1)),
                expect(Method::PUT, path()).body(|b| {
                    assert_eq!(b["spec"]["holderIdentity"], "me");
                    assert_eq!(b["spec"]["leaseTransitions"], 3);
                }),
                expect(Method::GET, path()).reply(lease(Some("other"), 60)),
                expect(Method::PUT, path()).body(|b| assert_eq!(b["spec"]["holderIdentity"], "me")),
            ],
        );
        assert!(!l.try_acquire().await.unwrap(), "held and fresh");
        assert!(l.try_acquire().await.unwrap(), "released");
        assert!(l.try_acquire().await.unwrap(), "expired");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_releases_the_lease_only_if_ours() {
        let (l, handle) = leadership();
        let server = serve(
            handle,
            vec![
                expect(Method::GET, path()).reply(lease(Some("me"), 1)),
                expect(Method::PUT, path()).body(|b| {
                    assert!(b["spec"]["holderIdentity"].is_null(), "{b}");
                    assert!(b["spec"]["renewTime"].is_null(), "{b}");
                }),
                expect(Method::GET, path()).reply(lease(Some("other"), 1)),
            ],
        );
        l.release().await;
        // Taken over meanwhile: nothing to release, nothing written.
        l.release().await;
        server.await.unwrap();
    }
}
