//! `shardfarm gateway`: an S3-compatible endpoint over a pool, on the `s3s` crate (the S3
//! protocol: types generated from the AWS Smithy model, SigV4 and aws-chunked payloads).
//!
//! Each S3 access key maps to a client identity of its own: what a user uploads is signed by
//! that identity, so only that user can delete it, at the gateway and at every node. The
//! namespace (buckets, keys → capabilities, sizes, ETags, metadata) lives in an embedded
//! index and, durably, in the pool as a log signed by the gateway's root key
//! ([`namespace`]). One gateway per root key: two writers would fork the log.

pub mod namespace;
mod s3;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;
use shardfarm_client::{ClientIdentity, PoolClient, PoolProfile, Silent};

/// How often completed multipart uploads older than their retention are forgotten (an hour:
/// they are ~200 bytes each, and the retention is a day).
const FORGET_INTERVAL: Duration = Duration::from_secs(3600);

/// How long in-flight requests may finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// `shardfarm gateway`.
#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// Address to serve S3 on.
    #[arg(long, env = "SHARDFARM_GATEWAY_LISTEN", default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Directory of the gateway's index (RocksDB). It can be lost: a gateway with the same
    /// root key rebuilds it from the pool.
    #[arg(long, env = "SHARDFARM_GATEWAY_DATA")]
    pub data: PathBuf,
    /// The pool's coordinator, host:port (instead of a profile given with --pool or --farm).
    #[arg(long, env = "SHARDFARM_COORDINATOR", requires = "pool_id")]
    pub coordinator: Option<String>,
    /// The pool key id to pin (64 hex digits), with --coordinator.
    #[arg(long, env = "SHARDFARM_POOL_ID", requires = "coordinator")]
    pub pool_id: Option<String>,
    /// The pool runs without TLS (debugging only), with --coordinator.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// The gateway's root identity file (mined or delegated): it signs the namespace log and
    /// its key derives where the log lives. Or SHARDFARM_GATEWAY_ROOT_KEY_TEXT (its text).
    #[arg(long, env = "SHARDFARM_GATEWAY_ROOT_KEY")]
    pub root_key: Option<PathBuf>,
    /// The users file (TOML: `[[users]]` with access_key, secret_key or secret_key_env, and
    /// identity_file or identity_env). Or SHARDFARM_GATEWAY_USERS_TEXT (its text).
    #[arg(long, env = "SHARDFARM_GATEWAY_USERS")]
    pub users: Option<PathBuf>,
    /// Structured (JSON) logs.
    #[arg(long, env = "SHARDFARM_JSON_LOGS")]
    pub json_logs: bool,
}

/// The users file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<UserEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    access_key: String,
    secret_key: Option<String>,
    secret_key_env: Option<String>,
    identity_file: Option<PathBuf>,
    identity_env: Option<String>,
}

/// One S3 user: its secret (for SigV4) and its pool client (its own identity).
pub struct User {
    /// The SigV4 secret key.
    pub secret: String,
    /// The client signing as this user's identity.
    pub client: Arc<PoolClient>,
}

/// Most users one gateway serves.
const MAX_USERS: usize = 256;

fn env_text(var: &str, what: &str) -> anyhow::Result<String> {
    std::env::var(var).with_context(|| format!("{what}: environment variable {var} is not set"))
}

fn load_identity(
    file: Option<&Path>,
    env: Option<&str>,
    what: &str,
) -> anyhow::Result<ClientIdentity> {
    match (file, env) {
        (Some(f), None) => ClientIdentity::load(f).with_context(|| what.to_string()),
        (None, Some(var)) => ClientIdentity::from_text(&env_text(var, what)?, var),
        _ => bail!("{what}: give exactly one of identity_file and identity_env"),
    }
}

/// Parses and checks the users file: (access key, secret, identity) per user.
fn parse_users(text: &str) -> anyhow::Result<Vec<(String, String, ClientIdentity)>> {
    // Not the parser's own message: it quotes the offending line, which may hold a secret.
    let file: UsersFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(0, |s| text[..s.start.min(text.len())].lines().count().max(1));
        anyhow::anyhow!("the users file is not valid: {} (line {line})", e.message())
    })?;
    if file.users.len() > MAX_USERS {
        bail!("the users file lists {} users; at most {MAX_USERS}", file.users.len());
    }
    let mut out: Vec<(String, String, ClientIdentity)> = Vec::new();
    for u in file.users {
        let what = format!("user {}", u.access_key);
        if u.access_key.len() < 3
            || u.access_key.len() > 128
            || !u.access_key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
        {
            bail!("{what}: an access key is 3-128 of A-Z a-z 0-9 . _ ~ -");
        }
        if out.iter().any(|(k, _, _)| *k == u.access_key) {
            bail!("{what} is listed twice");
        }
        let secret = match (u.secret_key, u.secret_key_env) {
            (Some(s), None) => s,
            (None, Some(var)) => env_text(&var, &what)?,
            _ => bail!("{what}: give exactly one of secret_key and secret_key_env"),
        };
        if secret.len() < 8 || secret.len() > 128 {
            bail!("{what}: the secret key must be 8-128 characters");
        }
        let id = load_identity(u.identity_file.as_deref(), u.identity_env.as_deref(), &what)?;
        out.push((u.access_key, secret, id));
    }
    Ok(out)
}

/// Parses the users file and opens one pool client per user.
async fn load_users(text: &str, profile: &PoolProfile) -> anyhow::Result<HashMap<String, User>> {
    let parsed = parse_users(text)?;
    if parsed.is_empty() {
        tracing::warn!("the users file lists no users: every request will be refused");
    }
    let mut users = HashMap::new();
    for (access_key, secret, id) in parsed {
        let client = PoolClient::connect(profile.clone(), &id, Arc::new(Silent)).await?;
        users.insert(access_key, User { secret, client });
    }
    Ok(users)
}

/// Runs the gateway until SIGTERM/SIGINT. `profile` is the pool profile from --pool/--farm
/// when --coordinator is not given.
pub async fn run(args: GatewayArgs, profile: Option<PathBuf>) -> anyhow::Result<()> {
    let profile = match (&args.coordinator, &args.pool_id, profile) {
        (Some(addr), Some(id), _) => {
            let id = shardfarm_core::identity::NodeId::from_hex(id)
                .map_err(|e| anyhow::anyhow!("--pool-id: {e}"))?;
            let mut p = PoolProfile::new(addr, id);
            p.insecure_plaintext = args.insecure_plaintext;
            p
        }
        (_, _, Some(path)) => PoolProfile::load(&path)?,
        _ => bail!("no pool: pass --coordinator and --pool-id, or --pool/--farm before `gateway`"),
    };
    let root_id = match (&args.root_key, std::env::var("SHARDFARM_GATEWAY_ROOT_KEY_TEXT")) {
        (Some(f), _) => ClientIdentity::load(f).context("--root-key")?,
        (None, Ok(text)) => ClientIdentity::from_text(&text, "SHARDFARM_GATEWAY_ROOT_KEY_TEXT")?,
        (None, Err(_)) => {
            bail!("no root key: pass --root-key FILE or set SHARDFARM_GATEWAY_ROOT_KEY_TEXT")
        }
    };
    let users_text = match (&args.users, std::env::var("SHARDFARM_GATEWAY_USERS_TEXT")) {
        (Some(f), _) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, Ok(text)) => text,
        (None, Err(_)) => bail!("no users: pass --users FILE or set SHARDFARM_GATEWAY_USERS_TEXT"),
    };
    let root = PoolClient::connect(profile.clone(), &root_id, Arc::new(Silent))
        .await
        .context("opening the pool with the root key")?;
    let users = load_users(&users_text, &profile).await?;

    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let index = Arc::new(namespace::Index::open(&args.data.join("index"))?);
    let before = index.next_seq()?;
    let applied = namespace::catch_up(&root, &index).await?;
    tracing::info!(
        entries = applied,
        from = before,
        next = index.next_seq()?,
        "namespace index is up to date with the pool's log"
    );
    // Completed multipart uploads are remembered for retried Completes, then forgotten.
    let forgetting = index.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(FORGET_INTERVAL);
        loop {
            every.tick().await;
            let idx = forgetting.clone();
            match tokio::task::spawn_blocking(move || idx.forget_completed_uploads()).await {
                Ok(Ok(n)) if n > 0 => tracing::info!(n, "forgot old completed uploads"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not forget completed uploads"),
                _ => {}
            }
        }
    });
    let log = namespace::Log::start(root.clone(), index.clone());
    let spool = args.data.join("spool");
    std::fs::create_dir_all(&spool)?;
    let gateway = s3::Gateway::new(users, index, log, spool);
    s3::serve(gateway, args.listen, SHUTDOWN_GRACE).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path) -> PathBuf {
        let root = shardfarm_core::identity::Identity::from_parts(
            shardfarm_core::identity::random_signing_key(),
            0,
        );
        let path = dir.join("k.key");
        shardfarm_client::ClientKey::issue(&root, 1).save(&path).unwrap();
        path
    }

    fn user(access: &str, secret: &str, key: &Path) -> String {
        format!(
            "[[users]]\naccess_key = \"{access}\"\nsecret_key = \"{secret}\"\nidentity_file = \"{}\"\n",
            key.display()
        )
    }

    #[test]
    fn a_good_users_file_parses_and_an_empty_one_is_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path());
        let users = parse_users(
            &(user("ALICE", "a-secret-key", &key) + &user("bob.2", "b-secret-key", &key)),
        )
        .unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users[1].0, "bob.2");
        assert!(parse_users("users = []").unwrap().is_empty());
    }

    #[test]
    fn bad_users_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path());
        let ok = user("ALICE", "a-secret-key", &key);
        let cases = [
            (user("A", "a-secret-key", &key), "access key"),
            (user("AL ICE", "a-secret-key", &key), "access key"),
            (user("ALICE", "short", &key), "8-128"),
            (ok.clone() + &ok, "twice"),
            (
                ok.replace("secret_key = \"a-secret-key\"", "secret_key_env = \"SF_NO_SUCH_VAR\""),
                "SF_NO_SUCH_VAR",
            ),
            (ok.replace("identity_file", "identity_env = \"X\"\nidentity_file"), "exactly one"),
            (ok.clone() + "color = \"red\"\n", "not valid"),
            (user("ALICE", "a-secret-key", &dir.path().join("missing.key")), "ALICE"),
        ];
        // A broken line is named by its number, never quoted: it may hold a secret.
        let broken = "[[users]]\naccess_key = \"ALICE\"\nsecret_key = \"s3cr3t-value\n";
        let e = format!("{:#}", parse_users(broken).err().unwrap());
        assert!(e.contains("line 3") && !e.contains("s3cr3t"), "{e}");
        for (text, why) in cases {
            let e = format!(
                "{:#}",
                parse_users(&text).err().unwrap_or_else(|| panic!("accepted:\n{text}"))
            );
            assert!(e.contains(why), "{why}: {e}");
        }
        let many: String =
            (0..=MAX_USERS).map(|i| user(&format!("U{i:04}"), "a-secret-key", &key)).collect();
        assert!(format!("{:#}", parse_users(&many).err().unwrap()).contains("at most"));
    }
}
