//! `shardfarm identity …` and `shardfarm pool …`: client identities and pool profiles.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use shardfarm_client::{ClientIdentity, ClientKey, PoolProfile, profile};
use shardfarm_core::identity::{DEFAULT_DIFFICULTY, Identity, NodeId};

/// `shardfarm identity`.
#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Mine a client identity (an ed25519 key with proof of work) and store it with mode 0600.
    ///
    /// Agents serve only identities mined to the pool's difficulty (or keys delegated by
    /// one): the StoragePool's spec.admission.minIdentityDifficulty, 28 by default. Mining
    /// takes 2^D hashes on average, about 2^D / (2 M/s × cores) seconds: ~1 min at D = 28 on
    /// 2 cores. `shardfarm pool show` prints a pool's difficulty.
    New(NewArgs),
    /// Issue a delegated key from a mined identity: a fresh key and a certificate, signed by
    /// the root, that lets it act for the root until it expires. Give one to each program,
    /// machine or gateway user instead of copying the root. The pool limits how many ids one
    /// root may have as members; clients are not members and are not counted.
    Delegate(DelegateArgs),
    /// Show what an identity file holds: kind, id, root, difficulty, expiry (never the secret).
    Show {
        /// The identity file [default: the configuration directory's identity.key].
        file: Option<PathBuf>,
    },
}

/// `shardfarm identity new`.
#[derive(Args)]
pub struct NewArgs {
    /// Where to write it [default: $XDG_CONFIG_HOME/shardfarm/identity.key].
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Leading zero bits to mine: at least the pool's.
    #[arg(long, default_value_t = DEFAULT_DIFFICULTY)]
    pub difficulty: u8,
    /// Mining threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

/// `shardfarm identity delegate`.
#[derive(Args)]
pub struct DelegateArgs {
    /// The mined root identity that vouches [default: the configuration directory's
    /// identity.key].
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Where to write the delegated key (mode 0600).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Days it is valid (at most 3650).
    #[arg(long, default_value_t = 90)]
    pub days: u64,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

/// `shardfarm pool`.
#[derive(Subcommand)]
pub enum PoolCommand {
    /// Save a profile for a pool: its coordinator's address and its pool key id (which every
    /// layout must be signed by and the coordinator must prove). Then `shardfarm --pool NAME
    /// put FILE`.
    Add {
        /// The profile's name (or a path ending in .toml).
        name: String,
        /// The coordinator's gRPC address, host:port.
        #[arg(long)]
        coordinator: String,
        /// The pool key id (64 hex digits), from the pool's owner; in a cluster,
        /// `kubectl get sfpool NAME -o jsonpath='{.status.poolId}'`.
        #[arg(long)]
        pool_id: String,
        /// The identity file to sign with (else --identity or the default identity.key).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The pool runs without TLS (debugging only).
        #[arg(long)]
        insecure_plaintext: bool,
        /// An agent to read the pool's signed layout from while the coordinator is away
        /// (host:port or NODEID@host:port; repeat it). Reads and writes need no coordinator.
        #[arg(long = "seed", value_name = "ADDR")]
        seeds: Vec<String>,
        /// Replace an existing profile.
        #[arg(long)]
        force: bool,
    },
    /// Reach the pool and show what it is: name, profile, segment size, difficulty, layout.
    Show,
}

/// The default identity file, `$XDG_CONFIG_HOME/shardfarm/identity.key`.
pub fn default_identity() -> anyhow::Result<PathBuf> {
    Ok(profile::config_dir()?.join("identity.key"))
}

fn refuse_overwrite(path: &Path, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        bail!("{} exists: pass --force to replace it (the old key is lost)", path.display());
    }
    Ok(())
}

/// `identity new`: mines at `difficulty`, with a progress line and an ETA on a terminal.
pub fn new_identity(args: &NewArgs) -> anyhow::Result<PathBuf> {
    let out = match &args.out {
        Some(p) => p.clone(),
        None => default_identity()?,
    };
    refuse_overwrite(&out, args.force)?;
    let d = args.difficulty;
    let expected = 2f64.powi(i32::from(d));
    let bar = std::io::stderr().is_terminal().then(|| {
        let pb = indicatif::ProgressBar::new(expected as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "mining [{bar:30}] {human_pos}/{human_len} hashes (expected) {per_sec} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb
    });
    let progress = |hashes: u64| {
        if let Some(pb) = &bar {
            pb.set_position(hashes.min(expected as u64));
        }
    };
    eprintln!("mining an identity at difficulty {d} (2^{d} hashes expected)…");
    let (id, report) = Identity::generate(d, args.threads, &progress)?;
    if let Some(pb) = bar {
        pb.finish_and_clear();
    }
    id.save(&out)?;
    eprintln!(
        "mined {} in {:.1} s ({:.1} M hashes/s on {} threads); wrote {}",
        id.id().to_hex(),
        report.seconds,
        report.hash_rate() / 1e6,
        report.threads,
        out.display()
    );
    Ok(out)
}

/// `identity delegate`.
pub fn delegate(args: &DelegateArgs) -> anyhow::Result<ClientKey> {
    if args.days == 0 || args.days > 3650 {
        bail!("--days must be 1 to 3650");
    }
    refuse_overwrite(&args.out, args.force)?;
    let root_path = match &args.root {
        Some(p) => p.clone(),
        None => default_identity()?,
    };
    let root = match ClientIdentity::load(&root_path)
        .with_context(|| format!("reading the root identity {}", root_path.display()))?
    {
        ClientIdentity::Mined(id) => id,
        ClientIdentity::Delegated(_) => bail!(
            "{} is a delegated key: only a mined identity may delegate (delegations do not chain)",
            root_path.display()
        ),
    };
    let ck = ClientKey::issue(&root, args.days);
    ck.save(&args.out)?;
    Ok(ck)
}

/// `identity show`.
pub fn show(file: Option<PathBuf>) -> anyhow::Result<String> {
    let path = match file {
        Some(p) => p,
        None => default_identity()?,
    };
    Ok(ClientIdentity::load(&path)?.describe())
}

/// `pool add`.
pub fn add_pool(
    name: &str,
    coordinator: &str,
    pool_id: &str,
    identity: Option<PathBuf>,
    insecure_plaintext: bool,
    seeds: Vec<String>,
    force: bool,
) -> anyhow::Result<PathBuf> {
    let path = profile::resolve(name)?;
    refuse_overwrite(&path, force)?;
    let id = NodeId::from_hex(pool_id).map_err(|e| anyhow::anyhow!("--pool-id: {e}"))?;
    let mut p = PoolProfile::new(coordinator, id);
    p.identity = identity.map(|i| std::path::absolute(&i).unwrap_or(i));
    p.insecure_plaintext = insecure_plaintext;
    p.seeds = seeds;
    p.save(&path)?;
    Ok(path)
}
