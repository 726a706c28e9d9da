"""Runtime shims for the sync manager core (hand-written; the async side has the same names)."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import ray

from .._errors import unwrap

__all__ = ["call", "sleep", "later", "drain", "on_loop_shutdown", "Batcher", "RegistryLink"]


def call(ref: Any) -> Any:
    """The result of an actor call (an ObjectRef); an error raised in the actor comes back as
    the corral error it was, without Ray's wrapper."""
    try:
        return ray.get(ref)
    except Exception as e:
        raise unwrap(e) from None


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def later(tasks: set, work: Any) -> None:
    """The async side runs ``work`` after the caller returns; here it has already run."""


def drain(tasks: set) -> None:
    """Nothing runs later on the sync side."""


def on_loop_shutdown(close: Callable[[], Any]) -> None:
    """No event loop on the sync side: the owner closes its connections itself."""


class Batcher:
    """The async side batches concurrent calls into one; a sync caller makes one call at a time."""

    def __init__(self, send: Callable[[list], list], orphan: Optional[Callable[[Any], Any]] = None) -> None:
        self._send = send

    def __call__(self, item: Any) -> Any:
        return self._send([item])[0]


class RegistryLink:
    """The async side sends acquires and releases over the registry's lane; a sync caller
    makes one call at a time, as a Ray call."""

    def __init__(self, cluster: Any) -> None:
        self._cluster = cluster

    def call(self, op: str, *args: Any) -> Any:
        return call(getattr(self._cluster.registry, op).remote(*args))

    def close(self) -> None:
        """Nothing to close."""
