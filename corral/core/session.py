"""SessionCore: one session's containers and the decision to reap it, in plain Python.

What it owns: the session id, the names (with box URL and token) of the
containers bound to it, the time of the last heartbeat and the idle timeout.
The SessionActor wraps it: it takes heartbeats, and on each tick asks
:meth:`due` whether the session *may* be idle; only then does it ask each box
for its activity (so the tool-call path never touches the actor) and feeds the
answers to :meth:`decide`.

A sandbox with a call still running is never reaped: a box that reports
``running > 0`` counts as a heartbeat now. A box that does not answer does not
keep the session alive (it is gone or hung; reaping it is right).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["SessionCore", "BoxRef", "KEEP", "REAP"]

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
