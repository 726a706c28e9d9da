"""``corral serve --standalone`` as a real process: tokens file, TLS with a certificate made here, logs.

The server joins the test session's Ray cluster (RAY_ADDRESS) and starts
corral's actors in a namespace of the test's own; ``make_manager`` joins the
same namespace afterwards and removes everything at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import corral
from corral import SandboxManager
from corral.testing.waiting import stop_process, wait_ready_file

from _gateway_helpers import self_signed

pytestmark = pytest.mark.ray


def _serve(args: list, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "corral.cli", "serve", *args], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_standalone_refuses_to_start_without_tokens(tmp_path, ray_cluster):
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_GATEWAY_TOKENS"}
    out = subprocess.run([sys.executable, "-m", "corral.cli", "serve", "--standalone"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "never runs open" in out.stderr
    out = subprocess.run([sys.executable, "-m", "corral.cli", "serve", "--standalone", "--token", "abc"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unrecognized arguments" in out.stderr  # no token on a command line
    bad = tmp_path / "tokens"
    bad.write_text("alpha short\n")
    out = subprocess.run([sys.executable, "-m", "corral.cli", "serve", "--standalone", "--token-file", str(bad)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "line 1" in out.stderr and "short" not in out.stderr


def test_standalone_over_tls_with_a_tokens_file(tmp_path, ray_cluster, corral_config, make_manager, tokens):
    certfile, keyfile = self_signed(tmp_path)
    cfg = corral_config(pool_size=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    token_file = tmp_path / "tokens"
    token_file.write_text(tokens.text)
    token_file.chmod(0o600)
    ready = tmp_path / "ready.json"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env.pop("CORRAL_GATEWAY_TOKENS", None)
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = _serve(["--standalone", "--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file),
                       "--certfile", certfile, "--keyfile", keyfile, "--config", str(tmp_path / "config.json"),
                       "--pool-size", "1", "--ready-file", str(ready)], env, log)
        try:
            url = wait_ready_file(proc, ready, 120, "the gateway", every=0.1)["url"]
            assert url.startswith("https://127.0.0.1:")
            embedded = make_manager(config=cfg)  # the same namespace: torn down after the test
            m = SandboxManager(base_url=url, bearer_token=tokens.a, verify=certfile)
            with m.acquire() as sb:
                assert sb.shell("echo over-tls").stdout == "over-tls\n"
                assert sb.python("1 + 1").text == "2"
                sb.write("x.bin", b"\x00\x01" * 1000)
                assert sb.read_bytes("x.bin") == b"\x00\x01" * 1000
                box_token = embedded.get_info(sb.name)["runtime_token"]
            import asyncio

            async def async_use():
                async with await m.acquire_async() as sb:
                    return (await sb.shell("echo async-tls")).stdout

            assert asyncio.run(async_use()) == "async-tls\n"
            # the system's CAs do not know this certificate: refused, and said so
            with pytest.raises(corral.SandboxUnreachable, match="CERTIFICATE_VERIFY_FAILED|certificate"):
                SandboxManager(base_url=url, bearer_token=tokens.a).list_session_keys()
            with pytest.raises(corral.Unauthorized):
                SandboxManager(base_url=url, bearer_token="wrong-" + tokens.b, verify=certfile).status()
        finally:
            stop_process(proc, signal.SIGINT, grace=30)
    text = log_path.read_text(errors="replace")
    assert "corral gateway on https://127.0.0.1:" in text and "alpha POST /acquire 200" in text
    for secret in (tokens.a, tokens.b, tokens.a2, box_token, tokens.a[:10], tokens.b[:10], box_token[:10]):
        assert secret not in text
    # the gateway is gone, the namespace's actors are not: its sandboxes outlive it
    assert embedded.status()["pools"]["base"]["target"] == 1
