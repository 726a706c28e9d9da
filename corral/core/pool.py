"""PoolCore: one sandbox type's refill arithmetic, in plain Python.

What it owns: how many containers are being started, the target size
(``pool_size`` plus whatever ``reserve`` added ahead of a burst, consumed as
acquires take containers) and the consecutive start failures (backoff). It
holds a *view* of two counts the registry owns (WARM containers of the type,
acquirers waiting for one) and of how many claims the registry has made, as
last sent by the registry. The PoolActor wraps it and starts what
:meth:`deficit` says through the registry and the driver.

No Ray, no I/O. Every method is O(1).
"""

from __future__ import annotations

from corral.errors import InvalidRequest

__all__ = ["PoolCore", "MAX_POOL"]

MAX_POOL = 4096


class PoolCore:
    """Warm names, starts in flight, target and waiters of one sandbox type."""

    def __init__(self, sandbox_type: str, target: int) -> None:
        self.sandbox_type = sandbox_type
        self.base_target = self._check(target)
        self.extra = 0  # added by reserve(), consumed as acquires take containers
        self.warm = 0  # view: WARM containers of the type (the registry's count)
        self.waiting = 0  # view: acquirers waiting for one (the registry's count)
        self.claimed = 0  # view: claims the registry has made of this type so far
        self.resetting_view = 0  # view: RESETTING records (released, reset not yet reported back)
        self.starting = 0
        self.resetting = 0  # released containers being reset: they come back warm
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
        """How many more starts to launch now: target and waiters, minus warm, starting and resetting
        (a reset takes a fraction of a start's time and CPU, so it is waited for, not raced)."""
        want = self.target + self.waiting
        # the registry counts a release as resetting at once; the pool's own count only once the
        # reset reaches it, and until the registry hears it is done: the larger is the truer
        coming_back = max(self.resetting, self.resetting_view)
        return max(0, want - self.warm - self.starting - coming_back)

    def view(self, warm: int, waiting: int, claimed: int, resetting: int = 0) -> None:
        """The registry's counts; claims made since the last view consume reserved extra."""
        taken = max(0, claimed - self.claimed)
        self.extra = max(0, self.extra - taken)
        self.warm, self.waiting, self.claimed = max(0, warm), max(0, waiting), claimed
        self.resetting_view = max(0, resetting)

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
        return max(0, self.warm - self.target - self.waiting)

    def stats(self) -> dict:
        return {
            "sandbox_type": self.sandbox_type,
            "target": self.target,
            "warm": self.warm,
            "starting": self.starting,
            "resetting": max(self.resetting, self.resetting_view),
            "waiting": self.waiting,
            "failures": self.failures,
        }
