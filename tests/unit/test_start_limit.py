"""The default number of starts a node runs at once: one per CPU of the node, at least one."""

from __future__ import annotations

from corral.core.placement import START_FACTOR, NodeView, default_start_limit, place


def test_one_start_per_cpu_at_least_one():
    assert START_FACTOR == 1.0
    assert [default_start_limit(c) for c in (0, 0.5, 1, 1.5, 2, 4, 16, 64)] == [1, 1, 1, 2, 2, 4, 16, 64]


def test_a_burst_is_admitted_up_to_the_limit_and_the_rest_waits():
    view = NodeView("n", capacity=100, start_limit=default_start_limit(2))
    assert place(10, [view]) == ["n", "n"]
    view.starting = 2
    assert place(10, [view]) == []
