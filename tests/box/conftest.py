"""Fixtures for the box server's tests.

A module shares one :class:`BoxRuntime` (one kernel boot per module keeps the
suite fast) and talks to it in-process through httpx's ASGI transport. The
runtime is started and closed here, not through the app's lifespan, because
the ASGI transport does not run lifespan events.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_asyncio
from _box_helpers import api_client, make_runtime


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def box_rt(tmp_path_factory):
    """A started runtime (kernel booting in the background), closed after the module."""
    rt = await make_runtime(tmp_path_factory, start=True)
    try:
        yield rt
    finally:
        await rt.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(box_rt):
    async with api_client(box_rt) as client:
        client.rt = box_rt
        client.root = Path(box_rt.workspace.root)
        yield client


@pytest.fixture
def unique(request) -> str:
    """A workspace subdir name unique to the test, so tests sharing a runtime don't collide."""
    return request.node.name.replace("[", "_").replace("]", "_")[:60] + f"-{os.getpid()}"
