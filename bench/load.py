#!/usr/bin/env python3
"""Snapshot load figures of a release binary: for N keys in YAML and in JSON, the time from
start to /readyz 200, the RSS once ready and idle, and the peak RSS of the process (VmHWM)
while it loaded.

    cargo build --release
    python3 bench/load.py [--bin target/release/keyward] [--keys 10000,200000,1000000]
        [--formats yaml,json] [--rounds 3]

Each snapshot entry is a service-account key with the fields most keys set. Runs are
sequential, so nothing else of the benchmark shares the cores.
"""

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def entry(i):
    return {
        "id": f"key_{i:08x}",
        "sha256": hashlib.sha256(f"sta_bench_key_{i}".encode()).hexdigest(),
        "type": "service_account",
        "subject_id": f"subject_{i % 5000}",
        "account_id": f"account_{i % 1000}",
        "scopes": ["read", "write"] if i % 3 else ["read"],
    }


def write_snapshot(path, n, fmt):
    with open(path, "w") as f:
        if fmt == "json":
            f.write('{"version": 1, "keys": [')
            for i in range(n):
                f.write(("," if i else "") + json.dumps(entry(i), separators=(",", ":")))
            f.write("]}\n")
        else:
            f.write("version: 1\nkeys:\n")
            for i in range(n):
                e = entry(i)
                f.write(f"  - id: {e['id']}\n    sha256: {e['sha256']}\n")
                f.write(f"    type: {e['type']}\n    subject_id: {e['subject_id']}\n")
                f.write(f"    account_id: {e['account_id']}\n")
                f.write(f"    scopes: [{', '.join(e['scopes'])}]\n")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def ready(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except Exception:
        return False


def run_once(binary, keys_file, tmp):
    listen, admin = free_port(), free_port()
    config = os.path.join(tmp, "keyward.yaml")
    with open(config, "w") as f:
        f.write(
            f"listen: 127.0.0.1:{listen}\nadmin_listen: 127.0.0.1:{admin}\n"
            f"upstream: http://127.0.0.1:9\nenvironment: production\n"
            f"keys: {{ file: {keys_file} }}\nlog: {{ format: json, level: warn }}\n"
        )
    url = f"http://127.0.0.1:{admin}/readyz"
    t0 = time.monotonic()
    proc = subprocess.Popen([binary, "run", "--config", config], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while not ready(url):
            if proc.poll() is not None:
                sys.exit(f"keyward exited with {proc.returncode}")
            if time.monotonic() - t0 > 60:
                sys.exit(f"{keys_file}: not ready after 60 s (a YAML file over 64 MiB is refused)")
            time.sleep(0.005)
        took = time.monotonic() - t0
        rss_ready = status_kb(proc.pid, "VmRSS")
        time.sleep(2)
        rss_idle = status_kb(proc.pid, "VmRSS")
        peak = status_kb(proc.pid, "VmHWM")
        return took, rss_ready, rss_idle, peak
    finally:
        proc.terminate()
        proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/keyward")
    ap.add_argument("--keys", default="10000,200000,1000000")
    ap.add_argument("--formats", default="yaml,json")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    mb = lambda kb: f"{kb / 1024:.1f}"
    print("| keys | format | file | ready (s) | RSS ready | RSS idle | peak RSS (VmHWM) | peak / idle |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(k) for k in a.keys.split(",")]:
            for fmt in a.formats.split(","):
                path = os.path.join(tmp, f"keys.{fmt}")
                write_snapshot(path, n, fmt)
                size = os.path.getsize(path) / 1e6
                runs = sorted(run_once(a.bin, path, tmp) for _ in range(a.rounds))
                lo, hi = runs[0], runs[-1]
                took = f"{lo[0]:.2f}–{hi[0]:.2f}"
                rng = lambda k: f"{mb(min(r[k] for r in runs))}–{mb(max(r[k] for r in runs))} MB"
                ratio = max(r[3] / r[2] for r in runs)
                print(f"| {n} | {fmt} | {size:.0f} MB | {took} | {rng(1)} | {rng(2)} | {rng(3)} | {ratio:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
