"""Shared fixtures: one Ray cluster per test session, a fresh corral namespace per test.

Layers (see the README): ``tests/unit`` (no Ray, no Docker), ``tests/box``
(the box in-process and as a subprocess), ``tests/contract`` (every driver),
``tests/integration`` (the actors on the session's Ray cluster, process
driver), ``tests/docker`` (a real engine and image). Every test that starts
sandboxes removes them at teardown, and the session ends by checking that no
box process or container corral started is left.
"""

from __future__ import annotations

import pytest

from tests.support.managers import config_factory, manager_factory


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (ray.init takes ~10 s here)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="corral-tests", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def corral_config(tmp_path):
    """A config of its own for one test: its own namespace, state dir and mount dir."""
    return config_factory(tmp_path, "t-", acquire_timeout=60)


@pytest.fixture
def make_manager(ray_cluster, corral_config):
    """Build SandboxManagers on the session's cluster; everything they started is torn down after."""
    yield from manager_factory(corral_config, down_timeout=30)
