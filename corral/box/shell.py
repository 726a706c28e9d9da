"""Shell commands: ``bash -c`` in its own process group, with a timeout and an output cap.

:class:`ShellRunner` owns every process group it starts. A command's group is
tracked from spawn until nothing in it is alive, so background jobs a command
leaves behind (``server &``) are still killed by :meth:`ShellRunner.kill_all`
(the box's reset and shutdown).
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import os
import signal
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional

from .groups import own_group

__all__ = ["ShellRunner", "ShellRequest", "ShellOutcome"]

_READ_SIZE = 1 << 16
#: After the command exits, how long to keep reading pipes that a background
#: child still holds open. Output written before exit is already in the pipe.
_DRAIN_GRACE = 0.05


@dataclass
class ShellRequest:
    command: str
    timeout: float = 60.0
    cwd: Optional[str] = None  # an absolute, already confined path
    env: dict[str, str] = field(default_factory=dict)
    max_output: int = 1 << 20
    stdin: Optional[str] = None
    encoding: str = "text"


@dataclass
class ShellOutcome:
    exit_code: Optional[int]
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool
    duration_ms: float

    def encode(self, encoding: str) -> dict:
        return {
            "exit_code": self.exit_code,
            "stdout": _encode(self.stdout, encoding),
            "stderr": _encode(self.stderr, encoding),
            "timed_out": self.timed_out,
            "truncated": self.truncated,
            "duration_ms": self.duration_ms,
            "encoding": encoding,
        }


def _encode(data: bytes, encoding: str) -> str:
    if encoding == "base64":
        return base64.b64encode(data).decode("ascii")
    return data.decode("utf-8", errors="replace")


class _Capped:
    """One output stream: keeps the first ``cap`` bytes, counts the rest, never stops reading."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[bytes] = []
        self.kept = 0
        self.truncated = False

    def feed(self, chunk: bytes) -> bytes:
        """Keep what fits; returns the kept part (for streaming)."""
        room = self.cap - self.kept
        if room <= 0:
            self.truncated = True
            return b""
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:room]
        self.parts.append(chunk)
        self.kept += len(chunk)
        return chunk

    def value(self) -> bytes:
        return b"".join(self.parts)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists but not ours any more (pid reuse): not ours to track
        return False
    return _has_live_member(pgid)


def _has_live_member(pgid: int) -> bool:
    """Whether the group has a member that is not a zombie.

    Killed orphans stay zombies until init reaps them, and some sandbox inits
    are slow to; ``killpg(pgid, 0)`` alone would count those as alive.
    """
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return True  # no /proc: trust killpg
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state, ppid, pgrp, ...
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def _kill_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class ShellRunner:
    """Runs shell commands for the box and owns their process groups.

    ``base_env`` is a callable so the session env (which changes at runtime)
    is read at each spawn.
    """

    def __init__(self, default_cwd: str, base_env: Callable[[], dict[str, str]]) -> None:
        self._default_cwd = default_cwd
        self._base_env = base_env
        self._groups: set[int] = set()
        self._feeders: set[asyncio.Task] = set()

    @property
    def live_groups(self) -> int:
        self._prune()
        return len(self._groups)

    def _prune(self) -> None:
        for pgid in list(self._groups):
            if not _group_alive(pgid):
                self._groups.discard(pgid)

    def kill_all(self) -> int:
        """SIGKILL every process group still alive; returns how many groups were signalled."""
        killed = 0
        for pgid in list(self._groups):
            if _kill_group(pgid):
                killed += 1
            self._groups.discard(pgid)
        return killed

    async def _spawn(self, req: ShellRequest) -> asyncio.subprocess.Process:
        env = {**self._base_env(), **req.env}
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            req.command,
            stdin=asyncio.subprocess.PIPE if req.stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=req.cwd or self._default_cwd,
            env=env,
            **own_group(),  # its own group, so a timeout can kill the whole tree
        )
        # The child leads its group: its pid is the group's id.
        self._groups.add(proc.pid)
        if req.stdin is not None:
            # Held in a set: the loop keeps only weak references to tasks.
            task = asyncio.ensure_future(self._feed_stdin(proc, req.stdin.encode("utf-8")))
            self._feeders.add(task)
            task.add_done_callback(self._feeders.discard)
        return proc

    @staticmethod
    async def _feed_stdin(proc: asyncio.subprocess.Process, data: bytes) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command did not read its input; not an error
        finally:
            try:
                proc.stdin.close()
            except Exception:
                pass

    def _finish(self, proc: asyncio.subprocess.Process) -> None:
        # Background jobs may outlive bash; keep the group tracked while they do.
        if not _group_alive(proc.pid):
            self._groups.discard(proc.pid)

    async def run(self, req: ShellRequest) -> ShellOutcome:
        """Run to completion or timeout; a failing command is an outcome, not an exception."""
        start = time.perf_counter()
        proc = await self._spawn(req)
        out, err = _Capped(req.max_output), _Capped(req.max_output)

        async def pump(reader: asyncio.StreamReader, sink: _Capped) -> None:
            while True:
                chunk = await reader.read(_READ_SIZE)
                if not chunk:
                    return
                sink.feed(chunk)

        readers = [asyncio.ensure_future(pump(proc.stdout, out)), asyncio.ensure_future(pump(proc.stderr, err))]
        timed_out = await self._wait(proc, readers, req.timeout, start)
        return ShellOutcome(
            exit_code=None if timed_out else proc.returncode,
            stdout=out.value(),
            stderr=err.value(),
            timed_out=timed_out,
            truncated=out.truncated or err.truncated,
            duration_ms=(time.perf_counter() - start) * 1000,
        )

    async def _wait(self, proc: asyncio.subprocess.Process, readers: list, timeout: float, start: float) -> bool:
        """Wait for exit (and the pipes' end), or kill the group at the deadline. True if it timed out."""
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                timed_out = True
                _kill_group(proc.pid)
                await proc.wait()
            _, pending = await asyncio.wait(readers, timeout=1.0 if timed_out else _DRAIN_GRACE)
            for task in pending:
                task.cancel()
            return timed_out
        except BaseException:
            # Cancelled (client went away, box shutting down): the command must not outlive the call.
            _kill_group(proc.pid)
            for task in readers:
                task.cancel()
            raise
        finally:
            self._finish(proc)

    async def stream(self, req: ShellRequest) -> AsyncIterator[dict]:
        """Yield ``{"stream", "data"}`` chunks as they arrive, then the final status dict.

        If the consumer stops early (the HTTP client disconnected), the command's
        group is killed.
        """
        start = time.perf_counter()
        proc = await self._spawn(req)
        out, err = _Capped(req.max_output), _Capped(req.max_output)
        queue: asyncio.Queue = asyncio.Queue()
        encoding = req.encoding

        async def pump(reader: asyncio.StreamReader, sink: _Capped, name: str) -> None:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            try:
                while True:
                    chunk = await reader.read(_READ_SIZE)
                    if not chunk:
                        break
                    kept = sink.feed(chunk)
                    if kept:
                        if encoding == "base64":
                            queue.put_nowait((name, base64.b64encode(kept).decode("ascii")))
                        else:
                            text = decoder.decode(kept)
                            if text:
                                queue.put_nowait((name, text))
                if encoding != "base64":
                    tail = decoder.decode(b"", final=True)
                    if tail:
                        queue.put_nowait((name, tail))
            finally:
                queue.put_nowait(None)

        readers = [
            asyncio.ensure_future(pump(proc.stdout, out, "stdout")),
            asyncio.ensure_future(pump(proc.stderr, err, "stderr")),
        ]
        waiter = asyncio.ensure_future(self._wait(proc, readers, req.timeout, start))
        try:
            open_readers = len(readers)
            while open_readers:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break  # the waiter finished (exit + drain, or timeout): pending pipes were abandoned
                item = getter.result()
                if item is None:
                    open_readers -= 1
                    continue
                line = {"stream": item[0], "data": item[1]}
                if encoding == "base64":
                    line["encoding"] = "base64"
                yield line
            timed_out = await waiter
            # Anything queued between the last get and the end of the wait.
            while not queue.empty():
                item = queue.get_nowait()
                if item is not None:
                    line = {"stream": item[0], "data": item[1]}
                    if encoding == "base64":
                        line["encoding"] = "base64"
                    yield line
            yield {
                "exit_code": None if timed_out else proc.returncode,
                "timed_out": timed_out,
                "truncated": out.truncated or err.truncated,
                "duration_ms": (time.perf_counter() - start) * 1000,
            }
        finally:
            if not waiter.done():
                waiter.cancel()
                _kill_group(proc.pid)
                for task in readers:
                    task.cancel()
