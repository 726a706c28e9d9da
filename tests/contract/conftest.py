"""The ``driver`` fixture: the same contract suite runs over every driver.

``process`` runs when ``drivers/process.py`` exists (skipped only when the
module is absent); ``docker`` is marked ``docker`` and needs the engine and the
image (fails under ``CORRAL_REQUIRE_DOCKER=1`` when they are missing, skips
otherwise). Every sandbox a test makes goes through ``sandboxes`` and is
removed at teardown.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_testkit():
    name = "corral_docker_testkit"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "docker" / "testkit.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


testkit = _load_testkit()


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_containers():
    yield from testkit.leak_check()


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
async def driver(request, tmp_path_factory):
    if request.param == "process":
        if importlib.util.find_spec("corral.drivers.process") is None:
            pytest.skip("drivers/process.py does not exist yet")
        from corral.drivers.config import ProcessDriverConfig
        from corral.drivers.process import ProcessDriver

        d = ProcessDriver(ProcessDriverConfig(root=str(tmp_path_factory.mktemp("process-driver"))))
    else:
        testkit.require_docker()
        from corral.drivers.docker import DockerDriver

        d = DockerDriver(testkit.driver_config())
    yield d
    await d.close()


@pytest.fixture
async def sandboxes(driver):
    t = testkit.Tracker(driver)
    yield t
    await t.cleanup()


@pytest.fixture
def image():
    return testkit.IMAGE
