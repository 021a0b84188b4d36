# syntax=docker/dockerfile:1
#
# keyward container image.
#
#   docker build -t keyward:0.1.0 .              (profile-guided build; --build-arg PGO=0: one plain build)
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#     -v "$PWD/my-keyward.yaml:/etc/keyward/keyward.yaml:ro" \
#     -v "$PWD/my-keys.yaml:/etc/keyward/keys.yaml:ro" \
#     keyward:0.1.0
#
# The image carries a default config (deploy/docker/keyward.yaml) but no keys: until a
# snapshot is mounted at /etc/keyward/keys.yaml, keyward fails closed (503 auth_unavailable,
# /readyz 503). `docker run --rm keyward:0.1.0 demo` runs the built-in demo instead.

ARG RUST_VERSION=1.95

############################ build ############################
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /build

# jemalloc (the global allocator) is built from C sources with make. Builder stage only:
# the version follows the base image.
# hadolint ignore=DL3008
RUN apt-get update -qq \
    && apt-get install -y -qq --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*

# 1. Dependencies only: build the dependency graph against stub sources, so this layer
#    stays cached until Cargo.toml or Cargo.lock change. Targets that Cargo.toml declares
#    by name only (e.g. [[bench]] name = "x") get an empty stub too, or cargo refuses the
#    manifest.
COPY Cargo.toml Cargo.lock ./
RUN set -eu; \
    mkdir -p src; \
    echo 'fn main() {}' > src/main.rs; \
    : > src/lib.rs; \
    awk ' \
      function flush() { if (dir != "" && name != "" && !haspath) print dir "/" name ".rs" } \
      /^\[\[(bench|test|example|bin)\]\]/ { flush(); kind = $0; gsub(/[][ ]/, "", kind); \
        dir = (kind == "bench") ? "benches" : (kind == "test") ? "tests" : (kind == "example") ? "examples" : "src/bin"; \
        name = ""; haspath = 0; next } \
      /^\[/ { flush(); dir = ""; next } \
      dir != "" && /^name[ \t]*=/ { name = $0; sub(/^name[ \t]*=[ \t]*"/, "", name); sub(/".*/, "", name) } \
      dir != "" && /^path[ \t]*=/ { haspath = 1 } \
      END { flush() }' Cargo.toml \
    | while read -r stub; do mkdir -p "$(dirname "$stub")"; echo 'fn main() {}' > "$stub"; done; \
    cargo build --release --locked; \
    rm -rf src target/release/keyward target/release/deps/keyward-* \
           target/release/deps/libkeyward-* target/release/.fingerprint/keyward-*

# 2. The real sources (and the demo config and keys `keyward demo` embeds). COPY keeps the
#    files' original mtimes, which can be older than the stub build: touch them so cargo
#    rebuilds the crate itself.
#    PGO=1 (the default) builds with profile-guided optimization (bench/pgo.sh: an
#    instrumented build serves a training load, then the release build; about 9% less CPU
#    per proxied request, three builds' time). PGO=0 builds once, on the cached
#    dependencies above.
ARG PGO=1
COPY src ./src
COPY config/keyward.yaml config/keys.yaml ./config/
COPY bench/pgo.sh bench/pace.rs ./bench/
RUN set -eu; \
    find src -type f -exec touch {} +; \
    if [ "$PGO" = 1 ]; then \
      bash bench/pgo.sh --out /out/usr/local/bin/keyward; \
    else \
      cargo build --release --locked; \
      install -D -m 0755 target/release/keyward /out/usr/local/bin/keyward; \
    fi

COPY deploy/docker/keyward.yaml /out/etc/keyward/keyward.yaml

############################ runtime ############################
# distroless/cc: glibc + libgcc + CA certificates, no shell, no package manager.
# The :nonroot tag runs as uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=builder /out/ /

ENV KEYWARD_CONFIG=/etc/keyward/keyward.yaml
USER 65532:65532
# 8080: traffic (the Service targets this port). 9901: admin (metrics, health, control API).
EXPOSE 8080 9901

ENTRYPOINT ["/usr/local/bin/keyward"]
CMD ["run", "--config", "/etc/keyward/keyward.yaml"]
