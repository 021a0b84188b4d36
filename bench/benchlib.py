#!/usr/bin/env python3
"""Helpers for bench/run.sh: key material, port checks, wrk/oha parsing, report tables.

Subcommands:
  gen DIR N               write N random keys and each peer's key table into DIR
  ports-free PORT...      exit 1 (naming the port) if any port is already bound on 127.0.0.1
  wrk-summary FILE        print "<req/s> <p50 ms> <p99 ms> <non-2xx> <socket errors>"
  oha-summary FILE        print "<req/s> <p50 ms> <p99 ms> <success rate> <non-2xx> <seconds>
                          <responses>"
  median DIR PEER         print PEER's median req/s from DIR/results.tsv
  cpu-per-request DIR TICKS RESPONSES
                          print the µs of CPU per request that TICKS clock ticks make
  report DIR              print the markdown report from DIR/results.tsv and DIR/fixed.tsv
                          (charts listed in DIR/plots are embedded)

bench/plot.py imports this module for read_results, read_fixed and fixed_medians.
"""

import hashlib
import json
import os
import re
import secrets
import socket
import statistics
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
    responses = sum(int(v) for v in codes.values())
    print(
        f"{summary.get('requestsPerSec', 0):.2f} {p50 * 1000:.3f} {p99 * 1000:.3f} "
        f"{summary.get('successRate', 0):.4f} {non2xx} {summary.get('total', 0):.3f} "
        f"{responses}"
    )


CANONICAL = ["direct", "relay", "nginx", "haproxy", "keyward"]


def peer_rank(peer):
    return CANONICAL.index(peer) if peer in CANONICAL else len(CANONICAL)


def peer_order(peers):
    """The peers in the report's order: direct, relay, nginx, haproxy, keyward, others."""
    return sorted(peers, key=peer_rank)


def read_results(run_dir):
    rows = {}
    with open(os.path.join(run_dir, "results.tsv")) as f:
        for line in f:
            fields = line.split()
            peer, rnd, rps, p50, p99, non2xx, sockerr, reqs, utime, stime = fields[:10]
            row = {
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
            if len(fields) >= 15:
                # Where the machine's cores went (files from before these columns lack them).
                up, wrk_u, wrk_s, busy, idle = fields[10:15]
                row["machine"] = {
                    "upstream": int(up),
                    "wrk_s": float(wrk_u) + float(wrk_s),
                    "busy": int(busy),
                    "idle": int(idle),
                }
            rows.setdefault(peer, []).append(row)
    return rows


def _median_round(runs):
    # The median round (lower middle for an even count) supplies req/s and latencies.
    ordered = sorted(runs, key=lambda r: r["rps"])
    return ordered[(len(ordered) - 1) // 2]


def cmd_median(run_dir, peer):
    rows = read_results(run_dir)
    if peer not in rows:
        raise SystemExit(f"no results for {peer}")
    print(f"{_median_round(rows[peer])['rps']:.2f}")


def _clk_tck(run_dir):
    path = os.path.join(run_dir, "clk_tck")
    return int(open(path).read()) if os.path.exists(path) else 100


def cmd_cpu_per_request(run_dir, ticks, responses):
    responses = int(responses)
    if responses <= 0:
        print("n/a")
        return
    print(f"{int(ticks) * 1e6 / _clk_tck(run_dir) / responses:.1f}")


def read_saturation(run_dir):
    """(oha open-loop saturation, wrk median) of nginx in req/s, or None."""
    path = os.path.join(run_dir, "saturation")
    if not os.path.exists(path):
        return None
    under_oha, under_wrk = (float(v) for v in open(path).read().split())
    return under_oha, under_wrk


def read_fixed(run_dir):
    """fixed.tsv as {(pct, peer): [round, ...]}; {} when the fixed-rate part did not run.

    Lines: peer pct target_rate achieved_rps p50 p99 success non2xx round cpu_ticks seconds
    [responses]. CPU per request is the peer's user + kernel CPU time over the round divided
    by the responses oha received (achieved rate x seconds for files without that column)."""
    path = os.path.join(run_dir, "fixed.tsv")
    runs = {}
    if not os.path.exists(path):
        return runs
    clk = _clk_tck(run_dir)
    with open(path) as f:
        for line in f:
            fields = line.split()
            if not fields:
                continue
            peer, pct, target, achieved, p50, p99, success, non2xx, rnd, ticks, secs = fields[:11]
            secs = float(secs)
            responses = int(fields[11]) if len(fields) > 11 else round(float(achieved) * secs)
            cpu_s = int(ticks) / clk
            runs.setdefault((int(pct), peer), []).append(
                {
                    "round": int(rnd),
                    "target": float(target),
                    "achieved": float(achieved),
                    "p50": float(p50),
                    "p99": float(p99),
                    "success": float(success),
                    "non2xx": int(non2xx),
                    "responses": responses,
                    # Cores the peer's processes used over the run (user + kernel).
                    "cores": cpu_s / secs if secs else 0.0,
                    "cpu_us": cpu_s * 1e6 / responses if responses else float("nan"),
                }
            )
    return runs


def fixed_medians(runs):
    """{(pct, peer): medians of the rounds, with every round's values kept as lists}."""
    out = {}
    for key, rs in runs.items():
        m = {"rounds": len(rs)}
        for field in ("target", "achieved", "p50", "p99", "cores", "cpu_us"):
            values = [r[field] for r in sorted(rs, key=lambda r: r["round"])]
            m[field] = statistics.median(values)
            m[field + "_all"] = values
        m["success"] = min(r["success"] for r in rs)
        m["non2xx"] = sum(r["non2xx"] for r in rs)
        out[key] = m
    return out


def read_plots(run_dir):
    """{kind: file name} of the charts bench/plot.py drew (DIR/plots), and the skip reason."""
    plots, reason = {}, ""
    path = os.path.join(run_dir, "plots")
    if os.path.exists(path):
        for line in open(path):
            parts = line.split(None, 1)
            if len(parts) == 2:
                plots[parts[0]] = parts[1].strip()
    skipped = os.path.join(run_dir, "plots.skipped")
    if os.path.exists(skipped):
        reason = open(skipped).read().strip()
    return plots, reason


def _ratio(a, b):
    return f"{a / b:.2f}" if b else "n/a"


def _ratio_of(medians, pct, peer, other, field):
    a, b = medians.get((pct, peer)), medians.get((pct, other))
    if not a or not b or peer == other or not b[field] or a[field] != a[field]:
        return "—"
    return f"{a[field] / b[field]:.2f}"


def _image(plots, kind, alt):
    return [f"![{alt}]({plots[kind]})", ""] if kind in plots else []


def cmd_report(run_dir):
    """results.tsv lines: peer round rps p50 p99 non2xx sockerr requests utime stime
    fixed.tsv lines:   see read_fixed"""
    rows = read_results(run_dir)
    order = peer_order(rows)
    plots, plots_skipped = read_plots(run_dir)

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
    out += _cores_section(order, median, tick_us)
    bad = [
        f"{p} ({median[p]['non2xx_total']} non-2xx, {median[p]['sockerr_total']} socket errors)"
        for p in order
        if median[p]["non2xx_total"] or median[p]["sockerr_total"]
    ]
    if bad:
        out.append("")
        out.append("**Errors during load:** " + "; ".join(bad) + ".")
    out.append("")
    out += _image(plots, "rps", "req/s per peer, median round and spread of the rounds")

    out.append("### Latency and CPU at a fixed rate (oha, open loop, latency-corrected)")
    out.append("")
    runs = read_fixed(run_dir)
    if runs:
        out += _fixed_section(run_dir, runs, plots)
    else:
        reason_path = os.path.join(run_dir, "fixed.skipped")
        reason = open(reason_path).read().strip() if os.path.exists(reason_path) else ""
        out.append(f"Skipped{': ' + reason if reason else ''}.")
        out.append("")
    if plots_skipped:
        out.append(f"Charts skipped: {plots_skipped}.")
    print("\n".join(out).rstrip("\n"))


def _cores_section(order, median, tick_us):
    """Where the shared cores went in each peer's median round, per request.

    In a closed loop the load generator, the upstream and the peer share the machine, so
    req/s is the busy cores divided by everyone's CPU per request: a peer that makes the
    others work harder, or leaves a core idle, loses throughput its own CPU does not show."""
    peers = [p for p in order if "machine" in median[p]]
    if not peers:
        return []
    out = [
        "",
        "Where the two cores went (median round; CPU per request of each party, and the "
        "share of the machine left idle):",
        "",
        "| peer | peer CPU/req | upstream CPU/req | wrk CPU/req | other CPU/req "
        "| all CPU/req | idle |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for peer in peers:
        m = median[peer]
        mc = m["machine"]
        reqs = max(m["requests"], 1)
        own = (m["utime"] + m["stime"]) * tick_us / reqs
        upstream = 0.0 if peer == "direct" else mc["upstream"] * tick_us / reqs
        wrk = mc["wrk_s"] * 1e6 / reqs
        everything = mc["busy"] * tick_us / reqs
        other = max(everything - own - upstream - wrk, 0.0)
        total = mc["busy"] + mc["idle"]
        idle = mc["idle"] / total if total else 0.0
        out.append(
            f"| {peer} | {own:.1f} µs | {upstream:.1f} µs | {wrk:.1f} µs | {other:.1f} µs "
            f"| {everything:.1f} µs | {idle:.1%} |"
        )
    out.append("")
    out.append(
        "other: what the machine spent beyond the three (interrupts and softirq not charged "
        "to a process, and everything else running). For direct, the peer is the upstream."
    )
    return out


def _fixed_section(run_dir, runs, plots):
    out = []
    sat = read_saturation(run_dir)
    if sat:
        out.append(
            f"Rates are fractions of nginx's saturation in open loop (oha asked for four "
            f"times nginx's wrk rate; median of the rounds): {sat[0]:.0f} req/s, "
            f"against {sat[1]:.0f} under wrk. Open-loop oha takes more of the shared "
            f"cores than wrk, so a fraction of the wrk figure would overload every peer."
        )
        out.append("")
    med = fixed_medians(runs)
    rounds = max(m["rounds"] for m in med.values())
    out.append(
        "| load | peer | offered req/s | achieved | p50 | p99 | p99 vs haproxy "
        "| CPU/req | CPU/req vs haproxy | CPU/req vs nginx | success | p99 per round "
        "| CPU/req per round |"
    )
    out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for pct, peer in sorted(med, key=lambda k: (k[0], peer_rank(k[1]))):
        m = med[(pct, peer)]
        note = f" ({m['non2xx']} non-2xx)" if m["non2xx"] else ""
        bold = "**" if peer == "keyward" else ""
        out.append(
            f"| {pct}% | {bold}{peer}{bold} | {m['target']:.0f} | {m['achieved']:.0f} "
            f"| {m['p50']:.3f} ms | {m['p99']:.3f} ms "
            f"| {_ratio_of(med, pct, peer, 'haproxy', 'p99')} "
            f"| {m['cpu_us']:.1f} µs "
            f"| {_ratio_of(med, pct, peer, 'haproxy', 'cpu_us')} "
            f"| {_ratio_of(med, pct, peer, 'nginx', 'cpu_us')} "
            f"| {m['success'] * 100:.2f}%{note} "
            f"| {' / '.join(f'{v:.1f}' for v in m['p99_all'])} ms "
            f"| {' / '.join(f'{v:.1f}' for v in m['cpu_us_all'])} µs |"
        )
    out.append("")
    out.append(
        f"Every figure is the median of the interleaved rounds ({rounds} here); success is "
        "the lowest of the rounds. CPU/req: user and kernel CPU time of the peer's own processes "
        "(for direct, the upstream) over the round, divided by the responses oha received. "
        "At a fixed rate every peer does the same work, so this is what each needs for it; "
        "it varies far less from round to round than p99, which on two cores shared with the "
        "load generator and the upstream follows how long a request waits for a core. The "
        "ratio columns divide this peer's median by the named peer's at the same rate."
    )
    out.append("")
    out += _goals(med)
    out += _image(plots, "latency", "p50 and p99 against the offered rate, every peer")
    out += _image(plots, "cpu", "CPU per request against the offered rate, every peer")
    return out


def _goals(med):
    """One line per goal of issue 24 that this run can judge, keyward against its peers."""
    rates = sorted({pct for pct, peer in med if peer == "keyward"})
    if not rates:
        return []
    out = []

    def verdicts(field, others):
        parts = []
        for pct in rates:
            k = med[(pct, "keyward")][field]
            worse = [
                f"{k / med[(pct, o)][field]:.2f}× {o}"
                for o in others
                if (pct, o) in med and med[(pct, o)][field] and k > med[(pct, o)][field]
            ]
            verdict = "met" if not worse else "not met (" + ", ".join(worse) + ")"
            parts.append(f"{pct}%: {verdict}")
        return "; ".join(parts)

    cpu_peers = [p for p in ("haproxy", "nginx") if any((r, p) in med for r in rates)]
    if cpu_peers:
        names = " and ".join(p + "'s" for p in cpu_peers)
        out.append(
            f"- keyward's CPU/req no higher than {names}: "
            + verdicts("cpu_us", cpu_peers)
            + "."
        )
    if any((r, "haproxy") in med for r in rates):
        out.append(
            "- keyward's p99 no higher than haproxy's: " + verdicts("p99", ["haproxy"]) + "."
        )
    return out + [""] if out else []


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
        "cpu-per-request": cmd_cpu_per_request,
        "report": cmd_report,
    }
    if cmd not in table:
        raise SystemExit(__doc__)
    table[cmd](*args)


if __name__ == "__main__":
    main(sys.argv)
