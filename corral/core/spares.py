"""SessionActors: which session actor serves which session, and the spares. Plain Python.

What it owns: the actor bound to each session, the spare actors (started and
idle, so an acquire never waits for a process), the sessions promised an actor
that does not exist yet (no spare was left), which containers their actor has
been told about, and the policy that tops the spares up or trims them. Actors
are opaque objects here (Ray handles in the shell); every method returns what
the shell must do as data: :class:`Attach`, :class:`Detach`, :class:`Unbind`,
:class:`Spawn`, :class:`Kill`.

Why the care about "told": a claim is answered before its session actor hears
of it (the actor is a separate process and a message costs the registry ~1 ms),
and a rollout episode may release its sandbox before that message goes out.
Such a session then costs its actor no message at all.

Spares are topped up only after ``quiet`` seconds (:data:`QUIET`) without a
claim or a release: in a rollout loop each release gives its actor back, and a
new actor (about a second of CPU) started mid-loop would only slow the loop. A
surplus of spares lasting :data:`TRIM_AFTER` seconds is stopped. At most
``max_spawning`` actors are being made at once (:data:`MAX_SPAWNING`: each is
a process). In hosted mode an "actor" is a slot of a SessionHost, a dict entry:
the shell then asks for a large spare target, no quiet time and big batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

__all__ = ["SessionActors", "Attach", "Detach", "Unbind", "Spawn", "Kill", "QUIET", "TRIM_AFTER", "MAX_SPAWNING",
           "least_loaded"]

QUIET = 10.0
TRIM_AFTER = 60.0
MAX_SPAWNING = 4  # actors being started at once: each is a process that takes ~1 s of CPU


@dataclass
class Attach:
    actor: Any
    session: str
    name: str


@dataclass
class Detach:
    actor: Any
    name: str


@dataclass
class Unbind:
    actor: Any


@dataclass
class Spawn:
    n: int


@dataclass
class Kill:
    actors: list


Action = Union[Attach, Detach, Unbind, Spawn, Kill]


class SessionActors:
    """See the module docstring. ``clock`` is injected (tests drive time)."""

    def __init__(self, spare_target: int, clock: Callable[[], float], max_spawning: int = MAX_SPAWNING,
                 quiet: float = QUIET) -> None:
        self.spare_target = spare_target
        self.clock = clock
        self.max_spawning = max_spawning
        self.quiet = quiet
        self.bound: dict[str, Any] = {}
        self.spares: list[Any] = []
        self.pending: dict[str, None] = {}  # sessions waiting for an actor to be created
        self.told: dict[str, str] = {}  # container name -> session whose actor knows it
        self.spawning = 0
        self.last_turnover = -1e18
        self._surplus_since: Optional[float] = None

    # -- sessions ---------------------------------------------------------------

    def claim(self, session: str) -> None:
        """A container was bound to ``session``: give the session an actor now (a spare when
        there is one, else a promise the next created actor fills)."""
        self.last_turnover = self.clock()
        if session in self.bound or session in self.pending:
            return
        if self.spares:
            self.bound[session] = self.spares.pop()
        else:
            self.pending[session] = None

    def attach(self, session: str, name: str, still_bound: bool) -> Optional[Attach]:
        """The shell is about to tell the session's actor of container ``name``. None: nothing to
        send (released meanwhile, or the session still waits for its actor)."""
        actor = self.bound.get(session)
        if not still_bound or actor is None:
            return None
        self.told[name] = session
        return Attach(actor, session, name)

    def end(self, session: Optional[str], name: str, session_empty: bool) -> list[Action]:
        """Container ``name`` left ``session`` (released, reaped or replaced)."""
        self.last_turnover = self.clock()
        told = self.told.pop(name, None) is not None
        if not session:
            return []
        if not session_empty:
            actor = self.bound.get(session)
            return [Detach(actor, name)] if told and actor is not None else []
        self.pending.pop(session, None)
        actor = self.bound.pop(session, None)
        if actor is None:
            return []
        self.spares.append(actor)
        # a later attach to this actor cannot overtake the unbind: one sender, calls in order
        was_told = told or any(s == session for s in self.told.values())
        for n in [n for n, s in self.told.items() if s == session]:
            del self.told[n]
        return [Unbind(actor)] if was_told else []

    def needs_actor(self) -> list[str]:
        """Sessions promised an actor that has not been created yet."""
        return list(self.pending)

    def created(self, actor: Any) -> Optional[str]:
        """A new actor is up: the longest-promised session gets it (returned), else it is a spare."""
        self.spawning = max(0, self.spawning - 1)
        if self.pending:
            session = next(iter(self.pending))
            del self.pending[session]
            self.bound[session] = actor
            return session
        self.spares.append(actor)
        return None

    def spawn_failed(self) -> None:
        self.spawning = max(0, self.spawning - 1)

    def adopt(self, actor: Any, session: Optional[str], names: list[str]) -> None:
        """An actor found by name after a restart: bound to ``session`` (which knows ``names``)
        when that session still has containers, else a spare."""
        if session and names and session not in self.bound:
            self.bound[session] = actor
            for n in names:
                self.told[n] = session
        else:
            self.spares.append(actor)

    def lost(self, actor: Any) -> Optional[str]:
        """An actor died; returns the session it served (which needs a new one), if any."""
        self.spares = [a for a in self.spares if a is not actor]
        for session, a in list(self.bound.items()):
            if a is actor:
                del self.bound[session]
                for n in [n for n, s in self.told.items() if s == session]:
                    del self.told[n]
                self.pending[session] = None
                return session
        return None

    def take_all(self) -> list[Any]:
        """Every actor, bound or spare, forgotten (the namespace is shutting down)."""
        actors = list(self.bound.values()) + self.spares
        self.bound.clear()
        self.spares.clear()
        self.pending.clear()
        self.told.clear()
        return actors

    # -- policy -----------------------------------------------------------------

    def tick(self) -> list[Action]:
        """Start actors for promised sessions now; top the spares up when sessions have been quiet
        for ``quiet`` seconds; stop a surplus that lasted :data:`TRIM_AFTER` seconds."""
        now = self.clock()
        out: list[Action] = []
        if len(self.spares) <= self.spare_target:
            self._surplus_since = None
        elif self._surplus_since is None:
            self._surplus_since = now
        elif now - self._surplus_since > TRIM_AFTER:
            extra = len(self.spares) - self.spare_target
            out.append(Kill(self.spares[:extra]))
            self.spares = self.spares[extra:]
            self._surplus_since = None
        want = len(self.pending)
        if now - self.last_turnover >= self.quiet:
            want += self.spare_target - len(self.spares)
        want = min(want - self.spawning, self.max_spawning - self.spawning)
        if want > 0:
            self.spawning += want
            out.append(Spawn(want))
        return out

    def stats(self) -> dict:
        return {"bound": len(self.bound), "spares": len(self.spares), "promised": len(self.pending),
                "spawning": self.spawning}


def least_loaded(nodes: list[str], load: dict[str, int], fallback: str) -> str:
    """The node whose SessionHost makes the next slots: of ``nodes`` (those that run sandboxes),
    the one with the fewest slots in ``load`` (ties: the first); ``fallback`` when there are none."""
    return min(nodes, key=lambda n: load.get(n, 0)) if nodes else fallback
