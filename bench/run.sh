#!/usr/bin/env bash
# Side-by-side proxy load benchmark: direct upstream, nginx, haproxy and keyward doing the
# same job (x-api-key lookup in a key table, 401 or forward with x-auth-subject-id).
# See bench/README.md for the method. Run from anywhere: bench/run.sh --help
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
LIB="$BENCH_DIR/benchlib.py"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin:${CARGO_HOME:-$HOME/.cargo}/bin"

usage() {
  cat <<'EOF'
Usage: bench/run.sh [options]

  --duration N     seconds per wrk run and per oha run (default 10)
  --rounds N       interleaved rounds; the median round is reported (default 3)
  --keys N         keys in each peer's table (default 10000)
  --peers LIST     comma-separated subset of direct,relay,nginx,haproxy,keyward
                   (default: all; relay is HAProxy in TCP mode: the hop alone)
  --connections N  concurrent connections for wrk and oha (default 32)
  --smoke          quick check for CI: 1 round x 2 s, 1000 keys, no fixed-rate part,
                   report written to bench/results/smoke.md (the req/s chart is
                   still drawn when matplotlib is there)
  --rates LIST     fixed-rate loads, in % of nginx's open-loop saturation
                   (default 25,50,65,80; integers from 1 to 200)
  --no-oha         skip the fixed-rate latency part
  --upstream-socket
                   the upstream nginx also listens on a unix socket in the temp dir,
                   and every proxy (relay, nginx, haproxy, keyward) reaches it over
                   that socket; direct stays on TCP 127.0.0.1:18000 (same server)
  --pgo            benchmark keyward as the image ships it: built by bench/pgo.sh
                   (profile-guided; target/pgo/release/keyward) unless KEYWARD_BIN is set
  --no-plots       do not draw the charts (bench/plot.py, matplotlib)
  --no-install     never install missing tools (apt-get, cargo install oha)
  --out FILE       where to write the markdown report
                   (default bench/results/latest.md, or smoke.md with --smoke); the
                   charts go beside it as NAME-rps.png, NAME-latency.png and
                   NAME-cpu.png, the raw rounds in NAME-data/ (NAME: FILE without .md)
  -h, --help       this text

Environment: KEYWARD_BIN (default target/release/keyward; built with
`cargo build --release --locked` when missing); KEYWARD_IDENTITY_INCLUDE: keyward's
`identity_headers.include` (e.g. `subject-id`, the one header the nginx and HAProxy peers
add; default all twelve, as shipped). Missing tools are installed (apt-get,
cargo install oha, pip install matplotlib) unless --no-install.

Ports used on 127.0.0.1: 18000 upstream (= direct), 18010 nginx, 18020 haproxy,
18030 keyward (admin 18031), 18040 relay.
EOF
}

ORIG_ARGS="$*"
DURATION="" ROUNDS="" KEYS="" PEERS="direct,relay,nginx,haproxy,keyward" CONNECTIONS=32
SMOKE=0 OHA=1 INSTALL=1 OUT="" RATES="25,50,65,80" UPSTREAM_SOCKET=0 PLOTS=1 PGO=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --keys) KEYS="$2"; shift 2 ;;
    --peers) PEERS="$2"; shift 2 ;;
    --connections) CONNECTIONS="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --rates) RATES="$2"; shift 2 ;;
    --no-oha) OHA=0; shift ;;
    --upstream-socket) UPSTREAM_SOCKET=1; shift ;;
    --no-plots) PLOTS=0; shift ;;
    --pgo) PGO=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ $SMOKE == 1 ]]; then
  : "${DURATION:=2}" "${ROUNDS:=1}" "${KEYS:=1000}" "${OUT:=$BENCH_DIR/results/smoke.md}"
  OHA=0
fi
: "${DURATION:=10}" "${ROUNDS:=3}" "${KEYS:=10000}" "${OUT:=$BENCH_DIR/results/latest.md}"
for v in DURATION ROUNDS KEYS CONNECTIONS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "--${v,,} must be a positive integer" >&2; exit 2; }
done
IFS=, read -r -a RATE_LIST <<<"$RATES"
[[ ${#RATE_LIST[@]} -gt 0 ]] || { echo "--rates is empty" >&2; exit 2; }
for pct in "${RATE_LIST[@]}"; do
  [[ $pct =~ ^[1-9][0-9]*$ && $pct -le 200 ]] \
    || { echo "--rates: '$pct' is not an integer percentage from 1 to 200" >&2; exit 2; }
done

UPSTREAM_PORT=18000
declare -A PORT=([direct]=18000 [nginx]=18010 [haproxy]=18020 [keyward]=18030 [relay]=18040)
KEYWARD_ADMIN_PORT=18031

IFS=, read -r -a PEER_LIST <<<"$PEERS"
[[ ${#PEER_LIST[@]} -gt 0 ]] || { echo "--peers is empty" >&2; exit 2; }
for p in "${PEER_LIST[@]}"; do
  [[ -n ${PORT[$p]:-} ]] || { echo "unknown peer: $p (known: direct,relay,nginx,haproxy,keyward)" >&2; exit 2; }
done
has_peer() { local p; for p in "${PEER_LIST[@]}"; do [[ $p == "$1" ]] && return 0; done; return 1; }

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"
  elif command -v sudo >/dev/null; then sudo -n "$@"
  else die "need root to run: $*"
  fi
}

# ---------------------------------------------------------------- tools
install_tools() {
  local need=() t
  for t in nginx wrk curl python3; do command -v "$t" >/dev/null || need+=("$t"); done
  if has_peer haproxy || has_peer relay; then command -v haproxy >/dev/null || need+=(haproxy); fi
  [[ ${#need[@]} -eq 0 ]] && return 0
  [[ $INSTALL == 1 ]] || die "missing tools: ${need[*]} (and --no-install given)"
  log "installing: ${need[*]}"
  # Keep Debian's maintainer scripts from starting a system nginx/haproxy on install.
  local made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
    made_policy=1
  fi
  local rc=0
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null || rc=$?
  [[ $made_policy == 1 ]] && as_root rm -f /usr/sbin/policy-rc.d
  [[ $rc == 0 ]] || die "apt-get install failed"
  for t in "${need[@]}"; do command -v "$t" >/dev/null || die "$t still missing after install"; done
}

OHA_BIN=""
OHA_SKIP_REASON=""
find_oha() {
  if [[ $OHA == 0 ]]; then
    OHA_SKIP_REASON="disabled (--smoke or --no-oha)"; return
  fi
  if ! has_peer nginx; then
    OHA_SKIP_REASON="needs the nginx peer to set the rate"; return
  fi
  if ! command -v oha >/dev/null; then
    if [[ $INSTALL == 1 ]]; then
      log "oha not found: cargo install oha --locked (takes several minutes)"
      cargo install oha --locked >&2 || log "cargo install oha failed"
    fi
  fi
  if command -v oha >/dev/null; then
    OHA_BIN=$(command -v oha)
  else
    OHA_SKIP_REASON="oha is not installed (cargo install oha --locked)"
  fi
}

# Charts need matplotlib; without it the run still writes its report, with a note.
PLOT_SKIP_REASON=""
find_matplotlib() {
  if [[ $PLOTS == 0 ]]; then PLOT_SKIP_REASON="disabled (--no-plots)"; return; fi
  python3 -c 'import matplotlib' 2>/dev/null && return
  if [[ $INSTALL == 1 ]]; then
    log "matplotlib not found: python3 -m pip install matplotlib"
    python3 -m pip install --quiet matplotlib >&2 || true
    python3 -c 'import matplotlib' 2>/dev/null && return
    PLOT_SKIP_REASON="matplotlib could not be installed (python3 -m pip install matplotlib)"
  else
    PLOT_SKIP_REASON="matplotlib is not installed (--no-install given; python3 -m pip install matplotlib)"
  fi
  log "charts will be skipped: $PLOT_SKIP_REASON"
}

# ---------------------------------------------------------------- processes
TMP=""
PIDS=()
declare -A PID=() # by name: upstream, nginx, haproxy, relay, keyward
cleanup() {
  local rc=$? pid i
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  [[ -n $TMP && -d $TMP ]] && rm -rf "$TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME LOGFILE CMD...: run CMD in the background, remember its pid.
start() {
  local name=$1 logf=$2; shift 2
  "$@" >"$logf" 2>&1 &
  PIDS+=("$!")
  PID[$name]=$!
}

# wait_http NAME PID URL [WANT]: poll URL until it answers (or answers WANT), 30 s at most.
wait_http() {
  local name=$1 pid=$2 url=$3 want=${4:-} code i hint=""
  [[ $name == keyward && $UPSTREAM_SOCKET == 1 ]] \
    && hint=" (with --upstream-socket keyward needs 'upstream: unix:PATH' support)"
  for ((i = 0; i < 300; i++)); do
    kill -0 "$pid" 2>/dev/null || die "$name exited during start-up$hint (log: $(tail -n 20 "$TMP/$name.log" 2>/dev/null))"
    code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$url" 2>/dev/null || true)
    if [[ -n $want ]]; then [[ $code == "$want" ]] && return 0
    else [[ -n $code && $code != 000 ]] && return 0
    fi
    sleep 0.1
  done
  die "$name did not become ready at $url$hint (last status: ${code:-none}; log: $(tail -n 20 "$TMP/$name.log" 2>/dev/null))"
}

nginx_temp_paths() {
  local d=$1
  cat <<EOF
    client_body_temp_path $d/tmp/body;
    proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi;
    uwsgi_temp_path $d/tmp/uwsgi;
    scgi_temp_path $d/tmp/scgi;
EOF
}

# The upstream as each proxy names it: over TCP by default, over the unix socket with
# --upstream-socket (direct always reaches the same server over TCP).
# upstream_addr UNIX_PREFIX TCP_PREFIX: PREFIX + the socket path, or PREFIX + host:port.
upstream_addr() {
  if [[ $UPSTREAM_SOCKET == 1 ]]; then echo "$1$UPSTREAM_SOCK"; else echo "${2}127.0.0.1:$UPSTREAM_PORT"; fi
}
upstream_nginx() { upstream_addr unix: ""; }
upstream_haproxy() { upstream_addr unix@ ""; }
upstream_keyward() { upstream_addr unix: http://; }

start_upstream() {
  local d=$TMP/upstream upstream_listen_sock=""
  mkdir -p "$d/tmp"
  if [[ $UPSTREAM_SOCKET == 1 ]]; then
    # nginx makes its unix listening sockets mode 0666: the peers' workers can connect.
    upstream_listen_sock="
        listen unix:$UPSTREAM_SOCK;"
  fi
  cat >"$d/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
$(nginx_temp_paths "$d")
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    default_type text/plain;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT;$upstream_listen_sock
        # Used once per peer by the correctness check: echoes the injected identity.
        location = /__subject { return 200 "\$http_x_auth_subject_id"; }
        # And which listener a peer reached: unix:PATH over the socket, 127.0.0.1 over TCP.
        location = /__via { return 200 "\$server_addr"; }
        location / { return 200 "ok"; }
    }
}
EOF
  start upstream "$TMP/upstream.log" nginx -e "$d/error.log" -p "$d" -c "$d/nginx.conf"
  wait_http upstream "${PID[upstream]}" "http://127.0.0.1:$UPSTREAM_PORT/"
  if [[ $UPSTREAM_SOCKET == 1 ]]; then
    local code
    code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' --unix-socket "$UPSTREAM_SOCK" http://localhost/ || true)
    [[ $code == 200 ]] || die "upstream does not answer on $UPSTREAM_SOCK (status: ${code:-none})"
    log "upstream: 127.0.0.1:$UPSTREAM_PORT (direct) and unix:$UPSTREAM_SOCK (every proxy)"
  fi
}

start_nginx() {
  local d=$TMP/nginx
  mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
worker_processes 2;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
$(nginx_temp_paths "$d")
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    map_hash_max_size 262144;
    map_hash_bucket_size 128;
    map \$http_x_api_key \$subject {
        default "";
        include $TMP/nginx-keys.map;
    }
    upstream app {
        server $(upstream_nginx);
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:${PORT[nginx]};
        location / {
            if (\$subject = "") { return 401; }
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header x-auth-subject-id \$subject;
        }
    }
}
EOF
  start nginx "$TMP/nginx.log" nginx -e "$d/error.log" -p "$d" -c "$d/nginx.conf"
  wait_http nginx "${PID[nginx]}" "http://127.0.0.1:${PORT[nginx]}/"
}

start_haproxy() {
  cat >"$TMP/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend bench
    bind 127.0.0.1:${PORT[haproxy]}
    http-request set-var(txn.subject) req.hdr(x-api-key),map($TMP/haproxy-keys.map)
    http-request deny deny_status 401 if !{ var(txn.subject) -m found }
    http-request set-header x-auth-subject-id %[var(txn.subject)]
    default_backend app

backend app
    server app $(upstream_haproxy)
EOF
  run_haproxy haproxy
}

# run_haproxy NAME: check $TMP/NAME.cfg, start HAProxy on it and wait for PORT[NAME].
run_haproxy() {
  local name=$1
  haproxy -c -q -f "$TMP/$name.cfg" >"$TMP/$name-check.log" 2>&1 \
    || die "$name (haproxy) config check failed: $(cat "$TMP/$name-check.log")"
  start "$name" "$TMP/$name.log" haproxy -db -f "$TMP/$name.cfg"
  wait_http "$name" "${PID[$name]}" "http://127.0.0.1:${PORT[$name]}/"
}

# The hop alone: HAProxy relaying bytes in TCP mode, with no HTTP parsing, no key check and
# no header work, over one connection per client connection. It makes the same four socket
# calls per request as an HTTP proxy (two reads, two writes), so its req/s is the ceiling
# for any proxy here that forwards each request over its own loopback hop.
start_relay() {
  cat >"$TMP/relay.cfg" <<EOF
global
    nbthread 2
    maxconn 4096

defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s

frontend relay
    bind 127.0.0.1:${PORT[relay]}
    default_backend app

backend app
    server app $(upstream_haproxy)
EOF
  run_haproxy relay
}

KEYWARD_BIN_DEFAULT="$REPO_DIR/target/release/keyward"
build_keyward() {
  if [[ -n ${KEYWARD_BIN:-} ]]; then
    [[ -x $KEYWARD_BIN ]] || die "KEYWARD_BIN=$KEYWARD_BIN is not an executable"
    return
  fi
  if [[ $PGO == 1 ]]; then
    log "building keyward with profile-guided optimization: bench/pgo.sh"
    bash "$BENCH_DIR/pgo.sh" >&2 || die "bench/pgo.sh failed"
    KEYWARD_BIN=$REPO_DIR/target/pgo/release/keyward
    return
  fi
  KEYWARD_BIN=$KEYWARD_BIN_DEFAULT
  if [[ ! -x $KEYWARD_BIN ]]; then
    log "building keyward: cargo build --release --locked"
    (cd "$REPO_DIR" && cargo build --release --locked) >&2 || die "cargo build failed"
    [[ -x $KEYWARD_BIN ]] || die "no binary at $KEYWARD_BIN after the build"
  fi
}

start_keyward() {
  # Same fields as config/keyward.yaml; only what the benchmark needs differs.
  cat >"$TMP/keyward.yaml" <<EOF
listen: 127.0.0.1:${PORT[keyward]}
upstream: $(upstream_keyward)
admin_listen: 127.0.0.1:$KEYWARD_ADMIN_PORT
environment: production
trusted_proxies: []
tls: null
credentials:
  - { header: x-api-key }
forward_credential: false
keys:
  file: $TMP/keys.yaml
  poll_interval: 1s
prefixes: {}
scopes:
  - { methods: [GET, HEAD, OPTIONS], any_of: [read, write] }
  - { methods: [POST, PUT, PATCH, DELETE], any_of: [write] }
routes: []
introspection_path: /auth
identity_headers:
  prefix: x-auth-
  echo_to_client: false
${KEYWARD_IDENTITY_INCLUDE:+  include: [$KEYWARD_IDENTITY_INCLUDE]}
admin:
  token_sha256: 3f9967c81c5db39ca184a821f85aec50cb0d3ef30ecf1de704d001f48f998d35
limits:
  header_read_timeout: 10s
  idle_timeout: 75s
  upstream_connect_timeout: 2s
  upstream_timeout: 60s
  max_header_bytes: 16384
  max_headers: 100
  max_connections: 10000
  h2_max_concurrent_streams: 256
shutdown:
  drain_delay: 0s
  grace: 1s
log:
  format: json
  level: warn
metrics:
  per_key: false
EOF
  start keyward "$TMP/keyward.log" "$KEYWARD_BIN" run --config "$TMP/keyward.yaml"
  wait_http keyward "${PID[keyward]}" "http://127.0.0.1:$KEYWARD_ADMIN_PORT/readyz" 200
}

# ---------------------------------------------------------------- checks
# http_check PEER PATH WANT_STATUS [KEY] [WANT_BODY]
http_check() {
  local peer=$1 path=$2 want=$3 key=${4:-} want_body=${5:-} code body args=()
  [[ -n $key ]] && args=(-H "x-api-key: $key")
  code=$(curl -s -o "$TMP/check.body" -m 5 -w '%{http_code}' "${args[@]}" \
    "http://127.0.0.1:${PORT[$peer]}$path" || true)
  body=$(cat "$TMP/check.body" 2>/dev/null || true)
  [[ $code == "$want" ]] || die "$peer: GET $path ${key:+with a key }answered $code, expected $want"
  if [[ -n $want_body && $body != "$want_body" ]]; then
    die "$peer: GET $path answered body '$body', expected '$want_body'"
  fi
}

verify_peer() {
  local peer=$1 via=127.0.0.1
  http_check "$peer" / 200 "$BENCH_KEY" ok
  [[ $UPSTREAM_SOCKET == 1 && $peer != direct ]] && via=unix:$UPSTREAM_SOCK
  http_check "$peer" /__via 200 "$BENCH_KEY" "$via"
  if [[ $peer != direct && $peer != relay ]]; then
    http_check "$peer" / 401 "$BENCH_UNKNOWN_KEY"
    http_check "$peer" / 401
    http_check "$peer" /__subject 200 "$BENCH_KEY" "$BENCH_SUBJECT"
    log "$peer: valid key -> 200 (subject forwarded), unknown/missing key -> 401; upstream reached at $via"
  else
    log "$peer: upstream answers 200$([[ $peer == relay ]] && echo " through the relay (no key check)"), at $via"
  fi
}

# ---------------------------------------------------------------- CPU accounting
# cpu_ticks PEER: "user system" clock ticks so far of the processes doing PEER's job (all
# threads; for nginx the master and its workers; for direct, the upstream).
cpu_ticks() {
  local name=$1 pids p
  [[ $name == direct ]] && name=upstream
  pids="${PID[$name]} $({ pgrep -P "${PID[$name]}" || true; } | tr "\n" " ")"
  for p in $pids; do cat "/proc/$p/stat" 2>/dev/null; done \
    | awk '{ sub(/^.*\) /, ""); u += $12; s += $13 } END { print u + 0, s + 0 }'
}

# machine_ticks: "busy idle" clock ticks so far of the whole machine, all CPUs (/proc/stat;
# idle counts iowait). What every process took, the load generator and upstream included.
machine_ticks() {
  awk '/^cpu / { idle = $5 + $6; busy = 0; for (i = 2; i <= 9; i++) busy += $i
                 print busy - idle, idle; exit }' /proc/stat
}

# ---------------------------------------------------------------- main
install_tools
find_oha
find_matplotlib
has_peer keyward && build_keyward

ports=("$UPSTREAM_PORT")
for p in "${PEER_LIST[@]}"; do [[ $p == direct ]] || ports+=("${PORT[$p]}"); done
has_peer keyward && ports+=("$KEYWARD_ADMIN_PORT")
python3 "$LIB" ports-free "${ports[@]}" || die "a benchmark port is in use"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/keyward-bench.XXXXXX")
chmod 755 "$TMP" # nginx workers drop privileges when started as root
UPSTREAM_SOCK=$TMP/app.sock
[[ ${#UPSTREAM_SOCK} -lt 100 ]] || die "socket path too long for a unix socket: $UPSTREAM_SOCK (set TMPDIR)"
log "generating $KEYS keys in $TMP"
python3 "$LIB" gen "$TMP" "$KEYS"
getconf CLK_TCK >"$TMP/clk_tck"
# shellcheck disable=SC1091
source "$TMP/bench.env"

start_upstream
has_peer nginx && start_nginx
has_peer haproxy && start_haproxy
has_peer relay && start_relay
has_peer keyward && start_keyward
for p in "${PEER_LIST[@]}"; do verify_peer "$p"; done

: >"$TMP/results.tsv"
n=${#PEER_LIST[@]}
log "load: wrk -t1 -c$CONNECTIONS -d${DURATION}s, $ROUNDS round(s) x $n peer(s)"
for ((r = 0; r < ROUNDS; r++)); do
  for ((i = 0; i < n; i++)); do
    peer=${PEER_LIST[(r + i) % n]}
    out="$TMP/wrk-$peer-$r.txt"
    read -r u0 s0 < <(cpu_ticks "$peer")
    read -r up_u0 up_s0 < <(cpu_ticks upstream)
    read -r busy0 idle0 < <(machine_ticks)
    # bash's `time` gives wrk's own user and kernel seconds (its rusage as a child).
    wrk_cpu=$( { TIMEFORMAT='%3U %3S'; time wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
      -H "x-api-key: $BENCH_KEY" "http://127.0.0.1:${PORT[$peer]}/" >"$out" 2>&1; } 2>&1) \
      || die "wrk failed against $peer: $(cat "$out")"
    read -r busy1 idle1 < <(machine_ticks)
    read -r up_u1 up_s1 < <(cpu_ticks upstream)
    read -r u1 s1 < <(cpu_ticks "$peer")
    read -r rps p50 p99 non2xx sockerr requests < <(python3 "$LIB" wrk-summary "$out")
    # shellcheck disable=SC2086 # wrk_cpu is "user system", two fields
    printf '%s %d %s %s %s %s %s %s %s %s %s %s %s %s %s\n' "$peer" "$((r + 1))" "$rps" "$p50" \
      "$p99" "$non2xx" "$sockerr" "$requests" "$((u1 - u0))" "$((s1 - s0))" \
      "$((up_u1 - up_u0 + up_s1 - up_s0))" $wrk_cpu "$((busy1 - busy0))" "$((idle1 - idle0))" \
      >>"$TMP/results.tsv"
    log "round $((r + 1))/$ROUNDS $peer: $rps req/s, p50 ${p50} ms, p99 ${p99} ms$( ((non2xx + sockerr)) && echo ", non-2xx $non2xx, socket errors $sockerr")"
  done
done

: >"$TMP/fixed.tsv"
if [[ -n $OHA_BIN ]]; then
  help=$("$OHA_BIN" --help 2>&1 || true)
  oha_fmt=()
  if grep -q -- '--output-format' <<<"$help"; then oha_fmt=(--output-format json)
  elif grep -q -- '--json' <<<"$help"; then oha_fmt=(--json)
  fi
  if [[ ${#oha_fmt[@]} -eq 0 ]] || ! grep -q -- '--latency-correction' <<<"$help" \
    || ! grep -q -- '--no-tui' <<<"$help"; then
    OHA_SKIP_REASON="$OHA_BIN lacks --latency-correction/--no-tui/JSON output; upgrade oha"
  else
    # run_oha PEER RATE OUT: one open-loop oha run at RATE req/s, its JSON report in OUT.
    run_oha() {
      "$OHA_BIN" -z "${DURATION}s" -q "$2" -c "$CONNECTIONS" --latency-correction --no-tui \
        -H "x-api-key: $BENCH_KEY" "${oha_fmt[@]}" "http://127.0.0.1:${PORT[$1]}/" \
        >"$3" 2>"$3.err" || die "oha failed against $1: $(cat "$3.err")"
    }
    # The rates are fractions of nginx's saturation in the mode they are run in: oha, open
    # loop, asked for four times what nginx did under wrk, so what it achieves is nginx's
    # limit. Open-loop oha takes more of the shared cores than wrk (and than oha's closed
    # loop), so a fraction of the wrk figure overloads every peer, nginx included, and
    # measures queue growth instead of latency.
    wrk_sat=$(python3 "$LIB" median "$TMP" nginx)
    flood=$(python3 -c "print(round($wrk_sat * 4))")
    for ((r = 0; r < ROUNDS; r++)); do
      out="$TMP/oha-saturation-$r.json"
      run_oha nginx "$flood" "$out"
      read -r achieved _ < <(python3 "$LIB" oha-summary "$out")
      echo "$achieved" >>"$TMP/saturation-oha"
      log "round $((r + 1))/$ROUNDS nginx saturation under oha (open loop): $achieved req/s"
    done
    sat=$(sort -n "$TMP/saturation-oha" | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}')
    printf '%s %s\n' "$sat" "$wrk_sat" >"$TMP/saturation"
    # Interleaved rounds, as for throughput, for every peer at every rate of --rates: the
    # report gives the medians of the rounds, the charts p50/p99 and CPU per request
    # against the offered rate.
    for ((r = 0; r < ROUNDS; r++)); do
      for pct in "${RATE_LIST[@]}"; do
        rate=$(python3 -c "print(max(1, round($sat * $pct / 100)))")
        for ((i = 0; i < n; i++)); do
          peer=${PEER_LIST[(r + i) % n]}
          out="$TMP/oha-$peer-$pct-$r.json"
          read -r u0 s0 < <(cpu_ticks "$peer")
          run_oha "$peer" "$rate" "$out"
          read -r u1 s1 < <(cpu_ticks "$peer")
          read -r achieved p50 p99 success non2xx secs responses < <(python3 "$LIB" oha-summary "$out")
          printf '%s %s %s %s %s %s %s %s %s %s %s %s\n' "$peer" "$pct" "$rate" "$achieved" "$p50" \
            "$p99" "$success" "$non2xx" "$((r + 1))" "$((u1 - u0 + s1 - s0))" "$secs" \
            "$responses" >>"$TMP/fixed.tsv"
          log "round $((r + 1))/$ROUNDS fixed rate $rate req/s ($pct% of nginx) $peer: p50 ${p50} ms, p99 ${p99} ms, CPU $(python3 "$LIB" cpu-per-request "$TMP" "$((u1 - u0 + s1 - s0))" "$responses") µs/req"
        done
      done
    done
  fi
fi
if [[ -z $OHA_BIN || -n $OHA_SKIP_REASON ]]; then
  log "fixed-rate latency skipped: $OHA_SKIP_REASON"
  echo "$OHA_SKIP_REASON" >"$TMP/fixed.skipped"
fi

# ---------------------------------------------------------------- report
first_line() { "$@" 2>&1 | head -n 1 || true; }
versions=("$(first_line nginx -v)" "$(first_line wrk -v)")
has_peer haproxy && versions+=("$(first_line haproxy -v)")
[[ -n $OHA_BIN ]] && versions+=("$(first_line "$OHA_BIN" --version)")
if has_peer keyward; then
  kwv=$(first_line timeout 5 "$KEYWARD_BIN" --version)
  [[ $kwv == keyward* ]] || kwv=keyward
  rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || true)
  dirty=$(git -C "$REPO_DIR" --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null | head -c1 || true)
  built=""
  [[ $KEYWARD_BIN == */target/pgo/* ]] && built="profile-guided (bench/pgo.sh), "
  versions+=("$kwv${rev:+ (${built}commit $rev${dirty:+, with uncommitted changes})}")
fi
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)

mkdir -p "$(dirname "$OUT")"
OUT_DIR=$(cd "$(dirname "$OUT")" && pwd)
NAME=$(basename "$OUT" .md)
if [[ $UPSTREAM_SOCKET == 1 ]]; then
  upstream_desc="nginx (1 worker); every proxy reaches it over a unix socket (unix:\$TMP/app.sock), direct over TCP 127.0.0.1:$UPSTREAM_PORT (a second listen of the same server)"
else
  upstream_desc="nginx (1 worker) on TCP 127.0.0.1:$UPSTREAM_PORT"
fi
cat >"$TMP/meta" <<EOF
connections=$CONNECTIONS
duration=$DURATION
rounds=$ROUNDS
keys=$KEYS
upstream=$([[ $UPSTREAM_SOCKET == 1 ]] && echo "unix socket (direct over TCP)" || echo "TCP")
date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF

# The rounds' raw figures stay beside the report, so the tables and charts can be redrawn:
# python3 bench/benchlib.py report DIR; python3 bench/plot.py DIR
DATA_DIR=$OUT_DIR/$NAME-data
rm -rf "$DATA_DIR"
mkdir -p "$DATA_DIR"
for f in results.tsv fixed.tsv fixed.skipped saturation clk_tck meta; do
  if [[ -e $TMP/$f ]]; then cp "$TMP/$f" "$DATA_DIR/"; fi
done

rm -f "$OUT_DIR/$NAME"-{rps,latency,cpu}.png
if [[ -z $PLOT_SKIP_REASON ]]; then
  if python3 "$BENCH_DIR/plot.py" "$DATA_DIR" >"$DATA_DIR/plots" 2>"$TMP/plot.err"; then
    log "charts: $(awk '{print $2}' "$DATA_DIR/plots" | paste -sd ' ')"
  else
    PLOT_SKIP_REASON="bench/plot.py failed: $(tail -n 3 "$TMP/plot.err")"
    rm -f "$DATA_DIR/plots"
  fi
fi
if [[ -n $PLOT_SKIP_REASON ]]; then
  log "charts skipped: $PLOT_SKIP_REASON"
  echo "$PLOT_SKIP_REASON" >"$DATA_DIR/plots.skipped"
fi

{
  echo "# keyward proxy benchmark"
  echo
  echo "- date: $(sed -n 's/^date=//p' "$TMP/meta")"
  echo "- machine: $(nproc) CPU(s)${cpu:+, $cpu}, $(uname -sr)"
  echo "- load: wrk -t1 -c$CONNECTIONS, $ROUNDS interleaved round(s) x ${DURATION}s per peer, $KEYS keys per table"
  echo "- peers: ${PEER_LIST[*]}"
  echo "- upstream: $upstream_desc"
  tools=$(IFS=';'; echo "${versions[*]}")
  echo "- tools: ${tools//;/; }"
  echo "- command: ${KEYWARD_IDENTITY_INCLUDE:+KEYWARD_IDENTITY_INCLUDE=$KEYWARD_IDENTITY_INCLUDE }bench/run.sh${ORIG_ARGS:+ $ORIG_ARGS}"
  if [[ -n ${KEYWARD_IDENTITY_INCLUDE:-} ]]; then
    echo "- keyward sends only the identity headers [$KEYWARD_IDENTITY_INCLUDE] (\`identity_headers.include\`), not all twelve"
  fi
  echo "- raw rounds: $NAME-data/ (charts redrawn by: python3 bench/plot.py ${DATA_DIR#"$REPO_DIR"/})"
  echo
  python3 "$LIB" report "$DATA_DIR"
} >"$TMP/report.md"

cp "$TMP/report.md" "$OUT"
echo
cat "$TMP/report.md"
echo
log "report written to ${OUT#"$REPO_DIR"/}"
