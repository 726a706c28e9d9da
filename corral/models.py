"""Records, states, sandbox types and the manager's configuration.

These are plain pydantic models with no Ray or Docker in them. The field names
of :class:`ContainerModel` and :class:`SandboxManagerEnvConfig` are the
reference's, so records and configurations carry over unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from enum import Enum
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from corral.drivers.config import DockerDriverConfig, DriverConfig, ProcessDriverConfig
from corral.drivers.netpolicy import NetworkMode, check_network

from .errors import InvalidRequest, UnknownSandboxType

__all__ = [
    "ContainerState",
    "ContainerModel",
    "SandboxTypeConfig",
    "SandboxManagerEnvConfig",
    "ACTIVE_STATES",
    "TERMINAL_STATES",
    "LABEL_MANAGED",
    "LABEL_NAME",
    "LABEL_TYPE",
    "LABEL_REGISTRY",
    "LABEL_OWNER",
    "LABEL_NODE",
    "owner_id",
    "SESSION_ID_ALPHABET",
    "labels_for",
    "check_env",
]

logger = logging.getLogger(__name__)

#: Labels corral puts on every container it starts (Docker labels; the process
#: driver keeps them in its metadata file). The registry reconciles by them.
LABEL_MANAGED = "corral.managed"
LABEL_NAME = "corral.name"  # the sandbox's name (the record key)
LABEL_TYPE = "corral.sandbox_type"
LABEL_REGISTRY = "corral.registry"  # the namespace
LABEL_OWNER = "corral.owner"  # the registry instance: its state dir and namespace (see owner_id)
LABEL_NODE = "corral.node"  # the address of the node the sandbox was started for (stable across Ray restarts)

SESSION_ID_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


class ContainerState(str, Enum):
    """The reference's five states, plus STARTING for a slot being created."""

    STARTING = "STARTING"  # corral: slot reserved, container being created (counts toward the limit)
    WARM = "WARM"
    RUNNING = "RUNNING"
    RESETTING = "RESETTING"  # corral: released, being wiped for reuse (still holds its slot)
    RECYCLED = "RECYCLED"
    LOST = "LOST"  # corral: its node died with it; restore_session brings the session back elsewhere
    REPLACED = "REPLACED"
    RELEASED = "RELEASED"


ACTIVE_STATES = frozenset(
    {ContainerState.STARTING, ContainerState.WARM, ContainerState.RUNNING, ContainerState.RESETTING}
)
TERMINAL_STATES = frozenset({ContainerState.RELEASED, ContainerState.REPLACED})


class ContainerModel(BaseModel):
    """One container's record. Owned by the RegistryActor: nobody else writes it."""

    model_config = ConfigDict(extra="allow")

    session_id: str
    container_id: Optional[str] = None
    container_name: str
    url: Optional[str] = None
    ports: list[Any] = Field(default_factory=list)
    mount_dir: Optional[str] = None
    storage_path: Optional[str] = None
    runtime_token: Optional[str] = None
    version: Optional[str] = None
    meta: dict = Field(default_factory=dict)
    timeout: Optional[float] = None
    sandbox_type: Optional[str] = None
    state: ContainerState = ContainerState.WARM
    session_ctx_id: Optional[str] = None
    last_active_at: Optional[float] = None
    recycled_at: Optional[float] = None
    released_at: Optional[float] = None
    updated_at: Optional[float] = None
    recycle_reason: Optional[str] = None
    redirect_to: Optional[str] = None
    # corral's own
    created_at: Optional[float] = None
    rev: int = 0  # bumped by the registry on every transition
    node_id: Optional[str] = None  # the Ray node the sandbox runs on
    node_address: Optional[str] = None  # that node's address: a Ray restart gives the machine a new node id
    storage_synced_at: Optional[float] = None  # the last upload of its workspace that completed
    storage_error: Optional[str] = None  # why the last upload or download failed (None: it did not)

    def public(self) -> dict:
        """The record without its runtime token (what `get_info` shows other callers)."""
        d = self.model_dump(mode="json")
        d["runtime_token"] = None
        return d


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def _invalid(cls: type, e: ValidationError) -> InvalidRequest:
    lines = []
    for err in e.errors()[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "config"
        lines.append(f"{loc}: {err.get('msg', 'invalid')}")
    more = f" (and {e.error_count() - 8} more)" if e.error_count() > 8 else ""
    return InvalidRequest(f"invalid {cls.__name__}: " + "; ".join(lines) + more)


_VALIDATING = contextvars.ContextVar("corral_config_validating", default=False)


class _Config(BaseModel):
    """A configuration model whose validation errors are :class:`corral.InvalidRequest` (one
    exception tree), with pydantic's detail in the message. Only the outermost validation
    converts: pydantic validates nested models through their ``__init__`` too."""

    def __init__(self, /, **data: Any) -> None:
        _validated(type(self), super().__init__, **data)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any):
        return _validated(cls, super().model_validate, obj, *args, **kwargs)

    @classmethod
    def model_validate_json(cls, data: Any, *args: Any, **kwargs: Any):
        return _validated(cls, super().model_validate_json, data, *args, **kwargs)


def _validated(cls: type, validate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``validate(*args, **kwargs)``, its ValidationError raised as InvalidRequest by the outermost validation."""
    with _outermost() as outer:
        try:
            return validate(*args, **kwargs)
        except ValidationError as e:
            if not outer:
                raise
            raise _invalid(cls, e) from None


@contextlib.contextmanager
def _outermost():
    token = _VALIDATING.set(True)
    try:
        yield token.old_value is not True
    finally:
        _VALIDATING.reset(token)


class SandboxTypeConfig(_Config):
    """What a sandbox type is: its image, environment, limits and pool policy."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Type name, e.g. 'base'. Lowercase letters, digits, '_', '-', '.'.")
    image: str = Field("corral-box:latest", description="Docker image (ignored by the process driver).")
    environment: dict[str, str] = Field(default_factory=dict, description="Env for every sandbox of this type.")
    pool_size: Optional[int] = Field(None, ge=0, le=4096, description="Warm target; None = the manager's pool_size.")
    timeout: Optional[float] = Field(None, gt=0, description="Heartbeat timeout override in seconds.")
    cpus: Optional[float] = Field(None, gt=0, le=1024, description="CPU limit (Docker).")
    memory: Optional[str] = Field(None, description="Memory limit, e.g. '512m' (Docker).")
    pids_limit: Optional[int] = Field(256, gt=0, description="Max processes (Docker).")
    network: NetworkMode = Field("egress", description=(
        "What the sandboxes may reach (docker driver; docs/security.md): 'none' (nothing: only the host reaches "
        "the box's port), 'egress' (any address outside the driver's blocked ranges) or 'allowlist' (only "
        "`allow`). In every mode they reach neither each other nor any port of their host."))
    allow: list[str] = Field(default_factory=list, description=(
        "For network='allowlist': IPv4 CIDRs or host names (resolved when a sandbox starts)."))
    reuse: bool = Field(False, description="On release, reset the sandbox and return it to the pool instead of destroying it.")
    kernel_reset: Literal["restart", "namespace"] = Field(
        "restart",
        description="How a reuse reset treats the Python kernel: 'restart' (a new process: nothing survives; "
        "about 0.6 s of CPU) or 'namespace' (same process, variables and env cleared; imported modules stay).",
    )

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"sandbox type name {v!r} must match {_NAME_RE.pattern}")
        return v

    @model_validator(mode="after")
    def _network_ok(self) -> "SandboxTypeConfig":
        check_network(self.network, self.allow)
        return self

    @field_validator("environment")
    @classmethod
    def _env_ok(cls, v: dict) -> dict:
        return check_env(v)


_REDIS_KEYS = {
    "redis_enabled", "redis_server", "redis_port", "redis_db", "redis_user", "redis_password",
    "redis_port_key", "redis_container_pool_key", "redis_mount_dir_key",
}


class SandboxManagerEnvConfig(_Config):
    """The manager's configuration: the reference's fields and defaults, minus Redis.

    Redis settings from a reference configuration are accepted and ignored (the
    actors hold the state). ``container_deployment`` picks the driver.
    """

    # hide_input_in_errors: a validation error would otherwise quote every field, the OSS secret too
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    container_prefix_key: str = "runtime_sandbox_container_"
    file_system: Literal["local", "oss"] = "local"
    storage_folder: Optional[str] = None
    container_deployment: Literal["process", "docker"] = "process"
    default_mount_dir: Optional[str] = "sessions_mount_dir"
    readonly_mounts: Optional[dict[str, str]] = None
    allow_mount_dir: bool = False
    pool_size: int = Field(0, ge=0, le=4096)
    oss_endpoint: Optional[str] = None
    oss_access_key_id: Optional[str] = Field(None, repr=False)  # credentials stay out of repr()
    oss_access_key_secret: Optional[str] = Field(None, repr=False)
    oss_bucket_name: Optional[str] = None
    heartbeat_timeout: float = Field(300, gt=0)
    watcher_scan_interval: float = Field(1, ge=0)
    released_key_ttl: float = Field(3600, ge=0)
    max_sandbox_instances: int = Field(0, ge=0)

    # corral's own
    namespace: str = Field("corral", description="Ray namespace all corral actors live in.")
    state_dir: str = Field(".corral", description="Where the registry checkpoints its records.")
    sandbox_types: dict[str, SandboxTypeConfig] = Field(default_factory=dict)
    default_type: str = "base"
    acquire_timeout: float = Field(60.0, gt=0, description="How long an acquire waits in line at the instance limit.")
    reconcile_interval: float = Field(
        30.0, gt=0, description="Seconds between the registry's reconciliations (containers by label, session actors)."
    )
    spare_sessions: int = Field(2, ge=0, le=256, description="Session actors kept started and idle, so an acquire "
                                "never waits for one (hosted mode: spare slots, at least 64).")
    session_mode: Literal["actor", "hosted"] = Field(
        "actor", description="Where each session's heartbeat clock runs: 'actor' = a SessionActor process of its "
        "own; 'hosted' = a slot of one SessionHost actor per node (a few KiB a session instead of a process).",
    )
    registry_lane: bool = Field(
        True, description="Callers on the registry's node send acquires and releases over a Unix socket "
        "(~0.4 ms) instead of a Ray call (~2.5 ms); everything else goes through Ray.",
    )
    node_resource: Optional[str] = Field(
        None, description="Only Ray nodes that have this custom resource (e.g. 'corral_sandbox') run "
        "sandboxes; None: every node.",
    )
    max_sandboxes_per_node: Optional[int] = Field(
        None, ge=0, le=100000, description="Sandboxes one node may hold; None: from its CPUs and memory "
        "(32 per CPU, at most one per 256 MiB).",
    )
    max_starting_per_node: Optional[int] = Field(
        None, ge=1, le=1024, description="Sandboxes one node starts at once; None: from its CPUs.",
    )
    advertise_host: Optional[str] = Field(
        None, description="Where boxes listen and are reached: None = 127.0.0.1 on a single-node Ray cluster, "
        "each node's Ray address on several nodes; 'node' = always the node's address; an address = that one "
        "(a single machine whose sandboxes are reached from elsewhere). Every route still needs the box's token.",
    )
    driver: Optional[DriverConfig] = Field(
        None, description="Explicit driver settings; None = the defaults of `container_deployment`."
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_redis(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("redis_enabled"):
                logger.warning("corral keeps state in Ray actors; ignoring the Redis settings")
            data = {k: v for k, v in data.items() if k not in _REDIS_KEYS}
        return data

    @model_validator(mode="after")
    def _types(self) -> "SandboxManagerEnvConfig":
        if self.driver is not None and self.driver.type != self.container_deployment:
            raise ValueError(
                f"driver.type {self.driver.type!r} differs from container_deployment {self.container_deployment!r}"
            )
        for key, t in self.sandbox_types.items():
            if key != t.name:
                raise ValueError(f"sandbox_types key {key!r} differs from its name {t.name!r}")
        if self.default_type not in self.sandbox_types:
            self.sandbox_types[self.default_type] = SandboxTypeConfig(name=self.default_type)
        if self.file_system == "oss":
            missing = [f for f in ("oss_endpoint", "oss_access_key_id", "oss_access_key_secret", "oss_bucket_name")
                       if not getattr(self, f)]
            if missing:
                raise ValueError(f"file_system='oss' needs {', '.join(missing)}")
        return self

    def sandbox_type(self, name: Optional[str]) -> SandboxTypeConfig:
        """The type called ``name`` (None: the default); unknown names raise."""
        key = name or self.default_type
        if hasattr(key, "value"):  # the reference passes SandboxType enums
            key = key.value
        try:
            return self.sandbox_types[key]
        except KeyError:
            raise UnknownSandboxType(
                f"unknown sandbox type {key!r}; known: {sorted(self.sandbox_types)}"
            ) from None

    def pool_target(self, name: str) -> int:
        t = self.sandbox_type(name)
        return self.pool_size if t.pool_size is None else t.pool_size

    def timeout_for(self, name: Optional[str]) -> float:
        t = self.sandbox_type(name)
        return t.timeout or self.heartbeat_timeout

    def driver_config(self):
        """The driver's config: ``driver`` if given, else the defaults for ``container_deployment``."""
        if self.driver is not None:
            return self.driver
        cls = {"process": ProcessDriverConfig, "docker": DockerDriverConfig}
        kw = {"root": os.path.join(self.abs_state_dir(), "process")} if self.container_deployment == "process" else {}
        return cls[self.container_deployment](**kw)

    def abs_state_dir(self) -> str:
        return os.path.abspath(self.state_dir)


def owner_id(config: "SandboxManagerEnvConfig") -> str:
    """The registry instance a state dir and namespace make: the ``corral.owner`` label of its
    sandboxes. Reconciliation only adopts or removes containers carrying its own."""
    import hashlib

    return hashlib.sha256(f"{config.abs_state_dir()}\0{config.namespace}".encode()).hexdigest()[:16]


def labels_for(rec: "ContainerModel", namespace: str, owner: str) -> dict[str, str]:
    """The labels a record's container carries (the registry reconciles by them)."""
    return {
        LABEL_MANAGED: "true",
        LABEL_NAME: rec.container_name,
        LABEL_TYPE: rec.sandbox_type or "",
        LABEL_REGISTRY: namespace,
        LABEL_OWNER: owner,
        LABEL_NODE: rec.node_address or "",
    }


#: Linux refuses, at exec, one ``NAME=value`` string longer than 128 KiB (MAX_ARG_STRLEN) and an
#: environment near ARG_MAX: an env that large is refused where it is given, not at the first command.
MAX_ENV_ENTRY = 128 * 1024 - 1
MAX_ENV_TOTAL = 1024 * 1024


def check_env(environment: Optional[dict]) -> dict[str, str]:
    """Validate a per-call environment: keys are names, values are not None, sizes exec accepts."""
    if environment is None:
        return {}
    if not isinstance(environment, dict):
        raise InvalidRequest(f"environment must be a dict, got {type(environment).__name__}")
    out = {}
    total = 0
    for k, v in environment.items():
        if not isinstance(k, str) or not k or "=" in k or "\0" in k:
            raise InvalidRequest(f"environment variable name {k!r:.80} is not valid")
        if v is None:
            raise InvalidRequest(f"environment variable {k!r} is None")
        v = str(v)
        if "\0" in v:
            raise InvalidRequest(f"environment variable {k!r} holds a NUL byte")
        size = len(k.encode()) + len(v.encode()) + 2
        if size > MAX_ENV_ENTRY:
            raise InvalidRequest(f"environment variable {k!r} is {size} bytes; a process accepts at most "
                                 f"{MAX_ENV_ENTRY} per variable (put large data in a file instead)")
        total += size
        out[k] = v
    if total > MAX_ENV_TOTAL:
        raise InvalidRequest(f"the environment is {total} bytes; at most {MAX_ENV_TOTAL}")
    return out
