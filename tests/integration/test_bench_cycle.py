"""`corral bench --workload cycle` in-process on the session's Ray cluster, with tiny parameters.

Shape checks only (the JSON, a valid PNG, every cycle's answer checked, the status() checks made
under load): speed is printed by the benchmark, never asserted.
"""

from __future__ import annotations

import json

import pytest

from corral.bench import rollout
from corral.bench.cycle import CycleParams, run, table, targets
from corral.errors import InvalidRequest

pytestmark = pytest.mark.ray

PCTS = {"p50", "p95", "p99"}


def test_cycle_bench_shape(ray_cluster, tmp_path):
    pytest.importorskip("matplotlib")
    p = CycleParams(workers=2, duration=3.0, pool_size=1, cold_starts=1, progress=False,
                    systems=("destroy", "reuse", "bare"), namespace_prefix="t-cycle")
    result = run(p, str(tmp_path))

    data = json.loads((tmp_path / "cycle.json").read_text())
    assert data == json.loads(json.dumps(result))
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

    png = (tmp_path / "cycle.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_bad_input_is_a_clear_error():
    with pytest.raises(InvalidRequest, match="duration"):
        CycleParams(duration=0).validate()
    with pytest.raises(InvalidRequest, match="reference-python"):
        CycleParams(systems=("reference",)).validate()
    with pytest.raises(InvalidRequest, match="driver docker"):
        CycleParams(systems=("reference",), reference_python="/usr/bin/python3").validate()
    with pytest.raises(InvalidRequest, match="unknown system"):
        CycleParams(systems=("nope",)).validate()
    assert rollout.main(["--workload", "cycle", "--duration", "-1", "--no-progress"]) == 2
