"""The gateway's front door: one ASGI middleware every HTTP request passes first.

What it owns, per request: the bearer check (every path but ``GET /health``;
the tenant goes into ``scope["state"]["tenant"]``), the body limits (a
``Content-Length`` over the limit answers 413 before a byte is read; a body
that grows past it while streaming raises :class:`PayloadTooLarge`; a body
that pauses longer than ``body_timeout`` raises :class:`BodyTimeout`), the
whole request's deadline (``request_timeout``: 504 if nothing was answered
yet, else the connection is closed), and the access log line.

The access log names the tenant, method, path (never the query string),
status and duration; it never prints a header, so a token cannot reach it.
uvicorn's own access log is turned off where the gateway runs a server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Optional

from corral.errors import CorralError, InvalidRequest, SandboxUnreachable, Unauthorized

from .auth import Tenants
from .settings import GatewaySettings

__all__ = ["Guard", "PayloadTooLarge", "BodyTimeout", "BadRequest", "PROXY_PREFIX", "error_response_parts"]

access_log = logging.getLogger("corral.gateway.access")
logger = logging.getLogger("corral.gateway")

PROXY_PREFIX = "/proxy/"
_OPEN = {("GET", "/health"), ("HEAD", "/health")}


class PayloadTooLarge(InvalidRequest):
    """The request body is larger than the gateway accepts."""

    status = 413


class BodyTimeout(InvalidRequest):
    """The client stopped sending its body."""

    status = 408


class BadRequest(InvalidRequest):
    """The body is not what the route takes (not JSON, not an object)."""

    status = 400


def error_response_parts(exc: CorralError) -> tuple[int, dict, list[tuple[bytes, bytes]]]:
    """(status, body, extra headers) of a corral error on the wire: ``{"error": {code, message, retryable}}``,
    with ``Retry-After`` on 429 and 503."""
    status = exc.status if exc.status >= 400 else 500
    body = {"error": {"code": exc.code, "message": exc.message, "retryable": bool(exc.retryable)}}
    headers = [(b"retry-after", b"1")] if status in (429, 503) else []
    return status, body, headers


async def _reply(send: Any, exc: CorralError, extra: Optional[list] = None) -> None:
    status, body, headers = error_response_parts(exc)
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    *headers, *(extra or [])],
    })
    await send({"type": "http.response.body", "body": payload})


class _Deadline:
    """Cancels the request's task when its time is up (cheaper than a task per request)."""

    __slots__ = ("expired", "_task", "_handle")

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._task = asyncio.current_task()
        self._handle = asyncio.get_running_loop().call_later(seconds, self._fire)

    def _fire(self) -> None:
        self.expired = True
        if self._task is not None:
            self._task.cancel()

    def cancel(self) -> None:
        self._handle.cancel()

    def absorb(self) -> None:
        """The cancellation was ours: the task goes on (to answer 504 or to end quietly)."""
        uncancel = getattr(self._task, "uncancel", None)
        if uncancel is not None:
            uncancel()


class Guard:
    """See the module docstring. ``Guard(app, tenants, settings)``."""

    def __init__(self, app: Any, tenants: Tenants, settings: GatewaySettings) -> None:
        self.app = app
        self.tenants = tenants
        self.settings = settings

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        method, path = scope.get("method", ""), scope.get("path", "")
        started = False
        status = 0
        tenant: Optional[str] = None

        async def send_(message: dict) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        deadline = _Deadline(self.settings.request_timeout)
        try:
            if (method, path) not in _OPEN:
                tenant = self.tenants.authenticate(_header(scope, b"authorization"))
                if tenant is None:
                    await _reply(send_, Unauthorized("missing or wrong bearer token"),
                                 [(b"www-authenticate", b"Bearer")])
                    return
                scope.setdefault("state", {})["tenant"] = tenant
            limit = self.settings.max_upload_bytes if path.startswith(PROXY_PREFIX) else self.settings.max_body_bytes
            length = _header(scope, b"content-length")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    await _reply(send_, BadRequest("Content-Length is not a number"))
                    return
                if n > limit:
                    await _reply(send_, PayloadTooLarge(f"request body of {n} bytes; this route takes at most {limit}"))
                    return
            await self.app(scope, self._receive(receive, limit), send_)
        except asyncio.CancelledError:
            if not deadline.expired:
                raise
            deadline.absorb()
            if not started:
                await _reply(send_, SandboxUnreachable(
                    f"no answer within the gateway's request timeout ({self.settings.request_timeout:g}s)"))
            # else: the answer was under way; ending here closes the connection
        except Exception as e:
            # The app answers its own errors; what reaches here was raised after (or while) answering.
            if not started:
                logger.error("gateway: unexpected %s on %s %s", type(e).__name__, method, path, exc_info=e)
                await _reply(send_, CorralError(f"internal error in the gateway ({type(e).__name__})"))
        finally:
            deadline.cancel()
            access_log.info("%s %s %s %s %.1fms", tenant or "-", method, path, status or "-",
                            (time.perf_counter() - t0) * 1000)

    def _receive(self, receive: Any, limit: int) -> Any:
        more = True
        got = 0
        pause = self.settings.body_timeout

        async def receive_() -> dict:
            nonlocal more, got
            if not more:  # the body is in: what follows is waiting for a disconnect, which has no deadline
                return await receive()
            timer = _Deadline(pause)
            try:
                message = await receive()
            except asyncio.CancelledError:
                if not timer.expired:
                    raise
                timer.absorb()
                raise BodyTimeout(f"the request body stalled for more than {pause:g}s") from None
            finally:
                timer.cancel()
            if message["type"] == "http.request":
                got += len(message.get("body", b""))
                if got > limit:
                    more = False
                    raise PayloadTooLarge(f"request body larger than {limit} bytes")
                more = message.get("more_body", False)
            else:
                more = False
            return message

        return receive_


def _header(scope: dict, name: bytes) -> Optional[str]:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None
