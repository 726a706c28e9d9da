"""SessionHost: many sessions' heartbeat clocks in one actor per node (``session_mode="hosted"``).

What it owns: a :class:`SlotTable` of many slots, each bound to a session (a
:class:`SessionCore`) or spare, and one :class:`SessionClocks` that ticks them
all: a due slot's boxes are asked for their activity and the registry is asked
to reap its session, exactly as a SessionActor does for its one. A slot is a
dict entry, not a process, so the registry makes them in batches and a live
session costs its node a few kilobytes instead of an actor process.

The registry treats each slot as a session actor (through
:class:`~actors.handles.HostedSessionHandle`). A slot this host does not have
(dropped, or lost when the host restarted) raises :class:`UnknownSlot`, which
the handle reports as :class:`~actors.handles.ActorGone`: its session gets a
new slot the way a session whose actor died gets a new actor.

Detached, named per node (:func:`~actors.handles.host_name`), pinned to its
node, at the sandboxes' low CPU priority like a SessionActor.
"""

from __future__ import annotations

import os
from typing import Optional

from corral.core.session import SlotTable
from corral.models import SandboxManagerEnvConfig

from .session_actor import SessionClocks, lower_priority

__all__ = ["SessionHost"]


class SessionHost:
    """See the module docstring. Every per-slot method raises :class:`UnknownSlot` for a slot it
    does not have; ``attach``/``detach``/``unbind`` are idempotent."""

    def __init__(self, config: dict, node: str) -> None:
        lower_priority()
        self.config = SandboxManagerEnvConfig.model_validate(config)
        self.node = node
        self.table = SlotTable()
        self.clocks = SessionClocks(self.config, self.table)

    async def new_slots(self, n: int) -> list[str]:
        """Make ``n`` spare slots; returns their ids."""
        self.clocks.start()
        return self.table.add(n)

    async def drop_slots(self, slots: list[str]) -> int:
        return self.table.drop(slots)

    async def slots(self) -> dict:
        """This host's node and every slot with its session (None: spare): adoption and liveness."""
        return {"node": self.node, "slots": self.table.sessions()}

    async def attach(self, slot: str, session_ctx_id: str, timeout: float, name: str, url: Optional[str],
                     token: Optional[str]) -> None:
        self.table.attach(slot, session_ctx_id, timeout, name, url, token)

    async def detach(self, slot: str, name: str) -> bool:
        return self.table.detach(slot, name)

    async def unbind(self, slot: str) -> None:
        self.table.unbind(slot)

    async def heartbeat(self, slot: str) -> float:
        return self.table.heartbeat(slot)

    async def describe(self, slot: str) -> dict:
        return {**self.table.describe(slot), "slot": slot, "pid": os.getpid()}

    async def stats(self) -> dict:
        return {**self.table.stats(), "node": self.node, "pid": os.getpid(), "tick_errors": self.clocks.errors}
