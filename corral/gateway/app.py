"""The gateway's HTTP API: ``create_app(backend, tokens, settings)``.

Routes (docs/remote.md has the details):

- ``GET /health``: ``{"status": "healthy", "version": ...}``, the only route without a token.
- ``POST /<operation>`` (and ``POST /<operation>_async``, the path the
  reference's async client posts to): the operation's keyword arguments as a
  JSON object; the answer is ``{"data": <return value>}``.
- ``/proxy/{identity}/{path}`` (GET, POST, PUT, DELETE, PATCH): forwarded to
  that sandbox's box with the box's own token swapped in.

Errors are ``{"error": {"code", "message", "retryable"}}`` with the status of
the corral error (``Retry-After`` on 429 and 503; Ray's errors, from actors
that died or restart, are 503), never a string in place of a value. The app owns no state beyond its
connections to boxes; the backend is passed in and closed by its owner.
"""

from __future__ import annotations

import inspect
import json
import logging
from contextlib import asynccontextmanager
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray.exceptions import RayError
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.errors import CorralError, InvalidRequest, NotFound, SandboxGone, SandboxUnreachable

from .auth import Tenants
from .backend import OPERATIONS, PARAMETERS, Backend, TenantOps
from .guard import BadRequest, Guard, error_response_parts
from .proxy import BoxProxy, Routes, StaleRoute
from .settings import GatewaySettings

__all__ = ["create_app", "PROXY_METHODS"]

logger = logging.getLogger("corral.gateway")

PROXY_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH"]
_ALIASES = {f"{op}_async": op for op in OPERATIONS}
#: Operations that may release, stop or move a tenant's sandboxes: its remembered /proxy routes go.
_MOVING = frozenset({"release", "start", "stop", "reap_session", "restore_session", "cleanup"})
#: Operations that hand out a sandbox: released again if their caller has gone.
_CREATING = frozenset({"create", "create_from_pool", "acquire"})


def _error(exc: CorralError) -> JSONResponse:
    status, body, headers = error_response_parts(exc)
    return JSONResponse(body, status_code=status, headers={k.decode(): v.decode() for k, v in headers})


def _arguments(op: str, raw: bytes) -> dict:
    """The JSON object of an operation's keyword arguments, checked against its signature."""
    if raw.strip():
        try:
            args = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"{op}: the body is not JSON ({e})") from None
    else:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest(f"{op}: the body must be a JSON object of keyword arguments, got {type(args).__name__}")
    params = PARAMETERS[op]
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise InvalidRequest(f"{op}: unexpected argument(s) {', '.join(map(repr, unknown))}; "
                             f"it takes {', '.join(params) or 'none'}")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in args]
    if missing:
        raise InvalidRequest(f"{op}: missing argument(s) {', '.join(map(repr, missing))}")
    return args


def create_app(
    backend: Any,
    tokens: Union[Tenants, str],
    settings: Optional[GatewaySettings] = None,
) -> FastAPI:
    """The gateway's ASGI app in front of ``backend`` (a SandboxManager or AsyncOps).

    ``tokens`` is a :class:`Tenants` or the text of a tokens file (``<tenant> <token>``
    lines); with no token the app is not built (it never runs open).
    """
    tenants = tokens if isinstance(tokens, Tenants) else Tenants.parse(tokens)
    settings = settings or GatewaySettings()
    if not isinstance(settings, GatewaySettings):
        raise InvalidRequest(f"settings must be a GatewaySettings, got {type(settings).__name__}")
    b = Backend(backend)
    proxy = BoxProxy(settings)
    routes = Routes(settings.proxy_route_ttl)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await proxy.aclose()  # the backend is its owner's to close

    app = FastAPI(title="corral gateway", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.proxy = proxy
    app.state.routes = routes
    app.state.backend = b
    app.state.tenants = tenants
    app.state.settings = settings

    def ops(request: Request) -> TenantOps:
        return TenantOps(b, request.state.tenant, allow_host_paths=settings.allow_host_paths)

    @app.exception_handler(CorralError)
    async def corral_error(_request: Request, exc: CorralError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(NotFound(f"no route {request.method} {request.url.path}"))
        err = InvalidRequest(str(exc.detail))
        err.status = exc.status_code
        return _error(err)

    @app.exception_handler(RayError)
    async def control_plane(_request: Request, exc: Exception) -> JSONResponse:
        # An actor died or restarts (the registry, a pool): infrastructure, worth a retry.
        logger.warning("gateway: corral's actors did not answer: %s", type(exc).__name__)
        return _error(SandboxUnreachable(f"corral's actors did not answer ({type(exc).__name__}); retry"))

    # Any other exception is answered (500) and logged by the Guard, which every request passes.

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "healthy", "version": __version__})

    @app.post("/{op}")
    async def operation(op: str, request: Request) -> Response:
        name = _ALIASES.get(op, op)
        if name not in PARAMETERS:
            raise NotFound(f"no operation {op!r}")
        args = _arguments(name, await request.body())
        tenant_ops = ops(request)
        if name in _MOVING:
            routes.forget(tenant_ops.tenant)
        result = await getattr(tenant_ops, name)(**args)
        if name in _CREATING and await request.is_disconnected():
            # Nobody will learn this sandbox's name: give it back rather than leave it running.
            made = result["container_name"] if isinstance(result, dict) else result
            logger.info("gateway: client of %s left before its answer; releasing %s", name, made)
            await tenant_ops.release(made)
        return JSONResponse({"data": result})

    @app.api_route("/proxy/{identity}/{path:path}", methods=PROXY_METHODS)
    async def proxy_route(identity: str, path: str, request: Request) -> Response:
        tenant_ops = ops(request)
        reusable = Routes.reusable(request)
        if reusable and (known := routes.get(tenant_ops.tenant, identity)) is not None:
            try:
                return await proxy.forward(request, known, remembered=True)
            except StaleRoute:
                routes.forget(tenant_ops.tenant, identity)
        rec = await tenant_ops.live_record(identity)
        if rec.get("state") not in ("RUNNING", "WARM") or not rec.get("url") or not rec.get("runtime_token"):
            # A reaped (RECYCLED) sandbox: the client restores its session, then calls again.
            raise SandboxGone(f"sandbox {identity} is {rec.get('state')}: restore its session")
        if reusable:
            routes.put(tenant_ops.tenant, identity, rec)
        return await proxy.forward(request, rec)

    app.add_middleware(Guard, tenants=tenants, settings=settings)
    return app
