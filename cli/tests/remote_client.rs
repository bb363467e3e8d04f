//! A client that knows a pool only by its coordinator's address and its pool key id: no farm
//! directory, a freshly mined identity of its own.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{BIN, Farm};

/// `shardfarm ARGS` with its configuration directory under `cfg`.
fn sf(cfg: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .env("XDG_CONFIG_HOME", cfg)
        .env_remove("SHARDFARM_FARM")
        .env_remove("SHARDFARM_POOL")
        .current_dir(cfg)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_client_with_only_an_address_and_a_pool_key_puts_gets_stats_and_removes() {
    let work = tempfile::tempdir().unwrap();
    let farm = Farm::start(&work.path().join("farm"));
    common::settled(&farm);
    let profile = shardfarm_client::PoolProfile::load(&farm.dir.join("pool.toml")).unwrap();
    let cfg = work.path().join("cfg");
    std::fs::create_dir_all(&cfg).unwrap();

    // No pool named: a usage error that says what to do.
    let out = sf(&cfg, &["nodes"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pool add"));

    // A mined identity of its own (the local farm's difficulty is 8), stored 0600.
    ok(sf(&cfg, &["identity", "new", "--difficulty", "8"]), "identity new");
    let key = cfg.join("shardfarm/identity.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let shown = ok(sf(&cfg, &["identity", "show"]), "identity show");
    assert!(shown.starts_with("mined identity"), "{shown}");
    let again = sf(&cfg, &["identity", "new", "--difficulty", "8"]);
    assert!(!again.status.success(), "identity new overwrote an existing key");
    // Delegation: a key from the mined root; never from a delegated key, never for 0 days.
    let ci = cfg.join("ci.key");
    ok(sf(&cfg, &["identity", "delegate", "--out", ci.to_str().unwrap()]), "identity delegate");
    let bad = sf(&cfg, &["identity", "delegate", "--root", ci.to_str().unwrap(), "--out", "x.key"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("only a mined identity"), "{bad:?}");
    let bad = sf(&cfg, &["identity", "delegate", "--days", "0", "--out", "y.key"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--days"), "{bad:?}");
    assert!(!cfg.join("x.key").exists() && !cfg.join("y.key").exists());
    // A profile name that is not one, and a pool id that is not hex: usage errors.
    let bad = sf(&cfg, &["pool", "add", "Bad Name", "--coordinator", "a:1", "--pool-id", "00"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let bad = sf(&cfg, &["pool", "add", "p", "--coordinator", "a:1", "--pool-id", "zz"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");

    // The profile: address + pinned pool key, nothing else.
    ok(
        sf(
            &cfg,
            &[
                "pool",
                "add",
                "remote",
                "--coordinator",
                &profile.coordinator,
                "--pool-id",
                &profile.pool_id,
            ],
        ),
        "pool add",
    );
    let shown = ok(sf(&cfg, &["--pool", "remote", "--json", "pool", "show"]), "pool show");
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(v["k"], 4);
    assert_eq!(v["min_difficulty"], 8);

    let file = work.path().join("in.bin");
    common::write_random(&file, 3_000_000, 7);
    let cap = ok(sf(&cfg, &["--pool", "remote", "put", file.to_str().unwrap()]), "put");
    let cap = cap.trim();
    let back = work.path().join("out.bin");
    ok(sf(&cfg, &["--pool", "remote", "get", cap, "-o", back.to_str().unwrap()]), "get");
    assert!(common::same(&file, &back));
    let st = ok(sf(&cfg, &["--pool", "remote", "--json", "stat", cap]), "stat");
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["length"], 3_000_000);
    // The farm's own client reads it too: same pool, same capability.
    let mine = farm.get(cap, &work.path().join("farm-copy.bin"));
    assert!(mine.status.success(), "{}", String::from_utf8_lossy(&mine.stderr));
    // Only the uploader deletes.
    let theirs = farm.sf(&["rm", cap]);
    assert!(!theirs.status.success(), "another identity deleted the object");
    ok(sf(&cfg, &["--pool", "remote", "rm", cap]), "rm");
    let gone = sf(&cfg, &["--pool", "remote", "get", cap, "-o", back.to_str().unwrap()]);
    assert!(!gone.status.success(), "a deleted object still reads");

    // A profile pinning another pool key: the coordinator cannot prove it; nothing is sent.
    let wrong = cfg.join("wrong.toml");
    let mut p = profile.clone();
    p.pool_id = "11".repeat(32);
    p.identity = None;
    p.save(&wrong).unwrap();
    let out = sf(&cfg, &["--pool", wrong.to_str().unwrap(), "put", file.to_str().unwrap()]);
    assert!(!out.status.success(), "a client trusted a coordinator that is not the pinned pool");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unreachable") || err.contains("pool"), "{err}");
}
