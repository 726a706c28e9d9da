"""The notebooks in ``notebooks/``: committed without outputs, and executed for real.

Each notebook runs top to bottom with nbclient in a kernel that is this test's
own interpreter (a kernelspec written to a temp dir, found through
JUPYTER_PATH), joined to the test session's Ray cluster (RAY_ADDRESS), with
its state and workspaces under a temp dir (CORRAL_NB_DIR). The rollout runs
smaller than its defaults (an injected parameters cell, as papermill does) to
keep the test short on a small machine. Whatever a notebook does, its
namespace is torn down afterwards and the test checks that no actor or box of
it is left.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NB_DIR = Path(__file__).resolve().parents[2] / "notebooks"
KERNEL_NAME = "corral-test-venv"
CELL_TIMEOUT = 240  # seconds per cell; a loaded 2-core machine warms a pool slowly

#: The namespace each notebook uses (fixed in the notebooks).
NAMESPACES = {"quickstart": "nb-quickstart", "rl_rollout": "nb-rollout"}

ROLLOUT_WORKERS, ROLLOUT_EPISODES, ROLLOUT_CALLS = 4, 2, 4


def _notebooks() -> list[Path]:
    return sorted(NB_DIR.glob("*.ipynb"))


# -- committed notebooks carry no outputs ------------------------------------------------


def test_both_notebooks_exist():
    assert {p.stem for p in _notebooks()} >= set(NAMESPACES), sorted(p.name for p in _notebooks())


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{path.name}: code cells {dirty} have outputs or execution counts; strip them before committing "
        f"(jupyter nbconvert --clear-output --inplace {path.name})"
    )
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in the notebook metadata"


# -- executing them ------------------------------------------------------------------------


@pytest.fixture
def kernel(ray_cluster, tmp_path, monkeypatch):
    """A kernelspec whose kernel is this interpreter, joined to the session's cluster; tears the namespaces down."""
    from corral.manager import down
    from corral.models import SandboxManagerEnvConfig

    nb_dir = tmp_path / "nb"
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "corral (test venv)",
        "language": "python",
        "env": {
            "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
            "CORRAL_NB_DIR": str(nb_dir),
        },
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    yield nb_dir
    # Whatever the notebook did or failed to do: nothing of its namespaces may outlive the test.
    for stem, ns in NAMESPACES.items():
        state = nb_dir / stem / "state"
        if state.exists():
            cfg = SandboxManagerEnvConfig(namespace=ns, state_dir=str(state), default_mount_dir=str(nb_dir / stem / "m"))
            down(cfg, timeout=30)
    for p in _box_processes(nb_dir):  # boxes the driver lost track of (see _assert_nothing_left)
        _kill_group(p)


def _box_processes(under: Path) -> list:
    """Live processes whose command line names a path under ``under`` (the notebook's boxes and their kernels)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(under) in arg for arg in p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def _kill_group(p) -> None:
    """Kill a box we started: it leads its own process group (the driver starts it with setsid)."""
    import os
    import signal

    import psutil

    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, signal.SIGKILL)
        else:
            p.kill()
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


def _execute(name: str, cwd: Path, inject: str | None = None) -> "nbformat.NotebookNode":
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    if inject is not None:  # papermill's convention: a cell after the one tagged "parameters"
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        cell = nbformat.v4.new_code_cell(inject)
        cell.metadata["tags"] = ["injected-parameters"]
        nb.cells.insert(at + 1, cell)
    # A probe at the end: the kernel must be this interpreter.
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint('KERNEL-PYTHON=' + sys.executable)"))
    cwd.mkdir(parents=True, exist_ok=True)
    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT, startup_timeout=120,
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute()  # raises CellExecutionError on the first cell that errors
    return nb


def _outputs(nb, tag: str | None = None) -> list:
    cells = [c for c in nb.cells if c.cell_type == "code" and (tag is None or tag in c.metadata.get("tags", []))]
    assert cells, f"no code cell tagged {tag!r}"
    return [o for c in cells for o in c.get("outputs", [])]


def _stdout(nb) -> str:
    return "".join(o.get("text", "") for o in _outputs(nb) if o.output_type == "stream" and o.name == "stdout")


def _check_common(nb, nb_dir: Path, stem: str) -> None:
    errors = [o for o in _outputs(nb) if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    assert f"KERNEL-PYTHON={sys.executable}\n" in _stdout(nb)
    # the notebook's last cell tore its namespace down: a table of what it removed, with nothing left
    cleanup = [o for o in _outputs(nb, "cleanup") if "text/html" in o.get("data", {})]
    assert cleanup and "<table" in cleanup[-1]["data"]["text/html"]
    _assert_nothing_left(nb_dir, stem)


def _assert_nothing_left(nb_dir: Path, stem: str) -> None:
    import ray

    from corral.drivers import make_driver
    from corral.models import LABEL_MANAGED, SandboxManagerEnvConfig

    ns = NAMESPACES[stem]
    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a.get("namespace") == ns]
    assert not actors, f"actors of {ns} left: {actors}"
    cfg = SandboxManagerEnvConfig(namespace=ns, state_dir=str(nb_dir / stem / "state"))
    assert cfg.driver_config().type == "process"
    boxes = asyncio.run(make_driver(cfg.driver_config()).list({LABEL_MANAGED: "true"}))
    assert not boxes, f"boxes of {ns} left: {[b.container_id for b in boxes]}"
    # Also by process: a box whose launch raced its removal has no meta.json, so the driver's list misses it.
    procs = [" ".join(p.info["cmdline"][:8]) for p in _box_processes(nb_dir / stem)]
    assert not procs, f"box processes of {ns} left, invisible to the driver: {procs}"


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_quickstart_notebook_runs(kernel, tmp_path):
    nb = _execute("quickstart", tmp_path / "cwd")
    _check_common(nb, kernel, "quickstart")
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert images, "the quickstart showed no image"
    assert base64.b64decode(images[0]["data"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
    html = "".join(o.get("data", {}).get("text/html", "") for o in _outputs(nb))
    assert "data/numbers.csv" in html, "the file listing table is missing"
    assert "hello from a corral sandbox" in _stdout(nb)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_rl_rollout_notebook_runs(kernel, tmp_path):
    w, e = ROLLOUT_WORKERS, ROLLOUT_EPISODES
    nb = _execute("rl_rollout", tmp_path / "cwd", inject=f"WORKERS = {w}\nEPISODES = {e}")
    _check_common(nb, kernel, "rl_rollout")
    # every episode ran every tool call (a masked episode would run fewer)
    assert f"{w * e} episodes, {w * e * ROLLOUT_CALLS} tool calls in" in _stdout(nb)
    # a progress bar for the rollout
    bars = [o for o in _outputs(nb) if "episodes" in o.get("data", {}).get("text/plain", "")
            or "episodes" in o.get("text", "")]
    assert bars, "no progress bar output"
    tables = [o["data"]["text/html"] for o in _outputs(nb, "summary") if "text/html" in o.get("data", {})]
    assert len(tables) == 2 and all("<table" in t for t in tables)
    for phase in ("acquire", "shell call", "python call", "release"):
        assert phase in tables[0], f"latency table has no {phase!r} row"
    assert f">{w * e}<" in tables[1].replace(" ", ""), "outcome table does not count every episode"
    plots = [o for o in _outputs(nb, "latency-plot") if "image/png" in o.get("data", {})]
    assert len(plots) == 1, "no latency plot"
