"""Who may call the box: the token rule, 401 before activity, and rotation at reset.

In-process through httpx's ASGI transport, on the runtime conftest gives this module (``box_rt``:
one per module; the resets here wipe it). Each test builds its own app, so each starts with a
fresh gate and the module's token.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from _box_helpers import TOKEN, process_alive

import corral
from corral.box.app import create_app
from corral.box.auth import MIN_TOKEN_LENGTH, TokenGate, check_token, token_problem

pytestmark = pytest.mark.asyncio(loop_scope="module")

NEW = "the-next-sessions-token-9d2e"


def _client(app, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://box.test", headers=headers, timeout=60)


# --- the token rule ---


@pytest.mark.parametrize(
    "token,fragment",
    [("", "whitespace"), ("   ", "whitespace"), ("\t\n", "whitespace"), ("a" * (MIN_TOKEN_LENGTH - 1), "at least"),
     (" padded-token-of-enough-length ", "visible ASCII"), ("two words token long", "visible ASCII"),
     ("tøken-with-non-ascii-chars", "visible ASCII"), ("x" * 5000, "at most"), (None, "string")],
)
async def test_check_token_refuses_and_says_why(token, fragment) -> None:
    assert fragment in token_problem(token)
    with pytest.raises(corral.InvalidRequest, match=fragment):
        check_token(token)


async def test_check_token_takes_generated_tokens() -> None:
    import secrets

    for token in (secrets.token_hex(8), secrets.token_urlsafe(32), TOKEN, "a" * MIN_TOKEN_LENGTH):
        assert check_token(token) == token and token_problem(token) is None


# --- auth comes before activity ---


async def test_unauthenticated_requests_are_no_activity_and_reach_no_route(box_rt) -> None:
    app = create_app(box_rt, TOKEN)
    async with _client(app, TOKEN) as ok:
        before = (await ok.get("/v1/activity")).json()
    for token in (None, "wrong", TOKEN + "x", " " * 3):
        async with _client(app, token) as anon:
            for method, url in [("POST", "/v1/shell"), ("GET", "/v1/files/list"), ("POST", "/v1/reset"),
                                ("GET", "/no/such/route"), ("PUT", "/v1/files?path=x"), ("GET", "/v1/activity")]:
                r = await anon.request(method, url, json={"command": "touch /tmp/never"})
                # Every path, known or not: nobody learns the routes without the token.
                assert r.status_code == 401, (token, method, url, r.text)
                assert r.json()["error"]["code"] == "unauthorized"
    async with _client(app, TOKEN) as ok:
        after = (await ok.get("/v1/activity")).json()
    assert after["calls_total"] == before["calls_total"]
    assert after["last_active_at"] == before["last_active_at"] and after["running"] == 0


# --- rotation ---


async def test_reset_with_a_new_token_swaps_it_when_done(box_rt) -> None:
    app = create_app(box_rt, TOKEN)
    async with _client(app, TOKEN) as old, _client(app, NEW) as new:
        assert (await new.get("/v1/healthz")).status_code == 401  # not before the reset
        r = await old.post("/v1/reset", json={"restart_kernel": False, "token": NEW})
        assert r.status_code == 200 and r.json()["ok"] is True
        assert (await old.get("/v1/healthz")).status_code == 401
        assert (await old.post("/v1/shell", json={"command": "true"})).status_code == 401
        assert (await new.get("/v1/healthz")).status_code == 200
        assert (await new.post("/v1/shell", json={"command": "echo ok"})).json()["stdout"] == "ok\n"
        # A reset without a token keeps the current one.
        assert (await new.post("/v1/reset", json={"restart_kernel": False})).status_code == 200
        assert (await new.get("/v1/healthz")).status_code == 200


async def test_no_token_is_accepted_while_the_reset_runs(box_rt, monkeypatch) -> None:
    app = create_app(box_rt, TOKEN)
    entered, release = asyncio.Event(), asyncio.Event()
    real_reset = box_rt.reset

    async def slow_reset(restart_kernel: bool = True) -> dict:
        entered.set()
        await release.wait()
        return await real_reset(restart_kernel)

    monkeypatch.setattr(box_rt, "reset", slow_reset)
    async with _client(app, TOKEN) as old, _client(app, NEW) as new:
        resetting = asyncio.ensure_future(old.post("/v1/reset", json={"restart_kernel": False, "token": NEW}))
        await asyncio.wait_for(entered.wait(), 10)
        assert (await old.get("/v1/healthz")).status_code == 401
        assert (await new.get("/v1/healthz")).status_code == 401
        release.set()
        assert (await resetting).status_code == 200
        assert (await new.get("/v1/healthz")).status_code == 200
        assert (await old.get("/v1/healthz")).status_code == 401


async def test_a_reset_ends_the_previous_sessions_calls(box_rt, tmp_path: Path) -> None:
    app = create_app(box_rt, TOKEN)
    pidfile = tmp_path / "long.pid"
    async with _client(app, TOKEN) as old:
        long = asyncio.ensure_future(old.post("/v1/shell", json={"command": f"echo $$ > {pidfile}; exec sleep 60"}))
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "the long command did not start"
            await asyncio.sleep(0.02)
        pid = int(pidfile.read_text())
        started = time.monotonic()
        r = await old.post("/v1/reset", json={"restart_kernel": False, "token": NEW})
        assert r.status_code == 200
        ended = await asyncio.wait_for(long, 10)
        assert time.monotonic() - started < 8
        # Ended by the reset, with an answer rather than a dropped connection.
        assert ended.status_code == 409 and ended.json()["error"]["code"] == "conflict"
        assert not process_alive(pid)


async def test_a_bad_new_token_is_refused_and_changes_nothing(box_rt) -> None:
    app = create_app(box_rt, TOKEN)
    async with _client(app, TOKEN) as old:
        for bad in ("short", " " * 20, "has space in the middle"):
            r = await old.post("/v1/reset", json={"token": bad})
            assert r.status_code == 422 and "token" in r.json()["error"]["message"], r.text
        r = await old.post("/v1/reset", json={"token": NEW, "restart": True})  # a misspelt field
        assert r.status_code == 422
        assert (await old.get("/v1/healthz")).status_code == 200


async def test_a_failed_reset_keeps_the_token(box_rt, monkeypatch) -> None:
    app = create_app(box_rt, TOKEN)

    async def broken(restart_kernel: bool = True) -> dict:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(box_rt, "reset", broken)
    async with _client(app, TOKEN) as old, _client(app, NEW) as new:
        r = await old.post("/v1/reset", json={"token": NEW})
        assert r.status_code == 500
        assert (await old.get("/v1/healthz")).status_code == 200
        assert (await new.get("/v1/healthz")).status_code == 401


async def test_of_two_racing_resets_one_wins(box_rt) -> None:
    app = create_app(box_rt, TOKEN)
    a, b = "token-of-reset-a-0000000", "token-of-reset-b-1111111"
    async with _client(app, TOKEN) as old, _client(app, a) as ca, _client(app, b) as cb:
        ra, rb = await asyncio.gather(
            old.post("/v1/reset", json={"restart_kernel": False, "token": a}),
            old.post("/v1/reset", json={"restart_kernel": False, "token": b}),
        )
        assert sorted([ra.status_code, rb.status_code]) == [200, 401]
        winner, loser = (ca, cb) if ra.status_code == 200 else (cb, ca)
        assert (await winner.get("/v1/healthz")).status_code == 200
        assert (await loser.get("/v1/healthz")).status_code == 401
        assert (await old.get("/v1/healthz")).status_code == 401


async def test_gate_refuses_a_reset_admitted_under_an_older_token() -> None:
    gate = TokenGate(TOKEN)
    admitted = gate.generation
    ran = []

    async def work() -> str:
        ran.append(1)
        return "done"

    assert await gate.rotate(admitted, work, NEW) == "done"
    assert gate.admits(f"Bearer {NEW}".encode()) and not gate.admits(f"Bearer {TOKEN}".encode())
    with pytest.raises(corral.Unauthorized):
        await gate.rotate(admitted, work, "a-third-token-00000000")
    assert ran == [1] and gate.admits(f"Bearer {NEW}".encode())
    with pytest.raises(corral.InvalidRequest):
        await gate.rotate(gate.generation, work, "tiny")
