"""The actors with the Docker driver: real containers behind the whole runtime.

Needs the engine and the corral-box image (fails under CORRAL_REQUIRE_DOCKER=1
when they are missing, skips otherwise). Uses the session's Ray cluster; each
test has its own namespace and ``make_manager`` removes everything after it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from corral.drivers import ContainerSpec

from tests.support import docker as testkit
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.docker, pytest.mark.ray]


@pytest.fixture
def docker_manager(docker_ready, make_manager):
    from corral.models import SandboxTypeConfig

    def make(**kw):
        # The image under test (CORRAL_IMAGE), on the tests' own network (testkit), never the production one.
        kw.setdefault("sandbox_types", {"base": SandboxTypeConfig(name="base", image=testkit.IMAGE)})
        return make_manager(container_deployment="docker", driver=testkit.driver_config(), **kw)

    return make




def _exists(client, name) -> bool:
    # the low-level list does not inspect each container, so it cannot race other removals
    return any(f"/{name}" in c["Names"] for c in client.api.containers(all=True, filters={"name": name}))


def _labels(client, name):
    return client.containers.get(name).labels


def test_acquire_runs_in_a_labelled_container(docker_manager, docker_client):
    m = docker_manager(pool_size=1)
    m.reserve(n=0, wait=True, timeout=120)
    with m.acquire() as sb:
        assert sb.url.startswith("http://127.0.0.1:")
        r = sb.shell("id -u; cat /proc/1/cmdline | tr '\\0' ' '")
        assert r.stdout.splitlines()[0] == "1000"  # not root
        assert sb.python("6 * 7").text == "42"
        labels = _labels(docker_client, sb.name)
        assert labels["corral.managed"] == "true"
        assert labels["corral.registry"] == m.config.namespace
        assert labels["corral.name"] == sb.name
        name = sb.name
    wait_for(lambda: not _exists(docker_client, name), what="the released container to be removed")


def test_workspace_survives_reap_and_restore(docker_manager, docker_client):
    m = docker_manager(pool_size=1, heartbeat_timeout=2)
    sb = m.acquire()
    sb.write("work/keep.txt", "kept across containers")
    old = sb.name
    wait_for(lambda: m.get_info(old)["state"] == "RECYCLED", what="the reap")
    wait_for(lambda: not _exists(docker_client, old), what="the reaped container to go")
    assert sb.read_text("work/keep.txt") == "kept across containers"  # restored on touch
    assert sb.name != old and m.get_info(old)["container_name"] == sb.name
    sb.release()


def test_reconcile_removes_an_orphan_and_adopts_a_known_container(docker_manager, docker_client):
    import ray

    from corral.actors.handles import REGISTRY_NAME
    from corral.drivers.docker import DockerDriver

    m = docker_manager(pool_size=0)
    known = m.create(meta={"session_ctx_id": "keep-me"})
    driver = DockerDriver(testkit.driver_config())
    orphan_name = testkit.unique_name("orphan")
    orphan = asyncio.run(driver.create(ContainerSpec(
        name=orphan_name, token="t" * 32, image=testkit.IMAGE,
        labels={"corral.registry": m.config.namespace, "corral.name": orphan_name},
    )))
    try:
        ray.kill(ray.get_actor(REGISTRY_NAME, namespace=m.config.namespace), no_restart=False)
        wait_for(lambda: _info_or_none(m, known) is not None, what="the registry to restart")
        assert m.get_info(known)["state"] == "RUNNING"  # adopted: the record and its container stay
        assert m.call_tool(known, "run_shell_command", {"command": "echo still-here"})["isError"] is False
        wait_for(lambda: asyncio.run(driver.status(orphan.container_id)) == "missing",
                 what="the orphan (no record) to be removed")
    finally:
        asyncio.run(driver.remove(orphan.container_id))
        asyncio.run(driver.close())


def _info_or_none(m, name):
    try:
        return m.get_info(name)
    except Exception:
        return None


def test_reuse_reset_leaves_nothing_behind(docker_manager):
    from corral.models import SandboxTypeConfig

    m = docker_manager(pool_size=1, sandbox_types={"base": SandboxTypeConfig(name="base", reuse=True,
                                                                                  image=testkit.IMAGE)})
    m.reserve(n=0, wait=True, timeout=120)
    sb = m.acquire()
    sb.shell("echo x > /workspace/a.txt; echo y > /tmp/b.txt; (sleep 300 &)")
    first = sb.name
    sb.release()
    wait_for(lambda: m.get_info(first)["state"] == "WARM", what="the reset")
    # the pool refilled while the first session ran, so the reset container is one of two warm ones
    got = [m.acquire(), m.acquire()]
    sb2 = next(s for s in got if s.name == first)
    r = sb2.shell("ls -A /workspace; ls /tmp/b.txt 2>/dev/null; pgrep -f 'sleep 30[0]' || true")
    assert r.stdout.strip() == ""
    for s in got:
        s.release()
