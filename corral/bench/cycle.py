"""The cold path under load: ``corral bench --workload cycle``.

    corral bench --workload cycle [--driver docker] [--workers 32] [--duration 40] [--pool-size 8]
                 [--systems destroy,reuse,bare,reference] [--reference-python PY] [--out DIR]

``W`` threads of one process loop for ``D`` seconds, each cycle through the
reference's sync API: ``create_from_pool(meta={"session_ctx_id": ...})``, one
``call_tool(name, "run_shell_command", {"command": "echo cyc"})``, then
``release(name)``. Systems, one after the other on one Ray cluster (each corral
system in a namespace of its own, torn down with ``down()`` after it):

- ``destroy``: corral, ``reuse=False`` (a released sandbox is destroyed: the
  reference's behaviour and corral's default), warm pool of ``P``;
- ``reuse``: corral, ``reuse=True`` (a released sandbox is reset and goes back
  to the pool), warm pool of ``P``;
- ``bare``: the physical limit of the loop, without corral: per cycle a
  container (docker-py ``create_container`` + ``start`` of the same image, its
  port published on 127.0.0.1) or a box process (``python -m corral.box``,
  process driver) is started, its box polled until it answers, sent the shell
  call over HTTP and removed;
- ``reference`` (with ``--reference-python``): the reference sandbox manager
  (agentscope-runtime), installed in a separate virtualenv, driven by the same
  loop in a subprocess of that interpreter (:mod:`corral.bench.reference_cycle`)
  against the same image (Docker only).

Per system: cycles/s (cycles finished within the ``D`` seconds), errors,
acquire / first shell call / release latency (p50, p95, p99 in ms), sandboxes
started in the window, CPU seconds per started sandbox (the whole machine's
busy time from /proc/stat over the window, divided by the starts; the
machine's background load, measured before the first system, is reported next
to it), memory per sandbox (Docker: the container's cgroup, less page cache;
process: the box's process tree, USS), and for corral systems the registry's
``status()`` sampled every second under load (``starts_in_flight``,
``waiting_for_warm``, ``waiting_for_slot``) with the checks that they agree
with the pool's own counts, the node's start limit and the number of callers
waiting. Before the systems, ``--cold-starts`` quiet rounds of one cold create
to its first shell answer through corral (pool 0) next to a bare start to box
ready (``cold_start``).

With ``--start-limits 1,2,4,8`` it measures instead how the number of starts
a node runs at once (``max_starting_per_node``) shapes the ``destroy`` system:
one run per limit, cycles/s and start latency against starts in flight (the
knee that ``corral.core.placement.default_start_limit`` is set from).

Writes ``DIR/cycle.json`` and ``DIR/cycle.png`` and prints a table and the
targets. Figures are measured and printed, never asserted.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from corral.bench import write_json
from corral.bench.machine import cpu_times
from corral.core.stats import summary

__all__ = ["CycleParams", "run", "run_cli", "add_arguments", "table", "targets", "write_figure", "SYSTEMS"]

SYSTEMS = ("destroy", "reuse", "bare", "reference")
COMMAND = "echo cyc"
EXPECT = "cyc"
#: Targets of the cold path (printed, never asserted).
TARGET_DESTROY_CPS = 2.7
TARGET_REUSE_CPS = 19.0
TARGET_BARE_RATIO = 1.3
TARGET_COLD_EXTRA_MS = 100.0
_POLL = 0.02


@dataclass
class CycleParams:
    workers: int = 32
    duration: float = 40.0
    pool_size: int = 8
    driver: str = "process"
    image: str = "corral-box:latest"
    systems: tuple = ()  # empty: destroy, reuse, bare (+ reference with reference_python)
    cold_starts: int = 5  # quiet rounds of one cold start, corral and bare (0: none)
    reference_python: Optional[str] = None
    max_starting_per_node: Optional[int] = None  # None: corral's default (from the node's CPUs)
    start_limits: tuple = ()  # a sweep of max_starting_per_node over the destroy system instead of the systems
    timeout: float = 120.0  # seconds an acquire may wait
    progress: bool = True
    namespace_prefix: str = "corral-cycle"
    session_mode: str = "actor"  # SandboxManagerEnvConfig.session_mode of corral's systems

    def validate(self) -> "CycleParams":
        from corral.errors import InvalidRequest

        for name in ("workers", "pool_size", "cold_starts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "workers" else 0):
                raise InvalidRequest(f"{name} must be an integer >= {1 if name == 'workers' else 0}, got {v!r}")
        if self.workers > 512:
            raise InvalidRequest(f"workers must be at most 512, got {self.workers}")
        if not isinstance(self.duration, (int, float)) or isinstance(self.duration, bool) or self.duration <= 0:
            raise InvalidRequest(f"duration must be a number of seconds > 0, got {self.duration!r}")
        if self.session_mode not in ("actor", "hosted"):
            raise InvalidRequest(f"session_mode must be 'actor' or 'hosted', got {self.session_mode!r}")
        if self.driver not in ("process", "docker"):
            raise InvalidRequest(f"driver must be 'process' or 'docker', got {self.driver!r}")
        if self.max_starting_per_node is not None and (
                isinstance(self.max_starting_per_node, bool) or not isinstance(self.max_starting_per_node, int)
                or self.max_starting_per_node < 1):
            raise InvalidRequest(f"max_starting_per_node must be an integer >= 1, got {self.max_starting_per_node!r}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.start_limits):
            raise InvalidRequest(f"start_limits must be integers >= 1, got {list(self.start_limits)!r}")
        systems = tuple(self.systems) or tuple(s for s in SYSTEMS if s != "reference" or self.reference_python)
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown:
            raise InvalidRequest(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
        if "reference" in systems:
            if not self.reference_python:
                raise InvalidRequest("system 'reference' needs --reference-python (the interpreter of a virtualenv "
                                     "with agentscope-runtime installed)")
            if self.driver != "docker":
                raise InvalidRequest("system 'reference' needs --driver docker")
        self.systems = tuple(s for s in SYSTEMS if s in systems)
        return self


# -- the loop -----------------------------------------------------------------------------


class Samples:
    """What the loop measured for one system (thread-safe appends)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acquire: list[float] = []
        self.shell: list[float] = []
        self.release: list[float] = []
        self.errors: list[str] = []
        self.cycles = 0  # cycles finished within the window
        self.in_acquire = 0  # callers inside create_from_pool right now

    def error(self, what: str) -> None:
        with self.lock:
            self.errors.append(what[:300])


@dataclass
class Ops:
    """One system's three steps: ``acquire(session) -> handle``, ``shell(handle) -> stdout``, ``release(handle)``."""

    acquire: Callable[[str], Any]
    shell: Callable[[Any], str]
    release: Callable[[Any], None]


def _loop(p: CycleParams, ops: Ops, s: Samples, label: str,
          on_deadline: Optional[Callable[[], None]] = None) -> dict:
    """W threads run cycles for D seconds; returns the window's wall, CPU and cycle figures."""
    start = time.monotonic()
    deadline = start + p.duration
    tag = uuid.uuid4().hex[:6]

    def worker(wid: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            session = f"cyc-{tag}-{wid}-{i}"
            i += 1
            with s.lock:
                s.in_acquire += 1
            t0 = time.perf_counter()
            try:
                h = ops.acquire(session)
            except Exception as e:  # counted and reported, never hidden
                s.error(f"acquire: {type(e).__name__}: {e}")
                time.sleep(0.05)
                continue
            finally:
                with s.lock:
                    s.in_acquire -= 1
            t1 = time.perf_counter()
            ok = True
            try:
                out = ops.shell(h)
                t2 = time.perf_counter()
                if out.strip() != EXPECT:
                    ok = False
                    s.error(f"shell: stdout {out!r}")
            except Exception as e:
                t2 = time.perf_counter()
                ok = False
                s.error(f"shell: {type(e).__name__}: {e}")
            try:
                ops.release(h)
            except Exception as e:
                ok = False
                s.error(f"release: {type(e).__name__}: {e}")
            t3 = time.perf_counter()
            with s.lock:
                s.acquire.append((t1 - t0) * 1000)
                s.shell.append((t2 - t1) * 1000)
                s.release.append((t3 - t2) * 1000)
                if ok and time.monotonic() <= deadline:
                    s.cycles += 1

    window: dict = {}
    split = CpuSplit()

    def at_deadline() -> None:
        window["cpu_after"] = cpu_times()
        window["t_after"] = time.monotonic()
        window["cpu_by_kind"] = split.stop()
        if on_deadline is not None:
            on_deadline()

    threads = [threading.Thread(target=worker, args=(w,), name=f"cycle-{w}", daemon=True) for w in range(p.workers)]
    window["cpu_before"] = cpu_times()
    split.start()
    timer = threading.Timer(p.duration, at_deadline)
    timer.start()
    for t in threads:
        t.start()
    _progress(p, label, s, deadline)
    for t in threads:
        t.join()
    timer.join()
    wall = window["t_after"] - start
    busy = _busy_seconds(window["cpu_before"], window["cpu_after"])
    by_kind = window["cpu_by_kind"]
    if busy is not None:
        by_kind["unattributed"] = round(max(0.0, busy - sum(by_kind.values())), 2)
    return {"wall_s": round(wall, 2), "busy_cpu_s": busy, "drain_s": round(time.monotonic() - deadline, 2),
            "cpu_s_by_kind": by_kind}


def _progress(p: CycleParams, label: str, s: Samples, deadline: float) -> None:
    if not p.progress:
        return
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        print(f"  [{label}] {s.cycles} cycles, {len(s.errors)} errors, {max(0, deadline - time.monotonic()):.0f}s left",
              file=sys.stderr, flush=True)


def _busy_seconds(before: Optional[tuple[int, int]], after: Optional[tuple[int, int]]) -> Optional[float]:
    """CPU seconds the whole machine spent busy between two /proc/stat readings."""
    if before is None or after is None:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return round(((after[1] - before[1]) - (after[0] - before[0])) / hz, 2)


class CpuSplit:
    """Where the machine's CPU time goes while the loop runs, by kind of process.

    Samples every process's CPU time from /proc every ``every`` seconds; a process counts with
    the last time it was seen, so what processes that live shorter than a sample (iptables,
    runc, a launcher) spend shows up as ``unattributed`` (the whole machine's busy time, from
    /proc/stat, less the rest)."""

    KINDS = ("sandboxes", "engine", "corral_actors", "ray", "bench", "other")

    def __init__(self, every: float = 0.25) -> None:
        self.every = every
        self.hz = os.sysconf("SC_CLK_TCK")
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cycle-cpu", daemon=True)
        self.me = os.getpid()

    def start(self) -> "CpuSplit":
        self._sample(self.first)
        self.last = dict(self.first)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample(self.last)
        out = dict.fromkeys(self.KINDS, 0.0)
        for pid, (kind, t) in self.last.items():
            base = self.first.get(pid, (kind, 0.0))[1]
            out[kind] += max(0.0, t - base)
        return {k: round(v, 2) for k, v in out.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample(self.last)

    def _kind(self, pid: int, comm: str) -> str:
        if pid == self.me:
            return "bench"
        if comm in ("dockerd", "containerd", "docker-proxy", "runc") or comm.startswith("containerd-shim"):
            return "engine"
        if comm.startswith(("ray::RegistryActor", "ray::PoolActor", "ray::SessionActor")):
            return "corral_actors"
        if comm in ("raylet", "gcs_server") or comm.startswith("ray::"):
            return "ray"
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                if "/docker/" in f.read():
                    return "sandboxes"
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            if b"corral.box" in cmd or b"kernel_main.py" in cmd:
                return "sandboxes"
        except OSError:
            pass
        return "other"

    def _sample(self, into: dict) -> None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2:].split()
            t = (int(fields[11]) + int(fields[12])) / self.hz  # utime + stime
            known = into.get(pid)
            into[pid] = (known[0] if known else self._kind(pid, comm), t)


def background_cpus(seconds: float = 3.0) -> Optional[float]:
    """Busy CPUs of the machine while this benchmark does nothing (other tenants, idle actors)."""
    before = cpu_times()
    time.sleep(seconds)
    busy = _busy_seconds(before, cpu_times())
    return None if busy is None else round(busy / seconds, 3)


def _result(p: CycleParams, s: Samples, window: dict, starts: Optional[int], background: Optional[float]) -> dict:
    busy = window["busy_cpu_s"]
    wall = window["wall_s"]
    net = None if busy is None or background is None else busy - background * wall
    return {
        "cycles_per_s": round(s.cycles / p.duration, 3),
        "cycles": s.cycles,
        "errors": len(s.errors),
        "first_errors": s.errors[:3],
        "acquire_ms": summary(s.acquire),
        "first_shell_ms": summary(s.shell),
        "release_ms": summary(s.release),
        "starts": starts,
        "busy_cpus": None if busy is None else round(busy / wall, 2),
        "cpu_s_per_start": round(busy / starts, 3) if busy is not None and starts else None,
        "cpu_s_per_cycle": round(busy / s.cycles, 3) if busy is not None and s.cycles else None,
        "cpu_s_per_start_less_background": round(net / starts, 3) if net is not None and starts else None,
        # the same per started sandbox, by kind of process (see CpuSplit)
        "cpu_s_per_start_by_kind": {k: round(v / starts, 3) for k, v in window["cpu_s_by_kind"].items()}
        if starts and window.get("cpu_s_by_kind") else None,
        **window,
    }


# -- corral --------------------------------------------------------------------------------


def _config(p: CycleParams, reuse: bool, pool: int, workdir: str, label: str):
    from corral.bench.rollout import bench_config

    kw: dict = {}
    if p.max_starting_per_node is not None:
        kw["max_starting_per_node"] = p.max_starting_per_node
    if p.driver == "process":  # the boxes' directories in this run's own place
        kw["driver"] = {"type": "process", "root": os.path.join(workdir, label, "process")}
    return bench_config(p, label, workdir, pool, reuse, **kw)


def _corral_ops(m) -> Ops:
    def shell(name: str) -> str:
        out = m.call_tool(name, "run_shell_command", {"command": COMMAND})
        if out.get("isError"):
            raise RuntimeError(f"shell call failed: {out}")
        return out["content"][0]["text"]

    return Ops(acquire=lambda session: m.create_from_pool(meta={"session_ctx_id": session}), shell=shell,
               release=m.release)


def _wait_warm(m, p: CycleParams, n: int) -> float:
    t0 = time.perf_counter()
    deadline = time.monotonic() + max(p.timeout, 300.0)
    if n:
        m.reserve(n=0, wait=True, timeout=max(p.timeout, 300.0))
    # session actors are started ahead of need: let them all be up so no acquire waits for a process
    while m.status()["spare_session_actors"] < min(p.workers, 256) and time.monotonic() < deadline:
        time.sleep(0.2)
    return round(time.perf_counter() - t0, 2)


class StatusProbe:
    """Samples the registry's ``status()`` every second under load and checks its queue figures,
    and counts the sandboxes the driver holds (released ones not yet removed are the removal
    backlog)."""

    def __init__(self, m, s: Samples) -> None:
        self.m, self.s = m, s
        self.rows: list[dict] = []
        self._count = _sandbox_counter(m)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cycle-status", daemon=True)

    def start(self) -> "StatusProbe":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with self.s.lock:
                before = self.s.in_acquire
            try:
                st = self.m.status()
            except Exception as e:
                self.rows.append({"error": f"{type(e).__name__}: {e}"})
                continue
            with self.s.lock:
                after = self.s.in_acquire
            pool = st["pools"]["base"]
            try:
                held = self._count()
            except Exception:
                held = None
            self.rows.append({
                "held_by_driver": held, "active": st["active"],
                # waiting_for_warm is per sandbox type
                "starts_in_flight": st["starts_in_flight"], "waiting_for_warm": sum(st["waiting_for_warm"].values()),
                "pool_waiting": pool["waiting"],
                "waiting_for_slot": st["waiting_for_slot"], "starting": pool["starting"], "warm": pool["warm"],
                "start_limit": sum(n["start_limit"] for n in st["nodes"].values()),
                "callers_in_acquire": max(before, after),
            })

    def summary(self) -> dict:
        rows = [r for r in self.rows if "error" not in r]
        if not rows:
            return {"samples": 0, "errors": len(self.rows)}

        def stat(key: str) -> dict:
            xs = [r[key] for r in rows]
            return {"mean": round(statistics.mean(xs), 2), "max": max(xs)}

        backlog = [r["held_by_driver"] - r["active"] for r in rows if r["held_by_driver"] is not None]
        return {
            "samples": len(rows),
            "errors": len(self.rows) - len(rows),
            "start_limit": rows[-1]["start_limit"],
            # sandboxes the driver still holds beyond the registry's active ones: released, not yet removed
            "removal_backlog": {"mean": round(statistics.mean(backlog), 2), "max": max(backlog),
                                "last": backlog[-1]} if backlog else None,
            "starts_in_flight": stat("starts_in_flight"),
            "waiting_for_warm": stat("waiting_for_warm"),
            "waiting_for_slot": stat("waiting_for_slot"),
            "callers_in_acquire": stat("callers_in_acquire"),
            # the registry's starts sent to pools are its STARTING records, never more than the nodes allow
            "check_in_flight_is_starting": sum(r["starts_in_flight"] == r["starting"] for r in rows) / len(rows),
            "check_in_flight_within_limit": sum(r["starts_in_flight"] <= r["start_limit"] for r in rows) / len(rows),
            # a waiter is a caller inside create_from_pool (a caller may also be on its way there or back)
            "check_waiting_within_callers": sum(r["waiting_for_warm"] <= r["callers_in_acquire"] for r in rows)
            / len(rows),
            "check_waiting_is_pools": sum(r["waiting_for_warm"] == r["pool_waiting"] for r in rows) / len(rows),
        }


def _sandbox_counter(m) -> Callable[[], int]:
    """A function counting the sandboxes of the manager's namespace that its driver holds now."""
    cfg = m.config
    if cfg.container_deployment == "docker":
        import docker

        from corral.models import LABEL_REGISTRY

        client = docker.from_env()
        label = f"{LABEL_REGISTRY}={cfg.namespace}"
        return lambda: len(client.api.containers(all=True, filters={"label": label}, trunc=True))
    root = os.path.abspath(cfg.driver_config().root)
    return lambda: len(glob.glob(os.path.join(root, "*", "*", "meta.json")))


def _started_total(m) -> int:
    return m.status()["pools"]["base"]["started_total"]


def _run_corral(p: CycleParams, reuse: bool, workdir: str, background: Optional[float]) -> dict:
    from corral import SandboxManager
    from corral.manager import down

    label = "reuse" if reuse else "destroy"
    m = SandboxManager(_config(p, reuse, p.pool_size, workdir, label))
    try:
        warm_s = _wait_warm(m, p, p.pool_size)
        s = Samples()
        marks: dict = {"before": _started_total(m)}
        probe = StatusProbe(m, s).start()

        def at_deadline() -> None:
            try:
                marks["after"] = _started_total(m)
            except Exception:
                marks["after"] = None

        try:
            window = _loop(p, _corral_ops(m), s, label, at_deadline)
        finally:
            probe.stop()
        starts = None if marks.get("after") is None else marks["after"] - marks["before"]
        res = _result(p, s, window, starts, background)
        st = m.status()
        pool_actors = st["pools"]["base"]["actors"]
        res["pool_warm_s"] = warm_s
        res["status_under_load"] = probe.summary()
        res["start_ms"] = pool_actors[0]["start_ms"] if pool_actors else None
        res["memory_per_sandbox_mib"] = _corral_memory(m, p)
        return res
    finally:
        down(m.config, timeout=120)
        m._ops.close()


def _corral_memory(m, p: CycleParams) -> Optional[float]:
    """Median memory of up to four warm sandboxes (the pool refills after the loop)."""
    deadline = time.monotonic() + 60
    warm: list[dict] = []
    while time.monotonic() < deadline:
        warm = [r for r in m.status()["records"] if r["state"] == "WARM"]
        if len(warm) >= min(4, p.pool_size):
            break
        time.sleep(0.5)
    time.sleep(1.0)  # a box that has just answered may still be settling
    warm = warm[:4]
    if p.driver == "docker":
        return _docker_memory_mib([r["container_id"] for r in warm if r.get("container_id")])
    root = m.config.driver_config().root
    pids = []
    for r in warm:
        for meta in glob.glob(os.path.join(os.path.abspath(root), "*", r["container_name"], "meta.json")):
            try:
                with open(meta) as f:
                    pids.append(json.load(f)["pid"])
            except (OSError, ValueError, KeyError):
                pass
    return _tree_uss_mib(pids)


def _docker_memory_mib(container_ids: list[str]) -> Optional[float]:
    import docker

    client = docker.from_env()
    vals = []
    try:
        for cid in container_ids:
            try:
                st = client.api.stats(cid, stream=False, one_shot=True)
            except Exception:
                continue
            mem = st.get("memory_stats") or {}
            if mem.get("usage") is not None:
                cache = (mem.get("stats") or {}).get("inactive_file", mem.get("stats", {}).get("total_inactive_file", 0))
                vals.append((mem["usage"] - cache) / (1 << 20))
    finally:
        client.close()
    return round(statistics.median(vals), 1) if vals else None


def _tree_uss_mib(pids: list[int]) -> Optional[float]:
    import psutil

    vals = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            vals.append(sum(q.memory_full_info().uss for q in [root, *root.children(recursive=True)]))
        except psutil.Error:
            continue
    return round(statistics.median(vals) / (1 << 20), 1) if vals else None


# -- bare: the loop without corral ---------------------------------------------------------------


class BareDocker:
    """Start, call and remove one container of the image per cycle with docker-py alone."""

    def __init__(self, image: str, timeout: float) -> None:
        import docker
        import httpx

        self.image, self.timeout = image, timeout
        self.client = docker.from_env(max_pool_size=64)
        self.http = httpx.Client(trust_env=False, timeout=10.0, limits=httpx.Limits(max_connections=256))
        self.label = f"cycle-{uuid.uuid4().hex[:8]}"
        self.made: set[str] = set()
        self.lock = threading.Lock()

    def start(self) -> tuple[str, str, str]:
        """(container id, url, token) of a new container whose box answers."""
        from corral.drivers.base import BOX_PORT
        from corral.models import LABEL_MANAGED

        api = self.client.api
        token = secrets.token_hex(16)
        hc = api.create_host_config(port_bindings={BOX_PORT: ("127.0.0.1", None)})
        cid = api.create_container(self.image, environment={"SECRET_TOKEN": token}, ports=[BOX_PORT],
                                   labels={LABEL_MANAGED: "true", "corral.bench": self.label}, host_config=hc)["Id"]
        with self.lock:
            self.made.add(cid)
        try:
            api.start(cid)
            port = api.inspect_container(cid)["NetworkSettings"]["Ports"][f"{BOX_PORT}/tcp"][0]["HostPort"]
            url = f"http://127.0.0.1:{port}"
            _wait_box(self.http, url, token, self.timeout)
        except BaseException:
            self.remove(cid)
            raise
        return cid, url, token

    def remove(self, cid: str) -> None:
        self.client.api.remove_container(cid, force=True)
        with self.lock:
            self.made.discard(cid)

    def ops(self) -> Ops:
        return Ops(acquire=lambda _session: self.start(), shell=lambda h: _bare_shell(self.http, h[1], h[2]),
                   release=lambda h: self.remove(h[0]))

    def memory(self) -> Optional[float]:
        cid, _, _ = self.start()
        try:
            time.sleep(1.0)
            return _docker_memory_mib([cid])
        finally:
            self.remove(cid)

    def close(self) -> None:
        for cid in list(self.made):
            try:
                self.client.api.remove_container(cid, force=True)
            except Exception:
                pass
        self.http.close()
        self.client.close()


class BareProcess:
    """Start, call and stop one box process (``python -m corral.box``) per cycle."""

    def __init__(self, timeout: float) -> None:
        import httpx

        self.timeout = timeout
        self.root = tempfile.mkdtemp(prefix="corral-cycle-bare-")
        self.http = httpx.Client(trust_env=False, timeout=10.0, limits=httpx.Limits(max_connections=256))
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def start(self) -> tuple[subprocess.Popen, str, str, str]:
        token = secrets.token_hex(16)
        d = tempfile.mkdtemp(dir=self.root)
        ready = os.path.join(d, "ready.json")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8"),
               "HOME": d, "TMPDIR": d}
        proc = subprocess.Popen([sys.executable, "-m", "corral.box", "--port", "0", "--workspace",
                                 os.path.join(d, "ws"), "--ready-file", ready, "--token-file", "-"],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        with self.lock:
            self.procs.add(proc)
        try:
            proc.stdin.write(token.encode() + b"\n")
            proc.stdin.close()
            deadline = time.monotonic() + self.timeout
            while not os.path.exists(ready):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bare box exited or did not start (exit code {proc.poll()})")
                time.sleep(0.01)
            with open(ready) as f:
                url = f"http://127.0.0.1:{json.load(f)['port']}"
            _wait_box(self.http, url, token, self.timeout)
        except BaseException:
            self.stop((proc, "", "", d))
            raise
        return proc, url, token, d

    def stop(self, h) -> None:
        proc, _, _, d = h
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with self.lock:
            self.procs.discard(proc)
        shutil.rmtree(d, ignore_errors=True)

    def ops(self) -> Ops:
        return Ops(acquire=lambda _session: self.start(), shell=lambda h: _bare_shell(self.http, h[1], h[2]),
                   release=self.stop)

    def memory(self) -> Optional[float]:
        h = self.start()
        try:
            time.sleep(1.0)
            return _tree_uss_mib([h[0].pid])
        finally:
            self.stop(h)

    def close(self) -> None:
        for proc in list(self.procs):
            proc.kill()
        self.http.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_box(http, url: str, token: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if http.get(f"{url}/v1/healthz", headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the box at {url} did not answer within {timeout:g}s")
        time.sleep(_POLL)


def _bare_shell(http, url: str, token: str) -> str:
    r = http.post(f"{url}/fastapi/tools/run_shell_command", json={"command": COMMAND},
                  headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return r.json()["content"][0]["text"]


def _bare(p: CycleParams):
    return BareDocker(p.image, p.timeout) if p.driver == "docker" else BareProcess(p.timeout)


def _run_bare(p: CycleParams, background: Optional[float]) -> dict:
    bare = _bare(p)
    try:
        s = Samples()
        window = _loop(p, bare.ops(), s, "bare")
        # every cycle started one sandbox; those whose acquire finished after the window are not counted
        starts = len(s.acquire)
        res = _result(p, s, window, starts, background)
        res["memory_per_sandbox_mib"] = bare.memory()
        return res
    finally:
        bare.close()


# -- quiet cold starts -------------------------------------------------------------------------------


def _cold_starts(p: CycleParams, workdir: str) -> dict:
    """One cold start at a time, with nothing else running: corral's create (pool 0) to the first
    shell answer, and a bare start to box ready, interleaved so drift hits both alike."""
    from corral import SandboxManager
    from corral.manager import down

    m = SandboxManager(_config(p, False, 0, workdir, "cold"))
    bare = _bare(p)
    corral_ms, bare_ms, errors = [], [], []
    try:
        _wait_warm(m, p, 0)
        ops = _corral_ops(m)
        for i in range(p.cold_starts + 1):  # the first round warms caches and is not counted
            try:
                t0 = time.perf_counter()
                name = ops.acquire(f"cold-{i}-{uuid.uuid4().hex[:6]}")
                out = ops.shell(name)
                ms = (time.perf_counter() - t0) * 1000
                ops.release(name)
                if out.strip() != EXPECT:
                    errors.append(f"corral shell: {out!r}")
                elif i:
                    corral_ms.append(ms)
            except Exception as e:
                errors.append(f"corral: {type(e).__name__}: {e}")
            try:
                t0 = time.perf_counter()
                h = bare.start()
                ms = (time.perf_counter() - t0) * 1000
                bare.ops().release(h)
                if i:
                    bare_ms.append(ms)
            except Exception as e:
                errors.append(f"bare: {type(e).__name__}: {e}")
            time.sleep(1.0)  # removals and the previous sandbox's exit out of the way
    finally:
        bare.close()
        down(m.config, timeout=120)
        m._ops.close()
    return {"corral_create_to_first_shell_ms": summary(corral_ms), "bare_start_to_box_ready_ms": summary(bare_ms),
            "errors": errors[:3]}


# -- the reference ----------------------------------------------------------------------------------


def _run_reference(p: CycleParams, background: Optional[float]) -> dict:
    """The reference manager in its own interpreter (it must not share corral's packages)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_cycle.py")
    args = [p.reference_python, script, "--image", p.image, "--workers", str(p.workers), "--duration",
            str(p.duration), "--pool-size", str(p.pool_size)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=p.duration + 900)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference's run failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    s = Samples()
    s.acquire, s.shell, s.release, s.errors, s.cycles = (raw["acquire"], raw["shell"], raw["release"], raw["errors"],
                                                          raw["cycles"])
    window = {"wall_s": raw["wall_s"], "busy_cpu_s": raw.get("busy_cpu_s"), "drain_s": raw.get("drain_s")}
    res = _result(p, s, window, raw.get("starts"), background)
    res["version"] = raw.get("version")
    return res


# -- entry points ------------------------------------------------------------------------------------


def run(p: CycleParams, out_dir: Optional[str] = None) -> dict:
    """Run every system of ``p`` on the Ray cluster this process is connected to; write DIR/cycle.{json,png}."""
    from corral.bench.rollout import machine_info, prepare_run

    workdir = prepare_run(p, out_dir, "cycle")
    systems: dict[str, dict] = {}
    machine = machine_info()
    machine["background_busy_cpus"] = background = background_cpus()
    cold: Optional[dict] = None
    if p.start_limits:
        return _sweep(p, workdir, machine, background, out_dir)
    try:
        if p.cold_starts:
            try:
                cold = _cold_starts(p, workdir)
            except Exception as e:
                cold = {"failure": f"{type(e).__name__}: {e}"}
        for system in p.systems:
            if p.progress:
                print(f"corral bench cycle: {system} ...", file=sys.stderr, flush=True)
            try:
                if system in ("destroy", "reuse"):
                    systems[system] = _run_corral(p, system == "reuse", workdir, background)
                elif system == "bare":
                    systems[system] = _run_bare(p, background)
                else:
                    systems[system] = _run_reference(p, background)
            except Exception as e:
                print(f"corral bench cycle: {system} failed: {type(e).__name__}: {e}", file=sys.stderr)
                systems[system] = _failed(e)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    params = {k: v for k, v in asdict(p).items() if k not in ("progress", "namespace_prefix")}
    params["systems"] = list(p.systems)
    result = {"workload": "cycle", "systems": systems, "cold_start": cold, "machine": machine, "params": params}
    if out_dir:
        write_json(os.path.join(out_dir, "cycle.json"), result)
        write_figure(result, os.path.join(out_dir, "cycle.png"))
    return result


def _sweep(p: CycleParams, workdir: str, machine: dict, background: Optional[float], out_dir: Optional[str]) -> dict:
    """The destroy system once per start limit: where more starts at once stop paying."""
    rows = []
    try:
        for limit in p.start_limits:
            if p.progress:
                print(f"corral bench cycle: max_starting_per_node={limit} ...", file=sys.stderr, flush=True)
            q = CycleParams(**{**asdict(p), "max_starting_per_node": limit, "start_limits": ()})
            try:
                r = _run_corral(q, False, workdir, background)
            except Exception as e:
                r = _failed(e)
            st = r.get("status_under_load") or {}
            rows.append({"max_starting_per_node": limit, "cycles_per_s": r["cycles_per_s"], "errors": r["errors"],
                         "acquire_ms": r["acquire_ms"], "start_ms": r.get("start_ms"),
                         "cpu_s_per_start": r.get("cpu_s_per_start"), "busy_cpus": r.get("busy_cpus"),
                         "starts_in_flight_mean": (st.get("starts_in_flight") or {}).get("mean"),
                         "failure": r.get("failure")})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    params = {k: v for k, v in asdict(p).items() if k not in ("progress", "namespace_prefix")}
    result = {"workload": "cycle", "sweep": rows, "machine": machine, "params": params}
    if out_dir:
        write_json(os.path.join(out_dir, "cycle.json"), result)
        write_sweep_figure(result, os.path.join(out_dir, "cycle.png"))
    return result


def sweep_table(result: dict) -> str:
    from tabulate import tabulate

    rows = [[r["max_starting_per_node"], r["starts_in_flight_mean"], r["cycles_per_s"],
             (r["acquire_ms"] or {}).get("p50"), (r["acquire_ms"] or {}).get("p99"),
             (r.get("start_ms") or {}).get("p50"), (r.get("start_ms") or {}).get("p99"), r["cpu_s_per_start"],
             r["busy_cpus"], r["errors"]] for r in result["sweep"]]
    return tabulate(rows, headers=["start limit", "in flight", "cycles/s", "acq p50", "acq p99", "start p50",
                                   "start p99", "cpu s/start", "busy cpus", "errors"], tablefmt="github")


def write_sweep_figure(result: dict, path: str) -> None:
    """Cycles/s and start latency against the start limit."""
    from corral.bench.rollout import pyplot

    plt = pyplot()

    rows = result["sweep"]
    xs = [r["max_starting_per_node"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(xs, [r["cycles_per_s"] for r in rows], "o-", color="#2a9d8f")
    a.set_xlabel("max_starting_per_node")
    a.set_title("cycles / s (reuse=False)")
    a.set_ylim(bottom=0)
    b.plot(xs, [(r.get("start_ms") or {}).get("p50") or 0 for r in rows], "o-", label="start p50")
    b.plot(xs, [(r["acquire_ms"] or {}).get("p50") or 0 for r in rows], "s-", label="acquire p50")
    b.set_xlabel("max_starting_per_node")
    b.set_title("latency, ms")
    b.legend(fontsize=8)
    pr, mc = result["params"], result["machine"]
    fig.suptitle(f"start limit sweep: {pr['workers']} threads x {pr['duration']:g} s, pool {pr['pool_size']}, driver "
                 f"{pr['driver']}  |  {mc['cpu_count']} CPU, {mc['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _failed(e: BaseException) -> dict:
    empty = summary([])
    return {"cycles_per_s": 0.0, "cycles": 0, "errors": 1, "acquire_ms": empty, "first_shell_ms": empty,
            "release_ms": empty, "failure": f"{type(e).__name__}: {e}"}


def table(result: dict) -> str:
    from tabulate import tabulate

    def g(d: dict, metric: str, q: str) -> Any:
        v = (d.get(metric) or {}).get(q)
        return "" if v is None else v

    rows = []
    for n, d in result["systems"].items():
        rows.append([n, d.get("cycles_per_s", ""), g(d, "acquire_ms", "p50"), g(d, "acquire_ms", "p99"),
                     g(d, "first_shell_ms", "p50"), g(d, "release_ms", "p50"), d.get("starts", ""),
                     d.get("cpu_s_per_start", ""), d.get("cpu_s_per_start_less_background", ""),
                     d.get("memory_per_sandbox_mib", ""), d.get("errors", "")])
    return tabulate(rows, headers=["system", "cycles/s", "acq p50", "acq p99", "shell p50", "rel p50", "starts",
                                   "cpu s/start", "(less bg)", "MiB/sandbox", "errors"], tablefmt="github")


def targets(result: dict) -> list[str]:
    """The cold path's targets, as measured (reported, never asserted)."""
    s, out = result["systems"], []
    docker = result["params"]["driver"] == "docker"
    d, r, b, ref = s.get("destroy"), s.get("reuse"), s.get("bare"), s.get("reference")

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if d and not d.get("failure"):
        cps, a = d["cycles_per_s"], d["acquire_ms"]
        line = f"reuse=False: {cps} cycles/s"
        if docker:
            line += f" (target >= {TARGET_DESTROY_CPS}: {met(cps >= TARGET_DESTROY_CPS)})"
        out.append(line)
        if a.get("p50"):
            out.append(f"reuse=False: acquire p99 {a['p99']} ms = {a['p99'] / a['p50']:.2f}x p50 {a['p50']} ms "
                       f"(target <= 2x: {met(a['p99'] <= 2 * a['p50'])}); errors {d['errors']} "
                       f"(target 0: {met(d['errors'] == 0)})")
        if b and b.get("cycles_per_s"):
            ratio = b["cycles_per_s"] / cps if cps else float("inf")
            out.append(f"reuse=False vs bare ({'docker-py' if docker else 'box processes'}): {cps} vs "
                       f"{b['cycles_per_s']} cycles/s, bare is {ratio:.2f}x (target <= {TARGET_BARE_RATIO}x: "
                       f"{met(ratio <= TARGET_BARE_RATIO)})")
        if ref and ref.get("cycles_per_s"):
            out.append(f"reuse=False vs the reference: {cps} vs {ref['cycles_per_s']} cycles/s "
                       f"({cps / ref['cycles_per_s']:.2f}x); acquire p50 {d['acquire_ms']['p50']} vs "
                       f"{ref['acquire_ms']['p50']} ms, p99 {d['acquire_ms']['p99']} vs {ref['acquire_ms']['p99']} ms")
        st = d.get("status_under_load") or {}
        if st.get("samples"):
            out.append(f"status() under load ({st['samples']} samples): starts_in_flight mean "
                       f"{st['starts_in_flight']['mean']} max {st['starts_in_flight']['max']} (limit "
                       f"{st['start_limit']}), waiting_for_warm mean {st['waiting_for_warm']['mean']} max "
                       f"{st['waiting_for_warm']['max']} (callers in acquire max {st['callers_in_acquire']['max']}), "
                       f"waiting_for_slot max {st['waiting_for_slot']['max']}; removal backlog "
                       f"{st.get('removal_backlog')}; checks in_flight==STARTING "
                       f"{st['check_in_flight_is_starting']:.0%}, within limit {st['check_in_flight_within_limit']:.0%}"
                       f", waiters <= callers {st['check_waiting_within_callers']:.0%}")
    if r and not r.get("failure"):
        out.append(f"reuse=True: {r['cycles_per_s']} cycles/s (target >= {TARGET_REUSE_CPS}: "
                   f"{met(r['cycles_per_s'] >= TARGET_REUSE_CPS)})")
    cold = result.get("cold_start") or {}
    c, bb = cold.get("corral_create_to_first_shell_ms", {}), cold.get("bare_start_to_box_ready_ms", {})
    if c.get("p50") is not None and bb.get("p50") is not None:
        gap = c["p50"] - bb["p50"]
        out.append(f"cold create to first shell answer {c['p50']} ms p50 vs bare start to box ready {bb['p50']} ms: "
                   f"{gap:+.0f} ms (target <= +{TARGET_COLD_EXTRA_MS:.0f}: {met(gap <= TARGET_COLD_EXTRA_MS)})")
    bg = result["machine"].get("background_busy_cpus")
    if bg is not None:
        out.append(f"background load before the run: {bg} busy CPUs of {result['machine']['cpu_count']}")
    return out


def write_figure(result: dict, path: str) -> None:
    """Cycles/s, latency percentiles and CPU per start per system, as a PNG."""
    from corral.bench.rollout import bar_panel, pyplot

    plt = pyplot()

    systems = result["systems"]
    names = list(systems)
    colors = {"destroy": "#e9c46a", "reuse": "#2a9d8f", "bare": "#8d99ae", "reference": "#e76f51"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1, 1.6, 1]})
    ax = axes[0]
    bar_panel(ax, names, [systems[n].get("cycles_per_s") or 0 for n in names], colors, "{:.3g}",
              "cycles / s (higher is better)")
    ax = axes[1]
    metrics = [("acquire_ms", "p50"), ("acquire_ms", "p99"), ("first_shell_ms", "p50"), ("release_ms", "p50")]
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        ys = [max((systems[n].get(m) or {}).get(q) or 0, 0.01) for m, q in metrics]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, ys, width, label=n, color=colors.get(n, "grey"))
    ax.set_xticks(range(len(metrics)), [f"{m[:-3].replace('first_', '')} {q}" for m, q in metrics])
    ax.set_yscale("log")
    ax.set_title("latency, ms (log; lower is better)")
    ax.grid(axis="y", which="both", alpha=0.25)
    ax.legend(fontsize=7)
    ax = axes[2]
    bar_panel(ax, names, [systems[n].get("cpu_s_per_start") or 0 for n in names], colors, "{:.2f}",
              "CPU s per started sandbox (whole machine)")
    pr, mc = result["params"], result["machine"]
    fig.suptitle(f"corral bench --workload cycle: {pr['workers']} threads x {pr['duration']:g} s, pool "
                 f"{pr['pool_size']}, driver {pr['driver']}  |  {mc['cpu_count']} CPU {mc['cpu_model']}, "
                 f"{mc['memory_gib']} GiB, background {mc.get('background_busy_cpus')} CPUs busy, {mc['date'][:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The cycle workload's own options (``corral bench --workload cycle``)."""
    ap.add_argument("--duration", type=float, default=40.0, help="cycle workload: seconds each system runs (default 40)")
    ap.add_argument("--pool-size", type=int, default=8, help="cycle workload: warm pool size (default 8)")
    ap.add_argument("--cold-starts", type=int, default=5,
                    help="cycle workload: quiet cold starts measured, corral and bare (default 5; 0: none)")
    ap.add_argument("--reference-python",
                    help="cycle workload: interpreter of a virtualenv with agentscope-runtime (adds system 'reference')")
    ap.add_argument("--max-starting-per-node", type=int,
                    help="cycle workload: corral's starts at once per node (default: from the node's CPUs)")
    ap.add_argument("--start-limits",
                    help="cycle workload: comma-separated max_starting_per_node values to sweep (reuse=False only)")


def _ints(text: Optional[str], what: str) -> tuple:
    from corral.errors import InvalidRequest

    try:
        return tuple(int(x) for x in (text or "").split(",") if x.strip())
    except ValueError:
        raise InvalidRequest(f"{what}: comma-separated integers, got {text!r}") from None


def params_from_args(args: argparse.Namespace) -> CycleParams:
    return CycleParams(
        workers=args.workers if args.workers is not None else 32,
        duration=args.duration,
        pool_size=args.pool_size,
        driver=getattr(args, "bench_driver", None) or getattr(args, "driver", None) or "process",
        image=args.image,
        systems=tuple(x.strip() for x in args.systems.split(",") if x.strip()) if args.systems else (),
        cold_starts=args.cold_starts,
        reference_python=args.reference_python,
        max_starting_per_node=args.max_starting_per_node,
        start_limits=_ints(args.start_limits, "--start-limits"),
        progress=not args.no_progress,
        namespace_prefix=f"{getattr(args, 'namespace', None) or 'corral'}-cycle",
        session_mode=getattr(args, "session_mode", "actor"),
    ).validate()


def run_cli(args: argparse.Namespace) -> int:
    """``corral bench --workload cycle``: start (or join) Ray, run, print the table and the targets."""
    from corral.bench.rollout import print_report, require_matplotlib, run_on_ray

    require_matplotlib()
    p = params_from_args(args)
    banner = (f"corral bench --workload cycle: {p.workers} threads x {p.duration:g} s, pool {p.pool_size}, driver "
              f"{p.driver}, sessions {p.session_mode}; systems {', '.join(p.systems)}")
    # the machine's own CPU count: corral's default start limit is read from the node's CPUs
    result, seconds = run_on_ray(args, os.cpu_count() or 1, banner, lambda: run(p, args.out))
    if "sweep" in result:
        print_report(sweep_table(result), [], args.out, "cycle", seconds)
    else:
        print_report(table(result), targets(result), args.out, "cycle", seconds)
    rows = result["sweep"] if "sweep" in result else result["systems"].values()
    return 0 if all(not d.get("failure") for d in rows) else 1
