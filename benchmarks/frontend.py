"""The front end past one core (issue 11), side by side in one run:

  fake accelerator: the bare Starlette route, batchd with 1 worker and with 2 workers, the fake
                    backend sleeping `fake_batch_ms` a batch (an accelerator: no CPU), one text per
                    request, closed loop at c=256; interleaved rounds, best of each
  real model:       batchd workers=1 and workers=2 at c=128, and workers=2 at c=1024 (RSS of every process);
                    interleaved rounds, best of each
  CPU per request:  server CPU / request (all processes), and its parts measured in-process: JSON
                    decode, tokenize, engine (admission, queue, scheduler, futures: the 0-ms fake
                    engine driven without HTTP), encode; HTTP + framework is the rest

    python -m benchmarks.frontend [--seconds 4] [--rounds 2] [--skip-real]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from batchd.server import run_loop
from batchd.testing import descendants

from . import servers, workload
from .harness import RESULTS, CpuLayout, Run, wait_idle

FAKE_BATCH_MS = 3.0


def fake_accelerator(run: Run, bodies: Path, seconds: float, rounds: int, concurrency: int = 256,
                     before: str | None = None) -> dict:
    """`before`: the root of another checkout of batchd (e.g. `git archive` of an older commit),
    served as "batchd-before" in the same rounds, for before/after figures."""
    fake = ["model.backend=fake", f"model.fake_batch_ms={FAKE_BATCH_MS}"]
    starting = [servers.bare(run.layout.server),
                *([_other_checkout(before, fake + run.layout.overrides, run.layout.server)] if before else []),
                servers.batchd(fake + run.layout.overrides, cpus=run.layout.server, name="batchd-w1"),
                servers.batchd(fake + run.layout.overrides + ["server.workers=2"], cpus=run.layout.server,
                               name="batchd-w2")]
    best: dict[str, dict] = {}
    with servers.running(*starting) as procs:
        for rnd in range(rounds):
            for srv in procs:
                if srv.name != "bare":
                    wait_idle(srv)
                r = run.load(srv, bodies, concurrency=concurrency, duration_s=seconds, warmup_s=0.5)
                r["cpu_us_per_request"] = r["server_cpu"] * 1e6 / r["req_s"] if r["req_s"] else None
                run.emit({"kind": "frontend_fake", "server": srv.name, "concurrency": concurrency, "round": rnd, **r})
                run.log(f"fake accelerator {srv.name:10s} c={concurrency} round {rnd}: {r['req_s']:6.0f} req/s "
                        f"p50 {r['p50_ms']:.1f} ms err {r['errors']} srv cpu {r['server_cpu']:.2f} "
                        f"({r['cpu_us_per_request']:.0f} us/req) foreign {r['foreign_cpu']:.2f}")
                if srv.name not in best or r["req_s"] > best[srv.name]["req_s"]:
                    best[srv.name] = r
    out = {"kind": "frontend_fake_summary", "concurrency": concurrency,
           **{f"{k}_req_s": v["req_s"] for k, v in best.items()},
           "w1_vs_bare": best["batchd-w1"]["req_s"] / best["bare"]["req_s"],
           **({"before_vs_bare": best["batchd-before"]["req_s"] / best["bare"]["req_s"]} if before else {}),
           "w2_vs_w1": best["batchd-w2"]["req_s"] / best["batchd-w1"]["req_s"],
           "cpu_us_per_request": {k: v["cpu_us_per_request"] for k, v in best.items()}}
    run.emit(out)
    return out


def _other_checkout(root: str, overrides: list[str], cpus) -> servers.ServerProcess:
    import sys

    boot = f"import sys; sys.path.insert(0, {root!r}); from batchd.cli import main; sys.exit(main())"

    def argv(fd: int) -> list[str]:
        cmd = [sys.executable, "-c", boot, "serve", "--bind", f"fd://{fd}", "--log-level", "error",
               "--config", str(Path(root) / "config.toml"), "--model", "all-MiniLM-L6-v2"]
        return cmd + [x for item in overrides for x in ("--set", item)]
    return servers.ServerProcess("batchd-before", argv, cpus)


def real_model(run: Run, bodies: Path, config: str, seconds: float, rounds: int = 2) -> dict:
    """workers=1 and workers=2 both started (one loaded model idles while the other is measured),
    measured in interleaved rounds, best of each: one reading per server moved ~10% between runs."""
    points: dict[tuple[int, int], float] = {}
    starting = [servers.batchd(run.layout.overrides + [f"server.workers={w}"], config, run.layout.server,
                               name=f"batchd-w{w}") for w in (1, 2)]
    with servers.running(*starting) as procs:
        for rnd in range(rounds):
            for workers, srv in zip((1, 2), procs):
                for c in ((128, 1024) if workers == 2 and rnd == rounds - 1 else (128,)):
                    # at c=1024 a request takes ~10 s here: a window shorter than a few latencies
                    # counts a phase of the closed loop, not its rate (5 s windows read 50-130 texts/s)
                    long = c > 128
                    wait_idle(srv)
                    srv.reset_stats()
                    r = run.load(srv, bodies, concurrency=c, duration_s=max(seconds, 30.0) if long else seconds,
                                 warmup_s=12.0 if long else 1.0)
                    rss = _tree_rss_mb(srv.proc.pid)
                    stats = srv.stats()
                    run.emit({"kind": "frontend_real", "workers": workers, "concurrency": c, **r, "rss_mb": rss,
                              "mean_batch_size": stats.get("mean_batch_size")})
                    run.log(f"real model workers={workers} c={c}: {r['texts_s']:6.1f} texts/s p50 {r['p50_ms']:.0f} ms "
                            f"err {r['errors']} batch {stats.get('mean_batch_size', 0):.1f} srv cpu "
                            f"{r['server_cpu']:.2f} rss {rss:.0f} MB foreign {r['foreign_cpu']:.2f}")
                    points[(workers, c)] = max(points.get((workers, c), 0.0), r["texts_s"])
    out = {"kind": "frontend_real_summary", "w1_c128": points[(1, 128)], "w2_c128": points[(2, 128)],
           "w2_c1024": points[(2, 1024)], "w2_vs_w1_c128": points[(2, 128)] / points[(1, 128)],
           "c1024_vs_c128_w2": points[(2, 1024)] / points[(2, 128)]}
    run.emit(out)
    return out


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a server and every process below it (front ends, engine)."""
    total = 0.0
    for p in (pid, *descendants(pid)):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def cpu_parts(texts: list[str], config: str, real: bool, n: int = 3000) -> dict:
    """Microseconds per one-text request of each in-process part (one core, this process)."""
    import msgspec
    import numpy as np
    import orjson

    from batchd.api.schemas import EmbeddingRequest
    from batchd.backends import make_backend
    from batchd.config import load_config
    from batchd.engine import make_engine

    overrides = [] if real else ["model.backend=fake"]
    cfg = load_config(str(servers.ROOT / config), overrides)
    model = cfg.model
    texts = (texts * (n // max(1, len(texts)) + 1))[:n]
    bodies = [json.dumps({"input": t, "model": model.name}).encode() for t in texts]
    decoder = msgspec.json.Decoder(EmbeddingRequest)
    backend = make_backend(model)  # the tokenizer only: nothing is loaded
    dim = getattr(backend, "dim", 32)
    vector = np.random.default_rng(0).standard_normal(dim).astype(np.float32)

    def per_call(fn, items) -> float:
        t = time.process_time()
        for item in items:
            fn(item)
        return (time.process_time() - t) * 1e6 / len(items)

    decode = per_call(decoder.decode, bodies)
    tokenize = per_call(lambda t: backend.tokenize([t], True), texts)
    payload = lambda _: orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": 0,  # noqa: E731
                                      "embedding": vector}], "model": model.name,
                                      "usage": {"prompt_tokens": 10, "total_tokens": 10}},
                                     option=orjson.OPT_SERIALIZE_NUMPY)
    encode = per_call(payload, texts)

    async def engine_cost() -> float:
        fake = load_config(str(servers.ROOT / config), ["model.backend=fake"])
        engine = make_engine(fake)
        await engine.start()
        ids = engine.backend.tokenize(["a few words of text here"], True)
        deadline = time.monotonic() + 600

        async def client(k: int) -> None:  # 256 clients in flight, as the HTTP runs (one task each:
            for _ in range(k):  # a semaphore over n tasks would cost more than the engine itself)
                await engine.embed(ids, deadline)
        per_client = max(1, n // 256)
        t = time.process_time()
        await asyncio.gather(*(client(per_client) for _ in range(256)))
        cost = (time.process_time() - t) * 1e6 / (per_client * 256)
        await engine.close()
        return cost

    engine = run_loop(engine_cost())
    return {"decode_us": decode, "tokenize_us": tokenize, "engine_us": engine, "encode_us": encode}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config.toml")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--layout", default="shared")
    ap.add_argument("--before", default=None, help="root of an older batchd checkout, served beside (fake case)")
    args = ap.parse_args(argv)
    run = Run("frontend", CpuLayout(args.layout))
    from batchd.config import load_config

    cfg = load_config(str(servers.ROOT / args.config))
    works = workload.build(cfg.model.max_length, 4000, cache_dir=RESULTS)
    bodies = run.bodies(works["real"], 1, cfg.model.name)
    summary = {"fake": fake_accelerator(run, bodies, args.seconds, args.rounds, before=args.before)}
    parts = cpu_parts(works["real"].texts[:500], args.config, real=False)
    summary["cpu_parts_fake_us"] = parts
    run.emit({"kind": "frontend_cpu_parts", "backend": "fake", **parts})
    run.log("per-request CPU parts (fake tokenizer): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    parts = cpu_parts(works["real"].texts[:500], args.config, real=True)
    summary["cpu_parts_real_us"] = parts
    run.emit({"kind": "frontend_cpu_parts", "backend": "real", **parts})
    run.log("per-request CPU parts (real tokenizer): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    if not args.skip_real:
        summary["real"] = real_model(run, bodies, args.config, args.seconds, args.rounds)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
