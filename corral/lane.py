"""The registry's lane: acquire and release batches over a Unix socket on its node.

A Ray actor call costs ~2.5 ms round trip on a 2-core VM (the call is handed
between three threads on each side); a Unix socket between two event loops
costs ~0.4 ms. Callers on the registry's node send their acquire and release
batches this way. Every other call, and every caller on another node, uses the
actor handle. The lane runs the very same registry methods on the registry's
event loop, between its Ray calls, so the state machine sees no difference.
Discovery goes through the actor handle (``lane_address``); a registry restart
makes a new socket and a new token.

Wire: each frame is a 4-byte big-endian length, then a UTF-8 JSON object::

    client -> {"token": "..."}                 first frame; a wrong token closes the socket
    server -> {"ok": true}
    client -> {"id": 7, "op": "acquire", "args": [...]}
    server -> {"id": 7, "result": ...}  or  {"id": 7, "error": {"code": ..., "message": ...}}

Replies may come out of order (matched by ``id``). A corral error inside a result
list travels as ``{"corral_error": {"code", "message"}}``.

Trust: the socket lives in a directory only its user can enter (like Ray's own
sockets), and the token (sent to callers through Ray) keeps out anything else.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import secrets
import stat
import struct
import tempfile
from typing import Any, Awaitable, Callable, Optional

from corral.errors import CorralError, InvalidRequest, SandboxError, error_class

__all__ = ["LaneServer", "LaneClient", "LaneLost", "lane_dir", "MAX_FRAME"]

logger = logging.getLogger("corral.lane")

MAX_FRAME = 16 * 1024 * 1024
AUTH_TIMEOUT = 5.0
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with its NUL
_HEADER = struct.Struct("!I")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class LaneLost(Exception):
    """The lane closed with the request in flight: whether it ran is unknown, as with a Ray
    call to an actor that died (the caller re-sends it over Ray, as Ray would retry it)."""


def lane_dir() -> str:
    """This user's directory for lane sockets (created 0700; refused if anyone else can enter it)."""
    path = os.path.join(tempfile.gettempdir(), f"corral-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{path} must be a directory of uid {os.getuid()} with mode 0700")
    return path


def _pack(obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader) -> Any:
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes exceeds {MAX_FRAME}")
    return json.loads(await reader.readexactly(n))


def _encode_result(result: Any) -> Any:
    if isinstance(result, list):
        return [{"corral_error": x.to_dict()} if isinstance(x, CorralError) else x for x in result]
    return result


def _decode_error(err: Any) -> CorralError:
    if not isinstance(err, dict):
        return SandboxError(f"malformed lane error: {str(err)[:200]}")
    return error_class(str(err.get("code", "")))(str(err.get("message", "")))


def _decode_result(result: Any) -> Any:
    if isinstance(result, list):
        return [_decode_error(x["corral_error"]) if isinstance(x, dict) and "corral_error" in x else x
                for x in result]
    return result


def _sweep(directory: str) -> None:
    """Remove sockets left by processes that are gone (a killed actor cannot remove its own)."""
    for name in os.listdir(directory):
        m = re.search(r"-(\d+)\.sock$", name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
        except PermissionError:
            pass  # alive, someone else's


class LaneServer:
    """Serves named async operations over a Unix socket.

    What it owns: the listening socket (its file too), its token, the allowlist of
    operations and the count of requests served. Requests run as tasks on the loop
    that started the server, in the order they arrive.
    """

    def __init__(self, ops: dict[str, Callable[..., Awaitable[Any]]], tag: str) -> None:
        self._ops = dict(ops)
        self._tag = _UNSAFE.sub("_", tag)[:40] or "lane"
        self.token = secrets.token_urlsafe(32)
        self.path: Optional[str] = None
        self.served = 0
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        """Listen; returns the socket's path. Raises OSError when no socket can be made here."""
        directory = lane_dir()
        _sweep(directory)
        path = os.path.join(directory, f"{self._tag}-{os.getpid()}.sock")
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise OSError(f"socket path too long for AF_UNIX: {path}")
        if os.path.exists(path):
            os.unlink(path)
        self._server = await asyncio.start_unix_server(self._serve, path)
        os.chmod(path, 0o600)
        self.path = path
        return path

    def close(self) -> None:
        """Stop listening and drop every connection (their callers see :class:`LaneLost`)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            hello = await asyncio.wait_for(_read(reader), AUTH_TIMEOUT)
            token = hello.get("token") if isinstance(hello, dict) else None
            if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self.token.encode()):
                logger.warning("lane: refused a connection with a wrong token")
                return
            writer.write(_pack({"ok": True}))
            while True:
                msg = await _read(reader)
                task = asyncio.ensure_future(self._run(msg, writer))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass  # the caller went away (or never said who it is)
        except (ValueError, AttributeError) as e:
            logger.warning("lane: dropped a connection that sent a malformed frame: %s", e)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _run(self, msg: dict, writer: asyncio.StreamWriter) -> None:
        rid = msg.get("id") if isinstance(msg, dict) else None
        try:
            op = self._ops.get(msg.get("op")) if isinstance(msg, dict) else None
            args = msg.get("args", []) if isinstance(msg, dict) else None
            if op is None or not isinstance(args, list):
                raise InvalidRequest(f"the lane has no operation {msg.get('op') if isinstance(msg, dict) else msg!r}")
            reply = {"id": rid, "result": _encode_result(await op(*args))}
        except CorralError as e:
            reply = {"id": rid, "error": e.to_dict()}
        except Exception as e:  # the Ray path would raise it in the caller: say what it was
            logger.exception("lane: %s failed", msg.get("op") if isinstance(msg, dict) else "request")
            reply = {"id": rid, "error": SandboxError(f"registry failed: {e!r}").to_dict()}
        self.served += 1
        if not writer.is_closing():
            writer.write(_pack(reply))


class LaneClient:
    """One connection to a lane, shared by the coroutines of one event loop.

    What it owns: the connection, its reader task and the futures of the requests in
    flight (by id). When the connection ends, every request in flight fails with
    :class:`LaneLost` and the client is closed for good (make a new one).
    """

    def __init__(self) -> None:
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next = 0
        self._task: Optional[asyncio.Task] = None
        self.closed = False

    @classmethod
    async def connect(cls, path: str, token: str, timeout: float = AUTH_TIMEOUT) -> "LaneClient":
        """Connect and authenticate. Raises OSError (no such lane) or PermissionError (token refused)."""
        self = cls()
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
        try:
            writer.write(_pack({"token": token}))
            ok = await asyncio.wait_for(_read(reader), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            raise PermissionError(f"the lane at {path} refused this caller's token") from None
        except BaseException:
            writer.close()
            raise
        if ok != {"ok": True}:
            writer.close()
            raise PermissionError(f"the lane at {path} answered {str(ok)[:100]}")
        self._reader, self._writer = reader, writer
        self._task = asyncio.ensure_future(self._receive())
        return self

    async def call(self, op: str, *args: Any) -> Any:
        """The operation's result; its corral error raised; :class:`LaneLost` if the lane closed."""
        if self.closed:
            raise LaneLost("the lane is closed")
        self._next += 1
        rid = self._next
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._writer.write(_pack({"id": rid, "op": op, "args": list(args)}))
            return await fut
        finally:
            self._pending.pop(rid, None)

    async def _receive(self) -> None:
        why: BaseException = LaneLost("the lane closed")
        try:
            while True:
                msg = await _read(self._reader)
                fut = self._pending.get(msg.get("id"))
                if fut is None or fut.done():
                    continue  # its caller was cancelled
                if "error" in msg:
                    fut.set_exception(_decode_error(msg["error"]))
                else:
                    fut.set_result(_decode_result(msg.get("result")))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, AttributeError) as e:
            why = LaneLost(f"the lane closed: {e!r}")
        except asyncio.CancelledError:
            why = LaneLost("the lane was closed by its owner")
            raise
        finally:
            self._shut(why)

    def _shut(self, why: BaseException) -> None:
        self.closed = True
        if self._writer is not None:
            self._writer.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(why)
        self._pending.clear()

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._shut(LaneLost("the lane was closed by its owner"))
        if self._writer is not None:
            try:
                await self._writer.wait_closed()
            except (ConnectionError, OSError):
                pass
