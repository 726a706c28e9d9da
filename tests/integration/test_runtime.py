"""The actors on a real Ray cluster with the process driver: real boxes, real kernels.

One Ray cluster for the session (``ray_cluster``); each test has its own
namespace, so its RegistryActor, PoolActors and session actors are its own,
and ``make_manager`` removes them and every box at teardown.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

import corral
from corral.models import SandboxTypeConfig
from tests.support.waiting import wait_for

pytestmark = pytest.mark.ray




def box_alive(m, name) -> bool:
    try:
        return m.get_status(name) == "running"
    except corral.NotFound:
        return False


def test_acquire_use_release(make_manager):
    m = make_manager(pool_size=1)
    m.reserve(n=0, wait=True)
    with m.acquire(env={"EPISODE": "7"}) as sb:
        assert sb.record["state"] == "RUNNING"
        r = sb.shell("echo hi $EPISODE; echo oops >&2; exit 3")
        assert r.exit_code == 3 and r.stdout.strip() == "hi 7" and r.stderr.strip() == "oops"
        with pytest.raises(corral.CommandFailed):
            r.check()
        assert sb.python("x = 41\nx + 1").text == "42"
        sb.write("notes/a.txt", "hello")
        assert sb.read_text("notes/a.txt") == "hello"
        name = sb.name
        assert m.get_session_mapping(sb.session_ctx_id) == [name]
    info = m.get_info(name)
    assert info["state"] == "RELEASED" and info["released_at"]
    wait_for(lambda: not box_alive(m, name), what="the released box to stop")
    assert m.release(name) is True  # idempotent, unknown-safe


def test_async_handles_across_event_loops_keep_their_session_and_leak_no_connection(make_manager, caplog):
    import asyncio
    import gc
    import logging

    m = make_manager(pool_size=1)
    m.reserve(n=0, wait=True)

    async def acquire_and_leave():  # the loop ends with the sandbox still held
        sb = await m.acquire_async()
        assert (await sb.shell("echo $((6 * 7))")).stdout == "42\n"
        return sb.name, sb.session_ctx_id

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        name, sid = asyncio.run(acquire_and_leave())

        async def use_again():  # another loop: its own connections, the same session
            return (await m.acquire_async(session_ctx_id=sid)).name

        asyncio.run(use_again())

        async def acquire_and_release():  # the common shape: the loop ends right after a release
            sb = await m.acquire_async()
            await sb.shell("true")
            await sb.release()

        asyncio.run(acquire_and_release())
        gc.collect()
    assert m.get_info(name)["state"] == "RUNNING" and name in m.get_session_mapping(sid)
    leaks = [r.getMessage() for r in caplog.records if "Unclosed" in r.getMessage()]
    assert not leaks  # the first loop's connections were closed at its shutdown
    for n in m.get_session_mapping(sid):
        m.release(n)


def test_reference_operations_and_shapes(make_manager):
    m = make_manager(pool_size=0)
    name = m.create(meta={"session_ctx_id": "ref-1"})
    assert name.startswith("runtime_sandbox_container_")
    assert m.get_status(name) == "running"
    assert m.check_health(name) is True
    out = m.call_tool(name, "run_shell_command", {"command": "echo ref"})
    assert out["isError"] is False
    assert any(c.get("description") == "stdout" and "ref" in c["text"] for c in out["content"])
    out = m.call_tool(name, "run_ipython_cell", {"code": "print(6*7)"})
    assert "42" in out["content"][0]["text"]
    tools = m.list_tools(name)
    assert "run_shell_command" in tools["generic"]
    assert m.list_session_keys() == ["ref-1"]
    info = m.get_info(name)
    assert info["session_ctx_id"] == "ref-1" and info["state"] == "RUNNING"
    assert m.release(info["session_id"]) is True  # by session_id too
    assert m.list_session_keys() == []


def test_bad_input_is_a_clear_error_and_creates_nothing(make_manager):
    m = make_manager(pool_size=0)
    before = m.status()["active"]
    with pytest.raises(corral.UnknownSandboxType, match="gpu"):
        m.create(sandbox_type="gpu")
    with pytest.raises(corral.InvalidRequest, match="None"):
        m.create(environment={"A": None})
    with pytest.raises(corral.InvalidRequest, match="allow_mount_dir"):
        m.create(mount_dir="/tmp/x")
    with pytest.raises(corral.NotFound):
        m.get_info("no-such-sandbox")
    with pytest.raises(corral.InvalidRequest):
        m.reserve(n=-1)
    with pytest.raises(corral.InvalidRequest):
        m.acquire(timeout=-5)
    assert m.status()["active"] == before == 0


def test_pool_refills_and_replaces_a_dead_warm_box(make_manager):
    m = make_manager(pool_size=2)
    m.reserve(n=0, wait=True, timeout=90)
    pool = m.status()["pools"]["base"]
    assert pool["warm"] == 2
    warm = [r for r in m.status()["records"] if r["state"] == "WARM"]
    victim = warm[0]["container_name"]
    m.stop(victim)  # the box dies under the pool
    wait_for(lambda: m.get_info(victim)["state"] == "RELEASED", timeout=60, what="the dead box to be dropped")
    wait_for(lambda: m.status()["pools"]["base"]["warm"] == 2, timeout=60, what="the pool to refill")


def test_reap_after_timeout_then_restore_keeps_the_workspace(make_manager):
    m = make_manager(pool_size=1, heartbeat_timeout=2)
    sb = m.acquire()
    sb.write("keep.txt", "still here")
    old = sb.name
    wait_for(lambda: m.get_info(old)["state"] == "RECYCLED", timeout=30, what="the idle session to be reaped")
    wait_for(lambda: not box_alive(m, old), what="the reaped box to stop")
    # touching the sandbox again restores it: new container, same workspace, old name redirects
    assert sb.read_text("keep.txt") == "still here"
    assert sb.name != old
    assert m.get_info(old)["container_name"] == sb.name
    assert m.get_session_mapping(sb.session_ctx_id) == [sb.name]
    sb.release()


def test_two_concurrent_restores_start_one_container(make_manager):
    m = make_manager(pool_size=0, heartbeat_timeout=1.5)
    name = m.create(meta={"session_ctx_id": "twice"})
    wait_for(lambda: m.get_info(name)["state"] == "RECYCLED", timeout=30, what="reap")

    async def both():
        return await asyncio.gather(m.restore_session_async("twice"), m.restore_session_async("twice"))

    a, b = asyncio.run(both())
    assert a == b and len(a) == 1
    running = [r for r in m.status()["records"] if r["state"] == "RUNNING"]
    assert len(running) == 1


def test_no_reap_while_a_command_runs(make_manager):
    m = make_manager(pool_size=1, heartbeat_timeout=1.5)
    sb = m.acquire()
    r = sb.shell("sleep 5; echo done", timeout=30)  # 5 s > the 1.5 s timeout, but it is running
    assert r.stdout.strip() == "done"
    assert m.get_info(sb.name)["state"] == "RUNNING"
    assert sb.name == m.get_info(sb.name)["container_name"]
    wait_for(lambda: m.get_info(sb.name)["state"] == "RECYCLED", timeout=30, what="reap once idle")


def test_instance_limit_under_64_concurrent_acquirers(make_manager):
    limit = 3
    m = make_manager(
        pool_size=limit, max_sandbox_instances=limit, acquire_timeout=120,
        sandbox_types={"base": SandboxTypeConfig(name="base", reuse=True)},
    )
    m.reserve(n=0, wait=True, timeout=90)
    peak = 0
    done = []

    async def worker(i):
        async with await m.acquire_async() as sb:
            r = await sb.shell(f"echo {i}")
            assert r.stdout.strip() == str(i)
        done.append(i)

    async def monitor(stop):
        nonlocal peak
        while not stop.is_set():
            st = await m.status_async()
            peak = max(peak, st["active"])
            await asyncio.sleep(0.05)

    async def main():
        stop = asyncio.Event()
        mon = asyncio.create_task(monitor(stop))
        await asyncio.gather(*(worker(i) for i in range(64)))
        stop.set()
        await mon

    asyncio.run(main())
    assert sorted(done) == list(range(64))  # nobody starved
    assert 0 < peak <= limit  # never exceeded


def test_registry_restart_keeps_records_and_removes_orphans(make_manager):
    import ray

    from corral.actors.handles import REGISTRY_NAME
    from corral.drivers import ContainerSpec, make_driver

    from corral.actors.pool_actor import node_driver_config

    m = make_manager(pool_size=0)
    name = m.create(meta={"session_ctx_id": "survivor"})
    driver = make_driver(node_driver_config(m.config, m.get_info(name)["node_address"]))  # its node's boxes
    orphan = asyncio.run(driver.create(ContainerSpec(
        name="runtime_sandbox_container_orphan", token="t" * 32,
        labels={"corral.managed": "true", "corral.registry": m.config.namespace,
                "corral.name": "runtime_sandbox_container_orphan"},
    )))
    registry = ray.get_actor(REGISTRY_NAME, namespace=m.config.namespace)
    ray.kill(registry, no_restart=False)
    wait_for(lambda: _answers(m, name), timeout=60, what="the registry to come back")
    info = m.get_info(name)
    assert info["state"] == "RUNNING" and info["session_ctx_id"] == "survivor"
    assert m.call_tool(name, "run_shell_command", {"command": "echo back"})["isError"] is False
    wait_for(lambda: asyncio.run(driver.status(orphan.container_id)) == "missing", timeout=30,
             what="the orphan to be removed")


def _answers(m, name) -> bool:
    try:
        m.get_info(name)
        return True
    except Exception:
        return False


def test_session_outlives_its_client_process(make_manager, ray_cluster):
    m = make_manager(pool_size=0, heartbeat_timeout=3)
    script = f"""
import json, ray
from corral import SandboxManager, SandboxManagerEnvConfig
cfg = SandboxManagerEnvConfig.model_validate_json({m.config.model_dump_json()!r})
m = SandboxManager(cfg, address={ray_cluster.get_runtime_context().gcs_address!r})
name = m.create(meta={{"session_ctx_id": "orphaned-client"}})
print(name, flush=True)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    name = out.stdout.strip().splitlines()[-1]
    info = m.get_info(name)
    assert info["state"] == "RUNNING"  # the client is gone, the session is not
    assert box_alive(m, name)
    wait_for(lambda: m.get_info(name)["state"] == "RECYCLED", timeout=30, what="the heartbeat timeout to reclaim it")


@pytest.mark.parametrize("kernel_reset", ["restart", "namespace"])
def test_reuse_resets_the_sandbox_between_sessions(make_manager, kernel_reset):
    m = make_manager(pool_size=1, sandbox_types={
        "base": SandboxTypeConfig(name="base", reuse=True, kernel_reset=kernel_reset)})
    m.reserve(n=0, wait=True)
    sb = m.acquire(env={"SECRET_OF_A": "a"})
    sb.write("left-behind.txt", "x")
    sb.python("leak = 1")
    first = sb.name
    sb.release()
    wait_for(lambda: m.get_info(first)["state"] == "WARM", timeout=30, what="the reset")
    # the pool refilled while the first session ran, so the reset container is one of two warm ones
    got = [m.acquire(), m.acquire()]
    sb2 = next(s for s in got if s.name == first)  # the same container, reused
    assert not sb2.exists("left-behind.txt")
    assert sb2.shell("echo ${SECRET_OF_A:-gone}").stdout.strip() == "gone"
    assert sb2.python("'leak' in dir()").text == "False"
    for s in got:
        s.release()
    st = m.status()  # how long resets and acquires take now, next to the Ray histograms
    assert st["pools"]["base"]["reset_ms"]["total"] >= 1 and st["pools"]["base"]["reset_ms"]["p50"] > 0
    assert st["acquire_ms"]["total"] >= 3 and st["acquire_ms"]["p50"] is not None


def test_a_session_whose_actor_dies_is_still_reaped(make_manager):
    import ray

    from corral.actors.handles import SESSION_PREFIX

    m = make_manager(pool_size=0, heartbeat_timeout=2, reconcile_interval=1)
    name = m.create(meta={"session_ctx_id": "orphaned-actor"})

    def session_actors():
        found = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == m.config.namespace and entry["name"].startswith(SESSION_PREFIX):
                h = ray.get_actor(entry["name"], namespace=m.config.namespace)
                if ray.get(h.describe.remote())["session_ctx_id"] == "orphaned-actor":
                    found.append(h)
        return found

    # the session's actor is bound right after the create answers (a message from the registry)
    victims = wait_for(session_actors, timeout=20, what="the session's actor")
    assert len(victims) == 1
    ray.kill(victims[0], no_restart=True)
    # the registry notices, gives the session a new actor, and that actor reaps it on time
    wait_for(lambda: m.get_info(name)["state"] == "RECYCLED", timeout=45, what="the reap by a new session actor")


def test_a_burst_is_one_registry_call_and_waiters_are_served_in_arrival_order(make_manager):
    n = 6
    m = make_manager(pool_size=n, max_sandbox_instances=n, acquire_timeout=60, sandbox_types={
        "base": SandboxTypeConfig(name="base", reuse=True, kernel_reset="namespace")})
    m.reserve(n=0, wait=True, timeout=90)
    calls = {"acquire": [], "release": []}

    async def main():
        ops = m._async_ops()
        send_acq, send_rel = ops._send_acquires, ops._send_releases

        async def count_acq(t, reqs):
            calls["acquire"].append(len(reqs))
            return await send_acq(t, reqs)

        async def count_rel(ids):
            calls["release"].append(len(ids))
            return await send_rel(ids)

        ops._send_acquires, ops._send_releases = count_acq, count_rel
        ops._releaser = type(ops._releaser)(ops._send_releases)
        sbs = await asyncio.gather(*(m.acquire_async(session_ctx_id=f"burst-{i}") for i in range(n)))
        assert calls["acquire"] == [n]  # the whole burst in one registry call
        assert len({sb.name for sb in sbs}) == n
        infos = await asyncio.gather(*(m.get_info_async(sb.name) for sb in sbs))
        assert [i["session_ctx_id"] for i in infos] == [f"burst-{i}" for i in range(n)]
        assert {i["state"] for i in infos} == {"RUNNING"}

        # at the limit with nothing warm: two acquirers wait in line, served first come first
        order = []

        async def waiter(tag):
            sb = await m.acquire_async(session_ctx_id=tag, timeout=60)
            order.append((tag, sb.name))
            return sb

        first = asyncio.ensure_future(waiter("first"))
        await asyncio.sleep(0.3)
        second = asyncio.ensure_future(waiter("second"))
        await asyncio.sleep(0.3)
        assert (await m.status_async())["waiting_for_warm"] == {"base": 2}
        await sbs[0].release()  # reset for reuse, then WARM: it goes to the longest waiter
        got_first = await asyncio.wait_for(first, 60)
        assert got_first.name == sbs[0].name and not second.done()
        await asyncio.gather(*(sb.release() for sb in sbs[1:]))
        assert calls["release"][-1] == n - 1  # concurrent releases: one registry call
        got_second = await asyncio.wait_for(second, 60)
        assert [tag for tag, _ in order] == ["first", "second"]
        await asyncio.gather(got_first.release(), got_second.release())

    asyncio.run(main())
    st = m.status()
    assert st["active"] <= n and not st.get("waiting_for_warm")


def _autogroup(pid):
    """The scheduling autogroup /proc shows for pid ("/autogroup-42"), or "" where none is shown."""
    try:
        with open(f"/proc/{pid}/autogroup") as f:
            words = f.read().split()
    except OSError:
        return ""
    return words[0] if words else ""


def test_sandboxes_and_session_actors_yield_the_cpu_to_the_control_plane(make_manager):
    import psutil
    import ray

    from corral.actors.handles import SESSION_PREFIX

    m = make_manager(pool_size=1)
    m.reserve(n=0, wait=True)
    st = m.status()
    [pool] = st["pools"]["base"]["actors"]  # one pool actor: one type on one node
    control = max(st["nice"], pool["nice"])
    assert control <= 15  # Ray starts workers at 15; raised to 0 where the OS allows it
    with m.acquire() as sb:
        box_pid = int(sb.shell("echo $PPID").stdout)  # the shell's parent: the box
        kernel_pid = int(sb.python("import os; os.getpid()").text)
        sessions = [ray.get(ray.get_actor(e["name"], namespace=m.config.namespace).describe.remote())["pid"]
                    for e in ray.util.list_named_actors(all_namespaces=True)
                    if e["namespace"] == m.config.namespace and e["name"].startswith(SESSION_PREFIX)]
        assert sessions
        for pid in [box_pid, kernel_pid, *sessions]:  # lower priority than the registry, or the floor
            assert psutil.Process(pid).nice() > control or psutil.Process(pid).nice() == 19
            # SCHED_IDLE: a control-plane thread that wakes never waits behind them
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE, pid
        assert os.sched_getscheduler(pool_pid := pool["pid"]) == os.SCHED_OTHER
        # No session of their own: the box, its kernel and a shell command stay in the session of the
        # pool that started the box, so one scheduling autogroup holds them all and niceness ranks
        # them below the actors (a session each would be an autogroup each, weighing as much as
        # the whole control plane on kernels with sched_autogroup_enabled).
        shell_sid = int(sb.shell("cut -d' ' -f6 /proc/$$/stat").stdout)  # the shell's own session id
        assert {os.getsid(box_pid), os.getsid(kernel_pid), shell_sid} == {os.getsid(pool_pid)}
        # /proc/<pid>/autogroup is missing without CONFIG_SCHED_AUTOGROUP and empty for a task in a
        # non-root cgroup (containers, CI runners), where autogroups do not apply: compare where shown.
        groups = [_autogroup(p) for p in (box_pid, kernel_pid, pool_pid)]
        if all(groups):
            assert len(set(groups)) == 1, groups


def test_async_acquires_and_releases_use_the_registrys_lane_and_find_it_again_after_a_restart(make_manager):
    import ray

    from corral.actors.handles import REGISTRY_NAME
    from corral.manager import down

    m = make_manager(pool_size=2)
    m.reserve(n=0, wait=True)
    before = m.status()["lane"]
    assert before is not None and os.path.exists(before["path"])

    async def cycle(n):
        sbs = await asyncio.gather(*(m.acquire_async() for _ in range(n)))
        for sb in sbs:
            assert (await sb.shell("echo ok")).stdout.strip() == "ok"
        await asyncio.gather(*(sb.release() for sb in sbs))

    async def main():
        await cycle(2)
        assert m.status()["lane"]["served"] - before["served"] >= 2  # an acquire batch and a release batch
        ray.kill(ray.get_actor(REGISTRY_NAME, namespace=m.config.namespace), no_restart=False)
        await asyncio.to_thread(wait_for, lambda: m.status()["lane"] is not None, 60, 0.2, "the registry to come back")
        m.reserve(n=0, wait=True)
        await cycle(2)  # same loop, same manager: the old lane is gone

    asyncio.run(main())
    after = m.status()["lane"]
    assert after["path"] != before["path"]
    assert after["served"] >= 1  # the new registry's lane carried the second cycle's calls
    assert not os.path.exists(before["path"])  # swept: its process is gone
    down(m.config, timeout=30)
    assert not os.path.exists(after["path"])  # `corral down` removes the lane's socket


def test_without_the_lane_acquires_go_through_ray(make_manager):
    m = make_manager(pool_size=1, registry_lane=False)
    m.reserve(n=0, wait=True)

    async def main():
        sb = await m.acquire_async()
        assert (await sb.shell("echo ok")).stdout.strip() == "ok"
        await sb.release()

    asyncio.run(main())
    assert m.status()["lane"] is None
