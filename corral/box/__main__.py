"""``python -m corral.box``: run the box server (see docs/box-api.md, docs/security.md).

Owns the process: makes itself non-dumpable, reads its token, builds the
runtime and the app, checks that a kernel can run (the kernel's fork server is
up; no kernel boots until a cell asks), serves with uvicorn (one worker),
writes the ready file (or the ready line on stdout) once listening, and on
SIGTERM/SIGINT stops serving and closes the runtime (kernel, shells, MCP
servers) before exiting. A sandbox where no kernel can run exits with code 1
and says why, before it ever answers.

Where the token comes from, first match wins:

- ``--token-file PATH`` (or ``CORRAL_TOKEN_FILE``): the file's first line; the
  box deletes the file once read. ``-`` reads the first line of stdin instead,
  which is how corral's drivers deliver it: nothing is left behind at all.
- ``SECRET_TOKEN`` in the environment: for running the box by hand and for
  images that follow the reference's convention. An environment is readable by
  the code the box runs wherever a parent process (a container's init) keeps a
  copy of it, so corral's drivers never use it.

A token that breaks the rule of :func:`corral.box.auth.check_token` (fewer than
16 visible characters, whitespace) is refused: exit code 2 and a message.

Non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``): processes of the same uid, which
is what every command and kernel the box starts is, can then neither read the
box's ``/proc/<pid>/environ``, ``mem`` or ``fd/`` nor ptrace it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "parse_args", "write_ready_file", "read_token", "make_non_dumpable", "uvicorn_core", "TokenError",
           "READY_MARK"]

#: Seconds in-flight requests get to finish after SIGTERM before the box closes them.
SHUTDOWN_GRACE = 2.0
#: Seconds an idle keep-alive connection stays open. Longer than any client keeps one
#: (corral's drop theirs after 30 s): a server that closes first races a client that is
#: sending a request on it, and the request fails with a reset connection.
KEEP_ALIVE = 75
#: Seconds the box waits for its token on stdin (``--token-file -``) before giving up.
STDIN_TOKEN_TIMEOUT = 60.0
#: Bytes read at most from a token source: a token is at most 4096 characters and a newline.
_TOKEN_READ_LIMIT = 4097
#: How the ready line on stdout begins (``--ready-file -``).
READY_MARK = "corral-box-ready"


class TokenError(Exception):
    """The box has no usable token: it must not start."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m corral.box", description="corral's in-sandbox HTTP server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    p.add_argument("--workspace", required=True, help="the workspace root (created if missing)")
    p.add_argument("--tmp-dir", default=None, help="HOME/TMPDIR for commands (default: a fresh temp dir)")
    p.add_argument(
        "--ready-file",
        default=os.environ.get("CORRAL_READY_FILE") or None,
        help='write {"port": P, "pid": N} here once listening; \'-\' prints it to stdout as one line '
        f'starting with "{READY_MARK}" (default: $CORRAL_READY_FILE)',
    )
    p.add_argument(
        "--token-file",
        default=os.environ.get("CORRAL_TOKEN_FILE") or None,
        help="read the bearer token from this file's first line and delete the file; '-' reads it from stdin "
        "(default: $CORRAL_TOKEN_FILE, else the SECRET_TOKEN environment variable)",
    )
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be 0..65535, got {args.port}")
    return args


def write_ready_file(path: str, port: int) -> None:
    """Write the ready file atomically, so a watcher never reads half of it; ``-``: one line on stdout
    (the Docker driver reads it from the container's output instead of polling the box)."""
    if path == "-":
        sys.stdout.write(f"{READY_MARK} {json.dumps({'port': port, 'pid': os.getpid()})}\n")
        sys.stdout.flush()
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(tmp, target)


async def _serve(args: argparse.Namespace, token: str) -> None:
    from .runtime import BoxRuntime

    runtime = BoxRuntime(args.workspace, args.tmp_dir)
    try:
        runtime.begin()  # the fork server's interpreter starts while the box imports its HTTP stack
        Config, Server = uvicorn_core()

        from .app import create_app

        app = create_app(runtime, token)
        await runtime.start()
        gc.freeze()  # what the start made lives as long as the box: no collection need walk it again
        gc.enable()
        config = Config(
            app,
            host=args.host,
            port=args.port,
            # The stock asyncio loop that main() made, not uvloop: measured here, uvloop
            # spawns a subprocess ~6x slower (about 11 ms against 2 ms for `echo hi`;
            # libuv's spawn closes every fd up to RLIMIT_NOFILE), far more than it saves
            # on HTTP. The kernel's zmq I/O costs the same on both.
            loop="none",
            log_level="warning",
            access_log=False,
            lifespan="off",  # the runtime is started and closed here, around the server
            ws="none",  # the box serves no websocket: nor does it import a websocket library
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
            timeout_keep_alive=KEEP_ALIVE,
            server_header=False,
        )
        ready_file = args.ready_file

        class _Server(Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets=sockets)
                if self.started and ready_file:
                    port = self.servers[0].sockets[0].getsockname()[1]
                    write_ready_file(ready_file, port)

            @contextlib.contextmanager
            def capture_signals(self):
                # uvicorn re-raises the signal after serving, which would kill the
                # process before the runtime (kernel, shells, MCP servers) is closed.
                yield

        server = _Server(config)
        loop_ = asyncio.get_running_loop()

        def stop(sig: int) -> None:
            if server.should_exit:
                server.force_exit = True  # a second signal: stop waiting for requests
            server.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop_.add_signal_handler(sig, stop, sig)
        await server.serve()
    finally:
        await runtime.close()


def uvicorn_core() -> tuple[type, type]:
    """uvicorn's ``Config`` and ``Server``, loaded without running the package's ``__init__``.

    That ``__init__`` imports uvicorn's command line (click) and its reloaders (watchfiles),
    which the box never uses and which cost about a fifth of its boot. The package is
    registered unexecuted and only the two modules the box needs are imported from it;
    where that does not work (another layout), the whole package is imported as usual.
    """
    import importlib
    import importlib.util

    if "uvicorn" not in sys.modules:
        spec = importlib.util.find_spec("uvicorn")
        if spec is not None and spec.submodule_search_locations is not None:
            package = importlib.util.module_from_spec(spec)
            sys.modules["uvicorn"] = package
            try:
                config = importlib.import_module("uvicorn.config")
                server = importlib.import_module("uvicorn.server")
                package.Config, package.Server = config.Config, server.Server
                return config.Config, server.Server
            except (ImportError, AttributeError):
                for name in [m for m in sys.modules if m == "uvicorn" or m.startswith("uvicorn.")]:
                    del sys.modules[name]
    import uvicorn

    return uvicorn.Config, uvicorn.Server


def make_non_dumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)``: close this process's /proc files and ptrace to its own uid.

    Returns False where there is no prctl (not Linux). Children get it back when
    they exec, so commands and kernels are ordinary processes holding no secret.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    pr_set_dumpable = 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    return True


def _first_line(data: bytes) -> str:
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        return line.decode("ascii")
    except UnicodeDecodeError:
        raise TokenError("the token must be ASCII") from None


def _read_stdin_token(timeout: float) -> str:
    """The first line of stdin, read within ``timeout``; stdin is /dev/null afterwards."""
    fd = sys.stdin.fileno() if sys.stdin is not None else 0
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in data and len(data) < _TOKEN_READ_LIMIT:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TokenError(f"no token arrived on stdin within {timeout:g}s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, _TOKEN_READ_LIMIT - len(data))
            if not chunk:
                break  # EOF: a token without a final newline
            data += chunk
    finally:
        # Nothing the box starts inherits the pipe the token came through.
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    if not data:
        raise TokenError("stdin closed before a token arrived")
    return _first_line(data)


def read_token(token_file: Optional[str], environ: Optional[dict] = None, stdin_timeout: float = STDIN_TOKEN_TIMEOUT) -> str:
    """The box's token from ``token_file`` (deleted once read; ``-``: stdin) or ``SECRET_TOKEN``.

    Raises :class:`TokenError` with a message for the operator when there is
    none, it breaks the token rule, or a token file cannot be deleted (the code
    the box runs could read it then).
    """
    from ..errors import InvalidRequest
    from .auth import check_token

    environ = os.environ if environ is None else environ
    if token_file == "-":
        token, source = _read_stdin_token(stdin_timeout), "the token on stdin"
    elif token_file:
        try:
            with open(token_file, "rb") as f:
                data = f.read(_TOKEN_READ_LIMIT)
        except OSError as e:
            raise TokenError(f"cannot read the token file {token_file}: {e.strerror or e}") from None
        try:
            os.unlink(token_file)
        except OSError as e:
            raise TokenError(
                f"cannot delete the token file {token_file} after reading it ({e.strerror or e}); "
                "the code the box runs could read it, so the box does not start"
            ) from None
        token, source = _first_line(data), f"the token in {token_file}"
    else:
        token, source = environ.get("SECRET_TOKEN", ""), "SECRET_TOKEN"
        if not token:
            raise TokenError(
                "no token: pass --token-file PATH (or '-' for stdin), or set SECRET_TOKEN; "
                "the box refuses to start an open server"
            )
    try:
        return check_token(token, source)
    except InvalidRequest as e:
        raise TokenError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    # No collections while the box imports and builds its app (a few hundred thousand new objects,
    # none of them garbage): ~10% of its start's CPU. _serve freezes what is there and turns it back on.
    gc.disable()
    try:
        return _main(argv)
    finally:
        gc.enable()


def _main(argv: Optional[Sequence[str]]) -> int:
    args = parse_args(argv)
    try:
        # Before the token is read: from here on no process of this uid can read this one's memory.
        make_non_dumpable()
        token = read_token(args.token_file)
    except (TokenError, OSError) as e:
        print(f"corral box: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..errors import CorralError

    try:
        asyncio.run(_serve(args, token))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"corral box: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except CorralError as exc:  # the sandbox cannot serve what it exists for (its Python kernel)
        print(f"corral box: {exc}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
