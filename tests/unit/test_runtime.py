"""Process settings applied when a process is ready to serve (batchd/runtime.py)."""
from __future__ import annotations

import gc
import sys

from batchd import runtime


def test_settle_freezes_start_up_objects_raises_the_young_threshold_and_sets_the_gil_interval():
    before = sys.getswitchinterval(), gc.get_threshold()
    try:
        runtime.settle(0.5)
        assert sys.getswitchinterval() == 0.0005
        assert gc.get_threshold()[0] == runtime.YOUNG_GC_THRESHOLD
        assert gc.get_freeze_count() > 0
        runtime.settle()  # a front end: GC only, the interval stays
        assert sys.getswitchinterval() == 0.0005
    finally:
        sys.setswitchinterval(before[0])
        gc.set_threshold(*before[1])
        gc.unfreeze()
