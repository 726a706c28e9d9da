"""The latency summaries actors report in status() and benchmarks print."""

from corral.core.stats import LatencyWindow, pct, summary


def test_pct_is_nearest_rank_and_none_when_empty():
    assert pct([], 50) is None
    xs = [float(x) for x in range(1, 101)]  # 1..100
    assert pct(xs, 50) == 51.0 and pct(xs, 0) == 1.0 and pct(xs, 100) == 100.0
    assert pct(reversed(xs), 99) == 99.0  # any iterable, any order


def test_summary_counts():
    assert summary([]) == {"p50": None, "p95": None, "p99": None, "n": 0}
    assert summary([2.0, 1.0, 3.0])["p50"] == 2.0


def test_window_keeps_the_last_size_and_counts_all():
    w = LatencyWindow(size=3)
    w.add(100.0)
    w.add(1.0, n=3)  # the 100 ms falls out of the window
    s = w.summary()
    assert s["n"] == 3 and s["total"] == 4 and s["p99"] == 1.0


def test_idle_fraction_reads_proc_stat_deltas():
    from corral.bench.machine import cpu_times, idle_fraction

    assert idle_fraction((100, 1000), (190, 1100)) == 0.9
    assert idle_fraction((100, 1000), (100, 1000)) is None  # no time passed
    assert idle_fraction(None, (1, 2)) is None
    now = cpu_times()
    assert now is not None and 0 <= now[0] <= now[1]  # Linux: /proc/stat is there
