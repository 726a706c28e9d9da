"""Benchmark of the runtime: acquire, tool call and release through the actors.

    python -m corral.bench.runtime_bench [--workers 32] [--cycles 10] [--driver process]

For each mode (``reuse``: released sandboxes are reset and go back to the pool;
``destroy``: the reference's behaviour) it starts a fresh namespace with a
warm pool of ``--workers`` sandboxes. It first measures warm bursts: once
the pool is full and the CPUs have settled from the previous burst's resets,
all workers acquire at once, then release (the acquire and release paths
themselves), on one event loop. Then ``--workers`` concurrent workers do
``--cycles`` acquire / one shell call / release cycles each (there an acquire
includes waiting for a reset or a cold start), and it prints acquire, tool-call and release latency (p50/p99), cycles per second,
the tool-call latency through a handle next to direct HTTP to the same box
(the heartbeat adds no actor round trip to a tool call), and the memory a live
session costs (its session actor's unique memory, and its box's).

Figures are measured, never asserted: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from typing import Optional

from corral.bench import write_json
from corral.bench.machine import wait_quiet
from corral.core.stats import pct, summary

__all__ = ["run_mode", "main", "pct"]


def _uss(pid: int) -> Optional[int]:
    import psutil

    try:
        return psutil.Process(pid).memory_full_info().uss
    except Exception:
        return None


def _tree_uss(pid: int) -> Optional[int]:
    import psutil

    try:
        p = psutil.Process(pid)
        return sum(q.memory_full_info().uss for q in [p, *p.children(recursive=True)])
    except Exception:
        return None


async def _measure_memory(m, names: list[str]) -> dict:
    """USS of the session actors and box process trees behind ``names`` (same machine)."""
    import ray

    from corral.actors.handles import SESSION_PREFIX

    sess = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == m.config.namespace and entry["name"].startswith(SESSION_PREFIX):
            d = await ray.get_actor(entry["name"], namespace=m.config.namespace).describe.remote()
            if d.get("session_ctx_id"):
                sess.append(_uss(d["pid"]))
    boxes = []
    driver_root = m.config.driver_config().model_dump().get("root")
    if driver_root:
        import glob
        import os

        for n in names:  # each node's boxes are in a directory of their own under the root
            for meta in glob.glob(os.path.join(glob.escape(driver_root), "*", n, "meta.json")):
                try:
                    with open(meta) as f:
                        boxes.append(_tree_uss(json.load(f)["pid"]))
                except (OSError, KeyError, ValueError):
                    pass
    sess = [x for x in sess if x]
    boxes = [x for x in boxes if x]
    mib = 1 / (1 << 20)
    return {
        "session_actor_uss_mib": round(statistics.median(sess) * mib, 1) if sess else None,
        "box_uss_mib": round(statistics.median(boxes) * mib, 1) if boxes else None,
        "sessions_measured": len(sess),
    }


async def _direct_vs_handle(sb, n: int = 50) -> dict:
    """Tool-call latency through the handle, next to a bare httpx call to the same box."""
    import httpx

    handle, direct = [], []
    async with httpx.AsyncClient(trust_env=False) as c:
        hdr = {"Authorization": f"Bearer {sb.record['runtime_token']}"}
        async def via_handle() -> None:
            t0 = time.perf_counter()
            await sb.shell("echo hi")
            handle.append((time.perf_counter() - t0) * 1000)

        async def bare() -> None:
            t0 = time.perf_counter()
            r = await c.post(sb.url + "/v1/shell", json={"command": "echo hi"}, headers=hdr)
            r.raise_for_status()
            direct.append((time.perf_counter() - t0) * 1000)

        for i in range(n):  # in pairs, each going first half the time: drift hits both alike
            for one in ((via_handle, bare) if i % 2 == 0 else (bare, via_handle)):
                await one()
    return {"handle_ms": summary(handle), "direct_ms": summary(direct)}


def run_mode(mode: str, workers: int, cycles: int, driver: str, quiet: bool = False, bursts: int = 3,
             kernel_reset: str = "restart") -> dict:
    from corral import SandboxManager, SandboxManagerEnvConfig, SandboxTypeConfig
    from corral.manager import down

    cfg = SandboxManagerEnvConfig(
        namespace=f"bench-{mode}-{uuid.uuid4().hex[:6]}",
        container_deployment=driver,
        pool_size=workers,
        spare_sessions=workers,
        state_dir=f"/tmp/corral-bench/{mode}",
        default_mount_dir=f"/tmp/corral-bench/{mode}/mounts",
        acquire_timeout=600,
        sandbox_types={"base": SandboxTypeConfig(name="base", reuse=(mode == "reuse"), kernel_reset=kernel_reset)},
    )
    m = SandboxManager(cfg)
    try:
        t0 = time.perf_counter()
        m.reserve(n=0, wait=True, timeout=900)
        warm_s = time.perf_counter() - t0
        if not quiet:
            print(f"[{mode}] pool of {workers} warm in {warm_s:.1f}s; spare session actors starting ...", flush=True)
        deadline = time.time() + 120
        while m.status()["spare_session_actors"] < workers and time.time() < deadline:
            time.sleep(0.2)
        acq, tool, rel, errors = [], [], [], []
        done = 0

        async def worker(i: int) -> None:
            nonlocal done
            for k in range(cycles):
                try:
                    t0 = time.perf_counter()
                    sb = await m.acquire_async(timeout=600)
                    acq.append((time.perf_counter() - t0) * 1000)
                    t0 = time.perf_counter()
                    r = await sb.shell(f"echo {i}-{k}")
                    tool.append((time.perf_counter() - t0) * 1000)
                    if r.stdout.strip() != f"{i}-{k}":
                        errors.append(f"wrong output {r.stdout!r}")
                    t0 = time.perf_counter()
                    await sb.release()
                    rel.append((time.perf_counter() - t0) * 1000)
                    done += 1
                except Exception as e:  # counted and reported, never hidden
                    errors.append(f"{type(e).__name__}: {e}")

        async def burst() -> tuple[list, list]:
            """Warm acquire and release latency: ``workers`` acquirers at once on a full warm pool."""
            b_acq, b_rel = [], []

            async def one():
                t0 = time.perf_counter()
                sb = await m.acquire_async(timeout=600)
                b_acq.append((time.perf_counter() - t0) * 1000)
                return sb

            sbs = await asyncio.gather(*(one() for _ in range(workers)))

            async def rel(sb):
                t0 = time.perf_counter()
                await sb.release()
                b_rel.append((time.perf_counter() - t0) * 1000)

            await asyncio.gather(*(rel(sb) for sb in sbs))
            return b_acq, b_rel

        async def main() -> tuple[float, dict, dict]:
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(i) for i in range(workers)))
            wall = time.perf_counter() - t0
            # a second, quiet phase: live sessions for memory, one for direct-vs-handle latency
            sbs = [await m.acquire_async(timeout=600) for _ in range(min(workers, 8))]
            for s in sbs:  # a live session has run code: its kernel is up (a reset hands it over booting)
                await s.python("1")
            mem = await _measure_memory(m, [s.name for s in sbs])
            lat = await _direct_vs_handle(sbs[0])
            for s in sbs:
                await s.release()
            return wall, mem, lat

        async def bursts_main() -> tuple[list, list, list]:
            """The bursts, on one event loop (a rollout worker's loop lives on): each one on a
            full warm pool, once the CPUs have settled from the previous burst's resets."""
            b_acq, b_rel, settled = [], [], []
            for _ in range(bursts):
                await m.reserve_async(n=0, wait=True, timeout=900)
                settled.append(await wait_quiet())
                a, r = await burst()
                b_acq += a
                b_rel += r
            return b_acq, b_rel, settled

        burst_acq, burst_rel, settled = asyncio.run(bursts_main())
        if not quiet:
            print(f"[{mode}] warm bursts done: acquire p50 {pct(burst_acq, 50)} ms, release p50 {pct(burst_rel, 50)} ms"
                  f" (waited for the CPUs to settle before each: {', '.join(f'{s} s, {i} idle' for s, i in settled)})",
                  flush=True)
        m.reserve(n=0, wait=True, timeout=900)
        wall, mem, lat = asyncio.run(main())
        return {
            "warm_burst_acquire_ms": summary(burst_acq),
            "warm_burst_release_ms": summary(burst_rel),
            "warm_burst_settle": [{"waited_s": s, "idle": i} for s, i in settled],
            "mode": mode,
            "kernel_reset": kernel_reset,
            "driver": driver,
            "workers": workers,
            "cycles": done,
            "errors": len(errors),
            "first_errors": errors[:3],
            "pool_warm_s": round(warm_s, 2),
            "cycles_per_s": round(done / wall, 2),
            "acquire_ms": summary(acq),
            "tool_ms": summary(tool),
            "release_ms": summary(rel),
            "tool_call_handle_vs_direct": lat,
            "memory_per_live_session": mem,
        }
    finally:
        down(m.config)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--driver", default="process", choices=["process", "docker"])
    ap.add_argument("--modes", default="reuse,destroy")
    ap.add_argument("--bursts", type=int, default=3, help="warm bursts per mode")
    ap.add_argument("--kernel-reset", choices=["restart", "namespace"], default="restart",
                    help="how a reused sandbox's kernel is reset (the type's kernel_reset)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = [run_mode(mode, args.workers, args.cycles, args.driver, bursts=args.bursts, kernel_reset=args.kernel_reset)
               for mode in args.modes.split(",")]
    print()
    print("warm bursts (all workers acquire at once from a full warm pool, then release):")
    for r in results:
        print(f"  {r['mode']:8} acquire p50 {r['warm_burst_acquire_ms']['p50']} ms p99 {r['warm_burst_acquire_ms']['p99']} ms; "
              f"release p50 {r['warm_burst_release_ms']['p50']} ms p99 {r['warm_burst_release_ms']['p99']} ms")
    print("cycles (each worker: acquire, one shell call, release; acquire includes waiting for a reset or a cold start):")
    print(f"{'mode':8} {'cycles/s':>9} {'acq p50':>8} {'acq p99':>8} {'tool p50':>9} {'rel p50':>8} "
          f"{'rel p99':>8} {'errors':>6}")
    for r in results:
        print(f"{r['mode']:8} {r['cycles_per_s']:9.2f} {r['acquire_ms']['p50']:8.2f} {r['acquire_ms']['p99']:8.2f} "
              f"{r['tool_ms']['p50']:9.2f} {r['release_ms']['p50']:8.2f} {r['release_ms']['p99']:8.2f} "
              f"{r['errors']:6d}")
    for r in results:
        lat = r["tool_call_handle_vs_direct"]
        print(f"[{r['mode']}] tool call p50: handle {lat['handle_ms']['p50']} ms, direct HTTP "
              f"{lat['direct_ms']['p50']} ms; memory per live session: {r['memory_per_live_session']}")
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
