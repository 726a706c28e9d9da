"""The driver contract: every driver (process, docker) passes the same tests.

Box calls go straight through httpx to the handle's url, so these tests
depend on the driver and the box only.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

import corral
from corral.drivers.base import ContainerSpec
from corral.models import LABEL_MANAGED

TOKEN = "contract-token-1234"


def _auth(token: str = TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _spec(name: str, image: str, **kw) -> ContainerSpec:
    return ContainerSpec(name=name, image=image, token=TOKEN, **kw)


async def _shell(http: httpx.AsyncClient, url: str, command: str) -> dict:
    r = await http.post(f"{url}/v1/shell", json={"command": command}, headers=_auth())
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
        yield c


def _name(prefix: str) -> str:
    from tests.support.docker import unique_name

    return unique_name(prefix)


async def test_create_answers_with_token_sees_workspace_and_env(driver, sandboxes, http, image, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "x").write_text("hello from the host")
    labels = {"corral.sandbox_type": "contract", "corral.test": _name("label")}
    name = _name("c1")
    h = await sandboxes.create(
        _spec(name, image, workspace=str(workspace), labels=labels, environment={"CORRAL_CONTRACT": "env-ok"})
    )

    assert h.url and h.url.startswith("http://127.0.0.1:"), h.url
    assert h.name == name
    assert h.status == "running"

    ok = await http.get(f"{h.url}/v1/healthz", headers=_auth())
    assert ok.status_code == 200 and ok.json()["ok"] is True
    assert (await http.get(f"{h.url}/v1/healthz")).status_code == 401
    assert (await http.get(f"{h.url}/v1/healthz", headers=_auth("wrong"))).status_code == 401

    out = await _shell(http, h.url, "cat x")
    assert out["exit_code"] == 0 and out["stdout"] == "hello from the host"
    out = await _shell(http, h.url, "echo $CORRAL_CONTRACT")
    assert out["stdout"].strip() == "env-ok"
    # The box writes into the mounted workspace and the host sees it.
    out = await _shell(http, h.url, "echo written > from_box.txt")
    assert out["exit_code"] == 0, out
    assert (workspace / "from_box.txt").read_text().strip() == "written"

    listed = await driver.list(labels)
    assert [x.container_id for x in listed] == [h.container_id]
    assert listed[0].labels[LABEL_MANAGED] == "true"
    assert all(listed[0].labels[k] == v for k, v in labels.items())
    assert listed[0].url == h.url
    assert await driver.list({"corral.test": "no-such-value"}) == []

    seen = await driver.inspect(h.container_id)
    assert seen is not None and seen.container_id == h.container_id and seen.url == h.url

    with pytest.raises(corral.Conflict):
        await driver.create(_spec(name, image))
    # The failed duplicate did not hurt the original.
    assert (await http.get(f"{h.url}/v1/healthz", headers=_auth())).status_code == 200


async def test_stop_status_start_remove(driver, sandboxes, http, image):
    h = await sandboxes.create(_spec(_name("c2"), image))
    assert await driver.status(h.container_id) == "running"

    await driver.stop(h.container_id)
    assert await driver.status(h.container_id) == "exited"
    await driver.stop(h.container_id)  # idempotent

    await driver.start(h.container_id, TOKEN)
    assert await driver.status(h.container_id) == "running"
    await driver.start(h.container_id, TOKEN)  # no-op when running
    again = await driver.inspect(h.container_id)
    assert again is not None and again.url
    # start() returns once the box answers again (its port may have changed).
    assert (await http.get(f"{again.url}/v1/healthz", headers=_auth())).status_code == 200

    await driver.remove(h.container_id)
    assert await driver.status(h.container_id) == "missing"
    assert await driver.inspect(h.container_id) is None
    await driver.remove(h.container_id)  # idempotent


async def test_unknown_container(driver):
    unknown = _name("never-made")
    assert await driver.inspect(unknown) is None
    assert await driver.status(unknown) == "missing"
    await driver.remove(unknown)
    await driver.stop(unknown)


async def test_failed_create_leaves_nothing(driver, sandboxes, image):
    marker = {"corral.test": _name("fail")}
    # No box starts in 10 ms: the create must fail and clean up after itself.
    with pytest.raises(corral.DriverError):
        await sandboxes.create(_spec(_name("c3"), image, labels=marker, ready_timeout=0.01))
    assert await driver.list(marker) == []


@pytest.mark.parametrize("when", ["while-creating", "while-booting"])
async def test_cancelled_create_leaves_nothing(driver, sandboxes, image, when):
    marker = {"corral.test": _name("cancel")}
    task = asyncio.ensure_future(sandboxes.create(_spec(_name("c4"), image, labels=marker)))
    if when == "while-creating":
        await asyncio.sleep(0.05)
    else:  # as soon as the driver lists the sandbox: it exists, and its box has only begun to boot
        deadline = asyncio.get_running_loop().time() + 60
        while not await driver.list(marker) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        assert not task.done(), "the create ended before the sandbox was seen booting"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await driver.list(marker) == []


async def test_the_token_reaches_the_box_only(driver, sandboxes, http, image):
    """No driver puts the token where the code the box runs can read it: not its environment, not a file."""
    h = await sandboxes.create(_spec(_name("tok"), image))
    out = await _shell(http, h.url, "env; cat /proc/self/cmdline; ls -A ${TMPDIR:-/tmp} .")
    assert TOKEN not in out["stdout"] and "SECRET_TOKEN" not in out["stdout"]


async def test_a_reset_rotates_the_token_and_a_restart_takes_the_rotated_one(driver, sandboxes, http, image):
    from corral.client import AsyncBoxClient

    h = await sandboxes.create(_spec(_name("rot"), image))
    rotated = "contract-rotated-token-42"
    async with AsyncBoxClient(h.url, TOKEN) as box:
        assert (await box.reset(restart_kernel=False, token=rotated)).ok
        assert (await box.shell("echo mine")).stdout == "mine\n"  # the client switched
    assert (await http.get(f"{h.url}/v1/healthz", headers=_auth())).status_code == 401
    assert (await http.get(f"{h.url}/v1/healthz", headers=_auth(rotated))).status_code == 200
    await driver.stop(h.container_id)
    await driver.start(h.container_id, rotated)
    again = await driver.inspect(h.container_id)
    assert (await http.get(f"{again.url}/v1/healthz", headers=_auth(rotated))).status_code == 200
    assert (await http.get(f"{again.url}/v1/healthz", headers=_auth())).status_code == 401


async def test_boxes_started_at_once_on_a_busy_loop_all_get_their_token(driver, sandboxes, http, image):
    """Each token is in its box's hands however the driver's event loop is scheduled: six starts at
    once while the loop is kept busy between them all answer their own token."""
    stop = asyncio.Event()

    async def busy() -> None:  # turns of the loop that hold it a few ms each, as a loaded actor's would
        while not stop.is_set():
            sum(range(50_000))
            await asyncio.sleep(0)

    hog = asyncio.ensure_future(busy())
    try:
        handles = await asyncio.gather(*(sandboxes.create(_spec(_name(f"busy{i}"), image)) for i in range(6)))
    finally:
        stop.set()
        await hog
    for h in handles:
        assert (await _shell(http, h.url, "echo mine"))["stdout"] == "mine\n"
