"""Small helpers shared by corral's actors: the tick loop, background tasks, the outbox, CPU priority.

Every corral actor lives in one Ray namespace (``config.namespace``) under a
fixed name (:mod:`actors.handles`), so any process of the cluster finds them
with ``ray.get_actor(name, namespace=...)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Awaitable, Callable, Optional

__all__ = ["Ticker", "Outbox", "fire", "set_priority", "CONTROL_NICE", "registry_options"]

logger = logging.getLogger("corral.actors")


def registry_options(name: str, namespace: str, node: str | None = None) -> dict:
    """Options of the detached, named registry: restarted forever, calls to it retried across a
    restart (every method is safe to retry), no CPU reserved, and placed on ``node`` (the node of
    the process that starts it: its state dir is on that node's disk) while that node lives.

    ``max_concurrency`` is high because every method is a coroutine that mostly awaits other
    actors; the core's state changes happen between awaits, so the event loop serializes them.
    """
    opts = dict(name=name, namespace=namespace, lifetime="detached", get_if_exists=True, max_restarts=-1,
                max_task_retries=-1, num_cpus=0, max_concurrency=1000)
    if node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    return opts


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


class Outbox:
    """Messages decided while answering a call, sent after the answer, in the order decided.

    What it owns: the queue and the one task that sends it. A call's handler puts its messages
    (teardowns for the pools, attaches for session actors) and returns; the sender wakes on the
    next turn of the event loop, once the answer in hand has been handed to Ray or the lane, and
    passes everything queued by then to ``send`` as one list, so a burst's messages go out
    together and in order.
    """

    def __init__(self, send: Callable[[list], Awaitable[None]]) -> None:
        self._send = send
        self._items: list = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: Optional[asyncio.Task] = None

    def put(self, *msgs: Any) -> None:
        if not msgs:
            return
        self._items.extend(msgs)
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # the answer being returned goes out first
            items, self._items = self._items, []
            try:
                await self._send(items)
            except Exception as e:  # a message that cannot be sent is logged, never lost silently
                logger.warning("outbox: sending %d messages failed: %r", len(items), e, exc_info=True)
            if not self._items:
                self._idle.set()

    async def flush(self) -> None:
        """Wait until everything queued so far has been handed to ``send``."""
        await self._idle.wait()


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
