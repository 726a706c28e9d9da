"""SandboxManager: the reference's manager, same constructor and operations, on Ray actors.

What it owns: the connection to one namespace's actors (joining a running Ray
cluster or starting a local one) and the set of sandboxes it created. Every
operation exists twice, ``op`` and ``op_async``, both generated from one async
core (``_async/ops.py``; the sync twin ``_sync/ops.py`` is produced by
``scripts/unasync.py``), so they cannot drift.

Leaving a ``with`` block releases the sandboxes this manager created (not
other processes' sandboxes, not the warm pools); ``cleanup()`` releases every
sandbox of the namespace, as the reference's does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Optional, Union

from corral.client._http import preload_transport
from corral.errors import InvalidRequest
from corral.models import SandboxManagerEnvConfig, SandboxTypeConfig

from ._async.ops import AsyncOps
from ._async.sandbox import AsyncSandbox
from ._sync.ops import Ops
from ._sync.sandbox import Sandbox
from .cluster import Cluster, connect

__all__ = ["SandboxManager", "OPERATIONS", "Sandbox", "AsyncSandbox"]

logger = logging.getLogger("corral")

#: The operations, each as ``name`` (sync) and ``name_async``.
OPERATIONS = (
    "create", "create_from_pool", "release", "start", "stop", "get_status", "get_info",
    "check_health", "list_tools", "call_tool", "add_mcp_servers", "get_session_mapping",
    "list_session_keys", "reap_session", "restore_session", "cleanup", "heartbeat", "reserve",
    "status", "acquire",
)


def _types(default_type: Any) -> list[str]:
    if default_type is None:
        return []
    items = default_type if isinstance(default_type, (list, tuple)) else [default_type]
    return [str(getattr(t, "value", t)) for t in items]


class SandboxManager:
    """Sandboxes on Ray actors; see the module docstring and the README.

    ``SandboxManager(config=None, base_url=None, bearer_token=None, default_type=None, address=None)``:
    ``config`` is a :class:`SandboxManagerEnvConfig` (or a dict of one);
    ``default_type`` names the default sandbox type (or a list: the first is
    the default, all get pools); ``address`` is a Ray cluster address (default:
    RAY_ADDRESS, a cluster running on this machine, or a new local one).
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
        if config is None:
            config = SandboxManagerEnvConfig()
        elif isinstance(config, dict):
            config = SandboxManagerEnvConfig.model_validate(config)
        elif not isinstance(config, SandboxManagerEnvConfig):
            raise InvalidRequest(f"config must be a SandboxManagerEnvConfig or dict, got {type(config).__name__}")
        types = _types(default_type)
        if types:
            extra = {t: config.sandbox_types.get(t) or SandboxTypeConfig(name=t) for t in types}
            config = config.model_copy(update={
                "default_type": types[0], "sandbox_types": {**config.sandbox_types, **extra},
            })
        self.config = config
        self.cluster: Cluster = connect(config, address)
        self.config = self.cluster.config
        self._owned: set = set()
        self._ops = Ops(self.cluster, self._owned)
        preload_transport()  # now, not on the first tool call of an async caller's first wave
        self._aops: dict[int, tuple[asyncio.AbstractEventLoop, AsyncOps]] = {}

    def _async_ops(self) -> AsyncOps:
        # httpx.AsyncClient is bound to the event loop it first runs on: one AsyncOps per loop.
        # The entry holds its loop, so a closed loop's id cannot be handed to a new loop while
        # the entry lives; entries of closed loops (asyncio.run per call) are dropped here.
        loop = asyncio.get_running_loop()
        entry = self._aops.get(id(loop))
        if entry is None or entry[0] is not loop:
            self._aops = {k: v for k, v in self._aops.items() if not v[0].is_closed()}
            entry = self._aops[id(loop)] = (loop, AsyncOps(self.cluster, self._owned))
        return entry[1]

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


def _sync_op(name: str):
    impl = getattr(Ops, name)

    @functools.wraps(impl)
    def op(self: SandboxManager, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._ops, name)(*args, **kwargs)

    return op


def _async_op(name: str):
    impl = getattr(AsyncOps, name)

    @functools.wraps(impl)
    async def op(self: SandboxManager, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self._async_ops(), name)(*args, **kwargs)

    op.__name__ = op.__qualname__ = f"{name}_async"
    return op


for _name in OPERATIONS:
    setattr(SandboxManager, _name, _sync_op(_name))
    setattr(SandboxManager, f"{_name}_async", _async_op(_name))
