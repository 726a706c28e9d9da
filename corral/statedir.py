"""What a state dir says about who uses it: the registry's lock, the cluster record, the machine index.

What it owns, on disk:

- ``<state_dir>/<namespace>/registry.lock``: held (``fcntl.flock``) by the one
  RegistryActor of that state dir and namespace, with its pid, node and Ray
  cluster written inside. A second registry over the same records, from
  another Ray cluster on this machine, is refused with the holder's name
  (:class:`RegistryLock`).
- ``<state_dir>/cluster.json``: the Ray cluster that last served this state
  dir, whether corral started it (*embedded*, owned by one process) and that
  process's pid. A second script on this machine joins that cluster instead of
  starting its own; a record whose cluster is gone is stale, and an embedded
  owner that died without cleaning up left sandboxes to remove at the next
  start (:class:`ClusterRecord`).
- ``<state_dir>/<namespace>/config.json``: what ``configure`` changed in a running namespace,
  applied again when its registry restarts (:class:`ConfigOverrides`).
- ``$TMPDIR/corral-<uid>/index/<namespace>.json``: every state dir and driver a
  namespace used on this machine, so ``corral down --namespace NS`` finds what
  it left whatever config the command is given (:func:`remember`, :func:`recall`).

Plain files and ``fcntl``; no Ray.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from corral.errors import Conflict

__all__ = ["RegistryLock", "ClusterRecord", "ConfigOverrides", "cluster_lock", "remember", "recall", "pid_alive",
           "index_dir"]


def pid_alive(pid: Optional[int]) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RegistryLock:
    """The exclusive hold of one registry on ``<state_dir>/<namespace>``. The lock goes with the
    process (a registry killed by Ray frees it for its restart)."""

    def __init__(self, state_dir: str, namespace: str) -> None:
        self.path = Path(state_dir) / namespace / "registry.lock"
        self._fd: Optional[int] = None

    def acquire(self, about: dict) -> None:
        """Take the lock and write ``about`` (pid, node, cluster) in it; :class:`Conflict` naming
        the holder when another live registry has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_json(self.path) or {}
            os.close(fd)
            raise Conflict(
                f"the state dir {self.path.parent.parent} (namespace {self.path.parent.name!r}) is in use by "
                f"another corral registry (pid {holder.get('pid', '?')}, Ray cluster "
                f"{holder.get('cluster', '?')}): join that cluster (RAY_ADDRESS={holder.get('cluster', '?')}) "
                "or give this one another state_dir or namespace"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**about, "pid": os.getpid(), "since": time.time()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class ClusterRecord:
    """The Ray cluster that serves a state dir (see the module docstring)."""

    address: str
    embedded: bool
    owner_pid: Optional[int] = None
    started_at: float = field(default_factory=time.time)

    @staticmethod
    def path(state_dir: str) -> Path:
        return Path(state_dir) / "cluster.json"

    @classmethod
    def read(cls, state_dir: str) -> Optional["ClusterRecord"]:
        data = _read_json(cls.path(state_dir))
        if not data or "address" not in data:
            return None
        return cls(address=data["address"], embedded=bool(data.get("embedded")),
                   owner_pid=data.get("owner_pid"), started_at=data.get("started_at") or 0.0)

    def write(self, state_dir: str) -> None:
        _write_json(self.path(state_dir), asdict(self))

    @staticmethod
    def clear(state_dir: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            ClusterRecord.path(state_dir).unlink()

    @property
    def owner_alive(self) -> bool:
        return pid_alive(self.owner_pid)


class ConfigOverrides:
    """The fields ``configure`` changed, kept with the namespace's records."""

    def __init__(self, state_dir: str, namespace: str) -> None:
        self.path = Path(state_dir) / namespace / "config.json"

    def apply(self, config: Any) -> Any:
        """``config`` with the saved changes (a pydantic model of the same class)."""
        over = _read_json(self.path)
        return type(config).model_validate({**config.model_dump(mode="json"), **over}) if over else config

    def save(self, changes: dict) -> None:
        _write_json(self.path, {**(_read_json(self.path) or {}), **changes})


@contextlib.contextmanager
def cluster_lock(state_dir: str, timeout: float = 120.0) -> Iterator[None]:
    """Held while a process decides which Ray cluster serves ``state_dir`` and starts it: a second
    script starting at the same moment waits here, then joins the first one's cluster."""
    path = Path(state_dir) / "cluster.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Conflict(f"{path} stayed locked for {timeout:.0f}s: another process is starting corral "
                                   "on this state dir and has not finished") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def index_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"corral-{os.getuid()}" / "index"


def remember(namespace: str, state_dir: str, driver: dict) -> None:
    """Note that ``namespace`` used ``state_dir`` with ``driver`` on this machine."""
    path = index_dir() / f"{namespace}.json"
    data = _read_json(path) or {"namespace": namespace, "uses": []}
    use = {"state_dir": state_dir, "driver": driver}
    if use not in data["uses"]:
        data["uses"].append(use)
        _write_json(path, data)


def recall(namespace: str) -> list[dict]:
    """Every ``{"state_dir", "driver"}`` ``namespace`` used on this machine."""
    data = _read_json(index_dir() / f"{namespace}.json") or {}
    return list(data.get("uses", []))


def forget(namespace: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (index_dir() / f"{namespace}.json").unlink()
