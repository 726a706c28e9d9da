"""Configs and managers for tests: each config has a namespace, state dir and mount dir of its own;
every manager a test makes is brought down after it, and must leave no container."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["config_factory", "manager_factory"]


def config_factory(tmp_path: Path, prefix: str, **defaults: Any) -> Callable[..., Any]:
    """``make(**kw)``: a SandboxManagerEnvConfig of a new namespace (``prefix`` and a random tail)
    under ``tmp_path``, with ``defaults`` and then ``kw`` applied."""
    from corral.models import SandboxManagerEnvConfig

    def make(**kw: Any) -> SandboxManagerEnvConfig:
        return SandboxManagerEnvConfig(**{
            "namespace": prefix + uuid.uuid4().hex[:10],
            "state_dir": str(tmp_path / "state"),
            "default_mount_dir": str(tmp_path / "mounts"),
            "watcher_scan_interval": 0.2,
            "spare_sessions": 1,
            **defaults,
            **kw,
        })

    return make


def manager_factory(make_config: Callable[..., Any], down_timeout: float) -> Iterator[Callable[..., Any]]:
    """Generator body of a fixture: yields ``make(**kw)``, a SandboxManager of ``make_config(**kw)``
    (or of ``config=``); after the test every one made is brought down and its connections closed."""
    from corral.manager import SandboxManager, down

    made = []

    def make(**kw: Any) -> SandboxManager:
        m = SandboxManager(kw.pop("config", None) or make_config(**kw))
        made.append(m)
        return m

    yield make
    for m in made:
        out = down(m.config, timeout=down_timeout)
        assert out["containers_left"] == 0, f"namespace {m.config.namespace} leaked containers"
        m._ops.close()
