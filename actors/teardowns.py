"""Teardowns: what the registry's outbox sends, and what it learns back.

What it owns: nothing durable. Given the messages an answer left in the outbox, it groups the
teardowns into one call per pool and kind (reset for reuse, or destroy/recycle), sends container
removals, and passes session-actor messages on in order. The outcomes come back as return values:
a reset done (the sandbox WARM again with its new token) or failed (then destroyed), a workspace
synced or not (``storage_synced_at`` / ``storage_error`` on the record). Part of the
RegistryActor (``reg``), split out by concern.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from corral.core.registry import Teardown
from corral.core.stats import LatencyWindow

from .common import fire
from .handles import ActorGone, PoolHandle

if TYPE_CHECKING:
    from .registry_actor import RegistryActor

__all__ = ["Teardowns"]


class Teardowns:
    """See the module docstring."""

    def __init__(self, reg: "RegistryActor") -> None:
        self.reg = reg
        self.reset_ms: dict[str, LatencyWindow] = {}  # per type: reset sent to reset done

    async def send(self, msgs: list) -> None:
        """The outbox's sender: teardowns grouped into one call per pool and kind, removals, and
        session messages in order."""
        reg = self.reg
        groups: dict[tuple, list[Teardown]] = {}
        for msg in msgs:
            kind = msg[0]
            if kind == "teardown":
                td: Teardown = msg[1]
                key = (td.record.sandbox_type, reg.core.node_of(td.record), td.action == "reset")
                groups.setdefault(key, []).append(td)
            elif kind == "remove":
                _, name, node, cid = msg
                pool = reg.nodes.pool(reg.config.default_type, node)
                if pool is not None:
                    fire(pool.remove([cid]), f"remove {name}")
            else:
                reg.sessions.send(msg)
        for (t, node, reset), tds in groups.items():
            pool = reg.nodes.pool(t, node)
            if pool is None:  # its node is gone, and its container with it
                continue
            fire(self._resets(pool, tds) if reset else self._teardowns(pool, tds), f"{len(tds)} teardowns of {t}")

    async def _resets(self, pool: PoolHandle, tds: list[Teardown]) -> None:
        reg = self.reg
        t0 = time.perf_counter()
        restart = reg.config.sandbox_type(pool.sandbox_type).kernel_reset == "restart"
        items = [{"record": td.record.model_dump(mode="json"), "token": td.token, "restart_kernel": restart,
                  "upload": td.upload} for td in tds]
        try:
            results = await pool.reset(items)
        except ActorGone:
            results = [{"name": td.record.container_name, "ok": False} for td in tds]
        window = self.reset_ms.setdefault(pool.sandbox_type, LatencyWindow())
        failed = []
        for td, r in zip(tds, results):
            rec = reg.core.reset_done(td.record.container_name, bool(r.get("ok")), td.token)
            if r.get("ok"):
                window.add((time.perf_counter() - t0) * 1000)
            elif rec is not None:
                failed.append(Teardown(td.record, "destroy"))
        await reg.commit()
        reg.callers.hand_off(pool.sandbox_type)
        if failed:
            await self._teardowns(pool, failed)
        reg.kick()

    async def _teardowns(self, pool: PoolHandle, tds: list[Teardown]) -> None:
        reg = self.reg
        items = [{"record": td.record.model_dump(mode="json"), "action": td.action, "upload": td.upload}
                 for td in tds]
        try:
            results = await pool.teardown(items)
        except ActorGone:
            return  # the next reconciliation of its node removes what is left
        for r in results:
            if r.get("synced_at") or r.get("storage_error"):
                reg.core.synced(r["name"], r.get("synced_at"), r.get("storage_error"))
        await reg.commit()
