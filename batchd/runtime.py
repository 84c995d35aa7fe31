"""Process settings for serving, applied once a process is ready (its engines loaded, or a front end
connected): the cyclic garbage collector, and how long a thread may hold the GIL while another waits."""
from __future__ import annotations

import gc
import sys

# Hundreds of requests in flight keep thousands of young objects alive, so the default young-
# generation threshold (700) collected every ~50 requests at ~3 ms a collection: ~50 us of every
# request (measured: fake backend, 256 in flight). At 20000: ~2 us. Memory cost: garbage cycles
# wait a little longer (few exist: the request path is written not to make them).
YOUNG_GC_THRESHOLD = 20_000


def settle(gil_switch_interval_ms: float | None = None) -> None:
    # The model, torch and transformers leave ~365k long-lived objects; frozen, the collector stops
    # rescanning them on every full collection under load (236 ms each, measured).
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    if gil_switch_interval_ms:
        # The model thread needs the GIL between device calls (launches, a finished sleep or sync);
        # while the event loop is busy it waited up to Python's 5 ms for it, and the accelerator
        # idled meanwhile (fake accelerator, 3 ms a batch, c=256: model time per batch p50 15 ms at
        # 5 ms, 6 ms at 0.5 ms; 1.2-1.5k -> 1.6-1.8k req/s).
        sys.setswitchinterval(gil_switch_interval_ms / 1e3)
