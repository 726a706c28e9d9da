"""The fake driver: containers as dict entries, for unit tests of the cores and shells.

No box runs behind a fake container (its url is ``fake://<name>``). Failures
can be injected (``fail_creates``) to test the paths that handle them. Never
used in place of a feature: only tests pick it.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Optional

from corral.errors import Conflict, DriverError

from .base import ContainerHandle, ContainerSpec, Driver
from .config import FakeDriverConfig

__all__ = ["FakeDriver"]


class FakeDriver(Driver):
    """Owns an in-memory table of containers; every call is instant unless ``delay`` is set."""

    name = "fake"

    def __init__(self, config: Optional[FakeDriverConfig] = None, delay: float = 0.0) -> None:
        self.config = config or FakeDriverConfig()
        self.containers: dict[str, ContainerHandle] = {}
        self.delay = delay
        self.fail_creates = 0
        self.calls: list[tuple[str, str]] = []
        self._ports = itertools.count(20000)

    async def _tick(self, op: str, name: str) -> None:
        self.calls.append((op, name))
        if self.delay:
            await asyncio.sleep(self.delay)

    async def create(self, spec: ContainerSpec) -> ContainerHandle:
        await self._tick("create", spec.name)
        if spec.name in self.containers:
            raise Conflict(f"container {spec.name} already exists")
        if self.fail_creates > 0:
            self.fail_creates -= 1
            raise DriverError(f"injected create failure for {spec.name}")
        port = next(self._ports)
        h = ContainerHandle(
            container_id=f"fake-{spec.name}", name=spec.name, url=f"fake://{spec.name}", ports=[port],
            status="running", labels={**spec.labels, "corral.managed": "true"}, image=spec.image,
        )
        self.containers[h.container_id] = h
        return h

    def _get(self, container_id: str) -> Optional[ContainerHandle]:
        h = self.containers.get(container_id)
        if h is None:
            h = next((c for c in self.containers.values() if c.name == container_id), None)
        return h

    async def start(self, container_id: str, token: Optional[str] = None) -> None:
        await self._tick("start", container_id)
        h = self._get(container_id)
        if h is None:
            raise DriverError(f"no such container {container_id}")
        h.status = "running"

    async def stop(self, container_id: str, timeout: float = 1.0) -> None:
        await self._tick("stop", container_id)
        h = self._get(container_id)
        if h is not None:
            h.status = "exited"

    async def remove(self, container_id: str) -> None:
        await self._tick("remove", container_id)
        h = self._get(container_id)
        if h is not None:
            self.containers.pop(h.container_id, None)

    async def status(self, container_id: str) -> str:
        h = self._get(container_id)
        return h.status if h else "missing"

    async def inspect(self, container_id: str) -> Optional[ContainerHandle]:
        return self._get(container_id)

    async def list(self, labels: dict[str, str]) -> list[ContainerHandle]:
        return [h for h in self.containers.values() if all(h.labels.get(k) == v for k, v in labels.items())]
