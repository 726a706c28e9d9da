"""SessionShell: carries out :class:`~corral.core.spares.SessionActors`' decisions with Ray.

What it owns: the policy core and the Ray side of it: starting spare session
actors off the event loop, sending attach / detach / unbind in the order the
registry decided them (one sender: Ray runs one caller's calls to an actor in
order, so an unbind never overtakes the attach before it), noticing actors
that died and giving their sessions new ones. The registry tells it of claims
and ends; which records exist it learns through ``lookup``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

import ray
import shortuuid

from corral.core.registry import RegistryCore
from corral.core.spares import Attach, Detach, Kill, SessionActors, Spawn, Unbind
from corral.models import ContainerModel, ContainerState, SandboxManagerEnvConfig

from .common import fire
from .handles import SESSION_PREFIX, ActorGone, SessionHandle

__all__ = ["SessionShell"]

logger = logging.getLogger("corral.registry")


class SessionShell:
    """See the module docstring."""

    def __init__(self, config: SandboxManagerEnvConfig, clock: Callable[[], float], records: RegistryCore) -> None:
        self.config = config
        self.core = SessionActors(config.spare_sessions, clock)
        self.records = records
        self._raw = config.model_dump(mode="json")

    def _lookup(self, name: str) -> Optional[ContainerModel]:
        return self.records.records.get(name)

    def _running_names(self, session: Optional[str]) -> list[str]:
        """The session's containers that are RUNNING (what its actor watches)."""
        return [n for n in (self.records.session_names(session) if session else [])
                if (r := self._lookup(n)) is not None and r.state == ContainerState.RUNNING]

    # -- from the registry --------------------------------------------------------

    def claimed(self, recs: list[ContainerModel]) -> list:
        """Containers were bound to sessions: give each session an actor; returns the messages to
        send later (in the outbox), one attach per container."""
        out = []
        for rec in recs:
            if rec.session_ctx_id:
                self.core.claim(rec.session_ctx_id)
                out.append(("attach", rec.session_ctx_id, rec.container_name))
        return out

    def ended(self, session: Optional[str], name: str) -> list:
        """Container ``name`` left ``session``: the messages that says to its actor."""
        empty = not self._running_names(session)
        return [("session", a) for a in self.core.end(session, name, session_empty=empty)]

    def send(self, msg: tuple) -> None:
        """Send one outbox message (called by the outbox task, in order)."""
        if msg[0] == "attach":
            _, session, name = msg
            rec = self._lookup(name)
            still = rec is not None and rec.state == ContainerState.RUNNING and rec.session_ctx_id == session
            act = self.core.attach(session, name, still)
            if act is not None:
                self._do(act, rec)
        else:
            self._do(msg[1])

    def _do(self, act: Any, rec: Optional[ContainerModel] = None) -> None:
        if isinstance(act, Attach):
            h: SessionHandle = act.actor
            ref = h.attach(act.session, self.config.timeout_for(rec.sandbox_type), rec.container_name, rec.url,
                           rec.runtime_token)
            fire(self._confirm(ref, h), f"attach {rec.container_name}")
        elif isinstance(act, Detach):
            fire(act.actor.detach(act.name), "session detach")
        elif isinstance(act, Unbind):
            fire(act.actor.unbind(), "session unbind")
        elif isinstance(act, Spawn):
            for _ in range(act.n):
                fire(self._spawn(), "start a session actor")
        elif isinstance(act, Kill):
            fire(asyncio.to_thread(lambda: [a.kill() for a in act.actors]), "stop spare session actors")

    async def _confirm(self, ref: Any, h: SessionHandle) -> None:
        try:
            await ref
        except ActorGone:
            self._lost(h)

    def _lost(self, h: SessionHandle) -> None:
        """A dead actor: its session is promised a new one (spawned by the next tick)."""
        session = self.core.lost(h)
        if session:
            logger.warning("the session actor of %s is gone; giving the session a new one", session)

    async def _spawn(self) -> None:
        name = SESSION_PREFIX + shortuuid.uuid()[:12].lower()
        h = None
        try:
            # creating a named actor waits on the GCS: never on the event loop every claim shares
            h = await asyncio.to_thread(SessionHandle.create, self._raw, self.config.namespace, name)
            await h.describe(timeout=120)  # answers once the process is up
        except BaseException:
            self.core.spawn_failed()
            if h is not None:
                await asyncio.to_thread(h.kill)
            raise
        session = self.core.created(h)
        if session:
            self._attach_all(session)

    def _attach_all(self, session: str) -> None:
        for name in self._running_names(session):
            self.send(("attach", session, name))

    # -- ticks -----------------------------------------------------------------

    def tick(self) -> None:
        for act in self.core.tick():
            self._do(act)

    async def check(self) -> None:
        """Every bound actor answers (reconciliation: actors die too); sessions with RUNNING
        containers whose actor is unknown are promised one."""
        for session, h in list(self.core.bound.items()):
            try:
                await h.describe()
            except (ActorGone, asyncio.TimeoutError):
                self._lost(h)
        for session in self._sessions_without_actor():
            self.core.claim(session)

    def _sessions_without_actor(self) -> list[str]:
        out = []
        for rec in self.records.by_state(ContainerState.RUNNING):
            s = rec.session_ctx_id
            if s and s not in self.core.bound and s not in self.core.pending and s not in out:
                out.append(s)
        return out

    async def adopt(self, namespace: str) -> None:
        """After a restart: find the session actors by name; bound ones serve their sessions again."""
        try:  # GCS calls: in a thread, never on the event loop
            named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        except Exception:  # the GCS may be briefly unavailable right after a restart
            named = []
        for entry in named:
            if entry.get("namespace") != namespace or not entry.get("name", "").startswith(SESSION_PREFIX):
                continue
            try:
                raw = await asyncio.to_thread(ray.get_actor, entry["name"], namespace=namespace)
                h = SessionHandle(raw, entry["name"])
                desc = await h.describe()
            except Exception:
                continue
            session = desc.get("session_ctx_id")
            names = self._running_names(session)
            if session and not names:
                fire(h.unbind(), "session unbind")
            self.core.adopt(h, session, names)

    async def heartbeat(self, session: str) -> bool:
        if session in self.core.pending:
            return True  # its actor is being made; its clock starts with the first attach
        h = self.core.bound.get(session)
        if h is None:
            return False
        try:
            await h.heartbeat()
        except ActorGone:
            self._lost(h)
        return True

    async def stop_all(self) -> int:
        actors = self.core.take_all()
        await asyncio.to_thread(lambda: [a.kill() for a in actors])
        return len(actors)

    def stats(self) -> dict:
        return self.core.stats()
