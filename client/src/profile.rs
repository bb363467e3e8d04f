//! Pool profiles: how a client finds a pool and whom it trusts there.
//!
//! A profile is a small TOML file: the coordinator's address, the pinned pool key id (every
//! layout must be signed by it and the coordinator must prove it in the TLS handshake), and
//! optionally the identity file to sign with. `shardfarm local up` writes one into its farm
//! directory (`DIR/pool.toml`); `shardfarm pool add NAME` writes one under
//! `$XDG_CONFIG_HOME/shardfarm/pools/NAME.toml` (default `~/.config/shardfarm/pools/`).
//!
//! ```toml
//! coordinator = "pool.example.net:7398"
//! pool_id = "00003fa1…"          # 64 hex digits: the pool key's id, pinned
//! identity = "client.key"         # relative to this file's directory, or absolute
//! seeds = ["10.0.0.7:7400", "10.0.0.8:7400"]   # agents to bootstrap from (optional)
//! ```
//!
//! The data path needs no coordinator: a client takes the newest layout publication the pool
//! key signed from whichever of the coordinator, the seeds and the agents of its saved layout
//! answers, and saves it beside the profile ([`PoolProfile::layout_cache`]) as the starting
//! point of its next run. A seed is `host:port` (the agent's id is learnt in the handshake;
//! what it serves is checked against the pinned pool key) or `NODEID@host:port`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use shardfarm_core::identity::NodeId;

/// Name of the profile `shardfarm local up` writes into its farm directory.
pub const LOCAL_PROFILE: &str = "pool.toml";

/// Longest profile file read (a profile is a few lines; anything bigger is not one).
const MAX_PROFILE_BYTES: u64 = 64 << 10;

/// A pool profile.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolProfile {
    /// The coordinator's gRPC address, `host:port`.
    pub coordinator: String,
    /// The pool key's id (hex): pinned.
    pub pool_id: String,
    /// The identity to sign with: a mined identity or a delegated client key file. Relative
    /// paths are relative to the profile's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
    /// The pool runs plaintext HTTP/2 (debugging only); otherwise every hop is TLS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_plaintext: bool,
    /// Agents to bootstrap from while the coordinator is away: `host:port` or
    /// `NODEID@host:port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<String>,
    /// Where the profile was read from (not stored).
    #[serde(skip)]
    pub origin: Option<PathBuf>,
}

impl PoolProfile {
    /// A profile for the pool whose key id is `pool_id`, served at `coordinator`.
    pub fn new(coordinator: &str, pool_id: NodeId) -> Self {
        PoolProfile {
            coordinator: coordinator.to_string(),
            pool_id: pool_id.to_hex(),
            identity: None,
            insecure_plaintext: false,
            seeds: Vec::new(),
            origin: None,
        }
    }

    /// The pinned pool id.
    pub fn pool(&self) -> anyhow::Result<NodeId> {
        NodeId::from_hex(&self.pool_id).map_err(|e| anyhow::anyhow!("pool_id: {e}"))
    }

    /// Checks the fields (addresses of the form host:port, a 64-hex-digit pool id, at most
    /// [`MAX_SEEDS`] seeds).
    pub fn validate(&self) -> anyhow::Result<()> {
        self.pool()?;
        check_address(&self.coordinator).context("coordinator")?;
        if self.seeds.len() > MAX_SEEDS {
            bail!("{} seeds: at most {MAX_SEEDS}", self.seeds.len());
        }
        for s in &self.seeds {
            parse_seed(s).with_context(|| format!("seed `{s}`"))?;
        }
        Ok(())
    }

    /// The seeds, parsed: the node id when the seed names one, and the address.
    pub fn seed_list(&self) -> Vec<(Option<NodeId>, String)> {
        self.seeds.iter().filter_map(|s| parse_seed(s).ok()).collect()
    }

    /// Where the newest layout publication this profile's clients accepted is kept: beside
    /// the profile, `NAME.layout` for `NAME.toml` (None for a profile not read from a file).
    pub fn layout_cache(&self) -> Option<PathBuf> {
        self.origin.as_ref().map(|p| p.with_extension("layout"))
    }

    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(path)
            .with_context(|| format!("no pool profile at {}", path.display()))?;
        if meta.len() > MAX_PROFILE_BYTES {
            bail!("{} is {} bytes: not a pool profile", path.display(), meta.len());
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut p: PoolProfile = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid pool profile", path.display()))?;
        p.validate().with_context(|| path.display().to_string())?;
        p.origin = Some(path.to_path_buf());
        Ok(p)
    }

    /// Writes the profile (atomically; it holds no secret).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        self.validate()?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let text = format!(
            "# shardfarm pool profile: the coordinator and the pool key id every layout must be signed by\n{}",
            toml::to_string(self)?
        );
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The identity file, resolved against the profile's directory.
    pub fn identity_path(&self) -> Option<PathBuf> {
        let p = self.identity.as_ref()?;
        if p.is_absolute() {
            return Some(p.clone());
        }
        let base = self.origin.as_deref().and_then(Path::parent).unwrap_or(Path::new("."));
        Some(base.join(p))
    }
}

/// Most seeds a profile may name (each is asked at once when a client starts).
pub const MAX_SEEDS: usize = 32;

fn check_address(addr: &str) -> anyhow::Result<()> {
    let (host, port) =
        addr.rsplit_once(':').with_context(|| format!("`{addr}` is not host:port"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("`{addr}` is not host:port");
    }
    Ok(())
}

/// `host:port` or `NODEID@host:port`.
fn parse_seed(seed: &str) -> anyhow::Result<(Option<NodeId>, String)> {
    let (id, addr) = match seed.split_once('@') {
        Some((id, addr)) => {
            (Some(NodeId::from_hex(id).map_err(|e| anyhow::anyhow!("node id: {e}"))?), addr)
        }
        None => (None, seed),
    };
    check_address(addr)?;
    Ok((id, addr.to_string()))
}

/// The directory named profiles live in: `$XDG_CONFIG_HOME/shardfarm/pools`, else
/// `$HOME/.config/shardfarm/pools`.
pub fn profiles_dir() -> anyhow::Result<PathBuf> {
    Ok(config_dir()?.join("pools"))
}

/// `$XDG_CONFIG_HOME/shardfarm`, else `$HOME/.config/shardfarm`.
pub fn config_dir() -> anyhow::Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("shardfarm"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_CONFIG_HOME nor HOME is set: pass a profile path")?;
    Ok(PathBuf::from(home).join(".config").join("shardfarm"))
}

/// Where `--pool ARG` points: a path if it contains a `/` or ends in `.toml`, else the named
/// profile `ARG` in [`profiles_dir`].
pub fn resolve(arg: &str) -> anyhow::Result<PathBuf> {
    if arg.contains('/') || arg.ends_with(".toml") {
        return Ok(PathBuf::from(arg));
    }
    check_name(arg)?;
    Ok(profiles_dir()?.join(format!("{arg}.toml")))
}

/// A profile name: 1–63 of `[a-z0-9-_.]`, not starting with a dot.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if !ok {
        bail!("`{name}` is not a profile name: use 1-63 of a-z 0-9 - _ . (or give a path)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_round_trips_and_resolves_identity_next_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        let mut p = PoolProfile::new("127.0.0.1:7398", NodeId([7; 32]));
        p.identity = Some("client.key".into());
        p.save(&path).unwrap();
        let back = PoolProfile::load(&path).unwrap();
        assert_eq!(back.coordinator, p.coordinator);
        assert_eq!(back.pool().unwrap(), NodeId([7; 32]));
        assert_eq!(back.identity_path().unwrap(), dir.path().join("client.key"));
        assert_eq!(back.layout_cache().unwrap(), dir.path().join("p.layout"));
        assert!(back.seeds.is_empty());
        let id = NodeId([9; 32]);
        p.seeds = vec!["10.0.0.7:7400".into(), format!("{}@10.0.0.8:7400", id.to_hex())];
        p.save(&path).unwrap();
        let back = PoolProfile::load(&path).unwrap();
        assert_eq!(
            back.seed_list(),
            vec![(None, "10.0.0.7:7400".to_string()), (Some(id), "10.0.0.8:7400".to_string())]
        );
    }

    #[test]
    fn bad_profiles_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        for (text, why) in [
            (
                "coordinator = \"nohost\"\npool_id = \"".to_string() + &"0".repeat(64) + "\"",
                "host:port",
            ),
            ("coordinator = \"a:1\"\npool_id = \"xyz\"".to_string(), "pool_id"),
            (
                "coordinator = \"a:1\"\npool_id = \"".to_string()
                    + &"0".repeat(64)
                    + "\"\nextra = 1",
                "unknown field",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = format!("{:#}", PoolProfile::load(&path).unwrap_err());
            assert!(e.contains(why), "{e}");
        }
        let zeros = "0".repeat(64);
        for (seed, why) in
            [("nohost", "host:port"), ("xyz@a:1", "node id"), ("a:99999", "host:port")]
        {
            let text =
                format!("coordinator = \"a:1\"\npool_id = \"{zeros}\"\nseeds = [\"{seed}\"]");
            std::fs::write(&path, text).unwrap();
            let e = format!("{:#}", PoolProfile::load(&path).unwrap_err());
            assert!(e.contains(why), "{seed}: {e}");
        }
        std::fs::write(&path, vec![b'#'; 70_000]).unwrap();
        assert!(
            format!("{:#}", PoolProfile::load(&path).unwrap_err()).contains("not a pool profile")
        );
    }

    #[test]
    fn names_resolve_under_the_config_dir_and_paths_stay_paths() {
        assert_eq!(resolve("./x.toml").unwrap(), PathBuf::from("./x.toml"));
        assert_eq!(resolve("/a/b").unwrap(), PathBuf::from("/a/b"));
        assert!(resolve("Bad Name").is_err());
        assert!(resolve("..").is_err());
    }
}
