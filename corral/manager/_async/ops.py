"""AsyncOps: the reference manager's operations, on corral's actors.

What it owns: nothing durable. It holds the registry of one namespace (a
:class:`corral.manager.cluster.Cluster`), one box client per sandbox in use,
and validates every argument before the registry is called, so bad input
raises a clear corral error and creates nothing.

Each operation has the reference's name and arguments. Differences, on
purpose: errors are exceptions from corral's tree (never a string or None in
place of a value); ``create`` with an env takes a warm container and applies
the env instead of starting one cold; an acquire at the instance limit waits
in line (``acquire_timeout``) instead of returning None.

This module is the source of the generated sync ``Ops`` (scripts/unasync.py).
"""

from __future__ import annotations

import functools
import json
import re
import time
from typing import Any, Optional

import httpx
import shortuuid

from corral.client import AsyncBoxClient
from corral.client._errors import error_from_response, transport_errors
from corral.client._http import tls_context
from corral.errors import InvalidRequest, SandboxGone
from corral.models import SESSION_ID_ALPHABET, check_env

from . import _rt
from .sandbox import AsyncSandbox

__all__ = ["AsyncOps", "REFERENCE_TOOLS", "OPERATIONS", "AsyncOpsBase", "live_record", "pop_present"]

#: The manager's operations: the reference's names, then corral's own. Each is a method of
#: :class:`AsyncOps` and, generated from it (scripts/unasync.py), of ``SandboxManager``, sync and
#: as ``<name>_async``.
OPERATIONS = (
    "create", "create_from_pool", "release", "start", "stop", "get_status", "get_info",
    "check_health", "list_tools", "call_tool", "add_mcp_servers", "get_session_mapping",
    "list_session_keys", "reap_session", "restore_session", "cleanup",
    "acquire", "reserve", "heartbeat", "status", "configure",
)

#: Tools every box serves besides its MCP servers (the reference's generic tools).
REFERENCE_TOOLS = ("run_ipython_cell", "run_shell_command")
#: The reference's routes have no timeout of their own; corral's client waits this long.
REFERENCE_TIMEOUT = 600.0


#: A session id: 1-256 characters of letters, digits and ``_ . : @ + = -``, no ``..``.
_SESSION_RE = re.compile(r"^[A-Za-z0-9_.:@+=-]{1,256}$")
#: Largest ``meta`` accepted, as JSON: it is stored in every record and sent with every acquire.
MAX_META_BYTES = 64 * 1024


def _session(session: Any, what: str = "session_ctx_id") -> str:
    if not isinstance(session, str) or not _SESSION_RE.match(session) or ".." in session:
        shown = repr(session) if not isinstance(session, str) or len(session) < 80 else repr(session[:77] + "...")
        raise InvalidRequest(
            f"{what} must be 1-256 characters of letters, digits and '_.:@+=-' (no '..'), got {shown}")
    return session


def _meta(meta: Any) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InvalidRequest(f"meta must be a dict, got {type(meta).__name__}")
    sid = meta.get("session_ctx_id")
    if sid is not None:
        _session(sid, "meta.session_ctx_id")
    try:
        size = len(json.dumps(meta))
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"meta must be JSON (strings, numbers, lists, dicts): {e}") from None
    if size > MAX_META_BYTES:
        raise InvalidRequest(f"meta is {size} bytes as JSON; at most {MAX_META_BYTES}")
    return dict(meta)


def _node(node: Any, here: Optional[str]) -> str:
    """A request's node preference: "local" (this node first, then any: the default), "any", or a
    node id (only there)."""
    if node is None or node == "local":
        return f"local:{here or ''}"
    if node == "any":
        return "any"
    if not isinstance(node, str) or not re.fullmatch(r"[0-9a-f]{8,64}", node):
        raise InvalidRequest(f"node must be 'local', 'any' or a Ray node id (hex), got {node!r}")
    return node


_SESSION_IDS = shortuuid.ShortUUID(alphabet=SESSION_ID_ALPHABET)


def new_session_id() -> str:
    """``s-`` and 16 base-36 digits: the low digits of a uuid4 (one urandom call, ~5 us;
    ``ShortUUID.random`` makes a syscall per character, ~25 us, paid 32 times in a burst)."""
    return "s-" + _SESSION_IDS.uuid()[-16:]


def _ident(identity: Any, what: str = "identity") -> str:
    if not isinstance(identity, str) or not identity or len(identity) > 512 or "\0" in identity:
        shown = repr(identity) if not isinstance(identity, str) or len(identity) < 80 else repr(identity[:77] + "...")
        raise InvalidRequest(f"{what} must be a sandbox name or id (1-512 characters), got {shown}")
    return identity


async def live_record(ops: Any, identity: str) -> dict:
    """The record of a usable sandbox, asked of ``ops`` (embedded or remote): a reaped session is
    restored first (the reference's touch); a lost or ended sandbox is SandboxGone."""
    rec = await ops.get_info(identity)
    state = rec.get("state")
    if state == "RECYCLED" and rec.get("session_ctx_id"):
        await ops.restore_session(rec["session_ctx_id"])
        rec = await ops.get_info(identity)
        state = rec.get("state")
    if state == "LOST":
        raise SandboxGone(f"sandbox {identity} was lost with its node; restore_session("
                          f"{rec.get('session_ctx_id')!r}) brings its session back on another node")
    if state not in ("RUNNING", "WARM"):
        raise SandboxGone(f"sandbox {identity} is {state}")
    return rec


def pop_present(mapping: dict, keys: Any) -> list:
    """The values of ``keys`` taken out of ``mapping``; keys it does not hold are passed over."""
    return [v for v in (mapping.pop(k, None) for k in keys) if v is not None]


class AsyncOpsBase:
    """How the embedded and the remote core close: ``aclose`` closes their connections, as the
    guard each sets with ``_rt.on_loop_shutdown`` does when the event loop ends first."""

    _shutdown_guard: Any = None

    async def aclose(self) -> None:
        if self._shutdown_guard is not None:
            self._shutdown_guard.cancel()
        await self._close_connections()

    async def _close_connections(self) -> None:
        raise NotImplementedError


class AsyncOps(AsyncOpsBase):
    """The operations (see the module docstring)."""

    def __init__(self, cluster: Any, owned: Optional[set] = None) -> None:
        self._cluster = cluster
        self.config = cluster.config
        self.owned = owned if owned is not None else set()  # names this manager created and has not released
        self._http = httpx.AsyncClient(
            trust_env=False, timeout=30.0, verify=tls_context(),
            # idle connections dropped before the box drops them (it keeps them 75 s)
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=30.0),
        )
        # One box client, with its own connection pool, per sandbox in use: httpx checks every
        # idle connection of a pool on each request (a poll each), so one pool shared by all
        # sandboxes made every tool call pay for the connections of the others (~2 ms at 32).
        self._boxes: dict[str, AsyncBoxClient] = {}
        self._retired: list[AsyncBoxClient] = []  # replaced (a box that moved), closed with the next release
        self._closing: set = set()  # closes of released sandboxes' clients still running
        # sandboxes still held when the loop ends keep their sessions; their connections are closed
        self._shutdown_guard = _rt.on_loop_shutdown(self._close_connections)
        # Concurrent acquires of one type, and concurrent releases, go to the registry as one call each.
        self._acquirers: dict[str, _rt.Batcher] = {}
        self._releaser = _rt.Batcher(self._send_releases)
        self._registry = _rt.RegistryLink(cluster)  # acquires and releases: the lane on the registry's node

    async def _close_connections(self) -> None:
        await _rt.drain(self._closing)
        await self._registry.aclose()
        boxes, self._boxes = list(self._boxes.values()) + self._retired, {}
        self._retired = []
        for box in boxes:
            await box.aclose()
        await self._http.aclose()

    # -- plumbing ----------------------------------------------------------------

    def _box(self, record: dict) -> AsyncBoxClient:
        name = record["container_name"]
        box = self._boxes.get(name)
        if box is None or box.base_url != (record.get("url") or "").rstrip("/"):
            if not record.get("url") or not record.get("runtime_token"):
                raise SandboxGone(f"sandbox {name} has no running box (state {record.get('state')})")
            if box is not None:
                self._retired.append(box)
            box = AsyncBoxClient(record["url"], record["runtime_token"])
            self._boxes[name] = box
        return box

    def _forget_boxes(self, keys: tuple) -> list:
        """Take the box clients of released sandboxes (and any retired ones) out of use."""
        gone, self._retired = self._retired, []
        return gone + pop_present(self._boxes, keys)

    @staticmethod
    async def _close_boxes(boxes: list) -> None:
        for box in boxes:
            await box.aclose()

    async def _live(self, identity: str) -> dict:
        return await live_record(self, identity)

    async def _reference_call(self, identity: str, method: str, path: str, body: Optional[dict] = None) -> Any:
        """A call to one of the box's /fastapi routes, answered in the reference's shape."""
        rec = await self._live(_ident(identity))
        url = rec["url"].rstrip("/") + path
        headers = {"Authorization": f"Bearer {rec['runtime_token']}"}
        with transport_errors(method, url):
            r = await self._http.request(method, url, json=body, headers=headers, timeout=REFERENCE_TIMEOUT)
        if r.status_code >= 400:
            raise error_from_response(r)
        return r.json() if r.content else None

    # -- create / acquire / release ----------------------------------------------

    async def create(
        self,
        sandbox_type: Optional[str] = None,
        mount_dir: Optional[str] = None,
        storage_path: Optional[str] = None,
        environment: Optional[dict] = None,
        meta: Optional[dict] = None,
    ) -> str:
        """Start a sandbox and return its container name.

        With no mount dir or storage path, a warm container of the type's pool
        is taken (the env applied to it); otherwise one is started cold.
        """
        t = self.config.sandbox_type(sandbox_type)
        env = check_env(environment)
        m = _meta(meta)
        if mount_dir is not None and not self.config.allow_mount_dir:
            raise InvalidRequest("mount_dir given but allow_mount_dir is False in the manager's config")
        if storage_path is not None and not isinstance(storage_path, str):
            raise InvalidRequest(f"storage_path must be a string, got {type(storage_path).__name__}")
        if mount_dir is not None and (not isinstance(mount_dir, str) or not mount_dir):
            raise InvalidRequest(f"mount_dir must be a non-empty string, got {mount_dir!r}")
        if mount_dir is None and storage_path is None and self.config.pool_target(t.name) > 0:
            rec = await self._acquire_record(t.name, m.get("session_ctx_id"), m, env, None, None)
            return rec["container_name"]
        rec = await _rt.call(self._cluster.registry.create.remote(
            t.name, m.get("session_ctx_id"), m, mount_dir, storage_path, env, None, None,
        ))
        self.owned.add(rec["container_name"])
        return rec["container_name"]

    async def create_from_pool(self, sandbox_type: Optional[str] = None, meta: Optional[dict] = None) -> str:
        """Take a warm container of the type and bind it to ``meta['session_ctx_id']``."""
        t = self.config.sandbox_type(sandbox_type)
        m = _meta(meta)
        rec = await self._acquire_record(t.name, m.get("session_ctx_id"), m, {}, None, None)
        return rec["container_name"]

    def _acquirer(self, sandbox_type: str) -> _rt.Batcher:
        b = self._acquirers.get(sandbox_type)
        if b is None:
            b = _rt.Batcher(functools.partial(self._send_acquires, sandbox_type), orphan=self._release_orphan)
            self._acquirers[sandbox_type] = b
        return b

    async def _send_acquires(self, sandbox_type: str, requests: list) -> list:
        """One registry call for a batch; requests that find nothing warm answer None (they wait alone)."""
        return await self._registry.call("acquire", sandbox_type, requests, None, False)

    async def _send_releases(self, identities: list) -> list:
        return await self._registry.call("release_many", identities)

    def _release_orphan(self, record: dict) -> None:
        """An acquire whose caller was cancelled while its batch was in flight: give the sandbox back."""
        self._cluster.registry.release.remote(record["container_name"])

    async def _acquire_record(self, sandbox_type: str, session_ctx_id: Optional[str], meta: dict,
                              env: dict, timeout: Optional[float], node: Any) -> dict:
        req = {"session_ctx_id": session_ctx_id, "meta": meta, "node": _node(node, self._cluster.here)}
        rec = await self._acquirer(sandbox_type)(req)
        if rec is None:  # none warm: wait in the registry's line for this type
            rec = (await _rt.call(self._cluster.registry.acquire.remote(sandbox_type, [req], timeout, True)))[0]
        if isinstance(rec, BaseException):
            raise rec
        self.owned.add(rec["container_name"])
        if env:
            try:
                await self._box(rec).set_env(env)
            except BaseException:
                await self.release(rec["container_name"])
                raise
        return rec

    async def acquire(
        self,
        sandbox_type: Optional[str] = None,
        session_ctx_id: Optional[str] = None,
        env: Optional[dict] = None,
        timeout: Optional[float] = None,
        meta: Optional[dict] = None,
        node: Optional[str] = None,
    ) -> AsyncSandbox:
        """A warm sandbox bound to a session (a new session id when none is given), as a handle.

        ``node``: "local" (the default: a sandbox on this process's node when one is warm there,
        else any), "any", or a Ray node id (only there)."""
        t = self.config.sandbox_type(sandbox_type)
        if session_ctx_id is None:
            session_ctx_id = new_session_id()
        _session(session_ctx_id)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidRequest(f"timeout must be a positive number of seconds, got {timeout!r}")
        m = {**_meta(meta), "session_ctx_id": session_ctx_id}
        rec = await self._acquire_record(t.name, session_ctx_id, m, check_env(env), timeout, node)
        return AsyncSandbox(self, rec, self._box(rec))

    async def release(self, identity: str) -> bool:
        """Release a sandbox by container name or session_id; returns at once (teardown continues). Unknown: True."""
        ident = _ident(identity)
        keys = (ident, self.config.container_prefix_key + ident)
        for key in keys:
            self.owned.discard(key)
        boxes = self._forget_boxes(keys)
        try:
            out = await self._releaser(ident)
        finally:
            # After the registry's answer, and off the caller's path: 32 releases answered at
            # once each waited for the clients the ones before it closed (~0.1 ms each).
            _rt.later(self._closing, self._close_boxes(boxes))
        if isinstance(out, BaseException):
            raise out
        return out

    async def reserve(self, sandbox_type: Optional[str] = None, n: int = 1, wait: bool = False,
                      timeout: float = 120.0) -> dict:
        """Grow a pool by ``n`` warm sandboxes ahead of a burst; ``wait`` until they are warm."""
        t = self.config.sandbox_type(sandbox_type)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > 4096:
            raise InvalidRequest(f"n must be an integer in 0..4096, got {n!r}")
        return await _rt.call(self._cluster.registry.reserve.remote(t.name, n, bool(wait), float(timeout)))

    async def configure(self, pool_size: Optional[int] = None, sandbox_types: Optional[dict] = None,
                        max_sandbox_instances: Optional[int] = None) -> dict:
        """Change the running namespace: pool targets, sandbox types (added or replaced) or the
        instance limit. Kept across registry restarts; returns the config now in force."""
        types = None
        if sandbox_types is not None:
            if not isinstance(sandbox_types, dict):
                raise InvalidRequest(f"sandbox_types must be a dict, got {type(sandbox_types).__name__}")
            types = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v) for k, v in sandbox_types.items()}
        out = await _rt.call(self._cluster.registry.configure.remote(pool_size, types, max_sandbox_instances))
        self._cluster.configured(out)
        self.config = self._cluster.config
        return out

    # -- backend -----------------------------------------------------------------

    async def _container_op(self, identity: str, op: str) -> Any:
        return await _rt.call(self._cluster.registry.container_op.remote(_ident(identity), op))

    async def start(self, identity: str) -> bool:
        """Start a stopped sandbox again (the reference's ``start``); True when it runs."""
        return (await self._container_op(identity, "start")) == "running"

    async def stop(self, identity: str) -> bool:
        """Stop a sandbox without releasing it (the reference's ``stop``); ``start`` brings it back."""
        return (await self._container_op(identity, "stop")) in ("exited", "missing")

    async def get_status(self, identity: str) -> str:
        """The backend's status of the sandbox: "running", "exited", "created" or "missing"."""
        return await self._container_op(identity, "status")

    async def get_info(self, identity: str) -> dict:
        """The record (following ``redirect_to``). Unknown: NotFound."""
        return await self._registry.call("get_info", _ident(identity))

    # -- tools (proxied to the box; each one is activity for its session) ---------

    async def check_health(self, identity: str) -> bool:
        """True when the sandbox's box answers (a reaped session is restored first)."""
        rec = await self._live(_ident(identity))
        await self._box(rec).healthz()
        return True

    async def list_tools(self, identity: str, tool_type: Optional[str] = None) -> dict:
        """The tools the sandbox serves: the generic ones and its MCP servers', by server (or only ``tool_type``)."""
        tools = await self._reference_call(identity, "GET", "/fastapi/mcp/list_tools")
        out = {"generic": {name: {"name": name} for name in REFERENCE_TOOLS}, **(tools or {})}
        if tool_type is not None:
            return {tool_type: out.get(tool_type, {})}
        return out

    async def call_tool(self, identity: str, tool_name: str, arguments: Optional[dict] = None) -> Any:
        """Call a tool in the sandbox (``run_shell_command``, ``run_ipython_cell`` or an MCP tool); the
        reference's response shape. Counts as activity for the session."""
        _ident(tool_name, "tool_name")
        if arguments is not None and not isinstance(arguments, dict):
            raise InvalidRequest(f"arguments must be a dict, got {type(arguments).__name__}")
        if tool_name in REFERENCE_TOOLS:
            return await self._reference_call(identity, "POST", f"/fastapi/tools/{tool_name}", arguments or {})
        return await self._reference_call(identity, "POST", "/fastapi/mcp/call_tool",
                                          {"tool_name": tool_name, "arguments": arguments or {}})

    async def add_mcp_servers(self, identity: str, server_configs: dict, overwrite: bool = False) -> Any:
        """Start MCP servers in the sandbox (``{"mcpServers": {name: config}}``)."""
        if not isinstance(server_configs, dict):
            raise InvalidRequest(f"server_configs must be a dict, got {type(server_configs).__name__}")
        return await self._reference_call(identity, "POST", "/fastapi/mcp/add_servers",
                                          {"server_configs": server_configs, "overwrite": bool(overwrite)})

    # -- sessions ----------------------------------------------------------------

    async def get_session_mapping(self, session_ctx_id: str) -> list:
        """The names of the sandboxes bound to a session."""
        return await _rt.call(self._cluster.registry.get_session_mapping.remote(_session(session_ctx_id)))

    async def list_session_keys(self) -> list:
        """Every session with a sandbox (running, or recycled and restorable)."""
        return await _rt.call(self._cluster.registry.list_session_keys.remote())

    async def heartbeat(self, session_ctx_id: str) -> bool:
        """Count as activity for a session without calling its sandboxes (tool calls already do)."""
        return await _rt.call(self._cluster.registry.heartbeat.remote(_session(session_ctx_id)))

    async def reap_session(self, session_ctx_id: str, reason: str = "heartbeat_timeout") -> bool:
        """Recycle a session now: its sandboxes go, their workspaces are kept for ``restore_session``."""
        if not isinstance(reason, str) or len(reason) > 256:
            raise InvalidRequest(f"reason must be a string of at most 256 characters, got {reason!r:.80}")
        return await _rt.call(self._cluster.registry.reap_session.remote(_session(session_ctx_id), reason))

    async def restore_session(self, session_ctx_id: str) -> list:
        """Bring a reaped session back (same workspace, new containers); returns its container names."""
        return await _rt.call(self._cluster.registry.restore_session.remote(_session(session_ctx_id)))

    async def cleanup(self) -> list:
        """Release every non-terminal sandbox of this namespace (pools included); returns their names."""
        await self._close_boxes(self._forget_boxes(tuple(self._boxes)))
        return await _rt.call(self._cluster.registry.cleanup.remote())

    async def release_owned(self) -> list:
        """Release every sandbox this manager created and has not released (its context exit)."""
        names = sorted(self.owned)
        for name in names:
            await self.release(name)
        return names

    # -- observability -----------------------------------------------------------

    async def status(self) -> dict:
        """Pools, nodes, sessions and sandboxes of this namespace."""
        reg = await _rt.call(self._cluster.registry.status.remote())
        reg["at"] = time.time()
        return reg
