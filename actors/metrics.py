"""Ray metrics of corral's actors (exported to Prometheus through Ray's metrics agent).

Created lazily inside each actor process; names start with ``corral_``.
"""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

__all__ = ["registry_metrics", "pool_metrics", "RegistryMetrics", "PoolMetrics"]

_LAT_BOUNDS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 30000]
_STATES = ("STARTING", "WARM", "RUNNING", "RESETTING", "RECYCLED", "LOST", "REPLACED", "RELEASED")


class RegistryMetrics:
    def __init__(self) -> None:
        self.records = Gauge("corral_records", "Sandbox records by state", tag_keys=("state",))
        self.sessions = Gauge("corral_live_sessions", "Sessions bound to a session actor")
        self.spares = Gauge("corral_spare_session_actors", "Session actors started and idle")
        self.warm = Gauge("corral_pool_warm", "Warm sandboxes ready", tag_keys=("sandbox_type",))
        self.starting = Gauge("corral_pool_starting", "Sandboxes being started", tag_keys=("sandbox_type",))
        self.waiting = Gauge("corral_pool_waiting", "Acquirers waiting for a sandbox", tag_keys=("sandbox_type",))
        self.claims = Counter("corral_claims_total", "Warm sandboxes bound to a session")
        self.releases = Counter("corral_releases_total", "Release calls")
        self.reaps = Counter("corral_reaps_total", "Sessions reaped after their heartbeat timeout")
        self.restores = Counter("corral_restores_total", "Sessions restored")
        self.acquire_ms = Histogram("corral_acquire_ms", "Acquire latency inside the registry actor (ms)",
                                    boundaries=_LAT_BOUNDS, tag_keys=("sandbox_type",))

    def set_counts(self, core: Any, sessions: dict) -> None:
        counts = core.counts()
        for state in _STATES:
            self.records.set(counts.get(state, 0), tags={"state": state})
        for t in core.config.sandbox_types:
            tags = {"sandbox_type": t}
            self.warm.set(core.warm_count(t), tags=tags)
            self.starting.set(core.count(t, "STARTING"), tags=tags)
            self.waiting.set(core.lines.warm_waiting(t), tags=tags)
        self.sessions.set(sessions.get("bound", 0))
        self.spares.set(sessions.get("spares", 0))


class PoolMetrics:
    def __init__(self, sandbox_type: str) -> None:
        self.start_ms = Histogram("corral_container_start_ms", "Sandbox create-to-ready (ms)",
                                  boundaries=_LAT_BOUNDS, tag_keys=("sandbox_type",))
        self.start_ms.set_default_tags({"sandbox_type": sandbox_type})


def registry_metrics() -> RegistryMetrics:
    return RegistryMetrics()


def pool_metrics(sandbox_type: str) -> PoolMetrics:
    return PoolMetrics(sandbox_type)
