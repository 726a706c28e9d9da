"""Gateway actors on the test session's Ray cluster: one per node, restarted by Ray, and ``corral serve``.

A gateway actor serves the same app under uvicorn inside its own process. Its
process is killed here: Ray starts it again on the same node and port, and a
client that holds a sandbox carries on with its next call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

import corral
from corral import SandboxManager

from _gateway_helpers import free_port

pytestmark = pytest.mark.ray


def _healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the gateway at {url} did not answer within {timeout:g}s")


def test_a_gateway_actor_per_node_survives_its_process(backend, tokens):
    import ray

    from corral.gateway import Tenants
    from corral.gateway.server import gateway_name, start_gateways, stop_gateways

    ns = backend.config.namespace
    port = free_port()
    try:
        rows = start_gateways(backend.config, Tenants.parse(tokens.text), host="127.0.0.1", port=port)
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(rows) == len(alive) == 1
        row = rows[0]
        assert row["url"] == f"http://127.0.0.1:{port}" and row["node_id"] == alive[0]["NodeID"]
        assert row["pid"] != os.getpid()
        assert row["nice"] == 0 or os.geteuid() != 0  # the control plane's priority, where it may be raised
        actor = ray.get_actor(gateway_name(row["node_id"]), namespace=ns)

        m = SandboxManager(base_url=row["url"], bearer_token=tokens.a)
        sb = m.acquire(session_ctx_id="through-an-actor")
        assert sb.shell("echo via-actor").stdout == "via-actor\n"
        assert m.get_info(sb.name)["session_ctx_id"] == "through-an-actor"

        os.kill(row["pid"], 9)  # the gateway's process dies: Ray starts the actor again
        deadline = time.monotonic() + 120
        while True:
            try:
                new = ray.get(actor.address.remote(60), timeout=90)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                assert time.monotonic() < deadline, "the gateway actor was not restarted"
                time.sleep(0.5)
        assert new["pid"] != row["pid"] and new["url"] == row["url"]
        _healthy(row["url"])
        assert sb.shell("echo after-restart").stdout == "after-restart\n"  # the same client, the same handle
        assert m.heartbeat("through-an-actor") is True
        assert sb.release() is True
        with pytest.raises(corral.Unauthorized):
            SandboxManager(base_url=row["url"], bearer_token="x" * 20).status()
    finally:
        removed = stop_gateways(ns)
    assert removed == [gateway_name(row["node_id"])]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{row['url']}/health", timeout=2)


def test_corral_serve_starts_and_stops_the_node_gateways(backend, tokens, tmp_path, ray_cluster):
    token_file = tmp_path / "tokens"
    token_file.write_text(tokens.text)
    token_file.chmod(0o600)
    (tmp_path / "config.json").write_text(json.dumps(backend.config.model_dump(mode="json", exclude_none=True)))
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    base = [sys.executable, "-m", "corral.cli", "serve", "--config", str(tmp_path / "config.json")]
    out = subprocess.run([*base, "--host", "127.0.0.1", "--port", str(port), "--token-file", str(token_file)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    url = f"http://127.0.0.1:{port}"
    assert url in out.stdout and "alpha, beta" in out.stdout
    assert tokens.a not in out.stdout + out.stderr
    _healthy(url)
    m = SandboxManager(base_url=url, bearer_token=tokens.b)
    with m.acquire() as sb:
        assert sb.python("'ok'").text == "'ok'"
    out = subprocess.run([*base, "--stop"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "removed 1 gateway(s)" in out.stdout, out.stderr[-2000:]
