"""EngineWatch: the containers of a node that stopped, as its engine reports them.

What it owns: the names reported stopped and not yet handed out, and the task that reads the
driver's event stream (restarted when it breaks, an engine restart: then every container found
not running is reported too). The registry keeps a long poll open on it through its PoolActor
(:meth:`wait`); what a stopped container means is the registry's decision.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

from .common import fire

__all__ = ["EngineWatch", "ALIVE_EVERY"]

logger = logging.getLogger("corral.pool")
#: Seconds between checks that the boxes of this node are alive, where the engine sends no events.
ALIVE_EVERY = 1.0


class EngineWatch:
    """See the module docstring."""

    def __init__(self, driver: Any, labels: dict, ours: Callable[[dict], bool], node: str) -> None:
        self.driver, self.labels, self.ours, self.node = driver, labels, ours, node
        self._dead: set[str] = set()
        self._event = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    async def wait(self, timeout: float) -> list[str]:
        """Names reported stopped since the last call, waiting up to ``timeout`` seconds for one."""
        if self._task is None or self._task.done():
            self._task = fire(self._follow(), f"watch {self.node[:8]}")
        if not self._dead:
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        dead, self._dead = sorted(self._dead), set()
        return dead

    async def _follow(self) -> None:
        while True:
            try:
                async for name in self.driver.events(self.labels):
                    self._report([name])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.info("event stream of %s broke (%s); checking every container", self.node[:8], e)
            await asyncio.sleep(ALIVE_EVERY)
            try:
                self._report([h.labels.get("corral.name") or h.name for h in await self.driver.list(self.labels)
                              if h.status != "running" and self.ours(h.labels)])
            except Exception:
                pass  # the engine is still away: try again after the next break

    def _report(self, names: list[str]) -> None:
        if names:
            self._dead.update(names)
            self._event.set()
