//! Read capabilities: `sf2:` (or the older `sf1:`, still read) followed by lowercase base32
//! (RFC 4648, no padding) of
//!
//! | size | field |
//! |---|---|
//! | 1 | capability version (2; 1 for `sf1:`) |
//! | 1 | pool name length L (1–64) |
//! | L | pool name (UTF-8) |
//! | 32 | pool id: the id of the pool key that signs the pool's layouts (version 2 only) |
//! | 32 | object id |
//! | 32 | object key |
//! | 32 | uploader public key (the key every segment header must be signed by) |
//! | 4 | first 4 bytes of blake2b-256 of everything before: catches typos and truncation |
//!
//! Whoever holds the capability can read the object; nobody else can, the nodes included.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;

use crate::identity::blake2b256;
use crate::{Error, Result};

const PREFIX_V1: &str = "sf1:";
const PREFIX: &str = "sf2:";
const VERSION_V1: u8 = 1;
const VERSION: u8 = 2;
/// Longest pool name a capability carries.
pub const MAX_POOL_NAME: usize = 64;

/// What a reader needs: where (pool), what (object id), how to decrypt (key) and whose
/// signature to expect (uploader).
#[derive(Clone, PartialEq, Eq)]
pub struct ReadCap {
    /// Pool name.
    pub pool: String,
    /// The pool key's id (`sf2:`); `None` for an `sf1:` capability, which names the pool only.
    pub pool_id: Option<[u8; 32]>,
    /// Object id.
    pub object_id: [u8; 32],
    /// Object key.
    pub key: [u8; 32],
    /// Uploader's public key.
    pub uploader: [u8; 32],
}

impl fmt::Debug for ReadCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        write!(f, "ReadCap(pool {}, object {})", self.pool, hex::encode(&self.object_id[..8]))
    }
}

impl ReadCap {
    /// Checks the pool name.
    pub fn validate_pool(pool: &str) -> Result<()> {
        if pool.is_empty() || pool.len() > MAX_POOL_NAME {
            return Err(Error::Cap(format!(
                "pool name must be 1 to {MAX_POOL_NAME} bytes, got {}",
                pool.len()
            )));
        }
        Ok(())
    }

    /// The `sf2:` string (`sf1:` for a capability without a pool id).
    pub fn encode(&self) -> String {
        let version = if self.pool_id.is_some() { VERSION } else { VERSION_V1 };
        let mut b = vec![version, self.pool.len() as u8];
        b.extend_from_slice(self.pool.as_bytes());
        if let Some(id) = &self.pool_id {
            b.extend_from_slice(id);
        }
        b.extend_from_slice(&self.object_id);
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&self.uploader);
        let sum = blake2b256(&[&b]);
        b.extend_from_slice(&sum[..4]);
        let prefix = if self.pool_id.is_some() { PREFIX } else { PREFIX_V1 };
        format!("{prefix}{}", BASE32_NOPAD.encode(&b).to_ascii_lowercase())
    }
}

impl fmt::Display for ReadCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

impl FromStr for ReadCap {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let (body, version) = match (s.strip_prefix(PREFIX), s.strip_prefix(PREFIX_V1)) {
            (Some(body), _) => (body, VERSION),
            (None, Some(body)) => (body, VERSION_V1),
            (None, None) if s.starts_with("sf") && s.contains(':') => {
                return Err(Error::Cap(format!(
                    "capability version `{}` is not supported by this build (it reads sf1: and \
                     sf2:)",
                    s.split(':').next().unwrap_or("")
                )));
            }
            (None, None) => {
                return Err(Error::Cap("a read capability starts with `sf2:` or `sf1:`".into()));
            }
        };
        let b = BASE32_NOPAD.decode(body.to_ascii_uppercase().as_bytes()).map_err(|e| {
            Error::Cap(format!("not valid base32 at position {}: damaged or truncated", e.position))
        })?;
        if b.len() < 2 + 96 + 4 + 1 {
            return Err(Error::Cap(format!("{} bytes is too short: truncated", b.len())));
        }
        let (payload, sum) = b.split_at(b.len() - 4);
        if blake2b256(&[payload])[..4] != *sum {
            return Err(Error::Cap("checksum mismatch: the capability is damaged".into()));
        }
        if payload[0] != version {
            return Err(Error::Cap(format!(
                "capability version {} under the prefix of version {version}",
                payload[0]
            )));
        }
        let l = usize::from(payload[1]);
        let id_len = if version == VERSION { 32 } else { 0 };
        if l == 0 || l > MAX_POOL_NAME || payload.len() != 2 + l + id_len + 96 {
            return Err(Error::Cap("inconsistent pool name length".into()));
        }
        let pool = std::str::from_utf8(&payload[2..2 + l])
            .map_err(|_| Error::Cap("pool name is not UTF-8".into()))?
            .to_string();
        let pool_id = (version == VERSION).then(|| payload[2 + l..2 + l + 32].try_into().unwrap());
        let rest = &payload[2 + l + id_len..];
        Ok(ReadCap {
            pool,
            pool_id,
            object_id: rest[0..32].try_into().unwrap(),
            key: rest[32..64].try_into().unwrap(),
            uploader: rest[64..96].try_into().unwrap(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> ReadCap {
        ReadCap {
            pool: "local".into(),
            pool_id: Some([9; 32]),
            object_id: [1; 32],
            key: [2; 32],
            uploader: [3; 32],
        }
    }

    #[test]
    fn round_trips() {
        let s = cap().encode();
        assert!(s.starts_with("sf2:"));
        assert_eq!(s.parse::<ReadCap>().unwrap(), cap());
        assert_eq!(s.to_uppercase().replacen("SF2:", "sf2:", 1).parse::<ReadCap>().unwrap(), cap());
    }

    #[test]
    fn an_sf1_capability_without_a_pool_id_is_still_read() {
        let old = ReadCap { pool_id: None, ..cap() };
        let s = old.encode();
        assert!(s.starts_with("sf1:"), "{s}");
        assert_eq!(s.parse::<ReadCap>().unwrap(), old);
        // A version-1 payload under the sf2: prefix (or the reverse) is refused.
        let err = s.replacen("sf1:", "sf2:", 1).parse::<ReadCap>().unwrap_err().to_string();
        assert!(err.contains("under the prefix"), "{err}");
    }

    #[test]
    fn truncated_garbled_and_wrong_version_are_rejected_clearly() {
        let s = cap().encode();
        let err = s[..s.len() - 8].parse::<ReadCap>().unwrap_err().to_string();
        assert!(err.contains("damaged") || err.contains("truncated"), "{err}");
        let mut g = s.clone().into_bytes();
        let i = g.len() / 2;
        g[i] = if g[i] == b'a' { b'b' } else { b'a' };
        let err = String::from_utf8(g).unwrap().parse::<ReadCap>().unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        let err = s.replacen("sf2:", "sf3:", 1).parse::<ReadCap>().unwrap_err().to_string();
        assert!(err.contains("sf3"), "{err}");
        let err = "hello".parse::<ReadCap>().unwrap_err().to_string();
        assert!(err.contains("sf2:"), "{err}");
        let err = "sf2:!!!!".parse::<ReadCap>().unwrap_err().to_string();
        assert!(err.contains("base32"), "{err}");
    }
}
