#!/usr/bin/env bash
# Cost of the shared rate limit (SPEC 14): keyward's CPU per request of a limited key with
# the local limiter and with the limit in Redis, and the Redis calls an unlimited key makes
# (none). wrk drives one keyward at a time in front of nginx `return 200`; keyward's CPU is
# user + system time from /proc/<pid>/stat over each run, divided by the requests served.
#
#   bench/fleet.sh [--duration S] [--rounds N] [--rate R]   (KEYWARD_BIN: default target/release/keyward)
#
# Without --rate wrk sends as fast as keyward answers (16 connections), so the local limiter
# runs at a higher rate than the Redis one and amortizes wakeups over more requests. With
# --rate R each of the 16 connections waits 16/R s between requests: about R requests/s in
# both cases, the fairer comparison of CPU per request.
#
# Ports on 127.0.0.1: 28400 upstream, 28410 keyward (admin 28411), 28420 redis.
set -euo pipefail

DURATION=10 ROUNDS=3 RATE=
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
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
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true   # the ports are free for the next run
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/nginx/logs"
# wrk calls delay() before each request: 16 connections at RATE requests/s in all.
DELAY_MS=0
[ -n "$RATE" ] && DELAY_MS=$(awk -v r="$RATE" 'BEGIN { printf "%.3f", 16 * 1000 / r }')
echo "function delay() return $DELAY_MS end" > "$work/pace.lua"
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

cpu_ticks() { awk '{print $14 + $15, $14}' "/proc/$1/stat"; }   # user+system, user
# Context switches of all of keyward's threads (a wake-up across threads costs one or two).
switches() { cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ {n += $2} END {print n}'; }
redis_calls() {
  redis-cli -p 28420 info commandstats | tr -d '\r' |
    awk -F'[:=,]' -v c="cmdstat_$1" '$1 == c {print $3; found=1} END {if (!found) print 0}'
}

# run MODE KEY: sets N (requests), US (CPU µs/request), USER (its user part), CS (context switches/request),
# CALLS (Redis TIME calls).
run() {
  config "$1" > "$work/keyward.yaml"
  "$BIN" run --config "$work/keyward.yaml" >"$work/keyward.out" 2>"$work/keyward.log" &
  local kw=$!
  pids+=("$kw")
  local ready=
  for _ in $(seq 300); do
    curl -fs http://127.0.0.1:28411/readyz >/dev/null 2>&1 && { ready=1; break; }
    sleep 0.1
  done
  [ -n "$ready" ] || { echo "fleet.sh: keyward not ready" >&2; cat "$work/keyward.log" >&2; exit 1; }
  wrk -t1 -c16 -d2s -H "x-api-key: $2" http://127.0.0.1:28410/ >/dev/null   # warm-up
  local t0 u0 s0 c0 out t1 u1 s1 c1 hz
  read -r t0 u0 < <(cpu_ticks $kw); s0=$(switches $kw); c0=$(redis_calls time)
  out=$(wrk -t1 -c16 -d"${DURATION}s" -s "$work/pace.lua" -H "x-api-key: $2" http://127.0.0.1:28410/)
  read -r t1 u1 < <(cpu_ticks $kw); s1=$(switches $kw); c1=$(redis_calls time)
  kill $kw; wait $kw 2>/dev/null || true
  N=$(echo "$out" | awk '/requests in/ {print $1}')
  if echo "$out" | grep -q "Non-2xx"; then echo "fleet.sh: non-2xx answers" >&2; echo "$out" >&2; fi
  hz=$(getconf CLK_TCK)
  US=$(awk -v n="$N" -v t="$(( t1 - t0 ))" -v hz="$hz" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
  USER=$(awk -v n="$N" -v t="$(( u1 - u0 ))" -v hz="$hz" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
  CS=$(awk -v n="$N" -v s="$(( s1 - s0 ))" 'BEGIN { printf "%.2f", s / n }')
  CALLS=$(( c1 - c0 ))
}

for _ in $(seq 300); do redis-cli -p 28420 ping >/dev/null 2>&1 && break; sleep 0.1; done
echo "rate: ${RATE:-unpaced} requests/s, ${DURATION}s per run"
printf '| round | limiter | key | requests | keyward CPU µs/request | of which user | context switches/request | Redis TIME calls (limiter scripts) |\n|---|---|---|---|---|---|---|---|\n'
for round in $(seq "$ROUNDS"); do
  for case in "local $LIMITED" "redis $LIMITED" "redis $FREE"; do
    set -- $case
    run "$1" "$2"
    key=limited; [ "$2" = "$FREE" ] && key=unlimited
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$round" "$1" "$key" "$N" "$US" "$USER" "$CS" "$CALLS"
  done
done
