"""The generation step planner: tables and properties (pure: no asyncio, no torch)."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from batchd.generate.planner import SeqView, StepParams, StepPlan, plan_step

P = StepParams(max_running=2, max_prefill_tokens=100)


def waiting(*lengths: int, start: int = 0) -> list[SeqView]:
    return [SeqView(start + i, n) for i, n in enumerate(lengths)]


def running(*specs: tuple[int, int, int]) -> list[SeqView]:
    """(id, prompt length, prefilled)"""
    return [SeqView(i, n, done, running=True) for i, n, done in specs]


def test_idle_and_empty_plans_nothing():
    assert not plan_step([], [], P)


def test_fifo_admits_in_order_within_slots_and_budget():
    plan = plan_step(waiting(30, 30, 30), [], P)
    assert plan.admit == (0, 1)  # two slots
    assert plan.prefill == ((0, 0, 30), (1, 0, 30))
    assert plan.decode == ()


def test_a_long_prompt_is_prefilled_in_chunks_and_running_sequences_keep_decoding():
    plan = plan_step(waiting(250, start=5), running((1, 10, 10)), P)
    assert plan.admit == (5,) and plan.prefill == ((5, 0, 100),)
    assert plan.decode == (1,)  # not starved by the big prompt
    plan = plan_step([], running((1, 10, 10), (5, 250, 100)), P)
    assert plan.prefill == ((5, 100, 100),) and plan.decode == (1,)
    plan = plan_step([], running((1, 10, 10), (5, 250, 200)), P)
    assert plan.prefill == ((5, 200, 50),) and plan.decode == (1,)


def test_a_later_sequence_never_overtakes_an_earlier_one():
    """The head needs more budget than is left: nobody behind it jumps ahead."""
    plan = plan_step(waiting(80, 10, start=3), running((1, 90, 30)), StepParams(4, 100))
    assert plan.prefill == ((1, 30, 60), (3, 0, 40))  # the head is admitted with a partial chunk
    assert plan.admit == (3,)


def test_prefill_first_decodes_nothing_in_a_step_that_prefills():
    params = StepParams(2, 100, prefill_first=True)
    plan = plan_step(waiting(20, start=4), running((1, 10, 10)), params)
    assert plan.admit == (4,) and plan.decode == ()
    plan = plan_step([], running((1, 10, 10), (4, 20, 20)), params)
    assert plan.decode == (1, 4)


def test_finished_and_cancelled_sequences_leave_and_free_their_slot_first():
    done_running = SeqView(1, 10, 10, running=True, done=True)
    cancelled_waiting = SeqView(7, 10, done=True)
    plan = plan_step([cancelled_waiting, SeqView(8, 10)], [done_running, SeqView(2, 10, 10, running=True)], P)
    assert plan.free == (1,) and plan.drop == (7,)
    assert plan.admit == (8,)  # took the freed slot in the same step
    assert 1 not in plan.decode and all(i != 7 for i, _, _ in plan.prefill)


views = st.lists(st.tuples(st.integers(1, 300), st.integers(0, 300), st.booleans(), st.booleans()), max_size=12)


@settings(max_examples=300, deadline=None)
@given(views, views, st.integers(1, 8), st.integers(1, 400), st.booleans())
def test_properties_of_any_plan(raw_waiting, raw_running, slots, budget, prefill_first):
    run = [SeqView(i, n, min(p, n), running=True, done=d) for i, (n, p, d, _) in enumerate(raw_running[:slots])]
    wait = [SeqView(100 + i, n, done=d) for i, (n, _, d, _) in enumerate(raw_waiting)]
    params = StepParams(slots, budget, prefill_first)
    plan: StepPlan = plan_step(wait, run, params)
    live_running = [s for s in run if not s.done]
    # budgets never exceeded
    assert plan.prefill_tokens <= budget
    assert len(live_running) + len(plan.admit) <= slots
    # a finished or cancelled sequence is never planned again
    done = {s.id for s in run + wait if s.done}
    planned = set(plan.admit) | set(plan.decode) | {i for i, _, _ in plan.prefill}
    assert not planned & done
    assert set(plan.free) == {s.id for s in run if s.done}
    # admission is a prefix of the live waiting list (arrival order, nobody overtakes)
    live_waiting = [s.id for s in wait if not s.done]
    assert list(plan.admit) == live_waiting[:len(plan.admit)]
    # chunks are inside their prompts and continue where the cache ends
    by_id = {s.id: s for s in run + wait}
    for i, start, length in plan.prefill:
        assert length > 0 and start == by_id[i].prefilled and start + length <= by_id[i].prompt_len
    # no starvation: with FIFO every fully prefilled running sequence decodes every step
    ready = {s.id for s in live_running if s.prefilled >= s.prompt_len}
    if not prefill_first:
        assert set(plan.decode) == ready
    else:
        assert set(plan.decode) == (set() if plan.prefill else ready)
    # free slots and budget left over mean nobody was left waiting for no reason
    if live_waiting and len(live_running) < slots and budget > sum(
            s.prompt_len - s.prefilled for s in live_running if s.prefilled < s.prompt_len):
        assert plan.admit
