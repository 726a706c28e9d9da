"""Fixtures for the Docker driver's own tests (real engine, real image).

Every test here needs the engine and the corral-box image: they fail when
``CORRAL_REQUIRE_DOCKER=1`` and either is missing, and skip otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _load_testkit():
    name = "corral_docker_testkit"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("testkit.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


testkit = _load_testkit()


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_containers():
    yield from testkit.leak_check()


@pytest.fixture(scope="session")
def docker_ready():
    testkit.require_docker()
    return testkit.IMAGE


@pytest.fixture
async def docker_driver(docker_ready):
    from corral.drivers.docker import DockerDriver

    d = DockerDriver(testkit.driver_config())
    yield d
    await d.close()


@pytest.fixture
async def tracker(docker_driver):
    t = testkit.Tracker(docker_driver)
    yield t
    await t.cleanup()


@pytest.fixture
def docker_client(docker_ready):
    import docker

    c = docker.from_env()
    yield c
    c.close()
