"""HealthCore: which warm sandboxes the registry probes, and when.

What it owns: when each warm sandbox was last sent to a health probe (or, until
its first, when it was first seen warm), the probes sent and not yet answered,
and each node's probe budget. Each warm sandbox is probed about every
:data:`HEALTH_EVERY` seconds, and a node sends at most :data:`PROBES_PER_S`
probes a second: with ``n`` warm sandboxes on a node, each is probed every
``max(HEALTH_EVERY, n / PROBES_PER_S)`` seconds. Probes go out in batches, one
per plan (the registry's tick): of those due on a node, the longest unprobed
first, as many as its budget allows (what the time since its last plan earned,
never more than one period's worth). A pool has one probe call out at a time:
while it has, none of its sandboxes is due.

What an answer means (strikes, replacement) is the type's
:class:`~corral.core.pool.PoolCore`'s and :meth:`RefillCore.probed
<corral.core.refill.RefillCore.probed>`'s decision, not this one's.

No Ray, no I/O, an injected clock (``now`` arguments).
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["HealthCore", "HEALTH_EVERY", "PROBES_PER_S"]

#: Seconds between two probes of a warm sandbox while its node has few.
HEALTH_EVERY = 5.0
#: Probes a node sends a second at most, all its pools together: a probe costs its pool actor CPU,
#: and hundreds of warm sandboxes probed at once would keep that actor from its starts.
PROBES_PER_S = 20.0


class HealthCore:
    """The probe schedule of a registry's warm sandboxes (see the module docstring)."""

    def __init__(self, every: float = HEALTH_EVERY, rate: float = PROBES_PER_S) -> None:
        self.every = every
        self.rate = rate
        self.last: dict[str, float] = {}  # warm sandbox -> last probe sent (first seen warm, until then)
        self.flying: dict[str, tuple[str, str]] = {}  # sandbox -> (type, node) of its probe not yet answered
        self._budget: dict[str, float] = {}  # node -> probes it may send now
        self._planned: dict[str, float] = {}  # node -> when its budget was last counted

    def period(self, n: int) -> float:
        """Seconds between two probes of a warm sandbox on a node with ``n`` of them."""
        return max(self.every, n / self.rate)

    def plan(self, warm: Iterable[tuple[str, str, str]], now: float) -> dict[tuple[str, str], list[str]]:
        """The probes to send now: ``(sandbox_type, node) -> names``, each a batch for that pool.
        ``warm``: ``(name, sandbox_type, node)`` of every warm sandbox a probe can reach; those
        missing are forgotten (no longer warm). The names returned count as probed from ``now``
        and are in flight until :meth:`answered`."""
        busy = set(self.flying.values())
        due: dict[str, list[tuple[float, str, str]]] = {}
        seen: set[str] = set()
        for name, t, node in warm:
            seen.add(name)
            last = self.last.setdefault(name, now)
            due.setdefault(node, [])
            if now - last >= self.every and (t, node) not in busy:
                due[node].append((last, name, t))
        for name in [n for n in self.last if n not in seen]:
            del self.last[name]
        for node in [n for n in self._planned if n not in due]:
            del self._planned[node], self._budget[node]
        out: dict[tuple[str, str], list[str]] = {}
        for node, items in due.items():
            since = now - self._planned.get(node, now)
            budget = self._budget.get(node, 0.0) + self.rate * min(max(since, 0.0), self.every)
            items.sort()
            taken = items[:int(budget)]
            # only the fraction of a probe carries over: a node with nothing due saves no burst
            self._budget[node] = budget % 1.0
            self._planned[node] = now
            for _, name, t in taken:
                out.setdefault((t, node), []).append(name)
                self.last[name] = now
                self.flying[name] = (t, node)
        return out

    def answered(self, names: Iterable[str]) -> None:
        """The probe call of ``names`` returned (or failed): their pool may be probed again."""
        for name in names:
            self.flying.pop(name, None)
