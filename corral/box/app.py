"""The box's HTTP API (docs/box-api.md): ``create_app(runtime, token)``.

The app owns no state of its own besides its :class:`~corral.box.auth.TokenGate`
(the token it accepts now): routes translate HTTP to calls on the
:class:`~corral.box.runtime.BoxRuntime` passed in, and errors to the wire form
``{"error": {"code", "message"}}``. Two route sets share one runtime: corral's
``/v1`` API and the reference's ``/fastapi`` routes with their exact shapes.

Layers, outermost first: the token check (:class:`~corral.box.auth.AuthMiddleware`:
401 on every path without the token), then activity counting, then the routes.
So a request without the token is never activity: it cannot keep a box alive.

Built on Starlette with the request checks of :mod:`~corral.box.wire`: the box
starts in every sandbox, and FastAPI with pydantic models would cost it about
0.2 s of CPU to import, as much as the rest of the box together.

Whoever builds the runtime starts and closes it. ``create_app(workspace=...)``
builds one itself and then runs it through the app's lifespan.
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import CorralError, InvalidRequest, to_wire
from .activity import ActivityMiddleware
from .auth import GENERATION_KEY, AuthMiddleware, TokenGate, check_token
from .runtime import BoxRuntime, check_env
from .shell import ShellRequest
from .wire import Body, Field, Query, WireError
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


# --- request bodies and queries ------------------------------------------------
# corral's /v1 bodies refuse unknown fields (a misspelt option is an error, not silently
# ignored); the reference's bodies ignore them, as its server did.


def _timeout(default: float) -> Field:
    return Field(float, default, gt=0, le=MAX_TIMEOUT)


SHELL = Body({
    "command": Field(str, min_length=1),
    "timeout": _timeout(60.0),
    "cwd": Field(str, None),
    "env": Field("str_map", dict),
    "max_output": Field(int, DEFAULT_MAX_OUTPUT, ge=0, le=MAX_OUTPUT_LIMIT),
    "stdin": Field(str, None),
    "encoding": Field(str, "text", choices=("text", "base64")),
})
PYTHON = Body({"code": Field(str), "timeout": _timeout(60.0)})
MOVE = Body({"source": Field(str, min_length=1), "destination": Field(str, min_length=1)}, extra="ignore")
MKDIR = Body({"path": Field(str, min_length=1), "parents": Field(bool, True)}, extra="ignore")
MCP_SERVERS = Body({"mcpServers": Field("object"), "overwrite": Field(bool, False)})
MCP_CALL = Body({"tool": Field(str, min_length=1), "arguments": Field("object", dict), "server": Field(str, None)})
SESSION = Body({"env": Field("str_map")})
#: ``token``: the token the box accepts once the reset is done (the next session's); None keeps the current one.
RESET = Body({"restart_kernel": Field(bool, True), "token": Field(str, None)}, optional=True)
REF_CELL = Body({"code": Field(str), "timeout": _timeout(REFERENCE_TIMEOUT)}, extra="ignore")
REF_SHELL = Body({"command": Field(str, min_length=1), "timeout": _timeout(REFERENCE_TIMEOUT)}, extra="ignore")
REF_ADD_SERVERS = Body({"server_configs": Field("object"), "overwrite": Field(bool, False)}, extra="ignore")
REF_CALL_TOOL = Body({"tool_name": Field(str, min_length=1), "arguments": Field("object", dict)}, extra="ignore")

Q_READ = Query({"path": Field(str, min_length=1), "format": Field(str, "text", choices=("text", "bytes"))})
Q_PATH = Query({"path": Field(str, min_length=1)})
Q_LIST = Query({"path": Field(str, "."), "depth": Field(int, 1, ge=1, le=64)})
Q_DELETE = Query({"path": Field(str, min_length=1), "recursive": Field(bool, False)})
Q_REF_DELETE = Query({"path": Field(str, min_length=1), "recursive": Field(bool, True)})


async def _body(request: Request, spec: Body) -> dict:
    return spec.parse(await request.body())


def _query(request: Request, spec: Query) -> dict:
    return spec.parse(request.query_params.multi_items())


# --- helpers ------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)


def _error(exc: CorralError) -> JSONResponse:
    status, body = to_wire(exc)
    return JSONResponse(body, status_code=status)


def _shell_request(runtime: BoxRuntime, body: dict) -> ShellRequest:
    cwd = None
    if body.get("cwd") is not None:
        real = runtime.workspace.resolve(body["cwd"])
        if not real.is_dir():
            raise InvalidRequest(f"cwd: {body['cwd']!r} is not a directory in the workspace")
        cwd = str(real)
    return ShellRequest(
        command=body["command"],
        timeout=body["timeout"],
        cwd=cwd,
        env=check_env(body.get("env") or {}),
        max_output=body.get("max_output", DEFAULT_MAX_OUTPUT),
        stdin=body.get("stdin"),
        encoding=body.get("encoding", "text"),
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


class _Routes:
    """Routes under one prefix, declared with decorators (``@r.get("/healthz")``)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.routes: list[Route] = []

    def _add(self, method: str, path: str) -> Callable[[Callable[[Request], Awaitable[Response]]], Any]:
        def add(endpoint: Callable[[Request], Awaitable[Response]]) -> Any:
            self.routes.append(Route(self.prefix + path, endpoint, methods=[method], include_in_schema=False))
            return endpoint

        return add

    def get(self, path: str):
        return self._add("GET", path)

    def post(self, path: str):
        return self._add("POST", path)

    def put(self, path: str):
        return self._add("PUT", path)

    def delete(self, path: str):
        return self._add("DELETE", path)


def create_app(
    runtime: Optional[BoxRuntime] = None,
    token: Optional[str] = None,
    *,
    workspace: Optional[str] = None,
    tmp_dir: Optional[str] = None,
) -> Starlette:
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
    async def lifespan(_app: Starlette):
        if owned:
            await runtime.start()
        try:
            yield
        finally:
            if owned:
                await runtime.close()

    app = Starlette(
        routes=_v1_routes(runtime, gate) + _reference_routes(runtime, "/fastapi"),
        # The first is the outermost: the token is checked before anything counts as activity.
        middleware=[Middleware(AuthMiddleware, gate=gate), Middleware(ActivityMiddleware, activity=runtime.activity)],
        exception_handlers=_error_handlers(),
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.gate = gate
    return app


def _error_handlers() -> dict:
    async def corral_error(_request: Request, exc: CorralError) -> JSONResponse:
        return _error(exc)

    async def invalid(request: Request, exc: WireError) -> Response:
        if request.url.path.startswith("/fastapi/"):
            # The reference's clients only check for a non-2xx status; keep FastAPI's shape there.
            return JSONResponse({"detail": exc.detail()}, status_code=422)
        return _error(InvalidRequest(exc.message()))

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "invalid_request"
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("box: unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
        return JSONResponse(
            {"error": {"code": "corral_error", "message": f"internal error in the box ({type(exc).__name__})"}},
            status_code=500,
        )

    return {CorralError: corral_error, WireError: invalid, StarletteHTTPException: http_error, Exception: unexpected}


def _v1_routes(runtime: BoxRuntime, gate: TokenGate) -> list[Route]:
    r = _Routes("/v1")

    @r.get("/healthz")
    async def healthz(request: Request) -> Response:
        return _json({"ok": True, "version": __version__})

    @r.get("/info")
    async def info(request: Request) -> Response:
        return _json(await runtime.info())

    @r.get("/activity")
    async def activity(request: Request) -> Response:
        return _json(runtime.activity.snapshot())

    @r.post("/shell")
    async def shell(request: Request) -> Response:
        body = await _body(request, SHELL)
        outcome = await runtime.shell.run(_shell_request(runtime, body))
        return _json(outcome.encode(body["encoding"]))

    @r.post("/shell/stream")
    async def shell_stream(request: Request) -> Response:
        req = _shell_request(runtime, await _body(request, SHELL))

        async def lines() -> AsyncIterator[bytes]:
            async for item in runtime.shell.stream(req):
                yield (json.dumps(item) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @r.post("/python")
    async def python(request: Request) -> Response:
        body = await _body(request, PYTHON)
        return _json(await runtime.kernel.execute(body["code"], body["timeout"]))

    @r.post("/python/restart")
    async def python_restart(request: Request) -> Response:
        await runtime.kernel.restart(wait=True)
        return _json({"restarted": True})

    _file_routes(r, runtime, corral_paths=True)

    @r.post("/mcp/servers")
    async def mcp_servers(request: Request) -> Response:
        body = await _body(request, MCP_SERVERS)
        names = await runtime.mcp.add_servers({"mcpServers": body["mcpServers"]}, body["overwrite"])
        return _json({"servers": names})

    @r.get("/mcp/tools")
    async def mcp_tools(request: Request) -> Response:
        return _json({name: [_tool_v1(t) for t in tools] for name, tools in runtime.mcp.list_tools().items()})

    @r.post("/mcp/call")
    async def mcp_call(request: Request) -> Response:
        body = await _body(request, MCP_CALL)
        result = await runtime.mcp.call_tool(body["tool"], body["arguments"], body["server"])
        data = _call_result(result)
        return _json({"content": data.get("content", []), "isError": data.get("isError", False),
                      "structuredContent": data.get("structuredContent")})

    @r.post("/session")
    async def session(request: Request) -> Response:
        body = await _body(request, SESSION)
        await runtime.set_env(body["env"])
        return _json({"ok": True})

    @r.post("/reset")
    async def reset(request: Request) -> Response:
        body = await _body(request, RESET)
        if body["token"] is not None:
            check_token(body["token"], "token")
        generation = request.scope.get("state", {}).get(GENERATION_KEY, gate.generation)
        result = await gate.rotate(generation, lambda: runtime.reset(body["restart_kernel"]), body["token"])
        return _json(result)

    return r.routes


def _file_routes(r: _Routes, runtime: BoxRuntime, corral_paths: bool) -> None:
    """The workspace routes: ``/files...`` (corral's) or ``/workspace/...`` (the reference's names)."""
    ws = runtime.workspace
    one, many = ("/files", "/files") if corral_paths else ("/workspace/file", "/workspace")
    entry = "/files" if corral_paths else "/workspace/entry"

    @r.get(one)
    async def read_file(request: Request) -> Response:
        q = _query(request, Q_READ)
        return _file_response(runtime, q["path"], q["format"])

    @r.put(one)
    async def write_file(request: Request) -> Response:
        q = _query(request, Q_PATH)
        return _json(await ws.write_stream(q["path"], request.stream()))

    @r.get(f"{many}/list")
    async def list_files(request: Request) -> Response:
        q = _query(request, Q_LIST)
        return _json(ws.list(q["path"], q["depth"]))

    @r.get(f"{many}/exists")
    async def exists(request: Request) -> Response:
        return _json({"exists": ws.exists(_query(request, Q_PATH)["path"])})

    @r.delete(entry)
    async def delete(request: Request) -> Response:
        q = _query(request, Q_DELETE if corral_paths else Q_REF_DELETE)
        ws.delete(q["path"], q["recursive"])
        return Response(status_code=204)

    @r.post(f"{many}/move")
    async def move(request: Request) -> Response:
        body = await _body(request, MOVE)
        return _json(ws.move(body["source"], body["destination"]))

    @r.post(f"{many}/mkdir")
    async def mkdir(request: Request) -> Response:
        body = await _body(request, MKDIR)
        return _json({"created": ws.mkdir(body["path"], body["parents"])})


def _reference_routes(runtime: BoxRuntime, prefix: str) -> list[Route]:
    """The reference's in-sandbox routes (docs/box-api.md, "The reference's routes"), same JSON in and out."""
    r = _Routes(prefix)
    ws = runtime.workspace

    @r.get("/healthz")
    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"})

    @r.post("/tools/run_ipython_cell")
    async def run_ipython_cell(request: Request) -> Response:
        body = await _body(request, REF_CELL)
        cell = await runtime.kernel.execute(body["code"], body["timeout"])
        stdout, stderr = cell["stdout"], cell["stderr"]
        result = cell.get("result") or {}
        if "text/plain" in result:
            # The reference ran cells in an IPython shell whose result was printed to stdout.
            stdout += result["text/plain"] + "\n"
        if cell["error"]:
            stderr += "\n".join(cell["error"]["traceback"]) + "\n"
        if cell["status"] == "timeout":
            stderr += f"cell timed out after {body['timeout']:g}s and was interrupted\n"
        content = [_ref_text(stdout, "stdout"), _ref_text(stderr, "stderr")]
        for bundle in [result, *cell["display"]]:
            for mime in ("image/png", "image/jpeg"):
                if mime in bundle:
                    content.append({"type": "image", "data": bundle[mime], "mimeType": mime})
        return _json({"content": content, "isError": cell["status"] != "ok"})

    @r.post("/tools/run_shell_command")
    async def run_shell_command(request: Request) -> Response:
        body = await _body(request, REF_SHELL)
        outcome = await runtime.shell.run(_shell_request(runtime, body))
        stdout = outcome.stdout.decode("utf-8", errors="replace")
        stderr = outcome.stderr.decode("utf-8", errors="replace")
        if outcome.timed_out:
            stderr += f"\ncommand timed out after {body['timeout']:g}s and was killed\n"
        code = outcome.exit_code if outcome.exit_code is not None else -9
        content = [_ref_text(stdout, "stdout"), _ref_text(stderr, "stderr"), _ref_text(str(code), "returncode")]
        return _json({"content": content, "isError": outcome.exit_code != 0})

    @r.post("/mcp/add_servers")
    async def add_servers(request: Request) -> Response:
        body = await _body(request, REF_ADD_SERVERS)
        await runtime.mcp.add_servers(body["server_configs"], body["overwrite"])
        return _json("OK")

    @r.get("/mcp/list_tools")
    async def list_tools(request: Request) -> Response:
        tools = runtime.mcp.list_tools()
        return _json({name: {t.name: _tool_reference(t) for t in items} for name, items in tools.items()})

    @r.post("/mcp/call_tool")
    async def call_tool(request: Request) -> Response:
        body = await _body(request, REF_CALL_TOOL)
        return _json(_call_result(await runtime.mcp.call_tool(body["tool_name"], body["arguments"])))

    _file_routes(r, runtime, corral_paths=False)

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

    return r.routes
