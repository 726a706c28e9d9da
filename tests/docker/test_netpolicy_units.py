"""corral's network policy as text: the rules, the allow lists and the parsing. No root, no engine."""

from __future__ import annotations

import ipaddress

import pytest

import corral
from corral.drivers.base import ContainerSpec
from corral.drivers.netpolicy import (
    Chains,
    _parse_dispatch,
    base_rules,
    check_network,
    hook_rules,
    host_resolvers,
    purge_lines,
    sandbox_lines,
    split_allow,
)

C = Chains("corral")


def test_chain_names_fit_iptables():
    longest = Chains("a" * 15)
    for name in (longest.input, longest.forward, longest.dispatch, longest.egress, Chains.allow("f" * 64)):
        assert len(name) <= 28, name  # iptables' limit for a chain name
    assert C.bridge == "corral" and Chains.allow("0123456789abcdef") == "CORRAL-A-0123456789ab"


def test_base_rules_drop_the_host_the_subnet_and_the_blocked_ranges():
    text = base_rules(C, "10.210.0.0/16", ["10.0.0.0/8", "169.254.0.0/16"], ["10.255.255.53"])
    assert text.splitlines() == [
        "*filter",
        ":CORRAL-IN-corral - [0:0]",
        ":CORRAL-FWD-corral - [0:0]",
        ":CORRAL-E-corral - [0:0]",
        "-A CORRAL-IN-corral -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-A CORRAL-IN-corral -j DROP",
        "-A CORRAL-FWD-corral -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
        "-A CORRAL-FWD-corral -d 10.210.0.0/16 -j DROP",
        "-A CORRAL-FWD-corral -j CORRAL-SBX-corral",
        "-A CORRAL-E-corral -d 10.255.255.53/32 -p udp -m udp --dport 53 -j RETURN",
        "-A CORRAL-E-corral -d 10.255.255.53/32 -p tcp -m tcp --dport 53 -j RETURN",
        "-A CORRAL-E-corral -d 10.0.0.0/8 -j DROP",
        "-A CORRAL-E-corral -d 169.254.0.0/16 -j DROP",
        "COMMIT",
    ]
    # The dispatch chain holds the sandboxes' rules: never declared (that would empty it).
    assert ":CORRAL-SBX-corral" not in text
    assert "ACCEPT" not in text  # corral's chains only ever take away


def test_hooks_go_to_docker_user_when_the_engine_has_it():
    assert hook_rules(C, True) == [("INPUT", ["-i", "corral", "-j", "CORRAL-IN-corral"]),
                                   ("DOCKER-USER", ["-i", "corral", "-j", "CORRAL-FWD-corral"])]
    assert hook_rules(C, False)[1][0] == "FORWARD"


def test_sandbox_lines_per_mode():
    cid = "a2193afc4663" + "0" * 52
    assert sandbox_lines(C, cid, "10.210.0.9", "none", [], [], []) == ([], None)
    egress = sandbox_lines(C, cid, "10.210.0.9", "egress", [], ["10.0.0.0/8"], ["10.255.255.53"])
    assert egress == ([
        "-I CORRAL-SBX-corral 1 -s 10.210.0.9/32 -m comment --comment corral-sandbox=a2193afc4663 -g CORRAL-E-corral",
    ], "CORRAL-E-corral")
    allowed = [ipaddress.ip_network("1.2.3.0/24"), ipaddress.ip_network("5.6.7.8/32")]
    lines, target = sandbox_lines(C, cid, "10.210.0.9", "allowlist", allowed, ["10.0.0.0/8"], ["10.255.255.53"])
    assert target == "CORRAL-A-a2193afc4663"
    assert lines == [
        ":CORRAL-A-a2193afc4663 - [0:0]",
        "-A CORRAL-A-a2193afc4663 -d 10.255.255.53/32 -p udp -m udp --dport 53 -j RETURN",
        "-A CORRAL-A-a2193afc4663 -d 10.255.255.53/32 -p tcp -m tcp --dport 53 -j RETURN",
        "-A CORRAL-A-a2193afc4663 -d 10.0.0.0/8 -j DROP",
        "-A CORRAL-A-a2193afc4663 -d 1.2.3.0/24 -j RETURN",
        "-A CORRAL-A-a2193afc4663 -d 5.6.7.8/32 -j RETURN",
        "-A CORRAL-A-a2193afc4663 -j DROP",
        "-I CORRAL-SBX-corral 1 -s 10.210.0.9/32 -m comment --comment corral-sandbox=a2193afc4663 -g CORRAL-A-a2193afc4663",
    ]


def test_dispatch_listing_is_parsed_for_owner_source_and_target():
    listing = "\n".join([
        "-N CORRAL-SBX-corral",
        '-A CORRAL-SBX-corral -s 10.210.0.9/32 -m comment --comment "corral-sandbox=a2193afc4663" -g CORRAL-E-corral',
        "-A CORRAL-SBX-corral -s 10.210.0.10/32 -m comment --comment corral-sandbox=bbbbbbbbbbbb -g CORRAL-A-bbbbbbbbbbbb",
        "-A CORRAL-SBX-corral -j DROP",
    ])
    rules = _parse_dispatch(listing, "CORRAL-SBX-corral")
    assert [(r.source, r.owner, r.target) for r in rules] == [
        ("10.210.0.9", "a2193afc4663", "CORRAL-E-corral"),
        ("10.210.0.10", "bbbbbbbbbbbb", "CORRAL-A-bbbbbbbbbbbb"),
        (None, None, "DROP"),
    ]
    # What deletes the rule again: the spec exactly as listed, quotes gone.
    assert rules[0].spec == ["-s", "10.210.0.9/32", "-m", "comment", "--comment", "corral-sandbox=a2193afc4663",
                             "-g", "CORRAL-E-corral"]


def test_purge_removes_a_sandboxs_earlier_rules_and_whatever_held_its_address():
    cid = "a2193afc4663" + "0" * 52
    listing = "\n".join([
        "-P INPUT ACCEPT",
        "-N CORRAL-A-a2193afc4663",
        "-N CORRAL-A-cccccccccccc",
        "-N CORRAL-A-dddddddddddd",
        "-N CORRAL-SBX-corral",
        "-A CORRAL-A-cccccccccccc -j DROP",
        # this id's earlier rule, a stale rule of another sandbox at the same address, a bystander
        '-A CORRAL-SBX-corral -s 10.210.0.7/32 -m comment --comment "corral-sandbox=a2193afc4663" -g CORRAL-E-corral',
        '-A CORRAL-SBX-corral -s 10.210.0.9/32 -m comment --comment "corral-sandbox=cccccccccccc" '
        "-g CORRAL-A-cccccccccccc",
        '-A CORRAL-SBX-corral -s 10.210.0.10/32 -m comment --comment "corral-sandbox=dddddddddddd" '
        "-g CORRAL-A-dddddddddddd",
        "-A CORRAL-SBX-corral -j DROP",
    ])
    lines = purge_lines(listing, C, cid, "10.210.0.9")
    assert lines == [
        "-D CORRAL-SBX-corral -s 10.210.0.7/32 -m comment --comment corral-sandbox=a2193afc4663 -g CORRAL-E-corral",
        "-D CORRAL-SBX-corral -s 10.210.0.9/32 -m comment --comment corral-sandbox=cccccccccccc "
        "-g CORRAL-A-cccccccccccc",
        # rules first, then the chains they jumped to (this id's own chain too), emptied and deleted
        "-F CORRAL-A-a2193afc4663", "-X CORRAL-A-a2193afc4663",
        "-F CORRAL-A-cccccccccccc", "-X CORRAL-A-cccccccccccc",
    ]
    # A chain declared again right after is emptied by that declaration, not deleted.
    assert "-X CORRAL-A-a2193afc4663" not in purge_lines(listing, C, cid, None, keep="CORRAL-A-a2193afc4663")
    # forget: by id only; a chain that does not exist is not touched.
    assert purge_lines(listing, C, "e" * 64, None) == []
    assert purge_lines("", C, cid, "10.210.0.9") == []


def test_a_rule_with_a_quoted_word_is_deleted_as_iptables_restore_reads_it():
    listing = ('-A CORRAL-SBX-corral -s 10.210.0.9/32 -m comment --comment "a b \\"c\\"" '
               "-g CORRAL-E-corral")
    (line,) = purge_lines(listing, C, "f" * 64, "10.210.0.9")
    assert line == '-D CORRAL-SBX-corral -s 10.210.0.9/32 -m comment --comment "a b \\"c\\"" -g CORRAL-E-corral'


def test_allow_lists_and_modes():
    nets, hosts = split_allow(["1.2.3.4", "10.0.0.0/8", "PyPI.org", " github.com "])
    assert [str(n) for n in nets] == ["1.2.3.4/32", "10.0.0.0/8"] and hosts == ["pypi.org", "github.com"]
    for bad in ("not a host", "::1", "fd00::/8", "", "1.2.3.4/40", "-bad-.com", "1.2.3"):
        with pytest.raises(corral.InvalidRequest, match="allow"):
            split_allow([bad])
    check_network("egress", [])
    check_network("none", [])
    check_network("allowlist", ["pypi.org"])
    with pytest.raises(corral.InvalidRequest, match="at least one"):
        check_network("allowlist", [])
    with pytest.raises(corral.InvalidRequest, match="only used with"):
        check_network("none", ["1.2.3.4"])
    with pytest.raises(corral.InvalidRequest, match="not one of"):
        check_network("bridge", [])


def test_container_spec_and_sandbox_type_take_the_same_network_fields():
    from pydantic import ValidationError

    from corral.errors import InvalidRequest
    from corral.models import SandboxTypeConfig

    assert ContainerSpec(name="n", token="t" * 16).network == "egress"
    assert SandboxTypeConfig(name="a").network == "egress" and SandboxTypeConfig(name="a").allow == []
    t = SandboxTypeConfig(name="a", network="allowlist", allow=["pypi.org", "1.2.3.0/24"])
    assert ContainerSpec(name="n", token="t" * 16, network=t.network, allow=t.allow).allow == t.allow
    for bad in (dict(network="allowlist"), dict(network="none", allow=["1.2.3.4"]), dict(network="host"),
                dict(network="allowlist", allow=["a b"]), dict(network_mode="none")):
        with pytest.raises(InvalidRequest):  # corral's config models speak the one exception tree
            SandboxTypeConfig(name="a", **bad)
        with pytest.raises(ValidationError):
            ContainerSpec(name="n", token="t" * 16, **bad)


def test_host_resolvers_skip_loopback_and_fall_back(tmp_path):
    stub = tmp_path / "stub.conf"
    stub.write_text("nameserver 127.0.0.53\noptions edns0\n")
    real = tmp_path / "real.conf"
    real.write_text("# upstream\nnameserver 10.0.0.2\nnameserver fd00::1\nnameserver 1.1.1.1\n")
    assert host_resolvers([str(stub), str(real)]) == ["10.0.0.2", "1.1.1.1"]
    assert host_resolvers([str(real)]) == ["10.0.0.2", "1.1.1.1"]
    assert host_resolvers([str(tmp_path / "missing"), str(stub)]) == []


async def test_process_driver_refuses_modes_it_cannot_enforce(tmp_path):
    from corral.drivers.config import ProcessDriverConfig
    from corral.drivers.process import ProcessDriver

    d = ProcessDriver(ProcessDriverConfig(root=str(tmp_path)))
    for mode, allow in (("none", []), ("allowlist", ["1.2.3.4"])):
        with pytest.raises(corral.InvalidRequest, match="docker driver"):
            await d.create(ContainerSpec(name="n", token="t" * 16, network=mode, allow=allow))
    with pytest.raises(corral.InvalidRequest, match="token"):
        await d.create(ContainerSpec(name="n", token="  short  "))
    assert list(tmp_path.iterdir()) == []  # refused before anything was made
    await d.close()


def test_bridged_traffic_must_pass_iptables(tmp_path):
    from corral.drivers.netpolicy import bridged_filtering

    on, off = tmp_path / "on", tmp_path / "off"
    on.write_text("1\n")
    off.write_text("0\n")
    bridged_filtering(str(on))
    for path in (off, tmp_path / "missing"):
        with pytest.raises(corral.DriverError, match="br_netfilter"):
            bridged_filtering(str(path))
