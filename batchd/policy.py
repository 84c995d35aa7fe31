"""Pure batching decisions: no asyncio, no torch, `now` is a parameter. Table-tested in tests/unit."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class BucketView:
    """What the policy may see of one length bucket: its padded length, live count, oldest arrival."""
    length: int
    count: int
    oldest: float


@dataclass(frozen=True, slots=True)
class PolicyParams:
    max_batch_size: int
    max_batch_tokens: int  # padded tokens: size * bucket length
    max_wait_s: float
    max_inflight: int = 2
    adaptive: bool = True


@dataclass(frozen=True, slots=True)
class Dispatch:
    bucket: int
    size: int


@dataclass(frozen=True, slots=True)
class Hold:
    """Nothing to do before `until` unless new work arrives."""
    until: float


def bucket_of(n_tokens: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket >= n_tokens, or None when the input is longer than every bucket."""
    i = bisect.bisect_left(buckets, n_tokens)
    return buckets[i] if i < len(buckets) else None


def batch_capacity(bucket_len: int, params: PolicyParams) -> int:
    """How many inputs of this bucket fit in one batch: bounded by size and by padded tokens."""
    return max(1, min(params.max_batch_size, params.max_batch_tokens // bucket_len))


def padding_ratio(real_tokens: int, padded_tokens: int) -> float:
    """Share of the model's tokens that were padding: 1 - real/padded (0 when nothing ran).
    The one definition that /stats, /metrics, response headers and tests all use."""
    if padded_tokens <= 0:
        return 0.0
    return 1.0 - real_tokens / padded_tokens


def plan_batch(
    buckets: Sequence[BucketView],
    now: float,
    params: PolicyParams,
    inflight: int,
    arrival_gap_s: float = math.inf,
    batch_overhead_s: float = 0.0,
) -> Dispatch | Hold | None:
    """Decide the next batch.

    The oldest input's bucket goes first, so nothing starves. A full batch goes at once (beside a
    running one, up to `max_inflight`). A partial batch goes only to an idle worker: at once, unless
    waiting pays. With `adaptive`, waiting pays only while the next arrival is expected sooner than
    the fixed cost of one batch (the time a merged batch saves); without it we wait the classic
    `max_wait_s`. Either way the oldest never waits past `max_wait_s` for an idle worker.
    `None` means: nothing to do until new work arrives or a batch finishes.
    """
    live = [b for b in buckets if b.count > 0]
    if not live or inflight >= params.max_inflight:
        return None
    head = min(live, key=lambda b: (b.oldest, b.length))
    cap = batch_capacity(head.length, params)
    size = min(head.count, cap)
    if size == cap:
        return Dispatch(head.length, size)
    if inflight > 0:
        return None  # the worker is busy: more inputs can still join before it frees up
    overdue_at = head.oldest + params.max_wait_s
    if now >= overdue_at:
        return Dispatch(head.length, size)
    if params.adaptive:
        if arrival_gap_s < batch_overhead_s:
            return Hold(min(overdue_at, now + arrival_gap_s))
        return Dispatch(head.length, size)
    return Hold(overdue_at)
