"""Unit tests of a pool's StartLog: outcomes kept for a registry that restarts. No Ray, a fake clock."""

from __future__ import annotations

from corral.core.startlog import KEEP_RESULTS, UNKNOWN_START, StartLog


def test_outcomes_are_kept_for_a_while_then_reported_unknown():
    log = StartLog()
    ok = {"name": "a", "ok": True, "container_id": "c"}
    log.finished("a", ok, now=100.0)
    assert log.names() == ["a"] and log.outcome("a") is ok
    log.finished("b", {"name": "b", "ok": False}, now=100.0 + KEEP_RESULTS / 2)
    assert sorted(log.names()) == ["a", "b"]
    log.finished("c", {"name": "c", "ok": True}, now=100.0 + KEEP_RESULTS + 1)  # a is too old now
    assert sorted(log.names()) == ["b", "c"]
    gone = log.outcome("a")
    assert gone["name"] == "a" and not gone["ok"] and gone["error"]["message"] == UNKNOWN_START
