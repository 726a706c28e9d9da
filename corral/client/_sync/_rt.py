"""Runtime shims for the sync client (hand-written; scripts/unasync.py skips ``_rt.py``).

The async side has its own ``_rt.py`` with the same names.
"""

from __future__ import annotations

import time

__all__ = ["sleep", "FAST_HTTP", "FastHttp"]

#: The sync client has no faster transport than httpx's: every request goes through it.
FAST_HTTP = False
FastHttp = None


def sleep(seconds: float) -> None:
    time.sleep(seconds)
