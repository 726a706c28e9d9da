"""Kernel processes for the box: the kernel fork server, and a handle on each process the box starts.

:class:`ForkServer` owns the fork server process (``kernel_main.py
--fork-server``, a "zygote" that imports ipykernel and the rest of a kernel's
boot imports once, when the first kernel is asked for) and the unix socket the
box asks it over. The box starts it while it starts itself (:meth:`ForkServer.spawn`,
then :meth:`ForkServer.start` waits for its ready line): a sandbox whose
interpreter or packages cannot run a kernel fails to start, instead of failing
its first cell. It starts a new zygote when the last died (a container reset
that killed it, an OOM kill) or when a kernel needs other interpreter startup
variables than the zygote was started with (``PYTHONPATH``, ``LANG``...), and
kills it on close. A zygote that runs but finds it cannot serve kernels (a
package missing, an import failing) says why (:class:`KernelEnvironmentError`);
one that fails to start at all disables the fork server, and the box then
spawns its kernels.

:class:`ProcessHandle` owns one process the box started: a kernel, forked
by the zygote or spawned by the box, or the zygote itself. It signals the
process group, tells liveness and awaits death through a pidfd (no polling)
where Linux has them, else through ``/proc``. A forked kernel is the
zygote's child, so the zygote reaps it; a spawned one is reaped here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .groups import own_group

__all__ = ["ForkServer", "ForkServerError", "KernelEnvironmentError", "ProcessHandle", "KERNEL_MAIN"]

logger = logging.getLogger(__name__)

#: The kernel's entry point, run by path (see kernel_main.py for why).
KERNEL_MAIN = str(Path(__file__).with_name("kernel_main.py"))
#: Variables an interpreter reads as it starts or as it imports a kernel's modules (site dirs,
#: locale, import path, preloads, pydevd's and matplotlib's settings): a zygote serves only
#: kernels whose environment agrees with its own on them. ``HOME`` places the user site dir.
_STARTUP_PREFIXES = ("PYTHON", "LD_", "LC_", "LANG", "PYDEVD", "JUPYTER", "IPYTHON", "MPL")
#: How long a killed process gets to disappear before the box gives up waiting.
_EXIT_TIMEOUT = 5.0


class ForkServerError(Exception):
    """The fork server could not fork a kernel (the caller spawns one instead)."""


class KernelEnvironmentError(ForkServerError):
    """This interpreter and environment cannot run a kernel at all (a spawned one would fail alike)."""


def _startup_vars(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k == "HOME" or k.startswith(_STARTUP_PREFIXES)}


def _pidfd(pid: int) -> Optional[int]:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds (Linux < 5.3, a seccomp filter) or already gone
        return None


def _running(pid: int) -> bool:
    """True if ``pid`` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class ProcessHandle:
    """One process the box started: its pid, its process group (it leads its own), its death."""

    def __init__(self, pid: int, popen: Optional[subprocess.Popen] = None) -> None:
        self.pid = pid
        self._popen = popen  # set when the box spawned it (and so reaps it)
        self._pidfd = _pidfd(pid)

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], cwd: str) -> "ProcessHandle":
        """Start a kernel as its own process (the fallback): what jupyter_client's launcher does."""
        popen = subprocess.Popen(
            argv,
            env={**env, "JPY_PARENT_PID": str(os.getpid())},  # ipykernel exits when the box does
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            **own_group(),
        )
        return cls(popen.pid, popen)

    def alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        if self._pidfd is not None:
            poller = select.poll()  # not select(): a box with many files open has fds past FD_SETSIZE
            poller.register(self._pidfd, select.POLLIN)
            return not poller.poll(0)
        return _running(self.pid)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process group: for a kernel, it and what it started, as jupyter_client does."""
        try:
            os.killpg(self.pid, signum)
            return
        except PermissionError:  # a pid reused by another user's process is not ours
            return
        except ProcessLookupError:  # no such group: gone, or not yet its own group leader
            pass
        try:
            os.kill(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True once it has."""
        if not self.alive():
            return True
        loop = asyncio.get_running_loop()
        if self._pidfd is not None:
            exited = loop.create_future()
            loop.add_reader(self._pidfd, lambda: exited.done() or exited.set_result(None))
            try:
                await asyncio.wait_for(exited, timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                loop.remove_reader(self._pidfd)
        else:
            deadline = loop.time() + timeout
            while self.alive() and loop.time() < deadline:
                await asyncio.sleep(0.01)
        return not self.alive()

    async def kill(self) -> None:
        """SIGKILL the process group, wait for the process to die, release the handle."""
        self.signal(signal.SIGKILL)
        if not await self.wait(_EXIT_TIMEOUT):
            logger.warning("process %d survived SIGKILL for %.0f s", self.pid, _EXIT_TIMEOUT)
        self.close()

    def close(self) -> None:
        """Release the pidfd (the process itself is left alone)."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class ForkServer:
    """The box's kernel fork server (zygote): started with the box, replaced when dead, killed on close."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self._sock: Optional[socket.socket] = None  # the box's end, until the zygote's ready line is read
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._startup: dict[str, str] = {}
        self._lock = asyncio.Lock()
        #: Set when a zygote failed to start: its owner spawns kernels from then on.
        self.disabled = False

    def pid(self) -> Optional[int]:
        """The zygote's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def spawn(self, env: dict[str, str], cwd: str) -> None:
        """Start a zygote now, without waiting for it (no event loop needed): its interpreter
        starts while the box goes on starting itself; :meth:`start` waits for it."""
        if self._proc is None:
            self._spawn(env, cwd)

    async def start(self, env: dict[str, str], cwd: str, timeout: float) -> None:
        """Have a zygote up for ``env``; raises :class:`ForkServerError` (or its subclass
        :class:`KernelEnvironmentError`, with the zygote's reason) when none comes up."""
        async with self._lock:
            await self._ensure(env, cwd, timeout)

    async def fork(self, argv: list[str], env: dict[str, str], cwd: str, timeout: float) -> int:
        """Fork a kernel running ``argv`` in ``cwd`` with ``env``; returns its pid or raises ForkServerError."""
        async with self._lock:
            await self._ensure(env, cwd, timeout)
            # The kernel's parent is the zygote: ipykernel exits when it does (and the zygote when the box does).
            request = {"argv": argv, "env": {**env, "JPY_PARENT_PID": str(self._proc.pid)}, "cwd": cwd}
            try:
                self._writer.write(json.dumps(request).encode() + b"\n")
                await self._writer.drain()
                # The first request waits for the zygote's imports too.
                reply = json.loads(await asyncio.wait_for(self._reader.readline(), timeout) or b"{}")
            except (OSError, ValueError, asyncio.TimeoutError) as exc:
                await self._stop()
                raise ForkServerError(f"no answer from the fork server: {exc!r}") from exc
            if "pid" not in reply:
                await self._stop()
                error = reply.get("error")
                if error and error.startswith("importing"):
                    raise KernelEnvironmentError(error)
                raise ForkServerError(error or "the fork server exited")
            return int(reply["pid"])

    async def _ensure(self, env: dict[str, str], cwd: str, timeout: float) -> None:
        same = _startup_vars(env) == self._startup
        if self._sock is not None and same and self._proc is not None:
            await self._await_ready(timeout)  # spawned with the box, not heard from yet
        elif self.pid() is None or not same or self._sock is not None:
            await self._stop()
            self._spawn(env, cwd)
            await self._await_ready(timeout)

    def _spawn(self, env: dict[str, str], cwd: str) -> None:
        box_end, server_end = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, KERNEL_MAIN, "--fork-server", str(server_end.fileno())],
                pass_fds=[server_end.fileno()],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                **own_group(),  # a terminal's Ctrl-C aimed at the box does not reach it
            )
        except OSError as exc:
            box_end.close()
            self.disabled = True
            raise ForkServerError(f"cannot start the fork server ({sys.executable}): {exc}") from exc
        finally:
            server_end.close()
        self._startup = _startup_vars(env)
        self._sock = box_end

    async def _await_ready(self, timeout: float) -> None:
        sock, self._sock = self._sock, None
        self._reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        try:
            ready = json.loads(await asyncio.wait_for(self._reader.readline(), timeout) or b"{}")
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            ready = {"error": f"no ready line within {timeout:g}s ({exc!r})"}
        if ready.get("ready"):
            return
        proc = self._proc
        await self._stop()
        if ready.get("error"):  # the zygote ran and said why: a spawned kernel would fail alike
            raise KernelEnvironmentError(f"the kernel fork server did not start: {ready['error']}")
        self.disabled = True
        code = proc.poll() if proc is not None else None
        raise ForkServerError(f"the kernel fork server did not start: {sys.executable} exited with code {code} "
                              "before it was ready (its error is in the box's log)")

    async def _stop(self) -> None:
        proc, writer, sock = self._proc, self._writer, self._sock
        self._proc = self._reader = self._writer = self._sock = None
        if writer is not None:
            writer.close()  # end of file: the zygote kills the kernels it forked, then exits
        if sock is not None:
            sock.close()
        if proc is None:
            return
        handle = ProcessHandle(proc.pid, proc)
        try:
            if not await handle.wait(_EXIT_TIMEOUT):
                proc.kill()
                await handle.wait(_EXIT_TIMEOUT)
        finally:
            handle.close()

    async def close(self) -> None:
        """Stop the zygote (and so any kernel it still has). Idempotent."""
        async with self._lock:
            await self._stop()
