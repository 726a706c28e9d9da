"""What a caller sees of an error raised across a Ray call: corral's own exception, unwrapped.

Ray wraps an exception raised inside an actor in a ``RayTaskError`` whose message carries the
actor's traceback; corral's callers get the original corral error with corral's message, so
``except corral.NotFound`` works and prints cleanly. An actor that is gone is a
:class:`~corral.errors.SandboxError` (infrastructure, retryable), not Ray's own exception.
"""

from __future__ import annotations

__all__ = ["unwrap"]


def unwrap(e: BaseException) -> BaseException:
    import ray.exceptions as rx

    from corral.errors import CorralError, SandboxError

    seen = 0
    while isinstance(e, rx.RayTaskError) and seen < 8:
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException):
            break
        e, seen = cause, seen + 1
    if isinstance(e, CorralError):
        return e
    if isinstance(e, rx.RayActorError):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return SandboxError(f"a corral actor is unavailable ({first[:300]}); retry once it is back")
    return e
