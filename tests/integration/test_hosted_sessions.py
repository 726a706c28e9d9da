"""Hosted sessions (``session_mode="hosted"``) on a real Ray cluster with the process driver:
many sessions' clocks in one SessionHost actor per node instead of an actor each."""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.waiting import wait_for

pytestmark = pytest.mark.ray


def _named(ns: str) -> list[str]:
    import ray

    return sorted(e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["namespace"] == ns)


def _host(m) -> dict:
    [host] = m.status()["session_hosts"]
    return host


def _state(m, name: str) -> str:
    return m.get_info(name)["state"]


class Heartbeats:
    """Heartbeats for some sessions every 0.3 s in a thread, until stopped."""

    def __init__(self, m, sessions: list[str]) -> None:
        self.m, self.sessions, self.stop = m, sessions, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for s in self.sessions:
                self.m.heartbeat(s)
            self.stop.wait(0.3)

    def end(self) -> None:
        self.stop.set()
        self.thread.join()


def test_hosted_sessions_share_one_host_and_are_kept_reaped_released_and_given_new_slots(make_manager):
    import ray

    from corral.actors.handles import HOST_PREFIX, SESSION_PREFIX

    m = make_manager(session_mode="hosted", pool_size=4, heartbeat_timeout=3, reconcile_interval=1)
    m.reserve(n=0, wait=True)
    sbs = [m.acquire(session_ctx_id=f"hosted-{i}") for i in range(4)]
    beats = Heartbeats(m, ["hosted-0", "hosted-1"])
    try:
        host = wait_for(lambda: (h := _host(m))["bound"] == 4 and h, timeout=20, what="4 sessions on the host")
        names = _named(m.config.namespace)
        assert [n for n in names if n.startswith(HOST_PREFIX)] == [host["name"]]  # one host, not an actor each
        assert not [n for n in names if n.startswith(SESSION_PREFIX)]
        st = m.status()
        assert st["session_mode"] == "hosted" and st["session_actors"] == 4
        # the idle ones go after their timeout; the heartbeating ones stay
        idle_since = time.monotonic()
        for sb in sbs[2:]:
            wait_for(lambda: _state(m, sb.name) == "RECYCLED", timeout=20, what="an idle hosted session's reap")
        assert time.monotonic() - idle_since >= 2.5
        assert [_state(m, sb.name) for sb in sbs[:2]] == ["RUNNING", "RUNNING"]
        assert sbs[0].shell("echo alive").stdout.strip() == "alive"
        # a release gives the slot back (unbound, a spare again)
        sbs[0].release()
        wait_for(lambda: _host(m)["bound"] == 1, timeout=20, what="the released and reaped slots unbound")
        # the host dies and comes back empty: its session gets a new slot, which keeps and then reaps it
        before = _host(m)
        ray.kill(ray.get_actor(before["name"], namespace=m.config.namespace), no_restart=False)
        after = wait_for(lambda: (h := _host(m)).get("pid") not in (None, before["pid"]) and h["bound"] == 1 and h,
                         timeout=30, what="the survivor's new slot on the restarted host")
        assert after["name"] == before["name"]
        time.sleep(4)  # longer than the timeout: heartbeats still reach the session through its new slot
        assert _state(m, sbs[1].name) == "RUNNING"
    finally:
        beats.end()
    wait_for(lambda: _state(m, sbs[1].name) == "RECYCLED", timeout=20, what="the reap by the new slot")


def test_hosted_slots_are_adopted_after_a_registry_restart_and_down_leaves_no_actor(make_manager):
    import ray

    from corral.actors.handles import REGISTRY_NAME
    from corral.manager import down

    m = make_manager(session_mode="hosted", pool_size=2, heartbeat_timeout=30)
    m.reserve(n=0, wait=True)
    sbs = [m.acquire(session_ctx_id=f"adopted-{i}") for i in range(2)]
    before = wait_for(lambda: (h := _host(m))["bound"] == 2 and h, timeout=20, what="2 sessions on the host")
    ray.kill(ray.get_actor(REGISTRY_NAME, namespace=m.config.namespace), no_restart=False)
    wait_for(lambda: m.status()["session_actors"] == 2, timeout=60, what="the registry back with its sessions")
    time.sleep(2)  # a few ticks of the new registry: it would make slots now if it had not adopted them
    after = _host(m)
    assert (after["pid"], after["slots"], after["bound"]) == (before["pid"], before["slots"], 2)
    assert m.heartbeat("adopted-0") and sbs[0].shell("echo adopted").stdout.strip() == "adopted"
    out = down(m.config, timeout=30)
    assert out["containers_left"] == 0
    assert _named(m.config.namespace) == []  # registry, pool and host all stopped
