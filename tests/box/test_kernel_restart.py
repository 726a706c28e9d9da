"""Kernel restarts through the fork server: fresh processes, signals, death, fallback, cleanup."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from _box_helpers import process_alive

import corral.box.forkserver as forkserver
import corral.box.runtime as runtime_mod
from corral.box.kernel import Kernel

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def cell(api, code: str, timeout: float = 60) -> dict:
    r = await api.post("/v1/python", json={"code": code, "timeout": timeout})
    assert r.status_code == 200, r.text
    return r.json()


async def value(api, code: str):
    """The cell's printed JSON value."""
    out = await cell(api, f"import json as _json\nprint(_json.dumps({code}))")
    assert out["status"] == "ok", out
    return json.loads(out["stdout"])


async def gone(pid: int, within: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while process_alive(pid) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    return not process_alive(pid)


def zygote(rt) -> int:
    pids = rt.kernel.pids() - {rt.kernel.pid()}
    assert len(pids) == 1, pids
    return pids.pop()


async def test_a_restart_is_a_new_process_forked_with_nothing_of_the_old(api) -> None:
    await cell(api, "x = 1\nimport colorsys")
    old = await value(api, "[__import__('os').getpid(), __import__('os').getppid()]")
    server = zygote(api.rt)
    assert old[1] == server and process_alive(server)

    r = await api.post("/v1/reset", json={"restart_kernel": True})
    assert r.status_code == 200
    pid, ppid, has_x, has_colorsys = await value(
        api, "[__import__('os').getpid(), __import__('os').getppid(), 'x' in dir(), 'colorsys' in __import__('sys').modules]"
    )
    assert pid != old[0] and pid == api.rt.kernel.pid()
    assert ppid == server and zygote(api.rt) == server  # the same fork server made it
    assert (has_x, has_colorsys) == (False, False)
    assert await gone(old[0])
    # Its own process group, like a spawned kernel: signals to the group spare the server. The
    # box's session (no session of its own): one scheduling autogroup with the box (groups.py).
    assert os.getpgid(pid) == pid and os.getpgid(server) != pid
    assert os.getsid(pid) == os.getsid(server) == os.getsid(0)


async def test_interrupt_stops_a_busy_loop_and_keeps_the_kernel(api) -> None:
    await cell(api, "kept = 7")
    pid = api.rt.kernel.pid()
    out = await cell(api, "while True: pass", timeout=0.5)
    assert out["status"] == "timeout" and out["error"] is None
    assert (await cell(api, "kept"))["result"] == {"text/plain": "7"}
    assert api.rt.kernel.pid() == pid


async def test_a_killed_kernel_is_detected_during_and_between_cells(api) -> None:
    await cell(api, "lost = 1")
    pid = api.rt.kernel.pid()
    running = asyncio.ensure_future(cell(api, "import time\ntime.sleep(30)"))
    await asyncio.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    out = await asyncio.wait_for(running, 20)
    assert out["status"] == "died" and "died" in out["stderr"]
    second = api.rt.kernel.pid()
    assert second != pid and (await cell(api, "lost"))["error"]["ename"] == "NameError"

    await cell(api, "lost = 2")
    os.kill(second, signal.SIGKILL)
    assert await gone(second)
    # /proc shows the leader a zombie while its other threads still exit; the box's pidfd fires after them.
    for _ in range(250):
        if (await api.get("/v1/info")).json()["kernel"] == {"alive": False}:
            break
        await asyncio.sleep(0.02)
    assert (await api.get("/v1/info")).json()["kernel"] == {"alive": False}
    out = await cell(api, "'lost' in dir()")  # runs on a fresh kernel
    assert out["status"] == "ok" and out["result"] == {"text/plain": "False"}
    assert api.rt.kernel.pid() not in (pid, second)


async def test_a_restarted_kernel_follows_the_session_env_and_cwd(api) -> None:
    await api.post("/v1/session", json={"env": {"CORRAL_FORK_T": "a b"}})
    assert (await api.post("/v1/python/restart")).status_code == 200
    env, cwd, tmp = await value(
        api, "[__import__('os').environ.get('CORRAL_FORK_T'), __import__('os').getcwd(), __import__('tempfile').gettempdir()]"
    )
    assert env == "a b" and cwd == str(api.root) and tmp == str(api.rt.tmp_dir)
    await api.post("/v1/reset", json={"restart_kernel": True})
    assert await value(api, "__import__('os').environ.get('CORRAL_FORK_T')") is None


async def test_interpreter_startup_variables_get_a_fork_server_of_their_own(api, tmp_path: Path) -> None:
    (tmp_path / "corral_fork_probe.py").write_text("WHERE = 'pythonpath'\n")
    server = zygote(api.rt)
    await api.post("/v1/session", json={"env": {"PYTHONPATH": str(tmp_path)}})
    await api.post("/v1/python/restart")
    assert await value(api, "__import__('corral_fork_probe').WHERE") == "pythonpath"
    replaced = zygote(api.rt)
    assert replaced != server and await gone(server)
    assert await value(api, "__import__('os').getppid()") == replaced

    await api.post("/v1/reset", json={"restart_kernel": True})  # the session env is dropped
    out = await cell(api, "import corral_fork_probe")
    assert out["status"] == "error" and out["error"]["ename"] == "ModuleNotFoundError"
    assert zygote(api.rt) != replaced


async def test_a_dead_fork_server_is_replaced(api) -> None:
    server = zygote(api.rt)
    os.kill(server, signal.SIGKILL)
    assert await gone(server)
    assert (await api.post("/v1/python/restart")).status_code == 200
    out = await cell(api, "import os; os.getppid()")
    assert out["status"] == "ok"
    assert int(out["result"]["text/plain"]) == zygote(api.rt) != server


async def test_container_reset_spares_the_fork_server(api, monkeypatch, tmp_path: Path) -> None:
    """In a container reset kills every process but the box's own: the fork server is one of them."""
    spared: list[set] = []

    def kill_box_descendants_but(spare: set) -> int:
        # The container's kill-all, confined to this test's process tree.
        spared.append(set(spare))
        import psutil

        victims = [p for p in psutil.Process().children(recursive=True) if p.pid not in spare]
        for p in victims:
            p.kill()
        return len(victims)

    monkeypatch.setattr(runtime_mod, "kill_everything_but", kill_box_descendants_but)
    # Container mode also empties the temp root: point it at this test's own dir.
    monkeypatch.setattr(runtime_mod.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(api.rt, "in_container", True)
    await cell(api, "soft = 1")
    server, kernel = zygote(api.rt), api.rt.kernel.pid()
    assert (await api.post("/v1/reset", json={"restart_kernel": False})).status_code == 200
    assert {server, kernel} <= spared[-1]
    assert await value(api, "[__import__('os').getpid(), 'soft' in dir()]") == [kernel, False]
    assert (await api.post("/v1/reset", json={"restart_kernel": True})).status_code == 200
    assert await value(api, "__import__('os').getppid()") == server == zygote(api.rt)


async def test_a_forked_kernel_matches_a_spawned_one(tmp_path: Path) -> None:
    probe = (
        "import sys, os, json, threading\n"
        "print(json.dumps([sorted(sys.modules), sorted(os.environ), sys.argv[1:2], sys.orig_argv[:2],"
        " sys.path, os.getcwd(), threading.active_count(), os.getppid()]))"
    )
    seen = []
    for fork in (True, False):
        root = tmp_path / str(fork)
        root.mkdir()
        kernel = Kernel(str(root), root, lambda: {**os.environ, "HOME": str(root)})
        kernel._forks.disabled = not fork
        try:
            out = await kernel.execute(probe)
            assert out["status"] == "ok", out
            seen.append(json.loads(out["stdout"]))
            server = kernel.pids() - {kernel.pid()}
        finally:
            await kernel.close()
        assert seen[-1][7] == (server.pop() if fork else os.getpid())
    (fmods, fenv, fargv, forig, fpath, fcwd, fthreads, _), (smods, senv, sargv, sorig, spath, scwd, sthreads, _) = seen
    # The fork server imports only what a kernel imports while it boots (plus the builtin gc it freezes with).
    assert set(fmods) - set(smods) <= {"gc"} and set(smods) <= set(fmods)
    assert fenv == senv and fargv == sargv and forig == sorig and fthreads == sthreads
    assert fpath == spath and Path(fcwd).name == "True" and Path(scwd).name == "False"


async def test_spawns_kernels_when_the_fork_server_cannot_start(tmp_path: Path, monkeypatch) -> None:
    broken = tmp_path / "broken_server.py"
    broken.write_text("import sys\nsys.exit('no fork server here')\n")
    monkeypatch.setattr(forkserver, "KERNEL_MAIN", str(broken))
    kernel = Kernel(str(tmp_path), tmp_path, lambda: dict(os.environ))
    try:
        out = await kernel.execute("import os; v = 3; os.getppid()")
        assert out["status"] == "ok" and int(out["result"]["text/plain"]) == os.getpid()
        assert kernel._forks.disabled and kernel.pids() == {kernel.pid()}
        first = kernel.pid()
        await kernel.restart()
        assert kernel.pid() != first and await gone(first)
        out = await kernel.execute("'v' in dir()")
        assert out["result"] == {"text/plain": "False"}
        assert (await kernel.execute("while True: pass", timeout=0.5))["status"] == "timeout"
        second = kernel.pid()
    finally:
        await kernel.close()
    assert await gone(second)


async def test_close_kills_the_kernel_what_it_started_and_the_fork_server(tmp_path: Path) -> None:
    kernel = Kernel(str(tmp_path), tmp_path, lambda: dict(os.environ))
    try:
        out = await kernel.execute(
            "import subprocess; subprocess.Popen(['sleep', '100'], start_new_session=False).pid"
        )
        child = int(out["result"]["text/plain"])
        pids = kernel.pids() | {child}
        assert len(pids) == 3 and all(process_alive(p) for p in pids)
    finally:
        await kernel.close()
    for pid in pids:
        assert await gone(pid), pid
    assert kernel.pids() == set()
    assert not list(tmp_path.glob("kernel-*"))  # connection files and sockets removed
    await kernel.close()  # idempotent



def _kernels_of(server: int) -> set[int]:
    """The live children of a fork server (each one a kernel)."""
    import psutil

    return {p.pid for p in psutil.Process(server).children() if p.status() != psutil.STATUS_ZOMBIE}


async def test_restarts_during_a_boot_leave_one_kernel(tmp_path: Path) -> None:
    # A reused sandbox that runs no Python is reset while its new kernel still boots; each
    # boot must be stopped with its kernel, not left to install it beside the next one.
    kernel = Kernel(str(tmp_path), tmp_path, lambda: dict(os.environ))
    try:
        await kernel.execute("1")
        server = zygote_of(kernel)
        for i in range(6):
            await kernel.restart(wait=False)
            await asyncio.sleep(0.01 * i)  # cancelled before, during and after the fork
        out = await kernel.execute("import os; os.getpid()")
        assert out["status"] == "ok"
        deadline = asyncio.get_running_loop().time() + 10
        while _kernels_of(server) != {kernel.pid()} and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # killed kernels take a moment to be reaped
        assert _kernels_of(server) == {kernel.pid()} == {int(out["result"]["text/plain"])}
    finally:
        await kernel.close()


def zygote_of(kernel: Kernel) -> int:
    pids = kernel.pids() - {kernel.pid()}
    assert len(pids) == 1, pids
    return pids.pop()

