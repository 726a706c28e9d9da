"""SessionCore: one session's containers and the decision to reap it, in plain Python;
SlotTable: the sessions one process serves.

What a SessionCore owns: the session id, the names (with box URL and token) of
the containers bound to it, the time of the last heartbeat and the idle
timeout. Its process takes heartbeats, and on each tick asks :meth:`due`
whether the session *may* be idle; only then does it ask each box for its
activity (so the tool-call path never touches it) and feeds the answers to
:meth:`decide`.

A :class:`SlotTable` holds the cores of one process: a SessionActor has one
slot, a SessionHost many. A slot is bound to a session (its core) or spare
(None), and is *reaping* from the moment it decides to reap until the registry
unbinds it or the reap fails.

A sandbox with a call still running is never reaped: a box that reports
``running > 0`` counts as a heartbeat now. A box that does not answer does not
keep the session alive (it is gone or hung; reaping it is right).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

__all__ = ["SessionCore", "BoxRef", "KEEP", "REAP", "Slot", "SlotTable", "UnknownSlot"]

KEEP, REAP = "keep", "reap"


@dataclass
class BoxRef:
    name: str
    url: Optional[str]
    token: Optional[str]


@dataclass
class SessionCore:
    """State of one bound session (see the module docstring)."""

    session_ctx_id: str
    timeout: float
    clock: Callable[[], float] = time.time
    boxes: dict[str, BoxRef] = field(default_factory=dict)
    last_heartbeat: float = 0.0

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"heartbeat timeout must be > 0, got {self.timeout}")
        self.last_heartbeat = self.clock()

    def attach(self, name: str, url: Optional[str], token: Optional[str]) -> None:
        self.boxes[name] = BoxRef(name, url, token)
        self.heartbeat()

    def detach(self, name: str) -> bool:
        """Forget a container; True when the session has none left."""
        self.boxes.pop(name, None)
        return not self.boxes

    def heartbeat(self, at: Optional[float] = None) -> float:
        t = self.clock() if at is None else at
        self.last_heartbeat = max(self.last_heartbeat, t)
        return self.last_heartbeat

    def idle_for(self) -> float:
        return self.clock() - self.last_heartbeat

    def due(self) -> bool:
        """True when the actor's own heartbeat says idle: time to ask the boxes."""
        return bool(self.boxes) and self.idle_for() > self.timeout

    def decide(self, activities: dict[str, Optional[dict]]) -> str:
        """Fold in each box's ``{"last_active_at", "running"}`` (None: no answer); KEEP or REAP."""
        for act in activities.values():
            if not act:
                continue
            if act.get("running", 0) > 0:
                self.heartbeat()
            elif act.get("last_active_at"):
                self.heartbeat(float(act["last_active_at"]))
        return REAP if self.due() else KEEP


class UnknownSlot(LookupError):
    """No such slot in this process (dropped, or never made here: the process restarted)."""


@dataclass
class Slot:
    """One session clock of a process: the bound session's core (None: spare), and whether it is reaping."""

    core: Optional[SessionCore] = None
    reaping: bool = False
    sessions_served: int = 0


class SlotTable:
    """Slot id -> :class:`Slot` for one process. Plain Python; ``clock`` is injected.

    Ids carry a prefix of this table's own, so a slot made by a process that
    restarted never answers to an id its predecessor handed out.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.slots: dict[str, Slot] = {}
        self._prefix = uuid.uuid4().hex[:8]
        self._made = 0

    def add(self, n: int) -> list[str]:
        """Make ``n`` spare slots; returns their ids."""
        ids = []
        for _ in range(n):
            self._made += 1
            ids.append(f"{self._prefix}-{self._made}")
        self.slots.update((i, Slot()) for i in ids)
        return ids

    def drop(self, ids: Iterable[str]) -> int:
        """Forget slots (unknown ids are skipped); returns how many went."""
        return sum(self.slots.pop(i, None) is not None for i in ids)

    def get(self, slot: str) -> Slot:
        try:
            return self.slots[slot]
        except KeyError:
            raise UnknownSlot(f"no session slot {slot!r} here") from None

    def attach(self, slot: str, session: str, timeout: float, name: str, url: Optional[str],
               token: Optional[str]) -> None:
        """Bind ``slot`` to ``session`` (if not yet bound to it) and add one container."""
        s = self.get(slot)
        if s.core is None or s.core.session_ctx_id != session:
            s.core = SessionCore(session, timeout, clock=self.clock)
            s.sessions_served += 1
            s.reaping = False
        s.core.attach(name, url, token)

    def detach(self, slot: str, name: str) -> bool:
        s = self.get(slot)
        return s.core.detach(name) if s.core else True

    def unbind(self, slot: str) -> None:
        """Forget the slot's session: the slot is a spare again."""
        s = self.get(slot)
        s.core, s.reaping = None, False

    def heartbeat(self, slot: str) -> float:
        s = self.get(slot)
        return s.core.heartbeat() if s.core else 0.0

    def describe(self, slot: str) -> dict:
        s = self.get(slot)
        c = s.core
        return {"session_ctx_id": c.session_ctx_id if c else None, "containers": sorted(c.boxes) if c else [],
                "last_heartbeat": c.last_heartbeat if c else None, "idle_for": c.idle_for() if c else None,
                "timeout": c.timeout if c else None, "sessions_served": s.sessions_served}

    def sessions(self) -> dict[str, Optional[str]]:
        """Slot id -> its session (None: spare)."""
        return {i: (s.core.session_ctx_id if s.core else None) for i, s in self.slots.items()}

    def due(self) -> list[tuple[str, SessionCore]]:
        """The slots whose own clock says idle and that are not reaping: their boxes are asked next."""
        return [(i, s.core) for i, s in self.slots.items() if s.core is not None and not s.reaping and s.core.due()]

    def decide(self, slot: str, core: SessionCore, activities: dict[str, Optional[dict]]) -> bool:
        """Fold the boxes' answers into ``core``; True when the session is to be reaped now (the
        slot is then reaping). False as well when the slot was dropped, unbound or rebound while
        its boxes were asked."""
        s = self.slots.get(slot)
        if s is None or s.core is not core or s.reaping:
            return False
        if core.decide(activities) != REAP:
            return False
        s.reaping = True
        return True

    def reap_failed(self, slot: str, core: SessionCore) -> None:
        """The registry did not take the reap: the next tick decides again."""
        s = self.slots.get(slot)
        if s is not None and s.core is core:
            s.reaping = False

    def stats(self) -> dict:
        bound = sum(s.core is not None for s in self.slots.values())
        return {"slots": len(self.slots), "bound": bound, "spare": len(self.slots) - bound,
                "reaping": sum(s.reaping for s in self.slots.values())}
