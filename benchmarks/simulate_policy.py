"""Replay the real batching policy against a cost model, noise-free: how close does it get to the
offline ceiling for a length mix, a bucket set and a merge budget?

This is how batchd's defaults were chosen (fine lanes, merge budget = 0.5 x overhead/per-token):
the machine this project runs on is shared and noisy, a simulation of the same `plan_batch` code is
not. A closed loop of `c` clients; the model takes `overhead + per_token x padded tokens` per batch.

    python -m benchmarks.simulate_policy                      # CPU-like costs (MiniLM on 2 cores)
    python -m benchmarks.simulate_policy --overhead-ms 5 --per-token-us 10   # GPU-like costs
"""
from __future__ import annotations

import argparse
import asyncio
import math
import random
from typing import Sequence

from batchd.config import BatchingConfig
from batchd.estimators import MERGE_FACTOR
from batchd.policy import Dispatch, PolicyParams, bucket_of, plan_batch
from batchd.queue import RequestQueue
from batchd.types import Pending

COARSE = [16, 24, 32, 48, 64, 96, 128, 192, 256]
VERY_FINE = [*range(4, 64, 2), *range(64, 128, 4), *range(128, 257, 8)]


def ceiling(lengths: Sequence[int], overhead: float, per_token: float, size: int, budget: int) -> float:
    """Texts/s of sorted, budgeted batches: what the model can do with every input known up front."""
    ordered, seconds, i = sorted(lengths), 0.0, 0
    while i < len(ordered):
        k = 1
        while i + k < len(ordered) and k < size and (k + 1) * ordered[i + k] <= budget:
            k += 1
        seconds += overhead + per_token * k * ordered[i + k - 1]
        i += k
    return len(ordered) / seconds


def closed_loop(lengths: Sequence[int], buckets: list[int], merge_tokens: float, clients: int,
                overhead: float, per_token: float, params: PolicyParams, sim_s: float = 30.0,
                seed: int = 0) -> tuple[float, float, float]:
    """(texts/s, padding ratio, mean batch size) with `clients` always waiting on one answer each."""
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()  # Pending wants a future; nothing awaits it here
    queue = RequestQueue(buckets)

    def arrive(now: float) -> None:
        n = rng.choice(lengths)
        queue.push(Pending([0] * n, bucket_of(n, buckets), now, math.inf, loop.create_future()))  # type: ignore[arg-type]

    try:
        for _ in range(clients):
            arrive(0.0)
        now, done, batches, real, padded = 0.0, 0, 0, 0, 0
        while now < sim_s:
            # a saturated closed loop: the worker is idle exactly when a batch is planned
            decision = plan_batch(queue.views(), now + params.max_wait_s, params, 0, math.inf, 0.0, merge_tokens)
            assert isinstance(decision, Dispatch)
            batch = queue.take(decision.takes)
            width = max(p.n_tokens for p in batch)
            now += overhead + per_token * len(batch) * width
            done, batches = done + len(batch), batches + 1
            real += sum(p.n_tokens for p in batch)
            padded += len(batch) * width
            for _ in batch:
                arrive(now)
        return done / now, 1 - real / padded, done / batches
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mix", default="real", help="workload mix (real, short, long, bimodal)")
    parser.add_argument("--overhead-ms", type=float, default=8.0, help="fixed model time per batch")
    parser.add_argument("--per-token-us", type=float, default=170.0, help="model time per padded token")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128, 512])
    args = parser.parse_args()

    from benchmarks.workload import build
    from pathlib import Path

    lengths = build(cache_dir=Path(__file__).parent / "results")[args.mix].tokens
    overhead, per_token = args.overhead_ms / 1e3, args.per_token_us / 1e6
    defaults = BatchingConfig()
    params = PolicyParams(defaults.max_batch_size, defaults.max_batch_tokens, defaults.max_wait_ms / 1e3, 1, False)
    top = ceiling(lengths, overhead, per_token, params.max_batch_size, params.max_batch_tokens)
    print(f"mix={args.mix} overhead={args.overhead_ms} ms per_token={args.per_token_us} us: "
          f"offline ceiling {top:.1f} texts/s")
    print("cells: throughput / ceiling, padding ratio, mean batch size")
    for name, buckets in [("coarse", COARSE), ("default", list(defaults.buckets)), ("very fine", VERY_FINE)]:
        for factor in (0.0, 0.25, MERGE_FACTOR, 1.0):
            cells = []
            for clients in args.concurrency:
                rate, padding, size = closed_loop(lengths, buckets, factor * overhead / per_token, clients,
                                                  overhead, per_token, params)
                cells.append(f"c={clients}: {rate / top:.3f} {padding:.2f} {size:4.1f}")
            print(f"{name:>9} lanes, merge {factor:.2f}x  " + "   ".join(cells))


if __name__ == "__main__":
    main()
