"""What the slot KV layout saves: a batch-shaped cache (transformers' DynamicCache, one [batch, heads,
length, dim] tensor per layer) must be rebuilt whenever a sequence joins or leaves the running batch,
copying every running sequence's cache; batchd's slots copy nothing then. Measured side by side in one
run on the real model: a decode step of B running sequences, and the rebuild a join or leave costs.

    python -m benchmarks.kv_layout [--batch 16] [--length 256] [--dtype float32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch

from batchd.backends.generate import GenerateBackend, Sampling, ThreadStep
from batchd.config import load_config
from batchd.testing import ROOT


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=256, help="tokens already in each sequence's cache")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    config = load_config(ROOT / "config.toml", [f"models.SmolLM2-135M-Instruct.dtype={args.dtype}",
                                                "models.SmolLM2-135M-Instruct.device=cpu",
                                                f"models.SmolLM2-135M-Instruct.generation.max_running_seqs={args.batch}"])
    model = next(m for m in config.models if m.kind == "generate")
    backend = GenerateBackend(model)
    backend.load()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 10000, size=args.length) for _ in range(args.batch)]
    backend.step(ThreadStep(admit=[(i, Sampling()) for i in range(args.batch)],
                            prefill=[(i, p, 0, True, True) for i, p in enumerate(prompts)]))
    decode = ThreadStep(decode=[(i, 1000, args.length, True) for i in range(args.batch)])
    step_s = _timed(lambda: backend.step(decode), args.repeats)

    slots = torch.arange(args.batch)

    def rebuild_batch_cache() -> None:
        """What a join or leave costs a batch-shaped cache: every layer's K and V for all running
        sequences copied into new [batch, heads, length, dim] tensors."""
        for k, v in zip(backend.k_cache, backend.v_cache):
            k[:, :, :args.length].index_select(0, slots).contiguous()
            v[:, :, :args.length].index_select(0, slots).contiguous()

    rebuild_s = _timed(rebuild_batch_cache, args.repeats)
    cache_mb = backend.kv_bytes / 2**20
    result = {
        "batch": args.batch, "length": args.length, "dtype": args.dtype, "kv_cache_mb": round(cache_mb, 1),
        "decode_step_ms": round(step_s * 1e3, 2), "rebuild_on_join_or_leave_ms": round(rebuild_s * 1e3, 2),
        "slot_layout_join_or_leave_ms": 0.0,
        # a sequence joins once and leaves once: two rebuilds per request, against its decode steps
        "rebuild_share_of_a_step": round(rebuild_s / step_s, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
