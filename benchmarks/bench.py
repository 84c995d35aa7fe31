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
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from . import servers, workload
from .harness import RESULTS, CeilingWorker, CpuLayout, Run, wait_idle
from .report import summarise
from .servers import Server
from .workload import Workload


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
    """One benchmark run (`python -m benchmarks run`, `make bench` / `make bench-full`); its records are in
    the returned Run (and its results.jsonl), its tables in summary.md."""
    return BenchRun(profile_name, config, overrides, layout).measure()


class BenchRun:
    """One run: the profile, the config under test, the workloads, and what links and bounds the
    readings (the latest ceiling readings, the token budgets, the retry and quiet-wait budgets).
    One method per step of the module docstring, in that order (`measure`); the methods below them
    take one reading each, and `group` takes readings side by side."""

    def __init__(self, profile_name: str, config: str, overrides: list[str] | None, layout: str) -> None:
        self.profile_name, self.profile = profile_name, PROFILES[profile_name]
        self.config = config
        self.overrides = list(overrides or [])  # as given; the ceiling adds the layout's own
        self.run = Run(f"bench-{profile_name}", CpuLayout(layout))
        self.cfg_overrides = self.overrides + self.run.layout.overrides  # every batchd server's
        from batchd.config import load_config

        self.cfg = load_config(str(servers.ROOT / config), self.cfg_overrides)
        self.model = self.cfg.model.name
        # the workloads and their request bodies (load_workloads)
        self.works: dict[str, Workload] = {}
        self.real_bodies = self.c1_bodies = Path()
        self.c1_index = 0
        # what links the readings
        self.latest: dict[tuple[str, str], float] = {}  # (dtype tag, mix) -> latest ceiling texts/s
        self.budget: dict[str, int | None] = {}  # dtype tag -> the token budget the batchd server runs with
        self.saturated_texts_s = 0.0  # batchd's closed loop at the saturation point (mixes_at)
        # what bounds the run's time
        self.retries_left = self.profile.max_retries  # quiet retries of a noisy group, for the whole run
        self.quiet_left_s = self.profile.quiet_budget_s  # seconds the whole run may wait for a quiet machine

    @property
    def real(self) -> Workload:
        return self.works["real"]

    def measure(self) -> Run:
        self.meta()
        self.load_workloads()  # 1
        self.client_ceiling()  # 2
        self.batchd_and_references()  # 3.-5.
        self.scheduler_overhead()  # 6
        self.bfloat16()  # 7
        self.front_end()  # 8
        summarise(self.run)
        return self.run

    # ---- the steps -------------------------------------------------------------------------------
    def meta(self) -> None:
        """What was measured: profile, config and overrides, CPU layout, batching settings, model."""
        run, cfg = self.run, self.cfg
        run.emit({"kind": "meta", "profile": self.profile_name, "config": self.config, "overrides": self.cfg_overrides,
                  "cpu": run.layout.describe(), "batching": {"max_wait_ms": cfg.batching.max_wait_ms,
                  "max_batch_size": cfg.batching.max_batch_size, "max_batch_tokens": cfg.batching.max_batch_tokens,
                  "buckets": cfg.batching.buckets}, "model": cfg.model.name, "dtype": cfg.model.dtype})
        run.log(f"results -> {run.dir}  (cpu layout: {run.layout.describe()})")

    def load_workloads(self) -> None:
        """1. The workload mixes (stdlib docstrings, fixed seed) and their token-length distributions, so
        every figure can be read against the lengths it was measured on."""
        run = self.run
        self.works = workload.build(self.cfg.model.max_length, self.profile.workload_size, cache_dir=RESULTS)
        for w in self.works.values():
            d = run.emit({"kind": "workload", **w.describe()})
            run.log(f"workload {d['mix']:8s} {d['texts']} texts, tokens mean {d['tokens_mean']} p50 {d['tokens_p50']} "
                    f"p90 {d['tokens_p90']} p99 {d['tokens_p99']} max {d['tokens_max']}")
        real = self.real
        self.real_bodies = run.bodies(real, 1, self.model)
        # the c=1 text: the real mix's median-length text, the same one timed offline at batch 1
        median_tokens = sorted(real.tokens)[len(real.tokens) // 2]
        self.c1_index = real.tokens.index(median_tokens)
        self.c1_bodies = run.bodies(real, 1, self.model, only=[self.c1_index])

    def client_ceiling(self) -> None:
        """2. The load generator against a canned-response server: proves the client is not what limits
        the server figures."""
        run = self.run
        with servers.running(servers.trivial(run.layout.server)) as (srv,):
            r = run.load(srv, self.real_bodies, concurrency=64, duration_s=3.0, warmup_s=0.5)
            run.emit({"kind": "client_ceiling", "server": "trivial", "concurrency": 64, **r})
            run.log(f"client ceiling (canned-response server, c=64): {r['req_s']:.0f} req/s, "
                    f"client cpu {r['client_cpu']:.2f}")

    def batchd_and_references(self) -> None:
        """3.-5. The offline ceiling, batchd and the no-batching server, side by side. All three load at
        once and stay up (idle ones cost no CPU), so readings can be interleaved: each batchd point sits
        next to the no-batching point and the ceiling reading it is compared with."""
        run = self.run
        ceil = run.ceiling(self.config, self.overrides)
        try:
            with servers.running(servers.batchd(self.cfg_overrides, self.config, run.layout.server),
                                 servers.batchd(self.cfg_overrides + ["batching.max_batch_size=1"], self.config,
                                                run.layout.server, name="no-batch")) as (bd, nb):
                info = ceil.wait_ready()
                self.budget["fp32"] = bd.stats().get("max_batch_tokens")  # batchd may calibrate its own (config 0)
                run.emit({"kind": "ceiling_info", "tag": "fp32", **info,
                          "server_max_batch_tokens": self.budget["fp32"]})
                run.emit({"kind": "rss", "server": "batchd", "when": "idle", **bd.rss_mb()})
                self.c1_latency(ceil, bd)
                self.closed_sweep(ceil, bd, nb)
                self.length_mixes(ceil, bd)
                self.many_inputs(bd)
                self.open_loop(bd)
                run.emit({"kind": "rss", "server": "batchd", "when": "end", **bd.rss_mb()})
        finally:
            ceil.close()

    def c1_latency(self, ceil: CeilingWorker, bd: Server) -> None:
        """batchd at c=1 on one fixed text next to the model's batch-1 forward time on the same text:
        what a lone request pays for serving (HTTP, tokenizing, queueing) on top of the model."""
        b1, c1 = self.group(partial(self.batch1_reading, ceil, self.real.texts[self.c1_index]),
                            partial(self.closed_point, bd, "batchd", 1, self.c1_bodies,
                                    mix="c1-text", duration=3.0, kind="c1"))
        self.run.emit(b1)
        self.run.log(f"offline batch-1 forward ({b1['tokens']} tokens): p50 {b1['p50_ms']:.2f} ms; "
                     f"batchd c=1 same text p50 {_ms(c1['p50_ms'])}")

    def closed_sweep(self, ceil: CeilingWorker, bd: Server, nb: Server) -> None:
        """batchd's closed loop at each concurrency, each point next to the no-batching server's at the
        same concurrency (what batching buys); it starts with a ceiling reading, and the saturation
        point (mixes_at) is read between two more (`saturation`)."""
        p = self.profile
        self.group(partial(self.ceiling_reading, ceil, "fp32", "real", p.ceiling_s, "start"))
        for i, c in enumerate(p.concurrencies):
            batchd_point = partial(self.closed_point, bd, "batchd", c, self.real_bodies, offset=i * 997)
            nobatch_points = [partial(self.closed_point, nb, "no-batch", c, self.real_bodies, offset=i * 997)
                              ] if c in p.nobatch_concurrencies else []
            if c == p.mixes_at:
                self.saturation(ceil, c, batchd_point, nobatch_points)
            else:
                self.group(batchd_point, *nobatch_points)

    def saturation(self, ceil: CeilingWorker, c: int, batchd_point: Callable[[], dict],
                   nobatch_points: list[Callable[[], dict]]) -> None:
        """The saturation point, read as ceiling, batchd, ceiling (, no-batching): its ratio uses the
        mean of the two ceiling readings around it. Then the same model at batchd's own mean batch
        size: that splits the gap into what the batch sizes cost (policy) and what serving costs (HTTP,
        tokenizing, sharing the CPUs)."""
        p = self.profile
        recs = self.group(partial(self.ceiling_reading, ceil, "fp32", "real", p.ceiling_s, f"before c={c}"),
                          batchd_point,
                          partial(self.ceiling_reading, ceil, "fp32", "real", p.ceiling_s, f"after c={c}"),
                          *nobatch_points)
        sat = next(r for r in recs if r["kind"] == "closed" and r["server"] == "batchd")
        mbs = max(1, round(sat["stats"].get("mean_batch_size") or 1))
        (small,) = self.group(partial(self.ceiling_reading, ceil, "fp32-at-batchd-batch", "real", p.ceiling_s,
                                      f"max_batch_size={mbs}", mbs))
        self.saturated_texts_s = sat["texts_s"]
        self.run.emit({"kind": "saturation", "concurrency": c, "texts_s": sat["texts_s"],
                       "ceiling_before": recs[0]["texts_s"], "ceiling_after": recs[2]["texts_s"],
                       "vs_ceiling": sat["vs_ceiling"], "batchd_mean_batch": sat["stats"].get("mean_batch_size"),
                       "ceiling_at_batchd_batch": small["texts_s"]})

    def length_mixes(self, ceil: CeilingWorker, bd: Server) -> None:
        """batchd at the saturation concurrency on the short, long and bimodal mixes, each after a
        ceiling reading on the same mix: how the batching copes with other length distributions."""
        p = self.profile
        for m in ("short", "long", "bimodal"):
            bodies = self.run.bodies(self.works[m], 1, self.model)
            self.group(partial(self.ceiling_reading, ceil, "fp32", m, p.ceiling_mix_s, "before"),
                       partial(self.closed_point, bd, "batchd", p.mixes_at, bodies, mix=m, duration=p.mix_duration_s))

    def many_inputs(self, bd: Server) -> None:
        """batchd with requests that carry N inputs each (`input` as a list), at a low concurrency."""
        p = self.profile
        for n in p.list_sizes:
            bodies = self.run.bodies(self.real, n, self.model)
            self.group(partial(self.closed_point, bd, "batchd", p.list_concurrency, bodies, per_request=n,
                               duration=p.duration_s + 2, kind="list"))

    def open_loop(self, bd: Server) -> None:
        """batchd under Poisson arrivals at fractions of its own saturated throughput (from `saturation`),
        so the points resolve the knee and go past it; latency counts from the scheduled arrival."""
        run = self.run
        ceiling_texts_s = self.latest[("fp32", "real")]
        for i, f in enumerate(self.profile.open_fractions):
            (r,) = self.group(partial(self.open_point, bd, i, f, ceiling_texts_s))
            run.emit(r)
            run.log(f"batchd     open   rate {r['offered_rps']:6.0f}/s ({f:.2f}x batchd saturation, "
                    f"{r['fraction_of_ceiling']:.2f}x ceiling): {r['texts_s']:6.1f} texts/s p50 {_ms(r['p50_ms'])} "
                    f"p90 {_ms(r['p90_ms'])} p99 {_ms(r['p99_ms'])} err {r['errors']} conns {r['connections']} "
                    f"foreign {r['foreign_cpu']:.2f}")

    def scheduler_overhead(self) -> None:
        """6. batchd with the 0-ms fake backend vs a bare Starlette+Hypercorn route, interleaved rounds
        (the report takes the best of each): what the scheduler, queue and model thread cost per request."""
        run, p = self.run, self.profile
        c = p.overhead_concurrency
        with servers.running(servers.bare(run.layout.server),
                             servers.batchd(self.cfg_overrides + ["model.backend=fake"], self.config, run.layout.server,
                                            name="batchd-fake")) as pair:
            for rnd in range(p.overhead_rounds):
                for srv in pair:
                    r = run.load(srv, self.real_bodies, concurrency=c, duration_s=p.overhead_s, warmup_s=0.5)
                    run.emit({"kind": "overhead", "server": srv.name, "concurrency": c, "round": rnd, **r})
                    run.log(f"{srv.name:12s} c={c} round {rnd}: {r['req_s']:.0f} req/s p50 {_ms(r['p50_ms'])} "
                            f"err {r['errors']} srv cpu {r['server_cpu']:.2f} client cpu {r['client_cpu']:.2f} "
                            f"foreign {r['foreign_cpu']:.2f}")

    def bfloat16(self) -> None:
        """7. batchd with model.dtype=bfloat16 at the saturation concurrency, bracketed by its own bf16
        offline ceiling: the faster model exposes the server's overhead."""
        run, p = self.run, self.profile
        ceil = run.ceiling(self.config, self.overrides + ["model.dtype=bfloat16"])
        try:
            with servers.running(servers.batchd(self.cfg_overrides + ["model.dtype=bfloat16"], self.config,
                                                run.layout.server, name="batchd-bf16")) as (srv,):
                ceil.wait_ready()
                self.budget["bf16"] = srv.stats().get("max_batch_tokens")
                recs = self.group(partial(self.ceiling_reading, ceil, "bf16", "real", p.ceiling_s, "before"),
                                  partial(self.closed_point, srv, "batchd-bf16", p.mixes_at, self.real_bodies,
                                          tag="bf16"),
                                  partial(self.ceiling_reading, ceil, "bf16", "real", p.ceiling_s, "after"))
                run.emit({"kind": "saturation_bf16", "concurrency": p.mixes_at, "texts_s": recs[1]["texts_s"],
                          "ceiling_before": recs[0]["texts_s"], "ceiling_after": recs[2]["texts_s"],
                          "vs_ceiling": recs[1]["vs_ceiling"]})
        finally:
            ceil.close()

    def front_end(self) -> None:
        """8. The front end past one core (issue 11, benchmarks/frontend.py): fake accelerator bare /
        workers=1 / workers=2 at c=256, the real model with workers=1 and 2 (c=128, and c=1024 with 2),
        CPU per request by part."""
        from . import frontend

        run, p = self.run, self.profile
        frontend.fake_accelerator(run, self.real_bodies, p.overhead_s, p.overhead_rounds)
        for backend, real_tok in (("fake", False), ("real", True)):
            parts = frontend.cpu_parts(self.real.texts[:500], self.config, real=real_tok)
            run.emit({"kind": "frontend_cpu_parts", "backend": backend, **parts})
        frontend.real_model(run, self.real_bodies, self.config, p.duration_s)

    # ---- one reading each ------------------------------------------------------------------------
    def ceiling_reading(self, ceil: CeilingWorker, tag: str, mix: str, seconds: float, when: str,
                        max_batch_size: int | None = None) -> dict:
        """The offline ceiling on one mix, within the token budget the `tag` server runs with."""
        v = ceil.mix(self.works[mix], seconds, self.budget.get(tag), max_batch_size)
        return {"kind": "ceiling", "tag": tag, "mix": mix, "when": when, **v}

    def batch1_reading(self, ceil: CeilingWorker, text: str) -> dict:
        """The model's forward time for one text at batch 1 (no server, so no foreign CPU to count)."""
        meter_free = ceil.batch1([text], 2.0)
        (L, v), = meter_free.items()
        return {"kind": "batch1", "tag": "fp32", "tokens": int(L), **v, "foreign_cpu": 0.0}

    def closed_point(self, srv: Server, server: str, c: int, bodies: Path, mix: str = "real", per_request: int = 1,
                     duration: float | None = None, kind: str = "closed", offset: int = 0, tag: str = "fp32") -> dict:
        """A closed loop of c clients against an idle server, with the server's /stats for the point."""
        p = self.profile
        wait_idle(srv)
        srv.reset_stats()
        r = self.run.load(srv, bodies, concurrency=c, duration_s=duration or p.duration_s, warmup_s=p.warmup_s,
                          offset=offset)
        return {"kind": kind, "server": server, "mix": mix, "per_request": per_request, "concurrency": c, "tag": tag,
                **r, "stats": _stats_brief(srv.stats()), **srv.rss_mb()}

    def open_point(self, bd: Server, i: int, f: float, ceiling_texts_s: float) -> dict:
        """An open loop at f x batchd's saturated throughput (seed and body offset by the point's index)."""
        p = self.profile
        rate = f * self.saturated_texts_s
        wait_idle(bd)
        bd.reset_stats()
        r = self.run.load(bd, self.real_bodies, mode="open", rate=rate, duration_s=p.duration_s, warmup_s=p.warmup_s,
                          offset=i * 1499, seed=i + 1)
        return {"kind": "open", "server": "batchd", "mix": "real", "offered_rps": rate, "fraction": f,
                "fraction_of_ceiling": rate / ceiling_texts_s, "ceiling_texts_s": ceiling_texts_s,
                **r, "stats": _stats_brief(bd.stats())}

    # ---- readings side by side -------------------------------------------------------------------
    def group(self, *points: Callable[[], dict]) -> list[dict]:
        """Take the readings side by side; when other jobs took CPU (foreign_cpu over the threshold) in
        any of them, take the whole group again (bounded), and keep the quietest attempt. Emits the
        ceiling and closed/list/c1 readings (each server point with its ratio to the ceiling); the
        caller emits other kinds."""
        p = self.profile
        best: list[dict] | None = None
        for attempt in range(1 + p.group_attempts):
            self.wait_quiet()
            recs = [point() for point in points]
            noise = _noise(recs)
            if best is None or noise < _noise(best):
                best = recs
            if noise <= p.noisy_above or self.retries_left <= 0 or attempt == p.group_attempts:
                break
            self.retries_left -= 1
            self.run.log(f"  noisy: other jobs used {noise:.2f} cores; measuring this group again")
        assert best is not None
        for r in best:  # ceiling readings first so every server point compares with its neighbours
            if r["kind"] == "ceiling":
                self.latest[(r["tag"], r["mix"])] = r["texts_s"]
        for r in best:
            if r["kind"] == "ceiling":
                self._emit_ceiling(r)
            elif r["kind"] in ("closed", "list", "c1"):
                self._emit_server_point(r, best)
        return best

    def wait_quiet(self) -> None:
        """Other jobs make everything slower: give them a moment to finish (within the run's budget)."""
        if self.quiet_left_s > 0:
            waited, load = self.run.wait_quiet(min(self.profile.quiet_wait_s, self.quiet_left_s),
                                               self.profile.noisy_above)
            self.quiet_left_s -= waited
            if waited >= 1.0:
                self.run.log(f"  waited {waited:.0f} s for other jobs to quiet down (now {load:.2f} cores)")

    def _emit_ceiling(self, r: dict) -> None:
        self.run.emit(r)
        self.run.log(f"offline ceiling [{r['tag']}] {r['mix']:8s} ({r['when']}): {r['texts_s']:6.1f} texts/s, "
                     f"{r['tokens_s']:6.0f} tok/s, mean batch {r['mean_batch_size']:.1f}, "
                     f"pad {r['padding_ratio']:.1%}  foreign cpu {r['foreign_cpu']:.2f}")

    def _emit_server_point(self, r: dict, group: list[dict]) -> None:
        """A server point with its ceiling: the mean of the same group's readings on its mix (taken
        around it), else the latest reading."""
        ceil = self.latest.get((r["tag"], r["mix"]))
        readings = [x["texts_s"] for x in group
                    if x["kind"] == "ceiling" and x["mix"] == r["mix"] and x["tag"] == r["tag"]]
        if readings:
            ceil = sum(readings) / len(readings)
        r["ceiling_texts_s"] = ceil
        r["vs_ceiling"] = r["texts_s"] / ceil if ceil and r["kind"] in ("closed", "list") else None
        self.run.emit(r)
        vs = f" = {r['vs_ceiling']:.2f}x ceiling" if r["vs_ceiling"] else ""
        self.run.log(f"{r['server']:10s} {r['kind']:6s} {r['mix']:7s} n={r['per_request']:<3d} "
                     f"c={r['concurrency']:<4d} {r['texts_s']:6.1f} texts/s {r['tokens_s']:6.0f} tok/s "
                     f"p50 {_ms(r['p50_ms'])} p99 {_ms(r['p99_ms'])} err {r['errors']} "
                     f"batch {r['stats'].get('mean_batch_size', 0):4.1f} pad {r['stats'].get('padding_ratio', 0):5.1%} "
                     f"srv cpu {r['server_cpu']:.2f} foreign {r['foreign_cpu']:.2f}{vs}")


def _noise(recs: list[dict]) -> float:
    """The most foreign CPU (cores other jobs used) during any reading of a group."""
    return max(r.get("foreign_cpu", 0.0) for r in recs)


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
