"""Runtime shims for the async manager core (hand-written; scripts/unasync.py skips ``_rt.py``).

The sync side has its own ``_rt.py`` with the same names.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["call", "gather", "sleep"]


async def call(ref: Any) -> Any:
    """The result of an actor call (an ObjectRef)."""
    return await ref


async def gather(refs: list) -> list:
    return list(await asyncio.gather(*refs))


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
