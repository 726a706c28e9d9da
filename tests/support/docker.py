"""Shared helpers for the tests that need a real Docker engine.

Imported as ``tests.support.docker`` by every test layer that starts containers. It owns:

- :func:`require_docker`: the engine and the box image must be there. Missing
  either FAILS the test when ``CORRAL_REQUIRE_DOCKER=1`` (CI sets it) and
  skips it otherwise, with the reason and the command that fixes it.
- :class:`Tracker`: every container (or process-driver box) a test makes is
  recorded and removed at teardown, whatever the test did; :func:`closing`
  closes a driver when its block ends.
- :func:`leak_check`: at the end of the session, no container labelled
  ``corral.managed`` that was not there at its start may remain (those found
  are removed, then reported); then the tests' Docker network and its
  iptables rules are removed.
- :func:`driver_config`: the Docker driver's settings for tests: a network of
  the tests' own (:data:`TEST_NETWORK`, :data:`TEST_SUBNET`), never the
  production one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from typing import Any, AsyncIterator, Iterator, Optional

import pytest

from corral.drivers.base import ContainerHandle, ContainerSpec, Driver

__all__ = ["IMAGE", "require_docker", "docker_problem", "Tracker", "closing", "leak_check", "unique_name",
           "driver_config", "BOX_TOKEN", "BOX_AUTH", "box_spec", "TEST_NETWORK", "TEST_SUBNET", "teardown_network"]

IMAGE = os.environ.get("CORRAL_IMAGE", "corral-box:latest")
MANAGED = "corral.managed=true"
#: The Docker network (and bridge, and iptables chains) the driver tests use: their own subnet.
TEST_NETWORK = "corral-test"
TEST_SUBNET = "10.214.0.0/24"


#: The box token of the containers the docker tests make, and the header that carries it.
BOX_TOKEN = "docker-test-token-5b1e"
BOX_AUTH = {"Authorization": f"Bearer {BOX_TOKEN}"}


def box_spec(image: str, prefix: str = "d", **kw: Any) -> ContainerSpec:
    """A sandbox of ``image`` with :data:`BOX_TOKEN`, named :func:`unique_name` of ``prefix`` unless ``kw`` names it."""
    kw.setdefault("name", unique_name(prefix))
    return ContainerSpec(image=image, token=BOX_TOKEN, **kw)


def driver_config(**kw: Any):
    """DockerDriverConfig on the tests' own network unless ``kw`` says otherwise."""
    from corral.drivers.config import DockerDriverConfig

    kw.setdefault("network_name", TEST_NETWORK)
    kw.setdefault("subnet", TEST_SUBNET)
    return DockerDriverConfig(**kw)


def teardown_network(config=None) -> None:
    """Remove a test network, its rules and its lock file (idempotent), with a driver of its own."""
    from corral.drivers.docker import DockerDriver
    from corral.drivers.netpolicy import NodeLock

    config = config or driver_config()

    async def run() -> None:
        driver = DockerDriver(config)
        try:
            await driver.teardown_network()
        finally:
            await driver.close()

    asyncio.run(run())
    # Test sessions run one at a time (the heavy lock): nobody else waits on this file.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(NodeLock(config.network_name).path)


def _client():
    import docker

    return docker.from_env(timeout=30)


def docker_problem() -> Optional[str]:
    """Why the docker tests cannot run here, or None when they can."""
    try:
        import docker
    except ImportError:
        return "docker-py is not installed (pip install docker)"
    try:
        client = _client()
        client.ping()
    except Exception as e:  # any failure to reach the engine means the same thing here
        return f"no Docker engine answers ({e}); run scripts/docker-engine.sh"
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        return f"image {IMAGE} is missing; run scripts/build-image.sh"
    finally:
        client.close()
    return None


def require_docker() -> None:
    """Fail (CI) or skip (elsewhere) unless the engine and the image are there."""
    problem = docker_problem()
    if problem is None:
        return
    if os.environ.get("CORRAL_REQUIRE_DOCKER") == "1":
        pytest.fail(f"CORRAL_REQUIRE_DOCKER=1 but {problem}", pytrace=False)
    pytest.skip(problem)


def unique_name(prefix: str = "t") -> str:
    return f"corral-{prefix}-{uuid.uuid4().hex[:10]}"


class Tracker:
    """Creates sandboxes through a driver and removes every one at teardown."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.ids: list[str] = []

    async def create(self, spec: ContainerSpec) -> ContainerHandle:
        # Recorded by name before the call: a create that half-succeeds and
        # then raises must still be cleaned up (the name finds it).
        self.ids.append(spec.name)
        handle = await self.driver.create(spec)
        self.ids.append(handle.container_id)
        return handle

    async def cleanup(self) -> None:
        for cid in reversed(self.ids):
            await self.driver.remove(cid)
        self.ids.clear()

    async def __aenter__(self) -> "Tracker":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.cleanup()


@contextlib.asynccontextmanager
async def closing(driver: Driver) -> AsyncIterator[Driver]:
    """``driver``, closed when the block ends."""
    try:
        yield driver
    finally:
        await driver.close()


def _made_by_tests(c) -> bool:
    return c.name.startswith("corral-") or (c.labels or {}).get("corral.registry", "").startswith("t-")


def leak_check() -> Iterator[None]:
    """Generator body of a session fixture: fail if managed containers were left behind."""
    if docker_problem() is not None:
        yield
        return
    client = _client()
    try:
        before = {c.id for c in client.containers.list(all=True, filters={"label": MANAGED})}
        yield
        # Only what tests make: containers named by unique_name() or owned by a test namespace
        # ("t-..."), so a benchmark running beside the tests on a shared engine is not blamed.
        left = [c for c in client.containers.list(all=True, filters={"label": MANAGED})
                if c.id not in before and _made_by_tests(c)]
        for c in left:
            c.remove(force=True)
        teardown_network()
        assert not left, f"tests left containers labelled corral.managed behind: {[c.name for c in left]}"
    finally:
        client.close()
