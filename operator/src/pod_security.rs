//! Which Pod Security Standards level a pod the operator renders needs, and whether its
//! namespace's Pod Security admission lets it in.
//!
//! A farm on hostPath, a DaemonSet farm (always on hostPath) and a `HostNetwork` farm need
//! `privileged`: `baseline` already refuses hostPath volumes, host namespaces and host ports. In
//! a namespace labelled `pod-security.kubernetes.io/enforce=restricted` (or `baseline`) their
//! StatefulSet or DaemonSet is applied, but every pod is refused — visible only as
//! `FailedCreate` events on the workload. The farm controller compares the level its pods need
//! ([`needs`], computed from the pod spec it applies, so it follows the rendering) with the
//! namespace's label and says so on the farm (condition `PodSecurityRefused`, a Warning).
//!
//! The checks are those of the Pod Security Standards
//! (<https://kubernetes.io/docs/concepts/security/pod-security-standards/>) that can apply to
//! the pods this operator renders; `scripts/check-chart.py` runs the same ones over the
//! rendered examples against README's table. Not read: the cluster-wide default level (an
//! AdmissionConfiguration file of the API server, for namespaces without the label) and
//! exemptions; the `enforce-version` label (the checks here have not changed across versions).

use serde_json::Value;

/// The namespace label Pod Security admission enforces.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// A Pod Security Standards level, ordered from the most permissive to the strictest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Anything.
    Privileged,
    /// No known privilege escalations: no host namespaces, ports or paths, no privileged
    /// containers, only the default capabilities.
    Baseline,
    /// Hardened: non-root, every capability dropped, no privilege escalation, a seccomp
    /// profile, only volumes of the restricted types.
    Restricted,
}

impl Level {
    /// The level a label value names, if any.
    pub fn parse(value: &str) -> Option<Level> {
        match value {
            "privileged" => Some(Level::Privileged),
            "baseline" => Some(Level::Baseline),
            "restricted" => Some(Level::Restricted),
            _ => None,
        }
    }

    /// Its name, as the label writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Privileged => "privileged",
            Level::Baseline => "baseline",
            Level::Restricted => "restricted",
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Capabilities `baseline` allows a container to add.
const BASELINE_CAPS: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Volume types `restricted` allows.
const RESTRICTED_VOLUMES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
    "image",
];

/// The strictest level that admits the pod spec `pod`, and why the next stricter one does not
/// (empty for `restricted`).
pub fn needs(pod: &Value) -> (Level, Vec<String>) {
    let (mut base, mut restr) = (Vec::new(), Vec::new());
    let psc = &pod["securityContext"];
    for k in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[k] == true {
            base.push(k.to_string());
        }
    }
    for v in pod["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default();
        let kinds: Vec<&str> = v
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .map(String::as_str)
            .filter(|k| *k != "name")
            .collect();
        if kinds.contains(&"hostPath") {
            base.push(format!("hostPath volume {name}"));
        }
        if kinds.iter().any(|k| !RESTRICTED_VOLUMES.contains(k)) {
            restr.push(format!("volume {name} of type {}", kinds.join(",")));
        }
    }
    if psc["seccompProfile"]["type"] == "Unconfined" {
        base.push("seccomp Unconfined".into());
    }
    if psc["runAsUser"] == 0 {
        restr.push("pod: runAsUser 0".into());
    }
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .into_iter()
        .flat_map(|k| pod[k].as_array().into_iter().flatten());
    for c in containers {
        let (sc, name) = (&c["securityContext"], c["name"].as_str().unwrap_or_default());
        if sc["privileged"] == true {
            base.push(format!("{name}: privileged"));
        }
        for p in c["ports"].as_array().into_iter().flatten() {
            if let Some(port) = p["hostPort"].as_u64().filter(|p| *p > 0) {
                base.push(format!("{name}: hostPort {port}"));
            }
        }
        let added: Vec<&str> = sc["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let beyond: Vec<&str> =
            added.iter().copied().filter(|c| !BASELINE_CAPS.contains(c)).collect();
        if !beyond.is_empty() {
            base.push(format!("{name}: adds {}", beyond.join(",")));
        }
        if added.iter().any(|c| *c != "NET_BIND_SERVICE") {
            restr.push(format!("{name}: adds capabilities {}", added.join(",")));
        }
        let drops_all =
            sc["capabilities"]["drop"].as_array().is_some_and(|d| d.iter().any(|c| c == "ALL"));
        if !drops_all {
            restr.push(format!("{name}: does not drop ALL capabilities"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            restr.push(format!("{name}: allowPrivilegeEscalation not false"));
        }
        if sc["seccompProfile"]["type"] == "Unconfined" {
            base.push(format!("{name}: seccomp Unconfined"));
        }
        let seccomp = if sc["seccompProfile"].is_object() {
            &sc["seccompProfile"]["type"]
        } else {
            &psc["seccompProfile"]["type"]
        };
        if seccomp != "RuntimeDefault" && seccomp != "Localhost" {
            restr.push(format!("{name}: no seccomp profile RuntimeDefault"));
        }
        let non_root = if sc["runAsNonRoot"].is_boolean() {
            &sc["runAsNonRoot"]
        } else {
            &psc["runAsNonRoot"]
        };
        if non_root != true {
            restr.push(format!("{name}: runAsNonRoot not true"));
        }
        let user = if sc["runAsUser"].is_number() { &sc["runAsUser"] } else { &psc["runAsUser"] };
        if user == 0 {
            restr.push(format!("{name}: runAsUser 0"));
        }
    }
    if !base.is_empty() {
        (Level::Privileged, base)
    } else if !restr.is_empty() {
        (Level::Baseline, restr)
    } else {
        (Level::Restricted, Vec::new())
    }
}

/// Whether a namespace whose labels are `labels` refuses pods that need `needed`: `Some(level)`
/// when it enforces a stricter `level`; None when it admits them or says nothing (no label,
/// or a value that is not a level).
pub fn refused_by(
    labels: &std::collections::BTreeMap<String, String>,
    needed: Level,
) -> Option<Level> {
    labels.get(ENFORCE_LABEL).and_then(|v| Level::parse(v)).filter(|l| *l > needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The levels README's Pod Security table states for each farm mode, from the pods the
    /// operator renders for the examples (`examples/rendered/`).
    #[test]
    fn each_example_farms_pods_need_the_level_readme_states() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rendered");
        let want = [
            ("statefulset-rack-a.yaml", Level::Restricted, ""),
            ("statefulset-rack-c.yaml", Level::Privileged, "hostPath volume data"),
            ("daemonset-racks.yaml", Level::Privileged, "hostPath volume data"),
            ("statefulset-rack-edge.yaml", Level::Privileged, "hostNetwork"),
        ];
        for (file, level, reason) in want {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let object: Value = serde_yaml::from_str(&text).unwrap();
            let (got, why) = needs(&object["spec"]["template"]["spec"]);
            assert_eq!(got, level, "{file}: {why:?}");
            if level == Level::Restricted {
                assert!(why.is_empty(), "{file}: {why:?}");
            } else {
                assert!(why.iter().any(|w| w.contains(reason)), "{file}: {why:?}");
            }
        }
    }

    #[test]
    fn a_namespace_refuses_only_what_its_enforced_level_is_stricter_than() {
        let ns = |v: &str| std::collections::BTreeMap::from([(ENFORCE_LABEL.into(), v.into())]);
        assert_eq!(refused_by(&ns("restricted"), Level::Privileged), Some(Level::Restricted));
        assert_eq!(refused_by(&ns("baseline"), Level::Privileged), Some(Level::Baseline));
        assert_eq!(refused_by(&ns("baseline"), Level::Restricted), None);
        assert_eq!(refused_by(&ns("privileged"), Level::Privileged), None);
        assert_eq!(refused_by(&ns("restricted"), Level::Restricted), None);
        assert_eq!(refused_by(&ns("nonsense"), Level::Privileged), None);
        assert_eq!(refused_by(&Default::default(), Level::Privileged), None);
    }
}
