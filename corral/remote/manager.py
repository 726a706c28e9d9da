"""RemoteSandboxManager: ``SandboxManager(base_url=..., bearer_token=...)``, the manager over HTTP.

What it owns: the address of one corral gateway (docs/remote.md), the
tenant's token, and the set of sandboxes it created. It has the embedded
manager's operations, sync and async (``op`` and ``op_async``), with the same
arguments, answers and exceptions; each is sent to the gateway. ``acquire``
returns the same :class:`corral.Sandbox` / :class:`corral.AsyncSandbox`
handles, whose tool calls go through the gateway's ``/proxy`` to the box.

``SandboxManager(base_url=...)`` builds one of these: callers need not import
this module. Leaving a ``with`` block releases the sandboxes this manager
created, as embedded; ``cleanup()`` releases every sandbox of the tenant.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional, Union

from corral.errors import InvalidRequest
from corral.manager.manager import SandboxManager, as_config
from corral.models import SandboxManagerEnvConfig

from ._async.ops import REMOTE_TIMEOUT, AsyncRemoteOps, Verify
from ._sync.ops import RemoteOps

__all__ = ["RemoteSandboxManager"]


def _default_type(default_type: Any) -> Optional[str]:
    if default_type is None:
        return None
    first = default_type[0] if isinstance(default_type, (list, tuple)) and default_type else default_type
    return str(getattr(first, "value", first))


class RemoteSandboxManager(SandboxManager):
    """The manager's operations on a corral gateway (see the module docstring).

    ``RemoteSandboxManager(config=None, base_url, bearer_token, default_type=None, *, verify=True,
    timeout=660)``: ``verify`` is True (the system's CAs), a CA file, an ``ssl.SSLContext`` or
    False; ``default_type`` is sent where an operation's ``sandbox_type`` is None (else the
    gateway's default applies); ``config`` is kept for its ``container_prefix_key`` only (the
    gateway's configuration is the one that counts).
    """

    def __init__(
        self,
        config: Union[SandboxManagerEnvConfig, dict, None] = None,
        base_url: Optional[str] = None,
        bearer_token: Optional[str] = None,
        default_type: Any = None,
        address: Optional[str] = None,
        *,
        verify: Verify = True,
        timeout: float = REMOTE_TIMEOUT,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidRequest(f"base_url must be the gateway's http:// or https:// URL, got {base_url!r}")
        if not isinstance(bearer_token, str) or not bearer_token:
            raise InvalidRequest("remote mode needs bearer_token: the gateway answers no request without one")
        if address is not None:
            raise InvalidRequest("address= names a Ray cluster (embedded mode); remote mode takes base_url= only")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise InvalidRequest(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.config = as_config(config)
        self.base_url = base_url.rstrip("/")
        self._owned: set = set()
        self._settings = dict(verify=verify, timeout=float(timeout), default_type=_default_type(default_type),
                              prefix=self.config.container_prefix_key)
        self._token = bearer_token
        self._ops = RemoteOps(self.base_url, bearer_token, owned=self._owned, **self._settings)
        self._aops: dict[int, tuple[asyncio.AbstractEventLoop, AsyncRemoteOps]] = {}

    def _new_async_ops(self) -> AsyncRemoteOps:
        return AsyncRemoteOps(self.base_url, self._token, owned=self._owned, **self._settings)

    def __repr__(self) -> str:
        return f"<SandboxManager remote {self.base_url}>"
