"""Benchmark of live sessions on one node: hosted sessions (one SessionHost actor per node)
against a session actor each.

    python -m corral.bench.sessions_bench [--sessions 500] [--actor-sessions 64] [--timeout 60]
                                          [--period 5] [--idle 0.1] [--out FILE.json]

For each mode, on a local single-node Ray cluster with the process driver, a namespace of its own:

1. **Warm**: ``n`` sandboxes started ahead (``reserve``), so the acquires that follow are the
   sessions' own cost, not cold starts (the node's capacity is raised to ``n``).
2. **Acquire**: ``n`` acquires at once, each with its own session; the time until they all
   answered, and until every session has its clock (a slot, or an actor).
3. **Idle**: for 10 s no call at all: the unique memory (USS) of the host actor (hosted) or the
   median session actor (actor mode), of the boxes (a sample), and the CPU of the clocks.
4. **Heartbeats**: every session heartbeats every ``--period`` seconds (spread out), each call
   timed; then a fraction ``--idle`` of them stops and the rest go on for the timeout and more:
   when each idle one was reaped after its last heartbeat (its timeout is ``--timeout``), and
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


async def _warm(m, n: int, spares: int, watch: MemoryWatch) -> float:
    t0 = time.perf_counter()
    await m.reserve_async(n=n, wait=False)
    printed = [0.0]

    async def ready():
        st = await m.status_async()
        pool = st["pools"]["base"]
        done = pool["warm"] >= n and st["spare_session_actors"] >= spares
        if done or time.monotonic() - printed[0] >= 10:
            _say(f"  warm {pool['warm']}/{n}, starting {pool['starting']}, failed {pool['failed_total']}, spare "
                  f"clocks {st['spare_session_actors']} (available memory {_available_gib():.1f} GiB)")
            printed[0] = time.monotonic()
        return done

    await _until(ready, f"{n} warm sandboxes", watch, every=2.0)
    return time.perf_counter() - t0


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


async def _heartbeats(m, sessions: list[str], period: float, idle: set[str], timeout: float,
                      watch: MemoryWatch) -> dict:
    """Heartbeat every session every ``period`` s for a while; then the ``idle`` ones stop and the
    others go on past the timeout. Returns heartbeat latency and when the idle ones were reaped."""
    lat: list[float] = []
    last: dict[str, float] = {}
    stop_idle = asyncio.Event()
    stop_all = asyncio.Event()
    errors: list[str] = []

    async def beat(s: str) -> None:
        await asyncio.sleep(random.uniform(0, period))
        while not stop_all.is_set() and not (s in idle and stop_idle.is_set()):
            t0 = time.perf_counter()
            try:
                await m.heartbeat_async(s)
                lat.append((time.perf_counter() - t0) * 1000)
                last[s] = time.time()
            except Exception as e:  # counted and reported
                errors.append(f"{type(e).__name__}: {e}"[:200])
            try:
                await asyncio.wait_for(stop_all.wait(), period)
            except asyncio.TimeoutError:
                pass

    tasks = [asyncio.ensure_future(beat(s)) for s in sessions]
    warmup = 2 * period + 5
    _say(f"  heartbeating {len(sessions)} sessions every {period:.0f}s; {len(idle)} stop after {warmup:.0f}s")
    await asyncio.sleep(warmup)
    watch.check()
    stop_idle.set()
    t_stop = time.time()
    reaped: dict[str, float] = {}
    wrongly: list[str] = []
    deadline = t_stop + timeout + max(30.0, timeout / 2)
    while time.time() < deadline and len(reaped) < len(idle):
        watch.check()
        st = await m.status_async()
        for r in st["records"]:
            s = r.get("session_ctx_id")
            if r["state"] == "RECYCLED" and s not in reaped:
                if s in idle:
                    reaped[s] = time.time()
                elif s not in wrongly:
                    wrongly.append(s)
        await asyncio.sleep(0.5)
    await asyncio.sleep(max(0.0, t_stop + timeout + 5 - time.time()))  # the others outlive the timeout
    st = await m.status_async()
    wrongly += [r["session_ctx_id"] for r in st["records"] if r["state"] == "RECYCLED"
                and r.get("session_ctx_id") not in idle and r.get("session_ctx_id") not in wrongly]
    stop_all.set()
    await asyncio.gather(*tasks)
    after = [reaped[s] - last[s] for s in reaped if s in last]
    return {"heartbeat_ms": summary(lat), "heartbeats": len(lat), "heartbeat_errors": len(errors),
            "first_errors": errors[:3], "idle_sessions": len(idle), "idle_reaped": len(reaped),
            "reaped_s_after_last_heartbeat": summary(after) if after else None,
            "timeout_s": timeout, "heartbeating_reaped": len(wrongly)}


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
    held = []
    try:
        with MemoryWatch() as watch:
            _say(f"[{mode}] warming {n} sandboxes ({avail:.1f} GiB available)")
            res["warm_s"] = round(await _warm(m, n, 0 if mode == "hosted" else min(n, 256), watch), 1)
            sessions = [f"live-{i}" for i in range(n)]
            t0 = time.perf_counter()
            held = await asyncio.gather(*(m.acquire_async(session_ctx_id=s) for s in sessions))
            res["acquire_all_s"] = round(time.perf_counter() - t0, 2)

            async def bound():  # every session's clock has heard of it (attached)
                st = await m.status_async()
                if mode == "hosted":
                    return sum(h.get("bound", 0) for h in st["session_hosts"]) >= n
                return st["session_actors"] >= n

            await _until(bound, "every session's clock", watch, timeout=300, every=0.2)
            res["acquire_and_clocks_s"] = round(time.perf_counter() - t0, 2)
            st = await m.status_async()
            res["live_sessions"] = sum(1 for r in st["records"] if r["state"] == "RUNNING")
            res["clock_actors"] = len(st["session_hosts"]) if mode == "hosted" else st["session_actors"]
            quiet = min(10.0, timeout / 3)  # no call at all, well within the timeout
            _say(f"[{mode}] {n} sessions acquired in {res['acquire_all_s']} s, all with clocks after "
                 f"{res['acquire_and_clocks_s']} s, held by {res['clock_actors']} actor(s); {quiet:.0f} s idle ...")
            pids = await _clock_pids(m, mode)
            await asyncio.gather(*(m.heartbeat_async(s) for s in sessions))
            res["clock_idle_cpu_percent"] = await asyncio.to_thread(idle_cpu_percent, pids, quiet)
            clock_mib = [x / MIB for x in (uss(p) for p in pids) if x]
            sample = random.Random(0).sample([sb.name for sb in held], min(32, n))
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
            res.update(await _heartbeats(m, sessions, period, idle, timeout, watch))
            res["live_at_end"] = sum(1 for r in (await m.status_async())["records"] if r["state"] == "RUNNING")
    except MemoryLow as e:
        _say(f"[{mode}] {e}")
        res["stopped"] = str(e)
    finally:
        _say(f"[{mode}] releasing and taking the namespace down")
        await asyncio.gather(*(sb.release() for sb in held), return_exceptions=True)
        m.close()
        out = await asyncio.to_thread(down, cfg, 120)
        res["containers_left"] = out["containers_left"]
        _say(f"[{mode}] down: {out['containers_left']} containers left")
    _print(res)
    return res


def _print(r: dict) -> None:
    if "heartbeat_ms" not in r:
        return
    clock = (f"host actor {r['host_uss_mib']} MiB USS = {r['clock_mib_per_session']} MiB a session"
             if r["mode"] == "hosted" else f"session actor {r['session_actor_uss_mib']} MiB USS each")
    reap = r["reaped_s_after_last_heartbeat"] or {}
    _say(f"[{r['mode']}] {r['live_sessions']} live sessions ({r['live_at_end']} at the end); {clock}; box {r['box_uss_mib']} MiB: "
          f"{r['mib_per_live_session']} MiB per live session; clocks' idle CPU {r['clock_idle_cpu_percent']}% of a CPU "
          f"({'the host' if r['mode'] == 'hosted' else 'median actor'}); heartbeat p50 {r['heartbeat_ms']['p50']} ms, "
          f"p99 {r['heartbeat_ms']['p99']} ms; {r['idle_reaped']}/{r['idle_sessions']} idle reaped "
          f"{reap.get('p50')} s (p50), {reap.get('p99')} s (p99) after their last heartbeat (timeout "
          f"{r['timeout_s']:.0f} s); heartbeating ones reaped: {r['heartbeating_reaped']}")


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
    import ray

    from corral.bench.rollout import emit_json, machine_info

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 * MIB)
    try:
        out = {"machine": machine_info(), "params": vars(a),
               "hosted": run_mode("hosted", a.sessions, a.timeout, a.period, a.idle)}
        if a.actor_sessions:
            out["actor"] = run_mode("actor", a.actor_sessions, a.timeout, a.period, a.idle)
    finally:
        ray.shutdown()
    emit_json(out, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
