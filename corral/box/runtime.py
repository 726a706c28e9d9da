"""The box's state: everything one sandbox owns, apart from HTTP.

:class:`BoxRuntime` owns the workspace, the user's temp dir (``HOME`` and
``TMPDIR`` of every command and of the kernel), a private state dir (kernel
spec and sockets, MCP server logs: not visible in the workspace), the shell
runner and its process groups, the Jupyter kernel, the MCP servers, the
session env and the activity counters. ``reset()`` returns it to a fresh
box's state for reuse; ``close()`` releases everything and is idempotent.
"""

from __future__ import annotations

import os
import signal
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from .. import __version__
from ..errors import InvalidRequest
from .activity import Activity
from .kernel import Kernel
from .mcp_host import McpHost
from .shell import ShellRunner
from .workspace import Workspace, wipe_dir

__all__ = ["BoxRuntime"]

#: Variables of the box's own process that user code must not inherit.
_PRIVATE_ENV = ("SECRET_TOKEN", "CORRAL_TOKEN_FILE")


def _pid1_is_container_init() -> bool:
    """True when PID 1 is a container's init (tini, docker-init): never act on a host's processes."""
    try:
        with open("/proc/1/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0).decode(errors="replace") in ("tini", "docker-init", "tini-static")


def kill_everything_but(spare: set) -> int:
    """SIGKILL every process of this PID namespace not in ``spare``; returns how many."""
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spare:
            continue
        try:
            os.kill(int(entry), signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def check_env(env: object, field: str = "env") -> dict[str, str]:
    """A str->str mapping with names a process environment accepts, or InvalidRequest."""
    if not isinstance(env, dict):
        raise InvalidRequest(f"{field}: must be an object of strings")
    for key, value in env.items():
        if not isinstance(key, str) or not key or "=" in key or "\x00" in key:
            raise InvalidRequest(f"{field}: {key!r} is not a valid variable name")
        if not isinstance(value, str) or "\x00" in value:
            raise InvalidRequest(f"{field}.{key}: must be a string without NUL bytes")
    return dict(env)


class BoxRuntime:
    """One sandbox's shell, kernel, workspace, MCP servers, session env and activity."""

    def __init__(self, workspace: str | os.PathLike[str], tmp_dir: Optional[str | os.PathLike[str]] = None) -> None:
        self.workspace = Workspace(workspace)
        self._owns_tmp = tmp_dir is None
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="corral-box-tmp-") if tmp_dir is None else tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = Path(tempfile.mkdtemp(prefix="corral-box-state-"))
        self.session_env: dict[str, str] = {}
        self._base_env = {k: v for k, v in os.environ.items() if k not in _PRIVATE_ENV}
        self._base_env.update(HOME=str(self.tmp_dir), TMPDIR=str(self.tmp_dir), PWD=str(self.workspace.root))
        self.activity = Activity()
        self.started_at = self.activity.started_at
        root = str(self.workspace.root)
        self.shell = ShellRunner(root, self.env)
        self.kernel = Kernel(root, self.state_dir, self.env)
        self.mcp = McpHost(root, self.state_dir, self.env)
        self._closed = False
        self.in_container = os.environ.get("CORRAL_BOX_CONTAINER") == "1" and _pid1_is_container_init()

    def env(self) -> dict[str, str]:
        """The environment a new process gets: the box's (minus its secrets) plus the session env."""
        return {**self._base_env, **self.session_env}

    def begin(self) -> None:
        """Start the kernel's fork server now, without waiting: its interpreter starts while the
        box imports its HTTP stack. :meth:`start` waits for it."""
        self.kernel.spawn_fork_server()

    async def start(self) -> None:
        """Ready once a kernel can run here: the fork server is up (no kernel boots: the first cell
        starts one, and shell, file and MCP calls never wait for it). A sandbox whose interpreter
        or packages cannot run a kernel fails here, with :class:`~corral.errors.SandboxError`."""
        self.begin()
        await self.kernel.prepare()

    async def set_env(self, env: dict[str, str]) -> None:
        """Add ``env`` to the session env: every later command, and the kernel's ``os.environ`` now."""
        env = check_env(env)
        self.session_env.update(env)
        await self.kernel.set_env(env)

    async def info(self) -> dict:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "workspace": str(self.workspace.root),
            "started_at": self.started_at,
            "kernel": {"alive": await self.kernel.alive()},
        }

    async def reset(self, restart_kernel: bool = True) -> dict:
        """Back to a fresh box: kill processes, wipe files, drop the session env, zero the counters.

        Inside a container (``CORRAL_BOX_CONTAINER=1``, set by the Docker driver) the box owns
        the PID namespace and the /tmp tmpfs, so it also kills every other process (a daemon that
        escaped its process group included) and empties all of /tmp: a reused sandbox keeps nothing.
        """
        start = time.perf_counter()
        killed = self.shell.kill_all()
        killed += await self.mcp.close()
        if self.in_container:
            killed += kill_everything_but({1, os.getpid(), *self.kernel.pids()})
        self.session_env.clear()
        if restart_kernel:
            # The new kernel boots while we wipe; the next cell waits for it if needed.
            await self.kernel.restart(wait=False)
        else:
            await self.kernel.reset_namespace(self.env())
        self.workspace.wipe()
        wipe_dir(self.tmp_dir)
        if self.in_container:
            tmp_root = Path(tempfile.gettempdir())
            keep = {p.name for p in (self.state_dir, self.tmp_dir) if p.parent == tmp_root}
            wipe_dir(tmp_root, keep=keep)
        self.activity.reset()
        return {"ok": True, "duration_ms": (time.perf_counter() - start) * 1000, "killed": killed}

    async def close(self) -> None:
        """Kill everything the box started and remove its private dirs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.shell.kill_all()
        try:
            await self.mcp.close()
        finally:
            await self.kernel.close()
            shutil.rmtree(self.state_dir, ignore_errors=True)
            if self._owns_tmp:
                shutil.rmtree(self.tmp_dir, ignore_errors=True)
