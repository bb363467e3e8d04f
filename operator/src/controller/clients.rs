//! StoragePool `spec.clients` → one Secret per client holding a key delegated by the pool key,
//! and the ConfigMap that tells in-cluster programs how to reach the pool.
//!
//! A program that stores objects (the S3 gateway, an application) needs an identity the pool
//! accepts. The pool key is mined and held by this operator alone (`pool_key`), so instead of
//! handing it out the operator *delegates*: for each entry of `spec.clients` it makes a fresh
//! ed25519 key, has the pool key sign a `Delegation` for it (`Fabric::delegate`, so the pool
//! key never leaves the fabric) and writes both, in the text `shardfarm_client::farm::ClientKey`
//! saves and loads (`secret = "hex"`, `delegation = "hex"`), into the Secret
//! `shardfarm-client-<pool>-<name>` under `client.key`. A pod takes it as an environment
//! variable (a Secret volume under an fsGroup is group-readable, and key files others can read
//! are refused).
//!
//! The Secret is owned by the StoragePool (it goes with it), labelled with the pool and the
//! client (one list call finds them all) and mutable: when less than a fifth of the key's
//! lifetime is left, or the pool key is no longer the one that signed it (a restored pool), or
//! the entry's `days` shrank below what is left, a new key replaces the old one in place. Pods
//! read environment variables at start, so they must be restarted to pick a new key up (the
//! old key keeps working until it expires, which is why the renewal starts at four fifths).
//! Removing an entry deletes its Secret, but a delegation cannot be recalled: the removed key
//! stays valid until it expires — `days` is the bound on that exposure.
//!
//! Nothing here trusts the object: names are checked again (pattern, length, duplicates, count)
//! although the CRD's schema already bounds them, and a Secret of the same name that the
//! operator did not make is never overwritten.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Resource, ResourceExt};
use shardfarm_core::identity::{Delegation, NodeId};
use shardfarm_crds::{IssuedClient, MAX_CLIENT_NAME, MAX_CLIENTS, PoolClient, StoragePool};

use super::{COORDINATOR_PORT, COORDINATOR_SERVICE};
use super::{Context, MANAGER, Result};

// ---- Public interface ----

/// The Secret's data key holding the client key text.
pub const CLIENT_KEY: &str = "client.key";
/// Label naming the pool a client Secret belongs to.
pub const CLIENT_OF_LABEL: &str = "shardfarm.io/client-of";
/// Label naming the client entry a Secret holds the key of.
pub const CLIENT_LABEL: &str = "shardfarm.io/client";
/// A key is issued again when less than `1 / RENEW_FRACTION` of its lifetime is left: a fifth
/// (73 days of the default 365) leaves weeks to restart the pods that use it.
pub const RENEW_FRACTION: u64 = 5;
/// The ConfigMap's keys: the pool id (64 hex digits) and the coordinator's `host:port`.
pub const POOL_ID_KEY: &str = "poolId";
/// See [`POOL_ID_KEY`].
pub const COORDINATOR_KEY: &str = "coordinator";
/// Longest pool name whose clients get Secrets (a label value is at most 63 characters).
const MAX_POOL_NAME: usize = 63;

/// The Secret holding client `client`'s key of pool `pool`.
pub fn secret_name(pool: &str, client: &str) -> String {
    format!("shardfarm-client-{pool}-{client}")
}

/// The ConfigMap naming pool `pool`'s id and coordinator.
pub fn config_map_name(pool: &str) -> String {
    format!("shardfarm-pool-{pool}")
}

/// The text `shardfarm_client::farm::ClientKey::save` writes for `key` and `cert` (the same
/// bytes, so `ClientKey::load` and `shardfarm gateway` read it).
pub fn key_text(key: &ed25519_dalek::SigningKey, cert: &Delegation) -> String {
    shardfarm_client::ClientKey { key: key.clone(), cert: cert.clone() }.to_text()
}

/// The delegation in a client key text, if it holds a well-formed one.
pub fn parse_delegation(text: &str) -> Option<Delegation> {
    let value = text.lines().find_map(|l| {
        l.trim().strip_prefix("delegation")?.trim().strip_prefix('=').map(str::trim)
    })?;
    // Bounded before decoding: a delegation is 144 bytes, 288 hex digits and two quotes.
    if value.len() > 2 * shardfarm_core::identity::DELEGATION_LEN + 2 {
        return None;
    }
    Delegation::from_bytes(&hex::decode(value.trim_matches('"')).ok()?).ok()
}

/// What a pass over the clients found.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Whether the pool has (or had) clients: the status then carries `ClientsIssued`.
    pub active: bool,
    /// The keys in place, in `spec.clients` order.
    pub issued: Vec<IssuedClient>,
    /// Why some entry has no valid key (empty: all issued).
    pub problems: Vec<String>,
}

/// Issues, renews and removes the keys of `pool`'s clients at `now` (unix seconds); writes
/// the pool's ConfigMap if it is missing. A pool that never had clients costs no request.
pub async fn reconcile(pool: &StoragePool, ctx: &Context, now: u64) -> Result<Outcome> {
    let had = pool.status.as_ref().is_some_and(|s| !s.clients.is_empty());
    let want = &pool.spec.clients;
    let mut out = Outcome { active: had || !want.is_empty(), ..Default::default() };
    if !out.active {
        return Ok(out);
    }
    let name = pool.name_any();
    let ns = pool.namespace().unwrap_or_default();
    if name.len() > MAX_POOL_NAME {
        out.problems.push(format!(
            "pool names longer than {MAX_POOL_NAME} characters cannot have clients (their \
             Secrets are labelled with it)"
        ));
        return Ok(out);
    }
    let pool_id = ctx.fabric.pool_id(&name);
    if !want.is_empty() {
        ensure_config_map(pool, ctx, pool_id.as_ref(), &mut out).await?;
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let listed =
        api.list(&ListParams::default().labels(&format!("{CLIENT_OF_LABEL}={name}"))).await?.items;

    // Every name the spec mentions keeps its Secret, valid or not: a typo elsewhere in the
    // list must not delete a working key.
    let named: BTreeSet<&str> = want.iter().map(|c| c.name.as_str()).collect();
    let mut seen = BTreeSet::new();
    // One Event per pass and kind: the recorder folds Events of one reason into a series.
    let (mut issued_now, mut removed_now) = (Vec::new(), Vec::new());
    for (i, c) in want.iter().enumerate() {
        if i >= MAX_CLIENTS {
            out.problems.push(format!(
                "only the first {MAX_CLIENTS} clients get keys ({} listed)",
                want.len()
            ));
            break;
        }
        if let Err(why) = check(c) {
            out.problems.push(why);
            continue;
        }
        if !seen.insert(c.name.as_str()) {
            out.problems.push(format!("client {} is listed twice", c.name));
            continue;
        }
        let sname = secret_name(&name, &c.name);
        let existing = listed.iter().find(|s| s.metadata.name.as_deref() == Some(sname.as_str()));
        let current = existing
            .and_then(|s| s.data.as_ref()?.get(CLIENT_KEY))
            .and_then(|b| std::str::from_utf8(&b.0).ok())
            .and_then(parse_delegation);
        let lifetime = u64::from(c.days) * 86_400;
        let reason = match (&current, existing) {
            (None, None) => "issued",
            (None, Some(_)) => "issued again: its Secret held no readable key",
            (Some(d), _) if Some(d.issuer_id()) != pool_id => {
                "issued again: the pool key is not the one that signed it"
            }
            (Some(d), _) if d.expires <= now.saturating_add(lifetime / RENEW_FRACTION) => {
                "issued again: less than a fifth of its lifetime was left (restart the pods \
                 that use it)"
            }
            (Some(d), _) if d.expires > now.saturating_add(lifetime).saturating_add(86_400) => {
                "issued again: its entry's days are fewer than it had left"
            }
            (Some(d), _) => {
                out.issued.push(issued(c, &sname, d));
                continue;
            }
        };
        let key = shardfarm_core::identity::random_signing_key();
        let expires = now.saturating_add(lifetime);
        let Some(cert) = ctx.fabric.delegate(&name, key.verifying_key(), expires) else {
            out.problems.push(format!(
                "client {}: this operator does not hold pool {name}'s key (the operator that \
                 runs its coordinator issues its clients' keys)",
                c.name
            ));
            if let Some(d) = current.filter(|d| d.expires > now) {
                out.issued.push(issued(c, &sname, &d));
            }
            continue;
        };
        let secret = client_secret(pool, &sname, &c.name, &key, &cert);
        let written = match existing {
            None => match api.create(&PostParams::default(), &secret).await {
                Ok(_) => true,
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    out.problems.push(format!(
                        "client {}: a Secret {sname} exists that the operator did not make for \
                         pool {name}; delete it or rename the client",
                        c.name
                    ));
                    false
                }
                Err(e) => return Err(e.into()),
            },
            Some(old) => {
                // Replaced at the version read: a concurrent change makes this a conflict,
                // retried on the next pass, rather than lost.
                let mut secret = secret;
                secret.metadata.resource_version = old.metadata.resource_version.clone();
                api.replace(&sname, &PostParams::default(), &secret).await?;
                true
            }
        };
        if written {
            let entry = issued(c, &sname, &cert);
            issued_now.push(format!(
                "{}: key {} {reason}, valid until {} (Secret {sname})",
                c.name, entry.key_id, entry.expires
            ));
            out.issued.push(entry);
        }
    }

    // Secrets of entries that are gone.
    for s in &listed {
        let client = s.labels().get(CLIENT_LABEL).cloned().unwrap_or_default();
        if named.contains(client.as_str()) {
            continue;
        }
        let sname = s.name_any();
        match api.delete(&sname, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => continue,
            Err(e) => return Err(e.into()),
        }
        let until = s
            .data
            .as_ref()
            .and_then(|d| d.get(CLIENT_KEY))
            .and_then(|b| std::str::from_utf8(&b.0).ok())
            .and_then(parse_delegation)
            .map_or_else(|| "its expiry".to_string(), |d| rfc3339(d.expires));
        removed_now.push(format!("{client} (Secret {sname}; its key stays valid until {until})"));
    }
    if !issued_now.is_empty() {
        ctx.event(pool, false, "ClientIssued", note("issued client keys: ", &issued_now)).await?;
    }
    if !removed_now.is_empty() {
        let head = "clients no longer listed, Secrets deleted (a delegation cannot be recalled): ";
        ctx.event(pool, false, "ClientRemoved", note(head, &removed_now)).await?;
    }
    Ok(out)
}

/// Longest Event note the API server takes (events.k8s.io/v1: 1 kB), less a margin.
const MAX_NOTE: usize = 1000;

/// `head` and as many of `items` as fit in an Event note, then how many were left out.
fn note(head: &str, items: &[String]) -> String {
    let mut text = head.to_string();
    for (i, item) in items.iter().enumerate() {
        let rest = items.len() - i;
        let tail = format!(" (and {rest} more)");
        if text.len() + item.len() + 2 + tail.len() > MAX_NOTE {
            text.push_str(&tail);
            return text;
        }
        if i > 0 {
            text.push_str("; ");
        }
        text.push_str(item);
    }
    text
}

// ---- Internals ----

/// The entry's name, checked again (the schema bounds it, but an object is hostile input).
fn check(c: &PoolClient) -> Result<(), String> {
    let n = &c.name;
    let label = !n.is_empty()
        && n.len() <= MAX_CLIENT_NAME
        && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-');
    if !label {
        let shown: String = n.chars().take(MAX_CLIENT_NAME).collect();
        return Err(format!(
            "client name {shown:?} is not a DNS label of at most {MAX_CLIENT_NAME} characters"
        ));
    }
    if !(1..=3650).contains(&c.days) {
        return Err(format!("client {n}: days must be 1 to 3650, not {}", c.days));
    }
    Ok(())
}

fn rfc3339(unix: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(unix).unwrap_or(i64::MAX))
        .map_or_else(|_| format!("@{unix}"), |t| t.to_string())
}

fn issued(c: &PoolClient, secret: &str, d: &Delegation) -> IssuedClient {
    IssuedClient {
        name: c.name.clone(),
        secret: secret.to_string(),
        key_id: NodeId::of(&d.delegate).to_hex(),
        expires: rfc3339(d.expires),
    }
}

fn client_secret(
    pool: &StoragePool,
    name: &str,
    client: &str,
    key: &ed25519_dalek::SigningKey,
    cert: &Delegation,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: pool.namespace(),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), MANAGER.to_string()),
                (CLIENT_OF_LABEL.to_string(), pool.name_any()),
                (CLIENT_LABEL.to_string(), client.to_string()),
            ])),
            annotations: Some(BTreeMap::from([
                ("shardfarm.io/key-id".to_string(), NodeId::of(&cert.delegate).to_hex()),
                ("shardfarm.io/expires".to_string(), rfc3339(cert.expires)),
            ])),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        // Mutable: a renewal replaces the key in place, under the same name pods refer to.
        immutable: Some(false),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            CLIENT_KEY.to_string(),
            ByteString(key_text(key, cert).into_bytes()),
        )])),
        ..Default::default()
    }
}

/// Creates the ConfigMap `shardfarm-pool-<pool>` (`poolId`, `coordinator`) if nothing did: what
/// an in-cluster client (the gateway) needs to pin and reach the pool. Never overwritten — the
/// pool key does not change, and a chart or a person may own it.
async fn ensure_config_map(
    pool: &StoragePool,
    ctx: &Context,
    pool_id: Option<&NodeId>,
    out: &mut Outcome,
) -> Result<()> {
    let (name, ns) = (pool.name_any(), pool.namespace().unwrap_or_default());
    let Some(id) = pool_id else {
        out.problems.push(format!("pool {name}'s coordinator does not run yet: no pool id"));
        return Ok(());
    };
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let cm_name = config_map_name(&name);
    if api.get_opt(&cm_name).await?.is_some() {
        return Ok(());
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(cm_name),
            namespace: Some(ns.clone()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".to_string(), MANAGER.to_string()),
                ("shardfarm.io/pool".to_string(), name.clone()),
            ])),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (POOL_ID_KEY.to_string(), id.to_hex()),
            (
                COORDINATOR_KEY.to_string(),
                format!("{COORDINATOR_SERVICE}.{ns}.svc:{COORDINATOR_PORT}"),
            ),
        ])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &cm).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_text_reads_back_and_has_the_client_librarys_form() {
        let root = crate::controller::fixtures::pool_key("main");
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let cert = Delegation::issue(&root, key.verifying_key(), 1_900_000_000);
        let text = key_text(&key, &cert);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with('#'));
        assert_eq!(lines[1], format!("secret = \"{}\"", hex::encode([3u8; 32])));
        assert!(lines[2].starts_with("delegation = \"") && text.ends_with("\"\n"));
        // What the client library (and so the gateway) reads.
        let read = shardfarm_client::ClientIdentity::from_text(&text, "secret").unwrap();
        assert_eq!(read.id(), shardfarm_core::identity::NodeId::of(&key.verifying_key()));
        assert_eq!(read.root(), root.id());
        let back = parse_delegation(&text).unwrap();
        assert_eq!(back, cert);
        assert!(back.verify(0, 1_800_000_000).is_ok());
        assert_eq!(back.issuer_id(), root.id());
        // Junk and oversized values are no delegation.
        assert!(parse_delegation("delegation = \"zz\"").is_none());
        assert!(parse_delegation(&format!("delegation = \"{}\"", "00".repeat(10_000))).is_none());
        assert!(parse_delegation("").is_none());
    }

    #[test]
    fn an_event_note_stays_under_the_api_servers_bound() {
        let items: Vec<String> =
            (0..32).map(|i| format!("client-{i}: {}", "x".repeat(120))).collect();
        let n = note("issued client keys: ", &items);
        assert!(n.len() <= MAX_NOTE, "{}", n.len());
        assert!(n.ends_with("more)"), "{n}");
        assert_eq!(note("h: ", &["a".into(), "b".into()]), "h: a; b");
    }

    #[test]
    fn client_names_are_checked_again() {
        let c = |name: &str, days| PoolClient { name: name.into(), days };
        assert!(check(&c("s3-alice", 365)).is_ok());
        assert!(check(&c("", 365)).is_err());
        assert!(check(&c("-x", 365)).is_err());
        assert!(check(&c("UPPER", 365)).is_err());
        assert!(check(&c(&"a".repeat(41), 365)).is_err());
        assert!(check(&c("ok", 0)).is_err());
        assert!(check(&c("ok", 3651)).is_err());
    }
}
