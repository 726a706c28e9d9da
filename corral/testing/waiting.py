"""Waiting, for corral's tests, benchmarks and chaos harness: for a condition, for a process
that writes a ready file once it listens, and for a process to end.

Every process given here leads a session of its own (``start_new_session=True``): when it does
not end by the first signal, its whole process group is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["poll", "wait_ready_file", "stop_process"]


def poll(pred: Callable[[], Any], timeout: float, every: float = 0.1) -> Optional[Any]:
    """``pred()``'s first truthy value, asked every ``every`` seconds; None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return None


def wait_ready_file(proc: subprocess.Popen, ready: Union[str, Path], timeout: float, what: str = "the process",
                    every: float = 0.05) -> dict:
    """The JSON object ``proc`` writes to ``ready`` once it is ready.

    RuntimeError when ``proc`` exits first, or when ``timeout`` seconds pass (``proc`` is stopped then).
    """
    ready = Path(ready)
    poll(lambda: ready.exists() or proc.poll() is not None, timeout, every)
    if not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready")
        stop_process(proc)
        raise RuntimeError(f"{what} wrote no ready file within {timeout:g}s")
    return json.loads(ready.read_text())


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 15.0,
                 group: bool = False) -> None:
    """Send ``sig`` to ``proc`` (to its whole process group with ``group``) and wait ``grace`` seconds
    for it to end; then SIGKILL its process group. Nothing when it has ended already."""
    if proc.poll() is not None:
        return
    if group:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
