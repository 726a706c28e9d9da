"""Checks shared by the tests that run a benchmark in-process with tiny parameters."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PCTS", "written_result"]

#: The percentiles every latency summary of a benchmark carries.
PCTS = {"p50", "p95", "p99"}


def written_result(out_dir: Path, stem: str, result: dict) -> dict:
    """The JSON a benchmark wrote to ``stem``.json, which must be its ``result``; its figure
    ``stem``.png must be a PNG image."""
    data = json.loads((out_dir / f"{stem}.json").read_text())
    assert data == json.loads(json.dumps(result))
    png = (out_dir / f"{stem}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    return data
