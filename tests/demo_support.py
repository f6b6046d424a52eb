"""The demo, run once per test session: ``demo_run`` is what ``pacs-node demo`` produces.

Registered in conftest so that every test module may reuse the demo's received
SEG/SR/key images instead of producing its own.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from pacs_node.app.demo import DemoResult, run_demo


@dataclass
class DemoRun:
    """The demo's outputs: its folder, its per-pipeline results and what it printed."""

    folder: Path
    results: dict[str, DemoResult]
    output: str


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    folder = tmp_path_factory.mktemp("demo")
    stream = io.StringIO()
    results = run_demo(folder, stream=stream, timeout_s=420)
    return DemoRun(folder=folder, results={r.pipeline: r for r in results}, output=stream.getvalue())
