"""One helper for wall time and peak memory, so every report measures the same way."""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_HWM = re.compile(r"VmHWM:\s+(\d+)\s+kB")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB since the last reset (or since start)."""
    try:
        with open("/proc/self/status") as f:
            match = _HWM.search(f.read())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@dataclass
class Measurement:
    """Wall seconds, peak CPU RSS (MB) and peak CUDA memory allocated (MB) of a block of code."""

    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    cuda_peak_mb: float = 0.0


@contextmanager
def measure(device: torch.device | str | None = None, reset_peak: bool = True) -> Iterator[Measurement]:
    """Measure the enclosed block; CUDA work is synchronised so its time is counted.

    ``reset_peak=False`` keeps the process-wide peak (for totals around nested measurements).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = device.type == "cuda" and torch.cuda.is_available()
    result = Measurement()
    if reset_peak:
        _reset_peak_rss()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            result.cuda_peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        result.seconds = time.perf_counter() - start
        result.peak_rss_mb = peak_rss_mb()
