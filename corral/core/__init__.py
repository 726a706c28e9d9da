"""Plain-Python cores of corral's actors: no Ray, no Docker, an injected clock.

Each actor in :mod:`corral.actors` is a thin shell over one of these.
"""

from .pool import PoolCore
from .registry import RegistryCore, ReconcilePlan, Teardown
from .session import KEEP, REAP, SessionCore

__all__ = ["PoolCore", "RegistryCore", "ReconcilePlan", "Teardown", "SessionCore", "KEEP", "REAP"]
