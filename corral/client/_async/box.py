"""The client for one box's /v1 API (docs/box-api.md).

The async module is the source; the sync module is generated from it by
``scripts/unasync.py``, so both clients have the same methods, arguments and
results. Edit the async one, then run the script.
"""

from __future__ import annotations

import base64
import json
import os
import time
from typing import Any, AsyncIterator, Optional, Union

import httpx

from ...box.auth import check_token
from ...errors import CorralError, Forbidden, InvalidRequest, NotFound, SandboxUnreachable, Unauthorized, from_wire
from .._errors import (
    decode_json,
    error_from_response,
    expect,
    malformed,
    parse_model,
    redact_url,
    transport_errors,
)
from .._http import tls_context
from ..results import (
    Activity,
    Entry,
    Health,
    Info,
    McpTool,
    PythonResult,
    ResetResult,
    ShellChunk,
    ShellResult,
    ToolResult,
)
from . import _rt

__all__ = ["AsyncBoxClient", "DEFAULT_TIMEOUT", "COMMAND_MARGIN", "DEFAULT_MAX_OUTPUT"]

#: Seconds allowed for an ordinary call (files, info, MCP setup).
DEFAULT_TIMEOUT = 30.0
#: Seconds added to a command's own timeout for the HTTP wait: the box needs
#: time to kill the command (or interrupt or restart the kernel) and answer.
COMMAND_MARGIN = 15.0
#: The box's default cap on each output stream, in bytes.
DEFAULT_MAX_OUTPUT = 1 << 20
#: Calls that restart a kernel or kill processes wait at least this long.
SLOW_CALL_TIMEOUT = 120.0

_CHUNK = 1 << 16
_Path = Union[str, "os.PathLike[str]"]


def _remote(path: Any) -> str:
    try:
        value = os.fspath(path)
    except TypeError:
        raise InvalidRequest(f"path must be a string, got {type(path).__name__}") from None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"path must be a non-empty string, got {value!r}")
    return value


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidRequest(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


class AsyncBoxClient:
    """Talks to one box over HTTP with connection reuse (keep-alive).

    Owns its ``httpx.AsyncClient`` unless one is passed as ``http_client`` (then
    the caller owns and closes it; its base URL, headers and timeout are not
    used, and every request goes through it). One client can be shared by many
    concurrent callers. A client that owns its connections to a plain-HTTP box
    sends its JSON calls through ``_rt.FastHttp`` (aiohttp; the sync client has
    no such path): the same answers and errors for a third of the CPU.

    Every call raises :class:`corral.SandboxUnreachable` when the box does not
    answer, and the matching :class:`corral.CorralError` when it answers with
    an error. A command or cell that fails is *not* raised: it is a result
    whose ``check()`` raises. Usage::

        async with AsyncBoxClient("http://127.0.0.1:8000", token) as box:
            await box.wait_ready(30)
            print((await box.shell("ls")).check().stdout)
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidRequest(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if not isinstance(token, str) or not token:
            raise InvalidRequest("token must be a non-empty string (the box's bearer token)")
        self._base_url = base_url.rstrip("/")
        self._timeout = _seconds(timeout, "timeout")
        self._auth = {"Authorization": f"Bearer {token}"}
        self._owns_http = http_client is None
        self._closed = False
        # Made on the first request when it is this client's own: an acquire hands out a handle
        # without paying for connections it has not used yet.
        self._http_client: Optional[httpx.AsyncClient] = http_client
        # Plain-HTTP JSON calls of a client that owns its connections go through the leaner
        # transport where this side has one (_rt.FastHttp: aiohttp on the async side).
        self._fast: Any = _rt.FastHttp() if _rt.FAST_HTTP and http_client is None and base_url.startswith("http://") else None

    @property
    def _http(self) -> httpx.AsyncClient:
        if self._http_client is None:
            # trust_env=False: a box is reached directly; an HTTP_PROXY meant for
            # the internet must not capture calls to 127.0.0.1 or the pod network.
            self._http_client = httpx.AsyncClient(
                timeout=self._timeout,
                trust_env=False,
                verify=tls_context(),
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=30.0),
            )
        return self._http_client

    # --- lifecycle ---

    @property
    def base_url(self) -> str:
        return self._base_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._base_url!r})"

    async def __aenter__(self) -> "AsyncBoxClient":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (only if this client created them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._fast is not None:
            await self._fast.aclose()
        if self._owns_http and self._http_client is not None:
            await self._http_client.aclose()

    # --- plumbing: every request goes through here ---

    def _url(self, path: str) -> str:
        if self._closed:
            raise InvalidRequest(f"{self!r} is closed")
        return self._base_url + path

    def _command_timeout(self, timeout: Any) -> httpx.Timeout:
        return httpx.Timeout(self._timeout, read=_seconds(timeout, "timeout") + COMMAND_MARGIN)

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Optional[dict[str, Any]] = None,
        body: Any = None,
        content: Any = None,
        headers: Optional[dict[str, str]] = None,
        timeout: Union[float, httpx.Timeout, None] = None,
    ) -> httpx.Response:
        url = self._url(path)
        if self._fast is not None and content is None:
            response = await self._fast.request(
                method, url, params=params, body=body, headers={**self._auth, **(headers or {})},
                timeout=self._timeout if timeout is None else timeout,
            )
            if not response.is_success:
                raise error_from_response(response)
            return response
        with transport_errors(method, url):
            response = await self._http.request(
                method,
                url,
                params=params,
                json=body,
                content=content,
                headers={**self._auth, **(headers or {})},
                timeout=self._timeout if timeout is None else timeout,
            )
        if not response.is_success:
            raise error_from_response(response)
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> tuple[Any, httpx.Response]:
        response = await self._send(method, path, **kwargs)
        return decode_json(response), response

    # --- status ---

    async def healthz(self) -> Health:
        """Whether the box is up. Does not count as activity."""
        data, response = await self._json("GET", "/v1/healthz")
        return parse_model(Health, data, response)

    async def info(self) -> Info:
        data, response = await self._json("GET", "/v1/info")
        return parse_model(Info, data, response)

    async def activity(self) -> Activity:
        """When the box was last used and how many calls run now. Does not count as activity."""
        data, response = await self._json("GET", "/v1/activity")
        return parse_model(Activity, data, response)

    async def wait_ready(self, timeout: float = 30.0) -> Health:
        """Poll ``healthz`` until the box answers 200, or raise SandboxUnreachable after ``timeout`` s.

        A wrong token (401/403) is raised at once: waiting will not fix it.
        """
        budget = _seconds(timeout, "timeout")
        deadline = time.monotonic() + budget
        delay = 0.02
        last: Optional[CorralError] = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                data, response = await self._json(
                    "GET", "/v1/healthz", timeout=max(0.5, min(self._timeout, remaining))
                )
                return parse_model(Health, data, response)
            except (Unauthorized, Forbidden, InvalidRequest):
                raise
            except CorralError as exc:
                last = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SandboxUnreachable(
                    f"box at {redact_url(self._base_url)} not ready after {budget:g}s (last: {last})",
                    url=redact_url(self._base_url),
                )
            await _rt.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.5)

    # --- shell ---

    @staticmethod
    def _shell_payload(
        command: str,
        timeout: float,
        cwd: Optional[str],
        env: Optional[dict[str, str]],
        max_output: int,
        stdin: Optional[str],
        encoding: str,
    ) -> dict[str, Any]:
        if not isinstance(command, str) or not command.strip():
            raise InvalidRequest(f"command must be a non-empty string, got {command!r}")
        if encoding not in ("text", "base64"):
            raise InvalidRequest(f"encoding must be 'text' or 'base64', got {encoding!r}")
        payload: dict[str, Any] = {
            "command": command,
            "timeout": _seconds(timeout, "timeout"),
            "max_output": max_output,
            "encoding": encoding,
        }
        if cwd is not None:
            payload["cwd"] = _remote(cwd)
        if env:
            payload["env"] = dict(env)
        if stdin is not None:
            payload["stdin"] = stdin
        return payload

    async def shell(
        self,
        command: str,
        *,
        timeout: float = 60,
        cwd: Optional[str] = None,
        env: Optional[dict[str, str]] = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        stdin: Optional[str] = None,
        encoding: str = "text",
    ) -> ShellResult:
        """Run ``bash -c command`` in the workspace; a non-zero exit is a result, not an error."""
        payload = self._shell_payload(command, timeout, cwd, env, max_output, stdin, encoding)
        data, response = await self._json(
            "POST", "/v1/shell", body=payload, timeout=self._command_timeout(timeout)
        )
        if isinstance(data, dict):
            data = {**data, "command": command}
        return parse_model(ShellResult, data, response)

    async def shell_stream(
        self,
        command: str,
        *,
        timeout: float = 60,
        cwd: Optional[str] = None,
        env: Optional[dict[str, str]] = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
        stdin: Optional[str] = None,
        encoding: str = "text",
    ) -> AsyncIterator[Union[ShellChunk, ShellResult]]:
        """Like :meth:`shell`, yielding each :class:`ShellChunk` as it arrives, then the ShellResult.

        The final result carries the whole output collected from the chunks.
        """
        payload = self._shell_payload(command, timeout, cwd, env, max_output, stdin, encoding)
        url = self._url("/v1/shell/stream")
        collected: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        final: Optional[dict[str, Any]] = None
        with transport_errors("POST", url):
            async with self._http.stream(
                "POST", url, json=payload, headers=self._auth, timeout=self._command_timeout(timeout)
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise error_from_response(response)
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    item = _ndjson_item(line, response)
                    if "stream" in item:
                        chunk = parse_model(ShellChunk, {**item, "encoding": encoding}, response)
                        collected[chunk.stream].append(chunk.data_bytes)
                        yield chunk
                    else:
                        final = item
                        break
        if final is None:
            raise SandboxUnreachable(f"POST {redact_url(url)}: the stream ended before its final line")
        out = {name: b"".join(parts) for name, parts in collected.items()}
        if encoding == "base64":
            text = {name: base64.b64encode(raw).decode("ascii") for name, raw in out.items()}
        else:
            text = {name: raw.decode("utf-8", "replace") for name, raw in out.items()}
        yield parse_model(ShellResult, {**final, **text, "encoding": encoding, "command": command}, response)

    # --- python ---

    async def python(self, code: str, *, timeout: float = 60) -> PythonResult:
        """Run a cell in the box's kernel (state is kept between cells); an exception is a result.

        Cells run one at a time, so a cell may first wait for another caller's.
        """
        if not isinstance(code, str):
            raise InvalidRequest(f"code must be a string, got {type(code).__name__}")
        payload = {"code": code, "timeout": _seconds(timeout, "timeout")}
        data, response = await self._json("POST", "/v1/python", body=payload, timeout=self._command_timeout(timeout))
        return parse_model(PythonResult, data, response)

    async def restart_kernel(self) -> None:
        """Restart the kernel: every variable is gone afterwards."""
        await self._json("POST", "/v1/python/restart", timeout=max(self._timeout, SLOW_CALL_TIMEOUT))

    # --- files ---

    async def read_text(self, path: str) -> str:
        response = await self._send("GET", "/v1/files", params={"path": _remote(path), "format": "text"})
        return response.text

    async def read_bytes(self, path: str) -> bytes:
        response = await self._send("GET", "/v1/files", params={"path": _remote(path), "format": "bytes"})
        return response.content

    async def download(self, path: str, local_path: _Path) -> int:
        """Stream a workspace file to ``local_path`` (written whole or not at all); returns its size."""
        params = {"path": _remote(path), "format": "bytes"}
        target = os.fspath(local_path)
        partial = f"{target}.part"
        url = self._url("/v1/files")
        size = 0
        try:
            with transport_errors("GET", url):
                async with self._http.stream(
                    "GET", url, params=params, headers=self._auth, timeout=self._timeout
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        raise error_from_response(response)
                    # Plain file writes: local-disk chunks take microseconds next to the network.
                    with open(partial, "wb") as f:
                        async for chunk in response.aiter_bytes(_CHUNK):
                            f.write(chunk)
                            size += len(chunk)
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return size

    async def write(self, path: str, data: Union[str, bytes]) -> Entry:
        """Create or replace a workspace file (parents are created); a str is written as UTF-8."""
        if isinstance(data, str):
            content = data.encode("utf-8")
        elif isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
        else:
            raise InvalidRequest(f"data must be str or bytes, got {type(data).__name__}")
        body, response = await self._json(
            "PUT",
            "/v1/files",
            params={"path": _remote(path)},
            content=content,
            headers={"Content-Type": "application/octet-stream"},
        )
        return parse_model(Entry, body, response)

    async def upload(self, local_path: _Path, path: str) -> Entry:
        """Stream a local file into the workspace without loading it into memory."""
        source = os.fspath(local_path)
        if not os.path.isfile(source):
            raise NotFound(f"no local file {source!r} to upload")
        size = os.path.getsize(source)
        body, response = await self._json(
            "PUT",
            "/v1/files",
            params={"path": _remote(path)},
            content=_file_chunks(source),
            # A known length lets the box stream to disk without chunked decoding.
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=httpx.Timeout(self._timeout, write=max(self._timeout, SLOW_CALL_TIMEOUT)),
        )
        return parse_model(Entry, body, response)

    async def list(self, path: str = ".", depth: int = 1) -> list[Entry]:
        """The entries below ``path``, down to ``depth`` levels."""
        data, response = await self._json("GET", "/v1/files/list", params={"path": _remote(path), "depth": depth})
        if not isinstance(data, list):
            raise malformed(response, "a list of entries", data)
        return [parse_model(Entry, item, response) for item in data]

    async def exists(self, path: str) -> bool:
        data, response = await self._json("GET", "/v1/files/exists", params={"path": _remote(path)})
        return expect(data, "exists", bool, response)

    async def delete(self, path: str, recursive: bool = False) -> None:
        """Delete a file, or a directory (non-empty ones need ``recursive=True``)."""
        await self._send("DELETE", "/v1/files", params={"path": _remote(path), "recursive": bool(recursive)})

    async def move(self, src: str, dst: str) -> Entry:
        data, response = await self._json(
            "POST", "/v1/files/move", body={"source": _remote(src), "destination": _remote(dst)}
        )
        return parse_model(Entry, data, response)

    async def mkdir(self, path: str, parents: bool = True) -> bool:
        """Create a directory; returns False if it already existed."""
        data, response = await self._json(
            "POST", "/v1/files/mkdir", body={"path": _remote(path), "parents": bool(parents)}
        )
        return expect(data, "created", bool, response)

    # --- MCP ---

    async def add_mcp_servers(self, config: dict[str, Any], overwrite: bool = False) -> list[str]:
        """Start MCP servers from ``{"mcpServers": {name: {...}}}`` (or just the inner mapping)."""
        if not isinstance(config, dict):
            raise InvalidRequest(f"config must be a dict, got {type(config).__name__}")
        servers = config["mcpServers"] if "mcpServers" in config else config
        data, response = await self._json(
            "POST",
            "/v1/mcp/servers",
            body={"mcpServers": servers, "overwrite": bool(overwrite)},
            timeout=max(self._timeout, SLOW_CALL_TIMEOUT),
        )
        return expect(data, "servers", list, response)

    async def list_tools(self) -> dict[str, list[McpTool]]:
        """Every started MCP server's tools, by server name."""
        data, response = await self._json("GET", "/v1/mcp/tools")
        if not isinstance(data, dict):
            raise malformed(response, "an object of server name to tools", data)
        return {
            server: [parse_model(McpTool, tool, response) for tool in expect(data, server, list, response)]
            for server in data
        }

    async def call_tool(
        self,
        tool: str,
        arguments: Optional[dict[str, Any]] = None,
        server: Optional[str] = None,
        *,
        timeout: float = SLOW_CALL_TIMEOUT,
    ) -> ToolResult:
        """Call an MCP tool; a tool that fails answers ``is_error=True``, not an exception."""
        if not isinstance(tool, str) or not tool:
            raise InvalidRequest(f"tool must be a non-empty string, got {tool!r}")
        data, response = await self._json(
            "POST",
            "/v1/mcp/call",
            body={"tool": tool, "arguments": dict(arguments or {}), "server": server},
            timeout=self._command_timeout(timeout),
        )
        return parse_model(ToolResult, data, response)

    # --- session ---

    async def set_env(self, env: dict[str, str]) -> None:
        """Environment for every later shell command and for the kernel's ``os.environ``."""
        if not isinstance(env, dict):
            raise InvalidRequest(f"env must be a dict of str to str, got {type(env).__name__}")
        await self._json("POST", "/v1/session", body={"env": env})

    async def reset(self, restart_kernel: bool = True, token: Optional[str] = None) -> ResetResult:
        """Make the box as good as new: kill its processes, empty the workspace, reset the kernel.

        With ``token``, the box takes that token from the moment the reset is
        done and refuses the current one; this client sends the new one from
        then on (other clients of the box keep the old and get 401). A reset
        that fails leaves the box's token, and this client's, as they were.
        """
        body: dict[str, Any] = {"restart_kernel": bool(restart_kernel)}
        if token is not None:
            body["token"] = check_token(token, "token")
        data, response = await self._json(
            "POST",
            "/v1/reset",
            body=body,
            timeout=max(self._timeout, SLOW_CALL_TIMEOUT),
        )
        result = parse_model(ResetResult, data, response)
        if token is not None:
            self._auth = {"Authorization": f"Bearer {token}"}
        return result


def _ndjson_item(line: str, response: httpx.Response) -> dict[str, Any]:
    try:
        item = json.loads(line)
    except ValueError:
        item = None
    if not isinstance(item, dict):
        raise malformed(response, "one JSON object per line", line)
    if isinstance(item.get("error"), dict):
        # The box hit an error after it had already answered 200.
        raise from_wire(item)
    return item


async def _file_chunks(path: str) -> AsyncIterator[bytes]:
    # Plain reads: local-disk chunks take microseconds next to the network.
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk
