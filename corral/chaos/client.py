"""``python -m corral.chaos.client MODE CONFIG_JSON [ARGS]``: a client process a chaos scenario drives.

Each mode plays one kind of corral user and reports what it did as JSON lines on stdout
(``{"event": ...}``), so the scenario can kill it, signal it or wait for it at the right moment:

- ``own HOW``: starts corral with no Ray running (it owns the cluster), warms a pool, holds a
  sandbox of a session and one created without a session, then ends by ``HOW``: ``exit``,
  ``raise``, ``wait`` (until signalled or killed);
- ``share GO_FILE``: like ``own``, marks each of its sandboxes with its pid, checks none of them
  carries another client's mark, and waits for ``GO_FILE`` before exiting;
- ``hold``: joins the cluster in RAY_ADDRESS, holds a session's sandbox (a file in its workspace)
  and a sandbox created without a session, then waits (to be killed);
- ``read``: joins a running namespace with a config that differs from it, and exits.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

__all__ = ["main"]


def say(event: str, **kw) -> None:
    print(json.dumps({"event": event, **kw}), flush=True)


def main(argv: list[str]) -> int:
    import ray

    from corral import SandboxManager, SandboxManagerEnvConfig

    # Ctrl-C as in a terminal, whoever started this process: a process started in the background by
    # a shell without job control (a CI runner, nohup ... &) inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mode, raw = argv[0], json.loads(argv[1])
    cfg = SandboxManagerEnvConfig.model_validate(raw)
    if mode == "read":
        SandboxManager(cfg)
        say("done")
        return 0
    m = SandboxManager(cfg)
    gcs = ray.get_runtime_context().gcs_address
    if mode in ("own", "share"):
        m.reserve(n=0, wait=True, timeout=180)
    sb = m.acquire()
    sb.write("mark.txt", str(os.getpid()))
    loose = m.create()  # no session: corral gives it one, with a clock
    names = [sb.name, loose]
    if mode == "share":
        other = m.acquire()
        other.write("mark.txt", str(os.getpid()))
        names.append(other.name)
        foreign = 0
        for s in (sb, other):
            marks = s.shell("cat mark.txt").stdout.strip()
            foreign += marks != str(os.getpid())
        say("ready", gcs=gcs, names=names, pid=os.getpid(), foreign=foreign)
        go = argv[2]
        deadline = time.monotonic() + 300
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.1)
        return 0
    say("ready", gcs=gcs, names=names, pid=os.getpid(), session=sb.session_ctx_id)
    how = argv[2] if len(argv) > 2 else "wait"
    if how == "exit":
        return 0
    if how == "raise":
        raise RuntimeError("a chaos client dies of an exception")
    time.sleep(600)  # until signalled or killed
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
