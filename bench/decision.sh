#!/usr/bin/env bash
# Decision mode benchmark (SPEC 15), everything in one run on this machine:
#   1. decisions/s through keyward's decision listener against keyward's own proxied req/s
#      (one keyward process with both listeners; wrk closed loop, interleaved rounds);
#   2. p99 of decisions at half the decision rate measured in 1 (open loop, fixed rate,
#      latency timed from each request's scheduled instant: oha, or `pace` without oha);
#   3. nginx + auth_request + keyward (deploy/decision/nginx.conf as shipped) against nginx
#      alone in front of the same upstream: latency added and CPU per request, closed loop,
#      and at one fixed rate both can hold.
#   --pin: keyward runs one worker on CPU 1 and everything else (load generators, nginx,
#      the upstream) on CPU 0, so keyward's latency is measured without waiting for a core
#      the load generator holds (on 2 cores, oha at half the decision rate needs about one).
#   --paced: fixed rates sent by `pace` (bench/pace.rs, built as a cargo example) even
#      when oha is installed: oha needs about a core at 50k req/s and counts its own
#      queueing as latency. pace spins on its core, so --paced implies --pin, and each
#      round also runs the same rate against a one-worker nginx `return 200` on keyward's
#      core: the floor this host gives any server at that rate (a hypervisor that steals
#      the core for milliseconds shows there first).
# Usage: bench/decision.sh [--duration N] [--rounds N] [--keys N] [--connections N] [--pin] [--paced] [--out FILE]
# Environment: KEYWARD_BIN (default target/release/keyward, built when missing).
# Ports on 127.0.0.1: 18100 upstream, 18110 keyward proxy, 18111 admin, 18112 decision,
# 18120 nginx alone, 18130 nginx + auth_request, 18140 the floor nginx (--paced).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
LIB="$BENCH_DIR/benchlib.py"
export PATH="$PATH:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"

DURATION=10 ROUNDS=3 KEYS=10000 CONNECTIONS=32 OUT="$BENCH_DIR/results/decision.md" PIN="" PACED=
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --keys) KEYS="$2"; shift 2 ;;
    --connections) CONNECTIONS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --pin) PIN=1; shift ;;
    --paced) PACED=1 PIN=1; shift ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

UP=18100 KW=18110 KW_ADMIN=18111 KW_DECIDE=18112 NGX_ALONE=18120 NGX_AUTH=18130 FLOOR=18140
log() { printf '[decision-bench] %s\n' "$*" >&2; }
die() { printf '[decision-bench] error: %s\n' "$*" >&2; exit 1; }
for t in nginx wrk curl python3; do command -v "$t" >/dev/null || die "$t is not installed"; done
OHA=$(command -v oha || true)
[[ -n $OHA && -z $PACED ]] || log "decisions at a fixed rate sent by pace${PACED:+ (--paced)}${PACED:- (oha is not installed)}"

KEYWARD_BIN=${KEYWARD_BIN:-$REPO_DIR/target/release/keyward}
if [[ ! -x $KEYWARD_BIN ]]; then
  log "building keyward: cargo build --release --locked"
  (cd "$REPO_DIR" && cargo build --release --locked) >&2
fi
PACE=${PACE_BIN:-$REPO_DIR/target/release/examples/pace}
if [[ (-z $OHA || -n $PACED) && ! -x $PACE ]]; then
  log "building the load generator: cargo build --release --locked --example pace"
  (cd "$REPO_DIR" && cargo build --release --locked --example pace) >&2
fi
python3 "$LIB" ports-free $UP $KW $KW_ADMIN $KW_DECIDE $NGX_ALONE $NGX_AUTH $FLOOR \
  || die "a benchmark port is in use"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/keyward-decision-bench.XXXXXX")
chmod 755 "$TMP"
PIDS=()
cleanup() {
  local rc=$? pid
  trap - EXIT
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT

# With --pin, keyward gets CPU 1 to itself and every other process runs on CPU 0
# (`taskset` execs the command: the PID recorded is the command's own).
cpu_of() { # NAME: the taskset prefix for NAME's processes, none without --pin
  [[ -z $PIN ]] && return
  if [[ $1 == keyward || $1 == floor ]]; then echo "taskset -c 1"; else echo "taskset -c 0"; fi
}
on_cpu() { # NAME CMD...: run CMD where NAME belongs
  local name=$1; shift
  # shellcheck disable=SC2046
  $(cpu_of "$name") "$@"
}
start() { # NAME CMD...
  local name=$1; shift
  # shellcheck disable=SC2046
  $(cpu_of "$name") "$@" >"$TMP/$name.log" 2>&1 &
  PIDS+=("$!")
  eval "PID_${name}=$!"
}
wait_http() { # URL
  local i
  for ((i = 0; i < 300; i++)); do
    [[ $(curl -s -o /dev/null -m 1 -w '%{http_code}' "$1" || true) != 000 ]] && return 0
    sleep 0.1
  done
  die "nothing answers at $1"
}
cpu_ticks() { # PID...: user+system ticks of these processes and their children
  local p pids=()
  for p in "$@"; do pids+=("$p" $(pgrep -P "$p" || true)); done
  for p in "${pids[@]}"; do cat "/proc/$p/stat" 2>/dev/null; done \
    | awk '{ sub(/^.*\) /, ""); t += $12 + $13 } END { print t + 0 }'
}
nginx_main() { # DIR BODY [WORKERS]: a foreground nginx config around BODY
  cat <<EOF
worker_processes ${3:-2};
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $1/body; proxy_temp_path $1/proxy; fastcgi_temp_path $1/fcgi;
  uwsgi_temp_path $1/uwsgi; scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
$2
}
EOF
}

python3 "$LIB" gen "$TMP" "$KEYS"
# shellcheck disable=SC1091
source "$TMP/bench.env"

mkdir -p "$TMP/up" "$TMP/alone" "$TMP/auth"
nginx_main "$TMP/up" "server { listen 127.0.0.1:$UP; location / { return 200 ok; } }" \
  >"$TMP/up/nginx.conf"
start up nginx -e "$TMP/up/error.log" -p "$TMP/up" -c "$TMP/up/nginx.conf"

cat >"$TMP/keyward.yaml" <<EOF
listen: 127.0.0.1:$KW
upstream: http://127.0.0.1:$UP
decision: { listen: 127.0.0.1:$KW_DECIDE }
admin_listen: 127.0.0.1:$KW_ADMIN
environment: production
credentials: [{ header: x-api-key }]
keys: { file: $TMP/keys.yaml }
shutdown: { drain_delay: 0s, grace: 1s }
log: { format: json, level: warn }
${PIN:+workers: 1}
EOF
start keyward "$KEYWARD_BIN" run --config "$TMP/keyward.yaml"

nginx_main "$TMP/alone" "upstream app { server 127.0.0.1:$UP; keepalive 32; }
server { listen 127.0.0.1:$NGX_ALONE; location / {
  proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }" \
  >"$TMP/alone/nginx.conf"
start alone nginx -e "$TMP/alone/error.log" -p "$TMP/alone" -c "$TMP/alone/nginx.conf"

sed -e "s/\${KEYWARD}/127.0.0.1:$KW_DECIDE/" -e "s/\${APP}/127.0.0.1:$UP/" \
  -e "s/\${LISTEN}/127.0.0.1:$NGX_AUTH/" "$REPO_DIR/deploy/decision/nginx.conf" >"$TMP/auth/site.conf"
nginx_main "$TMP/auth" "include $TMP/auth/site.conf;" >"$TMP/auth/nginx.conf"
start auth nginx -e "$TMP/auth/error.log" -p "$TMP/auth" -c "$TMP/auth/nginx.conf"
if [[ -n $PACED ]]; then
  mkdir -p "$TMP/floor"
  nginx_main "$TMP/floor" "server { listen 127.0.0.1:$FLOOR; location / { return 200 ''; } }" 1 \
    >"$TMP/floor/nginx.conf"
  start floor nginx -e "$TMP/floor/error.log" -p "$TMP/floor" -c "$TMP/floor/nginx.conf"
  wait_http "http://127.0.0.1:$FLOOR/"
fi

for url in "http://127.0.0.1:$UP/" "http://127.0.0.1:$KW_ADMIN/readyz" \
  "http://127.0.0.1:$NGX_ALONE/" "http://127.0.0.1:$NGX_AUTH/"; do wait_http "$url"; done

# The same question through each front door; each must answer 200 with a key, 401 without.
DECIDE_URL="http://127.0.0.1:$KW_DECIDE/v1/decide/auth-request"
DECIDE_H=(-H "x-original-method: GET" -H "x-original-uri: /v1/items")
check() { # WANT URL ARGS...
  local want=$1 url=$2 code; shift 2
  code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "$@" "$url")
  [[ $code == "$want" ]] || die "$url answered $code, expected $want"
}
check 200 "http://127.0.0.1:$KW/v1/items" -H "x-api-key: $BENCH_KEY"
check 401 "http://127.0.0.1:$KW/v1/items"
check 200 "$DECIDE_URL" "${DECIDE_H[@]}" -H "x-api-key: $BENCH_KEY"
check 401 "$DECIDE_URL" "${DECIDE_H[@]}"
check 200 "http://127.0.0.1:$NGX_AUTH/v1/items" -H "x-api-key: $BENCH_KEY"
check 401 "http://127.0.0.1:$NGX_AUTH/v1/items"
log "front doors answer 200 with the key, 401 without"

# run_wrk NAME PIDS URL HEADER...: one closed-loop run; appends to results.tsv
run_wrk() {
  local name=$1 pids=$2 url=$3 out c0 c1; shift 3
  out="$TMP/wrk-$name-$r.txt"
  local hdr=() h
  for h in "$@"; do hdr+=(-H "$h"); done
  # shellcheck disable=SC2086
  c0=$(cpu_ticks $pids)
  on_cpu load wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency "${hdr[@]}" "$url" >"$out" 2>&1
  # shellcheck disable=SC2086
  c1=$(cpu_ticks $pids)
  read -r rps p50 p99 non2xx sockerr requests < <(python3 "$LIB" wrk-summary "$out")
  ((non2xx + sockerr == 0)) || die "$name: $non2xx non-2xx, $sockerr socket errors"
  echo "$name $((r + 1)) $rps $p50 $p99 $requests $((c1 - c0))" >>"$TMP/wrk.tsv"
  log "round $((r + 1)) $name: $rps req/s, p50 $p50 ms, p99 $p99 ms"
}
: >"$TMP/wrk.tsv"
for ((r = 0; r < ROUNDS; r++)); do
  run_wrk decision "$PID_keyward" "$DECIDE_URL" "x-original-method: GET" \
    "x-original-uri: /v1/items" "x-api-key: $BENCH_KEY"
  run_wrk proxy "$PID_keyward" "http://127.0.0.1:$KW/v1/items" "x-api-key: $BENCH_KEY"
  run_wrk nginx_alone "$PID_alone $PID_up" "http://127.0.0.1:$NGX_ALONE/v1/items" \
    "x-api-key: $BENCH_KEY"
  run_wrk nginx_auth "$PID_auth $PID_keyward $PID_up" "http://127.0.0.1:$NGX_AUTH/v1/items" \
    "x-api-key: $BENCH_KEY"
done
median() { # NAME COLUMN (3 rps, 4 p50, 5 p99) of the median round by rps
  awk -v n="$1" '$1 == n' "$TMP/wrk.tsv" | sort -k3 -n \
    | awk -v c="$2" '{ v[NR] = $c } END { print v[int((NR + 1) / 2)] }'
}
cpu_us() { # NAME: CPU µs per request over all rounds
  awk -v n="$1" -v hz="$(getconf CLK_TCK)" '$1 == n { t += $7; q += $6 } END { printf "%.1f", t / hz / q * 1e6 }' "$TMP/wrk.tsv"
}

: >"$TMP/oha.tsv"
run_oha() { # NAME PIDS RATE URL HEADER...
  local name=$1 pids=$2 rate=$3 url=$4 out="$TMP/oha-$1.json" c0 c1 h hdr=(); shift 4
  for h in "$@"; do hdr+=(-H "$h"); done
  # shellcheck disable=SC2086
  c0=$(cpu_ticks $pids)
  on_cpu load "$OHA" -z "${DURATION}s" -q "$rate" -c "$CONNECTIONS" --latency-correction --no-tui \
    --output-format json "${hdr[@]}" "$url" >"$out" 2>"$out.err" || die "oha: $(cat "$out.err")"
  # shellcheck disable=SC2086
  c1=$(cpu_ticks $pids)
  read -r achieved p50 p99 success non2xx secs _ < <(python3 "$LIB" oha-summary "$out")
  echo "$name $rate $achieved $p50 $p99 $non2xx $(python3 -c "print(f'{($c1 - $c0) / $(getconf CLK_TCK) / ($achieved * $secs) * 1e6:.1f}')") oha" >>"$TMP/oha.tsv"
  log "fixed $rate req/s $name: achieved $achieved, p50 $p50 ms, p99 $p99 ms"
}
# Without oha (or with --paced): pace, open loop from one core; latency from each request's
# scheduled instant. It prints: req/s p50 p99 p99.9 max non-2xx requests errors send-lag-p99.
run_paced() { # NAME PIDS RATE URL HEADER...
  local name=$1 pids=$2 rate=$3 url=$4 out="$TMP/paced-$1.txt" c0 c1 addr path; shift 4
  addr=${url#http://} path=/${url#http://*/} addr=${addr%%/*}
  # shellcheck disable=SC2086
  c0=$(cpu_ticks $pids)
  on_cpu load "$PACE" "$addr" "$path" "$rate" "$DURATION" 200 "$@" >"$out" || die "pace: $(cat "$out")"
  # shellcheck disable=SC2086
  c1=$(cpu_ticks $pids)
  read -r rps p50 p99 p999 _ non2xx requests errors lag <"$out"
  ((requests > 0)) || die "pace: no answer from $url"
  echo "$name $rate $rps $p50 $p99 $((non2xx + errors)) $(python3 -c "print(f'{($c1 - $c0) / $(getconf CLK_TCK) / $requests * 1e6:.1f}')") pace(p99.9=${p999}ms,send-lag-p99=${lag}ms)" >>"$TMP/oha.tsv"
  log "paced $rate req/s $name: achieved $rps, p50 $p50 ms, p99 $p99 ms, p99.9 $p999 ms"
}
# Decisions: pace with --paced or without oha. Through nginx: oha when installed; pace
# otherwise, except pinned, where it would spin on the core nginx and the app share.
decision_run() { if [[ -n $OHA && -z $PACED ]]; then run_oha "$@"; else run_paced "$@"; fi; }
nginx_run() {
  if [[ -n $OHA ]]; then run_oha "$@"
  elif [[ -z $PIN ]]; then run_paced "$@"
  else log "no oha: $1 at a fixed rate is left out (pinned, pace would share nginx's core)"
  fi
}
half=$(python3 -c "print(round($(median decision 3) / 2))")
fixed=$(python3 -c "print(round($(median nginx_auth 3) / 2))")
for ((r = 0; r < ROUNDS; r++)); do
  decision_run "decision-half-$r" "$PID_keyward" "$half" "$DECIDE_URL" "x-original-method: GET" \
    "x-original-uri: /v1/items" "x-api-key: $BENCH_KEY"
  [[ -z $PACED ]] || run_paced "floor-half-$r" "$PID_floor" "$half" "http://127.0.0.1:$FLOOR/"
  nginx_run "nginx_alone-$r" "$PID_alone $PID_up" "$fixed" "http://127.0.0.1:$NGX_ALONE/v1/items" \
    "x-api-key: $BENCH_KEY"
  nginx_run "nginx_auth-$r" "$PID_auth $PID_keyward $PID_up" "$fixed" \
    "http://127.0.0.1:$NGX_AUTH/v1/items" "x-api-key: $BENCH_KEY"
done

mkdir -p "$(dirname "$OUT")"
{
  echo "# keyward decision mode benchmark"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs${PIN:+ (pinned: keyward one worker on CPU 1, everything else on CPU 0)}, $KEYS keys, wrk -t1 -c$CONNECTIONS -d${DURATION}s, $ROUNDS interleaved rounds (median round), commit $(git -C "$REPO_DIR" rev-parse --short HEAD)."
  echo
  echo "| front door | req/s | p50 ms | p99 ms | CPU µs/req (listed processes) | per round req/s |"
  echo "|---|---:|---:|---:|---:|---|"
  for n in decision proxy nginx_alone nginx_auth; do
    rounds=$(awk -v n="$n" '$1 == n { printf "%s%.0f", (c++ ? " / " : ""), $3 }' "$TMP/wrk.tsv")
    echo "| $n | $(median "$n" 3) | $(median "$n" 4) | $(median "$n" 5) | $(cpu_us "$n") | $rounds |"
  done
  echo
  echo "CPU counted: decision and proxy, keyward's process; nginx_alone, nginx + upstream;"
  echo "nginx_auth, nginx + keyward + upstream (the shipped nginx.conf)."
  echo "Decisions/s over proxied req/s (median rounds): $(python3 -c "print(f'{$(median decision 3) / $(median proxy 3):.2f}')")x;"
  echo "keyward CPU per proxied request over CPU per decision: $(python3 -c "print(f'{$(cpu_us proxy) / $(cpu_us decision):.2f}')")x."
  echo "nginx + auth_request + keyward against nginx alone: +$(python3 -c "print(f'{$(cpu_us nginx_auth) - $(cpu_us nginx_alone):.1f}')") µs CPU per request (closed loop)."
  if [[ -s $TMP/oha.tsv ]]; then
    echo
    echo "Fixed rate, open loop: oha --latency-correction, or pace (bench/pace.rs: latency from"
    echo "each request's scheduled instant; 200 connections).${PACED:+ floor: a one-worker nginx}"
    [[ -z $PACED ]] || echo "\`return 200\` on keyward's core at the same rate, what this host allows any server."
    echo
    echo "| run | rate asked | achieved | p50 ms | p99 ms | non-2xx | CPU µs/req (listed processes) | tool |"
    echo "|---|---:|---:|---:|---:|---:|---:|---|"
    awk '{ printf "| %s | %s | %.0f | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7, $8 }' "$TMP/oha.tsv"
    echo
    for n in decision-half floor-half nginx_alone nginx_auth; do
      awk -v n="$n" 'index($1, n "-") == 1 { print $5 }' "$TMP/oha.tsv" | sort -n \
        | awk -v n="$n" '{ v[NR] = $1 } END { if (NR) printf "Median p99 of %s: %s ms (rounds: %d).\n", n, v[int((NR + 1) / 2)], NR }'
    done
  fi
} >"$OUT"
cat "$OUT"
