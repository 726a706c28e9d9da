"""What the registry's ``status()`` and ``reserve()`` report, assembled in plain Python.

What it owns: the shape of those answers. Per type: its PoolCore's stats, its
sandboxes by state, its waiters and its reset latency; per node: capacity,
load and records by state; the sessions and every record's public view. The
facts are the :class:`~corral.core.registry.RegistryCore`'s (records, lines,
pools) and the shell's (the PoolActors' own stats, session actors, the lane,
the process), passed in; nothing here is kept or decided.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional

from corral.models import ContainerState

from .placement import NodeView
from .stats import LatencyWindow

if TYPE_CHECKING:
    from .registry import RegistryCore

__all__ = ["pool_status", "registry_status"]

S = ContainerState


def pool_status(core: "RegistryCore", sandbox_type: str, reset_ms: Optional[LatencyWindow] = None) -> dict:
    """One type's pool: target, back-off and totals, its sandboxes by state, its waiters, and how
    long its resets take (``reset_ms``: the shell's window of them)."""
    t = sandbox_type
    return {**core.pool(t).stats(), "warm": core.warm_count(t), "starting": core.count(t, S.STARTING),
            "resetting": core.count(t, S.RESETTING), "running": core.count(t, S.RUNNING),
            "waiting": core.lines.warm_waiting(t), "reset_ms": (reset_ms or LatencyWindow()).summary()}


def registry_status(core: "RegistryCore", views: list[NodeView], pool_actors: Iterable[Any],
                    reset_ms: dict[str, LatencyWindow], sessions: dict, **shell: Any) -> dict:
    """The registry's whole picture. ``pool_actors``: each PoolActor's ``stats()`` (an exception
    for one that did not answer: left out); ``sessions``: the session actors' stats; ``shell``:
    facts of the actor itself (namespace, owner, process, lane, ...), reported as given."""
    pools = {t: {**pool_status(core, t, reset_ms.get(t)), "actors": []} for t in core.config.sandbox_types}
    for a in pool_actors:
        if isinstance(a, dict) and a.get("sandbox_type") in pools:
            pools[a["sandbox_type"]]["actors"].append(a)
    states = core.node_counts()
    return {
        "counts": core.counts(), "active": core.counted, "limit": core.limit,
        "waiting_for_slot": len(core.lines.slots), "waiting_for_warm": core.lines.counts()["warm"],
        "pools": pools,
        "nodes": {v.node_id: {"address": v.address, "capacity": v.capacity, "start_limit": v.start_limit,
                              "active": v.active, "starting": v.starting, "states": states.get(v.node_id, {})}
                  for v in views},
        "sessions": {sid: list(names) for sid, names in core.sessions.items()},
        "session_actors": sessions["bound"], "spare_session_actors": sessions["spares"],
        "records": [r.public() for r in core.records.values()],
        **shell,
    }
