"""How the box starts a process in a process group of its own, in the box's own session.

A process group (``setpgid``) is what the box needs for each shell command and
kernel: one signal kills the whole tree, and a terminal's Ctrl-C aimed at
someone else's foreground group does not reach it. A new *session*
(``setsid``) would give the same, and something more that hurts: on Linux with
``kernel.sched_autogroup_enabled=1`` (the default of most distributions) each
session is its own scheduling *autogroup*, and the scheduler shares CPU time
fairly between autogroups before niceness counts inside one. Every kernel and
shell command leading a session would then weigh as much as all of corral's
control plane together, whatever its niceness: on a loaded node an acquire
would wait behind them. Staying in the session keeps a sandbox's processes in
the autogroup they were started in, where their niceness ranks them below
corral's actors.
"""

from __future__ import annotations

import os
import sys

__all__ = ["own_group"]


def own_group() -> dict:
    """``subprocess.Popen`` keyword arguments: the child leads a new process group, in this session."""
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}  # pragma: no cover - Python 3.10
