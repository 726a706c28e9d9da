"""Unit tests of the plain-Python cores: no Ray, no Docker, a fake clock."""

from __future__ import annotations

import pickle

import pytest

import corral
from corral.core import KEEP, REAP, NodeView, PoolCore, RegistryCore, SessionActors, SessionCore, place
from corral.core.acquire import AcquireCore
from corral.core.pool import HEALTH_STRIKES, SHRINK_AFTER
from corral.core.refill import RefillCore
from corral.core.session import SlotTable, UnknownSlot
from corral.core.spares import QUIET, TRIM_AFTER, Attach, Kill, Spawn, Unbind, least_loaded
from corral.models import ContainerState as S
from corral.models import SandboxManagerEnvConfig, SandboxTypeConfig


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def make_registry(**kw) -> tuple[RegistryCore, Clock]:
    clock = Clock()
    types = kw.pop("types", {"base": SandboxTypeConfig(name="base")})
    kw.setdefault("default_mount_dir", None)
    cfg = SandboxManagerEnvConfig(sandbox_types=types, **kw)
    return RegistryCore(cfg, clock=clock, registry_id="test"), clock


def start_one(reg: RegistryCore, session=None, node=None, **kw):
    rec = reg.reserve("base", session_ctx_id=session, node=node, **kw)
    assert rec is not None
    return reg.started(rec.container_name, "cid-" + rec.session_id, "http://127.0.0.1:1", [1])


# -- registry -------------------------------------------------------------------


def test_reserve_names_and_tokens_follow_the_reference():
    reg, _ = make_registry()
    rec = reg.reserve("base")
    assert rec.state == S.STARTING
    assert rec.container_name == "runtime_sandbox_container_" + rec.session_id
    assert set(rec.session_id) <= set("0123456789abcdefghijklmnopqrstuvwxyz")
    assert len(rec.runtime_token) == 32
    other = reg.reserve("base")
    assert other.runtime_token != rec.runtime_token


def test_started_goes_warm_without_session_and_running_with_one():
    reg, _ = make_registry()
    assert start_one(reg).state == S.WARM
    rec = start_one(reg, session="s1")
    assert rec.state == S.RUNNING
    assert reg.session_names("s1") == [rec.container_name]
    assert rec.meta["session_ctx_id"] == "s1"


def test_unknown_type_is_a_clear_error_and_creates_nothing():
    reg, _ = make_registry()
    with pytest.raises(corral.UnknownSandboxType, match="nope"):
        reg.reserve("nope")
    assert reg.records == {} and reg.counted == 0


def test_limit_counts_starting_warm_running_and_frees_on_release():
    reg, _ = make_registry(max_sandbox_instances=2)
    a = start_one(reg)
    b = reg.reserve("base")
    assert reg.reserve("base") is None  # the limit holds STARTING too
    reg.start_failed(b.container_name)
    assert reg.counted == 1
    c = start_one(reg)
    assert reg.reserve("base") is None
    td = reg.release(a.container_name)
    assert td.action == "destroy"
    assert reg.counted == 1
    assert reg.reserve("base") is not None
    assert c.state == S.WARM


def test_warm_index_hands_out_the_longest_warm_first_and_follows_every_transition():
    reg, clock = make_registry(types={"base": SandboxTypeConfig(name="base", reuse=True),
                                      "gpu": SandboxTypeConfig(name="gpu")})
    a, b, c = (start_one(reg).container_name for _ in range(3))
    g = reg.reserve("gpu")
    reg.started(g.container_name, "cid-g", "http://127.0.0.1:2", [2])
    assert reg.next_warm("base") == a and reg.warm_count("base") == 3
    assert reg.next_warm("gpu") == g.container_name and reg.warm_count("gpu") == 1
    reg.claim(a, "s1")
    assert reg.next_warm("base") == b and reg.warm_count("base") == 2
    reg.release(b)  # a WARM one dropped (health check, shrink)
    assert reg.next_warm("base") == c
    reg.release(a, reuse=True)  # RUNNING -> RESETTING: not warm until its reset is done
    assert reg.warm_count("base") == 1
    clock.advance(1)
    reg.reset_done(a, True)
    assert list(reg.warm["base"]) == [c, a]  # back at the end of the line
    assert reg.count("base", S.WARM) == 2
    reg.release(c, reuse=True)  # WARM is not reset on release: it goes
    reg.claim(a, "s2")
    reg.release(a, reuse=True)
    assert reg.count("base", S.RESETTING) == 1
    for t in ("base", "gpu"):  # the kept counts agree with a scan
        for st in S:
            assert reg.count(t, st) == sum(1 for r in reg.records.values() if r.sandbox_type == t and r.state == st)
    reloaded, _ = make_registry(types={"base": SandboxTypeConfig(name="base"), "gpu": SandboxTypeConfig(name="gpu")})
    reloaded.load_records([r.model_dump(mode="json") for r in reg.records.values()])
    assert reloaded.warm_count("base") == 0 and reloaded.warm_count("gpu") == 1
    assert reloaded.count("base", S.RESETTING) == 1 and reloaded.count("base", S.RELEASED) == 2
    reloaded.start_failed("nope")
    for name in list(reg.records):
        reg._drop(name)
    assert reg.warm_count("base") == 0 and reg.next_warm("base") is None


def test_claim_binds_and_is_idempotent_for_the_same_session():
    reg, _ = make_registry()
    rec = start_one(reg)
    got = reg.claim(rec.container_name, "s1", {"x": 1})
    assert got.state == S.RUNNING and got.meta["x"] == 1
    assert reg.claim(rec.container_name, "s1").rev == got.rev  # a Ray retry changes nothing
    with pytest.raises(corral.Conflict):
        reg.claim(rec.container_name, "s2")
    with pytest.raises(corral.NotFound):
        reg.claim("nope", "s1")


def test_release_by_session_id_unknown_and_twice():
    reg, clock = make_registry()
    rec = start_one(reg, session="s1")
    assert reg.release("never-heard-of-it") is None
    td = reg.release(rec.session_id)  # by session_id, like the reference
    assert td.record.container_name == rec.container_name
    assert rec.state == S.RELEASED and rec.released_at == clock.t
    assert rec.session_ctx_id is None and "s1" not in reg.sessions
    assert reg.release(rec.container_name) is None  # idempotent


def test_a_teardown_keeps_the_record_as_it_was_when_released():
    reg, _ = make_registry()
    rec = start_one(reg, session="s1")
    rec.meta["task"] = "t1"
    td = reg.release(rec.container_name, reuse=True)
    assert td.action == "reset" and td.record.state == S.RESETTING and td.record.meta == {"task": "t1"}
    assert reg.reset_done(rec.container_name, ok=True).state == S.WARM  # the live record moves on
    reg.claim(rec.container_name, "s2", {"task": "t2"})
    assert td.record.state == S.RESETTING and td.record.meta == {"task": "t1"}  # the snapshot does not
    assert td.record.session_ctx_id is None and td.record.ports == rec.ports and td.record.ports is not rec.ports


def test_release_with_reuse_resets_then_returns_to_warm_or_releases():
    reg, _ = make_registry()
    a = start_one(reg, session="s1")
    b = start_one(reg, session="s2")
    td = reg.release(a.container_name, reuse=True)
    assert td.action == "reset" and a.state == S.RESETTING
    assert reg.counted == 2  # still holds its slot while it is wiped
    assert reg.reset_done(a.container_name, ok=True).state == S.WARM
    assert a.meta == {} and a.session_ctx_id is None
    reg.release(b.container_name, reuse=True)
    assert reg.reset_done(b.container_name, ok=False).state == S.RELEASED
    assert reg.counted == 1


def test_recycle_keeps_the_session_for_restore_and_replace_redirects():
    reg, clock = make_registry(storage_folder="/store", default_mount_dir="/m")
    old = start_one(reg, session="s1")
    clock.advance(10)
    td = reg.recycle(old.container_name)
    assert td.action == "recycle" and td.upload
    assert old.state == S.RECYCLED and old.recycle_reason == "heartbeat_timeout"
    assert reg.recycle(old.container_name) is None  # idempotent
    assert [r.container_name for r in reg.to_restore("s1")] == [old.container_name]
    new = start_one(reg, session="s1")
    reg.replace(old.container_name, new.container_name)
    assert old.state == S.REPLACED and old.redirect_to == new.container_name
    assert reg.get(old.container_name).container_name == new.container_name
    assert reg.session_names("s1") == [new.container_name]
    # release through the old name follows the redirect to the live container
    assert reg.release(old.container_name).record.container_name == new.container_name


def test_expire_deletes_released_after_ttl_only():
    reg, clock = make_registry(released_key_ttl=60)
    a = start_one(reg)
    b = start_one(reg)
    reg.release(a.container_name)
    clock.advance(61)
    assert reg.expire() == [a.container_name]
    assert b.container_name in reg.records
    assert reg.expire() == []


def test_reconcile_adopts_known_removes_unknown_and_recycles_lost():
    reg, _ = make_registry()
    warm = start_one(reg)
    running = start_one(reg, session="s1")
    lost = start_one(reg, session="s2")
    cut = reg.reserve("base")  # a start the registry sent, cut off by a restart
    flying = reg.reserve("base")  # a start a pool is still making
    released = start_one(reg)
    reg.release(released.container_name)
    observed = [
        {"container_id": "c1", "status": "running", "labels": {"corral.name": warm.container_name}},
        {"container_id": "c2", "status": "running", "labels": {"corral.name": running.container_name}},
        {"container_id": "c3", "status": "running", "labels": {"corral.name": "runtime_sandbox_container_zzz"}},
        {"container_id": "c4", "status": "running", "labels": {"corral.name": released.container_name}},
        {"container_id": "c5", "status": "running", "labels": {"corral.name": cut.container_name}},
        {"container_id": "c6", "status": "running", "labels": {"corral.name": flying.container_name}},
    ]
    plan = reg.reconcile("", observed, in_flight=[flying.container_name])
    assert sorted(plan.adopted) == sorted([warm.container_name, running.container_name])
    assert sorted(plan.remove) == ["c3", "c4", "c5"]  # unknown, released, and a start nobody makes
    assert lost.state == S.RECYCLED and lost.recycle_reason == "container_lost"
    assert cut.container_name not in reg.records  # its slot is free again
    assert reg.records[flying.container_name].state == S.STARTING  # left to its pool
    assert warm.container_id == "c1"
    assert reg.pool("base").failures == 0  # a cut-off start says nothing about the type


def test_reconcile_is_per_node_and_a_lost_node_makes_sessions_restorable():
    reg, _ = make_registry()
    reg.node = "n1"
    a = start_one(reg, session="s1", node="n1")
    b = start_one(reg, session="s2", node="n2")
    w = start_one(reg, node="n2")
    plan = reg.reconcile("n1", [{"container_id": "c1", "status": "running", "labels": {"corral.name": a.container_name}},
                                {"container_id": "cb", "status": "running", "labels": {"corral.name": b.container_name}}])
    assert plan.adopted == [a.container_name] and plan.remove == ["cb"]  # b is n2's, not a container of n1
    assert b.state == S.RUNNING  # n1's reconciliation never touches n2's records
    lost = reg.node_lost("n2")
    assert [r.container_name for r in lost] == [b.container_name]
    assert b.state == S.LOST and b.recycle_reason == "NODE_LOST"
    assert w.container_name not in reg.records and reg.counted == 1
    assert [r.container_name for r in reg.to_restore("s2")] == [b.container_name]
    new = start_one(reg, session="s2", node="n1")
    reg.replace(b.container_name, new.container_name)
    assert reg.get(b.container_name).container_name == new.container_name


def test_snapshot_round_trip_and_changes_log():
    reg, _ = make_registry()
    a = start_one(reg, session="s1")
    changed, deleted = reg.take_changes()
    assert [c["container_name"] for c in changed] == [a.container_name] and deleted == []
    assert reg.take_changes() == ([], [])
    snap = reg.snapshot()
    reg2, _ = make_registry()
    reg2.load(snap)
    assert reg2.records[a.container_name].state == S.RUNNING
    assert reg2.session_names("s1") == [a.container_name]
    assert reg2.counted == 1
    with pytest.raises(corral.InvalidRequest):
        reg2.load({"version": 99})


def test_bad_identity_is_a_clear_error():
    reg, _ = make_registry()
    with pytest.raises(corral.InvalidRequest):
        reg.find(None)
    with pytest.raises(corral.NotFound, match="abc"):
        reg.get("abc")


# -- pool -------------------------------------------------------------------------


def test_pool_deficit_counts_warm_starting_resetting_and_waiters():
    p = PoolCore("base", 3)
    assert p.deficit(warm=0, starting=0, resetting=0, waiting=0, now=0) == 3
    assert p.deficit(warm=1, starting=1, resetting=0, waiting=0, now=0) == 1
    assert p.deficit(warm=1, starting=0, resetting=0, waiting=2, now=0) == 4
    assert p.deficit(warm=0, starting=0, resetting=4, waiting=2, now=0) == 1  # resets come back warm
    assert p.deficit(warm=6, starting=0, resetting=0, waiting=0, now=0) == 0


def test_pool_reserve_grows_then_is_consumed_by_claims():
    p = PoolCore("base", 1)
    assert p.reserve(4) == 5
    p.consumed(1)
    assert p.target == 4
    p.consumed(10)
    assert p.target == 1  # never below pool_size


def test_pool_backoff_grows_resets_and_ignores_failures_that_say_nothing():
    p = PoolCore("base", 1)
    assert p.backoff() == 0
    p.start_ended(False, now=100)
    p.start_ended(False, now=100)
    assert p.backoff() == 1.0 and p.deficit(0, 0, 0, 0, now=100.5) == 0 and p.deficit(0, 0, 0, 0, now=101) == 1
    p.start_ended(False, now=100, counts=False)  # the namespace shutting down, a registry restart
    assert p.failures == 2
    p.start_ended(True, now=102)
    assert p.backoff() == 0 and p.deficit(0, 0, 0, 0, now=0) == 1


def test_pool_shrinks_a_surplus_only_once_it_has_lasted():
    p = PoolCore("base", 2)
    assert p.shrink(warm=5, waiting=0, now=0) == 0
    assert p.shrink(warm=5, waiting=0, now=SHRINK_AFTER - 1) == 0
    assert p.shrink(warm=5, waiting=0, now=SHRINK_AFTER + 1) == 3
    assert p.shrink(warm=4, waiting=0, now=SHRINK_AFTER + 2) == 0  # a new surplus waits its turn
    assert p.shrink(warm=3, waiting=1, now=SHRINK_AFTER + 3) == 0 and p.surplus_since is None  # a waiter took it


def test_pool_replaces_a_warm_sandbox_after_consecutive_failed_probes_only():
    p = PoolCore("base", 2)
    for _ in range(HEALTH_STRIKES - 1):
        assert p.probe({"a": False, "b": True}) == []
    assert p.probe({"a": True, "b": False}) == []  # a's strikes end with one good answer
    for _ in range(HEALTH_STRIKES - 2):
        p.probe({"b": False})
    assert p.probe({"b": False}) == ["b"] and p.strikes == {}


@pytest.mark.parametrize("bad", [-1, 5000, 1.5, "3", True])
def test_pool_rejects_absurd_sizes(bad):
    with pytest.raises(corral.InvalidRequest):
        PoolCore("base", bad)


# -- acquire, wait lines, refill, placement --------------------------------------------


def test_acquire_claims_while_nobody_waits_and_waiters_are_served_first_come_first():
    reg, _ = make_registry()
    a = start_one(reg)
    got = AcquireCore(reg).acquire("base", [{"session_ctx_id": "s1"}, {"session_ctx_id": "s2"}])
    assert got[0].container_name == a.container_name and got[1] is None
    AcquireCore(reg).wait_warm(1, "base", {"session_ctx_id": "s2"})
    AcquireCore(reg).wait_warm(2, "base", {"session_ctx_id": "s3"})
    b = start_one(reg)
    assert AcquireCore(reg).acquire("base", [{"session_ctx_id": "late"}]) == [None]  # never overtakes a waiter
    assert [(w, r.container_name, r.session_ctx_id) for w, r in AcquireCore(reg).hand_off("base")] == [
        (1, b.container_name, "s2")]
    assert reg.lines.warm_waiting("base") == 1
    assert reg.lines.cancel(2) and not reg.lines.cancel(2) and reg.lines.warm_waiting("base") == 0


def test_a_claim_without_a_session_gets_one_so_it_has_a_clock():
    reg, _ = make_registry()
    a = start_one(reg)
    rec = reg.claim(a.container_name, None)
    assert rec.session_ctx_id.startswith("auto-") and reg.session_names(rec.session_ctx_id) == [a.container_name]


def test_a_waiter_pinned_to_a_node_keeps_its_place_while_others_are_served():
    reg, _ = make_registry()
    AcquireCore(reg).wait_warm(1, "base", {"session_ctx_id": "s1", "node": "n2"})
    AcquireCore(reg).wait_warm(2, "base", {"session_ctx_id": "s2", "node": "local:n1"})
    a = start_one(reg, node="n1")
    assert [w for w, _ in AcquireCore(reg).hand_off("base")] == [2]  # nothing on n2 yet: the next waiter gets a
    b = start_one(reg, node="n2")
    assert [(w, r.container_name) for w, r in AcquireCore(reg).hand_off("base")] == [(1, b.container_name)]
    assert a.session_ctx_id == "s2"


def test_plan_starts_fills_deficits_on_the_nodes_with_room_and_pinned_waiters_on_theirs():
    reg, clock = make_registry(pool_size=3)
    nodes = [NodeView("n1", capacity=2, start_limit=8), NodeView("n2", capacity=10, start_limit=2)]
    recs = RefillCore(reg).plan_starts(nodes, now=0)
    assert sorted(r.node_id for r in recs) == ["n1", "n2", "n2"]  # most free capacity first
    assert reg.count("base", S.STARTING) == 3 and RefillCore(reg).plan_starts(nodes, now=0) == []
    idle, _ = make_registry(pool_size=0)
    AcquireCore(idle).wait_warm(1, "base", {"node": "n1"})  # pinned: started there, though n2 has more room
    AcquireCore(idle).wait_warm(2, "base", {})
    fresh = [NodeView("n1", capacity=2, start_limit=8), NodeView("n2", capacity=10, start_limit=2)]
    assert sorted(r.node_id for r in RefillCore(idle).plan_starts(fresh, now=0)) == ["n1", "n2"]


def test_refills_resume_after_the_back_off_of_failed_starts_on_the_cores_own_clock():
    reg, clock = make_registry(pool_size=2)
    nodes = lambda: [NodeView("n1", capacity=10, start_limit=8)]  # noqa: E731
    first = RefillCore(reg).plan_starts(nodes())
    assert len(first) == 2
    for rec in first:
        reg.start_failed(rec.container_name)  # a broken start, twice: back-off of 1 s
    assert RefillCore(reg).plan_starts(nodes()) == []
    clock.advance(0.5)
    assert RefillCore(reg).plan_starts(nodes()) == []  # still backing off
    clock.advance(0.6)
    again = RefillCore(reg).plan_starts(nodes())
    assert len(again) == 2  # the pool refills again
    reg.started(again[0].container_name, "cid-1", "http://127.0.0.1:1", [1])
    assert reg.pool("base").failures == 0


def test_plan_starts_respects_the_instance_limit_and_slot_waiters_go_first():
    reg, _ = make_registry(pool_size=5, max_sandbox_instances=2)
    nodes = [NodeView("n1", capacity=10, start_limit=10)]
    assert len(RefillCore(reg).plan_starts(nodes, now=0)) == 2
    for r in list(reg.records.values()):
        reg.started(r.container_name, "c", "http://x", [])
    AcquireCore(reg).wait_slot(7, {"sandbox_type": "base", "session_ctx_id": "cold", "mount_dir": "/m"})
    # full: the line waits
    assert AcquireCore(reg).admit(nodes) == [] and RefillCore(reg).plan_starts(nodes, now=0) == []
    reg.release(next(iter(reg.warm["base"])))
    [(wid, rec)] = AcquireCore(reg).admit(nodes)
    assert wid == 7 and rec.session_ctx_id == "cold" and rec.mount_dir == "/m" and rec.node_id == "n1"


def test_place_spreads_by_free_capacity_within_start_limits():
    nodes = [NodeView("a", capacity=4, active=3, start_limit=4), NodeView("b", capacity=8, start_limit=1),
             NodeView("c", capacity=8, active=1, start_limit=4)]
    assert place(6, nodes) == ["b", "c", "c", "c", "c", "a"]
    assert place(3, nodes, prefer="a") == ["a", "b", "c"]
    assert place(1, [NodeView("x", capacity=0)]) == []


def test_a_reset_rotates_the_token_and_shrink_drops_the_newest_warm():
    reg, clock = make_registry(types={"base": SandboxTypeConfig(name="base", reuse=True)})
    a = start_one(reg, session="s1")
    old = a.runtime_token
    td = reg.release(a.container_name, reuse=True)
    assert td.token and td.token != old and a.runtime_token == old  # the box takes it once clean
    reg.reset_done(a.container_name, True, td.token)
    assert a.runtime_token == td.token and a.state == S.WARM
    b = start_one(reg)
    reg.pool("base").set_target(1)
    assert RefillCore(reg).plan_shrink(now=0) == []
    [drop] = RefillCore(reg).plan_shrink(now=SHRINK_AFTER + 1)
    assert drop.record.container_name == b.container_name and drop.action == "destroy"


# -- session actors ------------------------------------------------------------------


def test_session_actors_spares_promises_and_messages():
    clock = Clock()
    sa = SessionActors(spare_target=1, clock=clock)
    assert sa.tick() == [Spawn(1)]  # quiet: top the spares up
    assert sa.created("A1") is None and sa.spares == ["A1"]
    sa.claim("s1")
    assert sa.bound["s1"] == "A1"
    sa.claim("s2")  # no spare left: promised one
    assert sa.needs_actor() == ["s2"] and sa.tick() == [Spawn(1)]  # made at once, even mid-loop
    assert sa.created("A2") == "s2"
    assert sa.attach("s1", "n1", still_bound=True) == Attach("A1", "s1", "n1")
    assert sa.end("s1", "n1", session_empty=True) == [Unbind("A1")]  # it had been told: unbind
    assert sa.end("s2", "n2", session_empty=True) == []  # released before its actor heard of it
    assert sorted(sa.spares) == ["A1", "A2"]
    clock.advance(QUIET + TRIM_AFTER + 2)
    assert sa.tick() == []
    clock.advance(TRIM_AFTER + 1)
    assert sa.tick() == [Kill(["A1"])] and sa.spares == ["A2"]


def test_a_dead_session_actor_gives_its_session_a_promise():
    clock = Clock()
    sa = SessionActors(spare_target=0, clock=clock)
    sa.created("A1")
    sa.claim("s1")
    sa.attach("s1", "n1", True)
    assert sa.lost("A1") == "s1" and sa.needs_actor() == ["s1"]
    assert sa.tick() == [Spawn(1)]


# -- session ----------------------------------------------------------------------


def _attached_session() -> tuple[SessionCore, Clock]:
    """A session of timeout 10 s on a clock of its own, with box "a" attached."""
    clock = Clock()
    s = SessionCore("s1", timeout=10, clock=clock)
    s.attach("a", "http://x", "t")
    return s, clock


def test_session_not_due_until_its_own_timeout():
    s, clock = _attached_session()
    clock.advance(9)
    assert not s.due()
    clock.advance(2)
    assert s.due()


def test_session_box_activity_counts_as_heartbeat():
    s, clock = _attached_session()
    clock.advance(20)
    assert s.decide({"a": {"last_active_at": clock.t - 5, "running": 0}}) == KEEP
    clock.advance(20)
    assert s.decide({"a": {"last_active_at": clock.t - 30, "running": 0}}) == REAP


def test_session_never_reaped_while_a_call_runs():
    s, clock = _attached_session()
    clock.advance(1000)
    assert s.decide({"a": {"last_active_at": clock.t - 999, "running": 1}}) == KEEP
    clock.advance(11)
    assert s.decide({"a": None}) == REAP  # a box that does not answer keeps nothing alive


def test_session_rejects_bad_timeout():
    with pytest.raises(ValueError):
        SessionCore("s", timeout=0)


# -- hosted sessions: the slot table, batches of spares, the host choice ---------------------


def test_slots_bind_heartbeat_and_only_the_idle_ones_are_due():
    clock = Clock()
    t = SlotTable(clock)
    a, b, c = t.add(3)
    assert len({a, b, c}) == 3 and t.stats() == {"slots": 3, "bound": 0, "spare": 3, "reaping": 0}
    t.attach(a, "s-a", 10, "box-a", "http://a", "ta")
    t.attach(b, "s-b", 10, "box-b", "http://b", "tb")
    t.attach(b, "s-b", 10, "box-b2", "http://b2", "tb2")  # a second container of the same session
    assert t.describe(b)["containers"] == ["box-b", "box-b2"] and t.describe(b)["sessions_served"] == 1
    assert t.sessions() == {a: "s-a", b: "s-b", c: None}
    clock.advance(8)
    t.heartbeat(a)
    clock.advance(3)  # b idle 11 s > 10, a idle 3 s, c spare
    assert [s for s, _ in t.due()] == [b]
    assert t.heartbeat(c) == 0.0  # a spare's heartbeat is a no-op


def test_a_due_slot_reaps_once_unless_its_boxes_were_active_or_it_was_rebound():
    clock = Clock()
    t = SlotTable(clock)
    [a] = t.add(1)
    t.attach(a, "s1", 10, "box", "http://x", "tok")
    clock.advance(11)
    [(slot, core)] = t.due()
    assert not t.decide(slot, core, {"box": {"running": 1}})  # a call runs: kept, and its clock restarts
    assert t.due() == []
    clock.advance(11)
    [(slot, core)] = t.due()
    assert t.decide(slot, core, {"box": None})  # no answer keeps nothing alive: reap
    assert t.due() == [] and t.stats()["reaping"] == 1  # asked once, not every tick
    assert not t.decide(slot, core, {"box": None})
    t.reap_failed(slot, core)  # the registry did not take it: due again
    assert [s for s, _ in t.due()] == [a]
    [(slot, core)] = t.due()
    t.unbind(a)
    t.attach(a, "s2", 10, "box2", "http://y", "tok2")  # rebound while its boxes were asked
    assert not t.decide(slot, core, {"box": None})
    assert t.describe(a)["session_ctx_id"] == "s2" and t.describe(a)["sessions_served"] == 2
    assert t.stats()["reaping"] == 0


def test_an_unknown_or_dropped_slot_is_an_error_and_ids_never_repeat_across_tables():
    t = SlotTable(Clock())
    a, b = t.add(2)
    assert t.drop([a, "nope"]) == 1
    for call in (lambda: t.attach(a, "s", 10, "n", None, None), lambda: t.heartbeat(a), lambda: t.describe(a),
                 lambda: t.detach(a, "n"), lambda: t.unbind(a)):
        with pytest.raises(UnknownSlot, match=a):
            call()
    assert pickle.loads(pickle.dumps(UnknownSlot("x"))).args == ("x",)  # crosses Ray as itself
    restarted = SlotTable(Clock())  # a host that restarted hands out other ids
    assert not set(restarted.add(2)) & {a, b}


def test_hosted_spares_come_in_one_batch_at_once_and_promised_sessions_first():
    clock = Clock()
    sa = SessionActors(spare_target=64, clock=clock, max_spawning=1024, quiet=0.0)
    assert sa.tick() == [Spawn(64)]  # no quiet time: the spares are made at once, as one batch
    for i in range(64):
        sa.created(f"slot-{i}")
    for i in range(500):  # a burst takes the spares, the rest are promised
        sa.claim(f"s{i}")
    assert len(sa.bound) == 64 and len(sa.needs_actor()) == 436
    assert sa.tick() == [Spawn(500)]  # the promised ones and the spare target, in one batch
    assert sa.tick() == []  # nothing more while that batch is being made
    actors = SessionActors(spare_target=2, clock=clock)  # actor mode: a few processes at once
    for i in range(10):
        actors.claim(f"s{i}")
    assert actors.tick() == [Spawn(4)]


def test_the_next_slots_go_to_the_least_loaded_sandbox_node_else_the_registrys():
    assert least_loaded(["n1", "n2", "n3"], {"n1": 5, "n2": 2}, "reg") == "n3"
    assert least_loaded(["n1", "n2"], {"n1": 5, "n2": 2, "gone": 0}, "reg") == "n2"
    assert least_loaded([], {"n1": 1}, "reg") == "reg"


def test_session_mode_defaults_to_actor_and_a_bad_value_is_a_clear_error():
    assert SandboxManagerEnvConfig().session_mode == "actor"
    assert SandboxManagerEnvConfig(session_mode="hosted").session_mode == "hosted"
    with pytest.raises(corral.InvalidRequest, match=r"session_mode: Input should be 'actor' or 'hosted'"):
        SandboxManagerEnvConfig(session_mode="shared")


# -- errors and config --------------------------------------------------------------


def test_errors_pickle_and_map_to_and_from_the_wire():
    for cls in (corral.NotFound, corral.CapacityError, corral.SandboxUnreachable, corral.KernelDied):
        e = pickle.loads(pickle.dumps(cls("boom", where="x")))
        assert type(e) is cls and str(e) == "boom" and e.details == {"where": "x"}
        status, body = corral.errors.to_wire(e)
        assert status >= 400
        assert type(corral.errors.from_wire(body, status)) is cls
    assert corral.SandboxUnreachable.retryable and not corral.CommandFailed.retryable
    assert issubclass(corral.InvalidRequest, ValueError)


def test_config_takes_a_reference_config_and_rejects_bad_input_as_invalid_request():
    cfg = SandboxManagerEnvConfig(redis_enabled=False, redis_server="x", pool_size=2, container_deployment="process")
    assert cfg.pool_target("base") == 2
    with pytest.raises(corral.InvalidRequest, match="oss_endpoint"):
        SandboxManagerEnvConfig(file_system="oss")  # OSS without credentials
    with pytest.raises(corral.InvalidRequest, match="pool_size"):
        SandboxManagerEnvConfig(pool_size=-1)
    with pytest.raises(corral.InvalidRequest, match=r"sandbox_types\.x\.cpus"):
        SandboxManagerEnvConfig.model_validate({"sandbox_types": {"x": {"name": "x", "cpus": -1}}})
    with pytest.raises(corral.InvalidRequest, match="environment.A"):
        SandboxTypeConfig(name="x", environment={"A": None})
    with pytest.raises(corral.UnknownSandboxType):
        cfg.sandbox_type("gpu")
