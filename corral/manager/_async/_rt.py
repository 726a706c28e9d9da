"""Runtime shims for the async manager core (hand-written; scripts/unasync.py skips ``_rt.py``).

The sync side has its own ``_rt.py`` with the same names.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional

from corral.lane import LaneClient, LaneLost

from .._errors import unwrap

__all__ = ["call", "sleep", "later", "drain", "on_loop_shutdown", "Batcher", "RegistryLink"]

logger = logging.getLogger("corral")

#: Most items one batch carries (a burst beyond it goes out as several calls).
MAX_BATCH = 256


async def call(ref: Any) -> Any:
    """The result of an actor call (an ObjectRef); an error raised in the actor comes back as
    the corral error it was, without Ray's wrapper."""
    try:
        return await ref
    except Exception as e:
        raise unwrap(e) from None


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


class RegistryLink:
    """The registry's acquire and release calls: over its lane when this process is on the
    registry's node (~0.4 ms), else as Ray calls (~2.5 ms). See :mod:`corral.lane`.

    What it owns: this event loop's lane connection (opened on first use, closed by
    :meth:`aclose`) and when to try the lane again after it failed. The lane's address is
    the cluster's, shared by every loop of one manager. A call whose lane closed under it
    (the registry died) is sent again over Ray, which waits for the registry's restart,
    as Ray itself retries a call to an actor that died; the next call asks the registry
    for its new lane.
    """

    RETRY_AFTER = 5.0  # seconds on Ray after the lane could not be opened

    def __init__(self, cluster: Any) -> None:
        self._cluster = cluster
        self._client: Optional[LaneClient] = None
        self._lock: Optional[asyncio.Lock] = None
        self._retry_at = 0.0
        self._closed = False

    async def call(self, op: str, *args: Any) -> Any:
        client = self._client
        if client is None or client.closed:
            client = await self._open()
        if client is not None:
            try:
                return await client.call(op, *args)
            except LaneLost as e:
                logger.info("registry lane lost (%s); sending %s over Ray", e, op)
                self._cluster.lane_stale = True
        return await call(getattr(self._cluster.registry, op).remote(*args))

    async def _open(self) -> Optional[LaneClient]:
        if self._closed or time.monotonic() < self._retry_at:
            return None
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._client is not None:
                if not self._client.closed:
                    return self._client
                self._cluster.lane_stale = True  # it closed: the registry may have restarted with a new lane
                self._client = None
            try:
                if self._cluster.lane_stale:
                    self._cluster.local_lane(await call(self._cluster.registry.lane_address.remote()))
                lane = self._cluster.lane
                if lane is None:
                    self._retry_at = time.monotonic() + 60.0  # no lane on this node: ask again later
                    self._cluster.lane_stale = True
                    return None
                self._client = await LaneClient.connect(lane["path"], lane["token"])
            except (OSError, asyncio.TimeoutError) as e:  # PermissionError: a token from another registry
                logger.info("registry lane unavailable (%r); using Ray calls for %.0f s", e, self.RETRY_AFTER)
                self._cluster.lane_stale = True
                self._retry_at = time.monotonic() + self.RETRY_AFTER
                return None
            if self._closed:  # closed while connecting
                await self._client.aclose()
                self._client = None
            return self._client

    async def aclose(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.aclose()
            self._client = None
