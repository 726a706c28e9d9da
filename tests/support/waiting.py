"""Waiting in tests for what the system does in the background."""

from __future__ import annotations

from typing import Any, Callable

from corral.testing.waiting import poll


def wait_for(pred: Callable[[], Any], timeout: float = 60.0, every: float = 0.1, what: str = "condition") -> Any:
    """``pred()``'s first truthy value, polled every ``every`` seconds; AssertionError after ``timeout``."""
    v = poll(pred, timeout, every)
    if not v:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
    return v
