#!/usr/bin/env python3
"""`helm template` / `helm lint` stand-in on helm-python-sdk (the Helm v4 Go SDK via ctypes).

No registry ships a Linux `helm` binary that CI can install, so scripts/deploy-check.sh runs
this with the venv from scripts/ci-tools.sh:

  helmshim.py template RELEASE CHART [-n NS] [-f values.yaml]... [--set k=v]... [--notes]
  helmshim.py lint CHART [--strict] [-n NS] [-f values.yaml]... [--set k=v]... [--kube-version V]

template prints the manifests (hooks, including `helm test` pods, too) as one YAML stream,
each document headed by `# Source: <template>` like helm; --notes prints the rendered
NOTES.txt to stderr. Exit status: 0 on success, 1 on a template error, a values.schema.json
violation or (lint) an error, or with --strict a warning.
"""

from __future__ import annotations

import argparse
import re
import sys

import helm_python as helm

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def deep_merge(into: dict, update: dict) -> dict:
    """Helm's precedence for -f files and --set: later wins, maps merge key by key."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value
    return into


def user_values(args: argparse.Namespace) -> dict:
    values: dict = {}
    for path in args.values or []:
        with open(path, encoding="utf-8") as fh:
            deep_merge(values, helm.values_from_yaml(fh.read()) or {})
    for expr in args.set or []:
        deep_merge(values, helm.parse_set_string(expr))
    return values


def template(args: argparse.Namespace) -> int:
    try:
        with helm.Chart.load(args.chart) as chart:
            out = chart.render(
                user_values(args),
                name=args.release,
                namespace=args.namespace,
                is_install=True,
            )
    except (helm.HelmRenderError, helm.HelmValuesError, helm.HelmChartLoadError) as err:
        print(f"Error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    for path in sorted(out):
        body = out[path].strip()
        name = path.rsplit("/", 1)[-1]
        if name == "NOTES.txt":
            if args.notes:
                print(body, file=sys.stderr)
            continue
        if not body or name.startswith("_"):
            continue
        # Templates that range over the services hold several documents: head each one.
        for doc in re.split(r"^---[ \t]*$", body, flags=re.MULTILINE):
            doc = doc.strip("\n")
            if doc.strip():
                print(f"---\n# Source: {path}\n{doc}")
    return 0


def lint(args: argparse.Namespace) -> int:
    report = helm.lint(
        args.chart,
        user_values(args) or None,
        strict=args.strict,
        namespace=args.namespace,
        kube_version=args.kube_version,
    )
    threshold = 2 if args.strict else 3
    bad = bool(report.get("errors"))
    for msg in report.get("messages", []):
        sev = msg.get("severity", 0)
        print(f"[{SEVERITY.get(sev, sev)}] {msg.get('path')}: {msg.get('error')}")
        bad = bad or sev >= threshold
    for err in report.get("errors", []):
        print(f"[ERROR] {err}")
    print(f"{report.get('total_charts_linted')} chart(s) linted, {'FAILED' if bad else 'ok'}")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("template", help="render the chart")
    t.add_argument("release")
    t.add_argument("chart")
    t.add_argument("--notes", action="store_true", help="print NOTES.txt to stderr")
    lp = sub.add_parser("lint", help="lint the chart")
    lp.add_argument("chart")
    lp.add_argument("--strict", action="store_true", help="fail on warnings too")
    lp.add_argument("--kube-version", default=None, help="e.g. 1.32.0")
    for p in (t, lp):
        p.add_argument("-n", "--namespace", default="default")
        p.add_argument("-f", "--values", action="append", help="values file (repeatable)")
        p.add_argument("--set", action="append", help="key=value (repeatable)")
    args = parser.parse_args()
    return template(args) if args.cmd == "template" else lint(args)


if __name__ == "__main__":
    sys.exit(main())
