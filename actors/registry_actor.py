"""RegistryActor: the only writer of container records (a shell over RegistryCore).

What it owns: the :class:`RegistryCore` (records, session index, warm index,
instance count), the record store it checkpoints to, the FIFO of callers
waiting for an instance slot, the FIFO per sandbox type of acquirers waiting
for a warm container, the in-flight restores (so two concurrent restores of
one session start one set of containers), and the session actors: which one
serves which session, and the spares kept started so an acquire never waits
for an actor process.

An acquire is one call to this actor (a client sends its concurrent acquires
as one batch): it takes the oldest WARM record of the type, binds it to the
session, commits, and answers; the pool actor of that type is told the new
warm and waiting counts afterwards (it refills from them) and is never on the
acquire's path. A container that turns WARM (started, or reset for reuse) goes
straight to the longest waiter of its type.

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
from corral.core.stats import LatencyWindow
from corral.errors import CapacityError, CorralError, InvalidRequest
from corral.lane import LaneServer
from corral.models import LABEL_MANAGED, LABEL_REGISTRY, ContainerState, SandboxManagerEnvConfig
from corral.store import JsonlRecordStore

from .common import CONTROL_NICE, set_priority, SESSION_PREFIX, Ticker, fire, pool_name
from .metrics import registry_metrics

__all__ = ["RegistryActor"]

logger = logging.getLogger("corral.registry")
S = ContainerState
COMPACT_EVERY = 5000  # log lines between snapshots
SPARE_TRIM_AFTER = 60.0
MAX_SPAWNING = 4  # session actors being started at once
SPARE_QUIET = 10.0  # seconds without a claim or a release before spares are topped up
ATTACH_DELAY = 0.02  # seconds a claim's session actor update waits, so a burst's updates go out after its answers
AFTER_ANSWER = 0.003  # seconds messages caused by an answer (pool counts, teardowns) wait: each send costs ~1 ms here


class RegistryActor:
    """See the module docstring. Every public method is safe to retry (Ray may)."""

    def __init__(self, config: dict) -> None:
        self.nice = set_priority(CONTROL_NICE)  # answers acquires and releases: ahead of the sandboxes
        self.config = SandboxManagerEnvConfig.model_validate(config)
        self.ns = self.config.namespace
        self.core = RegistryCore(self.config, registry_id=self.ns)
        self.store = JsonlRecordStore(os.path.join(self.config.abs_state_dir(), "registry"))
        self._boot_task: Optional[asyncio.Task] = None
        self._slot_waiters: deque[asyncio.Future] = deque()
        # sandbox_type -> acquirers waiting for a warm container: (future, session_ctx_id, meta)
        self._warm_waiters: dict[str, deque[tuple[asyncio.Future, Optional[str], Optional[dict]]]] = {}
        self._claimed: dict[str, int] = {}  # sandbox_type -> claims so far (pools consume reserve() by it)
        self._views_sent: dict[str, tuple] = {}  # sandbox_type -> the last (warm, waiting, claimed) sent to its pool
        self._views_due = False
        self._pending_actor: dict[str, asyncio.Future] = {}  # session_ctx_id -> its session actor being created
        # Claimed containers whose session actor has not been told yet (sent in order, after the
        # answers), and what has been told: a session released before its actor heard of it
        # costs its actor no message at all.
        self._to_attach: deque[str] = deque()
        self._attach_wake = asyncio.Event()
        self._attacher: Optional[asyncio.Task] = None
        self._armed_names: set[str] = set()
        self._armed_sids: set[str] = set()
        self._creating: set[str] = set()  # sessions whose promised actor is being created
        self._teardowns: dict[str, list[Teardown]] = {}  # sandbox_type -> teardowns not yet sent to its pool
        self._restoring: dict[str, asyncio.Future] = {}
        self._session_actors: dict[str, Any] = {}  # session_ctx_id -> SessionActor handle
        self._spares: list[Any] = []
        self._spawning = 0
        self._spare_surplus_since: Optional[float] = None
        self._last_turnover = 0.0
        self._commit_lock = asyncio.Lock()
        self._pools: dict[str, Any] = {}  # pool actor handles by type: given by each pool at boot, or looked up
        self._pool_lookups: set[str] = set()
        self._pool_missing: dict[str, float] = {}  # when a lookup last found no pool, by type
        self._driver = None
        self._lane: Optional[LaneServer] = None  # acquire and release for callers on this node
        self._ticker: Optional[Ticker] = None
        self._reconcile_due = 0.0
        self.metrics = registry_metrics()
        self.acquire_ms = LatencyWindow()  # inside this actor: the call's start to its answer (waits included)
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
        if self.config.registry_lane:
            await self._open_lane()
        logger.info("registry up: %d records, %d sessions", len(self.core.records), len(self.core.sessions))

    async def _open_lane(self) -> None:
        lane = LaneServer({"acquire": self.acquire, "release_many": self.release_many}, tag=self.ns)
        try:
            await lane.start()
        except OSError as e:  # callers use Ray calls: slower, nothing else changes
            logger.warning("no lane for callers on this node (%s); they use Ray calls", e)
            return
        self._lane = lane

    async def lane_address(self) -> Optional[dict]:
        """Where callers on this node send acquires and releases (None: no lane, use Ray)."""
        await self._ready()
        if self._lane is None:
            return None
        return {"path": self._lane.path, "token": self._lane.token, "node_id": ray.get_runtime_context().get_node_id()}

    async def close_lane(self) -> bool:
        """Stop the lane and remove its socket (``corral down``, before this actor is killed)."""
        if self._lane is None:
            return False
        self._lane.close()
        self._lane = None
        return True

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
        self._views_soon()

    # -- what the pools see ------------------------------------------------------

    def _view(self, sandbox_type: str) -> tuple:
        return (self.core.warm_count(sandbox_type), len(self._warm_waiters.get(sandbox_type, ())),
                self._claimed.get(sandbox_type, 0), self.core.count(sandbox_type, S.RESETTING))

    def _views_soon(self) -> None:
        """:meth:`_sync_views` just after the answer in hand has gone out (once for a burst of changes)."""
        if not self._views_due:
            self._views_due = True
            asyncio.get_running_loop().call_later(AFTER_ANSWER, self._sync_views)

    def _sync_views(self) -> None:
        """Tell each pool whose warm/waiting/claimed counts changed (one message per pool)."""
        self._views_due = False
        for t in self.config.sandbox_types:
            view = self._view(t)
            if self._views_sent.get(t) != view:
                self._views_sent[t] = view
                try:
                    pool = self._pool(t)
                except ValueError:  # that pool actor is not running (yet)
                    self._views_sent.pop(t, None)
                    continue
                fire(pool.view.remote(*view), f"view of {t}")

    async def pool_view(self, sandbox_type: str, pool: Any = None) -> dict:
        """The counts a pool refills from (it asks at boot, with its own handle; afterwards they are pushed)."""
        await self._ready()
        if pool is not None:
            self._pools[self.config.sandbox_type(sandbox_type).name] = pool
        warm, waiting, claimed, resetting = self._view(sandbox_type)
        return {"warm": warm, "waiting": waiting, "claimed": claimed, "resetting": resetting}

    # -- session actors --------------------------------------------------------

    async def _find_session_actors(self) -> None:
        """Rediscover session actors by name after a restart: bound ones serve their sessions, others are spares."""
        try:  # GCS calls: in a thread, never on the event loop
            named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        except Exception:  # the GCS may be briefly unavailable right after a restart
            named = []
        for entry in named:
            if entry.get("namespace") != self.ns or not entry.get("name", "").startswith(SESSION_PREFIX):
                continue
            try:
                h = await asyncio.to_thread(ray.get_actor, entry["name"], namespace=self.ns)
                desc = await asyncio.wait_for(h.describe.remote(), 10)
            except Exception:
                continue
            sid = desc.get("session_ctx_id")
            if sid and sid in self.core.sessions:
                self._session_actors[sid] = h
                self._armed_sids.add(sid)
                self._armed_names.update(self.core.session_names(sid))
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
        if time.monotonic() - self._last_turnover < SPARE_QUIET:
            # sessions are coming and going (an RL loop): new processes now would slow it, and each
            # release gives its actor back, so the actors the loop needs already exist
            return
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

    async def _actor_of(self, session_ctx_id: str, ending: bool = True):
        """The session's actor (waiting for one being created), or None.

        ``ending``: the caller ends the session's binding (release, reap). An actor that is
        still only promised (no spare was left and its creation has not begun) is then not
        created at all.
        """
        pending = self._pending_actor.get(session_ctx_id)
        if pending is not None:
            if ending and session_ctx_id not in self._creating:
                del self._pending_actor[session_ctx_id]
                if not pending.done():
                    pending.set_result(None)
                return None
            try:
                await asyncio.shield(pending)
            except Exception:
                pass
        return self._session_actors.get(session_ctx_id)

    def _choose_actors(self, recs: list) -> list:
        """Give each claimed record's session an actor now (a spare when there is one).

        Runs before the claim is answered, so a release that follows finds the actor. A session
        with no spare left gets a pending slot, filled by :meth:`_send_attaches` (which creates an
        actor off the event loop). Returns the records to attach.
        """
        out = []
        for rec in recs:
            sid = rec.session_ctx_id
            if not sid:
                continue
            if sid not in self._session_actors and sid not in self._pending_actor:
                if self._spares:
                    self._session_actors[sid] = self._spares.pop()
                else:
                    self._pending_actor[sid] = asyncio.get_running_loop().create_future()
            out.append(rec)
        if out and self._ticker:
            self._ticker.kick()  # top the spares up again
        return out

    def _queue_attach(self, recs: list) -> None:
        """Tell the session actors of these claimed containers, in order, shortly after the answer."""
        for rec in self._choose_actors(recs):
            self._to_attach.append(rec.container_name)
        if self._to_attach:
            if self._attacher is None or self._attacher.done():
                self._attacher = fire(self._send_attaches(), "attach sessions")
            self._attach_wake.set()

    async def _send_attaches(self) -> None:
        while True:
            await self._attach_wake.wait()
            self._attach_wake.clear()
            await asyncio.sleep(ATTACH_DELAY)
            while self._to_attach:
                rec = self.core.records.get(self._to_attach.popleft())
                if rec is None or rec.state != S.RUNNING or not rec.session_ctx_id:
                    continue  # released (or reaped) before its actor heard of it
                try:
                    await self._attach(rec)
                except Exception as e:
                    logger.warning("attach of %s failed: %r", rec.container_name, e)
                await asyncio.sleep(0)  # requests that came in meanwhile go first

    async def _session_actor(self, session_ctx_id: str):
        h = self._session_actors.get(session_ctx_id)
        if h is not None:
            return h
        pending = self._pending_actor.get(session_ctx_id)
        if pending is not None and pending.done() and not pending.cancelled() and pending.exception() is None:
            return pending.result()
        self._creating.add(session_ctx_id)
        try:
            new = self._spares.pop() if self._spares else await asyncio.to_thread(self._new_session_actor)
        except BaseException as e:
            if pending is not None and not pending.done():
                pending.set_exception(e)
            self._pending_actor.pop(session_ctx_id, None)
            raise
        finally:
            self._creating.discard(session_ctx_id)
        h = self._session_actors.setdefault(session_ctx_id, new)
        if h is not new:  # another claim for this session won while we created ours: keep it as a spare
            self._spares.append(new)
        if pending is not None and not pending.done():
            pending.set_result(h)
        self._pending_actor.pop(session_ctx_id, None)
        if self._ticker:
            self._ticker.kick()  # top the spares up again
        return h

    async def _attach(self, rec, wait: bool = False) -> None:
        """Add the container to its session's actor (a spare, or a new one).

        The ``attach`` call is sent without waiting unless ``wait`` (Ray runs one caller's calls
        to an actor in order, so a later ``unbind`` cannot overtake it). A dead actor is replaced
        and the attach retried in the background.
        """
        sid = rec.session_ctx_id
        if not sid:
            return
        h = await self._session_actor(sid)
        ref = h.attach.remote(sid, self.config.timeout_for(rec.sandbox_type), rec.container_name, rec.url,
                              rec.runtime_token)
        self._armed_names.add(rec.container_name)
        self._armed_sids.add(sid)
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
            if not running or sid in self._pending_actor:
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
        told = name in self._armed_names
        self._armed_names.discard(name)
        if not sid:
            return
        h = await self._actor_of(sid)
        if h is None:
            return
        if sid not in self.core.sessions:
            # The session has nothing left: the actor goes back to the spares. Ray runs one
            # caller's calls to an actor in order, so a later attach cannot overtake this unbind.
            self._session_actors.pop(sid, None)
            if sid in self._armed_sids:
                self._armed_sids.discard(sid)
                fire(h.unbind.remote(), "session unbind")
            self._spares.append(h)
        elif told:
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
        self._hand_off(rec.sandbox_type)
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

    # -- acquire ----------------------------------------------------------------

    async def acquire(self, sandbox_type: str, requests: list, timeout: Optional[float] = None,
                      wait: bool = True) -> list:
        """Bind a warm container of the type to each request (``{"session_ctx_id", "meta"}``).

        One answer per request, in order: the RUNNING record as a dict, a corral error (raised
        by the client), or None when none was warm and ``wait`` is False. Requests that find
        nothing warm wait in line (FIFO per type, behind earlier waiters) until a container turns
        WARM or ``timeout`` passes; the pool refills from the waiting count it is sent.
        """
        await self._ready()
        t0 = time.perf_counter()
        t = self.config.sandbox_type(sandbox_type).name
        if not isinstance(requests, list) or not requests:
            raise InvalidRequest("requests must be a non-empty list")
        timeout = self.config.acquire_timeout if timeout is None else timeout
        out: list[Any] = [None] * len(requests)
        claimed, waits = [], []
        for i, req in enumerate(requests):
            sid, meta = req.get("session_ctx_id"), req.get("meta")
            name = None if self._warm_waiters.get(t) else self.core.next_warm(t)
            if name is not None:
                rec = self.core.claim(name, sid, meta)
                claimed.append(rec)
                out[i] = rec
            elif wait:
                waits.append((i, self._wait_warm(t, sid, meta, timeout)))
        if claimed:
            self._claimed[t] = self._claimed.get(t, 0) + len(claimed)
            self._last_turnover = time.monotonic()
            await self._commit()
            self._queue_attach(claimed)
        else:
            self._views_soon()  # new waiters: the pool must know
        for i, waiting in waits:
            try:
                out[i] = await waiting
            except CorralError as e:
                out[i] = e
        ok = 0
        for i, r in enumerate(out):
            if r is not None and not isinstance(r, CorralError):
                out[i] = self.core.dump(r)
                ok += 1
        if ok:  # recorded after the answer has gone out (call_soon would run before Ray sends it)
            asyncio.get_running_loop().call_later(
                AFTER_ANSWER, self._observe_acquires, t, (time.perf_counter() - t0) * 1000, ok)
        return out

    def _observe_acquires(self, sandbox_type: str, ms: float, n: int) -> None:
        self.metrics.claims.inc(n)
        self.acquire_ms.add(ms, n)
        for _ in range(n):
            self.metrics.acquire_ms.observe(ms, tags={"sandbox_type": sandbox_type})

    async def _wait_warm(self, t: str, sid: Optional[str], meta: Optional[dict], timeout: float):
        fut = asyncio.get_running_loop().create_future()
        line = self._warm_waiters.setdefault(t, deque())
        line.append((fut, sid, meta))
        try:
            try:
                rec = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                if not (fut.done() and not fut.cancelled() and fut.exception() is None):
                    raise CapacityError(
                        f"no warm {t!r} sandbox within {timeout:.0f}s (warm={self.core.warm_count(t)}, "
                        f"starting={self.core.count(t, S.STARTING)}, waiting={len(line)})"
                    ) from None
                rec = fut.result()
        finally:
            if not fut.done():
                fut.cancel()
            for item in list(line):
                if item[0] is fut:
                    line.remove(item)
            self._views_soon()
        await self._commit()
        self._queue_attach([rec])
        return rec

    def _hand_off(self, sandbox_type: Optional[str]) -> None:
        """Containers of the type that are WARM go to the acquirers waiting for one, longest first."""
        t = sandbox_type or self.config.default_type
        line = self._warm_waiters.get(t)
        while line and self.core.warm_count(t):
            fut, sid, meta = line.popleft()
            if fut.done():
                continue
            rec = self.core.claim(self.core.next_warm(t), sid, meta)
            self._claimed[t] = self._claimed.get(t, 0) + 1
            self._last_turnover = time.monotonic()
            fut.set_result(rec)

    def _fail_waiters(self, message: str) -> None:
        for line in self._warm_waiters.values():
            while line:
                fut, _, _ = line.popleft()
                if not fut.done():
                    fut.set_exception(CapacityError(message))

    async def claim(self, name: str, session_ctx_id: Optional[str], meta: Optional[dict] = None) -> dict:
        """Bind one named WARM container to a session (an acquire picks the container itself)."""
        await self._ready()
        rec = self.core.claim(name, session_ctx_id, meta)
        self._last_turnover = time.monotonic()
        await self._commit()
        self._queue_attach([rec])
        self.metrics.claims.inc()
        return rec.model_dump(mode="json")

    async def drop_warm(self, sandbox_type: str, names: Optional[list] = None, n: int = 0) -> list[str]:
        """Release WARM containers of the type (the pool's health check and shrink): the named ones
        that are still WARM, or else the ``n`` that became warm last. Never touches a claimed one."""
        await self._ready()
        t = self.config.sandbox_type(sandbox_type).name
        if names is None:
            names = list(self.core.warm.get(t, {}))[-n:] if n > 0 else []
        dropped = []
        for name in names:
            rec = self.core.records.get(name)
            if rec is None or rec.state != S.WARM or rec.sandbox_type != t:
                continue
            td = self.core.release(name)
            if td is not None:
                self._send_teardown(td)
            dropped.append(name)
        await self._commit()
        self._wake_slots(len(dropped))
        return dropped

    # -- release / reuse -------------------------------------------------------

    async def release(self, identity: str) -> bool:
        """Mark released now; the container's teardown finishes in the background. Unknown: True."""
        return (await self.release_many([identity]))[0]

    async def release_many(self, identities: list) -> list:
        """:meth:`release` for each identity, with one commit (a client batches concurrent releases).

        The answer goes out as soon as the records are committed; teardowns and session actor
        updates are sent right after. One answer per identity: True, or the corral error.
        """
        await self._ready()
        out: list[Any] = []
        after = []
        for identity in identities:
            try:
                rec = self.core.find(identity)
            except CorralError as e:
                out.append(e)
                continue
            out.append(True)
            if rec is None:
                continue
            sid = self.core.get(rec.container_name).session_ctx_id
            reuse = self.config.sandbox_type(rec.sandbox_type).reuse
            td = self.core.release(identity, reuse=reuse)
            after.append((td, sid, rec.container_name))
        await self._commit()
        if after:
            self._last_turnover = time.monotonic()
            fire(self._after_release(after), "teardown after release")
        return out

    async def _after_release(self, done: list) -> None:
        await asyncio.sleep(AFTER_ANSWER)  # the answer first
        freed = 0
        for td, sid, name in done:
            if td is not None:
                freed += td.action == "destroy"
                self._send_teardown(td)
            await self._detach(sid, name)
            self.metrics.releases.inc()
        if freed:
            self._wake_slots(freed)

    def _send_teardown(self, td: Teardown) -> None:
        """Queue a teardown for its pool; the ones queued in one loop iteration go as one call."""
        if not self._teardowns:
            fire(self._flush_teardowns(), "send teardowns")
        self._teardowns.setdefault(td.record.sandbox_type or self.config.default_type, []).append(td)

    async def _flush_teardowns(self) -> None:
        await asyncio.sleep(AFTER_ANSWER)
        batches, self._teardowns = self._teardowns, {}
        for t, tds in batches.items():
            items = [(td.record.model_dump(mode="json"), td.action, td.upload) for td in tds]
            fire((await self._pool_async(t)).teardown_many.remote(items), f"{len(items)} teardowns of {t}")

    async def reset_done(self, name: str, ok: bool) -> Optional[dict]:
        await self._ready()
        rec = self.core.reset_done(name, ok)
        if rec is not None and ok:
            self._hand_off(rec.sandbox_type)
        await self._commit()
        if rec is not None and not ok:
            self._wake_slots()
        return rec.model_dump(mode="json") if rec is not None else None

    def _pool(self, sandbox_type: Optional[str]):
        """The type's pool actor, from what is known now. Unknown: ValueError, and a lookup by name
        starts in the background (a GCS call: never on this event loop), which sends the pool its
        counts once it is found."""
        t = sandbox_type or self.config.default_type
        h = self._pools.get(t)
        if h is None:
            if t not in self._pool_lookups and time.monotonic() - self._pool_missing.get(t, -1e9) > 1.0:
                self._pool_lookups.add(t)
                fire(self._look_up_pool(t), f"look up pool {t}")
            raise ValueError(f"the pool of {t!r} is not known yet")
        return h

    async def _pool_async(self, sandbox_type: Optional[str]):
        """The type's pool actor, looked up by name off the event loop if needed (ValueError: none)."""
        t = sandbox_type or self.config.default_type
        h = self._pools.get(t)
        if h is None:
            h = await asyncio.to_thread(ray.get_actor, pool_name(t), namespace=self.ns)
            self._pools[t] = h
        return h

    async def _look_up_pool(self, t: str) -> None:
        try:
            await self._pool_async(t)
        except ValueError:  # not running (yet): a use a second from now looks again
            self._pool_missing[t] = time.monotonic()
            return
        finally:
            self._pool_lookups.discard(t)
        self._views_sent.pop(t, None)
        self._views_soon()

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
        await self._actor_of(session_ctx_id)
        h = self._session_actors.pop(session_ctx_id, None)
        self._armed_sids.discard(session_ctx_id)
        self._armed_names.difference_update(names)
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
            pool = await self._pool_async(old.sandbox_type)
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
        if session_ctx_id in self._pending_actor and session_ctx_id not in self._creating:
            return True  # its actor is promised; its clock starts with its first attach
        h = await self._actor_of(session_ctx_id, ending=False)
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
            "waiting_for_warm": {t: len(line) for t, line in self._warm_waiters.items() if line},
            "sessions": {sid: list(names) for sid, names in self.core.sessions.items()},
            "session_actors": len(self._session_actors),
            "spare_session_actors": len(self._spares),
            "records": [r.public() for r in self.core.records.values()],
            "tick_errors": self._ticker.errors if self._ticker else 0,
            "started_at": self.started_at,
            "nice": self.nice,
            "acquire_ms": self.acquire_ms.summary(),
            "lane": {"path": self._lane.path, "served": self._lane.served} if self._lane else None,
        }

    async def cleanup(self) -> list[str]:
        """Release every non-terminal container this registry knows (pools included)."""
        await self._ready()
        self._fail_waiters("corral is shutting down: every sandbox of this namespace is being released")
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
