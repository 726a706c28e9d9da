"""Attacks from inside a Docker sandbox, and what stops each.

Every test here drives :class:`~corral.drivers.docker.DockerDriver` and the box
directly (no actors), on the lab of conftest.py: a network, rules, a network
namespace and listeners of these tests' own, all removed at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shlex
import socket
import subprocess

import docker
import httpx
import pytest

import corral
from corral.client import AsyncBoxClient

from _lab import CLUSTER_NODE, GATEWAY, NETWORK, OUTSIDE, OUTSIDE_OTHER
from tests.support.docker import unique_name

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

TOKEN = "security-test-token-3f9a1c"
NEXT = "next-session-token-b7e204"

#: Run inside a sandbox with a token's bytes, reversed and base64-encoded, on stdin (never on a
#: command line, where this search would find it): looks for the token in every process's
#: environment and command line and in every file of every writable file system, and tries the
#: box's memory and ptrace, and, as the control, those of an ordinary process of the same uid.
SEARCH = r"""
import base64, ctypes, json, os, stat, subprocess, sys
needle = base64.b64decode(sys.stdin.read().strip())[::-1]
ctl = subprocess.Popen(["sleep", "60"])  # the control: an ordinary process of this uid
control = ctl.pid
me = os.getpid()
found, denied = [], []
box = None
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
    if int(pid) == me:
        continue
    for name in ("environ", "cmdline"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                data = f.read()
        except PermissionError:
            denied.append(f"/proc/{pid}/{name}")
            continue
        except OSError:
            continue
        if needle in data:
            found.append(f"/proc/{pid}/{name}")
        if name == "cmdline" and b"corral.box" in data and b"kernel_main" not in data:
            box = int(pid)
def mem_of(pid):
    try:
        with open(f"/proc/{pid}/mem", "rb") as f:
            with open(f"/proc/{pid}/maps") as maps:
                f.seek(int(maps.readline().split("-")[0], 16))  # the first mapped byte
            f.read(1)
        return "readable"
    except OSError as e:
        return type(e).__name__
libc = ctypes.CDLL(None, use_errno=True)
def seize(pid):
    # PTRACE_SEIZE: the permission check of an attach, without stopping the process.
    r = libc.ptrace(0x4206, pid, 0, 0)
    return r, ctypes.get_errno() if r else 0
mem = mem_of(box)
ptrace, ptrace_errno = seize(box)
control_mem = mem_of(control)
control_ptrace = seize(control)[0]
ctl.kill()
skip = ("proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue")
mounts = []
for line in open("/proc/self/mounts"):
    dev, point, fstype, options = line.split()[:4]
    if "rw" in options.split(",") and fstype not in skip:
        mounts.append(point)
files = 0
for point in mounts:
    paths = [point] if not os.path.isdir(point) else []
    for root, dirs, names in os.walk(point) if os.path.isdir(point) else []:
        dirs[:] = [d for d in dirs if not os.path.join(root, d).startswith(("/proc", "/sys"))]
        paths.extend(os.path.join(root, n) for n in names)
    for path in paths:
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            with open(path, "rb") as f:
                data = f.read(64 << 20)
        except OSError:
            continue
        files += 1
        if needle in data:
            found.append(path)
print(json.dumps({"found": found, "denied": denied, "box": box, "mem": mem, "ptrace": ptrace,
                  "ptrace_errno": ptrace_errno, "control_mem": control_mem, "control_ptrace": control_ptrace,
                  "mounts": mounts, "files": files}))
"""


async def _search(lab, url: str, token: str, needle: str) -> dict:
    encoded = base64.b64encode(needle.encode()[::-1]).decode()
    out = await lab.shell(url, token, f"python3 -c {shlex.quote(SEARCH)}", stdin=encoded)
    assert out["exit_code"] == 0, out
    return json.loads(out["stdout"])


def _assert_hidden(report: dict, needle_name: str) -> None:
    assert report["found"] == [], f"{needle_name} found in {report['found']}"
    box = report["box"]
    assert box, "the search did not find the box process"
    # Non-dumpable: the box's environment, memory and ptrace are closed to its own uid.
    assert f"/proc/{box}/environ" in report["denied"], report
    assert report["mem"] == "PermissionError", report
    assert report["ptrace"] == -1 and report["ptrace_errno"] == 1, report  # EPERM
    # The control, a process of the same uid the box did not close: both work on it.
    assert report["control_mem"] == "readable" and report["control_ptrace"] == 0, report
    # Only the box is closed: the search did read everything else (tini's environment included).
    assert "/proc/1/environ" not in report["denied"]
    assert {"/tmp", "/workspace"} <= set(report["mounts"]) and report["files"] > 0, report


# --- secrets ----------------------------------------------------------------


async def test_the_token_is_nowhere_the_sandbox_can_read(lab):
    h = await lab.create(TOKEN)
    # Give the search something to look through: a kernel, files, a background process.
    async with AsyncBoxClient(h.url, TOKEN) as box:
        assert (await box.python("import os; x = 1")).status == "ok"
        await box.write("notes.txt", "hello")
        await box.shell("sleep 120 >/dev/null 2>&1 &")
    _assert_hidden(await _search(lab, h.url, TOKEN, TOKEN), "the token")
    # What the sandbox's own code sees of its environment: no token, no SECRET_TOKEN.
    env = await lab.shell(h.url, TOKEN, "tr '\\0' '\\n' < /proc/1/environ; env")
    assert "SECRET_TOKEN" not in env["stdout"] and TOKEN not in env["stdout"]


async def test_a_reuse_reset_rotates_the_token(lab):
    h = await lab.create(TOKEN)
    async with AsyncBoxClient(h.url, TOKEN) as previous, AsyncBoxClient(h.url, TOKEN) as pool:
        await previous.shell("echo session one > mine.txt")
        assert (await pool.reset(restart_kernel=True, token=NEXT)).ok
        with pytest.raises(corral.Unauthorized):
            await previous.shell("cat mine.txt")
        with pytest.raises(corral.Unauthorized):
            await previous.reset(token="the-previous-sessions-try-0")
        async with AsyncBoxClient(h.url, NEXT) as new:
            assert (await new.shell("ls -A; echo ok")).stdout == "ok\n"  # wiped, and answering the new token
            await new.write("after.txt", "the next session's")  # something for the search to read
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        assert (await http.get(f"{h.url}/v1/healthz", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 401
    # The new token came in a request body: it is no more readable than the first one was.
    _assert_hidden(await _search(lab, h.url, NEXT, NEXT), "the new token")
    _assert_hidden(await _search(lab, h.url, NEXT, TOKEN), "the old token")


# --- activity ---------------------------------------------------------------


async def test_unauthenticated_requests_do_not_count_as_activity(lab):
    h = await lab.create(TOKEN)
    good = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
        before = (await http.get(f"{h.url}/v1/activity", headers=good)).json()
        codes = set()
        for i in range(60):
            headers = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"}][i % 3]
            for method, path in (("POST", "/v1/shell"), ("GET", "/v1/files/list"), ("GET", "/nope")):
                r = await http.request(method, f"{h.url}{path}", headers=headers, json={"command": "true"})
                codes.add(r.status_code)
        after = (await http.get(f"{h.url}/v1/activity", headers=good)).json()
    assert codes == {401}
    assert after["calls_total"] == before["calls_total"]
    assert after["last_active_at"] == before["last_active_at"]


async def test_a_short_or_blank_token_is_refused(lab):
    for token in ("", "   ", "short-token"):
        with pytest.raises(corral.InvalidRequest, match="token"):
            await lab.create(token)
    # The image run by hand with the reference's SECRET_TOKEN convention refuses a blank one too.
    client = docker.from_env()
    try:
        c = client.containers.run(lab.image, detach=True, environment={"SECRET_TOKEN": "   "},
                                  network_mode="none", labels={"corral.managed": "true"},
                                  name=unique_name("blank"))
        try:
            assert c.wait(timeout=60)["StatusCode"] == 2
            log = c.logs().decode()
            assert "whitespace" in log and "Traceback" not in log, log
        finally:
            c.remove(force=True)
    finally:
        client.close()


# --- the network ------------------------------------------------------------


async def test_sandboxes_cannot_reach_each_other(lab):
    a = await lab.create(TOKEN)
    b = await lab.create(TOKEN)
    b_address = lab.address_of(b.container_id)
    b_port = int(b.url.rsplit(":", 1)[1])
    seen = await lab.probe(a.url, TOKEN, [(b_address, 8000), (GATEWAY, b_port)])
    # Neither B's box directly, nor B's published port through the gateway.
    assert seen == {f"{b_address}:8000": "TimeoutError", f"{GATEWAY}:{b_port}": "TimeoutError"}, seen
    # A's own box answers on A's address, so the probe itself works.
    own = await lab.probe(a.url, TOKEN, [(lab.address_of(a.container_id), 8000)])
    assert list(own.values()) == ["open"]


@pytest.mark.parametrize("mode", ["egress", "none", "allowlist"])
async def test_no_port_of_the_host_is_reachable(lab, mode):
    allow = [f"{OUTSIDE}/32"] if mode == "allowlist" else []
    h = await lab.create(TOKEN, network=mode, allow=allow)
    on_gateway = lab.listen_on_host(GATEWAY)
    on_veth = lab.listen_on_host("10.215.0.1")  # another address of the host's, outside corral's subnet
    # The listeners do answer, from the host itself.
    for listener in (on_gateway, on_veth):
        with socket.create_connection((listener.address, listener.port), timeout=5) as s:
            assert s.recv(4) == b"pong"
    accepted = on_gateway.accepted + on_veth.accepted
    seen = await lab.probe(h.url, TOKEN, [(GATEWAY, on_gateway.port), ("10.215.0.1", on_veth.port)])
    assert set(seen.values()) == {"TimeoutError"}, seen
    assert on_gateway.accepted + on_veth.accepted == accepted
    # The host still reaches the sandbox's box on its published port, in every mode.
    out = await lab.shell(h.url, TOKEN, "echo reachable")
    assert out["stdout"] == "reachable\n"


async def test_each_mode_reaches_what_it_should(lab):
    port = lab.outside_port
    targets = [(OUTSIDE, port), (OUTSIDE_OTHER, port), (CLUSTER_NODE, port)]
    expect = {
        "egress": {OUTSIDE: "open", OUTSIDE_OTHER: "open", CLUSTER_NODE: "TimeoutError"},
        "allowlist": {OUTSIDE: "open", OUTSIDE_OTHER: "TimeoutError", CLUSTER_NODE: "TimeoutError"},
        "none": {OUTSIDE: "TimeoutError", OUTSIDE_OTHER: "TimeoutError", CLUSTER_NODE: "TimeoutError"},
    }
    sandboxes = {}
    for mode in expect:
        allow = [OUTSIDE] if mode == "allowlist" else []
        sandboxes[mode] = await lab.create(TOKEN, network=mode, allow=allow)
    results = await asyncio.gather(*(lab.probe(h.url, TOKEN, targets) for h in sandboxes.values()))
    for mode, seen in zip(sandboxes, results):
        assert seen == {f"{ip}:{port}": r for ip, r in expect[mode].items()}, (mode, seen)

    # A restart (new address, maybe) keeps each sandbox's mode.
    for mode in ("none", "egress"):
        h = sandboxes[mode]
        await lab.driver.stop(h.container_id, timeout=5)
        await lab.driver.start(h.container_id, TOKEN)
        url = (await lab.driver.inspect(h.container_id)).url
        seen = await lab.probe(url, TOKEN, targets[:1])
        assert seen == {f"{OUTSIDE}:{port}": expect[mode][OUTSIDE]}, (mode, seen)


async def test_an_allow_entry_in_a_blocked_range_is_refused(lab):
    for entry in (CLUSTER_NODE, "169.254.169.254", "10.214.1.0/24"):
        with pytest.raises(corral.InvalidRequest, match="no sandbox may reach"):
            await lab.create(TOKEN, network="allowlist", allow=[entry])


async def test_after_a_firewall_reload_reconcile_puts_every_wall_back(lab):
    await lab.cleanup()  # only this test's sandboxes on the network
    port = lab.outside_port
    sandboxes = {mode: await lab.create(TOKEN, network=mode, allow=[OUTSIDE] if mode == "allowlist" else [])
                 for mode in ("egress", "allowlist", "none")}
    # What a reload of the node's firewall (firewalld, ufw) does to corral's rules: gone, hooks and all.
    for tool, chain, rule in (("iptables", "INPUT", ["-i", NETWORK, "-j", f"CORRAL-IN-{NETWORK}"]),
                              ("iptables", "DOCKER-USER", ["-i", NETWORK, "-j", f"CORRAL-FWD-{NETWORK}"])):
        _iptables("-D", chain, *rule, tool=tool)
    chains = [line.split()[1] for line in _iptables("-S").splitlines()
              if line.startswith("-N CORRAL-") and (NETWORK in line or "CORRAL-A-" in line)]
    for flag in ("-F", "-X"):
        for chain in chains:
            _iptables(flag, chain)
    assert "CORRAL-" not in _iptables("-S")

    assert await lab.driver.reconcile_network() == 2  # egress and allowlist; "none" has no rule
    assert await lab.driver.reconcile_network() == 0  # nothing missing any more
    on_gateway = lab.listen_on_host(GATEWAY)
    targets = [(OUTSIDE, port), (OUTSIDE_OTHER, port), (CLUSTER_NODE, port), (GATEWAY, on_gateway.port)]
    expect = {
        "egress": ["open", "open", "TimeoutError", "TimeoutError"],
        "allowlist": ["open", "TimeoutError", "TimeoutError", "TimeoutError"],
        "none": ["TimeoutError"] * 4,
    }
    results = await asyncio.gather(*(lab.probe(h.url, TOKEN, targets) for h in sandboxes.values()))
    for mode, seen in zip(sandboxes, results):
        assert list(seen.values()) == expect[mode], (mode, seen)
    await lab.cleanup()


async def test_rules_go_with_their_sandboxes_and_the_network_with_teardown(lab):
    h = await lab.create(TOKEN, network="allowlist", allow=[OUTSIDE])
    cid12 = h.container_id[:12]
    rules = _iptables("-S")
    assert f"corral-sandbox={cid12}" in rules and f"-N CORRAL-A-{cid12}" in rules
    assert f"-A INPUT -i {NETWORK} -j CORRAL-IN-{NETWORK}" in rules
    assert f"-A DOCKER-USER -i {NETWORK} -j CORRAL-FWD-{NETWORK}" in rules
    assert f"-A INPUT -i {NETWORK} -j DROP" in _iptables("-S", tool="ip6tables")
    await lab.cleanup()
    rules = _iptables("-S")
    assert cid12 not in rules
    # Only the final DROP is left in the dispatch chain: no sandbox, no rule.
    assert _iptables("-S", f"CORRAL-SBX-{NETWORK}").split("\n")[1:] == [f"-A CORRAL-SBX-{NETWORK} -j DROP", ""]
    await lab.driver.teardown_network()
    assert NETWORK not in _iptables("-S") and NETWORK not in _iptables("-S", tool="ip6tables")
    client = docker.from_env()
    try:
        assert client.networks.list(names=[NETWORK]) == []
    finally:
        client.close()
    await lab.driver.teardown_network()  # idempotent


async def test_an_address_taken_over_keeps_no_earlier_rule_and_forget_finds_a_moved_rule(lab):
    """What a crashed driver leaves for an address is replaced at the next admit; a rule the
    driver no longer knows exactly is found by listing (all on the real iptables of the lab)."""
    import ipaddress

    from corral.drivers.netpolicy import Chains

    await lab.driver.ensure_network()
    fw = lab.driver._firewall
    chains = Chains(NETWORK)
    ip = "10.214.1.250"  # in the lab's subnet, never handed out while this test runs
    old, new, moved = "f" * 64, "e" * 64, "d" * 64
    await fw.admit(old, ip, "allowlist", [ipaddress.ip_network(OUTSIDE)])
    fw._admitted.pop(old)  # as if its driver had crashed
    assert f"-N {chains.allow(old)}" in _iptables("-S")
    await fw.admit(new, ip, "egress", [])
    rules = _iptables("-S")
    assert old[:12] not in rules  # its rule and its allow chain went
    assert f"corral-sandbox={new[:12]} -g {chains.egress}" in rules.replace('"', "")
    await fw.forget(new)
    assert new[:12] not in _iptables("-S")

    await fw.admit(moved, ip, "allowlist", [ipaddress.ip_network(OUTSIDE)])
    # Someone rewrote its rule behind the driver's back: the exact delete fails, the listing finds it.
    _iptables("-D", chains.dispatch, "1")
    _iptables("-I", chains.dispatch, "1", "-s", f"{ip}/32", "-m", "comment", "--comment",
              f"corral-sandbox={moved[:12]}", "-j", "DROP")
    await fw.forget(moved)
    assert moved[:12] not in _iptables("-S")
    await fw.forget(moved)  # idempotent


def _iptables(*args: str, tool: str = "iptables") -> str:
    return subprocess.run([tool, "-w", "10", *args], capture_output=True, text=True, check=True).stdout
