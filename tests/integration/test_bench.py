"""`corral bench` in-process on the session's Ray cluster, with tiny parameters.

Shape checks only (the JSON the README's table is made from, a valid PNG, every
episode's answers checked): speed is printed by the benchmark, never asserted.
"""

from __future__ import annotations

import pytest

from corral.bench.rollout import BenchParams, main, run
from corral.errors import InvalidRequest
from tests.support.bench import PCTS, written_result

pytestmark = pytest.mark.ray


def test_quick_bench_shape(ray_cluster, tmp_path):
    pytest.importorskip("matplotlib")
    p = BenchParams(workers=2, episodes=1, calls=2, think_ms=5, quick=True, progress=False,
                    namespace_prefix="t-bench")
    result = run(p, str(tmp_path))

    data = written_result(tmp_path, "bench", result)
    assert set(data) == {"systems", "machine", "params"}
    assert set(data["systems"]) == {"corral", "corral_destroy", "cold", "direct"}
    for name in ("corral", "corral_destroy", "cold"):
        s = data["systems"][name]
        assert s["errors"] == 0, (name, s.get("first_errors"), s.get("failure"))
        assert s["episodes"] == 2 and s["episodes_per_s"] > 0
        for metric in ("acquire_ms", "tool_ms", "release_ms"):
            assert PCTS <= set(s[metric]), (name, metric)
            assert all(isinstance(s[metric][q], float) for q in PCTS), (name, metric, s[metric])
            assert s[metric]["p50"] <= s[metric]["p95"] <= s[metric]["p99"]
    direct = data["systems"]["direct"]
    assert "episodes_per_s" not in direct and "acquire_ms" not in direct
    assert PCTS <= set(direct["tool_ms"]) and direct["errors"] == 0
    assert direct["tool_ms"]["n"] == 2 * 1 * 2
    # the no-pool baseline really starts a sandbox per episode (both acquires find the pool empty)
    assert data["systems"]["cold"]["cold_acquires"] >= 1
    assert data["systems"]["cold"]["sandboxes_started"] >= 2
    # reuse hands out warm sandboxes from the pool
    assert data["systems"]["corral"]["warm_acquires"] >= 1
    m = data["machine"]
    assert {"cpu_count", "cpu_model", "memory_gib", "python", "ray", "date"} <= set(m)
    assert data["params"]["workers"] == 2 and data["params"]["driver"] == "process"


@pytest.mark.parametrize("kw,match", [
    ({"workers": 0}, "workers"),
    ({"systems": ("docker_bare",)}, "docker_bare"),
    ({"systems": ("nope",)}, "unknown system"),
])
def test_bad_input_is_a_clear_error(kw, match):
    with pytest.raises(InvalidRequest, match=match):
        BenchParams(**kw).validate()


def test_bad_arguments_exit_with_code_2():
    assert main(["--quick", "--workers", "-3", "--no-progress"]) == 2
