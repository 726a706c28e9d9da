"""The Docker driver: each sandbox is a container of the box image, on docker-py.

What it owns: nothing but the engine's view of corral's containers (every one
carries the label ``corral.managed=true``; :meth:`DockerDriver.list` never
reports any other container, so a reconciler that removes "what it does not
know" cannot touch a user's unrelated containers). It keeps no records.

Every docker-py call is blocking, so each runs in a thread of the driver's own
pool (:data:`ENGINE_THREADS` threads and as many engine connections: asyncio's
default pool has cpu_count + 4 threads, for which starts in flight and removals
would queue) and the caller's event loop never waits on the engine. Docker's errors become
corral's in one place, :func:`_mapped`.

How a container is made (:meth:`DockerDriver.create`):

- the box port 8000 is published on ``config.host_ip`` (127.0.0.1) with a port
  the engine picks; the handle's url is ``http://127.0.0.1:<port>``;
- ``spec.workspace`` is bind-mounted read-write at ``/workspace``, and the
  driver chowns it (recursively) to the numeric ``config.user`` so the
  non-root box can write there. That needs the driver to run as root, as it
  does next to a rootful engine; otherwise the directory is left as it is and
  must already be writable by that uid. Without ``spec.workspace`` (and with
  a read-only root) ``/workspace`` is a tmpfs owned by that user, gone with
  the container. ``spec.readonly_mounts`` are bound read-only and must exist
  on the host;
- security: ``cap_drop=["ALL"]`` and ``no-new-privileges`` (config
  ``drop_capabilities``), the non-root ``config.user``, a read-only root
  filesystem with a tmpfs on ``/tmp`` (mode 1777, ``config.tmpfs_size``; the
  image points HOME and Jupyter's directories there);
- limits: ``cpus`` -> NanoCpus, ``memory`` -> Memory, ``pids_limit``;
- CPU weight: ``config.cpu_shares`` (16 by default, Docker's is 1024). A
  container is one scheduling entity as heavy as a whole process group at
  nice 0: 32 busy sandboxes at Docker's default would leave corral's actors a
  thirty-third of the CPU on a saturated node. The weight only counts under
  contention: an otherwise idle CPU still goes to the sandboxes;
- the token: never in the container's environment (PID 1 keeps a copy there
  that the sandbox's code could read). The container is made with stdin open
  for one attach; the driver attaches, starts it and writes the token as one
  line; the box reads it (``CORRAL_TOKEN_FILE=-``) and the engine closes that
  stdin when the driver detaches. A caller's ``SECRET_TOKEN`` or
  ``CORRAL_TOKEN_FILE`` in ``spec.environment`` is dropped;
- ready when its box says so: the driver attaches to the container's output
  as well as its stdin before starting it, and the box, started with
  ``CORRAL_READY_FILE=-``, prints one ready line once it listens (and only
  once a Python kernel can run in it). The driver reads that line (a box
  that exits instead ends the stream at once), then checks ``GET
  /v1/healthz`` with the token once. Polling the health route every 20 ms
  through the engine's port proxy would cost CPU on every start, the more
  the slower the node; the route is polled only every 0.5 s next to the
  line, for images whose box prints none. Up to ``spec.ready_timeout``. On
  any failure (or cancellation) the container is removed and
  :class:`corral.DriverError` carries its last log lines.

Network (docs/security.md): every sandbox joins ``config.network_name``, a
bridge network the driver creates on first use (``config.subnet``,
inter-container traffic off) and :meth:`DockerDriver.teardown_network`
removes. With ``config.firewall`` the driver also keeps the iptables rules of
:mod:`~corral.drivers.netpolicy` on this node: no sandbox reaches its host or
another sandbox, and each gets its ``spec.network`` mode (``none``,
``egress``, ``allowlist``) from the moment it starts, before its box is
handed out. The published port stays reachable from 127.0.0.1 in every mode.
The mode and allow list are kept in the container's labels, so a restart
applies them again.

A restarted container may get a new host port and a new address (the engine
picks both again on every start): after :meth:`DockerDriver.start`, take the
url from :meth:`DockerDriver.inspect`. A stopped container's box needs its
token again: ``start(container_id, token)``.

``stop`` and ``remove`` are idempotent; ``inspect`` of an unknown container is
None and its ``status`` is ``"missing"``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator, Optional, TypeVar

import httpx

from corral.box.auth import check_token
from corral.client._http import tls_context
from corral.errors import Conflict, CorralError, DriverError, InvalidRequest, NotFound
from corral.models import LABEL_MANAGED

from .base import BOX_PORT, ContainerHandle, ContainerSpec, Driver
from .config import DockerDriverConfig
from .netpolicy import Firewall, NodeLock, host_resolvers, ipv4_networks, split_allow

__all__ = ["DockerDriver", "map_status", "LABEL_NETWORK", "LABEL_ALLOW"]

logger = logging.getLogger(__name__)

#: The sandbox's network mode and allow list, so a restart (or a new driver) applies them again.
LABEL_NETWORK = "corral.network"
LABEL_ALLOW = "corral.allow"
#: Environment names the box reads its token by: a caller's spec may not set them.
_TOKEN_ENV = ("SECRET_TOKEN", "CORRAL_TOKEN_FILE")

T = TypeVar("T")

_PORT_KEY = f"{BOX_PORT}/tcp"
#: Threads for blocking engine calls: more than the starts and removals a node runs at once.
ENGINE_THREADS = 32
_READY_POLL = 0.02
#: How often the health route is polled while the driver waits for the box's ready line, and
#: after how long that starts (a fallback for a box that prints no line; a box that does is
#: ready sooner, and is checked once when its line comes).
_READY_POLL_SLOW = 0.5
_READY_POLL_SLOW_AFTER = 2.0
#: The start of the line the box prints on stdout once it listens (corral.box.__main__.READY_MARK).
_READY_MARK = b"corral-box-ready"
#: Output kept from a box that ends before its ready line (for the error).
_OUTPUT_KEPT = 4096
#: How often, while waiting for the box, the driver asks the engine whether
#: the container is still running (a crashed box fails fast, not at timeout).
_ALIVE_CHECK = 0.5
#: start() waits this long for a restarted box (the protocol passes no timeout).
_START_READY_TIMEOUT = 60.0
_LOG_LINES = 30

# Docker's states -> the reference's. A container being removed or "dead"
# (a failed removal) can never run again, so it counts as gone.
_STATUS = {
    "created": "created",
    "running": "running",
    "restarting": "running",
    "paused": "paused",
    "exited": "exited",
    "removing": "missing",
    "dead": "missing",
}


def map_status(docker_state: Optional[str]) -> str:
    """The driver status for a Docker ``State.Status``; anything unknown is ``"missing"``."""
    return _STATUS.get((docker_state or "").lower(), "missing")


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn docker-py's exceptions into corral's: the one place this happens."""
    import docker.errors as de
    import requests.exceptions as rqe

    try:
        yield
    except CorralError:
        raise
    except de.ImageNotFound as e:
        raise DriverError(
            f"{what}: image not found ({e.explanation or e}); build it with scripts/build-image.sh"
        ) from None
    except de.NotFound as e:
        raise NotFound(f"{what}: {e.explanation or e}") from None
    except de.APIError as e:
        if e.status_code == 409:
            raise Conflict(f"{what}: {e.explanation or e}") from None
        if e.status_code == 400:
            raise InvalidRequest(f"{what}: {e.explanation or e}") from None
        raise DriverError(f"{what}: Docker engine error {e.status_code}: {e.explanation or e}") from None
    except (de.DockerException, rqe.RequestException) as e:
        raise DriverError(f"{what}: Docker engine unreachable or failing: {e}") from None


def _parse_user(user: Optional[str]) -> Optional[tuple[int, int]]:
    """(uid, gid) for a numeric ``uid[:gid]`` user, else None (names are not resolvable on the host)."""
    if not user:
        return None
    uid, _, gid = user.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        return None
    return int(uid), int(gid or uid)


def _chown_tree(root: str, uid: int, gid: int) -> None:
    """Give ``root`` and everything below it to uid:gid, touching only what differs."""
    def fix(path: str) -> None:
        st = os.lstat(path)
        if st.st_uid != uid or st.st_gid != gid:
            os.lchown(path, uid, gid)

    fix(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            fix(os.path.join(dirpath, n))


class DockerDriver(Driver):
    """Starts, stops and lists box containers on one Docker engine.

    Owns one docker-py client (made on first use, in a thread: connecting asks
    the engine for its API version). Safe to share between tasks of one loop.
    """

    name = "docker"

    def __init__(self, config: Optional[DockerDriverConfig] = None, *, client: Any = None) -> None:
        self.config = config or DockerDriverConfig()
        self._client = client
        self._client_lock = asyncio.Lock()
        cfg = self.config
        self._node_lock = NodeLock(cfg.network_name)
        self._firewall: Optional[Firewall] = None
        if cfg.firewall:
            dns = host_resolvers() if cfg.dns_servers is None else cfg.dns_servers
            self._firewall = Firewall(cfg.network_name, cfg.subnet, cfg.blocked_cidrs, dns, self._node_lock)
        self._network_ready = False
        self._network_lock = asyncio.Lock()
        self._threads: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # -- plumbing ------------------------------------------------------------

    def _make_client(self) -> Any:
        import docker

        with _mapped("connecting to the Docker engine"):
            if self.config.base_url:
                return docker.DockerClient(base_url=self.config.base_url, max_pool_size=ENGINE_THREADS)
            return docker.from_env(max_pool_size=ENGINE_THREADS)

    async def _api(self) -> Any:
        """The low-level docker-py client (one HTTP call per method, no hidden reloads)."""
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await asyncio.to_thread(self._make_client)
        return self._client.api

    def _in_thread(self, fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(ENGINE_THREADS, thread_name_prefix="corral-docker")
        return asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def run() -> T:
            with _mapped(what):
                return fn(*args, **kwargs)

        return await self._in_thread(run)

    def _url_host(self, host_ip: Optional[str] = None) -> str:
        # A box published on every interface is still reached through loopback.
        host = host_ip or self.config.host_ip
        return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host

    def _handle_from_inspect(self, info: dict) -> ContainerHandle:
        port = host_ip = None
        bindings = ((info.get("NetworkSettings") or {}).get("Ports") or {}).get(_PORT_KEY) or []
        for b in bindings:
            if b.get("HostPort"):
                port, host_ip = int(b["HostPort"]), b.get("HostIp")
                break
        cfg = info.get("Config") or {}
        return ContainerHandle(
            container_id=info["Id"],
            name=(info.get("Name") or "").lstrip("/"),
            url=f"http://{self._url_host(host_ip)}:{port}" if port else None,
            ports=[port] if port else [],
            status=map_status((info.get("State") or {}).get("Status")),
            labels=cfg.get("Labels") or {},
            image=cfg.get("Image"),
        )

    def _handle_from_list(self, row: dict) -> ContainerHandle:
        port = host_ip = None
        for p in row.get("Ports") or []:
            if p.get("PrivatePort") == BOX_PORT and p.get("PublicPort"):
                port, host_ip = int(p["PublicPort"]), p.get("IP")
                break
        names = row.get("Names") or [""]
        return ContainerHandle(
            container_id=row["Id"],
            name=names[0].lstrip("/"),
            url=f"http://{self._url_host(host_ip)}:{port}" if port else None,
            ports=[port] if port else [],
            status=map_status(row.get("State")),
            labels=row.get("Labels") or {},
            image=row.get("Image"),
        )

    async def _logs(self, container_id: str) -> str:
        try:
            api = await self._api()
            raw = await self._call("reading logs", api.logs, container_id, tail=_LOG_LINES)
            text = raw.decode("utf-8", "replace").strip()
            return text or "(no output)"
        except CorralError as e:
            return f"(logs unavailable: {e})"

    # -- container settings --------------------------------------------------

    def _check_spec(self, spec: ContainerSpec) -> None:
        check_token(spec.token, "token")
        if not spec.name:
            raise InvalidRequest("name is empty")
        if self._firewall is None and spec.network != "egress":
            raise InvalidRequest(
                f"network {spec.network!r} needs corral's firewall, and this docker driver runs without it "
                "(DockerDriverConfig.firewall=False): it would not be enforced"
            )
        for host, target in spec.readonly_mounts.items():
            if not os.path.isabs(target):
                raise InvalidRequest(f"readonly_mounts: container path {target!r} must be absolute")
            if not os.path.exists(host):
                raise InvalidRequest(f"readonly_mounts: host path {host!r} does not exist")
        if spec.cpus is not None and spec.cpus <= 0:
            raise InvalidRequest(f"cpus must be > 0, got {spec.cpus}")
        if spec.pids_limit is not None and spec.pids_limit <= 0:
            raise InvalidRequest(f"pids_limit must be > 0, got {spec.pids_limit}")

    def _prepare_workspace(self, workspace: str) -> None:
        os.makedirs(workspace, exist_ok=True)
        owner = _parse_user(self.config.user)
        if owner is not None and os.geteuid() == 0:
            _chown_tree(workspace, *owner)

    def _run_kwargs(self, spec: ContainerSpec) -> dict:
        cfg = self.config
        volumes: dict[str, dict] = {}
        if spec.workspace:
            volumes[os.path.abspath(spec.workspace)] = {"bind": "/workspace", "mode": "rw"}
        for host, target in spec.readonly_mounts.items():
            volumes[os.path.abspath(host)] = {"bind": target, "mode": "ro"}
        labels = {**spec.labels, LABEL_MANAGED: "true", LABEL_NETWORK: spec.network}
        if spec.network == "allowlist":
            labels[LABEL_ALLOW] = json.dumps(spec.allow)
        env = {k: v for k, v in spec.environment.items() if k not in _TOKEN_ENV}
        # The token comes on stdin ("-"), written by the driver at start: not in any environment.
        # CORRAL_BOX_CONTAINER: the box owns this PID namespace and /tmp, so its reset may clear both.
        # CORRAL_READY_FILE=-: the box prints its ready line on stdout, which the driver reads.
        env.update(CORRAL_TOKEN_FILE="-", CORRAL_BOX_CONTAINER="1", CORRAL_READY_FILE="-")
        host_config: dict[str, Any] = dict(
            port_bindings={BOX_PORT: (spec.host or cfg.host_ip, None)},
            binds=volumes,
            network_mode=cfg.network_name,
            # The network is IPv4 only; no IPv6 either on the link to the host.
            sysctls={"net.ipv6.conf.all.disable_ipv6": "1"},
            nano_cpus=int(spec.cpus * 1e9) if spec.cpus else None,
            mem_limit=spec.memory,
            pids_limit=spec.pids_limit,
            cpu_shares=cfg.cpu_shares,
            read_only=cfg.read_only_root,
        )
        if cfg.read_only_root:
            tmpfs = {"/tmp": f"rw,exec,nosuid,nodev,size={cfg.tmpfs_size},mode=1777"}
            if not spec.workspace:
                # The image's /workspace is on the read-only root: a sandbox
                # without a host workspace gets a scratch one in memory.
                owner = _parse_user(cfg.user)
                mode = f"uid={owner[0]},gid={owner[1]},mode=0755" if owner else "mode=1777"
                tmpfs["/workspace"] = f"rw,exec,nosuid,nodev,size={cfg.tmpfs_size},{mode}"
            host_config["tmpfs"] = tmpfs
        if cfg.drop_capabilities:
            host_config["cap_drop"] = ["ALL"]
            host_config["security_opt"] = ["no-new-privileges"]
        return dict(
            image=spec.image,
            name=spec.name,
            labels=labels,
            environment=env,
            user=cfg.user,
            ports=[BOX_PORT],
            # stdin open, closed by the engine after the first attach ends (docker-py sets
            # StdinOnce for a container that is not detached): the token's one way in.
            stdin_open=True,
            detach=False,
            host_config=host_config,
        )

    # -- the network ---------------------------------------------------------

    def _engine_is_local(self) -> bool:
        url = self.config.base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        if url.startswith(("unix://", "npipe://", "/")):
            return True
        host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        return host in ("127.0.0.1", "localhost", "::1")

    def _check_network(self, info: dict) -> None:
        cfg = self.config
        options = info.get("Options") or {}
        subnets = [c.get("Subnet") for c in ((info.get("IPAM") or {}).get("Config") or [])]
        wrong = []
        if info.get("Driver") != "bridge":
            wrong.append(f"driver {info.get('Driver')!r} (want 'bridge')")
        if options.get("com.docker.network.bridge.enable_icc") != "false":
            wrong.append("inter-container traffic on (want com.docker.network.bridge.enable_icc=false)")
        if options.get("com.docker.network.bridge.name") != cfg.network_name:
            wrong.append(f"bridge {options.get('com.docker.network.bridge.name')!r} (want {cfg.network_name!r})")
        if subnets != [cfg.subnet]:
            wrong.append(f"subnets {subnets} (want [{cfg.subnet!r}])")
        if wrong:
            raise DriverError(
                f"Docker network {cfg.network_name!r} exists with other settings: {'; '.join(wrong)}. "
                f"Remove it (docker network rm {cfg.network_name}) or name another in DockerDriverConfig.network_name"
            )

    async def _network_info(self, api: Any) -> Optional[dict]:
        try:
            return await self._call(f"inspecting network {self.config.network_name}", api.inspect_network,
                                    self.config.network_name)
        except NotFound:
            return None

    async def ensure_network(self) -> None:
        """Create corral's network and install its firewall on this node; once per driver, idempotent.

        Every create and start calls it; call it yourself to set the node up ahead of time.
        """
        if self._network_ready:
            return
        async with self._network_lock:
            if self._network_ready:
                return
            cfg = self.config
            if self._firewall is not None and not self._engine_is_local():
                raise DriverError(
                    "corral's firewall runs on this node, but the Docker engine is remote "
                    f"({cfg.base_url or os.environ.get('DOCKER_HOST')}): run the driver on the engine's node, "
                    "or set DockerDriverConfig.firewall=False (then sandboxes are not walled off from the host)"
                )
            api = await self._api()
            async with self._node_lock():
                info = await self._network_info(api)
                if info is None:
                    await self._create_network(api)
                    info = await self._network_info(api)
                    if info is None:
                        raise DriverError(f"Docker network {cfg.network_name!r} vanished right after its creation")
                self._check_network(info)
                if self._firewall is not None:
                    await self._firewall.ensure()
            self._network_ready = True

    async def _create_network(self, api: Any) -> None:
        import docker.types

        cfg = self.config
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=cfg.subnet)])
        try:
            await self._call(
                f"creating network {cfg.network_name}", api.create_network, cfg.network_name,
                driver="bridge", ipam=ipam, check_duplicate=True, enable_ipv6=False,
                labels={LABEL_MANAGED: "true"},
                options={
                    "com.docker.network.bridge.name": cfg.network_name,
                    "com.docker.network.bridge.enable_icc": "false",
                    "com.docker.network.bridge.enable_ip_masquerade": "true",
                },
            )
        except Conflict:
            pass  # made meanwhile by a process that did not take the node's lock: checked by the caller

    async def teardown_network(self) -> None:
        """Remove corral's network and its iptables rules from this node (idempotent).

        Refused (:class:`corral.Conflict`) while any container, running or not,
        is still attached: its walls would go with the rules.
        """
        cfg = self.config
        api = await self._api()
        async with self._network_lock:
            async with self._node_lock():
                info = await self._network_info(api)
                if info is not None:
                    rows = await self._call("listing containers", api.containers, all=True,
                                            filters={"network": cfg.network_name})
                    if rows:
                        names = sorted((r.get("Names") or ["?"])[0].lstrip("/") for r in rows)
                        raise Conflict(
                            f"network {cfg.network_name} still has {len(rows)} container(s) ({', '.join(names[:5])}); "
                            "remove them before tearing the network down"
                        )
                    with contextlib.suppress(NotFound):
                        await self._call(f"removing network {cfg.network_name}", api.remove_network, info["Id"])
                if self._firewall is not None:
                    await self._firewall.teardown()
            self._network_ready = False

    async def _allowed(self, allow: list[str]) -> list[ipaddress.IPv4Network]:
        """An allow list as networks: host names resolved now; refused when in a blocked range."""
        nets, hosts = split_allow(allow)
        loop = asyncio.get_running_loop()
        for host in hosts:
            try:
                infos = await loop.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                raise DriverError(f"allow: cannot resolve {host!r}: {e.strerror or e}") from None
            nets.extend(ipaddress.ip_network(f"{i[4][0]}/32") for i in infos)
        walls = ipv4_networks([*self.config.blocked_cidrs, self.config.subnet], "blocked_cidrs")
        for net in nets:
            for wall in walls:
                if net.overlaps(wall):
                    raise InvalidRequest(
                        f"allow: {net} lies in {wall}, which no sandbox may reach (DockerDriverConfig.blocked_cidrs "
                        "or corral's own subnet); take it out of blocked_cidrs to allow it"
                    )
        return sorted(set(nets))

    async def _admit(self, container_id: str, info: dict, mode: str, allowed: list) -> None:
        """Give a started container its network mode's rule before its box is handed out."""
        if self._firewall is None:
            return
        net = ((info.get("NetworkSettings") or {}).get("Networks") or {}).get(self.config.network_name) or {}
        ip = net.get("IPAddress")
        if not ip:
            raise DriverError(f"container {info.get('Name', container_id)} has no address on network "
                              f"{self.config.network_name}")
        try:
            await self._firewall.admit(container_id, ip, mode, allowed)
        except DriverError:
            # The shared chains may be gone (a reload of the node's firewall flushes them):
            # put them back once and try again.
            self._network_ready = False
            await self.ensure_network()
            await self._firewall.admit(container_id, ip, mode, allowed)

    async def reconcile_network(self) -> int:
        """Put the network's rules back as they should be; returns how many sandboxes got their rule back.

        For a periodic check: reloading the node's firewall (firewalld, ufw,
        a restore of the host's own rules) removes corral's chains and hooks,
        and until they are back the sandboxes on this node are not walled off.
        This rewrites the shared chains and hooks and re-admits every running
        sandbox on the network whose rule is missing, from its labels.
        """
        self._network_ready = False
        await self.ensure_network()
        if self._firewall is None:
            return 0
        api = await self._api()
        rows = await self._call("listing containers", api.containers,
                                filters={"network": self.config.network_name, "label": f"{LABEL_MANAGED}=true"})
        have = await self._firewall.admitted()
        fixed = 0
        for row in rows:
            labels = row.get("Labels") or {}
            mode = labels.get(LABEL_NETWORK, "none")
            net = ((row.get("NetworkSettings") or {}).get("Networks") or {}).get(self.config.network_name) or {}
            ip = net.get("IPAddress")
            if mode == "none" or not ip or have.get(row["Id"][:12]) == ip:
                continue
            try:
                allowed = await self._allowed(json.loads(labels.get(LABEL_ALLOW) or "[]")) if mode == "allowlist" else []
            except CorralError as e:
                # A host name that no longer resolves (or now lands in a blocked range): no rule,
                # so the sandbox sends nothing, which is the safe side.
                logger.warning("sandbox %s keeps no network rule: %s", row["Id"][:12], e)
                continue
            await self._firewall.admit(row["Id"], ip, mode, allowed)
            fixed += 1
        return fixed

    @staticmethod
    def _start_with_token(api: Any, container_id: str, token: str) -> None:
        """Start the container and write the token to its stdin, the box's only way to get it.

        Blocking (docker-py): runs in a thread. Attached before the start, as
        ``docker start -ai`` does; the engine closes the container's stdin when
        this attach ends, so nothing else can write to the box's stdin.
        """
        sock = api.attach_socket(container_id, params={"stdin": 1, "stream": 1})
        raw = getattr(sock, "_sock", sock)
        try:
            api.start(container_id)
            raw.sendall(token.encode("ascii") + b"\n")
            if type(raw) is socket.socket:
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_WR)
        finally:
            sock.close()

    @staticmethod
    def _start_attached(api: Any, container_id: str, token: str) -> Optional[socket.socket]:
        """Start the container attached to its stdin and output, and write the token to its stdin.

        Blocking (docker-py): runs in a thread. Returns the attached socket, from
        which :meth:`_read_ready_line` reads the box's output; None when the
        engine's connection is no plain socket (TLS, SSH: the caller polls
        instead). The stdin half is shut at once: the engine closes the
        container's stdin.
        """
        sock = api.attach_socket(container_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        raw = getattr(sock, "_sock", sock)
        plain = type(raw) is socket.socket
        try:
            api.start(container_id)
            raw.sendall(token.encode("ascii") + b"\n")
            if plain:
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_WR)
        except BaseException:
            sock.close()
            raise
        if not plain:
            sock.close()
            return None
        return raw

    @staticmethod
    async def _read_ready_line(raw: socket.socket, timeout: float) -> tuple[bool, str]:
        """Read the container's multiplexed output until the box's ready line (on the event loop:
        no thread waits out a boot). Returns (True, "") on the line, or (False, what the box
        printed) when its output ends first (the box exited) or ``timeout`` passes. Closes the
        socket either way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        buf = line = b""
        seen = bytearray()
        try:
            raw.setblocking(False)
            while True:
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(raw, 65536), max(0.0, deadline - loop.time()))
                except (asyncio.TimeoutError, OSError):
                    chunk = b""
                if not chunk:
                    return False, seen.decode("utf-8", "replace")
                buf += chunk
                # frames: 1 byte stream (1 stdout, 2 stderr), 3 zero bytes, 4 bytes big-endian length, payload
                while len(buf) >= 8:
                    size = int.from_bytes(buf[4:8], "big")
                    if len(buf) < 8 + size:
                        break
                    stream, payload, buf = buf[0], buf[8:8 + size], buf[8 + size:]
                    seen.extend(payload)
                    del seen[:-_OUTPUT_KEPT]
                    if stream != 1:
                        continue
                    line += payload
                    while b"\n" in line:
                        first, line = line.split(b"\n", 1)
                        if first.startswith(_READY_MARK):
                            return True, ""
        finally:
            raw.close()

    # -- create --------------------------------------------------------------

    async def create(self, spec: ContainerSpec) -> ContainerHandle:
        self._check_spec(spec)
        allowed = await self._allowed(spec.allow) if spec.network == "allowlist" else []
        await self.ensure_network()
        api = await self._api()
        if spec.workspace:
            with _mapped("preparing the workspace"):
                try:
                    await self._in_thread(self._prepare_workspace, os.path.abspath(spec.workspace))
                except OSError as e:
                    raise DriverError(f"cannot prepare workspace {spec.workspace!r}: {e}") from None
        kw = self._run_kwargs(spec)
        host_config = kw.pop("host_config")

        def make() -> str:
            import docker.errors

            try:
                hc = api.create_host_config(**{k: v for k, v in host_config.items() if v is not None})
            except (docker.errors.DockerException, ValueError, TypeError) as e:
                # docker-py checks values such as memory="lots" before any call.
                raise InvalidRequest(f"container {spec.name}: invalid settings: {e}") from None
            with _mapped(f"creating container {spec.name}"):
                return api.create_container(host_config=hc, **kw)["Id"]

        making = asyncio.ensure_future(self._in_thread(make))
        try:
            container_id = await asyncio.shield(making)
        except asyncio.CancelledError:
            # The engine goes on creating it in the thread: wait for that, then remove it.
            await asyncio.shield(self._discard(making))
            raise
        reading: Optional[asyncio.Future] = None
        try:
            raw = await self._call(f"starting container {spec.name}", self._start_attached, api, container_id,
                                   spec.token)
            if raw is not None:  # the box boots meanwhile: its ready line is read in a thread of its own
                reading = asyncio.ensure_future(self._read_ready_line(raw, spec.ready_timeout))
            info = await self._call(f"inspecting container {spec.name}", api.inspect_container, container_id)
            handle = self._handle_from_inspect(info)
            if handle.url is None:
                # a box that dies at once leaves no port mapping behind: say how it ended
                st = info.get("State") or {}
                raise DriverError(
                    f"container {spec.name} has no port published for {_PORT_KEY} "
                    f"(status {st.get('Status')}, exit code {st.get('ExitCode')})"
                )
            await self._admit(container_id, info, spec.network, allowed)
            if reading is None:
                await self._wait_ready(container_id, spec.name, handle.url, spec.token, spec.ready_timeout)
            else:
                await self._wait_ready_line(reading, container_id, spec.name, handle.url, spec.token,
                                            spec.ready_timeout)
        except BaseException as e:
            if reading is not None and not reading.done():
                reading.cancel()  # its socket closes
            cancelled = not isinstance(e, Exception)
            logs = "" if cancelled else await asyncio.shield(self._logs(container_id))
            # Shielded: a cancelled create must still leave nothing behind.
            await asyncio.shield(self.remove(container_id))
            if cancelled:
                raise
            raise DriverError(
                f"container {spec.name} failed to become ready: {e}\n--- last log lines ---\n{logs}"
            ) from None
        handle.status = "running"
        return handle

    async def _discard(self, making: "asyncio.Future[str]") -> None:
        try:
            container_id = await making
        except Exception:
            return  # it was never made
        await self.remove(container_id)

    async def _wait_ready_line(self, reading: asyncio.Future, container_id: str, name: str, url: str, token: str,
                               timeout: float) -> None:
        """Wait for the box's ready line (read by ``reading``), then check its health route once.
        The route is also polled slowly meanwhile, for a box that prints no line (an older image)."""
        polling = asyncio.ensure_future(self._wait_ready(container_id, name, url, token, timeout, _READY_POLL_SLOW,
                                                         first_after=_READY_POLL_SLOW_AFTER))
        try:
            done, _ = await asyncio.wait([reading, polling], return_when=asyncio.FIRST_COMPLETED)
            if polling in done:
                polling.result()  # ready (or its error)
                return
            ok, output = reading.result()
            if not ok:
                api = await self._api()
                info = await self._call("inspecting container", api.inspect_container, container_id)
                state = info.get("State") or {}
                if state.get("Status") in ("running", "created", "restarting"):
                    raise DriverError(f"box in {name} did not say it was ready within {timeout:g}s")
                tail = output.strip()[-1500:] or "(no output)"
                raise DriverError(f"container {name} {state.get('Status')} (exit code {state.get('ExitCode')}) "
                                  f"before its box was ready; its output:\n{tail}")
        finally:
            for task in (polling, reading):
                if not task.done():
                    task.cancel()
            await asyncio.gather(polling, reading, return_exceptions=True)
        # The line says the box listens: confirm through the published port, with the token.
        await self._wait_ready(container_id, name, url, token, timeout)

    async def _wait_ready(self, container_id: str, name: str, url: str, token: Optional[str], timeout: float,
                          every: float = _READY_POLL, first_after: float = 0.0) -> None:
        """Poll the health route every ``every`` s (the first time after ``first_after`` s) until it
        answers; with no token, any HTTP answer (401) counts."""
        api = await self._api()
        deadline = time.monotonic() + timeout
        if first_after > 0:
            await asyncio.sleep(min(first_after, timeout))
        next_alive_check = time.monotonic() + _ALIVE_CHECK
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # trust_env=False: a proxy from the environment must never see 127.0.0.1 traffic.
        async with httpx.AsyncClient(timeout=2.0, trust_env=False, verify=tls_context()) as http:
            while True:
                try:
                    r = await http.get(f"{url}/v1/healthz", headers=headers)
                    if r.status_code == 200 or (token is None and r.status_code == 401):
                        return
                    if r.status_code == 401:
                        raise DriverError(f"box in {name} rejected its token (HTTP 401)")
                except httpx.HTTPError:
                    pass  # not listening yet (docker-proxy accepts, then drops the connection)
                now = time.monotonic()
                if now >= deadline:
                    raise DriverError(f"box did not answer {url}/v1/healthz within {timeout:g}s")
                if now >= next_alive_check:
                    next_alive_check = now + _ALIVE_CHECK
                    info = await self._call("inspecting container", api.inspect_container, container_id)
                    state = info.get("State") or {}
                    if state.get("Status") not in ("running", "created", "restarting"):
                        raise DriverError(
                            f"container {name} is {state.get('Status')} (exit code {state.get('ExitCode')})"
                        )
                await asyncio.sleep(every)

    # -- lifecycle -----------------------------------------------------------

    async def start(self, container_id: str, token: Optional[str] = None) -> None:
        api = await self._api()
        try:
            info = await self._call(f"inspecting container {container_id}", api.inspect_container, container_id)
        except NotFound:
            raise DriverError(f"no such container {container_id}") from None
        if (info.get("State") or {}).get("Status") == "running":
            return
        if token is None:
            raise InvalidRequest(
                f"start {container_id}: the docker driver needs the box's token (token=...) to start a stopped "
                "container: its box reads the token once, from stdin, and nothing in the sandbox keeps it"
            )
        check_token(token, "token")
        labels = (info.get("Config") or {}).get("Labels") or {}
        # No label: not made by this driver; no rule is the safe side (nothing leaves it).
        mode = labels.get(LABEL_NETWORK, "none")
        allowed = await self._allowed(json.loads(labels.get(LABEL_ALLOW) or "[]")) if mode == "allowlist" else []
        await self.ensure_network()
        await self._call(f"starting container {container_id}", self._start_with_token, api, container_id, token)
        info = await self._call(f"inspecting container {container_id}", api.inspect_container, container_id)
        handle = self._handle_from_inspect(info)
        if handle.url is None:
            raise DriverError(f"container {container_id} has no port published for {_PORT_KEY}")
        await self._admit(info["Id"], info, mode, allowed)
        await self._wait_ready(container_id, handle.name, handle.url, token, _START_READY_TIMEOUT)

    async def stop(self, container_id: str, timeout: float = 1.0) -> None:
        api = await self._api()
        # The engine takes whole seconds; rounding up never cuts a grace period short.
        secs = max(0, math.ceil(timeout))
        with contextlib.suppress(NotFound):
            await self._call(f"stopping container {container_id}", api.stop, container_id, timeout=secs)

    async def remove(self, container_id: str) -> None:
        api = await self._api()
        info = None
        if self._firewall is not None:
            with contextlib.suppress(NotFound):
                info = await self._call(f"inspecting container {container_id}", api.inspect_container, container_id)
        try:
            await self._call(f"removing container {container_id}", api.remove_container, container_id, force=True)
        except NotFound:
            pass
        except Conflict:
            pass  # "removal already in progress": another caller is removing it
        if info is not None and ((info.get("Config") or {}).get("Labels") or {}).get(LABEL_NETWORK) != "none":
            # After the container is gone, so it never runs without its rule. A rule left behind
            # (a crash in between) is replaced when its address is next handed out.
            await self._firewall.forget(info["Id"])

    async def status(self, container_id: str) -> str:
        api = await self._api()
        try:
            info = await self._call(f"inspecting container {container_id}", api.inspect_container, container_id)
        except NotFound:
            return "missing"
        return map_status((info.get("State") or {}).get("Status"))

    async def inspect(self, container_id: str) -> Optional[ContainerHandle]:
        api = await self._api()
        try:
            info = await self._call(f"inspecting container {container_id}", api.inspect_container, container_id)
        except NotFound:
            return None
        return self._handle_from_inspect(info)

    async def list(self, labels: dict[str, str]) -> list[ContainerHandle]:
        api = await self._api()
        wanted = {**labels, LABEL_MANAGED: "true"}
        rows = await self._call(
            "listing containers", api.containers, all=True,
            filters={"label": [f"{k}={v}" for k, v in wanted.items()]},
        )
        return [self._handle_from_list(r) for r in rows]

    async def events(self, labels: dict[str, str], every: float = 1.0) -> AsyncIterator[str]:
        """Names of corral's containers carrying ``labels`` as the engine reports them dying
        (``die``, ``oom``, ``destroy``): a stopped sandbox is known at once, not at the next probe.
        The engine's stream is read in a thread of its own (it blocks for its whole life)."""
        api = await self._api()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        wanted = {**labels, LABEL_MANAGED: "true"}
        stream = await self._call("watching the engine's events", api.events, decode=True, filters={
            "type": ["container"], "event": ["die", "oom", "destroy"],
            "label": [f"{k}={v}" for k, v in wanted.items()]})

        def pump() -> None:
            try:
                for ev in stream:
                    attrs = (ev.get("Actor") or {}).get("Attributes") or {}
                    loop.call_soon_threadsafe(queue.put_nowait, attrs.get("corral.name") or attrs.get("name"))
            except Exception as e:  # the engine went away: the caller is told and watches again
                loop.call_soon_threadsafe(queue.put_nowait, e)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, DriverError("the engine's event stream ended"))

        threading.Thread(target=pump, name="corral-docker-events", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise DriverError(f"watching the engine's events: {item}")
                if item:
                    yield item
        finally:
            await asyncio.to_thread(stream.close)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)
        threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=False)
