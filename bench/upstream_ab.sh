#!/usr/bin/env bash
# A/B of two keyward options on one machine, against one nginx upstream (1 worker) that
# listens on 127.0.0.1:18200 and on a Unix socket:
#   tcp   upstream: http://127.0.0.1:18200, every identity header (the default)
#   unix  upstream: unix:<dir>/app.sock,   every identity header
#   tcp4  upstream over TCP, identity_headers.include: [subject-id, account-id, key-id, scopes]
#   h1hyper  upstream over TCP, every identity header, `http1_server: hyper` (hyper's server
#         reads the requests instead of keyward's own)
# Each variant is its own keyward (workers: 1, ports 18210/18220/18230/18240 and the next one for
# admin), loaded by `wrk -t1 -c32 -d${DUR}s` with one known key, in ROUNDS interleaved rounds
# (each round starts with a different variant). Printed per round and as medians: req/s,
# CPU µs per request of keyward (user + kernel, from /proc/PID/stat) and of the upstream
# nginx worker, and keyward's kernel µs per request.
#
#   KEYWARD_BIN=target/release/keyward ROUNDS=7 DUR=6 bench/upstream_ab.sh
#
# Needs nginx, wrk and curl on PATH. Everything it starts, and its temp dir, go on exit.
set -euo pipefail
BIN=${KEYWARD_BIN:?set KEYWARD_BIN to a release build of keyward}
ROUNDS=${ROUNDS:-5}; DUR=${DUR:-8}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T=$(mktemp -d /tmp/kwab.XXXX); chmod 755 "$T"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$T"; }
trap cleanup EXIT
KEY=sta_demo_service_key_0123456789abcdef   # key_demo_service in config/keys.yaml
cp "$REPO/config/keys.yaml" "$T/keys.yaml"
mkdir -p "$T/up/tmp"
cat > "$T/up/nginx.conf" <<NG
worker_processes 1; daemon off; pid $T/up/nginx.pid; error_log $T/up/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 120s;
  client_body_temp_path $T/up/tmp; proxy_temp_path $T/up/tmp; fastcgi_temp_path $T/up/tmp;
  uwsgi_temp_path $T/up/tmp; scgi_temp_path $T/up/tmp;
  server { listen 127.0.0.1:18200; listen unix:$T/app.sock; location / { return 200 "ok"; } } }
NG
nginx -e "$T/up/error.log" -p "$T/up" -c "$T/up/nginx.conf" & pids+=($!)
for _ in $(seq 50); do [[ -S $T/app.sock ]] && break; sleep 0.1; done
chmod 666 "$T/app.sock"   # nginx's master may run as root; keyward may not
upid=$(pgrep -P "${pids[0]}" | head -1)   # the nginx worker
declare -A port kpid
start() { # name upstream include port [extra yaml line]
  local inc=""; [[ -n $3 ]] && inc="  include: [$3]"
  cat > "$T/$1.yaml" <<CF
${5:-}
listen: 127.0.0.1:$4
upstream: $2
admin_listen: 127.0.0.1:$(( $4 + 1 ))
environment: production
workers: 1
credentials: [{ header: x-api-key }]
keys: { file: $T/keys.yaml }
identity_headers:
  prefix: x-auth-
$inc
log: { format: json, level: warn }
shutdown: { drain_delay: 0s, grace: 1s }
CF
  "$BIN" run --config "$T/$1.yaml" > "$T/$1.log" 2>&1 & pids+=($!)
  port[$1]=$4; kpid[$1]=$!
}
start tcp "http://127.0.0.1:18200" "" 18210
start unix "unix:$T/app.sock" "" 18220
start tcp4 "http://127.0.0.1:18200" "subject-id, account-id, key-id, scopes" 18230
start h1hyper "http://127.0.0.1:18200" "" 18240 "http1_server: hyper"
variants=(tcp unix tcp4 h1hyper)
for v in "${variants[@]}"; do
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$(( ${port[$v]} + 1 ))/readyz" >/dev/null && break; sleep 0.1; done
  curl -sf -H "x-api-key: $KEY" "http://127.0.0.1:${port[$v]}/" >/dev/null || { echo "$v not answering"; cat "$T/$v.log"; exit 1; }
done
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }   # user + kernel
sys_ticks() { awk '{print $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
us_per_req() { awk -v d="$1" -v n="$2" -v hz="$HZ" 'BEGIN{printf "%.2f", d/hz/n*1e6}'; }
n=${#variants[@]}
echo "round variant req/s keyward_us/req upstream_us/req non2xx keyward_kernel_us/req"
for r in $(seq 1 "$ROUNDS"); do
  for i in $(seq 0 $(( n - 1 ))); do
    v=${variants[$(( (i + r) % n ))]}; kp=${kpid[$v]}
    k0=$(ticks "$kp"); u0=$(ticks "$upid"); s0=$(sys_ticks "$kp")
    out=$(wrk -t1 -c32 -d"${DUR}s" -H "x-api-key: $KEY" "http://127.0.0.1:${port[$v]}/")
    k1=$(ticks "$kp"); u1=$(ticks "$upid"); s1=$(sys_ticks "$kp")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out"); rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    echo "$r $v $rps $(us_per_req $((k1-k0)) "$reqs") $(us_per_req $((u1-u0)) "$reqs") ${non2xx:-0} $(us_per_req $((s1-s0)) "$reqs")"
  done
done | tee "$T/rounds.txt"
med() { awk -v v="$1" -v c="$2" '$2==v {print $c}' "$T/rounds.txt" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
echo "medians: variant req/s keyward_us/req upstream_us/req keyward_kernel_us/req"
for v in "${variants[@]}"; do
  echo "$v $(med "$v" 3) $(med "$v" 4) $(med "$v" 5) $(med "$v" 7)"
done
