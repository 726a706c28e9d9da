"""Runtime shims for the async client (hand-written; scripts/unasync.py skips ``_rt.py``).

The sync side has its own ``_rt.py`` with the same names.
"""

from __future__ import annotations

import asyncio

__all__ = ["sleep"]


async def sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
