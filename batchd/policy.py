"""Pure batching decisions: no asyncio, no torch, `now` is a parameter. Table-tested in tests/unit."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Sequence


MAX_MERGED_PADDING = 0.15  # lane merges never pad a batch (estimated by lane lengths) beyond this


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
    """Take `count` oldest inputs from each `(bucket, count)` lane, shortest lane first."""
    takes: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(count for _, count in self.takes)

    @property
    def bucket(self) -> int:
        """The longest lane taken: no input of the batch is longer."""
        return self.takes[-1][0]


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
    merge_tokens: float = 0.0,
) -> Dispatch | Hold | None:
    """Decide the next batch.

    The oldest input's bucket goes first, so nothing starves. A full batch goes at once (beside a
    running one, up to `max_inflight`). A partial batch goes only to an idle worker: at once, unless
    waiting pays. With `adaptive`, waiting pays only while the next arrival is expected sooner than
    the fixed cost of one batch (the time a merged batch saves); without it we wait the classic
    `max_wait_s`. Either way the oldest never waits past `max_wait_s` for an idle worker.
    `None` means: nothing to do until new work arrives or a batch finishes.
    """
    live = sorted((b for b in buckets if b.count > 0), key=lambda b: b.length)
    if not live or inflight >= params.max_inflight:
        return None
    head = min(range(len(live)), key=lambda i: (live[i].oldest, live[i].length))
    takes, cap = merge_lanes(live, head, params, merge_tokens)
    batch = Dispatch(takes)
    if batch.size == cap:
        return batch
    if inflight > 0:
        return None  # the worker is busy: more inputs can still join before it frees up
    overdue_at = live[head].oldest + params.max_wait_s
    if now >= overdue_at:
        return batch
    if params.adaptive:
        if arrival_gap_s < batch_overhead_s:
            return Hold(min(overdue_at, now + arrival_gap_s))
        return batch
    return Hold(overdue_at)


def merge_lanes(live: Sequence[BucketView], head: int, params: PolicyParams,
                merge_tokens: float) -> tuple[tuple[tuple[int, int], ...], int]:
    """The head lane's oldest inputs, joined by neighbouring lanes while the batch has room and a
    merge adds at most `merge_tokens` padded tokens (the caller prices them against the fixed cost
    of the batch a merge saves: estimators.BatchCost.merge_tokens) and the batch stays under MAX_MERGED_PADDING
    (a guard for when the cost estimate is off, e.g. on a busy machine).
    Returns the takes (shortest lane first) and the batch's capacity."""
    lo = hi = head
    cap = batch_capacity(live[head].length, params)
    taken = {head: min(live[head].count, cap)}
    size, padding = taken[head], 0
    while size < cap:
        options = []
        if lo > 0:  # shorter inputs, padded up to this batch's longest
            lane = live[lo - 1]
            k = min(lane.count, cap - size)
            extra = k * (live[hi].length - lane.length)
            options.append((extra / k, lo - 1, k, extra))
        if hi + 1 < len(live):  # longer inputs: everyone already taken pads further
            lane = live[hi + 1]
            k = min(lane.count, batch_capacity(lane.length, params) - size)
            if k > 0:
                extra = size * (lane.length - live[hi].length)
                options.append((extra / k, hi + 1, k, extra))
        if not options:
            break
        _, lane_index, k, extra = min(options)
        longest = max(live[hi].length, live[lane_index].length)
        if extra > merge_tokens or padding + extra > MAX_MERGED_PADDING * (size + k) * longest:
            break
        taken[lane_index] = k
        size, padding = size + k, padding + extra
        lo, hi = min(lo, lane_index), max(hi, lane_index)
        cap = batch_capacity(live[hi].length, params)
    return tuple((live[i].length, taken[i]) for i in sorted(taken)), cap
