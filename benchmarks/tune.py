"""`python -m benchmarks tune [--write tuned.toml]`: find batching settings for this machine.

A coordinate sweep from the given config: bucket sets first (they decide padding and how the queue
splits), then max_batch_tokens, then max_wait_ms, each stage keeping the best value so far. Every
candidate is a fresh batchd server measured at saturation (closed loop, c=128, real mix) and at light
load (c=8, for latency). Throughput is scored as a ratio to an offline-ceiling reading taken right
before it, so the machine getting slower or faster in between (other jobs) does not pick the winner.
A candidate wins only when it beats the incumbent by more than `margin` (noise), and its c=8 p99 may
not be more than 1.5x the baseline's.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

from . import servers, workload
from .harness import RESULTS, CpuLayout, Run

BUCKET_SETS = {
    "fine": [8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256],
    "classic": [16, 24, 32, 48, 64, 96, 128, 192, 256],
    "pow2": [16, 32, 64, 128, 256],
    "coarse": [32, 64, 128, 256],
}


def _fmt(values: list[int]) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def tune(config: str = "config.toml", overrides: list[str] | None = None, layout: str = "shared",
         quick: bool = False, write: str | None = None) -> dict:
    overrides = list(overrides or [])
    run = Run("tune", CpuLayout(layout))
    from batchd.config import load_config

    base_cfg = load_config(str(servers.ROOT / config), overrides + run.layout.overrides)
    b = base_cfg.batching
    max_len = base_cfg.model.max_length
    works = workload.build(max_len, 4000, cache_dir=RESULTS)
    real = works["real"]
    bodies = run.bodies(real, 1, base_cfg.model.name)
    dur = 3.0 if quick else 5.0
    margin = 0.03
    attempts = 2 if quick else 3

    buckets = {"given": list(b.buckets), **{k: [x for x in v if x < max_len] + [max_len] for k, v in BUCKET_SETS.items()}}
    stages = [
        ("buckets", list(buckets) if not quick else ["given", "classic", "pow2"]),
        ("max_batch_tokens", sorted({b.max_batch_tokens, 4096, 16384}) if not quick else sorted({b.max_batch_tokens, 16384})),
        ("max_wait_ms", sorted({b.max_wait_ms, 0.0, 1.0, 5.0, 10.0}) if not quick else sorted({b.max_wait_ms, 0.0, 5.0})),
    ]
    best = {"buckets": "given", "max_batch_tokens": b.max_batch_tokens, "max_wait_ms": b.max_wait_ms}
    ceil = run.ceiling(config, overrides)
    results: dict[str, dict] = {}
    baseline_p99 = None
    try:
        ceil.wait_ready()

        def measure(cand: dict) -> dict:
            key = f"buckets={cand['buckets']} max_batch_tokens={cand['max_batch_tokens']} max_wait_ms={cand['max_wait_ms']}"
            if key in results:
                return results[key]
            tokens = max(cand["max_batch_tokens"], buckets[cand["buckets"]][-1])
            sets = [f"batching.buckets={_fmt(buckets[cand['buckets']])}", f"batching.max_batch_tokens={tokens}",
                    f"batching.max_wait_ms={cand['max_wait_ms']}"]
            with servers.running(servers.batchd(overrides + run.layout.overrides + sets, config,
                                                 run.layout.server)) as (srv,):
                rec = None
                for attempt in range(attempts):  # quiet retries: other jobs on the machine move readings
                    before = ceil.mix(real, 2.0)
                    srv.reset_stats()
                    sat = run.load(srv, bodies, concurrency=128, duration_s=dur, warmup_s=1.0)
                    st = srv.stats()
                    after = ceil.mix(real, 2.0)
                    light = run.load(srv, bodies, concurrency=8, duration_s=dur * 0.6, warmup_s=0.5, offset=2000)
                    ref = (before["texts_s"] + after["texts_s"]) / 2
                    noise = max(sat["foreign_cpu"], before["foreign_cpu"], after["foreign_cpu"], light["foreign_cpu"])
                    cur = {"kind": "tune", "candidate": cand, "overrides": sets, "texts_s": sat["texts_s"],
                           "ceiling_texts_s": ref, "vs_ceiling": sat["texts_s"] / ref,
                           "p50_ms_c128": sat["p50_ms"], "p99_ms_c128": sat["p99_ms"],
                           "errors": sat["errors"] + light["errors"], "mean_batch_size": st.get("mean_batch_size"),
                           "padding_ratio": st.get("padding_ratio"), "p50_ms_c8": light["p50_ms"],
                           "p99_ms_c8": light["p99_ms"], "foreign_cpu": noise, "attempt": attempt}
                    if rec is None or noise < rec["foreign_cpu"]:
                        rec = cur
                    if noise <= 0.25:
                        break
                    run.log(f"  noisy ({noise:.2f} cores used by other jobs): measuring again")
            assert rec is not None
            run.emit(rec)
            run.log(f"tune {key}: {rec['texts_s']:.1f} texts/s = {rec['vs_ceiling']:.2f}x ceiling, batch "
                    f"{rec['mean_batch_size'] or 0:.1f}, pad {(rec['padding_ratio'] or 0):.1%}, c=8 p50 "
                    f"{rec['p50_ms_c8'] or 0:.1f} p99 {rec['p99_ms_c8'] or 0:.1f} ms, foreign {rec['foreign_cpu']:.2f}")
            results[key] = rec
            return rec

        incumbent = measure(best)
        baseline_p99 = incumbent["p99_ms_c8"] or float("inf")
        baseline = incumbent
        for name, values in stages:
            for v in values:
                if v == best[name]:
                    continue
                cand = {**best, name: v}
                rec = measure(cand)
                ok_latency = (rec["p99_ms_c8"] or float("inf")) <= 1.5 * baseline_p99
                if rec["errors"] == 0 and ok_latency and rec["vs_ceiling"] > incumbent["vs_ceiling"] * (1 + margin):
                    best, incumbent = cand, rec
            run.log(f"after {name}: best so far {best} ({incumbent['vs_ceiling']:.2f}x ceiling)")
    finally:
        ceil.close()

    summary = {"kind": "tune_best", "best": best, "buckets": buckets[best["buckets"]],
               "vs_ceiling": incumbent["vs_ceiling"], "baseline_vs_ceiling": baseline["vs_ceiling"],
               "texts_s": incumbent["texts_s"], "p99_ms_c8": incumbent["p99_ms_c8"]}
    run.emit(summary)
    print("| buckets | max_batch_tokens | max_wait_ms | texts/s c=128 | x ceiling | mean batch | padding | c=8 p50 ms | c=8 p99 ms | foreign cpu |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        c = r["candidate"]
        mark = " **best**" if c == best else ""
        print(f"| {c['buckets']}{mark} | {c['max_batch_tokens']} | {c['max_wait_ms']} | {r['texts_s']:.1f} | "
              f"{r['vs_ceiling']:.2f} | {r['mean_batch_size'] or 0:.1f} | {(r['padding_ratio'] or 0):.1%} | "
              f"{r['p50_ms_c8'] or 0:.1f} | {r['p99_ms_c8'] or 0:.1f} | {r['foreign_cpu']:.2f} |")
    print(f"\nbest for this machine: buckets = {_fmt(buckets[best['buckets']])} ({best['buckets']}), "
          f"max_batch_tokens = {best['max_batch_tokens']}, max_wait_ms = {best['max_wait_ms']}  "
          f"({incumbent['vs_ceiling']:.2f}x ceiling vs {baseline['vs_ceiling']:.2f}x for the given config)")
    if write:
        path = write_config(config, Path(write), best, buckets[best["buckets"]], summary)
        print(f"wrote {path}")
    return summary


def write_config(config: str, out: Path, best: dict, bucket_list: list[int], summary: dict) -> Path:
    """The given config.toml with the three batching keys replaced in place (comments kept)."""
    text = (servers.ROOT / config).read_text()
    values = {"max_wait_ms": repr(float(best["max_wait_ms"])),
              "max_batch_tokens": str(max(best["max_batch_tokens"], bucket_list[-1])),
              "buckets": _fmt(bucket_list)}
    section = re.search(r"(?ms)^\[batching\]\s*$(.*?)(?=^\[|\Z)", text)
    if section is None:
        text += "\n[batching]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())
    else:
        body = section.group(1)
        for key, value in values.items():
            pattern = re.compile(rf"(?m)^(\s*{key}\s*=\s*)([^#\n]*?)(\s*#.*)?$")
            if pattern.search(body):
                body = pattern.sub(lambda m: f"{m.group(1)}{value}{m.group(3) or ''}", body, count=1)
            else:
                body = body.rstrip("\n") + f"\n{key} = {value}\n"
        text = text[:section.start(1)] + body + text[section.end(1):]
    header = (f"# Tuned by `python -m benchmarks tune` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
              f"{summary['vs_ceiling']:.2f}x offline ceiling at c=128 (given config: {summary['baseline_vs_ceiling']:.2f}x).\n")
    out.write_text(header + text)
    from batchd.config import load_config

    load_config(out)  # refuse to leave an invalid file behind
    return out
