"""AsyncSandbox: one acquired sandbox, for people and rollout workers.

What it owns: the sandbox's record (name, session, url, token) and a box
client that talks to the box directly (data plane: no actor on the path of a
tool call). If the box stops answering because its session was reaped, the
handle asks the manager to restore the session (same workspace, new
container) and retries the call once. ``release()`` is idempotent; leaving an
``async with`` block releases.

This module is the source of the generated sync ``Sandbox`` (scripts/unasync.py).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional

from corral.client import AsyncBoxClient
from corral.errors import SandboxGone, SandboxUnreachable

__all__ = ["AsyncSandbox"]


class AsyncSandbox:
    """A sandbox bound to a session. Calls go straight to its box."""

    def __init__(self, ops: Any, record: dict, box: AsyncBoxClient) -> None:
        self._ops = ops
        self.record = record
        self.box = box
        self.released = False

    @property
    def name(self) -> str:
        return self.record["container_name"]

    @property
    def session_ctx_id(self) -> Optional[str]:
        return self.record.get("session_ctx_id")

    @property
    def sandbox_type(self) -> Optional[str]:
        return self.record.get("sandbox_type")

    @property
    def url(self) -> Optional[str]:
        return self.record.get("url")

    @property
    def workspace(self) -> Optional[str]:
        """The host directory mounted as the sandbox's workspace."""
        return self.record.get("mount_dir")

    def __repr__(self) -> str:
        state = "released" if self.released else self.record.get("state")
        return f"<Sandbox {self.name} type={self.sandbox_type} session={self.session_ctx_id} {state}>"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>"
            for k, v in (("name", self.name), ("type", self.sandbox_type), ("session", self.session_ctx_id),
                         ("state", "released" if self.released else self.record.get("state")),
                         ("url", self.url), ("workspace", self.workspace))
        )
        return f"<table>{rows}</table>"

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return await getattr(self.box, method)(*args, **kwargs)
        except (SandboxUnreachable, SandboxGone):
            if self.released or not await self._refresh():
                raise
            return await getattr(self.box, method)(*args, **kwargs)

    async def _refresh(self) -> bool:
        """Re-read the record, restoring a reaped session; True when the box changed."""
        record = await self._ops._live(self.name)
        if record["container_name"] == self.name and record.get("url") == self.url:
            return False
        self.record = record
        self.box = self._ops._box(record)
        return True

    # -- tools -------------------------------------------------------------------

    async def shell(self, command: str, **kwargs: Any):
        """Run a bash command; returns a ShellResult (``.check()`` raises on a non-zero exit)."""
        return await self._call("shell", command, **kwargs)

    async def shell_stream(self, command: str, **kwargs: Any) -> AsyncIterator[Any]:
        """Yield output chunks as they come, then the final ShellResult."""
        async for item in self.box.shell_stream(command, **kwargs):
            yield item

    async def python(self, code: str, **kwargs: Any):
        """Run a cell in the sandbox's Jupyter kernel; returns a PythonResult."""
        return await self._call("python", code, **kwargs)

    async def restart_kernel(self) -> Any:
        return await self._call("restart_kernel")

    async def read_text(self, path: str) -> str:
        return await self._call("read_text", path)

    async def read_bytes(self, path: str) -> bytes:
        return await self._call("read_bytes", path)

    async def write(self, path: str, data: Any) -> Any:
        return await self._call("write", path, data)

    async def upload(self, local_path: str, path: str) -> Any:
        return await self._call("upload", local_path, path)

    async def download(self, path: str, local_path: str) -> Any:
        return await self._call("download", path, local_path)

    async def list(self, path: str = ".", depth: int = 1) -> Any:
        return await self._call("list", path, depth)

    async def exists(self, path: str) -> bool:
        return await self._call("exists", path)

    async def delete(self, path: str, recursive: bool = False) -> Any:
        return await self._call("delete", path, recursive)

    async def move(self, source: str, destination: str) -> Any:
        return await self._call("move", source, destination)

    async def mkdir(self, path: str) -> Any:
        return await self._call("mkdir", path)

    async def add_mcp_servers(self, config: dict, overwrite: bool = False) -> Any:
        return await self._call("add_mcp_servers", config, overwrite)

    async def list_tools(self) -> Any:
        return await self._call("list_tools")

    async def call_tool(self, tool: str, arguments: Optional[dict] = None, server: Optional[str] = None) -> Any:
        return await self._call("call_tool", tool, arguments or {}, server)

    async def activity(self) -> Any:
        return await self._call("activity")

    # -- lifecycle ---------------------------------------------------------------

    async def heartbeat(self) -> bool:
        """Count as activity without calling the box (tool calls already do)."""
        if not self.session_ctx_id:
            return False
        return await self._ops.heartbeat(self.session_ctx_id)

    async def release(self) -> bool:
        """Give the sandbox back (reset for reuse or destroyed, per its type). Idempotent."""
        if self.released:
            return True
        self.released = True
        return await self._ops.release(self.name)

    async def __aenter__(self) -> "AsyncSandbox":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()
