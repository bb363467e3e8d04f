#!/usr/bin/env python3
"""Validates Shardfarm's manifests offline.

1. Every CRD in crds/ and every example manifest, including the StatefulSets the operator
   renders for the example farms (examples/rendered/), against the Kubernetes schemas
   (kubernetes-validate --strict); custom resources are checked in step 2 instead.
2. Every custom resource in examples/ (and the chart's example, if any) against the
   openAPIV3Schema of its CRD (check-jsonschema).

Run by scripts/test.sh with the tools installed in a virtualenv; exits non-zero on any error.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

import yaml

BIN = os.path.dirname(sys.executable)


def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "."
    crds = sorted(glob.glob(os.path.join(root, "crds", "*.yaml")))
    examples = sorted(glob.glob(os.path.join(root, "examples", "*.yaml")))
    examples += sorted(glob.glob(os.path.join(root, "examples", "rendered", "*.yaml")))
    examples += sorted(glob.glob(os.path.join(root, "charts", "*", "examples", "*.yaml")))
    if not crds or not examples:
        sys.exit("no CRDs or examples found")
    schemas = {}
    for c in crds:
        for d in docs(c):
            kind = d["spec"]["names"]["kind"]
            group = d["spec"]["group"]
            for v in d["spec"]["versions"]:
                schemas[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    failed = False
    # 1. Kubernetes' own schemas.
    r = subprocess.run([os.path.join(BIN, "kubernetes-validate"), "--strict", "--quiet", *crds])
    failed |= r.returncode != 0
    builtin = []
    with tempfile.TemporaryDirectory() as tmp:
        n = 0
        for e in examples:
            for d in docs(e):
                n += 1
                key = (d.get("apiVersion"), d.get("kind"))
                doc_path = os.path.join(tmp, f"{n:03}-{d.get('kind')}.json")
                with open(doc_path, "w") as f:
                    json.dump(d, f)
                if key in schemas:
                    # 2. The CRD's schema.
                    schema_path = os.path.join(tmp, f"{n:03}-schema.json")
                    with open(schema_path, "w") as f:
                        json.dump(schemas[key], f)
                    r = subprocess.run(
                        [os.path.join(BIN, "check-jsonschema"), "--schemafile", schema_path, doc_path],
                        capture_output=True, text=True)
                    if r.returncode != 0:
                        failed = True
                        print(f"{e}: {d['kind']} {d['metadata']['name']}:\n{r.stdout}{r.stderr}")
                    else:
                        print(f"ok  {e}: {d['kind']} {d['metadata']['name']} against its CRD")
                else:
                    builtin.append(doc_path)
        if builtin:
            r = subprocess.run([os.path.join(BIN, "kubernetes-validate"), "--strict", "--quiet", *builtin])
            failed |= r.returncode != 0
    print(f"ok  {len(crds)} CRDs against the Kubernetes schemas" if not failed else "FAILED")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
