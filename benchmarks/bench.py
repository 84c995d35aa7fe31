"""The benchmark: references and batchd measured together in one run, reported as ratios.

Order (each step bounded in requests and time):
  1. workload (stdlib docstrings, fixed seed) and its token-length distribution
  2. client ceiling: the load generator against a canned-response server
  3. offline ceiling: the model fed sorted, token-budgeted batches directly (+ batch-1 forward time)
  4. batchd (the given config): c=1 latency, closed loop, length mixes, N-input requests, open loop
  5. no-batching server: the same app with batching.max_batch_size=1
  6. scheduler overhead: batchd with the 0-ms fake backend vs a bare Starlette+Hypercorn route
  7. bfloat16: batchd with model.dtype=bfloat16 vs its own bf16 offline ceiling
  8. front end (benchmarks/frontend.py): fake accelerator bare / workers=1 / workers=2, real model
     workers=1 and 2, CPU per request by part
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from . import servers, workload
from .harness import RESULTS, CpuLayout, Run, wait_idle
from .report import summarise


@dataclass
class Profile:
    duration_s: float = 4.0
    warmup_s: float = 1.0
    concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 512])
    nobatch_concurrencies: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    open_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 0.9, 1.1, 1.5])  # x batchd saturation
    mixes_at: int = 128
    mix_duration_s: float = 3.0
    list_sizes: list[int] = field(default_factory=lambda: [8, 32])
    list_concurrency: int = 8
    ceiling_s: float = 4.0
    ceiling_mix_s: float = 2.5
    overhead_concurrency: int = 64
    overhead_rounds: int = 2
    overhead_s: float = 3.0
    noisy_above: float = 0.25  # cores used by other jobs during a group that make it worth measuring again
    group_attempts: int = 1  # extra attempts per group
    max_retries: int = 4  # extra attempts per run
    quiet_wait_s: float = 10.0  # longest wait for a quiet machine before one group
    quiet_budget_s: float = 40.0  # ... and in all
    workload_size: int = 4000


PROFILES = {
    "quick": Profile(),
    "full": Profile(duration_s=10.0, warmup_s=2.0, concurrencies=[1, 2, 8, 32, 64, 128, 256, 512],
                    nobatch_concurrencies=[1, 8, 32, 128, 512],
                    open_fractions=[0.1, 0.25, 0.5, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0],
                    mix_duration_s=8.0, list_sizes=[4, 16, 64], ceiling_s=8.0, ceiling_mix_s=6.0,
                    overhead_rounds=3, overhead_s=5.0, group_attempts=2, max_retries=12,
                    quiet_wait_s=30.0, quiet_budget_s=300.0),
}


def run_bench(profile_name: str = "quick", config: str = "config.toml", overrides: list[str] | None = None,
              layout: str = "shared") -> Run:
    p = PROFILES[profile_name]
    overrides = list(overrides or [])
    run = Run(f"bench-{profile_name}", CpuLayout(layout))
    cfg_overrides = overrides + run.layout.overrides
    from batchd.config import load_config

    cfg = load_config(str(servers.ROOT / config), cfg_overrides)
    run.emit({"kind": "meta", "profile": profile_name, "config": config, "overrides": cfg_overrides,
              "cpu": run.layout.describe(), "batching": {"max_wait_ms": cfg.batching.max_wait_ms,
              "max_batch_size": cfg.batching.max_batch_size, "max_batch_tokens": cfg.batching.max_batch_tokens,
              "buckets": cfg.batching.buckets}, "model": cfg.model.name, "dtype": cfg.model.dtype})
    run.log(f"results -> {run.dir}  (cpu layout: {run.layout.describe()})")

    # 1. workload -----------------------------------------------------------------------------------
    works = workload.build(cfg.model.max_length, p.workload_size, cache_dir=RESULTS)
    for w in works.values():
        d = run.emit({"kind": "workload", **w.describe()})
        run.log(f"workload {d['mix']:8s} {d['texts']} texts, tokens mean {d['tokens_mean']} p50 {d['tokens_p50']} "
                f"p90 {d['tokens_p90']} p99 {d['tokens_p99']} max {d['tokens_max']}")
    real = works["real"]
    model = cfg.model.name
    real_bodies = run.bodies(real, 1, model)
    # the c=1 text: the real mix's median-length text, the same one timed offline at batch 1
    median_tokens = sorted(real.tokens)[len(real.tokens) // 2]
    c1_index = real.tokens.index(median_tokens)
    c1_bodies = run.bodies(real, 1, model, only=[c1_index])

    # 2. client ceiling -----------------------------------------------------------------------------
    with servers.running(servers.trivial(run.layout.server)) as (srv,):
        r = run.load(srv, real_bodies, concurrency=64, duration_s=3.0, warmup_s=0.5)
        run.emit({"kind": "client_ceiling", "server": "trivial", "concurrency": 64, **r})
        run.log(f"client ceiling (canned-response server, c=64): {r['req_s']:.0f} req/s, client cpu {r['client_cpu']:.2f}")

    latest: dict[tuple[str, str], float] = {}  # (dtype tag, mix) -> latest ceiling texts/s
    retries = [p.max_retries]  # quiet-retry budget for the whole run (bounds its time)
    quiet_budget = [p.quiet_budget_s]  # seconds the whole run may spend waiting for a quiet machine

    budget: dict[str, int | None] = {}  # dtype tag -> the token budget the batchd server runs with

    def reading(ceil, tag: str, mix: str, seconds: float, when: str, max_batch_size: int | None = None) -> dict:
        v = ceil.mix(works[mix], seconds, budget.get(tag), max_batch_size)
        return {"kind": "ceiling", "tag": tag, "mix": mix, "when": when, **v}

    def closed(srv, server: str, c: int, bodies, mix: str = "real", per_request: int = 1,
               duration: float | None = None, kind: str = "closed", offset: int = 0, tag: str = "fp32") -> dict:
        wait_idle(srv)
        srv.reset_stats()
        r = run.load(srv, bodies, concurrency=c, duration_s=duration or p.duration_s, warmup_s=p.warmup_s,
                     offset=offset)
        return {"kind": kind, "server": server, "mix": mix, "per_request": per_request, "concurrency": c, "tag": tag,
                **r, "stats": _stats_brief(srv.stats()), **srv.rss_mb()}

    def group(*thunks) -> list[dict]:
        """Measure side by side; when other jobs took CPU (foreign_cpu over the threshold) in any of
        them, measure the whole group again (bounded), and keep the quietest attempt."""
        best: list[dict] | None = None
        for attempt in range(1 + p.group_attempts):
            if quiet_budget[0] > 0:  # other jobs make everything slower: give them a moment to finish
                waited, load = run.wait_quiet(min(p.quiet_wait_s, quiet_budget[0]), p.noisy_above)
                quiet_budget[0] -= waited
                if waited >= 1.0:
                    run.log(f"  waited {waited:.0f} s for other jobs to quiet down (now {load:.2f} cores)")
            recs = [t() for t in thunks]
            noise = max(r.get("foreign_cpu", 0.0) for r in recs)
            if best is None or noise < max(r.get("foreign_cpu", 0.0) for r in best):
                best = recs
            if noise <= p.noisy_above or retries[0] <= 0 or attempt == p.group_attempts:
                break
            retries[0] -= 1
            run.log(f"  noisy: other jobs used {noise:.2f} cores; measuring this group again")
        assert best is not None
        for r in best:  # ceiling readings first so every server point compares with its neighbours
            if r["kind"] == "ceiling":
                latest[(r["tag"], r["mix"])] = r["texts_s"]
        for r in best:
            if r["kind"] == "ceiling":
                run.emit(r)
                run.log(f"offline ceiling [{r['tag']}] {r['mix']:8s} ({r['when']}): {r['texts_s']:6.1f} texts/s, "
                        f"{r['tokens_s']:6.0f} tok/s, mean batch {r['mean_batch_size']:.1f}, "
                        f"pad {r['padding_ratio']:.1%}  foreign cpu {r['foreign_cpu']:.2f}")
                continue
            if r["kind"] not in ("closed", "list", "c1"):
                continue  # the caller emits other kinds
            ceil = latest.get((r["tag"], r["mix"]))
            readings = [x["texts_s"] for x in best if x["kind"] == "ceiling" and x["mix"] == r["mix"] and x["tag"] == r["tag"]]
            if readings:  # bracketed: compare with the mean of the readings taken around it
                ceil = sum(readings) / len(readings)
            r["ceiling_texts_s"] = ceil
            r["vs_ceiling"] = r["texts_s"] / ceil if ceil and r["kind"] in ("closed", "list") else None
            run.emit(r)
            run.log(f"{r['server']:10s} {r['kind']:6s} {r['mix']:7s} n={r['per_request']:<3d} c={r['concurrency']:<4d} "
                    f"{r['texts_s']:6.1f} texts/s {r['tokens_s']:6.0f} tok/s p50 {_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])} "
                    f"err {r['errors']} batch {r['stats'].get('mean_batch_size', 0):4.1f} "
                    f"pad {r['stats'].get('padding_ratio', 0):5.1%} srv cpu {r['server_cpu']:.2f} "
                    f"foreign {r['foreign_cpu']:.2f}" + (f" = {r['vs_ceiling']:.2f}x ceiling" if r["vs_ceiling"] else ""))
        return best

    # 3.-5. offline ceiling, batchd and the no-batching server side by side ------------------------------
    # All three load at once and stay up (idle ones cost no CPU), so readings can be interleaved:
    # each batchd point sits next to the no-batching point and the ceiling reading it is compared with.
    ceil = run.ceiling(config, overrides)
    try:
        with servers.running(servers.batchd(cfg_overrides, config, run.layout.server),
                             servers.batchd(cfg_overrides + ["batching.max_batch_size=1"], config,
                                            run.layout.server, name="no-batch")) as (bd, nb):
            info = ceil.wait_ready()
            budget["fp32"] = bd.stats().get("max_batch_tokens")  # batchd may calibrate its own (config 0)
            run.emit({"kind": "ceiling_info", "tag": "fp32", **info, "server_max_batch_tokens": budget["fp32"]})
            run.emit({"kind": "rss", "server": "batchd", "when": "idle", **bd.rss_mb()})
            c1_text = real.texts[c1_index]

            def batch1() -> dict:
                meter_free = ceil.batch1([c1_text], 2.0)
                (L, v), = meter_free.items()
                return {"kind": "batch1", "tag": "fp32", "tokens": int(L), **v, "foreign_cpu": 0.0}

            b1, c1 = group(batch1, lambda: closed(bd, "batchd", 1, c1_bodies, mix="c1-text", duration=3.0, kind="c1"))
            run.emit(b1)
            run.log(f"offline batch-1 forward ({b1['tokens']} tokens): p50 {b1['p50_ms']:.2f} ms; "
                    f"batchd c=1 same text p50 {_ms(c1['p50_ms'])}")
            group(lambda: reading(ceil, "fp32", "real", p.ceiling_s, "start"))
            for i, c in enumerate(p.concurrencies):
                points = [lambda c=c, i=i: closed(bd, "batchd", c, real_bodies, offset=i * 997)]
                if c == p.mixes_at:  # the saturation point: bracket it with ceiling readings
                    points = [lambda: reading(ceil, "fp32", "real", p.ceiling_s, f"before c={c}"), points[0],
                              lambda: reading(ceil, "fp32", "real", p.ceiling_s, f"after c={c}")]
                if c in p.nobatch_concurrencies:
                    points.append(lambda c=c, i=i: closed(nb, "no-batch", c, real_bodies, offset=i * 997))
                recs = group(*points)
                if c == p.mixes_at:
                    sat = next(r for r in recs if r["kind"] == "closed" and r["server"] == "batchd")
                    # the same model at batchd's own mean batch size: splits the gap into what the batch
                    # sizes cost (policy) and what serving costs (HTTP, tokenizing, sharing the CPUs)
                    mbs = max(1, round(sat["stats"].get("mean_batch_size") or 1))
                    (small,) = group(lambda: reading(ceil, "fp32-at-batchd-batch", "real", p.ceiling_s,
                                                     f"max_batch_size={mbs}", mbs))
                    run.emit({"kind": "saturation", "concurrency": c, "texts_s": sat["texts_s"],
                              "ceiling_before": recs[0]["texts_s"], "ceiling_after": recs[2]["texts_s"],
                              "vs_ceiling": sat["vs_ceiling"], "batchd_mean_batch": sat["stats"].get("mean_batch_size"),
                              "ceiling_at_batchd_batch": small["texts_s"]})
            for m in ("short", "long", "bimodal"):
                group(lambda m=m: reading(ceil, "fp32", m, p.ceiling_mix_s, "before"),
                      lambda m=m: closed(bd, "batchd", p.mixes_at, run.bodies(works[m], 1, model), mix=m,
                                         duration=p.mix_duration_s))
            for n in p.list_sizes:
                group(lambda n=n: closed(bd, "batchd", p.list_concurrency, run.bodies(real, n, model), per_request=n,
                                         duration=p.duration_s + 2, kind="list"))
            # open loop: offered load relative to batchd's own saturated throughput (c=128 above), so
            # the points resolve the knee and go past it; latency counts from the scheduled arrival
            ceiling_texts_s = latest[("fp32", "real")]
            sat_texts_s = next(r["texts_s"] for r in run.records if r["kind"] == "saturation")

            def open_point(i: int, f: float) -> dict:
                rate = f * sat_texts_s
                wait_idle(bd)
                bd.reset_stats()
                r = run.load(bd, real_bodies, mode="open", rate=rate, duration_s=p.duration_s, warmup_s=p.warmup_s,
                             offset=i * 1499, seed=i + 1)
                return {"kind": "open", "server": "batchd", "mix": "real", "offered_rps": rate, "fraction": f,
                        "fraction_of_ceiling": rate / ceiling_texts_s, "ceiling_texts_s": ceiling_texts_s,
                        **r, "stats": _stats_brief(bd.stats())}

            for i, f in enumerate(p.open_fractions):
                (r,) = group(lambda i=i, f=f: open_point(i, f))
                run.emit(r)
                run.log(f"batchd     open   rate {r['offered_rps']:6.0f}/s ({f:.2f}x batchd saturation, "
                        f"{r['fraction_of_ceiling']:.2f}x ceiling): {r['texts_s']:6.1f} texts/s p50 {_ms(r['p50_ms'])} "
                        f"p90 {_ms(r['p90_ms'])} p99 {_ms(r['p99_ms'])} err {r['errors']} conns {r['connections']} "
                        f"foreign {r['foreign_cpu']:.2f}")
            run.emit({"kind": "rss", "server": "batchd", "when": "end", **bd.rss_mb()})
    finally:
        ceil.close()

    # 6. scheduler overhead: 0-ms fake backend vs bare Starlette+Hypercorn, interleaved, best of rounds --
    c = p.overhead_concurrency
    with servers.running(servers.bare(run.layout.server),
                         servers.batchd(cfg_overrides + ["model.backend=fake"], config, run.layout.server,
                                        name="batchd-fake")) as pair:
        for rnd in range(p.overhead_rounds):
            for srv in pair:
                r = run.load(srv, real_bodies, concurrency=c, duration_s=p.overhead_s, warmup_s=0.5)
                run.emit({"kind": "overhead", "server": srv.name, "concurrency": c, "round": rnd, **r})
                run.log(f"{srv.name:12s} c={c} round {rnd}: {r['req_s']:.0f} req/s p50 {_ms(r['p50_ms'])} "
                        f"err {r['errors']} srv cpu {r['server_cpu']:.2f} client cpu {r['client_cpu']:.2f} "
                        f"foreign {r['foreign_cpu']:.2f}")

    # 7. bfloat16: batchd bf16 bracketed by its own bf16 ceiling -----------------------------------------
    ceil = run.ceiling(config, overrides + ["model.dtype=bfloat16"])
    try:
        with servers.running(servers.batchd(cfg_overrides + ["model.dtype=bfloat16"], config, run.layout.server,
                                            name="batchd-bf16")) as (srv,):
            ceil.wait_ready()
            budget["bf16"] = srv.stats().get("max_batch_tokens")
            recs = group(lambda: reading(ceil, "bf16", "real", p.ceiling_s, "before"),
                         lambda: closed(srv, "batchd-bf16", p.mixes_at, real_bodies, tag="bf16"),
                         lambda: reading(ceil, "bf16", "real", p.ceiling_s, "after"))
            run.emit({"kind": "saturation_bf16", "concurrency": p.mixes_at, "texts_s": recs[1]["texts_s"],
                      "ceiling_before": recs[0]["texts_s"], "ceiling_after": recs[2]["texts_s"],
                      "vs_ceiling": recs[1]["vs_ceiling"]})
    finally:
        ceil.close()

    # 8. the front end past one core (issue 11): fake accelerator bare / workers=1 / workers=2 at c=256,
    #    the real model with workers=1 and 2 (c=128, and c=1024 with 2), CPU per request by part
    from . import frontend
    frontend.fake_accelerator(run, real_bodies, p.overhead_s, p.overhead_rounds)
    for backend, real_tok in (("fake", False), ("real", True)):
        parts = frontend.cpu_parts(real.texts[:500], config, real=real_tok)
        run.emit({"kind": "frontend_cpu_parts", "backend": backend, **parts})
    frontend.real_model(run, real_bodies, config, p.duration_s)

    summarise(run)
    return run


def _ms(v) -> str:
    return f"{v:7.1f} ms" if v is not None else "      - ms"


def _stats_brief(st: dict) -> dict:
    keys = ("requests_total", "inputs_total", "batches_total", "mean_batch_size", "padding_ratio", "real_tokens",
            "padded_tokens", "model_calls", "outcomes", "rejections", "batch_size_histogram", "latency_ms",
            "max_batch_tokens", "cost_model")
    return {k: st.get(k) for k in keys if k in st}


if __name__ == "__main__":
    t = time.time()
    run = run_bench()
    print(json.dumps({"dir": str(run.dir), "seconds": time.time() - t}))
