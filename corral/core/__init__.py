"""Plain-Python cores of corral's actors: no Ray, no Docker, an injected clock.

Each actor in :mod:`corral.actors` is a thin shell over one of these. Who decides what:

- :mod:`.registry` (:class:`RegistryCore`): every record and transition, acquire and hand-off,
  reserve and admission at the instance limit, which sandboxes to start (refill) and where,
  reconciliation with a node's containers, restore (which records come back);
- :mod:`.pool` (:class:`PoolCore`): one type's target, back-off, shrink and health strikes;
- :mod:`.placement`: which node a new sandbox starts on;
- :mod:`.lines` (:class:`WaitLines`): who waits, in which order;
- :mod:`.spares` (:class:`SessionActors`): which session actor serves which session, spares;
- :mod:`.session` (:class:`SessionCore`): when a session is idle enough to reap.
"""

from .lines import WaitLines
from .placement import NodeView, place
from .pool import PoolCore
from .registry import RegistryCore, ReconcilePlan, Teardown
from .session import KEEP, REAP, SessionCore
from .spares import SessionActors

__all__ = [
    "PoolCore", "RegistryCore", "ReconcilePlan", "Teardown", "SessionCore", "KEEP", "REAP", "WaitLines",
    "NodeView", "place", "SessionActors",
]
