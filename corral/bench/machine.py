"""What the benchmarks ask of the machine: how busy its CPUs are, and waiting for them to settle.

A warm-burst figure is meant to show what an acquire costs, not what the pool's
background work (resets, kernels booting) costs the machine at that moment; the
benchmarks wait for the CPUs to settle first, and print how long that took.
"""

from __future__ import annotations

import asyncio
import time
from typing import Optional

__all__ = ["cpu_times", "idle_fraction", "wait_quiet"]


def cpu_times() -> Optional[tuple[int, int]]:
    """(idle, total) jiffies of all CPUs so far, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait; user..steal


def idle_fraction(before: Optional[tuple[int, int]], after: Optional[tuple[int, int]]) -> Optional[float]:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


async def wait_quiet(idle_at_least: float = 0.8, window: float = 0.5, max_s: float = 30.0) -> tuple[float, Optional[float]]:
    """Wait until the CPUs were at least ``idle_at_least`` idle over one ``window`` (or ``max_s``
    passed). Returns (seconds waited, the last window's idle fraction)."""
    t0 = time.monotonic()
    idle = None
    while True:
        before = cpu_times()
        await asyncio.sleep(window)
        idle = idle_fraction(before, cpu_times())
        if idle is None or idle >= idle_at_least or time.monotonic() - t0 >= max_s:
            return round(time.monotonic() - t0, 1), (None if idle is None else round(idle, 2))
