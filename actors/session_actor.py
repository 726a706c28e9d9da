"""SessionActor: one session's heartbeat clock and its decision to reap itself; SessionClocks:
the tick loop it shares with :class:`~actors.session_host.SessionHost`.

What a SessionActor owns: a :class:`SlotTable` of one slot, bound to a session
(a :class:`SessionCore`) or spare, and a :class:`SessionClocks` that ticks it
every ``watcher_scan_interval``. When its own heartbeat says the session may
be idle, it asks each of the session's boxes for its activity (``GET
/v1/activity``: the last call and the calls running now). A tool call
therefore never passes through this actor, and a sandbox with a command still
running is never reaped. If the session is idle past its timeout, the actor
asks the registry to reap it (containers go RECYCLED, workspaces to storage),
and the registry returns the actor to the spares for the next session.

The registry starts these actors ahead of need (spares) and reuses them, so an
acquire never waits for an actor process. They are detached: a session
outlives the client process that opened it, and its heartbeat timeout is what
reclaims it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Optional

import ray

from corral.client._http import tls_context
from corral.core.session import SessionCore, SlotTable
from corral.models import SandboxManagerEnvConfig

from .common import Ticker, set_priority
from .handles import REGISTRY_NAME

__all__ = ["SessionActor", "SessionClocks", "SESSION_NICE_INCREMENT"]

logger = logging.getLogger("corral.session")
SESSION_NICE_INCREMENT = 4  # above the niceness Ray gives its workers (15): the sandboxes' level


def lower_priority() -> None:
    """Nothing a session clock does is urgent (it runs in seconds); on a loaded node the registry
    and the pools, which answer acquires and releases, go first. Ray wakes every worker's main
    thread 100 times a second (its signal check): under SCHED_IDLE those wake-ups never make a
    control-plane thread wait."""
    set_priority(increment=SESSION_NICE_INCREMENT, idle=True)


class SessionClocks:
    """The I/O behind a :class:`SlotTable`: a tick that asks the boxes of every due slot for their
    activity and asks the registry to reap the sessions the table decides are idle.

    What it owns: the ticker, the HTTP client for the boxes, the registry's handle. Decisions
    are the table's; this class only carries them out.
    """

    def __init__(self, config: SandboxManagerEnvConfig, table: SlotTable) -> None:
        self.config, self.table = config, table
        self._ticker: Optional[Ticker] = None
        self._http = None
        self._registry: Any = None

    def start(self) -> None:
        """Start ticking (idempotent; on the actor's event loop)."""
        if self._ticker is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=2.0, trust_env=False, verify=tls_context())
            self._ticker = Ticker("session-tick", self.config.watcher_scan_interval or 1.0, self._tick)
            self._ticker.start()

    @property
    def errors(self) -> int:
        return self._ticker.errors if self._ticker else 0

    async def _activity(self, url: Optional[str], token: Optional[str]) -> Optional[dict]:
        if not url or not url.startswith("http"):
            return None
        try:
            r = await self._http.get(f"{url}/v1/activity", headers={"Authorization": f"Bearer {token}"})
            return r.json() if r.status_code == 200 else None
        except Exception:
            return None

    async def _tick(self) -> None:
        due = self.table.due()
        if due:
            await asyncio.gather(*(self._check(slot, core) for slot, core in due))

    async def _check(self, slot: str, core: SessionCore) -> None:
        boxes = list(core.boxes.values())
        acts = await asyncio.gather(*(self._activity(b.url, b.token) for b in boxes))
        if not self.table.decide(slot, core, {b.name: a for b, a in zip(boxes, acts)}):
            return
        logger.info("session %s idle %.1fs > %.1fs: reaping", core.session_ctx_id, core.idle_for(), core.timeout)
        try:
            if self._registry is None:
                # a GCS lookup: in a thread, not on this actor's event loop; a registry that is
                # restarting (not found) is asked again next tick, like a failed reap
                self._registry = await asyncio.to_thread(ray.get_actor, REGISTRY_NAME,
                                                         namespace=self.config.namespace)
            await self._registry.reap_session.remote(core.session_ctx_id, "heartbeat_timeout")
        except Exception as e:
            self._registry = None
            self.table.reap_failed(slot, core)  # try again next tick
            logger.warning("reap of %s failed: %s", core.session_ctx_id, e)


class SessionActor:
    """See the module docstring. ``attach``/``detach``/``unbind`` are idempotent."""

    def __init__(self, config: dict) -> None:
        lower_priority()
        self.config = SandboxManagerEnvConfig.model_validate(config)
        self.table = SlotTable()
        [self.slot] = self.table.add(1)
        self.clocks = SessionClocks(self.config, self.table)

    async def describe(self) -> dict:
        return {**self.table.describe(self.slot), "pid": os.getpid()}

    async def attach(self, session_ctx_id: str, timeout: float, name: str, url: Optional[str],
                     token: Optional[str]) -> None:
        """Bind to ``session_ctx_id`` (if not yet bound) and add one container to it."""
        self.table.attach(self.slot, session_ctx_id, timeout, name, url, token)
        self.clocks.start()

    async def detach(self, name: str) -> bool:
        return self.table.detach(self.slot, name)

    async def unbind(self) -> None:
        """Forget the session: this actor is a spare again."""
        self.table.unbind(self.slot)

    async def heartbeat(self) -> float:
        return self.table.heartbeat(self.slot)
