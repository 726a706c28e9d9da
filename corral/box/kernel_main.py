"""The kernel process's entry point: stock ipykernel with a cheaper ``flush()``, and its fork server.

The box runs this file by path (``python .../kernel_main.py ...``), not with
``-m``: ``-m corral.box.kernel_main`` would import the corral package
(pydantic models and all) into every kernel. Two ways to run it:

``kernel_main.py -f CONNECTION_FILE [ipykernel flags]``
    one kernel, as ``ipykernel_launcher`` would run it.
``kernel_main.py --fork-server FD``
    the kernel fork server (a "zygote", see :func:`serve_forks`): it says it
    is up as soon as its interpreter runs and finds a kernel's packages, and
    imports everything a kernel imports while it boots once, when the first
    kernel is asked for; then it forks a kernel per request read from the
    unix socket ``FD``. A forked kernel costs the kernel app's own setup
    (~40 ms of CPU here), not an interpreter start and ~0.25 s of imports. It
    differs from a spawned kernel in what a fork shares: the hash seed of the
    zygote, and the zygote's imported objects frozen out of garbage
    collection (so a full collection, as ``%reset`` runs, is cheaper).

What the kernel changes: stock ``OutStream.flush()`` always hands a flush to
the IOPub thread and blocks until that thread answers, and ipykernel calls it
four to six times per cell (around the displayhook and before the
execute_reply), output or not: measured here, 0.5 ms of a 3 ms ``1+1``.
:class:`LeanOutStream` returns at once when the stream holds no unsent text.
Nothing is reordered: every iopub message goes out through the one IOPub
thread in the order it was handed over, so a cell's output still precedes its
``status: idle`` (the box's completion signal), and text that is buffered is
flushed exactly as before.
"""

from __future__ import annotations

import os
import sys

#: The name this module is importable under inside the kernel (for ``outstream_class``).
MODULE = "_corral_kernel_main"

#: What a kernel imports while it boots (IPKernelApp's kernel class, shell, debugger, loop glue),
#: so the fork server imports it once for all its kernels. Nothing the user would import.
PRELOAD = (
    "ipykernel.kernelapp",
    "ipykernel.ipkernel",
    "ipykernel.zmqshell",
    "ipykernel.debugger",
    "IPython.core.oinspect",
    "IPython.core.completerlib",
    "IPython.core.debugger",
    "IPython.core.logger",
    "IPython.extensions.storemagic",
    "tornado.platform.asyncio",
    "tornado.queues",
)


def _lean_outstream():
    from ipykernel.iostream import OutStream

    class LeanOutStream(OutStream):
        """An ``OutStream`` whose ``flush()`` skips the IOPub thread round trip when nothing is buffered."""

        def flush(self):
            lock = getattr(self, "_buffer_lock", None)
            if self.echo is None and lock is not None and hasattr(self, "_buffers"):
                with lock:
                    # Written text sits in these buffers until a flush sends it (ipykernel >= 6.29's layout).
                    empty = not any(buffer.tell() for buffer in list(self._buffers.values()))
                if empty:
                    return
            super().flush()

    return LeanOutStream


def missing_packages() -> list[str]:
    """The top-level packages of :data:`PRELOAD` this interpreter cannot find (located, not imported)."""
    import importlib.util

    missing = []
    for top in dict.fromkeys(name.split(".")[0] for name in PRELOAD):
        try:
            if importlib.util.find_spec(top) is None:
                missing.append(top)
        except (ImportError, ValueError) as exc:
            missing.append(f"{top} ({exc})")
    return missing


def _preload() -> dict[str, str]:
    """Import what a kernel imports while it boots; returns the variables those imports set."""
    import gc
    import importlib

    startup_env = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    if len(os.listdir("/proc/self/task")) > 1:
        # A fork copies only the calling thread: a lock another thread held would stay locked in every kernel.
        raise RuntimeError("an import started a thread; refusing to fork kernels")
    # Keep the imported objects out of every later collection: no child touches (and so copies) their pages for it.
    gc.collect()
    gc.freeze()
    # Variables the imports set (debugpy sets PYDEVD_USE_FRAME_EVAL): a kernel that imported them itself has them.
    return {k: v for k, v in os.environ.items() if startup_env.get(k) != v}


def serve_forks(fd: int) -> list[str]:
    """The fork server: fork a kernel per request on the unix socket ``fd``; returns only in a kernel, its argv.

    The protocol is one JSON object per line. The server says ``{"ready": true}``
    once its interpreter runs and finds the packages a kernel needs (or
    ``{"error": "..."}`` and exits); the box counts as started only then. The
    first request makes it import what a kernel imports while it boots (an
    import that fails is answered ``{"error": "..."}`` and ends the server).
    Each request ``{"argv", "env", "cwd"}`` is answered ``{"pid": N}`` (or
    ``{"error": "..."}``). At end of file (the box closed the socket or died)
    it kills the kernels it forked and exits.

    The server itself never creates a zmq context, a thread or an event loop,
    and never runs user code, so each child starts from the same pristine
    copy of it. It reaps its children as they exit (SIGCHLD), which also
    hands their CPU time to the box's accounting when the box reaps it.
    """
    import json
    import signal
    import socket

    sock = socket.socket(fileno=fd)
    missing = missing_packages()
    if missing:
        sock.sendall(json.dumps({"error": f"this interpreter ({sys.executable}) cannot find "
                                          f"{', '.join(missing)}, which a Python kernel needs"}).encode() + b"\n")
        sys.exit(1)
    # Not dumpable: a kernel runs as the same user but (in a container) without CAP_SYS_PTRACE,
    # so it can neither ptrace the server nor read or write its memory through /proc. A session
    # cannot plant code in the server that would run in the kernels of the sessions after it.
    _set_dumpable(False)

    kernels: set[int] = set()

    def reap(signum, frame) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            kernels.discard(pid)

    signal.signal(signal.SIGCHLD, reap)
    requests = sock.makefile("rb")
    import_env: dict[str, str] | None = None
    try:
        sock.sendall(b'{"ready": true}\n')
        for line in requests:
            if import_env is None:
                try:
                    import_env = _preload()
                except BaseException as exc:  # ImportError, a broken extension module, SystemExit from an import
                    sock.sendall(json.dumps({"error": f"importing the kernel's modules failed: "
                                                      f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
                    break
            argv = _fork_one(line, sock, kernels, import_env)
            if argv is not None:
                requests.close()
                sock.close()
                return argv
    except OSError:
        pass  # the box is gone: as at end of file
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for pid in kernels:
        try:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
    sys.exit(0)


def _fork_one(line: bytes, sock, kernels: set[int], import_env: dict[str, str]):
    """Answer one fork request; returns the kernel's argv in the child, None in the server."""
    import json
    import signal
    import traceback

    try:
        request = json.loads(line)
        argv, env, cwd = list(request["argv"]), dict(request["env"]), str(request["cwd"])
    except (ValueError, KeyError, TypeError) as exc:
        sock.sendall(json.dumps({"error": f"bad request: {exc}"}).encode() + b"\n")
        return None
    # SIGCHLD waits until the pid is recorded: a child that dies at once is not recorded after its reaping.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        pid = os.fork()
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        sock.sendall(json.dumps({"error": f"fork failed: {exc}"}).encode() + b"\n")
        return None
    if pid == 0:
        try:
            _become_kernel(cwd, {**import_env, **env})
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        return argv
    kernels.add(pid)
    try:
        # The child makes its own group too; doing it here as well means the group exists before
        # the box hears the pid, so a kill sent at once (a restart stopping this boot) reaches it.
        os.setpgid(pid, pid)
    except OSError:  # the child got there first (EACCES once it has exec'd; not here) or died
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    sock.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    return None


def _set_dumpable(on: bool) -> None:
    """prctl(PR_SET_DUMPABLE): who may ptrace this process or open its /proc memory files."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(4, int(on), 0, 0, 0)  # 4 = PR_SET_DUMPABLE


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent (the fork server) dies, from this moment on.

    ipykernel's own parent check starts late in its boot: a kernel whose boot stalled or
    was stopped half-way outlived its fork server and box. Linux only; elsewhere a no-op."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        return
    if parent and os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def _become_kernel(cwd: str, env: dict[str, str]) -> None:
    """In a freshly forked child: leave the server's process group, signals and state for the kernel's own."""
    import signal
    import time

    # Its own process group: interrupts and kills aimed at the group hit the kernel and what it
    # starts, never the server. Not its own session: that would make it a scheduling autogroup
    # of its own, weighing as much as corral's actors whatever its niceness (see groups.py).
    os.setpgid(0, 0)
    die_with_parent(int(env.get("JPY_PARENT_PID") or 0))
    _set_dumpable(True)  # the kernel is the session's own process, like a spawned one
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    time.tzset()
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile.tempdir = None  # re-read TMPDIR from the new environment


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    # Run by path, Python put this directory first on sys.path, where its modules (kernel,
    # shell, app...) would shadow the user's. ipykernel_launcher drops its sys.path[0] the same
    # way; IPKernelApp puts the working directory back.
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == here:
        del sys.path[0]
    module = sys.modules[__name__]
    sys.modules[MODULE] = module
    if sys.argv[1:2] == ["--fork-server"]:
        argv = serve_forks(int(sys.argv[2]))
        sys.orig_argv, sys.argv = argv, argv[1:]
    # In a forked kernel after the fork server's imports: ipykernel is loaded already.
    module.LeanOutStream = _lean_outstream()

    from ipykernel.kernelapp import IPKernelApp

    # parent_handle's default reads JPY_PARENT_PID when ipykernel is imported, in a forked kernel
    # before its environment was set: pass it, or the kernel would not exit with its parent.
    IPKernelApp.launch_instance(
        outstream_class=f"{MODULE}.LeanOutStream", parent_handle=int(os.environ.get("JPY_PARENT_PID") or 0)
    )


if __name__ == "__main__":
    main()
