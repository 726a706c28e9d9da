"""Driver configurations: one pydantic discriminated union, picked by ``type``.

``SandboxManagerEnvConfig.container_deployment`` (the reference's field) picks
the type when no explicit ``driver`` config is given. :func:`make_driver`
imports the chosen driver lazily, so docker-py is only imported when used.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

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
