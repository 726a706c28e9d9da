"""Runtime shims for the async manager core (hand-written; scripts/unasync.py skips ``_rt.py``).

The sync side has its own ``_rt.py`` with the same names.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, Optional

__all__ = ["call", "gather", "sleep", "later", "drain", "on_loop_shutdown", "Batcher"]

#: Most items one batch carries (a burst beyond it goes out as several calls).
MAX_BATCH = 256


async def call(ref: Any) -> Any:
    """The result of an actor call (an ObjectRef)."""
    return await ref


async def gather(refs: list) -> list:
    return list(await asyncio.gather(*refs))


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def later(tasks: set, work: Awaitable[Any]) -> None:
    """Run ``work`` after the caller returns, as a task kept in ``tasks`` until it ends.

    The sync side's ``later`` takes the result of work already done (an unasynced call runs
    where it stands)."""
    task = asyncio.ensure_future(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def drain(tasks: set) -> None:
    """Wait for what :func:`later` started (errors were the work's own business: not raised)."""
    while tasks:
        await asyncio.gather(*list(tasks), return_exceptions=True)


def on_loop_shutdown(close: Callable[[], Awaitable[Any]]) -> Optional[asyncio.Task]:
    """Run ``close()`` when the running loop shuts down (``asyncio.run`` cancels what is left).

    Connections must be closed on the loop they were opened on: once it has closed,
    aiohttp can only report them as leaked. The returned task waits for that moment;
    cancel it after closing by hand."""
    async def guard() -> None:
        try:
            await asyncio.get_running_loop().create_future()  # never set: ends by cancellation
        finally:
            await close()

    return asyncio.get_running_loop().create_task(guard(), name="corral: close connections at loop shutdown")


class Batcher:
    """Sends the calls made while an earlier batch is in flight as one call (natural batching).

    What it owns: the queue of (item, future) of one running event loop and the task sending
    them. The first call starts the sender, whose first step comes after the coroutines woken
    in the same loop iteration, so they join; calls arriving while a batch is in flight go in
    the next one.
    There is no timer: a lone call goes out at once. ``send(items)`` returns one result per
    item, in order. A caller cancelled while its batch was in flight has its result passed to
    ``orphan`` (an acquire must not leave a sandbox bound to nobody).
    """

    def __init__(self, send: Callable[[list], Awaitable[list]],
                 orphan: Optional[Callable[[Any], Any]] = None) -> None:
        self._send = send
        self._orphan = orphan
        self._queue: list[tuple[Any, asyncio.Future]] = []
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (asyncio.run again): start afresh
            self._loop, self._queue, self._task = loop, [], None
        fut = loop.create_future()
        self._queue.append((item, fut))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        # No extra yield here: a new task's first step runs in the loop's next iteration, after
        # every coroutine already woken in this one, so those have joined the queue by then.
        while self._queue:
            batch, self._queue[:] = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                results = await self._send([item for item, _ in batch])
            except BaseException as e:  # the whole call failed: every caller of the batch sees why
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)
                elif self._orphan is not None and result is not None and not isinstance(result, BaseException):
                    self._orphan(result)
