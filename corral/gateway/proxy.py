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
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from yarl import URL

from corral.errors import NotFound, SandboxError, SandboxUnreachable

from .settings import GatewaySettings

__all__ = ["BoxProxy", "BOX_PREFIXES"]

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

    async def forward(self, request: Request, record: dict) -> Response:
        """Send ``request`` (a ``/proxy/<identity>/<path>`` request) to ``record``'s box."""
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
            raise SandboxUnreachable(
                f"the box of sandbox {record.get('container_name')} did not answer ({type(e).__name__})"
            ) from None
        if failure:
            upstream.release()
            raise failure[0]
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

