"""`lightning_obq.core.measure.measure`: time and peak memory of a block of code."""

from __future__ import annotations

import time

from lightning_obq.core.measure import measure


def test_measure_records_time_and_peak_and_memory_false_records_time_only() -> None:
    with measure("cpu") as full:
        time.sleep(0.01)
    with measure("cpu", memory=False) as timed:
        time.sleep(0.01)
    assert full.seconds >= 0.01 and full.peak_rss_mb > 0  # the process's peak RSS since the block began
    assert timed.seconds >= 0.01 and timed.peak_rss_mb == 0.0 and timed.cuda_peak_mb == 0.0
