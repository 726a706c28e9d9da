"""WaitLines: who waits for a sandbox, in arrival order. Plain Python, no Ray, no I/O.

What it owns: the acquirers waiting for a warm sandbox of each type, the
callers waiting for an instance slot (a cold create or a restore at
``max_sandbox_instances``), and the reserves waiting until enough of a type
are warm. Each waiter is known by an id the shell chose; the
shell keeps its own futures keyed by that id and resolves them with what
:class:`~corral.core.acquire.AcquireCore` decides (``hand_off``, ``admit``, ``ready``).

A new request never overtakes a waiter: while a type has waiters, an acquire
of that type joins the end of the line even when a sandbox just turned warm.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["WaitLines", "WarmWaiter", "SlotWaiter", "ReadyWaiter"]


@dataclass
class WarmWaiter:
    """An acquire waiting for a warm sandbox of ``sandbox_type``."""

    wid: int
    sandbox_type: str
    session: Optional[str]
    meta: Optional[dict]
    node: Optional[str] = None  # "any", "local" resolved to a node id, or a node id


@dataclass
class SlotWaiter:
    """A cold start (a create with a mount dir, a restore) waiting for an instance slot."""

    wid: int
    request: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadyWaiter:
    """A reserve waiting until ``want`` sandboxes of ``sandbox_type`` are warm."""

    wid: int
    sandbox_type: str
    want: int


class WaitLines:
    """The FIFO lines (see the module docstring). Every operation is O(1) but ``cancel``
    of a waiter that is not at the head, which is O(1) too thanks to the ordered dicts."""

    def __init__(self) -> None:
        self.warm: dict[str, OrderedDict[int, WarmWaiter]] = {}
        self.slots: OrderedDict[int, SlotWaiter] = OrderedDict()
        self.ready: dict[int, ReadyWaiter] = {}

    # -- warm -------------------------------------------------------------------

    def wait_warm(self, waiter: WarmWaiter) -> None:
        self.warm.setdefault(waiter.sandbox_type, OrderedDict())[waiter.wid] = waiter

    def warm_waiting(self, sandbox_type: str) -> int:
        return len(self.warm.get(sandbox_type, ()))

    def head_warm(self, sandbox_type: str) -> Optional[WarmWaiter]:
        line = self.warm.get(sandbox_type)
        return next(iter(line.values())) if line else None

    def pop_warm(self, sandbox_type: str) -> Optional[WarmWaiter]:
        line = self.warm.get(sandbox_type)
        if not line:
            return None
        return line.popitem(last=False)[1]

    # -- slots ------------------------------------------------------------------

    def wait_slot(self, waiter: SlotWaiter) -> None:
        self.slots[waiter.wid] = waiter

    def head_slot(self) -> Optional[SlotWaiter]:
        return next(iter(self.slots.values()), None)

    def pop_slot(self) -> Optional[SlotWaiter]:
        return self.slots.popitem(last=False)[1] if self.slots else None

    # -- reserves ---------------------------------------------------------------

    def wait_ready(self, waiter: ReadyWaiter) -> None:
        self.ready[waiter.wid] = waiter

    # -- all lines ----------------------------------------------------------------

    def cancel(self, wid: int) -> bool:
        """Take a waiter out of whichever line it is in (its wait timed out); False if gone."""
        if self.slots.pop(wid, None) is not None or self.ready.pop(wid, None) is not None:
            return True
        for line in self.warm.values():
            if line.pop(wid, None) is not None:
                return True
        return False

    def counts(self) -> dict:
        return {"warm": {t: len(line) for t, line in self.warm.items() if line}, "slots": len(self.slots)}

    def drain(self) -> list[int]:
        """Every waiter's id, lines emptied (the namespace is shutting down)."""
        ids = list(self.slots) + list(self.ready)
        self.slots.clear()
        self.ready.clear()
        for line in self.warm.values():
            ids.extend(line)
            line.clear()
        return ids
