"""Runtime shims for the async client (hand-written; scripts/unasync.py skips ``_rt.py``).

The sync side has its own ``_rt.py`` with the same names.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Union

import aiohttp
import httpx

from ...errors import SandboxUnreachable
from .._errors import describe, redact_url

__all__ = ["sleep", "FAST_HTTP", "FastHttp"]

#: The async box client sends its plain-HTTP requests through :class:`FastHttp`.
FAST_HTTP = True

#: Response headers that describe the bytes on the wire, not the body handed over.
_WIRE_HEADERS = {"content-encoding", "transfer-encoding", "content-length"}


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def _params(params: Optional[dict]) -> Optional[dict]:
    """Query values as httpx would write them (aiohttp refuses bools)."""
    if not params:
        return None
    return {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in params.items() if v is not None}


def _timeout(timeout: Union[float, httpx.Timeout]) -> aiohttp.ClientTimeout:
    if isinstance(timeout, httpx.Timeout):
        return aiohttp.ClientTimeout(total=None, sock_connect=timeout.connect, sock_read=timeout.read)
    return aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)


#: What each aiohttp failure was, in the words the httpx path uses for the same failure.
AIOHTTP_FAILURES: tuple = (
    ((aiohttp.ServerTimeoutError, asyncio.TimeoutError), "no answer within the read timeout"),
    (aiohttp.ClientConnectorError, "connection failed"),
    ((aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError), "the connection broke mid-answer"),
)
AIOHTTP_OTHER = "the connection failed during the exchange"


class FastHttp:
    """A box's plain-HTTP calls over aiohttp, answered as ``httpx.Response``.

    Why: in a rollout process every episode shares one event loop, and httpx
    spends ~1.1 ms of CPU on each box call here where aiohttp (already installed
    with Ray) spends ~0.4; each of those milliseconds delays every other
    episode. The answer comes back as an ``httpx.Response`` so that error
    mapping, JSON decoding and result parsing stay one code path for both.

    What it owns: one ``aiohttp.ClientSession`` (its keep-alive pool), made on
    the first request in the running loop, closed by :meth:`aclose`. Transport
    failures raise :class:`corral.SandboxUnreachable`, as httpx's do. Streams
    and uploads still go through httpx.
    """

    def __init__(self, max_connections: int = 64, keepalive_expiry: float = 30.0) -> None:
        self._limit = max_connections
        self._keepalive = keepalive_expiry
        self._session: Optional[aiohttp.ClientSession] = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=self._keepalive),
                trust_env=False,  # a box is reached directly, never through an HTTP_PROXY
                auto_decompress=True,
            )
        return self._session

    async def request(self, method: str, url: str, *, params: Optional[dict], body: Any,
                      headers: dict, timeout: Union[float, httpx.Timeout]) -> httpx.Response:
        try:
            async with self._open().request(
                method, url, params=_params(params), json=body, headers=headers,
                timeout=_timeout(timeout), allow_redirects=False,
            ) as resp:
                content = await resp.read()
                status = resp.status
                raw = [(k, v) for k, v in resp.raw_headers if k.decode("latin-1").lower() not in _WIRE_HEADERS]
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            where = redact_url(url)
            raise SandboxUnreachable(f"{method} {where}: {describe(exc, AIOHTTP_FAILURES, AIOHTTP_OTHER)}", url=where) from exc
        return httpx.Response(status, headers=raw, content=content, request=httpx.Request(method, url))

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
