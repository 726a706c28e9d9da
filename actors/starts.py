"""Starts: the sandboxes the registry has asked pools to start, and what came back.

What it owns: the names of starts sent and not yet answered (a reconciliation must not take them
for orphans; a drain waits until there are none: :attr:`idle`), the futures of callers waiting for
a particular start (a cold create, a restore) and their per-call environments. It turns STARTING
records into one ``start`` call per pool, and each outcome into a transition of the registry's
core (``started``, ``start_failed``), after which sandboxes that turned warm go to the callers
waiting for one. Part of the RegistryActor (``reg``), split out by concern; it runs on the
registry's event loop.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Optional

from corral.errors import DriverError, SandboxGone, error_class
from corral.models import ContainerModel, ContainerState, labels_for

from .common import fire
from .handles import ActorGone, PoolHandle

if TYPE_CHECKING:
    from .registry_actor import RegistryActor

__all__ = ["Starts"]

S = ContainerState


class Starts:
    """See the module docstring."""

    def __init__(self, reg: "RegistryActor") -> None:
        self.reg = reg
        self.dispatched: set[str] = set()  # sent to a pool, outcome not yet back
        self.idle = asyncio.Event()  # set while nothing is dispatched
        self.idle.set()
        self._futs: dict[str, asyncio.Future] = {}  # starts a caller awaits (create, restore)
        self._env: dict[str, dict] = {}  # per-call environment of such starts

    def spec(self, rec: ContainerModel) -> dict:
        """The ContainerSpec fields of a record's sandbox: its type's, and where it is published."""
        reg = self.reg
        t = reg.config.sandbox_type(rec.sandbox_type)
        env = {**t.environment, **self._env.pop(rec.container_name, {})}
        return {"image": t.image, "labels": labels_for(rec, reg.ns, reg.owner), "environment": env,
                "host": reg.nodes.advertise(reg.core.node_of(rec)),
                "readonly_mounts": {os.path.abspath(h): c for h, c in (reg.config.readonly_mounts or {}).items()},
                "cpus": t.cpus, "memory": t.memory, "pids_limit": t.pids_limit, "network": t.network,
                "allow": list(t.allow)}

    def dispatch(self, recs: list[ContainerModel], download: Optional[str] = None) -> None:
        """Send STARTING records to the pools of their type and node, one call per pool.
        ``download``: "expected" when their workspaces were synced before (see PoolActor.start);
        otherwise whatever storage holds for them is brought in, as the reference does."""
        groups: dict[tuple, list[dict]] = {}
        for rec in recs:
            item = {"record": rec.model_dump(mode="json"), "spec": self.spec(rec),
                    "download": download or ("optional" if rec.storage_path else None)}
            groups.setdefault((rec.sandbox_type, self.reg.core.node_of(rec)), []).append(item)
            self._sent([rec.container_name])
        for (t, node), items in groups.items():
            pool = self.reg.nodes.pool(t, node)
            if pool is None:
                self.fail([i["record"]["container_name"] for i in items], f"no pool of {t!r} on node {node[:12]}")
                continue
            fire(self._run(pool, items), f"start {len(items)} {t}")

    def fail(self, names: list[str], why: str) -> None:
        """Starts that cannot happen (their node is gone): failed, not counted against the type."""
        for name in names:
            self._done(name)
            self.outcome({"name": name, "ok": False, "error": SandboxGone(why).to_dict()}, counts=False)

    def _sent(self, names: list[str]) -> None:
        self.dispatched.update(names)
        if self.dispatched:
            self.idle.clear()

    def _done(self, name: str) -> None:
        self.dispatched.discard(name)
        if not self.dispatched:
            self.idle.set()

    def on_node(self, node: str) -> list[str]:
        core = self.reg.core
        return [n for n in self.dispatched if n in core.records and core.node_of(core.records[n]) == node]

    async def _run(self, pool: PoolHandle, items: list[dict]) -> None:
        names = [i["record"]["container_name"] for i in items]
        try:
            results = await pool.start(items)
            counts = True
        except ActorGone as e:
            results = [{"name": n, "ok": False, "error": DriverError(f"pool gone: {e}").to_dict()} for n in names]
            counts = False
        await self._apply(results, counts)

    async def collect(self, pool: PoolHandle, names: list[str]) -> None:
        """Starts a pool was making when this registry (re)started: their outcome, when it comes."""
        self._sent(names)
        try:
            results = await pool.collect(names)
        except ActorGone as e:
            results = [{"name": n, "ok": False, "error": DriverError(f"pool gone: {e}").to_dict()} for n in names]
        await self._apply(results, counts=False)

    async def _apply(self, results: list[dict], counts: bool) -> None:
        for r in results:
            self._done(r["name"])
            self.outcome(r, counts)
        await self.reg.commit()
        for t in self.reg.config.sandbox_types:
            self.reg.callers.hand_off(t)
        self.reg.kick()

    def outcome(self, r: dict, counts: bool) -> None:
        reg, core = self.reg, self.reg.core
        name = r["name"]
        rec = core.records.get(name)
        fut = self._futs.pop(name, None)
        if r.get("ok"):
            if rec is None or rec.state != S.STARTING:  # released while it started: it goes
                reg.outbox.put(("remove", name, core.node_of(rec) if rec else reg.node, r["container_id"]))
                _settle(fut, SandboxGone(f"{name} was released while it started"))
                return
            rec = core.started(name, r["container_id"], r.get("url"), r.get("ports") or [])
            if fut is not None and not fut.done():
                fut.set_result(rec)
            elif rec.state == S.RUNNING:
                reg.outbox.put(*reg.sessions.claimed([rec]))
            return
        err = r.get("error") or {}
        if core.start_failed(name, counts=counts) is not None and counts:
            core.pool(rec.sandbox_type).last_error = err.get("message")
        _settle(fut, error_class(err.get("code", ""))(err.get("message", "the start failed")))

    async def start_and_wait(self, rec: ContainerModel, env: dict, download: Optional[str]) -> ContainerModel:
        fut = asyncio.get_running_loop().create_future()
        self._futs[rec.container_name] = fut
        if env:
            self._env[rec.container_name] = env
        self.dispatch([rec], download)
        return await fut


def _settle(fut: Optional[asyncio.Future], error: Any) -> None:
    if fut is not None and not fut.done():
        fut.set_exception(error)
