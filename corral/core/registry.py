"""RegistryCore: every sandbox record, every state transition and every decision about them.

What it owns:

- the records (sandbox name -> :class:`ContainerModel`), the session index
  (session -> names), the warm index (per type, the WARM names in the order
  they became warm: what an acquire takes), per type and state counts, and
  per node the sandboxes it holds and the starts in flight there;
- the count of sandboxes in counted states (STARTING, WARM, RUNNING,
  RESETTING) that ``max_sandbox_instances`` caps;
- the wait lines (:class:`~corral.core.lines.WaitLines`): acquirers waiting
  for a warm sandbox, cold starts waiting for a slot, reserves waiting for a
  warm pool (which of them gets what is :class:`~corral.core.acquire.AcquireCore`'s);
- one :class:`~corral.core.pool.PoolCore` per type: targets, back-off,
  shrink and health strikes;
- the sandboxes stopped on request (the reference's ``stop``): not lost when
  their engine reports them stopped.

The RegistryActor wraps this class, runs one call at a time on its event
loop, and carries out what it decides: what to tear down (:class:`Teardown`)
after a release or a reap, what a node's containers mean (:meth:`reconcile`,
:meth:`engine_stopped`, :meth:`node_lost`), how a sandbox is restored
(:meth:`restore_request`), what a new configuration is (:meth:`plan_config`).
Two cores decide over these records and lines beside it:
:class:`~corral.core.acquire.AcquireCore` (who gets a sandbox, who waits) and
:class:`~corral.core.refill.RefillCore` (which sandboxes to start, shrink or
replace, and where). Nothing else writes a record.

No Ray, no Docker, no I/O; the clock is injected. Transitions raise corral
errors (``NotFound``, ``Conflict``) for impossible requests and are idempotent
where a caller may retry them (releasing a released record, recycling a
recycled one, expiring twice).

Vocabulary: a *sandbox* is one container (or process-driver box), named by its
``container_name`` (the record key); its ``session_id`` is the reference's
name for the random suffix of that name. A *session* is the user's
``session_ctx_id``. A *node* is a Ray node id.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import shortuuid

from corral.errors import Conflict, CorralError, InvalidRequest, NotFound
from corral.models import (
    ACTIVE_STATES,
    LABEL_NAME,
    SESSION_ID_ALPHABET,
    ContainerModel,
    ContainerState,
    SandboxManagerEnvConfig,
)

from .lines import WaitLines
from .placement import NodeView
from .pool import PoolCore

__all__ = ["RegistryCore", "Teardown", "ReconcilePlan", "COUNTED_STATES", "SNAPSHOT_VERSION", "AUTO_SESSION_PREFIX"]

S = ContainerState
#: States that hold a slot under ``max_sandbox_instances``. RESETTING is a
#: released sandbox being wiped for reuse: it still occupies its container.
COUNTED_STATES = ACTIVE_STATES
#: States whose records keep their session (RECYCLED and LOST can be restored).
SESSION_STATES = frozenset({S.RUNNING, S.RECYCLED, S.LOST})
SNAPSHOT_VERSION = 1
#: Sessions corral makes for sandboxes created without one, so every sandbox has a clock.
AUTO_SESSION_PREFIX = "auto-"


def _snapshot(rec: ContainerModel) -> ContainerModel:
    """The record as it is now, for a teardown. Shallow, with its own ``meta`` and ``ports``: the
    core assigns new values to those rather than mutating them, so sharing the rest is safe."""
    return rec.model_copy(update={"meta": dict(rec.meta or {}), "ports": list(rec.ports or [])})


@dataclass
class Teardown:
    """What the shell must do with a sandbox after a transition."""

    record: ContainerModel
    action: str  # "destroy" (stop + remove), "reset" (wipe, back to WARM), "recycle" (remove, keep workspace)
    upload: bool = False  # sync the workspace to storage first
    token: Optional[str] = None  # reset: the token the box takes once clean (the old one stops working)


@dataclass
class ReconcilePlan:
    """What one node's containers mean next to the records."""

    adopted: list[str] = field(default_factory=list)  # known records whose container is there
    remove: list[str] = field(default_factory=list)  # container ids to remove (no live record)
    lost: list[str] = field(default_factory=list)  # records whose container vanished


class RegistryCore:
    """The record table, its state machine and its decisions (see the module docstring)."""

    def __init__(
        self,
        config: SandboxManagerEnvConfig,
        clock: Callable[[], float] = time.time,
        registry_id: str = "corral",
        node: str = "",
    ) -> None:
        self.config = config
        self.clock = clock
        self.registry_id = registry_id
        self.node = node  # the node of records that name none (written before nodes were recorded)
        self.addresses: dict[str, str] = {}  # node id -> address, of the nodes known now (set by the shell)
        self.records: dict[str, ContainerModel] = {}
        self.sessions: dict[str, list[str]] = {}
        self.counted = 0
        self.warm: dict[str, OrderedDict[str, None]] = {}  # sandbox_type -> WARM names, oldest first
        self._counts: dict[tuple[str, str], int] = {}  # (sandbox_type, state) -> records
        self._node_active: dict[str, int] = {}  # node -> records in counted states
        self._node_starting: dict[str, int] = {}  # node -> STARTING records
        self.lines = WaitLines()
        self.pools: dict[str, PoolCore] = {
            t: PoolCore(t, config.pool_target(t)) for t in config.sandbox_types
        }
        self.stopped: set[str] = set()  # sandboxes stopped on request: their engine's report is no loss
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._dumps: dict[str, dict] = {}  # name -> the JSON dict written by the last commit
        self._uuid = shortuuid.ShortUUID(alphabet=SESSION_ID_ALPHABET)

    # -- lookups ---------------------------------------------------------------

    @property
    def limit(self) -> int:
        return self.config.max_sandbox_instances

    def has_capacity(self, n: int = 1) -> bool:
        return self.limit <= 0 or self.counted + n <= self.limit

    def find(self, identity: str) -> Optional[ContainerModel]:
        """By container name, or by session_id (the name's suffix). None if unknown."""
        if not isinstance(identity, str) or not identity:
            raise InvalidRequest(f"identity must be a non-empty string, got {identity!r}")
        rec = self.records.get(identity)
        if rec is None:
            rec = self.records.get(self.config.container_prefix_key + identity)
        return rec

    def get(self, identity: str, follow: bool = True) -> ContainerModel:
        """The record, following ``redirect_to`` from REPLACED records; unknown raises NotFound."""
        rec = self.find(identity)
        if rec is None:
            raise NotFound(f"no sandbox with id {identity!r}")
        seen = set()
        while follow and rec.state == S.REPLACED and rec.redirect_to and rec.container_name not in seen:
            seen.add(rec.container_name)
            nxt = self.records.get(rec.redirect_to)
            if nxt is None:
                break
            rec = nxt
        return rec

    def session_names(self, session: str) -> list[str]:
        return list(self.sessions.get(session, []))

    def by_state(self, *states) -> list[ContainerModel]:
        return [r for r in self.records.values() if r.state in states]

    def node_of(self, rec: ContainerModel) -> str:
        return rec.node_id or self.node

    def next_warm(self, sandbox_type: str, node: Optional[str] = None, strict: bool = False) -> Optional[str]:
        """The WARM sandbox of the type that has waited longest; on ``node`` first when given (only
        there when ``strict``). None when none fits."""
        names = self.warm.get(sandbox_type)
        if not names:
            return None
        if node is None:
            return next(iter(names))
        for name in names:
            if self.node_of(self.records[name]) == node:
                return name
        return None if strict else next(iter(names))

    def warm_count(self, sandbox_type: str) -> int:
        return len(self.warm.get(sandbox_type, ()))

    def count(self, sandbox_type: str, state) -> int:
        """Records of the type in the state (kept as transitions happen: O(1))."""
        return self._counts.get((sandbox_type, ContainerState(state).value), 0)

    def node_active(self, node: str) -> int:
        return self._node_active.get(node, 0)

    def node_starting(self, node: str) -> int:
        return self._node_starting.get(node, 0)

    def on_node(self, node: str, *states) -> list[ContainerModel]:
        return [r for r in self.records.values() if self.node_of(r) == node and (not states or r.state in states)]

    # -- internal --------------------------------------------------------------

    def _tally(self, rec: ContainerModel, state, n: int) -> None:
        st = ContainerState(state)
        key = (rec.sandbox_type or self.config.default_type, st.value)
        self._counts[key] = self._counts.get(key, 0) + n
        node = self.node_of(rec)
        if st in COUNTED_STATES:
            self.counted += n
            self._node_active[node] = self._node_active.get(node, 0) + n
        if st == S.STARTING:
            self._node_starting[node] = self._node_starting.get(node, 0) + n
        if st == S.WARM:
            names = self.warm.setdefault(rec.sandbox_type or self.config.default_type, OrderedDict())
            if n > 0:
                names[rec.container_name] = None
            else:
                names.pop(rec.container_name, None)

    def _set_state(self, rec: ContainerModel, new) -> None:
        self._tally(rec, rec.state, -1)
        self._tally(rec, new, 1)
        rec.state = new
        rec.updated_at = self.clock()
        rec.rev += 1
        self._dirty.add(rec.container_name)

    def _touch(self, rec: ContainerModel) -> None:
        rec.updated_at = self.clock()
        rec.rev += 1
        self._dirty.add(rec.container_name)

    def _bind_session(self, rec: ContainerModel, session: str) -> None:
        rec.session_ctx_id = session
        rec.meta = {**(rec.meta or {}), "session_ctx_id": session}
        names = self.sessions.setdefault(session, [])
        if rec.container_name not in names:
            names.append(rec.container_name)

    def _unbind_session(self, rec: ContainerModel) -> None:
        sid = rec.session_ctx_id
        if sid and sid in self.sessions:
            names = [n for n in self.sessions[sid] if n != rec.container_name]
            if names:
                self.sessions[sid] = names
            else:
                del self.sessions[sid]
        rec.session_ctx_id = None
        if rec.meta and "session_ctx_id" in rec.meta:  # a new dict: a snapshot may share the old one
            rec.meta = {k: v for k, v in rec.meta.items() if k != "session_ctx_id"}

    def _drop(self, name: str) -> None:
        rec = self.records.pop(name, None)
        if rec is not None:
            self._dirty.discard(name)
            self._deleted.add(name)
            self._tally(rec, rec.state, -1)
            if rec.session_ctx_id and rec.container_name in self.sessions.get(rec.session_ctx_id, []):
                self._unbind_session(rec)

    def new_session(self) -> str:
        """A session for a sandbox created without one: it gets a clock like every other."""
        return AUTO_SESSION_PREFIX + self._uuid.random(16)

    # -- transitions -----------------------------------------------------------

    def reserve(
        self,
        sandbox_type: str,
        *,
        session_ctx_id: Optional[str] = None,
        meta: Optional[dict] = None,
        mount_dir: Optional[str] = None,
        storage_path: Optional[str] = None,
        version: Optional[str] = None,
        node: Optional[str] = None,
    ) -> Optional[ContainerModel]:
        """none -> STARTING: a slot and a name for a sandbox about to be started on ``node``.

        Returns None when ``max_sandbox_instances`` is reached. The slot is held until
        :meth:`started` or :meth:`start_failed`.
        """
        t = self.config.sandbox_type(sandbox_type)
        if not self.has_capacity():
            return None
        session_id = self._uuid.uuid()
        name = self.config.container_prefix_key + session_id
        now = self.clock()
        if mount_dir is None and self.config.default_mount_dir:
            mount_dir = f"{self.config.default_mount_dir.rstrip('/')}/{session_id}"
        if storage_path is None and self.config.storage_folder:
            storage_path = f"{self.config.storage_folder.rstrip('/')}/{session_id}"
        rec = ContainerModel(
            session_id=session_id,
            container_name=name,
            mount_dir=mount_dir,
            storage_path=storage_path,
            runtime_token=secrets.token_hex(16),
            version=version or t.image,
            meta=dict(meta or {}),
            timeout=self.config.timeout_for(t.name),
            sandbox_type=t.name,
            state=S.STARTING,
            created_at=now,
            updated_at=now,
            node_id=node or self.node or None,
            node_address=self.addresses.get(node or self.node),
        )
        self.records[name] = rec
        self._tally(rec, S.STARTING, 1)
        self._dirty.add(name)
        if session_ctx_id:
            self._bind_session(rec, session_ctx_id)
        return rec

    def started(self, name: str, container_id: str, url: Optional[str], ports: Iterable) -> ContainerModel:
        """STARTING -> WARM (no session) or RUNNING (bound to a session)."""
        rec = self.records.get(name)
        if rec is None or rec.state != S.STARTING:
            raise Conflict(f"{name} is not starting (state {rec.state.value if rec else 'unknown'})")
        rec.container_id = container_id
        rec.url = url
        rec.ports = list(ports)
        if rec.session_ctx_id:
            rec.last_active_at = self.clock()
            self._set_state(rec, S.RUNNING)
        else:
            self._set_state(rec, S.WARM)
        self.pool(rec.sandbox_type).start_ended(True, self.clock())
        return rec

    def moved(self, name: str, url: Optional[str], ports: Iterable) -> Optional[ContainerModel]:
        """The sandbox was started again and its box answers elsewhere (Docker picks a new host port)."""
        rec = self.records.get(name)
        if rec is None or (rec.url == url and list(rec.ports) == list(ports)):
            return rec
        rec.url = url
        rec.ports = list(ports)
        self._touch(rec)
        return rec

    def synced(self, name: str, at: Optional[float], error: Optional[str]) -> Optional[ContainerModel]:
        """The outcome of a workspace upload: when it completed, or why it failed (kept on the
        record, so ``get_info`` says so and a restore knows what to expect)."""
        rec = self.records.get(name)
        if rec is None:
            return None
        if at:
            rec.storage_synced_at = at
        rec.storage_error = error
        self._touch(rec)
        return rec

    def start_failed(self, name: str, counts: bool = True) -> Optional[ContainerModel]:
        """STARTING -> gone: frees the slot (idempotent). ``counts``: see :meth:`PoolCore.start_ended`."""
        rec = self.records.get(name)
        if rec is None or rec.state != S.STARTING:
            return None
        self.pool(rec.sandbox_type).start_ended(False, self.clock(), counts)
        self._drop(name)
        return rec

    def claim(self, name: str, session_ctx_id: Optional[str], meta: Optional[dict] = None) -> ContainerModel:
        """WARM -> RUNNING for a session (one of corral's own when none is given).

        Idempotent under retries: claiming a RUNNING record for the same session returns it.
        """
        rec = self.records.get(name)
        if rec is None:
            raise NotFound(f"no sandbox named {name!r}")
        if rec.state == S.RUNNING and rec.session_ctx_id == session_ctx_id:
            return rec
        if rec.state != S.WARM:
            raise Conflict(f"{name} is {rec.state.value}, not WARM")
        rec.meta = {**(rec.meta or {}), **(meta or {})}
        rec.recycled_at = None
        rec.recycle_reason = None
        rec.last_active_at = self.clock()
        self._bind_session(rec, session_ctx_id or self.new_session())
        self._set_state(rec, S.RUNNING)
        self.pool(rec.sandbox_type).consumed(1)
        return rec

    def release(self, identity: str, reuse: bool = False, force: bool = False) -> Optional[Teardown]:
        """any -> RELEASED (or RESETTING when the type reuses sandboxes).

        Unknown identity or already released: None (nothing to do), like the
        reference, which answers True for an unknown identity. A sandbox being reset is left to
        its reset, unless ``force`` (the namespace shutting down): then it is destroyed.
        """
        rec = self.find(identity)
        if rec is None:
            return None
        rec = self.get(rec.container_name)  # follow a redirect to the live sandbox
        if rec.state in (S.RELEASED, S.REPLACED) or (rec.state == S.RESETTING and not force):
            return None
        had_container = rec.state in (S.WARM, S.RUNNING, S.STARTING, S.RESETTING)
        upload = bool(rec.mount_dir and rec.storage_path and rec.state == S.RUNNING)
        self._unbind_session(rec)
        if reuse and rec.state == S.RUNNING:
            self._set_state(rec, S.RESETTING)
            # the next session gets a new token: whoever held this sandbox keeps no key to it
            return Teardown(_snapshot(rec), "reset", upload, token=secrets.token_hex(16))
        self._set_state(rec, S.RELEASED)
        rec.released_at = self.clock()
        rec.recycled_at = None
        rec.recycle_reason = None
        if not had_container:
            return None  # a RECYCLED or LOST record has no container left
        return Teardown(_snapshot(rec), "destroy", upload)

    def release_many(self, identities: list) -> tuple[list, list[Teardown], list[tuple[Optional[str], str]]]:
        """:meth:`release` of each identity, reset for reuse when its type reuses sandboxes. Returns
        one answer per identity (True, or the corral error of a bad identity), the teardowns, and
        the (session, name) of every sandbox found (what its session actor is told)."""
        answers: list = []
        tds: list[Teardown] = []
        left: list[tuple[Optional[str], str]] = []
        for identity in identities:
            try:
                rec = self.find(identity)
            except CorralError as e:
                answers.append(e)
                continue
            answers.append(True)
            if rec is None:
                continue
            live = self.get(rec.container_name)
            left.append((live.session_ctx_id, live.container_name))
            td = self.release(identity, reuse=self.config.sandbox_type(live.sandbox_type).reuse)
            if td is not None:
                tds.append(td)
        return answers, tds, left

    def release_all(self) -> tuple[list[str], list[Teardown], list[tuple[Optional[str], str]]]:
        """Every sandbox with a container is destroyed (the namespace shutting down); RECYCLED and
        LOST records are released too, so nothing restores them. Returns the names destroyed,
        their teardowns and the (session, name) of each."""
        names = [r.container_name for r in self.by_state(S.STARTING, S.WARM, S.RUNNING, S.RESETTING)]
        tds: list[Teardown] = []
        left = []
        for n in names:
            left.append((self.records[n].session_ctx_id, n))
            td = self.release(n, reuse=False, force=True)
            if td is not None:
                tds.append(td)
        for r in self.by_state(S.RECYCLED, S.LOST):
            self.release(r.container_name)
        return names, tds, left

    def abandon_resets(self) -> list[Teardown]:
        """After a restart: a reset cut off midway may have given its box a token no record holds,
        so every RESETTING sandbox is destroyed."""
        tds = [self.release(r.container_name, force=True) for r in self.by_state(S.RESETTING)]
        return [td for td in tds if td is not None]

    def reset_done(self, name: str, ok: bool, token: Optional[str] = None) -> Optional[ContainerModel]:
        """RESETTING -> WARM with its new token (back in the pool), or RELEASED (the reset failed)."""
        rec = self.records.get(name)
        if rec is None or rec.state != S.RESETTING:
            return None
        if ok:
            rec.meta = {}
            rec.last_active_at = None
            if token:
                rec.runtime_token = token
            self._set_state(rec, S.WARM)
        else:
            rec.released_at = self.clock()
            self._set_state(rec, S.RELEASED)
        return rec

    def recycle(self, name: str, reason: str = "heartbeat_timeout") -> Optional[Teardown]:
        """RUNNING -> RECYCLED: the container goes, the record and session binding stay for restore."""
        rec = self.records.get(name)
        if rec is None or rec.state != S.RUNNING:
            return None
        rec.recycled_at = self.clock()
        rec.recycle_reason = reason
        self._set_state(rec, S.RECYCLED)
        return Teardown(_snapshot(rec), "recycle", bool(rec.mount_dir and rec.storage_path))

    def to_restore(self, session: str) -> list[ContainerModel]:
        """The RECYCLED and LOST records of a session (what a restore must bring back)."""
        return [
            self.records[n] for n in self.sessions.get(session, [])
            if n in self.records and self.records[n].state in (S.RECYCLED, S.LOST)
        ]

    def restore_request(self, old: ContainerModel, live_nodes: Iterable[str]) -> tuple[dict, Optional[str]]:
        """How a RECYCLED or LOST record comes back: the cold start's request (its type, session,
        meta, workspace; on its old node when that node lives and kept the workspace, a RECYCLED
        record's) and what its start downloads ("expected" when the workspace was synced)."""
        node = self.node_of(old)
        here = node in set(live_nodes) and old.state == S.RECYCLED
        request = dict(sandbox_type=old.sandbox_type, session_ctx_id=old.session_ctx_id,
                       meta={k: v for k, v in (old.meta or {}).items() if k != "session_ctx_id"},
                       mount_dir=old.mount_dir, storage_path=old.storage_path, prefer=node if here else None)
        return request, "expected" if old.storage_synced_at is not None else None

    def replace(self, old_name: str, new_name: str) -> ContainerModel:
        """RECYCLED/LOST -> REPLACED, pointing at the new sandbox (get_info and release follow it)."""
        old = self.records.get(old_name)
        if old is None:
            raise NotFound(f"no sandbox named {old_name!r}")
        if old.state == S.REPLACED and old.redirect_to == new_name:
            return old
        if old.state not in (S.RECYCLED, S.LOST):
            raise Conflict(f"{old_name} is {old.state.value}, not RECYCLED")
        sid = old.session_ctx_id
        self._unbind_session(old)
        old.session_ctx_id = sid  # kept for the record, no longer indexed
        old.redirect_to = new_name
        old.released_at = self.clock()
        self._set_state(old, S.REPLACED)
        return old

    def expire(self, max_delete: int = 1000) -> list[str]:
        """Delete RELEASED/REPLACED records older than ``released_key_ttl`` (0 disables)."""
        ttl = self.config.released_key_ttl
        if ttl <= 0:
            return []
        now = self.clock()
        gone = []
        for name, rec in list(self.records.items()):
            if len(gone) >= max_delete:
                break
            if rec.state in (S.RELEASED, S.REPLACED):
                t = rec.released_at or rec.updated_at or now
                if now - t > ttl:
                    self._drop(name)
                    gone.append(name)
        return gone

    def mark_lost(self, name: str, reason: str = "container_lost") -> Optional[Teardown]:
        """A container vanished under a live record: RUNNING -> RECYCLED (restorable, its workspace
        is still on this node), WARM/RESETTING -> dropped."""
        rec = self.records.get(name)
        if rec is None:
            return None
        if rec.state == S.RUNNING:
            return self.recycle(name, reason=reason)
        if rec.state in (S.WARM, S.RESETTING):
            self._drop(name)
        return None

    def engine_stopped(self, node: str, names: list[str]) -> tuple[list[Teardown], list[tuple[str, str]]]:
        """The engine of ``node`` reports these containers stopped: a WARM one is released, a
        RUNNING one lost (RECYCLED, restorable); one stopped on request stays. Returns the
        teardowns and the (session, name) of each RUNNING one (what its session actor is told)."""
        tds, left = [], []
        for name in names:
            rec = self.records.get(name)
            if rec is None or self.node_of(rec) != node or name in self.stopped:
                continue
            if rec.state == S.WARM:
                td = self.release(name)
            elif rec.state == S.RUNNING:
                left.append((rec.session_ctx_id, name))
                td = self.mark_lost(name)
            else:
                continue
            if td is not None:
                tds.append(td)
        return tds, left

    def move_node(self, old: str, new: str) -> int:
        """The machine of node ``old`` came back as node ``new`` (Ray was restarted: same address,
        new id). Its records follow; the reconciliation of ``new`` then adopts their containers."""
        n = 0
        for rec in [r for r in self.records.values() if self.node_of(r) == old]:
            self._tally(rec, rec.state, -1)
            rec.node_id = new
            self._tally(rec, rec.state, 1)
            self._touch(rec)
            n += 1
        return n

    def nodes_of_records(self) -> dict[str, Optional[str]]:
        """Every node id records name, with the address recorded for it."""
        out: dict[str, Optional[str]] = {}
        for r in self.records.values():
            node = self.node_of(r)
            if node not in out or (r.node_address and not out[node]):
                out[node] = r.node_address
        return out

    def node_lost(self, node: str) -> list[ContainerModel]:
        """A node died: its sessions' sandboxes go LOST (restorable elsewhere, reason NODE_LOST),
        the rest of its live records are dropped. Starts in flight there are failed by the
        shell (their calls fail), not here."""
        out = []
        now = self.clock()
        for rec in self.on_node(node, S.WARM, S.RUNNING, S.RESETTING, S.RECYCLED):
            if rec.state in (S.RUNNING, S.RECYCLED) and rec.session_ctx_id:
                rec.recycled_at = rec.recycled_at or now
                rec.recycle_reason = "NODE_LOST"
                self._set_state(rec, S.LOST)
                out.append(rec)
            else:
                self._drop(rec.container_name)
        return out

    # -- pools and configuration ---------------------------------------------------

    def pool(self, sandbox_type: Optional[str]) -> PoolCore:
        t = sandbox_type or self.config.default_type
        p = self.pools.get(t)
        if p is None:
            p = self.pools[t] = PoolCore(t, self.config.pool_target(t) if t in self.config.sandbox_types else 0)
        return p

    def plan_config(self, pool_size: Optional[int] = None, sandbox_types: Optional[dict] = None,
                    max_sandbox_instances: Optional[int] = None) -> tuple[SandboxManagerEnvConfig, dict]:
        """The config with these changes (validated: a bad value raises, nothing changes) and the
        changes to keep across restarts. :meth:`set_config` puts it in force."""
        raw = self.config.model_dump(mode="json")
        over: dict = {}
        if pool_size is not None:
            over["pool_size"] = pool_size
        if max_sandbox_instances is not None:
            over["max_sandbox_instances"] = max_sandbox_instances
        if sandbox_types is not None:
            over["sandbox_types"] = {**raw["sandbox_types"], **sandbox_types}
        new = SandboxManagerEnvConfig.model_validate({**raw, **over})
        dumped = new.model_dump(mode="json")
        return new, {k: dumped[k] for k in over}

    def set_config(self, config: SandboxManagerEnvConfig) -> None:
        """Put a config in force: its limit, types and every type's warm target."""
        self.config = config
        for t in config.sandbox_types:
            self.pool(t).set_target(config.pool_target(t))

    # -- reconciliation --------------------------------------------------------

    def reconcile(self, node: str, observed: list[dict], in_flight: Iterable[str] = ()) -> ReconcilePlan:
        """Compare the records of ``node`` with the containers its driver reports (dicts with
        ``container_id``, ``name``, ``status``, ``labels``). Adopt what is known, remove what is
        not, mark live records whose container is gone. A STARTING record is left alone while its
        start is ``in_flight`` (the pool is making it); otherwise its start was cut off (a
        restart), its container, if any, is removed and the record dropped."""
        plan = ReconcilePlan()
        flying = set(in_flight)
        seen: set[str] = set()
        for c in observed:
            labels = c.get("labels") or {}
            name = labels.get(LABEL_NAME) or c.get("name")
            rec = self.records.get(name) if name else None
            if rec is not None and self.node_of(rec) != node:
                rec = None  # a container of another node's record: that record is not this one
            if rec is not None and rec.state == S.STARTING and name in flying:
                seen.add(name)
                continue
            live = rec is not None and rec.state in (S.WARM, S.RUNNING, S.RESETTING)
            if live and c.get("status") == "running":
                seen.add(name)
                plan.adopted.append(name)
                if c.get("container_id") and rec.container_id != c["container_id"]:
                    rec.container_id = c["container_id"]
                    self._dirty.add(name)
            else:
                plan.remove.append(c["container_id"])
        for rec in self.on_node(node, S.STARTING, S.WARM, S.RUNNING, S.RESETTING):
            name = rec.container_name
            if name in seen:
                continue
            if rec.state == S.STARTING:
                if name not in flying:
                    self.start_failed(name, counts=False)
                    plan.lost.append(name)
            else:
                self.mark_lost(name)
                plan.lost.append(name)
        return plan

    # -- persistence -----------------------------------------------------------

    def take_changes(self) -> tuple[list[dict], list[str]]:
        """Records changed and names deleted since the last call (what to append to the store)."""
        changed = [self.records[n].model_dump(mode="json") for n in self._dirty if n in self.records]
        deleted = sorted(self._deleted)
        self._dirty.clear()
        self._deleted.clear()
        self._dumps = {d["container_name"]: d for d in changed}
        return changed, deleted

    def dump(self, rec: ContainerModel) -> dict:
        """The record as a JSON dict; the one made for the last commit when it is still current
        (an answer after a commit does not serialise its records twice). Never mutate it."""
        d = self._dumps.get(rec.container_name)
        if d is not None and d["rev"] == rec.rev and d["state"] == rec.state.value:
            return d
        return rec.model_dump(mode="json")

    def pending_changes(self) -> bool:
        return bool(self._dirty or self._deleted)

    def snapshot(self) -> dict:
        return {
            "version": SNAPSHOT_VERSION,
            "registry_id": self.registry_id,
            "records": [r.model_dump(mode="json") for r in self.records.values()],
        }

    def load(self, data: dict) -> None:
        """Replace the table with a snapshot (``{"version", "records"}``)."""
        if not data:
            return
        if data.get("version") != SNAPSHOT_VERSION:
            raise InvalidRequest(f"unknown registry snapshot version {data.get('version')!r}")
        self.load_records(data.get("records", []))

    def load_records(self, raws: list[dict]) -> None:
        self.records.clear()
        self.sessions.clear()
        self.warm.clear()
        self._counts.clear()
        self._node_active.clear()
        self._node_starting.clear()
        self.counted = 0
        for raw in sorted(raws, key=lambda r: r.get("updated_at") or 0):
            rec = ContainerModel.model_validate(raw)
            self.records[rec.container_name] = rec
            self._tally(rec, rec.state, 1)
            if rec.session_ctx_id and rec.state in SESSION_STATES:
                self.sessions.setdefault(rec.session_ctx_id, []).append(rec.container_name)

    # -- views -----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, state), n in self._counts.items():
            if n:
                out[state] = out.get(state, 0) + n
        return out

    def fill_views(self, views: list[NodeView]) -> list[NodeView]:
        """The node views with what each node holds and is starting now (by these records)."""
        for v in views:
            v.active = self.node_active(v.node_id)
            v.starting = self.node_starting(v.node_id)
        return views

    def node_counts(self) -> dict[str, dict[str, int]]:
        """Per node, records by state (``status()``)."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records.values():
            if r.state in COUNTED_STATES or r.state in (S.RECYCLED, S.LOST):
                d = out.setdefault(self.node_of(r), {})
                d[r.state.value] = d.get(r.state.value, 0) + 1
        return out

