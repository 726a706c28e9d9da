"""PoolActor: one sandbox type's driver work on one node, as the registry commands it.

What it owns: the driver instance of its node (the process driver there, or
that node's Docker engine), the starts it is carrying out (so a registry that
restarted mid-start can ask for them: :meth:`in_flight`, :meth:`collect`),
the engine's reports of containers that stopped (:meth:`watch`), and its
counters. It owns no record and makes no decision: the RegistryActor decides
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
import shutil
import time
from typing import Any, Optional

import ray

from corral.client._http import tls_context
from corral.core.stats import LatencyWindow
from corral.drivers import ContainerSpec, make_driver
from corral.errors import CorralError, InvalidRequest, SandboxError
from corral.models import LABEL_MANAGED, LABEL_NODE, LABEL_OWNER, LABEL_REGISTRY, ContainerModel, SandboxManagerEnvConfig

from .common import CONTROL_NICE, Ticker, fire, set_priority
from .metrics import pool_metrics

__all__ = ["PoolActor"]

logger = logging.getLogger("corral.pool")
#: Seconds a finished start's outcome is kept for a registry that restarted meanwhile.
KEEP_RESULTS = 120.0
#: Removals at once: a removal competes with starts for the engine and the CPU; it is never urgent.
MAX_REMOVALS = 2
#: Seconds between checks that the boxes of this node are alive, where the engine sends no events.
ALIVE_EVERY = 1.0


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
        self._results: dict[str, tuple[float, dict]] = {}
        self._removals = asyncio.Semaphore(MAX_REMOVALS)
        self._dead: set[str] = set()  # container names the engine says stopped, not yet reported
        self._dead_event = asyncio.Event()
        self._watcher: Optional[asyncio.Task] = None
        self._http = None
        self._storage = None
        self.reset_ms = LatencyWindow()
        self.start_ms = LatencyWindow()
        self.metrics = pool_metrics(sandbox_type)
        self.counters = {"started": 0, "start_failed": 0, "reset": 0, "reset_failed": 0, "removed": 0}

    # -- plumbing ----------------------------------------------------------------

    def _client(self):
        if self._http is None:
            import httpx

            self._http = httpx.AsyncClient(timeout=5.0, trust_env=False, verify=tls_context(),
                                           limits=httpx.Limits(keepalive_expiry=30.0))
        return self._http

    @property
    def storage(self):
        if self._storage is None and (self.config.storage_folder or self.config.file_system == "oss"):
            from corral.storage import make_storage

            self._storage = make_storage(self.config)
        return self._storage

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
            self._results[name] = (time.monotonic(), fut.result())
        cutoff = time.monotonic() - KEEP_RESULTS
        for n in [n for n, (t, _) in self._results.items() if t < cutoff]:
            del self._results[n]

    async def _start(self, item: dict) -> dict:
        rec = ContainerModel.model_validate(item["record"])
        name = rec.container_name
        t0 = time.perf_counter()
        try:
            workspace = None
            if rec.mount_dir:
                workspace = os.path.abspath(rec.mount_dir)
                os.makedirs(workspace, exist_ok=True)
                download = item.get("download")
                if download and rec.storage_path and self.storage is not None:
                    await self.storage.download_folder_async(rec.storage_path, workspace,
                                                             expect=download == "expected")
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
        return sorted(set(self._starting) | set(self._results))

    async def collect(self, names: list[str]) -> list[dict]:
        """The outcome of each named start (waiting for those under way). A name this pool never
        started, or whose outcome it no longer keeps, is reported failed."""
        out = []
        for name in names:
            fut = self._starting.get(name)
            if fut is not None:
                out.append(await asyncio.shield(fut))
            elif name in self._results:
                out.append(self._results[name][1])
            else:
                out.append({"name": name, "ok": False, "error": {"code": "driver_error",
                                                                 "message": "no start of it is known here"}})
        return out

    # -- resets ------------------------------------------------------------------

    async def reset(self, items: list[dict]) -> list[dict]:
        """Wipe each released sandbox for reuse and give its box the next token:
        ``{"record", "token", "restart_kernel"}`` -> ``{"name", "ok"}``. A failed reset is reported,
        and the registry then tears the sandbox down."""
        return list(await asyncio.gather(*(self._reset(item) for item in items)))

    async def _reset(self, item: dict) -> dict:
        from corral.client import AsyncBoxClient

        rec = ContainerModel.model_validate(item["record"])
        t0 = time.perf_counter()
        try:
            if rec.mount_dir and item.get("upload") and self.storage is not None and rec.storage_path:
                await self.storage.upload_folder_async(rec.mount_dir, rec.storage_path)
            async with AsyncBoxClient(rec.url, rec.runtime_token, http_client=self._client()) as box:
                # Clean is enough to be WARM again: the old session's processes are dead and its
                # files gone, and the new kernel, forked after that, boots while the sandbox waits
                # in the pool (the next session's first cell waits for the boot if needed).
                await box.reset(restart_kernel=item.get("restart_kernel", True), token=item["token"])
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
        keep_workspace = item["action"] == "recycle"
        if item.get("upload") and self.storage is not None and rec.mount_dir and rec.storage_path:
            try:
                await self.storage.upload_folder_async(rec.mount_dir, rec.storage_path)
                out["synced_at"] = time.time()
            except Exception as e:  # the container still goes; the workspace stays on disk
                out["storage_error"] = f"upload to {rec.storage_path} failed: {e}"
                keep_workspace = True
                logger.warning("upload of %s failed: %s", rec.container_name, e)
        if rec.container_id:
            try:
                async with self._removals:
                    await self.driver.remove(rec.container_id)
                self.counters["removed"] += 1
            except Exception as e:
                out["ok"] = False
                out["error"] = _error(e)
        if not keep_workspace:
            self._remove_own_mount(rec)
        return out

    def _remove_own_mount(self, rec: ContainerModel) -> None:
        """Delete a workspace corral made under default_mount_dir (never a user's mount dir)."""
        if not rec.mount_dir or not self.config.default_mount_dir:
            return
        base = os.path.realpath(self.config.default_mount_dir)
        path = os.path.realpath(rec.mount_dir)
        if os.path.dirname(path) == base and os.path.basename(path) == rec.session_id:
            shutil.rmtree(path, ignore_errors=True)

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
        """Whether each warm sandbox's box answers its health route."""
        recs = [ContainerModel.model_validate(r) for r in records]
        results = await asyncio.gather(*(self._healthy(r) for r in recs))
        return {r.container_name: ok for r, ok in zip(recs, results)}

    async def _healthy(self, rec: ContainerModel) -> bool:
        if not rec.url:
            return False
        try:
            r = await self._client().get(f"{rec.url}/v1/healthz",
                                         headers={"Authorization": f"Bearer {rec.runtime_token}"}, timeout=5.0)
            return r.status_code == 200
        except Exception:
            return False

    async def watch(self, timeout: float = 30.0) -> list[str]:
        """Names of this node's sandboxes the engine reported stopped since the last call, waiting
        up to ``timeout`` seconds for one (a long poll the registry keeps open)."""
        if self._watcher is None or self._watcher.done():
            self._watcher = fire(self._watch_engine(), f"watch {self.node[:8]}")
        if not self._dead:
            self._dead_event.clear()
            try:
                await asyncio.wait_for(self._dead_event.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        dead, self._dead = sorted(self._dead), set()
        return dead

    async def _watch_engine(self) -> None:
        """Feed :meth:`watch` from the driver's event stream, restarting it if it breaks (an engine
        restart): after a break, every container found not running is reported too."""
        while True:
            try:
                async for name in self.driver.events(self._labels()):
                    self._report_dead([name])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                logger.info("event stream of %s broke (%s); checking every container", self.node[:8], e)
            await asyncio.sleep(ALIVE_EVERY)
            try:
                self._report_dead([h.labels.get("corral.name") or h.name for h in await self.driver.list(self._labels())
                                   if h.status != "running" and self._ours(h.labels)])
            except Exception:
                pass  # the engine is still away: try again after the next break

    def _report_dead(self, names: list[str]) -> None:
        if names:
            self._dead.update(names)
            self._dead_event.set()

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
