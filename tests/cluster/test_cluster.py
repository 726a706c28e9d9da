"""corral across a multi-node Ray cluster: placement, locality, a data plane that crosses nodes,
a node that dies, per-node Docker engines. See conftest.py for the cluster."""

from __future__ import annotations

import asyncio
import time

import pytest

import corral
from tests.support.waiting import wait_for

pytestmark = pytest.mark.cluster




def nodes_of(m, state="WARM"):
    return sorted(r["node_id"] for r in m.status()["records"] if r["state"] == state)


def test_sandboxes_spread_over_the_worker_nodes_and_every_call_crosses_a_node(cluster, cluster_manager):
    m = cluster_manager(pool_size=4)
    m.reserve(n=0, wait=True, timeout=180)
    on = nodes_of(m)
    assert set(on) == {cluster.a.node_id, cluster.b.node_id} and on.count(cluster.a.node_id) == 2  # by free capacity
    assert cluster.head_id not in on  # the head has no corral_sandbox: none there
    st = m.status()
    assert st["nodes"][cluster.a.node_id]["states"] == {"WARM": 2}
    # this process runs on the head: every tool call below goes over the bridge to a worker node
    with m.acquire(node="any") as sb:
        assert sb.url.startswith(("http://10.213.0.2:", "http://10.213.0.3:")), sb.url
        assert sb.shell("echo crossed").stdout.strip() == "crossed"
        assert sb.python("6 * 7").text == "42"
        sb.write("f.txt", "over the bridge")
        assert sb.read_text("f.txt") == "over the bridge"


def test_an_acquire_prefers_a_sandbox_on_its_own_node(cluster, cluster_manager):
    import ray

    m = cluster_manager(pool_size=4)
    m.reserve(n=0, wait=True, timeout=180)
    cfg = m.config.model_dump(mode="json")

    @ray.remote(num_cpus=0)
    def rollout(config: dict) -> tuple:
        from corral import SandboxManager, SandboxManagerEnvConfig

        mgr = SandboxManager(SandboxManagerEnvConfig.model_validate(config))
        here = ray.get_runtime_context().get_node_id()
        with mgr.acquire() as sb:  # node="local" by default
            out = sb.shell("echo ok").stdout.strip()
            return here, sb.record["node_id"], out

    for label, node in (("node_a", cluster.a), ("node_b", cluster.b)):
        here, got, out = ray.get(rollout.options(resources={label: 0.01}).remote(cfg))
        assert here == node.node_id and got == node.node_id and out == "ok"
    # pinned: only there
    with m.acquire(node=cluster.b.node_id) as sb:
        assert sb.record["node_id"] == cluster.b.node_id
    with pytest.raises(corral.InvalidRequest, match="no node"):
        m.acquire(node="ab" * 28)


def test_hosted_sessions_live_in_one_host_per_sandbox_node(cluster, cluster_manager):
    import ray

    from corral.actors.handles import HOST_PREFIX, SESSION_PREFIX
    from corral.manager import down

    m = cluster_manager(session_mode="hosted", pool_size=4)
    m.reserve(n=0, wait=True, timeout=180)
    held = [m.acquire(session_ctx_id=f"hosted-{n.address}", node=n.node_id) for n in (cluster.a, cluster.b)]
    hosts = wait_for(lambda: (h := m.status()["session_hosts"]) and sum(x.get("bound", 0) for x in h) == 2 and h,
                     timeout=60, what="both sessions bound to host slots")
    # hosts run only where sandboxes do (never on the head), and no session has an actor of its own
    assert {h["node"] for h in hosts} <= {cluster.a.node_id, cluster.b.node_id}, hosts
    named = [e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["namespace"] == m.config.namespace]
    assert not [n for n in named if n.startswith(SESSION_PREFIX)], named
    for sb in held:
        assert m.heartbeat(sb.session_ctx_id) and sb.shell("echo ok").stdout.strip() == "ok"
        sb.release()
    wait_for(lambda: sum(x.get("bound", 0) for x in m.status()["session_hosts"]) == 0, timeout=30,
             what="released sessions' slots unbound")
    m.close()
    down(m.config, timeout=60)
    named = [e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["namespace"] == m.config.namespace]
    assert not [n for n in named if n.startswith(HOST_PREFIX)], named


def test_a_node_that_dies_takes_its_sandboxes_and_its_sessions_come_back_elsewhere(cluster, cluster_manager):
    """Runs last among the process-driver tests: node B does not come back."""
    m = cluster_manager(pool_size=2, reconcile_interval=2)
    m.reserve(n=0, wait=True, timeout=180)
    sb = m.acquire(node=cluster.b.node_id, session_ctx_id="on-b")
    sb.write("note.txt", "written on b")
    name = sb.name
    killed = cluster.kill_node(cluster.b)
    assert killed > 0
    info = wait_for(lambda: (i := m.get_info(name))["state"] == "LOST" and i, timeout=90, what="NODE_LOST")
    assert info["recycle_reason"] == "NODE_LOST"
    with pytest.raises(corral.SandboxGone) as e:
        sb.shell("echo hi")
    assert e.value.retryable and "restore_session" in str(e.value)
    [new] = m.restore_session("on-b")
    assert m.get_info(new)["node_id"] == cluster.a.node_id
    assert m.get_info(name)["container_name"] == new  # the lost sandbox's name leads to its replacement
    with m.acquire(session_ctx_id="after") as other:  # the pool refills on the live node
        assert other.record["node_id"] == cluster.a.node_id
    wait_for(lambda: set(nodes_of(m)) == {cluster.a.node_id}, timeout=90, what="the pool to refill on node A")
    st = m.status()
    assert cluster.b.node_id not in st["nodes"]


def test_bad_input_about_nodes_is_refused_at_once(cluster, cluster_config):
    from corral import SandboxManager

    with pytest.raises(corral.InvalidRequest):
        cluster_config(max_sandboxes_per_node=-1)
    m = SandboxManager(cluster_config(node_resource="no_such_resource", acquire_timeout=5))
    try:
        with pytest.raises(corral.InvalidRequest, match="no node"):
            m.acquire()
    finally:
        from corral.manager import down

        m.close()
        down(m.config, timeout=30)


def test_a_worker_node_runs_docker_sandboxes_on_its_own_engine(cluster, cluster_manager):
    if cluster.docker_problem:
        pytest.skip(cluster.docker_problem)
    from tests.support.docker import IMAGE

    m = cluster_manager(container_deployment="docker", node_resource="corral_docker", pool_size=1,
                        sandbox_types={"base": {"name": "base", "image": IMAGE}})
    m.reserve(n=0, wait=True, timeout=240)
    with m.acquire() as sb:
        assert sb.record["node_id"] == cluster.c.node_id
        assert sb.url.startswith("http://10.213.0.4:"), sb.url  # published on the node's address only
        assert sb.shell("cat /proc/1/cmdline | tr '\\0' ' '").stdout.startswith("tini")
