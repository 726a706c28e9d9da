"""RegistryActor: the one owner of a namespace's records, and the one that decides.

What it owns: the :class:`~corral.core.registry.RegistryCore` (records, wait lines, pool
targets), the record store it checkpoints to, the lock that makes it the only registry of its
state dir and namespace, the futures of the callers waiting in line, and the parts that carry its
decisions out: :class:`~actors.starts.Starts` (starts sent to pools), :class:`~actors.upkeep.Upkeep`
(nodes, engines, reconciliation, health), :class:`~actors.teardowns.Teardowns` (what the outbox
sends), :class:`~actors.nodes.NodeSet` (the PoolActor of each type on each node) and
:class:`~actors.sessions.SessionShell` (session actors).

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
from typing import Any, Callable, Optional

import ray

from corral.core.registry import RegistryCore
from corral.core.stats import LatencyWindow
from corral.errors import CapacityError, CorralError, InvalidRequest
from corral.lane import LaneServer
from corral.models import ContainerModel, ContainerState, SandboxManagerEnvConfig, check_env, owner_id
from corral.statedir import ConfigOverrides, RegistryLock, remember
from corral.store import JsonlRecordStore

from .common import CONTROL_NICE, Outbox, Ticker, set_priority
from .handles import ActorGone
from .metrics import registry_metrics
from .nodes import NodeSet
from .sessions import SessionShell
from .starts import Starts
from .teardowns import Teardowns
from .upkeep import Upkeep
from .waiting import Waiters

__all__ = ["RegistryActor"]

logger = logging.getLogger("corral.registry")
S = ContainerState
COMPACT_EVERY = 5000  # log lines between snapshots
NODES_EVERY = 2.0  # seconds between reads of Ray's node table
HEALTH_EVERY = 5.0  # seconds between health probes of warm sandboxes


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
        self.store = JsonlRecordStore(os.path.join(self.config.abs_state_dir(), self.ns, "registry"))
        self.lock = RegistryLock(self.config.abs_state_dir(), self.ns)
        self.nodes = NodeSet(self.config, self.owner)
        self.sessions = SessionShell(self.config, time.monotonic, self.core)
        self.starts = Starts(self)
        self.upkeep = Upkeep(self)
        self.teardowns = Teardowns(self)
        self.outbox = Outbox(self.teardowns.send)
        self.stopped: set[str] = set()  # sandboxes stopped on request (the reference's stop): not lost
        self._sweep = sweep
        self._draining = False
        self._boot_task: Optional[asyncio.Task] = None
        self._ticker: Optional[Ticker] = None
        self._lane: Optional[LaneServer] = None
        self._commit_lock = asyncio.Lock()
        self.waiters = Waiters(self.core.lines)
        self._restoring: dict[str, asyncio.Future] = {}
        self._due = {"nodes": 0.0, "health": 0.0, "reconcile": 0.0}
        self.metrics = registry_metrics()
        self.acquire_ms = LatencyWindow()  # inside this actor: the call's start to its answer (waits included)
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
        # A reset cut off by a restart may have given its box a token no record holds: it goes.
        cut = [self.core.release(r.container_name, force=True) for r in self.core.by_state(S.RESETTING)]
        self.outbox.put(*[("teardown", td) for td in cut if td is not None])
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
            names = self._release_everything()
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
        self._admit_and_refill()
        self.outbox.put(*[("teardown", td) for td in self.core.plan_shrink()])
        self.core.expire()
        if now >= self._due["health"]:
            self._due["health"] = now + HEALTH_EVERY
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

    def _admit_and_refill(self) -> None:
        """Callers waiting for a slot first, then each type's deficit; both started on their nodes."""
        if self._draining:
            return
        views = self._views()
        for wid, rec in self.core.admit(views):
            self.waiters.resolve(wid, rec)
        recs = self.core.plan_starts(views)
        if recs:
            self.starts.dispatch(recs)

    def _views(self):
        views = self.nodes.views()
        for v in views:
            v.active = self.core.node_active(v.node_id)
            v.starting = self.core.node_starting(v.node_id)
        return views

    async def commit(self) -> None:
        """Append every pending change to the store before the caller is answered (group commit)."""
        if not self.core.pending_changes():
            return
        async with self._commit_lock:
            changed, deleted = self.core.take_changes()
            await self.store.append(changed, deleted)

    # -- waiting ---------------------------------------------------------------

    def hand_off(self, t: str) -> None:
        """Warm sandboxes of the type go to the callers waiting for one (the core decides who)."""
        given = self.core.hand_off(t)
        for wid, rec in given:
            self.waiters.resolve(wid, rec)
        if given:
            self.outbox.put(*self.sessions.claimed([rec for _, rec in given]))

    async def _reserve_wait(self, request: dict, timeout: float) -> ContainerModel:
        """A STARTING record for a cold start, waiting in line at the instance limit (FIFO)."""
        wid, fut = self.waiters.new()
        self.core.wait_slot(wid, request)
        self._admit_and_refill()
        return await self.waiters.wait(wid, fut, timeout, lambda: (
            f"no sandbox slot within {timeout:.0f}s: {self.core.counted} active of "
            f"max_sandbox_instances={self.core.limit or 'unlimited'}, nodes: "
            + ", ".join(f"{v.node_id[:12]} {v.active}/{v.capacity}" for v in self._views())))

    def _check_node(self, node: Optional[str]) -> None:
        if not self.nodes.nodes:
            raise InvalidRequest(
                "no node of this Ray cluster can run sandboxes of this namespace"
                + (f" (none has the resource {self.config.node_resource!r})" if self.config.node_resource else ""))
        if node and node != "any" and not node.startswith("local:") and node not in self.nodes.nodes:
            raise InvalidRequest(f"no node {node!r} runs sandboxes of this namespace; known: "
                                 f"{sorted(n[:12] for n in self.nodes.nodes)}")

    def _last_failure(self, t: str) -> str:
        pool = self.core.pool(t)
        if not pool.failures or not pool.last_error:
            return ""
        return f"; its last {pool.failures} starts failed, the last with: {pool.last_error[:500]}"

    # -- acquire, create ----------------------------------------------------------

    async def acquire(self, sandbox_type: str, requests: list, timeout: Optional[float] = None,
                      wait: bool = True) -> list:
        """Bind a warm sandbox of the type to each request (``{"session_ctx_id", "meta", "node"}``).

        One answer per request, in order: the RUNNING record as a dict, a corral error (raised
        by the client), or None when none was warm and ``wait`` is False. Requests that find
        nothing warm wait in line (FIFO per type) until a sandbox turns WARM or ``timeout`` passes.
        """
        await self._ready()
        t0 = time.perf_counter()
        t = self.config.sandbox_type(sandbox_type).name
        if not isinstance(requests, list) or not requests:
            raise InvalidRequest("requests must be a non-empty list")
        for req in requests:
            self._check_node(req.get("node"))
        timeout = self.config.acquire_timeout if timeout is None else timeout
        out: list[Any] = list(self.core.acquire(t, requests))
        claimed = [r for r in out if r is not None]
        waits = []
        for i, req in enumerate(requests):
            if out[i] is None and wait:
                wid, fut = self.waiters.new()
                self.core.wait_warm(wid, t, req)
                waits.append((i, wid, fut))
        if claimed:
            await self.commit()
            self.outbox.put(*self.sessions.claimed(claimed))
        if waits or claimed:
            self.kick()
        for i, wid, fut in waits:
            try:
                out[i] = await self.waiters.wait(wid, fut, timeout, lambda: (
                    f"no warm {t!r} sandbox within {timeout:.0f}s (warm={self.core.warm_count(t)}, "
                    f"starting={self.core.count(t, S.STARTING)}, waiting={self.core.lines.warm_waiting(t)})"
                    + self._last_failure(t)))
            except CorralError as e:
                out[i] = e
        if waits:
            await self.commit()
        out = [self.core.dump(r) if isinstance(r, ContainerModel) else r for r in out]
        ok = sum(isinstance(r, dict) for r in out)
        if ok:
            self.metrics.claims.inc(ok)
            self.acquire_ms.add((time.perf_counter() - t0) * 1000, ok)
            self.metrics.acquire_ms.observe((time.perf_counter() - t0) * 1000, tags={"sandbox_type": t})
        return out

    async def create(self, sandbox_type: Optional[str] = None, session_ctx_id: Optional[str] = None,
                     meta: Optional[dict] = None, mount_dir: Optional[str] = None,
                     storage_path: Optional[str] = None, environment: Optional[dict] = None,
                     timeout: Optional[float] = None, node: Optional[str] = None) -> dict:
        """A new sandbox started for this call (a mount dir, a storage path, a type with no pool),
        bound to ``session_ctx_id`` (one of corral's own when None). Waits for a slot."""
        await self._ready()
        t = self.config.sandbox_type(sandbox_type).name
        env = check_env(environment)
        self._check_node(node)
        session = session_ctx_id or self.core.new_session()
        timeout = self.config.acquire_timeout if timeout is None else timeout
        prefer = node[len("local:"):] if node and node.startswith("local:") else (None if node == "any" else node)
        rec = await self._reserve_wait(dict(sandbox_type=t, session_ctx_id=session, meta=meta, mount_dir=mount_dir,
                                            storage_path=storage_path, prefer=prefer), timeout)
        await self.commit()
        rec = await self.starts.start_and_wait(rec, env, None)
        await self.commit()
        self.outbox.put(*self.sessions.claimed([rec]))
        return rec.model_dump(mode="json")

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
        out: list[Any] = []
        msgs = []
        for identity in identities:
            try:
                rec = self.core.find(identity)
            except CorralError as e:
                out.append(e)
                continue
            out.append(True)
            if rec is None:
                continue
            live = self.core.get(rec.container_name)
            sid = live.session_ctx_id
            td = self.core.release(identity, reuse=self.config.sandbox_type(live.sandbox_type).reuse)
            if td is not None:
                msgs.append(("teardown", td))
            msgs.extend(self.sessions.ended(sid, live.container_name))
            self.metrics.releases.inc()
        await self.commit()
        self.outbox.put(*msgs)
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
        fut = self._restoring.get(session_ctx_id)
        if fut is None:
            fut = asyncio.ensure_future(self._restore(session_ctx_id))
            self._restoring[session_ctx_id] = fut
            fut.add_done_callback(lambda _f: self._restoring.pop(session_ctx_id, None))
        return await asyncio.shield(fut)

    async def _restore(self, session: str) -> list[str]:
        restored = []
        for old in self.core.to_restore(session):
            node = self.core.node_of(old)
            here = node in self.nodes.nodes and old.state == S.RECYCLED  # its workspace is on that node
            synced = old.storage_synced_at is not None
            if old.state == S.LOST and not synced:
                logger.warning("restoring %s on another node without its workspace: it was never synced", session)
            rec = await self._reserve_wait(dict(
                sandbox_type=old.sandbox_type, session_ctx_id=session,
                meta={k: v for k, v in (old.meta or {}).items() if k != "session_ctx_id"},
                mount_dir=old.mount_dir, storage_path=old.storage_path, prefer=node if here else None,
            ), self.config.acquire_timeout)
            await self.commit()
            new = await self.starts.start_and_wait(rec, {}, "expected" if synced else None)
            self.core.replace(old.container_name, new.container_name)
            restored.append(new)
        await self.commit()
        if restored:
            self.outbox.put(*self.sessions.claimed(restored))
            self.metrics.restores.inc()
        return self.core.session_names(session)

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
            self.stopped.add(rec.container_name)
        out = await pool.container_op(op, rec.container_id, rec.runtime_token)
        if op == "start":
            self.stopped.discard(rec.container_name)
            if out.get("url"):
                self.core.moved(rec.container_name, out["url"], out.get("ports") or [])
                await self.commit()
        return out["status"]

    async def configure(self, pool_size: Optional[int] = None, sandbox_types: Optional[dict] = None,
                        max_sandbox_instances: Optional[int] = None) -> dict:
        """Change pool targets, sandbox types or the instance limit of the running namespace
        (kept across registry restarts). Returns the config now in force."""
        await self._ready()
        over: dict[str, Any] = {}
        if pool_size is not None:
            over["pool_size"] = pool_size
        if max_sandbox_instances is not None:
            over["max_sandbox_instances"] = max_sandbox_instances
        if sandbox_types is not None:
            over["sandbox_types"] = {**self.config.model_dump(mode="json")["sandbox_types"], **sandbox_types}
        new = SandboxManagerEnvConfig.model_validate({**self.config.model_dump(mode="json"), **over})
        self._overrides.save({k: new.model_dump(mode="json")[k] for k in over})
        self.config = self.core.config = self.nodes.config = new
        for t in new.sandbox_types:
            self.core.pool(t).set_target(new.pool_target(t))
        for info in self.nodes.nodes.values():
            await self.nodes.ensure_pools(info)
        self.kick()
        return new.model_dump(mode="json")

    async def reserve(self, sandbox_type: Optional[str], n: int, wait: bool = False, timeout: float = 120.0) -> dict:
        """Grow a type's warm target by ``n`` ahead of a burst; with ``wait``, until that many are warm."""
        await self._ready()
        t = self.config.sandbox_type(sandbox_type).name
        self._check_node(None)
        pool = self.core.pool(t)
        target = pool.reserve(n)
        self.kick()
        deadline = time.monotonic() + timeout
        while wait and self.core.warm_count(t) < min(target, pool.target):
            if time.monotonic() > deadline:
                raise CapacityError(f"pool {t!r}: {self.core.warm_count(t)} of {target} warm after {timeout:.0f}s"
                                    + self._last_failure(t))
            await asyncio.sleep(0.05)
        return self._pool_stats(t)

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

    def _pool_stats(self, t: str) -> dict:
        c = self.core
        return {**c.pool(t).stats(), "warm": c.warm_count(t), "starting": c.count(t, S.STARTING),
                "resetting": c.count(t, S.RESETTING), "running": c.count(t, S.RUNNING),
                "waiting": c.lines.warm_waiting(t),
                "reset_ms": self.teardowns.reset_ms.get(t, LatencyWindow()).summary()}

    async def status(self) -> dict:
        await self._ready()
        actors = await asyncio.gather(*(p.stats() for p in self.nodes.all_pools()), return_exceptions=True)
        pools = {t: {**self._pool_stats(t), "actors": []} for t in self.config.sandbox_types}
        for a in actors:
            if isinstance(a, dict) and a.get("sandbox_type") in pools:
                pools[a["sandbox_type"]]["actors"].append(a)
        states = self.core.node_counts()
        sessions = self.sessions.stats()
        return {
            "namespace": self.ns, "owner": self.owner, "counts": self.core.counts(), "active": self.core.counted,
            "limit": self.core.limit, "waiting_for_slot": len(self.core.lines.slots),
            "waiting_for_warm": self.core.lines.counts()["warm"], "starts_in_flight": len(self.starts.dispatched),
            "pools": pools,
            "nodes": {v.node_id: {"address": v.address, "capacity": v.capacity, "start_limit": v.start_limit,
                                  "active": v.active, "starting": v.starting, "states": states.get(v.node_id, {})}
                      for v in self._views()},
            "sessions": {sid: list(names) for sid, names in self.core.sessions.items()},
            "session_actors": sessions["bound"], "spare_session_actors": sessions["spares"],
            "records": [r.public() for r in self.core.records.values()],
            "tick_errors": self._ticker.errors if self._ticker else 0, "started_at": self.started_at,
            "nice": self.nice, "pid": os.getpid(), "node": self.node, "acquire_ms": self.acquire_ms.summary(),
            "lane": {"path": self._lane.path, "served": self._lane.served} if self._lane else None,
        }

    # -- shutting down -------------------------------------------------------------

    def _release_everything(self) -> list[str]:
        names = [r.container_name for r in self.core.records.values()
                 if r.state in (S.STARTING, S.WARM, S.RUNNING, S.RESETTING)]
        msgs = []
        for n in names:
            sid = self.core.records[n].session_ctx_id
            td = self.core.release(n, reuse=False, force=True)
            if td is not None:
                msgs.append(("teardown", td))
            msgs.extend(self.sessions.ended(sid, n))
        # RECYCLED and LOST sessions have no container; dropped from the index so nothing restores them
        for r in self.core.by_state(S.RECYCLED, S.LOST):
            self.core.release(r.container_name)
        self.outbox.put(*msgs)
        return names

    async def cleanup(self) -> list[str]:
        """Release every non-terminal sandbox this registry knows (pools included)."""
        await self._ready()
        for wid in self.core.lines.drain():
            self.waiters.resolve(wid, CapacityError("corral is shutting down: every sandbox of this namespace is released"))
        names = self._release_everything()
        await self.commit()
        self.kick()
        return names

    async def drain(self) -> dict:
        """Stop starting sandboxes (the first step of ``corral down``); starts in flight finish."""
        await self._ready()
        self._draining = True
        deadline = time.monotonic() + 60
        while self.starts.dispatched and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {"starting": len(self.starts.dispatched)}

    async def settle(self, timeout: float = 30.0) -> int:
        """Wait until no node holds a container of this namespace (teardowns done); returns how
        many are left when ``timeout`` runs out."""
        await self.outbox.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = 0
            for info in list(self.nodes.nodes.values()):
                try:
                    left += len(await info.lister().list())
                except (ActorGone, asyncio.TimeoutError):
                    pass
            if left == 0 or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.2)

    async def teardown_nodes(self) -> int:
        """Wait for the teardowns sent so far, then remove per-node resources (``corral down``)."""
        await self.outbox.flush()
        done = 0
        for info in self.nodes.nodes.values():
            try:
                await info.lister().teardown_node()
                done += 1
            except (ActorGone, asyncio.TimeoutError):
                pass
        return done

    async def shutdown_sessions(self) -> int:
        """Stop every session actor (spares included); used by ``corral down``."""
        await self._ready()
        return await self.sessions.stop_all()

    async def ping(self) -> str:
        await self._ready()
        return "ok"
