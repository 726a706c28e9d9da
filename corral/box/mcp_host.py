"""MCP servers hosted by the box (the ``mcp`` SDK's client side).

:class:`McpHost` owns the MCP servers added to this box. Each server lives in
one background task that enters its transport and ``ClientSession`` through an
``AsyncExitStack`` and leaves them from the same task (anyio's cancel scopes
demand it); calls from request handlers go through the open session.
Supported configs: stdio ``{"command", "args", "env", "cwd"}``, and
``{"type": "sse" | "streamable_http", "url", "headers"}``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import InvalidRequest, NotFound, SandboxError

__all__ = ["McpHost", "START_TIMEOUT"]

logger = logging.getLogger(__name__)

#: Seconds a server gets to start and answer ``initialize`` + ``tools/list``.
START_TIMEOUT = 60.0
_STOP_TIMEOUT = 5.0
_HTTP_TYPES = {"sse", "streamable_http", "streamable-http", "http"}


def _check_config(name: Any, config: Any) -> dict:
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"mcpServers: server names must be non-empty strings, got {name!r}")
    if not isinstance(config, dict):
        raise InvalidRequest(f"mcpServers.{name}: must be an object, got {type(config).__name__}")
    kind = config.get("type", "stdio" if "command" in config else None)
    if kind in (None, "stdio"):
        if not isinstance(config.get("command"), str) or not config["command"]:
            raise InvalidRequest(f"mcpServers.{name}.command: a non-empty string is required")
        args = config.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise InvalidRequest(f"mcpServers.{name}.args: must be a list of strings")
        env = config.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise InvalidRequest(f"mcpServers.{name}.env: must map strings to strings")
        return {"type": "stdio", "command": config["command"], "args": args, "env": env, "cwd": config.get("cwd")}
    if kind in _HTTP_TYPES:
        url = config.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InvalidRequest(f"mcpServers.{name}.url: an http(s) URL is required for type {kind!r}")
        headers = config.get("headers") or {}
        if not isinstance(headers, dict):
            raise InvalidRequest(f"mcpServers.{name}.headers: must be an object")
        return {"type": "sse" if kind == "sse" else "streamable_http", "url": url, "headers": headers}
    raise InvalidRequest(f"mcpServers.{name}.type: {kind!r} is not supported (use stdio, sse or streamable_http)")


class _Server:
    """One MCP server: its owning task, its session and its tool list."""

    def __init__(self, name: str, config: dict, log_path: Path, cwd: str, base_env: dict[str, str]) -> None:
        self.name = name
        self.config = config
        self.log_path = log_path
        self.cwd = cwd
        self.base_env = base_env
        self.session: Any = None
        self.tools: list[Any] = []
        self._stop = asyncio.Event()
        self._ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self._task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT)
        except asyncio.TimeoutError:
            await self.stop()
            raise InvalidRequest(f"MCP server {self.name!r} did not start within {START_TIMEOUT:g}s{self._log_tail()}")
        except Exception as exc:
            await self.stop()
            raise InvalidRequest(f"MCP server {self.name!r} failed to start: {exc}{self._log_tail()}") from None

    def _log_tail(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace")[-800:].strip()
        except OSError:
            return ""
        return f"; its stderr: {tail}" if tail else ""

    async def _open(self, stack: AsyncExitStack) -> tuple[Any, Any]:
        cfg = self.config
        if cfg["type"] == "stdio":
            from mcp import StdioServerParameters, stdio_client

            errlog = stack.enter_context(open(self.log_path, "w"))
            params = StdioServerParameters(
                command=cfg["command"],
                args=cfg["args"],
                env={**self.base_env, **cfg["env"]},
                cwd=cfg.get("cwd") or self.cwd,
            )
            return await stack.enter_async_context(stdio_client(params, errlog=errlog))
        if cfg["type"] == "sse":
            from mcp.client.sse import sse_client

            return await stack.enter_async_context(sse_client(cfg["url"], headers=cfg["headers"] or None))
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        http = await stack.enter_async_context(create_mcp_http_client(headers=cfg["headers"] or None))
        streams = await stack.enter_async_context(streamable_http_client(cfg["url"], http_client=http))
        return streams[0], streams[1]

    async def _run(self) -> None:
        from mcp import ClientSession

        try:
            async with AsyncExitStack() as stack:
                read, write = await self._open(stack)
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                self.tools = list((await session.list_tools()).tools)
                self.session = session
                self._ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            elif not self._stop.is_set():
                logger.warning("MCP server %r stopped: %s", self.name, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.session = None

    async def stop(self) -> None:
        self._stop.set()
        task = self._task
        if task is None or task.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), _STOP_TIMEOUT)
        except BaseException:
            task.cancel()
            try:
                await asyncio.wait_for(task, _STOP_TIMEOUT)
            except BaseException:
                pass

    @property
    def alive(self) -> bool:
        return self.session is not None and self._task is not None and not self._task.done()


class McpHost:
    """Owns the box's MCP servers by name. ``close()`` stops them all and is idempotent."""

    def __init__(self, cwd: str, state_dir: Path, base_env: Callable[[], dict[str, str]]) -> None:
        self._cwd = cwd
        self._state_dir = Path(state_dir)
        self._base_env = base_env
        self._servers: dict[str, _Server] = {}
        self._lock = asyncio.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._servers)

    async def add_servers(self, config: Any, overwrite: bool = False) -> list[str]:
        """Start the servers of ``{"mcpServers": {name: cfg}}``; existing names are kept unless ``overwrite``.

        Returns the names now running from this config. A server that fails to
        start is an :class:`corral.InvalidRequest` naming it (with its stderr);
        the others of the same call stay up.
        """
        if not isinstance(config, dict) or not isinstance(config.get("mcpServers"), dict):
            raise InvalidRequest('server_configs: must be {"mcpServers": {name: config}}')
        checked = {name: _check_config(name, cfg) for name, cfg in config["mcpServers"].items()}
        async with self._lock:
            todo: dict[str, _Server] = {}
            for name, cfg in checked.items():
                if name in self._servers and not overwrite and self._servers[name].alive:
                    continue
                old = self._servers.pop(name, None)
                if old is not None:
                    await old.stop()
                log = self._state_dir / f"mcp-{len(os.listdir(self._state_dir))}-{name[:40]}.log"
                todo[name] = _Server(name, cfg, log, self._cwd, self._base_env())
            results = await asyncio.gather(*(s.start() for s in todo.values()), return_exceptions=True)
            failures = []
            for (name, server), result in zip(todo.items(), results):
                if isinstance(result, BaseException):
                    failures.append(result)
                else:
                    self._servers[name] = server
            if failures:
                raise failures[0] if isinstance(failures[0], Exception) else InvalidRequest(str(failures[0]))
            return [name for name in checked if name in self._servers]

    def list_tools(self) -> dict[str, list[Any]]:
        """``{server: [mcp Tool]}`` as listed when each server started."""
        return {name: list(server.tools) for name, server in self._servers.items()}

    def _find(self, tool: str, server: Optional[str]) -> _Server:
        if server is not None:
            found = self._servers.get(server)
            if found is None:
                raise NotFound(f"no MCP server named {server!r} (have: {sorted(self._servers)})")
            if not any(t.name == tool for t in found.tools):
                raise NotFound(f"MCP server {server!r} has no tool {tool!r}")
            return found
        owners = [s for s in self._servers.values() if any(t.name == tool for t in s.tools)]
        if not owners:
            raise NotFound(f"no MCP server has a tool named {tool!r}")
        if len(owners) > 1:
            raise InvalidRequest(f"server: tool {tool!r} exists in {[s.name for s in owners]}; name the server")
        return owners[0]

    async def call_tool(self, tool: str, arguments: Optional[dict] = None, server: Optional[str] = None) -> Any:
        """Call a tool; returns the SDK's ``CallToolResult``. A dead server is a SandboxError."""
        target = self._find(tool, server)
        session = target.session
        if session is None or not target.alive:
            raise SandboxError(f"MCP server {target.name!r} is not running{target._log_tail()}")
        try:
            return await session.call_tool(tool, arguments or {})
        except Exception as exc:
            if not target.alive:
                raise SandboxError(f"MCP server {target.name!r} died during the call: {exc}") from None
            raise InvalidRequest(f"MCP call {tool!r} on {target.name!r} failed: {exc}") from None

    async def close(self) -> int:
        """Stop every server; returns how many were running."""
        async with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)
        return len(servers)
