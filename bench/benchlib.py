#!/usr/bin/env python3
"""Helpers for bench/run.sh: key material, port checks, wrk/oha parsing, report tables.

Subcommands:
  gen DIR N               write N random keys and each peer's key table into DIR
  ports-free PORT...      exit 1 (naming the port) if any port is already bound on 127.0.0.1
  wrk-summary FILE        print "<req/s> <p50 ms> <p99 ms> <non-2xx> <socket errors>"
  oha-summary FILE        print "<req/s> <p50 ms> <p99 ms> <success rate> <non-2xx>"
  median DIR PEER         print PEER's median req/s from DIR/results.tsv
  report DIR              print the markdown report from DIR/results.tsv and DIR/fixed.tsv
"""

import hashlib
import json
import os
import re
import secrets
import socket
import sys


def cmd_gen(out_dir, count):
    count = int(count)
    keys = ["sta_" + secrets.token_urlsafe(32) for _ in range(count)]
    middle = count // 2  # 0-based index of the key wrk sends
    width = max(5, len(str(count)))

    def subject(i):
        return f"subj_{i + 1:0{width}d}"

    def key_id(i):
        return f"key_{i + 1:0{width}d}"

    with open(os.path.join(out_dir, "keys.txt"), "w") as f:
        f.write("\n".join(keys) + "\n")

    # keyward snapshot: digests only.
    with open(os.path.join(out_dir, "keys.yaml"), "w") as f:
        f.write("version: 1\nkeys:\n")
        for i, key in enumerate(keys):
            digest = hashlib.sha256(key.encode()).hexdigest()
            f.write(
                f"  - id: {key_id(i)}\n"
                f"    sha256: {digest}\n"
                f"    type: service_account\n"
                f"    subject_id: {subject(i)}\n"
                f"    account_id: acct_1\n"
                f"    scopes: [read, write]\n"
                f"    status: active\n"
            )

    # nginx: body of a `map $http_x_api_key $subject { ... }` block (raw keys).
    with open(os.path.join(out_dir, "nginx-keys.map"), "w") as f:
        for i, key in enumerate(keys):
            f.write(f"    {key} {subject(i)};\n")

    # haproxy: map file, "<raw key> <subject>" per line.
    with open(os.path.join(out_dir, "haproxy-keys.map"), "w") as f:
        for i, key in enumerate(keys):
            f.write(f"{key} {subject(i)}\n")

    # The fixed key wrk sends, its subject, and a well-formed key that is not in the table.
    unknown = "sta_" + secrets.token_urlsafe(32)
    while unknown in set(keys):
        unknown = "sta_" + secrets.token_urlsafe(32)
    with open(os.path.join(out_dir, "bench.env"), "w") as f:
        f.write(f"BENCH_KEY={keys[middle]}\n")
        f.write(f"BENCH_SUBJECT={subject(middle)}\n")
        f.write(f"BENCH_UNKNOWN_KEY={unknown}\n")


def cmd_ports_free(*ports):
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Like the servers themselves: TIME_WAIT leftovers of an earlier run are no conflict.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", int(port)))
        except OSError as e:
            print(f"port 127.0.0.1:{port} is not free: {e}", file=sys.stderr)
            sys.exit(1)
        finally:
            s.close()


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _to_ms(text):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk duration {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(path):
    text = open(path).read()
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    requests = re.search(r"^\s*(\d+) requests in", text, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", text, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", text, re.M)
    if not (rps and p50 and p99 and requests):
        raise SystemExit(f"{path}: not a wrk --latency report:\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return {
        "rps": float(rps.group(1)),
        "requests": int(requests.group(1)),
        "p50": _to_ms(p50.group(1)),
        "p99": _to_ms(p99.group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "sockerr": sum(int(x) for x in sock.groups()) if sock else 0,
    }


def cmd_wrk_summary(path):
    r = parse_wrk(path)
    print(
        f"{r['rps']:.2f} {r['p50']:.3f} {r['p99']:.3f} {r['non2xx']} {r['sockerr']} "
        f"{r['requests']}"
    )


def cmd_oha_summary(path):
    data = json.load(open(path))
    summary = data.get("summary", {})
    lat = data.get("latencyPercentiles", {})
    codes = data.get("statusCodeDistribution", {}) or {}
    non2xx = sum(int(v) for k, v in codes.items() if not str(k).startswith("2"))
    p50 = lat.get("p50")
    p99 = lat.get("p99")
    if p50 is None or p99 is None:
        raise SystemExit(f"{path}: no latencyPercentiles in oha output")
    print(
        f"{summary.get('requestsPerSec', 0):.2f} {p50 * 1000:.3f} {p99 * 1000:.3f} "
        f"{summary.get('successRate', 0):.4f} {non2xx} {summary.get('total', 0):.3f}"
    )


def _read_results(run_dir):
    rows = {}
    with open(os.path.join(run_dir, "results.tsv")) as f:
        for line in f:
            peer, rnd, rps, p50, p99, non2xx, sockerr, reqs, utime, stime = line.split()
            rows.setdefault(peer, []).append(
                {
                    "round": int(rnd),
                    "rps": float(rps),
                    "p50": float(p50),
                    "p99": float(p99),
                    "non2xx": int(non2xx),
                    "sockerr": int(sockerr),
                    "requests": int(reqs),
                    "utime": int(utime),
                    "stime": int(stime),
                }
            )
    return rows


def _median_round(runs):
    # The median round (lower middle for an even count) supplies req/s and latencies.
    ordered = sorted(runs, key=lambda r: r["rps"])
    return ordered[(len(ordered) - 1) // 2]


def cmd_median(run_dir, peer):
    rows = _read_results(run_dir)
    if peer not in rows:
        raise SystemExit(f"no results for {peer}")
    print(f"{_median_round(rows[peer])['rps']:.2f}")


def _clk_tck(run_dir):
    path = os.path.join(run_dir, "clk_tck")
    return int(open(path).read()) if os.path.exists(path) else 100


def _ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"


def cmd_report(run_dir):
    """results.tsv lines: peer round rps p50 p99 non2xx sockerr requests utime stime
    fixed.tsv lines:   peer pct target_rate achieved_rps p50 p99 success non2xx round
                       cpu_ticks seconds"""
    rows = _read_results(run_dir)
    order = list(rows)
    canonical = ["direct", "relay", "nginx", "haproxy", "keyward"]
    order.sort(key=lambda p: canonical.index(p) if p in canonical else len(canonical))

    median = {}
    for peer in order:
        median[peer] = dict(_median_round(rows[peer]))
        median[peer]["all"] = [r["rps"] for r in rows[peer]]
        median[peer]["non2xx_total"] = sum(r["non2xx"] for r in rows[peer])
        median[peer]["sockerr_total"] = sum(r["sockerr"] for r in rows[peer])

    def rps_of(peer):
        return median[peer]["rps"] if peer in median else None

    out = []
    out.append("### Throughput (wrk, closed loop, median round)")
    out.append("")
    out.append(
        "| peer | req/s | p50 | p99 | ratio vs nginx | ratio vs haproxy | fraction of relay "
        "| fraction of direct | CPU/req user | CPU/req kernel |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    tick_us = 1e6 / _clk_tck(run_dir)
    for peer in order:
        m = median[peer]
        nginx, haproxy = rps_of("nginx"), rps_of("haproxy")
        relay, direct = rps_of("relay"), rps_of("direct")
        reqs = max(m["requests"], 1)
        out.append(
            f"| {peer} | {m['rps']:.0f} | {m['p50']:.3f} ms | {m['p99']:.3f} ms "
            f"| {_ratio(m['rps'], nginx) if nginx else 'n/a'} "
            f"| {_ratio(m['rps'], haproxy) if haproxy else 'n/a'} "
            f"| {_ratio(m['rps'], relay) if relay else 'n/a'} "
            f"| {_ratio(m['rps'], direct) if direct else 'n/a'} "
            f"| {m['utime'] * tick_us / reqs:.1f} µs | {m['stime'] * tick_us / reqs:.1f} µs |"
        )
    out.append("")
    spread = ", ".join(
        f"{p}: " + " / ".join(f"{x:.0f}" for x in median[p]["all"]) for p in order
    )
    out.append(f"Per-round req/s: {spread}.")
    out.append("")
    out.append(
        "CPU/req: user and kernel CPU time of the peer's own processes (all threads; for "
        "direct, the upstream) over its median round, divided by the requests wrk completed. "
        "The load generator and, for proxies, the upstream are not counted."
    )
    if "relay" in median:
        out.append("")
        out.append(
            "relay: HAProxy in TCP mode, relaying bytes with no HTTP parsing, key check or "
            "header work. It makes the same socket calls per request as the HTTP proxies, so "
            "its req/s is the ceiling for a proxy that forwards over its own loopback hop."
        )
    bad = [
        f"{p} ({median[p]['non2xx_total']} non-2xx, {median[p]['sockerr_total']} socket errors)"
        for p in order
        if median[p]["non2xx_total"] or median[p]["sockerr_total"]
    ]
    if bad:
        out.append("")
        out.append("**Errors during load:** " + "; ".join(bad) + ".")

    fixed_path = os.path.join(run_dir, "fixed.tsv")
    out.append("")
    out.append("### Latency at a fixed rate (oha, open loop, latency-corrected)")
    out.append("")
    if os.path.exists(fixed_path) and os.path.getsize(fixed_path) > 0:
        sat_path = os.path.join(run_dir, "saturation")
        if os.path.exists(sat_path):
            under_oha, under_wrk = (float(v) for v in open(sat_path).read().split())
            out.append(
                f"Rates are fractions of nginx's saturation in open loop (oha asked for four "
                f"times nginx's wrk rate; median of the rounds): {under_oha:.0f} req/s, "
                f"against {under_wrk:.0f} under wrk. Open-loop oha takes more of the shared "
                f"cores than wrk, so a fraction of the wrk figure would overload every peer."
            )
            out.append("")
        runs = {}
        clk = _clk_tck(run_dir)
        with open(fixed_path) as f:
            for line in f:
                fields = line.split()
                peer, pct, target, achieved, p50, p99, success, non2xx, rnd, ticks, secs = fields
                runs.setdefault((int(pct), peer), []).append(
                    {
                        "target": float(target),
                        "achieved": float(achieved),
                        "p50": float(p50),
                        "p99": float(p99),
                        "success": float(success),
                        "non2xx": int(non2xx),
                        # Cores the peer's processes used over the run (user + kernel).
                        "cores": int(ticks) / clk / float(secs) if float(secs) else 0.0,
                    }
                )
        out.append(
            "| peer | load | target req/s | achieved req/s | p50 | p99 | success "
            "| p99 per round | CPU cores per round |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for (pct, peer), rs in sorted(
            runs.items(), key=lambda kv: (kv[0][0], canonical.index(kv[0][1]))
        ):
            # The round with the median p99 (lower middle for an even count).
            m = sorted(rs, key=lambda r: r["p99"])[(len(rs) - 1) // 2]
            non2xx = sum(r["non2xx"] for r in rs)
            note = f" ({non2xx} non-2xx)" if non2xx else ""
            per_round = " / ".join(f"{r['p99']:.1f}" for r in rs)
            cores = " / ".join(f"{r['cores']:.2f}" for r in rs)
            out.append(
                f"| {peer} | {pct}% of nginx | {m['target']:.0f} | {m['achieved']:.0f} "
                f"| {m['p50']:.3f} ms | {m['p99']:.3f} ms "
                f"| {min(r['success'] for r in rs) * 100:.2f}%{note} | {per_round} ms "
                f"| {cores} |"
            )
        out.append("")
        out.append(
            "Each peer's round with the median p99 is shown; success is the lowest of its "
            "rounds. CPU cores: user and kernel CPU time of the peer's own processes over "
            "each round, divided by the round's length. At a fixed rate every peer does the "
            "same work, so this is what each needs for it; it varies far less from round to "
            "round than p99, which on two cores shared with the load generator and the "
            "upstream follows how long a request waits for a core."
        )
    else:
        reason_path = os.path.join(run_dir, "fixed.skipped")
        reason = open(reason_path).read().strip() if os.path.exists(reason_path) else ""
        out.append(f"Skipped{': ' + reason if reason else ''}.")
    print("\n".join(out))


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = argv[1], argv[2:]
    table = {
        "gen": cmd_gen,
        "ports-free": cmd_ports_free,
        "wrk-summary": cmd_wrk_summary,
        "oha-summary": cmd_oha_summary,
        "median": cmd_median,
        "report": cmd_report,
    }
    if cmd not in table:
        raise SystemExit(__doc__)
    table[cmd](*args)


if __name__ == "__main__":
    main(sys.argv)
