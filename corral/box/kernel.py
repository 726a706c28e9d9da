"""The box's stateful Python: one real Jupyter kernel (ipykernel, talked to with jupyter_client).

:class:`Kernel` owns the kernel process (a :class:`~.forkserver.ProcessHandle`),
the fork server it comes from, its connection file and sockets in a private
state dir, and the client channels. Cells run one at a time under a lock, so
their outputs never mix. A cell that outlives its timeout is interrupted; a
kernel that dies during a cell is restarted and the cell answers ``died``.

Lazy: no kernel runs until the first cell asks for one (shell, file and MCP
calls never wait for it). What the box checks while it starts is that a kernel
can run at all: :meth:`Kernel.prepare` has the fork server up (its interpreter
started with the kernel's environment and found the kernel's packages), so a
broken image or environment fails the sandbox's start, not its first cell.
The first cell then costs the fork server's imports (~0.25 s of CPU, once)
and a fork. A sandbox whose sessions only run shell commands never pays for a
kernel, and a reset starts a new kernel in the background only when the
session before it had one.

Restarts: a kernel is forked from the box's kernel fork server (see
kernel_main.py), which imported ipykernel once, so a restart costs the
kernel app's setup, not an interpreter start and its imports; if the fork
server cannot serve, the kernel is spawned as its own process. Either way it
is a new process on ``kernel_main.py``: nothing of the old kernel survives.
The box manages the process itself (no KernelManager): a kill is awaited on
a pidfd, readiness on the kernel's own replies, never with sleeps.

Imports: zmq and jupyter_client load with the first kernel, not with the box.

Latency: a cell's messages are awaited with one async zmq receive each
(:func:`_recv`, which returns as soon as a message lands), never with sleeps;
its timeout only bounds how often a silent kernel is checked for death. The
kernel runs ``kernel_main.py`` (ipykernel without its idle flush round trips)
with ipykernel's 0.5 ms pre-reply sleep off: ``1+1`` takes about 2.5 ms
from request to idle on an unloaded 2-core machine, against 4.3 ms stock.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import SandboxError
from .forkserver import KERNEL_MAIN, ForkServer, ForkServerError, KernelEnvironmentError, ProcessHandle

__all__ = ["Kernel"]

logger = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: How often a silent cell checks that its kernel is still alive.
_LIVENESS_EVERY = 0.2
#: After an interrupt, how long the kernel gets to report idle before it is restarted.
_INTERRUPT_GRACE = 5.0
_STARTUP_TIMEOUT = 60.0
#: How long a booting kernel gets to show that the box's iopub subscription reached it before it is
#: asked again (each ask makes it publish): zmq drops what is published before the subscription lands.
_IOPUB_PROBE = 0.02
#: zmq retries a connect to a socket the booting kernel has not bound yet after this many ms (default
#: 100), backing off to the default interval: a dead kernel's sockets are not retried more often than stock.
_RECONNECT_MS = (5, 100)
_KERNEL_FLAGS = (
    # History lives in SQLite under $HOME: a write per cell, and files in the user's tmp dir.
    "--HistoryManager.enabled=False",
    # ipykernel sleeps 0.5 ms before every execute_reply ("FIXME ... seems to mitigate" output
    # arriving after the reply). The box waits for iopub idle, which is sent after all of a
    # cell's output on the same socket, so the sleep buys it nothing.
    "--IPythonKernel._execute_sleep=0",
)
#: Added to the session env for the kernel (inline plots; no debugpy warning about frozen modules).
_KERNEL_ENV = {"MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def _log_start_failure(task: asyncio.Task) -> None:
    # A background boot that fails is retried by the next cell; say why meanwhile.
    if not task.cancelled() and task.exception() is not None:
        logger.warning("%s", task.exception())


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


class Kernel:
    """Owns one ipykernel process, its client and its fork server; restartable, closeable.

    ``env`` is called at every (re)start for the kernel's environment, so a
    restarted kernel sees the current session env. ``close()`` is idempotent.
    """

    def __init__(self, cwd: str, state_dir: Path, env: Callable[[], dict[str, str]]) -> None:
        self._cwd = cwd
        self._state_dir = Path(state_dir)
        self._env = env
        self._lock = asyncio.Lock()
        self._forks = ForkServer()
        self._context: Any = None  # a zmq.asyncio.Context, made with the first kernel
        self._proc: Optional[ProcessHandle] = None
        self._kc: Any = None
        self._files: list[Path] = []
        self._starting: Optional[asyncio.Task] = None
        self._closed = False
        self._generation = 0

    # --- lifecycle ---

    def _kernel_env(self) -> dict[str, str]:
        return {**self._env(), **_KERNEL_ENV}

    def spawn_fork_server(self) -> None:
        """Start the fork server's interpreter now (no event loop needed); :meth:`prepare` waits for it."""
        if not self._closed and not self._forks.disabled:
            self._forks.spawn(self._kernel_env(), self._cwd)

    async def prepare(self) -> None:
        """Check that a kernel can run here: the fork server is up for the kernel's environment.

        No kernel is started (the first cell starts one). Raises :class:`~corral.errors.SandboxError`
        saying why when the interpreter or its packages cannot run a kernel.
        """
        try:
            await self._forks.start(self._kernel_env(), self._cwd, _STARTUP_TIMEOUT)
        except ForkServerError as exc:
            raise SandboxError(f"the Python kernel cannot run in this sandbox: {exc}") from None

    def start_background(self) -> None:
        """Start the kernel without waiting (a warm box answers its first cell fast)."""
        if self._starting is None and not self._closed:
            self._starting = asyncio.ensure_future(self._start())
            self._starting.add_done_callback(_log_start_failure)

    async def _ensure(self) -> None:
        if self._closed:
            raise SandboxError("the box is shutting down; its kernel is closed")
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        starting = self._starting
        try:
            await asyncio.shield(starting)
        except asyncio.CancelledError:
            if starting.cancelled():  # the start was stopped (the box closing), not this caller
                raise SandboxError("the Python kernel was stopped while it started") from None
            raise
        except Exception:
            # A failed start is not cached: the next call tries again.
            self._starting = None
            raise

    async def _start(self) -> None:
        import zmq
        import zmq.asyncio
        from jupyter_client.asynchronous import AsyncKernelClient
        from jupyter_client.connect import write_connection_file
        from jupyter_client.session import new_id_bytes

        self._generation += 1
        env = self._kernel_env()
        # Unix sockets in the private state dir: faster than loopback TCP and not reachable by port.
        base = self._state_dir / f"kernel-{self._generation}"
        connection_file, info = write_connection_file(
            f"{base}.json", ip=f"{base}-ipc", transport="ipc", key=new_id_bytes()
        )
        files = [Path(connection_file)] + [
            Path(f"{info['ip']}-{info[port]}")
            for port in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
        ]
        argv = [sys.executable, KERNEL_MAIN, "-f", connection_file, *_KERNEL_FLAGS]
        proc = kc = None
        # Shielded: a start cancelled while the fork is under way still learns the new pid (and
        # reads the fork server's answer), so it can kill that kernel instead of leaving it behind.
        launch = asyncio.ensure_future(self._launch(argv, env))
        try:
            proc = await asyncio.shield(launch)
            if self._context is None:
                self._context = zmq.asyncio.Context()
                self._context.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_MS[0])
                self._context.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_MS[1])
            kc = AsyncKernelClient(context=self._context)
            kc.load_connection_info(info)
            # No heartbeat thread (liveness is the process's), no stdin (cells never read it), no control.
            kc.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
            await _wait_ready(kc, proc, _STARTUP_TIMEOUT)
        except BaseException as exc:  # a failure, or a restart cancelling this start
            if proc is None:
                await asyncio.wait([launch])
                if not launch.cancelled() and launch.exception() is None:
                    proc = launch.result()
            await _discard(proc, kc, files)
            if isinstance(exc, Exception):
                raise SandboxError(f"the Python kernel failed to start: {exc}") from exc
            raise
        self._proc, self._kc, self._files = proc, kc, files

    async def _launch(self, argv: list[str], env: dict[str, str]) -> ProcessHandle:
        if not self._forks.disabled:
            try:
                return ProcessHandle(await self._forks.fork(argv, env, self._cwd, _STARTUP_TIMEOUT))
            except KernelEnvironmentError as exc:
                raise RuntimeError(str(exc)) from None  # a spawned kernel would fail the same way
            except ForkServerError as exc:
                logger.warning("kernel fork server: %s; spawning the kernel instead", exc)
        return ProcessHandle.spawn(argv, env, self._cwd)

    async def _stop(self) -> None:
        """Kill the kernel, and a start still under way (it discards its own kernel)."""
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            # Left running, it would install its kernel after the restart had started another:
            # one of the two would then live on unowned (seen under load as kernels piling up).
            starting.cancel()
            await asyncio.wait([starting])
        proc, kc, files = self._proc, self._kc, self._files
        self._proc = self._kc = None
        self._files = []
        await _discard(proc, kc, files)

    async def _restart_unlocked(self) -> None:
        await self._stop()
        await self._ensure()

    async def restart(self, wait: bool = True) -> None:
        """Kill the kernel and start a fresh one (all state lost).

        A running cell is interrupted first (it answers with its
        KeyboardInterrupt), so a restart never waits out a long cell. With
        ``wait=False`` the new kernel boots in the background and the next
        cell waits for it, and only if a kernel ran or was starting: a box
        whose session ran no Python stays without one until a cell asks.
        """
        if self._lock.locked() and self._proc is not None:
            self._proc.signal(signal.SIGINT)
        async with self._lock:
            had_kernel = self._proc is not None or self._starting is not None
            await self._stop()
            if wait:
                await self._ensure()
            elif had_kernel:
                self.start_background()

    def pid(self) -> Optional[int]:
        """The kernel process's pid (None when no kernel runs)."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def pids(self) -> set[int]:
        """The pids this kernel needs running: the kernel's and its fork server's."""
        return {pid for pid in (self.pid(), self._forks.pid()) if pid is not None}

    async def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.alive()

    def started(self) -> bool:
        """Whether a kernel runs or is starting (a lazy box has none until its first cell)."""
        return self._proc is not None or self._starting is not None

    async def close(self) -> None:
        """Kill the kernel and its fork server for good. Idempotent."""
        self._closed = True
        await self._stop()
        await self._forks.close()
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    # --- cells ---

    async def execute(self, code: str, timeout: float = 60.0) -> dict:
        """Run one cell; returns the /v1/python result dict (never raises for the cell's own failure)."""
        async with self._lock:
            return await self._execute(code, timeout, silent=False)

    async def run_silent(self, code: str, timeout: float = 30.0) -> dict:
        async with self._lock:
            return await self._execute(code, timeout, silent=True)

    async def set_env(self, env: dict[str, str]) -> None:
        """Apply ``env`` to the kernel's ``os.environ`` (silently: no history, no output). Without a
        kernel there is nothing to do: the next one starts with the session env."""
        if not env or self._closed or not self.started():
            return
        payload = json.dumps(json.dumps(env))
        await self.run_silent(f"__import__('os').environ.update(__import__('json').loads({payload}))")

    async def reset_namespace(self, base_env: dict[str, str]) -> None:
        """Forget every variable and put ``os.environ`` back to ``base_env`` (kernel kept; none: nothing to do)."""
        if not self.started():
            return
        payload = json.dumps(json.dumps(base_env))
        await self.run_silent(
            "get_ipython().run_line_magic('reset', '-f')\n"
            f"import os as _o, json as _j; _o.environ.clear(); _o.environ.update(_j.loads({payload})); del _o, _j"
        )

    async def _execute(self, code: str, timeout: float, silent: bool) -> dict:
        start = time.perf_counter()
        await self._ensure()
        proc, kc = self._proc, self._kc
        if not proc.alive():
            # Died between cells (e.g. a thread called os._exit): start fresh before running.
            await self._restart_unlocked()
            proc, kc = self._proc, self._kc
        msg_id = kc.execute(code, silent=silent, store_history=not silent, allow_stdin=False, stop_on_error=False)
        out = _Cell()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        status = "ok"
        while not out.idle:
            remaining = deadline - loop.time()
            if remaining <= 0:
                status = "timeout"
                await self._interrupt(kc, proc, msg_id, out)
                break
            try:
                msg = await _recv(kc.iopub_channel, msg_id, min(remaining, _LIVENESS_EVERY))
            except queue.Empty:
                if not proc.alive():
                    status = "died"
                    break
                continue
            if msg is not None:
                out.take(*msg)
        if status == "died":
            await self._restart_unlocked()
            out.stderr.append(
                "corral: the Python kernel died while running this cell; it was restarted and its state is lost\n"
            )
        elif out.idle:
            await self._drain_reply(kc, msg_id, out)
        if status == "ok" and out.error is not None:
            status = "error"
        return {
            "status": status,
            "stdout": "".join(out.stdout),
            "stderr": "".join(out.stderr),
            "result": out.result,
            "display": out.display,
            "error": out.error if status == "error" else None,
            "execution_count": out.execution_count,
            "duration_ms": (time.perf_counter() - start) * 1000,
        }

    async def _interrupt(self, kc: Any, proc: ProcessHandle, msg_id: str, out: "_Cell") -> None:
        """Interrupt a cell past its deadline; restart the kernel if it does not come back."""
        proc.signal(signal.SIGINT)  # jupyter_client's interrupt_mode "signal": SIGINT to the kernel's group
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _INTERRUPT_GRACE
        # Collect up to idle, but drop the KeyboardInterrupt the interrupt itself raised.
        probe = _Cell()
        while not probe.idle and loop.time() < deadline:
            try:
                msg = await _recv(kc.iopub_channel, msg_id, min(_LIVENESS_EVERY, max(0.01, deadline - loop.time())))
            except queue.Empty:
                if not proc.alive():
                    break
                continue
            if msg is not None:
                probe.take(*msg)
        out.stdout.extend(probe.stdout)
        out.stderr.extend(probe.stderr)
        out.display.extend(probe.display)
        if probe.idle:
            await self._drain_reply(kc, msg_id, out)
        else:
            await self._restart_unlocked()
            out.stderr.append("corral: the kernel did not stop after an interrupt; it was restarted and its state is lost\n")

    @staticmethod
    async def _drain_reply(kc: Any, msg_id: str, out: "_Cell") -> None:
        # The execute_reply normally lands before idle; reading it keeps the shell queue empty.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                reply = await _recv(kc.shell_channel, msg_id, max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return
            if reply is not None:
                count = reply[1].get("execution_count")
                if out.execution_count is None and isinstance(count, int):
                    out.execution_count = count
                return


_DELIM = b"<IDS|MSG>"


async def _recv(channel: Any, msg_id: str, timeout: float) -> Optional[tuple[str, dict]]:
    """The next message on a client channel: ``(msg_type, content)`` if it answers ``msg_id``, else None.

    Raises :class:`queue.Empty` after ``timeout`` seconds without a message.
    The cell path's own reader, about 0.5 ms per cell cheaper than the
    channel's ``get_msg``: one receive instead of a poll plus a receive, no
    date parsing or protocol adaptation, and the content of other cells'
    messages is never decoded. The HMAC signature is still checked.
    """
    future = channel.socket.recv_multipart()
    if not future.done():
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise queue.Empty from None
    frames = future.result()
    try:
        at = frames.index(_DELIM)
        signature, header, parent, metadata, content = frames[at + 1 : at + 6]
    except ValueError:
        logger.warning("kernel: dropped a malformed message (%d frames)", len(frames))
        return None
    session = channel.session
    if session.auth is not None and not hmac.compare_digest(signature, session.sign([header, parent, metadata, content])):
        logger.warning("kernel: dropped a message with a bad signature")
        return None
    if json.loads(parent).get("msg_id") != msg_id:
        return None
    return json.loads(header).get("msg_type", ""), json.loads(content)


async def _wait_ready(kc: Any, proc: ProcessHandle, timeout: float) -> None:
    """Return once the kernel answers on shell and the box's iopub subscription has reached it.

    A kernel_info reply shows the kernel is up. Any iopub message after it (the
    request's busy/idle, or ipykernel's welcome to a new subscriber) shows the
    subscription is live: zmq drops what a kernel publishes before that, so a
    cell sent earlier could lose its output. Without one, ask again.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    answered = False
    while True:
        msg_id = kc.kernel_info()
        if not answered:
            answered = await _reply(kc.shell_channel, msg_id, min(1.0, max(0.01, deadline - loop.time())))
        if answered:
            # Every kernel_info makes the kernel publish busy and idle: the first one that arrives shows
            # the subscription is live. The replies to the asks that went unseen are skipped by later reads.
            try:
                await asyncio.wait_for(kc.iopub_channel.socket.recv_multipart(), _IOPUB_PROBE)
                return
            except asyncio.TimeoutError:
                pass
        if not proc.alive():
            raise RuntimeError("the kernel exited while it started")
        if loop.time() > deadline:
            raise RuntimeError(f"the kernel did not answer in {timeout:.0f} s")


async def _reply(channel: Any, msg_id: str, timeout: float) -> bool:
    """True once ``channel`` delivers the answer to ``msg_id`` within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            if await _recv(channel, msg_id, max(0.001, deadline - loop.time())) is not None:
                return True
        except queue.Empty:
            return False
    return False


async def _discard(proc: Optional[ProcessHandle], kc: Any, files: list[Path]) -> None:
    """Close a kernel's channels, kill its process group and remove its connection file and sockets."""
    if kc is not None:
        try:
            kc.stop_channels()
        except Exception as exc:
            logger.debug("kernel channels: %s", exc)
    if proc is not None:
        await proc.kill()
    for path in files:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class _Cell:
    """What one cell sent on iopub."""

    __slots__ = ("stdout", "stderr", "result", "display", "error", "execution_count", "idle")

    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.result: Optional[dict] = None
        self.display: list[dict] = []
        self.error: Optional[dict] = None
        self.execution_count: Optional[int] = None
        self.idle = False

    def take(self, kind: str, content: dict) -> None:
        if kind == "stream":
            (self.stderr if content.get("name") == "stderr" else self.stdout).append(content.get("text", ""))
        elif kind == "execute_result":
            self.result = content.get("data")
            self.execution_count = content.get("execution_count", self.execution_count)
        elif kind in ("display_data", "update_display_data"):
            self.display.append(content.get("data", {}))
        elif kind == "error":
            self.error = {
                "ename": content.get("ename", ""),
                "evalue": content.get("evalue", ""),
                "traceback": [_strip_ansi(line) for line in content.get("traceback", [])],
            }
        elif kind == "execute_input":
            self.execution_count = content.get("execution_count", self.execution_count)
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle = True
