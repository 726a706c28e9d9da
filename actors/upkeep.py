"""Upkeep: the registry's watch over nodes and their containers.

What it owns: the node-table follow-up (nodes that come and go, a machine that came back under a
new node id after a Ray restart, records of nodes that never come back), a long poll per node on
its engine's events, the periodic reconciliation of each node's containers with the records, and
the health probes of warm sandboxes. It decides nothing itself: the registry's cores do
(``node_lost``, ``move_node``, ``reconcile``, ``engine_stopped``; ``HealthCore.plan``,
``RefillCore.probed`` and ``replace_loopback``); this carries the calls and the outcomes. Part of
the RegistryActor (``reg``), split out by concern.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from corral.models import ContainerState

from .common import fire
from .handles import ActorGone, PoolHandle

if TYPE_CHECKING:
    from .registry_actor import RegistryActor

__all__ = ["Upkeep", "WATCH_TIMEOUT", "NODE_GRACE"]

logger = logging.getLogger("corral.registry")
S = ContainerState
WATCH_TIMEOUT = 30.0  # seconds a pool's engine watch waits before answering "nothing"
#: Seconds a node that records name may stay out of Ray's node table before its sandboxes are lost
#: (after a registry or head restart, worker nodes take a moment to register again).
NODE_GRACE = 30.0


class Upkeep:
    """See the module docstring."""

    def __init__(self, reg: "RegistryActor") -> None:
        self.reg = reg
        self._watchers: dict[str, asyncio.Task] = {}
        self._missing: dict[str, float] = {}  # node named by records, not in the node table: since when

    # -- nodes -----------------------------------------------------------------

    async def follow_nodes(self) -> None:
        reg = self.reg
        was_single = reg.nodes.cluster_size <= 1
        came, went = await reg.nodes.refresh()
        reg.core.addresses = reg.nodes.addresses()
        if was_single and reg.nodes.cluster_size > 1 and not reg.config.advertise_host:
            self._replace_loopback()
        for node in went:
            self._lose(node, "it left Ray's node table")
        self.place_orphan_records()
        for node in came:
            self.watch(node)
            await self.reconcile_node(node)  # a node that comes back may still run old sandboxes
        if came or went:
            reg.kick()

    def _replace_loopback(self) -> None:
        """Other nodes joined: a warm sandbox listening on loopback is out of their reach. It is
        replaced by one on the node's address; sandboxes in use stay with their sessions."""
        tds = self.reg.refill.replace_loopback()
        if tds:
            logger.info("the cluster has several nodes now: replacing %d warm sandboxes that listen on "
                        "127.0.0.1 only", len(tds))
            self.reg.outbox.put(*[("teardown", td) for td in tds])

    def place_orphan_records(self) -> None:
        """Records naming a node that is not in the node table: a live node at the same address is
        that machine after a Ray restart, and the records move to it; a node missing longer than
        :data:`NODE_GRACE` is lost."""
        reg, now = self.reg, time.monotonic()
        for node, address in reg.core.nodes_of_records().items():
            if node in reg.nodes.nodes:
                self._missing.pop(node, None)
                continue
            same = reg.nodes.by_address(address)
            if same is not None:
                moved = reg.core.move_node(node, same)
                logger.info("%d records of node %s move to node %s (same address %s: Ray restarted)", moved,
                            node[:12], same[:12], address)
                self._missing.pop(node, None)
            elif now - self._missing.setdefault(node, now) > NODE_GRACE:
                self._lose(node, f"it has not been in Ray's node table for {NODE_GRACE:.0f}s")
                self._missing.pop(node, None)

    def _lose(self, node: str, why: str) -> None:
        reg = self.reg
        task = self._watchers.pop(node, None)
        if task is not None:
            task.cancel()
        lost = reg.core.node_lost(node)
        reg.starts.fail(reg.starts.on_node(node), f"node {node[:12]} died while starting it")
        for rec in lost:
            reg.outbox.put(*reg.sessions.ended(rec.session_ctx_id, rec.container_name))
        logger.warning("node %s is gone (%s): %d sessions' sandboxes lost with it", node[:12], why, len(lost))
        fire(reg.commit(), "commit")

    # -- engine events -------------------------------------------------------------

    def watch(self, node: str) -> None:
        if node not in self._watchers:
            self._watchers[node] = fire(self._watch_engine(node), f"watch node {node[:12]}")

    async def _watch_engine(self, node: str) -> None:
        """Keep a long poll open on the node's engine: a sandbox it stops is gone at once."""
        while node in self.reg.nodes.nodes:
            info = self.reg.nodes.nodes[node]
            try:
                dead = await info.lister().watch(WATCH_TIMEOUT)
            except (ActorGone, asyncio.TimeoutError):
                await asyncio.sleep(1.0)
                continue
            if dead:
                self._engine_dead(node, dead)

    def _engine_dead(self, node: str, names: list[str]) -> None:
        reg = self.reg
        tds, left = reg.core.engine_stopped(node, names)
        reg.outbox.put(*[m for s, n in left for m in reg.sessions.ended(s, n)])
        if tds:
            logger.warning("the engine of node %s stopped %d sandboxes", node[:12], len(tds))
            reg.outbox.put(*[("teardown", td) for td in tds])
            fire(reg.commit(), "commit")
            reg.kick()

    # -- reconciliation ------------------------------------------------------------

    async def reconcile_node(self, node: str) -> None:
        reg = self.reg
        info = reg.nodes.nodes.get(node)
        if info is None:
            return
        try:
            if await info.lister().reconcile_network():
                logger.warning("node %s had lost sandboxes' network rules (a firewall reload?): put back", node[:12])
            observed = await info.lister().list()
            flying: set[str] = set()
            for pool in info.pools.values():
                flying.update(await pool.in_flight())
        except (ActorGone, asyncio.TimeoutError) as e:
            logger.warning("reconcile of node %s skipped: %s", node[:12], e)
            return
        core = reg.core
        unclaimed = [n for n in flying if n not in reg.starts.dispatched and n in core.records
                     and core.records[n].state == S.STARTING]
        plan = core.reconcile(node, observed, flying | reg.starts.dispatched)
        if plan.remove:
            fire(info.lister().remove(plan.remove), f"remove {len(plan.remove)} orphans")
        if plan.remove or plan.lost:
            logger.warning("reconcile of node %s: removed %d unknown containers, %d records lost their container",
                           node[:12], len(plan.remove), len(plan.lost))
            reg.kick()
        for t in {core.records[n].sandbox_type for n in unclaimed}:
            names = [n for n in unclaimed if core.records[n].sandbox_type == t]
            fire(reg.starts.collect(info.pools[t], names), f"collect {len(names)} starts")

    # -- health ----------------------------------------------------------------

    def probe_all(self) -> None:
        """Send the health probes :class:`~corral.core.health.HealthCore` says are due now, a batch
        per pool."""
        reg, core = self.reg, self.reg.core
        warm = []
        for t, names in core.warm.items():
            for name in names:
                node = core.node_of(core.records[name])
                if reg.nodes.pool(t, node) is not None:
                    warm.append((name, t, node))
        for (t, node), names in reg.health.plan(warm, time.monotonic()).items():
            recs = [core.records[n].model_dump(mode="json") for n in names]
            fire(self._probe(reg.nodes.pool(t, node), names, recs), f"probe {len(names)} {t}")

    async def _probe(self, pool: PoolHandle, names: list[str], warm: list[dict]) -> None:
        reg = self.reg
        try:
            results = await pool.probe(warm)
        except (ActorGone, asyncio.TimeoutError):
            return
        finally:
            reg.health.answered(names)
        tds = reg.refill.probed(pool.sandbox_type, results)
        if tds:
            for td in tds:
                logger.warning("warm sandbox %s failed its health checks; replacing it", td.record.container_name)
            await reg.commit()
            reg.outbox.put(*[("teardown", td) for td in tds])
            reg.kick()
