"""PoolCore: one sandbox type's warm target and the decisions that keep it, in plain Python.

What it owns: the target (``pool_size`` plus what ``reserve`` added ahead of a
burst, consumed as acquires take sandboxes), the consecutive start failures
and the back-off they cause, when a surplus of warm sandboxes began (to shrink
after :data:`SHRINK_AFTER`), and each warm sandbox's consecutive failed health
probes. The registry holds one per type and asks it, in its tick, how many
sandboxes to start, how many to drop and which sick ones to replace; the
counts it decides from (warm, starting, resetting, waiting) are the
registry's own and are passed in, never copied.

No Ray, no I/O, an injected clock (``now`` arguments). Every method is O(1)
but :meth:`probe`, which is O(probed) (and O(strikes) with ``warm``).
"""

from __future__ import annotations

from typing import Collection, Optional

from corral.errors import InvalidRequest

__all__ = ["PoolCore", "MAX_POOL", "SHRINK_AFTER", "HEALTH_STRIKES"]

MAX_POOL = 4096
#: Seconds a surplus of warm sandboxes lasts before it is dropped. Reused sandboxes come back
#: above the target at the end of a burst; dropping them at once would make the next wave cold.
SHRINK_AFTER = 30.0
#: Consecutive failed health probes before a warm sandbox is replaced. One slow answer on a
#: loaded machine is not death: replacing at the first timeout adds load, which fails more probes.
HEALTH_STRIKES = 3


def check_size(n: object, what: str = "pool size") -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > MAX_POOL:
        raise InvalidRequest(f"{what} must be an integer in 0..{MAX_POOL}, got {n!r}")
    return n


class PoolCore:
    """The warm target and refill decisions of one sandbox type (see the module docstring)."""

    def __init__(self, sandbox_type: str, target: int) -> None:
        self.sandbox_type = sandbox_type
        self.base_target = check_size(target)
        self.extra = 0  # added by reserve(), consumed as acquires take sandboxes
        self.failures = 0  # consecutive failed starts
        self.last_error: Optional[str] = None  # why the last failed start failed (said when acquires time out)
        self.retry_at = 0.0  # no refill before this time (back-off after failures)
        self.surplus_since: Optional[float] = None
        self.strikes: dict[str, int] = {}  # warm sandbox -> consecutive failed probes
        self.started_total = 0
        self.failed_total = 0
        self.dropped_sick = 0

    @property
    def target(self) -> int:
        return self.base_target + self.extra

    def set_target(self, n: int) -> None:
        self.base_target = check_size(n)

    def reserve(self, n: int) -> int:
        """Grow the warm target by ``n`` ahead of a burst; returns the new target."""
        self.extra = check_size(self.extra + check_size(n, "n"), "pool size with reservations")
        return self.target

    def consumed(self, n: int) -> None:
        """``n`` sandboxes of the type were claimed: reservations made for them are used up."""
        self.extra = max(0, self.extra - n)

    def deficit(self, warm: int, starting: int, resetting: int, waiting: int, now: float) -> int:
        """How many starts to launch now: target and waiters, minus what is warm, starting or
        coming back from a reset (a reset costs a fraction of a start, so it is waited for)."""
        if now < self.retry_at:
            return 0
        return max(0, self.target + waiting - warm - starting - resetting)

    def start_ended(self, ok: bool, now: float, counts: bool = True) -> None:
        """A start finished. ``counts=False``: it failed for a reason that says nothing about
        the type (the namespace shutting down), so it neither grows nor resets the back-off."""
        if ok:
            self.started_total += 1
            self.failures = 0
            self.retry_at = 0.0
        elif counts:
            self.failed_total += 1
            self.failures += 1
            self.retry_at = now + self.backoff()

    def backoff(self) -> float:
        """Seconds before the next refill after consecutive failures (0 when healthy)."""
        return 0.0 if self.failures == 0 else min(30.0, 0.5 * 2 ** min(self.failures - 1, 6))

    def shrink(self, warm: int, waiting: int, now: float) -> int:
        """How many warm sandboxes to drop now: the surplus over target and waiters, once it has
        lasted :data:`SHRINK_AFTER` seconds."""
        surplus = max(0, warm - self.target - waiting)
        if surplus == 0:
            self.surplus_since = None
            return 0
        if self.surplus_since is None:
            self.surplus_since = now
            return 0
        if now - self.surplus_since < SHRINK_AFTER:
            return 0
        self.surplus_since = None
        return surplus

    def probe(self, results: dict[str, bool], warm: Optional[Collection[str]] = None) -> list[str]:
        """Fold in the answers of a health probe of some warm sandboxes (name -> answered); returns
        those to replace. A sandbox not in ``results`` keeps its strikes (it was not probed this
        time); with ``warm``, the strikes of sandboxes no longer in it are forgotten."""
        if warm is not None:
            self.strikes = {n: k for n, k in self.strikes.items() if n in warm}
        sick = []
        for name, ok in results.items():
            if ok:
                self.strikes.pop(name, None)
                continue
            n = self.strikes.get(name, 0) + 1
            if n >= HEALTH_STRIKES:
                self.strikes.pop(name, None)
                sick.append(name)
            else:
                self.strikes[name] = n
        self.dropped_sick += len(sick)
        return sick

    def stats(self) -> dict:
        return {
            "sandbox_type": self.sandbox_type,
            "target": self.target,
            "failures": self.failures,
            "last_error": self.last_error if self.failures else None,
            "backoff_s": round(self.backoff(), 2),
            "started_total": self.started_total,
            "failed_total": self.failed_total,
            "dropped_unhealthy": self.dropped_sick,
        }
