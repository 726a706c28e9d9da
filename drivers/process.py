"""The process driver: each sandbox is a box server running as a local process.

The embedded default where no Docker engine runs. It isolates nothing (the box
runs as this user, with this machine's filesystem and network, and the code it
runs can do whatever this user can); use the Docker driver for untrusted code.
Read-only mounts, resource limits and network modes are not applied: a spec
asking for network ``none`` or ``allowlist`` is refused rather than run
without them.

The token reaches the box on its stdin (``--token-file -``), never in its
environment or command line, and the box makes itself non-dumpable; that keeps
it from the box's children, not from this user, who can read ``meta.json``.

What it owns: one directory per sandbox under ``config.root``
(``<root>/<name>/meta.json``, ``box.log`` and, when the spec names no
workspace, ``workspace/``) and a short temp dir per sandbox under the system
temp dir (the box's HOME and TMPDIR; short because the kernel's Unix sockets
live there). ``meta.json`` holds the pid, port, labels and token
(mode 0600), so :meth:`list` finds the boxes again after any restart, the way
Docker finds containers by label, and :meth:`start` can hand a restarted box
its token.

Boxes are started through a small launcher that detaches them (new session,
reparented away from the caller) and reports their pid: Ray kills an actor's
child processes when the actor exits, and a sandbox must outlive the actor
that started it, like a container does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import httpx
import psutil

from corral.box.auth import check_token
from corral.client._http import tls_context
from corral.errors import Conflict, DriverError, InvalidRequest

from .base import ContainerHandle, ContainerSpec, Driver
from .config import ProcessDriverConfig

__all__ = ["ProcessDriver"]

_READY_POLL = 0.01
_TOMBSTONE = "removing"
_LAUNCH_GRACE = 5.0  # seconds remove() waits for an in-flight launch to record its pid

# Starts the box in a process group of its own and prints its pid, then exits: the box is
# reparented away from the caller (Ray kills an actor's children when the actor exits; a
# sandbox must outlive it), and the driver knows the pid at once, so a create that times out
# or is cancelled while the box boots can still kill it.
# The box runs at a lower CPU priority (nice) than corral's actors: a sandbox's work must not
# starve the control plane that hands sandboxes out (a container gets CPU shares the same way).
# It stays in the caller's session (no setsid): a session of its own would be a scheduling
# autogroup of its own, where niceness no longer ranks it below the actors (corral/box/groups.py).
# The box inherits the launcher's stdin: the pipe the driver writes the token to.
# The launcher runs without site packages or user settings (-S -I: ~9 ms of CPU, against ~32 ms
# for an interpreter that loads its site and imports subprocess): it forks, and the child sets
# its group and priority, closes every descriptor but 0-2 (the launcher may have inherited a
# Ray worker's log files and sockets, and a box holding the launcher's stdout would keep the
# driver waiting for its end) and becomes the box.
_LAUNCHER = (
    "import os, sys\n"
    "nice, policy, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    try:\n"
    "        os.setpgid(0, 0)\n"
    "        os.setpriority(os.PRIO_PROCESS, 0, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))\n"
    "        if policy == 'idle':\n"
    "            try:\n"
    "                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    "            except (AttributeError, OSError):\n"
    "                pass  # no SCHED_IDLE here (a sandboxed kernel): the niceness still ranks it\n"
    "        os.dup2(2, 1)\n"
    "        os.closerange(3, os.sysconf('SC_OPEN_MAX'))\n"
    "        os.execvp(argv[0], argv)\n"
    "    except BaseException as e:\n"
    "        os.write(2, f'cannot start {argv[0]}: {e}\\n'.encode())\n"
    "    os._exit(127)\n"
    "print(pid, flush=True)\n"
)


def _exited(q: psutil.Process) -> bool:
    try:
        return q.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _wait_exited(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` seconds for the processes to exit; returns those still running.

    A zombie has exited: the box is not this process's child (the launcher detached it), so
    only its new parent reaps it, whenever that parent gets to it; waiting for the reaping
    (as psutil.wait_procs does for another's child) would make every removal last its whole
    timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = 0.002
    alive = [q for q in procs if not _exited(q)]
    while alive and loop.time() < deadline:
        await asyncio.sleep(pause)
        pause = min(0.05, pause * 2)
        alive = [q for q in alive if not _exited(q)]
    return alive


class ProcessDriver(Driver):
    """Runs ``python -m corral.box`` per sandbox on a port of 127.0.0.1 (or of ``spec.host``)."""

    name = "process"

    def __init__(self, config: Optional[ProcessDriverConfig] = None) -> None:
        self.config = config or ProcessDriverConfig()
        self.root = Path(self.config.root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = self.config.python or sys.executable
        self._http: Optional[httpx.AsyncClient] = None

    # -- helpers -------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise InvalidRequest(f"invalid container name {name!r}")
        return self.root / name

    def _tmp(self, name: str) -> Path:
        """The box's temp dir: short, because the kernel's Unix sockets live there (108-byte limit)."""
        digest = hashlib.sha1(str(self._dir(name)).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"corral-{digest}"

    def _read_meta(self, name: str) -> Optional[dict]:
        try:
            return json.loads((self._dir(name) / "meta.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError, InvalidRequest):
            return None

    def _write_meta(self, name: str, meta: dict) -> None:
        d = self._dir(name)
        tmp = d / "meta.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.replace(tmp, d / "meta.json")

    @staticmethod
    def _proc(meta: dict) -> Optional[psutil.Process]:
        """The box process if it is alive and really ours (pid reuse is checked)."""
        pid = meta.get("pid")
        if not pid:
            return None
        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                return None
            if abs(p.create_time() - meta.get("pid_started", 0)) > 1.0:
                return None
            return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def _handle(self, meta: dict, status: str) -> ContainerHandle:
        port = meta.get("port")
        return ContainerHandle(
            container_id=meta["name"],
            name=meta["name"],
            url=f"http://{meta.get('host') or '127.0.0.1'}:{port}" if port else None,
            ports=[port] if port else [],
            status=status,
            labels=meta.get("labels", {}),
            image="process",
        )

    async def _spawn(self, cmd: list[str], env: dict, meta: dict) -> None:
        """Run the launcher; record the box's pid in ``meta`` (and on disk) before returning.

        The token goes down the launcher's stdin, which the box inherits and reads once. It is in
        the pipe before the launcher starts: the launcher exits within milliseconds, and a pipe the
        event loop had yet to write when it saw that exit would close empty.
        """
        name = meta["name"]
        token_r, token_w = os.pipe()
        try:
            os.write(token_w, (meta["token"] + "\n").encode("ascii"))  # far below a pipe's buffer
        finally:
            os.close(token_w)
        try:
            with open(self._dir(name) / "box.log", "ab") as log:
                launcher = await asyncio.create_subprocess_exec(
                    *cmd, stdin=token_r, stdout=asyncio.subprocess.PIPE, stderr=log, env=env, cwd=meta["workspace"],
                )
        finally:
            os.close(token_r)
        out, _ = await launcher.communicate()
        try:
            meta["pid"] = int(out.decode().strip())
            meta["pid_started"] = psutil.Process(meta["pid"]).create_time()
        except (ValueError, psutil.NoSuchProcess):
            raise DriverError(f"box {name} failed to launch; log:\n{self._log_tail(name)}") from None
        try:
            self._write_meta(name, meta)
        except FileNotFoundError:
            pass  # removed while launching: the check below kills it
        self._check_not_removed(meta)

    def _check_not_removed(self, meta: dict) -> None:
        """A remove() from another process may race a create: it leaves a tombstone (or deletes
        the directory), and the creating side kills what it started and gives up."""
        d = self._dir(meta["name"])
        if (d / _TOMBSTONE).exists() or not (d / "meta.json").exists():
            p = self._proc(meta)
            if p is not None:
                for q in [p, *p.children(recursive=True)]:
                    try:
                        q.kill()
                    except psutil.NoSuchProcess:
                        pass
            raise DriverError(f"box {meta['name']} was removed while it was starting")

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=2.0, trust_env=False, verify=tls_context())
        return self._http

    def _log_tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self._dir(name) / "box.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle -----------------------------------------------------------

    async def _launch(self, meta: dict, ready_timeout: float) -> dict:
        """Start the box for ``meta`` and wait until it answers its health route."""
        name = meta["name"]
        d = self._dir(name)
        ready = d / "ready.json"
        ready.unlink(missing_ok=True)
        tmp = self._tmp(name)
        tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(tmp),
            "TMPDIR": str(tmp),
            "PYTHONUNBUFFERED": "1",
            **{k: v for k, v in meta.get("environment", {}).items() if k not in ("SECRET_TOKEN", "CORRAL_TOKEN_FILE")},
        }
        port = meta.get("port") or 0
        cmd = [
            self.python, "-S", "-I", "-c", _LAUNCHER, str(self.config.nice), self.config.cpu_policy, self.python, "-m",
            "corral.box",
            "--host", meta.get("host") or "127.0.0.1", "--port", str(port),
            "--workspace", meta["workspace"], "--ready-file", str(ready), "--token-file", "-",
        ]
        launch = asyncio.ensure_future(self._spawn(cmd, env, meta))
        try:
            await asyncio.shield(launch)
        except asyncio.CancelledError:
            # Cancelled while launching: let the launch finish so the pid is known and the
            # caller's cleanup (remove) can kill the box, rather than orphan it.
            try:
                await launch
            except Exception:
                pass
            raise
        self._write_meta(name, meta)  # from here on, a timeout or a cancel can kill it by pid
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if not meta.get("port") and ready.exists():
                try:
                    info = json.loads(ready.read_text())
                    meta["port"] = info["port"]
                    self._write_meta(name, meta)
                except (json.JSONDecodeError, KeyError):
                    pass  # half-written; the box writes atomically, so only on odd filesystems
            if meta.get("port"):
                try:
                    r = await self._client().get(
                        f"http://{meta.get('host') or '127.0.0.1'}:{meta['port']}/v1/healthz",
                        headers={"Authorization": f"Bearer {meta['token']}"},
                    )
                    if r.status_code == 200:
                        return meta
                except httpx.HTTPError:
                    pass
            if self._proc(meta) is None:
                # a box that cannot run (a broken interpreter, no kernel possible) exits and says why in its log
                raise DriverError(f"box {name} exited before it was ready; log:\n{self._log_tail(name)}")
            self._check_not_removed(meta)
            await asyncio.sleep(_READY_POLL)
        await self._kill(meta)
        raise DriverError(f"box {name} did not become ready within {ready_timeout:.0f}s; log:\n{self._log_tail(name)}")

    async def create(self, spec: ContainerSpec) -> ContainerHandle:
        check_token(spec.token, "token")
        if spec.network != "egress":
            raise InvalidRequest(
                f"network {spec.network!r} needs the docker driver: the process driver applies no network "
                "policy, so it would not be enforced"
            )
        d = self._dir(spec.name)
        old = self._read_meta(spec.name)
        if old is not None and self._proc(old) is not None:
            raise Conflict(f"container {spec.name} already exists")
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        workspace = Path(spec.workspace).absolute() if spec.workspace else d / "workspace"
        workspace.mkdir(parents=True, exist_ok=True)
        meta = {
            "name": spec.name,
            "token": spec.token,
            "labels": {**spec.labels, "corral.managed": "true"},
            "environment": spec.environment,
            "workspace": str(workspace),
            "host": spec.host or "127.0.0.1",
            "own_workspace": spec.workspace is None,
            "created_at": time.time(),
        }
        self._write_meta(spec.name, meta)
        try:
            meta = await self._launch(meta, spec.ready_timeout)
        except BaseException:
            await asyncio.shield(self.remove(spec.name))
            raise
        return self._handle(meta, "running")

    async def start(self, container_id: str, token: Optional[str] = None) -> None:
        meta = self._read_meta(container_id)
        if meta is None:
            raise DriverError(f"no such container {container_id}")
        if self._proc(meta) is None:
            if token is not None:
                # The box's token may have been rotated by a reset since meta.json was written.
                meta["token"] = check_token(token, "token")
            await self._launch(meta, 60.0)

    async def _kill(self, meta: dict, timeout: float = 1.0) -> None:
        """SIGTERM the box and everything it started, SIGKILL what is left after ``timeout``;
        ``timeout`` 0: SIGKILL at once (a removal, which keeps nothing of the sandbox)."""
        p = self._proc(meta)
        if p is None:
            return
        procs = [p]
        try:
            procs += p.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        alive = procs
        if timeout > 0:
            for q in procs:
                try:
                    q.send_signal(signal.SIGTERM)
                except psutil.NoSuchProcess:
                    pass
            alive = await _wait_exited(procs, timeout)
        for q in alive:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        if alive:
            await _wait_exited(alive, 1.0)

    async def stop(self, container_id: str, timeout: float = 1.0) -> None:
        meta = self._read_meta(container_id)
        if meta is not None:
            await self._kill(meta, timeout)

    async def remove(self, container_id: str) -> None:
        d = self._dir(container_id)
        if d.exists():
            (d / _TOMBSTONE).touch()  # a create still launching this box sees it and kills what it started
        meta = self._read_meta(container_id)
        if meta is not None and not meta.get("pid"):
            # launching right now, maybe in another process: its pid lands in meta.json within moments
            deadline = time.monotonic() + _LAUNCH_GRACE
            while time.monotonic() < deadline and not (meta or {}).get("pid"):
                await asyncio.sleep(0.05)
                meta = self._read_meta(container_id) or meta
        if meta is not None:
            # At once, as a container is removed: a graceful shutdown would only tidy up what goes anyway
            # (the box's exit costs more CPU than the rest of a removal).
            await self._kill(meta, 0)
        if d.exists():
            await asyncio.to_thread(shutil.rmtree, d, True)
        tmp = self._tmp(container_id)
        if tmp.exists():
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    async def status(self, container_id: str) -> str:
        meta = self._read_meta(container_id)
        if meta is None:
            return "missing"
        return "running" if self._proc(meta) is not None else "exited"

    async def inspect(self, container_id: str) -> Optional[ContainerHandle]:
        meta = self._read_meta(container_id)
        if meta is None:
            return None
        return self._handle(meta, "running" if self._proc(meta) is not None else "exited")

    async def list(self, labels: dict[str, str]) -> list[ContainerHandle]:
        out = []
        for d in sorted(self.root.iterdir()) if self.root.exists() else []:
            meta = self._read_meta(d.name) if d.is_dir() else None
            if meta is None:
                continue
            have = meta.get("labels", {})
            if all(have.get(k) == v for k, v in labels.items()):
                out.append(self._handle(meta, "running" if self._proc(meta) is not None else "exited"))
        return out

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
