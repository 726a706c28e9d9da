"""Benchmark of the Docker driver against bare docker-py, on this machine's engine.

    python -m corral.bench.docker_bench [--runs 5] [--image corral-box:latest] [--json]

Measures, over ``--runs`` rounds (driver and bare interleaved so that noise
from the shared machine hits both alike):

- create-to-ready through :class:`~corral.drivers.docker.DockerDriver` (with
  a workspace, limits, read-only root: what a pool creates), from the call to
  the box answering ``/v1/healthz``;
- the same for bare ``docker.containers.run`` of the same image with only the
  port published, polling ``/v1/healthz`` every 20 ms; target: the driver
  within 1.3x of it;
- teardown: ``driver.remove`` of a running sandbox (target: < 300 ms);
- stop: ``driver.stop`` of a running sandbox.

Prints p50/p90 of each in milliseconds; nothing here is asserted: the figures
are for people and CI logs. Every container it makes is removed, also on
Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import tempfile
import time
from typing import Optional

import httpx

from corral.core.stats import pct
from corral.drivers.base import BOX_PORT, ContainerSpec
from corral.drivers.docker import DockerDriver
from corral.errors import CorralError
from corral.models import LABEL_MANAGED

__all__ = ["main", "run"]

_POLL = 0.02
TARGET_RATIO = 1.3
TARGET_TEARDOWN_MS = 300.0
TARGET_RESET_MS = 100.0


def _bare_run(client, image: str, token: str, name: str, timeout: float) -> tuple[float, str]:
    """(seconds to ready, container id) for plain containers.run + health polling."""
    t0 = time.perf_counter()
    c = client.containers.run(
        image, detach=True, name=name, environment={"SECRET_TOKEN": token},
        ports={f"{BOX_PORT}/tcp": ("127.0.0.1", None)}, labels={LABEL_MANAGED: "true", "corral.bench": "bare"},
    )
    try:
        c.reload()
        port = c.attrs["NetworkSettings"]["Ports"][f"{BOX_PORT}/tcp"][0]["HostPort"]
        url = f"http://127.0.0.1:{port}/v1/healthz"
        deadline = t0 + timeout
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while True:
                try:
                    if http.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200:
                        return time.perf_counter() - t0, c.id
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"bare container {name} not ready in {timeout}s")
                time.sleep(_POLL)
    except BaseException:
        c.remove(force=True)
        raise


async def run(runs: int = 5, image: str = "corral-box:latest", warmup: int = 1, timeout: float = 60.0) -> dict:
    """Run the benchmark; returns the raw samples (seconds) and summary (ms)."""
    import docker

    client = docker.from_env()
    driver = DockerDriver()
    made: list[str] = []
    samples: dict[str, list[float]] = {"driver_ready": [], "bare_ready": [], "teardown": [], "stop": [],
                                       "reset": [], "reset_kernel": []}
    tmp = tempfile.mkdtemp(prefix="corral-bench-")
    try:
        for i in range(warmup + runs):
            record = i >= warmup
            token = secrets.token_urlsafe(16)
            # Driver: the settings a pool uses.
            spec = ContainerSpec(
                name=f"corral-bench-d-{secrets.token_hex(4)}", image=image, token=token,
                workspace=f"{tmp}/ws{i}", cpus=1.0, memory="512m", pids_limit=256,
                labels={"corral.bench": "driver"}, ready_timeout=timeout,
            )
            made.append(spec.name)
            t0 = time.perf_counter()
            h = await driver.create(spec)
            ready = time.perf_counter() - t0
            made.append(h.container_id)
            t0 = time.perf_counter()
            await driver.remove(h.container_id)
            teardown = time.perf_counter() - t0

            # Bare docker-py.
            bare_name = f"corral-bench-b-{secrets.token_hex(4)}"
            made.append(bare_name)
            bare_ready, bare_id = await asyncio.to_thread(_bare_run, client, image, token, bare_name, timeout)
            await asyncio.to_thread(client.api.remove_container, bare_id, force=True)

            # Stop of a running sandbox (SIGTERM through tini to the box).
            spec2 = spec.model_copy(update={"name": f"corral-bench-s-{secrets.token_hex(4)}",
                                            "workspace": f"{tmp}/ws{i}s"})
            made.append(spec2.name)
            h2 = await driver.create(spec2)
            t0 = time.perf_counter()
            await driver.stop(h2.container_id, timeout=5)
            stop = time.perf_counter() - t0
            await driver.remove(h2.container_id)

            # Reset for reuse, on a sandbox that was used: files, a background process, kernel state.
            spec3 = spec.model_copy(update={"name": f"corral-bench-r-{secrets.token_hex(4)}",
                                            "workspace": f"{tmp}/ws{i}r"})
            made.append(spec3.name)
            h3 = await driver.create(spec3)
            from corral.client import AsyncBoxClient

            async with AsyncBoxClient(h3.url, token) as box:
                await box.python("x = 1")
                await box.shell("echo data > /workspace/f.txt; mkdir -p /workspace/d; (sleep 300 &)")
                t0 = time.perf_counter()
                await box.reset(restart_kernel=False)
                reset = time.perf_counter() - t0
                await box.shell("echo data > /workspace/g.txt")
                t0 = time.perf_counter()
                await box.reset(restart_kernel=True)
                await box.python("None")  # the sandbox is warm again once its new kernel runs a cell
                reset_kernel = time.perf_counter() - t0
            await driver.remove(h3.container_id)

            if record:
                samples["driver_ready"].append(ready)
                samples["bare_ready"].append(bare_ready)
                samples["teardown"].append(teardown)
                samples["stop"].append(stop)
                samples["reset"].append(reset)
                samples["reset_kernel"].append(reset_kernel)
            print(
                f"  run {i + 1 - warmup if record else 'warm-up'}: driver {ready * 1e3:.0f} ms, "
                f"bare {bare_ready * 1e3:.0f} ms, teardown {teardown * 1e3:.0f} ms, stop {stop * 1e3:.0f} ms, "
                f"reset {reset * 1e3:.0f} ms, reset+kernel {reset_kernel * 1e3:.0f} ms",
                file=sys.stderr,
            )
    finally:
        for ref in made:
            try:
                await driver.remove(ref)
            except CorralError:
                pass
        await driver.close()
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {
        k: {"p50_ms": pct([x * 1e3 for x in v], 50), "p90_ms": pct([x * 1e3 for x in v], 90), "n": len(v)}
        for k, v in samples.items()
    }
    ratio = summary["driver_ready"]["p50_ms"] / summary["bare_ready"]["p50_ms"]
    return {"image": image, "runs": runs, "samples_s": samples, "summary": summary, "ready_ratio_p50": ratio}


def _print(result: dict) -> None:
    s = result["summary"]
    print(f"corral docker driver bench: image {result['image']}, {result['runs']} runs")
    print(f"{'':24}{'p50 ms':>10}{'p90 ms':>10}")
    for key, label in [("driver_ready", "create->ready (driver)"), ("bare_ready", "create->ready (bare)"),
                       ("teardown", "teardown (remove)"), ("stop", "stop (SIGTERM)"),
                       ("reset", "reset (kernel kept)"), ("reset_kernel", "reset + new kernel ready")]:
        print(f"{label:24}{s[key]['p50_ms']:>10.0f}{s[key]['p90_ms']:>10.0f}")
    ratio = result["ready_ratio_p50"]
    verdict = "ok" if ratio <= TARGET_RATIO else "OVER TARGET"
    print(f"driver/bare ready ratio (p50): {ratio:.2f}  (target <= {TARGET_RATIO}: {verdict})")
    td = s["teardown"]["p50_ms"]
    verdict = "ok" if td < TARGET_TEARDOWN_MS else "OVER TARGET"
    print(f"teardown p50: {td:.0f} ms  (target < {TARGET_TEARDOWN_MS:.0f} ms: {verdict})")
    rs = s["reset"]["p50_ms"]
    verdict = "ok" if rs < TARGET_RESET_MS else "OVER TARGET"
    print(f"reset-and-reuse p50 without a kernel restart: {rs:.0f} ms  (target < {TARGET_RESET_MS:.0f} ms: {verdict})")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m corral.bench.docker_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="measured rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    p.add_argument("--image", default="corral-box:latest")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a box may take to answer")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    import docker.errors

    try:
        result = asyncio.run(run(args.runs, args.image, args.warmup, args.timeout))
    except (CorralError, docker.errors.DockerException, TimeoutError) as e:
        print(f"docker_bench: {e}", file=sys.stderr)
        print("docker_bench: needs a Docker engine (scripts/docker-engine.sh) and the image "
              "(scripts/build-image.sh)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
