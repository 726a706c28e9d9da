"""corral's one exception tree.

Every error corral raises, in-process, across a Ray actor call or over HTTP, is
one of these. The tree::

    CorralError                      code              status  retryable
    ├── InvalidRequest (ValueError)  invalid_request    422     no   bad input, names the problem
    │   └── UnknownSandboxType       unknown_sandbox_type 422   no
    ├── NotFound (LookupError)       not_found          404     no   unknown identity, file, route
    ├── Unauthorized                 unauthorized       401     no   missing or wrong token
    ├── Forbidden                    forbidden          403     no   e.g. a path outside the workspace
    ├── Conflict                     conflict           409     no   e.g. a name that already exists
    ├── CapacityError                capacity           429     yes  instance limit reached, wait timed out
    ├── SandboxError                 sandbox_error      503     yes  INFRASTRUCTURE: the sandbox failed
    │   ├── SandboxUnreachable       sandbox_unreachable 503    yes  no answer (connect error, read timeout)
    │   ├── SandboxGone              sandbox_gone       410     yes  the container vanished or was reaped
    │   ├── DriverError              driver_error       502     yes  the backend (Docker, process) failed
    │   └── StorageError             storage_error      502     yes  workspace storage failed or is incomplete
    └── CommandError                 command_error      200*    no   THE TASK'S OWN RESULT
        ├── CommandFailed            command_failed              a shell command exited non-zero
        ├── CommandTimeout           command_timeout             a command or cell hit its timeout
        ├── PythonError              python_error                a cell raised
        └── KernelDied               kernel_died                 a cell killed its kernel (restarted)

    * a CommandError is never an HTTP error: the box answers 200 with the
      result, and ``result.check()`` raises the matching CommandError.

RL trainers mask episodes that end in a ``SandboxError`` (retry them) and learn
from those that end in a ``CommandError``. ``err.retryable`` says which.

On the wire an error is ``{"error": {"code": ..., "message": ...}}`` with the
status above; :func:`from_wire` turns it back into the same class. Every class
pickles (Ray ships exceptions between processes), so a Ray caller can
``except corral.NotFound``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CorralError",
    "InvalidRequest",
    "UnknownSandboxType",
    "NotFound",
    "Unauthorized",
    "Forbidden",
    "Conflict",
    "CapacityError",
    "SandboxError",
    "SandboxUnreachable",
    "SandboxGone",
    "DriverError",
    "StorageError",
    "CommandError",
    "CommandFailed",
    "CommandTimeout",
    "PythonError",
    "KernelDied",
    "error_class",
    "from_wire",
    "to_wire",
]


class CorralError(Exception):
    """Root of every corral error. ``code`` and ``status`` are its wire form."""

    code: str = "corral_error"
    status: int = 500
    retryable: bool = False

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __reduce__(self):  # keeps details across pickling (Ray, multiprocessing)
        return (_rebuild, (type(self), self.message, self.details))

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def _rebuild(cls, message, details):
    return cls(message, **details)


class InvalidRequest(CorralError, ValueError):
    """The caller asked for something malformed or impossible; nothing was done."""

    code, status = "invalid_request", 422


class UnknownSandboxType(InvalidRequest):
    code = "unknown_sandbox_type"


class NotFound(CorralError, LookupError):
    code, status = "not_found", 404


class Unauthorized(CorralError):
    code, status = "unauthorized", 401


class Forbidden(CorralError):
    code, status = "forbidden", 403


class Conflict(CorralError):
    code, status = "conflict", 409


class CapacityError(CorralError):
    """No sandbox could be had in time (instance limit, or the wait timed out)."""

    code, status, retryable = "capacity", 429, True


class SandboxError(CorralError):
    """The sandbox itself failed: infrastructure, not the task. Retry or mask."""

    code, status, retryable = "sandbox_error", 503, True


class SandboxUnreachable(SandboxError):
    code = "sandbox_unreachable"


class SandboxGone(SandboxError):
    code, status = "sandbox_gone", 410


class DriverError(SandboxError):
    code, status = "driver_error", 502


class StorageError(SandboxError):
    """Workspace storage (a directory or an OSS bucket) failed, refused us, or holds an incomplete sync.

    The message says which operation on which path or key failed and why; it never
    holds a credential.
    """

    code, status = "storage_error", 502


class CommandError(CorralError):
    """The task's own code failed (non-zero exit, exception, timeout). Learn from it."""

    code, status, retryable = "command_error", 200, False


class CommandFailed(CommandError):
    code = "command_failed"


class CommandTimeout(CommandError):
    code = "command_timeout"


class PythonError(CommandError):
    code = "python_error"


class KernelDied(CommandError):
    code = "kernel_died"


def _all_classes(root: type) -> list[type]:
    out = [root]
    for sub in root.__subclasses__():
        out.extend(_all_classes(sub))
    return out


_BY_CODE = {cls.code: cls for cls in _all_classes(CorralError)}


def error_class(code: str) -> type[CorralError]:
    """The class for a wire code; unknown codes map to the root."""
    return _BY_CODE.get(code, CorralError)


def from_wire(body: Any, status: int | None = None) -> CorralError:
    """Rebuild an exception from ``{"error": {"code", "message"}}`` (or anything else)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return error_class(str(err.get("code", "")))(str(err.get("message", "")))
    if status is not None:
        for cls in (Unauthorized, Forbidden, NotFound, Conflict, CapacityError):
            if cls.status == status:
                return cls(f"HTTP {status}: {str(body)[:500]}")
        if status >= 500:
            return SandboxError(f"HTTP {status}: {str(body)[:500]}")
        if status >= 400:
            return InvalidRequest(f"HTTP {status}: {str(body)[:500]}")
    return CorralError(str(body)[:500])


def to_wire(exc: CorralError) -> tuple[int, dict]:
    """(status, body) for an HTTP answer."""
    status = exc.status if exc.status >= 400 else 500
    return status, {"error": exc.to_dict()}
