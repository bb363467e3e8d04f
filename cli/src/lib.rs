//! The `shardfarm` command: argument parsing, output and exit codes over the client library
//! (put, get, stat, rm, nodes), `local up` (a farm of supervised processes), and the
//! subcommands that run the agent, a standalone coordinator and the operator. One binary.

#![warn(missing_docs)]

pub mod coordinator;
pub mod gateway;
pub mod ids;
pub mod local;
pub mod progress;

/// Creates `dir` (and its parents) and gives it to `owner` (`UID:GID`) with mode 0700: the
/// init step of agent pods on a hostPath, which the kubelet creates owned by root.
pub fn prepare_dir(dir: &std::path::Path, owner: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::os::unix::fs::PermissionsExt as _;
    let (uid, gid) = owner
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)))
        .with_context(|| format!("--owner `{owner}`: expected UID:GID, e.g. 65532:65532"))?;
    use std::os::unix::fs::MetadataExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if meta.uid() == uid && meta.gid() == gid && meta.mode() & 0o777 == 0o700 {
        return Ok(());
    }
    // The mode first, while the directory is still ours: changing the mode of a file one
    // does not own needs CAP_FOWNER, which the init container does not have (only CHOWN).
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .with_context(|| format!("giving {} to {uid}:{gid}", dir.display()))?;
    Ok(())
}
