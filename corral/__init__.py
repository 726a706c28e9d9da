"""corral: sandboxes for AI agents and RL training, run by Ray actors.

``import corral`` is light (no Ray, no pydantic): the models, the manager, the
clients and the handles load on first use, so the box inside a container
imports none of them.
"""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

__version__ = "0.1.0"

# The box (in every sandbox) imports corral.errors, and so this module, while it starts: the
# pydantic models and everything else load on first use, not in each sandbox's start.
_LAZY = {
    "ContainerModel": "corral.models",
    "ContainerState": "corral.models",
    "SandboxManagerEnvConfig": "corral.models",
    "SandboxTypeConfig": "corral.models",
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
