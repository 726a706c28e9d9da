"""corral's network policy on a Docker node: the iptables rules that wall sandboxes in.

Every sandbox of the Docker driver sits on one Docker network that corral
creates and owns (inter-container traffic off). On the node that runs the
engine, :class:`Firewall` keeps the rules below, all in the ``filter`` table,
for a network ``<net>`` whose bridge interface is also called ``<net>``
(docs/security.md lists them with their purpose):

- ``INPUT`` (position 1): ``-i <net> -j CORRAL-IN-<net>``. That chain returns
  replies (``ESTABLISHED,RELATED``: the box answering a published port) and
  drops everything else: no sandbox reaches any port of its own host.
- ``DOCKER-USER`` (position 1; ``FORWARD`` when the engine has no
  ``DOCKER-USER``): ``-i <net> -j CORRAL-FWD-<net>``. That chain returns
  replies, drops traffic to the network's own subnet (other sandboxes), then
  jumps to the dispatch chain ``CORRAL-SBX-<net>``.
- ``CORRAL-SBX-<net>``: one rule per sandbox that may send anything, matched on
  its address and tagged ``corral-sandbox=<id>``: ``egress`` goes to
  ``CORRAL-E-<net>`` (drops the blocked ranges: private, link-local, cluster),
  ``allowlist`` to ``CORRAL-A-<id>`` (its allowed destinations, nothing else).
  The chain ends in ``DROP``: a sandbox with no rule (``none``, or one not yet
  admitted) sends nothing.
- ``ip6tables``: ``INPUT`` and ``FORWARD`` drop everything from ``<net>`` (the
  network is IPv4 only; the containers have IPv6 switched off as well).

corral's chains never ``ACCEPT``: what they let through goes on to the engine's
own rules (and whatever firewall the node has), so they only ever take away.

The rule texts are built by pure functions (:func:`base_rules`,
:func:`sandbox_lines`, ...); :class:`Firewall` runs them with ``iptables``,
under a lock file per network so the drivers of every process on the node
(one per sandbox type) take turns. Needs root and ``iptables`` on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Literal, Optional, Sequence

from corral.errors import DriverError, InvalidRequest

__all__ = [
    "NetworkMode",
    "NETWORK_MODES",
    "DEFAULT_BLOCKED",
    "Chains",
    "check_network",
    "split_allow",
    "check_network_name",
    "base_rules",
    "hook_rules",
    "sandbox_lines",
    "purge_lines",
    "host_resolvers",
    "NodeLock",
    "Firewall",
]

logger = logging.getLogger(__name__)

NetworkMode = Literal["none", "egress", "allowlist"]
NETWORK_MODES: tuple[str, ...] = ("none", "egress", "allowlist")

#: Ranges no sandbox reaches in any mode: private networks (where a cluster's
#: nodes and services live), carrier-grade NAT, link-local (cloud metadata
#: services), loopback, "this network", multicast and reserved.
DEFAULT_BLOCKED: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "0.0.0.0/8",
    "224.0.0.0/4",
    "240.0.0.0/4",
)

_HOST_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_NETWORK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,14}$")
_COMMENT_PREFIX = "corral-sandbox="
#: How long a driver waits for another process's firewall change on this node.
LOCK_TIMEOUT = 60.0
#: Seconds one iptables run may take (it waits up to 10 s for the xtables lock).
_TOOL_TIMEOUT = 30.0
#: ``Firewall._admitted`` has no entry for a container.
_UNKNOWN = object()


# --- checking what a sandbox type asks for -----------------------------------


def _allow_entry(entry: object) -> "ipaddress.IPv4Network | str":
    if not isinstance(entry, str) or not entry.strip():
        raise InvalidRequest(f"allow: {entry!r} is not a CIDR or a host name")
    text = entry.strip().lower()
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        if _HOST_RE.match(text) and not text.replace(".", "").isdigit():
            return text
        raise InvalidRequest(f"allow: {entry!r} is neither an IPv4 CIDR (1.2.3.0/24) nor a host name") from None
    if net.version != 4:
        raise InvalidRequest(f"allow: {entry!r} is IPv6; corral's sandbox network is IPv4 only")
    return net


def split_allow(entries: Iterable[object]) -> tuple[list[ipaddress.IPv4Network], list[str]]:
    """(networks, host names) of an allow list; InvalidRequest for an entry that is neither."""
    nets: list[ipaddress.IPv4Network] = []
    hosts: list[str] = []
    for entry in entries:
        item = _allow_entry(entry)
        (hosts if isinstance(item, str) else nets).append(item)  # type: ignore[arg-type]
    return nets, hosts


def check_network(mode: object, allow: Sequence[object]) -> None:
    """The one rule for a (mode, allow) pair: an allow list exactly when the mode is allowlist."""
    if mode not in NETWORK_MODES:
        raise InvalidRequest(f"network: {mode!r} is not one of {', '.join(NETWORK_MODES)}")
    if mode == "allowlist":
        if not allow:
            raise InvalidRequest("network 'allowlist' needs at least one allow entry (use 'none' for no network)")
        split_allow(allow)
    elif allow:
        raise InvalidRequest(f"allow is only used with network='allowlist', not {mode!r}")


def check_network_name(name: str) -> str:
    if not _NETWORK_NAME_RE.match(name or ""):
        raise InvalidRequest(
            f"network_name {name!r}: 1 to 15 letters, digits, '-' or '_' (it also names the bridge interface)"
        )
    return name


def ipv4_networks(values: Iterable[str], what: str) -> list[ipaddress.IPv4Network]:
    out = []
    for value in values:
        try:
            net = ipaddress.ip_network(str(value).strip(), strict=False)
        except ValueError:
            raise InvalidRequest(f"{what}: {value!r} is not an IPv4 network") from None
        if net.version != 4:
            raise InvalidRequest(f"{what}: {value!r} is IPv6; corral's sandbox network is IPv4 only")
        out.append(net)
    return out


def host_resolvers(paths: Sequence[str] = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf")) -> list[str]:
    """The IPv4 name servers Docker's embedded DNS forwards a sandbox's queries to.

    Loopback servers (a local stub) are skipped: the engine queries those from
    the host's own namespace, which corral's rules do not touch.
    """
    for path in paths:
        found = []
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2 and parts[0] == "nameserver":
                        try:
                            addr = ipaddress.ip_address(parts[1])
                        except ValueError:
                            continue
                        if addr.version == 4 and not addr.is_loopback:
                            found.append(str(addr))
        except OSError:
            continue
        if found:
            return found
    return []


# --- the rules ---------------------------------------------------------------


@dataclass(frozen=True)
class Chains:
    """The names of one network's chains (and its bridge interface)."""

    network: str

    @property
    def bridge(self) -> str:
        return self.network

    @property
    def input(self) -> str:
        return f"CORRAL-IN-{self.network}"

    @property
    def forward(self) -> str:
        return f"CORRAL-FWD-{self.network}"

    @property
    def dispatch(self) -> str:
        return f"CORRAL-SBX-{self.network}"

    @property
    def egress(self) -> str:
        return f"CORRAL-E-{self.network}"

    @staticmethod
    def allow(container_id: str) -> str:
        return f"CORRAL-A-{container_id[:12]}"


def _dns_lines(chain: str, dns: Sequence[str]) -> list[str]:
    lines = []
    for server in dns:
        for proto in ("udp", "tcp"):
            lines.append(f"-A {chain} -d {server}/32 -p {proto} -m {proto} --dport 53 -j RETURN")
    return lines


def base_rules(chains: Chains, subnet: str, blocked: Sequence[str], dns: Sequence[str]) -> str:
    """``iptables-restore --noflush`` input that (re)writes a network's shared chains at once.

    Declaring a chain in that input creates or empties it, so the chains are
    replaced whole and atomically; the dispatch chain (the sandboxes' rules) is
    not declared here and keeps its contents.
    """
    lines = [
        "*filter",
        f":{chains.input} - [0:0]",
        f":{chains.forward} - [0:0]",
        f":{chains.egress} - [0:0]",
        f"-A {chains.input} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {chains.input} -j DROP",
        f"-A {chains.forward} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        f"-A {chains.forward} -d {subnet} -j DROP",
        f"-A {chains.forward} -j {chains.dispatch}",
        *_dns_lines(chains.egress, dns),
        *(f"-A {chains.egress} -d {net} -j DROP" for net in blocked),
        "COMMIT",
        "",
    ]
    return "\n".join(lines)


def hook_rules(chains: Chains, docker_user: bool) -> list[tuple[str, list[str]]]:
    """(chain, rule) pairs that send the network's traffic into corral's chains (each at position 1)."""
    return [
        ("INPUT", ["-i", chains.bridge, "-j", chains.input]),
        ("DOCKER-USER" if docker_user else "FORWARD", ["-i", chains.bridge, "-j", chains.forward]),
    ]


def hook6_rules(chains: Chains) -> list[tuple[str, list[str]]]:
    return [("INPUT", ["-i", chains.bridge, "-j", "DROP"]), ("FORWARD", ["-i", chains.bridge, "-j", "DROP"])]


def _restore_text(lines: Sequence[str]) -> str:
    return "\n".join(["*filter", *lines, "COMMIT", ""])


def _dispatch_rule(chains: Chains, container_id: str, ip: str, target: str) -> str:
    """The spec (after ``-I/-A/-D <dispatch>``) of a sandbox's rule in the dispatch chain."""
    return f"-s {ip}/32 -m comment --comment {_COMMENT_PREFIX}{container_id[:12]} -g {target}"


def sandbox_lines(
    chains: Chains,
    container_id: str,
    ip: str,
    mode: str,
    allowed: Sequence[ipaddress.IPv4Network],
    blocked: Sequence[str],
    dns: Sequence[str],
) -> tuple[list[str], Optional[str]]:
    """``iptables-restore --noflush`` lines that admit one sandbox, and the chain its rule jumps
    to (no lines and None for mode ``none``: no rule)."""
    if mode == "none":
        return [], None
    if mode == "egress":
        return [f"-I {chains.dispatch} 1 {_dispatch_rule(chains, container_id, ip, chains.egress)}"], chains.egress
    if mode != "allowlist":
        raise InvalidRequest(f"network: unknown mode {mode!r}")
    own = chains.allow(container_id)
    return [
        f":{own} - [0:0]",
        *_dns_lines(own, dns),
        *(f"-A {own} -d {net} -j DROP" for net in blocked),
        *(f"-A {own} -d {net} -j RETURN" for net in allowed),
        f"-A {own} -j DROP",
        f"-I {chains.dispatch} 1 {_dispatch_rule(chains, container_id, ip, own)}",
    ], own


@dataclass(frozen=True)
class _Rule:
    """One line of ``iptables -S <dispatch>``: enough to delete it and to know whose it is."""

    spec: list[str]  # everything after "-A <chain>"
    source: Optional[str]
    owner: Optional[str]
    target: Optional[str]


def _parse_dispatch(listing: str, chain: str) -> list[_Rule]:
    rules = []
    for line in listing.splitlines():
        words = shlex.split(line)
        if len(words) < 2 or words[0] != "-A" or words[1] != chain:
            continue
        spec = words[2:]
        source = owner = target = None
        for i, word in enumerate(spec[:-1]):
            if word == "-s":
                source = spec[i + 1].split("/")[0]
            elif word == "--comment" and spec[i + 1].startswith(_COMMENT_PREFIX):
                owner = spec[i + 1][len(_COMMENT_PREFIX):]
            elif word in ("-g", "-j"):
                target = spec[i + 1]
        rules.append(_Rule(spec, source, owner, target))
    return rules


def _restore_word(word: str) -> str:
    """One word of an ``iptables -S`` rule, quoted the way ``iptables-restore`` reads it."""
    if word and not re.search(r'[\s"\\\']', word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def purge_lines(listing: str, chains: Chains, container_id: str, ip: Optional[str],
                keep: Optional[str] = None) -> list[str]:
    """Restore lines that take away what an earlier admit of this sandbox (or of another
    sandbox at ``ip``) left: their dispatch rules, then their allow chains, emptied and deleted.

    ``listing`` is ``iptables -S`` of the filter table. ``keep`` is a chain the caller
    declares again right after (declaring it empties it), so it is not deleted."""
    existing = {line.split()[1] for line in listing.splitlines() if line.startswith("-N ") and len(line.split()) > 1}
    owner = container_id[:12]
    lines: list[str] = []
    stale = {chains.allow(container_id)}
    for rule in _parse_dispatch(listing, chains.dispatch):
        if rule.owner == owner or (ip is not None and rule.source == ip):
            lines.append(f"-D {chains.dispatch} " + " ".join(_restore_word(w) for w in rule.spec))
            if rule.target and rule.target.startswith("CORRAL-A-"):
                stale.add(rule.target)
    for chain in sorted(stale & existing - {keep}):
        lines += [f"-F {chain}", f"-X {chain}"]
    return lines


# --- running them -------------------------------------------------------------


def bridged_filtering(path: str = "/proc/sys/net/bridge/bridge-nf-call-iptables") -> None:
    """DriverError unless iptables sees traffic between two ports of one bridge (br_netfilter).

    Without it, two sandboxes on corral's bridge talk past every rule, the
    engine's inter-container DROP included. The engine turns it on when it
    makes a network with inter-container traffic off; this checks it did.
    """
    try:
        with open(path) as f:
            on = f.read().strip() == "1"
    except OSError:
        on = False
    if not on:
        raise DriverError(
            f"{path} is not 1: iptables does not see traffic between sandboxes on one bridge, so nothing "
            "would keep them apart. Load br_netfilter (modprobe br_netfilter) and set it to 1"
        )


_TOOLS: dict[str, str] = {}


def _tool(name: str) -> Optional[str]:
    if name not in _TOOLS:
        # Ray workers and services often run with a PATH that lacks the sbin directories.
        found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
        if found is None:
            return None  # asked again next time: it may be installed meanwhile
        _TOOLS[name] = found
    return _TOOLS[name]


class NodeLock:
    """One network's changes on this node, one at a time: an asyncio lock (this process's
    tasks), then a lock file (every process's drivers; one per sandbox type)."""

    def __init__(self, network: str) -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"corral-network-{network}.lock")
        self._local = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        async with self._local:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    await asyncio.wait_for(asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX), LOCK_TIMEOUT)
                except asyncio.TimeoutError:
                    raise DriverError(
                        f"another process held {self.path} for over {LOCK_TIMEOUT:g}s; "
                        "changes to corral's network on this node are stuck"
                    ) from None
                yield
            finally:
                # Closing the descriptor drops the lock (also one granted after a timeout above).
                os.close(fd)


class Firewall:
    """The iptables rules of one corral network on this node (see the module docstring).

    ``ensure()`` installs the shared chains and hooks (idempotent; rewrites the
    shared chains from this instance's settings); ``admit()`` and ``forget()``
    add and remove one sandbox's rule; ``teardown()`` removes every rule and
    chain of the network. Every change runs under ``node_lock``.
    """

    def __init__(self, network: str, subnet: str, blocked: Sequence[str], dns: Sequence[str],
                 node_lock: Optional[NodeLock] = None) -> None:
        self.chains = Chains(check_network_name(network))
        self.subnet = subnet
        self.blocked = list(blocked)
        self.dns = list(dns)
        self.node_lock = node_lock or NodeLock(network)
        #: container id -> (its dispatch rule, its allow chain), or None: admitted with no rule.
        #: What :meth:`forget` removes without listing first; the kernel's tables stay the truth.
        self._admitted: dict[str, Optional[tuple[str, Optional[str]]]] = {}

    # -- plumbing --

    async def _run(self, tool: str, args: Sequence[str], stdin: Optional[str] = None) -> tuple[int, str, str]:
        path = _tool(tool)
        if path is None:
            raise DriverError(
                f"{tool} is not installed on this node; corral's sandbox network policy needs it "
                "(apt-get install iptables), or set DockerDriverConfig.firewall=False for trusted code"
            )
        argv = [path, "-w", "10", *args]  # -w: wait for the xtables lock rather than fail

        def run() -> subprocess.CompletedProcess:
            # subprocess in a thread: CPython spawns with vfork, where an event loop such as
            # uvloop (Ray's) forks and copies the page tables of the whole actor process.
            return subprocess.run(argv, input=stdin.encode() if stdin is not None else None,
                                  stdin=subprocess.DEVNULL if stdin is None else None,
                                  capture_output=True, timeout=_TOOL_TIMEOUT)

        try:
            proc = await asyncio.to_thread(run)
        except subprocess.TimeoutExpired:
            raise DriverError(f"{tool} {' '.join(args)} did not finish within {_TOOL_TIMEOUT:g}s") from None
        return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace").strip()

    async def _must(self, tool: str, args: Sequence[str], stdin: Optional[str] = None) -> str:
        rc, out, err = await self._run(tool, args, stdin)
        if rc != 0:
            hint = " (corral's network policy needs root on the engine's node)" if "ermission" in err else ""
            raise DriverError(f"{tool} {' '.join(args)} failed: {err or f'exit code {rc}'}{hint}")
        return out

    async def _chain_exists(self, chain: str, tool: str = "iptables") -> bool:
        rc, _, _ = await self._run(tool, ["-S", chain])
        return rc == 0

    async def _hook(self, tool: str, chain: str, rule: list[str]) -> None:
        rc, _, _ = await self._run(tool, ["-C", chain, *rule])
        if rc != 0:
            await self._must(tool, ["-I", chain, "1", *rule])

    async def _unhook(self, tool: str, chain: str, rule: list[str]) -> None:
        for _ in range(100):  # every copy (two processes may once have added the same hook)
            rc, _, _ = await self._run(tool, ["-D", chain, *rule])
            if rc != 0:
                return

    # -- the shared chains --

    async def ensure(self) -> None:
        """Install (or rewrite) the network's chains and hooks; the caller holds ``node_lock``."""
        c = self.chains
        bridged_filtering()
        if not await self._chain_exists(c.dispatch):
            await self._must("iptables", ["-N", c.dispatch])
        listing = await self._must("iptables", ["-S", c.dispatch])
        if f"-A {c.dispatch} -j DROP" not in listing.splitlines():
            await self._must("iptables", ["-A", c.dispatch, "-j", "DROP"])
        await self._must("iptables-restore", ["--noflush"], base_rules(c, self.subnet, self.blocked, self.dns))
        docker_user = await self._chain_exists("DOCKER-USER")
        for chain, rule in hook_rules(c, docker_user):
            await self._hook("iptables", chain, rule)
        try:
            for chain, rule in hook6_rules(c):
                await self._hook("ip6tables", chain, rule)
        except DriverError as e:
            # The containers have IPv6 switched off too; this is the second wall, not the first.
            logger.warning("corral network %s: no IPv6 rules (%s)", c.network, e)

    async def teardown(self) -> None:
        """Remove every hook and chain of the network (idempotent); the caller holds ``node_lock``."""
        c = self.chains
        docker_user = await self._chain_exists("DOCKER-USER")
        for chain, rule in hook_rules(c, docker_user) + hook_rules(c, not docker_user):
            await self._unhook("iptables", chain, rule)
        if _tool("ip6tables"):
            for chain, rule in hook6_rules(c):
                await self._unhook("ip6tables", chain, rule)
        allow_chains = []
        rc, listing, _ = await self._run("iptables", ["-S", c.dispatch])
        if rc == 0:
            allow_chains = [r.target for r in _parse_dispatch(listing, c.dispatch)
                            if r.target and r.target.startswith("CORRAL-A-")]
        # Emptied first, so no chain is still referenced when it is deleted.
        for chain in (c.input, c.forward, c.dispatch, c.egress, *allow_chains):
            await self._run("iptables", ["-F", chain])
        for chain in (c.input, c.forward, c.dispatch, c.egress, *allow_chains):
            await self._run("iptables", ["-X", chain])

    # -- one sandbox --

    async def admit(self, container_id: str, ip: str, mode: str, allowed: Sequence[ipaddress.IPv4Network]) -> None:
        """Give the sandbox at ``ip`` its mode's rule, replacing any earlier rule for that address or id.

        Two tool runs: a listing, then one atomic ``iptables-restore`` that removes what is
        stale and adds the new rule."""
        lines, target = sandbox_lines(self.chains, container_id, ip, mode, allowed, self.blocked, self.dns)
        own = target if target and target.startswith("CORRAL-A-") else None
        async with self.node_lock():
            listing = await self._must("iptables", ["-S"])
            changes = purge_lines(listing, self.chains, container_id, ip, keep=own) + lines
            if changes:
                await self._must("iptables-restore", ["--noflush"], _restore_text(changes))
            self._admitted[container_id] = (
                None if target is None else (_dispatch_rule(self.chains, container_id, ip, target), own)
            )

    async def forget(self, container_id: str) -> None:
        """Remove the sandbox's rule and chain (idempotent).

        A sandbox this instance admitted loses its rule in one ``iptables-restore`` (nothing,
        for mode ``none``); otherwise, or when that rule is gone already, the rules are listed
        and everything of the sandbox's id is removed."""
        async with self.node_lock():
            known = self._admitted.pop(container_id, _UNKNOWN)
            if known is None:
                return
            if known is not _UNKNOWN:
                rule, own = known
                lines = [f"-D {self.chains.dispatch} {rule}"] + ([f"-F {own}", f"-X {own}"] if own else [])
                rc, _, _ = await self._run("iptables-restore", ["--noflush"], _restore_text(lines))
                if rc == 0:
                    return
            rc, listing, _ = await self._run("iptables", ["-S"])
            if rc != 0:
                return
            lines = purge_lines(listing, self.chains, container_id, None)
            if lines:
                await self._must("iptables-restore", ["--noflush"], _restore_text(lines))

    async def admitted(self) -> dict[str, str]:
        """Container id prefix -> address of every sandbox rule in the dispatch chain."""
        rc, listing, _ = await self._run("iptables", ["-S", self.chains.dispatch])
        if rc != 0:
            return {}
        return {r.owner: r.source for r in _parse_dispatch(listing, self.chains.dispatch) if r.owner and r.source}

    async def rules(self) -> dict[str, str]:
        """``iptables -S`` of each of the network's chains that exists (for tests and diagnostics)."""
        out = {}
        c = self.chains
        for chain in (c.input, c.forward, c.dispatch, c.egress):
            rc, listing, _ = await self._run("iptables", ["-S", chain])
            if rc == 0:
                out[chain] = listing
        return out
