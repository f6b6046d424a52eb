"""The administrator's commands, run as a person would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pacs_lab.synthetic import make_series, new_uid, write_series

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "pacs-node.example.yaml"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_node", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, **(env or {})),
    )


def test_rules_test_explains_matches_and_near_misses(tmp_path: Path) -> None:
    study = new_uid()
    write_series(
        tmp_path / "dwi",
        make_series(
            2,
            modality="MR",
            rows=4,
            cols=4,
            study_uid=study,
            SeriesDescription="ep2d_diff_3scan_trace_p2",
            ImageType=["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"],
        ),
    )
    write_series(
        tmp_path / "loc", make_series(1, modality="MR", rows=4, cols=4, study_uid=study, SeriesDescription="localizer")
    )
    write_series(
        tmp_path / "ct", make_series(2, rows=4, cols=4, SeriesDescription="PORTAL VENOUS 7mm", SliceThickness=7)
    )
    out = run("--config", str(EXAMPLE), "rules", "test", str(tmp_path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "ep2d_diff_3scan_trace_p2" in text and "stroke-mr" in text
    assert "localizer" in text.lower()
    assert "SliceThickness" in text, "the near miss of the 7 mm CT names the failed condition"
    assert "Synthetic^Patient" not in text and "SYN0001" not in text


def test_rules_test_on_empty_folder_exits_2(tmp_path: Path) -> None:
    out = run("--config", str(EXAMPLE), "rules", "test", str(tmp_path))
    assert out.returncode == 2


def test_bad_config_exits_2_with_key_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dicom:\n  port: -5\n")
    out = run("--config", str(cfg), "studies", "list")
    assert out.returncode == 2 and "dicom.port" in out.stderr


def test_studies_list_on_new_node(tmp_path: Path) -> None:
    out = run("studies", "list", env={"PACS_NODE_DATA_DIR": str(tmp_path)})
    assert out.returncode == 0 and "no studies" in out.stdout
