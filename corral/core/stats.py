"""Latency percentiles: the figures benchmarks print and actors report in ``status()``.

:class:`LatencyWindow` owns the last ``size`` durations (ms) of one kind of
operation in one actor (a reset, an acquire), so ``status()`` can say how long
they take now, next to the Ray histograms that Prometheus scrapes.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Optional

__all__ = ["pct", "summary", "LatencyWindow"]


def pct(xs: Iterable[float], p: float) -> Optional[float]:
    """The ``p``-th percentile of ``xs`` (nearest rank, rounded to 0.01), or None when empty."""
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(p / 100 * (len(xs) - 1)))))
    return round(xs[k], 2)


def summary(xs: Iterable[float]) -> dict:
    xs = list(xs)
    return {"p50": pct(xs, 50), "p95": pct(xs, 95), "p99": pct(xs, 99), "n": len(xs)}


class LatencyWindow:
    """The last ``size`` durations in milliseconds, summarised on demand."""

    def __init__(self, size: int = 512) -> None:
        self._xs: deque[float] = deque(maxlen=size)
        self.total = 0

    def add(self, ms: float, n: int = 1) -> None:
        for _ in range(n):
            self._xs.append(ms)
        self.total += n

    def summary(self) -> dict:
        return {**summary(self._xs), "total": self.total}
