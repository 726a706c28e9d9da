"""The /v1 HTTP surface: auth, error wire form, files, status routes, activity and reset."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest
from _box_helpers import TOKEN, api_client, process_alive

import corral
from corral.box.app import create_app

pytestmark = pytest.mark.asyncio(loop_scope="module")


# --- auth and errors ---


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", TOKEN[:-1]])
async def test_missing_or_wrong_token_is_401(api, token) -> None:
    async with api_client(api.rt, token=token) as anon:
        for method, url in [("GET", "/v1/healthz"), ("POST", "/v1/shell"), ("GET", "/fastapi/healthz"),
                            ("GET", "/v1/files/list"), ("POST", "/fastapi/tools/run_shell_command")]:
            r = await anon.request(method, url, json={"command": "true"})
            assert r.status_code == 401, (method, url)
            assert r.json() == {"error": {"code": "unauthorized", "message": "missing or wrong bearer token"}}


async def test_token_never_reaches_the_logs(api, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    await api.get("/v1/healthz")
    async with api_client(api.rt, token="wrong") as anon:
        await anon.get("/v1/info")
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("token", [None, "", "t", "   ", " " * 20, "short-token-15c", "tab\tinside-a-long-token",
                                   "ünïcode-token-long-enough"])
async def test_create_app_refuses_a_missing_short_or_blank_token(tmp_path: Path, token) -> None:
    with pytest.raises(corral.InvalidRequest, match="token"):
        create_app(token=token, workspace=str(tmp_path))


async def test_unknown_route_and_method_use_the_wire_form(api) -> None:
    r = await api.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await api.get("/v1/shell")
    assert r.status_code == 405 and r.json()["error"]["code"] == "invalid_request"


async def test_unexpected_errors_are_500_without_a_traceback(api, monkeypatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("secret internals /etc/shadow")

    monkeypatch.setattr(api.rt.workspace, "list", boom)
    r = await api.get("/v1/files/list", params={"path": "."})
    assert r.status_code == 500
    body = r.json()
    assert body["error"]["code"] == "corral_error" and "Traceback" not in r.text and "shadow" not in r.text


async def test_json_body_errors_name_the_field(api) -> None:
    r = await api.post("/v1/files/move", json={"source": "a"})
    assert r.status_code == 422 and "destination" in r.json()["error"]["message"]
    r = await api.post("/v1/shell", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


# --- status routes ---


async def test_healthz_info(api) -> None:
    assert (await api.get("/v1/healthz")).json() == {"ok": True, "version": corral.__version__}
    info = (await api.get("/v1/info")).json()
    assert info["pid"] == os.getpid() and info["workspace"] == str(api.root) and info["version"] == corral.__version__
    assert isinstance(info["started_at"], float) and set(info["kernel"]) == {"alive"}


# --- files ---


async def test_files_round_trip(api, unique) -> None:
    d = unique
    r = await api.put("/v1/files", params={"path": f"{d}/a/h.txt"}, content="héllo\n".encode())
    assert r.status_code == 200
    entry = r.json()
    assert entry["path"] == f"{d}/a/h.txt" and entry["name"] == "h.txt" and entry["type"] == "file"
    assert entry["size"] == len("héllo\n".encode()) and isinstance(entry["mtime_ms"], int)
    r = await api.get("/v1/files", params={"path": f"{d}/a/h.txt", "format": "text"})
    assert r.text == "héllo\n" and r.headers["content-type"] == "text/plain; charset=utf-8"
    r = await api.get("/v1/files", params={"path": f"/workspace/{d}/a/h.txt", "format": "bytes"})
    assert r.content == "héllo\n".encode() and r.headers["content-type"] == "application/octet-stream"

    assert (await api.get("/v1/files/exists", params={"path": f"{d}/a/h.txt"})).json() == {"exists": True}
    assert (await api.get("/v1/files/exists", params={"path": f"{d}/zz"})).json() == {"exists": False}
    assert (await api.post("/v1/files/mkdir", json={"path": f"{d}/b"})).json() == {"created": True}
    assert (await api.post("/v1/files/mkdir", json={"path": f"{d}/b"})).json() == {"created": False}
    moved = (await api.post("/v1/files/move", json={"source": f"{d}/a/h.txt", "destination": f"{d}/b/h2.txt"})).json()
    assert moved["path"] == f"{d}/b/h2.txt"
    listed = (await api.get("/v1/files/list", params={"path": d, "depth": 2})).json()
    assert [e["path"] for e in listed] == [f"{d}/a", f"{d}/b", f"{d}/b/h2.txt"]

    r = await api.delete("/v1/files", params={"path": f"{d}/b"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    r = await api.delete("/v1/files", params={"path": f"{d}/b", "recursive": "true"})
    assert r.status_code == 204 and not (api.root / d / "b").exists()


async def test_large_upload_is_streamed_to_disk(api, unique) -> None:
    blob = os.urandom((3 << 20) + 11)

    async def chunks():
        for i in range(0, len(blob), 1 << 16):
            yield blob[i : i + (1 << 16)]

    r = await api.put("/v1/files", params={"path": f"{unique}/big.bin"}, content=chunks())
    assert r.status_code == 200 and r.json()["size"] == len(blob)
    r = await api.get("/v1/files", params={"path": f"{unique}/big.bin", "format": "bytes"})
    assert r.content == blob and int(r.headers["content-length"]) == len(blob)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "/workspace/../etc/passwd"])
async def test_file_routes_refuse_paths_outside(api, path) -> None:
    for r in [
        await api.get("/v1/files", params={"path": path}),
        await api.put("/v1/files", params={"path": path}, content=b"x"),
        await api.get("/v1/files/list", params={"path": path}),
        await api.get("/v1/files/exists", params={"path": path}),
        await api.delete("/v1/files", params={"path": path}),
        await api.post("/v1/files/mkdir", json={"path": path}),
        await api.post("/v1/files/move", json={"source": path, "destination": "y"}),
    ]:
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.request.url


async def test_file_routes_refuse_symlinks_out_and_the_sibling(api, unique, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    (api.root / unique).mkdir()
    os.symlink(secret, api.root / unique / "leak")
    os.symlink(tmp_path, api.root / unique / "leakdir")
    sibling = Path(str(api.root) + "2")
    sibling.mkdir(exist_ok=True)
    (sibling / "s.txt").write_text("sibling-content-q9")
    for path in [f"{unique}/leak", f"{unique}/leakdir/secret.txt", str(sibling / "s.txt")]:
        r = await api.get("/v1/files", params={"path": path})
        assert r.status_code == 403 and "host secret" not in r.text and "sibling-content-q9" not in r.text
    r = await api.put("/v1/files", params={"path": f"{unique}/leakdir/new.txt"}, content=b"x")
    assert r.status_code == 403 and not (tmp_path / "new.txt").exists()


async def test_missing_file_is_404(api) -> None:
    r = await api.get("/v1/files", params={"path": "definitely-missing.txt"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# --- activity ---


async def test_status_routes_are_not_activity(api) -> None:
    before = (await api.get("/v1/activity")).json()
    for _ in range(3):
        await api.get("/v1/healthz")
        await api.get("/v1/info")
        await api.get("/fastapi/healthz")
    after = (await api.get("/v1/activity")).json()
    assert after["calls_total"] == before["calls_total"] and after["last_active_at"] == before["last_active_at"]
    await api.get("/v1/files/exists", params={"path": "x"})
    counted = (await api.get("/v1/activity")).json()
    assert counted["calls_total"] == before["calls_total"] + 1 and counted["last_active_at"] > before["last_active_at"]


async def test_a_long_command_is_running_while_it_runs(api) -> None:
    task = asyncio.ensure_future(api.post("/v1/shell", json={"command": "sleep 0.6"}))
    try:
        deadline = time.monotonic() + 5
        seen = 0
        while time.monotonic() < deadline and not seen:
            seen = (await api.get("/v1/activity")).json()["running"]
            await asyncio.sleep(0.02)
        assert seen == 1
        mid = (await api.get("/v1/activity")).json()["last_active_at"]
        await task
        end = (await api.get("/v1/activity")).json()
        assert end["running"] == 0 and end["last_active_at"] > mid  # updated at the end too
    finally:
        await task


# --- reset (last in the module: it wipes the shared workspace) ---


async def test_reset_kills_wipes_and_forgets(api, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    pidfile = tmp_path / "bg.pid"
    await api.post("/v1/shell", json={"command": f"sleep 100 >/dev/null 2>&1 & echo $! > {pidfile}"})
    bg = int(pidfile.read_text())
    assert process_alive(bg)
    await api.post("/v1/session", json={"env": {"CORRAL_RESET_T": "v"}})
    await api.put("/v1/files", params={"path": "junk/a.txt"}, content=b"x")
    os.symlink(outside, api.root / "link")
    (api.rt.tmp_dir / "cache").write_text("x")
    assert (await api.post("/v1/python", json={"code": "y = 1"})).json()["status"] == "ok"

    r = await api.post("/v1/reset", json={"restart_kernel": True})
    assert r.status_code == 200
    body = r.json()
    assert body["ok"] is True and body["killed"] >= 1 and body["duration_ms"] >= 0

    deadline = time.monotonic() + 2
    while process_alive(bg) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not process_alive(bg)
    assert list(api.root.iterdir()) == [] and list(api.rt.tmp_dir.iterdir()) == []
    assert (outside / "keep.txt").read_text() == "keep"
    assert (await api.post("/v1/shell", json={"command": "echo -n $CORRAL_RESET_T"})).json()["stdout"] == ""
    out = (await api.post("/v1/python", json={"code": "import os; (os.environ.get('CORRAL_RESET_T'), 'y' in dir())"})).json()
    assert out["result"] == {"text/plain": "(None, False)"}
    assert (await api.get("/v1/activity")).json()["calls_total"] == 2


async def test_reset_without_kernel_restart_clears_the_namespace(api) -> None:
    await api.post("/v1/session", json={"env": {"CORRAL_SOFT": "1"}})
    await api.post("/v1/python", json={"code": "import os\nkeep_pid = os.getpid()\nz = 5"})
    pid = (await api.post("/v1/python", json={"code": "keep_pid"})).json()["result"]["text/plain"]
    r = await api.post("/v1/reset", json={"restart_kernel": False})
    assert r.status_code == 200 and r.json()["ok"]
    out = (await api.post("/v1/python", json={"code": "import os; (os.getpid(), 'z' in dir(), os.environ.get('CORRAL_SOFT'))"})).json()
    assert out["result"] == {"text/plain": f"({pid}, False, None)"}
    r = await api.post("/v1/reset")  # no body: defaults
    assert r.status_code == 200
