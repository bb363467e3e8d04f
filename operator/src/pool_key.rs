//! The pool key in a cluster: a Secret the operator creates once and never overwrites.
//!
//! The pool key signs every layout and is what every agent, client and remote farm pins, so it
//! must outlive the operator's pod, its volume and any replica that starts next. The Secret
//! `shardfarm-pool-key-<pool>` is created `immutable` (the API server itself refuses to change
//! it); if two replicas race to create it, the loser reads the winner's. An operator upgraded
//! from one that kept the key only in its state volume moves that key into the Secret, so the
//! pool id does not change.
//!
//! Each MiningFarm of a local pool has a farm key kept the same way
//! (`shardfarm-farm-key-<farm>`, owned by the farm): its agents present grants signed by it,
//! which is how the coordinator tells the owner's own agents from outsiders (see
//! `shardfarm_core::grant`).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use shardfarm_core::identity::Identity;

/// The Secret's data key holding the identity text.
pub const DATA_KEY: &str = "identity";
/// Annotation naming the pool id on the Secret (public: the id, never the key). An
/// annotation, not a label: the id is 64 hex digits and a label value holds at most 63.
pub const POOL_ID_ANNOTATION: &str = "shardfarm.io/pool-id";

/// The name of the Secret holding `pool`'s key.
pub fn secret_name(pool: &str) -> String {
    format!("shardfarm-pool-key-{pool}")
}

/// The name of the Secret holding the key of farm `farm`.
pub fn farm_secret_name(farm: &str) -> String {
    format!("shardfarm-farm-key-{farm}")
}

/// The Secret for `identity`, immutable.
pub fn secret(pool: &str, identity: &Identity) -> Secret {
    let mut s = key_secret(
        secret_name(pool),
        BTreeMap::from([("shardfarm.io/pool".to_string(), crate::api_rules::label_value(pool))]),
        identity,
    );
    s.metadata.annotations =
        Some(BTreeMap::from([(POOL_ID_ANNOTATION.to_string(), identity.id().to_hex())]));
    s
}

fn key_secret(name: String, labels: BTreeMap<String, String>, identity: &Identity) -> Secret {
    let mut labels = labels;
    labels.insert("app.kubernetes.io/managed-by".to_string(), "shardfarm-operator".to_string());
    Secret {
        metadata: ObjectMeta { name: Some(name), labels: Some(labels), ..Default::default() },
        immutable: Some(true),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            DATA_KEY.to_string(),
            ByteString(identity.to_text().into_bytes()),
        )])),
        ..Default::default()
    }
}

/// The identity a key Secret holds.
pub fn parse(s: &Secret) -> anyhow::Result<Identity> {
    let name = s.metadata.name.clone().unwrap_or_default();
    let data = s.data.as_ref().and_then(|d| d.get(DATA_KEY)).with_context(|| {
        format!("Secret {name} has no `{DATA_KEY}` entry: restore it from a backup of the pool key")
    })?;
    let text = std::str::from_utf8(&data.0).with_context(|| format!("Secret {name}: not text"))?;
    Ok(Identity::from_text(text, &format!("Secret {name}"))?)
}

/// The pool key: read from its Secret, or, the first time, taken from `legacy` (a key file an
/// earlier operator kept in its state volume) or mined (`mine`) and stored in a new Secret.
/// Never overwrites a Secret that exists.
pub async fn get_or_create(
    api: &Api<Secret>,
    pool: &str,
    legacy: &Path,
    mine: impl FnOnce() -> anyhow::Result<Identity>,
) -> anyhow::Result<Identity> {
    let name = secret_name(pool);
    if let Some(s) = api.get_opt(&name).await? {
        return parse(&s);
    }
    let identity = if legacy.exists() { Identity::load(legacy)? } else { mine()? };
    create_or_read(api, secret(pool, &identity), identity).await
}

/// The key of farm `farm` (owned by `owner`, the MiningFarm, so it goes with it): read from
/// its Secret, or generated and stored the first time. Farm keys are not mined: the pool lists
/// them by id, so there is nothing to make costly.
pub async fn farm_key(
    api: &Api<Secret>,
    farm: &str,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> anyhow::Result<Identity> {
    let name = farm_secret_name(farm);
    if let Some(s) = api.get_opt(&name).await? {
        return parse(&s);
    }
    let (identity, _) = Identity::generate(0, 1, &|_| {})?;
    let mut s = key_secret(
        name,
        BTreeMap::from([("shardfarm.io/farm".to_string(), crate::api_rules::label_value(farm))]),
        &identity,
    );
    s.metadata.owner_references = Some(vec![owner]);
    create_or_read(api, s, identity).await
}

/// Creates `secret` holding `identity`; if another replica created it first, reads theirs.
async fn create_or_read(
    api: &Api<Secret>,
    secret: Secret,
    identity: Identity,
) -> anyhow::Result<Identity> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = %name, key_id = %identity.id(), "stored a key");
            Ok(identity)
        }
        // Another replica created it first: theirs is the pool key.
        Err(kube::Error::Api(e)) if e.code == 409 => parse(&api.get(&name).await?),
        Err(e) => Err(e).with_context(|| format!("creating Secret {name}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{self, NS, expect};
    use http::Method;
    use kube::Client;
    use tower_test::mock;

    fn identity() -> Identity {
        Identity::from_parts(shardfarm_core::identity::random_signing_key(), 0)
    }

    fn api() -> (
        Api<Secret>,
        mock::Handle<http::Request<kube::client::Body>, http::Response<kube::client::Body>>,
    ) {
        let (svc, handle) = mock::pair();
        (Api::namespaced(Client::new(svc, NS), NS), handle)
    }

    fn path(name: &str) -> String {
        format!("/api/v1/namespaces/{NS}/secrets/{name}")
    }

    fn never() -> anyhow::Result<Identity> {
        panic!("nothing may be mined when the Secret exists")
    }

    #[tokio::test]
    async fn an_existing_secret_is_read_and_never_written() {
        let key = identity();
        let (api, handle) = api();
        let stored = serde_json::to_value(secret("main", &key)).unwrap();
        let script = vec![expect(Method::GET, path("shardfarm-pool-key-main")).reply(stored)];
        let dir = tempfile::tempdir().unwrap();
        let got = fixtures::run(
            handle,
            script,
            get_or_create(&api, "main", &dir.path().join("coordinator.key"), never),
        )
        .await
        .unwrap();
        assert_eq!(got.id(), key.id());
    }

    #[tokio::test]
    async fn the_first_start_creates_an_immutable_secret_from_the_legacy_key() {
        let key = identity();
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("coordinator.key");
        key.save(&legacy).unwrap();
        let (api, handle) = api();
        let id = key.id().to_hex();
        let script = vec![
            expect(Method::GET, path("shardfarm-pool-key-main")).not_found(),
            expect(Method::POST, format!("/api/v1/namespaces/{NS}/secrets")).body(move |b| {
                assert_eq!(b["immutable"], true, "{b}");
                assert_eq!(b["metadata"]["name"], "shardfarm-pool-key-main");
                assert_eq!(b["metadata"]["annotations"][POOL_ID_ANNOTATION], id.as_str());
                // No label holds it: a label value is at most 63 characters.
                assert!(!b["metadata"]["labels"].to_string().contains(id.as_str()), "{b}");
                assert!(b["data"][DATA_KEY].is_string(), "{b}");
            }),
        ];
        let got = fixtures::run(handle, script, get_or_create(&api, "main", &legacy, never))
            .await
            .unwrap();
        assert_eq!(got.id(), key.id());
    }

    /// Issue 28: the real API server refused the pool key's Secret (the 64-hex pool id as a
    /// label value) and the operator crash-looped. The tests' API server refuses it the same
    /// way now, and takes the Secret the operator writes.
    #[tokio::test]
    async fn the_api_server_refuses_a_64_hex_label_and_takes_the_secret_written_now() {
        let key = identity();
        let id = key.id().to_hex();
        let mut before = secret("main", &key);
        before.metadata.labels.as_mut().unwrap().insert("shardfarm.io/pool-id".into(), id.clone());
        let (first, handle) = api();
        let script = vec![expect(Method::POST, format!("/api/v1/namespaces/{NS}/secrets"))];
        let err = fixtures::run(handle, script, first.create(&PostParams::default(), &before))
            .await
            .unwrap_err();
        let kube::Error::Api(status) = err else { panic!("{err}") };
        assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
        assert_eq!(
            status.message,
            format!(
                "Secret \"shardfarm-pool-key-main\" is invalid: metadata.labels: Invalid value: \
                 \"{id}\": must be no more than 63 bytes"
            )
        );
        let (again, handle) = api();
        let script = vec![expect(Method::POST, format!("/api/v1/namespaces/{NS}/secrets"))];
        fixtures::run(handle, script, again.create(&PostParams::default(), &secret("main", &key)))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_replica_that_loses_the_race_takes_the_winners_key() {
        let (mine, theirs) = (identity(), identity());
        let (api, handle) = api();
        let stored = serde_json::to_value(secret("main", &theirs)).unwrap();
        let script = vec![
            expect(Method::GET, path("shardfarm-pool-key-main")).not_found(),
            expect(Method::POST, format!("/api/v1/namespaces/{NS}/secrets")).conflict(),
            expect(Method::GET, path("shardfarm-pool-key-main")).reply(stored),
        ];
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("coordinator.key");
        let got = fixtures::run(handle, script, get_or_create(&api, "main", &legacy, || Ok(mine)))
            .await
            .unwrap();
        assert_eq!(got.id(), theirs.id());
    }

    #[tokio::test]
    async fn a_secret_without_the_key_is_an_error_not_a_new_key() {
        let (api, handle) = api();
        let mut broken = serde_json::to_value(secret("main", &identity())).unwrap();
        broken["data"] = serde_json::json!({});
        let script = vec![expect(Method::GET, path("shardfarm-pool-key-main")).reply(broken)];
        let dir = tempfile::tempdir().unwrap();
        let err = fixtures::run(
            handle,
            script,
            get_or_create(&api, "main", &dir.path().join("coordinator.key"), never),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no `identity` entry"), "{err}");
    }
}
