//! Who is calling: the users file (access key, SigV4 secret, pool identity per user), the
//! secrets s3s checks signatures with, and the presigned-URL limits S3 enforces before the
//! signature.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use s3s::{S3Request, S3Result, s3_error};
use serde::Deserialize;
use shardfarm_client::{ClientIdentity, PoolClient, PoolProfile, Silent};

use crate::server::error_response;
use crate::service::{Gateway, now_ms};

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
pub(crate) async fn load_users(
    text: &str,
    profile: &PoolProfile,
) -> anyhow::Result<HashMap<String, User>> {
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

/// SigV4 secrets by access key.
pub(crate) struct Auth(pub(crate) HashMap<String, String>);

#[async_trait::async_trait]
impl s3s::auth::S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<s3s::auth::SecretKey> {
        self.0
            .get(access_key)
            .map(|s| s.clone().into())
            .ok_or_else(|| s3_error!(InvalidAccessKeyId))
    }
}

impl Gateway {
    /// The caller's access key and user (s3s has checked the signature).
    pub(crate) fn caller<T>(&self, req: &S3Request<T>) -> S3Result<(String, &User)> {
        let creds =
            req.credentials.as_ref().ok_or_else(|| s3_error!(AccessDenied, "sign the request"))?;
        let user =
            self.users.get(&creds.access_key).ok_or_else(|| s3_error!(InvalidAccessKeyId))?;
        Ok((creds.access_key.clone(), user))
    }
}

/// The longest a SigV4 presigned URL may live (S3: 604 800 s, 7 days).
pub(crate) const MAX_PRESIGNED_EXPIRY: i64 = 7 * 24 * 3600;

/// The presigned-URL limits S3 enforces before the signature: a SigV4 X-Amz-Expires above 7
/// days (or not a number) is refused, a negative one has expired. A SigV2 URL (which boto3
/// makes for a custom endpoint) names its expiry as a time: one more than 7 days ahead is
/// refused the same way, so no URL the gateway serves outlives a week.
pub(crate) fn presigned_refusal(uri: &http::Uri) -> Option<http::Response<s3s::Body>> {
    let query = uri.query()?;
    let param = |name: &str| query.split('&').find_map(|p| p.strip_prefix(name));
    let denied = |msg: &str| Some(error_response(http::StatusCode::FORBIDDEN, "AccessDenied", msg));
    let too_long = "X-Amz-Expires must be less than a week (in seconds) that is; 604800";
    if param("X-Amz-Signature=").is_some() {
        let expires = param("X-Amz-Expires=")?;
        return match expires.parse::<i64>() {
            Ok(e) if e < 0 => denied("Request has expired"),
            Ok(e) if e <= MAX_PRESIGNED_EXPIRY => None,
            _ => denied(too_long),
        };
    }
    if param("Signature=").is_some() {
        let expires = param("Expires=")?.parse::<i64>().ok()?;
        let now = (now_ms() / 1000) as i64;
        if expires.saturating_sub(now) > MAX_PRESIGNED_EXPIRY {
            return denied(too_long);
        }
    }
    None
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

    #[test]
    fn presigned_urls_past_seven_days_or_negative_are_refused() {
        let uri = |q: &str| format!("/b/k?X-Amz-Signature=ab&{q}").parse::<http::Uri>().unwrap();
        assert!(presigned_refusal(&uri("X-Amz-Expires=604800")).is_none());
        assert!(presigned_refusal(&uri("X-Amz-Expires=604801")).is_some());
        assert!(presigned_refusal(&uri("X-Amz-Expires=-1")).is_some());
        assert!(presigned_refusal(&"/b/k?X-Amz-Expires=9999999".parse().unwrap()).is_none());
        let now = (now_ms() / 1000) as i64;
        let v2 = |e: i64| format!("/b/k?AWSAccessKeyId=A&Signature=x&Expires={e}").parse().unwrap();
        assert!(presigned_refusal(&v2(now + 3600)).is_none());
        assert!(presigned_refusal(&v2(now + 609_901)).is_some());
    }
}
