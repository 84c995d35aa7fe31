"""Size the token budget to the hardware by measurement instead of a guess.

At start-up the model thread runs batches of the longest bucket, doubling the batch each time, and
the budget becomes the smallest batch whose throughput is within `tolerance` of the best seen:
past that point a bigger batch only adds latency (and memory), not throughput.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

Embed = Callable[[Sequence[np.ndarray]], object]


def choose_budget(points: Sequence[tuple[int, float]], tolerance: float = 0.05) -> int:
    """points: (padded tokens, seconds) per measured batch, in increasing size."""
    best = max(tokens / seconds for tokens, seconds in points)
    return next(tokens for tokens, seconds in points if tokens / seconds >= (1 - tolerance) * best)


def measure(embed: Embed, bucket_len: int, max_batch_size: int, token_id: int,
            max_batch_s: float = 1.5, tolerance: float = 0.05) -> list[tuple[int, float]]:
    """Time doubling batches of `bucket_len` tokens; stop at max_batch_size, at a batch slower than
    `max_batch_s`, or once two doublings in a row gained less than `tolerance`."""
    row = np.full(bucket_len, token_id, dtype=np.int64)
    points: list[tuple[int, float]] = []
    size, flat = 1, 0
    while size <= max_batch_size:
        batch = [row] * size
        embed(batch)  # warm-up: allocator growth is not throughput
        seconds = min(_timed(embed, batch) for _ in range(2))
        points.append((size * bucket_len, seconds))
        if len(points) > 1:
            prev_tokens, prev_s = points[-2]
            gained = (size * bucket_len / seconds) / (prev_tokens / prev_s) - 1
            flat = flat + 1 if gained < tolerance else 0
        if seconds > max_batch_s or flat >= 2:
            break
        size *= 2
    return points


def _timed(embed: Embed, batch: Sequence[np.ndarray]) -> float:
    started = time.perf_counter()
    embed(batch)
    return time.perf_counter() - started
