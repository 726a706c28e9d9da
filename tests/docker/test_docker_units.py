"""Pure logic of the Docker driver: no engine needed."""

from __future__ import annotations

import pytest

from corral.drivers.base import ContainerSpec
from corral.drivers.config import DockerDriverConfig
from corral.drivers.docker import DockerDriver, _parse_user, map_status


@pytest.mark.parametrize(
    "state,expected",
    [("running", "running"), ("restarting", "running"), ("exited", "exited"), ("created", "created"),
     ("paused", "paused"), ("dead", "missing"), ("removing", "missing"), ("weird", "missing"), (None, "missing")],
)
def test_map_status(state, expected):
    assert map_status(state) == expected


def test_parse_user():
    assert _parse_user("1000:1000") == (1000, 1000)
    assert _parse_user("1001") == (1001, 1001)
    assert _parse_user("corral") is None
    assert _parse_user(None) is None


def test_run_kwargs_carry_security_and_no_token():
    d = DockerDriver(DockerDriverConfig(tmpfs_size="64m", network_name="corral-u", subnet="10.214.9.0/24"))
    spec = ContainerSpec(name="n", token="the-real-token-0123", labels={"corral.managed": "false", "x": "y"},
                         environment={"SECRET_TOKEN": "spoofed", "CORRAL_TOKEN_FILE": "/etc/passwd", "A": "1"},
                         cpus=1.5, pids_limit=10)
    kw = d._run_kwargs(spec)
    hc = kw["host_config"]
    # The token is nowhere in the container's settings: it goes down stdin at start.
    assert "the-real-token-0123" not in repr(kw)
    # CORRAL_READY_FILE=-: the box prints its ready line on stdout, which the driver reads
    assert kw["environment"] == {"A": "1", "CORRAL_TOKEN_FILE": "-", "CORRAL_BOX_CONTAINER": "1",
                                 "CORRAL_READY_FILE": "-"}
    assert kw["stdin_open"] is True and kw["detach"] is False  # docker-py: StdinOnce
    assert kw["labels"] == {"corral.managed": "true", "x": "y", "corral.network": "egress"}
    assert hc["network_mode"] == "corral-u"
    assert hc["sysctls"] == {"net.ipv6.conf.all.disable_ipv6": "1"}
    assert hc["port_bindings"] == {8000: ("127.0.0.1", None)}
    assert hc["nano_cpus"] == 1_500_000_000 and hc["pids_limit"] == 10
    assert hc["cpu_shares"] == 16
    assert DockerDriver(DockerDriverConfig(cpu_shares=None))._run_kwargs(spec)["host_config"]["cpu_shares"] is None
    assert hc["cap_drop"] == ["ALL"] and hc["security_opt"] == ["no-new-privileges"]
    assert hc["tmpfs"]["/tmp"] == "rw,exec,nosuid,nodev,size=64m,mode=1777"
    # No host workspace: a scratch one in memory, owned by the box's user.
    assert "uid=1000,gid=1000" in hc["tmpfs"]["/workspace"]
    with_ws = d._run_kwargs(spec.model_copy(update={"workspace": "/srv/ws"}))
    assert "/workspace" not in with_ws["host_config"]["tmpfs"]
    assert with_ws["host_config"]["binds"] == {"/srv/ws": {"bind": "/workspace", "mode": "rw"}}
    allow = d._run_kwargs(ContainerSpec(name="n", token="the-real-token-0123", network="allowlist",
                                        allow=["pypi.org", "1.2.3.0/24"]))
    assert allow["labels"]["corral.network"] == "allowlist"
    assert allow["labels"]["corral.allow"] == '["pypi.org", "1.2.3.0/24"]'


def test_relaxed_config_drops_the_walls():
    d = DockerDriver(DockerDriverConfig(read_only_root=False, drop_capabilities=False, user=None))
    kw = d._run_kwargs(ContainerSpec(name="n", token="a-token-of-16-chars"))
    assert "tmpfs" not in kw["host_config"] and "cap_drop" not in kw["host_config"]
    assert kw["host_config"]["read_only"] is False and kw["user"] is None


# --- the token and the network settings the driver refuses ---


async def test_bad_token_and_unenforceable_modes_are_refused_before_any_engine_call():
    import corral

    d = DockerDriver(DockerDriverConfig(firewall=False), client=object())  # any engine call would fail
    for token in ("", "   ", "short"):
        with pytest.raises(corral.InvalidRequest, match="token"):
            await d.create(ContainerSpec(name="n", token=token))
    for mode, allow in (("none", []), ("allowlist", ["1.2.3.4"])):
        with pytest.raises(corral.InvalidRequest, match="firewall"):
            await d.create(ContainerSpec(name="n", token="a-token-of-16-chars", network=mode, allow=allow))


async def test_allow_entries_in_a_blocked_range_or_the_subnet_are_refused():
    import corral

    d = DockerDriver(DockerDriverConfig(subnet="10.214.9.0/24", blocked_cidrs=["192.168.0.0/16"]))
    assert [str(n) for n in await d._allowed(["1.2.3.0/24", "8.8.8.8", "10.1.0.0/16"])] == [
        "1.2.3.0/24", "8.8.8.8/32", "10.1.0.0/16"]
    for entry in ("192.168.3.4", "192.0.0.0/8", "10.214.9.7"):
        with pytest.raises(corral.InvalidRequest, match="no sandbox may reach"):
            await d._allowed([entry])
    # Host names are resolved when the sandbox starts, and their addresses checked the same way.
    assert [str(n) for n in await d._allowed(["localhost"])] == ["127.0.0.1/32"]
    with pytest.raises(corral.InvalidRequest, match="127.0.0.0/8"):
        await DockerDriver()._allowed(["localhost"])
    with pytest.raises(corral.DriverError, match="cannot resolve"):
        await d._allowed(["no-such-host.invalid"])


def test_docker_config_checks_network_fields():
    from pydantic import ValidationError

    cfg = DockerDriverConfig()
    assert (cfg.network_name, cfg.subnet, cfg.firewall, cfg.dns_servers) == ("corral", "10.210.0.0/16", True, None)
    assert "169.254.0.0/16" in cfg.blocked_cidrs and "10.0.0.0/8" in cfg.blocked_cidrs
    assert DockerDriverConfig(subnet="10.214.0.7/24").subnet == "10.214.0.0/24"
    for bad in (dict(network_name="a" * 16), dict(network_name="has space"), dict(network_name=""),
                dict(subnet="fd00::/64"), dict(subnet="10.0.0.0/30"), dict(subnet="nope"),
                dict(blocked_cidrs=["10.0.0.0/33"]), dict(dns_servers=["10.0.0.0/24"]), dict(netwrok="x")):
        with pytest.raises(ValidationError):
            DockerDriverConfig(**bad)


def test_engine_locality_decides_whether_the_firewall_can_work(monkeypatch):
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert DockerDriver()._engine_is_local()
    assert DockerDriver(DockerDriverConfig(base_url="unix:///run/docker.sock"))._engine_is_local()
    assert DockerDriver(DockerDriverConfig(base_url="tcp://127.0.0.1:2375"))._engine_is_local()
    assert not DockerDriver(DockerDriverConfig(base_url="tcp://10.0.0.5:2376"))._engine_is_local()
    monkeypatch.setenv("DOCKER_HOST", "ssh://user@elsewhere")
    assert not DockerDriver()._engine_is_local()
