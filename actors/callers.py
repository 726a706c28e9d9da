"""Callers: the registry's callers that ask for sandboxes, from their call to their answer.

What it owns: the futures of the callers waiting in line (:class:`~actors.waiting.Waiters`), the
restores under way (one per session, shared by concurrent calls), and the acquire latency seen
inside the registry. It carries out what :class:`~corral.core.acquire.AcquireCore` decides: an
acquire takes what is warm and the rest wait for :meth:`hand_off`; a create or a restore waits
for a slot (:meth:`admit`), then for its start; a reserve waits until the pool is warm
(:meth:`answer_ready`). Part of the RegistryActor (``reg``), split out by concern; it runs on the
registry's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from corral.core.acquire import AcquireCore
from corral.core.placement import NodeView, node_pref
from corral.core.stats import LatencyWindow
from corral.errors import CapacityError, CorralError
from corral.models import ContainerModel, ContainerState

from .waiting import Waiters

if TYPE_CHECKING:
    from .registry_actor import RegistryActor

__all__ = ["Callers"]

logger = logging.getLogger("corral.registry")
S = ContainerState


class Callers:
    """See the module docstring."""

    def __init__(self, reg: "RegistryActor") -> None:
        self.reg = reg
        self.core = AcquireCore(reg.core)
        self.waiters = Waiters(reg.core.lines)
        self._restoring: dict[str, asyncio.Future] = {}
        self.acquire_ms = LatencyWindow()  # the call's start to its answer (waits included)

    # -- decisions carried out -------------------------------------------------------

    def hand_off(self, t: str) -> None:
        """Warm sandboxes of the type go to the callers waiting for one; reserves are answered."""
        given = self.core.hand_off(t)
        for wid, rec in given:
            self.waiters.resolve(wid, rec)
        if given:
            self.reg.outbox.put(*self.reg.sessions.claimed([rec for _, rec in given]))
        self.answer_ready()

    def admit(self, views: list[NodeView]) -> None:
        """Callers waiting for a slot get their STARTING records while there is room."""
        for wid, rec in self.core.admit(views):
            self.waiters.resolve(wid, rec)

    def answer_ready(self) -> None:
        for wid in self.core.ready():
            self.waiters.resolve(wid, True)

    def turn_away(self, why: str) -> None:
        """Every caller in line is answered ``why`` (the namespace is shutting down)."""
        for wid in self.core.lines.drain():
            self.waiters.resolve(wid, CapacityError(why))

    # -- warm: acquire and reserve ---------------------------------------------------

    async def acquire(self, t: str, requests: list, timeout: Optional[float], wait: bool) -> list:
        """See ``RegistryActor.acquire``; ``t`` is a known type."""
        reg = self.reg
        t0 = time.perf_counter()
        self.core.check_requests(requests, reg.nodes.nodes)
        timeout = reg.config.acquire_timeout if timeout is None else timeout
        out: list[Any] = list(self.core.acquire(t, requests))
        claimed = [r for r in out if r is not None]
        waits = []
        for i, req in enumerate(requests):
            if out[i] is None and wait:
                wid, fut = self.waiters.new()
                self.core.wait_warm(wid, t, req)
                waits.append((i, wid, fut))
        if claimed:
            await reg.commit()
            reg.outbox.put(*reg.sessions.claimed(claimed))
        if waits or claimed:
            reg.kick()
        for i, wid, fut in waits:
            try:
                out[i] = await self.waiters.wait(wid, fut, timeout, lambda: self.core.warm_timeout(t, timeout))
            except CorralError as e:
                out[i] = e
        if waits:
            await reg.commit()
        out = [reg.core.dump(r) if isinstance(r, ContainerModel) else r for r in out]
        ok = sum(isinstance(r, dict) for r in out)
        if ok:
            ms = (time.perf_counter() - t0) * 1000
            reg.metrics.claims.inc(ok)
            self.acquire_ms.add(ms, ok)
            reg.metrics.acquire_ms.observe(ms, tags={"sandbox_type": t})
        return out

    async def reserve(self, t: str, n: int, wait: bool, timeout: float) -> None:
        """Grow the type's warm target by ``n``; with ``wait``, until that many are warm."""
        self.core.check_node(None, self.reg.nodes.nodes)
        target = self.reg.core.pool(t).reserve(n)
        self.reg.kick()
        if wait:
            wid, fut = self.waiters.new()
            self.core.wait_ready(wid, t, target)
            self.answer_ready()
            await self.waiters.wait(wid, fut, timeout, lambda: self.core.ready_timeout(t, target, timeout))

    # -- cold: create and restore ----------------------------------------------------

    async def _slot(self, request: dict, timeout: float) -> ContainerModel:
        """A STARTING record for a cold start, waiting in line at the instance limit (FIFO)."""
        wid, fut = self.waiters.new()
        self.core.wait_slot(wid, request)
        self.reg.admit_and_refill()
        return await self.waiters.wait(wid, fut, timeout, lambda: self.core.slot_timeout(timeout, self.reg.views()))

    async def create(self, t: str, session: Optional[str], meta: Optional[dict], mount_dir: Optional[str],
                     storage_path: Optional[str], env: dict, timeout: Optional[float], node: Optional[str]) -> dict:
        """See ``RegistryActor.create``; ``t`` is a known type, ``env`` a checked environment."""
        reg = self.reg
        self.core.check_node(node, reg.nodes.nodes)
        session = session or reg.core.new_session()
        timeout = reg.config.acquire_timeout if timeout is None else timeout
        rec = await self._slot(dict(sandbox_type=t, session_ctx_id=session, meta=meta, mount_dir=mount_dir,
                                    storage_path=storage_path, prefer=node_pref(node)[0]), timeout)
        await reg.commit()
        rec = await reg.starts.start_and_wait(rec, env, None)
        await reg.commit()
        reg.outbox.put(*reg.sessions.claimed([rec]))
        return rec.model_dump(mode="json")

    async def restore(self, session: str) -> list[str]:
        """Bring back the session's RECYCLED and LOST sandboxes; concurrent calls share one restore."""
        fut = self._restoring.get(session)
        if fut is None:
            fut = asyncio.ensure_future(self._restore(session))
            self._restoring[session] = fut
            fut.add_done_callback(lambda _f: self._restoring.pop(session, None))
        return await asyncio.shield(fut)

    async def _restore(self, session: str) -> list[str]:
        reg = self.reg
        restored = []
        for old in reg.core.to_restore(session):
            request, download = reg.core.restore_request(old, reg.nodes.nodes)
            if old.state == S.LOST and download is None:
                logger.warning("restoring %s on another node without its workspace: it was never synced", session)
            rec = await self._slot(request, reg.config.acquire_timeout)
            await reg.commit()
            new = await reg.starts.start_and_wait(rec, {}, download)
            reg.core.replace(old.container_name, new.container_name)
            restored.append(new)
        await reg.commit()
        if restored:
            reg.outbox.put(*reg.sessions.claimed(restored))
            reg.metrics.restores.inc()
        return reg.core.session_names(session)
