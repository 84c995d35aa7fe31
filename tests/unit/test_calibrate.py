import pytest

from batchd.calibrate import choose_budget
from tests.helpers import fake_config, running_engine


@pytest.mark.parametrize(
    "points, expected",
    [
        # throughput (tokens/s): 2560, 4267, 5120, 5224 -> 5120 is within 5% of the best
        ([(256, 0.1), (512, 0.12), (1024, 0.2), (2048, 0.392)], 1024),
        ([(256, 0.1)], 256),
        # keeps growing: the biggest wins
        ([(256, 0.1), (512, 0.1), (1024, 0.1)], 1024),
        # a bigger batch got slower per token (cache spill): the budget stays at the peak
        ([(256, 0.05), (512, 0.08), (1024, 0.3)], 512),
    ],
)
def test_budget_is_the_smallest_batch_within_5_percent_of_the_best_throughput(points, expected):
    assert choose_budget(points) == expected


async def test_engine_calibrates_the_budget_at_start_when_asked():
    # a fixed 20 ms per batch: throughput doubles with every doubling, so the biggest batch wins
    cfg = fake_config(model={"fake_batch_ms": 20, "max_length": 64},
                      batching={"max_batch_tokens": 0, "max_batch_size": 8, "buckets": [16, 64]})
    async with running_engine(cfg) as engine:
        assert engine.scheduler.params.max_batch_tokens == 8 * 64
        assert engine.scheduler.cost.overhead_s > 0.01  # the cost model starts from the measurements
