"""Fixtures of the gateway's tests: tokens of two tenants, the app in-process, a real uvicorn server.

The app always sits in front of a real corral backend on the session's Ray
cluster (``make_manager``: the process driver, a namespace of the test's
own, everything torn down after).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

import httpx
import pytest


@dataclass
class Tokens:
    a: str
    b: str
    a2: str  # tenant a's second token (rotation)

    @property
    def text(self) -> str:
        return f"# tenants of the tests\nalpha {self.a}\nbeta {self.b}\n\nalpha {self.a2}\n"

    def auth(self, token: str) -> dict:
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tokens() -> Tokens:
    return Tokens(secrets.token_hex(24), secrets.token_hex(24), secrets.token_hex(24))


@pytest.fixture
def backend(make_manager):
    """A corral namespace with a warm pool of two reused sandboxes (process driver)."""
    from corral.models import SandboxTypeConfig

    m = make_manager(pool_size=2, sandbox_types={"base": SandboxTypeConfig(name="base", reuse=True)})
    m.reserve(n=0, wait=True, timeout=120)
    return m


@pytest.fixture
async def make_app(tokens):
    """``make_app(backend, **settings)``: the app and an httpx client over its ASGI transport."""
    from corral.gateway import GatewaySettings, create_app

    made = []

    def make(backend, **settings):
        app = create_app(backend, tokens.text, GatewaySettings(**settings))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        made.append((app, client))
        return app, client

    yield make
    for app, client in made:
        await client.aclose()
        await app.state.proxy.aclose()


class ThreadServer:
    """The app under a real uvicorn on 127.0.0.1, in a thread of the test process."""

    def __init__(self, app, port: int = 0, settings=None, certfile=None, keyfile=None) -> None:
        import uvicorn

        from corral.gateway import GatewaySettings
        from corral.gateway.server import bind, uvicorn_config

        self.config = uvicorn_config(app, "127.0.0.1", port, settings or GatewaySettings(), certfile, keyfile)
        self.sock = bind(self.config, retry_for=10.0)
        self.port = self.sock.getsockname()[1]
        self.url = f"{'https' if certfile else 'http'}://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the gateway server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "the gateway server did not stop"


@pytest.fixture
def serve(tokens):
    """``serve(backend, port=0, **settings)``: the app on a real uvicorn; stopped after the test."""
    from corral.gateway import GatewaySettings, create_app

    servers = []

    def start(backend, port: int = 0, certfile=None, keyfile=None, **settings):
        s = GatewaySettings(**settings)
        srv = ThreadServer(create_app(backend, tokens.text, s), port, s, certfile, keyfile)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        if srv.thread.is_alive():
            srv.stop()

