"""``python -m corral.box``: run the box server (see docs/box-api.md).

Owns the process: reads the token from ``SECRET_TOKEN`` (none: exit 2), builds
the runtime and the app, serves with uvicorn (one worker), writes the ready
file once listening, and on SIGTERM/SIGINT stops serving and closes the
runtime (kernel, shells, MCP servers) before exiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "parse_args", "write_ready_file"]

#: Seconds in-flight requests get to finish after SIGTERM before the box closes them.
SHUTDOWN_GRACE = 2.0
#: Seconds an idle keep-alive connection stays open. Longer than any client keeps one
#: (corral's drop theirs after 30 s): a server that closes first races a client that is
#: sending a request on it, and the request fails with a reset connection.
KEEP_ALIVE = 75


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m corral.box", description="corral's in-sandbox HTTP server")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    p.add_argument("--workspace", required=True, help="the workspace root (created if missing)")
    p.add_argument("--tmp-dir", default=None, help="HOME/TMPDIR for commands (default: a fresh temp dir)")
    p.add_argument("--ready-file", default=None, help='write {"port": P, "pid": N} here once listening')
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be 0..65535, got {args.port}")
    return args


def write_ready_file(path: str, port: int) -> None:
    """Write the ready file atomically, so a watcher never reads half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    os.replace(tmp, target)


async def _serve(args: argparse.Namespace, token: str) -> None:
    import uvicorn

    from .app import create_app
    from .runtime import BoxRuntime

    runtime = BoxRuntime(args.workspace, args.tmp_dir)
    try:
        await runtime.start()
        app = create_app(runtime, token)
        config = uvicorn.Config(
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
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
            timeout_keep_alive=KEEP_ALIVE,
            server_header=False,
        )
        ready_file = args.ready_file

        class _Server(uvicorn.Server):
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    token = os.environ.get("SECRET_TOKEN", "")
    if not token:
        print(
            "corral box: SECRET_TOKEN is not set (or empty); refusing to start an open server. "
            "Set SECRET_TOKEN to the bearer token clients will send.",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(_serve(args, token))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"corral box: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
