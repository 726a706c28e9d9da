"""The cold path on a real engine: a container counts as started once its box says it is ready,
with no kernel booted, and a container whose environment cannot run a kernel fails its start."""

from __future__ import annotations

import os
import shutil
import tempfile

import httpx
import pytest

import corral
from tests.support.docker import BOX_AUTH, box_spec, unique_name
from tests.support.images import HIDE_IPYKERNEL

pytestmark = pytest.mark.docker


async def test_a_started_container_answers_shell_with_no_kernel_then_runs_a_cell(sandboxes, docker_ready):
    h = await sandboxes.create(box_spec(docker_ready, "cold"))
    async with httpx.AsyncClient(base_url=h.url, headers=BOX_AUTH, timeout=120, trust_env=False) as http:
        r = await http.post("/fastapi/tools/run_shell_command", json={"command": "echo cyc; ps -eo args"})
        out = r.json()["content"][0]["text"]
        assert out.startswith("cyc\n")
        # the box and its fork server run; no kernel yet
        assert "kernel_main.py --fork-server" in out and " -f " not in out, out
        assert (await http.get("/v1/info")).json()["kernel"] == {"alive": False}
        r = await http.post("/v1/python", json={"code": "6 * 7"})
        assert r.json()["result"]["text/plain"] == "42"
        assert (await http.get("/v1/info")).json()["kernel"] == {"alive": True}


async def test_a_container_whose_environment_cannot_run_a_kernel_fails_its_start(sandboxes, docker_client,
                                                                              docker_ready):
    hide = tempfile.mkdtemp(prefix="corral-hide-ipykernel-")  # readable by the container's user
    try:
        os.chmod(hide, 0o755)
        with open(os.path.join(hide, "sitecustomize.py"), "w") as f:
            f.write(HIDE_IPYKERNEL)
        os.chmod(os.path.join(hide, "sitecustomize.py"), 0o644)
        name = unique_name("nokernel")
        spec = box_spec(docker_ready, "cold", name=name, readonly_mounts={hide: "/opt/hide"},
                     environment={"PYTHONPATH": "/opt/hide"})
        with pytest.raises(corral.DriverError) as err:
            await sandboxes.create(spec)
        message = str(err.value)
        assert "exited (exit code 1) before its box was ready" in message, message
        assert "the Python kernel cannot run in this sandbox" in message and "ipykernel" in message, message
        assert docker_client.containers.list(all=True, filters={"name": name}) == []
    finally:
        shutil.rmtree(hide, ignore_errors=True)
