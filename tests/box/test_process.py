"""``python -m corral.box`` as a real process on 127.0.0.1: ready file, HTTP, SIGTERM, token delivery and refusal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from _box_helpers import TOKEN, process_alive


def _start(tmp_path: Path, env_token: str | None = None, *, token_file: str | None = None,
           stdin_token: str | None = None) -> tuple[subprocess.Popen, Path]:
    """Start a box; the token comes from SECRET_TOKEN, a token file, or stdin (``--token-file -``)."""
    ready = tmp_path / "run" / "ready.json"
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_TOKEN", "CORRAL_TOKEN_FILE")}
    if env_token is not None:
        env["SECRET_TOKEN"] = env_token
    argv = [sys.executable, "-m", "corral.box", "--host", "127.0.0.1", "--port", "0",
            "--workspace", str(tmp_path / "ws"), "--ready-file", str(ready)]
    if token_file is not None:
        argv += ["--token-file", token_file]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        stdin=subprocess.PIPE if stdin_token is not None else subprocess.DEVNULL,
    )
    if stdin_token is not None:
        proc.stdin.write(stdin_token.encode() + b"\n")
        proc.stdin.close()
    return proc, ready


def _wait_ready(proc: subprocess.Popen, ready: Path) -> dict:
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
        assert time.monotonic() < deadline, "no ready file within 60s"
        time.sleep(0.02)
    return json.loads(ready.read_text())


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


@pytest.fixture
def box(tmp_path: Path):
    proc, ready = _start(tmp_path, TOKEN)
    try:
        yield proc, _wait_ready(proc, ready), tmp_path
    finally:
        _kill(proc)


def test_serves_over_real_http_and_stops_cleanly_on_sigterm(box) -> None:
    proc, info, tmp_path = box
    assert info["pid"] == proc.pid and isinstance(info["port"], int) and info["port"] > 0
    assert not list((tmp_path / "run").glob(".*tmp"))  # written atomically: no temp file left
    url = f"http://127.0.0.1:{info['port']}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60, trust_env=False) as http:
        assert http.get("/v1/healthz").json()["ok"] is True
        assert http.get("/fastapi/healthz").status_code == 200
        assert http.get("/v1/info").json()["pid"] == proc.pid
        shell = http.post("/v1/shell", json={"command": "echo $((6 * 7)); echo $SECRET_TOKEN"}).json()
        assert shell["stdout"] == "42\n\n"  # the token is not handed to commands
        kernel_pid = int(http.post("/v1/python", json={"code": "import os; os.getpid()"}).json()["result"]["text/plain"])
        stream = http.post("/v1/shell/stream", json={"command": "for i in 1 2 3; do echo $i; sleep 0.01; done"})
        *chunks, final = [json.loads(line) for line in stream.text.splitlines()]
        assert "".join(c["data"] for c in chunks) == "1\n2\n3\n" and final["exit_code"] == 0
        pidfile = tmp_path / "bg.pid"
        http.post("/v1/shell", json={"command": f"sleep 100 >/dev/null 2>&1 & echo $! > {pidfile}"})
        bg = int(pidfile.read_text())
        assert http.get("/v1/healthz", headers={"Authorization": "Bearer nope"}).status_code == 401

    assert process_alive(kernel_pid) and process_alive(bg)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while (process_alive(kernel_pid) or process_alive(bg)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_alive(kernel_pid), "the kernel outlived the box"
    assert not process_alive(bg), "a background command outlived the box"
    assert TOKEN.encode() not in proc.stderr.read()


@pytest.mark.parametrize("token", [None, ""])
def test_refuses_to_start_without_a_token(tmp_path: Path, token) -> None:
    proc, ready = _start(tmp_path, token)
    try:
        assert proc.wait(30) == 2
        err = proc.stderr.read().decode()
        assert "SECRET_TOKEN" in err and "--token-file" in err and "Traceback" not in err
        assert not ready.exists()
    finally:
        _kill(proc)


@pytest.mark.parametrize("source", ["env", "file", "stdin"])
@pytest.mark.parametrize("token,why", [("   ", "whitespace"), ("short-token", "at least 16"),
                                       ("a token with spaces", "visible ASCII")])
def test_refuses_a_short_or_blank_token_from_any_source(tmp_path: Path, source, token, why) -> None:
    if source == "env":
        proc, ready = _start(tmp_path, token)
    elif source == "file":
        path = tmp_path / "token"
        path.write_text(token + "\n")
        proc, ready = _start(tmp_path, token_file=str(path))
    else:
        proc, ready = _start(tmp_path, token_file="-", stdin_token=token)
    try:
        assert proc.wait(30) == 2
        err = proc.stderr.read().decode()
        assert why in err and "Traceback" not in err, err
        assert not ready.exists()
    finally:
        _kill(proc)


def _proc_files_holding(secret: bytes) -> list[str]:
    """Every /proc/<pid>/{environ,cmdline} this process can read that contains ``secret``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as f:
                    if secret in f.read():
                        found.append(f"/proc/{entry}/{name}")
            except OSError:
                pass
    return found


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_a_token_file_or_stdin_leaves_nothing_to_read(tmp_path: Path, source) -> None:
    token_path = tmp_path / "secret" / "token"
    token_path.parent.mkdir()
    if source == "file":
        token_path.write_text(TOKEN + "\n")
        proc, ready = _start(tmp_path, token_file=str(token_path))
    else:
        proc, ready = _start(tmp_path, token_file="-", stdin_token=TOKEN)
    try:
        info = _wait_ready(proc, ready)
        assert not token_path.exists()  # read, then deleted
        url = f"http://127.0.0.1:{info['port']}"
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60,
                          trust_env=False) as http:
            out = http.post("/v1/shell", json={"command": f"cat /proc/{proc.pid}/environ; "
                                                          "tr '\\0' '\\n' < /proc/self/environ"}).json()
            if os.geteuid() != 0:
                # Non-dumpable: the box's /proc files are closed to its own uid, which its
                # commands share. (Root reads them anyway; tests/security checks this as uid 1000.)
                assert "Permission denied" in out["stderr"], out
            assert TOKEN not in out["stdout"] and "SECRET_TOKEN" not in out["stdout"]
            cell = http.post("/v1/python", json={"code": "import os; sorted(os.environ)"}).json()
            assert cell["status"] == "ok" and TOKEN not in str(cell) and "SECRET_TOKEN" not in str(cell)
        assert _proc_files_holding(TOKEN.encode()) == []
    finally:
        _kill(proc)


def _kernel_and_fork_server(info: dict) -> tuple[int, int, list[int]]:
    """The box's kernel pid, its fork server's pid, and every descendant of the box."""
    import psutil

    url = f"http://127.0.0.1:{info['port']}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60, trust_env=False) as http:
        assert http.post("/v1/reset", json={"restart_kernel": True}).status_code == 200
        out = http.post("/v1/python", json={"code": "import os; os.getpid(), os.getppid()"}).json()
    kernel, server = (int(p) for p in out["result"]["text/plain"].strip("()").split(","))
    descendants = [p.pid for p in psutil.Process(info["pid"]).children(recursive=True)]
    assert server in descendants and kernel in descendants and server != info["pid"]
    return kernel, server, descendants


def _all_gone(pids: list[int], within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if process_alive(p)]


def test_no_process_of_the_box_outlives_its_sigterm(box) -> None:
    proc, info, _ = box
    _, _, descendants = _kernel_and_fork_server(info)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert _all_gone(descendants) == []


def test_a_killed_box_takes_its_fork_server_and_kernel_along(box) -> None:
    # No close() runs: the fork server sees its socket close, kills its kernels and exits.
    proc, info, _ = box
    kernel, server, _ = _kernel_and_fork_server(info)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(15)
    assert _all_gone([kernel, server]) == []


def _read_response(s) -> bytes:
    """One whole HTTP/1.1 response (head and Content-Length body) from socket ``s``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"the box closed the connection (got {data!r})"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "the box closed the connection mid-body"
        body += chunk
    return head


def test_an_idle_keep_alive_connection_outlives_a_client_pause(box) -> None:
    """The box keeps idle connections longer than clients do, so a client never sends on one the box closed."""
    import socket

    _, info, _ = box
    request = (f"GET /v1/healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", info["port"]), timeout=10) as s:
        s.sendall(request)
        assert _read_response(s).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # past uvicorn's default keep-alive of 5 s
        s.sendall(request)
        assert _read_response(s).startswith(b"HTTP/1.1 200")  # the same connection still answers


def test_the_box_process_is_not_dumpable() -> None:
    """make_non_dumpable() really clears the flag that guards /proc/<pid>/{environ,mem,fd} and ptrace."""
    code = (
        "import ctypes; from corral.box.__main__ import make_non_dumpable\n"
        "libc = ctypes.CDLL(None)\n"
        "before = libc.prctl(3, 0, 0, 0, 0)\n"  # PR_GET_DUMPABLE
        "assert make_non_dumpable()\n"
        "print(before, libc.prctl(3, 0, 0, 0, 0))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0"]


def test_a_token_file_that_cannot_be_deleted_stops_the_box(tmp_path: Path, monkeypatch) -> None:
    from corral.box import __main__ as box_main

    path = tmp_path / "token"
    path.write_text(TOKEN)

    def refuse(p):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(box_main.os, "unlink", refuse)
    with pytest.raises(box_main.TokenError, match="cannot delete the token file"):
        box_main.read_token(str(path), environ={})
    monkeypatch.undo()
    assert box_main.read_token(str(path), environ={"SECRET_TOKEN": "ignored-when-a-file-is-given"}) == TOKEN
    assert not path.exists()
    with pytest.raises(box_main.TokenError, match="cannot read the token file"):
        box_main.read_token(str(path), environ={})
