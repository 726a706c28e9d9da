"""corral: sandboxes for AI agents and RL training, run by Ray actors."""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .models import ContainerModel, ContainerState, SandboxManagerEnvConfig, SandboxTypeConfig

__version__ = "0.1.0"
__all__ = [*_errors_all, "ContainerModel", "ContainerState", "SandboxManagerEnvConfig", "SandboxTypeConfig"]
