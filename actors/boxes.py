"""Boxes: a pool's HTTP calls to the boxes of its sandboxes.

What it owns: the one HTTP client (kept alive, TLS as the namespace says) a PoolActor uses for
its boxes, and the two calls it makes on them: the health probe of a warm sandbox's box
(:meth:`healthy`) and the reset that wipes a released one and gives it its next token
(:meth:`reset`). Whom to probe or reset, and what an answer means, is the registry's decision.
"""

from __future__ import annotations

from typing import Any

from corral.client._http import tls_context
from corral.models import ContainerModel

__all__ = ["Boxes"]


class Boxes:
    """See the module docstring."""

    def __init__(self) -> None:
        self._http: Any = None

    def client(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=5.0, trust_env=False, verify=tls_context(),
                                           limits=httpx.Limits(keepalive_expiry=30.0))
        return self._http

    async def healthy(self, rec: ContainerModel) -> bool:
        """Whether the box answers its health route (any failure is no)."""
        if not rec.url:
            return False
        try:
            r = await self.client().get(f"{rec.url}/v1/healthz",
                                        headers={"Authorization": f"Bearer {rec.runtime_token}"}, timeout=5.0)
            return r.status_code == 200
        except Exception:
            return False

    async def reset(self, rec: ContainerModel, restart_kernel: bool, token: str) -> None:
        """Wipe the box for its next session, which holds ``token`` (raises when it fails)."""
        from corral.client import AsyncBoxClient

        async with AsyncBoxClient(rec.url, rec.runtime_token, http_client=self.client()) as box:
            # Clean is enough to be WARM again: the old session's processes are dead and its
            # files gone, and the new kernel, forked after that, boots while the sandbox waits
            # in the pool (the next session's first cell waits for the boot if needed).
            await box.reset(restart_kernel=restart_kernel, token=token)
