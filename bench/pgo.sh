#!/usr/bin/env bash
# Build keyward with profile-guided optimization (PGO): an instrumented build serves a
# training load, and the release build is laid out by what that load ran. The training is
# self-contained (no nginx, no wrk): `keyward demo` (the shipped config and demo keys in
# front of its built-in echo upstream) takes open-loop load from `pace` (bench/pace.rs) in
# the request shapes a sidecar sees most: keyed GETs with and without the headers a typical
# client sends, refusals (unknown key, wrong scope, no key), a public route.
#
# Measured on one 2-core machine (bench/README.md): 17.6% fewer instructions per proxied
# request (callgrind, bench/per_request.sh: 38.1k -> 31.4k) and 9% less CPU per request
# under wrk (9.96 -> 9.04 us, 5 interleaved rounds).
#
# Usage: bench/pgo.sh [--out FILE]   (default target/pgo/release/keyward)
# Needs: cargo, and llvm-profdata of rustc's LLVM (`rustup component add llvm-tools`; this
# script adds it when rustup is there).
set -euo pipefail

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    *) echo "usage: bench/pgo.sh [--out FILE]" >&2; exit 2 ;;
  esac
done
cd "$REPO_DIR"
log() { echo "pgo: $*" >&2; }

# llvm-profdata must read the profile format of rustc's own LLVM.
profdata() {
  local sysroot host
  sysroot=$(rustc --print sysroot)
  host=$(rustc -vV | awk '/^host:/ {print $2}')
  local tool="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
  if [[ ! -x $tool ]] && command -v rustup >/dev/null; then
    rustup component add llvm-tools >&2 || rustup component add llvm-tools-preview >&2
  fi
  [[ -x $tool ]] || { echo "no llvm-profdata at $tool (rustup component add llvm-tools)" >&2; exit 1; }
  echo "$tool"
}
PROFDATA=$(profdata)

TMP=$(mktemp -d "${TMPDIR:-/tmp}/keyward-pgo.XXXXXX")
KW_PID=""
cleanup() {
  [[ -n $KW_PID ]] && kill "$KW_PID" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

log "instrumented build (target/pgo-gen)"
RUSTFLAGS="-Cprofile-generate=$TMP/raw" \
  cargo build --release --locked --target-dir target/pgo-gen --bin keyward
log "load generator (pace)"
cargo build --release --locked --example pace
PACE=target/release/examples/pace

# Fixed loopback ports (PGO_PORT and the next one): the builder image may have neither
# python nor curl, so readiness is asked over bash's /dev/tcp.
PORT=${PGO_PORT:-18180}
ADMIN=$((PORT + 1))
ready() {
  local reply
  { exec 3<>"/dev/tcp/127.0.0.1/$ADMIN"; } 2>/dev/null || return 1
  printf 'GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n' >&3
  read -r -t 2 reply <&3 || true
  exec 3<&-
  [[ $reply == *" 200 "* ]]
}
LLVM_PROFILE_FILE="$TMP/raw/keyward-%p-%m.profraw" \
  target/pgo-gen/release/keyward demo --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN" \
  --config config/keyward.yaml >"$TMP/demo.log" 2>&1 &
KW_PID=$!
for _ in $(seq 100); do
  ready && break
  kill -0 "$KW_PID" 2>/dev/null || { cat "$TMP/demo.log" >&2; exit 1; }
  sleep 0.1
done
ready || { echo "keyward demo did not become ready" >&2; cat "$TMP/demo.log" >&2; exit 1; }

SERVICE=sta_demo_service_key_0123456789abcdef
PERSONAL=pat_demo_personal_key_0123456789abcdef
train() { # seconds rate path [header]...
  local secs=$1 rate=$2 path=$3
  shift 3
  "$PACE" "127.0.0.1:$PORT" "$path" "$rate" "$secs" 32 "$@" >/dev/null
}
log "training load (about 12 s)"
train 6 8000 /v1/items "x-api-key: $SERVICE"
train 3 8000 /v1/orders "x-api-key: $SERVICE" "user-agent: python-requests/2.31.0" \
  "accept: application/json" "accept-language: en-US" "content-type: application/json" \
  "x-request-id: c0ffee-1234" "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" \
  "cookie: session=abc"
train 1 4000 /v1/items "x-api-key: sta_not_a_key_of_this_snapshot_0123456789"
train 1 4000 /admin/users "x-api-key: $PERSONAL"
train 1 4000 /v1/items
kill -TERM "$KW_PID"
wait "$KW_PID" || true
KW_PID=""

# keyward's own profile only: the instrumented build's build scripts left theirs beside it.
"$PROFDATA" merge -o "$TMP/keyward.profdata" "$TMP"/raw/keyward-*.profraw
log "profile: $(du -h "$TMP/keyward.profdata" | cut -f1); optimized build (target/pgo)"
RUSTFLAGS="-Cprofile-use=$TMP/keyward.profdata" \
  cargo build --release --locked --target-dir target/pgo --bin keyward
if [[ -n $OUT ]]; then
  install -D -m 0755 target/pgo/release/keyward "$OUT"
  log "built $OUT"
else
  log "built target/pgo/release/keyward"
fi
