"""``down``: remove everything a namespace runs, on its cluster and on this machine.

What it owns: nothing; it carries out a shutdown in order. First, when the
namespace's registry answers (on the cluster recorded for its state dirs, or
the one this process is in), it stops refilling, releases every sandbox,
waits for every node's containers to go, removes per-node resources, and
stops the registry, the pools, the session actors and the session hosts. Then it sweeps this
machine with each driver and state dir the namespace used here (the machine
index in :mod:`corral.statedir` remembers them), so containers of a namespace
whose cluster is gone are found too. It reports what it removed, truthfully.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import ray

from corral.drivers import make_driver
from corral.drivers.config import DockerDriverConfig, ProcessDriverConfig
from corral.models import LABEL_MANAGED, LABEL_REGISTRY, SandboxManagerEnvConfig
from corral.statedir import forget, recall

from . import _errors
from .cluster import join_existing, resolve_paths, run_sync

__all__ = ["down"]

logger = logging.getLogger("corral")


def _registry(namespace: str):
    from corral.actors.handles import REGISTRY_NAME

    try:
        return ray.get_actor(REGISTRY_NAME, namespace=namespace)
    except ValueError:
        return None


def _stop_actors(namespace: str) -> int:
    from corral.actors.handles import HOST_PREFIX, REGISTRY_NAME, SESSION_PREFIX

    n = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry.get("name", "")
        if entry.get("namespace") == namespace and (name == REGISTRY_NAME or name.startswith(
                (SESSION_PREFIX, HOST_PREFIX, "corral-pool-", "corral-gateway-"))):
            try:
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
                n += 1
            except ValueError:
                pass
    return n


def _driver_config(use: dict):
    d = use.get("driver") or {}
    return DockerDriverConfig.model_validate(d) if d.get("type") == "docker" else ProcessDriverConfig.model_validate(d)


async def _sweep(namespace: str, uses: list[dict]) -> tuple[int, int]:
    """Remove this machine's containers of ``namespace`` with every driver it used; (removed, left)."""
    removed = left = 0
    seen: set[str] = set()
    labels = {LABEL_MANAGED: "true", LABEL_REGISTRY: namespace}
    configs = []
    for use in uses:
        cfg = _driver_config(use)
        configs.append(cfg)
        if cfg.type == "process" and os.path.isdir(cfg.root):  # each node's boxes in a directory of its own
            configs += [cfg.model_copy(update={"root": os.path.join(cfg.root, d)}) for d in sorted(os.listdir(cfg.root))
                        if os.path.isdir(os.path.join(cfg.root, d)) and not os.path.exists(os.path.join(cfg.root, d, "meta.json"))]
    for cfg in configs:
        key = cfg.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        try:
            driver = make_driver(cfg)
        except Exception as e:  # e.g. no Docker engine here any more: nothing of it to remove
            logger.info("skipping %s: %s", cfg.type, e)
            continue
        try:
            for h in await driver.list(labels):
                await driver.remove(h.container_id)
                removed += 1
            left += len(await driver.list(labels))
            teardown = getattr(driver, "teardown_network", None)
            if teardown is not None:
                await teardown()
        except Exception as e:
            logger.warning("sweeping %s containers of %r failed: %s", cfg.type, namespace, e)
        finally:
            await driver.close()
    return removed, left


def down(config: SandboxManagerEnvConfig, timeout: float = 30.0, announce: bool = False) -> dict:
    """Release every sandbox of ``config``'s namespace, wait for them to go, stop its actors, and
    remove what is left on this machine.

    Returns ``{"released": [names], "actors": n, "swept": n, "containers_left": n}``: the
    sandboxes the registry released, the actors stopped, the containers removed directly on
    this machine (left behind by a cluster that is gone), and what could not be removed.
    """
    config = resolve_paths(config)
    ns = config.namespace
    mine = {"state_dir": config.abs_state_dir(), "driver": config.driver_config().model_dump(mode="json")}
    uses = recall(ns)
    if mine not in uses:
        uses.append(mine)
    out = {"released": [], "actors": 0, "swept": 0, "containers_left": 0}
    if join_existing(config, [u["state_dir"] for u in uses]):
        registry = _registry(ns)
        if registry is not None:
            try:
                ray.get(registry.drain.remote(), timeout=120)
                out["released"] = ray.get(registry.cleanup.remote(), timeout=60)
                if announce and out["released"]:
                    print(f"corral: removing {len(out['released'])} sandboxes of namespace {ns!r}", file=sys.stderr)
                ray.get(registry.settle.remote(timeout), timeout=timeout + 60)
                ray.get(registry.teardown_nodes.remote(), timeout=120)
                ray.get(registry.close_lane.remote(), timeout=30)
                ray.get(registry.shutdown_sessions.remote(), timeout=60)
            except Exception as e:
                logger.warning("the registry of %r did not finish its shutdown: %s", ns, _errors.unwrap(e))
        out["actors"] = _stop_actors(ns)
    deadline = time.monotonic() + 5
    removed, left = run_sync(_sweep(ns, uses))
    while left and time.monotonic() < deadline:  # a dying actor may have just started one
        time.sleep(0.2)
        more, left = run_sync(_sweep(ns, uses))
        removed += more
    out["swept"], out["containers_left"] = removed, left
    if not left:
        forget(ns)
    return out

