"""The gateway app in-process (httpx's ASGI transport) in front of a real corral backend.

Covers what the app decides: the bearer check on every route but /health, the
reference's request and response shapes, tenants kept apart, errors mapped to
statuses, body limits and timeouts, the proxy to a box, and that no token
reaches a log. Needs the session's Ray cluster (process driver).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
from tests.support.waiting import wait_for

pytestmark = pytest.mark.ray


async def post(client: httpx.AsyncClient, token: str, op: str, **args) -> httpx.Response:
    return await client.post(f"/{op}", json=args, headers={"Authorization": f"Bearer {token}"})


async def data(client, token, op, **args):
    r = await post(client, token, op, **args)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"data"}
    return body["data"]




async def test_health_is_open_and_every_other_route_needs_a_valid_token(backend, make_app, tokens):
    app, c = make_app(backend)
    r = await c.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "healthy"
    name = await data(c, tokens.a, "create_from_pool")
    routes = [("POST", "/create_from_pool"), ("POST", "/get_info"), ("POST", "/release_async"),
              ("POST", "/status"), ("POST", "/no_such_op"), ("GET", "/no/such/route"), ("GET", "/create"),
              ("GET", f"/proxy/{name}/v1/healthz"), ("POST", f"/proxy/{name}/v1/shell"),
              ("PUT", f"/proxy/{name}/v1/files?path=x"), ("DELETE", f"/proxy/{name}/v1/files?path=x"),
              ("PATCH", f"/proxy/{name}/v1/files"), ("POST", "/health")]
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": tokens.a},
                    {"Authorization": f"Basic {tokens.a}"}, {"Authorization": f"Bearer {tokens.a}x"}):
        for method, path in routes:
            r = await c.request(method, path, json={"identity": name}, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
    # the sandbox is untouched, and a's second token is a's too
    info = await data(c, tokens.a2, "get_info", identity=name)
    assert info["state"] == "RUNNING"
    assert await data(c, tokens.a2, "release", identity=name) is True


async def test_the_reference_clients_requests_get_the_reference_answers(backend, make_app, tokens):
    """Exactly what the reference's sync and async clients post: POST /<op> (or /<op>_async) with
    the call's keyword arguments, answered {"data": value}."""
    app, c = make_app(backend)
    name = await data(c, tokens.a, "create_from_pool", meta={"session_ctx_id": "ep-1"})
    assert isinstance(name, str) and name.startswith("runtime_sandbox_container_")

    info = await data(c, tokens.a, "get_info", identity=name)
    assert info["container_name"] == name and info["state"] == "RUNNING"
    assert info["session_ctx_id"] == "ep-1" and info["meta"] == {"session_ctx_id": "ep-1"}
    assert "runtime_token" not in info  # the box's token never leaves the gateway

    out = await data(c, tokens.a, "call_tool", identity=name, tool_name="run_shell_command",
                     arguments={"command": "echo hi; exit 3"})
    assert out["isError"] is True
    assert [x["description"] for x in out["content"]] == ["stdout", "stderr", "returncode"]
    assert out["content"][0]["text"] == "hi\n" and out["content"][2]["text"] == "3"
    out = await data(c, tokens.a, "call_tool_async", identity=name, tool_name="run_ipython_cell",
                     arguments={"code": "6 * 7"})
    assert out["isError"] is False and "42" in out["content"][0]["text"]

    tools = await data(c, tokens.a, "list_tools", identity=name)
    assert set(tools["generic"]) == {"run_ipython_cell", "run_shell_command"}
    assert await data(c, tokens.a, "check_health_async", identity=name) is True
    assert await data(c, tokens.a, "get_status", identity=name) == "running"
    assert await data(c, tokens.a, "get_session_mapping", session_ctx_id="ep-1") == [name]
    assert "ep-1" in await data(c, tokens.a, "list_session_keys_async")
    assert await data(c, tokens.a, "heartbeat", session_ctx_id="ep-1") is True
    assert await data(c, tokens.a, "release_async", identity=name) is True
    assert await data(c, tokens.a, "release", identity=name) is True  # idempotent for its owner

    made = await data(c, tokens.a, "create", environment={"GREETING": "hello"})
    out = await data(c, tokens.a, "call_tool", identity=made, tool_name="run_shell_command",
                     arguments={"command": "echo $GREETING"})
    assert out["content"][0]["text"] == "hello\n"
    assert await data(c, tokens.a, "cleanup") == [made]


async def test_tenants_see_and_touch_only_their_own_sandboxes(backend, make_app, tokens):
    app, c = make_app(backend)
    sb = await data(c, tokens.a, "acquire", session_ctx_id="ep")
    name = sb["container_name"]
    assert sb["session_ctx_id"] == "ep" and "runtime_token" not in sb
    other = await data(c, tokens.b, "acquire", session_ctx_id="ep")  # the same id: b's own session
    assert other["container_name"] != name

    for op, args in [("get_info", {"identity": name}), ("release", {"identity": name}),
                     ("get_status", {"identity": name}), ("stop", {"identity": name}),
                     ("start", {"identity": name}), ("check_health", {"identity": name}),
                     ("list_tools", {"identity": name}),
                     ("call_tool", {"identity": name, "tool_name": "run_shell_command", "arguments": {"command": "id"}}),
                     ("add_mcp_servers", {"identity": name, "server_configs": {"mcpServers": {}}}),
                     ("get_info", {"identity": sb["session_id"]}),  # by its short id too
                     ("reap_session", {"session_ctx_id": "nobody"}), ("restore_session", {"session_ctx_id": "x"})]:
        r = await post(c, tokens.b, op, **args)
        assert r.status_code == 404, (op, r.text)
        assert r.json()["error"]["code"] == "not_found"
        if "identity" in args:  # the same answer as for an id that does not exist
            assert r.json()["error"]["message"] == f"no sandbox with id {args['identity']!r}"
    for method in ("GET", "POST", "PUT", "DELETE"):
        r = await c.request(method, f"/proxy/{name}/v1/healthz", headers=tokens.auth(tokens.b))
        assert r.status_code == 404
    # b's view of sessions and status has none of a's
    assert await data(c, tokens.b, "get_session_mapping", session_ctx_id="ep") == [other["container_name"]]
    assert await data(c, tokens.b, "list_session_keys") == ["ep"]
    st = await data(c, tokens.b, "status")
    assert st["tenant"] == "beta" and [r["container_name"] for r in st["records"]] == [other["container_name"]]
    assert list(st["sessions"]) == ["ep"] and all("runtime_token" not in r for r in st["records"])
    # b's reap and cleanup end b's sandboxes only
    assert await data(c, tokens.b, "reap_session", session_ctx_id="ep") is True
    assert await data(c, tokens.b, "cleanup") == [other["container_name"]]
    info = await data(c, tokens.a, "get_info", identity=name)
    assert info["state"] == "RUNNING"
    r = await c.post(f"/proxy/{name}/v1/shell", json={"command": "echo still-mine"}, headers=tokens.auth(tokens.a))
    assert r.status_code == 200 and r.json()["stdout"] == "still-mine\n"
    # nobody forges the tag through meta
    for op, args in [("create_from_pool", {"meta": {"corral.tenant": "alpha"}}),
                     ("acquire", {"meta": {"corral.tenant": "alpha"}}), ("create", {"meta": {"corral.tenant": "x"}})]:
        r = await post(c, tokens.b, op, **args)
        assert r.status_code == 422 and "reserved" in r.json()["error"]["message"]


async def test_a_reused_sandbox_is_out_of_reach_of_its_previous_tenant(backend, make_app, tokens):
    app, c = make_app(backend)
    name = (await data(c, tokens.a, "acquire"))["container_name"]
    assert await data(c, tokens.a, "release", identity=name) is True
    wait_for(lambda: backend.get_info(name)["state"] == "WARM", what="the reset sandbox to be warm again")
    got = [(await data(c, tokens.b, "acquire"))["container_name"] for _ in range(2)]
    assert name in got  # b holds a's old sandbox now
    for op in ("get_info", "release", "check_health"):
        assert (await post(c, tokens.a, op, identity=name)).status_code == 404
    r = await c.post(f"/proxy/{name}/v1/shell", json={"command": "id"}, headers=tokens.auth(tokens.a))
    assert r.status_code == 404
    assert (await data(c, tokens.b, "get_info", identity=name))["state"] == "RUNNING"


async def test_errors_are_statuses_with_codes_never_strings_in_place_of_values(backend, make_app, tokens):
    app, c = make_app(backend)
    cases = [
        (await c.post("/no_such_op", json={}, headers=tokens.auth(tokens.a)), 404, "not_found"),
        (await c.post("/get_info", content=b"{nope", headers=tokens.auth(tokens.a)), 400, "invalid_request"),
        (await c.post("/get_info", json=["x"], headers=tokens.auth(tokens.a)), 400, "invalid_request"),
        (await post(c, tokens.a, "get_info", identity="x", extra=1), 422, "invalid_request"),
        (await post(c, tokens.a, "get_info"), 422, "invalid_request"),
        (await post(c, tokens.a, "get_info", identity=""), 422, "invalid_request"),
        (await post(c, tokens.a, "get_info", identity="no-such-sandbox"), 404, "not_found"),
        (await post(c, tokens.a, "create_from_pool", sandbox_type="no-such-type"), 422, "unknown_sandbox_type"),
        (await post(c, tokens.a, "create", environment={"X": None}), 422, "invalid_request"),
        (await post(c, tokens.a, "create", mount_dir="/etc"), 403, "forbidden"),
        (await post(c, tokens.a, "create", storage_path="/tmp/someone-else"), 403, "forbidden"),
        (await post(c, tokens.a, "reserve", n=-1), 422, "invalid_request"),
        (await c.get("/get_info", headers=tokens.auth(tokens.a)), 405, "invalid_request"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and err["retryable"] is False
    # a failed sandbox: 503, retryable, Retry-After; the remote client rebuilds the class
    import corral

    name = await data(c, tokens.a, "create_from_pool")
    assert await data(c, tokens.a, "stop", identity=name) is True
    for r in (await post(c, tokens.a, "call_tool", identity=name, tool_name="run_shell_command",
                         arguments={"command": "id"}),
              await c.post(f"/proxy/{name}/v1/shell", json={"command": "id"}, headers=tokens.auth(tokens.a))):
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert r.json()["error"]["retryable"] is True
        assert isinstance(corral.from_wire(r.json(), r.status_code), corral.SandboxUnreachable)
    assert await data(c, tokens.a, "release", identity=name) is True


async def test_capacity_is_429_with_retry_after(make_manager, make_app, tokens):
    m = make_manager(pool_size=1, max_sandbox_instances=1)
    m.reserve(n=0, wait=True, timeout=120)
    app, c = make_app(m)
    held = await data(c, tokens.a, "acquire")
    r = await post(c, tokens.b, "acquire", timeout=0.5)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == {"code": "capacity", "message": r.json()["error"]["message"], "retryable": True}
    assert await data(c, tokens.a, "release", identity=held["container_name"]) is True


async def test_bodies_have_size_limits_and_stalled_bodies_time_out(backend, make_app, tokens):
    app, c = make_app(backend, max_body_bytes=1024, max_upload_bytes=64 << 10, body_timeout=0.5)
    name = await data(c, tokens.a, "create_from_pool")
    auth = tokens.auth(tokens.a)
    big_meta = {"meta": {"x": "y" * 2000}}
    r = await c.post("/create_from_pool", json=big_meta, headers=auth)  # Content-Length says it
    assert r.status_code == 413 and r.json()["error"]["code"] == "invalid_request"

    async def chunks(n: int, size: int, pause: float = 0.0):
        for _ in range(n):
            if pause:
                await asyncio.sleep(pause)
            yield b"y" * size

    async def json_chunks():  # no Content-Length: found while reading
        yield b'{"meta": {"x": "'
        async for part in chunks(4, 512):
            yield part
        yield b'"}}'

    r = await c.post("/create_from_pool", content=json_chunks(), headers=auth)
    assert r.status_code == 413
    url = f"/proxy/{name}/v1/files?path=big.bin"
    r = await c.put(url, content=b"z" * (65 << 10), headers=auth)
    assert r.status_code == 413
    r = await c.put(url, content=chunks(80, 1024), headers=auth)  # chunked, over the limit while streaming
    assert r.status_code == 413, r.text
    r = await c.put(url, content=chunks(3, 100, pause=1.0), headers=auth)  # stalls longer than body_timeout
    assert r.status_code == 408, r.text
    r = await c.get(f"/proxy/{name}/v1/files/exists?path=big.bin", headers=auth)
    assert r.json() == {"exists": False}  # nothing half-written was kept
    r = await c.put(url, content=b"z" * (60 << 10), headers=auth)  # under the limit: fine
    assert r.status_code == 200 and r.json()["size"] == 60 << 10
    assert await data(c, tokens.a, "release", identity=name) is True


async def test_a_request_has_a_deadline(backend, make_app, tokens):
    app, c = make_app(backend, request_timeout=1.0)
    name = await data(c, tokens.a, "create_from_pool")
    t0 = time.monotonic()
    r = await c.post(f"/proxy/{name}/v1/shell", json={"command": "sleep 5"}, headers=tokens.auth(tokens.a))
    assert r.status_code == 503 and r.json()["error"]["code"] == "sandbox_unreachable"
    assert "request timeout" in r.json()["error"]["message"] and time.monotonic() - t0 < 4
    assert await data(c, tokens.a, "release", identity=name) is True


async def test_the_proxy_reaches_the_box_with_its_own_token_swapped_in(backend, make_app, tokens):
    app, raw = make_app(backend)
    auth = tokens.auth(tokens.a)
    name = await data(raw, tokens.a, "create_from_pool")
    box_token = backend.get_info(name)["runtime_token"]
    base = f"/proxy/{name}"
    seen = []

    class Recording:  # every answer is checked for the box's token at the end
        async def request(self, *a, **kw):
            r = await raw.request(*a, **kw)
            seen.append(r)
            return r

        async def get(self, url, **kw):
            return await self.request("GET", url, **kw)

        async def post(self, url, **kw):
            return await self.request("POST", url, **kw)

        async def put(self, url, **kw):
            return await self.request("PUT", url, **kw)

        async def delete(self, url, **kw):
            return await self.request("DELETE", url, **kw)

    c = Recording()

    r = await c.post(f"{base}/v1/shell", json={"command": "echo $((6*7)); echo err >&2"}, headers=auth)
    assert r.status_code == 200 and r.json()["stdout"] == "42\n" and r.json()["stderr"] == "err\n"
    r = await c.post(f"{base}/v1/python", json={"code": "import os\nos.getpid() > 0"}, headers=auth)
    assert r.json()["status"] == "ok" and r.json()["result"]["text/plain"] == "True"
    r = await c.post(f"{base}/fastapi/tools/run_shell_command", json={"command": "echo ref"}, headers=auth)
    assert r.json()["content"][0]["text"] == "ref\n"
    blob = bytes(range(256)) * 8192  # 2 MiB: streamed both ways
    r = await c.put(f"{base}/v1/files?path=dir/blob.bin", content=blob, headers=auth)
    assert r.status_code == 200 and r.json()["size"] == len(blob)
    r = await c.get(f"{base}/v1/files?path=dir/blob.bin&format=bytes", headers=auth)
    assert r.status_code == 200 and r.content == blob
    r = await c.get(f"{base}/v1/files/list?path=dir", headers=auth)
    assert [e["name"] for e in r.json()] == ["blob.bin"]
    r = await c.post(f"{base}/v1/shell/stream", json={"command": "for i in 1 2 3; do echo $i; done"}, headers=auth)
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    assert "".join(x.get("data", "") for x in lines) == "1\n2\n3\n" and lines[-1]["exit_code"] == 0
    r = await c.delete(f"{base}/v1/files?path=dir&recursive=true", headers=auth)
    assert r.status_code == 204
    r = await c.get(f"{base}/v1/files?path=../../etc/passwd", headers=auth)
    assert r.status_code == 403  # the box's own answer, passed through
    r = await c.get(f"{base}/elsewhere", headers=auth)
    assert r.status_code == 404

    # a reaped sandbox answers 410 (the remote handle then restores its session)
    sid = (await data(raw, tokens.a, "acquire", session_ctx_id="reap-me"))["container_name"]
    assert await data(raw, tokens.a, "reap_session", session_ctx_id="reap-me") is True
    r = await c.get(f"/proxy/{sid}/v1/healthz", headers=auth)
    assert r.status_code == 410 and r.json()["error"]["code"] == "sandbox_gone"
    names = await data(raw, tokens.a, "restore_session", session_ctx_id="reap-me")
    assert len(names) == 1 and names[0] != sid
    r = await c.get(f"/proxy/{sid}/v1/healthz", headers=auth)  # the old name follows to the new box
    assert r.status_code == 200
    await data(raw, tokens.a, "cleanup")
    assert len(seen) > 10
    for resp in seen:
        assert box_token not in resp.text and all(box_token not in v for v in resp.headers.values())


async def test_no_token_reaches_a_log(backend, make_app, tokens, caplog):
    caplog.set_level(logging.DEBUG)
    app, c = make_app(backend)
    name = await data(c, tokens.a, "create_from_pool")
    box_token = backend.get_info(name)["runtime_token"]
    for token in (tokens.a, tokens.b, "wrong-" + tokens.a, tokens.a[:-1]):
        await post(c, token, "get_info", identity=name)
        await c.post(f"/proxy/{name}/v1/shell?token={token[:4]}", json={"command": "true"}, headers=tokens.auth(token))
    await c.post("/get_info", content=b"{broken", headers=tokens.auth(tokens.a))
    await data(c, tokens.a, "release", identity=name)
    text = caplog.text
    assert "alpha POST /get_info 200" in text and "- POST /get_info 401" in text  # the access log
    for secret in (tokens.a, tokens.b, tokens.a2, box_token, tokens.a[:10], tokens.b[:10], box_token[:10]):
        assert secret not in text
    served = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("corral", "uvicorn")))
    assert "/v1/shell 200" in served and "?token" not in served  # the gateway logs no query string


async def test_the_proxy_remembers_a_route_and_looks_again_when_the_box_refuses_it(backend, make_app, tokens):
    app, c = make_app(backend)
    auth = tokens.auth(tokens.a)
    name = (await data(c, tokens.a, "acquire", session_ctx_id="routes"))["container_name"]
    lookups = []
    b = app.state.backend
    op = b.op
    b.op = lambda n: (lookups.append(n) if n == "get_info" else None) or op(n)
    for i in range(3):
        r = await c.post(f"/proxy/{name}/v1/shell", json={"command": f"echo {i}"}, headers=auth)
        assert r.status_code == 200 and r.json()["stdout"] == f"{i}\n"
    assert lookups == ["get_info"]  # one lookup, then the remembered route

    # released behind this gateway's back (another gateway, a reaper): the reset gives the box a new
    # token, the box refuses the remembered one, and the gateway looks again: no longer tenant a's
    await asyncio.to_thread(backend.release, name)
    await asyncio.to_thread(wait_for, lambda: backend.get_info(name)["state"] == "WARM", 60, 0.1, "the reset")
    r = await c.post(f"/proxy/{name}/v1/shell", json={"command": "echo stale"}, headers=auth)
    assert r.status_code == 404, r.text
    assert lookups == ["get_info", "get_info"]


async def test_an_operation_that_moves_sandboxes_forgets_the_tenants_routes(backend, make_app, tokens):
    app, c = make_app(backend, proxy_route_ttl=60)
    auth = tokens.auth(tokens.a)
    name = (await data(c, tokens.a, "acquire", session_ctx_id="moved"))["container_name"]
    assert (await c.get(f"/proxy/{name}/v1/healthz", headers=auth)).status_code == 200
    assert app.state.routes.get("alpha", name) is not None
    await data(c, tokens.a, "release", identity=name)
    assert app.state.routes.get("alpha", name) is None
    r = await c.get(f"/proxy/{name}/v1/healthz", headers=auth)
    assert r.status_code in (404, 410), r.text
