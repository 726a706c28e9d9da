"""StartLog: the outcomes of a pool's finished starts, kept for a registry that restarted meanwhile.

What it owns: each finished start's outcome and when it finished; an outcome older than
:data:`KEEP_RESULTS` seconds is forgotten. A PoolActor keeps one: a registry that restarted in
the middle of a start asks which starts the pool made (:meth:`names`, with those under way) and
collects their outcomes (:meth:`outcome`); a start the log no longer keeps is reported failed.

No Ray, no I/O; the clock is passed in (``now``).
"""

from __future__ import annotations

__all__ = ["StartLog", "KEEP_RESULTS", "UNKNOWN_START"]

#: Seconds a finished start's outcome is kept for a registry that restarted meanwhile.
KEEP_RESULTS = 120.0
UNKNOWN_START = "no start of it is known here"


class StartLog:
    """See the module docstring."""

    def __init__(self, keep: float = KEEP_RESULTS) -> None:
        self.keep = keep
        self._results: dict[str, tuple[float, dict]] = {}

    def finished(self, name: str, outcome: dict, now: float) -> None:
        """A start ended with ``outcome``; outcomes kept too long are forgotten."""
        self._results[name] = (now, outcome)
        cutoff = now - self.keep
        for n in [n for n, (t, _) in self._results.items() if t < cutoff]:
            del self._results[n]

    def names(self) -> list[str]:
        return list(self._results)

    def outcome(self, name: str) -> dict:
        """The start's outcome, or a failure when it is not (or no longer) known."""
        kept = self._results.get(name)
        if kept is not None:
            return kept[1]
        return {"name": name, "ok": False, "error": {"code": "driver_error", "message": UNKNOWN_START}}
