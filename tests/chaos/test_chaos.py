"""The chaos suite: every scenario of corral.chaos, on the process driver and on Docker, must end clean.

Clean means: no client call failed, no session or record that should survive was lost, and
nothing (sandbox, box process, container, Ray process) was left behind. Each scenario breaks one
thing for real (signals, SIGKILL, ray.kill, a container killed under its pool, a Ray head
restarted); its figures are printed, and ``corral chaos`` prints the same table. Client scenarios
start Ray clusters of their own; the rest run on the session's cluster.
"""

from __future__ import annotations

import pytest

from corral.chaos import Harness
from corral.chaos.scenarios import SCENARIOS

pytestmark = pytest.mark.ray


@pytest.mark.parametrize("driver", ["process", pytest.param("docker", marks=pytest.mark.docker)])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_ends_clean(name, driver, ray_cluster, tmp_path):
    if driver == "docker":
        from tests.support.docker import require_docker

        require_docker()
    h = Harness(driver, str(tmp_path), address=ray_cluster.get_runtime_context().gcs_address)
    try:
        outcome = SCENARIOS[name](h)
    finally:
        h.close()
    print(outcome.row())
    assert outcome.clean, outcome.row()
