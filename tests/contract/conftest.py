"""The ``driver`` fixture: the same contract suite runs over every driver.

``process`` always runs; ``docker`` is marked ``docker`` and needs the engine and the
image (fails under ``CORRAL_REQUIRE_DOCKER=1`` when they are missing, skips
otherwise). Every sandbox a test makes goes through ``sandboxes`` and is
removed at teardown.
"""

from __future__ import annotations


import pytest

from tests.support import docker as testkit
from tests.support.driver_fixtures import sandboxes  # noqa: F401  (a fixture)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_containers():
    yield from testkit.leak_check()


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
async def driver(request, tmp_path_factory):
    if request.param == "process":
        from corral.drivers.config import ProcessDriverConfig
        from corral.drivers.process import ProcessDriver

        d = ProcessDriver(ProcessDriverConfig(root=str(tmp_path_factory.mktemp("process-driver"))))
    else:
        testkit.require_docker()
        from corral.drivers.docker import DockerDriver

        d = DockerDriver(testkit.driver_config())
    async with testkit.closing(d):
        yield d


@pytest.fixture
def image():
    return testkit.IMAGE
