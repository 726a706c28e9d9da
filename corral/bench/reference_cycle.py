"""The cycle workload on the reference sandbox manager (agentscope-runtime), for ``corral bench --workload cycle``.

    /path/to/refvenv/bin/python reference_cycle.py --image corral-box:latest [--workers 32] [--duration 40] [--pool-size 8]

Run by :mod:`corral.bench.cycle` with the interpreter of a separate virtualenv
that has ``agentscope-runtime`` installed; it imports nothing of corral (its
packages would clash with the reference's). It registers a sandbox type whose
image is corral's box image (which serves the reference's in-sandbox routes
under ``/fastapi``), runs the reference's ``SandboxManager`` (Docker, local
state, its watcher refilling a pool of ``--pool-size``) inside a ``with``
block, and has ``--workers`` threads loop ``create_from_pool`` /
``call_tool(name, "run_shell_command", ...)`` / ``release`` for
``--duration`` seconds. It prints one JSON line: the samples, cycles within
the window and the machine's busy CPU seconds over it (/proc/stat).

Two adjustments, both to how containers are published, none to the manager's
logic: the box listens on port 8000 (the reference's images on 80), and ports
are published on 127.0.0.1 only (the reference publishes on every interface).
Its containers carry the label ``corral.bench=reference`` and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import uuid

BOX_PORT = "8000/tcp"


def _busy(before, after):
    hz = os.sysconf("SC_CLK_TCK")
    return round(((after[1] - before[1]) - (after[0] - before[0])) / hz, 2)


def _cpu():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return fields[3] + fields[4], sum(fields)


def _publish_on_loopback() -> None:
    """The reference asks for its images' port 80 on a free host port of every interface: ask for
    the box's port 8000 on 127.0.0.1 instead, and label the container for cleanup."""
    from docker.models.containers import ContainerCollection

    run = ContainerCollection.run

    def patched(self, image, command=None, **kw):
        ports = kw.get("ports") or {}
        kw["ports"] = {BOX_PORT: ("127.0.0.1", hp) for _cp, hp in ports.items()}
        kw["labels"] = {**(kw.get("labels") or {}), "corral.bench": "reference"}
        return run(self, image, command, **kw)

    ContainerCollection.run = patched


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--pool-size", type=int, default=8)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from agentscope_runtime.sandbox.manager.sandbox_manager import SandboxManager
    from agentscope_runtime.sandbox.model.manager_config import SandboxManagerEnvConfig
    from agentscope_runtime.sandbox.registry import SandboxRegistry
    from agentscope_runtime.version import __version__

    _publish_on_loopback()

    @SandboxRegistry.register(args.image, sandbox_type="corralbox", timeout=60, description="corral's box image")
    class CorralBox:  # the registry maps the type to this class's config
        pass

    mounts = tempfile.mkdtemp(prefix="corral-cycle-ref-")
    config = SandboxManagerEnvConfig(file_system="local", redis_enabled=False, container_deployment="docker",
                                     pool_size=args.pool_size, default_mount_dir=mounts)
    acquire, shell, release, errors = [], [], [], []
    lock = threading.Lock()
    cycles = [0]
    with SandboxManager(config, default_type="corralbox") as m:
        t0 = time.monotonic()
        while m.pool_queues and sum(q.size() for q in m.pool_queues.values()) < args.pool_size:
            if time.monotonic() - t0 > 300:
                break
            time.sleep(0.5)
        start = time.monotonic()
        deadline = start + args.duration
        tag = uuid.uuid4().hex[:6]

        def worker(wid: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                i += 1
                a = time.perf_counter()
                try:
                    name = m.create_from_pool(meta={"session_ctx_id": f"ref-{tag}-{wid}-{i}"})
                    if name is None:
                        raise RuntimeError("create_from_pool returned None")
                except Exception as e:
                    with lock:
                        errors.append(f"acquire: {type(e).__name__}: {e}"[:300])
                    time.sleep(0.05)
                    continue
                b = time.perf_counter()
                ok = True
                try:
                    out = m.call_tool(name, "run_shell_command", {"command": "echo cyc"})
                    text = out["content"][0]["text"] if isinstance(out, dict) and out.get("content") else str(out)
                    if out.get("isError") or text.strip() != "cyc":
                        ok = False
                        with lock:
                            errors.append(f"shell: {out!r}"[:300])
                except Exception as e:
                    ok = False
                    with lock:
                        errors.append(f"shell: {type(e).__name__}: {e}"[:300])
                c = time.perf_counter()
                try:
                    if not m.release(name):
                        raise RuntimeError("release returned False")
                except Exception as e:
                    ok = False
                    with lock:
                        errors.append(f"release: {type(e).__name__}: {e}"[:300])
                d = time.perf_counter()
                with lock:
                    acquire.append((b - a) * 1000)
                    shell.append((c - b) * 1000)
                    release.append((d - c) * 1000)
                    if ok and time.monotonic() <= deadline:
                        cycles[0] += 1

        window = {}

        def at_deadline() -> None:
            window["cpu"] = _cpu()
            window["t"] = time.monotonic()

        cpu0 = _cpu()
        timer = threading.Timer(args.duration, at_deadline)
        timer.start()
        threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(args.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        timer.join()
        drain = time.monotonic() - deadline
    # each cycle's create_from_pool took one sandbox, and the pool's watcher started one to replace it
    print(json.dumps({"version": __version__, "acquire": acquire, "shell": shell, "release": release,
                      "errors": errors, "cycles": cycles[0], "starts": len(acquire),
                      "wall_s": round(window["t"] - start, 2), "busy_cpu_s": _busy(cpu0, window["cpu"]),
                      "drain_s": round(drain, 2)}))
    _remove_leftovers()
    return 0


def _remove_leftovers() -> None:
    import docker

    client = docker.from_env()
    try:
        for c in client.containers.list(all=True, filters={"label": "corral.bench=reference"}):
            try:
                c.remove(force=True)
            except Exception:
                pass
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
