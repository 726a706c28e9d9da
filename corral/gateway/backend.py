"""The manager operations as one tenant may call them (no HTTP here).

:class:`Backend` adapts what the gateway sits in front of: corral's embedded
async manager API, either a :class:`corral.SandboxManager` (its ``*_async``
methods) or an :class:`corral.manager._async.ops.AsyncOps`. It finds corral's
actors by name like any other client of the namespace.

:class:`TenantOps` is every operation of the remote API for one tenant: it
checks ownership before it acts, scopes session ids and tags meta on the way
in (:mod:`corral.gateway.tenancy`), and strips box tokens and scoping on the
way out. It only calls the backend's public operations, so some checks cost
an extra registry call (an identity is looked up with ``get_info`` before it
is acted on; a tenant's ``cleanup`` and ``status`` read the whole namespace's
``status()`` and keep the tenant's part).
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
from typing import Any, Awaitable, Callable, Optional

from corral.errors import Forbidden, InvalidRequest, NotFound, SandboxGone

from .tenancy import owns, public_record, scope, tag_meta, unscope

__all__ = ["Backend", "TenantOps", "OPERATIONS", "LIVE_STATES"]

#: The operations the gateway serves as ``POST /<name>`` (and ``POST /<name>_async``).
OPERATIONS = (
    "create", "create_from_pool", "release", "start", "stop", "get_status", "get_info",
    "check_health", "list_tools", "call_tool", "add_mcp_servers", "get_session_mapping",
    "list_session_keys", "reap_session", "restore_session", "cleanup", "acquire", "reserve",
    "heartbeat", "status",
)

#: States in which a tenant's sandbox may be used (tool calls, the proxy, start/stop).
LIVE_STATES = frozenset({"STARTING", "WARM", "RUNNING", "RECYCLED"})
#: States whose sandbox a tenant's cleanup releases.
_CLEANUP_STATES = frozenset({"STARTING", "WARM", "RUNNING", "RECYCLED"})


class Backend:
    """Calls the embedded manager's async operations by name.

    ``Backend(manager)`` for a :class:`corral.SandboxManager` (``create_async``, ...) or
    ``Backend(ops)`` for an ``AsyncOps`` (``create``, ...)."""

    def __init__(self, target: Any) -> None:
        if isinstance(target, Backend):
            target = target.target
        self.target = target
        self._suffix = "_async" if callable(getattr(target, "create_from_pool_async", None)) else ""
        missing = [op for op in OPERATIONS if not callable(getattr(target, op + self._suffix, None))]
        if missing:
            raise InvalidRequest(
                f"the gateway's backend must be a SandboxManager or AsyncOps; {type(target).__name__} "
                f"lacks {', '.join(missing)}"
            )

    def op(self, name: str) -> Callable[..., Awaitable[Any]]:
        return getattr(self.target, name + self._suffix)


def _new_session_id() -> str:
    return "s-" + secrets.token_hex(8)


class TenantOps:
    """Every remote operation for one tenant (see the module docstring). Cheap: one per request."""

    def __init__(self, backend: Backend, tenant: str, *, allow_host_paths: bool = False) -> None:
        self._b = backend
        self.tenant = tenant
        self._allow_host_paths = allow_host_paths

    # -- helpers -----------------------------------------------------------------

    def _not_found(self, identity: Any) -> NotFound:
        # The same answer for "unknown" and "another tenant's": existence is not disclosed.
        return NotFound(f"no sandbox with id {identity!r}")

    async def record(self, identity: Any) -> dict:
        """This tenant's record for ``identity`` (following a redirect); anything else: NotFound."""
        if not isinstance(identity, str) or not identity:
            raise InvalidRequest(f"identity must be a non-empty string, got {identity!r}")
        try:
            rec = await self._b.op("get_info")(identity)
        except NotFound:
            raise self._not_found(identity) from None
        if not owns(self.tenant, rec):
            raise self._not_found(identity)
        return rec

    async def live_record(self, identity: Any) -> dict:
        """This tenant's record, in a state whose box may be used."""
        rec = await self.record(identity)
        if rec.get("state") not in LIVE_STATES:
            raise SandboxGone(f"sandbox {identity} is {rec.get('state')}")
        return rec

    def _scoped(self, sid: Any) -> str:
        return scope(self.tenant, sid)

    async def _known_session(self, sid: Any) -> str:
        scoped = self._scoped(sid)
        if not await self._b.op("get_session_mapping")(scoped):
            raise NotFound(f"no session {sid!r}")
        return scoped

    def _host_paths(self, mount_dir: Any, storage_path: Any) -> None:
        if (mount_dir is not None or storage_path is not None) and not self._allow_host_paths:
            # A host directory or a storage path chosen by a remote caller could be anyone's.
            raise Forbidden("mount_dir and storage_path are not accepted through the gateway")

    def _own(self, rec: dict) -> dict:
        return public_record(self.tenant, rec)

    # -- create / acquire / release ----------------------------------------------

    async def create(self, sandbox_type: Optional[str] = None, mount_dir: Optional[str] = None,
                     storage_path: Optional[str] = None, environment: Optional[dict] = None,
                     meta: Optional[dict] = None) -> str:
        self._host_paths(mount_dir, storage_path)
        return await self._b.op("create")(sandbox_type=sandbox_type, mount_dir=mount_dir, storage_path=storage_path,
                                          environment=environment, meta=tag_meta(self.tenant, meta))

    async def create_from_pool(self, sandbox_type: Optional[str] = None, meta: Optional[dict] = None) -> str:
        return await self._b.op("create_from_pool")(sandbox_type=sandbox_type, meta=tag_meta(self.tenant, meta))

    async def acquire(self, sandbox_type: Optional[str] = None, session_ctx_id: Optional[str] = None,
                      env: Optional[dict] = None, timeout: Optional[float] = None,
                      meta: Optional[dict] = None, node: Optional[str] = None) -> dict:
        """A warm sandbox bound to a session; answers its record (what a remote handle is built from).
        ``node``: as embedded, seen from the gateway ("local" is the gateway's node)."""
        m = tag_meta(self.tenant, meta)
        m.pop("session_ctx_id", None)  # the session is the argument's
        sid = self._scoped(_new_session_id() if session_ctx_id is None else session_ctx_id)
        sb = await self._b.op("acquire")(sandbox_type=sandbox_type, session_ctx_id=sid, env=env,
                                         timeout=timeout, meta=m, node=node)
        return self._own(sb.record)

    async def release(self, identity: str) -> bool:
        rec = await self.record(identity)
        return await self._b.op("release")(rec["container_name"])

    async def reserve(self, sandbox_type: Optional[str] = None, n: int = 1, wait: bool = False,
                      timeout: float = 120.0) -> dict:
        return await self._b.op("reserve")(sandbox_type=sandbox_type, n=n, wait=wait, timeout=timeout)

    # -- backend -----------------------------------------------------------------

    async def start(self, identity: str) -> bool:
        return await self._b.op("start")((await self.live_record(identity))["container_name"])

    async def stop(self, identity: str) -> bool:
        return await self._b.op("stop")((await self.live_record(identity))["container_name"])

    async def get_status(self, identity: str) -> str:
        return await self._b.op("get_status")((await self.record(identity))["container_name"])

    async def get_info(self, identity: str) -> dict:
        return self._own(await self.record(identity))

    # -- tools ---------------------------------------------------------------------

    async def check_health(self, identity: str) -> bool:
        return await self._b.op("check_health")((await self.live_record(identity))["container_name"])

    async def list_tools(self, identity: str, tool_type: Optional[str] = None) -> dict:
        name = (await self.live_record(identity))["container_name"]
        return await self._b.op("list_tools")(name, tool_type=tool_type)

    async def call_tool(self, identity: str, tool_name: str, arguments: Optional[dict] = None) -> Any:
        name = (await self.live_record(identity))["container_name"]
        return await self._b.op("call_tool")(name, tool_name, arguments)

    async def add_mcp_servers(self, identity: str, server_configs: dict, overwrite: bool = False) -> Any:
        name = (await self.live_record(identity))["container_name"]
        return await self._b.op("add_mcp_servers")(name, server_configs, overwrite=overwrite)

    # -- sessions ------------------------------------------------------------------

    async def get_session_mapping(self, session_ctx_id: str) -> list:
        return await self._b.op("get_session_mapping")(self._scoped(session_ctx_id))

    async def list_session_keys(self) -> list:
        keys = await self._b.op("list_session_keys")()
        return [k for k in (unscope(self.tenant, s) for s in keys) if k is not None]

    async def heartbeat(self, session_ctx_id: str) -> bool:
        return await self._b.op("heartbeat")(self._scoped(session_ctx_id))

    async def reap_session(self, session_ctx_id: str, reason: str = "heartbeat_timeout") -> bool:
        if not isinstance(reason, str):
            raise InvalidRequest(f"reason must be a string, got {type(reason).__name__}")
        return await self._b.op("reap_session")(await self._known_session(session_ctx_id), reason)

    async def restore_session(self, session_ctx_id: str) -> list:
        return await self._b.op("restore_session")(await self._known_session(session_ctx_id))

    async def cleanup(self) -> list:
        """Release every sandbox of this tenant that is not released yet; returns their names."""
        st = await self._b.op("status")()
        names = [r["container_name"] for r in st.get("records", [])
                 if owns(self.tenant, r) and r.get("state") in _CLEANUP_STATES]
        release = self._b.op("release")
        await asyncio.gather(*(release(name) for name in names))  # concurrent releases go as one batch
        return names

    # -- observability -------------------------------------------------------------

    async def status(self) -> dict:
        """This tenant's part of ``status()``: its records and sessions, and the shared pools."""
        st = await self._b.op("status")()
        records = [self._own(r) for r in st.get("records", []) if owns(self.tenant, r)]
        sessions = {}
        for sid, names in (st.get("sessions") or {}).items():
            own = unscope(self.tenant, sid)
            if own is not None:
                sessions[own] = list(names)
        counts: dict[str, int] = {}
        for r in records:
            counts[r.get("state")] = counts.get(r.get("state"), 0) + 1
        return {
            "namespace": st.get("namespace"),
            "tenant": self.tenant,
            "counts": counts,
            "limit": st.get("limit"),
            "sessions": sessions,
            "records": records,
            "pools": st.get("pools", {}),
            "acquire_ms": st.get("acquire_ms"),
            "at": st.get("at"),
        }


def _params(fn: Callable) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(fn).parameters.items() if n != "self"}


#: Each operation's parameters (name -> inspect.Parameter), for checking request bodies.
PARAMETERS: dict[str, dict[str, inspect.Parameter]] = {op: _params(getattr(TenantOps, op)) for op in OPERATIONS}
