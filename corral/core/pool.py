"""PoolCore: one sandbox type's warm set and refill arithmetic, in plain Python.

What it owns: the names of WARM containers ready to hand out (oldest first),
how many are being started, the target size (``pool_size`` plus whatever
``reserve`` added ahead of a burst) and how many acquirers wait for one. The
PoolActor wraps it, starts what :meth:`deficit` says through the registry and
the driver, and hands containers to waiters in arrival order.

No Ray, no I/O. Every method is O(1) except :meth:`discard`.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from corral.errors import InvalidRequest

__all__ = ["PoolCore", "MAX_POOL"]

MAX_POOL = 4096


class PoolCore:
    """Warm names, starts in flight, target and waiters of one sandbox type."""

    def __init__(self, sandbox_type: str, target: int) -> None:
        self.sandbox_type = sandbox_type
        self.base_target = self._check(target)
        self.extra = 0  # added by reserve(), consumed as acquires take containers
        self.warm: deque[str] = deque()
        self.starting = 0
        self.waiting = 0
        self.failures = 0  # consecutive failed starts (for backoff)

    @staticmethod
    def _check(n: int) -> int:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > MAX_POOL:
            raise InvalidRequest(f"pool size must be an integer in 0..{MAX_POOL}, got {n!r}")
        return n

    @property
    def target(self) -> int:
        return self.base_target + self.extra

    def set_target(self, n: int) -> None:
        self.base_target = self._check(n)

    def reserve(self, n: int) -> int:
        """Grow the warm target by ``n`` ahead of a burst; returns the new target."""
        self.extra = self._check(self.extra + self._check(n)) if n else self.extra
        return self.target

    def deficit(self) -> int:
        """How many more starts to launch now: target and waiters, minus warm and starting."""
        want = self.target + self.waiting
        return max(0, want - len(self.warm) - self.starting)

    def take(self) -> Optional[str]:
        """The oldest warm name, or None. A take consumes reserved extra first."""
        if not self.warm:
            return None
        if self.extra > 0:
            self.extra -= 1
        return self.warm.popleft()

    def put(self, name: str) -> None:
        if name not in self.warm:
            self.warm.append(name)

    def discard(self, name: str) -> bool:
        try:
            self.warm.remove(name)
            return True
        except ValueError:
            return False

    def start_begun(self, n: int = 1) -> None:
        self.starting += n

    def start_ended(self, ok: bool) -> None:
        self.starting = max(0, self.starting - 1)
        self.failures = 0 if ok else self.failures + 1

    def backoff(self) -> float:
        """Seconds to wait before the next refill after consecutive failures (0 when healthy)."""
        return 0.0 if self.failures == 0 else min(30.0, 0.5 * 2 ** min(self.failures - 1, 6))

    def surplus(self) -> int:
        """Warm containers beyond the target (to stop when the target shrinks)."""
        return max(0, len(self.warm) - self.target - self.waiting)

    def stats(self) -> dict:
        return {
            "sandbox_type": self.sandbox_type,
            "target": self.target,
            "warm": len(self.warm),
            "starting": self.starting,
            "waiting": self.waiting,
            "failures": self.failures,
        }
