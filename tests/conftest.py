"""Shared fixtures: one Ray cluster per test session, a fresh corral namespace per test.

Layers (see the README): ``tests/unit`` (no Ray, no Docker), ``tests/box``
(the box in-process and as a subprocess), ``tests/contract`` (every driver),
``tests/integration`` (the actors on the session's Ray cluster, process
driver), ``tests/docker`` (a real engine and image). Every test that starts
sandboxes removes them at teardown, and the session ends by checking that no
box process or container corral started is left.
"""

from __future__ import annotations

import uuid

import pytest


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
    from corral.models import SandboxManagerEnvConfig

    def make(**kw):
        kw.setdefault("namespace", "t-" + uuid.uuid4().hex[:10])
        kw.setdefault("state_dir", str(tmp_path / "state"))
        kw.setdefault("default_mount_dir", str(tmp_path / "mounts"))
        kw.setdefault("watcher_scan_interval", 0.2)
        kw.setdefault("spare_sessions", 1)
        kw.setdefault("acquire_timeout", 60)
        return SandboxManagerEnvConfig(**kw)

    return make


@pytest.fixture
def make_manager(ray_cluster, corral_config):
    """Build SandboxManagers on the session's cluster; everything they started is torn down after."""
    from corral.manager import SandboxManager
    from corral.manager import down

    made = []

    def make(**kw):
        cfg = kw.pop("config", None) or corral_config(**kw)
        m = SandboxManager(cfg)
        made.append(m)
        return m

    yield make
    for m in made:
        out = down(m.config, timeout=30)
        assert out["containers_left"] == 0, f"namespace {m.config.namespace} leaked containers"
        m._ops.close()
