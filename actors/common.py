"""Names, options and small helpers shared by corral's actors.

Every corral actor lives in one Ray namespace (``config.namespace``) under a
fixed name, so any process of the cluster finds them with
``ray.get_actor(name, namespace=...)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Awaitable, Callable, Optional

__all__ = [
    "REGISTRY_NAME",
    "SESSION_PREFIX",
    "pool_name",
    "detached_options",
    "Ticker",
    "fire",
]

logger = logging.getLogger("corral.actors")

REGISTRY_NAME = "corral-registry"
SESSION_PREFIX = "corral-session-"


def pool_name(sandbox_type: str) -> str:
    return f"corral-pool-{sandbox_type}"


def detached_options(name: str, namespace: str, restarts: int = -1) -> dict:
    """Options of a detached, named control-plane actor that takes no CPU.

    ``max_concurrency`` is high because every method is a coroutine that mostly
    awaits other actors or the driver; the core's state changes happen between
    awaits, so the event loop serializes them.
    """
    return dict(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=restarts,
        max_task_retries=-1 if restarts else 0,
        num_cpus=0,
        max_concurrency=1000,
    )


class Ticker:
    """A loop that calls ``step`` every ``interval`` seconds and survives its errors."""

    def __init__(self, name: str, interval: float, step: Callable[[], Awaitable[Any]]) -> None:
        self.name, self.interval, self.step = name, interval, step
        self.task: asyncio.Task | None = None
        self.errors = 0
        self.last_error: str | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    def kick(self) -> None:
        """Run the next step now rather than at the end of the interval."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a reconcile loop never dies of its own errors
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                logger.warning("%s step failed: %s", self.name, self.last_error, exc_info=True)
            wait = max(0.0, self.interval - (time.monotonic() - started))
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


_background: set[asyncio.Task] = set()


def fire(coro: Awaitable[Any], what: str) -> asyncio.Task:
    """Run ``coro`` in the background, keep a reference, and log (not lose) its failure."""
    task = asyncio.ensure_future(coro)
    _background.add(task)

    def _done(t: asyncio.Task) -> None:
        _background.discard(t)
        if not t.cancelled() and t.exception() is not None:
            logger.warning("background %s failed: %r", what, t.exception())

    task.add_done_callback(_done)
    return task


#: The niceness the registry and the pools ask for. Ray starts its workers at 15, the level of
#: the sandboxes' own processes (19 on a process-driver node): on a saturated node the actors
#: that answer every acquire and release would get a sandbox's share of the CPU.
CONTROL_NICE = 0


def set_priority(nice: Optional[int] = None, increment: int = 0, idle: bool = False) -> int:
    """Set this process's CPU niceness (``nice``, or the current plus ``increment``); returns it.

    Linux keeps a niceness per thread, and Ray's threads and the actor's event loop already
    run: each is set. Raising a priority needs CAP_SYS_NICE; without it the niceness stays
    (and is returned) as it was. With ``idle`` each thread also goes under SCHED_IDLE (any
    process may lower itself so): every normal thread that wakes preempts it at once, so an
    actor whose work is never urgent adds no wait to the calls of those that answer acquires.
    Threads started later inherit both from the thread that starts them.
    """
    for tid in os.listdir("/proc/self/task"):
        try:
            cur = os.getpriority(os.PRIO_PROCESS, int(tid))
            os.setpriority(os.PRIO_PROCESS, int(tid), min(19, nice if nice is not None else cur + increment))
            if idle and hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # not permitted, or a thread that just ended
            pass
    return os.getpriority(os.PRIO_PROCESS, 0)
