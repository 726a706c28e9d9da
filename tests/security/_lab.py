"""The attack lab's parts: its addresses, the probe run inside sandboxes, host listeners, :class:`Lab`.

See conftest.py for what the lab is and how it is set up and removed.
"""

from __future__ import annotations

import json
import shlex
import socket
import threading
from typing import Optional

from tests.support import docker as testkit

NETWORK = "corral-sec"
SUBNET = "10.214.1.0/24"
GATEWAY = "10.214.1.1"
NETNS = "corral-sec-ext"
VETH_HOST, VETH_NS = "csec-h", "csec-n"
HOST_SIDE = ("10.215.0.1/24", "10.215.1.1/24")
OUTSIDE = "10.215.0.2"  # the internet stand-in
OUTSIDE_OTHER = "10.215.0.3"  # also outside, not on an allow list
CLUSTER_NODE = "10.215.1.2"  # in a blocked range
NS_SIDE = (f"{OUTSIDE}/24", f"{OUTSIDE_OTHER}/24", f"{CLUSTER_NODE}/24")

#: Run inside a sandbox: open a TCP connection to each (host, port), two seconds each, all at
#: once. "open" when the handshake completed; a dropped packet shows as TimeoutError.
PROBE = r"""
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
targets = json.loads(sys.argv[1])
def probe(t):
    try:
        socket.create_connection((t[0], t[1]), timeout=2).close()
        return "open"
    except Exception as e:
        return type(e).__name__
with ThreadPoolExecutor(len(targets)) as ex:
    print(json.dumps({f"{h}:{p}": r for (h, p), r in zip(targets, ex.map(probe, targets))}))
"""

LISTENER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 0)); s.listen(64)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"pong")
    finally:
        c.close()
"""


class HostListener:
    """A TCP listener in this process on ``(address, port 0)``: answers "pong", counts connections."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 0))
        self.sock.listen(16)
        self.address, self.port = self.sock.getsockname()
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with c:
                c.sendall(b"pong")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(5)


class Lab:
    """The driver on the lab's network, the outside stand-in, and helpers to attack from a sandbox."""

    def __init__(self, driver, image: str, outside_port: int) -> None:
        self.driver = driver
        self.image = image
        self.outside_port = outside_port
        self.made: list[str] = []
        self.listeners: list[HostListener] = []

    async def create(self, token: str, **kw):
        from corral.drivers.base import ContainerSpec

        name = testkit.unique_name("sec")
        self.made.append(name)
        handle = await self.driver.create(ContainerSpec(name=name, image=self.image, token=token, **kw))
        self.made.append(handle.container_id)
        return handle

    def listen_on_host(self, address: str) -> HostListener:
        listener = HostListener(address)
        self.listeners.append(listener)
        return listener

    @staticmethod
    async def shell(url: str, token: str, command: str, stdin: Optional[str] = None, timeout: float = 60) -> dict:
        import httpx

        body = {"command": command, "timeout": timeout}
        if stdin is not None:
            body["stdin"] = stdin
        async with httpx.AsyncClient(timeout=timeout + 30, trust_env=False) as http:
            r = await http.post(f"{url}/v1/shell", json=body, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        return r.json()

    async def probe(self, url: str, token: str, targets: list[tuple[str, int]]) -> dict[str, str]:
        """From inside the sandbox at ``url``: what each (host, port) answered ("open" or an error name)."""
        cmd = f"python3 -c {shlex.quote(PROBE)} {shlex.quote(json.dumps(targets))}"
        out = await self.shell(url, token, cmd)
        assert out["exit_code"] == 0, out
        return json.loads(out["stdout"])

    def address_of(self, container_id: str) -> str:
        import docker

        client = docker.from_env()
        try:
            info = client.api.inspect_container(container_id)
        finally:
            client.close()
        return info["NetworkSettings"]["Networks"][NETWORK]["IPAddress"]

    async def cleanup(self) -> None:
        for cid in reversed(self.made):
            await self.driver.remove(cid)
        self.made.clear()
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()
