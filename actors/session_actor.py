"""SessionActor: one session's heartbeat clock and its decision to reap itself.

What it owns: a :class:`SessionCore` while bound to a session (None while it
waits as a spare), and the loop that ticks every ``watcher_scan_interval``.
When its own heartbeat says the session may be idle, it asks each of the
session's boxes for its activity (``GET /v1/activity``: the last call and the
calls running now). A tool call therefore never passes through this actor,
and a sandbox with a command still running is never reaped. If the session is
idle past its timeout, the actor asks the registry to reap it (containers go
RECYCLED, workspaces to storage), and the registry returns the actor to the
spares for the next session.

The registry starts these actors ahead of need (spares) and reuses them, so an
acquire never waits for an actor process. They are detached: a session
outlives the client process that opened it, and its heartbeat timeout is what
reclaims it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Optional

import ray

from corral.client._http import tls_context
from corral.core.session import REAP, SessionCore
from corral.models import SandboxManagerEnvConfig

from .common import Ticker, set_priority
from .handles import REGISTRY_NAME

__all__ = ["SessionActor"]

logger = logging.getLogger("corral.session")
SESSION_NICE_INCREMENT = 4  # above the niceness Ray gives its workers (15): the sandboxes' level


class SessionActor:
    """See the module docstring. ``attach``/``detach``/``unbind`` are idempotent."""

    def __init__(self, config: dict) -> None:
        # Nothing a session actor does is urgent (its clock runs in seconds); on a loaded node
        # the registry and the pools, which answer acquires and releases, go first. Ray wakes
        # every worker's main thread 100 times a second (its signal check): under SCHED_IDLE
        # those wake-ups never make a control-plane thread wait.
        set_priority(increment=SESSION_NICE_INCREMENT, idle=True)
        self.config = SandboxManagerEnvConfig.model_validate(config)
        self.core: Optional[SessionCore] = None
        self.sessions_served = 0
        self._ticker: Optional[Ticker] = None
        self._http = None
        self._reaping = False

    def _start_loop(self) -> None:
        if self._ticker is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=2.0, trust_env=False, verify=tls_context())
            interval = self.config.watcher_scan_interval or 1.0
            self._ticker = Ticker("session-tick", interval, self._tick)
            self._ticker.start()

    async def describe(self) -> dict:
        c = self.core
        return {
            "session_ctx_id": c.session_ctx_id if c else None,
            "containers": sorted(c.boxes) if c else [],
            "last_heartbeat": c.last_heartbeat if c else None,
            "idle_for": c.idle_for() if c else None,
            "timeout": c.timeout if c else None,
            "sessions_served": self.sessions_served,
            "pid": os.getpid(),
        }

    async def attach(self, session_ctx_id: str, timeout: float, name: str, url: Optional[str],
                     token: Optional[str]) -> None:
        """Bind to ``session_ctx_id`` (if not yet bound) and add one container to it."""
        if self.core is None or self.core.session_ctx_id != session_ctx_id:
            self.core = SessionCore(session_ctx_id, timeout)
            self.sessions_served += 1
            self._reaping = False
        self.core.attach(name, url, token)
        self._start_loop()

    async def detach(self, name: str) -> bool:
        return self.core.detach(name) if self.core else True

    async def unbind(self) -> None:
        """Forget the session: this actor is a spare again."""
        self.core = None
        self._reaping = False

    async def heartbeat(self) -> float:
        return self.core.heartbeat() if self.core else 0.0

    async def _activity(self, url: Optional[str], token: Optional[str]) -> Optional[dict]:
        if not url or not url.startswith("http"):
            return None
        try:
            r = await self._http.get(f"{url}/v1/activity", headers={"Authorization": f"Bearer {token}"})
            return r.json() if r.status_code == 200 else None
        except Exception:
            return None

    async def _tick(self) -> None:
        core = self.core
        if core is None or self._reaping or not core.due():
            return
        boxes = list(core.boxes.values())
        acts = await asyncio.gather(*(self._activity(b.url, b.token) for b in boxes))
        if self.core is not core:  # unbound or rebound while we asked
            return
        if core.decide({b.name: a for b, a in zip(boxes, acts)}) == REAP:
            self._reaping = True
            logger.info("session %s idle %.1fs > %.1fs: reaping", core.session_ctx_id, core.idle_for(), core.timeout)
            try:
                # a GCS lookup: in a thread, not on this actor's event loop; a registry that is
                # restarting (not found) is asked again next tick, like a failed reap
                registry = await asyncio.to_thread(ray.get_actor, REGISTRY_NAME, namespace=self.config.namespace)
                await registry.reap_session.remote(core.session_ctx_id, "heartbeat_timeout")
            except Exception as e:
                self._reaping = False  # try again next tick
                logger.warning("reap of %s failed: %s", core.session_ctx_id, e)
