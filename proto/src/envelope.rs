//! The signed request envelope as it travels in gRPC metadata: the metadata keys, the signed
//! method names, signing (clients) and verification (servers), and the one mapping of
//! authentication failures to statuses, shared by every server.

use prost::Message;
use shardfarm_core::auth::{AuthError, Caller, Envelope, SignedRequest, Verifier, now_ms};
use shardfarm_core::identity::{Credential, NodeId};

use crate::signed_body::FirstMessageHash;
use crate::tls::PeerInfo;
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

/// Metadata keys of the signed envelope.
pub mod keys {
    /// Caller credential (binary).
    pub const CREDENTIAL: &str = "x-sf-credential-bin";
    /// Request nonce (binary, 16 bytes).
    pub const NONCE: &str = "x-sf-nonce-bin";
    /// Timestamp, ms since the epoch (decimal).
    pub const TIMESTAMP: &str = "x-sf-timestamp";
    /// Signature (binary, 64 bytes).
    pub const SIGNATURE: &str = "x-sf-signature-bin";
    /// The node the request is for (binary, 32 bytes; the pool id for the coordinator).
    pub const AUDIENCE: &str = "x-sf-audience-bin";
}

/// Full method names, as signed.
pub mod methods {
    /// PutShard.
    pub const PUT: &str = "/shardfarm.v1.Agent/PutShard";
    /// GetShard.
    pub const GET: &str = "/shardfarm.v1.Agent/GetShard";
    /// DeleteShard.
    pub const DELETE: &str = "/shardfarm.v1.Agent/DeleteShard";
    /// DeleteObject.
    pub const DELETE_OBJECT: &str = "/shardfarm.v1.Agent/DeleteObject";
    /// ListTombstones.
    pub const LIST_TOMBSTONES: &str = "/shardfarm.v1.Agent/ListTombstones";
    /// ListShards.
    pub const LIST: &str = "/shardfarm.v1.Agent/ListShards";
    /// SummarizePartitions.
    pub const SUMMARIZE: &str = "/shardfarm.v1.Agent/SummarizePartitions";
    /// Audit.
    pub const AUDIT: &str = "/shardfarm.v1.Agent/Audit";
    /// Info.
    pub const INFO: &str = "/shardfarm.v1.Agent/Info";
    /// ProveCapacity.
    pub const PROVE: &str = "/shardfarm.v1.Agent/ProveCapacity";
    /// GetLayout, served by an agent.
    pub const AGENT_LAYOUT: &str = "/shardfarm.v1.Agent/GetLayout";
    /// Coordinator: Challenge.
    pub const CHALLENGE: &str = "/shardfarm.v1.Coordinator/Challenge";
    /// Coordinator: Join.
    pub const JOIN: &str = "/shardfarm.v1.Coordinator/Join";
    /// Coordinator: Report.
    pub const REPORT: &str = "/shardfarm.v1.Coordinator/Report";
    /// Coordinator: GetLayout.
    pub const GET_LAYOUT: &str = "/shardfarm.v1.Coordinator/GetLayout";
    /// Coordinator: WatchLayout.
    pub const WATCH_LAYOUT: &str = "/shardfarm.v1.Coordinator/WatchLayout";
    /// Coordinator: ListNodes.
    pub const LIST_NODES: &str = "/shardfarm.v1.Coordinator/ListNodes";
    /// Coordinator: GetPool.
    pub const GET_POOL: &str = "/shardfarm.v1.Coordinator/GetPool";
}

/// The status of an authentication failure.
pub fn auth_status(a: &AuthError) -> Status {
    let msg = a.to_string();
    match a {
        AuthError::Malformed(_) => Status::invalid_argument(msg),
        AuthError::BadSignature
        | AuthError::DelegationSignature
        | AuthError::WrongAudience { .. }
        | AuthError::WrongChannel { .. } => Status::unauthenticated(msg),
        AuthError::StaleTimestamp { .. } | AuthError::DelegationExpired { .. } => {
            Status::unauthenticated(msg)
        }
        AuthError::Replay => Status::already_exists(msg),
        AuthError::ReplayCacheFull(_)
        | AuthError::IdentityReplayShare(_)
        | AuthError::PeerThrottled { .. } => Status::resource_exhausted(msg),
        AuthError::InsufficientDifficulty { .. } => Status::failed_precondition(msg),
    }
}

// ---- Envelopes in metadata ----

/// Puts a signed envelope for `msg` on `method`, addressed to `audience` (the node called;
/// the pool id for the coordinator), into `md` (client side).
pub fn sign_into<M: Message>(
    md: &mut MetadataMap,
    audience: NodeId,
    method: &str,
    msg: &M,
    credential: &Credential,
    key: &ed25519_dalek::SigningKey,
) {
    let req =
        Envelope::new(method, &msg.encode_to_vec()).to(audience).sign(credential.clone(), key);
    md.insert_bin(keys::CREDENTIAL, MetadataValue::from_bytes(&credential.to_bytes()));
    md.insert_bin(keys::AUDIENCE, MetadataValue::from_bytes(&audience.0));
    md.insert_bin(keys::NONCE, MetadataValue::from_bytes(&req.envelope.nonce));
    md.insert(keys::TIMESTAMP, req.envelope.timestamp_ms.to_string().parse().expect("digits"));
    md.insert_bin(keys::SIGNATURE, MetadataValue::from_bytes(&req.signature.to_bytes()));
}

/// Verifies the signed envelope in `md` on `method`, sent by `peer` (server side; under TLS
/// the envelope must be signed by the key the connection proved), over the
/// first message's bytes as they arrived (`first`, from the [`HashFirstMessage`] layer in the
/// request's extensions; never a re-encoding). A peer that has failed too often is refused
/// before its request is verified; every failure that is the peer's fault is charged to it.
///
/// [`HashFirstMessage`]: crate::signed_body::HashFirstMessage
pub fn verify_request(
    verifier: &Verifier,
    md: &MetadataMap,
    first: Option<&FirstMessageHash>,
    peer: &PeerInfo,
    method: &str,
) -> Result<Caller, AuthError> {
    let ip = peer.addr.map(|p| p.ip());
    let req = read_envelope(md, method);
    // Under TLS the caller's identity is the key its connection proved: failures are charged
    // to it, not to whichever identity an envelope claims (a stranger cannot get a known
    // node's bucket throttled by sending requests in its name).
    let claimed = peer.id().or_else(|| req.as_ref().ok().map(|r| r.credential.id()));
    verifier.admit_peer(ip, claimed)?;
    let r = req.and_then(|mut req| {
        req.envelope.body_hash = match first.and_then(FirstMessageHash::get) {
            Some(Ok(hash)) => hash,
            Some(Err(why)) => return Err(AuthError::Malformed(why.into())),
            None => {
                return Err(AuthError::Malformed(
                    "the request's first message was not seen whole by the server".into(),
                ));
            }
        };
        // Under TLS the connection proved a key: the request must be signed by that key, and
        // is then bound to it, which is its replay defense (no nonce is remembered; see
        // core::auth). A plaintext request goes through the replay cache.
        match &peer.key {
            Some(channel) if channel != req.credential.signing_key() => {
                Err(AuthError::WrongChannel {
                    signer: NodeId::of(req.credential.signing_key()).to_hex(),
                    channel: NodeId::of(channel).to_hex(),
                })
            }
            Some(_) => verifier.verify_bound(&req, method, now_ms()),
            None => verifier.verify_hashed(&req, method, now_ms()),
        }
    });
    match &r {
        Ok(caller) => verifier.record_success(ip, caller.id),
        Err(e) => verifier.record_failure(ip, claimed, e),
    }
    r
}

fn read_envelope(md: &MetadataMap, method: &str) -> Result<SignedRequest, AuthError> {
    let bin = |k: &str| -> Result<Vec<u8>, AuthError> {
        md.get_bin(k)
            .ok_or_else(|| AuthError::Malformed(format!("missing metadata {k}: sign the request")))?
            .to_bytes()
            .map(|b| b.to_vec())
            .map_err(|_| AuthError::Malformed(format!("metadata {k} is not valid base64")))
    };
    let credential = Credential::from_bytes(&bin(keys::CREDENTIAL)?)
        .map_err(|e| AuthError::Malformed(format!("credential: {e}")))?;
    let nonce: [u8; 16] = bin(keys::NONCE)?
        .try_into()
        .map_err(|_| AuthError::Malformed("nonce must be 16 bytes".into()))?;
    let timestamp_ms = md
        .get(keys::TIMESTAMP)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| AuthError::Malformed(format!("missing or bad {}", keys::TIMESTAMP)))?;
    let audience: [u8; 32] = bin(keys::AUDIENCE)?
        .try_into()
        .map_err(|_| AuthError::Malformed("audience must be 32 bytes".into()))?;
    let sig: [u8; 64] = bin(keys::SIGNATURE)?
        .try_into()
        .map_err(|_| AuthError::Malformed("signature must be 64 bytes".into()))?;
    Ok(SignedRequest {
        credential,
        envelope: Envelope {
            audience: NodeId(audience),
            method: method.into(),
            nonce,
            timestamp_ms,
            body_hash: [0; 32],
        },
        signature: ed25519_dalek::Signature::from_bytes(&sig),
    })
}
