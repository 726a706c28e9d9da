"""The box: the HTTP server inside every corral sandbox (docs/box-api.md).

Modules, each owning one thing:

- :mod:`~corral.box.app` - ``create_app(runtime, token)``: routes, error wire form (Starlette)
- :mod:`~corral.box.wire` - request bodies and query parameters: fields, defaults, checks
- :mod:`~corral.box.auth` - the token rule, the gate every request passes first, token rotation at reset
- :mod:`~corral.box.runtime` - :class:`BoxRuntime`: everything one sandbox owns; ``reset()``, ``close()``
- :mod:`~corral.box.shell` - ``bash -c`` in its own process group, timeout, output cap, streaming
- :mod:`~corral.box.kernel` - one real Jupyter kernel, started by the first cell, cells one at a time
- :mod:`~corral.box.forkserver` - the per-box fork server kernels are forked from, up before the
  box answers (``kernel_main.py --fork-server``: the imports paid once, a restart in ~60 ms)
- :mod:`~corral.box.workspace` - path confinement (realpath + commonpath) and file operations
- :mod:`~corral.box.mcp_host` - stdio / SSE / streamable-HTTP MCP servers via the ``mcp`` SDK
- :mod:`~corral.box.activity` - last activity, calls running, calls served
- ``python -m corral.box`` (:mod:`~corral.box.__main__`) - the process: non-dumpable, token (file, stdin
  or env), uvicorn, ready file, SIGTERM

The names below load lazily, so importing one small module (say the
workspace) does not pull in Starlette and jupyter_client.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "BoxRuntime", "Workspace"]

_LAZY = {"create_app": ".app", "BoxRuntime": ".runtime", "Workspace": ".workspace"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
