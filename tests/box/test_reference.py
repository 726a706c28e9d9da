"""Replay of the reference's in-sandbox requests (docs/box-api.md) against the /fastapi routes.

Each test sends what the reference's clients send and checks the exact
response shape they parse. The three /fastapi/mcp routes are replayed in
test_mcp.py (they need an MCP server).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="module")


def texts(body: dict) -> dict:
    return {item["description"]: item["text"] for item in body["content"] if item["type"] == "text"}


async def test_healthz(api) -> None:
    r = await api.get("/fastapi/healthz")
    assert r.status_code == 200


async def test_run_ipython_cell(api) -> None:
    r = await api.post("/fastapi/tools/run_ipython_cell", json={"code": "v = 6 * 7\nprint('hi')\nv"})
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"content", "isError"} and body["isError"] is False
    assert [(c["type"], c["description"]) for c in body["content"]] == [("text", "stdout"), ("text", "stderr")]
    assert texts(body) == {"stdout": "hi\n42\n", "stderr": ""}

    # stderr alone is not an error (the reference got that wrong); an exception is.
    warn = (await api.post("/fastapi/tools/run_ipython_cell", json={"code": "import sys; print('w', file=sys.stderr)"})).json()
    assert warn["isError"] is False and texts(warn)["stderr"] == "w\n"
    err = (await api.post("/fastapi/tools/run_ipython_cell", json={"code": "raise KeyError('k')"})).json()
    assert err["isError"] is True and "KeyError" in texts(err)["stderr"]


async def test_run_ipython_cell_timeout_is_an_error(api) -> None:
    body = (await api.post("/fastapi/tools/run_ipython_cell", json={"code": "import time; time.sleep(30)", "timeout": 0.5})).json()
    assert body["isError"] is True and "timed out" in texts(body)["stderr"]


async def test_run_shell_command(api) -> None:
    body = (await api.post("/fastapi/tools/run_shell_command", json={"command": "echo out; echo err >&2"})).json()
    assert set(body) == {"content", "isError"}
    assert [c["description"] for c in body["content"]] == ["stdout", "stderr", "returncode"]
    assert texts(body) == {"stdout": "out\n", "stderr": "err\n", "returncode": "0"}
    assert body["isError"] is False  # follows the exit code, not stderr

    failed = (await api.post("/fastapi/tools/run_shell_command", json={"command": "exit 5"})).json()
    assert failed["isError"] is True and texts(failed)["returncode"] == "5"

    binary = await api.post("/fastapi/tools/run_shell_command", json={"command": "head -c 100 /dev/urandom"})
    assert binary.status_code == 200 and binary.json()["isError"] is False


async def test_workspace_routes(api) -> None:
    entry_keys = {"path", "name", "type", "size", "mtime_ms"}
    r = await api.put("/fastapi/workspace/file", params={"path": "/workspace/ref/a.txt"}, content=b"alpha")
    assert r.status_code == 200
    entry = r.json()
    assert set(entry) == entry_keys and entry["path"] == "ref/a.txt" and entry["type"] == "file" and entry["size"] == 5

    r = await api.get("/fastapi/workspace/file", params={"path": "/workspace/ref/a.txt", "format": "text"})
    assert r.status_code == 200 and r.text == "alpha"
    r = await api.get("/fastapi/workspace/file", params={"path": "/workspace/ref/a.txt", "format": "bytes"})
    assert r.content == b"alpha"

    files = [("files[]", ("b.txt", b"bravo", "text/plain")), ("files[]", ("c.bin", b"\x00charlie", "application/octet-stream"))]
    r = await api.post("/fastapi/workspace/files:batch", files=files, data={"paths[]": ["/workspace/ref/b.txt", "ref/sub/c.bin"]})
    assert r.status_code == 200, r.text
    batch = r.json()
    assert [e["path"] for e in batch] == ["ref/b.txt", "ref/sub/c.bin"] and all(set(e) == entry_keys for e in batch)
    assert (api.root / "ref" / "sub" / "c.bin").read_bytes() == b"\x00charlie"
    # Without paths[], the uploads' own file names are used.
    r = await api.post("/fastapi/workspace/files:batch", files=[("files[]", ("d.txt", b"delta", "text/plain"))])
    assert r.status_code == 200 and r.json()[0]["path"] == "d.txt"
    r = await api.post("/fastapi/workspace/files:batch", files=files, data={"paths[]": ["only-one"]})
    assert r.status_code == 422

    listed = (await api.get("/fastapi/workspace/list", params={"path": "/workspace/ref", "depth": 1})).json()
    assert [e["path"] for e in listed] == ["ref/a.txt", "ref/b.txt", "ref/sub"]
    deep = (await api.get("/fastapi/workspace/list", params={"path": "/workspace/ref", "depth": 2})).json()
    assert "ref/sub/c.bin" in [e["path"] for e in deep]

    assert (await api.get("/fastapi/workspace/exists", params={"path": "/workspace/ref/a.txt"})).json() == {"exists": True}
    assert (await api.post("/fastapi/workspace/mkdir", json={"path": "/workspace/ref/new"})).json() == {"created": True}
    assert (await api.post("/fastapi/workspace/mkdir", json={"path": "/workspace/ref/new"})).json() == {"created": False}
    moved = (await api.post("/fastapi/workspace/move", json={"source": "/workspace/ref/a.txt", "destination": "/workspace/ref/new/a.txt"})).json()
    assert set(moved) == entry_keys and moved["path"] == "ref/new/a.txt"

    r = await api.delete("/fastapi/workspace/entry", params={"path": "/workspace/ref"})
    assert r.status_code == 204 and not (api.root / "ref").exists()
    assert (await api.get("/fastapi/workspace/exists", params={"path": "/workspace/ref"})).json() == {"exists": False}


async def test_reference_paths_are_confined(api) -> None:
    for path in ("/workspace/../etc/passwd", "/workspace2/x", "/etc/passwd"):
        r = await api.get("/fastapi/workspace/file", params={"path": path})
        assert r.status_code == 403


async def test_reference_validation_keeps_fastapis_shape(api) -> None:
    r = await api.post("/fastapi/tools/run_shell_command", json={})
    assert r.status_code == 422 and "detail" in r.json()
