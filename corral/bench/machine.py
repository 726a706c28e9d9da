"""What the benchmarks ask of the machine: how busy its CPUs are, waiting for them to settle, and
what a process costs (its unique memory, its CPU over a while).

A warm-burst figure is meant to show what an acquire costs, not what the pool's
background work (resets, kernels booting) costs the machine at that moment; the
benchmarks wait for the CPUs to settle first, and print how long that took.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Optional

__all__ = ["cpu_times", "idle_fraction", "wait_quiet", "uss", "idle_cpu_percent"]


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


def uss(pid: int, tree: bool = False) -> Optional[int]:
    """The unique memory (USS, bytes) of process ``pid``, with its descendants when ``tree``."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)] if tree else [p]
        return sum(q.memory_full_info().uss for q in procs)
    except Exception:
        return None


def idle_cpu_percent(pids: list[int], seconds: float) -> Optional[float]:
    """Median CPU of the processes ``pids`` over ``seconds`` of idleness, in percent of one CPU
    (blocks for ``seconds``)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs.append((p, sum(p.cpu_times()[:2])))
        except psutil.Error:
            pass
    time.sleep(seconds)
    used = []
    for p, before in procs:
        try:
            used.append((sum(p.cpu_times()[:2]) - before) / seconds * 100)
        except psutil.Error:
            pass
    return round(statistics.median(used), 2) if used else None
