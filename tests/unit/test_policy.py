"""The batching policy is pure: tables of situations -> decisions, and properties for any input."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from batchd.policy import (BucketView, Dispatch, Hold, PolicyParams, batch_capacity, bucket_of, padding_ratio,
                           plan_batch)
from batchd.queue import RequestQueue
from batchd.types import Pending

BUCKETS = [16, 32, 64, 128]
P = PolicyParams(max_batch_size=8, max_batch_tokens=256, max_wait_s=0.005, max_inflight=2, adaptive=True)
CLASSIC = PolicyParams(max_batch_size=8, max_batch_tokens=256, max_wait_s=0.005, max_inflight=2, adaptive=False)


@pytest.mark.parametrize("n, expected", [(1, 16), (16, 16), (17, 32), (64, 64), (65, 128), (128, 128), (129, None)])
def test_bucket_of_is_the_smallest_bucket_that_fits(n, expected):
    assert bucket_of(n, BUCKETS) == expected


@pytest.mark.parametrize("bucket, expected", [(16, 8), (32, 8), (64, 4), (128, 2), (512, 1)])
def test_capacity_is_bounded_by_size_and_padded_tokens(bucket, expected):
    assert batch_capacity(bucket, P) == expected


@pytest.mark.parametrize("real, padded, expected", [(0, 0, 0.0), (10, 10, 0.0), (75, 100, 0.25), (1, 4, 0.75)])
def test_padding_ratio(real, padded, expected):
    assert padding_ratio(real, padded) == pytest.approx(expected)


NOW = 100.0


def one(bucket: int, size: int) -> Dispatch:
    return Dispatch(((bucket, size),))


@pytest.mark.parametrize(
    "name, views, params, inflight, gap, overhead, expected",
    [
        ("empty queue: nothing to do", [], P, 0, math.inf, 0.0, None),
        ("idle worker, lone input, nobody coming: go at once",
         [BucketView(16, 1, NOW)], P, 0, math.inf, 0.008, one(16, 1)),
        ("idle worker, arrivals faster than a batch's fixed cost: hold for the next one",
         [BucketView(16, 1, NOW)], P, 0, 0.001, 0.008, Hold(NOW + 0.001)),
        ("the hold never passes the oldest input's max_wait",
         [BucketView(16, 1, NOW - 0.004)], P, 0, 0.003, 0.008, Hold(NOW + 0.001)),
        ("oldest past max_wait: go even though arrivals are fast",
         [BucketView(16, 3, NOW - 0.006)], P, 0, 0.001, 0.008, one(16, 3)),
        ("classic policy waits max_wait for an idle worker",
         [BucketView(16, 1, NOW)], CLASSIC, 0, math.inf, 0.0, Hold(NOW + 0.005)),
        ("classic policy goes once max_wait passed",
         [BucketView(16, 1, NOW - 0.005)], CLASSIC, 0, math.inf, 0.0, one(16, 1)),
        ("full batch goes at once, even beside a running one",
         [BucketView(16, 20, NOW)], P, 1, math.inf, 0.0, one(16, 8)),
        ("token budget caps a long bucket: 256 // 128 = 2",
         [BucketView(128, 5, NOW)], P, 0, math.inf, 0.0, one(128, 2)),
        ("busy worker, partial batch: let more join until it frees up",
         [BucketView(16, 3, NOW - 1.0)], P, 1, math.inf, 0.0, None),
        ("both slots taken: nothing, whatever is queued",
         [BucketView(16, 50, NOW - 1.0)], P, 2, math.inf, 0.0, None),
        ("the oldest input's bucket goes first (no starvation of long inputs)",
         [BucketView(16, 8, NOW), BucketView(128, 1, NOW - 0.001)], P, 0, math.inf, 0.0, one(128, 1)),
        ("a full younger bucket goes beside a running batch only if the oldest's bucket is full",
         [BucketView(16, 8, NOW), BucketView(128, 1, NOW - 0.001)], P, 1, math.inf, 0.0, None),
    ],
)
def test_plan_batch_table(name, views, params, inflight, gap, overhead, expected):
    decision = plan_batch(views, NOW, params, inflight, gap, overhead, merge_tokens=0)
    if isinstance(expected, Hold):
        assert isinstance(decision, Hold) and decision.until == pytest.approx(expected.until), name
    else:
        assert decision == expected, name


WIDE = PolicyParams(max_batch_size=16, max_batch_tokens=2048, max_wait_s=0.005)
LANES = [BucketView(56, 3, NOW), BucketView(64, 2, NOW - 0.001), BucketView(72, 2, NOW), BucketView(256, 4, NOW)]


@pytest.mark.parametrize(
    "merge_tokens, expected",
    [
        (0, ((64, 2),)),  # merging costs padding and saves nothing: the head lane alone
        # the 56 lane pads 8 each up to 64 (24 in all; 8 per input, the cheapest per input)
        (24, ((56, 3), (64, 2))),
        # then the 72 lane: the five taken pad 8 more each (40); 64 of 504 tokens is under 15%
        (40, ((56, 3), (64, 2), (72, 2))),
        # the 256 lane would pad seven inputs by 184 tokens each: never worth it here
        (5000, ((56, 3), (64, 2), (72, 2))),
    ],
)
def test_neighbouring_lanes_merge_while_padding_costs_less_than_a_batch(merge_tokens, expected):
    decision = plan_batch(LANES, NOW, WIDE, inflight=0, merge_tokens=merge_tokens)
    assert decision == Dispatch(expected)
    assert decision.size * decision.bucket <= WIDE.max_batch_tokens


def test_merging_never_pads_a_batch_past_15_percent_even_when_padding_looks_cheap():
    lanes = [BucketView(20, 3, NOW), BucketView(24, 2, NOW - 0.001), BucketView(28, 2, NOW)]
    # 20 -> 24 adds 12 of 120 tokens (10%); 24 -> 28 would make it 32 of 196 (16%)
    assert plan_batch(lanes, NOW, WIDE, inflight=0, merge_tokens=1e9) == Dispatch(((20, 3), (24, 2)))


def test_merging_stops_at_capacity_of_the_longest_lane_taken():
    lanes = [BucketView(28, 7, NOW), BucketView(32, 6, NOW - 1)]
    # the 32 lane holds 6; 256 // 32 = 8 fit, so two 28-token inputs join (not seven): a full batch
    assert plan_batch(lanes, NOW, P, inflight=1, merge_tokens=1000) == Dispatch(((28, 2), (32, 6)))


# ---- properties: a simulated queue drained by the policy -------------------------------------------

arrivals = st.lists(st.tuples(st.integers(1, 128), st.floats(0, 0.05)), min_size=1, max_size=60)
params_st = st.builds(PolicyParams, max_batch_size=st.integers(1, 16), max_batch_tokens=st.integers(128, 2048),
                      max_wait_s=st.floats(0, 0.02), max_inflight=st.integers(1, 2), adaptive=st.booleans())


def _simulate(items, params, merge_tokens=0.0):
    """Push inputs, then repeatedly plan with a worker that finishes each batch before the next plan."""
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        queue = RequestQueue(BUCKETS)
        pendings = []
        for i, (n, t) in enumerate(sorted(items, key=lambda it: it[1])):  # arrival = push order
            p = Pending(token_ids=[i] * n, bucket=bucket_of(n, BUCKETS), arrival=t, deadline=math.inf,
                        future=loop.create_future())
            pendings.append(p)
            queue.push(p)
        now, batches = 0.06, []
        for _ in range(10 * len(items) + 10):
            decision = plan_batch(queue.views(), now, params, inflight=0, merge_tokens=merge_tokens)
            if decision is None:
                break
            if isinstance(decision, Hold):
                assert decision.until > now
                now = decision.until
                continue
            batch = queue.take(decision.takes)
            batches.append((decision, batch, now))
        return pendings, batches, queue
    finally:
        loop.close()


merges = st.sampled_from([0.0, 10.0, 50.0, 1e9])


@settings(max_examples=150, deadline=None)
@given(arrivals, params_st, merges)
def test_every_input_runs_exactly_once_within_size_and_budget(items, params, merge_tokens):
    pendings, batches, queue = _simulate(items, params, merge_tokens)
    ran = [id(p) for _, batch, _ in batches for p in batch]
    assert sorted(ran) == sorted(id(p) for p in pendings)  # nothing lost, nothing twice
    assert queue.depth == 0
    for decision, batch, _ in batches:
        assert len(batch) == decision.size <= params.max_batch_size
        assert all(p.n_tokens <= p.bucket <= decision.bucket for p in batch)
        # the budget counts padded tokens; a single over-budget input still runs alone
        assert len(batch) * decision.bucket <= params.max_batch_tokens or len(batch) == 1


@settings(max_examples=150, deadline=None)
@given(arrivals, params_st, merges)
def test_oldest_goes_first_and_never_waits_past_max_wait_for_an_idle_worker(items, params, merge_tokens):
    pendings, batches, _ = _simulate(items, params, merge_tokens)
    waiting = set(map(id, pendings))
    oldest_first = min(p.arrival for p in pendings)
    for decision, batch, when in batches:
        oldest_waiting = min(p.arrival for p in pendings if id(p) in waiting)
        assert oldest_waiting in [p.arrival for p in batch]  # each batch carries the oldest input
        waiting -= set(map(id, batch))
    # the first batch leaves no later than the oldest input's max_wait (the queue was filled at 0.06)
    assert batches[0][2] <= max(0.06, oldest_first + params.max_wait_s) + 1e-9


@settings(max_examples=100, deadline=None)
@given(arrivals, params_st, merges)
def test_same_input_same_plan(items, params, merge_tokens):
    first = [(d, [p.token_ids for p in b]) for d, b, _ in _simulate(items, params, merge_tokens)[1]]
    second = [(d, [p.token_ids for p in b]) for d, b, _ in _simulate(items, params, merge_tokens)[1]]
    assert first == second
