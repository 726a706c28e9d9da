"""examples/ray_job/rollout_job.py submitted with ``ray job submit`` to a Ray head of its own.

Not the session's ``ray_cluster``: job submission needs a head started by
``ray start`` with its dashboard (the job server). This test starts one with
``.venv/bin/ray start --head`` on free, non-default ports, with its own
``--temp-dir`` (so its address file, sockets and logs are its own), submits
the job with ``ray job submit --address http://127.0.0.1:<dashboard port>``,
checks that it SUCCEEDED and that its logs show the summary, then stops ONLY
that head: it kills the processes whose command lines carry its temp dir, and
their descendants, by pid. Never ``ray stop`` (it would stop every cluster on
the machine). It checks that nothing of the head remains, that no box the job
started is left, and that every other Ray cluster running before is untouched.

The test process itself never calls ``ray.init``: every address is explicit
(the job's driver gets RAY_ADDRESS from its own head), so this cluster and
the test session's cannot mix.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
from corral.testing.rayhead import cmdline, free_ports, stop_head
from corral.testing.rayhead import processes_naming as head_processes

REPO = Path(__file__).resolve().parents[2]
JOB_DIR = REPO / "examples" / "ray_job"
RAY_CLI = Path(sys.executable).with_name("ray")
if not RAY_CLI.exists():
    RAY_CLI = Path(shutil.which("ray") or RAY_CLI)

pytestmark = pytest.mark.skipif(not RAY_CLI.exists(), reason="the `ray` CLI is not installed (ray job submit needs it)")


def other_clusters(marker: str) -> dict[int, str]:
    """Every process of every OTHER Ray cluster on this machine (its gcs_server and raylet, and their
    descendants): pid -> name."""
    out = {}
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("gcs_server", "raylet") and marker not in cmdline(p):
            out[p.pid] = p.info["name"]
            try:
                out.update({c.pid: c.name() for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    return out


def boxes_left(state_root: Path) -> list:
    """Box processes (process driver) the job's corral left under its state dir."""
    from corral.drivers.config import ProcessDriverConfig
    from corral.drivers.process import ProcessDriver

    root = state_root / "state" / "process"
    if not root.exists():
        return []
    driver = ProcessDriver(ProcessDriverConfig(root=str(root)))

    async def _list():
        try:
            return await driver.list({})
        finally:
            await driver.close()

    return asyncio.run(_list())


def remove_boxes(state_root: Path) -> None:
    from corral.drivers.config import ProcessDriverConfig
    from corral.drivers.process import ProcessDriver

    root = state_root / "state" / "process"
    if not root.exists():
        return
    driver = ProcessDriver(ProcessDriverConfig(root=str(root)))

    async def _rm():
        try:
            for h in await driver.list({}):
                await driver.remove(h.container_id)
        finally:
            await driver.close()

    asyncio.run(_rm())


def ray_env(extra: dict | None = None) -> dict:
    """This environment without anything that points Ray at another cluster, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_NAMESPACE", "RAY_AUTH_MODE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Bind the head to 127.0.0.1 (by default `ray start` swaps 127.0.0.1 for the host's interface address).
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Token auth, explicitly for the head and the jobs CLI alike: `ray start` turns it on by itself when
    # ~/.ray/auth_token exists, but the jobs CLI then sends no token unless RAY_AUTH_MODE=token (Ray
    # reads the token file itself; the test never touches it).
    env["RAY_AUTH_MODE"] = "token"
    env.update(extra or {})
    return env


@pytest.fixture
def ray_head():
    """A Ray head of its own (dashboard and job server included), stopped by pid at the end."""
    temp_dir = tempfile.mkdtemp(prefix="crj-", dir="/tmp")  # short: Ray's Unix sockets live under it
    marker = temp_dir

    def start() -> tuple[dict, subprocess.CompletedProcess]:
        (gcs, dash, client, nm, om, agent_listen, agent_grpc, metrics, rtenv) = free_ports(9)
        cmd = [
            str(RAY_CLI), "start", "--head", "--node-ip-address=127.0.0.1",
            f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
            f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rtenv}",
            "--min-worker-port=0", "--max-worker-port=0",  # workers take any free port, never a fixed range
            f"--temp-dir={temp_dir}", "--num-cpus=2", "--object-store-memory=100000000", "--disable-usage-stats",
        ]
        head = {"temp_dir": temp_dir, "gcs": f"127.0.0.1:{gcs}", "api": f"http://127.0.0.1:{dash}",
                "env": ray_env({"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dash}"})}
        return head, subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=90, cwd=temp_dir)

    try:
        head, r = start()
        if r.returncode != 0:  # a port taken between picking and binding: stop what started, try new ports once
            stop_head(marker)
            head, r = start()
        assert r.returncode == 0, f"ray start failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        yield head
    finally:
        others = other_clusters(marker)  # just before the stop: what must not be touched
        signaled = stop_head(marker)
        left = head_processes(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head survived: {[(p.pid, cmdline(p)[:120]) for p in left.values()]}"
        hit = {pid: others[pid] for pid in signaled & set(others)}
        assert not hit, f"stopping the test's head signaled processes of another Ray cluster: {hit}"
        servers = {pid for pid, name in others.items() if name in ("gcs_server", "raylet")}
        print(f"stopped the test's Ray head: {len(signaled)} processes signaled, none of the "
              f"{len(others)} processes of other clusters; {len(servers)} other gcs_server/raylet seen")


def ray_cli(head: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY_CLI), *args], env=head["env"], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_rollout_job_submitted_to_its_own_head(ray_head, tmp_path):
    t0 = time.monotonic()
    ns = "corral-job-" + uuid.uuid4().hex[:8]
    state_root = tmp_path / "corral"
    sub_id = "rollout-" + uuid.uuid4().hex[:8]
    try:
        # Submits, then tails the job's logs until it ends; on exit the CLI asks the job server for the
        # job's final status and prints "Job '<id>' succeeded" only when it is SUCCEEDED (exit 1 if FAILED).
        submit = ray_cli(
            ray_head, "job", "submit", "--address", ray_head["api"], "--submission-id", sub_id,
            "--working-dir", str(JOB_DIR), "--",
            "python", "rollout_job.py", "--small", "--namespace", ns, "--state-root", str(state_root),
            timeout=150,
        )
        out = submit.stdout + submit.stderr
        logs = submit.stdout
        if "SUMMARY:" not in logs:  # the tail missed the end: ask for the job's whole log
            logs = ray_cli(ray_head, "job", "logs", "--address", ray_head["api"], sub_id).stdout
    finally:
        left = boxes_left(state_root)
        if left:
            remove_boxes(state_root)
    assert submit.returncode == 0, out[-6000:]
    assert re.search(rf"Job '{sub_id}' succeeded", out), f"the job did not end SUCCEEDED:\n{out[-6000:]}"
    assert sub_id in out and f"Running entrypoint for job {sub_id}" in logs, out[-3000:]

    # The summary: every episode of 2 workers x 2 episodes succeeded, corral was torn down.
    m = re.search(r"^SUMMARY: workers=2 episodes=4/4 ok=4 failed=0 calls=(\d+) .* result=SUCCEEDED$", logs, re.M)
    assert m, f"no successful summary in the job's logs:\n{logs[-6000:]}"
    assert int(m.group(1)) == 4 * 7  # 7 tool calls per --small episode
    assert re.search(r"^down: released=\d+ actors=\d+ containers_left=0$", logs, re.M), logs[-4000:]
    # The job joined ITS head (RAY_ADDRESS from the job), not the session's cluster.
    assert f"gcs={ray_head['gcs']}" in logs, logs[-4000:]
    # Each worker, a Ray task, found corral's actors by name from inside the task.
    workers = re.findall(r"^worker (\d): pid=\d+ node=\w+ ray_initialized=True found_by_name=True$", logs, re.M)
    assert sorted(workers) == ["0", "1"], logs[-4000:]
    table = [ln for ln in logs.splitlines() if re.match(r"^[01]\s+[01]\s+True\s+\S+\s+7\s", ln)]
    assert len(table) == 4, logs[-4000:]
    assert not left, f"the job left boxes running: {left}"
    print(f"job {sub_id}: SUCCEEDED, {m.group(0)!r}, {time.monotonic() - t0:.0f}s")
