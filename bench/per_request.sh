#!/usr/bin/env bash
# Instructions and heap allocations per proxied request, counted by valgrind's callgrind:
# keyward (one worker) runs in front of an nginx upstream, its counters are zeroed once it
# is ready, a client sends N allowed requests on one keep-alive connection, and the counters
# are dumped. Instruction counts are user space only (no kernel time) and, like the
# allocation count (calls into jemalloc), do not depend on how loaded the machine is, so
# changes can be compared anywhere. Times under valgrind mean nothing; counts do.
#
# Usage: bench/per_request.sh [N]   (default 5000; KEYWARD_BIN as for bench/run.sh;
# KEYWARD_EXTRA: YAML lines added to the config, e.g. `upstream_client: hyper`;
# KEYWARD_DOOR=decision: count decisions on the decision listener instead of proxied requests;
# KEYWARD_REQUEST=common: the request carries the headers a typical API client sends besides
# the key (user agent, accept, content type, request id, trace context, a cookie), on
# /v1/orders, instead of the key alone on /; KEYWARD_LOG_LEVEL: log.level, default warn; at
# info every request writes its access-log line, to a file here)
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
N=${1:-5000}
KEYWARD_BIN=${KEYWARD_BIN:-$REPO_DIR/target/release/keyward}
UPSTREAM_PORT=18100 PROXY_PORT=18110 ADMIN_PORT=18111 DECISION_PORT=18112
DOOR=${KEYWARD_DOOR:-proxy}
[[ $DOOR == proxy || $DOOR == decision ]] || { echo "KEYWARD_DOOR is proxy or decision" >&2; exit 1; }
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

[[ -x $KEYWARD_BIN ]] || { echo "no keyward binary at $KEYWARD_BIN (cargo build --release)" >&2; exit 1; }
for tool in nginx valgrind callgrind_control; do
  command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install nginx-light valgrind)" >&2; exit 1; }
done

TMP=$(mktemp -d "${TMPDIR:-/tmp}/keyward-per-request.XXXXXX")
chmod 755 "$TMP"
KW_PID=""
cleanup() {
  [[ -n $KW_PID ]] && kill "$KW_PID" 2>/dev/null || true
  [[ -f $TMP/nginx.pid ]] && kill "$(cat "$TMP/nginx.pid")" 2>/dev/null || true
  [[ -n ${KEEP_CALLGRIND:-} ]] && cp "$TMP"/callgrind.out.* "$KEEP_CALLGRIND"/ 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT

python3 "$BENCH_DIR/benchlib.py" gen "$TMP" 1000
# shellcheck disable=SC1091
source "$TMP/bench.env"

mkdir -p "$TMP/ngx"
cat >"$TMP/ngx/nginx.conf" <<EOF
worker_processes 1;
pid $TMP/nginx.pid;
error_log $TMP/ngx/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $TMP/ngx; proxy_temp_path $TMP/ngx; fastcgi_temp_path $TMP/ngx;
    uwsgi_temp_path $TMP/ngx; scgi_temp_path $TMP/ngx;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$UPSTREAM_PORT; location / { return 200 "ok"; } }
}
EOF
nginx -e "$TMP/ngx/error.log" -p "$TMP/ngx" -c "$TMP/ngx/nginx.conf"

cat >"$TMP/keyward.yaml" <<EOF
listen: 127.0.0.1:$PROXY_PORT
upstream: ${UPSTREAM:-http://127.0.0.1:$UPSTREAM_PORT}
admin_listen: 127.0.0.1:$ADMIN_PORT
environment: production
credentials:
  - { header: x-api-key }
keys:
  file: $TMP/keys.yaml
admin:
  token_sha256: 3f9967c81c5db39ca184a821f85aec50cb0d3ef30ecf1de704d001f48f998d35
workers: 1
decision: { listen: 127.0.0.1:$DECISION_PORT }
shutdown: { drain_delay: 0s, grace: 1s }
log: { format: json, level: ${KEYWARD_LOG_LEVEL:-warn} }
${KEYWARD_EXTRA:-}
EOF

valgrind --tool=callgrind --callgrind-out-file="$TMP/callgrind.out" \
  "$KEYWARD_BIN" run --config "$TMP/keyward.yaml" >"$TMP/keyward.log" 2>&1 &
KW_PID=$!

# client ready|load: wait for /readyz, or send N allowed requests on one connection.
client() {
  python3 - "$1" "$N" "$PROXY_PORT" "$ADMIN_PORT" "$BENCH_KEY" "$DOOR" "$DECISION_PORT" \
    "${KEYWARD_REQUEST:-plain}" <<'PY'
import http.client, sys, time
mode, n, port, admin, key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
path, headers = "/", {"x-api-key": key}
if sys.argv[8] == "common":
    path = "/v1/orders"
    headers.update({
        "user-agent": "python-requests/2.31.0",
        "accept": "application/json",
        "accept-language": "en-US",
        "content-type": "application/json",
        "x-request-id": "c0ffee-1234",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "cookie": "session=abc",
    })
if sys.argv[6] == "decision":
    port, path = int(sys.argv[7]), "/v1/decide/auth-request"
    headers.update({"x-original-method": "GET", "x-original-uri": "/v1/items"})
if mode == "ready":
    deadline = time.time() + 120
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
            c.request("GET", "/readyz")
            if c.getresponse().status == 200:
                sys.exit(0)
        except OSError:
            pass
        if time.time() > deadline:
            sys.exit("keyward did not become ready")
        time.sleep(0.2)
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    c.request("GET", path, headers=headers)
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"unexpected status {r.status}")
PY
}

client ready
# One request outside the count: the upstream connection is opened, as in steady state.
N=1 client load
callgrind_control -z "$KW_PID" >/dev/null 2>&1
client load
callgrind_control -d "$KW_PID" >/dev/null 2>&1
python3 - "$N" "$DOOR" "$TMP"/callgrind.out.* <<'PY'
import re, sys
n, files = int(sys.argv[1]), sys.argv[3:]
alloc = re.compile(r"^_rjem_(malloc|mallocx|calloc|realloc|rallocx)$")
total = calls = 0
for path in files:
    names, callee = {}, None
    for line in open(path):
        m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            kind, fid, name = m.groups()
            if name:
                names[fid] = name
            callee = fid if kind == "cfn" else None
        elif line.startswith("calls=") and callee is not None:
            if alloc.search(names.get(callee, "")):
                calls += int(line.split("=")[1].split()[0])
            callee = None
        elif line.startswith("summary:") or line.startswith("totals:"):
            total = max(total, int(line.split()[1]))
print(f"instructions per request: {total / n:,.0f} (user space)")
print(f"allocations per request: {calls / n:.2f}")
print(f"({n} {'decisions' if sys.argv[2] == 'decision' else 'requests'}, one worker, one keep-alive connection)")
PY
