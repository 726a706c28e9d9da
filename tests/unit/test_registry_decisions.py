"""Unit tests of the registry's decisions beside its records: requests and their waits
(AcquireCore), releases, restores, configuration and engine reports (RegistryCore), refill
(RefillCore) and the status it reports. No Ray, no Docker, a fake clock."""

from __future__ import annotations

import pytest

import corral
from corral.core.acquire import AcquireCore
from corral.core.placement import NodeView, node_pref
from corral.core.refill import RefillCore
from corral.core.status import pool_status, registry_status
from corral.core.stats import LatencyWindow
from corral.models import ContainerState as S
from corral.models import SandboxTypeConfig

from tests.unit.test_cores import make_registry, start_one


def test_node_pref_reads_any_local_and_pinned_nodes():
    assert node_pref(None) == (None, False) and node_pref("any") == (None, False)
    assert node_pref("local:n1") == ("n1", False) and node_pref("local:") == (None, False)
    assert node_pref("n2") == ("n2", True)


def test_requests_are_checked_against_the_nodes_that_run_sandboxes():
    reg, _ = make_registry(node_resource="sandbox")
    acq = AcquireCore(reg)
    with pytest.raises(corral.InvalidRequest, match="non-empty list"):
        acq.check_requests([], ["n1"])
    with pytest.raises(corral.InvalidRequest, match="resource 'sandbox'"):
        acq.check_node(None, [])
    with pytest.raises(corral.InvalidRequest, match="no node 'n9'"):
        acq.check_requests([{"node": "n1"}, {"node": "n9"}], ["n1"])
    acq.check_requests([{"node": "any"}, {"node": "local:elsewhere"}, {}], ["n1"])  # no error


def test_a_reserve_waits_until_its_pool_is_warm_and_is_cancelled_or_drained_like_any_waiter():
    reg, _ = make_registry(pool_size=0)
    acq = AcquireCore(reg)
    target = reg.pool("base").reserve(2)
    acq.wait_ready(1, "base", target)
    acq.wait_ready(2, "base", target)
    start_one(reg)
    assert acq.ready() == []
    start_one(reg)
    assert acq.ready() == [1, 2] and acq.ready() == []  # answered once
    acq.wait_ready(3, "base", 5)
    reg.pool("base").consumed(2)  # acquires used the reservation up: the target (0) is what counts
    assert acq.ready() == [3]
    acq.wait_ready(4, "base", 9)
    acq.wait_slot(5, {"sandbox_type": "base"})
    assert reg.lines.cancel(4) and not reg.lines.cancel(4)
    assert reg.lines.drain() == [5]


def test_a_timed_out_caller_is_told_what_the_pool_and_the_slots_look_like():
    reg, _ = make_registry(pool_size=1, max_sandbox_instances=3)
    acq = AcquireCore(reg)
    rec = reg.reserve("base")
    reg.start_failed(rec.container_name)
    reg.pool("base").last_error = "image not found"
    assert "warm=0, starting=0, waiting=0" in acq.warm_timeout("base", 5)
    assert acq.warm_timeout("base", 5).endswith("its last 1 starts failed, the last with: image not found")
    msg = acq.slot_timeout(7, [NodeView("node-abcdefghijkl", capacity=4, active=2)])
    assert msg == "no sandbox slot within 7s: 0 active of max_sandbox_instances=3, nodes: node-abcdefg 2/4"
    assert acq.ready_timeout("base", 2, 9).startswith("pool 'base': 0 of 2 warm after 9s; its last 1")


def test_release_many_answers_each_identity_and_resets_the_types_that_reuse():
    types = {"base": SandboxTypeConfig(name="base"), "re": SandboxTypeConfig(name="re", reuse=True)}
    reg, _ = make_registry(types=types)
    a = start_one(reg, session="s1")
    b = reg.reserve("re", session_ctx_id="s2")
    reg.started(b.container_name, "cid-b", "http://127.0.0.1:2", [2])
    answers, tds, left = reg.release_many([a.session_id, "", b.container_name, "unknown", a.container_name])
    assert answers[0] is True and isinstance(answers[1], corral.InvalidRequest) and answers[2:] == [True, True, True]
    assert [(td.record.container_name, td.action) for td in tds] == [(a.container_name, "destroy"),
                                                                     (b.container_name, "reset")]
    assert left == [("s1", a.container_name), ("s2", b.container_name), (None, a.container_name)]
    assert a.state == S.RELEASED and b.state == S.RESETTING


def test_release_all_destroys_every_container_and_drops_what_could_be_restored():
    reg, _ = make_registry(types={"base": SandboxTypeConfig(name="base", reuse=True)})
    warm = start_one(reg)
    running = start_one(reg, session="s1")
    resetting = start_one(reg, session="s2")
    reset = reg.release(resetting.container_name, reuse=True)
    recycled = start_one(reg, session="s3")
    reg.recycle(recycled.container_name)
    names, tds, left = reg.release_all()
    assert sorted(names) == sorted([warm.container_name, running.container_name, resetting.container_name])
    assert {td.action for td in tds} == {"destroy"} and len(tds) == 3 and reset.action == "reset"
    assert ("s1", running.container_name) in left
    assert recycled.state == S.RELEASED and reg.to_restore("s3") == [] and reg.counted == 0


def test_a_restore_goes_back_to_its_live_node_and_expects_a_synced_workspace():
    reg, clock = make_registry()
    a = start_one(reg, session="s1", node="n1", mount_dir="/w/a", storage_path="oss://a")
    a.meta = {"session_ctx_id": "s1", "k": "v"}
    reg.recycle(a.container_name)
    request, download = reg.restore_request(a, ["n1", "n2"])
    assert request == {"sandbox_type": "base", "session_ctx_id": "s1", "meta": {"k": "v"}, "mount_dir": "/w/a",
                       "storage_path": "oss://a", "prefer": "n1"}
    assert download is None  # never synced: its workspace is still on n1
    assert reg.restore_request(a, ["n2"])[0]["prefer"] is None  # n1 is gone: anywhere
    reg.synced(a.container_name, clock(), None)
    assert reg.restore_request(a, ["n1"])[1] == "expected"
    b = start_one(reg, session="s2", node="n2")
    reg.node_lost("n2")
    assert b.state == S.LOST and reg.restore_request(b, ["n2"])[0]["prefer"] is None  # its node's disk is gone


def test_a_new_configuration_is_validated_before_anything_changes_then_sets_the_targets():
    reg, _ = make_registry(pool_size=1)
    with pytest.raises(corral.InvalidRequest, match="pool_size"):
        reg.plan_config(pool_size=-1)
    assert reg.pool("base").target == 1
    new, over = reg.plan_config(pool_size=3, sandbox_types={"big": {"name": "big", "cpus": 2}})
    assert set(over) == {"pool_size", "sandbox_types"} and set(over["sandbox_types"]) == {"base", "big"}
    assert reg.config.pool_size == 1  # planned, not in force
    reg.set_config(new)
    assert reg.pool("base").target == 3 and reg.pool("big").target == 3 and reg.config is new
    _, over = reg.plan_config(max_sandbox_instances=8)
    assert over == {"max_sandbox_instances": 8}


def test_an_engine_report_releases_warm_loses_running_and_spares_what_was_stopped_on_request():
    reg, _ = make_registry()
    warm = start_one(reg, node="n1")
    running = start_one(reg, session="s1", node="n1")
    stopped = start_one(reg, session="s2", node="n1")
    other = start_one(reg, node="n2")
    reg.stopped.add(stopped.container_name)
    names = [warm.container_name, running.container_name, stopped.container_name, other.container_name, "x"]
    tds, left = reg.engine_stopped("n1", names)
    assert sorted(td.action for td in tds) == ["destroy", "recycle"]
    assert left == [("s1", running.container_name)]
    assert warm.state == S.RELEASED and running.state == S.RECYCLED
    assert stopped.state == S.RUNNING and other.state == S.WARM


def test_resets_cut_off_by_a_restart_are_destroyed():
    reg, _ = make_registry(types={"base": SandboxTypeConfig(name="base", reuse=True)})
    a = start_one(reg, session="s1")
    reg.release(a.container_name, reuse=True)
    [td] = reg.abandon_resets()
    assert td.action == "destroy" and a.state == S.RELEASED and reg.abandon_resets() == []


def test_views_are_filled_with_what_each_node_holds_and_loopback_sandboxes_are_replaced():
    reg, _ = make_registry()
    start_one(reg, node="n1")
    reg.reserve("base", node="n1")
    [v] = reg.fill_views([NodeView("n1", capacity=4)])
    assert (v.active, v.starting) == (2, 1)
    remote = reg.reserve("base", node="n2")
    reg.started(remote.container_name, "c", "http://10.0.0.2:5", [5])
    [td] = RefillCore(reg).replace_loopback()  # the one on 127.0.0.1 goes, the other stays
    assert td.record.node_id == "n1" and remote.state == S.WARM


def test_status_reports_pools_nodes_sessions_and_the_shells_facts():
    reg, _ = make_registry(pool_size=2)
    start_one(reg, node="n1")
    start_one(reg, session="s1", node="n1")
    AcquireCore(reg).wait_warm(1, "base", {})
    window = LatencyWindow()
    window.add(12.0)
    p = pool_status(reg, "base", window)
    assert (p["target"], p["warm"], p["running"], p["waiting"]) == (2, 1, 1, 1) and p["reset_ms"]["n"] == 1
    actors = [{"sandbox_type": "base", "node": "n1"}, RuntimeError("gone"), {"sandbox_type": "other"}]
    st = registry_status(reg, reg.fill_views([NodeView("n1", capacity=4)]), actors, {}, {"bound": 1, "spares": 2},
                         namespace="ns", pid=7)
    assert st["pools"]["base"]["actors"] == [{"sandbox_type": "base", "node": "n1"}]
    assert st["pools"]["base"]["reset_ms"]["n"] == 0
    assert st["nodes"]["n1"]["active"] == 2 and st["nodes"]["n1"]["states"] == {"WARM": 1, "RUNNING": 1}
    assert st["active"] == 2 and st["waiting_for_warm"] == {"base": 1} and st["sessions"] == {"s1": [
        n for n in reg.session_names("s1")]}
    assert (st["session_actors"], st["spare_session_actors"], st["namespace"], st["pid"]) == (1, 2, "ns", 7)
    assert len(st["records"]) == 2
