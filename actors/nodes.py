"""NodeSet: the Ray nodes that run sandboxes, and the PoolActors on each.

What it owns: for every live node that may run sandboxes (every node, or those
with ``config.node_resource``), its capacity and starts-at-once limit (from
the config, else from the node's CPUs and memory), its address, and a
:class:`~actors.handles.PoolHandle` per sandbox type. :meth:`refresh` reads
Ray's node table (a GCS call, run in a thread) and reports which nodes came
and went; the registry decides what a lost node means for its records.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Optional

import ray

from corral.core.placement import NodeView, default_capacity, default_start_limit
from corral.models import SandboxManagerEnvConfig

from .handles import PoolHandle

__all__ = ["NodeSet", "NodeInfo"]

logger = logging.getLogger("corral.registry")


@dataclass
class NodeInfo:
    node_id: str
    address: str
    capacity: int
    start_limit: int
    cpus: float
    pools: dict[str, PoolHandle] = field(default_factory=dict)

    def lister(self) -> PoolHandle:
        """The pool that lists and removes the node's containers (any type's sees them all)."""
        return self.pools[min(self.pools)]


class NodeSet:
    """See the module docstring."""

    def __init__(self, config: SandboxManagerEnvConfig, owner: str) -> None:
        self.config = config
        self.owner = owner
        self.nodes: dict[str, NodeInfo] = {}
        self.cluster_size = 1  # live nodes of the Ray cluster, eligible or not

    def eligible(self, entry: dict) -> bool:
        res = self.config.node_resource
        return bool(entry.get("Alive")) and (not res or (entry.get("Resources") or {}).get(res, 0) > 0)

    def _info(self, entry: dict) -> NodeInfo:
        res = entry.get("Resources") or {}
        cpus = float(res.get("CPU", 1) or 1)
        cap = self.config.max_sandboxes_per_node
        limit = self.config.max_starting_per_node
        return NodeInfo(
            node_id=entry["NodeID"],
            address=entry.get("NodeManagerAddress", ""),
            capacity=default_capacity(cpus, float(res.get("memory", 0) or 0)) if cap is None else cap,
            start_limit=default_start_limit(cpus) if limit is None else limit,
            cpus=cpus,
        )

    async def refresh(self) -> tuple[list[str], list[str]]:
        """Read the node table; returns (nodes that came, nodes that went). Pools of new nodes
        are started (or found, after a registry restart) before this returns."""
        entries = await asyncio.to_thread(ray.nodes)
        self.cluster_size = sum(1 for e in entries if e.get("Alive"))
        live = {e["NodeID"]: e for e in entries if self.eligible(e)}
        came = [n for n in live if n not in self.nodes]
        went = [n for n in self.nodes if n not in live]
        for node in went:
            del self.nodes[node]
        for node in came:
            info = self._info(live[node])
            await self.ensure_pools(info)
            self.nodes[node] = info
            logger.info("node %s (%s): capacity %d, %d starts at once", node[:12], info.address, info.capacity,
                        info.start_limit)
        return came, went

    async def ensure_pools(self, info: NodeInfo) -> None:
        raw = self.config.model_dump(mode="json")
        for t in self.config.sandbox_types:
            if t not in info.pools:
                info.pools[t] = await asyncio.to_thread(
                    PoolHandle.create, raw, t, info.node_id, self.owner, self.config.namespace, info.address)

    def advertise(self, node: str) -> Optional[str]:
        """The address a box on ``node`` listens and is reached at (see ``advertise_host``): None
        (the driver's loopback default) on a single-node cluster, the node's address otherwise."""
        want = self.config.advertise_host
        if want and want != "node":
            return want
        if want == "node" or self.cluster_size > 1:
            info = self.nodes.get(node)
            return info.address if info else None
        return None

    def pool(self, sandbox_type: str, node: str) -> Optional[PoolHandle]:
        info = self.nodes.get(node)
        return info.pools.get(sandbox_type) if info else None

    def addresses(self) -> dict[str, str]:
        return {n.node_id: n.address for n in self.nodes.values()}

    def by_address(self, address: Optional[str]) -> Optional[str]:
        """The live node at ``address`` (None when none is)."""
        return next((n.node_id for n in self.nodes.values() if address and n.address == address), None)

    def views(self) -> list[NodeView]:
        return [NodeView(n.node_id, n.capacity, start_limit=n.start_limit, address=n.address)
                for n in self.nodes.values()]

    def all_pools(self) -> list[PoolHandle]:
        return [p for n in self.nodes.values() for p in n.pools.values()]
