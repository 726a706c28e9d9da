"""The one place where HTTP failures become corral exceptions (client side).

Both the async and the generated sync client route every request through
:func:`transport_errors` and every non-2xx answer through :func:`error_from_response`,
so "the sandbox failed" (:class:`corral.SandboxError`, retryable) stays apart
from "the request was wrong" (4xx) and from "the command failed" (a 200 whose
result's ``check()`` raises). Messages name the URL and what happened and
never carry the token.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..errors import CorralError, InvalidRequest, SandboxError, SandboxUnreachable, from_wire

__all__ = ["transport_errors", "error_from_response", "error_from_body", "decode_json", "parse_model", "expect", "malformed", "redact_url"]


def redact_url(url: str | httpx.URL) -> str:
    """The URL without user:password and without the query string (paths can be long or private)."""
    parts = urlsplit(str(url))
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


#: What each httpx transport failure was, in corral's words (first match wins).
HTTPX_FAILURES: tuple = (
    (httpx.ConnectTimeout, "connect timed out"),
    (httpx.ConnectError, "connection failed"),
    (httpx.ReadTimeout, "no answer within the read timeout"),
    (httpx.WriteTimeout, "sending the request timed out"),
    (httpx.PoolTimeout, "no free connection in the client's pool"),
    (httpx.RemoteProtocolError, "the connection broke mid-answer"),
    ((httpx.ReadError, httpx.WriteError), "the connection failed during the exchange"),
)


def describe(exc: BaseException, table: tuple, default: Optional[str] = None) -> str:
    """A transport failure in corral's words: the first ``(types, wording)`` of ``table`` that
    matches (else ``default``, else the exception's class name), with the library's detail."""
    what = next((w for types, w in table if isinstance(exc, types)), default or type(exc).__name__)
    return with_detail(what, exc)


def with_detail(what: str, exc: BaseException) -> str:
    """``what`` a transport failure was, and the library's own words when they add something."""
    detail = str(exc).strip()
    return f"{what} ({detail})" if detail and detail != what else what


@contextlib.contextmanager
def transport_errors(method: str, url: str | httpx.URL) -> Iterator[None]:
    """Turn httpx's transport failures inside the block into :class:`corral.SandboxUnreachable`."""
    try:
        yield
    except httpx.UnsupportedProtocol as exc:
        raise InvalidRequest(f"cannot reach {redact_url(url)}: {exc}") from None
    except httpx.TransportError as exc:
        raise SandboxUnreachable(f"{method} {redact_url(url)}: {describe(exc, HTTPX_FAILURES)}", url=redact_url(url)) from exc


def error_from_body(body: Any, status: int) -> CorralError:
    """A corral exception for a non-2xx answer's (parsed or raw) body."""
    return from_wire(body, status)


def error_from_response(response: httpx.Response) -> CorralError:
    """A corral exception for a non-2xx answer whose body has been read."""
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        body = response.text
    exc = error_from_body(body, response.status_code)
    if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
        # A non-corral answer (a proxy, a framework default): say where it came from.
        exc.message = f"{response.request.method} {redact_url(response.request.url)}: {exc.message}"
        exc.args = (exc.message,)
    return exc


def decode_json(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer; a box that answers garbage is a failed sandbox."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        snippet = response.text[:200]
        raise SandboxError(
            f"{response.request.method} {redact_url(response.request.url)}: "
            f"expected JSON, got {response.headers.get('content-type', 'no content type')}: {snippet!r}"
        ) from None


def parse_model(model: type, data: Any, response: httpx.Response):
    """``model.model_validate(data)``; an answer of the wrong shape is a failed sandbox, not a crash."""
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SandboxError(
            f"{response.request.method} {redact_url(response.request.url)}: the answer is not a valid "
            f"{model.__name__}: {exc.errors(include_url=False)[:3]}"
        ) from None


def malformed(response: httpx.Response, what: str, data: Any) -> SandboxError:
    """The error for a 2xx answer of the wrong shape: the box is broken, not the caller."""
    return SandboxError(
        f"{response.request.method} {redact_url(response.request.url)}: expected {what}, got {str(data)[:200]!r}"
    )


def expect(data: Any, key: str, kind: type | tuple[type, ...], response: httpx.Response) -> Any:
    """``data[key]`` checked against ``kind``; a missing or mistyped field is a failed sandbox."""
    if isinstance(data, dict) and isinstance(data.get(key), kind):
        return data[key]
    raise malformed(response, f"an object with {key!r}", data)
