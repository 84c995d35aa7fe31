"""The offline ceiling: a worker process (`python -m benchmarks.ceiling SPEC.json`) that loads the model
once and answers measurement commands (JSON lines on stdin/stdout), so the harness can take a ceiling
reading right next to each server reading: on a shared, noisy machine only neighbours compare.

The same backend class and config the server uses (`EmbedBackend(config.model)`, overrides such as
model.dtype applied), fed directly: no HTTP, no queue, no tokenizing in the timed part. The texts are
tokenized up front, sorted by length and cut into batches of at most `max_batch_size` inputs and
`max_batch_tokens` padded tokens (the server's own limits). Sorting makes padding nearly zero, so
this is the best the model does on this machine with these limits.

Commands:  {"cmd": "mix", "name", "texts"?, "duration_s"}  -> texts/s, tokens/s over time-bounded batches
           {"cmd": "batch1", "texts", "duration_s"}        -> p50 of batch-1 forwards per text
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _spread_order(n: int) -> list[int]:
    """0..n-1 in van der Corput order: 0, n/2, n/4, 3n/4, ... (each index once)."""
    order, seen, k = [], set(), 0
    while len(order) < n:
        x, denom, j = 0.0, 1.0, k
        while j:
            denom *= 2
            x += (j & 1) / denom
            j >>= 1
        i = int(x * n)
        if i not in seen:
            seen.add(i)
            order.append(i)
        k += 1
    return order


def sorted_batches(ids: list[np.ndarray], max_size: int, max_tokens: int) -> list[list[np.ndarray]]:
    ordered = sorted(ids, key=len)
    batches, cur = [], []
    for x in ordered:
        # padded cost if x joins: (n+1) * len(x), since x is the longest so far
        if cur and (len(cur) + 1 > max_size or (len(cur) + 1) * len(x) > max_tokens):
            batches.append(cur)
            cur = []
        cur.append(x)
    if cur:
        batches.append(cur)
    return batches


class Ceiling:
    def __init__(self, spec: dict) -> None:
        if spec.get("cpus"):
            os.sched_setaffinity(0, spec["cpus"])
        from batchd.backends.embed import EmbedBackend
        from batchd.config import load_config

        self.cfg = load_config(spec["config"], spec.get("overrides", []))
        self.backend = EmbedBackend(self.cfg.model)
        t = time.perf_counter()
        self.backend.load()
        import torch

        self.info = {"load_s": time.perf_counter() - t, "dtype": self.cfg.model.dtype,
                     "torch_threads": torch.get_num_threads(), "max_batch_size": self.cfg.batching.max_batch_size,
                     "max_batch_tokens": self.cfg.batching.max_batch_tokens}
        self.ids: dict[str, list] = {}
        self.batches: dict[tuple[str, int, int], list] = {}

    def mix(self, name: str, texts: list[str] | None, duration_s: float, max_batch_tokens: int | None = None,
            max_batch_size: int | None = None) -> dict:
        """max_batch_tokens: the budget the server under test really uses (it may calibrate its own).
        max_batch_size: smaller batches than the config allows (the ceiling at batchd's own batch size)."""
        if texts is not None:
            self.ids[name] = self.backend.tokenize(texts, True)
        budget = max_batch_tokens or self.cfg.batching.max_batch_tokens or 8192
        size = max_batch_size or self.cfg.batching.max_batch_size
        if (name, budget, size) not in self.batches:
            self.batches[(name, budget, size)] = sorted_batches(self.ids[name], size, budget)
        batches = self.batches[(name, budget, size)]
        # Short batches run many more texts/s than long ones, so a time-bounded run must sample all
        # lengths evenly: visit the length-sorted batches in van der Corput order (every prefix is
        # spread evenly over the sorted list) and scale the sampled time up to one full pass.
        order = _spread_order(len(batches))
        self.backend.embed(batches[order[0]])  # warm
        elapsed, runs = 0.0, 0
        t0 = time.perf_counter()
        while runs < 100 * len(batches) and (runs < min(len(batches), 8) or time.perf_counter() - t0 < duration_s):
            i = order[runs % len(order)]
            t = time.perf_counter()
            self.backend.embed(batches[i])
            elapsed += time.perf_counter() - t
            runs += 1
        pass_s = elapsed * len(batches) / runs  # estimated time of one full pass over all batches
        texts = sum(len(b) for b in batches)
        tokens = sum(len(x) for b in batches for x in b)
        padded = sum(len(b) * max(len(x) for x in b) for b in batches)
        return {"texts_s": texts / pass_s, "tokens_s": tokens / pass_s, "padding_ratio": 1 - tokens / padded,
                "max_batch_tokens": budget, "max_batch_size": size, "batches_run": runs,
                "batches": len(batches), "full_passes": runs / len(batches),
                "mean_batch_size": texts / len(batches), "seconds": time.perf_counter() - t0}

    def batch1(self, texts: list[str], duration_s: float) -> dict:
        out = {}
        for text in texts:
            ids = self.backend.tokenize([text], True)
            for _ in range(3):
                self.backend.embed(ids)
            times = []
            stop_at = time.perf_counter() + duration_s
            while time.perf_counter() < stop_at and len(times) < 2000:
                t = time.perf_counter()
                self.backend.embed(ids)
                times.append(time.perf_counter() - t)
            out[str(len(ids[0]))] = {"p50_ms": float(np.median(times)) * 1e3, "n": len(times)}
        return out


def main() -> None:
    ceiling = Ceiling(json.loads(open(sys.argv[1]).read()))
    print(json.dumps({"ready": True, **ceiling.info}), flush=True)
    for line in sys.stdin:  # ends when the harness closes stdin
        cmd = json.loads(line)
        if cmd["cmd"] == "mix":
            out = ceiling.mix(cmd["name"], cmd.get("texts"), cmd["duration_s"], cmd.get("max_batch_tokens"),
                              cmd.get("max_batch_size"))
        elif cmd["cmd"] == "batch1":
            out = {"batch1": ceiling.batch1(cmd["texts"], cmd["duration_s"])}
        else:
            break
        print(json.dumps({**ceiling.info, **out}), flush=True)


if __name__ == "__main__":
    main()
