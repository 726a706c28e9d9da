"""`corral bench --workload cycle` in-process on the session's Ray cluster, with tiny parameters.

Shape checks only (the JSON, a valid PNG, every cycle's answer checked, the status() checks made
under load): speed is printed by the benchmark, never asserted.
"""

from __future__ import annotations

import pytest

from corral.bench import rollout
from corral.bench.cycle import CycleParams, run, table, targets
from corral.errors import InvalidRequest
from tests.support.bench import PCTS, written_result

pytestmark = pytest.mark.ray


def test_cycle_bench_shape(ray_cluster, tmp_path):
    pytest.importorskip("matplotlib")
    p = CycleParams(workers=2, duration=3.0, pool_size=1, cold_starts=1, progress=False,
                    systems=("destroy", "reuse", "bare"), namespace_prefix="t-cycle")
    result = run(p, str(tmp_path))

    data = written_result(tmp_path, "cycle", result)
    assert set(data) == {"workload", "systems", "cold_start", "machine", "params"} and data["workload"] == "cycle"
    assert list(data["systems"]) == ["destroy", "reuse", "bare"]
    for name, s in data["systems"].items():
        assert s["errors"] == 0, (name, s.get("first_errors"), s.get("failure"))
        assert s["cycles"] >= 1 and s["cycles_per_s"] == round(s["cycles"] / 3.0, 3)
        for metric in ("acquire_ms", "first_shell_ms", "release_ms"):
            assert PCTS <= set(s[metric]), (name, metric)
            assert s[metric]["p50"] <= s[metric]["p95"] <= s[metric]["p99"]
        assert s["starts"] is not None and s["busy_cpu_s"] is not None
        assert s["memory_per_sandbox_mib"] and s["memory_per_sandbox_mib"] > 1
    destroy, reuse = data["systems"]["destroy"], data["systems"]["reuse"]
    # destroy-on-release starts a sandbox for each cycle; reuse hands the same ones out again
    assert destroy["starts"] >= 1 and destroy["cpu_s_per_start"] > 0
    assert reuse["starts"] <= reuse["cycles"]
    st = destroy["status_under_load"]
    assert st["samples"] >= 1 and st["errors"] == 0
    assert st["check_in_flight_is_starting"] == 1.0 and st["check_in_flight_within_limit"] == 1.0
    assert st["check_waiting_is_pools"] == 1.0
    cold = data["cold_start"]
    assert cold["corral_create_to_first_shell_ms"]["n"] == 1 and cold["bare_start_to_box_ready_ms"]["n"] == 1
    assert {"cpu_count", "date", "background_busy_cpus"} <= set(data["machine"])
    assert "| destroy" in table(result) and any(line.startswith("reuse=False:") for line in targets(result))


@pytest.mark.parametrize("kw,match", [
    ({"duration": 0}, "duration"),
    ({"systems": ("reference",)}, "reference-python"),
    ({"systems": ("reference",), "reference_python": "/usr/bin/python3"}, "driver docker"),
    ({"systems": ("nope",)}, "unknown system"),
])
def test_bad_input_is_a_clear_error(kw, match):
    with pytest.raises(InvalidRequest, match=match):
        CycleParams(**kw).validate()


def test_bad_arguments_exit_with_code_2():
    assert rollout.main(["--workload", "cycle", "--duration", "-1", "--no-progress"]) == 2
