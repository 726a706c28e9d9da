"""Waiters: the futures of the registry's callers waiting in line.

What it owns: a future per waiter id. Who waits, in which order, and who gets what is the
registry core's (:class:`~corral.core.lines.WaitLines`, ``hand_off``, ``admit``); this keeps the
caller's side of it: a new waiter, its answer, and its timeout (taken out of the line, unless its
sandbox came at that very moment).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Callable

from corral.core.lines import WaitLines
from corral.errors import CapacityError

__all__ = ["Waiters"]


class Waiters:
    """See the module docstring."""

    def __init__(self, lines: WaitLines) -> None:
        self.lines = lines
        self._ids = itertools.count(1)
        self._futs: dict[int, asyncio.Future] = {}

    def new(self) -> tuple[int, asyncio.Future]:
        wid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._futs[wid] = fut
        return wid, fut

    def resolve(self, wid: int, value: Any) -> None:
        fut = self._futs.pop(wid, None)
        if fut is not None and not fut.done():
            if isinstance(value, BaseException):
                fut.set_exception(value)
            else:
                fut.set_result(value)

    async def wait(self, wid: int, fut: asyncio.Future, timeout: float, describe: Callable[[], str]) -> Any:
        """The waiter's answer, or :class:`CapacityError` (``describe()`` says why) after ``timeout``."""
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            if self.lines.cancel(wid):
                raise CapacityError(describe()) from None
            return await fut  # handed its sandbox just as the wait ran out
        finally:
            self._futs.pop(wid, None)
