"""Unit tests of the probe schedule (HealthCore) and of what probe answers decide (PoolCore's
strikes, RefillCore.probed) when each probe covers only some warm sandboxes. No Ray, a fake
clock: the registry's tick is a call to ``plan``."""

from __future__ import annotations

from collections import Counter

from corral.core.health import HEALTH_EVERY, PROBES_PER_S, HealthCore
from corral.core.pool import HEALTH_STRIKES, PoolCore
from corral.core.refill import RefillCore
from corral.models import ContainerState as S

from tests.unit.test_cores import make_registry, start_one


def warm_on(node: str, n: int, t: str = "base") -> list[tuple[str, str, str]]:
    return [(f"{node}-{i}", t, node) for i in range(n)]


def run(h: HealthCore, warm, seconds: float, tick: float = 1.0, t0: float = 0.0, answer: bool = True):
    """Plan every ``tick`` for ``seconds``, each batch answered before the next tick; returns
    (time, {(type, node): names}) of every tick that sent probes."""
    out = []
    steps = int(round(seconds / tick))
    for k in range(steps + 1):
        now = t0 + k * tick
        plan = h.plan(warm, now)
        if plan:
            out.append((now, plan))
        if answer:
            for names in plan.values():
                h.answered(names)
    return out


def probe_times(ticks) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for now, plan in ticks:
        for names in plan.values():
            for n in names:
                times.setdefault(n, []).append(now)
    return times


def test_a_node_with_few_warm_sandboxes_probes_each_every_health_every_seconds():
    h = HealthCore()
    warm = warm_on("n1", 10)
    ticks = run(h, warm, 60)
    times = probe_times(ticks)
    assert set(times) == {name for name, _, _ in warm}
    for name, ts in times.items():
        assert ts[0] == HEALTH_EVERY  # not before it has been warm that long
        assert {b - a for a, b in zip(ts, ts[1:])} == {HEALTH_EVERY}
    assert h.period(10) == HEALTH_EVERY


def test_the_probe_rate_of_a_node_is_capped_and_spread_over_ticks_oldest_first():
    n = 200
    h = HealthCore()
    warm = warm_on("n1", n)
    ticks = run(h, warm, 120)
    per_tick = [sum(len(v) for v in plan.values()) for _, plan in ticks]
    assert max(per_tick) <= PROBES_PER_S  # never all at once
    # once under way, every tick sends a full batch: the probes are spread evenly
    assert per_tick[1:-1] == [PROBES_PER_S] * (len(per_tick) - 2)
    times = probe_times(ticks)
    assert len(times) == n  # every one is probed
    period = h.period(n)
    assert period == n / PROBES_PER_S == 10.0
    gaps = Counter(b - a for ts in times.values() for a, b in zip(ts, ts[1:]))
    assert set(gaps) == {period}
    # oldest first: the first batch is the first sandboxes seen, the next batch the next ones
    first, second = ticks[0][1][("base", "n1")], ticks[1][1][("base", "n1")]
    assert len(set(first) | set(second)) == 2 * PROBES_PER_S


def test_the_cap_holds_whatever_the_tick_rate_and_after_a_stall():
    h = HealthCore()
    warm = warm_on("n1", 400)
    ticks = run(h, warm, 40, tick=0.1)  # a registry kicked ten times a second
    sent = [(now, sum(len(v) for v in plan.values())) for now, plan in ticks]
    assert max(k for _, k in sent) <= 3
    for start in range(10, 35):  # any 5 s window past the first due time
        window = sum(k for now, k in sent if start <= now < start + 5)
        assert window <= 5 * PROBES_PER_S + 1
    # a registry stalled for a minute sends one period's worth at most, not the minute's
    burst = h.plan(warm, 100.0)
    assert sum(len(v) for v in burst.values()) == HEALTH_EVERY * PROBES_PER_S


def test_the_cap_is_per_node_and_batches_are_per_pool():
    h = HealthCore()
    warm = warm_on("n1", 100) + warm_on("n2", 100) + warm_on("n2", 100, t="gpu")
    # the gpu pool's names must differ from base's on n2
    warm = [(f"{t}-{name}", t, node) for name, t, node in warm]
    ticks = run(h, warm, 30)
    for _, plan in ticks:
        assert sum(len(v) for (t, node), v in plan.items() if node == "n1") <= PROBES_PER_S
        assert sum(len(v) for (t, node), v in plan.items() if node == "n2") <= PROBES_PER_S
    assert {key for _, plan in ticks for key in plan} == {("base", "n1"), ("base", "n2"), ("gpu", "n2")}


def test_a_pool_with_a_probe_out_waits_for_its_answer_and_others_go_on():
    h = HealthCore()
    warm = warm_on("n1", 4) + warm_on("n1", 4, t="gpu")
    warm = [(f"{t}-{name}", t, node) for name, t, node in warm]
    h.plan(warm, 0.0)
    first = h.plan(warm, HEALTH_EVERY)
    assert set(first) == {("base", "n1"), ("gpu", "n1")}
    h.answered(first[("gpu", "n1")])  # the base pool's call is still out (a slow pool)
    again = h.plan(warm, 2 * HEALTH_EVERY)
    assert set(again) == {("gpu", "n1")}
    h.answered(first[("base", "n1")])
    assert set(h.plan(warm, 2 * HEALTH_EVERY + 1)) == {("base", "n1")}


def test_a_sandbox_that_leaves_warm_is_forgotten_and_starts_over_when_it_comes_back():
    h = HealthCore()
    a, b = ("a", "base", "n1"), ("b", "base", "n1")
    h.plan([a, b], 0.0)
    h.plan([b], 3.0)  # a acquired
    assert "a" not in h.last
    assert h.plan([a, b], 5.0) == {("base", "n1"): ["b"]}  # a is warm again since 5 s only
    h.answered(["b"])
    assert h.plan([a, b], 10.0) == {("base", "n1"): ["a", "b"]}
    h.plan([], 11.0)  # the node is gone: nothing of it is kept
    assert h.last == {} and h._budget == {}


def test_strikes_add_up_over_probes_that_cover_only_some_warm_sandboxes():
    p = PoolCore("base", 2)
    for _ in range(HEALTH_STRIKES - 1):
        assert p.probe({"dead": False}) == []
        assert p.probe({"other": True}) == []  # another batch: dead keeps its strikes
    assert p.probe({"dead": False}) == ["dead"]
    p.probe({"x": False})
    p.probe({}, warm={"y"})  # x is no longer warm: its strikes go
    assert p.strikes == {}


def test_a_box_that_stops_answering_is_replaced_though_its_pool_is_probed_in_batches():
    reg, _ = make_registry(pool_size=0, max_sandbox_instances=100)
    refill = RefillCore(reg)
    recs = [start_one(reg) for _ in range(60)]
    dead = recs[7].container_name
    h = HealthCore()
    replaced = []
    for k in range(120):
        warm = [(n, "base", "n1") for n in reg.warm["base"]]
        for (t, _), names in h.plan(warm, float(k)).items():
            h.answered(names)
            replaced += [td.record.container_name for td in refill.probed(t, {n: n != dead for n in names})]
    assert replaced == [dead] and reg.records[dead].state != S.WARM
    assert reg.pool("base").strikes == {}
    # an answer about a sandbox that was acquired meanwhile counts for nothing
    live = recs[8].container_name
    reg.records[live].state = S.RUNNING
    reg.warm["base"].pop(live)
    assert refill.probed("base", {live: False}) == [] and live not in reg.pool("base").strikes


async def test_a_pool_probes_its_boxes_at_most_max_probes_at_once_over_kept_connections():
    import asyncio

    from corral.actors.boxes import MAX_PROBES, Boxes
    from corral.models import ContainerModel

    conns, at_once, most = 0, 0, 0

    async def box(reader, writer):
        nonlocal conns, at_once, most
        conns += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                at_once += 1
                most = max(most, at_once)
                await asyncio.sleep(0.01)
                at_once -= 1
                ok = b"authorization: bearer good" in head.lower()
                status = b"200 OK" if ok else b"401 Unauthorized"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    servers = [await asyncio.start_server(box, "127.0.0.1", 0) for _ in range(40)]
    urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    recs = [ContainerModel(container_name=f"c{i}", session_id=f"s{i}", url=u, runtime_token="good")
            for i, u in enumerate(urls)]
    boxes = Boxes()
    try:
        for _ in range(3):
            assert await asyncio.gather(*(boxes.healthy(r) for r in recs)) == [True] * len(recs)
        assert most <= MAX_PROBES
        assert conns == len(recs)  # one connection per box, kept from one probe to the next
        wrong = recs[0].model_copy(update={"runtime_token": "bad"})
        gone = recs[1].model_copy(update={"url": "http://127.0.0.1:1"})
        assert [await boxes.healthy(r) for r in (wrong, gone, recs[2].model_copy(update={"url": None}))] == [False] * 3
    finally:
        await boxes._probe_session().close()
        for s in servers:
            s.close()
