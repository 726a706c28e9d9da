"""Chaos: the faults corral must survive, each run for real and counted.

Every scenario breaks something on purpose (a client that exits, is killed or signalled; two
clients that start at once; a registry, pool or session actor killed under load; a sandbox
killed under its pool; a whole Ray cluster restarted) and returns an :class:`Outcome`: the faults
injected, the client calls that failed, the sessions lost, the sandboxes (containers or box
processes) and Ray processes left behind, and how long it took. ``corral chaos`` prints them as
a table (the "faults survived" figures of docs/performance.md); ``tests/chaos`` runs the same
scenarios in CI and requires each to end clean.

What it owns: :class:`Harness`, the scenarios' workbench (fresh namespaces and state dirs, client
processes, leak counts); the scenarios themselves are in :mod:`corral.chaos.scenarios`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["Outcome", "Harness", "main"]


@dataclass
class Outcome:
    """What one scenario did and what it left."""

    scenario: str
    driver: str
    faults: int = 0  # faults injected (kills, signals, exits)
    calls: int = 0  # client operations attempted under the faults
    errors: int = 0  # of those, the ones that failed, and wrong behaviours seen
    lost: int = 0  # sessions or records that should have survived and did not
    leaked: int = 0  # sandboxes (containers, box processes) and Ray processes left behind
    seconds: float = 0.0
    detail: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.errors == 0 and self.lost == 0 and self.leaked == 0

    def row(self) -> dict:
        d = asdict(self)
        d["clean"] = self.clean
        return d


class Harness:
    """Namespaces, state dirs, client processes and leak counts for the scenarios.

    ``driver``: "process" or "docker"; ``address``: the Ray cluster in-cluster scenarios use
    (this process joins it); ``workdir``: where state dirs and mounts go (removed by the caller).
    """

    def __init__(self, driver: str, workdir: str, address: Optional[str] = None, image: Optional[str] = None) -> None:
        self.driver = driver
        self.workdir = Path(workdir)
        self.address = address
        self.image = image or os.environ.get("CORRAL_IMAGE", "corral-box:latest")
        self.procs: list[subprocess.Popen] = []
        self.configs: list[Any] = []

    def config(self, tag: str, **kw: Any):
        from corral.models import SandboxManagerEnvConfig, SandboxTypeConfig

        ns = f"chaos-{tag}-{uuid.uuid4().hex[:6]}"
        base = self.workdir / ns
        types = kw.pop("sandbox_types", None) or {"base": {"name": "base"}}
        types = {k: {**(v.model_dump() if isinstance(v, SandboxTypeConfig) else v), "image": self.image}
                 for k, v in types.items()}
        kw.setdefault("watcher_scan_interval", 0.2)
        kw.setdefault("reconcile_interval", 3)
        kw.setdefault("spare_sessions", 1)
        kw.setdefault("acquire_timeout", 120)
        config = SandboxManagerEnvConfig(
            namespace=ns, state_dir=str(base / "state"), default_mount_dir=str(base / "mounts"),
            container_deployment=self.driver, sandbox_types=types, **kw)
        self.configs.append(config)
        return config

    # -- client processes -----------------------------------------------------------

    def client(self, mode: str, config: Any, *args: str, own_ray: bool = True) -> "Client":
        """Start ``python -m corral.chaos.client``; ``own_ray``: with no Ray to join (it starts its
        own, in a temp dir of its own), else joining this harness's cluster."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_NAMESPACE")}
        ray_tmp = tempfile.mkdtemp(prefix="crc-", dir="/tmp")  # short: Ray's sockets live under it
        env["RAY_TMPDIR"] = ray_tmp
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        if not own_ray and self.address:
            env["RAY_ADDRESS"] = self.address
        p = subprocess.Popen(
            [sys.executable, "-m", "corral.chaos.client", mode, config.model_dump_json(), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(self.workdir))
        self.procs.append(p)
        return Client(p, ray_tmp)

    def close(self) -> None:
        """End the clients it started; a namespace a scenario left sandboxes in (it failed half way)
        is taken down."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for config in self.configs:
            if self.sandboxes_left(config):
                self.remove_leftovers(config)

    # -- what is left ---------------------------------------------------------------

    def sandboxes_left(self, config: Any) -> int:
        """Containers (Docker) or box processes (process driver) of ``config``'s namespace here."""
        if self.driver == "docker":
            import docker

            client = docker.from_env()
            try:
                return len(client.api.containers(all=True, filters={"label": [f"corral.registry={config.namespace}"]}))
            finally:
                client.close()
        from corral.testing.rayhead import processes_naming

        root = str(Path(config.abs_state_dir()) / "process")
        return len([p for p in processes_naming(root).values() if _is_box(p)])

    def wait_clean(self, config: Any, seconds: float = 20.0) -> tuple[int, float]:
        """Wait up to ``seconds`` for the namespace's sandboxes to be gone; (left, seconds waited)."""
        t0 = time.monotonic()
        left = self.sandboxes_left(config)
        while left and time.monotonic() - t0 < seconds:
            time.sleep(0.25)
            left = self.sandboxes_left(config)
        return left, time.monotonic() - t0

    def remove_leftovers(self, config: Any) -> None:
        """Whatever a failed scenario left: removed, so the next one starts clean."""
        from corral.manager import down

        try:
            down(config, timeout=20)
        except Exception:
            pass


def _is_box(p: Any) -> bool:
    try:
        return "corral.box" in " ".join(p.cmdline())
    except Exception:
        return False


class Client:
    """A running chaos client: its process, its Ray temp dir, the events it printed."""

    def __init__(self, proc: subprocess.Popen, ray_tmp: str) -> None:
        self.proc = proc
        self.ray_tmp = ray_tmp

    def event(self, name: str, timeout: float = 240.0) -> dict:
        """The next event ``name`` the client prints (its stderr in the error if it dies first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == name:
                return ev
        err = self.proc.stderr.read() if self.proc.poll() is not None else "(still running)"
        raise RuntimeError(f"chaos client never said {name!r} (exit {self.proc.poll()}): {err[-3000:]}")

    def wait(self, timeout: float = 120.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def ray_left(self) -> int:
        """Processes of the Ray cluster this client started that are still running."""
        from corral.testing.rayhead import processes_naming

        return len(processes_naming(self.ray_tmp))

    def stderr(self) -> str:
        return self.proc.stderr.read() if self.proc.poll() is not None else ""


def run(driver: str, names: Optional[list[str]], workdir: str, address: Optional[str],
        progress: Callable[[str], None] = lambda s: None) -> list[Outcome]:
    from .scenarios import SCENARIOS

    h = Harness(driver, workdir, address)
    out = []
    try:
        for name, fn in SCENARIOS.items():
            if names and name not in names:
                continue
            progress(f"{name} ({driver}) ...")
            t0 = time.monotonic()
            try:
                o = fn(h)
            except Exception as e:
                o = Outcome(name, driver, errors=1, detail=f"{type(e).__name__}: {e}"[:500])
            o.seconds = round(time.monotonic() - t0, 1)
            out.append(o)
            progress(f"  {'clean' if o.clean else 'NOT CLEAN'} in {o.seconds:.0f}s: {o.detail}")
    finally:
        h.close()
    return out


def main(argv: Optional[list[str]] = None) -> int:
    """``corral chaos``: run the scenarios, print the faults survived, write ``--out`` JSON."""
    import argparse
    import shutil

    import ray
    from tabulate import tabulate

    from .scenarios import SCENARIOS

    ap = argparse.ArgumentParser(prog="corral chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--driver", choices=["process", "docker", "both"], default="process")
    ap.add_argument("--only", action="append", choices=sorted(SCENARIOS), help="run only these scenarios")
    ap.add_argument("--out", help="write the outcomes here as JSON")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="corral-chaos-")
    started = False
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False,
                 namespace="corral-chaos")
        started = True
    address = ray.get_runtime_context().gcs_address
    drivers = ["process", "docker"] if args.driver == "both" else [args.driver]
    rows: list[Outcome] = []
    try:
        for d in drivers:
            rows += run(d, args.only, workdir, address, lambda s: print(s, file=sys.stderr, flush=True))
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    cols = ["scenario", "driver", "faults", "calls", "errors", "lost", "leaked", "seconds", "clean", "detail"]
    print(tabulate([[r.row()[c] for c in cols] for r in rows], headers=cols))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"at": time.time(), "outcomes": [r.row() for r in rows]}, f, indent=1)
    return 0 if all(r.clean for r in rows) else 1
