//! Client identities: a mined identity of one's own, or a key delegated by one.
//!
//! Agents serve only signed requests from mined identities (at the pool's difficulty) and
//! from keys whose delegation certificate a mined identity signed. `shardfarm identity new`
//! mines one; `shardfarm identity delegate` issues delegated keys from it (for a gateway's
//! users, a CI job, a second machine); `shardfarm local up` writes a delegated key for its
//! local user; the operator issues them into Secrets.

use std::path::Path;

use anyhow::{Context, bail};
use shardfarm_core::identity::{Delegation, Identity, NodeId};
use shardfarm_proto::Signer;

/// Longest identity file read.
const MAX_IDENTITY_BYTES: u64 = 16 << 10;

/// What a client signs with (one per client, so the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
pub enum ClientIdentity {
    /// A mined identity (it may also issue delegations).
    Mined(Identity),
    /// A key delegated by a mined identity.
    Delegated(ClientKey),
}

impl ClientIdentity {
    /// Reads an identity file: either kind, told apart by its fields. Refuses a file that
    /// group or others can read.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        shardfarm_core::identity::check_private(path)?;
        let len = std::fs::metadata(path)?.len();
        if len > MAX_IDENTITY_BYTES {
            bail!("{} is {len} bytes: not an identity file", path.display());
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_text(&text, &path.display().to_string())
    }

    /// Parses an identity from its text (e.g. an environment variable fed from a Secret).
    pub fn from_text(text: &str, origin: &str) -> anyhow::Result<Self> {
        if text.len() as u64 > MAX_IDENTITY_BYTES {
            bail!("{origin}: {} bytes is not an identity", text.len());
        }
        let has = |field: &str| text.lines().any(|l| l.trim_start().starts_with(field));
        if has("delegation") {
            Ok(ClientIdentity::Delegated(ClientKey::from_text(text, origin)?))
        } else if has("nonce") {
            Ok(ClientIdentity::Mined(Identity::from_text(text, origin)?))
        } else {
            bail!("{origin} is neither a mined identity nor a delegated client key")
        }
    }

    /// The signing key.
    pub fn key(&self) -> &ed25519_dalek::SigningKey {
        match self {
            ClientIdentity::Mined(id) => id.signing_key(),
            ClientIdentity::Delegated(ck) => &ck.key,
        }
    }

    /// The id requests are attributed to (the key's id; for a delegated key, not its root's).
    pub fn id(&self) -> NodeId {
        NodeId::of(&self.key().verifying_key())
    }

    /// The mined root this identity belongs to (itself when mined).
    pub fn root(&self) -> NodeId {
        match self {
            ClientIdentity::Mined(id) => id.id(),
            ClientIdentity::Delegated(ck) => ck.cert.issuer_id(),
        }
    }

    /// The signer that presents it.
    pub fn signer(&self) -> Signer {
        match self {
            ClientIdentity::Mined(id) => Signer::identity(id),
            ClientIdentity::Delegated(ck) => Signer::delegated(ck.cert.clone(), ck.key.clone()),
        }
    }

    /// A one-line description: kind, id, difficulty or expiry.
    pub fn describe(&self) -> String {
        match self {
            ClientIdentity::Mined(id) => {
                format!("mined identity {} (difficulty {})", id.id().to_hex(), id.difficulty())
            }
            ClientIdentity::Delegated(ck) => format!(
                "delegated key {} from root {} (difficulty {}), expires at unix time {}",
                self.id().to_hex(),
                ck.cert.issuer_id().to_hex(),
                shardfarm_core::identity::pow_difficulty(&ck.cert.issuer, ck.cert.issuer_nonce),
                ck.cert.expires
            ),
        }
    }
}

/// The local user's credential: a fresh key with a delegation from the farm root.
pub struct ClientKey {
    /// The key.
    pub key: ed25519_dalek::SigningKey,
    /// The delegation certificate.
    pub cert: Delegation,
}

impl ClientKey {
    /// Issues a new client key valid for `days`.
    pub fn issue(root: &Identity, days: u64) -> Self {
        let expires = shardfarm_core::auth::now_ms() / 1000 + days * 86_400;
        Self::issue_for(root, shardfarm_core::identity::random_signing_key(), expires)
    }

    /// Delegates `key` until `expires` (unix seconds).
    pub fn issue_for(root: &Identity, key: ed25519_dalek::SigningKey, expires: u64) -> Self {
        let cert = Delegation::issue(root, key.verifying_key(), expires);
        ClientKey { key, cert }
    }

    /// The text [`ClientKey::save`] writes (a secret).
    pub fn to_text(&self) -> String {
        format!(
            "# shardfarm client key and delegation: keep secret (mode 0600)\nsecret = \"{}\"\ndelegation = \"{}\"\n",
            hex::encode(self.key.to_bytes()),
            hex::encode(self.cert.to_bytes())
        )
    }

    /// Writes it with mode 0600.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        shardfarm_core::identity::write_secret_file(path, self.to_text().as_bytes())?;
        Ok(())
    }

    /// Reads it back (refusing a group/world-readable file).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        shardfarm_core::identity::check_private(path)?;
        let text = std::fs::read_to_string(path)?;
        Self::from_text(&text, &path.display().to_string())
    }

    /// Parses the text [`ClientKey::save`] writes; `origin` names it in errors.
    pub fn from_text(text: &str, origin: &str) -> anyhow::Result<Self> {
        let field = |name: &str| -> anyhow::Result<Vec<u8>> {
            let line = text
                .lines()
                .find_map(|l| l.trim().strip_prefix(name)?.trim().strip_prefix('=').map(str::trim))
                .with_context(|| format!("{origin}: no `{name}`"))?;
            Ok(hex::decode(line.trim_matches('"'))?)
        };
        let secret: [u8; 32] =
            field("secret")?.try_into().map_err(|_| anyhow::anyhow!("bad secret"))?;
        Ok(ClientKey {
            key: ed25519_dalek::SigningKey::from_bytes(&secret),
            cert: Delegation::from_bytes(&field("delegation")?)?,
        })
    }
}
