"""What every httpx client corral makes shares: one TLS context, and the transport's imports.

httpx builds a new SSL context for each client it creates, loading the CA
bundle each time: about 30 ms of CPU here. corral makes clients in every
manager, box client, pool, session actor and readiness poll, and boxes answer
plain HTTP on 127.0.0.1, so that cost bought nothing. The context built once
here is the one httpx would build (certificate checks on), shared: an
``ssl.SSLContext`` serves any number of connections.

httpx also imports its async transport (httpcore's anyio backend) on a
client's first request, another ~30 ms: in a rollout process that lands on the
first tool call of the first wave, while every other episode of the wave waits
for the event loop. :func:`preload_transport` does those imports up front.
"""

from __future__ import annotations

import functools
import importlib
import ssl

__all__ = ["tls_context", "preload_transport"]


@functools.lru_cache(maxsize=None)
def tls_context() -> ssl.SSLContext:
    import httpx

    return httpx.create_ssl_context()


@functools.lru_cache(maxsize=None)
def preload_transport() -> None:
    """Import what an async httpx client imports on its first request (once per process)."""
    for name in ("httpcore._backends.anyio", "anyio._backends._asyncio", "anyio.lowlevel"):
        try:
            importlib.import_module(name)
        except ImportError:  # another httpx/anyio layout: it imports them itself when needed
            pass
