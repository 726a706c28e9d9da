"""``python -m corral.box`` as a real process on 127.0.0.1: ready file, HTTP, SIGTERM, no-token refusal."""

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


def _start(tmp_path: Path, env_token: str | None) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / "run" / "ready.json"
    env = {k: v for k, v in os.environ.items() if k != "SECRET_TOKEN"}
    if env_token is not None:
        env["SECRET_TOKEN"] = env_token
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral.box", "--host", "127.0.0.1", "--port", "0",
         "--workspace", str(tmp_path / "ws"), "--ready-file", str(ready)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    return proc, ready


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
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "no ready file within 60s"
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        yield proc, info, tmp_path
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
        assert "SECRET_TOKEN" in err and "Traceback" not in err
        assert not ready.exists()
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
