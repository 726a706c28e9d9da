"""RL-shaped benchmark of corral against its baselines: ``corral bench``.

    corral bench [--quick] [--out DIR] [--workers 32] [--episodes 3] [--calls 8] [--think-ms 50] [--driver docker]

``W`` concurrent workers (asyncio tasks of one rollout process) run ``E``
episodes each. An episode acquires a sandbox for its own session
(``acquire_async``), makes ``K`` tool calls alternating shell
(``echo ...``) and Python (a cell that adds to a kernel variable) with
``--think-ms`` of think time between calls, standing in for the model's
generation, checks every answer, and releases the sandbox. Side by side, on
one Ray cluster, each corral system in its own namespace torn down with
``down()`` after it:

- ``corral``: a type with ``reuse=True`` (released sandboxes are reset and go
  back to the pool), ``pool_size=W`` and ``W`` more reserved ahead of the run
  (``reserve(n=W)``: the RL recipe, where a rollout step reserves its batch):
  2W sandboxes, all warm before the first episode, serve every episode, so a
  worker's next acquire finds one whose reset has finished;
- ``corral_destroy``: destroy on release (the reference's behaviour), warm pool of ``W``;
- ``cold``: ``pool_size=0`` and destroy on release: the pool starts one
  sandbox per waiting acquirer, so every acquire waits for a cold start (with
  ``reuse=True`` a released sandbox would go back to the pool and the next
  acquire would be warm; the run checks the pool started one sandbox per episode);
- ``direct``: the lower bound of a tool call: the same W x E x K calls with
  the same think time, as bare httpx requests (a client per box, as corral's
  handles have) to already running boxes, one per worker
  (taken from the ``corral`` pool before its namespace goes down), with no
  acquire or release: only ``tool_ms``;
- with ``--driver docker``, ``docker_bare``: the lower bound of container
  churn: docker-py ``containers.run`` of the same image until its box answers
  (``docker_bench._bare_run``), ``exec_run`` for each tool call, ``remove``.

In the ``corral`` system, one worker in ``PAIR_EVERY`` ends each episode with
the same shell call through the handle and as bare httpx to the same box,
back to back (``tool_ms_paired_under_load``, not part of ``tool_ms``): the
handle's path against direct HTTP under the same load. After the episodes,
the same pairing on one quiet box (``tool_ms_one_box_quiet``).

Writes ``DIR/bench.json`` (``{"systems": {...}, "machine": {...}, "params":
{...}}``; each system has ``episodes_per_s``, ``errors``, ``acquire_ms``,
``tool_ms``, ``release_ms`` as ``{"p50", "p95", "p99"}`` in milliseconds)
and ``DIR/bench.png`` (episodes/s and latency percentiles per system), and
prints a table. Figures are measured and printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from corral.bench import write_json
from corral.bench.runtime_bench import _direct_vs_handle, _measure_memory, pct, summary

__all__ = ["BenchParams", "run", "run_cli", "add_arguments", "main", "write_figure", "SYSTEMS"]

#: Every system this benchmark knows, in the order they run.
SYSTEMS = ("corral", "corral_destroy", "cold", "direct", "docker_bare")
CORRAL_SYSTEMS = ("corral", "corral_destroy", "cold")
QUICK = {"workers": 4, "episodes": 2, "calls": 4}
DEFAULT = {"workers": 32, "episodes": 3, "calls": 8}
#: Every PAIR_EVERY-th worker ends each episode with one paired handle / bare-HTTP call.
PAIR_EVERY = 4
#: Connection limits of the direct system's httpx clients (one per box).
HTTP_LIMITS = {"max_connections": 256, "max_keepalive_connections": 64, "keepalive_expiry": 30.0}


@dataclass
class BenchParams:
    workers: int = DEFAULT["workers"]
    episodes: int = DEFAULT["episodes"]
    calls: int = DEFAULT["calls"]
    think_ms: float = 50.0
    driver: str = "process"
    image: str = "corral-box:latest"
    systems: tuple = ()  # empty: every system that applies to the driver
    quick: bool = False
    timeout: float = 600.0  # seconds an acquire or a pool warm-up may take
    namespace_prefix: str = "corral-bench"
    progress: bool = True
    kernel_reset: str = "restart"  # how the reuse system resets a sandbox's kernel
    session_mode: str = "actor"  # where the sessions' heartbeat clocks run (SandboxManagerEnvConfig.session_mode)

    def validate(self) -> "BenchParams":
        from corral.errors import InvalidRequest

        for name in ("workers", "episodes", "calls"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidRequest(f"{name} must be a positive integer, got {v!r}")
        if self.workers > 512:
            raise InvalidRequest(f"workers must be at most 512, got {self.workers}")
        if not isinstance(self.think_ms, (int, float)) or isinstance(self.think_ms, bool) or self.think_ms < 0:
            raise InvalidRequest(f"think_ms must be a number >= 0, got {self.think_ms!r}")
        if self.session_mode not in ("actor", "hosted"):
            raise InvalidRequest(f"session_mode must be 'actor' or 'hosted', got {self.session_mode!r}")
        if self.driver not in ("process", "docker"):
            raise InvalidRequest(f"driver must be 'process' or 'docker', got {self.driver!r}")
        systems = tuple(self.systems) or self.default_systems()
        unknown = [s for s in systems if s not in SYSTEMS]
        if unknown:
            raise InvalidRequest(f"unknown system(s) {unknown}; choose from {list(SYSTEMS)}")
        if "docker_bare" in systems and self.driver != "docker":
            raise InvalidRequest("system 'docker_bare' needs --driver docker")
        self.systems = tuple(s for s in SYSTEMS if s in systems)
        return self

    def default_systems(self) -> tuple:
        return tuple(s for s in SYSTEMS if s != "docker_bare" or self.driver == "docker")


# -- one episode's tool calls ----------------------------------------------------


def _call(wid: int, ep: int, k: int) -> tuple[str, str]:
    """Tool call ``k`` of an episode: ("shell", command) for even k, ("python", code) for odd k."""
    if k % 2 == 0:
        return "shell", f"echo w{wid}-e{ep}-k{k}"
    return "python", f"acc = globals().get('acc', 0) + {k}\nacc"


def _shell_expect(wid: int, ep: int, k: int) -> str:
    return f"w{wid}-e{ep}-k{k}"


class Samples:
    """Latencies (ms), errors and completed episodes of one system."""

    def __init__(self) -> None:
        self.acquire: list[float] = []
        self.acquire_cold: list[bool] = []  # per acquire: the sandbox was created after the acquire began
        self.acquire_ep: list[int] = []  # per acquire: the episode index (0: the first wave)
        self.tool: list[float] = []
        self.first_python: list[float] = []  # an episode's first Python call (a reset kernel may still boot)
        self.release: list[float] = []
        # one shell call through the handle and one bare HTTP call to the same box, back to back
        # under the run's load (every PAIR_EVERY-th worker, after its episode's calls)
        self.pair_handle: list[float] = []
        self.pair_direct: list[float] = []
        self.errors: list[str] = []
        self.episodes = 0

    def error(self, what: str) -> None:
        self.errors.append(what[:300])

    def result(self, wall: float) -> dict:
        acquire = self.acquire
        return {
            "episodes_per_s": round(self.episodes / wall, 3) if wall > 0 else 0.0,
            "errors": len(self.errors),
            "acquire_ms": summary(acquire),
            "tool_ms": summary(self.tool),
            "release_ms": summary(self.release),
            "first_python_ms": summary(self.first_python),
            "acquire_ms_p50_by_episode": [pct([a for a, e in zip(self.acquire, self.acquire_ep) if e == i], 50)
                                          for i in range(max(self.acquire_ep, default=-1) + 1)],
            "episodes": self.episodes,
            "wall_s": round(wall, 2),
            "first_errors": self.errors[:3],
            **({"tool_ms_paired_under_load": {"handle_ms": summary(self.pair_handle),
                                              "direct_ms": summary(self.pair_direct)}}
               if self.pair_handle else {}),
        }


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{desc:15}", unit="ep", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=True)


async def _workers(p: BenchParams, desc: str, episode: Callable[[int, int, Samples], Any], s: Samples) -> float:
    """Run W workers x E episodes with a progress bar; returns the wall time in seconds."""
    bar = _bar(p.workers * p.episodes, desc, p.progress)

    async def worker(wid: int) -> None:
        for ep in range(p.episodes):
            try:
                await episode(wid, ep, s)
            finally:
                bar.update(1)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w) for w in range(p.workers)))
    finally:
        bar.close()
    return time.perf_counter() - t0


# -- the corral systems ------------------------------------------------------------


def bench_config(p: Any, label: str, workdir: str, pool: int, reuse: bool, kernel_reset: Optional[str] = None,
                 **kw: Any):
    """The config of one system of a run (``p``: its parameters), under ``workdir``/``label``: one
    sandbox type, "base", pooled ``pool`` deep; ``kw``: more of the config's fields."""
    from corral import SandboxManagerEnvConfig, SandboxTypeConfig

    root = os.path.join(workdir, label)
    base = SandboxTypeConfig(name="base", image=p.image, reuse=reuse,
                             **({"kernel_reset": kernel_reset} if kernel_reset else {}))
    return SandboxManagerEnvConfig(
        namespace=f"{p.namespace_prefix}-{label}-{uuid.uuid4().hex[:6]}",
        container_deployment=p.driver,
        pool_size=pool,
        spare_sessions=p.workers,
        session_mode=p.session_mode,
        state_dir=os.path.join(root, "state"),
        default_mount_dir=os.path.join(root, "mounts"),  # a workspace per sandbox, as the reference makes
        acquire_timeout=p.timeout,
        sandbox_types={"base": base},
        **kw,
    )


def _config(p: BenchParams, system: str, workdir: str):
    return bench_config(p, system, workdir, pool=0 if system == "cold" else p.workers, reuse=system == "corral",
                        kernel_reset=p.kernel_reset)


def _pool_stats(m) -> dict:
    return m.status()["pools"]["base"]


def _warm_up(m, p: BenchParams, system: str, target: int) -> float:
    """Wait (with a progress bar) until ``target`` sandboxes are warm and W spare session actors run."""
    t0 = time.perf_counter()
    from tqdm import tqdm

    deadline = time.monotonic() + p.timeout
    if system == "corral":
        m.reserve(n=p.workers)  # the batch, on top of pool_size
        target += p.workers
    if target:
        with tqdm(total=target, desc=f"{system} warm-up", unit="box", file=sys.stderr, disable=not p.progress,
                  dynamic_ncols=True) as bar:
            while True:
                warm = min(target, _pool_stats(m)["warm"])
                bar.update(warm - bar.n)
                if warm >= target or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
        m.reserve(n=0, wait=True, timeout=max(1.0, deadline - time.monotonic()))
    # Session actors are started ahead of need; let them all be up so no acquire waits for a process.
    while m.status()["spare_session_actors"] < p.workers and time.monotonic() < deadline:
        time.sleep(0.2)
    return time.perf_counter() - t0


async def _corral_episode(m, p: BenchParams, wid: int, ep: int, s: Samples) -> None:
    think = p.think_ms / 1000
    try:
        wall0, t0 = time.time(), time.perf_counter()
        sb = await m.acquire_async(timeout=p.timeout)
        s.acquire.append((time.perf_counter() - t0) * 1000)
        created = sb.record.get("created_at")
        s.acquire_cold.append(created is not None and created >= wall0)
        s.acquire_ep.append(ep)
    except Exception as e:  # counted and reported, never hidden
        s.error(f"acquire: {type(e).__name__}: {e}")
        return
    ok = True
    try:
        acc = 0  # a fresh sandbox has a fresh kernel: leftover state from another episode is an error
        for k in range(p.calls):
            if k:
                await asyncio.sleep(think)
            kind, arg = _call(wid, ep, k)
            t0 = time.perf_counter()
            if kind == "shell":
                r = await sb.shell(arg)
                s.tool.append((time.perf_counter() - t0) * 1000)
                if r.exit_code != 0 or r.stdout.strip() != _shell_expect(wid, ep, k):
                    ok = False
                    s.error(f"shell: exit {r.exit_code}, stdout {r.stdout!r}")
            else:
                r = await sb.python(arg)
                s.tool.append((time.perf_counter() - t0) * 1000)
                if k == 1:
                    s.first_python.append(s.tool[-1])
                acc += k
                if r.status != "ok" or r.text != str(acc):
                    ok = False
                    s.error(f"python: status {r.status}, value {r.text!r}, expected {acc} "
                            f"(state left over from another episode?)")
        if wid % PAIR_EVERY == 0:
            await _paired_call(sb, wid, ep, s)
    except Exception as e:
        ok = False
        s.error(f"tool: {type(e).__name__}: {e}")
    try:
        t0 = time.perf_counter()
        await sb.release()
        s.release.append((time.perf_counter() - t0) * 1000)
    except Exception as e:
        ok = False
        s.error(f"release: {type(e).__name__}: {e}")
    if ok:
        s.episodes += 1


async def _paired_call(sb, wid: int, ep: int, s: Samples) -> None:
    """The same shell call through the handle and as bare httpx to the same box, back to back
    (each going first half the time), under the run's load: what the handle's path costs, apart
    from what the load costs. Not counted in ``tool_ms``."""
    import httpx

    hdr = {"Authorization": f"Bearer {sb.record['runtime_token']}"}
    body = {"command": f"echo pair-{wid}-{ep}"}
    async with httpx.AsyncClient(trust_env=False, timeout=60.0) as c:
        (await c.post(sb.url + "/v1/shell", json=body, headers=hdr)).raise_for_status()  # connect, untimed

        async def via_handle() -> None:
            t0 = time.perf_counter()
            await sb.shell(body["command"])
            s.pair_handle.append((time.perf_counter() - t0) * 1000)

        async def bare() -> None:
            t0 = time.perf_counter()
            r = await c.post(sb.url + "/v1/shell", json=body, headers=hdr)
            r.raise_for_status()
            s.pair_direct.append((time.perf_counter() - t0) * 1000)

        for one in ((via_handle, bare) if (wid // PAIR_EVERY + ep) % 2 == 0 else (bare, via_handle)):
            await one()


async def _direct_episode(clients: list, boxes: list[tuple[str, str]], p: BenchParams, carry: list[int],
                          wid: int, ep: int, s: Samples) -> None:
    """The same tool calls as a corral episode, as bare HTTP requests to worker ``wid``'s running box."""
    url, token = boxes[wid]
    http = clients[wid]
    hdr = {"Authorization": f"Bearer {token}"}
    think = p.think_ms / 1000
    try:
        for k in range(p.calls):
            if k:
                await asyncio.sleep(think)
            kind, arg = _call(wid, ep, k)
            body = {"command": arg, "timeout": 60} if kind == "shell" else {"code": arg, "timeout": 60}
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/{kind}", json=body, headers=hdr)
            r.raise_for_status()
            data = r.json()
            s.tool.append((time.perf_counter() - t0) * 1000)
            if kind == "shell":
                if data.get("exit_code") != 0 or data.get("stdout", "").strip() != _shell_expect(wid, ep, k):
                    s.error(f"shell: {data!r}"[:200])
            else:  # the box is not reset between this worker's episodes: the kernel value carries over
                carry[wid] += k
                text = (data.get("result") or {}).get("text/plain")
                if data.get("status") != "ok" or text != str(carry[wid]):
                    s.error(f"python: status {data.get('status')}, value {text!r}, expected {carry[wid]}")
        s.episodes += 1
    except Exception as e:
        s.error(f"tool: {type(e).__name__}: {e}")


async def _container_memory_mib(records: list[dict]) -> Optional[float]:
    """Median memory use of Docker containers (cgroup usage minus page cache), in MiB."""
    import statistics

    import docker

    def one(cid: str) -> Optional[float]:
        client = docker.from_env()
        try:
            st = client.api.stats(cid, stream=False, one_shot=True)
            mem = st.get("memory_stats") or {}
            usage = mem.get("usage")
            if usage is None:
                return None
            cache = (mem.get("stats") or {}).get("inactive_file", 0)
            return (usage - cache) / (1 << 20)
        except Exception:
            return None
        finally:
            client.close()

    vals = await asyncio.gather(*(asyncio.to_thread(one, r["container_id"]) for r in records if r.get("container_id")))
    vals = [v for v in vals if v]
    return round(statistics.median(vals), 1) if vals else None


def _run_corral(p: BenchParams, system: str, workdir: str, with_direct: bool) -> dict[str, dict]:
    """One corral system (its own namespace, torn down after); with ``direct`` measured on its boxes."""
    from corral import SandboxManager
    from corral.manager import down

    cfg = _config(p, system, workdir)
    m = SandboxManager(cfg)
    out: dict[str, dict] = {}
    try:
        warm_s = _warm_up(m, p, system, 0 if system == "cold" else p.workers)
        before = _pool_stats(m)
        s = Samples()

        async def phase() -> tuple[float, dict]:
            wall = await _workers(p, system, lambda w, e, s_: _corral_episode(m, p, w, e, s_), s)
            extra: dict = {}
            if with_direct or system == "corral":
                extra = await _quiet_phase(m, p, with_direct)
            return wall, extra

        wall, extra = asyncio.run(phase())
        after = _pool_stats(m)
        res = s.result(wall)
        res["pool_warm_s"] = round(warm_s, 2)
        res["sandboxes_started"] = after["started_total"] - before["started_total"]
        # acquires that got a sandbox created after they began (a whole cold start), and the others (a
        # warm one, or one whose start began earlier for another waiter: waiters are served in arrival order)
        res["cold_acquires"] = sum(s.acquire_cold)
        res["warm_acquires"] = len(s.acquire_cold) - sum(s.acquire_cold)
        # pool 0 starts one sandbox per waiting acquirer: only a sandbox started beyond that can be handed out warm
        res["surplus_started"] = max(0, res["sandboxes_started"] - len(s.acquire))
        res.update(extra.get("corral", {}))
        out[system] = res
        if "direct" in extra:
            out["direct"] = extra["direct"]
        return out
    finally:
        down(m.config, timeout=60)
        m._ops.close()


async def _quiet_phase(m, p: BenchParams, with_direct: bool) -> dict:
    """After the episodes: memory of live sessions, handle-vs-direct on one box, and the ``direct`` system."""
    import httpx

    n = p.workers if with_direct else min(p.workers, 8)
    # quiet first: the last episodes' resets (kernels booting) would be measured alongside
    deadline = time.monotonic() + 60
    while (await m.status_async())["pools"]["base"]["resetting"] and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    sbs = [await m.acquire_async(timeout=p.timeout) for _ in range(n)]
    try:
        few = sbs[:8]
        if m.config.container_deployment == "docker":
            mem = {"box_mib": await _container_memory_mib([sb.record for sb in few[:4]]),
                   **{k: v for k, v in (await _measure_memory(m, [])).items() if k != "box_uss_mib"}}
        else:
            mem = await _measure_memory(m, [sb.name for sb in few])
        paired = await _direct_vs_handle(sbs[0], n=20 if p.quick else 50)
        res: dict = {"corral": {"memory_per_live_session": mem, "tool_ms_one_box_quiet": paired}}
        if with_direct:
            boxes = [(sb.url.rstrip("/"), sb.record["runtime_token"]) for sb in sbs]
            carry = [0] * p.workers
            s = Samples()
            # a client (connection pool) per box, as corral's handles have: httpx polls each idle
            # connection of a pool on every request, so one pool for all boxes is slower
            clients = [httpx.AsyncClient(trust_env=False, timeout=60.0, limits=httpx.Limits(**HTTP_LIMITS))
                       for _ in boxes]
            try:
                # the boxes were reset (kernel restarted) before they went back to the pool: start from 0
                wall = await _workers(p, "direct",
                                      lambda w, e, s_: _direct_episode(clients, boxes, p, carry, w, e, s_), s)
            finally:
                for c in clients:
                    await c.aclose()
            r = s.result(wall)
            res["direct"] = {"tool_ms": r["tool_ms"], "errors": r["errors"], "first_errors": r["first_errors"],
                             "boxes": len(boxes), "wall_s": r["wall_s"]}
        return res
    finally:
        for sb in sbs:
            try:
                await sb.release()
            except Exception:
                pass


# -- docker_bare -------------------------------------------------------------------


def _run_docker_bare(p: BenchParams) -> dict:
    import docker

    from corral.bench.docker_bench import _bare_run

    client = docker.from_env(max_pool_size=max(10, p.workers + 4))
    made: set[str] = set()
    s = Samples()

    def episode_sync(wid: int, ep: int) -> None:
        token = secrets.token_urlsafe(16)
        name = f"corral-bench-bare-{secrets.token_hex(5)}"
        made.add(name)
        try:
            t0 = time.perf_counter()
            _, cid = _bare_run(client, p.image, token, name, p.timeout)
            s.acquire.append((time.perf_counter() - t0) * 1000)
            s.acquire_ep.append(ep)
        except Exception as e:
            s.error(f"acquire: {type(e).__name__}: {e}")
            return
        ok = True
        try:
            c = client.containers.get(cid)
            acc = 0
            for k in range(p.calls):
                if k:
                    time.sleep(p.think_ms / 1000)
                kind, arg = _call(wid, ep, k)
                if kind == "shell":
                    t0 = time.perf_counter()
                    code, out = c.exec_run(["bash", "-c", arg])
                    s.tool.append((time.perf_counter() - t0) * 1000)
                    if code != 0 or out.decode().strip() != _shell_expect(wid, ep, k):
                        ok = False
                        s.error(f"shell: exit {code}, output {out[:100]!r}")
                else:  # no kernel: a fresh interpreter per call, the state carried in the command
                    acc += k
                    t0 = time.perf_counter()
                    code, out = c.exec_run(["python3", "-c", f"acc = {acc - k} + {k}\nprint(acc)"])
                    s.tool.append((time.perf_counter() - t0) * 1000)
                    if code != 0 or out.decode().strip() != str(acc):
                        ok = False
                        s.error(f"python: exit {code}, output {out[:100]!r}")
        except Exception as e:
            ok = False
            s.error(f"tool: {type(e).__name__}: {e}")
        try:
            t0 = time.perf_counter()
            client.api.remove_container(cid, force=True)
            s.release.append((time.perf_counter() - t0) * 1000)
            made.discard(name)
        except Exception as e:
            ok = False
            s.error(f"release: {type(e).__name__}: {e}")
        if ok:
            s.episodes += 1

    async def phase() -> float:
        # docker-py is blocking: one thread per worker (the default executor has only cpu+4 threads)
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=p.workers + 4))
        return await _workers(p, "docker_bare", lambda w, e, s_: asyncio.to_thread(episode_sync, w, e), s)

    try:
        wall = asyncio.run(phase())
        return s.result(wall)
    finally:
        for name in made:
            try:
                client.api.remove_container(name, force=True)
            except Exception:
                pass
        client.close()


# -- machine, figure, table ----------------------------------------------------------


def machine_info() -> dict:
    import psutil
    import ray

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def require_matplotlib() -> None:
    """Before minutes of work, not after: the figure needs matplotlib."""
    import importlib.util

    from corral.errors import InvalidRequest

    if importlib.util.find_spec("matplotlib") is None:
        raise InvalidRequest("corral bench draws its figure with matplotlib, which is not installed: "
                             "pip install 'corral[notebooks]' (or matplotlib)")


def join_or_start_ray(args: argparse.Namespace, num_cpus: int) -> bool:
    """Join ``--address`` (or RAY_ADDRESS), else start a local Ray cluster of ``num_cpus`` CPUs;
    True when this call started one (the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    kw = {"num_cpus": num_cpus, "include_dashboard": False} if address == "local" else {}
    print(f"corral bench: {'starting a local Ray cluster' if address == 'local' else 'joining ' + address} ...",
          file=sys.stderr, flush=True)
    ray.init(address=address, log_to_driver=False, **kw)
    return True


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg back end (files only), or a clear error without matplotlib."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib comes with the notebooks extra
        raise RuntimeError("corral bench draws its figure with matplotlib: pip install 'corral[notebooks]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_panel(ax: Any, names: list[str], vals: list[float], colors: dict, fmt: str, title: str) -> None:
    """One labelled bar per system."""
    bars = ax.bar(names, vals, color=[colors.get(n, "grey") for n in names])
    ax.bar_label(bars, labels=[fmt.format(v) for v in vals], fontsize=8)
    ax.set_title(title)


def write_figure(result: dict, path: str) -> None:
    """Episodes/s bars and acquire / tool / release percentiles per system (log scale), as a PNG."""
    plt = pyplot()

    systems = result["systems"]
    names = list(systems)
    colors = {"corral": "#2a9d8f", "corral_destroy": "#e9c46a", "cold": "#e76f51", "direct": "#264653",
              "docker_bare": "#8d99ae"}
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.8), gridspec_kw={"width_ratios": [1, 1.3, 1.3, 1.3]})
    ax = axes[0]
    eps_names = [n for n in names if "episodes_per_s" in systems[n]]
    bar_panel(ax, eps_names, [systems[n]["episodes_per_s"] or 0 for n in eps_names], colors, "{:.3g}",
              "episodes / s (higher is better)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    pcts = ("p50", "p95", "p99")
    width = 0.8 / max(1, len(names))
    for ax, metric in zip(axes[1:], ("acquire_ms", "tool_ms", "release_ms")):
        have = [n for n in names if metric in systems[n]]
        for i, n in enumerate(have):
            ys = [systems[n][metric].get(q) or 0 for q in pcts]
            xs = [j + (i - (len(have) - 1) / 2) * width for j in range(len(pcts))]
            ax.bar(xs, ys, width, label=n, color=colors.get(n, "grey"))
        ax.set_xticks(range(len(pcts)), pcts)
        ax.set_yscale("log")
        ax.set_title(f"{metric[:-3]} latency, ms (log; lower is better)")
        ax.grid(axis="y", which="both", alpha=0.25)
        ax.legend(fontsize=7)
    pr, mc = result["params"], result["machine"]
    fig.suptitle(f"corral bench: {pr['workers']} workers x {pr['episodes']} episodes x {pr['calls']} tool calls, "
                 f"think {pr['think_ms']:g} ms, driver {pr['driver']}  |  {mc['cpu_count']} CPU {mc['cpu_model']}, "
                 f"{mc['memory_gib']} GiB, Ray {mc['ray']}, {mc['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    from tabulate import tabulate

    def g(d: dict, metric: str, q: str) -> Any:
        v = d.get(metric, {}).get(q)
        return "" if v is None else v

    rows = []
    for n, d in result["systems"].items():
        rows.append([n, d.get("episodes_per_s", ""), g(d, "acquire_ms", "p50"), g(d, "acquire_ms", "p95"),
                     g(d, "acquire_ms", "p99"), g(d, "tool_ms", "p50"), g(d, "tool_ms", "p95"), g(d, "tool_ms", "p99"),
                     g(d, "release_ms", "p50"), g(d, "release_ms", "p99"), d.get("errors", "")])
    return tabulate(rows, headers=["system", "ep/s", "acq p50", "acq p95", "acq p99", "tool p50", "tool p95",
                                   "tool p99", "rel p50", "rel p99", "errors"], tablefmt="github")


def len_acq(d: dict) -> int:
    return d.get("acquire_ms", {}).get("n", 0)


def targets(result: dict) -> list[str]:
    """The targets of the design brief, as measured (reported, never asserted)."""
    s = result["systems"]
    out = []
    c, cold, d = s.get("corral"), s.get("cold"), s.get("direct")
    if c and cold and cold.get("episodes_per_s"):
        ratio = c["episodes_per_s"] / cold["episodes_per_s"]
        out.append(f"episodes/s with reuse vs no pool: {ratio:.1f}x (target >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
    if c and c["acquire_ms"].get("p50") is not None:
        a = c["acquire_ms"]["p50"]
        out.append(f"acquire p50: {a} ms (target < 5 ms: {'met' if a < 5 else 'NOT met'})")
    pair = (c or {}).get("tool_ms_paired_under_load")
    if pair and pair["handle_ms"].get("p50") is not None and pair["direct_ms"].get("p50") is not None:
        gap = pair["handle_ms"]["p50"] - pair["direct_ms"]["p50"]
        out.append(f"tool call p50 under load, handle - direct HTTP to the same box, back to back: {gap:+.2f} ms "
                   f"({pair['handle_ms']['p50']} vs {pair['direct_ms']['p50']}, {pair['handle_ms']['n']} pairs; "
                   f"target within 1 ms: {'met' if gap <= 1 else 'NOT met'})")
    if c and d and c["tool_ms"].get("p50") is not None and d["tool_ms"].get("p50") is not None:
        gap = c["tool_ms"]["p50"] - d["tool_ms"]["p50"]
        out.append(f"tool call p50, corral system - direct system: {gap:+.2f} ms (different loads: the corral "
                   f"system also resets every sandbox between episodes, and a reset kernel boots while "
                   f"the next episode's calls run; direct calls boxes that are never reset)")
    q = (c or {}).get("tool_ms_one_box_quiet")
    if q:
        gap = q["handle_ms"]["p50"] - q["direct_ms"]["p50"]
        out.append(f"tool call p50 on one quiet box, handle - direct: {gap:+.2f} ms "
                   f"({q['handle_ms']['p50']} vs {q['direct_ms']['p50']})")
    if c and c.get("memory_per_live_session"):
        out.append(f"memory per live session: {c['memory_per_live_session']}")
    if cold and "cold_acquires" in cold:
        out.append(f"cold: {cold['sandboxes_started']} sandboxes started for {len_acq(cold)} acquires (at most "
                   f"{cold['surplus_started']} could have been handed out warm); {cold['cold_acquires']} acquires got "
                   f"a sandbox created after they began, {cold['warm_acquires']} one whose start began earlier")
    if c and "cold_acquires" in c:
        out.append(f"corral (reuse): {c['warm_acquires']} warm acquires, {c['cold_acquires']} waited for a new "
                   f"sandbox; {c['sandboxes_started']} started during the episodes")
    return out


# -- entry points ----------------------------------------------------------------------


def _failed(system: str, e: BaseException) -> dict:
    empty = summary([])
    if system == "direct":
        return {"tool_ms": empty, "errors": 1, "failure": f"{type(e).__name__}: {e}"}
    return {"episodes_per_s": 0.0, "errors": 1, "acquire_ms": empty, "tool_ms": empty, "release_ms": summary([]),
            "failure": f"{type(e).__name__}: {e}"}


def prepare_run(p: Any, out_dir: Optional[str], workload: str) -> str:
    """Checks before a benchmark of ``workload`` runs (its params, Ray); makes ``out_dir`` and
    returns a scratch directory."""
    import ray

    p.validate()
    if not ray.is_initialized():
        raise RuntimeError(f"corral.bench.{workload}.run needs Ray initialized (ray.init) first; `corral bench` does it")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"corral-{workload}-")


def run(p: BenchParams, out_dir: Optional[str] = None) -> dict:
    """Run every system of ``p`` on the Ray cluster this process is connected to; write DIR/bench.{json,png}."""
    workdir = prepare_run(p, out_dir, "rollout")
    systems: dict[str, dict] = {}
    try:
        for system in CORRAL_SYSTEMS:
            if system not in p.systems:
                continue
            with_direct = system == "corral" and "direct" in p.systems
            try:
                systems.update(_run_corral(p, system, workdir, with_direct))
            except Exception as e:
                print(f"corral bench: {system} failed: {type(e).__name__}: {e}", file=sys.stderr)
                systems[system] = _failed(system, e)
                if with_direct:
                    systems["direct"] = _failed("direct", e)
        if "direct" in p.systems and "direct" not in systems:
            # direct alone: it runs on the boxes of a reuse pool, which are then not benchmarked
            try:
                systems.update({k: v for k, v in _run_corral(p, "corral", workdir, True).items() if k == "direct"})
            except Exception as e:
                systems["direct"] = _failed("direct", e)
        if "docker_bare" in p.systems:
            try:
                systems["docker_bare"] = _run_docker_bare(p)
            except Exception as e:
                print(f"corral bench: docker_bare failed: {type(e).__name__}: {e}", file=sys.stderr)
                systems["docker_bare"] = _failed("docker_bare", e)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    params = {k: v for k, v in asdict(p).items() if k not in ("progress", "namespace_prefix")}
    params["systems"] = list(p.systems)
    result = {"systems": {k: systems[k] for k in SYSTEMS if k in systems}, "machine": machine_info(), "params": params}
    if out_dir:
        write_json(os.path.join(out_dir, "bench.json"), result)
        write_figure(result, os.path.join(out_dir, "bench.png"))
    return result


def add_arguments(ap: argparse.ArgumentParser, driver: bool = True) -> None:
    from corral.bench import cycle

    ap.add_argument("--workload", choices=["rollout", "cycle"], default="rollout",
                    help="rollout: RL-shaped episodes (this module); cycle: create_from_pool / one shell call / "
                         "release in a loop from W threads, the cold path (corral.bench.cycle)")
    ap.add_argument("--quick", action="store_true",
                    help=f"a short run (W={QUICK['workers']} E={QUICK['episodes']} K={QUICK['calls']}), about a minute")
    ap.add_argument("--out", default="bench-out", help="directory for bench.json and bench.png (default: bench-out)")
    ap.add_argument("--workers", "-W", type=int, help=f"concurrent workers (default {DEFAULT['workers']})")
    ap.add_argument("--episodes", "-E", type=int, help=f"episodes per worker (default {DEFAULT['episodes']})")
    ap.add_argument("--calls", "-K", type=int, help=f"tool calls per episode (default {DEFAULT['calls']})")
    ap.add_argument("--think-ms", type=float, default=50.0, help="think time between tool calls (default 50)")
    ap.add_argument("--systems", help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all that apply)")
    ap.add_argument("--image", default="corral-box:latest", help="sandbox image (docker driver)")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--kernel-reset", choices=["restart", "namespace"], default="restart",
                    help="how the reuse system resets a sandbox's kernel (default: restart)")
    ap.add_argument("--session-mode", choices=["actor", "hosted"], default="actor",
                    help="where sessions' heartbeat clocks run: an actor each, or slots of one host per node "
                         "(default: actor)")
    if driver:
        ap.add_argument("--driver", dest="bench_driver", choices=["process", "docker"],
                        help="container_deployment (default: process)")
    cycle.add_arguments(ap)


def params_from_args(args: argparse.Namespace) -> BenchParams:
    base = QUICK if args.quick else DEFAULT
    return BenchParams(
        workers=args.workers if args.workers is not None else base["workers"],
        episodes=args.episodes if args.episodes is not None else base["episodes"],
        calls=args.calls if args.calls is not None else base["calls"],
        think_ms=args.think_ms,
        driver=getattr(args, "bench_driver", None) or getattr(args, "driver", None) or "process",
        image=args.image,
        systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()) if args.systems else (),
        quick=args.quick,
        namespace_prefix=f"{getattr(args, 'namespace', None) or 'corral'}-bench",
        progress=not args.no_progress,
        kernel_reset=args.kernel_reset,
        session_mode=args.session_mode,
    ).validate()


def run_on_ray(args: argparse.Namespace, num_cpus: int, banner: str, work: Callable[[], dict]) -> tuple[dict, float]:
    """Join or start Ray (see :func:`join_or_start_ray`; one this started is shut down after), say
    ``banner`` on stderr and run ``work``: returns its result and the seconds it took."""
    import ray

    started = join_or_start_ray(args, num_cpus)
    try:
        print(banner, file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        return work(), time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()


def print_report(table_text: str, target_lines: list[str], out: str, stem: str, seconds: float) -> None:
    """A benchmark's table, its targets (one line each) and the files it wrote (``stem``.json and .png)."""
    print()
    print(table_text)
    if target_lines:
        print()
    for line in target_lines:
        print(f"- {line}")
    print(f"\nwrote {os.path.join(out, stem + '.json')} and {os.path.join(out, stem + '.png')} in {seconds:.0f}s")


def run_cli(args: argparse.Namespace) -> int:
    """``corral bench``: start (or join) Ray once, run, print the table and the targets, stop what it started."""
    if getattr(args, "workload", "rollout") == "cycle":
        from corral.bench import cycle

        return cycle.run_cli(args)
    require_matplotlib()
    p = params_from_args(args)
    banner = (f"corral bench: {p.workers} workers x {p.episodes} episodes x {p.calls} tool calls, think "
              f"{p.think_ms:g} ms, driver {p.driver}; systems {', '.join(p.systems)}")
    result, seconds = run_on_ray(args, 4, banner, lambda: run(p, args.out))
    print_report(table(result), targets(result), args.out, "bench", seconds)
    return 0 if all(not d.get("failure") for d in result["systems"].values()) else 1


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m corral.bench.rollout", description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    from corral.cli import run_command

    return run_command("corral bench", run_cli, args)


if __name__ == "__main__":
    sys.exit(main())
