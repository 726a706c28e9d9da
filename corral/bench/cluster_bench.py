"""Benchmark of corral across nodes: rollouts on one worker node and on two, a tool call that
crosses nodes, and what a live session costs a node.

    python -m corral.bench.cluster_bench [--workers 64] [--episodes 3] [--calls 4] [--pairs 200]
                                         [--sessions 16] [--out FILE.json]

Needs root and ``ip`` (iproute2): it builds a Ray cluster of three nodes on this machine with
:class:`corral.testing.netns.NetnsCluster` (a head on a bridge of its own, 10.213.2.1, and two
worker nodes in network namespaces, 10.213.2.2 and .3, each with two logical CPUs and the
resources ``corral_sandbox`` and ``node_a`` / ``node_b``), uses the process driver, and removes
everything at the end. This process joins the head, so every tool call it makes crosses to a
worker node.

1. **Rollouts**: ``--workers`` asyncio tasks in this process (on the head) run ``--episodes``
   episodes each: ``acquire_async(node="any")``, ``--calls`` shell calls (``echo``, checked),
   release, on a warm reuse pool of ``--workers`` sandboxes. ``one node``: sandboxes on node A only
   (``node_resource="node_a"``); ``two nodes``: on A and B (``corral_sandbox``). Episodes per second,
   acquire, tool-call and release latency.
2. **A call across nodes**: a Ray task on node A holds a sandbox on A and one on B and makes
   ``--pairs`` ``echo`` shell calls to each, in pairs whose order alternates; the overhead is the
   difference of the two p50s (and the p50 of the paired differences).
3. **Live sessions**: ``--sessions`` sessions held open on node A; the unique memory (USS) of
   their session actors and of their boxes' process trees, and how many such sessions the node's
   memory holds next to its sandbox capacity (``max_sandboxes_per_node``'s default for its CPUs).

Figures are printed (and written with ``--out``), never asserted: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from typing import Optional

from corral.bench.machine import idle_cpu_percent, uss
from corral.core.stats import pct, summary

__all__ = ["main", "run"]

MIB = 1 << 20


def _config(root: str, name: str, workers: int, node_resource: str):
    from corral import SandboxManagerEnvConfig, SandboxTypeConfig

    return SandboxManagerEnvConfig(
        namespace=f"cbench-{name}-{uuid.uuid4().hex[:6]}",
        pool_size=workers,
        spare_sessions=workers,
        node_resource=node_resource,
        state_dir=os.path.join(root, name, "state"),
        default_mount_dir=os.path.join(root, name, "mounts"),
        acquire_timeout=600,
        sandbox_types={"base": SandboxTypeConfig(name="base", reuse=True)},
    )


async def _rollouts(m, workers: int, episodes: int, calls: int) -> dict:
    acquire, tool, release, errors = [], [], [], []
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        for e in range(episodes):
            t0 = time.perf_counter()
            try:
                sb = await m.acquire_async(node="any", timeout=600)
            except Exception as ex:  # counted and reported
                errors.append(f"acquire: {type(ex).__name__}: {ex}"[:300])
                continue
            acquire.append((time.perf_counter() - t0) * 1000)
            try:
                for k in range(calls):
                    t0 = time.perf_counter()
                    r = await sb.shell(f"echo {w}-{e}-{k}")
                    tool.append((time.perf_counter() - t0) * 1000)
                    if r.stdout.strip() != f"{w}-{e}-{k}":
                        errors.append(f"shell answered {r.stdout!r}")
                done += 1
            except Exception as ex:
                errors.append(f"shell: {type(ex).__name__}: {ex}"[:300])
            finally:
                t0 = time.perf_counter()
                await sb.release()
                release.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(workers)))
    wall = time.perf_counter() - t0
    return {"episodes_per_s": round(done / wall, 2), "wall_s": round(wall, 1), "errors": len(errors),
            "first_errors": errors[:3], "acquire_ms": summary(acquire), "tool_ms": summary(tool),
            "release_ms": summary(release)}


def _warm(m, target: int, name: str, timeout: float = 900.0) -> None:
    """Wait for ``target`` warm sandboxes, printing the pool's progress (and its last error)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        pool = m.status()["pools"]["base"]
        line = (f"  {name}: warm {pool['warm']}/{target}, starting {pool['starting']}, "
                f"failed {pool['failed_total']}" + (f", last error: {pool['last_error']}" if pool["last_error"] else ""))
        if line != last:
            print(line, flush=True)
            last = line
        if pool["warm"] >= target:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: {pool['warm']} of {target} sandboxes warm after {timeout:.0f}s")
        time.sleep(5)


@contextlib.contextmanager
def _namespace(root: str, name: str, pool: int, node_resource: str):
    """A manager of a namespace of its own with ``pool`` warm sandboxes; taken down after."""
    from corral import SandboxManager
    from corral.manager import down

    m = SandboxManager(_config(root, name, pool, node_resource))
    try:
        _warm(m, pool, name)
        yield m
    finally:
        m.close()
        down(m.config, timeout=120)


def _system(cluster, root: str, name: str, node_resource: str, workers: int, episodes: int, calls: int) -> dict:
    t0 = time.perf_counter()
    with _namespace(root, name, workers, node_resource) as m:
        warm_s = time.perf_counter() - t0
        res = asyncio.run(_rollouts(m, workers, episodes, calls))
        res["pool_warm_s"] = round(warm_s, 1)
        res["sandboxes_per_node"] = {n[:8]: v.get("states", {}) for n, v in m.status()["nodes"].items()}
    print(f"  {name}: {res['episodes_per_s']} episodes/s, acquire p50 {res['acquire_ms']['p50']} ms, "
          f"tool p50 {res['tool_ms']['p50']} ms, errors {res['errors']}", flush=True)
    return res


def _cross_node(cluster, root: str, pairs: int) -> dict:
    import ray

    with _namespace(root, "cross", 2, "corral_sandbox") as m:
        cfg = m.config.model_dump(mode="json")

        @ray.remote(num_cpus=0)
        def calls(config: dict, a: str, b: str, n: int) -> dict:
            from corral import SandboxManager, SandboxManagerEnvConfig

            mgr = SandboxManager(SandboxManagerEnvConfig.model_validate(config))
            same, other = [], []
            with mgr.acquire(node=a) as near, mgr.acquire(node=b) as far:
                for sb in (near, far):
                    for _ in range(10):  # connections open, caches warm
                        sb.shell("echo warm")
                for i in range(n):
                    order = ((near, same), (far, other)) if i % 2 == 0 else ((far, other), (near, same))
                    for sb, out in order:
                        t0 = time.perf_counter()
                        sb.shell("echo hi")
                        out.append((time.perf_counter() - t0) * 1000)
            return {"same": same, "other": other}

        r = ray.get(calls.options(resources={"node_a": 0.01}).remote(cfg, cluster.a.node_id, cluster.b.node_id, pairs))
        same, other = r["same"], r["other"]
        res = {"same_node_ms": summary(same), "other_node_ms": summary(other),
               "overhead_ms_p50_difference": round(pct(other, 50) - pct(same, 50), 3),
               "overhead_ms_p50_of_pairs": round(statistics.median(o - s for o, s in zip(other, same)), 3)}
    print(f"  a shell call from node A: to node A p50 {res['same_node_ms']['p50']} ms, to node B "
          f"{res['other_node_ms']['p50']} ms, overhead {res['overhead_ms_p50_difference']} ms "
          f"(paired: {res['overhead_ms_p50_of_pairs']} ms)", flush=True)
    return res


def _sessions(cluster, root: str, n: int) -> dict:
    import psutil
    import ray

    from corral.actors.handles import SESSION_PREFIX
    from corral.actors.pool_actor import node_driver_config
    from corral.core.placement import default_capacity

    with _namespace(root, "sessions", n, "node_a") as m:
        held = [m.acquire(session_ctx_id=f"live-{i}") for i in range(n)]
        time.sleep(2)  # settle: the sessions' first heartbeats
        sess, pids = [], []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == m.config.namespace and entry["name"].startswith(SESSION_PREFIX):
                d = ray.get(ray.get_actor(entry["name"], namespace=m.config.namespace).describe.remote())
                if d.get("session_ctx_id"):
                    sess.append(uss(d["pid"]))
                    pids.append(d["pid"])
        idle_cpu = idle_cpu_percent(pids, seconds=10.0)
        root_a = node_driver_config(m.config, cluster.a.address).model_dump().get("root")
        boxes = []
        for sb in held:
            try:
                with open(os.path.join(root_a, sb.name, "meta.json")) as f:
                    boxes.append(uss(json.load(f)["pid"], tree=True))
            except (OSError, KeyError, ValueError):
                pass
        for sb in held:
            sb.release()
    sess = [x / MIB for x in sess if x]
    boxes = [x / MIB for x in boxes if x]
    s_mib = statistics.median(sess) if sess else None
    b_mib = statistics.median(boxes) if boxes else None
    cpus = 2
    capacity = default_capacity(cpus, psutil.virtual_memory().total)
    per = (s_mib or 0) + (b_mib or 0)
    res = {"sessions_held": len(held), "session_actor_uss_mib": round(s_mib, 1) if s_mib else None,
           "box_uss_mib": round(b_mib, 1) if b_mib else None, "mib_per_live_session": round(per, 1),
           "node_capacity_default": capacity,
           "memory_for_capacity_gib": round(capacity * per / 1024, 2),
           "sessions_the_memory_holds": int(psutil.virtual_memory().total / MIB // per) if per else None,
           "session_actor_idle_cpu_percent": idle_cpu,
           "session_actors_measured": len(sess), "boxes_measured": len(boxes)}
    print(f"  a live session: session actor {res['session_actor_uss_mib']} MiB + box {res['box_uss_mib']} MiB "
          f"(USS), {idle_cpu}% of a CPU while idle; a node of {cpus} CPUs holds {capacity} sandboxes by default, "
          f"{res['memory_for_capacity_gib']} GiB of live sessions", flush=True)
    return res


def run(workers: int = 64, episodes: int = 3, calls: int = 4, pairs: int = 200, sessions: int = 16) -> dict:
    """The three measures; call it before this process uses Ray (it joins the cluster it builds,
    whose nodes use token auth, and Ray reads its auth mode once)."""
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    from corral.testing.netns import NetnsCluster, netns_problem

    problem = netns_problem()
    if problem:
        raise SystemExit(f"cluster_bench: {problem}")
    root = tempfile.mkdtemp(prefix="corral-cbench-")
    cluster = NetnsCluster(tag="cbn", subnet="10.213.2")
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": _machine(),
                 "params": {"workers": workers, "episodes": episodes, "calls": calls, "pairs": pairs,
                            "sessions": sessions}}
    try:
        print("starting a head and two worker nodes in network namespaces", flush=True)
        cluster.start()
        cluster.a = cluster.add_worker({"corral_sandbox": 64, "node_a": 1}, num_cpus=2)
        cluster.b = cluster.add_worker({"corral_sandbox": 64, "node_b": 1}, num_cpus=2)
        os.environ.update({k: v for k, v in cluster.head.env.items() if k.startswith("RAY_")})
        ray.init(address=cluster.head.address, namespace="corral-cluster-bench", log_to_driver=False)
        ids = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for w in cluster.workers:
            w.node_id = ids[w.address]
        print(f"rollouts: {workers} workers x {episodes} episodes x {calls} shell calls", flush=True)
        out["one_node"] = _system(cluster, root, "one-node", "node_a", workers, episodes, calls)
        out["two_nodes"] = _system(cluster, root, "two-nodes", "corral_sandbox", workers, episodes, calls)
        print(f"a call across nodes: {pairs} pairs", flush=True)
        out["cross_node"] = _cross_node(cluster, root, pairs)
        print(f"live sessions: {sessions} held on node A", flush=True)
        out["sessions"] = _sessions(cluster, root, sessions)
        return out
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()


def _machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
            "python": platform.python_version(), "ray": __import__("ray").__version__}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corral.bench.cluster_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--episodes", type=int, default=3)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=200, help="pairs of calls, same node and across nodes")
    ap.add_argument("--sessions", type=int, default=16, help="live sessions held on one node for the memory figure")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    a = ap.parse_args(argv)
    for name in ("workers", "episodes", "calls", "pairs", "sessions"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be at least 1")
    from corral.bench import emit_json

    res = run(a.workers, a.episodes, a.calls, a.pairs, a.sessions)
    emit_json(res, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
