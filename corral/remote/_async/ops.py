"""AsyncRemoteOps: the manager's operations, sent to a corral gateway over HTTP.

What it owns: the connections to one gateway (an aiohttp session for the
JSON calls where the side has one, an httpx client otherwise), one box client
per sandbox handle in use (its base URL is the sandbox's ``/proxy/<name>`` on
the gateway and its token the tenant's token: a remote client never holds a
box token), and the names of the sandboxes it created and has not released.

Every operation is ``POST <gateway>/<operation>`` with its keyword arguments
as a JSON object, answered ``{"data": <value>}`` (the reference's remote
protocol). An error answer is raised as the corral exception it names
(:func:`corral.errors.from_wire`); a gateway that does not answer raises
:class:`corral.SandboxUnreachable` (retryable).

This module is the source of the generated sync ``RemoteOps`` (scripts/unasync.py).
"""

from __future__ import annotations

import json
import ssl
from typing import Any, Optional, Union

import httpx

from corral.client import AsyncBoxClient
from corral.client._async import _rt as _http_rt
from corral.client._errors import decode_json, error_from_response, malformed, transport_errors
from corral.client._http import tls_context
from corral.errors import Forbidden, InvalidRequest
from corral.manager._async import _rt
from corral.manager._async.ops import AsyncOpsBase, live_record, pop_present
from corral.manager._async.sandbox import AsyncSandbox

__all__ = ["AsyncRemoteOps", "REMOTE_TIMEOUT", "CONNECT_TIMEOUT", "DEFAULT_PREFIX"]

#: Seconds to wait for an operation's answer: the gateway's own call_tool waits up to 600 s.
REMOTE_TIMEOUT = 660.0
#: Seconds to connect to the gateway.
CONNECT_TIMEOUT = 10.0
#: The container-name prefix of a default configuration (``release`` accepts a bare session id).
DEFAULT_PREFIX = "runtime_sandbox_container_"

Verify = Union[bool, str, ssl.SSLContext]


def ssl_context(verify: Verify) -> Union[bool, ssl.SSLContext]:
    """What ``verify=`` means for TLS: True (the system's CAs), False (no check), a CA file, or a context."""
    if verify is True:
        return tls_context()
    if verify is False or isinstance(verify, ssl.SSLContext):
        return verify
    if isinstance(verify, str):
        try:
            return ssl.create_default_context(cafile=verify)
        except (OSError, ssl.SSLError) as e:
            raise InvalidRequest(f"verify: cannot load CA file {verify!r}: {e}") from None
    raise InvalidRequest(f"verify must be a bool, a CA file path or an ssl.SSLContext, got {type(verify).__name__}")


def _waiting(timeout: Any) -> Optional[float]:
    """The read timeout of a call that may wait ``timeout`` seconds on the gateway (None: the default)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        return None
    return max(REMOTE_TIMEOUT, timeout + CONNECT_TIMEOUT)


class AsyncRemoteOps(AsyncOpsBase):
    """The operations over HTTP (see the module docstring)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        verify: Verify = True,
        timeout: float = REMOTE_TIMEOUT,
        default_type: Optional[str] = None,
        prefix: str = DEFAULT_PREFIX,
        owned: Optional[set] = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._auth = {"Authorization": f"Bearer {token}"}
        https = self.base_url.startswith("https://")
        self._tls = ssl_context(verify) if https else tls_context()
        # Box clients build their connections with the system's CAs; another CA needs a client of ours.
        self._own_tls = https and verify is not True
        self._timeout = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)
        self._default_type = default_type
        self._prefix = prefix
        self.owned = owned if owned is not None else set()
        self._http_client: Optional[httpx.AsyncClient] = None
        # JSON calls to a plain-HTTP gateway go through the leaner transport where this side has one.
        plain = self.base_url.startswith("http://")
        self._fast: Any = _http_rt.FastHttp() if _http_rt.FAST_HTTP and plain else None
        self._boxes: dict[str, tuple[AsyncBoxClient, Optional[httpx.AsyncClient]]] = {}
        self._closing: set = set()
        self._shutdown_guard = _rt.on_loop_shutdown(self._close_connections)

    # -- plumbing ----------------------------------------------------------------

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._http_client is None:
            self._http_client = httpx.AsyncClient(
                timeout=self._timeout, verify=self._tls,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64, keepalive_expiry=30.0),
            )
        return self._http_client

    async def _call(self, op: str, read_timeout: Optional[float] = None, **args: Any) -> Any:
        """``POST /<op>`` with ``args``; the answer's ``data``, or the corral error it names."""
        try:
            json.dumps(args)
        except (TypeError, ValueError) as e:
            raise InvalidRequest(f"{op}: the arguments must be JSON values ({e})") from None
        url = f"{self.base_url}/{op}"
        timeout = self._timeout if read_timeout is None else httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT)
        if self._fast is not None:
            response = await self._fast.request("POST", url, params=None, body=args, headers=self._auth,
                                                timeout=timeout)
        else:
            with transport_errors("POST", url):
                response = await self._http.post(url, json=args, headers=self._auth, timeout=timeout)
        if not response.is_success:
            raise error_from_response(response)
        data = decode_json(response)
        if not isinstance(data, dict) or "data" not in data:
            raise malformed(response, "an object with 'data'", data)
        return data["data"]

    def _type(self, sandbox_type: Optional[str]) -> Optional[str]:
        return self._default_type if sandbox_type is None else sandbox_type

    def proxy_url(self, name: str) -> str:
        """The base URL of a sandbox's box through the gateway."""
        return f"{self.base_url}/proxy/{name}"

    def _handle_record(self, record: dict) -> dict:
        # A remote handle reaches its box through the gateway: its url is the proxy's.
        return {**record, "url": self.proxy_url(record["container_name"])}

    def _box(self, record: dict) -> AsyncBoxClient:
        name = record["container_name"]
        entry = self._boxes.get(name)
        if entry is None:
            http = None
            if self._own_tls:
                http = httpx.AsyncClient(timeout=self._timeout, verify=self._tls)
            entry = self._boxes[name] = (AsyncBoxClient(self.proxy_url(name), self._token, http_client=http), http)
        return entry[0]

    def _forget_boxes(self, keys: tuple) -> list:
        return pop_present(self._boxes, keys)

    @staticmethod
    async def _close_boxes(entries: list) -> None:
        for box, http in entries:
            await box.aclose()
            if http is not None:
                await http.aclose()

    async def _live(self, identity: str) -> dict:
        """The record of a usable sandbox (a reaped session is restored first), as a handle's."""
        return self._handle_record(await live_record(self, identity))

    async def _close_connections(self) -> None:
        await _rt.drain(self._closing)
        entries, self._boxes = list(self._boxes.values()), {}
        await self._close_boxes(entries)
        if self._fast is not None:
            await self._fast.aclose()
        if self._http_client is not None:
            await self._http_client.aclose()

    # -- create / acquire / release ----------------------------------------------

    async def create(self, sandbox_type: Optional[str] = None, mount_dir: Optional[str] = None,
                     storage_path: Optional[str] = None, environment: Optional[dict] = None,
                     meta: Optional[dict] = None) -> str:
        name = await self._call("create", sandbox_type=self._type(sandbox_type), mount_dir=mount_dir,
                                storage_path=storage_path, environment=environment, meta=meta)
        self.owned.add(name)
        return name

    async def create_from_pool(self, sandbox_type: Optional[str] = None, meta: Optional[dict] = None) -> str:
        name = await self._call("create_from_pool", sandbox_type=self._type(sandbox_type), meta=meta)
        self.owned.add(name)
        return name

    async def acquire(self, sandbox_type: Optional[str] = None, session_ctx_id: Optional[str] = None,
                      env: Optional[dict] = None, timeout: Optional[float] = None,
                      meta: Optional[dict] = None, node: Optional[str] = None) -> AsyncSandbox:
        """A warm sandbox bound to a session, as a handle whose tool calls go through the gateway.
        ``node`` is as embedded, seen from the gateway ("local": the gateway's node)."""
        rec = await self._call("acquire", read_timeout=_waiting(timeout), sandbox_type=self._type(sandbox_type),
                               session_ctx_id=session_ctx_id, env=env, timeout=timeout, meta=meta, node=node)
        rec = self._handle_record(rec)
        self.owned.add(rec["container_name"])
        return AsyncSandbox(self, rec, self._box(rec))

    async def release(self, identity: str) -> bool:
        """Release by container name or session_id; returns at once (teardown continues)."""
        keys = (identity, self._prefix + identity) if isinstance(identity, str) else (identity,)
        for key in keys:
            self.owned.discard(key)
        entries = self._forget_boxes(keys)
        try:
            return await self._call("release", identity=identity)
        finally:
            _rt.later(self._closing, self._close_boxes(entries))

    async def reserve(self, sandbox_type: Optional[str] = None, n: int = 1, wait: bool = False,
                      timeout: float = 120.0) -> dict:
        return await self._call("reserve", read_timeout=_waiting(timeout), sandbox_type=self._type(sandbox_type), n=n,
                                wait=wait, timeout=timeout)

    # -- backend -----------------------------------------------------------------

    async def start(self, identity: str) -> bool:
        return await self._call("start", identity=identity)

    async def stop(self, identity: str) -> bool:
        return await self._call("stop", identity=identity)

    async def get_status(self, identity: str) -> str:
        return await self._call("get_status", identity=identity)

    async def get_info(self, identity: str) -> dict:
        """The record (following a redirect), without the box's token. Unknown: NotFound."""
        return await self._call("get_info", identity=identity)

    # -- tools -------------------------------------------------------------------

    async def check_health(self, identity: str) -> bool:
        return await self._call("check_health", identity=identity)

    async def list_tools(self, identity: str, tool_type: Optional[str] = None) -> dict:
        return await self._call("list_tools", identity=identity, tool_type=tool_type)

    async def call_tool(self, identity: str, tool_name: str, arguments: Optional[dict] = None) -> Any:
        return await self._call("call_tool", identity=identity, tool_name=tool_name, arguments=arguments)

    async def add_mcp_servers(self, identity: str, server_configs: dict, overwrite: bool = False) -> Any:
        return await self._call("add_mcp_servers", identity=identity, server_configs=server_configs,
                                overwrite=overwrite)

    # -- sessions ----------------------------------------------------------------

    async def get_session_mapping(self, session_ctx_id: str) -> list:
        return await self._call("get_session_mapping", session_ctx_id=session_ctx_id)

    async def list_session_keys(self) -> list:
        return await self._call("list_session_keys")

    async def heartbeat(self, session_ctx_id: str) -> bool:
        return await self._call("heartbeat", session_ctx_id=session_ctx_id)

    async def reap_session(self, session_ctx_id: str, reason: str = "heartbeat_timeout") -> bool:
        return await self._call("reap_session", session_ctx_id=session_ctx_id, reason=reason)

    async def restore_session(self, session_ctx_id: str) -> list:
        return await self._call("restore_session", session_ctx_id=session_ctx_id)

    async def cleanup(self) -> list:
        """Release every sandbox of this tenant; returns their names."""
        await self._close_boxes(self._forget_boxes(tuple(self._boxes)))
        return await self._call("cleanup")

    async def release_owned(self) -> list:
        """Release every sandbox this manager created and has not released (its context exit)."""
        names = sorted(self.owned)
        for name in names:
            await self.release(name)
        return names

    # -- observability -----------------------------------------------------------

    async def configure(self, pool_size: Optional[int] = None, sandbox_types: Optional[dict] = None,
                        max_sandbox_instances: Optional[int] = None) -> dict:
        """Changing the namespace is its operator's call, made embedded; a tenant of the gateway cannot."""
        raise Forbidden("configure changes the namespace every tenant of the gateway shares: its operator "
                        "runs it embedded (SandboxManager(config).configure(...)), not through the gateway")

    async def status(self) -> dict:
        """This tenant's records and sessions, and the shared pools."""
        return await self._call("status")
