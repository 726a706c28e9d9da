"""Joining Ray and finding corral's registry; owning a Ray cluster corral started.

What it owns: the decision of which Ray cluster serves this process (a given
address, ``RAY_ADDRESS``, the cluster recorded in the state dir, a ``ray start``
head on this machine, or a new local one), and the handle of one namespace's
RegistryActor. The first process to start a namespace fixes its configuration;
later ones join it and change nothing (a config that differs is reported, not
applied; ``configure`` changes it on purpose).

When this process started the Ray cluster itself (*embedded*), it owns what
runs there: :class:`Ownership` releases every sandbox of the namespaces it
served and removes them before Ray goes down, on normal exit, on an exception,
on SIGTERM, SIGINT and SIGHUP, and when a notebook kernel shuts down. An owner
killed with SIGKILL leaves a record in the state dir; the next start on that
state dir removes what it left at once.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional

import ray

from corral.errors import InvalidRequest, NotFound, SandboxError
from corral.models import SandboxManagerEnvConfig
from corral.statedir import ClusterRecord, cluster_lock

from . import _errors

__all__ = [
    "Cluster", "connect", "join_existing", "resolve_paths", "ensure_ray", "config_differences", "this_node", "OWNERSHIP",
]

logger = logging.getLogger("corral")


def resolve_paths(config: SandboxManagerEnvConfig) -> SandboxManagerEnvConfig:
    """A copy whose host paths are absolute: actors run in other processes and other directories."""
    upd: dict[str, Any] = {"state_dir": os.path.abspath(config.state_dir)}
    if config.default_mount_dir:
        upd["default_mount_dir"] = os.path.abspath(config.default_mount_dir)
    if config.storage_folder and config.file_system == "local":
        upd["storage_folder"] = os.path.abspath(config.storage_folder)
    if config.readonly_mounts:
        upd["readonly_mounts"] = {os.path.abspath(h): c for h, c in config.readonly_mounts.items()}
    if config.driver is not None and config.driver.type == "process":
        upd["driver"] = config.driver.model_copy(update={"root": os.path.abspath(config.driver.root)})
    return config.model_copy(update=upd)


def _answers(address: Optional[str], timeout: float = 2.0) -> bool:
    """Whether something listens at a Ray GCS ``host:port``."""
    if not address or ":" not in address:
        return False
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _ray_head_on_this_machine() -> Optional[str]:
    """The address ``ray start --head`` recorded on this machine, if any (where Ray keeps it:
    ``$RAY_TMPDIR``, else ``$TMPDIR``, else ``/tmp``, then ``ray/ray_current_cluster``)."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    path = os.path.join(base, "ray", "ray_current_cluster")
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _init(address: Optional[str], namespace: str) -> None:
    kw = dict(namespace=namespace, ignore_reinit_error=True, log_to_driver=False)
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(address="local", include_dashboard=False, **kw)


def ensure_ray(address: Optional[str], config: SandboxManagerEnvConfig) -> tuple[bool, bool]:
    """Join a Ray cluster, or start one; returns (this process owns it, sweep what a dead owner left).

    Joins ``address``, else ``RAY_ADDRESS``, else the live cluster recorded in the state dir,
    else a live ``ray start`` head on this machine; otherwise it starts a local cluster that
    this process owns. A recorded cluster that does not answer is stale: said so, and passed
    over. Already connected to another cluster than ``address``: an error.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address not in ("auto", "local") and not address.startswith(("ray://", "http")) \
                and address != current:
            raise InvalidRequest(f"this process is connected to Ray at {current}, not {address}")
        return False, False
    state = config.abs_state_dir()
    if address:
        try:
            _init(address, config.namespace)
        except Exception as e:
            raise SandboxError(f"cannot join the Ray cluster at {address}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
        return False, _dead_owner(state)
    with cluster_lock(state):
        rec = ClusterRecord.read(state)
        sweep = False
        if rec is not None:
            if (rec.owner_alive or not rec.embedded) and _answers(rec.address):
                _init(rec.address, config.namespace)
                logger.info("joined the Ray cluster at %s that serves %s", rec.address, state)
                return False, False
            sweep = rec.embedded and not rec.owner_alive
            logger.warning("the Ray cluster %s recorded in %s does not answer%s; starting anew", rec.address,
                           ClusterRecord.path(state), " (its owner exited without cleaning up: what it left "
                           "is removed)" if sweep else "")
            ClusterRecord.clear(state)
        head = _ray_head_on_this_machine()
        if head and _answers(head):
            _init("auto", config.namespace)
            ClusterRecord(address=ray.get_runtime_context().gcs_address, embedded=False).write(state)
            logger.info("joined the Ray cluster at %s (ray start on this machine)", head)
            return False, sweep
        if head:
            logger.warning("a Ray head was recorded on this machine at %s but does not answer; corral starts "
                           "a local cluster of its own instead", head)
        _init(None, config.namespace)
        ClusterRecord(address=ray.get_runtime_context().gcs_address, embedded=True, owner_pid=os.getpid()).write(state)
        logger.info("started a local Ray cluster at %s, owned by this process", ray.get_runtime_context().gcs_address)
        return True, sweep


def _dead_owner(state: str) -> bool:
    rec = ClusterRecord.read(state)
    return bool(rec and rec.embedded and not rec.owner_alive)


@dataclass
class Cluster:
    """The registry of one namespace, as this process reaches it."""

    config: SandboxManagerEnvConfig
    registry: Any
    node: Optional[str] = None  # the registry's node
    here: Optional[str] = None  # this process's node (acquires prefer sandboxes there)
    #: The registry's lane as this node sees it (None: none here, use Ray); ``lane_stale`` asks
    #: the registry again (it lost its lane, or restarted with a new one).
    lane: Optional[dict] = None
    lane_stale: bool = False

    def local_lane(self, address: Optional[dict]) -> Optional[dict]:
        """``address`` if this process is on the registry's node, else None."""
        here = self.here
        self.lane = address if address and here is not None and address.get("node_id") == here else None
        self.lane_stale = False
        return self.lane

    def configured(self, config: dict) -> None:
        """The registry's config after :meth:`configure`: what this process validates against."""
        self.config = SandboxManagerEnvConfig.model_validate(config)


#: Fields whose difference between a client's config and the running one is worth a warning
#: (the rest, paths made absolute and defaults, are noise).
_COMPARED = ("container_deployment", "pool_size", "sandbox_types", "max_sandbox_instances", "heartbeat_timeout",
             "file_system", "storage_folder", "default_type", "reconcile_interval", "node_resource")


def config_differences(mine: SandboxManagerEnvConfig, running: SandboxManagerEnvConfig) -> list[str]:
    """What a client asked for that differs from the running namespace (names the fields)."""
    a, b = mine.model_dump(mode="json"), running.model_dump(mode="json")
    return [f"{k}: yours {a[k]!r}, running {b[k]!r}" for k in _COMPARED if a.get(k) != b.get(k)]


def join_existing(config: SandboxManagerEnvConfig, state_dirs: list[str] = ()) -> bool:
    """Join the cluster a namespace runs on, if one answers; never start one. Candidates:
    ``RAY_ADDRESS``, the clusters recorded in ``state_dirs`` (and the config's), a ``ray start``
    head on this machine."""
    if ray.is_initialized():
        return True
    candidates = [os.environ.get("RAY_ADDRESS")]
    for state in [config.abs_state_dir(), *state_dirs]:
        rec = ClusterRecord.read(state)
        candidates.append(rec.address if rec else None)
    candidates.append(_ray_head_on_this_machine())
    for address in candidates:
        if address and (address == "auto" or _answers(address)):
            try:
                _init(address, config.namespace)
                return True
            except Exception as e:
                logger.warning("could not join the Ray cluster at %s: %s", address, e)
    return False


def connect(config: SandboxManagerEnvConfig, address: Optional[str] = None, quiet: bool = False,
            join_only: bool = False) -> Cluster:
    """Get or create the registry of ``config``'s namespace (which starts its pools).

    ``join_only``: start nothing (no Ray cluster, no registry); a namespace that is not running
    is :class:`corral.NotFound` (``corral status``)."""
    from corral.actors.common import registry_options
    from corral.actors.handles import REGISTRY_NAME
    from corral.actors.registry_actor import RegistryActor

    if not isinstance(config, SandboxManagerEnvConfig):
        raise InvalidRequest(f"config must be a SandboxManagerEnvConfig, got {type(config).__name__}")
    config = resolve_paths(config)
    if join_only:
        if address:
            _init(address, config.namespace)
        elif not join_existing(config):
            raise NotFound(f"no Ray cluster runs corral namespace {config.namespace!r} here (none answers at "
                           "RAY_ADDRESS, in the state dir's record or as a `ray start` head on this machine)")
        try:
            registry = ray.get_actor(REGISTRY_NAME, namespace=config.namespace)
        except ValueError:
            raise NotFound(f"corral namespace {config.namespace!r} is not running on the Ray cluster at "
                           f"{ray.get_runtime_context().gcs_address}") from None
        owned, sweep = False, False
    else:
        owned, sweep = ensure_ray(address, config)
        opts = registry_options(REGISTRY_NAME, config.namespace, node=ray.get_runtime_context().get_node_id())
        registry = ray.remote(RegistryActor).options(**opts).remote(
            config.model_dump(mode="json"), sweep)
    try:
        hello = ray.get(registry.hello.remote())  # answers once the registry is up
    except Exception as e:
        raise _errors.unwrap(e) from None
    running = SandboxManagerEnvConfig.model_validate(hello["config"])
    diffs = config_differences(config, running)
    if diffs and not quiet:
        logger.warning("namespace %r is already running with another config; yours is not applied "
                       "(SandboxManager.configure changes it): %s", config.namespace, "; ".join(diffs))
    cluster = Cluster(config=running, registry=registry, node=hello["node"], here=this_node())
    cluster.local_lane(hello["lane"])
    if owned:
        OWNERSHIP.install()
    if OWNERSHIP.installed:
        OWNERSHIP.serve(running)
    return cluster


def this_node() -> Optional[str]:
    """This process's Ray node id (None when Ray cannot say, e.g. a Ray client)."""
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


class Ownership:
    """This process started the Ray cluster: what it served goes before Ray does.

    What it owns: the namespaces this process served (their configs) and the exit hooks. The
    teardown runs once, from ``atexit`` (normal exit, an uncaught exception, ``sys.exit``, a
    notebook kernel shutting down) or from a signal handler that turns SIGTERM and SIGHUP into
    an ordinary exit (SIGINT already is one). Signal handlers a program set itself are kept.
    """

    def __init__(self) -> None:
        self.installed = False
        self.namespaces: dict[str, SandboxManagerEnvConfig] = {}
        self._done = False
        self._lock = threading.Lock()

    def install(self) -> None:
        if self.installed:
            return
        self.installed = True
        atexit.register(self.shutdown)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) in (signal.SIG_DFL, None):
                    signal.signal(sig, self._on_signal)

    def serve(self, config: SandboxManagerEnvConfig) -> None:
        self.namespaces[config.namespace] = config

    @staticmethod
    def _on_signal(signum: int, _frame: Any) -> None:
        sys.exit(128 + signum)  # atexit runs, and with it the teardown

    def shutdown(self) -> None:
        """Release and remove every sandbox of the namespaces served, stop their actors, then Ray."""
        with self._lock:
            if self._done:
                return
            self._done = True
        from .shutdown import down

        for ns, config in self.namespaces.items():
            try:
                out = down(config, timeout=30.0, announce=True)
                if out["containers_left"]:
                    print(f"corral: {out['containers_left']} sandboxes of {ns!r} could not be removed",
                          file=sys.stderr)
            except Exception as e:  # exiting anyway: say what was left, never hide it
                print(f"corral: tearing down namespace {ns!r} failed: {_errors.unwrap(e)}", file=sys.stderr)
        for config in self.namespaces.values():
            rec = ClusterRecord.read(config.abs_state_dir())
            if rec is not None and rec.owner_pid == os.getpid():
                ClusterRecord.clear(config.abs_state_dir())
        if ray.is_initialized():
            ray.shutdown()


OWNERSHIP = Ownership()


def run_sync(coro):
    """Run a coroutine to completion from sync code, even inside a running event loop (Jupyter)."""
    import asyncio
    import concurrent.futures

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()

