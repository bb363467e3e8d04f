//! Mined node identities and delegated client ids.
//!
//! A node identity is an ed25519 key whose id is `blake2b-256(public key)`. It is *mined*: the
//! owner searches a nonce so that `blake2b-256(public key ‖ nonce_le)` starts with at least `D`
//! zero bits. Checking takes one hash; finding takes `2^D` hashes on average, which is what makes
//! a thousand fake nodes cost a thousand times one real node (the sybil defence).
//!
//! Clients that do not mine get a [`Delegation`]: a short certificate in which a mined identity
//! (the issuer) vouches for another key until an expiry time. Agents accept both; nodes that
//! share a root (the issuer, or themselves) count as one owner for placement.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use blake2::Blake2b;
use blake2::digest::{Digest, consts::U32};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::{Error, Result};

pub(crate) type Blake2b256 = Blake2b<U32>;

/// The default identity difficulty of a pool and its agents, bits: 2^28 blake2b hashes, about
/// 29 s of one core at the measured 9.2 M hashes/s (`bench core`), 16 times the former 24.
/// Mined once per machine, it makes each sybil cost what an honest node pays for years of
/// membership; see ARCHITECTURE.md ("What an identity costs") for the table and why not more.
pub const DEFAULT_DIFFICULTY: u8 = 28;

/// Hard upper bound on a difficulty anyone may ask for; 2^64 expected hashes is already absurd.
pub const MAX_DIFFICULTY: u8 = 64;

/// Domain separator for the signature inside a delegation certificate.
const DELEGATION_DOMAIN: &[u8] = b"shardfarm-delegation-v1";

/// `blake2b-256(data)`: the hash used for identities, proof of work and request envelopes.
pub fn blake2b256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2b256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// The id of a public key: `blake2b-256(public key)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The id of `key`.
    pub fn of(key: &VerifyingKey) -> Self {
        NodeId(blake2b256(&[key.as_bytes()]))
    }

    /// Lowercase hex of all 32 bytes.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 8 bytes in hex, for logs and tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self> {
        let bytes = hex::decode(s).map_err(|e| Error::Malformed(format!("node id: {e}")))?;
        let arr: [u8; 32] =
            bytes.try_into().map_err(|_| Error::Malformed("node id: expected 32 bytes".into()))?;
        Ok(NodeId(arr))
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

// ---- Proof of work ----

/// Number of leading zero bits of `hash`.
pub fn leading_zero_bits(hash: &[u8]) -> u32 {
    let mut bits = 0;
    for b in hash {
        if *b == 0 {
            bits += 8;
        } else {
            bits += b.leading_zeros();
            break;
        }
    }
    bits
}

/// The proof-of-work hash of `key` with `nonce`.
pub fn pow_hash(key: &VerifyingKey, nonce: u64) -> [u8; 32] {
    blake2b256(&[key.as_bytes(), &nonce.to_le_bytes()])
}

/// The difficulty (leading zero bits) that `nonce` proves for `key`. One hash.
pub fn pow_difficulty(key: &VerifyingKey, nonce: u64) -> u32 {
    leading_zero_bits(&pow_hash(key, nonce))
}

/// What a mining run did: the nonce found and how fast it got there.
#[derive(Debug, Clone, Copy)]
pub struct MiningReport {
    /// The nonce that reaches the difficulty.
    pub nonce: u64,
    /// Hashes tried over all threads.
    pub hashes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Threads used.
    pub threads: usize,
}

impl MiningReport {
    /// Hashes per second over all threads.
    pub fn hash_rate(&self) -> f64 {
        self.hashes as f64 / self.seconds.max(1e-9)
    }
}

/// Search a nonce for `key` with at least `difficulty` leading zero bits on `threads` threads
/// (0 = all cores). `progress` is called every 2^22 hashes of the first thread with the total
/// hashes tried so far; it runs on a mining thread, so keep it short.
pub fn mine(
    key: &VerifyingKey,
    difficulty: u8,
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<MiningReport> {
    if difficulty > MAX_DIFFICULTY {
        return Err(Error::Malformed(format!(
            "difficulty {difficulty} is above the maximum {MAX_DIFFICULTY}"
        )));
    }
    let threads = if threads == 0 { num_cpus::get().max(1) } else { threads };
    let start = Instant::now();
    let found = Arc::new(AtomicBool::new(false));
    let result = AtomicU64::new(0);
    let total = AtomicU64::new(0);
    // Each thread takes a disjoint stride of the nonce space; how often it publishes its count
    // is a trade-off between contention on `total` and a smooth progress line.
    const PUBLISH_EVERY: u64 = 1 << 16;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (found, result, total) = (&found, &result, &total);
            s.spawn(move || {
                let mut nonce = t as u64;
                let mut local = 0u64;
                let mut rounds = 0u64;
                let mut buf = [0u8; 40];
                buf[..32].copy_from_slice(key.as_bytes());
                while !found.load(Ordering::Relaxed) {
                    for _ in 0..PUBLISH_EVERY {
                        buf[32..].copy_from_slice(&nonce.to_le_bytes());
                        let h: [u8; 32] = Blake2b256::digest(buf).into();
                        local += 1;
                        if leading_zero_bits(&h) >= u32::from(difficulty) {
                            if !found.swap(true, Ordering::SeqCst) {
                                result.store(nonce, Ordering::SeqCst);
                            }
                            break;
                        }
                        nonce = nonce.wrapping_add(threads as u64);
                    }
                    let all = total.fetch_add(local, Ordering::Relaxed) + local;
                    local = 0;
                    rounds += 1;
                    if t == 0 && rounds.is_multiple_of(64) {
                        progress(all);
                    }
                }
            });
        }
    });
    Ok(MiningReport {
        nonce: result.load(Ordering::SeqCst),
        hashes: total.load(Ordering::SeqCst),
        seconds: start.elapsed().as_secs_f64(),
        threads,
    })
}

// ---- Keys on disk ----

/// A mined node identity: the secret key and the nonce that proves the work.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    /// The proof-of-work nonce.
    pub nonce: u64,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({}, difficulty {})", self.id().short(), self.difficulty())
    }
}

/// A fresh random ed25519 key from the operating system's generator.
pub fn random_signing_key() -> SigningKey {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).expect("the operating system's random generator failed");
    SigningKey::from_bytes(&secret)
}

impl Identity {
    /// Generates a key and mines it to `difficulty` on `threads` threads (0 = all cores).
    pub fn generate(
        difficulty: u8,
        threads: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(Self, MiningReport)> {
        let key = random_signing_key();
        let report = mine(&key.verifying_key(), difficulty, threads, progress)?;
        Ok((Identity { key, nonce: report.nonce }, report))
    }

    /// An identity from an existing key and nonce (the nonce is not checked here).
    pub fn from_parts(key: SigningKey, nonce: u64) -> Self {
        Identity { key, nonce }
    }

    /// The signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The public key.
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// `blake2b-256(public key)`.
    pub fn id(&self) -> NodeId {
        NodeId::of(&self.public_key())
    }

    /// The difficulty the stored nonce proves.
    pub fn difficulty(&self) -> u32 {
        pow_difficulty(&self.public_key(), self.nonce)
    }

    /// The credential that presents this identity to others.
    pub fn credential(&self) -> Credential {
        Credential::Mined { key: self.public_key(), nonce: self.nonce }
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> Signature {
        self.key.sign(msg)
    }

    /// Writes the identity to `path` with mode 0600 (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_secret_file(path, self.to_text().as_bytes())
    }

    /// The identity as the text [`Identity::save`] writes (a secret: whoever reads it can act
    /// as this identity).
    pub fn to_text(&self) -> String {
        format!(
            "# shardfarm identity: keep this file secret (mode 0600)\nversion = 1\nsecret = \"{}\"\nnonce = {}\n",
            hex::encode(self.key.to_bytes()),
            self.nonce
        )
    }

    /// Reads an identity written by [`Identity::save`]. Refuses a file that group or others can
    /// read, as ssh does, because anyone who reads it can act as this node.
    pub fn load(path: &Path) -> Result<Self> {
        check_private(path)?;
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_text(&text, &path.display().to_string())
    }

    /// Parses [`Identity::to_text`]'s output; `origin` names where it came from in errors.
    pub fn from_text(text: &str, origin: &str) -> Result<Self> {
        let mut secret = None;
        let mut nonce = None;
        for line in text.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix("secret =") {
                secret = Some(v.trim().trim_matches('"').to_string());
            } else if let Some(v) = line.strip_prefix("nonce =") {
                nonce = Some(
                    v.trim()
                        .parse::<u64>()
                        .map_err(|e| Error::Malformed(format!("{}: nonce: {e}", origin)))?,
                );
            }
        }
        let bad = |what: &str| Error::Malformed(format!("{}: {what}", origin));
        let secret = hex::decode(secret.ok_or_else(|| bad("no `secret` line"))?)
            .map_err(|_| bad("secret is not hex"))?;
        let secret: [u8; 32] = secret.try_into().map_err(|_| bad("secret is not 32 bytes"))?;
        let nonce = nonce.ok_or_else(|| bad("no `nonce` line"))?;
        Ok(Identity { key: SigningKey::from_bytes(&secret), nonce })
    }
}

/// Writes `bytes` to `path` with mode 0600 atomically: temp file, fsync, rename, fsync dir.
pub fn write_secret_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Fails unless `path` is readable by its owner only.
pub fn check_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyFilePermissions { path: path.to_path_buf(), mode });
    }
    Ok(())
}

// ---- Credentials and delegation ----

/// A certificate by which a mined identity (the issuer) lets `delegate` act until `expires`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delegation {
    /// The key allowed to sign requests.
    pub delegate: VerifyingKey,
    /// The issuer's public key; the issuer id is its hash.
    pub issuer: VerifyingKey,
    /// The issuer's proof-of-work nonce.
    pub issuer_nonce: u64,
    /// Unix seconds after which the certificate is void.
    pub expires: u64,
    /// The issuer's signature over the fields above.
    pub signature: Signature,
}

/// Encoded length of a [`Delegation`]: delegate 32, issuer 32, nonce 8, expiry 8, signature 64.
pub const DELEGATION_LEN: usize = 32 + 32 + 8 + 8 + 64;

impl Delegation {
    /// `issuer` vouches for `delegate` until `expires` (unix seconds).
    pub fn issue(issuer: &Identity, delegate: VerifyingKey, expires: u64) -> Self {
        let mut d = Delegation {
            delegate,
            issuer: issuer.public_key(),
            issuer_nonce: issuer.nonce,
            expires,
            signature: Signature::from_bytes(&[0; 64]),
        };
        d.signature = issuer.sign(&d.signed_bytes());
        d
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(DELEGATION_DOMAIN.len() + 80);
        b.extend_from_slice(DELEGATION_DOMAIN);
        b.extend_from_slice(self.delegate.as_bytes());
        b.extend_from_slice(self.issuer.as_bytes());
        b.extend_from_slice(&self.issuer_nonce.to_le_bytes());
        b.extend_from_slice(&self.expires.to_le_bytes());
        b
    }

    /// The issuer's id.
    pub fn issuer_id(&self) -> NodeId {
        NodeId::of(&self.issuer)
    }

    /// Checks the issuer's signature, the issuer's work and the expiry.
    pub fn verify(&self, min_difficulty: u8, now_unix: u64) -> Result<(), crate::auth::AuthError> {
        use crate::auth::AuthError;
        self.issuer
            .verify_strict(&self.signed_bytes(), &self.signature)
            .map_err(|_| AuthError::DelegationSignature)?;
        let have = pow_difficulty(&self.issuer, self.issuer_nonce);
        if have < u32::from(min_difficulty) {
            return Err(AuthError::InsufficientDifficulty { have, need: min_difficulty });
        }
        if now_unix >= self.expires {
            return Err(AuthError::DelegationExpired { expired: self.expires, now: now_unix });
        }
        Ok(())
    }

    /// Fixed-size binary encoding (see [`DELEGATION_LEN`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(DELEGATION_LEN);
        b.extend_from_slice(self.delegate.as_bytes());
        b.extend_from_slice(self.issuer.as_bytes());
        b.extend_from_slice(&self.issuer_nonce.to_le_bytes());
        b.extend_from_slice(&self.expires.to_le_bytes());
        b.extend_from_slice(&self.signature.to_bytes());
        b
    }

    /// Parses [`Delegation::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() != DELEGATION_LEN {
            return Err(Error::Malformed(format!(
                "delegation certificate is {} bytes, expected {DELEGATION_LEN}",
                b.len()
            )));
        }
        Ok(Delegation {
            delegate: parse_key(&b[0..32])?,
            issuer: parse_key(&b[32..64])?,
            issuer_nonce: u64::from_le_bytes(b[64..72].try_into().unwrap()),
            expires: u64::from_le_bytes(b[72..80].try_into().unwrap()),
            signature: Signature::from_bytes(b[80..144].try_into().unwrap()),
        })
    }
}

/// Parses a 32-byte ed25519 public key.
pub fn parse_key(b: &[u8]) -> Result<VerifyingKey> {
    let arr: [u8; 32] = b
        .try_into()
        .map_err(|_| Error::Malformed(format!("public key is {} bytes, expected 32", b.len())))?;
    VerifyingKey::from_bytes(&arr)
        .map_err(|_| Error::Malformed("public key is not a valid ed25519 point".into()))
}

/// How a caller presents itself: a mined key, or a key delegated by a mined issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// A mined identity: its key and proof-of-work nonce.
    Mined {
        /// Public key.
        key: VerifyingKey,
        /// Proof-of-work nonce.
        nonce: u64,
    },
    /// A delegated key.
    Delegated(Box<Delegation>),
}

impl Credential {
    /// The key that signs the caller's requests.
    pub fn signing_key(&self) -> &VerifyingKey {
        match self {
            Credential::Mined { key, .. } => key,
            Credential::Delegated(d) => &d.delegate,
        }
    }

    /// The caller's own id: hash of its signing key.
    pub fn id(&self) -> NodeId {
        NodeId::of(self.signing_key())
    }

    /// The proof-of-work difficulty behind the credential: its own, or its issuer's.
    pub fn difficulty(&self) -> u32 {
        match self {
            Credential::Mined { key, nonce } => pow_difficulty(key, *nonce),
            Credential::Delegated(d) => pow_difficulty(&d.issuer, d.issuer_nonce),
        }
    }

    /// The owner root: the node itself if mined, the issuer if delegated.
    pub fn root(&self) -> NodeId {
        match self {
            Credential::Mined { key, .. } => NodeId::of(key),
            Credential::Delegated(d) => d.issuer_id(),
        }
    }

    /// Encoding: tag byte 1 + key + nonce, or tag byte 2 + delegation.
    pub fn to_bytes(&self) -> Vec<u8> {
        match self {
            Credential::Mined { key, nonce } => {
                let mut b = vec![1u8];
                b.extend_from_slice(key.as_bytes());
                b.extend_from_slice(&nonce.to_le_bytes());
                b
            }
            Credential::Delegated(d) => {
                let mut b = vec![2u8];
                b.extend(d.to_bytes());
                b
            }
        }
    }

    /// Parses [`Credential::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        match b.first() {
            Some(1) if b.len() == 41 => Ok(Credential::Mined {
                key: parse_key(&b[1..33])?,
                nonce: u64::from_le_bytes(b[33..41].try_into().unwrap()),
            }),
            Some(2) => Ok(Credential::Delegated(Box::new(Delegation::from_bytes(&b[1..])?))),
            _ => Err(Error::Malformed(format!("credential of {} bytes is not valid", b.len()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop(_: u64) {}

    #[test]
    fn mined_identity_reaches_difficulty_and_verifies_in_one_hash() {
        let (id, report) = Identity::generate(10, 2, &noop).unwrap();
        assert!(id.difficulty() >= 10);
        assert_eq!(pow_difficulty(&id.public_key(), report.nonce), id.difficulty());
        assert!(report.hashes >= 1);
    }

    #[test]
    fn leading_zero_bits_counts_across_bytes() {
        assert_eq!(leading_zero_bits(&[0, 0, 0b0001_0000]), 19);
        assert_eq!(leading_zero_bits(&[0x80]), 0);
        assert_eq!(leading_zero_bits(&[0, 0]), 16);
    }

    #[test]
    fn key_file_round_trips_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let (id, _) = Identity::generate(4, 1, &noop).unwrap();
        id.save(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = Identity::load(&path).unwrap();
        assert_eq!(back.id(), id.id());
        assert_eq!(back.nonce, id.nonce);
    }

    #[test]
    fn world_readable_key_is_refused_with_a_hint() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let (id, _) = Identity::generate(4, 1, &noop).unwrap();
        id.save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load(&path).unwrap_err();
        assert!(matches!(err, Error::KeyFilePermissions { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn credential_and_delegation_round_trip() {
        let (issuer, _) = Identity::generate(6, 1, &noop).unwrap();
        let client = random_signing_key();
        let d = Delegation::issue(&issuer, client.verifying_key(), 1_000);
        let c = Credential::Delegated(Box::new(d.clone()));
        assert_eq!(Credential::from_bytes(&c.to_bytes()).unwrap(), c);
        assert_eq!(c.root(), issuer.id());
        assert_eq!(c.id(), NodeId::of(&client.verifying_key()));
        let m = issuer.credential();
        assert_eq!(Credential::from_bytes(&m.to_bytes()).unwrap(), m);
        assert!(Credential::from_bytes(&[9, 1, 2]).is_err());
    }
}
