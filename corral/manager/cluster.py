"""Joining Ray and finding (or starting) corral's actors.

What it owns: the decision to join a running Ray cluster or start a local one,
and the handles of the RegistryActor and one PoolActor per sandbox type, all
in one Ray namespace. The first process to start the actors fixes their
configuration; later processes with the same namespace join them (a changed
``pool_size`` is applied to the running pools).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import ray

from corral.errors import InvalidRequest, NotFound
from corral.models import SandboxManagerEnvConfig

__all__ = ["Cluster", "connect", "down", "resolve_paths", "ensure_ray"]

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


def ensure_ray(address: Optional[str] = None, namespace: str = "corral") -> None:
    """Join a Ray cluster, or start a local one.

    Joins ``address``, else ``RAY_ADDRESS``, else the cluster ``ray start``
    recorded on this machine (``/tmp/ray/ray_current_cluster``); otherwise it
    starts a local cluster. It never joins "whichever Ray processes happen to
    run here". Already connected to another cluster than ``address``: an error.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address and address not in ("auto", "local") and not address.startswith(("ray://", "http")) \
                and address != current:
            raise InvalidRequest(f"this process is connected to Ray at {current}, not {address}")
        return
    kw = dict(namespace=namespace, ignore_reinit_error=True, log_to_driver=False)
    if not address and os.path.exists(os.path.join(_ray_tmp(), "ray_current_cluster")):
        address = "auto"
    if address:
        ray.init(address=address, **kw)
        logger.info("joined the Ray cluster at %s", ray.get_runtime_context().gcs_address)
        return
    ray.init(include_dashboard=False, **kw)
    logger.info("started a local Ray cluster at %s", ray.get_runtime_context().gcs_address)


def _ray_tmp() -> str:
    return os.environ.get("RAY_TMPDIR", "/tmp/ray")


@dataclass
class Cluster:
    """Handles of one namespace's actors."""

    config: SandboxManagerEnvConfig
    registry: Any
    pools: dict[str, Any] = field(default_factory=dict)
    #: The registry's lane as this node sees it (None: none here, use Ray); ``lane_stale`` asks
    #: the registry again (it lost its lane, or restarted with a new one).
    lane: Optional[dict] = None
    lane_stale: bool = False

    def local_lane(self, address: Optional[dict]) -> Optional[dict]:
        """``address`` if this process is on the registry's node, else None."""
        here = this_node()
        self.lane = address if address and here is not None and address.get("node_id") == here else None
        self.lane_stale = False
        return self.lane

    def pool(self, sandbox_type: Optional[str]) -> Any:
        t = self.config.sandbox_type(sandbox_type).name  # raises UnknownSandboxType
        try:
            return self.pools[t]
        except KeyError:
            raise NotFound(f"no pool actor for sandbox type {t!r}") from None


def connect(config: SandboxManagerEnvConfig, address: Optional[str] = None) -> Cluster:
    """Get or create the registry and the pools of ``config``'s namespace."""
    from corral.actors.common import REGISTRY_NAME, detached_options, pool_name
    from corral.actors.pool_actor import PoolActor
    from corral.actors.registry_actor import RegistryActor

    if not isinstance(config, SandboxManagerEnvConfig):
        raise InvalidRequest(f"config must be a SandboxManagerEnvConfig, got {type(config).__name__}")
    config = resolve_paths(config)
    ensure_ray(address, config.namespace)
    raw = config.model_dump(mode="json")
    registry = ray.remote(RegistryActor).options(**detached_options(REGISTRY_NAME, config.namespace)).remote(raw)
    lane = ray.get(registry.lane_address.remote())  # answers once the registry is up
    pools = {}
    for name in config.sandbox_types:
        pools[name] = ray.remote(PoolActor).options(**detached_options(pool_name(name), config.namespace)).remote(
            raw, name
        )
    ray.get([p.set_target.remote(config.pool_target(n)) for n, p in pools.items()])
    cluster = Cluster(config=config, registry=registry, pools=pools)
    cluster.local_lane(lane)
    return cluster


def this_node() -> Optional[str]:
    """This process's Ray node id (None when Ray cannot say, e.g. a Ray client)."""
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None


def _run_sync(coro):
    """Run a coroutine to completion from sync code, even inside a running event loop (Jupyter)."""
    import asyncio
    import concurrent.futures

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _remove_leftovers(config: SandboxManagerEnvConfig, timeout: float, sweep: bool) -> int:
    """Wait up to ``timeout`` for the namespace's containers to go; with ``sweep``, remove what is
    left directly. Returns how many are left."""
    import asyncio
    import time

    from corral.drivers import make_driver
    from corral.models import LABEL_MANAGED, LABEL_REGISTRY

    driver = make_driver(config.driver_config())
    labels = {LABEL_MANAGED: "true", LABEL_REGISTRY: config.namespace}
    try:
        deadline = time.monotonic() + timeout
        left = await driver.list(labels)
        while left and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            left = await driver.list(labels)
        if sweep:
            for h in left:
                await driver.remove(h.container_id)
        return len(await driver.list(labels))
    finally:
        await driver.close()


def down(config: SandboxManagerEnvConfig, timeout: float = 30.0) -> dict:
    """Release every sandbox of ``config``'s namespace, wait for the containers to go, stop its actors.

    Returns what it removed: ``{"released": [names], "containers_left": n, "actors": n}``.
    """
    from corral.actors.common import REGISTRY_NAME, SESSION_PREFIX, pool_name

    config = resolve_paths(config)
    ensure_ray(None, config.namespace)
    out = {"released": [], "containers_left": 0, "actors": 0}
    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=config.namespace)
    except ValueError:
        registry = None
    pools = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == config.namespace and entry["name"].startswith("corral-pool-"):
            pools.append(ray.get_actor(entry["name"], namespace=config.namespace))
    ray.get([p.drain.remote() for p in pools])  # first stop refills, or they race the release below
    if registry is not None:
        out["released"] = ray.get(registry.cleanup.remote())
        ray.get(registry.close_lane.remote())  # its socket file goes with it
    _run_sync(_remove_leftovers(config, timeout, sweep=False))  # the pools carry out the teardowns
    names = [REGISTRY_NAME] + [pool_name(t) for t in config.sandbox_types]
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == config.namespace and (
            entry["name"] in names or entry["name"].startswith(SESSION_PREFIX) or entry["name"].startswith("corral-pool-")
        ):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=config.namespace), no_restart=True)
                out["actors"] += 1
            except ValueError:
                pass
    # last, with no actor left to start anything: remove whatever a dying actor had just started
    out["containers_left"] = _run_sync(_remove_leftovers(config, 0.0, sweep=True))
    return out
