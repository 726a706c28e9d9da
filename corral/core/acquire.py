"""AcquireCore: who gets a sandbox, who waits for one, and what a caller who waited too long is told.

What it owns: the decisions over the registry core's wait lines
(:class:`~corral.core.lines.WaitLines`): whether a request is valid (a
non-empty list, a node that runs sandboxes), which warm sandbox an acquire
takes (:meth:`acquire`), which waiter gets a sandbox that turned warm
(:meth:`hand_off`), which cold start gets a freed instance slot and on which
node (:meth:`admit`), which reserves are satisfied (:meth:`ready`), and the
message of a wait that timed out. The records, their transitions and the lines
themselves are the :class:`~corral.core.registry.RegistryCore`'s; this class
keeps no state of its own.

A new request never overtakes a waiter: while a type has waiters, an acquire of
that type joins the end of the line even when a sandbox just turned warm.

No Ray, no I/O: the RegistryActor allocates waiter ids and futures
(:class:`~actors.waiting.Waiters`) and resolves them with what this decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from corral.errors import InvalidRequest
from corral.models import ContainerModel, ContainerState

from .lines import ReadyWaiter, SlotWaiter, WarmWaiter
from .placement import NodeView, node_pref, place

if TYPE_CHECKING:
    from .registry import RegistryCore

__all__ = ["AcquireCore"]


class AcquireCore:
    """The acquire decisions of one :class:`~corral.core.registry.RegistryCore`, over its records
    and wait lines (see the module docstring)."""

    def __init__(self, core: "RegistryCore") -> None:
        self.core = core
        self.lines = core.lines

    # -- validation ------------------------------------------------------------

    def check_node(self, node: Optional[str], nodes: Iterable[str]) -> None:
        """``node`` (None, "any", "local:<id>" or a node id) names a node that runs sandboxes, and
        some node does."""
        known = set(nodes)
        if not known:
            res = self.core.config.node_resource
            raise InvalidRequest("no node of this Ray cluster can run sandboxes of this namespace"
                                 + (f" (none has the resource {res!r})" if res else ""))
        if node and node != "any" and not node.startswith("local:") and node not in known:
            raise InvalidRequest(f"no node {node!r} runs sandboxes of this namespace; known: "
                                 f"{sorted(n[:12] for n in known)}")

    def check_requests(self, requests: object, nodes: Iterable[str]) -> None:
        """An acquire's requests: a non-empty list of dicts whose ``node`` is known."""
        if not isinstance(requests, list) or not requests:
            raise InvalidRequest("requests must be a non-empty list")
        known = set(nodes)
        for req in requests:
            self.check_node(req.get("node"), known)

    # -- warm sandboxes ------------------------------------------------------------

    def acquire(self, sandbox_type: str, requests: list[dict]) -> list[Optional[ContainerModel]]:
        """Claim a warm sandbox for each request (``{"session_ctx_id", "meta", "node"}``) while
        nobody waits for one of the type; None for those that must wait (or give up)."""
        core = self.core
        out: list[Optional[ContainerModel]] = []
        for req in requests:
            rec = None
            if not self.lines.warm_waiting(sandbox_type):
                node, strict = node_pref(req.get("node"))
                name = core.next_warm(sandbox_type, node, strict)
                if name is not None:
                    rec = core.claim(name, req.get("session_ctx_id"), req.get("meta"))
            out.append(rec)
        return out

    def wait_warm(self, wid: int, sandbox_type: str, req: dict) -> None:
        self.lines.wait_warm(WarmWaiter(wid, sandbox_type, req.get("session_ctx_id"), req.get("meta"),
                                        req.get("node")))

    def hand_off(self, sandbox_type: str) -> list[tuple[int, ContainerModel]]:
        """Warm sandboxes of the type go to its waiters, longest first; a waiter pinned to a node
        with none warm there keeps its place while later waiters are served."""
        core = self.core
        out = []
        line = self.lines.warm.get(sandbox_type)
        if not line or not core.warm_count(sandbox_type):
            return out
        for waiter in list(line.values()):
            if not core.warm_count(sandbox_type):
                break
            node, strict = node_pref(waiter.node)
            name = core.next_warm(sandbox_type, node, strict)
            if name is None:
                continue
            del line[waiter.wid]
            out.append((waiter.wid, core.claim(name, waiter.session, waiter.meta)))
        return out

    # -- instance slots ------------------------------------------------------------

    def wait_slot(self, wid: int, request: dict) -> None:
        """A cold start (``request``: the keyword arguments of ``RegistryCore.reserve`` and
        ``prefer``, a node to start on while it has room) waits for a slot."""
        self.lines.wait_slot(SlotWaiter(wid, request))

    def admit(self, nodes: list[NodeView]) -> list[tuple[int, ContainerModel]]:
        """Slot waiters get STARTING records while there is capacity, first come first, each on
        the node its request names (``prefer``: that node while it has room, else any)."""
        core = self.core
        views = {v.node_id: v for v in nodes}
        out = []
        while self.lines.slots and core.has_capacity():
            waiter = self.lines.head_slot()
            req = dict(waiter.request)
            t = req.pop("sandbox_type")
            prefer = req.pop("prefer", None)
            chosen = place(1, views.values(), prefer=prefer)
            if not chosen:
                break  # every node is full or busy starting: the line waits for the next tick
            self.lines.pop_slot()
            rec = core.reserve(t, node=chosen[0], **req)
            views[chosen[0]].active += 1
            views[chosen[0]].starting += 1
            out.append((waiter.wid, rec))
        return out

    # -- reserves ------------------------------------------------------------------

    def wait_ready(self, wid: int, sandbox_type: str, want: int) -> None:
        """A reserve waits until ``want`` sandboxes of the type are warm (or the type's target,
        when acquires have used part of the reservation up meanwhile)."""
        self.lines.wait_ready(ReadyWaiter(wid, sandbox_type, want))

    def ready(self) -> list[int]:
        """The reserves whose type is warm enough now (taken out of the line)."""
        core = self.core
        done = [w.wid for w in self.lines.ready.values()
                if core.warm_count(w.sandbox_type) >= min(w.want, core.pool(w.sandbox_type).target)]
        for wid in done:
            del self.lines.ready[wid]
        return done

    # -- what a caller who waited too long is told ---------------------------------

    def last_failure(self, sandbox_type: str) -> str:
        pool = self.core.pool(sandbox_type)
        if not pool.failures or not pool.last_error:
            return ""
        return f"; its last {pool.failures} starts failed, the last with: {pool.last_error[:500]}"

    def warm_timeout(self, sandbox_type: str, timeout: float) -> str:
        core, t = self.core, sandbox_type
        return (f"no warm {t!r} sandbox within {timeout:.0f}s (warm={core.warm_count(t)}, "
                f"starting={core.count(t, ContainerState.STARTING)}, waiting={self.lines.warm_waiting(t)})"
                + self.last_failure(t))

    def slot_timeout(self, timeout: float, nodes: list[NodeView]) -> str:
        core = self.core
        return (f"no sandbox slot within {timeout:.0f}s: {core.counted} active of "
                f"max_sandbox_instances={core.limit or 'unlimited'}, nodes: "
                + ", ".join(f"{v.node_id[:12]} {v.active}/{v.capacity}" for v in nodes))

    def ready_timeout(self, sandbox_type: str, want: int, timeout: float) -> str:
        return (f"pool {sandbox_type!r}: {self.core.warm_count(sandbox_type)} of {want} warm after "
                f"{timeout:.0f}s" + self.last_failure(sandbox_type))
