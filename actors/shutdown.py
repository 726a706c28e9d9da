"""Shutdown: the registry's part in taking its namespace down.

What it owns: whether the registry is draining (then its tick admits and refills nothing), and
the steps ``corral down`` calls in order: :meth:`drain` (no new starts; those in flight finish),
:meth:`cleanup` (callers in line told, every sandbox released), :meth:`settle` (until no node
holds a container of the namespace), :meth:`teardown_nodes` (per-node resources). Which records
go and how is the registry core's (``release_all``); this carries it out. Part of the
RegistryActor (``reg``), split out by concern; it runs on the registry's event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from .handles import ActorGone

if TYPE_CHECKING:
    from .registry_actor import RegistryActor

__all__ = ["Shutdown", "DRAIN_TIMEOUT", "SETTLE_EVERY"]

DRAIN_TIMEOUT = 60.0  # seconds a drain waits for the starts in flight
SETTLE_EVERY = 0.2  # seconds between looks at the nodes' containers while settling


class Shutdown:
    """See the module docstring."""

    def __init__(self, reg: "RegistryActor") -> None:
        self.reg = reg
        self.draining = False

    def release_everything(self) -> list[str]:
        """Every sandbox with a container destroyed, restorable records dropped; the names destroyed."""
        reg = self.reg
        names, tds, left = reg.core.release_all()
        reg.outbox.put(*[("teardown", td) for td in tds], *[m for s, n in left for m in reg.sessions.ended(s, n)])
        return names

    async def cleanup(self) -> list[str]:
        reg = self.reg
        reg.callers.turn_away("corral is shutting down: every sandbox of this namespace is released")
        names = self.release_everything()
        await reg.commit()
        reg.kick()
        return names

    async def drain(self) -> dict:
        starts = self.reg.starts
        self.draining = True
        try:
            await asyncio.wait_for(starts.idle.wait(), DRAIN_TIMEOUT)
        except asyncio.TimeoutError:
            pass
        return {"starting": len(starts.dispatched)}

    async def settle(self, timeout: float) -> int:
        """Containers of the namespace left on the nodes once none is, or once ``timeout`` passed.
        The nodes' engines are the only witnesses of a removal done: they are asked again."""
        reg = self.reg
        await reg.outbox.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = 0
            for info in list(reg.nodes.nodes.values()):
                try:
                    left += len(await info.lister().list())
                except (ActorGone, asyncio.TimeoutError):
                    pass
            if left == 0 or time.monotonic() > deadline:
                return left
            await asyncio.sleep(SETTLE_EVERY)

    async def teardown_nodes(self) -> int:
        reg = self.reg
        await reg.outbox.flush()
        done = 0
        for info in reg.nodes.nodes.values():
            try:
                await info.lister().teardown_node()
                done += 1
            except (ActorGone, asyncio.TimeoutError):
                pass
        return done
