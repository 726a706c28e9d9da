"""SandboxManager: the reference's manager, same constructor and operations, on Ray actors.

What it owns: the connection to one namespace's registry (joining a running Ray
cluster or starting a local one, which this process then owns: see
:mod:`corral.manager.cluster`) and the set of sandboxes it created. Every
operation exists twice, ``op`` and ``op_async``: the methods come from the
generated :class:`~corral.manager._facade.ManagerOperations`, over one async
core (``_async/ops.py``) and its generated sync twin (``_sync/ops.py``), so
they cannot drift.

Connecting changes nothing: a namespace keeps the config it was first started
with (``configure`` and ``reserve`` change it on purpose). Leaving a ``with``
block releases the sandboxes this manager created (not other processes'
sandboxes, not the warm pools); ``cleanup()`` releases every sandbox of the
namespace, as the reference's does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional, Union

from corral.client._http import preload_transport
from corral.errors import InvalidRequest
from corral.models import SandboxManagerEnvConfig, SandboxTypeConfig

from ._async.ops import OPERATIONS, AsyncOps
from ._async.sandbox import AsyncSandbox
from ._facade import ManagerOperations
from ._sync.ops import Ops
from ._sync.sandbox import Sandbox
from .cluster import Cluster, connect

__all__ = ["SandboxManager", "OPERATIONS", "Sandbox", "AsyncSandbox"]

logger = logging.getLogger("corral")


def _types(default_type: Any) -> list[str]:
    if default_type is None:
        return []
    items = default_type if isinstance(default_type, (list, tuple)) else [default_type]
    return [str(getattr(t, "value", t)) for t in items]


def as_config(config: Union[SandboxManagerEnvConfig, dict, None]) -> SandboxManagerEnvConfig:
    """A manager's ``config=`` argument as a config: None is the default one, a dict is validated."""
    if config is None:
        return SandboxManagerEnvConfig()
    if isinstance(config, dict):
        return SandboxManagerEnvConfig.model_validate(config)
    if not isinstance(config, SandboxManagerEnvConfig):
        raise InvalidRequest(f"config must be a SandboxManagerEnvConfig or dict, got {type(config).__name__}")
    return config


class SandboxManager(ManagerOperations):
    """Sandboxes on Ray actors; see the module docstring and the README.

    ``SandboxManager(config=None, base_url=None, bearer_token=None, default_type=None, address=None)``:
    ``config`` is a :class:`SandboxManagerEnvConfig` (or a dict of one);
    ``default_type`` names the default sandbox type (or a list: the first is
    the default, all get pools); ``address`` is a Ray cluster address (default:
    RAY_ADDRESS, the cluster serving this state dir, a ``ray start`` head on this
    machine, or a new local one that this process owns).
    """

    def __new__(cls, config: Any = None, base_url: Optional[str] = None, *args: Any, **kwargs: Any):
        # Remote mode: the same operations, sent to a corral gateway (corral/remote, docs/remote.md).
        if base_url is not None and cls is SandboxManager:
            from corral.remote import RemoteSandboxManager

            return super().__new__(RemoteSandboxManager)
        return super().__new__(cls)

    def __init__(
        self,
        config: Union[SandboxManagerEnvConfig, dict, None] = None,
        base_url: Optional[str] = None,
        bearer_token: Optional[str] = None,
        default_type: Any = None,
        address: Optional[str] = None,
    ) -> None:
        if base_url is not None:
            raise InvalidRequest(f"{type(self).__name__} is embedded; SandboxManager(base_url=...) is remote mode")
        config = as_config(config)
        types = _types(default_type)
        if types:
            extra = {t: config.sandbox_types.get(t) or SandboxTypeConfig(name=t) for t in types}
            config = config.model_copy(update={
                "default_type": types[0], "sandbox_types": {**config.sandbox_types, **extra},
            })
        self.cluster: Cluster = connect(config, address)
        self.config = self.cluster.config
        self._owned: set = set()
        self._ops = Ops(self.cluster, self._owned)
        preload_transport()  # now, not on the first tool call of an async caller's first wave
        self._aops: dict[int, tuple[asyncio.AbstractEventLoop, AsyncOps]] = {}

    def _async_ops(self) -> AsyncOps:
        # Connections are bound to the event loop they were opened on: one async core per loop.
        # The entry holds its loop, so a closed loop's id cannot be handed to a new loop while
        # the entry lives; entries of closed loops (asyncio.run per call) are dropped here.
        loop = asyncio.get_running_loop()
        entry = self._aops.get(id(loop))
        if entry is None or entry[0] is not loop:
            self._aops = {k: v for k, v in self._aops.items() if not v[0].is_closed()}
            entry = self._aops[id(loop)] = (loop, self._new_async_ops())
        return entry[1]

    def _new_async_ops(self) -> AsyncOps:
        """The async core for one event loop (remote mode makes its own)."""
        return AsyncOps(self.cluster, self._owned)

    # -- context managers ----------------------------------------------------------

    def __enter__(self) -> "SandboxManager":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ops.release_owned()

    async def __aenter__(self) -> "SandboxManager":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self._async_ops().release_owned()

    def close(self) -> None:
        """Release this manager's sandboxes and its connections (not the actors)."""
        self._ops.release_owned()
        self._ops.close()

    def __repr__(self) -> str:
        return f"<SandboxManager namespace={self.config.namespace!r} types={sorted(self.config.sandbox_types)}>"
