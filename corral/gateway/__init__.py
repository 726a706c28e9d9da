"""The gateway: corral's manager operations and its boxes over HTTP, for clients outside the Ray cluster.

``create_app(backend, tokens, settings)`` builds the ASGI app (see
:mod:`corral.gateway.app`); ``corral serve`` runs it, as one Ray actor per
node or as a standalone uvicorn server (:mod:`corral.gateway.server`).
The client is ``SandboxManager(base_url=..., bearer_token=...)`` (:mod:`corral.remote`).
"""

from .app import create_app
from .auth import TOKENS_ENV, Tenants
from .backend import OPERATIONS, Backend, TenantOps
from .settings import GatewaySettings
from .tenancy import TENANT_KEY

__all__ = ["create_app", "Tenants", "TOKENS_ENV", "GatewaySettings", "OPERATIONS", "Backend", "TenantOps",
           "TENANT_KEY"]
