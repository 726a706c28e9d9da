"""PoolActor: one sandbox type's driver work on one node, as the registry commands it.

What it owns: the driver instance of its node (the process driver there, or
that node's Docker engine), the starts it is carrying out and the outcomes of
those it finished (a :class:`~corral.core.startlog.StartLog`, so a registry
that restarted mid-start can ask for them: :meth:`in_flight`, :meth:`collect`),
the engine's reports of containers that stopped (an
:class:`~actors.engine_watch.EngineWatch`, read by :meth:`watch`), its
sandboxes' workspaces (:class:`~actors.workspaces.Workspaces`), its HTTP
client to their boxes (:class:`~actors.boxes.Boxes`), and its counters. It owns no record and makes no decision: the RegistryActor decides
what to start, reset, tear down or probe, calls these methods, and learns the
outcome from their return values. A pool never calls the registry.

One PoolActor per (sandbox type, node), pinned to its node
(``NodeAffinitySchedulingStrategy``), detached and restarted by Ray while the
node lives. Its event loop never blocks on a driver call: drivers are async
(docker-py runs in threads).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Optional

import ray

from corral.core.startlog import StartLog
from corral.core.stats import LatencyWindow
from corral.drivers import ContainerSpec, make_driver
from corral.errors import CorralError, InvalidRequest, SandboxError
from corral.models import LABEL_MANAGED, LABEL_NODE, LABEL_OWNER, LABEL_REGISTRY, ContainerModel, SandboxManagerEnvConfig

from .boxes import Boxes
from .common import CONTROL_NICE, set_priority
from .engine_watch import EngineWatch
from .metrics import pool_metrics
from .workspaces import Workspaces

__all__ = ["PoolActor"]

logger = logging.getLogger("corral.pool")
#: Removals at once: a removal competes with starts for the engine and the CPU; it is never urgent.
MAX_REMOVALS = 2


def node_driver_config(config: SandboxManagerEnvConfig, address: str):
    """The driver config of the node at ``address``. The process driver keeps each node's boxes in a
    directory of their own: nodes that share a file system (several on one machine) never list each
    other's. Keyed by address, not node id: a machine keeps its address when Ray restarts."""
    cfg = config.driver_config()
    if cfg.type == "process":
        cfg = cfg.model_copy(update={"root": os.path.join(cfg.root, address or "local")})
    return cfg


def _error(e: BaseException) -> dict:
    if isinstance(e, CorralError):
        return e.to_dict()
    return {"code": "driver_error", "message": f"{type(e).__name__}: {e}"}


class PoolActor:
    """See the module docstring. Every method is safe to call again with the same arguments."""

    def __init__(self, config: dict, sandbox_type: str, node_id: str, owner: str, address: str) -> None:
        self.nice = set_priority(CONTROL_NICE)  # its starts and resets answer acquires: ahead of the sandboxes
        self.config = SandboxManagerEnvConfig.model_validate(config)
        self.type = sandbox_type
        self.node = node_id
        self.address = address
        self.owner = owner
        self.ns = self.config.namespace
        self.driver = make_driver(node_driver_config(self.config, address))
        self._starting: dict[str, asyncio.Future] = {}
        self.log = StartLog()
        self._removals = asyncio.Semaphore(MAX_REMOVALS)
        self.engine = EngineWatch(self.driver, self._labels(), self._ours, node_id)
        self.workspaces = Workspaces(self.config)
        self.boxes = Boxes()
        self.reset_ms = LatencyWindow()
        self.start_ms = LatencyWindow()
        self.metrics = pool_metrics(sandbox_type)
        self.counters = {"started": 0, "start_failed": 0, "reset": 0, "reset_failed": 0, "removed": 0}

    # -- plumbing ----------------------------------------------------------------

    def _labels(self) -> dict:
        return {LABEL_MANAGED: "true", LABEL_REGISTRY: self.ns}

    def _ours(self, labels: dict) -> bool:
        """A container of this registry instance (one carrying no owner label predates owners), made
        for this node (a node whose engine is shared lists only its own)."""
        return labels.get(LABEL_OWNER, self.owner) == self.owner and labels.get(LABEL_NODE) in (None, "", self.address)

    # -- starts ------------------------------------------------------------------

    async def start(self, items: list[dict]) -> list[dict]:
        """Start the sandbox of each STARTING record; one outcome per item, in order:
        ``{"name", "ok": True, "container_id", "url", "ports"}`` or ``{"name", "ok": False, "error"}``.

        An item: ``{"record", "spec"}`` (the ContainerSpec fields the registry chose: image,
        environment, limits, labels) and ``"download"``: None (a new workspace), "optional" (bring
        what storage holds, if anything) or "expected" (the workspace was synced: a download that
        does not find all of it fails the start and says what is missing)."""
        futs = []
        for item in items:
            name = item["record"]["container_name"]
            fut = self._starting.get(name)
            if fut is None:
                fut = asyncio.ensure_future(self._start(item))
                self._starting[name] = fut
                fut.add_done_callback(lambda f, n=name: self._finished(n, f))
            futs.append(fut)
        return list(await asyncio.gather(*(asyncio.shield(f) for f in futs)))

    def _finished(self, name: str, fut: asyncio.Future) -> None:
        self._starting.pop(name, None)
        if not fut.cancelled():
            self.log.finished(name, fut.result(), time.monotonic())

    async def _start(self, item: dict) -> dict:
        rec = ContainerModel.model_validate(item["record"])
        name = rec.container_name
        t0 = time.perf_counter()
        try:
            workspace = await self.workspaces.prepare(rec, item.get("download"))
            spec = ContainerSpec(**{**item["spec"], "name": name, "token": rec.runtime_token, "workspace": workspace})
            # Warm as soon as its box answers: the box answers only once a kernel can run in it (its
            # fork server is up), so a broken image or environment fails here. No kernel boots: the
            # first cell starts one, and a session that runs only shell commands never pays for it.
            handle = await self.driver.create(spec)
        except Exception as e:
            self.counters["start_failed"] += 1
            logger.warning("start of %s on %s failed: %s", name, self.node[:8], e)
            return {"name": name, "ok": False, "error": _error(e)}
        ms = (time.perf_counter() - t0) * 1000
        self.start_ms.add(ms)
        self.metrics.start_ms.observe(ms)
        self.counters["started"] += 1
        return {"name": name, "ok": True, "container_id": handle.container_id, "url": handle.url,
                "ports": list(handle.ports)}

    async def in_flight(self) -> list[str]:
        """Names of the starts under way, and of those finished in the last minutes."""
        return sorted(set(self._starting) | set(self.log.names()))

    async def collect(self, names: list[str]) -> list[dict]:
        """The outcome of each named start (waiting for those under way). A name this pool never
        started, or whose outcome it no longer keeps, is reported failed."""
        out = []
        for name in names:
            fut = self._starting.get(name)
            out.append(await asyncio.shield(fut) if fut is not None else self.log.outcome(name))
        return out

    # -- resets ------------------------------------------------------------------

    async def reset(self, items: list[dict]) -> list[dict]:
        """Wipe each released sandbox for reuse and give its box the next token:
        ``{"record", "token", "restart_kernel"}`` -> ``{"name", "ok"}``. A failed reset is reported,
        and the registry then tears the sandbox down."""
        return list(await asyncio.gather(*(self._reset(item) for item in items)))

    async def _reset(self, item: dict) -> dict:
        rec = ContainerModel.model_validate(item["record"])
        t0 = time.perf_counter()
        try:
            if item.get("upload"):
                await self.workspaces.upload(rec)
            await self.boxes.reset(rec, item.get("restart_kernel", True), item["token"])
        except Exception as e:
            self.counters["reset_failed"] += 1
            logger.warning("reset of %s failed: %s", rec.container_name, e)
            return {"name": rec.container_name, "ok": False, "error": _error(e)}
        self.counters["reset"] += 1
        self.reset_ms.add((time.perf_counter() - t0) * 1000)
        return {"name": rec.container_name, "ok": True}

    # -- teardowns ---------------------------------------------------------------

    async def teardown(self, items: list[dict]) -> list[dict]:
        """Remove each sandbox (``{"record", "action": "destroy"|"recycle", "upload"}``), uploading
        its workspace first when asked; ``{"name", "ok", "synced_at", "storage_error"}`` each.
        A workspace is never deleted before its upload is confirmed."""
        return list(await asyncio.gather(*(self._teardown(item) for item in items)))

    async def _teardown(self, item: dict) -> dict:
        rec = ContainerModel.model_validate(item["record"])
        out: dict[str, Any] = {"name": rec.container_name, "ok": True, "synced_at": None, "storage_error": None}
        if item.get("upload"):
            out["synced_at"], out["storage_error"] = await self.workspaces.sync(rec)
        keep_workspace = item["action"] == "recycle" or out["storage_error"] is not None
        if rec.container_id:
            try:
                async with self._removals:
                    await self.driver.remove(rec.container_id)
                self.counters["removed"] += 1
            except Exception as e:
                out["ok"] = False
                out["error"] = _error(e)
        if not keep_workspace:
            self.workspaces.remove_own(rec)
        return out

    async def remove(self, container_ids: list[str]) -> int:
        """Remove containers by id (orphans a reconciliation found). Idempotent."""
        n = 0
        for cid in container_ids:
            async with self._removals:
                await self.driver.remove(cid)
            n += 1
        self.counters["removed"] += n
        return n

    # -- observing ---------------------------------------------------------------

    async def list(self) -> list[dict]:
        """Every container of this registry instance on this node, any type."""
        return [h.model_dump() for h in await self.driver.list(self._labels()) if self._ours(h.labels)]

    async def probe(self, records: list[dict]) -> dict[str, bool]:
        """Whether each warm sandbox's box answers its health route (a batch the registry chose;
        at most ``MAX_PROBES`` of them at once, see :class:`~actors.boxes.Boxes`)."""
        recs = [ContainerModel.model_validate(r) for r in records]
        results = await asyncio.gather(*(self.boxes.healthy(r) for r in recs))
        return {r.container_name: ok for r, ok in zip(recs, results)}

    async def watch(self, timeout: float = 30.0) -> list[str]:
        """Names of this node's sandboxes the engine reported stopped since the last call, waiting
        up to ``timeout`` seconds for one (a long poll the registry keeps open)."""
        return await self.engine.wait(timeout)

    async def container_op(self, op: str, container_id: Optional[str], token: Optional[str] = None) -> dict:
        """The reference's start / stop / get_status on one container: its status (and where its
        box answers) afterwards."""
        if op not in ("start", "stop", "status"):
            raise InvalidRequest(f"unknown container operation {op!r}")
        if not container_id:
            return {"status": "missing"}
        if op == "start":
            await self.driver.start(container_id, token=token)
        elif op == "stop":
            await self.driver.stop(container_id)
        h = await self.driver.inspect(container_id)
        if h is None:
            return {"status": "missing"}
        return {"status": h.status, "url": h.url, "ports": list(h.ports)}

    async def reconcile_network(self) -> int:
        """Put back the node's network rules a firewall reload removed; how many sandboxes got theirs."""
        return await self.driver.reconcile_network()

    async def teardown_node(self) -> dict:
        """What the node holds for this namespace beyond containers (networks, filter rules) goes:
        the last step of ``corral down``."""
        close = getattr(self.driver, "teardown_network", None)
        if close is not None:
            await close()
        return {"node": self.node}

    async def stats(self) -> dict:
        return {"sandbox_type": self.type, "node": self.node, "pid": os.getpid(), "nice": self.nice,
                "starting": len(self._starting), "reset_ms": self.reset_ms.summary(),
                "start_ms": self.start_ms.summary(), **self.counters}

    async def ping(self) -> str:
        if not ray.is_initialized():
            raise SandboxError("not in Ray")
        return "ok"
