#!/usr/bin/env bash
# User-space instructions per request of keyward under callgrind (SPEC 14's limiter cost),
# stable on a loaded machine where CPU time is not: one client connection (wrk -c1), keyward
# in front of nginx `return 200`, counters zeroed after a warm-up, dumped after the run.
# Kernel time (syscalls, wake-ups) is not counted: bench/fleet.sh measures that side.
#
#   bench/fleet-callgrind.sh BIN local|redis limited|free [SECONDS]
#
# Ports on 127.0.0.1: 28500 upstream, 28510 keyward (admin 28511), 28520 redis.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,9p' "$0"; exit 2; }
BIN=$1 MODE=$2 KEY=$3 SECS=${4:-10}
export PATH="$PATH:/usr/sbin:/sbin"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
error_log stderr error;
pid nginx.pid;
events {}
http { access_log off; server { listen 127.0.0.1:28500; location / { return 200 "ok\n"; } } }
NGINX
nginx -p "$work/nginx" -c nginx.conf & pids+=($!)
redis-server --port 28520 --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
LIMITED=sta_fleet_bench_limited_key_0123456789abcdef
FREE=sta_fleet_bench_free_key_0123456789abcdef
digest() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
cat > "$work/keys.yaml" <<KEYS
keys:
  - { id: key_limited, sha256: $(digest $LIMITED), type: service_account, subject_id: s1, account_id: a1, scopes: [read], rate_limit: { per_second: 1000000000, burst: 1000000000 } }
  - { id: key_free, sha256: $(digest $FREE), type: service_account, subject_id: s2, account_id: a1, scopes: [read] }
KEYS
cat > "$work/keyward.yaml" <<CONFIG
listen: 127.0.0.1:28510
admin_listen: 127.0.0.1:28511
upstream: http://127.0.0.1:28500
environment: production
keys: { file: $work/keys.yaml }
log: { format: json, level: warn }
shutdown: { drain_delay: 0s, grace: 1s }
CONFIG
# A timeout valgrind's slowness never reaches: every limited request is a Redis call.
[ "$MODE" = redis ] && echo 'cluster: { redis: "redis://127.0.0.1:28520/0", timeout: 2s }' >> "$work/keyward.yaml"
raw=$LIMITED; [ "$KEY" = free ] && raw=$FREE
for _ in $(seq 100); do redis-cli -p 28520 ping >/dev/null 2>&1 && break; sleep 0.1; done
valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$BIN" run --config "$work/keyward.yaml" \
  >/dev/null 2>"$work/valgrind.log" &
kw=$!; pids+=($kw)
for _ in $(seq 600); do curl -fs http://127.0.0.1:28511/readyz >/dev/null 2>&1 && break; sleep 0.1; done
wrk -t1 -c1 -d3s -H "x-api-key: $raw" http://127.0.0.1:28510/ >/dev/null
callgrind_control -z $kw >/dev/null
out=$(wrk -t1 -c1 -d"${SECS}s" -H "x-api-key: $raw" http://127.0.0.1:28510/)
callgrind_control -d $kw >/dev/null
n=$(echo "$out" | awk '/requests in/ {print $1}')
for _ in $(seq 50); do [ -s "$work/cg.out.1" ] && break; sleep 0.1; done
ir=$(awk '/^summary:|^totals:/ {print $2; exit}' "$work/cg.out.1")
echo "$MODE $KEY: $n requests, $((ir / n)) instructions/request"
