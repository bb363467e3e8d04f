//! Farm grants: how a pool tells its owner's own agents from outsiders.
//!
//! A node's labels (zone, farm, host) are claims: any stranger can send `zone=eu-west-3`. The
//! pool owner's own agents prove they are the owner's by presenting a [`FarmGrant`]: the
//! farm's key (a secret the owner keeps: a Kubernetes Secret per MiningFarm, or `local up`'s
//! `farm.key`) signs "node N may act as one of my agents in pool P until T". The coordinator
//! knows each farm's public key and the labels the farm assigns; it trusts a granted node's
//! labels and overrides them with the farm's. A node without a grant is an outsider: its
//! failure domain is assigned by the pool (a syndication's site) or is its owner root.

use ed25519_dalek::{Signature, VerifyingKey};

use crate::identity::{Identity, NodeId, parse_key};
use crate::{Error, Result};

/// Domain separator for the signature inside a farm grant.
const GRANT_DOMAIN: &[u8] = b"shardfarm-farm-grant-v1";

/// The longest a grant may be valid, seconds (a week): a grant copied from a compromised
/// agent stops working soon; agents issue themselves a fresh one-day grant at every join.
pub const MAX_VALIDITY_S: u64 = 7 * 86_400;

/// Encoded length of a [`FarmGrant`]: node 32, farm 32, pool 32, expiry 8, signature 64.
pub const GRANT_LEN: usize = 32 + 32 + 32 + 8 + 64;

/// A farm key's statement that `node` is one of its agents in `pool` until `expires`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FarmGrant {
    /// The agent's public key.
    pub node: VerifyingKey,
    /// The farm's public key.
    pub farm: VerifyingKey,
    /// The pool the grant is for.
    pub pool: NodeId,
    /// Unix seconds after which the grant is void.
    pub expires: u64,
    /// The farm's signature over the fields above.
    pub signature: Signature,
}

/// Why a grant is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    /// Granted to another key than the caller's.
    #[error("the farm grant names another node than the caller")]
    OtherNode,
    /// Granted for another pool.
    #[error("the farm grant is for pool {0}, not this one")]
    OtherPool(NodeId),
    /// The farm's signature does not verify.
    #[error("the farm grant's signature does not verify")]
    Signature,
    /// Valid for longer than [`MAX_VALIDITY_S`].
    #[error("the farm grant is valid until {expires}, more than a week from now ({now})")]
    TooLong {
        /// The grant's expiry, unix seconds.
        expires: u64,
        /// Now, unix seconds.
        now: u64,
    },
    /// Past its expiry.
    #[error("the farm grant expired at {expired} (now {now}): is the agent's clock right?")]
    Expired {
        /// The grant's expiry, unix seconds.
        expired: u64,
        /// Now, unix seconds.
        now: u64,
    },
}

impl FarmGrant {
    /// `farm` grants `node` membership of its farm in `pool` until `expires` (unix seconds).
    pub fn issue(farm: &Identity, node: VerifyingKey, pool: NodeId, expires: u64) -> Self {
        let mut g = FarmGrant {
            node,
            farm: farm.public_key(),
            pool,
            expires,
            signature: Signature::from_bytes(&[0; 64]),
        };
        g.signature = farm.sign(&g.signed_bytes());
        g
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(GRANT_DOMAIN.len() + GRANT_LEN - 64);
        b.extend_from_slice(GRANT_DOMAIN);
        b.extend_from_slice(&self.to_bytes()[..GRANT_LEN - 64]);
        b
    }

    /// The farm key's id.
    pub fn farm_id(&self) -> NodeId {
        NodeId::of(&self.farm)
    }

    /// Checks that the grant is for `node` in `pool`, signed by its farm, and not expired.
    pub fn verify(
        &self,
        node: &VerifyingKey,
        pool: &NodeId,
        now_unix: u64,
    ) -> std::result::Result<(), GrantError> {
        if self.node != *node {
            return Err(GrantError::OtherNode);
        }
        if self.pool != *pool {
            return Err(GrantError::OtherPool(self.pool));
        }
        self.farm
            .verify_strict(&self.signed_bytes(), &self.signature)
            .map_err(|_| GrantError::Signature)?;
        if now_unix >= self.expires {
            return Err(GrantError::Expired { expired: self.expires, now: now_unix });
        }
        if self.expires > now_unix.saturating_add(MAX_VALIDITY_S) {
            return Err(GrantError::TooLong { expires: self.expires, now: now_unix });
        }
        Ok(())
    }

    /// Fixed-size binary encoding (see [`GRANT_LEN`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(GRANT_LEN);
        b.extend_from_slice(self.node.as_bytes());
        b.extend_from_slice(self.farm.as_bytes());
        b.extend_from_slice(&self.pool.0);
        b.extend_from_slice(&self.expires.to_le_bytes());
        b.extend_from_slice(&self.signature.to_bytes());
        b
    }

    /// Parses [`FarmGrant::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() != GRANT_LEN {
            return Err(Error::Malformed(format!(
                "farm grant is {} bytes, expected {GRANT_LEN}",
                b.len()
            )));
        }
        Ok(FarmGrant {
            node: parse_key(&b[0..32])?,
            farm: parse_key(&b[32..64])?,
            pool: NodeId(b[64..96].try_into().unwrap()),
            expires: u64::from_le_bytes(b[96..104].try_into().unwrap()),
            signature: Signature::from_bytes(b[104..168].try_into().unwrap()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Identity {
        Identity::generate(0, 1, &|_| {}).unwrap().0
    }

    #[test]
    fn a_grant_verifies_only_for_its_node_pool_and_time() {
        let (farm, node, other) = (key(), key(), key());
        let pool = key().id();
        let g = FarmGrant::issue(&farm, node.public_key(), pool, 100);
        let g = FarmGrant::from_bytes(&g.to_bytes()).unwrap();
        assert_eq!(g.verify(&node.public_key(), &pool, 99), Ok(()));
        assert_eq!(g.farm_id(), farm.id());
        assert_eq!(g.verify(&other.public_key(), &pool, 99), Err(GrantError::OtherNode));
        let elsewhere = key().id();
        assert_eq!(g.verify(&node.public_key(), &elsewhere, 99), Err(GrantError::OtherPool(pool)));
        assert_eq!(
            g.verify(&node.public_key(), &pool, 100),
            Err(GrantError::Expired { expired: 100, now: 100 })
        );
        let forever = FarmGrant::issue(&farm, node.public_key(), pool, 99 + MAX_VALIDITY_S + 1);
        assert!(matches!(
            forever.verify(&node.public_key(), &pool, 99),
            Err(GrantError::TooLong { .. })
        ));
        // Any altered field breaks the signature.
        let mut longer = g.clone();
        longer.expires = u64::MAX;
        assert_eq!(longer.verify(&node.public_key(), &pool, 99), Err(GrantError::Signature));
        let mut stolen = g.clone();
        stolen.farm = other.public_key();
        assert_eq!(stolen.verify(&node.public_key(), &pool, 99), Err(GrantError::Signature));
    }

    #[test]
    fn malformed_grants_are_refused() {
        assert!(FarmGrant::from_bytes(&[]).is_err());
        assert!(FarmGrant::from_bytes(&[0; GRANT_LEN + 1]).is_err());
    }
}
