"""A Ray job whose rollout workers use corral: submit it with ``ray job submit``.

The driver (this script, run by the job) starts corral's actors in their own
namespace, or joins them if they are already up, warms the pool, then runs N
rollout workers as Ray tasks. Each worker finds corral's actors BY NAME from
inside the task (``SandboxManager(config)`` there joins the cluster the task
already belongs to: ``ray.is_initialized()`` is true in a task, and the actors
are looked up in the config's namespace) and plays a few episodes:

    acquire (a warm sandbox bound to a new session, with an env)
    -> shell calls (one of them fails on purpose: a failed *command* is a result)
    -> Python calls (the kernel keeps state between calls)
    -> a file written and read back
    -> release

Every worker returns one record per episode. The driver prints a table and a
``SUMMARY`` line, tears corral down (``corral.manager.cluster.down``) unless
``--keep``, and exits 0 only if every episode succeeded (and, when it tore
corral down, no sandbox was left).

Run (see README.md in this directory)::

    ray job submit --address http://127.0.0.1:8265 --working-dir examples/ray_job -- python rollout_job.py --small
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
import traceback
import uuid

import ray

from corral import SandboxManager, SandboxManagerEnvConfig
from corral.manager import down


def make_config(opts: dict) -> SandboxManagerEnvConfig:
    """The same config in the driver and in every worker (built from plain options, so it ships as a dict)."""
    return SandboxManagerEnvConfig(
        namespace=opts["namespace"],
        pool_size=opts["pool_size"],
        # Absolute paths: the job (and each worker) runs in a temp copy of the working dir.
        state_dir=os.path.join(opts["state_root"], "state"),
        default_mount_dir=os.path.join(opts["state_root"], "mounts"),
        acquire_timeout=opts["acquire_timeout"],
        spare_sessions=1,
    )


def play_episode(m: SandboxManager, worker: int, episode: int, calls: int) -> dict:
    """One trajectory: acquire, tool calls, release. Returns its record; never raises."""
    rec = {"worker": worker, "episode": episode, "ok": False, "sandbox": "-", "calls": 0, "error": "",
           "acquire_s": 0.0, "total_s": 0.0}
    t0 = time.monotonic()
    session = f"w{worker}-e{episode}-{uuid.uuid4().hex[:8]}"
    try:
        with m.acquire(session_ctx_id=session, env={"EPISODE": f"{worker}.{episode}"}) as sb:
            rec["acquire_s"] = time.monotonic() - t0
            rec["sandbox"] = sb.name
            r = sb.shell("echo episode $EPISODE; pwd").check()
            assert r.stdout.splitlines()[0] == f"episode {worker}.{episode}", r.stdout
            rec["calls"] += 1
            # A failing command is a result, not an error of the sandbox.
            r = sb.shell("echo oops >&2; exit 3")
            assert r.exit_code == 3 and not r.ok and r.stderr.strip() == "oops", r
            rec["calls"] += 1
            # The kernel keeps state between calls.
            r = sb.python(f"acc = {worker * 100 + episode}")
            assert r.ok, r
            rec["calls"] += 1
            for i in range(calls):
                r = sb.python(f"acc = acc * 2 + {i}\nacc")
                assert r.ok, r
                rec["calls"] += 1
            expect = worker * 100 + episode
            for i in range(calls):
                expect = expect * 2 + i
            if calls:
                assert r.text == str(expect), (r.text, expect)
            sb.write("out/answer.txt", f"{expect}\n")
            r = sb.shell("cat out/answer.txt").check()
            assert r.stdout.strip() == str(expect), r.stdout
            rec["calls"] += 2
            r = sb.python("import os\nos.environ['EPISODE']")
            assert r.text == repr(f"{worker}.{episode}"), r.text
            rec["calls"] += 1
        rec["ok"] = True
    except Exception as e:  # an episode's failure is reported, not raised: the driver counts them
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc()
    rec["total_s"] = time.monotonic() - t0
    return rec


@ray.remote(max_retries=0)
def rollout_worker(worker: int, opts: dict) -> dict:
    """A rollout worker (a Ray task): joins corral by name and plays ``opts['episodes']`` episodes."""
    from corral.actors.handles import REGISTRY_NAME

    info = {"worker": worker, "pid": os.getpid(), "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id()[:8],
            "ray_initialized": ray.is_initialized(), "found_by_name": False, "episodes": [], "error": ""}
    try:
        # The actors the driver started, found by name from inside the task.
        cfg = make_config(opts)
        ray.get(ray.get_actor(REGISTRY_NAME, namespace=cfg.namespace).ping.remote())
        info["found_by_name"] = True
        m = SandboxManager(cfg)  # already connected to Ray: it joins this cluster and namespace
        try:
            for ep in range(opts["episodes"]):
                info["episodes"].append(play_episode(m, worker, ep, opts["calls"]))
        finally:
            m.close()
    except Exception as e:
        info["error"] = f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc()
    return info


def print_table(rows: list[dict]) -> None:
    cols = ["worker", "episode", "ok", "sandbox", "calls", "acquire_s", "total_s", "error"]
    fmt = lambda r, c: f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c])  # noqa: E731
    width = {c: max(len(c), *(len(fmt(r, c)) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    print("  ".join("-" * width[c] for c in cols))
    for r in rows:
        print("  ".join(fmt(r, c).ljust(width[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=4, help="rollout workers (Ray tasks)")
    p.add_argument("--episodes", type=int, default=3, help="episodes per worker")
    p.add_argument("--calls", type=int, default=3, help="extra Python calls per episode")
    p.add_argument("--small", action="store_true", help="a quick run: 2 workers x 2 episodes, 1 extra call")
    p.add_argument("--namespace", default="corral-job", help="corral's Ray namespace")
    p.add_argument("--pool-size", type=int, default=None, help="warm sandboxes (default: one per worker)")
    p.add_argument("--state-root", default=None,
                   help="absolute dir for corral's state and workspaces (default: <tmp>/corral-job-<namespace>)")
    p.add_argument("--worker-cpus", type=float, default=0.5, help="CPUs each rollout task asks Ray for")
    p.add_argument("--acquire-timeout", type=float, default=60.0)
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, set by `ray job submit`)")
    p.add_argument("--keep", action="store_true", help="leave corral's actors and pool running at the end")
    a = p.parse_args(argv)
    if a.small:
        a.workers, a.episodes, a.calls = 2, 2, 1
    state_root = os.path.abspath(a.state_root or os.path.join(tempfile.gettempdir(), f"corral-job-{a.namespace}"))
    opts = {"namespace": a.namespace, "pool_size": a.pool_size if a.pool_size is not None else a.workers,
            "state_root": state_root, "acquire_timeout": a.acquire_timeout,
            "episodes": a.episodes, "calls": a.calls}
    cfg = make_config(opts)

    t0 = time.monotonic()
    m = SandboxManager(cfg, address=a.address)  # joins the job's cluster (RAY_ADDRESS) and starts the actors
    ctx = ray.get_runtime_context()
    print(f"corral: namespace={cfg.namespace!r} state={state_root} job={ctx.get_job_id()} "
          f"gcs={ctx.gcs_address} driver_pid={os.getpid()}", flush=True)
    rows: list[dict] = []
    worker_errors: list[str] = []
    left = 0
    try:
        stats = m.reserve(n=0, wait=True)
        print(f"pool warm after {time.monotonic() - t0:.1f}s: {stats}", flush=True)
        refs = [rollout_worker.options(num_cpus=a.worker_cpus).remote(w, opts) for w in range(a.workers)]
        for info in ray.get(refs):
            print(f"worker {info['worker']}: pid={info['pid']} node={info['node']} "
                  f"ray_initialized={info['ray_initialized']} found_by_name={info['found_by_name']}", flush=True)
            if info["error"]:
                worker_errors.append(f"worker {info['worker']}: {info['error']}")
            rows.extend(info["episodes"])
        rows.sort(key=lambda r: (r["worker"], r["episode"]))
        print()
        print_table(rows)
        print()
    finally:
        m.close()
        if a.keep:
            print(f"--keep: corral's actors stay up in namespace {cfg.namespace!r}", flush=True)
        else:
            out = down(cfg)
            left = out["containers_left"]
            print(f"down: released={len(out['released'])} actors={out['actors']} containers_left={left}", flush=True)

    expected = a.workers * a.episodes
    ok = sum(1 for r in rows if r["ok"])
    success = ok == expected and not worker_errors and left == 0
    for e in worker_errors:
        print(e)
    print(f"SUMMARY: workers={a.workers} episodes={len(rows)}/{expected} ok={ok} failed={len(rows) - ok} "
          f"calls={sum(r['calls'] for r in rows)} seconds={time.monotonic() - t0:.1f} "
          f"result={'SUCCEEDED' if success else 'FAILED'}", flush=True)
    return 0 if success else 1


if __name__ == "__main__":
    sys.exit(main())
