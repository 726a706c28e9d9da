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


def test_run_kwargs_carry_security_and_token_wins():
    d = DockerDriver(DockerDriverConfig(tmpfs_size="64m"))
    spec = ContainerSpec(name="n", token="real", environment={"SECRET_TOKEN": "spoofed", "A": "1"},
                         labels={"corral.managed": "false", "x": "y"}, cpus=1.5, pids_limit=10)
    kw = d._run_kwargs(spec)
    hc = kw["host_config"]
    assert kw["environment"] == {"A": "1", "SECRET_TOKEN": "real", "CORRAL_BOX_CONTAINER": "1"}
    assert kw["labels"] == {"corral.managed": "true", "x": "y"}
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


def test_relaxed_config_drops_the_walls():
    d = DockerDriver(DockerDriverConfig(read_only_root=False, drop_capabilities=False, user=None))
    kw = d._run_kwargs(ContainerSpec(name="n", token="t"))
    assert "tmpfs" not in kw["host_config"] and "cap_drop" not in kw["host_config"]
    assert kw["host_config"]["read_only"] is False and kw["user"] is None
