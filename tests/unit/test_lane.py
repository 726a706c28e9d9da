"""The registry's lane: real Unix sockets between two ends in one event loop, and the
client's fall back to Ray calls (the registry's handle faked: pure logic)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import struct
import subprocess
import sys

import pytest

from corral import lane as lane_mod
from corral.errors import CapacityError, InvalidRequest, NotFound, SandboxError
from corral.lane import LaneClient, LaneLost, LaneServer, lane_dir
from corral.manager import cluster as cluster_mod
from corral.manager._async._rt import RegistryLink


@pytest.fixture(autouse=True)
def _own_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(lane_mod.tempfile, "gettempdir", lambda: str(tmp_path))


async def _serve(ops: dict) -> LaneServer:
    server = LaneServer(ops, tag="test/ns")  # an unsafe character in the tag is replaced
    await server.start()
    return server


async def test_results_and_errors_cross_the_lane_as_the_registry_gave_them():
    async def acquire(t, reqs, timeout, wait):
        return [{"container_name": f"{t}-{i}", "meta": r} for i, r in enumerate(reqs)] + [
            CapacityError("no warm base sandbox"), None]

    async def release_many(ids):
        if ids == ["boom"]:
            raise RuntimeError("disk full")
        raise NotFound(f"no sandbox {ids[0]}")

    server = await _serve({"acquire": acquire, "release_many": release_many})
    client = await LaneClient.connect(server.path, server.token)
    try:
        out = await client.call("acquire", "base", [{"session_ctx_id": "s-1"}], None, False)
        assert out[:1] == [{"container_name": "base-0", "meta": {"session_ctx_id": "s-1"}}]
        assert isinstance(out[1], CapacityError) and str(out[1]) == "no warm base sandbox"
        assert out[2] is None
        with pytest.raises(NotFound, match="no sandbox x"):
            await client.call("release_many", ["x"])
        with pytest.raises(SandboxError, match="registry failed: RuntimeError\\('disk full'\\)"):
            await client.call("release_many", ["boom"])
        with pytest.raises(InvalidRequest, match="no operation 'status'"):
            await client.call("status")
        assert server.served == 4
        assert os.path.basename(server.path) == f"test_ns-{os.getpid()}.sock"
    finally:
        await client.aclose()
        server.close()
    assert not os.path.exists(server.path)


async def test_concurrent_calls_are_answered_by_id_whatever_the_order():
    async def slow(delay, value):
        await asyncio.sleep(delay)
        return value

    server = await _serve({"slow": slow})
    client = await LaneClient.connect(server.path, server.token)
    try:
        got = await asyncio.gather(*(client.call("slow", (5 - i) * 0.01, i) for i in range(5)))
        assert got == [0, 1, 2, 3, 4]
    finally:
        await client.aclose()
        server.close()


async def test_a_wrong_token_is_refused_and_nothing_runs(caplog):
    ran = []

    async def op():
        ran.append(1)

    server = await _serve({"op": op})
    try:
        with caplog.at_level(logging.WARNING, logger="corral.lane"):
            with pytest.raises(PermissionError, match="refused"):
                await LaneClient.connect(server.path, "not-the-token")
        assert "wrong token" in caplog.text
        assert ran == [] and server.served == 0
    finally:
        server.close()


async def test_requests_in_flight_fail_with_lanelost_when_the_server_goes():
    started = asyncio.Event()

    async def hang():
        started.set()
        await asyncio.sleep(30)

    server = await _serve({"hang": hang})
    client = await LaneClient.connect(server.path, server.token)
    call = asyncio.ensure_future(client.call("hang"))
    await started.wait()
    server.close()  # as when the registry's process dies: its connections end
    with pytest.raises(LaneLost):
        await asyncio.wait_for(call, 5)
    assert client.closed
    with pytest.raises(LaneLost):
        await client.call("hang")


async def test_a_frame_over_the_limit_drops_the_connection(monkeypatch):
    async def op():
        return 1

    server = await _serve({"op": op})
    try:
        reader, writer = await asyncio.open_unix_connection(server.path)
        writer.write(struct.pack("!I", lane_mod.MAX_FRAME + 1) + b"{}")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
        writer.close()
    finally:
        server.close()


async def test_the_socket_and_its_directory_are_private_and_dead_sockets_are_swept(tmp_path):
    directory = lane_dir()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = os.path.join(directory, f"other-{dead.pid}.sock")
    live = os.path.join(directory, f"other-{os.getppid()}.sock")
    for path in (stale, live):
        open(path, "w").close()
    server = await _serve({})
    try:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
        assert not os.path.exists(stale) and os.path.exists(live)
    finally:
        server.close()


async def test_a_directory_others_can_enter_is_refused(tmp_path):
    os.makedirs(tmp_path / f"corral-{os.getuid()}", mode=0o755)
    os.chmod(tmp_path / f"corral-{os.getuid()}", 0o755)
    with pytest.raises(PermissionError, match="mode 0700"):
        await LaneServer({}, tag="x").start()


# -- RegistryLink: the lane when there is one, Ray otherwise --------------------------------------


class _Method:
    def __init__(self, registry, name):
        self.registry, self.name = registry, name

    def remote(self, *args):
        self.registry.ray_calls.append((self.name, args))

        async def answer():
            return self.registry.answers[self.name](*args)
        return answer()


class _Registry:
    """Stands in for the registry's actor handle: ``x.method.remote(...)`` is awaitable."""

    def __init__(self, **answers):
        self.answers = answers
        self.ray_calls: list = []

    def __getattr__(self, name):
        if name in self.__dict__.get("answers", {}):
            return _Method(self, name)
        raise AttributeError(name)


def _cluster(registry, lane, monkeypatch):
    monkeypatch.setattr(cluster_mod, "this_node", lambda: "node-1")
    c = cluster_mod.Cluster(config=None, registry=registry, here="node-1")
    c.local_lane(lane)
    return c


async def test_the_link_uses_the_lane_on_the_registrys_node_and_ray_elsewhere(monkeypatch):
    async def acquire(*args):
        return ["lane", *args]

    server = await _serve({"acquire": acquire})
    registry = _Registry(acquire=lambda *a: ["ray", *a])
    try:
        here = {"path": server.path, "token": server.token, "node_id": "node-1"}
        link = RegistryLink(_cluster(registry, here, monkeypatch))
        assert await link.call("acquire", "base", []) == ["lane", "base", []]
        assert registry.ray_calls == []
        await link.aclose()

        elsewhere = dict(here, node_id="node-2")  # the registry runs on another node
        link = RegistryLink(_cluster(registry, elsewhere, monkeypatch))
        assert await link.call("acquire", "base", []) == ["ray", "base", []]
        assert registry.ray_calls == [("acquire", ("base", []))]
        await link.aclose()
    finally:
        server.close()


async def test_a_call_whose_lane_dies_goes_again_over_ray_and_the_next_asks_for_the_new_lane(monkeypatch):
    started = asyncio.Event()

    async def hang(*args):
        started.set()
        await asyncio.sleep(30)

    old = await _serve({"acquire": hang})
    new = None
    try:
        registry = _Registry(acquire=lambda *a: ["ray", *a], lane_address=lambda: address_of(new))
        cluster = _cluster(registry, address_of(old), monkeypatch)
        link = RegistryLink(cluster)
        call = asyncio.ensure_future(link.call("acquire", "base"))
        await started.wait()
        old.close()  # the registry died with the call in flight

        async def fresh(*args):
            return ["new lane", *args]

        new = await _serve({"acquire": fresh})
        assert await asyncio.wait_for(call, 5) == ["ray", "base"]  # sent again, over Ray
        assert cluster.lane_stale
        assert await link.call("acquire", "base") == ["new lane", "base"]
        assert [name for name, _ in registry.ray_calls] == ["acquire", "lane_address"]
        await link.aclose()
    finally:
        old.close()
        if new is not None:
            new.close()


def address_of(server):
    return {"path": server.path, "token": server.token, "node_id": "node-1"}


async def test_a_lane_that_cannot_be_opened_is_left_alone_for_a_while(monkeypatch, tmp_path):
    registry = _Registry(acquire=lambda *a: ["ray", *a],
                         lane_address=lambda: {"path": str(tmp_path / "gone.sock"), "token": "t", "node_id": "node-1"})
    cluster = _cluster(registry, {"path": str(tmp_path / "gone.sock"), "token": "t", "node_id": "node-1"}, monkeypatch)
    link = RegistryLink(cluster)
    assert await link.call("acquire", 1) == ["ray", 1]
    assert await link.call("acquire", 2) == ["ray", 2]
    # one failed connect, then Ray without retrying the lane until RETRY_AFTER has passed
    assert [name for name, _ in registry.ray_calls] == ["acquire", "acquire"]
    assert cluster.lane_stale
    await link.aclose()
