#!/usr/bin/env bash
# Checks the keyward alerting rules with promtool:
#   1. extracts .spec of the PrometheusRule in alerts.yaml into a plain rules file,
#   2. promtool check rules   on it,
#   3. promtool test rules    alerts.test.yaml (unit tests of the alerts),
#   4. promtool check config  prometheus.yaml (the standalone scrape config).
#
# Usage: deploy/prometheus/check-rules.sh [--write FILE]
#   --write FILE  also save the plain rules file (for Prometheus outside Kubernetes,
#                 next to prometheus.yaml as keyward.rules.yaml).
#
# Needs python3 (PyYAML is installed with pip if missing) and promtool (Debian package
# "prometheus"; installed with apt-get when missing and running as root). PROMTOOL=/path
# selects another promtool binary.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
write_to=""
while [ $# -gt 0 ]; do
  case "$1" in
    --write) write_to="${2:?--write needs a file}"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "check-rules.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done

# --- tools -----------------------------------------------------------------------------
if ! python3 -c 'import yaml' 2>/dev/null; then
  echo "check-rules.sh: installing PyYAML" >&2
  python3 -m pip install --quiet pyyaml >&2 \
    || python3 -m pip install --quiet --break-system-packages pyyaml >&2
fi

promtool="${PROMTOOL:-promtool}"
if ! command -v "$promtool" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "check-rules.sh: installing promtool (Debian package prometheus)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
fi
if ! command -v "$promtool" >/dev/null 2>&1; then
  echo "check-rules.sh: promtool not found (apt-get install prometheus, or set PROMTOOL)" >&2
  exit 1
fi
echo "check-rules.sh: using $("$promtool" --version 2>&1 | head -n 1)"

# --- extract .spec -----------------------------------------------------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 - "$here/alerts.yaml" "$work/keyward.rules.yaml" "$here/../README.md" <<'PY'
import re
import sys
import yaml

src, dst, readme = sys.argv[1], sys.argv[2], sys.argv[3]
# GitHub-style anchors of the runbook headings in deploy/README.md.
with open(readme) as f:
    anchors = {
        "#" + re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        for m in re.finditer(r"^#+ (.*)$", f.read(), re.M)
    }
with open(src) as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
if len(rules) != 1:
    sys.exit(f"{src}: expected exactly one PrometheusRule, found {len(rules)}")
doc = rules[0]
if doc.get("apiVersion") != "monitoring.coreos.com/v1":
    sys.exit(f"{src}: apiVersion must be monitoring.coreos.com/v1, not {doc.get('apiVersion')}")
spec = doc.get("spec") or {}
if not spec.get("groups"):
    sys.exit(f"{src}: .spec.groups is empty")
# Every alert must carry the labels and annotations the runbook relies on.
problems = []
for group in spec["groups"]:
    for rule in group.get("rules", []):
        name = rule.get("alert")
        if not name:
            continue
        if "severity" not in (rule.get("labels") or {}):
            problems.append(f"{name}: no severity label")
        ann = rule.get("annotations") or {}
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                problems.append(f"{name}: no {key} annotation")
        want = f"#runbook-{name.lower()}"
        if not str(ann.get("runbook_url", "")).endswith(want):
            problems.append(f"{name}: runbook_url should end with {want}")
        if want not in anchors:
            problems.append(f"{name}: deploy/README.md has no heading 'Runbook: {name}'")
if problems:
    sys.exit("\n".join(f"{src}: {p}" for p in problems))
with open(dst, "w") as f:
    f.write("# Generated from deploy/prometheus/alerts.yaml (.spec) by check-rules.sh.\n")
    yaml.safe_dump(spec, f, sort_keys=False, width=1000)
PY

# --- promtool ----------------------------------------------------------------------------
"$promtool" check rules "$work/keyward.rules.yaml"

cp "$here/alerts.test.yaml" "$work/alerts.test.yaml"
"$promtool" test rules "$work/alerts.test.yaml"

cp "$here/prometheus.yaml" "$work/prometheus.yaml"
"$promtool" check config "$work/prometheus.yaml"

if [ -n "$write_to" ]; then
  cp "$work/keyward.rules.yaml" "$write_to"
  echo "check-rules.sh: wrote $write_to"
fi
echo "check-rules.sh: OK"
