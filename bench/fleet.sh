#!/usr/bin/env bash
# Cost of the shared rate limit (SPEC 14): keyward's CPU per request of a limited key with
# the local limiter and with the limit in Redis, and the Redis calls an unlimited key makes
# (none). wrk drives one keyward at a time in front of nginx `return 200`; keyward's CPU is
# user + system time from /proc/<pid>/stat over each run, divided by the requests served.
#
#   bench/fleet.sh [--duration S] [--rounds N]     (KEYWARD_BIN: default target/release/keyward)
#
# Ports on 127.0.0.1: 28400 upstream, 28410 keyward (admin 28411), 28420 redis.
set -euo pipefail

DURATION=10 ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "fleet.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${KEYWARD_BIN:-$REPO/target/release/keyward}
export PATH="$PATH:/usr/sbin:/sbin"
for tool in wrk nginx redis-server redis-cli "$BIN"; do
  command -v "$tool" >/dev/null || { echo "fleet.sh: $tool not found" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

mkdir -p "$work/nginx/logs"
cat > "$work/nginx/nginx.conf" <<'EOF'
daemon off;
worker_processes 1;
error_log stderr error;
pid nginx.pid;
events {}
http {
  access_log off;
  server { listen 127.0.0.1:28400; location / { return 200 "ok\n"; } }
}
EOF
nginx -p "$work/nginx" -c nginx.conf & pids+=($!)
redis-server --port 28420 --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)

LIMITED=sta_fleet_bench_limited_key_0123456789abcdef
FREE=sta_fleet_bench_free_key_0123456789abcdef
digest() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
cat > "$work/keys.yaml" <<EOF
keys:
  - { id: key_limited, sha256: $(digest $LIMITED), type: service_account, subject_id: s1, account_id: a1, scopes: [read], rate_limit: { per_second: 1000000000, burst: 1000000000 } }
  - { id: key_free, sha256: $(digest $FREE), type: service_account, subject_id: s2, account_id: a1, scopes: [read] }
EOF
config() {
  cat <<EOF
listen: 127.0.0.1:28410
admin_listen: 127.0.0.1:28411
upstream: http://127.0.0.1:28400
environment: production
keys: { file: $work/keys.yaml }
log: { format: json, level: warn }
shutdown: { drain_delay: 0s, grace: 1s }
EOF
  [ "$1" = redis ] && echo 'cluster: { redis: "redis://127.0.0.1:28420/0", timeout: 50ms }'
  return 0
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
redis_calls() {
  redis-cli -p 28420 info commandstats | tr -d '\r' |
    awk -F'[:=,]' -v c="cmdstat_$1" '$1 == c {print $3; found=1} END {if (!found) print 0}'
}

# run MODE KEY -> "requests cpu_us_per_request time_calls"
run() {
  config "$1" > "$work/keyward.yaml"
  "$BIN" run --config "$work/keyward.yaml" 2>"$work/keyward.log" & local kw=$!
  for _ in $(seq 100); do
    curl -fs http://127.0.0.1:28411/readyz >/dev/null 2>&1 && break
    sleep 0.1
  done
  wrk -t1 -c16 -d2s -H "x-api-key: $2" http://127.0.0.1:28410/ >/dev/null   # warm-up
  local t0 c0 out n t1 c1 hz
  t0=$(cpu_ticks $kw); c0=$(redis_calls time)
  out=$(wrk -t1 -c16 -d"${DURATION}s" -H "x-api-key: $2" http://127.0.0.1:28410/)
  t1=$(cpu_ticks $kw); c1=$(redis_calls time)
  kill $kw; wait $kw 2>/dev/null || true
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  if echo "$out" | grep -q "Non-2xx"; then echo "fleet.sh: non-2xx answers" >&2; echo "$out" >&2; fi
  hz=$(getconf CLK_TCK)
  awk -v n="$n" -v t="$(( t1 - t0 ))" -v hz="$hz" -v c="$(( c1 - c0 ))" \
    'BEGIN { printf "%d %.1f %d\n", n, t * 1e6 / hz / n, c }'
}

for _ in $(seq 50); do redis-cli -p 28420 ping >/dev/null 2>&1 && break; sleep 0.1; done
printf '| round | limiter | key | requests | keyward CPU µs/request | Redis TIME calls (limiter scripts) |\n|---|---|---|---|---|---|\n'
for round in $(seq "$ROUNDS"); do
  for case in "local $LIMITED" "redis $LIMITED" "redis $FREE"; do
    set -- $case
    read -r n us calls < <(run "$1" "$2")
    key=limited; [ "$2" = "$FREE" ] && key=unlimited
    printf '| %s | %s | %s | %s | %s | %s |\n' "$round" "$1" "$key" "$n" "$us" "$calls"
  done
done
