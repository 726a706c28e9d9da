"""The attack lab: a corral network of the tests' own, a stand-in for the outside world, and listeners.

Everything here is made by these tests and removed at the end, also when a
test fails:

- the Docker network ``corral-sec`` (10.214.1.0/24) and its iptables rules,
  made by a :class:`~corral.drivers.docker.DockerDriver` whose blocked ranges
  are the defaults with ``10.0.0.0/8`` replaced by ``10.215.1.0/24``, so the
  stand-in below has a reachable and a blocked part;
- a network namespace ``corral-sec-ext`` joined to the host by a veth pair
  (host side ``10.215.0.1``, ``10.215.1.1``; namespace side ``10.215.0.2``,
  ``10.215.0.3`` and ``10.215.1.2``) with a TCP listener on every one of its
  addresses: ``10.215.0.x`` plays the internet, ``10.215.1.2`` a cluster node
  (blocked);
- TCP listeners on the host, on the network's gateway address, started by the
  tests that need them.

Needs root (iptables, network namespaces), the engine and the image; it runs
only under ``-m docker``, serialised like every Docker test.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Optional

import pytest
import pytest_asyncio


from tests.support import docker as testkit

from _lab import HOST_SIDE, LISTENER, NETNS, NETWORK, NS_SIDE, SUBNET, VETH_HOST, VETH_NS, Lab  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_containers():
    yield from testkit.leak_check()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _remove_namespace() -> None:
    _ip("netns", "del", NETNS, check=False)
    _ip("link", "del", VETH_HOST, check=False)


def _config():
    from corral.drivers.netpolicy import DEFAULT_BLOCKED

    blocked = [c for c in DEFAULT_BLOCKED if c != "10.0.0.0/8"] + ["10.215.1.0/24"]
    return testkit.driver_config(network_name=NETWORK, subnet=SUBNET, blocked_cidrs=blocked, dns_servers=[])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab():
    testkit.require_docker()
    if os.geteuid() != 0:
        pytest.skip("the attack tests need root: they set up iptables rules and a network namespace")
    from corral.drivers.docker import DockerDriver
    from corral.drivers.netpolicy import NodeLock

    config = _config()
    driver = DockerDriver(config)
    listener: Optional[subprocess.Popen] = None
    the_lab: Optional[Lab] = None
    _remove_namespace()  # a leftover of an interrupted run
    try:
        _ip("netns", "add", NETNS)
        _ip("link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
        _ip("link", "set", VETH_NS, "netns", NETNS)
        for addr in HOST_SIDE:
            _ip("addr", "add", addr, "dev", VETH_HOST)
        _ip("link", "set", VETH_HOST, "up")
        for addr in NS_SIDE:
            _ip("-n", NETNS, "addr", "add", addr, "dev", VETH_NS)
        _ip("-n", NETNS, "link", "set", VETH_NS, "up")
        _ip("-n", NETNS, "link", "set", "lo", "up")
        _ip("-n", NETNS, "route", "add", "default", "via", HOST_SIDE[0].split("/")[0])
        listener = subprocess.Popen(["ip", "netns", "exec", NETNS, sys.executable, "-c", LISTENER],
                                    stdout=subprocess.PIPE, text=True)
        port = int(listener.stdout.readline())
        await driver.ensure_network()
        the_lab = Lab(driver, testkit.IMAGE, port)
        yield the_lab
    finally:
        try:
            if the_lab is not None:
                await the_lab.cleanup()
            await driver.teardown_network()
            await driver.close()
        finally:
            if listener is not None:
                listener.kill()
                listener.wait(10)
            _remove_namespace()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(NodeLock(NETWORK).path)
