"""Activity tracking: what a reaper asks before it kills a box.

:class:`Activity` owns three facts: when the box was last used, how many calls
run now, and how many calls it has served. :class:`ActivityMiddleware` (pure
ASGI, so a streamed response counts until its last byte) updates them at the
start **and** the end of every call except the status routes, so a command
that runs for an hour keeps ``running == 1`` the whole time. It sits inside
the token check (:class:`~corral.box.auth.AuthMiddleware`), so it only ever
sees authorized calls: a request without the token cannot keep a box alive.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

__all__ = ["Activity", "ActivityMiddleware", "QUIET_SUFFIXES"]

#: Routes that are not activity: polling them must not keep a box alive.
QUIET_SUFFIXES = ("/healthz", "/info", "/activity")


class Activity:
    """Counters for one box; ``reset()`` zeroes them (reuse)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.started_at = clock()
        self.last_active_at = self.started_at
        self.running = 0
        self.calls_total = 0

    def begin(self) -> None:
        self.running += 1
        self.calls_total += 1
        self.last_active_at = self._clock()

    def end(self) -> None:
        self.running = max(0, self.running - 1)
        self.last_active_at = self._clock()

    def reset(self) -> None:
        """Zero the counters; calls in flight keep counting as running."""
        self.calls_total = 0
        self.last_active_at = self._clock()

    def snapshot(self) -> dict:
        return {
            "last_active_at": self.last_active_at,
            "running": self.running,
            "calls_total": self.calls_total,
            "started_at": self.started_at,
        }


class ActivityMiddleware:
    """ASGI middleware: every HTTP call except :data:`QUIET_SUFFIXES` is activity."""

    def __init__(self, app: Callable[..., Awaitable[Any]], activity: Activity) -> None:
        self.app = app
        self.activity = activity

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("path", "").rstrip("/").endswith(QUIET_SUFFIXES):
            await self.app(scope, receive, send)
            return
        self.activity.begin()
        try:
            await self.app(scope, receive, send)
        finally:
            self.activity.end()
