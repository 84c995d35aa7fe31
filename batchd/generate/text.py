"""Turning token ids into text on the event-loop thread: incremental detokenization that is right
for multi-byte characters, and stop strings that are never split across chunks."""
from __future__ import annotations

from typing import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids. A byte-level BPE token may end in the middle of
    a UTF-8 character (decoded as U+FFFD); such text is held back until the character completes, so
    the deltas concatenate to exactly what decoding all ids at once gives."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] is context already turned into text
        self._read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back when the sequence ends (an incomplete character stays U+FFFD)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Feeds text deltas and returns what may be sent now. Text that could be the start of a stop
    string is held back until it is known not to be one; at a stop string, the text before it is
    released and `stopped` turns true (the stop string itself is never sent)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""  # nothing after a stop string is ever sent
        if not self.stops:
            return delta
        text = self._hold + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._hold = True, ""
            return text[:cut]
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self._hold = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self._hold = self._hold, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
