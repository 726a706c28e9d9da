"""RefillCore: which sandboxes each type's pool starts, drops or replaces, and on which node.

What it owns: the refill decisions over the registry core's records and its
:class:`~corral.core.pool.PoolCore` per type: STARTING records for each type's
deficit (its target plus the acquirers waiting, minus what is warm, starting
or resetting), placed on the nodes with room
(:func:`~corral.core.placement.place`; a waiter pinned to a node is served by
a start there), the warm surplus to drop once it has lasted, the warm
sandboxes that failed their health probes too often, and those that listen
where other nodes cannot reach them. It keeps no state of its own: the
targets, back-off, shrink timer and strikes are each type's PoolCore's, the
records and wait lines the :class:`~corral.core.registry.RegistryCore`'s.

No Ray, no I/O: the RegistryActor calls it in its tick (and after a probe) and
sends the starts and teardowns it returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from corral.models import ContainerModel, ContainerState

from .placement import NodeView, node_pref, place

if TYPE_CHECKING:
    from .registry import RegistryCore, Teardown

__all__ = ["RefillCore"]

S = ContainerState


class RefillCore:
    """The refill decisions of one :class:`~corral.core.registry.RegistryCore`, made in its tick
    (see the module docstring)."""

    def __init__(self, core: "RegistryCore") -> None:
        self.core = core

    def plan_starts(self, nodes: list[NodeView], now: Optional[float] = None) -> list[ContainerModel]:
        """STARTING records for every type's deficit, placed on ``nodes`` (views this call updates
        as it places). Cold starts waiting for a slot go first: call ``AcquireCore.admit`` before.
        ``now``: this core's clock (the one a failed start's back-off was set with), by default."""
        core = self.core
        now = core.clock() if now is None else now
        out = []
        if core.lines.slots:
            return out  # a slot that frees goes to the line, not to a refill
        views = {v.node_id: v for v in nodes}
        for t, pool in core.pools.items():
            if t not in core.config.sandbox_types or now < pool.retry_at:
                continue
            # waiters pinned to a node are served by starts on that node; the rest by placement
            need: dict[str, int] = {}
            for w in core.lines.warm.get(t, {}).values():
                node, strict = node_pref(w.node)
                if strict and node in views:
                    need[node] = need.get(node, 0) + 1
            chosen: list[str] = []
            for node, k in need.items():
                coming = sum(1 for r in core.on_node(node, S.WARM, S.STARTING, S.RESETTING) if r.sandbox_type == t)
                for _ in range(max(0, k - coming)):
                    v = views[node]
                    if v.free > 0 and v.start_slots > 0:
                        chosen.append(node)
                        v.active += 1
                        v.starting += 1
            n = pool.deficit(core.warm_count(t), core.count(t, S.STARTING),
                             core.count(t, S.RESETTING), core.lines.warm_waiting(t) - sum(need.values()), now)
            for nid in place(n, views.values()):
                views[nid].active += 1
                views[nid].starting += 1
                chosen.append(nid)
            for nid in chosen:
                rec = core.reserve(t, node=nid)
                if rec is None:  # at max_sandbox_instances
                    return out
                out.append(rec)
        return out

    def plan_shrink(self, now: Optional[float] = None) -> list[Teardown]:
        """Warm sandboxes beyond the target (once the surplus has lasted), newest first.
        ``now``: this core's clock, by default."""
        core = self.core
        now = core.clock() if now is None else now
        out = []
        for t, pool in core.pools.items():
            n = pool.shrink(core.warm_count(t), core.lines.warm_waiting(t), now)
            for name in list(core.warm.get(t, {}))[-n:] if n > 0 else []:
                td = core.release(name)
                if td is not None:
                    out.append(td)
        return out

    def probed(self, sandbox_type: str, results: dict[str, bool]) -> list[Teardown]:
        """Fold in the answers of a health probe of some of the type's warm sandboxes (those the
        :class:`~corral.core.health.HealthCore` chose); teardowns of the sick ones."""
        core = self.core
        warm = core.warm.get(sandbox_type, {})
        out = []
        # an answer about a sandbox that left WARM since (acquired, gone) says nothing about it now
        for name in core.pool(sandbox_type).probe({n: ok for n, ok in results.items() if n in warm}, warm=warm):
            td = core.release(name)
            if td is not None:
                out.append(td)
        return out

    def replace_loopback(self) -> list[Teardown]:
        """Other nodes joined the cluster: warm sandboxes listening on loopback are out of their
        reach and go (the refill starts their replacements on the node's address); sandboxes in
        use stay with their sessions."""
        core = self.core
        tds = [core.release(r.container_name) for r in core.by_state(S.WARM)
               if (r.url or "").startswith("http://127.0.0.1")]
        return [td for td in tds if td is not None]
