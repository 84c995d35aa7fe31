"""Plain data that crosses between the route, the queue, the scheduler and the model thread."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False, slots=True)
class Pending:
    """One input waiting for the model. Created and completed on the event-loop thread; the model
    thread only reads `token_ids` and `cancelled`."""
    token_ids: np.ndarray  # int64, special tokens included
    bucket: int
    arrival: float  # time.monotonic()
    deadline: float
    future: asyncio.Future
    cancelled: bool = False
    queued: bool = True  # still counted in queue depth

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class ItemResult:
    """What a caller gets back for one input, with the facts about the batch it rode in."""
    vector: np.ndarray
    queue_s: float
    inference_s: float
    batch_size: int
    batch_padding: float


@dataclass(slots=True)
class BatchOutcome:
    """The model thread's answer for one batch: per input an array, an exception, or None."""
    outputs: list[np.ndarray | BaseException | None]  # None: dropped (cancelled) before the model saw it
    started: float = 0.0  # time.monotonic() when the model thread picked the batch up
    model_s: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    batch_size: int = 0
    calls: int = 0  # forward calls, >1 when the batch was bisected after a failure
    oom: bool = False
    fatal: BaseException | None = None
