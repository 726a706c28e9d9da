"""RegistryCore: every container record and every state transition, in plain Python.

What it owns: the records (``container_name -> ContainerModel``), the session
index (``session_ctx_id -> [container_name]``), the warm index (per sandbox
type, the WARM names in the order they became warm: what an acquire takes) and
the count of active (STARTING, WARM, RUNNING, RESETTING) records that
``max_sandbox_instances`` caps. Nothing else writes a record: the RegistryActor wraps this class, runs
one call at a time on its event loop, and carries out the decisions it returns
(teardowns, removals) through the pool actors and the driver.

No Ray, no Docker, no I/O here; the clock is injected, so tests drive time.
Transitions raise corral errors (``NotFound``, ``Conflict``) for impossible
requests and are idempotent where Ray may retry them (releasing a released
record, recycling a recycled one, expiring twice).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import shortuuid

from corral.errors import Conflict, InvalidRequest, NotFound
from corral.models import (
    ACTIVE_STATES,
    LABEL_NAME,
    SESSION_ID_ALPHABET,
    ContainerModel,
    ContainerState,
    SandboxManagerEnvConfig,
)

__all__ = ["RegistryCore", "Teardown", "ReconcilePlan", "COUNTED_STATES", "SNAPSHOT_VERSION"]

S = ContainerState
#: States that hold a slot under ``max_sandbox_instances``. RESETTING is a
#: released sandbox being wiped for reuse: it still occupies its container.
COUNTED_STATES = ACTIVE_STATES
SNAPSHOT_VERSION = 1


def _snapshot(rec: ContainerModel) -> ContainerModel:
    """The record as it is now, for a teardown. Shallow, with its own ``meta`` and ``ports``: the
    registry assigns new values rather than mutating these in place (~2 us; a deep copy took ~13)."""
    return rec.model_copy(update={"meta": dict(rec.meta or {}), "ports": list(rec.ports or [])})


@dataclass
class Teardown:
    """What the shell must do with a container after a transition."""

    record: ContainerModel
    action: str  # "destroy" (stop + remove), "reset" (wipe and return to WARM), "recycle" (remove, keep workspace)
    upload: bool = False  # sync the workspace to storage first


@dataclass
class ReconcilePlan:
    """Differences between the records and the containers the driver reports."""

    adopted: list[str] = field(default_factory=list)  # known records whose container is there
    remove: list[str] = field(default_factory=list)  # container ids to remove (no live record)
    lost: list[str] = field(default_factory=list)  # records whose container vanished (now RECYCLED or dropped)


class RegistryCore:
    """The record table and its state machine (see the module docstring)."""

    def __init__(
        self,
        config: SandboxManagerEnvConfig,
        clock: Callable[[], float] = time.time,
        registry_id: str = "corral",
    ) -> None:
        self.config = config
        self.clock = clock
        self.registry_id = registry_id
        self.records: dict[str, ContainerModel] = {}
        self.sessions: dict[str, list[str]] = {}
        self.counted = 0
        self.warm: dict[str, dict[str, None]] = {}  # sandbox_type -> WARM names, oldest first
        self._counts: dict[tuple[str, str], int] = {}  # (sandbox_type, state) -> records
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

    def session_names(self, session_ctx_id: str) -> list[str]:
        return list(self.sessions.get(session_ctx_id, []))

    def by_state(self, *states) -> list[ContainerModel]:
        return [r for r in self.records.values() if r.state in states]

    def next_warm(self, sandbox_type: str) -> Optional[str]:
        """The WARM container of the type that has waited longest (None when none is warm)."""
        return next(iter(self.warm.get(sandbox_type, ())), None)

    def warm_count(self, sandbox_type: str) -> int:
        return len(self.warm.get(sandbox_type, ()))

    def count(self, sandbox_type: str, state) -> int:
        """Records of the type in the state (kept as transitions happen: O(1))."""
        return self._counts.get((sandbox_type, ContainerState(state).value), 0)

    def _tally(self, rec: ContainerModel, state, n: int) -> None:
        key = (rec.sandbox_type or self.config.default_type, ContainerState(state).value)
        self._counts[key] = self._counts.get(key, 0) + n

    # -- internal --------------------------------------------------------------

    def _index_warm(self, rec: ContainerModel, warm: bool) -> None:
        names = self.warm.setdefault(rec.sandbox_type or self.config.default_type, {})
        if warm:
            names[rec.container_name] = None
        else:
            names.pop(rec.container_name, None)

    def _set_state(self, rec: ContainerModel, new) -> None:
        was = rec.state in COUNTED_STATES
        now_counted = new in COUNTED_STATES
        if (rec.state == S.WARM) != (new == S.WARM):
            self._index_warm(rec, new == S.WARM)
        self._tally(rec, rec.state, -1)
        self._tally(rec, new, 1)
        rec.state = new
        rec.updated_at = self.clock()
        rec.rev += 1
        self.counted += int(now_counted) - int(was)
        self._dirty.add(rec.container_name)

    def _bind_session(self, rec: ContainerModel, session_ctx_id: str) -> None:
        rec.session_ctx_id = session_ctx_id
        rec.meta = {**(rec.meta or {}), "session_ctx_id": session_ctx_id}
        names = self.sessions.setdefault(session_ctx_id, [])
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
            if rec.state in COUNTED_STATES:
                self.counted -= 1
            if rec.state == S.WARM:
                self._index_warm(rec, False)
            self._tally(rec, rec.state, -1)
            if rec.session_ctx_id and rec.container_name in self.sessions.get(rec.session_ctx_id, []):
                self._unbind_session(rec)

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
    ) -> Optional[ContainerModel]:
        """none -> STARTING: a slot and a name for a container about to be created.

        Returns None when ``max_sandbox_instances`` is reached (the shell queues
        the caller). The slot is held until :meth:`started` or :meth:`start_failed`.
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
        )
        self.records[name] = rec
        self.counted += 1
        self._tally(rec, S.STARTING, 1)
        self._dirty.add(name)
        if session_ctx_id:
            self._bind_session(rec, session_ctx_id)
        return rec

    def started(self, name: str, container_id: str, url: Optional[str], ports: Iterable) -> ContainerModel:
        """STARTING -> WARM (no session) or RUNNING (bound to a session)."""
        rec = self.records.get(name)
        if rec is None or rec.state != S.STARTING:
            raise Conflict(f"{name} is not starting (state {rec.state if rec else 'unknown'})")
        rec.container_id = container_id
        rec.url = url
        rec.ports = list(ports)
        if rec.session_ctx_id:
            rec.last_active_at = self.clock()
            self._set_state(rec, S.RUNNING)
        else:
            self._set_state(rec, S.WARM)
        return rec

    def moved(self, name: str, url: Optional[str], ports: Iterable) -> Optional[ContainerModel]:
        """The container was started again and its box answers elsewhere (Docker picks a new host port)."""
        rec = self.records.get(name)
        if rec is None or (rec.url == url and list(rec.ports) == list(ports)):
            return rec
        rec.url = url
        rec.ports = list(ports)
        rec.updated_at = self.clock()
        rec.rev += 1
        self._dirty.add(name)
        return rec

    def start_failed(self, name: str) -> None:
        """STARTING -> gone: frees the slot (idempotent)."""
        rec = self.records.get(name)
        if rec is not None and rec.state == S.STARTING:
            self._drop(name)

    def claim(self, name: str, session_ctx_id: Optional[str], meta: Optional[dict] = None) -> ContainerModel:
        """WARM -> RUNNING for a session (or stays WARM-but-taken when no session is given).

        Idempotent under retries: claiming a RUNNING record for the same session returns it.
        """
        rec = self.records.get(name)
        if rec is None:
            raise NotFound(f"no sandbox named {name!r}")
        if rec.state == S.RUNNING and rec.session_ctx_id == session_ctx_id:
            return rec
        if rec.state != S.WARM:
            raise Conflict(f"{name} is {rec.state.value if hasattr(rec.state, 'value') else rec.state}, not WARM")
        rec.meta = {**(rec.meta or {}), **(meta or {})}
        rec.recycled_at = None
        rec.recycle_reason = None
        rec.last_active_at = self.clock()
        if session_ctx_id:
            self._bind_session(rec, session_ctx_id)
        self._set_state(rec, S.RUNNING)
        return rec

    def release(self, identity: str, reuse: bool = False) -> Optional[Teardown]:
        """any -> RELEASED (or RESETTING when the type reuses sandboxes).

        Unknown identity or already released: None (nothing to do), like the
        reference, which answers True for an unknown identity.
        """
        rec = self.find(identity)
        if rec is None:
            return None
        rec = self.get(rec.container_name)  # follow a redirect to the live container
        if rec.state in (S.RELEASED, S.REPLACED, S.RESETTING):
            return None
        had_container = rec.state in (S.WARM, S.RUNNING, S.STARTING)
        upload = bool(rec.mount_dir and rec.storage_path and rec.state == S.RUNNING)
        self._unbind_session(rec)
        now = self.clock()
        if reuse and rec.state == S.RUNNING:
            self._set_state(rec, S.RESETTING)
            return Teardown(_snapshot(rec), "reset", upload)
        self._set_state(rec, S.RELEASED)
        rec.released_at = now
        rec.recycled_at = None
        rec.recycle_reason = None
        if not had_container:
            return None  # a RECYCLED record has no container left
        return Teardown(_snapshot(rec), "destroy", upload)

    def reset_done(self, name: str, ok: bool) -> Optional[ContainerModel]:
        """RESETTING -> WARM (back in the pool) or RELEASED (the reset failed; destroy it)."""
        rec = self.records.get(name)
        if rec is None or rec.state != S.RESETTING:
            return None
        if ok:
            rec.meta = {}
            rec.last_active_at = None
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
        now = self.clock()
        rec.recycled_at = now
        rec.recycle_reason = reason
        self._set_state(rec, S.RECYCLED)
        return Teardown(_snapshot(rec), "recycle", bool(rec.mount_dir and rec.storage_path))

    def to_restore(self, session_ctx_id: str) -> list[ContainerModel]:
        """The RECYCLED records of a session (what a restore must bring back)."""
        return [
            self.records[n] for n in self.sessions.get(session_ctx_id, [])
            if n in self.records and self.records[n].state == S.RECYCLED
        ]

    def replace(self, old_name: str, new_name: str) -> ContainerModel:
        """RECYCLED -> REPLACED, pointing at the new container (get_info and release follow it)."""
        old = self.records.get(old_name)
        if old is None:
            raise NotFound(f"no sandbox named {old_name!r}")
        if old.state == S.REPLACED and old.redirect_to == new_name:
            return old
        if old.state != S.RECYCLED:
            raise Conflict(f"{old_name} is {old.state}, not RECYCLED")
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

    def mark_lost(self, name: str) -> Optional[Teardown]:
        """A container vanished under a live record: RUNNING -> RECYCLED (restorable), else dropped."""
        rec = self.records.get(name)
        if rec is None:
            return None
        if rec.state == S.RUNNING:
            return self.recycle(name, reason="container_lost")
        if rec.state in (S.WARM, S.STARTING, S.RESETTING):
            self._drop(name)
        return None

    # -- reconciliation --------------------------------------------------------

    def reconcile(self, observed: list[dict], booting: bool = False) -> ReconcilePlan:
        """Compare records with the containers the driver reports (dicts with
        ``container_id``, ``name``, ``status``, ``labels``). Decide only: adopt
        what is known, remove what is not, mark records whose container is gone.

        At boot, STARTING records were cut off mid-create by the restart: their
        containers are removed and the records dropped. In a periodic tick they
        are creates in flight, and both are left alone.
        """
        plan = ReconcilePlan()
        seen: set[str] = set()
        for c in observed:
            labels = c.get("labels") or {}
            name = labels.get(LABEL_NAME) or c.get("name")
            rec = self.records.get(name) if name else None
            if rec is not None and rec.state == S.STARTING and not booting:
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
        for name, rec in list(self.records.items()):
            if rec.state == S.STARTING:
                if booting:
                    self._drop(name)
                    plan.lost.append(name)
            elif rec.state in (S.WARM, S.RUNNING, S.RESETTING) and name not in seen:
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
        self.counted = 0
        for raw in sorted(raws, key=lambda r: r.get("updated_at") or 0):
            rec = ContainerModel.model_validate(raw)
            self.records[rec.container_name] = rec
            if rec.state in COUNTED_STATES:
                self.counted += 1
            if rec.state == S.WARM:
                self._index_warm(rec, True)
            self._tally(rec, rec.state, 1)
            if rec.session_ctx_id and rec.state in (S.RUNNING, S.RECYCLED):
                self.sessions.setdefault(rec.session_ctx_id, []).append(rec.container_name)

    # -- views -----------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records.values():
            k = r.state.value if hasattr(r.state, "value") else str(r.state)
            out[k] = out.get(k, 0) + 1
        return out
