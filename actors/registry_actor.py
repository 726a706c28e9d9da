"""RegistryActor: the one owner of a namespace's records, and the one that decides.

What it owns: the :class:`~corral.core.registry.RegistryCore` (records, wait lines,
pool targets), the record store it checkpoints to, the lock that makes it the only
registry of its state dir and namespace, the futures of the callers waiting in
line, the starts it has sent to pools and not heard back from, and the
:class:`~actors.nodes.NodeSet` (the PoolActor of each type on each node) and
:class:`~actors.sessions.SessionShell` (session actors) it commands.

Commands go one way. Clients call the registry (acquire, release, create,
restore, ...); the registry calls pools (start, reset, teardown, probe, list,
watch) and session actors (attach, detach, unbind) and learns every outcome from
return values. Pools never call it; session actors call it only to reap their
session, which is the reason they exist. Messages caused by an answer (teardowns,
attaches) go out after it, in order, through an :class:`~actors.common.Outbox`.

The tick reconciles: refills to each type's target on the nodes with room, admits
callers waiting for a slot, shrinks surpluses, probes warm sandboxes, follows the
node table (a node that died takes its sandboxes with it), compares each node's
containers with the records, and keeps the session actors topped up.

Detached, named, restarted forever. On (re)start it takes its state dir's lock,
reloads its records, asks each node's pools what they are starting, and reconciles.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import ray

from corral.core.registry import RegistryCore, Teardown
from corral.core.stats import LatencyWindow
from corral.errors import CapacityError, CorralError, DriverError, InvalidRequest, SandboxGone, error_class
from corral.lane import LaneServer
from corral.models import ContainerModel, ContainerState, SandboxManagerEnvConfig, check_env, labels_for, owner_id
from corral.statedir import RegistryLock, remember
from corral.store import JsonlRecordStore

from .common import CONTROL_NICE, Outbox, Ticker, fire, set_priority
from .handles import ActorGone, PoolHandle
from .metrics import registry_metrics
from .nodes import NodeSet
from .sessions import SessionShell

__all__ = ["RegistryActor"]

logger = logging.getLogger("corral.registry")
S = ContainerState
COMPACT_EVERY = 5000  # log lines between snapshots
NODES_EVERY = 2.0  # seconds between reads of Ray's node table
HEALTH_EVERY = 5.0  # seconds between health probes of warm sandboxes
WATCH_TIMEOUT = 30.0  # seconds a pool's engine watch waits before answering "nothing"


class RegistryActor:
    """See the module docstring. Every public method is safe to retry (Ray may)."""

    def __init__(self, config: dict, sweep: bool = False) -> None:
        self.nice = set_priority(CONTROL_NICE)  # answers acquires and releases: ahead of the sandboxes
        base = SandboxManagerEnvConfig.model_validate(config)
        self._overrides_path = Path(base.abs_state_dir()) / base.namespace / "config.json"
        self.config = self._with_overrides(base)
        self.ns = self.config.namespace
        self.owner = owner_id(self.config)
        self.node = ray.get_runtime_context().get_node_id()
        self.core = RegistryCore(self.config, registry_id=self.ns, node=self.node)
        self.store = JsonlRecordStore(os.path.join(self.config.abs_state_dir(), self.ns, "registry"))
        self.lock = RegistryLock(self.config.abs_state_dir(), self.ns)
        self.nodes = NodeSet(self.config, self.owner)
        self.sessions = SessionShell(self.config, time.monotonic, self.core)
        self.outbox = Outbox(self._send)
        self._sweep = sweep
        self._draining = False
        self._boot_task: Optional[asyncio.Task] = None
        self._ticker: Optional[Ticker] = None
        self._lane: Optional[LaneServer] = None
        self._commit_lock = asyncio.Lock()
        self._wids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}  # waiter id -> its caller's future
        self._dispatched: set[str] = set()  # starts sent to a pool, outcome not yet back
        self._start_futs: dict[str, asyncio.Future] = {}  # starts a caller awaits (create, restore)
        self._start_env: dict[str, dict] = {}  # per-call environment of such starts
        self._restoring: dict[str, asyncio.Future] = {}
        self._stopped: set[str] = set()  # sandboxes stopped on request (the reference's stop): not lost
        self._watchers: dict[str, asyncio.Task] = {}
        self._probes: dict[tuple, asyncio.Task] = {}
        self._due = {"nodes": 0.0, "health": 0.0, "reconcile": 0.0}
        self.metrics = registry_metrics()
        self.acquire_ms = LatencyWindow()  # inside this actor: the call's start to its answer (waits included)
        self.reset_ms: dict[str, LatencyWindow] = {}  # per type: reset sent to reset done
        self.started_at = time.time()

    # -- boot ------------------------------------------------------------------

    def _with_overrides(self, base: SandboxManagerEnvConfig) -> SandboxManagerEnvConfig:
        """The config with what :meth:`configure` changed since the namespace first started."""
        try:
            over = json.loads(self._overrides_path.read_text())
        except (OSError, ValueError):
            return base
        return SandboxManagerEnvConfig.model_validate({**base.model_dump(mode="json"), **over})

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
        await self.nodes.refresh()
        await self.sessions.adopt(self.ns)
        for node in list(self.nodes.nodes):
            await self._reconcile_node(node)
        if self._sweep:
            names = self._release_everything()
            logger.warning("released %d sandboxes left by a process that exited without cleaning up", len(names))
        await self._commit()
        await self.store.compact([r.model_dump(mode="json") for r in self.core.records.values()])
        self.core.take_changes()
        for node in self.nodes.nodes:
            self._watch(node)
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

    def _kick(self) -> None:
        if self._ticker is not None:
            self._ticker.kick()

    async def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._due["nodes"]:
            self._due["nodes"] = now + NODES_EVERY
            await self._follow_nodes()
        self._admit_and_refill()
        teardowns = self.core.plan_shrink(now)
        self.core.expire()
        if teardowns:
            self.outbox.put(*[("teardown", td) for td in teardowns])
        if now >= self._due["health"]:
            self._due["health"] = now + HEALTH_EVERY
            self._probe_all()
        if now >= self._due["reconcile"]:
            self._due["reconcile"] = now + self.config.reconcile_interval
            for node in list(self.nodes.nodes):
                await self._reconcile_node(node)
            await self.sessions.check()
        self.sessions.tick()
        await self._commit()
        if self.store.log_lines > COMPACT_EVERY:
            async with self._commit_lock:
                await self.store.compact([r.model_dump(mode="json") for r in self.core.records.values()])
        self.metrics.set_counts(self.core, self.sessions.stats())

    def _admit_and_refill(self) -> None:
        """Callers waiting for a slot first, then each type's deficit; both started on their nodes."""
        if self._draining:
            return
        views = self._views()
        admitted = self.core.admit(views)
        for wid, rec in admitted:
            self._resolve(wid, rec)
        recs = self.core.plan_starts(views, time.monotonic())
        if recs:
            self._dispatch(recs)

    def _views(self):
        views = self.nodes.views()
        for v in views:
            v.active = self.core.node_active(v.node_id)
            v.starting = self.core.node_starting(v.node_id)
        return views

    async def _commit(self) -> None:
        """Append every pending change to the store before the caller is answered (group commit)."""
        if not self.core.pending_changes():
            return
        async with self._commit_lock:
            changed, deleted = self.core.take_changes()
            await self.store.append(changed, deleted)

    # -- nodes -----------------------------------------------------------------

    async def _follow_nodes(self) -> None:
        was_single = self.nodes.cluster_size <= 1
        came, went = await self.nodes.refresh()
        if was_single and self.nodes.cluster_size > 1 and not self.config.advertise_host:
            # Other nodes joined: a warm sandbox listening on loopback is out of their reach. It is
            # replaced by one on the node's address; sandboxes in use stay with their sessions.
            tds = [td for r in self.core.by_state(S.WARM) if (r.url or "").startswith("http://127.0.0.1")
                   for td in [self.core.release(r.container_name)] if td is not None]
            if tds:
                logger.info("the cluster has several nodes now: replacing %d warm sandboxes that listen on "
                            "127.0.0.1 only", len(tds))
                self.outbox.put(*[("teardown", td) for td in tds])
        for node in came:
            self._watch(node)
            await self._reconcile_node(node)  # a node that comes back may still run old sandboxes
        for node in went:
            task = self._watchers.pop(node, None)
            if task is not None:
                task.cancel()
            lost = self.core.node_lost(node)
            for name in [n for n in self._dispatched]:
                rec = self.core.records.get(name)
                if rec is not None and self.core.node_of(rec) == node:
                    self._dispatched.discard(name)
                    self._start_outcome({"name": name, "ok": False, "error": SandboxGone(
                        f"node {node[:12]} died while {name} was starting").to_dict()}, counts=False)
            for rec in lost:
                self.outbox.put(*self.sessions.ended(rec.session_ctx_id, rec.container_name))
            logger.warning("node %s is gone: %d sessions' sandboxes lost with it", node[:12], len(lost))
        if came or went:
            self._kick()

    def _watch(self, node: str) -> None:
        if node not in self._watchers:
            self._watchers[node] = fire(self._watch_engine(node), f"watch node {node[:12]}")

    async def _watch_engine(self, node: str) -> None:
        """Keep a long poll open on the node's engine: a sandbox it stops is gone at once."""
        while node in self.nodes.nodes:
            info = self.nodes.nodes[node]
            try:
                dead = await info.lister().watch(WATCH_TIMEOUT)
            except (ActorGone, asyncio.TimeoutError):
                await asyncio.sleep(1.0)
                continue
            if dead:
                self._engine_dead(node, dead)

    def _engine_dead(self, node: str, names: list[str]) -> None:
        tds = []
        for name in names:
            rec = self.core.records.get(name)
            if rec is None or self.core.node_of(rec) != node or name in self._stopped:
                continue
            if rec.state == S.WARM:
                td = self.core.release(name)
            elif rec.state == S.RUNNING:
                td = self.core.mark_lost(name)
                self.outbox.put(*self.sessions.ended(rec.session_ctx_id, name))
            else:
                continue
            if td is not None:
                td.action = "destroy" if td.action != "recycle" else td.action
                tds.append(td)
        if tds:
            logger.warning("the engine of node %s stopped %d sandboxes", node[:12], len(tds))
            self.outbox.put(*[("teardown", td) for td in tds])
            fire(self._commit(), "commit")
            self._kick()

    async def _reconcile_node(self, node: str) -> None:
        info = self.nodes.nodes.get(node)
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
        unclaimed = [n for n in flying if n not in self._dispatched and n in self.core.records
                     and self.core.records[n].state == S.STARTING]
        plan = self.core.reconcile(node, observed, flying | self._dispatched)
        if plan.remove:
            fire(info.lister().remove(plan.remove), f"remove {len(plan.remove)} orphans")
        if plan.remove or plan.lost:
            logger.warning("reconcile of node %s: removed %d unknown containers, %d records lost their container",
                           node[:12], len(plan.remove), len(plan.lost))
            self._kick()
        for t in {self.core.records[n].sandbox_type for n in unclaimed if n in self.core.records}:
            names = [n for n in unclaimed if self.core.records[n].sandbox_type == t]
            self._dispatched.update(names)
            fire(self._collect(info.pools[t], names), f"collect {len(names)} starts")

    # -- starts ------------------------------------------------------------------

    def _spec(self, rec: ContainerModel) -> dict:
        t = self.config.sandbox_type(rec.sandbox_type)
        env = {**t.environment, **self._start_env.pop(rec.container_name, {})}
        return {"image": t.image, "labels": labels_for(rec, self.ns, self.owner), "environment": env,
                "host": self.nodes.advertise(self.core.node_of(rec)),
                "readonly_mounts": {os.path.abspath(h): c for h, c in (self.config.readonly_mounts or {}).items()},
                "cpus": t.cpus, "memory": t.memory, "pids_limit": t.pids_limit, "network": t.network,
                "allow": list(t.allow)}

    def _dispatch(self, recs: list[ContainerModel], download: Optional[str] = None) -> None:
        """Send STARTING records to the pools of their type and node, one call per pool.
        ``download``: "expected" when their workspaces were synced before (see PoolActor.start);
        otherwise whatever storage holds for them is brought in, as the reference does."""
        groups: dict[tuple, list[dict]] = {}
        for rec in recs:
            item = {"record": rec.model_dump(mode="json"), "spec": self._spec(rec),
                    "download": download or ("optional" if rec.storage_path else None)}
            groups.setdefault((rec.sandbox_type, self.core.node_of(rec)), []).append(item)
            self._dispatched.add(rec.container_name)
        for (t, node), items in groups.items():
            pool = self.nodes.pool(t, node)
            if pool is None:
                for item in items:
                    self._dispatched.discard(item["record"]["container_name"])
                    self._start_outcome({"name": item["record"]["container_name"], "ok": False, "error": SandboxGone(
                        f"no pool of {t!r} on node {node[:12]}").to_dict()}, counts=False)
                continue
            fire(self._run_starts(pool, items), f"start {len(items)} {t}")

    async def _run_starts(self, pool: PoolHandle, items: list[dict]) -> None:
        names = [i["record"]["container_name"] for i in items]
        try:
            results = await pool.start(items)
            counts = True
        except ActorGone as e:
            results = [{"name": n, "ok": False, "error": DriverError(f"pool gone: {e}").to_dict()} for n in names]
            counts = False
        await self._apply_starts(results, counts)

    async def _collect(self, pool: PoolHandle, names: list[str]) -> None:
        """Starts a pool was making when this registry restarted: their outcome, when it comes."""
        try:
            results = await pool.collect(names)
        except ActorGone as e:
            results = [{"name": n, "ok": False, "error": DriverError(f"pool gone: {e}").to_dict()} for n in names]
        await self._apply_starts(results, counts=False)

    async def _apply_starts(self, results: list[dict], counts: bool) -> None:
        for r in results:
            self._dispatched.discard(r["name"])
            self._start_outcome(r, counts)
        await self._commit()
        for t in self.config.sandbox_types:
            self._hand_off(t)
        self._kick()

    def _start_outcome(self, r: dict, counts: bool) -> None:
        name = r["name"]
        rec = self.core.records.get(name)
        fut = self._start_futs.pop(name, None)
        if r.get("ok"):
            if rec is None or rec.state != S.STARTING:  # released while it started: it goes
                self.outbox.put(("remove", name, self.core.node_of(rec) if rec else self.node, r["container_id"]))
                if fut is not None and not fut.done():
                    fut.set_exception(SandboxGone(f"{name} was released while it started"))
                return
            rec = self.core.started(name, r["container_id"], r.get("url"), r.get("ports") or [])
            if fut is not None and not fut.done():
                fut.set_result(rec)
            elif rec.state == S.RUNNING:
                self.outbox.put(*self.sessions.claimed([rec]))
            return
        err = r.get("error") or {}
        if self.core.start_failed(name, counts=counts) is not None and counts:
            self.core.pool(rec.sandbox_type).last_error = err.get("message")
        if fut is not None and not fut.done():
            fut.set_exception(error_class(err.get("code", ""))(err.get("message", "the start failed")))

    async def _start_and_wait(self, rec: ContainerModel, env: dict, download: Optional[str]) -> ContainerModel:
        fut = asyncio.get_running_loop().create_future()
        self._start_futs[rec.container_name] = fut
        if env:
            self._start_env[rec.container_name] = env
        self._dispatch([rec], download)
        return await fut

    # -- waiting ---------------------------------------------------------------

    def _new_waiter(self) -> tuple[int, asyncio.Future]:
        wid = next(self._wids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[wid] = fut
        return wid, fut

    def _resolve(self, wid: int, value: Any) -> None:
        fut = self._waiting.pop(wid, None)
        if fut is not None and not fut.done():
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)

    async def _await_waiter(self, wid: int, fut: asyncio.Future, timeout: float, describe) -> Any:
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            if self.core.lines.cancel(wid):
                self._waiting.pop(wid, None)
                raise CapacityError(describe()) from None
            return await fut  # handed its sandbox just as the wait ran out
        finally:
            self._waiting.pop(wid, None)

    def _hand_off(self, t: str) -> None:
        given = self.core.hand_off(t)
        if given:
            for wid, rec in given:
                self._resolve(wid, rec)
            self.outbox.put(*self.sessions.claimed([rec for _, rec in given]))

    async def _reserve_wait(self, request: dict, timeout: float) -> ContainerModel:
        """A STARTING record for a cold start, waiting in line at the instance limit (FIFO)."""
        wid, fut = self._new_waiter()
        self.core.wait_slot(wid, request)
        self._admit_and_refill()
        return await self._await_waiter(wid, fut, timeout, lambda: (
            f"no sandbox slot within {timeout:.0f}s: {self.core.counted} active of "
            f"max_sandbox_instances={self.core.limit or 'unlimited'}, nodes: "
            + ", ".join(f"{v.node_id[:12]} {v.active}/{v.capacity}" for v in self._views())))

    # -- acquire ----------------------------------------------------------------

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
        if wait:
            for i, req in enumerate(requests):
                if out[i] is None:
                    wid, fut = self._new_waiter()
                    self.core.wait_warm(wid, t, req)
                    waits.append((i, wid, fut))
        if claimed:
            await self._commit()
            self.outbox.put(*self.sessions.claimed(claimed))
        if waits or claimed:
            self._kick()
        for i, wid, fut in waits:
            try:
                out[i] = await self._await_waiter(wid, fut, timeout, lambda: (
                    f"no warm {t!r} sandbox within {timeout:.0f}s (warm={self.core.warm_count(t)}, "
                    f"starting={self.core.count(t, S.STARTING)}, waiting={self.core.lines.warm_waiting(t)})"
                    + self._last_failure(t)))
            except CorralError as e:
                out[i] = e
        if waits:
            await self._commit()
        ok = 0
        for i, r in enumerate(out):
            if isinstance(r, ContainerModel):
                out[i] = self.core.dump(r)
                ok += 1
        if ok:
            self._observe_acquires(t, (time.perf_counter() - t0) * 1000, ok)
        return out

    def _last_failure(self, t: str) -> str:
        pool = self.core.pool(t)
        if not pool.failures or not pool.last_error:
            return ""
        return f"; its last {pool.failures} starts failed, the last with: {pool.last_error[:500]}"

    def _check_node(self, node: Optional[str]) -> None:
        if not self.nodes.nodes:
            raise InvalidRequest(
                "no node of this Ray cluster can run sandboxes of this namespace"
                + (f" (none has the resource {self.config.node_resource!r})" if self.config.node_resource else ""))
        if not node or node == "any" or node.startswith("local:"):
            return
        if node not in self.nodes.nodes:
            raise InvalidRequest(f"no node {node!r} runs sandboxes of this namespace; known: "
                                 f"{sorted(n[:12] for n in self.nodes.nodes)}")

    def _observe_acquires(self, sandbox_type: str, ms: float, n: int) -> None:
        self.metrics.claims.inc(n)
        self.acquire_ms.add(ms, n)
        self.metrics.acquire_ms.observe(ms, tags={"sandbox_type": sandbox_type})

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
        rec = await self._reserve_wait(dict(sandbox_type=t, session_ctx_id=session, meta=meta, mount_dir=mount_dir,
                                            storage_path=storage_path, prefer=_strict(node)), timeout)
        await self._commit()
        rec = await self._start_and_wait(rec, env, None)
        await self._commit()
        self.outbox.put(*self.sessions.claimed([rec]))
        return rec.model_dump(mode="json")

    # -- release, reset, teardown -------------------------------------------------

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
        await self._commit()
        self.outbox.put(*msgs)
        self._kick()  # a slot may have freed
        return out

    async def _send(self, msgs: list) -> None:
        """The outbox's sender: teardowns grouped into one call per pool and kind, session
        messages in order."""
        groups: dict[tuple, list[Teardown]] = {}
        for msg in msgs:
            kind = msg[0]
            if kind == "teardown":
                td: Teardown = msg[1]
                key = (td.record.sandbox_type, self.core.node_of(td.record), td.action == "reset")
                groups.setdefault(key, []).append(td)
            elif kind == "remove":
                _, name, node, cid = msg
                pool = self.nodes.pool(self.config.default_type, node)
                if pool is not None:
                    fire(pool.remove([cid]), f"remove {name}")
            else:
                self.sessions.send(msg)
        for (t, node, reset), tds in groups.items():
            pool = self.nodes.pool(t, node)
            if pool is None:  # its node is gone, and its container with it
                continue
            fire(self._resets(pool, tds) if reset else self._teardowns(pool, tds), f"{len(tds)} teardowns of {t}")

    async def _resets(self, pool: PoolHandle, tds: list[Teardown]) -> None:
        t0 = time.perf_counter()
        restart = self.config.sandbox_type(pool.sandbox_type).kernel_reset == "restart"
        items = [{"record": td.record.model_dump(mode="json"), "token": td.token, "restart_kernel": restart,
                  "upload": td.upload} for td in tds]
        try:
            results = await pool.reset(items)
        except ActorGone:
            results = [{"name": td.record.container_name, "ok": False} for td in tds]
        window = self.reset_ms.setdefault(pool.sandbox_type, LatencyWindow())
        failed = []
        for td, r in zip(tds, results):
            rec = self.core.reset_done(td.record.container_name, bool(r.get("ok")), td.token)
            if r.get("ok"):
                window.add((time.perf_counter() - t0) * 1000)
            elif rec is not None:
                failed.append(Teardown(td.record, "destroy"))
        await self._commit()
        self._hand_off(pool.sandbox_type)
        if failed:
            await self._teardowns(pool, failed)
        self._kick()

    async def _teardowns(self, pool: PoolHandle, tds: list[Teardown]) -> None:
        items = [{"record": td.record.model_dump(mode="json"), "action": td.action, "upload": td.upload}
                 for td in tds]
        try:
            results = await pool.teardown(items)
        except ActorGone:
            return  # the next reconciliation of its node removes what is left
        for r in results:
            if r.get("synced_at") or r.get("storage_error"):
                self.core.synced(r["name"], r.get("synced_at"), r.get("storage_error"))
        await self._commit()

    # -- reap / restore --------------------------------------------------------

    async def reap_session(self, session_ctx_id: str, reason: str = "heartbeat_timeout") -> bool:
        """RUNNING -> RECYCLED for every sandbox of the session; their containers go, records stay."""
        await self._ready()
        names = self.core.session_names(session_ctx_id)
        if not names:
            return False
        tds = [td for td in (self.core.recycle(n, reason) for n in names) if td is not None]
        await self._commit()
        msgs = [("teardown", td) for td in tds]
        for n in names:
            msgs.extend(self.sessions.ended(session_ctx_id, n))
        self.outbox.put(*msgs)
        self._kick()
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
            here = node in self.nodes.nodes and old.state == S.RECYCLED
            synced = old.storage_synced_at is not None
            if old.state == S.LOST and not synced:
                logger.warning("restoring %s on another node without its workspace: it was never synced", session)
            rec = await self._reserve_wait(dict(
                sandbox_type=old.sandbox_type, session_ctx_id=session,
                meta={k: v for k, v in (old.meta or {}).items() if k != "session_ctx_id"},
                mount_dir=old.mount_dir, storage_path=old.storage_path, prefer=node if here else None,
            ), self.config.acquire_timeout)
            await self._commit()
            new = await self._start_and_wait(rec, {}, "expected" if synced else None)
            self.core.replace(old.container_name, new.container_name)
            restored.append(new)
        await self._commit()
        if restored:
            self.outbox.put(*self.sessions.claimed(restored))
            self.metrics.restores.inc()
        return self.core.session_names(session)

    async def heartbeat(self, session_ctx_id: str) -> bool:
        await self._ready()
        return await self.sessions.heartbeat(session_ctx_id)

    # -- health ------------------------------------------------------------------

    def _probe_all(self) -> None:
        for info in self.nodes.nodes.values():
            for t, pool in info.pools.items():
                key = (t, info.node_id)
                if key in self._probes and not self._probes[key].done():
                    continue
                warm = [r.model_dump(mode="json") for r in self.core.on_node(info.node_id, S.WARM)
                        if r.sandbox_type == t]
                if warm:
                    self._probes[key] = fire(self._probe(pool, warm), f"probe {t}")

    async def _probe(self, pool: PoolHandle, warm: list[dict]) -> None:
        try:
            results = await pool.probe(warm)
        except (ActorGone, asyncio.TimeoutError):
            return
        tds = self.core.probed(pool.sandbox_type, results)
        if tds:
            for td in tds:
                logger.warning("warm sandbox %s failed its health checks; replacing it", td.record.container_name)
            await self._commit()
            self.outbox.put(*[("teardown", td) for td in tds])
            self._kick()

    # -- the reference's start / stop / get_status ------------------------------

    async def container_op(self, identity: str, op: str) -> str:
        await self._ready()
        rec = self.core.get(identity)
        pool = self.nodes.pool(rec.sandbox_type, self.core.node_of(rec))
        if pool is None:
            return "missing"
        if op == "stop":
            self._stopped.add(rec.container_name)
        out = await pool.container_op(op, rec.container_id, rec.runtime_token)
        if op == "start":
            self._stopped.discard(rec.container_name)
            if out.get("url"):
                self.core.moved(rec.container_name, out["url"], out.get("ports") or [])
                await self._commit()
        return out["status"]

    # -- configuration -----------------------------------------------------------

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
        saved = {}
        try:
            saved = json.loads(self._overrides_path.read_text())
        except (OSError, ValueError):
            pass
        saved.update({k: new.model_dump(mode="json")[k] for k in over})
        self._overrides_path.parent.mkdir(parents=True, exist_ok=True)
        self._overrides_path.write_text(json.dumps(saved))
        self.config = self.core.config = self.nodes.config = new
        for t in new.sandbox_types:
            self.core.pool(t).set_target(new.pool_target(t))
        for info in self.nodes.nodes.values():
            await self.nodes.ensure_pools(info)
        self._kick()
        return new.model_dump(mode="json")

    async def reserve(self, sandbox_type: Optional[str], n: int, wait: bool = False, timeout: float = 120.0) -> dict:
        """Grow a type's warm target by ``n`` ahead of a burst; with ``wait``, until that many are warm."""
        await self._ready()
        t = self.config.sandbox_type(sandbox_type).name
        self._check_node(None)
        pool = self.core.pool(t)
        target = pool.reserve(n)
        self._kick()
        if wait:
            deadline = time.monotonic() + timeout
            while self.core.warm_count(t) < min(target, pool.target):
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
                "reset_ms": self.reset_ms.get(t, LatencyWindow()).summary()}

    async def status(self) -> dict:
        await self._ready()
        actors = await asyncio.gather(*(p.stats() for p in self.nodes.all_pools()), return_exceptions=True)
        pools = {t: {**self._pool_stats(t), "actors": []} for t in self.config.sandbox_types}
        for a in actors:
            if isinstance(a, dict) and a.get("sandbox_type") in pools:
                pools[a["sandbox_type"]]["actors"].append(a)
        counts = self.core.node_counts()
        return {
            "namespace": self.ns,
            "owner": self.owner,
            "counts": self.core.counts(),
            "active": self.core.counted,
            "limit": self.core.limit,
            "waiting_for_slot": len(self.core.lines.slots),
            "waiting_for_warm": self.core.lines.counts()["warm"],
            "starts_in_flight": len(self._dispatched),
            "pools": pools,
            "nodes": {v.node_id: {"address": v.address, "capacity": v.capacity, "start_limit": v.start_limit,
                                  "active": v.active, "starting": v.starting, "states": counts.get(v.node_id, {})}
                      for v in self._views()},
            "sessions": {sid: list(names) for sid, names in self.core.sessions.items()},
            "session_actors": self.sessions.stats()["bound"],
            "spare_session_actors": self.sessions.stats()["spares"],
            "records": [r.public() for r in self.core.records.values()],
            "tick_errors": self._ticker.errors if self._ticker else 0,
            "started_at": self.started_at,
            "nice": self.nice,
            "pid": os.getpid(),
            "node": self.node,
            "acquire_ms": self.acquire_ms.summary(),
            "lane": {"path": self._lane.path, "served": self._lane.served} if self._lane else None,
        }

    # -- shutting down -------------------------------------------------------------

    def _release_everything(self) -> list[str]:
        names = [r.container_name for r in self.core.records.values()
                 if r.state in (S.STARTING, S.WARM, S.RUNNING, S.RESETTING)]
        msgs = []
        for n in names:
            rec = self.core.records[n]
            sid = rec.session_ctx_id
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
            self._resolve(wid, CapacityError("corral is shutting down: every sandbox of this namespace is released"))
        names = self._release_everything()
        await self._commit()
        self._kick()
        return names

    async def drain(self) -> dict:
        """Stop starting sandboxes (the first step of ``corral down``); starts in flight finish."""
        await self._ready()
        self._draining = True
        deadline = time.monotonic() + 60
        while self._dispatched and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {"starting": len(self._dispatched)}

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


def _strict(node: Optional[str]) -> Optional[str]:
    if not node or node == "any":
        return None
    return node[len("local:"):] if node.startswith("local:") else node
