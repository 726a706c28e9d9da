"""MCP servers hosted by the box: a tiny stdio server (mcp SDK) added, listed and called over /v1 and /fastapi."""

from __future__ import annotations

import sys
import textwrap

import pytest
import pytest_asyncio

from _box_helpers import process_alive

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVER = textwrap.dedent(
    '''
    import os
    from mcp.server.mcpserver import MCPServer

    app = MCPServer("calc")

    @app.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @app.tool()
    def whoami() -> str:
        """The server's pid and its CALC_TAG."""
        return f"{os.getpid()} {os.environ.get('CALC_TAG', '')}"

    @app.tool()
    def fail() -> str:
        """Always raises."""
        raise ValueError("tool failed on purpose")

    app.run("stdio")
    '''
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def calc(api, tmp_path_factory) -> dict:
    script = tmp_path_factory.mktemp("mcp") / "calc_server.py"
    script.write_text(SERVER)
    config = {"calc": {"command": sys.executable, "args": [str(script)], "env": {"CALC_TAG": "tagged"}}}
    r = await api.post("/v1/mcp/servers", json={"mcpServers": config})
    assert r.status_code == 200, r.text
    assert r.json() == {"servers": ["calc"]}
    return {"config": config, "script": script}


async def test_v1_list_and_call(api, calc) -> None:
    tools = (await api.get("/v1/mcp/tools")).json()
    assert sorted(t["name"] for t in tools["calc"]) == ["add", "fail", "whoami"]
    add = next(t for t in tools["calc"] if t["name"] == "add")
    assert add["description"] == "Add two integers."
    assert add["input_schema"]["type"] == "object" and set(add["input_schema"]["properties"]) == {"a", "b"}

    r = await api.post("/v1/mcp/call", json={"tool": "add", "arguments": {"a": 2, "b": 40}})
    assert r.status_code == 200
    body = r.json()
    assert body["isError"] is False and body["content"][0] == {"type": "text", "text": "42"}
    assert body["structuredContent"] == {"result": 42}

    who = (await api.post("/v1/mcp/call", json={"tool": "whoami", "server": "calc"})).json()
    assert who["content"][0]["text"].endswith(" tagged")

    failed = (await api.post("/v1/mcp/call", json={"tool": "fail"})).json()
    assert failed["isError"] is True and "fail" in failed["content"][0]["text"]


async def test_reference_list_and_call(api, calc) -> None:
    tools = (await api.get("/fastapi/mcp/list_tools")).json()
    add = tools["calc"]["add"]
    assert add["name"] == "add"
    assert add["json_schema"]["type"] == "function"
    fn = add["json_schema"]["function"]
    assert fn["name"] == "add" and fn["description"] == "Add two integers." and fn["parameters"]["type"] == "object"
    r = await api.post("/fastapi/mcp/call_tool", json={"tool_name": "add", "arguments": {"a": 1, "b": 2}})
    assert r.status_code == 200
    body = r.json()
    assert body["content"] == [{"type": "text", "text": "3"}] and body["isError"] is False


async def test_errors(api, calc) -> None:
    r = await api.post("/v1/mcp/call", json={"tool": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await api.post("/v1/mcp/call", json={"tool": "add", "server": "other"})
    assert r.status_code == 404
    r = await api.post("/v1/mcp/servers", json={"mcpServers": {"bad": {"command": "/no/such/binary"}}})
    assert r.status_code == 422 and "bad" in r.json()["error"]["message"]
    r = await api.post("/v1/mcp/servers", json={"mcpServers": {"x": {"type": "carrier-pigeon", "url": "http://a"}}})
    assert r.status_code == 422 and "not supported" in r.json()["error"]["message"]
    r = await api.post("/v1/mcp/servers", json={"mcpServers": {"x": {"args": []}}})
    assert r.status_code == 422 and "command" in r.json()["error"]["message"]


async def test_existing_servers_are_kept_unless_overwrite(api, calc) -> None:
    pid = int((await api.post("/v1/mcp/call", json={"tool": "whoami"})).json()["content"][0]["text"].split()[0])
    r = await api.post("/fastapi/mcp/add_servers", json={"server_configs": {"mcpServers": calc["config"]}})
    assert r.status_code == 200 and r.json() == "OK"
    same = int((await api.post("/v1/mcp/call", json={"tool": "whoami"})).json()["content"][0]["text"].split()[0])
    assert same == pid
    r = await api.post("/v1/mcp/servers", json={"mcpServers": calc["config"], "overwrite": True})
    assert r.status_code == 200
    new = int((await api.post("/v1/mcp/call", json={"tool": "whoami"})).json()["content"][0]["text"].split()[0])
    assert new != pid and not process_alive(pid)


async def test_reset_stops_mcp_servers(api, calc) -> None:
    pid = int((await api.post("/v1/mcp/call", json={"tool": "whoami"})).json()["content"][0]["text"].split()[0])
    r = await api.post("/v1/reset", json={"restart_kernel": False})
    assert r.json()["killed"] >= 1
    assert not process_alive(pid)
    assert (await api.get("/v1/mcp/tools")).json() == {}
