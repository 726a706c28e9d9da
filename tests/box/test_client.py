"""The box clients against the real box.

``AsyncBoxClient`` talks to ``corral.box.app.create_app(...)`` in-process
through httpx's ASGI transport (real routes, real kernel, real subprocesses,
no socket); ``BoxClient`` talks to a real ``python -m corral.box`` subprocess
on a 127.0.0.1 port. Every process started here is stopped at teardown.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

import corral
from corral.bench.box_bench import start_box, stop_box
from corral.client import AsyncBoxClient, BoxClient, Entry, ShellChunk, ShellResult

box_app = pytest.importorskip("corral.box.app", reason="the box server (corral/box/app.py) has not landed")

TOKEN = "test-token-for-the-box"
BASE = "http://box.local"


# --- in-process box -------------------------------------------------------


@pytest.fixture
async def box(tmp_path: Path):
    """An AsyncBoxClient wired to a fresh in-process box app (lifespan run, so its kernel starts and stops)."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    app = box_app.create_app(workspace=str(workspace), token=TOKEN)
    async with app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)
        async with http, AsyncBoxClient(BASE, TOKEN, http_client=http) as client:
            client.workspace = workspace  # for assertions on the real disk
            yield client


async def test_status_routes(box) -> None:
    health = await box.healthz()
    assert health.ok
    info = await box.info()
    assert info.pid == os.getpid() and Path(info.workspace).resolve() == box.workspace.resolve()
    activity = await box.activity()
    assert activity.running == 0 and activity.started_at <= activity.last_active_at + 1e-3


async def test_wrong_token_is_unauthorized(box) -> None:
    wrong = AsyncBoxClient(BASE, "not-the-token", http_client=box._http)
    with pytest.raises(corral.Unauthorized):
        await wrong.shell("true")


async def test_shell_results(box) -> None:
    ok = await box.shell("echo hi; echo err >&2")
    assert ok.ok and ok.stdout == "hi\n" and ok.stderr == "err\n" and ok.check() is ok

    failed = await box.shell("exit 7")
    assert not failed.ok and failed.exit_code == 7 and not failed.timed_out
    with pytest.raises(corral.CommandFailed, match="exited with 7"):
        failed.check()

    slow = await box.shell("sleep 30", timeout=0.5)
    assert slow.timed_out and slow.exit_code is None and slow.duration_ms < 10_000
    with pytest.raises(corral.CommandTimeout):
        slow.check()


async def test_shell_options(box) -> None:
    await box.mkdir("sub")
    r = await box.shell('pwd; echo "$GREETING"; cat', cwd="sub", env={"GREETING": "hello"}, stdin="from stdin")
    lines = r.check().stdout.splitlines()
    assert Path(lines[0]).resolve() == (box.workspace / "sub").resolve()
    assert lines[1:] == ["hello", "from stdin"]

    big = await box.shell("head -c 5000 /dev/zero | tr '\\0' x", max_output=1000)
    assert big.truncated and len(big.stdout) <= 1000

    raw = await box.shell("printf '\\377\\000A'", encoding="base64")
    assert raw.stdout_bytes == b"\xff\x00A"


async def test_shell_stream(box) -> None:
    items = [item async for item in box.shell_stream("echo one; echo two >&2; echo three; exit 3")]
    chunks, final = items[:-1], items[-1]
    assert chunks and all(isinstance(c, ShellChunk) for c in chunks)
    assert isinstance(final, ShellResult) and final.exit_code == 3
    assert final.stdout == "one\nthree\n" and final.stderr == "two\n"
    assert "".join(c.data for c in chunks if c.stream == "stdout") == final.stdout


async def test_python_keeps_state_and_reports_errors(box) -> None:
    assert (await box.python("x = 20")).check().ok
    r = await box.python("print('side'); x + 22")
    assert r.ok and r.text == "42" and r.stdout == "side\n"

    err = await box.python("1 / 0")
    assert err.status == "error" and err.error.ename == "ZeroDivisionError"
    with pytest.raises(corral.PythonError, match="ZeroDivisionError"):
        err.check()

    slow = await box.python("import time; time.sleep(30)", timeout=1)
    assert slow.status == "timeout"
    with pytest.raises(corral.CommandTimeout):
        slow.check()
    # An interrupt keeps the kernel and its state.
    assert (await box.python("x")).text == "20"

    await box.restart_kernel()
    gone = await box.python("x")
    assert gone.status == "error" and gone.error.ename == "NameError"


async def test_python_display_images(box) -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 8).decode()
    r = await box.python(
        f"from IPython.display import display, Image\nimport base64\n"
        f"display(Image(data=base64.b64decode({png!r}), format='png'))"
    )
    assert r.check().images == [base64.b64decode(png)]


async def test_files_round_trip(box, tmp_path: Path) -> None:
    entry = await box.write("d/hello.txt", "héllo\n")
    assert isinstance(entry, Entry) and entry.type == "file" and entry.size == len("héllo\n".encode())
    assert (box.workspace / "d" / "hello.txt").read_text() == "héllo\n"
    assert await box.read_text("d/hello.txt") == "héllo\n"
    assert await box.read_bytes("d/hello.txt") == "héllo\n".encode()
    assert await box.exists("d/hello.txt") and not await box.exists("d/nope")

    assert await box.mkdir("e") is True
    assert await box.mkdir("e") is False
    moved = await box.move("d/hello.txt", "e/hi.txt")
    assert moved.path == "e/hi.txt"
    names = {e.path for e in await box.list(".", depth=2)}
    assert {"d", "e", "e/hi.txt"} <= names

    with pytest.raises(corral.Conflict, match="not empty"):
        await box.delete("e")
    await box.delete("e", recursive=True)
    assert not await box.exists("e")


async def test_upload_and_download_stream_a_large_file(box, tmp_path: Path) -> None:
    blob = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "blob.bin"
    src.write_bytes(blob)
    entry = await box.upload(src, "big/blob.bin")
    assert entry.size == len(blob)
    dst = tmp_path / "back.bin"
    assert await box.download("big/blob.bin", dst) == len(blob)
    assert dst.read_bytes() == blob


async def test_file_errors_are_typed(box) -> None:
    with pytest.raises(corral.NotFound):
        await box.read_text("missing.txt")
    for escape in ("../outside", "/etc/passwd"):
        with pytest.raises(corral.Forbidden):
            await box.read_text(escape)


async def test_session_env_and_reset(box) -> None:
    await box.set_env({"CORRAL_T": "v1"})
    assert (await box.shell("echo $CORRAL_T")).stdout == "v1\n"
    assert (await box.python("import os; os.environ.get('CORRAL_T')")).text == "'v1'"
    await box.write("junk.txt", "x")
    await box.python("y = 1")

    result = await box.reset()
    assert result.ok
    assert list(box.workspace.iterdir()) == []
    assert (await box.shell("echo -n $CORRAL_T")).stdout == ""
    assert (await box.python("y")).status == "error"
    # The counters were zeroed: only the two calls since the reset count.
    assert (await box.activity()).calls_total == 2


async def test_reset_with_a_new_token_switches_the_client(box) -> None:
    new = "next-session-token-0f3b2a"
    other = AsyncBoxClient(BASE, TOKEN, http_client=box._http)  # e.g. the previous session's handle
    with pytest.raises(corral.InvalidRequest, match="token"):
        await box.reset(token="too-short")  # refused here, before anything is sent
    assert (await box.healthz()).ok
    assert (await box.reset(restart_kernel=False, token=new)).ok
    assert (await box.shell("echo still-mine")).stdout == "still-mine\n"
    with pytest.raises(corral.Unauthorized):
        await other.shell("true")
    with pytest.raises(corral.Unauthorized):
        await other.reset(token="a-token-of-the-old-holder-1")
    assert (await AsyncBoxClient(BASE, new, http_client=box._http).healthz()).ok


async def test_a_failed_reset_keeps_the_clients_token(box, monkeypatch) -> None:
    app = box._http._transport.app

    async def broken(restart_kernel: bool = True) -> dict:
        raise RuntimeError("nope")

    monkeypatch.setattr(app.state.runtime, "reset", broken)
    # The box's 500 answer, as a real server would send it, not the app's exception.
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url=BASE)
    async with http, AsyncBoxClient(BASE, TOKEN, http_client=http) as client:
        with pytest.raises(corral.CorralError, match="internal error"):
            await client.reset(token="a-token-that-never-took-0")
        assert (await client.healthz()).ok


async def test_mcp_tools(box, tmp_path: Path) -> None:
    server = tmp_path / "calc_server.py"
    server.write_text(textwrap.dedent("""
        from mcp.server.mcpserver import MCPServer
        mcp = MCPServer("calc")

        @mcp.tool()
        def add(a: int, b: int) -> int:
            \"\"\"Add two integers.\"\"\"
            return a + b

        mcp.run()
    """))
    names = await box.add_mcp_servers({"mcpServers": {"calc": {"command": sys.executable, "args": [str(server)]}}})
    assert names == ["calc"]
    tools = await box.list_tools()
    assert [t.name for t in tools["calc"]] == ["add"]
    result = await box.call_tool("add", {"a": 2, "b": 40})
    assert not result.is_error and "42" in json.dumps(result.content)


# --- a real box subprocess, driven by the sync client ---------------------


@pytest.fixture
def box_process(tmp_path: Path):
    # the box's output goes to the test's captured output
    proc, port = start_box(tmp_path, TOKEN)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        stop_box(proc)


def test_sync_client_against_a_real_box_process(box_process, tmp_path: Path) -> None:
    proc, url = box_process
    with BoxClient(url, TOKEN) as box:
        assert box.wait_ready(30).ok
        assert box.info().pid == proc.pid

        r = box.shell("echo $((6 * 7))")
        assert r.check().stdout == "42\n"
        assert box.python("import sys; sys.version_info[0]").text == "3"
        *chunks, final = list(box.shell_stream("for i in 1 2 3; do echo $i; done"))
        assert final.ok and final.stdout == "1\n2\n3\n" and chunks

        box.write("a/b.txt", "content")
        assert box.read_text("a/b.txt") == "content"
        blob = os.urandom(1 << 20)
        (tmp_path / "up.bin").write_bytes(blob)
        box.upload(tmp_path / "up.bin", "up.bin")
        box.download("up.bin", tmp_path / "down.bin")
        assert (tmp_path / "down.bin").read_bytes() == blob
        assert box.exists("up.bin")

    with BoxClient(url, "wrong-token") as wrong, pytest.raises(corral.Unauthorized):
        wrong.healthz()


def test_sync_client_reset_rotates_the_token_of_a_real_box(box_process) -> None:
    _, url = box_process
    new = "sync-next-session-token-77"
    with BoxClient(url, TOKEN) as box, BoxClient(url, TOKEN) as previous:
        box.wait_ready(30)
        assert box.reset(token=new).ok
        assert box.shell("echo ok").stdout == "ok\n"
        with pytest.raises(corral.Unauthorized):
            previous.healthz()


def test_sync_client_sees_a_dead_box_as_unreachable(box_process) -> None:
    proc, url = box_process
    with BoxClient(url, TOKEN, timeout=5) as box:
        box.wait_ready(30)
        stop_box(proc)
        with pytest.raises(corral.SandboxUnreachable) as info:
            box.shell("true")
        assert info.value.retryable and TOKEN not in str(info.value)


# --- the async client's own transport (aiohttp) against a real box process ---


async def test_async_client_against_a_real_box_process_goes_through_its_fast_transport(box_process, tmp_path) -> None:
    proc, url = box_process
    async with AsyncBoxClient(url, TOKEN) as box:
        assert box._fast is not None  # owns its connections, plain HTTP: the aiohttp transport
        assert (await box.wait_ready(30)).ok
        assert (await box.info()).pid == proc.pid
        assert (await box.shell("echo $((6 * 7))")).check().stdout == "42\n"
        failed = await box.shell("echo oops >&2; exit 3")
        assert failed.exit_code == 3 and failed.stderr == "oops\n"
        assert (await box.python("x = 6 * 7; x")).text == "42"
        await box.write("a/b.txt", "content ü")  # JSON body
        assert await box.read_text("a/b.txt") == "content ü"  # query params, text answer
        assert await box.read_bytes("a/b.txt") == "content ü".encode()
        assert await box.exists("a/b.txt") and not await box.exists("a/none.txt")
        assert [e.name for e in await box.list("a")] == ["b.txt"]
        blob = os.urandom(1 << 20)  # uploads and streams keep to httpx
        (tmp_path / "up.bin").write_bytes(blob)
        await box.upload(tmp_path / "up.bin", "up.bin")
        await box.download("up.bin", tmp_path / "down.bin")
        assert (tmp_path / "down.bin").read_bytes() == blob
        with pytest.raises(corral.NotFound):
            await box.read_text("no/such/file.txt")
    async with AsyncBoxClient(url, "wrong-token") as wrong:
        with pytest.raises(corral.Unauthorized):
            await wrong.healthz()
    with pytest.raises(corral.InvalidRequest, match="closed"):
        await box.healthz()


async def test_async_fast_transport_failures_are_sandbox_unreachable(tmp_path) -> None:
    import asyncio
    import socket

    with socket.socket() as s:  # refused: nothing listens on a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with AsyncBoxClient(f"http://127.0.0.1:{port}", TOKEN, timeout=2) as box:
        with pytest.raises(corral.SandboxUnreachable, match=f"GET http://127.0.0.1:{port}/v1/healthz: connection failed"):
            await box.healthz()

    async def silent(reader, writer):  # reads the request, never answers (until the client hangs up)
        await reader.read(1 << 16)
        while await reader.read(1 << 16):
            pass
        writer.close()

    async def hangs_up(reader, writer):  # reads the request, closes without a word
        await reader.read(1 << 16)
        writer.close()

    async def not_json(reader, writer):  # a proxy's page where the box should be
        await reader.read(1 << 16)
        body = b"<html>hello</html>"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()

    for handler, error, message in (
        (silent, corral.SandboxUnreachable, "no answer within the read timeout"),
        (hangs_up, corral.SandboxUnreachable, "the connection broke mid-answer"),
        (not_json, corral.SandboxError, "expected JSON, got text/html"),
    ):
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with AsyncBoxClient(f"http://127.0.0.1:{port}", TOKEN, timeout=0.5) as box:
                with pytest.raises(error, match=message) as info:
                    await box.healthz()
                assert TOKEN not in str(info.value)
        finally:
            server.close()
