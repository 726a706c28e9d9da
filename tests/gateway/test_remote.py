"""``SandboxManager(base_url=..., bearer_token=...)`` against the gateway on a real uvicorn (127.0.0.1).

Every operation, sync and async, the handles (tool calls, files, streams
through /proxy), errors raised as the same corral classes, tenants apart, and
a gateway restarted under a live session. Needs the session's Ray cluster.
"""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import time

import pytest

import corral
from corral import SandboxManager

pytestmark = pytest.mark.ray

MCP_SERVER = textwrap.dedent(
    '''
    from mcp.server.mcpserver import MCPServer

    app = MCPServer("calc")

    @app.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    app.run("stdio")
    '''
)


def test_every_operation_through_the_sync_remote_manager(backend, serve, tokens, tmp_path):
    gw = serve(backend)
    m = SandboxManager(base_url=gw.url, bearer_token=tokens.a)
    assert type(m).__name__ == "RemoteSandboxManager"

    # the reference's operations
    name = m.create_from_pool(meta={"session_ctx_id": "ep-1"})
    info = m.get_info(name)
    assert info["state"] == "RUNNING" and info["session_ctx_id"] == "ep-1" and "runtime_token" not in info
    assert m.get_status(name) == "running" and m.check_health(name) is True
    out = m.call_tool(name, "run_shell_command", {"command": "echo remote"})
    assert out["content"][0]["text"] == "remote\n" and out["isError"] is False
    script = tmp_path / "calc.py"
    script.write_text(MCP_SERVER)
    assert m.add_mcp_servers(name, {"mcpServers": {"calc": {"command": sys.executable, "args": [str(script)]}}}) == "OK"
    assert "add" in m.list_tools(name)["calc"]
    assert m.list_tools(name, tool_type="generic") == {"generic": {"run_ipython_cell": {"name": "run_ipython_cell"},
                                                                   "run_shell_command": {"name": "run_shell_command"}}}
    assert m.call_tool(name, "add", {"a": 2, "b": 40})["content"][0]["text"] == "42"
    assert m.get_session_mapping("ep-1") == [name] and m.list_session_keys() == ["ep-1"]
    assert m.heartbeat("ep-1") is True
    assert m.reap_session("ep-1") is True and m.get_info(name)["state"] == "RECYCLED"
    restored = m.restore_session("ep-1")
    assert len(restored) == 1 and m.get_info(name)["container_name"] == restored[0]  # the old name redirects
    assert m.stop(restored[0]) is True and m.get_status(restored[0]) in ("exited", "missing")
    assert m.start(restored[0]) is True and m.get_status(restored[0]) == "running"
    assert m.release(restored[0]) is True
    made = m.create(environment={"K": "v"})
    assert m.call_tool(made, "run_shell_command", {"command": "echo $K"})["content"][0]["text"] == "v\n"
    stats = m.reserve(n=0)
    assert stats["sandbox_type"] == "base"
    st = m.status()
    assert st["tenant"] == "alpha" and made in [r["container_name"] for r in st["records"]]
    assert m.cleanup() == [made]

    # corral's acquire: a handle whose tool calls go through /proxy
    with m.acquire(env={"EPISODE": "7"}, session_ctx_id="ep-2") as sb:
        assert sb.url == f"{gw.url}/proxy/{sb.name}" and sb.session_ctx_id == "ep-2"
        r = sb.shell("echo hi $EPISODE; exit 3")
        assert r.exit_code == 3 and r.stdout == "hi 7\n"
        with pytest.raises(corral.CommandFailed):
            r.check()
        assert sb.python("x = 41\nx + 1").text == "42"
        sb.write("d/a.txt", "hello")
        assert sb.read_text("d/a.txt") == "hello" and sb.exists("d/a.txt")
        blob = os.urandom(3 << 20)
        src, dst = tmp_path / "up.bin", tmp_path / "down.bin"
        src.write_bytes(blob)
        assert sb.upload(str(src), "d/big.bin").size == len(blob)
        assert sb.download("d/big.bin", str(dst)) == len(blob) and dst.read_bytes() == blob
        assert sb.read_bytes("d/big.bin") == blob
        assert sorted(e.name for e in sb.list("d")) == ["a.txt", "big.bin"]
        sb.move("d/a.txt", "d/b.txt")
        assert sb.mkdir("e") is True
        sb.delete("d", recursive=True)
        assert not sb.exists("d")
        items = list(sb.shell_stream("for i in 1 2 3; do echo $i; sleep 0.05; done"))
        assert [c.data for c in items[:-1]] == ["1\n", "2\n", "3\n"] and items[-1].stdout == "1\n2\n3\n"
        assert sb.heartbeat() is True
        assert sb.activity().calls_total > 0
        held = sb.name
    rec = backend.get_info(held)  # leaving the block released it: reset for the next session
    assert rec["state"] in ("RESETTING", "WARM") and rec["session_ctx_id"] is None
    assert m.list_session_keys() == []


async def test_every_operation_through_the_async_remote_manager(backend, serve, tokens, tmp_path):
    gw = serve(backend)
    m = SandboxManager(base_url=gw.url, bearer_token=tokens.a)
    name = await m.create_from_pool_async(meta={"session_ctx_id": "a-1"})
    assert (await m.get_info_async(name))["session_ctx_id"] == "a-1"
    assert await m.get_status_async(name) == "running" and await m.check_health_async(name) is True
    out = await m.call_tool_async(name, "run_ipython_cell", {"code": "2 ** 10"})
    assert "1024" in out["content"][0]["text"]
    assert set((await m.list_tools_async(name))["generic"]) == {"run_ipython_cell", "run_shell_command"}
    assert await m.get_session_mapping_async("a-1") == [name]
    assert await m.list_session_keys_async() == ["a-1"] and await m.heartbeat_async("a-1") is True
    assert await m.reap_session_async("a-1") is True
    [new] = await m.restore_session_async("a-1")
    assert await m.stop_async(new) is True and await m.start_async(new) is True
    assert await m.release_async(new) is True
    made = await m.create_async()
    assert (await m.status_async())["records"][0]["container_name"] in (made, name, new)
    assert await m.cleanup_async() == [made]
    await m.reserve_async(n=0, wait=True, timeout=60)

    async def episode(i: int) -> str:
        async with await m.acquire_async(env={"I": str(i)}) as sb:
            r = await sb.shell("echo $I")
            assert r.stdout == f"{i}\n"
            assert (await sb.python(f"{i} * 2")).text == str(i * 2)
            await sb.write("f.txt", b"x" * 100)
            assert await sb.read_bytes("f.txt") == b"x" * 100
            chunks = [c async for c in sb.shell_stream("echo a; echo b >&2")]
            assert chunks[-1].stdout == "a\n" and chunks[-1].stderr == "b\n"
            blob = os.urandom(2 << 20)
            src, dst = tmp_path / f"u{i}", tmp_path / f"d{i}"
            src.write_bytes(blob)
            await sb.upload(str(src), "big")
            await sb.download("big", str(dst))
            assert dst.read_bytes() == blob
            assert await sb.heartbeat() is True
            return sb.name

    names = await asyncio.gather(*(episode(i) for i in range(2)))
    assert len(set(names)) == 2
    assert await m.list_session_keys_async() == []


def test_errors_come_back_as_the_same_corral_exceptions(backend, serve, tokens):
    gw = serve(backend)
    a = SandboxManager(base_url=gw.url, bearer_token=tokens.a)
    b = SandboxManager(base_url=gw.url, bearer_token=tokens.b)
    with pytest.raises(corral.NotFound):
        a.get_info("no-such-sandbox")
    with pytest.raises(corral.UnknownSandboxType):
        a.create_from_pool(sandbox_type="nope")
    with pytest.raises(corral.InvalidRequest, match="reserved"):
        a.create_from_pool(meta={"corral.tenant": "beta"})
    with pytest.raises(corral.InvalidRequest):
        a.create(environment={"X": None})
    with pytest.raises(corral.Forbidden):
        a.create(mount_dir="/etc")
    with pytest.raises(corral.Unauthorized):
        SandboxManager(base_url=gw.url, bearer_token="not-a-token-of-anyone").list_session_keys()
    sb = a.acquire(session_ctx_id="mine")
    # another tenant: not found, whatever it tries
    for call in (lambda: b.get_info(sb.name), lambda: b.release(sb.name), lambda: b.check_health(sb.name),
                 lambda: b.call_tool(sb.name, "run_shell_command", {"command": "id"}), lambda: b.reap_session("mine"),
                 lambda: b.restore_session("mine")):
        with pytest.raises(corral.NotFound):
            call()
    assert b.get_session_mapping("mine") == [] and b.list_session_keys() == [] and b.heartbeat("mine") is False
    from corral.client import BoxClient

    with BoxClient(f"{gw.url}/proxy/{sb.name}", tokens.b) as other:  # b's token on a's proxy
        with pytest.raises(corral.NotFound):
            other.shell("id")
    # a sandbox that failed: SandboxError, retryable
    assert a.stop(sb.name) is True
    with pytest.raises(corral.SandboxUnreachable) as e:
        a.call_tool(sb.name, "run_shell_command", {"command": "id"})
    assert e.value.retryable
    assert a.start(sb.name) is True
    assert sb.shell("echo back").stdout == "back\n"
    sb.release()


def test_a_reaped_sessions_handle_restores_it_and_goes_on(backend, serve, tokens):
    gw = serve(backend)
    m = SandboxManager(base_url=gw.url, bearer_token=tokens.a)
    with m.acquire(session_ctx_id="long") as sb:
        sb.write("keep.txt", "kept")
        old = sb.name
        assert m.reap_session("long") is True
        assert sb.shell("cat keep.txt").stdout == "kept"  # restored: a new box, the same workspace
        assert sb.name != old and m.get_session_mapping("long") == [sb.name]


def test_the_gateway_restarted_mid_session(backend, serve, tokens):
    gw = serve(backend)
    m = SandboxManager(base_url=gw.url, bearer_token=tokens.a)
    sb = m.acquire(session_ctx_id="survivor")
    assert sb.shell("echo before").stdout == "before\n"
    gw.stop()
    with pytest.raises(corral.SandboxUnreachable) as e:  # nobody listens: infrastructure, retryable
        sb.shell("echo during")
    assert e.value.retryable
    with pytest.raises(corral.SandboxUnreachable):
        m.get_info(sb.name)
    serve(backend, port=gw.port)  # a new gateway process state, the same address
    assert sb.shell("echo after").stdout == "after\n"
    assert m.get_session_mapping("survivor") == [sb.name]
    assert m.heartbeat("survivor") is True
    sb.release()
    assert backend.get_info(sb.name)["session_ctx_id"] is None


def test_a_sandbox_acquired_for_a_client_that_left_is_given_back(make_manager, serve, tokens, caplog):
    import logging

    import httpx

    caplog.set_level(logging.INFO, logger="corral.gateway")
    m = make_manager(pool_size=1, max_sandbox_instances=1)
    m.reserve(n=0, wait=True, timeout=120)
    gw = serve(m)
    a = SandboxManager(base_url=gw.url, bearer_token=tokens.a)
    held = a.acquire()
    with pytest.raises(httpx.ReadTimeout):  # b waits in line for the only slot, then gives up
        httpx.post(f"{gw.url}/acquire", json={"session_ctx_id": "impatient", "timeout": 30},
                   headers=tokens.auth(tokens.b), timeout=httpx.Timeout(1.0, connect=5.0))
    held.release()  # the slot goes to b's acquire, whose client has gone: the gateway releases it

    deadline = time.monotonic() + 60
    while "beta POST /acquire" not in caplog.text:  # its answer, sent to nobody
        assert time.monotonic() < deadline, "b's acquire never ended"
        time.sleep(0.1)
    assert "client of acquire left before its answer" in caplog.text
    assert m.get_session_mapping("beta:impatient") == []
    assert not [r for r in m.status()["records"] if r.get("state") == "RUNNING"]
    b = SandboxManager(base_url=gw.url, bearer_token=tokens.b)
    assert b.list_session_keys() == []
    with b.acquire(timeout=60) as sb:  # the slot is free again
        assert sb.shell("echo free").stdout == "free\n"
