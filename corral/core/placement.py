"""Placement: which node a new sandbox starts on. Plain Python, no Ray.

What it owns: nothing durable. :class:`NodeView` is the registry's picture of
one node at a tick (its capacity, its sandboxes, its starts in flight), and
:func:`place` decides where ``n`` new sandboxes go: the node with the most
free capacity first, never beyond a node's capacity (``max_sandboxes_per_node``)
or its starts at once (``max_starting_per_node``), so a burst spreads over the
cluster instead of thrashing one node's CPUs. :func:`node_pref` reads the node
a request names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = ["NodeView", "place", "node_pref", "default_capacity", "default_start_limit", "START_FACTOR"]


@dataclass
class NodeView:
    """One node as the registry sees it now."""

    node_id: str
    capacity: int  # sandboxes this node may hold (counted states)
    active: int = 0  # sandboxes it holds now (STARTING, WARM, RUNNING, RESETTING)
    starting: int = 0  # starts in flight on it
    start_limit: int = 4  # starts it may run at once
    address: str = ""

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.active)

    @property
    def start_slots(self) -> int:
        return max(0, self.start_limit - self.starting)


def default_capacity(cpus: float, memory_bytes: float) -> int:
    """Sandboxes a node holds by default: 32 per CPU, at most one per 256 MiB of memory.

    Agents' sandboxes mostly wait (on a model, on the trainer), so CPUs are shared many ways;
    memory is what a node runs out of first (a box with its kernel is ~70-90 MiB, its session
    actor ~60 MiB)."""
    by_cpu = int(32 * max(cpus, 1))
    by_mem = int(memory_bytes // (256 * 1024 * 1024)) if memory_bytes else by_cpu
    return max(1, min(by_cpu, by_mem))


#: Starts a node runs at once, per CPU. Measured (docs/performance.md, "Cold starts"): on 2 CPUs,
#: sandboxes per second peak at 2 starts in flight with both drivers; more only lengthen each start
#: (Docker: 0.9 s at 2, 1.9 s at 4, 3.5 s at 8, the same throughput) or cost throughput (process
#: driver: 6.6 cycles/s at 2, 5.3 at 4, 3.4 at 8, as concurrent boots thrash the CPUs).
START_FACTOR = 1.0


def default_start_limit(cpus: float) -> int:
    """Starts a node runs at once by default: one per CPU (:data:`START_FACTOR`), at least one."""
    return max(1, int(round(START_FACTOR * cpus)))


def place(n: int, nodes: Iterable[NodeView], prefer: Optional[str] = None) -> list[str]:
    """Node ids for up to ``n`` new sandboxes (fewer when the nodes are full or busy starting).

    ``prefer``: a node id to fill first while it has room (an acquire pinned to a node)."""
    views = {v.node_id: [v.free, v.start_slots, v.starting] for v in nodes}
    out: list[str] = []
    for _ in range(max(0, n)):
        open_ = [nid for nid, (free, slots, _) in views.items() if free > 0 and slots > 0]
        if not open_:
            break
        if prefer in open_:
            nid = prefer
        else:  # most free capacity, then fewest starts in flight, then a stable order
            nid = max(open_, key=lambda k: (views[k][0], -views[k][2], k))
        out.append(nid)
        views[nid][0] -= 1
        views[nid][1] -= 1
        views[nid][2] += 1
    return out


def node_pref(node: Optional[str]) -> tuple[Optional[str], bool]:
    """(node to look on first, only there?) for a request's ``node``: None or "any" -> anywhere;
    "local:<id>" -> that node first, then anywhere; a node id -> only there."""
    if not node or node == "any":
        return None, False
    if node.startswith("local:"):
        return node[len("local:"):] or None, False
    return node, True
