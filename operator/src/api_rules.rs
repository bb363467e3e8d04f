//! What kube-apiserver refuses in the objects this operator writes, in one place.
//!
//! The mocked API servers of the tests answer every write through [`check_write`], so a
//! controller whose object the real server would refuse fails its tests the way it would fail
//! in a cluster: with the same status code, reason and message. No maintained crate checks
//! these rules (k8s-openapi and kube carry the types, not the server's validation), so they
//! are written here from kube-apiserver's (`k8s.io/apimachinery/pkg/util/validation`,
//! `pkg/apis/core/validation`, the registry's update and create checks):
//!
//! - object names: a DNS-1123 subdomain (≤ 253 bytes) for most kinds, a DNS-1035 label
//!   (≤ 63) for Services, a DNS-1123 label for Namespaces; required on create and update;
//!   the name and namespace in the body match the URL's;
//! - labels (object, pod template, `matchLabels`, a Service's selector): keys are qualified
//!   names (optional DNS-1123 subdomain prefix ≤ 253 and `/`, a name part ≤ 63 of
//!   alphanumerics, `-`, `_`, `.` starting and ending alphanumeric), values ≤ 63 bytes
//!   matching `(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?`;
//! - annotations: qualified-name keys, keys and values ≤ 256 KiB in total;
//! - owner references: apiVersion, kind, name and uid present, at most one controller;
//! - ConfigMaps and Secrets: data keys (`[-._a-zA-Z0-9]+`, ≤ 253, not `.`/`..`), data ≤ 1 MiB;
//!   once `immutable`, no change to data, binaryData, `immutable` or a Secret's type;
//! - events.k8s.io Events: a note of at most 1 KiB;
//! - immutable spec fields: a StatefulSet's selector, serviceName, podManagementPolicy and
//!   volumeClaimTemplates; a DaemonSet's selector; a Service's clusterIP;
//! - concurrency: an update carrying a resourceVersion other than the stored one is a 409
//!   Conflict; a create carrying one is refused; a create of an existing object is a 409
//!   AlreadyExists.
//!
//! Not checked (the server does, and a test cannot know): whether an owner reference names an
//! object that exists (the server accepts it; the garbage collector then deletes the
//! dependent), schemas of the built-in kinds beyond the fields above, admission (PodSecurity,
//! quotas), and the etcd request limit (≈ 1.5 MiB per object, above the 1 MiB data limit).
//!
//! [`label_value`] is for production code: the label value that stands for a name that may
//! not fit one.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// Longest label value, and longest name part of a qualified name.
pub const MAX_LABEL_VALUE: usize = 63;
/// Longest DNS-1123 subdomain (object names, label key prefixes).
pub const MAX_SUBDOMAIN: usize = 253;
/// Most bytes of annotations (keys and values) on one object.
pub const MAX_ANNOTATIONS: usize = 256 * 1024;
/// Most bytes of data in one ConfigMap or Secret.
pub const MAX_DATA: usize = 1024 * 1024;
/// Longest note of an events.k8s.io Event.
pub const MAX_EVENT_NOTE: usize = 1024;

// ---- Production helper ----

/// `value` itself when it is a valid label value, else a valid label value standing for it:
/// as much of it as fits (other characters made `-`) and 12 hex digits of its hash. Every
/// writer and selector of a label must pass its value through this, so they agree.
pub fn label_value(value: &str) -> String {
    if is_label_value(value) && value.len() <= MAX_LABEL_VALUE {
        return value.to_string();
    }
    let hash = hex::encode(&shardfarm_core::identity::blake2b256(&[value.as_bytes()])[..6]);
    let mut head: String = value
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' })
        .take(MAX_LABEL_VALUE - 1 - hash.len())
        .collect();
    while head.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        head.pop();
    }
    while head.starts_with(|c: char| !c.is_ascii_alphanumeric()) {
        head.remove(0);
    }
    if head.is_empty() { hash } else { format!("{head}-{hash}") }
}

// ---- The rules ----

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn is_qualified_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && alnum(b[0])
        && alnum(b[b.len() - 1])
        && b.iter().all(|&c| alnum(c) || matches!(c, b'-' | b'_' | b'.'))
}

fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_qualified_part(s)
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty() && ok(b[0]) && ok(b[b.len() - 1]) && b.iter().all(|&c| ok(c) || c == b'-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.split('.').all(is_dns1123_label)
}

fn is_dns1035_label(s: &str) -> bool {
    is_dns1123_label(s) && s.as_bytes()[0].is_ascii_lowercase()
}

/// apimachinery's `RegexError`.
fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    let mut out = format!("{msg} (e.g. ");
    for (i, e) in examples.iter().enumerate() {
        if i > 0 {
            out.push_str(" or ");
        }
        out.push_str(&format!("'{e}', "));
    }
    out.push_str(&format!("regex used for validation is '{fmt}')"));
    out
}

fn max_len(n: usize) -> String {
    format!("must be no more than {n} bytes")
}

const QUALIFIED_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_MSG: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must \
                             start and end with an alphanumeric character";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric \
                               characters, '-', '_' or '.', and must start and end with an \
                               alphanumeric character";
const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const DNS1123_SUBDOMAIN_FMT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1035_FMT: &str = "[a-z]([-a-z0-9]*[a-z0-9])?";

fn subdomain_errors(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > MAX_SUBDOMAIN {
        out.push(max_len(MAX_SUBDOMAIN));
    }
    if !is_dns1123_subdomain(s) {
        out.push(regex_error(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character",
            DNS1123_SUBDOMAIN_FMT,
            &["example.com"],
        ));
    }
    out
}

fn dns1123_label_errors(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > MAX_LABEL_VALUE {
        out.push(max_len(MAX_LABEL_VALUE));
    }
    if !is_dns1123_label(s) {
        out.push(regex_error(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
             '-', and must start and end with an alphanumeric character",
            DNS1123_LABEL_FMT,
            &["my-name", "123-abc"],
        ));
    }
    out
}

fn dns1035_errors(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    if s.len() > MAX_LABEL_VALUE {
        out.push(max_len(MAX_LABEL_VALUE));
    }
    if !is_dns1035_label(s) {
        out.push(regex_error(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start \
             with an alphabetic character, and end with an alphanumeric character",
            DNS1035_FMT,
            &["my-name", "abc-123"],
        ));
    }
    out
}

/// apimachinery's `IsQualifiedName` (label and annotation keys).
fn qualified_name_errors(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                out.push("prefix part must be non-empty".to_string());
            } else {
                out.extend(
                    subdomain_errors(prefix).into_iter().map(|m| format!("prefix part {m}")),
                );
            }
            name
        }
        _ => {
            return vec![format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. \
                 'example.com/MyName')",
                regex_error(QUALIFIED_MSG, QUALIFIED_FMT, &["MyName", "my.name", "123-abc"])
            )];
        }
    };
    if name.is_empty() {
        out.push("name part must be non-empty".into());
    } else if name.len() > MAX_LABEL_VALUE {
        out.push(format!("name part {}", max_len(MAX_LABEL_VALUE)));
    }
    if !name.is_empty() && !is_qualified_part(name) {
        out.push(format!(
            "name part {}",
            regex_error(QUALIFIED_MSG, QUALIFIED_FMT, &["MyName", "my.name", "123-abc"])
        ));
    }
    out
}

/// apimachinery's `IsValidLabelValue`.
fn label_value_errors(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    if v.len() > MAX_LABEL_VALUE {
        out.push(max_len(MAX_LABEL_VALUE));
    }
    if !is_label_value(v) {
        out.push(regex_error(LABEL_VALUE_MSG, LABEL_VALUE_FMT, &["MyValue", "my_value", "12345"]));
    }
    out
}

/// core's `IsConfigMapKey` (ConfigMap and Secret data keys).
fn config_key_errors(k: &str) -> Vec<String> {
    let mut out = Vec::new();
    if k.len() > MAX_SUBDOMAIN {
        out.push(max_len(MAX_SUBDOMAIN));
    }
    if k.is_empty() || !k.bytes().all(|c| alnum(c) || matches!(c, b'-' | b'_' | b'.')) {
        out.push(regex_error(
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
            "[-._a-zA-Z0-9]+",
            &["key.name", "KEY_NAME", "key-name"],
        ));
    }
    if k == "." {
        out.push("must not be '.'".into());
    } else if k == ".." {
        out.push("must not be '..'".into());
    } else if k.starts_with("..") {
        out.push("must not start with '..'".into());
    }
    out
}

// ---- Field errors and statuses ----

/// One field error, as apimachinery's `field.Error` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path, `metadata.labels`.
    pub field: String,
    /// `Invalid value`, `Required value`, `Forbidden`, `Too long`.
    pub kind: &'static str,
    /// The value shown (for `Invalid value`).
    pub value: Option<String>,
    /// What is wrong.
    pub detail: String,
}

impl FieldError {
    fn invalid(field: impl Into<String>, value: &str, detail: String) -> Self {
        FieldError { field: field.into(), kind: "Invalid value", value: Some(value.into()), detail }
    }
    fn other(field: impl Into<String>, kind: &'static str, detail: impl Into<String>) -> Self {
        FieldError { field: field.into(), kind, value: None, detail: detail.into() }
    }
    fn too_long(field: impl Into<String>, max: usize) -> Self {
        Self::other(field, "Too long", format!("may not be more than {max} bytes"))
    }
    /// The message without the field (a Status cause's).
    pub fn body(&self) -> String {
        match &self.value {
            Some(v) => format!("{}: {v:?}: {}", self.kind, self.detail),
            None => format!("{}: {}", self.kind, self.detail),
        }
    }
    fn reason(&self) -> &'static str {
        match self.kind {
            "Invalid value" => "FieldValueInvalid",
            "Required value" => "FieldValueRequired",
            "Forbidden" => "FieldValueForbidden",
            "Too long" => "FieldValueTooLong",
            _ => "FieldValueInvalid",
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.body())
    }
}

/// A refusal: the HTTP status and the `Status` object the API server answers with.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    /// HTTP status code.
    pub code: u16,
    /// The `Status` body.
    pub status: Value,
}

impl Refusal {
    /// The Status message.
    pub fn message(&self) -> &str {
        self.status["message"].as_str().unwrap_or_default()
    }
}

fn status(code: u16, reason: &str, message: String, details: Value) -> Refusal {
    Refusal {
        code,
        status: json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "details": details, "code": code,
        }),
    }
}

/// The 422 Invalid answer for `errors` in object `name` of `kind` (`apiVersion`'s group).
pub fn invalid(api_version: &str, kind: &str, name: &str, errors: &[FieldError]) -> Refusal {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let qualified = if group.is_empty() { kind.to_string() } else { format!("{kind}.{group}") };
    let all = match errors {
        [one] => one.to_string(),
        many => format!("[{}]", many.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let causes: Vec<Value> = errors
        .iter()
        .map(|e| json!({ "reason": e.reason(), "message": e.body(), "field": e.field }))
        .collect();
    status(
        422,
        "Invalid",
        format!("{qualified} {name:?} is invalid: {all}"),
        json!({ "name": name, "group": group, "kind": kind, "causes": causes }),
    )
}

/// The 409 answer to an update at a stale resourceVersion.
pub fn conflict(resource: &str, name: &str) -> Refusal {
    status(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {resource} {name:?}: the object has been modified; \
             please apply your changes to the latest version and try again"
        ),
        json!({ "name": name, "kind": resource }),
    )
}

/// The 409 answer to a create of an object that exists.
pub fn already_exists(resource: &str, name: &str) -> Refusal {
    status(
        409,
        "AlreadyExists",
        format!("{resource} {name:?} already exists"),
        json!({ "name": name, "kind": resource }),
    )
}

// ---- Objects ----

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect()
        })
        .unwrap_or_default()
}

fn labels(map: &Value, field: &str, out: &mut Vec<FieldError>) {
    for (k, v) in str_map(map) {
        for m in qualified_name_errors(&k) {
            out.push(FieldError::invalid(field, &k, m));
        }
        for m in label_value_errors(&v) {
            out.push(FieldError::invalid(field, &v, m));
        }
    }
}

/// Every `matchLabels` under `v`, with its path.
fn match_labels(v: &Value, path: &str, out: &mut Vec<FieldError>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                if k == "matchLabels" {
                    labels(child, &p, out);
                } else {
                    match_labels(child, &p, out);
                }
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                match_labels(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn decoded_len(v: &Value) -> usize {
    // base64: 3 bytes per 4 characters, less the padding.
    let s = v.as_str().unwrap_or_default();
    ((s.len() / 4) * 3).saturating_sub(s.bytes().rev().take_while(|&b| b == b'=').count().min(2))
}

/// The field errors kube-apiserver finds in `object` (of `kind`) written whole: its metadata,
/// and what its kind bounds. `require_name`: a create or update (a patch may omit it).
pub fn validate(kind: &str, object: &Value, require_name: bool) -> Vec<FieldError> {
    let mut out = Vec::new();
    let meta = &object["metadata"];
    match meta["name"].as_str() {
        Some(name) => {
            let errors = match kind {
                "Service" => dns1035_errors(name),
                "Namespace" => dns1123_label_errors(name),
                _ => subdomain_errors(name),
            };
            out.extend(errors.into_iter().map(|m| FieldError::invalid("metadata.name", name, m)));
        }
        None if require_name && meta["generateName"].is_null() => {
            out.push(FieldError::other(
                "metadata.name",
                "Required value",
                "name or generateName is required",
            ));
        }
        None => {}
    }
    if let Some(ns) = meta["namespace"].as_str().filter(|n| !n.is_empty()) {
        out.extend(
            dns1123_label_errors(ns)
                .into_iter()
                .map(|m| FieldError::invalid("metadata.namespace", ns, m)),
        );
    }
    labels(&meta["labels"], "metadata.labels", &mut out);
    let annotations = str_map(&meta["annotations"]);
    let mut total = 0;
    for (k, v) in &annotations {
        for m in qualified_name_errors(&k.to_lowercase()) {
            out.push(FieldError::invalid("metadata.annotations", k, m));
        }
        total += k.len() + v.len();
    }
    if total > MAX_ANNOTATIONS {
        out.push(FieldError::too_long("metadata.annotations", MAX_ANNOTATIONS));
    }
    if let Some(refs) = meta["ownerReferences"].as_array() {
        for (i, r) in refs.iter().enumerate() {
            for (f, what) in
                [("apiVersion", "version"), ("kind", "kind"), ("name", "name"), ("uid", "uid")]
            {
                if r[f].as_str().is_none_or(str::is_empty) {
                    let v = r[f].as_str().unwrap_or_default();
                    out.push(FieldError::invalid(
                        format!("metadata.ownerReferences[{i}].{f}"),
                        v,
                        format!("{what} must not be empty"),
                    ));
                }
            }
        }
        if refs.iter().filter(|r| r["controller"] == true).count() > 1 {
            out.push(FieldError::invalid(
                "metadata.ownerReferences",
                "",
                "Only one reference can have Controller set to true".into(),
            ));
        }
    }
    // Labels inside the object: pod templates, selectors.
    let spec = &object["spec"];
    labels(&spec["template"]["metadata"]["labels"], "spec.template.metadata.labels", &mut out);
    match_labels(spec, "spec", &mut out);
    if kind == "Service" {
        labels(&spec["selector"], "spec.selector", &mut out);
    }
    match kind {
        "ConfigMap" | "Secret" => {
            let mut size = 0;
            for (field, map) in [("data", &object["data"]), ("binaryData", &object["binaryData"])] {
                for (k, v) in map.as_object().into_iter().flatten() {
                    for m in config_key_errors(k) {
                        out.push(FieldError::invalid(format!("{field}[{k}]"), k, m));
                    }
                    size += if kind == "Secret" || field == "binaryData" {
                        decoded_len(v)
                    } else {
                        v.as_str().map_or(0, str::len)
                    };
                }
            }
            for (k, v) in object["stringData"].as_object().into_iter().flatten() {
                for m in config_key_errors(k) {
                    out.push(FieldError::invalid(format!("stringData[{k}]"), k, m));
                }
                size += v.as_str().map_or(0, str::len);
            }
            if size > MAX_DATA {
                out.push(FieldError::too_long(
                    if kind == "Secret" { "data" } else { "[]" },
                    MAX_DATA,
                ));
            }
        }
        "Event"
            if object["apiVersion"] == "events.k8s.io/v1"
                && object["note"].as_str().is_some_and(|n| n.len() > MAX_EVENT_NOTE) =>
        {
            out.push(FieldError::too_long("note", MAX_EVENT_NOTE));
        }
        _ => {}
    }
    out
}

/// The field errors of an update of `old` (as stored) to `new` (of `kind`): what may not
/// change. Fields a patch leaves out are not compared.
pub fn validate_update(kind: &str, old: &Value, new: &Value) -> Vec<FieldError> {
    let mut out = Vec::new();
    let forbidden = |field: &str| {
        FieldError::other(
            field.to_string(),
            "Forbidden",
            "field is immutable when `immutable` is set",
        )
    };
    let immutable_field = |field: &str, v: &Value| FieldError {
        field: field.into(),
        kind: "Invalid value",
        value: Some(v.as_str().map_or_else(|| v.to_string(), str::to_string)),
        detail: "field is immutable".into(),
    };
    // Compared where both say something (a patch leaves fields out; a test's stored object
    // may too).
    let differs = |o: &Value, n: &Value| !o.is_null() && !n.is_null() && o != n;
    // A claim template as the server compares it: its name, size and class (the server fills
    // in defaults, apiVersion and kind, which are no change).
    let claims = |v: &Value| -> Value {
        v.as_array().map_or(Value::Null, |a| {
            a.iter()
                .map(|c| {
                    json!([
                        c["metadata"]["name"],
                        c["spec"]["resources"]["requests"]["storage"],
                        c["spec"]["storageClassName"]
                    ])
                })
                .collect()
        })
    };
    match kind {
        "Secret" | "ConfigMap" => {
            if kind == "Secret" && differs(&old["type"], &new["type"]) {
                out.push(immutable_field("type", &new["type"]));
            }
            if old["immutable"] == true {
                if new["immutable"] != true {
                    out.push(forbidden("immutable"));
                }
                for field in ["data", "binaryData"] {
                    if new[field] != old[field] {
                        out.push(forbidden(field));
                    }
                }
            }
        }
        "StatefulSet" => {
            let (o, n) = (&old["spec"], &new["spec"]);
            let fixed = ["selector", "serviceName", "podManagementPolicy"]
                .iter()
                .any(|f| differs(&o[f], &n[f]))
                || differs(
                    &claims(&o["volumeClaimTemplates"]),
                    &claims(&n["volumeClaimTemplates"]),
                );
            if fixed {
                out.push(FieldError::other(
                    "spec",
                    "Forbidden",
                    "updates to statefulset spec for fields other than 'replicas', 'ordinals', \
                     'template', 'updateStrategy', 'revisionHistoryLimit', \
                     'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden",
                ));
            }
        }
        "DaemonSet" | "Deployment"
            if differs(&old["spec"]["selector"], &new["spec"]["selector"]) =>
        {
            out.push(immutable_field("spec.selector", &new["spec"]["selector"]));
        }
        "Service" => {
            let o = &old["spec"]["clusterIP"];
            let n = &new["spec"]["clusterIP"];
            if !o.is_null() && !n.is_null() && o != n {
                out.push(immutable_field("spec.clusterIP", n));
            }
        }
        _ => {}
    }
    out
}

/// The Kind of a core or shardfarm.io resource's plural, for bodies that do not say.
pub fn kind_of(plural: &str) -> &str {
    match plural {
        "secrets" => "Secret",
        "configmaps" => "ConfigMap",
        "services" => "Service",
        "namespaces" => "Namespace",
        "statefulsets" => "StatefulSet",
        "daemonsets" => "DaemonSet",
        "deployments" => "Deployment",
        "poddisruptionbudgets" => "PodDisruptionBudget",
        "leases" => "Lease",
        "events" => "Event",
        "storagepools" => "StoragePool",
        "miningfarms" => "MiningFarm",
        "nodesyndications" => "NodeSyndication",
        "shardplacements" => "ShardPlacement",
        "storagenodes" => "StorageNode",
        other => other,
    }
}

/// A write request as a test API server sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// POST to the collection.
    Create,
    /// PUT to the object.
    Replace,
    /// PATCH (server-side apply or merge) to the object or its status.
    Patch,
}

/// What kube-apiserver answers a write of `body` to `path` (the URI path) when it holds
/// `stored` at that object's path: `Ok` if it takes it, else its refusal. JSON patches (an
/// array) are not checked.
pub fn check_write(
    write: Write,
    path: &str,
    body: &Value,
    stored: Option<&Value>,
) -> Result<(), Refusal> {
    if !body.is_object() {
        return Ok(());
    }
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let status_of = segs.last() == Some(&"status");
    let segs = if status_of { &segs[..segs.len() - 1] } else { &segs[..] };
    // /api/v1/namespaces/<ns>/<plural>[/<name>] or /apis/<g>/<v>/namespaces/<ns>/<plural>[/..]
    let ns_at = segs.iter().position(|s| *s == "namespaces");
    let url_ns = ns_at.and_then(|i| segs.get(i + 1)).copied();
    let (plural, url_name) = match write {
        Write::Create => (segs.last().copied().unwrap_or_default(), None),
        _ => (
            segs.get(segs.len().wrapping_sub(2)).copied().unwrap_or_default(),
            segs.last().copied(),
        ),
    };
    let kind = body["kind"].as_str().unwrap_or_else(|| kind_of(plural)).to_string();
    let api_version = body["apiVersion"].as_str().unwrap_or("v1").to_string();
    let meta = &body["metadata"];
    let name = meta["name"].as_str().or(url_name).unwrap_or_default().to_string();
    let bad_request = |message: String| status(400, "BadRequest", message, Value::Null);
    if let (Some(body_ns), Some(url_ns)) = (meta["namespace"].as_str(), url_ns)
        && !body_ns.is_empty()
        && body_ns != url_ns
    {
        return Err(bad_request(
            "the namespace of the provided object does not match the namespace sent on the \
             request"
                .into(),
        ));
    }
    if let (Some(body_name), Some(url_name)) = (meta["name"].as_str(), url_name)
        && body_name != url_name
    {
        return Err(bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({url_name})"
        )));
    }
    if write == Write::Create {
        if stored.is_some() {
            return Err(already_exists(plural, &name));
        }
        if meta["resourceVersion"].as_str().is_some_and(|v| !v.is_empty()) {
            return Err(status(
                500,
                "InternalError",
                "Internal error occurred: resourceVersion should not be set on objects to be \
                 created"
                    .into(),
                Value::Null,
            ));
        }
    }
    let mut errors = validate(&kind, body, write != Write::Patch);
    if let Some(old) = stored.filter(|_| !status_of) {
        if let (Some(mine), Some(theirs)) =
            (meta["resourceVersion"].as_str(), old["metadata"]["resourceVersion"].as_str())
            && !mine.is_empty()
            && mine != theirs
        {
            return Err(conflict(plural, &name));
        }
        errors.extend(validate_update(&kind, old, body));
    }
    if errors.is_empty() { Ok(()) } else { Err(invalid(&api_version, &kind, &name, &errors)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(labels: Value) -> Value {
        json!({ "apiVersion": "v1", "kind": "Secret",
                "metadata": { "name": "shardfarm-pool-key-main", "labels": labels },
                "data": { "identity": "aGk=" } })
    }

    #[test]
    fn a_64_hex_label_value_is_refused_as_the_real_server_words_it() {
        let id = "11e345819446d2e9d4f40c632817e3b3d36cfdcbea878321aa6169aee439496e";
        let r = check_write(
            Write::Create,
            "/api/v1/namespaces/farms/secrets",
            &secret(json!({ "shardfarm.io/pool-id": id })),
            None,
        )
        .unwrap_err();
        assert_eq!(r.code, 422);
        assert_eq!(r.status["reason"], "Invalid");
        // Verbatim what kube-apiserver v1.36 answered (issue 28).
        assert_eq!(
            r.message(),
            format!(
                "Secret \"shardfarm-pool-key-main\" is invalid: metadata.labels: Invalid value: \
                 \"{id}\": must be no more than 63 bytes"
            )
        );
        assert_eq!(r.status["details"]["causes"][0]["field"], "metadata.labels");
        // 63 is fine.
        let ok = secret(json!({ "shardfarm.io/pool-id": &id[..63] }));
        assert!(check_write(Write::Create, "/api/v1/namespaces/farms/secrets", &ok, None).is_ok());
    }

    #[test]
    fn label_keys_values_and_names_follow_the_apimachinery_rules() {
        let bad = |labels: Value| validate("ConfigMap", &secret(labels), true);
        assert!(bad(json!({ "a": "", "x.io/b_c.d": "A-b_c.9", "k": "x".repeat(63) })).is_empty());
        assert_eq!(
            bad(json!({ "a": "-x" }))[0].detail.split(" (e.g.").next().unwrap(),
            LABEL_VALUE_MSG
        );
        assert_eq!(bad(json!({ "a": "x y" })).len(), 1);
        assert!(bad(json!({ "/a": "x" }))[0].detail.contains("prefix part must be non-empty"));
        assert!(
            bad(json!({ "Ex.com/a": "x" }))[0]
                .detail
                .starts_with("prefix part a lowercase RFC 1123 subdomain")
        );
        assert!(
            bad(json!({ "a/b/c": "x" }))[0].detail.starts_with("a qualified name must consist")
        );
        assert_eq!(
            bad(json!({ "x".repeat(64): "x" }))[0].detail,
            "name part must be no more than 63 bytes"
        );
        let name =
            |kind: &str, n: &str| validate(kind, &json!({ "metadata": { "name": n } }), true);
        assert!(name("Secret", "a.b-c").is_empty());
        assert!(!name("Secret", "A").is_empty());
        assert!(!name("Secret", &"a".repeat(254)).is_empty());
        assert!(name("Secret", &"a".repeat(253)).is_empty());
        // Services: DNS-1035 labels.
        assert!(!name("Service", "a.b").is_empty());
        assert!(!name("Service", "1ab").is_empty());
        assert!(!name("Service", &"a".repeat(64)).is_empty());
        assert!(name("Service", "rack-a-agents").is_empty());
        assert!(!name("Namespace", "a.b").is_empty());
        let none = validate("Secret", &json!({ "metadata": {} }), true);
        assert_eq!(
            none[0].to_string(),
            "metadata.name: Required value: name or generateName is required"
        );
        assert!(validate("Secret", &json!({ "metadata": {} }), false).is_empty());
    }

    #[test]
    fn sizes_annotations_owner_references_and_template_labels_are_bounded() {
        let big = "x".repeat(MAX_DATA + 1);
        let cm = json!({ "kind": "ConfigMap", "metadata": { "name": "a" }, "data": { "k": big } });
        let e = validate("ConfigMap", &cm, true);
        assert_eq!(e[0].to_string(), "[]: Too long: may not be more than 1048576 bytes");
        let cm = json!({ "kind": "ConfigMap", "metadata": { "name": "a" }, "data": { "k/x": "" } });
        assert!(validate("ConfigMap", &cm, true)[0].field.starts_with("data[k/x]"));
        let ann = json!({ "metadata": { "name": "a", "annotations": { "a": "x".repeat(MAX_ANNOTATIONS) } } });
        assert_eq!(validate("Secret", &ann, true)[0].field, "metadata.annotations");
        let refs = json!({ "metadata": { "name": "a", "ownerReferences": [{ "apiVersion": "v1", "kind": "X", "name": "n" }] } });
        assert_eq!(validate("Secret", &refs, true)[0].detail, "uid must not be empty");
        let sts = json!({ "kind": "StatefulSet", "metadata": { "name": "a" }, "spec": {
            "selector": { "matchLabels": { "f": "x".repeat(64) } },
            "template": { "metadata": { "labels": { "f": "ok" } }, "spec": { "affinity": { "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [{ "labelSelector": { "matchLabels": { "g": "-" } } }] } } } } } });
        let e = validate("StatefulSet", &sts, true);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(e[0].field, "spec.selector.matchLabels");
        let note = json!({ "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": { "name": "e" }, "note": "x".repeat(1025) });
        assert_eq!(validate("Event", &note, true)[0].field, "note");
    }

    #[test]
    fn immutable_objects_and_stale_versions_are_refused() {
        let path = "/api/v1/namespaces/farms/secrets/s";
        let old = json!({ "kind": "Secret", "metadata": { "name": "s", "resourceVersion": "7" },
                          "immutable": true, "data": { "k": "YQ==" } });
        let mut new = old.clone();
        new["data"]["k"] = json!("Yg==");
        let r = check_write(Write::Replace, path, &new, Some(&old)).unwrap_err();
        assert_eq!(r.code, 422);
        assert_eq!(
            r.message(),
            "Secret \"s\" is invalid: data: Forbidden: field is immutable when `immutable` is set"
        );
        // The same data is no change.
        assert!(check_write(Write::Replace, path, &old, Some(&old)).is_ok());
        // A stale version: 409.
        let mut stale = old.clone();
        stale["metadata"]["resourceVersion"] = json!("6");
        let r = check_write(Write::Replace, path, &stale, Some(&old)).unwrap_err();
        assert_eq!((r.code, r.status["reason"].as_str()), (409, Some("Conflict")));
        assert!(r.message().starts_with("Operation cannot be fulfilled on secrets \"s\""));
        // A create of what exists, and a create carrying a version.
        let r = check_write(Write::Create, "/api/v1/namespaces/farms/secrets", &old, Some(&old));
        assert_eq!(r.unwrap_err().status["reason"], "AlreadyExists");
        let r = check_write(Write::Create, "/api/v1/namespaces/farms/secrets", &old, None);
        assert_eq!(r.unwrap_err().code, 500);
        // A StatefulSet's claim templates do not change.
        let sts = |size: &str| {
            json!({ "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": { "name": "a" },
            "spec": { "volumeClaimTemplates": [{ "spec": { "resources": { "requests": { "storage": size } } } }] } })
        };
        let p = "/apis/apps/v1/namespaces/farms/statefulsets/a";
        let r = check_write(Write::Patch, p, &sts("2Gi"), Some(&sts("1Gi"))).unwrap_err();
        assert!(
            r.message().starts_with("StatefulSet.apps \"a\" is invalid: spec: Forbidden"),
            "{}",
            r.message()
        );
        assert!(check_write(Write::Patch, p, &sts("1Gi"), Some(&sts("1Gi"))).is_ok());
        // The body's name and namespace are the URL's.
        let other = json!({ "metadata": { "name": "b", "namespace": "farms" } });
        assert_eq!(check_write(Write::Patch, p, &other, None).unwrap_err().code, 400);
    }

    #[test]
    fn a_label_value_stands_for_a_name_too_long_for_one() {
        assert_eq!(label_value("rack-a"), "rack-a");
        assert_eq!(label_value(""), "");
        let long = format!("{}.example", "a".repeat(80));
        let v = label_value(&long);
        assert!(v.len() <= MAX_LABEL_VALUE && label_value_errors(&v).is_empty(), "{v}");
        assert_eq!(v, label_value(&long), "stable");
        assert_ne!(v, label_value(&format!("{long}x")));
        let hexid = "ab".repeat(32);
        assert!(label_value_errors(&label_value(&hexid)).is_empty());
        assert!(label_value_errors(&label_value("-/-")).is_empty());
    }
}
