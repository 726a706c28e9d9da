"""The one driver protocol: how corral starts and stops a sandbox's container.

A driver owns nothing but the backend's view of containers: it keeps no
records (the registry does). Every method is async and must never block the
caller's event loop (blocking backends run in a thread). ``remove`` and
``stop`` are idempotent: removing what is already gone is not an error.

Status strings are the reference's: ``"running"``, ``"exited"``, ``"created"``,
and corral's ``"missing"`` for a container the backend does not know.
"""

from __future__ import annotations

import abc
import asyncio
from typing import AsyncIterator, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .netpolicy import NetworkMode, check_network

__all__ = ["ContainerSpec", "ContainerHandle", "Driver", "BOX_PORT"]

#: The port the box listens on inside a container.
BOX_PORT = 8000


class ContainerSpec(BaseModel):
    """Everything a driver needs to start one sandbox."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique container name (the record's container_name).")
    image: str = Field("corral-box:latest", description="Image (Docker); the process driver ignores it.")
    token: str = Field(description="The box's bearer token; drivers hand it to the box on its stdin, never in its environment.")
    labels: dict[str, str] = Field(default_factory=dict)
    environment: dict[str, str] = Field(default_factory=dict)
    workspace: Optional[str] = Field(None, description="Host directory mounted read-write at /workspace.")
    readonly_mounts: dict[str, str] = Field(default_factory=dict, description="host path -> container path, read-only.")
    cpus: Optional[float] = None
    memory: Optional[str] = None
    pids_limit: Optional[int] = None
    network: NetworkMode = Field("egress", description=(
        "What the sandbox may reach: 'none', 'egress' (anything outside the blocked ranges) or 'allowlist' "
        "(only `allow`). In every mode it reaches neither other sandboxes nor its host (docker driver)."))
    allow: list[str] = Field(default_factory=list, description="CIDRs or host names (resolved at start) for 'allowlist'.")
    host: Optional[str] = Field(None, description=(
        "The address the box is published on (Docker) or listens at (process), and reached at: the node's "
        "address when other nodes must reach it; None: the driver's default, 127.0.0.1."))
    ready_timeout: float = Field(60.0, description="Seconds to wait for the box's health route.")

    @model_validator(mode="after")
    def _network_ok(self) -> "ContainerSpec":
        check_network(self.network, self.allow)
        return self


class ContainerHandle(BaseModel):
    """The backend's view of one container."""

    container_id: str
    name: str
    url: Optional[str] = None  # http://127.0.0.1:<port>, the box's base URL
    ports: list[int] = Field(default_factory=list)
    status: str = "running"
    labels: dict[str, str] = Field(default_factory=dict)
    image: Optional[str] = None


class Driver(abc.ABC):
    """Starts, stops and lists containers. Implementations: process, docker."""

    name: str = "abstract"

    @abc.abstractmethod
    async def create(self, spec: ContainerSpec) -> ContainerHandle:
        """Start a container and return when its box answers ``/healthz``.

        On failure nothing is left behind (the half-made container is removed)
        and a :class:`corral.DriverError` is raised.
        """

    @abc.abstractmethod
    async def start(self, container_id: str, token: Optional[str] = None) -> None:
        """Start a stopped container (no-op when running) with ``token`` as its box's token.

        A started box reads its token once and nothing keeps a copy the sandbox
        could read, so a driver may need it again here: the docker driver
        requires it for a stopped container; the process driver falls back to
        the one in its metadata.
        """

    @abc.abstractmethod
    async def stop(self, container_id: str, timeout: float = 1.0) -> None:
        """Stop a container (idempotent)."""

    @abc.abstractmethod
    async def remove(self, container_id: str) -> None:
        """Stop and delete a container (idempotent: gone is fine)."""

    @abc.abstractmethod
    async def status(self, container_id: str) -> str:
        """'running', 'exited', 'created', ... or 'missing'."""

    @abc.abstractmethod
    async def inspect(self, container_id: str) -> Optional[ContainerHandle]:
        """The container's handle, or None when the backend does not know it."""

    @abc.abstractmethod
    async def list(self, labels: dict[str, str]) -> list[ContainerHandle]:
        """Every container carrying all of ``labels`` (running or not)."""

    async def events(self, labels: dict[str, str], every: float = 1.0) -> AsyncIterator[str]:
        """Names (the ``corral.name`` label, else the container name) of containers carrying
        ``labels`` that stop running, as the backend notices. Runs until cancelled; raises when
        the backend cannot be watched any more (the caller restarts it).

        This default compares :meth:`list` every ``every`` seconds; a driver whose backend sends
        events (Docker) overrides it."""
        running: Optional[set[str]] = None
        while True:
            now = {h.labels.get("corral.name") or h.name for h in await self.list(labels) if h.status == "running"}
            if running is not None:
                for name in sorted(running - now):
                    yield name
            running = now
            await asyncio.sleep(every)

    async def teardown_network(self) -> None:
        """Remove what the driver set up on this node for its sandboxes' network (idempotent).

        For ``corral down``, after every sandbox is gone. Drivers without a
        network of their own have nothing to remove.
        """

    async def reconcile_network(self) -> int:
        """Put back whatever this node's network policy lost (e.g. to a firewall reload); returns how
        many sandboxes got their rule back. For a periodic tick; nothing to do without a policy."""
        return 0

    async def close(self) -> None:
        """Release client resources (not containers)."""
