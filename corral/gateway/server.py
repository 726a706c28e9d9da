"""Running the gateway: a standalone uvicorn server, or one Ray actor per node.

- :func:`run_standalone` serves the app under plain uvicorn in the
  foreground, in front of a :class:`corral.SandboxManager` it connects (which
  joins the Ray cluster, or starts a local one, and starts corral's actors if
  none run in the namespace).
- :func:`start_gateways` starts a detached :class:`GatewayActor` on every alive
  Ray node, each pinned to its node (``NodeAffinitySchedulingStrategy(node,
  soft=False)``) and restarted by Ray if it dies (``max_restarts=-1``). The
  actor serves the same app with uvicorn in a thread of its own, on the
  configured host and port, so a client can use any node's gateway. It gets
  the tokens' SHA-256 digests, never the tokens (actor arguments are kept in
  Ray's control store).

Both turn uvicorn's access log off (the gateway logs its own lines, which
never carry a header or a query string) and apply the gateway's connection
limits (:class:`GatewaySettings`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Optional

from corral.errors import DriverError, InvalidRequest, SandboxUnreachable

from .auth import Tenants
from .settings import GatewaySettings

__all__ = [
    "uvicorn_config", "bind", "run_standalone", "GatewayActor", "start_gateways", "stop_gateways",
    "gateway_name", "GATEWAY_PREFIX", "check_tls",
]

logger = logging.getLogger("corral.gateway")

GATEWAY_PREFIX = "corral-gateway-"
#: How long a gateway retries to bind its port (a restarted actor's old socket may linger).
BIND_RETRY_S = 20.0


def gateway_name(node_id: str) -> str:
    return GATEWAY_PREFIX + node_id[:16]


def check_tls(certfile: Optional[str], keyfile: Optional[str]) -> None:
    """Both or neither readable; a key without a certificate is a mistake."""
    if keyfile and not certfile:
        raise InvalidRequest("--keyfile needs --certfile")
    for what, path in (("certfile", certfile), ("keyfile", keyfile)):
        if path and not os.access(path, os.R_OK):
            raise InvalidRequest(f"{what} {path!r} cannot be read")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def uvicorn_config(app: Any, host: str, port: int, settings: GatewaySettings,
                   certfile: Optional[str] = None, keyfile: Optional[str] = None) -> Any:
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port,
        ssl_certfile=certfile, ssl_keyfile=keyfile,
        access_log=False,  # the gateway's own access log never prints a query string or a header
        log_config=None,  # whoever runs the gateway configures logging
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=int(max(1, settings.keep_alive_timeout)),
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )


def bind(config: Any, retry_for: float = 0.0) -> socket.socket:
    """The listening socket of ``config`` (retrying ``retry_for`` seconds while the address is in use)."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            sock = config.bind_socket()
            sock.listen(2048)  # connections wait in the backlog until the server accepts them
            return sock
        except SystemExit:  # uvicorn exits the process when the port is taken; a gateway reports it
            if time.monotonic() >= deadline:
                raise InvalidRequest(f"cannot listen on {config.host}:{config.port} (in use or not allowed)") from None
            time.sleep(0.5)


def _url(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def run_standalone(manager: Any, tenants: Tenants, host: str = "127.0.0.1", port: int = 8765,
                   settings: Optional[GatewaySettings] = None, certfile: Optional[str] = None,
                   keyfile: Optional[str] = None, ready_file: Optional[str] = None) -> None:
    """Serve the gateway in front of ``manager`` until interrupted (the sandboxes stay)."""
    import uvicorn

    from .app import create_app

    settings = settings or GatewaySettings()
    check_tls(certfile, keyfile)
    app = create_app(manager, tenants, settings)
    config = uvicorn_config(app, host, port, settings, certfile, keyfile)
    sock = bind(config)
    real_port = sock.getsockname()[1]
    url = _url(host, real_port, bool(certfile))
    if not certfile and not _loopback(host):
        logger.warning("gateway: plain HTTP on %s: tokens cross the network in clear; use --certfile/--keyfile "
                       "or a TLS-terminating proxy", host)
    logger.info("corral gateway on %s (namespace %s, tenants %s)", url, manager.config.namespace,
                   ", ".join(tenants.names))
    if ready_file:
        tmp = ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"url": url, "port": real_port, "pid": os.getpid()}, f)
        os.replace(tmp, ready_file)
    uvicorn.Server(config).run(sockets=[sock])


class GatewayActor:
    """One node's gateway: the app under uvicorn in a thread of this actor's process.

    What it owns: the server thread and its :class:`corral.SandboxManager`
    (which finds corral's actors by name). ``__init__`` starts serving, so a
    restart by Ray serves again with no call from anyone. If the server stops
    after it has started, the process exits and Ray starts it again.
    """

    def __init__(self, config: dict, digests: list, host: str, port: int, settings: dict,
                 certfile: Optional[str] = None, keyfile: Optional[str] = None) -> None:
        from corral.actors.common import CONTROL_NICE, set_priority

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        # Ray starts workers at nice 15; every remote call passes through here, as acquires pass
        # through the registry: the same priority as the control plane (the server thread inherits it).
        self.nice = set_priority(CONTROL_NICE)
        self._args = (config, digests, host, port, settings, certfile, keyfile)
        self._ready = threading.Event()
        self._error: Optional[str] = None
        self._info: dict = {}
        threading.Thread(target=self._serve, name="corral-gateway", daemon=True).start()

    def _serve(self) -> None:
        import ray
        import uvicorn

        from corral.manager import SandboxManager
        from corral.models import SandboxManagerEnvConfig

        from .app import create_app

        config, digests, host, port, settings, certfile, keyfile = self._args
        try:
            s = GatewaySettings.model_validate(settings)
            check_tls(certfile, keyfile)
            manager = SandboxManager(SandboxManagerEnvConfig.model_validate(config))
            app = create_app(manager, Tenants.from_digests(digests), s)
            ucfg = uvicorn_config(app, host, port, s, certfile, keyfile)
            sock = bind(ucfg, retry_for=BIND_RETRY_S)
            node_ip = ray.util.get_node_ip_address()
            shown = node_ip if host in ("0.0.0.0", "::") else host
            self._info = {"url": _url(shown, sock.getsockname()[1], bool(certfile)), "node_id":
                          ray.get_runtime_context().get_node_id(), "node_ip": node_ip, "pid": os.getpid(),
                          "nice": self.nice}
            server = uvicorn.Server(ucfg)
        except BaseException as e:  # reported by address(); the actor stays up to say why
            self._error = f"{type(e).__name__}: {e}"
            logger.error("corral gateway could not start: %s", self._error)
            self._ready.set()
            return
        self._ready.set()
        try:
            server.run(sockets=[sock])
        finally:
            # The server stopped by itself: end the process so Ray starts the actor again.
            logger.error("corral gateway server stopped; exiting for a restart")
            os._exit(1)

    def address(self, timeout: float = 120.0) -> dict:
        """``{"url", "node_id", "node_ip", "pid", "nice"}`` once serving; the start's error otherwise."""
        if not self._ready.wait(timeout):
            raise SandboxUnreachable(f"the gateway did not start within {timeout:g}s")
        if self._error:
            raise DriverError(f"the gateway could not start: {self._error}")
        return dict(self._info)


def _wait_gone(ray: Any, name: str, namespace: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.2)


def stop_gateways(namespace: str) -> list[str]:
    """Kill every gateway actor of ``namespace`` (for good); returns their names."""
    import ray

    names = [e["name"] for e in ray.util.list_named_actors(all_namespaces=True)
             if e.get("namespace") == namespace and e.get("name", "").startswith(GATEWAY_PREFIX)]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:
            continue
    for name in names:
        _wait_gone(ray, name, namespace)
    return names


def start_gateways(config: Any, tenants: Tenants, host: str = "0.0.0.0", port: int = 8765,
                   settings: Optional[GatewaySettings] = None, certfile: Optional[str] = None,
                   keyfile: Optional[str] = None, timeout: float = 120.0) -> list[dict]:
    """A gateway actor on every alive node of the connected Ray cluster (replacing the namespace's
    gateways); returns each one's address. ``config`` is the namespace's resolved
    :class:`SandboxManagerEnvConfig` (absolute paths: actors run in other directories)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    settings = settings or GatewaySettings()
    check_tls(certfile, keyfile)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidRequest(f"port must be 1..65535 (every node's gateway listens on it), got {port!r}")
    ns = config.namespace
    stop_gateways(ns)  # new tokens or settings replace the old gateways
    raw = config.model_dump(mode="json")
    handles = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        node_id = node["NodeID"]
        actor = ray.remote(GatewayActor).options(
            name=gateway_name(node_id), namespace=ns, lifetime="detached",
            max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=8,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(raw, tenants.digests(), host, port, settings.model_dump(), certfile, keyfile)
        handles.append(actor)
    return ray.get([h.address.remote(timeout) for h in handles])
