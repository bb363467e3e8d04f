#!/usr/bin/env python3
"""Checks the Helm chart, the alerts and the dashboards with the real tools, offline.

- helm lint --strict and helm template of both charts (charts/shardfarm: operator and CRDs;
  charts/shardfarm-pool: a pool, its farms and its S3 gateway), with the default values and
  with each of the chart's ci/*-values.yaml;
- every rendered manifest against the Kubernetes schemas (kubernetes-validate --strict), every
  rendered custom resource against its CRD (check-jsonschema), every rendered PrometheusRule
  with promtool check rules;
- the CRDs: charts/shardfarm/crds/ (which helm creates when absent and never owns) identical to
  crds/*.yaml, and no chart renders a cluster-scoped object from templates/ (a second install,
  in another namespace or after an uninstall, could not import it);
- the monitors: each rendered only where the cluster serves its monitoring.coreos.com/v1 kind,
  and the install notes name the ones skipped;
- README: every helm command renders, in reading order, one release name and namespace per
  chart, none imports another release's objects; every `kubectl` command in the docs, notes and
  help texts names a resource type that exists;
- Pod Security: the charts' pods meet `restricted`; the level README states for each farm mode
  is the one its operator-rendered pods (examples/rendered/) need; the notes give the label;
- RBAC: the operator's Role grants every request the operator makes (OPERATOR_REQUESTS), its
  own Namespace (read for the Pod Security level) by name only, and nothing cluster-wide;
- promtool check rules and promtool test rules on the alert rules (one test per alert);
- every dashboard: dashboards/*.json identical to what dashboards/generate.py (Grafana's
  grafana-foundation-sdk builders, pinned in scripts/manifest-tools.sh) writes now, a Grafana
  dashboard model (uid, schemaVersion, panels with gridPos and datasource, variables), and its
  chart copy identical to dashboards/.

Usage: python check-chart.py HELM [ROOT]   (python from the manifest-tools virtualenv)
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

BIN = os.path.dirname(sys.executable)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        print(f"FAILED: {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        sys.exit(1)
    return r.stdout


def main():
    helm = sys.argv[1]
    root = sys.argv[2] if len(sys.argv) > 2 else "."
    chart = os.path.join(root, "charts", "shardfarm")
    alerts = os.path.join(chart, "files", "alerts")
    # Alerts.
    run(["promtool", "check", "rules", os.path.join(alerts, "shardfarm.rules.yaml")])
    run(["promtool", "test", "rules", os.path.join(alerts, "shardfarm.rules.test.yaml")])
    rules = yaml.safe_load(open(os.path.join(alerts, "shardfarm.rules.yaml")))
    tests = open(os.path.join(alerts, "shardfarm.rules.test.yaml")).read()
    for r in rules["groups"][0]["rules"]:
        if f"alertname: {r['alert']}" not in tests:
            sys.exit(f"alert {r['alert']} has no promtool test")
    print(f"ok  promtool: {len(rules['groups'][0]['rules'])} alerts checked and tested")
    # The CRDs: the chart's crds/ = crds/, and no release owns a cluster-scoped object.
    check_crds(helm, root)
    # Dashboards: the committed JSON is the generator's output (run with this python, which
    # has the pinned SDK), then the chart's copy is the committed JSON.
    check_generated(root)
    for f in sorted(glob.glob(os.path.join(root, "dashboards", "*.json"))):
        text = open(f).read()
        if text != open(os.path.join(chart, "files", "dashboards", os.path.basename(f))).read():
            sys.exit(f"chart dashboard {os.path.basename(f)} differs: run dashboards/generate.py")
        d = json.loads(text)
        assert d["uid"] and d["title"] and d["schemaVersion"] >= 36 and d["editable"] is False, f
        names = [v["name"] for v in d["templating"]["list"]]
        assert "datasource" in names and "cluster" in names, f"{f}: variables {names}"
        ids = set()
        for p in d["panels"]:
            assert p["type"] in ("row", "stat", "timeseries", "table", "gauge"), f"{f}: {p['type']}"
            assert p["id"] not in ids, f"{f}: duplicate panel id {p['id']}"
            ids.add(p["id"])
            g = p["gridPos"]
            assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, f"{f}: {p['title']}"
            if p["type"] != "row":
                assert p["datasource"]["uid"] == "${datasource}", f"{f}: {p['title']}"
                for t in p["targets"]:
                    assert t["expr"] and 'cluster=~"$cluster"' in t["expr"], f"{f}: {p['title']}: {t['expr']}"
        print(f"ok  {os.path.basename(f)}: {len(d['panels'])} panels")
    # The chart.
    crd_schemas = {}
    for f in glob.glob(os.path.join(root, "crds", "*.yaml")):
        c = yaml.safe_load(open(f))
        for v in c["spec"]["versions"]:
            crd_schemas[(f"{c['spec']['group']}/{v['name']}", c["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    # Both charts, in install order: the operator chart (CRDs, operator) and the pool chart
    # (a StoragePool and its MiningFarms).
    for chart in [os.path.join(root, "charts", "shardfarm"), os.path.join(root, "charts", "shardfarm-pool")]:
        for values in [None, *sorted(glob.glob(os.path.join(chart, "ci", "*-values.yaml")))]:
            check_release(helm, chart, values, crd_schemas)
    check_monitors(helm, root)
    check_readme(helm, root)
    check_kubectl_names(root)
    check_pod_security(helm, root)
    check_rbac(helm, root)


def check_generated(root):
    """Fails if dashboards/*.json differ from a fresh run of dashboards/generate.py."""
    committed = os.path.join(root, "dashboards")
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, os.path.join(committed, "generate.py"), "--out", tmp])
        fresh = sorted(os.listdir(tmp))
        have = sorted(os.path.basename(f) for f in glob.glob(os.path.join(committed, "*.json")))
        if fresh != have:
            sys.exit(f"dashboards/ holds {have}, dashboards/generate.py writes {fresh}: "
                     "run dashboards/generate.py (and delete the dashboards it no longer writes)")
        for name in fresh:
            if open(os.path.join(tmp, name)).read() != open(os.path.join(committed, name)).read():
                sys.exit(f"dashboards/{name} differs from what dashboards/generate.py writes "
                         f"(grafana-foundation-sdk {sdk_version()}): run {sys.executable} dashboards/generate.py")
    print(f"ok  dashboards/*.json = dashboards/generate.py output (grafana-foundation-sdk {sdk_version()})")


def sdk_version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("grafana_foundation_sdk")
    except PackageNotFoundError:
        return "not installed"


def check_release(helm, chart, values, crd_schemas):
    name = os.path.basename(chart)
    extra = ["-f", values] if values else []
    label = os.path.basename(values) if values else "defaults"
    run([helm, "lint", "--strict", chart, *extra])
    # As on a cluster that runs the Prometheus Operator, so the monitors are rendered and checked.
    docs = render(helm, "sf", chart, "shardfarm", [*extra, *MONITOR_APIS])
    with tempfile.TemporaryDirectory() as tmp:
        builtin, n = [], 0
        for d in docs:
            n += 1
            key = (d["apiVersion"], d["kind"])
            path = os.path.join(tmp, f"{n:03}-{d['kind']}.yaml")
            with open(path, "w") as fh:
                yaml.safe_dump(d, fh)
            if key in crd_schemas:
                schema = os.path.join(tmp, f"{n:03}-schema.json")
                json.dump(crd_schemas[key], open(schema, "w"))
                run([os.path.join(BIN, "check-jsonschema"), "--schemafile", schema, path])
            elif d["apiVersion"].startswith("monitoring.coreos.com/"):
                if d["kind"] == "PrometheusRule":
                    rules_path = os.path.join(tmp, f"{n:03}-rules.yaml")
                    yaml.safe_dump({"groups": d["spec"]["groups"]}, open(rules_path, "w"))
                    run(["promtool", "check", "rules", rules_path])
                # ServiceMonitor/PodMonitor: no schema offline; rendered and linted only.
            else:
                builtin.append(path)
        if builtin:
            run([os.path.join(BIN, "kubernetes-validate"), "--strict", "--quiet", *builtin])
    kinds = sorted({d["kind"] for d in docs})
    print(f"ok  {name}: helm lint --strict + template ({label}): {len(docs)} manifests valid ({', '.join(kinds)})")


# Kinds that are not namespaced: a release that renders one owns it cluster-wide, so a second
# release (another namespace, or a reinstall while the first's objects are kept) cannot
# install. CRDs belong in a chart's crds/ directory, which Helm creates when absent and never
# adopts, upgrades or deletes.
CLUSTER_SCOPED = {
    "APIService", "CSIDriver", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "IngressClass", "MutatingWebhookConfiguration", "Namespace", "PersistentVolume",
    "PriorityClass", "RuntimeClass", "StorageClass", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "ValidatingWebhookConfiguration", "VolumeSnapshotClass",
}
# The Prometheus Operator kinds the operator chart renders, each only where the cluster serves it.
MONITOR_KINDS = ["ServiceMonitor", "PodMonitor", "PrometheusRule"]
MONITOR_APIS = [a for k in MONITOR_KINDS for a in ("--api-versions", f"monitoring.coreos.com/v1/{k}")]


def render(helm, release, chart, namespace, args=(), include_crds=False):
    cmd = [helm, "template", release, chart, "--namespace", namespace, *args]
    if include_crds:
        cmd.append("--include-crds")
    return [d for d in yaml.safe_load_all(run(cmd)) if d]


def render_notes(helm, chart, namespace, args=()):
    """NOTES.txt as `helm install` would print it (helm template leaves it out): a copy of the
    chart renders it through `tpl` into a ConfigMap."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, os.path.basename(chart))
        shutil.copytree(chart, copy)
        os.rename(os.path.join(copy, "templates", "NOTES.txt"), os.path.join(copy, "notes-src.txt"))
        with open(os.path.join(copy, "templates", "zz-notes-check.yaml"), "w") as f:
            f.write('apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-check\ndata:\n'
                    '  notes: {{ tpl (.Files.Get "notes-src.txt") . | quote }}\n')
        out = run([helm, "template", "notes", copy, "--namespace", namespace,
                   "--show-only", "templates/zz-notes-check.yaml", *args])
        return yaml.safe_load(out)["data"]["notes"]


def check_crds(helm, root):
    """The operator chart's CRDs come from its crds/ directory (= crds/, crdgen's output) and no
    chart renders a cluster-scoped object from templates/: the CRDs are shared by every
    namespace, and a release-owned CRD makes a second install (another namespace, or after an
    uninstall that kept them) fail with 'cannot be imported into the current release'."""
    chart = os.path.join(root, "charts", "shardfarm")
    want = sorted(os.path.basename(f) for f in glob.glob(os.path.join(root, "crds", "*.yaml")))
    have = sorted(os.path.basename(f) for f in glob.glob(os.path.join(chart, "crds", "*.yaml")))
    if not want or have != want:
        sys.exit(f"charts/shardfarm/crds/ holds {have}, crds/ holds {want}: run `cargo run --bin crdgen`")
    for f in want:
        if open(os.path.join(root, "crds", f)).read() != open(os.path.join(chart, "crds", f)).read():
            sys.exit(f"charts/shardfarm/crds/{f} differs from crds/{f}: run `cargo run --bin crdgen`")
    kinds = {yaml.safe_load(open(os.path.join(root, "crds", f)))["spec"]["names"]["kind"] for f in want}
    for c in ["shardfarm", "shardfarm-pool"]:
        path = os.path.join(root, "charts", c)
        for values in [None, *sorted(glob.glob(os.path.join(path, "ci", "*-values.yaml")))]:
            extra = ["-f", values] if values else []
            # A second release in another namespace renders the same cluster-scoped names.
            docs = render(helm, "second", path, "sfgw", [*extra, *MONITOR_APIS])
            owned = sorted(f"{d['kind']} {d['metadata']['name']}" for d in docs if d["kind"] in CLUSTER_SCOPED)
            if owned:
                sys.exit(f"{c} ({os.path.basename(values) if values else 'defaults'}) renders cluster-scoped "
                         f"{owned} from templates/: the release would own them and a second install "
                         "(another namespace, or a reinstall after uninstall) fails with 'cannot be "
                         "imported into the current release'; CRDs go in the chart's crds/")
    docs = render(helm, "shardfarm", chart, "shardfarm", include_crds=True)
    installed = {d["spec"]["names"]["kind"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    if installed != kinds:
        sys.exit(f"helm install creates the CRDs {sorted(installed)} from crds/, want {sorted(kinds)}")
    print(f"ok  CRDs: charts/shardfarm/crds/ = crds/ ({len(want)}, installed by helm when absent, never owned); "
          "no chart renders a cluster-scoped object")


def check_monitors(helm, root):
    """A monitoring object is rendered only where the cluster serves its kind (else the install
    fails with 'no matches for kind' on a cluster without the Prometheus Operator), and the
    install notes say which were skipped."""
    chart = os.path.join(root, "charts", "shardfarm")
    values = ["-f", os.path.join(chart, "ci", "all-features-values.yaml")]
    bare = {d["kind"] for d in render(helm, "shardfarm", chart, "shardfarm", values)}
    if bare & set(MONITOR_KINDS):
        sys.exit(f"without the monitoring.coreos.com/v1 API the chart still renders {sorted(bare & set(MONITOR_KINDS))}: "
                 "helm install fails with 'no matches for kind' on a cluster without the Prometheus Operator")
    notes = render_notes(helm, chart, "shardfarm", values)
    for k in MONITOR_KINDS:
        if k not in notes:
            sys.exit(f"the install notes do not say that the {k} was skipped:\n{notes}")
        one = {d["kind"] for d in render(helm, "shardfarm", chart, "shardfarm",
                                         [*values, "--api-versions", f"monitoring.coreos.com/v1/{k}"])}
        if one & set(MONITOR_KINDS) != {k}:
            sys.exit(f"with only monitoring.coreos.com/v1/{k} served the chart renders {sorted(one & set(MONITOR_KINDS))}")
    if "skipped" in render_notes(helm, chart, "shardfarm", [*values, *MONITOR_APIS]):
        sys.exit("the install notes say monitors were skipped although the cluster serves them all")
    print(f"ok  monitoring: {', '.join(MONITOR_KINDS)} rendered only where the cluster serves the kind; "
          "the notes name the ones skipped")


def readme_commands(text):
    """(tool, command, arguments) of every helm and kubectl command in README's code blocks and
    inline code, in reading order; continuation lines joined, comments and prompts dropped."""
    lines = []
    for m in re.finditer(r"```[a-z]*\n(.*?)```|`([^`]+)`", text, re.S):
        if m.group(1) is not None:
            lines += m.group(1).replace("\\\n", " ").splitlines()
        else:
            lines.append(m.group(2).replace("\n", " "))
    cmds = []
    for line in lines:
        line = re.sub(r"^\s*\$\s*", "", line)
        line = re.sub(r"\s+#.*$", "", line)
        for m in re.finditer(r"(?:^|[;&|]\s*)(helm|kubectl)\s+([^;&|]*)", line):
            cmds.append((m.group(1), m.group(0).strip(" ;&|"), m.group(2).split()))
    return cmds


def parse_helm(tokens):
    """install / upgrade --install / template / uninstall: (verb, release, chart, namespace, args)."""
    verb, rest = tokens[0], tokens[1:]
    pos, args, ns, i = [], [], "default", 0
    while i < len(rest):
        t = rest[i]
        if t in ("-n", "--namespace"):
            ns, i = rest[i + 1], i + 2
        elif t in ("--set", "-f", "--values", "--set-string"):
            args += [t, rest[i + 1]]
            i += 2
        elif t.startswith("-"):
            i += 1
        else:
            pos.append(t)
            i += 1
    return verb, pos, ns, args


def check_readme(helm, root):
    """Every helm command of README, in order, as a user runs them: each renders (with the
    values files README shows), each chart has one release name and namespace throughout, no
    command makes a release render an object another release owns ('cannot be imported into
    the current release'), every uninstall names a release README installs, and the objects
    README lists by the label app.kubernetes.io/instance belong to a release of that name."""
    text = open(os.path.join(root, "README.md")).read()
    # Values files README shows: a yaml block whose first line is `# NAME.yaml`.
    files = {m.group(1): m.group(2) for m in re.finditer(r"```yaml\n# ([\w.-]+\.yaml)\n(.*?)```", text, re.S)}
    owner, releases, instances, n = {}, {}, set(), 0
    with tempfile.TemporaryDirectory() as tmp:
        for tool, cmd, tokens in readme_commands(text):
            if tool == "kubectl":
                instances.update(re.findall(r"app\.kubernetes\.io/instance=([\w.-]+)", cmd))
                continue
            if not tokens or tokens[0] not in ("install", "upgrade", "template", "uninstall"):
                continue
            verb, pos, ns, args = parse_helm(tokens)
            if verb == "uninstall":
                # README's commands are read as one cluster's history without the uninstalls
                # (they end it), so a later section cannot reuse objects an earlier one owns.
                for r in pos:
                    if (r, ns) not in {(rel, n) for rel, n, _ in releases.values()}:
                        sys.exit(f"README: `{cmd}` uninstalls {r} in namespace {ns!r}, which no README command installs")
                continue
            if len(pos) < 2:
                continue
            release, chart = pos[0], pos[1]
            if not chart.startswith("charts/"):
                continue
            for j in range(len(args)):
                if args[j] in ("-f", "--values"):
                    if args[j + 1] not in files:
                        sys.exit(f"README: `{cmd}` reads {args[j + 1]}, which README does not show")
                    path = os.path.join(tmp, args[j + 1])
                    open(path, "w").write(files[args[j + 1]])
                    args[j + 1] = path
            prev = releases.setdefault(chart, (release, ns, cmd))
            if prev[0] != release:
                sys.exit(f"README names the release of {chart} {prev[0]!r} (`{prev[2]}`) and {release!r} (`{cmd}`): "
                         "helm upgrade/install of the second name cannot import what the first one owns")
            if prev[1] != ns:
                sys.exit(f"README installs {chart} in namespace {prev[1]!r} (`{prev[2]}`) and {ns!r} (`{cmd}`)")
            docs = render(helm, release, os.path.join(root, chart), ns, args)
            n += 1
            if verb == "template":
                continue
            for d in docs:
                key = (d["kind"], d["metadata"].get("namespace", ns), d["metadata"]["name"])
                if owner.get(key, (release,))[0] != release:
                    sys.exit(f"README: `{cmd}` fails: {key[0]} {key[2]!r} in namespace {key[1]!r} exists and "
                             f"cannot be imported into release {release!r}: it belongs to {owner[key][0]!r} "
                             f"(`{owner[key][1]}`)")
                owner[key] = (release, cmd)
    names = {r for r, _, _ in releases.values()}
    for i in sorted(instances - names):
        sys.exit(f"README selects app.kubernetes.io/instance={i}, but its releases are {sorted(names)}")
    if n < 3:
        sys.exit(f"README: found only {n} helm commands to check; has the install section moved?")
    print(f"ok  README: {n} helm commands render, one release per chart "
          f"({', '.join(f'{os.path.basename(c)}: {r}' for c, (r, _, _) in sorted(releases.items()))}), none imports "
          "another release's objects")


# Resource types kubectl knows without the CRDs (names, plurals and short names), as far as
# Shardfarm's docs use them.
BUILTIN_RESOURCES = {
    "pod", "pods", "po", "secret", "secrets", "configmap", "configmaps", "cm", "service", "services",
    "svc", "deployment", "deployments", "deploy", "statefulset", "statefulsets", "sts", "daemonset",
    "daemonsets", "ds", "namespace", "namespaces", "ns", "persistentvolumeclaim",
    "persistentvolumeclaims", "pvc", "persistentvolume", "persistentvolumes", "pv", "event", "events",
    "ev", "lease", "leases", "node", "nodes", "no", "serviceaccount", "serviceaccounts", "sa", "role",
    "roles", "rolebinding", "rolebindings", "crd", "crds", "customresourcedefinition",
    "customresourcedefinitions", "poddisruptionbudget", "poddisruptionbudgets", "pdb", "job", "jobs",
    "endpoints", "ep", "all",
}
RESOURCE_VERBS = {"get", "describe", "delete", "edit", "patch", "scale", "label", "annotate", "explain", "wait"}
VALUE_FLAGS = {"-n", "--namespace", "-l", "--selector", "-o", "--output", "--type", "-p", "--patch",
               "--for", "--timeout", "-c", "--container", "--context", "--replicas", "-f", "--filename"}


def kubectl_types(line):
    """The resource types named by the kubectl commands in one line of text."""
    line = re.sub(r"\{\{.*?\}\}", "X", line)
    found = []
    for m in re.finditer(r"kubectl\s+([^`\"\n]*)", line):
        tokens = m.group(1).split()
        words, i = [], 0
        while i < len(tokens) and len(words) < 3:
            t = tokens[i]
            if t in VALUE_FLAGS:
                i += 2
                continue
            if not t.startswith("-"):
                words.append(t)
            i += 1
        if not words:
            continue
        if words[0] == "rollout" and len(words) > 2:
            target = words[2]
        elif words[0] in ("port-forward", "logs") and len(words) > 1 and "/" in words[1]:
            target = words[1]
        elif words[0] in RESOURCE_VERBS and len(words) > 1:
            target = words[1]
        else:
            continue
        target = target.split("/")[0].rstrip(".,;:)'")
        if not re.fullmatch(r"[a-z][a-z0-9.,-]*", target):
            continue
        found += [t for t in target.split(",") if t]
    return found


def check_kubectl_names(root):
    """Every kubectl command in the docs, the charts' notes and the programs' texts names a
    resource type that exists: a CRD's plural, singular, kind or short name, or a built-in."""
    known = set(BUILTIN_RESOURCES)
    for f in glob.glob(os.path.join(root, "crds", "*.yaml")):
        c = yaml.safe_load(open(f))
        names = c["spec"]["names"]
        for n in [names["plural"], names.get("singular", ""), names["kind"].lower(), *names.get("shortNames", [])]:
            if n:
                known |= {n, f"{n}.{c['spec']['group']}"}
    files = [os.path.join(root, p) for p in ["README.md", "ARCHITECTURE.md"]]
    files += glob.glob(os.path.join(root, "charts", "*", "templates", "NOTES.txt"))
    files += glob.glob(os.path.join(root, "charts", "*", "values.yaml"))
    files += glob.glob(os.path.join(root, "examples", "*.yaml"))
    for d in ["cli", "operator", "crds", "agent", "client", "coordinator"]:
        files += glob.glob(os.path.join(root, d, "src", "**", "*.rs"), recursive=True)
    bad, n = [], 0
    for f in files:
        if not os.path.exists(f):
            continue
        for num, line in enumerate(open(f, encoding="utf-8", errors="replace"), 1):
            for t in kubectl_types(line):
                n += 1
                if t not in known:
                    bad.append(f"{os.path.relpath(f, root)}:{num}: `kubectl` names resource type {t!r}, "
                               "which is neither a Shardfarm CRD's name nor short name nor a built-in")
    if bad:
        sys.exit("\n".join(bad))
    print(f"ok  kubectl: {n} resource types named in the docs, notes and help texts all exist")


# Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
# the checks that apply to Shardfarm's pods.
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                 "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret", "image"}


def pod_security(pod):
    """(level, reasons): the most restrictive Pod Security level that admits the pod spec, and
    why a stricter one does not."""
    base, restr = [], []
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]
    psc = pod.get("securityContext", {}) or {}
    for k in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(k):
            base.append(k)
    for v in pod.get("volumes", []):
        kinds = set(v) - {"name"}
        if "hostPath" in kinds:
            base.append(f"hostPath volume {v['name']}")
        if not kinds <= RESTRICTED_VOLUMES:
            restr.append(f"volume {v['name']} of type {sorted(kinds)}")
    if (psc.get("seccompProfile") or {}).get("type") == "Unconfined":
        base.append("seccomp Unconfined")
    if psc.get("runAsUser") == 0:
        restr.append("pod: runAsUser 0")
    for c in containers:
        sc, name = c.get("securityContext", {}) or {}, c["name"]
        if sc.get("privileged"):
            base.append(f"{name}: privileged")
        for p in c.get("ports", []):
            if p.get("hostPort"):
                base.append(f"{name}: hostPort {p['hostPort']}")
        caps = sc.get("capabilities", {}) or {}
        if set(caps.get("add", [])) - BASELINE_CAPS:
            base.append(f"{name}: adds {sorted(set(caps.get('add', [])) - BASELINE_CAPS)}")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            restr.append(f"{name}: adds capabilities {caps.get('add')}")
        if "ALL" not in caps.get("drop", []):
            restr.append(f"{name}: does not drop ALL capabilities")
        if sc.get("allowPrivilegeEscalation") is not False:
            restr.append(f"{name}: allowPrivilegeEscalation not false")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            base.append(f"{name}: seccomp Unconfined")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            restr.append(f"{name}: no seccomp profile RuntimeDefault")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            restr.append(f"{name}: runAsNonRoot not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            restr.append(f"{name}: runAsUser 0")
    if base:
        return "privileged", base
    if restr:
        return "baseline", restr
    return "restricted", []


def pod_specs(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{d['kind']} {d['metadata']['name']}", d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield f"Pod {d['metadata']['name']}", d["spec"]


def check_pod_security(helm, root):
    """The charts' own pods (operator, gateway) are admitted by `restricted`; the level each
    farm mode needs, computed from the pods the operator renders for the example farms
    (examples/rendered/), is the one README's Pod Security table states; the pool chart's notes
    give the namespace label when a farm needs more than `restricted`."""
    for c in ["shardfarm", "shardfarm-pool"]:
        path = os.path.join(root, "charts", c)
        for values in [None, *sorted(glob.glob(os.path.join(path, "ci", "*-values.yaml")))]:
            docs = render(helm, "sf", path, "shardfarm", ["-f", values] if values else [])
            for what, pod in pod_specs(docs):
                level, why = pod_security(pod)
                if level != "restricted":
                    sys.exit(f"{c}: {what} is not admitted by Pod Security `restricted`: {'; '.join(why)}")
    text = open(os.path.join(root, "README.md")).read()
    table = re.search(r"<!-- pod-security-levels -->\n(.*?)\n\n", text, re.S)
    if not table:
        sys.exit("README has no Pod Security table (<!-- pod-security-levels --> before it)")
    rows = re.findall(r"^\|[^|\n]*\|\s*`([\w-]+)`\s*\|\s*`(restricted|baseline|privileged)`", table.group(1), re.M)
    if len(rows) < 4:
        sys.exit(f"README's Pod Security table names {len(rows)} example farms; want one per farm mode")
    for farm, stated in rows:
        rendered = glob.glob(os.path.join(root, "examples", "rendered", f"*-{farm}.yaml"))
        if len(rendered) != 1:
            sys.exit(f"README's Pod Security table names farm {farm}, not in examples/rendered/")
        (what, pod), = pod_specs([d for d in yaml.safe_load_all(open(rendered[0])) if d])
        level, why = pod_security(pod)
        if level != stated:
            sys.exit(f"README says farm {farm} needs Pod Security `{stated}`; its {what} needs `{level}` "
                     f"({'; '.join(why) or 'admitted by restricted'})")
    pool = os.path.join(root, "charts", "shardfarm-pool")
    label = "pod-security.kubernetes.io/enforce=privileged"
    if label in render_notes(helm, pool, "shardfarm"):
        sys.exit("the pool chart's notes ask for a privileged namespace although no farm needs it")
    if label not in render_notes(helm, pool, "shardfarm", ["-f", os.path.join(pool, "ci", "all-features-values.yaml")]):
        sys.exit(f"the pool chart's notes do not say that a hostPath farm needs `{label}`")
    if label not in render_notes(helm, os.path.join(root, "charts", "shardfarm"), "shardfarm"):
        sys.exit(f"the operator chart's notes do not give the label `{label}` for hostPath and HostNetwork farms")
    print(f"ok  Pod Security: the charts' pods meet `restricted`; README's levels of {len(rows)} farm modes "
          "match the operator's pods; the notes give the namespace label")


# What the operator asks of the API server (operator/src): (API group, resource, verbs).
OPERATOR_REQUESTS = [
    ("shardfarm.io", "storagepools", {"get", "list", "watch"}),
    ("shardfarm.io", "miningfarms", {"get", "list", "watch", "patch"}),
    ("shardfarm.io", "nodesyndications", {"get", "list", "watch"}),
    ("shardfarm.io", "shardplacements", {"get", "list", "watch", "patch", "create"}),
    ("shardfarm.io", "storagenodes", {"get", "list", "patch", "create", "delete"}),
    ("shardfarm.io", "storagepools/status", {"patch"}),
    ("shardfarm.io", "miningfarms/status", {"patch"}),
    ("shardfarm.io", "nodesyndications/status", {"patch"}),
    ("shardfarm.io", "shardplacements/status", {"patch"}),
    ("shardfarm.io", "storagenodes/status", {"patch"}),
    ("shardfarm.io", "miningfarms/finalizers", {"update", "patch"}),
    ("apps", "statefulsets", {"get", "list", "watch", "patch"}),
    ("apps", "daemonsets", {"list", "watch", "patch"}),
    ("", "services", {"get", "create", "patch"}),
    ("", "configmaps", {"get", "list", "watch", "create", "patch", "update"}),
    ("", "secrets", {"get", "list", "create", "update", "delete"}),
    ("policy", "poddisruptionbudgets", {"patch"}),
    ("coordination.k8s.io", "leases", {"get", "create", "update"}),
    ("events.k8s.io", "events", {"create", "patch"}),
]


def check_rbac(helm, root):
    """The operator chart's Role grants every request of OPERATOR_REQUESTS in the release's
    namespace, and `get` on that Namespace object by name (the farm controller reads its Pod
    Security label): a Role can, as the API server authorizes GET /api/v1/namespaces/NAME in
    namespace NAME. No ClusterRole: a second release in another namespace must not collide."""
    docs = render(helm, "shardfarm", os.path.join(root, "charts", "shardfarm"), "sfops")
    roles = [d for d in docs if d["kind"] == "Role"]
    if len(roles) != 1 or any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs):
        sys.exit(f"the operator chart renders {len(roles)} Roles (want 1) or a cluster-wide role")
    role = roles[0]
    if role["metadata"].get("namespace") != "sfops":
        sys.exit("the operator's Role is not in the release's namespace")
    granted = set()
    for r in role["rules"]:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    granted.add((g, res, v, tuple(r.get("resourceNames", []))))
    missing = [(g, res, v) for g, res, verbs in OPERATOR_REQUESTS for v in sorted(verbs)
               if (g, res, v, ()) not in granted]
    if missing:
        sys.exit(f"the operator's Role does not grant {missing}")
    if ("", "namespaces", "get", ("sfops",)) not in granted:
        sys.exit("the operator's Role does not grant get on its own Namespace (resourceNames: the "
                 "release namespace): MiningFarms cannot say when Pod Security refuses their pods")
    if any(res == "namespaces" and names != ("sfops",) for _, res, _, names in granted):
        sys.exit("the operator's Role grants namespaces beyond its own, by name")
    print(f"ok  RBAC: the operator's Role grants its {len(OPERATOR_REQUESTS)} kinds of request and "
          "get on its own Namespace only")


if __name__ == "__main__":
    main()
