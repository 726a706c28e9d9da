"""RegistryActor: the only writer of container records (a shell over RegistryCore).

What it owns: the :class:`RegistryCore` (records, session index, instance
count), the record store it checkpoints to, the FIFO of callers waiting for an
instance slot, the in-flight restores (so two concurrent restores of one
session start one set of containers), and the session actors: which one
serves which session, and the spares kept started so an acquire never waits
for an actor process.

It carries out the core's decisions: teardowns go to the pool actor of the
container's type (fire and forget, so ``release`` answers at once), reaps and
restores go through the pools and the session actors. On (re)start it reloads
its records, reconciles them with the containers the driver reports by label
(adopt the known, remove the unknown), and finds its session actors again by
name. Detached, named, restarted forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any, Optional

import ray
import shortuuid

from corral.core.registry import RegistryCore, Teardown
from corral.errors import CapacityError, CorralError, InvalidRequest, NotFound
from corral.models import LABEL_MANAGED, LABEL_REGISTRY, ContainerState, SandboxManagerEnvConfig
from corral.store import JsonlRecordStore

from .common import REGISTRY_NAME, SESSION_PREFIX, Ticker, fire, pool_name
from .metrics import registry_metrics

__all__ = ["RegistryActor"]

logger = logging.getLogger("corral.registry")
S = ContainerState
COMPACT_EVERY = 5000  # log lines between snapshots
SPARE_TRIM_AFTER = 60.0
MAX_SPAWNING = 4  # session actors being started at once
SPARE_QUIET = 2.0  # seconds without a claim before spares are topped up  # seconds spare session actors may stay above `spare_sessions`


class RegistryActor:
    """See the module docstring. Every public method is safe to retry (Ray may)."""

    def __init__(self, config: dict) -> None:
        self.config = SandboxManagerEnvConfig.model_validate(config)
        self.ns = self.config.namespace
        self.core = RegistryCore(self.config, registry_id=self.ns)
        self.store = JsonlRecordStore(os.path.join(self.config.abs_state_dir(), "registry"))
        self._boot_task: Optional[asyncio.Task] = None
        self._slot_waiters: deque[asyncio.Future] = deque()
        self._restoring: dict[str, asyncio.Future] = {}
        self._session_actors: dict[str, Any] = {}  # session_ctx_id -> SessionActor handle
        self._spares: list[Any] = []
        self._spawning = 0
        self._spare_surplus_since: Optional[float] = None
        self._last_claim = 0.0
        self._commit_lock = asyncio.Lock()
        self._pools: dict[str, Any] = {}
        self._driver = None
        self._ticker: Optional[Ticker] = None
        self._reconcile_due = 0.0
        self.metrics = registry_metrics()
        self.started_at = time.time()

    # -- boot ------------------------------------------------------------------

    async def _ready(self) -> None:
        if self._boot_task is None:
            self._boot_task = asyncio.ensure_future(self._boot())
        await asyncio.shield(self._boot_task)

    async def _boot(self) -> None:
        from corral.drivers import make_driver

        self._driver = make_driver(self.config.driver_config())
        self.core.load_records(await self.store.load())
        await self._find_session_actors()
        await self._reconcile(booting=True)
        await self._ensure_session_actors()
        await self.store.compact([r.model_dump(mode="json") for r in self.core.records.values()])
        self.core.take_changes()
        self._ticker = Ticker("registry-tick", max(self.config.watcher_scan_interval, 0.2) or 1.0, self._tick)
        self._ticker.start()
        logger.info("registry up: %d records, %d sessions", len(self.core.records), len(self.core.sessions))

    async def _tick(self) -> None:
        gone = self.core.expire()
        if gone:
            await self._commit()
        await self._top_up_spares()
        now = time.monotonic()
        if now >= self._reconcile_due:
            self._reconcile_due = now + self.config.reconcile_interval
            await self._reconcile()
            await self._ensure_session_actors()
        if self.store.log_lines > COMPACT_EVERY:
            async with self._commit_lock:
                await self.store.compact([r.model_dump(mode="json") for r in self.core.records.values()])
        self.metrics.set_counts(self.core.counts(), len(self._session_actors), len(self._spares))

    async def _reconcile(self, booting: bool = False) -> None:
        observed = await self._driver.list({LABEL_MANAGED: "true", LABEL_REGISTRY: self.ns})
        plan = self.core.reconcile([h.model_dump() for h in observed], booting=booting)
        for cid in plan.remove:
            fire(self._driver.remove(cid), f"remove orphan {cid}")
        if plan.remove or plan.lost:
            logger.warning("reconcile: removed %d unknown containers, %d records lost their container",
                           len(plan.remove), len(plan.lost))
            self._wake_slots(len(plan.lost))
        await self._commit()

    async def _commit(self) -> None:
        """Append every pending change to the store before the caller is answered (group commit)."""
        if not self.core.pending_changes():
            return
        async with self._commit_lock:
            changed, deleted = self.core.take_changes()
            await self.store.append(changed, deleted)

    # -- session actors --------------------------------------------------------

    async def _find_session_actors(self) -> None:
        """Rediscover session actors by name after a restart: bound ones serve their sessions, others are spares."""
        try:
            named = ray.util.list_named_actors(all_namespaces=True)
        except Exception:  # the GCS may be briefly unavailable right after a restart
            named = []
        for entry in named:
            if entry.get("namespace") != self.ns or not entry.get("name", "").startswith(SESSION_PREFIX):
                continue
            try:
                h = ray.get_actor(entry["name"], namespace=self.ns)
                desc = await asyncio.wait_for(h.describe.remote(), 10)
            except Exception:
                continue
            sid = desc.get("session_ctx_id")
            if sid and sid in self.core.sessions:
                self._session_actors[sid] = h
            else:
                if sid:
                    await h.unbind.remote()
                self._spares.append(h)

    def _new_session_actor(self):
        from .session_actor import SessionActor

        name = SESSION_PREFIX + shortuuid.uuid()[:12].lower()
        return ray.remote(SessionActor).options(
            name=name, namespace=self.ns, lifetime="detached", num_cpus=0, max_restarts=0, max_concurrency=100,
        ).remote(self.config.model_dump(mode="json"))

    async def _top_up_spares(self) -> None:
        # After a burst every finished session leaves a spare; keep them a while (the next RL
        # step reuses them), then stop the surplus so idle actors do not hold memory forever.
        if len(self._spares) <= self.config.spare_sessions:
            self._spare_surplus_since = None
        elif self._spare_surplus_since is None:
            self._spare_surplus_since = time.monotonic()
        elif time.monotonic() - self._spare_surplus_since > SPARE_TRIM_AFTER:
            while len(self._spares) > self.config.spare_sessions:
                ray.kill(self._spares.pop(0), no_restart=True)
            self._spare_surplus_since = None
        if time.monotonic() - self._last_claim < SPARE_QUIET:
            return  # a burst of claims is on: new processes now would slow it, and its actors come back
        want = self.config.spare_sessions - len(self._spares) - self._spawning
        # a few at a time: each is a Python process that takes about a second of CPU to start
        want = min(want, MAX_SPAWNING - self._spawning)
        for _ in range(max(0, want)):
            self._spawning += 1
            fire(self._spawn_spare(), "spawn session actor")

    async def _spawn_spare(self) -> None:
        h = None
        try:
            # creating a named actor waits on the GCS: never on the event loop every claim shares
            h = await asyncio.to_thread(self._new_session_actor)
            await h.describe.remote()  # returns once the process is up
            self._spares.append(h)
        except Exception:
            if h is not None:  # half-started: make sure it does not linger
                try:
                    ray.kill(h, no_restart=True)
                except Exception:
                    pass
            raise
        finally:
            self._spawning -= 1

    async def _session_actor(self, session_ctx_id: str):
        h = self._session_actors.get(session_ctx_id)
        if h is None:
            new = self._spares.pop() if self._spares else await asyncio.to_thread(self._new_session_actor)
            h = self._session_actors.setdefault(session_ctx_id, new)
            if h is not new:  # another claim for this session won while we created ours: keep it as a spare
                self._spares.append(new)
            if self._ticker:
                self._ticker.kick()  # top the spares up again
        return h

    async def _attach(self, rec, wait: bool = False) -> None:
        """Give the record's session an actor (a spare, or a new one) and add the container to it.

        The actor is chosen now; the ``attach`` call is sent without waiting unless ``wait``
        (Ray runs one caller's calls to an actor in order, so a later ``unbind`` cannot overtake
        it). A dead actor is replaced and the attach retried in the background.
        """
        sid = rec.session_ctx_id
        if not sid:
            return
        h = await self._session_actor(sid)
        ref = h.attach.remote(sid, self.config.timeout_for(rec.sandbox_type), rec.container_name, rec.url,
                              rec.runtime_token)
        if wait:
            await ref
        else:
            fire(self._confirm_attach(ref, h, rec), f"attach {rec.container_name}")

    async def _confirm_attach(self, ref, h, rec) -> None:
        try:
            await ref
        except ray.exceptions.RayActorError:
            # a dead spare (or a session actor that died): never leave a session without a clock
            sid = rec.session_ctx_id
            if self._session_actors.get(sid) is h:
                del self._session_actors[sid]
            live = self.core.records.get(rec.container_name)
            if live is not None and live.state == S.RUNNING and live.session_ctx_id == sid:
                await self._attach(live, wait=True)

    async def _ensure_session_actors(self) -> None:
        """Every session with a RUNNING container has a live actor (reconcile: actors die too)."""
        for sid, names in list(self.core.sessions.items()):
            running = [self.core.records[n] for n in names
                       if n in self.core.records and self.core.records[n].state == S.RUNNING]
            if not running:
                continue
            h = self._session_actors.get(sid)
            if h is not None:
                try:
                    await asyncio.wait_for(h.describe.remote(), 10)
                    continue
                except Exception:
                    logger.warning("session actor of %s is gone; giving the session a new one", sid)
                    self._session_actors.pop(sid, None)
            for rec in running:
                await self._attach(rec, wait=True)

    async def _detach(self, sid: Optional[str], name: str) -> None:
        if not sid:
            return
        h = self._session_actors.get(sid)
        if h is None:
            return
        if sid not in self.core.sessions:
            # The session has nothing left: the actor goes back to the spares. Ray runs one
            # caller's calls to an actor in order, so a later attach cannot overtake this unbind.
            self._session_actors.pop(sid, None)
            fire(h.unbind.remote(), "session unbind")
            self._spares.append(h)
        else:
            fire(h.detach.remote(name), "session detach")

    # -- slots (max_sandbox_instances) -----------------------------------------

    def _wake_slots(self, n: int = 1) -> None:
        """Slots freed: the callers waiting in line go first, then the pools may refill."""
        while n > 0 and self._slot_waiters:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_result(True)
                n -= 1
        if n > 0 and self.core.limit > 0:
            for t in self.config.sandbox_types:
                try:
                    fire(self._pool(t).kick.remote(), "kick pool")
                except ValueError:  # that pool actor is not running
                    pass

    async def reserve(
        self,
        sandbox_type: str,
        session_ctx_id: Optional[str] = None,
        meta: Optional[dict] = None,
        mount_dir: Optional[str] = None,
        storage_path: Optional[str] = None,
        wait: bool = True,
        timeout: Optional[float] = None,
    ) -> Optional[dict]:
        """A STARTING record holding a slot. At the limit: wait in line (FIFO), or None when ``wait`` is False."""
        await self._ready()
        timeout = self.config.acquire_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        at_head = False  # once woken, a waiter keeps its place at the head of the line
        while True:
            if at_head or not self._slot_waiters:
                rec = self.core.reserve(sandbox_type, session_ctx_id=session_ctx_id, meta=meta,
                                        mount_dir=mount_dir, storage_path=storage_path)
                if rec is not None:
                    await self._commit()
                    return rec.model_dump(mode="json")
            if not wait:
                return None
            fut = asyncio.get_running_loop().create_future()
            if at_head:
                self._slot_waiters.appendleft(fut)
            else:
                self._slot_waiters.append(fut)
            try:
                await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise CapacityError(
                    f"no sandbox slot within {timeout:.0f}s: {self.core.counted} active of "
                    f"max_sandbox_instances={self.core.limit}"
                ) from None
            finally:
                if not fut.done():
                    fut.cancel()
                    try:
                        self._slot_waiters.remove(fut)
                    except ValueError:
                        pass
            at_head = True

    async def started(self, name: str, container_id: str, url: Optional[str], ports: list) -> dict:
        await self._ready()
        rec = self.core.started(name, container_id, url, ports)
        await self._commit()
        await self._attach(rec)
        return rec.model_dump(mode="json")

    async def moved(self, name: str, url: Optional[str], ports: list) -> Optional[dict]:
        await self._ready()
        rec = self.core.moved(name, url, ports)
        await self._commit()
        return rec.model_dump(mode="json") if rec is not None else None

    async def start_failed(self, name: str) -> None:
        await self._ready()
        if name in self.core.records:
            self.core.start_failed(name)
            await self._commit()
            self._wake_slots()

    async def claim(self, name: str, session_ctx_id: Optional[str], meta: Optional[dict] = None) -> dict:
        await self._ready()
        rec = self.core.claim(name, session_ctx_id, meta)
        self._last_claim = time.monotonic()
        await self._commit()
        await self._attach(rec)
        self.metrics.claims.inc()
        return rec.model_dump(mode="json")

    # -- release / reuse -------------------------------------------------------

    async def release(self, identity: str) -> bool:
        """Mark released now; the container's teardown finishes in the background. Unknown: True."""
        await self._ready()
        rec = self.core.find(identity)
        if rec is None:
            return True
        sid = self.core.get(rec.container_name).session_ctx_id
        reuse = self.config.sandbox_type(rec.sandbox_type).reuse
        td = self.core.release(identity, reuse=reuse)
        await self._commit()
        if td is not None:
            if td.action == "destroy":
                self._wake_slots()
            self._send_teardown(td)
        await self._detach(sid, rec.container_name)
        self.metrics.releases.inc()
        return True

    def _send_teardown(self, td: Teardown) -> None:
        pool = self._pool(td.record.sandbox_type)
        fire(pool.teardown.remote(td.record.model_dump(mode="json"), td.action, td.upload),
             f"teardown {td.record.container_name}")

    async def reset_done(self, name: str, ok: bool) -> Optional[dict]:
        await self._ready()
        rec = self.core.reset_done(name, ok)
        await self._commit()
        if rec is not None and not ok:
            self._wake_slots()
        return rec.model_dump(mode="json") if rec is not None else None

    def _pool(self, sandbox_type: Optional[str]):
        t = sandbox_type or self.config.default_type
        h = self._pools.get(t)
        if h is None:
            h = ray.get_actor(pool_name(t), namespace=self.ns)
            self._pools[t] = h
        return h

    # -- reap / restore --------------------------------------------------------

    async def reap_session(self, session_ctx_id: str, reason: str = "heartbeat_timeout") -> bool:
        """RUNNING -> RECYCLED for every container of the session; their containers go, records stay."""
        await self._ready()
        names = self.core.session_names(session_ctx_id)
        if not names:
            return False
        tds = [td for td in (self.core.recycle(n, reason) for n in names) if td is not None]
        await self._commit()
        for td in tds:
            self._send_teardown(td)
        self._wake_slots(len(tds))
        h = self._session_actors.pop(session_ctx_id, None)
        if h is not None:
            fire(h.unbind.remote(), "session unbind")
            self._spares.append(h)
        if tds:
            self.metrics.reaps.inc()
        return True

    async def restore_session(self, session_ctx_id: str) -> list[str]:
        """Bring back every RECYCLED container of a session; concurrent calls share one restore."""
        await self._ready()
        fut = self._restoring.get(session_ctx_id)
        if fut is None:
            fut = asyncio.ensure_future(self._restore(session_ctx_id))
            self._restoring[session_ctx_id] = fut
            fut.add_done_callback(lambda _f: self._restoring.pop(session_ctx_id, None))
        return await asyncio.shield(fut)

    async def _restore(self, session_ctx_id: str) -> list[str]:
        olds = self.core.to_restore(session_ctx_id)
        new_names = []
        for old in olds:
            pool = self._pool(old.sandbox_type)
            new = await pool.create.remote(
                session_ctx_id=session_ctx_id,
                meta={k: v for k, v in (old.meta or {}).items() if k != "session_ctx_id"},
                mount_dir=old.mount_dir,
                storage_path=old.storage_path,
                environment=None,
                restoring=True,
            )
            self.core.replace(old.container_name, new["container_name"])
            new_names.append(new["container_name"])
        await self._commit()
        if new_names:
            self.metrics.restores.inc()
        return [n for n in self.core.session_names(session_ctx_id)]

    async def heartbeat(self, session_ctx_id: str) -> bool:
        await self._ready()
        h = self._session_actors.get(session_ctx_id)
        if h is None:
            return False
        await h.heartbeat.remote()
        return True

    # -- queries ---------------------------------------------------------------

    async def get_info(self, identity: str) -> dict:
        await self._ready()
        return self.core.get(identity).model_dump(mode="json")

    async def records(self, sandbox_type: Optional[str] = None, states: Optional[list[str]] = None) -> list[dict]:
        await self._ready()
        out = []
        for r in self.core.records.values():
            if sandbox_type and r.sandbox_type != sandbox_type:
                continue
            if states and r.state.value not in states:
                continue
            out.append(r.model_dump(mode="json"))
        return out

    async def get_session_mapping(self, session_ctx_id: str) -> list[str]:
        await self._ready()
        return self.core.session_names(session_ctx_id)

    async def list_session_keys(self) -> list[str]:
        await self._ready()
        return list(self.core.sessions)

    async def status(self) -> dict:
        await self._ready()
        return {
            "namespace": self.ns,
            "counts": self.core.counts(),
            "active": self.core.counted,
            "limit": self.core.limit,
            "waiting_for_slot": len(self._slot_waiters),
            "sessions": {sid: list(names) for sid, names in self.core.sessions.items()},
            "session_actors": len(self._session_actors),
            "spare_session_actors": len(self._spares),
            "records": [r.public() for r in self.core.records.values()],
            "tick_errors": self._ticker.errors if self._ticker else 0,
            "started_at": self.started_at,
        }

    async def cleanup(self) -> list[str]:
        """Release every non-terminal container this registry knows (pools included)."""
        await self._ready()
        names = [r.container_name for r in self.core.records.values()
                 if r.state in (S.STARTING, S.WARM, S.RUNNING, S.RESETTING)]
        for n in names:
            rec = self.core.records[n]
            sid = rec.session_ctx_id
            td = self.core.release(n, reuse=False)
            if td is not None:
                self._send_teardown(td)
            await self._detach(sid, n)
        # RECYCLED sessions have no container; they are dropped from the index so nothing restores them
        for r in self.core.by_state(S.RECYCLED):
            self.core.release(r.container_name)
        await self._commit()
        self._wake_slots(len(names))
        return names

    async def shutdown_sessions(self) -> int:
        """Kill every session actor (spares included); used by ``corral down``."""
        await self._ready()
        hs = list(self._session_actors.values()) + self._spares
        self._session_actors.clear()
        self._spares.clear()
        for h in hs:
            try:
                ray.kill(h)
            except Exception:
                pass
        return len(hs)

    async def ping(self) -> str:
        await self._ready()
        return "ok"
