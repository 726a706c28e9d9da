"""Several Ray nodes on one machine: worker nodes in network namespaces of their own.

What it owns: a Linux bridge with the head's address (e.g. 10.213.0.1/24) and an iptables rule
that lets traffic between its ports through (Docker sets FORWARD to DROP), one network
namespace per worker node joined to it by a veth pair (10.213.0.2, .3, ...), a ``ray start``
head on the bridge address (:class:`~corral.testing.rayhead.RayHead`), a ``ray start`` worker
inside each namespace with a custom resource naming it, and optionally a Docker engine per
worker node, started inside its namespace with data and exec roots, socket and bridge of its own.
Traffic goes only to 127.0.0.1 and to these addresses. :meth:`NetnsCluster.kill_node` ends a
node the way a machine dies (every process in its namespace, its engine and containers with it);
:meth:`NetnsCluster.stop` removes everything, namespaces included, also after a failure.

Needs root and ``ip`` (iproute2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import psutil

from .rayhead import RAY_CLI, RayHead, processes_naming, ray_env, stop_processes

__all__ = ["NetnsCluster", "WorkerNode", "netns_problem"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


def netns_problem() -> Optional[str]:
    """Why worker nodes in network namespaces cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth, a bridge)"
    if shutil.which("ip") is None:
        return "needs iproute2 (apt-get install iproute2)"
    if not RAY_CLI.exists():
        return "needs the `ray` CLI"
    return None


@dataclass
class WorkerNode:
    index: int
    netns: str
    address: str
    temp_dir: str
    resources: dict
    docker_sock: Optional[str] = None
    docker_root: Optional[str] = None
    dockerd: Optional[subprocess.Popen] = None
    node_id: Optional[str] = None
    extra_env: dict = field(default_factory=dict)

    @property
    def docker_host(self) -> Optional[str]:
        return f"unix://{self.docker_sock}" if self.docker_sock else None


class NetnsCluster:
    """A head on the host side of a bridge and worker nodes in namespaces (see the module docstring)."""

    def __init__(self, tag: str = "crn", subnet: str = "10.213.0", head_cpus: int = 2) -> None:
        self.tag = tag[:6]
        self.subnet = subnet
        self.bridge = f"{self.tag}br"
        self.head = RayHead(num_cpus=head_cpus, host=f"{subnet}.1")
        self.workers: list[WorkerNode] = []

    # -- network -------------------------------------------------------------------

    def _clear_leftovers(self) -> None:
        """Remove what a run of this tag left when it was killed before its cleanup (bridge, namespaces)."""
        if _ip("link", "show", self.bridge, check=False).returncode == 0:
            _ip("link", "del", self.bridge, check=False)
        self._drop_forward_rule()
        names = _ip("netns", "list", check=False).stdout.split()
        for name in names:
            if name.startswith(f"{self.tag}n") and name[len(self.tag) + 1:].isdigit():
                for pid in _ip("netns", "pids", name, check=False).stdout.split():
                    try:
                        psutil.Process(int(pid)).kill()
                    except (psutil.NoSuchProcess, ValueError):
                        pass
                _ip("netns", "del", name, check=False)

    def _forward_rule(self, op: str) -> subprocess.CompletedProcess:
        """``iptables -I/-C/-D FORWARD``: traffic between two worker namespaces crosses the bridge, and
        with a Docker engine on the machine bridged frames go through iptables (br_netfilter) where
        the FORWARD policy is DROP. One rule lets this bridge's own traffic through, nothing else."""
        return subprocess.run(["iptables", op, "FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"],
                              capture_output=True, text=True)

    def _bridge(self) -> None:
        self._clear_leftovers()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        if shutil.which("iptables") and self._forward_rule("-C").returncode != 0:
            r = self._forward_rule("-I")
            if r.returncode != 0:
                raise RuntimeError(f"cannot let traffic through the bridge {self.bridge}: {r.stderr.strip()}")

    def _netns(self, i: int) -> tuple[str, str]:
        ns, host_end, ns_end = f"{self.tag}n{i}", f"{self.tag}h{i}", f"{self.tag}v{i}"
        address = f"{self.subnet}.{i + 1}"
        _ip("netns", "add", ns)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        _ip("link", "set", ns_end, "netns", ns)
        _ip("link", "set", host_end, "master", self.bridge)
        _ip("link", "set", host_end, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{address}/24", "dev", ns_end)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_end, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        return ns, address

    # -- nodes -----------------------------------------------------------------------

    def start(self) -> "NetnsCluster":
        self._bridge()
        self.head.start()
        return self

    def add_worker(self, resources: Optional[dict] = None, num_cpus: int = 1, docker: bool = False,
                   image: Optional[str] = None, env: Optional[dict] = None) -> WorkerNode:
        i = len(self.workers) + 1
        ns, address = self._netns(i)
        node = WorkerNode(i, ns, address, tempfile.mkdtemp(prefix=f"{self.tag}w{i}-", dir="/tmp"),
                          dict(resources or {}), extra_env=dict(env or {}))
        self.workers.append(node)
        if docker:
            self._dockerd(node, image)
        wenv = ray_env({**node.extra_env, **({"DOCKER_HOST": node.docker_host} if node.docker_host else {})})
        cmd = ["ip", "netns", "exec", ns, str(RAY_CLI), "start", f"--address={self.head.address}",
               f"--node-ip-address={address}", f"--num-cpus={num_cpus}", f"--temp-dir={node.temp_dir}",
               f"--resources={json.dumps(node.resources)}", "--disable-usage-stats",
               "--object-store-memory=100000000", "--min-worker-port=0", "--max-worker-port=0"]
        r = subprocess.run(cmd, env=wenv, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"ray start in {ns} failed: {r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        return node

    def _dockerd(self, node: WorkerNode, image: Optional[str]) -> None:
        """A Docker engine of the node's own, in its namespace; ``image`` copied into it."""
        root = tempfile.mkdtemp(prefix=f"{self.tag}d{node.index}-", dir="/var/lib")
        node.docker_root = root
        node.docker_sock = f"/run/{self.tag}d{node.index}.sock"
        log = open(os.path.join(node.temp_dir, "dockerd.log"), "wb")
        # nsenter, not `ip netns exec`: the latter mounts a fresh /sys, and dockerd then finds no cgroups.
        node.dockerd = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{node.netns}", "dockerd", "--data-root", f"{root}/data",
             "--exec-root", f"/run/{self.tag}d{node.index}", "-H", f"unix://{node.docker_sock}",
             "--pidfile", f"/run/{self.tag}d{node.index}.pid", "--bip", f"10.{215 + node.index}.0.1/24"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if subprocess.run(["docker", "-H", node.docker_host, "info"], capture_output=True).returncode == 0:
                break
            if node.dockerd.poll() is not None:
                raise RuntimeError(f"dockerd in {node.netns} exited; see {log.name}")
            time.sleep(0.3)
        else:
            raise RuntimeError(f"dockerd in {node.netns} did not answer within 60 s")
        if image:
            save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
            load = subprocess.run(["docker", "-H", node.docker_host, "load"], stdin=save.stdout,
                                  capture_output=True, text=True, timeout=600)
            save.wait(60)
            if load.returncode != 0:
                raise RuntimeError(f"loading {image} into the engine of {node.netns} failed: {load.stderr[-1000:]}")

    def node_pids(self, node: WorkerNode) -> list[int]:
        """Every process in the node's namespace (its raylet, workers, boxes, engine, containers)."""
        r = _ip("netns", "pids", node.netns, check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_node(self, node: WorkerNode) -> int:
        """The node dies: every process in its namespace is killed (SIGKILL), its engine too."""
        procs = {}
        for pid in self.node_pids(node) + [p.pid for p in processes_naming(node.temp_dir).values()]:
            try:
                procs[pid] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                pass
        for p in procs.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(procs.values()), timeout=10)
        return len(procs)

    def stop(self) -> None:
        """End every process of the cluster by pid and remove namespaces, links, engines' roots."""
        for node in self.workers:
            self.kill_node(node)
            stop_processes(processes_naming(node.temp_dir), timeout=5)
            if node.dockerd is not None and node.dockerd.poll() is None:
                node.dockerd.kill()
                node.dockerd.wait(10)
            if node.docker_root:
                subprocess.run(["umount", "-R", f"/run/{self.tag}d{node.index}"], capture_output=True)
                shutil.rmtree(f"/run/{self.tag}d{node.index}", ignore_errors=True)
                shutil.rmtree(node.docker_root, ignore_errors=True)
                for f in (node.docker_sock, f"/run/{self.tag}d{node.index}.pid"):
                    try:
                        os.unlink(f)
                    except OSError:
                        pass
            _ip("link", "del", f"{self.tag}h{node.index}", check=False)
            _ip("netns", "del", node.netns, check=False)
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self.head.stop()
        _ip("link", "del", self.bridge, check=False)
        self._drop_forward_rule()

    def _drop_forward_rule(self) -> None:
        if shutil.which("iptables"):
            for _ in range(10):
                if self._forward_rule("-D").returncode != 0:
                    break
