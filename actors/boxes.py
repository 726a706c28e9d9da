"""Boxes: a pool's HTTP calls to the boxes of its sandboxes.

What it owns: the HTTP clients (kept alive, TLS as the namespace says) a PoolActor uses for
its boxes, and the two calls it makes on them: the health probe of a warm sandbox's box
(:meth:`healthy`) and the reset that wipes a released one and gives it its next token
(:meth:`reset`). Whom to probe or reset, and what an answer means, is the registry's decision.

Probes go through an aiohttp session of their own, at most :data:`MAX_PROBES` at once. Its
keep-alive pool holds a connection to each box probed in the last 30 s: the registry probes a
warm box every 5 s, or every n/20 s with n warm boxes on the node (``corral.core.health``), so
steady probing reuses them, and that cap bounds how many there are. Not httpx: an httpx pool walks
all its connections, for each of them, on every request; with hundreds of boxes a probe costs tens
of milliseconds of CPU there, a fraction of one here.
"""

from __future__ import annotations

import asyncio
from typing import Any

from corral.client._http import tls_context
from corral.models import ContainerModel

__all__ = ["Boxes", "MAX_PROBES"]

#: Health probes a pool has in flight at once.
MAX_PROBES = 16
#: Seconds a probe waits for its box's answer.
PROBE_TIMEOUT = 5.0


class Boxes:
    """See the module docstring."""

    def __init__(self) -> None:
        self._http: Any = None
        self._probe_http: Any = None
        self._probing = asyncio.Semaphore(MAX_PROBES)

    def client(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=5.0, trust_env=False, verify=tls_context(),
                                           limits=httpx.Limits(keepalive_expiry=30.0))
        return self._http

    def _probe_session(self) -> Any:
        if self._probe_http is None:
            import aiohttp

            self._probe_http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_PROBES, keepalive_timeout=30.0, ssl=tls_context()),
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT),
                trust_env=False,  # a box is reached directly, never through an HTTP_PROXY
            )
        return self._probe_http

    async def healthy(self, rec: ContainerModel) -> bool:
        """Whether the box answers its health route (any failure is no)."""
        if not rec.url:
            return False
        async with self._probing:
            try:
                async with self._probe_session().get(
                        f"{rec.url}/v1/healthz", headers={"Authorization": f"Bearer {rec.runtime_token}"},
                        allow_redirects=False) as r:
                    await r.read()
                    return r.status == 200
            except Exception:
                return False

    async def reset(self, rec: ContainerModel, restart_kernel: bool, token: str) -> None:
        """Wipe the box for its next session, which holds ``token`` (raises when it fails)."""
        from corral.client import AsyncBoxClient

        async with AsyncBoxClient(rec.url, rec.runtime_token, http_client=self.client()) as box:
            # Clean is enough to be WARM again: the old session's processes are dead and its
            # files gone, and the new kernel, forked after that, boots while the sandbox waits
            # in the pool (the next session's first cell waits for the boot if needed).
            await box.reset(restart_kernel=restart_kernel, token=token)
