"""The box's HTTP API (docs/box-api.md): ``create_app(runtime, token)``.

The app owns no state of its own besides its :class:`~corral.box.auth.TokenGate`
(the token it accepts now): routes translate HTTP to calls on the
:class:`~corral.box.runtime.BoxRuntime` passed in, and errors to the wire form
``{"error": {"code", "message"}}``. Two route sets share one runtime: corral's
``/v1`` API and the reference's ``/fastapi`` routes with their exact shapes.

Layers, outermost first: the token check (:class:`~corral.box.auth.AuthMiddleware`:
401 on every path without the token), then activity counting, then the routes.
So a request without the token is never activity: it cannot keep a box alive.

Whoever builds the runtime starts and closes it. ``create_app(workspace=...)``
builds one itself and then runs it through the app's lifespan.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Literal, Optional

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import CorralError, InvalidRequest, to_wire
from .activity import ActivityMiddleware
from .auth import GENERATION_KEY, AuthMiddleware, TokenGate, check_token
from .runtime import BoxRuntime, check_env
from .shell import ShellRequest
from .workspace import CHUNK_SIZE

__all__ = ["create_app", "DEFAULT_MAX_OUTPUT", "REFERENCE_TIMEOUT"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT = 1 << 20
#: Largest per-stream cap a caller may ask for: output is held in memory.
MAX_OUTPUT_LIMIT = 1 << 28
#: Longest timeout a caller may ask for (a day): anything longer is a mistake.
MAX_TIMEOUT = 86400.0
#: The reference's routes carry no timeout; this bounds them (the reference had none at all).
REFERENCE_TIMEOUT = 300.0


# --- request bodies -----------------------------------------------------------


class _V1(BaseModel):
    # A misspelt field is an error, not a silently ignored option.
    model_config = ConfigDict(extra="forbid")


class ShellBody(_V1):
    command: str = Field(min_length=1)
    timeout: float = Field(60.0, gt=0, le=MAX_TIMEOUT)
    cwd: Optional[str] = None
    env: dict[str, str] = Field(default_factory=dict)
    max_output: int = Field(DEFAULT_MAX_OUTPUT, ge=0, le=MAX_OUTPUT_LIMIT)
    stdin: Optional[str] = None
    encoding: Literal["text", "base64"] = "text"


class PythonBody(_V1):
    code: str
    timeout: float = Field(60.0, gt=0, le=MAX_TIMEOUT)


class MoveBody(BaseModel):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


class MkdirBody(BaseModel):
    path: str = Field(min_length=1)
    parents: bool = True


class McpServersBody(_V1):
    mcpServers: dict[str, Any]
    overwrite: bool = False


class McpCallBody(_V1):
    tool: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)
    server: Optional[str] = None


class SessionBody(_V1):
    env: dict[str, str]


class ResetBody(_V1):
    restart_kernel: bool = True
    #: The token the box accepts once the reset is done (the next session's); None keeps the current one.
    token: Optional[str] = None


class RefCellBody(BaseModel):
    code: str
    timeout: float = Field(REFERENCE_TIMEOUT, gt=0, le=MAX_TIMEOUT)


class RefShellBody(BaseModel):
    command: str = Field(min_length=1)
    timeout: float = Field(REFERENCE_TIMEOUT, gt=0, le=MAX_TIMEOUT)


class RefAddServersBody(BaseModel):
    server_configs: dict[str, Any]
    overwrite: bool = False


class RefCallToolBody(BaseModel):
    tool_name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


# --- helpers ------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def _error(exc: CorralError) -> JSONResponse:
    status, body = to_wire(exc)
    return JSONResponse(body, status_code=status)


def _field_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _shell_request(runtime: BoxRuntime, body: ShellBody | RefShellBody) -> ShellRequest:
    cwd = None
    if getattr(body, "cwd", None) is not None:
        real = runtime.workspace.resolve(body.cwd)
        if not real.is_dir():
            raise InvalidRequest(f"cwd: {body.cwd!r} is not a directory in the workspace")
        cwd = str(real)
    return ShellRequest(
        command=body.command,
        timeout=body.timeout,
        cwd=cwd,
        env=check_env(getattr(body, "env", {}) or {}),
        max_output=getattr(body, "max_output", DEFAULT_MAX_OUTPUT),
        stdin=getattr(body, "stdin", None),
        encoding=getattr(body, "encoding", "text"),
    )


def _file_response(runtime: BoxRuntime, path: str, fmt: str) -> Response:
    real, _ = runtime.workspace.open_for_read(path)
    media = "text/plain; charset=utf-8" if fmt == "text" else "application/octet-stream"
    return FileResponse(real, media_type=media)


async def _upload_chunks(upload: Any) -> AsyncIterator[bytes]:
    while True:
        chunk = await upload.read(CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


def _ref_text(text: str, description: str) -> dict:
    return {"type": "text", "text": text, "description": description}


def _tool_v1(tool: Any) -> dict:
    return {"name": tool.name, "description": tool.description, "input_schema": tool.input_schema}


def _tool_reference(tool: Any) -> dict:
    return {
        "name": tool.name,
        "json_schema": {
            "type": "function",
            "function": {"name": tool.name, "description": tool.description or "", "parameters": tool.input_schema},
        },
    }


def _call_result(result: Any) -> dict:
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


# --- the app ------------------------------------------------------------------


def create_app(
    runtime: Optional[BoxRuntime] = None,
    token: Optional[str] = None,
    *,
    workspace: Optional[str] = None,
    tmp_dir: Optional[str] = None,
) -> FastAPI:
    """The box's ASGI app over ``runtime``, guarded by ``token``.

    Pass a started :class:`BoxRuntime` (the caller closes it), or
    ``workspace=`` to let the app build one and run it through its lifespan.
    ``token`` must pass :func:`~corral.box.auth.check_token` (16 or more visible
    ASCII characters); ``POST /v1/reset`` may replace it.
    """
    if token is None:
        raise InvalidRequest("token: the box needs a token")
    gate = TokenGate(check_token(token, "token"))
    if runtime is None:
        if workspace is None:
            raise InvalidRequest("create_app needs a runtime or a workspace")
        runtime = BoxRuntime(workspace, tmp_dir)
        owned = True
    else:
        owned = False

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if owned:
            await runtime.start()
        try:
            yield
        finally:
            if owned:
                await runtime.close()

    app = FastAPI(
        title="corral box",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.runtime = runtime
    app.state.gate = gate
    _install_error_handlers(app)
    app.include_router(_v1_routes(runtime, gate))
    app.include_router(_reference_routes(runtime), prefix="/fastapi")
    # The last added is the outermost: the token is checked before anything counts as activity.
    app.add_middleware(ActivityMiddleware, activity=runtime.activity)
    app.add_middleware(AuthMiddleware, gate=gate)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CorralError)
    async def corral_error(_request: Request, exc: CorralError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.startswith("/fastapi/"):
            # The reference's clients only check for a non-2xx status; keep FastAPI's shape there.
            return await request_validation_exception_handler(request, exc)
        return _error(InvalidRequest(_field_message(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("box: unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
        return JSONResponse(
            {"error": {"code": "corral_error", "message": f"internal error in the box ({type(exc).__name__})"}},
            status_code=500,
        )


def _v1_routes(runtime: BoxRuntime, gate: TokenGate) -> APIRouter:
    r = APIRouter(prefix="/v1")
    ws = runtime.workspace

    @r.get("/healthz")
    async def healthz() -> Response:
        return _json({"ok": True, "version": __version__})

    @r.get("/info")
    async def info() -> Response:
        return _json(await runtime.info())

    @r.get("/activity")
    async def activity() -> Response:
        return _json(runtime.activity.snapshot())

    @r.post("/shell")
    async def shell(body: ShellBody) -> Response:
        outcome = await runtime.shell.run(_shell_request(runtime, body))
        return _json(outcome.encode(body.encoding))

    @r.post("/shell/stream")
    async def shell_stream(body: ShellBody) -> Response:
        req = _shell_request(runtime, body)

        async def lines() -> AsyncIterator[bytes]:
            async for item in runtime.shell.stream(req):
                yield (json.dumps(item) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @r.post("/python")
    async def python(body: PythonBody) -> Response:
        return _json(await runtime.kernel.execute(body.code, body.timeout))

    @r.post("/python/restart")
    async def python_restart() -> Response:
        await runtime.kernel.restart(wait=True)
        return _json({"restarted": True})

    @r.get("/files")
    async def read_file(path: str = Query(min_length=1), format: Literal["text", "bytes"] = "text") -> Response:
        return _file_response(runtime, path, format)

    @r.put("/files")
    async def write_file(request: Request, path: str = Query(min_length=1)) -> Response:
        return _json(await ws.write_stream(path, request.stream()))

    @r.get("/files/list")
    async def list_files(path: str = ".", depth: int = Query(1, ge=1, le=64)) -> Response:
        return _json(ws.list(path, depth))

    @r.get("/files/exists")
    async def exists(path: str = Query(min_length=1)) -> Response:
        return _json({"exists": ws.exists(path)})

    @r.delete("/files")
    async def delete(path: str = Query(min_length=1), recursive: bool = False) -> Response:
        ws.delete(path, recursive)
        return Response(status_code=204)

    @r.post("/files/move")
    async def move(body: MoveBody) -> Response:
        return _json(ws.move(body.source, body.destination))

    @r.post("/files/mkdir")
    async def mkdir(body: MkdirBody) -> Response:
        return _json({"created": ws.mkdir(body.path, body.parents)})

    @r.post("/mcp/servers")
    async def mcp_servers(body: McpServersBody) -> Response:
        names = await runtime.mcp.add_servers({"mcpServers": body.mcpServers}, body.overwrite)
        return _json({"servers": names})

    @r.get("/mcp/tools")
    async def mcp_tools() -> Response:
        return _json({name: [_tool_v1(t) for t in tools] for name, tools in runtime.mcp.list_tools().items()})

    @r.post("/mcp/call")
    async def mcp_call(body: McpCallBody) -> Response:
        result = await runtime.mcp.call_tool(body.tool, body.arguments, body.server)
        data = _call_result(result)
        return _json({"content": data.get("content", []), "isError": data.get("isError", False),
                      "structuredContent": data.get("structuredContent")})

    @r.post("/session")
    async def session(body: SessionBody) -> Response:
        await runtime.set_env(body.env)
        return _json({"ok": True})

    @r.post("/reset")
    async def reset(request: Request, body: Optional[ResetBody] = None) -> Response:
        body = body or ResetBody()
        if body.token is not None:
            check_token(body.token, "token")
        generation = request.scope.get("state", {}).get(GENERATION_KEY, gate.generation)
        result = await gate.rotate(generation, lambda: runtime.reset(body.restart_kernel), body.token)
        return _json(result)

    return r


def _reference_routes(runtime: BoxRuntime) -> APIRouter:
    """The reference's in-sandbox routes (seed-protocol.md §5), same JSON in and out."""
    r = APIRouter()
    ws = runtime.workspace

    @r.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @r.post("/tools/run_ipython_cell")
    async def run_ipython_cell(body: RefCellBody) -> Response:
        cell = await runtime.kernel.execute(body.code, body.timeout)
        stdout, stderr = cell["stdout"], cell["stderr"]
        result = cell.get("result") or {}
        if "text/plain" in result:
            # The reference ran cells in an IPython shell whose result was printed to stdout.
            stdout += result["text/plain"] + "\n"
        if cell["error"]:
            stderr += "\n".join(cell["error"]["traceback"]) + "\n"
        if cell["status"] == "timeout":
            stderr += f"cell timed out after {body.timeout:g}s and was interrupted\n"
        content = [_ref_text(stdout, "stdout"), _ref_text(stderr, "stderr")]
        for bundle in [result, *cell["display"]]:
            for mime in ("image/png", "image/jpeg"):
                if mime in bundle:
                    content.append({"type": "image", "data": bundle[mime], "mimeType": mime})
        return _json({"content": content, "isError": cell["status"] != "ok"})

    @r.post("/tools/run_shell_command")
    async def run_shell_command(body: RefShellBody) -> Response:
        outcome = await runtime.shell.run(_shell_request(runtime, body))
        stdout = outcome.stdout.decode("utf-8", errors="replace")
        stderr = outcome.stderr.decode("utf-8", errors="replace")
        if outcome.timed_out:
            stderr += f"\ncommand timed out after {body.timeout:g}s and was killed\n"
        code = outcome.exit_code if outcome.exit_code is not None else -9
        content = [_ref_text(stdout, "stdout"), _ref_text(stderr, "stderr"), _ref_text(str(code), "returncode")]
        return _json({"content": content, "isError": outcome.exit_code != 0})

    @r.post("/mcp/add_servers")
    async def add_servers(body: RefAddServersBody) -> Response:
        await runtime.mcp.add_servers(body.server_configs, body.overwrite)
        return _json("OK")

    @r.get("/mcp/list_tools")
    async def list_tools() -> Response:
        tools = runtime.mcp.list_tools()
        return _json({name: {t.name: _tool_reference(t) for t in items} for name, items in tools.items()})

    @r.post("/mcp/call_tool")
    async def call_tool(body: RefCallToolBody) -> Response:
        return _json(_call_result(await runtime.mcp.call_tool(body.tool_name, body.arguments)))

    @r.get("/workspace/file")
    async def read_file(path: str = Query(min_length=1), format: Literal["text", "bytes"] = "text") -> Response:
        return _file_response(runtime, path, format)

    @r.put("/workspace/file")
    async def write_file(request: Request, path: str = Query(min_length=1)) -> Response:
        return _json(await ws.write_stream(path, request.stream()))

    @r.post("/workspace/files:batch")
    async def write_batch(request: Request) -> Response:
        form = await request.form()
        try:
            files = form.getlist("files[]") or form.getlist("files")
            paths = form.getlist("paths[]") or form.getlist("paths")
            if not files:
                raise InvalidRequest("files[]: at least one file is required")
            if any(isinstance(f, str) for f in files):
                raise InvalidRequest("files[]: every part must be a file upload")
            if paths and len(paths) != len(files):
                raise InvalidRequest(f"paths[]: {len(paths)} paths for {len(files)} files")
            targets = [str(p) for p in paths] if paths else [f.filename or "" for f in files]
            if not all(targets):
                raise InvalidRequest("paths[]: a file has no name; send paths[]")
            entries = [await ws.write_stream(t, _upload_chunks(f)) for f, t in zip(files, targets)]
        finally:
            await form.close()
        return _json(entries)

    @r.get("/workspace/list")
    async def list_files(path: str = ".", depth: int = Query(1, ge=1, le=64)) -> Response:
        return _json(ws.list(path, depth))

    @r.get("/workspace/exists")
    async def exists(path: str = Query(min_length=1)) -> Response:
        return _json({"exists": ws.exists(path)})

    @r.delete("/workspace/entry")
    async def delete(path: str = Query(min_length=1), recursive: bool = True) -> Response:
        ws.delete(path, recursive)
        return Response(status_code=204)

    @r.post("/workspace/move")
    async def move(body: MoveBody) -> Response:
        return _json(ws.move(body.source, body.destination))

    @r.post("/workspace/mkdir")
    async def mkdir(body: MkdirBody) -> Response:
        return _json({"created": ws.mkdir(body.path, body.parents)})

    return r
