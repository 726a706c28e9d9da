"""Who may call the box: the token rule, the gate every request passes, and token rotation.

- :func:`check_token` is the one rule a box token follows (at box start, in
  ``create_app`` and in a reset's new token): at least
  :data:`MIN_TOKEN_LENGTH` visible ASCII characters, no whitespace. A token a
  header cannot carry unchanged, or one short enough to guess, is refused.
- :class:`TokenGate` owns the token the box accepts now, which calls it let in
  (so a reset can end them) and the reset that hands the box to its next
  session under a new token (:meth:`TokenGate.rotate`).
- :class:`AuthMiddleware` is the outermost layer of the app: a request without
  the token is answered 401 before anything else sees it, so it neither counts
  as activity nor reaches a route.

This module imports no web framework: the client checks a new token with the
same :func:`check_token` before it sends one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Awaitable, Callable, Optional, TypeVar

from ..errors import Conflict, InvalidRequest, Unauthorized, to_wire

__all__ = ["MIN_TOKEN_LENGTH", "MAX_TOKEN_LENGTH", "token_problem", "check_token", "TokenGate", "AuthMiddleware"]

T = TypeVar("T")

#: Shortest token the box accepts: 16 characters of even a hex alphabet are 64 bits.
MIN_TOKEN_LENGTH = 16
#: Longest: a token travels in every request's header.
MAX_TOKEN_LENGTH = 4096
#: How long a reset waits for the calls it cancelled to unwind before it wipes the box.
END_CALLS_TIMEOUT = 5.0
#: The scope key under which the gate records the token generation a request was admitted with.
GENERATION_KEY = "corral.token_generation"


def token_problem(token: object) -> Optional[str]:
    """What is wrong with ``token`` as a box token, or None when it is fine."""
    if not isinstance(token, str):
        return f"must be a string, got {type(token).__name__}"
    if not token.strip():
        return "is empty or only whitespace"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"is {len(token)} characters long; a box token needs at least {MIN_TOKEN_LENGTH}"
    if len(token) > MAX_TOKEN_LENGTH:
        return f"is {len(token)} characters long; at most {MAX_TOKEN_LENGTH}"
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        # An HTTP header strips surrounding blanks and cannot carry control characters:
        # such a token could never match, or would match a different one.
        return "must be visible ASCII characters only (no whitespace or control characters)"
    return None


def check_token(token: object, what: str = "token") -> str:
    """``token`` if it is a valid box token, else :class:`InvalidRequest` saying why."""
    problem = token_problem(token)
    if problem is not None:
        raise InvalidRequest(f"{what} {problem}")
    return token  # type: ignore[return-value]


def _expected(token: str) -> bytes:
    return f"Bearer {token}".encode("ascii")


class _Call:
    __slots__ = ("task", "ended_by_reset")

    def __init__(self, task: "asyncio.Task[Any]") -> None:
        self.task = task
        self.ended_by_reset = False


class TokenGate:
    """The token the box accepts, the calls it admitted, and the reset that rotates the token.

    ``generation`` counts the tokens the gate has opened with; each admitted call
    carries the generation it came in under, so a reset admitted under an older
    token (a race between two resets) cannot complete.
    """

    def __init__(self, token: str) -> None:
        self._expected: Optional[bytes] = _expected(check_token(token))
        self.generation = 1
        self._calls: set[_Call] = set()
        self._lock = asyncio.Lock()

    @property
    def open(self) -> bool:
        """False while a reset runs: then no token at all is accepted."""
        return self._expected is not None

    def admits(self, authorization: bytes) -> bool:
        """Whether a request with this ``Authorization`` header value may proceed."""
        expected = self._expected
        # Constant time, so the token cannot be guessed byte by byte from timings.
        return expected is not None and hmac.compare_digest(authorization, expected)

    def enter(self, task: "asyncio.Task[Any]") -> _Call:
        call = _Call(task)
        self._calls.add(call)
        return call

    def leave(self, call: _Call) -> None:
        self._calls.discard(call)

    async def rotate(self, generation: int, work: Callable[[], Awaitable[T]], token: Optional[str] = None) -> T:
        """Run a reset (``work``) with the gate shut, then open it to ``token`` (None: the same token).

        From the moment the reset starts no token is accepted, and every other
        call still running (the previous session's) is cancelled, so nothing the
        previous session sent can land after the wipe. The new token is accepted
        once ``work`` has finished, never before. A reset that fails leaves the
        token as it was.
        """
        if token is not None:
            check_token(token, "token")
        async with self._lock:
            if generation != self.generation or self._expected is None:
                raise Unauthorized("the box's token changed while this reset waited; it was not applied")
            old = self._expected
            self._expected = None
            try:
                await self._end_calls()
                result = await work()
            except BaseException:
                self._expected = old
                self.generation += 1
                raise
            self._expected = old if token is None else _expected(token)
            self.generation += 1
            return result

    async def _end_calls(self) -> None:
        me = asyncio.current_task()
        others = [c for c in self._calls if c.task is not me and not c.task.done()]
        for call in others:
            call.ended_by_reset = True
            call.task.cancel()
        if others:
            await asyncio.wait([c.task for c in others], timeout=END_CALLS_TIMEOUT)


def _json_response(status: int, body: dict) -> tuple[dict, dict]:
    data = json.dumps(body).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
    }
    return start, {"type": "http.response.body", "body": data, "more_body": False}


class AuthMiddleware:
    """ASGI middleware, outermost: 401 for every request without the token, on every path.

    An admitted call is registered with the gate for its whole life, so a reset
    can cancel it; a call a reset cancelled ends with 409 (or, when its response
    had already begun, with the end of that response) instead of an error trace.
    """

    def __init__(self, app: Callable[..., Awaitable[Any]], gate: TokenGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = b""
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                authorization = value
                break
        if not self.gate.admits(authorization):
            status, body = to_wire(Unauthorized("missing or wrong bearer token"))
            for message in _json_response(status, body):
                await send(message)
            return
        scope.setdefault("state", {})[GENERATION_KEY] = self.gate.generation
        task = asyncio.current_task()
        if task is None:  # not inside a task (never under an ASGI server): nothing to cancel
            await self.app(scope, receive, send)
            return
        call = self.gate.enter(task)
        started = False
        finished = False

        async def tracked_send(message: dict) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if not call.ended_by_reset:
                raise
            # Cancelled by the reset, not by the server: answer, and let the task go on.
            task.uncancel()
            if not started:
                status, body = to_wire(Conflict("the box was reset while this call ran; the call was ended"))
                for message in _json_response(status, body):
                    await send(message)
            elif not finished:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.gate.leave(call)

