"""The manager: the reference's operations on corral's actors, sync and async."""

from .manager import OPERATIONS, AsyncSandbox, Sandbox, SandboxManager
from .shutdown import down

__all__ = ["SandboxManager", "OPERATIONS", "Sandbox", "AsyncSandbox", "down"]
