"""Fixtures for the Docker driver's own tests (real engine, real image).

Every test here needs the engine and the corral-box image: they fail when
``CORRAL_REQUIRE_DOCKER=1`` and either is missing, and skip otherwise.
"""

from __future__ import annotations


import pytest

from tests.support import docker as testkit
from tests.support.driver_fixtures import sandboxes  # noqa: F401  (a fixture)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_containers():
    yield from testkit.leak_check()


@pytest.fixture(scope="session")
def docker_ready():
    testkit.require_docker()
    return testkit.IMAGE


@pytest.fixture
async def driver(docker_ready):
    from corral.drivers.docker import DockerDriver

    async with testkit.closing(DockerDriver(testkit.driver_config())) as d:
        yield d


@pytest.fixture
def docker_client(docker_ready):
    import docker

    c = docker.from_env()
    yield c
    c.close()
