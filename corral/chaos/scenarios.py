"""The chaos scenarios: each breaks one thing for real and counts what survived (see :mod:`corral.chaos`).

Client scenarios run corral in processes of their own, with no Ray to join, so each owns the
Ray cluster it starts: what it leaves when it exits, is signalled or killed is the point.
Cluster scenarios run on the harness's Ray cluster and break the actors, the sandboxes or the
cluster itself under load.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from pathlib import Path
from typing import Callable

from ..testing.waiting import poll
from . import Harness, Outcome

__all__ = ["SCENARIOS"]

SCENARIOS: dict[str, Callable[[Harness], Outcome]] = {}


def scenario(fn: Callable[[Harness], Outcome]) -> Callable[[Harness], Outcome]:
    SCENARIOS[fn.__name__] = fn
    return fn


# -- the client that owns its cluster -------------------------------------------------------


def _owner_ends(h: Harness, tag: str, how: str) -> Outcome:
    """A script starts corral with no Ray running, holds sandboxes, and ends by ``how``; 20 s
    later at the most, nothing it started may run: no sandbox, no Ray process."""
    cfg = h.config(tag, pool_size=2)
    c = h.client("own", cfg, {"sigterm": "wait", "sigint": "wait", "sighup": "wait"}.get(how, how))
    ready = c.event("ready")
    if how in ("sigterm", "sigint", "sighup"):
        os.kill(ready["pid"], {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sighup": signal.SIGHUP}[how])
    code = c.wait(120)
    left, waited = h.wait_clean(cfg, 20)
    ray_left = c.ray_left()
    o = Outcome(tag, h.driver, faults=1, calls=len(ready["names"]), leaked=left + ray_left,
                detail=f"exit code {code}; {left} sandboxes and {ray_left} Ray processes left "
                       f"({waited:.1f}s after exit)")
    if left:
        h.remove_leftovers(cfg)
    return o


#: The scenarios in which the owning script ends by itself or by a signal: name -> how it ends.
_OWNER_ENDINGS = {"script_exits": "exit", "script_raises": "raise", "script_sigterm": "sigterm",
                  "script_sigint": "sigint"}
for _name, _how in _OWNER_ENDINGS.items():
    SCENARIOS[_name] = functools.partial(_owner_ends, tag=_name, how=_how)


@scenario
def script_sigkill_then_restart(h: Harness) -> Outcome:
    """SIGKILL leaves no time to clean up; the next start on the same state dir removes what the
    killed owner left, at once, and leaves nothing itself when it exits."""
    cfg = h.config("script_sigkill", pool_size=2)
    first = h.client("own", cfg, "wait")
    ready = first.event("ready")
    os.kill(ready["pid"], signal.SIGKILL)
    first.wait(30)
    orphaned = h.sandboxes_left(cfg)
    second = h.client("own", cfg, "exit")
    second.event("ready")
    code = second.wait(120)
    left, waited = h.wait_clean(cfg, 20)
    ray_left = first.ray_left() + second.ray_left()
    o = Outcome("script_sigkill_then_restart", h.driver, faults=1, calls=4, leaked=left + ray_left,
                detail=f"{orphaned} sandboxes orphaned by the kill; the next start removed them "
                       f"(exit {code}); {left} left after it, {ray_left} Ray processes")
    if orphaned == 0:
        o.errors += 1
        o.detail += " (the kill orphaned nothing: the scenario did not test what it should)"
    if left:
        h.remove_leftovers(cfg)
    return o


@scenario
def two_scripts_one_state_dir(h: Harness) -> Outcome:
    """Two scripts start at once on one machine with the same state dir and namespace: one starts
    the cluster, the other joins it; no sandbox is handed to both; nothing is left after both exit."""
    cfg = h.config("two_scripts", pool_size=3)
    go = str(Path(cfg.abs_state_dir()).parent / "go")
    a, b = h.client("share", cfg, go), h.client("share", cfg, go)
    ra, rb = a.event("ready"), b.event("ready")
    shared = set(ra["names"]) & set(rb["names"])
    Path(go).touch()
    a.wait(120)
    b.wait(120)
    left, waited = h.wait_clean(cfg, 20)
    ray_left = a.ray_left() + b.ray_left()
    o = Outcome("two_scripts_one_state_dir", h.driver, faults=2, calls=6,
                errors=len(shared) + ra["foreign"] + rb["foreign"] + (ra["gcs"] != rb["gcs"]),
                leaked=left + ray_left,
                detail=f"clusters: {len({ra['gcs'], rb['gcs']})}; sandboxes shared: {len(shared)}; "
                       f"foreign marks seen: {ra['foreign'] + rb['foreign']}; left: {left} + {ray_left} Ray")
    if left:
        h.remove_leftovers(cfg)
    return o


# -- on a running cluster ---------------------------------------------------------------------


def _manager(h: Harness, cfg):
    from corral import SandboxManager

    return SandboxManager(cfg, address=h.address)


def _finish(h: Harness, m, o: Outcome) -> Outcome:
    from corral.manager import down

    m.close()  # this client's own sandboxes first, then the namespace
    out = down(m.config, timeout=30)
    left = out["containers_left"] + h.sandboxes_left(m.config)
    o.leaked += left
    if left:
        o.detail += f"; {left} sandboxes left after down"
    return o


@scenario
def a_reader_changes_nothing(h: Harness) -> Outcome:
    """A worker that connects with a config of its own (pool 0), and ``corral status``, must not
    change a running namespace's pool."""
    import subprocess
    import sys

    cfg = h.config("reader", pool_size=3)
    m = _manager(h, cfg)
    m.reserve(n=0, wait=True, timeout=120)
    reader = h.config("reader")
    reader = reader.model_copy(update={"namespace": cfg.namespace, "state_dir": cfg.state_dir})
    c = h.client("read", reader, own_ray=False)
    c.event("done")
    c.wait(60)
    env = {**os.environ, "RAY_ADDRESS": h.address or ""}
    st = subprocess.run([sys.executable, "-m", "corral.cli", "--namespace", cfg.namespace, "status"],
                        capture_output=True, text=True, env=env, timeout=120)
    time.sleep(4)  # a pool shrinking would have begun by now
    pool = m.status()["pools"]["base"]
    o = Outcome("a_reader_changes_nothing", h.driver, faults=2, calls=2,
                errors=(pool["target"] != 3) + (pool["warm"] < 3) + (st.returncode != 0),
                detail=f"target {pool['target']}, warm {pool['warm']} after a reader and `corral status` "
                       f"(status exit {st.returncode})")
    return _finish(h, m, o)


def _cycles(m, workers: int, seconds: float, faults: Callable[[float], int]) -> tuple[int, int, list, float]:
    """``workers`` loops of acquire -> shell -> release for ``seconds`` while ``faults(t)`` injects
    faults; returns (cycles, errors, error texts, longest gap between two finished cycles)."""
    done: list[float] = []
    errors: list[str] = []

    async def worker(i: int) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                sb = await m.acquire_async(timeout=90)
                try:
                    r = await sb.shell(f"echo {i}", timeout=60)
                    if r.stdout.strip() != str(i):
                        errors.append(f"wrong output {r.stdout!r}")
                finally:
                    await sb.release()
                done.append(time.monotonic())
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:300])

    async def chaos() -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await asyncio.to_thread(faults, time.monotonic() - t0)
            await asyncio.sleep(0.5)

    async def all_() -> None:
        await asyncio.gather(chaos(), *(worker(i) for i in range(workers)))

    t0 = time.monotonic()
    asyncio.run(all_())
    stamps = [t0] + sorted(done)
    gap = max((b - a for a, b in zip(stamps, stamps[1:])), default=seconds)
    return len(done), len(errors), errors, gap


def _kill_registry(m, hard: bool) -> None:
    import ray

    from corral.actors.handles import REGISTRY_NAME

    if hard:  # the process dies under Ray: it restarts it
        os.kill(m.status()["pid"], signal.SIGKILL)
    else:
        ray.kill(ray.get_actor(REGISTRY_NAME, namespace=m.config.namespace), no_restart=False)


@scenario
def registry_restarts_under_destroy_load(h: Harness) -> Outcome:
    """Destroy-mode sandboxes (every release a teardown, every acquire a start) under 6 workers
    while the registry is killed 3 times (SIGKILL and ray.kill): the starts it was making are not
    dropped, no worker errs, and the loop never stops for long."""
    cfg = h.config("registry_restarts", pool_size=4, acquire_timeout=90)
    m = _manager(h, cfg)
    m.reserve(n=0, wait=True, timeout=120)
    kills = [8.0, 16.0, 24.0]
    fired: list[float] = []

    def faults(t: float) -> int:
        if kills and t >= kills[0]:
            kills.pop(0)
            _kill_registry(m, hard=len(fired) % 2 == 0)
            fired.append(t)
        return len(fired)

    cycles, errors, texts, gap = _cycles(m, 6, 32, faults)
    st = m.status()
    stuck = st["counts"].get("STARTING", 0) - st["starts_in_flight"]
    o = Outcome("registry_restarts_under_destroy_load", h.driver, faults=len(fired), calls=cycles + errors,
                errors=errors + (gap > 30), lost=max(0, stuck),
                detail=f"{cycles} cycles, {errors} errors, longest stall {gap:.1f}s, "
                       f"{max(0, stuck)} starts orphaned" + (f"; first error: {texts[0]}" if texts else ""))
    return _finish(h, m, o)


@scenario
def actors_killed_under_reuse_load(h: Harness) -> Outcome:
    """Reuse-mode sandboxes under 4 workers while the registry, the pool and session actors are
    killed 9 times in all: no worker errs, no sandbox is lost."""
    import ray

    from corral.actors.handles import SESSION_PREFIX
    from corral.models import SandboxTypeConfig

    cfg = h.config("actor_kills", pool_size=3, sandbox_types={"base": SandboxTypeConfig(name="base", reuse=True)})
    m = _manager(h, cfg)
    m.reserve(n=0, wait=True, timeout=120)
    plan = [(3.0 * (i + 1), ("registry", "pool", "session")[i % 3]) for i in range(9)]
    fired: list[str] = []

    def faults(t: float) -> int:
        while plan and t >= plan[0][0]:
            _, what = plan.pop(0)
            try:
                if what == "registry":
                    _kill_registry(m, hard=False)
                else:
                    prefix = "corral-pool-" if what == "pool" else SESSION_PREFIX
                    names = [e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
                             if e["namespace"] == m.config.namespace and e["name"].startswith(prefix)]
                    if names:
                        ray.kill(ray.get_actor(names[0], namespace=m.config.namespace), no_restart=(what == "session"))
                fired.append(what)
            except Exception:
                pass
        return len(fired)

    cycles, errors, texts, gap = _cycles(m, 4, 30, faults)
    st = m.status()
    live = st["counts"].get("WARM", 0) + st["counts"].get("RESETTING", 0)
    o = Outcome("actors_killed_under_reuse_load", h.driver, faults=len(fired), calls=cycles + errors,
                errors=errors, lost=int(live == 0),
                detail=f"{len(fired)} kills ({', '.join(fired)}); {cycles} cycles, {errors} errors, longest "
                       f"stall {gap:.1f}s" + (f"; first error: {texts[0]}" if texts else ""))
    return _finish(h, m, o)


@scenario
def client_killed(h: Harness) -> Outcome:
    """A client holding a session and a sandbox created without one is killed (-9): both are reaped
    by their heartbeat timeout, the session's workspace is kept, and a restore brings it back."""
    cfg = h.config("client_killed", pool_size=1, heartbeat_timeout=3)
    m = _manager(h, cfg)
    c = h.client("hold", cfg, own_ray=False)
    ready = c.event("ready")
    os.kill(ready["pid"], signal.SIGKILL)
    c.wait(30)
    t0 = time.monotonic()
    reaped = poll(lambda: all(m.get_info(n)["state"] == "RECYCLED" for n in ready["names"]), 30)
    took = time.monotonic() - t0
    lost = 0
    if reaped:
        m.restore_session(ready["session"])
        got = m.call_tool(ready["names"][0], "run_shell_command", {"command": "cat mark.txt"})
        lost = int(got["content"][0]["text"].strip() != str(ready["pid"]))
    o = Outcome("client_killed", h.driver, faults=1, calls=2, errors=int(not reaped), lost=lost,
                detail=f"both sandboxes reaped {took:.1f}s after the kill (timeout 3 s); restored workspace "
                       f"{'kept' if not lost else 'LOST'}")
    return _finish(h, m, o)


@scenario
def sandbox_dies_under_its_pool(h: Harness) -> Outcome:
    """A warm sandbox is killed under the pool (the engine stops it, a box crashes): its record
    leaves WARM within seconds, and no acquire is handed a dead sandbox."""
    cfg = h.config("sandbox_dies", pool_size=3)
    m = _manager(h, cfg)
    m.reserve(n=0, wait=True, timeout=120)
    warm = [r for r in m.status()["records"] if r["state"] == "WARM"]
    victim = warm[0]
    t0 = time.monotonic()
    _kill_sandbox(h, cfg, victim)
    gone = poll(lambda: _state(m, victim["container_name"]) != "WARM", 30, 0.1)
    took = time.monotonic() - t0
    errors = 0
    held = []
    for _ in range(3):
        try:
            sb = m.acquire(timeout=90)
            held.append(sb)
            errors += sb.shell("echo ok").stdout.strip() != "ok"
        except Exception:
            errors += 1
    for sb in held:
        sb.release()
    o = Outcome("sandbox_dies_under_its_pool", h.driver, faults=1, calls=3, errors=errors + int(not gone),
                detail=f"its record left WARM {took:.1f}s after the kill; 3 acquires: {3 - errors} worked")
    return _finish(h, m, o)


def _state(m, name: str) -> str:
    """A record's state; a record already dropped is "gone"."""
    from corral.errors import NotFound

    try:
        return m.get_info(name)["state"]
    except NotFound:
        return "gone"


def _kill_sandbox(h: Harness, cfg, rec: dict) -> None:
    if h.driver == "docker":
        import docker

        client = docker.from_env()
        try:
            client.api.kill(rec["container_id"])
        finally:
            client.close()
        return
    import json

    meta = next((Path(cfg.abs_state_dir()) / "process").glob(f"*/{rec['container_name']}/meta.json"))
    os.killpg(json.loads(meta.read_text())["pid"], signal.SIGKILL)  # the box and everything it started


@scenario
def long_command_outlives_the_timeout(h: Harness) -> Outcome:
    """A 12 s command under a 4 s heartbeat timeout completes; its session is reaped only after."""
    cfg = h.config("long_command", pool_size=1, heartbeat_timeout=4)
    m = _manager(h, cfg)
    sb = m.acquire()
    r = sb.shell("sleep 12; echo done", timeout=60)
    ok = r.stdout.strip() == "done" and m.get_info(sb.name)["state"] == "RUNNING"
    reaped = poll(lambda: m.get_info(sb.name)["state"] == "RECYCLED", 30)
    o = Outcome("long_command_outlives_the_timeout", h.driver, faults=0, calls=1, errors=int(not ok) + int(not reaped),
                detail=f"command {'completed' if ok else 'CUT OFF'}; reaped once idle: {bool(reaped)}")
    return _finish(h, m, o)


@scenario
def ray_restarts(h: Harness) -> Outcome:
    """The whole Ray cluster (a ``ray start`` head) is restarted under corral: records come back
    from the state dir, the held session is adopted and works, an orphan container is removed."""
    from corral.drivers import ContainerSpec, make_driver
    from corral.testing.rayhead import RayHead

    head = RayHead(num_cpus=2).start()
    try:
        cfg = h.config("ray_restart", pool_size=0)
        held = _hold_on(head, cfg, h)
        from corral.actors.pool_actor import node_driver_config

        address = held.split()[-1] if held.startswith("created") else head.host
        driver = make_driver(node_driver_config(cfg, address))  # where corral's pool on that node looks
        loop = asyncio.new_event_loop()  # one loop for every call of this driver (its clients are bound to it)
        try:
            orphan = loop.run_until_complete(driver.create(ContainerSpec(
                name=f"chaos-orphan-{cfg.namespace}", token="o" * 32, image=h.image,
                labels={"corral.managed": "true", "corral.registry": cfg.namespace,
                        "corral.name": f"chaos-orphan-{cfg.namespace}"})))
            head.restart()
            back = _hold_on(head, cfg, h) if held.startswith("created") else held
            gone = poll(lambda: loop.run_until_complete(driver.status(orphan.container_id)) == "missing", 60, 0.5)
            loop.run_until_complete(driver.remove(orphan.container_id))
            loop.run_until_complete(driver.close())
        finally:
            loop.close()
        _down_on(head, cfg)
        left, _ = h.wait_clean(cfg, 20)
        return Outcome("ray_restarts", h.driver, faults=1, calls=2, errors=int(not gone), lost=int(back != "ok"),
                       leaked=left, detail=f"held session after the restart: {back}; orphan removed: {bool(gone)}")
    finally:
        head.stop()


def _hold_on(head, cfg, h: Harness) -> str:
    """In a process joined to ``head``: create a held session (or check the one created before)."""
    import subprocess
    import sys

    code = (
        "import json,sys\n"
        "from corral import SandboxManager, SandboxManagerEnvConfig\n"
        f"m = SandboxManager(SandboxManagerEnvConfig.model_validate_json({cfg.model_dump_json()!r}))\n"
        "names = m.get_session_mapping('held')\n"
        "if not names:\n"
        "    n = m.create(meta={'session_ctx_id': 'held'})\n"
        "    m.call_tool(n, 'run_shell_command', {'command': 'echo kept > held.txt'})\n"
        "    print('created', m.get_info(n)['node_address'])\n"
        "else:\n"
        "    out = m.call_tool(names[0], 'run_shell_command', {'command': 'cat held.txt'})\n"
        "    print('ok' if out['content'][0]['text'].strip() == 'kept' and m.get_info(names[0])['state'] == 'RUNNING'"
        " else 'wrong: ' + json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=head.env, timeout=240,
                       cwd=str(h.workdir))
    last = (r.stdout.strip().splitlines() or [""])[-1]
    if r.returncode != 0:
        return f"failed: {r.stderr[-500:]}"
    return last


def _down_on(head, cfg) -> None:
    import subprocess
    import sys

    code = ("from corral import SandboxManagerEnvConfig\nfrom corral.manager import down\n"
            f"print(down(SandboxManagerEnvConfig.model_validate_json({cfg.model_dump_json()!r})))\n")
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=head.env, timeout=240)


@scenario
def bad_input_is_a_clear_error(h: Harness) -> Outcome:
    """Input a user gets wrong is an InvalidRequest (or NotFound) with corral's message only: an
    oversized env, a session id with '/' or NUL or 10 KB long, a bad config; nothing is created."""
    import corral

    cfg = h.config("bad_input", pool_size=1)
    m = _manager(h, cfg)
    m.reserve(n=0, wait=True, timeout=120)
    checks = {
        "env value of 200 kB": (lambda: m.acquire(env={"BIG": "x" * 200_000}), corral.InvalidRequest),
        "session id with '/'": (lambda: m.acquire(session_ctx_id="a/b"), corral.InvalidRequest),
        "session id with NUL": (lambda: m.acquire(session_ctx_id="a\0b"), corral.InvalidRequest),
        "session id of 10 KB": (lambda: m.acquire(session_ctx_id="s" * 10_000), corral.InvalidRequest),
        "unknown sandbox": (lambda: m.get_info("no-such-sandbox"), corral.NotFound),
        "bad config": (lambda: corral.SandboxManagerEnvConfig(pool_size=-3), corral.InvalidRequest),
    }
    wrong = []
    for what, (call, cls) in checks.items():
        try:
            call()
            wrong.append(f"{what}: accepted")
        except cls as e:
            if "Traceback" in str(e) or "RayTaskError" in str(e) or type(e).__module__.startswith("ray"):
                wrong.append(f"{what}: Ray's wrapper shows ({type(e).__name__})")
        except Exception as e:
            wrong.append(f"{what}: {type(e).__name__}")
    active = m.status()["counts"].get("RUNNING", 0)
    o = Outcome("bad_input_is_a_clear_error", h.driver, faults=len(checks), calls=len(checks),
                errors=len(wrong) + active, detail="; ".join(wrong) or f"{len(checks)} refused, clearly; nothing created")
    return _finish(h, m, o)
