"""A Ray cluster of three nodes on this machine: a head, and two worker nodes in network namespaces.

The head listens on 10.213.0.1 (a bridge this fixture creates); worker node A (10.213.0.2) and
node B (10.213.0.3) each run ``ray start`` inside a namespace of their own with the resource
``corral_sandbox`` (and ``node_a`` / ``node_b``); node C (10.213.0.4) runs a Docker engine of its
own inside its namespace, with the box image copied in, and the resource ``corral_docker``.
This test process joins the head, so it is a client on the head node: every tool call it makes
crosses to a worker node over the bridge. Everything is removed at the end, also on failure.

These tests run in a pytest session of their own (``scripts/test.sh`` starts it after the rest):
a process joins one Ray cluster, and the other layers share the session's local cluster.
"""

from __future__ import annotations

import os

# The heads and workers ``ray start`` makes use token auth; this process joins them, and Ray reads
# the mode once, when it first configures itself: before anything here imports Ray.
os.environ["RAY_AUTH_MODE"] = "token"

import pytest

from corral.testing.netns import NetnsCluster, netns_problem
from tests.support.managers import config_factory, manager_factory

pytestmark = pytest.mark.cluster


def _skip_or_fail(why: str) -> None:
    if os.environ.get("CORRAL_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"the cluster tests cannot run: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def cluster():
    problem = netns_problem()
    if problem:
        _skip_or_fail(problem)
    import ray

    c = NetnsCluster(tag="crc")
    try:
        c.start()
        c.a = c.add_worker({"corral_sandbox": 4, "node_a": 1}, num_cpus=2)
        c.b = c.add_worker({"corral_sandbox": 4, "node_b": 1}, num_cpus=2)
        from tests.support.docker import docker_problem, IMAGE

        c.docker_problem = docker_problem()
        if c.docker_problem is None:
            c.c = c.add_worker({"corral_docker": 4, "node_c": 1}, num_cpus=1, docker=True, image=IMAGE)
        os.environ.update({k: v for k, v in c.head.env.items() if k.startswith("RAY_")})
        ray.init(address=c.head.address, namespace="corral-cluster-tests", log_to_driver=False)
        ids = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for w in c.workers:
            w.node_id = ids[w.address]
        c.head_id = ids[c.head.host]
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.stop()


@pytest.fixture
def cluster_config(cluster, tmp_path):
    return config_factory(tmp_path, "c-", node_resource="corral_sandbox")


@pytest.fixture
def cluster_manager(cluster, cluster_config):
    yield from manager_factory(cluster_config, down_timeout=60)
