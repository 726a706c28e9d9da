"""RegistryActor: the one owner of a namespace's records, and the one that decides.

What it owns: the :class:`~corral.core.registry.RegistryCore` (records, wait lines, pool
targets), the :class:`~corral.core.refill.RefillCore` deciding over it, the
:class:`~corral.core.health.HealthCore` (which warm sandboxes to probe when), the record store it
checkpoints to, the lock that makes it the only registry of its state dir and namespace, its
tick, its lane, and the parts that carry its decisions out: :class:`~actors.callers.Callers`
(acquire, create, restore and reserve, and the callers waiting in line),
:class:`~actors.starts.Starts` (starts sent to pools), :class:`~actors.upkeep.Upkeep` (nodes,
engines, reconciliation, health), :class:`~actors.teardowns.Teardowns` (what the outbox sends),
:class:`~actors.shutdown.Shutdown` (``corral down``), :class:`~actors.nodes.NodeSet` (the
PoolActor of each type on each node) and :class:`~actors.sessions.SessionShell` (session actors).

Commands go one way. Clients call the registry; the registry calls pools and session actors and
learns every outcome from return values. Pools never call it; session actors call it only to
reap their session. Messages an answer causes (teardowns, attaches) go out after it, in order,
through an :class:`~actors.common.Outbox`. The tick reconciles: admits callers waiting for a
slot, refills each type on the nodes with room, shrinks surpluses, probes warm sandboxes, follows
the node table and each node's containers, keeps the session actors topped up.

Detached, named, restarted forever. On (re)start it takes its state dir's lock, reloads its
records, finds its nodes' pools and what they are starting, and reconciles.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Optional

import ray

from corral.core.health import HealthCore
from corral.core.refill import RefillCore
from corral.core.registry import RegistryCore
from corral.core.status import pool_status, registry_status
from corral.lane import LaneServer
from corral.models import ContainerState, SandboxManagerEnvConfig, check_env, owner_id
from corral.statedir import ConfigOverrides, RegistryLock, remember
from corral.store import JsonlRecordStore

from .callers import Callers
from .common import CONTROL_NICE, Outbox, Ticker, set_priority
from .metrics import registry_metrics
from .nodes import NodeSet
from .sessions import SessionShell
from .shutdown import Shutdown
from .starts import Starts
from .teardowns import Teardowns
from .upkeep import Upkeep

__all__ = ["RegistryActor"]

logger = logging.getLogger("corral.registry")
S = ContainerState
COMPACT_EVERY = 5000  # log lines between snapshots
NODES_EVERY = 2.0  # seconds between reads of Ray's node table
PROBE_EVERY = 1.0  # seconds between batches of health probes (HealthCore decides whom each probes)


class RegistryActor:
    """See the module docstring. Every public method is safe to retry (Ray may)."""

    def __init__(self, config: dict, sweep: bool = False) -> None:
        self.nice = set_priority(CONTROL_NICE)  # answers acquires and releases: ahead of the sandboxes
        base = SandboxManagerEnvConfig.model_validate(config)
        self._overrides = ConfigOverrides(base.abs_state_dir(), base.namespace)
        self.config = self._overrides.apply(base)
        self.ns = self.config.namespace
        self.owner = owner_id(self.config)
        self.node = ray.get_runtime_context().get_node_id()
        self.core = RegistryCore(self.config, registry_id=self.ns, node=self.node)
        self.refill = RefillCore(self.core)
        self.health = HealthCore()
        self.store = JsonlRecordStore(os.path.join(self.config.abs_state_dir(), self.ns, "registry"))
        self.lock = RegistryLock(self.config.abs_state_dir(), self.ns)
        self.nodes = NodeSet(self.config, self.owner)
        self.sessions = SessionShell(self.config, time.monotonic, self.core, self.nodes)
        self.starts = Starts(self)
        self.upkeep = Upkeep(self)
        self.teardowns = Teardowns(self)
        self.outbox = Outbox(self.teardowns.send)
        self.shutdown = Shutdown(self)
        self.callers = Callers(self)
        self._sweep = sweep
        self._boot_task: Optional[asyncio.Task] = None
        self._ticker: Optional[Ticker] = None
        self._lane: Optional[LaneServer] = None
        self._commit_lock = asyncio.Lock()
        self._due = {"nodes": 0.0, "health": 0.0, "reconcile": 0.0}
        self.metrics = registry_metrics()
        self.started_at = time.time()

    # -- boot ------------------------------------------------------------------

    async def _ready(self) -> None:
        if self._boot_task is None:
            self._boot_task = asyncio.ensure_future(self._boot())
        await asyncio.shield(self._boot_task)

    async def _boot(self) -> None:
        cluster = ray.get_runtime_context().gcs_address
        await asyncio.to_thread(self.lock.acquire, {"node": self.node, "cluster": cluster, "namespace": self.ns})
        await asyncio.to_thread(remember, self.ns, self.config.abs_state_dir(),
                                self.config.driver_config().model_dump(mode="json"))
        self.core.load_records(await self.store.load())
        self.outbox.put(*[("teardown", td) for td in self.core.abandon_resets()])
        await self.nodes.refresh()
        self.core.addresses = self.nodes.addresses()
        # Records of a machine that came back under a new node id (Ray restarted) move to it before
        # its containers are reconciled: they are its records' containers, not unknown ones.
        self.upkeep.place_orphan_records()
        await self.sessions.adopt(self.ns)
        for node in list(self.nodes.nodes):
            await self.upkeep.reconcile_node(node)
            self.upkeep.watch(node)
        if self._sweep:
            names = self.shutdown.release_everything()
            logger.warning("released %d sandboxes left by a process that exited without cleaning up", len(names))
        await self.commit()
        await self.store.compact([r.model_dump(mode="json") for r in self.core.records.values()])
        self.core.take_changes()
        self._ticker = Ticker("registry-tick", max(self.config.watcher_scan_interval, 0.2) or 1.0, self._tick)
        self._ticker.start()
        if self.config.registry_lane:
            await self._open_lane()
        logger.info("registry up: %d records, %d sessions, %d nodes", len(self.core.records),
                    len(self.core.sessions), len(self.nodes.nodes))

    async def _open_lane(self) -> None:
        lane = LaneServer({"acquire": self.acquire, "release_many": self.release_many, "get_info": self.get_info},
                          tag=self.ns)
        try:
            await lane.start()
        except OSError as e:  # callers use Ray calls: slower, nothing else changes
            logger.warning("no lane for callers on this node (%s); they use Ray calls", e)
            return
        self._lane = lane

    async def hello(self) -> dict:
        """What a client needs to join: the running config, the lane, this node and owner."""
        await self._ready()
        return {"config": self.config.model_dump(mode="json"), "lane": await self.lane_address(),
                "node": self.node, "owner": self.owner}

    async def lane_address(self) -> Optional[dict]:
        """Where callers on this node send acquires and releases (None: no lane, use Ray)."""
        await self._ready()
        if self._lane is None:
            return None
        return {"path": self._lane.path, "token": self._lane.token, "node_id": self.node}

    async def close_lane(self) -> bool:
        """Stop the lane and remove its socket (``corral down``, before this actor is killed)."""
        if self._lane is None:
            return False
        self._lane.close()
        self._lane = None
        return True

    # -- the tick ----------------------------------------------------------------

    def kick(self) -> None:
        if self._ticker is not None:
            self._ticker.kick()

    async def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._due["nodes"]:
            self._due["nodes"] = now + NODES_EVERY
            await self.upkeep.follow_nodes()
        self.admit_and_refill()
        self.outbox.put(*[("teardown", td) for td in self.refill.plan_shrink()])
        self.core.expire()
        if now >= self._due["health"]:
            self._due["health"] = now + PROBE_EVERY
            self.upkeep.probe_all()
        if now >= self._due["reconcile"]:
            self._due["reconcile"] = now + self.config.reconcile_interval
            for node in list(self.nodes.nodes):
                await self.upkeep.reconcile_node(node)
            await self.sessions.check()
        self.sessions.tick()
        await self.commit()
        if self.store.log_lines > COMPACT_EVERY:
            async with self._commit_lock:
                await self.store.compact([r.model_dump(mode="json") for r in self.core.records.values()])
        self.metrics.set_counts(self.core, self.sessions.stats())

    def admit_and_refill(self) -> None:
        """Reserves that are satisfied answered; callers waiting for a slot, then each type's
        deficit, started on their nodes (unless draining)."""
        self.callers.answer_ready()
        if self.shutdown.draining:
            return
        views = self.views()
        self.callers.admit(views)
        recs = self.refill.plan_starts(views)
        if recs:
            self.starts.dispatch(recs)

    def views(self):
        """Each node as placement sees it now."""
        return self.core.fill_views(self.nodes.views())

    async def commit(self) -> None:
        """Append every pending change to the store before the caller is answered (group commit)."""
        if not self.core.pending_changes():
            return
        async with self._commit_lock:
            changed, deleted = self.core.take_changes()
            await self.store.append(changed, deleted)

    # -- acquire, create (see actors/callers.py) -------------------------------------

    async def acquire(self, sandbox_type: str, requests: list, timeout: Optional[float] = None,
                      wait: bool = True) -> list:
        """Bind a warm sandbox of the type to each request (``{"session_ctx_id", "meta", "node"}``).

        One answer per request, in order: the RUNNING record as a dict, a corral error (raised
        by the client), or None when none was warm and ``wait`` is False. Requests that find
        nothing warm wait in line (FIFO per type) until a sandbox turns WARM or ``timeout`` passes.
        """
        await self._ready()
        return await self.callers.acquire(self.config.sandbox_type(sandbox_type).name, requests, timeout, wait)

    async def create(self, sandbox_type: Optional[str] = None, session_ctx_id: Optional[str] = None,
                     meta: Optional[dict] = None, mount_dir: Optional[str] = None,
                     storage_path: Optional[str] = None, environment: Optional[dict] = None,
                     timeout: Optional[float] = None, node: Optional[str] = None) -> dict:
        """A new sandbox started for this call (a mount dir, a storage path, a type with no pool),
        bound to ``session_ctx_id`` (one of corral's own when None). Waits for a slot."""
        await self._ready()
        t = self.config.sandbox_type(sandbox_type).name
        env = check_env(environment)
        return await self.callers.create(t, session_ctx_id, meta, mount_dir, storage_path, env, timeout, node)

    # -- release, reap, restore ----------------------------------------------------

    async def release(self, identity: str) -> bool:
        """Mark released now; the sandbox's teardown finishes in the background. Unknown: True."""
        r = (await self.release_many([identity]))[0]
        if isinstance(r, BaseException):
            raise r
        return r

    async def release_many(self, identities: list) -> list:
        """:meth:`release` for each identity, with one commit (a client batches concurrent releases).
        One answer per identity: True, or the corral error."""
        await self._ready()
        out, tds, left = self.core.release_many(identities)
        await self.commit()
        self.outbox.put(*[("teardown", td) for td in tds], *[m for s, n in left for m in self.sessions.ended(s, n)])
        if left:
            self.metrics.releases.inc(len(left))
        self.kick()  # a slot may have freed
        return out

    async def reap_session(self, session_ctx_id: str, reason: str = "heartbeat_timeout") -> bool:
        """RUNNING -> RECYCLED for every sandbox of the session; their containers go, records stay."""
        await self._ready()
        names = self.core.session_names(session_ctx_id)
        if not names:
            return False
        tds = [td for td in (self.core.recycle(n, reason) for n in names) if td is not None]
        await self.commit()
        self.outbox.put(*[("teardown", td) for td in tds],
                        *[m for n in names for m in self.sessions.ended(session_ctx_id, n)])
        self.kick()
        if tds:
            self.metrics.reaps.inc()
        return True

    async def restore_session(self, session_ctx_id: str) -> list[str]:
        """Bring back every RECYCLED or LOST sandbox of a session; concurrent calls share one restore."""
        await self._ready()
        return await self.callers.restore(session_ctx_id)

    async def heartbeat(self, session_ctx_id: str) -> bool:
        await self._ready()
        return await self.sessions.heartbeat(session_ctx_id)

    # -- the reference's start / stop / get_status, configuration ------------------

    async def container_op(self, identity: str, op: str) -> str:
        await self._ready()
        rec = self.core.get(identity)
        pool = self.nodes.pool(rec.sandbox_type, self.core.node_of(rec))
        if pool is None:
            return "missing"
        if op == "stop":
            self.core.stopped.add(rec.container_name)
        out = await pool.container_op(op, rec.container_id, rec.runtime_token)
        if op == "start":
            self.core.stopped.discard(rec.container_name)
            if out.get("url"):
                self.core.moved(rec.container_name, out["url"], out.get("ports") or [])
                await self.commit()
        return out["status"]

    async def configure(self, pool_size: Optional[int] = None, sandbox_types: Optional[dict] = None,
                        max_sandbox_instances: Optional[int] = None) -> dict:
        """Change pool targets, sandbox types or the instance limit of the running namespace
        (kept across registry restarts). Returns the config now in force."""
        await self._ready()
        new, over = self.core.plan_config(pool_size, sandbox_types, max_sandbox_instances)
        self._overrides.save(over)
        self.core.set_config(new)
        self.config = self.nodes.config = new
        for info in self.nodes.nodes.values():
            await self.nodes.ensure_pools(info)
        self.kick()
        return new.model_dump(mode="json")

    async def reserve(self, sandbox_type: Optional[str], n: int, wait: bool = False, timeout: float = 120.0) -> dict:
        """Grow a type's warm target by ``n`` ahead of a burst; with ``wait``, until that many are warm."""
        await self._ready()
        t = self.config.sandbox_type(sandbox_type).name
        await self.callers.reserve(t, n, wait, timeout)
        return pool_status(self.core, t, self.teardowns.reset_ms.get(t))

    # -- queries ---------------------------------------------------------------

    async def get_info(self, identity: str) -> dict:
        """The record, following redirects; its token only while it is RUNNING (a sandbox that was
        released, recycled or reset for another session gives its old holders no key)."""
        await self._ready()
        rec = self.core.get(identity)
        return self.core.dump(rec) if rec.state == S.RUNNING else rec.public()

    async def get_session_mapping(self, session_ctx_id: str) -> list[str]:
        await self._ready()
        return self.core.session_names(session_ctx_id)

    async def list_session_keys(self) -> list[str]:
        await self._ready()
        return list(self.core.sessions)

    async def status(self) -> dict:
        await self._ready()
        actors = await asyncio.gather(*(p.stats() for p in self.nodes.all_pools()), return_exceptions=True)
        return registry_status(
            self.core, self.views(), actors, self.teardowns.reset_ms, self.sessions.stats(),
            namespace=self.ns, owner=self.owner, starts_in_flight=len(self.starts.dispatched),
            tick_errors=self._ticker.errors if self._ticker else 0, started_at=self.started_at, nice=self.nice,
            pid=os.getpid(), node=self.node, acquire_ms=self.callers.acquire_ms.summary(),
            lane={"path": self._lane.path, "served": self._lane.served} if self._lane else None,
            session_mode=self.config.session_mode, session_hosts=await self.sessions.describe_hosts())

    # -- shutting down (see actors/shutdown.py) ------------------------------------

    async def cleanup(self) -> list[str]:
        """Release every non-terminal sandbox this registry knows (pools included)."""
        await self._ready()
        return await self.shutdown.cleanup()

    async def drain(self) -> dict:
        """Stop starting sandboxes (the first step of ``corral down``); starts in flight finish."""
        await self._ready()
        return await self.shutdown.drain()

    async def settle(self, timeout: float = 30.0) -> int:
        """Wait until no node holds a container of this namespace (teardowns done); returns how
        many are left when ``timeout`` runs out."""
        return await self.shutdown.settle(timeout)

    async def teardown_nodes(self) -> int:
        """Wait for the teardowns sent so far, then remove per-node resources (``corral down``)."""
        return await self.shutdown.teardown_nodes()

    async def shutdown_sessions(self) -> int:
        """Stop every session actor (spares included); used by ``corral down``."""
        await self._ready()
        return await self.sessions.stop_all()

    async def ping(self) -> str:
        await self._ready()
        return "ok"
