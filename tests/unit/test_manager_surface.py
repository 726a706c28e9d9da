"""The manager's public surface: the reference's operations, sync and async, with one signature each."""

from __future__ import annotations

import inspect

import pytest

from corral.manager import OPERATIONS, AsyncSandbox, Sandbox, SandboxManager
from corral.manager._async.ops import AsyncOps
from corral.manager._sync.ops import Ops

#: The reference's operations and their arguments (the names and keyword arguments its users call).
REFERENCE = {
    "create": ["sandbox_type", "mount_dir", "storage_path", "environment", "meta"],
    "create_from_pool": ["sandbox_type", "meta"],
    "release": ["identity"],
    "start": ["identity"],
    "stop": ["identity"],
    "get_status": ["identity"],
    "get_info": ["identity"],
    "check_health": ["identity"],
    "list_tools": ["identity", "tool_type"],
    "call_tool": ["identity", "tool_name", "arguments"],
    "add_mcp_servers": ["identity", "server_configs", "overwrite"],
    "get_session_mapping": ["session_ctx_id"],
    "list_session_keys": [],
    "reap_session": ["session_ctx_id", "reason"],
    "restore_session": ["session_ctx_id"],
    "cleanup": [],
}


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_every_reference_operation_exists_sync_and_async_with_its_arguments(name):
    sync, asyn = getattr(SandboxManager, name), getattr(SandboxManager, f"{name}_async")
    assert _params(sync)[: len(REFERENCE[name])] == REFERENCE[name]
    assert inspect.signature(sync) == inspect.signature(asyn)
    assert inspect.iscoroutinefunction(asyn) and not inspect.iscoroutinefunction(sync)


@pytest.mark.parametrize("pair", [(Ops, AsyncOps), (Sandbox, AsyncSandbox)])
def test_generated_sync_twins_match_their_async_source(pair):
    sync_cls, async_cls = pair
    public = lambda c: {n for n in dir(c) if not n.startswith("__") and callable(getattr(c, n))}  # noqa: E731
    renamed = {"aclose": "close", "__aenter__": "__enter__"}
    assert {renamed.get(n, n) for n in public(async_cls)} == public(sync_cls)
    for n in public(async_cls):
        a, s = getattr(async_cls, n), getattr(sync_cls, renamed.get(n, n))
        assert _params(a) == _params(s), n


def test_the_manager_defines_every_operation_with_the_cores_signature_and_docs():
    """SandboxManager's methods are real definitions (help(), editors and mypy see them), the same
    arguments and docstrings as the async core and its generated sync twin."""
    for name in OPERATIONS:
        sync, asyn = SandboxManager.__dict__.get(name) or getattr(SandboxManager, name), getattr(SandboxManager, f"{name}_async")
        assert not isinstance(inspect.getattr_static(SandboxManager, name), type(None))
        assert _params(sync) == _params(getattr(Ops, name)) == _params(getattr(AsyncOps, name)), name
        assert inspect.iscoroutinefunction(asyn) and not inspect.iscoroutinefunction(sync), name
        assert inspect.getdoc(sync) == inspect.getdoc(getattr(AsyncOps, name)), name
        assert sync.__qualname__ == f"ManagerOperations.{name}"  # defined in the generated mixin
    assert inspect.signature(SandboxManager.acquire).return_annotation == "Sandbox"
    assert inspect.signature(SandboxManager.acquire_async).return_annotation == "AsyncSandbox"


def test_remote_mode_without_a_token_is_refused():
    import corral

    with pytest.raises(corral.InvalidRequest, match="remote mode"):
        SandboxManager(base_url="http://127.0.0.1:1")


def test_session_ids_are_short_base36_and_unique():
    import re

    from corral.manager._async.ops import new_session_id

    ids = {new_session_id() for _ in range(20000)}
    assert len(ids) == 20000
    assert all(re.fullmatch(r"s-[0-9a-z]{16}", i) for i in ids)


def test_each_event_loop_gets_its_own_async_ops_and_closed_loops_are_forgotten():
    import asyncio
    import types

    from corral import SandboxManagerEnvConfig

    m = SandboxManager.__new__(SandboxManager)  # no cluster: only the per-loop bookkeeping runs
    m.cluster = types.SimpleNamespace(config=SandboxManagerEnvConfig())
    m._owned, m._aops = set(), {}

    async def ops_twice():
        a = m._async_ops()
        assert m._async_ops() is a  # one per loop
        await a.aclose()
        return a

    first = asyncio.run(ops_twice())
    second = asyncio.run(ops_twice())
    assert second is not first  # a new loop (even one given the old one's id) never gets the old clients
    assert [ops for _, ops in m._aops.values()] == [second]  # the closed loop's entry is gone


def test_remote_mode_has_every_operation_with_the_embedded_arguments():
    """``SandboxManager(base_url=...)`` is the same manager: its generated methods call the remote
    core, which must take what the embedded core takes."""
    from corral.remote._async.ops import AsyncRemoteOps
    from corral.remote._sync.ops import RemoteOps

    for name in OPERATIONS:
        for remote in (AsyncRemoteOps, RemoteOps):
            assert _params(getattr(remote, name)) == _params(getattr(AsyncOps, name)), (remote.__name__, name)
