"""Driver configurations: one pydantic discriminated union, picked by ``type``.

``SandboxManagerEnvConfig.container_deployment`` (the reference's field) picks
the type when no explicit ``driver`` config is given. :func:`make_driver`
imports the chosen driver lazily, so docker-py is only imported when used.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .netpolicy import DEFAULT_BLOCKED, check_network_name, ipv4_networks

__all__ = ["ProcessDriverConfig", "DockerDriverConfig", "DriverConfig", "make_driver"]


class ProcessDriverConfig(BaseModel):
    """Each sandbox is a box server running as a local subprocess (no isolation)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["process"] = "process"
    root: str = Field(".corral/process", description="Where per-sandbox metadata, logs and temp dirs live.")
    python: Optional[str] = Field(None, description="Interpreter that runs the box; None = this one.")
    nice: int = Field(19, ge=0, le=19, description=(
        "CPU niceness the boxes run at (never below the process starting them): sandboxed work yields "
        "to corral's actors on a busy node."))
    cpu_policy: Literal["idle", "normal"] = Field("idle", description=(
        "Linux scheduling policy of the boxes and everything they start: 'idle' (SCHED_IDLE) lets any "
        "normal process, corral's actors and the caller's own, preempt a sandbox the moment it wakes; "
        "'normal' leaves them SCHED_OTHER at their niceness."))


class DockerDriverConfig(BaseModel):
    """Each sandbox is a Docker container running the box image."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["docker"] = "docker"
    base_url: Optional[str] = Field(None, description="Engine URL; None = DOCKER_HOST or the local socket.")
    host_ip: str = Field("127.0.0.1", description="Host address the box port is published on.")
    user: Optional[str] = Field("1000:1000", description="User the box runs as (non-root by default).")
    read_only_root: bool = Field(True, description="Read-only root filesystem; /tmp and the home dir on tmpfs.")
    tmpfs_size: str = Field("256m", description="Size of each tmpfs.")
    drop_capabilities: bool = Field(True, description="cap_drop ALL and no-new-privileges.")
    cpu_shares: Optional[int] = Field(16, ge=2, le=262144, description=(
        "CPU weight of each container under contention (Docker's default is 1024, as heavy as corral's "
        "actors together): sandboxed work yields to the control plane on a busy node. None: Docker's default."))
    network_name: str = Field("corral", description=(
        "The Docker network corral creates and owns for its sandboxes (inter-container traffic off); its "
        "bridge interface and iptables chains carry the same name. 1-15 letters, digits, '-', '_'."))
    subnet: str = Field("10.210.0.0/16", description=(
        "IPv4 subnet of that network. Pick one no other network on the node uses; every driver on a node "
        "must agree on it."))
    firewall: bool = Field(True, description=(
        "Keep corral's iptables rules on this node (docs/security.md): no sandbox reaches the host, another "
        "sandbox or a blocked range, and each sandbox type's network mode holds. Needs root and iptables on "
        "the engine's node. False: inter-container traffic stays off, but sandboxes reach the host and any "
        "address; types with network 'none' or 'allowlist' are refused. For trusted code only."))
    blocked_cidrs: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKED), description=(
        "IPv4 ranges no sandbox reaches in any mode (the host itself is always blocked). The default covers "
        "private, carrier-grade NAT, link-local (cloud metadata), loopback, multicast and reserved ranges; add "
        "your cluster nodes' addresses when they are public."))
    dns_servers: Optional[list[str]] = Field(None, description=(
        "Resolvers 'egress' and 'allowlist' sandboxes may query on port 53 even inside a blocked range "
        "(Docker's embedded DNS forwards a sandbox's queries to them from the sandbox). None: the IPv4 "
        "name servers of this node's /etc/resolv.conf. 'none' sandboxes query nothing outside."))

    @field_validator("network_name")
    @classmethod
    def _network_name_ok(cls, v: str) -> str:
        return check_network_name(v)

    @field_validator("subnet")
    @classmethod
    def _subnet_ok(cls, v: str) -> str:
        net = ipv4_networks([v], "subnet")[0]
        if net.prefixlen > 28:
            raise ValueError(f"subnet {v!r} is too small for a pool of sandboxes (at most /28)")
        return str(net)

    @field_validator("blocked_cidrs")
    @classmethod
    def _blocked_ok(cls, v: list[str]) -> list[str]:
        return [str(n) for n in ipv4_networks(v, "blocked_cidrs")]

    @field_validator("dns_servers")
    @classmethod
    def _dns_ok(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        if v is None:
            return v
        nets = ipv4_networks(v, "dns_servers")
        if any(n.prefixlen != 32 for n in nets):
            raise ValueError("dns_servers: give addresses, not ranges")
        return [str(n.network_address) for n in nets]


DriverConfig = Annotated[
    Union[ProcessDriverConfig, DockerDriverConfig], Field(discriminator="type")
]


def make_driver(config: "ProcessDriverConfig | DockerDriverConfig"):
    """Build the driver a config describes (lazy imports)."""
    if config.type == "process":
        from .process import ProcessDriver

        return ProcessDriver(config)
    if config.type == "docker":
        from .docker import DockerDriver

        return DockerDriver(config)
    raise ValueError(f"unknown driver type {config.type!r}")
