//! `shardfarm prepare-dir`, the init step of agent pods on a hostPath: it must work with only
//! the CHOWN capability (what the pod spec grants it), on a directory the kubelet created
//! owned by root.

use std::os::unix::fs::MetadataExt as _;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_shardfarm");

#[test]
fn the_data_dir_is_handed_to_the_agent_user_with_only_the_chown_capability() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node-a");
    std::fs::create_dir(&dir).unwrap();
    let root = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&root.stdout).trim() != "0" {
        // As anyone else: to oneself, with no capability at all.
        let me = std::fs::metadata(tmp.path()).unwrap();
        let owner = format!("{}:{}", me.uid(), me.gid());
        let out = Command::new(BIN)
            .args(["prepare-dir"])
            .arg(&dir)
            .args(["--owner", &owner])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        return;
    }
    // As root with every capability but CHOWN dropped, as in the pod.
    let with_chown_only = || {
        Command::new("setpriv")
            .args(["--bounding-set", "-all,+chown", "--inh-caps", "-all,+chown", "--"])
            .arg(BIN)
            .arg("prepare-dir")
            .arg(&dir)
            .args(["--owner", "65532:65532"])
            .output()
            .unwrap()
    };
    let out = with_chown_only();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = std::fs::metadata(&dir).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (65532, 65532, 0o700));
    // Again, now that it is prepared: nothing to do, still fine.
    let again = with_chown_only();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    // Bad input: a clear error, exit code other than success, nothing changed.
    let bad = Command::new(BIN)
        .arg("prepare-dir")
        .arg(&dir)
        .args(["--owner", "nobody"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected UID:GID"));
}
