"""Benchmark of workspace storage: upload and download throughput, local back end next to OSS.

    python -m corral.bench.storage_bench [--runs 3] [--big-mib 64] [--small 2000] [--small-kib 4]
                                         [--concurrency 8] [--release-mib 64] [--out FILE.json]

Two workspaces: one file of ``--big-mib`` MiB (random bytes; a multipart upload
on OSS), and ``--small`` files of ``--small-kib`` KiB in 20 directories. Each is
uploaded to, then downloaded from (into an empty directory):

- ``local``: :class:`~corral.storage.LocalStorage` on a temporary directory of
  this machine's disk;
- ``oss``: :class:`~corral.storage.oss.OSSStorage` against the OSS-protocol
  server of :mod:`corral.testing.oss_server` on 127.0.0.1 (in this process,
  signatures and CRC-64 checked, objects in memory). It measures corral's
  transport and oss2 on a loopback link, not an OSS region: client and server
  share this machine's CPUs, and there is no network latency.

Each figure is the median of ``--runs`` rounds (back ends interleaved, so noise
from a shared machine hits both alike). Prints a table of MiB/s and files/s;
``--out`` also writes the figures as JSON. Nothing is asserted.

Then, through the manager (:func:`release_phase`): how long a release with
``--release-mib`` MiB to upload keeps a reuse pool from handing out its next
sandbox, on a pool of one and of two.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Callable, Optional

from tabulate import tabulate

from corral.bench import write_json
from corral.storage import LocalStorage, Storage
from corral.storage.manifest import MANIFEST_SUFFIX
from corral.storage.oss import OSSStorage
from corral.testing.oss_server import OSSServer

__all__ = ["main", "run"]

MiB = 1 << 20
_KEY_ID, _SECRET, _BUCKET = "LTAIbenchKeyId0000", "bench-secret-0000000000", "corral-bench"


def _make_big(root: str, mib: int) -> tuple[int, int]:
    os.makedirs(root)
    with open(os.path.join(root, "big.bin"), "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    return 1, mib * MiB


def _make_small(root: str, n: int, kib: int) -> tuple[int, int]:
    for i in range(n):
        d = os.path.join(root, f"d{i % 20:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:05d}.txt"), "wb") as f:
            f.write(os.urandom(kib * 1024))
    return n, n * kib * 1024


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(runs: int = 3, big_mib: int = 64, small: int = 2000, small_kib: int = 4, concurrency: int = 8,
        log: Callable[[str], None] = lambda s: None) -> dict:
    """Measure; returns ``{"rows": [...], "settings": {...}}`` (times in seconds, medians)."""
    work = tempfile.mkdtemp(prefix="corral-storage-bench-")
    server = OSSServer({_KEY_ID: _SECRET}, buckets=[_BUCKET]).start()
    try:
        workloads = {
            f"1 x {big_mib} MiB": _make_big(os.path.join(work, "big"), big_mib),
            f"{small} x {small_kib} KiB": _make_small(os.path.join(work, "small"), small, small_kib),
        }
        dirs = dict(zip(workloads, ("big", "small")))
        backends: dict[str, Storage] = {
            "local": LocalStorage(os.path.join(work, "store")),
            "oss (127.0.0.1)": OSSStorage(server.endpoint, _KEY_ID, _SECRET, _BUCKET, concurrency=concurrency),
        }
        samples: dict[tuple[str, str, str], list[float]] = {}
        for r in range(runs):
            for wl, d in dirs.items():
                for name, store in backends.items():
                    path = f"run{r}/{d}"
                    out = os.path.join(work, f"out-{r}-{d}-{name.split()[0]}")
                    up = _timed(lambda: store.upload_folder(os.path.join(work, d), path))
                    down = _timed(lambda: store.download_folder(path, out, expect=True))
                    samples.setdefault((name, wl, "upload"), []).append(up)
                    samples.setdefault((name, wl, "download"), []).append(down)
                    log(f"run {r + 1}/{runs} {name:16s} {wl:16s} up {up:6.2f}s  down {down:6.2f}s")
                    store.delete(path)
                    shutil.rmtree(out, ignore_errors=True)
        rows = []
        for (name, wl, op), secs in samples.items():
            files, nbytes = workloads[wl]
            s = statistics.median(secs)
            rows.append({"backend": name, "workload": wl, "op": op, "seconds": s, "runs": len(secs),
                         "mib_per_s": nbytes / MiB / s, "files_per_s": files / s})
        return {
            "rows": rows,
            "settings": {"runs": runs, "big_mib": big_mib, "small": small, "small_kib": small_kib,
                         "concurrency": concurrency},
        }
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def release_phase(mib: int, log: Callable[[str], None] = lambda s: None) -> dict:
    """What a synced release costs a reuse pool: a session writes ``mib`` MiB into its workspace
    and is released; timed are the release call, the next acquire (on a pool of one and of two,
    each refilled while the writing session ran), and the upload until its manifest (written
    last) is in the bucket. Process driver, the OSS test server,
    a local Ray cluster of this process."""
    from corral import SandboxManager, SandboxManagerEnvConfig, SandboxTypeConfig
    from corral.manager import down

    work = tempfile.mkdtemp(prefix="corral-storage-release-")
    server = OSSServer({_KEY_ID: _SECRET}, buckets=[_BUCKET]).start()
    out: dict = {"mib": mib}
    try:
        for pool in (1, 2):
            cfg = SandboxManagerEnvConfig(
                namespace=f"storage-bench-{pool}-{os.getpid()}", pool_size=pool,
                state_dir=os.path.join(work, f"state{pool}"), default_mount_dir=os.path.join(work, f"mounts{pool}"),
                file_system="oss", oss_endpoint=server.endpoint, oss_access_key_id=_KEY_ID,
                oss_access_key_secret=_SECRET, oss_bucket_name=_BUCKET, storage_folder=f"release{pool}",
                sandbox_types={"base": SandboxTypeConfig(name="base", reuse=True)})
            m = SandboxManager(cfg)
            try:
                m.reserve(n=0, wait=True, timeout=120)
                sb = m.acquire(session_ctx_id="writer")
                sb.shell(f"head -c {mib * MiB} /dev/urandom > big.bin")
                t0 = time.perf_counter()
                sb.release()
                released = time.perf_counter() - t0
                nxt = m.acquire(session_ctx_id="next", timeout=300)
                acquired = time.perf_counter() - t0
                manifest = sb.record["storage_path"] + MANIFEST_SUFFIX  # written last, once all is up
                deadline = time.monotonic() + 300
                while not server.keys(_BUCKET, manifest) and time.monotonic() < deadline:
                    time.sleep(0.02)
                synced = time.perf_counter() - t0
                nxt.release()
                out[f"pool_{pool}"] = {"release_s": round(released, 4), "next_acquire_s": round(acquired, 3),
                                       "synced_s": round(synced, 3)}
                log(f"pool of {pool}: release {released * 1000:.1f} ms, next acquire after {acquired:.2f} s, "
                    f"upload of {mib} MiB done after {synced:.2f} s")
            finally:
                m.close()
                down(cfg, timeout=60)
        return out
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--big-mib", type=int, default=64)
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--small-kib", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=8, help="OSS transfers in flight at once")
    p.add_argument("--release-mib", type=int, default=64,
                   help="workspace size for the release measure (0: skip it; it starts a local Ray cluster)")
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    result = run(args.runs, args.big_mib, args.small, args.small_kib, args.concurrency,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.release_mib > 0:
        result["release"] = release_phase(args.release_mib, log=lambda s: print(s, file=sys.stderr, flush=True))
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    result["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    rows = sorted(result["rows"], key=lambda r: (r["workload"], r["op"] == "download", r["backend"]))
    table = [[r["backend"], r["workload"], r["op"], f"{r['seconds']:.3f}", f"{r['mib_per_s']:.1f}",
              f"{r['files_per_s']:.0f}"] for r in rows]
    print(f"storage bench {result['date']}: median of {args.runs} runs, {os.cpu_count()} CPUs")
    print(tabulate(table, headers=["backend", "workload", "op", "s", "MiB/s", "files/s"]))
    if "release" in result:
        rel = result["release"]
        print(f"a release with {rel['mib']} MiB to upload (OSS test server), s after the release call:")
        print(tabulate([[f"reuse pool of {k[-1]}", v["release_s"], v["next_acquire_s"], v["synced_s"]]
                        for k, v in rel.items() if k.startswith("pool_")],
                       headers=["", "release returns", "next acquire returns", "upload done"]))
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
