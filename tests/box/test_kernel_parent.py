"""A forked kernel dies with its fork server from its first moment (not only once ipykernel's check runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from _box_helpers import process_alive


def test_a_forked_process_dies_with_its_parent() -> None:
    # What a forked kernel does first: a kernel stuck in its boot (before ipykernel's own
    # parent check runs) must not outlive its fork server.
    import corral.box.kernel_main as kernel_main

    script = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {os.path.dirname(kernel_main.__file__)!r})\n"
        "from kernel_main import die_with_parent\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    die_with_parent(parent)\n"
        "    print(os.getpid(), flush=True)\n"  # past the call: only the death signal can end it now
        "    time.sleep(120)\n"
        "    os._exit(0)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert process_alive(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while process_alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(child)
    finally:
        if process_alive(child):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()
