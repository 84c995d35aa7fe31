"""One generation benchmark run: every system on the same requests, in one process tree, in this order

  1. workload (seeded) and its prompt / max_tokens distribution
  2. batchd started (it loads while nothing is measured) and probed with one short streamed request
  3. generate()   one per request, sequential, closed loop
  4. static-8     request-level batches of 8 in arrival order, closed loop
  5. manager      transformers' ContinuousBatchingManager, explicit sizes, closed loop
  6. batchd       streaming HTTP clients (own process, pinned to the last CPU), closed loop;
                  preceded by the client's ceiling against a canned SSE server (no model)
  7. open loop    Poisson arrivals at `open_fraction` x the best closed-loop request rate of
                  manager / batchd, the same arrival times for both: manager, then batchd
  8. cancel probe what the manager does with a cancelled in-flight request
  9. dtype pass   generate() in the other dtype (bf16 when the run is fp32) on the first N requests:
                  how many greedy outputs differ; its tokens/s against the run's dtype, each request
                  run in both dtypes back to back (a side-by-side speed ratio)
Each phase is bounded in time; before each one the run waits (bounded) for other jobs to go quiet
and records how many cores other processes used during it (`foreign_cpu`).
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..harness import RESULTS, CpuLayout, CpuMeter, Run, _busy_s
from . import metrics, offline, workload
from .workload import MODEL_ID

SIZES = {"quick": 16, "full": 32}


class OwnMeter:
    """CPU use during an in-process phase: this process (all its threads, the manager's included) and
    everything else on the machine (`foreign_cpu`, from /proc/stat). harness.CpuMeter is for a
    process under test other than the caller."""

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.monotonic(), _busy_s(), time.process_time()

    def stop(self) -> dict:
        wall = max(1e-9, time.monotonic() - self.t)
        own = time.process_time() - self.own
        return {"process_cpu": round(own / wall, 2),
                "foreign_cpu": round(max(0.0, _busy_s() - self.busy - own) / wall, 2)}


@dataclass
class Options:
    quick: bool = False
    dtype: str = "float32"
    out: str | None = None
    requests: int | None = None
    systems: tuple[str, ...] = ("generate", "static", "manager", "batchd")
    open_loop: bool = True
    url: str | None = None  # an already running batchd instead of starting one
    config: str = "config.toml"
    overrides: list[str] = field(default_factory=list)
    model_id: str = MODEL_ID
    static_size: int = 8
    max_seqs: int = 32  # manager: max_requests_per_batch
    max_batch_tokens: int = 512  # manager: tokens per forward (prefill chunks + decodes)
    page_size: int = 64  # manager: KV cache page size in tokens
    prefix_sharing: bool = False
    open_fraction: float = 0.8
    rate: float | None = None  # open-loop rate (req/s); default: open_fraction x best closed req/s
    dtype_pass_n: int | None = None
    phase_max_s: float = 900.0
    quiet_wait_s: float = 10.0
    quiet_budget_s: float = 40.0
    seed: int = workload.SEED


class GenRun:
    def __init__(self, opt: Options) -> None:
        self.opt = opt
        self.profile = "quick" if opt.quick else "full"
        self.run = Run(f"generation-{self.profile}", CpuLayout("shared"), Path(opt.out) if opt.out else None)
        self.quiet_left = opt.quiet_budget_s
        self.phases: dict[tuple[str, str], dict] = {}
        self.reference: list[dict] | None = None  # generate() records: the greedy reference
        self.tok = None

    def log(self, msg: str) -> None:
        self.run.log(msg)

    def quiet(self) -> dict:
        if self.quiet_left <= 0:
            return {}
        waited, load = self.run.wait_quiet(min(self.opt.quiet_wait_s, self.quiet_left))
        self.quiet_left -= waited
        return {"quiet_wait_s": round(waited, 1), "load_before": round(load, 2)}

    def phase(self, system: str, mode: str, records: list[dict], meter: dict, extra: dict | None = None) -> dict:
        summary = metrics.summarise(records)
        rec = {"kind": "phase", "system": system, "mode": mode, **summary, **meter, **(extra or {})}
        if self.reference is not None and system != "generate" and self.tok is not None:
            rec["greedy_vs_generate"] = offline.agreement(self.reference, records, self.tok,
                                                          texts=system == "batchd")
        self.phases[(system, mode)] = self.run.emit(rec)
        self.run.emit({"kind": "requests", "system": system, "mode": mode,
                       "records": [{k: v for k, v in r.items() if k not in ("ids", "text")} for r in records]})
        errs = [r.get("error") for r in records if r.get("error")]
        self.log(f"{system:9s} {mode:6s} {summary['tokens']} tokens, {_f(summary.get('tokens_s'))} tok/s, "
                 f"TTFT p50/p99 {_f(summary.get('ttft_p50_ms'), 0)}/{_f(summary.get('ttft_p99_ms'), 0)} ms, "
                 f"ITL p50/p99 {_f(summary.get('itl_p50_ms'), 0)}/{_f(summary.get('itl_p99_ms'), 0)} ms, "
                 + (f"foreign cpu {meter['foreign_cpu']}" if "foreign_cpu" in meter else
                    f"machine cpu {meter.get('machine_cpu')}") + (f", {len(errs)} errors: {errs[0]}" if errs else ""))
        return rec

    # ---- main --------------------------------------------------------------------------------------
    def execute(self) -> Run:
        opt = self.opt
        n = opt.requests or SIZES[self.profile]
        self.run.emit({"kind": "meta", "profile": self.profile, "options": asdict(opt), "cpus": os.cpu_count(),
                       "affinity": sorted(os.sched_getaffinity(0))})
        self.log(f"results -> {self.run.dir}")
        self.tok = workload.load_tokenizer()
        reqs = workload.build(n, self.tok, seed=opt.seed)
        d = self.run.emit({"kind": "workload", **workload.describe(reqs)})
        self.log(f"workload: {n} requests, prompt tokens {d['prompt_tokens_min']}-{d['prompt_tokens_max']} "
                 f"(p50 {d['prompt_tokens_p50']}), max_tokens {d['max_tokens_min']}-{d['max_tokens_max']}, "
                 f"{d['max_tokens_sum']} tokens to generate")

        server = None
        batchd_url = opt.url
        if "batchd" in opt.systems and not batchd_url:
            server = self.start_batchd()
            batchd_url = server.url if server else None
        try:
            if batchd_url:
                batchd_url = self.probe_batchd(batchd_url, reqs[0])
            model = None
            if {"generate", "static", "manager"} & set(opt.systems):
                self.log(f"loading SmolLM2 ({opt.dtype})")
                _, model = workload.load_model(opt.dtype)
                offline.warmup(model, self.tok)

            if "generate" in opt.systems:
                self.quiet()
                m = OwnMeter()
                recs = offline.sequential(model, reqs, opt.phase_max_s, self.log)
                self.reference = recs
                self.phase("generate", "closed", recs, m.stop())
            if "static" in opt.systems:
                self.quiet()
                m = OwnMeter()
                recs = offline.static(model, self.tok, reqs, opt.static_size, opt.phase_max_s, self.log)
                self.phase(f"static-{opt.static_size}", "closed", recs, m.stop(), {"batch_size": opt.static_size})

            mgr = None
            if "manager" in opt.systems:
                sizes = offline.manager_sizes(reqs, opt.max_seqs, opt.max_batch_tokens, opt.page_size)
                mgr = offline.make_manager(model, sizes, opt.prefix_sharing)
                resolved = offline.manager_resolved(mgr)
                self.run.emit({"kind": "manager_config", **resolved})
                offline.manager_warmup(mgr, self.tok)
                self.quiet()
                m = OwnMeter()
                recs = offline.manager_run(mgr, reqs, None, "closed", opt.phase_max_s)
                self.phase("manager", "closed", recs, m.stop(), {"sizes": resolved})
            if batchd_url:
                self.client_ceiling(reqs)
                self.batchd_phase(batchd_url, server, reqs, None, "closed")

            if opt.open_loop and (mgr is not None or batchd_url):
                rate = opt.rate or self.open_rate()
                if rate:
                    arrivals = metrics.poisson_arrivals(n, rate, opt.seed, opt.phase_max_s)
                    self.run.emit({"kind": "open_loop", "rate": rate, "requests": len(arrivals),
                                   "span_s": round(arrivals[-1], 2) if arrivals else 0,
                                   "how": "given" if opt.rate else f"{opt.open_fraction} x best closed-loop req/s"})
                    self.log(f"open loop: {len(arrivals)} Poisson arrivals at {rate:.3f} req/s")
                    if mgr is not None:
                        self.quiet()
                        m = OwnMeter()
                        recs = offline.manager_run(mgr, reqs, arrivals, "open", opt.phase_max_s)
                        self.phase("manager", "open", recs, m.stop(), {"rate": rate})
                    if batchd_url:
                        self.batchd_phase(batchd_url, server, reqs, arrivals, "open", {"rate": rate})
            if mgr is not None:
                probe = offline.cancel_probe(mgr, reqs)
                self.run.emit({"kind": "cancel_probe", **probe})
                self.log(f"manager cancel probe: {probe}")
                mgr.stop(block=True, timeout=30)
        finally:
            if server is not None:
                server.close()

        if "generate" in opt.systems and self.reference:
            self.dtype_pass(model, reqs)
        from .report import write_summary

        write_summary(self.run, self.run.records)
        return self.run

    # ---- batchd ------------------------------------------------------------------------------------
    def start_batchd(self):
        from batchd.testing import ServerProcess

        # serve only the generation model of the config ([[models]] entry named model_id), in the run's dtype
        overrides = list(self.opt.overrides)
        if not any(o.split("=")[0].endswith(".dtype") for o in overrides):
            overrides.append(f"models.{self.opt.model_id}.dtype={self.opt.dtype}")
        if not any(o.startswith("server.request_timeout_s=") for o in overrides):
            # a closed-loop burst on a busy 2-core machine can keep a 128-token request longer than 30 s
            overrides.append(f"server.request_timeout_s={self.opt.phase_max_s:g}")
        self.log(f"starting batchd --config {self.opt.config} --model {self.opt.model_id} "
                 + " ".join(f"--set {o}" for o in overrides))
        server = ServerProcess.batchd(overrides, config=self.opt.config, log_level="error",
                                      models=[self.opt.model_id])
        try:
            server.wait_ready(180)
        except RuntimeError as exc:
            self.run.emit({"kind": "batchd_skipped", "reason": str(exc)[-1500:]})
            self.log(f"batchd skipped: {str(exc)[-300:]}")
            server.close()
            return None
        self.run.emit({"kind": "batchd_started", "overrides": overrides, "rss": server.rss_mb()})
        return server

    def probe_batchd(self, url: str, req) -> str | None:
        """One short streamed request; None (batchd skipped) unless it streams content."""
        from .client import run as client_run

        body = req.body(self.opt.model_id)
        body["max_tokens"] = body["min_tokens"] = 4
        out = asyncio.run(client_run({"url": url, "requests": [{"i": 0, "body": body, "max_tokens": 4}],
                                      "max_s": 60, "drain_s": 60}))
        rec = out["records"][0]
        self.run.emit({"kind": "batchd_probe", "record": rec})
        if rec.get("error"):
            self.log(f"batchd skipped: the probe request failed: {rec['error'][:300]}")
            return None
        if rec.get("contract"):
            self.log(f"batchd stream deviates from the OpenAI format: {rec['contract']}")
        if rec.get("prompt_tokens") not in (None, req.prompt_tokens):
            self.log(f"note: batchd counts {rec['prompt_tokens']} prompt tokens, the workload's template "
                     f"{req.prompt_tokens}: the server templates the chat differently")
        return url

    def client_ceiling(self, reqs) -> None:
        """The client against the canned SSE server (no model, no delay): chunks/s it can read."""
        import sys

        from batchd.testing import ServerProcess

        fake = ServerProcess("fake-sse", lambda fd: [sys.executable, "-m", "benchmarks.generation.fakeserver",
                                                     str(fd), "0", "0"])
        try:
            fake.wait_ready(60)
            out = self.client(fake.url, reqs, None)
            s = metrics.summarise(out["records"])
            self.run.emit({"kind": "client_ceiling", "tokens_s": s.get("tokens_s"), "errors": s["errors"],
                           "client_cpu": out["client_cpu"]})
            self.log(f"client ceiling (client + canned SSE server, no model): {_f(s.get('tokens_s'), 0)} chunks/s, "
                     f"client cpu {out['client_cpu']}")
        finally:
            fake.close()

    def client(self, url: str, reqs, arrivals) -> dict:
        spec = {"url": url, "requests": [{"i": r.i, "body": r.body(self.opt.model_id), "max_tokens": r.max_tokens}
                                         for r in reqs],
                "arrivals": arrivals, "max_s": self.opt.phase_max_s, "drain_s": 120.0,
                "cpus": self.run.layout.client, "api_key": os.environ.get("BATCHD_API_KEY", "")}
        return self.run._subprocess_json("benchmarks.generation.client", spec,
                                         timeout=self.opt.phase_max_s + 300)

    def batchd_phase(self, url: str, server, reqs, arrivals, mode: str, extra: dict | None = None) -> None:
        self.quiet()
        if server is not None:
            server.reset_stats()
        meter = CpuMeter(server.proc.pid) if server is not None else None
        busy0 = _busy_s()
        t = time.monotonic()
        out = self.client(url, reqs, arrivals)
        wall = time.monotonic() - t
        if meter:
            cpu = meter.stop(out["client_cpu"] * wall)
        else:  # a server we did not start: only what the whole machine used is known
            cpu = {"machine_cpu": round((_busy_s() - busy0) / wall, 2)}
        stats = server.stats() if server is not None else {}
        contract = sorted({c for r in out["records"] for c in r.get("contract", [])})
        self.phase("batchd", mode, out["records"], {**cpu, "client_cpu": out["client_cpu"]},
                   {**(extra or {}), "server_stats": stats, "contract": contract,
                    "chunks_per_token": _ratio(sum(r.get("content_chunks", 0) for r in out["records"]),
                                               sum(r["tokens"] for r in out["records"]))})
        if contract:
            self.log(f"batchd stream deviations: {contract}")

    def open_rate(self) -> float | None:
        closed = [self.phases.get((s, "closed"), {}).get("req_s") for s in ("manager", "batchd")]
        closed = [c for c in closed if c]
        return self.opt.open_fraction * max(closed) if closed else None

    # ---- dtype pass --------------------------------------------------------------------------------
    def dtype_pass(self, model, reqs) -> None:
        """generate() in the other dtype on the first n requests, each request run in both dtypes back
        to back (interleaved, so the speed ratio is read side by side); greedy outputs compared with
        the run's own generate() records."""
        other = "bfloat16" if self.opt.dtype == "float32" else "float32"
        n = self.opt.dtype_pass_n or (6 if self.opt.quick else 12)
        subset = reqs[:n]
        self.log(f"dtype pass: generate() in {other} and {self.opt.dtype}, interleaved, on the first {n} requests")
        _, other_model = workload.load_model(other)
        offline.warmup(other_model, self.tok)
        self.quiet()
        m = OwnMeter()
        recs, same = [], []
        t_end = time.monotonic() + self.opt.phase_max_s
        for r in subset:
            if time.monotonic() > t_end:
                break
            same += offline.sequential(model, [r])
            recs += offline.sequential(other_model, [r])
        meter = m.stop()
        agree = offline.agreement(self.reference, recs, self.tok)
        this_s, ref_s = _service_tokens_s(recs), _service_tokens_s(same)
        rec = self.run.emit({"kind": "dtype_pass", "dtype": other, "reference_dtype": self.opt.dtype, "requests": n,
                             "differ": agree["differ"], "compared": agree["compared"], "agreement": agree,
                             "tokens_s": this_s, "reference_tokens_s": ref_s,
                             "speed_ratio": _ratio(this_s, ref_s), **meter})
        self.log(f"dtype pass: {rec['differ']}/{rec['compared']} greedy outputs differ between {other} and "
                 f"{self.opt.dtype}; generate() {_f(this_s)} vs {_f(ref_s)} tok/s, side by side")


def _service_tokens_s(recs: list[dict]) -> float | None:
    """Tokens per second of generate() service time (start of its call to its last token)."""
    ok = [r for r in recs if r.get("times") and not r.get("error")]
    busy = sum(r["times"][-1] - r["start"] for r in ok)
    return sum(r["tokens"] for r in ok) / busy if busy > 0 else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def run_generation(opt: Options) -> Run:
    return GenRun(opt).execute()


def results_root() -> Path:
    return RESULTS
