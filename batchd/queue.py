"""The request queue: one FIFO deque per length bucket. Only the event-loop thread touches it."""
from __future__ import annotations

from collections import deque

from .policy import BucketView
from .types import Pending


class RequestQueue:
    def __init__(self, buckets: list[int]) -> None:
        self._lanes: dict[int, deque[Pending]] = {b: deque() for b in buckets}
        self._live: dict[int, int] = dict.fromkeys(buckets, 0)  # live inputs per lane
        self.depth = 0  # live (not cancelled) inputs
        self.tokens = 0  # real tokens of live inputs
        self._dead = 0  # cancelled inputs still sitting in a lane

    def push(self, item: Pending) -> None:
        self._lanes[item.bucket].append(item)
        self._live[item.bucket] += 1
        self.depth += 1
        self.tokens += item.n_tokens

    def cancel(self, item: Pending) -> None:
        """Drop an input that nobody waits for any more; it will never be dispatched."""
        item.cancelled = True
        if item.queued:
            self._forget(item)
            self._dead += 1
            if self._dead > 1024 and self._dead > self.depth:
                self._compact()

    def views(self) -> list[BucketView]:
        out = []
        for length, lane in self._lanes.items():
            while lane and lane[0].cancelled:
                lane.popleft()
                self._dead -= 1
            if lane:
                out.append(BucketView(length, self._live[length], lane[0].arrival))
        return out

    def take(self, takes: tuple[tuple[int, int], ...]) -> list[Pending]:
        """The oldest live inputs of each (bucket, count) lane, in lane order."""
        return [item for bucket, count in takes for item in self.pop(bucket, count)]

    def pop(self, bucket: int, size: int) -> list[Pending]:
        lane = self._lanes[bucket]
        taken: list[Pending] = []
        while lane and len(taken) < size:
            item = lane.popleft()
            if item.cancelled:
                self._dead -= 1
                continue
            self._forget(item)
            taken.append(item)
        return taken

    def drain(self) -> list[Pending]:
        """Take every live input out (engine death or shutdown)."""
        items = [p for lane in self._lanes.values() for p in lane if not p.cancelled]
        for lane in self._lanes.values():
            lane.clear()
        for item in items:
            self._forget(item)
        self._dead = 0
        return items

    def _forget(self, item: Pending) -> None:
        item.queued = False
        self._live[item.bucket] -= 1
        self.depth -= 1
        self.tokens -= item.n_tokens

    def _compact(self) -> None:
        for length, lane in self._lanes.items():
            self._lanes[length] = deque(p for p in lane if not p.cancelled)
        self._dead = 0
