"""Round-trip latency of a real box process: ``python -m corral.bench.box_bench [--n 300]``.

Starts ``python -m corral.box`` on 127.0.0.1 (a free port, a temp
workspace), then times ``n`` calls of each case over one connection-reusing
httpx client and prints p50/p90/p99/max in milliseconds. Targets (from the
design brief): Python ``1+1`` p50 < 5 ms, shell ``echo hi`` p50 < 10 ms.
Nothing here is asserted: it measures and prints.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from corral.testing.waiting import stop_process, wait_ready_file

__all__ = ["main", "start_box", "stop_box", "measure", "CASES"]

#: (label, method, path, json body, target p50 in ms or None)
CASES = [
    ("GET /v1/healthz", "GET", "/v1/healthz", None, None),
    ("POST /v1/shell echo hi", "POST", "/v1/shell", {"command": "echo hi"}, 10.0),
    ("POST /v1/python 1+1", "POST", "/v1/python", {"code": "1+1"}, 5.0),
    ("GET /fastapi/healthz", "GET", "/fastapi/healthz", None, None),
    ("POST /fastapi run_shell_command", "POST", "/fastapi/tools/run_shell_command", {"command": "echo hi"}, 10.0),
    ("POST /fastapi run_ipython_cell", "POST", "/fastapi/tools/run_ipython_cell", {"code": "1+1"}, 5.0),
]


def start_box(workdir: Path, token: str, timeout: float = 60.0, **popen: Any) -> tuple[subprocess.Popen, int]:
    """A box subprocess in its own session (``popen``: more of Popen's arguments, such as ``stdout``);
    returns (process, port) once its ready file exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.box", "--host", "127.0.0.1", "--port", "0",
         "--workspace", str(workdir / "ws"), "--ready-file", str(workdir / "ready.json")],
        env={**os.environ, "SECRET_TOKEN": token},
        start_new_session=True,
        **popen,
    )
    return proc, wait_ready_file(proc, workdir / "ready.json", timeout, "the box")["port"]


def stop_box(proc: subprocess.Popen) -> None:
    """SIGTERM to the box's process group (its kernel and shells too); SIGKILL if it does not end."""
    stop_process(proc, group=True)


def measure(call: Callable[[], None], n: int, warmup: int) -> list[float]:
    """Milliseconds for each of ``n`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _pct(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(round(q * (len(sorted_ms) - 1))))]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m corral.bench.box_bench", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=300, help="timed calls per case (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="untimed calls per case first (default 30)")
    args = p.parse_args(argv)
    if args.n < 1 or args.warmup < 0:
        p.error("--n must be >= 1 and --warmup >= 0")

    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="corral-box-bench-") as tmp:
        t0 = time.perf_counter()
        proc, port = start_box(Path(tmp), token)
        ready_ms = (time.perf_counter() - t0) * 1000
        try:
            with httpx.Client(
                base_url=f"http://127.0.0.1:{port}",
                headers={"Authorization": f"Bearer {token}"},
                timeout=60,
                trust_env=False,
            ) as http:
                t0 = time.perf_counter()
                first = http.post("/v1/python", json={"code": "1+1"})
                first.raise_for_status()
                first_cell_ms = (time.perf_counter() - t0) * 1000
                print(f"box ready after {ready_ms:.0f} ms; first cell (kernel warm-up included) {first_cell_ms:.0f} ms")
                print(f"{args.n} calls per case, {args.warmup} warm-up, one keep-alive connection\n")
                print(f"{'case':34} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8} {'mean':>8}  target p50")
                for label, method, path, body, target in CASES:

                    def call(method=method, path=path, body=body) -> None:
                        r = http.request(method, path, json=body)
                        r.raise_for_status()

                    ms = sorted(measure(call, args.n, args.warmup))
                    p50 = _pct(ms, 0.5)
                    verdict = "" if target is None else f"< {target:g} ms: {'met' if p50 < target else 'MISSED'}"
                    print(
                        f"{label:34} {p50:8.2f} {_pct(ms, 0.9):8.2f} {_pct(ms, 0.99):8.2f} {ms[-1]:8.2f}"
                        f" {statistics.fmean(ms):8.2f}  {verdict}"
                    )
        finally:
            stop_box(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
