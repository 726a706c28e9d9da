"""Benchmark of remote mode: what the gateway costs a tool call, and a rollout loop through it.

    python -m corral.bench.gateway_bench [--workers 32] [--cycles 8] [--calls 200] [--out FILE.json]

It starts a local Ray cluster, a corral namespace with a warm pool of
``--workers`` reused sandboxes (process driver), and two gateways in front of
it: one gateway actor on this node (``corral serve``'s way) and one
standalone server (``corral serve --standalone``) in a process of its own.

1. **One quiet box**: the same ``echo hi`` shell call through a remote handle
   (``/proxy`` on the gateway) and straight to the box (a box client with the
   box's own address and token), ``--calls`` pairs, each going first half the
   time; the overhead is the difference of the two p50s (and the p50 of the
   paired differences). The reference's path, ``POST /call_tool``, is timed
   too.
2. **A rollout loop**: ``--workers`` clients on one event loop, each doing
   ``--cycles`` acquire -> one shell call -> release, through each gateway and
   embedded (the same loop on ``SandboxManager``'s async API), as cycles per
   second with acquire, tool and release latencies, and the CPU the gateway
   process used meanwhile (percent of one core).

Figures are printed (and written with ``--out``), never asserted: the machine
is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Optional

from corral.bench import write_json
from corral.bench.machine import wait_quiet
from corral.core.stats import pct, summary
from corral.testing.waiting import stop_process, wait_ready_file

__all__ = ["main", "quiet_box", "rollout"]

TENANT = "bench"


async def quiet_box(remote: Any, embedded: Any, calls: int) -> dict:
    """Tool-call latency through the gateway's /proxy and straight to the box, on one idle box."""
    from corral.client import AsyncBoxClient

    sb = await remote.acquire_async()
    rec = await embedded.get_info_async(sb.name)
    proxy, direct, ref, pairs = [], [], [], []
    async with AsyncBoxClient(rec["url"], rec["runtime_token"]) as box:
        async def via_proxy() -> float:
            t0 = time.perf_counter()
            (await sb.shell("echo hi")).check()
            return (time.perf_counter() - t0) * 1000

        async def straight() -> float:
            t0 = time.perf_counter()
            (await box.shell("echo hi")).check()
            return (time.perf_counter() - t0) * 1000

        for _ in range(20):  # connections open, code paths warm
            await via_proxy()
            await straight()
        await wait_quiet()
        for i in range(calls):  # in pairs, each going first half the time: drift hits both alike
            if i % 2 == 0:
                p, d = await via_proxy(), await straight()
            else:
                d, p = await straight(), await via_proxy()
            proxy.append(p)
            direct.append(d)
            pairs.append(p - d)
        lookups = []
        for _ in range(min(calls, 100)):
            t0 = time.perf_counter()
            await remote.call_tool_async(sb.name, "run_shell_command", {"command": "echo hi"})
            ref.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            await embedded.get_info_async(sb.name)  # what the gateway's ownership check costs (one actor call)
            lookups.append((time.perf_counter() - t0) * 1000)
    await sb.release()
    return {
        "proxy_ms": summary(proxy), "direct_ms": summary(direct),
        "overhead_p50_ms": round(pct(proxy, 50) - pct(direct, 50), 2),
        "paired_difference_p50_ms": pct(pairs, 50),
        "call_tool_ms": summary(ref),
        "get_info_ms": summary(lookups),
    }


async def rollout(m: Any, workers: int, cycles: int) -> dict:
    """``workers`` concurrent clients, each ``cycles`` x (acquire, one shell call, release)."""
    acq, tool, rel = [], [], []
    errors: list[str] = []

    async def worker() -> None:
        for _ in range(cycles):
            try:
                t0 = time.perf_counter()
                sb = await m.acquire_async()
                t1 = time.perf_counter()
                (await sb.shell("echo hi")).check()
                t2 = time.perf_counter()
                await sb.release()
                t3 = time.perf_counter()
            except Exception as e:  # counted and shown: a benchmark reports its failures
                errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            acq.append((t1 - t0) * 1000)
            tool.append((t2 - t1) * 1000)
            rel.append((t3 - t2) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    wall = time.perf_counter() - t0
    return {
        "cycles_per_s": round(len(acq) / wall, 2), "wall_s": round(wall, 2), "cycles": len(acq),
        "acquire_ms": summary(acq), "tool_ms": summary(tool), "release_ms": summary(rel),
        "errors": len(errors), "first_errors": errors[:3],
    }


def _cpu_s(pid: Optional[int]) -> Optional[float]:
    """CPU seconds a process has used (None without a pid or psutil)."""
    if pid is None:
        return None
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:
        return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _standalone(config: Any, token: str, workdir: str) -> tuple[subprocess.Popen, str]:
    import ray

    cfg_path, ready = os.path.join(workdir, "config.json"), os.path.join(workdir, "ready.json")
    with open(cfg_path, "w") as f:
        json.dump(config.model_dump(mode="json", exclude_none=True), f)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "CORRAL_GATEWAY_TOKENS": f"{TENANT} {token}"}
    log = open(os.path.join(workdir, "standalone.log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.cli", "serve", "--standalone", "--host", "127.0.0.1", "--port", "0",
         "--config", cfg_path, "--ready-file", ready], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        return proc, wait_ready_file(proc, ready, 180, "the standalone gateway", every=0.1)["url"]
    except RuntimeError as e:
        raise RuntimeError(f"{e} (see {workdir}/standalone.log)") from None


def _settle(m: Any, workers: int) -> float:
    """Wait for the pool to be full again and the CPUs to settle; returns the seconds it took."""
    t0 = time.perf_counter()
    m.reserve(n=0, wait=True, timeout=600)
    asyncio.run(wait_quiet())
    return round(time.perf_counter() - t0, 1)


def run(workers: int, cycles: int, calls: int) -> dict:
    from corral import SandboxManager, SandboxManagerEnvConfig, SandboxTypeConfig
    from corral.gateway import Tenants
    from corral.gateway.server import start_gateways, stop_gateways
    from corral.manager import down

    workdir = tempfile.mkdtemp(prefix="corral-gwbench-")
    cfg = SandboxManagerEnvConfig(
        namespace=f"gwbench-{uuid.uuid4().hex[:6]}", pool_size=workers, spare_sessions=workers,
        state_dir=f"{workdir}/state", default_mount_dir=f"{workdir}/mounts", acquire_timeout=600,
        sandbox_types={"base": SandboxTypeConfig(name="base", reuse=True)},
    )
    m = SandboxManager(cfg)
    token = secrets.token_hex(32)
    proc: Optional[subprocess.Popen] = None
    out: dict = {"workers": workers, "cycles": cycles, "calls": calls, "cpus": os.cpu_count()}
    try:
        print(f"warming a pool of {workers} ...", flush=True)
        m.reserve(n=0, wait=True, timeout=900)
        [row] = start_gateways(m.config, Tenants.parse(f"{TENANT} {token}"), host="127.0.0.1", port=_free_port())
        proc, standalone_url = _standalone(m.config, token, workdir)
        gateways = {"actor": row["url"], "standalone": standalone_url}
        print(f"gateways: {gateways}", flush=True)
        remotes = {kind: SandboxManager(base_url=url, bearer_token=token) for kind, url in gateways.items()}

        for kind, r in remotes.items():
            print(f"[{kind}] one quiet box, {calls} pairs ...", flush=True)
            out[f"quiet_{kind}"] = asyncio.run(quiet_box(r, m, calls))
        pids = {"actor": row["pid"], "standalone": proc.pid}
        for kind, mgr in (("embedded", m), *remotes.items()):
            settled = _settle(m, workers)
            print(f"[{kind}] {workers} workers x {cycles} cycles (settled in {settled}s) ...", flush=True)
            cpu0 = _cpu_s(pids.get(kind))
            result = asyncio.run(rollout(mgr, workers, cycles))
            cpu = _cpu_s(pids.get(kind))
            if cpu is not None and cpu0 is not None:  # how busy the gateway itself was
                result["gateway_cpu_pct"] = round(100 * (cpu - cpu0) / result["wall_s"], 1)
            out[f"rollout_{kind}"] = {**result, "settled_s": settled}
    finally:
        if proc is not None:
            stop_process(proc, signal.SIGINT, grace=30)
        stop_gateways(cfg.namespace)
        down(m.config)
    return out


def _table(out: dict) -> str:
    from tabulate import tabulate

    rows = []
    for kind in ("actor", "standalone"):
        q = out.get(f"quiet_{kind}")
        if q:
            rows.append([f"quiet box, {kind} gateway", q["proxy_ms"]["p50"], q["direct_ms"]["p50"],
                         q["overhead_p50_ms"], q["paired_difference_p50_ms"], q["call_tool_ms"]["p50"],
                         q["get_info_ms"]["p50"]])
    quiet = tabulate(rows, headers=["echo hi", "/proxy p50", "direct p50", "overhead p50", "paired diff p50",
                                    "POST /call_tool p50", "get_info p50"], tablefmt="simple")
    rows = []
    for kind in ("embedded", "actor", "standalone"):
        r = out.get(f"rollout_{kind}")
        if r:
            rows.append([kind, r["cycles_per_s"], r["acquire_ms"]["p50"], r["acquire_ms"]["p99"], r["tool_ms"]["p50"],
                         r["release_ms"]["p50"], r["release_ms"]["p99"], r["errors"], r.get("gateway_cpu_pct", "")])
    loop = tabulate(rows, headers=["rollout", "cycles/s", "acq p50", "acq p99", "tool p50", "rel p50", "rel p99",
                                   "errors", "gateway CPU %"], tablefmt="simple")
    return f"{quiet}\n\n{loop}"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--calls", type=int, default=200, help="pairs of quiet-box calls per gateway")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        out = run(args.workers, args.cycles, args.calls)
    finally:
        ray.shutdown()
    print()
    print(f"ms; {args.workers} workers x {args.cycles} cycles; {os.cpu_count()} CPUs")
    print(_table(out))
    if args.out:
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
