#!/usr/bin/env python3
"""Charts of a bench/run.sh run, drawn with matplotlib from the TSVs the run keeps.

Usage: bench/plot.py DATA_DIR [OUT_DIR NAME]

DATA_DIR is the NAME-data/ directory run.sh writes beside its report (results.tsv,
fixed.tsv, saturation, clk_tck, meta). The charts go to OUT_DIR (default: DATA_DIR's
parent) as PNG files, NAME (default: DATA_DIR's name without "-data") first:

  NAME-rps.png      req/s per peer under wrk: the median round's bar, every round a dot,
                    the whiskers from the slowest to the fastest round
  NAME-latency.png  p50 and p99 against the offered rate, every peer on one chart
                    (fixed-rate oha rounds; log scale; the band spans the rounds' p99s)
  NAME-cpu.png      CPU per request (µs, user + kernel of the peer's processes) against
                    the offered rate; the whiskers span the rounds

For each chart drawn it prints "<kind> <file name>" (kind: rps, latency, cpu), which
benchlib.py report reads to embed the charts with relative links. The fixed-rate charts
are left out when the run had no fixed-rate part.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

COLORS = {
    "direct": "#7f7f7f",
    "relay": "#bcbd22",
    "nginx": "#2ca02c",
    "haproxy": "#1f77b4",
    "keyward": "#d62728",
}
LABELS = {
    "direct": "direct (no proxy)",
    "relay": "relay (HAProxy TCP, no HTTP)",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "keyward": "keyward",
}
CPU_LABELS = {"direct": "direct (no proxy:\nthe upstream's CPU)"}
DPI = 120
# A peer that achieved less than this fraction of the offered rate fell behind: its point is
# marked, since its latency then measures a queue, not the hop.
BEHIND = 0.97


def color(peer):
    return COLORS.get(peer, "#9467bd")


def label(peer):
    return LABELS.get(peer, peer)


def read_meta(data_dir):
    meta = {}
    path = os.path.join(data_dir, "meta")
    if os.path.exists(path):
        for line in open(path):
            key, _, value = line.rstrip("\n").partition("=")
            meta[key] = value
    return meta


def subtitle(meta):
    parts = []
    if meta.get("rounds") and meta.get("duration"):
        parts.append(f"{meta['rounds']} interleaved round(s) × {meta['duration']} s")
    if meta.get("connections"):
        parts.append(f"{meta['connections']} connections")
    if meta.get("keys"):
        parts.append(f"{meta['keys']} keys")
    if meta.get("upstream"):
        parts.append(f"upstream over {meta['upstream']}")
    if meta.get("date"):
        parts.append(meta["date"])
    return ", ".join(parts)


def kilo(x, _pos=None):
    return f"{x / 1000:.0f}k" if x >= 10000 else f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def finish(fig, ax, title, meta, path):
    ax.set_title(title, fontsize=13, fontweight="bold", loc="left", pad=22)
    ax.text(0, 1.02, subtitle(meta), transform=ax.transAxes, fontsize=9, color="#555555")
    ax.grid(True, which="major", axis="y", alpha=0.35)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def plot_rps(data_dir, meta, path):
    rows = benchlib.read_results(data_dir)
    peers = benchlib.peer_order(rows)
    fig, ax = plt.subplots(figsize=(9, 5.2))
    xs = range(len(peers))
    for x, peer in zip(xs, peers):
        runs = rows[peer]
        med = benchlib._median_round(runs)["rps"]
        values = [r["rps"] for r in runs]
        ax.bar(x, med, width=0.6, color=color(peer), alpha=0.85, edgecolor="black", linewidth=0.6)
        if len(values) > 1:
            ax.errorbar(
                x, med, yerr=[[med - min(values)], [max(values) - med]],
                fmt="none", ecolor="black", elinewidth=1.2, capsize=8,
            )
            ax.scatter([x] * len(values), values, s=14, color="black", zorder=3)
        value = f"{med / 1000:.1f}k" if med >= 1000 else f"{med:.0f}"
        ax.annotate(
            value, (x, max(values)), xytext=(0, 6), textcoords="offset points",
            ha="center", va="bottom", fontsize=10, fontweight="bold",
        )
    ax.set_xticks(list(xs), [label(p).replace(" (", "\n(") for p in peers], fontsize=9)
    ax.set_ylabel("requests per second (wrk, closed loop)")
    ax.yaxis.set_major_formatter(FuncFormatter(kilo))
    ax.set_ylim(0, max(r["rps"] for rs in rows.values() for r in rs) * 1.15)
    spread = " (bar: median round; dots: every round; whiskers: slowest to fastest)"
    ax.set_xlabel("peer" + (spread if any(len(v) > 1 for v in rows.values()) else ""))
    finish(fig, ax, "Throughput per peer", meta, path)


def rate_ticks(ax, med):
    """Ticks at the offered rates, labelled with the rate and its % of nginx's saturation."""
    ticks = sorted({(m["target"], pct) for (pct, _), m in med.items()})
    ax.set_xticks([t for t, _ in ticks], [f"{kilo(t)}\n{pct}%" for t, pct in ticks])
    ax.set_xlabel("offered rate, req/s (and % of nginx's open-loop saturation)")
    lo, hi = ticks[0][0], ticks[-1][0]
    pad = (hi - lo) * 0.06 if hi > lo else lo * 0.1
    ax.set_xlim(lo - pad, hi + pad)


def series(med, peer):
    keys = sorted((pct for pct, p in med if p == peer), key=lambda pct: med[(pct, peer)]["target"])
    return [med[(pct, peer)] for pct in keys]


def plot_latency(med, peers, meta, path):
    fig, ax = plt.subplots(figsize=(9.5, 5.6))
    for peer in peers:
        pts = series(med, peer)
        x = [m["target"] for m in pts]
        c = color(peer)
        ax.plot(x, [m["p99"] for m in pts], "-o", color=c, linewidth=2, markersize=6)
        ax.plot(x, [m["p50"] for m in pts], "--s", color=c, linewidth=1.3, markersize=4, alpha=0.85)
        behind = [m for m in pts if m["achieved"] < BEHIND * m["target"]]
        if behind:
            ax.scatter(
                [m["target"] for m in behind], [m["p99"] for m in behind], marker="x", s=90,
                color="black", linewidths=2, zorder=4,
            )
        if any(len(m["p99_all"]) > 1 for m in pts):
            ax.fill_between(
                x, [min(m["p99_all"]) for m in pts], [max(m["p99_all"]) for m in pts],
                color=c, alpha=0.12, linewidth=0,
            )
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: ""))
    ax.grid(True, which="major", axis="both", alpha=0.35)
    ax.set_ylabel("latency, ms (log scale; median of the rounds)")
    rate_ticks(ax, med)
    peer_handles = [Line2D([], [], color=color(p), linewidth=3, label=label(p)) for p in peers]
    style_handles = [
        Line2D([], [], color="black", linestyle="-", marker="o", label="p99"),
        Line2D([], [], color="black", linestyle="--", marker="s", markersize=4, label="p50"),
    ]
    if any(m["achieved"] < BEHIND * m["target"] for m in med.values()):
        style_handles.append(
            Line2D([], [], color="black", marker="x", linestyle="none", markersize=9,
                   markeredgewidth=2, label=f"fell behind (achieved < {BEHIND:.0%} of offered)")
        )
    rounds = max(len(m["p99_all"]) for m in med.values())
    if rounds > 1:
        style_handles.append(
            Patch(color="black", alpha=0.12, label="p99, lowest to highest round")
        )
    first = ax.legend(
        handles=peer_handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, title="peer"
    )
    ax.add_artist(first)
    ax.legend(handles=style_handles, loc="lower left", bbox_to_anchor=(1.01, 0), fontsize=9)
    finish(fig, ax, "Latency at a fixed rate (oha, open loop, latency-corrected)", meta, path)


def plot_cpu(med, peers, meta, path):
    fig, ax = plt.subplots(figsize=(9.5, 5.6))
    top = 0.0
    targets = [m["target"] for m in med.values()]
    # Peers side by side around each rate, so that their whiskers do not hide each other.
    dodge = (max(targets) - min(targets) or max(targets)) * 0.008
    for i, peer in enumerate(peers):
        pts = series(med, peer)
        x = [m["target"] + (i - (len(peers) - 1) / 2) * dodge for m in pts]
        y = [m["cpu_us"] for m in pts]
        lo = [v - min(m["cpu_us_all"]) for v, m in zip(y, pts)]
        hi = [max(m["cpu_us_all"]) - v for v, m in zip(y, pts)]
        ax.errorbar(
            x, y, yerr=[lo, hi], fmt="-o", color=color(peer), linewidth=2, markersize=6,
            capsize=4, label=CPU_LABELS.get(peer, label(peer)),
        )
        top = max([top] + [v for m in pts for v in m["cpu_us_all"] if math.isfinite(v)])
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_ylabel("CPU per request, µs (user + kernel of the peer's processes)")
    rate_ticks(ax, med)
    ax.grid(True, which="major", axis="x", alpha=0.2)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, title="peer")
    if max(len(m["cpu_us_all"]) for m in med.values()) > 1:
        ax.text(
            1.02, 0, "dots: median of the rounds\nwhiskers: lowest to\nhighest round",
            transform=ax.transAxes, fontsize=9, va="bottom",
        )
    finish(fig, ax, "CPU per request at a fixed rate (lower is better)", meta, path)


def main(argv):
    if len(argv) not in (2, 4):
        raise SystemExit(__doc__)
    data_dir = argv[1]
    if len(argv) == 4:
        out_dir, name = argv[2], argv[3]
    else:
        out_dir = os.path.dirname(os.path.abspath(data_dir))
        name = os.path.basename(os.path.abspath(data_dir))
        name = name[: -len("-data")] if name.endswith("-data") else name
    meta = read_meta(data_dir)
    drawn = []
    if os.path.exists(os.path.join(data_dir, "results.tsv")) and benchlib.read_results(data_dir):
        drawn.append(("rps", f"{name}-rps.png"))
        plot_rps(data_dir, meta, os.path.join(out_dir, drawn[-1][1]))
    med = benchlib.fixed_medians(benchlib.read_fixed(data_dir))
    if med:
        peers = benchlib.peer_order({peer for _, peer in med})
        drawn.append(("latency", f"{name}-latency.png"))
        plot_latency(med, peers, meta, os.path.join(out_dir, drawn[-1][1]))
        drawn.append(("cpu", f"{name}-cpu.png"))
        plot_cpu(med, peers, meta, os.path.join(out_dir, drawn[-1][1]))
    for kind, file_name in drawn:
        print(kind, file_name)


if __name__ == "__main__":
    main(sys.argv)
