"""Benchmark of a warm pool at rest: what keeping many warm sandboxes on a node costs its actors.

    python -m corral.bench.warm_bench [--sandboxes 200] [--seconds 30] [--out FILE.json]

On a local single-node Ray cluster with the process driver, a namespace of its own with a pool of
``--sandboxes`` (the node's capacity raised to hold them): the time until all are warm, then the
CPU of the pool actor and of the registry over ``--seconds`` with no call at all (what is left is
the registry's upkeep: its tick, reconciliation, the health probes of the warm sandboxes), in
percent of one CPU, and how many warm sandboxes are left at the end (a probe that fails its boxes
makes the registry replace them).

Memory: a box takes about 27 MiB; the benchmark refuses a pool the machine's available memory
cannot hold with 2 GiB to spare. Figures are printed (and written with ``--out``), never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from typing import Optional

from corral.bench.machine import idle_cpu_percent
from corral.bench.sessions_bench import BOX_MIB, SPARE_GIB, _available_gib, _say

__all__ = ["main", "run"]


async def _run(n: int, seconds: float, root: str) -> dict:
    from corral import SandboxManager, SandboxManagerEnvConfig
    from corral.manager import down

    need = n * BOX_MIB / 1024 + SPARE_GIB
    avail = _available_gib()
    if avail < need:
        _say(f"skipped: {n} sandboxes need about {need:.1f} GiB available, the machine has {avail:.1f}")
        return {"sandboxes": n, "skipped": f"{avail:.1f} GiB available, {need:.1f} GiB needed"}
    cfg = SandboxManagerEnvConfig(
        namespace=f"wbench-{uuid.uuid4().hex[:6]}", pool_size=n, max_sandboxes_per_node=n + 8,
        max_starting_per_node=2, watcher_scan_interval=1.0,
        state_dir=os.path.join(root, "state"), default_mount_dir=os.path.join(root, "mounts"),
    )
    res: dict = {"sandboxes": n, "seconds": seconds}
    m = SandboxManager(cfg)
    try:
        t0 = time.perf_counter()
        last = 0.0
        while True:
            st = await m.status_async()
            pool = st["pools"]["base"]
            if pool["warm"] >= n:
                break
            if time.perf_counter() - last >= 10:
                _say(f"  warm {pool['warm']}/{n}, starting {pool['starting']}")
                last = time.perf_counter()
            if time.perf_counter() - t0 > 900:
                raise RuntimeError(f"only {pool['warm']} of {n} warm after 900 s")
            await asyncio.sleep(1.0)
        res["warm_all_s"] = round(time.perf_counter() - t0, 1)
        pool_pid = pool["actors"][0]["pid"]
        _say(f"{n} warm in {res['warm_all_s']} s; {seconds:.0f} s at rest ...")
        await asyncio.sleep(2 * 5.0)  # past the first round of probes of the last ones to turn warm
        pool_cpu, reg_cpu = await asyncio.gather(asyncio.to_thread(idle_cpu_percent, [pool_pid], seconds),
                                                 asyncio.to_thread(idle_cpu_percent, [st["pid"]], seconds))
        pool = (await m.status_async())["pools"]["base"]
        res.update({"pool_actor_cpu_percent": pool_cpu, "registry_cpu_percent": reg_cpu,
                    "warm_at_end": pool["warm"], "dropped_unhealthy": pool["dropped_unhealthy"]})
        _say(f"pool actor {pool_cpu}% of a CPU, registry {reg_cpu}%, over {seconds:.0f} s with {n} warm "
             f"sandboxes at rest; {pool['warm']} warm at the end, {pool['dropped_unhealthy']} replaced as unhealthy")
    finally:
        m.close()
        out = await asyncio.to_thread(down, cfg, 120)
        res["containers_left"] = out["containers_left"]
        _say(f"down: {out['containers_left']} containers left")
    return res


def run(n: int, seconds: float = 30.0) -> dict:
    """The figures of one pool of ``n``; Ray must be initialized."""
    return asyncio.run(_run(n, seconds, tempfile.mkdtemp(prefix="corral-wbench-")))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corral.bench.warm_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sandboxes", type=int, default=200, help="warm sandboxes in the pool")
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds of rest measured")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    a = ap.parse_args(argv)
    if a.sandboxes < 1 or a.seconds <= 0:
        ap.error("need --sandboxes >= 1 and --seconds > 0")
    from corral.bench import on_local_ray

    on_local_ray(lambda: {"warm": run(a.sandboxes, a.seconds)}, vars(a), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
