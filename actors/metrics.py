"""Ray metrics of corral's actors (exported to Prometheus through Ray's metrics agent).

Created lazily inside each actor process; names start with ``corral_``.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

__all__ = ["registry_metrics", "pool_metrics", "RegistryMetrics", "PoolMetrics"]

_LAT_BOUNDS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 30000]


class RegistryMetrics:
    def __init__(self) -> None:
        self.records = Gauge("corral_records", "Container records by state", tag_keys=("state",))
        self.sessions = Gauge("corral_live_sessions", "Sessions bound to a session actor")
        self.spares = Gauge("corral_spare_session_actors", "Session actors started and idle")
        self.claims = Counter("corral_claims_total", "Warm containers bound to a session")
        self.releases = Counter("corral_releases_total", "Release calls")
        self.reaps = Counter("corral_reaps_total", "Sessions reaped after their heartbeat timeout")
        self.restores = Counter("corral_restores_total", "Sessions restored")
        self.acquire_ms = Histogram("corral_acquire_ms", "Acquire latency inside the registry actor (ms)",
                                    boundaries=_LAT_BOUNDS, tag_keys=("sandbox_type",))

    def set_counts(self, counts: dict, sessions: int, spares: int) -> None:
        for state in ("STARTING", "WARM", "RUNNING", "RESETTING", "RECYCLED", "REPLACED", "RELEASED"):
            self.records.set(counts.get(state, 0), tags={"state": state})
        self.sessions.set(sessions)
        self.spares.set(spares)


class PoolMetrics:
    def __init__(self, sandbox_type: str) -> None:
        tags = {"sandbox_type": sandbox_type}
        self.warm = Gauge("corral_pool_warm", "Warm containers ready", tag_keys=("sandbox_type",))
        self.starting = Gauge("corral_pool_starting", "Containers being started", tag_keys=("sandbox_type",))
        self.waiting = Gauge("corral_pool_waiting", "Acquirers waiting for a container", tag_keys=("sandbox_type",))
        self.start_ms = Histogram("corral_container_start_ms", "Container create-to-ready (ms)",
                                  boundaries=_LAT_BOUNDS, tag_keys=("sandbox_type",))
        for m in (self.warm, self.starting, self.waiting, self.start_ms):
            m.set_default_tags(tags)


def registry_metrics() -> RegistryMetrics:
    return RegistryMetrics()


def pool_metrics(sandbox_type: str) -> PoolMetrics:
    return PoolMetrics(sandbox_type)
