#!/usr/bin/env python3
"""Checks the Helm chart, the alerts and the dashboards with the real tools, offline.

- helm lint --strict and helm template of both charts (charts/shardfarm: operator and CRDs;
  charts/shardfarm-pool: a pool, its farms and its S3 gateway), with the default values and
  with each of the chart's ci/*-values.yaml; no release contains a kind defined by a CRD of the same release
  (helm cannot install that on a fresh cluster);
- every rendered manifest against the Kubernetes schemas (kubernetes-validate --strict), every
  rendered custom resource against its CRD (check-jsonschema), every rendered PrometheusRule
  with promtool check rules; the chart's CRDs identical to crds/*.yaml;
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
    # CRDs in the chart = crds/.
    for f in glob.glob(os.path.join(root, "crds", "*.yaml")):
        if open(f).read() != open(os.path.join(chart, "files", "crds", os.path.basename(f))).read():
            sys.exit(f"chart CRD {os.path.basename(f)} differs from crds/: run crdgen")
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
    # (a StoragePool and its MiningFarms). Helm maps every manifest of a release before it
    # creates any, so no release may contain a kind that a CRD of the same release defines.
    for chart in [os.path.join(root, "charts", "shardfarm"), os.path.join(root, "charts", "shardfarm-pool")]:
        for values in [None, *sorted(glob.glob(os.path.join(chart, "ci", "*-values.yaml")))]:
            check_release(helm, chart, values, crd_schemas)


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
    out = run([helm, "template", "sf", chart, "--namespace", "shardfarm", *extra])
    docs = [d for d in yaml.safe_load_all(out) if d]
    own_crds = {d["spec"]["names"]["kind"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    clash = sorted({d["kind"] for d in docs if d["kind"] in own_crds})
    if clash:
        sys.exit(f"{name} ({label}) creates {clash} and the CRDs defining them in one release: "
                 "helm install fails with 'no matches for kind' on a fresh cluster")
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


if __name__ == "__main__":
    main()
