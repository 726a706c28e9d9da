"""The cold path through the actors (process driver): a sandbox is warm as soon as its box answers.

No kernel boots before a sandbox is handed out: shell calls answer without one, the first cell
starts it. A sandbox type whose environment cannot run a kernel fails its starts, with the box's
reason in the error, instead of failing a user's first cell.
"""

from __future__ import annotations

import httpx
import pytest

import corral
from corral.models import SandboxTypeConfig
from tests.support.images import HIDE_IPYKERNEL

pytestmark = pytest.mark.ray



def _kernel_info(sb) -> dict:
    r = httpx.get(f"{sb.url}/v1/info", headers={"Authorization": f"Bearer {sb.record['runtime_token']}"},
                  trust_env=False, timeout=30)
    r.raise_for_status()
    return r.json()["kernel"]


def test_a_warm_sandbox_has_no_kernel_until_its_first_cell(make_manager):
    m = make_manager(pool_size=1)
    m.reserve(n=0, wait=True)
    with m.acquire() as sb:
        assert sb.shell("echo cold").stdout == "cold\n"
        out = m.call_tool(sb.name, "run_shell_command", {"command": "echo ref"})
        assert out["content"][0]["text"] == "ref\n"
        assert _kernel_info(sb) == {"alive": False}
        assert sb.python("import os\nos.getpid() > 1").text == "True"
        assert _kernel_info(sb) == {"alive": True}


def test_a_type_whose_environment_cannot_run_a_kernel_fails_its_start(make_manager, tmp_path):
    hide = tmp_path / "hide-ipykernel"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_IPYKERNEL)
    broken = SandboxTypeConfig(name="base", environment={"PYTHONPATH": str(hide)})
    m = make_manager(pool_size=0, sandbox_types={"base": broken})
    with pytest.raises(corral.DriverError) as err:
        m.create(meta={"session_ctx_id": "no-kernel-here"})
    message = str(err.value)
    assert "exited before it was ready" in message, message
    assert "the Python kernel cannot run in this sandbox" in message and "ipykernel" in message, message
    assert m.list_session_keys() == []
