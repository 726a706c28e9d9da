"""A Ray head of one's own for tests and chaos runs: started with ``ray start``, stopped by pid.

What it owns: one ``ray start --head`` on free ports of 127.0.0.1 (or a given
address), with a temp dir of its own (its address file, sockets and logs are
its own, so ``ray.init()`` elsewhere on the machine never joins it by
accident), and the processes that name that temp dir and their descendants.
:meth:`RayHead.stop` ends exactly those, by pid: never ``ray stop``, which
would stop every cluster on the machine. :meth:`RayHead.restart` brings a head
back on the same ports (a full Ray restart under corral).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

__all__ = ["RayHead", "free_ports", "ray_env", "processes_naming", "stop_processes", "RAY_CLI"]

RAY_CLI = Path(sys.executable).with_name("ray")
if not RAY_CLI.exists():
    RAY_CLI = Path(shutil.which("ray") or RAY_CLI)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free TCP ports on ``host`` (all held at once so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cmdline(p: psutil.Process) -> str:
    """A process's command line as one string ('' when it is gone or closed to us)."""
    try:
        return " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def processes_naming(marker: str) -> dict[int, psutil.Process]:
    """Processes whose command line names ``marker`` (a temp dir), and all their descendants."""
    out: dict[int, psutil.Process] = {}
    for p in psutil.process_iter():
        if marker in cmdline(p):
            out[p.pid] = p
            try:
                for c in p.children(recursive=True):
                    out[c.pid] = c
            except psutil.NoSuchProcess:
                pass
    out.pop(os.getpid(), None)  # never ourselves (our own command line could name the path)
    return out


def stop_processes(procs: dict[int, psutil.Process], timeout: float = 15.0) -> set[int]:
    """SIGTERM, then SIGKILL, these processes; returns the pids signaled."""
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return set(procs)


def stop_head(marker: str, timeout: float = 15.0) -> set[int]:
    """End, by pid, the processes of the Ray head whose temp dir is ``marker``, with a second pass
    for workers its raylet started meanwhile; returns the pids signaled."""
    signaled = stop_processes(processes_naming(marker), timeout)
    return signaled | stop_processes(processes_naming(marker), timeout=5)


def ray_env(extra: Optional[dict] = None) -> dict:
    """This environment without anything that points Ray at another cluster, the venv first on PATH."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_NAMESPACE", "RAY_AUTH_MODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Token auth, explicitly for heads, drivers and the jobs CLI alike (Ray reads its token file itself).
    env["RAY_AUTH_MODE"] = "token"
    env.update(extra or {})
    return env


class RayHead:
    """One ``ray start --head`` of its own (see the module docstring)."""

    def __init__(self, num_cpus: int = 2, dashboard: bool = False, host: str = "127.0.0.1",
                 resources: Optional[dict] = None) -> None:
        self.num_cpus = num_cpus
        self.dashboard = dashboard
        self.host = host
        self.resources = resources
        self.temp_dir = tempfile.mkdtemp(prefix="crh-", dir="/tmp")  # short: Ray's Unix sockets live under it
        self.ports: list[int] = []
        self.address = ""
        self.api = ""

    @property
    def env(self) -> dict:
        """An environment whose Ray calls go to this head (RAY_ADDRESS, and the job API if any)."""
        extra = {"RAY_ADDRESS": self.address}
        if self.api:
            extra["RAY_API_SERVER_ADDRESS"] = self.api
        return ray_env(extra)

    def _command(self) -> list[str]:
        (gcs, dash, client, nm, om, agent_listen, agent_grpc, metrics, rtenv) = self.ports
        cmd = [
            str(RAY_CLI), "start", "--head", f"--node-ip-address={self.host}",
            f"--port={gcs}", f"--ray-client-server-port={client}", f"--node-manager-port={nm}",
            f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent_listen}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rtenv}",
            "--min-worker-port=0", "--max-worker-port=0",  # workers take any free port, never a fixed range
            f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]
        if self.dashboard:
            cmd += [f"--dashboard-port={dash}", f"--dashboard-host={self.host}", "--include-dashboard=true"]
        else:
            cmd += ["--include-dashboard=false"]
        if self.resources:
            import json

            cmd.append(f"--resources={json.dumps(self.resources)}")
        return cmd

    def start(self, attempts: int = 2) -> "RayHead":
        for _ in range(attempts):
            if not self.ports:
                self.ports = free_ports(9, self.host)
            r = subprocess.run(self._command(), env=ray_env(), capture_output=True, text=True, timeout=120,
                               cwd=self.temp_dir)
            if r.returncode == 0:
                self.address = f"{self.host}:{self.ports[0]}"
                self.api = f"http://{self.host}:{self.ports[1]}" if self.dashboard else ""
                return self
            self.stop(remove=False)  # a port taken between picking and binding: new ports, once more
            self.ports = []
        raise RuntimeError(f"ray start failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")

    def restart(self) -> "RayHead":
        """Stop every process of this head and start it again on the same ports (a full Ray restart)."""
        self.stop(remove=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the old GCS port must be free before the new head binds it
            try:
                with socket.create_connection((self.host, self.ports[0]), timeout=0.5):
                    time.sleep(0.2)
            except OSError:
                break
        return self.start(attempts=1)

    def stop(self, remove: bool = True) -> set[int]:
        """End this head's processes by pid (a second pass for workers started meanwhile)."""
        signaled = stop_head(self.temp_dir)
        if remove:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return signaled

    def alive(self) -> list[psutil.Process]:
        return list(processes_naming(self.temp_dir).values())
