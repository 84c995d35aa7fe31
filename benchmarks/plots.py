"""One PNG with four panels: throughput vs concurrency (batchd, no-batching, offline ceiling), latency
percentiles vs offered load (open loop), batchd's batch-size histogram at saturation, and padding
ratio / mean batch size vs concurrency."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on a server
import matplotlib.pyplot as plt  # noqa: E402


def plot(records: list[dict], path: Path) -> Path:
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5))
    closed = [r for r in records if r["kind"] == "closed" and r["mix"] == "real"]

    a = ax[0][0]
    for server, style in (("batchd", "o-"), ("no-batch", "s--"), ("batchd-bf16", "^")):
        pts = sorted((r["concurrency"], r["texts_s"]) for r in closed if r["server"] == server)
        if pts:
            a.plot(*zip(*pts), style, label=server)
    for tag, color in (("fp32", "k"), ("bf16", "grey")):
        vals = [r["texts_s"] for r in records if r["kind"] == "ceiling" and r["mix"] == "real" and r["tag"] == tag]
        if vals:  # mean of this run's readings; the spread shows how noisy the machine was
            a.axhspan(min(vals), max(vals), color=color, alpha=0.12)
            a.axhline(sum(vals) / len(vals), ls=":", color=color, label=f"offline ceiling {tag} (range of {len(vals)})")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrency (closed loop)")
    a.set_ylabel("texts/s")
    a.set_title("Throughput vs concurrency (real mix)")
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)

    a = ax[0][1]
    opened = sorted((r for r in records if r["kind"] == "open"), key=lambda r: r["offered_rps"])
    if opened:
        x = [r["offered_rps"] for r in opened]
        for key, style in (("p50_ms", "o-"), ("p90_ms", "s-"), ("p99_ms", "^-")):
            a.plot(x, [r[key] if r[key] is not None else float("nan") for r in opened], style, label=key[:3])
        a2 = a.twinx()
        a2.plot(x, [r["texts_s"] for r in opened], "k:", label="achieved texts/s")
        a2.set_ylabel("achieved texts/s")
        a2.legend(fontsize=8, loc="center right")
        ceil = next((r["texts_s"] for r in records if r["kind"] == "ceiling" and r["mix"] == "real"), None)
        if ceil:
            a.axvline(ceil, color="grey", ls="--", label="offline ceiling")
        sat = next((r["texts_s"] for r in records if r["kind"] == "saturation"), None)
        if sat:
            a.axvline(sat, color="tab:green", ls="--", label="batchd c=128 throughput")
    a.set_yscale("log")
    a.set_xlabel("offered load (requests/s, 1 text each, Poisson)")
    a.set_ylabel("latency (ms)")
    a.set_title("batchd latency vs offered load")
    a.legend(fontsize=8, loc="upper left")
    a.grid(alpha=0.3)

    a = ax[1][0]
    sat = next((r for r in closed if r["server"] == "batchd" and r["concurrency"] == 128), None)
    if sat and sat.get("stats", {}).get("batch_size_histogram"):
        hist = {int(k): v for k, v in sat["stats"]["batch_size_histogram"].items()}
        sizes = sorted(hist)
        # weight by inputs: how many texts rode in batches of each size
        a.bar(sizes, [s * hist[s] for s in sizes], width=0.9)
        a.set_title(f"batchd batch sizes at c=128 (mean {sat['stats']['mean_batch_size']:.1f})")
    a.set_xlabel("batch size")
    a.set_ylabel("texts in batches of this size")
    a.grid(alpha=0.3)

    a = ax[1][1]
    pts = sorted((r["concurrency"], r["stats"].get("padding_ratio", 0) * 100, r["stats"].get("mean_batch_size", 0))
                 for r in closed if r["server"] == "batchd" and r.get("stats"))
    if pts:
        c, pad, mb = zip(*pts)
        a.plot(c, pad, "o-", color="tab:red", label="padding %")
        a.axhline(5, color="tab:red", ls=":", label="5% target")
        a2 = a.twinx()
        a2.plot(c, mb, "s--", color="tab:blue", label="mean batch size")
        a2.set_ylabel("mean batch size")
        a2.legend(fontsize=8, loc="center right")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrency")
    a.set_ylabel("padding ratio (%)")
    a.set_title("batchd padding and batch size vs concurrency")
    a.legend(fontsize=8, loc="upper left")
    a.grid(alpha=0.3)

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
