"""Typed wrappers over the Ray actor handles the registry commands: every Ray call it makes is here.

:class:`PoolHandle` is one PoolActor (a sandbox type on a node), :class:`SessionHandle` one
session actor, :class:`HostedSessionHandle` one slot of a SessionHost with the same interface
(the registry's session bookkeeping takes either). Each method is a coroutine with the callee's
real arguments, so the registry never spells an operation as a string on ``Any``, and a dead
actor surfaces as one exception, :class:`ActorGone`, whatever Ray raised.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import ray

from corral.core.session import UnknownSlot

__all__ = ["PoolHandle", "SessionHandle", "HostedSessionHandle", "ActorGone", "pool_name", "host_name",
           "SESSION_PREFIX", "HOST_PREFIX", "REGISTRY_NAME"]

REGISTRY_NAME = "corral-registry"
SESSION_PREFIX = "corral-session-"
HOST_PREFIX = "corral-hosts-"  # SessionHosts; not under SESSION_PREFIX, which names session actors


def pool_name(sandbox_type: str, node: str) -> str:
    """The PoolActor of a type on a node (the first 12 hex digits of a node id are unique in practice)."""
    return f"corral-pool-{sandbox_type}-{node[:12]}"


def host_name(node: str) -> str:
    """The SessionHost of a node."""
    return f"{HOST_PREFIX}{node[:12]}"


class ActorGone(Exception):
    """The actor died (or its node did) before it answered."""


async def _call(ref: Any, timeout: Optional[float] = None) -> Any:
    try:
        if timeout is None:
            return await ref
        return await asyncio.wait_for(ref, timeout)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, UnknownSlot) as e:
        # UnknownSlot: a SessionHost without that slot (it restarted): to its caller a dead actor
        raise ActorGone(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


class PoolHandle:
    """One PoolActor: driver work for ``sandbox_type`` on ``node``."""

    def __init__(self, handle: Any, sandbox_type: str, node: str) -> None:
        self.handle, self.sandbox_type, self.node = handle, sandbox_type, node

    @classmethod
    def create(cls, config: dict, sandbox_type: str, node: str, owner: str, namespace: str,
               address: str) -> "PoolHandle":
        """Get or start the pool of ``sandbox_type`` pinned to ``node`` (a GCS call: not on an event loop)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .pool_actor import PoolActor

        h = ray.remote(PoolActor).options(
            name=pool_name(sandbox_type, node), namespace=namespace, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=0, num_cpus=0, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(config, sandbox_type, node, owner, address)
        return cls(h, sandbox_type, node)

    async def start(self, items: list[dict]) -> list[dict]:
        return await _call(self.handle.start.remote(items))

    async def in_flight(self) -> list[str]:
        return await _call(self.handle.in_flight.remote(), 30)

    async def collect(self, names: list[str]) -> list[dict]:
        return await _call(self.handle.collect.remote(names))

    async def reset(self, items: list[dict]) -> list[dict]:
        return await _call(self.handle.reset.remote(items))

    async def teardown(self, items: list[dict]) -> list[dict]:
        return await _call(self.handle.teardown.remote(items))

    async def remove(self, container_ids: list[str]) -> int:
        return await _call(self.handle.remove.remote(container_ids))

    async def list(self) -> list[dict]:
        return await _call(self.handle.list.remote(), 60)

    async def probe(self, records: list[dict]) -> dict[str, bool]:
        return await _call(self.handle.probe.remote(records), 30)

    async def watch(self, timeout: float) -> list[str]:
        return await _call(self.handle.watch.remote(timeout), timeout + 30)

    async def container_op(self, op: str, container_id: Optional[str], token: Optional[str]) -> dict:
        return await _call(self.handle.container_op.remote(op, container_id, token))

    async def reconcile_network(self) -> int:
        return await _call(self.handle.reconcile_network.remote(), 60)

    async def teardown_node(self) -> dict:
        return await _call(self.handle.teardown_node.remote(), 60)

    async def stats(self) -> dict:
        return await _call(self.handle.stats.remote(), 5)


class SessionHandle:
    """One session actor: a session's heartbeat clock."""

    def __init__(self, handle: Any, name: str = "") -> None:
        self.handle, self.name = handle, name

    @classmethod
    def create(cls, config: dict, namespace: str, name: str) -> "SessionHandle":
        """Start a spare session actor (a GCS call: not on an event loop)."""
        from .session_actor import SessionActor

        h = ray.remote(SessionActor).options(
            name=name, namespace=namespace, lifetime="detached", num_cpus=0, max_restarts=0, max_concurrency=100,
        ).remote(config)
        return cls(h, name)

    def attach(self, session: str, timeout: float, name: str, url: Optional[str], token: Optional[str]) -> Any:
        """Sent in order with this caller's other calls to the actor; the result is awaited apart."""
        return _call(self.handle.attach.remote(session, timeout, name, url, token))

    def detach(self, name: str) -> Any:
        return _call(self.handle.detach.remote(name))

    def unbind(self) -> Any:
        return _call(self.handle.unbind.remote())

    async def heartbeat(self) -> float:
        return await _call(self.handle.heartbeat.remote(), 30)

    async def describe(self, timeout: float = 10.0) -> dict:
        return await _call(self.handle.describe.remote(), timeout)

    def kill(self) -> None:
        """Stop the actor (a GCS call: not on an event loop)."""
        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:
            pass


class HostedSessionHandle:
    """One slot of a SessionHost: a session's heartbeat clock, with :class:`SessionHandle`'s
    interface. ``host`` is the host's Ray handle, ``node`` the node it is pinned to."""

    def __init__(self, host: Any, slot: str, node: str) -> None:
        self.host, self.slot, self.node = host, slot, node
        self.name = f"{host_name(node)}/{slot}"

    @staticmethod
    def create_host(config: dict, namespace: str, node: str) -> Any:
        """Get or start the SessionHost of ``node`` (a GCS call: not on an event loop)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .session_host import SessionHost

        return ray.remote(SessionHost).options(
            name=host_name(node), namespace=namespace, lifetime="detached", get_if_exists=True, max_restarts=-1,
            max_task_retries=0, num_cpus=0, max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        ).remote(config, node)

    @classmethod
    async def new(cls, host: Any, node: str, n: int) -> list["HostedSessionHandle"]:
        """``n`` new spare slots on ``host``."""
        return [cls(host, s, node) for s in await _call(host.new_slots.remote(n), 120)]

    @classmethod
    async def all_of(cls, host: Any) -> list[tuple["HostedSessionHandle", Optional[str]]]:
        """Every slot of ``host``, each with its session (None: spare)."""
        got = await _call(host.slots.remote(), 30)
        return [(cls(host, s, got["node"]), session) for s, session in got["slots"].items()]

    @staticmethod
    async def live_slots(host: Any) -> set[str]:
        """The slots ``host`` has (ActorGone: none, it is dead)."""
        return set((await _call(host.slots.remote(), 30))["slots"])

    @staticmethod
    def drop(host: Any, slots: list[str]) -> Any:
        return _call(host.drop_slots.remote(slots), 30)

    def attach(self, session: str, timeout: float, name: str, url: Optional[str], token: Optional[str]) -> Any:
        """Sent in order with this caller's other calls to the host; the result is awaited apart."""
        return _call(self.host.attach.remote(self.slot, session, timeout, name, url, token))

    def detach(self, name: str) -> Any:
        return _call(self.host.detach.remote(self.slot, name))

    def unbind(self) -> Any:
        return _call(self.host.unbind.remote(self.slot))

    async def heartbeat(self) -> float:
        return await _call(self.host.heartbeat.remote(self.slot), 30)

    async def describe(self, timeout: float = 10.0) -> dict:
        return await _call(self.host.describe.remote(self.slot), timeout)

    def kill(self) -> None:
        """Drop the slot (the host stays; the call is not awaited)."""
        try:
            self.host.drop_slots.remote([self.slot])
        except Exception:
            pass
