"""Typed answers of the box's /v1 API (see docs/box-api.md).

These are what :class:`~corral.client.AsyncBoxClient` and
:class:`~corral.client.BoxClient` return. A command or cell that failed is a
result, not an exception: ``result.ok`` says whether it succeeded and
``result.check()`` raises the matching :class:`corral.CommandError` (and
returns the result when it succeeded, so ``box.shell("make").check().stdout``
reads naturally). Unknown fields from a newer box are kept, not rejected.
"""

from __future__ import annotations

import base64
import binascii
import html
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import CommandFailed, CommandTimeout, KernelDied, PythonError

__all__ = [
    "ShellResult",
    "ShellChunk",
    "PythonResult",
    "PythonErrorInfo",
    "Entry",
    "Activity",
    "Health",
    "Info",
    "McpTool",
    "ToolResult",
    "ResetResult",
]

_TAIL = 2000  # characters of output quoted in an exception message


def _tail(text: str) -> str:
    text = text.rstrip()
    return text if len(text) <= _TAIL else "..." + text[-_TAIL:]


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class ShellResult(_Result):
    """The outcome of one shell command. ``exit_code`` is None when it timed out."""

    exit_code: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    truncated: bool = False
    duration_ms: float = 0.0
    encoding: Literal["text", "base64"] = "text"
    command: Optional[str] = Field(None, description="The command run (set by the client, for messages).")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def stdout_bytes(self) -> bytes:
        return _as_bytes(self.stdout, self.encoding)

    @property
    def stderr_bytes(self) -> bytes:
        return _as_bytes(self.stderr, self.encoding)

    def check(self) -> "ShellResult":
        """Return self if the command succeeded, else raise CommandTimeout / CommandFailed."""
        if self.ok:
            return self
        what = f"command {self.command!r}" if self.command is not None else "command"
        if self.timed_out:
            raise CommandTimeout(
                f"{what} timed out after {self.duration_ms / 1000:.1f}s", duration_ms=self.duration_ms
            )
        stderr = _tail(self.stderr if self.encoding == "text" else self.stderr_bytes.decode("utf-8", "replace"))
        message = f"{what} exited with {self.exit_code}"
        raise CommandFailed(f"{message}: {stderr}" if stderr else message, exit_code=self.exit_code)


class ShellChunk(_Result):
    """A piece of output from :meth:`shell_stream`, in the order the box read it."""

    stream: Literal["stdout", "stderr"]
    data: str
    encoding: Literal["text", "base64"] = "text"

    @property
    def data_bytes(self) -> bytes:
        return _as_bytes(self.data, self.encoding)


def _as_bytes(data: str, encoding: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"output is not valid base64: {exc}") from None
    return data.encode("utf-8")


class PythonErrorInfo(_Result):
    """The exception a cell raised."""

    ename: str = ""
    evalue: str = ""
    traceback: list[str] = Field(default_factory=list)


class PythonResult(_Result):
    """The outcome of one cell in the box's Jupyter kernel.

    ``status`` is ``ok``, ``error`` (the cell raised), ``timeout`` (interrupted)
    or ``died`` (the cell killed its kernel, which was restarted).
    ``result`` and each item of ``display`` are Jupyter mime bundles.
    """

    status: Literal["ok", "error", "timeout", "died"]
    stdout: str = ""
    stderr: str = ""
    result: Optional[dict[str, Any]] = None
    display: list[dict[str, Any]] = Field(default_factory=list)
    error: Optional[PythonErrorInfo] = None
    execution_count: Optional[int] = None
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def text(self) -> Optional[str]:
        """The cell's value as text/plain (``'2'`` for ``1 + 1``), or None."""
        if not self.result:
            return None
        value = self.result.get("text/plain")
        return value if isinstance(value, str) else None

    @property
    def images(self) -> list[bytes]:
        """PNG images the cell produced (displayed plots, then the cell's value), decoded."""
        out = []
        for bundle in [*self.display, *([self.result] if self.result else [])]:
            png = bundle.get("image/png")
            if isinstance(png, str):
                try:
                    out.append(base64.b64decode(png))
                except (binascii.Error, ValueError):
                    continue  # a malformed image must not hide the others
        return out

    def check(self) -> "PythonResult":
        """Return self if the cell succeeded, else raise PythonError / CommandTimeout / KernelDied."""
        if self.status == "ok":
            return self
        if self.status == "timeout":
            raise CommandTimeout(f"cell timed out after {self.duration_ms / 1000:.1f}s", duration_ms=self.duration_ms)
        if self.status == "died":
            raise KernelDied("the kernel died while running the cell (it has been restarted)")
        err = self.error or PythonErrorInfo()
        message = f"{err.ename}: {err.evalue}" if err.evalue else (err.ename or "the cell raised")
        raise PythonError(message, ename=err.ename, evalue=err.evalue, traceback=list(err.traceback))

    # --- notebook display: a result shows as its output, not as a dict dump ---

    def _repr_png_(self) -> Optional[bytes]:
        images = self.images
        return images[0] if len(images) == 1 and not (self.stdout or self.stderr or self.text) else None

    def _repr_html_(self) -> str:
        parts = []
        if self.stdout:
            parts.append(f"<pre>{html.escape(self.stdout)}</pre>")
        if self.stderr:
            parts.append(f'<pre style="color:#b00">{html.escape(self.stderr)}</pre>')
        for png in self.images:
            parts.append(f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}"/>')
        if self.text is not None and "image/png" not in (self.result or {}):
            parts.append(f"<pre>{html.escape(self.text)}</pre>")
        if self.error is not None:
            parts.append(f'<pre style="color:#b00">{html.escape(self.error.ename)}: {html.escape(self.error.evalue)}</pre>')
        elif self.status != "ok":
            parts.append(f"<pre style=\"color:#b00\">status: {self.status}</pre>")
        return "".join(parts) or f"<pre>status: {self.status}</pre>"


class Entry(_Result):
    """One file or directory; ``path`` is relative to the workspace."""

    path: str
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int = 0
    mtime_ms: int = 0


class Activity(_Result):
    """What a reaper asks before killing a box: ``running > 0`` means hands off."""

    last_active_at: float
    running: int
    calls_total: int
    started_at: float


class Health(_Result):
    ok: bool
    version: str = ""


class Info(_Result):
    version: str
    pid: int
    workspace: str
    started_at: float | str
    kernel: dict[str, Any] = Field(default_factory=dict)


class McpTool(_Result):
    name: str
    description: Optional[str] = None
    input_schema: dict[str, Any] = Field(default_factory=dict)


class ToolResult(_Result):
    """An MCP tool call's answer; ``is_error`` is the tool's own failure, not the box's."""

    content: list[Any] = Field(default_factory=list)
    is_error: bool = Field(False, alias="isError")
    structured_content: Any = Field(None, alias="structuredContent")


class ResetResult(_Result):
    ok: bool
    duration_ms: float = 0.0
    killed: int = 0
