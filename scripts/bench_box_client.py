#!/usr/bin/env python
"""Round-trip figures for the box clients against a real box subprocess on 127.0.0.1.

    python scripts/bench_box_client.py [--n 200] [--concurrency 16]

Starts ``python -m corral.box`` (port 0, a temporary workspace), then prints
median and p95 latencies of healthz, shell("true"), python("1"), a 4 KiB
write+read, for the sync client and for the async client (sequential and
concurrent). Nothing is asserted: it measures, prints, and stops the box.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral.bench.box_bench import start_box, stop_box
from corral.client import AsyncBoxClient, BoxClient


def _row(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"{name:<34} n={len(ms):<5} median={statistics.median(ms):8.2f} ms   p95={p95:8.2f} ms"


def _bench_sync(url: str, token: str, n: int) -> None:
    payload = os.urandom(4096)
    with BoxClient(url, token) as box:
        box.wait_ready(30)
        box.python("1")  # the first cell pays for the kernel's warm-up
        for name, call in [
            ("sync healthz", box.healthz),
            ("sync shell('true')", lambda: box.shell("true")),
            ("sync python('1')", lambda: box.python("1")),
            ("sync write+read 4 KiB", lambda: (box.write("b.bin", payload), box.read_bytes("b.bin"))),
        ]:
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                call()
                samples.append(time.perf_counter() - t)
            print(_row(name, samples))
    # A new client per call pays for building the client (its SSL context) and a TCP
    # connection each time: what keeping one client per sandbox saves.
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        with BoxClient(url, token) as fresh:
            fresh.healthz()
        samples.append(time.perf_counter() - t)
    print(_row("sync healthz, new client each call", samples))


async def _bench_async(url: str, token: str, n: int, concurrency: int) -> None:
    async with AsyncBoxClient(url, token) as box:
        await box.wait_ready(30)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            await box.shell("true")
            samples.append(time.perf_counter() - t)
        print(_row("async shell('true')", samples))

        async def one() -> float:
            t = time.perf_counter()
            await box.shell("true")
            return time.perf_counter() - t

        t0 = time.perf_counter()
        samples = []
        for _ in range(max(1, n // concurrency)):
            samples += await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        print(_row(f"async shell('true') x{concurrency} at once", samples))
        print(f"{'':<34} throughput={len(samples) / wall:8.1f} calls/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    token = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        try:
            proc, port = start_box(Path(tmp), token, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except RuntimeError as e:
            sys.exit(str(e))
        url = f"http://127.0.0.1:{port}"
        try:
            print(f"box at {url} (pid {proc.pid}), {os.cpu_count()} cpus")
            _bench_sync(url, token, args.n)
            asyncio.run(_bench_async(url, token, args.n, args.concurrency))
        finally:
            stop_box(proc)


if __name__ == "__main__":
    main()
