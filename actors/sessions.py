"""SessionShell: carries out :class:`~corral.core.spares.SessionActors`' decisions with Ray.

What it owns: the policy core and the Ray side of it: making spare session
clocks off the event loop, sending attach / detach / unbind in the order the
registry decided them (one sender: Ray runs one caller's calls to an actor in
order, so an unbind never overtakes the attach before it), noticing clocks
that died and giving their sessions new ones. The registry tells it of claims
and ends; which records exist it learns through ``lookup``.

A session's clock is a SessionActor of its own (``session_mode="actor"``) or
a slot of the SessionHost of a node (``"hosted"``: :class:`SessionHandle` and
:class:`HostedSessionHandle` have one interface, so the core tells them
apart nowhere). Only making them differs: an actor is a process (a few at
once), slots come by the hundred in one call to the least-loaded host among
the nodes that run sandboxes (the registry's node while there is none).
Adoption, liveness checks and stopping take both kinds whatever the mode.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any, Callable, Optional

import ray
import shortuuid

from corral.core.registry import RegistryCore
from corral.core.spares import Attach, Detach, Kill, SessionActors, Spawn, Unbind, least_loaded
from corral.models import ContainerModel, ContainerState, SandboxManagerEnvConfig

from .common import fire
from .handles import HOST_PREFIX, SESSION_PREFIX, ActorGone, HostedSessionHandle, SessionHandle

__all__ = ["SessionShell", "HOSTED_SPARES", "HOSTED_BATCH"]

logger = logging.getLogger("corral.registry")

HOSTED_SPARES = 64  # spare slots kept in hosted mode (at least; spare_sessions when larger)
HOSTED_BATCH = 1024  # slots being made at once in hosted mode


async def _named(namespace: str, *prefixes: str) -> list[str]:
    """Names of this namespace's actors that start with one of ``prefixes`` (a GCS call, in a
    thread; none while the GCS is briefly unavailable right after a restart)."""
    try:
        named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
    except Exception:
        return []
    return [e["name"] for e in named if e.get("namespace") == namespace and e.get("name", "").startswith(prefixes)]


def _stop(clocks: list) -> None:
    """Stop session actors and drop slots (one call per host); blocking GCS calls: in a thread."""
    hosts: dict[str, tuple[Any, list[str]]] = {}
    for c in clocks:
        if isinstance(c, HostedSessionHandle):
            hosts.setdefault(c.node, (c.host, []))[1].append(c.slot)
        else:
            c.kill()
    for host, slots in hosts.values():
        host.drop_slots.remote(slots)


async def _dead(clocks: list) -> list:
    """The clocks that no longer answer: actors asked one by one, slots one call per host."""
    out, hosts = [], {}
    for c in clocks:
        if isinstance(c, HostedSessionHandle):
            hosts.setdefault(c.node, []).append(c)
            continue
        try:
            await c.describe()
        except (ActorGone, asyncio.TimeoutError):
            out.append(c)
    for hs in hosts.values():
        try:
            live = await HostedSessionHandle.live_slots(hs[0].host)
        except (ActorGone, asyncio.TimeoutError):
            live = set()
        out += [h for h in hs if h.slot not in live]
    return out


class SessionShell:
    """See the module docstring."""

    def __init__(self, config: SandboxManagerEnvConfig, clock: Callable[[], float], records: RegistryCore,
                 nodes: Any = None) -> None:
        self.config = config
        self.hosted = config.session_mode == "hosted"
        if self.hosted:
            self.core = SessionActors(max(config.spare_sessions, HOSTED_SPARES), clock, max_spawning=HOSTED_BATCH,
                                      quiet=0.0)
        else:
            self.core = SessionActors(config.spare_sessions, clock)
        self.records = records
        self.nodes = nodes  # the NodeSet: which nodes run sandboxes (hosted mode puts its hosts there)
        self._hosts: dict[str, Any] = {}  # node -> its SessionHost's Ray handle
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
            for n in ([act.n] if self.hosted else [1] * act.n):
                fire(self._spawn(n), "make session clocks")
        elif isinstance(act, Kill):
            fire(asyncio.to_thread(_stop, act.actors), "stop spare session clocks")

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

    async def _spawn(self, n: int) -> None:
        try:
            made = await (self._make_slots(n) if self.hosted else self._make_actor())
        except BaseException:
            for _ in range(n):
                self.core.spawn_failed()
            raise
        for h in made:
            session = self.core.created(h)
            if session:
                self._attach_all(session)

    async def _make_actor(self) -> list[SessionHandle]:
        name = SESSION_PREFIX + shortuuid.uuid()[:12].lower()
        h = None
        try:
            # creating a named actor waits on the GCS: never on the event loop every claim shares
            h = await asyncio.to_thread(SessionHandle.create, self._raw, self.config.namespace, name)
            await h.describe(timeout=120)  # answers once the process is up
        except BaseException:
            if h is not None:
                await asyncio.to_thread(h.kill)
            raise
        return [h]

    async def _make_slots(self, n: int) -> list[HostedSessionHandle]:
        """``n`` slots on the host of the node with the fewest slots (started on demand)."""
        load = Counter(h.node for h in [*self.core.bound.values(), *self.core.spares]
                       if isinstance(h, HostedSessionHandle))
        eligible = list(self.nodes.nodes) if self.nodes is not None else []
        node = least_loaded(eligible, load, ray.get_runtime_context().get_node_id())
        host = self._hosts.get(node)
        if host is None:
            host = self._hosts[node] = await asyncio.to_thread(
                HostedSessionHandle.create_host, self._raw, self.config.namespace, node)
        try:
            return await HostedSessionHandle.new(host, node, n)
        except (ActorGone, asyncio.TimeoutError):
            self._hosts.pop(node, None)  # a dead host: the next batch looks it up (or starts it) again
            raise

    def _attach_all(self, session: str) -> None:
        for name in self._running_names(session):
            self.send(("attach", session, name))

    # -- ticks -----------------------------------------------------------------

    def tick(self) -> None:
        for act in self.core.tick():
            self._do(act)

    async def check(self) -> None:
        """Every clock answers (reconciliation: actors and hosts die too); sessions with RUNNING
        containers whose clock is unknown are promised one."""
        for h in await _dead([*self.core.bound.values(), *self.core.spares]):
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
        """After a restart: find the session actors and hosts by name; clocks bound to a session
        with containers serve it again, the others are spares."""
        for name in await _named(namespace, SESSION_PREFIX, HOST_PREFIX):
            try:
                raw = await asyncio.to_thread(ray.get_actor, name, namespace=namespace)
                if name.startswith(HOST_PREFIX):
                    found = await HostedSessionHandle.all_of(raw)
                else:
                    h = SessionHandle(raw, name)
                    found = [(h, (await h.describe()).get("session_ctx_id"))]
            except Exception:
                continue
            for h, session in found:
                if isinstance(h, HostedSessionHandle):
                    self._hosts.setdefault(h.node, h.host)
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
        """Stop every session actor and every host (``corral down``); returns how many actors."""
        clocks = self.core.take_all()
        await asyncio.to_thread(_stop, clocks)
        hosts = await _named(self.config.namespace, HOST_PREFIX)

        def kill_hosts() -> None:
            for name in hosts:
                try:
                    ray.kill(ray.get_actor(name, namespace=self.config.namespace), no_restart=True)
                except ValueError:
                    pass

        await asyncio.to_thread(kill_hosts)
        self._hosts.clear()
        return sum(not isinstance(c, HostedSessionHandle) for c in clocks) + len(hosts)

    async def describe_hosts(self) -> list[dict]:
        """Each SessionHost of the namespace: its node, slots (bound, spare, reaping) and pid."""
        out = []
        for name in await _named(self.config.namespace, HOST_PREFIX):
            try:
                raw = await asyncio.to_thread(ray.get_actor, name, namespace=self.config.namespace)
                out.append({"name": name, **await asyncio.wait_for(raw.stats.remote(), 5)})
            except Exception as e:
                out.append({"name": name, "error": f"{type(e).__name__}: {e}"[:200]})
        return out

    def stats(self) -> dict:
        return {**self.core.stats(), "mode": self.config.session_mode}
