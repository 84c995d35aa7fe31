"""The pure step planner for generation: no asyncio, no torch, `now` is not even needed (arrival
order is the sequences' order). Table- and property-tested in tests/unit/test_step_planner.py.

Each step: free the slots of finished or cancelled sequences; continue chunked prefills; admit
waiting sequences in arrival order while a slot is free and the step's prefill token budget lasts
(a long prompt is prefilled in chunks over several steps, so running streams are never stalled by
one big prompt); decode one token for every running sequence whose prompt is fully in the cache.
With schedule = "prefill_first", a step that prefills decodes nothing (lower time to first token,
higher inter-token latency, as vLLM v0); admission still stops when the slots are full, so decodes
are delayed, never starved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class SeqView:
    """What the planner may see of one sequence."""
    id: int
    prompt_len: int
    prefilled: int = 0  # prompt tokens already in the KV cache
    running: bool = False  # holds a KV slot
    done: bool = False  # finished or cancelled: its slot is freed, it is never planned again


@dataclass(frozen=True, slots=True)
class StepParams:
    max_running: int  # KV slots
    max_prefill_tokens: int  # prompt tokens per step
    prefill_first: bool = False


@dataclass(frozen=True, slots=True)
class StepPlan:
    free: tuple[int, ...] = ()  # running sequences that leave: their slots are freed first
    drop: tuple[int, ...] = ()  # waiting sequences that left before they ran
    admit: tuple[int, ...] = ()  # waiting sequences that get a slot this step
    prefill: tuple[tuple[int, int, int], ...] = ()  # (id, start, length) chunks of prompts
    decode: tuple[int, ...] = ()  # running sequences that get one more token

    @property
    def prefill_tokens(self) -> int:
        return sum(length for _, _, length in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.free or self.drop or self.prefill or self.decode)


def plan_step(waiting: Sequence[SeqView], running: Sequence[SeqView], params: StepParams) -> StepPlan:
    """`waiting` and `running` in arrival order."""
    free = tuple(s.id for s in running if s.done)
    drop = tuple(s.id for s in waiting if s.done)
    live = [s for s in running if not s.done]
    budget = params.max_prefill_tokens
    prefill: list[tuple[int, int, int]] = []
    for seq in live:  # chunked prefills already under way go first: they hold slots
        if seq.prefilled < seq.prompt_len and budget > 0:
            length = min(seq.prompt_len - seq.prefilled, budget)
            prefill.append((seq.id, seq.prefilled, length))
            budget -= length
    admit: list[int] = []
    slots = params.max_running - len(live)
    for seq in waiting:
        if seq.done:
            continue
        if slots <= 0 or budget <= 0:
            break  # strictly in arrival order: a later sequence never overtakes an earlier one
        length = min(seq.prompt_len, budget)
        admit.append(seq.id)
        prefill.append((seq.id, 0, length))
        budget -= length
        slots -= 1
    decode: tuple[int, ...] = ()
    if not (params.prefill_first and prefill):
        decode = tuple(s.id for s in live if s.prefilled >= s.prompt_len)
    return StepPlan(free, drop, tuple(admit), tuple(prefill), decode)
