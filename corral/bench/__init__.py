"""corral's benchmarks. Each prints its figures and writes them as JSON; ``docs/performance.md``
holds the current ones with the command, date and machine behind each.

- :mod:`corral.bench.rollout` (``corral bench``): RL-shaped episodes against its baselines;
  ``--workload cycle`` runs :mod:`corral.bench.cycle` (create, one shell call, release, as the
  reference's users loop, against bare docker-py and the reference itself).
- :mod:`corral.bench.runtime_bench`: acquire, tool call and release through the actors.
- :mod:`corral.bench.gateway_bench`: remote mode, the gateway's ``/proxy`` overhead and many
  remote clients.
- :mod:`corral.bench.storage_bench`: workspace sync to local and OSS storage.
- :mod:`corral.bench.sessions_bench`: live sessions on one node, hosted (a SessionHost per node)
  against an actor each: memory and CPU per session, heartbeats, reaps on time.
- :mod:`corral.bench.warm_bench`: a pool of many warm sandboxes at rest: its actors' CPU.
- :mod:`corral.bench.box_bench`, :mod:`corral.bench.docker_bench`: the box alone, the engine alone.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

__all__ = ["write_json", "emit_json", "on_local_ray"]


def write_json(path: str, data: Any) -> None:
    """A benchmark's figures as indented JSON at ``path``."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def emit_json(data: Any, path: Optional[str]) -> None:
    """Print a benchmark's figures as JSON, and write them to ``path`` when given (``--out``)."""
    print(json.dumps(data, indent=2))
    if path:
        write_json(path, data)


def on_local_ray(measure: Callable[[], dict], params: dict, path: Optional[str]) -> None:
    """Start a local Ray cluster with this machine's CPUs, take ``measure()``'s figures, stop it,
    and print them with the machine and ``params`` (written to ``path`` when given)."""
    import os

    import ray

    from corral.bench.rollout import machine_info

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False,
             object_store_memory=256 << 20)
    try:
        out = {"machine": machine_info(), "params": params, **measure()}
    finally:
        ray.shutdown()
    emit_json(out, path)
