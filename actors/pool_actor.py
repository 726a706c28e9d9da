"""PoolActor: one sandbox type's refills, health checks, resets, and every driver call for that type.

What it owns: a :class:`PoolCore` (starts in flight, target, and its view of
the registry's warm and waiting counts) and the driver instance that creates
and removes this type's containers. Records, and so which containers are WARM,
belong to the RegistryActor, which also serves acquires: the pool asks it for
a slot (``reserve``), reports each start (``started`` / ``start_failed``) and
reset (``reset_done``), and is sent the warm/waiting counts after they change
(``view``), from which it refills. It is never on an acquire's path.

Its event loop never blocks on a driver call: drivers are async (Docker runs
in threads) and refills run as background tasks bounded by a semaphore.
Detached, named, restarted forever; after a restart it asks the registry for
its counts again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from typing import Optional

import ray

from corral.client._http import tls_context
from corral.core.pool import PoolCore
from corral.core.stats import LatencyWindow
from corral.drivers import ContainerSpec, make_driver
from corral.errors import CapacityError, CorralError, DriverError, InvalidRequest
from corral.models import ContainerModel, SandboxManagerEnvConfig, check_env, labels_for

from .common import CONTROL_NICE, set_priority, REGISTRY_NAME, Ticker, fire
from .metrics import pool_metrics

__all__ = ["PoolActor"]

logger = logging.getLogger("corral.pool")
HEALTH_EVERY = 5.0
HEALTH_FAILURES = 3  # consecutive failed health checks before a warm container is dropped
DRAIN_TIMEOUT = 30.0
SHRINK_AFTER = 30.0
WARM_UP_TIMEOUT = 60.0  # seconds a new or reset sandbox's kernel may take to run its first cell


class PoolActor:
    """See the module docstring. ``acquire``/``create`` are the hot paths."""

    def __init__(self, config: dict, sandbox_type: str, max_parallel_starts: int = 4,
                 max_parallel_resets: int = 64) -> None:
        self.nice = set_priority(CONTROL_NICE)  # answers acquires and releases: ahead of the sandboxes
        self.config = SandboxManagerEnvConfig.model_validate(config)
        self.type = self.config.sandbox_type(sandbox_type)
        self.ns = self.config.namespace
        self.core = PoolCore(self.type.name, self.config.pool_target(self.type.name))
        self._starts = asyncio.Semaphore(max_parallel_starts)
        # A reset (a kernel forked from the box's fork server) costs a tenth of a start: more at once.
        # A burst of releases (an RL step's batch ending) must not queue here: a reset waiting its
        # turn is a warm sandbox the next acquire does not find; the boxes share the CPU anyway.
        self._resets = asyncio.Semaphore(max_parallel_resets)
        self.reset_ms = LatencyWindow()  # reset asked to reset done (WARM again), of the last successful resets
        self._boot_task: Optional[asyncio.Task] = None
        self._ticker: Optional[Ticker] = None
        self._health_due = 0.0
        self._retry_at = 0.0
        self._surplus_since: Optional[float] = None
        self._http = None
        self._storage = None
        self.metrics = pool_metrics(self.type.name)
        self.started_total = 0
        self.failed_total = 0
        self.draining = False
        self.dropped_total = 0
        self._health_fails: dict[str, int] = {}

    # -- boot ------------------------------------------------------------------

    async def _ready(self) -> None:
        if self._boot_task is None:
            self._boot_task = asyncio.ensure_future(self._boot())
        await asyncio.shield(self._boot_task)

    async def _boot(self) -> None:
        import httpx

        self.driver = make_driver(self.config.driver_config())
        self.registry = ray.get_actor(REGISTRY_NAME, namespace=self.ns)
        self._http = httpx.AsyncClient(timeout=5.0, trust_env=False, verify=tls_context(),
                                       limits=httpx.Limits(keepalive_expiry=30.0))
        for r in await self.registry.records.remote(self.type.name, ["RESETTING"]):
            # a reset cut off by our restart: we cannot know it finished, so the container goes
            rec = ContainerModel.model_validate(r)
            await self.registry.reset_done.remote(rec.container_name, False)
            fire(self.driver.remove(rec.container_id), "remove half-reset container")
        # our own handle with it: the registry then never looks us up by name on its event loop
        v = await self.registry.pool_view.remote(self.type.name, ray.get_runtime_context().current_actor)
        self.core.view(v["warm"], v["waiting"], v["claimed"], v["resetting"])
        self._ticker = Ticker(f"pool-{self.type.name}", 0.5, self._tick)
        self._ticker.start()

    @property
    def storage(self):
        if self._storage is None and (self.config.storage_folder or self.config.file_system == "oss"):
            from corral.storage import make_storage

            self._storage = make_storage(self.config)
        return self._storage

    async def _tick(self) -> None:
        if self.draining:
            return
        if time.monotonic() >= self._retry_at:
            for _ in range(self.core.deficit()):
                self.core.start_begun()
                fire(self._refill_one(), f"refill {self.type.name}")
        # Reused sandboxes come back above the target during a burst; keep them until the
        # surplus has lasted a while, or the next wave of acquires would start cold.
        if self.core.surplus() == 0:
            self._surplus_since = None
        elif self._surplus_since is None:
            self._surplus_since = time.monotonic()
        elif time.monotonic() - self._surplus_since > SHRINK_AFTER:
            fire(self.registry.drop_warm.remote(self.type.name, None, self.core.surplus()), "shrink pool")
            self._surplus_since = None
        if time.monotonic() >= self._health_due:
            self._health_due = time.monotonic() + HEALTH_EVERY
            await self._check_health()
        self.metrics.warm.set(self.core.warm)
        self.metrics.starting.set(self.core.starting)
        self.metrics.waiting.set(self.core.waiting)

    # -- starting containers ---------------------------------------------------

    async def _refill_one(self) -> None:
        ok = False
        try:
            # Never queue for a slot: a queued refill outlives the need that made it. At the limit
            # the registry kicks the pools when a slot frees, and the next tick tries again.
            rec = await self.registry.reserve.remote(self.type.name, wait=False)
            if rec is None:
                ok = True
                return
            rec = await self._start(ContainerModel.model_validate(rec), {})
            ok = True
            if self.draining:  # a start that finished after drain(): it goes, it does not refill
                fire(self.registry.drop_warm.remote(self.type.name, [rec.container_name]), "drop after drain")
        except CapacityError:
            ok = True
        except Exception as e:
            logger.warning("refill of %s failed: %s", self.type.name, e)
        finally:
            self.core.start_ended(ok)
            if not ok:
                self._retry_at = time.monotonic() + self.core.backoff()

    async def _start(self, rec: ContainerModel, environment: dict) -> ContainerModel:
        """Create the container of a STARTING record; on failure free its slot and raise."""
        name = rec.container_name
        try:
            async with self._starts:
                t0 = time.perf_counter()
                workspace = None
                if rec.mount_dir:
                    workspace = os.path.abspath(rec.mount_dir)
                    os.makedirs(workspace, exist_ok=True)
                    if rec.storage_path and self.storage is not None:
                        await self.storage.download_folder_async(rec.storage_path, workspace)
                spec = ContainerSpec(
                    name=name,
                    image=self.type.image,
                    token=rec.runtime_token,
                    labels=labels_for(rec, self.ns),
                    environment={**self.type.environment, **environment},
                    workspace=workspace,
                    readonly_mounts={os.path.abspath(h): c for h, c in (self.config.readonly_mounts or {}).items()},
                    cpus=self.type.cpus,
                    memory=self.type.memory,
                    pids_limit=self.type.pids_limit,
                    network_mode=self.type.network_mode,
                )
                handle = await self.driver.create(spec)
                try:
                    await self._warm_up(handle.url, rec.runtime_token)
                except BaseException:
                    await asyncio.shield(self.driver.remove(handle.container_id))
                    raise
                self.metrics.start_ms.observe((time.perf_counter() - t0) * 1000)
        except BaseException as e:
            self.failed_total += 1
            fire(self.registry.start_failed.remote(name), "start_failed")
            if isinstance(e, CorralError) or not isinstance(e, Exception):
                raise
            raise DriverError(f"could not start {name}: {type(e).__name__}: {e}") from None
        self.started_total += 1
        try:
            out = await self.registry.started.remote(name, handle.container_id, handle.url, handle.ports)
        except BaseException:
            fire(self.driver.remove(handle.container_id), "remove after failed registration")
            raise
        return ContainerModel.model_validate(out)

    # -- cold starts -----------------------------------------------------------

    async def create(self, session_ctx_id: Optional[str] = None, meta: Optional[dict] = None,
                     mount_dir: Optional[str] = None, storage_path: Optional[str] = None,
                     environment: Optional[dict] = None, restoring: bool = False,
                     timeout: Optional[float] = None) -> dict:
        """A new container (cold): for a mount dir, a restore, or a pool-less type. Waits for a slot."""
        await self._ready()
        env = check_env(environment)
        rec = await self.registry.reserve.remote(
            self.type.name, session_ctx_id, meta, mount_dir, storage_path, True, timeout
        )
        rec = await self._start(ContainerModel.model_validate(rec), env)
        return rec.model_dump(mode="json")

    # -- teardown, reset, health -----------------------------------------------

    async def teardown(self, record: dict, action: str, upload: bool) -> str:
        """Carry out a registry decision: 'destroy', 'recycle' (keep the workspace) or 'reset' (reuse)."""
        await self._ready()
        rec = ContainerModel.model_validate(record)
        name = rec.container_name
        if upload and self.storage is not None and rec.mount_dir and rec.storage_path:
            try:
                await self.storage.upload_folder_async(rec.mount_dir, rec.storage_path)
            except Exception as e:  # the container still goes; the failure is logged, not hidden
                logger.warning("upload of %s to %s failed: %s", name, rec.storage_path, e)
        if action == "reset":
            self.core.resetting += 1
            t0 = time.perf_counter()
            try:
                async with self._resets:
                    ok = await self._reset(rec)
                if ok:
                    self.reset_ms.add((time.perf_counter() - t0) * 1000)
                back = await self.registry.reset_done.remote(name, ok)
            finally:
                self.core.resetting -= 1
            if ok and back is not None:
                if self.draining:
                    fire(self.registry.drop_warm.remote(self.type.name, [name]), "drop after drain")
                return "reset"
            action = "destroy"
        if rec.container_id:
            await self.driver.remove(rec.container_id)
        if action == "destroy":
            self._remove_own_mount(rec)
        self._ticker.kick()
        return action

    async def teardown_many(self, items: list) -> int:
        """:meth:`teardown` for each ``(record, action, upload)``, in the background; returns how many."""
        await self._ready()
        for record, action, upload in items:
            fire(self.teardown(record, action, upload), f"teardown {record.get('container_name')}")
        return len(items)

    async def _warm_up(self, url: Optional[str], token: str) -> None:
        """A new sandbox is warm once its kernel has run a cell: the box answers health before its
        kernel is up, and a first start (an interpreter and its imports) is where a broken image or
        environment shows. A reset sandbox does not wait for this (see :meth:`_reset`)."""
        from corral.client import AsyncBoxClient

        if not url or not url.startswith("http"):
            return  # the fake driver has no box
        async with AsyncBoxClient(url, token, http_client=self._http) as box:
            r = await box.python("None", timeout=WARM_UP_TIMEOUT)
        if r.status != "ok":
            raise DriverError(f"the sandbox's Python kernel did not start: {r.status} {r.stderr[-300:]}")

    async def _reset(self, rec: ContainerModel) -> bool:
        from corral.client import AsyncBoxClient

        if not rec.url:
            return False
        try:
            async with AsyncBoxClient(rec.url, rec.runtime_token, http_client=self._http) as box:
                await box.reset(restart_kernel=self.type.kernel_reset == "restart")
            # Clean is enough to be WARM again: the old session's processes are dead and its files
            # gone, and the new kernel, forked from the box's fork server after that, boots while
            # the sandbox waits in the pool or while its next session starts (its first cell waits
            # for the boot; a failed boot is retried by that cell). Waiting for the boot here kept
            # a burst of resets out of the pool for seconds on a busy node.
            return True
        except Exception as e:
            logger.warning("reset of %s failed, destroying it: %s", rec.container_name, e)
            return False

    def _remove_own_mount(self, rec: ContainerModel) -> None:
        """Delete a workspace corral made under default_mount_dir (never a user's mount dir)."""
        if not rec.mount_dir or not self.config.default_mount_dir:
            return
        base = os.path.realpath(self.config.default_mount_dir)
        path = os.path.realpath(rec.mount_dir)
        if os.path.dirname(path) == base and os.path.basename(path) == rec.session_id:
            shutil.rmtree(path, ignore_errors=True)

    async def _check_health(self) -> None:
        """Drop warm containers whose box has failed HEALTH_FAILURES checks in a row.

        One slow answer is not death: on a loaded machine, dropping a box at the first
        timeout starts a replacement, which adds load, which fails more checks.
        """
        recs = [ContainerModel.model_validate(r)
                for r in await self.registry.records.remote(self.type.name, ["WARM"])]
        results = await asyncio.gather(*(self._healthy(r) for r in recs))
        self._health_fails = {r.container_name: self._health_fails.get(r.container_name, 0)
                              for r in recs}  # forget the ones no longer warm
        sick = []
        for rec, ok in zip(recs, results):
            name = rec.container_name
            if ok:
                self._health_fails.pop(name, None)
                continue
            self._health_fails[name] += 1
            if self._health_fails[name] >= HEALTH_FAILURES:
                sick.append(name)
        if sick:
            dropped = await self.registry.drop_warm.remote(self.type.name, sick)
            for name in dropped:
                self._health_fails.pop(name, None)
                self.dropped_total += 1
                logger.warning("warm container %s failed %d health checks; replacing it", name, HEALTH_FAILURES)

    async def _healthy(self, rec: ContainerModel) -> bool:
        if rec.url and rec.url.startswith("http"):
            try:
                r = await self._http.get(f"{rec.url}/v1/healthz",
                                         headers={"Authorization": f"Bearer {rec.runtime_token}"}, timeout=5.0)
                return r.status_code == 200
            except Exception:
                return False
        if rec.container_id:
            return (await self.driver.status(rec.container_id)) == "running"
        return False

    # -- control ---------------------------------------------------------------

    async def reserve(self, n: int) -> dict:
        """Grow the warm target by ``n`` ahead of a burst (consumed as acquires take them)."""
        await self._ready()
        self.core.reserve(n)
        self._ticker.kick()
        return self.core.stats()

    async def set_target(self, n: int) -> dict:
        await self._ready()
        self.draining = False
        self.core.set_target(n)
        self._ticker.kick()
        return self.core.stats()

    async def wait_warm(self, n: Optional[int] = None, timeout: float = 120.0) -> dict:
        """Return once ``n`` (default: the target) containers are warm; CapacityError on timeout."""
        await self._ready()
        n = self.core.target if n is None else n
        deadline = time.monotonic() + timeout
        while self.core.warm < n:
            if time.monotonic() > deadline:
                raise CapacityError(f"pool {self.type.name!r}: {self.core.warm} of {n} warm after {timeout:.0f}s")
            self._ticker.kick()
            await asyncio.sleep(0.05)
        return self.core.stats()

    async def view(self, warm: int, waiting: int, claimed: int, resetting: int = 0) -> None:
        """The registry's warm/waiting/claimed/resetting counts of this type changed: refill from them."""
        self.core.view(warm, waiting, claimed, resetting)
        self.metrics.warm.set(warm)
        self.metrics.waiting.set(waiting)
        if self._ticker is not None and self.core.deficit():
            self._ticker.kick()

    async def kick(self) -> None:
        """A slot freed up (the registry says): refill now rather than at the next tick."""
        if self._ticker is not None and self.core.deficit():
            self._ticker.kick()

    async def drain(self) -> dict:
        """Stop refilling: the first step of shutting a namespace down (the registry's cleanup
        then fails the acquirers still waiting)."""
        await self._ready()
        self.draining = True
        self.core.set_target(0)
        self.core.extra = 0
        # (4) starts in flight finish first, so whoever tears the namespace down sees their containers
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.core.starting and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.core.stats()

    async def undrain(self) -> dict:
        await self._ready()
        self.draining = False
        self.core.set_target(self.config.pool_target(self.type.name))
        self._ticker.kick()
        return self.core.stats()

    async def container_op(self, op: str, container_id: Optional[str], name: Optional[str] = None) -> str:
        """The reference's start / stop / get_status on one container; returns its status after."""
        await self._ready()
        if op not in ("start", "stop", "status"):
            raise InvalidRequest(f"unknown container operation {op!r}")
        if not container_id:
            return "missing"
        if op == "start":
            await self.driver.start(container_id)
            h = await self.driver.inspect(container_id)
            if h is not None and name:  # a restarted container may answer on a new port
                await self.registry.moved.remote(name, h.url, h.ports)
        elif op == "stop":
            await self.driver.stop(container_id)
        return await self.driver.status(container_id)

    async def stats(self) -> dict:
        await self._ready()
        return {**self.core.stats(), "started_total": self.started_total, "failed_total": self.failed_total,
                "dropped_unhealthy": self.dropped_total, "tick_errors": self._ticker.errors, "nice": self.nice,
                "pid": os.getpid(), "reset_ms": self.reset_ms.summary()}
