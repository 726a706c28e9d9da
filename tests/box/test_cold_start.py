"""A cold box: usable as soon as it answers, its kernel started by the first cell, a broken kernel
environment refused at the start.

The box checks while it starts that a kernel can run (its fork server is up with the kernel's
environment and finds the kernel's packages), then answers without booting one. Shell, file and
MCP calls never wait for a kernel; the first cell starts it and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest
from _box_helpers import AUTH, TOKEN, api_client, process_alive

from corral.box.runtime import BoxRuntime
from corral.errors import SandboxError
from tests.support.images import HIDE_IPYKERNEL

pytestmark = pytest.mark.asyncio(loop_scope="function")



def hiding_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hide-ipykernel"
    d.mkdir()
    (d / "sitecustomize.py").write_text(HIDE_IPYKERNEL)
    return d


@contextlib.asynccontextmanager
async def _runtime(tmp_path: Path, start: bool = True) -> AsyncIterator[BoxRuntime]:
    """A box runtime under ``tmp_path`` (started unless ``start`` is False), closed when the block ends."""
    rt = BoxRuntime(tmp_path / "ws", tmp_path / "home")
    try:
        if start:
            await rt.start()
        yield rt
    finally:
        await rt.close()


@contextlib.asynccontextmanager
async def _serving(tmp_path: Path) -> AsyncIterator[tuple[BoxRuntime, httpx.AsyncClient]]:
    """A started runtime and a client of its app, in-process."""
    async with _runtime(tmp_path) as rt, api_client(rt) as api:
        yield rt, api


async def test_a_started_box_answers_shell_and_files_without_a_kernel(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (rt, api):
        zygote = rt.kernel.pids()
        # the start checked that a kernel can run: the fork server is up; no kernel runs
        assert len(zygote) == 1 and rt.kernel.pid() is None and not rt.kernel.started()
        r = await api.post("/v1/shell", json={"command": "echo cold"})
        assert r.status_code == 200 and r.json()["stdout"] == "cold\n"
        r = await api.post("/fastapi/tools/run_shell_command", json={"command": "echo ref"})
        assert r.json()["content"][0]["text"] == "ref\n"
        assert (await api.put("/v1/files", params={"path": "a.txt"}, content=b"x")).status_code == 200
        assert (await api.get("/v1/files/list")).json()
        assert (await api.post("/v1/session", json={"env": {"TASK": "t1"}})).status_code == 200
        assert (await api.get("/v1/info")).json()["kernel"] == {"alive": False}
        # none of that started a kernel
        assert rt.kernel.pid() is None and not rt.kernel.started() and rt.kernel.pids() == zygote


async def test_the_first_cell_starts_the_kernel_and_waits_for_it(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (rt, api):
        assert (await api.post("/v1/session", json={"env": {"TASK": "t2"}})).status_code == 200

        async def first(i: int) -> dict:
            r = await api.post("/v1/python", json={"code": f"import os\n({i}, os.environ['TASK'])"})
            assert r.status_code == 200, r.text
            return r.json()

        async def shell_during_boot() -> float:
            await asyncio.sleep(0.05)  # the cells have asked for the kernel
            t0 = time.perf_counter()
            r = await api.post("/v1/shell", json={"command": "echo meanwhile"})
            assert r.json()["stdout"] == "meanwhile\n"
            return time.perf_counter() - t0

        t0 = time.perf_counter()
        a, b, shell_s = await asyncio.gather(first(1), first(2), shell_during_boot())
        cells_s = time.perf_counter() - t0
        # both cells waited for the one kernel the first of them started (with the session env)
        assert a["status"] == b["status"] == "ok", (a, b)
        assert {a["result"]["text/plain"], b["result"]["text/plain"]} == {"(1, 't2')", "(2, 't2')"}
        assert rt.kernel.pid() is not None and (await api.get("/v1/info")).json()["kernel"]["alive"]
        # the shell call did not wait for the kernel's boot
        assert shell_s < cells_s, (shell_s, cells_s)
        # the kernel is the fork server's child: forked, not spawned
        assert rt.kernel.pids() - {rt.kernel.pid()}
        r = await api.post("/v1/python", json={"code": "x = 41\nx + 1"})
        assert r.json()["result"]["text/plain"] == "42"


async def test_a_reset_starts_a_new_kernel_only_where_one_ran(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (rt, api):
        # a session that ran only shell commands: the reset leaves the box without a kernel
        await api.post("/v1/shell", json={"command": "true"})
        assert (await api.post("/v1/reset", json={"restart_kernel": True})).status_code == 200
        assert not rt.kernel.started()
        # one that ran Python: a fresh kernel boots in the background after the reset
        assert (await api.post("/v1/python", json={"code": "v = 1"})).json()["status"] == "ok"
        old = rt.kernel.pid()
        assert (await api.post("/v1/reset", json={"restart_kernel": True})).status_code == 200
        assert rt.kernel.started()
        r = await api.post("/v1/python", json={"code": "'v' in dir()"})
        assert r.json()["result"]["text/plain"] == "False" and rt.kernel.pid() != old
        assert not process_alive(old)


async def test_a_namespace_reset_without_a_kernel_starts_none(tmp_path: Path) -> None:
    async with _serving(tmp_path) as (rt, api):
        assert (await api.post("/v1/reset", json={"restart_kernel": False})).status_code == 200
        assert not rt.kernel.started()


async def test_a_kernel_environment_without_ipykernel_fails_the_start(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(hiding_dir(tmp_path)))
    async with _runtime(tmp_path, start=False) as rt:
        with pytest.raises(SandboxError, match="cannot run in this sandbox.*cannot find ipykernel"):
            await rt.start()


async def test_an_interpreter_that_cannot_start_fails_the_start(tmp_path: Path, monkeypatch) -> None:
    # PYTHONHOME pointing nowhere: the kernel's interpreter dies before it runs a line
    monkeypatch.setenv("PYTHONHOME", str(tmp_path / "nowhere"))
    async with _runtime(tmp_path, start=False) as rt:
        with pytest.raises(SandboxError, match="cannot run in this sandbox.*fork server did not start.*exited"):
            await rt.start()


async def test_a_kernel_import_that_fails_says_so_in_the_first_cell(tmp_path: Path) -> None:
    # Found but broken (an extension that fails to load): only importing shows it. The cell says why.
    broken = tmp_path / "broken"
    (broken / "tornado").mkdir(parents=True)
    (broken / "tornado" / "__init__.py").write_text("raise ImportError('this tornado is broken')\n")
    async with _runtime(tmp_path, start=False) as rt:
        rt.session_env["PYTHONPATH"] = str(broken)
        await rt.start()
        async with api_client(rt) as api:
            r = await api.post("/v1/python", json={"code": "1"})
            assert r.status_code == 503, r.text
            message = r.json()["error"]["message"]
            assert "importing the kernel's modules failed" in message and "this tornado is broken" in message


# -- the real process ------------------------------------------------------------------------------


def _launch(tmp_path: Path, env: dict) -> subprocess.Popen:
    argv = [sys.executable, "-m", "corral.box", "--host", "127.0.0.1", "--port", "0", "--workspace",
            str(tmp_path / "ws"), "--ready-file", "-", "--token-file", "-"]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    proc.stdin.write(TOKEN.encode() + b"\n")
    proc.stdin.close()
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


async def test_the_box_prints_its_ready_line_and_answers_shell_before_any_kernel(tmp_path: Path) -> None:
    from corral.box.__main__ import READY_MARK

    proc = _launch(tmp_path, {k: v for k, v in os.environ.items() if k != "SECRET_TOKEN"})
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        mark, payload = line.decode().split(" ", 1)
        assert mark == READY_MARK
        port = json.loads(payload)["port"]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, trust_env=False) as http:
            r = await http.post("/v1/shell", json={"command": "echo up"})
            assert r.json()["stdout"] == "up\n"
            assert (await http.get("/v1/info")).json()["kernel"] == {"alive": False}
            r = await http.post("/v1/python", json={"code": "6 * 7"}, timeout=60)
            assert r.json()["result"]["text/plain"] == "42"
    finally:
        _stop(proc)


async def test_a_box_whose_kernel_cannot_run_exits_before_it_answers(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SECRET_TOKEN"}
    env["PYTHONPATH"] = str(hiding_dir(tmp_path))
    proc = _launch(tmp_path, env)
    try:
        code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 60)
        out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
        assert code == 1 and out == ""  # never said it was ready
        assert "corral box: the Python kernel cannot run in this sandbox" in err and "ipykernel" in err, err
    finally:
        _stop(proc)


async def test_the_box_loads_uvicorns_server_without_its_command_line_reloaders_or_websockets() -> None:
    # In a fresh interpreter, as the box does: nothing of uvicorn imported before.
    script = (
        "import sys\n"
        "from corral.box.__main__ import uvicorn_core\n"
        "Config, Server = uvicorn_core()\n"
        "assert Config.__module__ == 'uvicorn.config' and Server.__module__ == 'uvicorn.server'\n"
        "config = Config(lambda scope, receive, send: None, ws='none', loop='none', lifespan='off')\n"
        "config.load()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'click', 'watchfiles', 'websockets'}))\n"
    )
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True,
                                  timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
