"""Benchmark of live sessions on one node: hosted sessions (one SessionHost actor per node)
against a session actor each.

    python -m corral.bench.sessions_bench [--sessions 500] [--actor-sessions 64] [--timeout 60]
                                          [--period 5] [--idle 0.1] [--out FILE.json]

For each mode, on a local single-node Ray cluster with the process driver, a namespace of its own
(the node's capacity raised to ``n``):

1. **Acquire**: ``n`` acquires at once, each with its own session and a sandbox started for it
   (no warm pool: the pool actor probes its warm sandboxes, which at hundreds would be its cost,
   not the sessions'). Each session heartbeats every ``--period`` seconds (spread out) from the
   moment its acquire answers. The time until they all answered, and until every session's
   clock (a slot, or an actor) has heard of it. Actor mode starts its spare actors first.
2. **Idle**: heartbeats pause for up to 10 s: the CPU of the clocks (the host, or the median
   session actor); then the same with heartbeats on, each heartbeat timed from here on. The
   unique memory (USS) of the clocks and of a sample of the boxes.
3. **Reaps**: a fraction ``--idle`` of the sessions stops heartbeating and the rest go on for the
   timeout (``--timeout``) and more: when each idle one was reaped after its last heartbeat, and
   that no heartbeating one was.

Memory: a box takes about 27 MiB, so 500 sessions take about 13 GiB. The benchmark refuses to
start a mode the machine's available memory cannot hold with 2 GiB to spare, and stops that mode
cleanly (everything taken down) if available memory falls below 1.5 GiB while it runs.

Figures are printed (and written with ``--out``), never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Optional

from corral.bench.machine import idle_cpu_percent, uss
from corral.core.stats import summary

__all__ = ["main", "run_mode"]

MIB = 1 << 20
BOX_MIB = 30  # what one box needs, rounded up, for the check before a run
SPARE_GIB = 2.0  # memory left free when a run starts
LOW_GIB = 1.5  # a run stops cleanly below this much available memory


class MemoryLow(RuntimeError):
    """Available memory fell below :data:`LOW_GIB` while a run held its sandboxes."""


class MemoryWatch:
    """Checks the machine's available memory every second in a thread; :meth:`check` raises
    :class:`MemoryLow` once it fell below :data:`LOW_GIB`."""

    def __init__(self) -> None:
        self.low: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(1.0):
            gib = psutil.virtual_memory().available / (1 << 30)
            if gib < LOW_GIB:
                self.low = gib

    def check(self) -> None:
        if self.low is not None:
            raise MemoryLow(f"available memory fell to {self.low:.1f} GiB (< {LOW_GIB} GiB): stopping this run")


_T0 = time.monotonic()


def _say(msg: str) -> None:
    print(f"{time.monotonic() - _T0:7.1f}s {msg}", flush=True)


def _available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / (1 << 30)


def _config(mode: str, n: int, timeout: float, root: str):
    from corral import SandboxManagerEnvConfig

    return SandboxManagerEnvConfig(
        namespace=f"sbench-{mode}-{uuid.uuid4().hex[:6]}", session_mode=mode, pool_size=0,
        spare_sessions=2 if mode == "hosted" else min(n, 256), max_sandboxes_per_node=n + 8,
        max_starting_per_node=2, heartbeat_timeout=timeout, watcher_scan_interval=1.0, acquire_timeout=900,
        state_dir=os.path.join(root, mode, "state"), default_mount_dir=os.path.join(root, mode, "mounts"),
    )


async def _until(pred, what: str, watch: MemoryWatch, timeout: float = 900.0, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        watch.check()
        v = await pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(every)


def _box_pids(m, names: list[str]) -> list[int]:
    """The box processes of ``names`` (process driver: each node's boxes under the driver's root)."""
    root = m.config.driver_config().model_dump().get("root") or ""
    pids = []
    for name in names:
        for meta in glob.glob(os.path.join(glob.escape(root), "*", name, "meta.json")):
            try:
                with open(meta) as f:
                    pids.append(json.load(f)["pid"])
            except (OSError, KeyError, ValueError):
                pass
    return pids


async def _clock_pids(m, mode: str) -> list[int]:
    """The processes that hold the sessions' clocks: the hosts, or the bound session actors."""
    import ray

    from corral.actors.handles import SESSION_PREFIX

    if mode == "hosted":
        return [h["pid"] for h in (await m.status_async())["session_hosts"] if h.get("pid")]
    pids = []
    for e in ray.util.list_named_actors(all_namespaces=True):
        if e["namespace"] == m.config.namespace and e["name"].startswith(SESSION_PREFIX):
            d = await ray.get_actor(e["name"], namespace=m.config.namespace).describe.remote()
            if d.get("session_ctx_id"):
                pids.append(d["pid"])
    return pids


class Live:
    """The benchmark's sessions: each acquires its sandbox, then heartbeats every ``period``
    seconds (spread out) until it is told to stop. Heartbeats pause while ``running`` is clear
    and are timed while ``timing`` is set."""

    def __init__(self, m, period: float) -> None:
        self.m, self.period = m, period
        self.held: list = []
        self.last: dict[str, float] = {}  # session -> its last heartbeat (wall clock)
        self.lat: list[float] = []
        self.errors: list[str] = []
        self.timing = False
        self.running = asyncio.Event()
        self.running.set()
        self.stopped: set[str] = set()
        self.done = asyncio.Event()

    async def session(self, s: str) -> None:
        self.held.append(await self.m.acquire_async(session_ctx_id=s))
        await asyncio.sleep(random.uniform(0, self.period))
        while not self.done.is_set() and s not in self.stopped:
            await self.running.wait()
            await self.beat(s)
            try:
                await asyncio.wait_for(self.done.wait(), self.period)
            except asyncio.TimeoutError:
                pass

    async def beat(self, s: str) -> None:
        t0 = time.perf_counter()
        try:
            await self.m.heartbeat_async(s)
        except Exception as e:  # counted and reported
            self.errors.append(f"{type(e).__name__}: {e}"[:200])
            return
        if self.timing:
            self.lat.append((time.perf_counter() - t0) * 1000)
        self.last[s] = time.time()


async def _reaps(m, live: Live, idle: set[str], timeout: float, watch: MemoryWatch) -> dict:
    """The ``idle`` sessions stop heartbeating, the others go on past the timeout: when each idle
    one was reaped after its last heartbeat, and whether any heartbeating one was."""
    live.stopped |= idle
    t_stop = time.time()
    _say(f"  {len(idle)} sessions stop heartbeating; the others go on (timeout {timeout:.0f} s)")
    reaped: dict[str, float] = {}
    wrongly: set[str] = set()
    deadline = t_stop + timeout + max(30.0, timeout / 2)
    while time.time() < deadline and (len(reaped) < len(idle) or time.time() < t_stop + timeout + 5):
        watch.check()
        for r in (await m.status_async())["records"]:
            s = r.get("session_ctx_id")
            if r["state"] == "RECYCLED" and s not in reaped:
                if s in idle:
                    reaped[s] = time.time()
                else:
                    wrongly.add(s)
        await asyncio.sleep(0.5)
    after = [reaped[s] - live.last[s] for s in reaped if s in live.last]
    return {"idle_sessions": len(idle), "idle_reaped": len(reaped),
            "reaped_s_after_last_heartbeat": summary(after) if after else None, "timeout_s": timeout,
            "heartbeating_reaped": len(wrongly)}


async def _run(mode: str, n: int, timeout: float, period: float, idle_fraction: float, root: str) -> dict:
    from corral import SandboxManager
    from corral.manager import down

    need = n * BOX_MIB / 1024 + SPARE_GIB
    avail = _available_gib()
    if avail < need:
        _say(f"[{mode}] skipped: {n} sessions need about {need:.1f} GiB available, the machine has {avail:.1f}")
        return {"mode": mode, "sessions": n, "skipped": f"{avail:.1f} GiB available, {need:.1f} GiB needed"}
    cfg = _config(mode, n, timeout, root)
    res: dict = {"mode": mode, "sessions": n}
    m = SandboxManager(cfg)
    live = Live(m, period)
    tasks: list[asyncio.Future] = []
    try:
        with MemoryWatch() as watch:
            spares = 0 if mode == "hosted" else min(n, 256)
            if spares:
                _say(f"[{mode}] starting {spares} spare session actors")
                await _until(lambda: _spares(m, spares), "the spare session actors", watch, every=1.0)
            sessions = [f"live-{i}" for i in range(n)]
            _say(f"[{mode}] acquiring {n} sessions, each a sandbox started for it ({avail:.1f} GiB available)")
            t0 = time.perf_counter()
            tasks = [asyncio.ensure_future(live.session(s)) for s in sessions]
            await _until(lambda: _acquired(m, live, tasks, n), f"{n} acquires", watch, every=1.0)
            res["acquire_all_s"] = round(time.perf_counter() - t0, 1)
            await _until(lambda: _clocks(m, mode, n), "every session's clock", watch, timeout=300, every=0.2)
            res["acquire_and_clocks_s"] = round(time.perf_counter() - t0, 1)
            st = await m.status_async()
            res["live_sessions"] = sum(1 for r in st["records"] if r["state"] == "RUNNING")
            res["clock_actors"] = len(st["session_hosts"]) if mode == "hosted" else st["session_actors"]
            quiet = min(10.0, timeout / 3)  # no call at all, well within the timeout
            _say(f"[{mode}] {n} sessions acquired in {res['acquire_all_s']} s, all with clocks after "
                 f"{res['acquire_and_clocks_s']} s, held by {res['clock_actors']} actor(s); {quiet:.0f} s idle ...")
            pids = await _clock_pids(m, mode)
            live.running.clear()
            await asyncio.gather(*(live.beat(s) for s in sessions))
            res["clock_idle_cpu_percent"] = await asyncio.to_thread(idle_cpu_percent, pids, quiet)
            live.running.set()
            live.timing = True
            res["clock_heartbeating_cpu_percent"] = await asyncio.to_thread(idle_cpu_percent, pids, 2 * period)
            clock_mib = [x / MIB for x in (uss(p) for p in pids) if x]
            sample = random.Random(0).sample([sb.name for sb in live.held], min(32, n))
            box_mib = [x / MIB for x in (uss(p, tree=True) for p in _box_pids(m, sample)) if x]
            res["box_uss_mib"] = round(statistics.median(box_mib), 1) if box_mib else None
            if mode == "hosted":
                res["host_uss_mib"] = round(sum(clock_mib), 1)
                res["clock_mib_per_session"] = round(sum(clock_mib) / n, 3)
                res["clock_cpu_percent_per_session"] = round((res["clock_idle_cpu_percent"] or 0) / n, 4)
            else:
                res["session_actor_uss_mib"] = round(statistics.median(clock_mib), 1) if clock_mib else None
                res["clock_mib_per_session"] = res["session_actor_uss_mib"]
                res["clock_cpu_percent_per_session"] = res["clock_idle_cpu_percent"]
            res["mib_per_live_session"] = round((res["clock_mib_per_session"] or 0) + (res["box_uss_mib"] or 0), 1)
            idle = set(random.Random(1).sample(sessions, max(1, int(n * idle_fraction))))
            res.update(await _reaps(m, live, idle, timeout, watch))
            res.update({"heartbeat_ms": summary(live.lat), "heartbeat_errors": len(live.errors),
                        "first_errors": live.errors[:3]})
            res["live_at_end"] = sum(1 for r in (await m.status_async())["records"] if r["state"] == "RUNNING")
    except MemoryLow as e:
        _say(f"[{mode}] {e}")
        res["stopped"] = str(e)
    finally:
        live.done.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _say(f"[{mode}] releasing {len(live.held)} sandboxes and taking the namespace down")
        await asyncio.gather(*(sb.release() for sb in live.held), return_exceptions=True)
        m.close()
        out = await asyncio.to_thread(down, cfg, 120)
        res["containers_left"] = out["containers_left"]
        _say(f"[{mode}] down: {out['containers_left']} containers left")
    _print(res)
    return res


async def _spares(m, want: int) -> bool:
    return (await m.status_async())["spare_session_actors"] >= want


_progress = [0.0]


async def _acquired(m, live: Live, tasks: list, n: int) -> bool:
    """All ``n`` acquires answered (a failed one raises); progress every 10 s."""
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()
    done = len(live.held) >= n
    if done or time.monotonic() - _progress[0] >= 10:
        st = await m.status_async()
        _say(f"  acquired {len(live.held)}/{n}, starting {st['pools']['base']['starting']}, "
             f"available memory {_available_gib():.1f} GiB")
        _progress[0] = time.monotonic()
    return done


async def _clocks(m, mode: str, n: int) -> bool:
    """Every session's clock has heard of it (attached)."""
    st = await m.status_async()
    if mode == "hosted":
        return sum(h.get("bound", 0) for h in st["session_hosts"]) >= n
    return st["session_actors"] >= n


def _print(r: dict) -> None:
    if "heartbeat_ms" not in r:
        return
    clock = (f"host actor {r['host_uss_mib']} MiB USS = {r['clock_mib_per_session']} MiB a session"
             if r["mode"] == "hosted" else f"session actor {r['session_actor_uss_mib']} MiB USS each")
    reap = r["reaped_s_after_last_heartbeat"] or {}
    who = "the host" if r["mode"] == "hosted" else "median actor"
    _say(f"[{r['mode']}] {r['live_sessions']} live sessions ({r['live_at_end']} at the end); {clock}; "
         f"box {r['box_uss_mib']} MiB: {r['mib_per_live_session']} MiB per live session; clocks' CPU "
         f"{r['clock_idle_cpu_percent']}% of a CPU idle, {r['clock_heartbeating_cpu_percent']}% heartbeating "
         f"({who}); heartbeat p50 {r['heartbeat_ms']['p50']} ms, p99 {r['heartbeat_ms']['p99']} ms; "
         f"{r['idle_reaped']}/{r['idle_sessions']} idle reaped {reap.get('p50')} s (p50), {reap.get('p99')} s "
         f"(p99) after their last heartbeat (timeout {r['timeout_s']:.0f} s); heartbeating ones reaped: "
         f"{r['heartbeating_reaped']}")


def run_mode(mode: str, n: int, timeout: float = 60.0, period: float = 5.0, idle_fraction: float = 0.1) -> dict:
    """One mode's figures; Ray must be initialized."""
    root = tempfile.mkdtemp(prefix="corral-sbench-")
    return asyncio.run(_run(mode, n, timeout, period, idle_fraction, root))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corral.bench.sessions_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=500, help="live sessions in hosted mode")
    ap.add_argument("--actor-sessions", type=int, default=64, help="live sessions with an actor each (0: skip)")
    ap.add_argument("--timeout", type=float, default=60.0, help="the sessions' heartbeat timeout (s)")
    ap.add_argument("--period", type=float, default=5.0, help="seconds between a session's heartbeats")
    ap.add_argument("--idle", type=float, default=0.1, help="fraction of sessions that stop heartbeating")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    a = ap.parse_args(argv)
    if a.sessions < 1 or a.actor_sessions < 0 or not 0 < a.idle < 1 or a.period <= 0 or a.timeout <= a.period:
        ap.error("need --sessions >= 1, --actor-sessions >= 0, 0 < --idle < 1, 0 < --period < --timeout")
    from corral.bench import on_local_ray

    def measure() -> dict:
        out = {"hosted": run_mode("hosted", a.sessions, a.timeout, a.period, a.idle)}
        if a.actor_sessions:
            out["actor"] = run_mode("actor", a.actor_sessions, a.timeout, a.period, a.idle)
        return out

    on_local_ray(measure, vars(a), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
