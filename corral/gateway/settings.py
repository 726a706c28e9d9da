"""The gateway's limits and options (one pydantic model; unknown fields are errors)."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["GatewaySettings"]


class GatewaySettings(BaseModel):
    """What one gateway allows: body sizes, how long a request may take, host paths.

    The defaults suit a data plane for RL rollouts and agents: an operation's
    arguments are small, an upload may be large, a command may run for an hour.
    """

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(8 << 20, gt=0, description="largest body of a POST /<operation> (413 beyond)")
    max_upload_bytes: int = Field(1 << 30, gt=0, description="largest body sent to a box through /proxy (413 beyond)")
    body_timeout: float = Field(30.0, gt=0, description="seconds a request body may pause between two chunks (408)")
    request_timeout: float = Field(
        3600.0, gt=0, description="seconds a whole request may take, a streamed answer included (504, or closed)"
    )
    proxy_connect_timeout: float = Field(10.0, gt=0, description="seconds to connect to a box")
    proxy_read_timeout: float = Field(
        3600.0, gt=0, description="seconds a box may stay silent during one proxied request (a long command)"
    )
    proxy_route_ttl: float = Field(
        2.0, ge=0, description="seconds a /proxy request may reuse a sandbox's looked-up address and token "
        "(0: look up every request); a box that refuses the token or does not take the connection "
        "makes the gateway look again at once"
    )
    allow_host_paths: bool = Field(
        False, description="accept create(mount_dir=..., storage_path=...) from tenants (host paths: trusted tenants only)"
    )
    # Server-level limits (uvicorn), used where the gateway runs a server itself.
    limit_concurrency: Optional[int] = Field(
        2048, gt=0, description="connections plus requests in flight before new ones get 503"
    )
    keep_alive_timeout: float = Field(30.0, gt=0, description="seconds an idle client connection stays open")
