"""Online estimates the scheduler and admission control decide with (loop thread only)."""
from __future__ import annotations

import math

MERGE_FACTOR = 0.5


class ArrivalGap:
    """Exponentially weighted mean gap between input arrivals, in seconds."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = alpha
        self.mean = math.inf
        self._last: float | None = None

    def observe(self, now: float) -> None:
        if self._last is not None:
            gap = now - self._last
            self.mean = gap if math.isinf(self.mean) else self.mean + self.alpha * (gap - self.mean)
        self._last = now

    def expected(self, now: float) -> float:
        """The gap to expect from now; a long silence raises it, so an idle server never waits."""
        if self._last is None:
            return math.inf
        return max(self.mean, now - self._last)


class BatchCost:
    """Model time of a batch fitted as `overhead + per_token * padded_tokens` by exponentially
    weighted least squares, so the fixed cost a merged batch saves is known, and the drain rate
    (real tokens per second of model time) for Retry-After and deadline admission."""

    def __init__(self, decay: float = 0.995) -> None:
        self.decay = decay
        self._n = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self._real = self._time = 0.0

    def observe(self, padded_tokens: int, real_tokens: int, seconds: float) -> None:
        self.seed(padded_tokens, seconds)
        self._real = self.decay * self._real + real_tokens
        self._time = self.decay * self._time + seconds

    def seed(self, padded_tokens: int, seconds: float) -> None:
        """A timing for the fit only (start-up probes, batches on an idle server): small batches
        would understate the drain rate that admission control plans with."""
        d = self.decay
        x, y = float(padded_tokens), seconds
        self._n = d * self._n + 1
        self._sx = d * self._sx + x
        self._sy = d * self._sy + y
        self._sxx = d * self._sxx + x * x
        self._sxy = d * self._sxy + x * y

    def _fit(self) -> tuple[float, float]:
        """(overhead seconds, seconds per padded token); zeros until two batch sizes were seen."""
        var = self._n * self._sxx - self._sx * self._sx
        if self._n < 2 or var <= 1e-9 * max(1.0, self._sxx):
            return 0.0, 0.0
        slope = (self._n * self._sxy - self._sx * self._sy) / var
        return max(0.0, (self._sy - slope * self._sx) / self._n), max(0.0, slope)

    @property
    def overhead_s(self) -> float:
        """Fixed cost of one batch."""
        return self._fit()[0]

    @property
    def merge_tokens(self) -> float:
        """Padding a lane merge may add: half the padded tokens that cost as much model time as one
        batch's fixed cost (a merged lane often would have shared a batch anyway, so it saves about
        half a batch; a policy simulation over real length mixes found 0.35-0.5 best). 0 while unknown."""
        overhead, per_token = self._fit()
        return MERGE_FACTOR * overhead / per_token if per_token > 0 else 0.0

    def snapshot(self) -> dict[str, float]:
        overhead, per_token = self._fit()
        return {"overhead_ms": overhead * 1e3, "per_token_us": per_token * 1e6,
                "merge_tokens": self.merge_tokens, "tokens_per_s": self.tokens_per_s}

    @property
    def tokens_per_s(self) -> float:
        """Real tokens the model gets through per second; 0 while unknown."""
        return self._real / self._time if self._time > 0 else 0.0
