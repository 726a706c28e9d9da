"""``/proxy/{identity}/{path}``: a tenant's HTTP request, forwarded to its sandbox's box.

:class:`BoxProxy` owns the gateway's connections to boxes (one aiohttp
session per event loop; aiohttp costs about a third of httpx's CPU per
request, and a proxy pays it on every tool call). It swaps the tenant's
bearer token for the box's own, forwards method, path, query and body, and
answers with the box's status, headers and body. Bodies stream both ways: an
upload goes to the box as it arrives, a download or an NDJSON shell stream
goes to the client chunk by chunk. Small answers (a tool call's JSON) are read
whole and answered with their length, which costs less than a stream.

The box's token never leaves the gateway: it is only in the request to the box.
A box that does not answer is :class:`corral.SandboxUnreachable` (503,
retryable); a box that refuses its own token is not the sandbox's box any more
(its address was reused) and answers 502.

:class:`Routes` owns the gateway's short-lived memory of where a tenant's
sandbox is (its box's address and token), so a run of tool calls does not ask
the registry once per call. A remembered route is only trusted while the box
takes it: a box that refuses the token (the sandbox was reset or released and
its address reused) or refuses the connection (the sandbox is gone) makes the
gateway forget the route, look the sandbox up again and send the request once
more. Both refusals happen before the box acts on a request, so nothing runs
twice; a request whose body streams (an upload over 1 MiB) is never sent on a
remembered route.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from yarl import URL

from corral.errors import NotFound, SandboxError, SandboxUnreachable

from .settings import GatewaySettings

__all__ = ["BoxProxy", "BOX_PREFIXES", "Routes", "StaleRoute"]

#: Paths a box serves (docs/box-api.md); anything else is not forwarded.
BOX_PREFIXES = ("v1/", "fastapi/")
#: Headers that belong to one hop, not to the request or answer they travel with.
_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade",
})
_NOT_FORWARDED = _HOP | {"host", "authorization", "content-length", "expect"}
_NOT_RETURNED = _HOP | {"server", "date"}
#: Bodies up to this size are sent and answered whole (with their length) rather than streamed.
_WHOLE = 1 << 20
_CHUNK = 1 << 16


class StaleRoute(Exception):
    """A remembered route was refused before the box acted on the request: look again."""


class Routes:
    """(tenant, identity) -> the record a /proxy request goes to, for ``ttl`` seconds (see the
    module docstring). Bounded: the oldest entries go first beyond ``limit``."""

    def __init__(self, ttl: float, limit: int = 10_000, clock=time.monotonic) -> None:
        self.ttl, self.limit, self._clock = ttl, limit, clock
        self._routes: dict[tuple[str, str], tuple[float, dict]] = {}

    def get(self, tenant: str, identity: str) -> dict | None:
        if self.ttl <= 0:
            return None
        entry = self._routes.get((tenant, identity))
        if entry is None:
            return None
        if self._clock() - entry[0] > self.ttl:
            del self._routes[(tenant, identity)]
            return None
        return entry[1]

    def put(self, tenant: str, identity: str, record: dict) -> None:
        if self.ttl <= 0:
            return
        if len(self._routes) >= self.limit:
            for key in list(self._routes)[: max(1, self.limit // 10)]:
                del self._routes[key]
        self._routes[(tenant, identity)] = (self._clock(), record)

    def forget(self, tenant: str, identity: str | None = None) -> None:
        """One route of ``tenant``, or all of them (after an operation that may move its sandboxes)."""
        if identity is not None:
            self._routes.pop((tenant, identity), None)
        else:
            for key in [k for k in self._routes if k[0] == tenant]:
                del self._routes[key]

    @staticmethod
    def reusable(request: Request) -> bool:
        """Whether ``request`` may go on a remembered route: its body can be sent twice."""
        if request.method in ("GET", "HEAD", "DELETE"):
            return True
        length = request.headers.get("content-length")
        return length is not None and length.isdigit() and int(length) <= _WHOLE


class _Raw(Response):
    """A response whose header list is given as is (the box's, minus hop-by-hop headers)."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status_code = status
        self.body = body
        self.background = None
        self.raw_headers = [*headers, (b"content-length", str(len(body)).encode())]


class BoxProxy:
    """Forwards requests to boxes (see the module docstring)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._sessions: dict[int, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.proxy_connect_timeout, sock_read=settings.proxy_read_timeout
        )

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        entry = self._sessions.get(id(loop))
        if entry is None or entry[0] is not loop:
            self._sessions = {k: v for k, v in self._sessions.items() if not v[0].is_closed()}
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1024, limit_per_host=64, keepalive_timeout=30.0),
                trust_env=False,  # boxes are reached directly, never through an HTTP_PROXY
                auto_decompress=False,  # bodies pass through as the box sent them
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
            entry = self._sessions[id(loop)] = (loop, session)
        return entry[1]

    async def aclose(self) -> None:
        """Close the connections of the running loop's session (the others close with their loops)."""
        loop = asyncio.get_running_loop()
        entry = self._sessions.pop(id(loop), None)
        if entry is not None and entry[0] is loop:
            await entry[1].close()

    async def forward(self, request: Request, record: dict, remembered: bool = False) -> Response:
        """Send ``request`` (a ``/proxy/<identity>/<path>`` request) to ``record``'s box.

        ``remembered``: the record is a remembered route (:class:`Routes`); a box that refuses the
        token or the connection raises :class:`StaleRoute` instead of answering."""
        rest = _rest(request)
        if not rest.startswith(BOX_PREFIXES):
            raise NotFound(f"no box route /{rest.split('?')[0]}: a box serves /v1/... and /fastapi/...")
        url = URL(record["url"].rstrip("/") + "/" + rest, encoded=True)
        headers = [(k, v) for k, v in request.headers.items() if k not in _NOT_FORWARDED]
        headers.append(("Authorization", f"Bearer {record['runtime_token']}"))
        body, failure = await self._body(request, headers)
        try:
            upstream = await self._session().request(
                request.method, url, headers=headers, data=body, allow_redirects=False, timeout=self._timeout,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            if failure:  # the client's body failed (too large, stalled): that is the answer
                raise failure[0] from None
            if remembered and isinstance(e, aiohttp.ClientConnectorError):
                raise StaleRoute() from None  # nothing was sent
            raise SandboxUnreachable(
                f"the box of sandbox {record.get('container_name')} did not answer ({type(e).__name__})"
            ) from None
        if failure:
            upstream.release()
            raise failure[0]
        if remembered and upstream.status == 401:
            upstream.release()
            raise StaleRoute()  # the box checks its token before it reads or runs anything
        return await self._answer(upstream, record)

    async def _body(self, request: Request, headers: list) -> tuple[Any, list]:
        """The body to send: bytes when small and known, else an iterator over the client's chunks.

        ``failure`` collects an error the client's body raised while aiohttp was sending it (aiohttp
        reports it as its own failure)."""
        failure: list[BaseException] = []
        if request.method in ("GET", "HEAD"):
            return None, failure
        length = request.headers.get("content-length")
        if length is None and "transfer-encoding" not in request.headers:
            return None, failure
        if length is not None and int(length) <= _WHOLE:
            data = await request.body()
            return (data if data else None), failure
        if length is not None:
            headers.append(("Content-Length", length))  # the box streams a known length to disk

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in request.stream():
                    if chunk:
                        yield chunk
            except BaseException as e:
                failure.append(e)
                raise

        return chunks(), failure

    async def _answer(self, upstream: aiohttp.ClientResponse, record: dict) -> Response:
        status = upstream.status
        if status == 401:  # the box refused its own token: whatever answers there is not this sandbox's box
            upstream.release()
            raise SandboxError(f"the box at sandbox {record.get('container_name')}'s address refused its token")
        headers = [(k.lower(), v) for k, v in upstream.raw_headers if k.decode("latin-1").lower() not in _NOT_RETURNED]
        length = upstream.content_length
        if length is not None and length <= _WHOLE:
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                raise SandboxUnreachable(f"the box of sandbox {record.get('container_name')} broke off its answer "
                                         f"({type(e).__name__})") from None
            finally:
                upstream.release()
            return _Raw(status, [h for h in headers if h[0] != b"content-length"], data)

        # A body of known length goes in large chunks; one of unknown length (an NDJSON shell
        # stream) as each piece arrives, so the client sees output as the command writes it.
        chunks = upstream.content.iter_chunked(_CHUNK) if length is not None else upstream.content.iter_any()

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                upstream.release()

        response = StreamingResponse(stream(), status_code=status)
        response.raw_headers = headers
        return response


def _rest(request: Request) -> str:
    """What follows ``/proxy/<identity>/`` in the raw request target, query included."""
    raw = (request.scope.get("raw_path") or request.scope["path"].encode()).split(b"?")[0]
    parts = raw.decode("latin-1").split("/", 3)  # '', 'proxy', identity, rest
    rest = parts[3] if len(parts) > 3 else ""
    query = request.scope.get("query_string") or b""
    return rest + ("?" + query.decode("latin-1") if query else "")

