"""corral: sandboxes for AI agents and RL training, run by Ray actors.

``import corral`` is light (no Ray): the manager, the clients and the handles
load on first use, so the box inside a container never imports Ray.
"""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .models import ContainerModel, ContainerState, SandboxManagerEnvConfig, SandboxTypeConfig

__version__ = "0.1.0"

_LAZY = {
    "SandboxManager": "corral.manager",
    "Sandbox": "corral.manager",
    "AsyncSandbox": "corral.manager",
    "BoxClient": "corral.client",
    "AsyncBoxClient": "corral.client",
    "ShellResult": "corral.client",
    "PythonResult": "corral.client",
}

__all__ = [
    *_errors_all, "ContainerModel", "ContainerState", "SandboxManagerEnvConfig", "SandboxTypeConfig", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'corral' has no attribute {name!r}")
