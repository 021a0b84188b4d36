#!/usr/bin/env bash
# Validates the deployment artifacts without a cluster or a container engine:
#   1. kubectl kustomize deploy/kubernetes          (skipped when kubectl is missing)
#   2. consistency of the pod config, the docker config and the keys Secret with
#      config/keyward.yaml and config/keys.yaml (only known fields, sane shutdown timing,
#      no subPath mounts, digests that are 64 hex characters)
#   3. deploy/prometheus/check-rules.sh             (promtool check + unit tests)
#   4. the Grafana dashboard parses as JSON and every query parses as PromQL
#   5. keyward check on the pod and docker configs  (when a keyward binary is found:
#      KEYWARD_BIN, target/release/keyward, target/debug/keyward or keyward on PATH)
#   6. hadolint Dockerfile                           (when hadolint is installed)
#   7. the crate builds from the image's build context alone (.dockerignore)
# Exits non-zero when any step fails.
set -uo pipefail

deploy="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$deploy")"
cd "$root"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()

step() { printf '\n==> %s\n' "$*"; }
fail() { echo "FAILED: $1" >&2; failed+=("$1"); }

if ! python3 -c 'import yaml' 2>/dev/null; then
  python3 -m pip install --quiet pyyaml >&2 \
    || python3 -m pip install --quiet --break-system-packages pyyaml >&2
fi

# 1 ----------------------------------------------------------------------------------------
step "kubectl kustomize deploy/kubernetes"
if command -v kubectl >/dev/null 2>&1; then
  if kubectl kustomize deploy/kubernetes > "$work/rendered.yaml"; then
    echo "rendered $(grep -c '^kind:' "$work/rendered.yaml") objects"
  else
    fail "kubectl kustomize"
  fi
  # The base with the components/redis component (shared fleet state).
  if kubectl kustomize deploy/overlays/fleet > "$work/fleet.yaml" \
    && grep -q KEYWARD_REDIS_URL "$work/fleet.yaml"; then
    echo "deploy/overlays/fleet: rendered $(grep -c '^kind:' "$work/fleet.yaml") objects"
  else
    fail "kubectl kustomize deploy/overlays/fleet"
  fi
  # The base with the components/unix-socket component (app on a Unix socket).
  if kubectl kustomize deploy/overlays/unix-socket > "$work/unix-socket.yaml" \
    && grep -q 'upstream: unix:/run/app/app.sock' "$work/unix-socket.yaml"; then
    echo "deploy/overlays/unix-socket: rendered $(grep -c '^kind:' "$work/unix-socket.yaml") objects"
  else
    fail "kubectl kustomize deploy/overlays/unix-socket"
  fi
else
  echo "kubectl not found: skipped"
fi

step "kubectl kustomize deploy/decision/example (decision mode Component)"
if command -v kubectl >/dev/null 2>&1; then
  if kubectl kustomize deploy/decision/example > "$work/decision.yaml"; then
    echo "rendered $(grep -c '^kind:' "$work/decision.yaml") objects"
  else
    fail "kubectl kustomize deploy/decision/example"
  fi
else
  echo "kubectl not found: skipped"
fi
python3 - <<'PY' || fail "deploy/decision YAML"
import glob
import yaml
for path in sorted(glob.glob("deploy/decision/**/*.yaml", recursive=True)):
    list(yaml.safe_load_all(open(path)))
print("deploy/decision: YAML parses")
PY

# 2 ----------------------------------------------------------------------------------------
step "config and snapshot consistency"
python3 - "$work" <<'PY' || fail "config and snapshot consistency"
import re
import sys

import yaml

work = sys.argv[1]
problems = []

def load(path):
    with open(path) as f:
        return yaml.safe_load(f)

def paths(node, prefix="", free=("prefixes",)):
    """Field paths of a YAML tree; list items share the path 'name[]'."""
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            out.add(p)
            if k not in free:
                out |= paths(v, p, free)
    elif isinstance(node, list):
        for item in node:
            out |= paths(item, prefix + "[]", free)
    return out

def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", str(text))
    if not m:
        raise ValueError(f"unsupported duration {text!r}")
    n, unit = int(m.group(1)), m.group(2)
    return {"ms": n / 1000, "s": n, "m": n * 60}[unit]

ref_config = paths(load("config/keyward.yaml"))
for path in ("deploy/kubernetes/keyward.yaml", "deploy/docker/keyward.yaml"):
    cfg = load(path)
    for p in sorted(paths(cfg) - ref_config):
        problems.append(f"{path}: field {p} does not exist in config/keyward.yaml")
    for p in sorted(ref_config - paths(cfg)):
        if not p.startswith("prefixes."):
            print(f"note: {path} leaves {p} at its default")

pod_cfg = load("deploy/kubernetes/keyward.yaml")
if pod_cfg.get("admin_listen", "").split(":")[0] not in ("0.0.0.0", "[::]"):
    problems.append("deploy/kubernetes/keyward.yaml: admin_listen must listen on all "
                    "interfaces, or the kubelet's probes and Prometheus cannot reach it")
if pod_cfg.get("upstream") != "http://127.0.0.1:3000":
    problems.append("deploy/kubernetes/keyward.yaml: upstream should be http://127.0.0.1:3000")

# Deployment: drain timing, probes, mounts.
deployment = next(d for d in yaml.safe_load_all(open("deploy/kubernetes/deployment.yaml"))
                  if d and d.get("kind") == "Deployment")
pod = deployment["spec"]["template"]["spec"]
shutdown = pod_cfg["shutdown"]
# After the grace, up to 3 s more: the admin listener's requests and the last usage flush
# (2 s), then blocking work they left (1 s).
needed = seconds(shutdown["drain_delay"]) + seconds(shutdown["grace"]) + 3
if not pod.get("terminationGracePeriodSeconds", 30) > needed:
    problems.append(f"deployment.yaml: terminationGracePeriodSeconds must exceed "
                    f"drain_delay + grace + 3s ({needed:g}s)")
admin_port = int(pod_cfg["admin_listen"].rsplit(":", 1)[1])
listen_port = int(pod_cfg["listen"].rsplit(":", 1)[1])
# The kubelet's probes go to probe_listen when the pod config has one, else the admin port.
probe_port = int(pod_cfg.get("probe_listen", pod_cfg["admin_listen"]).rsplit(":", 1)[1])
for c in pod["containers"]:
    for m in c.get("volumeMounts", []):
        if "subPath" in m or "subPathExpr" in m:
            problems.append(f"deployment.yaml: container {c['name']} mounts {m['mountPath']} "
                            "with subPath: mounted Secret updates would never be seen")
    if c["name"] == "keyward":
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        if ports.get("admin") != admin_port or ports.get("http") != listen_port:
            problems.append("deployment.yaml: keyward container ports do not match "
                            "listen/admin_listen")
        probe_names = ("probes", "admin") if "probe_listen" in pod_cfg else ("admin",)
        named = next((n for n in probe_names if ports.get(n) == probe_port), None)
        for probe, want in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c.get(probe, {}).get("httpGet", {})
            if get.get("path") != want or get.get("port") not in (named, probe_port):
                problems.append(f"deployment.yaml: {probe} should GET {want} on the probe "
                                "listener (probe_listen, else admin_listen)")
        sc = c.get("securityContext", {})
        for key, want in (("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)):
            if sc.get(key) is not want:
                problems.append(f"deployment.yaml: keyward securityContext.{key} should be {want}")

# Keys Secret: same schema as config/keys.yaml.
ref_keys = load("config/keys.yaml")
ref_fields = paths(ref_keys)
secret = load("deploy/kubernetes/secret.yaml")
snapshot_text = secret["stringData"]["keys.yaml"]
snapshot = yaml.safe_load(snapshot_text)
with open(f"{work}/keys.yaml", "w") as f:
    f.write(snapshot_text)
for p in sorted(paths(snapshot) - ref_fields):
    problems.append(f"secret.yaml keys.yaml: field {p} does not exist in config/keys.yaml")
ids, digests = set(), set()
for i, key in enumerate(snapshot.get("keys", [])):
    where = f"secret.yaml keys[{i}] id={key.get('id')}"
    if not re.fullmatch(r"[0-9a-f]{64}", str(key.get("sha256", ""))):
        problems.append(f"{where}: sha256 is not 64 lowercase hex characters")
    if key.get("id") in ids:
        problems.append(f"{where}: duplicate id")
    if key.get("sha256") in digests:
        problems.append(f"{where}: duplicate sha256")
    ids.add(key.get("id"))
    digests.add(key.get("sha256"))

for p in problems:
    print(p, file=sys.stderr)
if problems:
    sys.exit(1)
print("ok")
PY

# 3 ----------------------------------------------------------------------------------------
step "deploy/prometheus/check-rules.sh"
"$deploy/prometheus/check-rules.sh" || fail "check-rules.sh"

# 4 ----------------------------------------------------------------------------------------
step "Grafana dashboard"
dashboard="$deploy/grafana/keyward-dashboard.json"
if python3 -m json.tool "$dashboard" > /dev/null; then
  echo "valid JSON"
  # Every query must parse as PromQL: wrap them as recording rules for promtool, with the
  # dashboard variables replaced by plain values.
  python3 - "$dashboard" "$work/dashboard.rules.yaml" <<'PY' || fail "dashboard queries"
import json
import sys

import yaml

dash = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        walk(p.get("panels", []))
        for t in p.get("targets", []):
            exprs.append((p.get("title"), t["expr"]))
walk(dash["panels"])
for v in dash["templating"]["list"]:
    q = v.get("query")
    if isinstance(q, dict) and q.get("query", "").startswith("label_values("):
        # label_values(METRIC_SELECTOR, label): check the selector.
        inner = q["query"][len("label_values("):].rsplit(",", 1)[0]
        exprs.append((f"variable {v['name']}", inner))
subst = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m",
         '"$job"': '".*"', '"$pod"': '".*"'}
rules = []
for i, (title, expr) in enumerate(exprs):
    for k, v in subst.items():
        expr = expr.replace(k, v)
    if "$" in expr:
        sys.exit(f"panel {title!r}: unknown variable in {expr}")
    rules.append({"record": f"dashboard:query_{i}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"{len(rules)} queries")
PY
  if [ -s "$work/dashboard.rules.yaml" ]; then
    ${PROMTOOL:-promtool} check rules "$work/dashboard.rules.yaml" || fail "dashboard queries"
  fi
else
  fail "dashboard JSON"
fi

# 5 ----------------------------------------------------------------------------------------
step "keyward check"
bin="${KEYWARD_BIN:-}"
if [ -z "$bin" ]; then
  for candidate in target/release/keyward target/debug/keyward; do
    if [ -x "$candidate" ] && { [ -z "$bin" ] || [ "$candidate" -nt "$bin" ]; }; then
      bin="$candidate"
    fi
  done
fi
[ -z "$bin" ] && bin="$(command -v keyward || true)"
if [ -n "$bin" ]; then
  echo "using $bin"
  for cfg in deploy/kubernetes/keyward.yaml deploy/docker/keyward.yaml deploy/decision/kubernetes/keyward.yaml; do
    # Point keys.file at the Secret's snapshot in the scratch directory.
    python3 - "$cfg" "$work/keys.yaml" "$work/check.yaml" <<'PY'
import sys
import yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["keys"]["file"] = sys.argv[2]
yaml.safe_dump(cfg, open(sys.argv[3], "w"), sort_keys=False)
PY
    if "$bin" check --config "$work/check.yaml"; then
      echo "$cfg: ok"
    else
      fail "keyward check $cfg"
    fi
  done
else
  echo "no keyward binary (build it, or set KEYWARD_BIN): skipped"
fi

# 6 ----------------------------------------------------------------------------------------
step "hadolint Dockerfile"
if command -v hadolint >/dev/null 2>&1; then
  hadolint Dockerfile && echo ok || fail "hadolint"
else
  echo "hadolint not found: skipped"
fi

# 7 ----------------------------------------------------------------------------------------
# The image is built from what .dockerignore lets into the context: the crate must build
# from that alone (a file `include_str!` reads and the context leaves out broke the image
# build while every other check passed). Made as the Dockerfile makes it: the context's
# files, stubs for the targets Cargo.toml declares without a file there, one release build
# (the dependencies come from this checkout's target directory: only the crate compiles).
step "the image's build context builds"
if command -v cargo >/dev/null 2>&1; then
  ctx="$work/context"
  if python3 - "$root" "$ctx" <<'PY'
import fnmatch, os, re, shutil, subprocess, sys
root, ctx = sys.argv[1], sys.argv[2]
rules = []
for line in open(os.path.join(root, ".dockerignore")):
    line = line.strip()
    if line and not line.startswith("#"):
        rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
def kept(path):
    keep = True
    for negated, pattern in rules:
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            keep = negated
    return keep
files = subprocess.run(["git", "-C", root, "ls-files"], capture_output=True, text=True, check=True).stdout.split()
for f in filter(kept, files):
    os.makedirs(os.path.dirname(os.path.join(ctx, f)) or ctx, exist_ok=True)
    shutil.copy2(os.path.join(root, f), os.path.join(ctx, f))
# The Dockerfile's first step leaves a stub for each target declared by name alone.
kind = name = None
has_path = False
dirs = {"bench": "benches", "test": "tests", "example": "examples", "bin": "src/bin"}
def flush():
    if kind and name and not has_path:
        stub = os.path.join(ctx, dirs[kind], name + ".rs")
        if not os.path.exists(stub):
            os.makedirs(os.path.dirname(stub), exist_ok=True)
            open(stub, "w").write("fn main() {}\n")
for line in open(os.path.join(root, "Cargo.toml")):
    m = re.match(r"^\[\[(bench|test|example|bin)\]\]", line)
    if m or line.startswith("["):
        flush()
        kind, name, has_path = (m.group(1) if m else None), None, False
    elif kind and re.match(r"^name\s*=", line):
        name = line.split('"')[1]
    elif kind and re.match(r"^path\s*=", line):
        has_path = True
flush()
PY
  then
    if (cd "$ctx" && CARGO_TARGET_DIR="$root/target" cargo build --release --locked --offline --bin keyward) > "$work/context.log" 2>&1; then
      echo "ok: $(cd "$ctx" && git -C "$root" ls-files | wc -l) files in the repo, $(find "$ctx" -type f | wc -l) in the context"
    else
      tail -20 "$work/context.log" >&2
      fail "image build context"
    fi
  else
    fail "image build context (copy)"
  fi
else
  echo "cargo not found: skipped"
fi

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "validate.sh: ${#failed[@]} step(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "validate.sh: all checks passed"
