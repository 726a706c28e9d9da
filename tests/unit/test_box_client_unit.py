"""BoxClient's pure logic against httpx.MockTransport: error mapping, request shapes, result types.

The real box is exercised in tests/box/test_client.py; here the "server" is a
function, so every failure mode (dead socket, proxy page, garbage JSON) can be
produced on demand.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

import corral
from corral.client import AsyncBoxClient, BoxClient, PythonResult, ShellChunk, ShellResult
from corral.client._async.box import COMMAND_MARGIN

URL = "http://box.test:8000"
TOKEN = "s3cret-token-value"


def _async_client(handler) -> AsyncBoxClient:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return AsyncBoxClient(URL, TOKEN, http_client=http)


def _raiser(exc_type):
    def handler(request: httpx.Request):
        raise exc_type("boom", request=request)

    return handler


# --- transport failures: the sandbox failed ---


@pytest.mark.parametrize(
    "exc_type", [httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ReadError]
)
async def test_transport_errors_become_sandbox_unreachable(exc_type) -> None:
    async with _async_client(_raiser(exc_type)) as box:
        with pytest.raises(corral.SandboxUnreachable) as info:
            await box.shell("true")
    err = info.value
    assert err.retryable and isinstance(err, corral.SandboxError)
    assert "POST http://box.test:8000/v1/shell" in str(err)
    assert TOKEN not in str(err)


def test_sync_client_maps_transport_errors_too() -> None:
    http = httpx.Client(transport=httpx.MockTransport(_raiser(httpx.ConnectError)))
    with BoxClient(URL, TOKEN, http_client=http) as box:
        with pytest.raises(corral.SandboxUnreachable, match="connection failed"):
            box.info()


def test_a_real_refused_connection_is_sandbox_unreachable() -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with BoxClient(f"http://127.0.0.1:{port}", TOKEN, timeout=2) as box:
        with pytest.raises(corral.SandboxUnreachable, match=f"127.0.0.1:{port}"):
            box.healthz()


# --- error answers: typed by the wire body, else by status ---


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (401, "unauthorized", corral.Unauthorized),
        (403, "forbidden", corral.Forbidden),
        (404, "not_found", corral.NotFound),
        (409, "conflict", corral.Conflict),
        (422, "invalid_request", corral.InvalidRequest),
        (500, "corral_error", corral.CorralError),
        (503, "sandbox_error", corral.SandboxError),
    ],
)
async def test_wire_errors_become_their_class(status, code, cls) -> None:
    def handler(request):
        return httpx.Response(status, json={"error": {"code": code, "message": f"the {code} message"}})

    async with _async_client(handler) as box:
        with pytest.raises(cls) as info:
            await box.read_text("a.txt")
    assert type(info.value) is cls
    assert str(info.value) == f"the {code} message"


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (502, "<html>Bad Gateway</html>", corral.SandboxError),
        (404, '{"detail": "Not Found"}', corral.NotFound),
        (400, "nope", corral.InvalidRequest),
    ],
)
async def test_non_corral_error_answers_map_by_status_and_name_the_url(status, body, cls) -> None:
    async with _async_client(lambda r: httpx.Response(status, text=body)) as box:
        with pytest.raises(cls) as info:
            await box.exists("x")
    assert f"HTTP {status}" in str(info.value)
    assert "GET http://box.test:8000/v1/files/exists" in str(info.value)
    assert "path=" not in str(info.value)  # query strings (paths) stay out of messages


async def test_a_2xx_answer_that_is_not_json_is_a_sandbox_error() -> None:
    async with _async_client(lambda r: httpx.Response(200, text="<html>hi</html>")) as box:
        with pytest.raises(corral.SandboxError, match="expected JSON"):
            await box.healthz()


async def test_a_2xx_answer_of_the_wrong_shape_is_a_sandbox_error() -> None:
    async with _async_client(lambda r: httpx.Response(200, json={"exists": "maybe"})) as box:
        with pytest.raises(corral.SandboxError, match="'exists'"):
            await box.exists("x")
    async with _async_client(lambda r: httpx.Response(200, json={"status": "weird"})) as box:
        with pytest.raises(corral.SandboxError, match="PythonResult"):
            await box.python("1")


# --- request shapes ---


async def test_shell_request_shape_and_timeout_margin() -> None:
    seen = {}

    def handler(request: httpx.Request):
        seen["auth"] = request.headers["authorization"]
        seen["body"] = json.loads(request.content)
        seen["timeout"] = request.extensions["timeout"]
        return httpx.Response(200, json={"exit_code": 3, "stdout": "", "stderr": "bad thing\n", "timed_out": False,
                                         "truncated": False, "duration_ms": 5.0, "encoding": "text"})

    async with _async_client(handler) as box:
        result = await box.shell("exit 3", timeout=7, cwd="sub", env={"A": "1"}, stdin="in")
    assert seen["auth"] == f"Bearer {TOKEN}"
    assert seen["body"] == {"command": "exit 3", "timeout": 7.0, "max_output": 1 << 20, "encoding": "text",
                            "cwd": "sub", "env": {"A": "1"}, "stdin": "in"}
    assert seen["timeout"]["read"] == 7 + COMMAND_MARGIN
    assert not result.ok and result.exit_code == 3 and result.command == "exit 3"
    with pytest.raises(corral.CommandFailed, match=r"'exit 3' exited with 3: bad thing") as info:
        result.check()
    assert not info.value.retryable and info.value.details["exit_code"] == 3


async def test_files_requests() -> None:
    calls = []

    def handler(request: httpx.Request):
        calls.append((request.method, request.url.path, dict(request.url.params), request.content))
        if request.method == "PUT":
            return httpx.Response(200, json={"path": "d/a.bin", "name": "a.bin", "type": "file", "size": 3,
                                             "mtime_ms": 1})
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(200, content=b"\x00\x01\x02")

    async with _async_client(handler) as box:
        entry = await box.write("d/a.bin", b"\x00\x01\x02")
        assert entry.type == "file" and entry.size == 3
        assert await box.read_bytes(Path("d/a.bin")) == b"\x00\x01\x02"
        assert await box.delete("d", recursive=True) is None
    assert calls == [
        ("PUT", "/v1/files", {"path": "d/a.bin"}, b"\x00\x01\x02"),
        ("GET", "/v1/files", {"path": "d/a.bin", "format": "bytes"}, b""),
        ("DELETE", "/v1/files", {"path": "d", "recursive": "true"}, b""),
    ]


async def test_download_failure_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    async with _async_client(lambda r: httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})) as box:
        with pytest.raises(corral.NotFound):
            await box.download("missing", target)
    assert list(tmp_path.iterdir()) == []


async def test_upload_of_a_missing_local_file_is_not_found(tmp_path: Path) -> None:
    async with _async_client(lambda r: httpx.Response(500)) as box:
        with pytest.raises(corral.NotFound, match="no local file"):
            await box.upload(tmp_path / "nope", "x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_url": "box:8000", "token": TOKEN}, "base_url"),
        ({"base_url": URL, "token": ""}, "token"),
        ({"base_url": URL, "token": TOKEN, "timeout": 0}, "timeout"),
    ],
)
def test_bad_construction_is_invalid_request(kwargs, match) -> None:
    with pytest.raises(corral.InvalidRequest, match=match):
        BoxClient(**kwargs)


async def test_bad_arguments_are_invalid_request_before_any_request() -> None:
    async with _async_client(lambda r: pytest.fail("no request expected")) as box:
        for call in (box.shell(""), box.shell("ls", timeout=-1), box.python(3), box.write("x", 5), box.read_text("")):
            with pytest.raises(corral.InvalidRequest):
                await call


async def test_closed_client_says_so() -> None:
    box = _async_client(lambda r: httpx.Response(200, json={"ok": True}))
    await box.aclose()
    await box.aclose()  # idempotent
    with pytest.raises(corral.InvalidRequest, match="closed"):
        await box.healthz()


def test_repr_never_shows_the_token() -> None:
    box = BoxClient(URL, TOKEN)
    try:
        assert TOKEN not in repr(box) and URL in repr(box)
    finally:
        box.close()


# --- streaming ---


def _ndjson(*items) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


async def test_shell_stream_yields_chunks_then_a_result_with_all_output() -> None:
    body = _ndjson({"stream": "stdout", "data": "a\n"}, {"stream": "stderr", "data": "e"}, {"stream": "stdout", "data": "b\n"},
                   {"exit_code": 0, "timed_out": False, "truncated": False, "duration_ms": 2.0})
    async with _async_client(lambda r: httpx.Response(200, content=body)) as box:
        items = [item async for item in box.shell_stream("x")]
    assert [type(i) for i in items] == [ShellChunk, ShellChunk, ShellChunk, ShellResult]
    final = items[-1]
    assert final.ok and final.stdout == "a\nb\n" and final.stderr == "e" and final.check() is final


async def test_shell_stream_base64_output_is_joined_as_bytes() -> None:
    enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
    body = _ndjson({"stream": "stdout", "data": enc(b"\xff\x00")}, {"stream": "stdout", "data": enc(b"\x01")},
                   {"exit_code": 0, "timed_out": False, "truncated": False, "duration_ms": 1.0})
    async with _async_client(lambda r: httpx.Response(200, content=body)) as box:
        items = [item async for item in box.shell_stream("x", encoding="base64")]
    assert items[0].data_bytes == b"\xff\x00"
    assert items[-1].stdout_bytes == b"\xff\x00\x01"


@pytest.mark.parametrize(
    ("body", "cls", "match"),
    [
        (_ndjson({"stream": "stdout", "data": "a"}), corral.SandboxUnreachable, "before its final line"),
        (_ndjson({"error": {"code": "sandbox_error", "message": "box broke"}}), corral.SandboxError, "box broke"),
        (b"not json\n", corral.SandboxError, "one JSON object per line"),
    ],
)
async def test_shell_stream_failures(body, cls, match) -> None:
    async with _async_client(lambda r: httpx.Response(200, content=body)) as box:
        with pytest.raises(cls, match=match):
            [item async for item in box.shell_stream("x")]


def test_sync_shell_stream() -> None:
    body = _ndjson({"stream": "stdout", "data": "hi"}, {"exit_code": None, "timed_out": True, "truncated": False,
                                                       "duration_ms": 1000.0})
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body)))
    with BoxClient(URL, TOKEN, http_client=http) as box:
        *chunks, final = list(box.shell_stream("sleep 9", timeout=1))
    assert [c.data for c in chunks] == ["hi"]
    with pytest.raises(corral.CommandTimeout, match="timed out"):
        final.check()


# --- wait_ready ---


async def test_wait_ready_polls_until_healthy() -> None:
    attempts = []

    def handler(request):
        attempts.append(1)
        if len(attempts) < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"ok": True, "version": "1"})

    async with _async_client(handler) as box:
        health = await box.wait_ready(10)
    assert health.ok and len(attempts) == 3


async def test_wait_ready_raises_a_wrong_token_at_once() -> None:
    attempts = []

    def handler(request):
        attempts.append(1)
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "bad token"}})

    async with _async_client(handler) as box:
        with pytest.raises(corral.Unauthorized):
            await box.wait_ready(10)
    assert len(attempts) == 1


def test_wait_ready_gives_up_with_the_last_error() -> None:
    http = httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503, text="starting")))
    with BoxClient(URL, TOKEN, http_client=http) as box:
        with pytest.raises(corral.SandboxUnreachable, match=r"not ready after 0.3s \(last: .*HTTP 503"):
            box.wait_ready(0.3)


# --- result types ---


def _png() -> str:
    return base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def test_python_result_helpers_and_check() -> None:
    ok = PythonResult(status="ok", stdout="out\n", result={"text/plain": "2"}, display=[{"image/png": _png()}])
    assert ok.ok and ok.text == "2" and ok.images == [b"\x89PNG\r\n\x1a\nfake"] and ok.check() is ok
    assert "<img" in ok._repr_html_() and "out" in ok._repr_html_()

    err = PythonResult(status="error", error={"ename": "ZeroDivisionError", "evalue": "division by zero",
                                              "traceback": ["tb"]})
    with pytest.raises(corral.PythonError, match="ZeroDivisionError: division by zero") as info:
        err.check()
    assert info.value.details["traceback"] == ["tb"]
    with pytest.raises(corral.CommandTimeout):
        PythonResult(status="timeout", duration_ms=2000).check()
    with pytest.raises(corral.KernelDied):
        PythonResult(status="died").check()


def test_command_errors_are_not_retryable_and_pickle() -> None:
    import pickle

    with pytest.raises(corral.CommandFailed) as info:
        ShellResult(exit_code=1, stderr="x", command="false").check()
    again = pickle.loads(pickle.dumps(info.value))
    assert type(again) is corral.CommandFailed and again.details["exit_code"] == 1 and not again.retryable
