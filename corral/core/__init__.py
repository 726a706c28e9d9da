"""Plain-Python cores of corral's actors: no Ray, no Docker, an injected clock.

Each actor in :mod:`corral.actors` is a thin shell over one of these. Who decides what:

- :mod:`.registry` (:class:`RegistryCore`): every record and transition, what a release, a reap,
  a restore (which records come back, and where) or a new configuration means, reconciliation
  with a node's containers and its engine's reports;
- :mod:`.acquire` (:class:`AcquireCore`): acquire and hand-off, admission at the instance limit,
  reserves waiting for a warm pool, and what a caller who waited too long is told;
- :mod:`.refill` (:class:`RefillCore`): which sandboxes to start (refill) and where, which warm
  ones to drop (surplus, failed probes, unreachable);
- :mod:`.pool` (:class:`PoolCore`): one type's target, back-off, shrink and health strikes;
- :mod:`.health` (:class:`HealthCore`): which warm sandboxes to probe when (each node's probe rate);
- :mod:`.placement`: which node a new sandbox starts on;
- :mod:`.lines` (:class:`WaitLines`): who waits, in which order;
- :mod:`.status`: what the registry's ``status()`` reports;
- :mod:`.startlog` (:class:`StartLog`): a pool's finished starts, kept for a restarted registry;
- :mod:`.spares` (:class:`SessionActors`): which session actor serves which session, spares;
- :mod:`.session` (:class:`SessionCore`): when a session is idle enough to reap.
"""

from .acquire import AcquireCore
from .health import HealthCore
from .lines import WaitLines
from .placement import NodeView, place
from .pool import PoolCore
from .refill import RefillCore
from .registry import RegistryCore, ReconcilePlan, Teardown
from .session import KEEP, REAP, SessionCore
from .spares import SessionActors

__all__ = [
    "AcquireCore", "HealthCore", "PoolCore", "RefillCore", "RegistryCore", "ReconcilePlan", "Teardown", "SessionCore", "KEEP", "REAP", "WaitLines",
    "NodeView", "place", "SessionActors",
]
