"""Stateful Python through /v1/python: one real ipykernel shared by this module."""

from __future__ import annotations

import asyncio
import base64

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def cell(api, code: str, timeout: float = 60) -> dict:
    r = await api.post("/v1/python", json={"code": code, "timeout": timeout})
    assert r.status_code == 200, r.text
    return r.json()


async def test_state_stdout_stderr_and_result(api) -> None:
    assert (await cell(api, "x = 20"))["status"] == "ok"
    out = await cell(api, "import sys\nprint('side')\nprint('warn', file=sys.stderr)\nx + 22")
    assert out["status"] == "ok" and out["stdout"] == "side\n" and out["stderr"] == "warn\n"
    assert out["result"] == {"text/plain": "42"} and out["error"] is None
    assert isinstance(out["execution_count"], int) and out["duration_ms"] > 0
    assert set(out) == {"status", "stdout", "stderr", "result", "display", "error", "execution_count", "duration_ms"}


async def test_error_has_a_clean_traceback(api) -> None:
    out = await cell(api, "def f():\n    return 1 / 0\nf()")
    assert out["status"] == "error" and out["result"] is None
    err = out["error"]
    assert err["ename"] == "ZeroDivisionError" and err["evalue"] == "division by zero"
    joined = "\n".join(err["traceback"])
    assert "1 / 0" in joined and "\x1b[" not in joined


async def test_matplotlib_plot_comes_back_as_png(api) -> None:
    pytest.importorskip("matplotlib")
    out = await cell(api, "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
    assert out["status"] == "ok", out
    pngs = [d["image/png"] for d in out["display"] if "image/png" in d]
    assert len(pngs) == 1 and base64.b64decode(pngs[0]).startswith(b"\x89PNG")


async def test_timeout_interrupts_and_the_kernel_lives_on(api) -> None:
    await cell(api, "kept = 'still here'")
    out = await cell(api, "import time\nprint('before', flush=True)\ntime.sleep(60)", timeout=0.5)
    assert out["status"] == "timeout" and out["error"] is None and "before" in out["stdout"]
    assert out["duration_ms"] < 10_000
    after = await cell(api, "kept")
    assert after["status"] == "ok" and after["result"] == {"text/plain": "'still here'"}


async def test_a_dying_kernel_is_restarted(api) -> None:
    await cell(api, "lost = 1")
    out = await cell(api, "import os\nos._exit(1)")
    assert out["status"] == "died" and "died" in out["stderr"]
    gone = await cell(api, "lost")
    assert gone["status"] == "error" and gone["error"]["ename"] == "NameError"
    assert (await cell(api, "1 + 1"))["result"] == {"text/plain": "2"}
    info = (await api.get("/v1/info")).json()
    assert info["kernel"] == {"alive": True}


async def test_concurrent_cells_do_not_mix_output(api) -> None:
    code = "import time\nfor _ in range(5):\n    print('{tag}')\n    time.sleep(0.01)"
    outs = await asyncio.gather(*(cell(api, code.format(tag=f"cell-{i}")) for i in range(4)))
    for i, out in enumerate(outs):
        assert out["status"] == "ok" and out["stdout"] == f"cell-{i}\n" * 5


async def test_session_env_reaches_kernel_and_shell(api) -> None:
    r = await api.post("/v1/session", json={"env": {"CORRAL_PY_T": "v1"}})
    assert r.status_code == 200 and r.json() == {"ok": True}
    out = await cell(api, "import os\nos.environ.get('CORRAL_PY_T')")
    assert out["result"] == {"text/plain": "'v1'"}
    sh = (await api.post("/v1/shell", json={"command": "echo $CORRAL_PY_T"})).json()
    assert sh["stdout"] == "v1\n"
    bad = await api.post("/v1/session", json={"env": {"X": 1}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


async def test_restart_route_drops_state(api) -> None:
    await cell(api, "doomed = 1")
    r = await api.post("/v1/python/restart")
    assert r.status_code == 200 and r.json() == {"restarted": True}
    out = await cell(api, "doomed")
    assert out["status"] == "error" and out["error"]["ename"] == "NameError"


async def test_bad_cell_requests(api) -> None:
    r = await api.post("/v1/python", json={"code": "1", "timeout": 0})
    assert r.status_code == 422 and "timeout" in r.json()["error"]["message"]
    r = await api.post("/v1/python", json={})
    assert r.status_code == 422 and "code" in r.json()["error"]["message"]


async def test_lean_flush_keeps_every_output_in_order(api) -> None:
    # The kernel runs kernel_main.py: flush() skips the IOPub round trip only when nothing is buffered.
    out = await cell(
        api,
        "import sys\nfrom IPython.display import display\n"
        "print(type(sys.stdout).__name__, end=' ')\nprint('a', end='')\nsys.stdout.flush()\n"
        "display({'k': 1}, raw=True)\nprint('b', end='')\n"
        "print('e', file=sys.stderr, end='')\n'r'",
    )
    assert out["status"] == "ok", out
    assert out["stdout"] == "LeanOutStream ab"
    assert out["stderr"] == "e" and out["display"] == [{"k": 1}] and out["result"] == {"text/plain": "'r'"}
    # Output written right before the cell ends (no newline, no explicit flush) still arrives.
    for i in range(20):
        tail = await cell(api, f"print('tail-{i}', end='')")
        assert tail["stdout"] == f"tail-{i}", tail


async def test_kernel_main_does_not_shadow_user_modules(api) -> None:
    out = await cell(api, "import sys, os\nprint(any(os.path.isfile(os.path.join(p or '.', 'kernel_main.py')) for p in sys.path))\n'' in sys.path")
    assert out["stdout"] == "False\n" and out["result"] == {"text/plain": "True"}, out


async def test_recv_drops_forged_and_foreign_messages() -> None:
    from jupyter_client.session import Session

    from corral.box.kernel import _recv

    class _Socket:
        def __init__(self, frames: list[list[bytes]]) -> None:
            self.frames = frames

        def recv_multipart(self) -> asyncio.Future:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(self.frames.pop(0))
            return fut

    class _Channel:
        def __init__(self, session: Session, frames: list[list[bytes]]) -> None:
            self.session, self.socket = session, _Socket(frames)

    kernel_side, box_side = Session(key=b"right"), Session(key=b"right")
    parent = box_side.msg("execute_request", {})
    good = kernel_side.serialize(kernel_side.msg("stream", {"name": "stdout", "text": "hi"}, parent=parent))
    forged = Session(key=b"wrong").serialize(Session(key=b"wrong").msg("stream", {"text": "x"}, parent=parent))
    foreign = kernel_side.serialize(kernel_side.msg("stream", {"text": "y"}, parent=box_side.msg("execute_request", {})))
    channel = _Channel(box_side, [forged, foreign, [b"junk"], good])
    msg_id = parent["header"]["msg_id"]
    assert await _recv(channel, msg_id, 1.0) is None
    assert await _recv(channel, msg_id, 1.0) is None
    assert await _recv(channel, msg_id, 1.0) is None
    assert await _recv(channel, msg_id, 1.0) == ("stream", {"name": "stdout", "text": "hi"})
