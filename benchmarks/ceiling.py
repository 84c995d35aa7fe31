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
import random
import sys
import time

import numpy as np


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
            batches = sorted_batches(self.ids[name], size, budget)
            # random batch order: any prefix is a fair sample of all lengths, so time can bound the run
            random.Random(7).shuffle(batches)
            self.batches[(name, budget, size)] = batches
        batches = self.batches[(name, budget, size)]
        self.backend.embed(batches[0])  # warm
        texts_done = tokens = padded = 0
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < duration_s and i < 100 * len(batches):
            batch = batches[i % len(batches)]
            _, p = self.backend.embed(batch)
            texts_done += len(batch)
            tokens += sum(len(x) for x in batch)
            padded += p
            i += 1
        dt = time.perf_counter() - t0
        n_all = sum(len(b) for b in batches)
        return {"texts_s": texts_done / dt, "tokens_s": tokens / dt, "padding_ratio": 1 - tokens / padded,
                "max_batch_tokens": budget, "max_batch_size": size,
                "batches_run": i, "mean_batch_size": n_all / len(batches), "seconds": dt}

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
