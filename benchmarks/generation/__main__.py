"""python -m benchmarks.generation [run] [--quick] [--dtype float32|bfloat16] [--out DIR] ... | selftest"""
from __future__ import annotations

import argparse
import sys
import time


def selftest(n: int = 16) -> int:
    """The streaming client against the canned SSE server: TTFT / ITL / token counts must come out as
    the server paces them (50 ms, 20 ms), the stream must match the contract, open loop must honour
    arrival times; then the client's ceiling with no delays. No model, ~15 s."""
    import asyncio

    from batchd.testing import ServerProcess

    from ..harness import _busy_s
    from . import metrics, workload
    from .client import run as client_run

    reqs = workload.build(n)
    spec_reqs = [{"i": r.i, "body": r.body(), "max_tokens": r.max_tokens} for r in reqs]
    failures: list[str] = []
    noisy: list[str] = []
    for ttft, itl in ((50, 20), (0, 0)):
        fake = ServerProcess("fake-sse", lambda fd, ttft=ttft, itl=itl: [
            sys.executable, "-m", "benchmarks.generation.fakeserver", str(fd), str(ttft), str(itl)])
        try:
            fake.wait_ready(60)
            for arrivals in (None, metrics.poisson_arrivals(n, 4.0, 1, 60)) if ttft else (None,):
                busy0, t = _busy_s(), time.monotonic()
                out = asyncio.run(client_run({"url": fake.url, "requests": spec_reqs, "arrivals": arrivals,
                                              "max_s": 60, "drain_s": 30}))
                # cores busy on the whole machine; client + canned server use ~0.2-0.4 of one at 50/20 ms
                machine = (_busy_s() - busy0) / (time.monotonic() - t)
                s = metrics.summarise(out["records"])
                mode = "closed" if arrivals is None else "open 4/s"
                print(f"fake {ttft}/{itl} ms, {mode}: {s['ok']}/{s['requests']} ok, {s['tokens']} tokens, "
                      f"{s['tokens_s']:.0f} tok/s, TTFT p50/p99 {s['ttft_p50_ms']:.1f}/{s['ttft_p99_ms']:.1f} ms, "
                      f"ITL p50/p99 {s['itl_p50_ms']:.1f}/{s['itl_p99_ms']:.1f} ms, client cpu {out['client_cpu']}, "
                      f"machine cpu {machine:.2f}")
                bad = [r for r in out["records"] if r.get("error") or r.get("contract") or r["tokens"] !=
                       reqs[r["i"]].max_tokens or r["content_chunks"] != r["tokens"]]
                if bad:
                    failures.append(f"{mode}: {bad[0]}")
                timing = []
                if ttft and not (ttft - 5 <= s["ttft_p50_ms"] <= ttft + 60 and itl - 5 <= s["itl_p50_ms"] <= itl + 15):
                    timing.append(f"{mode}: timing off: TTFT p50 {s['ttft_p50_ms']:.0f} ms (paced {ttft}), "
                                  f"ITL p50 {s['itl_p50_ms']:.1f} ms (paced {itl})")
                if arrivals is not None:
                    late = max(r["sent"] - r["arrival"] for r in out["records"])
                    if late > 0.05:
                        timing.append(f"{mode}: a request was sent {late * 1e3:.0f} ms after its arrival time")
                if machine > 1.2 and timing:  # other jobs starve the client's event loop: not the client's fault
                    noisy += [f"{t} (not judged: the machine was busy, {machine:.2f} cores)" for t in timing]
                else:
                    failures += timing
        finally:
            fake.close()
    for line in noisy:
        print(f"note: {line}")
    print("selftest " + ("FAILED:\n  " + "\n  ".join(failures) if failures else "passed"))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    from .run import Options

    d = Options()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation",
                                     description="generation benchmark: generate(), static batches, "
                                                 "ContinuousBatchingManager and batchd, one run")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run", help="the benchmark (default)")
    sub.add_parser("selftest", help="the streaming client against a canned SSE server (no model)")
    for q in (parser, p):
        q.add_argument("--quick", action="store_true", help="16 requests instead of 32")
        q.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype)
        q.add_argument("--out", default=None, help="results folder (default benchmarks/results/generation-*)")
        q.add_argument("--requests", type=int, default=None, help="workload size (overrides --quick)")
        q.add_argument("--only", default=",".join(d.systems),
                       help="comma-separated subset of generate,static,manager,batchd")
        q.add_argument("--no-open", action="store_true", help="skip the open-loop phases")
        q.add_argument("--url", default=None, help="use an already running batchd (e.g. http://127.0.0.1:8000)")
        q.add_argument("--config", default=d.config, help="batchd config (relative to the repo)")
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="batchd config override, e.g. models.SmolLM2-135M-Instruct.KEY=VALUE "
                            "(its dtype follows --dtype unless set here)")
        q.add_argument("--model-id", default=d.model_id)
        q.add_argument("--static-size", type=int, default=d.static_size)
        q.add_argument("--max-seqs", type=int, default=d.max_seqs, help="manager: max_requests_per_batch")
        q.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens, help="manager: tokens per forward")
        q.add_argument("--page-size", type=int, default=d.page_size, help="manager: KV page size (tokens)")
        q.add_argument("--prefix-sharing", action="store_true", help="manager: allow KV block sharing")
        q.add_argument("--open-fraction", type=float, default=d.open_fraction,
                       help="open-loop rate as a fraction of the best closed-loop req/s (manager, batchd)")
        q.add_argument("--rate", type=float, default=None, help="open-loop rate in req/s (overrides the fraction)")
        q.add_argument("--dtype-pass-n", type=int, default=None,
                       help="requests in the other-dtype greedy comparison (default 6 quick / 12)")
        q.add_argument("--phase-max-s", type=float, default=d.phase_max_s, help="time bound of each phase")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    t = time.monotonic()
    if args.command == "selftest":
        return selftest()
    from .run import run_generation

    systems = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(systems) - set(d.systems)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}")
    opt = Options(quick=args.quick, dtype=args.dtype, out=args.out, requests=args.requests, systems=systems,
                  open_loop=not args.no_open, url=args.url, config=args.config, overrides=args.overrides,
                  model_id=args.model_id, static_size=args.static_size, max_seqs=args.max_seqs,
                  max_batch_tokens=args.max_batch_tokens, page_size=args.page_size,
                  prefix_sharing=args.prefix_sharing, open_fraction=args.open_fraction, rate=args.rate,
                  dtype_pass_n=args.dtype_pass_n, phase_max_s=args.phase_max_s)
    run_generation(opt)
    print(f"generation benchmark finished in {time.monotonic() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
