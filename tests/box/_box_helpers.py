"""Helpers shared by the box server's tests (imported by conftest and the test modules)."""

from __future__ import annotations

import httpx
import pytest

from corral.box.app import create_app
from corral.box.runtime import BoxRuntime

__all__ = ["TOKEN", "AUTH", "process_alive", "make_runtime", "api_client"]

TOKEN = "box-test-token-7c1f"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


async def make_runtime(tmp_path_factory: pytest.TempPathFactory, start: bool) -> BoxRuntime:
    rt = BoxRuntime(tmp_path_factory.mktemp("ws"), tmp_path_factory.mktemp("home"))
    if start:
        await rt.start()
    return rt


def api_client(rt: BoxRuntime, token: str | None = TOKEN) -> httpx.AsyncClient:
    app = create_app(rt, TOKEN)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # raise_app_exceptions=False: the 500 handler's answer is what a real client sees.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://box.test", headers=headers, timeout=120)


