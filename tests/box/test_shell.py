"""Shell commands through /v1/shell and /v1/shell/stream (real bash subprocesses)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest
import pytest_asyncio

from corral.box.runtime import BoxRuntime

from _box_helpers import api_client, make_runtime, process_alive

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sh(tmp_path_factory):
    # No kernel needed here: the runtime is not started, and the kernel only boots on a first cell.
    rt = await make_runtime(tmp_path_factory, start=False)
    try:
        async with api_client(rt) as client:
            client.rt = rt
            client.root = Path(rt.workspace.root)
            yield client
    finally:
        await rt.close()


async def run(sh, command: str, **kw) -> dict:
    r = await sh.post("/v1/shell", json={"command": command, **kw})
    assert r.status_code == 200, r.text
    return r.json()


async def test_exit_code_and_separate_streams(sh) -> None:
    out = await run(sh, "echo out; echo err >&2; exit 3")
    assert out["exit_code"] == 3 and out["stdout"] == "out\n" and out["stderr"] == "err\n"
    assert out["timed_out"] is False and out["truncated"] is False and out["encoding"] == "text"
    assert out["duration_ms"] > 0
    ok = await run(sh, "true")
    assert ok["exit_code"] == 0 and ok["stdout"] == ""


async def test_timeout_kills_the_whole_group(sh, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    started = time.monotonic()
    out = await run(sh, f"sleep 100 & echo $! > {pidfile}; echo started; sleep 100", timeout=0.5)
    assert out["timed_out"] is True and out["exit_code"] is None
    assert out["stdout"] == "started\n"
    assert time.monotonic() - started < 5
    bg = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while process_alive(bg) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not process_alive(bg), "the background grandchild survived the timeout"
    assert sh.rt.shell.live_groups == 0


async def test_output_cap_truncates_but_lets_the_command_finish(sh) -> None:
    out = await run(sh, "head -c 5000000 /dev/zero | tr '\\0' x; echo done >&2", max_output=1000, timeout=30)
    assert out["exit_code"] == 0 and out["truncated"] is True
    assert out["stdout"] == "x" * 1000 and out["stderr"] == "done\n"


async def test_binary_output_is_replaced_or_base64(sh) -> None:
    out = await run(sh, "head -c 100 /dev/urandom")
    assert out["exit_code"] == 0 and isinstance(out["stdout"], str)
    raw = await run(sh, "printf '\\377\\000A'", encoding="base64")
    assert raw["encoding"] == "base64" and base64.b64decode(raw["stdout"]) == b"\xff\x00A"
    text = await run(sh, "printf '\\377A'")
    assert text["stdout"] == "\ufffdA"


async def test_cwd_env_and_stdin_per_call(sh) -> None:
    (sh.root / "sub").mkdir(exist_ok=True)
    out = await run(sh, 'pwd; echo "$GREETING"; cat', cwd="sub", env={"GREETING": "hello"}, stdin="piped")
    assert out["stdout"].splitlines() == [str(sh.root / "sub"), "hello", "piped"]
    default = await run(sh, 'pwd; echo "[$GREETING]"; echo "$HOME" "$TMPDIR"')
    home = str(sh.rt.tmp_dir)
    assert default["stdout"].splitlines() == [str(sh.root), "[]", f"{home} {home}"]
    alias = await run(sh, "pwd", cwd="/workspace/sub")
    assert alias["stdout"] == str(sh.root / "sub") + "\n"


async def test_cwd_must_be_a_directory_in_the_workspace(sh) -> None:
    r = await sh.post("/v1/shell", json={"command": "pwd", "cwd": "/etc"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await sh.post("/v1/shell", json={"command": "pwd", "cwd": "no-such-dir"})
    assert r.status_code == 422 and "cwd" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "command"),
        ({"command": ""}, "command"),
        ({"command": "true", "timeout": -1}, "timeout"),
        ({"command": "true", "max_output": -5}, "max_output"),
        ({"command": "true", "encoding": "hex"}, "encoding"),
        ({"command": "true", "env": {"A": 1}}, "env"),
        ({"command": "true", "env": {"A=B": "1"}}, "env"),
        ({"command": "true", "cmd": "x"}, "cmd"),
    ],
)
async def test_bad_requests_name_the_field(sh, body: dict, field: str) -> None:
    r = await sh.post("/v1/shell", json=body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and field in err["message"]


async def test_streaming_yields_chunks_then_the_status(sh) -> None:
    r = await sh.post("/v1/shell/stream", json={"command": "echo one; echo two >&2; sleep 0.05; echo three; exit 4"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    *chunks, final = lines
    assert "".join(c["data"] for c in chunks if c["stream"] == "stdout") == "one\nthree\n"
    assert "".join(c["data"] for c in chunks if c["stream"] == "stderr") == "two\n"
    assert final["exit_code"] == 4 and final["timed_out"] is False and final["truncated"] is False
    assert set(final) == {"exit_code", "timed_out", "truncated", "duration_ms"}


async def test_streaming_timeout_and_cap(sh) -> None:
    r = await sh.post("/v1/shell/stream", json={"command": "yes | head -c 100000; sleep 30", "timeout": 0.5, "max_output": 10})
    *chunks, final = [json.loads(line) for line in r.text.splitlines()]
    assert "".join(c["data"] for c in chunks) == "y\ny\ny\ny\ny\n"
    assert final["timed_out"] is True and final["exit_code"] is None and final["truncated"] is True


async def test_stream_consumer_leaving_early_kills_the_command(sh, tmp_path: Path) -> None:
    from corral.box.shell import ShellRequest

    pidfile = tmp_path / "pid"
    gen = sh.rt.shell.stream(ShellRequest(command=f"echo $$ > {pidfile}; echo first; sleep 100", timeout=60))
    first = await gen.__anext__()
    assert first == {"stream": "stdout", "data": "first\n"}
    await gen.aclose()
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while process_alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not process_alive(pid)


async def test_background_jobs_are_tracked_until_killed(sh, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg"
    out = await run(sh, f"sleep 100 > /dev/null 2>&1 & echo $! > {pidfile}")
    assert out["exit_code"] == 0 and out["duration_ms"] < 5000
    pid = int(pidfile.read_text())
    assert process_alive(pid) and sh.rt.shell.live_groups >= 1
    assert sh.rt.shell.kill_all() >= 1
    deadline = time.monotonic() + 2
    while process_alive(pid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not process_alive(pid)


async def test_the_box_token_is_not_passed_to_commands(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    rt = BoxRuntime(tmp_path / "ws", tmp_path / "home")
    env = rt.env()
    assert "SECRET_TOKEN" not in env and env["HOME"] == str(tmp_path / "home")
    import shutil

    shutil.rmtree(rt.state_dir)
