"""Runtime shims for the sync manager core (hand-written; the async side has the same names)."""

from __future__ import annotations

import time
from typing import Any

import ray

__all__ = ["call", "gather", "sleep"]


def call(ref: Any) -> Any:
    """The result of an actor call (an ObjectRef)."""
    return ray.get(ref)


def gather(refs: list) -> list:
    return list(ray.get(list(refs)))


def sleep(seconds: float) -> None:
    time.sleep(seconds)
